//! A stream's pool of completion events.
//!
//! Events are taken at submission and given back when their ticket is waited on or dropped,
//! so after warm-up no submission creates an event. The list is `sync::free_list` (crossbeam's
//! lock-free bounded queue; loom-modelled); an event returned to a full pool is destroyed.

use crate::backend::{Backend, BackendEvent};
use crate::error::Result;
use crate::sync::free_list::FreeList;

/// Free events kept per stream.
const CAPACITY: usize = 1024;

pub(crate) struct EventPool {
    list: FreeList<Box<dyn BackendEvent>>,
}

impl EventPool {
    pub(crate) fn new() -> Self {
        EventPool {
            list: FreeList::new(CAPACITY),
        }
    }

    /// A free event, or a new one when none is free.
    pub(crate) fn take(&self, backend: &dyn Backend) -> Result<Box<dyn BackendEvent>> {
        self.list.take_or(|| backend.new_event())
    }

    /// Returns an event for reuse.
    pub(crate) fn give_back(&self, event: Box<dyn BackendEvent>) {
        self.list.give_back(event);
    }

    /// Events this pool has ever created.
    pub(crate) fn created(&self) -> u64 {
        self.list.created()
    }
}
