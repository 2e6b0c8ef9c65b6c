//! The safe layer threads use: devices, buffers, pooled streams, completion tickets.
//!
//! Ownership rules that make explicit synchronization sound (no per-buffer event tracking):
//! 1. A [`Buffer`] is mutated only through `&mut Buffer`, so one thread at a time submits work
//!    on it.
//! 2. A buffer remembers the last stream that used it. Using it on another stream first waits
//!    for that stream, so work on one buffer is never reordered across streams.
//! 3. Dropping a buffer frees it *ordered on its last stream* (after the work already queued
//!    there), so a kernel still in flight never sees freed memory, even if its [`Ticket`] was
//!    dropped or leaked.
//! 4. Reading a buffer back is ordered after all work queued on its last stream.

mod coalescer;
mod device;
mod device_queue;
mod event_pool;
mod inflight;
pub(crate) mod live;
mod matmul;
pub(crate) mod phases;
mod pool;
mod stream;

pub use coalescer::{CoalescePolicy, CoalesceStats, DEFAULT_DEPTH, MAX_COALESCE_DELAY};
pub use device::{Buffer, Device};
pub use device_queue::QUEUE_MIN_LOAD;
pub use inflight::Inflight;
pub use live::{live_counts, LiveCounts};
pub use matmul::{MatmulCoalescer, MatmulCoalescerConfig, MatmulStats, DEFAULT_MATMUL_DEPTH};
pub use pool::{PoolConfig, StreamPool, DEFAULT_POOL_SIZE, MAX_POOL_SIZE};
pub use stream::{Stream, StreamStats, Ticket};
