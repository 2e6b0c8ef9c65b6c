//! The `multiq` command: see `multiq --help`.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::{BenchCommand, Cli, Command, QueuesArgs, EXIT_FAILURE, EXIT_USAGE};
use multiq::bench::queues::{self, QueuesSpec};
use multiq::bench::results::{self, ResultsFile, Skipped};
use multiq::bench::{parse_thread_list, study, table, Preset};
use multiq::{Device, Error};

fn main() -> ExitCode {
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
            None => study::run(&study_config(&args.study)).map(|o| o.exit_code()),
        },
        Command::Info(dev) => info(&dev),
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
        iters: a.iters.map(|i| i as usize),
        full: a.full,
    }
}

fn open_device(opts: &multiq::DeviceOptions) -> Result<Device, Error> {
    let device = Device::open(opts)?;
    if let Some(why) = device.fallback_reason() {
        println!("note: CUDA not used ({why}); running on the CPU backend");
    }
    Ok(device)
}

fn info(dev: &cli::DeviceArgs) -> Result<i32, Error> {
    let device = open_device(&dev.options())?;
    let i = device.info();
    println!("backend: {}", i.backend);
    println!("device:  {}", i.name);
    println!("units:   {}", i.units);
    if let Some(m) = i.memory_bytes {
        println!("memory:  {:.1} GiB", m as f64 / (1u64 << 30) as f64);
    }
    if let Some(d) = &i.driver {
        println!("driver:  {d}");
    }
    println!("wait:    {}", i.wait);
    for (k, v) in &i.extra {
        println!("{k}: {v}");
    }
    Ok(0)
}

fn run_queues(a: QueuesArgs) -> Result<i32, Error> {
    let threads = parse_thread_list(&a.threads)?;
    let (preset_name, (default_data, default_k)) = match a.preset {
        Some(p) => (p.name().to_string(), p.shape()),
        None => ("default".to_string(), Preset::Default.shape()),
    };
    let custom = a.data.is_some() || a.kernel_iters.is_some();
    let preset = if custom {
        "custom".to_string()
    } else {
        preset_name
    };
    let data = match a.data {
        Some(d) => usize::try_from(d).map_err(|_| Error::invalid("--data is too large"))?,
        None => default_data,
    };
    let kernel_iters = a.kernel_iters.unwrap_or(default_k);
    let inflight = match (a.async_, a.inflight) {
        (_, Some(n)) => n as usize,
        (true, None) => 8,
        (false, None) => 1,
    };
    if let Some(path) = &a.json {
        results::check_writable(path)?;
    }
    let device = open_device(&a.device.options())?;
    let max_threads = *threads.iter().max().expect("non-empty list");
    study::check_memory(&device, data, max_threads)?;

    let info = device.info().clone();
    println!(
        "multiq bench queues on {} ({} backend, wait {})",
        info.name, info.backend, info.wait
    );
    println!(
        "preset {preset}: {} elements x {kernel_iters} kernel iterations; {} ops per thread; \
         inflight {inflight}; lock {}; pool of {} streams",
        table::thousands(data as f64),
        a.iters,
        a.lock,
        a.streams
    );
    let started_at = results::now_rfc3339();
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    let mut mismatches = Vec::new();
    for scenario in a.scenario.scenarios() {
        for &t in &threads {
            let spec = QueuesSpec {
                preset: preset.clone(),
                data,
                kernel_iters,
                iters: a.iters as usize,
                inflight,
                lock: a.lock,
                scenario,
                threads: t,
                pool_size: a.streams as usize,
                corrupt: a.corrupt_for_testing,
            };
            match queues::run_queues(&device, &spec) {
                Ok(outcome) => {
                    if let Some(m) = outcome.mismatch {
                        eprintln!("multiq: {} threads, {}: {m}", t, scenario.name());
                        mismatches.push(m);
                    }
                    rows.push(outcome.row);
                }
                Err(e) if e.is_usage() => skipped.push(Skipped {
                    preset: preset.clone(),
                    scenario,
                    lock: a.lock,
                    threads: t,
                    reason: e.to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
    }
    queues::fill_speedups(&mut rows);
    for scenario in a.scenario.scenarios() {
        let of: Vec<_> = rows.iter().filter(|r| r.scenario == scenario).collect();
        if !of.is_empty() {
            println!();
            print!(
                "{}",
                table::scaling_table(&format!("scenario {}", scenario.name()), &of)
            );
        }
    }
    for s in &skipped {
        println!(
            "skipped {} threads, {}: {}",
            s.threads,
            s.scenario.name(),
            s.reason
        );
    }
    if rows.is_empty() {
        let reason = skipped.first().map_or("nothing ran".to_string(), |s| s.reason.clone());
        eprintln!("multiq: no run could be made: {reason}");
        return Ok(EXIT_USAGE);
    }
    if let Some(path) = &a.json {
        let file = ResultsFile {
            multiq_version: env!("CARGO_PKG_VERSION"),
            git_commit: results::GIT_COMMIT,
            backend: info.backend,
            device: info.name.clone(),
            host_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            started_at,
            command: results::command_line(),
            device_info: info,
            notes: Vec::new(),
            runs: rows.clone(),
            skipped: skipped.clone(),
        };
        results::write_json(path, &file)?;
        println!("results written to {}", path.display());
    }
    if !mismatches.is_empty() {
        eprintln!(
            "multiq: FAILED: {} run(s) did not match the reference",
            mismatches.len()
        );
        return Ok(EXIT_FAILURE);
    }
    if rows.is_empty() {
        let reason = skipped
            .first()
            .map_or("nothing ran".to_string(), |s| s.reason.clone());
        eprintln!("multiq: no run could be made: {reason}");
        return Ok(EXIT_USAGE);
    }
    Ok(0)
}
