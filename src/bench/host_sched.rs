//! What the host's CPUs did during a run: the submitting threads' CPU time and context
//! switches, and the time the machine's hypervisor kept its CPUs from running (steal).
//!
//! A run with many threads that spin while they wait for the device depends on every thread
//! keeping its CPU: a thread descheduled between an op's completion and its next submission
//! delays that thread's work, however idle the device is. These counters put that beside the
//! ops/s, so a slow repeat can be told apart from a slow device.
//!
//! Promises: the counters are read only at a run's edges (no per-op cost); where the
//! operating system cannot give them (not Linux, `/proc` not mounted), they are `None`, never
//! made up.

use std::time::Duration;

use serde::Serialize;

/// The calling thread's resource use so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadUsage {
    /// User and system CPU time.
    pub cpu: Duration,
    /// Times the thread gave up its CPU (blocked or yielded).
    pub voluntary: u64,
    /// Times the scheduler took its CPU away (time slice over, a higher-priority task).
    pub involuntary: u64,
}

impl ThreadUsage {
    /// The calling thread's usage, or `None` where the system does not report it per thread.
    pub fn now() -> Option<ThreadUsage> {
        thread_usage()
    }

    /// What was used from `earlier` (of the same thread) to `self`.
    pub fn since(&self, earlier: &ThreadUsage) -> ThreadUsage {
        ThreadUsage {
            cpu: self.cpu.saturating_sub(earlier.cpu),
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            involuntary: self.involuntary.saturating_sub(earlier.involuntary),
        }
    }
}

#[cfg(target_os = "linux")]
fn thread_usage() -> Option<ThreadUsage> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable `rusage` for the call to fill; RUSAGE_THREAD asks
    // for the calling thread only (Linux 2.6.26 and later; an older kernel returns an error).
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the call succeeded, so it wrote the whole struct (and it was zeroed before).
    let usage = unsafe { usage.assume_init() };
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Some(ThreadUsage {
        cpu: time(usage.ru_utime) + time(usage.ru_stime),
        voluntary: u64::try_from(usage.ru_nvcsw).unwrap_or(0),
        involuntary: u64::try_from(usage.ru_nivcsw).unwrap_or(0),
    })
}

#[cfg(not(target_os = "linux"))]
fn thread_usage() -> Option<ThreadUsage> {
    None
}

/// The machine's CPU time stolen by the hypervisor so far, summed over its CPUs, in clock
/// ticks (`/proc/stat`, the `cpu` line's eighth field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StealTicks(pub u64);

impl StealTicks {
    /// The current count, or `None` where `/proc/stat` cannot be read or parsed.
    pub fn now() -> Option<StealTicks> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        parse_steal(&stat)
    }

    /// Time stolen from `earlier` to `self`, given `ticks_per_second`.
    pub fn since(&self, earlier: &StealTicks, ticks_per_second: u64) -> Duration {
        let ticks = self.0.saturating_sub(earlier.0);
        Duration::from_secs_f64(ticks as f64 / ticks_per_second.max(1) as f64)
    }
}

/// The steal field of `/proc/stat`'s summary line (`cpu  user nice system idle iowait irq
/// softirq steal …`); `None` if the line is missing or too short (kernels before 2.6.11).
fn parse_steal(stat: &str) -> Option<StealTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let steal = line.split_whitespace().nth(8)?;
    steal.parse().ok().map(StealTicks)
}

/// Clock ticks per second of `/proc/stat` (`USER_HZ`).
fn ticks_per_second() -> u64 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `sysconf` only reads a configuration value; no pointers are involved.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if hz > 0 {
            return hz as u64;
        }
    }
    100
}

/// The host's side of one run, as results record it (`"host"`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct HostSched {
    /// CPU time of the submitting threads over the timed part, milliseconds (`null` where
    /// the system does not report it).
    pub worker_cpu_ms: Option<f64>,
    /// That CPU time per op, microseconds.
    pub cpu_per_op_us: Option<f64>,
    /// Times the submitting threads gave up their CPU (summed).
    pub voluntary_switches: Option<u64>,
    /// Times the scheduler took a submitting thread's CPU away (summed).
    pub involuntary_switches: Option<u64>,
    /// CPU time the hypervisor took from the machine's CPUs during the run, milliseconds,
    /// summed over CPUs (at the kernel's tick, usually 10 ms; 0 on bare metal).
    pub steal_ms: Option<f64>,
}

/// Measures one run: [`RunSched::start`] before the start signal, [`RunSched::finish`] after
/// the last thread joined, with each thread's own [`ThreadUsage`] difference.
#[derive(Debug)]
pub struct RunSched {
    steal: Option<StealTicks>,
}

impl RunSched {
    /// Reads the machine's counters at the start of a run.
    pub fn start() -> RunSched {
        RunSched {
            steal: StealTicks::now(),
        }
    }

    /// The run's summary, from the threads' usage over the timed part (`None` for a thread
    /// whose usage could not be read: then no thread total is given) and `ops` timed ops.
    pub fn finish(self, threads: &[Option<ThreadUsage>], ops: u64) -> HostSched {
        let total = threads.iter().try_fold(ThreadUsage::default(), |sum, t| {
            let t = (*t)?;
            Some(ThreadUsage {
                cpu: sum.cpu + t.cpu,
                voluntary: sum.voluntary + t.voluntary,
                involuntary: sum.involuntary + t.involuntary,
            })
        });
        let total = total.filter(|_| !threads.is_empty());
        let steal = match (self.steal, StealTicks::now()) {
            (Some(before), Some(after)) => Some(after.since(&before, ticks_per_second())),
            _ => None,
        };
        // Microsecond resolution is all the counters have.
        let round = |x: f64| (x * 1e3).round() / 1e3;
        let ms = |d: Duration| round(d.as_secs_f64() * 1e3);
        HostSched {
            worker_cpu_ms: total.map(|t| ms(t.cpu)),
            cpu_per_op_us: total
                .filter(|_| ops > 0)
                .map(|t| round(t.cpu.as_secs_f64() * 1e6 / ops as f64)),
            voluntary_switches: total.map(|t| t.voluntary),
            involuntary_switches: total.map(|t| t.involuntary),
            steal_ms: steal.map(ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steal_field_is_the_eighth_number_of_the_summary_line() {
        let stat = "cpu  10 20 30 40 50 60 70 1234 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 5\n";
        assert_eq!(parse_steal(stat), Some(StealTicks(1234)));
        // Per-CPU lines are not the summary; a kernel without the field gives nothing.
        assert_eq!(parse_steal("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(parse_steal("cpu  1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_steal("cpu  1 2 3 4 5 6 7 x\n"), None);
        let (a, b) = (StealTicks(100), StealTicks(150));
        assert_eq!(b.since(&a, 100), Duration::from_millis(500));
        // A counter that went backwards (it never should) reads as nothing stolen.
        assert_eq!(a.since(&b, 100), Duration::ZERO);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_that_burns_cpu_sees_it_and_a_sleeping_one_switches_voluntarily() {
        let before = ThreadUsage::now().expect("Linux reports per-thread usage");
        let start = std::time::Instant::now();
        // Busy until the thread's own counter shows 20 ms of CPU (however loaded the machine
        // is), or 10 s of wall time pass.
        let mut x = 0u64;
        let mut used = ThreadUsage::default();
        while used.cpu < Duration::from_millis(20) && start.elapsed() < Duration::from_secs(10) {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
            used = ThreadUsage::now().unwrap().since(&before);
        }
        assert!(used.cpu >= Duration::from_millis(20), "{used:?}");
        // A thread's CPU time never exceeds the wall time it had (plus the counter's tick).
        assert!(
            used.cpu <= start.elapsed() + Duration::from_millis(10),
            "{used:?}"
        );
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let slept = ThreadUsage::now().unwrap().since(&before);
        assert!(
            slept.voluntary >= used.voluntary + 3,
            "each sleep gives up the CPU: {slept:?}"
        );
        // Another thread's usage is its own.
        let other = std::thread::spawn(|| ThreadUsage::now().unwrap())
            .join()
            .unwrap();
        assert!(other.cpu < used.cpu, "{other:?} vs {used:?}");
    }

    #[test]
    fn a_run_sums_its_threads_and_gives_nothing_it_could_not_measure() {
        let t = |ms, v, i| {
            Some(ThreadUsage {
                cpu: Duration::from_millis(ms),
                voluntary: v,
                involuntary: i,
            })
        };
        let run = RunSched { steal: None };
        let s = run.finish(&[t(3, 1, 2), t(5, 10, 0)], 4000);
        assert_eq!(s.worker_cpu_ms, Some(8.0));
        assert_eq!(s.cpu_per_op_us, Some(2.0));
        assert_eq!(s.voluntary_switches, Some(11));
        assert_eq!(s.involuntary_switches, Some(2));
        assert_eq!(s.steal_ms, None, "no reading at the start");
        // One thread unreadable: no total rather than a partial one.
        let s = RunSched { steal: None }.finish(&[t(3, 1, 2), None], 10);
        assert_eq!(s.worker_cpu_ms, None);
        assert_eq!(s.involuntary_switches, None);
        let s = RunSched { steal: None }.finish(&[], 10);
        assert_eq!(s.worker_cpu_ms, None);
    }
}
