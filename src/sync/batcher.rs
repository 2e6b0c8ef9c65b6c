//! `Batcher`: requests from many threads, executed together by one of them (group commit).
//!
//! Each caller of [`Batcher::submit`] queues its request and either *leads* or *waits*. A
//! leader takes the oldest queued requests (up to `max_weight`, always at least one) once
//! fewer than `max_leaders` batches are running, runs them as one batch outside the lock,
//! hands every request its own result, and then either passes leadership to the oldest
//! waiting request or steps down. Up to `max_leaders` batches run at once (one per executor
//! the caller owns: a stream and its scratch memory).
//!
//! [`Batcher::submit_staged`] splits a batch into `launch` and `complete`: a leader whose own
//! request is in the batch it launched passes leadership on at once, then completes the batch
//! and hands out the results, so the next batch is gathered and launched while this one runs
//! on the device (the device never waits for the host's hand-off). While every batch slot is
//! taken, the next leader waits with the queue open, so requests arriving meanwhile gather
//! into its batch.
//!
//! Invariants (checked by the loom models below):
//! - Every request is executed exactly once, in exactly one batch, and its caller gets the
//!   result computed for it (results are matched by position, never by arrival).
//! - Requests leave the queue in arrival order (FIFO), so a request waits for at most the
//!   batches ahead of it.
//! - `leaders` counts the threads that lead or have been told to lead and not yet stopped;
//!   it never exceeds `max_leaders`. While the queue is not empty at least one leader exists:
//!   a new request leads when there is room; a leader leaves only by handing leadership to a
//!   waiting request (the "lead" flag on its slot) or, when no queued request is waiting,
//!   while the queue holds only requests of other leaders or nothing. Stepping down and taking
//!   a batch happen under the same lock as arrivals, so no arrival is missed.
//! - `inflight` counts batches taken and not yet completed; it never exceeds `max_leaders`
//!   (a leader takes a batch only below it, under the lock).
//! - A leading thread's slot carries the lead flag, so leadership is only ever handed to a
//!   thread that is waiting (never counted twice).
//! - A thread told to lead whose own request another leader already ran still acts as a
//!   leader once (takes a batch or steps down) before it returns, so `leaders` never leaks.
//! - A panicking batch does not strand its waiters: each gets an error naming the panic.

use std::collections::VecDeque;

use super::{AtomicU64, Condvar, Mutex, Ordering};
use crate::backend::WaitPolicy;

#[cfg(loom)]
use loom::sync::Arc;
#[cfg(not(loom))]
use std::sync::Arc;

/// Slot flags: the caller must lead; the result is in.
const LEAD: u64 = 1;
const DONE: u64 = 2;

/// Polls a `spin` waiter spins before it yields between polls (as the coalescer's waiters).
const SPIN_POLLS: u32 = 16;

struct Slot<R> {
    flags: AtomicU64,
    value: Mutex<Option<Result<R, String>>>,
    /// For `block` waiters only.
    sleep: Mutex<()>,
    wake: Condvar,
}

impl<R> Slot<R> {
    fn new() -> Self {
        Slot {
            flags: AtomicU64::new(0),
            value: Mutex::new(None),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    fn raise(&self, flag: u64, policy: WaitPolicy) {
        self.flags.fetch_or(flag, Ordering::AcqRel);
        if policy == WaitPolicy::Block {
            // Taking the lock orders this after a sleeper's check (see `wait`).
            drop(self.sleep.lock());
            self.wake.notify_all();
        }
    }

    fn finish(&self, value: Result<R, String>, policy: WaitPolicy) {
        *self.value.lock() = Some(value);
        self.raise(DONE, policy);
    }

    /// Waits until a flag is up; returns the flags.
    fn wait(&self, policy: WaitPolicy) -> u64 {
        let mut polls = 0u32;
        loop {
            let f = self.flags.load(Ordering::Acquire);
            if f != 0 {
                return f;
            }
            match policy {
                WaitPolicy::Spin if polls < SPIN_POLLS => super::spin_hint(),
                WaitPolicy::Spin | WaitPolicy::Yield => super::yield_now(),
                WaitPolicy::Block => {
                    let mut g = self.sleep.lock();
                    while self.flags.load(Ordering::Acquire) == 0 {
                        g = self.wake.wait(g);
                    }
                    drop(g);
                }
            }
            polls = polls.saturating_add(1);
        }
    }

    fn take(&self) -> Result<R, String> {
        self.value
            .lock()
            .take()
            .unwrap_or_else(|| Err("a batch ended without a result for this request".into()))
    }
}

struct Entry<Q, R> {
    request: Q,
    weight: usize,
    slot: Arc<Slot<R>>,
}

struct State<Q, R> {
    queue: VecDeque<Entry<Q, R>>,
    leaders: usize,
    /// Batches taken and not yet completed.
    inflight: usize,
}

/// Requests of type `Q` answered with `R`, executed in batches by the submitting threads.
pub struct Batcher<Q, R> {
    state: Mutex<State<Q, R>>,
    /// Signalled when a batch completes (a `block` leader waits here for room).
    room: Condvar,
    max_weight: usize,
    max_leaders: usize,
    policy: WaitPolicy,
}

/// What one batch did, as the leader saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchInfo {
    /// Requests in the batch.
    pub requests: usize,
    /// Their total weight.
    pub weight: usize,
}

impl<Q, R> Batcher<Q, R> {
    /// A batcher running batches of total weight at most `max_weight` (a heavier request runs
    /// alone), at most `max_leaders` at once; waiters wait per `policy`.
    pub fn new(max_weight: usize, max_leaders: usize, policy: WaitPolicy) -> Self {
        Batcher {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                leaders: 0,
                inflight: 0,
            }),
            room: Condvar::new(),
            max_weight: max_weight.max(1),
            max_leaders: max_leaders.max(1),
            policy,
        }
    }

    /// Submits `request` (of `weight`, e.g. rows) and returns its result. `exec` runs a batch:
    /// given the requests in arrival order, it returns one result per request in the same
    /// order. It may be called by this thread for other threads' requests, so every caller
    /// must pass an equivalent `exec`. Calls `on_batch` after each batch this thread led.
    pub fn submit(
        &self,
        request: Q,
        weight: usize,
        exec: impl FnMut(Vec<Q>) -> Vec<R>,
        on_batch: impl FnMut(BatchInfo),
    ) -> Result<R, String> {
        self.submit_staged(request, weight, exec, |r| r, on_batch)
    }

    /// [`submit`](Self::submit) in two stages: `launch` starts a batch and returns its
    /// pending state, `complete` finishes it and returns one result per request. Between the
    /// two, the leader hands leadership on (when its own request is in the batch), so the
    /// next batch can be taken and launched while this one runs; at most `max_leaders`
    /// batches are between `launch` and the end of `complete` at once.
    pub fn submit_staged<L>(
        &self,
        request: Q,
        weight: usize,
        mut launch: impl FnMut(Vec<Q>) -> L,
        mut complete: impl FnMut(L) -> Vec<R>,
        mut on_batch: impl FnMut(BatchInfo),
    ) -> Result<R, String> {
        let slot = Arc::new(Slot::new());
        let mut lead = {
            let mut st = self.state.lock();
            st.queue.push_back(Entry {
                request,
                weight,
                slot: slot.clone(),
            });
            if st.leaders < self.max_leaders {
                st.leaders += 1;
                // Marked as leading, so no finishing leader hands us its leadership too.
                slot.flags.fetch_or(LEAD, Ordering::AcqRel);
                true
            } else {
                false
            }
        };
        loop {
            if !lead {
                let flags = slot.wait(self.policy);
                if flags & LEAD == 0 {
                    return slot.take();
                }
                lead = true;
            }
            // Leading: take the oldest requests once a batch may start, or step down when
            // there are none.
            let batch = self.take_batch();
            if batch.is_empty() {
                // Another leader took our request (we were told to lead meanwhile).
                lead = false;
                slot.flags.fetch_and(!LEAD, Ordering::AcqRel);
                if slot.flags.load(Ordering::Acquire) & DONE != 0 {
                    return slot.take();
                }
                continue;
            }
            let info = BatchInfo {
                requests: batch.len(),
                weight: batch.iter().map(|e| e.weight).sum(),
            };
            let (requests, slots): (Vec<Q>, Vec<Arc<Slot<R>>>) =
                batch.into_iter().map(|e| (e.request, e.slot)).unzip();
            let n = requests.len();
            let ours = slots.iter().any(|s| Arc::ptr_eq(s, &slot));
            let launched = run_guarded(|| launch(requests));
            if ours {
                // Our request is in this batch: the next batch needs another leader.
                self.hand_over(&slot);
            }
            let outcome = launched.and_then(|l| run_guarded(|| complete(l)));
            {
                let mut st = self.state.lock();
                st.inflight -= 1;
            }
            if self.policy == WaitPolicy::Block {
                self.room.notify_all();
            }
            match outcome {
                Ok(results) => {
                    let mut results = results.into_iter();
                    for s in &slots {
                        let r = results.next().ok_or_else(|| {
                            format!("the batch returned fewer results than its {n} requests")
                        });
                        s.finish(r, self.policy);
                    }
                }
                Err(msg) => {
                    for s in &slots {
                        s.finish(Err(msg.clone()), self.policy);
                    }
                }
            }
            on_batch(info);
            if ours {
                return slot.take();
            }
            if slot.flags.load(Ordering::Acquire) & DONE != 0 {
                // Another leader ran ours meanwhile: leave instead of leading on.
                self.hand_over(&slot);
                return slot.take();
            }
        }
    }

    /// The oldest queued requests (up to `max_weight`, at least one) once fewer than
    /// `max_leaders` batches are running, counted as running; empty, with this leader
    /// stepped down, when nothing is queued.
    fn take_batch(&self) -> Vec<Entry<Q, R>> {
        let mut polls = 0u32;
        let mut st = self.state.lock();
        loop {
            if st.queue.is_empty() {
                st.leaders -= 1;
                return Vec::new();
            }
            if st.inflight < self.max_leaders {
                break;
            }
            // Every batch slot is taken: requests gather meanwhile.
            match self.policy {
                WaitPolicy::Block => st = self.room.wait(st),
                WaitPolicy::Spin | WaitPolicy::Yield => {
                    drop(st);
                    if self.policy == WaitPolicy::Spin && polls < SPIN_POLLS {
                        super::spin_hint();
                    } else {
                        super::yield_now();
                    }
                    polls = polls.saturating_add(1);
                    st = self.state.lock();
                }
            }
        }
        let mut taken = Vec::new();
        let mut weight = 0usize;
        while let Some(front) = st.queue.front() {
            if !taken.is_empty() && weight.saturating_add(front.weight) > self.max_weight {
                break;
            }
            weight = weight.saturating_add(front.weight);
            taken.push(st.queue.pop_front().expect("front exists"));
        }
        st.inflight += 1;
        taken
    }

    /// Leaves leadership: to the oldest queued request that is waiting, or by stepping down.
    fn hand_over(&self, own: &Slot<R>) {
        own.flags.fetch_and(!LEAD, Ordering::AcqRel);
        let mut st = self.state.lock();
        let next = st
            .queue
            .iter()
            .find(|e| e.slot.flags.load(Ordering::Acquire) & LEAD == 0);
        match next {
            Some(e) => e.slot.raise(LEAD, self.policy),
            None => st.leaders -= 1,
        }
    }
}

/// Runs `f`, turning a panic into an error message (so waiters are never stranded).
fn run_guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        format!("the batch's executor panicked: {what}")
    })
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    fn model(threads: u32, max_weight: usize, max_leaders: usize, policy: WaitPolicy) {
        run_model(threads, max_weight, max_leaders, policy, false);
    }

    /// With `staged`, batches go through `submit_staged` (leadership passed on between
    /// launch and complete) and every launch checks the batch-slot bound.
    fn run_model(
        threads: u32,
        max_weight: usize,
        max_leaders: usize,
        policy: WaitPolicy,
        staged: bool,
    ) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(2);
        builder.check(move || {
            let b = Arc::new(Batcher::<u32, u32>::new(max_weight, max_leaders, policy));
            let runs = Arc::new(crate::sync::Mutex::new(Vec::new()));
            let handles: Vec<_> = (1..=threads)
                .map(|id| {
                    let (b, runs) = (b.clone(), runs.clone());
                    loom::thread::spawn(move || {
                        let exec = |reqs: Vec<u32>| {
                            runs.lock().extend(reqs.iter().copied());
                            reqs.iter().map(|r| r * 10).collect::<Vec<_>>()
                        };
                        let got = if staged {
                            b.submit_staged(
                                id,
                                1,
                                |reqs| {
                                    let running = b.state.lock().inflight;
                                    assert!(running >= 1 && running <= max_leaders);
                                    exec(reqs)
                                },
                                |out| out,
                                |_| {},
                            )
                        } else {
                            b.submit(id, 1, exec, |_| {})
                        };
                        assert_eq!(got, Ok(id * 10), "a caller got another's result");
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let mut ran = runs.lock().clone();
            ran.sort_unstable();
            assert_eq!(ran, (1..=threads).collect::<Vec<_>>(), "run twice or never");
            let st = b.state.lock();
            assert_eq!(st.leaders, 0, "a leader was leaked");
            assert_eq!(st.inflight, 0, "a batch slot was leaked");
            assert!(st.queue.is_empty());
        });
    }

    // Waiters sleep (`block`) in the three-thread models: a polling waiter under loom is a
    // spin loop whose every iteration is a branch, which exhausts the model's budget without
    // exploring anything new. The polling path differs only in how a waiter waits; it is
    // modelled with two threads.

    /// One leader at a time, batches of two: the third request is led by a promoted waiter.
    #[test]
    fn every_request_runs_once_one_leader() {
        model(3, 2, 1, WaitPolicy::Block);
    }

    /// Two leaders: a promoted waiter may find its request taken by the other leader.
    #[test]
    fn every_request_runs_once_two_leaders() {
        model(3, 1, 2, WaitPolicy::Block);
    }

    /// Staged batches, one slot: leadership passes on at launch, and the next leader waits
    /// (asleep) for the slot while requests gather.
    #[test]
    fn staged_batches_pass_leadership_at_launch() {
        run_model(3, 1, 1, WaitPolicy::Block, true);
    }

    /// Staged batches, two slots, batches of two.
    #[test]
    fn staged_batches_two_slots() {
        run_model(3, 2, 2, WaitPolicy::Block, true);
    }

    /// Staged batches with a polling leader waiting for the slot.
    #[test]
    fn staged_polling_leader_waits_for_room() {
        run_model(2, 1, 1, WaitPolicy::Yield, true);
    }

    /// Polling waiters: leadership handed over to a yielding waiter.
    #[test]
    fn polling_waiters_take_over() {
        model(2, 1, 1, WaitPolicy::Yield);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn concurrent_requests_are_batched_and_each_gets_its_own_result() {
        let b = Arc::new(Batcher::<usize, usize>::new(8, 1, WaitPolicy::Yield));
        let batches = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..16)
            .map(|t| {
                let (b, batches) = (b.clone(), batches.clone());
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let id = t * 1000 + i;
                        let got = b.submit(
                            id,
                            1,
                            |reqs| {
                                std::thread::sleep(std::time::Duration::from_micros(50));
                                reqs.iter().map(|r| r + 7).collect()
                            },
                            |info| {
                                assert!(info.requests >= 1 && info.weight <= 8);
                                batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            },
                        );
                        assert_eq!(got, Ok(id + 7));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let n = batches.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n < 16 * 200, "no batching happened: {n} batches");
        assert_eq!(b.state.lock().leaders, 0);
    }

    #[test]
    fn staged_batches_overlap_within_the_slot_bound() {
        let b = Arc::new(Batcher::<usize, usize>::new(4, 2, WaitPolicy::Spin));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let (b, running, most) = (b.clone(), running.clone(), most.clone());
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let id = t * 1000 + i;
                        let got = b.submit_staged(
                            id,
                            1,
                            |reqs| {
                                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                                most.fetch_max(now, Ordering::SeqCst);
                                reqs
                            },
                            |reqs| {
                                std::thread::sleep(std::time::Duration::from_micros(20));
                                running.fetch_sub(1, Ordering::SeqCst);
                                reqs.iter().map(|r| r * 3).collect()
                            },
                            |info| assert!(info.requests >= 1 && info.weight <= 4),
                        );
                        assert_eq!(got, Ok(id * 3));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let most = most.load(Ordering::SeqCst);
        assert!(
            (1..=2).contains(&most),
            "{most} batches between launch and complete"
        );
        let st = b.state.lock();
        assert_eq!((st.leaders, st.inflight), (0, 0));
    }

    #[test]
    fn a_panicking_batch_fails_its_requests_and_the_batcher_goes_on() {
        let b = Batcher::<u32, u32>::new(4, 1, WaitPolicy::Block);
        let r = b.submit(1, 1, |_| panic!("boom"), |_| {});
        assert!(r.unwrap_err().contains("boom"));
        assert_eq!(b.submit(2, 1, |q| q, |_| {}), Ok(2));
        let short = b.submit(3, 1, |_| Vec::new(), |_| {});
        assert!(short.unwrap_err().contains("fewer results"));
        let late = b.submit_staged(4, 1, |q| q, |_: Vec<u32>| panic!("late"), |_| {});
        assert!(late.unwrap_err().contains("late"));
        assert_eq!(b.submit_staged(5, 1, |q| q, |q| q, |_| {}), Ok(5));
        assert_eq!(b.state.lock().inflight, 0);
    }

    #[test]
    fn heavy_requests_run_alone() {
        let b = Batcher::<u32, usize>::new(4, 1, WaitPolicy::Spin);
        let got = b.submit(9, 100, |q| vec![q.len()], |i| assert_eq!(i.weight, 100));
        assert_eq!(got, Ok(1));
    }
}
