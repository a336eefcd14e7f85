//! The user and PID namespaces, entered before the rest of the jail: a
//! user namespace when kiln is not root, then a PID namespace where the
//! VMM is PID 1 and a waiter stays behind.

use super::*;

/// Whether the VMM process runs in a user namespace of its own (kiln
/// without root: its uid and gid are mapped to root there, and the other
/// namespaces and `pivot_root` are made inside it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserNamespace {
    /// kiln runs as root: none is needed (the VMM gets a per-VM uid).
    NotNeeded,
    /// Not asked for (isolation off).
    NotAsked,
    /// Entered: kiln's uid and gid outside are root inside.
    Entered { uid: u32, gid: u32 },
    /// The kernel refused (unprivileged user namespaces disabled: why).
    Unavailable(String),
}

/// Whether this process has root's privileges (euid 0).
pub(super) fn privileged() -> bool {
    // SAFETY: geteuid has no arguments.
    unsafe { libc::geteuid() == 0 }
}

/// Without root, move this process into a new user namespace where its uid
/// and gid are root (one mapping each, `setgroups` denied), so that the
/// rest of the jail (namespaces, `pivot_root`) can be made; every
/// capability it gets there is dropped again by [`apply`]. With root,
/// nothing. Call it single-threaded, before [`enter_pid_namespace`] (the
/// PID namespace then belongs to the user namespace).
pub fn enter_user_namespace(spec: &JailSpec) -> UserNamespace {
    if spec.mode == IsolationMode::Off {
        return UserNamespace::NotAsked;
    }
    if privileged() {
        return UserNamespace::NotNeeded;
    }
    // SAFETY: getuid/getgid/getppid take no arguments.
    let (uid, gid, parent) = unsafe { (libc::getuid(), libc::getgid(), libc::getppid()) };
    // SAFETY: unshare(2) takes flags only; this process is single-threaded
    // (required for CLONE_NEWUSER).
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
        return UserNamespace::Unavailable(format!(
            "unshare(CLONE_NEWUSER): {} (unprivileged user namespaces may be disabled:              sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, or              kernel.apparmor_restrict_unprivileged_userns)",
            std::io::Error::last_os_error()
        ));
    }
    // The credential change cleared the parent-death signal: set it again,
    // and do not outlive a kiln that died in between.
    // SAFETY: prctl and getppid take integers only.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
    let maps = [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("0 {uid} 1")),
        ("/proc/self/gid_map", format!("0 {gid} 1")),
    ];
    for (file, text) in maps {
        if let Err(e) = std::fs::write(file, text) {
            return UserNamespace::Unavailable(format!("write {file}: {e}"));
        }
    }
    UserNamespace::Entered { uid, gid }
}

/// Whether the VMM process is PID 1 of its own PID namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidNamespace {
    /// This process is PID 1 of a new PID namespace.
    Entered,
    /// Not asked for (isolation off).
    NotAsked,
    /// The kernel refused (`unshare(CLONE_NEWPID)` failed: why).
    Unavailable(String),
}

/// Make the rest of the VMM process run as PID 1 of a new PID namespace.
///
/// A running process cannot move into a PID namespace, and once it has
/// unshared one for its children it can no longer create threads; so this
/// unshares and forks: the child (PID 1 there) returns and becomes the VMM;
/// the parent stays behind in kiln's namespace as a waiter and never
/// returns. The waiter closes every descriptor, drops to the VM's uid and
/// all capabilities, and ends as its child ended (the same exit code, or
/// death by the same signal, a seccomp SIGSYS included), so that kiln sees
/// the VMM's end as before; it dies with kiln (`PR_SET_PDEATHSIG`) and its
/// child dies with it, as every process of a namespace does with its PID 1.
/// Call it single-threaded, after kiln put this process in its cgroup (the
/// child inherits it).
pub fn enter_pid_namespace(
    spec: &JailSpec,
    user_ns: &UserNamespace,
) -> Result<PidNamespace, JailError> {
    if spec.mode == IsolationMode::Off {
        return Ok(PidNamespace::NotAsked);
    }
    // SAFETY: unshare(2) takes flags only; this process is single-threaded.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Ok(PidNamespace::Unavailable(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    // SAFETY: the process is single-threaded, so the child is a complete
    // copy; it goes on with the VMM, the parent only waits (below).
    match unsafe { libc::fork() } {
        -1 => Err(last_err("fork into the new PID namespace")),
        0 => {
            // PID 1 now. Die with the waiter, as the waiter dies with kiln.
            // SAFETY: prctl takes integers only.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            Ok(PidNamespace::Entered)
        }
        child => wait_as_parent(spec, user_ns, child),
    }
}

/// The waiter left in kiln's PID namespace: end as `child` ends.
fn wait_as_parent(spec: &JailSpec, user_ns: &UserNamespace, child: libc::pid_t) -> ! {
    // SAFETY: getppid takes no arguments.
    let parent = unsafe { libc::getppid() };
    let _ = close_other_fds(&[]);
    let mut scratch = JailReport::default();
    drop_privileges(spec, user_ns, &mut scratch);
    // SAFETY: prctl takes integers only.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    end_as(child, parent)
}

/// Wait for `child` and end this process as it ended: the same exit code,
/// or death by the same signal. Async-signal-safe (no allocation): QEMU's
/// waiter calls it between fork and exec. `parent`: kiln's pid, taken
/// before the waiter changed its credentials, which cleared its
/// parent-death signal: it is set again here, and a waiter whose kiln
/// already died kills `child` and ends (else a `kill -9` of kiln left the
/// VM running).
pub(super) fn end_as(child: libc::pid_t, parent: libc::pid_t) -> ! {
    // SAFETY: prctl, getppid, kill and _exit take integers only.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::kill(child, libc::SIGKILL);
            libc::_exit(1);
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a valid local.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // SAFETY: _exit ends this process without running destructors.
            unsafe { libc::_exit(1) };
        }
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: restoring the default action of one signal, unblocking
        // every signal and sending `sig` to this process take integers and
        // a local signal set only.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    // SAFETY: _exit ends this process without running destructors.
    unsafe { libc::_exit(code) }
}
