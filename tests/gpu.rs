//! CUDA backend tests. They run with the normal test command on a GPU machine; where no CUDA
//! device can be opened they pass after printing why they skipped (straight to stderr, so the
//! notice shows even when the test harness captures output).

use std::io::Write;
use std::sync::{Arc, Barrier};

use multiq::bench::queues::verify_buffer;
use multiq::kernel::initial_value;
use multiq::{
    BackendKind, CoalescePolicy, Device, DeviceOptions, Error, Inflight, Kernel, LockMode,
    PoolConfig, StreamPool, WaitPolicy,
};

fn cuda(test: &str) -> Option<Device> {
    let opts = DeviceOptions {
        backend: Some(BackendKind::Cuda),
        ..Default::default()
    };
    match Device::open(&opts) {
        Ok(d) => Some(d),
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED gpu::{test}: no CUDA device ({e})"
            );
            None
        }
    }
}

fn tolerance() -> f32 {
    multiq::backend::cuda::SIMPLE_COMPUTE_TOLERANCE
}

/// Held by every test that keeps a device queue busy for long: a queue's kernel fills the
/// device, so another busy queue's kernel waits for it to leave (it leaves when idle), and
/// tests with deadlines would measure each other. (A test that failed while holding it
/// poisons it; the others go on.)
fn device_queue_tests() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `persistent` pool of 16 streams, lock per stream.
fn persistent_pool_of_16(dev: &Device) -> StreamPool {
    StreamPool::new(
        dev,
        PoolConfig {
            streams: 16,
            lock: LockMode::PerStream,
            coalesce: CoalescePolicy::Persistent,
        },
    )
    .unwrap()
}

/// 16 threads keeping 8 ops each in flight through a `persistent` pool until stopped: every op
/// finds the pool's other streams loaded, so all go through its device queue, whose kernel
/// never runs out of work (so never leaves the device) while they run.
struct BusyQueue {
    pool: StreamPool,
    stop: Arc<std::sync::atomic::AtomicBool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl BusyQueue {
    /// Starts the threads; returns once 20,000 ops went through the queue (or 30 s passed).
    fn start(dev: &Device) -> BusyQueue {
        use std::sync::atomic::Ordering;
        let pool = persistent_pool_of_16(dev);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers = (0..16)
            .map(|_| {
                let (pool, stop) = (pool.clone(), stop.clone());
                std::thread::spawn(move || {
                    let kernel = Kernel::SimpleCompute { iters: 10 };
                    let s = pool.current().unwrap();
                    let mut b = pool.device().buffer_from(&vec![0.25f32; 65_536]).unwrap();
                    let mut w = Inflight::new(8).unwrap();
                    while !stop.load(Ordering::Acquire) {
                        w.submit(|| s.launch(kernel, &mut b)).unwrap();
                    }
                    w.drain().unwrap();
                })
            })
            .collect();
        let busy = BusyQueue {
            pool,
            stop,
            workers,
        };
        let warm = std::time::Instant::now();
        while busy.queued() < 20_000 && warm.elapsed() < std::time::Duration::from_secs(30) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        busy
    }

    /// Ops published to the queue so far.
    fn queued(&self) -> u64 {
        self.pool.coalesce_stats().map_or(0, |s| s.ops)
    }

    /// Stops the threads and joins them, within 30 s: past that (an op of theirs never
    /// completes) it panics instead of joining, so the test ends either way.
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let (tx, rx) = std::sync::mpsc::channel();
        let workers = self.workers;
        std::thread::spawn(move || {
            let joined: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
            let _ = tx.send(joined);
        });
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(joined) => {
                for j in joined {
                    if let Err(panic) = j {
                        std::panic::resume_unwind(panic);
                    }
                }
            }
            Err(_) => panic!("the busy queue's threads did not finish their ops within 30 s"),
        }
    }
}

/// 16 threads on `pool`, each with its own stream (`pool.current()`) and a buffer of `n`
/// elements seeded for it (`initial_value(thread, i)`), released together; even threads keep
/// 8 ops in flight, odd ones wait for each. Each runs `ops` launches of `kernel`; returns each
/// thread's buffer contents and its stream's events created.
fn sixteen_threads(
    pool: &StreamPool,
    n: usize,
    ops: usize,
    kernel: Kernel,
) -> Vec<(Vec<f32>, u64)> {
    let start = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|t| {
            let (pool, start) = (pool.clone(), start.clone());
            std::thread::spawn(move || {
                let s = pool.current().unwrap();
                let init: Vec<f32> = (0..n).map(|i| initial_value(t, i)).collect();
                let mut buf = pool.device().buffer_from(&init).unwrap();
                start.wait();
                let mut w = Inflight::new(if t % 2 == 0 { 8 } else { 1 }).unwrap();
                for _ in 0..ops {
                    w.submit(|| s.launch(kernel, &mut buf)).unwrap();
                }
                w.drain().unwrap();
                (buf.read().unwrap(), s.stats().events_created)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn simple_compute_matches_the_host_reference() {
    let Some(dev) = cuda("simple_compute_matches_the_host_reference") else {
        return;
    };
    let pool = StreamPool::new(&dev, PoolConfig::default()).unwrap();
    for (n, k, ops) in [
        (1usize, 3u32, 1usize),
        (257, 10, 3),
        (65_536, 10, 5),
        (1 << 20, 100, 2),
    ] {
        let init: Vec<f32> = (0..n).map(|i| initial_value(5, i)).collect();
        let mut buf = dev.buffer_from(&init).unwrap();
        let s = pool.current().unwrap();
        for _ in 0..ops {
            s.launch(Kernel::SimpleCompute { iters: k }, &mut buf)
                .unwrap()
                .wait()
                .unwrap();
        }
        let out = buf.read().unwrap();
        // verify_buffer expects the warm-up convention of the bench: (ops) applications here.
        let v = verify_buffer(5, &out, ops as u64 * k as u64, tolerance());
        assert_eq!(
            v.first_mismatch, None,
            "n={n} k={k}: max error {}",
            v.max_abs_error
        );
        assert!(
            out.iter().all(|x| x.is_finite()),
            "every element written and finite"
        );
    }
}

#[test]
fn sixteen_threads_each_lock_mode_and_inflight() {
    let Some(dev) = cuda("sixteen_threads_each_lock_mode_and_inflight") else {
        return;
    };
    for lock in [LockMode::None, LockMode::PerStream, LockMode::Global] {
        let pool = StreamPool::new(
            &dev,
            PoolConfig {
                streams: 32,
                lock,
                ..PoolConfig::default()
            },
        )
        .unwrap();
        let results = sixteen_threads(&pool, 65_536, 200, Kernel::SimpleCompute { iters: 10 });
        for (t, (out, events)) in results.iter().enumerate() {
            let v = verify_buffer(t, out, 2000, tolerance());
            assert_eq!(v.first_mismatch, None, "{lock}");
            assert!(*events <= 9, "{lock}: events are pooled ({events} created)");
        }
    }
}

#[test]
fn out_of_memory_reaches_only_the_thread_that_caused_it() {
    let Some(dev) = cuda("out_of_memory_reaches_only_the_thread_that_caused_it") else {
        return;
    };
    let pool = StreamPool::new(&dev, PoolConfig::default()).unwrap();
    let free = dev.memory_available().unwrap_or(1 << 40);
    let too_many = ((free / 4) as usize)
        .saturating_mul(2)
        .min(u32::MAX as usize);
    let p2 = pool.clone();
    let greedy = std::thread::spawn(move || {
        let r = p2.device().alloc(too_many).map(|_| ());
        // The same thread keeps working after its own failure.
        let mut small = p2.device().buffer_from(&[0.5; 1024]).unwrap();
        p2.current()
            .unwrap()
            .launch(Kernel::SimpleCompute { iters: 1 }, &mut small)
            .unwrap()
            .wait()
            .unwrap();
        r
    });
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let mut buf = pool
                    .device()
                    .buffer_from(&[initial_value(t, 0); 4096])
                    .unwrap();
                let s = pool.current().unwrap();
                for _ in 0..100 {
                    s.launch(Kernel::SimpleCompute { iters: 5 }, &mut buf)
                        .unwrap()
                        .wait()
                        .unwrap();
                }
            })
        })
        .collect();
    let r = greedy.join().unwrap();
    if too_many < u32::MAX as usize {
        assert!(matches!(r, Err(Error::OutOfMemory { .. })), "{r:?}");
    }
    for w in workers {
        w.join().unwrap();
    }
    pool.synchronize().unwrap();
}

#[test]
fn kernel_index_overflow_is_rejected_before_launch() {
    let Some(dev) = cuda("kernel_index_overflow_is_rejected_before_launch") else {
        return;
    };
    let err = dev.alloc(u32::MAX as usize + 1).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

#[test]
fn dropping_buffers_and_tickets_with_work_in_flight_is_safe() {
    let Some(dev) = cuda("dropping_buffers_and_tickets_with_work_in_flight_is_safe") else {
        return;
    };
    let pool = StreamPool::new(
        &dev,
        PoolConfig {
            streams: 4,
            lock: LockMode::PerStream,
            ..PoolConfig::default()
        },
    )
    .unwrap();
    for round in 0..50 {
        let mut buf = dev.buffer_from(&vec![0.3; 1 << 16]).unwrap();
        let a = pool.acquire(round % 4).unwrap();
        let b = pool.acquire((round + 1) % 4).unwrap();
        for i in 0..6 {
            let s = if i % 2 == 0 { &a } else { &b };
            drop(
                s.launch(Kernel::SimpleCompute { iters: 50 }, &mut buf)
                    .unwrap(),
            );
        }
        if round % 2 == 0 {
            let out = buf.read().unwrap();
            let expect = multiq::kernel::simple_compute(0.3, 300);
            assert!(out.iter().all(|v| (v - expect).abs() <= tolerance()));
        }
        drop(buf); // freed in stream order while kernels may still run
    }
    dev.synchronize().unwrap();
}

#[test]
fn grouped_launches_are_bit_identical_to_single_launches() {
    let Some(dev) = cuda("grouped_launches_are_bit_identical_to_single_launches") else {
        return;
    };
    let pool = StreamPool::new(&dev, PoolConfig::default()).unwrap();
    let s = pool.current().unwrap();
    let k = Kernel::SimpleCompute { iters: 7 };
    // 300 buffers (three grouped launches of at most 128), sizes not multiples of 256.
    let sizes: Vec<usize> = (0..300).map(|i| 1 + (i * 7919) % 70_000).collect();
    let init = |t: usize, n: usize| (0..n).map(|i| initial_value(t, i)).collect::<Vec<f32>>();
    let mut grouped: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(t, &n)| dev.buffer_from(&init(t, n)).unwrap())
        .collect();
    let mut alone: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(t, &n)| dev.buffer_from(&init(t, n)).unwrap())
        .collect();
    {
        let mut refs: Vec<&mut multiq::Buffer> = grouped.iter_mut().collect();
        s.launch_many(k, &mut refs).unwrap().wait().unwrap();
    }
    for b in alone.iter_mut() {
        s.launch(k, b).unwrap().wait().unwrap();
    }
    for (t, (g, a)) in grouped.iter_mut().zip(alone.iter_mut()).enumerate() {
        let (g, a) = (g.read().unwrap(), a.read().unwrap());
        assert_eq!(g, a, "buffer {t} of {} elements", sizes[t]);
        assert_eq!(verify_buffer(t, &g, 7, tolerance()).first_mismatch, None);
    }
}

/// 16 threads, coalescing on (host-signal completion with spin/yield, events with block),
/// each a mix of kernels and inflight depths over two buffers: every buffer equals the same
/// ops launched one by one, bit for bit.
#[test]
fn coalesced_ops_are_bit_identical_to_single_launches() {
    let test = "coalesced_ops_are_bit_identical_to_single_launches";
    let Some(probe) = cuda(test) else {
        return;
    };
    drop(probe);
    for wait in [WaitPolicy::Spin, WaitPolicy::Yield, WaitPolicy::Block] {
        let dev = Device::open(&DeviceOptions {
            backend: Some(BackendKind::Cuda),
            wait: Some(wait),
            ..Default::default()
        })
        .unwrap();
        let policy = CoalescePolicy::Fixed {
            max_batch: 16,
            max_delay: std::time::Duration::from_micros(20),
            depth: 2,
        };
        let pool = StreamPool::new(
            &dev,
            PoolConfig {
                lock: LockMode::PerStream,
                coalesce: policy,
                ..PoolConfig::default()
            },
        )
        .unwrap();
        let want = if wait == WaitPolicy::Block {
            "event"
        } else {
            "signal"
        };
        assert_eq!(pool.coalesce_completion(), Some(want), "{wait}");
        let start = Arc::new(Barrier::new(16));
        let handles: Vec<_> = (0..16usize)
            .map(|t| {
                let (pool, start) = (pool.clone(), start.clone());
                std::thread::spawn(move || {
                    let dev = pool.device().clone();
                    let n = [1usize, 255, 4097, 65_536][t % 4];
                    let init = |b: usize| {
                        (0..n)
                            .map(|i| initial_value(t * 2 + b, i))
                            .collect::<Vec<f32>>()
                    };
                    let mut bufs = [
                        dev.buffer_from(&init(0)).unwrap(),
                        dev.buffer_from(&init(1)).unwrap(),
                    ];
                    let mut plan = Vec::new();
                    let s = pool.current().unwrap();
                    let mut w = Inflight::new(1 + t % 4).unwrap();
                    start.wait();
                    for i in 0..200 {
                        let (k, b) = (1 + ((i * 7 + t) % 3) as u32, (i + t) % 2);
                        plan.push((k, b));
                        w.submit(|| s.launch(Kernel::SimpleCompute { iters: k }, &mut bufs[b]))
                            .unwrap();
                    }
                    w.drain().unwrap();
                    // The same ops, one launch each, on a non-coalescing pool.
                    let single = StreamPool::new(&dev, PoolConfig::default()).unwrap();
                    let s1 = single.current().unwrap();
                    let mut alone = [
                        dev.buffer_from(&init(0)).unwrap(),
                        dev.buffer_from(&init(1)).unwrap(),
                    ];
                    for (k, b) in plan {
                        s1.launch(Kernel::SimpleCompute { iters: k }, &mut alone[b])
                            .unwrap()
                            .wait()
                            .unwrap();
                    }
                    for b in 0..2 {
                        assert_eq!(
                            bufs[b].read().unwrap(),
                            alone[b].read().unwrap(),
                            "thread {t} buffer {b} ({wait})"
                        );
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let stats = pool.coalesce_stats().unwrap();
        let (launches, ops) = (stats.launches, stats.ops);
        assert_eq!(ops, 16 * 200, "{wait}: every op launched exactly once");
        assert!(
            launches < ops,
            "{wait}: {launches} launches for {ops} ops: nothing merged"
        );
    }
}

/// The device queue (coalescing `persistent`): 16 threads on 4 shared streams, each a mix of
/// kernels, inflight depths and dropped tickets over two buffers, with pauses long enough for
/// the queue's kernel to leave the idle device and be relaunched. Every buffer equals the same
/// ops launched one by one, bit for bit; the pool's stream order holds (each stream's ops form
/// one chain), and buffers read back, dropped and reused across pools stay correct.
#[test]
fn device_queue_ops_are_bit_identical_to_single_launches() {
    let _serial = device_queue_tests();
    let test = "device_queue_ops_are_bit_identical_to_single_launches";
    let Some(probe) = cuda(test) else {
        return;
    };
    drop(probe);
    for wait in [WaitPolicy::Spin, WaitPolicy::Yield] {
        let dev = Device::open(&DeviceOptions {
            backend: Some(BackendKind::Cuda),
            wait: Some(wait),
            ..Default::default()
        })
        .unwrap();
        let pool = StreamPool::new(
            &dev,
            PoolConfig {
                streams: 4,
                lock: LockMode::PerStream,
                coalesce: CoalescePolicy::Persistent,
            },
        )
        .unwrap();
        assert_eq!(pool.coalesce_completion(), Some("device-queue"));
        let sizes = [1usize, 255, 1024, 1025, 65_536, 1 << 20];
        let init = |t: usize, b: usize, n: usize| {
            (0..n)
                .map(|i| initial_value(t * 2 + b, i))
                .collect::<Vec<f32>>()
        };
        let start = Arc::new(Barrier::new(16));
        let handles: Vec<_> = (0..16usize)
            .map(|t| {
                let (pool, start) = (pool.clone(), start.clone());
                std::thread::spawn(move || {
                    let dev = pool.device().clone();
                    let n = sizes[t % sizes.len()];
                    let mut bufs = [
                        dev.buffer_from(&init(t, 0, n)).unwrap(),
                        dev.buffer_from(&init(t, 1, n)).unwrap(),
                    ];
                    let mut plan = Vec::new();
                    let s = pool.current().unwrap();
                    let mut w = Inflight::new(1 + t % 4).unwrap();
                    start.wait();
                    for i in 0..300 {
                        let (k, b) = (1 + ((i * 7 + t) % 5) as u32, (i + t) % 2);
                        plan.push((k, b));
                        if i % 11 == 5 {
                            // Fire and forget: the buffer still orders the next op after it.
                            drop(s.launch(Kernel::SimpleCompute { iters: k }, &mut bufs[b]));
                        } else {
                            w.submit(|| s.launch(Kernel::SimpleCompute { iters: k }, &mut bufs[b]))
                                .unwrap();
                        }
                        if i % 100 == 99 {
                            w.drain().unwrap();
                            // Longer than the queue's idle exit: the next op relaunches it.
                            std::thread::sleep(std::time::Duration::from_millis(3));
                        }
                    }
                    w.drain().unwrap();
                    let out = [bufs[0].read().unwrap(), bufs[1].read().unwrap()];
                    (plan, out)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        pool.synchronize().unwrap();
        let stats = pool.coalesce_stats().unwrap();
        assert_eq!(
            stats.ops + stats.direct,
            16 * 300,
            "{wait}: every op published or launched alone, once"
        );
        // 1 << 20 elements fill the device: those ops are launched alone; the others went to
        // the queue whenever enough ops were in flight.
        assert!(
            stats.ops > 0 && stats.direct >= 2 * 300,
            "{wait}: {stats:?}"
        );
        // An idle queue leaves the device; the next queued op brings its kernel back. With
        // fewer than QUEUE_MIN_LOAD ops of other streams in flight ops are launched alone
        // (a stream's own ops never count), so QUEUE_MIN_LOAD ops on stream 1 go to that
        // stream, however many are in flight, and the next one, on stream 0, to the queue.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let (s0, s1) = (pool.acquire(0).unwrap(), pool.acquire(1).unwrap());
        let mut extras: Vec<_> = (0..=multiq::QUEUE_MIN_LOAD)
            .map(|e| dev.buffer_from(&init(99, e, 4096)).unwrap())
            .collect();
        let tickets: Vec<_> = extras
            .iter_mut()
            .enumerate()
            .map(|(e, b)| {
                let s = if e < multiq::QUEUE_MIN_LOAD { &s1 } else { &s0 };
                s.launch(Kernel::SimpleCompute { iters: 3 }, b).unwrap()
            })
            .collect();
        for t in tickets {
            t.wait().unwrap();
        }
        for (e, b) in extras.iter_mut().enumerate() {
            let v = verify_buffer(198 + e, &b.read().unwrap(), 3, tolerance());
            assert_eq!(v.first_mismatch, None, "{wait}: op {e} around a relaunch");
        }
        let after = pool.coalesce_stats().unwrap();
        assert_eq!(
            after.launches,
            stats.launches + 1,
            "{wait}: one relaunch after the idle exit"
        );
        assert_eq!(after.direct, stats.direct + multiq::QUEUE_MIN_LOAD as u64);
        assert_eq!(after.ops, stats.ops + 1);
        // Every kernel followed by another launch recorded why it left (idle, asked for the
        // device, or its slice: which one depends on timing), counted at that launch.
        for s in [&stats, &after] {
            let left = s.queue_exits.map(|e| e.idle + e.asked + e.slice + e.stop);
            assert_eq!(left, Some(s.launches - 1), "{wait}: exits counted: {s:?}");
        }
        drop(pool);
        // The same ops, one launch each, on an ordinary pool.
        let single = StreamPool::new(&dev, PoolConfig::default()).unwrap();
        let s1 = single.current().unwrap();
        for (t, (plan, out)) in results.into_iter().enumerate() {
            let n = sizes[t % sizes.len()];
            let mut alone = [
                dev.buffer_from(&init(t, 0, n)).unwrap(),
                dev.buffer_from(&init(t, 1, n)).unwrap(),
            ];
            for (k, b) in plan {
                s1.launch(Kernel::SimpleCompute { iters: k }, &mut alone[b])
                    .unwrap()
                    .wait()
                    .unwrap();
            }
            for b in 0..2 {
                assert!(
                    out[b] == alone[b].read().unwrap(),
                    "thread {t} buffer {b} ({wait}, {n} elements)"
                );
            }
        }
    }
}

/// Dropping the pool, tickets and buffers with device-queue ops in flight neither hangs nor
/// loses an op: buffers read afterwards hold every op's result.
#[test]
fn device_queue_drops_with_ops_in_flight() {
    let _serial = device_queue_tests();
    let Some(dev) = cuda("device_queue_drops_with_ops_in_flight") else {
        return;
    };
    let n = 65_536;
    let init: Vec<f32> = (0..n).map(|i| initial_value(3, i)).collect();
    let mut kept = dev.buffer_from(&init).unwrap();
    {
        let pool = StreamPool::new(
            &dev,
            PoolConfig {
                coalesce: CoalescePolicy::Persistent,
                ..PoolConfig::default()
            },
        )
        .unwrap();
        let s = pool.current().unwrap();
        for _ in 0..50 {
            let mut gone = dev.buffer_from(&init).unwrap();
            drop(s.launch(Kernel::SimpleCompute { iters: 10 }, &mut gone));
            drop(s.launch(Kernel::SimpleCompute { iters: 10 }, &mut kept));
            drop(gone);
        }
        drop(s);
        drop(pool);
    }
    let out = kept.read().unwrap();
    let v = verify_buffer(3, &out, 500, tolerance());
    assert_eq!(v.first_mismatch, None);
    // The buffer moves on to an ordinary pool and back.
    let plain = StreamPool::new(&dev, PoolConfig::default()).unwrap();
    plain
        .current()
        .unwrap()
        .launch(Kernel::SimpleCompute { iters: 10 }, &mut kept)
        .unwrap()
        .wait()
        .unwrap();
    let v = verify_buffer(3, &kept.read().unwrap(), 510, tolerance());
    assert_eq!(v.first_mismatch, None);
}

/// While threads keep the device queue busy (its kernel never goes idle, and holds every
/// block slot the occupancy calculator allows), an ordinary launch on another pool still
/// runs and gives the right result, instead of waiting until the busy threads stop.
#[test]
fn ordinary_launches_run_while_the_device_queue_is_busy() {
    use std::time::{Duration, Instant};
    let _serial = device_queue_tests();
    let Some(dev) = cuda("ordinary_launches_run_while_the_device_queue_is_busy") else {
        return;
    };
    let busy = BusyQueue::start(&dev);
    let plain = StreamPool::new(&dev, PoolConfig::default()).unwrap();
    let init: Vec<f32> = (0..1 << 20).map(|i| initial_value(5, i)).collect();
    let mut buf = dev.buffer_from(&init).unwrap();
    let before = busy.queued();
    let (tx, rx) = std::sync::mpsc::channel();
    // One launch waited for, then 200 with 8 in flight on one stream (kernels queued behind
    // kernels, which can start only once the one before them finished).
    let waiter = std::thread::spawn(move || {
        let s = plain.current().unwrap();
        let kernel = Kernel::SimpleCompute { iters: 20 };
        let t = Instant::now();
        let one = s.launch(kernel, &mut buf).and_then(|t| t.wait());
        let one_took = t.elapsed();
        let t = Instant::now();
        let mut w = Inflight::new(8).unwrap();
        let many = one.and_then(|()| {
            for _ in 0..200 {
                w.submit(|| s.launch(kernel, &mut buf))?;
            }
            w.drain()
        });
        tx.send((one_took, t.elapsed())).unwrap();
        many.map(|()| buf)
    });
    let took = rx.recv_timeout(Duration::from_secs(30));
    let during = busy.queued() - before;
    busy.stop();
    // Not joined before this: a launch that never completes must fail the test, not hang it.
    let (one, many) = took.unwrap_or_else(|_| {
        panic!(
            "201 ordinary launches did not finish in 30 s while the queue was busy \
             ({during} queued ops ran meanwhile)"
        )
    });
    let mut buf = waiter.join().unwrap().unwrap();
    eprintln!(
        "gpu: beside a busy device queue ({during} queued ops meanwhile): one ordinary launch \
         in {one:?}, 200 more with 8 in flight in {many:?}"
    );
    assert!(
        during > 0,
        "the queue ran nothing meanwhile: it was not busy"
    );
    // The queue leaves for each launch after at most a few hundred microseconds of running;
    // were it only its 50 ms slice that let them in, one launch would take about 50 ms and
    // the 200 about 10 s.
    assert!(
        one < Duration::from_millis(20),
        "one ordinary launch took {one:?}"
    );
    assert!(
        many < Duration::from_secs(2),
        "200 ordinary launches took {many:?}"
    );
    let v = verify_buffer(5, &buf.read().unwrap(), 201 * 20, tolerance());
    assert_eq!(v.first_mismatch, None);
}

/// Device-queue ops that follow one another on one buffer, 8 in flight per thread (the
/// benchmark's `--async --inflight 8`), with the device queue's chaining off and on: on, the
/// device runs most of them chained to the op before (each chunk right after the same chunk of
/// that op), the rest queued behind it. Either way every buffer equals the same ops launched
/// one by one, bit for bit, with sizes whose last chunk is partial, a mix of iterations, and
/// dropped tickets.
#[test]
fn device_queue_ops_on_one_buffer_in_flight_together_are_bit_identical() {
    let _serial = device_queue_tests();
    let test = "device_queue_ops_on_one_buffer_in_flight_together_are_bit_identical";
    let Some(probe) = cuda(test) else {
        return;
    };
    drop(probe);
    for chain in [false, true] {
        let dev = Device::open(&DeviceOptions {
            backend: Some(BackendKind::Cuda),
            queue_chain: Some(chain),
            ..Default::default()
        })
        .unwrap();
        ops_on_one_buffer_in_flight(&dev, chain);
    }
}

fn ops_on_one_buffer_in_flight(dev: &Device, chain: bool) {
    let threads = 16usize;
    let pool = StreamPool::new(
        dev,
        PoolConfig {
            streams: threads,
            lock: LockMode::PerStream,
            coalesce: CoalescePolicy::Persistent,
        },
    )
    .unwrap();
    let sizes = [65_536usize, 65_536 + 1000, 3 * 1024 + 7, 200_000];
    let init = |t: usize, n: usize| (0..n).map(|i| initial_value(40 + t, i)).collect::<Vec<_>>();
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (pool, start) = (pool.clone(), start.clone());
            std::thread::spawn(move || {
                let n = sizes[t % sizes.len()];
                let mut buf = pool.device().buffer_from(&init(t, n)).unwrap();
                let s = pool.current().unwrap();
                let mut w = Inflight::new(8).unwrap();
                let mut plan = Vec::new();
                start.wait();
                for i in 0..1500usize {
                    let k = 1 + ((i * 5 + t) % 13) as u32;
                    plan.push(k);
                    if i % 97 == 50 {
                        drop(s.launch(Kernel::SimpleCompute { iters: k }, &mut buf));
                    } else {
                        w.submit(|| s.launch(Kernel::SimpleCompute { iters: k }, &mut buf))
                            .unwrap();
                    }
                }
                w.drain().unwrap();
                (plan, buf.read().unwrap())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    pool.synchronize().unwrap();
    let stats = pool.coalesce_stats().unwrap();
    assert!(stats.ops > 0, "chain {chain}: {stats:?}");
    if chain {
        assert!(stats.chained > 0, "chaining on, nothing chained: {stats:?}");
    } else {
        assert_eq!(stats.chained, 0, "chaining off: {stats:?}");
    }
    let _ = writeln!(std::io::stderr(), "chain {chain}: {stats:?}");
    drop(pool);
    let single = StreamPool::new(dev, PoolConfig::default()).unwrap();
    let s = single.current().unwrap();
    for (t, (plan, out)) in results.into_iter().enumerate() {
        let n = sizes[t % sizes.len()];
        let mut alone = dev.buffer_from(&init(t, n)).unwrap();
        for k in plan {
            s.launch(Kernel::SimpleCompute { iters: k }, &mut alone)
                .unwrap()
                .wait()
                .unwrap();
        }
        assert!(
            out == alone.read().unwrap(),
            "chain {chain}: thread {t} ({n} elements)"
        );
    }
}

/// Device-filling ops (1M elements: more threads than an H100/H200 holds) from 16 threads, a
/// stream each, half with 8 in flight. By default (8 kernels) they pass the context's fill
/// gate, which only adds device-side waits; with `MULTIQ_FILL_GATE=0` they do not. Either way
/// every buffer equals the same ops run by one thread alone, bit for bit, and nothing hangs.
#[test]
fn device_filling_ops_from_many_threads_pass_the_fill_gate() {
    let Some(dev) = cuda("device_filling_ops_from_many_threads_pass_the_fill_gate") else {
        return;
    };
    let gate = dev
        .info()
        .extra
        .iter()
        .find(|(k, _)| k == "fill_gate")
        .map(|(_, v)| v.clone());
    let expected = match std::env::var("MULTIQ_FILL_GATE")
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("0") => "off".to_string(),
        None => "8 kernels".to_string(),
        Some(k) => format!("{k} kernels"),
    };
    assert_eq!(gate, Some(expected), "the gate as MULTIQ_FILL_GATE asks");
    const N: usize = 1 << 20;
    const OPS: usize = 24;
    let k = Kernel::SimpleCompute { iters: 3 };
    let pool = StreamPool::new(
        &dev,
        PoolConfig {
            streams: 16,
            lock: LockMode::None,
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let results = sixteen_threads(&pool, N, OPS, k);
    let s = pool.current().unwrap();
    for (t, (got, _)) in results.iter().enumerate() {
        let init: Vec<f32> = (0..N).map(|i| initial_value(t, i)).collect();
        let mut alone = dev.buffer_from(&init).unwrap();
        for _ in 0..OPS {
            s.launch(k, &mut alone).unwrap().wait().unwrap();
        }
        assert!(
            *got == alone.read().unwrap(),
            "thread {t}: differs from the same ops run alone"
        );
        assert_eq!(
            verify_buffer(t, got, (OPS * 3) as u64, tolerance()).first_mismatch,
            None
        );
    }
}

/// One round of pools made, used, checked and dropped: a pool with host-side coalescing (its
/// coalescer writes a signal word), a pool whose 16 threads send their ops through its own
/// device queue, and a matmul coalescer whose 8 threads' products run as batched cuBLAS calls
/// (handles, workspace, page-locked pointer arrays). Returns how long each drop took.
/// `note` is told each step before it starts.
fn pools_come_and_go(
    dev: &Device,
    round: usize,
    note: &(dyn Fn(&str) + Sync),
) -> Vec<(&'static str, std::time::Duration)> {
    use multiq::tensor::{check_matmul, seeded_values};
    use multiq::{MatmulCoalescer, MatmulCoalescerConfig, Precision, Tensor};
    use std::time::{Duration, Instant};
    let kernel = Kernel::SimpleCompute { iters: 10 };
    let mut drops = Vec::new();
    note(&format!("round {round}: coalescing pool, made and used"));
    let fixed = StreamPool::new(
        dev,
        PoolConfig {
            lock: LockMode::PerStream,
            coalesce: CoalescePolicy::Fixed {
                max_batch: 16,
                max_delay: Duration::from_micros(20),
                depth: 2,
            },
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let init: Vec<f32> = (0..4096).map(|i| initial_value(round, i)).collect();
    let mut buf = dev.buffer_from(&init).unwrap();
    let s = fixed.current().unwrap();
    s.launch(kernel, &mut buf).unwrap().wait().unwrap();
    let v = verify_buffer(round, &buf.read().unwrap(), 10, tolerance());
    assert_eq!(v.first_mismatch, None, "coalescing pool, round {round}");
    drop((s, buf));
    note(&format!("round {round}: coalescing pool, dropped"));
    let t = Instant::now();
    drop(fixed);
    drops.push(("coalescing pool", t.elapsed()));

    note(&format!("round {round}: device-queue pool, made and used"));
    let own = persistent_pool_of_16(dev);
    let ops = 200;
    for (t, (out, _)) in sixteen_threads(&own, 65_536, ops, kernel)
        .iter()
        .enumerate()
    {
        let v = verify_buffer(t, out, ops as u64 * 10, tolerance());
        assert_eq!(
            v.first_mismatch, None,
            "device-queue pool, round {round}, thread {t}"
        );
    }
    let queued = own.coalesce_stats().map_or(0, |s| s.ops);
    assert!(
        queued > 0,
        "round {round}: no op went through the pool's device queue"
    );
    note(&format!("round {round}: device-queue pool, dropped"));
    let t = Instant::now();
    drop(own);
    drops.push(("device-queue pool", t.elapsed()));

    note(&format!("round {round}: matmul coalescer, made and used"));
    let mc = Arc::new(
        MatmulCoalescer::new(
            dev,
            MatmulCoalescerConfig {
                max_batch: 8,
                depth: 2,
                precision: Precision::Strict,
            },
        )
        .unwrap(),
    );
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let (dev, mc) = (dev.clone(), mc.clone());
            std::thread::spawn(move || {
                let (m, n, k) = (64, 64, 64);
                let av = seeded_values(100 + t, m * k);
                let mut a = Tensor::from_slice(&dev, &[m, k], &av).unwrap();
                let mut c = Tensor::zeros(&dev, &[m, n]).unwrap();
                for i in 0..20u64 {
                    let bv = seeded_values(1000 * t + i, k * n);
                    let mut b = Tensor::from_slice(&dev, &[k, n], &bv).unwrap();
                    mc.matmul(&mut a, &mut b, &mut c).unwrap();
                    let got = c.to_vec().unwrap();
                    let check = check_matmul(&got, &av, &bv, (m, n, k), false, Precision::Strict);
                    assert!(
                        check.within,
                        "round {round}, thread {t}, product {i}: {check:?}"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mc = Arc::into_inner(mc).expect("the threads are done with it");
    note(&format!("round {round}: matmul coalescer, dropped"));
    let t = Instant::now();
    drop(mc);
    drops.push(("matmul coalescer", t.elapsed()));
    drops
}

/// A pool made and dropped while another pool's device queue is busy never waits for that
/// queue: its kernel stays on the device for as long as work arrives, so anything that waits
/// for the whole device (releasing page-locked memory, destroying a cuBLAS handle,
/// synchronizing the context) would wait for as long as the other pool's threads submit. Here
/// they never stop until three rounds of `pools_come_and_go` are done or a minute has passed.
/// A first round runs before the busy pool starts: first uses (module loading, cuBLAS set-up)
/// may wait for the device, and its pools fill the reuse cache the later rounds take from.
#[test]
fn pools_come_and_go_while_another_pools_device_queue_is_busy() {
    use std::time::Duration;
    let _serial = device_queue_tests();
    let Some(dev) = cuda("pools_come_and_go_while_another_pools_device_queue_is_busy") else {
        return;
    };
    pools_come_and_go(&dev, 0, &|_| ());
    let busy = BusyQueue::start(&dev);
    let before = busy.queued();
    let at = Arc::new(std::sync::Mutex::new(String::from("starting")));
    let (tx, rx) = std::sync::mpsc::channel();
    let (churn_dev, churn_at) = (dev.clone(), at.clone());
    let churn = std::thread::spawn(move || {
        let note = |step: &str| *churn_at.lock().unwrap() = step.to_string();
        let drops: Vec<_> = (1..=3)
            .flat_map(|round| pools_come_and_go(&churn_dev, round, &note))
            .collect();
        // The receiver may have given up: then nobody reads this.
        let _ = tx.send(drops);
    });
    let churned = rx.recv_timeout(Duration::from_secs(60));
    let during = busy.queued() - before;
    let stuck_at = at.lock().map(|s| s.clone()).unwrap_or_default();
    busy.stop();
    let drops = match churned {
        Ok(drops) => drops,
        // A panic in the churn (a wrong result): its own message.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(churn.join().expect_err("it sent nothing"))
        }
        // Not joined: if something there waits for ever, the test must still end.
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
            "pools made and dropped beside a busy device queue did not finish in 60 s \
             ({during} queued ops meanwhile); stuck at: {stuck_at}"
        ),
    };
    churn.join().unwrap();
    eprintln!("gpu: drops beside a busy device queue ({during} queued ops meanwhile): {drops:?}");
    assert!(during > 0, "the other pool's queue ran nothing meanwhile");
    for (what, took) in drops {
        assert!(took < Duration::from_secs(5), "{what}: dropped in {took:?}");
    }
}
