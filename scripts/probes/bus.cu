// Probe: what one host <-> device hand-off costs on this machine, without any compute; the
// floor under the device queue's cycle (src/backend/cuda/queue_kernel.cu).
//  a) device reading page-locked host memory: one load at a time (a round trip over the bus),
//     and three independent loads issued together (do they overlap into one round trip?)
//  b) device fences: __threadfence() and __threadfence_system() after a store
//  c) ping-pong, host thread <-> one device warp: the host writes a word, the device sees it and
//     writes an answer into host memory (with or without a system fence first), the host sees
//     it; per hand-off, host clock. With 1 and 16 host threads (one lane each).
// Build: nvcc -O3 -arch=sm_90 -o bus bus.cu -lpthread   (scripts/probes/bus.sh)
#include <cuda_runtime.h>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1);} } while (0)

__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;
}
__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* p) {
  unsigned long long v; asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}
__device__ __forceinline__ unsigned long long ld_relaxed_sys(const unsigned long long* p) {
  unsigned long long v; asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory"); return v;
}

// a) out[0]: ns per dependent acquire load; out[1]: ns per round of 3 independent relaxed loads
//    plus one acquire; out[2]: ns per dependent load of device memory (L2), for scale.
__global__ void loads(unsigned long long* host, unsigned long long* dev, unsigned long long* out, int n) {
  unsigned long long x = 0, t0 = now_ns();
  for (int i = 0; i < n; i++) x += ld_acquire_sys(host + (x & 1));
  unsigned long long t1 = now_ns();
  for (int i = 0; i < n; i++) {
    unsigned long long a = ld_relaxed_sys(host + 8 + (x & 1)), b = ld_relaxed_sys(host + 16 + (x & 1));
    unsigned long long c = ld_acquire_sys(host + 24 + (x & 1));
    x += a + b + c;
  }
  unsigned long long t2 = now_ns();
  for (int i = 0; i < n; i++) x += ld_acquire_sys(host + 8 * (i & 3) + 32 + (x & 1));
  unsigned long long t3 = now_ns();
  for (int i = 0; i < n; i++) { unsigned long long v; asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(dev + (x & 1)) : "memory"); x += v; }
  unsigned long long t4 = now_ns();
  out[0] = (t1 - t0) / n; out[1] = (t2 - t1) / n; out[2] = (t3 - t2) / n; out[3] = (t4 - t3) / n; out[7] = x;
}
// b) out[4]: ns per store + __threadfence(); out[5]: store + __threadfence_system(); out[6]:
//    host store + __threadfence_system().
__global__ void fences(unsigned long long* host, unsigned long long* dev, unsigned long long* out, int n) {
  unsigned long long t0 = now_ns();
  for (int i = 0; i < n; i++) { ((volatile unsigned long long*)dev)[i & 63] = i; __threadfence(); }
  unsigned long long t1 = now_ns();
  for (int i = 0; i < n; i++) { ((volatile unsigned long long*)dev)[i & 63] = i; __threadfence_system(); }
  unsigned long long t2 = now_ns();
  for (int i = 0; i < n; i++) { ((volatile unsigned long long*)host)[64 + (i & 7)] = i; __threadfence_system(); }
  unsigned long long t3 = now_ns();
  out[4] = (t1 - t0) / n; out[5] = (t2 - t1) / n; out[6] = (t3 - t2) / n;
}

// c) lanes 0..lanes-1 each serve one host thread: wait for ping[l] == k, answer pong[l] = k.
// fence 2: all 32 lanes poll three words of their own line each round (as the device
// queue's dispatcher does), the answering lanes among them.
__global__ void pingpong(unsigned long long* ping, unsigned long long* pong, int lanes, int rounds, int fence) {
  int l = threadIdx.x;
  if (fence == 2) {
    unsigned long long k = 1;
    while (__any_sync(0xffffffffu, l < lanes && k <= (unsigned long long)rounds)) {
      unsigned long long a = ld_relaxed_sys(ping + 8 * l + 1), b = ld_relaxed_sys(ping + 8 * l + 2);
      unsigned long long c = ld_acquire_sys(ping + 8 * l);
      if (l < lanes && k <= (unsigned long long)rounds && c == k + (a & b & 0)) {
        __threadfence_system();
        ((volatile unsigned long long*)pong)[8 * l] = k;
        k++;
      }
    }
    return;
  }
  if (l >= lanes) return;
  for (unsigned long long k = 1; k <= (unsigned long long)rounds; k++) {
    while (ld_acquire_sys(ping + 8 * l) != k) { }
    if (fence) __threadfence_system();
    ((volatile unsigned long long*)pong)[8 * l] = k;
  }
}

static double host_pingpong(int threads, int rounds, int fence) {
  unsigned long long *ping, *pong, *dping, *dpong;
  CK(cudaHostAlloc(&ping, 4096, cudaHostAllocMapped)); CK(cudaHostAlloc(&pong, 4096, cudaHostAllocMapped));
  for (int i = 0; i < 512; i++) { ping[i] = 0; pong[i] = 0; }
  CK(cudaHostGetDevicePointer(&dping, ping, 0)); CK(cudaHostGetDevicePointer(&dpong, pong, 0));
  pingpong<<<1, 32>>>(dping, dpong, threads, rounds, fence);
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> ths;
  for (int t = 0; t < threads; t++) ths.emplace_back([=]() {
    auto* pi = reinterpret_cast<std::atomic<unsigned long long>*>(ping + 8 * t);
    auto* po = reinterpret_cast<std::atomic<unsigned long long>*>(pong + 8 * t);
    for (unsigned long long k = 1; k <= (unsigned long long)rounds; k++) {
      pi->store(k, std::memory_order_release);
      while (po->load(std::memory_order_acquire) != k) { }
    }
  });
  for (auto& th : ths) th.join();
  double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / rounds;
  CK(cudaDeviceSynchronize());
  CK(cudaFreeHost(ping)); CK(cudaFreeHost(pong));
  return us;
}

int main() {
  unsigned long long *host, *dhost, *dev, *out;
  CK(cudaHostAlloc(&host, 4096, cudaHostAllocMapped));
  for (int i = 0; i < 512; i++) host[i] = 0;
  CK(cudaHostGetDevicePointer(&dhost, host, 0));
  CK(cudaMalloc(&dev, 4096)); CK(cudaMemset(dev, 0, 4096));
  CK(cudaMallocManaged(&out, 64));
  const int n = 2000;
  loads<<<1, 1>>>(dhost, dev, out, n); CK(cudaDeviceSynchronize());
  loads<<<1, 1>>>(dhost, dev, out, n); CK(cudaDeviceSynchronize());
  fences<<<1, 1>>>(dhost, dev, out, n); CK(cudaDeviceSynchronize());
  printf("device reads of host memory: one acquire load %llu ns; 2 relaxed + 1 acquire together %llu ns; acquire, 4 lines %llu ns\n", out[0], out[1], out[2]);
  printf("device memory relaxed.gpu load %llu ns\n", out[3]);
  printf("store + __threadfence %llu ns; device store + __threadfence_system %llu ns; host store + __threadfence_system %llu ns\n", out[4], out[5], out[6]);
  for (int fence = 0; fence < 3; fence++)
    for (int t : {1, 4, 16}) {
      double us = host_pingpong(t, 20000, fence);
      printf("ping-pong %2d host threads, %s: %.2f us per hand-off, %.0f hand-offs/s in all\n", t,
             fence == 2 ? "32 lanes x 3 words polled, system fence" : fence ? "system fence before the answer" : "no fence", us, t / us * 1e6);
    }
  return 0;
}
