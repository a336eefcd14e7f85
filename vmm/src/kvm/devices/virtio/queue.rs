//! Split virtqueues (virtio 1.x, section 2.7), device side.
//!
//! Everything read from guest memory is untrusted: descriptor indices are
//! bounds-checked against the queue size, chains are bounded in length (a
//! loop in `next` ends the walk), and every buffer's address range must lie
//! inside guest memory. A bad chain fails that one request; it never panics
//! the host.
//!
//! Devices serve their queues through [`Queue::drain`] (or
//! [`Queue::drain_while`]): one loop that pops chains, hands each to the
//! device and returns it through the used ring.

use std::sync::atomic::{fence, Ordering};

use crate::kvm::snapshot::state::QueueState;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Why a descriptor chain (or the queue itself) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("descriptor index {0} is out of range")]
    DescriptorIndex(u16),
    #[error("descriptor chain is longer than the queue (a loop?)")]
    ChainTooLong,
    #[error("buffer at {addr:#x} of {len} bytes lies outside guest memory")]
    BufferOutOfRange { addr: u64, len: u32 },
    #[error("indirect descriptors were not negotiated")]
    Indirect,
    #[error("guest memory access failed at {0:#x}")]
    Memory(u64),
    #[error("the driver made {0} buffers available at once, more than the queue holds")]
    AvailOverrun(u16),
    #[error("the request does not have the layout the device needs: {0}")]
    Layout(&'static str),
}

/// One buffer of a descriptor chain, already checked against guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (the device fills it) rather than device-readable.
    pub write_only: bool,
}

/// A request popped from the available ring: its head index (to return it
/// through the used ring) and its buffers, or why the chain is malformed.
#[derive(Debug)]
pub struct Chain {
    pub head: u16,
    pub descriptors: Result<Vec<Descriptor>, QueueError>,
}

impl Chain {
    /// Copy up to `buf.len()` bytes out of the device-readable buffers.
    /// Returns how many bytes were copied.
    pub fn read_from(
        descs: &[Descriptor],
        mem: &GuestMemoryMmap,
        buf: &mut [u8],
    ) -> Result<usize, QueueError> {
        let mut done = 0;
        for d in descs.iter().filter(|d| !d.write_only) {
            if done == buf.len() {
                break;
            }
            let n = (d.len as usize).min(buf.len() - done);
            mem.read_slice(&mut buf[done..done + n], d.addr)
                .map_err(|_| QueueError::Memory(d.addr.0))?;
            done += n;
        }
        Ok(done)
    }

    /// Bytes the device may read from the chain (its device-readable buffers).
    pub fn readable_len(descs: &[Descriptor]) -> usize {
        Self::len_where(descs, false)
    }

    /// Bytes the device may write into the chain (its device-writable buffers).
    pub fn writable_len(descs: &[Descriptor]) -> usize {
        Self::len_where(descs, true)
    }

    fn len_where(descs: &[Descriptor], write_only: bool) -> usize {
        descs
            .iter()
            .filter(|d| d.write_only == write_only)
            .map(|d| d.len as usize)
            .sum()
    }

    /// Copy `data` into the device-writable buffers. Returns how many bytes
    /// fitted.
    pub fn write_to(
        descs: &[Descriptor],
        mem: &GuestMemoryMmap,
        data: &[u8],
    ) -> Result<usize, QueueError> {
        let mut done = 0;
        for d in descs.iter().filter(|d| d.write_only) {
            if done == data.len() {
                break;
            }
            let n = (d.len as usize).min(data.len() - done);
            mem.write_slice(&data[done..done + n], d.addr)
                .map_err(|_| QueueError::Memory(d.addr.0))?;
            done += n;
        }
        Ok(done)
    }
}

/// The device side of one split virtqueue.
#[derive(Debug, Clone)]
pub struct Queue {
    /// The largest size the device accepts.
    pub max_size: u16,
    /// The size the driver chose (a power of two, at most `max_size`).
    pub size: u16,
    pub ready: bool,
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
    next_avail: u16,
    next_used: u16,
}

impl Queue {
    pub fn new(max_size: u16) -> Queue {
        Queue {
            max_size,
            size: max_size,
            ready: false,
            desc_table: GuestAddress(0),
            avail_ring: GuestAddress(0),
            used_ring: GuestAddress(0),
            next_avail: 0,
            next_used: 0,
        }
    }

    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// Whether the driver's configuration can be used: a power-of-two size
    /// within bounds, and the three rings aligned and inside guest memory.
    pub fn is_valid(&self, mem: &GuestMemoryMmap) -> bool {
        let n = u64::from(self.size);
        if !self.ready
            || self.size == 0
            || self.size > self.max_size
            || !self.size.is_power_of_two()
        {
            return false;
        }
        let fits = |a: GuestAddress, len: u64, align: u64| {
            a.0 & (align - 1) == 0 && usize::try_from(len).is_ok_and(|l| mem.check_range(a, l))
        };
        fits(self.desc_table, 16 * n, 16)
            && fits(self.avail_ring, 6 + 2 * n, 2)
            && fits(self.used_ring, 6 + 8 * n, 4)
    }

    fn read_u16(mem: &GuestMemoryMmap, addr: GuestAddress) -> Result<u16, QueueError> {
        mem.read_obj::<u16>(addr)
            .map_err(|_| QueueError::Memory(addr.0))
    }

    /// Pop the next available chain, if the driver made one available.
    /// `Err` means the queue itself is broken (the device should stop using it).
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Option<Chain>, QueueError> {
        if !self.ready || self.size == 0 {
            return Ok(None);
        }
        let avail_idx = Self::read_u16(mem, self.avail_ring.unchecked_add(2))?;
        // Read the ring entries only after seeing the index that covers them.
        fence(Ordering::Acquire);
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailOverrun(pending));
        }
        let slot = u64::from(self.next_avail % self.size);
        let head = Self::read_u16(mem, self.avail_ring.unchecked_add(4 + 2 * slot))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        let descriptors = self.walk(mem, head);
        Ok(Some(Chain { head, descriptors }))
    }

    fn walk(&self, mem: &GuestMemoryMmap, head: u16) -> Result<Vec<Descriptor>, QueueError> {
        let mut out = Vec::new();
        let mut index = head;
        loop {
            if index >= self.size {
                return Err(QueueError::DescriptorIndex(index));
            }
            if out.len() >= usize::from(self.size) {
                return Err(QueueError::ChainTooLong);
            }
            let base = self.desc_table.unchecked_add(16 * u64::from(index));
            let addr = mem
                .read_obj::<u64>(base)
                .map_err(|_| QueueError::Memory(base.0))?;
            let len = mem
                .read_obj::<u32>(base.unchecked_add(8))
                .map_err(|_| QueueError::Memory(base.0))?;
            let flags = Self::read_u16(mem, base.unchecked_add(12))?;
            let next = Self::read_u16(mem, base.unchecked_add(14))?;
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect);
            }
            let addr = GuestAddress(addr);
            if !mem.check_range(addr, len as usize) {
                return Err(QueueError::BufferOutOfRange { addr: addr.0, len });
            }
            out.push(Descriptor {
                addr,
                len,
                write_only: flags & VIRTQ_DESC_F_WRITE != 0,
            });
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(out);
            }
            index = next;
        }
    }

    /// Return a chain to the driver with `len` bytes written into it.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if self.size == 0 {
            return Err(QueueError::Layout("queue has no entries"));
        }
        let slot = u64::from(self.next_used % self.size);
        let elem = self.used_ring.unchecked_add(4 + 8 * slot);
        mem.write_obj(u32::from(head), elem)
            .map_err(|_| QueueError::Memory(elem.0))?;
        mem.write_obj(len, elem.unchecked_add(4))
            .map_err(|_| QueueError::Memory(elem.0))?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element must be visible before the index that publishes it.
        fence(Ordering::Release);
        let idx = self.used_ring.unchecked_add(2);
        mem.write_obj(self.next_used, idx)
            .map_err(|_| QueueError::Memory(idx.0))?;
        Ok(())
    }
}

/// Snapshots (`kvm::snapshot`).
impl Queue {
    pub fn save_state(&self) -> QueueState {
        QueueState {
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table.0,
            avail_ring: self.avail_ring.0,
            used_ring: self.used_ring.0,
            next_avail: self.next_avail,
            next_used: self.next_used,
        }
    }

    /// Load `s` (from a snapshot file): a ready queue must be valid in
    /// `mem`, as when the driver set it ready.
    pub fn restore_state(&mut self, s: &QueueState, mem: &GuestMemoryMmap) -> Result<(), String> {
        let q = Queue {
            max_size: self.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: GuestAddress(s.desc_table),
            avail_ring: GuestAddress(s.avail_ring),
            used_ring: GuestAddress(s.used_ring),
            next_avail: s.next_avail,
            next_used: s.next_used,
        };
        if q.ready && !q.is_valid(mem) {
            return Err(format!("queue {s:?} is not valid in guest memory"));
        }
        *self = q;
        Ok(())
    }
}

impl Queue {
    /// Serve the driver's requests: pop every available chain, hand its
    /// buffers to `handle`, which returns how many bytes it wrote into them,
    /// and return the chain through the used ring. A malformed chain, or one
    /// `handle` rejects, is logged (`what` names the device and queue) and
    /// returned with nothing written; a broken queue ends the drain. Each
    /// pop is bounded (see [`Queue::pop`]), so a hostile ring cannot make it
    /// loop while the guest is stopped. Returns whether any chain was
    /// returned: the caller then interrupts the driver, once.
    pub fn drain(
        &mut self,
        mem: &GuestMemoryMmap,
        what: &str,
        mut handle: impl FnMut(&[Descriptor]) -> Result<u32, QueueError>,
    ) -> bool {
        self.drain_while(mem, what, &mut handle, |_| true, |h, d| h(d))
    }

    /// [`Queue::drain`], popping a chain only while `more(state)` holds (e.g.
    /// while the device has bytes to give the driver); `state` is lent to
    /// `more` and `handle` in turn.
    pub fn drain_while<S: ?Sized>(
        &mut self,
        mem: &GuestMemoryMmap,
        what: &str,
        state: &mut S,
        more: impl Fn(&S) -> bool,
        mut handle: impl FnMut(&mut S, &[Descriptor]) -> Result<u32, QueueError>,
    ) -> bool {
        let mut used = false;
        while more(state) {
            let chain = match self.pop(mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("{what}: queue broken: {e}");
                    break;
                }
            };
            let len = match chain.descriptors.and_then(|d| handle(state, &d)) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("{what}: bad request: {e}");
                    0
                }
            };
            if let Err(e) = self.add_used(mem, chain.head, len) {
                tracing::warn!("{what}: cannot return a buffer: {e}");
            }
            used = true;
        }
        used
    }
}

impl Queue {
    /// Serve a transmit queue into a bounded host-side buffer: pop chains
    /// while `room(state)`, `flush(state)` after each round, and go on until
    /// the queue is empty or the host is full (no room after a flush). The
    /// guest notified once and may wait for its buffers before it notifies
    /// again, so stopping at the bound while the host still takes data would
    /// stall it for good; a full host resumes it when it drains. Returns
    /// whether any chain was returned.
    pub fn drain_to_host<S: ?Sized>(
        &mut self,
        mem: &GuestMemoryMmap,
        what: &str,
        state: &mut S,
        room: impl Fn(&S) -> bool,
        mut handle: impl FnMut(&mut S, &[Descriptor]) -> Result<u32, QueueError>,
        mut flush: impl FnMut(&mut S),
    ) -> bool {
        let mut used = false;
        loop {
            let popped = self.drain_while(mem, what, state, &room, &mut handle);
            used |= popped;
            flush(state);
            if !popped || !room(state) {
                return used;
            }
        }
    }
}

/// Helpers to lay out queues in mock guest memory, for device tests.
#[cfg(test)]
pub mod mock {
    use super::*;

    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;
    pub const DATA: u64 = 0x10000;

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap()
    }

    pub fn queue(size: u16) -> Queue {
        let mut q = Queue::new(size);
        q.desc_table = GuestAddress(DESC);
        q.avail_ring = GuestAddress(AVAIL);
        q.used_ring = GuestAddress(USED);
        q.ready = true;
        q
    }

    pub fn set_desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let b = GuestAddress(DESC + 16 * u64::from(i));
        mem.write_obj(addr, b).unwrap();
        mem.write_obj(len, b.unchecked_add(8)).unwrap();
        mem.write_obj(flags, b.unchecked_add(12)).unwrap();
        mem.write_obj(next, b.unchecked_add(14)).unwrap();
    }

    /// Make chain `head` available as the next entry.
    pub fn publish(mem: &GuestMemoryMmap, head: u16) {
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        let size = 16; // tests use queues of at most 16 entries
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % size)))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    pub fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// The (head, len) of used element `i`.
    pub fn used_elem(mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let b = GuestAddress(USED + 4 + 8 * u64::from(i));
        (
            mem.read_obj(b).unwrap(),
            mem.read_obj(b.unchecked_add(4)).unwrap(),
        )
    }

    pub const NEXT: u16 = VIRTQ_DESC_F_NEXT;
    pub const WRITE: u16 = VIRTQ_DESC_F_WRITE;
    pub const INDIRECT: u16 = VIRTQ_DESC_F_INDIRECT;
}

#[cfg(test)]
mod tests {
    use super::mock::*;
    use super::*;

    #[test]
    fn a_good_chain_is_popped_and_returned() {
        let mem = memory();
        let mut q = queue(16);
        assert!(q.is_valid(&mem));
        set_desc(&mem, 0, DATA, 16, NEXT, 1);
        set_desc(&mem, 1, DATA + 16, 512, WRITE, 0);
        publish(&mem, 0);
        let c = q.pop(&mem).unwrap().unwrap();
        assert_eq!(c.head, 0);
        let d = c.descriptors.unwrap();
        assert_eq!(d.len(), 2);
        assert!(!d[0].write_only && d[1].write_only);
        assert!(q.pop(&mem).unwrap().is_none());
        q.add_used(&mem, 0, 512).unwrap();
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(used_elem(&mem, 0), (0, 512));
    }

    #[test]
    fn malformed_chains_fail_only_their_request() {
        let mem = memory();
        let mut q = queue(16);
        // Out-of-range buffer.
        set_desc(&mem, 0, 0xfff_0000, 16, 0, 0);
        // A loop: 1 -> 2 -> 1.
        set_desc(&mem, 1, DATA, 16, NEXT, 2);
        set_desc(&mem, 2, DATA, 16, NEXT, 1);
        // Next index beyond the queue.
        set_desc(&mem, 3, DATA, 16, NEXT, 200);
        // Indirect.
        set_desc(&mem, 4, DATA, 16, INDIRECT, 0);
        // Range that wraps past the end of memory.
        set_desc(&mem, 5, 0xffff_ffff_ffff_fff0, 0x100, 0, 0);
        for h in 0..6 {
            publish(&mem, h);
        }
        let errs: Vec<_> = (0..6)
            .map(|_| q.pop(&mem).unwrap().unwrap().descriptors.unwrap_err())
            .collect();
        assert!(matches!(errs[0], QueueError::BufferOutOfRange { .. }));
        assert_eq!(errs[1], QueueError::ChainTooLong);
        assert_eq!(errs[2], QueueError::ChainTooLong);
        assert_eq!(errs[3], QueueError::DescriptorIndex(200));
        assert_eq!(errs[4], QueueError::Indirect);
        assert!(matches!(errs[5], QueueError::BufferOutOfRange { .. }));
        // A head index beyond the queue.
        publish(&mem, 99);
        assert_eq!(
            q.pop(&mem).unwrap().unwrap().descriptors.unwrap_err(),
            QueueError::DescriptorIndex(99)
        );
    }

    #[test]
    fn drain_returns_every_chain_and_bad_ones_empty() {
        let mem = memory();
        let mut q = queue(16);
        set_desc(&mem, 0, DATA, 16, WRITE, 0);
        set_desc(&mem, 1, 0xfff_0000, 16, WRITE, 0); // outside memory
        set_desc(&mem, 2, DATA, 8, 0, 0); // the handler rejects it
        for h in 0..3 {
            publish(&mem, h);
        }
        let mut seen = Vec::new();
        let used = q.drain(&mem, "test", |d| {
            seen.push(d.len());
            if Chain::writable_len(d) == 0 {
                return Err(QueueError::Layout("nothing writable"));
            }
            Ok(16)
        });
        assert!(used);
        assert_eq!(
            seen,
            vec![1, 1],
            "the malformed chain never reaches the handler"
        );
        assert_eq!(used_idx(&mem), 3);
        assert_eq!(used_elem(&mem, 0), (0, 16));
        assert_eq!(used_elem(&mem, 1), (1, 0));
        assert_eq!(used_elem(&mem, 2), (2, 0));
        assert!(!q.drain(&mem, "test", |_| Ok(0)), "nothing left");
    }

    #[test]
    fn drain_while_pops_only_while_the_device_wants_more() {
        let mem = memory();
        let mut q = queue(16);
        for h in 0..3 {
            set_desc(&mem, h, DATA, 4, WRITE, 0);
            publish(&mem, h);
        }
        let mut budget = 2u32;
        let used = q.drain_while(
            &mem,
            "test",
            &mut budget,
            |b| *b > 0,
            |b, _| {
                *b -= 1;
                Ok(4)
            },
        );
        assert!(used);
        assert_eq!(used_idx(&mem), 2, "the third chain stays available");
        assert!(q.drain(&mem, "test", |_| Ok(0)));
        assert_eq!(used_idx(&mem), 3);
    }

    #[test]
    fn drain_stops_at_a_broken_queue() {
        let mem = memory();
        let mut q = queue(16);
        mem.write_obj(100u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(!q.drain(&mem, "test", |_| panic!("no chain to handle")));
    }

    #[test]
    fn a_queue_that_is_not_ready_yields_nothing() {
        let mem = memory();
        let mut q = queue(16);
        set_desc(&mem, 0, DATA, 16, 0, 0);
        publish(&mem, 0);
        q.ready = false;
        assert!(q.pop(&mem).unwrap().is_none());
        q.size = 0;
        q.ready = true;
        assert!(q.pop(&mem).unwrap().is_none());
        assert!(q.add_used(&mem, 0, 0).is_err());
    }

    #[test]
    fn an_avail_index_jump_is_a_queue_error() {
        let mem = memory();
        let mut q = queue(16);
        mem.write_obj(100u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(q.pop(&mem).unwrap_err(), QueueError::AvailOverrun(100));
    }

    #[test]
    fn rings_outside_memory_or_bad_sizes_are_invalid() {
        let mem = memory();
        let mut q = queue(16);
        q.size = 12;
        assert!(!q.is_valid(&mem));
        let mut q = queue(16);
        q.used_ring = GuestAddress(0xffff0);
        assert!(!q.is_valid(&mem));
        let mut q = queue(16);
        q.desc_table = GuestAddress(DESC + 1);
        assert!(!q.is_valid(&mem));
    }
}
