//! `multiq bench matmul`: fp32 `C = A·B` of n×n matrices from 1–16 threads, a wait after
//! every product, as PyTorch's anchor (`torch.mm(a, b)` then `synchronize`, a stream per
//! thread or the default stream, each thread with its own `a` and `b`, a one-second window).
//!
//! Scenarios: `per-thread` (a stream each from the pool), `shared` (one stream for all),
//! `coalesced` (the [`MatmulCoalescer`]: concurrent products merged into one batched launch),
//! and `limit`: one thread launching `B` products at a time as one batched launch, the
//! device's GEMM rate for that size measured in the same run (the ceiling the other scenarios
//! are judged against). After each run every thread's last C is checked against the float64
//! reference (sampled rows for large n) within the bound of [`crate::tensor::error_bound`].

use std::sync::Arc;

use super::workload::{run_threads, Length, WorkloadRow};
use crate::backend::{DType, GemmOperands, GemmSpec, MatRef, Precision};
use crate::error::{Error, Result};
use crate::runtime::{
    Device, MatmulCoalescer, MatmulCoalescerConfig, PoolConfig, StreamPool, DEFAULT_POOL_SIZE,
};
use crate::sync::submit_lock::LockMode;
use crate::tensor::{check_matmul_rows, seeded_values, Tensor};

/// Rows of C checked against the float64 reference per thread.
const CHECK_ROWS: usize = 8;

/// What `bench matmul` runs.
#[derive(Clone, Debug)]
pub struct MatmulBenchConfig {
    /// Matrix sizes n (n×n · n×n).
    pub sizes: Vec<usize>,
    /// Thread counts.
    pub threads: Vec<usize>,
    /// `per-thread` and/or `shared` (one launch per product).
    pub scenarios: Vec<&'static str>,
    /// Also run the coalescer.
    pub coalesce: bool,
    /// Also run without it.
    pub uncoalesced: bool,
    /// How long each run lasts.
    pub length: Length,
    /// fp32 or TF32.
    pub precision: Precision,
    /// The coalescer's batch limit and depth.
    pub coalescer: MatmulCoalescerConfig,
    /// Measure the device's batched GEMM rate per size (`limit` rows), with batches of at
    /// most this many products (0 = skip).
    pub limit_batch: usize,
}

impl MatmulBenchConfig {
    /// The full benchmark: PyTorch's sizes and threads.
    pub fn full() -> Self {
        MatmulBenchConfig {
            sizes: vec![64, 256, 1024, 4096],
            threads: vec![1, 2, 4, 8, 16],
            scenarios: vec!["per-thread", "shared"],
            coalesce: true,
            uncoalesced: true,
            length: Length::Seconds(1.0),
            precision: Precision::Strict,
            coalescer: MatmulCoalescerConfig::default(),
            limit_batch: 256,
        }
    }

    /// Scaled for the study on a CPU: two small sizes, three thread counts, short runs.
    pub fn scaled_for_cpu() -> Self {
        MatmulBenchConfig {
            sizes: vec![64, 256],
            threads: vec![1, 4, 16],
            length: Length::Seconds(0.15),
            limit_batch: 16,
            ..MatmulBenchConfig::full()
        }
    }
}

/// Products per launch of the `limit` run for size n: enough for about 2^35 flops per launch
/// (a launch of that size keeps any current GPU busy), at least 2, at most `cap`.
pub fn limit_batch(n: usize, cap: usize) -> usize {
    let flops = 2 * n * n * n;
    ((1usize << 35) / flops.max(1)).clamp(2, cap.max(2))
}

struct ThreadState {
    a: Tensor,
    b: Tensor,
    c: Tensor,
    av: Vec<f32>,
    bv: Vec<f32>,
}

fn operands(device: &Device, n: usize, seed: u64) -> Result<ThreadState> {
    let av = seeded_values(seed, n * n);
    let bv = seeded_values(seed ^ 0x5555, n * n);
    Ok(ThreadState {
        a: Tensor::from_slice(device, &[n, n], &av)?,
        b: Tensor::from_slice(device, &[n, n], &bv)?,
        c: Tensor::zeros(device, &[n, n])?,
        av,
        bv,
    })
}

fn check(s: &mut ThreadState, n: usize, precision: Precision) -> Result<(f64, bool)> {
    let c = s.c.to_vec()?;
    let r = check_matmul_rows(&c, &s.av, &s.bv, (n, n, n), false, precision, CHECK_ROWS);
    Ok((r.max_rel_to_scale, r.within))
}

fn finish(mut row: WorkloadRow, n: usize, precision: Precision, err: f64, ok: bool) -> WorkloadRow {
    row.size = Some(n);
    row.precision = precision.to_string();
    row.flops_per_sec = Some(row.ops_per_sec * 2.0 * (n as f64).powi(3));
    row.max_error = err;
    row.error_bound = crate::tensor::error_bound(n, precision);
    row.verified = ok;
    row
}

/// Runs the benchmark, calling `on_row` after each configuration.
pub fn run(
    device: &Device,
    cfg: &MatmulBenchConfig,
    mut on_row: impl FnMut(&WorkloadRow),
) -> Result<Vec<WorkloadRow>> {
    let mut rows = Vec::new();
    let wait = device.info().wait;
    let p = cfg.precision;
    for &n in &cfg.sizes {
        if n == 0 || n > 16384 {
            return Err(Error::invalid(format!(
                "matrix size {n} is outside 1..=16384"
            )));
        }
        if cfg.limit_batch > 0 {
            let row = limit(device, n, limit_batch(n, cfg.limit_batch), cfg)?;
            on_row(&row);
            rows.push(row);
        }
        for &t in &cfg.threads {
            if cfg.uncoalesced {
                for &scenario in &cfg.scenarios {
                    let pool = StreamPool::new(
                        device,
                        PoolConfig {
                            streams: DEFAULT_POOL_SIZE,
                            lock: LockMode::PerStream,
                            ..Default::default()
                        },
                    )?;
                    let shared = scenario == "shared";
                    let (dev, pool2) = (device.clone(), pool.clone());
                    let (timed, err, ok) = run_threads(
                        t,
                        cfg.length,
                        move |i| {
                            let stream = if shared {
                                pool2.acquire(0)?
                            } else {
                                pool2.current()?
                            };
                            let mut s = operands(&dev, n, 1000 * n as u64 + i as u64)?;
                            stream.matmul(&mut s.a, &mut s.b, &mut s.c, p)?.wait()?;
                            Ok((stream, s))
                        },
                        move |(stream, s)| stream.matmul(&mut s.a, &mut s.b, &mut s.c, p)?.wait(),
                        move |(_, s)| check(s, n, p),
                    )?;
                    let name = if shared { "shared" } else { "per-thread" };
                    let row = finish(
                        WorkloadRow::new("matmul", name, &timed, wait),
                        n,
                        p,
                        err,
                        ok,
                    );
                    on_row(&row);
                    rows.push(row);
                }
            }
            if cfg.coalesce {
                let mc = Arc::new(MatmulCoalescer::new(
                    device,
                    MatmulCoalescerConfig {
                        precision: p,
                        ..cfg.coalescer
                    },
                )?);
                let (dev, mc2) = (device.clone(), mc.clone());
                let (timed, err, ok) = run_threads(
                    t,
                    cfg.length,
                    move |i| {
                        let mut s = operands(&dev, n, 1000 * n as u64 + i as u64)?;
                        mc2.matmul(&mut s.a, &mut s.b, &mut s.c)?;
                        Ok(s)
                    },
                    {
                        let mc = mc.clone();
                        move |s: &mut ThreadState| mc.matmul(&mut s.a, &mut s.b, &mut s.c)
                    },
                    move |s| check(s, n, p),
                )?;
                let stats = mc.stats();
                let mut row = finish(
                    WorkloadRow::new("matmul", "coalesced", &timed, wait),
                    n,
                    p,
                    err,
                    ok,
                );
                row.coalesce = "on";
                row.ops_per_launch = stats.ops as f64 / stats.launches.max(1) as f64;
                on_row(&row);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// The device's rate for products of size n: one thread, `batch` products per batched launch,
/// a wait per launch.
fn limit(device: &Device, n: usize, batch: usize, cfg: &MatmulBenchConfig) -> Result<WorkloadRow> {
    let backend = device.backend();
    let stream = backend.new_stream()?;
    let av = seeded_values(7, n * n);
    let bv = seeded_values(8, n * n);
    let mut bufs = Vec::with_capacity(batch);
    for _ in 0..batch {
        let a = backend.alloc(n * n)?;
        let b = backend.alloc(n * n)?;
        let c = backend.alloc(n * n)?;
        stream.upload(&*a, &av)?;
        stream.upload(&*b, &bv)?;
        bufs.push((a, b, c));
    }
    let spec = GemmSpec {
        m: n,
        n,
        k: n,
        b_transposed: false,
        relu: false,
        dtype: DType::F32,
        precision: cfg.precision,
        fuse: true,
        b_static: false,
    };
    let ops: Vec<GemmOperands<'_>> = bufs
        .iter()
        .map(|(a, b, c)| GemmOperands {
            a: MatRef::new(&**a),
            b: MatRef::new(&**b),
            c: MatRef::new(&**c),
            bias: None,
        })
        .collect();
    // Warm-up (cuBLAS handle, heuristics), then launches for the run's length.
    stream.gemm_batched(&spec, &ops)?;
    stream.synchronize()?;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| Error::invalid(format!("latency histogram: {e}")))?;
    let start = std::time::Instant::now();
    let mut launches = 0u64;
    loop {
        let done = match cfg.length {
            Length::Seconds(s) => start.elapsed().as_secs_f64() >= s,
            Length::Ops(k) => launches * batch as u64 >= k,
        };
        if done && launches > 0 {
            break;
        }
        let t0 = std::time::Instant::now();
        stream.gemm_batched(&spec, &ops)?;
        stream.synchronize()?;
        hist.saturating_record(t0.elapsed().as_nanos().max(1) as u64);
        launches += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut c = vec![0f32; n * n];
    stream.download(&*bufs[batch - 1].2, &mut c)?;
    let r = check_matmul_rows(&c, &av, &bv, (n, n, n), false, cfg.precision, CHECK_ROWS);
    drop(ops);
    for (a, b, c) in bufs {
        stream.free_after(a);
        stream.free_after(b);
        stream.free_after(c);
    }
    stream.synchronize()?;
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let timed = super::workload::Timed {
        threads: 1,
        ops: launches * batch as u64,
        seconds,
        latency: super::results::LatencyUs {
            p50: us(0.5),
            p99: us(0.99),
            p999: us(0.999),
        },
        mean_us: hist.mean() / 1000.0,
    };
    let mut row = finish(
        WorkloadRow::new("matmul", "limit", &timed, device.info().wait),
        n,
        cfg.precision,
        r.max_rel_to_scale,
        r.within,
    );
    row.coalesce = "on";
    row.ops_per_launch = batch as f64;
    Ok(row)
}
