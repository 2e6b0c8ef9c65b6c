//! `FillGate`: at most `K` device-filling kernels of one context on the device at once.
//!
//! A kernel whose grid alone fills the device (as many threads as the device holds resident)
//! gains nothing from running beside another such kernel, and many of them side by side lose:
//! light ops (1M elements) from 16 threads, a stream each, ran 180,858 ops/s on the H200,
//! and the same 16 threads over 8 streams (so at most 8 of those kernels at once) 191,400
//! (`bench/results/h200/probe-16t/86ba135/`).
//!
//! **On by default (8 kernels) since it was measured on the H100.** Against no gate, in one call,
//! 4 interleaved rounds (`bench/results/h100/coalesce/bda24fd/choose/`), light at 16 threads
//! ran 1.115 × with a wait per op and 1.092 × with 8 in flight (189,013 and 191,084 ops/s,
//! against 169,480 and 175,055). Every other cell was within 0.997–1.000 × (light at 8
//! threads, default at 16). The rule stated before the call (on if light at 16 threads with a
//! wait per op gains at least 1.02 × and no other cell falls below 0.99 ×) picked it.
//! On the H200 (`bench/results/h200/coalesce/0414dcb/choose/`) the same rule had left it off:
//! 1.020 × and 1.018 × at 16 threads, but 0.985 × at 8 threads with 8 in flight.
//! `MULTIQ_FILL_GATE=0` turns it off.
//!
//! Promises:
//! - **Device-side only.** A gated launch makes its stream wait (`cuStreamWaitEvent`) for
//!   the gated launch `K` before it, of any stream of the context, then records that slot's
//!   event after itself. The host never waits, and stream order is untouched: the gate only
//!   adds dependencies on work queued earlier, so it cannot form a cycle (no hang) and
//!   changes no result.
//! - **Advisory.** If recording a slot's event fails after the kernel was queued, the launch
//!   still succeeded (the kernel runs): the slot keeps its earlier record, which only lets a
//!   later launch start sooner.
//! - `MULTIQ_FILL_GATE=K` sets `K` (default [`DEFAULT_FILL_GATE`]; 0 turns the gate off).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaStream};
use parking_lot::Mutex;

use super::driver_error;
use super::stream::bind;
use crate::error::Result;

/// Device-filling kernels on the device at once, unless `MULTIQ_FILL_GATE` says otherwise
/// (0: no gate; the module doc says how 8 was chosen).
pub const DEFAULT_FILL_GATE: usize = 8;

/// The gate's width from the environment: `Some(K)`, or `None` for off.
pub(super) fn width_from_env() -> Result<Option<usize>> {
    let width = crate::env_knob::read(
        "MULTIQ_FILL_GATE",
        "a whole number of kernels (0: off)",
        |v| v.parse::<usize>().ok(),
    )?;
    Ok(match width.unwrap_or(DEFAULT_FILL_GATE) {
        0 => None,
        k => Some(k),
    })
}

/// One slot: the event recorded after the last gated launch that took it.
///
/// Invariant: `event` is a live event of the gate's context, destroyed only by the gate's
/// `Drop`.
struct Slot {
    event: sys::CUevent,
}

/// The gate of one context.
pub(super) struct FillGate {
    slots: Box<[Mutex<Slot>]>,
    next: AtomicU64,
    /// Elements from which a one-element-per-thread kernel fills the device.
    fills: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: CUevent handles may be used from any thread of their context; each slot's event is
// used under its mutex, and the driver serializes operations on one event internally.
unsafe impl Send for FillGate {}
// SAFETY: as above; all shared mutation goes through the slot mutexes and an atomic.
unsafe impl Sync for FillGate {}

impl FillGate {
    /// A gate of `width` slots for `ctx`, whose kernels fill the device from `fills` elements.
    pub(super) fn new(ctx: &Arc<CudaContext>, width: usize, fills: usize) -> Result<Self> {
        bind(ctx)?;
        let mut gate = FillGate {
            slots: Box::new([]),
            next: AtomicU64::new(0),
            fills,
            ctx: ctx.clone(),
        };
        let mut slots = Vec::with_capacity(width);
        for _ in 0..width {
            let mut event: sys::CUevent = std::ptr::null_mut();
            let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
            // SAFETY: `event` is a valid out-pointer; the context is current.
            let made = unsafe { sys::cuEventCreate(&mut event, flags) }.result();
            if let Err(e) = made {
                // The events made so far are destroyed by the gate's `Drop`.
                gate.slots = slots.into_boxed_slice();
                return Err(driver_error("fill gate", e));
            }
            slots.push(Mutex::new(Slot { event }));
        }
        gate.slots = slots.into_boxed_slice();
        Ok(gate)
    }

    /// Whether a kernel over `elements` elements goes through the gate.
    pub(super) fn applies(&self, elements: usize) -> bool {
        elements >= self.fills
    }

    /// Queues `launch` on `stream` after the gated launch `K` before it; the caller has bound
    /// the context. An error before `launch` ran means nothing was queued.
    pub(super) fn through(
        &self,
        stream: &CudaStream,
        launch: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = self.slots[(i % self.slots.len() as u64) as usize].lock();
        // SAFETY: the slot's event is live (Slot invariant) and the stream is live (borrowed).
        // An event never recorded yet makes the wait a no-op.
        unsafe { sys::cuStreamWaitEvent(stream.cu_stream(), slot.event, 0) }
            .result()
            .map_err(|e| driver_error("fill gate", e))?;
        launch()?;
        // SAFETY: as above. Advisory: a failed record leaves the slot's earlier record.
        let _ = unsafe { sys::cuEventRecord(slot.event, stream.cu_stream()) };
        Ok(())
    }

    /// The gate's width.
    pub(super) fn width(&self) -> usize {
        self.slots.len()
    }
}

impl Drop for FillGate {
    fn drop(&mut self) {
        if bind(&self.ctx).is_ok() {
            for slot in self.slots.iter() {
                // SAFETY: the event is live and no longer used (the gate is going); destroying
                // an event with pending work is allowed (the driver releases it afterwards).
                let _ = unsafe { sys::cuEventDestroy_v2(slot.lock().event) };
            }
        }
    }
}
