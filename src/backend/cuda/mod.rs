//! CUDA backend: NVIDIA GPUs through the driver API (cudarc, loaded at run time).
//!
//! - Libraries are probed before first use (cudarc panics when one is missing; multiq returns
//!   [`Error::BackendUnavailable`] naming it).
//! - Kernels are CUDA C compiled by NVRTC with fast math, once per device per process
//!   (`kernels`).
//! - Streams are non-blocking CUDA streams. cudarc's automatic event tracking is disabled
//!   before any stream exists: multiq never hands cudarc a `CudaSlice`, it owns raw device
//!   allocations and orders them explicitly by the runtime's ownership rules (a buffer is
//!   freed with `cuMemFreeAsync` on the last stream that used it; moving a buffer between
//!   streams synchronizes the old one first).
//! - No lock is taken inside this backend: the CUDA driver is thread-safe, and the runtime
//!   decides which submissions are serialized.
//! - Waiting: `spin` and `block` use `cuEventSynchronize` on events made without / with
//!   `CU_EVENT_BLOCKING_SYNC` (the context's scheduling flags are left alone: they belong to
//!   the whole process); `yield` polls `cuEventQuery` and yields between polls.

mod blas;
mod fill_gate;
mod kernels;
mod queue;
mod reuse;
mod skinny;
mod stream;

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaStream, DriverError};

use super::{Backend, BackendBuffer, BackendEvent, BackendKind, BackendStream};
use super::{BackendDeviceQueue, BackendSignal, DeviceInfo, DeviceOptions, WaitPolicy};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use stream::{CudaBuffer, CudaEventBox, CudaQueue, CudaSignal};

/// Largest buffer (elements): the kernels index with 32-bit unsigned integers.
pub const MAX_ELEMENTS: usize = u32::MAX as usize;

/// Largest absolute difference from the host reference for `simple_compute` results: the GPU
/// uses fast-math `__sinf`/`__cosf` (absolute error about 2^-21 each) and may fuse the
/// multiply-add; the iteration converges towards pi/2, which damps the differences.
pub const SIMPLE_COMPUTE_TOLERANCE: f32 = 1e-3;

/// Wait policy used when none is asked for (chosen by measurement: see bench/results/h100).
pub const DEFAULT_WAIT: WaitPolicy = WaitPolicy::Spin;

/// An opened CUDA device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    alloc_stream: Arc<CudaStream>,
    kernels: Arc<kernels::Kernels>,
    info: DeviceInfo,
    wait: WaitPolicy,
    /// How device queues split and chain ops ([`DeviceOptions::queue_chain`]).
    queue: queue::QueueSettings,
    /// Device-filling kernels on the device at once, shared by every stream ([`fill_gate`]).
    gate: Option<Arc<fill_gate::FillGate>>,
    /// Page-locked blocks and cuBLAS handles kept for reuse: releasing them would wait for the
    /// whole device ([`reuse`]).
    reuse: Arc<reuse::Reuse>,
    /// Raised after every kernel queued on the device; device queues leave for it (one per GPU
    /// in the process).
    queue_yield: Arc<queue::QueueYield>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.info.name)
            .finish()
    }
}

pub(crate) fn driver_error(op: &'static str, e: DriverError) -> Error {
    if e.0 == sys::CUresult::CUDA_ERROR_DEINITIALIZED {
        return Error::DeviceShutDown { op };
    }
    // The driver's own name and text; where it cannot give them (an unknown code, or a
    // driver on its way down), the code's name as cudarc spells it.
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let message = match e.error_string() {
        Ok(text) => format!("{name}: {}", text.to_string_lossy()),
        Err(_) => name,
    };
    Error::Device { op, message }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: BackendKind::Cuda,
        reason: reason.into(),
    }
}

impl CudaBackend {
    /// Opens device `opts.ordinal`, or explains why CUDA cannot be used here.
    pub(crate) fn new(opts: &DeviceOptions) -> Result<Self> {
        // SAFETY: `is_culib_present` only tries to dlopen the candidate library names and
        // closes what it opened; it calls no CUDA function.
        if !unsafe { sys::is_culib_present() } {
            return Err(unavailable(
                "the NVIDIA driver library (libcuda.so) was not found; is an NVIDIA driver installed?",
            ));
        }
        // SAFETY: as above, for the NVRTC library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(unavailable(
                "the NVRTC library (libnvrtc.so, CUDA toolkit) was not found; it compiles multiq's kernels",
            ));
        }
        // cudarc panics on a missing symbol; contain that as an error.
        std::panic::catch_unwind(|| Self::open(opts)).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the CUDA libraries could not be loaded".into());
            Err(unavailable(msg))
        })
    }

    fn open(opts: &DeviceOptions) -> Result<Self> {
        let count = CudaContext::device_count()
            .map_err(|e| unavailable(driver_error("init", e).to_string()))?;
        if count <= 0 {
            return Err(unavailable("the driver reports no CUDA device"));
        }
        if opts.ordinal >= count as usize {
            return Err(unavailable(format!(
                "device {} asked for, but only {count} CUDA device(s) exist",
                opts.ordinal
            )));
        }
        let ctx = CudaContext::new(opts.ordinal).map_err(|e| driver_error("open", e))?;
        // SAFETY: disabling tracking before any stream exists avoids cudarc's hidden
        // synchronizations; multiq never passes cudarc a `CudaSlice`, and orders its own raw
        // allocations by the runtime's ownership rules (see the module doc).
        unsafe { ctx.disable_event_tracking() };
        let alloc_stream = ctx.new_stream().map_err(|e| driver_error("stream", e))?;
        let kernels = kernels::for_device(&ctx, opts.ordinal)?;
        let wait = opts.wait.unwrap_or(DEFAULT_WAIT);
        let queue = queue::QueueSettings::new(opts.queue_chain)?;
        let mut info = device_info(&ctx, wait)?;
        info.extra.extend(queue.describe());
        let gate = match fill_gate::width_from_env()? {
            Some(width) => {
                let per_sm = ctx
                    .attribute(
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR,
                    )
                    .map_err(|e| driver_error("info", e))?
                    .max(1) as usize;
                let fills = per_sm * kernels.multiprocessors as usize;
                Some(Arc::new(fill_gate::FillGate::new(&ctx, width, fills)?))
            }
            None => None,
        };
        info.extra.push((
            "fill_gate".into(),
            gate.as_ref()
                .map_or("off".into(), |g| format!("{} kernels", g.width())),
        ));
        let reuse = Arc::new(reuse::Reuse::new(&ctx));
        Ok(CudaBackend {
            queue_yield: queue::QueueYield::for_device(opts.ordinal, &reuse)?,
            reuse,
            ctx,
            alloc_stream,
            kernels,
            info,
            wait,
            queue,
            gate,
        })
    }
}

fn device_info(ctx: &Arc<CudaContext>, wait: WaitPolicy) -> Result<DeviceInfo> {
    let name = ctx.name().map_err(|e| driver_error("info", e))?;
    let units = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| driver_error("info", e))? as usize;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| driver_error("info", e))?;
    let total = ctx.total_mem().ok().map(|m| m as u64);
    let mut version = 0i32;
    // SAFETY: `version` is a valid, writable c_int for the duration of the call.
    let driver = unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .ok()
        .map(|()| {
            format!(
                "CUDA driver API {}.{}",
                version / 1000,
                (version % 1000) / 10
            )
        });
    let connections = std::env::var("CUDA_DEVICE_MAX_CONNECTIONS")
        .unwrap_or_else(|_| "unset (driver default 8)".into());
    Ok(DeviceInfo {
        backend: BackendKind::Cuda,
        name,
        units,
        memory_bytes: total,
        driver,
        wait,
        extra: vec![
            ("compute_capability".into(), format!("{major}.{minor}")),
            ("CUDA_DEVICE_MAX_CONNECTIONS".into(), connections),
        ],
    })
}

impl Backend for CudaBackend {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn alloc(&self, len: usize) -> Result<Box<dyn BackendBuffer>> {
        Ok(Box::new(CudaBuffer::alloc(
            &self.ctx,
            &self.alloc_stream,
            len,
            &self.info.name,
        )?))
    }

    fn alloc_host(&self, len: usize) -> Result<Box<dyn BackendBuffer>> {
        Ok(Box::new(CudaBuffer::alloc_host(
            &self.ctx,
            len,
            &self.info.name,
        )?))
    }

    fn new_stream(&self) -> Result<Arc<dyn BackendStream>> {
        let stream = self
            .ctx
            .new_stream()
            .map_err(|e| driver_error("stream", e))?;
        Ok(Arc::new(CudaQueue::new(
            stream,
            self.kernels.clone(),
            self.gate.clone(),
            self.reuse.clone(),
            self.queue_yield.clone(),
        )))
    }

    fn new_event(&self) -> Result<Box<dyn BackendEvent>> {
        Ok(Box::new(CudaEventBox::new(&self.ctx, self.wait)?))
    }

    fn new_signal(&self) -> Result<Option<Arc<dyn BackendSignal>>> {
        let attr = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS;
        if self.ctx.attribute(attr).unwrap_or(0) != 1 {
            return Ok(None);
        }
        // cudarc panics when the driver lacks a symbol: treat that as "no signals".
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            CudaSignal::new(
                &self.ctx,
                &self.alloc_stream,
                &self.reuse,
                &self.queue_yield,
            )
        }));
        match made {
            Ok(Ok(signal)) => Ok(Some(Arc::new(signal))),
            Ok(Err(_)) | Err(_) => Ok(None),
        }
    }

    fn new_device_queue(&self) -> Result<Option<Arc<dyn BackendDeviceQueue>>> {
        let queue = queue::CudaDeviceQueue::new(
            &self.ctx,
            self.kernels.simple_compute_queue.clone(),
            self.kernels.multiprocessors,
            self.queue,
            &self.reuse,
            &self.queue_yield,
        )?;
        Ok(Some(Arc::new(queue)))
    }

    fn synchronize(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(|e| driver_error("synchronize", e))
    }

    fn memory_available(&self) -> Option<u64> {
        self.ctx.mem_get_info().ok().map(|(free, _)| free as u64)
    }

    fn max_elements(&self) -> usize {
        MAX_ELEMENTS
    }

    fn tolerance(&self, kernel: Kernel) -> f32 {
        match kernel {
            Kernel::SimpleCompute { .. } => SIMPLE_COMPUTE_TOLERANCE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_shut_down_by_process_exit_is_its_own_error() {
        // Needs no driver: the code is recognised before anything asks libcuda for names.
        let e = driver_error("bind", DriverError(sys::CUresult::CUDA_ERROR_DEINITIALIZED));
        assert!(matches!(e, Error::DeviceShutDown { op: "bind" }), "{e:?}");
        assert!(e.to_string().contains("process is exiting"), "{e}");
        assert!(!e.is_usage());
    }

    /// Page-locked host buffers and copy kernels (skips without a CUDA device).
    #[test]
    fn staged_copies_round_trip() {
        match CudaBackend::new(&DeviceOptions::default()) {
            Ok(b) => crate::backend::check_staged_copies(&b),
            Err(e) => eprintln!("SKIPPED staged_copies_round_trip: no CUDA device ({e})"),
        }
    }

    /// Products whose sizes overflow are refused (skips without a CUDA device).
    #[test]
    fn products_whose_sizes_overflow_are_refused() {
        match CudaBackend::new(&DeviceOptions::default()) {
            Ok(b) => crate::backend::check_overflowing_products(&b),
            Err(e) => eprintln!("SKIPPED overflowing products: no CUDA device ({e})"),
        }
    }

    /// Chained small products, programmatic launches included (skips without a CUDA device).
    #[test]
    fn chained_products_read_what_was_just_written() {
        match CudaBackend::new(&DeviceOptions::default()) {
            Ok(b) => crate::backend::check_chained_products(&b),
            Err(e) => eprintln!("SKIPPED chained_products: no CUDA device ({e})"),
        }
    }
}
