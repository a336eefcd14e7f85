//! The buses vCPU exits are dispatched on, and the one path by which devices
//! join them ([`BusBuilder`]).
//!
//! - Port I/O: [`PioDevice`]s, each claiming one or more port ranges (COM1,
//!   the i8042's two ports). Ports no device claims read as 0.
//! - MMIO: virtio-mmio transports, one 4 KiB window and one GSI each, in the
//!   order they were added. [`BusBuilder::add_virtio`] also wires the
//!   device's queue notifications (ioeventfds) and interrupt (irqfd) into
//!   KVM and records how ACPI describes it; the event loop finds every
//!   device's eventfds and host descriptor on the [`Bus`]. Adding a device
//!   kind (e.g. virtio-net) is one `add_virtio` call in the builder.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::acpi::MmioDeviceInfo;
use super::devices::virtio::mmio::{
    MmioTransport, VirtioDevice, MMIO_SIZE, REG_QUEUE_NOTIFY, REG_STATUS,
};
use super::memory::{VIRTIO_FIRST_GSI, VIRTIO_MAX_DEVICES, VIRTIO_MMIO_BASE};
use super::{io_err, kvm_err};
use crate::error::MachineError;

/// What a port write asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    None,
    /// The guest reset the machine: the VM ends.
    Reset,
}

/// A device on the port-I/O bus. `port` is the absolute port number (a
/// device may claim several ranges); `data` is the access, 1 to 4 bytes.
pub trait PioDevice: Send {
    /// `data` arrives zeroed: bytes the device does not fill read as 0.
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    fn pio_write(&mut self, port: u16, data: &[u8]) -> PioAction;
    /// The device's state for a snapshot (`kvm::snapshot`), if it keeps any.
    fn save_state(&self) -> Option<serde_json::Value> {
        None
    }
    /// Take the state [`PioDevice::save_state`] returned (from a snapshot
    /// file: check it).
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
}

struct PioSlot {
    ports: Range<u16>,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// A virtio-mmio device on the bus.
pub struct VirtioSlot {
    /// Its window and GSI, as ACPI describes them.
    pub info: MmioDeviceInfo,
    pub transport: Mutex<MmioTransport>,
}

/// Every device of one VM, as vCPU exits and the event loop reach them.
pub struct Bus {
    pio: Vec<PioSlot>,
    virtio: Vec<VirtioSlot>,
    /// Wakes the event loop: a device's status changed, so may its host
    /// interest.
    wake: EventFd,
}

impl Bus {
    fn pio_device(&self, port: u16) -> Option<&Arc<Mutex<dyn PioDevice>>> {
        self.pio
            .iter()
            .find(|s| s.ports.contains(&port))
            .map(|s| &s.device)
    }

    /// Returns false when no device claims `port`. Unclaimed ports read as 0,
    /// as on Firecracker. Not 0xff (an empty ISA bus): Linux's CMOS RTC
    /// driver reads 0xff as "update in progress" and polls it thousands of
    /// times before giving up.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        data.fill(0);
        let Some(d) = self.pio_device(port) else {
            return false;
        };
        if let Ok(mut d) = d.lock() {
            d.pio_read(port, data);
        }
        true
    }

    /// `None` when no device claims `port`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<PioAction> {
        let d = self.pio_device(port)?;
        Some(match d.lock() {
            Ok(mut d) => d.pio_write(port, data),
            Err(_) => PioAction::None,
        })
    }

    fn find_mmio(&self, addr: u64) -> Option<(u64, &VirtioSlot)> {
        self.virtio
            .iter()
            .find(|s| (s.info.base..s.info.base + s.info.size).contains(&addr))
            .map(|s| (addr - s.info.base, s))
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some((off, s)) = self.find_mmio(addr) {
            if let Ok(mut t) = s.transport.lock() {
                t.read(off, data);
            }
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((off, s)) = self.find_mmio(addr) {
            if let Ok(mut t) = s.transport.lock() {
                t.write(off, data);
            }
            if off == REG_STATUS {
                let _ = self.wake.write(1);
            }
        }
    }

    /// The virtio devices, in the order they were added.
    pub fn virtio_devices(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    /// The port-I/O devices, one per claimed range, in the order they were
    /// added (a device with two ranges appears twice).
    pub fn pio_devices(&self) -> impl Iterator<Item = &Arc<Mutex<dyn PioDevice>>> {
        self.pio.iter().map(|s| &s.device)
    }
}

/// Collects a VM's devices and wires each into KVM as it joins.
pub struct BusBuilder<'a> {
    vm: &'a VmFd,
    mem: Arc<GuestMemoryMmap>,
    pio: Vec<PioSlot>,
    virtio: Vec<VirtioSlot>,
}

impl<'a> BusBuilder<'a> {
    pub fn new(vm: &'a VmFd, mem: Arc<GuestMemoryMmap>) -> BusBuilder<'a> {
        BusBuilder {
            vm,
            mem,
            pio: Vec::new(),
            virtio: Vec::new(),
        }
    }

    /// An eventfd that raises interrupt line `gsi` on the in-kernel IOAPIC.
    pub fn irq_line(&self, gsi: u32) -> Result<EventFd, MachineError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("irqfd"))?;
        self.vm
            .register_irqfd(&evt, gsi)
            .map_err(kvm_err("register an irqfd"))?;
        Ok(evt)
    }

    /// Give `ports` to `device` (a device may take several ranges).
    pub fn add_pio(&mut self, ports: Range<u16>, device: Arc<Mutex<dyn PioDevice>>) {
        debug_assert!(
            !self
                .pio
                .iter()
                .any(|s| s.ports.start < ports.end && ports.start < s.ports.end),
            "port ranges overlap"
        );
        self.pio.push(PioSlot { ports, device });
    }

    /// Attach a virtio device on the next MMIO window and GSI: its queue
    /// notifications become ioeventfds, its interrupt an irqfd.
    pub fn add_virtio(&mut self, device: Box<dyn VirtioDevice>) -> Result<(), MachineError> {
        let i = self.virtio.len();
        if i >= VIRTIO_MAX_DEVICES {
            return Err(MachineError::Config(format!(
                "at most {VIRTIO_MAX_DEVICES} virtio devices fit on the machine"
            )));
        }
        let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_SIZE;
        let gsi = VIRTIO_FIRST_GSI + i as u32;
        let t = MmioTransport::new(device, self.mem.clone()).map_err(io_err("virtio eventfds"))?;
        for (q, evt) in t.queue_evts.iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY);
            self.vm
                .register_ioevent(evt, &addr, q as u32)
                .map_err(kvm_err("register a queue ioeventfd"))?;
        }
        self.vm
            .register_irqfd(&t.irq_evt, gsi)
            .map_err(kvm_err("register a virtio irqfd"))?;
        self.virtio.push(VirtioSlot {
            info: MmioDeviceInfo {
                base,
                size: MMIO_SIZE,
                gsi,
            },
            transport: Mutex::new(t),
        });
        Ok(())
    }

    /// How ACPI must describe the virtio devices, in order.
    pub fn virtio_infos(&self) -> Vec<MmioDeviceInfo> {
        self.virtio.iter().map(|s| s.info).collect()
    }

    /// The finished bus; `wake` wakes the event loop.
    pub fn build(self, wake: EventFd) -> Bus {
        Bus {
            pio: self.pio,
            virtio: self.virtio,
            wake,
        }
    }
}
