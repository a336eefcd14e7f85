//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2).
//!
//! Register accesses arrive from vCPU threads; queue notifications arrive
//! through ioeventfds (registered on `QueueNotify` with the queue index as
//! datamatch) and are handled by the event loop, which calls
//! [`MmioTransport::process_queue`]. Interrupts go out through an irqfd after
//! `InterruptStatus` is updated.

use std::os::fd::RawFd;
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::queue::Queue;
use crate::kvm::snapshot::state::TransportState;

pub const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
pub const MMIO_VERSION: u32 = 2;
pub const VENDOR_ID: u32 = 0x4b49_4c4e; // "KILN"
/// Size of one device's register window.
pub const MMIO_SIZE: u64 = 0x1000;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 0x80;

pub const INT_USED_RING: u32 = 1;
/// `InterruptStatus` bit 1: the device's configuration changed.
pub const INT_CONFIG: u32 = 2;

/// What the host side of a device wants from the event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostInterest {
    pub read: bool,
    pub write: bool,
}

/// A virtio device model behind the transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (3 console, 2 block, 4 entropy).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Read from the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver finished initialisation (DRIVER_OK) with these features.
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// Handle buffers the driver made available on queue `index`. Returns
    /// whether any were returned through the used ring (interrupt needed).
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// A host-side descriptor the event loop should watch, if any.
    fn host_fd(&self) -> Option<RawFd> {
        None
    }
    fn host_interest(&self) -> HostInterest {
        HostInterest::default()
    }
    /// The host-side descriptor is ready. Returns whether to interrupt.
    fn host_ready(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
    /// The device model's own state for a snapshot (see
    /// `kvm::snapshot`); `Null` when it keeps none.
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Take the state [`VirtioDevice::save_state`] returned (from a
    /// snapshot file: check it).
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
}

/// One virtio-mmio device: registers, queues and the device model.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemoryMmap>,
    pub queues: Vec<Queue>,
    /// One per queue: the ioeventfd KVM signals on `QueueNotify`.
    pub queue_evts: Vec<EventFd>,
    /// The irqfd wired to this device's GSI.
    pub irq_evt: EventFd,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: Arc<GuestMemoryMmap>) -> std::io::Result<Self> {
        let queues: Vec<Queue> = device
            .queue_max_sizes()
            .iter()
            .map(|&m| Queue::new(m))
            .collect();
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_evts,
            irq_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.device_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.activated = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
    }

    /// A 32-bit register read (config space may be read in any width).
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: non-32-bit register read"
            );
            data.fill(0);
            return;
        }
        let v = match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            // Our devices have read-only configuration.
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: non-32-bit register write"
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let features_locked = self.status & STATUS_FEATURES_OK != 0;
        let queue_locked = |q: &Queue| q.ready;
        let set_low = |a: GuestAddress| GuestAddress((a.0 & !0xffff_ffff) | u64::from(v));
        let set_high = |a: GuestAddress| GuestAddress((a.0 & 0xffff_ffff) | (u64::from(v) << 32));
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if !features_locked => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue().filter(|q| !queue_locked(q)) {
                    q.size = u16::try_from(v).unwrap_or(0);
                }
            }
            REG_QUEUE_READY => {
                let mem = self.mem.clone();
                if let Some(q) = self.selected_queue() {
                    if v == 1 && !q.ready {
                        q.ready = true;
                        if !q.is_valid(&mem) {
                            tracing::warn!("virtio-mmio: driver configured an invalid queue");
                            q.ready = false;
                        }
                    } else if v == 0 {
                        q.ready = false;
                    }
                }
            }
            REG_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; a write KVM did not
                // match (other width or value) still reaches the queue.
                if let Some(e) = self.queue_evts.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt_status &= !v,
            REG_STATUS => self.write_status(v),
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected_queue().filter(|q| !queue_locked(q)) {
                    match offset {
                        REG_QUEUE_DESC_LOW => q.desc_table = set_low(q.desc_table),
                        REG_QUEUE_DESC_HIGH => q.desc_table = set_high(q.desc_table),
                        REG_QUEUE_DRIVER_LOW => q.avail_ring = set_low(q.avail_ring),
                        REG_QUEUE_DRIVER_HIGH => q.avail_ring = set_high(q.avail_ring),
                        REG_QUEUE_DEVICE_LOW => q.used_ring = set_low(q.used_ring),
                        _ => q.used_ring = set_high(q.used_ring),
                    }
                }
            }
            _ => tracing::debug!(
                offset,
                v,
                "virtio-mmio: write to read-only or locked register"
            ),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        // FEATURES_OK sticks only if the driver accepted a subset of what we
        // offer, including VERSION_1 (no legacy interface here).
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.offered_features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                tracing::warn!(
                    driver = self.driver_features,
                    offered,
                    "virtio-mmio: driver accepted features we do not offer"
                );
                v &= !STATUS_FEATURES_OK;
            }
        }
        self.status = v;
        if v & STATUS_DRIVER_OK != 0 && v & STATUS_FAILED == 0 && !self.activated {
            self.activated = true;
            self.device.activate(self.driver_features);
        }
    }

    pub fn is_active(&self) -> bool {
        self.activated
    }

    /// The device's configuration changed under an active driver (a disk
    /// restored from a snapshot with another backing file: its capacity):
    /// bump `ConfigGeneration`, set `InterruptStatus` bit 1 and interrupt,
    /// so the driver reads its configuration again (virtio 1.x, 4.2.2.1).
    /// Nothing for a device no driver activated (it reads the
    /// configuration when it does).
    pub fn config_changed(&mut self) {
        if !self.activated {
            return;
        }
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt_status |= INT_CONFIG;
        if let Err(e) = self.irq_evt.write(1) {
            tracing::warn!("virtio-mmio: irqfd write failed: {e}");
        }
    }

    fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_RING;
        if let Err(e) = self.irq_evt.write(1) {
            tracing::warn!("virtio-mmio: irqfd write failed: {e}");
        }
    }

    /// The driver notified queue `index`.
    pub fn process_queue(&mut self, index: usize) {
        if !self.activated || !self.queues.get(index).is_some_and(|q| q.ready) {
            return;
        }
        if self
            .device
            .process_queue(index, &mut self.queues, &self.mem)
        {
            self.signal_used();
        }
    }

    pub fn host_fd(&self) -> Option<RawFd> {
        self.device.host_fd()
    }

    pub fn host_interest(&self) -> HostInterest {
        if !self.activated {
            return HostInterest::default();
        }
        self.device.host_interest()
    }

    pub fn host_ready(&mut self) {
        if !self.activated {
            return;
        }
        if self.device.host_ready(&mut self.queues, &self.mem) {
            self.signal_used();
        }
    }
}

/// Snapshots (`kvm::snapshot`): the transport's registers and queues.
impl MmioTransport {
    pub fn save_state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            activated: self.activated,
            queues: self.queues.iter().map(Queue::save_state).collect(),
            device: self.device.save_state(),
        }
    }

    /// Load `s` (from a snapshot file) into a transport that has not been
    /// used yet. Everything the guest could have set is checked as the
    /// registers would check it: the same device, queues, features we
    /// offer, rings inside guest memory.
    pub fn restore_state(&mut self, s: &TransportState) -> Result<(), String> {
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(format!(
                "device {} with {} queues where device {} with {} queues is",
                s.device_type,
                s.queues.len(),
                self.device.device_type(),
                self.queues.len()
            ));
        }
        if s.driver_features & !self.offered_features() != 0 {
            return Err(format!(
                "device {}: driver features {:#x} were never offered",
                s.device_type, s.driver_features
            ));
        }
        for (q, qs) in self.queues.iter_mut().zip(&s.queues) {
            q.restore_state(qs, &self.mem)
                .map_err(|e| format!("device {}: {e}", s.device_type))?;
        }
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        self.activated = s.activated;
        if self.activated {
            self.device.activate(self.driver_features);
        }
        self.device
            .restore_state(&s.device)
            .map_err(|e| format!("device {}: {e}", s.device_type))
    }
}

/// Read a little-endian value from a config-space image, in any width.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let off = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, b) in data.iter_mut().enumerate() {
        *b = off
            .checked_add(i)
            .and_then(|j| config.get(j))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::kvm::devices::virtio::queue::mock;

    pub fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    pub fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Drive the standard initialisation with mock ring addresses for every
    /// queue (queue `i` at `mock::DESC + i * 0x10000` and so on).
    pub fn init(t: &mut MmioTransport, features: u64) {
        crate::kvm::devices::virtio::fuzzing::init(t, features, |i| {
            let off = u64::from(i) * 0x10000;
            (mock::DESC + off, mock::AVAIL + off, mock::USED + off, 16)
        });
        assert_ne!(r(t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        for i in 0..t.queues.len() as u32 {
            w(t, REG_QUEUE_SEL, i);
            assert_eq!(r(t, REG_QUEUE_READY), 1, "queue {i} rejected");
        }
        assert!(t.is_active());
    }

    struct Null;
    impl VirtioDevice for Null {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4], offset, data)
        }
        fn process_queue(&mut self, _: usize, q: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
            q[0].drain(mem, "null", |_| Ok(0))
        }
    }

    #[test]
    fn registers_features_and_queue_setup() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap());
        let mut t = MmioTransport::new(Box::new(Null), mem.clone()).unwrap();
        assert_eq!(r(&mut t, REG_MAGIC), MMIO_MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        w(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        let mut b = [0u8; 2];
        t.read(REG_CONFIG + 1, &mut b);
        assert_eq!(b, [2, 3]);

        // Features we do not offer: FEATURES_OK does not stick.
        w(&mut t, REG_STATUS, 3);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 0x8000_0000);
        w(&mut t, REG_STATUS, 3 | STATUS_FEATURES_OK);
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        w(&mut t, REG_STATUS, 0);

        init(&mut t, VIRTIO_F_VERSION_1 | 1);
        mock::set_desc(&mem, 0, mock::DATA, 8, 0, 0);
        mock::publish(&mem, 0);
        t.process_queue(0);
        assert_eq!(mock::used_idx(&mem), 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
        assert_eq!(t.irq_evt.read().unwrap(), 1);
        w(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        // Notify written through the exit path reaches the eventfd.
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(t.queue_evts[0].read().unwrap(), 1);
        // Reset.
        w(&mut t, REG_STATUS, 0);
        assert!(!t.is_active());
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn a_queue_outside_memory_is_refused() {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap());
        let mut t = MmioTransport::new(Box::new(Null), mem).unwrap();
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 16);
        w(&mut t, REG_QUEUE_DESC_LOW, 0xfff0_0000);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        // Odd-sized accesses are ignored, not panics.
        t.write(REG_STATUS, &[1]);
        let mut b = [0u8; 1];
        t.read(REG_STATUS, &mut b);
    }
}
