//! The `multiq` command: usage errors (one line, exit 2, nothing written), results JSON, and
//! verification failing loudly.

mod common;
use common::{multiq, stderr, tmp};
use std::process::Output;

const SMALL: &[&str] = &["--data", "2048", "--kernel-iters", "2", "--iters", "3"];

fn queues(extra: &[&str]) -> Output {
    let mut args = vec!["bench", "queues"];
    // Later flags override earlier ones, except --backend, which may be given once.
    if !extra.contains(&"--backend") {
        args.extend(["--backend", "cpu"]);
    }
    args.extend_from_slice(SMALL);
    args.extend_from_slice(extra);
    multiq(&args)
}

#[test]
fn usage_errors_are_one_line_exit_2_and_write_nothing() {
    let cases: &[(&[&str], &str)] = &[
        (&["--threads", "0"], "--threads"),
        (&["--threads", ""], "--threads"),
        (&["--threads", "1,,2"], "--threads"),
        (&["--threads", "two"], "--threads"),
        (&["--threads", "-4"], "--threads"),
        (&["--iters", "-1"], "--iters"),
        (&["--iters", "abc"], "--iters"),
        (&["--iters", "0"], "--iters"),
        (&["--data", "0"], "--data"),
        (&["--data", "-5"], "--data"),
        (&["--data", "99999999999999"], "--data"),
        (&["--data", "4000000000"], "--data"),
        (&["--kernel-iters", "-1"], "--kernel-iters"),
        (&["--inflight", "0"], "--inflight"),
        (&["--backend", "metal"], "allowed: auto, cpu, cuda"),
        (
            &["--preset", "huge"],
            "allowed: heavy, default, light, minimal",
        ),
        (&["--lock", "spin"], "allowed: global, per-stream, none"),
        (&["--scenario", "both-ish"], "allowed:"),
        (&["--streams", "0"], "--streams"),
        (&["--units", "0"], "--units"),
        (&["--bogus"], "--bogus"),
        (
            &["--lock", "none", "--scenario", "shared", "--threads", "2"],
            "none",
        ),
        (&["--lock", "global,global"], "global appears twice"),
        (&["--coalesce", "off,fixed,off"], "off appears twice"),
        (&["--inflight", "1,1"], "1 appears twice"),
        (&["--preset", "minimal,minimal"], "minimal appears twice"),
    ];
    for (extra, needle) in cases {
        let json = tmp("never.json");
        let _ = std::fs::remove_file(&json);
        let mut args: Vec<&str> = extra.to_vec();
        let js = json.to_str().unwrap().to_string();
        args.extend(["--json", &js]);
        let out = queues(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: stderr {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{extra:?}: not one line: {err}"
        );
        assert!(err.contains(needle), "{extra:?}: {err} lacks {needle}");
        assert!(!json.exists(), "{extra:?}: --json was written");
    }
}

/// The other commands' lists, and `multiq` alone: one line, exit 2.
#[test]
fn other_usage_errors_are_one_line_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "a command is required: bench, info"),
        (
            &["bench", "matmul", "--sizes", "64,64"],
            "--sizes: 64 appears twice",
        ),
        (
            &["bench", "mlp", "--batches", "1,8,1"],
            "--batches: 1 appears twice",
        ),
        (&["bench", "mlp", "--iters", "0"], "--iters"),
        (&["bench", "matmul", "--seconds", "-1"], "--seconds -1"),
        (
            &["stress", "--kinds", "mixed,mixed"],
            "--kinds: mixed appears twice",
        ),
        (&["stress", "--seed", "-1"], "not a seed"),
        (&["stress", "--seconds", "0"], "not a number of seconds"),
        (
            &["stress", "--round-seed", "0x1", "--seed", "3"],
            "--seed does not apply with --round-seed",
        ),
        (
            &["report", "--out", "r", "a.json", "a.json"],
            "a.json appears twice",
        ),
    ];
    for (args, needle) in cases {
        let out = multiq(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err} lacks {needle}");
    }
}

#[test]
fn json_path_problems_fail_before_running() {
    let out = queues(&["--json", "/nonexistent-dir/x.json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn json_in_a_folder_that_takes_no_files_is_a_usage_error() {
    let out = queues(&["--json", "/proc/multiq-x.json"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--json /proc/multiq-x.json: cannot create a file in /proc"),
        "{}",
        stderr(&out)
    );
}

/// A link is followed (the file it names is written, the link stays), and an open descriptor
/// (`/dev/stdout`) is written through, after what the command printed, never replaced.
#[cfg(target_os = "linux")]
#[test]
fn json_through_a_link_or_to_stdout_writes_where_it_points() {
    let real = tmp("real.json");
    let link = tmp("link.json");
    let _ = std::fs::remove_file(&real);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let out = queues(&["--threads", "1", "--json", link.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let text = std::fs::read_to_string(&real).unwrap();
    assert!(text.contains("\"runs\""), "{text}");

    // Standard output a pipe, then a regular file: the table, then the whole JSON document,
    // and the note saying where it went on stderr (not inside it).
    let file = tmp("stdout.txt");
    for to_file in [false, true] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_multiq"));
        cmd.args(["bench", "queues", "--backend", "cpu"])
            .args(SMALL)
            .args(["--threads", "1", "--json", "/dev/stdout"]);
        if to_file {
            cmd.stdout(std::fs::File::create(&file).unwrap());
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let text = if to_file {
            std::fs::read_to_string(&file).unwrap()
        } else {
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let json_at = text.find("\n{").expect("the results after the table") + 1;
        assert!(
            text[..json_at].contains("threads"),
            "the table first: {text}"
        );
        let doc: serde_json::Value = serde_json::from_str(&text[json_at..]).unwrap();
        assert!(doc["runs"].is_array(), "{text}");
        assert!(stderr(&out).contains("results written to /dev/stdout"));
    }
}

/// Standard output that cannot be written (a full disk) is one line and exit 1, not a panic.
#[cfg(target_os = "linux")]
#[test]
fn a_full_stdout_is_one_line_and_exit_1() {
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let json = tmp("full-stdout.json");
    let _ = std::fs::remove_file(&json);
    let js = json.to_str().unwrap();
    let queues = [
        "bench",
        "queues",
        "--backend",
        "cpu",
        "--threads",
        "1",
        "--data",
        "2048",
        "--iters",
        "2",
        "--json",
        js,
    ];
    let matmul = [
        "bench",
        "matmul",
        "--backend",
        "cpu",
        "--sizes",
        "8",
        "--threads",
        "1",
        "--seconds",
        "0.01",
        "--json",
        js,
    ];
    for args in [&["info", "--backend", "cpu"][..], &queues, &matmul] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_multiq"))
            .args(args)
            .stdout(full())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("standard output"), "{args:?}: {err}");
        // The work finished and its results file was written all the same.
        if args.contains(&"--json") {
            let text = std::fs::read_to_string(&json).expect("--json written");
            assert!(text.contains("\"runs\""), "{args:?}");
            std::fs::remove_file(&json).unwrap();
        }
    }
}

#[test]
fn absent_cuda_is_a_clear_error_and_auto_falls_back() {
    let probe = multiq(&["info", "--backend", "cuda"]);
    if probe.status.success() {
        eprintln!("CUDA is present here: the absent-backend path is not testable");
        return;
    }
    assert_eq!(probe.status.code(), Some(2));
    let err = String::from_utf8_lossy(&probe.stderr);
    assert!(err.contains("backend `cuda` is not available"), "{err}");
    assert!(
        err.contains("libcuda") || err.contains("device"),
        "names what is missing: {err}"
    );
    let auto = multiq(&["info"]);
    assert!(auto.status.success());
    let out = String::from_utf8_lossy(&auto.stdout);
    assert!(
        out.contains("CUDA not used") && out.contains("backend: cpu"),
        "{out}"
    );
}

#[test]
fn a_run_writes_the_json_contract() {
    let json = tmp("run.json");
    let out = queues(&[
        "--threads",
        "1,2",
        "--async",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("scenario per-thread") && stdout.contains("verdict:"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in [
        "multiq_version",
        "git_commit",
        "backend",
        "device",
        "host_threads",
        "started_at",
        "command",
        "runs",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["backend"], "cpu");
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4, "2 scenarios x 2 thread counts");
    for r in runs {
        for key in [
            "workload",
            "preset",
            "scenario",
            "lock",
            "inflight",
            "data",
            "kernel_iters",
            "threads",
            "ops",
            "seconds",
            "ops_per_sec",
            "speedup",
            "verified",
        ] {
            assert!(r.get(key).is_some(), "run lacks {key}: {r}");
        }
        assert_eq!(r["workload"], "queues");
        assert_eq!(r["inflight"], 8);
        assert_eq!(r["verified"], true);
        assert_eq!(r["ops"], r["threads"].as_u64().unwrap() * 3);
        assert!(["shared", "per-thread"].contains(&r["scenario"].as_str().unwrap()));
        assert!(r["ops_per_sec"].as_f64().unwrap() > 0.0);
        // The host's counters: the submitting threads did work, so they used CPU time.
        if cfg!(target_os = "linux") {
            let host = &r["host"];
            assert!(host["worker_cpu_ms"].as_f64().unwrap() > 0.0, "{r}");
            assert!(host["cpu_per_op_us"].as_f64().unwrap() > 0.0, "{r}");
            assert!(host["steal_ms"].as_f64().unwrap() >= 0.0, "{r}");
            assert!(host["involuntary_switches"].is_u64(), "{r}");
        }
        // One run per configuration: no per-repeat list.
        assert!(r.get("each_repeat").is_none(), "{r}");
        // Each thread on its own, none pinned (the default).
        assert_eq!(r["pinned"], false, "{r}");
        let per = &r["per_thread"];
        let threads = r["threads"].as_u64().unwrap() as usize;
        for key in [
            "finished_ms",
            "p50_us",
            "cpu_ms",
            "involuntary_switches",
            "cpu",
        ] {
            assert_eq!(per[key].as_array().unwrap().len(), threads, "{key}: {r}");
        }
        let finished: Vec<f64> = per["finished_ms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        // No thread finished after the run did.
        let seconds = r["seconds"].as_f64().unwrap();
        assert!(
            finished
                .iter()
                .all(|&f| f > 0.0 && f <= seconds * 1e3 + 1e-3),
            "{r}"
        );
        assert!(per["cpu"].as_array().unwrap().iter().all(|c| c.is_null()));
    }
    let one = runs.iter().find(|r| r["threads"] == 1).unwrap();
    assert_eq!(one["speedup"], 1.0);
}

#[cfg(target_os = "linux")]
#[test]
fn pinned_threads_run_one_per_cpu_wrapping_around() {
    let allowed: Vec<usize> = core_affinity::get_core_ids()
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    // One thread more than there are CPUs: the last one shares the first CPU.
    let threads = allowed.len() + 1;
    let json = tmp("pinned.json");
    let out = queues(&[
        "--threads",
        &threads.to_string(),
        "--scenario",
        "per-thread",
        "--pin-threads",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let r = &v["runs"][0];
    assert_eq!(r["pinned"], true, "{r}");
    assert_eq!(r["verified"], true, "{r}");
    let cpus: Vec<usize> = r["per_thread"]["cpu"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().expect("every thread pinned") as usize)
        .collect();
    let expected: Vec<usize> = (0..threads).map(|t| allowed[t % allowed.len()]).collect();
    assert_eq!(cpus, expected);
}

#[test]
fn cpu_presets_are_scaled_to_the_units_unless_full_or_data_is_given() {
    // (extra flags, expected data of the minimal preset, whether the scaling note is there)
    let units2 = 2 * multiq::backend::cpu::BLOCK;
    let cases: &[(&[&str], usize, bool)] = &[
        (&[], units2 / 4, true),
        (&["--full"], 65_536, false),
        (&["--data", "3000"], 3000, false),
        (&["--data", "3000", "--full"], 3000, false),
    ];
    for (i, (extra, data, note)) in cases.iter().enumerate() {
        let json = tmp(&format!("scaled-{i}.json"));
        let mut args = vec![
            "bench",
            "queues",
            "--backend",
            "cpu",
            "--units",
            "2",
            "--preset",
            "minimal",
            "--threads",
            "1",
            "--iters",
            "1",
            "--scenario",
            "per-thread",
            "--json",
            json.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = multiq(&args);
        assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(v["runs"][0]["data"], *data as u64, "{extra:?}");
        let notes = v["notes"].as_array().map_or(0, |n| {
            n.iter()
                .filter(|n| n.as_str().unwrap().contains("scaled for the CPU backend"))
                .count()
        });
        assert_eq!(notes, usize::from(*note), "{extra:?}: {v}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.contains("note: scaled"),
            *note,
            "{extra:?}: {stdout}"
        );
    }
}

#[test]
fn verification_failure_exits_1_loudly() {
    let json = tmp("corrupt.json");
    let out = queues(&[
        "--threads",
        "1",
        "--corrupt-for-testing",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("verification failed") && err.contains("FAILED"),
        "{err}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["verified"] == false));
}

#[test]
fn help_teaches_what_is_timed() {
    let out = multiq(&["bench", "queues", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Timing covers only the ops"), "{help}");
    assert!(help.contains("--preset") && help.contains("--inflight") && help.contains("--lock"));
    let top = multiq(&["--help"]);
    assert!(String::from_utf8_lossy(&top.stdout).contains("bench"));
    let none = multiq(&[]);
    assert_eq!(
        none.status.code(),
        Some(2),
        "no sub-command is a usage error"
    );
}
