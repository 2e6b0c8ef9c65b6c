//! Products with few rows against a weight stored `[n, k]` (a Linear layer on a small batch):
//! `C = act(A·Wᵀ + bias)` by multiq's own kernels (`skinny_kernel.cu`), which stream W once
//! across the whole device where cuBLAS tiles the product into a handful of blocks.
//!
//! Used by [`super::blas`] for `b_transposed` fp32 products with `m ≤` [`max_rows`] (bias and
//! ReLU always fused). Two kernels: `skinny_warp` (a warp per column of C, W's row held in
//! registers) for k a multiple of 4 up to [`WARP_MAX_K`] with 16-byte aligned operands, launched
//! as a programmatic dependent where the device allows ([`super::kernels::programmatic`]) and,
//! for [`GemmSpec::b_static`] products, loading W and the bias before waiting for the kernel
//! ahead; `skinny_v4`/`skinny_v1` (warps splitting k) for every other shape. Arithmetic is fp32
//! multiply-adds with fp32 accumulation in both precisions (never TF32), and each element's
//! summation order depends only on `k` and the kernel (chosen by `k` and alignment, never by
//! `m`), so a row's result does not depend on the rows batched with it.

use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{result, CudaStream};

use super::driver_error;
use crate::backend::GemmSpec;
use crate::error::{Error, Result};

const SOURCE: &str = include_str!("skinny_kernel.cu");

/// Threads per block (`THREADS` in the kernel source).
const THREADS: u32 = 128;

/// Columns of C per block (`COLS` of the kernel's entry points).
const COLS: u32 = 4;

/// Rows of C per pass of a block (`ROWS` of the kernel's entry points; `skinny_warp`'s rows
/// per group).
const ROWS: u32 = 8;

/// `skinny_warp`: columns of C per block (one per warp).
const WARP_COLS: u32 = 8;

/// `skinny_warp` takes k up to this (128 · `WARP_VECTORS` of the kernel source: W's row in
/// registers); larger k goes to `skinny_v4`.
const WARP_MAX_K: u32 = 1024;

/// Rows up to which products go to the skinny kernel unless `MULTIQ_SKINNY_ROWS` says
/// otherwise (0 turns it off). At 32 rows it and cuBLASLt tied on the H100
/// (bench/results/h100/mlp/probes.md).
pub const DEFAULT_MAX_ROWS: usize = 32;

/// Rows up to which [`super::blas`] uses the skinny kernel (read once per process).
pub fn max_rows() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("MULTIQ_SKINNY_ROWS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_ROWS)
    })
}

/// True when `spec` goes to the skinny kernel.
pub fn applies(spec: &GemmSpec) -> bool {
    spec.b_transposed && spec.m >= 1 && spec.m <= max_rows() && spec.n >= 1 && spec.k >= 1
}

/// Queues `c = act(a·wᵀ + bias)` on `stream`: `a [m, k]`, `w [n, k]`, `c [m, n]` (device
/// addresses of live allocations holding those matrices, checked by the caller), `bias` n
/// floats or 0.
pub fn launch(
    stream: &Arc<CudaStream>,
    spec: &GemmSpec,
    (a, w, c): (u64, u64, u64),
    bias: u64,
) -> Result<()> {
    let dim = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| Error::invalid(format!("{what} = {v} exceeds 2^32")))
    };
    let (mut m, mut n, mut k) = (dim(spec.m, "m")?, dim(spec.n, "n")?, dim(spec.k, "k")?);
    static SOURCE_WITH_PDL: OnceLock<String> = OnceLock::new();
    let source = SOURCE_WITH_PDL.get_or_init(|| format!("{}{SOURCE}", super::kernels::PDL_SOURCE));
    let f = super::kernels::compiled(
        stream.context(),
        "skinny",
        source,
        &["skinny_v4", "skinny_v1", "skinny_warp"],
    )?;
    let vector = k % 4 == 0 && a % 16 == 0 && w % 16 == 0;
    let (mut pa, mut pw, mut pb, mut pc) = (a, w, bias, c);
    let (mut has_bias, mut relu) = (i32::from(bias != 0), i32::from(spec.relu));
    let mut w_static = i32::from(spec.b_static);
    let groups = m.div_ceil(ROWS).min(65_535);
    // The kernels' parameters, in order; `skinny_v4`/`skinny_v1` take all but the last.
    let mut params: [*mut c_void; 10] = [
        (&mut pa as *mut u64).cast(),
        (&mut pw as *mut u64).cast(),
        (&mut pb as *mut u64).cast(),
        (&mut pc as *mut u64).cast(),
        (&mut m as *mut u32).cast(),
        (&mut n as *mut u32).cast(),
        (&mut k as *mut u32).cast(),
        (&mut has_bias as *mut i32).cast(),
        (&mut relu as *mut i32).cast(),
        (&mut w_static as *mut i32).cast(),
    ];
    if vector && k <= WARP_MAX_K {
        let shape = super::kernels::LaunchShape {
            grid: (n.div_ceil(WARP_COLS), groups, 1),
            block: (32 * WARP_COLS, 1, 1),
            // ROWS rows of A, k floats each (32 KiB at most: k <= WARP_MAX_K).
            shared: ROWS * k * 4,
            programmatic: super::kernels::programmatic(stream.context())?,
        };
        // SAFETY: `skinny_warp` takes (const float*, const float*, const float*, float*,
        // unsigned, unsigned, unsigned, int, int, int), matching `params`, whose pointees
        // outlive the call (the driver copies them). A holds m·k floats, W n·k, C m·n and the
        // bias n when has_bias (the caller's check); C does not overlap the inputs. The kernel
        // reads W rows j < n, A rows r < m and 16-byte vectors below k (A and W 16-byte
        // aligned, k a multiple of 4: `vector`), keeps at most ROWS·k floats in the dynamic
        // shared memory sized above, and writes C[r, j] for r < m, j < n only. It touches A and
        // C only after `wait_for_prerequisites()`, and W and the bias before it only with
        // `w_static` (the caller's promise that no queued work writes them), so a programmatic
        // launch is sound.
        return unsafe { super::kernels::launch(&f[2], stream, shape, &mut params) }
            .map_err(|e| driver_error("launch", e));
    }
    // The two entry points: 16-byte loads, and any alignment.
    let func = &f[usize::from(!vector)];
    // A row of blocks per group of ROWS rows, side by side (the kernel loops when m needs
    // more than the grid's 65,535 rows of blocks). Against one row of blocks taking the
    // groups in turn, forwards of 16 rows went 41.2 → 34.3 µs and of 32 rows 69.3 → 55.8 µs
    // on the H100 (bench/results/h100/mlp/probes.md).
    let grid = n.div_ceil(COLS);
    // SAFETY: the kernel takes (const float*, const float*, const float*, float*, unsigned,
    // unsigned, unsigned, int, int), matching the first nine of `params`, whose pointees
    // outlive the call (the driver copies them at launch). A holds m·k floats, W n·k, C m·n
    // and the bias n when has_bias (the caller's check); C does not overlap the inputs. The
    // kernel reads W rows j < n and A rows r < m only, writes C[r, j] for r < m, j < n only,
    // and `v4` is chosen only when its 16-byte loads are aligned (A, W 16-byte aligned, k a
    // multiple of 4).
    unsafe {
        result::launch_kernel(
            func.cu_function(),
            (grid, groups, 1),
            (THREADS, 1, 1),
            0,
            stream.cu_stream(),
            &mut params[..9],
        )
    }
    .map_err(|e| driver_error("launch", e))
}
