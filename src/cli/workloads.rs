//! The model workloads on the command line: `multiq bench matmul`, `multiq bench mlp`,
//! `multiq weights`, and the hidden `multiq mlp-run` (the numerics check's multiq side).

use std::path::PathBuf;

use clap::Args;
use multiq::bench::matmul::{self, MatmulBenchConfig};
use multiq::bench::mlp::{self, MlpBenchConfig};
use multiq::bench::results;
use multiq::bench::workload::{self, Length, WorkloadFile, WorkloadRow};
use multiq::model::weights::{self, HostWeights, MlpSpec};
use multiq::model::{Batching, Model, ModelOptions};
use multiq::tensor::seeded_values;
use multiq::{Device, Error, MatmulCoalescerConfig, Precision};

use super::{DeviceArgs, EXIT_FAILURE};

const MATMUL_HELP: &str = "fp32 matrix products C = A·B of n×n matrices from 1-16 threads, a \
    wait after every product, as PyTorch's anchor (torch.mm then synchronize; each thread its own \
    A and B; a one-second window per configuration). Scenarios: per-thread (a stream each), \
    shared (one stream), coalesced (concurrent products merged into one batched launch), and \
    limit (one thread, large batched launches: the device's GEMM rate, measured in the same \
    run). Strict fp32 unless --tf32. Each thread's last C is checked against a float64 \
    reference (sampled rows) within |C - C64| <= 2·k·2^-24·(|A|·|B|).";

const MLP_HELP: &str = "The MLP 512→1024→1024→512 (ReLU). The sweep: one thread, batch sizes \
    1-1024, input resident on the device, a wait after every forward (as PyTorch's anchor: 500 \
    forwards after 20 warm-ups). The request runs: 1-16 threads each sending batch-1 requests \
    through Model::infer (input and output copied between host and device), dynamic batching \
    off and on, a one-second window: samples/s and latency p50/p99. Outputs are checked \
    against a float64 reference.";

#[derive(Args, Debug)]
#[command(long_about = MATMUL_HELP)]
pub struct MatmulArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Matrix sizes n, comma-separated.
    #[arg(long, value_name = "LIST", default_value = "64,256,1024,4096")]
    pub sizes: String,
    /// Thread counts, comma-separated.
    #[arg(long, value_name = "LIST", default_value = "1,2,4,8,16")]
    pub threads: String,
    /// Seconds per configuration.
    #[arg(
        long,
        value_name = "S",
        allow_hyphen_values = true,
        default_value_t = 1.0
    )]
    pub seconds: f64,
    /// Coalescing, comma-separated: off (a launch per product, per-thread and shared streams),
    /// on (the coalescer).
    #[arg(long, value_name = "LIST", default_value = "off,on")]
    pub coalesce: String,
    /// Streams of the uncoalesced runs: both, per-thread or shared.
    #[arg(long, value_name = "WHICH", default_value = "both")]
    pub scenario: String,
    /// Coalescer: most products per batched launch.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_batch: usize,
    /// Coalescer: batched launches in flight at once (each on its own stream).
    #[arg(long, value_name = "N", default_value_t = multiq::runtime::DEFAULT_MATMUL_DEPTH)]
    pub depth: usize,
    /// Products per launch of the device-limit run, at most (0: no limit run).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub limit_batch: usize,
    /// TF32 tensor cores instead of strict fp32 (labelled `tf32` in the results).
    #[arg(long)]
    pub tf32: bool,
    /// Write the rows as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[command(long_about = MLP_HELP)]
pub struct MlpArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Batch sizes of the sweep, comma-separated (empty: no sweep).
    #[arg(long, value_name = "LIST", default_value = "1,8,64,256,1024")]
    pub batches: String,
    /// Timed forwards per batch size in the sweep.
    #[arg(long, value_name = "N", allow_hyphen_values = true, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub iters: u64,
    /// Thread counts of the batch-1 request runs, comma-separated (empty: none).
    #[arg(long, value_name = "LIST", default_value = "1,2,4,8,16")]
    pub threads: String,
    /// Seconds per request run.
    #[arg(
        long,
        value_name = "S",
        allow_hyphen_values = true,
        default_value_t = 1.0
    )]
    pub seconds: f64,
    /// Dynamic batching in the request runs, comma-separated: off, on.
    #[arg(long, value_name = "LIST", default_value = "off,on")]
    pub batching: String,
    /// Dynamic batching: most rows per batched forward.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_rows: usize,
    /// Dynamic batching: batched forwards in flight at once.
    #[arg(long, value_name = "N", default_value_t = multiq::model::DEFAULT_BATCHING_DEPTH)]
    pub depth: usize,
    /// TF32 tensor cores instead of strict fp32.
    #[arg(long)]
    pub tf32: bool,
    /// Bias and ReLU in a separate pass instead of the products' epilogue.
    #[arg(long)]
    pub no_fuse: bool,
    /// Weights (safetensors, nn.Sequential layout); default: seeded random weights.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Write the rows as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct WeightsArgs {
    /// The safetensors file to write.
    #[arg(long, value_name = "FILE", required = true)]
    pub out: PathBuf,
    /// Seed of the random weights (decimal or 0x-hex).
    #[arg(long, value_name = "SEED", allow_hyphen_values = true, default_value = "0", value_parser = multiq::stress::rng::parse_seed)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct MlpRunArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Weights (safetensors).
    #[arg(long, value_name = "FILE", required = true)]
    pub weights: PathBuf,
    /// Rows of the seeded input.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub rows: usize,
    /// Seed of the input (decimal or 0x-hex).
    #[arg(long, value_name = "SEED", allow_hyphen_values = true, default_value = "1", value_parser = multiq::stress::rng::parse_seed)]
    pub seed: u64,
    /// Run the rows as concurrent batch-1 requests with dynamic batching on.
    #[arg(long)]
    pub batching: bool,
    /// TF32 products.
    #[arg(long)]
    pub tf32: bool,
    /// Where to write `input` and `output` (safetensors, F32 [rows, 512] each).
    #[arg(long, value_name = "FILE", required = true)]
    pub out: PathBuf,
}

fn list(flag: &str, s: &str, allow_empty: bool) -> Result<Vec<usize>, Error> {
    if s.trim().is_empty() {
        return if allow_empty {
            Ok(Vec::new())
        } else {
            Err(Error::invalid(format!("--{flag}: the list is empty")))
        };
    }
    let values = s
        .split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "--{flag} `{s}`: `{p}` is not a positive whole number"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    crate::cli::once_each(&format!("--{flag}"), &values, usize::to_string)?;
    Ok(values)
}

fn switches(flag: &str, s: &str) -> Result<Vec<bool>, Error> {
    let values = s
        .split(',')
        .map(|p| match p.trim() {
            "off" => Ok(false),
            "on" => Ok(true),
            other => Err(Error::invalid(format!(
                "--{flag}: `{other}` is not off or on (allowed: off, on)"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let name = |&on: &bool| if on { "on" } else { "off" }.to_string();
    crate::cli::once_each(&format!("--{flag}"), &values, name)?;
    Ok(values)
}

fn seconds(s: f64) -> Result<Length, Error> {
    if !(s > 0.0 && s <= 3600.0) {
        return Err(Error::invalid(format!(
            "--seconds {s}: must be in (0, 3600]"
        )));
    }
    Ok(Length::Seconds(s))
}

fn precision(tf32: bool) -> Precision {
    if tf32 {
        Precision::Tf32
    } else {
        Precision::Strict
    }
}

fn open(dev: &DeviceArgs) -> Result<Device, Error> {
    let device = Device::open(&dev.options())?;
    if let Some(why) = device.fallback_reason() {
        multiq::outln!("note: CUDA not used ({why}); running on the CPU backend")?;
    }
    Ok(device)
}

fn finish(
    device: &Device,
    started_at: String,
    json: &Option<PathBuf>,
    rows: Vec<WorkloadRow>,
) -> Result<i32, Error> {
    let bad = rows.iter().filter(|r| !r.verified).count();
    if let Some(path) = json {
        let file = WorkloadFile::new(device.info().clone(), started_at, Vec::new(), rows);
        results::write_json(path, &file)?;
        results::say_written(path, format_args!("results written to {}", path.display()))?;
    }
    if bad > 0 {
        eprintln!("multiq: FAILED: {bad} run(s) did not match the float64 reference");
        return Ok(EXIT_FAILURE);
    }
    Ok(0)
}

pub fn run_matmul(a: &MatmulArgs) -> Result<i32, Error> {
    let sizes = list("sizes", &a.sizes, false)?;
    let threads = multiq::bench::parse_thread_list(&a.threads)?;
    let coalesce = switches("coalesce", &a.coalesce)?;
    let scenarios = match a.scenario.as_str() {
        "both" => vec!["per-thread", "shared"],
        "per-thread" => vec!["per-thread"],
        "shared" => vec!["shared"],
        other => {
            return Err(Error::invalid(format!(
                "--scenario `{other}` (allowed: both, per-thread, shared)"
            )))
        }
    };
    if sizes.iter().any(|&n| n > 16384) {
        return Err(Error::invalid(format!(
            "--sizes `{}`: at most 16384",
            a.sizes
        )));
    }
    if a.max_batch == 0 || a.max_batch > 4096 || a.depth == 0 || a.depth > 64 {
        return Err(Error::invalid(format!(
            "--max-batch {} / --depth {}: must be 1..=4096 and 1..=64",
            a.max_batch, a.depth
        )));
    }
    let cfg = MatmulBenchConfig {
        sizes,
        threads,
        scenarios,
        coalesce: coalesce.contains(&true),
        uncoalesced: coalesce.contains(&false),
        length: seconds(a.seconds)?,
        precision: precision(a.tf32),
        coalescer: MatmulCoalescerConfig {
            max_batch: a.max_batch,
            depth: a.depth,
            precision: precision(a.tf32),
        },
        limit_batch: a.limit_batch,
    };
    if let Some(p) = &a.json {
        results::check_writable(p)?;
    }
    let device = open(&a.device)?;
    let info = device.info();
    multiq::outln!(
        "multiq bench matmul on {} ({} backend, wait {}, {})",
        info.name,
        info.backend,
        info.wait,
        cfg.precision
    )?;
    let started_at = results::now_rfc3339();
    multiq::out!("{}", workload::table("matmul", &[]))?;
    let rows = matmul::run(&device, &cfg, live_row)?;
    finish(&device, started_at, &a.json, rows)
}

/// Prints a row of a workload table as it is measured (the table's header was printed
/// before; a failed write is `main`'s to report, see `multiq::stdout`).
fn live_row(r: &WorkloadRow) {
    let row = workload::table("", &[r]);
    let _ = multiq::out!("{}\n", row.lines().nth(2).unwrap_or_default());
}

pub fn run_mlp(a: &MlpArgs) -> Result<i32, Error> {
    let cfg = MlpBenchConfig {
        batches: list("batches", &a.batches, true)?,
        sweep_iters: a.iters,
        threads: if a.threads.trim().is_empty() {
            Vec::new()
        } else {
            multiq::bench::parse_thread_list(&a.threads)?
        },
        batching: switches("batching", &a.batching)?,
        length: seconds(a.seconds)?,
        batching_opts: Batching {
            max_rows: a.max_rows,
            depth: a.depth,
        },
        precision: precision(a.tf32),
        fuse: !a.no_fuse,
        weights: a.weights.clone(),
    };
    let b = cfg.batching_opts;
    if b.max_rows == 0 || b.max_rows > multiq::model::MAX_FORWARD_ROWS {
        return Err(Error::invalid(format!(
            "--max-rows {}: must be 1..={}",
            b.max_rows,
            multiq::model::MAX_FORWARD_ROWS
        )));
    }
    if b.depth == 0 || b.depth > 64 {
        return Err(Error::invalid(format!(
            "--depth {}: must be 1..=64",
            b.depth
        )));
    }
    if cfg
        .batches
        .iter()
        .any(|&b| b > multiq::model::MAX_FORWARD_ROWS)
    {
        return Err(Error::invalid(format!(
            "--batches: at most {} rows per forward",
            multiq::model::MAX_FORWARD_ROWS
        )));
    }
    if let Some(p) = &a.json {
        results::check_writable(p)?;
    }
    let device = open(&a.device)?;
    let info = device.info();
    multiq::outln!(
        "multiq bench mlp on {} ({} backend, wait {}, {})",
        info.name,
        info.backend,
        info.wait,
        cfg.precision
    )?;
    let started_at = results::now_rfc3339();
    multiq::out!("{}", workload::table("mlp", &[]))?;
    let rows = mlp::run(&device, &cfg, live_row)?;
    finish(&device, started_at, &a.json, rows)
}

pub fn write_weights(a: &WeightsArgs) -> Result<i32, Error> {
    let spec = MlpSpec::default();
    let w = HostWeights::random(&spec, a.seed)?;
    weights::write(&a.out, &w)?;
    results::say_written(
        &a.out,
        format_args!(
            "wrote {} ({} MLP, {} parameters, seed {})",
            a.out.display(),
            spec.describe(),
            spec.parameters(),
            a.seed
        ),
    )?;
    Ok(0)
}

pub fn mlp_run(a: &MlpRunArgs) -> Result<i32, Error> {
    if a.rows == 0 || a.rows > multiq::model::MAX_FORWARD_ROWS {
        return Err(Error::invalid(format!(
            "--rows {}: must be 1..={}",
            a.rows,
            multiq::model::MAX_FORWARD_ROWS
        )));
    }
    let spec = MlpSpec::default();
    let device = open(&a.device)?;
    let model = Model::load(
        &device,
        &a.weights,
        &spec,
        ModelOptions {
            precision: precision(a.tf32),
            batching: a.batching.then(Batching::default),
            fuse: true,
        },
    )?;
    let input = seeded_values(a.seed, a.rows * spec.input());
    let output = if a.batching {
        // Each row as its own request from its own thread, concurrently.
        let w = spec.input();
        let handles: Vec<_> = (0..a.rows)
            .map(|r| {
                let (m, row) = (model.clone(), input[r * w..(r + 1) * w].to_vec());
                std::thread::spawn(move || m.infer(&row))
            })
            .collect();
        let mut out = Vec::with_capacity(a.rows * spec.output());
        for h in handles {
            out.extend(
                h.join()
                    .map_err(|_| Error::invalid("a request thread panicked"))??,
            );
        }
        out
    } else {
        model.infer(&input)?
    };
    let to_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (ib, ob) = (to_bytes(&input), to_bytes(&output));
    let views = vec![
        (
            "input",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![a.rows, spec.input()],
                &ib,
            )
            .map_err(|e| Error::invalid(e.to_string()))?,
        ),
        (
            "output",
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![a.rows, spec.output()],
                &ob,
            )
            .map_err(|e| Error::invalid(e.to_string()))?,
        ),
    ];
    safetensors::tensor::serialize_to_file(views, None, &a.out)
        .map_err(|e| Error::invalid(format!("{}: {e}", a.out.display())))?;
    multiq::outln!(
        "wrote {} ({} rows through {} on {}, {})",
        a.out.display(),
        a.rows,
        spec.describe(),
        device.info().name,
        precision(a.tf32)
    )?;
    Ok(0)
}
