//! What the command-line test files share: running the built `multiq` from the package root,
//! a scratch folder per test binary and process, and an output's stderr as text.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs the `multiq` binary built for these tests with `args`, from the package root.
pub fn multiq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_multiq"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run multiq")
}

/// `name` in a scratch folder of this test binary and process (created on first use).
pub fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "multiq-{}-{}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The output's stderr, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
