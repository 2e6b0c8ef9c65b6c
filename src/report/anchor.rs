//! Peer programs' outputs (`--anchor FILE`), read tolerantly.
//!
//! Two formats are known, both plain text from the CUDA C++ peers in `shared/anchors/`:
//! - `mq.cu`: an optional `device NAME` line, then per configuration
//!   `mq inflight=N PRESET SCENARIO 1T=v 2T=v … max-scaling=xS` (ops/s per thread count);
//! - `launch.cu`: sections headed `== sched=S max_connections=M`, each with
//!   `launch+wait ops/s: 1T=v …`, `async enqueue ops/s: 1T=v …` (an empty kernel) and
//!   `PRESET op…, B coalesced…: B1=v B4=v …` (one thread, B ops merged into each launch).
//!
//! Lines in neither format are skipped, and so are tokens that do not parse; a file with no
//! line in a known format is an [`Error::BadInput`].

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One curve of `mq.cu`: ops/s per thread count for one preset, scenario and depth.
#[derive(Clone, Debug, PartialEq)]
pub struct MqCurve {
    /// Preset name (`heavy`, `default`, `light`, `minimal`), at full size.
    pub preset: String,
    /// `shared` or `per-thread`.
    pub scenario: String,
    /// Ops in flight per thread.
    pub inflight: usize,
    /// (threads, ops/s).
    pub points: Vec<(usize, f64)>,
}

/// One section of `launch.cu`'s output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LaunchSection {
    /// The wait scheduling (`auto`, `spin`, `yield`, `block`; `unstated` without a header).
    pub sched: String,
    /// `CUDA_DEVICE_MAX_CONNECTIONS` as printed (`default(8)`, `32`).
    pub max_connections: String,
    /// Empty-kernel launch + wait, (threads, ops/s).
    pub launch_wait: Vec<(usize, f64)>,
    /// Empty-kernel async enqueue, (threads, ops/s).
    pub async_enqueue: Vec<(usize, f64)>,
    /// Per preset: (ops merged per launch, ops/s) from one thread.
    pub coalesced: Vec<(String, Vec<(usize, f64)>)>,
}

/// One anchor file.
#[derive(Clone, Debug, PartialEq)]
pub struct Anchor {
    /// The path as given.
    pub path: PathBuf,
    /// The device the file names, if it names one.
    pub device: Option<String>,
    /// `mq.cu` curves.
    pub mq: Vec<MqCurve>,
    /// `launch.cu` sections.
    pub launch: Vec<LaunchSection>,
}

impl Anchor {
    /// Reads and parses the anchor file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses `text`, the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let mut a = Anchor {
            path: path.to_path_buf(),
            device: None,
            mq: Vec::new(),
            launch: Vec::new(),
        };
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix("device ") {
                a.device = Some(name.trim().to_string());
            } else if let Some(rest) = line.strip_prefix("mq ") {
                if let Some(c) = parse_mq(rest) {
                    a.mq.push(c);
                }
            } else if let Some(rest) = line.strip_prefix("==") {
                let field = |key: &str| {
                    rest.split_whitespace()
                        .find_map(|t| t.strip_prefix(key))
                        .unwrap_or("unstated")
                        .to_string()
                };
                a.launch.push(LaunchSection {
                    sched: field("sched="),
                    max_connections: field("max_connections="),
                    ..LaunchSection::default()
                });
            } else if let Some((head, values)) = line.split_once(':') {
                let head = head.trim();
                let section = |a: &mut Anchor| {
                    if a.launch.is_empty() {
                        a.launch.push(LaunchSection {
                            sched: "unstated".into(),
                            max_connections: "unstated".into(),
                            ..LaunchSection::default()
                        });
                    }
                    a.launch.len() - 1
                };
                if head.starts_with("launch+wait") {
                    let pts = tokens(values, 'T');
                    if !pts.is_empty() {
                        let i = section(&mut a);
                        a.launch[i].launch_wait = pts;
                    }
                } else if head.starts_with("async enqueue") {
                    let pts = tokens(values, 'T');
                    if !pts.is_empty() {
                        let i = section(&mut a);
                        a.launch[i].async_enqueue = pts;
                    }
                } else if head.contains("coalesced") {
                    let preset = head
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_lowercase();
                    let pts = prefixed_tokens(values, 'B');
                    if !preset.is_empty() && !pts.is_empty() {
                        let i = section(&mut a);
                        a.launch[i].coalesced.push((preset, pts));
                    }
                }
            }
        }
        a.launch.retain(|s| {
            !(s.launch_wait.is_empty() && s.async_enqueue.is_empty() && s.coalesced.is_empty())
        });
        if a.mq.is_empty() && a.launch.is_empty() {
            return Err(Error::BadInput {
                path: path.display().to_string(),
                reason: "not an anchor output: no `mq inflight=…` line (mq.cu) and no \
                         `launch+wait ops/s:` or `… coalesced …: B1=…` line (launch.cu)"
                    .into(),
            });
        }
        Ok(a)
    }
}

/// `inflight=1 heavy shared 1T=3520 2T=3719 … max-scaling=x1.06`
fn parse_mq(rest: &str) -> Option<MqCurve> {
    let mut words = rest.split_whitespace();
    let inflight = words.next()?.strip_prefix("inflight=")?.parse().ok()?;
    let preset = words.next()?.to_string();
    let scenario = words.next()?.to_string();
    let points = tokens(&words.collect::<Vec<_>>().join(" "), 'T');
    (!points.is_empty()).then_some(MqCurve {
        preset,
        scenario,
        inflight,
        points,
    })
}

/// `1T=98413 2T=169843` with `suffix` 'T' → [(1, 98413.0), (2, 169843.0)].
fn tokens(s: &str, suffix: char) -> Vec<(usize, f64)> {
    s.split_whitespace()
        .filter_map(|t| {
            let (k, v) = t.split_once('=')?;
            let n = k.strip_suffix(suffix)?.parse().ok()?;
            let v: f64 = v.parse().ok()?;
            (n > 0 && v.is_finite() && v > 0.0).then_some((n, v))
        })
        .collect()
}

/// `B1=89712 B4=334209` with `prefix` 'B' → [(1, 89712.0), (4, 334209.0)].
fn prefixed_tokens(s: &str, prefix: char) -> Vec<(usize, f64)> {
    s.split_whitespace()
        .filter_map(|t| {
            let (k, v) = t.split_once('=')?;
            let n = k.strip_prefix(prefix)?.parse().ok()?;
            let v: f64 = v.parse().ok()?;
            (n > 0 && v.is_finite() && v > 0.0).then_some((n, v))
        })
        .collect()
}

/// A peer curve as drawn: `mq.cu` ops/s per thread count, the median over the files given.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerCurve {
    /// Preset (full size).
    pub preset: String,
    /// `shared` or `per-thread`.
    pub scenario: String,
    /// Ops in flight per thread.
    pub inflight: usize,
    /// (threads, ops/s): the median over `files`.
    pub points: Vec<(usize, f64)>,
    /// The files it came from (labels).
    pub files: Vec<String>,
}

/// Everything the anchors say, merged: `mq.cu` curves (median over files) and the
/// `launch.cu` section that matches the results' wait policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Peers {
    /// `mq.cu` curves.
    pub mq: Vec<PeerCurve>,
    /// The `launch.cu` section used, and the label of its file.
    pub launch: Option<(LaunchSection, String)>,
}

impl Peers {
    /// Merges `anchors` (labelled `labels`): the `launch.cu` section whose `sched` equals
    /// `wait` with the default connection count, else `sched=auto` with the default, else
    /// the first.
    pub fn merge(anchors: &[Anchor], labels: &[String], wait: &str) -> Self {
        let mut mq: Vec<PeerCurve> = Vec::new();
        let mut values: Vec<Vec<(usize, Vec<f64>)>> = Vec::new();
        for (a, label) in anchors.iter().zip(labels) {
            for c in &a.mq {
                let i = match mq.iter().position(|m| {
                    m.preset == c.preset && m.scenario == c.scenario && m.inflight == c.inflight
                }) {
                    Some(i) => i,
                    None => {
                        mq.push(PeerCurve {
                            preset: c.preset.clone(),
                            scenario: c.scenario.clone(),
                            inflight: c.inflight,
                            points: Vec::new(),
                            files: Vec::new(),
                        });
                        values.push(Vec::new());
                        mq.len() - 1
                    }
                };
                if !mq[i].files.contains(label) {
                    mq[i].files.push(label.clone());
                }
                for &(t, v) in &c.points {
                    match values[i].iter_mut().find(|(n, _)| *n == t) {
                        Some((_, vs)) => vs.push(v),
                        None => values[i].push((t, vec![v])),
                    }
                }
            }
        }
        for (curve, mut vals) in mq.iter_mut().zip(values) {
            vals.sort_by_key(|(t, _)| *t);
            curve.points = vals.into_iter().map(|(t, vs)| (t, median(vs))).collect();
        }
        let sections: Vec<(&LaunchSection, &String)> = anchors
            .iter()
            .zip(labels)
            .flat_map(|(a, l)| a.launch.iter().map(move |s| (s, l)))
            .collect();
        let default_conn = |s: &LaunchSection| s.max_connections.starts_with("default");
        let launch = sections
            .iter()
            .find(|(s, _)| s.sched == wait && default_conn(s))
            .or_else(|| {
                sections
                    .iter()
                    .find(|(s, _)| s.sched == "auto" && default_conn(s))
            })
            .or_else(|| sections.first())
            .map(|(s, l)| ((*s).clone(), (*l).clone()));
        Peers { mq, launch }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mq_output_parses_and_junk_is_skipped() {
        let text = "device NVIDIA H100 80GB HBM3\n\
                    mq inflight=1 heavy    shared     1T=3520 2T=3719 4T=x  max-scaling=x1.06\n\
                    some warning line\n\
                    mq inflight=8 minimal  per-thread 1T=145377 16T=307811  max-scaling=x2.12\n";
        let a = Anchor::parse(Path::new("mq.txt"), text).unwrap();
        assert_eq!(a.device.as_deref(), Some("NVIDIA H100 80GB HBM3"));
        assert_eq!(a.mq.len(), 2);
        assert_eq!(a.mq[0].points, vec![(1, 3520.0), (2, 3719.0)]);
        assert_eq!(a.mq[1].scenario, "per-thread");
        assert_eq!(a.mq[1].inflight, 8);
    }

    #[test]
    fn launch_output_parses_sections() {
        let text = "== sched=spin max_connections=default(8)\n\
                    launch+wait ops/s:    1T=100164 2T=170027\n\
                    async enqueue ops/s:  1T=233347\n\
                    minimal op, B coalesced per launch, 1 thread, ops/s: B1=85567 B1024=2969161\n\
                    light op (1M x 10), B coalesced, ops/s: B1=64108 B64=186507\n\
                    == sched=block max_connections=32\n\
                    launch+wait ops/s:    1T=99855\n";
        let a = Anchor::parse(Path::new("launch.txt"), text).unwrap();
        assert_eq!(a.launch.len(), 2);
        let s = &a.launch[0];
        assert_eq!(
            (s.sched.as_str(), s.max_connections.as_str()),
            ("spin", "default(8)")
        );
        assert_eq!(s.launch_wait, vec![(1, 100164.0), (2, 170027.0)]);
        assert_eq!(s.coalesced[0].0, "minimal");
        assert_eq!(
            s.coalesced[1],
            ("light".into(), vec![(1, 64108.0), (64, 186507.0)])
        );
        assert_eq!(a.launch[1].max_connections, "32");
    }

    #[test]
    fn peers_take_the_median_and_the_matching_launch_section() {
        let mq = |v: u32| {
            Anchor::parse(
                Path::new("m"),
                &format!("mq inflight=1 light per-thread 1T={v} 2T={}\n", v * 2),
            )
            .unwrap()
        };
        let launch = Anchor::parse(
            Path::new("l"),
            "== sched=auto max_connections=default(8)\nlaunch+wait ops/s: 1T=1\n\
             == sched=spin max_connections=32\nlaunch+wait ops/s: 1T=2\n\
             == sched=spin max_connections=default(8)\nlaunch+wait ops/s: 1T=3\n",
        )
        .unwrap();
        let labels: Vec<String> = ["a", "b", "c", "l"].map(String::from).to_vec();
        let p = Peers::merge(&[mq(10), mq(30), mq(20), launch.clone()], &labels, "spin");
        assert_eq!(p.mq.len(), 1);
        assert_eq!(p.mq[0].points, vec![(1, 20.0), (2, 40.0)]);
        assert_eq!(p.mq[0].files.len(), 3);
        assert_eq!(p.launch.as_ref().unwrap().0.launch_wait, vec![(1, 3.0)]);
        let p = Peers::merge(&[launch], &labels[3..], "block");
        assert_eq!(p.launch.unwrap().0.sched, "auto");
    }

    #[test]
    fn a_file_in_no_known_format_is_an_error() {
        let e = Anchor::parse(Path::new("a.txt"), "hello\n1 2 3\n").unwrap_err();
        assert!(e.to_string().starts_with("a.txt: not an anchor output"));
        assert!(Anchor::parse(Path::new("b.txt"), "").is_err());
    }
}
