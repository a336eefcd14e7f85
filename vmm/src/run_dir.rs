//! The per-VM directory ([`crate::MachineConfig::run_dir`]): created when a
//! machine starts, removed with everything in it when the machine is
//! destroyed or dropped, or when start-up fails half-way. One owner for both
//! backends, so no exit path leaves it behind.

use std::path::{Path, PathBuf};

use crate::error::MachineError;

/// Owns the per-VM directory; dropping it removes the directory.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    removed: bool,
}

impl RunDir {
    /// Create `path` (it must not exist yet: two VMs never share one).
    pub fn create(path: &Path) -> Result<RunDir, MachineError> {
        std::fs::create_dir(path).map_err(|source| MachineError::RunDir {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(RunDir {
            path: path.to_path_buf(),
            removed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the directory and everything in it now (once; later calls and
    /// the drop do nothing). A directory already gone is not an error.
    pub fn remove(&mut self) -> Result<(), MachineError> {
        if std::mem::replace(&mut self.removed, true) {
            return Ok(());
        }
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(MachineError::Io {
                what: "per-VM directory",
                source,
            }),
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!("could not remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_removed_on_drop_and_remove_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("vm");
        let d = RunDir::create(&p).unwrap();
        std::fs::write(p.join("f"), b"x").unwrap();
        assert!(matches!(
            RunDir::create(&p),
            Err(MachineError::RunDir { .. })
        ));
        drop(d);
        assert!(!p.exists());

        let mut d = RunDir::create(&p).unwrap();
        d.remove().unwrap();
        assert!(!p.exists());
        std::fs::create_dir(&p).unwrap();
        d.remove().unwrap();
        drop(d);
        assert!(p.exists(), "removed once, not again");
    }
}
