//! Standard output for the command's reports. A write that fails (a full disk, a closed
//! terminal) is not a panic (`println!`) and ends nothing early: the first failure is kept,
//! later writes are dropped, the command finishes its work (its `--json` results included),
//! and `main` then reports the failure ([`failure`]) as one line and exits 1. A closed pipe
//! still ends the command by SIGPIPE (`main` restores its default), like other command-line
//! tools.

use std::io::Write;
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The first failed write: its kind and message.
static FAILED: OnceLock<(std::io::ErrorKind, String)> = OnceLock::new();

/// Writes `args` to standard output and flushes it; after a failure, nothing (see the module
/// doc). Always `Ok`: the `Result` lets callers use `?` should that change.
pub fn write_fmt(args: std::fmt::Arguments<'_>) -> Result<()> {
    if FAILED.get().is_some() {
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        let _ = FAILED.set((e.kind(), e.to_string()));
    }
    Ok(())
}

/// The first write to standard output that failed, if any.
pub fn failure() -> Option<Error> {
    FAILED.get().map(|(kind, message)| Error::Io {
        path: "standard output".into(),
        source: std::io::Error::new(*kind, message.clone()),
    })
}

/// `print!` through [`write_fmt`].
#[doc(hidden)]
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdout::write_fmt(format_args!($($arg)*)) };
}

/// `println!` through [`write_fmt`].
#[doc(hidden)]
#[macro_export]
macro_rules! outln {
    () => { $crate::stdout::write_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::stdout::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}
