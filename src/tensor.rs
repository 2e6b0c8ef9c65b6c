//! Tensors: device memory with a shape and an element type, and the host reference that
//! matrix products are checked against.
//!
//! A [`Tensor`] is a [`Buffer`] (so it follows the runtime's ownership rules: mutated through
//! `&mut`, ordered on its last stream, freed in stream order) plus a row-major shape and a
//! [`DType`]. Only `F32` is implemented; the dtype travels with every tensor so that f16/bf16
//! can be added without changing signatures.
//!
//! Products: [`crate::Stream::matmul`] (one product, a ticket to wait on) and
//! [`crate::MatmulCoalescer`] (products from many threads merged into one batched launch).
//!
//! Numerics: [`reference_matmul`] computes in f64; [`error_bound`] states how far an fp32 (or
//! TF32) result may be from it: `|C - C64|ij <= bound(k) * (|A|·|B'|)ij`, with
//! `bound(k) = 2·k·2^-24` for strict fp32 (the classic `γ_k` bound for a k-term dot product,
//! doubled for the rounding of the inputs' products and of the output) and
//! `2^-10 + 2·k·2^-24` for TF32 (inputs rounded to 10 mantissa bits).

use crate::backend::BackendBuffer;
pub use crate::backend::{DType, Precision};
use crate::error::{Error, Result};
use crate::runtime::{Buffer, Device};

/// A row-major tensor on a device.
pub struct Tensor {
    buf: Buffer,
    shape: Vec<usize>,
    dtype: DType,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .finish()
    }
}

/// Formats a shape as `[a, b]`.
pub fn shape_str(shape: &[usize]) -> String {
    format!(
        "[{}]",
        shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn numel(shape: &[usize]) -> Result<usize> {
    if shape.is_empty() {
        return Err(Error::Shape("a tensor needs at least one dimension".into()));
    }
    let mut n = 1usize;
    for &d in shape {
        if d == 0 {
            return Err(Error::Shape(format!(
                "shape {} has a zero-size dimension",
                shape_str(shape)
            )));
        }
        n = n.checked_mul(d).ok_or_else(|| {
            Error::Shape(format!("shape {} has too many elements", shape_str(shape)))
        })?;
    }
    Ok(n)
}

impl Tensor {
    /// A tensor of `shape` holding a copy of `data` (row-major).
    pub fn from_slice(device: &Device, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        let n = numel(shape)?;
        if data.len() != n {
            return Err(Error::Shape(format!(
                "shape {} holds {n} elements, {} were given",
                shape_str(shape),
                data.len()
            )));
        }
        Ok(Tensor {
            buf: device.buffer_from(data)?,
            shape: shape.to_vec(),
            dtype: DType::F32,
        })
    }

    /// A zero-filled tensor of `shape`.
    pub fn zeros(device: &Device, shape: &[usize]) -> Result<Tensor> {
        let n = numel(shape)?;
        // The device buffer first: its limits and its memory refuse a size before any host
        // memory is taken; then the zeros, whose host copy is refused, not aborted, if the
        // host cannot hold it.
        let mut buf = device.alloc(n)?;
        let mut zeros = Vec::new();
        zeros.try_reserve_exact(n).map_err(|e| Error::OutOfMemory {
            elements: n,
            bytes: (n as u64).saturating_mul(4),
            device: "the host".into(),
            reason: format!("the zeros to upload: {e}"),
        })?;
        zeros.resize(n, 0.0);
        buf.write(&zeros)?;
        Ok(Tensor {
            buf,
            shape: shape.to_vec(),
            dtype: DType::F32,
        })
    }

    /// A tensor of `shape` and `dtype`; refused for element types not implemented yet.
    pub fn zeros_of(device: &Device, shape: &[usize], dtype: DType) -> Result<Tensor> {
        if dtype != DType::F32 {
            return Err(Error::Unsupported(format!(
                "{} tensors (only F32 is implemented)",
                dtype.name()
            )));
        }
        Tensor::zeros(device, shape)
    }

    /// The shape (row-major).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Always false: tensors hold at least one element.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The device the tensor lives on.
    pub fn device(&self) -> &Device {
        self.buf.device()
    }

    /// Reads the tensor back, after all work queued on it.
    pub fn to_vec(&mut self) -> Result<Vec<f32>> {
        self.buf.read()
    }

    /// Overwrites the tensor with `data` (same number of elements), after all work queued on
    /// it.
    pub fn write(&mut self, data: &[f32]) -> Result<()> {
        if data.len() != self.len() {
            return Err(Error::Shape(format!(
                "cannot write {} elements into a tensor of shape {}",
                data.len(),
                shape_str(&self.shape)
            )));
        }
        self.buf.write(data)
    }

    pub(crate) fn buffer_mut(&mut self) -> &mut Buffer {
        &mut self.buf
    }

    pub(crate) fn raw(&self) -> &dyn BackendBuffer {
        self.buf.raw()
    }
}

/// Checks `a · b -> out` shapes for a product: `a [m, k]`, `b [k, n]`, `out [m, n]`, all F32.
/// Returns `(m, n, k)`; the error names the tensors and their shapes.
pub fn matmul_shapes(a: &[usize], b: &[usize], out: &[usize]) -> Result<(usize, usize, usize)> {
    if a.len() != 2 || b.len() != 2 || out.len() != 2 {
        return Err(Error::Shape(format!(
            "matmul takes 2-D tensors, got a {}, b {}, out {}",
            shape_str(a),
            shape_str(b),
            shape_str(out)
        )));
    }
    let (m, k, k2, n) = (a[0], a[1], b[0], b[1]);
    if k != k2 {
        return Err(Error::Shape(format!(
            "a {} · b {}: inner dimensions {k} and {k2} differ",
            shape_str(a),
            shape_str(b)
        )));
    }
    if out != [m, n] {
        return Err(Error::Shape(format!(
            "a {} · b {} is [{m}, {n}], but out is {}",
            shape_str(a),
            shape_str(b),
            shape_str(out)
        )));
    }
    Ok((m, n, k))
}

/// `A[m×k] · B'` in f64 (row-major), where `B'` is `B[k×n]` or, with `b_transposed`, the
/// transpose of `B[n×k]`. Also returns `|A|·|B'|`, the scale of the error bound.
pub fn reference_matmul(
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    b_transposed: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0f64; m * n];
    let mut scale = vec![0f64; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = f64::from(a[i * k + p]);
            for j in 0..n {
                let bv = f64::from(if b_transposed {
                    b[j * k + p]
                } else {
                    b[p * n + j]
                });
                c[i * n + j] += av * bv;
                scale[i * n + j] += av.abs() * bv.abs();
            }
        }
    }
    (c, scale)
}

/// Relative bound factor for a k-term product (see the module doc).
pub fn error_bound(k: usize, precision: Precision) -> f64 {
    let strict = 2.0 * k as f64 * 2f64.powi(-24);
    match precision {
        Precision::Strict => strict,
        Precision::Tf32 => 2f64.powi(-10) + strict,
    }
}

/// How a computed product compares with the f64 reference.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct MatmulCheck {
    /// Largest `|C - C64|`.
    pub max_abs_error: f64,
    /// Largest `|C - C64| / (|A|·|B'|)` (0 where the scale is 0 and the error too).
    pub max_rel_to_scale: f64,
    /// The bound factor in force (`error_bound`).
    pub bound: f64,
    /// Every element within `bound · (|A|·|B'|)` (plus 1e-30 absolute, for exact zeros).
    pub within: bool,
}

/// Compares `c` with the f64 reference of `a · b'`.
pub fn check_matmul(
    c: &[f32],
    a: &[f32],
    b: &[f32],
    mnk: (usize, usize, usize),
    b_transposed: bool,
    precision: Precision,
) -> MatmulCheck {
    let (reference, scale) = reference_matmul(a, b, mnk, b_transposed);
    let bound = error_bound(mnk.2, precision);
    let mut out = MatmulCheck {
        max_abs_error: 0.0,
        max_rel_to_scale: 0.0,
        bound,
        within: c.len() == reference.len(),
    };
    for ((&got, &want), &s) in c.iter().zip(&reference).zip(&scale) {
        let err = (f64::from(got) - want).abs();
        if err.is_nan() {
            out.within = false;
            out.max_abs_error = f64::INFINITY;
            continue;
        }
        out.max_abs_error = out.max_abs_error.max(err);
        if s > 0.0 {
            out.max_rel_to_scale = out.max_rel_to_scale.max(err / s);
        }
        if err > bound * s + 1e-30 {
            out.within = false;
        }
    }
    out
}

/// [`check_matmul`] on at most `max_rows` evenly spaced rows of C (first and last included):
/// the f64 reference of a large product costs as much as the product, so benchmarks sample.
pub fn check_matmul_rows(
    c: &[f32],
    a: &[f32],
    b: &[f32],
    (m, n, k): (usize, usize, usize),
    b_transposed: bool,
    precision: Precision,
    max_rows: usize,
) -> MatmulCheck {
    let want = max_rows.clamp(1, m);
    let rows: Vec<usize> = (0..want)
        .map(|i| {
            if want == 1 {
                0
            } else {
                i * (m - 1) / (want - 1)
            }
        })
        .collect();
    let a_sub: Vec<f32> = rows
        .iter()
        .flat_map(|&r| a[r * k..(r + 1) * k].to_vec())
        .collect();
    let c_sub: Vec<f32> = rows
        .iter()
        .flat_map(|&r| c.get(r * n..(r + 1) * n).unwrap_or(&[]).to_vec())
        .collect();
    check_matmul(
        &c_sub,
        &a_sub,
        b,
        (rows.len(), n, k),
        b_transposed,
        precision,
    )
}

/// Deterministic pseudo-random values in [-1, 1) (SplitMix64), for test and benchmark
/// operands: the same seed gives the same values on every machine.
pub fn seeded_values(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
}

/// SplitMix64: a small, well-mixed, seedable generator (Steele, Lea, Flood 2014).
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value uniform in [0, 1) with 24 random bits (every value exact in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked_and_errors_name_them() {
        assert_eq!(matmul_shapes(&[2, 3], &[3, 4], &[2, 4]).unwrap(), (2, 4, 3));
        let e = matmul_shapes(&[2, 3], &[4, 4], &[2, 4])
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2, 3]") && e.contains("[4, 4]"), "{e}");
        let e = matmul_shapes(&[2, 3], &[3, 4], &[4, 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("out is [4, 2]"), "{e}");
        assert!(matmul_shapes(&[6], &[3, 4], &[2, 4]).is_err());
        assert!(numel(&[3, 0]).is_err());
        assert!(numel(&[]).is_err());
    }

    #[test]
    fn the_reference_and_the_bound_catch_a_wrong_element() {
        let (m, n, k) = (3, 2, 4);
        let a = seeded_values(1, m * k);
        let b = seeded_values(2, k * n);
        let (c64, _) = reference_matmul(&a, &b, (m, n, k), false);
        let mut c: Vec<f32> = c64.iter().map(|&v| v as f32).collect();
        assert!(check_matmul(&c, &a, &b, (m, n, k), false, Precision::Strict).within);
        c[5] += 1e-3;
        assert!(!check_matmul(&c, &a, &b, (m, n, k), false, Precision::Strict).within);
        c[5] = f32::NAN;
        assert!(!check_matmul(&c, &a, &b, (m, n, k), false, Precision::Strict).within);
        // B stored transposed gives the same product.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let (ct, _) = reference_matmul(&a, &bt, (m, n, k), true);
        assert_eq!(c64, ct);
    }

    #[test]
    fn seeded_values_are_deterministic_and_in_range() {
        let a = seeded_values(7, 1000);
        assert_eq!(a, seeded_values(7, 1000));
        assert_ne!(a, seeded_values(8, 1000));
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
    }
}
