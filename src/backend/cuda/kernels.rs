//! multiq's CUDA kernels: CUDA C source, compiled by NVRTC once per device per process.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaStream, DriverError};
use cudarc::nvrtc::CompileOptions;
use parking_lot::{Mutex, RwLock};

use super::{driver_error, unavailable};
use crate::error::{Error, Result};

/// Threads per block for element-wise kernels.
pub const BLOCK_THREADS: u32 = 256;

/// The kernels' source. Indices are 32-bit unsigned: buffers are capped at `u32::MAX`
/// elements before launch, and `blockIdx.x * 256 + threadIdx.x` stays below 2^32.
const SOURCE: &str = r#"
extern "C" __global__ void simple_compute(float* data, unsigned int n, unsigned int iters) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = data[i];
    for (unsigned int k = 0; k < iters; k++) v = sinf(v) * cosf(v) + v;
    data[i] = v;
}

// A plain copy (BackendStream::copy; either side may be page-locked host memory mapped into
// the device). Launched as a programmatic dependent where the device allows: it waits for the
// work ahead of it before touching either buffer.
extern "C" __global__ void copy_f32(const float* src, float* dst, unsigned int n) {
    let_dependents_launch();
    wait_for_prerequisites();
    // 64-bit index: with n near 2^32, a 32-bit i + stride would wrap below n and never end.
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride)
        dst[i] = src[i];
}

// A grouped launch: one grid over up to MAX_SEGMENTS buffers, passed by value as a kernel
// parameter (no copy of a table before the launch). Block b works on the segment whose
// first_block is the largest <= b. Each element goes through exactly the code above, so a
// buffer's result is bit-identical to launching it alone.
// Variants for 8, 32 and 128 segments keep the parameter block (copied at every launch)
// as small as the batch allows.
struct Segment { float* data; unsigned int n; unsigned int first_block; };
template <int MAX> struct Group { unsigned int count; unsigned int pad; Segment seg[MAX]; };
// The segment holding 256-element block `vb`: the last one whose first_block <= vb.
template <int MAX> __device__ __forceinline__ const Segment& locate(const Group<MAX>& g, unsigned int vb) {
    unsigned int lo = 0, hi = g.count - 1;
    while (lo < hi) {
        unsigned int mid = (lo + hi + 1) / 2;
        if (g.seg[mid].first_block <= vb) lo = mid; else hi = mid - 1;
    }
    return g.seg[lo];
}
// Element `lane` of 256-element block `vb`, through exactly simple_compute's code.
template <int MAX> __device__ __forceinline__ void element(const Group<MAX>& g, unsigned int vb, unsigned int lane, unsigned int iters) {
    const Segment& s = locate(g, vb);
    unsigned int i = (vb - s.first_block) * 256u + lane;
    if (i >= s.n) return;
    float v = s.data[i];
    for (unsigned int k = 0; k < iters; k++) v = sinf(v) * cosf(v) + v;
    s.data[i] = v;
}
template <int MAX> __device__ void grouped(const Group<MAX>& g, unsigned int iters) {
    element(g, blockIdx.x, threadIdx.x, iters);
}
// The same, followed by a completion signal written by the kernel itself (no separate
// stream memory operation). The grid strides over the same 256-element virtual blocks with
// at most SIGNAL_BLOCKS_PER_SM blocks of 1,024 threads per multiprocessor, so few blocks
// count themselves done: every thread fences its writes, each block then adds one to the
// counter, and the last block resets the counter for the next launch on the stream and
// writes `value` into the host-mapped word. The host seeing `value` therefore implies every
// element of the batch was written and is visible device-wide. Each element still goes
// through exactly the code above (bit-identical results).
struct Signal { unsigned long long* word; unsigned int* counter; unsigned long long value; };
template <int MAX> __device__ __forceinline__ void grouped_signal(const Group<MAX>& g, unsigned int iters, const Signal& s) {
    const Segment& last = g.seg[g.count - 1];
    unsigned int vblocks = last.first_block + (last.n + 255u) / 256u;
    if (last.n == 0u) vblocks += 1u;
    for (unsigned int vb = blockIdx.x * 4u + threadIdx.x / 256u; vb < vblocks; vb += gridDim.x * 4u) {
        element(g, vb, threadIdx.x % 256u, iters);
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int done = atomicAdd(s.counter, 1u);
        if (done == gridDim.x - 1) {
            *s.counter = 0u;
            __threadfence_system();
            *(volatile unsigned long long*)s.word = s.value;
        }
    }
}
extern "C" __global__ void __launch_bounds__(1024, 2) simple_compute_grouped_signal8(const Group<8> g, unsigned int iters, const Signal s) { grouped_signal(g, iters, s); }
extern "C" __global__ void __launch_bounds__(1024, 2) simple_compute_grouped_signal32(const Group<32> g, unsigned int iters, const Signal s) { grouped_signal(g, iters, s); }
extern "C" __global__ void __launch_bounds__(1024, 2) simple_compute_grouped_signal(const Group<128> g, unsigned int iters, const Signal s) { grouped_signal(g, iters, s); }
extern "C" __global__ void simple_compute_grouped8(const Group<8> g, unsigned int iters) { grouped(g, iters); }
extern "C" __global__ void simple_compute_grouped32(const Group<32> g, unsigned int iters) { grouped(g, iters); }
extern "C" __global__ void simple_compute_grouped(const Group<128> g, unsigned int iters) { grouped(g, iters); }
"#;

/// The device queue's kernel, compiled with the kernels above (so its element code is
/// theirs).
const QUEUE_SOURCE: &str = include_str!("queue_kernel.cu");

/// Device helpers for programmatic dependent launch, prepended to kernel sources that use them.
pub const PDL_SOURCE: &str = include_str!("pdl.cuh");

/// Buffers per grouped launch (the kernel's `MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 128;

/// One buffer of a grouped launch, laid out as the kernel's `Segment`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Segment {
    pub data: u64,
    pub n: u32,
    pub first_block: u32,
}

/// The grouped launch's parameter, laid out as the kernel's `Group` (2,056 bytes, within the
/// 4 KiB kernel-parameter limit).
#[repr(C)]
pub struct Group {
    pub count: u32,
    pub pad: u32,
    pub seg: [Segment; MAX_SEGMENTS],
}

/// Threads per block of the grouped-and-signalled kernels (four virtual blocks).
pub const SIGNAL_BLOCK_THREADS: u32 = 1024;
/// Blocks per multiprocessor, at most, of the grouped-and-signalled kernels (two waves of
/// two resident 1,024-thread blocks); larger batches use the plain kernel and a stream
/// memory operation.
pub const SIGNAL_BLOCKS_PER_SM: u32 = 4;

/// The signal parameter of the grouped-and-signalled kernels, laid out as the kernel's
/// `Signal`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SignalParam {
    /// Device alias of the host-mapped completion word.
    pub word: u64,
    /// Device word counting finished blocks (0 between launches).
    pub counter: u64,
    /// Value to write once every block finished.
    pub value: u64,
}

/// The loaded kernels of one device.
pub struct Kernels {
    pub simple_compute: CudaFunction,
    /// Grouped variants for at most 8, 32 and 128 segments.
    pub simple_compute_grouped: [CudaFunction; 3],
    /// Grouped variants that write a completion signal when done (same sizes).
    pub simple_compute_grouped_signal: [CudaFunction; 3],
    /// The device queue's kernel (`queue_kernel.cu`).
    pub simple_compute_queue: CudaFunction,
    /// `copy_f32(src, dst, n)`: [`crate::backend::BackendStream::copy`].
    pub copy_f32: CudaFunction,
    /// Multiprocessors of the device (sizes the signalled kernels' grid).
    pub multiprocessors: u32,
}

/// Segments each grouped variant takes.
pub const GROUP_SIZES: [usize; 3] = [8, 32, MAX_SEGMENTS];

static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();

/// The kernels for device `ordinal`, compiled and loaded on first use.
pub fn for_device(ctx: &Arc<CudaContext>, ordinal: usize) -> Result<Arc<Kernels>> {
    let mut cache = CACHE.get_or_init(|| Mutex::new(HashMap::new())).lock();
    if let Some(k) = cache.get(&ordinal) {
        return Ok(k.clone());
    }
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| driver_error("info", e))?;
    let opts = CompileOptions {
        // cudarc's `use_fast_math` field only sets --fmad; pass the real flag.
        options: vec![
            "--use_fast_math".into(),
            format!("--gpu-architecture=compute_{major}{minor}"),
        ],
        ..Default::default()
    };
    let source = format!("{PDL_SOURCE}{SOURCE}{QUEUE_SOURCE}");
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => Error::Device {
            op: "compile",
            message: log.to_string_lossy().into_owned(),
        },
        other => unavailable(format!(
            "NVRTC could not compile multiq's kernels: {other:?}"
        )),
    })?;
    let module = ctx
        .load_module(ptx)
        .map_err(|e| driver_error("load module", e))?;
    let simple_compute = module
        .load_function("simple_compute")
        .map_err(|e| driver_error("load function", e))?;
    let load = |name: &str| {
        module
            .load_function(name)
            .map_err(|e| driver_error("load function", e))
    };
    let simple_compute_grouped = [
        load("simple_compute_grouped8")?,
        load("simple_compute_grouped32")?,
        load("simple_compute_grouped")?,
    ];
    let simple_compute_grouped_signal = [
        load("simple_compute_grouped_signal8")?,
        load("simple_compute_grouped_signal32")?,
        load("simple_compute_grouped_signal")?,
    ];
    let simple_compute_queue = load("simple_compute_queue")?;
    let copy_f32 = load("copy_f32")?;
    let multiprocessors = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(|e| driver_error("info", e))?
        .max(1) as u32;
    let k = Arc::new(Kernels {
        simple_compute,
        simple_compute_grouped,
        simple_compute_grouped_signal,
        simple_compute_queue,
        copy_f32,
        multiprocessors,
    });
    cache.insert(ordinal, k.clone());
    Ok(k)
}

/// Plain-fp32 kernels (no fast math) other than `simple_compute`: `source` compiled by NVRTC
/// for this device once per context, its functions `names` loaded, cached by `key`.
///
/// Asked on every small product (`skinny`, `bias_act`): a hit takes a read lock and clones one
/// `Arc`, so threads launching at once do not serialize here. A miss compiles under a mutex of
/// its own (one compile per key, however many threads miss together).
pub fn compiled(
    ctx: &Arc<CudaContext>,
    key: &'static str,
    source: &str,
    names: &[&str],
) -> Result<Arc<[CudaFunction]>> {
    type Cache = HashMap<(usize, &'static str), Arc<[CudaFunction]>>;
    static CACHE: OnceLock<RwLock<Cache>> = OnceLock::new();
    static COMPILING: Mutex<()> = Mutex::new(());
    let cache = CACHE.get_or_init(|| RwLock::new(HashMap::new()));
    let id = (ctx.cu_ctx() as usize, key);
    if let Some(f) = cache.read().get(&id) {
        return Ok(f.clone());
    }
    let _compiling = COMPILING.lock();
    // Another thread may have compiled it while this one waited.
    if let Some(f) = cache.read().get(&id) {
        return Ok(f.clone());
    }
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| driver_error("info", e))?;
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| Error::Device {
        op: "compile",
        message: format!("{e:?}"),
    })?;
    let module = ctx
        .load_module(ptx)
        .map_err(|e| driver_error("load module", e))?;
    let functions = names
        .iter()
        .map(|n| {
            module
                .load_function(n)
                .map_err(|e| driver_error("load function", e))
        })
        .collect::<Result<Arc<[CudaFunction]>>>()?;
    cache.write().insert(id, functions.clone());
    Ok(functions)
}

/// Whether kernels written for it (they call `wait_for_prerequisites()` before touching memory
/// earlier work may write, `pdl.cuh`) are launched as programmatic dependents on this device:
/// compute capability 9.0 or above, unless `MULTIQ_PDL=0`. Such a kernel may start while the
/// kernel ahead of it on its stream is still running, which hides part of a launch's latency.
/// On the H200 a 1-row forward (a copy in, three layers) took 8.6 µs of device time launched
/// so against 10.1 µs in stream order (scripts/probes/mlp_forward.cu,
/// bench/results/h200/mlp/probe-mlp-forward.txt), and in the same call as the recorded run
/// the batch sweep's 1-row forwards ran 91,796/s against 78,052/s with `MULTIQ_PDL=0`
/// (bench/results/h200/mlp.md, mlp/mlp-nopdl.txt).
pub fn programmatic(ctx: &Arc<CudaContext>) -> Result<bool> {
    static OFF: OnceLock<bool> = OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("MULTIQ_PDL").is_ok_and(|v| v.trim() == "0")) {
        return Ok(false);
    }
    // Asked on every small-batch product: the answer is kept per context (readers do not
    // block each other).
    static CACHE: OnceLock<RwLock<HashMap<usize, bool>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| RwLock::new(HashMap::new()));
    let id = ctx.cu_ctx() as usize;
    if let Some(&known) = cache.read().get(&id) {
        return Ok(known);
    }
    let (major, _) = ctx
        .compute_capability()
        .map_err(|e| driver_error("info", e))?;
    cache.write().insert(id, major >= 9);
    Ok(major >= 9)
}

/// A kernel launch's shape.
#[derive(Clone, Copy, Debug)]
pub struct LaunchShape {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory, bytes.
    pub shared: u32,
    /// Launch as a programmatic dependent of the kernel ahead on the stream ([`programmatic`]).
    pub programmatic: bool,
}

/// Launches `func` on `stream` (`cuLaunchKernelEx`).
///
/// # Safety
/// As `cuLaunchKernel`: `params` points to one live value per kernel parameter, of the
/// parameter's type, and the kernel's memory accesses stay inside live allocations of the
/// stream's context. With `shape.programmatic`, the kernel must call `wait_for_prerequisites()`
/// before touching memory that work queued earlier on the stream may read or write.
pub unsafe fn launch(
    func: &CudaFunction,
    stream: &CudaStream,
    shape: LaunchShape,
    params: &mut [*mut c_void],
) -> std::result::Result<(), DriverError> {
    if !shape.programmatic {
        // SAFETY: the caller's contract, as for `cuLaunchKernel` (which this is).
        return unsafe {
            cudarc::driver::result::launch_kernel(
                func.cu_function(),
                shape.grid,
                shape.block,
                shape.shared,
                stream.cu_stream(),
                params,
            )
        };
    }
    // SAFETY: CUlaunchAttributeValue is a C union holding a 64-byte `pad` array, so all-zero
    // bytes are a valid value of it; only `programmaticStreamSerializationAllowed` is written
    // and read below.
    let mut value: sys::CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
    value.programmaticStreamSerializationAllowed = 1;
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value,
    };
    let config = sys::CUlaunchConfig {
        gridDimX: shape.grid.0,
        gridDimY: shape.grid.1,
        gridDimZ: shape.grid.2,
        blockDimX: shape.block.0,
        blockDimY: shape.block.1,
        blockDimZ: shape.block.2,
        sharedMemBytes: shape.shared,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: `config` and `attr` outlive the call; the rest is the caller's contract.
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            func.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
}
