//! Leak checks after a round: the runtime's live objects, the process's threads and memory,
//! and the device's memory, back where they were.
//!
//! - Live runtime objects ([`crate::runtime::live_counts`]: devices, pools, streams, buffers,
//!   CPU storage and its bytes) must return exactly to their count before the round. On the
//!   CPU backend the storage bytes are the device memory, counted exactly.
//! - OS threads (`/proc/self/status`) must return to their count before the round (the CPU
//!   backend's execution units exit shortly after their device closes).
//! - Device memory (CUDA: free memory from a probe device opened once) must come back to
//!   within a tolerance of the baseline.
//! - Resident memory (`/proc/self/statm`) must stay within a tolerance of its level after
//!   the first rounds (the allocator keeps freed memory for reuse, so this is a coarse check
//!   for leaks outside the counted objects).
//!
//! Everything is polled for a few seconds before it counts as a leak: objects are freed by
//! other threads shortly after the round's last handle is dropped.

use std::time::{Duration, Instant};

use crate::runtime::{live_counts, LiveCounts};
use crate::Device;

/// How long resources may take to return after a round.
const SETTLE: Duration = Duration::from_secs(10);

/// Rounds whose resident memory sets the baseline.
const RSS_WARMUP_ROUNDS: u32 = 5;

/// Threads of this process, where the OS tells.
pub fn os_threads() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Threads:"))?;
    line["Threads:".len()..].trim().parse().ok()
}

/// Resident memory of this process in bytes, where the OS tells.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096))
}

/// Resources before a round.
#[derive(Clone, Copy, Debug)]
pub struct Before {
    live: LiveCounts,
    threads: Option<u64>,
}

/// The leak checker of a worker process.
pub struct LeakCheck {
    probe: Option<Device>,
    device_baseline: Option<u64>,
    device_tolerance: u64,
    rss_baseline: Option<u64>,
    rss_rounds: u32,
    rss_tolerance: u64,
}

/// Resource figures for results.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ResourceFigures {
    /// Resident memory after the warm-up rounds (bytes).
    pub rss_baseline_bytes: Option<u64>,
    /// Resident memory now (bytes).
    pub rss_bytes: Option<u64>,
    /// Device free memory at the start (bytes; CUDA).
    pub device_free_baseline_bytes: Option<u64>,
    /// Device free memory now (bytes; CUDA).
    pub device_free_bytes: Option<u64>,
}

impl LeakCheck {
    /// A checker. `probe`: a device held for the whole run to read free device memory
    /// (where the backend reports it for the device alone, i.e. not the CPU backend, whose
    /// "free memory" is the whole machine's).
    pub fn new(probe: Option<Device>, device_tolerance: u64, rss_tolerance: u64) -> Self {
        let device_baseline = probe.as_ref().and_then(|p| {
            let _ = p.synchronize();
            p.memory_available()
        });
        LeakCheck {
            probe,
            device_baseline,
            device_tolerance,
            rss_baseline: None,
            rss_rounds: 0,
            rss_tolerance,
        }
    }

    /// Resources now, before a round.
    pub fn before(&self) -> Before {
        Before {
            live: live_counts(),
            threads: os_threads(),
        }
    }

    /// Figures for results.
    pub fn figures(&self) -> ResourceFigures {
        ResourceFigures {
            rss_baseline_bytes: self.rss_baseline,
            rss_bytes: rss_bytes(),
            device_free_baseline_bytes: self.device_baseline,
            device_free_bytes: self.probe.as_ref().and_then(|p| p.memory_available()),
        }
    }

    /// After a round: what did not come back, one line per kind of leak.
    pub fn after(&mut self, before: &Before) -> Vec<String> {
        let mut leaks = Vec::new();
        let start = Instant::now();
        loop {
            let live = live_counts();
            let threads = os_threads();
            let live_ok = live == before.live;
            let threads_ok = match (before.threads, threads) {
                (Some(b), Some(n)) => n <= b,
                _ => true,
            };
            if live_ok && threads_ok {
                break;
            }
            if start.elapsed() >= SETTLE {
                if !live_ok {
                    leaks.push(format!(
                        "live objects did not return: before {}, after {}",
                        before.live, live
                    ));
                }
                if !threads_ok {
                    leaks.push(format!(
                        "threads did not return: {} before, {} after {:.0} s",
                        before.threads.unwrap_or(0),
                        threads.unwrap_or(0),
                        SETTLE.as_secs_f64()
                    ));
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let (Some(probe), Some(base)) = (&self.probe, self.device_baseline) {
            let floor = base.saturating_sub(self.device_tolerance);
            let start = Instant::now();
            loop {
                // Synchronizing lets a stream-ordered allocator return freed memory.
                let _ = probe.synchronize();
                let free = probe.memory_available().unwrap_or(base);
                if free >= floor {
                    break;
                }
                if start.elapsed() >= SETTLE {
                    leaks.push(format!(
                        "device memory did not return: {} MiB free before, {} MiB after \
                         (tolerance {} MiB)",
                        base >> 20,
                        free >> 20,
                        self.device_tolerance >> 20
                    ));
                    // Report a steady leak again only when it grows by another tolerance.
                    self.device_baseline = Some(free);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if let Some(rss) = rss_bytes() {
            if self.rss_rounds < RSS_WARMUP_ROUNDS {
                self.rss_rounds += 1;
                self.rss_baseline = Some(self.rss_baseline.unwrap_or(0).max(rss));
            } else if let Some(base) = self.rss_baseline {
                if rss > base + self.rss_tolerance {
                    leaks.push(format!(
                        "resident memory grew from {} MiB to {} MiB (tolerance {} MiB)",
                        base >> 20,
                        rss >> 20,
                        self.rss_tolerance >> 20
                    ));
                    self.rss_baseline = Some(rss);
                }
            }
        }
        leaks
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn process_figures_are_read() {
        assert!(os_threads().unwrap() >= 1);
        assert!(rss_bytes().unwrap() > 0);
    }
}
