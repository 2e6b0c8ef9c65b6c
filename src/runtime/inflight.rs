//! `Inflight`: a thread's window of outstanding ops.
//!
//! With depth 1, each op is waited for right after it is submitted (a wait after every op).
//! With depth N > 1, up to N ops are outstanding: before submitting another, the oldest is
//! waited for. This is the anchor program's scheme; the tickets' events come from the
//! stream's pool, so no event is created per op.

use std::collections::VecDeque;
use std::time::Instant;

use hdrhistogram::Histogram;

use super::Ticket;
use crate::error::{Error, Result};

/// Largest window accepted.
pub const MAX_DEPTH: usize = 4096;

/// A window of at most `depth` outstanding ops. Optionally records each op's latency, from
/// the start of its submission to the return of its wait, in nanoseconds.
pub struct Inflight {
    depth: usize,
    pending: VecDeque<(Ticket, Instant)>,
    latency: Option<Histogram<u64>>,
}

impl std::fmt::Debug for Inflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflight")
            .field("depth", &self.depth)
            .field("outstanding", &self.pending.len())
            .finish_non_exhaustive()
    }
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
            latency: None,
        })
    }

    /// A window of `depth` that records every op's latency (nanoseconds, 3 significant
    /// digits, up to an hour).
    pub fn with_latency(depth: usize) -> Result<Self> {
        let mut w = Inflight::new(depth)?;
        let hist = Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
            .map_err(|e| Error::invalid(format!("latency histogram: {e}")))?;
        w.latency = Some(hist);
        Ok(w)
    }

    /// The recorded latencies (nanoseconds), when made with [`Inflight::with_latency`].
    pub fn latency(&self) -> Option<&Histogram<u64>> {
        self.latency.as_ref()
    }

    fn finish(&mut self, ticket: Ticket, submitted: Instant) -> Result<()> {
        let r = ticket.wait();
        if let Some(h) = &mut self.latency {
            h.saturating_record(submitted.elapsed().as_nanos().max(1) as u64);
        }
        r
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
            if let Some((oldest, at)) = self.pending.pop_front() {
                self.finish(oldest, at)?;
            }
        }
        let at = Instant::now();
        let ticket = submit()?;
        if self.depth == 1 {
            self.finish(ticket, at)
        } else {
            self.pending.push_back((ticket, at));
            Ok(())
        }
    }

    /// Waits for every outstanding op; returns the first error after waiting for all.
    pub fn drain(&mut self) -> Result<()> {
        let mut first = Ok(());
        while let Some((t, at)) = self.pending.pop_front() {
            let r = self.finish(t, at);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}
