// multiq's device queue: one long-running kernel that runs ops published by host threads.
// Compiled by NVRTC together with kernels.rs's source (same options), so every element goes
// through exactly simple_compute's code and results are bit-identical to a single launch.
//
// Host side: src/backend/cuda/queue.rs. Memory:
// - ring[slots] (host memory mapped into the device): written by host threads, `seq` last
//   (release); read by the dispatcher warp.
// - host_done[slots] (host-mapped): the op number written once an op completed.
// - host_exit[2] (host-mapped): {ticket, epoch} written when a kernel leaves.
// - dring[slots], count[slots], dev_done[slots] (device memory): the dispatcher's copy of
//   each op, chunks finished per op, the op number completed per slot.
// - chunks[CHUNK_RING] and ctr (device memory, zeroed before every launch): the chunk queue's
//   counters: chunks claimed by blocks, chunks forwarded, chunks finished, the exit flag.
// Block 0's first warp is the dispatcher: it forwards published ops, in order, splitting each
// into at most gridDim.x - 1 chunks of whole 1,024-element tiles (one element per thread) and appending them to the
// chunk queue. In every other block, thread 0 claims the next chunk index (one atomic add),
// waits until it is forwarded and the op's dependencies completed; the block runs it and
// counts it; the block finishing an op's last chunk marks the op complete. Chunk g only ever waits for ops whose
// chunks come before g, all claimed by running blocks (the grid is sized so all its blocks
// are resident), and a block's earlier chunk never waits for its later one, so every op
// completes.
#define QUEUE_TILE 1024u  // one element per thread of a block
#define CHUNK_RING 65536u
// The chunk queue's counters, each on its own 128-byte line (u64 index into ctr).
#define CTR_CLAIMED 0
#define CTR_FORWARDED 16
#define CTR_FINISHED 32
#define CTR_EXIT 48
#define FLAG_STOP 1u
#define FLAG_NOP 2u
struct HostSlot { unsigned long long seq, ptr; unsigned int n, iters; unsigned long long after_a, after_b; unsigned int flags, pad; };
struct DevSlot { unsigned long long op, ptr; unsigned int n, iters; unsigned long long after_a, after_b; unsigned int chunks, chunk_elems; unsigned long long pad[2]; };
struct QueueParams {
    HostSlot* ring; unsigned long long* host_done; unsigned long long* host_exit;
    DevSlot* dring; unsigned int* count; unsigned long long* dev_done;
    unsigned long long* chunks; unsigned long long* ctr;
    unsigned long long start, epoch, idle_ns;
    unsigned int slots, chunk_tiles;
    // Timeline trace (diagnostics; `trace` null when off): for ops trace_from ..
    // trace_from + slots - 1, four %globaltimer stamps each: seen by the dispatcher,
    // forwarded, first chunk started (its dependencies done), completed.
    unsigned long long* trace; unsigned long long trace_from;
};
__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
    unsigned long long v; asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ unsigned long long ld_acquire_gpu(const unsigned long long* p) {
    unsigned long long v; asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ unsigned long long ld_relaxed_gpu(const unsigned long long* p) {
    unsigned long long v; asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ void st_release_gpu(unsigned long long* p, unsigned long long v) {
    asm volatile("st.release.gpu.global.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long now_ns() {
    unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
#define TRACE_SEEN 0u
#define TRACE_FORWARDED 1u
#define TRACE_STARTED 2u
#define TRACE_COMPLETED 3u
__device__ __forceinline__ void trace_stamp(const QueueParams& q, unsigned long long op, unsigned int k) {
    if (q.trace != 0 && op >= q.trace_from && op - q.trace_from < q.slots)
        q.trace[(op - q.trace_from) * 4u + k] = now_ns();
}
// Marks op `t` complete: device-wide first (dependencies), then, after a system-wide fence
// (the op's data is visible to the host and copy engines), for the host.
__device__ __forceinline__ void complete(const QueueParams& q, unsigned int slot, unsigned long long t) {
    trace_stamp(q, t, TRACE_COMPLETED);
    st_release_gpu(&q.dev_done[slot], t);
    __threadfence_system();
    *(volatile unsigned long long*)&q.host_done[slot] = t;
}
// Records that this kernel leaves at op `t` (not taken), then releases the compute blocks.
__device__ __forceinline__ void leave(const QueueParams& q, unsigned long long t) {
    volatile unsigned long long* ex = q.host_exit;
    ex[0] = t;
    __threadfence_system();
    ex[1] = q.epoch;
    st_release_gpu(&q.ctr[CTR_EXIT], 1ull);
}
// The dispatcher (lanes of warp 0 of block 0): forwards published ops, up to 32 per round
// trip over the bus.
__device__ void queue_dispatch(const QueueParams& q) {
    const unsigned int lane = threadIdx.x, mask = q.slots - 1u;
    const unsigned long long blocks = gridDim.x - 1u;
    unsigned long long t = q.start, forwarded = 0, last = now_ns();
    for (;;) {
        const unsigned long long want = t + lane;
        const HostSlot* hs = &q.ring[want & mask];
        const bool published = ld_acquire_sys(&hs->seq) == want;
        const unsigned int ballot = __ballot_sync(0xffffffffu, published);
        unsigned int n = ballot == 0xffffffffu ? 32u : (unsigned int)(__ffs(~ballot) - 1);
        if (n == 0u) {
            const unsigned long long idle = now_ns() - last;
            if (idle > q.idle_ns) {
                if (lane == 0) leave(q, t);
                return;
            }
            if (idle > 20000ull) __nanosleep(500);
            continue;
        }
        bool mine = lane < n;
        unsigned long long ptr = 0, after_a = 0, after_b = 0;
        unsigned int len = 0, iters = 0, flags = 0;
        if (mine) {
            const volatile HostSlot* v = hs;
            ptr = v->ptr; len = v->n; iters = v->iters; after_a = v->after_a; after_b = v->after_b; flags = v->flags;
            trace_stamp(q, want, TRACE_SEEN);
        }
        const unsigned int stops = __ballot_sync(0xffffffffu, mine && (flags & FLAG_STOP));
        unsigned int stop_lane = 32u;
        if (stops != 0u) { stop_lane = (unsigned int)(__ffs(stops) - 1); n = stop_lane; mine = lane < n; }
        const bool nop = (flags & FLAG_NOP) != 0u || len == 0u;
        // Whole tiles per chunk, at most `blocks` chunks per op, and no more than chunk_tiles
        // tiles per chunk (a chunk's fixed cost is a few memory round trips, so on a busy
        // device small ops come in few chunks) unless the device has blocks to spare: the
        // blocks not busy with earlier chunks are shared among this round's ops, so an op on
        // a quiet device spreads over many multiprocessors (its latency is its work divided
        // by the multiprocessors it gets). Chunks are never larger than chunk_tiles allows.
        const unsigned long long finished = ld_relaxed_gpu(&q.ctr[CTR_FINISHED]);
        const unsigned long long tiles = ((unsigned long long)len + QUEUE_TILE - 1u) / QUEUE_TILE;
        const unsigned long long backlog = forwarded - finished;
        const unsigned long long idle = backlog >= blocks ? 1ull : blocks - backlog;
        const unsigned long long share = n > 0u && idle / n > 1ull ? idle / n : 1ull;
        unsigned long long per = (tiles + share - 1u) / share;
        if (per > q.chunk_tiles) per = q.chunk_tiles;
        const unsigned long long fewest = (tiles + blocks - 1u) / blocks;
        if (per < fewest) per = fewest;
        if (per == 0u) per = 1u;
        const unsigned int chunk_elems = (unsigned int)(per * QUEUE_TILE);
        const unsigned int chunks = (mine && !nop) ? (unsigned int)((tiles + per - 1u) / per) : 0u;
        unsigned int incl = chunks;
        for (unsigned int o = 1; o < 32u; o <<= 1) {
            const unsigned int y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        const unsigned int total = __shfl_sync(0xffffffffu, incl, 31);
        // Room in the chunk ring: chunks forwarded but not finished stay below CHUNK_RING.
        while (forwarded + total - ld_relaxed_gpu(&q.ctr[CTR_FINISHED]) > CHUNK_RING) { }
        __syncwarp();
        if (mine) {
            const unsigned int slot = (unsigned int)(want & mask);
            volatile DevSlot* d = &q.dring[slot];
            d->op = want; d->ptr = ptr; d->n = len; d->iters = iters; d->after_a = after_a; d->after_b = after_b;
            d->chunks = chunks; d->chunk_elems = chunk_elems;
            const unsigned long long first = forwarded + (incl - chunks);
            for (unsigned int c = 0; c < chunks; c++)
                ((volatile unsigned long long*)q.chunks)[(first + c) % CHUNK_RING] = ((unsigned long long)slot << 32) | c;
            if (chunks == 0u) complete(q, slot, want);
        }
        __syncwarp();
        forwarded += total;
        if (lane == 0) { __threadfence(); st_release_gpu(&q.ctr[CTR_FORWARDED], forwarded); }
        __syncwarp();
        if (mine) trace_stamp(q, want, TRACE_FORWARDED);
        t += n;
        if (stops != 0u) {
            if (lane == 0) leave(q, t);
            return;
        }
        last = now_ns();
    }
}
__device__ __forceinline__ void wait_done(const QueueParams& q, unsigned long long op) {
    if (op == 0ull) return;
    const unsigned long long* p = &q.dev_done[op & (q.slots - 1u)];
    while (ld_acquire_gpu(p) < op) { }
}
// One claimed chunk, as thread 0 hands it to its block.
struct Claimed { unsigned long long ptr, op, begin, end; unsigned int iters, slot, chunks, exit; };
// Claims the next chunk, waits until it is forwarded (or the kernel leaves) and until its
// op's dependencies completed, and describes it in `c`. Thread 0 of a compute block.
__device__ __forceinline__ void claim(const QueueParams& q, volatile Claimed* c) {
    const unsigned long long g = atomicAdd(&q.ctr[CTR_CLAIMED], 1ull);
    for (;;) {
        if (ld_acquire_gpu(&q.ctr[CTR_FORWARDED]) > g) break;
        if (ld_acquire_gpu(&q.ctr[CTR_EXIT]) != 0ull && ld_acquire_gpu(&q.ctr[CTR_FORWARDED]) <= g) { c->exit = 1u; return; }
    }
    const unsigned long long e = ((volatile unsigned long long*)q.chunks)[g % CHUNK_RING];
    const unsigned int slot = (unsigned int)(e >> 32), k = (unsigned int)e;
    const volatile DevSlot* d = &q.dring[slot];
    const unsigned long long n = d->n, per = d->chunk_elems;
    c->ptr = d->ptr; c->op = d->op; c->iters = d->iters; c->slot = slot; c->chunks = d->chunks;
    c->begin = k * per;
    c->end = min(n, k * per + per);
    c->exit = 0u;
    const unsigned long long after_a = d->after_a, after_b = d->after_b;
    wait_done(q, after_a);
    wait_done(q, after_b);
    if (k == 0u) trace_stamp(q, c->op, TRACE_STARTED);
}
// A compute block: thread 0 claims a chunk, then all 1,024 threads run it, and thread 0
// counts it. (A variant where warp 0 claims the next chunk while warps 1-31 compute was
// measured on the H100 and lost on the small ops this queue is for.)
__device__ void queue_compute(const QueueParams& q) {
    __shared__ Claimed cur;
    for (;;) {
        if (threadIdx.x == 0) claim(q, &cur);
        __syncthreads();
        if (cur.exit) return;
        float* data = (float*)cur.ptr;
        const unsigned int iters = cur.iters;
        const unsigned long long end = cur.end;
        for (unsigned long long i = cur.begin + threadIdx.x; i < end; i += blockDim.x) {
            float v = data[i];
            for (unsigned int j = 0; j < iters; j++) v = sinf(v) * cosf(v) + v;
            data[i] = v;
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            const unsigned int slot = cur.slot;
            if (atomicAdd(&q.count[slot], 1u) + 1u == cur.chunks) {
                atomicExch(&q.count[slot], 0u);
                complete(q, slot, cur.op);
            }
            atomicAdd(&q.ctr[CTR_FINISHED], 1ull);
        }
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
