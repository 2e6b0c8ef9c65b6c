//! Runs grouped into curves: every run of one configuration (op, scenario, lock, depth,
//! coalescing, wait policy, file) is one [`Series`] over thread counts.

use std::collections::BTreeMap;

use super::input::{Source, StoredRun};
use crate::bench::table::thousands;
use crate::bench::Preset;

/// What one op is: a preset name and its shape as run.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Op {
    /// Preset name as stored.
    pub preset: String,
    /// f32 elements per buffer.
    pub data: usize,
    /// Kernel iterations per element.
    pub kernel_iters: u32,
}

impl Op {
    /// The op of a run.
    pub fn of(r: &StoredRun) -> Self {
        Op {
            preset: r.preset.clone(),
            data: r.data,
            kernel_iters: r.kernel_iters,
        }
    }

    /// Element-iterations per op (an empty kernel counts as one iteration).
    pub fn work(&self) -> f64 {
        self.data as f64 * f64::from(self.kernel_iters.max(1))
    }

    /// The preset this op is at full size, if it is one (the size peers such as `mq.cu` run).
    pub fn full_size_preset(&self) -> Option<Preset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == self.preset && p.shape() == (self.data, self.kernel_iters))
    }

    /// `8,192 elements × 500 iterations`.
    pub fn shape(&self) -> String {
        format!(
            "{} elements × {} iterations",
            thousands(self.data as f64),
            self.kernel_iters
        )
    }

    /// A file-name-safe name: the preset, with the shape when `qualify`.
    pub fn slug(&self, qualify: bool) -> String {
        let base: String = self
            .preset
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        let base = if base.is_empty() { "op".into() } else { base };
        if qualify {
            format!("{base}-{}x{}", self.data, self.kernel_iters)
        } else {
            base
        }
    }
}

/// Everything about a run but its thread count.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Config {
    /// The op.
    pub op: Op,
    /// `per-thread` or `shared`.
    pub scenario: String,
    /// Submission lock.
    pub lock: String,
    /// Ops in flight per thread.
    pub inflight: usize,
    /// Coalescing policy.
    pub coalesce: String,
    /// Coalescing batch limit (0 = not recorded).
    pub max_batch: usize,
    /// Coalescing depth (0 = not recorded).
    pub depth: usize,
    /// Wait policy.
    pub wait: String,
    /// Index of the results file.
    pub source: usize,
}

impl Config {
    /// The config of a run from file `source`.
    pub fn of(r: &StoredRun, source: usize) -> Self {
        Config {
            op: Op::of(r),
            scenario: r.scenario.clone(),
            lock: r.lock.clone(),
            inflight: r.inflight,
            coalesce: r.coalesce.clone(),
            max_batch: if r.coalesce == "off" {
                0
            } else {
                r.coalesce_max_batch
            },
            depth: if r.coalesce == "off" {
                0
            } else {
                r.coalesce_depth
            },
            wait: r.wait.clone(),
            source,
        }
    }

    /// True for a wait after every op, one launch per op.
    pub fn plain(&self) -> bool {
        self.inflight == 1 && self.coalesce == "off"
    }

    /// The coalescing policy in words (`off`, `fixed ≤16`, `fixed ≤16 depth 2`).
    pub fn coalesce_words(&self) -> String {
        let mut s = self.coalesce.clone();
        if self.coalesce != "off" {
            if self.max_batch > 0 {
                s += &format!(" ≤{}", self.max_batch);
            }
            if self.depth > 0 {
                s += &format!(" depth {}", self.depth);
            }
        }
        s
    }
}

/// One curve: the runs of one configuration, by thread count.
#[derive(Clone, Debug)]
pub struct Series {
    /// The configuration.
    pub config: Config,
    /// Runs sorted by threads, one per thread count.
    pub runs: Vec<StoredRun>,
}

impl Series {
    /// (threads, ops/s).
    pub fn points(&self) -> Vec<(usize, f64)> {
        self.runs
            .iter()
            .map(|r| (r.threads, r.ops_per_sec))
            .collect()
    }

    /// The run with the most ops/s.
    pub fn best(&self) -> &StoredRun {
        self.runs
            .iter()
            .max_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec))
            .expect("a series has runs")
    }

    /// The run at `threads`, if measured.
    pub fn at(&self, threads: usize) -> Option<&StoredRun> {
        self.runs.iter().find(|r| r.threads == threads)
    }

    /// The largest thread count measured.
    pub fn max_threads(&self) -> usize {
        self.runs.last().map_or(0, |r| r.threads)
    }
}

/// Groups every run of `sources` into series (ordered by op, heaviest first, then config).
/// A second run of the same configuration and thread count in one file is left out; the
/// count of those is returned.
pub fn group(sources: &[Source]) -> (Vec<Series>, usize) {
    let mut map: BTreeMap<Config, Vec<StoredRun>> = BTreeMap::new();
    let mut dropped = 0;
    for (i, s) in sources.iter().enumerate() {
        for r in &s.results.runs {
            let runs = map.entry(Config::of(r, i)).or_default();
            if runs.iter().any(|x| x.threads == r.threads) {
                dropped += 1;
            } else {
                runs.push(r.clone());
            }
        }
    }
    let mut out: Vec<Series> = map
        .into_iter()
        .map(|(config, mut runs)| {
            runs.sort_by_key(|r| r.threads);
            Series { config, runs }
        })
        .collect();
    out.sort_by(|a, b| {
        b.config
            .op
            .work()
            .total_cmp(&a.config.op.work())
            .then_with(|| a.config.cmp(&b.config))
    });
    (out, dropped)
}

/// The distinct ops of `series`, in their order.
pub fn ops(series: &[Series]) -> Vec<Op> {
    let mut out: Vec<Op> = Vec::new();
    for s in series {
        if !out.contains(&s.config.op) {
            out.push(s.config.op.clone());
        }
    }
    out
}

/// The sweep that stands for `op` in `scenario`: a wait per op, no coalescing, at least two
/// thread counts; lock per-stream first, then the most thread counts, then the first file.
pub fn sweep<'a>(series: &'a [Series], op: &Op, scenario: &str) -> Option<&'a Series> {
    series
        .iter()
        .filter(|s| {
            s.config.op == *op
                && s.config.scenario == scenario
                && s.config.plain()
                && s.runs.len() >= 2
        })
        .min_by_key(|s| {
            (
                s.config.lock != "per-stream",
                usize::MAX - s.runs.len(),
                s.config.source,
            )
        })
}
