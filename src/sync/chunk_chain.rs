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
//!
//! Invariants the models check:
//! - Every chunk of every op runs exactly once, on the values the op before it left there:
//!   chained, fallen back, or mixed.
//! - Every op is marked done exactly once.
//! - Whoever sees the last op done (acquire) sees every op's writes.
//! - A count word left over from the slot's previous op, parked successor included, is never
//!   taken for the new op's.
//!
//! Not modelled: the chunk ring that hands out the first op's chunks (`chunk_ring.rs` models
//! it); the dispatcher's lanes (its chain table, the pointer jumping over one round's lanes,
//! the layout a chained op takes, the guard against a predecessor's slot being reused in the
//! same round, no-ops, the stop op, relaunch), which are the kernel's alone; distances other
//! than 1.
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

/// The count word of an op with a successor parked on it, before any chunk was counted (the
/// kernel's): the successor comes `distance` op numbers later (1..4,095) and runs `iters`
/// iterations (below 65,536).
pub fn parked_word(distance: u64, iters: u32) -> u64 {
    debug_assert!((1..1 << 12).contains(&distance) && iters < 1 << 16);
    COUNT_PARKED | distance << 48 | u64::from(iters) << 32
}

/// The successor a count word names, if one is parked on it: (distance, iterations).
pub fn parked_successor(word: u64) -> Option<(u64, u32)> {
    (word & COUNT_PARKED != 0).then_some(((word >> 48) & 0xfff, ((word >> 32) & 0xffff) as u32))
}

/// The chunks a count word has counted.
pub fn counted(word: u64) -> u32 {
    word as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parked_word_names_its_successor_and_counts_on_without_touching_it() {
        let w = parked_word(1023, 65535);
        assert_eq!(parked_successor(w), Some((1023, 65535)));
        assert_eq!(counted(w), 0);
        // Counting chunks (the kernel's atomicAdd of 1) leaves the successor as it was.
        let w = w + 263;
        assert_eq!(counted(w), 263);
        assert_eq!(parked_successor(w), Some((1023, 65535)));
        assert_eq!(parked_successor(263), None);
        assert_eq!(parked_successor(0), None);
    }
}

/// The protocol run by host threads (a dispatcher that also claims fallen-back ops, and
/// blocks), for the models.
#[cfg(test)]
mod model {
    use super::{counted, parked_successor, parked_word};
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
    pub(super) fn play(ops: usize, chunks: u32) {
        let chain = Arc::new(Chain::new(ops, chunks));
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

    /// A count word as the slot's previous op left it: finished, with a successor parked.
    const STALE: u64 = 0x8001_0009_0000_0002;

    impl Chain {
        pub(super) fn new(ops: usize, chunks: u32) -> Chain {
            assert!((2..8).contains(&ops), "values hold 7 ops");
            let zeroed = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
            // Op 0 was forwarded (its word reset) before the blocks claimed its chunks; the
            // others' words still hold what their slots' previous ops left.
            let count = (0..ops)
                .map(|op| AtomicU64::new(if op == 0 { 0 } else { STALE }))
                .collect();
            Chain {
                ops,
                chunks,
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

        /// Runs chunk `k` of `op`, counts it, and follows the chain from there: the kernel's
        /// compute block from a claimed chunk on (`finish_and_next`).
        pub(super) fn run_from(&self, mut op: usize, k: u32) {
            loop {
                let chunk = &self.data[k as usize];
                let value = chunk.load(Ordering::Relaxed);
                assert_eq!(
                    value,
                    after(op),
                    "op {op} chunk {k}: the ops before it ran first"
                );
                chunk.store(apply(value, op), Ordering::Relaxed);
                self.ran[op * self.chunks as usize + k as usize].fetch_add(1, Ordering::Relaxed);
                // The kernel's __threadfence after a chunk (a fence.sc): releases its writes to
                // whoever completes the op, and acquires the park read by the last count.
                fence(Ordering::AcqRel);
                let old = self.count[op].fetch_add(1, Ordering::Relaxed);
                if counted(old) + 1 == self.chunks {
                    // complete(): a system-wide fence, then the done word.
                    fence(Ordering::SeqCst);
                    let before = self.done[op].swap(op as u64 + 1, Ordering::Relaxed);
                    assert_eq!(before, 0, "op {op} marked done twice");
                    self.announce();
                }
                match parked_successor(old) {
                    Some((distance, iters)) => {
                        assert_eq!(iters, 9, "the successor's iterations");
                        op += distance as usize;
                        assert!(op < self.ops, "a successor this chain has");
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
                    parked_word(1, 9),
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
        for round in 0..200u32 {
            super::model::play(2 + round as usize % 6, 1 + round % 4);
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    /// `ops` ops of two chunks; two blocks run op 0's chunks while the dispatcher parks the
    /// rest (or queues them and claims their chunks itself).
    fn run(ops: usize, preemptions: usize) {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(preemptions);
        model.check(move || super::model::play(ops, 2));
    }
    /// One successor, parked while op 0's two chunks run and count: it runs once per chunk,
    /// after op 0's chunk, whether the park came before both counts, between them (it fails:
    /// the successor is queued) or after them.
    #[test]
    fn a_successor_parked_while_its_predecessor_runs_runs_each_chunk_once() {
        run(2, 3);
    }

    /// Two successors parked in one round (the second on the first, whose word was just
    /// reset): chained, queued, or one of each.
    #[test]
    fn a_chain_of_two_successors_runs_in_order() {
        run(3, 2);
    }
}
