//! Where a batch leader's time goes: named phases, summed over every batch after the first
//! [`WARM_UP`] (which pay for compiling kernels and creating library handles) and printed on
//! stderr when the owner is dropped, if `MULTIQ_PHASES` is set (a diagnostic; without it a
//! lap is one branch and nothing is printed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Runs not counted, at the start.
const WARM_UP: u64 = 256;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("MULTIQ_PHASES").is_some())
}

/// Time per named phase, summed over runs.
pub(crate) struct Phases {
    label: &'static str,
    names: &'static [&'static str],
    nanos: Vec<AtomicU64>,
    runs: AtomicU64,
    started: AtomicU64,
}

/// One run being timed: [`Phases::lap`] closes the current phase.
pub(crate) struct Run(Option<Instant>);

impl Phases {
    pub(crate) fn new(label: &'static str, names: &'static [&'static str]) -> Self {
        Phases {
            label,
            names,
            nanos: names.iter().map(|_| AtomicU64::new(0)).collect(),
            runs: AtomicU64::new(0),
            started: AtomicU64::new(0),
        }
    }

    /// Starts timing a run (a no-op unless enabled).
    pub(crate) fn start(&self) -> Run {
        if enabled() && self.started.fetch_add(1, Ordering::Relaxed) >= WARM_UP {
            self.runs.fetch_add(1, Ordering::Relaxed);
            Run(Some(Instant::now()))
        } else {
            Run(None)
        }
    }

    /// Adds the time since the last lap (or the start) to phase `i`.
    pub(crate) fn lap(&self, run: &mut Run, i: usize) {
        if let Some(t) = run.0 {
            let now = Instant::now();
            let ns = u64::try_from((now - t).as_nanos()).unwrap_or(u64::MAX);
            if let Some(a) = self.nanos.get(i) {
                a.fetch_add(ns, Ordering::Relaxed);
            }
            run.0 = Some(now);
        }
    }
}

impl Drop for Phases {
    fn drop(&mut self) {
        let runs = *self.runs.get_mut();
        if runs == 0 {
            return;
        }
        let parts: Vec<String> = self
            .names
            .iter()
            .zip(&mut self.nanos)
            .map(|(n, a)| format!("{n} {:.1}", *a.get_mut() as f64 / 1e3 / runs as f64))
            .collect();
        eprintln!(
            "phases {} ({runs} runs, µs each): {}",
            self.label,
            parts.join(", ")
        );
    }
}
