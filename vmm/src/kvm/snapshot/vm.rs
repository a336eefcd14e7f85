//! The VM-wide state KVM keeps: both PICs and the IOAPIC of the in-kernel
//! irqchip, the PIT, and the KVM clock.

use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use super::state::VmState;
use super::{kvm, SnapshotError};

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm("read the irqchip"))?;
    Ok(c)
}

/// Read the VM's state; its vCPUs are paused.
pub fn save(vm: &VmFd) -> Result<VmState, SnapshotError> {
    let pit = vm.get_pit2().map_err(kvm("read the PIT"))?;
    let mut clock = vm.get_clock().map_err(kvm("read the KVM clock"))?;
    // KVM_SET_CLOCK takes only the realtime flag and refuses the rest
    // (e.g. KVM_CLOCK_TSC_STABLE, which GET reports).
    clock.flags = 0;
    Ok(VmState {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit,
        clock,
    })
}

/// Load `s` into a new VM (irqchip and PIT created, no vCPU run yet).
pub fn restore(vm: &VmFd, s: &VmState) -> Result<(), SnapshotError> {
    let ids = [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ];
    for (c, id) in ids {
        if c.chip_id != id {
            return Err(SnapshotError::Corrupt(format!(
                "irqchip {} where {id} belongs",
                c.chip_id
            )));
        }
    }
    vm.set_pit2(&s.pit).map_err(kvm("set the PIT"))?;
    let mut clock = s.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm("set the KVM clock"))?;
    for (c, _) in ids {
        vm.set_irqchip(c).map_err(kvm("set the irqchip"))?;
    }
    Ok(())
}
