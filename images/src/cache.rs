//! The on-disk cache: kernels, initramfs images, root filesystems.
//!
//! Every entry is built in `tmp/` and published by `rename(2)`, so a reader
//! never sees a half-written entry; a per-entry `flock(2)` makes concurrent
//! builders of the same entry build it once.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::apply::Limits;
use crate::ImageError;

/// The cache root and its sub-directories, and the limits images are
/// converted into it under.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    limits: Limits,
}

impl Cache {
    /// Opens (creating what is missing) the cache at `root`; images are
    /// converted under [`Limits::default`] (see [`Cache::with_limits`]).
    pub fn open(root: impl Into<PathBuf>) -> Result<Cache, ImageError> {
        let root = root.into();
        for sub in [
            "kernels",
            "initramfs",
            "rootfs",
            "tmp",
            "locks",
            "blobs/sha256",
            "images",
        ] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d)
                .map_err(|e| ImageError::io("create cache directory", &d, e))?;
        }
        Ok(Cache {
            root,
            limits: Limits::default(),
        })
    }

    /// The same cache, converting images under `limits`.
    pub fn with_limits(mut self, limits: Limits) -> Cache {
        self.limits = limits;
        self
    }

    /// The limits images are converted under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    /// A fresh, empty directory under `tmp/` for building an entry.
    pub fn temp_dir(&self, label: &str) -> Result<TempDir, ImageError> {
        let base = self.root.join("tmp");
        for attempt in 0..100u32 {
            let p = base.join(format!(
                "{label}.{}.{}.{attempt}",
                std::process::id(),
                nanos()
            ));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TempDir(Some(p))),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ImageError::io("create temporary directory", &p, e)),
            }
        }
        Err(ImageError::io(
            "create temporary directory",
            &base,
            std::io::ErrorKind::AlreadyExists.into(),
        ))
    }

    /// Take the build lock for `key` (blocks while another process holds it).
    pub fn lock(&self, key: &str) -> Result<LockGuard, ImageError> {
        let p = self.root.join("locks").join(format!("{key}.lock"));
        let f = File::create(&p).map_err(|e| ImageError::io("create lock file", &p, e))?;
        // SAFETY: flock(2) on a descriptor we own; the lock is released when
        // the file is closed (LockGuard drop).
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(ImageError::io("lock", &p, std::io::Error::last_os_error()));
        }
        Ok(LockGuard(f))
    }

    /// Take the lock for `key` if nobody holds it.
    pub fn try_lock(&self, key: &str) -> Result<Option<LockGuard>, ImageError> {
        let p = self.root.join("locks").join(format!("{key}.lock"));
        let f = File::create(&p).map_err(|e| ImageError::io("create lock file", &p, e))?;
        // SAFETY: flock(2) on a descriptor we own, as in `lock`.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(ImageError::io("lock", &p, e));
        }
        Ok(Some(LockGuard(f)))
    }

    /// Remove leftovers of builds that died half-way (`tmp/*`), skipping those
    /// a live process is still writing (their names carry its pid).
    pub fn clean_tmp(&self) {
        let Ok(rd) = std::fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let pid: Option<u32> = name.split('.').nth(1).and_then(|p| p.parse().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                let _ = remove_any(&e.path());
            }
        }
    }
}

/// Held while building a cache entry.
pub struct LockGuard(#[allow(dead_code)] File);

/// A temporary directory removed on drop unless [`TempDir::keep`] is called.
#[derive(Debug)]
pub struct TempDir(Option<PathBuf>);

impl TempDir {
    pub fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// Publish `src` (inside this directory) at `dest` by rename.
    pub fn publish(&self, src: &Path, dest: &Path) -> Result<(), ImageError> {
        std::fs::rename(src, dest).map_err(|e| ImageError::io("publish cache entry", dest, e))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = remove_any(&p);
        }
    }
}

pub(crate) fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => match std::fs::remove_dir_all(p) {
            // A layer's read-only directories (mode 0555, 0000) stop a
            // caller that is not root: make them writable, then again.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                make_tree_writable(p)?;
                std::fs::remove_dir_all(p)
            }
            other => other,
        },
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `chmod 0700` every directory of the tree at `dir`, never following a
/// symlink. Directories are opened relative to their parent, so a tree
/// deeper than `PATH_MAX` is handled too; the recursion is as deep as the
/// tree (bounded by the layer path depth limit).
fn make_tree_writable(dir: &Path) -> std::io::Result<()> {
    use rustix::fs::{self as rfs, Mode, OFlags};
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::open(dir, flags, Mode::empty())?;
    writable_below(std::os::fd::AsFd::as_fd(&fd))
}

fn writable_below(dir: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for name in crate::apply::fsops::list_names(dir)? {
        let st = rfs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            continue;
        }
        // A directory (checked just above, in a tree only this process
        // writes): chmodat follows symlinks, but this is none.
        rfs::chmodat(
            dir,
            name.as_slice(),
            Mode::from_raw_mode(0o700),
            AtFlags::empty(),
        )?;
        let child = rfs::openat(dir, name.as_slice(), flags, Mode::empty())?;
        writable_below(std::os::fd::AsFd::as_fd(&child))?;
    }
    Ok(())
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Hex SHA-256 of some byte slices, in order.
pub fn sha256_hex(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dirs_vanish_unless_published() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path()).unwrap();
        let t = cache.temp_dir("x").unwrap();
        let p = t.path().to_path_buf();
        std::fs::write(p.join("f"), b"1").unwrap();
        let dest = cache.dir("rootfs").join("entry");
        t.publish(&p.join("f"), &dest).unwrap();
        drop(t);
        assert!(!p.exists());
        assert_eq!(std::fs::read(dest).unwrap(), b"1");
    }

    #[test]
    fn read_only_trees_are_made_removable() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let tree = root.path().join("tree");
        let deep = tree.join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f"), b"x").unwrap();
        std::os::unix::fs::symlink("/", tree.join("a/up")).unwrap();
        for (d, mode) in [("a/b/c", 0o000), ("a/b", 0o555), ("a", 0o000)] {
            std::fs::set_permissions(tree.join(d), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        make_tree_writable(&tree).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            let mode = std::fs::metadata(tree.join(d))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{d}");
        }
        // The symlink was not followed.
        assert_ne!(
            std::fs::metadata("/").unwrap().permissions().mode() & 0o777,
            0o700
        );
        remove_any(&tree).unwrap();
        assert!(!tree.exists());
    }

    #[test]
    fn clean_tmp_removes_dead_builders_only() {
        let root = tempfile::tempdir().unwrap();
        let cache = Cache::open(root.path()).unwrap();
        let dead = cache.dir("tmp").join("rootfs.999999999.1.0");
        std::fs::create_dir(&dead).unwrap();
        let live = cache.temp_dir("live").unwrap();
        cache.clean_tmp();
        assert!(!dead.exists());
        assert!(live.path().exists());
    }
}
