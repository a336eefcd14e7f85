use std::path::PathBuf;
use std::time::Duration;

use crate::qemu::QemuMachine;
use crate::KvmSupport;

/// The agent's console: a binary-safe byte stream to the guest.
pub type ConsoleStream = tokio::net::UnixStream;

/// A block device handed to the guest, identified there by `serial`
/// (`/sys/block/vdX/serial`), never by probe order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
    /// Shown to the guest as the disk's serial number (at most 20 bytes).
    pub serial: String,
    /// Thrown away with the VM: writes need not reach the host's disk.
    pub ephemeral: bool,
}

/// Everything a backend needs to boot one VM.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// vmlinux (ELF, PVH note preferred) or bzImage.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disks: Vec<Disk>,
    /// Per-VM directory: created by [`Machine::start`] (it must not exist),
    /// removed with everything in it by [`Machine::destroy`] or drop.
    pub run_dir: PathBuf,
    /// How many bytes of the serial console (kernel messages) to keep: the tail.
    pub serial_log_limit: usize,
    /// How long the backend may take to start the VM process and connect the
    /// console (not the guest's boot).
    pub start_timeout: Duration,
}

impl MachineConfig {
    /// The kernel command line kiln's guests use: early console on the 8250
    /// (the debug log), reboot through the i8042 (ends the VM), no reboot loop
    /// after a panic.
    pub fn default_cmdline() -> &'static str {
        "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 i8042.noaux i8042.nomux \
         i8042.dumbkbd quiet loglevel=4 rdinit=/init"
    }
}

/// Which backend runs the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// kvm where hardware virtualization runs unmodified guests, else qemu.
    #[default]
    Auto,
    Kvm,
    Qemu,
}

impl BackendKind {
    /// Resolve `Auto` against what the host has. Returns the backend and, when
    /// it is a fallback, why.
    pub fn resolve(self, kvm: &KvmSupport) -> Result<(BackendKind, Option<String>), MachineError> {
        match self {
            BackendKind::Qemu => Ok((BackendKind::Qemu, None)),
            BackendKind::Kvm => Err(MachineError::BackendUnavailable {
                backend: "kvm",
                why: "the embedded KVM backend is not built yet; use --backend qemu".into(),
            }),
            BackendKind::Auto => {
                let why = if kvm.runs_unmodified_guests() {
                    "the embedded KVM backend is not built yet: using QEMU with KVM".to_string()
                } else {
                    format!("{}; guests will be slow", kvm.describe())
                };
                Ok((BackendKind::Qemu, Some(why)))
            }
        }
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "kvm" => Ok(BackendKind::Kvm),
            "qemu" => Ok(BackendKind::Qemu),
            other => Err(format!(
                "unknown backend '{other}' (expected auto, kvm or qemu)"
            )),
        }
    }
}

/// How the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest reset or powered off.
    Shutdown,
    /// The VM process ended with an error status (e.g. the backend failed).
    Failed(String),
    /// We killed it.
    Killed,
}

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
    #[error("could not start {program} (install it, e.g. apt-get install qemu-system-x86)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM process exited during start-up: {0}")]
    EarlyExit(String),
    #[error("the VM did not connect its console within {0:?}")]
    StartTimeout(Duration),
    #[error("invalid machine configuration: {0}")]
    Config(String),
    #[error("I/O error on the VM's {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// One running VM. Dropping it kills the VM and removes its per-VM directory.
pub struct Machine {
    inner: QemuMachine,
}

impl Machine {
    /// Boot a VM. Returns the machine and the agent's console stream.
    pub async fn start(
        config: MachineConfig,
        backend: BackendKind,
        kvm: &KvmSupport,
    ) -> Result<(Machine, ConsoleStream), MachineError> {
        let (backend, _) = backend.resolve(kvm)?;
        debug_assert_eq!(backend, BackendKind::Qemu);
        let (inner, console) = QemuMachine::start(config, kvm.runs_unmodified_guests()).await?;
        Ok((Machine { inner }, console))
    }

    /// Backend and accelerator, e.g. `qemu/tcg`.
    pub fn describe(&self) -> String {
        self.inner.describe()
    }

    /// Host process id of the VM (for memory accounting); `None` once gone.
    pub fn pid(&self) -> Option<u32> {
        self.inner.pid()
    }

    /// Wait for the VM to end by itself.
    pub async fn wait(&mut self) -> ExitStatus {
        self.inner.wait().await
    }

    /// The last `serial_log_limit` bytes the guest wrote to its serial console.
    pub fn serial_log(&self) -> Vec<u8> {
        self.inner.serial_log()
    }

    /// Kill the VM, wait for it, and remove every per-VM file.
    pub async fn destroy(self) -> Result<(), MachineError> {
        self.inner.destroy().await
    }
}
