//! The machine state a snapshot holds besides guest memory. KVM's own
//! structures are saved as KVM returns them (kvm-bindings' `serde`
//! feature: their bytes); the devices' state is ours.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

/// Everything but guest memory.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    /// One per port-I/O slot, in bus order (`None`: nothing to keep).
    pub pio: Vec<Option<serde_json::Value>>,
    /// One per virtio-mmio device, in bus order.
    pub virtio: Vec<TransportState>,
}

/// The in-kernel irqchip (both PICs and the IOAPIC), the PIT and the KVM
/// clock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// One vCPU, read in the order KVM needs (MP state first: reading it may
/// deliver pending LAPIC events).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists that could be read, TSC deadline last.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

/// One virtio-mmio transport: its registers, its queues, and the device
/// model's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub queues: Vec<QueueState>,
    pub device: serde_json::Value,
}

/// One split virtqueue as the device side sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// The 8250's registers and receive FIFO: how vm-superio's `SerialState`
/// is (de)serialised (`#[serde(with = "SerialStateDef")]`).
#[derive(Serialize, Deserialize)]
#[serde(remote = "vm_superio::serial::SerialState")]
pub struct SerialStateDef {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}
