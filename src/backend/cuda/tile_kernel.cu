// multiq's own fp32 product for small and mid-sized matrices (tile.rs says when it is used):
// C = A·B, or A·Bᵀ with `bt`, row-major and contiguous: A [m, k], B [k, n] (Bᵀ: [n, k]),
// C [m, n]. Plain fp32 multiply-adds with fp32 accumulation, over k in ascending order, so
// every element is within the strict bound 2·k·2⁻²⁴·(|A|·|B|) of the exact product.
//
// A block computes a 64 × 64 tile of C with 256 threads, 4 × 4 elements each. k is walked in
// steps of 16: each step's slices of A (64 × 16) and B (16 × 64) are loaded into registers while
// the previous step's, in shared memory, are multiplied, then stored into the other half of a
// double buffer; one barrier per step. Every load and store is bounds-checked, so any m, n, k
// work (out-of-range elements load as zero and are never stored).
//
// Where cuBLAS tiles a 256 × 256 product into a few large tiles (a few multiprocessors busy
// for many µs), this one spreads it over 16 blocks; a batch spreads over blockIdx.z.

#define TILE 64
#define STEP 16

__device__ __forceinline__ void tile_product(const float* __restrict__ a,
                                             const float* __restrict__ b, float* __restrict__ c,
                                             unsigned int m, unsigned int n, unsigned int k,
                                             int bt) {
    // As[s][kk][r]: A's slice transposed (a thread reads 4 consecutive rows at once), and
    // Bs[s][kk][col]; rows padded to 68 floats (still 16-byte aligned) so that the transposing
    // stores hit at most 2 threads per bank.
    __shared__ __align__(16) float As[2][STEP][TILE + 4];
    __shared__ __align__(16) float Bs[2][STEP][TILE + 4];
    const unsigned int tid = threadIdx.x;
    const unsigned int ty = tid / 16, tx = tid % 16;
    const unsigned int row0 = blockIdx.y * TILE, col0 = blockIdx.x * TILE;
    float ra[4], rb[4];
    // Element e = tid + 256·i of a slice: A as (row e/16, kk e%16) (16 consecutive k of a row
    // per 16 threads); B as (kk e/64, col e%64), or with bt as (col e/16, kk e%16).
    auto load = [&](unsigned int k0) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned int e = tid + 256 * i;
            const unsigned int r = row0 + e / STEP, ka = k0 + e % STEP;
            ra[i] = (r < m && ka < k) ? a[(size_t)r * k + ka] : 0.0f;
            if (bt) {
                const unsigned int col = col0 + e / STEP, kb = k0 + e % STEP;
                rb[i] = (col < n && kb < k) ? b[(size_t)col * k + kb] : 0.0f;
            } else {
                const unsigned int kb = k0 + e / TILE, col = col0 + e % TILE;
                rb[i] = (col < n && kb < k) ? b[(size_t)kb * n + col] : 0.0f;
            }
        }
    };
    auto store = [&](int s) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned int e = tid + 256 * i;
            As[s][e % STEP][e / STEP] = ra[i];
            if (bt) {
                Bs[s][e % STEP][e / STEP] = rb[i];
            } else {
                Bs[s][e / TILE][e % TILE] = rb[i];
            }
        }
    };
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    load(0);
    store(0);
    __syncthreads();
    int s = 0;
    for (unsigned int k0 = 0; k0 < k; k0 += STEP) {
        const bool more = k0 + STEP < k;
        if (more) load(k0 + STEP);
#pragma unroll
        for (int kk = 0; kk < STEP; kk++) {
            const float4 av = *reinterpret_cast<const float4*>(&As[s][kk][ty * 4]);
            const float4 bv = *reinterpret_cast<const float4*>(&Bs[s][kk][tx * 4]);
            const float x[4] = {av.x, av.y, av.z, av.w};
            const float y[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(x[i], y[j], acc[i][j]);
        }
        if (more) store(s ^ 1);
        // The other half is complete for everyone, and nobody reads this half any more.
        __syncthreads();
        s ^= 1;
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const unsigned int r = row0 + ty * 4 + i;
        if (r >= m) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const unsigned int col = col0 + tx * 4 + j;
            if (col < n) c[(size_t)r * n + col] = acc[i][j];
        }
    }
}

// One product.
extern "C" __global__ void __launch_bounds__(256)
    tile_gemm(const float* a, const float* b, float* c, unsigned int m, unsigned int n,
              unsigned int k, int bt) {
    tile_product(a, b, c, m, n, k, bt);
}

// A batch of `count` products of one shape: product z takes A from ptrs[count + z], B from
// ptrs[z] and C from ptrs[2·count + z] (the layout of the pointer arrays cuBLAS's batched
// call reads, so both paths share them).
extern "C" __global__ void __launch_bounds__(256)
    tile_gemm_batched(const unsigned long long* ptrs, unsigned int count, unsigned int m,
                      unsigned int n, unsigned int k, int bt) {
    const unsigned int z = blockIdx.z;
    const float* a = reinterpret_cast<const float*>(ptrs[count + z]);
    const float* b = reinterpret_cast<const float*>(ptrs[z]);
    float* c = reinterpret_cast<float*>(ptrs[2 * count + z]);
    tile_product(a, b, c, m, n, k, bt);
}
