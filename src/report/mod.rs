//! The study as a report: `report.md` and SVG charts, computed from results files.
//!
//! `multiq bench --report DIR` writes one for the study it just ran (its JSON beside it), and
//! `multiq report RESULTS.json… --out DIR [--anchor FILE…]` one for stored results. What the
//! report promises:
//! - every number in it is computed from the files given, and each table, chart and verdict
//!   names the file it came from; the provenance section lists each file's command, commit,
//!   date, device and driver. Nothing is typed by hand;
//! - one report covers one device: results from different devices, or an anchor that names
//!   another device, are refused (a usage error);
//! - charts: ops/s over threads per op (a stream per thread and one shared stream, the other
//!   lock modes and depths measured, peers' curves from `--anchor` on the same axes), speedup
//!   against ideal, coalescing off against on, latency percentiles;
//! - the verdict per op (saturation point, maximum speedup, efficiency, class: parallel /
//!   launch-bound / device-saturated / collapsing, with the device limit that decides it) and a
//!   recommendation for the machine; the decision rule is in [`verdict`] and printed in the
//!   report.
//!
//! Modules: [`input`] reads results files, [`anchor`] peers' outputs, [`series`] groups runs
//! into curves, [`verdict`] judges them, [`figures`] builds the charts that [`plot`] draws, and
//! [`markdown`] writes `report.md`.

pub mod anchor;
pub mod figures;
pub mod input;
pub mod markdown;
pub mod plot;
pub mod series;
pub mod verdict;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use anchor::{Anchor, Peers};
use input::{Source, StoredResults};
use series::{Op, Series};
use verdict::{Evidence, OpVerdict};

/// The JSON file `multiq bench --report DIR` writes into DIR when `--json` is not given.
pub const STUDY_JSON: &str = "study.json";

/// Everything a report is made from.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// Results files.
    pub sources: Vec<Source>,
    /// Peer outputs.
    pub anchors: Vec<Anchor>,
    /// The command that makes this report, as typed.
    pub command: String,
}

impl Inputs {
    /// Loads results files and anchors, refusing a mix of devices.
    pub fn load(files: &[PathBuf], anchors: &[PathBuf], command: String) -> Result<Self> {
        let mut sources = Vec::new();
        for path in files {
            sources.push(Source {
                path: path.clone(),
                results: StoredResults::load(path)?,
            });
        }
        let anchors = anchors
            .iter()
            .map(|p| Anchor::load(p))
            .collect::<Result<Vec<_>>>()?;
        let inputs = Inputs {
            sources,
            anchors,
            command,
        };
        inputs.check_one_device()?;
        Ok(inputs)
    }

    /// Refuses results from more than one device, and anchors naming another device.
    pub fn check_one_device(&self) -> Result<()> {
        let Some(first) = self.sources.first() else {
            return Err(Error::invalid("a report needs at least one results file"));
        };
        let device = first.results.device_name();
        for s in &self.sources[1..] {
            if s.results.device_name() != device {
                return Err(Error::invalid(format!(
                    "{} was measured on `{}`, {} on `{device}`: a report covers one device \
                     (make one report per device)",
                    s.path.display(),
                    s.results.device_name(),
                    first.path.display()
                )));
            }
        }
        for a in &self.anchors {
            if let Some(d) = &a.device {
                if d != device {
                    return Err(Error::invalid(format!(
                        "--anchor {}: measured on `{d}`, the results on `{device}`",
                        a.path.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Short labels for paths: file names, or the last two components where names repeat.
pub fn labels(paths: &[&Path]) -> Vec<String> {
    let name = |p: &Path, n: usize| {
        let parts: Vec<String> = p
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        parts[parts.len().saturating_sub(n)..].join("/")
    };
    let short: Vec<String> = paths.iter().map(|p| name(p, 1)).collect();
    paths
        .iter()
        .zip(&short)
        .map(|(p, s)| {
            if short.iter().filter(|x| *x == s).count() > 1 {
                name(p, 2)
            } else {
                s.clone()
            }
        })
        .collect()
}

/// The report's analysis: series, peers and verdicts.
pub struct Analysis {
    /// The inputs.
    pub inputs: Inputs,
    /// Labels of the results files.
    pub files: Vec<String>,
    /// Labels of the anchors.
    pub anchor_files: Vec<String>,
    /// Every series.
    pub series: Vec<Series>,
    /// Runs left out as duplicates.
    pub dropped: usize,
    /// Merged anchors.
    pub peers: Peers,
    /// Ops, heaviest first.
    pub ops: Vec<Op>,
    /// Verdict per op.
    pub verdicts: Vec<OpVerdict>,
}

impl Analysis {
    /// Analyses `inputs`.
    pub fn new(inputs: Inputs) -> Self {
        let files = labels(
            &inputs
                .sources
                .iter()
                .map(|s| s.path.as_path())
                .collect::<Vec<_>>(),
        );
        let anchor_files = labels(
            &inputs
                .anchors
                .iter()
                .map(|a| a.path.as_path())
                .collect::<Vec<_>>(),
        );
        let wait = inputs
            .sources
            .first()
            .map(|s| s.results.device_info.wait.clone())
            .unwrap_or_default();
        let peers = Peers::merge(&inputs.anchors, &anchor_files, &wait);
        let (series, dropped) = series::group(&inputs.sources);
        let ops = series::ops(&series);
        let verdicts = {
            let ev = Evidence {
                series: &series,
                peers: &peers,
                files: &files,
            };
            ops.iter().map(|op| ev.op_verdict(op)).collect()
        };
        Analysis {
            inputs,
            files,
            anchor_files,
            series,
            dropped,
            peers,
            ops,
            verdicts,
        }
    }
}

/// What a report wrote.
#[derive(Clone, Debug)]
pub struct Written {
    /// `report.md`.
    pub report: PathBuf,
    /// The SVG charts.
    pub figures: Vec<PathBuf>,
}

/// Makes sure `dir` exists (creating it) and can be written, before any work is done.
pub fn prepare_dir(dir: &Path, flag: &str) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::invalid(format!(
            "{flag} {}: exists and is not a directory",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::invalid(format!("{flag} {}: cannot create it: {e}", dir.display())))?;
    let probe = dir.join(format!(".multiq-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| {
        Error::invalid(format!("{flag} {}: cannot write there: {e}", dir.display()))
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `report.md` and its charts into `dir` (which must exist).
pub fn write(dir: &Path, inputs: Inputs) -> Result<Written> {
    let analysis = Analysis::new(inputs);
    let figs = figures::build(&analysis);
    let mut written = Vec::new();
    for f in &figs {
        let svg = plot::render(&f.chart).map_err(|reason| Error::BadInput {
            path: f.file.clone(),
            reason: format!("cannot draw the chart: {reason}"),
        })?;
        let path = dir.join(&f.file);
        write_file(&path, &svg)?;
        written.push(path);
    }
    let text = markdown::render(&analysis, &figs, dir);
    let report = dir.join("report.md");
    write_file(&report, &text)?;
    Ok(Written {
        report,
        figures: written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use input::{StoredDeviceInfo, StoredLatency, StoredRun};
    use verdict::Class;

    fn run(
        preset: &str,
        data: usize,
        k: u32,
        scenario: &str,
        threads: usize,
        ops: f64,
    ) -> StoredRun {
        StoredRun {
            workload: "queues".into(),
            preset: preset.into(),
            scenario: scenario.into(),
            lock: "per-stream".into(),
            inflight: 1,
            data,
            kernel_iters: k,
            threads,
            ops: 100,
            seconds: 100.0 / ops,
            ops_per_sec: ops,
            speedup: 1.0,
            verified: true,
            wait: "spin".into(),
            coalesce: "off".into(),
            coalesce_max_batch: 1,
            coalesce_depth: 0,
            ops_per_launch: 1.0,
            latency_us: Some(StoredLatency {
                p50: 1e6 / ops * threads as f64,
                p99: 2e6 / ops * threads as f64,
                p999: 3e6 / ops * threads as f64,
            }),
            repeats: 1,
            host: None,
            per_thread: None,
        }
    }

    /// A synthetic GPU-like study: a heavy op that fills the device from one thread, a light
    /// one that scales to the device limit, a tiny one that flattens far below it, one that
    /// collapses, and one still scaling.
    pub(crate) fn synthetic() -> Inputs {
        let t = [1, 2, 4, 8, 16];
        let mut runs = Vec::new();
        let mut curve = |p: &str, d: usize, k: u32, per: [f64; 5], shared: [f64; 5]| {
            for (i, &n) in t.iter().enumerate() {
                runs.push(run(p, d, k, "per-thread", n, per[i]));
                runs.push(run(p, d, k, "shared", n, shared[i]));
            }
        };
        // work 1M × 500: 3,878 ops/s is 2.03e12 element-iterations/s.
        curve(
            "heavy",
            1 << 20,
            500,
            [3_600.0, 3_870.0, 3_875.0, 3_878.0, 3_878.0],
            [3_500.0, 3_700.0, 3_700.0, 3_700.0, 3_700.0],
        );
        curve(
            "light",
            1 << 20,
            10,
            [62_000.0, 113_000.0, 186_000.0, 193_000.0, 190_000.0],
            [55_000.0, 80_000.0, 84_000.0, 82_000.0, 80_000.0],
        );
        curve(
            "minimal",
            1 << 16,
            10,
            [89_000.0, 158_000.0, 269_000.0, 400_000.0, 403_000.0],
            [72_000.0, 77_000.0, 76_000.0, 75_000.0, 78_000.0],
        );
        curve(
            "collapse",
            1 << 16,
            20,
            [50_000.0, 90_000.0, 60_000.0, 40_000.0, 20_000.0],
            [50_000.0, 51_000.0, 50_000.0, 49_000.0, 48_000.0],
        );
        curve(
            "linear",
            1 << 18,
            100,
            [1_000.0, 2_000.0, 4_000.0, 8_000.0, 16_000.0],
            [1_000.0, 1_000.0, 1_000.0, 1_000.0, 1_000.0],
        );
        // Coalescing on for minimal at 1 and 16 threads: slower.
        for (n, ops) in [(1, 85_000.0), (16, 250_000.0)] {
            let mut r = run("minimal", 1 << 16, 10, "per-thread", n, ops);
            r.coalesce = "fixed".into();
            r.coalesce_max_batch = 16;
            r.ops_per_launch = if n == 1 { 1.0 } else { 6.0 };
            runs.push(r);
        }
        let results = StoredResults {
            multiq_version: "0.1.0".into(),
            git_commit: "abc123".into(),
            backend: "cuda".into(),
            device: "Synthetic GPU".into(),
            host_threads: 16,
            started_at: "2026-01-01T00:00:00Z".into(),
            command: "multiq bench --json synthetic.json".into(),
            device_info: StoredDeviceInfo {
                backend: "cuda".into(),
                name: "Synthetic GPU".into(),
                units: 132,
                memory_bytes: Some(80 << 30),
                driver: Some("CUDA driver API 13.0".into()),
                wait: "spin".into(),
                extra: vec![],
            },
            notes: vec![],
            runs,
            skipped: vec![],
        };
        Inputs {
            sources: vec![Source {
                path: PathBuf::from("synthetic.json"),
                results,
            }],
            anchors: vec![],
            command: "multiq report synthetic.json --out x".into(),
        }
    }

    fn class_of(a: &Analysis, preset: &str) -> Class {
        a.verdicts
            .iter()
            .find(|v| v.op.preset == preset)
            .and_then(|v| v.per_thread.as_ref())
            .map(|v| v.class)
            .unwrap()
    }

    #[test]
    fn synthetic_study_is_classified_from_its_own_numbers() {
        let a = Analysis::new(synthetic());
        assert_eq!(a.ops.first().unwrap().preset, "heavy", "heaviest first");
        assert_eq!(class_of(&a, "heavy"), Class::DeviceSaturated);
        assert_eq!(class_of(&a, "light"), Class::DeviceSaturated);
        assert_eq!(class_of(&a, "minimal"), Class::LaunchBound);
        assert_eq!(class_of(&a, "collapse"), Class::Collapsing);
        assert_eq!(class_of(&a, "linear"), Class::Parallel);
        let minimal = a
            .verdicts
            .iter()
            .find(|v| v.op.preset == "minimal")
            .unwrap();
        let limit = minimal.per_thread.as_ref().unwrap().limit().unwrap();
        // heavy's work rate ÷ minimal's work: 3,878 × 500 × 2^20 / (10 × 2^16).
        assert!((limit.ops_per_sec - 3_878.0 * 500.0 * 16.0 / 10.0).abs() < 1.0);
        assert!(limit.how.contains("heavy") && limit.how.contains("synthetic.json"));
        let rec = &minimal.recommendation;
        assert_eq!(rec.threads, Some(8));
        assert_eq!(rec.streams, "a stream per thread");
        assert_eq!(rec.coalescing, "off", "coalescing was slower");
        assert!(rec.batch.contains("ops per launch"), "{}", rec.batch);
        let heavy = a.verdicts.iter().find(|v| v.op.preset == "heavy").unwrap();
        assert_eq!(heavy.recommendation.threads, Some(1));
        assert!(heavy.recommendation.batch.starts_with('1'));
    }

    #[test]
    fn report_is_written_with_charts_and_provenance() {
        let dir = std::env::temp_dir().join(format!("multiq-report-unit-{}", std::process::id()));
        prepare_dir(&dir, "--out").unwrap();
        let w = write(&dir, synthetic()).unwrap();
        let md = std::fs::read_to_string(&w.report).unwrap();
        for needle in [
            "Synthetic GPU",
            "abc123",
            "2026-01-01T00:00:00Z",
            "CUDA driver API 13.0",
            "multiq bench --json synthetic.json",
            "launch-bound",
            "device-saturated",
            "collapsing",
            "parallel",
            "throughput-minimal.svg",
            "speedup.svg",
            "coalescing-minimal.svg",
            "latency-minimal.svg",
        ] {
            assert!(md.contains(needle), "report.md lacks {needle}");
        }
        for f in &w.figures {
            let svg = std::fs::read_to_string(f).unwrap();
            assert!(
                svg.starts_with("<svg") && !svg.contains("NaN"),
                "{}",
                f.display()
            );
            assert!(md.contains(f.file_name().unwrap().to_str().unwrap()));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_mix_of_devices_is_refused() {
        let mut i = synthetic();
        let mut other = i.sources[0].clone();
        other.results.device = "Another GPU".into();
        other.path = PathBuf::from("other.json");
        i.sources.push(other);
        let e = i.check_one_device().unwrap_err();
        assert!(e.is_usage() && e.to_string().contains("one device"), "{e}");
    }

    #[test]
    fn labels_disambiguate_repeated_names() {
        let l = labels(&[
            Path::new("a/h100/anchor.txt"),
            Path::new("a/h100/coalesce/anchor.txt"),
            Path::new("b/study.json"),
        ]);
        assert_eq!(l, ["h100/anchor.txt", "coalesce/anchor.txt", "study.json"]);
    }
}
