//! Command-line interface: argument definitions and the one-line error policy.
//!
//! Usage errors print one line naming the flag (and the allowed values) and exit with 2.
//! Failures while running (a device error, a verification mismatch) exit with 1.

pub mod workloads;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use multiq::bench::{Preset, Scenario};
use multiq::{BackendKind, CoalescePolicy, DeviceOptions, LockMode, WaitPolicy};

/// Exit code for usage errors.
pub const EXIT_USAGE: i32 = 2;
/// Exit code for failures while running.
pub const EXIT_FAILURE: i32 = 1;

#[derive(Parser, Debug)]
#[command(
    name = "multiq",
    version,
    about = "Many threads sharing one GPU safely: stream pool, submission locks, and the study \
             that measures them",
    long_about = "multiq runs many threads on one device (an NVIDIA GPU through CUDA, or the CPU \
                  backend everywhere else): a pool of per-thread streams, a choice of submission \
                  lock, and a benchmark that measures how throughput scales with threads.\n\n\
                  Start with `multiq bench` (the whole study) or `multiq bench queues --help`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the whole study, or one benchmark (`multiq bench queues`).
    #[command(
        long_about = "With no sub-command: the whole study. Every preset (heavy, default, light, \
                      minimal), a shared stream and a stream per thread, 1-16 threads with a \
                      wait after every op; then at 16 threads every lock mode and async \
                      submission (8 in flight). Each table is followed by a verdict computed from \
                      its numbers. On the CPU backend the presets are scaled down so the study \
                      finishes in about two minutes on 2 cores; what was scaled is printed first.",
        args_conflicts_with_subcommands = true
    )]
    Bench(Box<BenchArgs>),
    /// Show which backends and devices multiq can use on this machine.
    Info(DeviceArgs),
    /// Write a report (report.md and SVG charts) from stored results files.
    #[command(long_about = REPORT_HELP)]
    Report(ReportArgs),
    /// Stress and crash-rate harness: rounds of threads, shutdowns, panics and faults,
    /// checked for crashes, hangs, wrong answers and leaks.
    #[command(long_about = STRESS_HELP)]
    Stress(Box<StressArgs>),
    /// Write seeded random MLP weights (512→1024→1024→512) as safetensors, in the layout of
    /// PyTorch's nn.Sequential state dict.
    Weights(workloads::WeightsArgs),
    /// Run the MLP on a seeded input and write input and output (the numerics check).
    #[command(hide = true)]
    MlpRun(Box<workloads::MlpRunArgs>),
}

const STRESS_HELP: &str = "Runs rounds until --rounds or --seconds, whichever comes first. \
    A round opens a device and a stream pool, then threads run a random mix of ops (simple_compute \
    launches through an in-flight window, grouped launches, launches on a shared stream and on \
    buffers shared by all threads, dropped and polled tickets, read-backs, rewrites, stream \
    switches, matrix products, calls into an MLP shared by the round's threads) with a random \
    lock mode, pool size, coalescing policy, window depth and wait policy, \
    and at a random moment the round ends in one of these ways: orderly; shutdown with ops in \
    flight (tickets dropped, pool and device dropped, then every buffer read back); everything \
    dropped in flight; the device and pool dropped by another thread while the others submit; a \
    thread panicking mid-op; an injected fault (an allocation larger than free memory, or until \
    the device runs out, a buffer of another device, zero lengths, another thread's stream, a \
    stream index past the pool, a write of the wrong length, another pool's stream, bad windows \
    and pools, wrong shapes). Other kinds of rounds: oversubscribe (256 threads on 32 streams), churn \
    (hundreds of short-lived threads taking and releasing streams), exit (a child process exits, \
    returns from main or tears down its thread-locals with work in flight).\n\n\
    Every op submitted is covered by a read-back compared with a serial reference (CPU: \
    bit-identical; CUDA: within the backend's tolerance; products and the MLP: their f64 \
    references within their bounds); a wrong call must get its typed error, \
    in its own thread only; a round must finish before its deadline (else the stuck threads are \
    named); live devices, pools, streams, buffers, threads, device and process memory must come \
    back after each round. Rounds run in a worker process: a crash is counted with the round's \
    seed and the run goes on in a new worker.\n\n\
    --units and --wait fix the CPU units and the wait policy for every round; by default each \
    round draws them. --queue-chain on|off fixes the CUDA device queue's chaining for every \
    round with coalescing persistent; by default each such round draws it. Each failure is printed with its round's seed and a command that replays \
    it (--round-seed). \
    The last line is the summary: rounds=N ops=N crashes=N hangs=N mismatches=N leaks=N errors=N \
    seconds=S (each failure count is the number of rounds with such a finding).\n\n\
    Exit codes: 0 nothing failed; 1 any crash, hang, mismatch, leak or error; 2 usage errors.";

#[derive(Args, Debug, Clone)]
pub struct StressArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Rounds to run at most.
    #[arg(long, allow_hyphen_values = true, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub rounds: u64,
    /// Time limit in seconds: no round starts after it (the run ends within a round's time).
    #[arg(long, allow_hyphen_values = true, value_name = "S", value_parser = parse_stress_seconds)]
    pub seconds: Option<f64>,
    /// Threads of a mixed round.
    #[arg(long, allow_hyphen_values = true, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub threads: u64,
    /// Master seed (decimal or 0x-hex); each round's seed is drawn from it [default: from the
    /// clock, printed].
    #[arg(long, value_name = "SEED", allow_hyphen_values = true, value_parser = parse_seed_arg)]
    pub seed: Option<u64>,
    /// Run only the round with this seed (as printed with a failure), with the same
    /// --backend, --threads, --kinds, --units, --wait, --coalesce and --queue-chain (the replay
    /// command printed with a failure has them all; --seed, --rounds and --seconds do not apply).
    #[arg(long, value_name = "SEED", allow_hyphen_values = true, value_parser = parse_seed_arg)]
    pub round_seed: Option<u64>,
    /// Kinds of rounds to draw from, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub kinds: Vec<multiq::stress::plan::RoundKind>,
    /// Coalescing policies rounds draw from, comma-separated: off, fixed, adaptive, persistent
    /// [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub coalesce: Vec<multiq::stress::plan::CoalesceKind>,
    /// A round's deadline in seconds; past it the round is a hang and its stuck threads are
    /// named.
    #[arg(long, allow_hyphen_values = true, value_name = "S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub round_timeout: u64,
    /// Device memory (MiB) that may stay missing after a round before it counts as a leak
    /// (where the backend reports free device memory: CUDA).
    #[arg(long, allow_hyphen_values = true, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    pub device_leak_mib: u64,
    /// Write the results as JSON to FILE (written whole at the end).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Print a line for every round.
    #[arg(long)]
    pub verbose: bool,
    /// Run the rounds in this process instead of a supervised worker process (for debugging:
    /// a crash then ends the run, and a hang exits with status 3).
    #[arg(long)]
    pub in_process: bool,
    /// Test hook: make the first round fail on purpose (hang, mismatch, leak, crash, panic),
    /// to show that the failure is detected.
    #[arg(long, hide = true, value_enum, value_delimiter = ',')]
    pub inject: Vec<InjectChoice>,
    /// Internal: run as the worker process of a supervisor.
    #[arg(long, hide = true)]
    pub worker: bool,
    /// Internal: run as the child process of an exit round.
    #[arg(long, hide = true)]
    pub child: bool,
    /// Internal (worker): the first round to run.
    #[arg(long, hide = true, default_value_t = 0)]
    pub first_round: u64,
    /// Internal (worker): start no round after this many milliseconds.
    #[arg(long, hide = true)]
    pub stop_after_ms: Option<u64>,
}

/// Failures the test hook can cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InjectChoice {
    /// A worker thread blocks forever.
    Hang,
    /// A buffer is overwritten behind the model's back.
    Mismatch,
    /// A buffer is leaked.
    Leak,
    /// The worker process aborts.
    Crash,
    /// A worker thread panics unplanned.
    Panic,
}

/// `--seconds` of stress: a number of seconds, fractions allowed, above 0 and at most a year.
fn parse_stress_seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 31_536_000.0 => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds in (0, 31536000]")),
    }
}

fn parse_seed_arg(s: &str) -> Result<u64, String> {
    multiq::stress::rng::parse_seed(s)
}

impl StressArgs {
    /// The run these arguments ask for.
    pub fn config(&self) -> multiq::stress::StressConfig {
        use multiq::stress::plan::RoundKind;
        let opts = self.device.options();
        let has = |c| self.inject.contains(&c);
        multiq::stress::StressConfig {
            backend: opts.backend,
            units: opts.cpu_units,
            wait: opts.wait,
            queue_chain: opts.queue_chain,
            rounds: self.rounds,
            seconds: self.seconds,
            threads: self.threads as usize,
            seed: self.seed,
            round_seed: self.round_seed,
            kinds: if self.kinds.is_empty() {
                RoundKind::ALL.to_vec()
            } else {
                let mut k = self.kinds.clone();
                k.sort_by_key(|k| *k as u8);
                k.dedup();
                k
            },
            coalesce: if self.coalesce.is_empty() {
                multiq::stress::plan::CoalesceKind::ALL.to_vec()
            } else {
                let mut c = self.coalesce.clone();
                c.sort_by_key(|k| *k as u8);
                c.dedup();
                c
            },
            round_timeout: std::time::Duration::from_secs(self.round_timeout),
            device_leak_tolerance: self.device_leak_mib << 20,
            json: self.json.clone(),
            in_process: self.in_process,
            verbose: self.verbose,
            hooks: multiq::stress::Hooks {
                hang: has(InjectChoice::Hang),
                mismatch: has(InjectChoice::Mismatch),
                leak: has(InjectChoice::Leak),
                crash: has(InjectChoice::Crash),
                panic: has(InjectChoice::Panic),
            },
            first_round: self.first_round,
            stop_after: self.stop_after_ms.map(std::time::Duration::from_millis),
        }
    }
}

const REPORT_HELP: &str = "Writes report.md and SVG charts into --out DIR from one or more \
    results files (from `multiq bench --json` or `multiq bench queues --json`), all measured on \
    one device: ops/s by threads per op, speedup against ideal, coalescing off vs on, latency \
    percentiles, and a computed verdict per op (saturation point, maximum speedup, efficiency, \
    class: parallel / launch-bound / device-saturated / collapsing, with the device limit that \
    decides it) with a recommendation for the machine. --anchor adds a peer's output (mq.cu or \
    launch.cu from shared/anchors) on the same axes and as evidence. Every number in the report \
    is computed from the files given, and the report names each file with its command, commit, \
    date, device and driver.\n\n\
    Exit codes: 0 written; 2 usage errors (no file, --out not a directory, files from different \
    devices); 1 a file that cannot be read or is not a results file.";

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Results files (JSON written by `multiq bench --json` or `multiq bench queues --json`).
    #[arg(value_name = "RESULTS.json", required = true)]
    pub files: Vec<PathBuf>,
    /// Directory to write report.md and the charts into (created if missing).
    #[arg(long, value_name = "DIR", required = true)]
    pub out: PathBuf,
    /// A peer's output (mq.cu or launch.cu), drawn on the same axes; may be repeated.
    #[arg(long, value_name = "FILE")]
    pub anchor: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Option<BenchCommand>,
    #[command(flatten)]
    pub study: StudyArgs,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// The multi-queue test: N threads, each launching `simple_compute` over its own buffer.
    #[command(long_about = QUEUES_HELP)]
    Queues(QueuesArgs),
    /// fp32 matrix products from many threads: per-thread and shared streams, coalesced, and
    /// the device's batched GEMM rate.
    Matmul(workloads::MatmulArgs),
    /// The MLP 512→1024→1024→512: batch sweep, and batch-1 requests from many threads with
    /// dynamic batching off and on.
    Mlp(workloads::MlpArgs),
}

const QUEUES_HELP: &str = "The multi-queue test. Each thread owns one buffer of --data f32 \
    values, element i initialised to (thread+1)*0.001 + i*1e-6. One op is one launch of \
    simple_compute over the buffer (each element, --kernel-iters times: v = sin(v)*cos(v) + v), \
    then a wait for that op, or with --async up to --inflight ops outstanding per thread.\n\n\
    Scenarios: `shared` (all threads submit to one stream) and `per-thread` (each thread gets its \
    own stream from the pool, round-robin).\n\n\
    Timing covers only the ops: thread start-up, buffer allocation and fill, and one warm-up op \
    per thread happen before a common start signal; the clock stops when the last thread's last \
    op has completed. Afterwards every buffer is read back and compared with a host reference \
    of the same op sequence (CPU: bit-identical; CUDA: within the backend's stated tolerance). \
    A mismatch fails the run with exit code 1.";

/// Which backend to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// CUDA when a GPU is present, else the CPU (with a one-line notice).
    Auto,
    /// The CPU backend.
    Cpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
}

#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Backend to run on.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// CPU backend: execution units shared by all streams (default: available cores).
    #[arg(long, allow_hyphen_values = true, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub units: Option<u64>,
    /// How a thread waits for its op: spin, yield or block (default: the backend's).
    #[arg(long, value_enum)]
    pub wait: Option<WaitPolicy>,
    /// CUDA, coalescing `persistent`: `on` (the default) lets the GPU run an op that follows
    /// another on the same buffer chunk by chunk right after it, on the same blocks, instead of
    /// queueing it; `off` queues it (without the flag MULTIQ_QUEUE_CHAIN=0 turns it off, and
    /// stress rounds draw it).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub queue_chain: Option<bool>,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("`{s}`: expected on or off")),
    }
}

impl DeviceArgs {
    pub fn options(&self) -> DeviceOptions {
        DeviceOptions {
            backend: match self.backend {
                BackendChoice::Auto => None,
                BackendChoice::Cpu => Some(BackendKind::Cpu),
                BackendChoice::Cuda => Some(BackendKind::Cuda),
            },
            cpu_units: self.units.map(|u| u as usize),
            ordinal: 0,
            wait: self.wait,
            queue_chain: self.queue_chain,
        }
    }
}

#[derive(Args, Debug)]
pub struct StudyArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Write every run as JSON to FILE (written whole at the end, or not at all).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Ops per thread in each run (default: 300 on GPUs; scaled per preset on the CPU).
    #[arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub iters: Option<u64>,
    /// Run the presets at full size on the CPU backend too (slow).
    #[arg(long)]
    pub full: bool,
    /// Also write a report into DIR: report.md, SVG charts, and the results as DIR/study.json
    /// (or at --json FILE when given).
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// No progress bar or time estimate on stderr (there is none when stderr is not a
    /// terminal either); the results on stdout are unchanged.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct QueuesArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Thread counts to run, comma-separated.
    #[arg(
        long,
        allow_hyphen_values = true,
        value_name = "LIST",
        default_value = "1,2,4,8,16"
    )]
    pub threads: String,
    /// Timed ops per thread.
    #[arg(long, allow_hyphen_values = true, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub iters: u64,
    /// Workload preset(s), comma-separated: heavy 1,048,576x500, default 1,048,576x100,
    /// light 1,048,576x10, minimal 65,536x10 (elements x kernel iterations). --data and
    /// --kernel-iters override their sizes.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub preset: Vec<Preset>,
    /// f32 elements per thread's buffer [default: the preset's: 1048576, minimal 65536; on the
    /// CPU backend scaled to its execution units, as `multiq bench` does, unless --full].
    #[arg(long, allow_hyphen_values = true, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub data: Option<u64>,
    /// CPU backend: run the presets' buffers at full size (1,048,576 elements) instead of
    /// scaling them to the execution units. Slow: the default preset at full size takes about
    /// 50 minutes on 2 cores. GPU backends always run full size; --data sets a size anywhere.
    #[arg(long)]
    pub full: bool,
    /// simple_compute iterations per element per op (0 = an empty kernel) [default: 100].
    #[arg(long, allow_hyphen_values = true, value_name = "K", value_parser = clap::value_parser!(u32))]
    pub kernel_iters: Option<u32>,
    /// Submit asynchronously: keep up to --inflight ops outstanding per thread.
    #[arg(long = "async")]
    pub async_: bool,
    /// Ops outstanding per thread, comma-separated (1 = a wait after every op; a value above 1
    /// implies --async) [default: 8 with --async, else 1].
    #[arg(long, allow_hyphen_values = true, value_name = "LIST", value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub inflight: Vec<u64>,
    /// Submission lock(s), comma-separated: global (one mutex), per-stream, or none (each
    /// stream owned by one thread, so shared-scenario runs of more than one thread are skipped
    /// with a note, and a usage error when nothing else is left to run) [default: per-stream].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub lock: Vec<LockMode>,
    /// Cross-thread coalescing, comma-separated: off (one launch per op), fixed (merge up to
    /// --max-batch concurrent ops into one launch, waiting at most --max-delay-us; an idle
    /// device launches at once), adaptive (as fixed, growing the batch while throughput rises
    /// and batch latency stays under --latency-target-us, and launching ops alone, as off,
    /// in phases where batching does not pay), persistent (ops published straight
    /// to a kernel that stays on the GPU while work arrives: no launch per op; on the CPU
    /// backend it falls back to fixed with its defaults) [default: off].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub coalesce: Vec<CoalesceChoice>,
    /// Coalescing: most ops per launch.
    #[arg(long, allow_hyphen_values = true, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_batch: u64,
    /// Coalescing: longest an op waits for others, in microseconds.
    #[arg(long, allow_hyphen_values = true, value_name = "US", default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    pub max_delay_us: u64,
    /// Coalescing: batches queued on the device before new ops wait to fill a batch (1: launch
    /// only when the device is idle; 2: queue the next batch while one runs).
    #[arg(long, allow_hyphen_values = true, value_name = "N", default_value_t = multiq::runtime::DEFAULT_DEPTH as u64, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub coalesce_depth: u64,
    /// Adaptive coalescing: mean batch latency (launch to completion, over a window of 32
    /// batches) to stay under, in microseconds.
    #[arg(long, allow_hyphen_values = true, value_name = "US", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub latency_target_us: u64,
    /// Which scenario(s) to run.
    #[arg(long, value_enum, default_value_t = ScenarioChoice::Both)]
    pub scenario: ScenarioChoice,
    /// Streams in the pool.
    #[arg(long, allow_hyphen_values = true, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub streams: u64,
    /// Run each configuration N times and report the median run (the spread is kept in the
    /// JSON as ops_per_sec_min/max). The repeats run in rounds, each round every configuration
    /// once, so configurations compared with each other are measured close together; the
    /// tables follow the last round.
    #[arg(long, allow_hyphen_values = true, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub repeat: u64,
    /// Pin each submitting thread to its own CPU: thread t to the t-th CPU this process may
    /// run on, wrapping around with more threads than CPUs. Off by default, as in the CUDA C++
    /// peer mq.cu. Pinned, the operating system cannot move a thread, and with no more threads
    /// than CPUs no two submitting threads share one, so a run shows the runtime more than the
    /// scheduler's placement. Recorded in the JSON (`pinned`, each thread's `per_thread.cpu`).
    #[arg(long)]
    pub pin_threads: bool,
    /// Write the runs as JSON to FILE (written whole at the end, or not at all).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress bar on stderr (there is none when stderr is not a terminal either); the
    /// results on stdout are unchanged.
    #[arg(long)]
    pub quiet: bool,
    /// Test hook: corrupt a buffer before verification, to show that verification fails.
    #[arg(long, hide = true)]
    pub corrupt_for_testing: bool,
}

/// Coalescing policy on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CoalesceChoice {
    /// One launch per op.
    Off,
    /// Fixed batch limit and delay.
    Fixed,
    /// AIMD batch target under a latency target; ops launch alone where batching does not pay.
    Adaptive,
    /// A device queue: a kernel that stays on the device and takes published ops.
    Persistent,
}

impl QueuesArgs {
    /// The coalescing policies asked for.
    pub fn coalesce_policies(&self) -> Vec<CoalescePolicy> {
        let choices = if self.coalesce.is_empty() {
            vec![CoalesceChoice::Off]
        } else {
            self.coalesce.clone()
        };
        let max_batch = self.max_batch as usize;
        let max_delay = std::time::Duration::from_micros(self.max_delay_us);
        let depth = self.coalesce_depth as usize;
        choices
            .into_iter()
            .map(|c| match c {
                CoalesceChoice::Off => CoalescePolicy::Off,
                CoalesceChoice::Fixed => CoalescePolicy::Fixed {
                    max_batch,
                    max_delay,
                    depth,
                },
                CoalesceChoice::Adaptive => CoalescePolicy::Adaptive {
                    max_batch,
                    max_delay,
                    latency_target: std::time::Duration::from_micros(self.latency_target_us),
                    depth,
                },
                CoalesceChoice::Persistent => CoalescePolicy::Persistent,
            })
            .collect()
    }
}

/// Scenario selection on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScenarioChoice {
    /// Both scenarios.
    Both,
    /// One stream shared by all threads.
    Shared,
    /// A stream per thread.
    PerThread,
}

impl ScenarioChoice {
    pub fn scenarios(self) -> Vec<Scenario> {
        match self {
            ScenarioChoice::Both => vec![Scenario::PerThread, Scenario::Shared],
            ScenarioChoice::Shared => vec![Scenario::Shared],
            ScenarioChoice::PerThread => vec![Scenario::PerThread],
        }
    }
}

/// Renders a clap error as one line: what was wrong, and the allowed values when clap knows
/// them.
/// A usage error when list flag `flag` names a value twice: each value of a list is run
/// once, so a repeat is a slip, not a request (as `--threads 1,1` is).
pub fn once_each<T: PartialEq>(
    flag: &str,
    values: &[T],
    name: impl Fn(&T) -> String,
) -> Result<(), multiq::Error> {
    for (i, v) in values.iter().enumerate() {
        if values[..i].contains(v) {
            return Err(multiq::Error::invalid(format!(
                "{flag}: {} appears twice",
                name(v)
            )));
        }
    }
    Ok(())
}

/// The name a value of a `ValueEnum` flag is written as.
pub fn value_name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

pub fn one_line(err: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // `multiq` alone: clap would print the whole help as the error.
        let cmd = <Cli as clap::CommandFactory>::command();
        let names: Vec<&str> = cmd
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| c.get_name())
            .collect();
        return format!(
            "a command is required: {} (multiq --help explains them; start with `multiq bench`)",
            names.join(", ")
        );
    }
    let rendered = err.render().to_string();
    let first = rendered
        .lines()
        .next()
        .unwrap_or("invalid arguments")
        .trim();
    let mut line = first.strip_prefix("error: ").unwrap_or(first).to_string();
    // "the following required arguments were not provided:" lists them on the next lines.
    if line.ends_with(':') {
        let listed: Vec<&str> = rendered
            .lines()
            .skip(1)
            .map(str::trim)
            .take_while(|l| !l.is_empty())
            .collect();
        if !listed.is_empty() {
            line.push(' ');
            line.push_str(&listed.join(", "));
        }
    }
    if let Some(ContextValue::Strings(values)) = err.get(ContextKind::ValidValue) {
        if !values.is_empty() {
            line.push_str(&format!(" (allowed: {})", values.join(", ")));
        }
    }
    if let Some(ContextValue::String(s)) = err.get(ContextKind::SuggestedArg) {
        line.push_str(&format!(" (did you mean {s}?)"));
    }
    line
}

#[cfg(test)]
mod fuzz {
    //! Property tests over command-line parsing: whatever the arguments, parsing returns a
    //! value or an error, the error renders as one line, and a parsed command's settings
    //! convert without panicking. (`PROPTEST_CASES` sets how many argument lists are tried.)

    use super::*;
    use proptest::prelude::*;

    const WORDS: &[&str] = &[
        "bench",
        "queues",
        "info",
        "report",
        "stress",
        "--backend",
        "--units",
        "--wait",
        "--threads",
        "--iters",
        "--preset",
        "--data",
        "--kernel-iters",
        "--inflight",
        "--lock",
        "--coalesce",
        "--max-batch",
        "--max-delay-us",
        "--coalesce-depth",
        "--scenario",
        "--streams",
        "--repeat",
        "--json",
        "--out",
        "--anchor",
        "--rounds",
        "--seconds",
        "--seed",
        "--round-seed",
        "--kinds",
        "--round-timeout",
        "--device-leak-mib",
        "--verbose",
        "--in-process",
        "--async",
        "--full",
        "--quiet",
        "--help",
        "-h",
        "--version",
        "cpu",
        "cuda",
        "auto",
        "spin",
        "yield",
        "block",
        "none",
        "global",
        "per-stream",
        "fixed",
        "adaptive",
        "off",
        "mixed,churn",
        "exit",
        "minimal,light",
        "0",
        "1",
        "-1",
        "16",
        "1,2,4",
        "1,,2",
        "0x10",
        "0xffffffffffffffffff",
        "18446744073709551616",
        "4294967296",
        "",
        " ",
        "=",
        "--threads=",
        "--seed=0x",
        "\u{0}",
        "é",
    ];

    fn arg() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => proptest::sample::select(WORDS).prop_map(str::to_string),
            1 => any::<String>(),
            1 => any::<i64>().prop_map(|n| n.to_string()),
        ]
    }

    proptest! {
        #[test]
        fn any_argument_list_parses_or_fails_in_one_line(args in proptest::collection::vec(arg(), 0..8)) {
            let argv = std::iter::once("multiq".to_string()).chain(args);
            match Cli::try_parse_from(argv) {
                Ok(cli) => {
                    match &cli.command {
                        Command::Stress(s) => {
                            let cfg = s.config();
                            prop_assert!(cfg.rounds >= 1 && cfg.threads >= 1);
                            prop_assert!(!cfg.kinds.is_empty() && !cfg.coalesce.is_empty());
                        }
                        Command::Bench(b) => {
                            if let Some(BenchCommand::Queues(q)) = &b.which {
                                let _ = multiq::bench::parse_thread_list(&q.threads);
                                prop_assert!(!q.coalesce_policies().is_empty());
                            }
                            let _ = b.study.device.options();
                        }
                        Command::Info(d) => {
                            let _ = d.options();
                        }
                        Command::Report(_) | Command::Weights(_) | Command::MlpRun(_) => {}
                    }
                }
                Err(e) => {
                    let line = one_line(&e);
                    prop_assert!(!line.contains('\n'), "{line:?}");
                }
            }
        }

        #[test]
        fn thread_lists_and_seeds_never_panic(s in any::<String>()) {
            if let Ok(list) = multiq::bench::parse_thread_list(&s) {
                prop_assert!(!list.is_empty() && list.iter().all(|&n| n >= 1));
            }
            if let Ok(seed) = multiq::stress::rng::parse_seed(&s) {
                prop_assert_eq!(multiq::stress::rng::parse_seed(&multiq::stress::rng::show_seed(seed)), Ok(seed));
            }
        }
    }
}
