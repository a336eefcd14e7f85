//! [`MachineError`]: why a VM could not be started or destroyed. Messages
//! say what failed and what to do; the cause is in `source()`, never
//! repeated in the message (the runner prints the whole chain).

use std::path::PathBuf;
use std::time::Duration;

use crate::kvm::acpi::AcpiError;
use crate::kvm::boot::BootError;
use crate::kvm::vcpu::VcpuError;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("backend '{backend}' is not available: {why}")]
    BackendUnavailable { backend: &'static str, why: String },
    #[error("per-VM directory {path} could not be created")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} does not exist or is unreadable: {path}")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not start {} (install it, e.g. apt-get install qemu-system-x86)", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM process exited during start-up: {0}")]
    EarlyExit(String),
    #[error("the VM did not connect its console within {0:?}")]
    StartTimeout(Duration),
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    #[error("invalid machine configuration: {0}")]
    Config(String),
    #[error(
        "cannot map {mib} MiB of guest memory (lower the VM's memory or free some on the host)"
    )]
    GuestMemory {
        mib: u32,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM could not {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The kernel, initrd or command line could not be placed in guest
    /// memory, or the boot tables around them could not be written.
    #[error(
        "the guest could not be set up for boot (the kernel must be an x86_64 vmlinux \
         or bzImage, and kernel plus initramfs must fit in the VM's memory)"
    )]
    Boot(#[source] BootError),
    #[error("the guest's ACPI tables could not be written (fewer vCPUs or devices would fit)")]
    Acpi(#[from] AcpiError),
    #[error("vCPU {id} could not be set up for boot (`kiln doctor` shows what this host's KVM supports)")]
    Vcpu {
        id: u32,
        #[source]
        source: VcpuError,
    },
    #[error(
        "the VM's jail could not be applied and isolation is strict: {0} (`kiln doctor` says \
         what this host enforces; isolation = \"best-effort\" runs without the missing parts)"
    )]
    Jail(String),
    #[error("the VM could not be snapshotted or restored")]
    Snapshot(#[from] crate::kvm::snapshot::SnapshotError),
    #[error("I/O error on the VM's {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A kernel or initrd that cannot be opened is a missing file, like on the
/// qemu backend; every other boot error is [`MachineError::Boot`].
impl From<BootError> for MachineError {
    fn from(e: BootError) -> MachineError {
        match e {
            BootError::Open { what, path, source } => MachineError::MissingFile {
                what,
                path: path.into(),
                source,
            },
            other => MachineError::Boot(other),
        }
    }
}
