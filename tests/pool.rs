//! Stream pool, lock modes, inflight windows and buffer ownership on the CPU backend.

use std::collections::HashSet;
use std::sync::{Arc, Barrier};

use multiq::kernel::{initial_value, simple_compute};
use multiq::{Device, Error, Inflight, Kernel, LockMode, PoolConfig, StreamPool};

fn device() -> Device {
    Device::cpu(2).unwrap()
}

fn pool(device: &Device, streams: usize, lock: LockMode) -> StreamPool {
    StreamPool::new(
        device,
        PoolConfig {
            streams,
            lock,
            ..PoolConfig::default()
        },
    )
    .unwrap()
}

/// Runs `f(i)` on `n` threads that all start together; returns results in thread order.
fn on_threads<T: Send + 'static>(
    n: usize,
    f: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let start = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (f, start) = (f.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                f(i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn first_request_is_round_robin_and_sticky() {
    let dev = device();
    let p = pool(&dev, 32, LockMode::PerStream);
    assert_eq!(p.streams_created(), 0, "streams are created lazily");
    let p2 = p.clone();
    let got = on_threads(8, move |_| {
        let a = p2.current().unwrap().index();
        let b = p2.current().unwrap().index();
        (a, b)
    });
    for (a, b) in &got {
        assert_eq!(a, b, "a thread keeps its stream");
    }
    let distinct: HashSet<_> = got.iter().map(|g| g.0).collect();
    assert_eq!(
        distinct.len(),
        8,
        "8 threads on a 32-stream pool get 8 streams"
    );
    assert_eq!(p.streams_created(), 8);
}

#[test]
fn threads_beyond_the_pool_share_streams_round_robin() {
    let dev = device();
    let p = pool(&dev, 32, LockMode::PerStream);
    let p2 = p.clone();
    let idx = on_threads(40, move |_| p2.current().unwrap().index());
    let mut counts = [0usize; 32];
    for i in &idx {
        counts[*i] += 1;
    }
    assert!(
        counts.iter().all(|&c| c == 1 || c == 2),
        "round-robin wraps evenly: {counts:?}"
    );
    assert_eq!(counts.iter().filter(|&&c| c == 2).count(), 8);
    assert_eq!(
        p.streams_created(),
        32,
        "never more streams than the pool's size"
    );
}

#[test]
fn release_set_current_and_acquire() {
    let dev = device();
    let p = pool(&dev, 4, LockMode::PerStream);
    let first = p.current().unwrap().index();
    assert!(p.release_current().unwrap());
    assert!(!p.release_current().unwrap(), "nothing left to release");
    let second = p.current().unwrap().index();
    assert_ne!(
        first, second,
        "after release the next stream round-robin is taken"
    );
    let s3 = p.acquire(3).unwrap();
    p.set_current(&s3).unwrap();
    assert_eq!(p.current().unwrap().index(), 3);
    assert!(matches!(
        p.acquire(4),
        Err(Error::NoSuchStream { index: 4, size: 4 })
    ));
    let other = pool(&dev, 4, LockMode::PerStream);
    assert!(
        p.set_current(&other.acquire(0).unwrap()).is_err(),
        "a stream of another pool"
    );
    assert!(StreamPool::new(
        &dev,
        PoolConfig {
            streams: 0,
            lock: LockMode::None,
            ..PoolConfig::default()
        }
    )
    .is_err());
}

#[test]
fn lock_none_never_shares_a_stream() {
    let dev = device();
    let p = pool(&dev, 2, LockMode::None);
    let a = p.current().unwrap();
    let p2 = p.clone();
    let a_index = a.index();
    // Another thread cannot take or submit to this thread's stream.
    let (acquire, submit, own) = std::thread::spawn(move || {
        let acquire = p2.acquire(a_index).map(|_| ());
        let mut buf = p2.device().alloc(16).unwrap();
        let submit = a
            .launch(Kernel::SimpleCompute { iters: 1 }, &mut buf)
            .map(|_| ());
        let own = p2.current().map(|s| s.index());
        (acquire, submit, own)
    })
    .join()
    .unwrap();
    assert!(matches!(acquire, Err(Error::ExclusiveStreamRequired(_))));
    assert!(matches!(submit, Err(Error::ExclusiveStreamRequired(_))));
    assert_eq!(
        own.unwrap(),
        1 - a_index,
        "the other thread gets the free stream"
    );
    // That thread exited: its claim was released, so a third thread can take its stream.
    let p3 = p.clone();
    let third = std::thread::spawn(move || p3.current().map(|s| s.index()))
        .join()
        .unwrap();
    assert_eq!(third.unwrap(), 1 - a_index);
    // A pool with every stream claimed rejects one more thread with a clear error.
    let full = pool(&dev, 1, LockMode::None);
    let _mine = full.current().unwrap();
    let f2 = full.clone();
    let err = std::thread::spawn(move || f2.current().map(|_| ()))
        .join()
        .unwrap();
    assert!(matches!(err, Err(Error::ExclusiveStreamRequired(_))));
}

/// Every lock mode, 64 threads, on private streams and on shared ones: every thread's result
/// is exactly its serial reference.
#[test]
fn every_lock_mode_is_correct_with_64_threads() {
    let dev = device();
    for lock in [LockMode::Global, LockMode::PerStream, LockMode::None] {
        for streams in [64, 4] {
            let p = pool(&dev, streams, lock);
            let p2 = p.clone();
            let all_assigned = Arc::new(Barrier::new(64));
            let results = on_threads(64, move |t| -> Result<bool, Error> {
                let s = p2.current();
                // Every thread holds its stream (or its refusal) before any thread finishes
                // and releases its claim.
                all_assigned.wait();
                let s = s?;
                let init: Vec<f32> = (0..300).map(|i| initial_value(t, i)).collect();
                let mut buf = p2.device().buffer_from(&init)?;
                let k = Kernel::SimpleCompute { iters: 3 };
                let mut w = Inflight::new(1 + t % 4)?;
                for _ in 0..10 {
                    w.submit(|| s.launch(k, &mut buf))?;
                }
                w.drain()?;
                let out = buf.read()?;
                Ok(out
                    .iter()
                    .enumerate()
                    .all(|(i, v)| *v == simple_compute(initial_value(t, i), 30)))
            });
            let ok = results.iter().filter(|r| matches!(r, Ok(true))).count();
            if lock == LockMode::None && streams < 64 {
                // Only as many threads as streams may own one; the rest are refused, never
                // silently shared.
                assert_eq!(ok, streams, "{lock} on {streams} streams");
                assert!(results
                    .iter()
                    .all(|r| matches!(r, Ok(true) | Err(Error::ExclusiveStreamRequired(_)))));
            } else {
                assert_eq!(ok, 64, "{lock} on {streams} streams: {results:?}");
            }
            p.synchronize().unwrap();
        }
    }
}

#[test]
fn one_shared_stream_from_64_threads_keeps_every_result() {
    let dev = device();
    for lock in [LockMode::Global, LockMode::PerStream] {
        let p = pool(&dev, 32, lock);
        let p2 = p.clone();
        let ok = on_threads(64, move |t| {
            let s = p2.acquire(0).unwrap();
            let mut buf = p2.device().buffer_from(&[initial_value(t, 0); 64]).unwrap();
            for _ in 0..5 {
                s.launch(Kernel::SimpleCompute { iters: 2 }, &mut buf)
                    .unwrap()
                    .wait()
                    .unwrap();
            }
            buf.read()
                .unwrap()
                .iter()
                .all(|v| *v == simple_compute(initial_value(t, 0), 10))
        });
        assert!(ok.iter().all(|&b| b), "{lock}");
        assert_eq!(p.acquire(0).unwrap().stats().submitted, 64 * 5);
    }
}

#[test]
fn inflight_reuses_pooled_events() {
    let dev = device();
    let p = pool(&dev, 1, LockMode::PerStream);
    let s = p.current().unwrap();
    let mut buf = dev.alloc(64).unwrap();
    let mut w = Inflight::with_latency(8).unwrap();
    for _ in 0..1000 {
        w.submit(|| s.launch(Kernel::SimpleCompute { iters: 1 }, &mut buf))
            .unwrap();
        assert!(w.outstanding() <= 8);
    }
    w.drain().unwrap();
    assert_eq!(
        w.latency().unwrap().len(),
        1000,
        "every op's latency is recorded once"
    );
    let stats = s.stats();
    assert_eq!(stats.submitted, 1000);
    assert!(
        stats.events_created <= 9,
        "events are pooled, not made per op: {stats:?}"
    );
    // Dropped tickets give their events back too.
    for _ in 0..100 {
        drop(
            s.launch(Kernel::SimpleCompute { iters: 1 }, &mut buf)
                .unwrap(),
        );
    }
    assert!(s.stats().events_created <= 9);
    assert!(Inflight::new(0).is_err());
}

#[test]
fn a_buffer_moving_between_streams_keeps_its_order() {
    let dev = device();
    let p = pool(&dev, 4, LockMode::PerStream);
    let (a, b) = (p.acquire(0).unwrap(), p.acquire(1).unwrap());
    let mut buf = dev.buffer_from(&[0.25; 5000]).unwrap();
    let k = Kernel::SimpleCompute { iters: 1 };
    for i in 0..20 {
        let s = if i % 2 == 0 { &a } else { &b };
        drop(s.launch(k, &mut buf).unwrap()); // never waited: ordering must come from the runtime
    }
    assert!(buf
        .read()
        .unwrap()
        .iter()
        .all(|v| *v == simple_compute(0.25, 20)));
    // Dropping a buffer with work in flight is safe.
    for _ in 0..3 {
        drop(a.launch(k, &mut buf).unwrap());
    }
    drop(buf);
    p.synchronize().unwrap();
    dev.synchronize().unwrap();
}

#[test]
fn bad_sizes_and_device_mixups_are_errors() {
    let dev = device();
    assert!(matches!(dev.alloc(0), Err(Error::InvalidArgument(_))));
    assert!(dev.alloc(usize::MAX).is_err());
    let mut buf = dev.alloc(8).unwrap();
    assert!(buf.write(&[1.0; 7]).is_err());
    let other = device();
    let p = pool(&other, 2, LockMode::PerStream);
    let err = p
        .current()
        .unwrap()
        .launch(Kernel::SimpleCompute { iters: 1 }, &mut buf);
    assert!(matches!(err, Err(Error::WrongDevice { .. })));
    assert!(Device::cpu(0).is_err());
}

#[test]
fn a_grouped_launch_equals_each_launch_alone_bit_for_bit() {
    let dev = device();
    let p = pool(&dev, 2, LockMode::PerStream);
    let (a, b) = (p.acquire(0).unwrap(), p.acquire(1).unwrap());
    let k = Kernel::SimpleCompute { iters: 3 };
    let sizes = [1usize, 255, 4096, 5000, 70_000];
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
        a.launch_many(k, &mut refs).unwrap().wait().unwrap();
    }
    for buf in alone.iter_mut() {
        b.launch(k, buf).unwrap().wait().unwrap();
    }
    for (g, s) in grouped.iter_mut().zip(alone.iter_mut()) {
        assert_eq!(g.read().unwrap(), s.read().unwrap());
    }
}

/// A thread-local registered before multiq's own is destroyed after them, so its destructor
/// calls the pool from a thread whose stream table is gone. The call must fail cleanly and
/// leave no claim behind (a leaked claim would make that stream unusable for good in lock
/// mode `none`).
#[test]
fn a_late_thread_local_destructor_leaves_no_claim_behind() {
    use std::cell::RefCell;
    struct Late(
        StreamPool,
        Arc<std::sync::Mutex<Option<Result<usize, String>>>>,
    );
    impl Drop for Late {
        fn drop(&mut self) {
            let r = self
                .0
                .acquire(0)
                .map(|s| s.index())
                .map_err(|e| e.to_string());
            *self.1.lock().unwrap() = Some(r);
        }
    }
    thread_local! {
        static LATE: RefCell<Option<Late>> = const { RefCell::new(None) };
    }
    let dev = device();
    let p = pool(&dev, 2, LockMode::None);
    let seen = Arc::new(std::sync::Mutex::new(None));
    let (p2, seen2) = (p.clone(), seen.clone());
    std::thread::spawn(move || {
        LATE.with(|_| ()); // registered first, destroyed last
        let _ = p2.current().unwrap(); // multiq's thread-locals exist from here
        p2.release_current().unwrap();
        LATE.with(|l| *l.borrow_mut() = Some(Late(p2, seen2)));
    })
    .join()
    .unwrap();
    let r = seen.lock().unwrap().take();
    assert!(
        matches!(r, Some(Err(_))),
        "acquire from a destroyed thread must fail: {r:?}"
    );
    let p3 = p.clone();
    let free = std::thread::spawn(move || (0..2).filter(|&i| p3.acquire(i).is_ok()).count())
        .join()
        .unwrap();
    assert_eq!(free, 2, "a claim was left behind by the exiting thread");
}

/// A launch refused in lock mode `none` (the stream is another thread's) leaves the buffer as
/// it was: its next use does not wait for the other thread's work on that stream.
#[test]
fn a_refused_launch_does_not_tie_the_buffer_to_the_other_threads_stream() {
    let dev = device();
    let p = pool(&dev, 2, LockMode::None);
    let mine = p.current().unwrap();
    let mut buf = dev.buffer_from(&[0.5; 16]).unwrap();
    let k = Kernel::SimpleCompute { iters: 1 };
    mine.launch(k, &mut buf).unwrap().wait().unwrap();
    let p2 = p.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let other = std::thread::spawn(move || {
        let s = p2.current().unwrap();
        let mut big = p2.device().buffer_from(&vec![0.01; 1 << 16]).unwrap();
        let t0 = std::time::Instant::now();
        let ticket = s
            .launch(Kernel::SimpleCompute { iters: 400 }, &mut big)
            .unwrap();
        tx.send(s.clone()).unwrap();
        ticket.wait().unwrap();
        t0.elapsed()
    });
    // The other thread's stream, busy with a long kernel.
    let foreign = rx.recv().unwrap();
    let refused = foreign.launch(k, &mut buf);
    assert!(matches!(refused, Err(Error::ExclusiveStreamRequired(_))));
    // A product refused the same way leaves its tensors alone too.
    let mut a = multiq::Tensor::zeros(&dev, &[2, 2]).unwrap();
    let (mut b, mut c) = (a_like(&dev), a_like(&dev));
    let refused = foreign.matmul(&mut a, &mut b, &mut c, multiq::Precision::Strict);
    assert!(matches!(refused, Err(Error::ExclusiveStreamRequired(_))));
    let t0 = std::time::Instant::now();
    let out = buf.read().unwrap();
    let products = c.to_vec().unwrap();
    let read = t0.elapsed();
    assert_eq!(products, vec![0.0; 4]);
    let kernel = other.join().unwrap();
    assert_eq!(
        out[0],
        simple_compute(0.5, 1),
        "the refused launch did not run"
    );
    assert!(
        read < kernel / 4,
        "reading the buffer waited for the other thread's kernel ({read:?} of {kernel:?})"
    );
}

fn a_like(dev: &Device) -> multiq::Tensor {
    multiq::Tensor::zeros(dev, &[2, 2]).unwrap()
}
