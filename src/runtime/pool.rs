//! `StreamPool`: a fixed set of lazily created streams handed to threads, in the manner of
//! PyTorch's CUDA stream pool and the investigated MPS pool.
//!
//! Promises:
//! - Streams are created on first use, never more than the pool's size.
//! - A thread's first [`StreamPool::current`] takes the next stream round-robin and keeps it
//!   (thread-local) until it releases it or exits; later calls return the same stream.
//! - With more threads than streams, threads share streams (lock modes `global` and
//!   `per-stream`). Lock mode `none` never shares: each stream is claimed by one thread, and
//!   when none is free the caller gets [`Error::ExclusiveStreamRequired`].
//! - A thread's claims are released when it releases them or when the thread exits.
//! - [`StreamPool::synchronize`] waits for every stream of the pool.
//!
//! The thread-local table holds weak references, so it never keeps a dropped pool (or its
//! device) alive.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use super::coalescer::{CoalescePolicy, CoalescerShared, PERSISTENT_FALLBACK};
use super::device_queue::DeviceQueue;
use super::live::{Kind, LiveToken};
use super::stream::StreamShared;
use super::{Device, Stream};
use crate::error::{Error, Result};
use crate::sync::assign::Slots;
use crate::sync::submit_lock::{LockMode, SubmitLock};
use crate::sync::{thread_id, Mutex};

/// Streams per pool unless configured otherwise (as in PyTorch's CUDA pool).
pub const DEFAULT_POOL_SIZE: usize = 32;
/// Largest pool accepted.
pub const MAX_POOL_SIZE: usize = 1024;

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

/// How a pool is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Number of streams (1..=1024).
    pub streams: usize,
    /// How submissions are serialized.
    pub lock: LockMode,
    /// Whether and how ops from different threads are merged into one launch.
    pub coalesce: CoalescePolicy,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            streams: DEFAULT_POOL_SIZE,
            lock: LockMode::PerStream,
            coalesce: CoalescePolicy::Off,
        }
    }
}

/// A pool of streams on one device. Clones share the pool.
#[derive(Clone)]
pub struct StreamPool {
    shared: Arc<PoolShared>,
}

struct PoolShared {
    id: u64,
    device: Device,
    lock: LockMode,
    global: Arc<Mutex<()>>,
    coalescer: Option<Arc<CoalescerShared>>,
    device_queue: Option<Arc<DeviceQueue>>,
    /// The streams, made on first use, and the round-robin position (`sync::assign`).
    slots: Slots<StreamShared>,
    _live: LiveToken,
}

impl std::fmt::Debug for StreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamPool")
            .field("size", &self.size())
            .field("lock", &self.shared.lock)
            .finish()
    }
}

impl StreamPool {
    /// A pool of `config.streams` streams on `device`.
    pub fn new(device: &Device, config: PoolConfig) -> Result<StreamPool> {
        if config.streams == 0 || config.streams > MAX_POOL_SIZE {
            return Err(Error::invalid(format!(
                "a pool holds between 1 and {MAX_POOL_SIZE} streams, got {}",
                config.streams
            )));
        }
        let (coalescer, device_queue) = match config.coalesce {
            CoalescePolicy::Off => (None, None),
            CoalescePolicy::Persistent => match DeviceQueue::new(device)? {
                Some(q) => (None, Some(q)),
                None => (
                    Some(CoalescerShared::new(device, PERSISTENT_FALLBACK)?),
                    None,
                ),
            },
            policy => (Some(CoalescerShared::new(device, policy)?), None),
        };
        Ok(StreamPool {
            shared: Arc::new(PoolShared {
                id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
                device: device.clone(),
                lock: config.lock,
                global: Arc::new(Mutex::new(())),
                coalescer,
                device_queue,
                slots: Slots::new(config.streams),
                _live: LiveToken::new(Kind::Pool),
            }),
        })
    }

    /// Number of streams in the pool.
    pub fn size(&self) -> usize {
        self.shared.slots.len()
    }

    /// The pool's lock mode.
    pub fn lock_mode(&self) -> LockMode {
        self.shared.lock
    }

    /// The pool's device.
    pub fn device(&self) -> &Device {
        &self.shared.device
    }

    /// With coalescing on: grouped launches so far, ops in them, and where a batch's time
    /// went.
    /// With the device queue, `launches` counts the queue kernel's launches.
    pub fn coalesce_stats(&self) -> Option<super::CoalesceStats> {
        if let Some(q) = &self.shared.device_queue {
            let (launches, ops, chained) = q.counts();
            return Some(super::CoalesceStats {
                launches,
                ops,
                chained,
                direct: q.direct_ops(),
                queue_exits: Some(q.exits()),
                ..Default::default()
            });
        }
        self.shared.coalescer.as_ref().map(|c| c.stats())
    }

    /// With coalescing on: how waiters learn a batch completed, `"signal"` (a host word the
    /// batch stream writes; no driver call to wait), `"event"`, or `"device-queue"` (ops run
    /// by a kernel on the device, which writes each op's own host word).
    pub fn coalesce_completion(&self) -> Option<&'static str> {
        if self.shared.device_queue.is_some() {
            return Some("device-queue");
        }
        self.shared
            .coalescer
            .as_ref()
            .map(|c| if c.uses_signal() { "signal" } else { "event" })
    }

    /// Streams created so far (they are created lazily).
    pub fn streams_created(&self) -> usize {
        self.shared.slots.created()
    }

    /// The calling thread's stream: assigned round-robin on first call, then kept.
    pub fn current(&self) -> Result<Stream> {
        let me = thread_id::current();
        self.with_entry(|entry| {
            if let Some(s) = entry.current.as_ref().and_then(Weak::upgrade) {
                return Ok(Stream { shared: s });
            }
            let s = self.assign(me)?;
            if self.shared.lock == LockMode::None {
                entry.claimed.push(s.index);
            }
            entry.current = Some(Arc::downgrade(&s));
            Ok(Stream { shared: s })
        })
    }

    /// Stream `index` of the pool. In lock mode `none` the calling thread claims it, which
    /// fails if another thread owns it.
    pub fn acquire(&self, index: usize) -> Result<Stream> {
        let s = self.slot(index)?;
        if let Some(claim) = s.lock.claim() {
            let me = thread_id::current();
            let had = claim.is_owned_by(me);
            if !claim.try_claim(me) {
                return Err(Error::ExclusiveStreamRequired(format!(
                    "stream {index} is owned by another thread"
                )));
            }
            let recorded = self.with_entry(|e| {
                if !e.claimed.contains(&index) {
                    e.claimed.push(index);
                }
                Ok(())
            });
            if let Err(e) = recorded {
                // The thread's stream table is gone (a thread-local destructor running after
                // multiq's): nothing would give the claim back when the thread ends, so it
                // must not be kept.
                if !had {
                    claim.release(me);
                }
                return Err(e);
            }
        }
        Ok(Stream { shared: s })
    }

    /// Makes `stream` the calling thread's current stream of this pool.
    pub fn set_current(&self, stream: &Stream) -> Result<()> {
        if stream.shared.pool_id != self.shared.id {
            return Err(Error::invalid("the stream belongs to another pool"));
        }
        if let Some(claim) = stream.shared.lock.claim() {
            if !claim.is_owned_by(thread_id::current()) {
                return Err(Error::ExclusiveStreamRequired(format!(
                    "stream {} has not been acquired by this thread",
                    stream.index()
                )));
            }
        }
        self.with_entry(|e| {
            e.current = Some(Arc::downgrade(&stream.shared));
            Ok(())
        })
    }

    /// Releases the calling thread's current stream (and, in lock mode `none`, its claim on it).
    /// The next [`StreamPool::current`] assigns a stream afresh. True if there was one.
    pub fn release_current(&self) -> Result<bool> {
        let me = thread_id::current();
        self.with_entry(|e| {
            let Some(current) = e.current.take().and_then(|w| w.upgrade()) else {
                return Ok(false);
            };
            if let Some(claim) = current.lock.claim() {
                claim.release(me);
                e.claimed.retain(|&i| i != current.index);
            }
            Ok(true)
        })
    }

    /// In lock mode `none`, gives up the calling thread's claim on `stream` (and clears it as
    /// current). In other modes only clears it as current.
    pub fn release(&self, stream: &Stream) -> Result<()> {
        if stream.shared.pool_id != self.shared.id {
            return Err(Error::invalid("the stream belongs to another pool"));
        }
        let me = thread_id::current();
        self.with_entry(|e| {
            let is_current = e
                .current
                .as_ref()
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&stream.shared)));
            if is_current {
                e.current = None;
            }
            if let Some(claim) = stream.shared.lock.claim() {
                claim.release(me);
                e.claimed.retain(|&i| i != stream.index());
            }
            Ok(())
        })
    }

    /// Waits until all work on every stream of the pool has completed. Returns the first
    /// error after waiting for all streams.
    pub fn synchronize(&self) -> Result<()> {
        let mut first = match (&self.shared.coalescer, &self.shared.device_queue) {
            (Some(c), _) => c.synchronize(),
            (None, Some(q)) => q.synchronize(),
            (None, None) => Ok(()),
        };
        for i in 0..self.size() {
            if let Some(s) = self.shared.slots.get(i) {
                let r = s.backend.synchronize();
                if first.is_ok() {
                    first = r;
                }
            }
        }
        first
    }

    fn slot(&self, index: usize) -> Result<Arc<StreamShared>> {
        let p = &self.shared;
        p.slots
            .get_or_try_init(index, || {
                let lock = SubmitLock::new(p.lock, &p.global);
                StreamShared::new(
                    p.id,
                    index,
                    p.device.clone(),
                    lock,
                    p.coalescer.clone(),
                    p.device_queue.clone(),
                )
            })
            .unwrap_or(Err(Error::NoSuchStream {
                index,
                size: self.size(),
            }))
    }

    fn assign(&self, me: u64) -> Result<Arc<StreamShared>> {
        let size = self.size();
        let start = self.shared.slots.next_index();
        if self.shared.lock != LockMode::None {
            return self.slot(start % size);
        }
        let claimed =
            self.shared
                .slots
                .claim_any(me, start, |i| self.slot(i), |s| s.lock.claim())?;
        claimed.ok_or_else(|| {
            Error::ExclusiveStreamRequired(format!(
                "all {size} streams of the pool are owned by other threads; lock mode none never \
                 shares a stream (use a larger pool or lock mode per-stream)"
            ))
        })
    }

    fn with_entry<R>(&self, f: impl FnOnce(&mut Entry) -> Result<R>) -> Result<R> {
        THREAD_STREAMS
            .try_with(|table| {
                let mut table = table.borrow_mut();
                let table = &mut *table;
                let pos = match table
                    .entries
                    .iter()
                    .position(|e| e.pool_id == self.shared.id)
                {
                    Some(pos) => pos,
                    None => {
                        table.entries.retain(|e| e.pool.strong_count() > 0);
                        table.entries.push(Entry {
                            pool_id: self.shared.id,
                            pool: Arc::downgrade(&self.shared),
                            current: None,
                            claimed: Vec::new(),
                        });
                        table.entries.len() - 1
                    }
                };
                f(&mut table.entries[pos])
            })
            .unwrap_or_else(|_| Err(Error::invalid("the calling thread is exiting")))
    }
}

/// One thread's view of the pools it used.
struct ThreadStreams {
    thread: u64,
    entries: Vec<Entry>,
}

struct Entry {
    pool_id: u64,
    pool: Weak<PoolShared>,
    current: Option<Weak<StreamShared>>,
    /// Slots this thread claimed (lock mode `none`).
    claimed: Vec<usize>,
}

impl Drop for ThreadStreams {
    fn drop(&mut self) {
        for e in &self.entries {
            if let Some(pool) = e.pool.upgrade() {
                for &i in &e.claimed {
                    let stream = pool.slots.get(i);
                    if let Some(claim) = stream.as_ref().and_then(|s| s.lock.claim()) {
                        claim.release(self.thread);
                    }
                }
            }
        }
    }
}

thread_local! {
    static THREAD_STREAMS: RefCell<ThreadStreams> =
        RefCell::new(ThreadStreams { thread: thread_id::current(), entries: Vec::new() });
}
