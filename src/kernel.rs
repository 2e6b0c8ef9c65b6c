//! The kernels multiq can launch, by name, and their host reference semantics.
//!
//! A [`Kernel`] is a name plus its scalar parameters. Every backend implements every kernel
//! with the same per-element semantics as [`Kernel::reference`], which is also what
//! verification compares against.

use crate::error::{Error, Result};

/// A kernel and its scalar parameters. Kernels operate in place on one f32 buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `simple_compute`: each element, `iters` times, `v = sin(v) * cos(v) + v`.
    SimpleCompute {
        /// Inner iterations per element.
        iters: u32,
    },
}

impl Kernel {
    /// Names of all kernels, as backends register them.
    pub const NAMES: &'static [&'static str] = &["simple_compute"];

    /// Looks a kernel up by name, with its parameter.
    pub fn by_name(name: &str, iters: u32) -> Result<Kernel> {
        match name {
            "simple_compute" => Ok(Kernel::SimpleCompute { iters }),
            other => Err(Error::UnknownKernel(other.to_string())),
        }
    }

    /// The kernel's name as backends register it.
    pub fn name(&self) -> &'static str {
        match self {
            Kernel::SimpleCompute { .. } => "simple_compute",
        }
    }

    /// Applies the kernel to `data` on the calling thread: the reference semantics.
    pub fn reference(&self, data: &mut [f32]) {
        match *self {
            Kernel::SimpleCompute { iters } => {
                for v in data {
                    *v = simple_compute(*v, iters);
                }
            }
        }
    }
}

/// One element of `simple_compute`: `iters` times `v = sin(v) * cos(v) + v`, in f32.
#[inline]
pub fn simple_compute(mut v: f32, iters: u32) -> f32 {
    for _ in 0..iters {
        v = v.sin() * v.cos() + v;
    }
    v
}

/// The multi-queue test's initial value of element `i` of thread `thread`'s buffer:
/// `(thread + 1) * 0.001 + i * 1e-6`, computed in f32.
#[inline]
pub fn initial_value(thread: usize, i: usize) -> f32 {
    (thread as f32 + 1.0) * 0.001 + i as f32 * 1e-6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_name_round_trips_and_rejects_unknown() {
        let k = Kernel::by_name("simple_compute", 7).unwrap();
        assert_eq!(k, Kernel::SimpleCompute { iters: 7 });
        assert_eq!(k.name(), "simple_compute");
        assert!(matches!(
            Kernel::by_name("nope", 1),
            Err(Error::UnknownKernel(_))
        ));
    }

    #[test]
    fn simple_compute_matches_formula() {
        let v = 0.5f32;
        let once = v.sin() * v.cos() + v;
        assert_eq!(simple_compute(v, 1), once);
        assert_eq!(simple_compute(v, 0), v);
        // v -> v + sin(2v)/2 converges towards pi/2.
        assert!((simple_compute(0.3, 500) - std::f32::consts::FRAC_PI_2).abs() < 1e-3);
    }
}
