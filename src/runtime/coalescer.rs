//! `Coalescer`: concurrent compatible ops from many threads, merged into one launch.
//!
//! An op coalesces when its kernel is element-wise and in place over one buffer
//! (`simple_compute`): ops with the same kernel and parameters on distinct buffers can run as
//! one grouped launch (`BackendStream::launch_grouped`), each buffer's result bit-identical to
//! launching it alone.
//!
//! Threads keep calling [`crate::Stream::launch`]; with coalescing on, the op joins the pool's
//! *pending batch* instead of being launched. The pending batch is launched on the pool's batch
//! stream:
//! - at once when the device is idle (no batch in flight): an idle device never waits;
//! - when it holds `max_batch` ops (fixed policy) or the adaptive target;
//! - when its oldest op has waited `max_delay` (checked by that batch's waiters and by every
//!   submission).
//!
//! Ordering: batches run in launch order on one stream. A batch holds at most one op per
//! submitting stream and per buffer (a second one first launches the pending batch), so ops of
//! one thread on one stream keep their order, each complete before the next runs, and ops on
//! one buffer are never reordered or run together.
//!
//! Completion: one waiter per batch waits on the batch's event; completion of a batch implies
//! completion of every batch launched before it. Errors of a batch (launch or device) go to
//! every op in it; the next batch proceeds.
//!
//! Lifetimes: a pending op holds a reference to its buffer's storage, and a buffer flushes its
//! pending batch before any other use (another stream, a read, a drop), so storage is never
//! freed before the launch that uses it is queued.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::event_pool::EventPool;
use super::Device;
use crate::backend::{BackendBuffer, BackendEvent, BackendStream, WaitPolicy};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::sync::combiner::Combiner;

/// How a pool merges ops from different threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoalescePolicy {
    /// One launch per op.
    Off,
    /// Launch when `max_batch` ops wait, when the oldest waited `max_delay`, or at once when
    /// the device is idle.
    Fixed {
        /// Ops per launch at most.
        max_batch: usize,
        /// Longest an op waits for others.
        max_delay: Duration,
    },
    /// As `Fixed`, with the batch target chosen by AIMD: grown by one while throughput rises
    /// and batch latency stays under `latency_target`, cut by a quarter otherwise.
    Adaptive {
        /// Ops per launch at most.
        max_batch: usize,
        /// Longest an op waits for others.
        max_delay: Duration,
        /// Batch latency (launch to completion) to stay under.
        latency_target: Duration,
    },
}

impl CoalescePolicy {
    /// The name used on the command line and in results.
    pub fn name(&self) -> &'static str {
        match self {
            CoalescePolicy::Off => "off",
            CoalescePolicy::Fixed { .. } => "fixed",
            CoalescePolicy::Adaptive { .. } => "adaptive",
        }
    }

    fn limits(&self) -> (usize, Duration) {
        match *self {
            CoalescePolicy::Off => (1, Duration::ZERO),
            CoalescePolicy::Fixed {
                max_batch,
                max_delay,
            }
            | CoalescePolicy::Adaptive {
                max_batch,
                max_delay,
                ..
            } => (max_batch.max(1), max_delay),
        }
    }
}

const PENDING: u8 = 0;
const LAUNCHED: u8 = 1;
const DONE: u8 = 2;

/// Raw storage of a buffer, shared between the buffer and a pending op.
pub(crate) type SharedRaw = Arc<Box<dyn BackendBuffer>>;

/// A group of ops launched together.
pub(crate) struct Batch {
    kernel: Kernel,
    coalescer: Weak<CoalescerShared>,
    /// Buffers of the ops (until launch) and the submitting streams' ids.
    members: Mutex<(Vec<SharedRaw>, Vec<usize>)>,
    state: AtomicU8,
    /// Recorded after the launch; given back to the pool when the batch is done. Held by the
    /// one syncing waiter while it waits (others only `try_lock` it).
    event: Mutex<Option<Box<dyn BackendEvent>>>,
    error: OnceLock<String>,
    first_submit: Instant,
    launched_at: OnceLock<Instant>,
    syncing: AtomicBool,
}

impl Batch {
    pub(crate) fn is_done(&self) -> bool {
        self.state.load(Ordering::Acquire) == DONE
    }

    fn result(&self) -> Result<()> {
        match self.error.get() {
            Some(message) => Err(Error::Device {
                op: "coalesced launch",
                message: message.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Launches this batch if it is still pending (a buffer in it is about to be used
    /// otherwise).
    pub(crate) fn ensure_launched(self: &Arc<Self>) {
        if self.state.load(Ordering::Acquire) != PENDING {
            return;
        }
        if let Some(c) = self.coalescer.upgrade() {
            // The request is served by whoever holds the launch lock; wait until it has.
            c.launch_pending();
            while self.state.load(Ordering::Acquire) == PENDING {
                std::thread::yield_now();
                c.launch_pending();
            }
        }
    }
}

struct State {
    pending: Option<Arc<Batch>>,
    in_flight: VecDeque<Arc<Batch>>,
    /// Current batch target (adaptive; = max_batch for fixed).
    target: usize,
    window: AimdWindow,
}

#[derive(Default)]
struct AimdWindow {
    batches: u32,
    ops: u64,
    started: Option<Instant>,
    worst_latency: Duration,
    last_rate: f64,
}

/// The pool's coalescer.
pub(crate) struct CoalescerShared {
    device: Device,
    stream: Arc<dyn BackendStream>,
    events: EventPool,
    policy: CoalescePolicy,
    state: Mutex<State>,
    /// Serializes launches (so batches reach the stream in the order they left `pending`)
    /// without blocking anyone: see `sync::combiner`. The state lock is never held across a
    /// launch.
    launcher: Combiner,
    /// Batches launched and ops in them, for statistics.
    launched: (AtomicU64, AtomicU64),
    /// `state.in_flight.len()`, readable without the lock by spinning waiters.
    in_flight: AtomicUsize,
    /// Notified at every launch and every completion.
    done: Condvar,
    wait: WaitPolicy,
}

impl CoalescerShared {
    pub(crate) fn new(device: &Device, policy: CoalescePolicy) -> Result<Arc<Self>> {
        let (max_batch, _) = policy.limits();
        if max_batch == 0 || max_batch > 4096 {
            return Err(Error::invalid("max batch must be between 1 and 4096"));
        }
        let target = match policy {
            CoalescePolicy::Adaptive { .. } => 2.min(max_batch),
            _ => max_batch,
        };
        Ok(Arc::new(CoalescerShared {
            device: device.clone(),
            stream: device.backend().new_stream()?,
            events: EventPool::new(),
            policy,
            state: Mutex::new(State {
                pending: None,
                in_flight: VecDeque::new(),
                target,
                window: AimdWindow::default(),
            }),
            launcher: Combiner::new(),
            launched: (AtomicU64::new(0), AtomicU64::new(0)),
            in_flight: AtomicUsize::new(0),
            done: Condvar::new(),
            wait: device.info().wait,
        }))
    }

    /// (batches launched, ops in them) so far.
    pub(crate) fn stats(&self) -> (u64, u64) {
        (
            self.launched.0.load(Ordering::Relaxed),
            self.launched.1.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn stream(&self) -> &Arc<dyn BackendStream> {
        &self.stream
    }

    /// Adds one op (kernel over `raw`, from stream `stream_id`) and returns its batch.
    pub(crate) fn submit(
        self: &Arc<Self>,
        kernel: Kernel,
        raw: SharedRaw,
        stream_id: usize,
    ) -> Result<Arc<Batch>> {
        let (_, max_delay) = self.policy.limits();
        loop {
            let mut st = self.state.lock();
            if let Some(p) = &st.pending {
                let conflict = {
                    let m = p.members.lock();
                    p.kernel != kernel
                        || m.1.contains(&stream_id)
                        || m.0.iter().any(|r| Arc::ptr_eq(r, &raw))
                };
                if conflict {
                    // Same stream, same buffer or another kernel: the pending batch goes first.
                    drop(st);
                    self.launch_pending();
                    continue;
                }
            }
            let batch = st
                .pending
                .get_or_insert_with(|| self.new_batch(kernel))
                .clone();
            let len = {
                let mut m = batch.members.lock();
                m.0.push(raw);
                m.1.push(stream_id);
                m.0.len()
            };
            let due = st.in_flight.is_empty()
                || len >= st.target
                || batch.first_submit.elapsed() >= max_delay;
            drop(st);
            if due {
                self.launch_pending();
            }
            return Ok(batch);
        }
    }

    fn new_batch(self: &Arc<Self>, kernel: Kernel) -> Arc<Batch> {
        Arc::new(Batch {
            kernel,
            coalescer: Arc::downgrade(self),
            members: Mutex::new((Vec::new(), Vec::new())),
            state: AtomicU8::new(PENDING),
            event: Mutex::new(None),
            error: OnceLock::new(),
            first_submit: Instant::now(),
            launched_at: OnceLock::new(),
            syncing: AtomicBool::new(false),
        })
    }

    /// Asks for the pending batch to be launched, without blocking: if another thread is
    /// launching, it sees the request and launches again before it stops (combining). Never
    /// called with the state lock held.
    fn launch_pending(&self) {
        self.launcher.request(|| {
            let taken = {
                let mut st = self.state.lock();
                self.reap(&mut st);
                st.pending.take()
            };
            let Some(batch) = taken else { return };
            let launched = self.launch(&batch);
            let mut st = self.state.lock();
            match launched {
                Ok(event) => {
                    *batch.event.lock() = Some(event);
                    let _ = batch.launched_at.set(Instant::now());
                    batch.state.store(LAUNCHED, Ordering::Release);
                    st.in_flight.push_back(batch);
                    self.in_flight.store(st.in_flight.len(), Ordering::Release);
                }
                Err(e) => {
                    let _ = batch.error.set(e.to_string());
                    batch.state.store(DONE, Ordering::Release);
                }
            }
            drop(st);
            self.done.notify_all();
        });
    }

    /// Queues `batch`'s grouped launch and its completion event.
    fn launch(&self, batch: &Batch) -> Result<Box<dyn BackendEvent>> {
        let raws = std::mem::take(&mut batch.members.lock().0);
        let refs: Vec<&dyn BackendBuffer> = raws.iter().map(|r| &***r).collect();
        self.launched.0.fetch_add(1, Ordering::Relaxed);
        self.launched
            .1
            .fetch_add(refs.len() as u64, Ordering::Relaxed);
        let event = self.events.take(self.device.backend())?;
        match self
            .stream
            .launch_grouped(batch.kernel, &refs)
            .and_then(|()| self.stream.record(&*event))
        {
            Ok(()) => Ok(event),
            Err(e) => {
                self.events.give_back(event);
                Err(e)
            }
        }
    }

    /// Marks in-flight batches whose event completed as done (front first; in-order stream).
    fn reap(&self, st: &mut State) {
        while let Some(front) = st.in_flight.front() {
            // A waiter holding the event is syncing it: it will finish the batch itself.
            let Some(event) = front.event.try_lock() else {
                break;
            };
            let complete = event.as_ref().map_or(Ok(true), |ev| ev.is_complete());
            drop(event);
            match complete {
                Ok(false) => break,
                Ok(true) => self.finish_front(st, None),
                Err(e) => self.finish_front(st, Some(e.to_string())),
            }
        }
    }

    fn finish_front(&self, st: &mut State, error: Option<String>) {
        let Some(b) = st.in_flight.pop_front() else {
            return;
        };
        self.in_flight.store(st.in_flight.len(), Ordering::Release);
        if let Some(e) = error {
            let _ = b.error.set(e);
        }
        let ops = b.members.lock().1.len() as u64;
        if let Some(at) = b.launched_at.get() {
            self.adapt(st, ops, at.elapsed());
        }
        if let Some(ev) = b.event.lock().take() {
            self.events.give_back(ev);
        }
        b.state.store(DONE, Ordering::Release);
        self.done.notify_all();
    }

    /// AIMD on the batch target (adaptive policy only).
    fn adapt(&self, st: &mut State, ops: u64, latency: Duration) {
        let CoalescePolicy::Adaptive {
            max_batch,
            latency_target,
            ..
        } = self.policy
        else {
            return;
        };
        let w = &mut st.window;
        let now = Instant::now();
        let started = *w.started.get_or_insert(now);
        w.batches += 1;
        w.ops += ops;
        w.worst_latency = w.worst_latency.max(latency);
        if w.batches < 32 {
            return;
        }
        let rate = w.ops as f64 / now.duration_since(started).as_secs_f64().max(1e-9);
        st.target = if w.worst_latency <= latency_target && rate >= w.last_rate * 0.98 {
            (st.target + 1).min(max_batch)
        } else {
            (st.target * 3 / 4).max(1)
        };
        *w = AimdWindow {
            last_rate: rate,
            ..AimdWindow::default()
        };
    }

    /// Waits for `batch` to complete and returns its result.
    ///
    /// While the batch is pending, the waiter launches it when it is due (device idle or
    /// deadline passed); once launched, the first waiter to get there waits on the batch's
    /// event and finishes it, and the others wait for that (spinning, yielding or sleeping per
    /// the wait policy; sleepers are woken by every launch and completion).
    pub(crate) fn wait(self: &Arc<Self>, batch: &Arc<Batch>) -> Result<()> {
        let (_, max_delay) = self.policy.limits();
        let deadline = batch.first_submit + max_delay;
        let mut spins = 0u32;
        loop {
            match batch.state.load(Ordering::Acquire) {
                DONE => return batch.result(),
                LAUNCHED if !batch.syncing.swap(true, Ordering::AcqRel) => return self.sync(batch),
                LAUNCHED => match self.wait {
                    WaitPolicy::Spin => std::hint::spin_loop(),
                    WaitPolicy::Yield => std::thread::yield_now(),
                    WaitPolicy::Block => {
                        let mut st = self.state.lock();
                        if !batch.is_done() {
                            self.done.wait(&mut st);
                        }
                    }
                },
                _pending => {
                    spins = spins.wrapping_add(1);
                    let due = self.in_flight.load(Ordering::Acquire) == 0
                        || (spins % 64 == 0 && Instant::now() >= deadline);
                    if due {
                        self.launch_pending();
                        if self.wait != WaitPolicy::Spin {
                            std::thread::yield_now(); // let a descheduled launcher run
                        }
                    } else if self.wait == WaitPolicy::Block {
                        let mut st = self.state.lock();
                        if batch.state.load(Ordering::Acquire) == PENDING
                            && !st.in_flight.is_empty()
                        {
                            let _ = self.done.wait_until(&mut st, deadline);
                        }
                    } else if self.wait == WaitPolicy::Yield {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
    }

    /// The syncing waiter: waits on the batch's event, then finishes it and every batch
    /// launched before it, and launches the pending batch if the device is now idle.
    fn sync(&self, batch: &Arc<Batch>) -> Result<()> {
        let r = batch.event.lock().as_ref().map_or(Ok(()), |ev| ev.wait());
        let mut st = self.state.lock();
        let queued = st.in_flight.iter().any(|b| Arc::ptr_eq(b, batch));
        while let Some(front) = st.in_flight.front().cloned().filter(|_| queued) {
            let mine = Arc::ptr_eq(&front, batch);
            let error = if mine {
                r.as_ref().err().map(|e| e.to_string())
            } else {
                None
            };
            self.finish_front(&mut st, error);
            if mine {
                break;
            }
        }
        let idle_with_work = st.in_flight.is_empty() && st.pending.is_some();
        drop(st);
        if idle_with_work {
            self.launch_pending();
        }
        batch.result()
    }

    /// Launches the pending batch and waits for everything launched.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.launch_pending();
        self.stream.synchronize()?;
        let mut st = self.state.lock();
        self.reap(&mut st);
        Ok(())
    }
}

impl Drop for CoalescerShared {
    fn drop(&mut self) {
        // Ops whose tickets were dropped may still be pending: queue them, so their buffers
        // end up as if launched alone.
        let pending = self.state.get_mut().pending.take();
        if let Some(batch) = pending {
            match self.launch(&batch) {
                Ok(event) => self.events.give_back(event),
                Err(e) => {
                    let _ = batch.error.set(e.to_string());
                }
            }
            batch.state.store(DONE, Ordering::Release);
        }
    }
}
