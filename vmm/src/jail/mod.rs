//! The jail around a VMM process: what kiln asks for ([`Isolation`], in
//! [`crate::MachineConfig`]), what the VMM process applies to itself before
//! it touches guest data ([`apply`], in the child), and the cgroup kiln puts
//! it in ([`cgroup`], in the parent).
//!
//! In the VMM process, in this order: without root, it enters a user
//! namespace where kiln's uid is root ([`enter_user_namespace`]), so that
//! the rest can be made without root (no per-VM uid then); it forks into a
//! new PID namespace
//! ([`enter_pid_namespace`]: the VMM is PID 1 there, a waiter stays
//! behind); every descriptor it was not handed is closed; new mount, IPC,
//! UTS and network namespaces (the network one is
//! empty: a TAP or passt socket will be handed in as a descriptor, see
//! [`crate::process::fds`]); `pivot_root` into the per-VM jail directory,
//! which is empty and read-only (every file the VM needs is an open
//! descriptor); the capability bounding set cleared; supplementary groups
//! dropped and a per-VM unprivileged uid/gid set (which clears every other
//! capability); `no_new_privs`. The seccomp filters ([`seccomp`]) come last,
//! per thread, once set-up is done and before the guest runs.
//!
//! What cannot be applied (no root, no user namespaces, ...) is reported in
//! a [`JailReport`]; with [`IsolationMode::Strict`] it fails the start. The
//! report also times each step ([`JailReport::steps`]).

pub mod cgroup;
mod namespaces;
mod probe;
pub mod qemu;
pub mod seccomp;

use self::namespaces::privileged;
pub use self::namespaces::{
    enter_pid_namespace, enter_user_namespace, PidNamespace, UserNamespace,
};
pub use self::probe::{probe, Enforced};

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How hard kiln insists on the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum IsolationMode {
    /// Refuse to start a VM when any part of the jail cannot be applied.
    Strict,
    /// Apply what the host allows and log what it does not.
    #[default]
    BestEffort,
    /// No jail at all (the VMM still runs in its own process). For
    /// benchmarks and debugging only.
    Off,
}

impl IsolationMode {
    /// The name `FromStr` takes (`strict`, `best-effort`, `off`).
    pub fn name(self) -> &'static str {
        match self {
            IsolationMode::Strict => "strict",
            IsolationMode::BestEffort => "best-effort",
            IsolationMode::Off => "off",
        }
    }
}

impl std::str::FromStr for IsolationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(IsolationMode::Strict),
            "best-effort" => Ok(IsolationMode::BestEffort),
            "off" => Ok(IsolationMode::Off),
            other => Err(format!(
                "unknown isolation '{other}' (expected strict, best-effort or off)"
            )),
        }
    }
}

/// First uid (and gid) of the per-VM range when none is configured: VM `n`
/// of this process runs as `UID_BASE + n % UID_RANGE`.
pub const UID_BASE: u32 = 64_000;
pub const UID_RANGE: u32 = 1_000;

/// The uid and gid of the next VM's VMM process (kvm backend) or QEMU
/// (qemu backend): the configured ones, else one per VM from [`UID_BASE`]
/// (one counter for both backends).
pub fn next_vm_ids(iso: &Isolation) -> (u32, u32) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT_UID: AtomicU32 = AtomicU32::new(0);
    let n = NEXT_UID.fetch_add(1, Ordering::Relaxed) % UID_RANGE;
    let uid = iso.uid.unwrap_or(UID_BASE + n);
    (uid, iso.gid.unwrap_or(uid))
}

/// What the jail around each VMM process must be.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Isolation {
    pub mode: IsolationMode,
    /// uid and gid the VMM runs as; `None`: one per VM from [`UID_BASE`].
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The `kiln-vmm` executable; `None`: `$KILN_VMM`, else next to the
    /// running executable (or one directory up, for test binaries), else
    /// `/usr/lib/kiln/kiln-vmm`.
    pub vmm_program: Option<PathBuf>,
    pub limits: cgroup::Limits,
}

/// The part of the jail the VMM process applies to itself (sent to it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    pub mode: IsolationMode,
    pub uid: u32,
    pub gid: u32,
    /// Becomes `/` (empty; made read-only).
    pub root: PathBuf,
    /// Descriptors to keep open (besides 0, 1, 2); every other one is closed.
    pub keep_fds: Vec<i32>,
}

/// What was applied, for the log, `kiln doctor` and the tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailReport {
    /// Namespaces entered, e.g. `["mnt", "ipc", "uts", "net"]`.
    pub namespaces: Vec<String>,
    pub pivot_root: bool,
    /// uid/gid the VMM runs as, when it changed them.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub capabilities_dropped: bool,
    pub no_new_privs: bool,
    /// Descriptors found open that were not handed over, now closed.
    pub closed_fds: usize,
    pub seccomp: bool,
    pub cgroup: Option<String>,
    /// Each part that could not be applied, and why.
    pub missing: Vec<String>,
    /// Parts of the jail kiln does not implement yet (never applied, so not
    /// a reason for strict mode to refuse).
    pub not_yet: Vec<String>,
    /// How long each step of setting up the VMM process took, in order
    /// (the jail's steps in the VMM process, kiln's around it), for the
    /// debug log and the jail bench.
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// One timed step of a VMM process's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub micros: u64,
}

impl Step {
    /// Step `name`, from `since` until now.
    pub fn since(name: &str, since: std::time::Instant) -> Step {
        Step {
            name: name.to_string(),
            micros: u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX),
        }
    }
}

impl JailReport {
    /// Record that step `name` took from `since` until now.
    pub fn timed(&mut self, name: &str, since: std::time::Instant) {
        self.steps.push(Step::since(name, since));
    }

    /// The steps as `name 1.23 ms, ...`.
    pub fn describe_steps(&self) -> String {
        self.steps
            .iter()
            .map(|s| format!("{} {:.2} ms", s.name, s.micros as f64 / 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl JailReport {
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("namespaces [{}]", self.namespaces.join(","))];
        if self.pivot_root {
            parts.push("pivot_root".into());
        }
        if let Some(uid) = self.uid {
            parts.push(format!("uid {uid}"));
        }
        if self.capabilities_dropped {
            parts.push("no capabilities".into());
        }
        if self.no_new_privs {
            parts.push("no_new_privs".into());
        }
        if self.seccomp {
            parts.push("seccomp".into());
        }
        if let Some(c) = &self.cgroup {
            parts.push(format!("cgroup {c}"));
        }
        if !self.missing.is_empty() {
            parts.push(format!("MISSING: {}", self.missing.join("; ")));
        }
        parts.join(", ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("isolation is strict but part of the jail could not be applied: {}", .0.join("; "))]
    Incomplete(Vec<String>),
    #[error("could not {what}")]
    Sys {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn last_err(what: &'static str) -> JailError {
    JailError::Sys {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// Apply the jail to this process (the VMM process, still single-threaded,
/// PID 1 of its namespace when `pid_ns` says so). Returns what was applied;
/// in strict mode anything missing is an error.
pub fn apply(
    spec: &JailSpec,
    user_ns: &UserNamespace,
    pid_ns: &PidNamespace,
) -> Result<JailReport, JailError> {
    let mut report = JailReport::default();
    if spec.mode == IsolationMode::Off {
        return Ok(report);
    }
    match user_ns {
        UserNamespace::Entered { .. } => report.namespaces.push("user".to_string()),
        UserNamespace::Unavailable(why) => report.missing.push(format!("user namespace: {why}")),
        UserNamespace::NotNeeded | UserNamespace::NotAsked => {}
    }
    let t = std::time::Instant::now();
    report.closed_fds = close_other_fds(&spec.keep_fds)?;
    report.timed("close descriptors", t);
    match pid_ns {
        PidNamespace::Entered => report.namespaces.push("pid".to_string()),
        PidNamespace::NotAsked => {}
        PidNamespace::Unavailable(why) => report.missing.push(format!("pid namespace: {why}")),
    }
    enter_namespaces(&mut report);
    if report.namespaces.iter().any(|n| n == "mnt") {
        let t = std::time::Instant::now();
        match pivot_into(&spec.root) {
            Ok(()) => report.pivot_root = true,
            Err(e) => report.missing.push(format!("pivot_root: {e}")),
        }
        report.timed("pivot_root", t);
    } else {
        report
            .missing
            .push("pivot_root: no mount namespace".to_string());
    }
    let t = std::time::Instant::now();
    drop_privileges(spec, user_ns, &mut report);
    report.timed("uid and capabilities", t);
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0 {
        report.no_new_privs = true;
    } else {
        report
            .missing
            .push(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    if spec.mode == IsolationMode::Strict && !report.missing.is_empty() {
        return Err(JailError::Incomplete(report.missing));
    }
    Ok(report)
}

/// Close every descriptor above 2 that is not in `keep` (found through
/// `/proc/self/fd`, before `/proc` is out of reach). Returns how many.
fn close_other_fds(keep: &[i32]) -> Result<usize, JailError> {
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|source| JailError::Sys {
        what: "list /proc/self/fd",
        source,
    })?;
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let mut closed = 0;
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing a descriptor number this process owns and no
            // Rust object refers to: every descriptor kiln hands over is in
            // `keep`, and the one `read_dir` used is closed already (a close
            // of it fails with EBADF and is ignored).
            if unsafe { libc::close(fd) } == 0 {
                closed += 1;
            }
        }
    }
    Ok(closed)
}

fn enter_namespaces(report: &mut JailReport) {
    let all = [
        (libc::CLONE_NEWNS, "mnt"),
        (libc::CLONE_NEWIPC, "ipc"),
        (libc::CLONE_NEWUTS, "uts"),
        (libc::CLONE_NEWNET, "net"),
    ];
    for (flag, name) in all {
        let t = std::time::Instant::now();
        // SAFETY: unshare(2) takes flags only; the process is
        // single-threaded here (required for CLONE_NEWNS semantics we rely on).
        if unsafe { libc::unshare(flag) } == 0 {
            report.namespaces.push(name.to_string());
        } else {
            report.missing.push(format!(
                "{name} namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
        report.timed(&format!("{name} namespace"), t);
    }
    if report.namespaces.iter().any(|n| n == "uts") {
        let name = b"kiln-vmm";
        // SAFETY: the buffer is valid for its length.
        unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    }
}

fn cstr(p: &std::path::Path) -> Result<std::ffi::CString, JailError> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Sys {
        what: "use the jail root path",
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

/// Make the current directory (a mount point) this mount namespace's `/`.
///
/// `pivot_root(".", ".")`: the old root is stacked on the new one and
/// detached at once, so no directory for it is needed. Where `/` is the
/// initramfs (rootfs), which cannot be pivoted (EINVAL; the nested tier's L1
/// boots that way), the directory is moved over `/` and chrooted into, as
/// switch_root and runc's no-pivot mode do: the old root stays hidden under
/// it in this mount namespace, and a jailed process, with no capability
/// left, cannot chroot out. On failure, the step that failed (errno is
/// still its error). Allocates nothing: safe between fork and exec.
///
/// # Safety
/// The caller is alone in a new mount namespace whose mounts are private,
/// with its working directory at the new root.
pub(crate) unsafe fn root_here() -> Result<(), &'static str> {
    let dot = c".";
    let slash = c"/";
    // SAFETY: NUL-terminated literals alive across each call; null for the
    // unused filesystem type and data; the caller's own mount namespace.
    unsafe {
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) == 0 {
            if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
                return Err("detach the old root");
            }
            return Ok(());
        }
        if *libc::__errno_location() != libc::EINVAL {
            return Err("pivot_root into the jail");
        }
        if libc::mount(
            dot.as_ptr(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        ) != 0
        {
            return Err("move the jail root over / (no pivot_root on rootfs)");
        }
        if libc::chroot(dot.as_ptr()) != 0 {
            return Err("chroot into the jail");
        }
    }
    Ok(())
}

/// Make `root` this mount namespace's `/` and drop the old root entirely.
fn pivot_into(root: &std::path::Path) -> Result<(), JailError> {
    let root = cstr(root)?;
    let slash = c"/";
    // SAFETY: mount/chdir/pivot_root/umount2 below take NUL-terminated
    // strings that live across each call, and null for the unused
    // filesystem type and data; they change only this process's (new)
    // mount namespace; statvfs writes into a zeroed local (a plain C struct).
    unsafe {
        // Nothing we do here may propagate back to the host's mounts.
        if libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(last_err("make the mounts private"));
        }
        // pivot_root needs the new root to be a mount point.
        if libc::mount(
            root.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return Err(last_err("bind-mount the jail root"));
        }
        if libc::chdir(root.as_ptr()) != 0 {
            return Err(last_err("enter the jail root"));
        }
        root_here().map_err(last_err)?;
        if libc::chdir(slash.as_ptr()) != 0 {
            return Err(last_err("enter the new root"));
        }
        // Keep the atime flags the bind mount has: in a user namespace
        // they may be locked, and a remount that changes them fails.
        let mut st: libc::statvfs = std::mem::zeroed();
        let mut atime = 0;
        if libc::statvfs(slash.as_ptr(), &mut st) == 0 {
            for (st_flag, ms_flag) in [
                (libc::ST_NOATIME, libc::MS_NOATIME),
                (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
                (libc::ST_RELATIME, libc::MS_RELATIME),
            ] {
                if st.f_flag & st_flag != 0 {
                    atime |= ms_flag;
                }
            }
        }
        let flags = libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC
            | atime;
        if libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        ) != 0
        {
            return Err(last_err("make the jail root read-only"));
        }
    }
    Ok(())
}

fn drop_privileges(spec: &JailSpec, user_ns: &UserNamespace, report: &mut JailReport) {
    // SAFETY: getppid has no arguments.
    let parent = unsafe { libc::getppid() };
    if let UserNamespace::Entered { uid, .. } = user_ns {
        // Root of its own user namespace: only kiln's uid is mapped, so no
        // other uid can be taken; what that root could do there goes with
        // its capabilities (below), the bounding set first.
        if let Err(e) = caps::clear(None, caps::CapSet::Bounding) {
            report.missing.push(format!("capability bounding set: {e}"));
        }
        report.missing.push(format!(
            "per-VM uid: kiln runs without root, so the VMM runs as kiln's uid {uid} \
             (root of its own user namespace, without capabilities)"
        ));
    } else if privileged() {
        // Needs CAP_SETPCAP, so before the uid changes.
        if let Err(e) = caps::clear(None, caps::CapSet::Bounding) {
            report.missing.push(format!("capability bounding set: {e}"));
        }
        // SAFETY: setgroups with a zero-length list reads no memory;
        // setresgid/setresuid take integers. The process is single-threaded.
        // uid/gid 0 would keep root, and u32::MAX (-1) means "unchanged" to
        // setresuid: refuse both, and check what the kernel now says.
        let valid = |id: u32| id != 0 && id != u32::MAX;
        let ok = valid(spec.uid)
            && valid(spec.gid)
            // SAFETY: setgroups with a zero-length list reads no memory; the
            // others take or return integers. The process is single-threaded.
            && unsafe {
                libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setresgid(spec.gid, spec.gid, spec.gid) == 0
                    && libc::setresuid(spec.uid, spec.uid, spec.uid) == 0
                    && libc::getuid() == spec.uid
                    && libc::geteuid() == spec.uid
                    && libc::getgid() == spec.gid
            };
        if ok {
            report.uid = Some(spec.uid);
            report.gid = Some(spec.gid);
        } else {
            report.missing.push(format!(
                "unprivileged uid {}: {}",
                spec.uid,
                std::io::Error::last_os_error()
            ));
        }
        // A credential change clears the parent-death signal: set it again,
        // and do not outlive a parent that died in between.
        // SAFETY: prctl and getppid take integers only.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
        }
    } else {
        report
            .missing
            .push("unprivileged uid: kiln does not run as root".to_string());
    }
    for set in [
        caps::CapSet::Inheritable,
        caps::CapSet::Ambient,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        let _ = caps::clear(None, set);
    }
    let empty = [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
        caps::CapSet::Bounding,
    ]
    .iter()
    .all(|&s| caps::read(None, s).is_ok_and(|c| c.is_empty()));
    if empty {
        report.capabilities_dropped = true;
    } else {
        report.missing.push("capabilities: some remain".to_string());
    }
}
