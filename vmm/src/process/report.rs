//! What a VMM process tells kiln while its VM runs (serial output, the
//! first exit, how the VM ended, a seccomp violation), and how a VMM process
//! that died without saying is described.

use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::proto::{self, FromVmm, WireError, WireErrorKind};
use crate::error::MachineError;
use crate::jail::cgroup::Cgroup;
use crate::kvm::stats::ExitStats;
use crate::machine::ExitStatus;
use crate::tail::SharedTail;

/// What the VMM process reported besides serial output.
#[derive(Debug, Default)]
pub(super) struct Reported {
    pub(super) first_exit: Option<Duration>,
    pub(super) stats: ExitStats,
    pub(super) guest_resident: u64,
    /// The syscall a seccomp filter refused, when the VMM process said.
    pub(super) violation: Option<i64>,
    /// The panic message, when a thread of the VMM process panicked.
    pub(super) panic: Option<String>,
    /// Files a thread tried to open (`thread: path`), the first few.
    pub(super) refused: Vec<String>,
    /// The answer to the last snapshot request, until taken.
    pub(super) snapshot: Option<Result<Box<crate::kvm::snapshot::Header>, proto::WireError>>,
}

/// How many refused opens are kept.
const MAX_REFUSED: usize = 8;

/// Read the VMM process's reports until it ends the conversation.
pub(super) async fn read_reports(
    mut rd: tokio::net::unix::OwnedReadHalf,
    serial: SharedTail,
    reported: Arc<Mutex<Reported>>,
    ended: watch::Sender<Option<Option<ExitStatus>>>,
) {
    let outcome = loop {
        match proto::read_async::<FromVmm>(&mut rd).await {
            Ok(FromVmm::Serial(bytes)) => {
                if let Ok(mut t) = serial.lock() {
                    t.push(&bytes);
                }
            }
            Ok(FromVmm::FirstExit(us)) => {
                if let Ok(mut r) = reported.lock() {
                    r.first_exit = Some(Duration::from_micros(us));
                }
            }
            Ok(FromVmm::Exit {
                status,
                stats,
                guest_resident,
            }) => {
                if let Ok(mut r) = reported.lock() {
                    r.stats = stats;
                    r.guest_resident = guest_resident;
                }
                break Some(ExitStatus::from(status));
            }
            Ok(FromVmm::Violation(nr)) => {
                if let Ok(mut r) = reported.lock() {
                    r.violation = Some(nr);
                }
            }
            Ok(FromVmm::Refused { nr, thread, path }) => {
                tracing::warn!(
                    "the VMM process's {thread} thread tried {} on {path:?}; refused (EACCES)",
                    crate::jail::seccomp::syscall_name(nr)
                );
                if let Ok(mut r) = reported.lock() {
                    if r.refused.len() < MAX_REFUSED {
                        r.refused.push(format!("{thread}: {path}"));
                    }
                }
            }
            Ok(FromVmm::Panicked(text)) => {
                tracing::error!("the VMM process panicked: {text}");
                if let Ok(mut r) = reported.lock() {
                    r.panic = Some(text);
                }
            }
            Ok(FromVmm::Snapshotted(r)) => {
                if let Ok(mut rep) = reported.lock() {
                    rep.snapshot = Some(r);
                }
            }
            Ok(other) => {
                tracing::warn!("VMM process: unexpected message {other:?}; ignored");
            }
            Err(proto::ProtoError::Closed) => break None,
            Err(e) => {
                tracing::warn!("VMM process: {e}; treating it as failed");
                break None;
            }
        }
    };
    let _ = ended.send(Some(outcome));
}

/// Why a VMM process ended without saying how the VM ended.
pub(super) fn describe_death(
    status: std::process::ExitStatus,
    cgroup: Option<&Cgroup>,
    violation: Option<i64>,
    panic: Option<&str>,
) -> String {
    if let Some(text) = panic {
        return format!("the VMM process panicked (a kiln bug; please report it): {text}");
    }
    if let Some(nr) = violation {
        return format!(
            "the VMM process was killed by its seccomp filter: it made the forbidden system \
             call {} (a VMM bug or a guest escape attempt)",
            crate::jail::seccomp::syscall_name(nr)
        );
    }
    match status.signal() {
        Some(libc::SIGSYS) => "the VMM process was killed by SIGSYS: it made a system call \
                               its seccomp filter forbids"
            .to_string(),
        Some(libc::SIGKILL) if cgroup.and_then(Cgroup::oom_kills).unwrap_or(0) > 0 => {
            "the VMM process was killed by its memory cgroup's OOM killer: it used more than \
             guest memory plus its allowed overhead"
                .to_string()
        }
        Some(sig) => format!("the VMM process was killed by signal {sig}"),
        None => match status.code() {
            // The SIGSYS handler's exit, its report lost.
            Some(crate::jail::seccomp::VIOLATION_EXIT) => "the VMM process was killed by its \
                seccomp filter: it made a forbidden system call"
                .to_string(),
            Some(super::child::PANIC_EXIT) => "the VMM process panicked (a kiln bug; please \
                report it); its message is in kiln's log"
                .to_string(),
            Some(code) => format!(
                "the VMM process exited with status {code} without saying how the VM ended \
                 (its stderr is in kiln's log)"
            ),
            None => "the VMM process ended for an unknown reason".to_string(),
        },
    }
}

/// A start-up error the VMM process reported, typed again.
pub(super) fn remote_error(e: WireError) -> MachineError {
    let text = e.chain.join(": ");
    match e.kind {
        WireErrorKind::Config => MachineError::Config(text),
        WireErrorKind::Boot => MachineError::Boot(crate::kvm::boot::BootError::InVmmProcess(text)),
        WireErrorKind::Jail => MachineError::Jail(text),
        WireErrorKind::Other => MachineError::EarlyExit(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vmm_process_that_died_is_described_by_what_killed_it() {
        let signal = |sig: i32| std::process::ExitStatus::from_raw(sig);
        let exited = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        let why = describe_death(signal(libc::SIGSYS), None, Some(libc::SYS_ptrace), None);
        assert!(
            why.contains("seccomp") && why.contains("ptrace (101)"),
            "{why}"
        );
        let why = describe_death(signal(libc::SIGSYS), None, None, None);
        assert!(why.contains("SIGSYS"), "{why}");
        let why = describe_death(signal(libc::SIGKILL), None, None, None);
        assert!(why.contains("signal 9"), "{why}");
        let why = describe_death(exited(159), None, None, None);
        assert!(why.contains("seccomp"), "{why}");
        let why = describe_death(exited(101), None, None, None);
        assert!(why.contains("status 101"), "{why}");
        let panic_exit = exited(crate::process::child::PANIC_EXIT);
        let why = describe_death(panic_exit, None, None, Some("boom at src/x.rs:1:2"));
        assert!(
            why.contains("panicked") && why.contains("boom at src/x.rs"),
            "{why}"
        );
        let why = describe_death(panic_exit, None, None, None);
        assert!(why.contains("panicked"), "{why}");
    }

    #[test]
    fn remote_errors_keep_their_kind() {
        let e = |kind| WireError {
            kind,
            chain: vec!["outer".into(), "cause".into()],
        };
        assert!(matches!(
            remote_error(e(WireErrorKind::Config)),
            MachineError::Config(_)
        ));
        assert!(matches!(
            remote_error(e(WireErrorKind::Boot)),
            MachineError::Boot(_)
        ));
        match remote_error(e(WireErrorKind::Jail)) {
            MachineError::Jail(why) => assert_eq!(why, "outer: cause"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            remote_error(e(WireErrorKind::Other)),
            MachineError::EarlyExit(_)
        ));
    }
}
