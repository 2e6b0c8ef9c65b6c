//! The device queue's chunk ring (`backend/cuda/queue_kernel.cu`), stated in Rust so its
//! protocol can be model-checked: loom cannot run CUDA, so this file mirrors the kernel's
//! word encoding and its orderings step by step, and the models below check them.
//!
//! The ring: one 64-bit word per chunk number `g` (modulo the ring's size), zeroed at launch.
//! - **Forward** (the dispatcher, one producer). An op's fields go to its slot first, then one
//!   fence, then one word per chunk: `lap tag | slot | chunk index` ([`chunk_word`]). The tag
//!   is `g`'s lap around the ring, never 0 (zeroed memory) and different from the lap before,
//!   so a word carrying `g`'s tag was written for `g`.
//! - **Claim** (a compute block, many consumers). Take the next chunk number (one atomic add),
//!   then wait on that chunk's own word (acquire) until it carries the number's tag: the fields
//!   written before the fence are then visible. Run the chunk, fence, count it on its op; the
//!   block whose count completes the op marks it done (after a fence).
//! - **Leave.** The dispatcher appends one exit word ([`CHUNK_EXIT`]) per compute block after
//!   every op's chunks. A block returns at its first exit word and claims nothing after it,
//!   so the blocks take exactly one exit word each and every op's chunk is claimed first.
//!
//! Invariants the models check: every chunk runs exactly once, with its op's fields visible;
//! every op is marked done exactly once, when its last chunk finished, and whoever sees it
//! done (acquire) sees every chunk's writes; every block leaves exactly once and only after all
//! chunks were claimed.
//!
//! Not modelled: dependencies between ops (the blocks' `wait_done`), a slot reused by a later
//! op, no-ops (completed by the dispatcher), the stop op cutting a round short, the zeroing at
//! launch, and reusing a word a lap later. That last one needs no protocol of its own: the
//! ring is sized so it cannot happen. While the block that claimed chunk `g` has not read its
//! word, `g`'s op X has not completed, so the host has not published op X + SLOTS (a slot is
//! reused only after its op completed: `op_ring`). Every word written after `g` is then a chunk
//! of ops X .. X + SLOTS - 1 (at most `MAX_OP_CHUNKS` each) or one of a single set of exit
//! words, fewer than the ring holds (`backend/cuda/queue.rs` asserts the sizes at compile
//! time). Until 2026-12-04 the ring held 65,536 words, fewer than that bound, and only timing
//! (a block reads its word within a memory round trip of claiming it) kept a word alive.

/// Bit of a chunk word where its lap tag starts (the kernel's `TAG_SHIFT`).
pub const TAG_SHIFT: u32 = 48;
/// The chunk index of an exit word (the kernel's `CHUNK_EXIT`).
pub const CHUNK_EXIT: u32 = u32::MAX;

/// The lap tag of chunk number `g` on a ring of `ring` words (the kernel's, for
/// `CHUNK_RING`): never 0, and different for consecutive laps.
pub fn lap_tag(g: u64, ring: u64) -> u64 {
    0x8000 | ((g / ring) & 0x7fff)
}

/// The word of chunk `g`: its lap tag, its op's slot, its index within the op.
pub fn chunk_word(g: u64, ring: u64, slot: u16, k: u32) -> u64 {
    lap_tag(g, ring) << TAG_SHIFT | u64::from(slot) << 32 | u64::from(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_word_names_its_lap_slot_and_index_and_never_reads_as_zeroed_memory() {
        let ring = 65536;
        for g in [0, 1, ring - 1, ring, 3 * ring + 5, (1 << 15) * ring] {
            let w = chunk_word(g, ring, 1023, 17);
            assert_ne!(w >> TAG_SHIFT, 0, "chunk {g}");
            assert_eq!(w >> TAG_SHIFT, lap_tag(g, ring));
            assert_eq!((w >> 32) & 0xffff, 1023);
            assert_eq!(w as u32, 17);
            if g >= ring {
                assert_ne!(lap_tag(g, ring), lap_tag(g - ring, ring), "chunk {g}");
            }
        }
        assert_eq!(chunk_word(5, ring, 0, CHUNK_EXIT) as u32, CHUNK_EXIT);
    }
}

/// The protocol run by host threads (one dispatcher, several blocks), for the models.
#[cfg(test)]
mod model {
    use super::{chunk_word, lap_tag, CHUNK_EXIT, TAG_SHIFT};
    use crate::sync::{AtomicU64, Condvar, Mutex, Ordering};
    #[cfg(loom)]
    use loom::sync::atomic::fence;
    #[cfg(not(loom))]
    use std::sync::atomic::fence;

    /// One op as the dispatcher forwards it: its slot, number and chunk count.
    #[derive(Clone, Copy)]
    pub(super) struct Op {
        pub slot: u16,
        pub number: u64,
        pub chunks: u32,
    }

    pub(super) struct Ring {
        size: u64,
        words: Vec<AtomicU64>,
        /// Per slot: the op's fields (number | chunks << 48), written before its words.
        fields: Vec<AtomicU64>,
        /// Per slot: chunks finished, and the op number marked done.
        count: Vec<AtomicU64>,
        done: Vec<AtomicU64>,
        /// Per chunk number: times it ran, and the chunk's "data" (the model's checks).
        ran: Vec<AtomicU64>,
        data: Vec<AtomicU64>,
        claimed: AtomicU64,
        finished: AtomicU64,
        /// Words written and ops done so far, for threads that found what they wait for not
        /// there yet to sleep on (a spinning thread would make a model explode). The lock is
        /// taken only after a load found nothing, so in every schedule where a thread finds it
        /// at once, the word's own ordering is all it has.
        written: Mutex<u64>,
        changed: Condvar,
    }

    fn zeroed(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    impl Ring {
        /// A ring of `size` words for ops in `slots` slots; `chunks` bounds the chunk numbers
        /// the model uses (no word is reused a lap later: see the module doc).
        pub(super) fn new(size: u64, slots: usize, chunks: usize) -> Ring {
            assert!(chunks as u64 <= size, "the models do not reuse words");
            Ring {
                size,
                words: zeroed(size as usize),
                fields: zeroed(slots),
                // What the slots' previous ops left: their chunk counts.
                count: (0..slots).map(|_| AtomicU64::new(3)).collect(),
                done: zeroed(slots),
                ran: zeroed(chunks),
                data: zeroed(chunks),
                claimed: AtomicU64::new(0),
                finished: AtomicU64::new(0),
                written: Mutex::new(0),
                changed: Condvar::new(),
            }
        }

        /// The dispatcher: forwards `ops` in order, then one exit word per block.
        pub(super) fn dispatch(&self, ops: &[Op], blocks: u64) {
            let mut forwarded = 0u64;
            for op in ops {
                let slot = usize::from(op.slot);
                self.fields[slot].store(op.number | u64::from(op.chunks) << 48, Ordering::Relaxed);
                // The slot's count word reset for this op (the slot's previous op left it at
                // its chunk count).
                self.count[slot].store(0, Ordering::Relaxed);
                // The kernel's __threadfence between an op's fields and its chunk words.
                fence(Ordering::Release);
                for c in 0..op.chunks {
                    let g = forwarded + u64::from(c);
                    self.words[(g % self.size) as usize]
                        .store(chunk_word(g, self.size, op.slot, c), Ordering::Relaxed);
                }
                forwarded += u64::from(op.chunks);
                self.announce();
            }
            for b in 0..blocks {
                let g = forwarded + b;
                self.words[(g % self.size) as usize]
                    .store(chunk_word(g, self.size, 0, CHUNK_EXIT), Ordering::Relaxed);
            }
            self.announce();
        }

        /// Wakes the threads waiting (the kernel's blocks and the host simply keep loading).
        fn announce(&self) {
            *self.written.lock() += 1;
            self.changed.notify_all();
        }

        /// Sleeps until the next announcement unless `ready` (checked under the lock, so an
        /// announcement cannot slip in between).
        fn sleep_unless(&self, ready: impl Fn() -> bool) {
            let mut w = self.written.lock();
            if ready() {
                return;
            }
            let seen = *w;
            while *w == seen {
                w = self.changed.wait(w);
            }
        }

        /// The host: waits until `op` is done (acquire, as the host's load of the done word),
        /// then finds every one of its chunks' writes.
        pub(super) fn wait_done(&self, op: &Op, first_chunk: u64) {
            let slot = usize::from(op.slot);
            while self.done[slot].load(Ordering::Acquire) != op.number {
                self.sleep_unless(|| self.done[slot].load(Ordering::Relaxed) == op.number);
            }
            for c in first_chunk..first_chunk + u64::from(op.chunks) {
                assert_eq!(
                    self.data[c as usize].load(Ordering::Relaxed),
                    op.number,
                    "op {}: chunk {c}'s writes visible once it is seen done",
                    op.number
                );
            }
        }

        /// A compute block: claims and runs chunks until its exit word; returns the chunks it
        /// ran.
        pub(super) fn block(&self) -> u64 {
            let mut ran = 0;
            loop {
                let g = self.claimed.fetch_add(1, Ordering::Relaxed);
                let word = &self.words[(g % self.size) as usize];
                let tag = lap_tag(g, self.size);
                let e = loop {
                    let e = word.load(Ordering::Acquire);
                    if e >> TAG_SHIFT == tag {
                        break e;
                    }
                    self.sleep_unless(|| word.load(Ordering::Relaxed) >> TAG_SHIFT == tag);
                };
                let k = e as u32;
                if k == CHUNK_EXIT {
                    return ran;
                }
                let slot = ((e >> 32) & 0xffff) as usize;
                let fields = self.fields[slot].load(Ordering::Relaxed);
                assert_ne!(fields, 0, "chunk {g}: its op's fields are visible");
                let (number, chunks) = (fields & ((1 << 48) - 1), fields >> 48);
                assert!(u64::from(k) < chunks, "chunk {g}: index {k} of {chunks}");
                self.ran[g as usize].fetch_add(1, Ordering::Relaxed);
                self.data[g as usize].store(number, Ordering::Relaxed);
                ran += 1;
                // The block's writes before its count (the kernel's __threadfence), the count
                // a relaxed atomic add as the kernel's atomicAdd.
                fence(Ordering::Release);
                if self.count[slot].fetch_add(1, Ordering::Relaxed) + 1 == chunks {
                    // The kernel's __threadfence_system before the done words: every chunk's
                    // writes are visible to whoever sees the op done.
                    fence(Ordering::SeqCst);
                    let first = g - u64::from(k);
                    for c in first..first + chunks {
                        assert_eq!(self.data[c as usize].load(Ordering::Relaxed), number);
                    }
                    let before = self.done[slot].swap(number, Ordering::Relaxed);
                    assert_ne!(before, number, "op {number} marked done twice");
                    self.announce();
                }
                self.finished.fetch_add(1, Ordering::Relaxed);
            }
        }

        /// The checks once every thread returned.
        pub(super) fn check(&self, ops: &[Op], blocks: u64, ran_by_blocks: u64) {
            let chunks: u64 = ops.iter().map(|o| u64::from(o.chunks)).sum();
            for g in 0..chunks as usize {
                assert_eq!(self.ran[g].load(Ordering::Relaxed), 1, "chunk {g} ran once");
            }
            assert_eq!(ran_by_blocks, chunks);
            assert_eq!(self.finished.load(Ordering::Relaxed), chunks);
            // Each block took exactly one exit word, after every chunk.
            assert_eq!(self.claimed.load(Ordering::Relaxed), chunks + blocks);
            for op in ops {
                let slot = usize::from(op.slot);
                assert_eq!(self.done[slot].load(Ordering::Relaxed), op.number);
                assert_eq!(
                    self.count[slot].load(Ordering::Relaxed),
                    u64::from(op.chunks),
                    "op {}: every chunk counted once",
                    op.number
                );
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod thread_tests {
    use super::model::{Op, Ring};
    use std::sync::Arc;

    #[test]
    fn many_blocks_run_every_chunk_once_and_each_leaves_once() {
        let blocks = 8u64;
        let ops: Vec<Op> = (1..=40u16)
            .map(|i| Op {
                slot: i,
                number: u64::from(i),
                chunks: u32::from(i % 5) + 1,
            })
            .collect();
        let total: usize = ops.iter().map(|o| o.chunks as usize).sum();
        let ring = Arc::new(Ring::new(
            (total as u64 + blocks).next_power_of_two(),
            64,
            total,
        ));
        let workers: Vec<_> = (0..blocks)
            .map(|_| {
                let ring = ring.clone();
                std::thread::spawn(move || ring.block())
            })
            .collect();
        ring.dispatch(&ops, blocks);
        let mut first = 0;
        for op in &ops {
            ring.wait_done(op, first);
            first += u64::from(op.chunks);
        }
        let ran: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        ring.check(&ops, blocks, ran);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::model::{Op, Ring};
    use loom::sync::Arc;

    /// One dispatcher and two blocks; `ops`, then the exit words.
    fn run(ops: &'static [Op], preemptions: usize) {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(preemptions);
        model.check(move || {
            let blocks = 2u64;
            let chunks: usize = ops.iter().map(|o| o.chunks as usize).sum();
            let ring = Arc::new(Ring::new(8, 4, chunks));
            let workers: Vec<_> = (0..blocks)
                .map(|_| {
                    let ring = ring.clone();
                    loom::thread::spawn(move || ring.block())
                })
                .collect();
            ring.dispatch(ops, blocks);
            let mut first = 0;
            for op in ops {
                ring.wait_done(op, first);
                first += u64::from(op.chunks);
            }
            let ran: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
            ring.check(ops, blocks, ran);
        });
    }

    /// An op split over both blocks: each chunk runs once with the op's fields visible, the
    /// op is done once with both chunks' writes visible, each block leaves once after both
    /// chunks were claimed.
    #[test]
    fn an_op_over_two_blocks_is_done_once_and_both_blocks_leave() {
        static OPS: [Op; 1] = [Op {
            slot: 1,
            number: 7,
            chunks: 2,
        }];
        run(&OPS, 2);
    }

    /// Two ops of one chunk each, forwarded one after the other while the blocks claim.
    #[test]
    fn two_ops_forwarded_in_turn_each_run_once() {
        static OPS: [Op; 2] = [
            Op {
                slot: 1,
                number: 7,
                chunks: 1,
            },
            Op {
                slot: 2,
                number: 8,
                chunks: 1,
            },
        ];
        run(&OPS, 2);
    }
}
