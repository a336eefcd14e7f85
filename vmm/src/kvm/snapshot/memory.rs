//! Guest memory in a snapshot: written sparsely (pages of zeros become
//! holes), mapped back `MAP_PRIVATE` so that a restored VM reads the file
//! on first touch and writes to its own copy, never to the file.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::file::MemoryRange;
use super::{io, SnapshotError};

const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;

/// Write every region of `mem` at `offset` on, page-aligned, leaving holes
/// for pages of zeros. Returns where each region went.
pub fn write(
    mem: &GuestMemoryMmap,
    out: &File,
    mut offset: u64,
) -> Result<Vec<MemoryRange>, SnapshotError> {
    let mut ranges = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let len = region.len();
        let start = region.start_addr();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let buf = &mut buf[..n];
            mem.read_slice(buf, GuestAddress(start.0 + done))
                .map_err(|e| SnapshotError::Corrupt(format!("guest memory read: {e}")))?;
            for (i, page) in buf.chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    out.write_all_at(page, offset + done + (i * PAGE) as u64)
                        .map_err(io("write guest memory"))?;
                }
            }
            done += n as u64;
        }
        ranges.push(MemoryRange {
            guest_addr: start.0,
            len,
            file_offset: offset,
        });
        offset += len;
    }
    // Trailing holes count: the file covers the last range.
    out.set_len(offset).map_err(io("size the snapshot"))?;
    Ok(ranges)
}

/// Map `ranges` of `file` as guest memory, private and copy-on-write.
pub fn map_private(file: &File, ranges: &[MemoryRange]) -> Result<GuestMemoryMmap, SnapshotError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for r in ranges {
        let len = usize::try_from(r.len)
            .map_err(|_| SnapshotError::Corrupt(format!("memory range of {} bytes", r.len)))?;
        let fd = file.try_clone().map_err(io("map guest memory"))?;
        let mapping = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(fd, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Io {
                what: "map guest memory",
                source: std::io::Error::other(e.to_string()),
            })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| SnapshotError::Corrupt("memory range wraps".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| SnapshotError::Corrupt(format!("memory ranges: {e}")))
}
