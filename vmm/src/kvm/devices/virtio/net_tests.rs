//! virtio-net against socketpairs: a datagram pair stands in for the TAP
//! (one header and frame per read and write), a stream pair for passt.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::kvm::devices::virtio::mmio::tests::init;
use crate::kvm::devices::virtio::mmio::{
    MmioTransport, REG_CONFIG, REG_DEVICE_FEATURES, REG_DEVICE_ID, VIRTIO_F_VERSION_1,
};
use crate::kvm::devices::virtio::queue::mock::{AVAIL, DESC, NEXT, USED, WRITE};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
const RXQ: u64 = 0;
const TXQ: u64 = 1;

fn q(i: u64) -> u64 {
    i * 0x10000
}

/// Descriptor `i` of queue `qi` (rings laid out by `mmio::tests::init`).
fn desc(mem: &GuestMemoryMmap, qi: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let b = GuestAddress(DESC + q(qi) + 16 * u64::from(i));
    mem.write_obj(addr, b).unwrap();
    mem.write_obj(len, b.unchecked_add(8)).unwrap();
    mem.write_obj(flags, b.unchecked_add(12)).unwrap();
    mem.write_obj(next, b.unchecked_add(14)).unwrap();
}

fn publish(mem: &GuestMemoryMmap, qi: u64, head: u16) {
    let a = AVAIL + q(qi);
    let idx: u16 = mem.read_obj(GuestAddress(a + 2)).unwrap();
    mem.write_obj(head, GuestAddress(a + 4 + 2 * u64::from(idx % 16)))
        .unwrap();
    mem.write_obj(idx.wrapping_add(1), GuestAddress(a + 2))
        .unwrap();
}

fn used(mem: &GuestMemoryMmap, qi: u64) -> u16 {
    mem.read_obj(GuestAddress(USED + q(qi) + 2)).unwrap()
}

/// (head, len) of used element `i` of queue `qi`.
fn used_elem(mem: &GuestMemoryMmap, qi: u64, i: u16) -> (u32, u32) {
    let b = GuestAddress(USED + q(qi) + 4 + 8 * u64::from(i % 16));
    (
        mem.read_obj(b).unwrap(),
        mem.read_obj(b.unchecked_add(4)).unwrap(),
    )
}

/// An Ethernet frame of `len` bytes whose payload is `tag`.
fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..6].copy_from_slice(&MAC);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f
}

/// Guest transmit buffer at slot `i`: header and frame in one descriptor.
const TX_BUF: u64 = 0x40000;
fn send(mem: &GuestMemoryMmap, i: u16, f: &[u8]) {
    send_with(mem, i, [0; NET_HDR_LEN], f)
}

/// [`send`] with a header (a frame over 10 KiB runs into later slots).
fn send_with(mem: &GuestMemoryMmap, i: u16, hdr: [u8; NET_HDR_LEN], f: &[u8]) {
    let addr = TX_BUF + u64::from(i) * 0x2800;
    let mut b = hdr.to_vec();
    b.extend_from_slice(f);
    mem.write_slice(&b, GuestAddress(addr)).unwrap();
    desc(mem, TXQ, i, addr, b.len() as u32, 0, 0);
    publish(mem, TXQ, i);
}

/// Guest receive buffer at slot `i`, `len` bytes.
const RX_BUF: u64 = 0x80000;
fn post_rx(mem: &GuestMemoryMmap, i: u16, len: u32) {
    desc(mem, RXQ, i, RX_BUF + u64::from(i) * 0x2800, len, WRITE, 0);
    publish(mem, RXQ, i);
}

/// The frame the device wrote into receive slot `i` (used element `u`).
fn received(mem: &GuestMemoryMmap, u: u16) -> Vec<u8> {
    let (head, len) = used_elem(mem, RXQ, u);
    let mut b = vec![0u8; len as usize];
    mem.read_slice(&mut b, GuestAddress(RX_BUF + u64::from(head) * 0x2800))
        .unwrap();
    assert!(
        b.len() >= NET_HDR_LEN,
        "a used receive buffer holds a header"
    );
    assert_eq!(&b[..10], &[0; 10], "no offloads in the header");
    assert_eq!(&b[10..12], &1u16.to_le_bytes(), "num_buffers is 1");
    b.split_off(NET_HDR_LEN)
}

fn memory() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap())
}

/// The host's end of a TAP stand-in: every datagram is a 12-byte
/// `virtio_net_hdr_v1` and a frame, as on kiln's TAP devices.
struct TapHost(UnixDatagram);

impl TapHost {
    /// A frame with an empty header.
    fn send(&self, f: &[u8]) -> std::io::Result<usize> {
        self.send_with([0; NET_HDR_LEN], f)
    }

    fn send_with(&self, hdr: [u8; NET_HDR_LEN], f: &[u8]) -> std::io::Result<usize> {
        self.0.send(&[&hdr[..], f].concat())
    }

    /// One datagram's header and frame.
    fn recv_with(&self) -> std::io::Result<([u8; NET_HDR_LEN], Vec<u8>)> {
        let mut b = vec![0u8; NET_HDR_LEN + MAX_GSO_FRAME + 1];
        let n = self.0.recv(&mut b)?;
        assert!(n >= NET_HDR_LEN, "a datagram of {n} bytes has no header");
        b.truncate(n);
        let f = b.split_off(NET_HDR_LEN);
        Ok((b.try_into().unwrap(), f))
    }

    /// One frame, into `b`; its header must be empty.
    fn recv(&self, b: &mut [u8]) -> std::io::Result<usize> {
        let (hdr, f) = self.recv_with()?;
        assert_eq!(hdr, [0; NET_HDR_LEN], "an empty header");
        b[..f.len()].copy_from_slice(&f);
        Ok(f.len())
    }

    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        self.0.set_nonblocking(on)
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.0.set_read_timeout(t)
    }
}

/// A device over a datagram pair (the TAP's stand-in); the other end is
/// returned, blocking with a timeout so a missing frame fails the test.
/// The driver takes no offloads.
fn tap_device(mtu: u16) -> (Arc<GuestMemoryMmap>, MmioTransport, TapHost) {
    tap_device_with(mtu, 0)
}

/// [`tap_device`] whose driver takes `offloads` too.
fn tap_device_with(mtu: u16, offloads: u64) -> (Arc<GuestMemoryMmap>, MmioTransport, TapHost) {
    let mem = memory();
    let (a, b) = UnixDatagram::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let fd: OwnedFd = a.into();
    let net = Net::new(NetBackend::Tap(File::from(fd)), MAC, mtu).unwrap();
    let mut t = MmioTransport::new(Box::new(net), mem.clone()).unwrap();
    init(
        &mut t,
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU | offloads,
    );
    (mem, t, TapHost(b))
}

fn stream_device() -> (Arc<GuestMemoryMmap>, MmioTransport, UnixStream) {
    stream_device_with(None, 1500)
}

/// [`stream_device`] with `mtu`, the device's end with send buffer
/// `sndbuf` (the kernel's minimum if smaller).
fn stream_device_with(
    sndbuf: Option<i32>,
    mtu: u16,
) -> (Arc<GuestMemoryMmap>, MmioTransport, UnixStream) {
    let mem = memory();
    let (a, b) = UnixStream::pair().unwrap();
    if let Some(size) = sndbuf {
        // SAFETY: setsockopt(2) on a socket we own, reading one c_int that
        // lives across the call.
        let rc = unsafe {
            libc::setsockopt(
                a.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let net = Net::new(NetBackend::Stream(a), MAC, mtu).unwrap();
    let mut t = MmioTransport::new(Box::new(net), mem.clone()).unwrap();
    init(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
    (mem, t, b)
}

fn recv_dgram(host: &TapHost) -> Vec<u8> {
    let mut b = vec![0u8; MAX_GSO_FRAME];
    let n = host.recv(&mut b).unwrap();
    b.truncate(n);
    b
}

fn nothing_waiting(host: &TapHost) -> bool {
    host.set_nonblocking(true).unwrap();
    let r = host.recv_with();
    host.set_nonblocking(false).unwrap();
    matches!(r, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

#[test]
fn identity_mac_and_mtu_in_config_space() {
    let (_mem, mut t, _host) = tap_device(1400);
    let mut b = [0u8; 4];
    t.read(REG_DEVICE_ID, &mut b);
    assert_eq!(u32::from_le_bytes(b), VIRTIO_ID_NET);
    t.read(REG_DEVICE_FEATURES, &mut b);
    assert_eq!(
        u64::from(u32::from_le_bytes(b)),
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU | TAP_OFFLOADS,
        "a TAP offers checksum and segmentation offloads"
    );
    let (_mem, mut s, _host) = stream_device();
    s.read(REG_DEVICE_FEATURES, &mut b);
    assert_eq!(
        u64::from(u32::from_le_bytes(b)),
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU,
        "a stream offers none"
    );
    let mut mac = [0u8; 6];
    t.read(REG_CONFIG, &mut mac);
    assert_eq!(mac, MAC);
    let mut mtu = [0u8; 2];
    t.read(REG_CONFIG + 10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 1400);
    // Past the end reads zeros, not a panic.
    let mut far = [0xffu8; 8];
    t.read(REG_CONFIG + 0xff0, &mut far);
    assert_eq!(far, [0; 8]);
}

#[test]
fn tap_frames_flow_both_ways() {
    let (mem, mut t, host) = tap_device(1500);
    // Guest → host: the frame arrives whole behind its (empty) header.
    let out = frame(1514, 7);
    send(&mem, 0, &out);
    send(&mem, 1, &frame(60, 8));
    t.process_queue(TXQ as usize);
    assert_eq!(used(&mem, TXQ), 2);
    assert_eq!(recv_dgram(&host), out);
    assert_eq!(recv_dgram(&host), frame(60, 8));

    // Host → guest: a buffer posted first, then the frame.
    post_rx(&mem, 0, 2048);
    t.process_queue(RXQ as usize);
    assert_eq!(used(&mem, RXQ), 0, "nothing to receive yet");
    let inbound = frame(1514, 9);
    host.send(&inbound).unwrap();
    t.host_ready();
    assert_eq!(used(&mem, RXQ), 1);
    assert_eq!(used_elem(&mem, RXQ, 0).1 as usize, NET_HDR_LEN + 1514);
    assert_eq!(received(&mem, 0), inbound);
}

/// A `virtio_net_hdr_v1` (without `num_buffers`).
fn hdr(flags: u8, gso: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&54u16.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

/// With offloads taken, a guest's 30000-byte TCP segment without its
/// checksum reaches the TAP with its header (the host's stack cuts it),
/// and one from the host reaches the guest so; headers asking for what
/// was not offered, or pointing past their frame, are dropped.
#[test]
fn offloads_reach_the_tap_and_the_guest_with_their_headers() {
    let (mem, mut t, host) = tap_device_with(1500, TAP_OFFLOADS);
    let big = frame(30000, 1);
    let tso = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16);
    send_with(&mem, 0, tso, &big);
    t.process_queue(TXQ as usize);
    assert_eq!(host.recv_with().unwrap(), (tso, big.clone()));

    let refused = [
        hdr(0, 3, 1448, 0, 0), // UDP segmentation: not offered
        hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4 | 0x80, 1448, 34, 16), // ECN: not offered
        hdr(HDR_F_DATA_VALID, GSO_NONE, 0, 0, 0), // a receive-only flag
        hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 90, 10), // checksum past a 100-byte frame
        hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 4, 16), // checksum inside the Ethernet header
        hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 0, 34, 16), // segments of 0 bytes
        hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 1, 34, 16), // 1-byte segments: a packet storm
        hdr(HDR_F_NEEDS_CSUM, GSO_TCPV6, 1501, 54, 16), // segments past the MTU
        hdr(0, GSO_TCPV4, 1448, 0, 0), // segmentation without a checksum
    ];
    for (i, h) in refused.iter().enumerate() {
        send_with(&mem, i as u16, *h, &frame(100, 2));
    }
    // Past the bound without segmentation: dropped as before.
    send_with(&mem, 9, [0; NET_HDR_LEN], &frame(1519, 3));
    send_with(
        &mem,
        10,
        hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 34, 16),
        &frame(100, 4),
    );
    t.process_queue(TXQ as usize);
    assert_eq!(used(&mem, TXQ), 12, "every buffer is returned");
    assert_eq!(
        host.recv_with().unwrap(),
        (hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 34, 16), frame(100, 4)),
        "only the good frame"
    );
    assert!(nothing_waiting(&host));

    // Host → guest: the segment and its header as the TAP gave them.
    desc(&mem, RXQ, 0, 0xa0000, 0x10000, WRITE, 0);
    publish(&mem, RXQ, 0);
    let down = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16);
    host.send_with(down, &big).unwrap();
    t.host_ready();
    assert_eq!(used_elem(&mem, RXQ, 0), (0, (NET_HDR_LEN + 30000) as u32));
    let mut got = vec![0u8; NET_HDR_LEN + 30000];
    mem.read_slice(&mut got, GuestAddress(0xa0000)).unwrap();
    assert_eq!(got[..10], down[..10]);
    assert_eq!(got[10..12], 1u16.to_le_bytes(), "num_buffers is 1");
    assert_eq!(got[NET_HDR_LEN..], big[..]);
}

/// A driver that took no offloads: a header asking for one is dropped on
/// the way out, a host frame needing one on the way in, and the
/// checksum-checked flag it did not ask for is cleared.
#[test]
fn offloads_not_taken_are_never_used() {
    let (mem, mut t, host) = tap_device(1500);
    send_with(
        &mem,
        0,
        hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 34, 16),
        &frame(100, 1),
    );
    t.process_queue(TXQ as usize);
    send_with(
        &mem,
        1,
        hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16),
        &frame(3000, 2),
    );
    t.process_queue(TXQ as usize);
    send(&mem, 2, &frame(100, 3));
    t.process_queue(TXQ as usize);
    assert_eq!(used(&mem, TXQ), 3);
    assert_eq!(recv_dgram(&host), frame(100, 3));
    assert!(nothing_waiting(&host));

    post_rx(&mem, 0, 0x2800);
    host.send_with(
        hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16),
        &frame(3000, 4),
    )
    .unwrap();
    host.send_with(hdr(HDR_F_NEEDS_CSUM, GSO_NONE, 0, 34, 16), &frame(100, 5))
        .unwrap();
    host.send_with(hdr(HDR_F_DATA_VALID, GSO_NONE, 0, 0, 0), &frame(100, 6))
        .unwrap();
    t.host_ready();
    assert_eq!(used(&mem, RXQ), 1);
    assert_eq!(
        received(&mem, 0),
        frame(100, 6),
        "flags cleared, frame kept"
    );
}

#[test]
fn a_receive_buffer_split_over_descriptors_is_filled_in_order() {
    let (mem, mut t, host) = tap_device(1500);
    // Header alone, then the frame in two parts (Linux's big-packet shape).
    desc(&mem, RXQ, 0, 0x90000, NET_HDR_LEN as u32, WRITE | NEXT, 1);
    desc(&mem, RXQ, 1, 0x91000, 100, WRITE | NEXT, 2);
    desc(&mem, RXQ, 2, 0x92000, 2000, WRITE, 0);
    publish(&mem, RXQ, 0);
    let inbound = frame(600, 3);
    host.send(&inbound).unwrap();
    t.host_ready();
    assert_eq!(used(&mem, RXQ), 1);
    assert_eq!(used_elem(&mem, RXQ, 0), (0, (NET_HDR_LEN + 600) as u32));
    let mut got = vec![0u8; 600];
    mem.read_slice(&mut got[..100], GuestAddress(0x91000))
        .unwrap();
    mem.read_slice(&mut got[100..], GuestAddress(0x92000))
        .unwrap();
    assert_eq!(got, inbound);
}

#[test]
fn oversize_and_short_frames_are_dropped_in_both_directions() {
    let (mem, mut t, host) = tap_device(1500);
    // Guest → host: too long (MTU + headers + 1), shorter than an Ethernet
    // header, a chain too short for the virtio header; then a good one.
    send(&mem, 0, &frame(1500 + 18 + 1, 1));
    send(&mem, 1, &[0u8; 10]);
    desc(&mem, TXQ, 2, TX_BUF + 2 * 0x2800, 4, 0, 0);
    publish(&mem, TXQ, 2);
    send(&mem, 3, &frame(1518, 4));
    t.process_queue(TXQ as usize);
    assert_eq!(used(&mem, TXQ), 4, "every buffer is returned");
    assert_eq!(recv_dgram(&host), frame(1518, 4), "only the good frame");
    assert!(nothing_waiting(&host));

    // Host → guest: too long and too short are dropped; the good one after
    // them takes the first buffer.
    post_rx(&mem, 0, 0x2800);
    post_rx(&mem, 1, 0x2800);
    host.send(&frame(1519, 5)).unwrap();
    host.send(&[1u8; 6]).unwrap();
    host.send(&frame(100, 6)).unwrap();
    t.host_ready();
    assert_eq!(used(&mem, RXQ), 1);
    assert_eq!(received(&mem, 0), frame(100, 6));
}

#[test]
fn frames_wait_in_order_for_receive_buffers() {
    let (mem, mut t, host) = tap_device(1500);
    for tag in 1..=3 {
        host.send(&frame(200, tag)).unwrap();
    }
    t.host_ready();
    assert_eq!(used(&mem, RXQ), 0, "no buffer: nothing used, nothing lost");
    post_rx(&mem, 0, 2048);
    t.process_queue(RXQ as usize);
    assert_eq!(used(&mem, RXQ), 1);
    assert_eq!(received(&mem, 0), frame(200, 1));
    // One more arrives while the guest has no buffer; the order holds.
    host.send(&frame(200, 4)).unwrap();
    t.host_ready();
    for i in 1..4u16 {
        post_rx(&mem, i, 2048);
    }
    t.process_queue(RXQ as usize);
    assert_eq!(used(&mem, RXQ), 4);
    for (u, tag) in (1..4u16).zip(2..=4u8) {
        assert_eq!(received(&mem, u), frame(200, tag), "frame {tag} in order");
    }
}

#[test]
fn a_guest_that_never_reads_holds_a_bounded_backlog() {
    let (mem, mut t, host) = tap_device(1500);
    host.set_nonblocking(true).unwrap();
    let mut sent = 0;
    // More than the device holds; the socket's own buffer takes the rest
    // or refuses it (as a TAP's queue drops).
    for i in 0..(RX_PENDING_FRAMES + 200) {
        if host.send(&frame(64, i as u8)).is_ok() {
            sent += 1;
        }
        t.host_ready();
    }
    t.host_ready();
    assert!(
        sent > RX_PENDING_FRAMES,
        "the test sent more than the bound"
    );
    assert!(
        !t.host_interest().read,
        "a full backlog stops reading the backend"
    );
    assert_eq!(used(&mem, RXQ), 0);
    // The guest reads at last: the oldest frames come first.
    post_rx(&mem, 0, 2048);
    t.process_queue(RXQ as usize);
    assert_eq!(received(&mem, 0), frame(64, 0));
    assert!(t.host_interest().read, "room again: the backend is read");
}

#[test]
fn hostile_chains_are_returned_without_panics() {
    let (mem, mut t, host) = tap_device(1500);
    // Transmit: outside memory, a loop, indirect, a write-only buffer.
    desc(&mem, TXQ, 0, 0xfff_0000, 100, 0, 0);
    desc(&mem, TXQ, 1, TX_BUF, 100, NEXT, 2);
    desc(&mem, TXQ, 2, TX_BUF, 100, NEXT, 1);
    desc(&mem, TXQ, 3, TX_BUF, 100, 4, 0);
    desc(&mem, TXQ, 4, TX_BUF, 100, WRITE, 0);
    // Buffers that are each in memory but sum past any frame (640 KiB):
    // dropped before anything is allocated for them.
    for i in 5..15u16 {
        desc(&mem, TXQ, i, 0, 0x10000, NEXT, i + 1);
    }
    desc(&mem, TXQ, 15, TX_BUF, 16, 0, 0);
    for h in [0, 1, 3, 4, 5] {
        publish(&mem, TXQ, h);
    }
    t.process_queue(TXQ as usize);
    assert_eq!(used(&mem, TXQ), 5);
    assert!(nothing_waiting(&host), "no hostile chain reached the host");

    // Receive: a buffer outside memory takes no frame; a too-small one
    // loses the frame it was next in line for; the next frame lands.
    desc(&mem, RXQ, 0, 0xfff_0000, 2048, WRITE, 0);
    publish(&mem, RXQ, 0);
    post_rx(&mem, 1, 40);
    post_rx(&mem, 2, 2048);
    host.send(&frame(300, 1)).unwrap();
    host.send(&frame(300, 2)).unwrap();
    t.host_ready();
    assert_eq!(used(&mem, RXQ), 3);
    assert_eq!(used_elem(&mem, RXQ, 0), (0, 0));
    assert_eq!(used_elem(&mem, RXQ, 1), (1, 0));
    assert_eq!(received(&mem, 2), frame(300, 2));
    // A read-only buffer is not written either.
    desc(&mem, RXQ, 3, RX_BUF + 3 * 0x2800, 2048, 0, 0);
    publish(&mem, RXQ, 3);
    host.send(&frame(300, 3)).unwrap();
    t.host_ready();
    assert_eq!(used(&mem, RXQ), 4);
    assert_eq!(used_elem(&mem, RXQ, 3), (3, 0));
}

#[test]
fn a_full_backend_holds_transmit_until_it_drains() {
    let (mem, mut t, mut host) = stream_device();
    let mut count = 0u16;
    // Transmit until the device holds frames it cannot write.
    while !t.host_interest().write {
        send(&mem, count % 16, &frame(1514, count as u8));
        t.process_queue(TXQ as usize);
        count += 1;
        assert!(count < 2000, "the socket never filled");
    }
    // The host reads everything: every frame arrives whole and in order.
    host.set_nonblocking(false).unwrap();
    let mut next = 0u16;
    while next < count {
        t.host_ready();
        let mut len = [0u8; 4];
        host.read_exact(&mut len).unwrap();
        let n = u32::from_be_bytes(len) as usize;
        assert_eq!(n, 1514);
        let mut f = vec![0u8; n];
        host.read_exact(&mut f).unwrap();
        assert_eq!(f, frame(1514, next as u8), "frame {next}");
        next += 1;
    }
    assert!(!t.host_interest().write);
}

#[test]
fn stream_frames_flow_both_ways_across_partial_reads() {
    let (mem, mut t, mut host) = stream_device();
    let out = frame(1000, 1);
    send(&mem, 0, &out);
    t.process_queue(TXQ as usize);
    let mut len = [0u8; 4];
    host.read_exact(&mut len).unwrap();
    assert_eq!(u32::from_be_bytes(len), 1000);
    let mut got = vec![0u8; 1000];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, out);

    // Host → guest, cut mid-prefix and mid-frame; an oversize length in
    // between is skipped without buffering it, a short one too.
    for i in 0..4 {
        post_rx(&mem, i, 0x2800);
    }
    let a = frame(500, 2);
    let b = frame(700, 3);
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&(a.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&a);
    bytes.extend_from_slice(&5000u32.to_be_bytes());
    bytes.extend_from_slice(&[0xee; 5000]);
    bytes.extend_from_slice(&3u32.to_be_bytes());
    bytes.extend_from_slice(&[0xdd; 3]);
    bytes.extend_from_slice(&(b.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&b);
    for piece in [
        &bytes[..2],
        &bytes[2..300],
        &bytes[300..2000],
        &bytes[2000..],
    ] {
        host.write_all(piece).unwrap();
        t.host_ready();
    }
    assert_eq!(used(&mem, RXQ), 2);
    assert_eq!(received(&mem, 0), a);
    assert_eq!(received(&mem, 1), b);
}

#[test]
fn a_stream_that_floods_a_guest_that_never_reads_is_not_buffered_without_bound() {
    let (mem, mut t, host) = stream_device();
    // Tiny frames, many per read: the device keeps at most its bound.
    let total = RX_PENDING_FRAMES * 4;
    let mut bytes = Vec::new();
    for i in 0..total {
        bytes.extend_from_slice(&60u32.to_be_bytes());
        bytes.extend_from_slice(&frame(60, i as u8));
    }
    let writer = {
        let mut h = host.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = h.write_all(&bytes);
        })
    };
    for _ in 0..50 {
        t.host_ready();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(!t.host_interest().read, "a full backlog stops reading");
    // Drain everything, the queue's 16 entries at a time: order kept,
    // nothing lost.
    let (mut next, mut posted) = (0usize, 0u16);
    for _ in 0..10_000 {
        if next == total {
            break;
        }
        while posted.wrapping_sub(used(&mem, RXQ)) < 16 {
            post_rx(&mem, posted % 16, 2048);
            posted = posted.wrapping_add(1);
        }
        t.process_queue(RXQ as usize);
        t.host_ready();
        while (next as u16) != used(&mem, RXQ) {
            assert_eq!(
                received(&mem, next as u16),
                frame(60, next as u8),
                "frame {next}"
            );
            next += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(next, total, "every frame reached the guest");
    writer.join().unwrap();
    drop(host);
}

#[test]
fn a_closed_backend_stops_without_stalling_the_guest() {
    let (mem, mut t, host) = stream_device();
    drop(host);
    t.host_ready();
    assert_eq!(t.host_interest(), HostInterest::default());
    send(&mem, 0, &frame(100, 1));
    t.process_queue(TXQ as usize);
    assert_eq!(used(&mem, TXQ), 1, "the guest's buffer comes back");
}

#[test]
fn frames_sent_before_the_backend_closed_still_reach_the_guest() {
    let (mem, mut t, mut host) = stream_device();
    let f = frame(80, 9);
    host.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
    host.write_all(&f).unwrap();
    drop(host);
    t.host_ready();
    assert_eq!(t.host_interest(), HostInterest::default(), "closed");
    post_rx(&mem, 0, 2048);
    t.process_queue(RXQ as usize);
    assert_eq!(used(&mem, RXQ), 1);
    assert_eq!(received(&mem, 0), f);
}

#[test]
fn a_flood_of_tiny_frames_into_a_backend_that_never_reads_stops_at_the_bound() {
    let (mem, mut t, host) = tap_device(1500);
    let (mut published, mut taken) = (0u16, 0u16);
    loop {
        // The guest keeps its ring full of 60-byte frames.
        while published.wrapping_sub(used(&mem, TXQ)) < 16 {
            send(&mem, published % 16, &frame(60, published as u8));
            published += 1;
        }
        t.process_queue(TXQ as usize);
        let u = used(&mem, TXQ);
        if u == taken {
            break;
        }
        taken = u;
        assert!(published < 20_000, "the device never stopped taking frames");
    }
    // What it took: what the backend's queue holds plus its own bound.
    assert!(t.host_interest().write, "it waits for the backend");
    let mut got = 0u16;
    host.set_nonblocking(true).unwrap();
    let mut b = [0u8; 128];
    loop {
        match host.recv(&mut b) {
            Ok(n) => {
                assert_eq!(&b[..n], &frame(60, got as u8)[..], "frame {got} in order");
                got += 1;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !t.host_interest().write {
                    break;
                }
                t.host_ready();
            }
            Err(e) => panic!("{e}"),
        }
    }
    // The chains still in the ring went as soon as there was room.
    assert_eq!(got, published, "every frame reached the backend, once");
    let backend_queue = usize::from(taken) - TX_PENDING_FRAMES;
    assert!(
        usize::from(taken) > TX_PENDING_FRAMES && backend_queue < 4096,
        "the device held at most its bound ({taken} taken)"
    );
}

#[test]
fn a_guest_that_keeps_its_transmit_ring_full_does_not_hold_the_event_loop() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    let (mem, mut t, host) = tap_device(1500);
    // The host takes every frame at once, so the backend never fills.
    let received = Arc::new(AtomicUsize::new(0));
    host.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let reader = {
        let received = received.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 2048];
            while host.recv(&mut b).is_ok() {
                received.fetch_add(1, SeqCst);
            }
        })
    };
    // The guest's vCPU, running beside the event loop: it refills every
    // slot the device returns, with a good tiny frame or (every other
    // one) a chain whose head is out of range.
    let stop = Arc::new(AtomicBool::new(false));
    let (good, published) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let guest = {
        let (mem, stop, good, published) =
            (mem.clone(), stop.clone(), good.clone(), published.clone());
        std::thread::spawn(move || {
            let mut n = 0u16;
            while !stop.load(SeqCst) {
                if n.wrapping_sub(used(&mem, TXQ)) < 16 {
                    if n.is_multiple_of(2) {
                        send(&mem, n % 16, &frame(60, n as u8));
                        good.fetch_add(1, SeqCst);
                    } else {
                        publish(&mem, TXQ, 0xfff0);
                    }
                    n = n.wrapping_add(1);
                    published.fetch_add(1, SeqCst);
                } else {
                    std::hint::spin_loop();
                }
            }
        })
    };
    while published.load(SeqCst) < 16 {
        std::thread::yield_now();
    }
    // Wake-ups (one per notification): each returns after at most its
    // budget even while the guest never lets the ring run empty, and then
    // asks to be woken again. The guest thread may fall behind (a loaded
    // host), emptying the ring before the budget: then the device is done
    // and rightly asks nothing; so go on until a wake-up ran out of budget.
    let t0 = std::time::Instant::now();
    let mut out_of_budget = false;
    while !out_of_budget && t0.elapsed() < Duration::from_secs(60) {
        let before = used(&mem, TXQ);
        t.process_queue(TXQ as usize);
        let taken = usize::from(used(&mem, TXQ).wrapping_sub(before));
        assert!(
            taken <= TX_BUDGET,
            "one wake-up took {taken} chains, budget {TX_BUDGET}"
        );
        out_of_budget = t.host_interest().write;
    }
    assert!(out_of_budget, "the guest thread never kept the ring full");
    stop.store(true, SeqCst);
    guest.join().unwrap();
    // The loop comes back (the backend is writable) until the ring is
    // empty: every good frame reaches the host once, nothing else does.
    for _ in 0..1000 {
        if !t.host_interest().write {
            break;
        }
        t.host_ready();
    }
    assert!(
        !t.host_interest().write,
        "the device stops asking once done"
    );
    assert_eq!(
        usize::from(used(&mem, TXQ)),
        published.load(SeqCst) % 65536,
        "every chain returned"
    );
    reader.join().unwrap();
    assert_eq!(received.load(SeqCst), good.load(SeqCst));
}

/// Frame `i` of the tiny-buffer tests: every length from 60 to `max`
/// comes up, so writes and reads split frames and prefixes everywhere.
fn odd_frame(i: usize, max: usize) -> Vec<u8> {
    frame(60 + (i * 397) % (max - 59), i as u8)
}

/// The classic stream bug (issue 17's short upload): a write the socket
/// takes only part of, or refuses (EAGAIN), must neither drop nor
/// half-send a length-prefixed frame, or every later frame is read at the
/// wrong offset. With a send buffer at the kernel's minimum (a Unix
/// socket then takes at most ~2 KiB per write, so the 9000-byte MTU's
/// frames are written in parts) and a host that reads a few bytes at a
/// time, 600 frames of every size arrive whole, in order, and exactly once;
/// the device held frames back meanwhile (refused writes did happen).
#[test]
fn a_stream_with_a_tiny_send_buffer_keeps_every_frame_whole_and_in_order() {
    const FRAMES: usize = 600;
    const MAX: usize = 9000 + ETH_HLEN + VLAN_HLEN;
    let (mem, mut t, mut host) = stream_device_with(Some(1), 9000);
    host.set_nonblocking(true).unwrap();
    let (mut sent, mut got, mut held_back) = (0usize, 0usize, 0usize);
    let mut bytes: Vec<u8> = Vec::new();
    let mut piece = 0usize;
    for _ in 0..1_000_000 {
        if got == FRAMES {
            break;
        }
        // The guest keeps its 16-entry ring full.
        while sent < FRAMES && (sent as u16).wrapping_sub(used(&mem, TXQ)) < 16 {
            send(&mem, (sent % 16) as u16, &odd_frame(sent, MAX));
            sent += 1;
        }
        t.process_queue(TXQ as usize);
        if t.host_interest().write {
            held_back += 1;
            t.host_ready();
        }
        // The host reads 1..=13 bytes at a time.
        piece = piece % 13 + 1;
        let mut b = [0u8; 13];
        match host.read(&mut b[..piece]) {
            Ok(0) => panic!("the device closed the stream"),
            Ok(n) => bytes.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        while bytes.len() >= 4 {
            let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            if bytes.len() < 4 + len {
                break;
            }
            assert_eq!(&bytes[4..4 + len], &odd_frame(got, MAX)[..], "frame {got}");
            bytes.drain(..4 + len);
            got += 1;
        }
    }
    assert_eq!(got, FRAMES, "every frame arrived");
    assert!(bytes.is_empty(), "nothing after the last frame");
    assert!(held_back > 0, "the socket never pushed back");
    assert!(!t.host_interest().write, "nothing left to send");
}

/// The receive side of the same: frames written a few bytes at a time,
/// prefixes and bodies split anywhere, reach the guest whole and in order.
#[test]
fn a_stream_read_a_few_bytes_at_a_time_delivers_every_frame_whole() {
    const FRAMES: usize = 200;
    let (mem, mut t, mut host) = stream_device();
    let mut bytes = Vec::new();
    for i in 0..FRAMES {
        let f = odd_frame(i, 1514);
        bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&f);
    }
    let (mut at, mut piece, mut posted, mut got) = (0usize, 0usize, 0u16, 0usize);
    let mut rounds_after_the_end = 0;
    while got < FRAMES {
        while posted.wrapping_sub(used(&mem, RXQ)) < 16 {
            post_rx(&mem, posted % 16, 2048);
            posted = posted.wrapping_add(1);
        }
        t.process_queue(RXQ as usize);
        piece = piece % 7 + 1;
        let end = (at + piece).min(bytes.len());
        if at < end {
            host.write_all(&bytes[at..end]).unwrap();
            at = end;
        }
        t.host_ready();
        while (got as u16) != used(&mem, RXQ) {
            assert_eq!(
                received(&mem, got as u16),
                odd_frame(got, 1514),
                "frame {got}"
            );
            got += 1;
        }
        if at == bytes.len() {
            rounds_after_the_end += 1;
            assert!(rounds_after_the_end < 10, "all written, {got} arrived");
        }
    }
}
