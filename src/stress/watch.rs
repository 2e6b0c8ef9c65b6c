//! The hang watchdog: every round has a deadline; every thread of a round reports what it is
//! doing (a phase and a step, two atomic stores); when the deadline passes, the watchdog
//! names the threads that have not finished and what each was doing, hands that report to
//! its owner (which records the hang) and ends the process with [`EXIT_HANG`]: a stuck
//! thread cannot be reclaimed, so the process must not wait for it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Exit status of a process whose watchdog fired.
pub const EXIT_HANG: i32 = 3;

/// What a thread is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Not started.
    Idle,
    /// Opening the device, making the pool.
    Open,
    /// Taking a stream, allocating and filling buffers.
    Setup,
    /// At the start barrier.
    Barrier,
    /// Submitting (may wait for the oldest op of its window).
    Launch,
    /// Waiting for an op.
    Wait,
    /// Polling an op.
    Poll,
    /// Reading a buffer back and checking it.
    Check,
    /// Writing a buffer.
    Write,
    /// Releasing and taking a stream.
    Switch,
    /// Synchronizing a stream, pool or device.
    Synchronize,
    /// Making an injected wrong call.
    Fault,
    /// Waiting for its window to drain.
    Drain,
    /// Dropping handles.
    Drop,
    /// Joining threads.
    Join,
    /// Checking for leaks.
    LeakCheck,
    /// Waiting for a child process.
    Child,
    /// Finished.
    Done,
    /// A test hook: stuck on purpose.
    InjectedHang,
}

impl Phase {
    const ALL: [Phase; 19] = [
        Phase::Idle,
        Phase::Open,
        Phase::Setup,
        Phase::Barrier,
        Phase::Launch,
        Phase::Wait,
        Phase::Poll,
        Phase::Check,
        Phase::Write,
        Phase::Switch,
        Phase::Synchronize,
        Phase::Fault,
        Phase::Drain,
        Phase::Drop,
        Phase::Join,
        Phase::LeakCheck,
        Phase::Child,
        Phase::Done,
        Phase::InjectedHang,
    ];

    /// The phase's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Open => "open",
            Phase::Setup => "setup",
            Phase::Barrier => "barrier",
            Phase::Launch => "launch",
            Phase::Wait => "wait",
            Phase::Poll => "poll",
            Phase::Check => "check",
            Phase::Write => "write",
            Phase::Switch => "switch-stream",
            Phase::Synchronize => "synchronize",
            Phase::Fault => "fault",
            Phase::Drain => "drain",
            Phase::Drop => "drop",
            Phase::Join => "join",
            Phase::LeakCheck => "leak-check",
            Phase::Child => "child",
            Phase::Done => "done",
            Phase::InjectedHang => "injected-hang",
        }
    }

    fn from_u8(v: u8) -> Phase {
        Phase::ALL.get(v as usize).copied().unwrap_or(Phase::Idle)
    }
}

/// One thread's progress, written by the thread, read by the watchdog.
#[derive(Debug)]
pub struct Slot {
    name: String,
    phase: AtomicU8,
    step: AtomicU32,
    done: AtomicBool,
}

impl Slot {
    /// Records what the thread does now.
    pub fn set(&self, phase: Phase, step: usize) {
        self.step
            .store(u32::try_from(step).unwrap_or(u32::MAX), Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Records a new phase at the same step.
    pub fn phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// The thread finished (also set while it unwinds from a panic).
    pub fn finish(&self) {
        self.phase.store(Phase::Done as u8, Ordering::Relaxed);
        self.done.store(true, Ordering::Release);
    }
}

/// Marks a slot finished when dropped: a thread finishes however it leaves (return or panic).
pub struct FinishOnDrop(pub Arc<Slot>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// The watch over one round.
#[derive(Debug)]
pub struct RoundWatch {
    /// Round number.
    pub round: u64,
    /// Round seed.
    pub seed: u64,
    /// Round kind.
    pub kind: &'static str,
    /// What the round does.
    pub plan: String,
    started: Instant,
    deadline: Duration,
    controller: Arc<Slot>,
    slots: Mutex<Vec<Arc<Slot>>>,
}

impl RoundWatch {
    /// A watch for round `round` that expires `deadline` from now.
    pub fn new(
        round: u64,
        seed: u64,
        kind: &'static str,
        plan: String,
        deadline: Duration,
    ) -> Arc<RoundWatch> {
        Arc::new(RoundWatch {
            round,
            seed,
            kind,
            plan,
            started: Instant::now(),
            deadline,
            controller: Arc::new(new_slot("controller".into())),
            slots: Mutex::new(Vec::new()),
        })
    }

    /// The controlling thread's slot.
    pub fn controller(&self) -> &Slot {
        &self.controller
    }

    /// A slot for a new thread called `name`.
    pub fn slot(&self, name: String) -> Arc<Slot> {
        let s = Arc::new(new_slot(name));
        let mut slots = self.slots.lock();
        // Churn rounds start thousands of threads: forget finished ones.
        if slots.len() >= 512 {
            slots.retain(|s| !s.done.load(Ordering::Acquire));
        }
        slots.push(s.clone());
        s
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_sub(self.started.elapsed())
    }

    /// True once the deadline has passed.
    pub fn expired(&self) -> bool {
        self.started.elapsed() >= self.deadline
    }

    /// The threads that have not finished, and what each is doing.
    pub fn stuck(&self) -> Vec<String> {
        let mut out = Vec::new();
        let c = &self.controller;
        if !c.done.load(Ordering::Acquire) {
            out.push(describe(c));
        }
        for s in self.slots.lock().iter() {
            if !s.done.load(Ordering::Acquire) {
                out.push(describe(s));
            }
        }
        out
    }

    /// A one-line report of a hang.
    pub fn report(&self) -> String {
        let stuck = self.stuck();
        format!(
            "round {} did not finish within {:.0} s; {} thread(s) stuck: {}",
            self.round,
            self.deadline.as_secs_f64(),
            stuck.len(),
            stuck.join("; ")
        )
    }
}

fn new_slot(name: String) -> Slot {
    Slot {
        name,
        phase: AtomicU8::new(Phase::Idle as u8),
        step: AtomicU32::new(0),
        done: AtomicBool::new(false),
    }
}

fn describe(s: &Slot) -> String {
    format!(
        "{} in {} at op {}",
        s.name,
        Phase::from_u8(s.phase.load(Ordering::Relaxed)).name(),
        s.step.load(Ordering::Relaxed)
    )
}

/// The process's watchdog: one thread watching the current round.
pub struct Watchdog {
    current: Arc<Mutex<Option<Arc<RoundWatch>>>>,
}

impl Watchdog {
    /// Starts the watchdog. When a round's deadline passes, `on_hang` gets the round's watch
    /// (to record the hang), then the process exits with [`EXIT_HANG`].
    pub fn start(on_hang: impl Fn(&RoundWatch) + Send + 'static) -> Watchdog {
        let current: Arc<Mutex<Option<Arc<RoundWatch>>>> = Arc::new(Mutex::new(None));
        let c2 = current.clone();
        std::thread::Builder::new()
            .name("stress-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(50));
                let watch = c2.lock().clone();
                if let Some(w) = watch {
                    if w.expired() {
                        on_hang(&w);
                        std::process::exit(EXIT_HANG);
                    }
                }
            })
            .expect("start the watchdog thread");
        Watchdog { current }
    }

    /// Watches `round` until [`Watchdog::clear`].
    pub fn watch(&self, round: Arc<RoundWatch>) {
        *self.current.lock() = Some(round);
    }

    /// Stops watching.
    pub fn clear(&self) {
        *self.current.lock() = None;
    }
}
