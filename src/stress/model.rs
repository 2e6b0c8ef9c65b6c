//! The serial reference: what every buffer of a round must hold.
//!
//! A tracked buffer starts from a pattern (element `i` = `base + (i mod 1021) * step`, with
//! `base` and `step` drawn per buffer) and counts the `simple_compute` iterations applied to
//! it since. Iterating the same function composes (`k` iterations then `m` = `k + m`), so
//! the expected contents are `simple_compute(init(i), iterations)` whatever the interleaving
//! of the ops with other threads' work.
//!
//! Counting must be visible: `simple_compute` converges to π/2, after which one op more or
//! less changes nothing. Patterns therefore start in [0.004, 0.04], where each iteration
//! roughly doubles a value, and a buffer is read back, checked and rewritten before it
//! reaches [`MAX_ITERS`]: one lost or duplicated op moves the smallest elements by far more
//! than any backend's tolerance (CUDA's fast-math error stays below 2e-4 over 8 iterations
//! from 0.004), so the state proves how many ops ran, not only that some did.

use super::rng::Rng;
use crate::error::Result;
use crate::kernel::simple_compute;
use crate::{Buffer, Device};

/// Period of a pattern (prime, so no block size of any backend is a multiple of it).
pub const PERIOD: usize = 1021;

/// Iterations a buffer may accumulate before it must be checked and rewritten.
pub const MAX_ITERS: u32 = 8;

/// A buffer's initial contents.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pattern {
    base: f32,
    step: f32,
}

impl Pattern {
    /// A pattern drawn from `rng`: values in [0.004, 0.04].
    pub fn random(rng: &mut Rng) -> Pattern {
        let base = 0.004 + 0.004 * rng.unit() as f32;
        let top = 0.02 + 0.02 * rng.unit() as f32;
        Pattern {
            base,
            step: (top - base) / (PERIOD - 1) as f32,
        }
    }

    /// Element `i`'s initial value.
    pub fn init(&self, i: usize) -> f32 {
        self.base + (i % PERIOD) as f32 * self.step
    }

    /// The first `len` initial values.
    pub fn values(&self, len: usize) -> Vec<f32> {
        (0..len).map(|i| self.init(i)).collect()
    }

    /// The expected values of elements `0..PERIOD.min(len)` after `iters` iterations; element
    /// `i` of the buffer is expected to equal entry `i % PERIOD`.
    pub fn expected(&self, len: usize, iters: u32) -> Vec<f32> {
        (0..PERIOD.min(len))
            .map(|i| simple_compute(self.init(i), iters))
            .collect()
    }
}

/// A buffer and what it must hold.
pub struct Tracked {
    /// The buffer.
    pub buf: Buffer,
    /// Its initial contents.
    pub pattern: Pattern,
    /// Iterations applied since the pattern was written (ops submitted, waited or not).
    pub iters: u32,
    /// Ops submitted since the last successful check.
    pub unchecked_ops: u64,
    /// A name for messages (`T3.b1`, `shared0`).
    pub name: String,
}

/// Outcome of one check.
pub struct Checked {
    /// Ops proved applied by this check.
    pub ops: u64,
    /// Largest difference from the reference.
    pub max_abs_error: f32,
}

impl Tracked {
    /// Allocates `len` elements on `device` and writes a fresh pattern into them.
    pub fn new(device: &Device, len: usize, rng: &mut Rng, name: String) -> Result<Tracked> {
        let pattern = Pattern::random(rng);
        let buf = device.buffer_from(&pattern.values(len))?;
        Ok(Tracked {
            buf,
            pattern,
            iters: 0,
            unchecked_ops: 0,
            name,
        })
    }

    /// True if `k` more iterations keep the buffer's count visible.
    pub fn has_room(&self, k: u32) -> bool {
        self.iters + k <= MAX_ITERS
    }

    /// Records one op of `k` iterations, submitted successfully.
    pub fn applied(&mut self, k: u32) {
        self.iters += k;
        self.unchecked_ops += 1;
    }

    /// Reads the buffer back (ordered after every op queued on it) and compares it with the
    /// reference. `Ok(Err(message))` is a wrong answer; `Err` an error of the read itself.
    pub fn check(&mut self, tolerance: f32) -> Result<std::result::Result<Checked, String>> {
        let out = self.buf.read()?;
        let expected = self.pattern.expected(out.len(), self.iters);
        let mut max_abs_error = 0.0f32;
        for (i, &got) in out.iter().enumerate() {
            let want = expected[i % PERIOD];
            let err = (got - want).abs();
            // NaN never passes, whatever the tolerance.
            if err.is_nan() || err > tolerance {
                return Ok(Err(format!(
                    "{}: element {i} of {} is {got}, the serial reference after {} iterations \
                     ({} ops since the last check) is {want} (tolerance {tolerance})",
                    self.name,
                    out.len(),
                    self.iters,
                    self.unchecked_ops
                )));
            }
            max_abs_error = max_abs_error.max(err);
        }
        let ops = std::mem::take(&mut self.unchecked_ops);
        Ok(Ok(Checked { ops, max_abs_error }))
    }

    /// Writes a fresh pattern (after a check: the old contents are forgotten).
    pub fn rewrite(&mut self, rng: &mut Rng) -> Result<()> {
        let pattern = Pattern::random(rng);
        self.buf.write(&pattern.values(self.buf.len()))?;
        self.pattern = pattern;
        self.iters = 0;
        self.unchecked_ops = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The premise of the model: from every pattern value, each of the first MAX_ITERS
    /// iterations moves some element of the pattern by far more than CUDA's tolerance (1e-3),
    /// so one op more or less is always visible.
    #[test]
    fn one_op_more_or_less_is_always_visible() {
        let mut rng = Rng::new(3);
        for _ in 0..50 {
            let p = Pattern::random(&mut rng);
            for k in 0..MAX_ITERS {
                let a = p.expected(PERIOD, k);
                let b = p.expected(PERIOD, k + 1);
                let most = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    most > 0.01,
                    "{p:?}: {k} vs {} iterations differ by {most}",
                    k + 1
                );
            }
        }
    }

    #[test]
    fn a_check_finds_a_lost_op_and_passes_a_right_buffer() {
        let dev = Device::cpu(1).unwrap();
        let mut rng = Rng::new(9);
        let mut t = Tracked::new(&dev, 3000, &mut rng, "b".into()).unwrap();
        let pool = crate::StreamPool::new(&dev, crate::PoolConfig::default()).unwrap();
        let s = pool.current().unwrap();
        let k = crate::Kernel::SimpleCompute { iters: 2 };
        s.launch(k, &mut t.buf).unwrap().wait().unwrap();
        t.applied(2);
        let ok = t.check(0.0).unwrap().unwrap();
        assert_eq!(ok.ops, 1);
        // An op the model does not know about (as if the runtime ran one twice).
        s.launch(k, &mut t.buf).unwrap().wait().unwrap();
        assert!(t.check(0.0).unwrap().is_err());
        t.rewrite(&mut rng).unwrap();
        assert!(t.check(0.0).unwrap().is_ok());
    }
}
