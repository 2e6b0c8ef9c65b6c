//! Tensors and matrix products on the CPU backend: products against a float64 reference
//! within the stated bound, the coalescer from many threads, and bad input.

use std::sync::{Arc, Barrier};

use multiq::tensor::{check_matmul, seeded_values};
use multiq::{
    Device, Error, LockMode, MatmulCoalescer, MatmulCoalescerConfig, PoolConfig, Precision,
    StreamPool, Tensor,
};

fn device() -> Device {
    Device::cpu(2).unwrap()
}

#[test]
fn products_match_the_f64_reference_within_the_bound() {
    let dev = device();
    let pool = StreamPool::new(&dev, PoolConfig::default()).unwrap();
    let s = pool.current().unwrap();
    for (i, &(m, n, k)) in [
        (1, 1, 1),
        (3, 5, 7),
        (64, 64, 64),
        (17, 130, 257),
        (256, 256, 256),
    ]
    .iter()
    .enumerate()
    {
        let av = seeded_values(10 + i as u64, m * k);
        let bv = seeded_values(20 + i as u64, k * n);
        let mut a = Tensor::from_slice(&dev, &[m, k], &av).unwrap();
        let mut b = Tensor::from_slice(&dev, &[k, n], &bv).unwrap();
        let mut c = Tensor::from_slice(&dev, &[m, n], &vec![f32::NAN; m * n]).unwrap();
        s.matmul(&mut a, &mut b, &mut c, Precision::Strict)
            .unwrap()
            .wait()
            .unwrap();
        let got = c.to_vec().unwrap();
        let check = check_matmul(&got, &av, &bv, (m, n, k), false, Precision::Strict);
        assert!(check.within, "{m}x{n}x{k}: {check:?}");
        // The check is not vacuous: one ulp-scale change far beyond the bound fails it.
        let mut wrong = got.clone();
        wrong[m * n / 2] += 1e-2;
        assert!(!check_matmul(&wrong, &av, &bv, (m, n, k), false, Precision::Strict).within);
    }
}

#[test]
fn coalesced_products_from_many_threads_are_each_right() {
    let dev = device();
    let mc = Arc::new(
        MatmulCoalescer::new(
            &dev,
            MatmulCoalescerConfig {
                max_batch: 16,
                depth: 2,
                precision: Precision::Strict,
            },
        )
        .unwrap(),
    );
    let threads = 8;
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (dev, mc, start) = (dev.clone(), mc.clone(), start.clone());
            std::thread::spawn(move || {
                // Threads use two shapes, so batches hold products of both.
                let (m, n, k) = if t % 2 == 0 {
                    (32, 32, 32)
                } else {
                    (8, 24, 16)
                };
                let av = seeded_values(100 + t as u64, m * k);
                let mut a = Tensor::from_slice(&dev, &[m, k], &av).unwrap();
                let mut c = Tensor::zeros(&dev, &[m, n]).unwrap();
                start.wait();
                for i in 0..30u64 {
                    let bv = seeded_values(1000 * t as u64 + i, k * n);
                    let mut b = Tensor::from_slice(&dev, &[k, n], &bv).unwrap();
                    mc.matmul(&mut a, &mut b, &mut c).unwrap();
                    let got = c.to_vec().unwrap();
                    let check = check_matmul(&got, &av, &bv, (m, n, k), false, Precision::Strict);
                    assert!(check.within, "thread {t} op {i}: {check:?}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let stats = mc.stats();
    assert_eq!(stats.ops, 8 * 30);
    assert!(stats.launches <= stats.ops);
}

#[test]
fn bad_shapes_and_sizes_are_clear_errors_and_fail_alone() {
    let dev = device();
    let pool = StreamPool::new(&dev, PoolConfig::default()).unwrap();
    let s = pool.current().unwrap();
    let mut a = Tensor::zeros(&dev, &[2, 3]).unwrap();
    let mut b = Tensor::zeros(&dev, &[4, 5]).unwrap();
    let mut c = Tensor::zeros(&dev, &[2, 5]).unwrap();
    let e = s
        .matmul(&mut a, &mut b, &mut c, Precision::Strict)
        .err()
        .unwrap();
    assert!(matches!(e, Error::Shape(_)), "{e}");
    assert!(e.to_string().contains("[2, 3]") && e.to_string().contains("[4, 5]"));
    assert!(e.is_usage());
    // Zero-size and mismatched data.
    assert!(matches!(Tensor::zeros(&dev, &[0, 3]), Err(Error::Shape(_))));
    assert!(matches!(
        Tensor::from_slice(&dev, &[2, 2], &[1.0; 3]),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        Tensor::zeros_of(&dev, &[2, 2], multiq::DType::BF16),
        Err(Error::Unsupported(_))
    ));
    // A bad request to the coalescer fails alone; the next good one works.
    let mc = MatmulCoalescer::new(&dev, MatmulCoalescerConfig::default()).unwrap();
    assert!(matches!(
        mc.matmul(&mut a, &mut b, &mut c),
        Err(Error::Shape(_))
    ));
    let mut b2 = Tensor::from_slice(&dev, &[3, 5], &[1.0; 15]).unwrap();
    let mut a2 = Tensor::from_slice(&dev, &[2, 3], &[1.0; 6]).unwrap();
    mc.matmul(&mut a2, &mut b2, &mut c).unwrap();
    assert_eq!(c.to_vec().unwrap(), vec![3.0; 10]);
}

#[test]
fn nan_inputs_propagate_to_their_rows_only() {
    let dev = device();
    let pool = StreamPool::new(&dev, PoolConfig::default()).unwrap();
    let s = pool.current().unwrap();
    let mut av = vec![1.0f32; 4 * 3];
    av[3] = f32::NAN; // row 1
    let mut a = Tensor::from_slice(&dev, &[4, 3], &av).unwrap();
    let mut b = Tensor::from_slice(&dev, &[3, 2], &[0.5; 6]).unwrap();
    let mut c = Tensor::zeros(&dev, &[4, 2]).unwrap();
    s.matmul(&mut a, &mut b, &mut c, Precision::Strict)
        .unwrap()
        .wait()
        .unwrap();
    let out = c.to_vec().unwrap();
    for (i, row) in out.chunks(2).enumerate() {
        if i == 1 {
            assert!(row.iter().all(|v| v.is_nan()), "{out:?}");
        } else {
            assert_eq!(row, [1.5, 1.5]);
        }
    }
}

#[test]
fn matmul_respects_lock_mode_none() {
    let dev = device();
    let pool = StreamPool::new(
        &dev,
        PoolConfig {
            streams: 1,
            lock: LockMode::None,
            ..Default::default()
        },
    )
    .unwrap();
    let s = pool.current().unwrap();
    let mut a = Tensor::from_slice(&dev, &[1, 1], &[2.0]).unwrap();
    let mut b = Tensor::from_slice(&dev, &[1, 1], &[3.0]).unwrap();
    let mut c = Tensor::zeros(&dev, &[1, 1]).unwrap();
    s.matmul(&mut a, &mut b, &mut c, Precision::Strict)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(c.to_vec().unwrap(), vec![6.0]);
    // Another thread may not submit on the owned stream.
    let s2 = s.clone();
    let dev2 = dev.clone();
    let e = std::thread::spawn(move || {
        let mut a = Tensor::zeros(&dev2, &[1, 1]).unwrap();
        let mut b = Tensor::zeros(&dev2, &[1, 1]).unwrap();
        let mut c = Tensor::zeros(&dev2, &[1, 1]).unwrap();
        s2.matmul(&mut a, &mut b, &mut c, Precision::Strict).err()
    })
    .join()
    .unwrap();
    assert!(
        matches!(e, Some(Error::ExclusiveStreamRequired(_))),
        "{e:?}"
    );
}

/// A tensor larger than the device holds, or than can be addressed, is an error, not a panic
/// or an abort while building its zeros on the host.
#[test]
fn zeros_too_large_for_the_device_are_refused() {
    let d = multiq::Device::cpu(1).unwrap();
    for shape in [
        [1usize << 31, 1 << 31],
        [1 << 20, 1 << 20],
        [usize::MAX / 2, 2],
    ] {
        assert!(
            multiq::tensor::Tensor::zeros(&d, &shape).is_err(),
            "{shape:?}"
        );
    }
    let mut t = multiq::tensor::Tensor::zeros(&d, &[3, 5]).unwrap();
    assert_eq!(t.to_vec().unwrap(), vec![0.0; 15]);
}
