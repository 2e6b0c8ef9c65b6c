//! One run of the multi-queue test, and its verification.
//!
//! Per thread: one buffer of `data` f32, element i initialised to
//! `(thread + 1) * 0.001 + i * 1e-6`. One op = one launch of `simple_compute` over the buffer,
//! then a wait for that op (inflight 1), or up to `inflight` ops outstanding. Each thread
//! allocates and fills its buffer and runs one untimed warm-up op before a common start
//! signal; the clock runs from that signal until the last thread's last op completed.
//! Afterwards every buffer is read back and compared with the host reference of the same op
//! sequence (warm-up included).

use std::sync::{Arc, Barrier};
use std::time::{Instant, SystemTime};

use parking_lot::Mutex;
use rayon::prelude::*;

use hdrhistogram::Histogram;

use super::host_sched::{RunSched, ThreadUsage};
use super::results::{LatencyUs, PerThread, RunRow, RunWhen};
use super::Scenario;
use crate::error::{Error, Result};
use crate::kernel::{initial_value, simple_compute, Kernel};
use crate::runtime::{Buffer, CoalescePolicy, Device, Inflight, PoolConfig, StreamPool};
use crate::sync::submit_lock::LockMode;

/// Most submitting threads a run accepts.
pub const MAX_THREADS: usize = 1024;

/// Most reference iterations spent verifying one buffer (per-element cost × elements). Above
/// it, an evenly spaced sample (always including the first and last element) is checked.
pub const VERIFY_BUDGET: u64 = 1 << 19;

/// Fewest elements verified per buffer, whatever the cost.
pub const VERIFY_MIN_ELEMENTS: usize = 64;

/// What one run does.
#[derive(Clone, Debug)]
pub struct QueuesSpec {
    /// Preset name for results (`custom` when sizes were given by hand).
    pub preset: String,
    /// f32 elements per buffer.
    pub data: usize,
    /// Kernel iterations per element per op.
    pub kernel_iters: u32,
    /// Timed ops per thread.
    pub iters: usize,
    /// Ops outstanding per thread (1 = wait after every op).
    pub inflight: usize,
    /// Submission lock mode.
    pub lock: LockMode,
    /// Shared stream or a stream per thread.
    pub scenario: Scenario,
    /// Submitting threads.
    pub threads: usize,
    /// Streams in the pool.
    pub pool_size: usize,
    /// Cross-thread coalescing.
    pub coalesce: CoalescePolicy,
    /// Pin each submitting thread to its own CPU ([`cpu_for_thread`]).
    pub pin: bool,
    /// Test hook: corrupt one element of thread 0's buffer before verification.
    pub corrupt: bool,
}

/// The CPU thread `thread` of a pinned run runs on: the `thread`-th of the CPUs the process
/// may run on (`cpus`, in order), wrapping around when there are more threads than CPUs.
/// `None` when `cpus` is empty.
pub fn cpu_for_thread(thread: usize, cpus: &[usize]) -> Option<usize> {
    (!cpus.is_empty()).then(|| cpus[thread % cpus.len()])
}

/// The CPUs this process may run on (Linux: its affinity mask), for `--pin-threads`.
fn allowed_cpus() -> Result<Vec<usize>> {
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect::<Vec<_>>())
        .filter(|ids| !ids.is_empty())
        .ok_or_else(|| {
            Error::invalid(
                "--pin-threads: this system does not say which CPUs the process may run on",
            )
        })
}

/// Outcome of checking one buffer against the reference.
#[derive(Clone, Debug, PartialEq)]
pub struct Verification {
    /// Elements compared.
    pub checked: usize,
    /// Largest absolute difference seen.
    pub max_abs_error: f32,
    /// First element outside tolerance: (index, value, expected).
    pub first_mismatch: Option<(usize, f32, f32)>,
}

/// Compares `out`, thread `thread`'s buffer after `total_kernel_iters` iterations of
/// `simple_compute` per element, with the host reference.
pub fn verify_buffer(
    thread: usize,
    out: &[f32],
    total_kernel_iters: u64,
    tolerance: f32,
) -> Verification {
    let n = out.len();
    let per_elem = total_kernel_iters.max(1);
    let want = ((VERIFY_BUDGET / per_elem) as usize)
        .max(VERIFY_MIN_ELEMENTS)
        .min(n);
    let mut v = Verification {
        checked: 0,
        max_abs_error: 0.0,
        first_mismatch: None,
    };
    let iters = u32::try_from(total_kernel_iters).unwrap_or(u32::MAX);
    for k in 0..want {
        // Evenly spaced, first and last included.
        let i = if want <= 1 {
            0
        } else {
            k * (n - 1) / (want - 1)
        };
        let expect = simple_compute(initial_value(thread, i), iters);
        let got = out[i];
        let err = (got - expect).abs();
        v.checked += 1;
        let bad = err.is_nan() || err > tolerance;
        if err > v.max_abs_error || err.is_nan() {
            v.max_abs_error = if err.is_nan() { f32::INFINITY } else { err };
        }
        if bad && v.first_mismatch.is_none() {
            v.first_mismatch = Some((i, got, expect));
        }
    }
    v
}

/// Why a run failed verification.
#[derive(Debug, thiserror::Error)]
#[error(
    "verification failed: thread {thread}, element {index}: got {got}, expected {expected} \
     (tolerance {tolerance})"
)]
pub struct Mismatch {
    /// Thread whose buffer was wrong.
    pub thread: usize,
    /// Element index.
    pub index: usize,
    /// Value found.
    pub got: f32,
    /// Reference value.
    pub expected: f32,
    /// Tolerance in force.
    pub tolerance: f32,
}

/// A measured and verified run: the row, plus the first mismatch if verification failed.
pub struct RunOutcome {
    /// The results row (`verified` false on mismatch).
    pub row: RunRow,
    /// The first mismatch, if any.
    pub mismatch: Option<Mismatch>,
}

struct ThreadDone {
    thread: usize,
    /// The CPU it was pinned to (`None`: not pinned).
    cpu: Option<usize>,
    buf: Buffer,
    started: Instant,
    finished: Instant,
    latency: Histogram<u64>,
    /// The thread's CPU use over the timed part (`None`: not reported here).
    usage: Option<ThreadUsage>,
}

/// Runs one configuration on `device`.
pub fn run_queues(device: &Device, spec: &QueuesSpec) -> Result<RunOutcome> {
    if spec.threads == 0 || spec.threads > MAX_THREADS {
        return Err(Error::invalid(format!("threads must be 1..={MAX_THREADS}")));
    }
    if spec.iters == 0 {
        return Err(Error::invalid(
            "ops per thread (--iters) must be at least 1",
        ));
    }
    let inflight_check = Inflight::new(spec.inflight)?;
    drop(inflight_check);
    let kernel = Kernel::SimpleCompute {
        iters: spec.kernel_iters,
    };
    let pool = StreamPool::new(
        device,
        PoolConfig {
            streams: spec.pool_size,
            lock: spec.lock,
            coalesce: spec.coalesce,
        },
    )?;
    if spec.lock == LockMode::None && spec.scenario == Scenario::Shared && spec.threads > 1 {
        // The runtime would refuse the second thread's acquire; say so before starting.
        return Err(Error::ExclusiveStreamRequired(format!(
            "{} threads cannot share one stream without a lock",
            spec.threads
        )));
    }

    let cpus = if spec.pin {
        allowed_cpus()?
    } else {
        Vec::new()
    };
    let start = Arc::new(Barrier::new(spec.threads + 1));
    let setup_error: Arc<Mutex<Option<Error>>> = Arc::new(Mutex::new(None));
    let handles: Vec<_> = (0..spec.threads)
        .map(|t| {
            let (device, pool, start) = (device.clone(), pool.clone(), start.clone());
            let (setup_error, scenario, data) = (setup_error.clone(), spec.scenario, spec.data);
            let (iters, inflight) = (spec.iters, spec.inflight);
            let cpu = cpu_for_thread(t, &cpus);
            std::thread::Builder::new()
                .name(format!("multiq-bench-{t}"))
                .spawn(move || -> Result<Option<ThreadDone>> {
                    let setup = (|| {
                        // Pinned before anything else, so the warm-up runs where the op will.
                        if let Some(cpu) = cpu {
                            if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                                return Err(Error::invalid(format!(
                                    "--pin-threads: cannot pin thread {t} to CPU {cpu}"
                                )));
                            }
                        }
                        let stream = match scenario {
                            Scenario::Shared => pool.acquire(0)?,
                            Scenario::PerThread => pool.current()?,
                        };
                        let init: Vec<f32> = (0..data).map(|i| initial_value(t, i)).collect();
                        let mut buf = device.buffer_from(&init)?;
                        stream.launch(kernel, &mut buf)?.wait()?; // warm-up
                        Ok::<_, Error>((stream, buf))
                    })();
                    let (stream, mut buf) = match setup {
                        Ok(v) => v,
                        Err(e) => {
                            setup_error.lock().get_or_insert(e);
                            start.wait();
                            return Ok(None);
                        }
                    };
                    start.wait();
                    let started = Instant::now();
                    let usage_before = ThreadUsage::now();
                    if setup_error.lock().is_some() {
                        return Ok(None);
                    }
                    let mut window = Inflight::with_latency(inflight)?;
                    for _ in 0..iters {
                        window.submit(|| stream.launch(kernel, &mut buf))?;
                    }
                    window.drain()?;
                    let finished = Instant::now();
                    let usage = usage_before
                        .zip(ThreadUsage::now())
                        .map(|(before, after)| after.since(&before));
                    let latency = window.latency().cloned().expect("made with_latency");
                    Ok(Some(ThreadDone {
                        thread: t,
                        cpu,
                        buf,
                        started,
                        finished,
                        latency,
                        usage,
                    }))
                })
                .map_err(|e| Error::invalid(format!("cannot start thread {t}: {e}")))
        })
        .collect::<Result<_>>()?;

    let sched = RunSched::start();
    start.wait();
    let t0 = Instant::now();
    let mut done = Vec::with_capacity(spec.threads);
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
    if let Some(e) = setup_error.lock().take() {
        return Err(e);
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    // The clock starts when the first thread leaves the barrier: this thread may be
    // scheduled after a short run has already finished, so its own clock can start late.
    let t0 = done.iter().map(|d| d.started).min().unwrap_or(t0).min(t0);
    let finished = done.iter().map(|d| d.finished).max().unwrap_or(t0);
    let seconds = finished.duration_since(t0).as_secs_f64().max(1e-9);
    let when = RunWhen::between(t0, finished, SystemTime::now(), Instant::now());
    let ops = (spec.threads * spec.iters) as u64;
    let usages: Vec<Option<ThreadUsage>> = done.iter().map(|d| d.usage).collect();
    let host = sched.finish(&usages, ops);
    let per_thread = per_thread(&done, t0);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)
        .map_err(|e| Error::invalid(format!("latency histogram: {e}")))?;
    for d in &done {
        latency
            .add(&d.latency)
            .map_err(|e| Error::invalid(format!("latency histogram: {e}")))?;
    }
    let us = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let latency_us = LatencyUs {
        p50: us(0.5),
        p99: us(0.99),
        p999: us(0.999),
    };

    // Verification, after timing: read back every buffer, compare with the reference.
    let tolerance = device.backend().tolerance(kernel);
    let total_iters = (spec.iters as u64 + 1) * spec.kernel_iters as u64;
    let corrupt = spec.corrupt;
    let checks: Vec<Result<(usize, Verification)>> = done
        .into_par_iter()
        .map(|mut d| {
            let mut out = d.buf.read()?;
            if corrupt && d.thread == 0 {
                let mid = out.len() / 2;
                out[0] += 0.25;
                out[mid] = f32::NAN;
            }
            Ok((
                d.thread,
                verify_buffer(d.thread, &out, total_iters, tolerance),
            ))
        })
        .collect();
    let mut verified_elements = 0u64;
    let mut max_abs_error = 0f32;
    let mut mismatch = None;
    for c in checks {
        let (thread, v) = c?;
        verified_elements += v.checked as u64;
        max_abs_error = max_abs_error.max(v.max_abs_error);
        if let (Some((index, got, expected)), None) = (v.first_mismatch, &mismatch) {
            mismatch = Some(Mismatch {
                thread,
                index,
                got,
                expected,
                tolerance,
            });
        }
    }
    let (coalesce_max_batch, coalesce_max_delay_us) = match spec.coalesce {
        CoalescePolicy::Off | CoalescePolicy::Persistent => (1, 0),
        CoalescePolicy::Fixed {
            max_batch,
            max_delay,
            ..
        }
        | CoalescePolicy::Adaptive {
            max_batch,
            max_delay,
            ..
        } => (
            max_batch,
            u64::try_from(max_delay.as_micros()).unwrap_or(u64::MAX),
        ),
    };
    let row = RunRow {
        workload: "queues",
        preset: spec.preset.clone(),
        scenario: spec.scenario,
        lock: spec.lock,
        inflight: spec.inflight,
        data: spec.data,
        kernel_iters: spec.kernel_iters,
        threads: spec.threads,
        ops,
        seconds,
        ops_per_sec: ops as f64 / seconds,
        speedup: 1.0,
        verified: mismatch.is_none(),
        verified_elements,
        max_abs_error,
        tolerance,
        streams_used: pool.streams_created(),
        wait: device.info().wait,
        coalesce: spec.coalesce.name(),
        coalesce_max_batch,
        coalesce_max_delay_us,
        coalesced_launches: pool.coalesce_stats().map_or(0, |s| s.launches),
        ops_per_launch: pool
            .coalesce_stats()
            .map_or(1.0, |s| s.ops as f64 / s.launches.max(1) as f64),
        latency_us,
        repeats: 1,
        ops_per_sec_min: ops as f64 / seconds,
        ops_per_sec_max: ops as f64 / seconds,
        coalesce_depth: spec.coalesce.depth(),
        coalesce_completion: pool.coalesce_completion().unwrap_or(""),
        coalesce_stats: pool.coalesce_stats(),
        host: Some(host),
        when,
        pinned: spec.pin,
        per_thread: Some(per_thread),
        each_repeat: Vec::new(),
    };
    Ok(RunOutcome { row, mismatch })
}

/// Each thread's finish (from the start signal `t0`), median latency and CPU counters, in
/// thread order.
fn per_thread(done: &[ThreadDone], t0: Instant) -> PerThread {
    let mut by_thread: Vec<&ThreadDone> = done.iter().collect();
    by_thread.sort_by_key(|d| d.thread);
    let round = |x: f64| (x * 1e3).round() / 1e3;
    PerThread {
        finished_ms: by_thread
            .iter()
            .map(|d| round(d.finished.duration_since(t0).as_secs_f64() * 1e3))
            .collect(),
        p50_us: by_thread
            .iter()
            .map(|d| round(d.latency.value_at_quantile(0.5) as f64 / 1e3))
            .collect(),
        cpu_ms: by_thread
            .iter()
            .map(|d| d.usage.map(|u| round(u.cpu.as_secs_f64() * 1e3)))
            .collect(),
        involuntary_switches: by_thread
            .iter()
            .map(|d| d.usage.map(|u| u.involuntary))
            .collect(),
        cpu: by_thread.iter().map(|d| d.cpu).collect(),
    }
}

/// Fills in `speedup` for rows of one configuration (same preset, scenario, lock, inflight):
/// ops/s over the ops/s of the smallest thread count among them.
pub fn fill_speedups(rows: &mut [RunRow]) {
    let keys: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.preset.clone(),
                r.scenario,
                r.lock,
                r.inflight,
                r.data,
                r.kernel_iters,
            )
        })
        .collect();
    for i in 0..rows.len() {
        let base = rows
            .iter()
            .zip(&keys)
            .filter(|(_, k)| **k == keys[i])
            .min_by_key(|(r, _)| r.threads)
            .map(|(r, _)| r.ops_per_sec)
            .unwrap_or(rows[i].ops_per_sec);
        rows[i].speedup = rows[i].ops_per_sec / base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_buffer(thread: usize, n: usize, iters: u32) -> Vec<f32> {
        (0..n)
            .map(|i| simple_compute(initial_value(thread, i), iters))
            .collect()
    }

    #[test]
    fn pinned_threads_take_the_allowed_cpus_in_order_and_wrap_around() {
        let cpus = [2, 3, 7];
        let got: Vec<_> = (0..5).map(|t| cpu_for_thread(t, &cpus)).collect();
        assert_eq!(got, [Some(2), Some(3), Some(7), Some(2), Some(3)]);
        assert_eq!(cpu_for_thread(0, &[]), None);
    }

    #[test]
    fn verification_accepts_the_reference_and_catches_corruption() {
        // Few iterations: simple_compute converges to pi/2 within ~15, after which every
        // element (of every thread) holds the same value.
        let mut out = reference_buffer(3, 1000, 3);
        let ok = verify_buffer(3, &out, 3, 0.0);
        assert_eq!(ok.first_mismatch, None);
        assert_eq!(ok.checked, 1000, "cheap buffers are checked in full");
        out[999] += 1e-3;
        let bad = verify_buffer(3, &out, 3, 0.0);
        assert_eq!(bad.first_mismatch.map(|m| m.0), Some(999));
        // A buffer of another thread's values is wrong too.
        let other = reference_buffer(4, 1000, 3);
        assert!(verify_buffer(3, &other, 3, 0.0).first_mismatch.is_some());
        // NaN never passes, whatever the tolerance.
        out[999] = f32::NAN;
        assert!(verify_buffer(3, &out, 3, 1.0).first_mismatch.is_some());
        // Tiny buffers are checked whole.
        assert_eq!(verify_buffer(3, &out[..1], 3, 0.0).checked, 1);
    }

    #[test]
    fn expensive_buffers_are_sampled_including_both_ends() {
        let n = 100_000;
        let mut out = vec![0.0; n];
        let v = verify_buffer(0, &out, 100_000, 0.0);
        assert_eq!(v.checked, VERIFY_MIN_ELEMENTS);
        assert_eq!(v.first_mismatch.map(|m| m.0), Some(0));
        out[0] = simple_compute(initial_value(0, 0), 100_000);
        let v = verify_buffer(0, &out, 100_000, 0.0);
        assert!(v.first_mismatch.map(|m| m.0).unwrap() > 0);
    }
}
