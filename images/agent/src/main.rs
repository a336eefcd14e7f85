//! kiln-agent: PID 1 of every kiln guest.
//!
//! Boot: mount devtmpfs/proc/sysfs, load the kernel modules the initramfs
//! carries (in the order written at build time), find the agent's
//! virtio-console port and the disks by their serials, mount the image's
//! root filesystem read-only under an overlay whose upper layer lives on the
//! per-VM scratch disk. Then speak the protocol (`kiln_agent::proto`): send
//! `Ready`, take `Start`, run each step chrooted into the overlay with the
//! image's user, environment and working directory, stream its output as
//! frames, enforce step timeouts and cancellation, send `Done`, sync and
//! reboot (the VM ends on the reset).
//!
//! The agent itself stays in the initramfs root, outside the job's reach.

#[cfg(target_os = "linux")]
mod guest;
mod user;

#[cfg(target_os = "linux")]
fn main() {
    guest::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("kiln-agent only runs inside a Linux guest");
    std::process::exit(1);
}
