//! Starting a step's (or a service's) process: fork, then in the child
//! `setsid`, default signal dispositions, stdio on the step's pipes,
//! `chroot` into the job's root (a service: its own mount namespace with
//! its root moved onto `/`), the working directory, the image's user,
//! `execve` along `PATH`.
//!
//! Between fork and exec the child must not allocate (another thread could
//! have held the allocator's lock: with services, their log reader runs):
//! everything it uses is prepared before the fork, and it
//! only makes system calls. Most go through `rustix` (direct system calls,
//! no allocation for `&CStr` paths); `fork`, `sigaction`, `sigprocmask`,
//! `execve` and `_exit` stay `libc`, which rustix offers only as unsafe
//! runtime internals, if at all.

use std::ffi::{c_char, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use kiln_agent::proto::{EXIT_CANNOT_START, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND};
use rustix::fs::{Gid, Mode, OFlags, Uid};
use rustix::pipe::PipeFlags;
use rustix::process::Pid;

use super::error::{Error, Result};
use super::{DEFAULT_PATH, NEWROOT};
use crate::user::Identity;

/// Linux's signal numbers are 1..NSIG (`_NSIG` is 65 on x86_64).
const NSIG: i32 = 65;

/// A pipe for one of the step's output streams.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

pub fn pipe() -> Result<Pipe> {
    let (read, write) =
        rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(|e| Error::Pipe(e.into()))?;
    Ok(Pipe { read, write })
}

/// What the child needs, all prepared before fork.
struct ChildPlan<'a> {
    root: CString,
    /// Enter a mount namespace of its own and make `root` its `/` there
    /// (services), rather than only `chroot` into it (steps).
    own_mount_ns: bool,
    workdir: CString,
    candidates: Vec<CString>,
    /// NULL-terminated, pointing into `spawn`'s `c_args` and `c_env`.
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    groups: Vec<Gid>,
    uid: Uid,
    gid: Gid,
    not_found: String,
    out: BorrowedFd<'a>,
    err: BorrowedFd<'a>,
    default_action: libc::sigaction,
    empty_mask: libc::sigset_t,
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::NulByte(s.into()))
}

/// Where a process runs.
pub enum Root<'a> {
    /// The job's root ([`NEWROOT`]), by `chroot`: the steps.
    Job,
    /// A service's root (a mount point), made `/` of a mount namespace of
    /// the process's own, so nothing outside it (the agent's initramfs, the
    /// job's root, other services) is reachable from it.
    Isolated(&'a str),
}

/// Fork and exec `argv` in `root`, as `ident`.
pub fn spawn_in(
    root: Root<'_>,
    argv: &[String],
    env: &[(String, String)],
    workdir: &str,
    ident: &Identity,
    out: &Pipe,
    err: &Pipe,
) -> Result<Pid> {
    let (root, own_mount_ns) = match root {
        Root::Job => (NEWROOT, false),
        Root::Isolated(r) => (r, true),
    };
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    let candidates: Vec<CString> = exec_candidates(&argv[0], path_var)
        .into_iter()
        .filter_map(|p| CString::new(p).ok())
        .collect();
    let c_args: Vec<CString> = argv.iter().map(|a| cstr(a)).collect::<Result<_>>()?;
    let c_env: Vec<CString> = env
        .iter()
        .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
        .collect();
    let null_terminated = |v: &[CString]| {
        let mut p: Vec<*const c_char> = v.iter().map(|c| c.as_ptr()).collect();
        p.push(std::ptr::null());
        p
    };
    // SAFETY: an all-zero sigaction is a valid value (no flags, empty mask);
    // SIG_DFL is then set as its handler.
    let mut default_action: libc::sigaction = unsafe { std::mem::zeroed() };
    default_action.sa_sigaction = libc::SIG_DFL;
    // SAFETY: an all-zero sigset_t is a valid (empty) set; sigemptyset makes
    // it so explicitly.
    let mut empty_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty_mask` is a valid, writable sigset_t.
    unsafe { libc::sigemptyset(&mut empty_mask) };
    let plan = ChildPlan {
        root: cstr(root)?,
        own_mount_ns,
        workdir: cstr(workdir)?,
        candidates,
        argv: null_terminated(&c_args),
        envp: null_terminated(&c_env),
        groups: ident
            .groups
            .iter()
            .map(|&g| Gid::from_raw_unchecked(g))
            .collect(),
        uid: Uid::from_raw_unchecked(ident.uid),
        gid: Gid::from_raw_unchecked(ident.gid),
        not_found: format!("kiln: {}: command not found\n", argv[0]),
        out: out.write.as_fd(),
        err: err.write.as_fd(),
        default_action,
        empty_mask,
    };

    // SAFETY: the child only makes system calls on memory prepared above
    // (no allocation, no lock another thread could hold: the service log
    // reader may run) and then execs or _exits (`in_child` never returns).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::Fork(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        in_child(&plan);
    }
    Pid::from_raw(pid).ok_or_else(|| Error::Fork(std::io::Error::other("fork returned pid 0")))
}

/// The child between fork and exec: system calls only, no allocation.
fn in_child(plan: &ChildPlan<'_>) -> ! {
    let _ = rustix::process::setsid();
    // The job starts as from a plain init: every signal at its default
    // disposition (Rust's runtime ignores SIGPIPE, and an ignored signal
    // stays ignored across execve, which POSIX shells cannot undo) and none
    // blocked. sigaction(2) and sigprocmask(2) are async-signal-safe; the
    // kernel refuses SIGKILL/SIGSTOP and libc its internal signals,
    // harmlessly. The agent changes no rlimits, so the kernel's defaults
    // apply.
    for sig in 1..NSIG {
        // SAFETY: `default_action` is a valid sigaction; no old action is
        // asked for.
        unsafe { libc::sigaction(sig, &plan.default_action, std::ptr::null_mut()) };
    }
    // SAFETY: `empty_mask` is a valid sigset_t; no old mask is asked for.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &plan.empty_mask, std::ptr::null_mut()) };
    if let Ok(null) = rustix::fs::open(c"/dev/null", OFlags::RDONLY, Mode::empty()) {
        let _ = rustix::stdio::dup2_stdin(&null);
        if null.as_raw_fd() <= 2 {
            // It landed on a standard descriptor, which must stay open.
            std::mem::forget(null);
        }
    }
    let _ = rustix::stdio::dup2_stdout(plan.out);
    let _ = rustix::stdio::dup2_stderr(plan.err);
    if plan.own_mount_ns {
        enter_own_root(plan);
    } else if rustix::process::chroot(plan.root.as_c_str()).is_err()
        || rustix::process::chdir(c"/").is_err()
    {
        fail(
            b"kiln: cannot enter the job's root filesystem\n",
            EXIT_CANNOT_START,
        );
    }
    if rustix::process::chdir(plan.workdir.as_c_str()).is_err() {
        fail(
            b"kiln: cannot enter the working directory\n",
            EXIT_CANNOT_START,
        );
    }
    // The kernel's credentials are per thread; the child has one thread, so
    // these change the whole process, as setgroups/setgid/setuid would.
    if rustix::thread::set_thread_groups(&plan.groups).is_err()
        || rustix::thread::set_thread_gid(plan.gid).is_err()
        || rustix::thread::set_thread_uid(plan.uid).is_err()
    {
        fail(
            b"kiln: cannot switch to the image's user\n",
            EXIT_CANNOT_START,
        );
    }
    let mut eacces = false;
    for c in &plan.candidates {
        // SAFETY: `c` and every pointer in `argv`/`envp` point to
        // NUL-terminated strings alive until exec; both arrays end in NULL.
        unsafe { libc::execve(c.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::EACCES) {
            eacces = true;
        }
    }
    if eacces {
        fail(b"kiln: permission denied\n", EXIT_NOT_EXECUTABLE);
    }
    fail(plan.not_found.as_bytes(), EXIT_NOT_FOUND)
}

/// In the child: a mount namespace of its own in which `plan.root` (a
/// mount point) is moved onto `/` and made the root, as `switch_root` does
/// (`pivot_root` cannot leave the initramfs). The old root is left under
/// the moved mount, out of reach.
fn enter_own_root(plan: &ChildPlan<'_>) {
    use rustix::mount::MountPropagationFlags as P;
    // SAFETY: unshare(2) of the mount namespace only (not the descriptor
    // table), in the child's one thread.
    let unshared = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) };
    if unshared.is_err()
        || rustix::mount::mount_change(c"/", P::PRIVATE | P::REC).is_err()
        || rustix::process::chdir(plan.root.as_c_str()).is_err()
        || rustix::mount::mount_move(c".", c"/").is_err()
        || rustix::process::chroot(c".").is_err()
        || rustix::process::chdir(c"/").is_err()
    {
        fail(
            b"kiln: cannot enter the service's root filesystem\n",
            EXIT_CANNOT_START,
        );
    }
}

/// In the child: say why on stderr (the step's pipe) and exit with `code`.
fn fail(msg: &[u8], code: i32) -> ! {
    let _ = rustix::io::write(rustix::stdio::stderr(), msg);
    // SAFETY: _exit(2) ends the process at once, running no destructors or
    // atexit handlers (which must not run in a forked child).
    unsafe { libc::_exit(code) }
}

/// Where to look for `prog`: itself if it has a slash, else each PATH entry.
fn exec_candidates(prog: &str, path: &str) -> Vec<String> {
    if prog.contains('/') {
        return vec![prog.to_string()];
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{prog}", d.trim_end_matches('/')))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_search() {
        assert_eq!(exec_candidates("/bin/sh", "/x"), vec!["/bin/sh"]);
        assert_eq!(
            exec_candidates("sh", "/usr/bin:/bin/:"),
            vec!["/usr/bin/sh", "/bin/sh"]
        );
    }
}
