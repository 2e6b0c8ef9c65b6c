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
//! [`crate::sync::combiner::Combiner`]: whoever finds it idle launches every due batch; the
//! others return at once.
//!
//! Who launches, who waits, who finishes a batch and who wakes whom is
//! [`crate::sync::handoff`] (with its invariants and loom models); this module is its
//! [`Launcher`] (grouped launches, events or the signal word, statistics, the adaptive
//! target), the choice of the batch an op joins, and the signal-mode completion wait.
//!
//! Adaptive: besides the AIMD batch target, the policy decides whether batching pays at all.
//! It starts by launching ops alone, to learn that rate; where batching does not beat it
//! (batches of under 1.5 ops on average, or AIMD's best window slower),
//! [`CoalescerShared::launches_alone`] sends ops down the pool's ordinary path for a phase,
//! then batches are tried again. Either path is correct at any moment: the rules below order
//! them.
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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::event_pool::EventPool;
use super::Device;
use crate::backend::{BackendBuffer, BackendEvent, BackendSignal, BackendStream, WaitPolicy};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::sync::handoff::{self, Handoff, Launcher, Waited};

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
    /// As `Fixed`, with the batch target chosen by AIMD over windows of 32 batches: grown by
    /// one while throughput rises and the mean batch latency stays under `latency_target`,
    /// cut by a quarter otherwise. It starts by launching ops alone on their own stream, as
    /// with `Off`, for a phase (2 ms and at least 64 ops) to learn the rate batches must
    /// beat; it goes back to that where batching does not pay (batches of under 1.5 ops on
    /// average, or AIMD stopped growing with its best window below that rate), for a phase
    /// that doubles each time batching loses again (at most 256 ms), then tries batches again.
    Adaptive {
        /// Ops per launch at most.
        max_batch: usize,
        /// Longest an op waits for others.
        max_delay: Duration,
        /// Mean batch latency (launch to completion) over a window to stay under.
        latency_target: Duration,
        /// Batches queued on the device before new ops wait for a fuller batch (≥ 1).
        depth: usize,
    },
    /// Coalescing on the device: ops are published to a kernel that stays on the device
    /// while work arrives and runs concurrent ops side by side (no launch per op, no host
    /// batching; see `runtime::device_queue`). Where the backend has no device queue (CPU),
    /// the pool coalesces on the host as `PERSISTENT_FALLBACK` instead.
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
    /// Ops launched alone instead, on their own stream. Device queue (`persistent`): the
    /// pool's other streams had fewer than
    /// [`QUEUE_MIN_LOAD`](super::device_queue::QUEUE_MIN_LOAD) ops in flight, or the op fills
    /// the device by itself. `adaptive`: ops submitted while coalescing did not pay.
    pub direct: u64,
    /// Device queue (`persistent`): ops the device ran chained to their buffer's previous op
    /// (each chunk right after that op's same chunk, on the same block) instead of queueing
    /// them on their own (with `DeviceOptions::queue_chain`; 0 otherwise).
    pub chained: u64,
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
    /// Device queue (`persistent`): why its kernel left the device, for the kernels followed
    /// by another launch (`launches` minus one, where the backend tells).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_exits: Option<crate::backend::QueueExits>,
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
            chained: 0,
            pending_us: per(get(&self.pending_ns), launches),
            launch_us: per(get(&self.launch_ns), launches),
            complete_us: per(get(&self.complete_ns), timed),
            timed_batches: timed,
            queue_exits: None,
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Raw storage of a buffer, shared between the buffer and a pending op.
pub(crate) type SharedRaw = Arc<Box<dyn BackendBuffer>>;

#[derive(Default)]
struct Members {
    /// Buffers of the ops (taken at launch).
    raws: Vec<SharedRaw>,
    /// Ids of the submitting streams.
    streams: Vec<usize>,
}

/// A group of ops launched together: the coalescer's part of a batch (the hand-off state,
/// its launch number, event and error, is [`handoff::Batch`]'s).
pub(crate) struct Ops {
    kernel: Kernel,
    coalescer: Weak<CoalescerShared>,
    /// Changed only under the hand-off's queue lock while the batch is pending.
    members: Mutex<Members>,
    /// Ops in the batch.
    len: AtomicUsize,
    first_submit: Instant,
    launched_at: OnceLock<Instant>,
}

/// A batch of the coalescer.
pub(crate) type Batch = handoff::Batch<Engine>;

/// Why a batch failed, kept so that every member gets its own copy of the error.
#[derive(Clone, Debug)]
pub(crate) enum Failure {
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

/// A batch's result as the caller sees it.
fn result(batch: &Batch) -> Result<()> {
    batch.result().map_err(|f| f.to_error())
}

impl Ops {
    fn touches(&self, stream_id: usize, raw: *const Box<dyn BackendBuffer>) -> bool {
        let m = self.members.lock();
        m.streams.contains(&stream_id) || m.raws.iter().any(|r| std::ptr::eq(Arc::as_ptr(r), raw))
    }
}

impl handoff::Batch<Engine> {
    /// Returns once this batch is launched (or failed to launch): its buffer is about to be
    /// used otherwise.
    pub(crate) fn ensure_launched(self: &Arc<Self>) {
        if !self.is_pending() {
            return;
        }
        match self.coalescer.upgrade() {
            Some(c) => c.handoff.flush(self),
            // The coalescer is being dropped: its hand-off's `Drop` launches every pending
            // batch.
            None => {
                while self.is_pending() {
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// The coalescer's state under the hand-off's lock.
pub(crate) struct Tuning {
    /// Current batch target (adaptive; = max_batch for fixed).
    target: usize,
    window: AimdWindow,
    /// Adaptive: the current or last phase of launching ops alone.
    alone: AlonePhase,
    /// Adaptive: the best window's ops per second since batches were last tried again.
    best_rate: f64,
    /// Adaptive: the first window after a phase of launching alone is still in its switch
    /// (every thread first waits for its stream) and decides nothing.
    settling: bool,
}

/// Adaptive: a phase in which ops launch alone on their own stream (as with `Off`) because
/// coalescing did not pay. Its start and end are decided under the hand-off's lock; ops see
/// it through [`AloneGate`].
struct AlonePhase {
    until: Instant,
    /// Ops counted and when, at the first launch past the phase's midpoint: the rate is
    /// measured from there, after the switch's own cost (every thread first waits for its
    /// last batch) has passed.
    mark: Option<(Instant, u64)>,
    /// The next phase's length: doubled each time coalescing loses again, back to
    /// `ALONE_PHASE_MIN` once it wins.
    next_len: Duration,
    /// Ops per second launched alone in the last phase, once one has run.
    rate: Option<f64>,
}

/// Adaptive: shortest phase of launching ops alone (and the first one).
const ALONE_PHASE_MIN: Duration = Duration::from_millis(2);
/// Adaptive: longest phase of launching ops alone.
const ALONE_PHASE_MAX: Duration = Duration::from_millis(256);
/// Adaptive: fewest ops a phase of launching ops alone counts before it ends (a rate from
/// fewer is noise).
const ALONE_PHASE_OPS: u64 = 64;
/// Adaptive: batches an AIMD window spans.
const AIMD_WINDOW: u32 = 32;
/// Adaptive: below this many ops per batch on average over a window, batches do not form and
/// the coalescer only adds a hop (one thread; a thread per op in flight), so ops launch alone.
const MIN_MEAN_BATCH: f64 = 1.5;

/// Adaptive: what submitters read to route an op (set only under the hand-off's lock; a hint:
/// an op routed either way is correct, since the stream and the buffer order the two paths).
#[derive(Default)]
struct AloneGate {
    /// Ops launch alone.
    on: std::sync::atomic::AtomicBool,
    /// The phase's end, in ns since `Engine::epoch` (stored before `on`).
    until_ns: AtomicU64,
    /// The phase's midpoint, likewise, and whether its mark was taken.
    mid_ns: AtomicU64,
    marked: std::sync::atomic::AtomicBool,
    /// Ops routed alone in this phase.
    ops: AtomicU64,
    /// Ops routed alone in all phases.
    total: AtomicU64,
}

#[derive(Default)]
struct AimdWindow {
    batches: u32,
    ops: u64,
    started: Option<Instant>,
    latency_sum: Duration,
    last_rate: f64,
}

/// Polls a `spin` waiter spins before it starts yielding between polls.
const SPIN_POLLS: u32 = 16;

/// How often the watching waiter asks the stream for errors while a batch runs.
const FAULT_POLL: Duration = Duration::from_micros(200);

/// The device side of the coalescer's hand-off: grouped launches on the batch stream, their
/// completion (signal word or pooled events), statistics and the adaptive target.
pub(crate) struct Engine {
    device: Device,
    stream: Arc<dyn BackendStream>,
    events: EventPool,
    /// The completion word (signal mode), or `None` (event mode).
    signal: Option<Arc<dyn BackendSignal>>,
    policy: CoalescePolicy,
    max_batch: usize,
    max_delay: Duration,
    /// Signal mode: the batch stream's error, once one was seen (sticky, as the stream's).
    fault: OnceLock<Failure>,
    /// When a waiter of a pending batch last asked the stream for a fault (`Launcher::fault`).
    fault_asked: Mutex<Instant>,
    /// Statistics.
    totals: StatTotals,
    wait: WaitPolicy,
    /// Adaptive: whether ops launch alone now.
    alone: AloneGate,
    /// The origin of `AloneGate::until_ns`.
    epoch: Instant,
}

impl Launcher for Engine {
    type Payload = Ops;
    type Event = Box<dyn BackendEvent>;
    type Failure = Failure;
    type State = Tuning;

    /// Queues `batch`'s grouped launch and its completion (signal write or event).
    fn launch(&self, batch: &Ops, seq: u64) -> std::result::Result<Option<Self::Event>, Failure> {
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
        let queued = match &self.signal {
            Some(signal) => self
                .stream
                .launch_grouped_signalled(batch.kernel, &refs, &**signal, seq)
                .map(|()| None),
            // The event is taken before the launch: once the kernel is queued the batch is
            // not reported failed for want of an event. If the record fails, the stream's
            // completion stands in for the event's (`None`: complete).
            None => self.events.take(self.device.backend()).and_then(|event| {
                match self.stream.launch_grouped(batch.kernel, &refs) {
                    Err(e) => {
                        self.events.give_back(event);
                        Err(e)
                    }
                    Ok(()) => match self.stream.record(&*event) {
                        Ok(()) => Ok(Some(event)),
                        Err(_) => {
                            self.events.give_back(event);
                            self.stream.synchronize().map(|()| None)
                        }
                    },
                }
            }),
        };
        drop(refs);
        drop(raws);
        let launched_at = Instant::now();
        t.launch_ns
            .fetch_add(nanos(launched_at - start), Ordering::Relaxed);
        if queued.is_ok() {
            let _ = batch.launched_at.set(launched_at);
        }
        queued.map_err(|e| Failure::from(&e))
    }

    fn is_complete(&self, event: &Self::Event) -> std::result::Result<bool, Failure> {
        event.is_complete().map_err(|e| Failure::from(&e))
    }

    fn wait(&self, event: &Self::Event) -> std::result::Result<(), Failure> {
        event.wait().map_err(|e| Failure::from(&e))
    }

    fn give_back(&self, event: Self::Event) {
        self.events.give_back(event);
    }

    fn signal(&self) -> u64 {
        self.signal.as_ref().map_or(0, |s| s.value())
    }

    fn full(&self, batch: &Ops, state: &Tuning) -> bool {
        batch.len.load(Ordering::Relaxed) >= state.target
    }

    fn overdue(&self, batch: &Ops) -> bool {
        batch.first_submit.elapsed() >= self.max_delay
    }

    fn deadline(&self, batch: &Ops) -> Instant {
        batch.first_submit + self.max_delay
    }

    fn finished(&self, batch: &Ops, state: &mut Tuning) {
        if let Some(at) = batch.launched_at.get() {
            let latency = at.elapsed();
            self.record_completion(latency);
            self.adapt(state, batch.len.load(Ordering::Relaxed) as u64, latency);
        }
    }

    /// Signal mode: the batch stream's fault, asking the stream at most every `FAULT_POLL`
    /// (one waiter at a time) when none is known yet.
    fn fault(&self) -> Option<Failure> {
        if let Some(f) = self.fault.get() {
            return Some(f.clone());
        }
        let mut asked = self.fault_asked.try_lock()?;
        if asked.elapsed() < FAULT_POLL {
            return None;
        }
        *asked = Instant::now();
        drop(asked);
        if let Err(e) = self.stream.query() {
            let _ = self.fault.set(Failure::from(&e));
        }
        self.fault.get().cloned()
    }
}

impl Engine {
    fn record_completion(&self, latency: Duration) {
        self.totals.timed.fetch_add(1, Ordering::Relaxed);
        self.totals
            .complete_ns
            .fetch_add(nanos(latency), Ordering::Relaxed);
    }

    /// AIMD on the batch target (adaptive policy only).
    fn adapt(&self, st: &mut Tuning, ops: u64, latency: Duration) {
        let CoalescePolicy::Adaptive { latency_target, .. } = self.policy else {
            return;
        };
        if self.alone.on.load(Ordering::Relaxed) {
            return; // a batch of the last coalescing phase
        }
        let w = &mut st.window;
        let now = Instant::now();
        let started = *w.started.get_or_insert(now);
        w.batches += 1;
        w.ops += ops;
        w.latency_sum += latency;
        if w.batches < AIMD_WINDOW {
            return;
        }
        let rate = w.ops as f64 / now.duration_since(started).as_secs_f64().max(1e-9);
        let mean_batch = w.ops as f64 / f64::from(w.batches);
        let mean_latency = w.latency_sum / w.batches;
        let grow = mean_latency <= latency_target && rate >= w.last_rate * 0.98;
        *w = AimdWindow {
            last_rate: rate,
            ..AimdWindow::default()
        };
        if std::mem::take(&mut st.settling) {
            return;
        }
        st.best_rate = st.best_rate.max(rate);
        // Batches do not form, or AIMD stopped growing at a rate below what ops launched
        // alone ran at (compared at the best window, so a noisy one does not decide).
        let alone_rate = st.alone.rate.unwrap_or(0.0);
        if mean_batch < MIN_MEAN_BATCH || (!grow && st.best_rate < alone_rate) {
            self.start_alone(st, now, mean_latency);
            return;
        }
        if st.best_rate > alone_rate * 1.05 {
            st.alone.next_len = ALONE_PHASE_MIN;
        }
        st.target = if grow {
            (st.target + 1).min(self.max_batch)
        } else {
            (st.target * 3 / 4).max(1)
        };
    }

    /// Adaptive: starts a phase of launching ops alone (under the hand-off's lock).
    /// `latency`: the last window's mean batch latency. A switch takes about that long (every
    /// thread first waits for its last batch), so the phase lasts at least 8 times it, and its
    /// rate is measured over its second half.
    fn start_alone(&self, st: &mut Tuning, now: Instant, latency: Duration) {
        let len = st.alone.next_len;
        let phase = len.max(latency * 8).min(ALONE_PHASE_MAX);
        st.alone.until = now + phase;
        st.alone.mark = None;
        st.alone.next_len = (len * 2).min(ALONE_PHASE_MAX);
        let since_epoch = |t: Instant| nanos(t.saturating_duration_since(self.epoch));
        self.alone.ops.store(0, Ordering::Relaxed);
        self.alone.marked.store(false, Ordering::Relaxed);
        self.alone
            .mid_ns
            .store(since_epoch(now + phase / 2), Ordering::Relaxed);
        self.alone
            .until_ns
            .store(since_epoch(st.alone.until), Ordering::Relaxed);
        // Release: a submitter that sees `on` sees this phase's end and count.
        self.alone.on.store(true, Ordering::Release);
    }

    /// Adaptive: takes the phase's midpoint mark (under the hand-off's lock), once.
    fn mark_alone(&self, st: &mut Tuning, now: Instant) {
        if st.alone.mark.is_none() && self.alone.on.load(Ordering::Relaxed) {
            st.alone.mark = Some((now, self.alone.ops.load(Ordering::Relaxed)));
            self.alone.marked.store(true, Ordering::Relaxed);
        }
    }

    /// Adaptive: ends the phase of launching ops alone if it is over (under the hand-off's
    /// lock); true when ops coalesce again.
    fn end_alone(&self, st: &mut Tuning, now: Instant) -> bool {
        if !self.alone.on.load(Ordering::Relaxed) {
            return true;
        }
        let ops = self.alone.ops.load(Ordering::Relaxed);
        let Some((marked_at, marked_ops)) = st.alone.mark else {
            return false;
        };
        if now < st.alone.until
            || ops < ALONE_PHASE_OPS
            || ops.saturating_sub(marked_ops) < ALONE_PHASE_OPS / 2
        {
            return false;
        }
        let secs = now.duration_since(marked_at).as_secs_f64().max(1e-9);
        st.alone.rate = Some(ops.saturating_sub(marked_ops) as f64 / secs);
        st.target = st.target.max(2).min(self.max_batch);
        st.window = AimdWindow::default();
        st.best_rate = 0.0;
        st.settling = true;
        self.alone.on.store(false, Ordering::Relaxed);
        true
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
}

/// Longest `max_delay` a policy may ask for: an hour (a batch's deadline, its first op's
/// submission plus the delay, is then always a representable instant).
pub const MAX_COALESCE_DELAY: Duration = Duration::from_secs(3600);

/// The pool's coalescer: a [`Handoff`] launching through an [`Engine`].
pub(crate) struct CoalescerShared {
    handoff: Handoff<Engine>,
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
        if max_delay > MAX_COALESCE_DELAY {
            return Err(Error::invalid(format!(
                "max delay must be at most {} s, got {max_delay:?}",
                MAX_COALESCE_DELAY.as_secs()
            )));
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
        let signalled = signal.is_some();
        let engine = Engine {
            device: device.clone(),
            stream: device.backend().new_stream()?,
            events: EventPool::new(),
            signal,
            policy,
            max_batch,
            max_delay,
            fault: OnceLock::new(),
            fault_asked: Mutex::new(Instant::now()),
            totals: StatTotals::default(),
            wait,
            alone: AloneGate::default(),
            epoch: Instant::now(),
        };
        let now = Instant::now();
        let mut tuning = Tuning {
            target,
            window: AimdWindow::default(),
            alone: AlonePhase {
                until: now,
                mark: None,
                next_len: ALONE_PHASE_MIN,
                rate: None,
            },
            best_rate: 0.0,
            settling: false,
        };
        if let CoalescePolicy::Adaptive { .. } = policy {
            // Adaptive starts by launching ops alone: the rate batches must beat.
            engine.start_alone(&mut tuning, now, Duration::ZERO);
            tuning.alone.next_len = ALONE_PHASE_MIN;
        }
        Ok(Arc::new(CoalescerShared {
            handoff: Handoff::new(engine, depth as u64, wait, signalled, tuning),
        }))
    }

    fn engine(&self) -> &Engine {
        self.handoff.launcher()
    }

    /// Launches, ops and the time breakdown so far.
    pub(crate) fn stats(&self) -> CoalesceStats {
        let engine = self.engine();
        CoalesceStats {
            direct: engine.alone.total.load(Ordering::Relaxed),
            ..engine.totals.snapshot()
        }
    }

    /// True when the next op should launch alone on its own stream instead of joining a
    /// batch (adaptive, while coalescing does not pay); counts it as such. Ends a phase of
    /// launching alone that is over.
    pub(crate) fn launches_alone(&self) -> bool {
        let engine = self.engine();
        let gate = &engine.alone;
        if !gate.on.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        let now_ns = nanos(now.saturating_duration_since(engine.epoch));
        if !gate.marked.load(Ordering::Relaxed) && now_ns >= gate.mid_ns.load(Ordering::Relaxed) {
            engine.mark_alone(&mut self.handoff.lock().state, now);
        }
        if now_ns >= gate.until_ns.load(Ordering::Relaxed)
            && gate.ops.load(Ordering::Relaxed) >= ALONE_PHASE_OPS
            && engine.end_alone(&mut self.handoff.lock().state, now)
        {
            return false;
        }
        gate.ops.fetch_add(1, Ordering::Relaxed);
        gate.total.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// True when completion is signalled through host memory (no events, no driver calls to
    /// wait).
    pub(crate) fn uses_signal(&self) -> bool {
        self.engine().signal.is_some()
    }

    pub(crate) fn stream(&self) -> &Arc<dyn BackendStream> {
        &self.engine().stream
    }

    /// Adds one op (kernel over `raw`, from stream `stream_id`) and returns its batch.
    pub(crate) fn submit(
        self: &Arc<Self>,
        kernel: Kernel,
        raw: SharedRaw,
        stream_id: usize,
    ) -> Result<Arc<Batch>> {
        let max_batch = self.engine().max_batch;
        let key = Arc::as_ptr(&raw);
        let batch = self.handoff.submit(
            |pending| {
                // Ops of the same stream or on the same buffer that are still pending go
                // first.
                let after = pending
                    .iter()
                    .rposition(|b| b.touches(stream_id, key))
                    .map_or(0, |i| i + 1);
                (after..pending.len()).find(|&i| {
                    let b = &pending[i];
                    b.kernel == kernel && b.len.load(Ordering::Relaxed) < max_batch
                })
            },
            || Ops {
                kernel,
                coalescer: Arc::downgrade(self),
                members: Mutex::new(Members::default()),
                len: AtomicUsize::new(0),
                first_submit: Instant::now(),
                launched_at: OnceLock::new(),
            },
            |b| {
                let len = {
                    let mut m = b.members.lock();
                    m.raws.push(raw);
                    m.streams.push(stream_id);
                    m.raws.len()
                };
                b.len.store(len, Ordering::Relaxed);
            },
        );
        Ok(batch)
    }

    /// Waits for `batch` to complete and returns its result.
    ///
    /// While the batch is pending, the waiter launches it when it is due; once launched, it
    /// waits for the completion signal (or, in event mode, the batch's event).
    pub(crate) fn wait(self: &Arc<Self>, batch: &Arc<Batch>) -> Result<()> {
        match self.handoff.wait(batch) {
            Waited::Done(r) => r.map_err(|f| f.to_error()),
            Waited::Launched => {
                let signal = self.engine().signal.as_ref().expect("signal mode");
                self.wait_signal(batch, &**signal)
            }
        }
    }

    /// Signal mode: polls the completion word until it reaches the batch's launch number. The
    /// first waiter of a batch also asks the stream for errors every `FAULT_POLL`, so a
    /// device fault (after which the word never arrives) ends every wait with that error.
    fn wait_signal(&self, batch: &Batch, signal: &dyn BackendSignal) -> Result<()> {
        let engine = self.engine();
        let seq = batch.seq();
        let watcher = batch.watch();
        let mut next_poll = None::<Instant>;
        let mut idle_polls = 0u32;
        let mut spins = 0u32;
        loop {
            if signal.value() >= seq {
                break;
            }
            if let Some(fault) = engine.fault.get() {
                if signal.value() >= seq {
                    break;
                }
                batch.fail(fault.clone());
                return result(batch);
            }
            spins = spins.wrapping_add(1);
            engine.relax(spins);
            if watcher && spins % 256 == 0 {
                let now = Instant::now();
                let next = *next_poll.get_or_insert(now + FAULT_POLL);
                if now >= next {
                    next_poll = Some(now + FAULT_POLL);
                    match engine.stream.query() {
                        Ok(false) => {}
                        // Idle, yet the word has not arrived: give the write a moment to
                        // land, then call it lost rather than wait forever.
                        Ok(true) if signal.value() >= seq => break,
                        Ok(true) => {
                            idle_polls += 1;
                            if idle_polls >= 50 {
                                let _ = engine.fault.set(Failure::Other(format!(
                                    "batch {seq}'s completion signal never arrived \
                                     (the stream is idle)"
                                )));
                            }
                        }
                        Err(e) => {
                            let _ = engine.fault.set(Failure::from(&e));
                        }
                    }
                }
            }
        }
        batch.complete();
        if let (true, Some(at)) = (watcher, batch.launched_at.get()) {
            let latency = at.elapsed();
            engine.record_completion(latency);
            if let CoalescePolicy::Adaptive { .. } = engine.policy {
                let mut q = self.handoff.lock();
                engine.adapt(
                    &mut q.state,
                    batch.len.load(Ordering::Relaxed) as u64,
                    latency,
                );
            }
        }
        self.handoff.kick();
        result(batch)
    }

    /// True when `batch` has completed (its error, if it failed). Never blocks; launches the
    /// pending batches if they are due.
    pub(crate) fn poll(&self, batch: &Batch) -> Result<bool> {
        let engine = self.engine();
        if let (Some(signal), true) = (&engine.signal, batch.is_launched()) {
            if signal.value() >= batch.seq() {
                return Ok(true);
            }
            if let Some(fault) = engine.fault.get() {
                batch.fail(fault.clone());
                return result(batch).map(|()| true);
            }
            if let Err(e) = engine.stream.query() {
                let _ = engine.fault.set(Failure::from(&e));
            }
            return Ok(false);
        }
        self.handoff.poll(batch).map_err(|f| f.to_error())
    }

    /// Launches every pending batch and waits for everything launched.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.handoff.flush_all();
        self.engine().stream.synchronize()?;
        self.handoff.reap();
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::backend::{BackendKind, DeviceOptions};

    /// Signal mode: the batch stream faults with two batches launched beyond the depth and
    /// nobody waiting for them, so the word never moves and "in flight" never falls. The
    /// waiter of a later, pending batch must get the fault instead of waiting for room for
    /// ever (it spun for ever before `Launcher::fault`).
    #[test]
    fn a_fault_ends_the_wait_of_a_pending_batch_while_the_device_looks_full() {
        let device = Device::open(&DeviceOptions {
            backend: Some(BackendKind::Cpu),
            cpu_units: Some(1),
            wait: Some(WaitPolicy::Yield),
            ..DeviceOptions::default()
        })
        .unwrap();
        let policy = CoalescePolicy::Fixed {
            max_batch: 2,
            max_delay: MAX_COALESCE_DELAY,
            depth: 1,
        };
        let c = CoalescerShared::new(&device, policy).unwrap();
        assert!(c.uses_signal());
        crate::backend::cpu::fail_for_testing(&**c.stream());
        let kernel = Kernel::SimpleCompute { iters: 1 };
        let bufs: Vec<_> = (0..4).map(|_| device.alloc(4).unwrap()).collect();
        // The first op launches at once (an idle device); the next two (streams 1 and 0)
        // fill a batch, which launches at once too: 2 in flight at depth 1.
        let launched: Vec<_> = [0, 1, 0]
            .into_iter()
            .zip(&bufs)
            .map(|(stream, buf)| c.submit(kernel, buf.shared_raw(), stream).unwrap())
            .collect();
        assert!(launched.iter().all(|b| !b.is_pending()));
        // One op, no deadline for an hour: pending until there is room.
        let pending = c.submit(kernel, bufs[3].shared_raw(), 0).unwrap();
        assert!(pending.is_pending());
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let c = c.clone();
            let pending = pending.clone();
            std::thread::spawn(move || {
                let _ = tx.send(c.wait(&pending));
            })
        };
        let waited = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the waiter of a pending batch hung after a device fault");
        assert!(
            waited.is_err(),
            "a batch on a failed stream reported success"
        );
        waiter.join().unwrap();
        for b in &launched {
            assert!(c.wait(b).is_err());
        }
        // Polling a pending batch gets there too (a loop on `is_complete` spun for ever).
        let buf = device.alloc(4).unwrap();
        let pending = c.submit(kernel, buf.shared_raw(), 0).unwrap();
        assert!(pending.is_pending());
        let started = Instant::now();
        loop {
            match c.poll(&pending) {
                Err(_) => break,
                Ok(done) => assert!(!done, "a batch on a failed stream reported success"),
            }
            assert!(started.elapsed() < Duration::from_secs(30), "polling hung");
            std::thread::yield_now();
        }
    }
}
