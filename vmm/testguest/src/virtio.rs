//! A polling virtio-mmio (version 2) driver with split queues.

use core::sync::atomic::{fence, Ordering};

use crate::hw::{alloc_page, rd16, rd32, wr16, wr32, wr64};

pub const MAGIC: u32 = 0x7472_6976;
pub const R_MAGIC: u64 = 0x000;
pub const R_VERSION: u64 = 0x004;
pub const R_DEVICE_ID: u64 = 0x008;
pub const R_DEV_FEATURES: u64 = 0x010;
pub const R_DEV_FEATURES_SEL: u64 = 0x014;
pub const R_DRV_FEATURES: u64 = 0x020;
pub const R_DRV_FEATURES_SEL: u64 = 0x024;
pub const R_QUEUE_SEL: u64 = 0x030;
pub const R_QUEUE_NUM_MAX: u64 = 0x034;
pub const R_QUEUE_NUM: u64 = 0x038;
pub const R_QUEUE_READY: u64 = 0x044;
pub const R_QUEUE_NOTIFY: u64 = 0x050;
pub const R_STATUS: u64 = 0x070;
pub const R_DESC_LO: u64 = 0x080;
pub const R_DESC_HI: u64 = 0x084;
pub const R_AVAIL_LO: u64 = 0x090;
pub const R_AVAIL_HI: u64 = 0x094;
pub const R_USED_LO: u64 = 0x0a0;
pub const R_USED_HI: u64 = 0x0a4;
pub const R_CONFIG: u64 = 0x100;

pub const S_ACK: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
pub const QSIZE: u16 = 16;
/// How long to poll a used ring before giving up.
pub const POLL_LIMIT: u64 = 20_000_000;

#[derive(Clone, Copy)]
pub struct Dev {
    pub base: u64,
}

impl Dev {
    pub fn r(&self, off: u64) -> u32 {
        rd32(self.base + off)
    }
    pub fn w(&self, off: u64, v: u32) {
        wr32(self.base + off, v)
    }
    pub fn present(&self) -> bool {
        self.r(R_MAGIC) == MAGIC && self.r(R_VERSION) == 2
    }
    pub fn device_id(&self) -> u32 {
        self.r(R_DEVICE_ID)
    }
    pub fn features(&self) -> u64 {
        self.w(R_DEV_FEATURES_SEL, 1);
        let hi = u64::from(self.r(R_DEV_FEATURES));
        self.w(R_DEV_FEATURES_SEL, 0);
        (hi << 32) | u64::from(self.r(R_DEV_FEATURES))
    }

    /// Reset, negotiate `wanted` (must include VERSION_1), set up `nq`
    /// queues. Returns None if the device refused.
    pub fn init(&self, wanted: u64, nq: u16, queues: &mut [Vq]) -> Result<(), &'static str> {
        self.w(R_STATUS, 0);
        self.w(R_STATUS, S_ACK | S_DRIVER);
        let offered = self.features();
        if offered & wanted != wanted {
            return Err("device lacks a needed feature");
        }
        self.w(R_DRV_FEATURES_SEL, 0);
        self.w(R_DRV_FEATURES, wanted as u32);
        self.w(R_DRV_FEATURES_SEL, 1);
        self.w(R_DRV_FEATURES, (wanted >> 32) as u32);
        self.w(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if self.r(R_STATUS) & S_FEATURES_OK == 0 {
            return Err("FEATURES_OK refused");
        }
        for (i, q) in queues.iter_mut().enumerate().take(usize::from(nq)) {
            self.w(R_QUEUE_SEL, i as u32);
            if self.r(R_QUEUE_NUM_MAX) < u32::from(QSIZE) {
                return Err("queue too small");
            }
            *q = Vq::new(*self, i as u16);
            self.w(R_QUEUE_NUM, u32::from(QSIZE));
            self.w(R_DESC_LO, q.desc as u32);
            self.w(R_DESC_HI, (q.desc >> 32) as u32);
            self.w(R_AVAIL_LO, q.avail as u32);
            self.w(R_AVAIL_HI, (q.avail >> 32) as u32);
            self.w(R_USED_LO, q.used as u32);
            self.w(R_USED_HI, (q.used >> 32) as u32);
            self.w(R_QUEUE_READY, 1);
            if self.r(R_QUEUE_READY) != 1 {
                return Err("queue not accepted");
            }
        }
        self.w(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        Ok(())
    }
}

/// One split virtqueue of `QSIZE` entries in one page: descriptors at 0,
/// available ring at 0x100, used ring at 0x200.
#[derive(Clone, Copy)]
pub struct Vq {
    dev: Dev,
    index: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

impl Vq {
    pub const fn empty() -> Vq {
        Vq {
            dev: Dev { base: 0 },
            index: 0,
            desc: 0,
            avail: 0,
            used: 0,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    fn new(dev: Dev, index: u16) -> Vq {
        let page = alloc_page();
        Vq {
            dev,
            index,
            desc: page,
            avail: page + 0x100,
            used: page + 0x200,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Make a chain of (address, length, device-writable) buffers available
    /// and notify the device. Returns the head index.
    pub fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let d = self.next_desc;
            let next = (d + 1) % QSIZE;
            let at = self.desc + 16 * u64::from(d);
            wr64(at, addr);
            wr32(at + 8, len);
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            wr16(at + 12, flags);
            wr16(at + 14, next);
            self.next_desc = next;
        }
        wr16(self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE), head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wr16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        self.dev.w(R_QUEUE_NOTIFY, u32::from(self.index));
        head
    }

    /// A completed chain (head, bytes written), if any.
    pub fn try_used(&mut self) -> Option<(u32, u32)> {
        if rd16(self.used + 2) == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = self.used + 4 + 8 * u64::from(self.last_used % QSIZE);
        self.last_used = self.last_used.wrapping_add(1);
        Some((rd32(e), rd32(e + 4)))
    }

    /// Poll until a chain completes, up to `limit` tries.
    pub fn wait_used(&mut self, limit: u64) -> Option<(u32, u32)> {
        for _ in 0..limit {
            if let Some(u) = self.try_used() {
                return Some(u);
            }
            core::hint::spin_loop();
        }
        None
    }

    /// Submit and wait.
    pub fn call(&mut self, bufs: &[(u64, u32, bool)]) -> Option<u32> {
        self.submit(bufs);
        self.wait_used(POLL_LIMIT).map(|(_, len)| len)
    }
}
