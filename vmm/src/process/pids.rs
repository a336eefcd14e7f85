//! The VMM process by pid and pidfd: finding the VMM behind the waiter in
//! its PID namespace, killing it through a pidfd (a number could be
//! reused), and ending a start that failed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The one child of process `pid` (`/proc/PID/task/PID/children`).
pub(crate) fn only_child(pid: u32) -> Option<u32> {
    let list = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    let mut kids = list.split_whitespace().filter_map(|p| p.parse().ok());
    match (kids.next(), kids.next()) {
        (Some(k), None) => Some(k),
        _ => None,
    }
}

pub(crate) fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
    // descriptor (or -1), which is owned by nobody else.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::PIDFD_NONBLOCK) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: `fd` is a fresh descriptor (above).
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SIGKILL the process behind `pidfd` and wait (briefly, 2 s at most)
/// until it has exited, so that its cgroup holds it no longer.
pub(crate) fn kill_through(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal(2) on a pidfd the caller owns, with no
    // siginfo; poll(2) on one pollfd that lives across the call.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
        let mut p = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        libc::poll(&mut p, 1, 2000);
    }
}

/// End a VMM process whose start failed, so that its cgroup can be removed
/// right after: the VMM in its PID namespace first (it would otherwise die
/// only after the waiter, later), then the process kiln started, reaped.
pub(super) async fn end_failed_start(child: &mut tokio::process::Child, pid: Option<u32>) {
    if let Some(fd) = pid.and_then(only_child).and_then(pidfd_open) {
        kill_through(&fd);
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}
