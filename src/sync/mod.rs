//! The synchronization primitives multiq owns, one per file, each with its invariants in its
//! module doc and a loom model beside it (`RUSTFLAGS="--cfg loom" cargo test --lib sync::`).
//!
//! Under `cfg(loom)` the atomics and mutexes used here are loom's, so the models explore
//! every interleaving; otherwise they are std atomics and parking_lot mutexes.

pub mod assign;
pub mod batcher;
pub mod claim;
// The CUDA device queue's chaining hand-off and chunk ring, stated for their models (the
// kernel itself is CUDA).
#[cfg(test)]
pub mod chunk_chain;
#[cfg(test)]
pub mod chunk_ring;
pub mod combiner;
pub mod free_list;
pub mod handoff;
// Used by the CUDA backend's device queue only; built (and its models run) without it too.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub mod op_ring;
pub mod ordered_queue;
pub mod submit_lock;
pub mod thread_id;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

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

    /// The lock if it is free now, without waiting.
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        #[cfg(not(loom))]
        let guard = self.inner.try_lock();
        #[cfg(loom)]
        let guard = match self.inner.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        guard
    }
}

/// A condition variable over [`Mutex`], backed by loom's under `cfg(loom)`.
#[derive(Debug, Default)]
pub(crate) struct Condvar {
    #[cfg(not(loom))]
    inner: parking_lot::Condvar,
    #[cfg(loom)]
    inner: loom::sync::Condvar,
}

impl Condvar {
    pub(crate) fn new() -> Self {
        Condvar {
            inner: Default::default(),
        }
    }

    /// Atomically releases `guard`, sleeps until notified, and re-acquires it.
    pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        #[cfg(not(loom))]
        {
            let mut guard = guard;
            self.inner.wait(&mut guard);
            guard
        }
        #[cfg(loom)]
        {
            self.inner.wait(guard).unwrap_or_else(|p| p.into_inner())
        }
    }

    /// Releases `guard` and sleeps until notified or until `deadline`. Under `cfg(loom)`,
    /// which has no clock, the deadline counts as passed at once: the guard is released and
    /// the thread yields, so a model checks that a sleeper with a deadline never needs a
    /// notification to make progress.
    pub(crate) fn wait_until<T>(&self, guard: MutexGuard<'_, T>, deadline: std::time::Instant) {
        #[cfg(not(loom))]
        {
            let mut guard = guard;
            let _ = self.inner.wait_until(&mut guard, deadline);
        }
        #[cfg(loom)]
        {
            let _ = deadline;
            drop(guard);
            loom::thread::yield_now();
        }
    }

    pub(crate) fn notify_all(&self) {
        self.inner.notify_all();
    }
}

/// One step of a busy-wait: a CPU spin hint (a loom yield under `cfg(loom)`, so models of
/// spinning waiters terminate).
pub(crate) fn spin_hint() {
    #[cfg(not(loom))]
    std::hint::spin_loop();
    #[cfg(loom)]
    loom::thread::yield_now();
}

/// Yields the thread (loom's yield under `cfg(loom)`).
pub(crate) fn yield_now() {
    #[cfg(not(loom))]
    std::thread::yield_now();
    #[cfg(loom)]
    loom::thread::yield_now();
}
