//! `SubmitLock`: how submissions to one stream are serialized, per the pool's [`LockMode`].
//!
//! A submission is a kernel launch followed by the record of its completion event. Promise:
//! while a thread holds a [`SubmitGuard`] for a stream, no other thread submits to that stream,
//! so each event marks exactly the work of its own launch and everything before it.
//!
//! - `global`: one mutex shared by every stream of the pool (the investigated system's global
//!   encoder mutex). Any two submissions are serialized.
//! - `per-stream`: one mutex per stream (its per-encoder mutex). Submissions to different
//!   streams proceed in parallel.
//! - `none`: no lock is taken. Exclusivity comes from ownership instead: the stream must be
//!   claimed by the submitting thread ([`OwnerClaim`]); a thread that does not own it gets
//!   [`Error::ExclusiveStreamRequired`], never an unsynchronized submission.

use std::fmt;
use std::sync::Arc;

use super::claim::OwnerClaim;
use super::{thread_id, Mutex, MutexGuard};
use crate::error::{Error, Result};

/// How submissions are serialized, chosen per pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LockMode {
    /// One mutex around every submission to any stream of the pool.
    Global,
    /// One mutex per stream.
    PerStream,
    /// No lock: each stream is owned by one thread; sharing a stream is rejected.
    None,
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::Global => "global",
            LockMode::PerStream => "per-stream",
            LockMode::None => "none",
        })
    }
}

/// One stream's submission lock.
#[derive(Debug)]
pub enum SubmitLock {
    /// The pool-wide mutex.
    Global(Arc<Mutex<()>>),
    /// This stream's own mutex.
    PerStream(Mutex<()>),
    /// No mutex; the owning thread's claim.
    Exclusive(OwnerClaim),
}

/// Proof that the holder may submit to the stream. Dropping it ends the submission.
#[must_use]
pub enum SubmitGuard<'a> {
    /// Holding a mutex (global or per-stream); released on drop.
    Locked(#[allow(dead_code)] MutexGuard<'a, ()>),
    /// The calling thread owns the stream.
    Owned,
}

impl SubmitLock {
    /// A lock for one stream of a pool in `mode`; `global` is the pool's shared mutex.
    pub fn new(mode: LockMode, global: &Arc<Mutex<()>>) -> Self {
        match mode {
            LockMode::Global => SubmitLock::Global(global.clone()),
            LockMode::PerStream => SubmitLock::PerStream(Mutex::new(())),
            LockMode::None => SubmitLock::Exclusive(OwnerClaim::new()),
        }
    }

    /// Enters a submission on behalf of the calling thread.
    pub fn enter(&self) -> Result<SubmitGuard<'_>> {
        self.enter_as(thread_id::current())
    }

    /// Enters a submission on behalf of thread `thread`.
    pub fn enter_as(&self, thread: u64) -> Result<SubmitGuard<'_>> {
        match self {
            SubmitLock::Global(m) => Ok(SubmitGuard::Locked(m.lock())),
            SubmitLock::PerStream(m) => Ok(SubmitGuard::Locked(m.lock())),
            SubmitLock::Exclusive(claim) if claim.is_owned_by(thread) => Ok(SubmitGuard::Owned),
            SubmitLock::Exclusive(claim) => Err(Error::ExclusiveStreamRequired(
                if claim.owner() == super::claim::FREE {
                    "this thread has not acquired the stream (use the pool to acquire it)".into()
                } else {
                    "the stream is owned by another thread".into()
                },
            )),
        }
    }

    /// The claim, in lock mode `none`.
    pub fn claim(&self) -> Option<&OwnerClaim> {
        match self {
            SubmitLock::Exclusive(c) => Some(c),
            _ => None,
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;

    /// The promise: launch and record of one submission are never interleaved with another
    /// thread's submission to the same stream, in every lock mode that admits sharing, and
    /// across streams under `global`.
    fn submissions_are_atomic(mode: LockMode, shared_stream: bool) {
        loom::model(move || {
            let global = std::sync::Arc::new(Mutex::new(()));
            let a = Arc::new(SubmitLock::new(mode, &global));
            let b = if shared_stream {
                a.clone()
            } else {
                Arc::new(SubmitLock::new(mode, &global))
            };
            let log = Arc::new(Mutex::new(Vec::new()));
            let handles: Vec<_> = [(1u64, a), (2u64, b)]
                .into_iter()
                .map(|(id, lock)| {
                    let log = log.clone();
                    loom::thread::spawn(move || {
                        let _g = lock.enter_as(id).unwrap();
                        log.lock().push((id, "launch"));
                        log.lock().push((id, "record"));
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let log = log.lock();
            if shared_stream || mode == LockMode::Global {
                assert_eq!(
                    log[0].0, log[1].0,
                    "another submission interleaved: {log:?}"
                );
                assert_eq!(
                    log[2].0, log[3].0,
                    "another submission interleaved: {log:?}"
                );
            }
        });
    }

    #[test]
    fn global_serializes_all_streams() {
        submissions_are_atomic(LockMode::Global, false);
    }

    #[test]
    fn per_stream_serializes_one_stream() {
        submissions_are_atomic(LockMode::PerStream, true);
    }

    #[test]
    fn per_stream_lets_distinct_streams_proceed() {
        submissions_are_atomic(LockMode::PerStream, false);
    }

    /// Lock mode `none`: while thread 1 owns the stream, thread 2's submission is refused, so a
    /// lock-free submission never races.
    #[test]
    fn none_refuses_non_owners() {
        loom::model(|| {
            let global = std::sync::Arc::new(Mutex::new(()));
            let lock = Arc::new(SubmitLock::new(LockMode::None, &global));
            assert!(lock.claim().unwrap().try_claim(1));
            let l2 = lock.clone();
            let t = loom::thread::spawn(move || {
                assert!(l2.enter_as(2).is_err());
                assert!(!l2.claim().unwrap().try_claim(2));
            });
            let g = lock.enter_as(1).unwrap();
            drop(g);
            t.join().unwrap();
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn none_mode_requires_the_claim() {
        let global = Arc::new(Mutex::new(()));
        let lock = SubmitLock::new(LockMode::None, &global);
        assert!(matches!(
            lock.enter_as(3),
            Err(Error::ExclusiveStreamRequired(_))
        ));
        assert!(lock.claim().unwrap().try_claim(3));
        assert!(lock.enter_as(3).is_ok());
        assert!(matches!(
            lock.enter_as(4),
            Err(Error::ExclusiveStreamRequired(_))
        ));
    }

    #[test]
    fn modes_display_as_on_the_command_line() {
        assert_eq!(LockMode::PerStream.to_string(), "per-stream");
        assert_eq!(
            serde_json::to_string(&LockMode::PerStream).unwrap(),
            "\"per-stream\""
        );
    }
}
