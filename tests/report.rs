//! `multiq report` and `multiq bench --report`: a report from stored results, from a fresh
//! run, and the error policy (usage errors one line and exit 2, bad files one line and exit 1).

mod common;
use common::{multiq, tmp};
use std::path::Path;
use std::process::Output;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn one_line_error(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "{err} lacks {needle}");
}

const CPU_STUDY: &str = "bench/results/cpu-2core/study.json";

#[test]
fn report_from_the_stored_cpu_study() {
    let out_dir = tmp("cpu");
    let out = multiq(&["report", CPU_STUDY, "--out", s(&out_dir)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    // Every fact of provenance comes from the file.
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(CPU_STUDY)).unwrap(),
    )
    .unwrap();
    for key in [
        "git_commit",
        "started_at",
        "command",
        "device",
        "multiq_version",
    ] {
        let v = json[key].as_str().unwrap();
        assert!(md.contains(v), "report.md lacks {key} {v}");
    }
    for needle in [
        "# multiq report: CPU (2 execution units)",
        "## Verdict",
        "## Recommendation for this machine",
        "## How the verdict is decided",
        "## Provenance",
        "device-saturated",
        "(throughput-minimal.svg)",
        "(speedup.svg)",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle}");
    }
    for svg in [
        "throughput-heavy.svg",
        "throughput-minimal.svg",
        "speedup.svg",
    ] {
        let text = std::fs::read_to_string(out_dir.join(svg)).unwrap();
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
        assert!(
            text.contains("<text") && text.contains("<polyline"),
            "{svg} has no data"
        );
    }
}

#[test]
fn report_of_a_file_older_than_coalescing_and_latency() {
    let out_dir = tmp("old");
    let out = multiq(&[
        "report",
        "bench/results/h100/study.json",
        "--out",
        s(&out_dir),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("d20527db983e") && md.contains("2026-11-24T20:45:24Z"));
    // The file predates coalescing and latency: the report says so instead of drawing nothing.
    assert!(md.contains("No run in these results has coalescing on"));
    assert!(md.contains("no latency percentiles"));
    assert!(!out_dir.join("coalescing-minimal.svg").exists());
    // Nor has it the host's counters or the threads one by one: every run says so rather
    // than showing a number.
    let every_run = &md[md.find("## Every run").unwrap()..];
    let rows: Vec<&str> = every_run
        .lines()
        .filter(|l| l.contains("| yes |"))
        .collect();
    assert!(!rows.is_empty());
    assert!(
        rows.iter().all(|l| l.ends_with("| - | - | - | - |")),
        "{rows:?}"
    );
}

#[test]
fn report_with_anchors_draws_the_peer() {
    let out_dir = tmp("h100");
    let out = multiq(&[
        "report",
        "bench/results/h100/study.json",
        "--anchor",
        "bench/results/h100/anchor-mq.txt",
        "--anchor",
        "bench/results/h100/anchor-launch.txt",
        "--out",
        s(&out_dir),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("launch-bound"), "the minimal op on the H100");
    assert!(md.contains("launch.cu"));
    let svg = std::fs::read_to_string(out_dir.join("throughput-light.svg")).unwrap();
    assert!(svg.contains("peer mq.cu"));
}

#[test]
fn report_of_a_fresh_run_with_coalescing_and_latency() {
    let json = tmp("fresh.json");
    let run = multiq(&[
        "bench",
        "queues",
        "--backend",
        "cpu",
        "--data",
        "2048",
        "--kernel-iters",
        "2",
        "--iters",
        "3",
        "--threads",
        "1,2",
        "--scenario",
        "per-thread",
        "--coalesce",
        "off,fixed",
        "--quiet",
        "--json",
        s(&json),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let out_dir = tmp("fresh");
    let out = multiq(&["report", s(&json), "--out", s(&out_dir)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("(coalescing-custom.svg)"), "{md}");
    assert!(md.contains("(latency-custom.svg)"), "{md}");
    assert!(
        md.contains("](../fresh.json)"),
        "linked relative to the report: {md}"
    );
    // A fresh run has the host's counters: every run shows numbers, not dashes.
    if cfg!(target_os = "linux") {
        let every_run = &md[md.find("## Every run").unwrap()..];
        let rows: Vec<&str> = every_run
            .lines()
            .filter(|l| l.contains("| yes |"))
            .collect();
        assert_eq!(rows.len(), 4, "{every_run}");
        for row in rows {
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            let cpu: f64 = cells[12].parse().unwrap_or_else(|_| panic!("{row}"));
            assert!(cpu >= 0.0, "{row}");
            assert!(
                cells[13].parse::<u64>().is_ok() && cells[14].parse::<f64>().is_ok(),
                "{row}"
            );
            // The last thread never finished before the median one.
            let last: f64 = cells[15].parse().unwrap_or_else(|_| panic!("{row}"));
            assert!(last >= 1.0, "{row}");
        }
    }
}

#[test]
fn usage_errors_are_one_line_exit_2() {
    let file = tmp("a-file");
    std::fs::write(&file, "x").unwrap();
    one_line_error(&multiq(&["report", "--out", "x"]), 2, "RESULTS.json");
    one_line_error(&multiq(&["report", CPU_STUDY]), 2, "--out");
    one_line_error(
        &multiq(&["report", CPU_STUDY, "--out", s(&file)]),
        2,
        "not a directory",
    );
    one_line_error(
        &multiq(&[
            "report",
            CPU_STUDY,
            "bench/results/h100/study.json",
            "--out",
            s(&tmp("mixed")),
        ]),
        2,
        "one device",
    );
    one_line_error(
        &multiq(&[
            "report",
            CPU_STUDY,
            "--anchor",
            "bench/results/h100/anchor-mq.txt",
            "--out",
            s(&tmp("wrong-anchor")),
        ]),
        2,
        "NVIDIA H100",
    );
    // `bench --report` checks its directory before running anything.
    one_line_error(
        &multiq(&["bench", "--backend", "cpu", "--report", s(&file)]),
        2,
        "--report",
    );
    one_line_error(&multiq(&["bench", "--report"]), 2, "--report");
}

#[test]
fn bad_files_are_one_line_exit_1() {
    let garbage = tmp("garbage.json");
    std::fs::write(&garbage, "{\"not\": \"results\"").unwrap();
    let empty = tmp("empty.json");
    std::fs::write(&empty, "{\"runs\": []}").unwrap();
    let out_dir = tmp("bad");
    for (file, needle) in [
        (s(&garbage), "not a multiq results file"),
        (s(&empty), "has no runs"),
        ("/nonexistent/study.json", "/nonexistent/study.json"),
    ] {
        one_line_error(&multiq(&["report", file, "--out", s(&out_dir)]), 1, needle);
    }
    one_line_error(
        &multiq(&[
            "report",
            CPU_STUDY,
            "--anchor",
            s(&garbage),
            "--out",
            s(&out_dir),
        ]),
        1,
        "not an anchor output",
    );
    assert!(
        !out_dir.join("report.md").exists(),
        "nothing written for a bad input"
    );
}
