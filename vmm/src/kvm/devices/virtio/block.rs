//! virtio-blk over a raw image file: read, write (unless read-only), flush
//! and `GET_ID` (the disk's serial, which is how the guest finds its disks).

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::{read_config_bytes, VirtioDevice};
use super::queue::{Descriptor, Queue, QueueError};

pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const SECTOR_SIZE: u64 = 512;
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
const QUEUE_SIZE: u16 = 256;
/// Segments per request we tell the driver about (the queue also holds the
/// header and status descriptors).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Requests larger than this fail with an I/O error.
const MAX_REQUEST: u64 = 64 << 20;
/// Host bounce buffer: guest buffers are copied through it piecewise, so a
/// huge descriptor never makes the host allocate its length.
const CHUNK: usize = 64 * 1024;

pub struct Block {
    file: File,
    read_only: bool,
    /// Skip fsync: the disk is thrown away with the VM.
    ephemeral: bool,
    sectors: u64,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
}

impl Block {
    pub fn new(
        file: File,
        read_only: bool,
        ephemeral: bool,
        serial: &str,
    ) -> std::io::Result<Block> {
        let len = file.metadata()?.len();
        let mut s = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = serial.len().min(VIRTIO_BLK_ID_BYTES);
        s[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Block {
            file,
            read_only,
            ephemeral,
            sectors: len / SECTOR_SIZE,
            serial: s,
        })
    }

    /// Execute one request. Returns the status byte's descriptor, the status
    /// and how many bytes went into guest buffers (excluding the status).
    fn execute(
        &mut self,
        descs: &[Descriptor],
        mem: &GuestMemoryMmap,
    ) -> Result<(Descriptor, u8, u32), QueueError> {
        let (header, rest) = descs
            .split_first()
            .ok_or(QueueError::Layout("empty chain"))?;
        let (status, data) = rest
            .split_last()
            .ok_or(QueueError::Layout("no status buffer"))?;
        if header.write_only || header.len < 16 {
            return Err(QueueError::Layout(
                "header must be a readable 16-byte buffer",
            ));
        }
        if !status.write_only || status.len < 1 {
            return Err(QueueError::Layout("status must be a writable buffer"));
        }
        let mut h = [0u8; 16];
        mem.read_slice(&mut h, header.addr)
            .map_err(|_| QueueError::Memory(header.addr.0))?;
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        let all = |w: bool| data.iter().all(|d| d.write_only == w);

        let result = match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = kind == VIRTIO_BLK_T_OUT;
                if !all(!write) {
                    return Err(QueueError::Layout("data buffers have the wrong direction"));
                }
                let end = sector.checked_add(total / SECTOR_SIZE);
                if total & (SECTOR_SIZE - 1) != 0 || total > MAX_REQUEST {
                    tracing::debug!(
                        total,
                        "virtio-blk: data length not whole sectors or too large"
                    );
                    Ok((VIRTIO_BLK_S_IOERR, 0))
                } else if !matches!(end, Some(e) if e <= self.sectors) {
                    tracing::debug!(sector, total, "virtio-blk: request beyond the disk");
                    Ok((VIRTIO_BLK_S_IOERR, 0))
                } else if write && self.read_only {
                    Ok((VIRTIO_BLK_S_IOERR, 0))
                } else {
                    // A read fills `total` bytes of guest buffers.
                    let filled = if write { 0 } else { total as u32 };
                    self.copy(write, data, mem, sector * SECTOR_SIZE)
                        .map(|()| (VIRTIO_BLK_S_OK, filled))
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.read_only || self.ephemeral {
                    Ok((VIRTIO_BLK_S_OK, 0))
                } else {
                    match self.file.sync_data() {
                        Ok(()) => Ok((VIRTIO_BLK_S_OK, 0)),
                        Err(e) => {
                            tracing::warn!("virtio-blk: flush failed: {e}");
                            Ok((VIRTIO_BLK_S_IOERR, 0))
                        }
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                if !all(true) {
                    return Err(QueueError::Layout("GET_ID buffer must be writable"));
                }
                let n = super::queue::Chain::write_to(data, mem, &self.serial)?;
                Ok((VIRTIO_BLK_S_OK, n as u32))
            }
            _ => Ok((VIRTIO_BLK_S_UNSUPP, 0)),
        }?;
        Ok((*status, result.0, result.1))
    }

    /// Copy between the guest's buffers and the disk from `offset`: to the
    /// disk when `write`, else into the guest's buffers.
    fn copy(
        &self,
        write: bool,
        data: &[Descriptor],
        mem: &GuestMemoryMmap,
        offset: u64,
    ) -> Result<(), QueueError> {
        let mut buf = vec![0u8; CHUNK];
        for_each_chunk(data, offset, |at, n, offset| {
            let buf = &mut buf[..n];
            let guest = |_| QueueError::Memory(at.0);
            if write {
                mem.read_slice(buf, at).map_err(guest)?;
                self.file.write_all_at(buf, offset).map_err(|e| {
                    tracing::warn!("virtio-blk: write failed: {e}");
                    QueueError::Layout("host write failed")
                })
            } else {
                self.file.read_exact_at(buf, offset).map_err(|e| {
                    tracing::warn!("virtio-blk: read failed: {e}");
                    QueueError::Layout("host read failed")
                })?;
                mem.write_slice(buf, at).map_err(guest)
            }
        })
    }
}

/// Walk the data buffers in pieces of at most `CHUNK` bytes, with the disk
/// offset each piece maps to: `f(guest address, length, disk offset)`.
fn for_each_chunk(
    data: &[Descriptor],
    mut offset: u64,
    mut f: impl FnMut(GuestAddress, usize, u64) -> Result<(), QueueError>,
) -> Result<(), QueueError> {
    for d in data {
        let mut done = 0usize;
        while done < d.len as usize {
            let n = (d.len as usize - done).min(CHUNK);
            f(d.addr.unchecked_add(done as u64), n, offset)?;
            done += n;
            offset += n as u64;
        }
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64, 512-byte sectors), size_max (u32, not offered),
        // seg_max (u32).
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&self.sectors.to_le_bytes());
        cfg[12..].copy_from_slice(&SEG_MAX.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> bool {
        queues[0].drain(mem, "virtio-blk", |descs| {
            let (status_desc, status, n) = self.execute(descs, mem)?;
            mem.write_obj(status, status_desc.addr)
                .map_err(|_| QueueError::Memory(status_desc.addr.0))?;
            Ok(n + 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::kvm::devices::virtio::mmio::tests::{init, r, w};
    use crate::kvm::devices::virtio::mmio::{
        MmioTransport, INT_CONFIG, INT_USED_RING, REG_CONFIG_GENERATION, REG_INTERRUPT_ACK,
        REG_INTERRUPT_STATUS, VIRTIO_F_VERSION_1,
    };
    use crate::kvm::devices::virtio::queue::mock::*;

    const HDR: u64 = 0x20000;
    const BUF: u64 = 0x21000;
    const ST: u64 = 0x22000;

    fn disk(ro: bool) -> (Arc<GuestMemoryMmap>, MmioTransport, tempfile::NamedTempFile) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!ro)
            .open(f.path())
            .unwrap();
        let mem = Arc::new(memory());
        let b = Block::new(file, ro, false, "kiln-root").unwrap();
        let mut t = MmioTransport::new(Box::new(b), mem.clone()).unwrap();
        let feat = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | if ro { VIRTIO_BLK_F_RO } else { 0 };
        init(&mut t, feat);
        (mem, t, f)
    }

    /// Submit a three-descriptor request; returns (status, used len).
    fn request(
        mem: &GuestMemoryMmap,
        t: &mut MmioTransport,
        kind: u32,
        sector: u64,
        len: u32,
        data_flags: u16,
    ) -> (u8, u32) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(ST)).unwrap();
        set_desc(mem, 0, HDR, 16, NEXT, 1);
        set_desc(mem, 1, BUF, len, NEXT | data_flags, 2);
        set_desc(mem, 2, ST, 1, WRITE, 0);
        publish(mem, 0);
        let before = used_idx(mem);
        t.process_queue(0);
        assert_eq!(used_idx(mem), before.wrapping_add(1));
        let st: u8 = mem.read_obj(GuestAddress(ST)).unwrap();
        (st, used_elem(mem, before % 16).1)
    }

    /// Step 1 of jobs from a snapshot: the snapshot's disk was empty, the
    /// restored one is the job's; after the restore the driver is told to
    /// read the configuration again and finds the new capacity, and the
    /// queue goes on where the snapshot left it.
    #[test]
    fn a_disk_restored_with_another_file_signals_its_new_capacity() {
        let empty = tempfile::NamedTempFile::new().unwrap();
        let mem = Arc::new(memory());
        let b = Block::new(empty.reopen().unwrap(), false, false, "kiln-root").unwrap();
        let mut before = MmioTransport::new(Box::new(b), mem.clone()).unwrap();
        init(&mut before, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);
        let mut cap = [0u8; 8];
        before.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0, "probed empty");
        let gen_before = r(&mut before, REG_CONFIG_GENERATION);
        let saved = before.save_state();

        // A fresh transport over the job's 4 KiB disk, in the same memory.
        let mut job = tempfile::NamedTempFile::new().unwrap();
        job.write_all(&[7u8; 4096]).unwrap();
        let b = Block::new(job.reopen().unwrap(), false, false, "kiln-root").unwrap();
        let mut after = MmioTransport::new(Box::new(b), mem.clone()).unwrap();
        after.restore_state(&saved).unwrap();
        assert_eq!(r(&mut after, REG_INTERRUPT_STATUS), 0);
        after.config_changed();
        assert_eq!(r(&mut after, REG_INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
        assert_eq!(after.irq_evt.read().unwrap(), 1, "interrupted");
        assert_ne!(r(&mut after, REG_CONFIG_GENERATION), gen_before);
        after.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8, "the job's disk: 8 sectors");
        assert_eq!(
            request(&mem, &mut after, VIRTIO_BLK_T_IN, 7, 512, WRITE),
            (VIRTIO_BLK_S_OK, 513),
            "the last sector reads"
        );
        w(&mut after, REG_INTERRUPT_ACK, INT_CONFIG | INT_USED_RING);
        assert_eq!(r(&mut after, REG_INTERRUPT_STATUS), 0);

        // A device no driver activated is not interrupted.
        let b = Block::new(empty.reopen().unwrap(), false, false, "x").unwrap();
        let mut idle = MmioTransport::new(Box::new(b), mem).unwrap();
        idle.config_changed();
        assert_eq!(r(&mut idle, REG_INTERRUPT_STATUS), 0);
        assert!(idle.irq_evt.read().is_err(), "no interrupt");
    }

    #[test]
    fn reads_writes_flushes_and_reports_its_serial() {
        let (mem, mut t, f) = disk(false);
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        assert_eq!(
            request(&mem, &mut t, VIRTIO_BLK_T_IN, 1, 512, WRITE),
            (VIRTIO_BLK_S_OK, 513)
        );
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(
            got,
            [
                (512 % 251) as u8,
                (513 % 251) as u8,
                (514 % 251) as u8,
                (515 % 251) as u8
            ]
        );

        mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(
            request(&mem, &mut t, VIRTIO_BLK_T_OUT, 7, 512, 0).0,
            VIRTIO_BLK_S_OK
        );
        let on_disk = std::fs::read(f.path()).unwrap();
        assert!(on_disk[7 * 512..].iter().all(|&b| b == 0xab));
        assert_eq!(
            request(&mem, &mut t, VIRTIO_BLK_T_FLUSH, 0, 0, 0).0,
            VIRTIO_BLK_S_OK
        );

        let (st, n) = request(&mem, &mut t, VIRTIO_BLK_T_GET_ID, 0, 20, WRITE);
        assert_eq!((st, n), (VIRTIO_BLK_S_OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id[..9], b"kiln-root");
        assert_eq!(
            request(&mem, &mut t, 99, 0, 16, WRITE).0,
            VIRTIO_BLK_S_UNSUPP
        );
    }

    #[test]
    fn read_only_disks_refuse_writes_and_bounds_are_enforced() {
        let (mem, mut t, _f) = disk(true);
        let mut feat = [0u8; 4];
        t.read(0x10, &mut feat);
        assert_ne!(u32::from_le_bytes(feat) as u64 & VIRTIO_BLK_F_RO, 0);
        assert_eq!(
            request(&mem, &mut t, VIRTIO_BLK_T_OUT, 0, 512, 0).0,
            VIRTIO_BLK_S_IOERR
        );
        // Past the end, and a sector number that overflows.
        assert_eq!(
            request(&mem, &mut t, VIRTIO_BLK_T_IN, 8, 512, WRITE).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            request(&mem, &mut t, VIRTIO_BLK_T_IN, u64::MAX, 512, WRITE).0,
            VIRTIO_BLK_S_IOERR
        );
    }

    #[test]
    fn malformed_requests_fail_gracefully() {
        let (mem, mut t, _f) = disk(false);
        // Read into a device-readable buffer: wrong direction, no status written.
        assert_eq!(request(&mem, &mut t, VIRTIO_BLK_T_IN, 0, 512, 0), (0xff, 0));
        // Write from a device-writable buffer.
        assert_eq!(
            request(&mem, &mut t, VIRTIO_BLK_T_OUT, 0, 512, WRITE),
            (0xff, 0)
        );
        // Not whole sectors: an I/O error, not a broken chain.
        assert_eq!(
            request(&mem, &mut t, VIRTIO_BLK_T_IN, 0, 100, WRITE),
            (VIRTIO_BLK_S_IOERR, 1)
        );
        // A descriptor larger than guest memory fails its request.
        assert_eq!(
            request(&mem, &mut t, VIRTIO_BLK_T_IN, 0, 0x8000_0000, WRITE).0,
            0xff
        );
        // Data buffer outside guest memory.
        set_desc(&mem, 0, HDR, 16, NEXT, 1);
        set_desc(&mem, 1, 0xffff_0000, 512, NEXT | WRITE, 2);
        set_desc(&mem, 2, ST, 1, WRITE, 0);
        publish(&mem, 0);
        t.process_queue(0);
        // Status in a read-only buffer; a one-descriptor chain; a loop.
        set_desc(&mem, 2, ST, 1, 0, 0);
        set_desc(&mem, 1, BUF, 512, NEXT | WRITE, 2);
        publish(&mem, 0);
        t.process_queue(0);
        set_desc(&mem, 3, HDR, 16, 0, 0);
        publish(&mem, 3);
        set_desc(&mem, 4, HDR, 16, NEXT, 5);
        set_desc(&mem, 5, HDR, 16, NEXT, 4);
        publish(&mem, 4);
        t.process_queue(0);
        assert_eq!(used_idx(&mem), 8);
        for i in 4..8 {
            assert_eq!(used_elem(&mem, i).1, 0);
        }
        // The device still works afterwards.
        assert_eq!(
            request(&mem, &mut t, VIRTIO_BLK_T_IN, 0, 512, WRITE).0,
            VIRTIO_BLK_S_OK
        );
    }

    #[test]
    fn large_transfers_are_copied_in_chunks_at_the_right_offsets() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..(256 * 1024u32))
            .map(|i| (i / 512 + i % 7) as u8)
            .collect();
        f.write_all(&data).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        let mem = Arc::new(memory());
        let b = Block::new(file, false, true, "big").unwrap();
        let mut t = MmioTransport::new(Box::new(b), mem.clone()).unwrap();
        init(&mut t, VIRTIO_F_VERSION_1);
        const BIG: u64 = 0x40000;
        let len = 160 * 1024u32;
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&2u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        set_desc(&mem, 0, HDR, 16, NEXT, 1);
        set_desc(&mem, 1, BIG, len, NEXT | WRITE, 2);
        set_desc(&mem, 2, ST, 1, WRITE, 0);
        publish(&mem, 0);
        t.process_queue(0);
        assert_eq!(used_elem(&mem, 0).1, len + 1);
        let mut got = vec![0u8; len as usize];
        mem.read_slice(&mut got, GuestAddress(BIG)).unwrap();
        assert_eq!(&got[..], &data[1024..1024 + len as usize]);
        // And back out at another offset.
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&100u64.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        set_desc(&mem, 1, BIG, len, NEXT, 2);
        publish(&mem, 0);
        t.process_queue(0);
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[51200..51200 + len as usize], &got[..]);
    }
}
