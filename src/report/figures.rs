//! The report's charts, built from the analysis: which series go on which chart, and how
//! each is labelled.
//!
//! - `throughput-OP.svg`: ops/s over threads for every configuration of the op with one launch
//!   per op (a stream per thread solid, one shared stream dashed), `mq.cu`'s curves for the
//!   op at full size, and the device limit as a grey level (or a note, when it is far above).
//!   An op measured at several depths with two or more thread counts each gets one chart per
//!   depth (`…-inflightN.svg`).
//! - `speedup.svg`: each op's stream-per-thread and shared sweeps over their first point,
//!   against ideal.
//! - `coalescing-OP.svg`: each coalescing policy measured and one launch per op in the same
//!   scenario, lock and depth.
//! - `latency-OP.svg`: p50 / p99 / p99.9 per op of the two sweeps, where recorded.

use super::plot::{Chart, Level, Line, Stroke, YAxis};
use super::series::{sweep, Op, Series};
use super::Analysis;
use crate::bench::table::thousands;

/// Which section of the report a figure belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Ops/s over threads.
    Throughput,
    /// Speedup over ideal.
    Speedup,
    /// Coalescing off vs on.
    Coalescing,
    /// Latency percentiles.
    Latency,
}

/// One chart and its file.
#[derive(Clone, Debug)]
pub struct Figure {
    /// File name inside the report directory.
    pub file: String,
    /// Section.
    pub kind: Kind,
    /// The op it is about (None: all ops).
    pub op: Option<Op>,
    /// The chart.
    pub chart: Chart,
}

/// Limit above which a device limit is a note rather than a level on a linear chart.
const LEVEL_HEADROOM: f64 = 1.6;

/// Builds every figure of the report.
pub fn build(a: &Analysis) -> Vec<Figure> {
    let qualify = |op: &Op| a.ops.iter().filter(|o| o.preset == op.preset).count() > 1;
    let mut out = Vec::new();
    for op in &a.ops {
        out.extend(throughput(a, op, qualify(op)));
    }
    if let Some(f) = speedup(a) {
        out.push(f);
    }
    for op in &a.ops {
        out.extend(coalescing(a, op, qualify(op)));
    }
    for op in &a.ops {
        out.extend(latency(a, op, qualify(op)));
    }
    out
}

/// A legend label naming what varies among `group`, always the scenario.
pub fn label(a: &Analysis, s: &Series, group: &[&Series]) -> String {
    let c = &s.config;
    let varies = |f: &dyn Fn(&Series) -> String| group.iter().any(|x| f(x) != f(group[0]));
    let mut parts = vec![if c.scenario == "per-thread" {
        "a stream per thread".to_string()
    } else if c.scenario == "shared" {
        "one shared stream".to_string()
    } else {
        c.scenario.clone()
    }];
    if varies(&|x| x.config.lock.clone()) || c.lock != "per-stream" {
        parts.push(format!("lock {}", c.lock));
    }
    if c.inflight != 1 {
        parts.push(format!("{} in flight", c.inflight));
    }
    if varies(&|x| x.config.coalesce_words()) || c.coalesce != "off" {
        parts.push(format!("coalescing {}", c.coalesce_words()));
    }
    if varies(&|x| x.config.wait.clone()) {
        parts.push(format!("wait {}", c.wait));
    }
    if a.files.len() > 1 {
        parts.push(format!("[{}]", a.files[c.source]));
    }
    parts.join(", ")
}

/// True when `s` was measured at every thread count of `group` within its own span, so a
/// line between its points hides nothing measured elsewhere.
fn contiguous(s: &Series, group: &[&Series]) -> bool {
    let (lo, hi) = (s.runs[0].threads, s.max_threads());
    group
        .iter()
        .flat_map(|g| g.runs.iter().map(|r| r.threads))
        .filter(|t| *t > lo && *t < hi)
        .all(|t| s.at(t).is_some())
}

fn xy(s: &Series) -> Vec<(f64, f64)> {
    s.runs
        .iter()
        .map(|r| (r.threads as f64, r.ops_per_sec))
        .collect()
}

fn sources_note(a: &Analysis, group: &[&Series]) -> String {
    let mut files: Vec<&str> = group
        .iter()
        .map(|s| a.files[s.config.source].as_str())
        .collect();
    files.sort_unstable();
    files.dedup();
    format!("data: {}", files.join(", "))
}

fn throughput(a: &Analysis, op: &Op, qualify: bool) -> Vec<Figure> {
    let all: Vec<&Series> = a
        .series
        .iter()
        .filter(|s| s.config.op == *op && s.config.coalesce == "off")
        .collect();
    if all.is_empty() {
        return Vec::new();
    }
    let mut depths: Vec<usize> = all
        .iter()
        .filter(|s| s.runs.len() >= 2)
        .map(|s| s.config.inflight)
        .collect();
    depths.sort_unstable();
    depths.dedup();
    let groups: Vec<(Option<usize>, Vec<&Series>)> = if depths.len() <= 1 {
        vec![(None, all.clone())]
    } else {
        depths
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let g = all
                    .iter()
                    .copied()
                    .filter(|s| {
                        s.config.inflight == d || (i == 0 && !depths.contains(&s.config.inflight))
                    })
                    .collect();
                (Some(d), g)
            })
            .collect()
    };
    let verdict = a.verdicts.iter().find(|v| v.op == *op);
    let limit = verdict
        .and_then(|v| v.per_thread.as_ref())
        .and_then(|v| v.limit().cloned());
    groups
        .into_iter()
        .map(|(depth, group)| {
            let mut lines: Vec<Line> = group
                .iter()
                .enumerate()
                .map(|(i, s)| Line {
                    label: label(a, s, &group),
                    points: xy(s),
                    color: Some(i),
                    stroke: if s.config.scenario == "shared" {
                        Stroke::Dashed
                    } else {
                        Stroke::Solid
                    },
                    connect: contiguous(s, &group),
                })
                .collect();
            let mut notes = vec![
                "a wait after every op unless \"in flight\" says otherwise; points without a \
                 line: measured only at those thread counts"
                    .into(),
                sources_note(a, &group),
            ];
            if let Some(p) = op.full_size_preset() {
                let n = lines.len();
                for (j, c) in a
                    .peers
                    .mq
                    .iter()
                    .filter(|c| {
                        c.preset == p.name() && depth.map_or(c.inflight == 1, |d| c.inflight == d)
                    })
                    .enumerate()
                {
                    lines.push(Line {
                        label: format!("peer mq.cu: {}, {} in flight", c.scenario, c.inflight),
                        points: c.points.iter().map(|&(t, v)| (t as f64, v)).collect(),
                        color: Some(n + j),
                        stroke: Stroke::Dashed,
                        connect: true,
                    });
                }
                if lines.len() > n {
                    notes.push(format!(
                        "peer: {}",
                        a.peers
                            .mq
                            .iter()
                            .flat_map(|c| c.files.iter())
                            .fold(Vec::<&String>::new(), |mut v, f| {
                                if !v.contains(&f) {
                                    v.push(f);
                                }
                                v
                            })
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
            let top = lines
                .iter()
                .flat_map(|l| l.points.iter().map(|p| p.1))
                .fold(0.0, f64::max);
            let mut levels = Vec::new();
            if let Some(l) = &limit {
                if l.ops_per_sec <= LEVEL_HEADROOM * top {
                    levels.push(Level {
                        y: l.ops_per_sec,
                        label: format!("device limit, {} ops/s", thousands(l.ops_per_sec)),
                    });
                } else {
                    notes.push(format!(
                        "device limit {} ops/s is {:.1}x the top of this chart",
                        thousands(l.ops_per_sec),
                        l.ops_per_sec / top
                    ));
                }
            }
            let (file, title) = match depth {
                None => (
                    format!("throughput-{}.svg", op.slug(qualify)),
                    format!("{}: ops/s by threads", op.preset),
                ),
                Some(d) => (
                    format!("throughput-{}-inflight{d}.svg", op.slug(qualify)),
                    format!("{}: ops/s by threads, {d} in flight", op.preset),
                ),
            };
            Figure {
                file,
                kind: Kind::Throughput,
                op: Some(op.clone()),
                chart: Chart {
                    title: format!("{title} ({})", op.shape()),
                    y_axis: YAxis::OpsPerSec,
                    y_desc: "ops/s".into(),
                    lines,
                    levels,
                    notes,
                },
            }
        })
        .collect()
}

fn speedup(a: &Analysis) -> Option<Figure> {
    let mut lines = Vec::new();
    let mut used: Vec<&Series> = Vec::new();
    let (mut lo, mut hi) = (usize::MAX, 0);
    for (i, op) in a.ops.iter().enumerate() {
        for scenario in ["per-thread", "shared"] {
            let Some(s) = sweep(&a.series, op, scenario) else {
                continue;
            };
            let base = s.runs[0].ops_per_sec;
            if base <= 0.0 {
                continue;
            }
            lo = lo.min(s.runs[0].threads);
            hi = hi.max(s.max_threads());
            used.push(s);
            lines.push(Line {
                label: format!(
                    "{}: {}",
                    op.preset,
                    if scenario == "shared" {
                        "one shared stream"
                    } else {
                        "stream per thread"
                    }
                ),
                points: s
                    .runs
                    .iter()
                    .map(|r| (r.threads as f64, r.ops_per_sec / base))
                    .collect(),
                color: Some(i),
                stroke: if scenario == "shared" {
                    Stroke::Dashed
                } else {
                    Stroke::Solid
                },
                connect: true,
            });
        }
    }
    if lines.is_empty() {
        return None;
    }
    let mut ideal = Vec::new();
    let mut t = lo;
    while t <= hi {
        ideal.push((t as f64, t as f64 / lo as f64));
        t *= 2;
    }
    if ideal.last().map(|p| p.0) != Some(hi as f64) {
        ideal.push((hi as f64, hi as f64 / lo as f64));
    }
    lines.push(Line {
        label: "ideal: speedup = threads".into(),
        points: ideal,
        color: None,
        stroke: Stroke::Dashed,
        connect: true,
    });
    Some(Figure {
        file: "speedup.svg".into(),
        kind: Kind::Speedup,
        op: None,
        chart: Chart {
            title: "Speedup over the fewest threads, against ideal".into(),
            y_axis: YAxis::Speedup,
            y_desc: "speedup (log scale)".into(),
            lines,
            levels: Vec::new(),
            notes: vec![
                "ops/s over ops/s at the fewest threads; a wait after every op, one launch per \
                 op"
                .into(),
                sources_note(a, &used),
            ],
        },
    })
}

fn coalescing(a: &Analysis, op: &Op, qualify: bool) -> Option<Figure> {
    let on: Vec<&Series> = a
        .series
        .iter()
        .filter(|s| s.config.op == *op && s.config.coalesce != "off")
        .collect();
    if on.is_empty() {
        return None;
    }
    let mut group: Vec<&Series> = Vec::new();
    for s in &on {
        if let Some(off) = a.series.iter().find(|o| {
            o.config.op == *op
                && o.config.coalesce == "off"
                && o.config.scenario == s.config.scenario
                && o.config.lock == s.config.lock
                && o.config.inflight == s.config.inflight
                && o.config.wait == s.config.wait
                && o.config.source == s.config.source
        }) {
            if !group.iter().any(|g| std::ptr::eq(*g, off)) {
                group.push(off);
            }
        }
        group.push(s);
    }
    let mut policies: Vec<String> = group.iter().map(|s| s.config.coalesce_words()).collect();
    policies.dedup();
    let mut distinct: Vec<String> = Vec::new();
    for p in policies {
        if !distinct.contains(&p) {
            distinct.push(p);
        }
    }
    let lines = group
        .iter()
        .map(|s| Line {
            label: label(a, s, &group),
            points: xy(s),
            color: distinct
                .iter()
                .position(|p| *p == s.config.coalesce_words()),
            stroke: if s.config.inflight == 1 {
                Stroke::Solid
            } else {
                Stroke::Dashed
            },
            connect: contiguous(s, &group),
        })
        .collect();
    Some(Figure {
        file: format!("coalescing-{}.svg", op.slug(qualify)),
        kind: Kind::Coalescing,
        op: Some(op.clone()),
        chart: Chart {
            title: format!("{}: coalescing off vs on ({})", op.preset, op.shape()),
            y_axis: YAxis::OpsPerSec,
            y_desc: "ops/s".into(),
            lines,
            levels: Vec::new(),
            notes: vec![
                "solid: a wait per op; dashed: several in flight; points without a line: \
                 measured only at those thread counts"
                    .into(),
                sources_note(a, &group),
            ],
        },
    })
}

fn latency(a: &Analysis, op: &Op, qualify: bool) -> Option<Figure> {
    let mut lines = Vec::new();
    let mut used = Vec::new();
    for scenario in ["per-thread", "shared"] {
        let Some(s) = sweep(&a.series, op, scenario) else {
            continue;
        };
        if s.runs.iter().any(|r| r.latency_us.is_none()) {
            continue;
        }
        used.push(s);
        let name = if scenario == "shared" {
            "one shared stream"
        } else {
            "stream per thread"
        };
        for (i, (pct, f)) in [
            (
                "p50",
                (|l: &super::input::StoredLatency| l.p50) as fn(&_) -> f64,
            ),
            ("p99", |l| l.p99),
            ("p99.9", |l| l.p999),
        ]
        .into_iter()
        .enumerate()
        {
            lines.push(Line {
                label: format!("{pct}, {name}"),
                points: s
                    .runs
                    .iter()
                    .filter_map(|r| r.latency_us.as_ref().map(|l| (r.threads as f64, f(l))))
                    .collect(),
                color: Some(i),
                stroke: if scenario == "shared" {
                    Stroke::Dashed
                } else {
                    Stroke::Solid
                },
                connect: true,
            });
        }
    }
    if lines.is_empty() {
        return None;
    }
    Some(Figure {
        file: format!("latency-{}.svg", op.slug(qualify)),
        kind: Kind::Latency,
        op: Some(op.clone()),
        chart: Chart {
            title: format!("{}: latency per op ({})", op.preset, op.shape()),
            y_axis: YAxis::Micros,
            y_desc: "µs (log scale)".into(),
            lines,
            levels: Vec::new(),
            notes: vec![
                "per op, submission to completion as its thread sees it; a wait after every \
                 op, one launch per op"
                    .into(),
                sources_note(a, &used),
            ],
        },
    })
}
