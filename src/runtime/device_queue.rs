//! `DeviceQueue`: coalescing on the device. With [`crate::CoalescePolicy::Persistent`] and a
//! backend that has a device queue ([`BackendDeviceQueue`], CUDA), an op is published
//! straight to a kernel that stays on the device while work arrives: no launch per op and no
//! host batcher. Concurrent ops from any threads run side by side in that one launch.
//!
//! Promises (the rest of the runtime relies on them):
//! - **Stream order.** An op names as dependencies the previous op of its stream and the
//!   previous queued op on its buffer; the device starts it only after both completed. So ops
//!   of one stream run one after another, in order, and ops on one buffer are never reordered
//!   or run together. Ops of different streams on different buffers run concurrently.
//! - **Buffers.** A buffer with a queued op is used for nothing else (another stream, a copy,
//!   its own drop) until that op completed: [`crate::Buffer`] waits for it first. A buffer
//!   coming from an ordinary stream has that stream synchronized before its first queued op.
//! - **Waiting** costs a memory load per poll. Now and then (every [`CHECK_EVERY`]) a waiter
//!   also asks the device whether the queue failed, so a device fault returns an error instead
//!   of hanging, and restarts the queue's kernel if it left while ops were outstanding.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{BackendBuffer, BackendDeviceQueue, WaitPolicy};
use crate::error::Result;
use crate::kernel::Kernel;

use super::Device;

/// How often a waiter checks the device for faults (and the queue's kernel for an exit).
pub const CHECK_EVERY: Duration = Duration::from_micros(100);

/// Polls a waiter spins before it starts yielding its CPU between polls.
const SPIN_POLLS: u32 = 16;

/// A pool's device queue.
pub(crate) struct DeviceQueue {
    backend: Arc<dyn BackendDeviceQueue>,
    wait: WaitPolicy,
    device_id: u64,
}

impl DeviceQueue {
    /// The device's queue, or `None` where the backend has none.
    pub(crate) fn new(device: &Device) -> Result<Option<Arc<DeviceQueue>>> {
        Ok(device.backend().new_device_queue()?.map(|backend| {
            Arc::new(DeviceQueue {
                backend,
                wait: device.info().wait,
                device_id: device.id(),
            })
        }))
    }

    pub(crate) fn device_id(&self) -> u64 {
        self.device_id
    }

    pub(crate) fn supports(&self, kernel: Kernel) -> bool {
        self.backend.supports(kernel)
    }

    /// Publishes `kernel` over `raw` after ops `after`. See [`BackendDeviceQueue::submit`]
    /// for the caller's duty to keep `raw` alive and otherwise unused until the op completed.
    pub(crate) fn submit(
        &self,
        kernel: Kernel,
        raw: &dyn BackendBuffer,
        after: [u64; 2],
    ) -> Result<u64> {
        self.backend.submit(kernel, raw, after)
    }

    /// True once op `op` completed; the queue's error if the device failed.
    pub(crate) fn poll(&self, op: u64) -> Result<bool> {
        self.backend.is_done(op, true)
    }

    /// Waits until op `op` completed.
    pub(crate) fn wait(&self, op: u64) -> Result<()> {
        let mut polls = 0u32;
        let mut checked = Instant::now();
        loop {
            let check = polls % 64 == 63 && checked.elapsed() >= CHECK_EVERY;
            if check {
                checked = Instant::now();
            }
            if self.backend.is_done(op, check)? {
                return Ok(());
            }
            polls = polls.wrapping_add(1);
            if self.wait == WaitPolicy::Spin && polls < SPIN_POLLS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Waits until every op published so far completed.
    pub(crate) fn synchronize(&self) -> Result<()> {
        let last = self.backend.published();
        // Ops complete out of order: each op still in the window is waited for.
        let first = last.saturating_sub(self.backend.window()).max(1);
        for op in first..=last {
            self.wait(op)?;
        }
        Ok(())
    }

    /// (kernel launches, ops published).
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.backend.launches(), self.backend.published())
    }
}
