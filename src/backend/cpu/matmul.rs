//! Matrix products on the CPU backend: the `gemm` crate (packed, SIMD, FMA), run as a task
//! on the stream's ordered queue like any kernel.
//!
//! A task locks every buffer it touches for its whole run, in address order (so two tasks never
//! wait on each other in a cycle): outputs exclusively, inputs shared, so read-only weights
//! serve every stream at once. `check_gemm` has already refused outputs that alias inputs.
//! Arithmetic is strict fp32 whatever the [`Precision`](crate::backend::Precision) asked
//! (a CPU has no TF32).

use std::sync::Arc;

use parking_lot::{RwLockReadGuard, RwLockWriteGuard};
use rayon::prelude::*;

use super::cpu_buffer;
use crate::backend::{check_gemm, GemmOperands, GemmSpec};
use crate::error::Result;

type Storage = Arc<super::Storage>;

/// Products at least this large (m·n·k) use every execution unit; smaller ones run on one
/// (splitting them costs more than it saves).
const PARALLEL_WORK: usize = 1 << 18;

/// One product's operands as storage indices and offsets.
#[derive(Clone, Copy)]
struct Op {
    a: (usize, usize),
    b: (usize, usize),
    c: (usize, usize),
    bias: Option<(usize, usize)>,
}

enum Guard<'a> {
    Read(RwLockReadGuard<'a, Vec<f32>>),
    Write(RwLockWriteGuard<'a, Vec<f32>>),
}

/// A raw pointer that may cross into rayon workers. Sound because each worker writes only its
/// own output (distinct buffers, `check_gemm`) and reads inputs no one writes meanwhile.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: see the type's doc: the pointee is accessed without overlap between workers, and
// the guards that make it valid outlive every worker (they are joined before the guards drop).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// Builds the task computing every product of `ops` (already checked by the caller).
pub(super) fn gemm_task(
    spec: GemmSpec,
    ops: &[GemmOperands<'_>],
) -> Result<Box<dyn FnOnce() + Send>> {
    check_gemm(&spec, ops)?;
    // Distinct storages, each with whether some product writes it.
    let mut storages: Vec<(Storage, bool)> = Vec::new();
    let mut index = |buf: &dyn crate::backend::BackendBuffer, write: bool| -> Result<usize> {
        let data = cpu_buffer(buf)?.data.clone();
        match storages.iter().position(|(s, _)| Arc::ptr_eq(s, &data)) {
            Some(i) => {
                storages[i].1 |= write;
                Ok(i)
            }
            None => {
                storages.push((data, write));
                Ok(storages.len() - 1)
            }
        }
    };
    let mut plan = Vec::with_capacity(ops.len());
    for o in ops {
        plan.push(Op {
            a: (index(o.a.buf, false)?, o.a.offset),
            b: (index(o.b.buf, false)?, o.b.offset),
            c: (index(o.c.buf, true)?, o.c.offset),
            bias: match o.bias {
                Some(r) => Some((index(r.buf, false)?, r.offset)),
                None => None,
            },
        });
    }
    Ok(Box::new(move || run(&spec, &storages, &plan)))
}

fn run(spec: &GemmSpec, storages: &[(Storage, bool)], plan: &[Op]) {
    // Lock in address order: no cycle between tasks of different streams.
    let mut order: Vec<usize> = (0..storages.len()).collect();
    order.sort_by_key(|&i| Arc::as_ptr(&storages[i].0) as usize);
    let mut guards: Vec<Option<Guard<'_>>> = (0..storages.len()).map(|_| None).collect();
    for i in order {
        let (s, write) = &storages[i];
        guards[i] = Some(if *write {
            Guard::Write(s.write())
        } else {
            Guard::Read(s.read())
        });
    }
    let ptrs: Vec<SendPtr> = guards
        .iter_mut()
        .map(|g| match g.as_mut().expect("every storage is locked") {
            Guard::Read(r) => SendPtr(r.as_ptr().cast_mut()),
            Guard::Write(w) => SendPtr(w.as_mut_ptr()),
        })
        .collect();
    let one = |op: &Op, parallel: bool| {
        // SAFETY: every pointer comes from a guard held until this function returns; the
        // operands' ranges lie inside their buffers (`check_gemm`); outputs are written through
        // write guards and never alias an input or another output (`check_gemm`), and inputs
        // are read through guards no writer holds.
        unsafe { product(spec, &ptrs, op, parallel) }
    };
    let work = spec.m.saturating_mul(spec.n).saturating_mul(spec.k);
    if plan.len() == 1 {
        one(&plan[0], work >= PARALLEL_WORK && spec.m >= 16);
    } else {
        plan.par_iter().for_each(|op| one(op, false));
    }
    drop(ptrs);
    drop(guards);
}

/// `C = A · B' (+ bias) (ReLU)` for one product.
///
/// # Safety
/// The pointers in `ptrs` at the operands' indices must be valid for the operands' ranges
/// (offset + size) for the whole call; C's range must not overlap any other operand's, and no
/// other thread may access C's range meanwhile.
unsafe fn product(spec: &GemmSpec, ptrs: &[SendPtr], op: &Op, parallel: bool) {
    let (m, n, k) = (spec.m, spec.n, spec.k);
    let at = |(i, off): (usize, usize)| ptrs[i].0.wrapping_add(off);
    // `wrapping_add` is safe to call; the offsets are inside the buffers (caller's contract),
    // so the results are in bounds when dereferenced below.
    let (a, b, c) = (at(op.a) as *const f32, at(op.b) as *const f32, at(op.c));
    // SAFETY: the ranges are valid and C exclusive (our contract, passed on).
    unsafe { packed(m, n, k, a, b, c, spec.b_transposed, parallel) };
    if op.bias.is_none() && !spec.relu {
        return;
    }
    // SAFETY: C's m×n elements are valid and exclusively ours (caller's contract).
    let out = unsafe { std::slice::from_raw_parts_mut(c, m * n) };
    let bias = op.bias.map(|(i, off)| {
        // SAFETY: the bias's n elements lie inside its buffer and are not written meanwhile.
        unsafe { std::slice::from_raw_parts(ptrs[i].0.add(off) as *const f32, n) }
    });
    for row in out.chunks_exact_mut(n) {
        if let Some(bias) = bias {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += *b;
            }
        }
        if spec.relu {
            for v in row.iter_mut() {
                // NaN stays NaN (`max` would turn it into 0 and hide it).
                if *v < 0.0 {
                    *v = 0.0;
                }
            }
        }
    }
}

/// `C = A · B'` with the `gemm` crate (packed, SIMD).
///
/// # Safety
/// A (m×k), B' (B `[k, n]`, or `[n, k]` when `b_transposed`) and C (m×n) must be valid for
/// those ranges; C must not overlap A or B, and no other thread may access C meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn packed(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    b_transposed: bool,
    parallel: bool,
) {
    // Strides in elements: row-major A[m×k], C[m×n]; B' is B[k×n] or B[n×k] transposed.
    let (b_cs, b_rs) = if b_transposed {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: A, B' and C are valid for the strides above over m×k, k×n and m×n elements
    // (caller's contract); C does not overlap A or B; `read_dst` is false, so C's previous
    // contents are not read (dst = 0·dst + 1·A·B').
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            n as isize,
            false,
            a,
            1,
            k as isize,
            b,
            b_cs,
            b_rs,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}
