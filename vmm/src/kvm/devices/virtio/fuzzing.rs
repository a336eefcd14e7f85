//! Fuzz harnesses for the virtio devices (see docs/fuzzing.md): a hostile
//! driver writes any registers, any guest memory contents (descriptor
//! tables, rings, request headers) and notifies any queue, in any order.
//!
//! Each harness takes arbitrary bytes, read as a program of such steps, and
//! panics only when a property that must hold for every driver is broken:
//! no panic in the device or the descriptor walker, a disk never changes
//! size (nor content when read-only), and after a reset a well-behaved
//! driver is served again. `cargo test` drives them with proptest for a
//! bounded number of cases; the cargo-fuzz targets in `fuzz/` call the same
//! functions. Not part of the API.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::block::{Block, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID};
use super::console::Console;
use super::mmio::*;
use super::net::{Net, NetBackend, NET_HDR_LEN};
use super::rng::Rng;

/// Guest memory: two adjacent regions (buffers may straddle them) and one
/// after a hole, small enough that random addresses often land inside.
const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x2_0000, 0x1000)];

/// Where the well-behaved driver lays out its queues after the fuzzed run.
const GOOD_DESC: u64 = 0x1000;
const GOOD_AVAIL: u64 = 0x2000;
const GOOD_USED: u64 = 0x3000;
const GOOD_DATA: u64 = 0x4000;

/// The registers a driver writes, so that most random writes hit one.
const REGS: [u64; 19] = [
    REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_QUEUE_SEL,
    REG_QUEUE_NUM,
    REG_QUEUE_READY,
    REG_QUEUE_NOTIFY,
    REG_INTERRUPT_ACK,
    REG_STATUS,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DEVICE_HIGH,
    REG_CONFIG,
    REG_MAGIC,
    REG_QUEUE_NUM_MAX,
    REG_CONFIG_GENERATION,
];

/// Reads the fuzzer's bytes as numbers; zeros once they run out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }
    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn memory() -> Arc<GuestMemoryMmap> {
    let ranges: Vec<_> = REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    Arc::new(GuestMemoryMmap::from_ranges(&ranges).expect("mock guest memory"))
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// A guest address the fuzzer picks: mostly inside memory, sometimes not.
fn addr(i: &mut Input) -> u64 {
    match i.u8() % 8 {
        0 => u64::from(i.u32()) | u64::from(i.u32()) << 32,
        1 => 0x2_0000 + u64::from(i.u16() % 0x1100),
        _ => u64::from(i.u16()),
    }
}

/// The host end of a device's backend (a console's or passt's stream, a
/// TAP's stand-in datagram socket): fed hostile bytes and drained.
trait HostEnd {
    fn feed(&mut self, bytes: &[u8]);
    fn drain(&mut self);
}

impl HostEnd for UnixStream {
    fn feed(&mut self, bytes: &[u8]) {
        let _ = self.write(bytes);
    }
    fn drain(&mut self) {
        let mut b = [0u8; 4096];
        while matches!(self.read(&mut b), Ok(n) if n > 0) {}
    }
}

impl HostEnd for UnixDatagram {
    /// One frame per send, as a TAP delivers them (empty ones too).
    fn feed(&mut self, bytes: &[u8]) {
        let _ = self.send(bytes);
    }
    fn drain(&mut self) {
        let mut b = vec![0u8; 65536];
        while self.recv(&mut b).is_ok() {}
    }
}

/// Run the driver program in `data` against `t`; `host` is the host end of
/// the device's backend (fed and drained), if any.
fn run(
    t: &mut MmioTransport,
    mem: &GuestMemoryMmap,
    data: &[u8],
    mut host: Option<&mut dyn HostEnd>,
) {
    let mut i = Input(data);
    let queues = t.queues.len();
    // Bounded: every step consumes at least one byte.
    while !i.is_empty() {
        match i.u8() % 11 {
            0 | 1 => {
                let off = REGS[usize::from(i.u8()) % REGS.len()];
                let v = i.u32();
                w(t, off, v);
            }
            2 => {
                // Any width, any offset (config space included).
                let off = u64::from(i.u16() % 0x200);
                let mut b = vec![0u8; usize::from(i.u8() % 9)];
                t.read(off, &mut b);
                let v = i.bytes(b.len()).to_vec();
                t.write(off, &v);
            }
            3 => {
                // One descriptor of the selected queue, wherever its table
                // is: mostly plausible (sizes a device expects, chained
                // within the queue), sometimes anything.
                let (desc, _, size) = selected(t, i.u8());
                let at = desc.wrapping_add(16 * (u64::from(i.u8()) % size));
                let a = addr(&mut i);
                let len = match i.u8() % 5 {
                    0 => u32::from(i.u16()),
                    1 => i.u32(),
                    2 => 16,
                    3 => 512,
                    _ => 1,
                };
                let flags = [0u16, 1, 2, 3, 1, 3, 4, 7][usize::from(i.u8() % 8)];
                let next = u16::from(i.u8()) % (size as u16).saturating_add(1);
                let _ = mem.write_obj(a, GuestAddress(at));
                let _ = mem.write_obj(len, GuestAddress(at.wrapping_add(8)));
                let _ = mem.write_obj(flags, GuestAddress(at.wrapping_add(12)));
                let _ = mem.write_obj(next, GuestAddress(at.wrapping_add(14)));
            }
            4 => {
                // Bytes at an address, or into the buffer of one of the
                // selected queue's descriptors (a request header).
                let at = if i.u8() & 1 == 0 {
                    addr(&mut i)
                } else {
                    let (desc, _, size) = selected(t, i.u8());
                    let d = desc.wrapping_add(16 * (u64::from(i.u8()) % size));
                    mem.read_obj(GuestAddress(d)).unwrap_or(0)
                };
                let n = usize::from(i.u8() % 32);
                let bytes = i.bytes(n).to_vec();
                let _ = mem.write_slice(&bytes, GuestAddress(at));
            }
            5 | 6 => t.process_queue(usize::from(i.u8()) % (queues + 1)),
            7 => {
                if let Some(h) = host.as_deref_mut() {
                    // Up to 2 KiB: past a frame's bound (MTU 1500) too.
                    let n = usize::from(i.u8()) * 8 + usize::from(i.u8() % 8);
                    h.feed(i.bytes(n));
                    h.drain();
                }
                t.host_ready();
            }
            8 => {
                // The standard initialisation with fuzzed rings: reaches
                // the device's request parser far sooner than register
                // writes one at a time.
                let offered = t_features(t);
                let features = match i.u8() % 4 {
                    0 => u64::from(i.u32()) | u64::from(i.u32()) << 32,
                    _ => offered & (u64::from(i.u32()) | VIRTIO_F_VERSION_1),
                };
                init(t, features, |_| {
                    // Mostly aligned, mostly a power of two: mostly accepted.
                    let mask = if i.u8() % 8 == 0 { 0 } else { 15 };
                    (
                        addr(&mut i) & !mask,
                        addr(&mut i) & !mask,
                        addr(&mut i) & !mask,
                        1 << (i.u8() % 10),
                    )
                });
            }
            9 => {
                // A plausible request on the selected queue, as a driver
                // lays one out: a readable header (a block request's type
                // and sector), data buffers in either direction, and a
                // writable status byte (or a readable last piece); then
                // published.
                let qi = i.u8();
                let (desc, _, size) = selected(t, qi);
                let head = u64::from(i.u8()) % size;
                let n = 1 + u64::from(i.u8() % 4);
                for k in 0..n {
                    let at = desc.wrapping_add(16 * ((head + k) % size));
                    let a = addr(&mut i);
                    let (len, flags) = match k {
                        0 => {
                            let kind = [0u32, 1, 4, 8, 2, i.u32()][usize::from(i.u8() % 6)];
                            let _ = mem.write_obj(kind, GuestAddress(a));
                            let sector = u64::from(i.u8()) | u64::from(i.u8() % 2) << 60;
                            let _ = mem.write_obj(sector, GuestAddress(a.wrapping_add(8)));
                            (16, 0)
                        }
                        // A status byte, or (a transmit chain) the last
                        // readable piece of a frame.
                        k if k + 1 == n => (1, 2 * u16::from(i.u8() % 4 != 0)),
                        // Sectors, and frames about an MTU and past it.
                        _ => (
                            [0u32, 512, 1024, 1536, 4096][usize::from(i.u8() % 5)],
                            2 * u16::from(i.u8() % 2),
                        ),
                    };
                    let next = if k + 1 < n { 1 } else { 0 };
                    let _ = mem.write_obj(a, GuestAddress(at));
                    let _ = mem.write_obj(len, GuestAddress(at.wrapping_add(8)));
                    let _ = mem.write_obj(flags | next, GuestAddress(at.wrapping_add(12)));
                    let _ = mem.write_obj(
                        ((head + k + 1) % size) as u16,
                        GuestAddress(at.wrapping_add(14)),
                    );
                }
                publish(t, mem, qi, head as u16);
            }
            _ => {
                // Make the head index in the next bytes available on the
                // selected queue's ring, wherever the driver put it.
                let qi = i.u8();
                let (_, _, size) = selected(t, qi);
                let head = u16::from(i.u8()) % (size as u16).saturating_add(1);
                publish(t, mem, qi, head);
            }
        }
        if let Some(h) = host.as_deref_mut() {
            h.drain();
        }
    }
}

/// Make `head` the next available entry of queue `qi`'s ring, wherever the
/// driver put it.
fn publish(t: &mut MmioTransport, mem: &GuestMemoryMmap, qi: u8, head: u16) {
    let (_, avail, size) = selected(t, qi);
    let idx: u16 = mem
        .read_obj(GuestAddress(avail.wrapping_add(2)))
        .unwrap_or(0);
    let slot = avail.wrapping_add(4 + 2 * (u64::from(idx) % size));
    let _ = mem.write_obj(head, GuestAddress(slot));
    let _ = mem.write_obj(idx.wrapping_add(1), GuestAddress(avail.wrapping_add(2)));
}

/// Queue `qi` (modulo the count)'s descriptor table, available ring and
/// size (at least 1). The program names the queue: `QueueSel` is
/// write-only, so reading it back would always say queue 0.
fn selected(t: &mut MmioTransport, qi: u8) -> (u64, u64, u64) {
    let q = &t.queues[usize::from(qi) % t.queues.len()];
    (q.desc_table.0, q.avail_ring.0, u64::from(q.size.max(1)))
}

/// Reset, then initialise the device as a driver does (also the device
/// tests' set-up): queue `q` gets the descriptor table, available and used
/// rings and size that `rings(q)` gives.
pub(crate) fn init(
    t: &mut MmioTransport,
    features: u64,
    mut rings: impl FnMut(u32) -> (u64, u64, u64, u16),
) {
    w(t, REG_STATUS, 0);
    w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(t, REG_DRIVER_FEATURES_SEL, 0);
    w(t, REG_DRIVER_FEATURES, features as u32);
    w(t, REG_DRIVER_FEATURES_SEL, 1);
    w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    w(
        t,
        REG_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    for q in 0..t.queues.len() as u32 {
        let (desc, avail, used, size) = rings(q);
        w(t, REG_QUEUE_SEL, q);
        w(t, REG_QUEUE_NUM, u32::from(size));
        w(t, REG_QUEUE_DESC_LOW, desc as u32);
        w(t, REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        w(t, REG_QUEUE_DRIVER_LOW, avail as u32);
        w(t, REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        w(t, REG_QUEUE_DEVICE_LOW, used as u32);
        w(t, REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        w(t, REG_QUEUE_READY, 1);
    }
    w(
        t,
        REG_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
}

/// After the hostile run: a driver that resets the device and submits one
/// well-formed chain on queue `q` (descriptors `descs`: address, length,
/// flags; chained in order) gets it back through the used ring. Returns the
/// used length.
fn served_after_reset(
    t: &mut MmioTransport,
    mem: &GuestMemoryMmap,
    q: u32,
    descs: &[(u64, u32, u16)],
    host: Option<&mut dyn HostEnd>,
) -> u32 {
    let features = t_features(t);
    init(t, features, |i| {
        let o = u64::from(i) * 0x400;
        (GOOD_DESC + o, GOOD_AVAIL + o, GOOD_USED + o, 16)
    });
    assert!(
        t.is_active(),
        "a well-behaved driver could not initialise the device"
    );
    let o = u64::from(q) * 0x400;
    for (n, &(a, len, flags)) in descs.iter().enumerate() {
        let b = GuestAddress(GOOD_DESC + o + 16 * n as u64);
        let next = if n + 1 < descs.len() { 1 } else { 0 };
        mem.write_obj(a, b).unwrap();
        mem.write_obj(len, GuestAddress(b.0 + 8)).unwrap();
        mem.write_obj(flags | next, GuestAddress(b.0 + 12)).unwrap();
        mem.write_obj(n as u16 + 1, GuestAddress(b.0 + 14)).unwrap();
    }
    mem.write_obj(0u16, GuestAddress(GOOD_AVAIL + o + 4))
        .unwrap();
    mem.write_obj(1u16, GuestAddress(GOOD_AVAIL + o + 2))
        .unwrap();
    // A stale used index from the hostile run must not matter.
    mem.write_obj(0u16, GuestAddress(GOOD_USED + o + 2))
        .unwrap();
    t.process_queue(q as usize);
    // What the event loop does while the host end is writable: bytes the
    // hostile run left for the host go out, and the queue moves again.
    if let Some(h) = host {
        for _ in 0..64 {
            h.drain();
            t.host_ready();
        }
    }
    let used: u16 = mem.read_obj(GuestAddress(GOOD_USED + o + 2)).unwrap();
    assert_eq!(used, 1, "the well-formed request was not returned");
    mem.read_obj(GuestAddress(GOOD_USED + o + 8)).unwrap()
}

/// Every feature the device offers, as a well-behaved driver accepts them.
fn t_features(t: &mut MmioTransport) -> u64 {
    w(t, REG_DEVICE_FEATURES_SEL, 0);
    let lo = r(t, REG_DEVICE_FEATURES);
    w(t, REG_DEVICE_FEATURES_SEL, 1);
    let hi = r(t, REG_DEVICE_FEATURES);
    u64::from(lo) | u64::from(hi) << 32
}

const WRITE: u16 = 2;

/// virtio-blk on a 4 KiB disk (`data[0]` bit 0: read-only).
pub fn block(data: &[u8]) {
    let read_only = data.first().is_some_and(|b| b & 1 == 1);
    let disk: File = tempfile::tempfile().expect("a temporary disk");
    let content: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    disk.write_all_at(&content, 0).expect("disk");
    let mem = memory();
    let dev = Block::new(
        disk.try_clone().expect("dup"),
        read_only,
        false,
        "kiln-root",
    )
    .expect("block");
    let mut t = MmioTransport::new(Box::new(dev), mem.clone()).expect("transport");
    run(&mut t, &mem, data.get(1..).unwrap_or_default(), None);
    assert_eq!(
        disk.metadata().expect("stat").len(),
        4096,
        "the disk changed size"
    );
    if read_only {
        let mut now = vec![0u8; 4096];
        disk.read_exact_at(&mut now, 0).expect("read");
        assert!(now == content, "a read-only disk was written");
    }
    // GET_ID after a reset: header, 20-byte id, status.
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&VIRTIO_BLK_T_GET_ID.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(GOOD_DATA)).unwrap();
    let len = served_after_reset(
        &mut t,
        &mem,
        0,
        &[
            (GOOD_DATA, 16, 0),
            (GOOD_DATA + 0x100, 20, WRITE),
            (GOOD_DATA + 0x200, 1, WRITE),
        ],
        None,
    );
    let status: u8 = mem.read_obj(GuestAddress(GOOD_DATA + 0x200)).unwrap();
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 21));
}

/// virtio-rng.
pub fn rng(data: &[u8]) {
    let mem = memory();
    let mut t = MmioTransport::new(Box::new(Rng), mem.clone()).expect("transport");
    run(&mut t, &mem, data, None);
    let len = served_after_reset(&mut t, &mem, 0, &[(GOOD_DATA, 64, WRITE)], None);
    assert_eq!(len, 64);
}

/// virtio-console (multiport), its host end fed and drained as the fuzzer
/// says.
pub fn console(data: &[u8]) {
    let mem = memory();
    let (dev_end, mut host) = UnixStream::pair().expect("socketpair");
    dev_end.set_nonblocking(true).expect("nonblocking");
    host.set_nonblocking(true).expect("nonblocking");
    let dev = Console::new("org.kiln.agent.0", dev_end);
    let mut t = MmioTransport::new(Box::new(dev), mem.clone()).expect("transport");
    run(&mut t, &mem, data, Some(&mut host));
    // Transmit queue (1): the device takes the bytes and uses the chain.
    mem.write_slice(b"hello", GuestAddress(GOOD_DATA)).unwrap();
    let len = served_after_reset(&mut t, &mem, 1, &[(GOOD_DATA, 5, 0)], Some(&mut host));
    assert_eq!(len, 0);
}

/// virtio-net over a TAP's stand-in (a datagram pair: one frame per read;
/// `data[0]` bit 0 clear) or passt's length-prefixed stream (bit 0 set),
/// its host end sending hostile frames and draining what the guest sends.
/// The driver program works both queues; afterwards a reset driver's
/// well-formed frame is still transmitted.
pub fn net(data: &[u8]) {
    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let stream = data.first().is_some_and(|b| b & 1 == 1);
    let program = data.get(1..).unwrap_or_default();
    let mem = memory();
    let mut frame = vec![0u8; NET_HDR_LEN + 60];
    frame[NET_HDR_LEN..NET_HDR_LEN + 6].copy_from_slice(&[0xff; 6]);
    frame[NET_HDR_LEN + 6..NET_HDR_LEN + 12].copy_from_slice(&MAC);
    frame[NET_HDR_LEN + 12..NET_HDR_LEN + 14].copy_from_slice(&0x0800u16.to_be_bytes());
    let good = [(GOOD_DATA, frame.len() as u32, 0)];
    let len = if stream {
        let (dev_end, mut host) = UnixStream::pair().expect("socketpair");
        host.set_nonblocking(true).expect("nonblocking");
        let dev = Net::new(NetBackend::Stream(dev_end), MAC, 1500).expect("net");
        let mut t = MmioTransport::new(Box::new(dev), mem.clone()).expect("transport");
        run(&mut t, &mem, program, Some(&mut host));
        mem.write_slice(&frame, GuestAddress(GOOD_DATA)).unwrap();
        served_after_reset(&mut t, &mem, 1, &good, Some(&mut host))
    } else {
        let (dev_end, mut host) = UnixDatagram::pair().expect("socketpair");
        host.set_nonblocking(true).expect("nonblocking");
        let fd: OwnedFd = dev_end.into();
        let dev = Net::new(NetBackend::Tap(File::from(fd)), MAC, 1500).expect("net");
        let mut t = MmioTransport::new(Box::new(dev), mem.clone()).expect("transport");
        run(&mut t, &mem, program, Some(&mut host));
        mem.write_slice(&frame, GuestAddress(GOOD_DATA)).unwrap();
        served_after_reset(&mut t, &mem, 1, &good, Some(&mut host))
    };
    assert_eq!(len, 0, "a transmitted chain is used with length 0");
}

/// The descriptor walker alone, on guest memory filled from `data`: every
/// chain it returns lies inside guest memory and is no longer than the queue.
pub fn queue(data: &[u8]) {
    use super::queue::Queue;
    let mem = memory();
    let mut i = Input(data);
    let mut q = Queue::new(256);
    q.size = 1 << (i.u8() % 9);
    q.desc_table = GuestAddress(0);
    q.avail_ring = GuestAddress(0x1000 * u64::from(i.u8() % 8 + 1));
    q.used_ring = GuestAddress(0x9000);
    q.ready = true;
    let _ = mem.write_slice(i.bytes(0x1000), GuestAddress(0));
    if i.u8() & 1 == 1 {
        // Mostly plausible descriptors: buffers near memory, short, and
        // `next` around the queue size.
        for n in 0..u64::from(q.size) {
            let a: u64 = mem.read_obj(GuestAddress(16 * n)).unwrap();
            let l: u32 = mem.read_obj(GuestAddress(16 * n + 8)).unwrap();
            let next: u16 = mem.read_obj(GuestAddress(16 * n + 14)).unwrap();
            mem.write_obj(a & 0x1_ffff, GuestAddress(16 * n)).unwrap();
            mem.write_obj(l & 0x1fff, GuestAddress(16 * n + 8)).unwrap();
            mem.write_obj(next % (2 * q.size), GuestAddress(16 * n + 14))
                .unwrap();
        }
    }
    let _ = mem.write_slice(i.bytes(0x1000), q.avail_ring);
    assert!(q.is_valid(&mem));
    // Each pop consumes an entry: at most `size` chains before it is empty.
    for _ in 0..=q.size {
        match q.pop(&mem) {
            Ok(Some(c)) => {
                if let Ok(d) = c.descriptors {
                    assert!(!d.is_empty() && d.len() <= usize::from(q.size));
                    for x in d {
                        assert!(mem.check_range(x.addr, x.len as usize));
                    }
                }
                q.add_used(&mem, c.head, 0)
                    .expect("used ring inside memory");
            }
            Ok(None) | Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use kiln_testkit::fuzz::config;

    use super::*;

    fn program() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..2048)
    }

    proptest! {
        #![proptest_config(config(128))]

        #[test]
        fn block_survives_any_driver(data in program()) {
            block(&data);
        }

        #[test]
        fn rng_survives_any_driver(data in program()) {
            rng(&data);
        }

        #[test]
        fn console_survives_any_driver(data in program()) {
            console(&data);
        }

        #[test]
        fn net_survives_any_driver_and_any_host(data in program()) {
            net(&data);
        }

        #[test]
        fn the_walker_survives_any_ring(data in proptest::collection::vec(any::<u8>(), 0..8192)) {
            queue(&data);
        }
    }
}
