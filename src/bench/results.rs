//! The JSON results contract. Later tools read these names: add fields freely, never rename.
//!
//! `{"multiq_version", "git_commit", "backend", "device", "host_threads", "started_at",
//! "command", "runs": [{"workload": "queues", "preset", "scenario", "lock", "inflight", "data",
//! "kernel_iters", "threads", "ops", "seconds", "ops_per_sec", "speedup", "verified"}]}`

use std::path::Path;

use serde::Serialize;

use super::Scenario;
use crate::backend::{BackendKind, DeviceInfo, WaitPolicy};
use crate::error::{Error, Result};
use crate::sync::submit_lock::LockMode;

/// The commit this binary was built from (`-dirty` when the tree had changes), or `unknown`.
pub const GIT_COMMIT: &str = match option_env!("MULTIQ_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

/// One results file.
#[derive(Clone, Debug, Serialize)]
pub struct ResultsFile {
    /// multiq's version.
    pub multiq_version: &'static str,
    /// Commit the binary was built from.
    pub git_commit: &'static str,
    /// Backend the runs used.
    pub backend: BackendKind,
    /// Device name.
    pub device: String,
    /// Host threads available (`available_parallelism`).
    pub host_threads: usize,
    /// When the study started (RFC 3339, UTC).
    pub started_at: String,
    /// The command line that produced this file.
    pub command: String,
    /// Everything known about the device.
    pub device_info: DeviceInfo,
    /// What was scaled or changed from the full-size study, in words.
    pub notes: Vec<String>,
    /// One row per run.
    pub runs: Vec<RunRow>,
    /// Combinations that were not run, and why (e.g. lock `none` on a shared stream).
    pub skipped: Vec<Skipped>,
    /// The study's model workloads (matmul, mlp), when it ran them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<super::workload::WorkloadRow>,
}

impl ResultsFile {
    /// A results file for runs on the device described by `info`, stamped with this binary's
    /// version and commit and this process's command line.
    pub fn new(
        info: DeviceInfo,
        started_at: String,
        notes: Vec<String>,
        runs: Vec<RunRow>,
        skipped: Vec<Skipped>,
    ) -> Self {
        ResultsFile {
            multiq_version: env!("CARGO_PKG_VERSION"),
            git_commit: GIT_COMMIT,
            backend: info.backend,
            device: info.name.clone(),
            host_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            started_at,
            command: command_line(),
            device_info: info,
            notes,
            runs,
            skipped,
            workloads: Vec::new(),
        }
    }
}

/// One measured run.
#[derive(Clone, Debug, Serialize)]
pub struct RunRow {
    /// Always `queues` for the multi-queue test.
    pub workload: &'static str,
    /// Preset name (or `custom`).
    pub preset: String,
    /// Which streams threads used.
    pub scenario: Scenario,
    /// Submission lock mode.
    pub lock: LockMode,
    /// Ops outstanding per thread (1 = wait after every op).
    pub inflight: usize,
    /// f32 elements per buffer.
    pub data: usize,
    /// Kernel iterations per element per op.
    pub kernel_iters: u32,
    /// Submitting threads.
    pub threads: usize,
    /// Ops timed (threads × ops per thread).
    pub ops: u64,
    /// Seconds from the start signal to the last thread's last completion.
    pub seconds: f64,
    /// ops / seconds.
    pub ops_per_sec: f64,
    /// ops/s over the same configuration's ops/s at the smallest thread count measured.
    pub speedup: f64,
    /// Every checked element matched the reference within tolerance.
    pub verified: bool,
    /// Elements compared against the reference (per buffer, summed over threads).
    pub verified_elements: u64,
    /// Largest absolute difference from the reference seen.
    pub max_abs_error: f32,
    /// Tolerance allowed (0 = bit-identical).
    pub tolerance: f32,
    /// Streams the pool created for the run.
    pub streams_used: usize,
    /// Wait policy in force.
    pub wait: WaitPolicy,
    /// Cross-thread coalescing policy (`off` = one launch per op).
    pub coalesce: &'static str,
    /// With coalescing on: most ops per grouped launch the policy allowed (1 when off).
    pub coalesce_max_batch: usize,
    /// With coalescing on: longest an op waited for others, in microseconds (0 when off).
    pub coalesce_max_delay_us: u64,
    /// With coalescing on: grouped launches made during the run (warm-up included).
    pub coalesced_launches: u64,
    /// With coalescing on: ops per grouped launch, on average (1.0 when off).
    pub ops_per_launch: f64,
    /// Per-op latency, submission to completion seen by the submitting thread.
    pub latency_us: LatencyUs,
    /// Times the run was repeated; the row is the median run by ops/s.
    pub repeats: usize,
    /// Lowest ops/s among the repeats.
    pub ops_per_sec_min: f64,
    /// Highest ops/s among the repeats.
    pub ops_per_sec_max: f64,
    /// With coalescing on: batches queued on the device before new ops wait (0 when off).
    pub coalesce_depth: usize,
    /// With coalescing on: how waiters learn a batch completed, `signal` (a host word the
    /// stream writes) or `event`; empty when off.
    pub coalesce_completion: &'static str,
    /// With coalescing on: launches, ops and the average time breakdown of a batch (pending,
    /// launch call, launch-to-completion), warm-up included.
    pub coalesce_stats: Option<crate::runtime::CoalesceStats>,
    /// What the host's CPUs did during the run: the submitting threads' CPU time and context
    /// switches, the hypervisor's steal (`null` fields where the system does not say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<super::host_sched::HostSched>,
    /// When the timed part ran, to line the run up with samples taken beside it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<RunWhen>,
    /// Each submitting thread ran pinned to its own CPU (`--pin-threads`; `per_thread.cpu`
    /// says which).
    pub pinned: bool,
    /// Each submitting thread's own part of the run (absent where a workload does not
    /// measure it): a run lasts until its last thread's last op, so one slow thread lowers
    /// ops/s however fast the others were, and this shows which.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_thread: Option<PerThread>,
    /// With repeats: every repeat's ops/s and host counters, in the order they ran (the row
    /// itself is the median one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub each_repeat: Vec<RepeatRun>,
}

/// Each submitting thread of a run, one entry per thread in thread order (every list is as
/// long as the run's threads).
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PerThread {
    /// Milliseconds from the run's start signal to the thread's last op's completion.
    pub finished_ms: Vec<f64>,
    /// The thread's median latency, microseconds.
    pub p50_us: Vec<f64>,
    /// The thread's CPU time over its timed part, milliseconds (`null` where not reported).
    pub cpu_ms: Vec<Option<f64>>,
    /// Times the scheduler took the thread's CPU away (`null` where not reported).
    pub involuntary_switches: Vec<Option<u64>>,
    /// The CPU the thread was pinned to (`null`: not pinned).
    pub cpu: Vec<Option<usize>>,
}

impl PerThread {
    /// The last thread's finish over the median thread's, the lower middle one of an even
    /// count (1.0: all finished together; 1.25: the run lasted a quarter longer than its
    /// median thread). `None` without threads.
    pub fn straggle(&self) -> Option<f64> {
        let mut f = self.finished_ms.clone();
        f.sort_by(f64::total_cmp);
        let (last, median) = (*f.last()?, f[(f.len() - 1) / 2]);
        (median > 0.0).then(|| last / median)
    }
}

/// One repeat of a run.
#[derive(Clone, Debug, Serialize)]
pub struct RepeatRun {
    /// Its ops/s.
    pub ops_per_sec: f64,
    /// Its host counters.
    pub host: Option<super::host_sched::HostSched>,
    /// When it ran.
    pub when: Option<RunWhen>,
    /// Its threads, each on its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_thread: Option<PerThread>,
    /// Its coalescer's counters (kernel launches, for the device queue: how often its kernel
    /// was launched, relaunches after it left included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coalesce_stats: Option<crate::runtime::CoalesceStats>,
}

/// When a run's timed part ran, in milliseconds since the Unix epoch by the host's clock: a
/// run can be lined up with what was sampled beside it (the GPU's clocks, say).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RunWhen {
    /// The start signal.
    pub start_unix_ms: f64,
    /// The last thread's last completion.
    pub end_unix_ms: f64,
}

impl RunWhen {
    /// The span from `start` to `end` (`start` ≤ `end`), placed on the wall clock by one
    /// reading of both clocks, `now` and `now_instant`, taken at the same moment after `end`.
    pub fn between(
        start: std::time::Instant,
        end: std::time::Instant,
        now: std::time::SystemTime,
        now_instant: std::time::Instant,
    ) -> Option<RunWhen> {
        let at = |i: std::time::Instant| {
            let ago = now_instant.checked_duration_since(i)?;
            let t = now.checked_sub(ago)?;
            let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
            Some(since.as_secs_f64() * 1e3)
        };
        Some(RunWhen {
            start_unix_ms: at(start)?,
            end_unix_ms: at(end)?,
        })
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LatencyUs {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
}

/// A combination that was not run.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    /// Preset name.
    pub preset: String,
    /// Scenario.
    pub scenario: Scenario,
    /// Lock mode.
    pub lock: LockMode,
    /// Threads.
    pub threads: usize,
    /// The error that rejected it.
    pub reason: String,
}

/// The current time as RFC 3339 (UTC, seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The command line of this process, for results.
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().collect();
    let mut out = String::from("multiq");
    for a in args.iter().skip(1) {
        out.push(' ');
        if a.contains(' ') {
            out.push_str(&format!("'{a}'"));
        } else {
            out.push_str(a);
        }
    }
    out
}

/// Checks early that `path` can be written, so a bad `--json` fails before any run (a usage
/// error). A link is checked at the file it names; a device or pipe (`/dev/stdout`) is written
/// through at the end.
pub fn check_writable(path: &Path) -> Result<()> {
    let bad = |why: String| Err(Error::invalid(format!("--json {}: {why}", path.display())));
    use crate::atomic_file::Target;
    let file = match crate::atomic_file::target(path) {
        Ok(Target::Descriptor(fd)) if crate::atomic_file::is_open(fd) => return Ok(()),
        Ok(Target::Descriptor(fd)) => return bad(format!("descriptor {fd} is not open")),
        Ok(Target::Stream(stream)) => {
            return std::fs::metadata(stream)
                .map(drop)
                .or_else(|e| bad(e.to_string()));
        }
        Ok(Target::File(file)) => file,
        Err(e) => return bad(e.to_string()),
    };
    if file.is_dir() {
        return bad("is a directory".into());
    }
    let dir = crate::atomic_file::folder(&file);
    if !dir.is_dir() {
        return bad(format!("directory {} does not exist", dir.display()));
    }
    match tempfile_in(dir) {
        Ok(_) => Ok(()),
        Err(e) => bad(format!("cannot create a file in {}: {e}", dir.display())),
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<(std::fs::File, std::path::PathBuf)> {
    let name = format!(
        ".multiq-{}-{}.tmp",
        std::process::id(),
        crate::sync::thread_id::current()
    );
    let path = dir.join(name);
    let f = std::fs::File::create(&path)?;
    let _ = std::fs::remove_file(&path);
    Ok((f, path))
}

/// Prints `line` (what was written to `path`) on stdout, or on stderr when `path` is stdout
/// itself, so the note never lands inside what was written (`--json /dev/stdout > file`).
pub fn say_written(path: &Path, line: std::fmt::Arguments<'_>) -> Result<()> {
    if crate::atomic_file::is_stdout(path) {
        eprintln!("{line}");
        Ok(())
    } else {
        crate::outln!("{line}")
    }
}

/// Writes `results` to `path` atomically: a complete file or none (temp file, then rename).
pub fn write_json<T: Serialize>(path: &Path, results: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(results).expect("results serialize");
    text.push('\n');
    crate::atomic_file::write(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    #[test]
    fn straggle_is_the_last_thread_over_the_median_one() {
        let p = |f: &[f64]| PerThread {
            finished_ms: f.to_vec(),
            ..PerThread::default()
        };
        assert_eq!(p(&[10.0, 10.0, 10.0]).straggle(), Some(1.0));
        // Thread order does not matter; the median of four is the lower middle one.
        assert_eq!(p(&[10.0, 12.0]).straggle(), Some(1.2));
        assert_eq!(p(&[12.5, 10.0, 10.0, 10.0]).straggle(), Some(1.25));
        assert_eq!(p(&[8.0, 10.0, 20.0, 10.0]).straggle(), Some(2.0));
        assert_eq!(p(&[]).straggle(), None);
        assert_eq!(p(&[0.0]).straggle(), None, "nothing to divide by");
    }

    #[test]
    fn a_run_is_placed_on_the_wall_clock_by_one_reading_taken_after_it() {
        let start = Instant::now();
        let end = start + Duration::from_millis(250);
        let now_instant = end + Duration::from_millis(1000);
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let when = RunWhen::between(start, end, now, now_instant).unwrap();
        assert_eq!(when.end_unix_ms, 1_800_000_000_000.0 - 1000.0);
        assert_eq!(when.start_unix_ms, when.end_unix_ms - 250.0);
        // A reading taken before the run ended cannot place it.
        assert_eq!(RunWhen::between(start, end, now, start), None);
        // Nor can a clock before the epoch.
        assert_eq!(RunWhen::between(start, end, UNIX_EPOCH, now_instant), None);
        // The real clocks put a run that just ended at about now.
        let real = RunWhen::between(start, start, SystemTime::now(), Instant::now()).unwrap();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            * 1e3;
        assert!((now_ms - real.end_unix_ms).abs() < 60_000.0);
    }
}
