//! CUDA tests of matrix products and the MLP. Where no CUDA device can be opened they pass
//! after printing why they skipped (as tests/gpu.rs).

use std::io::Write;
use std::sync::{Arc, Barrier};

use multiq::model::weights::{HostWeights, MlpSpec};
use multiq::model::{reference_forward, relative_error, Batching, Model, ModelOptions};
use multiq::tensor::{check_matmul, check_matmul_rows, seeded_values};
use multiq::{
    BackendKind, Device, DeviceOptions, Error, MatmulCoalescer, MatmulCoalescerConfig, PoolConfig,
    Precision, StreamPool, Tensor,
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
                "SKIPPED gpu_mlp::{test}: no CUDA device ({e})"
            );
            None
        }
    }
}

fn product(
    dev: &Device,
    (m, n, k): (usize, usize, usize),
    seed: u64,
    precision: Precision,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let pool = StreamPool::new(dev, PoolConfig::default()).unwrap();
    let s = pool.current().unwrap();
    let av = seeded_values(seed, m * k);
    let bv = seeded_values(seed + 1, k * n);
    let mut a = Tensor::from_slice(dev, &[m, k], &av).unwrap();
    let mut b = Tensor::from_slice(dev, &[k, n], &bv).unwrap();
    let mut c = Tensor::from_slice(dev, &[m, n], &vec![f32::NAN; m * n]).unwrap();
    s.matmul(&mut a, &mut b, &mut c, precision)
        .unwrap()
        .wait()
        .unwrap();
    (c.to_vec().unwrap(), av, bv)
}

#[test]
fn strict_fp32_products_match_the_f64_reference() {
    let Some(dev) = cuda("strict_fp32_products_match_the_f64_reference") else {
        return;
    };
    for (i, mnk) in [
        (1, 1, 1),
        (3, 5, 7),
        (64, 64, 64),
        (17, 130, 257),
        (256, 256, 256),
        (1024, 1024, 1024),
    ]
    .into_iter()
    .enumerate()
    {
        let (c, a, b) = product(&dev, mnk, 10 * i as u64, Precision::Strict);
        let check = check_matmul_rows(&c, &a, &b, mnk, false, Precision::Strict, 64);
        // The strict bound (2·k·2^-24 of |A|·|B|) is far below TF32's error: passing it also
        // shows that no TF32 was used.
        assert!(check.within, "{mnk:?}: {check:?}");
        eprintln!(
            "gpu_mlp: {mnk:?} strict max |C-C64|/(|A||B|) = {:.3e} (bound {:.3e})",
            check.max_rel_to_scale, check.bound
        );
    }
}

#[test]
fn tf32_products_are_within_the_tf32_bound() {
    let Some(dev) = cuda("tf32_products_are_within_the_tf32_bound") else {
        return;
    };
    let mnk = (256, 256, 256);
    let (c, a, b) = product(&dev, mnk, 99, Precision::Tf32);
    let check = check_matmul(&c, &a, &b, mnk, false, Precision::Tf32);
    assert!(check.within, "{check:?}");
    let strict = check_matmul(&c, &a, &b, mnk, false, Precision::Strict);
    eprintln!(
        "gpu_mlp: tf32 max error/scale {:.3e}; within the strict bound: {} (false = TF32 in use)",
        check.max_rel_to_scale, strict.within
    );
}

#[test]
fn coalesced_products_from_many_threads_are_each_right() {
    let Some(dev) = cuda("coalesced_products_from_many_threads_are_each_right") else {
        return;
    };
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
    let threads = 16;
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (dev, mc, start) = (dev.clone(), mc.clone(), start.clone());
            std::thread::spawn(move || {
                let (m, n, k) = if t % 2 == 0 {
                    (64, 64, 64)
                } else {
                    (16, 48, 32)
                };
                let av = seeded_values(100 + t as u64, m * k);
                let mut a = Tensor::from_slice(&dev, &[m, k], &av).unwrap();
                let mut c = Tensor::zeros(&dev, &[m, n]).unwrap();
                start.wait();
                for i in 0..50u64 {
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
    let s = mc.stats();
    assert_eq!(s.ops, 16 * 50);
    eprintln!(
        "gpu_mlp: coalescer {} launches for {} products",
        s.launches, s.ops
    );
}

fn model(dev: &Device, w: &HostWeights, batching: Option<Batching>, fuse: bool) -> Model {
    Model::new(
        dev,
        w,
        ModelOptions {
            batching,
            fuse,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn the_mlp_matches_the_f64_reference_fused_and_unfused() {
    let Some(dev) = cuda("the_mlp_matches_the_f64_reference_fused_and_unfused") else {
        return;
    };
    let w = HostWeights::random(&MlpSpec::default(), 1).unwrap();
    for rows in [1usize, 7, 64, 300] {
        let input = seeded_values(rows as u64, rows * 512);
        let want = reference_forward(&w, &input);
        for fuse in [true, false] {
            let out = model(&dev, &w, None, fuse).infer(&input).unwrap();
            let err = relative_error(&out, &want);
            assert!(err < 1e-5, "rows {rows} fuse {fuse}: relative error {err}");
        }
    }
}

#[test]
fn dynamic_batching_gives_each_of_16_threads_its_rows() {
    let Some(dev) = cuda("dynamic_batching_gives_each_of_16_threads_its_rows") else {
        return;
    };
    let w = Arc::new(HostWeights::random(&MlpSpec::default(), 2).unwrap());
    let m = model(&dev, &w, Some(Batching::default()), true);
    let handles: Vec<_> = (0..16)
        .map(|t| {
            let (m, w) = (m.clone(), w.clone());
            std::thread::spawn(move || {
                for i in 0..40u64 {
                    let rows = 1 + (t + i as usize) % 2;
                    let input = seeded_values(t as u64 * 100 + i, rows * 512);
                    let out = m.infer(&input).unwrap();
                    let err = relative_error(&out, &reference_forward(&w, &input));
                    assert!(err < 1e-5, "thread {t} request {i}: {err}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let s = m.stats();
    eprintln!(
        "gpu_mlp: {} rows in {} forwards ({} contexts)",
        s.rows, s.forwards, s.contexts
    );
    // One context per batch in flight, at most `depth` at once.
    assert!(s.contexts <= Batching::default().depth as u64);
}

#[test]
fn bad_requests_fail_alone_and_nan_stays_in_its_row() {
    let Some(dev) = cuda("bad_requests_fail_alone_and_nan_stays_in_its_row") else {
        return;
    };
    let w = HostWeights::random(&MlpSpec::default(), 3).unwrap();
    let m = model(&dev, &w, Some(Batching::default()), true);
    assert!(matches!(m.infer(&[]), Err(Error::Shape(_))));
    assert!(matches!(m.infer(&[1.0; 511]), Err(Error::Shape(_))));
    let mut input = seeded_values(4, 3 * 512);
    input[512 + 7] = f32::NAN;
    let out = m.infer(&input).unwrap();
    assert!(out[512..1024].iter().all(|v| v.is_nan()));
    let want = reference_forward(&w, &input);
    assert!(relative_error(&out[..512], &want[..512]) < 1e-5);
    assert!(relative_error(&out[1024..], &want[1024..]) < 1e-5);
    // Still serving after all that.
    let ok = seeded_values(5, 512);
    assert!(relative_error(&m.infer(&ok).unwrap(), &reference_forward(&w, &ok)) < 1e-5);
}

/// Small batches go to multiq's own kernel for products with few rows: odd widths (scalar
/// loads), widths that are multiples of 4 (16-byte loads), columns that do not fill a block,
/// and row counts across its groups of 8 and past its threshold (cuBLAS from there).
#[test]
fn small_batches_match_the_reference_at_odd_widths() {
    let Some(dev) = cuda("small_batches_match_the_reference_at_odd_widths") else {
        return;
    };
    for (seed, widths) in [vec![7, 13, 5], vec![12, 9, 4], vec![512, 1024, 3]]
        .into_iter()
        .enumerate()
    {
        let spec = MlpSpec {
            widths: widths.clone(),
        };
        let w = HostWeights::random(&spec, seed as u64 + 10).unwrap();
        let m = model(&dev, &w, None, true);
        for rows in [1usize, 2, 7, 8, 9, 16, 17, 31, 32, 33, 40] {
            let input = seeded_values(rows as u64 + 100, rows * widths[0]);
            let out = m.infer(&input).unwrap();
            let err = relative_error(&out, &reference_forward(&w, &input));
            assert!(
                err < 1e-5,
                "widths {widths:?} rows {rows}: relative error {err}"
            );
        }
    }
}

/// With dynamic batching a request's rows share forwards with other requests: in small
/// batches each row's result is bit-identical to the row run alone.
#[test]
fn a_small_batchs_rows_do_not_depend_on_each_other() {
    let Some(dev) = cuda("a_small_batchs_rows_do_not_depend_on_each_other") else {
        return;
    };
    if std::env::var("MULTIQ_SKINNY_ROWS").is_ok_and(|v| v.trim().parse().unwrap_or(0) < 8) {
        eprintln!("SKIPPED: MULTIQ_SKINNY_ROWS below 8 sends small batches to cuBLAS");
        return;
    }
    let w = HostWeights::random(&MlpSpec::default(), 7).unwrap();
    let m = model(&dev, &w, None, true);
    let input = seeded_values(8, 8 * 512);
    let together = m.infer(&input).unwrap();
    for (r, row) in input.chunks(512).enumerate() {
        let alone = m.infer(row).unwrap();
        let same = together[r * 512..(r + 1) * 512]
            .iter()
            .zip(&alone)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "row {r} differs when run with 7 others");
    }
}

/// Sessions record their forward as a graph on the second run and replay it from the third:
/// every run gives the same bits as the forward queued directly (`infer`).
#[test]
fn replayed_session_forwards_equal_direct_ones() {
    let Some(dev) = cuda("replayed_session_forwards_equal_direct_ones") else {
        return;
    };
    let w = HostWeights::random(&MlpSpec::default(), 9).unwrap();
    let m = model(&dev, &w, None, true);
    for rows in [3usize, 64] {
        let input = seeded_values(rows as u64 + 7, rows * 512);
        let direct = m.infer(&input).unwrap();
        let mut s = m.session(rows).unwrap();
        s.load_input(&input).unwrap();
        for run in 0..4 {
            s.run().unwrap();
            let out = s.read_output().unwrap();
            let same = out
                .iter()
                .zip(&direct)
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "rows {rows}, run {run}: differs from the direct forward"
            );
        }
    }
}
