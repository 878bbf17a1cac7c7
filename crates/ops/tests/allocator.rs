//! `keep_freed_memory`: the allocator setting takes on glibc, and a large block freed and
//! allocated again comes back without page faults (it stayed mapped).
//!
//! Without the libtest harness (`harness = false`): the check must run on the main thread,
//! whose arena grows without a size limit; glibc maps blocks over 32 MiB of other threads'
//! arenas on their own whatever the setting (the model's large tensors are allocated by the
//! thread that calls the op, the main thread in the binaries).

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn minor_faults() -> i64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
    u.ru_minflt
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn a_freed_large_block_comes_back_without_page_faults() {
    assert!(ops::keep_freed_memory(), "mallopt refused the settings");
    // 64 MiB, past glibc's default mmap ceiling: without the setting every allocation is a fresh
    // mapping whose 16k pages fault in when written.
    let n = 16 << 20;
    let touch = |v: f32| {
        let b = vec![v; n];
        std::hint::black_box(&b);
    };
    touch(1.0);
    let before = minor_faults();
    touch(2.0);
    let faults = minor_faults() - before;
    assert!(faults < 1000, "{faults} page faults writing a reused 64 MiB block");
}

fn main() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    a_freed_large_block_comes_back_without_page_faults();
    println!("allocator: ok");
}
