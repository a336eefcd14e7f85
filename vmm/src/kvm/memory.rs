//! Guest physical memory and the fixed layout of the machine.
//!
//! RAM starts at 0 and stops at 3 GiB; whatever does not fit continues at
//! 4 GiB. The 1 GiB between is the 32-bit MMIO hole: virtio-mmio windows,
//! the IOAPIC, the LAPIC and KVM's TSS pages live there.

use vm_memory::{GuestAddress, GuestMemoryMmap};

pub const MIB: u64 = 1 << 20;
/// End of RAM below 4 GiB; the MMIO hole starts here.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const HIGH_RAM_START: u64 = 1 << 32;
/// virtio-mmio device `i` lives at `VIRTIO_MMIO_BASE + i * 0x1000`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// GSI of the first virtio-mmio device; the next ones follow.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// The IOAPIC has 24 pins: GSIs 5..=23 are free for devices.
pub const VIRTIO_MAX_DEVICES: usize = 19;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Three pages KVM needs for the real-mode TSS (Intel).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// The smallest VM we create (the layout below 1 MiB plus a kernel).
pub const MIN_MEMORY_MIB: u32 = 16;

/// RAM ranges for `memory_mib` MiB of guest memory.
pub fn ram_ranges(memory_mib: u32) -> Vec<(GuestAddress, usize)> {
    let total = u64::from(memory_mib) * MIB;
    let low = total.min(MMIO_HOLE_START);
    let mut r = vec![(GuestAddress(0), low as usize)];
    if total > low {
        r.push((GuestAddress(HIGH_RAM_START), (total - low) as usize));
    }
    r
}

/// Map anonymous memory for the guest.
pub fn create(memory_mib: u32) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(memory_mib))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_above_three_gib_moves_past_the_hole() {
        assert_eq!(ram_ranges(256), vec![(GuestAddress(0), 256 << 20)]);
        let r = ram_ranges(4096);
        assert_eq!(r[0], (GuestAddress(0), 0xc000_0000));
        assert_eq!(r[1], (GuestAddress(1 << 32), 0x4000_0000));
    }
}
