//! The on-disk cache: kernels, initramfs images, root filesystems.
//!
//! Every entry is built in `tmp/` and published by `rename(2)`, so a reader
//! never sees a half-written entry; a per-entry `flock(2)` makes concurrent
//! builders of the same entry build it once.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::ImageError;

/// The cache root and its sub-directories.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
            return PathBuf::from(d);
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return PathBuf::from(d).join("kiln");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"));
        home.join(".cache").join("kiln")
    }

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
        Ok(Cache { root })
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
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
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
