//! Results files as the report reads them: the JSON contract of [`crate::bench::results`],
//! read back.
//!
//! Enumerated fields (scenario, lock, wait, coalesce) are read as strings, so a file written
//! by a later multiq with a new lock mode or policy still loads; fields added after a file was
//! written take their defaults (`coalesce` "off", no latency), so every stored file loads.
//! A file that is not JSON, or lacks what a report needs (`runs`, and per run `preset`,
//! `scenario`, `threads`, `ops_per_sec`), is an [`Error::BadInput`] naming the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bench::results::ResultsFile;
use crate::error::{Error, Result};

/// One results file, as stored.
#[derive(Clone, Debug, Deserialize)]
pub struct StoredResults {
    /// multiq's version.
    #[serde(default)]
    pub multiq_version: String,
    /// Commit the measuring binary was built from.
    #[serde(default)]
    pub git_commit: String,
    /// Backend the runs used.
    #[serde(default)]
    pub backend: String,
    /// Device name.
    #[serde(default)]
    pub device: String,
    /// Host threads available.
    #[serde(default)]
    pub host_threads: usize,
    /// When the runs started (RFC 3339).
    #[serde(default)]
    pub started_at: String,
    /// The command line that produced the file.
    #[serde(default)]
    pub command: String,
    /// Everything known about the device.
    #[serde(default)]
    pub device_info: StoredDeviceInfo,
    /// What was scaled, in words.
    #[serde(default)]
    pub notes: Vec<String>,
    /// One row per run.
    pub runs: Vec<StoredRun>,
    /// Combinations that were not run.
    #[serde(default)]
    pub skipped: Vec<StoredSkipped>,
}

/// `device_info`, as stored.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StoredDeviceInfo {
    /// Backend.
    #[serde(default)]
    pub backend: String,
    /// Device name.
    #[serde(default)]
    pub name: String,
    /// Execution units.
    #[serde(default)]
    pub units: usize,
    /// Device memory in bytes.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// Driver version.
    #[serde(default)]
    pub driver: Option<String>,
    /// Wait policy.
    #[serde(default)]
    pub wait: String,
    /// Backend-specific facts.
    #[serde(default)]
    pub extra: Vec<(String, String)>,
}

/// Per-op latency, as stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
pub struct StoredLatency {
    /// Median, µs.
    pub p50: f64,
    /// 99th percentile, µs.
    pub p99: f64,
    /// 99.9th percentile, µs.
    pub p999: f64,
}

/// One run, as stored.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct StoredRun {
    /// Workload (`queues`).
    #[serde(default = "default_workload")]
    pub workload: String,
    /// Preset name.
    pub preset: String,
    /// `shared` or `per-thread`.
    pub scenario: String,
    /// Submission lock mode.
    #[serde(default = "default_lock")]
    pub lock: String,
    /// Ops outstanding per thread.
    #[serde(default = "one")]
    pub inflight: usize,
    /// f32 elements per buffer.
    #[serde(default)]
    pub data: usize,
    /// Kernel iterations per element per op.
    #[serde(default)]
    pub kernel_iters: u32,
    /// Submitting threads.
    pub threads: usize,
    /// Ops timed.
    #[serde(default)]
    pub ops: u64,
    /// Seconds timed.
    #[serde(default)]
    pub seconds: f64,
    /// ops / seconds.
    pub ops_per_sec: f64,
    /// Over the same configuration at its smallest thread count.
    #[serde(default)]
    pub speedup: f64,
    /// Every checked element matched.
    #[serde(default)]
    pub verified: bool,
    /// Wait policy.
    #[serde(default)]
    pub wait: String,
    /// Coalescing policy (`off` in files older than coalescing).
    #[serde(default = "default_coalesce")]
    pub coalesce: String,
    /// Most ops per grouped launch the policy allowed (0 = not recorded).
    #[serde(default)]
    pub coalesce_max_batch: usize,
    /// Batches queued on the device before new ops wait (0 = off or not recorded).
    #[serde(default)]
    pub coalesce_depth: usize,
    /// Ops per grouped launch, on average.
    #[serde(default = "one_f64")]
    pub ops_per_launch: f64,
    /// Latency percentiles (absent in files older than latency recording).
    #[serde(default)]
    pub latency_us: Option<StoredLatency>,
    /// Repeats the row is the median of.
    #[serde(default = "one")]
    pub repeats: usize,
    /// What the host's CPUs did during the run (absent in files older than these counters).
    #[serde(default)]
    pub host: Option<StoredHost>,
    /// Each submitting thread on its own (absent in files older than it).
    #[serde(default)]
    pub per_thread: Option<crate::bench::results::PerThread>,
}

/// `host` of a run, as stored: each count `None` where the measuring system did not give it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
pub struct StoredHost {
    /// The submitting threads' CPU time per op, µs.
    #[serde(default)]
    pub cpu_per_op_us: Option<f64>,
    /// Times the scheduler took a submitting thread's CPU away.
    #[serde(default)]
    pub involuntary_switches: Option<u64>,
    /// CPU time the hypervisor took from the machine during the run, ms.
    #[serde(default)]
    pub steal_ms: Option<f64>,
}

/// A combination that was not run, as stored.
#[derive(Clone, Debug, Deserialize)]
pub struct StoredSkipped {
    /// Preset.
    #[serde(default)]
    pub preset: String,
    /// Scenario.
    #[serde(default)]
    pub scenario: String,
    /// Lock mode.
    #[serde(default)]
    pub lock: String,
    /// Threads.
    #[serde(default)]
    pub threads: usize,
    /// Why.
    #[serde(default)]
    pub reason: String,
}

fn default_workload() -> String {
    "queues".into()
}
fn default_lock() -> String {
    "per-stream".into()
}
fn default_coalesce() -> String {
    "off".into()
}
fn one() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}

/// A results file and where it came from.
#[derive(Clone, Debug)]
pub struct Source {
    /// The path as given.
    pub path: PathBuf,
    /// The file's contents.
    pub results: StoredResults,
}

impl StoredResults {
    /// Parses `text` (the contents of `path`) and checks every run is usable.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let bad = |reason: String| Error::BadInput {
            path: path.display().to_string(),
            reason,
        };
        let results: StoredResults = serde_json::from_str(text).map_err(|e| {
            bad(match other_kind(text) {
                Some(kind) => format!(
                    "{kind} results, which report does not read (it reads those of `multiq \
                     bench` and `multiq bench queues`)"
                ),
                None => format!("not a multiq results file: {e}"),
            })
        })?;
        results.check().map_err(bad)?;
        Ok(results)
    }
}

/// The kind of another multiq results file (`bench matmul`, `bench mlp`, `stress`), if `text`
/// is one.
fn other_kind(text: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get("multiq_version")?;
    if v.get("summary_line").is_some() {
        return Some("`multiq stress`".into());
    }
    let workload = v.get("runs")?.get(0)?.get("workload")?.as_str()?;
    // Rows of `bench` and `bench queues` say "queues": such a file is one report reads, and
    // its own parse error says what is wrong with it.
    matches!(workload, "matmul" | "mlp").then(|| format!("`multiq bench {workload}`"))
}

impl StoredResults {
    /// Reads and parses the results file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// The results of a run just made, as a report reads them (through the same JSON, so a
    /// report of a live run and one of its stored file are the same).
    pub fn from_results(results: &ResultsFile) -> Result<Self> {
        let value = serde_json::to_value(results).map_err(|e| Error::BadInput {
            path: "(results of this run)".into(),
            reason: e.to_string(),
        })?;
        let stored: StoredResults = serde_json::from_value(value).map_err(|e| Error::BadInput {
            path: "(results of this run)".into(),
            reason: e.to_string(),
        })?;
        stored.check().map_err(|reason| Error::BadInput {
            path: "(results of this run)".into(),
            reason,
        })?;
        Ok(stored)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.runs.is_empty() {
            return Err("has no runs: nothing to report".into());
        }
        for (i, r) in self.runs.iter().enumerate() {
            if r.threads == 0 {
                return Err(format!("run {i} ({}) has 0 threads", r.preset));
            }
            if !r.ops_per_sec.is_finite() || r.ops_per_sec < 0.0 {
                return Err(format!(
                    "run {i} ({}) has ops_per_sec {}: not a throughput",
                    r.preset, r.ops_per_sec
                ));
            }
        }
        Ok(())
    }

    /// The device name, from `device` or `device_info.name`.
    pub fn device_name(&self) -> &str {
        if self.device.is_empty() {
            &self.device_info.name
        } else {
            &self.device
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_wrong_shapes_are_errors_naming_the_file() {
        let p = Path::new("x.json");
        for (text, needle) in [
            ("", "not a multiq results file"),
            ("not json", "not a multiq results file"),
            ("{}", "missing field `runs`"),
            ("{\"runs\": []}", "has no runs"),
            ("{\"runs\": [{\"preset\": \"a\"}]}", "missing field"),
            (
                "{\"runs\": [{\"preset\": \"a\", \"scenario\": \"shared\", \"threads\": 0, \
                 \"ops_per_sec\": 1.0}]}",
                "0 threads",
            ),
            (
                "{\"multiq_version\": \"0.1.0\", \"summary_line\": \"rounds=1\"}",
                "`multiq stress` results, which report does not read",
            ),
            (
                "{\"multiq_version\": \"0.1.0\", \"runs\": [{\"workload\": \"matmul\"}]}",
                "`multiq bench matmul` results, which report does not read",
            ),
            // A `bench queues` file with a problem: its own error, not "another kind".
            (
                "{\"multiq_version\": \"0.1.0\", \"runs\": [{\"workload\": \"queues\"}]}",
                "missing field",
            ),
        ] {
            let e = StoredResults::parse(p, text).unwrap_err().to_string();
            assert!(e.starts_with("x.json: "), "{e}");
            assert!(e.contains(needle), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn old_files_load_with_defaults() {
        let text = r#"{"runs": [{"preset": "light", "scenario": "per-thread", "threads": 2,
                       "ops_per_sec": 10.0, "data": 8, "kernel_iters": 10}]}"#;
        let r = StoredResults::parse(Path::new("old.json"), text).unwrap();
        let run = &r.runs[0];
        assert_eq!(run.coalesce, "off");
        assert_eq!(run.lock, "per-stream");
        assert_eq!(run.inflight, 1);
        assert!(run.latency_us.is_none());
        assert_eq!(run.ops_per_launch, 1.0);
    }
}
