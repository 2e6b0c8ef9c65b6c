//! `OpRing`: the host side of a device queue — threads publish ops into a ring of slots that
//! a kernel on the device reads, runs, and marks done; the kernel leaves when idle and is
//! relaunched when ops arrive (the CUDA device queue, `backend::cuda::queue`).
//!
//! Memory the device reads and writes (the slots, their done words, the exit record) is the
//! [`RingDevice`]'s; this module decides which slot an op takes, when a slot may be written
//! again, and when a kernel must be launched.
//!
//! Invariants (checked by the loom models below, with the device as a model thread):
//! - **Claim.** Op numbers (tickets) 1, 2, … are taken with one atomic add, so each is taken
//!   by exactly one thread; ticket `t` uses slot `t % slots`.
//! - **Reuse only after done.** Ticket `t` writes its slot only after the slot's done word
//!   reached `t - slots` (the op before it in that slot completed), so a slot is never
//!   overwritten while the device may still read it. Done words only grow.
//! - **Publish.** The op is written into its slot and published as its ticket (release): a
//!   device that reads the ticket there (acquire) reads the op. Between
//!   taking a ticket and publishing it nothing can fail or panic without publishing: every
//!   later op of the ring waits for it, so a failed wait publishes a no-op instead.
//! - **A kernel runs while ops are outstanding.** The kernel leaves when it finds nothing
//!   published, or when it gives the device up to other kernels (then with ops published
//!   after the ones it took), recording `{first ticket not taken, its epoch}`. Every
//!   submitter, after publishing, every waiter that sees the exit record of the kernel
//!   believed running ([`OpRing::is_done`]; only if the lock below is free, else it polls
//!   on), and every waiter now and then (`check`: also with no kernel believed running,
//!   after a failed launch), calls [`OpRing::ensure_running`]:
//!   under one lock, if the kernel believed running has
//!   left (the exit record carries its epoch) it is forgotten, and if tickets were taken
//!   from its exit point on, a new kernel (next epoch) is launched from there. A kernel can
//!   leave just after a submitter saw it running: the waiters' checks then relaunch it, so no
//!   waiter waits for ever on an op published to a kernel that had left.
//! - **A lost op breaks the ring.** A failed wait for a slot (the device failed, or a
//!   relaunch did) still publishes its no-op, over an op that has not completed: that op is
//!   lost. From it on no op reports done (its slot's done word could pass it through the
//!   no-op) and no new op is taken: each gets [`RingDevice::lost`], never a false success.
//! - **Stop.** [`OpRing::stop`] publishes a stop op and, relaunching as needed, waits until a
//!   kernel left at that op with no kernel running after it.

use crossbeam::utils::CachePadded;

use super::{AtomicU64, Mutex, MutexGuard, Ordering};

/// Polls between checks of a thread waiting for a slot to be free (fewer under loom, so the
/// models reach a check).
#[cfg(not(loom))]
const SLOT_CHECK_POLLS: u32 = 256;
#[cfg(loom)]
const SLOT_CHECK_POLLS: u32 = 2;

/// The device side of an [`OpRing`]: the memory the device shares with the host, and the
/// device's kernel launches.
pub trait RingDevice {
    /// One op's fields.
    type Op;
    /// Why the device failed.
    type Error;

    /// Writes `op` (or, if `nop`, a no-op with the same fields) into slot `index` and
    /// publishes it as ticket `t` (release): a device that sees `t` there sees the op. (The
    /// CUDA queue tags every word of the slot with `t`'s lap; the model below uses a
    /// sequence word written last.)
    fn write(&self, index: usize, t: u64, op: &Self::Op, nop: bool);
    /// Slot `index`'s done word (acquire): the ticket of the last op completed in it.
    fn done(&self, index: usize) -> u64;
    /// `(ticket, epoch)` of the last kernel that left: the first ticket it did not take.
    fn exit_record(&self) -> (u64, u64);
    /// Launches the kernel of epoch `epoch`, taking ops from ticket `start` on; it runs after
    /// every kernel launched before it has left.
    fn launch(&self, epoch: u64, start: u64) -> Result<(), Self::Error>;
    /// The device's error, if it failed.
    fn failed(&self) -> Result<(), Self::Error>;
    /// The error of every op from ticket `op` on once `op` was lost: a wait for its slot
    /// failed, so a later op's no-op overwrote it unrun.
    fn lost(&self, op: u64) -> Self::Error;
    /// Waits until every kernel launched so far has left.
    fn synchronize(&self) -> Result<(), Self::Error>;
}

/// Which kernel runs, from which op.
#[derive(Debug)]
struct Runner {
    /// Launches so far; the running kernel's epoch when `running`.
    epoch: u64,
    running: bool,
    /// The first op the next kernel starts from.
    start: u64,
}

/// Tickets, slots and kernel launches of one device queue (see the module doc).
#[derive(Debug)]
pub struct OpRing {
    /// Slots of the ring (a power of two).
    slots: u64,
    /// The next ticket to hand out (tickets are 1, 2, …). On a cache line of its own: every
    /// submission takes a ticket, and every submission also reads `live_epoch`.
    next: CachePadded<AtomicU64>,
    /// Epoch of the kernel believed running (0: none): the submitters' lock-free check.
    live_epoch: AtomicU64,
    /// The first op overwritten by a failed wait's no-op before it completed (`u64::MAX`:
    /// none). From it on the ring is broken (that op may never run, and a kernel relaunched
    /// from before it looks for it in its slot for ever), so every op from it on, and every
    /// later submission, fails with [`RingDevice::lost`] (conservatively: some may have run).
    lost: AtomicU64,
    runner: Mutex<Runner>,
}

impl OpRing {
    /// A ring of `slots` slots (a power of two), nothing published, no kernel running.
    pub fn new(slots: u64) -> Self {
        debug_assert!(slots.is_power_of_two());
        OpRing {
            slots,
            next: CachePadded::new(AtomicU64::new(1)),
            live_epoch: AtomicU64::new(0),
            lost: AtomicU64::new(u64::MAX),
            runner: Mutex::new(Runner {
                epoch: 0,
                running: false,
                start: 1,
            }),
        }
    }

    fn index(&self, t: u64) -> usize {
        (t % self.slots) as usize
    }

    /// Publishes `op` and makes sure a kernel will run it; returns its ticket. Once `op` is
    /// published its ticket is returned even if no kernel could be launched now: the op is in
    /// the ring and runs when a kernel does, so its submitter must keep its buffer for it, and
    /// waiting for it retries the launch and returns the device's error.
    pub fn submit<D: RingDevice>(&self, device: &D, op: &D::Op) -> Result<u64, D::Error> {
        let lost = self.lost.load(Ordering::Acquire);
        if lost != u64::MAX {
            return Err(device.lost(lost));
        }
        let t = self.publish(device, op)?;
        // A failed launch leaves `running` false: the waiters' checks launch again (and
        // report the error if it persists).
        let _ = self.ensure_running(device);
        Ok(t)
    }

    /// Takes a ticket, waits until its slot is free, writes `op` and publishes it. Never
    /// returns between taking the ticket and publishing it: if waiting fails (the device
    /// failed), a no-op is published and the error returned.
    fn publish<D: RingDevice>(&self, device: &D, op: &D::Op) -> Result<u64, D::Error> {
        let t = self.next.fetch_add(1, Ordering::AcqRel);
        let mut freed = Ok(());
        if t > self.slots {
            let previous = t - self.slots;
            let mut spins = 0u32;
            loop {
                match self.is_done(
                    device,
                    previous,
                    spins % SLOT_CHECK_POLLS == SLOT_CHECK_POLLS - 1,
                ) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => {
                        freed = Err(e);
                        break;
                    }
                }
                spins = spins.wrapping_add(1);
                if spins > 64 {
                    super::yield_now();
                } else {
                    super::spin_hint();
                }
            }
        }
        if freed.is_err() {
            // Slot `t - slots` still holds an op that has not completed, and the no-op below
            // overwrites it: that op never runs, and nothing from it on completes.
            self.lost.fetch_min(t - self.slots, Ordering::AcqRel);
        }
        device.write(self.index(t), t, op, freed.is_err());
        freed?;
        Ok(t)
    }

    /// True once op `op` completed. Relaunches the kernel if it left with ops outstanding; with
    /// `check`, also when no kernel is believed running (a failed launch), and returns the
    /// device's error if it failed.
    pub fn is_done<D: RingDevice>(
        &self,
        device: &D,
        op: u64,
        check: bool,
    ) -> Result<bool, D::Error> {
        // `lost` is read after the done word: the no-op that overwrote a lost op can lift
        // its slot's done word past it, and `lost` was set before that no-op was written,
        // so a done word that passed the op shows the loss with it.
        let done = device.done(self.index(op)) >= op;
        let lost = self.lost.load(Ordering::Acquire);
        if op >= lost {
            return Err(device.lost(lost));
        }
        if done {
            return Ok(true);
        }
        if check {
            device.failed()?;
            self.ensure_running(device)?;
        } else if self.kernel_left(device) {
            // The kernel left with ops outstanding (it gave the device up, or an idle exit
            // raced a publication): relaunched now, not at the next check. A failed relaunch
            // is left to the checks to report (here it would fail a slot wait, which breaks the
            // ring: a lost op). Only if the runner lock is free: every waiter sees the exit at
            // once, and one relaunch is enough; the others poll on instead of queueing on the
            // lock (where they would sleep, and wake one by one, after the relaunch). Their
            // checks and every submitter still take the lock.
            if let Some(runner) = self.runner.try_lock() {
                let _ = self.relaunch_if_left(device, runner);
            }
        }
        Ok(false)
    }

    /// Whether a kernel is on the device now: launched and not yet recorded leaving (two loads;
    /// no lock). A hint: it may leave the moment after.
    pub fn kernel_on_device<D: RingDevice>(&self, device: &D) -> bool {
        let live = self.live_epoch.load(Ordering::Acquire);
        live != 0 && device.exit_record().1 != live
    }

    /// Whether the kernel believed running has left (two loads; no lock).
    fn kernel_left<D: RingDevice>(&self, device: &D) -> bool {
        let live = self.live_epoch.load(Ordering::Acquire);
        live != 0 && device.exit_record().1 == live
    }

    /// Makes sure a kernel will run every published op: relaunches from the exit point when
    /// the last kernel left and tickets were taken since.
    fn ensure_running<D: RingDevice>(&self, device: &D) -> Result<(), D::Error> {
        let live = self.live_epoch.load(Ordering::Acquire);
        if live != 0 && device.exit_record().1 != live {
            return Ok(());
        }
        self.relaunch_if_left(device, self.runner.lock())
    }

    /// [`OpRing::ensure_running`] under the runner lock `r`.
    fn relaunch_if_left<D: RingDevice>(
        &self,
        device: &D,
        mut r: MutexGuard<'_, Runner>,
    ) -> Result<(), D::Error> {
        if r.running {
            let (ticket, epoch) = device.exit_record();
            if epoch != r.epoch {
                return Ok(());
            }
            r.running = false;
            r.start = ticket;
            self.live_epoch.store(0, Ordering::Release);
        }
        let taken = self.next.load(Ordering::Acquire) - 1;
        if taken < r.start {
            return Ok(());
        }
        let epoch = r.epoch + 1;
        device.launch(epoch, r.start)?;
        r.epoch = epoch;
        r.running = true;
        self.live_epoch.store(epoch, Ordering::Release);
        Ok(())
    }

    /// Tickets taken so far (the last one).
    pub fn published(&self) -> u64 {
        self.next.load(Ordering::Acquire) - 1
    }

    /// Kernels launched so far.
    pub fn launches(&self) -> u64 {
        self.runner.lock().epoch
    }

    /// Publishes `stop` (an op the kernel leaves at without running it) and waits until a
    /// kernel took it; true once no kernel of this ring runs or will run, false if the device
    /// failed (a kernel might still read the ring). Bounded: each round either ends at the
    /// stop op or relaunches from a later op.
    pub fn stop<D: RingDevice>(&self, device: &D, stop: &D::Op) -> bool {
        let Ok(stop) = self.publish(device, stop) else {
            return false;
        };
        for _ in 0..self.slots + 2 {
            if self.ensure_running(device).is_err() || device.synchronize().is_err() {
                return false;
            }
            if device.exit_record().0 == stop {
                return true;
            }
        }
        false
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::Condvar;
    use loom::sync::Arc;
    use std::collections::VecDeque;

    /// What a slot's op field holds for the stop op.
    const STOP: u64 = u64::MAX;
    /// What it holds for a no-op.
    const NOP: u64 = u64::MAX - 1;
    /// Idle exits the model's kernels make at most.
    const IDLE_EXITS: u32 = 2;

    /// Kernel launches not yet run, and the device thread's state.
    #[derive(Default)]
    struct Stream {
        /// `(epoch, start)` of each launched kernel not started yet, in launch order.
        queued: VecDeque<(u64, u64)>,
        /// Kernels launched and kernels that left.
        launched: u64,
        left: u64,
        /// The model is over: the device thread returns once the stream is empty.
        shut: bool,
        /// Idle exits the kernels may still make (see [`FakeDevice::run_kernel`]).
        idle_exits: u32,
        /// Times a kernel may still give the device up (leave with the next op published,
        /// as the CUDA kernel does when another kernel asks for the device).
        yields: u32,
        /// Changes of the device's state (publications, completions, launches, exits), for
        /// the model's waiters (see [`wait`]).
        changes: u64,
    }

    /// The model's device: a ring in "host memory" (loom atomics) and a stream of kernel
    /// launches that one device thread runs in order, as kernels of one stream run.
    struct FakeDevice {
        /// Per slot: the published ticket, the op (its value), the done word.
        seq: Vec<AtomicU64>,
        op: Vec<AtomicU64>,
        done: Vec<AtomicU64>,
        /// `{ticket, epoch}` of the last kernel that left.
        exit: [AtomicU64; 2],
        stream: Mutex<Stream>,
        changed: Condvar,
        /// `(ticket, op value)` of every op the device ran, in order.
        ran: Mutex<Vec<(u64, u64)>>,
        /// Launches that fail (the first ones) before launches succeed.
        failing_launches: AtomicU64,
        /// Whether kernels give the device up (`Stream::yields` times, each after running
        /// at least one op).
        yielding: bool,
    }

    impl FakeDevice {
        fn new(slots: usize, failing_launches: u64, yields: u32) -> Self {
            let words = || (0..slots).map(|_| AtomicU64::new(0)).collect();
            FakeDevice {
                seq: words(),
                op: words(),
                done: words(),
                exit: [AtomicU64::new(0), AtomicU64::new(0)],
                stream: Mutex::new(Stream {
                    idle_exits: IDLE_EXITS,
                    yields,
                    ..Stream::default()
                }),
                changed: Condvar::new(),
                ran: Mutex::new(Vec::new()),
                failing_launches: AtomicU64::new(failing_launches),
                yielding: yields > 0,
            }
        }

        /// One kernel, as `queue_kernel.cu`'s dispatcher: takes published ops in ticket order
        /// from `start`, runs each and writes its done word; leaves, recording where, at the
        /// stop op or when the next ticket is not published. The real kernel leaves after
        /// `IDLE_EXIT` without a publication, which can fall at any moment; this one leaves
        /// as soon as it finds the next ticket unpublished (before it sees a publication that
        /// is already under way, or after a submitter saw it running), `IDLE_EXITS` times in
        /// all, and then waits for publications: a bound on idle exits, as the preemption
        /// bound is one on preemptions, without which loom could starve a submitter between
        /// taking its ticket and publishing it while a waiter and the kernel relaunch and
        /// leave for ever.
        fn run_kernel(&self, epoch: u64, start: u64) {
            let slots = self.seq.len() as u64;
            let mut t = start;
            loop {
                let i = (t % slots) as usize;
                if self.yielding && t > start {
                    // Gives the device up whether or not op `t` is published.
                    let mut s = self.stream.lock();
                    if s.yields > 0 {
                        s.yields -= 1;
                        break;
                    }
                }
                if self.seq[i].load(Ordering::Acquire) != t {
                    let mut s = self.stream.lock();
                    if s.idle_exits > 0 {
                        s.idle_exits -= 1;
                        break;
                    }
                    while self.seq[i].load(Ordering::Acquire) != t {
                        s = self.changed.wait(s);
                    }
                    continue;
                }
                let op = self.op[i].load(Ordering::Relaxed);
                if op == STOP {
                    break;
                }
                self.ran.lock().push((t, op));
                self.done[i].store(t, Ordering::Release);
                self.bump();
                t += 1;
            }
            self.exit[0].store(t, Ordering::Relaxed);
            self.exit[1].store(epoch, Ordering::Release);
        }

        /// Records a change of the device's state and wakes whoever waits for one.
        fn bump(&self) {
            self.stream.lock().changes += 1;
            self.changed.notify_all();
        }

        /// The device thread: runs launched kernels one after another until shut down.
        fn run(&self) {
            let mut s = self.stream.lock();
            loop {
                if let Some((epoch, start)) = s.queued.pop_front() {
                    drop(s);
                    self.run_kernel(epoch, start);
                    s = self.stream.lock();
                    s.left += 1;
                    s.changes += 1;
                    self.changed.notify_all();
                } else if s.shut {
                    return;
                } else {
                    s = self.changed.wait(s);
                }
            }
        }
    }

    impl RingDevice for FakeDevice {
        type Op = u64;
        type Error = ();

        fn write(&self, index: usize, t: u64, op: &u64, nop: bool) {
            self.op[index].store(if nop { NOP } else { *op }, Ordering::Relaxed);
            self.seq[index].store(t, Ordering::Release);
            // Wakes a kernel waiting for publications (after its idle exits).
            self.bump();
        }

        fn done(&self, index: usize) -> u64 {
            self.done[index].load(Ordering::Acquire)
        }

        fn exit_record(&self) -> (u64, u64) {
            let epoch = self.exit[1].load(Ordering::Acquire);
            (self.exit[0].load(Ordering::Acquire), epoch)
        }

        fn launch(&self, epoch: u64, start: u64) -> Result<(), ()> {
            let mut s = self.stream.lock();
            let failing = self.failing_launches.load(Ordering::Relaxed);
            if failing > 0 {
                // Nothing is queued; the change wakes waiters to check (and relaunch) again.
                self.failing_launches.store(failing - 1, Ordering::Relaxed);
                s.changes += 1;
                self.changed.notify_all();
                return Err(());
            }
            s.queued.push_back((epoch, start));
            s.launched += 1;
            s.changes += 1;
            self.changed.notify_all();
            Ok(())
        }

        fn failed(&self) -> Result<(), ()> {
            Ok(())
        }

        fn lost(&self, _op: u64) {}

        fn synchronize(&self) -> Result<(), ()> {
            let mut s = self.stream.lock();
            while s.left < s.launched {
                s = self.changed.wait(s);
            }
            Ok(())
        }
    }

    /// A waiter of op `t`: a plain poll (which relaunches a kernel that left), then a check
    /// (which also launches one after a failed launch and reports a fault; the real waiters
    /// check every `CHECK_EVERY`: how often is timing, not protocol). It polls again after
    /// each change of the device's state rather than spinning: the real waiters spin,
    /// yielding, but under loom two spinning threads can starve the device thread for ever.
    /// A failed relaunch is the waiter's error (the real waiter returns it); this one waits
    /// on, as a caller waiting again would.
    fn wait(ring: &OpRing, device: &FakeDevice, t: u64) {
        loop {
            let seen = device.stream.lock().changes;
            if ring.is_done(device, t, false) == Ok(true)
                || ring.is_done(device, t, true) == Ok(true)
            {
                return;
            }
            let mut s = device.stream.lock();
            while s.changes == seen {
                s = device.changed.wait(s);
            }
        }
    }

    /// The model: the main thread submits the ops `main` (all, then waits for each), while
    /// another thread, if `other` is not empty, does the same with its ops; then the ring is
    /// stopped. Every op ran exactly once, with the value its submitter wrote, in ticket
    /// order; every waiter returned; the stop op ended the last kernel.
    fn check(slots: u64, main: &'static [u64], other: &'static [u64], preemptions: usize) {
        check_device(slots, main, other, preemptions, 0, 0);
    }

    /// As [`check`], with the first `failing_launches` kernel launches failing.
    fn check_failing(
        slots: u64,
        main: &'static [u64],
        other: &'static [u64],
        preemptions: usize,
        failing_launches: u64,
    ) {
        check_device(slots, main, other, preemptions, failing_launches, 0);
    }

    /// As [`check`], with the first `failing_launches` kernel launches failing and kernels
    /// giving the device up `yields` times.
    fn check_device(
        slots: u64,
        main: &'static [u64],
        other: &'static [u64],
        preemptions: usize,
        failing_launches: u64,
        yields: u32,
    ) {
        fn submit_and_wait(ring: &OpRing, device: &FakeDevice, ops: &[u64]) -> Vec<(u64, u64)> {
            let tickets: Vec<(u64, u64)> = ops
                .iter()
                .map(|op| (ring.submit(device, op).unwrap(), *op))
                .collect();
            for &(t, _) in &tickets {
                wait(ring, device, t);
            }
            tickets
        }
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(preemptions);
        model.check(move || {
            let ring = Arc::new(OpRing::new(slots));
            let device = Arc::new(FakeDevice::new(slots as usize, failing_launches, yields));
            let runner = {
                let device = device.clone();
                loom::thread::spawn(move || device.run())
            };
            let helper = (!other.is_empty()).then(|| {
                let (ring, device) = (ring.clone(), device.clone());
                loom::thread::spawn(move || submit_and_wait(&ring, &device, other))
            });
            let mut mine = submit_and_wait(&ring, &device, main);
            if let Some(helper) = helper {
                mine.extend(helper.join().unwrap());
            }
            mine.sort_unstable();
            let ops = (main.len() + other.len()) as u64;
            assert!(ring.stop(&*device, &STOP), "the stop op was not taken");
            assert_eq!(device.exit_record().0, ops + 1);
            assert_eq!(
                *device.ran.lock(),
                mine,
                "an op was lost, run twice or overwritten"
            );
            {
                let mut s = device.stream.lock();
                assert!(s.queued.is_empty() && s.left == s.launched);
                s.shut = true;
            }
            device.changed.notify_all();
            runner.join().unwrap();
        });
    }

    /// One thread submits two ops back to back, then waits for each. The kernel leaves
    /// whenever it finds nothing published, so it can leave just after the submitter saw it
    /// running, without the second op: only the waiter's checks relaunch it then (without
    /// them, the waiter waits for ever).
    #[test]
    fn a_kernel_that_left_is_relaunched_for_its_waiter() {
        check(4, &[100, 101], &[], 3);
    }

    /// Two threads submit one op each: tickets are taken in one order and may be published
    /// in the other, and the kernel may leave at a ticket taken but not yet published.
    #[test]
    fn racing_submitters_each_get_their_op_run() {
        check(4, &[100], &[200], 2);
    }

    /// Two ops and the stop op through a ring of one slot: each must wait until the op
    /// before it in the slot is done before writing it (an early write would overwrite an
    /// op the device has not read, or hide its ticket), relaunching the kernel while it
    /// waits if need be.
    #[test]
    fn a_slot_is_reused_only_after_its_op_is_done() {
        check(1, &[100, 101], &[], 3);
    }

    /// As above with the two ops from two threads: a submitter waits for a slot whose op
    /// the other thread has not even published yet.
    #[test]
    fn racing_submitters_share_one_slot() {
        check(1, &[100], &[200], 2);
    }

    /// The submitter's launch fails (and so may the next): the op stays published with no
    /// kernel running, and the waiters' checks launch one once the device takes it. Every op
    /// still runs once, in order.
    #[test]
    fn a_failed_launch_is_retried_by_the_waiters() {
        check_failing(4, &[100], &[], 3, 2);
        check_failing(4, &[100], &[200], 2, 1);
    }

    /// A kernel gives the device up (another kernel asked for it) after running one op,
    /// whether the next is published or not: the ops left in the ring run in a relaunched
    /// kernel, each once, in order, and every waiter returns.
    #[test]
    fn a_kernel_that_gives_the_device_up_is_relaunched_for_the_ops_left() {
        check_device(4, &[100, 101, 102], &[], 2, 0, 1);
        check_device(4, &[100], &[200], 2, 0, 1);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A device that completes nothing and, once `failing`, reports a failure on every check.
    #[derive(Default)]
    struct Stuck {
        failing: AtomicBool,
        written: std::sync::Mutex<Vec<(u64, bool)>>,
    }

    impl RingDevice for Stuck {
        type Op = ();
        type Error = &'static str;

        fn write(&self, _index: usize, t: u64, _op: &(), nop: bool) {
            self.written.lock().unwrap().push((t, nop));
        }
        fn done(&self, _index: usize) -> u64 {
            0
        }
        fn exit_record(&self) -> (u64, u64) {
            (0, 0)
        }
        fn launch(&self, _epoch: u64, _start: u64) -> Result<(), &'static str> {
            Ok(())
        }
        fn failed(&self) -> Result<(), &'static str> {
            match self.failing.load(Ordering::Relaxed) {
                true => Err("relaunch failed"),
                false => Ok(()),
            }
        }
        fn lost(&self, _op: u64) -> &'static str {
            "lost"
        }
        fn synchronize(&self) -> Result<(), &'static str> {
            Ok(())
        }
    }

    #[test]
    fn an_op_overwritten_by_a_failed_waits_no_op_fails_from_it_on() {
        let ring = OpRing::new(2);
        let device = Stuck::default();
        assert_eq!(ring.submit(&device, &()), Ok(1));
        assert_eq!(ring.submit(&device, &()), Ok(2));
        assert_eq!(ring.is_done(&device, 1, true), Ok(false));
        // Ticket 3 needs op 1's slot; the wait fails, so a no-op goes over op 1.
        device.failing.store(true, Ordering::Relaxed);
        assert_eq!(ring.submit(&device, &()), Err("relaunch failed"));
        assert_eq!(*device.written.lock().unwrap().last().unwrap(), (3, true));
        // Op 1 never runs: it, every op after it and every new op fail, even once the device
        // answers again (op 1's slot now holds op 3's no-op).
        device.failing.store(false, Ordering::Relaxed);
        for op in 1..=3 {
            assert_eq!(ring.is_done(&device, op, false), Err("lost"), "op {op}");
        }
        assert_eq!(ring.submit(&device, &()), Err("lost"));
        assert_eq!(ring.published(), 3, "no ticket taken after the loss");
    }
}
