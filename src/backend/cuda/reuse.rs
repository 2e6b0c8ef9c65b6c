//! Resources whose release waits for the whole device, kept for reuse instead.
//!
//! Freeing page-locked host memory and destroying a cuBLAS handle (`cublasDestroy` synchronizes
//! the device) wait for every kernel on the device, other pools' included. A pool's device
//! queue keeps its kernel on the device for as long as work arrives, so a pool dropped while
//! another pool's queue is busy would wait for that queue to go idle: for as long as its
//! threads keep submitting. Instead, a signal, a device queue or a stream's cuBLAS state gives
//! them back here once its own streams are idle, and the next one made takes them. They are
//! released only with the last holder of this cache (the device and every pool made on it).
//!
//! Promises:
//! - A block or handle is given back only once no queued work uses it (its giver synchronized
//!   the streams that used it), so whoever takes it may use it at once.
//! - A block taken is zeroed and at least as large as asked.
//! - A giver whose streams failed gives nothing back (the device might still write): it leaks.
//! - What the cache holds is bounded by the most that was ever in use at once (a block is
//!   reused for requests down to half its size); it is released with the device. A cuBLAS kit
//!   holds its stream's workspace (32 MiB on Hopper), so a pool of many streams doing products
//!   leaves that much reserved for the next pool.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::sys as cb;
use cudarc::cublaslt::sys as lt;
use cudarc::driver::{result, sys, CudaContext};
use parking_lot::Mutex;

use super::driver_error;
use super::stream::bind;
use crate::error::{Error, Result};

/// Page-locked blocks are handed out in whole pages.
const PAGE: usize = 4096;

/// A block of page-locked host memory mapped into the device's address space.
///
/// Invariant: `host` is a live `cuMemHostAlloc(DEVICEMAP | PORTABLE)` allocation of `bytes`
/// bytes of the cache's context, page-aligned, whose device alias is `device`; it is freed only
/// by the cache's `Drop`.
pub(super) struct PinnedBlock {
    host: std::ptr::NonNull<u8>,
    device: sys::CUdeviceptr,
    bytes: usize,
}

impl PinnedBlock {
    /// The block's host address (page-aligned).
    pub(super) fn host(&self) -> std::ptr::NonNull<u8> {
        self.host
    }

    /// The block's address on the device.
    pub(super) fn device(&self) -> sys::CUdeviceptr {
        self.device
    }

    /// The block's size in bytes (a whole number of pages, at least what was asked).
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A cuBLAS handle, a cuBLASLt handle and the workspace a stream's products use.
///
/// Invariant: both handles are live and `workspace` is a live device allocation of
/// `workspace_bytes` of the cache's context; `handle`'s math mode is `math`.
pub(super) struct BlasKit {
    pub(super) handle: cb::cublasHandle_t,
    pub(super) lt: lt::cublasLtHandle_t,
    pub(super) workspace: sys::CUdeviceptr,
    pub(super) workspace_bytes: usize,
    pub(super) math: crate::backend::Precision,
}

/// The cache of one CUDA context.
pub(super) struct Reuse {
    ctx: Arc<CudaContext>,
    /// Blocks given back, by size.
    pinned: Mutex<BTreeMap<usize, Vec<PinnedBlock>>>,
    blas: Mutex<Vec<BlasKit>>,
}

// SAFETY: the blocks are plain page-locked memory and the handles and device pointers may be
// used from any thread of their context; the cache only moves them between owners, under its
// mutexes, and whoever holds one uses it alone.
unsafe impl Send for Reuse {}
// SAFETY: as above: every access to what the cache holds goes through its mutexes.
unsafe impl Sync for Reuse {}
// SAFETY: a block is owned by one holder at a time (the cache or one signal or queue).
unsafe impl Send for PinnedBlock {}
// SAFETY: a kit is owned by one holder at a time (the cache or one stream's state).
unsafe impl Send for BlasKit {}

impl Reuse {
    pub(super) fn new(ctx: &Arc<CudaContext>) -> Self {
        Reuse {
            ctx: ctx.clone(),
            pinned: Mutex::new(BTreeMap::new()),
            blas: Mutex::new(Vec::new()),
        }
    }

    /// A zeroed block of at least `bytes` bytes: the smallest given back earlier that is no
    /// more than twice as large, or a new one.
    pub(super) fn take_pinned(&self, bytes: usize) -> Result<PinnedBlock> {
        let bytes = bytes.max(1).next_multiple_of(PAGE);
        let cached = self
            .pinned
            .lock()
            .range_mut(bytes..=bytes.saturating_mul(2))
            .find_map(|(_, blocks)| blocks.pop());
        let block = match cached {
            Some(b) => b,
            None => self.alloc_pinned(bytes)?,
        };
        // SAFETY: the block is live and `bytes` long (invariant), and nothing else uses it: it
        // was either just made or given back after its last user's streams were idle.
        unsafe { std::ptr::write_bytes(block.host.as_ptr(), 0, block.bytes) };
        Ok(block)
    }

    fn alloc_pinned(&self, bytes: usize) -> Result<PinnedBlock> {
        bind(&self.ctx)?;
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the context is current; the allocation is ours until the cache frees it.
        let host = unsafe { result::malloc_host(bytes, flags) }
            .map_err(|e| driver_error("page-locked alloc", e))?;
        let Some(host) = std::ptr::NonNull::new(host.cast::<u8>()) else {
            return Err(Error::Device {
                op: "page-locked alloc",
                message: "cuMemHostAlloc returned null".into(),
            });
        };
        let mut device: sys::CUdeviceptr = 0;
        // SAFETY: `host` is a mapped page-locked allocation of this context; out-pointer valid.
        let mapped =
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device, host.as_ptr().cast(), 0) }
                .result();
        if let Err(e) = mapped {
            // SAFETY: just allocated, never shared with the device.
            let _ = unsafe { result::free_host(host.as_ptr().cast()) };
            return Err(driver_error("page-locked alloc", e));
        }
        Ok(PinnedBlock {
            host,
            device,
            bytes,
        })
    }

    /// Takes `block` back. The caller guarantees that no queued work uses it.
    pub(super) fn give_pinned(&self, block: PinnedBlock) {
        self.pinned
            .lock()
            .entry(block.bytes)
            .or_default()
            .push(block);
    }

    /// A cuBLAS kit given back earlier, if any.
    pub(super) fn take_blas(&self) -> Option<BlasKit> {
        self.blas.lock().pop()
    }

    /// Takes `kit` back. The caller guarantees that no queued work uses its handles or
    /// workspace. Its handle is pointed at the null stream (the stream it was bound to may be
    /// destroyed before the kit is used again); the taker binds it to its own.
    pub(super) fn give_blas(&self, kit: BlasKit) {
        if bind(&self.ctx).is_err() {
            return; // the context failed: leak the kit rather than keep it for reuse
        }
        // SAFETY: `handle` is live (kit invariant); the null stream always exists.
        if unsafe { cb::cublasSetStream_v2(kit.handle, std::ptr::null_mut()) }
            .result()
            .is_err()
        {
            return;
        }
        self.blas.lock().push(kit);
    }
}

impl Drop for Reuse {
    fn drop(&mut self) {
        if bind(&self.ctx).is_err() {
            return; // the context is gone: so is what it allocated
        }
        for block in std::mem::take(self.pinned.get_mut())
            .into_values()
            .flatten()
        {
            // SAFETY: the block is live and unused (given back after its streams were idle),
            // and the cache owns it.
            let _ = unsafe { result::free_host(block.host.as_ptr().cast::<c_void>()) };
        }
        for kit in self.blas.get_mut().drain(..) {
            // SAFETY: the handles and workspace are live and unused (kit invariant; given back
            // after their stream was idle), and the cache owns them.
            unsafe {
                let _ = lt::cublasLtDestroy(kit.lt);
                let _ = cb::cublasDestroy_v2(kit.handle);
                let _ = result::free_sync(kit.workspace);
            }
        }
    }
}
