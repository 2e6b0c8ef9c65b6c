// Products with few rows: C[m, n] = act(A[m, k] · W[n, k]ᵀ + bias[n]), row-major, fp32
// multiply-adds with fp32 accumulation (no TF32), for m small (a batch of requests through a
// Linear layer, whose weight is stored [out, in]). cuBLAS tiles such products into a handful of
// blocks that each walk all of k; here the product is what it is at small m, a stream over W:
//
// - a block of KSPLIT warps owns COLS consecutive columns of C; its warps split k, each lane
//   reading 16 bytes of each of the COLS rows of W per step (a warp reads 512 contiguous bytes
//   of a row, the block 2 KiB), and the matching 16 bytes of each of ROWS rows of A (small,
//   cache-resident);
// - every thread keeps ROWS × COLS partial sums; a warp reduces them 32 at a time with a
//   transposing butterfly (31 shuffles for 32 sums, each lane ending with one), the block adds
//   its warps' sums in warp order through shared memory, then adds the bias and applies ReLU
//   (NaN stays NaN, as PyTorch's);
// - rows are taken ROWS at a time, each group of ROWS rows by its own row of blocks
//   (blockIdx.y), so 32 rows take about as long as 8 (each group re-reads W, from L2).
//
// Every element's summation order depends only on k and this layout, never on m or on the other
// rows, so a row's result is the same whichever rows it is batched with.
//
// `v4` needs A and W 16-byte aligned and k a multiple of 4; `v1` takes anything.


template <int V>
__device__ __forceinline__ float4 load(const float* __restrict__ p, unsigned int i) {
    if (V == 4) {
        return __ldg(reinterpret_cast<const float4*>(p) + i);
    }
    return make_float4(__ldg(p + i), 0.0f, 0.0f, 0.0f);
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
    acc = fmaf(a.z, b.z, acc);
    acc = fmaf(a.w, b.w, acc);
    return acc;
}

// Sums 32 values across a warp with 31 shuffles: afterwards lane l holds the warp's sum of
// value l (each step halves the values a lane keeps and exchanges the other half).
__device__ __forceinline__ float transpose_sum(float (&v)[32], unsigned int lane) {
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) {
        const bool upper = (lane & off) != 0;
#pragma unroll
        for (int i = 0; i < off; i++) {
            const float send = upper ? v[i] : v[i + off];
            const float keep = upper ? v[i + off] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
        }
    }
    return v[0];
}

template <int V, int ROWS, int COLS, int KSPLIT>
__device__ void skinny(const float* __restrict__ a, const float* __restrict__ w,
                       const float* __restrict__ bias, float* __restrict__ c, unsigned int m,
                       unsigned int n, unsigned int k, int has_bias, int relu) {
    constexpr int THREADS = 32 * KSPLIT;
    constexpr int GROUPS = ROWS * COLS / 32;  // values of 32 per lane to reduce
    __shared__ float partial[KSPLIT][ROWS * COLS];
    const unsigned int lane = threadIdx.x & 31;
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned int j0 = blockIdx.x * COLS;
    const unsigned int steps = k / V;  // vectors per row
    for (unsigned int r0 = blockIdx.y * ROWS; r0 < m; r0 += gridDim.y * ROWS) {
        float acc[GROUPS][32];
#pragma unroll
        for (int g = 0; g < GROUPS; g++)
#pragma unroll
            for (int i = 0; i < 32; i++) acc[g][i] = 0.0f;
#pragma unroll 2
        for (unsigned int s = threadIdx.x; s < steps; s += THREADS) {
            float4 wv[COLS];
#pragma unroll
            for (int cc = 0; cc < COLS; cc++) {
                wv[cc] = (j0 + cc < n) ? load<V>(w + (size_t)(j0 + cc) * k, s)
                                       : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (int r = 0; r < ROWS; r++) {
                if (r0 + r < m) {
                    float4 av = load<V>(a + (size_t)(r0 + r) * k, s);
#pragma unroll
                    for (int cc = 0; cc < COLS; cc++) {
                        const int e = r * COLS + cc;
                        acc[e / 32][e % 32] = dot4(av, wv[cc], acc[e / 32][e % 32]);
                    }
                }
            }
        }
        // Lane l of each group now holds the warp's sum of element g*32 + l.
#pragma unroll
        for (int g = 0; g < GROUPS; g++) partial[warp][g * 32 + lane] = transpose_sum(acc[g], lane);
        __syncthreads();
        for (unsigned int e = threadIdx.x; e < ROWS * COLS; e += THREADS) {
            const unsigned int r = r0 + e / COLS, j = j0 + e % COLS;
            float v = partial[0][e];
#pragma unroll
            for (int q = 1; q < KSPLIT; q++) v += partial[q][e];
            if (r < m && j < n) {
                if (has_bias) v += __ldg(bias + j);
                if (relu && v < 0.0f) v = 0.0f;
                c[(size_t)r * n + j] = v;
            }
        }
        __syncthreads();
    }
}

#define ENTRY(name, V, R, C, K)                                                               \
    extern "C" __global__ void __launch_bounds__(32 * K)                                     \
        name(const float* a, const float* w, const float* bias, float* c, unsigned int m,    \
             unsigned int n, unsigned int k, int has_bias, int relu) {                       \
        skinny<V, R, C, K>(a, w, bias, c, m, n, k, has_bias, relu);                          \
    }

// Rows per pass × columns per block × warps splitting k: 8 × 4 × 4. Measured on the H100
// (forwards of 1 to 32 rows, bench/results/h100/mlp/probes.md): against 8 × 8, 16 × 4 and
// 4 × 8 with 4 warps, 8 × 4 was fastest from 4 rows up and within 10% at 1 row; against
// 8 × 4 × 8, 8 × 8 × 4 and 4 × 8 × 8 with row groups side by side, it was fastest at 8 and
// 16 rows and in 16-thread batched requests.
ENTRY(skinny_v4, 4, 8, 4, 4)
ENTRY(skinny_v1, 1, 8, 4, 4)

// The warp-per-column kernel (`skinny_warp`): what multiq runs for k a multiple of 4 up to
// 128·WARP_VECTORS with A and W 16-byte aligned. On the H200 a forward (copy in, three
// layers, copy out) took 9.1 / 13.4 / 18.8 µs of device time at 1 / 4 / 8 rows against
// 16.7 / 19.9 / 23.8 with the kernel above (scripts/probes/mlp_forward.cu,
// bench/results/h200/mlp/probe-mlp-forward.txt).
//
// - A block is 8 warps; warp w owns column j = 8·blockIdx.x + w of C. Its lanes load the whole
//   of W's row j into registers first (lane l takes 16-byte vectors l, l+32, …: every load of
//   the row in flight at once), with the bias.
// - With `w_static` (W and the bias are not written by work queued before this product: a
//   model's weights), those loads happen before waiting for the kernel ahead
//   (wait_for_prerequisites), so under a programmatic launch they overlap its tail.
// - The block's rows of A (8 per row group, blockIdx.y + gridDim.y·i) are copied to shared
//   memory; each lane sums its vectors' products for each row (fp32 multiply-adds, vectors in
//   ascending order), and the 8 row sums are reduced across the warp by a transposing
//   butterfly (lane bits 16, 8, 4, each halving the sums a lane keeps) and then a plain one
//   (bits 2, 1), so lane 4r ends with row r's sum.
//
// Every element's summation order depends only on k (the lanes' vectors and the butterfly's
// pairing are fixed), never on m or the other rows: a row's result is the same whichever rows
// it is batched with. ReLU keeps NaN.
#define WARP_VECTORS 8

extern "C" __global__ void __launch_bounds__(256)
    skinny_warp(const float* a, const float* __restrict__ w, const float* __restrict__ bias,
                float* c, unsigned int m, unsigned int n, unsigned int k, int has_bias, int relu,
                int w_static) {
    extern __shared__ float4 rows_of_a[];
    const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned int j = blockIdx.x * 8 + warp, k4 = k / 4;
    const bool col = j < n;
    const float4* wr = reinterpret_cast<const float4*>(w + (size_t)(col ? j : 0) * k);
    float4 wv[WARP_VECTORS];
    float bj = 0.0f;
    if (w_static) {
#pragma unroll
        for (int i = 0; i < WARP_VECTORS; i++) {
            const unsigned int idx = lane + 32 * i;
            wv[i] = (col && idx < k4) ? __ldg(wr + idx) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        if (col && has_bias) bj = __ldg(bias + j);
    }
    let_dependents_launch();
    wait_for_prerequisites();
    if (!w_static) {
#pragma unroll
        for (int i = 0; i < WARP_VECTORS; i++) {
            const unsigned int idx = lane + 32 * i;
            wv[i] = (col && idx < k4) ? wr[idx] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
        if (col && has_bias) bj = bias[j];
    }
    for (unsigned int r0 = blockIdx.y * 8; r0 < m; r0 += gridDim.y * 8) {
        const unsigned int rows = min(8u, m - r0);
        const float4* a4 = reinterpret_cast<const float4*>(a + (size_t)r0 * k);
        for (unsigned int t = threadIdx.x; t < rows * k4; t += blockDim.x) rows_of_a[t] = a4[t];
        __syncthreads();
        float v[8];
#pragma unroll
        for (int r = 0; r < 8; r++) {
            v[r] = 0.0f;
            if (r < rows) {
#pragma unroll
                for (int i = 0; i < WARP_VECTORS; i++) {
                    const unsigned int idx = lane + 32 * i;
                    if (idx < k4) v[r] = dot4(rows_of_a[r * k4 + idx], wv[i], v[r]);
                }
            }
        }
#pragma unroll
        for (int b = 16, h = 4; h >= 1; b >>= 1, h >>= 1) {
            const bool upper = (lane & b) != 0;
#pragma unroll
            for (int i = 0; i < h; i++) {
                const float send = upper ? v[i] : v[i + h];
                const float keep = upper ? v[i + h] : v[i];
                v[i] = keep + __shfl_xor_sync(0xffffffffu, send, b);
            }
        }
        v[0] += __shfl_xor_sync(0xffffffffu, v[0], 2);
        v[0] += __shfl_xor_sync(0xffffffffu, v[0], 1);
        const unsigned int r = lane >> 2;
        if ((lane & 3) == 0 && r < rows && col) {
            float out = v[0] + bj;
            if (relu && out < 0.0f) out = 0.0f;
            c[(size_t)(r0 + r) * n + j] = out;
        }
        __syncthreads();  // rows_of_a is refilled for the next row group
    }
}
