//! The embedded KVM backend: one VM in the process that builds it (kiln runs
//! each in a VMM process of its own, [`crate::process`]), one thread per
//! vCPU plus one event-loop thread for device I/O.
//!
//! Where things are:
//! - [`KvmMachine`] (this file): a running VM and what can be asked of it.
//! - `builder`: configuration checks and set-up, from a [`MachineConfig`]
//!   to a running machine.
//! - Memory: [`memory`] (RAM below 3 GiB, the rest above 4 GiB).
//! - Boot: [`boot`] (ELF with PVH note, ELF/bzImage with the 64-bit
//!   protocol), [`acpi`] (RSDP, XSDT, FADT, MADT, DSDT).
//! - vCPUs: [`vcpu`] (MSRs, registers, LAPIC; the `KVM_RUN` loop), [`cpuid`]
//!   (the CPUID each vCPU is given),
//!   `kick` (the signal that gets a vCPU out of `KVM_RUN`), [`stats`]
//!   (exit counters).
//! - Devices: [`devices`] (8250 serial, kernel log, bounded; i8042, whose
//!   reset ends the VM; virtio-mmio console (one named port), block and
//!   rng), joined to the VM through `bus` (port I/O and MMIO dispatch,
//!   ioeventfd/irqfd wiring, ACPI descriptions).
//! - `event_loop`: queue notifications and host-side sockets;
//!   `control`: the stop flag, wake-up and exit status the threads share.
//! - [`snapshot`]: pausing a VM, saving it to a file, and starting a VM
//!   from one ([`KvmMachine::snapshot`], [`KvmMachine::restore`]).
//!
//! Port I/O and MMIO register accesses are handled on the vCPU thread that
//! exits; queue notifications arrive through ioeventfds and are handled by
//! the event loop, which also moves console bytes to and from the host
//! socket. Interrupts are raised through irqfds on the in-kernel IOAPIC.
//!
//! Where `/dev/kvm` is nested PVM (no VT-x/AMD-V), guest code runs by
//! instruction emulation and interrupts cannot be delivered into a
//! protected- or long-mode guest: stock Linux does not boot there, and the
//! backend is verified with the polling test guest in `vmm/testguest`.
//! `start_timeout` is not needed here: start-up is synchronous and takes
//! milliseconds.

pub mod acpi;
pub mod boot;
mod builder;
pub use builder::{NetSource, Sources, ThreadKind, ThreadStart};
mod bus;
mod control;
pub mod cpuid;
pub mod devices;
mod event_loop;
mod kick;
pub mod memory;
pub mod snapshot;
pub mod stats;
pub mod vcpu;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use self::control::Control;
use self::stats::ExitStats;
use crate::config::MachineConfig;
use crate::error::MachineError;
use crate::machine::ExitStatus;
use crate::tail::{self, SharedTail};

/// Most vCPUs we configure (xAPIC ids fit in a byte; 0xff is broadcast).
pub const MAX_VCPUS: u32 = 254;

/// How long [`KvmMachine`] waits for its vCPU threads to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`KvmMachine::snapshot`] waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> MachineError {
    move |e| MachineError::Kvm {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> MachineError {
    move |source| MachineError::Io { what, source }
}

/// A VM run by the embedded VMM.
pub struct KvmMachine {
    control: Arc<Control>,
    vcpu_threads: Vec<JoinHandle<()>>,
    event_thread: Option<JoinHandle<()>>,
    exit_rx: tokio::sync::watch::Receiver<Option<ExitStatus>>,
    exited: Option<ExitStatus>,
    serial: SharedTail,
    memory_bytes: u64,
    bus: Arc<bus::Bus>,
    // Fields drop in this order, after `Drop::drop` has joined the threads:
    // the VM fd before the guest memory it maps (see `builder::register_memory`).
    vm: VmFd,
    guest_memory: Arc<GuestMemoryMmap>,
}

impl KvmMachine {
    /// Create and start the VM in this process from descriptors (see
    /// `builder`). kiln runs it in a VMM process of its own
    /// ([`crate::process`]); this is what that process calls.
    pub fn start(
        config: &MachineConfig,
        sources: Sources,
        thread_start: ThreadStart,
    ) -> Result<KvmMachine, MachineError> {
        builder::start(config, sources, thread_start)
    }

    /// Start a VM from `snapshot` (opened with [`snapshot::Snapshot::open`]
    /// for `config`'s profile), where the snapshot was taken: its memory is
    /// the snapshot file's, mapped copy-on-write (never written back);
    /// `sources` are opened as for [`KvmMachine::start`] (kernel and
    /// initramfs are not read: the snapshot's memory holds them).
    pub fn restore(
        config: &MachineConfig,
        sources: Sources,
        snapshot: snapshot::Snapshot,
        thread_start: ThreadStart,
    ) -> Result<KvmMachine, MachineError> {
        builder::restore(config, sources, snapshot, thread_start)
    }

    /// Pause the VM, write a snapshot of it into `out` (an empty, writable
    /// file; the caller syncs and publishes it) for `profile`, and let it
    /// run again.
    pub fn snapshot(
        &self,
        out: &std::fs::File,
        profile: &snapshot::Profile,
    ) -> Result<snapshot::Header, snapshot::SnapshotError> {
        let started = std::time::Instant::now();
        let vcpus = self.control.pause.pause(
            || kick::kick(&self.vcpu_threads),
            || self.control.stopping(),
            PAUSE_TIMEOUT,
        );
        let saved = vcpus.and_then(|v| {
            snapshot::save_machine(&self.vm, &self.bus, &self.guest_memory, v, profile, out)
        });
        self.control.pause.resume();
        tracing::debug!(elapsed = ?started.elapsed(), ok = saved.is_ok(), "kvm VM snapshot");
        saved
    }

    pub fn serial_log(&self) -> Vec<u8> {
        tail::contents(&self.serial)
    }

    /// Time from `start` to the guest's first port-I/O or MMIO exit.
    pub fn first_exit(&self) -> Option<Duration> {
        self.control.first_exit_after()
    }

    /// VM exits that reached the VMM so far, by reason, and the guest's
    /// accesses to ports no device claims.
    pub fn exit_stats(&self) -> ExitStats {
        self.control.exits.snapshot()
    }

    /// Serial bytes written since `written` in all, and the new total (see
    /// [`crate::tail::TailBuffer::since`]).
    pub fn serial_since(&self, written: u64) -> (Vec<u8>, u64) {
        self.serial
            .lock()
            .map(|t| t.since(written))
            .unwrap_or((Vec::new(), written))
    }

    /// Changes once, when the VM ends (to how it ended).
    pub fn exit_updates(&self) -> tokio::sync::watch::Receiver<Option<ExitStatus>> {
        self.exit_rx.clone()
    }

    /// Notified on every byte the guest writes to its serial console (the
    /// value counts them); wait on it instead of polling [`Self::serial_log`].
    pub fn serial_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        tail::subscribe(&self.serial)
    }

    /// Guest RAM size in bytes, and how much of it is resident in the host.
    pub fn guest_memory_resident(&self) -> (u64, u64) {
        let mut resident = 0u64;
        for r in self.guest_memory.iter() {
            let len = r.len() as usize;
            let pages = len.div_ceil(4096);
            let mut vec = vec![0u8; pages];
            // SAFETY: the range is a live mapping owned by `guest_memory`,
            // page-aligned (mmap), and `vec` has one byte per page.
            let rc = unsafe { libc::mincore(r.as_ptr().cast(), len, vec.as_mut_ptr()) };
            if rc == 0 {
                resident += vec.iter().filter(|&&b| b & 1 == 1).count() as u64 * 4096;
            }
        }
        (self.memory_bytes, resident)
    }

    pub async fn wait(&mut self) -> ExitStatus {
        if let Some(s) = &self.exited {
            return s.clone();
        }
        let status = match self.exit_rx.wait_for(|s| s.is_some()).await {
            Ok(s) => s.clone().unwrap_or(ExitStatus::Killed),
            Err(_) => ExitStatus::Failed("the VMM's exit channel closed".into()),
        };
        self.exited = Some(status.clone());
        status
    }

    /// Tell every thread to stop without waiting for them (the VMM process
    /// exits right after).
    pub fn request_stop(&self) {
        self.control.stop();
    }

    /// Stop every thread: vCPUs are kicked out of `KVM_RUN` with a signal
    /// until they notice the stop flag.
    fn stop(&mut self) {
        let running = !self.vcpu_threads.is_empty();
        self.control.stop();
        kick::join_vcpus(std::mem::take(&mut self.vcpu_threads), STOP_TIMEOUT);
        if let Some(h) = self.event_thread.take() {
            let _ = h.join();
            // Where the event loop never ran, nobody else ends the stream.
            self.control.close_console();
        }
        if self.exited.is_none() {
            self.exited = self.exit_rx.borrow().clone();
        }
        if running {
            tracing::debug!(exits = %self.control.exits.snapshot().summary(16), "kvm VM stopped");
        }
    }

    /// Stop the VM and wait for its threads.
    pub fn destroy(mut self) {
        self.stop();
    }
}

impl Drop for KvmMachine {
    /// Stops the threads; the VM, its memory and the per-VM directory go
    /// with the fields after.
    fn drop(&mut self) {
        self.stop();
    }
}
