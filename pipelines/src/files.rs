//! Reading pipeline files: bounded in size, regular files only, and for
//! `include: local` strictly inside the project directory.
//!
//! A checkout is hostile input like the files in it: an include may name a
//! symlink to `/etc/shadow` or to `/dev/zero`, a FIFO that blocks forever,
//! or a file of gigabytes. Includes are opened with `openat2(2)` and
//! `RESOLVE_BENEATH`, so the kernel follows a symlink only while it stays
//! below the project directory; everything is opened non-blocking, must be a
//! regular file, and is read at most up to the limit.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::limits::{bytes, Limits};

/// Reads `path` (a pipeline file the user named: symlinks are followed) if
/// it is a regular file of at most `max_bytes` bytes of UTF-8.
pub fn read_file(path: &Path, max_bytes: u64) -> io::Result<String> {
    let fd = rustix::fs::open(path, read_flags(), Mode::empty())?;
    read_fd(fd, max_bytes)
}

/// Reads `rel`, a path relative to `root` (a leading `/` also means the
/// project root, as in GitLab's `include: local`), refusing any path that
/// leads out of `root`: a `..` component, or a symlink whose target is
/// absolute or climbs above `root`. Symlinks that stay inside are followed.
/// The file must be a regular file of at most `max_bytes` bytes of UTF-8.
pub fn read_beneath(root: &Path, rel: &str, max_bytes: u64) -> io::Result<String> {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() || rel.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    }
    if Path::new(rel)
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(outside());
    }
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let fd = match rustix::fs::openat2(
        &dir,
        rel,
        read_flags(),
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => fd,
        Err(Errno::XDEV) => return Err(outside()),
        Err(Errno::LOOP) => {
            return Err(io::Error::other(
                "too many levels of symbolic links, or a link to a /proc magic link",
            ))
        }
        // No openat2 (Linux < 5.6, or a seccomp filter that refuses it):
        // check the resolved path instead. A link swapped between the check
        // and the open could still escape, so this is only a fallback.
        Err(Errno::NOSYS | Errno::PERM) => open_checked(root, rel)?,
        Err(e) => return Err(e.into()),
    };
    read_fd(fd, max_bytes)
}

/// Reads files of one project for the front ends: [`read_beneath`] with the
/// file size limit. `reader.read(rel)` is what `load`/`gitlab::parse` take
/// as `read`.
#[derive(Debug, Clone)]
pub struct ProjectFiles {
    root: PathBuf,
    max_bytes: u64,
}

impl ProjectFiles {
    pub fn new(root: impl Into<PathBuf>, limits: &Limits) -> Self {
        ProjectFiles {
            root: root.into(),
            max_bytes: limits.max_file_bytes,
        }
    }

    pub fn read(&self, rel: &str) -> io::Result<String> {
        read_beneath(&self.root, rel, self.max_bytes)
    }
}

fn read_flags() -> OFlags {
    // Non-blocking: opening a FIFO must not wait for a writer.
    OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK
}

fn outside() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "it leads outside the project directory (through `..` or a symbolic link); \
         kiln reads included files only inside the project",
    )
}

fn open_checked(root: &Path, rel: &str) -> io::Result<OwnedFd> {
    let root = root.canonicalize()?;
    let full = root.join(rel).canonicalize()?;
    if !full.starts_with(&root) {
        return Err(outside());
    }
    Ok(rustix::fs::open(&full, read_flags(), Mode::empty())?)
}

fn read_fd(fd: OwnedFd, max_bytes: u64) -> io::Result<String> {
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!(
                "it is larger than {} (max_file_bytes)",
                bytes(usize::try_from(max_bytes).unwrap_or(usize::MAX))
            ),
        )
    };
    if u64::try_from(st.st_size).unwrap_or(0) > max_bytes {
        return Err(too_large());
    }
    // Back to blocking reads: it is a regular file.
    rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
    let mut buf = Vec::new();
    File::from(fd)
        .take(max_bytes.saturating_add(1))
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > max_bytes {
        return Err(too_large()); // grew since fstat
    }
    String::from_utf8(buf).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!(
            "kiln-pipelines-files-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("proj/sub")).unwrap();
        Dir(d)
    }

    #[test]
    fn reads_inside_and_follows_inner_links() {
        let d = tmp("inside");
        let proj = d.0.join("proj");
        std::fs::write(proj.join("sub/a.yml"), "a: 1\n").unwrap();
        symlink("sub/a.yml", proj.join("link.yml")).unwrap();
        symlink("../sub", proj.join("sub/loop")).unwrap();
        assert_eq!(read_beneath(&proj, "sub/a.yml", 100).unwrap(), "a: 1\n");
        assert_eq!(read_beneath(&proj, "/sub/a.yml", 100).unwrap(), "a: 1\n");
        assert_eq!(read_beneath(&proj, "link.yml", 100).unwrap(), "a: 1\n");
        assert_eq!(
            read_beneath(&proj, "sub/loop/a.yml", 100).unwrap(),
            "a: 1\n"
        );
    }

    #[test]
    fn refuses_everything_that_leaves_the_root() {
        let d = tmp("outside");
        let proj = d.0.join("proj");
        std::fs::write(d.0.join("secret"), "s\n").unwrap();
        symlink(d.0.join("secret"), proj.join("abs.yml")).unwrap();
        symlink("../secret", proj.join("rel.yml")).unwrap();
        symlink("../..", proj.join("sub/up")).unwrap();
        for rel in [
            "abs.yml",
            "rel.yml",
            "../secret",
            "sub/../../secret",
            "sub/up/secret",
        ] {
            let e = read_beneath(&proj, rel, 100).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{rel}: {e}");
            assert!(e.to_string().contains("outside the project"), "{rel}: {e}");
        }
    }

    #[test]
    fn refuses_non_regular_and_large_files() {
        let d = tmp("kinds");
        let proj = d.0.join("proj");
        std::fs::write(proj.join("big.yml"), "x".repeat(101)).unwrap();
        let e = read_beneath(&proj, "big.yml", 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge, "{e}");
        let e = read_beneath(&proj, "sub", 100).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let fifo = proj.join("fifo.yml");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = read_beneath(&proj, "fifo.yml", 100).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::write(proj.join("bin.yml"), b"a: \xff\n").unwrap();
        let e = read_beneath(&proj, "bin.yml", 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert_eq!(read_file(&proj.join("big.yml"), 200).unwrap().len(), 101);
        assert!(read_file(&proj.join("big.yml"), 100).is_err());
    }
}
