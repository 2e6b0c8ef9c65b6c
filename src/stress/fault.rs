//! Injected faults: wrong calls a thread makes mid-round. Each must return the documented
//! typed error to that thread, leave its buffers as they were, and leave every other thread
//! unaffected (their errors are counted separately). A wrong call that is accepted, or
//! answered with another error, is a wrong answer (a mismatch).
//!
//! What the public API cannot be made to do wrong is not injected: buffers are typed and
//! owned (no use after free, no aliasing, no out-of-bounds launch), a kernel is an enum (no
//! wrong parameter list), and the same buffer cannot appear twice in one grouped launch
//! without `unsafe`. So no fault here reaches the device as an invalid launch: the runtime
//! refuses each before the driver sees it.

use std::sync::atomic::Ordering;

use super::mixed::Round;
use super::model::Tracked;
use super::plan::FaultKind;
use crate::backend::BackendKind;
use crate::error::{Error, Result};
use crate::kernel::Kernel;
use crate::tensor::Tensor;
use crate::{
    CoalescePolicy, Device, DeviceOptions, Inflight, PoolConfig, Precision, Stream, StreamPool,
};

/// What a fault needs of the faulting thread.
pub(super) struct Parts<'w, 'a> {
    pub(super) name: &'w str,
    pub(super) idx: usize,
    pub(super) round: &'w Round<'a>,
    pub(super) pool: Option<&'w StreamPool>,
    pub(super) stream: &'w Stream,
    pub(super) own: &'w mut Vec<Tracked>,
}

impl Parts<'_, '_> {
    /// Checks that `r` is an error `ok` accepts (`want` in words).
    fn expect<T>(&self, what: &str, r: Result<T>, want: &str, ok: impl Fn(&Error) -> bool) {
        let tally = self.round.tally;
        match r {
            Err(e) if ok(&e) => tally.expected_error(),
            Err(e) => tally.mismatch(format!(
                "{}: wrong call {what} got `{e}`, expected {want}",
                self.name
            )),
            Ok(_) => tally.mismatch(format!(
                "{}: wrong call {what} was accepted, expected {want}",
                self.name
            )),
        }
    }

    fn device(&self) -> Device {
        self.own[0].buf.device().clone()
    }
}

fn invalid(e: &Error) -> bool {
    matches!(e, Error::InvalidArgument(_))
}

/// Makes the wrong call `fault`.
pub(super) fn inject(p: &mut Parts<'_, '_>, fault: FaultKind) {
    let k = Kernel::SimpleCompute { iters: 1 };
    match fault {
        FaultKind::Oversize => oversize(p),
        FaultKind::Exhaust => exhaust(p),
        FaultKind::WrongDevice => {
            let here = p.device();
            let opts = DeviceOptions {
                backend: Some(here.info().backend),
                cpu_units: Some(1),
                ordinal: 0,
                wait: Some(here.info().wait),
                queue_chain: None,
            };
            let mut foreign = match Device::open(&opts).and_then(|d| d.buffer_from(&[0.5; 8])) {
                Ok(b) => b,
                Err(e) => {
                    return p
                        .round
                        .tally
                        .error(format!("{}: opening a second device: {e}", p.name))
                }
            };
            let wrong = |e: &Error| matches!(e, Error::WrongDevice { .. });
            let r = p.stream.launch(k, &mut foreign);
            p.expect("launch of another device's buffer", r, "WrongDevice", wrong);
            let stream = p.stream;
            let r = stream.launch_many(k, &mut [&mut p.own[0].buf, &mut foreign]);
            p.expect(
                "grouped launch with another device's buffer",
                r,
                "WrongDevice",
                wrong,
            );
        }
        FaultKind::ZeroLength => {
            let dev = p.device();
            p.expect("alloc(0)", dev.alloc(0), "InvalidArgument", invalid);
            p.expect(
                "buffer_from(&[])",
                dev.buffer_from(&[]),
                "InvalidArgument",
                invalid,
            );
        }
        FaultKind::ForeignStream => {
            let mine = p.stream.index();
            let foreign = p
                .round
                .streams
                .lock()
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != p.idx)
                .filter_map(|(_, s)| s.clone())
                .find(|s| s.index() != mine);
            let Some(foreign) = foreign else {
                return no_such_stream(p);
            };
            let r = foreign.launch(k, &mut p.own[0].buf);
            p.expect(
                "launch on another thread's stream (lock none)",
                r,
                "ExclusiveStreamRequired",
                |e| matches!(e, Error::ExclusiveStreamRequired(_)),
            );
            // Acquiring it is refused while its thread owns it; it may have switched away,
            // and then the acquire is right to succeed (give it straight back).
            if let Some(pool) = p.pool {
                match pool.acquire(foreign.index()) {
                    Err(Error::ExclusiveStreamRequired(_)) => p.round.tally.expected_error(),
                    Ok(s) => {
                        let _ = pool.release(&s);
                    }
                    Err(e) => p.round.tally.mismatch(format!(
                        "{}: acquiring another thread's stream got `{e}`, expected \
                         ExclusiveStreamRequired",
                        p.name
                    )),
                }
            }
        }
        FaultKind::NoSuchStream => no_such_stream(p),
        FaultKind::WrongLength => {
            let len = p.own[0].buf.len();
            let r = p.own[0].buf.write(&vec![1.0; len + 1]);
            p.expect("write of len+1 elements", r, "InvalidArgument", invalid);
            let r = p.own[0].buf.write(&[]);
            p.expect("write of 0 elements", r, "InvalidArgument", invalid);
        }
        FaultKind::ForeignPool => {
            let Some(pool) = p.pool else {
                return no_such_stream(p);
            };
            let other = StreamPool::new(&p.device(), PoolConfig::default())
                .and_then(|o| o.acquire(0).map(|s| (o, s)));
            let (other, s) = match other {
                Ok(x) => x,
                Err(e) => {
                    return p
                        .round
                        .tally
                        .error(format!("{}: making a second pool: {e}", p.name))
                }
            };
            let r = pool.set_current(&s);
            p.expect(
                "set_current(another pool's stream)",
                r,
                "InvalidArgument",
                invalid,
            );
            let r = pool.release(&s);
            p.expect(
                "release(another pool's stream)",
                r,
                "InvalidArgument",
                invalid,
            );
            drop((s, other));
        }
        FaultKind::BadWindow => {
            p.expect(
                "Inflight::new(0)",
                Inflight::new(0),
                "InvalidArgument",
                invalid,
            );
            p.expect(
                "Inflight::new(usize::MAX)",
                Inflight::new(usize::MAX),
                "InvalidArgument",
                invalid,
            );
            p.expect(
                "Kernel::by_name(\"no_such_kernel\")",
                Kernel::by_name("no_such_kernel", 1),
                "UnknownKernel",
                |e| matches!(e, Error::UnknownKernel(_)),
            );
        }
        FaultKind::BadShape => {
            let dev = p.device();
            let shape = |e: &Error| matches!(e, Error::Shape(_));
            let tensors = Tensor::zeros(&dev, &[2, 3]).and_then(|a| {
                Ok((
                    a,
                    Tensor::zeros(&dev, &[4, 5])?,
                    Tensor::zeros(&dev, &[2, 5])?,
                ))
            });
            match tensors {
                Ok((mut a, mut b, mut out)) => {
                    let r = p.stream.matmul(&mut a, &mut b, &mut out, Precision::Strict);
                    p.expect("matmul [2, 3]·[4, 5]", r, "Shape", shape);
                }
                Err(e) => {
                    return p
                        .round
                        .tally
                        .error(format!("{}: making tensors: {e}", p.name))
                }
            }
            let r = Tensor::from_slice(&dev, &[2, 3], &[0.0; 5]);
            p.expect("a [2, 3] tensor from 5 values", r, "Shape", shape);
            if let Some((model, _)) = &p.round.model {
                let width = model.spec().input();
                let r = model.infer(&vec![0.5; width + 1]);
                p.expect("MLP input of a row and one value", r, "Shape", shape);
                p.expect("MLP input of no rows", model.infer(&[]), "Shape", shape);
            }
        }
        FaultKind::BadPool => {
            let dev = p.device();
            let mk = |streams, coalesce| {
                StreamPool::new(
                    &dev,
                    PoolConfig {
                        streams,
                        coalesce,
                        ..PoolConfig::default()
                    },
                )
            };
            p.expect(
                "a pool of 0 streams",
                mk(0, CoalescePolicy::Off),
                "InvalidArgument",
                invalid,
            );
            p.expect(
                "a pool of usize::MAX streams",
                mk(usize::MAX, CoalescePolicy::Off),
                "InvalidArgument",
                invalid,
            );
            let zero_batch = CoalescePolicy::Fixed {
                max_batch: 0,
                max_delay: std::time::Duration::ZERO,
                depth: 1,
            };
            p.expect(
                "coalescing with batches of 0",
                mk(2, zero_batch),
                "InvalidArgument",
                invalid,
            );
            let zero_depth = CoalescePolicy::Fixed {
                max_batch: 4,
                max_delay: std::time::Duration::ZERO,
                depth: 0,
            };
            p.expect(
                "coalescing with depth 0",
                mk(2, zero_depth),
                "InvalidArgument",
                invalid,
            );
        }
    }
}

fn no_such_stream(p: &mut Parts<'_, '_>) {
    let size = p.round.plan.pool.streams;
    let Some(pool) = p.pool else { return };
    for index in [size, size + 7, usize::MAX] {
        let r = pool.acquire(index);
        p.expect(
            &format!("acquire({index}) on a pool of {size}"),
            r,
            "NoSuchStream",
            |e| matches!(e, Error::NoSuchStream { .. }),
        );
    }
}

/// One allocation twice the device's free memory: OutOfMemory. Where one buffer cannot be
/// that large (CUDA: 2^32 - 1 elements, less than an H100's memory), one element more than
/// the largest buffer: InvalidArgument.
fn oversize(p: &mut Parts<'_, '_>) {
    let dev = p.device();
    let max = dev.backend().max_elements();
    let want = dev
        .memory_available()
        .map(|free| (free / 4).saturating_mul(2).max(1));
    match want {
        Some(n) if n <= max as u64 => {
            let r = dev.alloc(n as usize);
            p.expect(
                &format!("alloc({n}) (twice the free memory)"),
                r,
                "OutOfMemory",
                |e| matches!(e, Error::OutOfMemory { .. }),
            );
        }
        _ => {
            let r = dev.alloc(max.saturating_add(1));
            p.expect("alloc(largest buffer + 1)", r, "InvalidArgument", invalid);
        }
    }
}

/// Takes the largest buffers until the device runs out: OutOfMemory to this thread; then
/// gives everything back. Only where the free memory exceeds the largest buffer and is the
/// device's own (not the CPU backend, whose memory is the machine's); elsewhere `oversize`.
fn exhaust(p: &mut Parts<'_, '_>) {
    let dev = p.device();
    let max = dev.backend().max_elements() as u64;
    let free = dev.memory_available();
    let Some(free) =
        free.filter(|&f| dev.info().backend != BackendKind::Cpu && max.saturating_mul(4) < f)
    else {
        return oversize(p);
    };
    p.round.exhausting.store(true, Ordering::Release);
    let mut held = Vec::new();
    let tries = free / (max * 4) + 3;
    let mut outcome = None;
    for _ in 0..tries {
        match dev.alloc(max as usize) {
            Ok(b) => held.push(b),
            Err(e) => {
                outcome = Some(e);
                break;
            }
        }
    }
    let got = held.len();
    drop(held);
    let r: Result<()> = match outcome {
        Some(e) => Err(e),
        None => Ok(()),
    };
    p.expect(
        &format!("exhausting device memory ({got} buffers of {max} elements held)"),
        r,
        "OutOfMemory",
        |e| matches!(e, Error::OutOfMemory { .. }),
    );
}
