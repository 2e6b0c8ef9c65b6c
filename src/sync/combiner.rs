//! `Combiner`: "somebody do this soon" without anyone blocking.
//!
//! Any thread may `request` that a piece of work be done (the coalescer: launch the pending
//! batch). If no thread is doing it, the caller does it; if another thread is, the caller
//! returns at once and that thread does the work again before it stops (flat combining).
//!
//! Invariants:
//! - The work runs in one thread at a time (the one that moved the word from idle to busy).
//! - No request is lost: a request made at any moment is followed by a run of the work that
//!   starts after it. A request on an idle word makes the caller the server; on a busy word it
//!   marks the word "requested", and the server, which can only leave by turning "busy" into
//!   "idle", finds the mark and runs again. (A flag plus a separate lock is the store-buffer
//!   pattern and loses requests: loom found that interleaving in an earlier version.)

use super::{AtomicU64, Ordering};

const IDLE: u64 = 0;
const BUSY: u64 = 1;
const BUSY_REQUESTED: u64 = 2;

/// One state word: idle, busy (someone runs the work), or busy with a request made since the
/// current run started. Every transition is a read-modify-write of this one word, so they are
/// totally ordered (coherence); no cross-variable ordering argument is needed.
#[derive(Debug, Default)]
pub struct Combiner {
    state: AtomicU64,
}

/// Returns the word to idle if the work panicked, so later requests are still served.
struct Serving<'a>(&'a AtomicU64, bool);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(IDLE, Ordering::Release);
        }
    }
}

impl Combiner {
    /// A combiner with no request pending.
    pub fn new() -> Self {
        Combiner {
            state: AtomicU64::new(IDLE),
        }
    }

    /// Requests `work`; runs it (possibly several times) if no other thread is running it.
    /// Returns at once when another thread is running it: that thread runs it again.
    pub fn request(&self, mut work: impl FnMut()) {
        let mut seen = self.state.load(Ordering::Acquire);
        loop {
            let next = if seen == IDLE { BUSY } else { BUSY_REQUESTED };
            if seen == BUSY_REQUESTED {
                return; // a run that starts after our request is already promised
            }
            match self
                .state
                .compare_exchange(seen, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(IDLE) => break, // we serve
                Ok(_) => return,   // the server will run the work again
                Err(now) => seen = now,
            }
        }
        let mut serving = Serving(&self.state, false);
        loop {
            work();
            // Done unless a request arrived during the run; then take it and run again.
            match self
                .state
                .compare_exchange(BUSY, IDLE, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(_) => self.state.store(BUSY, Ordering::Release), // was BUSY_REQUESTED
            }
        }
        serving.1 = true;
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// Two threads each add an item to a queue and request that the queue be drained. Whatever
    /// the interleaving, when both have returned the queue is empty: no request was lost, and
    /// nothing was drained twice.
    #[test]
    fn no_request_is_lost() {
        requests_from(&[1, 2], 3);
    }

    /// As above with three requesters: the third can find the word already "busy,
    /// requested" and return at once, relying on the run promised to the second.
    #[test]
    fn no_request_is_lost_with_three_requesters() {
        requests_from(&[1, 2, 3], 2);
    }

    fn requests_from(ids: &'static [u32], preemptions: usize) {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(preemptions);
        model.check(move || {
            let c = Arc::new(Combiner::new());
            let queue = Arc::new(crate::sync::Mutex::new(Vec::new()));
            let done = Arc::new(crate::sync::Mutex::new(Vec::new()));
            let threads: Vec<_> = ids
                .iter()
                .copied()
                .map(|id| {
                    let (c, queue, done) = (c.clone(), queue.clone(), done.clone());
                    loom::thread::spawn(move || {
                        queue.lock().push(id);
                        c.request(|| {
                            let items: Vec<u32> = queue.lock().drain(..).collect();
                            done.lock().extend(items);
                        });
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert!(queue.lock().is_empty(), "a request was lost");
            assert_eq!(done.lock().len(), ids.len());
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_lone_request_runs_the_work_once() {
        let c = Combiner::new();
        let mut runs = 0;
        c.request(|| runs += 1);
        assert_eq!(runs, 1);
    }
}
