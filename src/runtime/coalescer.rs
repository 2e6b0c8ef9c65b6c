//! `Coalescer`: concurrent compatible ops from many threads, merged into one launch.
//!
//! An op coalesces when its kernel is element-wise and in place over one buffer
//! (`simple_compute`): ops with the same kernel and parameters on distinct buffers can run as
//! one grouped launch (`BackendStream::launch_grouped`), each buffer's result bit-identical to
//! launching it alone.
//!
//! Threads keep calling [`crate::Stream::launch`]; with coalescing on, the op joins a *pending
//! batch* instead of being launched. Pending batches form a queue and are launched in order,
//! on the pool's batch stream. The front batch is launched when it is *due*:
//! - the device has fewer than `depth` batches queued (an idle device never waits, and with
//!   `depth` 2 the next batch is queued while the current one runs);
//! - it holds the batch target (`max_batch`, or the adaptive target);
//! - its oldest op has waited `max_delay` and the device holds no more than `depth` batches
//!   (a deadline adds at most one batch to the device's queue: launching more while the
//!   device is busy would not start those ops sooner, only split them into smaller batches);
//! - someone needs it launched now (its buffer is about to be used otherwise).
//!
//! Due-ness is checked by every submission, by the waiters of pending batches while they
//! wait, and by every waiter that sees a batch complete. Launches go through one
//! [`Combiner`]: whoever finds it idle launches every due batch; the others return at once.
//!
//! Ordering: an op joins the first batch (of its kernel, with room) *after* the last pending
//! batch holding an op of the same submitting stream or on the same buffer. Batches run in
//! launch order on one stream, so ops of one thread on one stream keep their order, each
//! complete before the next runs, and ops on one buffer are never reordered or run together.
//!
//! Completion: where the backend offers a host signal ([`BackendSignal`]) and the wait policy
//! is not `block`, the launch is followed by a stream-ordered write of the batch's launch
//! number into that host word; waiters poll the word (a memory load, no driver call), and one
//! waiter per batch also polls the stream for errors now and then (a device fault stops the
//! stream, so the word would never arrive). Otherwise each batch records a pooled event; one
//! waiter per batch waits on it and finishes the batches up to it; the others wait for that.
//! Waiters of pending batches also finish completed batches (by querying their events) while
//! the device looks full, so batches whose tickets were all dropped never hold the queue.
//! Errors of a batch (launch or device) go to every op in it; the next batch proceeds.
//!
//! Lifetimes: a pending op holds a reference to its buffer's storage, and a buffer has its
//! pending batch launched before any other use (another stream, a read, a drop), so storage
//! is never freed before the launch that uses it is queued.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::event_pool::EventPool;
use super::Device;
use crate::backend::{BackendBuffer, BackendEvent, BackendSignal, BackendStream, WaitPolicy};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::sync::combiner::Combiner;

/// Batches queued on the device before new ops wait to fill a batch (the default of
/// [`CoalescePolicy`]'s `depth`): one runs while the next is queued.
pub const DEFAULT_DEPTH: usize = 2;

/// How a pool merges ops from different threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoalescePolicy {
    /// One launch per op.
    Off,
    /// Launch when `max_batch` ops wait, when the oldest waited `max_delay`, or at once when
    /// fewer than `depth` batches are queued on the device.
    Fixed {
        /// Ops per launch at most.
        max_batch: usize,
        /// Longest an op waits for others.
        max_delay: Duration,
        /// Batches queued on the device before new ops wait for a fuller batch (≥ 1).
        depth: usize,
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
        /// Batches queued on the device before new ops wait for a fuller batch (≥ 1).
        depth: usize,
    },
    /// Coalescing on the device: ops are published to a kernel that stays on the device
    /// while work arrives and runs concurrent ops side by side (no launch per op, no host
    /// batching; see `runtime::device_queue`). Where the backend has no device queue (CPU),
    /// the pool coalesces on the host as [`PERSISTENT_FALLBACK`] instead.
    Persistent,
}

/// What [`CoalescePolicy::Persistent`] falls back to where the backend has no device queue.
pub const PERSISTENT_FALLBACK: CoalescePolicy = CoalescePolicy::Fixed {
    max_batch: 16,
    max_delay: Duration::from_micros(20),
    depth: DEFAULT_DEPTH,
};

impl CoalescePolicy {
    /// The name used on the command line and in results.
    pub fn name(&self) -> &'static str {
        match self {
            CoalescePolicy::Off => "off",
            CoalescePolicy::Fixed { .. } => "fixed",
            CoalescePolicy::Adaptive { .. } => "adaptive",
            CoalescePolicy::Persistent => "persistent",
        }
    }

    /// Batches queued on the device before new ops wait (0 for `Off`).
    pub fn depth(&self) -> usize {
        match *self {
            CoalescePolicy::Off | CoalescePolicy::Persistent => 0,
            CoalescePolicy::Fixed { depth, .. } | CoalescePolicy::Adaptive { depth, .. } => depth,
        }
    }

    /// (max batch, max delay, depth).
    fn limits(&self) -> (usize, Duration, usize) {
        match *self {
            CoalescePolicy::Off => (1, Duration::ZERO, 1),
            CoalescePolicy::Persistent => PERSISTENT_FALLBACK.limits(),
            CoalescePolicy::Fixed {
                max_batch,
                max_delay,
                depth,
            }
            | CoalescePolicy::Adaptive {
                max_batch,
                max_delay,
                depth,
                ..
            } => (max_batch, max_delay, depth),
        }
    }
}

/// What a coalescer did so far: launches, ops, and where a batch's time went.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct CoalesceStats {
    /// Grouped launches made.
    pub launches: u64,
    /// Ops in them.
    pub ops: u64,
    /// Device queue (`persistent`): ops launched alone instead, on their own stream (the
    /// pool had fewer than [`QUEUE_MIN_LOAD`](super::device_queue::QUEUE_MIN_LOAD) other ops
    /// in flight, or the op fills the device by itself).
    pub direct: u64,
    /// Per launch, on average: µs from the batch's first op's submission to its launch.
    pub pending_us: f64,
    /// Per launch, on average: µs of host time spent queuing the grouped launch and its
    /// completion (signal write or event record).
    pub launch_us: f64,
    /// Per waited batch, on average: µs from the end of the launch call to the first waiter
    /// seeing the batch complete (device time plus completion latency).
    pub complete_us: f64,
    /// Batches whose completion was timed (those someone waited for).
    pub timed_batches: u64,
}

/// Running totals behind [`CoalesceStats`] (nanoseconds).
#[derive(Default)]
struct StatTotals {
    launches: AtomicU64,
    ops: AtomicU64,
    pending_ns: AtomicU64,
    launch_ns: AtomicU64,
    complete_ns: AtomicU64,
    timed: AtomicU64,
}

impl StatTotals {
    fn snapshot(&self) -> CoalesceStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let per = |ns: u64, n: u64| ns as f64 / 1e3 / n.max(1) as f64;
        let (launches, timed) = (get(&self.launches), get(&self.timed));
        CoalesceStats {
            launches,
            ops: get(&self.ops),
            direct: 0,
            pending_us: per(get(&self.pending_ns), launches),
            launch_us: per(get(&self.launch_ns), launches),
            complete_us: per(get(&self.complete_ns), timed),
            timed_batches: timed,
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

const PENDING: u8 = 0;
const LAUNCHED: u8 = 1;
const DONE: u8 = 2;

/// Raw storage of a buffer, shared between the buffer and a pending op.
pub(crate) type SharedRaw = Arc<Box<dyn BackendBuffer>>;

#[derive(Default)]
struct Members {
    /// Buffers of the ops (taken at launch).
    raws: Vec<SharedRaw>,
    /// Ids of the submitting streams.
    streams: Vec<usize>,
}

/// A group of ops launched together.
pub(crate) struct Batch {
    /// Creation order (1, 2, …), for "launch everything up to this batch".
    id: u64,
    kernel: Kernel,
    coalescer: Weak<CoalescerShared>,
    /// Changed only under the coalescer's state lock while the batch is pending.
    members: Mutex<Members>,
    /// Ops in the batch.
    len: AtomicUsize,
    /// Launch number (1, 2, …; the value its completion signal carries); 0 while pending.
    seq: AtomicU64,
    state: AtomicU8,
    /// Event mode: recorded after the launch; given back to the pool when the batch is done.
    /// Held by the one syncing waiter while it waits (others only `try_lock` it).
    event: Mutex<Option<Box<dyn BackendEvent>>>,
    error: OnceLock<Failure>,
    first_submit: Instant,
    launched_at: OnceLock<Instant>,
    /// Set by the waiter that watches the batch for device errors (signal mode) or syncs its
    /// event (event mode).
    watched: AtomicBool,
}

/// Why a batch failed, kept so that every member gets its own copy of the error.
#[derive(Clone, Debug)]
enum Failure {
    /// The driver was shut down under the batch (the process is exiting).
    ShutDown,
    /// Anything else, in words.
    Other(String),
}

impl From<&Error> for Failure {
    fn from(e: &Error) -> Self {
        match e {
            Error::DeviceShutDown { .. } => Failure::ShutDown,
            e => Failure::Other(e.to_string()),
        }
    }
}

impl Failure {
    fn to_error(&self) -> Error {
        match self {
            Failure::ShutDown => Error::DeviceShutDown {
                op: "coalesced launch",
            },
            Failure::Other(message) => Error::Device {
                op: "coalesced launch",
                message: message.clone(),
            },
        }
    }
}

impl Batch {
    fn result(&self) -> Result<()> {
        match self.error.get() {
            Some(failure) => Err(failure.to_error()),
            None => Ok(()),
        }
    }

    fn touches(&self, stream_id: usize, raw: &SharedRaw) -> bool {
        let m = self.members.lock();
        m.streams.contains(&stream_id) || m.raws.iter().any(|r| Arc::ptr_eq(r, raw))
    }

    /// Returns once this batch is launched (or failed to launch): its buffer is about to be
    /// used otherwise.
    pub(crate) fn ensure_launched(self: &Arc<Self>) {
        if self.state.load(Ordering::Acquire) != PENDING {
            return;
        }
        match self.coalescer.upgrade() {
            Some(c) => {
                c.flush_to.fetch_max(self.id, Ordering::AcqRel);
                c.launch_due();
                while self.state.load(Ordering::Acquire) == PENDING {
                    std::thread::yield_now();
                    c.launch_due();
                }
            }
            // The coalescer is being dropped: its `Drop` launches every pending batch.
            None => {
                while self.state.load(Ordering::Acquire) == PENDING {
                    std::thread::yield_now();
                }
            }
        }
    }
}

struct State {
    /// Batches not launched yet, in launch order.
    pending: VecDeque<Arc<Batch>>,
    /// Event mode: launched batches not known complete, in launch order.
    in_flight: VecDeque<Arc<Batch>>,
    /// Current batch target (adaptive; = max_batch for fixed).
    target: usize,
    window: AimdWindow,
    next_id: u64,
}

#[derive(Default)]
struct AimdWindow {
    batches: u32,
    ops: u64,
    started: Option<Instant>,
    worst_latency: Duration,
    last_rate: f64,
}

/// Polls a `spin` waiter spins before it starts yielding between polls.
const SPIN_POLLS: u32 = 16;

/// How often the watching waiter asks the stream for errors while a batch runs.
const FAULT_POLL: Duration = Duration::from_micros(200);

/// The pool's coalescer.
pub(crate) struct CoalescerShared {
    device: Device,
    stream: Arc<dyn BackendStream>,
    events: EventPool,
    /// The completion word (signal mode), or `None` (event mode).
    signal: Option<Arc<dyn BackendSignal>>,
    policy: CoalescePolicy,
    max_batch: usize,
    max_delay: Duration,
    depth: u64,
    /// Taken through [`Self::lock_state`]: every critical section is a few hundred
    /// nanoseconds, and a thread parked on it would hold up every launch by its wake-up
    /// latency.
    state: Mutex<State>,
    /// Serializes launches (so batches reach the stream in the order they left `pending`)
    /// without blocking anyone: see `sync::combiner`. The state lock is never held across a
    /// launch.
    launcher: Combiner,
    /// Launch number of the last launched batch.
    launched_seq: AtomicU64,
    /// Event mode: launch number of the last batch known complete.
    completed_seq: AtomicU64,
    /// Pending batches with an id up to this one are due at once.
    flush_to: AtomicU64,
    /// `state.pending.len()`, readable without the lock.
    pending_batches: AtomicUsize,
    /// Signal mode: the batch stream's error, once one was seen (sticky, as the stream's).
    fault: OnceLock<Failure>,
    /// Statistics.
    totals: StatTotals,
    /// `block` waiters sleep on `done` under `sleep`; notified at every launch and
    /// completion (after the change, under `sleep`, so no wake-up is lost).
    sleep: Mutex<()>,
    done: Condvar,
    wait: WaitPolicy,
}

impl CoalescerShared {
    pub(crate) fn new(device: &Device, policy: CoalescePolicy) -> Result<Arc<Self>> {
        let (max_batch, max_delay, depth) = policy.limits();
        if max_batch == 0 || max_batch > 4096 {
            return Err(Error::invalid("max batch must be between 1 and 4096"));
        }
        if depth == 0 || depth > 64 {
            return Err(Error::invalid("coalescing depth must be between 1 and 64"));
        }
        let target = match policy {
            CoalescePolicy::Adaptive { .. } => 2.min(max_batch),
            _ => max_batch,
        };
        let wait = device.info().wait;
        let signal = match wait {
            WaitPolicy::Block => None,
            WaitPolicy::Spin | WaitPolicy::Yield => device.backend().new_signal()?,
        };
        Ok(Arc::new(CoalescerShared {
            device: device.clone(),
            stream: device.backend().new_stream()?,
            events: EventPool::new(),
            signal,
            policy,
            max_batch,
            max_delay,
            depth: depth as u64,
            state: Mutex::new(State {
                pending: VecDeque::new(),
                in_flight: VecDeque::new(),
                target,
                window: AimdWindow::default(),
                next_id: 0,
            }),
            launcher: Combiner::new(),
            launched_seq: AtomicU64::new(0),
            completed_seq: AtomicU64::new(0),
            flush_to: AtomicU64::new(0),
            pending_batches: AtomicUsize::new(0),
            fault: OnceLock::new(),
            totals: StatTotals::default(),
            sleep: Mutex::new(()),
            done: Condvar::new(),
            wait,
        }))
    }

    /// Launches, ops and the time breakdown so far.
    pub(crate) fn stats(&self) -> CoalesceStats {
        self.totals.snapshot()
    }

    /// True when completion is signalled through host memory (no events, no driver calls to
    /// wait).
    pub(crate) fn uses_signal(&self) -> bool {
        self.signal.is_some()
    }

    pub(crate) fn stream(&self) -> &Arc<dyn BackendStream> {
        &self.stream
    }

    /// The state lock, acquired by spinning, then yielding, never parking: a parked thread
    /// wakes tens of microseconds after the lock is free, longer than the whole launch cycle
    /// this lock sits in; yielding lets a descheduled holder run when threads outnumber
    /// cores.
    fn lock_state(&self) -> parking_lot::MutexGuard<'_, State> {
        let mut tries = 0u32;
        loop {
            if let Some(guard) = self.state.try_lock() {
                return guard;
            }
            tries += 1;
            if tries < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Launch number of the last batch known complete.
    fn completed(&self) -> u64 {
        match &self.signal {
            Some(s) => s.value(),
            None => self.completed_seq.load(Ordering::Acquire),
        }
    }

    /// Batches launched and not known complete.
    fn in_flight(&self) -> u64 {
        self.launched_seq
            .load(Ordering::Acquire)
            .saturating_sub(self.completed())
    }

    /// Adds one op (kernel over `raw`, from stream `stream_id`) and returns its batch.
    pub(crate) fn submit(
        self: &Arc<Self>,
        kernel: Kernel,
        raw: SharedRaw,
        stream_id: usize,
    ) -> Result<Arc<Batch>> {
        let mut st = self.lock_state();
        // Ops of the same stream or on the same buffer that are still pending go first.
        let after = st
            .pending
            .iter()
            .rposition(|b| b.touches(stream_id, &raw))
            .map_or(0, |i| i + 1);
        let found = (after..st.pending.len()).find(|&i| {
            let b = &st.pending[i];
            b.kernel == kernel && b.len.load(Ordering::Relaxed) < self.max_batch
        });
        let index = match found {
            Some(i) => i,
            None => {
                st.next_id += 1;
                let batch = self.new_batch(st.next_id, kernel);
                st.pending.push_back(batch);
                self.pending_batches
                    .store(st.pending.len(), Ordering::Release);
                st.pending.len() - 1
            }
        };
        let batch = st.pending[index].clone();
        let len = {
            let mut m = batch.members.lock();
            m.raws.push(raw);
            m.streams.push(stream_id);
            m.raws.len()
        };
        batch.len.store(len, Ordering::Relaxed);
        let due = index == 0 && self.front_due(len, batch.first_submit, st.target);
        drop(st);
        if due {
            self.launch_due();
        }
        Ok(batch)
    }

    fn new_batch(self: &Arc<Self>, id: u64, kernel: Kernel) -> Arc<Batch> {
        Arc::new(Batch {
            id,
            kernel,
            coalescer: Arc::downgrade(self),
            members: Mutex::new(Members::default()),
            len: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
            state: AtomicU8::new(PENDING),
            event: Mutex::new(None),
            error: OnceLock::new(),
            first_submit: Instant::now(),
            launched_at: OnceLock::new(),
            watched: AtomicBool::new(false),
        })
    }

    /// Launches every due pending batch, front first, without blocking: if another thread is
    /// launching, it sees the request and checks again before it stops (combining). Never
    /// called with the state lock held.
    fn launch_due(&self) {
        self.launcher.request(|| loop {
            let batch = {
                let mut st = self.lock_state();
                if self.signal.is_none() {
                    self.reap(&mut st);
                }
                let Some(front) = st.pending.front() else {
                    return;
                };
                let due = front.id <= self.flush_to.load(Ordering::Acquire)
                    || self.front_due(
                        front.len.load(Ordering::Relaxed),
                        front.first_submit,
                        st.target,
                    );
                if !due {
                    return;
                }
                let batch = st.pending.pop_front().expect("front exists");
                self.pending_batches
                    .store(st.pending.len(), Ordering::Release);
                batch
            };
            self.launch_one(&batch);
        });
    }

    /// Queues `batch`'s grouped launch and its completion (signal write or event), and marks
    /// it launched (or done, with its error). Called by one thread at a time: the combiner's
    /// server, or `Drop`.
    fn launch_one(&self, batch: &Arc<Batch>) {
        let start = Instant::now();
        let raws = std::mem::take(&mut batch.members.lock().raws);
        let refs: Vec<&dyn BackendBuffer> = raws.iter().map(|r| &***r).collect();
        let t = &self.totals;
        t.launches.fetch_add(1, Ordering::Relaxed);
        t.ops.fetch_add(refs.len() as u64, Ordering::Relaxed);
        t.pending_ns.fetch_add(
            nanos(start.duration_since(batch.first_submit)),
            Ordering::Relaxed,
        );
        let seq = self.launched_seq.load(Ordering::Acquire) + 1;
        let queued = match &self.signal {
            Some(signal) => self
                .stream
                .launch_grouped_signalled(batch.kernel, &refs, &**signal, seq)
                .map(|()| None),
            None => self
                .stream
                .launch_grouped(batch.kernel, &refs)
                .and_then(|()| {
                    let event = self.events.take(self.device.backend())?;
                    match self.stream.record(&*event) {
                        Ok(()) => Ok(Some(event)),
                        Err(e) => {
                            self.events.give_back(event);
                            Err(e)
                        }
                    }
                }),
        };
        drop(refs);
        drop(raws);
        let launched_at = Instant::now();
        t.launch_ns
            .fetch_add(nanos(launched_at - start), Ordering::Relaxed);
        match queued {
            Ok(event) => {
                batch.seq.store(seq, Ordering::Release);
                *batch.event.lock() = event;
                let _ = batch.launched_at.set(launched_at);
                if self.signal.is_none() {
                    self.lock_state().in_flight.push_back(batch.clone());
                }
                batch.state.store(LAUNCHED, Ordering::Release);
                self.launched_seq.store(seq, Ordering::Release);
            }
            Err(e) => {
                let _ = batch.error.set(Failure::from(&e));
                batch.state.store(DONE, Ordering::Release);
            }
        }
        self.notify();
    }

    /// Wakes `block` waiters (event mode). Taking the lock first means a waiter either saw
    /// the change before sleeping or is already asleep and gets the notification.
    fn notify(&self) {
        if self.wait == WaitPolicy::Block {
            drop(self.sleep.lock());
            self.done.notify_all();
        }
    }

    /// Event mode: marks in-flight batches whose event completed as done (front first;
    /// in-order stream).
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
                Err(e) => self.finish_front(st, Some(Failure::from(&e))),
            }
        }
    }

    /// Event mode: the front in-flight batch completed (with `error`, if it failed).
    fn finish_front(&self, st: &mut State, error: Option<Failure>) {
        let Some(b) = st.in_flight.pop_front() else {
            return;
        };
        if let Some(e) = error {
            let _ = b.error.set(e);
        }
        if let Some(at) = b.launched_at.get() {
            let latency = at.elapsed();
            self.record_completion(latency);
            self.adapt(st, b.len.load(Ordering::Relaxed) as u64, latency);
        }
        if let Some(ev) = b.event.lock().take() {
            self.events.give_back(ev);
        }
        b.state.store(DONE, Ordering::Release);
        self.completed_seq
            .fetch_max(b.seq.load(Ordering::Acquire), Ordering::AcqRel);
        self.notify();
    }

    fn record_completion(&self, latency: Duration) {
        self.totals.timed.fetch_add(1, Ordering::Relaxed);
        self.totals
            .complete_ns
            .fetch_add(nanos(latency), Ordering::Relaxed);
    }

    /// AIMD on the batch target (adaptive policy only).
    fn adapt(&self, st: &mut State, ops: u64, latency: Duration) {
        let CoalescePolicy::Adaptive { latency_target, .. } = self.policy else {
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
            (st.target + 1).min(self.max_batch)
        } else {
            (st.target * 3 / 4).max(1)
        };
        *w = AimdWindow {
            last_rate: rate,
            ..AimdWindow::default()
        };
    }

    /// One pause of a polling waiter. `spin` spins for the first `SPIN_POLLS` polls of a
    /// wait, then yields between polls: with as many waiters as cores, spinning starves the
    /// thread that launches the next batch (on the H100 machine, spinning 256 polls made 16
    /// threads bimodal, 250k–457k ops/s, where yielding held 493k–515k). A yield with no
    /// other runnable thread returns at once, so a lone waiter loses nothing. `yield` always
    /// yields.
    fn relax(&self, polls: u32) {
        if self.wait == WaitPolicy::Spin && polls < SPIN_POLLS {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }

    /// True when `batch` is due (see the module doc), checked by its waiters while pending.
    /// (A full front batch was launched by the submission that filled it; the clock is read
    /// every 64th poll only.)
    fn pending_due(&self, batch: &Batch, spins: u32) -> bool {
        // Event mode: only reaping marks batches complete, and batches nobody waits for
        // (dropped tickets) would otherwise count as in flight for ever.
        if self.signal.is_none() && self.in_flight() >= self.depth {
            self.reap(&mut self.lock_state());
        }
        self.in_flight() < self.depth
            || (spins % 64 == 0 && self.front_due(0, batch.first_submit, usize::MAX))
    }

    /// The launch rule of the module doc for the front batch (`len` ops, first submitted at
    /// `first`, batch target `target`): full, room on the device, or past its deadline with at
    /// most `depth` batches on the device.
    fn front_due(&self, len: usize, first: Instant, target: usize) -> bool {
        let in_flight = self.in_flight();
        len >= target
            || in_flight < self.depth
            || (in_flight <= self.depth && first.elapsed() >= self.max_delay)
    }

    /// A batch completed: launch the front pending batch if the device has room now.
    fn kick(&self) {
        if self.pending_batches.load(Ordering::Acquire) > 0 && self.in_flight() < self.depth {
            self.launch_due();
        }
    }

    /// Waits for `batch` to complete and returns its result.
    ///
    /// While the batch is pending, the waiter launches it when it is due; once launched, it
    /// waits for the completion signal (or, in event mode, the batch's event).
    pub(crate) fn wait(self: &Arc<Self>, batch: &Arc<Batch>) -> Result<()> {
        let mut spins = 0u32;
        loop {
            match batch.state.load(Ordering::Acquire) {
                DONE => return batch.result(),
                LAUNCHED => {
                    return match self.signal {
                        Some(ref signal) => self.wait_signal(batch, &**signal),
                        None => self.wait_event(batch),
                    }
                }
                _pending => {
                    spins = spins.wrapping_add(1);
                    if self.pending_due(batch, spins) {
                        self.launch_due();
                        // Pause even under `spin`: waiters re-requesting in a tight loop kept
                        // the launching thread serving requests instead of returning to its
                        // own op (16 threads on the H100 swung between 228k and 457k ops/s).
                        std::thread::yield_now();
                    } else {
                        match self.wait {
                            WaitPolicy::Spin | WaitPolicy::Yield => self.relax(spins),
                            WaitPolicy::Block => {
                                let deadline = batch.first_submit + self.max_delay;
                                let mut sleep = self.sleep.lock();
                                if batch.state.load(Ordering::Acquire) == PENDING
                                    && self.in_flight() >= self.depth
                                {
                                    let _ = self.done.wait_until(&mut sleep, deadline);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Signal mode: polls the completion word until it reaches the batch's launch number. The
    /// first waiter of a batch also asks the stream for errors every `FAULT_POLL`, so a
    /// device fault (after which the word never arrives) ends every wait with that error.
    fn wait_signal(&self, batch: &Batch, signal: &dyn BackendSignal) -> Result<()> {
        let seq = batch.seq.load(Ordering::Acquire);
        let watcher = !batch.watched.swap(true, Ordering::AcqRel);
        let mut next_poll = None::<Instant>;
        let mut idle_polls = 0u32;
        let mut spins = 0u32;
        loop {
            if signal.value() >= seq {
                break;
            }
            if let Some(fault) = self.fault.get() {
                if signal.value() >= seq {
                    break;
                }
                let _ = batch.error.set(fault.clone());
                batch.state.store(DONE, Ordering::Release);
                return batch.result();
            }
            spins = spins.wrapping_add(1);
            self.relax(spins);
            if watcher && spins % 256 == 0 {
                let now = Instant::now();
                let next = *next_poll.get_or_insert(now + FAULT_POLL);
                if now >= next {
                    next_poll = Some(now + FAULT_POLL);
                    match self.stream.query() {
                        Ok(false) => {}
                        // Idle, yet the word has not arrived: give the write a moment to
                        // land, then call it lost rather than wait forever.
                        Ok(true) if signal.value() >= seq => break,
                        Ok(true) => {
                            idle_polls += 1;
                            if idle_polls >= 50 {
                                let _ = self.fault.set(Failure::Other(format!(
                                    "batch {seq}'s completion signal never arrived \
                                     (the stream is idle)"
                                )));
                            }
                        }
                        Err(e) => {
                            let _ = self.fault.set(Failure::from(&e));
                        }
                    }
                }
            }
        }
        batch.state.store(DONE, Ordering::Release);
        if let (true, Some(at)) = (watcher, batch.launched_at.get()) {
            let latency = at.elapsed();
            self.record_completion(latency);
            if let CoalescePolicy::Adaptive { .. } = self.policy {
                let mut st = self.lock_state();
                self.adapt(&mut st, batch.len.load(Ordering::Relaxed) as u64, latency);
            }
        }
        self.kick();
        batch.result()
    }

    /// Event mode: the first waiter waits on the batch's event, then finishes it and every
    /// batch launched before it; the others wait for that (spinning, yielding or sleeping per
    /// the wait policy; sleepers are woken by every launch and completion).
    fn wait_event(&self, batch: &Arc<Batch>) -> Result<()> {
        if !batch.watched.swap(true, Ordering::AcqRel) {
            return self.sync_event(batch);
        }
        loop {
            if batch.state.load(Ordering::Acquire) == DONE {
                return batch.result();
            }
            match self.wait {
                WaitPolicy::Spin => std::hint::spin_loop(),
                WaitPolicy::Yield => std::thread::yield_now(),
                WaitPolicy::Block => {
                    let mut sleep = self.sleep.lock();
                    if batch.state.load(Ordering::Acquire) != DONE {
                        self.done.wait(&mut sleep);
                    }
                }
            }
        }
    }

    fn sync_event(&self, batch: &Arc<Batch>) -> Result<()> {
        let r = batch.event.lock().as_ref().map_or(Ok(()), |ev| ev.wait());
        let mut st = self.lock_state();
        let queued = st.in_flight.iter().any(|b| Arc::ptr_eq(b, batch));
        while let Some(front) = st.in_flight.front().cloned().filter(|_| queued) {
            let mine = Arc::ptr_eq(&front, batch);
            let error = if mine {
                r.as_ref().err().map(Failure::from)
            } else {
                None
            };
            self.finish_front(&mut st, error);
            if mine {
                break;
            }
        }
        drop(st);
        self.kick();
        batch.result()
    }

    /// True when `batch` has completed (its error, if it failed). Never blocks; launches the
    /// pending batches if they are due.
    pub(crate) fn poll(&self, batch: &Batch) -> Result<bool> {
        match batch.state.load(Ordering::Acquire) {
            DONE => batch.result().map(|()| true),
            LAUNCHED => match &self.signal {
                Some(signal) => {
                    if signal.value() >= batch.seq.load(Ordering::Acquire) {
                        return Ok(true);
                    }
                    if let Some(fault) = self.fault.get() {
                        let _ = batch.error.set(fault.clone());
                        batch.state.store(DONE, Ordering::Release);
                        return batch.result().map(|()| true);
                    }
                    if let Err(e) = self.stream.query() {
                        let _ = self.fault.set(Failure::from(&e));
                    }
                    Ok(false)
                }
                None => {
                    let mut st = self.lock_state();
                    self.reap(&mut st);
                    match batch.state.load(Ordering::Acquire) {
                        DONE => batch.result().map(|()| true),
                        _ => Ok(false),
                    }
                }
            },
            _pending => {
                if self.pending_due(batch, 0) {
                    self.launch_due();
                }
                Ok(false)
            }
        }
    }

    /// Launches every pending batch and waits for everything launched.
    pub(crate) fn synchronize(&self) -> Result<()> {
        let last = self.lock_state().next_id;
        self.flush_to.fetch_max(last, Ordering::AcqRel);
        loop {
            self.launch_due();
            let front = self.lock_state().pending.front().map(|b| b.id);
            match front {
                Some(id) if id <= last => std::thread::yield_now(),
                _ => break,
            }
        }
        self.stream.synchronize()?;
        if self.signal.is_none() {
            let mut st = self.lock_state();
            self.reap(&mut st);
        }
        Ok(())
    }
}

impl Drop for CoalescerShared {
    fn drop(&mut self) {
        // Ops whose tickets were dropped may still be pending: queue them, so their buffers
        // end up as if launched alone (and buffers waiting in `ensure_launched` go on).
        let pending = std::mem::take(&mut self.state.get_mut().pending);
        for batch in pending {
            self.launch_one(&batch);
            batch.state.store(DONE, Ordering::Release);
        }
        // Event mode: in-flight batches give their events back to the pool being dropped.
        let in_flight = std::mem::take(&mut self.state.get_mut().in_flight);
        for batch in in_flight {
            batch.event.lock().take();
            batch.state.store(DONE, Ordering::Release);
        }
    }
}
