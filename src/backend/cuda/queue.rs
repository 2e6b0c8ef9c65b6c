//! The CUDA device queue: host threads publish ops into page-locked memory that a running
//! kernel reads, so an op costs a few stores instead of a launch (see `queue_kernel.cu` for
//! the device side and its memory layout).
//!
//! Protocol (the host side — tickets, slot reuse, publication, relaunch — is
//! [`crate::sync::op_ring`], with its invariants and loom models; this file is its
//! [`RingDevice`]: the memory layout, the kernel launch and the driver calls):
//! - **Publish.** A thread takes the next op number `t` (one atomic add), waits until slot
//!   `t % SLOTS` is free (op `t - SLOTS` completed), and writes the slot's three words, each
//!   carrying `t`'s tag, the last with release: the op is published once all three carry it.
//!   Between taking `t` and publishing, nothing can fail or panic without publishing: every
//!   later op waits for `t`, so a failed submission publishes a no-op. For the same reason the
//!   window is kept short: whether the op's dependencies are done is read before `t` is taken,
//!   so inside it a submitter only stores (a thread descheduled there holds up every thread).
//! - **Run.** The kernel's dispatcher warp reads up to 32 slots per round trip over the bus
//!   (all three words of each at once), copies published ops to device memory in order, and
//!   splits each into chunks of whole 1,024-element tiles (up to [`DEFAULT_CHUNK_TILES`]
//!   tiles each on a busy device, smaller where idle blocks can take them; at most one chunk
//!   per compute block and [`MAX_OP_CHUNKS`] per op) on a device-side chunk queue of one
//!   tagged word per chunk. Each
//!   compute block claims the next chunk (one atomic add), waits on that chunk's own word
//!   and for the op's dependencies, runs it, and counts it; the block finishing an op's last
//!   chunk writes `t` into the op's done words (device and host) after one system-wide fence.
//! - **Chaining** (on by default since measured on the H200; `DeviceOptions::queue_chain`,
//!   `--queue-chain off` or `MULTIQ_QUEUE_CHAIN=0` turn it off). An op whose one pending dependency is the previous op
//!   on its buffer is flagged `FLAG_CHAIN`; the dispatcher may park it on that op's count
//!   word instead of queueing its chunks, and each block that finishes a chunk of the
//!   predecessor runs the same chunk of it next (`sync/chunk_chain.rs` models the hand-off).
//!   Ops on one buffer 8 in flight then hold no block waiting for their predecessor, except
//!   where the op is queued instead: its park failed (a chunk of the predecessor had already
//!   finished), or no park was tried (the predecessor was forwarded by an earlier launch, its
//!   chunks are too small to chain to, or its slot is reused within the same round). With
//!   early start, a block peeks at the count word before counting and starts a parked
//!   successor's chunk while thread 0 counts. [`QueueSettings`] has the knobs for comparing
//!   variants (least chunk size of a chain, early start), which results files record.
//! - **Idle exit and relaunch.** When nothing was published for `IDLE_EXIT`, the kernel
//!   records `{t, epoch}` in host memory and leaves, so an idle queue never holds the device
//!   (other streams' kernels need its multiprocessors). After publishing, a submitter checks
//!   the exit record and relaunches from `t`; waiters check again now and then (an exit can
//!   race a publication). Kernels of one queue run on one stream, so a relaunch starts only
//!   after the previous kernel has left. To leave, the dispatcher appends one exit chunk per
//!   compute block; each block takes one and returns.
//! - **Stop.** `Drop` publishes a stop op, makes sure a kernel runs to take it, waits for the
//!   stream, and only then frees the memory the kernel reads.
//!
//! Faults: a device fault ends the kernel with an error on its stream; waiters query the
//! stream now and then and return that error instead of waiting for a word that never comes.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaStream, DriverError};

use super::driver_error;
use super::reuse::{PinnedBlock, Reuse};
use super::stream::{bind, CudaBuffer};
use crate::backend::{downcast, BackendBuffer, BackendDeviceQueue, QueueExits};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::sync::op_ring::{OpRing, RingDevice};

/// Ops in flight at most (slots of the ring); a power of two.
pub const SLOTS: usize = 1024;
/// Elements per tile: one per thread of a 1,024-thread block (the kernel's `QUEUE_TILE`); a
/// chunk is whole tiles.
const CHUNK_THREADS: u32 = 1024;
/// Most 1,024-element tiles per chunk unless the op needs more (at most one chunk per
/// compute block), unless `MULTIQ_QUEUE_CHUNK_TILES` says otherwise (diagnostics). On a busy
/// device small ops get chunks this large (a chunk's fixed cost is a few device memory round
/// trips); on a quiet one the idle blocks are shared among the ops at hand, in smaller chunks
/// (measured on the H100: bench/results/h100/queue-trace/). With the second protocol a
/// chunk's fixed cost fell (a claimer waits on its own word), and 2 beat 4 at 16 threads on
/// the H200, interleaved in one call: a wait per op 0.84 / 0.92 / 0.96 M ops/s against
/// 0.82 / 0.77 / 0.78 M, 8 in flight 0.88 / 1.42 / 1.42 M against 1.21 / 1.05 / 1.02 M
/// (bench/results/h200/coalesce/18f2c28/tiles-*).
pub const DEFAULT_CHUNK_TILES: u32 = 2;

/// A tile count from the environment variable `name` (1..=1024), if it is set.
fn tiles_from_env(name: &str) -> Result<Option<u32>> {
    let tiles = crate::env_knob::read(name, "a whole number of tiles, 1..=1024", |v| {
        crate::env_knob::number_in(1..=1024)(v)
    })?;
    Ok(tiles.map(|t| t as u32))
}

/// A timeline trace of the queue (diagnostics): with `MULTIQ_QUEUE_TRACE=PREFIX`, each queue
/// records, for `SLOTS` ops from op `MULTIQ_QUEUE_TRACE_FROM` (default 2,000: after warm-up),
/// when each op was published and first seen complete on the host (`CLOCK_REALTIME`), and
/// when the kernel saw it, forwarded it, started it and completed it (`%globaltimer`, which
/// the driver keeps on the same clock to within a few microseconds), and writes them as CSV
/// to `PREFIX-<n>.csv` when the queue is dropped. `scripts/queue-trace.py` reads them.
struct Trace {
    path: std::path::PathBuf,
    from: u64,
    /// Per traced op: host publish, host first-seen-done (ns since the epoch; 0: none).
    host: Box<[[AtomicU64; 2]]>,
    /// Device allocation of `SLOTS * 4` stamps.
    dev: sys::CUdeviceptr,
}

const TRACE_STAMPS: usize = 4;

fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Trace {
    /// The trace asked for by the environment, if any (its device memory not yet made).
    fn from_env() -> Option<Trace> {
        static QUEUES: AtomicU64 = AtomicU64::new(0);
        let prefix = std::env::var_os("MULTIQ_QUEUE_TRACE")?;
        let from = std::env::var("MULTIQ_QUEUE_TRACE_FROM")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(2000)
            .max(1);
        let n = QUEUES.fetch_add(1, Ordering::Relaxed);
        let mut path = std::path::PathBuf::from(prefix);
        let name = format!(
            "{}-{n}.csv",
            path.file_name()
                .map_or("trace".into(), |f| f.to_string_lossy())
        );
        path.set_file_name(name);
        Some(Trace {
            path,
            from,
            host: (0..SLOTS)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
            dev: 0,
        })
    }

    fn entry(&self, op: u64) -> Option<&[AtomicU64; 2]> {
        op.checked_sub(self.from)
            .and_then(|i| self.host.get(usize::try_from(i).ok()?))
    }

    fn published(&self, op: u64) {
        if let Some(e) = self.entry(op) {
            e[0].store(realtime_ns(), Ordering::Relaxed);
        }
    }

    fn seen_done(&self, op: u64) {
        if let Some(e) = self.entry(op) {
            if e[1].load(Ordering::Relaxed) == 0 {
                let _ =
                    e[1].compare_exchange(0, realtime_ns(), Ordering::Relaxed, Ordering::Relaxed);
            }
        }
    }

    /// Writes the CSV; the queue's stream must be idle (the kernel wrote its stamps).
    fn write(&self) -> std::io::Result<()> {
        let mut stamps = vec![0u64; SLOTS * TRACE_STAMPS];
        // SAFETY: `dev` is a live allocation of `SLOTS * TRACE_STAMPS` u64 (made with the
        // queue, freed after this), and the queue's stream is idle, so nothing writes it.
        unsafe { result::memcpy_dtoh_sync(&mut stamps, self.dev) }
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let mut out = String::from(
            "op,host_published,device_seen,device_forwarded,device_started,device_completed,host_seen_done\n",
        );
        for (i, h) in self.host.iter().enumerate() {
            let d = &stamps[i * TRACE_STAMPS..(i + 1) * TRACE_STAMPS];
            let (p, o) = (h[0].load(Ordering::Relaxed), h[1].load(Ordering::Relaxed));
            if p == 0 || o == 0 || d.contains(&0) {
                continue;
            }
            out.push_str(&format!(
                "{},{p},{},{},{},{},{o}\n",
                self.from + i as u64,
                d[0],
                d[1],
                d[2],
                d[3]
            ));
        }
        std::fs::write(&self.path, out)
    }
}

/// Blocks of the queue's kernel per multiprocessor, given how many fit (`occupancy`): all of
/// them, unless `MULTIQ_QUEUE_BLOCKS_PER_SM` (diagnostics) asks for fewer. Leaving one slot
/// per multiprocessor to other kernels was measured on the H100 and lost (`default` ops at
/// 0.93 × off instead of 0.99; bench/results/h100/coalesce/b7f359a/). Whether other streams'
/// kernels run beside a busy queue at full occupancy is what the GPU tests
/// `ordinary_launches_run_while_the_device_queue_is_busy` and
/// `pools_come_and_go_while_another_pools_device_queue_is_busy` check. (Until the session of
/// 2026-12-05 the first of them kept 8 threads waiting for each op, whose ops the routing rule
/// sends to launches of their own, not to the queue: it showed nothing about a busy queue.)
fn blocks_per_sm(occupancy: u32) -> u32 {
    std::env::var("MULTIQ_QUEUE_BLOCKS_PER_SM")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&v| v >= 1)
        .unwrap_or(occupancy)
        .clamp(1, occupancy.max(1))
}

/// How long the kernel stays on an idle device before leaving.
pub const IDLE_EXIT: Duration = Duration::from_micros(500);

const FLAG_STOP: u32 = 1;
const FLAG_NOP: u32 = 2;
/// The op's one pending dependency is the previous op on its buffer (over the same
/// elements): the kernel may chain it to that op (run each of its chunks right after the same
/// chunk of the predecessor, on the block that ran it) instead of queueing its chunks.
const FLAG_CHAIN: u32 = 4;

/// How a device queue splits and chains ops; the same for every queue of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct QueueSettings {
    /// Most tiles per chunk on a busy device ([`DEFAULT_CHUNK_TILES`]).
    pub chunk_tiles: u32,
    /// Whether ops may be chained to their buffer's previous op (`FLAG_CHAIN`).
    pub chain: bool,
    /// Least tiles per chunk of an op flagged to chain (a chain keeps its first op's layout,
    /// and each of its chunks keeps one block busy while the chain grows).
    pub chain_tiles: u32,
    /// Whether a block starts a parked successor's chunk before counting its predecessor's
    /// (the kernel's early start).
    pub chain_early: bool,
    /// Whether a busy queue gives the device up when another kernel is launched on the
    /// device ([`QueueYield`]).
    pub yield_device: bool,
    /// The longest a queue's kernel stays on the device (zero: no limit).
    pub slice: Duration,
    /// The pool's routing, recorded with the queue it routes to: whether small ops join the
    /// queue while its kernel holds the device (`runtime::device_queue`).
    pub while_running: bool,
}

/// The longest a device queue's kernel stays on the device before it leaves (and is launched
/// again at the next publication or check): the bound on how long another kernel can wait for
/// the device where the yield word missed it (`queue_kernel.cu`). Leaving costs a relaunch, a
/// few tens of microseconds without service, so it is long next to that.
pub const QUEUE_SLICE: Duration = Duration::from_millis(50);

/// The least a device queue's kernel runs before it leaves for another kernel: every launch
/// makes progress, and kernels launched back to back cost it one relaunch per this much time
/// at most.
pub const QUEUE_MIN_RUN: Duration = Duration::from_micros(200);

/// A kernel launched on the device this recently may not have started yet (it can wait behind
/// work of its own stream): a queue kernel launched now leaves once more after
/// [`QUEUE_MIN_RUN`] for it.
pub const QUEUE_RECENT: Duration = Duration::from_millis(2);

impl QueueSettings {
    /// The settings for `chain` (`None`: on unless `MULTIQ_QUEUE_CHAIN=0`; on by default since
    /// the H200 call of 2026-12-05 at `845214b`: with early start, 1.18x the unchained queue at
    /// 8 in flight and 1.19x with a wait per op, medians of 3 interleaved rounds,
    /// `bench/results/h200/chain/`), with the diagnostic knobs for comparing variants on a GPU:
    /// `MULTIQ_QUEUE_CHUNK_TILES`, `MULTIQ_QUEUE_CHAIN_TILES` (1..=1024; default: the chunk
    /// size) and `MULTIQ_QUEUE_CHAIN_EARLY=0` (or `off`, `false`: early start off);
    /// `MULTIQ_QUEUE_CHAIN` takes 1, on or true (0, off, false: off); `MULTIQ_QUEUE_YIELD=off`
    /// keeps a busy queue on the device whatever else is launched, `MULTIQ_QUEUE_SLICE_MS`
    /// sets [`QUEUE_SLICE`] (0: no limit). A value not understood is an error naming the
    /// variable. [`QueueSettings::describe`] records the values used.
    pub fn new(chain: Option<bool>) -> Result<QueueSettings> {
        use crate::env_knob::{read, switch, SWITCH};
        let chain = match chain {
            Some(c) => c,
            None => read("MULTIQ_QUEUE_CHAIN", SWITCH, switch)?.unwrap_or(true),
        };
        let chunk_tiles =
            tiles_from_env("MULTIQ_QUEUE_CHUNK_TILES")?.unwrap_or(DEFAULT_CHUNK_TILES);
        Ok(QueueSettings {
            chunk_tiles,
            chain,
            chain_tiles: tiles_from_env("MULTIQ_QUEUE_CHAIN_TILES")?.unwrap_or(chunk_tiles),
            chain_early: read("MULTIQ_QUEUE_CHAIN_EARLY", SWITCH, switch)?.unwrap_or(true),
            yield_device: read("MULTIQ_QUEUE_YIELD", SWITCH, switch)?.unwrap_or(true),
            while_running: crate::env_knob::queue_while_running()?,
            slice: read(
                "MULTIQ_QUEUE_SLICE_MS",
                "a whole number of milliseconds (0: no limit)",
                |v| v.parse::<u64>().ok(),
            )?
            .map_or(QUEUE_SLICE, Duration::from_millis),
        })
    }

    /// The settings as a results file records them (device info).
    pub fn describe(&self) -> Vec<(String, String)> {
        let mut out = vec![
            (
                "queue_chain".into(),
                if self.chain { "on" } else { "off" }.into(),
            ),
            ("queue_chunk_tiles".into(), self.chunk_tiles.to_string()),
        ];
        if self.chain {
            out.push(("queue_chain_tiles".into(), self.chain_tiles.to_string()));
            let early = if self.chain_early { "on" } else { "off" };
            out.push(("queue_chain_early".into(), early.into()));
        }
        let yield_device = if self.yield_device { "on" } else { "off" };
        out.push(("queue_yield".into(), yield_device.into()));
        out.push(("queue_slice_ms".into(), self.slice.as_millis().to_string()));
        let while_running = if self.while_running { "on" } else { "off" };
        out.push(("queue_while_running".into(), while_running.into()));
        out
    }
}

/// One op as the host publishes it; the layout of the kernel's `HostSlot`: one cache line,
/// three words, each carrying the op's tag ([`slot_tag`]) in bits 48..63, so the device
/// finds a published op and reads it in one round trip over the bus:
/// - `w[0]`: the buffer's device address (below 2^48);
/// - `w[1]`: elements (bits 0..31), iterations (bits 32..47);
/// - `w[2]`: how many tickets back the two dependencies are (bits 0..11 and 12..23; 0: none),
///   flags (bits 24..31). Stored last, with release.
#[repr(C, align(64))]
struct HostSlot {
    w: [AtomicU64; 3],
}

/// A done word (or another word the kernel writes) on a cache line of its own: a completion
/// never disturbs another slot's waiter.
#[repr(C, align(64))]
struct DoneWord(AtomicU64);

/// The host-mapped region: the ring, the done words, the exit record.
#[repr(C)]
struct HostRegion {
    ring: [HostSlot; SLOTS],
    done: [DoneWord; SLOTS],
    /// `{ticket, epoch, why}` of the last kernel exit (`why`: `EXIT_*` of the kernel, 0 once
    /// the host counted it).
    exit: [AtomicU64; 3],
    /// Ops chained so far (written by the kernels; a statistic), on a line of its own (the
    /// kernel writes it while submitters read `exit`).
    chained: DoneWord,
}

/// Bit of each slot word where the tag starts.
const TAG_SHIFT: u32 = 48;
/// Largest buffer address a slot holds.
const ADDRESS_MASK: u64 = (1 << TAG_SHIFT) - 1;
/// Most iterations a queued op may ask for (16 bits of `w[1]`); larger ops launch alone.
const MAX_QUEUED_ITERS: u32 = u16::MAX as u32;

/// The tag of ticket `t` (the kernel's `slot_tag`): its lap around the ring, never 0 (zeroed
/// memory) and different from the lap before (the slot's previous contents), so a word
/// carrying it was written for `t`.
fn slot_tag(t: u64) -> u64 {
    0x8000 | ((t / SLOTS as u64) & 0x7fff)
}

/// How many tickets back dependency `after` of ticket `t` is, for the slot's 12-bit field;
/// 0 (none) for no dependency, or one a whole ring back or more: its slot was reused after it
/// completed, before `t` was published.
fn distance(t: u64, after: u64) -> u64 {
    debug_assert!(after < t, "a dependency comes before its op");
    match t.checked_sub(after) {
        Some(d) if after != 0 && d < SLOTS as u64 => d,
        _ => 0,
    }
}

/// The three words of ticket `t`'s slot: `op`, with `pending` the distances of its two
/// dependencies still pending ([`distance`], 0: none), as a no-op if `nop`, flagged
/// `FLAG_CHAIN` if `chain` allows and the one dependency still pending is `after[1]` (the
/// buffer's previous op; the stream's, `after[0]`, is either done or the same op).
fn slot_words(t: u64, op: &SlotOp, pending: [u64; 2], nop: bool, chain: bool) -> [u64; 3] {
    let tag = slot_tag(t) << TAG_SHIFT;
    let mut flags = if nop { FLAG_NOP } else { op.flags };
    if chain && !nop && pending[1] != 0 && (pending[0] == 0 || pending[0] == pending[1]) {
        flags |= FLAG_CHAIN;
    }
    debug_assert!(op.iters <= MAX_QUEUED_ITERS, "submit refuses larger ops");
    [
        op.ptr & ADDRESS_MASK | tag,
        u64::from(op.n) | u64::from(op.iters) << 32 | tag,
        pending[0] | pending[1] << 12 | u64::from(flags) << 24 | tag,
    ]
}

/// Bytes of the kernel's `DevSlot`.
const DEV_SLOT_BYTES: usize = 64;
/// Entries of the kernel's chunk queue (`CHUNK_RING`): more than the chunks of a whole ring of
/// ops ([`MAX_OP_CHUNKS`] each) plus one exit word per compute block, so a chunk word is never
/// rewritten before its block read it (the kernel's `wait_room` gives the argument).
const CHUNK_RING: usize = 524_288;
/// Most chunks per op (the kernel's `MAX_OP_CHUNKS`).
const MAX_OP_CHUNKS: usize = 480;
// A word outlives its reader: a ring of ops' chunks and the exit words of a grid far larger than
// any device's fit in one lap.
const _: () = assert!(SLOTS * MAX_OP_CHUNKS + 4096 < CHUNK_RING);
// A count word counts an op's chunks in its low 16 bits (the kernel's `COUNT_CHUNKS`).
const _: () = assert!(MAX_OP_CHUNKS < 1 << 16);

/// Layout of the device allocation: (dring, count, dev_done, chunks, ctr) offsets and size.
const DEV_COUNT: usize = SLOTS * DEV_SLOT_BYTES;
const DEV_DONE: usize = DEV_COUNT + SLOTS * 8;
const DEV_CHUNKS: usize = DEV_DONE + SLOTS * 8;
const DEV_CTR: usize = DEV_CHUNKS + CHUNK_RING * 8;
/// The chunk queue's counters.
const CTR_BYTES: usize = 512;
const DEV_BYTES: usize = DEV_CTR + CTR_BYTES;
/// The chunk queue's words and counters, zeroed before every launch (a chunk word's tag
/// counts laps of this launch's chunk numbers).
const DEV_ZEROED: std::ops::Range<usize> = DEV_CHUNKS..DEV_BYTES;

/// The kernel's parameter, laid out as its `QueueParams`.
#[repr(C)]
#[derive(Clone, Copy)]
struct QueueParams {
    ring: u64,
    host_done: u64,
    host_exit: u64,
    dring: u64,
    count: u64,
    dev_done: u64,
    chunks: u64,
    ctr: u64,
    start: u64,
    epoch: u64,
    idle_ns: u64,
    slots: u32,
    chunk_tiles: u32,
    trace: u64,
    trace_from: u64,
    host_chained: u64,
    chained_start: u64,
    chain_tiles: u32,
    chain_early: u32,
    yield_word: u64,
    yield_base: u64,
    min_run_ns: u64,
    slice_ns: u64,
}

/// One op's fields, as written into a `HostSlot`; `after`: the stream's previous op and the
/// buffer's (see [`BackendDeviceQueue::submit`]).
pub(super) struct SlotOp {
    ptr: u64,
    n: u32,
    iters: u32,
    after: [u64; 2],
    /// Whether this host saw each of `after` complete before the op took its ticket.
    seen_done: [bool; 2],
    flags: u32,
}

/// A device's yield word: a counter in page-locked memory that streams raise after every
/// kernel they queue on the device, while it has a device queue, and that the queues' kernels
/// read to leave the device to those kernels (`queue_kernel.cu`: a queue's grid fills every
/// multiprocessor, so while it runs no other kernel gets a block). One per device ordinal in
/// the process ([`QueueYield::for_device`]): every `Device` opened on a GPU shares its primary
/// context, and so its multiprocessors.
pub(super) struct QueueYield {
    /// The word (`None` only inside `Drop`).
    block: Option<PinnedBlock>,
    reuse: Arc<Reuse>,
    /// Device queues alive on the device that give it up (`MULTIQ_QUEUE_YIELD` on): without
    /// one, nothing reads the word, and launches do not raise it.
    queues: std::sync::atomic::AtomicUsize,
    /// When a kernel was last launched ([`since_start`] nanoseconds; 0: never).
    last_launch: AtomicU64,
}

/// Nanoseconds since the first call in this process (at least 1).
fn since_start() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

// SAFETY: shared access to the block goes only through atomic operations on its word (and the
// device reads it); the block itself moves only in `new` and `Drop`, which own the value.
unsafe impl Sync for QueueYield {}

impl QueueYield {
    /// The yield word of device `ordinal`: the one in use, or a new one from `reuse`.
    pub(super) fn for_device(ordinal: usize, reuse: &Arc<Reuse>) -> Result<Arc<Self>> {
        use std::collections::HashMap;
        use std::sync::Weak;
        static WORDS: parking_lot::Mutex<Option<HashMap<usize, Weak<QueueYield>>>> =
            parking_lot::Mutex::new(None);
        let mut words = WORDS.lock();
        let words = words.get_or_insert_with(HashMap::new);
        if let Some(word) = words.get(&ordinal).and_then(Weak::upgrade) {
            return Ok(word);
        }
        let word = Arc::new(QueueYield {
            block: Some(reuse.take_pinned(8)?),
            reuse: reuse.clone(),
            queues: std::sync::atomic::AtomicUsize::new(0),
            last_launch: AtomicU64::new(0),
        });
        words.insert(ordinal, Arc::downgrade(&word));
        Ok(word)
    }

    fn word(&self) -> &AtomicU64 {
        let block = self.block.as_ref().expect("taken only by Drop");
        // SAFETY: the block is live, page-aligned (so aligned for u64) and at least 8 bytes
        // (`Reuse` invariant) until `Drop`; the host only accesses it atomically.
        unsafe { AtomicU64::from_ptr(block.host().as_ptr().cast::<u64>()) }
    }

    /// After a kernel was queued on the device: raises the word if a device queue exists.
    pub(super) fn kernel_launched(&self) {
        if self.queues.load(Ordering::Relaxed) != 0 {
            self.word().fetch_add(1, Ordering::Release);
            self.last_launch.store(since_start(), Ordering::Relaxed);
        }
    }

    /// Before a device queue's kernel is launched: the value the new kernel compares the word
    /// with (the raise [`QueueYield::queue_launched`] makes after its launch included, so it
    /// does not leave for itself), and when another kernel was last launched, if that was
    /// within [`QUEUE_RECENT`].
    fn queue_launching(&self) -> (u64, Option<u64>) {
        let value = self.word().load(Ordering::Acquire).wrapping_add(1);
        let last = self.last_launch.load(Ordering::Relaxed);
        let recent =
            last != 0 && since_start().saturating_sub(last) < QUEUE_RECENT.as_nanos() as u64;
        (value, recent.then_some(last))
    }

    /// After a device queue's kernel was launched: raises the word, so the other queues'
    /// kernels (each filling the device) leave for it. (No time stamp: a queue's relaunch is
    /// not a kernel waiting behind its stream.)
    fn queue_launched(&self) {
        self.word().fetch_add(1, Ordering::Release);
    }

    fn device(&self) -> sys::CUdeviceptr {
        self.block.as_ref().map_or(0, PinnedBlock::device)
    }
}

impl Drop for QueueYield {
    fn drop(&mut self) {
        // Every queue holding this is gone, and each waited for its kernel to leave (one that
        // could not, after a device fault, might still read the word: reading is harmless to
        // the block's next owner).
        if let Some(block) = self.block.take() {
            self.reuse.give_pinned(block);
        }
    }
}

/// A device queue on one CUDA context.
///
/// Invariants: `host` is the start of `block`, a live page-locked block (from the context's
/// [`Reuse`]) zeroed at creation, holding a `HostRegion`, whose device alias is `host_dev`;
/// `dev` is a live device allocation of `DEV_BYTES` bytes (stream-ordered on the queue's stream
/// where the device has them), zeroed at creation. Both leave only by `Drop`, after the queue's
/// stream is known idle, so no kernel can touch them afterwards: the block goes back for reuse
/// and `dev` is freed. Neither waits for the whole device (another pool's busy queue may keep
/// it busy for as long as work arrives).
pub(super) struct CudaDeviceQueue {
    host: std::ptr::NonNull<HostRegion>,
    host_dev: sys::CUdeviceptr,
    /// The page-locked block `host` lives in (`None` once given back).
    block: Option<PinnedBlock>,
    reuse: Arc<Reuse>,
    /// The device's yield word (counted in while this queue lives).
    queue_yield: Arc<QueueYield>,
    /// The launch (its time stamp) for which a kernel of this queue last got the extra exit.
    straggler_exit: AtomicU64,
    /// Kernel exits counted by why, at each launch after one: index `why - 1` for the
    /// kernel's `EXIT_IDLE`, `EXIT_YIELD` (another kernel asked), `EXIT_SLICE`, `EXIT_STOP`
    /// (1 to 4, `queue_kernel.cu`).
    exits: [AtomicU64; 4],
    dev: sys::CUdeviceptr,
    stream: Arc<CudaStream>,
    function: CudaFunction,
    grid: u32,
    /// Chunk sizes and chaining (see the kernel).
    settings: QueueSettings,
    /// Tickets, slot reuse and kernel launches.
    ring: OpRing,
    /// The timeline trace, when `MULTIQ_QUEUE_TRACE` asks for one.
    trace: Option<Trace>,
    ctx: Arc<CudaContext>,
}

// SAFETY: the host region is plain page-locked memory accessed only through atomics (the
// device writes `done` and `exit` by DMA); the device pointers are plain integers; the stream
// and function handles may be used from any thread of their context.
unsafe impl Send for CudaDeviceQueue {}
// SAFETY: as above; all shared mutation goes through atomics or the `runner` mutex.
unsafe impl Sync for CudaDeviceQueue {}

impl CudaDeviceQueue {
    pub(super) fn new(
        ctx: &Arc<CudaContext>,
        function: CudaFunction,
        multiprocessors: u32,
        settings: QueueSettings,
        reuse: &Arc<Reuse>,
        queue_yield: &Arc<QueueYield>,
    ) -> Result<Self> {
        bind(ctx)?;
        let per_sm = function
            .occupancy_max_active_blocks_per_multiprocessor(CHUNK_THREADS, 0, None)
            .map_err(|e| driver_error("device queue", e))?;
        let grid = blocks_per_sm(per_sm) * multiprocessors;
        if SLOTS * MAX_OP_CHUNKS + grid as usize >= CHUNK_RING {
            return Err(Error::Device {
                op: "device queue",
                message: format!("{grid} blocks: more than the chunk ring is sized for"),
            });
        }
        if grid < 2 {
            return Err(Error::Device {
                op: "device queue",
                message: "the device cannot hold the queue kernel's blocks".into(),
            });
        }
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_error("device queue", e))?;
        // Zeroed (all-zero bytes are a valid `HostRegion`: atomics and integers), page-aligned
        // (so aligned for it), at least its size.
        let block = reuse.take_pinned(std::mem::size_of::<HostRegion>())?;
        let mut queue = CudaDeviceQueue {
            host: block.host().cast::<HostRegion>(),
            host_dev: block.device(),
            block: Some(block),
            reuse: reuse.clone(),
            queue_yield: queue_yield.clone(),
            straggler_exit: AtomicU64::new(u64::MAX),
            exits: Default::default(),
            dev: 0,
            stream,
            function,
            grid,
            settings,
            ring: OpRing::new(SLOTS as u64),
            trace: Trace::from_env(),
            ctx: ctx.clone(),
        };
        // From here on, `Drop` frees what was made (the stream has run nothing yet) and counts
        // the queue out of the device's yield word (a queue that never gives the device up
        // does not read it, so it is not counted in).
        if queue.settings.yield_device {
            queue_yield.queues.fetch_add(1, Ordering::Relaxed);
        }
        queue.dev = queue
            .device_alloc(DEV_BYTES)
            .map_err(|e| driver_error("device queue", e))?;
        // The memsets are queued on the queue's own stream and complete before `new` returns
        // (synchronized below): the non-Async memsets would be asynchronous to the host for
        // device memory, on the legacy default stream, unordered with the queue's non-blocking
        // stream.
        // SAFETY: `dev` is a live allocation of `DEV_BYTES` bytes; the stream is live.
        unsafe { result::memset_d8_async(queue.dev, 0, DEV_BYTES, queue.stream.cu_stream()) }
            .map_err(|e| driver_error("device queue", e))?;
        if queue.trace.is_some() {
            let bytes = SLOTS * TRACE_STAMPS * 8;
            let dev = queue
                .device_alloc(bytes)
                .map_err(|e| driver_error("device queue trace", e))?;
            if let Some(trace) = &mut queue.trace {
                trace.dev = dev;
            }
            // SAFETY: `dev` is a live allocation of `bytes` bytes; the stream is live.
            unsafe { result::memset_d8_async(dev, 0, bytes, queue.stream.cu_stream()) }
                .map_err(|e| driver_error("device queue trace", e))?;
        }
        // Memsets of device memory may run on the multiprocessors: a busy queue leaves for them.
        queue_yield.kernel_launched();
        queue
            .stream
            .synchronize()
            .map_err(|e| driver_error("device queue", e))?;
        Ok(queue)
    }

    /// `bytes` of device memory for the queue's kernels: stream-ordered on the queue's stream
    /// where the device has that (freed the same way, so neither waits for the whole device;
    /// usable by the kernels, which run on that stream), `cuMemAlloc` otherwise.
    fn device_alloc(&self, bytes: usize) -> std::result::Result<sys::CUdeviceptr, DriverError> {
        if self.ctx.has_async_alloc() {
            // SAFETY: the context is current (bound by `new`) and the stream live.
            unsafe { result::malloc_async(self.stream.cu_stream(), bytes) }
        } else {
            // SAFETY: the context is current.
            unsafe { result::malloc_sync(bytes) }
        }
    }

    /// Frees `ptr`, made by `device_alloc`, once the queue's stream is idle.
    fn device_free(&self, ptr: sys::CUdeviceptr) {
        if ptr == 0 {
            return;
        }
        if self.ctx.has_async_alloc() {
            // SAFETY: the stream is idle (the caller's duty) and nothing else uses `ptr`, a
            // stream-ordered allocation of this stream that we own.
            let _ = unsafe { result::free_async(ptr, self.stream.cu_stream()) };
        } else {
            // SAFETY: as above; allocated with `cuMemAlloc`.
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    /// The value a kernel launched now compares the yield word with ([`QueueYield`]): the
    /// word's value, or one less (so the kernel leaves once more after [`QUEUE_MIN_RUN`]) when
    /// another kernel was launched within [`QUEUE_RECENT`] (it may still wait behind work of its
    /// own stream) and no earlier kernel of this queue got that exit for the same launch (so a
    /// launch costs this queue at most two exits).
    fn yield_base(&self) -> u64 {
        match self.queue_yield.queue_launching() {
            (value, Some(launch))
                if self.straggler_exit.swap(launch, Ordering::Relaxed) != launch =>
            {
                value.wrapping_sub(1)
            }
            (value, _) => value,
        }
    }

    fn region(&self) -> &HostRegion {
        // SAFETY: `host` is live until `Drop` (invariant) and only accessed through atomics.
        unsafe { self.host.as_ref() }
    }

    fn launch_kernel(&self, epoch: u64, start: u64) -> Result<()> {
        let mut params = QueueParams {
            ring: self.host_dev,
            host_done: self.host_dev + std::mem::offset_of!(HostRegion, done) as u64,
            host_exit: self.host_dev + std::mem::offset_of!(HostRegion, exit) as u64,
            dring: self.dev,
            count: self.dev + DEV_COUNT as u64,
            dev_done: self.dev + DEV_DONE as u64,
            chunks: self.dev + DEV_CHUNKS as u64,
            ctr: self.dev + DEV_CTR as u64,
            start,
            epoch,
            idle_ns: IDLE_EXIT.as_nanos() as u64,
            slots: SLOTS as u32,
            chunk_tiles: self.settings.chunk_tiles,
            trace: self.trace.as_ref().map_or(0, |t| t.dev),
            trace_from: self.trace.as_ref().map_or(0, |t| t.from),
            host_chained: self.host_dev + std::mem::offset_of!(HostRegion, chained) as u64,
            // The previous kernel of this queue has left (a relaunch follows its exit record,
            // written after its last count).
            chained_start: self.region().chained.0.load(Ordering::Acquire),
            chain_tiles: self.settings.chain_tiles,
            chain_early: u32::from(self.settings.chain && self.settings.chain_early),
            // Read before the launch: a kernel launched on the device after this read raises
            // the word past it, and this kernel leaves for it.
            yield_base: self.yield_base(),
            min_run_ns: QUEUE_MIN_RUN.as_nanos() as u64,
            yield_word: if self.settings.yield_device {
                self.queue_yield.device()
            } else {
                0
            },
            slice_ns: u64::try_from(self.settings.slice.as_nanos()).unwrap_or(u64::MAX),
        };
        bind(&self.ctx)?;
        // SAFETY: the chunk queue is within the live allocation (invariant); the memset is
        // ordered on the queue's stream after the previous kernel and before this one.
        unsafe {
            result::memset_d8_async(
                self.dev + DEV_ZEROED.start as u64,
                0,
                DEV_ZEROED.len(),
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| driver_error("device queue launch", e))?;
        let mut args: [*mut c_void; 1] = [(&mut params as *mut QueueParams).cast()];
        // SAFETY: the function takes one `QueueParams` by value, laid out as `QueueParams`
        // here (eleven u64, two u32, four u64, two u32, three u64; the layout test checks it
        // against the kernel's source); `args` points to a live local for the duration of the
        // call (the driver copies it). Every pointer in it is live until `Drop` has seen the
        // stream idle (invariant); the kernel needs blockDim = 1,024 (its chunk size) and a
        // grid no larger than what the occupancy calculator says fits at once.
        unsafe {
            result::launch_kernel(
                self.function.cu_function(),
                (self.grid, 1, 1),
                (CHUNK_THREADS, 1, 1),
                0,
                self.stream.cu_stream(),
                &mut args,
            )
        }
        .map_err(|e| driver_error("device queue launch", e))?;
        // After the launch (the base above anticipated it): another queue's kernel that sees
        // the raise leaves for this one, and a relaunch of it pushed before this launch was
        // read the word before the raise, so it leaves too.
        self.queue_yield.queue_launched();
        Ok(())
    }
}

impl CudaDeviceQueue {
    /// Whether this host has seen op `after` complete (0: no such op): its slot's done word
    /// reached it. (The slot's later ops are written only after it completed, so a done word
    /// past it means it completed too.) The device wrote the word after a system-wide fence, so
    /// the op's results are visible to whatever runs after it.
    fn seen_done(&self, after: u64) -> bool {
        after != 0 && self.done((after % SLOTS as u64) as usize) >= after
    }
}

/// The slot field for dependency `after` of ticket `t`: its [`distance`], or 0 when the host
/// saw it complete before `t` was taken (`seen_done`). The blocks that run an op whose
/// dependencies are all done read no done words before they start. Read before the ticket is
/// taken, so that between taking it and publishing (a window in which every later op of every
/// thread waits for this one) a submitter only stores, and reads nothing the device writes.
fn pending_field(t: u64, after: u64, seen_done: bool) -> u64 {
    if seen_done {
        0
    } else {
        distance(t, after)
    }
}

impl RingDevice for CudaDeviceQueue {
    type Op = SlotOp;
    type Error = Error;

    fn write(&self, index: usize, t: u64, op: &SlotOp, nop: bool) {
        let slot = &self.region().ring[index];
        let pending = [
            pending_field(t, op.after[0], op.seen_done[0]),
            pending_field(t, op.after[1], op.seen_done[1]),
        ];
        let words = slot_words(t, op, pending, nop, self.settings.chain);
        slot.w[0].store(words[0], Ordering::Relaxed);
        slot.w[1].store(words[1], Ordering::Relaxed);
        if let Some(trace) = &self.trace {
            trace.published(t);
        }
        slot.w[2].store(words[2], Ordering::Release);
    }

    fn done(&self, index: usize) -> u64 {
        self.region().done[index].0.load(Ordering::Acquire)
    }

    fn exit_record(&self) -> (u64, u64) {
        let r = self.region();
        let epoch = r.exit[1].load(Ordering::Acquire);
        (r.exit[0].load(Ordering::Acquire), epoch)
    }

    fn launch(&self, epoch: u64, start: u64) -> Result<()> {
        // The kernel before this one (if any) has left: its reason is counted once (nothing
        // writes the word again before this launch).
        let why = self.region().exit[2].swap(0, Ordering::AcqRel);
        if let Some(count) = why.checked_sub(1).and_then(|i| self.exits.get(i as usize)) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.launch_kernel(epoch, start)
    }

    fn failed(&self) -> Result<()> {
        bind(&self.ctx)?;
        // SAFETY: the stream is live (held by `self`).
        match unsafe { sys::cuStreamQuery(self.stream.cu_stream()) }.result() {
            Ok(()) => Ok(()),
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NOT_READY => Ok(()),
            Err(e) => Err(driver_error("device queue", e)),
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("device queue", e))
    }

    fn lost(&self, op: u64) -> Error {
        Error::Device {
            op: "device queue",
            message: format!(
                "op {op} was overwritten before it ran, after a failed wait for its slot; \
                 this device queue runs nothing more (open a new pool)"
            ),
        }
    }
}

impl BackendDeviceQueue for CudaDeviceQueue {
    fn supports(&self, kernel: Kernel) -> bool {
        matches!(kernel, Kernel::SimpleCompute { iters } if iters <= MAX_QUEUED_ITERS)
    }

    fn submit(&self, kernel: Kernel, buf: &dyn BackendBuffer, after: [u64; 2]) -> Result<u64> {
        let buf = downcast::<CudaBuffer>(buf.as_any(), "buffer")?;
        let Kernel::SimpleCompute { iters } = kernel;
        if iters > MAX_QUEUED_ITERS {
            return Err(Error::invalid("too many iterations for the device queue"));
        }
        let n = u32::try_from(buf.len())
            .map_err(|_| Error::invalid("buffer too large for a 32-bit kernel index"))?;
        if buf.ptr() > ADDRESS_MASK {
            return Err(Error::Device {
                op: "device queue",
                message: format!("buffer address {:#x} above 2^48", buf.ptr()),
            });
        }
        let op = SlotOp {
            ptr: buf.ptr(),
            n,
            iters,
            after,
            seen_done: after.map(|a| self.seen_done(a)),
            flags: 0,
        };
        self.ring.submit(self, &op)
    }

    fn is_done(&self, op: u64, check: bool) -> Result<bool> {
        let done = self.ring.is_done(self, op, check)?;
        if done {
            if let Some(trace) = &self.trace {
                trace.seen_done(op);
            }
        }
        Ok(done)
    }

    fn published(&self) -> u64 {
        self.ring.published()
    }

    fn window(&self) -> u64 {
        SLOTS as u64
    }

    fn launches(&self) -> u64 {
        self.ring.launches()
    }

    fn exits(&self) -> QueueExits {
        let [idle, asked, slice, stop] = self.exits.each_ref().map(|c| c.load(Ordering::Relaxed));
        QueueExits {
            idle,
            asked,
            slice,
            stop,
        }
    }

    fn kernel_running(&self) -> bool {
        self.ring.kernel_on_device(self)
    }

    fn chained(&self) -> u64 {
        self.region().chained.0.load(Ordering::Relaxed)
    }

    fn fills_device(&self) -> usize {
        self.grid as usize * CHUNK_THREADS as usize
    }
}

impl Drop for CudaDeviceQueue {
    fn drop(&mut self) {
        // If the device failed, a kernel might still read the memory: it is leaked instead.
        let stopped = self.published() == 0 || self.stop();
        // Counted out only now: while it drains, the queue's kernel still leaves for others.
        if self.settings.yield_device {
            self.queue_yield.queues.fetch_sub(1, Ordering::Relaxed);
        }
        if stopped {
            if let Some(trace) = &self.trace {
                // The copy needs the context current (`stop` binds it only if it published).
                let _ = bind(&self.ctx);
                match trace.write() {
                    Ok(()) => eprintln!("multiq: queue trace written to {}", trace.path.display()),
                    Err(e) => eprintln!("multiq: queue trace {}: {e}", trace.path.display()),
                }
            }
            self.free();
        }
    }
}

impl CudaDeviceQueue {
    /// Publishes the stop op and waits until a kernel took it; true once the stream is idle
    /// and no kernel of this queue will run again.
    fn stop(&self) -> bool {
        let stop = SlotOp {
            ptr: 0,
            n: 0,
            iters: 0,
            after: [0, 0],
            seen_done: [false, false],
            flags: FLAG_STOP,
        };
        self.ring.stop(self, &stop)
    }

    /// Releases the queue's memory; only once its stream is idle and no kernel of this queue
    /// will run again, so nothing reads it any more.
    fn free(&mut self) {
        if bind(&self.ctx).is_err() {
            return;
        }
        self.device_free(self.dev);
        self.dev = 0;
        if let Some(trace) = &self.trace {
            self.device_free(trace.dev);
        }
        if let Some(block) = self.block.take() {
            self.reuse.give_pinned(block);
        }
    }
}

impl std::fmt::Debug for CudaDeviceQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDeviceQueue")
            .field("grid", &self.grid)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_tag_differs_from_zeroed_memory_and_from_the_lap_before() {
        let slots = SLOTS as u64;
        for t in [
            1,
            slots - 1,
            slots,
            slots + 1,
            5 * slots + 7,
            (1 << 15) * slots,
            u64::MAX,
        ] {
            let tag = slot_tag(t);
            assert_ne!(tag, 0, "ticket {t}");
            assert!(tag < 1 << 16, "ticket {t}: the tag fits its 16 bits");
            // The slot's previous contents were written for ticket t - SLOTS.
            if let Some(before) = t.checked_sub(slots).filter(|&b| b > 0) {
                assert_ne!(tag, slot_tag(before), "ticket {t}");
            }
        }
        // Within one lap, every ticket of a slot's lap has the same tag.
        assert_eq!(slot_tag(3 * slots), slot_tag(4 * slots - 1));
    }

    #[test]
    fn a_dependency_distance_is_kept_only_within_the_ring() {
        let slots = SLOTS as u64;
        assert_eq!(distance(10, 0), 0, "no dependency");
        assert_eq!(distance(10, 9), 1);
        assert_eq!(distance(slots + 5, 6), slots - 1);
        // A whole ring back or more: completed before this op could be published.
        assert_eq!(distance(slots + 5, 5), 0);
        assert_eq!(distance(10 * slots, 1), 0);
        // The 12-bit field holds every distance kept.
        assert!(slots - 1 < 1 << 12);
    }

    fn op(after: [u64; 2]) -> SlotOp {
        SlotOp {
            ptr: 0x7f00_0000_1000,
            n: 65536,
            iters: 10,
            after,
            seen_done: [false, false],
            flags: 0,
        }
    }

    #[test]
    fn a_dependency_seen_done_before_the_ticket_is_not_pending() {
        let t = 3 * SLOTS as u64 + 5;
        assert_eq!(pending_field(t, t - 2, false), 2);
        assert_eq!(pending_field(t, t - 2, true), 0);
        // No dependency, or one a whole ring back: nothing pending either way.
        assert_eq!(pending_field(t, 0, false), 0);
        assert_eq!(pending_field(t, t - SLOTS as u64, false), 0);
    }

    #[test]
    fn slot_words_carry_the_tag_fields_and_distances() {
        let t = 5 * SLOTS as u64 + 9;
        let w = slot_words(t, &op([t - 1, t - 3]), [1, 3], false, false);
        for word in w {
            assert_eq!(word >> TAG_SHIFT, slot_tag(t));
        }
        assert_eq!(w[0] & ADDRESS_MASK, 0x7f00_0000_1000);
        assert_eq!(w[1] as u32, 65536);
        assert_eq!((w[1] >> 32) & 0xffff, 10);
        assert_eq!(w[2] & 0xfff, 1);
        assert_eq!((w[2] >> 12) & 0xfff, 3);
        assert_eq!((w[2] >> 24) & 0xff, 0);
        let nop = slot_words(t, &op([0, 0]), [0, 0], true, true);
        assert_eq!((nop[2] >> 24) & 0xff, u64::from(FLAG_NOP));
    }

    #[test]
    fn only_an_op_whose_one_pending_dependency_is_its_buffers_previous_op_is_flagged_to_chain() {
        let t = 3 * SLOTS as u64;
        let flags = |pending: [u64; 2], nop: bool, chain: bool| {
            let w = slot_words(t, &op([t - 2, t - 2]), pending, nop, chain);
            ((w[2] >> 24) & 0xff) as u32
        };
        // The buffer's previous op pending, the stream's done or the same op: chained.
        assert_eq!(flags([0, 2], false, true), FLAG_CHAIN);
        assert_eq!(flags([2, 2], false, true), FLAG_CHAIN);
        // Off, nothing pending on the buffer, another op of the stream pending, a no-op: not.
        assert_eq!(flags([0, 2], false, false), 0);
        assert_eq!(flags([0, 0], false, true), 0);
        assert_eq!(flags([1, 2], false, true), 0);
        assert_eq!(flags([2, 0], false, true), 0);
        assert_eq!(flags([0, 2], true, true), FLAG_NOP);
    }

    /// `#define NAME value` of the kernel's source, as a number.
    fn kernel_define(name: &str) -> u64 {
        let source = include_str!("queue_kernel.cu");
        let line = source
            .lines()
            .find(|l| l.starts_with(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("#define {name} in queue_kernel.cu"));
        let value = line.split_whitespace().nth(2).expect("a value");
        let value = value.trim_end_matches("ull").trim_end_matches('u');
        match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => value.parse(),
        }
        .unwrap_or_else(|e| panic!("#define {name}: {value}: {e}"))
    }

    #[test]
    fn the_kernels_constants_match_the_host() {
        assert_eq!(kernel_define("QUEUE_SLOTS"), SLOTS as u64);
        assert_eq!(kernel_define("CHUNK_RING"), CHUNK_RING as u64);
        assert_eq!(kernel_define("MAX_OP_CHUNKS"), MAX_OP_CHUNKS as u64);
        assert_eq!(kernel_define("TAG_SHIFT"), u64::from(TAG_SHIFT));
        assert_eq!(kernel_define("FLAG_STOP"), u64::from(FLAG_STOP));
        assert_eq!(kernel_define("FLAG_NOP"), u64::from(FLAG_NOP));
        assert_eq!(kernel_define("FLAG_CHAIN"), u64::from(FLAG_CHAIN));
        assert_eq!(kernel_define("QUEUE_TILE"), u64::from(CHUNK_THREADS));
        // A count word counts an op's chunks in its low 16 bits.
        assert_eq!(kernel_define("COUNT_CHUNKS"), 0xffff);
    }

    /// The fields of the kernel's `QueueParams`, in order, with their C offsets (each
    /// `unsigned long long` or pointer 8 bytes, `unsigned int` 4, naturally aligned; any other
    /// type fails the test).
    fn kernel_params() -> Vec<(String, usize)> {
        let source = include_str!("queue_kernel.cu");
        let start = source
            .find("struct QueueParams {")
            .expect("struct QueueParams");
        let body = &source[start..];
        let body = &body[body.find('{').unwrap() + 1..body.find("};").unwrap()];
        let mut fields = Vec::new();
        let mut offset = 0usize;
        for decl in body.lines().map(|l| l.split("//").next().unwrap()) {
            for decl in decl.split(';').map(str::trim).filter(|d| !d.is_empty()) {
                // Pointers (each name starred) are 8 bytes; otherwise the two integer types
                // the struct uses, and nothing else (a new type needs a size here).
                let (size, names) = if let Some((_, names)) = decl.split_once('*') {
                    (8, names)
                } else if let Some(names) = decl.strip_prefix("unsigned long long ") {
                    (8, names)
                } else if let Some(names) = decl.strip_prefix("unsigned int ") {
                    (4, names)
                } else {
                    panic!("QueueParams: a field type this test does not size: {decl}");
                };
                for name in names.split(',') {
                    let name = name.trim().trim_start_matches('*');
                    offset = offset.next_multiple_of(size);
                    fields.push((name.to_string(), offset));
                    offset += size;
                }
            }
        }
        fields
    }

    #[test]
    fn the_kernel_parameter_matches_the_kernel_layout() {
        macro_rules! fields {
            ($($f:ident),*) => { vec![$((stringify!($f).to_string(), std::mem::offset_of!(QueueParams, $f))),*] };
        }
        let host = fields!(
            ring,
            host_done,
            host_exit,
            dring,
            count,
            dev_done,
            chunks,
            ctr,
            start,
            epoch,
            idle_ns,
            slots,
            chunk_tiles,
            trace,
            trace_from,
            host_chained,
            chained_start,
            chain_tiles,
            chain_early,
            yield_word,
            yield_base,
            min_run_ns,
            slice_ns
        );
        assert_eq!(kernel_params(), host);
        // The last field ends where the struct does (no field left out at the end).
        let (last, at) = kernel_params().last().cloned().expect("fields");
        assert_eq!(last, "slice_ns");
        assert_eq!(std::mem::size_of::<QueueParams>(), at + 8);
    }

    #[test]
    fn results_record_the_chain_settings_only_where_ops_chain_and_always_the_yield() {
        let mut s = QueueSettings {
            chunk_tiles: 2,
            chain: false,
            chain_tiles: 4,
            chain_early: true,
            yield_device: true,
            slice: QUEUE_SLICE,
            while_running: false,
        };
        let keys = |s: &QueueSettings| {
            s.describe()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(&s),
            [
                "queue_chain=off",
                "queue_chunk_tiles=2",
                "queue_yield=on",
                "queue_slice_ms=50",
                "queue_while_running=off"
            ]
        );
        s.chain = true;
        s.yield_device = false;
        s.slice = Duration::ZERO;
        s.while_running = true;
        assert_eq!(
            keys(&s),
            [
                "queue_chain=on",
                "queue_chunk_tiles=2",
                "queue_chain_tiles=4",
                "queue_chain_early=on",
                "queue_yield=off",
                "queue_slice_ms=0",
                "queue_while_running=on"
            ]
        );
    }

    #[test]
    fn the_host_region_matches_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<HostSlot>(), 64);
        assert_eq!(std::mem::size_of::<DoneWord>(), 64);
        assert_eq!(std::mem::offset_of!(HostRegion, done), SLOTS * 64);
        // The statistic the kernel writes shares no line with the exit record.
        assert_eq!(std::mem::offset_of!(HostRegion, chained) % 64, 0);
        assert!(
            std::mem::offset_of!(HostRegion, chained)
                >= std::mem::offset_of!(HostRegion, exit) + 16
        );
        assert_eq!(DEV_ZEROED.end, DEV_BYTES);
        assert_eq!(DEV_ZEROED.start % 8, 0);
    }
}
