//! CPU streams and events.
//!
//! A stream is an [`OrderedQueue`] of tasks: at most one task of a stream runs at a time
//! (in-order execution). A stream with work waits for a turn in [`Units`]' ready queue
//! (FIFO); a turn runs its oldest task, then puts the stream at the back of the queue if more
//! are waiting, so streams take turns on the units in order, and no busy stream starves the
//! others. (The units' jobs do not name a stream: each takes the oldest ready one when it
//! runs, so the pool's own job order, LIFO on the worker that spawned the job, does not
//! decide whose turn it is.) An event is a (stream, sequence number) mark; it completes when
//! the stream's completed count reaches that number.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rayon::prelude::*;

use super::{cpu_buffer, BLOCK};
use crate::backend::{
    downcast, BackendBuffer, BackendEvent, BackendSignal, BackendStream, WaitPolicy,
};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::sync::ordered_queue::OrderedQueue;

type Task = Box<dyn FnOnce() + Send>;

/// The execution units: a pool of threads and the streams waiting for a turn on them.
pub(super) struct Units {
    pool: rayon::ThreadPool,
    /// Streams with work, oldest first: each has exactly one job spawned for it.
    ready: crossbeam::queue::SegQueue<Arc<StreamQueue>>,
}

impl Units {
    pub(super) fn new(pool: rayon::ThreadPool) -> Arc<Self> {
        Arc::new(Units {
            pool,
            ready: crossbeam::queue::SegQueue::new(),
        })
    }

    /// Puts `stream` at the back of the ready queue and spawns a job for one turn.
    fn schedule(self: &Arc<Self>, stream: Arc<StreamQueue>) {
        self.ready.push(stream);
        let me = self.clone();
        self.pool.spawn(move || me.run_turn());
    }

    /// One turn of the oldest ready stream. Every job follows one push, so there is one.
    fn run_turn(self: Arc<Self>) {
        if let Some(stream) = self.ready.pop() {
            stream.drain_one(&self);
        }
    }
}

/// The shared state of one CPU stream: its ordered queue and the units that drain it.
pub(super) struct StreamQueue {
    queue: OrderedQueue<Task>,
    units: Arc<Units>,
}

impl StreamQueue {
    fn push(self: &Arc<Self>, task: Task) {
        let (_, start) = self.queue.push(task);
        if start {
            self.units.schedule(self.clone());
        }
    }

    /// Runs one task, then puts the stream back in the ready queue, behind the other
    /// streams, if more wait.
    fn drain_one(self: Arc<Self>, units: &Arc<Units>) {
        let failed = self.queue.next().and_then(|task| {
            catch_unwind(AssertUnwindSafe(task)).err().map(|payload| {
                payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a CPU kernel panicked".into())
            })
        });
        if self.queue.complete(failed) {
            units.schedule(self);
        }
    }

    fn wait_for(&self, seq: u64, policy: WaitPolicy) -> Result<()> {
        self.queue
            .wait_for(seq, policy)
            .map_err(|message| Error::Device {
                op: "wait",
                message,
            })
    }

    pub(super) fn wait_all(&self, policy: WaitPolicy) -> Result<()> {
        self.wait_for(self.queue.submitted(), policy)
    }
}

/// Test hook: queues a task that panics on `stream` (a CPU stream), so the stream fails as a
/// CUDA stream does after a device fault: later work reports the failure, signals stop.
#[cfg(all(test, not(loom)))]
pub(crate) fn fail_for_testing(stream: &dyn BackendStream) {
    let cpu = stream
        .as_any()
        .downcast_ref::<CpuStream>()
        .expect("a CPU stream");
    cpu.queue
        .push(Box::new(|| panic!("injected CPU kernel failure (test)")));
}

/// A CPU stream handle.
pub(super) struct CpuStream {
    queue: Arc<StreamQueue>,
    wait: WaitPolicy,
}

impl CpuStream {
    pub(super) fn new(units: Arc<Units>, wait: WaitPolicy) -> Self {
        let queue = Arc::new(StreamQueue {
            queue: OrderedQueue::new(),
            units,
        });
        CpuStream { queue, wait }
    }

    pub(super) fn queue(&self) -> &Arc<StreamQueue> {
        &self.queue
    }
}

impl BackendStream for CpuStream {
    fn launch(&self, kernel: Kernel, buf: &dyn BackendBuffer) -> Result<()> {
        let data = cpu_buffer(buf)?.data.clone();
        self.queue.push(Box::new(move || {
            let mut data = data.write();
            match kernel {
                Kernel::SimpleCompute { .. } => data
                    .par_chunks_mut(BLOCK)
                    .for_each(|block| kernel.reference(block)),
            }
        }));
        Ok(())
    }

    fn launch_grouped(&self, kernel: Kernel, bufs: &[&dyn BackendBuffer]) -> Result<()> {
        let data: Vec<_> = bufs
            .iter()
            .map(|b| cpu_buffer(*b).map(|b| b.data.clone()))
            .collect::<Result<_>>()?;
        self.queue.push(Box::new(move || {
            data.par_iter().for_each(|d| {
                let mut d = d.write();
                d.par_chunks_mut(BLOCK)
                    .for_each(|block| kernel.reference(block));
            });
        }));
        Ok(())
    }

    fn upload(&self, buf: &dyn BackendBuffer, src: &[f32]) -> Result<()> {
        let buf = cpu_buffer(buf)?;
        self.synchronize()?;
        let mut data = buf.data.write();
        if data.len() != src.len() {
            return Err(Error::invalid(format!(
                "upload of {} elements into a buffer of {}",
                src.len(),
                data.len()
            )));
        }
        data.copy_from_slice(src);
        Ok(())
    }

    fn download(&self, buf: &dyn BackendBuffer, dst: &mut [f32]) -> Result<()> {
        let buf = cpu_buffer(buf)?;
        self.synchronize()?;
        let data = buf.data.read();
        if data.len() != dst.len() {
            return Err(Error::invalid(format!(
                "download of a buffer of {} elements into {}",
                data.len(),
                dst.len()
            )));
        }
        dst.copy_from_slice(&data);
        Ok(())
    }

    fn record(&self, event: &dyn BackendEvent) -> Result<()> {
        let ev = downcast::<CpuEvent>(event.as_any(), "event")?;
        *ev.mark.lock() = Some((self.queue.clone(), self.queue.queue.submitted()));
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.queue.wait_all(self.wait)
    }

    fn query(&self) -> Result<bool> {
        self.queue.queue.status().map_err(|message| Error::Device {
            op: "query",
            message,
        })
    }

    fn signal(&self, signal: &dyn BackendSignal, value: u64) -> Result<()> {
        let word = downcast::<CpuSignal>(signal.as_any(), "signal")?
            .word
            .clone();
        // The drain job holds the queue while a task runs, so the weak reference upgrades.
        let queue = Arc::downgrade(&self.queue);
        self.queue.push(Box::new(move || {
            // Like a CUDA stream, a failed stream writes nothing more.
            if queue.upgrade().is_some_and(|q| !q.queue.has_failed()) {
                word.store(value, Ordering::Release);
            }
        }));
        Ok(())
    }

    fn gemm(
        &self,
        spec: &crate::backend::GemmSpec,
        ops: &crate::backend::GemmOperands<'_>,
    ) -> Result<()> {
        self.queue
            .push(super::matmul::gemm_task(*spec, std::slice::from_ref(ops))?);
        Ok(())
    }

    fn gemm_batched(
        &self,
        spec: &crate::backend::GemmSpec,
        ops: &[crate::backend::GemmOperands<'_>],
    ) -> Result<()> {
        self.queue.push(super::matmul::gemm_task(*spec, ops)?);
        Ok(())
    }

    fn upload_at(&self, buf: &dyn BackendBuffer, offset: usize, src: &[f32]) -> Result<()> {
        let buf = cpu_buffer(buf)?;
        let end = range_end(offset, src.len(), buf.len)?;
        self.synchronize()?;
        buf.data.write()[offset..end].copy_from_slice(src);
        Ok(())
    }

    fn download_at(&self, buf: &dyn BackendBuffer, offset: usize, dst: &mut [f32]) -> Result<()> {
        let buf = cpu_buffer(buf)?;
        let end = range_end(offset, dst.len(), buf.len)?;
        self.synchronize()?;
        dst.copy_from_slice(&buf.data.read()[offset..end]);
        Ok(())
    }

    fn copy(
        &self,
        src: &dyn BackendBuffer,
        src_offset: usize,
        dst: &dyn BackendBuffer,
        dst_offset: usize,
        len: usize,
    ) -> Result<()> {
        let (src, dst) = (cpu_buffer(src)?, cpu_buffer(dst)?);
        let src_end = range_end(src_offset, len, src.len)?;
        let dst_end = range_end(dst_offset, len, dst.len)?;
        if Arc::ptr_eq(&src.data, &dst.data) {
            return Err(Error::invalid("a copy needs two distinct buffers"));
        }
        let (from, to) = (src.data.clone(), dst.data.clone());
        self.queue.push(Box::new(move || {
            to.write()[dst_offset..dst_end].copy_from_slice(&from.read()[src_offset..src_end]);
        }));
        Ok(())
    }

    fn free_after(&self, buf: Box<dyn BackendBuffer>) {
        // Queued tasks hold their own reference to the storage: dropping ours is enough.
        drop(buf);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The end of `len` elements from `offset` in a buffer of `size`, or an error.
fn range_end(offset: usize, len: usize, size: usize) -> Result<usize> {
    offset
        .checked_add(len)
        .filter(|&end| end <= size)
        .ok_or_else(|| {
            Error::invalid(format!(
                "a copy of {len} elements at offset {offset} does not fit a buffer of {size}"
            ))
        })
}

/// A CPU signal: a shared atomic word, written by a task queued on a stream.
pub(super) struct CpuSignal {
    word: Arc<AtomicU64>,
}

impl CpuSignal {
    pub(super) fn new() -> Self {
        CpuSignal {
            word: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl BackendSignal for CpuSignal {
    fn value(&self) -> u64 {
        self.word.load(Ordering::Acquire)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A CPU event: the stream and sequence number it was last recorded at.
pub(super) struct CpuEvent {
    mark: Mutex<Option<(Arc<StreamQueue>, u64)>>,
    wait: WaitPolicy,
}

impl CpuEvent {
    pub(super) fn new(wait: WaitPolicy) -> Self {
        CpuEvent {
            mark: Mutex::new(None),
            wait,
        }
    }
}

impl BackendEvent for CpuEvent {
    fn wait(&self) -> Result<()> {
        let mark = self.mark.lock().clone();
        match mark {
            Some((queue, seq)) => queue.wait_for(seq, self.wait),
            None => Ok(()),
        }
    }

    fn is_complete(&self) -> Result<bool> {
        match &*self.mark.lock() {
            // A failure at or before the mark is the event's, as `wait` reports it.
            Some((queue, seq)) => queue.queue.poll(*seq).map_err(|message| Error::Device {
                op: "wait",
                message,
            }),
            None => Ok(true),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
