//! `multiq bench`: the whole study.
//!
//! Per preset: 1-16 threads with a stream each and with one shared stream (lock per-stream,
//! a wait after every op); then at 16 threads every lock mode and async submission (8 in
//! flight). Every table gets a computed verdict; the summary compares presets by the work
//! rate they reach (element-iterations per second) to say whether small ops are launch-bound,
//! and recommends a configuration for this machine.
//!
//! On the CPU backend the presets are scaled so the study takes about two minutes on two cores:
//! buffers hold `units × BLOCK` elements (minimal: a quarter), so one op of a large preset fills
//! the device as 1M elements fill a GPU, and ops per thread are reduced for the heavy presets.
//! Kernel iterations are never scaled. What was scaled is printed and stored in the results.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::progress::{human, Progress};
use super::queues::{self, QueuesSpec};
use super::results::{self, ResultsFile, RunRow, Skipped};
use super::table::{scaling_table, thousands};
use super::Runner;
use super::{verdict, Preset, Scenario};
use crate::backend::{cpu, BackendKind, DeviceOptions};
use crate::error::{Error, Result};
use crate::runtime::{CoalescePolicy, Device, DEFAULT_POOL_SIZE};
use crate::sync::submit_lock::LockMode;

/// Thread counts of the study's scaling runs.
pub const THREADS: [usize; 5] = [1, 2, 4, 8, 16];
/// Ops per thread at full size (GPU): as the anchor program, enough for stable figures.
pub const GPU_ITERS: usize = 300;
/// Depth of the study's async runs.
pub const ASYNC_INFLIGHT: usize = 8;
/// The coalescing policy the study compares with one launch per op.
pub const STUDY_COALESCE: CoalescePolicy = CoalescePolicy::Fixed {
    max_batch: 16,
    max_delay: std::time::Duration::from_micros(20),
    depth: crate::runtime::DEFAULT_DEPTH,
};

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct StudyConfig {
    /// Device to open.
    pub device: DeviceOptions,
    /// Where to write JSON results.
    pub json: Option<PathBuf>,
    /// Where to write the report (`report.md`, charts, and the JSON unless `json` is set).
    pub report: Option<PathBuf>,
    /// Ops per thread for every preset (overrides the defaults).
    pub iters: Option<usize>,
    /// Full-size presets even on the CPU backend.
    pub full: bool,
    /// No progress bar or time estimate.
    pub quiet: bool,
}

/// One preset as the study runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct PresetPlan {
    /// The preset.
    pub preset: Preset,
    /// Elements per buffer.
    pub data: usize,
    /// Kernel iterations.
    pub kernel_iters: u32,
    /// Ops per thread.
    pub iters: usize,
}

/// Elements per buffer of `preset` scaled for a CPU device of `units` execution units:
/// `units × BLOCK` (minimal: a quarter, at least 1,024), so that one op of a large preset fills
/// the device as 1M elements fill a GPU. `bench queues` scales its presets the same way.
pub fn cpu_scaled_data(preset: Preset, units: usize) -> usize {
    let big = units.max(1) * cpu::BLOCK;
    match preset {
        Preset::Heavy | Preset::Default | Preset::Light => big,
        Preset::Minimal => (big / 4).max(1024),
    }
}

/// The study's plan for a device: presets as run, and what was scaled, in words.
pub fn plan(
    kind: BackendKind,
    units: usize,
    full: bool,
    iters: Option<usize>,
) -> (Vec<PresetPlan>, Vec<String>) {
    let mut notes = Vec::new();
    let scaled = kind == BackendKind::Cpu && !full;
    let plans = Preset::ALL
        .iter()
        .map(|&p| {
            let (data, k) = p.shape();
            let (data, default_iters) = if scaled {
                let iters = match p {
                    Preset::Heavy => 4,
                    Preset::Default => 16,
                    Preset::Light | Preset::Minimal => 60,
                };
                (cpu_scaled_data(p, units), iters)
            } else {
                (data, GPU_ITERS)
            };
            PresetPlan {
                preset: p,
                data,
                kernel_iters: k,
                iters: iters.unwrap_or(default_iters),
            }
        })
        .collect::<Vec<_>>();
    if scaled {
        let list = |f: &dyn Fn(&PresetPlan) -> String| {
            plans
                .iter()
                .map(|p| format!("{} {}", p.preset.name(), f(p)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        notes.push(format!(
            "scaled for the CPU backend ({units} execution units): buffers of {} instead of \
             1,048,576 (heavy, default, light) and 65,536 (minimal) elements, so that one op of \
             a large preset fills the device as on a GPU",
            list(&|p| thousands(p.data as f64))
        ));
        notes.push(format!(
            "ops per thread: {} (full size: {GPU_ITERS}); kernel iterations unchanged; use \
             --full for the full-size study",
            list(&|p| p.iters.to_string())
        ));
    } else if iters.is_some() {
        notes.push(format!(
            "ops per thread set by --iters to {}",
            plans[0].iters
        ));
    }
    (plans, notes)
}

/// A run's first lines on stdout: what runs on which device and wait policy, then each note
/// (what was scaled or changed) as `note: …`.
pub fn print_header(what: &str, info: &crate::backend::DeviceInfo, notes: &[String]) -> Result<()> {
    crate::outln!(
        "{what} on {} ({} backend, wait {})",
        info.name,
        info.backend,
        info.wait
    )?;
    for n in notes {
        crate::outln!("note: {n}")?;
    }
    Ok(())
}

/// Refuses sizes the device cannot hold: `threads` buffers of `data` f32 (plus host copies).
pub fn check_memory(device: &Device, data: usize, threads: usize) -> Result<()> {
    let need = (data as u64)
        .saturating_mul(4)
        .saturating_mul(threads as u64);
    if let Some(avail) = device.memory_available() {
        // Device buffers plus the host-side initial values; on the CPU both are host memory.
        let factor = if device.info().backend == BackendKind::Cpu {
            2
        } else {
            1
        };
        if need.saturating_mul(factor) > avail {
            let both = if factor == 2 {
                format!(
                    ", {} with the host's copy of the initial values",
                    need.saturating_mul(2)
                )
            } else {
                String::new()
            };
            return Err(Error::OutOfMemory {
                elements: data.saturating_mul(threads),
                bytes: need,
                device: device.info().name.clone(),
                reason: format!(
                    "--data {data} x {threads} threads: {need} bytes of buffers{both}, more \
                     than the {avail} bytes available"
                ),
            });
        }
    }
    Ok(())
}

/// What the study found.
pub struct StudyOutcome {
    /// Every run.
    pub rows: Vec<RunRow>,
    /// Runs that verification failed.
    pub mismatches: usize,
}

impl StudyOutcome {
    /// Process exit code: 1 when any run failed verification.
    pub fn exit_code(&self) -> i32 {
        i32::from(self.mismatches > 0)
    }
}

fn spec(
    p: &PresetPlan,
    scenario: Scenario,
    lock: LockMode,
    threads: usize,
    inflight: usize,
) -> QueuesSpec {
    QueuesSpec {
        preset: p.preset.name().to_string(),
        data: p.data,
        kernel_iters: p.kernel_iters,
        iters: p.iters,
        inflight,
        lock,
        scenario,
        threads,
        pool_size: DEFAULT_POOL_SIZE,
        coalesce: CoalescePolicy::Off,
        pin: false,
        corrupt: false,
    }
}

/// Every run of one preset, in the order the study makes them: 1-16 threads with a stream
/// each, then shared; at 16 threads the other lock modes and 8 in flight; then coalescing on
/// at 1 and 16 threads, a wait per op and 8 in flight.
pub fn preset_specs(p: &PresetPlan) -> Vec<QueuesSpec> {
    let mut out = Vec::new();
    for scenario in [Scenario::PerThread, Scenario::Shared] {
        for t in THREADS {
            out.push(spec(p, scenario, LockMode::PerStream, t, 1));
        }
    }
    let top = *THREADS.iter().max().expect("threads");
    for scenario in [Scenario::PerThread, Scenario::Shared] {
        for lock in [LockMode::Global, LockMode::None] {
            out.push(spec(p, scenario, lock, top, 1));
        }
    }
    out.push(spec(
        p,
        Scenario::PerThread,
        LockMode::PerStream,
        top,
        ASYNC_INFLIGHT,
    ));
    // Coalescing on, side by side: 1 and 16 threads, a wait per op and 8 in flight.
    for (threads, inflight) in [(1, 1), (top, 1), (top, ASYNC_INFLIGHT)] {
        let mut s = spec(
            p,
            Scenario::PerThread,
            LockMode::PerStream,
            threads,
            inflight,
        );
        s.coalesce = STUDY_COALESCE;
        out.push(s);
    }
    out
}

/// Estimated seconds per spec, from one short single-thread run of each preset: each run
/// costs its ops (threads × ops per thread) at the single-thread op time, plus the set-up and
/// verification seen, per thread. That assumes threads add no throughput, so where they do
/// the study is faster. `None` when a calibration run fails.
pub fn estimate(
    device: &Device,
    plans: &[PresetPlan],
    specs: &[Vec<QueuesSpec>],
) -> Option<Vec<Vec<f64>>> {
    plans
        .iter()
        .zip(specs)
        .map(|(p, specs)| {
            let mut s = spec(p, Scenario::PerThread, LockMode::PerStream, 1, 1);
            s.iters = p.iters.clamp(1, 3);
            let t0 = std::time::Instant::now();
            let o = queues::run_queues(device, &s).ok()?;
            let wall = t0.elapsed().as_secs_f64();
            let per_op = o.row.seconds / o.row.ops.max(1) as f64;
            let overhead = (wall - o.row.seconds).max(0.0);
            Some(
                specs
                    .iter()
                    .map(|x| {
                        let ops = (x.threads * x.iters) as f64;
                        ops * per_op + overhead * x.threads as f64
                    })
                    .collect(),
            )
        })
        .collect()
}

fn describe(s: &QueuesSpec) -> String {
    let mut d = format!(
        "{} {} {}T lock {}",
        s.preset,
        s.scenario.name(),
        s.threads,
        s.lock
    );
    if s.inflight > 1 {
        d += &format!(", {} in flight", s.inflight);
    }
    if s.coalesce != CoalescePolicy::Off {
        d += &format!(", coalescing {}", s.coalesce.name());
    }
    d
}

/// Runs the study, printing as it goes.
pub fn run(cfg: &StudyConfig) -> Result<StudyOutcome> {
    if let Some(path) = &cfg.json {
        results::check_writable(path)?;
    }
    if let Some(dir) = &cfg.report {
        crate::report::prepare_dir(dir, "--report")?;
    }
    let device = Device::open(&cfg.device)?;
    if let Some(why) = device.fallback_reason() {
        crate::outln!("note: CUDA not used ({why}); running on the CPU backend")?;
    }
    let info = device.info().clone();
    let (plans, notes) = plan(info.backend, info.units, cfg.full, cfg.iters);
    for p in &plans {
        check_memory(&device, p.data, *THREADS.iter().max().expect("threads"))?;
    }
    print_header("multiq study", &info, &notes)?;
    let specs: Vec<Vec<QueuesSpec>> = plans.iter().map(preset_specs).collect();
    let mut progress = Progress::new(cfg.quiet);
    let costs = if progress.enabled() {
        estimate(&device, &plans, &specs)
    } else {
        None
    };
    let clock = std::time::Instant::now();
    let total: f64 = costs.iter().flatten().flatten().sum();
    if costs.is_some() {
        progress.note(&format!(
            "multiq: {} runs, estimated at most {} (one op of each preset timed at 1 thread; \
             threads that add throughput make it shorter)",
            specs.iter().map(Vec::len).sum::<usize>(),
            human(std::time::Duration::from_secs_f64(total))
        ));
        progress.start((total * 1000.0).ceil() as u64);
    }
    let started_at = results::now_rfc3339();
    let mut c = Runner::new(&device);
    for (pi, p) in plans.iter().enumerate() {
        progress.print(&format!(
            "\n== preset {}: {} elements x {} kernel iterations, {} ops per thread ==\n",
            p.preset.name(),
            thousands(p.data as f64),
            p.kernel_iters,
            p.iters
        ))?;
        let first = c.rows.len();
        for (si, s) in specs[pi].iter().enumerate() {
            progress.set_message(describe(s));
            c.run(s.clone())?;
            if let Some(costs) = &costs {
                progress.inc((costs[pi][si] * 1000.0).round() as u64);
            }
        }
        queues::fill_speedups(&mut c.rows[first..]);
        progress.print(&preset_report(&c.rows[first..], &c.skipped, p))?;
    }
    progress.finish();
    if costs.is_some() {
        progress.note(&format!(
            "multiq: the study took {} (estimated at most {})",
            human(clock.elapsed()),
            human(std::time::Duration::from_secs_f64(total))
        ));
    }
    let Runner {
        rows,
        skipped,
        mismatches,
        ..
    } = c;
    crate::outln!()?;
    crate::out!("{}", summary(&rows, &plans))?;
    let mut notes = notes;
    let (workloads, bad) = super::workload_study::run(&device, cfg.full, &mut notes, &progress)?;
    let mismatches = mismatches + bad;
    let mut file = ResultsFile::new(info, started_at, notes, rows.clone(), skipped);
    file.workloads = workloads;
    let json = cfg.json.clone().or_else(|| {
        cfg.report
            .as_ref()
            .map(|d| d.join(crate::report::STUDY_JSON))
    });
    if let Some(path) = &json {
        results::write_json(path, &file)?;
        results::say_written(path, format_args!("results written to {}", path.display()))?;
    }
    if let (Some(dir), Some(path)) = (&cfg.report, &json) {
        let inputs = crate::report::Inputs {
            sources: vec![crate::report::input::Source {
                path: path.clone(),
                results: crate::report::input::StoredResults::from_results(&file)?,
            }],
            anchors: Vec::new(),
            command: results::command_line(),
        };
        let w = crate::report::write(dir, inputs)?;
        crate::outln!(
            "report written to {} ({} charts)",
            w.report.display(),
            w.figures.len()
        )?;
    }
    if mismatches > 0 {
        eprintln!("multiq: FAILED: {mismatches} run(s) did not match the reference");
    }
    Ok(StudyOutcome { rows, mismatches })
}

fn sweep(rows: &[RunRow], scenario: Scenario) -> Vec<&RunRow> {
    rows.iter()
        .filter(|r| {
            r.scenario == scenario
                && r.lock == LockMode::PerStream
                && r.inflight == 1
                && r.coalesce == "off"
        })
        .collect()
}

fn best(rows: &[&RunRow]) -> Option<(usize, f64)> {
    rows.iter()
        .map(|r| (r.threads, r.ops_per_sec))
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

fn preset_report(rows: &[RunRow], skipped: &[Skipped], p: &PresetPlan) -> String {
    let mut s = String::new();
    let per = sweep(rows, Scenario::PerThread);
    let shared = sweep(rows, Scenario::Shared);
    s += &scaling_table(
        "scenario per-thread (a stream per thread), lock per-stream, wait after every op",
        &per,
    );
    s += &scaling_table(
        "scenario shared (one stream), lock per-stream, wait after every op",
        &shared,
    );
    let top = *THREADS.iter().max().expect("threads");
    let reference = per.iter().find(|r| r.threads == top).map(|r| r.ops_per_sec);
    let _ = writeln!(s, "{top} threads, every lock mode and async submission:");
    let _ = writeln!(
        s,
        "  {:<11} {:<11} {:>8} {:>9} {:>12} {:>15} {:>9} {:>12}",
        "scenario",
        "lock",
        "inflight",
        "coalesce",
        "ops/s",
        "vs per-thread",
        "p99 us",
        "ops/launch"
    );
    let mut at_top: Vec<&RunRow> = rows.iter().filter(|r| r.threads == top).collect();
    at_top.sort_by_key(|r| {
        (
            r.scenario.name(),
            r.lock.to_string(),
            r.inflight,
            r.coalesce,
        )
    });
    for r in at_top {
        let vs = reference.map_or(String::new(), |b| format!("{:.2}x", r.ops_per_sec / b));
        let check = if r.verified { "" } else { "  MISMATCH" };
        let _ = writeln!(
            s,
            "  {:<11} {:<11} {:>8} {:>9} {:>12} {:>15} {:>9.1} {:>12.1}{check}",
            r.scenario.name(),
            r.lock.to_string(),
            r.inflight,
            r.coalesce,
            thousands(r.ops_per_sec),
            vs,
            r.latency_us.p99,
            r.ops_per_launch
        );
    }
    let one = |coalesce: &str| {
        rows.iter()
            .find(|r| {
                r.threads == 1
                    && r.inflight == 1
                    && r.coalesce == coalesce
                    && r.scenario == Scenario::PerThread
                    && r.lock == LockMode::PerStream
            })
            .map(|r| r.ops_per_sec)
    };
    if let (Some(off), Some(on)) = (one("off"), one(STUDY_COALESCE.name())) {
        let _ = writeln!(
            s,
            "1 thread, coalescing {} vs off: {} vs {} ops/s ({:.2}x)",
            STUDY_COALESCE.name(),
            thousands(on),
            thousands(off),
            on / off
        );
    }
    for k in skipped.iter().filter(|k| k.preset == p.preset.name()) {
        let _ = writeln!(
            s,
            "  {:<11} {:<11} {:>8} {:>12}  rejected: {}",
            k.scenario.name(),
            k.lock.to_string(),
            1,
            "-",
            k.reason
        );
    }
    if let (Some((_, bp)), Some((_, bs))) = (best(&per), best(&shared)) {
        let vp = verdict::judge(
            &per.iter()
                .map(|r| (r.threads, r.ops_per_sec))
                .collect::<Vec<_>>(),
        );
        let vs = verdict::judge(
            &shared
                .iter()
                .map(|r| (r.threads, r.ops_per_sec))
                .collect::<Vec<_>>(),
        );
        let diagnosis = match (vp.map(|v| v.max_speedup), vs.map(|v| v.max_speedup)) {
            (Some(a), Some(b)) if a >= verdict::SERIALIZED_SPEEDUP && bp > bs * 1.2 => format!(
                "per-thread streams run in parallel (x{a:.2}); one shared stream serializes \
                 (x{b:.2}): the limit is the queue, not the device"
            ),
            (Some(a), _) if a < verdict::SERIALIZED_SPEEDUP => format!(
                "no scenario gains from threads (per-thread x{a:.2}): one op already keeps the \
                 device busy, so the device is saturated, not the queue"
            ),
            (Some(a), Some(b)) => format!(
                "per-thread x{a:.2}, shared x{b:.2}: both scale alike, so submission order is not \
                 the limit"
            ),
            _ => String::new(),
        };
        if !diagnosis.is_empty() {
            let _ = writeln!(s, "diagnosis: {diagnosis}");
        }
    }
    s
}

fn summary(rows: &[RunRow], plans: &[PresetPlan]) -> String {
    let mut s = String::from("== summary ==\n");
    // Work rate: element-iterations per second, the device's useful throughput.
    let rate = |r: &RunRow| r.ops_per_sec * r.data as f64 * r.kernel_iters.max(1) as f64;
    let limit = rows.iter().map(rate).fold(0.0f64, f64::max);
    let _ = writeln!(
        s,
        "  {:<8} {:>12} {:>22} {:>20} {:>11} {:>13} {:>14}",
        "preset",
        "1T ops/s",
        "best per-thread",
        "best shared",
        "global/per",
        "% of limit",
        "coalesced/off"
    );
    let mut recs = Vec::new();
    for p in plans {
        let name = p.preset.name();
        let of: Vec<RunRow> = rows.iter().filter(|r| r.preset == name).cloned().collect();
        let per = sweep(&of, Scenario::PerThread);
        let shared = sweep(&of, Scenario::Shared);
        let (Some(one), Some((bt, bp)), Some((st, bs))) = (
            per.iter().find(|r| r.threads == 1),
            best(&per),
            best(&shared),
        ) else {
            continue;
        };
        let top = *THREADS.iter().max().expect("threads");
        let at_with = |lock, coalesce: &str| {
            of.iter()
                .find(|r| {
                    r.scenario == Scenario::PerThread
                        && r.lock == lock
                        && r.threads == top
                        && r.inflight == 1
                        && r.coalesce == coalesce
                })
                .map(|r| r.ops_per_sec)
        };
        let at = |lock| at_with(lock, "off");
        let coalesce_ratio = match (
            at_with(LockMode::PerStream, STUDY_COALESCE.name()),
            at(LockMode::PerStream),
        ) {
            (Some(c), Some(o)) => format!("{:.2}", c / o),
            _ => "-".into(),
        };
        let lock_ratio = match (at(LockMode::Global), at(LockMode::PerStream)) {
            (Some(g), Some(ps)) => format!("{:.2}", g / ps),
            _ => "-".into(),
        };
        let best_row = per
            .iter()
            .find(|r| r.threads == bt)
            .expect("best row exists");
        let frac = if limit > 0.0 {
            100.0 * rate(best_row) / limit
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "  {:<8} {:>12} {:>14} ({:>2}T) {:>12} ({:>2}T) {:>11} {:>12.0}% {:>14}",
            name,
            thousands(one.ops_per_sec),
            thousands(bp),
            bt,
            thousands(bs),
            st,
            lock_ratio,
            frac,
            coalesce_ratio
        );
        // Smallest thread count within 90% of the best.
        let enough = per
            .iter()
            .filter(|r| r.ops_per_sec >= 0.9 * bp)
            .map(|r| r.threads)
            .min()
            .unwrap_or(bt);
        recs.push((name, enough, frac));
    }
    let _ = writeln!(
        s,
        "  (global/per: ops/s with one global submission mutex over a lock per stream, 16 threads; \
         % of limit: element-iterations per second at the best thread count over the best any \
         preset reached, the device's measured limit; coalesced/off: 16 threads, coalescing on \
         over one launch per op)"
    );
    for (name, enough, frac) in recs {
        let why = if frac < 50.0 {
            format!(
                "small ops reach only {frac:.0}% of the device's limit: they are bound by \
                 launch and wait, not compute; batching several ops per launch is the way past it"
            )
        } else {
            format!("{frac:.0}% of the device's limit: compute-bound")
        };
        let _ = writeln!(s, "recommendation, {name}: {enough} thread(s) with a stream each (per-stream lock); {why}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_plan_scales_data_to_units_and_says_so() {
        let (plans, notes) = plan(BackendKind::Cpu, 2, false, None);
        assert_eq!(plans[0].data, 2 * cpu::BLOCK);
        assert_eq!(plans[3].data, 2 * cpu::BLOCK / 4);
        assert!(plans.iter().all(|p| p.kernel_iters == p.preset.shape().1));
        assert_eq!(notes.len(), 2);
        let (full, notes) = plan(BackendKind::Cpu, 2, true, Some(7));
        assert_eq!(full[0].data, 1 << 20);
        assert!(full.iter().all(|p| p.iters == 7));
        assert_eq!(notes.len(), 1);
        let (gpu, notes) = plan(BackendKind::Cuda, 132, false, None);
        assert!(gpu
            .iter()
            .all(|p| p.iters == GPU_ITERS && p.data == p.preset.shape().0));
        assert!(notes.is_empty());
    }
}
