//! Descriptor numbers in the VMM process.

/// The control socket ([`super::proto`]).
pub const CONTROL: i32 = 3;
/// The VMM's end of the console socket.
pub const CONSOLE: i32 = 4;
/// `/dev/kvm`.
pub const KVM: i32 = 5;
pub const KERNEL: i32 = 6;
pub const INITRAMFS: i32 = 7;
/// Disk `i` is `FIRST_DISK + i`.
pub const FIRST_DISK: i32 = 8;
/// A snapshot to restore from (read-only), or the empty file a
/// snapshot is to be written to (`proto::StartVm::restore`,
/// `snapshot_out`); absent otherwise.
pub const SNAPSHOT: i32 = 64;

/// The network backend (a TAP descriptor or a connected passt socket)
/// goes right after the last of `disks` disks. The VMM's network
/// namespace is empty, so that descriptor is its only way out.
pub fn network(disks: usize) -> i32 {
    FIRST_DISK + disks as i32
}
