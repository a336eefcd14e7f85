//! The [`Machine`] API: one running VM whatever backend runs it, which
//! backend that is ([`BackendKind`]) and how it ended ([`ExitStatus`]).

use std::time::Duration;

use crate::config::MachineConfig;
use crate::error::MachineError;
use crate::jail::JailReport;
use crate::process::VmmProcess;
use crate::qemu::QemuMachine;
use crate::KvmSupport;

/// The guest's console (its named virtio-serial port): a binary-safe byte
/// stream.
pub type ConsoleStream = tokio::net::UnixStream;

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
            BackendKind::Kvm if kvm.device_usable() => {
                let why = (!kvm.runs_unmodified_guests()).then(|| {
                    format!(
                        "{}; only tiny guests run on the kvm backend here",
                        kvm.describe()
                    )
                });
                Ok((BackendKind::Kvm, why))
            }
            BackendKind::Kvm => Err(MachineError::BackendUnavailable {
                backend: "kvm",
                why: kvm.describe(),
            }),
            BackendKind::Auto if kvm.runs_unmodified_guests() => Ok((BackendKind::Kvm, None)),
            BackendKind::Auto => Ok((
                BackendKind::Qemu,
                Some(format!("{}; guests will be slow", kvm.describe())),
            )),
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

/// One running VM. Dropping it kills the VM and removes its per-VM directory.
pub struct Machine {
    inner: Inner,
}

/// The backends, as a closed set.
enum Inner {
    Qemu(Box<QemuMachine>),
    Kvm(Box<VmmProcess>),
}

impl Machine {
    /// Boot a VM. Returns the machine and its console stream.
    pub async fn start(
        config: MachineConfig,
        backend: BackendKind,
        kvm: &KvmSupport,
    ) -> Result<(Machine, ConsoleStream), MachineError> {
        let (backend, why) = backend.resolve(kvm)?;
        if let Some(why) = why {
            tracing::warn!("{why}");
        }
        match backend {
            BackendKind::Kvm => {
                let (inner, console) = VmmProcess::start(config).await?;
                Ok((
                    Machine {
                        inner: Inner::Kvm(Box::new(inner)),
                    },
                    console,
                ))
            }
            _ => {
                let (inner, console) =
                    QemuMachine::start(config, kvm.runs_unmodified_guests()).await?;
                Ok((
                    Machine {
                        inner: Inner::Qemu(Box::new(inner)),
                    },
                    console,
                ))
            }
        }
    }

    /// [`Machine::start`] on the kvm backend, restoring from a snapshot
    /// (instead of booting) or ready for [`Machine::snapshot`]
    /// (`kvm::snapshot::SnapshotUse`). The qemu backend has no snapshots:
    /// asking for one there is `MachineError::Unsupported`.
    pub async fn start_with_snapshot(
        config: MachineConfig,
        backend: BackendKind,
        kvm: &KvmSupport,
        snapshot: crate::kvm::snapshot::SnapshotUse,
    ) -> Result<(Machine, ConsoleStream), MachineError> {
        if snapshot == crate::kvm::snapshot::SnapshotUse::None {
            return Machine::start(config, backend, kvm).await;
        }
        if backend.resolve(kvm)?.0 != BackendKind::Kvm {
            return Err(MachineError::Unsupported(
                "snapshots need the kvm backend (the qemu backend always boots)",
            ));
        }
        let (inner, console) = VmmProcess::start_with_snapshot(config, snapshot).await?;
        Ok((
            Machine {
                inner: Inner::Kvm(Box::new(inner)),
            },
            console,
        ))
    }

    /// kvm backend, started with `SnapshotUse::WriteTo`: pause the VM,
    /// write its snapshot for `profile` into that file, let it run on.
    pub async fn snapshot(
        &mut self,
        profile: &crate::kvm::snapshot::Profile,
    ) -> Result<crate::kvm::snapshot::Header, MachineError> {
        match &mut self.inner {
            Inner::Qemu(_) => Err(MachineError::Unsupported("snapshots need the kvm backend")),
            Inner::Kvm(m) => m.snapshot(profile).await,
        }
    }

    /// Backend and accelerator, e.g. `qemu/tcg` or `kvm`.
    pub fn describe(&self) -> String {
        match &self.inner {
            Inner::Qemu(m) => m.describe(),
            Inner::Kvm(m) => m.describe(),
        }
    }

    /// Host process id of the VM (QEMU, or the kvm backend's VMM process),
    /// for memory accounting; `None` once gone.
    pub fn pid(&self) -> Option<u32> {
        match &self.inner {
            Inner::Qemu(m) => m.pid(),
            Inner::Kvm(m) => m.pid(),
        }
    }

    /// Wait for the VM to end by itself.
    pub async fn wait(&mut self) -> ExitStatus {
        match &mut self.inner {
            Inner::Qemu(m) => m.wait().await,
            Inner::Kvm(m) => m.wait().await,
        }
    }

    /// The last `serial_log_limit` bytes the guest wrote to its serial console.
    pub fn serial_log(&self) -> Vec<u8> {
        match &self.inner {
            Inner::Qemu(m) => m.serial_log(),
            Inner::Kvm(m) => m.serial_log(),
        }
    }

    /// kvm backend only: time from start to the guest's first I/O exit.
    pub fn first_guest_exit(&self) -> Option<Duration> {
        match &self.inner {
            Inner::Qemu(_) => None,
            Inner::Kvm(m) => m.first_exit(),
        }
    }

    /// Changes whenever the guest writes to its serial console: wait on it
    /// (then look at [`Machine::serial_log`]) instead of polling.
    pub fn serial_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        match &self.inner {
            Inner::Qemu(m) => m.serial_updates(),
            Inner::Kvm(m) => m.serial_updates(),
        }
    }

    /// What of the jail around the VM's process (the VMM process, or QEMU)
    /// was applied.
    pub fn jail(&self) -> Option<&JailReport> {
        match &self.inner {
            Inner::Qemu(m) => Some(m.jail()),
            Inner::Kvm(m) => Some(m.jail()),
        }
    }

    /// kvm backend only: files the VMM process tried to open inside its
    /// jail and was refused (`thread: path`), the first few.
    pub fn refused_opens(&self) -> Vec<String> {
        match &self.inner {
            Inner::Qemu(_) => Vec::new(),
            Inner::Kvm(m) => m.refused_opens(),
        }
    }

    /// The VM process's cgroup directory (QEMU's, or the kvm backend's VMM
    /// process's) and its memory limit file, when it has one.
    pub fn cgroup(&self) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
        let c = match &self.inner {
            Inner::Qemu(m) => m.cgroup(),
            Inner::Kvm(m) => m.cgroup(),
        }?;
        Some((c.path().to_path_buf(), c.memory_limit_file()))
    }

    /// kvm backend only: the VM exits that reached the VMM, by reason, and
    /// the guest's accesses to ports no device claims (reported when the
    /// VM ends).
    pub fn exit_stats(&self) -> Option<crate::kvm::stats::ExitStats> {
        match &self.inner {
            Inner::Qemu(_) => None,
            Inner::Kvm(m) => Some(m.exit_stats()),
        }
    }

    /// kvm backend only: (guest RAM bytes, bytes of it resident on the host
    /// when the VM ended).
    pub fn guest_memory_resident(&self) -> Option<(u64, u64)> {
        match &self.inner {
            Inner::Qemu(_) => None,
            Inner::Kvm(m) => Some(m.guest_memory_resident()),
        }
    }

    /// Kill the VM, wait for it, and remove every per-VM file.
    pub async fn destroy(self) -> Result<(), MachineError> {
        match self.inner {
            Inner::Qemu(m) => m.destroy().await,
            Inner::Kvm(m) => m.destroy().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_resolution() {
        let hw = KvmSupport::Hardware;
        let pvm = KvmSupport::NoHardwareVirt("nested PVM".into());
        let none = KvmSupport::Unavailable("no /dev/kvm".into());
        assert_eq!(
            BackendKind::Auto.resolve(&hw).unwrap(),
            (BackendKind::Kvm, None)
        );
        assert_eq!(
            BackendKind::Auto.resolve(&pvm).unwrap().0,
            BackendKind::Qemu
        );
        assert_eq!(
            BackendKind::Auto.resolve(&none).unwrap().0,
            BackendKind::Qemu
        );
        assert_eq!(
            BackendKind::Kvm.resolve(&hw).unwrap(),
            (BackendKind::Kvm, None)
        );
        let (b, why) = BackendKind::Kvm.resolve(&pvm).unwrap();
        assert_eq!(b, BackendKind::Kvm);
        assert!(why.unwrap().contains("tiny guests"));
        assert!(BackendKind::Kvm.resolve(&none).is_err());
        assert_eq!(BackendKind::Qemu.resolve(&hw).unwrap().0, BackendKind::Qemu);
    }
}
