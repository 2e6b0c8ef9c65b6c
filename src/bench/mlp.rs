//! `multiq bench mlp`: the investigation's MLP (512→1024→1024→512, ReLU), as PyTorch's anchor
//! measures it.
//!
//! - `sweep`: one thread, batch sizes 1–1024, the input resident on the device, a wait after
//!   every forward (PyTorch: `mlp(x); torch.cuda.synchronize()` 500 times after 20 warm-ups):
//!   latency per forward and samples per second.
//! - `threads`: 1–16 threads each sending batch-1 requests through [`Model::infer`] (input
//!   copied from the host, output copied back: a serving call), dynamic batching off and on,
//!   for a window of time: requests per second = samples per second, latency p50/p99.
//!
//! Every run's outputs are checked against the float64 reference (sampled rows).

use std::path::PathBuf;
use std::sync::Arc;

use super::workload::{run_threads, Length, WorkloadRow};
use crate::backend::Precision;
use crate::error::Result;
use crate::model::{
    reference_forward, relative_error, Batching, HostWeights, MlpSpec, Model, ModelOptions,
};
use crate::runtime::Device;
use crate::tensor::seeded_values;

/// Normwise relative error allowed against the float64 reference: fp32 through three layers
/// of at most 1,024 terms stays far below 1e-5; TF32 rounds inputs to 10 mantissa bits.
pub fn tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::Strict => 1e-5,
        Precision::Tf32 => 1e-2,
    }
}

/// Rows of a forward checked against the reference.
const CHECK_ROWS: usize = 4;

/// What `bench mlp` runs.
#[derive(Clone, Debug)]
pub struct MlpBenchConfig {
    /// Batch sizes of the sweep (empty: no sweep).
    pub batches: Vec<usize>,
    /// Timed forwards per batch size.
    pub sweep_iters: u64,
    /// Thread counts of the batch-1 request runs (empty: none).
    pub threads: Vec<usize>,
    /// Dynamic batching off and/or on in the request runs.
    pub batching: Vec<bool>,
    /// How long each request run lasts.
    pub length: Length,
    /// Dynamic batching's limits.
    pub batching_opts: Batching,
    /// fp32 or TF32.
    pub precision: Precision,
    /// Fuse bias and ReLU into the products.
    pub fuse: bool,
    /// Weights file (default: seeded random weights, seed 0).
    pub weights: Option<PathBuf>,
}

impl MlpBenchConfig {
    /// The full benchmark: PyTorch's batch sizes and threads.
    pub fn full() -> Self {
        MlpBenchConfig {
            batches: vec![1, 8, 64, 256, 1024],
            sweep_iters: 500,
            threads: vec![1, 2, 4, 8, 16],
            batching: vec![false, true],
            length: Length::Seconds(1.0),
            batching_opts: Batching::default(),
            precision: Precision::Strict,
            fuse: true,
            weights: None,
        }
    }

    /// Scaled for the study on a CPU: smaller batches and fewer forwards, short windows.
    pub fn scaled_for_cpu() -> Self {
        MlpBenchConfig {
            batches: vec![1, 8, 64],
            sweep_iters: 20,
            threads: vec![1, 4, 16],
            length: Length::Seconds(0.2),
            ..MlpBenchConfig::full()
        }
    }
}

/// The sampled rows of `out` and `input` (first, last and evenly spaced between).
fn sample(
    rows: usize,
    win: usize,
    wout: usize,
    input: &[f32],
    out: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let want = CHECK_ROWS.clamp(1, rows);
    let picks: Vec<usize> = (0..want)
        .map(|i| {
            if want == 1 {
                0
            } else {
                i * (rows - 1) / (want - 1)
            }
        })
        .collect();
    let i = picks
        .iter()
        .flat_map(|&r| input[r * win..(r + 1) * win].to_vec())
        .collect();
    let o = picks
        .iter()
        .flat_map(|&r| out[r * wout..(r + 1) * wout].to_vec())
        .collect();
    (i, o)
}

/// Runs the benchmark, calling `on_row` after each configuration.
pub fn run(
    device: &Device,
    cfg: &MlpBenchConfig,
    mut on_row: impl FnMut(&WorkloadRow),
) -> Result<Vec<WorkloadRow>> {
    let spec = MlpSpec::default();
    let weights = Arc::new(match &cfg.weights {
        Some(p) => crate::model::weights::load(p, &spec)?,
        None => HostWeights::random(&spec, 0)?,
    });
    let (win, wout) = (spec.input(), spec.output());
    let tol = tolerance(cfg.precision);
    let wait = device.info().wait;
    let mut rows = Vec::new();
    let base = ModelOptions {
        precision: cfg.precision,
        batching: None,
        fuse: cfg.fuse,
    };
    if !cfg.batches.is_empty() {
        let model = Model::new(device, &weights, base)?;
        for &bs in &cfg.batches {
            let (m, w) = (model.clone(), weights.clone());
            let (timed, err, ok) = run_threads(
                1,
                Length::Ops(cfg.sweep_iters.max(1)),
                move |_| {
                    let input = seeded_values(bs as u64, bs * win);
                    let mut s = m.session(bs)?;
                    s.load_input(&input)?;
                    for _ in 0..20 {
                        s.run()?;
                    }
                    Ok((s, input))
                },
                |(s, _)| s.run(),
                move |(s, input)| {
                    let out = s.read_output()?;
                    let (i, o) = sample(bs, win, wout, input, &out);
                    let e = relative_error(&o, &reference_forward(&w, &i));
                    Ok((e, e <= tol))
                },
            )?;
            let mut row = WorkloadRow::new("mlp", "sweep", &timed, wait);
            row.batch = Some(bs);
            row.precision = cfg.precision.to_string();
            row.samples_per_sec = Some(row.ops_per_sec * bs as f64);
            row.ops_per_launch = bs as f64;
            row.max_error = err;
            row.error_bound = tol;
            row.verified = ok;
            on_row(&row);
            rows.push(row);
        }
    }
    for &batching in &cfg.batching {
        if cfg.threads.is_empty() {
            break;
        }
        let model = Model::new(
            device,
            &weights,
            ModelOptions {
                batching: batching.then_some(cfg.batching_opts),
                ..base
            },
        )?;
        for &t in &cfg.threads {
            let before = model.stats();
            let (m, m2, w) = (model.clone(), model.clone(), weights.clone());
            let (timed, err, ok) = run_threads(
                t,
                cfg.length,
                move |i| {
                    let input = seeded_values(10_000 + i as u64, win);
                    let out = m.infer(&input)?;
                    Ok((input, out))
                },
                move |(input, out)| {
                    *out = m2.infer(input)?;
                    Ok(())
                },
                move |(input, out)| {
                    let e = relative_error(out, &reference_forward(&w, input));
                    Ok((e, e <= tol))
                },
            )?;
            let after = model.stats();
            let mut row = WorkloadRow::new("mlp", "threads", &timed, wait);
            row.batch = Some(1);
            row.io = "host";
            row.coalesce = if batching { "on" } else { "off" };
            row.precision = cfg.precision.to_string();
            row.samples_per_sec = Some(row.ops_per_sec);
            row.ops_per_launch = (after.rows - before.rows) as f64
                / (after.forwards - before.forwards).max(1) as f64;
            row.max_error = err;
            row.error_bound = tol;
            row.verified = ok;
            on_row(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}
