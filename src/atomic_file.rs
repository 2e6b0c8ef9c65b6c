//! Writing a file whole or not at all: the bytes go to a temporary file beside the target,
//! are synced, then renamed over it. A reader never sees half a file; a failed write leaves
//! the old one (or none) in place.
//!
//! A path that is a symbolic link is followed: the file it names is replaced, the link stays.
//! A path naming one of this process's open descriptors (`/dev/stdout`, `/dev/fd/N`,
//! `/proc/self/fd/N`) is written through that descriptor (a duplicate of it, sharing its
//! offset), so the bytes land where that descriptor writes, after what it wrote before and
//! before what it writes next, whether it is a terminal, a pipe or a file. Any other path
//! naming something that is not a regular file (`/dev/null`, a named pipe) is opened and
//! written through. Neither is ever replaced.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where the bytes for a path go.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// A regular file, existing or not, at this path (links followed): replaced atomically.
    File(PathBuf),
    /// A device, pipe or socket at this path (links followed): opened and written through.
    Stream(PathBuf),
    /// This process's open descriptor: written through a duplicate.
    Descriptor(i32),
}

/// Most links followed before giving up (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// The target of `path`, links followed.
pub(crate) fn target(path: &Path) -> std::io::Result<Target> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        if let Some(fd) = descriptor(&p) {
            return Ok(Target::Descriptor(fd));
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

/// The descriptor `path` names if it is an entry of this process's descriptor folder
/// (`/proc/<pid>/fd/N` or `/proc/<pid>/task/<tid>/fd/N`, however reached: `/proc/self/fd`,
/// `/dev/fd`, a relative path).
fn descriptor(path: &Path) -> Option<i32> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let fd = path.file_name()?.to_str()?.parse::<i32>().ok()?;
    let dir = std::fs::canonicalize(folder(path)).ok()?;
    let own = Path::new("/proc").join(std::process::id().to_string());
    let is_fd_folder = dir == own.join("fd")
        || (dir.ends_with("fd") && dir.parent()?.parent()? == own.join("task"));
    is_fd_folder.then_some(fd)
}

/// Whether descriptor `fd` is open in this process.
#[cfg(unix)]
pub(crate) fn is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags; any integer is a valid argument.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Whether descriptor `fd` is open in this process.
#[cfg(not(unix))]
pub(crate) fn is_open(_fd: i32) -> bool {
    false
}

/// Writes `data` through a duplicate of this process's descriptor `fd`.
#[cfg(unix)]
fn write_descriptor(fd: i32, data: &[u8]) -> std::io::Result<()> {
    use std::os::fd::FromRawFd;
    // What Rust buffered for the standard streams goes first.
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: dup takes any integer and returns a new descriptor, or -1.
    let dup = unsafe { libc::dup(fd) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dup` is a descriptor just created here, owned by nothing else; the File closes
    // it when dropped.
    let mut f = unsafe { std::fs::File::from_raw_fd(dup) };
    f.write_all(data).and_then(|()| f.flush())
}

#[cfg(not(unix))]
fn write_descriptor(_fd: i32, _data: &[u8]) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "descriptors are written through on Unix only",
    ))
}

/// Whether `path` names this process's standard output (so a note about what was written
/// there belongs on stderr).
pub(crate) fn is_stdout(path: &Path) -> bool {
    matches!(target(path), Ok(Target::Descriptor(1)))
}

/// The folder a file at `path` is created in.
pub(crate) fn folder(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `data` to `path` atomically (a temporary file in the same folder, then a rename), or
/// through, if `path` names a descriptor, a device or a pipe.
pub(crate) fn write(path: &Path, data: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let file = match target(path).map_err(io)? {
        Target::Descriptor(fd) => return write_descriptor(fd, data).map_err(io),
        Target::Stream(stream) => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
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
    fn a_descriptor_is_found_however_it_is_named() {
        for (p, fd) in [
            ("/dev/stdout", 1),
            ("/dev/stderr", 2),
            ("/proc/self/fd/1", 1),
            ("/dev/fd/2", 2),
            ("/proc/thread-self/fd/2", 2),
            ("/proc/self/fd/../fd/1", 1),
        ] {
            assert_eq!(target(Path::new(p)).unwrap(), Target::Descriptor(fd), "{p}");
        }
        // Other paths under /proc are not descriptors (nor streams by their name alone).
        assert_eq!(
            target(Path::new("/proc/multiq-none.json")).unwrap(),
            Target::File("/proc/multiq-none.json".into())
        );
        let cwd = format!("/proc/{}/cwd/x.json", std::process::id());
        assert!(matches!(target(Path::new(&cwd)).unwrap(), Target::File(_)));
    }

    /// Bytes written through a descriptor share its offset: what the descriptor writes next
    /// follows them, in a regular file too (not written over them).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_descriptor_to_a_file_keeps_its_order() {
        use std::os::fd::AsRawFd;
        let dir = scratch("fd");
        let path = dir.join("out.txt");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"table\n").unwrap();
        let name = format!("/proc/self/fd/{}", f.as_raw_fd());
        assert!(is_open(f.as_raw_fd()));
        write(Path::new(&name), b"{json}\n").unwrap();
        f.write_all(b"written\n").unwrap();
        drop(f);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "table\n{json}\nwritten\n"
        );
        std::fs::remove_dir_all(dir).unwrap();
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
