//! Mixed and oversubscribed rounds: threads run their op lists on one pool, then the round
//! ends the way its plan says, and everything is checked.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::fault;
use super::model::Tracked;
use super::plan::{Ending, MixedPlan, Op, PanicHow, ThreadPlan};
use super::rng::Rng;
use super::watch::{FinishOnDrop, Phase, Slot};
use super::{panic_message, wait_until, Env, InjectedPanic, Tally};
use crate::error::Error;
use crate::kernel::Kernel;
use crate::model::weights::{HostWeights, MlpSpec};
use crate::model::{reference_forward, relative_error, Batching, Model, ModelOptions};
use crate::sync::submit_lock::LockMode;
use crate::tensor::{check_matmul, seeded_values, Tensor};
use crate::Precision;
use crate::{Buffer, Inflight, Stream, StreamPool};

/// Normwise relative error an fp32 MLP may show against the f64 reference (as in
/// `tests/mlp.rs` and `tests/gpu_mlp.rs`).
const MLP_TOLERANCE: f64 = 1e-5;

/// What the threads of a round share.
pub(crate) struct Round<'a> {
    pub(crate) plan: &'a MixedPlan,
    pub(crate) tally: &'a Tally,
    pub(crate) tolerance: f32,
    /// Kernel ops submitted so far (the ending fires when it reaches the plan's trigger).
    submitted: AtomicU64,
    /// Set at the trigger for the shutdown endings.
    stop: AtomicBool,
    /// Threads that have left (normally or by panic).
    finished: AtomicUsize,
    /// Threads done with set-up; `go` opens when all are, `abort` if set-up cannot complete.
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    shared: Vec<Mutex<Tracked>>,
    /// The MLP every thread may call, and its weights (for the reference).
    pub(crate) model: Option<(Model, HostWeights)>,
    /// Every thread's current stream, for the foreign-stream fault.
    pub(crate) streams: Mutex<Vec<Option<Stream>>>,
    /// Lock `none`: threads that believe they own each stream (must never exceed one).
    pub(crate) owners: Owners,
    /// The planned fault was made.
    pub(crate) fault_done: AtomicBool,
    /// A thread exhausted device memory on purpose this round.
    pub(crate) exhausting: AtomicBool,
    /// Threads refused a stream at set-up (lock `none`).
    setup_refused: AtomicU64,
    /// Threads that got past set-up and ran their ops.
    ran: Vec<AtomicBool>,
    hooks: super::Hooks,
}

#[derive(Default)]
struct Gate {
    ready: usize,
    go: bool,
    abort: bool,
}

/// Lock mode `none`: how many threads believe they own each stream. A thread adds itself
/// after the pool gave it a stream and removes itself before giving it back, so a count of
/// two means two threads were given one stream at once.
pub(crate) struct Owners {
    counts: Vec<AtomicUsize>,
    active: bool,
}

impl Owners {
    pub(crate) fn new(streams: usize, lock: LockMode) -> Owners {
        Owners {
            counts: (0..streams).map(|_| AtomicUsize::new(0)).collect(),
            active: lock == LockMode::None,
        }
    }

    /// Records that the caller owns stream `index`; an error message if another thread does.
    pub(crate) fn take(&self, index: usize, who: &str) -> Result<(), String> {
        if !self.active {
            return Ok(());
        }
        let before = self.counts[index].fetch_add(1, Ordering::AcqRel);
        if before == 0 {
            Ok(())
        } else {
            Err(format!(
                "{who}: lock none gave stream {index} to this thread while another owned it"
            ))
        }
    }

    /// Records that the caller gives stream `index` back.
    pub(crate) fn give(&self, index: usize) {
        if self.active {
            self.counts[index].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Runs a mixed (or oversubscribed) round.
pub fn run(plan: &MixedPlan, env: &Env<'_>) {
    let tally = env.tally;
    let c = env.watch.controller();
    c.set(Phase::Open, 0);
    let Some((device, pool, tolerance)) = env.open_round(&plan.device, &plan.pool) else {
        return;
    };
    let mut rng = Rng::new(plan.trigger ^ 0x5eed);
    let mut shared = Vec::new();
    for (i, &len) in plan.shared_buffers.iter().enumerate() {
        match Tracked::new(&device, len, &mut rng, format!("shared{i}")) {
            Ok(t) => shared.push(Mutex::new(t)),
            Err(e) => return tally.error(format!("allocating shared buffer {i}: {e}")),
        }
    }
    let model = match &plan.model {
        None => None,
        Some(m) => {
            let spec = MlpSpec {
                widths: m.widths.clone(),
            };
            let options = ModelOptions {
                precision: Precision::Strict,
                batching: m
                    .batching
                    .map(|(max_rows, depth)| Batching { max_rows, depth }),
                fuse: m.fuse,
            };
            let made = HostWeights::random(&spec, m.seed)
                .and_then(|w| Model::new(&device, &w, options).map(|model| (model, w)));
            match made {
                Ok(x) => Some(x),
                Err(e) => return tally.error(format!("making the MLP: {e}")),
            }
        }
    };
    let n = plan.threads.len();
    let round = Round {
        plan,
        tally,
        tolerance,
        submitted: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        finished: AtomicUsize::new(0),
        gate: Mutex::new(Gate::default()),
        gate_cv: Condvar::new(),
        shared,
        model,
        streams: Mutex::new(vec![None; n]),
        owners: Owners::new(plan.pool.streams, plan.pool.lock),
        fault_done: AtomicBool::new(false),
        exhausting: AtomicBool::new(false),
        setup_refused: AtomicU64::new(0),
        ran: (0..n).map(|_| AtomicBool::new(false)).collect(),
        hooks: env.hooks,
    };
    let round = &round;
    let mut returned: Vec<Tracked> = Vec::new();
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(n);
        for idx in 0..n {
            let pool = pool.clone();
            let slot = env.watch.slot(format!("T{idx}"));
            let spawned = std::thread::Builder::new()
                .name(format!("stress-T{idx}"))
                .spawn_scoped(scope, move || worker(idx, round, pool, slot));
            match spawned {
                Ok(h) => handles.push((idx, h)),
                Err(e) => {
                    tally.error(format!("starting thread {idx}: {e}"));
                    break;
                }
            }
        }
        c.set(Phase::Barrier, 0);
        {
            let mut g = round.gate.lock();
            if handles.len() < n {
                g.abort = true;
            } else {
                while g.ready < n && !env.watch.expired() {
                    round.gate_cv.wait_for(&mut g, Duration::from_millis(50));
                }
                g.go = true;
            }
        }
        round.gate_cv.notify_all();
        // The controller's own handles: what the ending drops, and when.
        let mut device = Some(device);
        let mut pool = Some(pool);
        match plan.ending {
            Ending::DropDevice => {
                // Another thread drops the device and the pool (the only pool handle left
                // once the workers finished set-up) while the workers submit.
                let (d, p) = (device.take(), pool.take());
                let dropper = std::thread::Builder::new()
                    .name("stress-dropper".into())
                    .spawn_scoped(scope, move || {
                        wait_until(Duration::from_secs(3600), || {
                            round.submitted.load(Ordering::Acquire) >= plan.trigger
                                || round.finished.load(Ordering::Acquire) >= n
                        });
                        drop(p);
                        drop(d);
                    });
                if let Err(e) = dropper {
                    tally.error(format!("starting the dropper thread: {e}"));
                }
            }
            Ending::DropEverything => {
                c.set(Phase::Drop, 0);
                wait_until(Duration::from_secs(3600), || {
                    round.stop.load(Ordering::Acquire)
                        || round.finished.load(Ordering::Acquire) >= handles.len()
                });
                drop(pool.take());
                drop(device.take());
            }
            _ => {}
        }
        c.set(Phase::Join, 0);
        for (idx, h) in handles {
            match h.join() {
                Ok(Some(bufs)) => returned.extend(bufs),
                Ok(None) => {}
                Err(payload) => {
                    let planned =
                        matches!(plan.ending, Ending::Panic { thread, .. } if thread == idx);
                    if planned && payload.downcast_ref::<InjectedPanic>().is_some() {
                        tally.expected_panic();
                    } else {
                        tally.crash(format!(
                            "thread T{idx} panicked: {}",
                            panic_message(&*payload)
                        ));
                    }
                }
            }
        }
        c.set(Phase::Check, 0);
        after_join(round, &mut pool, &mut device, std::mem::take(&mut returned));
    });
}

/// The controller's part after every worker joined: planned events happened, buffers
/// handed back are checked after the pool and device went, shared buffers are checked,
/// and with lock `none` every claim was given back.
fn after_join(
    round: &Round<'_>,
    pool: &mut Option<StreamPool>,
    device: &mut Option<crate::Device>,
    mut returned: Vec<Tracked>,
) {
    let plan = round.plan;
    let tally = round.tally;
    let n = plan.threads.len();
    let errors_seen = !tally.errors.lock().is_empty();
    let ran = |t: usize| round.ran[t].load(Ordering::Acquire);
    match plan.ending {
        Ending::Panic { thread, .. }
            if ran(thread) && tally.expected_panics() == 0 && !errors_seen =>
        {
            tally.mismatch(format!("T{thread} was to panic and did not"));
        }
        Ending::Fault { thread, fault, .. }
            if ran(thread) && !round.fault_done.load(Ordering::Acquire) && !errors_seen =>
        {
            tally.mismatch(format!(
                "T{thread} was to make the wrong call {} and did not",
                super::plan::ser_name(&fault)
            ));
        }
        _ => {}
    }
    // Lock none: exactly the threads beyond the pool's streams were refused at set-up.
    if plan.pool.lock == LockMode::None {
        let want = n.saturating_sub(plan.pool.streams) as u64;
        let got = round.setup_refused.load(Ordering::Acquire);
        if got != want {
            tally.mismatch(format!(
                "lock none, {n} threads on {} streams: {got} refused, {want} expected",
                plan.pool.streams
            ));
        }
    }
    round.streams.lock().iter_mut().for_each(|s| *s = None);
    if plan.ending == Ending::ShutdownInFlight {
        // Pool and device go first; the buffers keep what they need alive, and a read is
        // ordered after every op queued on the buffer (tickets dropped or not).
        drop(pool.take());
        drop(device.take());
    }
    if plan.pool.lock == LockMode::None {
        if let Some(p) = pool.as_ref() {
            claims_are_free(p, tally);
        }
    }
    // A thread that panicked holding a shared buffer released it while unwinding
    // (parking_lot's mutex has no poisoning), and had updated the model before panicking.
    let shared = round.shared.iter();
    let check = |t: &mut Tracked| match t.check(round.tolerance) {
        Ok(Ok(c)) => tally.verified(c.ops, c.max_abs_error),
        Ok(Err(m)) => tally.mismatch(m),
        Err(e) => tally.error(format!("reading back {}: {e}", t.name)),
    };
    if plan.ending == Ending::DropEverything {
        for m in shared {
            tally.unverified(m.lock().unchecked_ops);
        }
    } else {
        for m in shared {
            check(&mut m.lock());
        }
        for t in &mut returned {
            check(t);
        }
    }
    drop(returned);
}

/// Lock `none`: from a fresh thread, every stream of the pool can be acquired (every
/// claim was given back, by release or by its thread's exit, panics included).
fn claims_are_free(pool: &StreamPool, tally: &Tally) {
    let p = pool.clone();
    let taken = std::thread::spawn(move || {
        (0..p.size())
            .filter(|&i| p.acquire(i).is_err())
            .collect::<Vec<usize>>()
    })
    .join();
    match taken {
        Ok(busy) if busy.is_empty() => {}
        Ok(busy) => tally.mismatch(format!(
            "lock none: after every thread left, streams {busy:?} were still claimed"
        )),
        Err(p) => tally.crash(format!("claim check panicked: {}", panic_message(&*p))),
    }
}

/// One worker thread. Returns its buffers when the ending hands them to the controller.
fn worker(
    idx: usize,
    round: &Round<'_>,
    pool: StreamPool,
    slot: Arc<Slot>,
) -> Option<Vec<Tracked>> {
    /// Counts the thread out however it leaves (return or panic).
    struct Leave<'r> {
        finished: &'r AtomicUsize,
        _slot: FinishOnDrop,
    }
    impl Drop for Leave<'_> {
        fn drop(&mut self) {
            self.finished.fetch_add(1, Ordering::AcqRel);
        }
    }
    let _leave = Leave {
        finished: &round.finished,
        _slot: FinishOnDrop(slot.clone()),
    };
    let plan = &round.plan.threads[idx];
    let name = format!("T{idx}");
    slot.set(Phase::Setup, 0);
    let set_up = Worker::set_up(idx, round, pool, slot.clone(), plan, &name);
    let ok = set_up.as_ref().is_ok_and(|w| w.is_some());
    // Wait for every thread's set-up (and so every lock-none claim) before anyone goes on.
    slot.phase(Phase::Barrier);
    let go = {
        let mut g = round.gate.lock();
        g.ready += 1;
        round.gate_cv.notify_all();
        while !g.go && !g.abort {
            round.gate_cv.wait(&mut g);
        }
        g.go
    };
    let mut w = match set_up {
        Ok(Some(w)) if go && ok => w,
        Ok(Some(mut w)) => {
            w.release_ownership();
            return None;
        }
        Ok(None) => return None, // refused a stream, as documented
        Err(e) => {
            round.tally.error(format!("{name} set-up: {e}"));
            return None;
        }
    };
    round.ran[idx].store(true, Ordering::Release);
    w.run_ops();
    w.finish()
}

struct Worker<'r, 'a> {
    idx: usize,
    name: String,
    round: &'r Round<'a>,
    slot: Arc<Slot>,
    plan: &'r ThreadPlan,
    pool: Option<StreamPool>,
    stream: Stream,
    shared_stream: Option<Stream>,
    own: Vec<Tracked>,
    window: Inflight,
    rng: Rng,
    /// Set once an unexpected error stopped the thread: its buffers' state is then unknown.
    broken: bool,
    /// The stream this thread counts itself owner of (lock `none` bookkeeping).
    owned: Option<usize>,
}

/// Why a thread stops before its list ends.
enum Stop {
    /// An error nobody planned (recorded).
    Error,
    /// Lock `none` refused a stream while switching (documented; not an error).
    Refused,
}

impl<'r, 'a> Worker<'r, 'a> {
    fn set_up(
        idx: usize,
        round: &'r Round<'a>,
        pool: StreamPool,
        slot: Arc<Slot>,
        plan: &'r ThreadPlan,
        name: &str,
    ) -> crate::Result<Option<Worker<'r, 'a>>> {
        let stream = match pool.current() {
            Ok(s) => s,
            Err(Error::ExclusiveStreamRequired(_)) if pool.lock_mode() == LockMode::None => {
                round.tally.refused();
                round.setup_refused.fetch_add(1, Ordering::AcqRel);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let uses_shared = plan
            .ops
            .iter()
            .any(|o| matches!(o, Op::LaunchShared { .. }));
        let shared_stream = if uses_shared {
            Some(pool.acquire(0)?)
        } else {
            None
        };
        let mut rng = Rng::new(plan.seed);
        let device = pool.device().clone();
        let mut own = Vec::with_capacity(plan.buffers.len());
        for (b, &len) in plan.buffers.iter().enumerate() {
            own.push(Tracked::new(
                &device,
                len,
                &mut rng,
                format!("{name}.b{b}"),
            )?);
        }
        drop(device);
        let window = Inflight::new(plan.depth)?;
        if let Err(m) = round.owners.take(stream.index(), name) {
            round.tally.mismatch(m);
        }
        round.streams.lock()[idx] = Some(stream.clone());
        // A drop-device ending must leave the dropping thread the last pool handle.
        let pool = (round.plan.ending != Ending::DropDevice).then_some(pool);
        Ok(Some(Worker {
            idx,
            name: name.to_string(),
            round,
            slot,
            plan,
            pool,
            owned: Some(stream.index()),
            stream,
            shared_stream,
            own,
            window,
            rng,
            broken: false,
        }))
    }

    fn release_ownership(&mut self) {
        if let Some(i) = self.owned.take() {
            self.round.owners.give(i);
        }
    }

    fn tally(&self) -> &'a Tally {
        self.round.tally
    }

    fn run_ops(&mut self) {
        let ending = self.round.plan.ending;
        let hooks = self.round.hooks;
        for (step, &op) in self.plan.ops.iter().enumerate() {
            self.slot.set(Phase::Launch, step);
            if step == 0 && self.idx == 0 {
                self.test_hooks(hooks);
            }
            if self.round.stop.load(Ordering::Acquire) {
                return;
            }
            match ending {
                Ending::Panic {
                    thread,
                    step: s,
                    how,
                } if thread == self.idx && s == step => {
                    self.panic_now(step, how);
                }
                Ending::Fault {
                    thread,
                    step: s,
                    fault,
                } if thread == self.idx && s == step => {
                    self.slot.phase(Phase::Fault);
                    fault::inject(&mut self.fault_parts(), fault);
                    self.round.fault_done.store(true, Ordering::Release);
                }
                _ => {}
            }
            match self.run_op(step, op) {
                Ok(()) => {}
                Err(Stop::Refused) => return,
                Err(Stop::Error) => {
                    self.broken = true;
                    return;
                }
            }
        }
    }

    fn test_hooks(&mut self, hooks: super::Hooks) {
        if hooks.hang {
            self.slot.phase(Phase::InjectedHang);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if hooks.mismatch {
            // Overwrite a buffer behind the model's back.
            let len = self.own[0].buf.len();
            let _ = self.own[0].buf.write(&vec![0.25; len]);
        }
        if hooks.leak {
            if let Ok(b) = self.stream_device().alloc(16) {
                std::mem::forget(b);
            }
        }
        if hooks.crash {
            eprintln!("multiq stress: test hook: aborting the worker process mid-round");
            std::process::abort();
        }
        if hooks.panic {
            panic!("test hook: an unplanned panic in T{}", self.idx);
        }
    }

    fn stream_device(&self) -> crate::Device {
        self.own[0].buf.device().clone()
    }

    /// Counts `n` submitted kernel ops; at the trigger, the shutdown endings begin.
    fn submitted(&self, n: u64) {
        self.tally().ops(n);
        let before = self.round.submitted.fetch_add(n, Ordering::AcqRel);
        if before < self.round.plan.trigger
            && before + n >= self.round.plan.trigger
            && matches!(
                self.round.plan.ending,
                Ending::ShutdownInFlight | Ending::DropEverything
            )
        {
            self.round.stop.store(true, Ordering::Release);
        }
    }

    fn fail(&self, step: usize, op: &str, e: &Error) -> Stop {
        let msg = format!("{} op {step} ({op}): {e}", self.name);
        let oom = matches!(e, Error::OutOfMemory { .. })
            || matches!(e, Error::Device { message, .. } if message.contains("OUT_OF_MEMORY"));
        if oom && self.round.exhausting.load(Ordering::Acquire) {
            self.tally().collateral(msg);
        } else {
            self.tally().error(msg);
        }
        Stop::Error
    }

    /// Checks own buffer `b` against the reference.
    fn check(&mut self, b: usize, step: usize) -> Result<(), Stop> {
        self.slot.phase(Phase::Check);
        match self.own[b].check(self.round.tolerance) {
            Ok(Ok(c)) => {
                self.tally().verified(c.ops, c.max_abs_error);
                Ok(())
            }
            Ok(Err(m)) => {
                self.tally().mismatch(m);
                // Start afresh so one wrong answer is reported once.
                self.rewrite(b, step)
            }
            Err(e) => Err(self.fail(step, "read back", &e)),
        }
    }

    fn rewrite(&mut self, b: usize, step: usize) -> Result<(), Stop> {
        self.slot.phase(Phase::Write);
        let Worker { own, rng, .. } = self;
        own[b]
            .rewrite(rng)
            .map_err(|e| self.fail(step, "rewrite", &e))
    }

    /// Makes room for `iters` more iterations on own buffer `b` (check, then rewrite).
    fn room(&mut self, b: usize, iters: u32, step: usize) -> Result<(), Stop> {
        if !self.own[b].has_room(iters) {
            self.check(b, step)?;
            self.rewrite(b, step)?;
        }
        Ok(())
    }

    fn run_op(&mut self, step: usize, op: Op) -> Result<(), Stop> {
        match op {
            Op::Launch { buf, iters } => self.launch(step, buf, iters, false),
            Op::LaunchShared { buf, iters } => self.launch(step, buf, iters, true),
            Op::LaunchGrouped { iters } => {
                for b in 0..self.own.len() {
                    self.room(b, iters, step)?;
                }
                let k = Kernel::SimpleCompute { iters };
                let Worker {
                    own,
                    window,
                    stream,
                    ..
                } = self;
                let mut bufs: Vec<&mut Buffer> = own.iter_mut().map(|t| &mut t.buf).collect();
                let r = window.submit(|| stream.launch_many(k, &mut bufs));
                drop(bufs);
                r.map_err(|e| self.fail(step, "launch_many", &e))?;
                for t in &mut self.own {
                    t.applied(iters);
                }
                self.submitted(self.own.len() as u64);
                Ok(())
            }
            Op::LaunchSharedBuffer {
                shared,
                iters,
                wait,
            } => self.launch_shared_buffer(step, shared, iters, wait, false),
            Op::DropTicket { buf, iters } => {
                self.room(buf, iters, step)?;
                let k = Kernel::SimpleCompute { iters };
                let t = &mut self.own[buf];
                match self.stream.launch(k, &mut t.buf) {
                    Ok(ticket) => drop(ticket),
                    Err(e) => return Err(self.fail(step, "launch (ticket dropped)", &e)),
                }
                self.own[buf].applied(iters);
                self.submitted(1);
                Ok(())
            }
            Op::Poll { buf, iters } => {
                self.room(buf, iters, step)?;
                let k = Kernel::SimpleCompute { iters };
                let t = &mut self.own[buf];
                let ticket = self
                    .stream
                    .launch(k, &mut t.buf)
                    .map_err(|e| self.fail(step, "launch (polled)", &e))?;
                self.own[buf].applied(iters);
                self.submitted(1);
                self.slot.phase(Phase::Poll);
                for _ in 0..64 {
                    match ticket.is_complete() {
                        Ok(true) => break,
                        Ok(false) => std::thread::yield_now(),
                        Err(e) => return Err(self.fail(step, "is_complete", &e)),
                    }
                }
                self.slot.phase(Phase::Wait);
                ticket
                    .wait()
                    .map_err(|e| self.fail(step, "wait (polled)", &e))
            }
            Op::Read { buf } => self.check(buf, step),
            Op::Rewrite { buf } => {
                self.check(buf, step)?;
                self.rewrite(buf, step)
            }
            Op::SwitchStream => self.switch(step),
            Op::Matmul { m, n, k, wait } => self.matmul(step, (m, n, k), wait),
            Op::Infer { rows } => self.infer(step, rows),
            Op::Synchronize => {
                self.slot.phase(Phase::Synchronize);
                self.stream
                    .synchronize()
                    .map_err(|e| self.fail(step, "synchronize", &e))
            }
        }
    }

    /// A product on fresh tensors, checked against the f64 reference within its bound.
    fn matmul(
        &mut self,
        step: usize,
        (m, n, k): (usize, usize, usize),
        wait: bool,
    ) -> Result<(), Stop> {
        let dev = self.stream_device();
        let a_data = seeded_values(self.rng.next_u64(), m * k);
        let b_data = seeded_values(self.rng.next_u64(), k * n);
        let made = Tensor::from_slice(&dev, &[m, k], &a_data).and_then(|a| {
            let b = Tensor::from_slice(&dev, &[k, n], &b_data)?;
            Ok((a, b, Tensor::zeros(&dev, &[m, n])?))
        });
        let (mut a, mut b, mut out) = made.map_err(|e| self.fail(step, "matmul tensors", &e))?;
        let ticket = self
            .stream
            .matmul(&mut a, &mut b, &mut out, Precision::Strict)
            .map_err(|e| self.fail(step, "matmul", &e))?;
        self.submitted(1);
        if wait {
            self.slot.phase(Phase::Wait);
            ticket
                .wait()
                .map_err(|e| self.fail(step, "wait (matmul)", &e))?;
        } else {
            drop(ticket);
        }
        self.slot.phase(Phase::Check);
        // Ordered after the product, waited for or not (rule 4).
        let c = out
            .to_vec()
            .map_err(|e| self.fail(step, "read back (matmul)", &e))?;
        let check = check_matmul(&c, &a_data, &b_data, (m, n, k), false, Precision::Strict);
        if check.within {
            self.tally().verified(1, 0.0);
        } else {
            self.tally().mismatch(format!(
                "{} op {step}: matmul [{m}, {k}]·[{k}, {n}] off the f64 reference by {:.3e} \
                 of the scale (bound {:.3e})",
                self.name, check.max_rel_to_scale, check.bound
            ));
        }
        Ok(())
    }

    /// Rows through the round's shared MLP, checked against the f64 reference forward.
    fn infer(&mut self, step: usize, rows: usize) -> Result<(), Stop> {
        let Some((model, weights)) = &self.round.model else {
            return Ok(());
        };
        let input = seeded_values(self.rng.next_u64(), rows * model.spec().input());
        self.slot.phase(Phase::Wait);
        let out = model
            .infer(&input)
            .map_err(|e| self.fail(step, "infer", &e))?;
        self.submitted(1);
        self.slot.phase(Phase::Check);
        let err = relative_error(&out, &reference_forward(weights, &input));
        if err < MLP_TOLERANCE {
            self.tally().verified(1, 0.0);
        } else {
            self.tally().mismatch(format!(
                "{} op {step}: the MLP on {rows} rows is off the f64 reference by {err:.3e} \
                 (relative; tolerance {MLP_TOLERANCE:e})",
                self.name
            ));
        }
        Ok(())
    }

    fn launch(
        &mut self,
        step: usize,
        buf: usize,
        iters: u32,
        shared_stream: bool,
    ) -> Result<(), Stop> {
        self.room(buf, iters, step)?;
        let k = Kernel::SimpleCompute { iters };
        let Worker {
            own,
            window,
            stream,
            shared_stream: s0,
            ..
        } = self;
        let on = match (shared_stream, s0.as_ref()) {
            (true, Some(s)) => s,
            _ => stream,
        };
        let t = &mut own[buf];
        let r = window.submit(|| on.launch(k, &mut t.buf));
        r.map_err(|e| self.fail(step, "launch", &e))?;
        self.own[buf].applied(iters);
        self.submitted(1);
        Ok(())
    }

    fn launch_shared_buffer(
        &mut self,
        step: usize,
        shared: usize,
        iters: u32,
        wait: bool,
        then_panic: bool,
    ) -> Result<(), Stop> {
        let k = Kernel::SimpleCompute { iters };
        let m = &self.round.shared[shared];
        let mut g = m.lock();
        if !g.has_room(iters) {
            self.slot.phase(Phase::Check);
            match g.check(self.round.tolerance) {
                Ok(Ok(c)) => self.tally().verified(c.ops, c.max_abs_error),
                Ok(Err(msg)) => self.tally().mismatch(msg),
                Err(e) => return Err(self.fail(step, "read back shared", &e)),
            }
            self.slot.phase(Phase::Write);
            if let Err(e) = g.rewrite(&mut self.rng) {
                return Err(self.fail(step, "rewrite shared", &e));
            }
        }
        self.slot.phase(Phase::Launch);
        let ticket = self
            .stream
            .launch(k, &mut g.buf)
            .map_err(|e| self.fail(step, "launch on shared buffer", &e))?;
        g.applied(iters);
        self.submitted(1);
        if then_panic {
            std::panic::panic_any(InjectedPanic(format!(
                "{} holding shared{shared} with its op in flight",
                self.name
            )));
        }
        if wait {
            self.slot.phase(Phase::Wait);
            ticket
                .wait()
                .map_err(|e| self.fail(step, "wait on shared buffer", &e))?;
        } else {
            drop(ticket);
        }
        drop(g);
        Ok(())
    }

    fn switch(&mut self, step: usize) -> Result<(), Stop> {
        let Some(pool) = self.pool.clone() else {
            return Ok(());
        };
        self.slot.phase(Phase::Switch);
        self.release_ownership();
        if let Err(e) = pool.release_current() {
            return Err(self.fail(step, "release_current", &e));
        }
        match pool.current() {
            Ok(s) => {
                if let Err(m) = self.round.owners.take(s.index(), &self.name) {
                    self.tally().mismatch(m);
                }
                self.owned = Some(s.index());
                self.round.streams.lock()[self.idx] = Some(s.clone());
                self.stream = s;
                Ok(())
            }
            Err(Error::ExclusiveStreamRequired(_)) if pool.lock_mode() == LockMode::None => {
                // Every stream was owned when the pool looked (documented). The thread has
                // no stream now: it drains its window (the old handle stays valid for that)
                // and checks its buffers.
                self.tally().refused();
                Err(Stop::Refused)
            }
            Err(e) => Err(self.fail(step, "current after release", &e)),
        }
    }

    fn panic_now(&mut self, step: usize, how: PanicHow) -> ! {
        let iters = 1;
        let k = Kernel::SimpleCompute { iters };
        let on_shared = how == PanicHow::HoldingSharedBuffer && !self.round.shared.is_empty();
        if !on_shared && self.room(0, iters, step).is_err() {
            std::panic::panic_any(InjectedPanic(format!("{} (after an error)", self.name)));
        }
        // This thread's own buffers go unchecked: it is about to die with them (the op it
        // launches on its own buffer included).
        let pending: u64 = self.own.iter().map(|t| t.unchecked_ops).sum();
        self.tally().unverified(pending + u64::from(!on_shared));
        // The pool gets the stream back when the thread's locals are destroyed.
        self.release_ownership();
        if on_shared {
            let _ = self.launch_shared_buffer(step, 0, iters, false, true);
        } else if how == PanicHow::InsideSubmit {
            let name = self.name.clone();
            let Worker {
                own,
                window,
                stream,
                round,
                ..
            } = self;
            let t = &mut own[0];
            let _ = window.submit(|| {
                let ticket = stream.launch(k, &mut t.buf)?;
                t.applied(iters);
                round.tally.ops(1);
                round.submitted.fetch_add(1, Ordering::AcqRel);
                let _in_flight = ticket;
                std::panic::panic_any(InjectedPanic(format!(
                    "{name} inside Inflight::submit, after its launch"
                )));
            });
        } else {
            let _ = self.launch(step, 0, iters, false);
        }
        std::panic::panic_any(InjectedPanic(format!(
            "{} with {} ops in its window",
            self.name,
            self.window.outstanding()
        )));
    }

    /// The end of the thread's list: drain and check, or stop as the ending says.
    fn finish(mut self) -> Option<Vec<Tracked>> {
        let ending = self.round.plan.ending;
        self.release_ownership();
        match ending {
            Ending::ShutdownInFlight => {
                // Tickets dropped unwaited; the controller checks the buffers after the
                // pool and device are gone.
                self.slot.phase(Phase::Drop);
                drop(self.window);
                Some(std::mem::take(&mut self.own))
            }
            Ending::DropEverything => {
                self.slot.phase(Phase::Drop);
                for t in &self.own {
                    self.round.tally.unverified(t.unchecked_ops);
                }
                drop(self.window);
                None
            }
            _ => {
                self.slot.phase(Phase::Drain);
                if let Err(e) = self.window.drain() {
                    self.tally()
                        .error(format!("{} draining its window: {e}", self.name));
                    self.broken = true;
                }
                if self.broken {
                    for t in &self.own {
                        self.round.tally.unverified(t.unchecked_ops);
                    }
                    return None;
                }
                for b in 0..self.own.len() {
                    if self.check(b, self.plan.ops.len()).is_err() {
                        break;
                    }
                }
                None
            }
        }
    }
}

// The worker's fields the fault module uses.
impl<'a> Worker<'_, 'a> {
    fn fault_parts(&mut self) -> fault::Parts<'_, 'a> {
        fault::Parts {
            name: &self.name,
            idx: self.idx,
            round: self.round,
            pool: self.pool.as_ref(),
            stream: &self.stream,
            own: &mut self.own,
        }
    }
}
