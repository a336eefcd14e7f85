//! The apply loop: one pass over the tar entries, then a final pass that sets
//! directory modes and times.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;

use super::fsops::{self, dev_ino, file_type};
use super::limits::Budget;
use super::path::{classify, EntryKind, LayerPath};
use super::tarstream::{End, Member, Streamed, TarReader, PAX_XATTR_PREFIX};
use super::{ApplyError, ApplyStats};
use crate::quote_bytes;

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

/// The metadata of an entry.
#[derive(Debug)]
struct Meta {
    uid: u32,
    gid: u32,
    /// Permission bits with setuid, setgid and sticky.
    mode: u32,
    atime: Timespec,
    mtime: Timespec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    fn times(&self) -> Timestamps {
        Timestamps {
            last_access: self.atime,
            last_modification: self.mtime,
        }
    }
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
        let root = self.root.as_fd();
        let id = dev_ino(&fsops::fstat(root).map_err(|e| io_err(shown, "stat the root", e))?);
        self.chown_fd(root, meta, shown)?;
        self.skipped_xattrs += set_xattrs_fd(root, meta, shown)?;
        self.dirs.insert(
            Vec::new(),
            DirMeta {
                id,
                mode: meta.mode,
                atime: meta.atime,
                mtime: meta.mtime,
            },
        );
        self.stats.entries += 1;
        Ok(())
    }

    fn make_dir(
        &mut self,
        parent: &DirFd,
        name: &[u8],
        path: &LayerPath,
        meta: Meta,
        shown: &str,
    ) -> Result<(), ApplyError> {
        let merged = self.clear_slot(parent, name, path, true, shown)?;
        if !merged {
            rfs::mkdirat(parent.fd.as_fd(), name, Mode::from_raw_mode(0o700))
                .map_err(|e| io_err(shown, "create the directory", e.into()))?;
        }
        let fd = fsops::open_dir_nofollow(parent.fd.as_fd(), name)
            .map_err(|e| io_err(shown, "open the directory", e))?;
        if !merged {
            self.check_dir_depth(fd.as_fd(), shown)?;
        }
        let id =
            dev_ino(&fsops::fstat(fd.as_fd()).map_err(|e| io_err(shown, "stat the directory", e))?);
        if merged {
            self.touched
                .entry(parent.key(name))
                .or_insert(Origin::Merged);
        } else {
            self.touched.insert(parent.key(name), Origin::Created);
        }
        self.chown_fd(fd.as_fd(), &meta, shown)?;
        self.skipped_xattrs += set_xattrs_fd(fd.as_fd(), &meta, shown)?;
        self.dirs.insert(
            path.key(),
            DirMeta {
                id,
                mode: meta.mode,
                atime: meta.atime,
                mtime: meta.mtime,
            },
        );
        self.stats.entries += 1;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn make_file<R: Read>(
        &mut self,
        parent: &DirFd,
        name: &[u8],
        path: &LayerPath,
        meta: &Meta,
        reader: &mut TarReader<'_, Streamed<R>>,
        entry: &Member,
        shown: &str,
    ) -> Result<(), ApplyError> {
        if let Some(sparse) = &entry.sparse {
            // Counted before anything is written.
            self.budget
                .add_holes(sparse.hole_bytes())
                .map_err(|e| at_entry(e, shown))?;
        }
        self.clear_slot(parent, name, path, false, shown)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(parent.fd.as_fd(), name, flags, Mode::from_raw_mode(0o600))
            .map_err(|e| io_err(shown, "create the file", e.into()))?;
        self.touched.insert(parent.key(name), Origin::Created);
        let mut file = File::from(fd);
        match &entry.sparse {
            None => self.copy_data(reader, &mut file, u64::MAX, shown)?,
            Some(sparse) => {
                // Each segment at its offset; what is between stays a hole.
                for &(offset, length) in &sparse.segments {
                    if length == 0 {
                        continue;
                    }
                    file.seek(SeekFrom::Start(offset))
                        .map_err(|e| io_err(shown, "seek in the sparse file", e))?;
                    self.copy_data(reader, &mut file, length, shown)?;
                }
                file.set_len(sparse.real_size)
                    .map_err(|e| io_err(shown, "set the sparse file's size", e))?;
                self.stats.holes += sparse.hole_bytes();
            }
        }
        // Owner, then mode (chown clears setuid), then extended attributes
        // (writing and chown clear security.capability), then times.
        self.chown_fd(file.as_fd(), meta, shown)?;
        rfs::fchmod(&file, Mode::from_raw_mode(meta.mode))
            .map_err(|e| io_err(shown, "set the file mode", e.into()))?;
        self.skipped_xattrs += set_xattrs_fd(file.as_fd(), meta, shown)?;
        rfs::futimens(&file, &meta.times())
            .map_err(|e| io_err(shown, "set the file times", e.into()))?;
        self.stats.entries += 1;
        Ok(())
    }

    /// Copies up to `limit` bytes of the entry's data (all of it with
    /// `u64::MAX`) to `file`.
    fn copy_data<R: Read>(
        &mut self,
        reader: &mut TarReader<'_, Streamed<R>>,
        file: &mut File,
        limit: u64,
        shown: &str,
    ) -> Result<(), ApplyError> {
        let mut left = limit;
        while left > 0 {
            let want = self
                .buf
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = reader.read_data(&mut self.buf[..want])?;
            if n == 0 {
                break;
            }
            let data = self.buf.get(..n).unwrap_or(&self.buf);
            file.write_all(data)
                .map_err(|e| io_err(shown, "write the file", e))?;
            self.stats.bytes += n as u64;
            left -= n as u64;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn make_node(
        &mut self,
        parent: &DirFd,
        name: &[u8],
        path: &LayerPath,
        meta: &Meta,
        kind: FileType,
        dev: rfs::Dev,
        shown: &str,
    ) -> Result<(), ApplyError> {
        self.clear_slot(parent, name, path, false, shown)?;
        let dir = parent.fd.as_fd();
        rfs::mknodat(dir, name, kind, Mode::from_raw_mode(0o600), dev)
            .map_err(|e| io_err(shown, "create the special file", e.into()))?;
        self.touched.insert(parent.key(name), Origin::Created);
        self.chown_at(dir, name, meta, shown)?;
        fsops::chmod_at_not_symlink(dir, name, meta.mode)
            .map_err(|e| io_err(shown, "set the mode", e))?;
        self.skipped_xattrs += set_xattrs_at(dir, name, meta, false, shown)?;
        rfs::utimensat(dir, name, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(shown, "set the times", e.into()))?;
        self.stats.entries += 1;
        Ok(())
    }

    fn make_symlink(
        &mut self,
        parent: &DirFd,
        name: &[u8],
        path: &LayerPath,
        meta: &Meta,
        target: &[u8],
        shown: &str,
    ) -> Result<(), ApplyError> {
        if target.is_empty() {
            return Err(invalid(shown, "symlink with an empty target"));
        }
        self.clear_slot(parent, name, path, false, shown)?;
        let dir = parent.fd.as_fd();
        // The target is stored as given: it is only ever resolved inside the
        // root, by this module or by the guest.
        rfs::symlinkat(target, dir, name)
            .map_err(|e| io_err(shown, "create the symlink", e.into()))?;
        self.touched.insert(parent.key(name), Origin::Created);
        self.chown_at(dir, name, meta, shown)?;
        self.skipped_xattrs += set_xattrs_at(dir, name, meta, true, shown)?;
        rfs::utimensat(dir, name, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(shown, "set the symlink times", e.into()))?;
        self.stats.entries += 1;
        Ok(())
    }

    /// A hard link to `target`, a path inside the root. The link's own
    /// header metadata is ignored: it shares the target's inode.
    fn make_hardlink(
        &mut self,
        parent: &DirFd,
        name: &[u8],
        path: &LayerPath,
        target: &[u8],
        shown: &str,
    ) -> Result<(), ApplyError> {
        let target = LayerPath::parse(target).map_err(|reason| ApplyError::UnsafePath {
            path: shown.to_owned(),
            reason: format!("its hard link target is refused: {reason}"),
        })?;
        let Some(target_name) = target.name() else {
            return Err(invalid(shown, "hard link to the root"));
        };
        let target_display = quote_bytes(&target.key());
        let missing = || {
            invalid(
                shown,
                format!("hard link target {target_display} does not exist"),
            )
        };
        let target_dir = match fsops::open_in_root(
            self.root.as_fd(),
            &target.parent().join(&b'/'),
            OFlags::PATH | OFlags::DIRECTORY,
        ) {
            Ok(fd) => DirFd::new(fd)
                .map_err(|e| io_err(shown, "stat the hard link target's directory", e))?,
            Err(e) if is_missing(&e) => return Err(missing()),
            Err(e) => return Err(io_err(shown, "open the hard link target's directory", e)),
        };
        let target_st = fsops::lstat_at(target_dir.fd.as_fd(), target_name)
            .map_err(|e| io_err(shown, "stat the hard link target", e))?
            .ok_or_else(missing)?;
        if file_type(&target_st) == FileType::Directory {
            return Err(invalid(
                shown,
                format!("hard link target {target_display} is a directory"),
            ));
        }
        if target_dir.id == parent.id && target_name == name {
            return Err(invalid(shown, "hard link to itself"));
        }
        self.clear_slot(parent, name, path, false, shown)?;
        // No AT_SYMLINK_FOLLOW: a symlink target is linked itself, never
        // followed.
        rfs::linkat(
            target_dir.fd.as_fd(),
            target_name,
            parent.fd.as_fd(),
            name,
            AtFlags::empty(),
        )
        .map_err(|e| io_err(shown, "create the hard link", e.into()))?;
        self.touched.insert(parent.key(name), Origin::Created);
        self.stats.entries += 1;
        Ok(())
    }

    /// `.wh.NAME`: deletes `NAME` next to it unless this layer created it.
    fn whiteout(&mut self, path: &LayerPath, target: &[u8], shown: &str) -> Result<(), ApplyError> {
        let dir = match fsops::open_in_root(
            self.root.as_fd(),
            &path.parent().join(&b'/'),
            OFlags::PATH | OFlags::DIRECTORY,
        ) {
            Ok(fd) => {
                DirFd::new(fd).map_err(|e| io_err(shown, "stat the whiteout's directory", e))?
            }
            // No directory, so nothing below to delete.
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(io_err(shown, "open the whiteout's directory", e)),
        };
        if self.touched.contains_key(&dir.key(target)) {
            tracing::debug!(path = shown, "whiteout of a path this layer created: kept");
            return Ok(());
        }
        let removed = fsops::remove_at(dir.fd.as_fd(), target)
            .map_err(|e| io_err(shown, "remove the whited-out path", e))?;
        if removed {
            self.forget_dirs_under(&path.sibling(target).key());
        }
        Ok(())
    }

    /// `.wh..wh..opq`: removes every child of its directory that this layer
    /// did not create. Children created later are unaffected, so doing this
    /// when the marker is met is the same as doing it first.
    fn opaque(&mut self, path: &LayerPath, shown: &str) -> Result<(), ApplyError> {
        // The directory is resolved like the parent of any other entry (a
        // lower symlink is followed, inside the root), created if missing
        // and recorded as part of this layer, so an opaque marker higher up
        // keeps it.
        let parent = self.open_parent(path.parent(), shown)?;
        let dir = rfs::openat(
            parent.fd.as_fd(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(shown, "open the opaque directory", e.into()))?;
        let dir = DirFd::new(dir).map_err(|e| io_err(shown, "stat the opaque directory", e))?;
        self.hide_lower_children(&dir, shown)
    }

    fn hide_lower_children(&mut self, dir: &DirFd, shown: &str) -> Result<(), ApplyError> {
        let names = fsops::list_names(dir.fd.as_fd())
            .map_err(|e| io_err(shown, "list the opaque directory", e))?;
        for name in names {
            match self.touched.get(&dir.key(&name)) {
                Some(Origin::Created) => {}
                Some(Origin::Merged) => {
                    let st = fsops::lstat_at(dir.fd.as_fd(), &name)
                        .map_err(|e| io_err(shown, "stat a child of the opaque directory", e))?;
                    if st.as_ref().map(file_type) == Some(FileType::Directory) {
                        let child = fsops::open_dir_nofollow(dir.fd.as_fd(), &name)
                            .and_then(DirFd::new)
                            .map_err(|e| {
                                io_err(shown, "open a child of the opaque directory", e)
                            })?;
                        self.hide_lower_children(&child, shown)?;
                    }
                }
                None => {
                    fsops::remove_at(dir.fd.as_fd(), &name).map_err(|e| {
                        io_err(shown, "remove a lower child of the opaque directory", e)
                    })?;
                }
            }
        }
        Ok(())
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

fn owner(meta: &Meta) -> (Uid, Gid) {
    (Uid::from_raw(meta.uid), Gid::from_raw(meta.gid))
}

/// Whether an extended attribute from a layer is applied. Layers are
/// hostile: `trusted.*` (overlayfs keeps its redirects and opaque markers
/// there) and `user.overlay.*` (the same, for unprivileged overlayfs) could
/// change how the tree behaves once it is used as an overlay layer, so only
/// the user, security and POSIX ACL namespaces are kept.
fn xattr_allowed(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
        || name.starts_with(b"security.")
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

fn set_xattrs_fd(fd: BorrowedFd<'_>, meta: &Meta, shown: &str) -> Result<u64, ApplyError> {
    let mut skipped = 0;
    for (name, value) in &meta.xattrs {
        if !xattr_allowed(name) {
            tracing::debug!(path = shown, xattr = %quote_bytes(name), "skipping extended attribute");
            skipped += 1;
            continue;
        }
        rfs::fsetxattr(fd, name.as_slice(), value, rfs::XattrFlags::empty()).map_err(|e| {
            ApplyError::Xattr {
                path: shown.to_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                source: e.into(),
            }
        })?;
    }
    Ok(skipped)
}

fn set_xattrs_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    meta: &Meta,
    is_symlink: bool,
    shown: &str,
) -> Result<u64, ApplyError> {
    let mut skipped = 0;
    for (key, value) in &meta.xattrs {
        // Linux refuses user.* attributes on symlinks.
        if !xattr_allowed(key) || (is_symlink && key.starts_with(b"user.")) {
            tracing::debug!(path = shown, xattr = %quote_bytes(key), "skipping extended attribute");
            skipped += 1;
            continue;
        }
        fsops::lsetxattr_at(dir, name, key, value).map_err(|e| ApplyError::Xattr {
            path: shown.to_owned(),
            name: String::from_utf8_lossy(key).into_owned(),
            source: e,
        })?;
    }
    Ok(skipped)
}

/// Reads an entry's metadata from its header and PAX records.
fn read_meta(entry: &Member, shown: &str) -> Result<Meta, ApplyError> {
    let header = &entry.header;
    // Go's archive/tar (Docker, containerd, skopeo, umoci) reads an empty
    // (all NUL or space) numeric field as 0; images built with it do exist.
    let raw = header.as_old();
    let mode = or_zero(&raw.mode, header.mode().map(u64::from))
        .map_err(|e| bad_field(shown, "mode", &e))? as u32
        & 0o7777;
    let mut uid = or_zero(&raw.uid, header.uid()).map_err(|e| bad_field(shown, "uid", &e))?;
    let mut gid = or_zero(&raw.gid, header.gid()).map_err(|e| bad_field(shown, "gid", &e))?;
    let mtime = or_zero(&raw.mtime, header.mtime()).map_err(|e| bad_field(shown, "mtime", &e))?;
    let mut mtime = Timespec {
        tv_sec: i64::try_from(mtime).map_err(|_| invalid(shown, "mtime out of range"))?,
        tv_nsec: 0,
    };
    let mut atime = None;
    let mut xattrs = Vec::new();
    for (key, value) in &entry.pax {
        match key.as_slice() {
            b"uid" => uid = parse_pax_u64(value).ok_or_else(|| invalid(shown, "bad PAX uid"))?,
            b"gid" => gid = parse_pax_u64(value).ok_or_else(|| invalid(shown, "bad PAX gid"))?,
            b"mtime" => {
                mtime = parse_pax_time(value).ok_or_else(|| invalid(shown, "bad PAX mtime"))?
            }
            b"atime" => {
                atime = Some(parse_pax_time(value).ok_or_else(|| invalid(shown, "bad PAX atime"))?)
            }
            _ => {
                if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                    xattrs.push((name.to_vec(), value.clone()));
                }
            }
        }
    }
    // u32::MAX means "leave unchanged" to chown.
    let id = |v: u64, what: &str| {
        u32::try_from(v)
            .ok()
            .filter(|&v| v != u32::MAX)
            .ok_or_else(|| invalid(shown, format!("{what} {v} out of range")))
    };
    Ok(Meta {
        uid: id(uid, "uid")?,
        gid: id(gid, "gid")?,
        mode,
        atime: atime.unwrap_or(mtime),
        mtime,
        xattrs,
    })
}

/// The link target of a symlink or hard link entry.
fn link_name<'m>(entry: &'m Member, shown: &str) -> Result<&'m [u8], ApplyError> {
    if entry.link.is_empty() {
        return Err(invalid(shown, "link without a target"));
    }
    Ok(&entry.link)
}

/// Fills in the entry a limit was exceeded at.
fn at_entry(e: ApplyError, shown: &str) -> ApplyError {
    e.located(|| format!("at entry {}", quote_bytes(shown.as_bytes())))
}

fn parse_pax_u64(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Parses a PAX time, `[-]SECONDS[.FRACTION]`.
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, digit) in frac.bytes().take(9).enumerate() {
        let place = 10i64.pow(8 - i as u32);
        nanos += i64::from(digit - b'0') * place;
    }
    Some(if negative && nanos > 0 {
        Timespec {
            tv_sec: -secs - 1,
            tv_nsec: 1_000_000_000 - nanos,
        }
    } else {
        Timespec {
            tv_sec: if negative { -secs } else { secs },
            tv_nsec: nanos,
        }
    })
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

/// `parsed`, or 0 when the raw field is empty (only NUL bytes and spaces).
fn or_zero(raw: &[u8], parsed: std::io::Result<u64>) -> std::io::Result<u64> {
    if raw.iter().all(|b| *b == 0 || *b == b' ') {
        Ok(0)
    } else {
        parsed
    }
}

fn bad_field(path: &str, field: &str, e: &io::Error) -> ApplyError {
    invalid(path, format!("bad {field} field in the tar header ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(t("12.000000001999"), Some((12, 1)));
        assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(t("-3"), Some((-3, 0)));
        assert_eq!(t(""), None);
        assert_eq!(t("1e9"), None);
        assert_eq!(t(".5"), None);
        assert_eq!(t("99999999999999999999999"), None);
    }

    #[test]
    fn xattr_namespaces() {
        assert!(xattr_allowed(b"user.foo"));
        assert!(xattr_allowed(b"security.capability"));
        assert!(xattr_allowed(b"system.posix_acl_access"));
        assert!(!xattr_allowed(b"trusted.overlay.redirect"));
        assert!(!xattr_allowed(b"user.overlay.opaque"));
        assert!(!xattr_allowed(b"system.nfs4_acl"));
    }
}
