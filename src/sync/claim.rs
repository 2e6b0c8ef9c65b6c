//! `OwnerClaim`: exclusive ownership of a stream by one thread, for lock mode `none`.
//!
//! Invariants:
//! - At most one thread owns a claim at any time (`try_claim` is a compare-and-swap from
//!   [`FREE`]).
//! - Only the owner can release it (`release` is a compare-and-swap from the owner's id).
//! - Hence a thread that has seen `is_owned_by(me)` keeps ownership until it releases: no other
//!   thread can take the claim in between. Submission in lock mode `none` relies on this to
//!   touch a stream without a lock.
//!
//! Ordering: claim uses Acquire and release uses Release, so everything the previous owner did
//! with the stream happens-before everything the next owner does.

use super::{AtomicU64, Ordering};

/// The owner value of an unowned claim (thread ids are never 0, see `thread_id`).
pub const FREE: u64 = 0;

/// Exclusive, thread-owned claim.
#[derive(Debug, Default)]
pub struct OwnerClaim {
    owner: AtomicU64,
}

impl OwnerClaim {
    /// An unowned claim.
    pub fn new() -> Self {
        OwnerClaim {
            owner: AtomicU64::new(FREE),
        }
    }

    /// Takes the claim for `thread`. True if `thread` owns it afterwards (also when it already
    /// did); false if another thread owns it, or if `thread` is [`FREE`] (the id of a thread
    /// whose thread-locals are gone, which can own nothing).
    pub fn try_claim(&self, thread: u64) -> bool {
        if thread == FREE {
            return false;
        }
        match self
            .owner
            .compare_exchange(FREE, thread, Ordering::Acquire, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(current) => current == thread,
        }
    }

    /// Releases the claim if `thread` owns it. True if it did.
    pub fn release(&self, thread: u64) -> bool {
        self.owner
            .compare_exchange(thread, FREE, Ordering::Release, Ordering::Relaxed)
            .is_ok()
    }

    /// True if `thread` owns the claim.
    pub fn is_owned_by(&self, thread: u64) -> bool {
        thread != FREE && self.owner.load(Ordering::Acquire) == thread
    }

    /// The current owner, or [`FREE`].
    pub fn owner(&self) -> u64 {
        self.owner.load(Ordering::Acquire)
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicUsize;
    use loom::sync::Arc;

    /// Two threads race for a free claim: exactly one wins, and while it holds the claim the
    /// other never sees itself as owner.
    #[test]
    fn exactly_one_thread_wins_a_race() {
        loom::model(|| {
            let claim = Arc::new(OwnerClaim::new());
            let winners = Arc::new(AtomicUsize::new(0));
            let handles: Vec<_> = [1u64, 2]
                .into_iter()
                .map(|id| {
                    let claim = claim.clone();
                    let winners = winners.clone();
                    loom::thread::spawn(move || {
                        if claim.try_claim(id) {
                            winners.fetch_add(1, Ordering::SeqCst);
                            assert!(claim.is_owned_by(id));
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            assert_eq!(winners.load(Ordering::SeqCst), 1);
        });
    }

    /// Hand-off: the owner writes, releases; the next owner claims and must see the write.
    /// A non-owner can never release someone else's claim.
    #[test]
    fn release_hands_off_with_happens_before() {
        loom::model(|| {
            let claim = Arc::new(OwnerClaim::new());
            let data = Arc::new(loom::cell::UnsafeCell::new(0u32));
            assert!(claim.try_claim(1));
            let (c2, d2) = (claim.clone(), data.clone());
            let t = loom::thread::spawn(move || {
                assert!(!c2.release(2), "a non-owner released the claim");
                if c2.try_claim(2) {
                    // SAFETY: thread 2 owns the claim, so thread 1 (which released it) no longer
                    // touches `data`; loom checks the access is ordered after thread 1's write.
                    let v = d2.with(|p| unsafe { *p });
                    assert_eq!(v, 7);
                    assert!(c2.release(2));
                }
            });
            // SAFETY: thread 1 owns the claim; thread 2 touches `data` only after claiming.
            data.with_mut(|p| unsafe { *p = 7 });
            assert!(claim.release(1));
            t.join().unwrap();
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn claim_is_exclusive_until_released_by_its_owner() {
        let c = OwnerClaim::new();
        assert!(c.try_claim(5));
        assert!(c.try_claim(5), "re-claiming by the owner succeeds");
        assert!(!c.try_claim(6));
        assert!(!c.release(6));
        assert!(c.is_owned_by(5) && !c.is_owned_by(6));
        assert!(c.release(5));
        assert_eq!(c.owner(), FREE);
        assert!(c.try_claim(6));
        assert!(!c.try_claim(FREE), "the exiting-thread id owns nothing");
        assert_eq!(c.owner(), 6);
    }
}
