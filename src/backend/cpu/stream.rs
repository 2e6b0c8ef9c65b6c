//! CPU streams and events.
//!
//! A stream is a FIFO of tasks. At most one task of a stream runs at a time (in-order
//! execution): a "drain" job on the unit pool runs the oldest task, then re-queues itself if
//! more are waiting, so streams take turns on the units instead of one busy stream starving
//! the others. An event is a (stream, sequence number) mark; it completes when the stream's
//! completed count reaches that number.

use std::any::Any;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use rayon::prelude::*;

use super::{cpu_buffer, BLOCK};
use crate::backend::{downcast, BackendBuffer, BackendEvent, BackendStream, WaitPolicy};
use crate::error::{Error, Result};
use crate::kernel::Kernel;

type Task = Box<dyn FnOnce() + Send>;

/// The shared state of one CPU stream.
pub(super) struct StreamQueue {
    state: Mutex<QueueState>,
    done: Condvar,
    /// Mirror of `QueueState::completed`, for lock-free polling by spinning waiters.
    completed: AtomicU64,
    pool: Arc<rayon::ThreadPool>,
}

struct QueueState {
    tasks: VecDeque<Task>,
    /// A drain job is queued or running.
    running: bool,
    submitted: u64,
    completed: u64,
    /// First failure: the sequence number of the task that failed and why. Sticky, as a CUDA
    /// stream's errors are: every wait covering that task reports it.
    failure: Option<(u64, String)>,
}

impl StreamQueue {
    fn push(self: &Arc<Self>, task: Task) -> u64 {
        let mut st = self.state.lock();
        st.tasks.push_back(task);
        st.submitted += 1;
        let seq = st.submitted;
        if !st.running {
            st.running = true;
            drop(st);
            self.spawn_drain();
        }
        seq
    }

    fn spawn_drain(self: &Arc<Self>) {
        let me = self.clone();
        self.pool.spawn(move || me.drain_one());
    }

    fn drain_one(self: Arc<Self>) {
        let task = self.state.lock().tasks.pop_front();
        let failed = match task {
            Some(task) => catch_unwind(AssertUnwindSafe(task)).err(),
            None => None,
        };
        let mut st = self.state.lock();
        st.completed += 1;
        if let Some(payload) = failed {
            if st.failure.is_none() {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a CPU kernel panicked".into());
                st.failure = Some((st.completed, msg));
            }
        }
        self.completed.store(st.completed, Ordering::Release);
        let more = !st.tasks.is_empty();
        st.running = more;
        drop(st);
        self.done.notify_all();
        if more {
            self.spawn_drain();
        }
    }

    fn submitted(&self) -> u64 {
        self.state.lock().submitted
    }

    /// Waits until task `seq` (and all before it) completed.
    pub(super) fn wait_for(&self, seq: u64, policy: WaitPolicy) -> Result<()> {
        match policy {
            WaitPolicy::Spin => {
                while self.completed.load(Ordering::Acquire) < seq {
                    std::hint::spin_loop();
                }
            }
            WaitPolicy::Yield => {
                while self.completed.load(Ordering::Acquire) < seq {
                    std::thread::yield_now();
                }
            }
            WaitPolicy::Block => {
                let mut st = self.state.lock();
                while st.completed < seq {
                    self.done.wait(&mut st);
                }
            }
        }
        match &self.state.lock().failure {
            Some((failed, msg)) if *failed <= seq => Err(Error::Device {
                op: "wait",
                message: msg.clone(),
            }),
            _ => Ok(()),
        }
    }

    pub(super) fn wait_all(&self, policy: WaitPolicy) -> Result<()> {
        self.wait_for(self.submitted(), policy)
    }
}

/// A CPU stream handle.
pub(super) struct CpuStream {
    queue: Arc<StreamQueue>,
    wait: WaitPolicy,
}

impl CpuStream {
    pub(super) fn new(pool: Arc<rayon::ThreadPool>, wait: WaitPolicy) -> Self {
        let queue = Arc::new(StreamQueue {
            state: Mutex::new(QueueState {
                tasks: VecDeque::new(),
                running: false,
                submitted: 0,
                completed: 0,
                failure: None,
            }),
            done: Condvar::new(),
            completed: AtomicU64::new(0),
            pool,
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
            let mut data = data.lock();
            match kernel {
                Kernel::SimpleCompute { .. } => data
                    .par_chunks_mut(BLOCK)
                    .for_each(|block| kernel.reference(block)),
            }
        }));
        Ok(())
    }

    fn upload(&self, buf: &dyn BackendBuffer, src: &[f32]) -> Result<()> {
        let buf = cpu_buffer(buf)?;
        self.synchronize()?;
        let mut data = buf.data.lock();
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
        let data = buf.data.lock();
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
        *ev.mark.lock() = Some((self.queue.clone(), self.queue.submitted()));
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.queue.wait_all(self.wait)
    }

    fn free_after(&self, buf: Box<dyn BackendBuffer>) {
        // Queued tasks hold their own reference to the storage: dropping ours is enough.
        drop(buf);
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
        Ok(match &*self.mark.lock() {
            Some((queue, seq)) => queue.completed.load(Ordering::Acquire) >= *seq,
            None => true,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
