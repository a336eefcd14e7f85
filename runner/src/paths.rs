//! Where kiln keeps per-VM files and serial logs by default, and cleaning up
//! after a crashed kiln. The environment these defaults come from is read at
//! the edge (`kiln::env`) and passed in.

use std::path::{Path, PathBuf};

/// Per-VM files (scratch disks, sockets) when nothing names a place:
/// `<runtime_dir>/kiln` (`runtime_dir` is `$XDG_RUNTIME_DIR`, read at the
/// edge), else `/run/kiln` for root, else `/tmp/kiln-<uid>`.
pub fn default_run_dir(runtime_dir: Option<&Path>) -> PathBuf {
    if let Some(d) = runtime_dir {
        return d.join("kiln");
    }
    // SAFETY: getuid(2) cannot fail and has no side effects.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        "/run/kiln".into()
    } else {
        format!("/tmp/kiln-{uid}").into()
    }
}

/// Where serial logs of VMs that failed are kept when nothing names a
/// place: `<state_home>/kiln/logs` (`$XDG_STATE_HOME`), else
/// `<home>/.local/state/kiln/logs` (`$HOME`); both read at the edge.
pub fn default_log_dir(state_home: Option<&Path>, home: Option<&Path>) -> Option<PathBuf> {
    state_home
        .map(Path::to_path_buf)
        .or_else(|| home.map(|h| h.join(".local/state")))
        .map(|d| d.join("kiln").join("logs"))
}

/// The image cache when nothing names a place: `<cache_home>/kiln`
/// (`$XDG_CACHE_HOME`), else `<home>/.cache/kiln` (`$HOME`, `/root` without
/// one); both read at the edge.
pub fn default_cache_dir(cache_home: Option<&Path>, home: Option<&Path>) -> PathBuf {
    match (cache_home, home) {
        (Some(d), _) => d.join("kiln"),
        (None, Some(h)) => h.join(".cache").join("kiln"),
        (None, None) => PathBuf::from("/root/.cache/kiln"),
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
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Its QEMU and kiln-vmm died with it; a passt may not have.
        let passts = crate::network::passt::kill_under(&e.path());
        if passts > 0 {
            tracing::info!("killed {passts} passt of {}", e.path().display());
        }
        if std::fs::remove_dir_all(e.path()).is_ok() {
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

    #[test]
    fn defaults_follow_the_xdg_directories() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            default_run_dir(p("/r").as_deref()),
            PathBuf::from("/r/kiln")
        );
        assert_eq!(
            default_log_dir(p("/s").as_deref(), p("/h").as_deref()),
            p("/s/kiln/logs")
        );
        assert_eq!(
            default_log_dir(None, p("/h").as_deref()),
            p("/h/.local/state/kiln/logs")
        );
        assert_eq!(default_log_dir(None, None), None);
    }
}
