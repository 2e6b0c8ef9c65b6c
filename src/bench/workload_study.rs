//! The model workloads as part of the study (`multiq bench`): `bench matmul` and `bench mlp`
//! at full size on a GPU, scaled down on the CPU backend (what was scaled goes into the notes),
//! each followed by a short comparison of the figures that answer the questions.

use std::fmt::Write as _;

use super::matmul::{self, MatmulBenchConfig};
use super::mlp::{self, MlpBenchConfig};
use super::progress::Progress;
use super::table::thousands;
use super::workload::{table, WorkloadRow};
use crate::backend::BackendKind;
use crate::error::Result;
use crate::runtime::Device;

/// Runs both workloads; returns their rows and how many failed the float64 check.
pub fn run(
    device: &Device,
    full: bool,
    notes: &mut Vec<String>,
    progress: &Progress,
) -> Result<(Vec<WorkloadRow>, usize)> {
    let scaled = device.info().backend == BackendKind::Cpu && !full;
    let (mm, mlp_cfg) = if scaled {
        let (m, l) = (
            MatmulBenchConfig::scaled_for_cpu(),
            MlpBenchConfig::scaled_for_cpu(),
        );
        notes.push(format!(
            "model workloads scaled for the CPU backend: matmul sizes {:?} (full: 64, 256, 1024, \
             4096), threads {:?}, 0.15 s per run; mlp batch sweep {:?} with {} forwards each \
             (full: 1-1024, 500), request threads {:?}, 0.2 s per run",
            m.sizes, m.threads, l.batches, l.sweep_iters, l.threads
        ));
        (m, l)
    } else {
        (MatmulBenchConfig::full(), MlpBenchConfig::full())
    };
    progress.print("\n== matmul: fp32 C = A·B, a wait per product ==\n")?;
    let mut rows = matmul::run(device, &mm, |_| {})?;
    progress.print(&table(
        "matmul (limit: one thread, batched launches = the device's GEMM rate)",
        &rows.iter().collect::<Vec<_>>(),
    ))?;
    progress.print(&matmul_summary(&rows))?;
    progress.print("\n== mlp: 512→1024→1024→512 ==\n")?;
    let mlp_rows = mlp::run(device, &mlp_cfg, |_| {})?;
    progress.print(&table(
        "mlp (sweep: one thread, input on the device; threads: batch-1 requests from the host)",
        &mlp_rows.iter().collect::<Vec<_>>(),
    ))?;
    progress.print(&mlp_summary(&mlp_rows))?;
    rows.extend(mlp_rows);
    let bad = rows.iter().filter(|r| !r.verified).count();
    Ok((rows, bad))
}

fn find(rows: &[WorkloadRow], f: impl Fn(&WorkloadRow) -> bool) -> Option<&WorkloadRow> {
    rows.iter().filter(|r| f(r)).max_by_key(|r| r.threads)
}

/// Per size at the most threads: coalesced and per-thread against the device limit.
pub fn matmul_summary(rows: &[WorkloadRow]) -> String {
    let mut s = String::new();
    let mut sizes: Vec<usize> = rows.iter().filter_map(|r| r.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for n in sizes {
        let of = |scenario: &str| find(rows, |r| r.size == Some(n) && r.scenario == scenario);
        let (Some(limit), Some(per), Some(co)) = (of("limit"), of("per-thread"), of("coalesced"))
        else {
            continue;
        };
        let _ = writeln!(
            s,
            "  {n}²: {}T per-thread {} ops/s ({:.2} of limit), coalesced {} ({:.2} of limit, \
             {:.1} products per launch); limit {} ops/s",
            per.threads,
            thousands(per.ops_per_sec),
            per.ops_per_sec / limit.ops_per_sec,
            thousands(co.ops_per_sec),
            co.ops_per_sec / limit.ops_per_sec,
            co.ops_per_launch,
            thousands(limit.ops_per_sec)
        );
    }
    s
}

/// Batch-1 requests at the most threads, dynamic batching off vs on.
pub fn mlp_summary(rows: &[WorkloadRow]) -> String {
    let of = |c: &str| find(rows, |r| r.scenario == "threads" && r.coalesce == c);
    match (of("off"), of("on")) {
        (Some(off), Some(on)) => format!(
            "  batch-1 requests, {} threads: dynamic batching on {} samples/s (p99 {:.0} µs, \
             {:.1} rows per forward) vs off {} samples/s (p99 {:.0} µs): {:.2}x\n",
            on.threads,
            thousands(on.ops_per_sec),
            on.latency_us.p99,
            on.ops_per_launch,
            thousands(off.ops_per_sec),
            off.latency_us.p99,
            on.ops_per_sec / off.ops_per_sec
        ),
        _ => String::new(),
    }
}
