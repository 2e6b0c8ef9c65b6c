//! The study: `multiq bench` (everything) and `multiq bench queues` (the multi-queue test).
//!
//! - `queues`: one run = N threads × `iters` ops on one preset, scenario, lock mode and
//!   inflight depth, timed and then verified against the host reference.
//! - `verdict`: what a curve of ops/s over thread counts says (saturation, speedup, class).
//! - `study`: the whole matrix, scaled down on CPU, with tables and verdicts.
//! - `results`: the JSON contract later tools read.
//! - `progress`: the progress bar and time estimate on stderr for long runs.
//! - `matmul`, `mlp`: the model workloads (`multiq bench matmul`, `multiq bench mlp`), with
//!   their rows, file and thread harness in `workload`.

pub mod matmul;
pub mod mlp;
pub mod progress;
pub mod queues;
pub mod results;
pub mod study;
pub mod table;
pub mod verdict;
pub mod workload;
pub mod workload_study;

use crate::error::{Error, Result};
use crate::runtime::Device;
use queues::QueuesSpec;
use results::{RunRow, Skipped};

/// Runs specs on one device, sorting outcomes into rows, rejected combinations (usage errors
/// such as lock `none` on a shared stream) and verification mismatches, which are reported
/// on stderr as they happen. Other errors stop the study.
pub struct Runner<'d> {
    device: &'d Device,
    /// Times each spec is run; the median run (by ops/s) is kept.
    pub repeat: usize,
    /// Measured runs.
    pub rows: Vec<RunRow>,
    /// Rejected combinations.
    pub skipped: Vec<Skipped>,
    /// Runs that failed verification.
    pub mismatches: usize,
}

impl<'d> Runner<'d> {
    /// A runner on `device`, running each spec once.
    pub fn new(device: &'d Device) -> Self {
        Runner {
            device,
            repeat: 1,
            rows: Vec::new(),
            skipped: Vec::new(),
            mismatches: 0,
        }
    }

    /// Runs one spec `repeat` times and keeps the median run (by ops/s); the spread goes into
    /// the row. A mismatch in any repeat marks the row unverified.
    pub fn run(&mut self, s: QueuesSpec) -> Result<()> {
        let mut outcomes = Vec::with_capacity(self.repeat.max(1));
        for _ in 0..self.repeat.max(1) {
            match queues::run_queues(self.device, &s) {
                Ok(o) => outcomes.push(o),
                Err(e) if e.is_usage() => {
                    self.skipped.push(Skipped {
                        preset: s.preset.clone(),
                        scenario: s.scenario,
                        lock: s.lock,
                        threads: s.threads,
                        reason: e.to_string(),
                    });
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        let mut mismatched = false;
        for m in outcomes.iter().filter_map(|o| o.mismatch.as_ref()) {
            eprintln!(
                "multiq: {} {} {} threads: {m}",
                s.preset,
                s.scenario.name(),
                s.threads
            );
            mismatched = true;
        }
        self.mismatches += usize::from(mismatched);
        let rates: Vec<f64> = outcomes.iter().map(|o| o.row.ops_per_sec).collect();
        outcomes.sort_by(|a, b| a.row.ops_per_sec.total_cmp(&b.row.ops_per_sec));
        let mut row = outcomes.swap_remove(outcomes.len() / 2).row;
        row.verified = !mismatched;
        row.repeats = rates.len();
        row.ops_per_sec_min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        row.ops_per_sec_max = rates.iter().copied().fold(0.0, f64::max);
        self.rows.push(row);
        Ok(())
    }
}

/// The multi-queue test's workload presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// 1,048,576 floats × 500 iterations: compute-bound.
    Heavy,
    /// 1,048,576 floats × 100 iterations.
    Default,
    /// 1,048,576 floats × 10 iterations.
    Light,
    /// 65,536 floats × 10 iterations: launch-bound.
    Minimal,
}

impl Preset {
    /// All presets, heaviest first.
    pub const ALL: [Preset; 4] = [
        Preset::Heavy,
        Preset::Default,
        Preset::Light,
        Preset::Minimal,
    ];

    /// (elements per buffer, kernel iterations) at full scale.
    pub fn shape(self) -> (usize, u32) {
        match self {
            Preset::Heavy => (1 << 20, 500),
            Preset::Default => (1 << 20, 100),
            Preset::Light => (1 << 20, 10),
            Preset::Minimal => (1 << 16, 10),
        }
    }

    /// The preset's name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Heavy => "heavy",
            Preset::Default => "default",
            Preset::Light => "light",
            Preset::Minimal => "minimal",
        }
    }
}

/// Which streams the threads of a run submit to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// One stream shared by all threads.
    Shared,
    /// A stream per thread, from the pool's round-robin assignment.
    PerThread,
}

impl Scenario {
    /// The scenario's name as on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Shared => "shared",
            Scenario::PerThread => "per-thread",
        }
    }
}

/// Parses a comma-separated list of thread counts, e.g. `1,2,4,8,16`.
pub fn parse_thread_list(s: &str) -> Result<Vec<usize>> {
    let bad = |why: String| Error::invalid(format!("--threads `{s}`: {why}"));
    if s.trim().is_empty() {
        return Err(bad("the list is empty (example: 1,2,4,8,16)".into()));
    }
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let n: usize = part.parse().map_err(|_| {
            bad(format!(
                "`{part}` is not a positive whole number (example: 1,2,4,8,16)"
            ))
        })?;
        if n == 0 || n > queues::MAX_THREADS {
            return Err(bad(format!(
                "thread counts must be 1..={}",
                queues::MAX_THREADS
            )));
        }
        if out.contains(&n) {
            return Err(bad(format!("{n} appears twice")));
        }
        out.push(n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_lists_parse_and_reject_bad_input() {
        assert_eq!(parse_thread_list("1,2, 4").unwrap(), vec![1, 2, 4]);
        for bad in ["", " ", "0", "1,,2", "1,x", "-1", "1,2,1", "99999", "1.5"] {
            assert!(parse_thread_list(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
