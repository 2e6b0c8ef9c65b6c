//! `Handoff`: batches handed from the threads that fill them to whoever launches them, and
//! from the device back to the threads that wait for them (the coalescer's state machine).
//!
//! A batch is created *pending* by a submitting thread, which (with any others) adds ops to
//! it. Pending batches form a queue and leave it front first, when *due*, through one
//! [`Combiner`]: whoever finds it idle launches every due batch, the others return at once.
//! A launched batch is *done* once the device completed it; its waiters then return its
//! result. What a launch is, when a batch is full or overdue, and what completion looks like
//! on the device are the [`Launcher`]'s (the coalescer: grouped launches, events or a signal
//! word); this module decides who launches, who waits, who finishes, and who wakes whom.
//!
//! Completion comes in two modes. *Signal mode*: the device writes the launch number of each
//! completed batch into a host word ([`Launcher::signal`]); waiters of a launched batch are
//! handed back to the caller ([`Waited::Launched`]), which polls the word and marks the batch
//! done. *Event mode*: each launch records an event, and batches are finished here.
//!
//! Invariants (checked by the loom models below: event mode, and signal mode with the caller's
//! polling of the word modelled as the coalescer does it):
//! - A batch's state only moves forward: pending → launched → done, or pending → done when
//!   its launch failed. Its launch number is stored before it is marked launched and its
//!   error (if any) before it is marked done, so a waiter that sees the state sees them. In
//!   event mode a batch is marked launched in the same critical section that queues it in
//!   `in_flight`, and finishers pop it under that lock, so "done" can never be overwritten by
//!   "launched". (Marked after the unlock, as before, a reaper could finish the batch first:
//!   it then stayed "launched" for ever, and its waiters other than the watcher, and every
//!   poll, waited for ever. The model `every_waiter_gets_its_batch_done` found it.)
//! - Batches leave `pending` front first, one at a time, only in the combiner's server (or
//!   `Drop`), and are launched in that order with launch numbers 1, 2, …; `launched_seq` is
//!   the last launch number. "In flight" is `launched_seq` minus the last launch number
//!   known complete (`completed_seq`, or the signal word).
//! - Event mode: `in_flight` holds every launched batch not yet done, in launch order. A
//!   batch is finished (done, event given back, `completed_seq` raised) only by popping it
//!   from the front of `in_flight` under the queue lock, so exactly once and in launch order.
//!   Finishers: the batch's *watcher* (the first of its waiters, elected by `watched`), which
//!   waits on its event and then finishes every batch up to it; or any *reaper* that finds
//!   the front batch's event complete. A reaper skips an event that is locked: its watcher is
//!   syncing it and will finish it. A watcher whose event failed asks each earlier batch's
//!   own event before finishing it (a device fault is sticky, so they may have failed too):
//!   a batch is never finished as a success on another batch's word.
//! - Batches nobody waits for are still finished: reaping happens before every launch, in
//!   every poll, in `reap`, and, while the device looks full (in flight ≥ depth), in every
//!   round of a waiter of a pending batch. Without that last rule, batches launched beyond
//!   `depth` (by a flush) whose tickets were all dropped were never finished, the device
//!   looked full for ever, and the waiters of later pending batches slept for ever (the hang
//!   fixed in 8a9e810; the model `dropped_batches_do_not_strand_waiters` fails without it).
//! - No lost wake-up: `block` waiters check their condition while holding `sleep` and sleep
//!   on `done`; every launch, failed launch and finish changes the state first, then takes
//!   and releases `sleep`, then notifies. A waiter thus either saw the change before sleeping
//!   or was asleep when notified. Waiters of pending batches also sleep with the batch's
//!   deadline, bounded by `REAP_EVERY`, since due-ness changes without a notification (time,
//!   device completions nobody waits on).
//! - A waiter of a pending batch launches it (through the combiner) once it is due, and a
//!   flush ([`Handoff::flush`]) makes a batch due at once and returns once it left `pending`.
//!   Signal mode: a device fault stops the word, so "in flight" never falls again; a waiter
//!   of a pending batch then flushes it once [`Launcher::fault`] reports the fault, rather
//!   than wait for room that never comes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::combiner::Combiner;
use super::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Condvar, Mutex, MutexGuard, Ordering};
use crate::backend::WaitPolicy;

/// Longest a `block` waiter of a pending batch sleeps before it looks at the device again
/// (reaping completed batches, which may make its own due).
const REAP_EVERY: std::time::Duration = std::time::Duration::from_micros(500);

const PENDING: u8 = 0;
const LAUNCHED: u8 = 1;
const DONE: u8 = 2;

/// Polls a `spin` waiter spins before it starts yielding between polls.
const SPIN_POLLS: u32 = 16;

/// Signal mode: polls between a pending batch's waiter's questions for a device fault (fewer
/// under loom, so the models reach a question).
#[cfg(not(loom))]
const FAULT_CHECK_POLLS: u32 = 256;
#[cfg(loom)]
const FAULT_CHECK_POLLS: u32 = 2;

/// What a [`Handoff`] needs from the device side: launching a batch, and (event mode) its
/// completion. Called without the queue lock unless said otherwise.
pub trait Launcher {
    /// What a batch carries besides its hand-off state (its ops, timestamps, …).
    type Payload;
    /// Event mode: what a launch records, to be queried or waited for its completion.
    type Event;
    /// Why a batch failed; each of its waiters gets a clone.
    type Failure: Clone;
    /// The launcher's own state, kept under the queue lock (the adaptive batch target, …).
    type State;

    /// Queues the launch of `batch` with launch number `seq` and its completion: the signal
    /// write (signal mode: returns `None`) or an event (event mode). Called by one thread at
    /// a time, in launch order.
    fn launch(&self, batch: &Self::Payload, seq: u64)
        -> Result<Option<Self::Event>, Self::Failure>;
    /// Event mode: true once `event` completed (its error if the device failed).
    fn is_complete(&self, event: &Self::Event) -> Result<bool, Self::Failure>;
    /// Event mode: waits until `event` completed.
    fn wait(&self, event: &Self::Event) -> Result<(), Self::Failure>;
    /// Event mode: `event` is no longer used (its batch is done).
    fn give_back(&self, event: Self::Event);
    /// Signal mode: the launch number of the last batch completed (the signal word).
    fn signal(&self) -> u64;
    /// True when `batch` (the front pending batch) is full (holds the batch target).
    fn full(&self, batch: &Self::Payload, state: &Self::State) -> bool;
    /// True when `batch`'s oldest op waited its maximum delay.
    fn overdue(&self, batch: &Self::Payload) -> bool;
    /// When `batch` becomes overdue.
    fn deadline(&self, batch: &Self::Payload) -> Instant;
    /// Event mode: `batch` completed (called once per launched batch, under the queue lock,
    /// before it is marked done).
    fn finished(&self, batch: &Self::Payload, state: &mut Self::State);
    /// Signal mode: the device's fault, if it has failed (sticky: after it, no launched batch
    /// completes, and the signal word stops). Asked by waiters of pending batches while the
    /// device looks full; the launcher limits how often it asks the device itself.
    fn fault(&self) -> Option<Self::Failure> {
        None
    }
}

/// A batch: the launcher's payload plus its hand-off state.
pub struct Batch<L: Launcher> {
    /// Creation order (1, 2, …), for "launch everything up to this batch".
    id: u64,
    payload: L::Payload,
    /// Launch number (1, 2, …); 0 while pending.
    seq: AtomicU64,
    state: AtomicU8,
    /// Set by the first waiter of a launched batch: the one that syncs its event (event
    /// mode) or watches the stream for faults (signal mode).
    watched: AtomicBool,
    /// Event mode: recorded after the launch; given back when the batch is done. Held by the
    /// watcher while it waits (reapers only `try_lock` it).
    event: Mutex<Option<L::Event>>,
    /// The first failure recorded (set before the batch is marked done).
    error: Mutex<Option<L::Failure>>,
}

impl<L: Launcher> std::ops::Deref for Batch<L> {
    type Target = L::Payload;

    fn deref(&self) -> &L::Payload {
        &self.payload
    }
}

impl<L: Launcher> Batch<L> {
    fn new(id: u64, payload: L::Payload) -> Self {
        Batch {
            id,
            payload,
            seq: AtomicU64::new(0),
            state: AtomicU8::new(PENDING),
            watched: AtomicBool::new(false),
            event: Mutex::new(None),
            error: Mutex::new(None),
        }
    }

    /// Its result: the failure recorded, if any (meaningful once done).
    pub fn result(&self) -> Result<(), L::Failure> {
        match &*self.error.lock() {
            Some(failure) => Err(failure.clone()),
            None => Ok(()),
        }
    }

    /// True while the batch waits to be launched.
    pub fn is_pending(&self) -> bool {
        self.state.load(Ordering::Acquire) == PENDING
    }

    /// True once launched and not yet done.
    pub fn is_launched(&self) -> bool {
        self.state.load(Ordering::Acquire) == LAUNCHED
    }

    /// Its launch number (0 while pending).
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Creation order (1, 2, …): batches launch in this order.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True for the first caller only: that waiter watches the batch.
    pub fn watch(&self) -> bool {
        !self.watched.swap(true, Ordering::AcqRel)
    }

    /// Records `failure` unless one is recorded already.
    fn set_error(&self, failure: L::Failure) {
        let mut error = self.error.lock();
        if error.is_none() {
            *error = Some(failure);
        }
    }

    /// Signal mode: marks the batch done with `failure` (unless one was recorded already).
    pub fn fail(&self, failure: L::Failure) {
        self.set_error(failure);
        self.state.store(DONE, Ordering::Release);
    }

    /// Signal mode: marks the batch done (its completion word arrived).
    pub fn complete(&self) {
        self.state.store(DONE, Ordering::Release);
    }
}

/// The queues, under the hand-off's lock.
pub struct Queues<L: Launcher> {
    /// Batches not launched yet, in launch order.
    pending: VecDeque<Arc<Batch<L>>>,
    /// Event mode: launched batches not done, in launch order.
    in_flight: VecDeque<Arc<Batch<L>>>,
    /// Id of the last batch created.
    next_id: u64,
    /// The launcher's state.
    pub state: L::State,
}

/// What a wait ended with.
pub enum Waited<F> {
    /// The batch is done: its result.
    Done(Result<(), F>),
    /// Signal mode: the batch was launched; the caller waits for its completion word.
    Launched,
}

/// Pending and launched batches, their launcher, and their waiters (see the module doc).
pub struct Handoff<L: Launcher> {
    launcher: L,
    /// Batches in flight before new ops wait to fill a batch.
    depth: u64,
    wait: WaitPolicy,
    /// Signal mode (else event mode).
    signalled: bool,
    /// Taken through [`Handoff::lock`]: every critical section is short, and a thread parked
    /// on it would hold up every launch by its wake-up latency. Never held across a launch.
    queues: Mutex<Queues<L>>,
    /// Serializes launches (so batches reach the device in the order they left `pending`)
    /// without blocking anyone.
    launcher_turn: Combiner,
    /// Launch number of the last launched batch.
    launched_seq: AtomicU64,
    /// Event mode: launch number of the last batch known complete.
    completed_seq: AtomicU64,
    /// Pending batches with an id up to this one are due at once.
    flush_to: AtomicU64,
    /// `pending.len()`, readable without the lock.
    pending_batches: AtomicUsize,
    /// `block` waiters sleep on `done` under `sleep`; notified at every launch and finish
    /// (after the change, under `sleep`, so no wake-up is lost).
    sleep: Mutex<()>,
    done: Condvar,
}

impl<L: Launcher> Handoff<L> {
    /// A hand-off launching through `launcher`, with at most `depth` batches in flight before
    /// new ops wait to fill a batch, waiters waiting per `wait`, completion signalled through
    /// [`Launcher::signal`] if `signalled` (else events), and the launcher's `state`.
    pub fn new(
        launcher: L,
        depth: u64,
        wait: WaitPolicy,
        signalled: bool,
        state: L::State,
    ) -> Self {
        Handoff {
            launcher,
            depth,
            wait,
            signalled,
            queues: Mutex::new(Queues {
                pending: VecDeque::new(),
                in_flight: VecDeque::new(),
                next_id: 0,
                state,
            }),
            launcher_turn: Combiner::new(),
            launched_seq: AtomicU64::new(0),
            completed_seq: AtomicU64::new(0),
            flush_to: AtomicU64::new(0),
            pending_batches: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            done: Condvar::new(),
        }
    }

    /// The launcher.
    pub fn launcher(&self) -> &L {
        &self.launcher
    }

    /// The queue lock, acquired by spinning, then yielding, never parking: a parked thread
    /// wakes tens of microseconds after the lock is free, longer than the whole launch cycle
    /// this lock sits in; yielding lets a descheduled holder run when threads outnumber
    /// cores.
    pub fn lock(&self) -> MutexGuard<'_, Queues<L>> {
        let mut tries = 0u32;
        loop {
            if let Some(guard) = self.queues.try_lock() {
                return guard;
            }
            tries += 1;
            if tries < 100 {
                super::spin_hint();
            } else {
                super::yield_now();
            }
        }
    }

    /// Launch number of the last batch known complete.
    fn completed(&self) -> u64 {
        if self.signalled {
            self.launcher.signal()
        } else {
            self.completed_seq.load(Ordering::Acquire)
        }
    }

    /// Batches launched and not known complete.
    pub fn in_flight(&self) -> u64 {
        self.launched_seq
            .load(Ordering::Acquire)
            .saturating_sub(self.completed())
    }

    /// Adds an op. Under the lock, `place` picks the pending batch to join (an index into
    /// the pending queue) or `None` for a new batch (made by `make`) at the back; `join` then
    /// adds the op to that batch. The batch is launched at once if it is the front one and
    /// due. Returns the batch.
    pub fn submit(
        &self,
        place: impl FnOnce(&VecDeque<Arc<Batch<L>>>) -> Option<usize>,
        make: impl FnOnce() -> L::Payload,
        join: impl FnOnce(&L::Payload),
    ) -> Arc<Batch<L>> {
        let mut q = self.lock();
        let index = match place(&q.pending) {
            Some(i) => i,
            None => {
                q.next_id += 1;
                let batch = Arc::new(Batch::new(q.next_id, make()));
                q.pending.push_back(batch);
                self.pending_batches
                    .store(q.pending.len(), Ordering::Release);
                q.pending.len() - 1
            }
        };
        let batch = q.pending[index].clone();
        join(&batch.payload);
        let due = index == 0 && self.front_due(&batch, &q.state);
        drop(q);
        if due {
            self.launch_due();
        }
        batch
    }

    /// Returns once `batch` is launched (or failed to launch): makes it due at once.
    pub fn flush(&self, batch: &Batch<L>) {
        self.flush_to.fetch_max(batch.id, Ordering::AcqRel);
        self.launch_due();
        while batch.is_pending() {
            super::yield_now();
            self.launch_due();
        }
    }

    /// Launches every batch pending now (and whatever is due after them); returns once each
    /// has left the pending queue.
    pub fn flush_all(&self) {
        let last = self.lock().next_id;
        self.flush_to.fetch_max(last, Ordering::AcqRel);
        loop {
            self.launch_due();
            let front = self.lock().pending.front().map(|b| b.id);
            match front {
                Some(id) if id <= last => super::yield_now(),
                _ => break,
            }
        }
    }

    /// Event mode: finishes the launched batches whose events completed (front first).
    pub fn reap(&self) {
        if !self.signalled {
            let mut q = self.lock();
            self.reap_locked(&mut q);
        }
    }

    /// Launches every due pending batch, front first, without blocking: if another thread is
    /// launching, it sees the request and checks again before it stops. Never called with the
    /// queue lock held.
    pub fn launch_due(&self) {
        self.launcher_turn.request(|| loop {
            let batch = {
                let mut q = self.lock();
                if !self.signalled {
                    self.reap_locked(&mut q);
                }
                let Some(front) = q.pending.front() else {
                    return;
                };
                let due = front.id <= self.flush_to.load(Ordering::Acquire)
                    || self.front_due(front, &q.state);
                if !due {
                    return;
                }
                let batch = q.pending.pop_front().expect("front exists");
                self.pending_batches
                    .store(q.pending.len(), Ordering::Release);
                batch
            };
            self.launch_one(&batch);
        });
    }

    /// Queues `batch`'s launch and marks it launched (or done, with its error). Called by one
    /// thread at a time: the combiner's server, or `Drop`.
    fn launch_one(&self, batch: &Arc<Batch<L>>) {
        let seq = self.launched_seq.load(Ordering::Acquire) + 1;
        match self.launcher.launch(&batch.payload, seq) {
            Ok(event) => {
                batch.seq.store(seq, Ordering::Release);
                *batch.event.lock() = event;
                if self.signalled {
                    batch.state.store(LAUNCHED, Ordering::Release);
                } else {
                    // Marked launched under the lock it is queued under: finishers pop it
                    // under that lock, so "done" always comes after "launched" (marked after
                    // the unlock, a reaper could finish it first and "launched" would then
                    // overwrite "done": its other waiters would wait for ever).
                    let mut q = self.lock();
                    q.in_flight.push_back(batch.clone());
                    batch.state.store(LAUNCHED, Ordering::Release);
                }
                self.launched_seq.store(seq, Ordering::Release);
            }
            Err(failure) => batch.fail(failure),
        }
        self.notify();
    }

    /// Wakes `block` waiters. Taking the lock first means a waiter either saw the change
    /// before sleeping or is already asleep and gets the notification.
    fn notify(&self) {
        if self.wait == WaitPolicy::Block {
            drop(self.sleep.lock());
            self.done.notify_all();
        }
    }

    /// Event mode: finishes in-flight batches whose event completed (front first; the device
    /// completes them in launch order).
    fn reap_locked(&self, q: &mut Queues<L>) {
        while let Some(front) = q.in_flight.front() {
            // A watcher holding the event is syncing it: it will finish the batch itself.
            let Some(event) = front.event.try_lock() else {
                break;
            };
            let complete = event
                .as_ref()
                .map_or(Ok(true), |ev| self.launcher.is_complete(ev));
            drop(event);
            match complete {
                Ok(false) => break,
                Ok(true) => self.finish_front(q, None),
                Err(failure) => self.finish_front(q, Some(failure)),
            }
        }
    }

    /// Event mode: the front in-flight batch completed (with `error`, if it failed).
    fn finish_front(&self, q: &mut Queues<L>, error: Option<L::Failure>) {
        let Some(b) = q.in_flight.pop_front() else {
            return;
        };
        if let Some(failure) = error {
            b.set_error(failure);
        }
        self.launcher.finished(&b.payload, &mut q.state);
        if let Some(ev) = b.event.lock().take() {
            self.launcher.give_back(ev);
        }
        b.state.store(DONE, Ordering::Release);
        self.completed_seq
            .fetch_max(b.seq.load(Ordering::Acquire), Ordering::AcqRel);
        self.notify();
    }

    /// One pause of a polling waiter: `spin` spins for the first `SPIN_POLLS` polls of a
    /// wait, then yields (spinning waiters starve the launching thread when they outnumber
    /// cores); `yield` always yields.
    fn relax(&self, polls: u32) {
        if self.wait == WaitPolicy::Spin && polls < SPIN_POLLS {
            super::spin_hint();
        } else {
            super::yield_now();
        }
    }

    /// True when `batch` is due, checked by its waiters while it is pending. (A full front
    /// batch was launched by the submission that filled it; the deadline is checked every
    /// 64th poll only.)
    fn pending_due(&self, batch: &Batch<L>, spins: u32) -> bool {
        // Event mode: only finishing lowers the in-flight count, and batches nobody waits
        // for (dropped tickets) would otherwise count as in flight for ever.
        if !self.signalled && self.in_flight() >= self.depth {
            self.reap();
        }
        self.in_flight() < self.depth
            || (spins % 64 == 0 && {
                let in_flight = self.in_flight();
                in_flight < self.depth
                    || (in_flight <= self.depth && self.launcher.overdue(&batch.payload))
            })
    }

    /// The launch rule for the front batch: full, room on the device, or overdue with at
    /// most `depth` batches on the device.
    fn front_due(&self, batch: &Batch<L>, state: &L::State) -> bool {
        let in_flight = self.in_flight();
        self.launcher.full(&batch.payload, state)
            || in_flight < self.depth
            || (in_flight <= self.depth && self.launcher.overdue(&batch.payload))
    }

    /// A batch completed: launches the front pending batch if the device has room now.
    pub fn kick(&self) {
        if self.pending_batches.load(Ordering::Acquire) > 0 && self.in_flight() < self.depth {
            self.launch_due();
        }
    }

    /// Waits for `batch`: while it is pending, launches it once due; once launched, waits for
    /// it (event mode) or hands it back to the caller (signal mode).
    pub fn wait(&self, batch: &Batch<L>) -> Waited<L::Failure> {
        let mut spins = 0u32;
        loop {
            match batch.state.load(Ordering::Acquire) {
                DONE => return Waited::Done(batch.result()),
                LAUNCHED if self.signalled => return Waited::Launched,
                LAUNCHED => return Waited::Done(self.wait_event(batch)),
                _pending => {
                    spins = spins.wrapping_add(1);
                    if self.pending_due(batch, spins) {
                        self.launch_due();
                        // Pause even under `spin`: waiters re-requesting in a tight loop kept
                        // the launching thread serving requests instead of returning to its
                        // own op (16 threads on the H100 swung between 228k and 457k ops/s).
                        super::yield_now();
                    } else if self.signalled
                        && spins % FAULT_CHECK_POLLS == 0
                        && self.launcher.fault().is_some()
                    {
                        // The word stopped with the device: "in flight" never falls, so the
                        // batch would never be due. Launched now, it gets the fault (its
                        // launch fails, or its wait sees the fault) instead of waiting for
                        // ever.
                        self.flush(batch);
                    } else {
                        match self.wait {
                            WaitPolicy::Spin | WaitPolicy::Yield => self.relax(spins),
                            WaitPolicy::Block => {
                                // Device completions wake no one (a batch whose tickets are
                                // held unwaited is finished only by a reap), so a sleeper also
                                // looks again every REAP_EVERY, not only at its deadline.
                                let deadline = self
                                    .launcher
                                    .deadline(&batch.payload)
                                    .min(Instant::now() + REAP_EVERY);
                                let sleep = self.sleep.lock();
                                if batch.is_pending() && self.in_flight() >= self.depth {
                                    self.done.wait_until(sleep, deadline);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Event mode: the watcher waits on the batch's event, then finishes it and every batch
    /// launched before it; the others wait for that (spinning, yielding or sleeping per the
    /// wait policy; sleepers are woken by every launch and finish).
    fn wait_event(&self, batch: &Batch<L>) -> Result<(), L::Failure> {
        if batch.watch() {
            return self.sync_event(batch);
        }
        loop {
            if batch.state.load(Ordering::Acquire) == DONE {
                return batch.result();
            }
            match self.wait {
                WaitPolicy::Spin => super::spin_hint(),
                WaitPolicy::Yield => super::yield_now(),
                WaitPolicy::Block => {
                    let mut sleep = self.sleep.lock();
                    if batch.state.load(Ordering::Acquire) != DONE {
                        sleep = self.done.wait(sleep);
                    }
                    drop(sleep);
                }
            }
        }
    }

    /// Event mode, the watcher: waits on the event, then finishes every batch up to this one.
    fn sync_event(&self, batch: &Batch<L>) -> Result<(), L::Failure> {
        let r = batch
            .event
            .lock()
            .as_ref()
            .map_or(Ok(()), |ev| self.launcher.wait(ev));
        let mut q = self.lock();
        let queued = q.in_flight.iter().any(|b| std::ptr::eq(&**b, batch));
        while let Some(front) = q.in_flight.front().cloned().filter(|_| queued) {
            let mine = std::ptr::eq(&*front, batch);
            let error = match &r {
                Err(failure) if mine => Some(failure.clone()),
                // A batch launched before a failed one may have failed too (a device fault
                // is sticky): its own event says, not this one. (Finished as a success here,
                // its own waiters, even its watcher, would have returned `Ok`.)
                Err(failure) => self.earlier_failure(&front, failure),
                Ok(()) => None,
            };
            self.finish_front(&mut q, error);
            if mine {
                break;
            }
        }
        drop(q);
        self.kick();
        batch.result()
    }

    /// Event mode: the failure of `earlier`, launched before a batch whose event failed with
    /// `later`. Waits for the event's lock (its watcher may be syncing it; it lets go before
    /// taking the queue lock, so holding that here cannot deadlock). Other threads wait on
    /// the queue lock meanwhile: on this fault path only, and briefly (the later event
    /// completed, so the earlier one's wait returns).
    fn earlier_failure(&self, earlier: &Batch<L>, later: &L::Failure) -> Option<L::Failure> {
        let event = earlier.event.lock();
        match event.as_ref().map(|ev| self.launcher.is_complete(ev)) {
            None | Some(Ok(true)) => None,
            // Not complete although a later batch is done: it cannot complete any more.
            Some(Ok(false)) => Some(later.clone()),
            Some(Err(failure)) => Some(failure),
        }
    }

    /// True when `batch` is done (its error, if it failed). Never blocks; launches the
    /// pending batches if they are due. Signal mode: a launched batch is not done until the
    /// caller, reading the word, says so.
    pub fn poll(&self, batch: &Batch<L>) -> Result<bool, L::Failure> {
        match batch.state.load(Ordering::Acquire) {
            DONE => batch.result().map(|()| true),
            LAUNCHED if self.signalled => Ok(false),
            LAUNCHED => {
                let mut q = self.lock();
                self.reap_locked(&mut q);
                match batch.state.load(Ordering::Acquire) {
                    DONE => batch.result().map(|()| true),
                    _ => Ok(false),
                }
            }
            _pending => {
                if self.pending_due(batch, 0) {
                    self.launch_due();
                } else if self.signalled && self.launcher.fault().is_some() {
                    // As in `wait`: the device will never look less full.
                    self.flush(batch);
                }
                Ok(false)
            }
        }
    }
}

impl<L: Launcher> Drop for Handoff<L> {
    fn drop(&mut self) {
        // Batches whose tickets were dropped may still be pending: launch them, so their
        // ops run as if launched alone (and threads waiting in `flush` go on).
        let pending = std::mem::take(&mut self.lock().pending);
        for batch in pending {
            self.launch_one(&batch);
            batch.state.store(DONE, Ordering::Release);
        }
        // Event mode: in-flight batches drop their events (the launcher goes too).
        let in_flight = std::mem::take(&mut self.lock().in_flight);
        for batch in in_flight {
            batch.event.lock().take();
            batch.state.store(DONE, Ordering::Release);
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc as LoomArc;

    /// The model's device: batches launched so far, and the last one it completed (in
    /// launch order, on its own thread: see [`run_device`]).
    struct FakeDevice {
        /// Most ops per batch (the batch target).
        max_batch: usize,
        /// The launch call (1, 2, …) that fails; 0: none.
        failing_call: u64,
        calls: AtomicU64,
        /// Launch number of the last batch launched / completed by the device.
        launched: AtomicU64,
        completed: AtomicU64,
        /// The device thread sleeps here while it has nothing to run, and so do threads
        /// waiting for an event (no spinning: it would only add interleavings).
        wake: Mutex<bool>,
        woken: Condvar,
        /// How many times each op (0, 1, …) was launched.
        ran: Mutex<Vec<u32>>,
        given_back: AtomicUsize,
        /// Events of launch numbers >= this fail (a sticky device fault); 0: none. In signal
        /// mode the device stops at that launch instead: the word never reaches it.
        fault_from: u64,
        /// Signal mode (completion through the word, no events).
        signalled: bool,
        /// Signal mode: the device stopped at `fault_from` (what a stream query would say).
        faulted: AtomicBool,
    }

    /// A batch's ops (their ids).
    struct Ops(Mutex<Vec<usize>>);

    impl Launcher for FakeDevice {
        type Payload = Ops;
        type Event = u64;
        type Failure = &'static str;
        type State = ();

        fn launch(&self, batch: &Ops, seq: u64) -> Result<Option<u64>, &'static str> {
            if self.calls.fetch_add(1, Ordering::Relaxed) + 1 == self.failing_call {
                return Err("launch failed");
            }
            let mut ran = self.ran.lock();
            for &op in batch.0.lock().iter() {
                ran[op] += 1;
            }
            let stop = self.wake.lock();
            self.launched.store(seq, Ordering::Release);
            drop(stop);
            self.woken.notify_all();
            Ok((!self.signalled).then_some(seq))
        }

        fn is_complete(&self, event: &u64) -> Result<bool, &'static str> {
            let done = self.completed.load(Ordering::Acquire) >= *event;
            if done && self.fault_from != 0 && *event >= self.fault_from {
                return Err("device fault");
            }
            Ok(done)
        }

        fn wait(&self, event: &u64) -> Result<(), &'static str> {
            let mut stop = self.wake.lock();
            while self.completed.load(Ordering::Acquire) < *event {
                stop = self.woken.wait(stop);
            }
            if self.fault_from != 0 && *event >= self.fault_from {
                return Err("device fault");
            }
            Ok(())
        }

        fn give_back(&self, _event: u64) {
            self.given_back.fetch_add(1, Ordering::Relaxed);
        }

        fn signal(&self) -> u64 {
            assert!(self.signalled, "the word is read in signal mode only");
            self.completed.load(Ordering::Acquire)
        }

        fn fault(&self) -> Option<&'static str> {
            self.faulted
                .load(Ordering::Acquire)
                .then_some("device fault")
        }

        fn full(&self, batch: &Ops, _state: &()) -> bool {
            batch.0.lock().len() >= self.max_batch
        }

        /// Deadlines never pass in the models: a batch launches only when full, when the
        /// device has room, or when flushed, so no clock hides a missing wake-up or reap.
        fn overdue(&self, _batch: &Ops) -> bool {
            false
        }

        fn deadline(&self, _batch: &Ops) -> Instant {
            Instant::now()
        }

        fn finished(&self, _batch: &Ops, _state: &mut ()) {}
    }

    type Model = Handoff<FakeDevice>;
    /// A model thread's body; returns the batches it made.
    type Body = fn(&Model) -> Vec<Arc<Batch<FakeDevice>>>;

    fn device(ops: usize, max_batch: usize, failing_call: u64) -> FakeDevice {
        FakeDevice {
            max_batch,
            failing_call,
            calls: AtomicU64::new(0),
            launched: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            wake: Mutex::new(false),
            woken: Condvar::new(),
            ran: Mutex::new(vec![0; ops]),
            given_back: AtomicUsize::new(0),
            fault_from: 0,
            signalled: false,
            faulted: AtomicBool::new(false),
        }
    }

    fn handoff(
        ops: usize,
        max_batch: usize,
        depth: u64,
        wait: WaitPolicy,
        failing_call: u64,
    ) -> Model {
        Handoff::new(device(ops, max_batch, failing_call), depth, wait, false, ())
    }

    /// As [`handoff`], in signal mode (`yield` waits), with the device stopping at launch
    /// `fault_from` (0: never).
    fn signalled_handoff(ops: usize, max_batch: usize, depth: u64, fault_from: u64) -> Model {
        let mut device = device(ops, max_batch, 0);
        device.signalled = true;
        device.fault_from = fault_from;
        Handoff::new(device, depth, WaitPolicy::Yield, true, ())
    }

    /// Submits op `op`: joins the first pending batch with room, else starts one.
    fn submit(h: &Model, op: usize) -> Arc<Batch<FakeDevice>> {
        let max_batch = h.launcher().max_batch;
        h.submit(
            |pending| pending.iter().position(|b| b.0.lock().len() < max_batch),
            || Ops(Mutex::new(Vec::new())),
            |ops| ops.0.lock().push(op),
        )
    }

    /// Waits as the coalescer does: in signal mode, a launched batch is polled through the
    /// word (and failed on a fault, as the coalescer's watcher does), then marked done.
    fn wait(h: &Model, batch: &Batch<FakeDevice>) -> Result<(), &'static str> {
        match h.wait(batch) {
            Waited::Done(r) => r,
            Waited::Launched => {
                let d = h.launcher();
                loop {
                    if d.signal() >= batch.seq() {
                        batch.complete();
                        h.kick();
                        return batch.result();
                    }
                    if let Some(fault) = d.fault() {
                        batch.fail(fault);
                        return batch.result();
                    }
                    let stop = d.wake.lock();
                    if d.signal() < batch.seq() && d.fault().is_none() {
                        drop(d.woken.wait(stop));
                    }
                }
            }
        }
    }

    /// The device: completes launched batches one at a time, in launch order, until told to
    /// stop with nothing left to run.
    fn run_device(h: &Model) {
        let d = h.launcher();
        let mut stop = d.wake.lock();
        loop {
            let completed = d.completed.load(Ordering::Relaxed);
            let stopped = d.signalled && d.fault_from != 0 && completed + 1 >= d.fault_from;
            if completed < d.launched.load(Ordering::Acquire) && stopped {
                // Signal mode: the device fails at this launch and writes nothing more.
                d.faulted.store(true, Ordering::Release);
                d.woken.notify_all();
                while !*stop {
                    stop = d.woken.wait(stop);
                }
                return;
            } else if completed < d.launched.load(Ordering::Acquire) {
                d.completed.store(completed + 1, Ordering::Release);
                d.woken.notify_all();
            } else if *stop {
                return;
            } else {
                stop = d.woken.wait(stop);
            }
        }
    }

    /// Runs `threads` against a hand-off and a device thread; afterwards every batch the
    /// threads made is finished by one last reap, and every launched event was given back
    /// exactly once.
    fn check(
        preemptions: usize,
        make: impl Fn() -> Model + Sync + Send + 'static,
        threads: Vec<Body>,
    ) {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(preemptions);
        model.check(move || {
            let h = LoomArc::new(make());
            let device = {
                let h = h.clone();
                loom::thread::spawn(move || run_device(&h))
            };
            let workers: Vec<_> = threads
                .iter()
                .map(|&body| {
                    let h = h.clone();
                    loom::thread::spawn(move || body(&h))
                })
                .collect();
            let batches: Vec<_> = workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect();
            *h.launcher().wake.lock() = true;
            h.launcher().woken.notify_all();
            device.join().unwrap();
            h.reap();
            assert!(
                h.lock().in_flight.is_empty(),
                "a completed batch was never finished"
            );
            let d = h.launcher();
            if !d.faulted.load(Ordering::Relaxed) {
                assert_eq!(h.in_flight(), 0);
            }
            if !d.signalled {
                assert_eq!(
                    d.given_back.load(Ordering::Relaxed) as u64,
                    d.launched.load(Ordering::Relaxed),
                    "every launched batch's event is given back once"
                );
            }
            for b in &batches {
                assert!(
                    !b.is_pending() && !b.is_launched(),
                    "a batch was left unfinished"
                );
            }
        });
    }

    /// Depth 1, batches of 2: op 0 launches at once (an idle device); op 1's batch is
    /// flushed (two batches on the device); both tickets are dropped unwaited; op 2 then
    /// starts a batch that stays pending while the device looks full. Returns that batch.
    fn two_unwaited_then_a_pending_batch(h: &Model) -> Arc<Batch<FakeDevice>> {
        let b0 = submit(h, 0);
        drop(b0);
        let b1 = submit(h, 1);
        h.flush(&b1);
        drop(b1);
        submit(h, 2)
    }

    /// The hang fixed in 8a9e810. One thread (depth 1, batches of 2): op 0 launches at once;
    /// op 1 waits in a new batch, is flushed (two batches on the device although depth is 1),
    /// and both tickets are dropped; op 2 then waits in a pending batch while the device
    /// looks full. Nobody waits for the first two batches, so only the waiter of the third
    /// can find them complete: without reaping while the device looks full, it would wait
    /// for ever (under loom, the model exceeds its branch limit).
    #[test]
    fn dropped_batches_do_not_strand_waiters() {
        for policy in [WaitPolicy::Block, WaitPolicy::Yield] {
            check(
                3,
                move || handoff(3, 2, 1, policy, 0),
                vec![
                    (|h: &Model| {
                        let b2 = two_unwaited_then_a_pending_batch(h);
                        assert_eq!(wait(h, &b2), Ok(()));
                        assert!(h.launcher().ran.lock().iter().all(|&n| n == 1));
                        vec![b2]
                    }) as Body,
                ],
            );
        }
    }

    /// Two threads each submit an op and wait for it (depth 1, batches of 2, `block`: the
    /// non-watching waiter of a launched batch sleeps on the condvar). Whatever the
    /// interleaving, both return `Ok`, each op was launched exactly once, and nobody sleeps
    /// through the wake-up.
    #[test]
    fn every_waiter_gets_its_batch_done() {
        check(
            2,
            || handoff(2, 2, 1, WaitPolicy::Block, 0),
            vec![
                (|h: &Model| {
                    let b = submit(h, 0);
                    assert_eq!(wait(h, &b), Ok(()));
                    assert_eq!(h.launcher().ran.lock()[0], 1);
                    vec![b]
                }) as Body,
                |h| {
                    let b = submit(h, 1);
                    assert_eq!(wait(h, &b), Ok(()));
                    assert_eq!(h.launcher().ran.lock()[1], 1);
                    vec![b]
                },
            ],
        );
    }

    /// The first launch fails: every op of that batch (one or both, depending on the
    /// interleaving) gets the failure, every other op runs once and gets `Ok`, and the
    /// failed batch never counts as in flight.
    #[test]
    fn a_failed_launch_fails_each_of_its_ops_only() {
        fn body(h: &Model, op: usize) -> Vec<Arc<Batch<FakeDevice>>> {
            let b = submit(h, op);
            let r = wait(h, &b);
            let ran = h.launcher().ran.lock()[op];
            match r {
                Ok(()) => assert_eq!(ran, 1),
                Err(e) => {
                    assert_eq!(e, "launch failed");
                    assert_eq!(ran, 0);
                }
            }
            vec![b]
        }
        check(
            2,
            || handoff(2, 2, 1, WaitPolicy::Block, 1),
            vec![(|h: &Model| body(h, 0)) as Body, |h| body(h, 1)],
        );
    }

    /// Batch 1 faults on the device (sticky: every event from launch 1 on fails), and the
    /// watcher of batch 2 finishes it: the fault must reach batch 1's op too, not `Ok`.
    /// (Finishing earlier batches without asking their events reported it as a success.)
    #[test]
    fn a_faulted_batch_finished_by_a_later_watcher_reports_the_fault() {
        check(
            2,
            || {
                let mut h = handoff(2, 1, 2, WaitPolicy::Block, 0);
                h.launcher.fault_from = 1;
                h
            },
            vec![
                (|h: &Model| {
                    let b1 = submit(h, 0);
                    let b2 = submit(h, 1);
                    let r2 = wait(h, &b2);
                    let r1 = wait(h, &b1);
                    assert_eq!(r2, Err("device fault"));
                    assert_eq!(r1, Err("device fault"), "batch 1 faulted but its op got Ok");
                    vec![b1, b2]
                }) as Body,
            ],
        );
    }

    /// As above with two threads, one op each (batches of 1, depth 2): whichever of them
    /// finishes the other's batch (the watcher of batch 2 may sweep batch 1 while batch 1's
    /// own watcher is still syncing its event), both get the fault.
    #[test]
    fn a_fault_reaches_every_batch_whoever_finishes_it() {
        fn body(h: &Model, op: usize) -> Vec<Arc<Batch<FakeDevice>>> {
            let b = submit(h, op);
            assert_eq!(
                wait(h, &b),
                Err("device fault"),
                "op {op} faulted but got Ok"
            );
            vec![b]
        }
        check(
            2,
            || {
                let mut h = handoff(2, 1, 2, WaitPolicy::Block, 0);
                h.launcher.fault_from = 1;
                h
            },
            vec![(|h: &Model| body(h, 0)) as Body, |h| body(h, 1)],
        );
    }

    /// Signal mode: two threads each submit an op and wait for it (depth 1, batches of 2,
    /// `yield`): a launched batch is handed back and polled through the word, then the next
    /// pending batch is launched by `kick`. Both return `Ok`, each op launched exactly once.
    #[test]
    fn signal_mode_every_waiter_gets_its_batch_done() {
        fn body(h: &Model, op: usize) -> Vec<Arc<Batch<FakeDevice>>> {
            let b = submit(h, op);
            assert_eq!(wait(h, &b), Ok(()));
            assert_eq!(h.launcher().ran.lock()[op], 1);
            vec![b]
        }
        check(
            2,
            || signalled_handoff(2, 2, 1, 0),
            vec![(|h: &Model| body(h, 0)) as Body, |h| body(h, 1)],
        );
    }

    /// Signal mode, the hang a host review found. One thread (depth 1, batches of 2): op 0
    /// launches at once and its batch faults, so the word never moves; op 1's batch is
    /// flushed (two on the device, depth 1) and both tickets are dropped; op 2 then waits in
    /// a pending batch while the device looks full for ever. It must get the fault (through
    /// `Launcher::fault`) instead of waiting for room (under loom: the branch limit).
    #[test]
    fn signal_mode_a_fault_ends_a_pending_waiters_wait() {
        check(
            3,
            || signalled_handoff(3, 2, 1, 1),
            vec![
                (|h: &Model| {
                    let b2 = two_unwaited_then_a_pending_batch(h);
                    assert_eq!(wait(h, &b2), Err("device fault"));
                    vec![b2]
                }) as Body,
            ],
        );
    }
}
