//! The report's verdict: what limits each op, with the evidence, and what to run.
//!
//! For a curve of ops/s over thread counts, [`crate::bench::verdict::judge`] gives the
//! saturation point (past which doubling threads adds < 10%), the maximum speedup and the
//! efficiency there. The report adds the **device limit**: the most this op's throughput was
//! seen to reach anywhere *outside the curve itself*, the highest of
//! - the op's best ops/s in any other configuration measured (coalescing on, more in flight,
//!   another lock, another file);
//! - the device's best work rate (ops/s × elements × iterations) reached by any run outside
//!   the curve, divided by this op's work: what a large launch shows the device can do;
//! - a peer's figures for the op at full size: `launch.cu` with many ops merged into one launch,
//!   and `mq.cu`'s best.
//!
//! The decision rule, for the curve's best ops/s as a fraction `f` of that limit:
//! - **collapsing** when the largest thread count is below 80% of the best (judge's rule):
//!   contention costs more than parallelism gains;
//! - else **device-saturated** when `f ≥ 0.75` ([`DEVICE_FRACTION`]): the device is full, more
//!   threads or merging cannot add much;
//! - else **parallel** when the curve still grows ≥ 10% at its largest thread count;
//! - else **launch-bound**: the curve stopped growing below 75% of what the device can do, so
//!   the per-op path (launch, record, wait, hand-off) is what is full;
//! - **plateau** when the curve stopped growing and nothing measured a limit to tell which.
//!
//! The recommendation for the machine follows from the same numbers: the fewest threads within
//! 90% of the best; a stream per thread unless one shared stream is as fast; another lock,
//! depth or coalescing policy only where, as measured, it beats the best of the sweep by ≥ 5%
//! (10% for depth), and then at the thread count it was measured at; and for a launch-bound op
//! the batch (ops per launch) that reaches the device limit.

use super::anchor::Peers;
use super::markdown::threads;
use super::series::{sweep, Op, Series};
use crate::bench::table::thousands;
use crate::bench::verdict::{self as curve, Scaling, Verdict};

/// Fraction of the device limit at which a curve counts as device-saturated.
pub const DEVICE_FRACTION: f64 = 0.75;
/// Fraction of the best at which fewer threads are "enough".
pub const ENOUGH_FRACTION: f64 = 0.90;
/// Gain a non-default lock or coalescing must show to be recommended.
pub const CHOICE_GAIN: f64 = 1.05;
/// Gain deeper submission must show to be recommended.
pub const DEPTH_GAIN: f64 = 1.10;
/// Fraction of a peer's coalesced ceiling a batch size must reach to be recommended.
pub const BATCH_FRACTION: f64 = 0.90;

/// What limits a curve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Still scaling with threads, below the device limit.
    Parallel,
    /// Stopped scaling well below the device limit: the per-op path is full.
    LaunchBound,
    /// At or near the device limit.
    DeviceSaturated,
    /// Falls after a peak.
    Collapsing,
    /// Stopped scaling; no device limit measured to say why.
    Plateau,
}

impl Class {
    /// The class's name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Class::Parallel => "parallel",
            Class::LaunchBound => "launch-bound",
            Class::DeviceSaturated => "device-saturated",
            Class::Collapsing => "collapsing",
            Class::Plateau => "plateau",
        }
    }
}

/// Classifies a curve of `(threads, ops/s)` against a device limit in ops/s (see the module
/// doc). `None` where [`curve::judge`] gives no verdict (under two points, bad numbers).
pub fn classify(points: &[(usize, f64)], limit: Option<f64>) -> Option<(Verdict, Class)> {
    let v = curve::judge(points)?;
    let best = points.iter().map(|p| p.1).fold(0.0, f64::max);
    let fraction = limit.filter(|l| *l > 0.0).map(|l| best / l);
    let class = match (v.class, fraction) {
        (Scaling::Collapsing, _) => Class::Collapsing,
        (_, Some(f)) if f >= DEVICE_FRACTION => Class::DeviceSaturated,
        (Scaling::Scaling, _) => Class::Parallel,
        (_, Some(_)) => Class::LaunchBound,
        (_, None) => Class::Plateau,
    };
    Some((v, class))
}

/// One candidate for an op's device limit.
#[derive(Clone, Debug, PartialEq)]
pub struct Limit {
    /// ops/s.
    pub ops_per_sec: f64,
    /// Where it was measured, in words (naming the file).
    pub how: String,
}

/// A curve, judged.
#[derive(Clone, Debug)]
pub struct CurveVerdict {
    /// Index of the series in the analysis.
    pub series: usize,
    /// Saturation, speedup, efficiency.
    pub verdict: Verdict,
    /// Class.
    pub class: Class,
    /// Best (threads, ops/s).
    pub best: (usize, f64),
    /// Every limit candidate, highest first; the first is the device limit.
    pub limits: Vec<Limit>,
}

impl CurveVerdict {
    /// The device limit (highest candidate).
    pub fn limit(&self) -> Option<&Limit> {
        self.limits.first()
    }

    /// Best over the device limit.
    pub fn fraction(&self) -> Option<f64> {
        self.limit().map(|l| self.best.1 / l.ops_per_sec)
    }
}

/// What to run, for one op.
#[derive(Clone, Debug, Default)]
pub struct Recommendation {
    /// Threads (None: no sweep).
    pub threads: Option<usize>,
    /// Streams, in words.
    pub streams: String,
    /// Lock mode, in words.
    pub lock: String,
    /// Submission depth, in words.
    pub submission: String,
    /// Coalescing policy, in words.
    pub coalescing: String,
    /// Batch size (ops per launch), in words.
    pub batch: String,
    /// Why, one sentence per choice.
    pub why: Vec<String>,
}

/// Everything the report says about one op.
#[derive(Clone, Debug)]
pub struct OpVerdict {
    /// The op.
    pub op: Op,
    /// The stream-per-thread sweep, judged.
    pub per_thread: Option<CurveVerdict>,
    /// The shared-stream sweep, judged.
    pub shared: Option<CurveVerdict>,
    /// Evidence sentences for the class.
    pub evidence: Vec<String>,
    /// What to run.
    pub recommendation: Recommendation,
}

/// The inputs of the verdict: series, peers, and the labels of the results files.
pub struct Evidence<'a> {
    /// Every series.
    pub series: &'a [Series],
    /// Merged anchors.
    pub peers: &'a Peers,
    /// Labels of the results files, by source index.
    pub files: &'a [String],
}

impl Evidence<'_> {
    /// A run's configuration in words, naming its file.
    fn describe(&self, s: &Series, threads: usize) -> String {
        let c = &s.config;
        let mut parts = vec![super::markdown::threads(threads), c.scenario.clone()];
        parts.push(format!("lock {}", c.lock));
        if c.inflight > 1 {
            parts.push(format!("{} in flight", c.inflight));
        }
        if c.coalesce != "off" {
            parts.push(format!("coalescing {}", c.coalesce_words()));
        }
        format!("{} ({})", parts.join(", "), self.files[c.source])
    }

    /// Limit candidates for the curve `exclude` of `op`, highest first.
    pub fn limits(&self, op: &Op, exclude: usize) -> Vec<Limit> {
        let mut out = Vec::new();
        let others = self
            .series
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != exclude)
            .map(|(_, s)| s);
        // The op's best elsewhere.
        if let Some((s, r)) = others
            .clone()
            .filter(|s| s.config.op == *op)
            .map(|s| (s, s.best()))
            .max_by(|a, b| a.1.ops_per_sec.total_cmp(&b.1.ops_per_sec))
        {
            out.push(Limit {
                ops_per_sec: r.ops_per_sec,
                how: format!(
                    "the best this op reached in another configuration: {}",
                    self.describe(s, r.threads)
                ),
            });
        }
        // The device's work rate, reached by another op.
        if op.work() > 0.0 {
            if let Some((s, r)) = others
                .filter(|s| s.config.op != *op && s.config.op.work() > 0.0)
                .map(|s| {
                    let r = s
                        .runs
                        .iter()
                        .max_by(|a, b| {
                            (a.ops_per_sec * s.config.op.work())
                                .total_cmp(&(b.ops_per_sec * s.config.op.work()))
                        })
                        .expect("a series has runs");
                    (s, r)
                })
                .max_by(|a, b| {
                    (a.1.ops_per_sec * a.0.config.op.work())
                        .total_cmp(&(b.1.ops_per_sec * b.0.config.op.work()))
                })
            {
                let rate = r.ops_per_sec * s.config.op.work();
                out.push(Limit {
                    ops_per_sec: rate / op.work(),
                    how: format!(
                        "the device's best work rate, {} element-iterations/s by {} ({}) at {}, \
                         divided by this op's {} element-iterations",
                        thousands(rate),
                        s.config.op.preset,
                        s.config.op.shape(),
                        self.describe(s, r.threads),
                        thousands(op.work())
                    ),
                });
            }
        }
        if let Some(preset) = op.full_size_preset() {
            if let Some((section, file)) = &self.peers.launch {
                if let Some((_, pts)) = section.coalesced.iter().find(|(p, _)| p == preset.name()) {
                    if let Some(&(b, v)) = pts.iter().max_by(|a, b| a.1.total_cmp(&b.1)) {
                        out.push(Limit {
                            ops_per_sec: v,
                            how: format!(
                                "launch.cu: {b} of these ops merged into one launch, one thread \
                                 ({file}, sched={})",
                                section.sched
                            ),
                        });
                    }
                }
            }
            if let Some((c, &(t, v))) = self
                .peers
                .mq
                .iter()
                .filter(|c| c.preset == preset.name())
                .filter_map(|c| {
                    c.points
                        .iter()
                        .max_by(|a, b| a.1.total_cmp(&b.1))
                        .map(|p| (c, p))
                })
                .max_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
            {
                out.push(Limit {
                    ops_per_sec: v,
                    how: format!(
                        "mq.cu: {t} threads, {}, {} in flight ({})",
                        c.scenario,
                        c.inflight,
                        c.files.join(", ")
                    ),
                });
            }
        }
        out.sort_by(|a, b| b.ops_per_sec.total_cmp(&a.ops_per_sec));
        out
    }

    /// Judges series `i`.
    pub fn judge(&self, i: usize) -> Option<CurveVerdict> {
        let s = &self.series[i];
        let limits = self.limits(&s.config.op, i);
        let (verdict, class) = classify(&s.points(), limits.first().map(|l| l.ops_per_sec))?;
        let b = s.best();
        Some(CurveVerdict {
            series: i,
            verdict,
            class,
            best: (b.threads, b.ops_per_sec),
            limits,
        })
    }

    /// The empty kernel's best launch+wait rate from the peer, at most `threads` threads.
    fn launch_wait(&self, threads: usize) -> Option<(usize, f64, String)> {
        let (s, file) = self.peers.launch.as_ref()?;
        s.launch_wait
            .iter()
            .filter(|(t, _)| *t <= threads)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|&(t, v)| (t, v, file.clone()))
    }

    fn index(&self, s: &Series) -> usize {
        self.series
            .iter()
            .position(|x| std::ptr::eq(x, s))
            .expect("series from this evidence")
    }

    /// The verdict and recommendation for `op`.
    pub fn op_verdict(&self, op: &Op) -> OpVerdict {
        let per = sweep(self.series, op, "per-thread").map(|s| self.index(s));
        let shared = sweep(self.series, op, "shared").map(|s| self.index(s));
        let per_v = per.and_then(|i| self.judge(i));
        let shared_v = shared.and_then(|i| self.judge(i));
        let evidence = per_v
            .as_ref()
            .map(|v| self.evidence(v, shared_v.as_ref()))
            .unwrap_or_else(|| {
                vec![
                    "no stream-per-thread sweep with a wait per op (two or more thread \
                      counts) was measured for this op, so it is not classified"
                        .into(),
                ]
            });
        let recommendation = self.recommend(op, per_v.as_ref(), shared_v.as_ref());
        OpVerdict {
            op: op.clone(),
            per_thread: per_v,
            shared: shared_v,
            evidence,
            recommendation,
        }
    }

    fn evidence(&self, v: &CurveVerdict, shared: Option<&CurveVerdict>) -> Vec<String> {
        let s = &self.series[v.series];
        let mut out = Vec::new();
        let first = &s.runs[0];
        out.push(format!(
            "a stream per thread: {} ops/s at {}, best {} at {} (x{:.2}); adding threads stops \
             paying (< 10% per doubling) after {}, where efficiency is {:.0}% of ideal ({})",
            thousands(first.ops_per_sec),
            threads(first.threads),
            thousands(v.best.1),
            threads(v.best.0),
            v.verdict.max_speedup,
            threads(v.verdict.saturation_threads),
            100.0 * v.verdict.efficiency_at_saturation,
            self.files[s.config.source]
        ));
        match (v.limit(), v.fraction()) {
            (Some(l), Some(f)) => out.push(format!(
                "device limit {} ops/s: {}; the best is {:.0}% of it",
                thousands(l.ops_per_sec),
                l.how,
                100.0 * f
            )),
            _ => out.push(
                "no device limit: nothing outside this curve measured this op or another op's \
                 work rate"
                    .into(),
            ),
        }
        let last = s.runs.last().expect("runs");
        out.push(match v.class {
            Class::Collapsing => format!(
                "collapsing: {} ops/s at {} threads is {:.0}% of the best: contention costs more \
                 than parallelism gains",
                thousands(last.ops_per_sec),
                last.threads,
                100.0 * last.ops_per_sec / v.best.1
            ),
            Class::DeviceSaturated => format!(
                "device-saturated: the best is ≥ {:.0}% of the device limit, so the device is \
                 full{}",
                100.0 * DEVICE_FRACTION,
                if v.verdict.saturation_threads > s.runs[0].threads {
                    format!(
                        " (threads run in parallel up to {})",
                        v.verdict.saturation_threads
                    )
                } else {
                    ": one thread's ops already fill it".into()
                }
            ),
            Class::Parallel => format!(
                "parallel: still ≥ 10% faster per doubling at {} threads, below {:.0}% of the \
                 device limit",
                last.threads,
                100.0 * DEVICE_FRACTION
            ),
            Class::LaunchBound => format!(
                "launch-bound: the curve stopped growing at {:.0}% of the device limit, so the \
                 device has room that one launch and one wait per op cannot use",
                100.0 * v.fraction().unwrap_or(0.0)
            ),
            Class::Plateau => "plateau: the curve stopped growing; without a device limit the \
                               report cannot tell a full device from a full launch path"
                .into(),
        });
        if matches!(v.class, Class::LaunchBound | Class::Plateau) {
            if let Some((t, lw, file)) = self.launch_wait(s.max_threads()) {
                out.push(format!(
                    "an empty kernel's launch + wait (launch.cu, {file}) peaks at {} ops/s ({t} \
                     threads); this op's best is {:.0}% of that",
                    thousands(lw),
                    100.0 * v.best.1 / lw
                ));
            }
        }
        if let Some(sv) = shared {
            let ratio = v.best.1 / sv.best.1;
            out.push(format!(
                "one shared stream: best {} ops/s at {} (x{:.2}, {}); a stream per thread \
                 reaches {:.2}x that{}",
                thousands(sv.best.1),
                threads(sv.best.0),
                sv.verdict.max_speedup,
                sv.class.name(),
                ratio,
                if ratio >= 1.2 && sv.verdict.max_speedup < curve::SERIALIZED_SPEEDUP {
                    ": the shared queue serializes the ops"
                } else {
                    ""
                }
            ));
        }
        out
    }

    /// Runs of `op` at `threads` with a stream each and one launch per op, by lock and depth.
    fn at_top<'s>(&'s self, op: &'s Op, threads: usize) -> impl Iterator<Item = &'s Series> + 's {
        self.series.iter().filter(move |s| {
            s.config.op == *op
                && s.config.scenario == "per-thread"
                && s.config.coalesce == "off"
                && s.at(threads).is_some()
        })
    }

    fn recommend(
        &self,
        op: &Op,
        per: Option<&CurveVerdict>,
        shared: Option<&CurveVerdict>,
    ) -> Recommendation {
        let mut r = Recommendation::default();
        let Some(v) = per else {
            r.streams = "-".into();
            r.lock = "-".into();
            r.submission = "-".into();
            r.coalescing = "-".into();
            r.batch = "-".into();
            r.why
                .push("no stream-per-thread sweep: nothing to recommend from".into());
            return r;
        };
        let s = &self.series[v.series];
        let file = &self.files[s.config.source];
        let enough = s
            .runs
            .iter()
            .filter(|x| x.ops_per_sec >= ENOUGH_FRACTION * v.best.1)
            .map(|x| x.threads)
            .min()
            .unwrap_or(v.best.0);
        r.threads = Some(enough);
        r.why.push(format!(
            "threads: {enough}, the fewest within {:.0}% of the best ({} of {} ops/s, {file})",
            100.0 * ENOUGH_FRACTION,
            thousands(s.at(enough).map_or(0.0, |x| x.ops_per_sec)),
            thousands(v.best.1)
        ));
        // Streams.
        match shared {
            Some(sv) => {
                let ratio = v.best.1 / sv.best.1;
                r.streams = if ratio >= 1.0 / ENOUGH_FRACTION {
                    "a stream per thread".into()
                } else if ratio <= ENOUGH_FRACTION {
                    "one shared stream".into()
                } else {
                    "a stream per thread (shared is as fast)".into()
                };
                r.why.push(format!(
                    "streams: best with a stream per thread ÷ best with one shared stream = \
                     {ratio:.2}"
                ));
            }
            None => {
                r.streams = "a stream per thread".into();
                r.why
                    .push("streams: one shared stream was not measured for this op".into());
            }
        }
        // Lock, depth and coalescing: another choice is recommended only when, where it was
        // measured, it beats the best the sweep reached at any thread count.
        let top = s.max_threads();
        let best = v.best.1;
        let mut moved_to: Option<usize> = None;
        let value = |x: &Series| x.at(top).map_or(0.0, |r| r.ops_per_sec);
        let plain: Vec<&Series> = self
            .at_top(op, top)
            .filter(|x| x.config.inflight == 1 && x.config.lock != s.config.lock)
            .collect();
        match plain.iter().max_by(|a, b| value(a).total_cmp(&value(b))) {
            Some(x) if value(x) >= CHOICE_GAIN * best => {
                r.lock = x.config.lock.clone();
                moved_to = Some(top);
                r.why.push(format!(
                    "lock: {} at {top} threads reaches {} ops/s, {:.2}x the sweep's best with \
                     lock {} ({})",
                    x.config.lock,
                    thousands(value(x)),
                    value(x) / best,
                    s.config.lock,
                    self.files[x.config.source]
                ));
            }
            _ => {
                r.lock = s.config.lock.clone();
                let others: Vec<String> = plain
                    .iter()
                    .map(|x| format!("{} {:.2}x", x.config.lock, value(x) / best))
                    .collect();
                r.why.push(if others.is_empty() {
                    format!("lock: {} (no other lock measured)", s.config.lock)
                } else {
                    format!(
                        "lock: {} (the others at {top} threads reach {} of the sweep's best: \
                         under {:.0}% more)",
                        s.config.lock,
                        others.join(", "),
                        100.0 * (CHOICE_GAIN - 1.0)
                    )
                });
            }
        }
        let deep = self
            .at_top(op, top)
            .filter(|x| x.config.inflight > 1 && x.config.source == s.config.source)
            .max_by(|a, b| value(a).total_cmp(&value(b)));
        match deep {
            Some(x) if value(x) >= DEPTH_GAIN * best => {
                r.submission = format!("async, {} in flight", x.config.inflight);
                moved_to = Some(top);
                r.why.push(format!(
                    "submission: {} in flight at {top} threads reaches {} ops/s, {:.2}x the \
                     sweep's best with a wait per op",
                    x.config.inflight,
                    thousands(value(x)),
                    value(x) / best
                ));
            }
            Some(x) => {
                r.submission = "a wait per op".into();
                r.why.push(format!(
                    "submission: a wait per op ({} in flight at {top} threads reaches {:.2}x \
                     the sweep's best: under {:.0}% more)",
                    x.config.inflight,
                    value(x) / best,
                    100.0 * (DEPTH_GAIN - 1.0)
                ));
            }
            None => {
                r.submission = "a wait per op".into();
                r.why
                    .push("submission: a wait per op (deeper submission not measured)".into());
            }
        }
        // Coalescing: on against off in the same scenario, lock, depth and file, at the largest
        // thread count measured with it on.
        let pairs: Vec<(&Series, f64, f64, f64)> = self
            .series
            .iter()
            .filter(|x| x.config.op == *op && x.config.coalesce != "off" && x.config.inflight == 1)
            .filter_map(|on| {
                let t = on.max_threads();
                let off = self.series.iter().find(|o| {
                    o.config.op == *op
                        && o.config.coalesce == "off"
                        && o.config.scenario == on.config.scenario
                        && o.config.lock == on.config.lock
                        && o.config.inflight == on.config.inflight
                        && o.config.source == on.config.source
                })?;
                let on_r = on.at(t)?;
                let off_r = off.at(t)?;
                Some((
                    on,
                    on_r.ops_per_sec / off_r.ops_per_sec,
                    on_r.ops_per_launch,
                    on_r.ops_per_sec,
                ))
            })
            .collect();
        match pairs.iter().max_by(|a, b| a.3.total_cmp(&b.3)) {
            Some((on, ratio, opl, ops)) => {
                let t = on.max_threads();
                let gain = ops / best;
                if gain >= CHOICE_GAIN && *ratio > 1.0 {
                    r.coalescing = format!("on ({})", on.config.coalesce_words());
                    moved_to = Some(t);
                } else {
                    r.coalescing = "off".into();
                }
                r.why.push(format!(
                    "coalescing: {} at {t} threads reaches {ratio:.2}x one launch per op there \
                     and {gain:.2}x the sweep's best, merging {opl:.1} ops per launch ({})",
                    on.config.coalesce_words(),
                    self.files[on.config.source]
                ));
            }
            None => {
                r.coalescing = "off".into();
                r.why
                    .push("coalescing: not measured for this op (off is the default)".into());
            }
        }
        if let Some(t) = moved_to {
            if r.threads != Some(t) {
                r.threads = Some(t);
                r.why.push(format!(
                    "threads: {t} after all, where the better choice above was measured"
                ));
            }
        }
        // Batch size.
        let launch_sweep = op.full_size_preset().and_then(|p| {
            let (section, file) = self.peers.launch.as_ref()?;
            let (_, pts) = section.coalesced.iter().find(|(n, _)| n == p.name())?;
            let max = pts.iter().map(|p| p.1).fold(0.0, f64::max);
            let b = pts
                .iter()
                .filter(|p| p.1 >= BATCH_FRACTION * max)
                .map(|p| p.0)
                .min()?;
            Some((b, max, file.clone()))
        });
        match v.class {
            Class::LaunchBound => match (launch_sweep, v.limit()) {
                (Some((b, max, file)), _) => {
                    r.batch = format!("≥ {b} ops per launch");
                    r.why.push(format!(
                        "batch: launch.cu reaches {:.0}% of its {} ops/s ceiling with {b} ops \
                         per launch ({file})",
                        100.0 * BATCH_FRACTION,
                        thousands(max)
                    ));
                }
                (None, Some(l)) => {
                    let k = (l.ops_per_sec / v.best.1).ceil().max(2.0) as usize;
                    r.batch = format!("≈ {k} ops per launch");
                    r.why.push(format!(
                        "batch: the device limit is {:.1}x the best with one launch per op, so \
                         about {k} ops must share each launch to reach it (an estimate: no \
                         batch sweep was given)",
                        l.ops_per_sec / v.best.1
                    ));
                }
                (None, None) => r.batch = "-".into(),
            },
            Class::DeviceSaturated => {
                r.batch = "1 (one op per launch)".into();
                r.why.push(
                    "batch: the device is full; merging ops into larger launches cannot add \
                     throughput"
                        .into(),
                );
            }
            Class::Parallel => {
                r.batch = "1 (one op per launch)".into();
                r.why
                    .push("batch: threads still add throughput; merging is not needed yet".into());
            }
            Class::Collapsing | Class::Plateau => {
                r.batch = "1 (one op per launch)".into();
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(ys: &[f64]) -> Vec<(usize, f64)> {
        [1, 2, 4, 8, 16]
            .into_iter()
            .zip(ys.iter().copied())
            .collect()
    }

    #[test]
    fn linear_curve_below_the_limit_is_parallel() {
        let (v, c) = classify(
            &curve(&[100.0, 200.0, 400.0, 800.0, 1600.0]),
            Some(10_000.0),
        )
        .unwrap();
        assert_eq!(c, Class::Parallel);
        assert_eq!(v.saturation_threads, 16);
        // No limit at all: still parallel, the shape alone says so.
        assert_eq!(
            classify(&curve(&[100.0, 200.0, 400.0, 800.0, 1600.0]), None)
                .unwrap()
                .1,
            Class::Parallel
        );
    }

    #[test]
    fn curve_reaching_the_limit_is_device_saturated() {
        let pts = curve(&[100.0, 190.0, 205.0, 210.0, 212.0]);
        let (v, c) = classify(&pts, Some(220.0)).unwrap();
        assert_eq!(c, Class::DeviceSaturated);
        assert_eq!(v.saturation_threads, 2);
        // A linear curve that reaches the limit is saturated too, not "parallel".
        let (_, c) = classify(&curve(&[100.0, 200.0, 400.0, 800.0, 1600.0]), Some(1700.0)).unwrap();
        assert_eq!(c, Class::DeviceSaturated);
        // Flat from one thread at the limit: one op fills the device.
        let (v, c) = classify(&curve(&[28.0, 28.3, 28.6, 28.5, 28.2]), Some(35.8)).unwrap();
        assert_eq!((c, v.saturation_threads), (Class::DeviceSaturated, 1));
    }

    #[test]
    fn curve_flattening_far_below_the_limit_is_launch_bound() {
        // The H100's minimal op: 89k → 403k, device limit ≈ 3M.
        let pts = curve(&[89_047.0, 158_080.0, 269_472.0, 400_297.0, 403_029.0]);
        let (v, c) = classify(&pts, Some(2_969_161.0)).unwrap();
        assert_eq!(c, Class::LaunchBound);
        assert_eq!(v.saturation_threads, 8);
        // Flat from the start, far below the limit: launch-bound, not saturated.
        let (_, c) = classify(
            &curve(&[3_400.0, 3_500.0, 3_450.0, 3_300.0, 3_350.0]),
            Some(7_200.0),
        )
        .unwrap();
        assert_eq!(c, Class::LaunchBound);
        // Without a limit the cause is not known.
        assert_eq!(classify(&pts, None).unwrap().1, Class::Plateau);
    }

    #[test]
    fn falling_curve_is_collapsing_whatever_the_limit() {
        let pts = curve(&[100.0, 180.0, 150.0, 90.0, 40.0]);
        assert_eq!(classify(&pts, Some(185.0)).unwrap().1, Class::Collapsing);
        assert_eq!(classify(&pts, Some(10_000.0)).unwrap().1, Class::Collapsing);
        assert_eq!(classify(&pts, None).unwrap().1, Class::Collapsing);
    }

    #[test]
    fn too_few_points_give_no_class() {
        assert!(classify(&[(16, 100.0)], Some(1.0)).is_none());
    }
}
