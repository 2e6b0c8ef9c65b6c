//! Small and mid-sized plain products (`C = A·B` or `A·Bᵀ`, no bias or ReLU, strict fp32) by
//! multiq's own kernel (`tile_kernel.cu`): 64 × 64 tiles of C over 256 threads, so a 256 × 256
//! product keeps 16 multiprocessors busy for a few µs where cuBLAS's tiling keeps a few busy
//! for longer, and a coalesced batch spreads over the whole device (one block row per product).
//!
//! Used by [`super::blas`] for one product and for coalesced batches (the batch reads the same
//! device pointer arrays as cuBLAS's batched call, so it is recorded and replayed the same way)
//! when every dimension is at most [`max_dim`]; larger products and TF32 stay with cuBLAS.
//! Arithmetic: fp32 multiply-adds, fp32 accumulation, k in ascending order (within the strict
//! bound that the tests check).

use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{result, sys, CudaContext};

use super::driver_error;
use crate::backend::{GemmSpec, Precision};
use crate::error::{Error, Result};

const SOURCE: &str = include_str!("tile_kernel.cu");

/// Edge of the square tile of C a block computes (`TILE` in the kernel source).
const TILE: u32 = 64;

/// Threads per block.
const THREADS: u32 = 256;

/// Products in one batched launch at most (the grid's z extent).
const MAX_BATCH: usize = 65_535;

/// Dimensions up to which products go to the tile kernel unless `MULTIQ_TILE_MAX` says
/// otherwise (0 turns it off). Chosen against cuBLAS in the same call: see the results
/// README of the device that set it.
pub const DEFAULT_MAX_DIM: usize = 512;

/// Largest m, n or k the tile kernel takes (read once per process).
pub fn max_dim() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("MULTIQ_TILE_MAX")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_DIM)
    })
}

/// True when products of `spec` (without bias) go to the tile kernel.
pub fn applies(spec: &GemmSpec) -> bool {
    let max = max_dim();
    spec.precision == Precision::Strict
        && !spec.relu
        && spec.m >= 1
        && spec.n >= 1
        && spec.k >= 1
        && spec.m <= max
        && spec.n <= max
        && spec.k <= max
}

/// True when a batch of `count` products of `spec` goes to the tile kernel.
pub fn applies_batched(spec: &GemmSpec, count: usize) -> bool {
    applies(spec) && count <= MAX_BATCH
}

fn dims(spec: &GemmSpec) -> Result<(u32, u32, u32)> {
    let dim = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| Error::invalid(format!("{what} = {v} exceeds 2^32")))
    };
    Ok((dim(spec.m, "m")?, dim(spec.n, "n")?, dim(spec.k, "k")?))
}

fn functions(ctx: &Arc<CudaContext>) -> Result<Vec<cudarc::driver::CudaFunction>> {
    super::kernels::compiled(ctx, "tile", SOURCE, &["tile_gemm", "tile_gemm_batched"])
}

fn grid(m: u32, n: u32, count: u32) -> (u32, u32, u32) {
    (n.div_ceil(TILE), m.div_ceil(TILE), count)
}

/// Queues `c = a·b` (or `a·bᵀ`) on `stream` of `ctx`: device addresses of live allocations
/// holding A `[m, k]`, B `[k, n]` (`[n, k]` when `spec.b_transposed`) and C `[m, n]`, C not
/// overlapping the inputs (checked by the caller).
pub fn launch(
    ctx: &Arc<CudaContext>,
    stream: sys::CUstream,
    spec: &GemmSpec,
    (a, b, c): (u64, u64, u64),
) -> Result<()> {
    let (mut m, mut n, mut k) = dims(spec)?;
    let f = functions(ctx)?;
    let (mut pa, mut pb, mut pc) = (a, b, c);
    let mut bt = i32::from(spec.b_transposed);
    let mut params: [*mut c_void; 7] = [
        (&mut pa as *mut u64).cast(),
        (&mut pb as *mut u64).cast(),
        (&mut pc as *mut u64).cast(),
        (&mut m as *mut u32).cast(),
        (&mut n as *mut u32).cast(),
        (&mut k as *mut u32).cast(),
        (&mut bt as *mut i32).cast(),
    ];
    // SAFETY: `tile_gemm` takes (const float*, const float*, float*, unsigned, unsigned,
    // unsigned, int), matching `params`, whose pointees outlive the call (the driver copies
    // them at launch). A holds m·k floats, B k·n, C m·n (the caller's check), C does not
    // overlap A or B; the kernel reads A rows < m and B within its k·n elements, and writes
    // C[r, j] for r < m, j < n only (every access bounds-checked); `stream` is a live stream
    // of `ctx`, which is current.
    unsafe {
        result::launch_kernel(
            f[0].cu_function(),
            grid(m, n, 1),
            (THREADS, 1, 1),
            0,
            stream,
            &mut params,
        )
    }
    .map_err(|e| driver_error("launch", e))
}

/// Queues a batch of `count` products of `spec` on `stream` of `ctx`, their operands' device
/// addresses read from `pointers` when the kernel runs: `count` addresses of B, then `count`
/// of A, then `count` of C (the arrays of cuBLAS's batched call), each a live allocation
/// holding its matrix, outputs distinct and none of them an input of the batch.
pub fn launch_batched(
    ctx: &Arc<CudaContext>,
    stream: sys::CUstream,
    spec: &GemmSpec,
    pointers: u64,
    count: usize,
) -> Result<()> {
    let (mut m, mut n, mut k) = dims(spec)?;
    if count == 0 || count > MAX_BATCH {
        return Err(Error::invalid(format!(
            "a tile batch of {count} products (1..={MAX_BATCH})"
        )));
    }
    let f = functions(ctx)?;
    let mut ptrs = pointers;
    let mut cnt = count as u32;
    let mut bt = i32::from(spec.b_transposed);
    let mut params: [*mut c_void; 6] = [
        (&mut ptrs as *mut u64).cast(),
        (&mut cnt as *mut u32).cast(),
        (&mut m as *mut u32).cast(),
        (&mut n as *mut u32).cast(),
        (&mut k as *mut u32).cast(),
        (&mut bt as *mut i32).cast(),
    ];
    // SAFETY: `tile_gemm_batched` takes (const unsigned long long*, unsigned, unsigned,
    // unsigned, unsigned, int), matching `params`, whose pointees outlive the call. `pointers`
    // holds 3·count device addresses in stream order before the kernel (the caller's
    // contract), each a live allocation of its matrix; blockIdx.z < count selects them, and
    // each product's accesses stay inside its matrices as in `launch`.
    unsafe {
        result::launch_kernel(
            f[1].cu_function(),
            grid(m, n, cnt),
            (THREADS, 1, 1),
            0,
            stream,
            &mut params,
        )
    }
    .map_err(|e| driver_error("launch", e))
}
