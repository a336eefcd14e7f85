//! What a backend needs to boot one VM: [`MachineConfig`] and its disks.
//! Every value comes from the caller; nothing here reads the environment.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::jail::Isolation;
use crate::qemu::QemuOptions;

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

/// The guest's network interface (one virtio-net device), as the caller has
/// set it up on the host: this crate opens no TAP device and runs no helper.
#[derive(Debug, Clone, Default)]
pub enum Network {
    /// No network device at all.
    #[default]
    None,
    /// A TAP device the caller opened (`IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`, `TUNSETVNETHDRSZ` 12: a `virtio_net_hdr_v1` before
    /// every frame; `TUNSETOFFLOAD` with checksum and TCP segmentation, which
    /// QEMU sets again as its guest negotiates); the backend hands the
    /// guest's frames to it. The caller keeps its own handle until
    /// the machine is destroyed.
    Tap {
        fd: Arc<OwnedFd>,
        mac: [u8; 6],
        /// The interface's MTU (the kvm backend's device bounds frames by it).
        mtu: u32,
    },
    /// A `passt` (or compatible) stream socket: each frame is a 4-byte
    /// big-endian length and the frame, QEMU's `-netdev stream` protocol.
    /// The kvm backend connects to it in the caller's process and hands the
    /// connection to the VMM process.
    Passt {
        socket: PathBuf,
        mac: [u8; 6],
        mtu: u32,
    },
}

impl Network {
    /// `52:54:00:..` text of the guest's MAC, if it has an interface.
    pub fn mac_text(&self) -> Option<String> {
        match self {
            Network::None => None,
            Network::Tap { mac, .. } | Network::Passt { mac, .. } => Some(
                mac.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
        }
    }
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
    /// Name of the console's virtio-serial port, as the guest sees it in
    /// `/sys/class/virtio-ports/*/name`. Part of the caller's contract with
    /// its guest (kiln's is `kiln_agent::proto::AGENT_PORT_NAME`); both
    /// backends offer exactly one such port.
    pub console_port: String,
    /// Per-VM directory: created by [`crate::Machine::start`] (it must not
    /// exist), removed with everything in it by [`crate::Machine::destroy`]
    /// or drop.
    pub run_dir: PathBuf,
    /// How many bytes of the serial console (kernel messages) to keep: the tail.
    pub serial_log_limit: usize,
    /// How long the backend may take to start the VM process and connect the
    /// console (not the guest's boot).
    pub start_timeout: Duration,
    /// How the qemu backend runs QEMU (ignored by the kvm backend).
    pub qemu: QemuOptions,
    /// The jail around the kvm backend's VMM process.
    pub isolation: Isolation,
    /// Test-only: the thread kind (`"vcpu"`, `"event-loop"` or `"main"`) of
    /// the VMM process that makes a forbidden syscall once the VM runs;
    /// `panic:<kind>` makes that thread panic instead.
    /// Honoured only by a `kiln-vmm` built with debug assertions or the
    /// `test-hooks` feature.
    pub test_forbidden_syscall: Option<String>,
    /// The guest's network interface, if any.
    pub network: Network,
}

impl MachineConfig {
    /// The kernel command line kiln's guests use: early console on the 8250
    /// (the debug log), reboot through the i8042 (ends the VM), no reboot loop
    /// after a panic, no PCI probing (every device is virtio-mmio; probing
    /// the PCI configuration ports costs hundreds of exits, as Firecracker's
    /// `pci=off` avoids too).
    pub fn default_cmdline() -> &'static str {
        "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 i8042.noaux i8042.nomux \
         i8042.dumbkbd pci=off quiet loglevel=4 rdinit=/init"
    }
}
