//! A stream's pool of completion events.
//!
//! Events are taken at submission and given back when their ticket is waited on or dropped,
//! so after warm-up no submission creates an event. The free list is crossbeam's lock-free
//! bounded queue; an event returned to a full pool is destroyed.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam::queue::ArrayQueue;

use crate::backend::{Backend, BackendEvent};
use crate::error::Result;

/// Free events kept per stream.
const CAPACITY: usize = 1024;

pub(crate) struct EventPool {
    free: ArrayQueue<Box<dyn BackendEvent>>,
    created: AtomicU64,
}

impl EventPool {
    pub(crate) fn new() -> Self {
        EventPool {
            free: ArrayQueue::new(CAPACITY),
            created: AtomicU64::new(0),
        }
    }

    /// A free event, or a new one when none is free.
    pub(crate) fn take(&self, backend: &dyn Backend) -> Result<Box<dyn BackendEvent>> {
        match self.free.pop() {
            Some(ev) => Ok(ev),
            None => {
                let ev = backend.new_event()?;
                self.created.fetch_add(1, Ordering::Relaxed);
                Ok(ev)
            }
        }
    }

    /// Returns an event for reuse.
    pub(crate) fn give_back(&self, event: Box<dyn BackendEvent>) {
        let _ = self.free.push(event);
    }

    /// Events this pool has ever created.
    pub(crate) fn created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }
}
