//! Standard output for the command's reports. A write that fails (a full disk, a closed
//! terminal) is an [`Error::Io`] for the caller, which the command prints as one line and
//! exits 1 on, instead of a panic (`println!`) or output lost without a word. A closed pipe
//! still ends the command by SIGPIPE (`main` restores its default), like other command-line
//! tools.

use std::io::Write;

use crate::error::{Error, Result};

/// Writes `args` to standard output and flushes it.
pub fn write_fmt(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(|source| Error::Io {
            path: "standard output".into(),
            source,
        })
}

/// `print!` that returns a [`crate::Result`] instead of panicking when standard output fails.
#[doc(hidden)]
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdout::write_fmt(format_args!($($arg)*)) };
}

/// `println!` that returns a [`crate::Result`] instead of panicking when standard output fails.
#[doc(hidden)]
#[macro_export]
macro_rules! outln {
    () => { $crate::stdout::write_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::stdout::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}
