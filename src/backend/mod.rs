//! The backend contract: what a device must provide so that the rest of multiq can run on it.
//!
//! This file is the only place the runtime meets a backend. Each backend lives in its own
//! folder (`cpu/`, `cuda/`) and is reached through `open`; nothing outside `backend/`
//! names a concrete backend type.
//!
//! Division of labour: a backend provides *mechanism* (buffers, in-order streams, events,
//! kernel launch). The runtime above it (`runtime/`) provides *policy*: which thread uses
//! which stream, which lock guards a submission, when buffers may be freed, event pooling.
//!
//! Contract every backend keeps:
//! - A stream executes its work in submission order; an event recorded on a stream completes
//!   when all work submitted to that stream before the record has completed.
//! - All methods are callable from any thread (`Send + Sync`); the runtime serializes
//!   submissions to one stream according to its lock mode, never relying on the backend for
//!   launch/record atomicity.
//! - Errors are returned, never panicked; a failed call leaves other streams usable.
//!
//! The traits are the crate's internal contract, not a safe public API: a backend's memory
//! safety rests on the runtime's ownership rules (`docs/ARCHITECTURE.md`: a buffer is freed
//! through the stream its last work was queued on, a host-mapped buffer is touched by one
//! stream at a time, ...), which the trait methods themselves do not check. So no backend
//! object can be made or reached outside the crate: `open` and the backends' constructors
//! are crate-private, and the runtime's `Device`, `StreamPool`, `Buffer` and `Tensor` are
//! the safe way in.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::kernel::Kernel;

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Kernels on CPU cores, modelling a device with a fixed number of execution units.
    Cpu,
    /// NVIDIA GPUs through the CUDA driver API.
    Cuda,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        })
    }
}

/// How a host thread waits for device work to finish.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WaitPolicy {
    /// Busy-poll completion: lowest latency, burns a core per waiting thread.
    Spin,
    /// Poll completion, yielding the core between polls.
    Yield,
    /// Sleep in the OS until woken: no core burnt, highest wake-up latency.
    #[default]
    Block,
}

impl fmt::Display for WaitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WaitPolicy::Spin => "spin",
            WaitPolicy::Yield => "yield",
            WaitPolicy::Block => "block",
        })
    }
}

/// What to open.
#[derive(Clone, Debug, Default)]
pub struct DeviceOptions {
    /// `None` = auto: CUDA when a device is present, else CPU.
    pub backend: Option<BackendKind>,
    /// CPU backend: number of execution units (default: available cores).
    pub cpu_units: Option<usize>,
    /// CUDA backend: device ordinal.
    pub ordinal: usize,
    /// Wait policy; `None` = the backend's measured default.
    pub wait: Option<WaitPolicy>,
    /// CUDA device queue (coalescing `persistent`): run an op whose one pending dependency is
    /// the previous op on its buffer chunk by chunk right after that op, on the same blocks,
    /// instead of queueing it behind it. `None`: on, unless `MULTIQ_QUEUE_CHAIN=0` (the
    /// default since it was measured on the H200).
    pub queue_chain: Option<bool>,
}

/// Facts about an opened device, for results and reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    /// Which backend.
    pub backend: BackendKind,
    /// Human-readable device name.
    pub name: String,
    /// Execution units (CPU: worker threads; CUDA: multiprocessors).
    pub units: usize,
    /// Total device memory in bytes, where known.
    pub memory_bytes: Option<u64>,
    /// Driver or runtime version, where known.
    pub driver: Option<String>,
    /// The wait policy in force.
    pub wait: WaitPolicy,
    /// Backend-specific facts worth recording (e.g. CUDA_DEVICE_MAX_CONNECTIONS).
    pub extra: Vec<(String, String)>,
}

/// A device: allocates buffers and creates streams and events.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Facts about the device.
    fn info(&self) -> DeviceInfo;
    /// Allocates `len` f32 elements (contents unspecified until written).
    fn alloc(&self, len: usize) -> Result<Box<dyn BackendBuffer>>;
    /// A buffer in host memory that the device reads and writes in place, for staging small
    /// transfers: [`BackendStream::copy`] moves data between it and device buffers inside
    /// queued (and recorded) work, and `upload_at`/`download_at` on it are plain host copies
    /// after the stream finished its queued work (CUDA: page-locked memory mapped into the
    /// device; no copy engine). Default: [`alloc`](Self::alloc).
    fn alloc_host(&self, len: usize) -> Result<Box<dyn BackendBuffer>> {
        self.alloc(len)
    }
    /// Creates a new in-order stream.
    fn new_stream(&self) -> Result<Arc<dyn BackendStream>>;
    /// Creates a new event (not yet recorded; waiting on it returns at once).
    fn new_event(&self) -> Result<Box<dyn BackendEvent>>;
    /// Creates a host-visible progress word streams can write to ([`BackendStream::signal`]),
    /// or `None` where the device cannot write host memory in stream order (the runtime then
    /// falls back to events).
    fn new_signal(&self) -> Result<Option<Arc<dyn BackendSignal>>> {
        Ok(None)
    }
    /// Creates a device queue ([`BackendDeviceQueue`]): ops published by any thread, run by a
    /// kernel that stays on the device while work arrives. `None` where the backend has none
    /// (the runtime then coalesces on the host).
    fn new_device_queue(&self) -> Result<Option<Arc<dyn BackendDeviceQueue>>> {
        Ok(None)
    }
    /// Waits until all work on all streams of this device has completed.
    fn synchronize(&self) -> Result<()>;
    /// Bytes that can still be allocated, where known.
    fn memory_available(&self) -> Option<u64>;
    /// Largest buffer (in elements) a kernel can index.
    fn max_elements(&self) -> usize;
    /// Largest absolute difference from [`Kernel::reference`] this backend may produce for
    /// one application of `kernel` to a value (0.0 = bit-identical).
    fn tolerance(&self, kernel: Kernel) -> f32;
}

/// Element type of a tensor. Only `F32` is implemented by the backends today; the others
/// are named so that shapes, files and APIs carry a dtype from the start, and are refused
/// with [`Error::Unsupported`] where an operation meets them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE 754 binary32.
    #[default]
    F32,
    /// IEEE 754 binary16 (not implemented yet).
    F16,
    /// bfloat16 (not implemented yet).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The name safetensors files use (`F32`, `F16`, `BF16`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }
}

/// Arithmetic of f32 matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Strict fp32: products and sums in binary32 (cuBLAS default math, no TF32).
    #[default]
    Strict,
    /// TF32 tensor cores where the device has them (inputs rounded to 10 mantissa bits);
    /// only when asked for, and labelled in results. The CPU computes strict fp32 anyway.
    Tf32,
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Strict => "fp32",
            Precision::Tf32 => "tf32",
        })
    }
}

/// One matrix product in row-major terms: `C[m×n] = A[m×k] · B'` (then `+ bias[n]` per row,
/// then ReLU), where `B'` is `B[k×n]`, or with `b_transposed` the transpose of `B[n×k]` (a
/// linear layer's `[out, in]` weight). Matrices are dense (leading dimension = row length)
/// and start at an element offset inside their buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmSpec {
    /// Rows of A and C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Columns of A = rows of B'.
    pub k: usize,
    /// B is stored `[n, k]` and used transposed.
    pub b_transposed: bool,
    /// Apply `max(0, x)` after the bias.
    pub relu: bool,
    /// Element type of A, B, C and the bias.
    pub dtype: DType,
    /// fp32 or TF32.
    pub precision: Precision,
    /// Fuse the bias and ReLU into the product's epilogue where the backend can (CUDA:
    /// cuBLASLt); false: a separate pass (for comparison and as the fallback).
    pub fuse: bool,
    /// B and the bias are constant while the product is queued: no work that can still be
    /// pending, nor any queued later, writes them (a model's weights, uploaded and synchronized
    /// before any forward). A backend may then read them before the work ahead of the product
    /// completes (CUDA: while the kernel ahead still runs). False is always correct.
    pub b_static: bool,
}

impl GemmSpec {
    /// Elements of A, B and C; an error where one does not fit in `usize` (no buffer could
    /// hold it).
    pub fn sizes(&self) -> Result<(usize, usize, usize)> {
        let (m, n, k) = (self.m, self.n, self.k);
        match (m.checked_mul(k), k.checked_mul(n), m.checked_mul(n)) {
            (Some(a), Some(b), Some(c)) => Ok((a, b, c)),
            _ => Err(Error::invalid(format!(
                "a matrix product of m={m} n={n} k={k} has more elements than can be addressed"
            ))),
        }
    }
}

/// A matrix operand: a buffer and the element offset where the matrix starts.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    /// The buffer holding the matrix.
    pub buf: &'a dyn BackendBuffer,
    /// Offset of the first element, in elements.
    pub offset: usize,
}

impl<'a> MatRef<'a> {
    /// The matrix at the start of `buf`.
    pub fn new(buf: &'a dyn BackendBuffer) -> Self {
        MatRef { buf, offset: 0 }
    }
}

/// The operands of one product of a [`GemmSpec`]. `c` must not share a buffer with `a`, `b`
/// or `bias` (the caller checks).
#[derive(Clone, Copy)]
pub struct GemmOperands<'a> {
    /// Left operand.
    pub a: MatRef<'a>,
    /// Right operand (stored as the spec says).
    pub b: MatRef<'a>,
    /// Output.
    pub c: MatRef<'a>,
    /// Bias of `n` elements added to every row of C, if any.
    pub bias: Option<MatRef<'a>>,
}

/// Checks that every operand of `ops` lies inside its buffer and that no output shares a
/// buffer with an input of the same product. Backends call this before touching memory.
pub fn check_gemm(spec: &GemmSpec, ops: &[GemmOperands<'_>]) -> Result<()> {
    if spec.dtype != DType::F32 {
        return Err(Error::Unsupported(format!(
            "matrix products in {} (only F32 is implemented)",
            spec.dtype.name()
        )));
    }
    if spec.m == 0 || spec.n == 0 || spec.k == 0 {
        return Err(Error::invalid(format!(
            "a matrix product needs non-zero sizes, got m={} n={} k={}",
            spec.m, spec.n, spec.k
        )));
    }
    let (sa, sb, sc) = spec.sizes()?;
    let fits = |r: &MatRef<'_>, len: usize, what: &str| -> Result<()> {
        match r.offset.checked_add(len) {
            Some(end) if end <= r.buf.len() => Ok(()),
            _ => Err(Error::invalid(format!(
                "{what} of {len} elements at offset {} does not fit its buffer of {}",
                r.offset,
                r.buf.len()
            ))),
        }
    };
    let same = |x: &MatRef<'_>, y: &MatRef<'_>| std::ptr::addr_eq(x.buf, y.buf);
    for o in ops {
        fits(&o.a, sa, "A")?;
        fits(&o.b, sb, "B")?;
        fits(&o.c, sc, "C")?;
        if let Some(bias) = &o.bias {
            fits(bias, spec.n, "the bias")?;
            if same(&o.c, bias) {
                return Err(Error::invalid("the output of a product cannot be its bias"));
            }
        }
        if same(&o.c, &o.a) || same(&o.c, &o.b) {
            return Err(Error::invalid(
                "the output of a matrix product must not share a buffer with its inputs",
            ));
        }
    }
    for (i, o) in ops.iter().enumerate() {
        if ops[..i].iter().any(|p| same(&p.c, &o.c)) {
            return Err(Error::invalid(
                "two products of one batch write the same output buffer",
            ));
        }
        let reads = |p: &GemmOperands<'_>| {
            same(&p.a, &o.c) || same(&p.b, &o.c) || p.bias.as_ref().is_some_and(|b| same(b, &o.c))
        };
        if ops.iter().any(reads) {
            return Err(Error::invalid(
                "an output of a batch of products is an input of another product in it",
            ));
        }
    }
    Ok(())
}

/// An in-order queue of device work.
pub trait BackendStream: Send + Sync {
    /// Enqueues `kernel` over all of `buf`, in place.
    fn launch(&self, kernel: Kernel, buf: &dyn BackendBuffer) -> Result<()>;
    /// Enqueues `kernel` over every buffer of `bufs`, in as few launches as the backend can
    /// (CUDA: one grouped launch per 128 buffers). Each buffer's result equals launching the
    /// kernel on it alone. The buffers must be distinct (the caller checks).
    /// Default: one launch per buffer.
    fn launch_grouped(&self, kernel: Kernel, bufs: &[&dyn BackendBuffer]) -> Result<()> {
        for b in bufs {
            self.launch(kernel, *b)?;
        }
        Ok(())
    }
    /// [`launch_grouped`](Self::launch_grouped), then [`signal`](Self::signal) with `value`,
    /// in one call so a backend can fuse them (CUDA: the grouped kernel writes the signal
    /// itself, saving a driver call and a stream memory operation). A signal written this
    /// way must not be written by two streams at once.
    fn launch_grouped_signalled(
        &self,
        kernel: Kernel,
        bufs: &[&dyn BackendBuffer],
        signal: &dyn BackendSignal,
        value: u64,
    ) -> Result<()> {
        self.launch_grouped(kernel, bufs)?;
        self.signal(signal, value)
    }
    /// Copies `src` into `buf`, ordered after earlier work on this stream; returns when done.
    fn upload(&self, buf: &dyn BackendBuffer, src: &[f32]) -> Result<()>;
    /// Copies `buf` into `dst`, ordered after earlier work on this stream; returns when done.
    fn download(&self, buf: &dyn BackendBuffer, dst: &mut [f32]) -> Result<()>;
    /// Records `event`: it completes when all work submitted so far on this stream has.
    fn record(&self, event: &dyn BackendEvent) -> Result<()>;
    /// Waits until all work submitted so far on this stream has completed.
    fn synchronize(&self) -> Result<()>;
    /// True when all work submitted so far on this stream has completed; the stream's (sticky)
    /// error if any of it failed. Never blocks.
    fn query(&self) -> Result<bool>;
    /// Queues a write of `value` into `signal`, performed after all work submitted so far on
    /// this stream has completed, and only if all of it succeeded (a failed stream never
    /// writes again). Values written to one signal must increase.
    fn signal(&self, signal: &dyn BackendSignal, value: u64) -> Result<()> {
        let _ = (signal, value);
        Err(Error::invalid("this backend has no host signals"))
    }
    /// Enqueues one matrix product (see [`GemmSpec`]). Backends check the operands with
    /// [`check_gemm`]. Default: not supported.
    fn gemm(&self, spec: &GemmSpec, ops: &GemmOperands<'_>) -> Result<()> {
        let _ = (spec, ops);
        Err(Error::Unsupported("matrix products on this backend".into()))
    }
    /// Enqueues every product of `ops` (same spec, distinct outputs) in as few launches as
    /// the backend can (CUDA: one batched GEMM over pointer arrays). Each output equals the
    /// product computed alone. Default: one [`gemm`](Self::gemm) per product.
    fn gemm_batched(&self, spec: &GemmSpec, ops: &[GemmOperands<'_>]) -> Result<()> {
        check_gemm(spec, ops)?;
        for o in ops {
            self.gemm(spec, o)?;
        }
        Ok(())
    }
    /// Copies `src` into `buf` from element `offset` on, ordered after earlier work on this
    /// stream. Unlike [`upload`](Self::upload) it may return before the copy ran (work
    /// queued after it sees the data); `src` may be reused as soon as it returns.
    fn upload_at(&self, buf: &dyn BackendBuffer, offset: usize, src: &[f32]) -> Result<()> {
        let _ = (buf, offset, src);
        Err(Error::Unsupported("partial uploads on this backend".into()))
    }
    /// Copies elements `offset..offset + dst.len()` of `buf` into `dst`, ordered after
    /// earlier work on this stream; returns when done.
    fn download_at(&self, buf: &dyn BackendBuffer, offset: usize, dst: &mut [f32]) -> Result<()> {
        let _ = (buf, offset, dst);
        Err(Error::Unsupported(
            "partial downloads on this backend".into(),
        ))
    }
    /// Queues a copy of `len` elements from `src` (from `src_offset`) to `dst` (from
    /// `dst_offset`), ordered with this stream's work; `src` and `dst` are distinct buffers.
    /// Default: not supported.
    fn copy(
        &self,
        src: &dyn BackendBuffer,
        src_offset: usize,
        dst: &dyn BackendBuffer,
        dst_offset: usize,
        len: usize,
    ) -> Result<()> {
        let _ = (src, src_offset, dst, dst_offset, len);
        Err(Error::Unsupported("device copies on this backend".into()))
    }
    /// Records the work `body` queues on this stream, without running it, as a program that
    /// [`replay`](Self::replay) queues again with one call (CUDA: a graph, captured for this
    /// thread only). `None` where the backend cannot record, or when this work cannot be
    /// recorded (the caller then queues it directly). The program refers to the buffers
    /// `body` used, as they were: the caller keeps them alive and unchanged in place for as
    /// long as it replays the program. While recording, no other thread may synchronize or
    /// use this stream (a CUDA capture fails then): record only on a stream the caller holds
    /// alone. Default: `None`, nothing queued.
    fn record_program(
        &self,
        body: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Box<dyn BackendProgram>>> {
        let _ = body;
        Ok(None)
    }
    /// Queues `program` (recorded on this stream) once more.
    fn replay(&self, program: &dyn BackendProgram) -> Result<()> {
        let _ = program;
        Err(Error::Unsupported(
            "recorded programs on this backend".into(),
        ))
    }
    /// Frees `buf` once all work submitted so far on this stream has completed, without
    /// blocking the caller where the backend can (CUDA waits for the stream for host buffers
    /// and on drivers without stream-ordered allocation).
    fn free_after(&self, buf: Box<dyn BackendBuffer>);
    /// For downcasting inside the backend.
    fn as_any(&self) -> &dyn Any;
}

/// Whether recorded programs are used where they would be (`MULTIQ_GRAPHS=0` turns them
/// off, to measure what they bring).
pub(crate) fn recording_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MULTIQ_GRAPHS").map_or(true, |v| v.trim() != "0"))
}

/// Work recorded on a stream, queued again as a whole ([`BackendStream::record_program`]).
pub trait BackendProgram: Send + Sync {
    /// For downcasting inside the backend.
    fn as_any(&self) -> &dyn Any;
}

/// A marker in a stream that the host can wait on.
pub trait BackendEvent: Send + Sync {
    /// Waits (per the device's wait policy) until the work before the last record completed.
    fn wait(&self) -> Result<()>;
    /// True when the work before the last record has completed.
    fn is_complete(&self) -> Result<bool>;
    /// For downcasting inside the backend.
    fn as_any(&self) -> &dyn Any;
}

/// A word of host memory that streams write increasing values into (see
/// [`BackendStream::signal`]). Reading it costs a memory load, no driver call: many threads can
/// poll it at once. The memory stays valid until every write queued to it has landed (the
/// backend's `Drop` makes sure).
pub trait BackendSignal: Send + Sync {
    /// The last value written (0 before any write), with acquire ordering: work that completed
    /// before the write is visible to the reader.
    fn value(&self) -> u64;
    /// For downcasting inside the backend.
    fn as_any(&self) -> &dyn Any;
}

/// Why a device queue's kernels left the device ([`BackendDeviceQueue::exits`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueExits {
    /// Nothing was published for the idle time.
    pub idle: u64,
    /// Another kernel was queued on the device (the queue gave the device up).
    pub asked: u64,
    /// The kernel had run its slice.
    pub slice: u64,
    /// The queue was stopped.
    pub stop: u64,
}

/// A queue of ops that threads publish straight to the device, with no launch per op: a
/// kernel stays on the device while ops arrive, takes every published op, and runs
/// concurrent ops side by side (cross-thread coalescing without a host batcher).
///
/// Ops are numbered 1, 2, … in publication order. An op starts only after the ops it names
/// in `after` completed; ops that name none may run in any order and at the same time.
pub trait BackendDeviceQueue: Send + Sync {
    /// Whether `kernel` can run on this queue.
    fn supports(&self, kernel: Kernel) -> bool;
    /// Publishes `kernel` over `buf`, to start once ops `after` (0: none) completed. Returns
    /// the op's number. The caller keeps `buf` alive, and runs no other work on it, until
    /// [`is_done`](Self::is_done) reported the op complete. `after[0]` is the stream's
    /// previous queued op, `after[1]` the previous queued op on `buf` (over all its elements,
    /// as every queued op): the queue may then run the new op element by element right after
    /// that one, as element-wise ops allow.
    fn submit(&self, kernel: Kernel, buf: &dyn BackendBuffer, after: [u64; 2]) -> Result<u64>;
    /// True once op `op` completed (a memory load). With `check`, also asks the device
    /// whether the queue failed (its error is returned) and restarts the queue's kernel if it
    /// left the device while ops were outstanding: waiters pass it now and then.
    fn is_done(&self, op: u64, check: bool) -> Result<bool>;
    /// Ops published so far (the last op's number).
    fn published(&self) -> u64;
    /// Ops in flight at most: every op more than this many behind the last published one
    /// has completed.
    fn window(&self) -> u64;
    /// Times the queue's kernel was launched (it leaves the device when idle).
    fn launches(&self) -> u64;
    /// Why the queue's kernel left, counted for the kernels followed by another launch (the
    /// one still running, or the last one's stop, is not counted yet). Zero where the backend
    /// does not tell.
    fn exits(&self) -> QueueExits {
        QueueExits::default()
    }
    /// Whether the queue's kernel is on the device now (a hint: it may leave the moment
    /// after). While it is, an op launched alone waits for it to give the device up.
    fn kernel_running(&self) -> bool {
        false
    }
    /// Ops run chained to their buffer's previous op (each chunk right after the same chunk
    /// of that op, on the same block) rather than queued on their own; 0 where the queue
    /// never chains.
    fn chained(&self) -> u64 {
        0
    }
    /// Elements an op must have to fill the device by itself (its resident threads): such an
    /// op gains nothing from sharing the queue and is better launched alone.
    fn fills_device(&self) -> usize;
}

/// Device memory holding f32 elements.
pub trait BackendBuffer: Send + Sync {
    /// Number of f32 elements.
    fn len(&self) -> usize;
    /// True when the buffer holds no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// For downcasting inside the backend.
    fn as_any(&self) -> &dyn Any;
    /// For taking ownership back inside the backend (e.g. to free it in stream order).
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// Downcasts a trait object to the backend's concrete type, or reports a device mix-up.
pub(crate) fn downcast<'a, T: 'static>(any: &'a dyn Any, what: &'static str) -> Result<&'a T> {
    any.downcast_ref::<T>().ok_or(Error::WrongDevice { what })
}

/// Opens the backend `opts` asks for. With `backend: None`, tries CUDA first and falls back
/// to the CPU, returning the reason CUDA was not used as the second value.
pub(crate) fn open(opts: &DeviceOptions) -> Result<(Arc<dyn Backend>, Option<String>)> {
    match opts.backend {
        Some(BackendKind::Cpu) => Ok((Arc::new(cpu::CpuBackend::new(opts)?), None)),
        Some(BackendKind::Cuda) => open_cuda(opts).map(|b| (b, None)),
        None => match open_cuda(opts) {
            Ok(b) => Ok((b, None)),
            // A setting the caller got wrong (a `MULTIQ_*` knob it does not understand) is
            // theirs to fix, on a GPU machine too: not a reason to run on the CPU instead.
            Err(e @ Error::InvalidArgument(_)) => Err(e),
            Err(e) => {
                let why = match e {
                    Error::BackendUnavailable { reason, .. } => reason,
                    other => other.to_string(),
                };
                Ok((Arc::new(cpu::CpuBackend::new(opts)?), Some(why)))
            }
        },
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(opts: &DeviceOptions) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(cuda::CudaBackend::new(opts)?))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_opts: &DeviceOptions) -> Result<Arc<dyn Backend>> {
    Err(Error::BackendUnavailable {
        backend: BackendKind::Cuda,
        reason: "this build of multiq was compiled without the `cuda` feature".into(),
    })
}

/// Checks chains of transposed products on one stream, each reading what the work just ahead
/// of it wrote (its A, and for the second product its B, with [`GemmSpec::b_static`] false),
/// against a host reference, for small and odd shapes: k a multiple of 4 up to 1,024 and past
/// it, odd k, row counts across groups of 8 and past the small-batch kernels' 32. (On CUDA this
/// covers both small-batch kernels and their programmatic launches, one after the other in
/// both orders (`skinny_warp` then `skinny_v4`: the shape with n = 1,028), and cuBLAS after
/// them or with B transposed: the shapes with more than 32 rows.)
#[cfg(test)]
pub(crate) fn check_chained_products(backend: &dyn Backend) {
    let s = backend.new_stream().unwrap();
    let value = |seed: usize, i: usize| (((i * 37 + seed * 11) % 97) as f32 - 48.0) / 64.0;
    for (round, (m, k, n)) in [
        (3, 64, 40),
        (9, 1024, 24),
        (17, 1028, 8),
        (5, 13, 7),
        (1, 4, 1),
        (40, 64, 24),
        (70, 16, 65),
        (9, 64, 1028),
    ]
    .into_iter()
    .enumerate()
    {
        // C0 = relu(A0·W0ᵀ + b0) [m, n]; then C1 = C0·C0ᵀ [m, m] (B = C0, just written).
        let a0: Vec<f32> = (0..m * k).map(|i| value(round, i)).collect();
        let w0: Vec<f32> = (0..n * k).map(|i| value(round + 1, i)).collect();
        let b0: Vec<f32> = (0..n).map(|i| value(round + 2, i)).collect();
        let buf = |v: &[f32]| {
            let b = backend.alloc(v.len()).unwrap();
            s.upload(&*b, v).unwrap();
            b
        };
        let (a0b, w0b, b0b) = (buf(&a0), buf(&w0), buf(&b0));
        let (c0b, c1b) = (buf(&vec![f32::NAN; m * n]), buf(&vec![f32::NAN; m * m]));
        let spec = |m, n, k, relu, b_static| GemmSpec {
            m,
            n,
            k,
            b_transposed: true,
            relu,
            dtype: DType::F32,
            precision: Precision::Strict,
            fuse: true,
            b_static,
        };
        fn ops<'a>(
            a: &'a dyn BackendBuffer,
            b: &'a dyn BackendBuffer,
            c: &'a dyn BackendBuffer,
            bias: Option<&'a dyn BackendBuffer>,
        ) -> GemmOperands<'a> {
            GemmOperands {
                a: MatRef::new(a),
                b: MatRef::new(b),
                c: MatRef::new(c),
                bias: bias.map(MatRef::new),
            }
        }
        s.gemm(
            &spec(m, n, k, true, true),
            &ops(&*a0b, &*w0b, &*c0b, Some(&*b0b)),
        )
        .unwrap();
        s.gemm(
            &spec(m, m, n, false, false),
            &ops(&*c0b, &*c0b, &*c1b, None),
        )
        .unwrap();
        let mut c1 = vec![0f32; m * m];
        s.download(&*c1b, &mut c1).unwrap();
        let c0: Vec<f64> = (0..m * n)
            .map(|e| {
                let (r, j) = (e / n, e % n);
                let dot: f64 = (0..k)
                    .map(|i| a0[r * k + i] as f64 * w0[j * k + i] as f64)
                    .sum();
                (dot + b0[j] as f64).max(0.0)
            })
            .collect();
        for r in 0..m {
            for j in 0..m {
                let want: f64 = (0..n).map(|i| c0[r * n + i] * c0[j * n + i]).sum();
                let scale: f64 = (0..n)
                    .map(|i| c0[r * n + i].abs() * c0[j * n + i].abs())
                    .sum();
                let got = c1[r * m + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-4 * scale.max(1.0),
                    "(m, k, n) = {:?}: C1[{r}, {j}] = {got}, want {want}",
                    (m, k, n)
                );
            }
        }
        for b in [a0b, w0b, b0b, c0b, c1b] {
            s.free_after(b);
        }
    }
    s.synchronize().unwrap();
}

/// Checks [`Backend::alloc_host`] and [`BackendStream::copy`] on `backend`: data staged in
/// host buffers goes through device buffers and back unchanged, at offsets, in stream order;
/// bad copies are refused.
/// Products whose sizes overflow `usize` (m·k wrapping to a small number that a small buffer
/// would "hold") are refused, alone and batched, before any memory is touched.
#[cfg(test)]
pub(crate) fn check_overflowing_products(backend: &dyn Backend) {
    let s = backend.new_stream().unwrap();
    let bufs: Vec<_> = (0..3).map(|_| backend.alloc(4).unwrap()).collect();
    let big = 1usize << (usize::BITS / 2);
    for (m, n, k) in [(big, big, big), (big, 1, big), (1, big, big), (big, big, 1)] {
        let spec = GemmSpec {
            m,
            n,
            k,
            b_transposed: false,
            relu: false,
            dtype: DType::F32,
            precision: Precision::Strict,
            fuse: false,
            b_static: false,
        };
        let ops = GemmOperands {
            a: MatRef::new(&*bufs[0]),
            b: MatRef::new(&*bufs[1]),
            c: MatRef::new(&*bufs[2]),
            bias: None,
        };
        assert!(spec.sizes().is_err(), "{m}x{n}x{k}");
        let one = s.gemm(&spec, &ops).unwrap_err();
        assert!(
            one.to_string()
                .contains("more elements than can be addressed"),
            "{one}"
        );
        assert!(
            s.gemm_batched(&spec, &[ops]).is_err(),
            "{m}x{n}x{k} batched"
        );
    }
    s.synchronize().unwrap();
}

#[cfg(test)]
pub(crate) fn check_staged_copies(backend: &dyn Backend) {
    let n = 3000;
    let stage_in = backend.alloc_host(n).unwrap();
    let stage_out = backend.alloc_host(n).unwrap();
    let dev = backend.alloc(n + 100).unwrap();
    let s = backend.new_stream().unwrap();
    for round in 0..3 {
        let src: Vec<f32> = (0..n).map(|i| (i * 7 + round) as f32 * 0.5).collect();
        s.upload_at(&*stage_in, 0, &src).unwrap();
        s.copy(&*stage_in, 0, &*dev, 100, n).unwrap();
        s.copy(&*dev, 100, &*stage_out, 0, n).unwrap();
        let mut back = vec![0f32; n];
        s.download_at(&*stage_out, 0, &mut back).unwrap();
        assert_eq!(back, src, "round {round}");
        // A partial copy at offsets.
        s.copy(&*dev, 110, &*stage_out, 5, 10).unwrap();
        let mut part = vec![0f32; 10];
        s.download_at(&*stage_out, 5, &mut part).unwrap();
        assert_eq!(part, src[10..20]);
    }
    assert!(s.copy(&*dev, 0, &*dev, 10, 5).is_err(), "same buffer");
    assert!(s.copy(&*stage_in, 1, &*dev, 0, n).is_err(), "source range");
    assert!(
        s.copy(&*stage_in, 0, &*dev, 101, n).is_err(),
        "destination range"
    );
    assert!(
        s.copy(&*stage_in, usize::MAX, &*dev, 0, 2).is_err(),
        "offset overflow"
    );
    s.synchronize().unwrap();
    s.free_after(stage_in);
    s.free_after(dev);
    s.free_after(stage_out);
    s.synchronize().unwrap();
}
