//! `init_cpu_pool` puts the calling thread in rayon's global pool. One test in its own process:
//! the global pool can be built once.

use rayon::prelude::*;

#[test]
fn the_calling_thread_joins_the_pool_and_others_still_get_their_work_done() {
    assert_eq!(ops::init_cpu_pool(Some(2)).unwrap(), 2);
    assert_eq!(rayon::current_num_threads(), 2);
    assert_eq!(rayon::current_thread_index(), Some(0), "the caller is worker 0");
    let sum: u64 = (0..100_000u64).into_par_iter().map(|i| i % 7).sum();
    assert_eq!(sum, (0..100_000u64).map(|i| i % 7).sum::<u64>());
    // As the prefetch thread does: another thread hands parallel work to the pool while this
    // one blocks on a channel; the second worker must run it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let s: u64 = (0..50_000u64).into_par_iter().map(|i| i * 2).sum();
        tx.send(s).unwrap();
    });
    let got = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the pool ran the other thread's work");
    assert_eq!(got, (0..50_000u64).map(|i| i * 2).sum::<u64>());
    assert!(ops::init_cpu_pool(Some(2)).is_err(), "a second build is refused");
}
