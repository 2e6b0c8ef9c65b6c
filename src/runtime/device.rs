//! `Device` (a cheap, clonable handle to an opened backend) and `Buffer` (device memory that
//! follows the ownership rules in the module above).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::coalescer::{Batch, SharedRaw};
use super::device_queue::DeviceQueue;
use super::live::{Kind, LiveToken};
use crate::backend::{self, Backend, BackendBuffer, BackendStream, DeviceInfo, DeviceOptions};
use crate::error::{Error, Result};

static NEXT_DEVICE_ID: AtomicU64 = AtomicU64::new(1);

/// An opened device. Clones share it; it closes when the last clone, pool, stream and buffer
/// using it are gone.
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
}

struct DeviceInner {
    id: u64,
    backend: Arc<dyn Backend>,
    info: DeviceInfo,
    fallback: Option<String>,
    /// A stream for copies of buffers that no stream has touched yet; created on first use.
    copy_stream: Mutex<Option<Arc<dyn BackendStream>>>,
    _live: LiveToken,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.inner.info.name)
            .finish()
    }
}

impl Device {
    /// Opens the device `opts` asks for (auto: CUDA if present, else CPU).
    pub fn open(opts: &DeviceOptions) -> Result<Device> {
        let (backend, fallback) = backend::open(opts)?;
        let info = backend.info();
        Ok(Device {
            inner: Arc::new(DeviceInner {
                id: NEXT_DEVICE_ID.fetch_add(1, Ordering::Relaxed),
                backend,
                info,
                fallback,
                copy_stream: Mutex::new(None),
                _live: LiveToken::new(Kind::Device),
            }),
        })
    }

    /// Opens a CPU device with `units` execution units.
    pub fn cpu(units: usize) -> Result<Device> {
        Device::open(&DeviceOptions {
            backend: Some(backend::BackendKind::Cpu),
            cpu_units: Some(units),
            ..Default::default()
        })
    }

    /// Facts about the device.
    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// When opened with backend auto and CUDA could not be used: why.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.inner.fallback.as_deref()
    }

    pub(crate) fn backend(&self) -> &dyn Backend {
        &*self.inner.backend
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    /// Allocates a buffer of `len` f32 elements, zero-filled where the backend does so.
    pub fn alloc(&self, len: usize) -> Result<Buffer> {
        if len == 0 {
            return Err(Error::invalid("a buffer must hold at least one element"));
        }
        if len > self.backend().max_elements() {
            return Err(Error::invalid(format!(
                "{len} elements exceed the {} a kernel on {} can index",
                self.backend().max_elements(),
                self.info().name
            )));
        }
        let raw = self.backend().alloc(len)?;
        Ok(Buffer {
            raw: Some(Arc::new(raw)),
            len,
            device: self.clone(),
            last: None,
            coalesced: None,
            _live: LiveToken::new(Kind::Buffer),
            queued: None,
        })
    }

    /// Allocates a buffer holding a copy of `data`.
    pub fn buffer_from(&self, data: &[f32]) -> Result<Buffer> {
        let mut buf = self.alloc(data.len())?;
        buf.write(data)?;
        Ok(buf)
    }

    /// Waits until all work queued on every stream of this device has completed. Ops still
    /// pending in a pool's coalescer (gathered, not yet launched) are not queued work yet:
    /// [`crate::StreamPool::synchronize`] launches them first, then waits.
    pub fn synchronize(&self) -> Result<()> {
        self.backend().synchronize()
    }

    /// Bytes that can still be allocated, where the backend knows.
    pub fn memory_available(&self) -> Option<u64> {
        self.backend().memory_available()
    }

    fn copy_stream(&self) -> Result<Arc<dyn BackendStream>> {
        let mut slot = self.inner.copy_stream.lock();
        if let Some(s) = &*slot {
            return Ok(s.clone());
        }
        let s = self.backend().new_stream()?;
        *slot = Some(s.clone());
        Ok(s)
    }
}

/// Device memory holding f32 elements. See the ownership rules in [`crate::runtime`].
pub struct Buffer {
    /// Always `Some` until `Drop` hands it to the last stream. Shared only with a pending
    /// coalesced op (see `coalesced`).
    raw: Option<SharedRaw>,
    len: usize,
    device: Device,
    /// The last stream work on this buffer was queued on.
    last: Option<Arc<dyn BackendStream>>,
    /// The coalesced batch of the last op on this buffer, which may not be launched yet.
    coalesced: Option<Arc<Batch>>,
    _live: LiveToken,
    /// The last op published on this buffer to a device queue, which may not have completed:
    /// the buffer is used for nothing else until it has.
    queued: Option<(Arc<DeviceQueue>, u64)>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer").field("len", &self.len).finish()
    }
}

fn same_stream(a: &Arc<dyn BackendStream>, b: &Arc<dyn BackendStream>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl Buffer {
    /// Number of f32 elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: buffers hold at least one element.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The device this buffer lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn raw(&self) -> &dyn BackendBuffer {
        &***self
            .raw
            .as_ref()
            .expect("a live Buffer always holds its storage")
    }

    pub(crate) fn shared_raw(&self) -> SharedRaw {
        self.raw
            .clone()
            .expect("a live Buffer always holds its storage")
    }

    /// Records the coalesced batch of the op just submitted on this buffer.
    pub(crate) fn set_coalesced(&mut self, batch: Arc<Batch>) {
        self.coalesced = Some(batch);
    }

    /// Records the device-queue op just published on this buffer.
    pub(crate) fn set_queued(&mut self, queue: &Arc<DeviceQueue>, op: u64) {
        match &mut self.queued {
            // The same queue again (the common case): no new reference to count.
            Some((q, last)) if Arc::ptr_eq(q, queue) => *last = op,
            queued => *queued = Some((queue.clone(), op)),
        }
    }

    /// Waits for this buffer's device-queue op, if any, before any other use of it.
    fn finish_queued(&mut self) -> Result<()> {
        if let Some((queue, op)) = &self.queued {
            queue.wait(*op)?;
            self.queued = None;
        }
        Ok(())
    }

    /// Prepares the buffer for an op on device queue `queue`; returns the op it must run
    /// after (0: none). Work queued on an ordinary stream is waited for first (the queue's
    /// kernel is not ordered with streams), as is an op on another queue.
    pub(crate) fn bind_queue(&mut self, queue: &Arc<DeviceQueue>) -> Result<u64> {
        if queue.device_id() != self.device.id() {
            return Err(Error::WrongDevice { what: "buffer" });
        }
        self.flush();
        if let Some(last) = &self.last {
            last.synchronize()?;
            self.last = None;
        }
        match &self.queued {
            Some((q, op)) if Arc::ptr_eq(q, queue) => Ok(*op),
            Some(_) => {
                self.finish_queued()?;
                Ok(0)
            }
            None => Ok(0),
        }
    }

    /// Launches this buffer's pending coalesced op, if any, before any other use of it.
    fn flush(&mut self) {
        if let Some(b) = self.coalesced.take() {
            b.ensure_launched();
        }
    }

    /// Makes `stream` the buffer's stream for the next piece of work: checks the device and,
    /// when the buffer moves between streams, waits for the previous one (rule 2).
    pub(crate) fn bind(&mut self, device_id: u64, stream: &Arc<dyn BackendStream>) -> Result<()> {
        if device_id != self.device.id() {
            return Err(Error::WrongDevice { what: "buffer" });
        }
        self.finish_queued()?;
        if self
            .last
            .as_ref()
            .is_some_and(|last| !same_stream(last, stream))
        {
            self.flush();
        }
        match &self.last {
            Some(last) if same_stream(last, stream) => {}
            Some(last) => {
                last.synchronize()?;
                self.last = Some(stream.clone());
            }
            None => self.last = Some(stream.clone()),
        }
        Ok(())
    }

    /// Prepares the buffer for work on a stream the caller will pick later: launches its
    /// pending coalesced op and, unless its last stream is one `known_idle` vouches for (all
    /// work on the buffer there is known complete), waits for that stream (rule 2).
    pub(crate) fn settle(
        &mut self,
        device_id: u64,
        known_idle: impl Fn(&Arc<dyn BackendStream>) -> bool,
    ) -> Result<()> {
        if device_id != self.device.id() {
            return Err(Error::WrongDevice { what: "buffer" });
        }
        self.finish_queued()?;
        self.flush();
        match &self.last {
            Some(last) if !known_idle(last) => last.synchronize(),
            _ => Ok(()),
        }
    }

    /// Records `stream` as the buffer's last stream after work on it that the caller saw
    /// complete (see [`Buffer::settle`]).
    pub(crate) fn set_last(&mut self, stream: Arc<dyn BackendStream>) {
        self.last = Some(stream);
    }

    fn stream_for_copy(&mut self) -> Result<Arc<dyn BackendStream>> {
        self.finish_queued()?;
        self.flush();
        match &self.last {
            Some(s) => Ok(s.clone()),
            None => {
                let s = self.device.copy_stream()?;
                self.last = Some(s.clone());
                Ok(s)
            }
        }
    }

    /// Overwrites the buffer with `data` (same length), after all work queued on it.
    pub fn write(&mut self, data: &[f32]) -> Result<()> {
        if data.len() != self.len {
            return Err(Error::invalid(format!(
                "cannot write {} elements into a buffer of {}",
                data.len(),
                self.len
            )));
        }
        let stream = self.stream_for_copy()?;
        stream.upload(self.raw(), data)
    }

    /// Reads the buffer back, after all work queued on it (rule 4).
    pub fn read(&mut self) -> Result<Vec<f32>> {
        let stream = self.stream_for_copy()?;
        let mut out = vec![0.0f32; self.len];
        stream.download(self.raw(), &mut out)?;
        Ok(out)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // A pending coalesced op must be queued, and a device-queue op finished, before the
        // storage is handed back. If the wait for a device-queue op failed, the op may still
        // be published (a failed relaunch need not be sticky, and the next launch would run
        // it), so the storage is leaked rather than freed under it; the error is the owner's
        // to see elsewhere.
        if self.finish_queued().is_err() {
            if let Some(raw) = self.raw.take() {
                std::mem::forget(raw);
            }
            return;
        }
        self.flush();
        if let Some(raw) = self.raw.take() {
            match (Arc::try_unwrap(raw), &self.last) {
                // Rule 3: freed after the work already queued on its last stream.
                (Ok(raw), Some(stream)) => stream.free_after(raw),
                (Ok(raw), None) => drop(raw),
                // Still shared (cannot happen after the flush): the last holder frees it.
                (Err(shared), _) => drop(shared),
            }
        }
    }
}
