// multiq's device queue: one long-running kernel that runs ops published by host threads.
// Compiled by NVRTC together with kernels.rs's source (same options), so every element goes
// through exactly simple_compute's code and results are bit-identical to a single launch.
//
// Host side: src/backend/cuda/queue.rs. Memory:
// - ring[slots] (host memory mapped into the device, one 64-byte line per slot): written by
//   host threads; three words, each carrying the op's 16-bit tag (from its ticket) in bits
//   48..63, so one read of the three words over the bus both finds a published op and reads
//   it: the op is published once all three carry its tag.
// - host_done[slots] (host-mapped, one line each): the op number written once an op completed.
// - host_exit[3] (host-mapped): {ticket, epoch, why} written when a kernel leaves.
// - host_chained (host-mapped): how many ops were chained (statistics).
// - dring[slots], count[slots], dev_done[slots] (device memory): the dispatcher's copy of
//   each op, its count word (chunks finished, and the successor parked on it, if any), the op
//   number completed per slot.
// - chunks[CHUNK_RING] and ctr (device memory, zeroed before every launch): the chunk queue,
//   one word per chunk (tag of its lap | slot | chunk index), and its counters: chunks claimed
//   by blocks, chunks finished.
// Block 0's first warp is the dispatcher: it forwards published ops, in order, splitting each
// into at most min(gridDim.x - 1, MAX_OP_CHUNKS) chunks of whole 1,024-element tiles (one
// element per thread) and appending them to the chunk queue (the op's fields to dring first,
// a fence, then the chunk words). In every other block, thread 0 claims the next chunk index
// (one atomic add) and waits on that chunk's own word until it is written and the op's
// dependencies completed; the block runs it and counts it; the block finishing an op's last
// chunk marks the op complete. To leave, the dispatcher appends one exit chunk per compute
// block: each block claims exactly one of them (it stops claiming after it) and returns.
// Chunk g only ever waits for ops whose chunks come before g, all claimed by running blocks
// (the grid is sized so all its blocks are resident), and a block's earlier chunk never
// waits for its later one, so every op completes.
//
// Chaining (ops the host flags FLAG_CHAIN: the one dependency still pending is the previous
// op on the same buffer, over the same elements): such an op B may be *parked* on that
// predecessor A instead of getting chunk words. It takes A's chunk layout, and the dispatcher
// sets A's count word to "successor B" with one compare-and-swap that succeeds only while no
// chunk of A has finished. Every block then finishing chunk k of A finds B in the count word
// (the same atomic add that counts the chunk) and runs chunk k of B next, on the elements it
// just wrote: each element goes through A's iterations then B's, as if run one after the other,
// and the hand-off costs no memory round trip. B completes when its own chunks are counted
// (after A: its chunk that follows A's last one is counted after A's completion; with early
// start it may start before). A chained chunk
// waits for nothing, so the argument above still holds: a parked op runs on blocks that
// already hold chunks earlier in the queue. If the swap fails (a chunk of A already finished,
// A completed, or A has a successor), B is forwarded as usual and its blocks wait for A.
// src/sync/chunk_chain.rs models this hand-off.
//
// Early start (chain_early): thread 0 of a block peeks at the count word of the op it ran
// (one load, in flight together with the fence after the chunk) and, when a successor is
// parked there, the block starts the successor's chunk at once: every thread computes it
// while thread 0 counts the finished chunk (the atomic round trip and one barrier per link
// are off the block's critical path). Each thread runs the successor on the elements it wrote
// itself, so nothing but the peek is needed. A peek may only act on a park of this op: the
// park carries the op's lap (COUNT_LAP), and a word left by the slot's previous op has
// another. A park is never undone while the op is incomplete, and the op cannot complete
// before this block counts its chunk, so the count's add finds the same successor.
//
// Giving the device up: the grid fills every multiprocessor (all its blocks resident), so while
// it runs no other kernel of the device gets a block. The host raises a counter (yield_word)
// after every other kernel it launches on the device (and before launching another queue's
// kernel, so two busy queues take turns); the dispatcher reads it with each
// round's slots and, once it differs from yield_base and this kernel has run min_run_ns (so
// every launch makes progress), leaves as on an idle exit: the ops it forwarded complete
// first; the rest wait in the ring for the relaunch, which the host makes at its next
// publication or poll, queued after the kernels that asked. yield_base is the counter's value
// when the host launched this kernel, or one less when another kernel was launched shortly
// before (it may still wait behind work of its own stream, so this kernel leaves once again
// after min_run_ns). Anything the counter misses is covered by the slice: the kernel also
// leaves once it has run slice_ns.
#define QUEUE_TILE 1024u  // one element per thread of a block
// Chunk words: larger than the chunks of a whole host ring of ops plus one set of exit words
// (QUEUE_SLOTS * MAX_OP_CHUNKS + grid), so a word is never rewritten before the block that
// claimed it read it: see wait_room.
#define CHUNK_RING 524288u
// Most chunks per op (or fewer: one per compute block).
#define MAX_OP_CHUNKS 480u
#define CHUNK_EXIT 0xffffffffu  // the chunk index of an exit chunk
// The chunk queue's counters, each on its own 128-byte line (u64 index into ctr).
#define CTR_CLAIMED 0
#define CTR_FINISHED 16
#define FLAG_STOP 1u
#define FLAG_NOP 2u
#define FLAG_CHAIN 4u
#define TAG_SHIFT 48
// Slots of the host ring (the host's SLOTS; the dispatcher's chain table has one entry each).
#define QUEUE_SLOTS 1024u
// An op's count word: chunks finished (bits 0..15; at most MAX_OP_CHUNKS) and, once an op is
// parked on it, the predecessor's lap (bits 16..31, COUNT_LAP), the successor's iterations
// (bits 32..47), how many op numbers later it is (bits 48..59), and COUNT_PARKED. Reset to 0
// by the dispatcher when it forwards the op.
#define COUNT_PARKED (1ull << 63)
#define COUNT_CHUNKS 0xffffull
#define COUNT_LAP(op, slots) ((((op) / (slots)) & 0xffffull) << 16)
struct HostSlot { unsigned long long w[8]; };  // w0: address; w1: elements | iterations << 32;
                                               // w2: dependency distances (12 bits each) |
                                               // flags << 24; each | tag << 48
struct DevSlot { unsigned long long op, ptr; unsigned int n, iters; unsigned long long after_a, after_b; unsigned int chunks, chunk_elems; unsigned long long pad[2]; };
struct QueueParams {
    HostSlot* ring; unsigned long long* host_done; unsigned long long* host_exit;
    DevSlot* dring; unsigned long long* count; unsigned long long* dev_done;
    unsigned long long* chunks; unsigned long long* ctr;
    unsigned long long start, epoch, idle_ns;
    unsigned int slots, chunk_tiles;
    // Timeline trace (diagnostics; `trace` null when off): for ops trace_from ..
    // trace_from + slots - 1, four %globaltimer stamps each: seen by the dispatcher,
    // forwarded, first chunk started (its dependencies done), completed.
    unsigned long long* trace; unsigned long long trace_from;
    // Ops chained so far (host-mapped, written by the dispatcher; statistics), and its value
    // when this kernel was launched.
    unsigned long long* host_chained; unsigned long long chained_start;
    // Least tiles per chunk of an op flagged FLAG_CHAIN (and of a layout chained to); whether
    // blocks start a parked successor early (see the top of this file).
    unsigned int chain_tiles, chain_early;
    // Giving the device up (see the top of this file): a host-mapped counter that every other
    // kernel launch on the device raises (null: never), the value this kernel compares it with,
    // the least time it runs before it may leave for it, and the longest it stays (0: no limit).
    unsigned long long* yield_word; unsigned long long yield_base, min_run_ns, slice_ns;
};
__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
    unsigned long long v; asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ unsigned long long ld_relaxed_sys(const unsigned long long* p) {
    unsigned long long v; asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ unsigned long long ld_acquire_gpu(const unsigned long long* p) {
    unsigned long long v; asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ unsigned long long ld_relaxed_gpu(const unsigned long long* p) {
    unsigned long long v; asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
// The tag ticket `t` carries in each word of its slot: its lap around the ring, never 0
// (zeroed memory) and different from the lap before (the slot's previous contents).
__device__ __forceinline__ unsigned long long slot_tag(unsigned long long t, unsigned int slots) {
    return 0x8000ull | ((t / slots) & 0x7fffull);
}
// The word of chunk g: its lap's tag (never 0, different from the lap before) | slot | index.
__device__ __forceinline__ unsigned long long chunk_word(unsigned long long g, unsigned int slot, unsigned int k) {
    return ((0x8000ull | ((g / CHUNK_RING) & 0x7fffull)) << TAG_SHIFT) | ((unsigned long long)slot << 32) | k;
}
#define TRACE_SEEN 0u
#define TRACE_FORWARDED 1u
#define TRACE_STARTED 2u
#define TRACE_COMPLETED 3u
__device__ __forceinline__ void trace_stamp(const QueueParams& q, unsigned long long op, unsigned int k) {
    if (q.trace != 0 && op >= q.trace_from && op - q.trace_from < q.slots)
        q.trace[(op - q.trace_from) * 4u + k] = now_ns();
}
// Marks op `t` complete, after one system-wide fence (the op's data, and the counts that
// showed it finished, ordered before both words): device-wide (dependencies) and for the host.
__device__ __forceinline__ void complete(const QueueParams& q, unsigned int slot, unsigned long long t) {
    trace_stamp(q, t, TRACE_COMPLETED);
    __threadfence_system();
    *(volatile unsigned long long*)&q.dev_done[slot] = t;
    *(volatile unsigned long long*)&q.host_done[slot * 8u] = t;
}
// The dispatcher's view of the chunk queue: chunks forwarded, and the last count of finished
// ones it read (read every round, overlapped with the bus read, and again while the ring
// looks full).
struct ChunkQueue { unsigned long long forwarded, finished; };
// Waits (all lanes) until `total` more chunk words fit in the ring: as many chunks finished as
// a lap allows. The ring's size is what keeps a word until its block read it: while the block
// that claimed chunk g has not read its word, g's op X has not completed, so the host has not
// published op X + QUEUE_SLOTS (it waits for X's slot), and every word written after g is a
// chunk of ops X .. X + QUEUE_SLOTS - 1 (at most MAX_OP_CHUNKS each) or an exit word (one set,
// after which nothing is written): fewer than CHUNK_RING, so word g is not written again. For
// the same reason this wait never binds; it stays as a guard.
__device__ __forceinline__ void wait_room(const QueueParams& q, ChunkQueue& c, unsigned long long total) {
    while (c.forwarded + total - c.finished > CHUNK_RING)
        c.finished = __shfl_sync(0xffffffffu, ld_relaxed_gpu(&q.ctr[CTR_FINISHED]), 0);
}
// Appends one exit chunk per compute block, then records that this kernel leaves at op `t`
// (not taken). Lane 0 records; all lanes write exit chunks.
// Why a kernel left (host_exit[2], read and cleared by the host at the next launch: statistics).
#define EXIT_IDLE 1ull
#define EXIT_YIELD 2ull
#define EXIT_SLICE 3ull
#define EXIT_STOP 4ull
__device__ void leave(const QueueParams& q, ChunkQueue& c, unsigned long long t, unsigned long long why) {
    const unsigned int lane = threadIdx.x, blocks = gridDim.x - 1u;
    wait_room(q, c, blocks);
    for (unsigned int b = lane; b < blocks; b += 32u) {
        const unsigned long long g = c.forwarded + b;
        ((volatile unsigned long long*)q.chunks)[g % CHUNK_RING] = chunk_word(g, 0u, CHUNK_EXIT);
    }
    c.forwarded += blocks;
    __syncwarp();
    if (lane == 0) {
        volatile unsigned long long* ex = q.host_exit;
        ex[0] = t;
        ex[2] = why;
        __threadfence_system();
        ex[1] = q.epoch;
    }
}
// The dispatcher (lanes of warp 0 of block 0): forwards published ops, up to 32 per round
// trip over the bus.
__device__ void queue_dispatch(const QueueParams& q) {
    const unsigned int lane = threadIdx.x, mask = q.slots - 1u;
    const unsigned long long blocks = gridDim.x - 1u;
    unsigned long long t = q.start, last = now_ns();
    const unsigned long long launched = last;
    ChunkQueue cq = {0ull, 0ull};
    unsigned long long chained = q.chained_start;
    // The chain table: per slot, the chunk layout of the last op this launch forwarded in it
    // (elements | chunks << 32 | tiles per chunk << 48; 0: none to chain to). An op's
    // predecessor from this launch (number >= q.start) is the last op forwarded in its slot:
    // the next one there comes a ring later, after the op itself. Only this warp uses it (every
    // block has it: 8 KiB of shared memory).
    __shared__ unsigned long long chain_lay[QUEUE_SLOTS];
    for (;;) {
        // Read while the bus read is in flight: the chunks finished (how busy the blocks are),
        // and whether another kernel asked for the device (before the slots' acquire load,
        // which would hold it back until the slots arrived).
        const unsigned long long finished_read = ld_relaxed_gpu(&q.ctr[CTR_FINISHED]);
        const unsigned long long yield_read =
            lane == 0u && q.yield_word != 0 ? ld_relaxed_sys(q.yield_word) : q.yield_base;
        const unsigned long long want = t + lane;
        const HostSlot* hs = &q.ring[want & mask];
        // One round trip: the three words together, the last one with acquire (the host
        // stores it last, with release); each must carry this op's tag.
        const unsigned long long w0 = ld_relaxed_sys(&hs->w[0]), w1 = ld_relaxed_sys(&hs->w[1]);
        const unsigned long long w2 = ld_acquire_sys(&hs->w[2]);
        const unsigned long long finished = __shfl_sync(0xffffffffu, finished_read, 0);
        const unsigned long long tag = slot_tag(want, q.slots);
        const bool published = (w0 >> TAG_SHIFT) == tag && (w1 >> TAG_SHIFT) == tag && (w2 >> TAG_SHIFT) == tag;
        const unsigned int ballot = __ballot_sync(0xffffffffu, published);
        unsigned int n = ballot == 0xffffffffu ? 32u : (unsigned int)(__ffs(~ballot) - 1);
        if (finished > cq.finished) cq.finished = finished;
        const unsigned long long yield_now = __shfl_sync(0xffffffffu, yield_read, 0);
        const unsigned long long ran = now_ns() - launched;
        const bool asked = yield_now != q.yield_base && ran >= q.min_run_ns;
        if (asked || (q.slice_ns != 0ull && ran > q.slice_ns)) {
            // Nothing of this round is forwarded: the relaunch starts at t.
            leave(q, cq, t, asked ? EXIT_YIELD : EXIT_SLICE);
            return;
        }
        if (n == 0u) {
            const unsigned long long idle = now_ns() - last;
            if (idle > q.idle_ns) {
                leave(q, cq, t, EXIT_IDLE);
                return;
            }
            if (idle > 20000ull) __nanosleep(500);
            continue;
        }
        bool mine = lane < n;
        const unsigned long long ptr = w0 & 0xffffffffffffull;
        const unsigned int len = (unsigned int)w1, iters = (unsigned int)(w1 >> 32) & 0xffffu;
        const unsigned int dist_a = (unsigned int)w2 & 0xfffu, dist_b = (unsigned int)(w2 >> 12) & 0xfffu;
        const unsigned int flags = (unsigned int)(w2 >> 24) & 0xffu;
        if (mine) trace_stamp(q, want, TRACE_SEEN);
        const unsigned int stops = __ballot_sync(0xffffffffu, mine && (flags & FLAG_STOP));
        if (stops != 0u) { n = (unsigned int)(__ffs(stops) - 1); mine = lane < n; }
        const bool nop = (flags & FLAG_NOP) != 0u || len == 0u;
        // Whole tiles per chunk, at most `blocks` chunks per op, and no more than chunk_tiles
        // tiles per chunk (a chunk's fixed cost is a few memory round trips, so on a busy
        // device small ops come in few chunks) unless the device has blocks to spare: the
        // blocks not busy with earlier chunks are shared among this round's ops, so an op on
        // a quiet device spreads over many multiprocessors (its latency is its work divided
        // by the multiprocessors it gets). Chunks are larger than chunk_tiles only
        // where an op would need more chunks than it may have, or follows another (below).
        const unsigned long long tiles = ((unsigned long long)len + QUEUE_TILE - 1u) / QUEUE_TILE;
        const unsigned long long backlog = cq.forwarded - cq.finished;
        const unsigned long long idle = backlog >= blocks ? 1ull : blocks - backlog;
        const unsigned long long share = n > 0u && idle / n > 1ull ? idle / n : 1ull;
        unsigned long long per = (tiles + share - 1u) / share;
        if (per > q.chunk_tiles) per = q.chunk_tiles;
        const unsigned long long spread = blocks < MAX_OP_CHUNKS ? blocks : MAX_OP_CHUNKS;
        const unsigned long long fewest = (tiles + spread - 1u) / spread;
        if (per < fewest) per = fewest;
        // An op that follows another on its buffer (FLAG_CHAIN) is part of a pipeline: it
        // gets chunks of at least chain_tiles tiles even where blocks look idle (blocks
        // following chains count as idle here: only queued chunks are counted finished), so a
        // chain can start at it if it is not chained itself. (A chain's chunks are streams
        // that each keep one block busy; larger chunks make fewer of them.)
        if ((flags & FLAG_CHAIN) != 0u && per < q.chain_tiles) per = q.chain_tiles;
        if (per == 0u) per = 1u;
        unsigned int chunks = (mine && !nop) ? (unsigned int)((tiles + per - 1u) / per) : 0u;
        // This op's layout as the chain table holds it (0: nothing can be chained to it). A
        // chain keeps its first op's layout for as long as it grows, so only layouts with
        // chunks of at least chain_tiles tiles (or one chunk) are chained to: an op that came
        // to a quiet device in one-tile chunks would make every op after it pay a chunk's
        // fixed cost per tile. Its successor is queued instead, and the chain starts there.
        unsigned long long lay = chunks != 0u && chunks < 0x10000u && per < 0x10000ull
            && (per >= q.chain_tiles || chunks == 1u)
            ? (unsigned long long)len | ((unsigned long long)chunks << 32) | (per << 48) : 0ull;
        // Chaining (see the top of this file). A candidate's predecessor is dependency b,
        // forwarded by this launch; its slot must not be reused by an op of this round (that
        // op's count is reset below).
        const unsigned long long parent = want - dist_b;
        bool chain = mine && !nop && (flags & FLAG_CHAIN) != 0u && dist_b != 0u
            && (dist_a == 0u || dist_a == dist_b) && q.slots == QUEUE_SLOTS
            && parent >= q.start && parent + QUEUE_SLOTS >= t + n;
        if (__any_sync(0xffffffffu, chain)) {
            // A predecessor in this round is an earlier lane; one in an earlier round is in the
            // chain table. `ok`: this lane's link and every link before it in this round hold
            // (same elements, a layout to share; in this round also the same buffer, which the
            // host's flag promises).
            const bool here = chain && parent >= t;
            unsigned int root = here ? (unsigned int)(parent - t) : lane;
            const unsigned long long parent_ptr = __shfl_sync(0xffffffffu, ptr, root);
            const unsigned int parent_len = __shfl_sync(0xffffffffu, len, root);
            bool ok;
            if (here) {
                ok = parent_ptr == ptr && parent_len == len;
            } else {
                if (chain) {
                    const unsigned long long pl = chain_lay[parent & (QUEUE_SLOTS - 1u)];
                    chain = pl != 0ull && (unsigned int)pl == len;
                    if (chain) lay = pl;
                }
                ok = lay != 0ull;
            }
            // Pointer jumping to the first op of each chain in this round, and-ing the links.
            for (unsigned int s = 0; s < 5u; s++) {
                ok = __shfl_sync(0xffffffffu, (int)ok, root) != 0 && ok;
                root = __shfl_sync(0xffffffffu, root, root);
            }
            const unsigned long long root_lay = __shfl_sync(0xffffffffu, lay, root);
            if (here) {
                chain = ok;
                if (ok) lay = root_lay;
            }
            if (chain) chunks = (unsigned int)(lay >> 32) & 0xffffu;
            // Every lane is past its reads of the chain table before any lane writes it.
            __syncwarp();
        }
        // A chained op's layout is its chain's (never 0 when chained).
        const unsigned int chunk_elems = (unsigned int)((chain ? lay >> 48 : per) * QUEUE_TILE);
        const unsigned int slot = (unsigned int)(want & mask);
        if (mine) {
            volatile DevSlot* d = &q.dring[slot];
            d->op = want; d->ptr = ptr; d->n = len; d->iters = iters;
            // A dependency as far back as the ring (or farther) completed before this op was
            // published: its slot was reused after it.
            d->after_a = dist_a != 0u ? want - dist_a : 0ull;
            d->after_b = dist_b != 0u ? want - dist_b : 0ull;
            d->chunks = chunks; d->chunk_elems = chunk_elems;
            // The count word of the slot's previous op is final (the host saw that op done
            // before publishing this one).
            *(volatile unsigned long long*)&q.count[slot] = 0ull;
            chain_lay[slot] = lay;
            if (chunks == 0u) complete(q, slot, want);
        }
        // The ops' fields and count words before their chunk words and before any park on
        // them (a block that sees either reads or counts them). The warp barrier first: an
        // op's count reset by one lane comes before another lane's park on it in this round
        // (a park the reset overwrote would be lost, its op never run), and a lane's chunk
        // words also come after what the other lanes acquired this round (a dependency
        // dropped as a ring back was seen done through the op that reused its slot, possibly
        // another lane's).
        __syncwarp();
        __threadfence();
        // Park: succeeds only while no chunk of the predecessor finished (its count is 0), so
        // every block finishing one of its chunks finds the successor.
        bool parked = false;
        if (__any_sync(0xffffffffu, chain)) {
            if (chain) {
                const unsigned long long succ = COUNT_PARKED | ((unsigned long long)dist_b << 48)
                    | ((unsigned long long)iters << 32) | COUNT_LAP(parent, q.slots);
                parked = atomicCAS(&q.count[parent & mask], 0ull, succ) == 0ull;
            }
        }
        const unsigned int parks = __popc(__ballot_sync(0xffffffffu, parked));
        if (parks != 0u) {
            chained += parks;
            // A posted write over the bus (nothing waits for it); before the exit record.
            if (lane == 0) *(volatile unsigned long long*)q.host_chained = chained;
        }
        const unsigned int queued = parked ? 0u : chunks;
        unsigned int incl = queued;
        for (unsigned int o = 1; o < 32u; o <<= 1) {
            const unsigned int y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        const unsigned int total = __shfl_sync(0xffffffffu, incl, 31);
        wait_room(q, cq, total);
        if (mine) {
            const unsigned long long first = cq.forwarded + (incl - queued);
            for (unsigned int c = 0; c < queued; c++)
                ((volatile unsigned long long*)q.chunks)[(first + c) % CHUNK_RING] = chunk_word(first + c, slot, c);
            trace_stamp(q, want, TRACE_FORWARDED);
        }
        cq.forwarded += total;
        t += n;
        __syncwarp();
        if (stops != 0u) {
            leave(q, cq, t, EXIT_STOP);
            return;
        }
        last = now_ns();
    }
}
// Waits until ops `a` and `b` (0: none) completed; both done words read at once first.
__device__ __forceinline__ void wait_done(const QueueParams& q, unsigned long long a, unsigned long long b) {
    const unsigned int mask = q.slots - 1u;
    const unsigned long long* pa = &q.dev_done[a & mask];
    const unsigned long long* pb = &q.dev_done[b & mask];
    unsigned long long da = a, db = b;
    if (a != 0ull) da = ld_relaxed_gpu(pa);
    if (b != 0ull) db = ld_relaxed_gpu(pb);
    if (da >= a && db >= b) {
        // Seen done with relaxed loads: one fence makes them acquire the ops' results.
        if ((a | b) != 0ull) __threadfence();
        return;
    }
    while (ld_acquire_gpu(pa) < a) { }
    while (ld_acquire_gpu(pb) < b) { }
}
// One claimed chunk, as thread 0 hands it to its block.
struct Claimed { unsigned long long ptr, op, begin, end; unsigned int iters, slot, chunks, k, exit; };
// Claims the next chunk, waits on its word until the dispatcher wrote it and until its op's
// dependencies completed, and describes it in `c`. Thread 0 of a compute block.
__device__ __forceinline__ void claim(const QueueParams& q, volatile Claimed* c) {
    const unsigned long long g = atomicAdd(&q.ctr[CTR_CLAIMED], 1ull);
    const unsigned long long* word = &q.chunks[g % CHUNK_RING];
    const unsigned long long tag = chunk_word(g, 0u, 0u) >> TAG_SHIFT;
    unsigned long long e;
    unsigned int spins = 0;
    while (((e = ld_acquire_gpu(word)) >> TAG_SHIFT) != tag) {
        if (++spins > 1024u) __nanosleep(256);  // an idle device: fewer loads
    }
    const unsigned int k = (unsigned int)e;
    if (k == CHUNK_EXIT) { c->exit = 1u; return; }
    const unsigned int slot = (unsigned int)(e >> 32) & 0xffffu;
    const volatile DevSlot* d = &q.dring[slot];
    const unsigned long long n = d->n, per = d->chunk_elems;
    c->ptr = d->ptr; c->op = d->op; c->iters = d->iters; c->slot = slot; c->chunks = d->chunks;
    c->begin = k * per;
    c->end = min(n, k * per + per);
    c->k = k;
    c->exit = 0u;
    const unsigned long long after_a = d->after_a, after_b = d->after_b;
    wait_done(q, after_a, after_b);
    if (k == 0u) trace_stamp(q, c->op, TRACE_STARTED);
}
// Counts the chunk that thread 0's block just ran (completing its op if it was the last) and
// picks the block's next chunk: the same chunk of the successor parked on the op, if any (on
// the elements just written: no memory round trip), else the next chunk of the queue.
// `queued`: whether the chunk came from the queue (only those count as finished there);
// `early`: the block already started the successor thread 0 peeked (queue_compute), so the add
// must find it, and the trace's start was stamped then.
__device__ __forceinline__ void finish_and_next(const QueueParams& q, volatile Claimed* c, bool& queued, bool early) {
    const unsigned int slot = c->slot;
    const unsigned long long old = atomicAdd(&q.count[slot], 1ull);
    if ((unsigned int)(old & COUNT_CHUNKS) + 1u == c->chunks) complete(q, slot, c->op);
    if (queued) atomicAdd(&q.ctr[CTR_FINISHED], 1ull);
    if ((old & COUNT_PARKED) != 0ull) {
        // Its count word was reset before the park this add read; the block's __threadfence
        // after running the chunk (an acquire, late but in time) orders that reset before
        // this block counts on it. Nothing else the dispatcher wrote is read here (the
        // successor's fields are in the count word, its elements were written by this block),
        // so nothing needs it sooner.
        const unsigned long long op = c->op + ((old >> 48) & 0xfffull);
        c->op = op;
        c->slot = (unsigned int)(op & (q.slots - 1u));
        c->iters = (unsigned int)(old >> 32) & 0xffffu;
        queued = false;
        if (!early && c->k == 0u) trace_stamp(q, op, TRACE_STARTED);
        return;
    }
    // The add finds the successor the peek found (see the top of this file). Were it ever not
    // so, the block would be running an op no one parked on these elements: fail the kernel
    // rather than the data.
    if (early) __trap();
    queued = true;
    claim(q, c);
}
// A peeked count word's successor for op `op`: its iterations if the word is a park of this
// op (its lap), else NO_LINK (no park yet, or a word the slot's previous op left).
#define NO_LINK 0xffffffffu
__device__ __forceinline__ unsigned int peeked_link(const QueueParams& q, unsigned long long word, unsigned long long op) {
    const unsigned long long mine = COUNT_PARKED | COUNT_LAP(op, q.slots);
    return (word & (COUNT_PARKED | (0xffffull << 16))) == mine ? (unsigned int)(word >> 32) & 0xffffu : NO_LINK;
}
// A compute block: thread 0 picks a chunk, then all 1,024 threads run it. (A variant where
// warp 0 claims the next chunk while warps 1-31 compute was measured on the H100 and lost on
// the small ops this queue is for.) With early start, the links of a chain run in the inner
// loop: one barrier per link, and thread 0 counts each chunk while the others run the next.
__device__ void queue_compute(const QueueParams& q) {
    __shared__ Claimed cur;
    // The successor thread 0 peeked after a chunk (its iterations, or NO_LINK), one entry per
    // parity of the chunks this block ran: a thread reads one after a barrier, and thread 0
    // writes that entry again only after the next barrier, which the reader reaches first.
    __shared__ unsigned int link[2];
    bool queued = true;  // thread 0's: whether `cur` came from the chunk queue
    unsigned int parity = 0u;
    if (threadIdx.x == 0) claim(q, &cur);
    __syncthreads();
    for (;;) {
        if (cur.exit) return;
        float* data = (float*)cur.ptr;
        unsigned int iters = cur.iters;
        const unsigned long long begin = cur.begin, end = cur.end;
        for (;;) {
            for (unsigned long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
                float v = data[i];
                for (unsigned int j = 0; j < iters; j++) v = sinf(v) * cosf(v) + v;
                data[i] = v;
            }
            // The peek is in flight together with the fence.
            unsigned long long peek = 0ull;
            if (threadIdx.x == 0 && q.chain_early != 0u) peek = ld_relaxed_gpu(&q.count[cur.slot]);
            __threadfence();
            if (threadIdx.x == 0) link[parity] = peeked_link(q, peek, cur.op);
            // Every thread is past its reads of `cur` and its writes are ordered before the count.
            __syncthreads();
            const unsigned int next = link[parity];
            parity ^= 1u;
            if (next == NO_LINK) break;
            // Early start: thread 0 counts the chunk and moves `cur` to the successor, which no
            // other thread reads; every thread runs the successor's chunk on its own elements.
            if (threadIdx.x == 0) {
                if (cur.k == 0u) trace_stamp(q, cur.op + ((peek >> 48) & 0xfffull), TRACE_STARTED);
                finish_and_next(q, &cur, queued, true);
            }
            iters = next;
        }
        if (threadIdx.x == 0) finish_and_next(q, &cur, queued, false);
        __syncthreads();
    }
}
extern "C" __global__ void __launch_bounds__(1024, 2) simple_compute_queue(const QueueParams q) {
    if (blockIdx.x == 0) {
        if (threadIdx.x < 32u) queue_dispatch(q);
        return;
    }
    queue_compute(q);
}
