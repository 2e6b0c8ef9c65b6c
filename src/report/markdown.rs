//! `report.md`: the verdict, the recommendation, the charts with their numbers, the decision
//! rule and the provenance of every file, written from the analysis alone.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use super::figures::{label, Figure, Kind};
use super::series::{sweep, Series};
use super::verdict::{
    CurveVerdict, BATCH_FRACTION, CHOICE_GAIN, DEPTH_GAIN, DEVICE_FRACTION, ENOUGH_FRACTION,
};
use super::Analysis;
use crate::bench::results::GIT_COMMIT;
use crate::bench::table::thousands;
use crate::bench::verdict::{COLLAPSE_FRACTION, SATURATION_GAIN};

/// `file` as a link relative to the directory `from` (both made absolute first); the path as
/// given where that cannot be worked out.
pub fn relative(from: &Path, file: &Path) -> String {
    let abs = |p: &Path| -> Option<PathBuf> {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().ok()?.join(p)
        };
        // Lexical normalisation: `a/./b/../c` → `a/c`.
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::CurDir => {}
                Component::ParentDir => {
                    out.pop();
                }
                c => out.push(c),
            }
        }
        Some(out)
    };
    let (Some(from), Some(to)) = (abs(from), abs(file)) else {
        return file.display().to_string();
    };
    let a: Vec<_> = from.components().collect();
    let b: Vec<_> = to.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut parts: Vec<String> = vec!["..".into(); a.len() - common];
    parts.extend(
        b[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("/")
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

/// `1 thread`, `8 threads`.
pub fn threads(n: usize) -> String {
    if n == 1 {
        "1 thread".into()
    } else {
        format!("{n} threads")
    }
}

fn ratio(x: f64) -> String {
    format!("x{x:.2}")
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Renders the report for `a` with `figures`, to be written into `dir`.
pub fn render(a: &Analysis, figures: &[Figure], dir: &Path) -> String {
    let mut s = String::new();
    let first = &a.inputs.sources[0].results;
    let device = first.device_name();
    let _ = writeln!(s, "# multiq report: {device}\n");
    let _ = writeln!(
        s,
        "How many threads can share this device, and what limits them: ops/s by thread count \
         for each op size, a verdict per op, and a recommendation. Every number below is \
         computed by multiq from the results file(s) listed under [Provenance](#provenance); \
         none is typed by hand. Made with:\n\n```\n{}\n```\n",
        a.inputs.command
    );
    for (i, src) in a.inputs.sources.iter().enumerate() {
        let r = &src.results;
        let _ = writeln!(
            s,
            "- [{}]({}): `{}`, started {}, multiq commit `{}`, {} backend{}.",
            a.files[i],
            relative(dir, &src.path),
            md_escape(&r.command),
            r.started_at,
            r.git_commit,
            r.backend,
            r.device_info
                .driver
                .as_ref()
                .map_or(String::new(), |d| format!(", driver {d}"))
        );
    }
    let notes: Vec<&String> = a
        .inputs
        .sources
        .iter()
        .flat_map(|x| x.results.notes.iter())
        .collect();
    if !notes.is_empty() {
        s += "\nAs measured:\n";
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s += "\n";
    verdict_section(&mut s, a);
    recommendation_section(&mut s, a);
    throughput_section(&mut s, a, figures);
    speedup_section(&mut s, a, figures);
    coalescing_section(&mut s, a, figures);
    latency_section(&mut s, a, figures);
    rule_section(&mut s);
    provenance_section(&mut s, a, dir);
    runs_section(&mut s, a);
    s
}

fn limit_cells(v: &CurveVerdict) -> (String, String) {
    match (v.limit(), v.fraction()) {
        (Some(l), Some(f)) => (thousands(l.ops_per_sec), format!("{:.0}%", 100.0 * f)),
        _ => ("-".into(), "-".into()),
    }
}

fn verdict_section(s: &mut String, a: &Analysis) {
    s.push_str("## Verdict\n\n");
    s.push_str(
        "Per op, the sweep with a stream per thread and a wait after every op. *Saturates at*: \
         the thread count past which doubling adds < 10%; *efficiency*: speedup there over \
         ideal; *device limit*: the most this op was seen to reach outside the sweep (see the \
         evidence and [the rule](#how-the-verdict-is-decided)).\n\n",
    );
    s.push_str(
        "| op | elements × iterations | class | saturates at | max speedup | efficiency there \
         | best ops/s (threads) | device limit, ops/s | best ÷ limit |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for v in &a.verdicts {
        match &v.per_thread {
            Some(p) => {
                let (lim, frac) = limit_cells(p);
                let _ = writeln!(
                    s,
                    "| {} | {} | **{}** | {} | {} | {:.0}% | {} ({}) | {lim} | {frac} |",
                    v.op.preset,
                    v.op.shape(),
                    p.class.name(),
                    threads(p.verdict.saturation_threads),
                    ratio(p.verdict.max_speedup),
                    100.0 * p.verdict.efficiency_at_saturation,
                    thousands(p.best.1),
                    p.best.0
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "| {} | {} | not classified | - | - | - | - | - | - |",
                    v.op.preset,
                    v.op.shape()
                );
            }
        }
    }
    s.push('\n');
    for v in &a.verdicts {
        let class = v
            .per_thread
            .as_ref()
            .map_or("not classified", |p| p.class.name());
        let _ = writeln!(s, "**{}: {class}.**\n", v.op.preset);
        for e in &v.evidence {
            let _ = writeln!(s, "- {e}");
        }
        s.push('\n');
    }
}

fn recommendation_section(s: &mut String, a: &Analysis) {
    let device = a.inputs.sources[0].results.device_name();
    let _ = writeln!(s, "## Recommendation for this machine ({device})\n");
    s.push_str(
        "| op | threads | streams | lock | submission | coalescing | batch |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for v in &a.verdicts {
        let r = &v.recommendation;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            v.op.preset,
            r.threads.map_or("-".into(), |t| t.to_string()),
            r.streams,
            r.lock,
            r.submission,
            r.coalescing,
            r.batch
        );
    }
    s.push_str("\nWhy:\n\n");
    for v in &a.verdicts {
        let _ = writeln!(
            s,
            "- **{}**: {}.",
            v.op.preset,
            v.recommendation.why.join("; ")
        );
    }
    s.push('\n');
}

fn figure_link(s: &mut String, f: &Figure) {
    let _ = writeln!(s, "![{}]({})\n", md_escape(&f.chart.title), f.file);
}

/// A table of ops/s by threads, one column per series.
fn series_table(s: &mut String, a: &Analysis, group: &[&Series]) {
    let mut threads: Vec<usize> = group
        .iter()
        .flat_map(|x| x.runs.iter().map(|r| r.threads))
        .collect();
    threads.sort_unstable();
    threads.dedup();
    s.push_str("| threads |");
    for g in group {
        let _ = write!(s, " {} |", md_escape(&label(a, g, group)));
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(group.len()));
    s.push('\n');
    for t in threads {
        let _ = write!(s, "| {t} |");
        for g in group {
            let cell = g.at(t).map_or("".into(), |r| {
                if r.verified {
                    thousands(r.ops_per_sec)
                } else {
                    format!("{} (MISMATCH)", thousands(r.ops_per_sec))
                }
            });
            let _ = write!(s, " {cell} |");
        }
        s.push('\n');
    }
    s.push('\n');
}

fn throughput_section(s: &mut String, a: &Analysis, figures: &[Figure]) {
    s.push_str("## Throughput by threads\n\n");
    s.push_str(
        "Ops/s with one launch per op: a stream per thread (solid), one shared stream \
         (dashed), and the other locks and depths that were measured; a peer's curves where \
         given with `--anchor`; the device limit as a grey level.\n\n",
    );
    for op in &a.ops {
        let figs: Vec<&Figure> = figures
            .iter()
            .filter(|f| f.kind == Kind::Throughput && f.op.as_ref() == Some(op))
            .collect();
        if figs.is_empty() {
            continue;
        }
        let _ = writeln!(s, "### {} ({})\n", op.preset, op.shape());
        for f in figs {
            figure_link(s, f);
        }
        let group: Vec<&Series> = a
            .series
            .iter()
            .filter(|x| x.config.op == *op && x.config.coalesce == "off")
            .collect();
        series_table(s, a, &group);
        if let Some(p) = op.full_size_preset() {
            let peers: Vec<_> = a.peers.mq.iter().filter(|c| c.preset == p.name()).collect();
            if !peers.is_empty() {
                s.push_str("Peer `mq.cu` (median over its files), ops/s:\n\n| curve |");
                let mut threads: Vec<usize> = peers
                    .iter()
                    .flat_map(|c| c.points.iter().map(|p| p.0))
                    .collect();
                threads.sort_unstable();
                threads.dedup();
                for t in &threads {
                    let _ = write!(s, " {t} |");
                }
                s.push_str("\n|---|");
                s.push_str(&"---|".repeat(threads.len()));
                s.push('\n');
                for c in peers {
                    let _ = write!(
                        s,
                        "| {}, {} in flight ({}) |",
                        c.scenario,
                        c.inflight,
                        c.files.join(", ")
                    );
                    for t in &threads {
                        let cell = c
                            .points
                            .iter()
                            .find(|p| p.0 == *t)
                            .map_or(String::new(), |p| thousands(p.1));
                        let _ = write!(s, " {cell} |");
                    }
                    s.push('\n');
                }
                s.push('\n');
            }
        }
    }
}

fn speedup_section(s: &mut String, a: &Analysis, figures: &[Figure]) {
    s.push_str("## Speedup against ideal\n\n");
    let Some(f) = figures.iter().find(|f| f.kind == Kind::Speedup) else {
        s.push_str("No op was measured at two or more thread counts.\n\n");
        return;
    };
    figure_link(s, f);
    s.push_str("| op | streams | speedup at each thread count | efficiency at the largest |\n");
    s.push_str("|---|---|---|---|\n");
    for op in &a.ops {
        for scenario in ["per-thread", "shared"] {
            let Some(x) = sweep(&a.series, op, scenario) else {
                continue;
            };
            let base = &x.runs[0];
            let cells: Vec<String> = x
                .runs
                .iter()
                .map(|r| format!("{}T {}", r.threads, ratio(r.ops_per_sec / base.ops_per_sec)))
                .collect();
            let last = x.runs.last().expect("runs");
            let eff =
                (last.ops_per_sec / base.ops_per_sec) / (last.threads as f64 / base.threads as f64);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0}% |",
                op.preset,
                if scenario == "shared" {
                    "one shared"
                } else {
                    "one per thread"
                },
                cells.join(", "),
                100.0 * eff
            );
        }
    }
    s.push('\n');
}

fn coalescing_section(s: &mut String, a: &Analysis, figures: &[Figure]) {
    s.push_str("## Coalescing off vs on\n\n");
    let figs: Vec<&Figure> = figures
        .iter()
        .filter(|f| f.kind == Kind::Coalescing)
        .collect();
    if figs.is_empty() {
        s.push_str(
            "No run in these results has coalescing on (the files predate it, or it was not \
             asked for).\n\n",
        );
        return;
    }
    s.push_str(
        "Concurrent ops from different threads merged into one launch (`--coalesce`), against \
         one launch per op in the same scenario, lock and depth.\n\n",
    );
    for f in figs {
        figure_link(s, f);
    }
    s.push_str(
        "| op | streams, lock, depth | threads | off, ops/s | policy | on, ops/s | on ÷ off | \
         ops per launch | p99 µs off / on |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for on in a.series.iter().filter(|x| x.config.coalesce != "off") {
        let c = &on.config;
        let off = a.series.iter().find(|o| {
            o.config.op == c.op
                && o.config.coalesce == "off"
                && o.config.scenario == c.scenario
                && o.config.lock == c.lock
                && o.config.inflight == c.inflight
                && o.config.wait == c.wait
                && o.config.source == c.source
        });
        for r in &on.runs {
            let o = off.and_then(|o| o.at(r.threads));
            let p99 = |x: Option<&super::input::StoredRun>| {
                x.and_then(|x| x.latency_us)
                    .map_or("-".into(), |l| format!("{:.0}", l.p99))
            };
            let _ = writeln!(
                s,
                "| {} | {}, lock {}, {} in flight | {} | {} | {} | {} | {} | {:.1} | {} / {} |",
                c.op.preset,
                c.scenario,
                c.lock,
                c.inflight,
                r.threads,
                o.map_or("-".into(), |o| thousands(o.ops_per_sec)),
                c.coalesce_words(),
                thousands(r.ops_per_sec),
                o.map_or("-".into(), |o| format!(
                    "{:.2}",
                    r.ops_per_sec / o.ops_per_sec
                )),
                r.ops_per_launch,
                p99(o),
                p99(Some(r))
            );
        }
    }
    s.push('\n');
}

fn latency_section(s: &mut String, a: &Analysis, figures: &[Figure]) {
    s.push_str("## Latency\n\n");
    let figs: Vec<&Figure> = figures.iter().filter(|f| f.kind == Kind::Latency).collect();
    if figs.is_empty() {
        s.push_str(
            "These results have no latency percentiles (files written before multiq recorded \
             them).\n\n",
        );
        return;
    }
    s.push_str(
        "Per-op latency, submission to completion as the submitting thread sees it, with a \
         wait after every op: p50, p99 and p99.9.\n\n",
    );
    for f in figs {
        figure_link(s, f);
    }
    s.push_str(
        "| op | streams | threads | p50 µs | p99 µs | p99.9 µs |\n|---|---|---|---|---|---|\n",
    );
    for op in &a.ops {
        for scenario in ["per-thread", "shared"] {
            let Some(x) = sweep(&a.series, op, scenario) else {
                continue;
            };
            for r in &x.runs {
                if let Some(l) = r.latency_us {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
                        op.preset, scenario, r.threads, l.p50, l.p99, l.p999
                    );
                }
            }
        }
    }
    s.push('\n');
}

fn rule_section(s: &mut String) {
    let pct = |x: f64| format!("{:.0}%", 100.0 * x);
    let _ = writeln!(
        s,
        "## How the verdict is decided\n\n\
         For each op, the sweep with a stream per thread and a wait after every op (lock \
         per-stream where measured) is judged:\n\n\
         - **saturation point**: the first thread count whose doubling adds less than {gain}; \
         **maximum speedup**: best ops/s over ops/s at the fewest threads; **efficiency**: the \
         speedup at the saturation point over the ideal (threads ÷ fewest threads).\n\
         - **device limit**: the highest of (a) this op's best ops/s in any other configuration \
         measured, (b) the device's best work rate (ops/s × elements × iterations) reached by a \
         run outside the sweep, divided by this op's work, and (c) a peer's figure for the op \
         at full size (`launch.cu` with many ops in one launch, `mq.cu`'s best). A sweep's own \
         points never count toward its limit.\n\
         - **collapsing** when the largest thread count is below {collapse} of the best; else \
         **device-saturated** when the best reaches {device} of the device limit; else \
         **parallel** when the last doubling still added {gain} or more; else \
         **launch-bound**: the sweep stopped growing below {device} of what the device can do, \
         so the launch-and-wait path per op is the limit; **plateau** when it stopped growing \
         and no limit was measured.\n\
         - **recommendation**: the fewest threads within {enough} of the best; a stream per \
         thread unless one shared stream is within {enough}; another lock, more ops in flight or \
         coalescing only when, where it was measured, it beats the best the sweep reached by \
         {choice} or more ({depth} for more in flight), and then at the thread count it was \
         measured at; for a launch-bound op, the batch (ops per launch) at which a peer's \
         coalesced launches reach {batch} of their ceiling, or else the device limit over the \
         best with one op per launch.\n",
        gain = pct(SATURATION_GAIN - 1.0),
        collapse = pct(COLLAPSE_FRACTION),
        device = pct(DEVICE_FRACTION),
        enough = pct(ENOUGH_FRACTION),
        choice = pct(CHOICE_GAIN - 1.0),
        depth = pct(DEPTH_GAIN - 1.0),
        batch = pct(BATCH_FRACTION),
    );
}

fn provenance_section(s: &mut String, a: &Analysis, dir: &Path) {
    s.push_str("## Provenance\n\n");
    for (i, src) in a.inputs.sources.iter().enumerate() {
        let r = &src.results;
        let d = &r.device_info;
        let _ = writeln!(s, "### [{}]({})\n", a.files[i], relative(dir, &src.path));
        let _ = writeln!(s, "- file: `{}`", src.path.display());
        let _ = writeln!(s, "- command: `{}`", r.command);
        let _ = writeln!(
            s,
            "- commit: `{}` (multiq {})",
            r.git_commit, r.multiq_version
        );
        let _ = writeln!(s, "- started: {}", r.started_at);
        let _ = writeln!(
            s,
            "- device: {} ({} backend, {} execution units{})",
            r.device_name(),
            r.backend,
            d.units,
            d.memory_bytes
                .map_or(String::new(), |m| format!(", {} memory", gib(m)))
        );
        let _ = writeln!(
            s,
            "- driver: {}",
            d.driver
                .as_deref()
                .unwrap_or("none (no driver on this backend)")
        );
        let _ = writeln!(
            s,
            "- wait policy: {}; host threads: {}",
            d.wait, r.host_threads
        );
        for (k, v) in &d.extra {
            let _ = writeln!(s, "- {k}: {v}");
        }
        for n in &r.notes {
            let _ = writeln!(s, "- note: {n}");
        }
        let verified = r.runs.iter().filter(|x| x.verified).count();
        let _ = writeln!(
            s,
            "- runs: {} ({} verified against the host reference)",
            r.runs.len(),
            verified
        );
        for k in &r.skipped {
            let _ = writeln!(
                s,
                "- not run: {} {} lock {} {} threads: {}",
                k.preset, k.scenario, k.lock, k.threads, k.reason
            );
        }
        s.push('\n');
    }
    if !a.inputs.anchors.is_empty() {
        s.push_str("### Peers (`--anchor`)\n\n");
        for (i, an) in a.inputs.anchors.iter().enumerate() {
            let what = match (an.mq.is_empty(), an.launch.is_empty()) {
                (false, true) => format!("`mq.cu` output, {} curves", an.mq.len()),
                (true, false) => format!("`launch.cu` output, {} section(s)", an.launch.len()),
                _ => format!(
                    "`mq.cu` and `launch.cu` output, {} curves, {} section(s)",
                    an.mq.len(),
                    an.launch.len()
                ),
            };
            let _ = writeln!(
                s,
                "- [{}]({}): {what}; device {}",
                a.anchor_files[i],
                relative(dir, &an.path),
                an.device
                    .as_ref()
                    .map_or("not stated in the file".into(), |d| format!("`{d}`"))
            );
        }
        if let Some((sec, file)) = &a.peers.launch {
            let _ = writeln!(
                s,
                "- `launch.cu` section used: sched={} max_connections={} from {file} (the one \
                 matching the results' wait policy, else sched=auto)",
                sec.sched, sec.max_connections
            );
        }
        s.push('\n');
    }
    if a.dropped > 0 {
        let _ = writeln!(
            s,
            "{} run(s) repeating a configuration and thread count already in the same file \
             were left out (the first is used).\n",
            a.dropped
        );
    }
    let _ = writeln!(
        s,
        "This report: made by multiq {} at commit `{GIT_COMMIT}` with `{}`.\n",
        env!("CARGO_PKG_VERSION"),
        a.inputs.command
    );
}

fn runs_section(s: &mut String, a: &Analysis) {
    s.push_str("## Every run\n\n");
    s.push_str(
        "Host: the submitting threads' CPU time per op, how often the scheduler took their \
         CPUs away (preempted), and the CPU time the hypervisor took from the machine (steal) \
         during the run. Last thread: when the last submitting thread finished, over when the \
         median one did (a run lasts until its last thread's last op, so one thread that fell \
         behind lowers ops/s however fast the others were). \"-\" where the file has no such \
         counters.\n\n",
    );
    s.push_str(
        "| file | op | streams | lock | in flight | coalescing | threads | ops/s | speedup | \
         p50 µs | p99 µs | verified | host CPU/op µs | preempted | steal ms | last thread ÷ median |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for (i, src) in a.inputs.sources.iter().enumerate() {
        for r in &src.results.runs {
            let (p50, p99) = r.latency_us.map_or(("-".into(), "-".into()), |l| {
                (format!("{:.1}", l.p50), format!("{:.1}", l.p99))
            });
            let host = r.host.unwrap_or_default();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {p50} | {p99} | {} | {} | {} | {} | {} |",
                a.files[i],
                r.preset,
                r.scenario,
                r.lock,
                r.inflight,
                r.coalesce,
                r.threads,
                thousands(r.ops_per_sec),
                r.speedup,
                if r.verified { "yes" } else { "**no**" },
                or_dash(host.cpu_per_op_us.map(|v| format!("{v:.1}"))),
                or_dash(host.involuntary_switches.map(|v| v.to_string())),
                or_dash(host.steal_ms.map(|v| format!("{v:.0}"))),
                or_dash(
                    r.per_thread
                        .as_ref()
                        .and_then(|p| p.straggle())
                        .map(|v| format!("{v:.2}"))
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::relative;
    use std::path::Path;

    #[test]
    fn links_are_relative_to_the_report() {
        assert_eq!(
            relative(
                Path::new("/r/bench/h100/report"),
                Path::new("/r/bench/h100/study.json")
            ),
            "../study.json"
        );
        assert_eq!(
            relative(Path::new("/r/out"), Path::new("/r/out/study.json")),
            "study.json"
        );
        assert_eq!(
            relative(Path::new("/r/a/./b/.."), Path::new("/r/c/x.txt")),
            "../c/x.txt"
        );
    }
}
