//! Writing a file whole or not at all: the bytes go to a temporary file beside the target,
//! are synced, then renamed over it. A reader never sees half a file; a failed write leaves
//! the old one (or none) in place.
//!
//! A path that is a symbolic link is followed: the file it names is replaced, the link stays.
//! A path naming something that is not a regular file (`/dev/null`, a pipe), or an open file
//! descriptor (`/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`, even when it is a regular file),
//! is written through and appended to, as a shell's `>>` would, never replaced: the bytes go
//! where that descriptor goes, after what was written there before.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where the bytes for a path go.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A regular file, existing or not, at this path (links followed): replaced atomically.
    File(PathBuf),
    /// A device, pipe or socket, or an open descriptor, at this path: written through.
    Stream(PathBuf),
}

/// Most links followed before giving up (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// The target of `path`, links followed.
pub(crate) fn target(path: &Path) -> std::io::Result<Target> {
    // A descriptor's link (/dev/stdout -> /proc/self/fd/1 -> the file or pipe) names an open
    // file, whose own path replacing would take away from under the descriptor.
    let descriptor = |p: &Path| p.starts_with("/proc") || p.starts_with("/dev/fd");
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        if descriptor(&p) {
            return Ok(Target::Stream(path.to_path_buf()));
        }
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let next = std::fs::read_link(&p)?;
                p = match p.parent() {
                    Some(dir) if next.is_relative() => dir.join(next),
                    _ => next,
                };
            }
            Ok(m) if !m.is_file() && !m.is_dir() => return Ok(Target::Stream(p)),
            _ => return Ok(Target::File(p)),
        }
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
}

/// The folder a file at `path` is created in.
pub(crate) fn folder(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `data` to `path` atomically (a temporary file in the same folder, then a rename), or
/// through, if `path` names a device or pipe.
pub(crate) fn write(path: &Path, data: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let file = match target(path).map_err(io)? {
        Target::Stream(stream) => {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(stream)
                .map_err(io)?;
            return f.write_all(data).and_then(|()| f.flush()).map_err(io);
        }
        Target::File(file) => file,
    };
    let tmp = folder(&file).join(format!(
        ".{}.tmp-{}",
        file.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(data)?;
        f.sync_all()
    });
    written
        .and_then(|()| std::fs::rename(&tmp, &file))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "multiq-atomic-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_file_is_replaced_whole() {
        let dir = scratch("file");
        let path = dir.join("r.json");
        write(&path, b"first, longer contents").unwrap();
        write(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_link_is_followed_and_stays_a_link() {
        let dir = scratch("link");
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::os::unix::fs::symlink("sub/real.json", dir.join("link.json")).unwrap();
        // A dangling link: the file it names is created.
        write(&dir.join("link.json"), b"one").unwrap();
        assert_eq!(std::fs::read(dir.join("sub/real.json")).unwrap(), b"one");
        write(&dir.join("link.json"), b"two").unwrap();
        let link = std::fs::symlink_metadata(dir.join("link.json")).unwrap();
        assert!(link.file_type().is_symlink());
        assert_eq!(std::fs::read(dir.join("sub/real.json")).unwrap(), b"two");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_loop_of_links_is_an_error_not_a_hang() {
        let dir = scratch("loop");
        std::os::unix::fs::symlink("b", dir.join("a")).unwrap();
        std::os::unix::fs::symlink("a", dir.join("b")).unwrap();
        assert!(write(&dir.join("a"), b"x").is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_descriptor_is_a_stream_whatever_it_points_to() {
        for p in ["/dev/stdout", "/dev/stderr", "/proc/self/fd/1", "/dev/fd/2"] {
            assert_eq!(
                target(Path::new(p)).unwrap(),
                Target::Stream(p.into()),
                "{p}"
            );
        }
    }

    /// A pipe is written through (a reader gets the bytes) and stays a pipe.
    #[cfg(unix)]
    #[test]
    fn a_pipe_is_written_through_not_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let dir = scratch("fifo");
        let fifo = dir.join("out.json");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            eprintln!("skipped: mkfifo is not available");
            return;
        }
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        assert_eq!(target(&fifo).unwrap(), Target::Stream(fifo.clone()));
        write(&fifo, b"through").unwrap();
        assert_eq!(reader.join().unwrap(), b"through");
        let kind = std::fs::symlink_metadata(&fifo).unwrap().file_type();
        assert!(kind.is_fifo());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
