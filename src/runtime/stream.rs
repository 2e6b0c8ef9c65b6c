//! `Stream`: a pooled, in-order queue of device work, and `Ticket`: one submitted op's
//! completion.
//!
//! Submitting takes a pooled event, enters the stream's submission lock (per the pool's lock
//! mode), launches, records the event, and leaves the lock. Waiting happens outside any lock,
//! on the ticket's own event, so a waiting thread never blocks another thread's submission.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::coalescer::{Batch, CoalescerShared};
use super::device_queue::{DeviceQueue, LoadToken};
use super::event_pool::EventPool;
use super::live::{Kind, LiveToken};
use super::{Buffer, Device};
use crate::backend::{BackendEvent, BackendStream};
use crate::error::Result;
use crate::kernel::Kernel;
use crate::sync::submit_lock::SubmitLock;

/// The state one pool slot's stream shares among all handles to it.
pub(crate) struct StreamShared {
    /// The pool's coalescer, when coalescing is on.
    pub(crate) coalescer: Option<Arc<CoalescerShared>>,
    /// The pool's device queue, when coalescing is `persistent` on a backend that has one.
    pub(crate) device_queue: Option<Arc<DeviceQueue>>,
    /// The last op this stream published to the device queue (0: none); the next one runs
    /// after it. Changed only under the stream's submission lock.
    queued_last: AtomicU64,
    /// With a device queue: an op was launched on this stream itself since the last queued
    /// one, so the next queued op waits for the stream first (the queue's kernel is not
    /// ordered with it). Changed only under the stream's submission lock.
    launched_since_queued: AtomicBool,
    /// With a device queue: this stream's ops in flight (their tickets alive), so that the
    /// queue's routing counts only other streams' ops ([`DeviceQueue::admit`]).
    queue_load: AtomicUsize,
    /// With a coalescer: the batch of this stream's last coalesced op, until a launch on the
    /// stream itself waited for it (batches run on the coalescer's stream, not ordered with
    /// this one).
    last_coalesced: parking_lot::Mutex<Option<Arc<Batch>>>,
    /// With a coalescer: work was queued on this stream itself since its last coalesced op,
    /// so the next coalesced op waits for the stream first.
    launched_since_coalesced: AtomicBool,
    pub(crate) pool_id: u64,
    pub(crate) index: usize,
    pub(crate) device: Device,
    pub(crate) backend: Arc<dyn BackendStream>,
    pub(crate) lock: SubmitLock,
    events: EventPool,
    submitted: AtomicU64,
    _live: LiveToken,
}

impl StreamShared {
    pub(crate) fn new(
        pool_id: u64,
        index: usize,
        device: Device,
        lock: SubmitLock,
        coalescer: Option<Arc<CoalescerShared>>,
        device_queue: Option<Arc<DeviceQueue>>,
    ) -> Result<Self> {
        let backend = device.backend().new_stream()?;
        Ok(StreamShared {
            coalescer,
            device_queue,
            queued_last: AtomicU64::new(0),
            launched_since_queued: AtomicBool::new(false),
            queue_load: AtomicUsize::new(0),
            last_coalesced: parking_lot::Mutex::new(None),
            launched_since_coalesced: AtomicBool::new(false),
            pool_id,
            index,
            device,
            backend,
            lock,
            events: EventPool::new(),
            submitted: AtomicU64::new(0),
            _live: LiveToken::new(Kind::Stream),
        })
    }
}

/// A handle to one stream of a [`crate::StreamPool`]. Clones refer to the same stream.
///
/// In lock modes `global` and `per-stream` any thread may submit through any handle. In
/// `none`, only the thread that acquired the stream from the pool may submit; others get
/// [`crate::Error::ExclusiveStreamRequired`].
#[derive(Clone)]
pub struct Stream {
    pub(crate) shared: Arc<StreamShared>,
}

/// Counters of one stream, for tests and diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamStats {
    /// Ops submitted to this stream.
    pub submitted: u64,
    /// Events ever created for this stream (flat after warm-up: events are pooled).
    pub events_created: u64,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("index", &self.shared.index)
            .finish()
    }
}

impl Stream {
    /// The stream's index in its pool.
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// Submits `kernel` over `buf`. Returns at once with a ticket for the op's completion.
    pub fn launch(&self, kernel: Kernel, buf: &mut Buffer) -> Result<Ticket> {
        let s = &*self.shared;
        self.check_owner()?;
        // Adaptive coalescing launches ops alone (the path below, as with `Off`) while
        // coalescing does not pay.
        if let Some(c) = s.coalescer.as_ref().filter(|c| !c.launches_alone()) {
            // The lock mode still decides who may submit (lock `none`: the owner only).
            drop(s.lock.enter()?);
            // Stream order: work queued on this stream itself (`launch_many`, `matmul`)
            // completes before the coalesced op, which runs on the coalescer's stream.
            // (A load first: the common case, no direct work, writes nothing shared.)
            if s.launched_since_coalesced.load(Ordering::Acquire)
                && s.launched_since_coalesced.swap(false, Ordering::AcqRel)
            {
                if let Err(e) = s.backend.synchronize() {
                    s.launched_since_coalesced.store(true, Ordering::Release);
                    return Err(e);
                }
            }
            buf.bind(s.device.id(), c.stream())?;
            let batch = c.submit(kernel, buf.shared_raw(), Arc::as_ptr(&self.shared) as usize)?;
            {
                // The newest batch is kept: a later op of this stream always goes to a later
                // batch, but two threads sharing the stream may store out of order.
                let mut last = s.last_coalesced.lock();
                if !last.as_ref().is_some_and(|b| b.id() >= batch.id()) {
                    *last = Some(batch.clone());
                }
            }
            buf.set_coalesced(batch.clone());
            s.submitted.fetch_add(1, Ordering::Relaxed);
            return Ok(Ticket {
                stream: self.shared.clone(),
                kind: TicketKind::Coalesced(batch),
                load: None,
            });
        }
        if let Some(q) = s.device_queue.as_ref().filter(|q| q.supports(kernel)) {
            let (load, queued) = q.admit(buf.len(), &s.queue_load);
            if !queued {
                // Launched alone, on this stream, after the stream's queued ops.
                buf.bind(s.device.id(), &s.backend)?;
                let mut ticket = self.submit(1, |backend| backend.launch(kernel, buf.raw()))?;
                ticket.load = Some(load.keep());
                return Ok(ticket);
            }
            // Held across the publication, so `queued_last` is this stream's last op.
            let _guard = s.lock.enter()?;
            if s.launched_since_queued.swap(false, Ordering::Relaxed) {
                if let Err(e) = s.backend.synchronize() {
                    s.launched_since_queued.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
            let after_buffer = buf.bind_queue(q)?;
            let after_stream = s.queued_last.load(Ordering::Acquire);
            let op = q.submit(kernel, buf.raw(), [after_stream, after_buffer])?;
            s.queued_last.store(op, Ordering::Release);
            buf.set_queued(q, op);
            s.submitted.fetch_add(1, Ordering::Relaxed);
            return Ok(Ticket {
                stream: self.shared.clone(),
                kind: TicketKind::Queued(op),
                load: Some(load.keep()),
            });
        }
        buf.bind(s.device.id(), &s.backend)?;
        self.submit(1, |backend| backend.launch(kernel, buf.raw()))
    }

    /// Lock mode `none`: refuses a thread that does not own the stream before any buffer is
    /// bound to it, so a refused launch leaves its buffers as they were (bound to their own
    /// stream, not waiting on another thread's work later).
    pub(crate) fn check_owner(&self) -> Result<()> {
        if self.shared.lock.claim().is_some() {
            drop(self.shared.lock.enter()?);
        }
        Ok(())
    }

    /// One submission: a pooled event, the lock mode's guard, `enqueue`, the event's record.
    /// The event goes back to the pool if anything fails. With a device queue, the stream's
    /// queued ops complete first (the queue's kernel is not ordered with the stream), and the
    /// stream's next queued op will wait for this one.
    pub(crate) fn submit(
        &self,
        ops: u64,
        enqueue: impl FnOnce(&dyn crate::backend::BackendStream) -> Result<()>,
    ) -> Result<Ticket> {
        let s = &*self.shared;
        self.after_coalesced();
        let event = s.events.take(s.device.backend())?;
        let submitted = match s.lock.enter() {
            Ok(_guard) => self
                .after_queued()
                .and_then(|()| enqueue(&*s.backend))
                .inspect(|()| {
                    // Set once the work is queued (under the lock), so a coalesced launch
                    // that clears it synchronizes a stream that holds this work.
                    if s.coalescer.is_some() {
                        s.launched_since_coalesced.store(true, Ordering::Release);
                    }
                })
                .and_then(|()| s.backend.record(&*event)),
            Err(e) => Err(e),
        };
        match submitted {
            Ok(()) => {
                s.submitted.fetch_add(ops, Ordering::Relaxed);
                Ok(Ticket {
                    stream: self.shared.clone(),
                    kind: TicketKind::Event(Some(event)),
                    load: None,
                })
            }
            Err(e) => {
                s.events.give_back(event);
                Err(e)
            }
        }
    }

    /// With a coalescer: launches the stream's last coalesced op if it is pending and waits
    /// for it, so work queued on the stream itself runs after it (stream order; batches
    /// complete in launch order, so earlier ones are done too). A host wait: a thread that
    /// alternates the two paths loses their pipelining. The op's error, if any, is its own
    /// ticket's.
    fn after_coalesced(&self) {
        let s = &*self.shared;
        let Some(c) = &s.coalescer else {
            return;
        };
        let last = s.last_coalesced.lock().clone();
        if let Some(batch) = last {
            batch.ensure_launched();
            let _ = c.wait(&batch);
            // Forgotten only if no newer batch was stored meanwhile (another thread's).
            let mut newest = s.last_coalesced.lock();
            if newest.as_ref().is_some_and(|b| Arc::ptr_eq(b, &batch)) {
                *newest = None;
            }
        }
    }

    /// With a device queue: waits for the stream's last queued op and marks the stream as
    /// having work of its own. Called under the stream's submission lock.
    fn after_queued(&self) -> Result<()> {
        let s = &*self.shared;
        if let Some(q) = &s.device_queue {
            let last = s.queued_last.load(Ordering::Acquire);
            if last != 0 {
                q.wait(last)?;
            }
            s.launched_since_queued.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Submits `kernel` over every buffer of `bufs` as one grouped launch (batching by hand):
    /// one ticket completes when all of them are done. Each buffer's result equals launching
    /// it alone. The buffers must be distinct.
    pub fn launch_many(&self, kernel: Kernel, bufs: &mut [&mut Buffer]) -> Result<Ticket> {
        let s = &*self.shared;
        self.check_owner()?;
        for (i, b) in bufs.iter().enumerate() {
            if bufs[..i]
                .iter()
                .any(|o| std::ptr::addr_eq(o.raw(), b.raw()))
            {
                return Err(crate::Error::invalid(
                    "the same buffer appears twice in one grouped launch",
                ));
            }
        }
        // Refuse before binding any, so a refused launch leaves every buffer as it was.
        if bufs.iter().any(|b| b.device().id() != s.device.id()) {
            return Err(crate::Error::WrongDevice { what: "buffer" });
        }
        for b in bufs.iter_mut() {
            b.bind(s.device.id(), &s.backend)?;
        }
        let raws: Vec<&dyn crate::backend::BackendBuffer> = bufs.iter().map(|b| b.raw()).collect();
        self.submit(bufs.len() as u64, |backend| {
            backend.launch_grouped(kernel, &raws)
        })
    }

    /// Waits until all work submitted to this stream so far has completed (with coalescing
    /// on, everything the pool's coalescer launched too).
    pub fn synchronize(&self) -> Result<()> {
        if let Some(c) = &self.shared.coalescer {
            c.synchronize()?;
        }
        if let Some(q) = &self.shared.device_queue {
            // The stream's ops form a chain: the last one completes after all the others.
            let last = self.shared.queued_last.load(Ordering::Acquire);
            if last != 0 {
                q.wait(last)?;
            }
        }
        self.shared.backend.synchronize()
    }

    /// Counters of this stream.
    pub fn stats(&self) -> StreamStats {
        StreamStats {
            submitted: self.shared.submitted.load(Ordering::Relaxed),
            events_created: self.shared.events.created(),
        }
    }
}

/// The completion of one submitted op. Wait on it, poll it, or drop it: dropping neither
/// blocks nor leaks (the event goes back to its stream's pool).
#[must_use = "a ticket is the only way to know the op completed"]
pub struct Ticket {
    stream: Arc<StreamShared>,
    kind: TicketKind,
    /// With a device queue: this op counted in the pool's load until the ticket goes.
    load: Option<LoadToken>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match &self.kind {
            TicketKind::Event(_) => "event",
            TicketKind::Coalesced(_) => "coalesced",
            TicketKind::Queued(_) => "device queue",
        };
        f.debug_struct("Ticket")
            .field("completion", &how)
            .finish_non_exhaustive()
    }
}

enum TicketKind {
    /// The op's own event (taken from the stream's pool).
    Event(Option<Box<dyn BackendEvent>>),
    /// The coalesced batch the op is part of.
    Coalesced(Arc<Batch>),
    /// The op's number on the pool's device queue (the stream's).
    Queued(u64),
}

impl Ticket {
    /// Waits until the op (and everything before it on its stream) has completed. Errors the
    /// device reports for that work are returned here, to this thread.
    pub fn wait(mut self) -> Result<()> {
        match &mut self.kind {
            TicketKind::Event(event) => {
                let event = event.take().expect("a ticket holds its event until waited");
                let result = event.wait();
                self.stream.events.give_back(event);
                result
            }
            TicketKind::Coalesced(batch) => {
                let c = self
                    .stream
                    .coalescer
                    .as_ref()
                    .expect("coalesced tickets come from coalescing pools");
                c.wait(batch)
            }
            TicketKind::Queued(op) => {
                let op = *op;
                self.device_queue().wait(op)
            }
        }
    }

    /// True when the op has completed.
    pub fn is_complete(&self) -> Result<bool> {
        match &self.kind {
            TicketKind::Event(event) => event.as_ref().map_or(Ok(true), |e| e.is_complete()),
            TicketKind::Coalesced(batch) => self
                .stream
                .coalescer
                .as_ref()
                .expect("coalesced tickets come from coalescing pools")
                .poll(batch),
            TicketKind::Queued(op) => self.device_queue().poll(*op),
        }
    }
}

impl Ticket {
    /// The device queue of a queued op's stream.
    fn device_queue(&self) -> &DeviceQueue {
        self.stream
            .device_queue
            .as_ref()
            .expect("queued tickets come from streams with a device queue")
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(token) = self.load.take() {
            self.device_queue().release(token, &self.stream.queue_load);
        }
        if let TicketKind::Event(event) = &mut self.kind {
            if let Some(event) = event.take() {
                self.stream.events.give_back(event);
            }
        }
    }
}
