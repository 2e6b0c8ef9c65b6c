//! `multiq stress`: the stress and crash-rate harness.
//!
//! Rounds of: open a device and a pool; threads run a random mix of ops on private and
//! shared streams and buffers, with random window depth, lock mode and coalescing; at a
//! random moment the round ends in one of several ways (orderly; shutdown with ops in
//! flight; everything dropped in flight; the device dropped by another thread; a thread
//! panicking mid-op; an injected fault); then everything is checked:
//!
//! - **mismatches**: every op submitted is covered by a later read-back compared with the
//!   serial reference (`model`); wrong calls must get the documented typed error;
//! - **errors**: an error in a thread that made no wrong call (errors must reach only the
//!   thread that caused them);
//! - **crashes**: a panic nobody injected, or a process that died (rounds run in a worker
//!   process watched by a supervisor, so a crash is counted and the run goes on; exit
//!   rounds run a child process on purpose);
//! - **hangs**: a round past its deadline (the watchdog names the stuck threads);
//! - **leaks**: live objects, threads, device and process memory back to where they were
//!   (`leak`).
//!
//! Each round is planned from its own seed (`plan`), printed with every failure, and
//! replayed with `--round-seed`.

pub mod churn;
pub mod exit;
mod fault;
pub mod leak;
pub mod mixed;
pub mod model;
pub mod plan;
pub mod rng;
pub mod supervise;
pub mod watch;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::backend::{BackendKind, DeviceOptions};
use crate::error::Result;
use crate::{Device, StreamPool};
use plan::{Body, DevicePlan, PlanSettings, PoolPlan, RoundPlan};
use watch::RoundWatch;

pub use supervise::{run, StressConfig, Summary};

/// The payload of a panic the harness injects on purpose. The panic hook stays quiet about
/// these; any other panic is a crash.
#[derive(Debug)]
pub struct InjectedPanic(pub String);

/// Installs (once) a panic hook that says nothing about [`InjectedPanic`]s and hands every
/// other panic to the hook that was there before.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<InjectedPanic>().is_none() {
                previous(info);
            }
        }));
    });
}

/// A panic payload in words.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(p) = payload.downcast_ref::<InjectedPanic>() {
        return format!("injected: {}", p.0);
    }
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-text payload".into())
}

/// Test hooks: make the harness see a failure of each kind, to show that it is detected.
/// Each applies to the first round of a run only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hooks {
    /// A worker thread blocks forever (a hang).
    pub hang: bool,
    /// A buffer is overwritten behind the model's back (a mismatch).
    pub mismatch: bool,
    /// A buffer is leaked (`mem::forget`).
    pub leak: bool,
    /// The worker process aborts mid-round (a crash).
    pub crash: bool,
    /// A worker panics unplanned (a crash inside the process).
    pub panic: bool,
}

/// Counts and findings of one round, filled by its threads.
#[derive(Default)]
pub struct Tally {
    ops: AtomicU64,
    verified_ops: AtomicU64,
    unverified_ops: AtomicU64,
    expected_errors: AtomicU64,
    expected_panics: AtomicU64,
    refused: AtomicU64,
    max_abs_error: AtomicU32,
    errors: Mutex<Vec<String>>,
    mismatches: Mutex<Vec<String>>,
    crashes: Mutex<Vec<String>>,
    hangs: Mutex<Vec<String>>,
    collateral: Mutex<Vec<String>>,
}

/// Findings kept per round, at most (the counts stay exact).
const KEEP: usize = 20;

fn push_capped(list: &Mutex<Vec<String>>, s: String) {
    let mut l = list.lock();
    if l.len() < KEEP {
        l.push(s);
    } else if l.len() == KEEP {
        l.push("(further findings of this round not kept)".into());
    }
}

impl Tally {
    /// `n` kernel ops submitted.
    pub fn ops(&self, n: u64) {
        self.ops.fetch_add(n, Ordering::Relaxed);
    }
    /// `n` ops proved applied by a check, with the check's largest error.
    pub fn verified(&self, n: u64, max_abs_error: f32) {
        self.verified_ops.fetch_add(n, Ordering::Relaxed);
        self.max_abs_error
            .fetch_max(max_abs_error.to_bits(), Ordering::Relaxed);
    }
    /// `n` ops whose buffers were dropped unchecked (by design of the ending).
    pub fn unverified(&self, n: u64) {
        self.unverified_ops.fetch_add(n, Ordering::Relaxed);
    }
    /// A wrong call got its typed error.
    pub fn expected_error(&self) {
        self.expected_errors.fetch_add(1, Ordering::Relaxed);
    }
    /// An injected panic was caught where it belongs.
    pub fn expected_panic(&self) {
        self.expected_panics.fetch_add(1, Ordering::Relaxed);
    }
    /// A stream was refused as documented (lock `none`, every stream owned).
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
    /// An error nobody caused on purpose.
    pub fn error(&self, s: String) {
        push_capped(&self.errors, s);
    }
    /// A wrong answer.
    pub fn mismatch(&self, s: String) {
        push_capped(&self.mismatches, s);
    }
    /// An unplanned panic or a dead process.
    pub fn crash(&self, s: String) {
        push_capped(&self.crashes, s);
    }
    /// A hang.
    pub fn hang(&self, s: String) {
        push_capped(&self.hangs, s);
    }
    /// Another thread's out-of-memory while one thread exhausted device memory on purpose
    /// (not a failure: memory is shared; listed for the record).
    pub fn collateral(&self, s: String) {
        push_capped(&self.collateral, s);
    }
    /// Expected errors so far.
    pub fn expected_errors(&self) -> u64 {
        self.expected_errors.load(Ordering::Relaxed)
    }
    /// Expected panics so far.
    pub fn expected_panics(&self) -> u64 {
        self.expected_panics.load(Ordering::Relaxed)
    }
    /// Refusals so far.
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    /// Ops so far.
    pub fn ops_so_far(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }
}

/// What one round did and found (one JSON line from a worker process; kept in the results
/// when it failed).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundResult {
    /// Round number (0-based).
    pub round: u64,
    /// Its seed (`0x…`): `--round-seed` replays it.
    pub seed: String,
    /// Its kind.
    pub kind: String,
    /// What it did, in one line.
    pub plan: String,
    /// Kernel ops submitted.
    pub ops: u64,
    /// Ops proved applied by a read-back checked against the serial reference.
    pub verified_ops: u64,
    /// Ops on buffers dropped unchecked by design (drop-everything, a panicking thread's own
    /// buffers, a child process).
    pub unverified_ops: u64,
    /// Wrong calls that got their typed error.
    pub expected_errors: u64,
    /// Injected panics caught where they belong.
    pub expected_panics: u64,
    /// Streams refused as documented (lock `none` with every stream owned).
    pub refused: u64,
    /// Largest difference from the reference in a passing check.
    pub max_abs_error: f32,
    /// Wall time of the round (milliseconds), leak check included.
    pub millis: f64,
    /// Unplanned panics and dead processes.
    pub crashes: Vec<String>,
    /// Deadlines missed, with the stuck threads.
    pub hangs: Vec<String>,
    /// Wrong answers: results, and wrong calls accepted or answered with the wrong error.
    pub mismatches: Vec<String>,
    /// Resources that did not come back.
    pub leaks: Vec<String>,
    /// Errors in threads that made no wrong call.
    pub errors: Vec<String>,
    /// Other threads' out-of-memory during an exhaustion fault (not a failure).
    #[serde(default)]
    pub collateral: Vec<String>,
}

impl RoundResult {
    /// True when the round found anything wrong.
    pub fn failed(&self) -> bool {
        !(self.crashes.is_empty()
            && self.hangs.is_empty()
            && self.mismatches.is_empty()
            && self.leaks.is_empty()
            && self.errors.is_empty())
    }

    /// The round's result from its tally.
    pub fn from_tally(round: u64, plan: &RoundPlan, tally: Tally, millis: f64) -> RoundResult {
        RoundResult {
            round,
            seed: rng::show_seed(plan.seed),
            kind: plan.kind.name().into(),
            plan: plan.describe(),
            ops: tally.ops.into_inner(),
            verified_ops: tally.verified_ops.into_inner(),
            unverified_ops: tally.unverified_ops.into_inner(),
            expected_errors: tally.expected_errors.into_inner(),
            expected_panics: tally.expected_panics.into_inner(),
            refused: tally.refused.into_inner(),
            max_abs_error: f32::from_bits(tally.max_abs_error.into_inner()),
            millis,
            crashes: tally.crashes.into_inner(),
            hangs: tally.hangs.into_inner(),
            mismatches: tally.mismatches.into_inner(),
            leaks: Vec::new(),
            errors: tally.errors.into_inner(),
            collateral: tally.collateral.into_inner(),
        }
    }
}

/// What a round needs besides its plan.
pub struct Env<'a> {
    /// The backend asked for.
    pub backend: Option<BackendKind>,
    /// The round's watch (deadline, per-thread progress).
    pub watch: &'a Arc<RoundWatch>,
    /// Test hooks in force for this round.
    pub hooks: Hooks,
    /// Findings.
    pub tally: &'a Tally,
    /// Plan settings (an exit round's child redraws its plan from them).
    pub settings: &'a PlanSettings,
    /// The deadline of a child process.
    pub child_timeout: Duration,
}

impl Env<'_> {
    /// Opens the round's device.
    pub fn open(&self, d: &DevicePlan) -> Result<Device> {
        Device::open(&device_options(self.backend, d))
    }

    /// Opens the round's device and pool, with the device's tolerance for the queues kernel;
    /// a failure is tallied as an error of the round and gives `None`.
    pub fn open_round(&self, d: &DevicePlan, p: &PoolPlan) -> Option<(Device, StreamPool, f32)> {
        let device = match self.open(d) {
            Ok(d) => d,
            Err(e) => {
                self.tally.error(format!("opening the device: {e}"));
                return None;
            }
        };
        let tolerance = device
            .backend()
            .tolerance(crate::kernel::Kernel::SimpleCompute { iters: 1 });
        match StreamPool::new(&device, p.config()) {
            Ok(pool) => Some((device, pool, tolerance)),
            Err(e) => {
                self.tally.error(format!("making the pool: {e}"));
                None
            }
        }
    }
}

/// `on` or `off`, as the command line takes a switch (`--queue-chain`).
pub fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Device options for a round's device plan.
pub fn device_options(backend: Option<BackendKind>, d: &DevicePlan) -> DeviceOptions {
    DeviceOptions {
        backend,
        cpu_units: Some(d.units),
        ordinal: 0,
        wait: d.wait,
        queue_chain: d.queue_chain,
    }
}

/// Runs one round in this process (without the leak check, which the caller makes once the
/// round's last handle is gone).
pub fn run_round(plan: &RoundPlan, env: &Env<'_>) {
    match &plan.body {
        Body::Mixed(p) => mixed::run(p, env),
        Body::Churn(p) => churn::run(p, env),
        Body::Exit(p) => exit::run_parent(plan.seed, p, env),
    }
    // None lost: every op submitted was proved applied by a check, or belongs to a buffer
    // the round dropped unchecked by design. (After another finding the count means little.)
    let t = env.tally;
    let (ops, verified, unverified) = (
        t.ops.load(Ordering::Relaxed),
        t.verified_ops.load(Ordering::Relaxed),
        t.unverified_ops.load(Ordering::Relaxed),
    );
    let clean = t.errors.lock().is_empty()
        && t.mismatches.lock().is_empty()
        && t.crashes.lock().is_empty()
        && t.hangs.lock().is_empty();
    if clean && verified + unverified != ops {
        t.mismatch(format!(
            "{ops} ops submitted, but {verified} were checked and {unverified} dropped \
             unchecked by design"
        ));
    }
}

/// Runs `f`, catching a panic that escapes it as a crash of the round.
pub(crate) fn contain(tally: &Tally, what: &str, f: impl FnOnce()) {
    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        tally.crash(format!("{what} panicked: {}", panic_message(&*payload)));
    }
}

/// Polls `cond` (yielding) until it holds or `timeout` passes; true if it held.
pub(crate) fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let mut polls = 0u32;
    while !cond() {
        if start.elapsed() >= timeout {
            return false;
        }
        polls += 1;
        if polls < 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    true
}

/// How a process ended, in words (the signal's name where it was killed by one).
pub(crate) fn exit_status(s: &std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = s.signal() {
            let name = match sig {
                libc::SIGSEGV => "SIGSEGV",
                libc::SIGABRT => "SIGABRT",
                libc::SIGBUS => "SIGBUS",
                libc::SIGILL => "SIGILL",
                libc::SIGFPE => "SIGFPE",
                libc::SIGKILL => "SIGKILL",
                _ => "signal",
            };
            return format!("was killed by {name} ({sig})");
        }
    }
    match s.code() {
        Some(c) => format!("exited with status {c}"),
        None => "ended abnormally".into(),
    }
}
