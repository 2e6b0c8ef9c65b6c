//! Process-wide counts of live runtime objects, for leak checks (`multiq stress`).
//!
//! Each counted object holds a [`LiveToken`]: made when the object is made, dropped with it.
//! Only objects made at set-up time are counted (devices, pools, streams, buffers, CPU
//! storage), never per-op objects such as tickets, so counting costs one uncontended atomic
//! add per allocation and nothing per op.
//!
//! The counts are process-wide: they return to their earlier values only when every object
//! made since has been dropped, which is what a leak check after a round asks.

use std::sync::atomic::{AtomicI64, Ordering};

static DEVICES: AtomicI64 = AtomicI64::new(0);
static POOLS: AtomicI64 = AtomicI64::new(0);
static STREAMS: AtomicI64 = AtomicI64::new(0);
static BUFFERS: AtomicI64 = AtomicI64::new(0);
static STORAGE: AtomicI64 = AtomicI64::new(0);
static STORAGE_BYTES: AtomicI64 = AtomicI64::new(0);

/// Live runtime objects in this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LiveCounts {
    /// Opened devices not yet closed (a device closes when its last handle, pool, stream and
    /// buffer are gone).
    pub devices: i64,
    /// Stream pools.
    pub pools: i64,
    /// Pool streams (one per pool slot in use).
    pub streams: i64,
    /// [`crate::Buffer`] handles.
    pub buffers: i64,
    /// CPU backend: buffer storage not yet freed (freed after the last queued kernel using it).
    pub cpu_storage: i64,
    /// CPU backend: bytes of that storage.
    pub cpu_storage_bytes: i64,
}

impl std::fmt::Display for LiveCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "devices {} pools {} streams {} buffers {} cpu storage {} ({} bytes)",
            self.devices,
            self.pools,
            self.streams,
            self.buffers,
            self.cpu_storage,
            self.cpu_storage_bytes
        )
    }
}

/// The live objects of this process now.
pub fn live_counts() -> LiveCounts {
    let get = |a: &AtomicI64| a.load(Ordering::Acquire);
    LiveCounts {
        devices: get(&DEVICES),
        pools: get(&POOLS),
        streams: get(&STREAMS),
        buffers: get(&BUFFERS),
        cpu_storage: get(&STORAGE),
        cpu_storage_bytes: get(&STORAGE_BYTES),
    }
}

/// What a token counts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    Device,
    Pool,
    Stream,
    Buffer,
}

/// Counts one live object of its kind until dropped.
#[derive(Debug)]
pub(crate) struct LiveToken(&'static AtomicI64);

impl LiveToken {
    pub(crate) fn new(kind: Kind) -> Self {
        let counter = match kind {
            Kind::Device => &DEVICES,
            Kind::Pool => &POOLS,
            Kind::Stream => &STREAMS,
            Kind::Buffer => &BUFFERS,
        };
        counter.fetch_add(1, Ordering::AcqRel);
        LiveToken(counter)
    }
}

impl Drop for LiveToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts one CPU storage allocation of `bytes` until dropped.
#[derive(Debug)]
pub(crate) struct StorageToken(i64);

impl StorageToken {
    pub(crate) fn new(bytes: u64) -> Self {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        STORAGE.fetch_add(1, Ordering::AcqRel);
        STORAGE_BYTES.fetch_add(bytes, Ordering::AcqRel);
        StorageToken(bytes)
    }
}

impl Drop for StorageToken {
    fn drop(&mut self) {
        STORAGE_BYTES.fetch_sub(self.0, Ordering::AcqRel);
        STORAGE.fetch_sub(1, Ordering::AcqRel);
    }
}
