//! The `multiq` command: see `multiq --help`.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::{BenchCommand, Cli, Command, QueuesArgs, EXIT_FAILURE, EXIT_USAGE};
use multiq::bench::progress::Progress;
use multiq::bench::queues::{self, QueuesSpec};
use multiq::bench::results::{self, ResultsFile};
use multiq::bench::{parse_thread_list, study, table, Preset, RunPhase, Runner};
use multiq::{Device, Error, LockMode};

fn main() -> ExitCode {
    // Piped into `head`: end quietly like other command-line tools instead of panicking.
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("multiq: {}", cli::one_line(&e));
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    let outcome = match cli.command {
        Command::Bench(args) => match args.which {
            Some(BenchCommand::Queues(q)) => run_queues(q),
            Some(BenchCommand::Matmul(m)) => cli::workloads::run_matmul(&m),
            Some(BenchCommand::Mlp(m)) => cli::workloads::run_mlp(&m),
            None => study::run(&study_config(&args.study)).map(|o| o.exit_code()),
        },
        Command::Info(dev) => info(&dev),
        Command::Report(r) => report(&r),
        Command::Stress(a) => stress(&a),
        Command::Weights(w) => cli::workloads::write_weights(&w),
        Command::MlpRun(r) => cli::workloads::mlp_run(&r),
    };
    // The work is done (results files written); a report that could not be printed fails it.
    let outcome = match (outcome, multiq::stdout::failure()) {
        (Ok(_), Some(e)) => Err(e),
        (outcome, _) => outcome,
    };
    match outcome {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("multiq: {e}");
            ExitCode::from(if e.is_usage() {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            } as u8)
        }
    }
}

fn study_config(a: &cli::StudyArgs) -> study::StudyConfig {
    study::StudyConfig {
        device: a.device.options(),
        json: a.json.clone(),
        report: a.report.clone(),
        iters: a.iters.map(|i| i as usize),
        full: a.full,
        quiet: a.quiet,
    }
}

fn report(a: &cli::ReportArgs) -> Result<i32, Error> {
    cli::once_each("a results file", &a.files, |p| p.display().to_string())?;
    // The inputs first: a failed run leaves no empty --out folder behind.
    let inputs = multiq::report::Inputs::load(&a.files, &a.anchor, results::command_line())?;
    multiq::report::prepare_dir(&a.out, "--out")?;
    let w = multiq::report::write(&a.out, inputs)?;
    multiq::outln!(
        "report written to {} ({} charts)",
        w.report.display(),
        w.figures.len()
    )?;
    Ok(0)
}

fn stress(a: &cli::StressArgs) -> Result<i32, Error> {
    cli::once_each("--kinds", &a.kinds, cli::value_name)?;
    cli::once_each("--coalesce", &a.coalesce, cli::value_name)?;
    // A replay runs the one round named; a master seed or a time limit would be ignored. (The
    // worker processes get both from the supervisor, which knows.)
    if a.round_seed.is_some() && !a.worker && !a.child {
        for (given, flag) in [
            (a.seed.is_some(), "--seed"),
            (a.seconds.is_some(), "--seconds"),
        ] {
            if given {
                return Err(Error::invalid(format!(
                    "{flag} does not apply with --round-seed, which replays the one round it names"
                )));
            }
        }
    }
    let cfg = a.config();
    if a.child {
        let seed = cfg
            .round_seed
            .ok_or_else(|| Error::invalid("--child needs --round-seed"))?;
        return Ok(multiq::stress::exit::child_main(seed, &cfg.settings()));
    }
    if a.worker {
        return Ok(multiq::stress::supervise::worker_main(&cfg));
    }
    multiq::stress::run(&cfg)
}

fn open_device(opts: &multiq::DeviceOptions) -> Result<Device, Error> {
    let device = Device::open(opts)?;
    if let Some(why) = device.fallback_reason() {
        multiq::outln!("note: CUDA not used ({why}); running on the CPU backend")?;
    }
    if opts.queue_chain.is_some() && device.info().backend == multiq::BackendKind::Cpu {
        eprintln!(
            "multiq: note: --queue-chain applies to CUDA's device queue; the CPU backend has none"
        );
    }
    Ok(device)
}

fn info(dev: &cli::DeviceArgs) -> Result<i32, Error> {
    let device = open_device(&dev.options())?;
    let i = device.info();
    multiq::outln!("backend: {}", i.backend)?;
    multiq::outln!("device:  {}", i.name)?;
    multiq::outln!("units:   {}", i.units)?;
    if let Some(m) = i.memory_bytes {
        multiq::outln!("memory:  {:.1} GiB", m as f64 / (1u64 << 30) as f64)?;
    }
    if let Some(d) = &i.driver {
        multiq::outln!("driver:  {d}")?;
    }
    multiq::outln!("wait:    {}", i.wait)?;
    for (k, v) in &i.extra {
        multiq::outln!("{k}: {v}")?;
    }
    Ok(0)
}

/// The progress bar's part in one run of `bench queues`.
fn show_run(progress: &mut Progress, s: &QueuesSpec, phase: RunPhase) {
    match phase {
        RunPhase::Starting => progress.set_message(format!(
            "{} {} {}T lock {}, {} in flight, coalescing {}",
            s.preset,
            s.scenario.name(),
            s.threads,
            s.lock,
            s.inflight,
            s.coalesce.name()
        )),
        RunPhase::Finished { runs } => progress.inc(runs as u64),
    }
}

fn run_queues(a: QueuesArgs) -> Result<i32, Error> {
    let threads = parse_thread_list(&a.threads)?;
    cli::once_each("--preset", &a.preset, cli::value_name)?;
    cli::once_each("--inflight", &a.inflight, u64::to_string)?;
    cli::once_each("--lock", &a.lock, cli::value_name)?;
    cli::once_each("--coalesce", &a.coalesce, cli::value_name)?;
    let presets: Vec<Option<Preset>> = if a.preset.is_empty() {
        vec![None]
    } else {
        a.preset.iter().copied().map(Some).collect()
    };
    let custom = a.data.is_some() || a.kernel_iters.is_some();
    let data = match a.data {
        Some(d) => Some(usize::try_from(d).map_err(|_| Error::invalid("--data is too large"))?),
        None => None,
    };
    let inflights: Vec<usize> = match (a.async_, a.inflight.is_empty()) {
        (_, false) => a.inflight.iter().map(|&n| n as usize).collect(),
        (true, true) => vec![8],
        (false, true) => vec![1],
    };
    let policies = a.coalesce_policies();
    let locks = if a.lock.is_empty() {
        vec![LockMode::PerStream]
    } else {
        a.lock.clone()
    };
    if let Some(path) = &a.json {
        results::check_writable(path)?;
    }
    let device = open_device(&a.device.options())?;
    let info = device.info().clone();
    let max_threads = *threads.iter().max().expect("non-empty list");
    // On the CPU backend a preset's buffer is scaled to the execution units, as the study
    // does (at full size the default preset takes about 50 minutes on 2 cores); --data is
    // taken as given.
    let scaled = info.backend == multiq::BackendKind::Cpu && !a.full && data.is_none();
    let shapes: Vec<(String, usize, u32)> = presets
        .iter()
        .map(|p| {
            let preset = p.unwrap_or(Preset::Default);
            let (d, k) = preset.shape();
            let d = if scaled {
                study::cpu_scaled_data(preset, info.units)
            } else {
                d
            };
            let name = match (custom, p) {
                (true, _) => "custom".to_string(),
                (false, Some(p)) => p.name().to_string(),
                (false, None) => "default".to_string(),
            };
            (name, data.unwrap_or(d), a.kernel_iters.unwrap_or(k))
        })
        .collect();
    for (_, d, _) in &shapes {
        study::check_memory(&device, *d, max_threads)?;
    }
    let mut notes = Vec::new();
    if scaled {
        let sizes: Vec<String> = presets
            .iter()
            .zip(&shapes)
            .map(|(p, (_, d, _))| {
                let full = p.unwrap_or(Preset::Default).shape().0;
                format!(
                    "{} instead of {}",
                    table::thousands(*d as f64),
                    table::thousands(full as f64)
                )
            })
            .collect();
        notes.push(format!(
            "scaled for the CPU backend ({} execution units): buffers of {} elements, so that \
             one op fills the device as on a GPU; kernel iterations unchanged; --full runs the \
             full size, --data sets one",
            info.units,
            sizes.join(", ")
        ));
    }
    study::print_header("multiq bench queues", &info, &notes)?;
    let started_at = results::now_rfc3339();
    let mut runner = Runner::new(&device);
    runner.repeat = a.repeat as usize;
    let mut progress = Progress::new(a.quiet);
    // One group per table: preset, inflight, lock mode, coalescing policy.
    let mut groups: Vec<(String, Vec<QueuesSpec>)> = Vec::new();
    for (preset, data, kernel_iters) in &shapes {
        for &inflight in &inflights {
            for (&lock, coalesce) in locks
                .iter()
                .flat_map(|l| policies.iter().map(move |c| (l, *c)))
            {
                let header = format!(
                    "\npreset {preset}: {} elements x {kernel_iters} kernel iterations; {} ops \
                     per thread; inflight {inflight}; lock {lock}; coalesce {}; pool of {} \
                     streams{}\n",
                    table::thousands(*data as f64),
                    a.iters,
                    coalesce.name(),
                    a.streams,
                    if a.pin_threads {
                        "; threads pinned, one per CPU"
                    } else {
                        ""
                    }
                );
                let mut specs = Vec::new();
                for scenario in a.scenario.scenarios() {
                    for &t in &threads {
                        specs.push(QueuesSpec {
                            preset: preset.clone(),
                            data: *data,
                            kernel_iters: *kernel_iters,
                            iters: a.iters as usize,
                            inflight,
                            lock,
                            scenario,
                            threads: t,
                            pool_size: a.streams as usize,
                            coalesce,
                            pin: a.pin_threads,
                            corrupt: a.corrupt_for_testing,
                        });
                    }
                }
                groups.push((header, specs));
            }
        }
    }
    let runs = groups.iter().map(|(_, s)| s.len()).sum::<usize>() * runner.repeat.max(1);
    progress.start(runs as u64);
    // With repeats, every spec runs once per round (the runner's `run_rounds`), so a cell and
    // the cells it is compared with are measured close together; the tables follow the last
    // round. Run once, each table follows its group.
    let rounds = runner.repeat > 1;
    let mut has_row = Vec::new();
    if rounds {
        let all: Vec<QueuesSpec> = groups.iter().flat_map(|(_, s)| s.clone()).collect();
        has_row = runner.run_rounds(&all, |s, phase| show_run(&mut progress, s, phase))?;
    }
    let (mut first, mut spec_index) = (0, 0);
    for (header, specs) in &groups {
        progress.print(header)?;
        if !rounds {
            has_row.extend(runner.run_rounds(specs, |s, phase| show_run(&mut progress, s, phase))?);
        }
        let kept = has_row[spec_index..spec_index + specs.len()]
            .iter()
            .filter(|&&k| k)
            .count();
        spec_index += specs.len();
        let rows = &mut runner.rows[first..first + kept];
        first += kept;
        queues::fill_speedups(rows);
        for scenario in a.scenario.scenarios() {
            let of: Vec<_> = rows.iter().filter(|r| r.scenario == scenario).collect();
            if !of.is_empty() {
                progress.print(&table::scaling_table(
                    &format!("scenario {}", scenario.name()),
                    &of,
                ))?;
            }
        }
    }
    progress.finish();
    let Runner {
        rows,
        skipped,
        mismatches,
        ..
    } = runner;
    for s in &skipped {
        multiq::outln!(
            "skipped {} {} threads, lock {}: {}",
            s.preset,
            s.threads,
            s.lock,
            s.reason
        )?;
    }
    if rows.is_empty() {
        let reason = skipped
            .first()
            .map_or("nothing ran".to_string(), |s| s.reason.clone());
        eprintln!("multiq: no run could be made: {reason}");
        return Ok(EXIT_USAGE);
    }
    if let Some(path) = &a.json {
        results::write_json(
            path,
            &ResultsFile::new(info, started_at, notes, rows, skipped),
        )?;
        results::say_written(path, format_args!("results written to {}", path.display()))?;
    }
    if mismatches > 0 {
        eprintln!("multiq: FAILED: {mismatches} run(s) did not match the reference");
        return Ok(EXIT_FAILURE);
    }
    Ok(0)
}
