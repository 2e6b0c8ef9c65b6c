//! Process-unique thread identifiers.
//!
//! Promise: every thread gets a distinct non-zero `u64` the first time it asks, and no id is
//! ever reused within a process (unlike OS thread ids), so an id stored as an owner can never
//! be mistaken for a later thread. A thread whose thread-locals are being destroyed gets
//! [`EXITING`] (0), which owns nothing.

use super::{AtomicU64, Ordering};

/// The id reported while a thread's thread-locals are being torn down. Owns nothing.
pub const EXITING: u64 = 0;

#[cfg(not(loom))]
static NEXT: AtomicU64 = AtomicU64::new(1);
#[cfg(not(loom))]
thread_local! {
    static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
}

// Under loom, statics and thread-locals are loom's (reset for each explored execution).
#[cfg(loom)]
loom::lazy_static! {
    static ref NEXT: AtomicU64 = AtomicU64::new(1);
}
#[cfg(loom)]
loom::thread_local! {
    static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
}

/// The calling thread's id.
pub fn current() -> u64 {
    ID.try_with(|id| *id).unwrap_or(EXITING)
}

#[cfg(all(test, not(loom)))]
mod tests {
    #[test]
    fn ids_are_stable_per_thread_and_distinct_across_threads() {
        let me = super::current();
        assert_eq!(me, super::current());
        assert_ne!(me, super::EXITING);
        let others: Vec<u64> = (0..8)
            .map(|_| std::thread::spawn(super::current).join().unwrap())
            .collect();
        let mut all = others.clone();
        all.push(me);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 9);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    /// Threads asking at once each get a distinct, non-zero id, the same every time they ask.
    #[test]
    fn concurrent_first_asks_get_distinct_ids() {
        loom::model(|| {
            let others: Vec<_> = (0..2)
                .map(|_| {
                    loom::thread::spawn(|| {
                        let id = super::current();
                        assert_eq!(id, super::current());
                        id
                    })
                })
                .collect();
            let mut all = vec![super::current()];
            all.extend(others.into_iter().map(|t| t.join().unwrap()));
            assert!(!all.contains(&super::EXITING));
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), 3);
        });
    }
}
