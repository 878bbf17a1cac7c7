//! Training batches made ahead on a background thread, so the device does not wait for image
//! decoding, augmentation or shard reads between steps.
//!
//! Batch `it` must be a function of `it` alone (episode sampling is: `(seed, index)` decides
//! everything), so prefetching changes nothing in what a run sees, and a resumed or re-ordered
//! request simply restarts the producer at the asked iteration.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::Scope;

/// Batches `make(it)`, `make(it + 1)`, … up to `end` (exclusive), computed up to `depth` ahead
/// of the consumer.
pub struct Prefetcher<'scope, 'env, T: Send + 'env> {
    scope: &'scope Scope<'scope, 'env>,
    make: &'env (dyn Fn(u64) -> T + Sync),
    depth: usize,
    end: u64,
    /// The iteration the running producer delivers next, and its channel.
    live: Option<(u64, Receiver<(u64, T)>)>,
}

impl<'scope, 'env, T: Send + 'env> Prefetcher<'scope, 'env, T> {
    /// A prefetcher on threads of `scope` for batches below `end` (the run's last iteration + 1);
    /// nothing runs before the first [`Prefetcher::get`].
    pub fn new(scope: &'scope Scope<'scope, 'env>, make: &'env (dyn Fn(u64) -> T + Sync), depth: usize, end: u64) -> Self {
        Self { scope, make, depth: depth.max(1), end, live: None }
    }

    /// Batch `it`: taken from the queue when the producer is there, else computed after
    /// restarting the producer at `it` (the first call, or after a jump).
    pub fn get(&mut self, it: u64) -> T {
        if let Some((next, rx)) = &mut self.live {
            if *next == it {
                if let Ok((got, batch)) = rx.recv() {
                    debug_assert_eq!(got, it);
                    *next = it + 1;
                    return batch;
                }
            }
        }
        // Dropping the old receiver stops the old producer after its current batch.
        self.live = None;
        let (tx, rx) = sync_channel(self.depth);
        let (make, end) = (self.make, self.end.max(it + 1));
        self.scope.spawn(move || {
            for i in it..end {
                if tx.send((i, make(i))).is_err() {
                    break;
                }
            }
        });
        let (_, batch) = rx.recv().expect("prefetch producer ended without a batch");
        self.live = Some((it + 1, rx));
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn prefetched_batches_come_in_order_and_restart_on_a_jump() {
        let calls = AtomicU64::new(0);
        let make = |it: u64| {
            calls.fetch_add(1, Ordering::Relaxed);
            it * 10
        };
        std::thread::scope(|s| {
            let mut p = Prefetcher::new(s, &make, 2, 1000);
            assert_eq!((0..5).map(|i| p.get(i)).collect::<Vec<_>>(), vec![0, 10, 20, 30, 40]);
            // A resume elsewhere (or a repeated iteration) restarts the producer there.
            assert_eq!(p.get(100), 1000);
            assert_eq!(p.get(101), 1010);
            assert_eq!(p.get(3), 30);
        });
        // Made ahead at most `depth` + 1 per producer beyond what was asked.
        assert!(calls.load(Ordering::Relaxed) <= 8 + 3 * 3, "{} batches made", calls.load(Ordering::Relaxed));
    }

    #[test]
    fn nothing_is_made_past_the_end() {
        let calls = AtomicU64::new(0);
        let make = |it: u64| {
            calls.fetch_add(1, Ordering::Relaxed);
            it
        };
        std::thread::scope(|s| {
            let mut p = Prefetcher::new(s, &make, 4, 3);
            assert_eq!((0..3).map(|i| p.get(i)).collect::<Vec<_>>(), vec![0, 1, 2]);
        });
        assert_eq!(calls.load(Ordering::Relaxed), 3);
    }
}
