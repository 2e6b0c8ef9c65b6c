//! `multiq bench matmul`, `multiq bench mlp`, `multiq weights` and `multiq mlp-run` on the CPU:
//! usage errors (one line, exit 2, nothing written), JSON rows, weights files.

mod common;
use common::{multiq, stderr, tmp};

#[test]
fn usage_errors_are_one_line_and_exit_2() {
    let json = tmp("never.json");
    let j = json.to_str().unwrap();
    let cases: &[&[&str]] = &[
        &[
            "bench",
            "matmul",
            "--backend",
            "cpu",
            "--sizes",
            "0",
            "--json",
            j,
        ],
        &[
            "bench",
            "matmul",
            "--backend",
            "cpu",
            "--sizes",
            "a,64",
            "--json",
            j,
        ],
        &[
            "bench",
            "matmul",
            "--backend",
            "cpu",
            "--coalesce",
            "maybe",
            "--json",
            j,
        ],
        &[
            "bench",
            "matmul",
            "--backend",
            "cpu",
            "--scenario",
            "all",
            "--json",
            j,
        ],
        &[
            "bench",
            "matmul",
            "--backend",
            "cpu",
            "--seconds",
            "0",
            "--json",
            j,
        ],
        &[
            "bench",
            "matmul",
            "--backend",
            "cpu",
            "--threads",
            "0",
            "--json",
            j,
        ],
        &[
            "bench",
            "mlp",
            "--backend",
            "cpu",
            "--batching",
            "yes",
            "--json",
            j,
        ],
        &[
            "bench",
            "mlp",
            "--backend",
            "cpu",
            "--batches",
            "1,100000",
            "--json",
            j,
        ],
        &[
            "bench",
            "mlp",
            "--backend",
            "cpu",
            "--max-rows",
            "0",
            "--threads",
            "1",
            "--json",
            j,
        ],
        &[
            "bench",
            "matmul",
            "--backend",
            "cpu",
            "--max-batch",
            "0",
            "--json",
            j,
        ],
        &["weights"],
    ];
    for args in cases {
        let o = multiq(args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{args:?}: {e}");
        assert!(!json.exists(), "{args:?} wrote {}", json.display());
    }
}

#[test]
fn bench_matmul_writes_matmul_rows() {
    let json = tmp("matmul.json");
    let o = multiq(&[
        "bench",
        "matmul",
        "--backend",
        "cpu",
        "--sizes",
        "16,32",
        "--threads",
        "1,2",
        "--seconds",
        "0.05",
        "--limit-batch",
        "4",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    // Per size: limit, then per thread count per-thread, shared and coalesced.
    assert_eq!(runs.len(), 2 * (1 + 2 * 3));
    for r in runs {
        assert_eq!(r["workload"], "matmul");
        assert!(r["size"].as_u64().is_some());
        assert!(r["ops_per_sec"].as_f64().unwrap() > 0.0);
        assert_eq!(r["verified"], true);
        assert_eq!(r["precision"], "fp32");
        assert!(r["latency_us"]["p99"].as_f64().is_some());
    }
    assert!(runs
        .iter()
        .any(|r| r["scenario"] == "coalesced" && r["coalesce"] == "on"));
}

#[test]
fn bench_mlp_writes_mlp_rows_with_samples_per_sec() {
    let json = tmp("mlp.json");
    let o = multiq(&[
        "bench",
        "mlp",
        "--backend",
        "cpu",
        "--batches",
        "1,4",
        "--iters",
        "3",
        "--threads",
        "2",
        "--seconds",
        "0.05",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2 + 2);
    for r in runs {
        assert_eq!(r["workload"], "mlp");
        assert!(r["batch"].as_u64().is_some());
        assert!(r["samples_per_sec"].as_f64().unwrap() > 0.0);
        assert_eq!(r["verified"], true);
    }
    let sweep4 = runs.iter().find(|r| r["batch"] == 4).unwrap();
    let rate = sweep4["samples_per_sec"].as_f64().unwrap();
    assert!((rate - 4.0 * sweep4["ops_per_sec"].as_f64().unwrap()).abs() < 1e-6 * rate);
}

#[test]
fn weights_and_mlp_run_round_trip() {
    let w = tmp("w.safetensors");
    let out = tmp("out.safetensors");
    let o = multiq(&["weights", "--out", w.to_str().unwrap(), "--seed", "3"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = multiq(&[
        "mlp-run",
        "--backend",
        "cpu",
        "--weights",
        w.to_str().unwrap(),
        "--rows",
        "3",
        "--batching",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("input").unwrap().shape(), [3, 512]);
    assert_eq!(st.tensor("output").unwrap().shape(), [3, 512]);
    // A truncated weights file: one line, exit 1 (a bad file, not a usage error), naming it.
    let cut = tmp("cut.safetensors");
    let full = std::fs::read(&w).unwrap();
    std::fs::write(&cut, &full[..100]).unwrap();
    let o = multiq(&[
        "mlp-run",
        "--backend",
        "cpu",
        "--weights",
        cut.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("cut.safetensors") && e.trim().lines().count() == 1,
        "{e}"
    );
}
