//! `multiq stress` on the CPU backend: a few rounds of every kind run clean, each kind of
//! failure the harness looks for is found when caused on purpose (test hooks), a round
//! replays from its seed, and wrong arguments are usage errors.

mod common;
use common::{multiq, tmp};

use std::process::Output;
use std::time::{Duration, Instant};

fn stress(args: &[&str]) -> Output {
    let mut a = vec!["stress", "--backend", "cpu"];
    a.extend_from_slice(args);
    multiq(&a)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The summary line's counts.
fn summary(stdout: &str) -> std::collections::HashMap<String, f64> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("rounds="))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

fn assert_clean(o: &Output, rounds: f64) {
    let (out, err) = text(o);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let s = summary(&out);
    assert_eq!(s["rounds"], rounds, "{out}");
    for k in ["crashes", "hangs", "mismatches", "leaks", "errors"] {
        assert_eq!(s[k], 0.0, "{k}: {out}");
    }
    assert!(s["ops"] > 0.0);
}

#[test]
fn rounds_of_every_kind_run_clean_and_write_their_results() {
    let json = tmp("clean.json");
    let o = stress(&[
        "--rounds",
        "16",
        "--seed",
        "11",
        "--threads",
        "8",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_clean(&o, 16.0);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["rounds"], 16);
    assert_eq!(v["seed"], "0x000000000000000b");
    assert_eq!(v["backend"], "cpu");
    assert_eq!(v["crashes"], 0);
    assert_eq!(v["failures"].as_array().unwrap().len(), 0);
    let ops = v["ops"].as_u64().unwrap();
    let checked = v["verified_ops"].as_u64().unwrap() + v["unverified_ops"].as_u64().unwrap();
    assert_eq!(checked, ops, "every op is checked or dropped by design");
    assert!(v["verified_ops"].as_u64().unwrap() > ops / 2);
    assert!(v["summary_line"]
        .as_str()
        .unwrap()
        .starts_with("rounds=16 ops="));
    for field in [
        "git_commit",
        "command",
        "started_at",
        "by_kind",
        "resources",
    ] {
        assert!(!v[field].is_null(), "{field} missing");
    }
}

#[test]
fn every_wait_policy_runs_clean_without_coalescing() {
    let o = stress(&[
        "--rounds",
        "10",
        "--seed",
        "5",
        "--threads",
        "8",
        "--coalesce",
        "off",
    ]);
    assert_clean(&o, 10.0);
}

#[test]
fn each_round_kind_runs_clean_on_its_own() {
    for kind in ["mixed", "oversubscribe", "churn", "exit"] {
        let o = stress(&[
            "--rounds", "3", "--seed", "3", "--kinds", kind, "--wait", "yield",
        ]);
        assert_clean(&o, 3.0);
        let (out, _) = text(&o);
        assert!(summary(&out)["ops"] > 0.0, "{kind}: {out}");
    }
}

/// Runs two rounds with a failure caused on purpose in the first; returns stdout.
fn hooked(hook: &str, extra: &[&str]) -> (Output, String) {
    let mut a = vec![
        "--rounds",
        "2",
        "--seed",
        "1",
        "--kinds",
        "mixed",
        "--threads",
        "4",
        "--wait",
        "yield",
        "--inject",
        hook,
    ];
    a.extend_from_slice(extra);
    let o = stress(&a);
    let (out, err) = text(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{hook}: stdout:\n{out}\nstderr:\n{err}"
    );
    let s = summary(&out);
    assert_eq!(s["rounds"], 2.0, "the run goes on after the failure: {out}");
    assert!(
        out.contains("FAILED round 0 (seed 0x") && out.contains("replay: multiq stress"),
        "{out}"
    );
    (o, out)
}

#[test]
fn a_wrong_answer_is_found() {
    let (_, out) = hooked("mismatch", &[]);
    assert_eq!(summary(&out)["mismatches"], 1.0, "{out}");
    assert!(out.contains("the serial reference"), "{out}");
}

#[test]
fn a_leak_is_found() {
    let (_, out) = hooked("leak", &[]);
    assert_eq!(summary(&out)["leaks"], 1.0, "{out}");
    assert!(out.contains("live objects did not return"), "{out}");
}

#[test]
fn a_crash_of_the_process_is_counted_and_the_run_goes_on() {
    let (_, out) = hooked("crash", &[]);
    assert_eq!(summary(&out)["crashes"], 1.0, "{out}");
    assert!(out.contains("SIGABRT"), "{out}");
}

#[test]
fn an_unplanned_panic_is_a_crash() {
    let (_, out) = hooked("panic", &[]);
    assert_eq!(summary(&out)["crashes"], 1.0, "{out}");
    assert!(out.contains("thread T0 panicked: test hook"), "{out}");
}

#[test]
fn a_hang_is_named_and_ends_the_round_at_its_deadline() {
    let t0 = Instant::now();
    let (_, out) = hooked("hang", &["--round-timeout", "3"]);
    assert_eq!(summary(&out)["hangs"], 1.0, "{out}");
    assert!(
        out.contains("T0 in injected-hang at op 0"),
        "the stuck thread is named: {out}"
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
}

#[test]
fn a_round_replays_from_its_seed() {
    let plan = |o: &Output| {
        let (out, _) = text(o);
        out.lines()
            .find(|l| l.starts_with("round 0 "))
            .and_then(|l| l.split_once(" ops: "))
            .map(|(_, plan)| plan.to_string())
            .unwrap_or_else(|| panic!("{out}"))
    };
    let args = [
        "--round-seed",
        "0x5eed",
        "--threads",
        "6",
        "--wait",
        "yield",
        "--verbose",
    ];
    let a = stress(&args);
    let b = stress(&args);
    assert_eq!(plan(&a), plan(&b), "the same seed plans the same round");
    let c = stress(&[
        "--round-seed",
        "0x5eee",
        "--threads",
        "6",
        "--wait",
        "yield",
        "--verbose",
    ]);
    assert_ne!(plan(&a), plan(&c));
}

/// `--queue-chain on|off` fixes the device queue's chaining for every round with coalescing
/// `persistent` (worker processes included); without it, such rounds draw it.
#[test]
fn queue_chain_fixes_what_persistent_rounds_would_draw() {
    let plans = |extra: &[&str]| {
        let mut args = vec![
            "--rounds",
            "12",
            "--seed",
            "0x77",
            "--coalesce",
            "persistent",
            "--kinds",
            "mixed,churn",
            "--threads",
            "4",
            "--verbose",
        ];
        args.extend_from_slice(extra);
        let o = stress(&args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}{err}");
        out.lines()
            .filter(|l| l.starts_with("round "))
            .map(|l| l.contains(" chained"))
            .collect::<Vec<_>>()
    };
    let drawn = plans(&[]);
    assert_eq!(drawn.len(), 12);
    assert!(drawn.contains(&true) && drawn.contains(&false), "{drawn:?}");
    assert_eq!(plans(&["--queue-chain", "on"]), vec![true; 12]);
    assert_eq!(plans(&["--queue-chain", "off"]), vec![false; 12]);
}

#[test]
fn wrong_arguments_are_usage_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["--rounds", "0"], "--rounds"),
        (&["--rounds", "-3"], "--rounds"),
        (&["--threads", "0"], "--threads"),
        (&["--threads", "5000"], "--threads"),
        (&["--seconds", "0"], "--seconds"),
        (&["--seed", "zebra"], "--seed"),
        (&["--round-seed", "0x"], "--round-seed"),
        (
            &["--kinds", "meteor"],
            "allowed: mixed, oversubscribe, churn, exit",
        ),
        (
            &["--coalesce", "sometimes"],
            "allowed: off, fixed, adaptive, persistent",
        ),
        (&["--round-timeout", "0"], "--round-timeout"),
        (&["--units", "0"], "--units"),
        (&["--queue-chain", "yes"], "expected on or off"),
        (&["--json", "/nonexistent-dir/x.json"], "does not exist"),
    ];
    for (args, needle) in cases {
        let o = stress(args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // An absent backend is one usage error up front, not a run of failing rounds.
    if !multiq(&["info", "--backend", "cuda"]).status.success() {
        let o = multiq(&["stress", "--backend", "cuda", "--rounds", "3"]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{out}{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("backend `cuda` is not available"), "{err}");
        assert!(!out.contains("rounds="), "no round ran: {out}");
    }
    let help = multiq(&["stress", "--help"]);
    let (out, _) = text(&help);
    assert_eq!(help.status.code(), Some(0));
    for word in [
        "--round-seed",
        "shutdown",
        "replays",
        "Exit codes",
        "mismatches=",
    ] {
        assert!(out.contains(word), "--help lacks {word}");
    }
}
