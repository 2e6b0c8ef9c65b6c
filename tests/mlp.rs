//! The MLP on the CPU backend: against the f64 reference, shared by many threads, dynamic
//! batching (each caller gets exactly its rows), weights files and bad input.

use std::sync::{Arc, Barrier};

use multiq::model::weights::{self, HostWeights, MlpSpec};
use multiq::model::{reference_forward, relative_error, Batching, Model, ModelOptions};
use multiq::tensor::seeded_values;
use multiq::{Device, Error};

/// A small architecture keeps the debug-build tests fast; the full model runs once below.
fn small() -> MlpSpec {
    MlpSpec {
        widths: vec![32, 64, 48, 16],
    }
}

fn device() -> Device {
    Device::cpu(2).unwrap()
}

/// fp32 against f64 through three layers of at most 1024 terms: 1e-5 relative is ample
/// (the products' bound is about k·2^-23 ≈ 1.2e-4 elementwise, far smaller normwise).
const TOLERANCE: f64 = 1e-5;

#[test]
fn the_full_model_matches_the_f64_reference() {
    let spec = MlpSpec::default();
    let w = HostWeights::random(&spec, 1).unwrap();
    let model = Model::new(&device(), &w, ModelOptions::default()).unwrap();
    let input = seeded_values(2, 3 * 512);
    let out = model.infer(&input).unwrap();
    assert_eq!(out.len(), 3 * 512);
    let err = relative_error(&out, &reference_forward(&w, &input));
    assert!(err < TOLERANCE, "relative error {err}");
    // Unfused epilogue gives the same result (CPU: same arithmetic).
    let unfused = Model::new(
        &device(),
        &w,
        ModelOptions {
            fuse: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(unfused.infer(&input).unwrap(), out);
}

fn threads_get_their_own_rows(batching: Option<Batching>) {
    let spec = small();
    let w = HostWeights::random(&spec, 3).unwrap();
    let model = Model::new(
        &device(),
        &w,
        ModelOptions {
            batching,
            ..Default::default()
        },
    )
    .unwrap();
    let threads = 12;
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (model, w, start) = (model.clone(), w.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for i in 0..25u64 {
                    // Rows 1..=3 per request, so batches mix request sizes.
                    let rows = 1 + (t + i as usize) % 3;
                    let input = seeded_values(t as u64 * 1000 + i, rows * 32);
                    let out = model.infer(&input).unwrap();
                    let err = relative_error(&out, &reference_forward(&w, &input));
                    assert!(err < TOLERANCE, "thread {t} request {i}: {err}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let s = model.stats();
    assert_eq!(
        s.rows,
        (0..threads)
            .map(|t| (0..25).map(|i| 1 + (t + i) % 3).sum::<usize>())
            .sum::<usize>() as u64
    );
    if let Some(b) = batching {
        assert!(s.forwards <= threads as u64 * 25);
        // One context per batch in flight, at most `depth` at once.
        assert!(
            s.contexts <= b.depth as u64,
            "batching used {} contexts, depth {}",
            s.contexts,
            b.depth
        );
    } else {
        assert_eq!(s.forwards, threads as u64 * 25);
    }
}

#[test]
fn many_threads_share_one_model_unbatched() {
    threads_get_their_own_rows(None);
}

#[test]
fn dynamic_batching_gives_each_caller_exactly_its_rows() {
    threads_get_their_own_rows(Some(Batching {
        max_rows: 16,
        depth: 2,
    }));
}

#[test]
fn bad_requests_fail_alone_and_nan_rows_stay_in_their_row() {
    let spec = small();
    let w = HostWeights::random(&spec, 4).unwrap();
    let model = Model::new(
        &device(),
        &w,
        ModelOptions {
            batching: Some(Batching::default()),
            ..Default::default()
        },
    )
    .unwrap();
    let e = model.infer(&[]).unwrap_err();
    assert!(
        matches!(e, Error::Shape(_)) && e.to_string().contains("empty batch"),
        "{e}"
    );
    let e = model.infer(&[1.0; 33]).unwrap_err();
    assert!(
        e.to_string().contains("33 values") && e.to_string().contains("32"),
        "{e}"
    );
    // NaN in row 1 of 3: row 1 is NaN, rows 0 and 2 are right.
    let mut input = seeded_values(9, 3 * 32);
    input[32 + 5] = f32::NAN;
    let out = model.infer(&input).unwrap();
    assert!(out[16..32].iter().all(|v| v.is_nan()));
    let want = reference_forward(&w, &input);
    for row in [0usize, 2] {
        let r = row * 16..(row + 1) * 16;
        assert!(relative_error(&out[r.clone()], &want[r]) < TOLERANCE);
    }
    // Concurrent good and bad requests: the bad ones fail, the good ones are right.
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let (model, w) = (model.clone(), w.clone());
            std::thread::spawn(move || {
                for i in 0..20 {
                    if (t + i) % 4 == 0 {
                        assert!(model.infer(&[0.5; 31]).is_err());
                    } else {
                        let input = seeded_values(100 + t as u64, 32);
                        let out = model.infer(&input).unwrap();
                        assert!(relative_error(&out, &reference_forward(&w, &input)) < TOLERANCE);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // Bad options.
    assert!(Model::new(
        &device(),
        &w,
        ModelOptions {
            batching: Some(Batching {
                max_rows: 0,
                depth: 1
            }),
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn sessions_keep_the_input_on_the_device() {
    let spec = small();
    let w = HostWeights::random(&spec, 5).unwrap();
    let model = Model::new(&device(), &w, ModelOptions::default()).unwrap();
    let input = seeded_values(6, 8 * 32);
    let mut s = model.session(8).unwrap();
    assert!(s.load_input(&input[..32]).is_err());
    s.load_input(&input).unwrap();
    for _ in 0..3 {
        s.run().unwrap();
    }
    let out = s.read_output().unwrap();
    assert!(relative_error(&out, &reference_forward(&w, &input)) < TOLERANCE);
    assert!(model.session(0).is_err());
}

#[test]
fn weights_files_load_and_bad_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("multiq-mlp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = small();
    let w = HostWeights::random(&spec, 7).unwrap();
    let path = dir.join("w.safetensors");
    weights::write(&path, &w).unwrap();
    let model = Model::load(&device(), &path, &spec, ModelOptions::default()).unwrap();
    let input = seeded_values(8, 32);
    assert!(
        relative_error(
            &model.infer(&input).unwrap(),
            &reference_forward(&w, &input)
        ) < TOLERANCE
    );
    // The default architecture refuses this file, naming a tensor.
    let e = Model::load(
        &device(),
        &path,
        &MlpSpec::default(),
        ModelOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::BadInput { .. }), "{e}");
    assert!(e.to_string().contains("`0.weight`"), "{e}");
    // Truncated file.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = Model::load(&device(), &cut, &spec, ModelOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains("cut.safetensors") && e.to_string().contains("truncated"),
        "{e}"
    );
    // Missing file.
    let e = Model::load(&device(), &dir.join("none"), &spec, ModelOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A spec whose sizes overflow memory's address range is refused before anything is
/// allocated or run (it used to wrap to empty buffers and crash the forward).
#[test]
fn widths_that_overflow_are_refused() {
    let d = device();
    for widths in [vec![1 << 63, 2], vec![1 << 40, 1 << 40], vec![2, 1 << 62]] {
        let spec = MlpSpec {
            widths: widths.clone(),
        };
        assert!(matches!(spec.check(), Err(Error::Shape(_))), "{widths:?}");
        assert!(HostWeights::random(&spec, 1).is_err(), "{widths:?}");
        let w = HostWeights {
            spec,
            layers: vec![(vec![], vec![0.0; 2])],
        };
        let e = Model::new(&d, &w, ModelOptions::default()).err();
        assert!(matches!(e, Some(Error::Shape(_))), "{widths:?}: {e:?}");
    }
    // Accessors of a spec check() refuses do not panic.
    let empty = MlpSpec { widths: vec![] };
    assert_eq!(
        (empty.input(), empty.output(), empty.parameters()),
        (0, 0, 0)
    );
    assert!(empty.check().is_err());
}
