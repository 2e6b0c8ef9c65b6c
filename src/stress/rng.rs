//! Seeded draws for round plans, on the crate's SplitMix64 (`tensor::SplitMix64`; Steele,
//! Lea, Flood 2014). Its output depends on the seed alone (no platform, no crate version), so
//! a round printed with its seed is planned identically wherever it is replayed.

use crate::tensor::SplitMix64;

/// The golden-ratio increment of SplitMix64.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 with the draws a plan needs.
#[derive(Clone, Debug)]
pub struct Rng {
    inner: SplitMix64,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng {
            inner: SplitMix64(seed),
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// A value in `0..n` (`n` > 0). Lemire's multiply-shift; the bias (below 2^-40 for the
    /// small `n` used here) does not matter for planning rounds.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// A `usize` in `lo..=hi`.
    pub fn range_usize(&mut self, lo: usize, hi: usize) -> usize {
        self.range(lo as u64, hi as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// A value in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// One of `items` (non-empty), uniformly.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// One of `items` (non-empty, weights not all zero), with probability proportional to its
    /// weight.
    pub fn weighted<T: Copy>(&mut self, items: &[(T, u32)]) -> T {
        let total: u64 = items.iter().map(|&(_, w)| u64::from(w)).sum();
        let mut x = self.below(total.max(1));
        for &(item, w) in items {
            if x < u64::from(w) {
                return item;
            }
            x -= u64::from(w);
        }
        items[items.len() - 1].0
    }

    /// An independent generator for a part of the plan (a thread, a buffer).
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

/// The seed of round `round` of a run with master seed `master`: the round-th output of
/// SplitMix64 seeded with `master` (computable directly, so a worker can start at any round).
pub fn round_seed(master: u64, round: u64) -> u64 {
    SplitMix64(master.wrapping_add(GAMMA.wrapping_mul(round))).next_u64()
}

/// A seed from the clock and the process id, for runs without `--seed`.
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    SplitMix64(nanos ^ (u64::from(std::process::id()) << 32)).next_u64()
}

/// Parses a seed given as decimal or `0x` hexadecimal.
pub fn parse_seed(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse::<u64>(),
    };
    parsed.map_err(|_| {
        format!("`{s}` is not a seed (a whole number, decimal or 0x-hexadecimal, below 2^64)")
    })
}

/// A seed as printed everywhere: `0x` and 16 hexadecimal digits.
pub fn show_seed(seed: u64) -> String {
    format!("{seed:#018x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_splitmix64_sequence() {
        // Reference values of SplitMix64 seeded with 1234567 (the test vector used by the
        // xoshiro/xoroshiro reference code).
        let mut r = Rng::new(1_234_567);
        let want = [
            6_457_827_717_110_365_317u64,
            3_203_168_211_198_807_973,
            9_817_491_932_198_370_423,
            4_593_380_528_125_082_431,
            16_408_922_859_458_223_821,
        ];
        for w in want {
            assert_eq!(r.next_u64(), w);
        }
    }

    #[test]
    fn round_seeds_are_the_master_sequence() {
        let mut r = Rng::new(42);
        for k in 0..5 {
            assert_eq!(round_seed(42, k), r.next_u64());
        }
    }

    #[test]
    fn ranges_stay_in_bounds_and_weights_are_respected() {
        let mut r = Rng::new(7);
        let mut seen = [0u32; 3];
        for _ in 0..3000 {
            let v = r.range(5, 7);
            assert!((5..=7).contains(&v));
            seen[(v - 5) as usize] += 1;
            assert_ne!(r.weighted(&[('a', 0), ('b', 1)]), 'a');
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn seeds_parse_in_decimal_and_hex_and_print_back() {
        assert_eq!(parse_seed("42"), Ok(42));
        assert_eq!(parse_seed("0x2a"), Ok(42));
        assert_eq!(parse_seed(&show_seed(u64::MAX)), Ok(u64::MAX));
        for bad in ["", "-1", "0x", "0xg", "18446744073709551616", "1.5"] {
            assert!(parse_seed(bad).is_err(), "{bad:?}");
        }
    }
}
