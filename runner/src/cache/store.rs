//! Where cache archives are kept: a [`Store`], either the local directory
//! ([`LocalStore`]) or an S3-compatible bucket ([`S3Store`]).
//!
//! The local store is one directory on the runner host holding one
//! gzipped tar per (namespace, key), named by the SHA-256 of both (no key
//! can name a path), bounded in total size and pruned least recently used
//! first (a restore counts as a use).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use super::s3::{S3Error, S3Store};

/// The default bound of a store: 5 GiB of archives.
pub const DEFAULT_MAX_BYTES: u64 = 5 << 30;

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Where a cache store keeps archives being written or read: a private
/// directory whose files are named by the process that made them (so a
/// later kiln removes those of one that died).
#[derive(Debug, Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    /// The spool `dir` (created, private to this user).
    pub fn open(dir: &Path) -> io::Result<Spool> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(Spool {
            dir: dir.to_path_buf(),
        })
    }

    /// A fresh path in the spool.
    pub fn temp_path(&self) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{}-{n}.tar.gz", std::process::id()))
    }

    /// Remove files left by a kiln that died.
    pub fn clean(&self) {
        if let Ok(dir) = std::fs::read_dir(&self.dir) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
                let dead =
                    |p: u32| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists();
                if pid.is_some_and(dead) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Why an archive could not be fetched from or published to a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    S3(#[from] S3Error),
}

/// A store of cache archives: a closed set of backends.
#[derive(Debug, Clone)]
pub enum Store {
    Local(LocalStore),
    /// Boxed: a bucket, its credentials and client are large.
    S3(Box<S3Store>),
}

/// An archive fetched from a store, to be unpacked; a downloaded one is
/// removed when this is dropped.
#[derive(Debug)]
pub struct Fetched {
    path: PathBuf,
    temporary: bool,
}

impl Fetched {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Store {
    /// Where a missing key was looked for, for the job's log.
    pub fn location(&self) -> String {
        match self {
            Store::Local(_) => "on this runner".into(),
            Store::S3(s) => format!("in bucket {}", s.bucket()),
        }
    }

    /// The archive of `key` in `namespace`; `None` when there is none (a
    /// miss). Blocking.
    pub fn fetch(&self, namespace: &str, key: &str) -> Result<Option<Fetched>, StoreError> {
        match self {
            Store::Local(l) => Ok(l.get(namespace, key).map(|path| Fetched {
                path,
                temporary: false,
            })),
            Store::S3(s) => {
                let object = s.object(namespace, key)?;
                let fetched = Fetched {
                    path: s.spool().temp_path(),
                    temporary: true,
                };
                Ok(s.download(&object, fetched.path())?.map(|_| fetched))
            }
        }
    }

    /// A fresh path for an archive being written, on the store's side.
    pub fn temp_path(&self) -> PathBuf {
        match self {
            Store::Local(l) => l.temp_path(),
            Store::S3(s) => s.spool().temp_path(),
        }
    }

    /// Publish the archive at `tmp` (from [`Self::temp_path`]) as `key` in
    /// `namespace`; `tmp` is gone afterwards, whatever happened. Blocking.
    pub fn publish(&self, tmp: &Path, namespace: &str, key: &str) -> Result<(), StoreError> {
        let done = match self {
            Store::Local(l) => l.publish(tmp, namespace, key).map_err(StoreError::from),
            Store::S3(s) => s
                .object(namespace, key)
                .and_then(|object| s.upload(tmp, &object))
                .map(|_| ())
                .map_err(StoreError::from),
        };
        let _ = std::fs::remove_file(tmp);
        done
    }
}

/// A directory of cache archives.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    max_bytes: u64,
    spool: Spool,
}

impl LocalStore {
    /// The store in `root` (created, private to this user), holding at most
    /// `max_bytes` of archives.
    pub fn open(root: &Path, max_bytes: u64) -> io::Result<LocalStore> {
        let spool = Spool::open(&root.join("tmp"))?;
        Ok(LocalStore {
            root: root.to_path_buf(),
            max_bytes,
            spool,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The archive of `key` in `namespace` (a project), whether or not it
    /// exists.
    fn path(&self, namespace: &str, key: &str) -> PathBuf {
        let mut h = Sha256::new();
        h.update(namespace.as_bytes());
        h.update([0]);
        h.update(key.as_bytes());
        self.root
            .join(format!("{}.tar.gz", hex::encode(h.finalize())))
    }

    /// The archive of `key`, if there is one; marked as just used.
    pub fn get(&self, namespace: &str, key: &str) -> Option<PathBuf> {
        let p = self.path(namespace, key);
        let f = std::fs::OpenOptions::new().write(true).open(&p).ok()?;
        if !f.metadata().is_ok_and(|m| m.is_file()) {
            return None;
        }
        // Pruning goes by modification time: a restore is a use.
        let _ = f.set_modified(SystemTime::now());
        Some(p)
    }

    /// A fresh temporary path in the store, for an archive being written.
    pub fn temp_path(&self) -> PathBuf {
        self.spool.temp_path()
    }

    /// Publish the archive at `tmp` (from [`Self::temp_path`]) as `key`
    /// (replacing an older one at once), then prune the store.
    pub fn publish(&self, tmp: &Path, namespace: &str, key: &str) -> io::Result<()> {
        std::fs::rename(tmp, self.path(namespace, key))?;
        self.prune();
        Ok(())
    }

    /// Remove archives, least recently used first, until the store holds at
    /// most its bound. Returns how many were removed.
    pub fn prune(&self) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return 0;
        };
        let mut archives: Vec<(SystemTime, u64, PathBuf)> = dir
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tar.gz"))
            .filter_map(|e| {
                let m = e.metadata().ok().filter(|m| m.is_file())?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = archives.iter().map(|a| a.1).sum();
        archives.sort();
        let mut removed = 0;
        for (_, len, path) in archives {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                tracing::info!(
                    "cache store: removed {} (least recently used)",
                    path.display()
                );
                total -= len;
                removed += 1;
            }
        }
        removed
    }

    /// Remove temporary archives left by a kiln that died.
    pub fn clean_tmp(&self) {
        self.spool.clean();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_separate_and_the_least_recently_used_go_first() {
        let d = tempfile::tempdir().unwrap();
        let store = LocalStore::open(d.path(), 250).unwrap();
        let put = |ns: &str, key: &str, bytes: usize| {
            let t = store.temp_path();
            std::fs::write(&t, vec![b'x'; bytes]).unwrap();
            store.publish(&t, ns, key).unwrap();
        };
        assert!(store.get("p1", "a").is_none());
        put("p1", "a", 100);
        assert!(store.get("p2", "a").is_none(), "projects do not share keys");
        // Older modification times for `a`, then a use of it.
        let old = SystemTime::now() - std::time::Duration::from_secs(100);
        put("p1", "b", 100);
        let f = std::fs::File::options()
            .write(true)
            .open(store.path("p1", "b"))
            .unwrap();
        f.set_modified(old).unwrap();
        assert!(store.get("p1", "a").is_some());
        // 300 bytes > 250: `b` (least recently used) goes.
        put("p1", "c", 100);
        assert!(store.get("p1", "b").is_none());
        assert!(store.get("p1", "a").is_some() && store.get("p1", "c").is_some());
        // The key never names a path.
        assert!(store.path("p1", "../../etc/passwd").starts_with(d.path()));
    }
}
