//! The synchronization primitives multiq owns, one per file, each with its invariants in its
//! module doc and a loom model beside it (`RUSTFLAGS="--cfg loom" cargo test --lib sync::`).
//!
//! Under `cfg(loom)` the atomics and mutexes used here are loom's, so the models explore
//! every interleaving; otherwise they are std atomics and parking_lot mutexes.

pub mod claim;
pub mod submit_lock;
pub mod thread_id;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};

/// A mutex with parking_lot's poison-free API, backed by loom's mutex under `cfg(loom)`.
#[derive(Debug, Default)]
pub(crate) struct Mutex<T> {
    #[cfg(not(loom))]
    inner: parking_lot::Mutex<T>,
    #[cfg(loom)]
    inner: loom::sync::Mutex<T>,
}

#[cfg(not(loom))]
pub(crate) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;
#[cfg(loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(not(loom))]
        let inner = parking_lot::Mutex::new(value);
        #[cfg(loom)]
        let inner = loom::sync::Mutex::new(value);
        Mutex { inner }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        #[cfg(not(loom))]
        let guard = self.inner.lock();
        // A loom mutex is poisoned only if a model thread panicked, which fails the model anyway.
        #[cfg(loom)]
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        guard
    }
}
