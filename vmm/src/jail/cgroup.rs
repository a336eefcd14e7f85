//! One cgroup per VMM process, with memory, PIDs and CPU limits, on cgroup
//! v2 or v1 (detected). kiln creates it below its own cgroup
//! (`<its group>/kiln-vmm/<pid>-<n>`), moves the VMM process in before
//! sending it the VM, removes it when the VM is gone, and removes groups
//! that dead kiln processes left behind the first time it makes one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Limits for one VMM process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Memory beyond guest RAM the VMM process may use (its own heap,
    /// stacks, device buffers), in MiB.
    pub memory_overhead_mib: u32,
    /// Tasks (threads) besides one per vCPU.
    pub extra_pids: u32,
    /// CPU time as a percentage of one CPU; `None`: 100 per vCPU plus 50.
    pub cpu_percent: Option<u32>,
    /// The whole memory limit in MiB, guest RAM included, instead of guest
    /// RAM plus `memory_overhead_mib` (a guest that touches more is killed
    /// by the cgroup; the tests use it).
    pub memory_max_mib: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_overhead_mib: 256,
            extra_pids: 16,
            cpu_percent: None,
            memory_max_mib: None,
        }
    }
}

impl Limits {
    pub fn memory_bytes(&self, guest_mib: u32) -> u64 {
        let mib = self.memory_max_mib.map_or_else(
            || u64::from(guest_mib) + u64::from(self.memory_overhead_mib),
            u64::from,
        );
        mib << 20
    }
    pub fn pids(&self, vcpus: u32) -> u32 {
        vcpus.saturating_add(self.extra_pids)
    }
    pub fn cpu_percent(&self, vcpus: u32) -> u32 {
        self.cpu_percent
            .unwrap_or_else(|| vcpus.saturating_mul(100).saturating_add(50))
    }
}

/// Which cgroup hierarchy the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// Unified: one directory per group.
    V2(PathBuf),
    /// One directory per controller: memory, pids, cpu.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
    #[error("could not {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

const MOUNT: &str = "/sys/fs/cgroup";
const GROUP: &str = "kiln-vmm";

/// This process's group in `controller`'s hierarchy ("" for v2), from
/// `/proc/self/cgroup`.
fn own_group(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then(|| path.trim_start_matches('/').to_string())
    })
}

/// Detect the hierarchy and where kiln's VM groups go (below kiln's own
/// group, which it may manage).
pub fn detect() -> Result<Hierarchy, CgroupError> {
    let mount = Path::new(MOUNT);
    if mount.join("cgroup.controllers").exists() {
        let own = own_group("").unwrap_or_default();
        return Ok(Hierarchy::V2(mount.join(own).join(GROUP)));
    }
    let v1 = |c: &str| -> Result<PathBuf, CgroupError> {
        let dir = mount.join(c);
        if !dir.join("cgroup.procs").exists() {
            return Err(CgroupError::Unavailable(format!(
                "neither cgroup v2 at {MOUNT} nor the v1 {c} controller at {}",
                dir.display()
            )));
        }
        Ok(dir.join(own_group(c).unwrap_or_default()).join(GROUP))
    };
    Ok(Hierarchy::V1 {
        memory: v1("memory")?,
        pids: v1("pids")?,
        cpu: v1("cpu")?,
    })
}

impl Hierarchy {
    pub fn describe(&self) -> String {
        match self {
            Hierarchy::V2(p) => format!("cgroup v2 ({})", p.display()),
            Hierarchy::V1 { memory, .. } => format!("cgroup v1 ({})", memory.display()),
        }
    }

    fn bases(&self) -> Vec<PathBuf> {
        match self {
            Hierarchy::V2(p) => vec![p.clone()],
            Hierarchy::V1 { memory, pids, cpu } => vec![memory.clone(), pids.clone(), cpu.clone()],
        }
    }
}

/// The v2 controllers a VM's group needs.
const CONTROLLERS: &str = "+memory +pids +cpu";

/// Where kiln's own group does not hand `CONTROLLERS` down to its children
/// (a host without systemd: an initramfs, a minimal init), enable them in
/// its `cgroup.subtree_control`. That works only where the group has no
/// process of its own (the root group is exempt); elsewhere it fails, and
/// the write below reports what is missing.
fn delegate_from_parent(base: &Path) {
    let Some(parent) = base.parent() else { return };
    let control = parent.join("cgroup.subtree_control");
    let enabled = std::fs::read_to_string(&control).unwrap_or_default();
    let missing = CONTROLLERS
        .split(' ')
        .any(|c| !enabled.split_whitespace().any(|e| e == &c[1..]));
    if missing {
        if let Err(e) = std::fs::write(&control, CONTROLLERS) {
            tracing::debug!(
                "could not enable {CONTROLLERS} in {}: {e}",
                control.display()
            );
        }
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        what: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// A VMM process's cgroup; dropping it removes the group (once the process
/// in it is gone).
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Cgroup {
    /// Create a group with `limits` for a VM of `guest_mib` MiB and `vcpus`.
    pub fn create(
        h: &Hierarchy,
        limits: &Limits,
        guest_mib: u32,
        vcpus: u32,
    ) -> Result<Cgroup, CgroupError> {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| remove_stale(h));
        let name = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mem = limits.memory_bytes(guest_mib).to_string();
        let pids = limits.pids(vcpus).to_string();
        let period = 100_000u64;
        let quota = u64::from(limits.cpu_percent(vcpus)) * period / 100;
        let mut cg = Cgroup {
            dirs: Vec::new(),
            v2: matches!(h, Hierarchy::V2(_)),
        };
        for base in h.bases() {
            if !base.exists() {
                std::fs::create_dir_all(&base).map_err(|source| CgroupError::Io {
                    what: "create",
                    path: base.clone(),
                    source,
                })?;
                if cg.v2 {
                    delegate_from_parent(&base);
                    write(&base.join("cgroup.subtree_control"), CONTROLLERS)?;
                }
            }
            let dir = base.join(&name);
            std::fs::create_dir(&dir).map_err(|source| CgroupError::Io {
                what: "create",
                path: dir.clone(),
                source,
            })?;
            cg.dirs.push(dir);
        }
        match h {
            Hierarchy::V2(_) => {
                let d = &cg.dirs[0];
                write(&d.join("memory.max"), &mem)?;
                // No swap: the guest's memory is the limit.
                let _ = write(&d.join("memory.swap.max"), "0");
                write(&d.join("pids.max"), &pids)?;
                write(&d.join("cpu.max"), &format!("{quota} {period}"))?;
            }
            Hierarchy::V1 { .. } => {
                write(&cg.dirs[0].join("memory.limit_in_bytes"), &mem)?;
                write(&cg.dirs[1].join("pids.max"), &pids)?;
                write(&cg.dirs[2].join("cpu.cfs_period_us"), &period.to_string())?;
                write(&cg.dirs[2].join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        Ok(cg)
    }

    /// Move process `pid` into the group.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The files through which a process moves itself into the group,
    /// opened write-only and close-on-exec, for [`join_self`] in a forked
    /// child before it runs anything else: v1's `tasks` (one thread, the
    /// caller: the kernel skips the global lock and the RCU grace period a
    /// move of a whole process waits for, about 10 ms on a busy host; the
    /// child is single-threaded, so the thread is the process), v2's
    /// `cgroup.procs`.
    pub fn join_files(&self) -> Result<Vec<std::fs::File>, CgroupError> {
        let name = if self.v2 { "cgroup.procs" } else { "tasks" };
        self.dirs
            .iter()
            .map(|d| {
                let path = d.join(name);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|source| CgroupError::Io {
                        what: "open",
                        path,
                        source,
                    })
            })
            .collect()
    }

    /// Whether process `pid` is in the group (in every hierarchy).
    pub fn contains(&self, pid: u32) -> bool {
        let pid = pid.to_string();
        self.dirs.iter().all(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .is_ok_and(|procs| procs.lines().any(|l| l.trim() == pid))
        })
    }

    /// The group's directory (the memory controller's on v1).
    pub fn path(&self) -> &Path {
        &self.dirs[0]
    }

    /// The memory limit file (`memory.max` or `memory.limit_in_bytes`).
    pub fn memory_limit_file(&self) -> PathBuf {
        self.dirs[0].join(if self.v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        })
    }

    /// How many times the kernel's OOM killer killed a process of this group
    /// (`None` where the kernel does not say).
    pub fn oom_kills(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = std::fs::read_to_string(self.dirs[0].join(file)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
    }

    /// Remove the group (its processes must be gone). Idempotent.
    pub fn remove(&mut self) {
        for d in std::mem::take(&mut self.dirs) {
            if let Err(e) = std::fs::remove_dir(&d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("could not remove cgroup {}: {e}", d.display());
                }
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Move the calling thread into the groups whose [`Cgroup::join_files`]
/// these are; what each write returned (`false`: it failed). Only
/// async-signal-safe calls (write(2)) and no allocation: made in a child
/// between fork and exec.
pub fn join_self(files: &[i32]) -> bool {
    files.iter().all(|&fd| {
        // SAFETY: write(2) of one byte from a static buffer to a
        // descriptor the caller keeps open.
        unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) == 1 }
    })
}

/// Remove the groups of kiln processes that are gone (named `<pid>-<n>`);
/// a group still holding a process cannot be removed and is left. Runs by
/// itself before the first group a process creates.
pub fn remove_stale(h: &Hierarchy) {
    for base in h.bases() {
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(owner) = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if owner != std::process::id() && !Path::new(&format!("/proc/{owner}")).exists() {
                match std::fs::remove_dir(e.path()) {
                    Ok(()) => tracing::info!("removed stale cgroup {}", e.path().display()),
                    Err(err) => tracing::warn!(
                        "stale cgroup {} could not be removed: {err}",
                        e.path().display()
                    ),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_vm() {
        let l = Limits::default();
        assert_eq!(l.memory_bytes(64), (64 + 256) << 20);
        assert_eq!(l.pids(2), 18);
        assert_eq!(l.cpu_percent(2), 250);
        let l = Limits {
            cpu_percent: Some(30),
            ..Limits::default()
        };
        assert_eq!(l.cpu_percent(8), 30);
        let l = Limits {
            memory_max_mib: Some(100),
            ..Limits::default()
        };
        assert_eq!(l.memory_bytes(512), 100 << 20);
    }
}
