// Probe: where a small batched MLP forward (512→1024→1024→512, fp32) spends its device time on
// this GPU, and what shortens it. Not part of the product; the product's kernel source is
// included as is. Variant "wpc: copy, wpc×3, copy (PDL)" is the graph multiq replays for a
// batched forward (skinny_warp as a programmatic dependent); "product" is skinny_v4, which
// multiq used before and still uses for k past 1,024 or unaligned operands.
//
// Build and run on the GPU machine (scripts/probes/mlp-forward.sh does both):
//   nvcc -O3 -std=c++17 -arch=sm_90 -o mlp_forward scripts/probes/mlp_forward.cu
//
// For each row count it prints, per variant (each recorded as a graph, one per stream):
//   gpu     µs per forward with forwards queued back to back on one stream;
//   rtt     µs per forward with a wait after each (launch + device + wake-up, one thread);
//   2x/4x   forwards/s from 2 and 4 host threads, each replaying on its own stream and waiting;
//   [check] the output against the product's, bit for bit.
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "../../src/backend/cuda/pdl.cuh"
#include "../../src/backend/cuda/skinny_kernel.cu"

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e_ = (x);                                                              \
        if (e_ != cudaSuccess) {                                                           \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

__device__ __forceinline__ void pdl_launch_dependents() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

extern "C" __global__ void copy_f32(const float* src, float* dst, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dst[i] = src[i];
}

template <bool PDL>
__global__ void copy_x(const float* src, float* dst, unsigned int n) {
    if (PDL) {
        pdl_launch_dependents();
        pdl_wait();
    }
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dst[i] = src[i];
}

template <bool PDL>
__global__ void empty_x(float* p) {
    if (PDL) {
        pdl_launch_dependents();
        pdl_wait();
    }
    if (p != nullptr && threadIdx.x == 0 && blockIdx.x == 0) p[0] = 0.0f;
}

// skinny_v4's arithmetic (8 rows × 4 columns × 4 warps, same order per element, so results are
// bit-identical), with W's first PRE steps and the bias loaded before anything else and, with
// PDL, before waiting for the previous kernel (W and the bias are never written by a forward).
template <int PRE, bool PDL>
__global__ void __launch_bounds__(128)
    layer_x(const float* a, const float* __restrict__ w, const float* __restrict__ bias,
            float* c, unsigned int m, unsigned int n, unsigned int k, int relu) {
    constexpr int ROWS = 8, COLS = 4, KSPLIT = 4, THREADS = 128, V = 4;
    __shared__ float partial[KSPLIT][ROWS * COLS];
    const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned int j0 = blockIdx.x * COLS, r0 = blockIdx.y * ROWS;
    const unsigned int steps = k / V;
    float4 wpre[PRE > 0 ? PRE : 1][COLS];
#pragma unroll
    for (int p = 0; p < PRE; p++) {
        const unsigned int s = threadIdx.x + p * THREADS;
#pragma unroll
        for (int cc = 0; cc < COLS; cc++)
            wpre[p][cc] = (s < steps && j0 + cc < n) ? load<V>(w + (size_t)(j0 + cc) * k, s)
                                                     : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    const unsigned int be = j0 + threadIdx.x % COLS;
    const float bv = (threadIdx.x < ROWS * COLS && be < n) ? __ldg(bias + be) : 0.0f;
    if (PDL) {
        pdl_launch_dependents();
        pdl_wait();
    }
    float acc[32];
#pragma unroll
    for (int i = 0; i < 32; i++) acc[i] = 0.0f;
    auto step = [&](unsigned int s, const float4 (&wv)[COLS]) {
#pragma unroll
        for (int r = 0; r < ROWS; r++) {
            if (r0 + r < m) {
                float4 av = reinterpret_cast<const float4*>(a + (size_t)(r0 + r) * k)[s];
#pragma unroll
                for (int cc = 0; cc < COLS; cc++) acc[r * COLS + cc] = dot4(av, wv[cc], acc[r * COLS + cc]);
            }
        }
    };
#pragma unroll
    for (int p = 0; p < PRE; p++) {
        const unsigned int s = threadIdx.x + p * THREADS;
        if (s < steps) step(s, wpre[p]);
    }
    for (unsigned int s = threadIdx.x + PRE * THREADS; s < steps; s += THREADS) {
        float4 wv[COLS];
#pragma unroll
        for (int cc = 0; cc < COLS; cc++)
            wv[cc] = (j0 + cc < n) ? load<V>(w + (size_t)(j0 + cc) * k, s)
                                   : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        step(s, wv);
    }
    partial[warp][lane] = transpose_sum(acc, lane);
    __syncthreads();
    if (threadIdx.x < ROWS * COLS) {
        const unsigned int e = threadIdx.x;
        const unsigned int r = r0 + e / COLS, j = j0 + e % COLS;
        float v = partial[0][e];
#pragma unroll
        for (int q = 1; q < KSPLIT; q++) v += partial[q][e];
        if (r < m && j < n) {
            v += bv;
            if (relu && v < 0.0f) v = 0.0f;
            c[(size_t)r * n + j] = v;
        }
    }
}


// The warp-per-column kernel ("wpc" below) is the product's `skinny_warp` (skinny_kernel.cu,
// included above), launched with w_static = 1 as multiq launches a model's layers.

// Reads W (n × k) once, all of it in flight at once: the memory floor of a layer.
__global__ void __launch_bounds__(128) stream_w(const float* __restrict__ w, float* c,
                                                unsigned int n, unsigned int k) {
    const unsigned int j0 = blockIdx.x * 4, steps = k / 4;
    float acc = 0.0f;
    for (unsigned int s = threadIdx.x; s < steps; s += 128)
#pragma unroll
        for (int cc = 0; cc < 4; cc++) {
            float4 v = load<4>(w + (size_t)(j0 + cc) * k, s);
            acc += v.x + v.y + v.z + v.w;
        }
    if (acc == 12345.0f) c[0] = acc;  // keeps the loads
}

static double now_us() {
    return std::chrono::duration<double, std::micro>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

static float* dev_random(size_t n, float scale, unsigned seed) {
    std::vector<float> host(n);
    srand(seed);
    for (auto& v : host) v = scale * (2.0f * rand() / RAND_MAX - 1.0f);
    float* d;
    CK(cudaMalloc(&d, n * 4));
    CK(cudaMemcpy(d, host.data(), n * 4, cudaMemcpyHostToDevice));
    return d;
}

template <typename K, typename... Args>
static cudaError_t launch(bool pdl, dim3 grid, dim3 block, cudaStream_t s, size_t smem, K kernel, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.stream = s;
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, args...);
}

int main(int argc, char** argv) {
    const bool quick = argc > 1;
    CK(cudaSetDeviceFlags(cudaDeviceScheduleSpin | cudaDeviceMapHost));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    int drv = 0, rt = 0;
    cudaDriverGetVersion(&drv);
    cudaRuntimeGetVersion(&rt);
    printf("device %s, %d SMs, driver %d, runtime %d\n", prop.name, prop.multiProcessorCount, drv, rt);
    const unsigned MAXR = 16;
    const float *w1 = dev_random(1024 * 512, 0.044f, 1), *b1 = dev_random(1024, 0.044f, 2);
    const float *w2 = dev_random(1024 * 1024, 0.031f, 3), *b2 = dev_random(1024, 0.031f, 4);
    const float *w3 = dev_random(512 * 1024, 0.031f, 5), *b3 = dev_random(512, 0.031f, 6);
    const int NS = 4;
    float *h0[NS], *h1[NS], *h2[NS], *h3[NS], *xh[NS], *yh[NS], *xd[NS], *yd[NS];
    cudaStream_t st[NS];
    for (int s = 0; s < NS; s++) {
        CK(cudaMalloc(&h0[s], MAXR * 512 * 4));
        CK(cudaMalloc(&h1[s], MAXR * 1024 * 4));
        CK(cudaMalloc(&h2[s], MAXR * 1024 * 4));
        CK(cudaMalloc(&h3[s], MAXR * 512 * 4));
        CK(cudaHostAlloc(&xh[s], MAXR * 512 * 4, cudaHostAllocMapped | cudaHostAllocPortable));
        CK(cudaHostAlloc(&yh[s], MAXR * 512 * 4, cudaHostAllocMapped | cudaHostAllocPortable));
        CK(cudaHostGetDevicePointer((void**)&xd[s], xh[s], 0));
        CK(cudaHostGetDevicePointer((void**)&yd[s], yh[s], 0));
        CK(cudaStreamCreateWithFlags(&st[s], cudaStreamNonBlocking));
        for (unsigned i = 0; i < MAXR * 512; i++) xh[s][i] = sinf(0.37f * i + s);
    }
    struct Variant {
        std::string name;
        // Queues one forward of m rows on stream s; returns false when a launch failed.
        std::function<bool(unsigned m, int s)> queue;
        bool host_out;  // output lands in yh (else in h3, not checked)
    };
    auto layers = [&](unsigned m, int s, bool pdl, int pre, bool out_host) -> bool {
        dim3 g1(1024 / 4, (m + 7) / 8), g3(512 / 4, (m + 7) / 8);
        float* out = out_host ? yd[s] : h3[s];
        cudaError_t e = cudaSuccess;
        auto L = [&](dim3 g, const float* a, const float* w, const float* b, float* c, unsigned n, unsigned k, int relu) {
            if (e != cudaSuccess) return;
            if (pre == 2) {
                e = pdl ? launch(true, g, 128, st[s], 0, layer_x<2, true>, a, w, b, c, m, n, k, relu)
                        : launch(false, g, 128, st[s], 0, layer_x<2, false>, a, w, b, c, m, n, k, relu);
            } else {
                e = pdl ? launch(true, g, 128, st[s], 0, layer_x<0, true>, a, w, b, c, m, n, k, relu)
                        : launch(false, g, 128, st[s], 0, layer_x<0, false>, a, w, b, c, m, n, k, relu);
            }
        };
        L(g1, h0[s], w1, b1, h1[s], 1024, 512, 1);
        L(g1, h1[s], w2, b2, h2[s], 1024, 1024, 1);
        L(g3, h2[s], w3, b3, out, 512, 1024, 0);
        if (e != cudaSuccess) printf("    launch: %s\n", cudaGetErrorString(e));
        return e == cudaSuccess;
    };

    auto wpc_layers = [&](unsigned m, int s, bool pdl, bool in_host, bool out_host) -> bool {
        cudaError_t e = cudaSuccess;
        auto L = [&](const float* a, const float* w, const float* b, float* c, unsigned n, unsigned k, int relu) {
            if (e != cudaSuccess) return;
            dim3 g((n + 7) / 8, (m + 7) / 8);
            const size_t smem = 8 * k * 4;
            e = launch(pdl, g, 256, st[s], smem, skinny_warp, a, w, b, c, m, n, k, 1, relu, 1);
        };
        L(in_host ? xd[s] : h0[s], w1, b1, h1[s], 1024, 512, 1);
        L(h1[s], w2, b2, h2[s], 1024, 1024, 1);
        L(h2[s], w3, b3, out_host ? yd[s] : h3[s], 512, 1024, 0);
        if (e != cudaSuccess) printf("    launch: %s\n", cudaGetErrorString(e));
        return e == cudaSuccess;
    };
    auto copy = [&](unsigned n, const float* src, float* dst, int s, bool pdl) {
        return launch(pdl, (n + 255) / 256, 256, st[s], 0, copy_x<true>, src, dst, n) == cudaSuccess;
    };
    std::vector<Variant> variants = {
        {"product: copy, skinny×3, copy", [&](unsigned m, int s) {
             copy_f32<<<(m * 512 + 255) / 256, 256, 0, st[s]>>>(xd[s], h0[s], m * 512);
             dim3 g1(1024 / 4, (m + 7) / 8), g3(512 / 4, (m + 7) / 8);
             skinny_v4<<<g1, 128, 0, st[s]>>>(h0[s], w1, b1, h1[s], m, 1024, 512, 1, 1);
             skinny_v4<<<g1, 128, 0, st[s]>>>(h1[s], w2, b2, h2[s], m, 1024, 1024, 1, 1);
             skinny_v4<<<g3, 128, 0, st[s]>>>(h2[s], w3, b3, h3[s], m, 512, 1024, 1, 0);
             copy_f32<<<(m * 512 + 255) / 256, 256, 0, st[s]>>>(h3[s], yd[s], m * 512);
             return cudaGetLastError() == cudaSuccess;
         }, true},
        {"copy, layer bias-early×3, copy", [&](unsigned m, int s) {
             return copy(m * 512, xd[s], h0[s], s, false) && layers(m, s, false, 0, false) &&
                    copy(m * 512, h3[s], yd[s], s, false);
         }, true},
        {"copy, layer W+bias-early×3, copy", [&](unsigned m, int s) {
             return copy(m * 512, xd[s], h0[s], s, false) && layers(m, s, false, 2, false) &&
                    copy(m * 512, h3[s], yd[s], s, false);
         }, true},
        {"PDL copy, layer bias-early×3, copy", [&](unsigned m, int s) {
             return copy(m * 512, xd[s], h0[s], s, false) && layers(m, s, true, 0, false) &&
                    copy(m * 512, h3[s], yd[s], s, true);
         }, true},
        {"PDL copy, layer W+bias-early×3, copy", [&](unsigned m, int s) {
             return copy(m * 512, xd[s], h0[s], s, false) && layers(m, s, true, 2, false) &&
                    copy(m * 512, h3[s], yd[s], s, true);
         }, true},
        {"PDL copy, layer W+bias-early×3 → host", [&](unsigned m, int s) {
             return copy(m * 512, xd[s], h0[s], s, false) && layers(m, s, true, 2, true);
         }, true},
        {"no-PDL copy, layer W+bias-early×3 → host", [&](unsigned m, int s) {
             return copy(m * 512, xd[s], h0[s], s, false) && layers(m, s, false, 2, true);
         }, true},
        {"wpc: copy, wpc×3, copy (PDL)", [&](unsigned m, int s) {
             return copy(m * 512, xd[s], h0[s], s, false) && wpc_layers(m, s, true, false, false) &&
                    copy(m * 512, h3[s], yd[s], s, true);
         }, true},
        {"wpc: copy, wpc×3 → host (PDL)", [&](unsigned m, int s) {
             return copy(m * 512, xd[s], h0[s], s, false) && wpc_layers(m, s, true, false, true);
         }, true},
        {"wpc: copy, wpc×3 → host (no PDL)", [&](unsigned m, int s) {
             return copy(m * 512, xd[s], h0[s], s, false) && wpc_layers(m, s, false, false, true);
         }, true},
        {"wpc: host → wpc×3 → host (PDL)", [&](unsigned m, int s) {
             return wpc_layers(m, s, true, true, true);
         }, true},
        {"floor: 5 empty kernels", [&](unsigned, int s) {
             for (int i = 0; i < 5; i++) empty_x<false><<<1, 32, 0, st[s]>>>(nullptr);
             return cudaGetLastError() == cudaSuccess;
         }, false},
        {"floor: 5 empty kernels, PDL", [&](unsigned, int s) {
             bool ok = true;
             for (int i = 0; i < 5; i++) ok = ok && launch(i > 0, 1, 32, st[s], 0, empty_x<true>, (float*)nullptr) == cudaSuccess;
             return ok;
         }, false},
        {"floor: 1 empty kernel", [&](unsigned, int s) {
             empty_x<false><<<1, 32, 0, st[s]>>>(nullptr);
             return cudaGetLastError() == cudaSuccess;
         }, false},
        {"floor: read W1,W2,W3 (3 kernels)", [&](unsigned, int s) {
             stream_w<<<256, 128, 0, st[s]>>>(w1, h3[s], 1024, 512);
             stream_w<<<256, 128, 0, st[s]>>>(w2, h3[s], 1024, 1024);
             stream_w<<<128, 128, 0, st[s]>>>(w3, h3[s], 512, 1024);
             return cudaGetLastError() == cudaSuccess;
         }, false},
    };
    std::map<std::string, std::vector<float>> row0_of;
    const unsigned rows_list[] = {1, 4, 8, 16};
    for (unsigned m : rows_list) {
        printf("== rows %u\n", m);
        std::vector<float> ref;
        for (size_t v = 0; v < variants.size(); v++) {
            if (m != 4 && variants[v].name.rfind("floor", 0) == 0) continue;
            cudaGraphExec_t ex[NS];
            bool ok = true;
            for (int s = 0; s < NS && ok; s++) {
                cudaGraph_t g;
                CK(cudaStreamBeginCapture(st[s], cudaStreamCaptureModeThreadLocal));
                ok = variants[v].queue(m, s);
                cudaError_t e = cudaStreamEndCapture(st[s], &g);
                if (!ok || e != cudaSuccess) {
                    printf("  %-42s capture failed: %s\n", variants[v].name.c_str(), cudaGetErrorString(e));
                    cudaGetLastError();
                    ok = false;
                    break;
                }
                CK(cudaGraphInstantiate(&ex[s], g, 0));
                CK(cudaGraphUpload(ex[s], st[s]));
            }
            if (!ok) continue;
            std::string check = "-";
            if (variants[v].host_out) {
                memset(yh[0], 0, m * 512 * 4);
                CK(cudaGraphLaunch(ex[0], st[0]));
                CK(cudaStreamSynchronize(st[0]));
                std::vector<float> out(yh[0], yh[0] + m * 512);
                if (ref.empty()) {
                    ref = out;
                    check = "ref";
                } else if (memcmp(out.data(), ref.data(), m * 512 * 4) == 0) {
                    check = "bit-identical";
                } else {
                    double num = 0, den = 0;
                    for (size_t i = 0; i < out.size(); i++) {
                        num += (double)(out[i] - ref[i]) * (out[i] - ref[i]);
                        den += (double)ref[i] * ref[i];
                    }
                    char buf[96];
                    snprintf(buf, sizeof buf, "rel %.1e", sqrt(num / den));
                    check = buf;
                }
                auto& row0 = row0_of[variants[v].name];
                if (row0.empty()) row0.assign(out.begin(), out.begin() + 512);
                else if (memcmp(row0.data(), out.data(), 512 * 4) != 0) check += ", ROW 0 DEPENDS ON BATCH";
            }
            cudaEvent_t e0, e1;
            CK(cudaEventCreate(&e0));
            CK(cudaEventCreate(&e1));
            const int N = quick ? 60 : 2000;
            for (int i = 0; i < 50; i++) CK(cudaGraphLaunch(ex[0], st[0]));
            CK(cudaEventRecord(e0, st[0]));
            for (int i = 0; i < N; i++) CK(cudaGraphLaunch(ex[0], st[0]));
            CK(cudaEventRecord(e1, st[0]));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            const double gpu = 1000.0 * ms / N;
            double t0 = now_us();
            for (int i = 0; i < N; i++) {
                CK(cudaGraphLaunch(ex[0], st[0]));
                CK(cudaStreamSynchronize(st[0]));
            }
            const double rtt = (now_us() - t0) / N;
            double rate[2] = {0, 0};
            for (int q = 0; q < (quick ? 0 : 2); q++) {
                const int nt = q == 0 ? 2 : 4;
                std::atomic<long> count{0};
                std::atomic<bool> stop{false};
                std::vector<std::thread> th;
                for (int s = 0; s < nt; s++)
                    th.emplace_back([&, s] {
                        long c = 0;
                        while (!stop.load(std::memory_order_relaxed)) {
                            CK(cudaGraphLaunch(ex[s], st[s]));
                            CK(cudaStreamSynchronize(st[s]));
                            c++;
                        }
                        count += c;
                    });
                const double s0 = now_us();
                std::this_thread::sleep_for(std::chrono::milliseconds(300));
                stop = true;
                for (auto& t : th) t.join();
                rate[q] = count.load() / ((now_us() - s0) * 1e-6);
            }
            printf("  %-42s gpu %6.2f µs  rtt %6.2f µs  2x %7.0f/s  4x %7.0f/s  [%s]\n",
                   variants[v].name.c_str(), gpu, rtt, rate[0], rate[1], check.c_str());
            for (int s = 0; s < NS; s++) CK(cudaGraphExecDestroy(ex[s]));
        }
    }
    return 0;
}
