//! Exit rounds: a child process (this binary, `multiq stress --child`) starts workers that
//! submit without pause, and once its trigger count of ops was submitted, ends in the way
//! its plan says ([`ExitMode`]) with that work in flight. The parent checks that it exited
//! with status 0, by itself, without a signal, a panic message, a worker error or a hang:
//! the crash at shutdown the investigated system showed in 20–55% of runs. A worker whose
//! call meets the driver already shut down by the exit (CUDA tears its driver down in the
//! process's exit handlers while other threads still run) gets
//! [`Error::DeviceShutDown`](crate::Error::DeviceShutDown), which is the expected answer
//! there and not a finding.

use std::cell::RefCell;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::plan::{Body, ExitMode, ExitPlan, PlanSettings, RoundPlan};
use super::watch::Phase;
use super::{device_options, rng, Env};
use crate::kernel::Kernel;
use crate::{Buffer, Device, Inflight, Stream, StreamPool, Ticket};

/// The line a child prints once its trigger was reached, just before it ends.
const READY: &str = "multiq-stress-child: submitted ";

/// Parent side: runs the child of round `seed` and judges how it ended.
pub fn run_parent(seed: u64, plan: &ExitPlan, env: &Env<'_>) {
    let tally = env.tally;
    let c = env.watch.controller();
    c.set(Phase::Child, 0);
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return tally.error(format!("finding this program to start a child: {e}")),
    };
    let mut cmd = Command::new(exe);
    cmd.args(child_args(seed, env.settings))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(ch) => ch,
        Err(e) => return tally.error(format!("starting the child process: {e}")),
    };
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            if let Some(r) = r {
                for line in BufReader::new(r).lines() {
                    match line {
                        Ok(l) => lines.push(l),
                        Err(_) => break,
                    }
                }
            }
            lines
        })
    };
    let out = pipe(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = pipe(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + env.child_timeout.min(env.watch.remaining());
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => {
                tally.error(format!("waiting for the child: {e}"));
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    let tail = || {
        let from = err.len().saturating_sub(6);
        if err.is_empty() {
            "(nothing on stderr)".to_string()
        } else {
            err[from..].join(" | ")
        }
    };
    let ops = out
        .iter()
        .find_map(|l| l.strip_prefix(READY))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    if let Some(n) = ops {
        tally.ops(n);
        tally.unverified(n);
    }
    let mode = plan.mode.name();
    match status {
        None => tally.hang(format!(
            "child ({mode}) did not end within {:.0} s; stderr: {}",
            env.child_timeout.as_secs_f64(),
            tail()
        )),
        Some(s) if s.success() => {
            if err.iter().any(|l| l.contains("panicked")) {
                tally.crash(format!(
                    "child ({mode}) exited 0 but a thread panicked: {}",
                    tail()
                ));
            } else if let Some(l) = err.iter().find(|l| l.starts_with("multiq: child")) {
                tally.error(format!("child ({mode}): {l}"));
            } else if ops.is_none() {
                tally.error(format!(
                    "child ({mode}) exited 0 without reaching its trigger; stderr: {}",
                    tail()
                ));
            }
        }
        Some(s) => tally.crash(format!(
            "child ({mode}) {}; stderr: {}",
            super::exit_status(&s),
            tail()
        )),
    }
}

/// The child's command line: the settings its plan is drawn from, and its seed.
fn child_args(seed: u64, s: &PlanSettings) -> Vec<String> {
    let mut a = vec![
        "stress".into(),
        "--child".into(),
        "--round-seed".into(),
        rng::show_seed(seed),
        "--threads".into(),
        s.threads.to_string(),
        "--kinds".into(),
        s.kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(","),
        "--coalesce".into(),
        super::supervise::coalesce_arg(&s.coalesce),
        "--backend".into(),
        match s.backend {
            None => "auto".into(),
            Some(b) => b.to_string(),
        },
    ];
    if let Some(u) = s.units {
        a.extend(["--units".into(), u.to_string()]);
    }
    if let Some(w) = s.wait {
        a.extend(["--wait".into(), w.to_string()]);
    }
    if let Some(c) = s.queue_chain {
        a.extend(["--queue-chain".into(), super::on_off(c).into()]);
    }
    a
}

static STATIC: OnceLock<(Device, StreamPool)> = OnceLock::new();

/// Work a thread-local destructor submits after multiq's own thread-locals of that thread
/// were destroyed (it is registered before them). Every call must return, an error being
/// fine; none may panic or crash.
struct LateWork {
    pool: StreamPool,
    buf: Buffer,
}

impl Drop for LateWork {
    fn drop(&mut self) {
        let k = Kernel::SimpleCompute { iters: 1 };
        let _ = self
            .pool
            .acquire(0)
            .and_then(|s| s.launch(k, &mut self.buf))
            .map(drop);
        let _ = self
            .pool
            .current()
            .and_then(|s| s.launch(k, &mut self.buf))
            .map(drop);
        let _ = self.pool.release_current();
        let _ = self.buf.read();
    }
}

/// Handles held in a thread-local, destroyed at thread (or process) exit with their work
/// in flight.
struct Held {
    _ticket: Option<Ticket>,
    _stream: Stream,
    _buf: Buffer,
    _pool: StreamPool,
    _device: Device,
}

thread_local! {
    static LATE: RefCell<Option<LateWork>> = const { RefCell::new(None) };
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Child side: runs the exit round of `seed` and returns the process's exit status (or
/// never returns, for the modes that exit).
pub fn child_main(seed: u64, settings: &PlanSettings) -> i32 {
    let plan = RoundPlan::draw(seed, settings);
    let Body::Exit(p) = plan.body else {
        eprintln!(
            "multiq: round {} is not an exit round",
            rng::show_seed(seed)
        );
        return 2;
    };
    // Registered first, so destroyed after multiq's thread-locals of this thread.
    LATE.with(|_| ());
    let opts = device_options(settings.backend, &p.device);
    let config = p.pool.config();
    let opened = Device::open(&opts).and_then(|d| StreamPool::new(&d, config).map(|p| (d, p)));
    let (device, pool) = match opened {
        Ok(x) => x,
        Err(e) => {
            eprintln!("multiq: child: {e}");
            return 4;
        }
    };
    let (device, pool) = if p.mode == ExitMode::Static {
        let (d, p) = STATIC.get_or_init(|| (device, pool));
        (d.clone(), p.clone())
    } else {
        (device, pool)
    };
    let submitted = Arc::new(AtomicU64::new(0));
    for w in 0..p.threads {
        let (pool, submitted) = (pool.clone(), submitted.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("child-w{w}"))
            .spawn(move || child_worker(w, &p, pool, &submitted));
        if let Err(e) = spawned {
            eprintln!("multiq: child: starting worker {w}: {e}");
            return 4;
        }
    }
    let start = Instant::now();
    while submitted.load(Ordering::Acquire) < p.trigger {
        if start.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "multiq: child: trigger of {} ops not reached in 60 s",
                p.trigger
            );
            return 4;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{READY}{} ops, ending by {}",
            submitted.load(Ordering::Acquire),
            p.mode.name()
        );
        let _ = out.flush();
    }
    match p.mode {
        ExitMode::Exit | ExitMode::Static => std::process::exit(0),
        ExitMode::Return => 0,
        ExitMode::DropThenExit => {
            drop(pool);
            drop(device);
            std::process::exit(0)
        }
        ExitMode::ThreadLocals => {
            // Main's own work in flight, held in its thread-locals, destroyed by the exit
            // that returning from main performs, while the workers submit.
            let held = (|| -> crate::Result<Held> {
                let stream = pool.current()?;
                let mut buf = device.buffer_from(&[0.5; 4096])?;
                let ticket = stream.launch(Kernel::SimpleCompute { iters: 50 }, &mut buf)?;
                Ok(Held {
                    _ticket: Some(ticket),
                    _stream: stream,
                    _buf: buf,
                    _pool: pool.clone(),
                    _device: device.clone(),
                })
            })();
            match held {
                Ok(h) => HELD.with(|c| *c.borrow_mut() = Some(h)),
                Err(e) => eprintln!("multiq: child: main's own work: {e}"),
            }
            if let Ok(buf) = device.buffer_from(&[0.5; 64]) {
                LATE.with(|c| *c.borrow_mut() = Some(LateWork { pool, buf }));
            }
            0
        }
    }
}

fn child_worker(w: usize, p: &ExitPlan, pool: StreamPool, submitted: &AtomicU64) {
    // Registered first, so destroyed after multiq's thread-locals of this thread.
    LATE.with(|_| ());
    let run = || -> crate::Result<()> {
        let stream = pool.current()?;
        let mut buf = pool.device().buffer_from(&[0.01; 1024])?;
        let k = Kernel::SimpleCompute { iters: 2 };
        let mut window = Inflight::new(p.depth)?;
        // With thread-locals, half the workers leave early holding work in flight: their
        // thread-locals are destroyed while the others submit and main ends the process.
        let leave_after = (p.mode == ExitMode::ThreadLocals && w % 2 == 0).then_some(20u64);
        let mut n = 0u64;
        loop {
            window.submit(|| stream.launch(k, &mut buf))?;
            submitted.fetch_add(1, Ordering::AcqRel);
            n += 1;
            if leave_after == Some(n) {
                let ticket = stream.launch(k, &mut buf)?;
                let late = pool.device().buffer_from(&[0.5; 64])?;
                HELD.with(|c| {
                    *c.borrow_mut() = Some(Held {
                        _ticket: Some(ticket),
                        _stream: stream.clone(),
                        _buf: buf,
                        _pool: pool.clone(),
                        _device: pool.device().clone(),
                    })
                });
                LATE.with(|c| {
                    *c.borrow_mut() = Some(LateWork {
                        pool: pool.clone(),
                        buf: late,
                    })
                });
                return Ok(());
            }
        }
    };
    match run() {
        // The process is exiting (that is this round's point) and its exit handlers shut
        // the driver down under this worker: the typed error is the right answer.
        Ok(()) | Err(crate::Error::DeviceShutDown { .. }) => {}
        Err(e) => eprintln!("multiq: child worker {w}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stress::plan::{CoalesceKind, RoundKind};

    #[test]
    fn the_child_is_given_every_setting_its_plan_depends_on() {
        let mut s = PlanSettings {
            backend: Some(crate::BackendKind::Cpu),
            threads: 5,
            kinds: vec![RoundKind::Exit],
            units: Some(2),
            wait: Some(crate::WaitPolicy::Yield),
            coalesce: vec![CoalesceKind::Persistent],
            queue_chain: Some(true),
        };
        let args = child_args(0x5eed, &s).join(" ");
        for part in [
            "--round-seed 0x0000000000005eed",
            "--threads 5",
            "--kinds exit",
            "--coalesce persistent",
            "--backend cpu",
            "--units 2",
            "--wait yield",
            "--queue-chain on",
        ] {
            assert!(args.contains(part), "{part}: {args}");
        }
        s.queue_chain = Some(false);
        assert!(child_args(1, &s).join(" ").contains("--queue-chain off"));
        s.queue_chain = None;
        assert!(!child_args(1, &s).join(" ").contains("--queue-chain"));
    }
}
