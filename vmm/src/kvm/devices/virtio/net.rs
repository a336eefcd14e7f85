//! virtio-net (virtio 1.x, section 5.1): one receive and one transmit queue
//! over a host-side backend kiln opened and handed over, never opened here:
//!
//! - [`NetBackend::Tap`]: a TAP device (`IFF_TAP | IFF_NO_PI |
//!   IFF_VNET_HDR`, a 12-byte header, `TUN_F_CSUM | TUN_F_TSO4 |
//!   TUN_F_TSO6` set by kiln): one read or write is one `virtio_net_hdr_v1`
//!   and one Ethernet frame (`--network nat`). The device offers checksum
//!   and TCP segmentation offloads both ways (`CSUM`, `HOST_TSO4/6`,
//!   `GUEST_CSUM`, `GUEST_TSO4/6`), so the guest hands the host's stack
//!   64 KiB segments without checksums instead of computing and cutting
//!   them on its own (slow) CPU. A guest header is checked against what
//!   was negotiated before it reaches the TAP; a host frame that needs an
//!   offload the guest did not take is dropped.
//! - [`NetBackend::Stream`]: a connected stream socket speaking QEMU's
//!   `-netdev stream` protocol, which `passt` serves: each frame is a 4-byte
//!   big-endian length and the frame (`--network user`). No offloads: the
//!   header carries nothing but `num_buffers = 1`.
//!
//! Frames are at most MTU + Ethernet and VLAN headers ([`Net::max_frame`]),
//! or [`MAX_GSO_FRAME`] for a segmentation-offload frame.
//!
//! Every guest byte is hostile: a transmit chain too short for the header,
//! a frame shorter than an Ethernet header or longer than the bound, and
//! malformed chains are dropped (and their buffers returned) before any
//! allocation their sizes would ask for. What waits for the other side is
//! bounded in both directions: frames from the host wait in order (at most
//! [`RX_PENDING_FRAMES`]) while the guest has no receive buffers, and the
//! backend is then not read at all (a TAP drops on its own queue, passt
//! waits), so a guest that never reads cannot grow the VMM's memory; frames
//! for the host wait (at most [`TX_PENDING_FRAMES`]) while the backend is
//! full, and the transmit queue is then left alone until it drains. Nor
//! can a guest hold the event loop (and the console and disks served by
//! it): one wake-up looks at most at [`TX_BUDGET`] transmit chains, and the
//! receive side moves at most [`RX_PENDING_FRAMES`] per wake-up.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vm_memory::GuestMemoryMmap;

use super::mmio::{read_config_bytes, HostInterest, VirtioDevice};
use super::queue::{Chain, Queue, QueueError};

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// The offloads a TAP backend offers.
pub const TAP_OFFLOADS: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6;

/// `virtio_net_hdr.flags`: the checksum from `csum_start` is to be filled.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.flags` (receive only): the checksum was checked.
pub const HDR_F_DATA_VALID: u8 = 2;
/// `virtio_net_hdr.gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
/// The largest segmentation-offload frame: a 64 KiB IP packet and its
/// Ethernet and VLAN headers (Linux's legacy GSO limit, what virtio-net
/// guests and TAP use).
pub const MAX_GSO_FRAME: usize = 65536 + ETH_HLEN + VLAN_HLEN;
/// The smallest segment a guest may ask the host to cut (Linux's
/// `TCP_MIN_MSS`): a 64 KiB frame is then at most ~750 packets.
pub const MIN_GSO_SIZE: usize = 88;

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;

/// `struct virtio_net_hdr_v1` (with `num_buffers`, always there in 1.x).
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS: usize = 10;
pub const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
/// The smallest MTU the device offers (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// QEMU's stream protocol: the length before each frame.
const STREAM_LEN: usize = 4;
/// Bytes read from a stream backend at a time.
const STREAM_READ: usize = 64 * 1024;

/// Host → guest frames held while the guest has no receive buffer.
pub const RX_PENDING_FRAMES: usize = 256;
/// Guest → host frames held while the backend cannot take them.
pub const TX_PENDING_FRAMES: usize = 256;
/// Bytes held either way, whatever the frames' count: with offloads a
/// frame may be 64 KiB, and 256 of them would be 16 MiB.
pub const PENDING_BYTES: usize = 2 << 20;
/// Transmit chains looked at per wake-up. The guest's vCPUs run while the
/// event loop drains, so a guest that keeps its ring full (or keeps moving
/// its available index) would otherwise hold the loop, and the console
/// and disks with it, for as long as the backend takes frames. Past the
/// budget the device asks to be woken when the backend is writable, which
/// comes back after the loop served whatever else was ready.
pub const TX_BUDGET: usize = 256;

/// Where the guest's frames go and come from; opened by kiln.
#[derive(Debug)]
pub enum NetBackend {
    /// A TAP descriptor: one frame per read or write.
    Tap(File),
    /// A connected stream socket with 4-byte big-endian length prefixes.
    Stream(UnixStream),
}

impl NetBackend {
    fn fd(&self) -> RawFd {
        match self {
            NetBackend::Tap(f) => f.as_raw_fd(),
            NetBackend::Stream(s) => s.as_raw_fd(),
        }
    }
}

/// Make `fd` non-blocking (`O_NONBLOCK` on its open file description).
fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller owns; no memory is
    // passed to the kernel.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Why a frame was dropped (counted, logged at debug level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DropReason {
    /// A guest frame shorter than an Ethernet header (or no room for the
    /// virtio header at all).
    TxShort,
    /// A guest frame longer than the bound.
    TxOversize,
    /// A host frame longer than the bound, or shorter than a header.
    RxBadSize,
    /// A receive buffer too small for the frame it was next in line for.
    RxBufferTooSmall,
    /// The backend refused the frame (e.g. the TAP is down).
    TxBackend,
    /// A guest header asking for what was not negotiated or pointing
    /// outside its frame.
    TxBadHeader,
    /// A host frame needing an offload the guest did not take.
    RxNotNegotiated,
}

/// What the device counted: frames moved and dropped per reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub tx_short: u64,
    pub tx_oversize: u64,
    pub rx_bad_size: u64,
    pub rx_buffer_too_small: u64,
    pub tx_backend: u64,
    pub tx_bad_header: u64,
    pub rx_not_negotiated: u64,
}

pub struct Net {
    backend: NetBackend,
    /// Read failed or the peer closed: nothing more moves (the guest's
    /// frames are taken and dropped, so its queue never stalls).
    host_closed: bool,
    mac: [u8; 6],
    mtu: u16,
    max_frame: usize,
    /// The features the driver took (offloads among them).
    acked: u64,
    /// Host frames, each behind its virtio header (zeros but for a TAP's).
    rx_pending: VecDeque<Vec<u8>>,
    rx_bytes: usize,
    /// Stream backend: bytes read but not yet a whole frame, and how many
    /// bytes of an oversize frame are still to be skipped.
    stream_in: Vec<u8>,
    stream_skip: usize,
    /// Guest frames for the backend (with their length prefix for a
    /// stream), and how much of the first one a stream has taken.
    tx_pending: VecDeque<Vec<u8>>,
    tx_bytes: usize,
    tx_offset: usize,
    /// The last drain stopped at [`TX_BUDGET`]: chains may be waiting.
    tx_more: bool,
    /// One TAP read's buffer: a header, the bound, and one byte more.
    scratch: Vec<u8>,
    counters: NetCounters,
}

impl Net {
    /// A device over `backend` (made non-blocking here) with the guest's
    /// `mac` and `mtu` (at least [`MIN_MTU`]).
    pub fn new(backend: NetBackend, mac: [u8; 6], mtu: u16) -> std::io::Result<Net> {
        set_nonblocking(backend.fd())?;
        let mtu = mtu.max(MIN_MTU);
        let max_frame = usize::from(mtu) + ETH_HLEN + VLAN_HLEN;
        let scratch = match backend {
            NetBackend::Tap(_) => vec![0u8; NET_HDR_LEN + MAX_GSO_FRAME.max(max_frame) + 1],
            NetBackend::Stream(_) => Vec::new(),
        };
        Ok(Net {
            backend,
            host_closed: false,
            mac,
            mtu,
            max_frame,
            acked: 0,
            rx_pending: VecDeque::new(),
            rx_bytes: 0,
            stream_in: Vec::new(),
            stream_skip: 0,
            tx_pending: VecDeque::new(),
            tx_bytes: 0,
            tx_offset: 0,
            tx_more: false,
            scratch,
            counters: NetCounters::default(),
        })
    }

    /// The largest Ethernet frame either direction carries.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    fn dropped(&mut self, why: DropReason, len: usize) {
        let c = &mut self.counters;
        let n = match why {
            DropReason::TxShort => &mut c.tx_short,
            DropReason::TxOversize => &mut c.tx_oversize,
            DropReason::RxBadSize => &mut c.rx_bad_size,
            DropReason::RxBufferTooSmall => &mut c.rx_buffer_too_small,
            DropReason::TxBackend => &mut c.tx_backend,
            DropReason::TxBadHeader => &mut c.tx_bad_header,
            DropReason::RxNotNegotiated => &mut c.rx_not_negotiated,
        };
        *n += 1;
        tracing::debug!(?why, len, "virtio-net: frame dropped");
    }

    /// Take one transmit chain: checked sizes first, then one copy.
    fn take_tx(&mut self, descs: &[super::queue::Descriptor], mem: &GuestMemoryMmap) {
        let total = Chain::readable_len(descs);
        let Some(frame_len) = total.checked_sub(NET_HDR_LEN) else {
            return self.dropped(DropReason::TxShort, total);
        };
        if frame_len < ETH_HLEN {
            return self.dropped(DropReason::TxShort, frame_len);
        }
        if frame_len > MAX_GSO_FRAME.max(self.max_frame) {
            return self.dropped(DropReason::TxOversize, frame_len);
        }
        if self.host_closed {
            return;
        }
        // At most a header and MAX_GSO_FRAME (checked above): read once,
        // so the header checked is the header sent.
        let mut buf = vec![0u8; total];
        match Chain::read_from(descs, mem, &mut buf) {
            Ok(n) if n == total => {}
            Ok(n) => return self.dropped(DropReason::TxShort, n),
            Err(e) => {
                tracing::debug!("virtio-net: transmit buffer unreadable: {e}");
                return;
            }
        }
        let stream = matches!(self.backend, NetBackend::Stream(_));
        // Only a TAP takes a header; anything else gets the MTU's bound.
        let gso = !stream && buf[1] != GSO_NONE;
        if frame_len > self.max_frame && !gso {
            return self.dropped(DropReason::TxOversize, frame_len);
        }
        // A stream has no header (no offloads): its length prefix takes
        // the header's last 4 bytes. A TAP takes the header once checked,
        // `num_buffers` zeroed.
        let frame = if stream {
            let start = NET_HDR_LEN - STREAM_LEN;
            buf[start..NET_HDR_LEN].copy_from_slice(&(frame_len as u32).to_be_bytes());
            buf.split_off(start)
        } else {
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr.copy_from_slice(&buf[..NET_HDR_LEN]);
            if let Err(why) = check_tx_header(&hdr, frame_len, self.acked, self.mtu) {
                tracing::debug!("virtio-net: transmit header refused: {why}");
                return self.dropped(DropReason::TxBadHeader, frame_len);
            }
            buf[NUM_BUFFERS..NET_HDR_LEN].fill(0);
            buf
        };
        self.counters.tx_frames += 1;
        self.tx_bytes += frame.len();
        self.tx_pending.push_back(frame);
    }

    /// Give the backend what it takes of the pending guest frames.
    fn flush_tx(&mut self) {
        while let Some(front) = self.tx_pending.front() {
            if self.host_closed {
                self.tx_pending.clear();
                self.tx_bytes = 0;
                self.tx_offset = 0;
                return;
            }
            let r = match &mut self.backend {
                NetBackend::Tap(f) => f.write(front),
                NetBackend::Stream(s) => s.write(&front[self.tx_offset..]),
            };
            match r {
                Ok(n) => {
                    let done = match self.backend {
                        // A TAP takes a frame whole or not at all.
                        NetBackend::Tap(_) => true,
                        NetBackend::Stream(_) => {
                            self.tx_offset += n;
                            self.tx_offset >= front.len() || n == 0
                        }
                    };
                    if n == 0 {
                        self.host_gone("the backend took nothing");
                    }
                    if done {
                        self.pop_tx();
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => match self.backend {
                    // A TAP that is down or refuses one frame stays usable.
                    NetBackend::Tap(_) if self.tx_offset == 0 => {
                        let len = front.len();
                        self.pop_tx();
                        self.dropped(DropReason::TxBackend, len);
                        tracing::debug!("virtio-net: TAP write failed: {e}");
                    }
                    _ => self.host_gone(&e.to_string()),
                },
            }
        }
    }

    fn pop_tx(&mut self) {
        if let Some(f) = self.tx_pending.pop_front() {
            self.tx_bytes -= f.len();
        }
        self.tx_offset = 0;
    }

    /// The backend is gone: nothing more is read or written, but the frames
    /// it sent before are still the guest's (a partial one never completes).
    fn host_gone(&mut self, why: &str) {
        if !self.host_closed {
            tracing::debug!("virtio-net: backend gone: {why}");
            self.host_closed = true;
        }
    }

    fn rx_room(&self) -> bool {
        !self.host_closed && self.parse_room()
    }

    /// Whether the frames a stream already delivered may be cut out.
    fn parse_room(&self) -> bool {
        self.rx_pending.len() < RX_PENDING_FRAMES && self.rx_bytes < PENDING_BYTES
    }

    fn tx_room(&self) -> bool {
        self.tx_pending.len() < TX_PENDING_FRAMES && self.tx_bytes < PENDING_BYTES
    }

    /// Queue a host frame (behind its header) for the guest.
    fn push_rx(&mut self, frame: Vec<u8>) {
        self.rx_bytes += frame.len();
        self.rx_pending.push_back(frame);
    }

    /// A TAP's frame (header and frame, `n` bytes of the scratch buffer):
    /// queued when its size fits its header and the guest took every
    /// offload it needs.
    fn push_tap_rx(&mut self, n: usize) {
        let Some(len) = n.checked_sub(NET_HDR_LEN) else {
            return self.dropped(DropReason::RxBadSize, n);
        };
        let hdr = &self.scratch[..NET_HDR_LEN];
        let bound = if hdr[1] == GSO_NONE {
            self.max_frame
        } else {
            MAX_GSO_FRAME
        };
        if !(ETH_HLEN..=bound).contains(&len) {
            return self.dropped(DropReason::RxBadSize, len);
        }
        let (flags, gso) = (hdr[0], hdr[1]);
        let needs = |f: u64| self.acked & f != 0;
        let ok = (flags & HDR_F_NEEDS_CSUM == 0 || needs(VIRTIO_NET_F_GUEST_CSUM))
            && match gso {
                GSO_NONE => true,
                GSO_TCPV4 => needs(VIRTIO_NET_F_GUEST_TSO4),
                GSO_TCPV6 => needs(VIRTIO_NET_F_GUEST_TSO6),
                _ => false,
            };
        if !ok {
            return self.dropped(DropReason::RxNotNegotiated, len);
        }
        let mut frame = self.scratch[..n].to_vec();
        if !needs(VIRTIO_NET_F_GUEST_CSUM) {
            // Nothing in it the guest asked for (a frame needing an
            // offload was dropped above): the empty header of no offloads.
            frame[..NET_HDR_LEN].fill(0);
        }
        self.push_rx(frame);
    }

    /// Read host frames while there is room for them.
    fn read_host(&mut self) {
        while self.rx_room() {
            let r = match &mut self.backend {
                NetBackend::Tap(f) => {
                    // One byte more than the bound tells an oversize frame
                    // (the TAP cuts what does not fit) from one that fits;
                    // the frame kept is only as long as it is.
                    match f.read(&mut self.scratch) {
                        Ok(0) => Ok(0),
                        Ok(n) => {
                            self.push_tap_rx(n);
                            Ok(n)
                        }
                        Err(e) => Err(e),
                    }
                }
                NetBackend::Stream(s) => {
                    // Whole frames already read come first; read more only
                    // while what is held may not be one, so `stream_in`
                    // stays under one bounded frame plus one read.
                    if self.stream_in.len() >= STREAM_LEN + self.max_frame {
                        return;
                    }
                    let mut buf = [0u8; STREAM_READ];
                    match s.read(&mut buf) {
                        Ok(0) => Ok(0),
                        Ok(n) => {
                            self.stream_in.extend_from_slice(&buf[..n]);
                            self.parse_stream();
                            Ok(n)
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match r {
                Ok(0) => match self.backend {
                    NetBackend::Tap(_) => return,
                    NetBackend::Stream(_) => self.host_gone("the peer closed the socket"),
                },
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => self.host_gone(&e.to_string()),
            }
        }
    }

    /// Cut whole frames out of the stream's bytes while there is room for
    /// them. An oversize frame's bytes are skipped as they come, never
    /// buffered.
    fn parse_stream(&mut self) {
        let mut at = 0;
        while self.parse_room() {
            let rest = self.stream_in.len() - at;
            if self.stream_skip > 0 {
                let n = self.stream_skip.min(rest);
                self.stream_skip -= n;
                at += n;
                if self.stream_skip > 0 {
                    break;
                }
                continue;
            }
            let Some(prefix) = self.stream_in.get(at..at + STREAM_LEN) else {
                break;
            };
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            if !(ETH_HLEN..=self.max_frame).contains(&len) {
                self.dropped(DropReason::RxBadSize, len);
                self.stream_skip = len;
                at += STREAM_LEN;
                continue;
            }
            let Some(body) = self.stream_in.get(at + STREAM_LEN..at + STREAM_LEN + len) else {
                break;
            };
            let mut frame = vec![0u8; NET_HDR_LEN + len];
            frame[NET_HDR_LEN..].copy_from_slice(body);
            self.push_rx(frame);
            at += STREAM_LEN + len;
        }
        self.stream_in.drain(..at);
    }

    /// Hand pending host frames to the guest's receive buffers, in order;
    /// a frame waits for a buffer (it is never skipped for lack of one).
    fn fill_rx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        loop {
            used |= self.fill_rx_once(queues, mem);
            // Room made: frames a stream already delivered come next (the
            // socket may have nothing more to say, so no wake-up would).
            let before = self.rx_pending.len();
            self.parse_stream();
            if self.rx_pending.len() == before {
                return used;
            }
        }
    }

    fn fill_rx_once(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        queues[RX].drain_while(
            mem,
            "virtio-net receive",
            self,
            |n| !n.rx_pending.is_empty(),
            |n, descs| {
                let Some(mut frame) = n.rx_pending.pop_front() else {
                    return Ok(0);
                };
                n.rx_bytes -= frame.len();
                if Chain::writable_len(descs) < frame.len() {
                    // The guest chose the size; its frame is lost, not the
                    // order of the ones after it.
                    n.dropped(DropReason::RxBufferTooSmall, frame.len() - NET_HDR_LEN);
                    return Ok(0);
                }
                frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
                let written = Chain::write_to(descs, mem, &frame)?;
                if written != frame.len() {
                    return Err(QueueError::Layout("receive buffer shorter than it said"));
                }
                n.counters.rx_frames += 1;
                Ok(written as u32)
            },
        )
    }

    /// Move the guest's frames to the backend until the queue is empty, the
    /// backend is full ([`Queue::drain_to_host`]; a full backend resumes it
    /// in [`VirtioDevice::host_ready`]) or [`TX_BUDGET`] chains were looked
    /// at (then `tx_more` asks the event loop to come back).
    fn drain_tx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        // Counted where every chain passes, malformed ones included (those
        // never reach `take_tx`): once per pop attempt, so an empty queue
        // costs a little budget too.
        let budget = std::cell::Cell::new(TX_BUDGET);
        let used = queues[TX].drain_to_host(
            mem,
            "virtio-net transmit",
            self,
            |n| {
                let left = budget.get();
                budget.set(left.saturating_sub(1));
                left > 0 && n.tx_room()
            },
            |n, descs| {
                n.take_tx(descs, mem);
                Ok(0)
            },
            Net::flush_tx,
        );
        self.tx_more = budget.get() == 0;
        used
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        match self.backend {
            NetBackend::Tap(_) => VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU | TAP_OFFLOADS,
            NetBackend::Stream(_) => VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU,
        }
    }

    fn activate(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status, max_virtqueue_pairs, mtu
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn reset(&mut self) {
        // Frames for a driver that is gone; the stream's framing state and
        // what the backend still owes stay, so the stream stays in step.
        self.rx_pending.clear();
        self.rx_bytes = 0;
        self.tx_more = false;
        self.acked = 0;
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match index {
            RX => self.fill_rx(queues, mem),
            TX => self.drain_tx(queues, mem),
            _ => false,
        }
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.backend.fd())
    }

    fn host_interest(&self) -> HostInterest {
        HostInterest {
            read: self.rx_room(),
            write: !self.host_closed && (!self.tx_pending.is_empty() || self.tx_more),
        }
    }

    fn host_ready(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.read_host();
        self.flush_tx();
        self.tx_more = false;
        let mut used = false;
        if queues[RX].ready {
            used |= self.fill_rx(queues, mem);
        }
        if queues[TX].ready {
            used |= self.drain_tx(queues, mem);
        }
        used
    }
}

/// Whether a guest's transmit header for a TAP asks only for what was
/// negotiated (`acked`) and points inside its frame of `frame_len` bytes.
/// The host's stack checks it again; this keeps what a guest may ask of
/// it to what the device offered.
fn check_tx_header(
    hdr: &[u8; NET_HDR_LEN],
    frame_len: usize,
    acked: u64,
    mtu: u16,
) -> Result<(), String> {
    let u16_at = |i: usize| usize::from(u16::from_le_bytes([hdr[i], hdr[i + 1]]));
    let (flags, gso) = (hdr[0], hdr[1]);
    let (hdr_len, gso_size, csum_start, csum_offset) = (u16_at(2), u16_at(4), u16_at(6), u16_at(8));
    if flags & !HDR_F_NEEDS_CSUM != 0 {
        return Err(format!("flags {flags:#x}"));
    }
    let csum = flags & HDR_F_NEEDS_CSUM != 0;
    if csum {
        if acked & VIRTIO_NET_F_CSUM == 0 {
            return Err("checksum offload not negotiated".into());
        }
        if csum_start < ETH_HLEN || csum_start + csum_offset + 2 > frame_len {
            return Err(format!(
                "checksum at {csum_start}+{csum_offset} of {frame_len} bytes"
            ));
        }
    }
    let tso = match gso {
        GSO_NONE => return Ok(()),
        GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
        GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
        _ => return Err(format!("gso_type {gso:#x}")),
    };
    if acked & tso == 0 || !csum {
        return Err(format!(
            "gso_type {gso:#x} not negotiated, or without a checksum"
        ));
    }
    // The host's stack cuts the frame into gso_size pieces: a tiny one
    // would turn one 64 KiB frame into tens of thousands of packets.
    if !(MIN_GSO_SIZE..=usize::from(mtu)).contains(&gso_size) || hdr_len > frame_len {
        return Err(format!(
            "gso_size {gso_size}, hdr_len {hdr_len} of {frame_len} bytes"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "net_tests.rs"]
mod tests;
