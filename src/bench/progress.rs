//! Progress on stderr for long runs (indicatif): a bar with the time spent and the time left.
//!
//! Drawn only when stderr is a terminal and `--quiet` was not given; otherwise every call is a
//! no-op, so piped or logged output is exactly what it was without a bar. Text for stdout goes
//! through [`Progress::print`], which lifts the bar while it prints, so tables and the bar do
//! not tear each other on a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar, or nothing.
pub struct Progress {
    enabled: bool,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Progress for this process: drawn when stderr is a terminal and not `quiet`.
    pub fn new(quiet: bool) -> Self {
        Progress {
            enabled: !quiet && std::io::stderr().is_terminal(),
            bar: None,
        }
    }

    /// Progress that never draws.
    pub fn hidden() -> Self {
        Progress {
            enabled: false,
            bar: None,
        }
    }

    /// True when a bar will be drawn (and so an estimate is worth computing).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Starts the bar over `total` units of work (estimated milliseconds, or runs).
    pub fn start(&mut self, total: u64) {
        if !self.enabled {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total.max(1)), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:24} {percent:>3}%  about {eta} left  {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(250));
        self.bar = Some(bar);
    }

    /// What is running now.
    pub fn set_message(&self, msg: impl Into<String>) {
        if let Some(b) = &self.bar {
            b.set_message(msg.into());
        }
    }

    /// `n` more units done.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Prints `text` to stdout (as `print!`), lifting the bar while it does; a failed write
    /// is kept for `main` to report once the work is done (see [`crate::stdout`]).
    pub fn print(&self, text: &str) -> crate::Result<()> {
        let out = || crate::out!("{text}");
        match &self.bar {
            Some(b) => b.suspend(out),
            None => out(),
        }
    }

    /// A line on stderr, only when progress is shown (estimates, timings).
    pub fn note(&self, line: &str) {
        if !self.enabled {
            return;
        }
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `83 s`, `4 min 10 s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_progress_does_nothing_and_durations_read_well() {
        let mut p = Progress::hidden();
        assert!(!p.enabled());
        p.start(10);
        p.inc(3);
        p.set_message("x");
        p.note("not shown");
        p.finish();
        assert_eq!(human(Duration::from_millis(49_600)), "50 s");
        assert_eq!(human(Duration::from_secs(250)), "4 min 10 s");
        assert_eq!(human(Duration::from_secs(7_300)), "2 h 1 min");
    }
}
