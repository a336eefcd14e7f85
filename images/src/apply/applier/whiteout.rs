//! Whiteouts: `.wh.NAME` deletes a lower `NAME`, `.wh..wh..opq` hides all
//! lower children of its directory; what this layer created stays.

use super::*;

impl Applier<'_> {
    /// `.wh.NAME`: deletes `NAME` next to it unless this layer created it.
    pub(super) fn whiteout(
        &mut self,
        path: &LayerPath,
        target: &[u8],
        shown: &str,
    ) -> Result<(), ApplyError> {
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
    pub(super) fn opaque(&mut self, path: &LayerPath, shown: &str) -> Result<(), ApplyError> {
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

    pub(super) fn hide_lower_children(
        &mut self,
        dir: &DirFd,
        shown: &str,
    ) -> Result<(), ApplyError> {
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
}
