//! Round plans: everything a round will do, drawn from its seed alone.
//!
//! A plan fixes the device settings, pool, lock mode, coalescing, every thread's buffers,
//! window depth and op list, and how and when the round ends. Thread interleavings are
//! real concurrency and differ between runs; the plan (and so the replay of a failing
//! round with `--round-seed`) does not.
//!
//! New op kinds (matmul, MLP) plug in as an [`Op`] variant with its weight in
//! `op_weights`, a branch in `mixed::Worker::run_op`, and a serial reference in `model`.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::rng::Rng;
use crate::backend::{BackendKind, WaitPolicy};
use crate::runtime::CoalescePolicy;
use crate::sync::submit_lock::LockMode;

/// What a round exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RoundKind {
    /// N threads (`--threads`) run a random op mix on private and shared streams and buffers,
    /// then the round ends one of six ways (orderly, shutdown in flight, drop everything,
    /// device dropped by another thread, a panic, an injected fault).
    Mixed,
    /// 256 threads on 32 streams, few ops each.
    Oversubscribe,
    /// Hundreds of short-lived threads taking, using and releasing streams.
    Churn,
    /// A child process exits (or returns from main, or tears down thread-locals) with work
    /// in flight; its exit status is checked.
    Exit,
}

impl RoundKind {
    /// All kinds.
    pub const ALL: [RoundKind; 4] = [
        RoundKind::Mixed,
        RoundKind::Oversubscribe,
        RoundKind::Churn,
        RoundKind::Exit,
    ];

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            RoundKind::Mixed => "mixed",
            RoundKind::Oversubscribe => "oversubscribe",
            RoundKind::Churn => "churn",
            RoundKind::Exit => "exit",
        }
    }

    /// How often the kind is drawn (relative weight). Exit rounds start a process, which on
    /// CUDA means a new context and kernel compilation (about a second), so they are drawn
    /// less often there.
    fn weight(self, backend: Option<BackendKind>) -> u32 {
        match self {
            RoundKind::Mixed => 70,
            RoundKind::Oversubscribe => 8,
            RoundKind::Churn => 14,
            RoundKind::Exit => match backend {
                Some(BackendKind::Cpu) => 8,
                _ => 2,
            },
        }
    }
}

/// One op of a thread's list. Launch-type ops first check and rewrite their buffer when it
/// has no room left for their iterations (see `model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `simple_compute` on own buffer `buf` on the thread's current stream, through its window.
    Launch {
        /// Own buffer index.
        buf: usize,
        /// Kernel iterations (1 or 2).
        iters: u32,
    },
    /// The same on the pool's shared stream (stream 0; not in lock mode `none`).
    LaunchShared {
        /// Own buffer index.
        buf: usize,
        /// Kernel iterations.
        iters: u32,
    },
    /// One grouped launch (`launch_many`) over all own buffers.
    LaunchGrouped {
        /// Kernel iterations.
        iters: u32,
    },
    /// A launch on a buffer shared by all threads (taken under its mutex), on the current
    /// stream: the buffer moves between streams and threads.
    LaunchSharedBuffer {
        /// Shared buffer index.
        shared: usize,
        /// Kernel iterations.
        iters: u32,
        /// Wait for the op before releasing the buffer (else drop the ticket).
        wait: bool,
    },
    /// Launch and drop the ticket without waiting.
    DropTicket {
        /// Own buffer index.
        buf: usize,
        /// Kernel iterations.
        iters: u32,
    },
    /// Launch, poll `is_complete` a while, then wait.
    Poll {
        /// Own buffer index.
        buf: usize,
        /// Kernel iterations.
        iters: u32,
    },
    /// Read a buffer back and check it against the reference.
    Read {
        /// Own buffer index.
        buf: usize,
    },
    /// Check a buffer, then write a fresh pattern into it.
    Rewrite {
        /// Own buffer index.
        buf: usize,
    },
    /// Release the current stream and take another one (buffers then move streams).
    SwitchStream,
    /// Wait for everything queued on the current stream.
    Synchronize,
    /// A matrix product `out = a · b` (`a [m, k]`, `b [k, n]`, fresh tensors) on the current
    /// stream, its result checked against the f64 reference within the product's bound.
    Matmul {
        /// Rows of `a` and `out`.
        m: usize,
        /// Columns of `b` and `out`.
        n: usize,
        /// Inner dimension.
        k: usize,
        /// Wait for the ticket (else drop it; the read-back orders after the product).
        wait: bool,
    },
    /// `rows` rows through the round's MLP (one model shared by every thread, with or without
    /// dynamic batching), checked against the f64 reference forward.
    Infer {
        /// Input rows.
        rows: usize,
    },
}

impl Op {
    /// Kernel ops this op submits (grouped: one per own buffer).
    pub fn kernel_ops(self, own_buffers: usize) -> u64 {
        match self {
            Op::Launch { .. }
            | Op::LaunchShared { .. }
            | Op::LaunchSharedBuffer { .. }
            | Op::DropTicket { .. }
            | Op::Poll { .. }
            | Op::Matmul { .. }
            | Op::Infer { .. } => 1,
            Op::LaunchGrouped { .. } => own_buffers as u64,
            Op::Read { .. } | Op::Rewrite { .. } | Op::SwitchStream | Op::Synchronize => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Launch,
    LaunchShared,
    LaunchGrouped,
    LaunchSharedBuffer,
    DropTicket,
    Poll,
    Read,
    Rewrite,
    SwitchStream,
    Synchronize,
    Matmul,
    Infer,
}

/// The op mix: each kind with its weight, given what the round allows.
fn op_weights(
    shared_stream: bool,
    shared_buffers: bool,
    switch: bool,
    model: bool,
) -> Vec<(OpKind, u32)> {
    let mut w = vec![
        (OpKind::Matmul, 3),
        (OpKind::Launch, 30),
        (OpKind::LaunchGrouped, 8),
        (OpKind::DropTicket, 8),
        (OpKind::Poll, 5),
        (OpKind::Read, 6),
        (OpKind::Rewrite, 4),
        (OpKind::Synchronize, 4),
    ];
    if shared_stream {
        w.push((OpKind::LaunchShared, 8));
    }
    if shared_buffers {
        w.push((OpKind::LaunchSharedBuffer, 8));
    }
    if switch {
        w.push((OpKind::SwitchStream, 4));
    }
    if model {
        w.push((OpKind::Infer, 4));
    }
    w
}

/// How a thread panics (ending [`Ending::Panic`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PanicHow {
    /// Right after a launch, with its window of tickets outstanding.
    AfterLaunch,
    /// Inside the closure handed to `Inflight::submit`, after the launch returned a ticket.
    InsideSubmit,
    /// While holding a shared buffer's lock, after launching on it.
    HoldingSharedBuffer,
}

/// An injected fault (ending [`Ending::Fault`]): a wrong call that must return a typed error
/// to the calling thread only, which then goes on working.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// One allocation larger than the device's free memory (OutOfMemory), or where one
    /// buffer cannot be that large, larger than the largest buffer (InvalidArgument).
    Oversize,
    /// Allocate the largest buffers until the device runs out (OutOfMemory), then free them.
    /// Only where free memory exceeds the largest buffer (CUDA); elsewhere `Oversize`.
    Exhaust,
    /// Launch on a buffer of another device (WrongDevice), alone and in a grouped launch.
    WrongDevice,
    /// Allocate zero elements (InvalidArgument).
    ZeroLength,
    /// Lock `none`: launch on, and acquire, another thread's stream (ExclusiveStreamRequired).
    ForeignStream,
    /// Acquire a stream index past the pool (NoSuchStream).
    NoSuchStream,
    /// Write a slice of the wrong length into a buffer (InvalidArgument; contents kept).
    WrongLength,
    /// Make a stream of another pool current, and release it (InvalidArgument).
    ForeignPool,
    /// Windows of depth 0 and above the maximum (InvalidArgument).
    BadWindow,
    /// Pools of 0 and too many streams, coalescing with a batch of 0 (InvalidArgument).
    BadPool,
    /// A product whose inner sizes differ, a tensor whose data does not fill its shape, an
    /// MLP input that is not whole rows (Shape).
    BadShape,
}

impl FaultKind {
    const ALL: [FaultKind; 11] = [
        FaultKind::Oversize,
        FaultKind::Exhaust,
        FaultKind::WrongDevice,
        FaultKind::ZeroLength,
        FaultKind::ForeignStream,
        FaultKind::NoSuchStream,
        FaultKind::WrongLength,
        FaultKind::ForeignPool,
        FaultKind::BadWindow,
        FaultKind::BadPool,
        FaultKind::BadShape,
    ];
}

/// How a mixed round ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "ending")]
pub enum Ending {
    /// Every thread finishes its ops, drains, checks its buffers; then pool and device go.
    Orderly,
    /// At the trigger, threads stop and drop their tickets unwaited; the controller drops the
    /// pool and device, then reads every buffer: every op submitted must have run.
    ShutdownInFlight,
    /// At the trigger, threads drop tickets, buffers and streams while the controller drops
    /// the pool and device: nothing is checked but that nothing crashes, hangs or leaks.
    DropEverything,
    /// At the trigger, another thread drops the device and pool handles while the workers
    /// submit; the workers finish and check everything.
    DropDevice,
    /// Thread `thread` panics at its op `step`; the others are unaffected.
    Panic {
        /// The panicking thread.
        thread: usize,
        /// At which of its ops.
        step: usize,
        /// How.
        how: PanicHow,
    },
    /// Thread `thread` makes a wrong call at its op `step`, gets a typed error, goes on.
    Fault {
        /// The faulting thread.
        thread: usize,
        /// At which of its ops.
        step: usize,
        /// Which wrong call.
        fault: FaultKind,
    },
}

/// Device settings of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DevicePlan {
    /// CPU execution units (ignored on CUDA).
    pub units: usize,
    /// Wait policy (`None`: the backend's default).
    pub wait: Option<WaitPolicy>,
    /// CUDA device queue chaining ([`crate::DeviceOptions::queue_chain`]), drawn for rounds
    /// with coalescing `persistent` (`None` otherwise: the environment decides).
    pub queue_chain: Option<bool>,
}

/// Pool settings of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolPlan {
    /// Streams.
    pub streams: usize,
    /// Lock mode.
    pub lock: LockMode,
    /// Coalescing.
    pub coalesce: CoalescePolicy,
}

impl PoolPlan {
    /// The pool this plan asks for.
    pub fn config(&self) -> crate::PoolConfig {
        crate::PoolConfig {
            streams: self.streams,
            lock: self.lock,
            coalesce: self.coalesce,
        }
    }
}

/// One thread of a mixed round.
#[derive(Clone, Debug)]
pub struct ThreadPlan {
    /// Lengths of its own buffers.
    pub buffers: Vec<usize>,
    /// Its window depth (1 = a wait after every launch).
    pub depth: usize,
    /// Its ops.
    pub ops: Vec<Op>,
    /// Seed of its own generator (patterns of rewritten buffers).
    pub seed: u64,
}

/// The MLP of a mixed round, shared by its threads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPlan {
    /// Layer widths (input, hidden…, output).
    pub widths: Vec<usize>,
    /// Seed of its weights.
    pub seed: u64,
    /// Dynamic batching: (most rows per forward, forwards in flight), or none.
    pub batching: Option<(usize, usize)>,
    /// Bias and ReLU fused into the products' epilogue.
    pub fuse: bool,
}

/// A mixed (or oversubscribed) round.
#[derive(Clone, Debug)]
pub struct MixedPlan {
    /// Device settings.
    pub device: DevicePlan,
    /// Pool settings.
    pub pool: PoolPlan,
    /// The threads.
    pub threads: Vec<ThreadPlan>,
    /// Lengths of the buffers shared by all threads.
    pub shared_buffers: Vec<usize>,
    /// The MLP its threads call, if any.
    pub model: Option<ModelPlan>,
    /// How it ends.
    pub ending: Ending,
    /// Kernel ops submitted (by all threads) when the ending fires.
    pub trigger: u64,
}

impl MixedPlan {
    /// Kernel ops the threads plan to submit.
    pub fn planned_ops(&self) -> u64 {
        self.threads
            .iter()
            .map(|t| {
                t.ops
                    .iter()
                    .map(|o| o.kernel_ops(t.buffers.len()))
                    .sum::<u64>()
            })
            .sum()
    }
}

/// A churn round: `threads` short-lived threads, at most `wave` alive at once.
#[derive(Clone, Debug)]
pub struct ChurnPlan {
    /// Device settings.
    pub device: DevicePlan,
    /// Pool settings.
    pub pool: PoolPlan,
    /// Threads started in all.
    pub threads: usize,
    /// Threads alive at once, at most.
    pub wave: usize,
    /// Seed of the threads' own plans (thread `i` uses `seed + i`).
    pub seed: u64,
}

/// How the child process of an exit round ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ExitMode {
    /// `std::process::exit(0)` from main while the workers submit.
    Exit,
    /// Return from main while the workers submit (the runtime then exits the process).
    Return,
    /// Device, pool, streams, buffers and tickets held in thread-locals of main and of the
    /// workers (one whose destructor submits work, registered before multiq's own), then
    /// return from main: destruction order at exit.
    ThreadLocals,
    /// Drop the device and pool handles in main, then exit, while the workers submit.
    DropThenExit,
    /// Device and pool in a `static`, never dropped; exit while the workers submit.
    Static,
}

impl ExitMode {
    const ALL: [ExitMode; 5] = [
        ExitMode::Exit,
        ExitMode::Return,
        ExitMode::ThreadLocals,
        ExitMode::DropThenExit,
        ExitMode::Static,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ExitMode::Exit => "exit",
            ExitMode::Return => "return",
            ExitMode::ThreadLocals => "thread-locals",
            ExitMode::DropThenExit => "drop-then-exit",
            ExitMode::Static => "static",
        }
    }
}

/// An exit round: a child process with `threads` workers, ended by `mode` once `trigger`
/// ops were submitted.
#[derive(Clone, Copy, Debug)]
pub struct ExitPlan {
    /// Device settings.
    pub device: DevicePlan,
    /// Pool settings.
    pub pool: PoolPlan,
    /// Worker threads of the child.
    pub threads: usize,
    /// Their window depth.
    pub depth: usize,
    /// How the child ends.
    pub mode: ExitMode,
    /// Ops submitted before it ends.
    pub trigger: u64,
}

/// What a round does.
#[derive(Clone, Debug)]
pub enum Body {
    /// Mixed or oversubscribed.
    Mixed(MixedPlan),
    /// Thread churn.
    Churn(ChurnPlan),
    /// A child process exits with work in flight.
    Exit(ExitPlan),
}

/// A round's plan.
#[derive(Clone, Debug)]
pub struct RoundPlan {
    /// The seed it was drawn from.
    pub seed: u64,
    /// Its kind.
    pub kind: RoundKind,
    /// What it does.
    pub body: Body,
}

/// Coalescing policies a round may draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CoalesceKind {
    /// One launch per op.
    Off,
    /// A fixed batch limit and delay.
    Fixed,
    /// The adaptive batch target.
    Adaptive,
    /// Coalescing on the device (CUDA's device queue; elsewhere a fixed host policy).
    Persistent,
}

impl CoalesceKind {
    /// All policies.
    pub const ALL: [CoalesceKind; 4] = [
        CoalesceKind::Off,
        CoalesceKind::Fixed,
        CoalesceKind::Adaptive,
        CoalesceKind::Persistent,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CoalesceKind::Off => "off",
            CoalesceKind::Fixed => "fixed",
            CoalesceKind::Adaptive => "adaptive",
            CoalesceKind::Persistent => "persistent",
        }
    }
}

/// What plans depend on besides the seed.
#[derive(Clone, Debug)]
pub struct PlanSettings {
    /// The backend asked for (`None`: auto).
    pub backend: Option<BackendKind>,
    /// Threads of a mixed round.
    pub threads: usize,
    /// Kinds to draw from.
    pub kinds: Vec<RoundKind>,
    /// Fixed CPU units, or `None` to draw 1, 2 or 4 per round.
    pub units: Option<usize>,
    /// Fixed wait policy, or `None` to draw one per round.
    pub wait: Option<WaitPolicy>,
    /// Coalescing policies to draw from.
    pub coalesce: Vec<CoalesceKind>,
    /// Fixed device queue chaining for rounds with coalescing `persistent`, or `None` to draw
    /// it per round.
    pub queue_chain: Option<bool>,
}

const LENGTHS: &[(usize, u32)] = &[
    (1, 2),
    (7, 2),
    (64, 3),
    (256, 4),
    (1000, 4),
    (4096, 2),
    (4097, 2),
    (20_000, 1),
    (65_536, 1),
];

const SMALL_LENGTHS: &[(usize, u32)] = &[(1, 1), (7, 1), (64, 2), (256, 2), (1000, 1)];

impl RoundPlan {
    /// The plan of the round with seed `seed`.
    pub fn draw(seed: u64, settings: &PlanSettings) -> RoundPlan {
        let mut rng = Rng::new(seed);
        let kinds: Vec<(RoundKind, u32)> = settings
            .kinds
            .iter()
            .map(|&k| (k, k.weight(settings.backend)))
            .collect();
        let kind = rng.weighted(&kinds);
        let body = match kind {
            RoundKind::Mixed => Body::Mixed(mixed(&mut rng, settings, settings.threads, false)),
            RoundKind::Oversubscribe => Body::Mixed(mixed(&mut rng, settings, 256, true)),
            RoundKind::Churn => Body::Churn(churn(&mut rng, settings)),
            RoundKind::Exit => Body::Exit(exit(&mut rng, settings)),
        };
        let mut plan = RoundPlan { seed, kind, body };
        let (device, pool) = plan.device_and_pool_mut();
        chain_plan(seed, settings, device, pool);
        plan
    }

    /// The round's device and pool settings, whatever its kind.
    pub fn device_and_pool_mut(&mut self) -> (&mut DevicePlan, &mut PoolPlan) {
        match &mut self.body {
            Body::Mixed(p) => (&mut p.device, &mut p.pool),
            Body::Churn(p) => (&mut p.device, &mut p.pool),
            Body::Exit(p) => (&mut p.device, &mut p.pool),
        }
    }

    /// One line saying what the round does.
    pub fn describe(&self) -> String {
        let mut s = String::from(self.kind.name());
        match &self.body {
            Body::Mixed(p) => {
                let _ = write!(
                    s,
                    " {}T {} ops/{} planned, {}{}, ending {}",
                    p.threads.len(),
                    p.planned_ops(),
                    p.trigger,
                    describe_common(&p.device, &p.pool),
                    if p.shared_buffers.is_empty() {
                        String::new()
                    } else {
                        format!(", {} shared buffers", p.shared_buffers.len())
                    } + &p.model.as_ref().map_or(String::new(), |m| {
                        format!(
                            ", mlp {}{}",
                            m.widths
                                .iter()
                                .map(|w| w.to_string())
                                .collect::<Vec<_>>()
                                .join("x"),
                            m.batching
                                .map_or(String::new(), |(r, d)| format!(" batching {r}/{d}"))
                        )
                    }),
                    describe_ending(&p.ending)
                );
            }
            Body::Churn(p) => {
                let _ = write!(
                    s,
                    " {} threads, {} at once, {}",
                    p.threads,
                    p.wave,
                    describe_common(&p.device, &p.pool)
                );
            }
            Body::Exit(p) => {
                let _ = write!(
                    s,
                    " child {}T depth {} {} after {} ops, {}",
                    p.threads,
                    p.depth,
                    p.mode.name(),
                    p.trigger,
                    describe_common(&p.device, &p.pool)
                );
            }
        }
        s
    }
}

fn describe_common(d: &DevicePlan, p: &PoolPlan) -> String {
    let coalesce = match p.coalesce {
        CoalescePolicy::Off => "off".to_string(),
        CoalescePolicy::Fixed {
            max_batch,
            max_delay,
            depth,
        } => format!("fixed({max_batch},{}us,d{depth})", max_delay.as_micros()),
        CoalescePolicy::Adaptive {
            max_batch,
            max_delay,
            depth,
            ..
        } => format!("adaptive({max_batch},{}us,d{depth})", max_delay.as_micros()),
        CoalescePolicy::Persistent => "persistent".to_string(),
    };
    let wait = d.wait.map_or("default".to_string(), |w| w.to_string());
    let chain = match d.queue_chain {
        Some(true) => " chained",
        _ => "",
    };
    format!(
        "lock {} streams {} coalesce {coalesce}{chain} wait {wait} units {}",
        p.lock, p.streams, d.units
    )
}

fn describe_ending(e: &Ending) -> String {
    match e {
        Ending::Orderly => "orderly".into(),
        Ending::ShutdownInFlight => "shutdown-in-flight".into(),
        Ending::DropEverything => "drop-everything".into(),
        Ending::DropDevice => "drop-device".into(),
        Ending::Panic { thread, step, how } => {
            format!("panic T{thread} op {step} ({})", ser_name(how))
        }
        Ending::Fault {
            thread,
            step,
            fault,
        } => format!("fault T{thread} op {step} ({})", ser_name(fault)),
    }
}

/// A unit enum's serde name.
pub(crate) fn ser_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn device_plan(rng: &mut Rng, settings: &PlanSettings, threads: usize) -> DevicePlan {
    let units = settings.units.unwrap_or_else(|| rng.pick(&[1, 2, 4]));
    let wait = match settings.wait {
        Some(w) => Some(w),
        None => {
            // The CPU backend's spin wait never yields: with hundreds of spinning threads on
            // a few cores its execution units would get a sliver of the CPU. Hundreds of
            // threads therefore wait by yielding or blocking there.
            let spin_ok = threads <= 32 || settings.backend != Some(BackendKind::Cpu);
            let mut choices = vec![
                (None, 3),
                (Some(WaitPolicy::Yield), 2),
                (Some(WaitPolicy::Block), 2),
            ];
            if spin_ok {
                choices.push((Some(WaitPolicy::Spin), 1));
            }
            rng.weighted(&choices)
        }
    };
    DevicePlan {
        units,
        wait,
        queue_chain: None,
    }
}

/// The device and pool of a round.
fn device_and_pool(
    rng: &mut Rng,
    settings: &PlanSettings,
    threads: usize,
    oversubscribe: bool,
) -> (DevicePlan, PoolPlan) {
    let device = device_plan(rng, settings, threads);
    let pool = pool_plan(rng, settings, threads, oversubscribe);
    (device, pool)
}

/// Whether a round with coalescing `persistent` has its device queue chain ops: as fixed by
/// the settings, else drawn from a generator of its own, so every other draw of the round is
/// what it was before chaining existed (recorded seeds replay the same rounds).
fn chain_plan(seed: u64, settings: &PlanSettings, device: &mut DevicePlan, pool: &PoolPlan) {
    if pool.coalesce == CoalescePolicy::Persistent {
        let drawn = Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15).chance(0.5);
        device.queue_chain = Some(settings.queue_chain.unwrap_or(drawn));
    }
}

fn coalesce_plan(rng: &mut Rng, allowed: &[CoalesceKind]) -> CoalescePolicy {
    let max_batch = rng.pick(&[1, 2, 4, 8, 16, 32]);
    let max_delay = Duration::from_micros(rng.pick(&[0, 5, 20, 100]));
    let depth = rng.pick(&[1, 2, 3]);
    let latency_target = Duration::from_micros(rng.pick(&[20, 100, 1000]));
    let weights: Vec<(CoalesceKind, u32)> = [
        (CoalesceKind::Off, 5),
        (CoalesceKind::Fixed, 3),
        (CoalesceKind::Adaptive, 2),
        (CoalesceKind::Persistent, 2),
    ]
    .into_iter()
    .filter(|(k, _)| allowed.is_empty() || allowed.contains(k))
    .collect();
    match rng.weighted(&weights) {
        CoalesceKind::Off => CoalescePolicy::Off,
        CoalesceKind::Fixed => CoalescePolicy::Fixed {
            max_batch,
            max_delay,
            depth,
        },
        CoalesceKind::Adaptive => CoalescePolicy::Adaptive {
            max_batch,
            max_delay,
            latency_target,
            depth,
        },
        CoalesceKind::Persistent => CoalescePolicy::Persistent,
    }
}

fn pool_plan(
    rng: &mut Rng,
    settings: &PlanSettings,
    threads: usize,
    oversubscribe: bool,
) -> PoolPlan {
    let lock = rng.pick(&[LockMode::Global, LockMode::PerStream, LockMode::None]);
    let streams = if oversubscribe {
        32
    } else if lock == LockMode::None {
        // Every thread owns a stream; some spare ones for stream switches.
        threads + rng.range_usize(0, threads)
    } else {
        rng.pick(&[1, 2, 4, 8, 16, 32])
    };
    PoolPlan {
        streams: streams.clamp(1, crate::runtime::MAX_POOL_SIZE),
        lock,
        coalesce: coalesce_plan(rng, &settings.coalesce),
    }
}

fn mixed(rng: &mut Rng, settings: &PlanSettings, threads: usize, oversubscribe: bool) -> MixedPlan {
    let (device, pool) = device_and_pool(rng, settings, threads, oversubscribe);
    let ending = {
        let thread = rng.range_usize(0, threads - 1);
        let how = rng.pick(&[
            PanicHow::AfterLaunch,
            PanicHow::InsideSubmit,
            PanicHow::HoldingSharedBuffer,
        ]);
        let fault = rng.pick(&FaultKind::ALL);
        // Filled with the thread's op count below.
        let step = usize::MAX;
        rng.weighted(&[
            (Ending::Orderly, 30),
            (Ending::ShutdownInFlight, 15),
            (Ending::DropEverything, 10),
            (Ending::DropDevice, 15),
            (Ending::Panic { thread, step, how }, 15),
            (
                Ending::Fault {
                    thread,
                    step,
                    fault,
                },
                15,
            ),
        ])
    };
    let shared_buffers: Vec<usize> = (0..rng.range_usize(0, 2))
        .map(|_| rng.weighted(SMALL_LENGTHS))
        .collect();
    let model = rng.chance(0.3).then(|| ModelPlan {
        widths: vec![
            rng.pick(&[8, 16, 64]),
            rng.pick(&[16, 32, 128]),
            rng.pick(&[8, 48]),
            rng.pick(&[4, 16]),
        ],
        seed: rng.next_u64(),
        batching: rng
            .chance(0.5)
            .then(|| (rng.pick(&[1, 4, 16, 64]), rng.pick(&[1, 2, 4]))),
        fuse: rng.chance(0.5),
    });
    let shared_stream = pool.lock != LockMode::None;
    // Switching streams needs the pool, which a drop-device ending takes away; with lock
    // `none` and every stream owned, a switch could be refused (documented), so not there.
    let switch = ending != Ending::DropDevice && !(oversubscribe && pool.lock == LockMode::None);
    let weights = op_weights(
        shared_stream,
        !shared_buffers.is_empty(),
        switch,
        model.is_some(),
    );
    let mut plans: Vec<ThreadPlan> = (0..threads)
        .map(|_| {
            let mut t = rng.fork();
            let buffers: Vec<usize> = if oversubscribe {
                vec![t.weighted(SMALL_LENGTHS)]
            } else {
                (0..t.range_usize(1, 3))
                    .map(|_| t.weighted(LENGTHS))
                    .collect()
            };
            let depth = t.pick(&[1, 1, 2, 4, 8]);
            let n_ops = if oversubscribe {
                t.range_usize(2, 6)
            } else {
                t.range_usize(8, 40)
            };
            let ops = (0..n_ops)
                .map(|_| draw_op(&mut t, &weights, buffers.len(), shared_buffers.len()))
                .collect();
            ThreadPlan {
                buffers,
                depth,
                ops,
                seed: t.next_u64(),
            }
        })
        .collect();
    let ending = match ending {
        Ending::Panic { thread, how, .. } => {
            let step = rng.range_usize(0, plans[thread].ops.len() - 1);
            let how = if how == PanicHow::HoldingSharedBuffer && shared_buffers.is_empty() {
                PanicHow::AfterLaunch
            } else {
                how
            };
            Ending::Panic { thread, step, how }
        }
        Ending::Fault { thread, fault, .. } => {
            let step = rng.range_usize(0, plans[thread].ops.len() - 1);
            let fault = if fault == FaultKind::ForeignStream
                && (pool.lock != LockMode::None || threads < 2)
            {
                FaultKind::NoSuchStream
            } else {
                fault
            };
            Ending::Fault {
                thread,
                step,
                fault,
            }
        }
        e => e,
    };
    // Exhaustion takes every byte of device memory for a moment: the other threads must
    // not allocate meanwhile (rewrites and reads do not; stream switches may create streams,
    // products allocate their tensors, the MLP its execution contexts).
    if let Ending::Fault {
        fault: FaultKind::Exhaust,
        ..
    } = ending
    {
        for t in &mut plans {
            for op in &mut t.ops {
                if matches!(op, Op::SwitchStream | Op::Matmul { .. } | Op::Infer { .. }) {
                    *op = Op::Synchronize;
                }
            }
        }
    }
    let mut plan = MixedPlan {
        device,
        pool,
        threads: plans,
        shared_buffers,
        model,
        ending,
        trigger: 0,
    };
    plan.trigger = rng.range(1, plan.planned_ops().max(1));
    plan
}

fn draw_op(rng: &mut Rng, weights: &[(OpKind, u32)], own: usize, shared: usize) -> Op {
    let buf = rng.range_usize(0, own - 1);
    let iters = rng.range(1, 2) as u32;
    match rng.weighted(weights) {
        OpKind::Launch => Op::Launch { buf, iters },
        OpKind::LaunchShared => Op::LaunchShared { buf, iters },
        OpKind::LaunchGrouped => Op::LaunchGrouped { iters },
        OpKind::LaunchSharedBuffer => Op::LaunchSharedBuffer {
            shared: rng.range_usize(0, shared.max(1) - 1),
            iters,
            wait: rng.chance(0.5),
        },
        OpKind::DropTicket => Op::DropTicket { buf, iters },
        OpKind::Poll => Op::Poll { buf, iters },
        OpKind::Read => Op::Read { buf },
        OpKind::Rewrite => Op::Rewrite { buf },
        OpKind::SwitchStream => Op::SwitchStream,
        OpKind::Synchronize => Op::Synchronize,
        OpKind::Matmul => Op::Matmul {
            m: rng.pick(&[1, 3, 16, 33]),
            n: rng.pick(&[1, 8, 31, 64]),
            k: rng.pick(&[1, 7, 32, 65]),
            wait: rng.chance(0.5),
        },
        OpKind::Infer => Op::Infer {
            rows: rng.pick(&[1, 2, 5, 17]),
        },
    }
}

fn churn(rng: &mut Rng, settings: &PlanSettings) -> ChurnPlan {
    let wave = rng.pick(&[4, 16, 32]);
    let (device, mut pool) = device_and_pool(rng, settings, wave, false);
    pool.streams = rng.pick(&[1, 4, 8, 32, 64]);
    ChurnPlan {
        device,
        pool,
        threads: rng.range_usize(200, 1000),
        wave,
        seed: rng.next_u64(),
    }
}

fn exit(rng: &mut Rng, settings: &PlanSettings) -> ExitPlan {
    let threads = rng.range_usize(2, 16);
    let (device, mut pool) = device_and_pool(rng, settings, threads, false);
    if pool.lock == LockMode::None {
        // A stream for each worker, and one for main (thread-locals mode takes one).
        pool.streams = pool.streams.max(threads + 1);
    }
    ExitPlan {
        device,
        pool,
        threads,
        depth: rng.pick(&[1, 2, 8]),
        mode: rng.pick(&ExitMode::ALL),
        trigger: rng.range(0, 200),
    }
}

/// A churn thread's own plan: how it takes a stream, its ops, how it leaves.
#[derive(Clone, Copy, Debug)]
pub struct ChurnThread {
    /// Take a stream with `acquire(index)` instead of `current()`.
    pub acquire: Option<usize>,
    /// Buffer length.
    pub len: usize,
    /// Launches (1–3), each waited or dropped.
    pub launches: u32,
    /// Wait for each launch (else drop its ticket; the read then orders after it).
    pub wait: bool,
    /// Release, then take a stream again before the launches.
    pub retake: bool,
    /// How it leaves.
    pub leave: Leave,
}

/// How a churn thread leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leave {
    /// `release_current`.
    ReleaseCurrent,
    /// `release(&stream)`.
    Release,
    /// Just exit: the thread-local table gives the stream (and a claim) back.
    Exit,
    /// Panic with its ticket in flight.
    Panic,
}

impl ChurnThread {
    /// Thread `index`'s plan in a churn round with `plan`.
    pub fn draw(plan: &ChurnPlan, index: usize) -> ChurnThread {
        let mut rng = Rng::new(plan.seed.wrapping_add(index as u64));
        ChurnThread {
            acquire: rng
                .chance(0.3)
                .then(|| rng.range_usize(0, plan.pool.streams - 1)),
            len: rng.weighted(SMALL_LENGTHS),
            launches: rng.range(1, 3) as u32,
            wait: rng.chance(0.6),
            retake: rng.chance(0.2),
            leave: rng.weighted(&[
                (Leave::ReleaseCurrent, 30),
                (Leave::Release, 20),
                (Leave::Exit, 48),
                (Leave::Panic, 2),
            ]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device_and_pool_of(mut plan: RoundPlan) -> (DevicePlan, PoolPlan) {
        let (d, p) = plan.device_and_pool_mut();
        (*d, *p)
    }

    fn settings() -> PlanSettings {
        PlanSettings {
            backend: Some(BackendKind::Cpu),
            threads: 16,
            kinds: RoundKind::ALL.to_vec(),
            units: None,
            wait: None,
            coalesce: CoalesceKind::ALL.to_vec(),
            queue_chain: None,
        }
    }

    #[test]
    fn a_seed_always_draws_the_same_plan() {
        for seed in 0..200 {
            let a = RoundPlan::draw(seed, &settings());
            let b = RoundPlan::draw(seed, &settings());
            assert_eq!(a.describe(), b.describe());
        }
    }

    #[test]
    fn plans_respect_what_each_lock_mode_and_ending_allows() {
        let mut kinds = std::collections::HashSet::new();
        for seed in 0..3000 {
            let plan = RoundPlan::draw(seed, &settings());
            kinds.insert(plan.kind);
            let Body::Mixed(p) = &plan.body else { continue };
            assert!(p.trigger >= 1 && p.trigger <= p.planned_ops().max(1));
            if p.pool.lock == LockMode::None && plan.kind == RoundKind::Mixed {
                assert!(
                    p.pool.streams >= p.threads.len(),
                    "lock none: a stream each"
                );
            }
            for t in &p.threads {
                assert!(!t.ops.is_empty() && !t.buffers.is_empty());
                for op in &t.ops {
                    if p.pool.lock == LockMode::None {
                        assert!(!matches!(op, Op::LaunchShared { .. }));
                    }
                    if p.ending == Ending::DropDevice {
                        assert_ne!(*op, Op::SwitchStream);
                    }
                    if let Op::LaunchSharedBuffer { shared, .. } = op {
                        assert!(*shared < p.shared_buffers.len());
                    }
                }
            }
            match p.ending {
                Ending::Panic { thread, step, how } => {
                    assert!(step < p.threads[thread].ops.len());
                    if how == PanicHow::HoldingSharedBuffer {
                        assert!(!p.shared_buffers.is_empty());
                    }
                }
                Ending::Fault {
                    thread,
                    step,
                    fault,
                } => {
                    assert!(step < p.threads[thread].ops.len());
                    if fault == FaultKind::ForeignStream {
                        assert_eq!(p.pool.lock, LockMode::None);
                    }
                }
                _ => {}
            }
        }
        assert_eq!(kinds.len(), 4, "every kind is drawn");
    }

    #[test]
    fn coalescing_is_drawn_with_blocking_and_with_yielding_waits() {
        // Coalescing with blocking waits is the configuration that hung before the coalescer's
        // event-mode fix: rounds must keep drawing it.
        let s = settings();
        let (mut coalesced_blocking, mut coalesced_other) = (0, 0);
        for seed in 0..2000 {
            let (d, p) = device_and_pool_of(RoundPlan::draw(seed, &s));
            let blocks = matches!(d.wait, None | Some(WaitPolicy::Block));
            if p.coalesce != CoalescePolicy::Off {
                if blocks {
                    coalesced_blocking += 1;
                } else {
                    coalesced_other += 1;
                }
            }
        }
        assert!(
            coalesced_blocking > 200 && coalesced_other > 200,
            "{coalesced_blocking} {coalesced_other}"
        );
    }

    /// Rounds recorded before chaining existed (multiq at 5fd31bc, `stress --backend cpu
    /// --coalesce persistent --round-seed N --verbose`) are drawn the same today, apart from
    /// the chaining drawn on top: a recorded seed replays its round.
    #[test]
    fn seeds_recorded_before_chaining_existed_draw_the_same_rounds() {
        let s = PlanSettings {
            coalesce: vec![CoalesceKind::Persistent],
            ..settings()
        };
        for (seed, before) in [
            (3, "mixed 16T 333 ops/286 planned, lock global streams 2 coalesce persistent wait yield units 4, 2 shared buffers, mlp 8x32x48x16 batching 16/4, ending shutdown-in-flight"),
            (6, "oversubscribe 256T 821 ops/703 planned, lock global streams 32 coalesce persistent wait default units 2, 2 shared buffers, ending orderly"),
            (7, "mixed 16T 358 ops/218 planned, lock per-stream streams 4 coalesce persistent wait spin units 1, 2 shared buffers, ending fault T1 op 13 (bad-shape)"),
        ] {
            let now = RoundPlan::draw(seed, &s).describe().replace(" chained", "");
            assert_eq!(now, before, "seed {seed}");
        }
    }

    #[test]
    fn rounds_with_the_device_queue_draw_chaining_on_and_off_and_others_leave_it() {
        let s = settings();
        let (mut on, mut off) = (0, 0);
        for seed in 0..2000 {
            let (d, p) = device_and_pool_of(RoundPlan::draw(seed, &s));
            match (p.coalesce, d.queue_chain) {
                (CoalescePolicy::Persistent, Some(true)) => on += 1,
                (CoalescePolicy::Persistent, Some(false)) => off += 1,
                (CoalescePolicy::Persistent, None) => panic!("seed {seed}: persistent, undrawn"),
                (_, chain) => assert_eq!(chain, None, "seed {seed}: {:?}", p.coalesce),
            }
        }
        assert!(on > 50 && off > 50, "{on} {off}");
        // --queue-chain fixes it for every such round; every other draw stays the same.
        let fixed = PlanSettings {
            queue_chain: Some(true),
            ..settings()
        };
        for seed in 0..300 {
            let (d, _) = device_and_pool_of(RoundPlan::draw(seed, &s));
            let (f, _) = device_and_pool_of(RoundPlan::draw(seed, &fixed));
            assert_eq!(f.queue_chain, d.queue_chain.map(|_| true), "seed {seed}");
            assert_eq!((d.units, d.wait), (f.units, f.wait), "seed {seed}");
        }
    }
}
