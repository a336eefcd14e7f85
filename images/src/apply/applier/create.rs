//! Creating what an entry is: directories, regular (and sparse) files,
//! device nodes and FIFOs, symlinks, hard links.

use super::*;

impl Applier<'_> {
    pub(super) fn make_dir(
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
        let settled = self.settle_dir(fd.as_fd(), &meta, shown, "stat the directory")?;
        if merged {
            self.touched
                .entry(parent.key(name))
                .or_insert(Origin::Merged);
        } else {
            self.touched.insert(parent.key(name), Origin::Created);
        }
        self.record_dir(path.key(), settled);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn make_file<R: Read>(
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
    pub(super) fn copy_data<R: Read>(
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
    pub(super) fn make_node(
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

    pub(super) fn make_symlink(
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
    pub(super) fn make_hardlink(
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
}
