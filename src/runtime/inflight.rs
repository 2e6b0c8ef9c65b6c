//! `Inflight`: a thread's window of outstanding ops.
//!
//! With depth 1, each op is waited for right after it is submitted (a wait after every op).
//! With depth N > 1, up to N ops are outstanding: before submitting another, the oldest is
//! waited for. This is the anchor program's scheme; the tickets' events come from the
//! stream's pool, so no event is created per op.

use std::collections::VecDeque;

use super::Ticket;
use crate::error::{Error, Result};

/// Largest window accepted.
pub const MAX_DEPTH: usize = 4096;

/// A window of at most `depth` outstanding ops.
pub struct Inflight {
    depth: usize,
    pending: VecDeque<Ticket>,
}

impl Inflight {
    /// A window of `depth` (1 = wait after every op).
    pub fn new(depth: usize) -> Result<Self> {
        if depth == 0 || depth > MAX_DEPTH {
            return Err(Error::invalid(format!(
                "inflight depth must be between 1 and {MAX_DEPTH}, got {depth}"
            )));
        }
        Ok(Inflight {
            depth,
            pending: VecDeque::with_capacity(depth),
        })
    }

    /// The window's depth.
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// Ops submitted and not yet waited for.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Submits one op through `submit`, first waiting for the oldest if the window is full.
    pub fn submit(&mut self, submit: impl FnOnce() -> Result<Ticket>) -> Result<()> {
        if self.pending.len() >= self.depth {
            if let Some(oldest) = self.pending.pop_front() {
                oldest.wait()?;
            }
        }
        let ticket = submit()?;
        if self.depth == 1 {
            ticket.wait()
        } else {
            self.pending.push_back(ticket);
            Ok(())
        }
    }

    /// Waits for every outstanding op; returns the first error after waiting for all.
    pub fn drain(&mut self) -> Result<()> {
        let mut first = Ok(());
        while let Some(t) = self.pending.pop_front() {
            let r = t.wait();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}
