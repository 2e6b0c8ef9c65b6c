//! A real model: the investigation's MLP (Linear+ReLU layers, 512→1024→1024→512), shared by
//! every thread.
//!
//! One [`Model`] holds the weights, uploaded once, read-only from then on, and read by every
//! stream at once. It is `Send + Sync` and cheap to clone; [`Model::infer`] may be called from
//! any thread. Each forward runs on an *execution context*: a stream of its own and scratch
//! buffers for the input, the hidden activations and the output. Contexts are pooled (taken
//! by a call, given back after it), so threads never share scratch memory and no context is
//! made per call after warm-up.
//!
//! A forward is one upload of the input rows, one product per layer with the bias and ReLU in
//! the product's epilogue (CUDA: multiq's small-batch kernel up to 32 rows, cuBLASLt
//! `RELU_BIAS`/`BIAS` above; CPU: in the same task), and one download of the output, all
//! queued on the context's stream and waited for once. Sessions replay a recorded forward
//! (see `Inner::forward`).
//!
//! Dynamic batching ([`ModelOptions::batching`]): concurrent `infer` calls are queued in a
//! `Batcher`; whichever caller leads concatenates the queued inputs (up to `max_rows` rows)
//! into its context's host staging buffer (host memory the device reads in place), queues the
//! forward as one recorded program (copy in, the products, copy out into the host staging
//! output), waits, splits the output by rows and hands each caller exactly its rows, then
//! passes leadership on. (`MULTIQ_PIPELINE=1` passes it on right after queueing the forward,
//! `Batcher::submit_staged`; measured slightly behind, see `pipelined`.) Up to `depth` batched forwards run at once, each on its own context. A request
//! with more rows than `max_rows` runs alone, unbatched.
//!
//! Bad input never reaches the device: the input's length is checked on the calling thread
//! (a whole, non-zero number of rows), so one thread's bad request fails alone. Rows with a NaN
//! input come back all NaN, as in PyTorch (NaN·w is NaN in the first layer, and PyTorch's ReLU
//! keeps NaN); multiq marks them on the host because a fused GPU ReLU epilogue may clamp NaN to
//! zero. Rows are independent in every product, so a NaN never reaches another row.
//!
//! Lifetimes: weights and context buffers are raw backend buffers owned here. Weights are
//! written once (synchronously) before any context exists; a context's buffers are used only
//! on its own stream, and every call waits for its stream before giving the context back, so
//! an idle context has no work queued. Dropping the model synchronizes every context's stream
//! before freeing anything.

pub mod weights;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

pub use crate::backend::Precision;
use crate::backend::{
    BackendBuffer, BackendProgram, BackendStream, DType, GemmOperands, GemmSpec, MatRef,
};
use crate::error::{Error, Result};
use crate::runtime::phases::Phases;
use crate::runtime::Device;
use crate::sync::batcher::Batcher;
pub use weights::{HostWeights, MlpSpec};

/// Rows per forward when a call runs unbatched and its input is larger.
pub const MAX_FORWARD_ROWS: usize = 4096;

/// Batched forwards in flight at once by default ([`Batching::depth`]). On the H200, 16
/// threads of batch-1 requests ran 199,386 / 282,940 / 322,615 / 341,529 samples/s at depth
/// 1 / 2 / 3 / 4 in the recorded call (bench/results/h200/mlp/README.md): with multiq's
/// small-batch kernel a forward leaves most of the device idle, so forwards of different
/// batches overlap. Depths 6 and 8 were faster still there (387k, 396k) at two to four more
/// contexts; 4 is what the recorded results use. (With the earlier kernel on the H100, depth
/// 4 was behind 2.)
pub const DEFAULT_BATCHING_DEPTH: usize = 4;

/// Dynamic batching of concurrent [`Model::infer`] calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Most rows in one batched forward (1..=4096).
    pub max_rows: usize,
    /// Batched forwards in flight at once, each on its own context (1..=64).
    pub depth: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_rows: 256,
            depth: DEFAULT_BATCHING_DEPTH,
        }
    }
}

/// How a model computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelOptions {
    /// fp32 (default) or TF32 products.
    pub precision: Precision,
    /// Dynamic batching of concurrent calls; `None` = each call runs its own forward.
    pub batching: Option<Batching>,
    /// Fuse bias and ReLU into each product's epilogue where the backend can (default true).
    pub fuse: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            precision: Precision::Strict,
            batching: None,
            fuse: true,
        }
    }
}

struct Layer {
    weight: Box<dyn BackendBuffer>,
    bias: Box<dyn BackendBuffer>,
    inp: usize,
    out: usize,
    relu: bool,
}

/// A stream and its scratch buffers: `acts[0]` the input, `acts[i]` the output of layer i.
struct Context {
    stream: Arc<dyn BackendStream>,
    rows: usize,
    acts: Vec<Box<dyn BackendBuffer>>,
    /// Host staging for batched inputs and outputs (reused).
    host_in: Vec<f32>,
    host_out: Vec<f32>,
    /// Batched forwards' input and output in host memory the device reads and writes in
    /// place ([`crate::backend::Backend::alloc_host`]), as many rows as `acts`; made on the
    /// context's first batched forward.
    staged: Option<[Box<dyn BackendBuffer>; 2]>,
    /// Recorded forwards by (row count, staged) (see [`Inner::forward`]); they refer to
    /// `acts` and `staged`, so they are dropped whenever those are reallocated.
    programs: HashMap<(usize, bool), Box<dyn BackendProgram>>,
    /// Forwards this context ran once unrecorded (the first run of a shape creates library
    /// handles and plans, which cannot happen while recording).
    warmed: HashSet<(usize, bool)>,
    /// Recording failed here once: forwards are queued directly from then on.
    unrecordable: bool,
}

/// Recorded forwards kept per context (one per row count seen).
const MAX_PROGRAMS: usize = 256;

type Reply = std::result::Result<Vec<f32>, String>;

struct Inner {
    device: Device,
    spec: MlpSpec,
    options: ModelOptions,
    layers: Vec<Layer>,
    idle: Mutex<Vec<Context>>,
    contexts: AtomicU64,
    batcher: Option<Batcher<Vec<f32>, Reply>>,
    forwards: AtomicU64,
    rows: AtomicU64,
    /// Diagnostic: where a batched forward's time goes (`MULTIQ_PHASES`).
    phases: Phases,
}

/// The MLP, shared by all threads (see the module doc).
#[derive(Clone)]
pub struct Model {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("spec", &self.inner.spec.describe())
            .field("options", &self.inner.options)
            .finish()
    }
}

/// Forwards run and rows in them so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModelStats {
    /// Forward passes (a batched forward counts once).
    pub forwards: u64,
    /// Rows through them.
    pub rows: u64,
    /// Execution contexts made (streams with scratch memory).
    pub contexts: u64,
}

impl Model {
    /// Loads the weights of `spec` from a safetensors file (every name, dtype and shape
    /// checked) and uploads them to `device`.
    pub fn load(
        device: &Device,
        path: &Path,
        spec: &MlpSpec,
        options: ModelOptions,
    ) -> Result<Model> {
        let w = weights::load(path, spec)?;
        Model::new(device, &w, options)
    }

    /// Uploads `weights` to `device`.
    pub fn new(device: &Device, weights: &HostWeights, options: ModelOptions) -> Result<Model> {
        weights.spec.check()?;
        if let Some(b) = options.batching {
            if b.max_rows == 0 || b.max_rows > MAX_FORWARD_ROWS {
                return Err(Error::invalid(format!(
                    "batching max rows must be between 1 and {MAX_FORWARD_ROWS}, got {}",
                    b.max_rows
                )));
            }
            if b.depth == 0 || b.depth > 64 {
                return Err(Error::invalid(format!(
                    "batching depth must be between 1 and 64, got {}",
                    b.depth
                )));
            }
        }
        let shapes = weights.spec.layers();
        if weights.layers.len() != shapes.len() {
            return Err(Error::Shape(format!(
                "{} layers of weights for the {} MLP ({} layers)",
                weights.layers.len(),
                weights.spec.describe(),
                shapes.len()
            )));
        }
        let backend = device.backend();
        let upload = backend.new_stream()?;
        let mut layers = Vec::with_capacity(shapes.len());
        let last = shapes.len() - 1;
        for (i, ((inp, out), (w, b))) in shapes.iter().zip(&weights.layers).enumerate() {
            // The spec's check keeps inp * out in range.
            if Some(w.len()) != inp.checked_mul(*out) || b.len() != *out {
                return Err(Error::Shape(format!(
                    "layer {i} ({}.weight, {}.bias): expected {out}x{inp} and {out} values, got {} and {}",
                    2 * i,
                    2 * i,
                    w.len(),
                    b.len()
                )));
            }
            let weight = backend.alloc(w.len())?;
            upload.upload(&*weight, w)?;
            let bias = backend.alloc(b.len())?;
            upload.upload(&*bias, b)?;
            layers.push(Layer {
                weight,
                bias,
                inp: *inp,
                out: *out,
                relu: i < last,
            });
        }
        upload.synchronize()?;
        let batcher = options
            .batching
            .map(|b| Batcher::new(b.max_rows, b.depth, device.info().wait));
        Ok(Model {
            inner: Arc::new(Inner {
                device: device.clone(),
                spec: weights.spec.clone(),
                options,
                layers,
                idle: Mutex::new(Vec::new()),
                contexts: AtomicU64::new(0),
                batcher,
                forwards: AtomicU64::new(0),
                rows: AtomicU64::new(0),
                phases: Phases::new(
                    "batched forward",
                    &[
                        "context+stage",
                        "upload",
                        "forward",
                        "download+sync",
                        "split+give back",
                    ],
                ),
            }),
        })
    }

    /// The architecture.
    pub fn spec(&self) -> &MlpSpec {
        &self.inner.spec
    }

    /// The options it was made with.
    pub fn options(&self) -> ModelOptions {
        self.inner.options
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.inner.device
    }

    /// Forwards, rows and contexts so far.
    pub fn stats(&self) -> ModelStats {
        ModelStats {
            forwards: self.inner.forwards.load(Ordering::Relaxed),
            rows: self.inner.rows.load(Ordering::Relaxed),
            contexts: self.inner.contexts.load(Ordering::Relaxed),
        }
    }

    /// Runs the model on `input` (row-major, a whole number of rows of the input width) and
    /// returns the output rows. Callable from any thread; with batching on, concurrent calls
    /// share forwards and each gets exactly its rows.
    pub fn infer(&self, input: &[f32]) -> Result<Vec<f32>> {
        let inner = &*self.inner;
        let width = inner.spec.input();
        if input.is_empty() {
            return Err(Error::Shape(format!(
                "empty batch: infer needs at least one row of {width} values"
            )));
        }
        if input.len() % width != 0 {
            return Err(Error::Shape(format!(
                "input of {} values is not a whole number of rows of {width} (the model's \
                 input width)",
                input.len()
            )));
        }
        let rows = input.len() / width;
        let mut out = match &inner.batcher {
            Some(b) if rows <= b_max(inner) => {
                let reply = if pipelined() {
                    b.submit_staged(
                        input.to_vec(),
                        rows,
                        |batch| inner.launch_batch(batch),
                        |pending| inner.complete_batch(pending),
                        |_| {},
                    )
                } else {
                    let run = |batch| inner.complete_batch(inner.launch_batch(batch));
                    b.submit(input.to_vec(), rows, run, |_| {})
                };
                match reply {
                    Ok(Ok(v)) => v,
                    Ok(Err(message)) | Err(message) => {
                        return Err(Error::Device {
                            op: "batched forward",
                            message,
                        })
                    }
                }
            }
            _ => inner.run_direct(input, rows)?,
        };
        mark_nan_rows(input, width, &mut out, inner.spec.output());
        Ok(out)
    }

    /// A context of this model held for repeated forwards of `rows` rows whose input stays on
    /// the device (the PyTorch batch sweep's measurement: input resident, a wait per forward).
    pub fn session(&self, rows: usize) -> Result<Session> {
        if rows == 0 || rows > MAX_FORWARD_ROWS {
            return Err(Error::Shape(format!(
                "a session runs 1..={MAX_FORWARD_ROWS} rows, got {rows}"
            )));
        }
        let ctx = self.inner.take_context(rows)?;
        Ok(Session {
            inner: self.inner.clone(),
            ctx: Some(ctx),
            rows,
        })
    }
}

/// Whether a batch leader passes leadership on as soon as its forward is queued
/// (`MULTIQ_PIPELINE=1`) or only once it completed (default). On the H100, 16 threads of
/// batch-1 requests ran 184k/181k/183k/190k samples/s passing it on early against
/// 187k/186k/196k/198k keeping it, in four calls (bench/results/h100/mlp/probes.md,
/// abedfbf/*/mlp-nopipeline*, mlp-pipeline*), so leaders keep it by default (at 4 and 8
/// threads the two were within 7% of each other, either way round). On the H200 at depth 4
/// it stayed a wash: 319,719 against 341,529 and 334,465 against 331,892 in two calls
/// (bench/results/h200/mlp/mlp-pipeline.txt, mlp/1e3b588-tile/mlp-pipeline.txt).
fn pipelined() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MULTIQ_PIPELINE").is_ok_and(|v| v == "1"))
}

fn b_max(inner: &Inner) -> usize {
    inner.options.batching.map_or(0, |b| b.max_rows)
}

/// Sets every output row whose input row holds a NaN to NaN (see the module doc).
fn mark_nan_rows(input: &[f32], width: usize, out: &mut [f32], out_width: usize) {
    for (row_in, row_out) in input.chunks(width).zip(out.chunks_mut(out_width)) {
        if row_in.iter().any(|v| v.is_nan()) {
            row_out.fill(f32::NAN);
        }
    }
}

impl Inner {
    /// An idle context with room for `rows` rows (made or grown as needed).
    fn take_context(&self, rows: usize) -> Result<Context> {
        let found = self.idle.lock().pop();
        let mut ctx = match found {
            Some(c) => c,
            None => {
                self.contexts.fetch_add(1, Ordering::Relaxed);
                Context {
                    stream: self.device.backend().new_stream()?,
                    rows: 0,
                    acts: Vec::new(),
                    host_in: Vec::new(),
                    host_out: Vec::new(),
                    staged: None,
                    programs: HashMap::new(),
                    warmed: HashSet::new(),
                    unrecordable: false,
                }
            }
        };
        if ctx.rows < rows {
            // The context is idle (no queued work), so the old buffers can go at once.
            let cap = rows.next_power_of_two().min(MAX_FORWARD_ROWS).max(rows);
            let backend = self.device.backend();
            let acts = self
                .spec
                .widths
                .iter()
                .map(|w| {
                    // The spec's check keeps a width times MAX_FORWARD_ROWS in range.
                    let n = w
                        .checked_mul(cap)
                        .ok_or_else(|| Error::Shape(format!("{w} x {cap} activations overflow")))?;
                    backend.alloc(n)
                })
                .collect::<Result<Vec<_>>>();
            match acts {
                Ok(a) => {
                    ctx.programs.clear();
                    ctx.warmed.clear();
                    ctx.acts = a;
                    ctx.staged = None;
                    ctx.rows = cap;
                }
                Err(e) => {
                    self.idle.lock().push(ctx);
                    return Err(e);
                }
            }
        }
        Ok(ctx)
    }

    fn give_back(&self, ctx: Context) {
        self.idle.lock().push(ctx);
    }

    /// Queues one forward of `rows` rows on `ctx`'s stream. With `replay`, the second
    /// forward of a shape on a context records it as a program (CUDA: a graph), and later
    /// ones replay it: one call queues the whole forward instead of one per layer (H100
    /// sweep, same call as graphs off: 1.26 × the forwards per second at 1 row, 1.46 × at 64).
    /// Sessions and batched forwards replay (each on a context its leader holds alone);
    /// unbatched `infer` queues its products directly: with 16 threads replaying graphs on
    /// their own contexts at once, unbatched requests ran at half the rate
    /// (bench/results/h100/mlp/README.md, 7db3fbe). With `staged`, the forward also copies
    /// its input from `ctx.staged[0]` and its output into `ctx.staged[1]` on the device.
    fn forward(&self, ctx: &mut Context, rows: usize, replay: bool, staged: bool) -> Result<()> {
        self.forwards.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        let key = (rows, staged);
        if let Some(p) = ctx.programs.get(&key) {
            return ctx.stream.replay(&**p);
        }
        let record = replay
            && crate::backend::recording_enabled()
            && !ctx.unrecordable
            && ctx.programs.len() < MAX_PROGRAMS
            && ctx.warmed.contains(&key);
        if record {
            let recorded = ctx
                .stream
                .record_program(&mut || self.queue_forward(ctx, rows, staged))?;
            match recorded {
                Some(p) => {
                    ctx.stream.replay(&*p)?;
                    ctx.programs.insert(key, p);
                    return Ok(());
                }
                None => ctx.unrecordable = true,
            }
        }
        self.queue_forward(ctx, rows, staged)?;
        ctx.warmed.insert(key);
        Ok(())
    }

    /// Queues one forward's device work on `ctx`'s stream: the staged input copy (with
    /// `staged`), the products, the staged output copy.
    fn queue_forward(&self, ctx: &Context, rows: usize, staged: bool) -> Result<()> {
        let stage = match (&ctx.staged, staged) {
            (Some(s), true) => Some(s),
            (None, true) => return Err(Error::invalid("a staged forward without staging")),
            _ => None,
        };
        let last = self.layers.len();
        if let Some([stage_in, _]) = stage {
            let n = rows * self.spec.input();
            ctx.stream.copy(&**stage_in, 0, &*ctx.acts[0], 0, n)?;
        }
        self.queue_products(ctx, rows)?;
        if let Some([_, stage_out]) = stage {
            let n = rows * self.spec.output();
            ctx.stream.copy(&*ctx.acts[last], 0, &**stage_out, 0, n)?;
        }
        Ok(())
    }

    /// Queues the products of one forward of `rows` rows on `ctx`'s stream.
    fn queue_products(&self, ctx: &Context, rows: usize) -> Result<()> {
        for (i, l) in self.layers.iter().enumerate() {
            let spec = GemmSpec {
                m: rows,
                n: l.out,
                k: l.inp,
                b_transposed: true,
                relu: l.relu,
                dtype: DType::F32,
                precision: self.options.precision,
                fuse: self.options.fuse,
                b_static: true,
            };
            ctx.stream.gemm(
                &spec,
                &GemmOperands {
                    a: MatRef::new(&*ctx.acts[i]),
                    b: MatRef::new(&*l.weight),
                    c: MatRef::new(&*ctx.acts[i + 1]),
                    bias: Some(MatRef::new(&*l.bias)),
                },
            )?;
        }
        Ok(())
    }

    /// Host rows in, host rows out, on a context of its own (in chunks of at most
    /// [`MAX_FORWARD_ROWS`]).
    fn run_direct(&self, input: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (win, wout) = (self.spec.input(), self.spec.output());
        let chunk = rows.min(MAX_FORWARD_ROWS);
        let mut ctx = self.take_context(chunk)?;
        let mut out = vec![0f32; rows * wout];
        let result = (|| {
            for (src, dst) in input.chunks(chunk * win).zip(out.chunks_mut(chunk * wout)) {
                let r = src.len() / win;
                ctx.stream.upload_at(&*ctx.acts[0], 0, src)?;
                self.forward(&mut ctx, r, false, false)?;
                ctx.stream
                    .download_at(&*ctx.acts[self.layers.len()], 0, dst)?;
            }
            Ok(())
        })();
        self.finish(ctx, &result);
        result.map(|()| out)
    }

    /// Gives a context back after a call; after a failure, first waits for its stream so no
    /// queued work outlives the call (the error is the call's; this wait's is dropped).
    fn finish(&self, ctx: Context, result: &Result<()>) {
        if result.is_err() {
            let _ = ctx.stream.synchronize();
        }
        self.give_back(ctx);
    }

    /// Starts one batched forward over the queued requests (the batcher's `launch`): stages
    /// their rows in the context's host-visible input and queues the forward, which leaves
    /// its output in the host-visible output; [`complete_batch`](Self::complete_batch) waits
    /// for it.
    fn launch_batch(&self, batch: Vec<Vec<f32>>) -> PendingBatch {
        let win = self.spec.input();
        let sizes: Vec<usize> = batch.iter().map(|r| r.len() / win).collect();
        let rows: usize = sizes.iter().sum();
        let mut run = self.phases.start();
        let ctx = self.take_context(rows).and_then(|mut ctx| {
            if let Err(e) = self.stage(&mut ctx) {
                self.give_back(ctx);
                return Err(e);
            }
            Ok(ctx)
        });
        let mut ctx = match ctx {
            Ok(c) => c,
            Err(e) => {
                return PendingBatch {
                    ctx: None,
                    sizes,
                    result: Err(e),
                    run,
                }
            }
        };
        let mut host_in = std::mem::take(&mut ctx.host_in);
        host_in.clear();
        for r in &batch {
            host_in.extend_from_slice(r);
        }
        self.phases.lap(&mut run, 0);
        let result = (|| {
            let [stage_in, _] = ctx.staged.as_ref().expect("staged above");
            ctx.stream.upload_at(&**stage_in, 0, &host_in)?;
            self.phases.lap(&mut run, 1);
            self.forward(&mut ctx, rows, true, true)
        })();
        self.phases.lap(&mut run, 2);
        ctx.host_in = host_in;
        PendingBatch {
            ctx: Some(ctx),
            sizes,
            result,
            run,
        }
    }

    /// Makes `ctx`'s host-visible staging buffers if it has none (as many rows as `acts`).
    fn stage(&self, ctx: &mut Context) -> Result<()> {
        if ctx.staged.is_none() {
            let backend = self.device.backend();
            let stage_in = backend.alloc_host(ctx.rows * self.spec.input())?;
            let stage_out = backend.alloc_host(ctx.rows * self.spec.output())?;
            // Recorded staged forwards referred to the old buffers (none exist: `staged` is
            // only dropped with `acts`, which clears them), so nothing else changes.
            ctx.staged = Some([stage_in, stage_out]);
        }
        Ok(())
    }

    /// Waits for a batched forward and splits its output by request (the batcher's
    /// `complete`).
    fn complete_batch(&self, pending: PendingBatch) -> Vec<Reply> {
        let PendingBatch {
            ctx,
            sizes,
            result,
            mut run,
        } = pending;
        let fail = |e: &Error| sizes.iter().map(|_| Err(e.to_string())).collect();
        let Some(mut ctx) = ctx else {
            return match &result {
                Err(e) => fail(e),
                Ok(()) => fail(&Error::invalid("a batch without a context")),
            };
        };
        let wout = self.spec.output();
        let rows: usize = sizes.iter().sum();
        let mut host_out = std::mem::take(&mut ctx.host_out);
        host_out.resize(rows * wout, 0.0);
        let result = result.and_then(|()| {
            let [_, stage_out] = ctx.staged.as_ref().expect("a launched batch is staged");
            ctx.stream
                .download_at(&**stage_out, 0, &mut host_out[..rows * wout])
        });
        self.phases.lap(&mut run, 3);
        let replies = match &result {
            Ok(()) => {
                let mut at = 0;
                sizes
                    .iter()
                    .map(|r| {
                        let n = r * wout;
                        let v = host_out[at..at + n].to_vec();
                        at += n;
                        Ok(v)
                    })
                    .collect()
            }
            Err(e) => fail(e),
        };
        ctx.host_out = host_out;
        self.finish(ctx, &result);
        self.phases.lap(&mut run, 4);
        replies
    }
}

/// A batched forward between [`Inner::launch_batch`] and [`Inner::complete_batch`].
struct PendingBatch {
    /// The context it runs on (`None` when none could be had: `result` says why).
    ctx: Option<Context>,
    /// Rows of each request, in batch order.
    sizes: Vec<usize>,
    /// Whether everything was queued.
    result: Result<()>,
    run: crate::runtime::phases::Run,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Every idle context's stream finishes before any buffer (weights included) is freed.
        for ctx in self.idle.get_mut().iter() {
            let _ = ctx.stream.synchronize();
        }
    }
}

/// A held context for repeated forwards with the input on the device (see
/// [`Model::session`]). Gives the context back when dropped.
pub struct Session {
    inner: Arc<Inner>,
    ctx: Option<Context>,
    rows: usize,
}

impl Session {
    fn ctx(&self) -> &Context {
        self.ctx.as_ref().expect("a session holds its context")
    }

    /// Rows per forward.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Copies `input` (`rows` rows) to the device; it stays there for every [`run`](Self::run).
    pub fn load_input(&mut self, input: &[f32]) -> Result<()> {
        let want = self.rows * self.inner.spec.input();
        if input.len() != want {
            return Err(Error::Shape(format!(
                "a session of {} rows takes {want} input values, got {}",
                self.rows,
                input.len()
            )));
        }
        let ctx = self.ctx();
        ctx.stream.upload_at(&*ctx.acts[0], 0, input)?;
        ctx.stream.synchronize()
    }

    /// One forward of the resident input, waited for.
    pub fn run(&mut self) -> Result<()> {
        let ctx = self.ctx.as_mut().expect("a session holds its context");
        self.inner.forward(ctx, self.rows, true, false)?;
        ctx.stream.synchronize()
    }

    /// The output of the last forward.
    pub fn read_output(&mut self) -> Result<Vec<f32>> {
        let ctx = self.ctx();
        let mut out = vec![0f32; self.rows * self.inner.spec.output()];
        ctx.stream
            .download_at(&*ctx.acts[self.inner.layers.len()], 0, &mut out)?;
        Ok(out)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            let _ = ctx.stream.synchronize();
            self.inner.give_back(ctx);
        }
    }
}

/// The model's output for `input` computed on the host in f64 (the reference the tests and
/// the numerics check compare with). ReLU keeps NaN, as PyTorch's.
pub fn reference_forward(weights: &HostWeights, input: &[f32]) -> Vec<f64> {
    let mut x: Vec<f64> = input.iter().map(|&v| f64::from(v)).collect();
    let last = weights.layers.len().saturating_sub(1);
    for (i, ((inp, out), (w, b))) in weights
        .spec
        .layers()
        .into_iter()
        .zip(&weights.layers)
        .enumerate()
    {
        let rows = x.len() / inp;
        let mut y = vec![0f64; rows * out];
        for r in 0..rows {
            let xr = &x[r * inp..(r + 1) * inp];
            for o in 0..out {
                let wr = &w[o * inp..(o + 1) * inp];
                let mut acc = f64::from(b[o]);
                for (a, c) in xr.iter().zip(wr) {
                    acc += a * f64::from(*c);
                }
                if i < last && acc < 0.0 {
                    acc = 0.0;
                }
                y[r * out + o] = acc;
            }
        }
        x = y;
    }
    x
}

/// Normwise relative error `max|got - want| / max|want|` (infinite if the lengths differ or a
/// value is NaN where the reference is not, or the other way round; NaN where both are NaN
/// counts as equal).
pub fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    let mut worst = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        let g = f64::from(g);
        match (g.is_nan(), w.is_nan()) {
            (true, true) => continue,
            (true, false) | (false, true) => return f64::INFINITY,
            _ => worst = worst.max((g - w).abs()),
        }
    }
    worst / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn model_is_send_and_sync() {
        assert_send_sync::<Model>();
    }

    #[test]
    fn nan_rows_are_marked_and_others_untouched() {
        let input = [1.0, f32::NAN, 2.0, 3.0];
        let mut out = [5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        mark_nan_rows(&input, 2, &mut out, 3);
        assert!(out[..3].iter().all(|v| v.is_nan()));
        assert_eq!(&out[3..], &[8.0, 9.0, 10.0]);
    }
}
