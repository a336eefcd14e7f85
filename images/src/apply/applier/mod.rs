//! The apply loop: one pass over the tar entries, then a final pass that sets
//! directory modes and times.
//!
//! - `create.rs`: making each kind of entry.
//! - `whiteout.rs`: whiteouts and opaque directories.
//! - `meta.rs`: owners, modes, times and extended attributes.

mod create;
mod meta;
mod whiteout;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

use super::fsops::{self, dev_ino, file_type};
use super::limits::Budget;
use super::path::{classify, EntryKind, LayerPath};
use super::tarstream::{End, Member, Streamed, TarReader};
use super::{ApplyError, ApplyStats};
use crate::quote_bytes;

use meta::{bad_field, link_name, owner, read_meta, set_xattrs_at, set_xattrs_fd, Meta};

/// Identifies a directory entry: the device and inode of the directory that
/// holds it, and its name. Unlike a path, this does not change when the
/// directory is reached through a symlink, and unlike an inode number, it
/// tells hard links apart.
type NodeKey = (u64, u64, Vec<u8>);

/// How a directory entry that this layer touched came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// This layer created it (a new inode, or a new hard link).
    Created,
    /// A directory from a lower layer that this layer lists or writes
    /// below: it stays, but its lower children are still lower.
    Merged,
}

/// A directory's mode and times, set in the final pass.
#[derive(Debug)]
struct DirMeta {
    /// The directory it was meant for, to skip it if the path has since been
    /// replaced.
    id: (u64, u64),
    mode: u32,
    atime: Timespec,
    mtime: Timespec,
}

/// An open directory and its identity.
struct DirFd {
    fd: OwnedFd,
    id: (u64, u64),
}

impl DirFd {
    fn new(fd: OwnedFd) -> io::Result<DirFd> {
        let id = dev_ino(&fsops::fstat(fd.as_fd())?);
        Ok(DirFd { fd, id })
    }

    fn key(&self, name: &[u8]) -> NodeKey {
        (self.id.0, self.id.1, name.to_vec())
    }
}

/// How many walked parent paths are remembered.
const WALKED_CACHE: usize = 1 << 16;

/// Copy buffer size for file contents.
const COPY_BUFFER: usize = 128 * 1024;

/// State while applying one layer.
pub(super) struct Applier<'b> {
    /// The root, opened for reading (so it can be `fchmod`ed too).
    root: OwnedFd,
    /// Whether to set owners (only root may give files away).
    same_owner: bool,
    /// What this layer created or merged, for whiteouts.
    touched: HashMap<NodeKey, Origin>,
    /// Parent paths whose components are already recorded in `touched`.
    walked: HashSet<Vec<u8>>,
    /// Directory modes and times for the final pass, by path.
    dirs: BTreeMap<Vec<u8>, DirMeta>,
    stats: ApplyStats,
    buf: Vec<u8>,
    /// The image's budget (holes are counted here; bytes and entries by the
    /// reader).
    budget: &'b Budget,
    /// The length of the root's path, when `/proc` tells it.
    root_path_len: Option<usize>,
    /// Extended attributes not applied (namespaces a layer may not set).
    skipped_xattrs: u64,
}

impl<'b> Applier<'b> {
    /// Opens `root`, which must be a directory.
    pub(super) fn open(root: &Path, budget: &'b Budget) -> Result<Applier<'b>, ApplyError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rfs::open(root, flags, Mode::empty()).map_err(|e| ApplyError::OpenRoot {
            path: root.to_owned(),
            source: e.into(),
        })?;
        Ok(Applier {
            same_owner: rustix::process::geteuid().is_root(),
            touched: HashMap::new(),
            walked: HashSet::new(),
            dirs: BTreeMap::new(),
            stats: ApplyStats::default(),
            buf: vec![0; COPY_BUFFER],
            budget,
            root_path_len: fd_path(fd.as_fd()).ok().map(|p| p.len()),
            skipped_xattrs: 0,
            root: fd,
        })
    }

    /// Applies every entry of `tar`, then sets directory modes and times.
    /// Returns how the tar ended too.
    pub(super) fn run(mut self, tar: impl Read) -> Result<(ApplyStats, End), ApplyError> {
        let mut reader = TarReader::new(Streamed(tar), self.budget);
        while let Some(member) = reader.next()? {
            let shown = String::from_utf8_lossy(&member.path).into_owned();
            self.apply_entry(&mut reader, &member, &shown)?;
        }
        self.finish()?;
        if self.skipped_xattrs > 0 {
            tracing::warn!(
                "skipped {} extended attributes (outside the user, security and POSIX ACL \
                 namespaces, or user.* on symlinks)",
                self.skipped_xattrs
            );
        }
        Ok((self.stats, reader.end()))
    }

    fn apply_entry<R: Read>(
        &mut self,
        reader: &mut TarReader<'_, Streamed<R>>,
        entry: &Member,
        shown: &str,
    ) -> Result<(), ApplyError> {
        let entry_type = entry.kind;
        let raw_path = &entry.path;
        let path = LayerPath::parse(raw_path).map_err(|reason| ApplyError::UnsafePath {
            path: shown.to_owned(),
            reason: reason.to_owned(),
        })?;
        match classify(&path).map_err(|reason| invalid(shown, reason))? {
            EntryKind::Normal => {}
            EntryKind::AufsMeta => {
                tracing::debug!(path = shown, "skipping AUFS metadata");
                return Ok(());
            }
            EntryKind::Whiteout(target) => {
                self.stats.whiteouts += 1;
                return self.whiteout(&path, &target, shown);
            }
            EntryKind::Opaque => {
                self.stats.whiteouts += 1;
                return self.opaque(&path, shown);
            }
        }

        let meta = read_meta(entry, shown)?;
        let is_dir = match entry_type {
            tar::EntryType::Directory => true,
            // Pre-POSIX tars mark directories with a trailing slash only.
            tar::EntryType::Regular | tar::EntryType::Continuous => raw_path.ends_with(b"/"),
            _ => false,
        };

        let Some(name) = path.name() else {
            if !is_dir {
                return Err(invalid(shown, "the root can only be a directory"));
            }
            return self.update_root(&meta, shown);
        };
        let parent = self.open_parent(path.parent(), shown)?;

        if is_dir {
            return self.make_dir(&parent, name, &path, meta, shown);
        }
        match entry_type {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.make_file(&parent, name, &path, &meta, reader, entry, shown)
            }
            tar::EntryType::Symlink => {
                let target = link_name(entry, shown)?;
                self.make_symlink(&parent, name, &path, &meta, target, shown)
            }
            tar::EntryType::Link => {
                let target = link_name(entry, shown)?;
                self.make_hardlink(&parent, name, &path, target, shown)
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let (kind, dev) = match entry_type {
                    tar::EntryType::Fifo => (FileType::Fifo, 0),
                    _ => {
                        let header = &entry.header;
                        let major = header
                            .device_major()
                            .map_err(|e| bad_field(shown, "device major", &e))?;
                        let minor = header
                            .device_minor()
                            .map_err(|e| bad_field(shown, "device minor", &e))?;
                        let dev = rfs::makedev(major.unwrap_or(0), minor.unwrap_or(0));
                        let kind = if entry_type == tar::EntryType::Char {
                            FileType::CharacterDevice
                        } else {
                            FileType::BlockDevice
                        };
                        (kind, dev)
                    }
                };
                self.make_node(&parent, name, &path, &meta, kind, dev, shown)
            }
            other => Err(ApplyError::UnsupportedEntryType {
                path: shown.to_owned(),
                typeflag: char::from(other.as_byte()),
            }),
        }
    }

    /// Opens the parent directory of an entry, creating missing directories
    /// (mode 0755, owned by the caller) like `tar` does, and recording the
    /// parents as touched by this layer.
    fn open_parent(&mut self, parent: &[Vec<u8>], shown: &str) -> Result<DirFd, ApplyError> {
        let parent_key = parent.join(&b'/');
        let dir_flags = OFlags::PATH | OFlags::DIRECTORY;
        if self.walked.contains(&parent_key) {
            match fsops::open_in_root(self.root.as_fd(), &parent_key, dir_flags) {
                Ok(fd) => {
                    return DirFd::new(fd)
                        .map_err(|e| io_err(shown, "stat the parent directory", e))
                }
                // Removed since (by a whiteout or a replacement): walk again.
                Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => {}
                Err(e) => return Err(io_err(shown, "open the parent directory", e)),
            }
        }

        let open_root = fsops::open_in_root(self.root.as_fd(), b"", dir_flags);
        let mut cur = open_root
            .and_then(DirFd::new)
            .map_err(|e| io_err(shown, "open the root directory", e))?;
        let mut prefix = Vec::with_capacity(parent_key.len());
        for comp in parent {
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(comp);
            let key = cur.key(comp);
            match fsops::open_in_root(self.root.as_fd(), &prefix, dir_flags) {
                Ok(fd) => {
                    self.touched.entry(key).or_insert(Origin::Merged);
                    cur =
                        DirFd::new(fd).map_err(|e| io_err(shown, "stat a parent directory", e))?;
                }
                Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => {
                    match rfs::mkdirat(cur.fd.as_fd(), comp.as_slice(), Mode::from_raw_mode(0o755))
                    {
                        Ok(()) => {}
                        Err(Errno::EXIST) => {
                            return Err(invalid(
                                shown,
                                format!(
                                    "parent {} is a symlink to a missing directory",
                                    quote_bytes(&prefix)
                                ),
                            ))
                        }
                        Err(e) => return Err(io_err(shown, "create a parent directory", e.into())),
                    }
                    let fd = fsops::open_dir_nofollow(cur.fd.as_fd(), comp)
                        .map_err(|e| io_err(shown, "open a created parent directory", e))?;
                    self.check_dir_depth(fd.as_fd(), shown)?;
                    // mkdirat's mode went through the umask.
                    rfs::fchmod(&fd, Mode::from_raw_mode(0o755)).map_err(|e| {
                        io_err(
                            shown,
                            "set the mode of a created parent directory",
                            e.into(),
                        )
                    })?;
                    self.touched.insert(key, Origin::Created);
                    cur =
                        DirFd::new(fd).map_err(|e| io_err(shown, "stat a parent directory", e))?;
                }
                Err(e) => return Err(io_err(shown, "open a parent directory", e)),
            }
        }
        // A cache only: bounded, as a layer's directories are not.
        if self.walked.len() >= WALKED_CACHE {
            self.walked.clear();
        }
        self.walked.insert(parent_key);
        Ok(cur)
    }

    /// Clears the place `name` in `parent` for a new entry: removes what is
    /// there, unless both are directories. Returns whether an existing
    /// directory is kept.
    fn clear_slot(
        &mut self,
        parent: &DirFd,
        name: &[u8],
        path: &LayerPath,
        want_dir: bool,
        shown: &str,
    ) -> Result<bool, ApplyError> {
        let existing = fsops::lstat_at(parent.fd.as_fd(), name)
            .map_err(|e| io_err(shown, "stat the existing path", e))?;
        let Some(st) = existing else {
            return Ok(false);
        };
        let was_dir = file_type(&st) == FileType::Directory;
        if want_dir && was_dir {
            return Ok(true);
        }
        fsops::remove_at(parent.fd.as_fd(), name)
            .map_err(|e| io_err(shown, "remove the existing path", e))?;
        if was_dir {
            self.forget_dirs_under(&path.key());
        }
        Ok(false)
    }

    /// Drops pending directory metadata for `key` and everything below it.
    fn forget_dirs_under(&mut self, key: &[u8]) {
        self.dirs.remove(key);
        let mut prefix = key.to_vec();
        prefix.push(b'/');
        let below: Vec<Vec<u8>> = self
            .dirs
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in below {
            self.dirs.remove(&k);
        }
    }

    /// A directory entry for the root itself (`./`).
    fn update_root(&mut self, meta: &Meta, shown: &str) -> Result<(), ApplyError> {
        let settled = self.settle_dir(self.root.as_fd(), meta, shown, "stat the root")?;
        self.record_dir(Vec::new(), settled);
        Ok(())
    }

    /// Gives the directory open at `fd` its owner and xattrs from `meta`;
    /// returns what to keep of it until the layer is done (its identity,
    /// mode and times, set last) and how many xattrs were skipped.
    /// `stat_what` names the `fstat` in an error.
    fn settle_dir(
        &self,
        fd: BorrowedFd<'_>,
        meta: &Meta,
        shown: &str,
        stat_what: &'static str,
    ) -> Result<(DirMeta, u64), ApplyError> {
        let id = dev_ino(&fsops::fstat(fd).map_err(|e| io_err(shown, stat_what, e))?);
        self.chown_fd(fd, meta, shown)?;
        let skipped = set_xattrs_fd(fd, meta, shown)?;
        let dir = DirMeta {
            id,
            mode: meta.mode,
            atime: meta.atime,
            mtime: meta.mtime,
        };
        Ok((dir, skipped))
    }

    /// Records a directory [`Applier::settle_dir`] settled, as the tree's
    /// `key`: one more entry.
    fn record_dir(&mut self, key: Vec<u8>, (dir, skipped): (DirMeta, u64)) {
        self.skipped_xattrs += skipped;
        self.dirs.insert(key, dir);
        self.stats.entries += 1;
    }

    /// Refuses a directory this layer has just created where the tree
    /// would get deeper than a path may be ([`Limits::max_path_bytes`],
    /// [`Limits::max_path_depth`]): a layer's paths are bounded, but a path
    /// through a symlink to a deep directory reaches deeper, and trees
    /// deeper than `PATH_MAX` cannot be built into an image or removed with
    /// a bounded number of open files. The directory's place is what the
    /// kernel says (`/proc/self/fd`).
    ///
    /// [`Limits::max_path_bytes`]: super::Limits::max_path_bytes
    /// [`Limits::max_path_depth`]: super::Limits::max_path_depth
    fn check_dir_depth(&self, dir: BorrowedFd<'_>, shown: &str) -> Result<(), ApplyError> {
        let limits = self.budget.limits();
        let too_deep = |limit, claimed| {
            at_entry(
                ApplyError::LimitExceeded {
                    limit,
                    claimed,
                    max: match limit {
                        super::Limit::PathDepth => limits.max_path_depth as u64,
                        _ => limits.max_path_bytes as u64,
                    },
                    at: String::new(),
                },
                shown,
            )
        };
        let Some(root_len) = self.root_path_len else {
            return Ok(());
        };
        match fd_path(dir) {
            Ok(path) => {
                let below = path.get(root_len..).unwrap_or(&[]);
                if below.len() > limits.max_path_bytes {
                    return Err(too_deep(super::Limit::PathBytes, Some(below.len() as u64)));
                }
                let depth = below
                    .split(|&b| b == b'/')
                    .filter(|c| !c.is_empty())
                    .count();
                if depth > limits.max_path_depth {
                    return Err(too_deep(super::Limit::PathDepth, Some(depth as u64)));
                }
                Ok(())
            }
            Err(Errno::NAMETOOLONG) => Err(too_deep(super::Limit::PathBytes, None)),
            // No /proc: the lexical bounds still hold.
            Err(_) => Ok(()),
        }
    }

    /// Sets directory modes and times, now that their contents are written.
    fn finish(&mut self) -> Result<(), ApplyError> {
        let dirs = std::mem::take(&mut self.dirs);
        for (key, meta) in dirs {
            let shown = String::from_utf8_lossy(&key).into_owned();
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
            let fd = match fsops::open_in_root(self.root.as_fd(), &key, flags) {
                Ok(fd) => fd,
                // Replaced or removed by a later entry.
                Err(e)
                    if is_missing(&e) || e.raw_os_error() == Some(Errno::LOOP.raw_os_error()) =>
                {
                    continue
                }
                Err(e) => return Err(io_err(&shown, "open the directory", e)),
            };
            let st =
                fsops::fstat(fd.as_fd()).map_err(|e| io_err(&shown, "stat the directory", e))?;
            if dev_ino(&st) != meta.id {
                continue;
            }
            rfs::fchmod(&fd, Mode::from_raw_mode(meta.mode))
                .map_err(|e| io_err(&shown, "set the directory mode", e.into()))?;
            let times = Timestamps {
                last_access: meta.atime,
                last_modification: meta.mtime,
            };
            rfs::futimens(&fd, &times)
                .map_err(|e| io_err(&shown, "set the directory times", e.into()))?;
        }
        Ok(())
    }

    fn chown_fd(&self, fd: BorrowedFd<'_>, meta: &Meta, shown: &str) -> Result<(), ApplyError> {
        if !self.same_owner {
            return Ok(());
        }
        let (uid, gid) = owner(meta);
        rfs::fchown(fd, Some(uid), Some(gid)).map_err(|e| io_err(shown, "set the owner", e.into()))
    }

    fn chown_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        meta: &Meta,
        shown: &str,
    ) -> Result<(), ApplyError> {
        if !self.same_owner {
            return Ok(());
        }
        let (uid, gid) = owner(meta);
        rfs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(shown, "set the owner", e.into()))
    }
}

/// Where an open directory is, as the kernel says (`/proc/self/fd`).
fn fd_path(fd: BorrowedFd<'_>) -> Result<Vec<u8>, Errno> {
    use std::os::fd::AsRawFd;
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rfs::readlink(link, Vec::new()).map(|p| p.into_bytes())
}

/// Fills in the entry a limit was exceeded at.
fn at_entry(e: ApplyError, shown: &str) -> ApplyError {
    e.located(|| format!("at entry {}", quote_bytes(shown.as_bytes())))
}

fn is_missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == Errno::NOENT.raw_os_error() || c == Errno::NOTDIR.raw_os_error())
}

fn io_err(path: &str, op: &'static str, source: io::Error) -> ApplyError {
    ApplyError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

fn invalid(path: &str, reason: impl Into<String>) -> ApplyError {
    ApplyError::InvalidEntry {
        path: path.to_owned(),
        reason: reason.into(),
    }
}
