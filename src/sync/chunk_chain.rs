//! The device queue's chaining hand-off (`backend/cuda/queue_kernel.cu`, "Chaining"), stated in
//! Rust so it can be model-checked: loom cannot run CUDA, so this file mirrors the kernel's
//! count word and its orderings step by step, and the models below check them.
//!
//! Each op has a count word (one per slot). Forwarding an op resets its word to 0.
//! - **Count.** A block that ran chunk `k` of op `A` fences, then adds 1 to `A`'s word. The
//!   add that brings it to `A`'s chunk count completes `A`: a fence, then the done word.
//! - **Park** (the dispatcher). `B` follows `A` on the same buffer and the same elements, and
//!   is the only dependency of `B` still pending. The dispatcher resets `B`'s word, fences,
//!   then tries one compare-and-swap of `A`'s word from 0 to "successor `B`" ([`parked_word`]:
//!   how far after `A` it is, and its iterations). That swap succeeds only while no chunk of
//!   `A` has been counted.
//! - **Follow.** The add that counts chunk `k` of `A` also returns the word, so a block that
//!   finds a successor in it runs chunk `k` of `B` next, on the elements it just wrote, then
//!   counts that chunk on `B`'s word, and so on down the chain. A failed swap means at least one
//!   chunk of `A` was counted without seeing `B`; `B` is then queued as usual, and its chunks
//!   wait until `A` is done.
//! - **Early start** (the kernel's `chain_early`). Before its fence, a block also *peeks* at
//!   `A`'s word (a relaxed load, unordered with anything before it). If the word is a park
//!   of `A`'s own lap ([`peeked_successor`]), the block runs chunk `k` of `B` before counting
//!   chunk `k` of `A` (on the GPU the other threads run it while thread 0 counts). A word the
//!   slot's previous op left carries another lap and is ignored; the count's add then decides
//!   as above. A park is never undone while `A` is incomplete, and `A` cannot complete before
//!   this block counts, so the add finds the successor the peek found.
//!
//! Invariants the models check:
//! - Every chunk of every op runs exactly once, on the values the op before it left there:
//!   chained, fallen back, or mixed.
//! - Every op is marked done exactly once.
//! - Whoever sees the last op done (acquire) sees every op's writes.
//! - A count word left over from the slot's previous op, parked successor included, is never
//!   taken for the new op's, by the count or by a peek.
//! - A successor found by a peek is the one the count finds.
//!
//! Not modelled: the chunk ring that hands out the first op's chunks (`chunk_ring.rs` models
//! it); the dispatcher's lanes (its chain table, the pointer jumping over one round's lanes,
//! the layout a chained op takes, the guard against a predecessor's slot being reused in the
//! same round, no-ops, the stop op, relaunch), which are the kernel's alone; distances other
//! than 1; inside a block, the barrier after a chunk and the entry through which thread 0
//! tells the other threads what it peeked (one per parity of the block's chunks, so thread 0
//! never rewrites an entry before every thread read it).
//!
//! What the models cannot show: that the two fences around a park are needed. In loom a
//! read-modify-write reads the latest store in the order the model ran them, so the
//! dispatcher's reset, which runs before its park, is always ordered before a block's add
//! that read the park, fences or not (removing the dispatcher's fence, or weakening the
//! block's to release, still passes). On the GPU the reset is ordered before that add only by
//! the dispatcher's `__syncwarp` and `__threadfence` before the park and the block's
//! `__threadfence` after running the chunk; the kernel's comments say so where they are.

/// Bit of a count word that says an op is parked on it (the kernel's `COUNT_PARKED`).
pub const COUNT_PARKED: u64 = 1 << 63;

/// Bits of a count word that count chunks (the kernel's `COUNT_CHUNKS`; an op has at most
/// `MAX_OP_CHUNKS`, 480).
const COUNT_CHUNKS: u64 = 0xffff;

/// The lap of op number `op` as a park on it records it (the kernel's `COUNT_LAP`): which
/// time round the ring of `slots` slots it is, modulo 65,536.
pub fn lap(op: u64, slots: u64) -> u32 {
    ((op / slots) & 0xffff) as u32
}

/// The count word of an op of lap `lap` with a successor parked on it, before any chunk was
/// counted (the kernel's): the successor comes `distance` op numbers later (1..4,095) and runs
/// `iters` iterations (below 65,536).
pub fn parked_word(distance: u64, iters: u32, lap: u32) -> u64 {
    debug_assert!((1..1 << 12).contains(&distance) && iters < 1 << 16 && lap < 1 << 16);
    COUNT_PARKED | distance << 48 | u64::from(iters) << 32 | u64::from(lap) << 16
}

/// The successor a count word names, if one is parked on it: (distance, iterations). For the
/// count's add, which is ordered after the op's reset (so the word is this op's).
pub fn parked_successor(word: u64) -> Option<(u64, u32)> {
    (word & COUNT_PARKED != 0).then_some(((word >> 48) & 0xfff, ((word >> 32) & 0xffff) as u32))
}

/// The successor a peeked count word names for an op of lap `lap`, if it is a park of that op
/// (the kernel's `peeked_link`): a peek is not ordered after the op's reset, so it may read
/// what the slot's previous op left, which carries another lap.
pub fn peeked_successor(word: u64, lap: u32) -> Option<(u64, u32)> {
    let mine = COUNT_PARKED | u64::from(lap) << 16;
    if word & (COUNT_PARKED | 0xffff << 16) == mine {
        parked_successor(word)
    } else {
        None
    }
}

/// The chunks a count word has counted.
pub fn counted(word: u64) -> u32 {
    (word & COUNT_CHUNKS) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_word_names_its_successor_and_counts_on_without_touching_it() {
        let w = parked_word(1023, 65535, 0xffff);
        assert_eq!(parked_successor(w), Some((1023, 65535)));
        assert_eq!(counted(w), 0);
        // Counting chunks (the kernel's atomicAdd of 1) leaves the successor as it was, up to
        // the most chunks an op has.
        let w = w + 480;
        assert_eq!(counted(w), 480);
        assert_eq!(parked_successor(w), Some((1023, 65535)));
        assert_eq!(peeked_successor(w, 0xffff), Some((1023, 65535)));
        assert_eq!(parked_successor(263), None);
        assert_eq!(parked_successor(0), None);
    }

    #[test]
    fn a_peek_takes_only_a_park_of_its_own_ops_lap() {
        let slots = 1024;
        let (op, before) = (5 * slots + 7, 4 * slots + 7);
        assert_eq!(lap(op, slots), lap(before, slots) + 1);
        // The slot's previous op's park, counted or not, is not this op's.
        let stale = parked_word(1, 9, lap(before, slots));
        assert_eq!(peeked_successor(stale, lap(op, slots)), None);
        assert_eq!(peeked_successor(stale + 3, lap(op, slots)), None);
        assert_eq!(peeked_successor(stale, lap(before, slots)), Some((1, 9)));
        // Nothing parked: a count, or a reset word.
        assert_eq!(peeked_successor(3, lap(op, slots)), None);
        assert_eq!(peeked_successor(0, 0), None);
        // Laps wrap at 65,536 (a peek is never that far behind).
        assert_eq!(lap(65_536 * slots + 1, slots), 0);
        let w = parked_word(2, 10, lap(op, slots)) + 1;
        assert_eq!(peeked_successor(w, lap(op, slots)), Some((2, 10)));
    }
}

/// The protocol run by host threads (a dispatcher that also claims fallen-back ops, and
/// blocks), for the models.
#[cfg(test)]
mod model {
    use super::{counted, parked_successor, parked_word, peeked_successor};
    use crate::sync::{AtomicU64, Condvar, Mutex, Ordering};
    #[cfg(loom)]
    use loom::sync::atomic::fence;
    #[cfg(not(loom))]
    use std::sync::atomic::fence;

    #[cfg(loom)]
    use loom::{sync::Arc, thread};
    #[cfg(not(loom))]
    use std::{sync::Arc, thread};

    /// One run: a block per chunk runs op 0's chunk (and what is chained to it) while the
    /// dispatcher parks the other ops, then claims those it could not park; then the checks.
    /// `early`: blocks peek and start a parked successor early.
    pub(super) fn play(ops: usize, chunks: u32, early: bool) {
        let chain = Arc::new(Chain::new(ops, chunks, early));
        let blocks: Vec<_> = (0..chunks)
            .map(|k| {
                let chain = chain.clone();
                thread::spawn(move || chain.run_from(0, k))
            })
            .collect();
        chain.dispatch();
        chain.claim_queued();
        for b in blocks {
            b.join().unwrap();
        }
        chain.check();
    }

    /// What op `op` does to a value: appends its own mark, so a value records which ops ran
    /// on it, in which order.
    fn apply(value: u64, op: usize) -> u64 {
        value * 8 + op as u64 + 1
    }

    /// The value a chunk holds once ops `0..ops` ran on it in order.
    pub(super) fn after(ops: usize) -> u64 {
        (0..ops).fold(0, apply)
    }

    /// Ops `0..ops`, each following the one before on the same buffer, of `chunks` chunks each.
    /// Op 0 is queued (its chunks go to the blocks); the dispatcher forwards the others.
    pub(super) struct Chain {
        ops: usize,
        chunks: u32,
        early: bool,
        /// Per op: its count word, its done word (1 + op once done).
        count: Vec<AtomicU64>,
        done: Vec<AtomicU64>,
        /// Per op and chunk: times it ran. Per chunk: the buffer's value.
        ran: Vec<AtomicU64>,
        data: Vec<AtomicU64>,
        /// Ops the dispatcher could not park, in order (it claims their chunks itself).
        queued: Mutex<Vec<usize>>,
        /// Done words written so far, for waiting threads to sleep on (a spinning thread would
        /// make a model explode). The lock is taken only after a load found nothing.
        written: Mutex<u64>,
        changed: Condvar,
    }

    /// The lap of the model's ops (each in a slot of its own).
    const LAP: u32 = 1;

    /// A count word as the slot's previous op left it (the lap before): two chunks counted,
    /// with a successor parked (iterations 7: the model's parks have 9).
    fn stale() -> u64 {
        parked_word(1, 7, LAP - 1) + 2
    }

    impl Chain {
        pub(super) fn new(ops: usize, chunks: u32, early: bool) -> Chain {
            assert!((2..8).contains(&ops), "values hold 7 ops");
            let zeroed = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
            // Op 0 was forwarded (its word reset) before the blocks claimed its chunks; the
            // others' words still hold what their slots' previous ops left.
            let count = (0..ops)
                .map(|op| AtomicU64::new(if op == 0 { 0 } else { stale() }))
                .collect();
            Chain {
                ops,
                chunks,
                early,
                count,
                done: zeroed(ops),
                ran: zeroed(ops * chunks as usize),
                data: zeroed(chunks as usize),
                queued: Mutex::new(Vec::new()),
                written: Mutex::new(0),
                changed: Condvar::new(),
            }
        }

        fn announce(&self) {
            *self.written.lock() += 1;
            self.changed.notify_all();
        }

        fn wait_done(&self, op: usize) {
            let want = op as u64 + 1;
            while self.done[op].load(Ordering::Acquire) != want {
                let mut w = self.written.lock();
                if self.done[op].load(Ordering::Relaxed) == want {
                    continue;
                }
                let seen = *w;
                while *w == seen {
                    w = self.changed.wait(w);
                }
            }
        }

        /// Runs chunk `k` of `op` on the values the ops before it left.
        fn run_chunk(&self, op: usize, k: u32) {
            let chunk = &self.data[k as usize];
            let value = chunk.load(Ordering::Relaxed);
            assert_eq!(
                value,
                after(op),
                "op {op} chunk {k}: the ops before it ran first"
            );
            chunk.store(apply(value, op), Ordering::Relaxed);
            self.ran[op * self.chunks as usize + k as usize].fetch_add(1, Ordering::Relaxed);
        }

        /// The op a park on `op` names.
        fn successor(&self, op: usize, (distance, iters): (u64, u32)) -> usize {
            assert_eq!(iters, 9, "the successor's iterations");
            let next = op + distance as usize;
            assert!(next < self.ops, "a successor this chain has");
            next
        }

        /// Runs chunk `k` of `op`, counts it, and follows the chain from there: the kernel's
        /// compute block from a claimed chunk on (`queue_compute`, `finish_and_next`).
        pub(super) fn run_from(&self, mut op: usize, k: u32) {
            self.run_chunk(op, k);
            loop {
                // Thread 0's peek, before the fence (early start only).
                let peek = if self.early {
                    self.count[op].load(Ordering::Relaxed)
                } else {
                    0
                };
                // The kernel's __threadfence after a chunk (a fence.sc): releases its writes to
                // whoever completes the op, and acquires the park read by the last count.
                fence(Ordering::AcqRel);
                let early = peeked_successor(peek, LAP);
                if let Some(link) = early {
                    // Early start: the block runs the successor's chunk while thread 0 counts
                    // (here, before it: the weaker order).
                    self.run_chunk(self.successor(op, link), k);
                }
                let old = self.count[op].fetch_add(1, Ordering::Relaxed);
                if counted(old) + 1 == self.chunks {
                    // complete(): a system-wide fence, then the done word.
                    fence(Ordering::SeqCst);
                    let before = self.done[op].swap(op as u64 + 1, Ordering::Relaxed);
                    assert_eq!(before, 0, "op {op} marked done twice");
                    self.announce();
                }
                let link = parked_successor(old);
                if early.is_some() {
                    assert_eq!(link, early, "op {op}: the count finds the peeked successor");
                }
                match link {
                    Some(link) => {
                        let next = self.successor(op, link);
                        if early.is_none() {
                            self.run_chunk(next, k);
                        }
                        op = next;
                    }
                    None => return,
                }
            }
        }

        /// The dispatcher, in one round: resets every op's count word, one fence, then parks
        /// each op on the one before. Returns how many it parked.
        pub(super) fn dispatch(&self) -> usize {
            for op in 1..self.ops {
                self.count[op].store(0, Ordering::Relaxed);
            }
            // The kernel's __threadfence before the parks: the resets come first.
            fence(Ordering::Release);
            let mut parked = 0;
            for op in 1..self.ops {
                let park = self.count[op - 1].compare_exchange(
                    0,
                    parked_word(1, 9, LAP),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                match park {
                    Ok(_) => parked += 1,
                    Err(_) => self.queued.lock().push(op),
                }
            }
            parked
        }

        /// The blocks that claim the chunks of ops that could not be parked (here, the
        /// dispatcher's thread): each waits until the op before is done, then runs the chunk
        /// and what is chained to it.
        pub(super) fn claim_queued(&self) {
            let queued = std::mem::take(&mut *self.queued.lock());
            for op in queued {
                self.wait_done(op - 1);
                for k in 0..self.chunks {
                    self.run_from(op, k);
                }
            }
        }

        /// The host: waits until the last op is done, then checks everything.
        pub(super) fn check(&self) {
            self.wait_done(self.ops - 1);
            for (k, chunk) in self.data.iter().enumerate() {
                assert_eq!(
                    chunk.load(Ordering::Relaxed),
                    after(self.ops),
                    "chunk {k}: every op ran on it, in order, visible once the last is done"
                );
            }
            for (i, ran) in self.ran.iter().enumerate() {
                assert_eq!(
                    ran.load(Ordering::Relaxed),
                    1,
                    "op {} chunk {} ran once",
                    i / self.chunks as usize,
                    i % self.chunks as usize
                );
            }
            for (op, done) in self.done.iter().enumerate() {
                assert_eq!(done.load(Ordering::Relaxed), op as u64 + 1, "op {op} done");
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod thread_tests {
    #[test]
    fn a_chain_runs_every_chunk_once_in_order_however_the_parks_fall() {
        for round in 0..400u32 {
            super::model::play(2 + round as usize % 6, 1 + round % 4, round % 2 == 1);
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    /// `ops` ops of two chunks; two blocks run op 0's chunks while the dispatcher parks the
    /// rest (or queues them and claims their chunks itself). `early`: blocks peek and start a
    /// parked successor before counting.
    fn run(ops: usize, preemptions: usize, early: bool) {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(preemptions);
        model.check(move || super::model::play(ops, 2, early));
    }
    /// One successor, parked while op 0's two chunks run and count: it runs once per chunk,
    /// after op 0's chunk, whether the park came before both counts, between them (it fails:
    /// the successor is queued) or after them.
    #[test]
    fn a_successor_parked_while_its_predecessor_runs_runs_each_chunk_once() {
        run(2, 3, false);
    }

    /// Two successors parked in one round (the second on the first, whose word was just
    /// reset): chained, queued, or one of each.
    #[test]
    fn a_chain_of_two_successors_runs_in_order() {
        run(3, 2, false);
    }

    /// Early start: a peek that finds the park starts the successor before the count; one
    /// that finds nothing, or the word the slot's previous op left (op 1's, before its reset
    /// is visible to a block that reached op 1 through op 0's park), leaves it to the count.
    #[test]
    fn a_block_starts_only_a_successor_parked_on_its_own_op() {
        run(2, 3, true);
    }

    #[test]
    fn a_chain_of_two_successors_started_early_runs_in_order() {
        run(3, 2, true);
    }
}
