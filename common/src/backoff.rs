//! Capped exponential backoff with jitter, computed from a seeded generator.
//!
//! Retries (decision delivery, outcome queries, later saga steps) wait
//! `min(cap, initial * multiplier^attempt)` scaled by a random factor in [0.5, 1.0] ("equal
//! jitter"), so that many retries after one outage do not arrive together. The generator is
//! passed in, never global: the engines stay deterministic for a given seed.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A small, fast, seedable generator (SplitMix64). Not for cryptography.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How long to wait before retry number `attempt` (0 is the first retry).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    pub initial_ms: u64,
    pub multiplier: f64,
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial_ms: 50,
            multiplier: 2.0,
            max_ms: 5_000,
        }
    }
}

impl Backoff {
    /// The delay before retry `attempt`, jittered into [half, full] of the capped delay.
    pub fn delay(&self, attempt: u32, rng: &mut SplitMix64) -> Duration {
        let exp = self.multiplier.max(1.0).powi(attempt.min(64) as i32);
        let capped = (self.initial_ms as f64 * exp).min(self.max_ms as f64);
        let jittered = capped * (0.5 + 0.5 * rng.next_f64());
        let millis = jittered.max(1.0) as u64;
        debug_assert!(millis <= self.max_ms.max(1));
        Duration::from_millis(millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_stay_within_the_jitter_band() {
        let backoff = Backoff {
            initial_ms: 10,
            multiplier: 2.0,
            max_ms: 1_000,
        };
        let mut rng = SplitMix64::new(7);
        for attempt in 0..40 {
            let full = (10.0 * 2f64.powi(attempt as i32)).min(1_000.0);
            let d = backoff.delay(attempt, &mut rng).as_millis() as f64;
            assert!(
                d >= (full * 0.5).floor() && d <= full,
                "attempt {attempt}: {d} ms, full {full}"
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let backoff = Backoff::default();
        let run = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..10)
                .map(|a| backoff.delay(a, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }
}
