//! Getting vCPU threads out of `KVM_RUN`: a real-time signal with a no-op
//! handler makes the ioctl return `EINTR`, and the thread then sees the stop
//! flag. The handler is installed once per process, before any vCPU runs.

use std::os::unix::thread::JoinHandleExt;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::MachineError;

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the kick signal's handler (once per process; later calls return
/// the first result).
pub fn install_handler() -> Result<(), MachineError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| e.errno())
    });
    r.map_err(|errno| MachineError::Kvm {
        what: "install the vCPU kick signal handler",
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// Get every thread in `threads` out of `KVM_RUN` once (a thread not in
/// it sees the signal's no-op handler and goes on).
pub fn kick(threads: &[JoinHandle<()>]) {
    for h in threads.iter().filter(|h| !h.is_finished()) {
        // SAFETY: as in `join_vcpus`: the thread has not been joined, and
        // the signal's handler is a no-op installed before it started.
        unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
    }
}

/// Join vCPU threads that were told to stop, kicking each out of `KVM_RUN`
/// until it notices. A thread still running after `timeout` (all threads
/// together) is leaked with an error in the log rather than waited for.
pub fn join_vcpus(threads: Vec<JoinHandle<()>>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for h in threads {
        while !h.is_finished() && Instant::now() < deadline {
            // SAFETY: the thread has not been joined, so its pthread_t
            // is valid; the signal's handler is a no-op installed (by
            // `install_handler`) before any vCPU thread started.
            unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_millis(1));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            tracing::error!("a vCPU thread did not stop; leaking it");
        }
    }
}
