//! `DeviceQueue`: coalescing on the device. With [`crate::CoalescePolicy::Persistent`] and a
//! backend that has a device queue ([`BackendDeviceQueue`], CUDA), an op is published
//! straight to a kernel that stays on the device while work arrives: no launch per op and no
//! host batcher. Concurrent ops from any threads run side by side in that one launch.
//!
//! Promises (the rest of the runtime relies on them):
//! - **Stream order.** An op names as dependencies the previous op of its stream and the
//!   previous queued op on its buffer; the device starts it only after both completed. So ops
//!   of one stream run one after another, in order, and ops on one buffer are never reordered
//!   or run together. Ops of different streams on different buffers run concurrently.
//! - **Buffers.** A buffer with a queued op is used for nothing else (another stream, a copy,
//!   its own drop) until that op completed: [`crate::Buffer`] waits for it first. A buffer
//!   coming from an ordinary stream has that stream synchronized before its first queued op.
//! - **Waiting** costs a memory load per poll. Now and then (every [`CHECK_EVERY`]) a waiter
//!   also asks the device whether the queue failed, so a device fault returns an error instead
//!   of hanging, and restarts the queue's kernel if it left while ops were outstanding.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam::utils::CachePadded;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{BackendBuffer, BackendDeviceQueue, WaitPolicy};
use crate::error::Result;
use crate::kernel::Kernel;

use super::Device;

/// How often a waiter checks the device for faults (and the queue's kernel for an exit).
pub const CHECK_EVERY: Duration = Duration::from_micros(100);

/// How long a waiter with wait policy `spin` polls without yielding its CPU: an op's round
/// trip through the queue is a few tens of microseconds, and a yield in the middle of it
/// costs a system call (more where other threads want the core) before the completion is
/// seen. Past this, the waiter yields between polls. `MULTIQ_QUEUE_SPIN_US` overrides it
/// (diagnostics; 0 yields from the first poll, as policy `yield` does).
pub const SPIN_FOR: Duration = Duration::from_micros(200);

/// Whether a spinning waiter executes the CPU's spin-wait hint (x86 `pause`) between polls;
/// `MULTIQ_QUEUE_PAUSE=off` polls without it (diagnostics: in a virtual machine a long run of
/// `pause` can make the hypervisor take the CPU away, pause-loop exiting).
fn queue_pause() -> Result<bool> {
    let pause = crate::env_knob::read(
        "MULTIQ_QUEUE_PAUSE",
        crate::env_knob::SWITCH,
        crate::env_knob::switch,
    )?;
    Ok(pause.unwrap_or(true))
}

fn queue_spin_for() -> Result<Duration> {
    let us = crate::env_knob::read(
        "MULTIQ_QUEUE_SPIN_US",
        "a whole number of microseconds",
        |v| v.parse::<u64>().ok(),
    )?;
    Ok(us.map_or(SPIN_FOR, Duration::from_micros))
}

/// Ops of the pool's *other* streams in flight (tickets alive) from which a small op goes to
/// the queue rather than to a launch of its own (`MULTIQ_QUEUE_MIN_LOAD` overrides it;
/// diagnostics). Below it, one launch per op is faster: an op's round trip through the queue
/// is longer than a launch and a wait (measured on the H100: the queue passes one launch per
/// op from about 8 threads waiting for their own op; bench/results/h100/coalesce.md). The
/// stream's own ops do not count: they run one after another wherever they go, so only other
/// streams' work makes the queue's concurrency pay. (Counting them sent one thread with 8 ops
/// in flight through the queue, at 0.78 × one launch per op on the H200,
/// bench/results/h200/coalesce/26dd781/.)
pub const QUEUE_MIN_LOAD: usize = 8;

/// The largest op (elements) that may go to the queue: by default one that leaves room for
/// other ops ([`BackendDeviceQueue::fills_device`]); `MULTIQ_QUEUE_MAX_ELEMENTS` overrides it
/// (diagnostics: light ops fill the device, and whether they gain from the queue is measured
/// with it).
fn queue_max_elements(backend: &dyn BackendDeviceQueue) -> Result<usize> {
    let max = crate::env_knob::read(
        "MULTIQ_QUEUE_MAX_ELEMENTS",
        "a whole number of elements",
        |v| v.parse::<usize>().ok(),
    )?;
    Ok(max.unwrap_or_else(|| backend.fills_device().saturating_sub(1)))
}

fn queue_min_load() -> Result<usize> {
    let load = crate::env_knob::read("MULTIQ_QUEUE_MIN_LOAD", "a whole number of ops", |v| {
        v.parse::<usize>().ok()
    })?;
    Ok(load.unwrap_or(QUEUE_MIN_LOAD))
}

/// A pool's device queue.
pub(crate) struct DeviceQueue {
    backend: Arc<dyn BackendDeviceQueue>,
    wait: WaitPolicy,
    device_id: u64,
    /// Ops of the pool in flight: tickets alive, queued or launched alone. On a cache line of
    /// its own: every op of every thread adds and subtracts here.
    load: CachePadded<AtomicUsize>,
    min_load: usize,
    /// The largest op that may go to the queue (elements).
    max_elements: usize,
    /// How long a `spin` waiter polls before it yields between polls.
    spin_for: Duration,
    /// Whether a spinning waiter pauses (spin-wait hint) between polls.
    pause: bool,
    /// Whether small ops go to the queue while its kernel is on the device and another
    /// stream has an op in flight, whatever the load ([`DeviceQueue::admit`]).
    while_running: bool,
    /// Ops launched alone.
    direct: AtomicU64,
}

/// One op of the pool in flight, counted in the queue's load and its stream's until it is
/// given back ([`DeviceQueue::release`]; a ticket gives its token back when it goes). It
/// holds no reference: cloning an `Arc` of the queue per op would make every thread's op
/// touch one reference count.
#[must_use = "a load token must be given back with DeviceQueue::release"]
#[derive(Debug)]
pub(crate) struct LoadToken(());

/// An op counted in by [`DeviceQueue::admit`] and not yet submitted: gives its count back when
/// dropped (an error or a panic before the op was submitted), unless [`Admission::keep`] made
/// it the ticket's [`LoadToken`].
#[must_use = "an admission gives its count back when dropped"]
pub(crate) struct Admission<'a> {
    queue: &'a DeviceQueue,
    stream_load: &'a AtomicUsize,
    token: Option<LoadToken>,
}

impl Admission<'_> {
    /// The op was submitted: its count stays until the returned token is given back.
    pub(crate) fn keep(mut self) -> LoadToken {
        self.token.take().unwrap_or(LoadToken(()))
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.queue.release(token, self.stream_load);
        }
    }
}

impl DeviceQueue {
    /// The device's queue, or `None` where the backend has none.
    pub(crate) fn new(device: &Device) -> Result<Option<Arc<DeviceQueue>>> {
        let Some(backend) = device.backend().new_device_queue()? else {
            return Ok(None);
        };
        let min_load = queue_min_load()?;
        let max_elements = queue_max_elements(&*backend)?;
        let mut queue = DeviceQueue::on(
            backend,
            device.info().wait,
            device.id(),
            min_load,
            max_elements,
        );
        queue.spin_for = queue_spin_for()?;
        queue.pause = queue_pause()?;
        queue.while_running = crate::env_knob::queue_while_running()?;
        Ok(Some(Arc::new(queue)))
    }

    fn on(
        backend: Arc<dyn BackendDeviceQueue>,
        wait: WaitPolicy,
        device_id: u64,
        min_load: usize,
        max_elements: usize,
    ) -> Self {
        DeviceQueue {
            max_elements,
            spin_for: SPIN_FOR,
            pause: true,
            while_running: false,
            backend,
            wait,
            device_id,
            load: CachePadded::new(AtomicUsize::new(0)),
            min_load,
            direct: AtomicU64::new(0),
        }
    }

    pub(crate) fn device_id(&self) -> u64 {
        self.device_id
    }

    pub(crate) fn supports(&self, kernel: Kernel) -> bool {
        self.backend.supports(kernel)
    }

    /// Counts an op of `elements` elements in flight, on the stream whose ops in flight
    /// `stream_load` counts, and says whether it goes to the queue (`true`) or to a launch of
    /// its own: the queue only pays when other streams' ops keep the device busy and the op
    /// leaves room for theirs.
    pub(crate) fn admit<'a>(
        &'a self,
        elements: usize,
        stream_load: &'a AtomicUsize,
    ) -> (Admission<'a>, bool) {
        let before = self.load.fetch_add(1, Ordering::Relaxed);
        let own = stream_load.fetch_add(1, Ordering::Relaxed);
        let token = Admission {
            queue: self,
            stream_load,
            token: Some(LoadToken(())),
        };
        // Counters of concurrent submitters move meanwhile: a routing hint, never a
        // correctness matter (both paths keep every ordering promise).
        let others = before.saturating_sub(own);
        // While the queue's kernel holds the device, an op launched alone would wait for it
        // to give the device up (and make it leave, with the ops behind it waiting for the
        // relaunch): with `while_running`, such an op joins the queue instead, unless its
        // stream is the only one with work (then the kernel leaves and the stream's ops run
        // alone, as a lone thread's run best).
        let queued = elements <= self.max_elements
            && (others >= self.min_load
                || (self.while_running && others >= 1 && self.backend.kernel_running()));
        if !queued {
            self.direct.fetch_add(1, Ordering::Relaxed);
        }
        (token, queued)
    }

    /// Takes the op `token` counted out of the pool's load and its stream's (`stream_load`,
    /// the one it was admitted with).
    pub(crate) fn release(&self, token: LoadToken, stream_load: &AtomicUsize) {
        let LoadToken(()) = token;
        stream_load.fetch_sub(1, Ordering::Relaxed);
        self.load.fetch_sub(1, Ordering::Relaxed);
    }

    /// Ops launched alone so far.
    pub(crate) fn direct_ops(&self) -> u64 {
        self.direct.load(Ordering::Relaxed)
    }

    /// Publishes `kernel` over `raw` after ops `after`. See [`BackendDeviceQueue::submit`]
    /// for the caller's duty to keep `raw` alive and otherwise unused until the op completed.
    pub(crate) fn submit(
        &self,
        kernel: Kernel,
        raw: &dyn BackendBuffer,
        after: [u64; 2],
    ) -> Result<u64> {
        self.backend.submit(kernel, raw, after)
    }

    /// True once op `op` completed; the queue's error if the device failed.
    pub(crate) fn poll(&self, op: u64) -> Result<bool> {
        self.backend.is_done(op, true)
    }

    /// Waits until op `op` completed.
    pub(crate) fn wait(&self, op: u64) -> Result<()> {
        let mut polls = 0u32;
        let started = Instant::now();
        let mut checked = started;
        let mut spinning = self.wait == WaitPolicy::Spin && !self.spin_for.is_zero();
        loop {
            let mut check = false;
            if polls % 64 == 63 {
                let now = Instant::now();
                spinning &= now - started < self.spin_for;
                if now - checked >= CHECK_EVERY {
                    check = true;
                    checked = now;
                }
            }
            if self.backend.is_done(op, check)? {
                return Ok(());
            }
            polls = polls.wrapping_add(1);
            // Policy `yield` yields between polls from the first; `spin` after `spin_for`.
            if spinning {
                if self.pause {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Waits until every op published so far completed.
    pub(crate) fn synchronize(&self) -> Result<()> {
        let last = self.backend.published();
        // Ops complete out of order: each op still in the window is waited for.
        let first = last.saturating_sub(self.backend.window()).max(1);
        for op in first..=last {
            self.wait(op)?;
        }
        Ok(())
    }

    /// (kernel launches, ops published, ops chained).
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        (
            self.backend.launches(),
            self.backend.published(),
            self.backend.chained(),
        )
    }

    /// Why the queue's kernels left (see [`BackendDeviceQueue::exits`]).
    pub(crate) fn exits(&self) -> crate::backend::QueueExits {
        self.backend.exits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device queue for the host side's tests: its device holds 1,000 threads, nothing is
    /// ever published, and its completion check answers with `done(check)` (`check`: the
    /// device was asked too).
    struct Scripted<F>(F);

    impl<F: Fn(bool) -> Result<bool> + Send + Sync> BackendDeviceQueue for Scripted<F> {
        fn supports(&self, _: Kernel) -> bool {
            true
        }
        fn submit(&self, _: Kernel, _: &dyn BackendBuffer, _: [u64; 2]) -> Result<u64> {
            unreachable!("the tests publish nothing")
        }
        fn is_done(&self, _: u64, check: bool) -> Result<bool> {
            (self.0)(check)
        }
        fn published(&self) -> u64 {
            1
        }
        fn window(&self) -> u64 {
            1
        }
        fn launches(&self) -> u64 {
            1
        }
        fn fills_device(&self) -> usize {
            1000
        }
    }

    /// A queue whose ops are all done; only the routing is exercised.
    fn fake() -> Arc<dyn BackendDeviceQueue> {
        Arc::new(Scripted(|_| Ok(true)))
    }

    /// A queue whose completion check fails (a relaunch that did not succeed).
    fn failing() -> Arc<dyn BackendDeviceQueue> {
        Arc::new(Scripted(|_| {
            Err(crate::Error::Device {
                op: "device queue",
                message: "relaunch failed (test)".into(),
            })
        }))
    }

    #[test]
    fn a_buffer_whose_queued_op_cannot_be_waited_for_is_leaked_not_freed() {
        let device = crate::Device::cpu(1).unwrap();
        for (backend, freed) in [(fake(), true), (failing(), false)] {
            let q = Arc::new(DeviceQueue::on(
                backend,
                WaitPolicy::Spin,
                device.id(),
                QUEUE_MIN_LOAD,
                999,
            ));
            let mut buf = device.alloc(4).unwrap();
            let storage = Arc::downgrade(&buf.shared_raw());
            buf.set_queued(&q, 1);
            drop(buf);
            // Freed only once the op is known complete: the op may still run on the storage.
            assert_eq!(storage.upgrade().is_none(), freed);
        }
    }

    #[test]
    fn small_ops_go_to_the_queue_only_under_other_streams_load_and_large_ones_never() {
        let q = Arc::new(DeviceQueue::on(
            fake(),
            WaitPolicy::Spin,
            1,
            QUEUE_MIN_LOAD,
            999,
        ));
        let min = q.min_load;
        let streams: Vec<Arc<AtomicUsize>> = (0..=min).map(|_| Arc::default()).collect();
        // A quiet pool: every op alone, until `min` ops of other streams are in flight.
        let mut held: Vec<(LoadToken, &AtomicUsize)> = Vec::new();
        for (i, stream) in streams.iter().take(min).enumerate() {
            let (admission, queued) = q.admit(10, stream);
            assert!(!queued, "op {i} with {i} others in flight");
            held.push((admission.keep(), stream));
        }
        let (a, queued) = q.admit(10, &streams[min]);
        assert!(queued, "{min} others in flight");
        held.push((a.keep(), &streams[min]));
        // An op that fills the device is launched alone whatever the load.
        let (a, queued) = q.admit(1000, &streams[min]);
        assert!(!queued);
        held.push((a.keep(), &streams[min]));
        assert_eq!(q.load.load(Ordering::Relaxed), min + 2);
        assert_eq!(streams[min].load(Ordering::Relaxed), 2);
        assert_eq!(q.direct_ops(), min as u64 + 1);
        // Tickets going (waited or dropped) take their ops out of both loads.
        for (token, stream) in held {
            q.release(token, stream);
        }
        assert_eq!(q.load.load(Ordering::Relaxed), 0);
        assert!(streams.iter().all(|s| s.load(Ordering::Relaxed) == 0));
        let (a, queued) = q.admit(10, &streams[0]);
        assert!(!queued);
        q.release(a.keep(), &streams[0]);
    }

    /// A queue whose kernel is on the device while `running` is set.
    struct Running(std::sync::atomic::AtomicBool);

    impl BackendDeviceQueue for Running {
        fn supports(&self, _: Kernel) -> bool {
            true
        }
        fn submit(&self, _: Kernel, _: &dyn BackendBuffer, _: [u64; 2]) -> Result<u64> {
            unreachable!("the tests publish nothing")
        }
        fn is_done(&self, _: u64, _: bool) -> Result<bool> {
            Ok(true)
        }
        fn published(&self) -> u64 {
            1
        }
        fn window(&self) -> u64 {
            1
        }
        fn launches(&self) -> u64 {
            1
        }
        fn kernel_running(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
        fn fills_device(&self) -> usize {
            1000
        }
    }

    #[test]
    fn while_running_small_ops_join_a_kernel_on_the_device_unless_their_stream_is_alone() {
        let backend = Arc::new(Running(std::sync::atomic::AtomicBool::new(false)));
        for while_running in [false, true] {
            let mut q = DeviceQueue::on(backend.clone(), WaitPolicy::Spin, 1, QUEUE_MIN_LOAD, 999);
            q.while_running = while_running;
            let (one, other) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let route = |running: bool, stream: &AtomicUsize, elements: usize| {
                backend.0.store(running, Ordering::Relaxed);
                let (a, queued) = q.admit(elements, stream);
                (a.keep(), queued)
            };
            // Alone in the pool: launched alone, kernel or not (it leaves, and a lone
            // stream's ops run best alone).
            let (alone, queued) = route(true, &one, 10);
            assert!(!queued);
            // Another stream's op in flight (below the load rule's 8): joins the kernel only
            // with the switch on and only while the kernel is on the device.
            let (a, queued) = route(true, &other, 10);
            assert_eq!(queued, while_running);
            q.release(a, &other);
            let (a, queued) = route(false, &other, 10);
            assert!(!queued, "no kernel on the device");
            q.release(a, &other);
            // An op that fills the device is launched alone whatever runs.
            let (a, queued) = route(true, &other, 1000);
            assert!(!queued);
            q.release(a, &other);
            q.release(alone, &one);
            assert_eq!(q.load.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn a_streams_own_ops_never_send_it_to_the_queue() {
        let q = Arc::new(DeviceQueue::on(
            fake(),
            WaitPolicy::Spin,
            1,
            QUEUE_MIN_LOAD,
            999,
        ));
        let (one, other) = (AtomicUsize::new(0), AtomicUsize::new(0));
        // One stream with many ops in flight (a thread with a deep window) launches alone...
        let mut held: Vec<LoadToken> = Vec::new();
        for i in 0..3 * q.min_load {
            let (admission, queued) = q.admit(10, &one);
            assert!(!queued, "own op {i} in flight");
            held.push(admission.keep());
        }
        // ... while they make the queue pay for another stream.
        let (a, queued) = q.admit(10, &other);
        assert!(queued);
        q.release(a.keep(), &other);
        for token in held {
            q.release(token, &one);
        }
        assert_eq!(q.load.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_op_that_fails_before_it_is_submitted_gives_its_load_back() {
        let q = Arc::new(DeviceQueue::on(
            fake(),
            WaitPolicy::Spin,
            1,
            QUEUE_MIN_LOAD,
            999,
        ));
        let stream = AtomicUsize::new(0);
        for _ in 0..3 * q.min_load {
            // An error (or a panic) between admission and submission drops the admission.
            let (admission, _) = q.admit(10, &stream);
            drop(admission);
        }
        assert_eq!(q.load.load(Ordering::Relaxed), 0);
        assert_eq!(stream.load(Ordering::Relaxed), 0);
        // So a quiet pool still launches a lone op alone.
        let (admission, queued) = q.admit(10, &stream);
        assert!(!queued);
        drop(admission);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _admission = q.admit(10, &stream);
            panic!("between admission and submission");
        }));
        assert!(unwound.is_err());
        assert_eq!(q.load.load(Ordering::Relaxed), 0);
    }

    /// Every way of waiting (policy spin or yield, spinning 0 or 200 µs before yielding, with
    /// or without the spin-wait hint) returns once the op is done, and a device fault reaches
    /// the waiter instead of a hang: the device is asked every `CHECK_EVERY` however it waits.
    #[test]
    fn every_way_of_waiting_returns_when_done_and_reports_a_fault() {
        for policy in [WaitPolicy::Spin, WaitPolicy::Yield] {
            for spin_for in [Duration::ZERO, SPIN_FOR] {
                for pause in [true, false] {
                    for fault in [false, true] {
                        // Done at the 5,000th poll, or failing at the first device check.
                        let polls = Arc::new(AtomicU64::new(0));
                        let checks = Arc::new(AtomicU64::new(0));
                        let (p, c) = (polls.clone(), checks.clone());
                        let slow = Arc::new(Scripted(move |check| {
                            if check {
                                c.fetch_add(1, Ordering::Relaxed);
                                if fault {
                                    return Err(crate::Error::Device {
                                        op: "device queue",
                                        message: "fault (test)".into(),
                                    });
                                }
                            }
                            Ok(p.fetch_add(1, Ordering::Relaxed) + 1 >= 5_000 && !fault)
                        }));
                        let mut q = DeviceQueue::on(slow, policy, 1, QUEUE_MIN_LOAD, 999);
                        q.spin_for = spin_for;
                        q.pause = pause;
                        let waited = q.wait(1);
                        let case = format!("{policy:?} spin {spin_for:?} pause {pause}");
                        assert_eq!(waited.is_err(), fault, "{case}");
                        if fault {
                            assert_eq!(checks.load(Ordering::Relaxed), 1, "{case}");
                        } else {
                            assert!(polls.load(Ordering::Relaxed) >= 5_000, "{case}");
                        }
                    }
                }
            }
        }
    }
}
