//! Matrix products through the runtime: one product on a pooled stream
//! ([`Stream::matmul`]), and small products from many threads merged into one batched launch
//! ([`MatmulCoalescer`]).
//!
//! `MatmulCoalescer` is a sibling of the kernel coalescer (`runtime/coalescer.rs`), not a use
//! of it: that one merges in-place, one-buffer, fixed-parameter kernels and hands back tickets
//! before launch; a product reads two buffers and writes a third, and its batch is a different
//! launch (a batched GEMM over pointer arrays). It uses [`crate::sync::batcher::Batcher`]:
//! each calling thread queues its product and either leads (takes the queued products of one
//! shape, launches them as one `gemm_batched` on one of `depth` executor streams, waits, hands
//! out the results) or waits for a leader to run its product. A call returns when its product
//! is complete (a wait per op, as the benchmark and PyTorch's `torch.mm` + synchronize).
//!
//! Ownership: before a product is queued, its three buffers are settled (pending work on
//! another stream waited for); after it completed, each remembers the executor stream as its
//! last stream, so a later use elsewhere or a drop is ordered after it (rules 2 and 3). Work
//! of this coalescer on its executors is complete whenever no call is in flight on the buffer,
//! which the `&mut` borrows guarantee, so moving a buffer between executors needs no wait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::coalescer::SharedRaw;
use super::phases::Phases;
use super::{Device, Stream, Ticket};
use crate::backend::{BackendStream, DType, GemmOperands, GemmSpec, MatRef, Precision};
use crate::error::{Error, Result};
use crate::sync::batcher::Batcher;
use crate::tensor::{matmul_shapes, Tensor};

impl Stream {
    /// Submits `out = a · b` (row-major `a [m, k]`, `b [k, n]`, `out [m, n]`, f32) on this
    /// stream, in `precision`. Returns at once with a ticket for its completion. All three
    /// tensors are bound to this stream (rule 2: pending work elsewhere is waited for first).
    pub fn matmul(
        &self,
        a: &mut Tensor,
        b: &mut Tensor,
        out: &mut Tensor,
        precision: Precision,
    ) -> Result<Ticket> {
        let (m, n, k) = matmul_shapes(a.shape(), b.shape(), out.shape())?;
        self.check_owner()?;
        let s = &*self.shared;
        for t in [&mut *a, &mut *b, &mut *out] {
            t.buffer_mut().bind(s.device.id(), &s.backend)?;
        }
        let spec = GemmSpec {
            m,
            n,
            k,
            b_transposed: false,
            relu: false,
            dtype: DType::F32,
            precision,
            fuse: true,
            b_static: false,
        };
        let ops = GemmOperands {
            a: MatRef::new(a.raw()),
            b: MatRef::new(b.raw()),
            c: MatRef::new(out.raw()),
            bias: None,
        };
        self.submit(1, |backend| backend.gemm(&spec, &ops))
    }
}

/// Batched launches a [`MatmulCoalescer`] keeps in flight by default. On the H100, 16
/// threads, batches replayed as graphs (products/s at 64² / 256²): at 7db3fbe depth 2, 4, 8
/// gave 355k/280k, 448k/319k, 419k/329k; at da15383 446k/320k, 482k/352k, 429k/342k; at
/// abedfbf 420k/306k, 445k/334k, 321k/224k (bench/results/h100/mlp/{7db3fbe, da15383,
/// abedfbf/call2}/matmul-*). Depth 4 was ahead of 8 in five of these six comparisons, and
/// of 2 in all; the recorded call at 217b890 (depth 4) ran 449k/361k.
pub const DEFAULT_MATMUL_DEPTH: usize = 4;

/// How a [`MatmulCoalescer`] batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulCoalescerConfig {
    /// Most products per batched launch (1..=4096).
    pub max_batch: usize,
    /// Batches in flight at once, each on its own stream (1..=64).
    pub depth: usize,
    /// Arithmetic of every product.
    pub precision: Precision,
}

impl Default for MatmulCoalescerConfig {
    fn default() -> Self {
        MatmulCoalescerConfig {
            max_batch: 64,
            depth: DEFAULT_MATMUL_DEPTH,
            precision: Precision::Strict,
        }
    }
}

/// Batches launched and products in them so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MatmulStats {
    /// Batched launches.
    pub launches: u64,
    /// Products in them.
    pub ops: u64,
}

struct Request {
    mnk: (usize, usize, usize),
    a: SharedRaw,
    b: SharedRaw,
    c: SharedRaw,
}

/// Products from many threads merged into batched launches (see the module doc).
pub struct MatmulCoalescer {
    device: Device,
    config: MatmulCoalescerConfig,
    executors: Vec<Arc<dyn BackendStream>>,
    free: Mutex<Vec<usize>>,
    batcher: Batcher<Request, std::result::Result<usize, String>>,
    launches: AtomicU64,
    ops: AtomicU64,
    /// Diagnostic: where a batch's time goes (`MULTIQ_PHASES`).
    phases: Phases,
}

impl std::fmt::Debug for MatmulCoalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MatmulCoalescer")
            .field("config", &self.config)
            .finish()
    }
}

impl MatmulCoalescer {
    /// A coalescer on `device` with `config.depth` executor streams.
    pub fn new(device: &Device, config: MatmulCoalescerConfig) -> Result<Self> {
        if config.max_batch == 0 || config.max_batch > 4096 {
            return Err(Error::invalid("max batch must be between 1 and 4096"));
        }
        if config.depth == 0 || config.depth > 64 {
            return Err(Error::invalid("coalescing depth must be between 1 and 64"));
        }
        let executors = (0..config.depth)
            .map(|_| device.backend().new_stream())
            .collect::<Result<Vec<_>>>()?;
        Ok(MatmulCoalescer {
            device: device.clone(),
            config,
            free: Mutex::new((0..config.depth).rev().collect()),
            executors,
            batcher: Batcher::new(config.max_batch, config.depth, device.info().wait),
            launches: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            phases: Phases::new("coalesced matmul", &["executor+group", "launch", "sync"]),
        })
    }

    /// The configuration.
    pub fn config(&self) -> MatmulCoalescerConfig {
        self.config
    }

    /// Launches and products so far.
    pub fn stats(&self) -> MatmulStats {
        MatmulStats {
            launches: self.launches.load(Ordering::Relaxed),
            ops: self.ops.load(Ordering::Relaxed),
        }
    }

    /// Computes `out = a · b` together with concurrent calls from other threads, and returns
    /// when it is complete. Shapes are checked here, so a bad call fails alone; a device error
    /// fails every product of its batch.
    pub fn matmul(&self, a: &mut Tensor, b: &mut Tensor, out: &mut Tensor) -> Result<()> {
        let mnk = matmul_shapes(a.shape(), b.shape(), out.shape())?;
        let id = self.device.id();
        let ours = |s: &Arc<dyn BackendStream>| {
            self.executors
                .iter()
                .any(|e| std::ptr::addr_eq(Arc::as_ptr(e), Arc::as_ptr(s)))
        };
        for t in [&mut *a, &mut *b, &mut *out] {
            t.buffer_mut().settle(id, ours)?;
        }
        let request = Request {
            mnk,
            a: a.buffer_mut().shared_raw(),
            b: b.buffer_mut().shared_raw(),
            c: out.buffer_mut().shared_raw(),
        };
        let done = self
            .batcher
            .submit(request, 1, |batch| self.run(batch), |_| {});
        let executor = match done {
            Ok(Ok(i)) => i,
            Ok(Err(message)) | Err(message) => {
                return Err(Error::Device {
                    op: "coalesced matmul",
                    message,
                })
            }
        };
        for t in [a, b, out] {
            t.buffer_mut().set_last(self.executors[executor].clone());
        }
        Ok(())
    }

    /// Runs one batch on a free executor: one batched launch per shape, then a wait.
    fn run(&self, batch: Vec<Request>) -> Vec<std::result::Result<usize, String>> {
        let mut run = self.phases.start();
        let Some(index) = self.free.lock().pop() else {
            let msg = "no free executor stream (more leaders than depth)".to_string();
            return batch.iter().map(|_| Err(msg.clone())).collect();
        };
        let stream = &self.executors[index];
        let mut results: Vec<std::result::Result<usize, String>> = vec![Ok(index); batch.len()];
        let mut shapes: Vec<(usize, usize, usize)> = Vec::new();
        for r in &batch {
            if !shapes.contains(&r.mnk) {
                shapes.push(r.mnk);
            }
        }
        for &(m, n, k) in &shapes {
            let members: Vec<usize> = (0..batch.len())
                .filter(|&i| batch[i].mnk == (m, n, k))
                .collect();
            let ops: Vec<GemmOperands<'_>> = members
                .iter()
                .map(|&i| GemmOperands {
                    a: MatRef::new(&**batch[i].a),
                    b: MatRef::new(&**batch[i].b),
                    c: MatRef::new(&**batch[i].c),
                    bias: None,
                })
                .collect();
            let spec = GemmSpec {
                m,
                n,
                k,
                b_transposed: false,
                relu: false,
                dtype: DType::F32,
                precision: self.config.precision,
                fuse: true,
                b_static: false,
            };
            self.phases.lap(&mut run, 0);
            self.launches.fetch_add(1, Ordering::Relaxed);
            self.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
            if let Err(e) = stream.gemm_batched(&spec, &ops) {
                for &i in &members {
                    results[i] = Err(e.to_string());
                }
            }
        }
        self.phases.lap(&mut run, 1);
        if let Err(e) = stream.synchronize() {
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(e.to_string());
            }
        }
        drop(batch);
        self.free.lock().push(index);
        self.phases.lap(&mut run, 2);
        results
    }
}
