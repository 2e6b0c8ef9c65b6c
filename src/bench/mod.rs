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

pub mod host_sched;
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
use results::{RepeatRun, RunRow, Skipped};

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
        self.run_rounds(std::slice::from_ref(&s), |_, _| ())
            .map(drop)
    }

    /// Runs `specs` `repeat` times each, in rounds: every round runs every spec once, in
    /// order, so a spec's repeats spread over the whole run and specs compared with each other
    /// (coalescing off and on, say) are measured close together in every round: drift of the
    /// machine (clocks, neighbours) moves both alike.
    /// Keeps each spec's median run, in `specs`' order; `each` is told of every run before and
    /// after it. Returns, per spec, whether it has a row (false: rejected, see `skipped`).
    pub fn run_rounds(
        &mut self,
        specs: &[QueuesSpec],
        mut each: impl FnMut(&QueuesSpec, RunPhase),
    ) -> Result<Vec<bool>> {
        let mut outcomes: Vec<Option<Vec<queues::RunOutcome>>> =
            specs.iter().map(|_| Some(Vec::new())).collect();
        let rounds = self.repeat.max(1);
        for round in 0..rounds {
            for (s, kept) in specs.iter().zip(outcomes.iter_mut()) {
                let Some(runs) = kept else { continue };
                each(s, RunPhase::Starting);
                match self.measure(s)? {
                    Some(o) => {
                        runs.push(o);
                        each(s, RunPhase::Finished { runs: 1 });
                    }
                    // Rejected (recorded as skipped): not run again; its later rounds count
                    // as done.
                    None => {
                        *kept = None;
                        each(
                            s,
                            RunPhase::Finished {
                                runs: rounds - round,
                            },
                        );
                    }
                }
            }
        }
        let mut has_row = Vec::with_capacity(specs.len());
        for (s, kept) in specs.iter().zip(outcomes) {
            has_row.push(kept.is_some());
            if let Some(runs) = kept {
                self.keep(s, runs);
            }
        }
        Ok(has_row)
    }

    /// One run of `s`; `None` when the combination is rejected (a usage error, recorded in
    /// `skipped`). Other errors stop the study.
    fn measure(&mut self, s: &QueuesSpec) -> Result<Option<queues::RunOutcome>> {
        match queues::run_queues(self.device, s) {
            Ok(o) => Ok(Some(o)),
            Err(e) if e.is_usage() => {
                self.skipped.push(Skipped {
                    preset: s.preset.clone(),
                    scenario: s.scenario,
                    lock: s.lock,
                    threads: s.threads,
                    reason: e.to_string(),
                });
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Keeps the median of `outcomes` (by ops/s) as `s`'s row, with the spread; a mismatch in
    /// any of them marks the row unverified.
    fn keep(&mut self, s: &QueuesSpec, mut outcomes: Vec<queues::RunOutcome>) {
        if outcomes.is_empty() {
            return;
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
        let each_repeat: Vec<RepeatRun> = outcomes
            .iter()
            .map(|o| RepeatRun {
                ops_per_sec: o.row.ops_per_sec,
                host: o.row.host,
                when: o.row.when,
                per_thread: o.row.per_thread.clone(),
                coalesce_stats: o.row.coalesce_stats,
            })
            .collect();
        outcomes.sort_by(|a, b| a.row.ops_per_sec.total_cmp(&b.row.ops_per_sec));
        let mut row = outcomes.swap_remove(outcomes.len() / 2).row;
        row.verified = !mismatched;
        row.repeats = rates.len();
        row.ops_per_sec_min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        row.ops_per_sec_max = rates.iter().copied().fold(0.0, f64::max);
        if each_repeat.len() > 1 {
            row.each_repeat = each_repeat;
        }
        self.rows.push(row);
    }
}

/// Where one run of [`Runner::run_rounds`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunPhase {
    /// The run is about to start.
    Starting,
    /// `runs` runs are done: this one, and where the spec was rejected, its later rounds.
    Finished {
        /// Runs done.
        runs: usize,
    },
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

    fn spec(threads: usize, scenario: Scenario, lock: crate::LockMode) -> QueuesSpec {
        QueuesSpec {
            preset: "tiny".into(),
            data: 256,
            kernel_iters: 2,
            iters: 3,
            inflight: 1,
            lock,
            scenario,
            threads,
            pool_size: 4,
            coalesce: crate::CoalescePolicy::Off,
            pin: false,
            corrupt: false,
        }
    }

    #[test]
    fn rounds_run_every_spec_once_per_round_and_keep_rows_in_order() {
        use crate::LockMode;
        let device = Device::cpu(2).unwrap();
        let mut runner = Runner::new(&device);
        runner.repeat = 3;
        let specs = [
            spec(2, Scenario::PerThread, LockMode::PerStream),
            // Rejected: lock `none` cannot serve two threads on one stream.
            spec(2, Scenario::Shared, LockMode::None),
            spec(1, Scenario::Shared, LockMode::PerStream),
        ];
        let mut order = Vec::new();
        let mut done = 0;
        let has_row = runner
            .run_rounds(&specs, |s, phase| match phase {
                RunPhase::Starting => order.push((s.threads, s.scenario)),
                RunPhase::Finished { runs } => done += runs,
            })
            .unwrap();
        assert_eq!(has_row, vec![true, false, true]);
        // What the progress bar counts: every spec's three rounds.
        assert_eq!(done, 9);
        // Round by round; the rejected spec is tried once only.
        let (a, b, c) = (
            (2, Scenario::PerThread),
            (2, Scenario::Shared),
            (1, Scenario::Shared),
        );
        assert_eq!(order, vec![a, b, c, a, c, a, c]);
        assert_eq!(runner.skipped.len(), 1);
        let rows: Vec<_> = runner
            .rows
            .iter()
            .map(|r| (r.threads, r.scenario, r.repeats))
            .collect();
        assert_eq!(
            rows,
            vec![(2, Scenario::PerThread, 3), (1, Scenario::Shared, 3)]
        );
        for r in &runner.rows {
            assert!(r.verified);
            assert!(r.ops_per_sec_min <= r.ops_per_sec && r.ops_per_sec <= r.ops_per_sec_max);
            // Every repeat is listed, the row's own among them, with its host counters.
            let each: Vec<f64> = r.each_repeat.iter().map(|e| e.ops_per_sec).collect();
            assert_eq!(each.len(), 3);
            assert!(each.contains(&r.ops_per_sec));
            assert!(each.contains(&r.ops_per_sec_min) && each.contains(&r.ops_per_sec_max));
            assert!(r.each_repeat.iter().all(|e| e.host.is_some()));
            // And its threads, each on its own.
            for p in r.each_repeat.iter().map(|e| e.per_thread.as_ref().unwrap()) {
                assert_eq!(p.finished_ms.len(), r.threads);
                assert_eq!(p.p50_us.len(), r.threads);
                assert!(p.straggle().unwrap() >= 1.0);
            }
        }
    }

    #[test]
    fn thread_lists_parse_and_reject_bad_input() {
        assert_eq!(parse_thread_list("1,2, 4").unwrap(), vec![1, 2, 4]);
        for bad in ["", " ", "0", "1,,2", "1,x", "-1", "1,2,1", "99999", "1.5"] {
            assert!(parse_thread_list(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
