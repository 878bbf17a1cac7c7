//! Portable seeded randomness.
//!
//! All draws go through [`SeededRng`], a ChaCha8 stream with our own integer/float mapping, so the
//! same seed gives the same episodes and augmentations on every machine and with every `rand`
//! release (rand's `gen_range` algorithms are not promised to stay fixed across versions).

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a random stream is used for; keeps e.g. the epoch shuffle independent of episode draws
/// made with the same seed and index.
#[derive(Clone, Copy, Debug)]
pub(crate) enum StreamPurpose {
    TrainEpisode = 1,
    TrainEpochOrder = 2,
    TestEpisodes = 3,
    /// The k-th cached augmented view of a training image (`cache-proposals`).
    CachedView = 4,
    /// Stage-2 episodes drawn over cached views.
    ShardEpisode = 5,
    ShardEpochOrder = 6,
}

/// A deterministic random source (ChaCha8, explicit seed, explicit stream).
#[derive(Clone, Debug)]
pub struct SeededRng {
    inner: ChaCha8Rng,
}

impl SeededRng {
    /// One independent stream per (seed, purpose, index): episodes can be built in any order, on
    /// any thread, and still come out identical.
    pub(crate) fn stream(seed: u64, purpose: StreamPurpose, index: u64) -> Self {
        let mut inner = ChaCha8Rng::seed_from_u64(seed ^ ((purpose as u64) << 56));
        inner.set_stream(index);
        Self { inner }
    }

    /// A stream from a plain seed (tests and callers that need their own draws).
    pub fn from_seed(seed: u64) -> Self {
        Self { inner: ChaCha8Rng::seed_from_u64(seed) }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// Uniform integer in `0..n` (n > 0), unbiased (Lemire's multiply-and-reject).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let x = self.next_u64();
            let m = (x as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform index into a slice of length `n` (n > 0).
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// Uniform integer in `lo..=hi`.
    pub fn int_inclusive(&mut self, lo: i64, hi: i64) -> i64 {
        debug_assert!(lo <= hi);
        lo + self.below((hi - lo) as u64 + 1) as i64
    }

    /// Uniform float in `[0, 1)` with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform float in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit_f64()
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit_f64() < p
    }

    /// In-place Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.index(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(mut r: SeededRng) -> Vec<u64> {
        (0..4).map(|_| r.next_u64()).collect()
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a = draws(SeededRng::stream(7, StreamPurpose::TrainEpisode, 3));
        assert_eq!(a, draws(SeededRng::stream(7, StreamPurpose::TrainEpisode, 3)));
        assert_ne!(a, draws(SeededRng::stream(7, StreamPurpose::TrainEpisode, 4)));
        assert_ne!(a, draws(SeededRng::stream(7, StreamPurpose::TestEpisodes, 3)));
        assert_ne!(a, draws(SeededRng::stream(8, StreamPurpose::TrainEpisode, 3)));
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = SeededRng::from_seed(1);
        let mut hist = [0usize; 6];
        for _ in 0..60_000 {
            hist[r.index(6)] += 1;
        }
        for h in hist {
            assert!((9_000..11_000).contains(&h), "{hist:?}");
        }
        for _ in 0..1000 {
            let v = r.int_inclusive(-18, 18);
            assert!((-18..=18).contains(&v));
        }
    }

    const PINNED_SEED_42: [u64; 6] = [681, 950, 427, 627, 288, 149];
    const PINNED_TEST_STREAM: [u64; 6] = [174, 829, 831, 269, 496, 739];

    #[test]
    fn fixed_seed_gives_fixed_values() {
        // Pins the value mapping: if this changes, stored episode seeds would give other episodes.
        let mut r = SeededRng::from_seed(42);
        let v: Vec<u64> = (0..6).map(|_| r.below(1000)).collect();
        let mut s = SeededRng::stream(4604572, StreamPurpose::TestEpisodes, 0);
        let w: Vec<u64> = (0..6).map(|_| s.below(1000)).collect();
        assert_eq!((v, w), (PINNED_SEED_42.to_vec(), PINNED_TEST_STREAM.to_vec()));
    }
}
