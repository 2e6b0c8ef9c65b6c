// spin-gaps: does this machine take the CPU away from threads that spin with `pause`?
//
// The device queue's waiters poll a word in a tight loop with the CPU's spin-wait hint
// (x86 `pause`) between polls. Under KVM a long run of `pause` can trigger pause-loop exiting:
// the hypervisor takes the virtual CPU away, on the guess that it spins on a lock held by a
// descheduled one. Each such exit costs the spinning thread a few microseconds even where the
// hypervisor has nothing else to run; where it has, the thread loses its CPU for longer. This
// probe spins THREADS threads on a shared word, with or without `pause`, for SECONDS, and counts
// the time each thread lost: gaps between consecutive TSC reads of more than 1 us (a poll takes
// well under 0.2 us), and of more than 10 us. A gap with no involuntary context switch of the
// thread in the guest is time the hypervisor took (the guest's scheduler did not);
// /proc/stat's steal column is its view.
//
//   gcc -O2 -pthread spin-gaps.c -o spin-gaps      (scripts/gpu-prepare.sh builds it)
//   spin-gaps THREADS PAUSE(0|1) SECONDS
//
// One line per run: gaps of more than 1 us per thread-second and the time they lost (% of the
// spin time, mean over threads); the same for gaps of more than 10 us, with the worst thread;
// gaps of more than 100 us and 1 ms per thread-second, the longest gap, the guest's involuntary
// context switches of the spinning threads, and the steal the guest saw (ms, all CPUs).
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

static double ticks_per_us;
static int use_pause;
static double seconds;
static _Atomic unsigned long word;

struct result {
    unsigned long gaps_1us, gaps_10us, gaps_100us, gaps_1ms, iterations;
    double lost_1us, lost_us, max_us;
    long involuntary;
};

static void* spin(void* arg) {
    struct result* r = arg;
    memset(r, 0, sizeof *r);
    unsigned long prev = __rdtsc();
    const unsigned long end = prev + (unsigned long)(seconds * 1e6 * ticks_per_us);
    while (prev < end) {
        (void)atomic_load_explicit(&word, memory_order_acquire);  // the waiter's poll
        if (use_pause) _mm_pause();
        const unsigned long now = __rdtsc();
        const double us = (double)(now - prev) / ticks_per_us;
        if (us > 1.0) {
            r->gaps_1us++;
            r->lost_1us += us;
        }
        if (us > 10.0) {
            r->gaps_10us++;
            r->lost_us += us;
            r->gaps_100us += us > 100.0;
            r->gaps_1ms += us > 1000.0;
        }
        if (us > r->max_us) r->max_us = us;
        r->iterations++;
        prev = now;
    }
    struct rusage u;
    if (getrusage(RUSAGE_THREAD, &u) == 0) r->involuntary = u.ru_nivcsw;
    return NULL;
}

// Steal ticks of all CPUs (the 8th number of /proc/stat's first line), or -1.
static long long steal_ticks(void) {
    FILE* f = fopen("/proc/stat", "r");
    if (!f) return -1;
    long long v[8] = {0};
    int n = fscanf(f, "cpu %lld %lld %lld %lld %lld %lld %lld %lld", &v[0], &v[1], &v[2], &v[3],
                   &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    return n == 8 ? v[7] : -1;
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

int main(int argc, char** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: spin-gaps THREADS PAUSE(0|1) SECONDS\n");
        return 2;
    }
    const int threads = atoi(argv[1]);
    use_pause = atoi(argv[2]);
    seconds = atof(argv[3]);
    if (threads < 1 || threads > 256 || (use_pause != 0 && use_pause != 1) || !(seconds > 0.0)) {
        fprintf(stderr, "spin-gaps: THREADS 1..256, PAUSE 0 or 1, SECONDS > 0\n");
        return 2;
    }
    // The TSC's rate against the monotonic clock, over 200 ms.
    const double a = now_us();
    const unsigned long t0 = __rdtsc();
    const struct timespec nap = {0, 200000000};
    nanosleep(&nap, NULL);
    ticks_per_us = (double)(__rdtsc() - t0) / (now_us() - a);

    pthread_t* th = calloc(threads, sizeof *th);
    struct result* r = calloc(threads, sizeof *r);
    const long long steal0 = steal_ticks();
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, spin, &r[i]);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    const long long steal1 = steal_ticks();

    double lost1 = 0, lost = 0, worst = 0, max_us = 0, per_us = 0;
    unsigned long g1 = 0, g10 = 0, g100 = 0, g1ms = 0;
    long involuntary = 0;
    for (int i = 0; i < threads; i++) {
        const double pct = r[i].lost_us / (seconds * 1e4);
        lost += pct / threads;
        lost1 += r[i].lost_1us / (seconds * 1e4) / threads;
        g1 += r[i].gaps_1us;
        g10 += r[i].gaps_10us;
        if (pct > worst) worst = pct;
        if (r[i].max_us > max_us) max_us = r[i].max_us;
        g100 += r[i].gaps_100us;
        g1ms += r[i].gaps_1ms;
        involuntary += r[i].involuntary;
        per_us += r[i].iterations / (seconds * 1e6) / threads;
    }
    const double tick_ms = 1000.0 / sysconf(_SC_CLK_TCK);
    const double ts = seconds * threads;
    printf("spin-gaps threads=%d pause=%d seconds=%.1f polls/us=%.1f gaps>1us/s=%.0f lost>1us=%.2f%% "
           "gaps>10us/s=%.1f lost>10us=%.2f%% worst=%.2f%% gaps>100us/s=%.1f gaps>1ms/s=%.2f "
           "max_gap_us=%.0f involuntary=%ld steal_ms=%.0f\n",
           threads, use_pause, seconds, per_us, g1 / ts, lost1, g10 / ts, lost, worst, g100 / ts,
           g1ms / ts, max_us, involuntary,
           steal0 >= 0 && steal1 >= 0 ? (steal1 - steal0) * tick_ms : -1.0);
    free(th);
    free(r);
    return 0;
}
