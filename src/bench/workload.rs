//! Results rows of the model workloads (`multiq bench matmul`, `multiq bench mlp`), their
//! JSON file, the thread harness they share, and their tables.
//!
//! A row carries `"workload": "matmul"` with `"size"`, or `"workload": "mlp"` with `"batch"`
//! and `"samples_per_sec"`, plus the fields every results row has (`threads`, `ops`,
//! `seconds`, `ops_per_sec`, `latency_us`, `verified`, `wait`, ...). Files written by
//! `bench matmul`/`bench mlp` hold these rows in `runs`; the study's file holds them in
//! `workloads` beside the multi-queue `runs`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::results::{self, LatencyUs};
use super::table::thousands;
use crate::backend::{BackendKind, DeviceInfo, Precision, WaitPolicy};
use crate::error::{Error, Result};

/// One measured configuration of a model workload.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadRow {
    /// `matmul` or `mlp`.
    pub workload: &'static str,
    /// matmul: `per-thread` (a stream each), `shared` (one stream), `coalesced` (the
    /// coalescer's batched launches), `limit` (one thread, large batched launches: the
    /// device's GEMM rate); mlp: `sweep` (one thread, batch size swept) or `threads`.
    pub scenario: &'static str,
    /// matmul: n of the n×n·n×n product.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
    /// mlp: rows per request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// Submitting threads.
    pub threads: usize,
    /// matmul: the coalescer (`on`) or one launch per op (`off`); mlp: dynamic batching.
    pub coalesce: &'static str,
    /// `fp32` (strict) or `tf32`.
    pub precision: String,
    /// mlp: where the input and output live during the timed loop: `device` (resident, as
    /// PyTorch's sweep) or `host` (each request copied in and out).
    pub io: &'static str,
    /// Ops (products, forwards or requests) timed.
    pub ops: u64,
    /// Seconds from the first thread's start to the last thread's stop.
    pub seconds: f64,
    /// ops / seconds.
    pub ops_per_sec: f64,
    /// mlp: rows per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples_per_sec: Option<f64>,
    /// matmul: floating-point operations per second (2·n³ per product).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flops_per_sec: Option<f64>,
    /// Per-op latency seen by the calling thread.
    pub latency_us: LatencyUs,
    /// Mean per-op latency, µs.
    pub latency_mean_us: f64,
    /// Products per launch, rows per forward (mlp), on average (1 when not merged).
    pub ops_per_launch: f64,
    /// Outputs checked against the float64 reference and within bound.
    pub verified: bool,
    /// Largest error seen: matmul `|C - C64| / (|A|·|B|)` elementwise; mlp normwise relative.
    pub max_error: f64,
    /// The bound in force for `max_error`.
    pub error_bound: f64,
    /// Wait policy in force.
    pub wait: WaitPolicy,
}

impl WorkloadRow {
    /// A row with the common fields filled from a timed run.
    pub fn new(
        workload: &'static str,
        scenario: &'static str,
        run: &Timed,
        wait: WaitPolicy,
    ) -> Self {
        WorkloadRow {
            workload,
            scenario,
            size: None,
            batch: None,
            threads: run.threads,
            coalesce: "off",
            precision: Precision::Strict.to_string(),
            io: "device",
            ops: run.ops,
            seconds: run.seconds,
            ops_per_sec: run.ops as f64 / run.seconds,
            samples_per_sec: None,
            flops_per_sec: None,
            latency_us: run.latency,
            latency_mean_us: run.mean_us,
            ops_per_launch: 1.0,
            verified: true,
            max_error: 0.0,
            error_bound: 0.0,
            wait,
        }
    }
}

/// A results file of model workloads.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadFile {
    /// multiq's version.
    pub multiq_version: &'static str,
    /// Commit the binary was built from.
    pub git_commit: &'static str,
    /// Backend.
    pub backend: BackendKind,
    /// Device name.
    pub device: String,
    /// Host threads available.
    pub host_threads: usize,
    /// When the runs started (RFC 3339).
    pub started_at: String,
    /// The command line.
    pub command: String,
    /// Everything known about the device.
    pub device_info: DeviceInfo,
    /// What was scaled, in words.
    pub notes: Vec<String>,
    /// One row per configuration.
    pub runs: Vec<WorkloadRow>,
}

impl WorkloadFile {
    /// A file of `runs` measured on the device described by `info`.
    pub fn new(
        info: DeviceInfo,
        started_at: String,
        notes: Vec<String>,
        runs: Vec<WorkloadRow>,
    ) -> Self {
        WorkloadFile {
            multiq_version: env!("CARGO_PKG_VERSION"),
            git_commit: results::GIT_COMMIT,
            backend: info.backend,
            device: info.name.clone(),
            host_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            started_at,
            command: results::command_line(),
            device_info: info,
            notes,
            runs,
        }
    }
}

/// What a timed multi-thread run measured.
#[derive(Clone, Copy, Debug)]
pub struct Timed {
    /// Threads.
    pub threads: usize,
    /// Ops completed in the timed window.
    pub ops: u64,
    /// Seconds of the window.
    pub seconds: f64,
    /// Latency percentiles.
    pub latency: LatencyUs,
    /// Mean latency, µs.
    pub mean_us: f64,
}

/// How long a run lasts: a wall-clock window (as PyTorch's anchor) or a fixed op count per
/// thread.
#[derive(Clone, Copy, Debug)]
pub enum Length {
    /// Ops until the window closes.
    Seconds(f64),
    /// Exactly this many ops per thread.
    Ops(u64),
}

/// Runs `threads` threads: each builds its state with `setup` (untimed, including a warm-up),
/// all meet at a barrier, then each calls `op` (one op, waited for) until `length` is reached,
/// recording every op's latency. Afterwards each thread's state is checked with `check`
/// (returns the largest error seen and whether it is within bound). The first error stops the
/// run and is returned.
pub fn run_threads<S: Send + 'static>(
    threads: usize,
    length: Length,
    setup: impl Fn(usize) -> Result<S> + Send + Sync + 'static,
    op: impl Fn(&mut S) -> Result<()> + Send + Sync + 'static,
    check: impl Fn(&mut S) -> Result<(f64, bool)> + Send + Sync + 'static,
) -> Result<(Timed, f64, bool)> {
    if threads == 0 {
        return Err(Error::invalid("threads must be at least 1"));
    }
    let setup = Arc::new(setup);
    let op = Arc::new(op);
    let check = Arc::new(check);
    let start = Arc::new(Barrier::new(threads + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    type Done = (u64, Instant, Instant, Histogram<u64>, f64, bool);
    let handles: Vec<std::thread::JoinHandle<Result<Option<Done>>>> = (0..threads)
        .map(|t| {
            let (setup, op, check) = (setup.clone(), op.clone(), check.clone());
            let (start, stop, failed) = (start.clone(), stop.clone(), failed.clone());
            std::thread::Builder::new()
                .name(format!("multiq-workload-{t}"))
                .spawn(move || {
                    let state = setup(t);
                    if state.is_err() {
                        failed.store(true, Ordering::Release);
                    }
                    start.wait();
                    let mut state = state?;
                    if failed.load(Ordering::Acquire) {
                        return Ok(None);
                    }
                    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
                        .map_err(|e| Error::invalid(format!("latency histogram: {e}")))?;
                    let began = Instant::now();
                    let mut n = 0u64;
                    loop {
                        match length {
                            Length::Ops(k) if n >= k => break,
                            // Every thread times one op at least (a window too short for any
                            // would report 0 ops/s for what was not measured), unless another
                            // thread failed.
                            Length::Seconds(_)
                                if stop.load(Ordering::Relaxed)
                                    && (n > 0 || failed.load(Ordering::Acquire)) =>
                            {
                                break
                            }
                            _ => {}
                        }
                        let t0 = Instant::now();
                        if let Err(e) = op(&mut state) {
                            failed.store(true, Ordering::Release);
                            stop.store(true, Ordering::Release);
                            return Err(e);
                        }
                        hist.saturating_record(t0.elapsed().as_nanos().max(1) as u64);
                        n += 1;
                    }
                    let ended = Instant::now();
                    let (err, ok) = check(&mut state)?;
                    Ok(Some((n, began, ended, hist, err, ok)))
                })
                .map_err(|e| Error::invalid(format!("cannot start thread {t}: {e}")))
        })
        .collect::<Result<_>>()?;
    start.wait();
    if let Length::Seconds(s) = length {
        let deadline = Instant::now() + Duration::from_secs_f64(s);
        while Instant::now() < deadline && !failed.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(2).min(Duration::from_secs_f64(s)));
        }
        stop.store(true, Ordering::Release);
    }
    let mut done = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(Some(d))) => done.push(d),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(Error::invalid("a benchmark thread panicked"));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let began = done.iter().map(|d| d.1).min().unwrap_or_else(Instant::now);
    let ended = done.iter().map(|d| d.2).max().unwrap_or(began);
    let ops: u64 = done.iter().map(|d| d.0).sum();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| Error::invalid(format!("latency histogram: {e}")))?;
    for d in &done {
        hist.add(&d.3)
            .map_err(|e| Error::invalid(format!("latency histogram: {e}")))?;
    }
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let timed = Timed {
        threads,
        ops,
        seconds: ended.duration_since(began).as_secs_f64().max(1e-9),
        latency: LatencyUs {
            p50: us(0.5),
            p99: us(0.99),
            p999: us(0.999),
        },
        mean_us: hist.mean() / 1000.0,
    };
    let max_err = done.iter().map(|d| d.4).fold(0.0, f64::max);
    let ok = done.iter().all(|d| d.5);
    Ok((timed, max_err, ok))
}

/// A text table of rows: one line per row with the figures a reader compares.
pub fn table(title: &str, rows: &[&WorkloadRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{title}");
    let _ = writeln!(
        s,
        "  {:<10} {:>6} {:>6} {:>8} {:>6} {:>13} {:>14} {:>9} {:>9} {:>9} {:>8}",
        "scenario",
        "size",
        "batch",
        "coalesce",
        "thr",
        "ops/s",
        "samples/s",
        "p50 us",
        "p99 us",
        "per launch",
        "check"
    );
    for r in rows {
        let opt = |v: Option<usize>| v.map_or("-".to_string(), |v| v.to_string());
        let _ = writeln!(
            s,
            "  {:<10} {:>6} {:>6} {:>8} {:>6} {:>13} {:>14} {:>9.1} {:>9.1} {:>9.1} {:>8}",
            r.scenario,
            opt(r.size),
            opt(r.batch),
            r.coalesce,
            r.threads,
            thousands(r.ops_per_sec),
            r.samples_per_sec.map_or("-".into(), thousands),
            r.latency_us.p50,
            r.latency_us.p99,
            r.ops_per_launch,
            if r.verified { "ok" } else { "MISMATCH" }
        );
    }
    s
}
