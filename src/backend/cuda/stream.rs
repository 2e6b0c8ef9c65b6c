//! CUDA buffers, streams and events: the few places where multiq calls the driver directly.
//!
//! Every driver call here needs the device's context current on the calling thread; [`bind`]
//! makes it so (one `cuCtxGetCurrent`, plus `cuCtxSetCurrent` the first time on a thread).

use std::any::Any;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaStream};

use super::kernels::{
    Group, Kernels, Segment, SignalParam, BLOCK_THREADS, GROUP_SIZES, MAX_SEGMENTS,
    SIGNAL_BLOCKS_PER_SM, SIGNAL_BLOCK_THREADS,
};
use super::reuse::{PinnedBlock, Reuse};
use super::{driver_error, MAX_ELEMENTS};
use crate::backend::{
    downcast, BackendBuffer, BackendEvent, BackendProgram, BackendSignal, BackendStream, WaitPolicy,
};
use crate::error::{Error, Result};
use crate::kernel::Kernel;

/// Makes `ctx` current on the calling thread.
pub(super) fn bind(ctx: &CudaContext) -> Result<()> {
    let want = ctx.cu_ctx();
    match result::ctx::get_current() {
        Ok(Some(current)) if current == want => Ok(()),
        // SAFETY: `want` is the context owned by `ctx`, which the caller keeps alive.
        _ => unsafe { result::ctx::set_current(want) }.map_err(|e| driver_error("bind", e)),
    }
}

/// A raw allocation of f32 elements: device memory, or page-locked host memory mapped into
/// the device's address space ([`CudaBuffer::alloc_host`]).
///
/// Invariant: `ptr` is a live allocation of `len * 4` bytes in `ctx` until it is handed to
/// [`BackendStream::free_after`] (which zeroes `ptr`) or freed by `Drop`. With `host`, it is
/// the device alias of the `cuMemHostAlloc` allocation at `host` (same length). With
/// `pool_stream`, it came from the stream-ordered allocator on that stream.
pub(super) struct CudaBuffer {
    ptr: sys::CUdeviceptr,
    len: usize,
    ctx: Arc<CudaContext>,
    host: Option<std::ptr::NonNull<f32>>,
    /// The stream a stream-ordered allocation was made on; `Drop` frees it there, without
    /// the device-wide synchronization of `cuMemFree` (which would wait for the device
    /// queue's resident kernel, and so for other threads' load).
    pool_stream: Option<Arc<CudaStream>>,
}

// SAFETY: the buffer is an allocation handle; device memory is only touched through the
// driver, and host memory (`host`) only by `upload_at`/`download_at` after the stream that
// uses it synchronized (the runtime gives a buffer to one stream at a time).
unsafe impl Send for CudaBuffer {}
// SAFETY: `&CudaBuffer` exposes its address and length, and through a stream's
// `upload_at`/`download_at` the host memory of a mapped buffer. Those are called only by the
// runtime, which gives a buffer to one stream (and one thread) at a time (ownership rules in
// docs/ARCHITECTURE.md); the backend is not reachable from outside the crate.
unsafe impl Sync for CudaBuffer {}

impl CudaBuffer {
    pub(super) fn alloc(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        len: usize,
        device: &str,
    ) -> Result<Self> {
        let bytes = len.checked_mul(4).filter(|_| len <= MAX_ELEMENTS);
        let Some(bytes) = bytes else {
            return Err(Error::OutOfMemory {
                elements: len,
                bytes: (len as u64).saturating_mul(4),
                device: device.into(),
                reason: format!("a CUDA buffer holds at most {MAX_ELEMENTS} elements"),
            });
        };
        bind(ctx)?;
        let oom = |e: cudarc::driver::DriverError| Error::OutOfMemory {
            elements: len,
            bytes: bytes as u64,
            device: device.into(),
            reason: driver_error("alloc", e).to_string(),
        };
        let ptr = if ctx.has_async_alloc() {
            // SAFETY: the context is current; the allocation is made on `stream` and the
            // stream is synchronized before the pointer is used anywhere else, so every
            // other stream may use it afterwards.
            let p = unsafe { result::malloc_async(stream.cu_stream(), bytes) }.map_err(oom)?;
            let buf = CudaBuffer {
                ptr: p,
                len,
                ctx: ctx.clone(),
                host: None,
                pool_stream: Some(stream.clone()),
            };
            stream.synchronize().map_err(|e| driver_error("alloc", e))?;
            return Ok(buf);
        } else {
            // SAFETY: the context is current; the memory is written before it is read
            // (uploads or kernels), and `f32` has no invalid bit patterns anyway.
            unsafe { result::malloc_sync(bytes) }.map_err(oom)?
        };
        Ok(CudaBuffer {
            ptr,
            len,
            ctx: ctx.clone(),
            host: None,
            pool_stream: None,
        })
    }

    /// `len` f32 of page-locked host memory that kernels read and write in place (mapped
    /// into the device's address space): staging for small transfers without copy engines.
    pub(super) fn alloc_host(ctx: &Arc<CudaContext>, len: usize, device: &str) -> Result<Self> {
        let bytes = len.checked_mul(4).filter(|_| len <= MAX_ELEMENTS);
        let oom = |reason: String| Error::OutOfMemory {
            elements: len,
            bytes: (len as u64).saturating_mul(4),
            device: format!("{device} (page-locked host memory)"),
            reason,
        };
        let Some(bytes) = bytes else {
            return Err(oom(format!(
                "a CUDA buffer holds at most {MAX_ELEMENTS} elements"
            )));
        };
        bind(ctx)?;
        let mut host: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: `host` is a valid out-pointer; the context is current.
        unsafe { sys::cuMemHostAlloc(&mut host, bytes.max(4), flags) }
            .result()
            .map_err(|e| oom(driver_error("alloc", e).to_string()))?;
        let Some(nn) = std::ptr::NonNull::new(host.cast::<f32>()) else {
            return Err(oom("cuMemHostAlloc returned null".into()));
        };
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `host` is a mapped page-locked allocation of this context; out-pointer valid.
        let mapped = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut ptr, host, 0) }.result();
        if let Err(e) = mapped {
            // SAFETY: just allocated, never used by the device.
            let _ = unsafe { result::free_host(host) };
            return Err(driver_error("alloc", e));
        }
        Ok(CudaBuffer {
            ptr,
            len,
            ctx: ctx.clone(),
            host: Some(nn),
            pool_stream: None,
        })
    }
}

impl CudaBuffer {
    /// The allocation's device address (live per the invariant).
    pub(super) fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }
}

impl BackendBuffer for CudaBuffer {
    fn len(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 && bind(&self.ctx).is_ok() {
            // Reached only for buffers no stream ever used (the runtime hands used buffers to
            // `free_after`) or whose streams were synchronized: no work can reference them.
            match (self.host, &self.pool_stream) {
                // SAFETY: `host` is the live page-locked allocation (invariant), unused.
                (Some(h), _) => drop(unsafe { result::free_host(h.as_ptr().cast()) }),
                (None, Some(stream)) => {
                    // SAFETY: `ptr` is a live stream-ordered allocation made on `stream`
                    // (invariant), and no queued work uses it, so a free ordered on that
                    // stream (behind nothing but other allocations and frees) is safe.
                    let _ = unsafe { result::free_async(self.ptr, stream.cu_stream()) };
                }
                // SAFETY: `ptr` is live (invariant) and unused by any queued work.
                (None, None) => drop(unsafe { result::free_sync(self.ptr) }),
            }
        }
    }
}

/// One CUDA stream of a pool slot.
pub(super) struct CudaQueue {
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    /// cuBLAS/cuBLASLt state of this stream, made on its first matrix product.
    math: super::blas::StreamMath,
    /// The context's gate for device-filling kernels, if on.
    gate: Option<Arc<super::fill_gate::FillGate>>,
    /// Raised after every kernel queued here: a busy device queue, whose kernel fills the
    /// device, leaves for it (`queue::QueueYield`).
    queue_yield: Arc<super::queue::QueueYield>,
}

impl CudaQueue {
    pub(super) fn new(
        stream: Arc<CudaStream>,
        kernels: Arc<Kernels>,
        gate: Option<Arc<super::fill_gate::FillGate>>,
        reuse: Arc<super::reuse::Reuse>,
        queue_yield: Arc<super::queue::QueueYield>,
    ) -> Self {
        let math = super::blas::StreamMath::new(stream.clone(), reuse);
        CudaQueue {
            stream,
            kernels,
            math,
            gate,
            queue_yield,
        }
    }

    fn ctx(&self) -> &CudaContext {
        self.stream.context()
    }

    /// Grouped launches of at most `MAX_SEGMENTS` buffers each. With `signal` (only for one
    /// chunk), the kernel writes the signal's value when its last block finished.
    fn grouped(
        &self,
        kernel: Kernel,
        bufs: &[&dyn BackendBuffer],
        signal: Option<(&CudaSignal, u64)>,
    ) -> Result<()> {
        let Kernel::SimpleCompute { iters } = kernel;
        let bufs: Vec<&CudaBuffer> = bufs
            .iter()
            .map(|b| cuda_buffer(*b))
            .collect::<Result<_>>()?;
        if signal.is_some() && bufs.len() > MAX_SEGMENTS {
            return Err(Error::invalid("a signalled grouped launch holds one chunk"));
        }
        if let Some((sig, _)) = signal {
            // Before the launch, so the signal's `Drop` waits for this stream.
            sig.note_writer(&self.stream);
        }
        bind(self.ctx())?;
        for chunk in bufs.chunks(MAX_SEGMENTS) {
            let empty = Segment {
                data: 0,
                n: 0,
                first_block: 0,
            };
            let mut group = Group {
                count: 0,
                pad: 0,
                seg: [empty; MAX_SEGMENTS],
            };
            let mut blocks: u64 = 0;
            for (slot, b) in group.seg.iter_mut().zip(chunk) {
                let n = u32::try_from(b.len)
                    .map_err(|_| Error::invalid("buffer too large for a 32-bit kernel index"))?;
                *slot = Segment {
                    data: b.ptr,
                    n,
                    first_block: blocks as u32,
                };
                blocks += u64::from(n.div_ceil(BLOCK_THREADS).max(1));
            }
            let grid = u32::try_from(blocks)
                .map_err(|_| Error::invalid("grouped launch exceeds 2^32 blocks"))?;
            group.count = chunk.len() as u32;
            // The smallest variant that holds the chunk: its parameter block is a prefix of
            // `Group` (count, pad, the first MAX segments), so the same memory serves all.
            let variant = GROUP_SIZES
                .iter()
                .position(|&m| chunk.len() <= m)
                .unwrap_or(GROUP_SIZES.len() - 1);
            let mut iters = iters;
            let mut signal_param = signal.map(|(sig, value)| SignalParam {
                word: sig.device_ptr,
                counter: sig.counter,
                value,
            });
            // Parameter pointers: the unsignalled variants read the first two.
            let (function, mut params, grid, block): (_, [*mut c_void; 3], _, _) =
                match &mut signal_param {
                    None => (
                        &self.kernels.simple_compute_grouped[variant],
                        [
                            (&mut group as *mut Group).cast(),
                            (&mut iters as *mut u32).cast(),
                            std::ptr::null_mut(),
                        ],
                        grid.max(1),
                        BLOCK_THREADS,
                    ),
                    Some(p) => (
                        &self.kernels.simple_compute_grouped_signal[variant],
                        [
                            (&mut group as *mut Group).cast(),
                            (&mut iters as *mut u32).cast(),
                            (p as *mut SignalParam).cast(),
                        ],
                        grid.div_ceil(SIGNAL_BLOCK_THREADS / BLOCK_THREADS)
                            .clamp(1, SIGNAL_BLOCKS_PER_SM * self.kernels.multiprocessors),
                        SIGNAL_BLOCK_THREADS,
                    ),
                };
            // SAFETY: the function takes (Group<MAX> by value, unsigned int[, Signal by value])
            // with MAX >= the chunk's length; `Group` is #[repr(C)] with the kernel's layout
            // (u32, u32, then segments of {u64, u32, u32}) and Group<MAX> is a prefix of it
            // (the driver reads the variant's parameter size from the function); `Signal` is
            // `SignalParam`'s layout (three u64). `params` point to live locals for the
            // duration of the call (the driver copies them). Each segment is a live allocation
            // of `n` floats of this context (CudaBuffer invariant), the buffers are distinct
            // (the caller's contract), and the grid has exactly `first_block + ceil(n/256)`
            // blocks per segment, each bounds-checking `i < n` (the signalled variants stride
            // over those blocks with any grid). The signal's word and counter
            // are live (CudaSignal invariant), and only this stream writes them meanwhile
            // (the trait's contract), so the counter counts this grid's blocks alone.
            unsafe {
                result::launch_kernel(
                    function.cu_function(),
                    (grid, 1, 1),
                    (block, 1, 1),
                    0,
                    self.stream.cu_stream(),
                    &mut params,
                )
            }
            .map_err(|e| driver_error("launch", e))?;
            self.queue_yield.kernel_launched();
        }
        Ok(())
    }

    /// Passes on the result of queuing a kernel (or work made of kernels), first raising the
    /// device's yield word if it was queued, so a busy device queue gives the device up.
    fn launched(&self, queued: Result<()>) -> Result<()> {
        if queued.is_ok() {
            self.queue_yield.kernel_launched();
        }
        queued
    }
}

pub(super) fn cuda_buffer(buf: &dyn BackendBuffer) -> Result<&CudaBuffer> {
    downcast::<CudaBuffer>(buf.as_any(), "buffer")
}

impl BackendStream for CudaQueue {
    fn launch(&self, kernel: Kernel, buf: &dyn BackendBuffer) -> Result<()> {
        let buf = cuda_buffer(buf)?;
        let Kernel::SimpleCompute { iters } = kernel;
        // Checked at allocation; re-checked here because the kernel's index type depends on it.
        let mut n = u32::try_from(buf.len)
            .map_err(|_| Error::invalid("buffer too large for a 32-bit kernel index"))?;
        let mut iters = iters;
        let mut ptr = buf.ptr;
        let grid = n.div_ceil(BLOCK_THREADS).max(1);
        bind(self.ctx())?;
        let mut params: [*mut c_void; 3] = [
            (&mut ptr as *mut sys::CUdeviceptr).cast(),
            (&mut n as *mut u32).cast(),
            (&mut iters as *mut u32).cast(),
        ];
        let mut launch = || {
            // SAFETY: the function takes (float*, unsigned int, unsigned int), matching
            // `params`, whose pointees live until the call returns (the driver copies them at
            // launch); `ptr` is a live allocation of `n` floats in this stream's context
            // (CudaBuffer invariant; the runtime keeps it alive until work on it completed);
            // the grid covers `n` with `BLOCK_THREADS` threads per block and the kernel
            // bounds-checks `i < n`.
            unsafe {
                result::launch_kernel(
                    self.kernels.simple_compute.cu_function(),
                    (grid, 1, 1),
                    (BLOCK_THREADS, 1, 1),
                    0,
                    self.stream.cu_stream(),
                    &mut params,
                )
            }
            .map_err(|e| driver_error("launch", e))
        };
        let launched = match &self.gate {
            Some(gate) if gate.applies(buf.len) => gate.through(&self.stream, &mut launch),
            _ => launch(),
        };
        self.launched(launched)
    }

    fn launch_grouped(&self, kernel: Kernel, bufs: &[&dyn BackendBuffer]) -> Result<()> {
        self.grouped(kernel, bufs, None)
    }

    fn launch_grouped_signalled(
        &self,
        kernel: Kernel,
        bufs: &[&dyn BackendBuffer],
        signal: &dyn BackendSignal,
        value: u64,
    ) -> Result<()> {
        let sig = downcast::<CudaSignal>(signal.as_any(), "signal")?;
        if bufs.is_empty() {
            // No kernel to write it: the word is still owed (its waiters poll for it).
            return self.signal(signal, value);
        }
        // The signalling kernel pays one atomic per 1,024-thread block: worth it for small
        // batches (it saves a driver call and a stream memory operation), not for grids
        // larger than one launch wave of SIGNAL_BLOCKS_PER_SM blocks per multiprocessor
        // (measured on the H100: light batches ran ~1.5x longer that way).
        let blocks: u64 = bufs
            .iter()
            .map(|b| {
                (b.len() as u64)
                    .div_ceil(u64::from(SIGNAL_BLOCK_THREADS))
                    .max(1)
            })
            .sum();
        let fits = blocks <= u64::from(SIGNAL_BLOCKS_PER_SM * self.kernels.multiprocessors);
        if bufs.len() <= MAX_SEGMENTS && fits {
            self.grouped(kernel, bufs, Some((sig, value)))
        } else {
            self.grouped(kernel, bufs, None)?;
            if self.signal(signal, value).is_err() {
                // The kernels are queued, so the batch is not failed for want of the write:
                // once the stream is idle, the host writes the word itself (later values
                // come only from later launches on this stream).
                self.synchronize()?;
                sig.raise_from_host(value);
            }
            Ok(())
        }
    }

    fn upload(&self, buf: &dyn BackendBuffer, src: &[f32]) -> Result<()> {
        let buf = cuda_buffer(buf)?;
        if src.len() != buf.len {
            return Err(Error::invalid(format!(
                "upload of {} elements into a buffer of {}",
                src.len(),
                buf.len
            )));
        }
        bind(self.ctx())?;
        // SAFETY: `buf.ptr` holds `buf.len` floats = `src.len()`; the stream is synchronized
        // before returning, so `src` outlives the copy.
        unsafe { result::memcpy_htod_async(buf.ptr, src, self.stream.cu_stream()) }
            .map_err(|e| driver_error("upload", e))?;
        self.synchronize()
    }

    fn download(&self, buf: &dyn BackendBuffer, dst: &mut [f32]) -> Result<()> {
        let buf = cuda_buffer(buf)?;
        if dst.len() != buf.len {
            return Err(Error::invalid(format!(
                "download of a buffer of {} elements into {}",
                buf.len,
                dst.len()
            )));
        }
        bind(self.ctx())?;
        // SAFETY: `dst` has room for `buf.len` floats; the stream is synchronized before
        // returning, so `dst` outlives the copy and is fully written when we return.
        unsafe { result::memcpy_dtoh_async(dst, buf.ptr, self.stream.cu_stream()) }
            .map_err(|e| driver_error("download", e))?;
        self.synchronize()
    }

    fn record(&self, event: &dyn BackendEvent) -> Result<()> {
        let ev = downcast::<CudaEventBox>(event.as_any(), "event")?;
        bind(self.ctx())?;
        // SAFETY: `ev.event` is a live event of this context (CudaEventBox invariant) and the
        // stream is live (held by `self`).
        unsafe { result::event::record(ev.event, self.stream.cu_stream()) }
            .map_err(|e| driver_error("record", e))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("synchronize", e))
    }

    fn query(&self) -> Result<bool> {
        bind(self.ctx())?;
        // SAFETY: the stream is live (held by `self`).
        match unsafe { sys::cuStreamQuery(self.stream.cu_stream()) }.result() {
            Ok(()) => Ok(true),
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(driver_error("query", e)),
        }
    }

    fn signal(&self, signal: &dyn BackendSignal, value: u64) -> Result<()> {
        let sig = downcast::<CudaSignal>(signal.as_any(), "signal")?;
        bind(self.ctx())?;
        sig.note_writer(&self.stream);
        // SAFETY: `sig.device_ptr` maps the signal's live, 8-byte-aligned host word (CudaSignal
        // invariant: it stays allocated until every queued write landed, this stream being
        // noted as a writer); the stream is live.
        // Default flags: the write waits for earlier work on the stream and is preceded by a
        // memory barrier, so that work's results are visible once the value is.
        unsafe { sys::cuStreamWriteValue64_v2(self.stream.cu_stream(), sig.device_ptr, value, 0) }
            .result()
            .map_err(|e| driver_error("signal", e))
    }

    fn gemm(
        &self,
        spec: &crate::backend::GemmSpec,
        ops: &crate::backend::GemmOperands<'_>,
    ) -> Result<()> {
        self.launched(self.math.gemm(spec, ops))
    }

    fn gemm_batched(
        &self,
        spec: &crate::backend::GemmSpec,
        ops: &[crate::backend::GemmOperands<'_>],
    ) -> Result<()> {
        self.launched(self.math.gemm_batched(spec, ops))
    }

    fn upload_at(&self, buf: &dyn BackendBuffer, offset: usize, src: &[f32]) -> Result<()> {
        let buf = cuda_buffer(buf)?;
        check_range(offset, src.len(), buf.len)?;
        if src.is_empty() {
            return Ok(());
        }
        bind(self.ctx())?;
        if let Some(host) = buf.host {
            // Work queued earlier on this stream may still read the range: let it finish.
            self.synchronize()?;
            // SAFETY: the range lies inside the live page-locked allocation (checked above)
            // and no device work uses it now (the stream completed; the runtime gives a
            // buffer to one stream at a time); `src` is a distinct host slice.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), host.as_ptr().add(offset), src.len())
            };
            return Ok(());
        }
        // SAFETY: the range lies inside the live allocation (checked above). `src` is pageable
        // memory (multiq pins no memory it hands out), which the driver copies to a staging
        // buffer before `cuMemcpyHtoDAsync` returns, so the caller may reuse it at once; the
        // device copy is ordered on this stream before later work.
        unsafe {
            result::memcpy_htod_async(buf.ptr + offset as u64 * 4, src, self.stream.cu_stream())
        }
        .map_err(|e| driver_error("upload", e))
    }

    fn download_at(&self, buf: &dyn BackendBuffer, offset: usize, dst: &mut [f32]) -> Result<()> {
        let buf = cuda_buffer(buf)?;
        check_range(offset, dst.len(), buf.len)?;
        if dst.is_empty() {
            return Ok(());
        }
        bind(self.ctx())?;
        if let Some(host) = buf.host {
            self.synchronize()?;
            // SAFETY: the stream completed, so the device's writes to the mapped range are
            // visible to the host, and no device work uses it now; the range lies inside the
            // live allocation (checked above); `dst` is a distinct host slice of that length.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    host.as_ptr().add(offset),
                    dst.as_mut_ptr(),
                    dst.len(),
                )
            };
            return Ok(());
        }
        // SAFETY: the range lies inside the live allocation; `dst` has room for it; the stream
        // is synchronized before returning, so `dst` is written and outlives the copy.
        unsafe {
            result::memcpy_dtoh_async(dst, buf.ptr + offset as u64 * 4, self.stream.cu_stream())
        }
        .map_err(|e| driver_error("download", e))?;
        self.synchronize()
    }

    fn copy(
        &self,
        src: &dyn BackendBuffer,
        src_offset: usize,
        dst: &dyn BackendBuffer,
        dst_offset: usize,
        len: usize,
    ) -> Result<()> {
        let (src, dst) = (cuda_buffer(src)?, cuda_buffer(dst)?);
        check_range(src_offset, len, src.len)?;
        check_range(dst_offset, len, dst.len)?;
        if std::ptr::eq(src, dst) {
            return Err(Error::invalid("a copy needs two distinct buffers"));
        }
        if len == 0 {
            return Ok(());
        }
        let mut n = u32::try_from(len).map_err(|_| Error::invalid("copy exceeds 2^32 elements"))?;
        let mut from = src.ptr + src_offset as u64 * 4;
        let mut to = dst.ptr + dst_offset as u64 * 4;
        let mut params: [*mut c_void; 3] = [
            (&mut from as *mut u64).cast(),
            (&mut to as *mut u64).cast(),
            (&mut n as *mut u32).cast(),
        ];
        let grid = n.div_ceil(BLOCK_THREADS).clamp(1, 1024);
        bind(self.ctx())?;
        let shape = super::kernels::LaunchShape {
            grid: (grid, 1, 1),
            block: (BLOCK_THREADS, 1, 1),
            shared: 0,
            programmatic: super::kernels::programmatic(self.stream.context())?,
        };
        // SAFETY: `copy_f32` takes (const float*, float*, unsigned int), matching `params`,
        // which point to live locals for the call (the driver copies them). Both ranges lie
        // inside live allocations of this context (checked above; device memory or mapped
        // page-locked memory), in distinct buffers, and the kernel touches i < n only, after
        // `wait_for_prerequisites()` (so a programmatic launch is sound).
        let launched = unsafe {
            super::kernels::launch(&self.kernels.copy_f32, &self.stream, shape, &mut params)
        }
        .map_err(|e| driver_error("copy", e));
        self.launched(launched)
    }

    fn record_program(
        &self,
        body: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Box<dyn BackendProgram>>> {
        bind(self.ctx())?;
        Ok(capture(&self.stream, body).map(|graph| {
            Box::new(CudaProgram {
                graph: parking_lot::Mutex::new(graph),
                stream: self.stream.cu_stream() as usize,
            }) as Box<dyn BackendProgram>
        }))
    }

    fn replay(&self, program: &dyn BackendProgram) -> Result<()> {
        let p = downcast::<CudaProgram>(program.as_any(), "program")?;
        if p.stream != self.stream.cu_stream() as usize {
            return Err(Error::invalid(
                "a program replayed on a stream it was not recorded on",
            ));
        }
        let launched = p
            .graph
            .lock()
            .launch()
            .map_err(|e| driver_error("launch graph", e));
        self.launched(launched)
    }

    fn free_after(&self, buf: Box<dyn BackendBuffer>) {
        let Ok(buf) = buf.into_any().downcast::<CudaBuffer>() else {
            return; // not ours: its own Drop frees it
        };
        let mut buf = buf;
        let ptr = std::mem::replace(&mut buf.ptr, 0);
        if bind(self.ctx()).is_err() {
            return;
        }
        if let Some(host) = buf.host.take() {
            // Page-locked memory has no stream-ordered free, so this waits for the stream
            // (as the path without async allocation below). A failed wait leaks the memory
            // rather than free it under a queued copy.
            if self.stream.synchronize().is_ok() {
                // SAFETY: after the stream synchronized no queued work uses the memory
                // (rule 3: all of it was on this stream), and we own the allocation.
                let _ = unsafe { result::free_host(host.as_ptr().cast()) };
            }
            return;
        }
        let freed = if buf.ctx.has_async_alloc() {
            // SAFETY: `ptr` is live and, by the runtime's rule 3, all work using it was queued
            // on this stream: the stream-ordered free runs after that work.
            unsafe { result::free_async(ptr, self.stream.cu_stream()) }
        } else {
            // SAFETY: after the stream synchronized, no queued work uses `ptr`.
            self.stream
                .synchronize()
                .and_then(|()| unsafe { result::free_sync(ptr) })
        };
        let _ = freed;
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Checks that `len` elements from `offset` lie inside a buffer of `size`.
fn check_range(offset: usize, len: usize, size: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::invalid(format!(
            "a copy of {len} elements at offset {offset} does not fit a buffer of {size}"
        ))),
    }
}

/// A host-visible progress word: 8 bytes of page-locked host memory, mapped into the device's
/// address space, written by `cuStreamWriteValue64` and read by the host with atomic loads.
///
/// Invariant: `host` points into `block`, a live page-locked block (from the context's
/// [`Reuse`]) whose device alias is `device_ptr`; `counter` is a live 4-byte device allocation.
/// Every stream that queues a write to either is `home` or is noted as a writer before it
/// queues it ([`CudaSignal::note_writer`]), so `Drop`, which waits for those streams only (not the whole
/// device: another pool's busy device queue may keep it busy for as long as work arrives),
/// knows no write can land afterwards; only then does the block go back for reuse and the
/// counter get freed. The host only ever reads the word atomically.
pub(super) struct CudaSignal {
    host: std::ptr::NonNull<u64>,
    device_ptr: sys::CUdeviceptr,
    /// A zeroed device word for the signalled kernels' block count.
    counter: sys::CUdeviceptr,
    /// The page-locked block holding the word (`None` only inside `Drop`).
    block: Option<PinnedBlock>,
    /// The stream `counter` was allocated and zeroed on, and the word first written from (the
    /// backend's allocation stream, shared by every pool).
    home: Arc<CudaStream>,
    /// `new` saw `home` idle after its writes; otherwise (a `new` that failed half-way) `Drop`
    /// waits for it too.
    home_idle: bool,
    /// The first stream that wrote the signal, and any others (a pool's coalescer has one).
    first_writer: std::sync::OnceLock<Arc<CudaStream>>,
    more_writers: parking_lot::Mutex<Vec<Arc<CudaStream>>>,
    reuse: Arc<Reuse>,
    ctx: Arc<CudaContext>,
}

// SAFETY: the word is plain host memory, valid from any thread until Drop, and only accessed
// through atomic loads on the host (and DMA writes from the device); the rest is handles and
// integers usable from any thread, and the writer list is behind a `OnceLock` and a mutex.
unsafe impl Send for CudaSignal {}
// SAFETY: as above: `&CudaSignal` only allows atomic reads of the word and noting writers.
unsafe impl Sync for CudaSignal {}

impl CudaSignal {
    /// A new signal reading 0, checked with one write through `stream` (so a driver without
    /// stream memory operations is found here, not in the middle of a batch).
    pub(super) fn new(
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
        reuse: &Arc<Reuse>,
        queue_yield: &super::queue::QueueYield,
    ) -> Result<Self> {
        bind(ctx)?;
        // Zeroed, page-aligned (so aligned for u64), at least 8 bytes.
        let block = reuse.take_pinned(8)?;
        let counter = if ctx.has_async_alloc() {
            // SAFETY: the context is current and `stream` live; the word is used by other
            // streams only after `stream` is synchronized below.
            unsafe { result::malloc_async(stream.cu_stream(), 4) }
        } else {
            // SAFETY: the context is current.
            unsafe { result::malloc_sync(4) }
        };
        let counter = match counter {
            Ok(c) => c,
            Err(e) => {
                reuse.give_pinned(block); // nothing queued uses it yet
                return Err(driver_error("signal", e));
            }
        };
        let mut signal = CudaSignal {
            host: block.host().cast::<u64>(),
            device_ptr: block.device(),
            counter,
            block: Some(block),
            home: stream.clone(),
            home_idle: false,
            first_writer: std::sync::OnceLock::new(),
            more_writers: parking_lot::Mutex::new(Vec::new()),
            reuse: reuse.clone(),
            ctx: ctx.clone(),
        };
        // From here on, `Drop` releases what was made, after `home` (which writes the word
        // below) and the writers noted later are idle.
        // SAFETY: `counter` is a live 4-byte device allocation; `stream` is live. The memset is
        // queued on `stream`, which is synchronized below, so it has completed before any
        // kernel can use the word. (The non-Async `cuMemsetD32` would be asynchronous to the
        // host for device memory and run on the legacy default stream, which does not order
        // with multiq's non-blocking streams.)
        unsafe { sys::cuMemsetD32Async(signal.counter, 0, 1, stream.cu_stream()) }
            .result()
            .map_err(|e| driver_error("signal", e))?;
        // A memset of device memory may run on the multiprocessors: a busy device queue
        // leaves for it (`new` waits for it below).
        queue_yield.kernel_launched();
        // SAFETY: as in `CudaQueue::signal`: live word, live stream (`home`, which `Drop`
        // waits for).
        unsafe { sys::cuStreamWriteValue64_v2(stream.cu_stream(), signal.device_ptr, 0, 0) }
            .result()
            .map_err(|e| driver_error("signal", e))?;
        stream
            .synchronize()
            .map_err(|e| driver_error("signal", e))?;
        signal.home_idle = true;
        Ok(signal)
    }

    /// Records that `stream` is about to queue a write to the word or a kernel counting on
    /// `counter`: `Drop` waits for it. Lock-free once the first writer is known and writes
    /// again (a pool's coalescer writes from one stream).
    fn note_writer(&self, stream: &Arc<CudaStream>) {
        let first = self.first_writer.get_or_init(|| stream.clone());
        if Arc::ptr_eq(first, stream) {
            return;
        }
        let mut more = self.more_writers.lock();
        if !more.iter().any(|s| Arc::ptr_eq(s, stream)) {
            more.push(stream.clone());
        }
    }

    /// Raises the word to `value` from the host (for a write the stream could not queue).
    fn raise_from_host(&self, value: u64) {
        // SAFETY: `host` is live and aligned (invariant); every host access is atomic.
        unsafe { AtomicU64::from_ptr(self.host.as_ptr()) }.fetch_max(value, Ordering::AcqRel);
    }
}

impl BackendSignal for CudaSignal {
    fn value(&self) -> u64 {
        // SAFETY: `host` is live and aligned (invariant); the host accesses it only atomically.
        unsafe { AtomicU64::from_ptr(self.host.as_ptr()) }.load(Ordering::Acquire)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for CudaSignal {
    fn drop(&mut self) {
        if bind(&self.ctx).is_err() {
            return; // the context is gone: leak rather than free under a pending write
        }
        let first = self.first_writer.get().cloned();
        let more = std::mem::take(self.more_writers.get_mut());
        let home = Some(self.home.clone()).filter(|_| !self.home_idle);
        for stream in home.iter().chain(first.iter()).chain(more.iter()) {
            if stream.synchronize().is_err() {
                // The device failed: a queued write may still land. Leak the memory.
                return;
            }
        }
        if self.ctx.has_async_alloc() {
            // SAFETY: every stream that used the counter is idle (invariant: all are writers,
            // synchronized above), it is a stream-ordered allocation, and we own it.
            let _ = unsafe { result::free_async(self.counter, self.home.cu_stream()) };
        } else {
            // SAFETY: as above; allocated with `cuMemAlloc`.
            let _ = unsafe { result::free_sync(self.counter) };
        }
        if let Some(block) = self.block.take() {
            // Every stream that wrote the word is idle.
            self.reuse.give_pinned(block);
        }
    }
}

/// A pooled CUDA event.
///
/// Invariant: `event` is a live event of `ctx`, destroyed only by `Drop`.
pub(super) struct CudaEventBox {
    event: sys::CUevent,
    ctx: Arc<CudaContext>,
    wait: WaitPolicy,
}

// SAFETY: a CUevent handle may be used from any thread of its context; the driver serializes
// operations on it internally, and the runtime gives each event to one ticket at a time.
unsafe impl Send for CudaEventBox {}
// SAFETY: as above; `&CudaEventBox` only exposes record/query/synchronize, which the driver
// allows concurrently.
unsafe impl Sync for CudaEventBox {}

impl CudaEventBox {
    pub(super) fn new(ctx: &Arc<CudaContext>, wait: WaitPolicy) -> Result<Self> {
        bind(ctx)?;
        let mut flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        if wait == WaitPolicy::Block {
            flags |= sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32;
        }
        let mut event: sys::CUevent = std::ptr::null_mut();
        // SAFETY: `event` is a valid out-pointer; the context is current.
        unsafe { sys::cuEventCreate(&mut event, flags) }
            .result()
            .map_err(|e| driver_error("event", e))?;
        Ok(CudaEventBox {
            event,
            ctx: ctx.clone(),
            wait,
        })
    }
}

impl BackendEvent for CudaEventBox {
    fn wait(&self) -> Result<()> {
        match self.wait {
            WaitPolicy::Spin | WaitPolicy::Block => {
                // SAFETY: `event` is live (invariant).
                unsafe { result::event::synchronize(self.event) }
                    .map_err(|e| driver_error("wait", e))
            }
            WaitPolicy::Yield => loop {
                if self.is_complete()? {
                    return Ok(());
                }
                std::thread::yield_now();
            },
        }
    }

    fn is_complete(&self) -> Result<bool> {
        // SAFETY: `event` is live (invariant).
        match unsafe { result::event::query(self.event) } {
            Ok(()) => Ok(true),
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NOT_READY => Ok(false),
            Err(e) => Err(driver_error("query", e)),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for CudaEventBox {
    fn drop(&mut self) {
        if bind(&self.ctx).is_ok() {
            // SAFETY: `event` is live and no longer used (we own it); destroying an event with
            // pending work is allowed (the driver releases it when the work completes).
            let _ = unsafe { result::event::destroy(self.event) };
        }
    }
}

/// Records the work `body` queues on `stream` as a graph, capturing for this thread only
/// (other threads' driver calls go on meanwhile; none may use `stream`). `None` when the
/// capture cannot start, `body` fails, or something it queued cannot be captured: nothing
/// was queued then, and capture has ended, so the stream is usable again either way.
pub(super) fn capture(
    stream: &Arc<CudaStream>,
    body: impl FnOnce() -> Result<()>,
) -> Option<cudarc::driver::CudaGraph> {
    let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    stream.begin_capture(mode).ok()?;
    let queued = body();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    if graph.is_err() {
        abandon_capture(stream);
    }
    match (queued, graph) {
        (Ok(()), Ok(Some(graph))) => Some(graph),
        _ => None,
    }
}

/// Ends a capture that cudarc's `end_capture` may have left open: it returns early, before
/// ending the capture, when its context holds an error recorded by some `Drop` (on any
/// thread). A stream left capturing would swallow everything queued on it later, and keep
/// this thread in capture mode.
fn abandon_capture(stream: &CudaStream) {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: the stream is live (borrowed); the context is current on this thread (the
    // capture began here); `status` is a valid out-pointer.
    let capturing = unsafe { sys::cuStreamIsCapturing(stream.cu_stream(), &mut status) }
        .result()
        .is_ok()
        && status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    if capturing {
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: as above; ending the capture hands back the partial graph (or null), which
        // nothing else references and which is destroyed here.
        unsafe {
            let _ = sys::cuStreamEndCapture(stream.cu_stream(), &mut graph);
            if !graph.is_null() {
                let _ = sys::cuGraphDestroy(graph);
            }
        }
    }
}

/// A CUDA graph recorded on one stream (launched there: cudarc keeps the stream).
pub(super) struct CudaProgram {
    /// Graph calls must be serialized (CUDA's graph thread-safety rules).
    graph: parking_lot::Mutex<cudarc::driver::CudaGraph>,
    /// The stream it was recorded on (its handle, compared only).
    stream: usize,
}

// SAFETY: a graph and its executable may be used from any thread of the context as long as
// calls on them are serialized, which the mutex does; destroying an executable graph that is
// still running is allowed (it is freed once it completes).
unsafe impl Send for CudaProgram {}
// SAFETY: as above: every use goes through the mutex.
unsafe impl Sync for CudaProgram {}

impl BackendProgram for CudaProgram {
    fn as_any(&self) -> &dyn Any {
        self
    }
}
