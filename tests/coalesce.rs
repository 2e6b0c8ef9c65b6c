//! Cross-thread coalescing on the CPU backend: every op's result equals the result it has
//! alone, ordering per thread and per buffer holds, and dropped tickets block no one.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use multiq::kernel::{initial_value, simple_compute};
use multiq::{
    BackendKind, CoalescePolicy, Device, DeviceOptions, Inflight, Kernel, LockMode, PoolConfig,
    Stream, StreamPool, WaitPolicy,
};
use proptest::prelude::*;

fn policies() -> [CoalescePolicy; 2] {
    [
        CoalescePolicy::Fixed {
            max_batch: 8,
            max_delay: Duration::from_micros(50),
            depth: 2,
        },
        CoalescePolicy::Adaptive {
            max_batch: 16,
            max_delay: Duration::from_micros(50),
            latency_target: Duration::from_micros(500),
            depth: 1,
        },
    ]
}

/// 64 threads, each a random mix of kernels (iteration counts), buffer sizes, inflight depths
/// and one or two buffers, on its own or a shared stream; compared with serial execution.
/// A 2-unit CPU device waiting per `wait`: `block` makes the coalescer use events, `spin` and
/// `yield` its host completion signal. Both paths are tested.
fn cpu(wait: WaitPolicy) -> Device {
    Device::open(&DeviceOptions {
        backend: Some(BackendKind::Cpu),
        cpu_units: Some(2),
        wait: Some(wait),
        ..Default::default()
    })
    .unwrap()
}

const WAITS: [WaitPolicy; 3] = [WaitPolicy::Block, WaitPolicy::Yield, WaitPolicy::Spin];

/// A CPU device (`cpu(wait)`), a default pool coalescing with `policy`, and the calling
/// thread's stream of it.
fn one_coalescing_stream(policy: CoalescePolicy, wait: WaitPolicy) -> (Device, StreamPool, Stream) {
    let dev = cpu(wait);
    let pool = StreamPool::new(
        &dev,
        PoolConfig {
            coalesce: policy,
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let s = pool.current().unwrap();
    (dev, pool, s)
}

fn random_mix(seed: u64, policy: CoalescePolicy, lock: LockMode, wait: WaitPolicy) {
    let dev = cpu(wait);
    let pool = StreamPool::new(
        &dev,
        PoolConfig {
            streams: 16,
            lock,
            coalesce: policy,
        },
    )
    .unwrap();
    let start = Arc::new(Barrier::new(64));
    let handles: Vec<_> = (0..64u64)
        .map(|t| {
            let (pool, start) = (pool.clone(), start.clone());
            std::thread::spawn(move || {
                let mut rng = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(t.wrapping_mul(1442695040888963407))
                    | 1; // xorshift needs a non-zero state
                let mut next = move |m: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % m
                };
                let n = [1usize, 100, 4096, 5000][next(4) as usize];
                let s = pool.current().unwrap();
                let init = |b: usize| {
                    (0..n)
                        .map(|i| initial_value(t as usize * 2 + b, i))
                        .collect::<Vec<f32>>()
                };
                let mut bufs = [
                    pool.device().buffer_from(&init(0)).unwrap(),
                    pool.device().buffer_from(&init(1)).unwrap(),
                ];
                let mut applied = [0u32; 2];
                let mut w = Inflight::new(1 + next(4) as usize).unwrap();
                start.wait();
                for _ in 0..20 {
                    let k = 1 + next(2) as u32; // two kernels: iters 1 or 2 (not compatible)
                    let b = next(2) as usize;
                    applied[b] += k;
                    w.submit(|| s.launch(Kernel::SimpleCompute { iters: k }, &mut bufs[b]))
                        .unwrap();
                }
                w.drain().unwrap();
                for (b, buf) in bufs.iter_mut().enumerate() {
                    let out = buf.read().unwrap();
                    let want: Vec<f32> = init(b)
                        .iter()
                        .map(|v| simple_compute(*v, applied[b]))
                        .collect();
                    assert_eq!(out, want, "thread {t} buffer {b}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    pool.synchronize().unwrap();
}

#[test]
fn random_mixes_from_64_threads_equal_serial_execution() {
    for policy in policies() {
        for lock in [LockMode::PerStream, LockMode::Global] {
            // Spinning 64 threads on 2 cores is correct but slow: block and yield here, spin
            // in the smaller tests below.
            for wait in [WaitPolicy::Block, WaitPolicy::Yield] {
                random_mix(7, policy, lock, wait);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4))]
    #[test]
    fn random_mixes_hold_for_any_seed(seed in any::<u64>()) {
        random_mix(seed, policies()[0], LockMode::PerStream, WaitPolicy::Yield);
    }
}

#[test]
fn one_threads_async_ops_on_one_buffer_are_never_merged_or_reordered() {
    // Few iterations: values are still far from the fixed point, so a lost, merged (run
    // concurrently) or reordered op changes the result.
    for (policy, wait) in policies().into_iter().flat_map(|p| WAITS.map(|w| (p, w))) {
        let (dev, _pool, s) = one_coalescing_stream(policy, wait);
        let mut buf = dev.buffer_from(&[0.001; 3000]).unwrap();
        let mut w = Inflight::new(8).unwrap();
        let mut total = 0;
        for i in 0..12 {
            let k = 1 + (i % 2);
            total += k;
            w.submit(|| s.launch(Kernel::SimpleCompute { iters: k }, &mut buf))
                .unwrap();
        }
        w.drain().unwrap();
        assert!(buf
            .read()
            .unwrap()
            .iter()
            .all(|v| *v == simple_compute(0.001, total)));
    }
}

/// Stream order across the two paths of a coalescing pool: a coalesced `launch` runs on the
/// coalescer's stream, `launch_many` (and `matmul`) on the stream itself. Whichever comes
/// first on a stream completes first, even on other buffers: once the second op's ticket is
/// waited for, the first's is complete. The first op is long and the second short, so
/// without the ordering the second finishes first.
#[test]
fn coalesced_and_direct_launches_on_one_stream_keep_their_order() {
    let long = Kernel::SimpleCompute { iters: 100 };
    let short = Kernel::SimpleCompute { iters: 1 };
    for (policy, wait) in policies().into_iter().flat_map(|p| WAITS.map(|w| (p, w))) {
        let (dev, _pool, s) = one_coalescing_stream(policy, wait);
        let mut big = dev.buffer_from(&vec![0.001; 1 << 18]).unwrap();
        let mut small = dev.buffer_from(&[0.001; 64]).unwrap();
        // Coalesced, then direct.
        let first = s.launch(long, &mut big).unwrap();
        s.launch_many(short, &mut [&mut small])
            .unwrap()
            .wait()
            .unwrap();
        assert!(
            first.is_complete().unwrap(),
            "{policy:?}, {wait:?}: a direct launch ran before the coalesced op ahead of it"
        );
        first.wait().unwrap();
        // Direct, then coalesced (on a fresh buffer: one last used on the stream would be
        // waited for anyway, as it moves to the coalescer's stream).
        let mut fresh = dev.buffer_from(&[0.001; 64]).unwrap();
        let first = s.launch_many(long, &mut [&mut big]).unwrap();
        s.launch(short, &mut fresh).unwrap().wait().unwrap();
        assert!(
            first.is_complete().unwrap(),
            "{policy:?}, {wait:?}: a coalesced op ran before the direct launch ahead of it"
        );
        first.wait().unwrap();
        let expect = simple_compute(0.001, 200);
        assert!(big.read().unwrap().iter().all(|v| *v == expect));
        assert!(small
            .read()
            .unwrap()
            .iter()
            .all(|v| *v == simple_compute(0.001, 1)));
        assert!(fresh
            .read()
            .unwrap()
            .iter()
            .all(|v| *v == simple_compute(0.001, 1)));
    }
}

/// Adaptive coalescing with one thread: batches never form (one thread's ops are never
/// merged), so after a window the ops launch alone on the thread's stream, and after each
/// phase of that the coalescer is tried again. Every op is counted once (grouped or alone)
/// and every result equals serial execution across the switches.
#[test]
fn adaptive_launches_alone_where_batches_do_not_form_and_tries_again() {
    for wait in WAITS {
        let (dev, pool, s) = one_coalescing_stream(policies()[1], wait);
        let mut bufs = [
            dev.buffer_from(&[0.001; 64]).unwrap(),
            dev.buffer_from(&[0.002; 64]).unwrap(),
        ];
        let mut applied = [0u32; 2];
        let mut w = Inflight::new(3).unwrap();
        let started = std::time::Instant::now();
        let mut submitted = 0u64;
        // Until an alone phase ended and a second window of batches ran after it.
        loop {
            let stats = pool.coalesce_stats().unwrap();
            if stats.direct >= 64 && stats.launches >= 64 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{wait:?}: no alone phase and coalescing after it: {stats:?}"
            );
            let b = (submitted % 2) as usize;
            let k = 1 + (submitted % 3) as u32;
            applied[b] += k;
            w.submit(|| s.launch(Kernel::SimpleCompute { iters: k }, &mut bufs[b]))
                .unwrap();
            submitted += 1;
        }
        w.drain().unwrap();
        let stats = pool.coalesce_stats().unwrap();
        assert_eq!(stats.ops + stats.direct, submitted, "{wait:?}: {stats:?}");
        for (b, buf) in bufs.iter_mut().enumerate() {
            let want = simple_compute([0.001, 0.002][b], applied[b]);
            assert!(
                buf.read().unwrap().iter().all(|v| *v == want),
                "{wait:?}: buffer {b}"
            );
        }
    }
}

/// Adaptive coalescing under a latency target no batch meets: the pool switches between
/// launching alone and batches (at least once: it starts alone) while 16 threads have up to 4
/// ops each in flight on two buffers. Every op is counted once and every result equals serial
/// execution.
#[test]
fn adaptive_switches_under_load_keep_every_result() {
    let dev = cpu(WaitPolicy::Yield);
    let pool = StreamPool::new(
        &dev,
        PoolConfig {
            streams: 16,
            lock: LockMode::PerStream,
            coalesce: CoalescePolicy::Adaptive {
                max_batch: 16,
                max_delay: Duration::from_micros(50),
                latency_target: Duration::from_nanos(1),
                depth: 2,
            },
        },
    )
    .unwrap();
    let start = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16usize)
        .map(|t| {
            let (pool, start) = (pool.clone(), start.clone());
            std::thread::spawn(move || {
                let s = pool.current().unwrap();
                let init = |b: usize| vec![initial_value(t * 2 + b, 0); 256];
                let mut bufs = [
                    pool.device().buffer_from(&init(0)).unwrap(),
                    pool.device().buffer_from(&init(1)).unwrap(),
                ];
                let mut applied = [0u32; 2];
                let mut w = Inflight::new(4).unwrap();
                start.wait();
                for i in 0..600usize {
                    let (b, k) = ((i / 3) % 2, 1 + (i % 2) as u32);
                    applied[b] += k;
                    w.submit(|| s.launch(Kernel::SimpleCompute { iters: k }, &mut bufs[b]))
                        .unwrap();
                }
                w.drain().unwrap();
                for (b, buf) in bufs.iter_mut().enumerate() {
                    let want = simple_compute(initial_value(t * 2 + b, 0), applied[b]);
                    assert!(
                        buf.read().unwrap().iter().all(|v| *v == want),
                        "thread {t} buffer {b}"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let stats = pool.coalesce_stats().unwrap();
    assert_eq!(stats.ops + stats.direct, 16 * 600, "{stats:?}");
    assert!(
        stats.direct > 0 && stats.launches > 0,
        "both paths should have run: {stats:?}"
    );
}

#[test]
fn dropped_tickets_leak_nothing_and_block_no_one() {
    for wait in WAITS {
        dropped_tickets_with(wait);
    }
}

fn dropped_tickets_with(wait: WaitPolicy) {
    let dev = cpu(wait);
    let pool = StreamPool::new(
        &dev,
        PoolConfig {
            coalesce: policies()[0],
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let completion = if wait == WaitPolicy::Block {
        "event"
    } else {
        "signal"
    };
    assert_eq!(pool.coalesce_completion(), Some(completion));
    let s = pool.current().unwrap();
    let mut a = dev.buffer_from(&[0.5; 100]).unwrap();
    let mut b = dev.buffer_from(&[0.25; 100]).unwrap();
    drop(
        s.launch(Kernel::SimpleCompute { iters: 1 }, &mut a)
            .unwrap(),
    );
    // Another thread's op still completes, and reading `a` sees its op applied.
    let p2 = pool.clone();
    std::thread::spawn(move || {
        p2.current()
            .unwrap()
            .launch(Kernel::SimpleCompute { iters: 1 }, &mut b)
            .unwrap()
            .wait()
            .unwrap();
        assert!(b
            .read()
            .unwrap()
            .iter()
            .all(|v| *v == simple_compute(0.25, 1)));
    })
    .join()
    .unwrap();
    assert!(a
        .read()
        .unwrap()
        .iter()
        .all(|v| *v == simple_compute(0.5, 1)));
    // Dropping a buffer whose op is still pending is safe too.
    let mut c = dev.buffer_from(&[0.5; 100]).unwrap();
    drop(
        s.launch(Kernel::SimpleCompute { iters: 1 }, &mut c)
            .unwrap(),
    );
    drop(c);
    pool.synchronize().unwrap();
    assert_eq!(
        s.stats().events_created,
        0,
        "coalesced ops use the coalescer's events"
    );
}

#[test]
fn lock_none_still_refuses_non_owners_when_coalescing() {
    let dev = Device::cpu(2).unwrap();
    let config = PoolConfig {
        lock: LockMode::None,
        coalesce: policies()[0],
        ..PoolConfig::default()
    };
    let pool = StreamPool::new(&dev, config).unwrap();
    let mine = pool.current().unwrap();
    let mut buf = dev.alloc(4).unwrap();
    let refused = std::thread::spawn(move || {
        mine.launch(Kernel::SimpleCompute { iters: 1 }, &mut buf)
            .map(|_| ())
    })
    .join()
    .unwrap();
    assert!(matches!(
        refused,
        Err(multiq::Error::ExclusiveStreamRequired(_))
    ));
}

/// `persistent` on a backend without a device queue (the CPU) coalesces on the host as
/// `PERSISTENT_FALLBACK`, and its results are still exact.
#[test]
fn persistent_falls_back_to_host_coalescing_on_the_cpu() {
    let dev = cpu(WaitPolicy::Yield);
    let pool = StreamPool::new(
        &dev,
        PoolConfig {
            coalesce: CoalescePolicy::Persistent,
            ..PoolConfig::default()
        },
    )
    .unwrap();
    assert_eq!(pool.coalesce_completion(), Some("signal"));
    assert_eq!(CoalescePolicy::Persistent.name(), "persistent");
    let handles: Vec<_> = (0..8usize)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let init: Vec<f32> = (0..100).map(|i| initial_value(t, i)).collect();
                let mut buf = pool.device().buffer_from(&init).unwrap();
                let s = pool.current().unwrap();
                for _ in 0..20 {
                    s.launch(Kernel::SimpleCompute { iters: 3 }, &mut buf)
                        .unwrap()
                        .wait()
                        .unwrap();
                }
                let want: Vec<f32> = init.iter().map(|&v| simple_compute(v, 60)).collect();
                assert_eq!(buf.read().unwrap(), want, "thread {t}");
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(pool.coalesce_stats().unwrap().ops, 8 * 20);
}

/// Event mode (wait `block`): batches launched beyond `depth` by a flush, whose tickets were
/// all dropped, are still found complete, so a later waiter is not left sleeping. (Found by
/// `multiq stress`.)
/// A one-unit CPU device waiting by `block` (so the coalescer completes batches by events),
/// and a pool of [`one_batch_at_a_time`].
fn one_unit_in_event_mode(max_delay: Duration) -> (Device, StreamPool) {
    let dev = Device::open(&DeviceOptions {
        backend: Some(BackendKind::Cpu),
        cpu_units: Some(1),
        wait: Some(WaitPolicy::Block),
        ..Default::default()
    })
    .unwrap();
    let pool = StreamPool::new(&dev, one_batch_at_a_time(max_delay)).unwrap();
    assert_eq!(pool.coalesce_completion(), Some("event"));
    (dev, pool)
}

/// Two streams coalescing up to 8 ops, one batch on the device at a time.
fn one_batch_at_a_time(max_delay: Duration) -> PoolConfig {
    PoolConfig {
        streams: 2,
        lock: LockMode::PerStream,
        coalesce: CoalescePolicy::Fixed {
            max_batch: 8,
            max_delay,
            depth: 1,
        },
    }
}

#[test]
fn event_mode_reaps_batches_nobody_waits_for() {
    let (dev, pool) = one_unit_in_event_mode(Duration::from_micros(20));
    let s = pool.current().unwrap();
    let (mut x, mut y, mut z) = (
        dev.alloc(1 << 16).unwrap(),
        dev.alloc(16).unwrap(),
        dev.alloc(16).unwrap(),
    );
    // Launched at once, and long.
    drop(
        s.launch(Kernel::SimpleCompute { iters: 300 }, &mut x)
            .unwrap(),
    );
    // Pending; the read flushes it: a second batch on the device although depth is 1.
    drop(
        s.launch(Kernel::SimpleCompute { iters: 1 }, &mut y)
            .unwrap(),
    );
    y.read().unwrap();
    let t = s
        .launch(Kernel::SimpleCompute { iters: 1 }, &mut z)
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(t.wait()).unwrap());
    let r = rx.recv_timeout(Duration::from_secs(10));
    assert!(
        matches!(r, Ok(Ok(()))),
        "the wait on a coalesced op hung: {r:?}"
    );
}

/// A `block` waiter whose batch waits for room on the device notices that the device drained
/// although nobody waits on the batch that filled it (its tickets are held, not waited): it
/// does not sleep to its batch's deadline, an hour here.
#[test]
fn a_sleeping_waiter_sees_the_device_drain_without_a_wake_up() {
    let (dev, pool) = one_unit_in_event_mode(multiq::runtime::MAX_COALESCE_DELAY);
    let s = pool.current().unwrap();
    let (mut x, mut x2) = (dev.alloc(1 << 16).unwrap(), dev.alloc(1 << 16).unwrap());
    // Launched at once (the device is idle), then pending behind it; both held, not waited.
    let held = [
        s.launch(Kernel::SimpleCompute { iters: 100 }, &mut x)
            .unwrap(),
        s.launch(Kernel::SimpleCompute { iters: 1 }, &mut x2)
            .unwrap(),
    ];
    let (tx, rx) = std::sync::mpsc::channel();
    let other = pool.clone();
    let dev2 = dev.clone();
    std::thread::spawn(move || {
        let s = other.current().unwrap();
        let mut z = dev2.alloc(16).unwrap();
        let t = s
            .launch(Kernel::SimpleCompute { iters: 1 }, &mut z)
            .unwrap();
        tx.send(t.wait()).unwrap();
    });
    let r = rx.recv_timeout(Duration::from_secs(30));
    assert!(
        matches!(r, Ok(Ok(()))),
        "the waiter slept towards its batch's deadline: {r:?}"
    );
    drop(held);
}

#[test]
fn a_max_delay_past_the_limit_is_refused() {
    let dev = cpu(WaitPolicy::Block);
    for max_delay in [
        Duration::MAX,
        multiq::runtime::MAX_COALESCE_DELAY + Duration::from_nanos(1),
    ] {
        let made = StreamPool::new(&dev, one_batch_at_a_time(max_delay));
        let e = made.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains("max delay must be at most 3600 s"),
            "{max_delay:?}: {e}"
        );
    }
}
