//! Snapshots of a paused VM on the kvm backend, and VMs restored from them.
//!
//! A snapshot is one file (see [`file`]): a versioned header (kiln's
//! version, the [`Profile`] hash it was taken for), the machine state as
//! JSON (every vCPU, the in-kernel irqchip, PIT and clock, every device),
//! and guest memory, page-aligned and sparse. A restored VM maps that
//! memory `MAP_PRIVATE`: pages are read from the file on first touch and
//! copied on write, so the file is never written back and VMs restored from
//! one snapshot share nothing they write.
//!
//! Where things are:
//! - [`Profile`] (this file): what a snapshot is only good for.
//! - `file`: the on-disk format, the header checks on load.
//! - `state`: the serialisable machine state.
//! - `vcpu`, `vm`: saving and loading KVM's vCPU and VM state.
//! - `pause`: parking vCPU threads so their state can be read.
//! - `memory`: writing guest memory sparsely, mapping it copy-on-write.
//!
//! Taking one: [`crate::kvm::KvmMachine::snapshot`]; restoring:
//! [`crate::kvm::KvmMachine::restore`].

pub mod file;
pub(crate) mod memory;
pub(crate) mod pause;
pub mod state;
pub(crate) mod vcpu;
pub(crate) mod vm;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use file::{read_header, write_header, Header, Snapshot, FORMAT_VERSION};

use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use super::bus::Bus;
use crate::config::MachineConfig;

/// The version written into every snapshot; a snapshot from another kiln
/// is refused (its state layout may differ).
pub const KILN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a snapshot could not be taken or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot I/O failed: {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("not a kiln snapshot (bad magic); delete it and let kiln take a new one")]
    NotASnapshot,
    #[error(
        "snapshot format {found} is not the format this kiln reads ({expected}); \
         it is rebuilt"
    )]
    Format { found: u32, expected: u32 },
    #[error("snapshot taken by kiln {found}, this is kiln {expected}; it is rebuilt")]
    KilnVersion { found: String, expected: String },
    #[error(
        "snapshot is for profile {found}, not {expected} (kernel, initramfs, \
         vCPUs, memory or devices changed); it is rebuilt"
    )]
    Profile { found: String, expected: String },
    #[error("snapshot is damaged: {0}; delete it and let kiln take a new one")]
    Corrupt(String),
    #[error("snapshot does not fit this VM: {0}")]
    Mismatch(String),
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the vCPUs did not pause: {0}")]
    Pause(String),
    #[error("a device's state cannot be restored: {0}")]
    Device(String),
}

pub(crate) fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

pub(crate) fn io(what: &'static str) -> impl Fn(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { what, source }
}

/// What a VM started by [`crate::Machine::start_with_snapshot`] does with a
/// snapshot file (kvm backend only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SnapshotUse {
    #[default]
    None,
    /// Start from this snapshot, which must be for this [`Profile::hash`].
    Restore {
        path: std::path::PathBuf,
        profile_hash: String,
    },
    /// Boot, and allow [`crate::Machine::snapshot`] into this file (created,
    /// or emptied).
    WriteTo(std::path::PathBuf),
}

/// What a snapshot is good for: a VM restored from it must have the same
/// kernel, initramfs, command line, vCPUs, memory and devices. The caller
/// hashes the kernel and initramfs (it opened them); [`Profile::hash`]
/// names the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// SHA-256 of the kernel image, hex.
    pub kernel_sha256: String,
    /// SHA-256 of the initramfs (the agent is inside), hex.
    pub initramfs_sha256: String,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The devices in bus order: `console:<port>`, `block:<serial>:ro|rw`,
    /// `rng`.
    pub devices: Vec<String>,
}

impl Profile {
    /// The profile of `config`, given the digests of its kernel and
    /// initramfs.
    pub fn for_config(
        config: &MachineConfig,
        kernel_sha256: &str,
        initramfs_sha256: &str,
    ) -> Profile {
        let mut devices = vec![format!("console:{}", config.console_port)];
        devices.extend(config.disks.iter().map(|d| {
            format!(
                "block:{}:{}",
                d.serial,
                if d.read_only { "ro" } else { "rw" }
            )
        }));
        devices.push("rng".into());
        // The kind of backend decides the offloads offered (and so what the
        // driver took), the MTU what it allows; the MAC is the agent's to
        // set after a restore (`GuestNetwork::mac`).
        match &config.network {
            crate::Network::None => {}
            crate::Network::Tap { mtu, .. } => devices.push(format!("net:tap:mtu={mtu}")),
            crate::Network::Passt { mtu, .. } => devices.push(format!("net:stream:mtu={mtu}")),
        }
        Profile {
            kernel_sha256: kernel_sha256.into(),
            initramfs_sha256: initramfs_sha256.into(),
            cmdline: config.cmdline.clone(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            devices,
        }
    }

    /// SHA-256 (hex) of the profile and the snapshot format: the name of
    /// its snapshot in a cache.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(FORMAT_VERSION.to_le_bytes());
        h.update(KILN_VERSION.as_bytes());
        h.update([0]);
        // Serialising a struct of strings and numbers cannot fail.
        h.update(serde_json::to_vec(self).unwrap_or_default());
        hex::encode(h.finalize())
    }
}

/// Guest memory for a VM restored from `s`, which must have `config`'s
/// layout: the snapshot's pages, mapped copy-on-write.
pub(crate) fn restored_memory(
    config: &MachineConfig,
    s: &Snapshot,
) -> Result<GuestMemoryMmap, SnapshotError> {
    let want: Vec<(u64, u64)> = crate::kvm::memory::ram_ranges(config.memory_mib)
        .into_iter()
        .map(|(a, len)| (a.0, len as u64))
        .collect();
    let have: Vec<(u64, u64)> = s
        .header
        .memory
        .iter()
        .map(|r| (r.guest_addr, r.len))
        .collect();
    if want != have {
        return Err(SnapshotError::Mismatch(format!(
            "memory {have:?} where this VM has {want:?}"
        )));
    }
    if s.state.vcpus.len() != config.vcpus as usize {
        return Err(SnapshotError::Mismatch(format!(
            "{} vCPUs where this VM has {}",
            s.state.vcpus.len(),
            config.vcpus
        )));
    }
    memory::map_private(&s.file, &s.header.memory)
}

/// Load the snapshot's machine state into a new VM whose devices are on
/// `bus` (built as when the snapshot was taken): VM state, then the vCPUs
/// (created here), then the devices. Returns the vCPUs, not yet running.
pub(crate) fn restore_machine(
    vm_fd: &VmFd,
    bus: &Bus,
    s: &Snapshot,
    vcpus: u32,
) -> Result<Vec<VcpuFd>, SnapshotError> {
    let st = &s.state;
    vm::restore(vm_fd, &st.vm)?;
    let fds = st
        .vcpus
        .iter()
        .enumerate()
        .take(vcpus as usize)
        .map(|(id, state)| {
            let v = vm_fd.create_vcpu(id as u64).map_err(kvm("create a vCPU"))?;
            vcpu::restore(&v, state)?;
            Ok(v)
        })
        .collect::<Result<Vec<_>, SnapshotError>>()?;
    let slots = bus.virtio_devices();
    if st.virtio.len() != slots.len() {
        return Err(SnapshotError::Mismatch(format!(
            "{} virtio devices where this VM has {}",
            st.virtio.len(),
            slots.len()
        )));
    }
    for (slot, ts) in slots.iter().zip(&st.virtio) {
        let mut t = slot
            .transport
            .lock()
            .map_err(|_| SnapshotError::Device("device lock poisoned".into()))?;
        t.restore_state(ts).map_err(SnapshotError::Device)?;
        if ts.device_type == crate::kvm::devices::virtio::block::VIRTIO_ID_BLOCK {
            // The disk may be another file than when the snapshot was taken
            // (a job's disks are attached after the restore: the snapshot's
            // were empty): the guest's virtio_blk reads its capacity again.
            t.config_changed();
        }
    }
    let pio: Vec<_> = bus.pio_devices().collect();
    if st.pio.len() != pio.len() {
        return Err(SnapshotError::Mismatch(format!(
            "{} port-I/O devices where this VM has {}",
            st.pio.len(),
            pio.len()
        )));
    }
    for (d, ps) in pio.iter().zip(&st.pio) {
        if let Some(ps) = ps {
            d.lock()
                .map_err(|_| SnapshotError::Device("device lock poisoned".into()))?
                .restore_state(ps)
                .map_err(SnapshotError::Device)?;
        }
    }
    Ok(fds)
}

/// Save the paused machine: `vcpus` (from [`pause::Pause::pause`]), the
/// VM's and every device's state and guest memory, into `out`. Device locks
/// are held while memory is written, so the event loop cannot change it
/// underneath.
pub(crate) fn save_machine(
    vm_fd: &VmFd,
    bus: &Bus,
    mem: &GuestMemoryMmap,
    vcpus: Vec<state::VcpuState>,
    profile: &Profile,
    out: &std::fs::File,
) -> Result<Header, SnapshotError> {
    fn poisoned<T>(_: T) -> SnapshotError {
        SnapshotError::Device("device lock poisoned".into())
    }
    let transports = bus
        .virtio_devices()
        .iter()
        .map(|s| s.transport.lock().map_err(poisoned))
        .collect::<Result<Vec<_>, _>>()?;
    let pio = bus
        .pio_devices()
        .map(|d| d.lock().map(|d| d.save_state()).map_err(poisoned))
        .collect::<Result<Vec<_>, _>>()?;
    let state = state::MachineState {
        vm: vm::save(vm_fd)?,
        vcpus,
        pio,
        virtio: transports.iter().map(|t| t.save_state()).collect(),
    };
    let header = file::write(out, profile, &state, mem)?;
    drop(transports);
    Ok(header)
}

/// SHA-256 (hex) of everything `reader` yields, for [`Profile`] digests.
pub fn sha256_of(mut reader: impl std::io::Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(hex::encode(h.finalize())),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile {
            kernel_sha256: "aa".into(),
            initramfs_sha256: "bb".into(),
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            memory_mib: 64,
            devices: vec!["console:p".into(), "rng".into()],
        }
    }

    #[test]
    fn every_part_of_the_profile_changes_its_hash() {
        let base = profile().hash();
        assert_eq!(base, profile().hash(), "stable");
        assert_eq!(base.len(), 64);
        let changes: [fn(&mut Profile); 6] = [
            |p| p.kernel_sha256 = "ab".into(),
            |p| p.initramfs_sha256 = "bc".into(),
            |p| p.cmdline.push('x'),
            |p| p.vcpus = 1,
            |p| p.memory_mib = 128,
            |p| p.devices.push("block:x:ro".into()),
        ];
        for change in changes {
            let mut p = profile();
            change(&mut p);
            assert_ne!(p.hash(), base, "{p:?}");
        }
    }
}
