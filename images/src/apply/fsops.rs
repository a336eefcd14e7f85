//! Filesystem operations relative to directory descriptors, none of which
//! follows a symlink in its final component.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

/// How often `openat2` is retried when it reports `EAGAIN`, which it does
/// with `RESOLVE_IN_ROOT` when a concurrent rename could have affected `..`
/// resolution.
const OPENAT2_RETRIES: usize = 32;

/// Opens `path` (a `/`-separated relative path; empty means the root itself)
/// beneath `root`, resolving every symlink and `..` as if `root` were `/`
/// (`RESOLVE_IN_ROOT`), so the result is always inside `root`. `/proc` magic
/// links are refused. Whether the final component is followed depends on
/// `O_NOFOLLOW` in `flags`.
pub(super) fn open_in_root(
    root: BorrowedFd<'_>,
    path: &[u8],
    flags: OFlags,
) -> io::Result<OwnedFd> {
    let path: &[u8] = if path.is_empty() { b"." } else { path };
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    for _ in 0..OPENAT2_RETRIES {
        match rfs::openat2(root, path, flags | OFlags::CLOEXEC, Mode::empty(), resolve) {
            Err(Errno::AGAIN) => continue,
            result => return result.map_err(io::Error::from),
        }
    }
    Err(Errno::AGAIN.into())
}

/// Opens the directory `name` in `dir` for reading and for `fchmod`, `fchown`
/// and `fsetxattr`, refusing a symlink.
pub(super) fn open_dir_nofollow(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rfs::openat(dir, name, flags, Mode::empty())?)
}

/// Device and inode numbers, which identify a filesystem object.
pub(super) fn dev_ino(st: &Stat) -> (u64, u64) {
    // The field types differ between architectures; all fit in u64.
    #[allow(clippy::unnecessary_cast)]
    (st.st_dev as u64, st.st_ino as u64)
}

/// The type of a stat'ed object.
pub(super) fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`, with `None` when nothing is
/// there.
pub(super) fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<Stat>> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `fstat`.
pub(super) fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    Ok(rfs::fstat(fd)?)
}

/// The names in a directory opened for reading, without `.` and `..`.
pub(crate) fn list_names(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    let mut entries = rfs::Dir::read_from(dir)?;
    while let Some(entry) = entries.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

/// Removes whatever is at `name` in `dir`, a whole tree for a directory,
/// never following symlinks. Returns whether something was there.
pub(super) fn remove_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<bool> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(false);
    };
    if file_type(&st) == FileType::Directory {
        remove_dir_tree(dir, name)?;
    } else {
        rfs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(true)
}

/// Removes the directory `name` in `dir` and everything below it.
///
/// Each level of the tree holds one descriptor while its children are
/// removed; a tree deeper than the open-file limit fails with `EMFILE`
/// rather than being removed in part silently.
fn remove_dir_tree(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let child = open_dir_nofollow(dir, name)?;
    for entry in list_names(child.as_fd())? {
        remove_at(child.as_fd(), &entry)?;
    }
    drop(child);
    rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    Ok(())
}

/// Sets the mode of `name` in `dir`, which must not be a symlink.
///
/// Linux has no `lchmod`: `fchmodat` follows a final symlink, and rustix
/// reports `AT_SYMLINK_NOFOLLOW` as unsupported. The caller has just created
/// `name` itself (a device node or FIFO, which cannot be opened without side
/// effects), and nothing else writes to the tree while a layer is applied;
/// the type is checked once more right before, so a symlink is refused
/// rather than followed.
pub(super) fn chmod_at_not_symlink(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    match lstat_at(dir, name)? {
        Some(st) if file_type(&st) != FileType::Symlink => {}
        Some(_) => return Err(io::Error::new(io::ErrorKind::InvalidInput, "is a symlink")),
        None => return Err(Errno::NOENT.into()),
    }
    Ok(rfs::chmodat(
        dir,
        name,
        Mode::from_raw_mode(mode),
        AtFlags::empty(),
    )?)
}

/// Sets an extended attribute on `name` in `dir` without following a final
/// symlink.
///
/// There is no `lsetxattrat` before Linux 6.13, so this goes through the
/// directory's `/proc/self/fd` entry: only that magic link (to a directory
/// descriptor this process holds) is followed, and `lsetxattr` does not follow
/// `name`.
pub(super) fn lsetxattr_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    key: &[u8],
    value: &[u8],
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name);
    Ok(rfs::lsetxattr(path, key, value, rfs::XattrFlags::empty())?)
}
