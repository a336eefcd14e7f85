//! What the vCPU threads, the device event loop and [`super::KvmMachine`]
//! share about the VM's life: the stop flag, the event loop's wake-up, how
//! the VM ended, and the timing and exit counters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::snapshot::pause::Pause;
use super::stats::ExitCounters;
use crate::machine::ExitStatus;

pub struct Control {
    stop: AtomicBool,
    /// Wakes the event loop to re-evaluate host-side interest (a device
    /// changed status) or to stop.
    wake: EventFd,
    exit: tokio::sync::watch::Sender<Option<ExitStatus>>,
    /// The VMM's end of the console socket (a second descriptor of it), shut
    /// down when the VM ends.
    console: std::os::unix::net::UnixStream,
    created: Instant,
    first_exit: OnceLock<Duration>,
    pub exits: ExitCounters,
    /// The vCPUs' pause request (snapshots).
    pub pause: Pause,
}

impl Control {
    /// `created` is when start-up began (for [`Control::first_exit_after`]).
    pub fn new(
        wake: EventFd,
        console: std::os::unix::net::UnixStream,
        created: Instant,
        pause: Pause,
    ) -> (Control, tokio::sync::watch::Receiver<Option<ExitStatus>>) {
        let (exit, exit_rx) = tokio::sync::watch::channel(None);
        let control = Control {
            stop: AtomicBool::new(false),
            wake,
            exit,
            console,
            created,
            first_exit: OnceLock::new(),
            exits: ExitCounters::default(),
            pause,
        };
        (control, exit_rx)
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// The event loop's wake-up descriptor (it reads it; others [`Control::wake`]).
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// Record the guest's first port-I/O or MMIO exit (only the first counts).
    pub fn first_exit(&self) {
        self.first_exit.get_or_init(|| self.created.elapsed());
    }

    /// Time from start-up to the guest's first port-I/O or MMIO exit.
    pub fn first_exit_after(&self) -> Option<Duration> {
        self.first_exit.get().copied()
    }

    /// Record how the VM ended (the first report wins). The VM is over:
    /// every thread is told to stop. The console is shut down by the event
    /// loop once it has handed the host what the guest wrote last
    /// ([`Control::close_console`]), so that whoever reads it sees all of
    /// it and then the end of the stream, as when QEMU exits.
    pub fn finish(&self, status: ExitStatus) {
        let first = self.exit.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(status);
                true
            } else {
                false
            }
        });
        if first {
            self.stop.store(true, Ordering::Release);
            self.wake();
        }
    }

    /// Shut the console down: its reader sees the end of the stream.
    pub fn close_console(&self) {
        let _ = self.console.shutdown(std::net::Shutdown::Both);
    }

    /// Tell every thread to stop, whatever has been reported so far.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.finish(ExitStatus::Killed);
        self.wake();
    }
}
