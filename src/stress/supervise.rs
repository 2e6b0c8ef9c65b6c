//! Running rounds: a supervisor process starts a worker process (this binary,
//! `multiq stress --worker`) that runs the rounds one after another and reports each as a
//! JSON line. When the worker dies mid-round (a signal, an abort, an exit it did not choose)
//! the supervisor counts a crash for that round, with the round's seed, and starts a new
//! worker at the next round; when the worker's watchdog fires it reports the hang and exits,
//! and the supervisor goes on the same way; when the worker stops answering altogether the
//! supervisor kills it and counts a hang. So a crash or a hang is counted, never the end of
//! the run, and `--in-process` (rounds in this process) is there for debugging only.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::leak::{LeakCheck, ResourceFigures};
use super::plan::{CoalesceKind, PlanSettings, RoundKind, RoundPlan};
use super::rng::{self, show_seed};
use super::watch::{Phase, RoundWatch, Watchdog, EXIT_HANG};
use super::{
    contain, device_options, install_panic_hook, run_round, Env, Hooks, RoundResult, Tally,
};
use crate::backend::{BackendKind, WaitPolicy};
use crate::bench::results::{self, GIT_COMMIT};
use crate::error::{Error, Result};
use crate::Device;

/// Resident-memory growth tolerated after the warm-up rounds.
const RSS_TOLERANCE: u64 = 256 << 20;

/// How long a child process of an exit round may take.
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// Failing rounds kept in the results file.
const KEEP_FAILURES: usize = 100;

/// Prefix of the worker's protocol lines on its stdout.
const MARK: &str = "@@multiq-stress ";

/// What to run.
#[derive(Clone, Debug)]
pub struct StressConfig {
    /// Backend (`None`: auto).
    pub backend: Option<BackendKind>,
    /// CPU units (`None`: 1, 2 or 4 drawn per round).
    pub units: Option<usize>,
    /// Wait policy (`None`: drawn per round).
    pub wait: Option<WaitPolicy>,
    /// CUDA device queue chaining in rounds with coalescing `persistent` (`None`: drawn per
    /// round).
    pub queue_chain: Option<bool>,
    /// Rounds to run at most.
    pub rounds: u64,
    /// Time limit: no round starts after it.
    pub seconds: Option<f64>,
    /// Threads of a mixed round.
    pub threads: usize,
    /// Master seed (`None`: from the clock).
    pub seed: Option<u64>,
    /// Run only the round with this seed.
    pub round_seed: Option<u64>,
    /// Kinds of rounds to draw from.
    pub kinds: Vec<RoundKind>,
    /// Coalescing policies to draw from.
    pub coalesce: Vec<CoalesceKind>,
    /// A round's deadline.
    pub round_timeout: Duration,
    /// Device memory that may stay missing after a round (bytes).
    pub device_leak_tolerance: u64,
    /// Results file.
    pub json: Option<PathBuf>,
    /// Run the rounds in this process (a crash then ends the run).
    pub in_process: bool,
    /// A line per round.
    pub verbose: bool,
    /// Test hooks (first round only).
    pub hooks: Hooks,
    /// Worker: the first round to run.
    pub first_round: u64,
    /// Worker: start no round after this long.
    pub stop_after: Option<Duration>,
}

impl StressConfig {
    /// What plans depend on besides their seed.
    pub fn settings(&self) -> PlanSettings {
        PlanSettings {
            backend: self.backend,
            threads: self.threads,
            kinds: self.kinds.clone(),
            units: self.units,
            wait: self.wait,
            coalesce: self.coalesce.clone(),
            queue_chain: self.queue_chain,
        }
    }

    fn backend_arg(&self) -> String {
        self.backend.map_or("auto".into(), |b| b.to_string())
    }

    /// The command that replays round `seed`.
    pub fn replay_command(&self, seed: &str) -> String {
        let mut s = format!(
            "multiq stress --backend {} --threads {} --kinds {} --round-seed {seed}",
            self.backend_arg(),
            self.threads,
            kinds_arg(&self.kinds)
        );
        if let Some(u) = self.units {
            s.push_str(&format!(" --units {u}"));
        }
        if let Some(w) = self.wait {
            s.push_str(&format!(" --wait {w}"));
        }
        if let Some(c) = self.queue_chain {
            s.push_str(&format!(" --queue-chain {}", super::on_off(c)));
        }
        if self.coalesce.len() < CoalesceKind::ALL.len() {
            s.push_str(&format!(" --coalesce {}", coalesce_arg(&self.coalesce)));
        }
        s
    }
}

fn kinds_arg(kinds: &[RoundKind]) -> String {
    kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
}

/// `--coalesce` as given on a command line.
pub(crate) fn coalesce_arg(c: &[CoalesceKind]) -> String {
    c.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
}

/// One protocol message of a worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
enum Msg {
    Device {
        name: String,
        backend: String,
        driver: Option<String>,
    },
    Start {
        round: u64,
        seed: String,
    },
    Result {
        result: Box<RoundResult>,
    },
    Done {
        resources: ResourceFigures,
    },
}

fn emit_line(m: &Msg) {
    let line = serde_json::to_string(m).expect("protocol messages serialize");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{MARK}{line}");
    let _ = out.flush();
}

/// The worker process: runs rounds and reports each on stdout. Returns its exit status.
pub fn worker_main(cfg: &StressConfig) -> i32 {
    rounds_loop(cfg, &mut |m| emit_line(&m), true);
    0
}

/// Runs rounds `cfg.first_round..cfg.rounds` (or the one `--round-seed`), reporting through
/// `sink`. `protocol`: the watchdog reports a hang as a protocol line (worker process), or
/// as text (in-process runs).
fn rounds_loop(cfg: &StressConfig, sink: &mut dyn FnMut(Msg), protocol: bool) {
    install_panic_hook();
    let settings = cfg.settings();
    let started = Instant::now();
    let stop_at = cfg.stop_after.map(|d| started + d);
    let probe_plan = super::plan::DevicePlan {
        units: 1,
        wait: None,
        queue_chain: None,
    };
    let probe = Device::open(&device_options(cfg.backend, &probe_plan));
    let probe = match probe {
        Ok(d) => {
            let i = d.info();
            let name = match (i.backend, cfg.units) {
                (BackendKind::Cpu, Some(u)) => format!("CPU ({u} execution units)"),
                (BackendKind::Cpu, None) => {
                    "CPU (1, 2 or 4 execution units, drawn per round)".into()
                }
                _ => i.name.clone(),
            };
            sink(Msg::Device {
                name,
                backend: i.backend.to_string(),
                driver: i.driver.clone(),
            });
            // The CPU backend's free memory is the machine's: useless for a leak check (its
            // storage is counted exactly instead).
            (i.backend != BackendKind::Cpu).then_some(d)
        }
        Err(e) => {
            eprintln!("multiq: stress: cannot open the device: {e}");
            None
        }
    };
    let mut leak = LeakCheck::new(probe, cfg.device_leak_tolerance, RSS_TOLERANCE);
    let watchdog = Watchdog::start(move |w: &RoundWatch| {
        let mut r = RoundResult {
            round: w.round,
            seed: show_seed(w.seed),
            kind: w.kind.into(),
            plan: w.plan.clone(),
            ..RoundResult::default()
        };
        r.hangs.push(w.report());
        if protocol {
            emit_line(&Msg::Result {
                result: Box::new(r),
            });
        } else {
            eprintln!("multiq: stress: HANG: {}", w.report());
        }
    });
    let rounds: Box<dyn Iterator<Item = u64>> = match cfg.round_seed {
        Some(_) => Box::new(0..1),
        None => Box::new(cfg.first_round..cfg.rounds),
    };
    let master = cfg.seed.unwrap_or(0);
    for round in rounds {
        if stop_at.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        let seed = cfg
            .round_seed
            .unwrap_or_else(|| rng::round_seed(master, round));
        let mut plan = RoundPlan::draw(seed, &settings);
        let hooks = if round == 0 {
            cfg.hooks
        } else {
            Hooks::default()
        };
        if hooks != Hooks::default() {
            // A hooked round ends in order, so the failure it causes is always looked for.
            if let super::plan::Body::Mixed(p) = &mut plan.body {
                p.ending = super::plan::Ending::Orderly;
            }
        }
        sink(Msg::Start {
            round,
            seed: show_seed(seed),
        });
        let watch = RoundWatch::new(
            round,
            seed,
            plan.kind.name(),
            plan.describe(),
            cfg.round_timeout,
        );
        watchdog.watch(watch.clone());
        let before = leak.before();
        let tally = Tally::default();
        let t0 = Instant::now();
        let env = Env {
            backend: cfg.backend,
            watch: &watch,
            hooks: if round == 0 {
                cfg.hooks
            } else {
                Hooks::default()
            },
            tally: &tally,
            settings: &settings,
            child_timeout: CHILD_TIMEOUT,
        };
        contain(&tally, "the round", || run_round(&plan, &env));
        watch.controller().set(Phase::LeakCheck, 0);
        let leaks = leak.after(&before);
        watch.controller().finish();
        watchdog.clear();
        let mut r = RoundResult::from_tally(round, &plan, tally, t0.elapsed().as_secs_f64() * 1e3);
        r.leaks = leaks;
        sink(Msg::Result {
            result: Box::new(r),
        });
    }
    sink(Msg::Done {
        resources: leak.figures(),
    });
}

/// Totals of one kind of round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindTotals {
    /// Rounds run.
    pub rounds: u64,
    /// Kernel ops submitted.
    pub ops: u64,
    /// Rounds with any finding.
    pub failed: u64,
}

/// The run's totals. Each failure count is the number of rounds with at least one such
/// finding.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Rounds run.
    pub rounds: u64,
    /// Kernel ops submitted.
    pub ops: u64,
    /// Ops proved applied by a checked read-back.
    pub verified_ops: u64,
    /// Ops on buffers dropped unchecked by design.
    pub unverified_ops: u64,
    /// Wrong calls answered with their typed error.
    pub expected_errors: u64,
    /// Injected panics caught where they belong.
    pub expected_panics: u64,
    /// Streams refused as documented.
    pub refused: u64,
    /// Rounds with a crash.
    pub crashes: u64,
    /// Rounds that hung.
    pub hangs: u64,
    /// Rounds with a wrong answer.
    pub mismatches: u64,
    /// Rounds that leaked.
    pub leaks: u64,
    /// Rounds with an error in a thread that made no wrong call.
    pub errors: u64,
    /// Largest difference from the reference in a passing check.
    pub max_abs_error: f32,
    /// Seconds the run took.
    pub seconds: f64,
}

impl Summary {
    /// The summary line.
    pub fn line(&self) -> String {
        format!(
            "rounds={} ops={} crashes={} hangs={} mismatches={} leaks={} errors={} seconds={:.1}",
            self.rounds,
            self.ops,
            self.crashes,
            self.hangs,
            self.mismatches,
            self.leaks,
            self.errors,
            self.seconds
        )
    }

    /// True when nothing failed.
    pub fn clean(&self) -> bool {
        self.crashes + self.hangs + self.mismatches + self.leaks + self.errors == 0
    }

    fn add(&mut self, r: &RoundResult) {
        self.rounds += 1;
        self.ops += r.ops;
        self.verified_ops += r.verified_ops;
        self.unverified_ops += r.unverified_ops;
        self.expected_errors += r.expected_errors;
        self.expected_panics += r.expected_panics;
        self.refused += r.refused;
        self.crashes += u64::from(!r.crashes.is_empty());
        self.hangs += u64::from(!r.hangs.is_empty());
        self.mismatches += u64::from(!r.mismatches.is_empty());
        self.leaks += u64::from(!r.leaks.is_empty());
        self.errors += u64::from(!r.errors.is_empty());
        self.max_abs_error = self.max_abs_error.max(r.max_abs_error);
    }
}

/// The results file of `multiq stress --json`.
#[derive(Debug, Serialize)]
struct StressResults {
    multiq_version: &'static str,
    git_commit: &'static str,
    command: String,
    started_at: String,
    finished_at: String,
    backend: String,
    device: String,
    driver: Option<String>,
    host_threads: usize,
    seed: String,
    round_seed: Option<String>,
    threads: usize,
    kinds: Vec<&'static str>,
    coalesce: Vec<&'static str>,
    wait: Option<String>,
    units: Option<usize>,
    rounds_limit: u64,
    seconds_limit: Option<f64>,
    round_timeout_s: f64,
    #[serde(flatten)]
    summary: Summary,
    rounds_per_sec: f64,
    worker_processes: u64,
    by_kind: BTreeMap<String, KindTotals>,
    resources: Option<ResourceFigures>,
    collateral: Vec<String>,
    failures: Vec<RoundResult>,
    summary_line: String,
}

struct Aggregate<'c> {
    cfg: &'c StressConfig,
    summary: Summary,
    by_kind: BTreeMap<String, KindTotals>,
    failures: Vec<RoundResult>,
    collateral: Vec<String>,
    device: Option<(String, String, Option<String>)>,
    resources: Option<ResourceFigures>,
    started: Instant,
    last_progress: Instant,
}

impl<'c> Aggregate<'c> {
    fn new(cfg: &'c StressConfig) -> Self {
        Aggregate {
            cfg,
            summary: Summary::default(),
            by_kind: BTreeMap::new(),
            failures: Vec::new(),
            collateral: Vec::new(),
            device: None,
            resources: None,
            started: Instant::now(),
            last_progress: Instant::now(),
        }
    }

    /// A line on standard output (a failed write there is `main`'s to report, after the
    /// rounds and their results file: see [`crate::stdout`]).
    fn say(&mut self, line: std::fmt::Arguments<'_>) {
        let _ = crate::outln!("{line}");
    }

    fn take(&mut self, m: Msg) {
        match m {
            Msg::Device {
                name,
                backend,
                driver,
            } => {
                if self.device.is_none() {
                    self.say(format_args!("device: {name} ({backend} backend)"));
                }
                self.device = Some((name, backend, driver));
            }
            Msg::Start { .. } => {}
            Msg::Result { result } => self.add(*result),
            Msg::Done { resources } => self.resources = Some(resources),
        }
    }

    fn add(&mut self, r: RoundResult) {
        self.summary.add(&r);
        let k = self.by_kind.entry(r.kind.clone()).or_default();
        k.rounds += 1;
        k.ops += r.ops;
        k.failed += u64::from(r.failed());
        for c in &r.collateral {
            if self.collateral.len() < KEEP_FAILURES {
                self.collateral.push(format!("round {}: {c}", r.round));
            }
        }
        if self.cfg.verbose {
            self.say(format_args!(
                "round {} {} {:.0} ms {} ops: {}{}",
                r.round,
                r.seed,
                r.millis,
                r.ops,
                r.plan,
                if r.failed() { "  FAILED" } else { "" }
            ));
        }
        if r.failed() {
            let first = r
                .crashes
                .iter()
                .map(|s| format!("crash: {s}"))
                .chain(r.hangs.iter().map(|s| format!("hang: {s}")))
                .chain(r.mismatches.iter().map(|s| format!("mismatch: {s}")))
                .chain(r.errors.iter().map(|s| format!("error: {s}")))
                .chain(r.leaks.iter().map(|s| format!("leak: {s}")))
                .collect::<Vec<_>>();
            self.say(format_args!(
                "FAILED round {} (seed {}, {}): {}",
                r.round,
                r.seed,
                r.plan,
                first.join(" / ")
            ));
            let replay = self.cfg.replay_command(&r.seed);
            self.say(format_args!("  replay: {replay}"));
            if self.failures.len() < KEEP_FAILURES {
                self.failures.push(r);
            }
        }
        if self.last_progress.elapsed() >= Duration::from_secs(10) {
            self.last_progress = Instant::now();
            self.summary.seconds = self.started.elapsed().as_secs_f64();
            let line = self.summary.line();
            self.say(format_args!("progress: {line}"));
        }
    }
}

/// Runs the stress as the command line asked; returns the exit status (0 clean, 1 any
/// failure).
pub fn run(cfg: &StressConfig) -> Result<i32> {
    if let Some(path) = &cfg.json {
        results::check_writable(path)?;
    }
    // A backend that cannot be opened here is a usage error, said once, before any round.
    let probe_plan = super::plan::DevicePlan {
        units: cfg.units.unwrap_or(1),
        wait: cfg.wait,
        queue_chain: None,
    };
    drop(Device::open(&device_options(cfg.backend, &probe_plan))?);
    let started_at = results::now_rfc3339();
    let master = cfg.seed.unwrap_or_else(rng::fresh_seed);
    let cfg = StressConfig {
        seed: Some(master),
        ..cfg.clone()
    };
    let cfg = &cfg;
    match cfg.round_seed {
        Some(s) => crate::outln!(
            "multiq stress: replaying round {} (backend {}, {} threads, kinds {})",
            show_seed(s),
            cfg.backend_arg(),
            cfg.threads,
            kinds_arg(&cfg.kinds)
        )?,
        None => crate::outln!(
            "multiq stress: up to {} rounds{}, seed {}, backend {}, {} threads, kinds {}, \
             coalescing {}, round deadline {:.0} s{}",
            cfg.rounds,
            cfg.seconds
                .map_or(String::new(), |s| format!(" or {s:.0} s")),
            show_seed(master),
            cfg.backend_arg(),
            cfg.threads,
            kinds_arg(&cfg.kinds),
            coalesce_arg(&cfg.coalesce),
            cfg.round_timeout.as_secs_f64(),
            if cfg.in_process {
                ", in this process"
            } else {
                ""
            },
        )?,
    }
    let mut agg = Aggregate::new(cfg);
    let workers = if cfg.in_process {
        let inner = StressConfig {
            stop_after: cfg.seconds.map(Duration::from_secs_f64),
            ..cfg.clone()
        };
        rounds_loop(&inner, &mut |m| agg.take(m), false);
        0
    } else {
        supervise(cfg, &mut agg)?
    };
    agg.summary.seconds = agg.started.elapsed().as_secs_f64();
    let line = agg.summary.line();
    agg.say(format_args!("{line}"));
    if let Some(path) = &cfg.json {
        let (device, backend, driver) = agg
            .device
            .clone()
            .unwrap_or_else(|| ("unknown".into(), cfg.backend_arg(), None));
        let s = &agg.summary;
        let file = StressResults {
            multiq_version: env!("CARGO_PKG_VERSION"),
            git_commit: GIT_COMMIT,
            command: results::command_line(),
            started_at,
            finished_at: results::now_rfc3339(),
            backend,
            device,
            driver,
            host_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            seed: show_seed(master),
            round_seed: cfg.round_seed.map(show_seed),
            threads: cfg.threads,
            kinds: cfg.kinds.iter().map(|k| k.name()).collect(),
            coalesce: cfg.coalesce.iter().map(|k| k.name()).collect(),
            wait: cfg.wait.map(|w| w.to_string()),
            units: cfg.units,
            rounds_limit: cfg.rounds,
            seconds_limit: cfg.seconds,
            round_timeout_s: cfg.round_timeout.as_secs_f64(),
            summary: s.clone(),
            rounds_per_sec: s.rounds as f64 / s.seconds.max(1e-9),
            worker_processes: workers,
            by_kind: agg.by_kind.clone(),
            resources: agg.resources,
            collateral: agg.collateral.clone(),
            failures: std::mem::take(&mut agg.failures),
            summary_line: line.clone(),
        };
        results::write_json(path, &file)?;
        let _ = results::say_written(path, format_args!("results written to {}", path.display()));
    }
    if agg.summary.rounds == 0 {
        eprintln!("multiq: stress: no round ran");
        return Ok(1);
    }
    Ok(if agg.summary.clean() { 0 } else { 1 })
}

enum Line {
    Msg(Msg),
    Eof,
}

/// Runs worker processes until every round ran (or the time is up). Returns how many were
/// started.
fn supervise(cfg: &StressConfig, agg: &mut Aggregate<'_>) -> Result<u64> {
    let exe = std::env::current_exe().map_err(|e| Error::Io {
        path: "the multiq executable".into(),
        source: e,
    })?;
    let started = Instant::now();
    let limit = cfg.seconds.map(Duration::from_secs_f64);
    let total = if cfg.round_seed.is_some() {
        1
    } else {
        cfg.rounds
    };
    let mut next = 0u64;
    let mut workers = 0u64;
    let mut silent_deaths = 0u32;
    while next < total && limit.map_or(true, |l| started.elapsed() < l) {
        let mut args = worker_args(cfg, next);
        if let Some(l) = limit {
            let left = l.saturating_sub(started.elapsed());
            args.extend(["--stop-after-ms".into(), left.as_millis().to_string()]);
        }
        let mut child = Command::new(&exe)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Io {
                path: exe.display().to_string(),
                source: e,
            })?;
        workers += 1;
        let (tx, rx) = mpsc::channel::<Line>();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match line.strip_prefix(MARK) {
                    Some(json) => match serde_json::from_str::<Msg>(json) {
                        Ok(m) => {
                            let _ = tx.send(Line::Msg(m));
                        }
                        Err(e) => eprintln!("multiq: stress: bad worker line ({e}): {json}"),
                    },
                    // A worker's own lines, passed on (a failed write shows in the
                    // aggregate's next line).
                    None => drop(crate::outln!("{line}")),
                }
            }
            let _ = tx.send(Line::Eof);
        });
        let tail = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
        let tail2 = tail.clone();
        let err_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                let mut t = tail2.lock();
                if t.len() >= 8 {
                    t.remove(0);
                }
                t.push(line);
            }
        });
        let mut current: Option<(u64, String)> = None;
        let mut done = false;
        let mut reported = false;
        let mut silent = false;
        loop {
            match rx.recv_timeout(cfg.round_timeout + Duration::from_secs(60)) {
                Ok(Line::Msg(m)) => {
                    match &m {
                        Msg::Start { round, seed } => {
                            current = Some((*round, seed.clone()));
                            reported = true;
                        }
                        Msg::Result { result } => {
                            next = result.round + 1;
                            current = None;
                        }
                        Msg::Done { .. } => done = true,
                        Msg::Device { .. } => {}
                    }
                    agg.take(m);
                }
                Ok(Line::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    silent = true;
                    let _ = child.kill();
                    break;
                }
            }
        }
        let status = child.wait().map_err(|e| Error::Io {
            path: exe.display().to_string(),
            source: e,
        })?;
        let _ = out_reader.join();
        let _ = err_reader.join();
        if done {
            break;
        }
        let tail = tail.lock().join(" | ");
        let why = if silent {
            format!(
                "the worker process stopped answering for {:.0} s and was killed",
                (cfg.round_timeout + Duration::from_secs(60)).as_secs_f64()
            )
        } else {
            format!("the worker process {}", super::exit_status(&status))
        };
        match current {
            Some((round, seed)) => {
                let plan = RoundPlan::draw(rng::parse_seed(&seed).unwrap_or(0), &cfg.settings());
                let mut r = RoundResult {
                    round,
                    seed,
                    kind: plan.kind.name().into(),
                    plan: plan.describe(),
                    ..RoundResult::default()
                };
                let msg = format!("{why}; its last stderr lines: {tail}");
                if silent || status.code() == Some(EXIT_HANG) {
                    r.hangs.push(msg);
                } else {
                    r.crashes.push(msg);
                }
                agg.add(r);
                next = round + 1;
                silent_deaths = 0;
            }
            None if status.code() == Some(EXIT_HANG) => {
                // The watchdog reported the hung round before exiting.
                silent_deaths = 0;
            }
            None => {
                silent_deaths += 1;
                if !reported && silent_deaths >= 2 {
                    eprintln!(
                        "multiq: stress: the worker process cannot start a round ({why}); \
                         last stderr lines: {tail}"
                    );
                    return Ok(workers);
                }
            }
        }
    }
    Ok(workers)
}

fn worker_args(cfg: &StressConfig, first: u64) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "stress".into(),
        "--worker".into(),
        "--first-round".into(),
        first.to_string(),
        "--rounds".into(),
        cfg.rounds.to_string(),
        "--seed".into(),
        show_seed(cfg.seed.unwrap_or(0)),
        "--threads".into(),
        cfg.threads.to_string(),
        "--kinds".into(),
        kinds_arg(&cfg.kinds),
        "--coalesce".into(),
        coalesce_arg(&cfg.coalesce),
        "--backend".into(),
        cfg.backend_arg(),
        "--round-timeout".into(),
        cfg.round_timeout.as_secs().to_string(),
        "--device-leak-mib".into(),
        (cfg.device_leak_tolerance >> 20).to_string(),
    ];
    if let Some(s) = cfg.round_seed {
        a.extend(["--round-seed".into(), show_seed(s)]);
    }
    if let Some(u) = cfg.units {
        a.extend(["--units".into(), u.to_string()]);
    }
    if let Some(w) = cfg.wait {
        a.extend(["--wait".into(), w.to_string()]);
    }
    if let Some(c) = cfg.queue_chain {
        a.extend(["--queue-chain".into(), super::on_off(c).into()]);
    }
    let h = cfg.hooks;
    let hooks: Vec<&str> = [
        (h.hang, "hang"),
        (h.mismatch, "mismatch"),
        (h.leak, "leak"),
        (h.crash, "crash"),
        (h.panic, "panic"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|&(_, n)| n)
    .collect();
    if !hooks.is_empty() {
        a.extend(["--inject".into(), hooks.join(",")]);
    }
    a
}
