//! Where kiln keeps per-VM files, and cleaning up after a crashed kiln.

use std::path::{Path, PathBuf};

/// Per-VM files (scratch disks, sockets): `$KILN_RUN_DIR`, else
/// `$XDG_RUNTIME_DIR/kiln`, else `/run/kiln` for root, else `/tmp/kiln-<uid>`.
pub fn default_run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_RUN_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("kiln");
    }
    // SAFETY: getuid(2) cannot fail and has no side effects.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        "/run/kiln".into()
    } else {
        format!("/tmp/kiln-{uid}").into()
    }
}

/// The name of a job directory: `job-<pid>-<n>`, so a later kiln can tell
/// whether its owner is still alive.
pub fn job_dir_name(n: u64) -> String {
    format!("job-{}-{n}", std::process::id())
}

/// Remove job directories whose owning process is gone (a kiln killed with
/// SIGKILL cannot clean up; its QEMU died with it through PDEATHSIG).
/// Returns how many were removed.
pub fn clean_stale_jobs(run_dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(run_dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("job-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dead_owners_are_cleaned() {
        let d = tempfile::tempdir().unwrap();
        let dead = d.path().join("job-999999999-1");
        let mine = d.path().join(job_dir_name(1));
        let other = d.path().join("unrelated");
        for p in [&dead, &mine, &other] {
            std::fs::create_dir(p).unwrap();
        }
        assert_eq!(clean_stale_jobs(d.path()), 1);
        assert!(!dead.exists() && mine.exists() && other.exists());
    }
}
