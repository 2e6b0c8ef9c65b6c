//! `OrderedQueue`: an in-order queue of tasks drained by at most one job at a time, with a
//! completion count that threads wait on. It is the CPU backend's stream.
//!
//! Protocol: `push` appends a task and returns its sequence number (1, 2, …) and whether the
//! caller must start a drain job (true exactly when none is queued or running). A drain job
//! repeatedly takes the oldest task with `next`, runs it outside the lock, and reports it with
//! `complete`, which says whether more tasks wait (the job then continues, or re-queues itself).
//!
//! Invariants:
//! - At most one drain job is active per queue (`running` is set by the push that starts one
//!   and cleared only by the `complete` that finds the queue empty, under the same lock).
//! - Tasks run one at a time, in push order, each exactly once.
//! - `completed` only grows; `wait_for(seq)` returns only after task `seq` completed, and never
//!   misses the wake-up (the count is changed under the lock the waiter checks it under, and
//!   waiters are notified after).
//! - A failed task is recorded with its sequence number; every wait covering it reports it
//!   (sticky, like a CUDA stream error).

use std::collections::VecDeque;

use super::{spin_hint, yield_now, AtomicU64, Condvar, Mutex, Ordering};
use crate::backend::WaitPolicy;

/// An in-order task queue with waitable completion.
pub struct OrderedQueue<T> {
    state: Mutex<State<T>>,
    done: Condvar,
    /// Mirror of `State::completed` for lock-free polling (spin and yield waiters).
    completed: AtomicU64,
}

struct State<T> {
    tasks: VecDeque<T>,
    running: bool,
    submitted: u64,
    completed: u64,
    failure: Option<(u64, String)>,
}

impl<T> Default for OrderedQueue<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> OrderedQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        OrderedQueue {
            state: Mutex::new(State {
                tasks: VecDeque::new(),
                running: false,
                submitted: 0,
                completed: 0,
                failure: None,
            }),
            done: Condvar::new(),
            completed: AtomicU64::new(0),
        }
    }

    /// Appends `task`. Returns its sequence number and whether the caller must start a drain
    /// job.
    pub fn push(&self, task: T) -> (u64, bool) {
        let mut st = self.state.lock();
        st.tasks.push_back(task);
        st.submitted += 1;
        let start = !st.running;
        st.running = true;
        (st.submitted, start)
    }

    /// The oldest task, for the active drain job.
    pub fn next(&self) -> Option<T> {
        self.state.lock().tasks.pop_front()
    }

    /// Marks the task last taken by `next` complete (`failure`: why it failed). True when more
    /// tasks wait and the drain job must go on; false when it must stop.
    pub fn complete(&self, failure: Option<String>) -> bool {
        let mut st = self.state.lock();
        st.completed += 1;
        if let (Some(msg), None) = (failure, &st.failure) {
            st.failure = Some((st.completed, msg));
        }
        self.completed.store(st.completed, Ordering::Release);
        let more = !st.tasks.is_empty();
        st.running = more;
        drop(st);
        self.done.notify_all();
        more
    }

    /// Tasks pushed so far (the sequence number of the latest).
    pub fn submitted(&self) -> u64 {
        self.state.lock().submitted
    }

    /// `Ok(true)` when every task pushed so far has completed, `Ok(false)` while some have
    /// not, the first failure once one failed (sticky).
    pub fn status(&self) -> Result<bool, String> {
        let st = self.state.lock();
        match &st.failure {
            Some((_, msg)) => Err(msg.clone()),
            None => Ok(st.completed == st.submitted),
        }
    }

    /// True once a task has failed (sticky).
    pub fn has_failed(&self) -> bool {
        self.state.lock().failure.is_some()
    }

    /// True when task `seq` has completed.
    pub fn is_complete(&self, seq: u64) -> bool {
        self.completed.load(Ordering::Acquire) >= seq
    }

    /// Whether task `seq` (and every task before it) completed, without waiting: the
    /// failure of the first failed task up to `seq` once they have, as [`Self::wait_for`].
    pub fn poll(&self, seq: u64) -> Result<bool, String> {
        if !self.is_complete(seq) {
            return Ok(false);
        }
        match &self.state.lock().failure {
            Some((failed, msg)) if *failed <= seq => Err(msg.clone()),
            _ => Ok(true),
        }
    }

    /// Waits until task `seq` (and every task before it) completed. Returns the failure of
    /// the first failed task up to `seq`, if any.
    pub fn wait_for(&self, seq: u64, policy: WaitPolicy) -> Result<(), String> {
        match policy {
            WaitPolicy::Spin => {
                while !self.is_complete(seq) {
                    spin_hint();
                }
            }
            WaitPolicy::Yield => {
                while !self.is_complete(seq) {
                    yield_now();
                }
            }
            WaitPolicy::Block => {
                let mut st = self.state.lock();
                while st.completed < seq {
                    st = self.done.wait(st);
                }
            }
        }
        match &self.state.lock().failure {
            Some((failed, msg)) if *failed <= seq => Err(msg.clone()),
            _ => Ok(()),
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;

    type Task = Box<dyn FnOnce() + Send>;

    fn drain(q: Arc<OrderedQueue<Task>>, active: Arc<AtomicBool>) {
        assert!(
            !active.swap(true, Ordering::SeqCst),
            "two drain jobs at once"
        );
        loop {
            let task = q.next().expect("a drain job runs only while tasks wait");
            task();
            active.store(false, Ordering::SeqCst);
            if !q.complete(None) {
                return;
            }
            assert!(
                !active.swap(true, Ordering::SeqCst),
                "two drain jobs at once"
            );
        }
    }

    /// The race that matters: a push concurrent with the drain job finishing the last task.
    /// Either the drain job sees the new task and runs it, or the push finds the queue idle
    /// and starts a new job; never both (two jobs) and never neither (a lost task). The
    /// waiter returns only after its task ran, and tasks run in push order.
    #[test]
    fn push_racing_the_last_completion_loses_nothing() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let q: Arc<OrderedQueue<Task>> = Arc::new(OrderedQueue::new());
            let active = Arc::new(AtomicBool::new(false));
            let log = Arc::new(Mutex::new(Vec::new()));
            let l1 = log.clone();
            let (_, start) = q.push(Box::new(move || l1.lock().push(1)));
            assert!(start, "an idle queue needs a drain job");
            let first = {
                let (q, active) = (q.clone(), active.clone());
                loom::thread::spawn(move || drain(q, active))
            };
            let l2 = log.clone();
            let (s2, start) = q.push(Box::new(move || l2.lock().push(2)));
            let second = start.then(|| {
                let (q, active) = (q.clone(), active.clone());
                loom::thread::spawn(move || drain(q, active))
            });
            q.wait_for(s2, WaitPolicy::Block).unwrap();
            assert_eq!(
                *log.lock(),
                vec![1, 2],
                "ran out of order, twice, or not at all"
            );
            first.join().unwrap();
            if let Some(t) = second {
                t.join().unwrap();
            }
        });
    }

    /// Shutdown with work in flight: the stream's owner queues two tasks and drops its handle
    /// at once (the device closing under it); the drain jobs own the queue from then on. Every
    /// task still runs, exactly once and in order, and the queue is freed after the last one
    /// (loom reports a leaked `Arc`).
    #[test]
    fn dropping_the_last_handle_with_work_queued_runs_it_all() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let q: Arc<OrderedQueue<Task>> = Arc::new(OrderedQueue::new());
            let active = Arc::new(AtomicBool::new(false));
            let log = Arc::new(Mutex::new(Vec::new()));
            let owner = {
                let (log, active) = (log.clone(), active.clone());
                loom::thread::spawn(move || {
                    let mut jobs = Vec::new();
                    for i in 1..=2u32 {
                        let l = log.clone();
                        let (_, start) = q.push(Box::new(move || l.lock().push(i)));
                        if start {
                            let (q, active) = (q.clone(), active.clone());
                            jobs.push(loom::thread::spawn(move || drain(q, active)));
                        }
                    }
                    drop(q); // the owner's handle: gone with work still queued
                    jobs
                })
            };
            for job in owner.join().unwrap() {
                job.join().unwrap();
            }
            assert_eq!(
                *log.lock(),
                vec![1, 2],
                "a task lost, repeated or reordered"
            );
        });
    }

    /// A failure is reported to the waiter of the failed task and to later waits.
    #[test]
    fn failures_are_sticky_from_their_task_on() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let q: Arc<OrderedQueue<u32>> = Arc::new(OrderedQueue::new());
            let (s1, start) = q.push(1);
            assert!(start);
            let (s2, again) = q.push(2);
            assert!(!again);
            let q2 = q.clone();
            let d = loom::thread::spawn(move || {
                q2.next().unwrap();
                assert!(q2.complete(None));
                q2.next().unwrap();
                assert!(!q2.complete(Some("boom".into())));
            });
            assert_eq!(q.wait_for(s1, WaitPolicy::Spin), Ok(()));
            assert_eq!(q.wait_for(s2, WaitPolicy::Block), Err("boom".into()));
            d.join().unwrap();
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn push_starts_one_drain_and_complete_reports_more() {
        let q = OrderedQueue::new();
        assert_eq!(q.push('a'), (1, true));
        assert_eq!(q.push('b'), (2, false));
        assert_eq!(q.next(), Some('a'));
        assert!(q.complete(None));
        assert!(q.is_complete(1) && !q.is_complete(2));
        assert_eq!(q.next(), Some('b'));
        assert!(!q.complete(Some("failed".into())));
        assert_eq!(q.wait_for(1, WaitPolicy::Block), Ok(()));
        assert_eq!(q.wait_for(2, WaitPolicy::Yield), Err("failed".into()));
        // Polling agrees with waiting: a failure is reported from its task on, not before.
        assert_eq!(q.poll(1), Ok(true));
        assert_eq!(q.poll(2), Err("failed".into()));
        assert_eq!(q.poll(3), Ok(false), "not submitted yet");
        assert_eq!(
            q.push('c'),
            (3, true),
            "an idle queue needs a new drain job"
        );
    }
}
