//! Matrix products on CUDA streams: cuBLAS (sgemm, batched sgemm over pointer arrays) and
//! cuBLASLt (products with the bias and ReLU fused into the epilogue), one handle pair and
//! one workspace per stream, created on the stream's first product (or taken over from a
//! stream dropped earlier: destroying a cuBLAS handle waits for the whole device, see
//! `reuse`).
//!
//! Layering, as cudarc's: raw calls (`cudarc::cublas::sys`, `cudarc::cublaslt::sys`) appear
//! only inside the small `unsafe` blocks of [`Blas`]; [`StreamMath`] is the safe layer that
//! owns the handles, workspace, pointer arrays and cuBLASLt plans of one stream and frees them
//! after the stream has finished with them.
//!
//! Row-major to column-major: cuBLAS is column-major, multiq's tensors row-major. A row-major
//! `C[m×n] = A[m×k]·B'` is the column-major `Cᵀ[n×m] = B'ᵀ·Aᵀ`, and a row-major matrix read
//! column-major is its transpose, so the call is `gemm(m' = n, n' = m, k)` with cuBLAS's first
//! operand = B (op N, ld n; or op T, ld k when B is stored `[n, k]`), second = A (op N, ld k),
//! C with ld n. The row-major bias (one value per column of C) is cuBLASLt's bias (one value
//! per row of the column-major result).
//!
//! Precision: strict fp32 is cuBLAS's default math mode (`CUBLAS_DEFAULT_MATH`, which never
//! uses TF32 for fp32 data) and cuBLASLt's `CUBLAS_COMPUTE_32F`; TF32 only when asked
//! (`CUBLAS_TF32_TENSOR_OP_MATH`, `CUBLAS_COMPUTE_32F_FAST_TF32`).
//!
//! Thread-safety: a stream's state sits behind a mutex; the runtime already serializes
//! submissions to one stream, so the mutex is uncontended, and it makes the handles' use
//! from several threads (one at a time) sound.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::{Arc, OnceLock};

use cudarc::cublas::sys as cb;
use cudarc::cublaslt::sys as lt;
use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaGraph, CudaStream};
use parking_lot::Mutex;

use super::driver_error;
use super::reuse::{BlasKit, PinnedBlock, Reuse};
use super::skinny;
use super::stream::{bind, capture, cuda_buffer};
use crate::backend::{check_gemm, GemmOperands, GemmSpec, MatRef, Precision};
use crate::error::{Error, Result};

/// Bytes of cuBLAS/cuBLASLt workspace per stream: NVIDIA's recommendation (32 MiB on Hopper
/// and later, 4 MiB before).
fn workspace_bytes(major: i32) -> usize {
    if major >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// cuBLASLt plans kept per stream before the cache is emptied (a plan is a few hundred bytes
/// of host state; shapes and weights of one model need a handful per batch size).
const MAX_PLANS: usize = 1024;

fn blas_error(op: &'static str, status: impl std::fmt::Debug) -> Error {
    Error::Device {
        op,
        message: format!("{status:?}"),
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: crate::backend::BackendKind::Cuda,
        reason: reason.into(),
    }
}

/// Checks once per process that cuBLAS and cuBLASLt can be loaded.
fn libraries_present() -> Result<()> {
    static PRESENT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PRESENT
        .get_or_init(|| {
            // SAFETY: these only try to dlopen the candidate library names.
            if !unsafe { cb::is_culib_present() } {
                return Err("the cuBLAS library (libcublas.so) was not found".into());
            }
            // SAFETY: as above.
            if !unsafe { lt::is_culib_present() } {
                return Err("the cuBLASLt library (libcublasLt.so) was not found".into());
            }
            Ok(())
        })
        .clone()
        .map_err(unavailable)
}

/// The device address of an operand.
fn address(r: &MatRef<'_>) -> Result<sys::CUdeviceptr> {
    let b = cuda_buffer(r.buf)?;
    Ok(b.ptr() + (r.offset as u64) * 4)
}

fn int(v: usize, what: &str) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} exceeds cuBLAS's int")))
}

/// Largest power of two (at most 256) dividing `ptr`: the alignment cuBLASLt may assume.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        return 256;
    }
    1u32 << ptr.trailing_zeros().min(8)
}

/// The column-major call for a row-major spec (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ColMajor {
    m: c_int,
    n: c_int,
    k: c_int,
    trans_a: bool,
    lda: c_int,
    ldb: c_int,
    ldc: c_int,
}

impl ColMajor {
    fn of(spec: &GemmSpec) -> Result<Self> {
        let (m, n, k) = (int(spec.m, "m")?, int(spec.n, "n")?, int(spec.k, "k")?);
        // Offsets are computed in u64 elsewhere; element counts must also fit cuBLAS's int.
        int(spec.m.saturating_mul(spec.k), "A's size")?;
        int(spec.k.saturating_mul(spec.n), "B's size")?;
        int(spec.m.saturating_mul(spec.n), "C's size")?;
        Ok(ColMajor {
            m: n,
            n: m,
            k,
            trans_a: spec.b_transposed,
            lda: if spec.b_transposed { k } else { n },
            ldb: k,
            ldc: n,
        })
    }

    fn op_a(&self) -> cb::cublasOperation_t {
        if self.trans_a {
            cb::cublasOperation_t::CUBLAS_OP_T
        } else {
            cb::cublasOperation_t::CUBLAS_OP_N
        }
    }
}

/// Identifies a cuBLASLt plan: the call, what the epilogue does, and the pointers' alignments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlanKey {
    call: ColMajor,
    relu: bool,
    bias: sys::CUdeviceptr,
    precision: Precision,
    align: [u32; 3],
}

/// The handles of a plan, copied out of the cache for one call.
#[derive(Clone, Copy)]
struct PlanHandles {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
}

/// A cuBLASLt operation: descriptor, layouts and the heuristic's algorithm.
///
/// Invariant: every handle is live (created by cuBLASLt, destroyed only by `Drop`).
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    c: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        for layout in [self.c, self.b, self.a] {
            if !layout.is_null() {
                // SAFETY: the handle is live (invariant) and used by no queued call: cuBLASLt
                // reads descriptors when a call is made, not when it runs.
                let _ = unsafe { lt::cublasLtMatrixLayoutDestroy(layout) };
            }
        }
        if !self.desc.is_null() {
            // SAFETY: as above.
            let _ = unsafe { lt::cublasLtMatmulDescDestroy(self.desc) };
        }
    }
}

/// A separate bias-and-ReLU pass, for products whose epilogue is not fused (NVRTC, compiled
/// once per context). `relu` keeps NaN as NaN, as PyTorch's.
const BIAS_ACT_SOURCE: &str = r#"
extern "C" __global__ void bias_act(float* y, const float* bias, unsigned int rows,
                                    unsigned int cols, int has_bias, int relu) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    float v = y[i];
    if (has_bias) v += bias[i % cols];
    if (relu && v < 0.0f) v = 0.0f;
    y[i] = v;
}
"#;

fn bias_act_kernel(ctx: &Arc<CudaContext>) -> Result<CudaFunction> {
    let f = super::kernels::compiled(ctx, "bias_act", BIAS_ACT_SOURCE, &["bias_act"])?;
    Ok(f[0].clone())
}

/// The handles and memory of one stream.
///
/// Invariant: `handle` and `lt` are live handles; `handle` is bound to `bound` (null: unknown),
/// and to the stream a cuBLAS call queues on whenever one runs (`with` rebinds it to `stream`
/// first, `queue_batched` to the stream it is given); `workspace` is a live
/// allocation of `workspace_bytes`, and `pointers` one of `pointer_capacity` u64 (or 0 with
/// capacity 0), all in `ctx`; all leave only by `Drop`, after the stream finished: the
/// handles, the workspace and the page-locked block go back to the context's [`Reuse`] for the
/// next stream's state, the pointer arrays are freed in stream order.
struct Blas {
    handle: cb::cublasHandle_t,
    lt: lt::cublasLtHandle_t,
    workspace: sys::CUdeviceptr,
    workspace_bytes: usize,
    math: Precision,
    pointers: sys::CUdeviceptr,
    pointer_capacity: usize,
    /// Host copy of the last pointer arrays: page-locked (`pinned_block`, from the context's
    /// [`Reuse`]), `pinned_capacity` u64 (null with capacity 0), copied to `pointers` by the
    /// stream; written only once `pinned_event`
    /// (recorded after every copy out of it) completed.
    pinned: *mut u64,
    pinned_block: Option<PinnedBlock>,
    pinned_capacity: usize,
    pinned_event: sys::CUevent,
    pinned_pending: bool,
    /// The last write of `pinned` was queued but its event could not be recorded: settling
    /// waits for the stream instead of the event.
    pinned_unrecorded: bool,
    /// Batched products recorded as graphs (pointer copy + batched sgemm), by call; `None`
    /// once recording failed for that call. Dropped whenever `pointers` or `pinned` move.
    batched_graphs: HashMap<(ColMajor, Precision, usize), Option<CudaGraph>>,
    /// Calls run once unrecorded (cuBLAS sets itself up on a first call, which cannot be
    /// recorded).
    batched_warm: std::collections::HashSet<(ColMajor, Precision, usize)>,
    /// A stream only ever used to record graphs on (made on the first recording).
    recording: Option<Arc<CudaStream>>,
    /// The stream `handle` was last bound to with this stream's workspace (null: unknown, e.g.
    /// after a failed rebind from the recording stream).
    bound: sys::CUstream,
    plans: HashMap<PlanKey, Plan>,
    /// Keys whose cuBLASLt plan failed: those products use sgemm and a separate pass.
    unfusable: std::collections::HashSet<PlanKey>,
    stream: Arc<CudaStream>,
    /// Where the handles, the workspace and the page-locked block go when this state is
    /// dropped, and come from when one is made (destroying a cuBLAS handle waits for the whole
    /// device, other pools' busy device queues included).
    reuse: Arc<Reuse>,
}

impl Blas {
    fn new(stream: &Arc<CudaStream>, reuse: &Arc<Reuse>) -> Result<Blas> {
        libraries_present()?;
        let ctx = stream.context();
        bind(ctx)?;
        if let Some(kit) = reuse.take_blas() {
            // Handles and workspace of a stream dropped earlier: `StreamMath::with` binds the
            // handle to this stream, with the workspace, before any call.
            let mut blas = Blas::empty(stream, reuse, kit.workspace, kit.workspace_bytes);
            blas.handle = kit.handle;
            blas.lt = kit.lt;
            blas.math = kit.math;
            return Ok(blas);
        }
        let major = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(|e| driver_error("info", e))?;
        let bytes = workspace_bytes(major);
        // SAFETY: the context is current; the workspace is only handed to cuBLAS below.
        let workspace = unsafe { result::malloc_sync(bytes) }.map_err(|e| Error::OutOfMemory {
            elements: bytes / 4,
            bytes: bytes as u64,
            device: "cuda".into(),
            reason: driver_error("alloc", e).to_string(),
        })?;
        let mut blas = Blas::empty(stream, reuse, workspace, bytes);
        // cudarc panics when a symbol is missing from the loaded library: contain that.
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| blas.init()));
        match made {
            Ok(r) => r.map(|()| blas),
            Err(_) => Err(unavailable(
                "the cuBLAS/cuBLASLt libraries found lack a function multiq needs",
            )),
        }
    }

    /// A state with `workspace` and no handles yet.
    fn empty(
        stream: &Arc<CudaStream>,
        reuse: &Arc<Reuse>,
        workspace: sys::CUdeviceptr,
        workspace_bytes: usize,
    ) -> Blas {
        Blas {
            handle: std::ptr::null_mut(),
            lt: std::ptr::null_mut(),
            workspace,
            workspace_bytes,
            math: Precision::Strict,
            pointers: 0,
            pointer_capacity: 0,
            pinned: std::ptr::null_mut(),
            pinned_block: None,
            pinned_capacity: 0,
            pinned_event: std::ptr::null_mut(),
            pinned_pending: false,
            pinned_unrecorded: false,
            batched_graphs: HashMap::new(),
            batched_warm: Default::default(),
            recording: None,
            bound: std::ptr::null_mut(),
            plans: HashMap::new(),
            unfusable: Default::default(),
            stream: stream.clone(),
            reuse: reuse.clone(),
        }
    }

    fn init(&mut self) -> Result<()> {
        // SAFETY: out-pointers are valid; the context is current.
        unsafe { cb::cublasCreate_v2(&mut self.handle) }
            .result()
            .map_err(|e| blas_error("cublas create", e))?;
        self.bind_handle(self.stream.cu_stream())?;
        // SAFETY: `handle` is live.
        unsafe { cb::cublasSetMathMode(self.handle, cb::cublasMath_t::CUBLAS_DEFAULT_MATH) }
            .result()
            .map_err(|e| blas_error("cublas math mode", e))?;
        // SAFETY: out-pointer valid.
        unsafe { lt::cublasLtCreate(&mut self.lt) }
            .result()
            .map_err(|e| blas_error("cublasLt create", e))?;
        Ok(())
    }

    /// Points the cuBLAS handle at `stream` (this stream, or the private recording stream
    /// while a graph is recorded), with this stream's workspace.
    fn bind_handle(&mut self, stream: sys::CUstream) -> Result<()> {
        self.bound = std::ptr::null_mut();
        // SAFETY: `handle` is live; `stream` is this stream or the recording stream, both
        // live (held by `self`).
        unsafe { cb::cublasSetStream_v2(self.handle, stream as _) }
            .result()
            .map_err(|e| blas_error("cublas stream", e))?;
        // After the stream: cublasSetStream resets the workspace to the default pool.
        // SAFETY: the workspace is a live allocation of `workspace_bytes`, used by this handle
        // and the cuBLASLt calls of this stream in stream order (work recorded on the
        // recording stream runs only when replayed on this stream).
        unsafe {
            cb::cublasSetWorkspace_v2(
                self.handle,
                self.workspace as *mut c_void,
                self.workspace_bytes,
            )
        }
        .result()
        .map_err(|e| blas_error("cublas workspace", e))?;
        self.bound = stream;
        Ok(())
    }

    /// Binds the handle to `stream` unless it is bound there already: anything may have left it
    /// elsewhere (a recording whose rebind failed), and no call may run on the wrong stream.
    fn bind_if_needed(&mut self, stream: sys::CUstream) -> Result<()> {
        if self.bound != stream {
            self.bind_handle(stream)?;
        }
        Ok(())
    }

    fn set_math(&mut self, precision: Precision) -> Result<()> {
        if self.math == precision {
            return Ok(());
        }
        let mode = match precision {
            Precision::Strict => cb::cublasMath_t::CUBLAS_DEFAULT_MATH,
            Precision::Tf32 => cb::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH,
        };
        // SAFETY: `handle` is live (invariant).
        unsafe { cb::cublasSetMathMode(self.handle, mode) }
            .result()
            .map_err(|e| blas_error("cublas math mode", e))?;
        self.math = precision;
        Ok(())
    }

    /// One product with cuBLAS's sgemm (no epilogue).
    fn sgemm(&mut self, spec: &GemmSpec, cm: &ColMajor, a: u64, b: u64, c: u64) -> Result<()> {
        self.set_math(spec.precision)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: `handle` is live and bound to this stream; A (= B's buffer), B (= A's) and C
        // are live device allocations holding the matrices the leading dimensions describe
        // (`check_gemm` checked every range); C does not overlap the inputs; alpha and beta
        // are host scalars (pointer mode host) read before the call returns.
        unsafe {
            cb::cublasSgemm_v2(
                self.handle,
                cm.op_a(),
                cb::cublasOperation_t::CUBLAS_OP_N,
                cm.m,
                cm.n,
                cm.k,
                &alpha,
                b as *const f32,
                cm.lda,
                a as *const f32,
                cm.ldb,
                &beta,
                c as *mut f32,
                cm.ldc,
            )
        }
        .result()
        .map_err(|e| blas_error("cublasSgemm", e))
    }

    /// Every product of `ops` as one batched sgemm over pointer arrays. The arrays go through
    /// page-locked memory, so the copy and the sgemm can be recorded as a graph: from the
    /// second batch of a shape and size on, one graph launch queues both (a third of the
    /// host time of the two calls on the H100).
    fn gemm_batched(&mut self, spec: &GemmSpec, ops: &[GemmOperands<'_>]) -> Result<()> {
        let cm = ColMajor::of(spec)?;
        let count = ops.len();
        int(count, "batch")?;
        self.reserve_pointers(3 * count)?;
        self.reserve_pinned(3 * count)?;
        self.settle_pinned()?;
        // SAFETY: `pinned` holds `pinned_capacity >= 3·count` u64 (reserve_pinned); no copy
        // reads it (settled), and `&mut self` makes this the only reference.
        let host = unsafe { std::slice::from_raw_parts_mut(self.pinned, 3 * count) };
        // Arrays in device memory: cuBLAS's A (our B), its B (our A), then C.
        for (i, o) in ops.iter().enumerate() {
            host[i] = address(&o.b)?;
            host[count + i] = address(&o.a)?;
            host[2 * count + i] = address(&o.c)?;
        }
        self.set_math(spec.precision)?;
        let key = (cm, spec.precision, count);
        let own = self.stream.cu_stream();
        let queued = match self.batched_graphs.get(&key) {
            Some(Some(graph)) => self.launch_graph(graph),
            Some(None) => self.queue_batched(&cm, count, own),
            None if self.batched_warm.contains(&key) && crate::backend::recording_enabled() => {
                let graph = self.record_batched(&cm, count);
                let launched = match &graph {
                    Some(g) => self.launch_graph(g),
                    None => self.queue_batched(&cm, count, own),
                };
                self.batched_graphs.insert(key, graph);
                launched
            }
            None => {
                self.batched_warm.insert(key);
                self.queue_batched(&cm, count, own)
            }
        };
        // The copy (if queued) reads `pinned` later: the next write waits for this event. It
        // is pending from here on, whether or not the record succeeds: if it fails, the next
        // write waits for the whole stream instead (`settle_pinned`).
        self.pinned_pending = true;
        // SAFETY: `pinned_event` is a live event of this context (reserve_pinned); the
        // stream is live.
        let recorded = unsafe { result::event::record(self.pinned_event, self.stream.cu_stream()) };
        if let Err(e) = recorded {
            self.pinned_unrecorded = true;
            return Err(driver_error("record", e));
        }
        queued
    }

    /// Records the pointer copy and batched sgemm of `count` products as a graph; `None`
    /// where the driver or cuBLAS refuse. Recorded on a private stream that nobody else ever
    /// synchronizes (a synchronization breaks a capture, and other threads do synchronize
    /// this stream, e.g. to read a buffer it wrote), and replayed on this one.
    fn record_batched(&mut self, cm: &ColMajor, count: usize) -> Option<CudaGraph> {
        if self.recording.is_none() {
            self.recording = self.stream.context().new_stream().ok();
        }
        let rec = self.recording.clone()?;
        self.bind_handle(rec.cu_stream()).ok()?;
        let graph = capture(&rec, || self.queue_batched(cm, count, rec.cu_stream()));
        // Back to this stream; if even that fails, no graph is used and the next call rebinds
        // first (`bind_if_needed`) or reports the handle's error.
        self.bind_handle(self.stream.cu_stream()).ok()?;
        graph
    }

    /// Queues `graph` (recorded on the private stream) on this stream.
    fn launch_graph(&self, graph: &CudaGraph) -> Result<()> {
        // SAFETY: the executable graph is live (owned by `graph`, held by the caller); it
        // reads the pointer arrays and matrices that `gemm_batched`'s contract keeps alive,
        // in this stream's order.
        unsafe { result::graph::launch(graph.cu_graph_exec(), self.stream.cu_stream()) }
            .map_err(|e| driver_error("launch graph", e))
    }

    /// Queues the copy of the pointer arrays (from `pinned`) and the batched sgemm, both on
    /// `stream` (the handle is bound to it first if it is not: a failed recording may have left
    /// it on the recording stream).
    fn queue_batched(&mut self, cm: &ColMajor, count: usize, stream: sys::CUstream) -> Result<()> {
        self.bind_if_needed(stream)?;
        let base = self.pointers;
        // SAFETY: `pointers` holds `pointer_capacity >= 3·count` u64 and `pinned`
        // `pinned_capacity >= 3·count` (reserved by the caller); the copy is ordered on this
        // stream before the batched call that reads the arrays and after the previous one;
        // `pinned` is not written again before the copy ran (its event is recorded after this
        // call and waited for before the next write), nor freed (reserve_pinned and Drop wait
        // for the event first).
        unsafe { sys::cuMemcpyHtoDAsync_v2(base, self.pinned.cast(), 3 * count * 8, stream) }
            .result()
            .map_err(|e| driver_error("upload", e))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: `handle` is live and bound to `stream` (above); the three arrays of `count`
        // device pointers are in device memory in stream order (above); every pointer is a
        // live allocation holding its matrix (`check_gemm`), outputs distinct and not inputs
        // of any product of the batch; alpha and beta are host scalars (read at the call, and
        // by value when recorded: cuBLAS's default host pointer mode).
        unsafe {
            cb::cublasSgemmBatched(
                self.handle,
                cm.op_a(),
                cb::cublasOperation_t::CUBLAS_OP_N,
                cm.m,
                cm.n,
                cm.k,
                &alpha,
                base as *const *const f32,
                cm.lda,
                (base + 8 * count as u64) as *const *const f32,
                cm.ldb,
                &beta,
                (base + 16 * count as u64) as *const *mut f32,
                cm.ldc,
                count as c_int,
            )
        }
        .result()
        .map_err(|e| blas_error("cublasSgemmBatched", e))
    }

    /// Waits until the last copy out of `pinned` ran.
    fn settle_pinned(&mut self) -> Result<()> {
        if self.pinned_unrecorded {
            // The event does not cover the last copy: wait for everything on the stream.
            self.stream
                .synchronize()
                .map_err(|e| driver_error("synchronize", e))?;
            self.pinned_unrecorded = false;
            self.pinned_pending = false;
        } else if self.pinned_pending {
            // SAFETY: `pinned_event` is a live event of this context, recorded on this stream.
            unsafe { result::event::synchronize(self.pinned_event) }
                .map_err(|e| driver_error("synchronize", e))?;
            self.pinned_pending = false;
        }
        Ok(())
    }

    /// Page-locked room for `needed` pointers (and the event guarding it).
    fn reserve_pinned(&mut self, needed: usize) -> Result<()> {
        if self.pinned_event.is_null() {
            self.pinned_event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(|e| driver_error("event", e))?;
        }
        if needed <= self.pinned_capacity {
            return Ok(());
        }
        self.settle_pinned()?;
        self.batched_graphs.clear();
        if let Some(old) = self.pinned_block.take() {
            // No copy reads the old block any more (settled), and graphs that referred to it
            // are gone (cleared above).
            self.reuse.give_pinned(old);
            self.pinned = std::ptr::null_mut();
            self.pinned_capacity = 0;
        }
        let capacity = needed.next_power_of_two().max(64);
        // Page-aligned (so aligned for u64) and zeroed; written before any copy reads it.
        let block = self.reuse.take_pinned(capacity * 8)?;
        self.pinned = block.host().as_ptr().cast();
        // The whole block: it is at least a page, more than small batches ask for.
        self.pinned_capacity = block.bytes() / 8;
        self.pinned_block = Some(block);
        Ok(())
    }

    fn reserve_pointers(&mut self, needed: usize) -> Result<()> {
        if needed <= self.pointer_capacity {
            return Ok(());
        }
        let capacity = needed.next_power_of_two().max(64);
        self.batched_graphs.clear();
        let old = self.pointers;
        if old != 0 {
            let freed = if self.stream.context().has_async_alloc() {
                // SAFETY: only queued work on this stream reads `old`; the stream-ordered
                // free runs after it.
                unsafe { result::free_async(old, self.stream.cu_stream()) }
            } else {
                self.stream.synchronize().and_then(|()| {
                    // SAFETY: the stream finished every call that read `old`.
                    unsafe { result::free_sync(old) }
                })
            };
            freed.map_err(|e| driver_error("free", e))?;
            self.pointers = 0;
            self.pointer_capacity = 0;
        }
        // Stream-ordered where the device can (freed the same way, so neither waits for the
        // whole device); only this stream's work (and graphs replayed on it) uses the arrays.
        let allocated = if self.stream.context().has_async_alloc() {
            // SAFETY: the context is current (the caller bound it) and the stream live; the
            // memory is written by a copy ordered on that stream before any read.
            unsafe { result::malloc_async(self.stream.cu_stream(), capacity * 8) }
        } else {
            // SAFETY: as above, without the stream.
            unsafe { result::malloc_sync(capacity * 8) }
        };
        self.pointers = allocated.map_err(|e| Error::OutOfMemory {
            elements: capacity * 2,
            bytes: (capacity * 8) as u64,
            device: "cuda".into(),
            reason: driver_error("alloc", e).to_string(),
        })?;
        self.pointer_capacity = capacity;
        Ok(())
    }

    /// The cuBLASLt plan for `key`, made on first use. `Ok(None)` when cuBLASLt has no
    /// algorithm for it (the caller falls back to sgemm and a separate pass).
    fn plan(&mut self, key: PlanKey) -> Result<Option<PlanHandles>> {
        if self.unfusable.contains(&key) {
            return Ok(None);
        }
        if !self.plans.contains_key(&key) {
            if self.plans.len() >= MAX_PLANS {
                self.plans.clear();
            }
            match self.make_plan(&key) {
                Ok(p) => {
                    self.plans.insert(key, p);
                }
                Err(_) => {
                    self.unfusable.insert(key);
                    return Ok(None);
                }
            }
        }
        Ok(self.plans.get(&key).map(|p| PlanHandles {
            desc: p.desc,
            a: p.a,
            b: p.b,
            c: p.c,
            algo: p.algo,
        }))
    }

    fn make_plan(&self, key: &PlanKey) -> std::result::Result<Plan, lt::cublasStatus_t> {
        let cm = &key.call;
        let f32t = lt::cudaDataType_t::CUDA_R_32F;
        let compute = match key.precision {
            Precision::Strict => lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            Precision::Tf32 => lt::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        };
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            // SAFETY: the algorithm is plain data (an array of u64), overwritten below.
            algo: unsafe { std::mem::zeroed() },
        };
        let ok = |s: lt::cublasStatus_t| match s {
            lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(()),
            other => Err(other),
        };
        // A plan whose creation fails part-way is dropped: `Drop` destroys what was made.
        // SAFETY: out-pointers are valid.
        ok(unsafe { lt::cublasLtMatmulDescCreate(&mut plan.desc, compute, f32t) })?;
        let trans_a: i32 = i32::from(cm.trans_a); // CUBLAS_OP_T = 1, CUBLAS_OP_N = 0
        let epilogue = match (key.bias != 0, key.relu) {
            (true, true) => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
            (true, false) => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            (false, true) => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU,
            (false, false) => lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
        };
        let epilogue_value: u32 = epilogue as u32;
        let bias_ptr: u64 = key.bias;
        type Attr = lt::cublasLtMatmulDescAttributes_t;
        let set = |attr: Attr, value: *const c_void, size: usize| {
            // SAFETY: `desc` is live; `value` points to `size` readable bytes of the type the
            // attribute takes (int32 for TRANSA, uint32 for EPILOGUE, a pointer for BIAS).
            ok(unsafe { lt::cublasLtMatmulDescSetAttribute(plan.desc, attr, value, size) })
        };
        set(
            Attr::CUBLASLT_MATMUL_DESC_TRANSA,
            (&trans_a as *const i32).cast(),
            4,
        )?;
        set(
            Attr::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&epilogue_value as *const u32).cast(),
            4,
        )?;
        if key.bias != 0 {
            set(
                Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&bias_ptr as *const u64).cast(),
                8,
            )?;
        }
        let (a_rows, a_cols) = if cm.trans_a {
            (cm.k, cm.m)
        } else {
            (cm.m, cm.k)
        };
        let layout = |out: &mut lt::cublasLtMatrixLayout_t, rows: c_int, cols: c_int, ld: c_int| {
            // SAFETY: out-pointer valid; sizes are positive ints.
            ok(unsafe {
                lt::cublasLtMatrixLayoutCreate(out, f32t, rows as u64, cols as u64, i64::from(ld))
            })
        };
        layout(&mut plan.a, a_rows, a_cols, cm.lda)?;
        layout(&mut plan.b, cm.k, cm.n, cm.ldb)?;
        layout(&mut plan.c, cm.m, cm.n, cm.ldc)?;
        let mut pref: lt::cublasLtMatmulPreference_t = std::ptr::null_mut();
        // SAFETY: out-pointer valid.
        ok(unsafe { lt::cublasLtMatmulPreferenceCreate(&mut pref) })?;
        type Pref = lt::cublasLtMatmulPreferenceAttributes_t;
        let ws: u64 = self.workspace_bytes as u64;
        let mut prefs: Vec<(Pref, *const c_void, usize)> = vec![(
            Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&ws as *const u64).cast(),
            8,
        )];
        let aligns = key.align;
        prefs.push((
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            (&aligns[1] as *const u32).cast(),
            4,
        ));
        prefs.push((
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            (&aligns[0] as *const u32).cast(),
            4,
        ));
        prefs.push((
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            (&aligns[2] as *const u32).cast(),
            4,
        ));
        prefs.push((
            Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            (&aligns[2] as *const u32).cast(),
            4,
        ));
        let mut result = Ok(());
        for (attr, value, size) in prefs {
            // SAFETY: `pref` is live; `value` points to `size` bytes of the attribute's type
            // (uint64 for the workspace size, uint32 for alignments), alive for the call.
            result =
                ok(unsafe { lt::cublasLtMatmulPreferenceSetAttribute(pref, attr, value, size) });
            if result.is_err() {
                break;
            }
        }
        // SAFETY: zeroed plain data, overwritten by the heuristic.
        let mut heuristic: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        let mut found: c_int = 0;
        if result.is_ok() {
            // SAFETY: every handle is live; the result array has room for the one algorithm
            // asked for; `found` is a valid out-pointer.
            result = ok(unsafe {
                lt::cublasLtMatmulAlgoGetHeuristic(
                    self.lt,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.c,
                    plan.c,
                    pref,
                    1,
                    &mut heuristic,
                    &mut found,
                )
            });
        }
        // SAFETY: `pref` is live and not used after this.
        unsafe {
            let _ = lt::cublasLtMatmulPreferenceDestroy(pref);
        }
        result?;
        if found < 1 {
            return Err(lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED);
        }
        ok(heuristic.state)?;
        plan.algo = heuristic.algo;
        Ok(plan)
    }

    /// One product with the bias and ReLU: fused by cuBLASLt when it has a plan, else sgemm
    /// then a separate pass.
    fn gemm_epilogue(
        &mut self,
        spec: &GemmSpec,
        cm: &ColMajor,
        (a, b, c): (u64, u64, u64),
        bias: u64,
    ) -> Result<()> {
        let key = PlanKey {
            call: *cm,
            relu: spec.relu,
            bias,
            precision: spec.precision,
            align: [alignment(a), alignment(b), alignment(c)],
        };
        let fused = if spec.fuse { self.plan(key)? } else { None };
        let Some(plan) = fused else {
            self.sgemm(spec, cm, a, b, c)?;
            return self.bias_act(spec, c, bias);
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the plan's handles are live and describe exactly these matrices (the key
        // holds the call, the bias pointer and the alignments it was made for); the pointers
        // are live allocations holding their matrices (`check_gemm`), the bias holds n
        // floats; C (also D, written in place with beta 0) does not overlap the inputs; the
        // workspace is this stream's, used in stream order; alpha/beta are host scalars.
        unsafe {
            lt::cublasLtMatmul(
                self.lt,
                plan.desc,
                (&alpha as *const f32).cast(),
                b as *const c_void,
                plan.a,
                a as *const c_void,
                plan.b,
                (&beta as *const f32).cast(),
                c as *const c_void,
                plan.c,
                c as *mut c_void,
                plan.c,
                &plan.algo,
                self.workspace as *mut c_void,
                self.workspace_bytes,
                self.stream.cu_stream() as _,
            )
        }
        .result()
        .map_err(|e| blas_error("cublasLtMatmul", e))
    }

    /// The separate bias-and-ReLU pass over C (`m × n`, row-major).
    fn bias_act(&self, spec: &GemmSpec, c: u64, bias: u64) -> Result<()> {
        let total = spec
            .m
            .checked_mul(spec.n)
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| Error::invalid("bias pass over more than 2^32 elements"))?;
        let f = bias_act_kernel(self.stream.context())?;
        let (mut y, mut bp) = (c, bias);
        let (mut rows, mut cols) = (spec.m as u32, spec.n as u32);
        let (mut has_bias, mut relu) = (i32::from(bias != 0), i32::from(spec.relu));
        let mut params: [*mut c_void; 6] = [
            (&mut y as *mut u64).cast(),
            (&mut bp as *mut u64).cast(),
            (&mut rows as *mut u32).cast(),
            (&mut cols as *mut u32).cast(),
            (&mut has_bias as *mut i32).cast(),
            (&mut relu as *mut i32).cast(),
        ];
        let grid = total.div_ceil(256).max(1);
        // SAFETY: the kernel takes (float*, const float*, unsigned, unsigned, int, int),
        // matching `params`, whose pointees outlive the call (the driver copies them); C holds
        // rows·cols floats and the bias n (when has_bias); the kernel bounds-checks i.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                (grid, 1, 1),
                (256, 1, 1),
                0,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| driver_error("launch", e))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.clear();
        // Graphs refer to the handle, the workspace and the pinned block: gone before those
        // are handed on.
        self.batched_graphs.clear();
        if bind(self.stream.context()).is_err() || self.stream.synchronize().is_err() {
            return; // the context failed: leak rather than free under queued work
        }
        // Nothing below waits for the whole device, so a pool dropped beside another pool's
        // busy device queue is not held up by it (see `reuse`).
        if self.pointers != 0 {
            if self.stream.context().has_async_alloc() {
                // SAFETY: the stream finished every call that read the arrays, a stream-ordered
                // allocation of this stream (`reserve_pointers`), and we own it.
                let _ = unsafe { result::free_async(self.pointers, self.stream.cu_stream()) };
            } else {
                // SAFETY: as above; allocated with `cuMemAlloc`.
                let _ = unsafe { result::free_sync(self.pointers) };
            }
            self.pointers = 0;
        }
        if let Some(block) = self.pinned_block.take() {
            // The stream finished every copy out of it.
            self.reuse.give_pinned(block);
        }
        if !self.pinned_event.is_null() {
            // SAFETY: a live event of this context (invariant), recorded only on this stream,
            // which is idle.
            let _ = unsafe { result::event::destroy(self.pinned_event) };
        }
        if !self.handle.is_null() && !self.lt.is_null() {
            // The stream finished every call that used the handles and the workspace.
            self.reuse.give_blas(BlasKit {
                handle: self.handle,
                lt: self.lt,
                workspace: self.workspace,
                workspace_bytes: self.workspace_bytes,
                math: self.math,
            });
            return;
        }
        // A state whose making failed halfway: release what it has (an error path; this may
        // wait for the device).
        // SAFETY: the stream finished every call that used the handles and memory, which are
        // live (invariant) and ours.
        unsafe {
            if !self.lt.is_null() {
                let _ = lt::cublasLtDestroy(self.lt);
            }
            if !self.handle.is_null() {
                let _ = cb::cublasDestroy_v2(self.handle);
            }
            let _ = result::free_sync(self.workspace);
        }
    }
}

// SAFETY: the handles and device memory may be used from any thread of the context; `Blas`
// is only reached through `StreamMath`'s mutex, so one thread uses it at a time.
unsafe impl Send for Blas {}

/// The safe layer: one stream's cuBLAS state, created on its first product.
pub(super) struct StreamMath {
    stream: Arc<CudaStream>,
    blas: Mutex<Option<Blas>>,
    reuse: Arc<Reuse>,
}

impl StreamMath {
    pub(super) fn new(stream: Arc<CudaStream>, reuse: Arc<Reuse>) -> Self {
        StreamMath {
            stream,
            blas: Mutex::new(None),
            reuse,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Blas) -> Result<T>) -> Result<T> {
        bind(self.stream.context())?;
        let mut guard = self.blas.lock();
        if guard.is_none() {
            *guard = Some(Blas::new(&self.stream, &self.reuse)?);
        }
        let blas = guard.as_mut().expect("made above");
        blas.bind_if_needed(blas.stream.cu_stream())?;
        f(blas)
    }

    pub(super) fn gemm(&self, spec: &GemmSpec, ops: &GemmOperands<'_>) -> Result<()> {
        check_gemm(spec, std::slice::from_ref(ops))?;
        let cm = ColMajor::of(spec)?;
        let (a, b, c) = (address(&ops.a)?, address(&ops.b)?, address(&ops.c)?);
        let bias = match &ops.bias {
            Some(r) => address(r)?,
            None => 0,
        };
        if skinny::applies(spec) {
            bind(self.stream.context())?;
            return skinny::launch(&self.stream, spec, (a, b, c), bias);
        }
        self.with(|blas| {
            if bias == 0 && !spec.relu {
                blas.sgemm(spec, &cm, a, b, c)
            } else {
                blas.gemm_epilogue(spec, &cm, (a, b, c), bias)
            }
        })
    }

    pub(super) fn gemm_batched(&self, spec: &GemmSpec, ops: &[GemmOperands<'_>]) -> Result<()> {
        check_gemm(spec, ops)?;
        if ops.is_empty() {
            return Ok(());
        }
        if ops.len() == 1 || spec.relu || ops.iter().any(|o| o.bias.is_some()) {
            for o in ops {
                self.gemm(spec, o)?;
            }
            return Ok(());
        }
        self.with(|blas| blas.gemm_batched(spec, ops))
    }
}
