//! Churn rounds: hundreds of short-lived threads, a wave at a time, each taking a stream
//! (round-robin or by index), launching a few ops, checking its buffer and leaving (by
//! releasing, by just exiting, or by panicking with an op in flight). Afterwards every
//! stream can be taken again (lock `none`: every claim came back) and no more streams were
//! made than the pool holds.

use std::collections::VecDeque;
use std::sync::Arc;

use super::mixed::Owners;
use super::model::Tracked;
use super::plan::{ChurnPlan, ChurnThread, Leave};
use super::rng::Rng;
use super::watch::{FinishOnDrop, Phase, Slot};
use super::{panic_message, Env, InjectedPanic, Tally};
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::sync::submit_lock::LockMode;
use crate::{Stream, StreamPool};

/// Runs a churn round.
pub fn run(plan: &ChurnPlan, env: &Env<'_>) {
    let tally = env.tally;
    let c = env.watch.controller();
    c.set(Phase::Open, 0);
    let Some((_device, pool, tolerance)) = env.open_round(&plan.device, &plan.pool) else {
        return;
    };
    let owners = Owners::new(plan.pool.streams, plan.pool.lock);
    let owners = &owners;
    std::thread::scope(|scope| {
        let mut alive = VecDeque::new();
        let join = |(i, h): (usize, std::thread::ScopedJoinHandle<'_, ()>)| {
            if let Err(payload) = h.join() {
                if payload.downcast_ref::<InjectedPanic>().is_some() {
                    tally.expected_panic();
                } else {
                    tally.crash(format!(
                        "thread C{i} panicked: {}",
                        panic_message(&*payload)
                    ));
                }
            }
        };
        for i in 0..plan.threads {
            c.set(Phase::Launch, i);
            if alive.len() >= plan.wave {
                c.phase(Phase::Join);
                if let Some(h) = alive.pop_front() {
                    join(h);
                }
            }
            let ct = ChurnThread::draw(plan, i);
            let pool = pool.clone();
            let slot = env.watch.slot(format!("C{i}"));
            let spawned = std::thread::Builder::new()
                .name(format!("stress-C{i}"))
                .spawn_scoped(scope, move || {
                    let _fin = FinishOnDrop(slot.clone());
                    churn_thread(i, ct, &pool, owners, &slot, tally, tolerance)
                });
            match spawned {
                Ok(h) => alive.push_back((i, h)),
                Err(e) => {
                    tally.error(format!("starting thread C{i}: {e}"));
                    break;
                }
            }
        }
        c.phase(Phase::Join);
        while let Some(h) = alive.pop_front() {
            join(h);
        }
    });
    c.set(Phase::Check, 0);
    if pool.streams_created() > pool.size() {
        tally.mismatch(format!(
            "the pool made {} streams, more than its {}",
            pool.streams_created(),
            pool.size()
        ));
    }
    if plan.pool.lock == LockMode::None {
        let p = pool.clone();
        let busy = std::thread::spawn(move || {
            (0..p.size())
                .filter(|&i| p.acquire(i).is_err())
                .collect::<Vec<usize>>()
        })
        .join();
        match busy {
            Ok(b) if b.is_empty() => {}
            Ok(b) => tally.mismatch(format!(
                "lock none: after {} threads came and went, streams {b:?} were still claimed",
                plan.threads
            )),
            Err(p) => tally.crash(format!("claim check panicked: {}", panic_message(&*p))),
        }
    }
    c.set(Phase::Drop, 0);
    if let Err(e) = pool.synchronize() {
        tally.error(format!("synchronizing the pool: {e}"));
    }
}

/// Takes a stream as planned; `None` when lock `none` refuses (documented, counted).
fn take(pool: &StreamPool, index: Option<usize>, tally: &Tally) -> Result<Option<Stream>> {
    let r = match index {
        Some(i) => pool
            .acquire(i)
            .and_then(|s| pool.set_current(&s).map(|()| s)),
        None => pool.current(),
    };
    match r {
        Ok(s) => Ok(Some(s)),
        Err(Error::ExclusiveStreamRequired(_)) if pool.lock_mode() == LockMode::None => {
            tally.refused();
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn churn_thread(
    i: usize,
    ct: ChurnThread,
    pool: &StreamPool,
    owners: &Owners,
    slot: &Arc<Slot>,
    tally: &Tally,
    tolerance: f32,
) {
    let name = format!("C{i}");
    let fail = |what: &str, e: Error| tally.error(format!("{name} {what}: {e}"));
    slot.set(Phase::Setup, 0);
    let mut stream = match take(pool, ct.acquire, tally) {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => return fail("taking a stream", e),
    };
    let mut owned = stream.index();
    if let Err(m) = owners.take(owned, &name) {
        tally.mismatch(m);
    }
    if ct.retake {
        slot.phase(Phase::Switch);
        owners.give(owned);
        let released = if ct.acquire.is_some() {
            pool.release(&stream)
        } else {
            pool.release_current().map(drop)
        };
        if let Err(e) = released {
            return fail("releasing its stream", e);
        }
        stream = match take(pool, None, tally) {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => return fail("taking a stream again", e),
        };
        owned = stream.index();
        if let Err(m) = owners.take(owned, &name) {
            tally.mismatch(m);
        }
    }
    // Gives the stream back in the bookkeeping however the thread leaves (panics included);
    // the pool gets it back when the thread's locals are destroyed, after this.
    struct Give<'o>(&'o Owners, usize);
    impl Drop for Give<'_> {
        fn drop(&mut self) {
            self.0.give(self.1);
        }
    }
    let give = Give(owners, owned);
    let mut rng = Rng::new(i as u64);
    let mut t = match Tracked::new(pool.device(), ct.len, &mut rng, format!("{name}.b0")) {
        Ok(t) => t,
        Err(e) => return fail("allocating", e),
    };
    for l in 0..ct.launches {
        slot.set(Phase::Launch, l as usize);
        let iters = 1 + l % 2;
        let ticket = match stream.launch(Kernel::SimpleCompute { iters }, &mut t.buf) {
            Ok(tk) => tk,
            Err(e) => return fail("launching", e),
        };
        t.applied(iters);
        tally.ops(1);
        if ct.leave == Leave::Panic && l + 1 == ct.launches {
            tally.unverified(t.unchecked_ops);
            drop(give);
            let _in_flight = ticket;
            std::panic::panic_any(InjectedPanic(format!("{name} with its op in flight")));
        }
        if ct.wait {
            slot.phase(Phase::Wait);
            if let Err(e) = ticket.wait() {
                return fail("waiting", e);
            }
        } else {
            drop(ticket);
        }
    }
    slot.phase(Phase::Check);
    match t.check(tolerance) {
        Ok(Ok(c)) => tally.verified(c.ops, c.max_abs_error),
        Ok(Err(m)) => tally.mismatch(m),
        Err(e) => return fail("reading back", e),
    }
    drop(give);
    slot.phase(Phase::Drop);
    match ct.leave {
        Leave::ReleaseCurrent => match pool.release_current() {
            Ok(true) => {}
            Ok(false) => tally.mismatch(format!(
                "{name}: release_current found no current stream after taking one"
            )),
            Err(e) => fail("release_current", e),
        },
        Leave::Release => {
            if let Err(e) = pool.release(&stream) {
                fail("release", e);
            }
        }
        Leave::Exit | Leave::Panic => {}
    }
}
