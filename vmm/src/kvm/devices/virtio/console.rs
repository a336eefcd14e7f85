//! virtio-console with one named port (`VIRTIO_CONSOLE_F_MULTIPORT`), like
//! QEMU's `virtserialport,name=...`: Linux shows the name in
//! `/sys/class/virtio-ports/vportNpM/name`, where the guest looks for it.
//!
//! Queues: 0/1 are port 0's receive/transmit queues, 2/3 the control
//! receive/transmit queues. The host side is one end of a Unix socket pair
//! (non-blocking); bytes are buffered in both directions up to a bound, and
//! the event loop stops reading the socket while the guest is not taking data.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vm_memory::GuestMemoryMmap;

use super::mmio::{read_config_bytes, HostInterest, VirtioDevice};
use super::queue::{Chain, Queue, QueueError};

pub const VIRTIO_ID_CONSOLE: u32 = 3;
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;

pub const DEVICE_READY: u16 = 0;
pub const DEVICE_ADD: u16 = 1;
pub const PORT_READY: u16 = 3;
pub const CONSOLE_PORT: u16 = 4;
pub const PORT_OPEN: u16 = 6;
pub const PORT_NAME: u16 = 7;

const RX: usize = 0;
const TX: usize = 1;
const CTRL_RX: usize = 2;
const CTRL_TX: usize = 3;
const QUEUE_SIZE: u16 = 256;
/// Bytes buffered per direction before back-pressure applies.
const BUFFER_LIMIT: usize = 64 * 1024;

pub struct Console {
    port_name: String,
    host: UnixStream,
    host_closed: bool,
    multiport: bool,
    to_guest: VecDeque<u8>,
    to_host: VecDeque<u8>,
    control: VecDeque<Vec<u8>>,
}

/// Encode a `struct virtio_console_control`.
pub fn control_msg(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(8);
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

impl Console {
    /// `host` must be non-blocking.
    pub fn new(port_name: &str, host: UnixStream) -> Console {
        Console {
            port_name: port_name.to_string(),
            host,
            host_closed: false,
            multiport: false,
            to_guest: VecDeque::new(),
            to_host: VecDeque::new(),
            control: VecDeque::new(),
        }
    }

    fn fill_rx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        queues[RX].drain_while(
            mem,
            "virtio-console receive",
            self,
            |c| !c.to_guest.is_empty(),
            |c, descs| {
                let (a, b) = c.to_guest.as_slices();
                let data: Vec<u8> = a
                    .iter()
                    .chain(b)
                    .copied()
                    .take(Chain::writable_len(descs))
                    .collect();
                let n = Chain::write_to(descs, mem, &data)?;
                c.to_guest.drain(..n);
                Ok(n as u32)
            },
        )
    }

    /// Move the guest's transmit buffers to the host socket, at most
    /// `BUFFER_LIMIT` bytes held at a time, until the queue is empty or the
    /// socket is full ([`Queue::drain_to_host`]; a full socket resumes it in
    /// `host_ready`).
    fn drain_tx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        queues[TX].drain_to_host(
            mem,
            "virtio-console transmit",
            self,
            |c| c.to_host.len() < BUFFER_LIMIT,
            |c, descs| {
                let mut buf = vec![0u8; Chain::readable_len(descs).min(BUFFER_LIMIT)];
                let n = Chain::read_from(descs, mem, &mut buf)?;
                if !c.host_closed {
                    c.to_host.extend(&buf[..n]);
                }
                Ok(0)
            },
            Console::flush_host,
        )
    }

    fn flush_host(&mut self) {
        while !self.to_host.is_empty() && !self.host_closed {
            let (a, _) = self.to_host.as_slices();
            match self.host.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("virtio-console: host side gone: {e}");
                    self.host_gone();
                }
            }
        }
    }

    fn host_gone(&mut self) {
        if !self.host_closed {
            self.host_closed = true;
            self.to_host.clear();
            if self.multiport {
                self.control.push_back(control_msg(0, PORT_OPEN, 0));
            }
        }
    }

    fn read_host(&mut self) {
        let mut buf = [0u8; 16 * 1024];
        while !self.host_closed && self.to_guest.len() < BUFFER_LIMIT {
            let room = (BUFFER_LIMIT - self.to_guest.len()).min(buf.len());
            match self.host.read(&mut buf[..room]) {
                Ok(0) => self.host_gone(),
                Ok(n) => self.to_guest.extend(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => self.host_gone(),
            }
        }
    }

    fn fill_control(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        queues[CTRL_RX].drain_while(
            mem,
            "virtio-console control receive",
            self,
            |c| !c.control.is_empty(),
            |c, descs| {
                let Some(msg) = c.control.front() else {
                    return Ok(0);
                };
                if Chain::writable_len(descs) < msg.len() {
                    return Err(QueueError::Layout("control buffer too small"));
                }
                let n = Chain::write_to(descs, mem, msg)?;
                if n > 0 {
                    c.control.pop_front();
                }
                Ok(n as u32)
            },
        )
    }

    fn handle_control(&mut self, id: u32, event: u16, value: u16) {
        tracing::debug!(
            id,
            event,
            value,
            "virtio-console: control message from guest"
        );
        match event {
            DEVICE_READY if value == 1 => self.control.push_back(control_msg(0, DEVICE_ADD, 0)),
            DEVICE_READY => tracing::warn!("virtio-console: guest failed to set up the device"),
            PORT_READY if id == 0 && value == 1 => {
                let mut name = control_msg(0, PORT_NAME, 1);
                name.extend_from_slice(self.port_name.as_bytes());
                self.control.push_back(name);
                self.control
                    .push_back(control_msg(0, PORT_OPEN, u16::from(!self.host_closed)));
            }
            PORT_READY => tracing::warn!(id, "virtio-console: guest could not add port"),
            PORT_OPEN => tracing::debug!(id, open = value, "virtio-console: guest port open state"),
            _ => tracing::debug!(event, "virtio-console: ignored control event"),
        }
    }

    fn drain_control(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        queues[CTRL_TX].drain(mem, "virtio-console control transmit", |descs| {
            let mut msg = [0u8; 8];
            match Chain::read_from(descs, mem, &mut msg)? {
                8 => {
                    let id = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
                    let event = u16::from_le_bytes([msg[4], msg[5]]);
                    let value = u16::from_le_bytes([msg[6], msg[7]]);
                    self.handle_control(id, event, value);
                }
                n => tracing::warn!("virtio-console: short control message ({n} bytes)"),
            }
            Ok(0)
        })
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 4]
    }

    fn features(&self) -> u64 {
        VIRTIO_CONSOLE_F_MULTIPORT
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr
        let mut cfg = [0u8; 12];
        cfg[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, features: u64) {
        self.multiport = features & VIRTIO_CONSOLE_F_MULTIPORT != 0;
        if !self.multiport {
            tracing::warn!("virtio-console: guest did not accept multiport; the port has no name");
        }
    }

    fn reset(&mut self) {
        self.control.clear();
        self.multiport = false;
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match index {
            RX => self.fill_rx(queues, mem),
            TX => self.drain_tx(queues, mem),
            CTRL_RX => self.fill_control(queues, mem),
            CTRL_TX => {
                let a = self.drain_control(queues, mem);
                let b = self.fill_control(queues, mem);
                a | b
            }
            _ => false,
        }
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.host.as_raw_fd())
    }

    fn host_interest(&self) -> HostInterest {
        HostInterest {
            read: !self.host_closed && self.to_guest.len() < BUFFER_LIMIT,
            write: !self.host_closed && !self.to_host.is_empty(),
        }
    }

    /// Control messages not yet delivered. Bytes buffered between the
    /// guest and the host are not kept: a restored VM talks to a new host
    /// connection, and starts with an empty stream both ways.
    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "control": self.control })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let control: Vec<Vec<u8>> = match state.get("control") {
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| e.to_string())?,
            None => Vec::new(),
        };
        // What `handle_control` queues: a few messages, each a header plus
        // at most the port's name.
        let limit = 8 + self.port_name.len();
        if control.len() > 64 || control.iter().any(|m| m.len() < 8 || m.len() > limit) {
            return Err("console control messages out of bounds".into());
        }
        self.control = control.into();
        Ok(())
    }

    fn host_ready(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.read_host();
        self.flush_host();
        let mut used = self.fill_rx(queues, mem);
        if queues[TX].ready {
            used |= self.drain_tx(queues, mem);
        }
        if self.multiport && queues[CTRL_RX].ready {
            used |= self.fill_control(queues, mem);
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::kvm::devices::virtio::mmio::tests::init;
    use crate::kvm::devices::virtio::mmio::{MmioTransport, VIRTIO_F_VERSION_1};
    use crate::kvm::devices::virtio::queue::mock::{self, *};

    fn q(i: u64) -> u64 {
        i * 0x10000
    }

    /// Put a descriptor for queue `qi` (rings laid out by `mmio::tests::init`).
    fn desc(mem: &GuestMemoryMmap, qi: u64, i: u16, addr: u64, len: u32, flags: u16) {
        let b = GuestAddress(DESC + q(qi) + 16 * u64::from(i));
        mem.write_obj(addr, b).unwrap();
        mem.write_obj(len, b.unchecked_add(8)).unwrap();
        mem.write_obj(flags, b.unchecked_add(12)).unwrap();
        mem.write_obj(0u16, b.unchecked_add(14)).unwrap();
    }
    fn publish(mem: &GuestMemoryMmap, qi: u64, head: u16) {
        let a = AVAIL + q(qi);
        let idx: u16 = mem.read_obj(GuestAddress(a + 2)).unwrap();
        mem.write_obj(head, GuestAddress(a + 4 + 2 * u64::from(idx % 16)))
            .unwrap();
        mem.write_obj(idx + 1, GuestAddress(a + 2)).unwrap();
    }
    fn used(mem: &GuestMemoryMmap, qi: u64) -> u16 {
        mem.read_obj(GuestAddress(USED + q(qi) + 2)).unwrap()
    }
    fn used_len(mem: &GuestMemoryMmap, qi: u64, i: u16) -> u32 {
        mem.read_obj(GuestAddress(USED + q(qi) + 8 + 8 * u64::from(i)))
            .unwrap()
    }

    fn setup() -> (Arc<GuestMemoryMmap>, MmioTransport, UnixStream) {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap());
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let c = Console::new("org.kiln.agent.0", a);
        let mut t = MmioTransport::new(Box::new(c), mem.clone()).unwrap();
        init(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT);
        (mem, t, b)
    }

    fn ctrl(mem: &GuestMemoryMmap, t: &mut MmioTransport, head: u16, msg: &[u8]) {
        let addr = 0x80000 + u64::from(head) * 0x100;
        mem.write_slice(msg, GuestAddress(addr)).unwrap();
        desc(mem, 3, head, addr, msg.len() as u32, 0);
        publish(mem, 3, head);
        t.process_queue(3);
    }

    #[test]
    fn multiport_handshake_names_the_port_and_data_flows_both_ways() {
        let (mem, mut t, mut host) = setup();
        // Guest posts control receive buffers.
        for i in 0..4u16 {
            desc(&mem, 2, i, 0x90000 + u64::from(i) * 0x100, 0x100, WRITE);
            publish(&mem, 2, i);
        }
        t.process_queue(2);
        ctrl(&mem, &mut t, 0, &control_msg(0, DEVICE_READY, 1));
        assert_eq!(used(&mem, 2), 1);
        let mut m = [0u8; 8];
        mem.read_slice(&mut m, GuestAddress(0x90000)).unwrap();
        assert_eq!(m.to_vec(), control_msg(0, DEVICE_ADD, 0));
        ctrl(&mem, &mut t, 1, &control_msg(0, PORT_READY, 1));
        assert_eq!(used(&mem, 2), 3);
        let n = used_len(&mem, 2, 1) as usize;
        let mut name = vec![0u8; n];
        mem.read_slice(&mut name, GuestAddress(0x90100)).unwrap();
        assert_eq!(&name[..8], &control_msg(0, PORT_NAME, 1)[..]);
        assert_eq!(&name[8..], b"org.kiln.agent.0");
        mem.read_slice(&mut m, GuestAddress(0x90200)).unwrap();
        assert_eq!(m.to_vec(), control_msg(0, PORT_OPEN, 1));

        // Guest → host.
        mem.write_slice(b"hello host", GuestAddress(0xa0000))
            .unwrap();
        desc(&mem, 1, 0, 0xa0000, 10, 0);
        publish(&mem, 1, 0);
        t.process_queue(1);
        let mut got = [0u8; 10];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello host");

        // Host → guest, buffered until the guest posts a buffer.
        host.write_all(b"ping").unwrap();
        t.host_ready();
        assert_eq!(used(&mem, 0), 0);
        desc(&mem, 0, 0, 0xb0000, 2, WRITE);
        desc(&mem, 0, 1, 0xb1000, 64, WRITE);
        publish(&mem, 0, 0);
        publish(&mem, 0, 1);
        t.process_queue(0);
        assert_eq!(used(&mem, 0), 2);
        let mut a = [0u8; 4];
        mem.read_slice(&mut a[..2], GuestAddress(0xb0000)).unwrap();
        mem.read_slice(&mut a[2..], GuestAddress(0xb1000)).unwrap();
        assert_eq!(&a, b"ping");
        let _ = mock::DATA;
    }

    #[test]
    fn transmit_goes_on_past_the_buffer_limit_while_the_host_takes_it() {
        let (mem, mut t, mut host) = setup();
        // Four 40 KiB buffers (more than BUFFER_LIMIT in all), one notify:
        // the guest may wait for them all to be used before it notifies again.
        let len = 40 * 1024u32;
        for i in 0..4u16 {
            let addr = 0xc0000 + u64::from(i) * u64::from(len);
            mem.write_slice(&vec![i as u8 + 1; len as usize], GuestAddress(addr))
                .unwrap();
            desc(&mem, 1, i, addr, len, 0);
            publish(&mem, 1, i);
        }
        t.process_queue(1);
        assert_eq!(used(&mem, 1), 4, "every buffer used after one notify");
        let mut got = vec![0u8; 4 * len as usize];
        host.read_exact(&mut got).unwrap();
        for (i, c) in got.chunks(len as usize).enumerate() {
            assert!(c.iter().all(|&b| b == i as u8 + 1), "buffer {i} in order");
        }
    }

    #[test]
    fn bad_chains_are_returned_without_data() {
        let (mem, mut t, _host) = setup();
        // Transmit from outside memory, and a short control message.
        desc(&mem, 1, 0, 0xfff_0000, 10, 0);
        publish(&mem, 1, 0);
        t.process_queue(1);
        assert_eq!(used(&mem, 1), 1);
        ctrl(&mem, &mut t, 0, &[1, 2, 3]);
        assert_eq!(used(&mem, 3), 1);
        // A read-only buffer on the receive queue gets nothing written.
        desc(&mem, 0, 0, 0xb0000, 16, 0);
        publish(&mem, 0, 0);
        t.process_queue(0);
    }
}
