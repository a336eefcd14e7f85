//! Guest memory in a snapshot: written sparsely (pages of zeros become
//! holes), mapped back `MAP_PRIVATE` so that a restored VM reads the file
//! on first touch and writes to its own copy, never to the file.
//!
//! Writing reads only the pages the host has resident (`mincore`): a page
//! of anonymous guest memory nobody ever touched is not resident and reads
//! as zeros, and a Linux guest at its agent's ready point has touched a
//! small part of its memory. That holds only where no page can be swapped
//! out (a swapped-out page is not resident either but holds data): with
//! swap on the host, or memory backed by a file (a restored VM), every
//! page is read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::file::MemoryRange;
use super::{io, SnapshotError};

const PAGE: usize = 4096;

/// Whether the host has no swap (`SwapTotal: 0 kB` in `/proc/meminfo`),
/// read once. Unknown (unreadable) counts as swap.
static NO_SWAP: OnceLock<bool> = OnceLock::new();

/// Whether the host has no swap, read once, for [`write`]. The VMM process calls it
/// before its jail hides `/proc`; elsewhere `write` reads it when first
/// needed.
pub fn no_swap() -> bool {
    *NO_SWAP.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo").is_ok_and(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("SwapTotal:"))
                .is_some_and(|v| v.trim() == "0 kB")
        })
    })
}

/// One byte per page of `region`, bit 0 set where the page is resident;
/// `None` where residency does not tell which pages are zeros (swap on the
/// host, file-backed memory) or `mincore` failed.
fn resident_pages(region: &GuestRegionMmap) -> Option<Vec<u8>> {
    if region.file_offset().is_some() || !no_swap() {
        return None;
    }
    let len = usize::try_from(region.len()).ok()?;
    let mut vec = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: the range is a live mapping owned by `region` (page-aligned:
    // mmap), and `vec` has one byte per page of it.
    let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
    (rc == 0).then_some(vec)
}

/// How many pages [`write`] read and wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Pages read (resident ones, or all).
    pub read: u64,
    /// Pages written (not all zeros).
    pub written: u64,
}

/// Write every region of `mem` at `offset` on, page-aligned, leaving holes
/// for pages of zeros. Returns where each region went. The VM must be
/// paused and its devices locked: nothing may write guest memory meanwhile.
///
/// Straight from the mapping: each page is compared with a page of zeros
/// (`memcmp`) and runs of pages that are not are written with one
/// `pwrite` each (the kernel copies), so that an unoptimised build is not
/// slow here either.
pub fn write(
    mem: &GuestMemoryMmap,
    out: &File,
    mut offset: u64,
) -> Result<(Vec<MemoryRange>, Written), SnapshotError> {
    static ZEROS: [u8; PAGE] = [0; PAGE];
    let mut ranges = Vec::new();
    let mut count = Written::default();
    for region in mem.iter() {
        let len = usize::try_from(region.len())
            .map_err(|_| SnapshotError::Corrupt("guest memory region too large".into()))?;
        let start = region.start_addr();
        let resident = resident_pages(region);
        // SAFETY: `region` maps `len` bytes at `as_ptr()` for as long as
        // `mem` lives (it outlives this borrow). Nothing writes them while
        // the slice lives: the caller paused every vCPU and holds every
        // device's lock (the only writers of guest memory).
        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        let pages = len.div_ceil(PAGE);
        let mut page = 0;
        while page < pages {
            let data = |p: usize| {
                let in_core = resident.as_ref().is_none_or(|r| r[p] & 1 == 1);
                let b = &bytes[p * PAGE..((p + 1) * PAGE).min(len)];
                in_core && b != &ZEROS[..b.len()]
            };
            count.read += u64::from(resident.as_ref().is_none_or(|r| r[page] & 1 == 1));
            if !data(page) {
                page += 1;
                continue;
            }
            let run = page;
            page += 1;
            while page < pages && data(page) {
                count.read += 1;
                page += 1;
            }
            count.written += (page - run) as u64;
            let from = run * PAGE;
            out.write_all_at(&bytes[from..(page * PAGE).min(len)], offset + from as u64)
                .map_err(io("write guest memory"))?;
        }
        ranges.push(MemoryRange {
            guest_addr: start.0,
            len: len as u64,
            file_offset: offset,
        });
        offset += len as u64;
    }
    // Trailing holes count: the file covers the last range.
    out.set_len(offset).map_err(io("size the snapshot"))?;
    Ok((ranges, count))
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// The pages the guest wrote come back at their places, zeros are
    /// holes, and without swap only the touched pages are read.
    #[test]
    fn only_written_pages_are_in_the_file_and_untouched_ones_are_not_read() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let marks = [(3 * PAGE as u64, 0xa5u8), (700 * PAGE as u64 + 17, 0x5a)];
        for (addr, b) in marks {
            mem.write_slice(&[b], GuestAddress(addr)).unwrap();
        }
        // Touched, but zeros: read, not written.
        mem.write_slice(&[0u8; 8], GuestAddress(900 * PAGE as u64))
            .unwrap();
        let file = tempfile::tempfile().unwrap();
        let (ranges, pages) = write(&mem, &file, PAGE as u64).unwrap();
        assert_eq!(ranges.len(), 1);
        assert_eq!(pages.written, 2, "{pages:?}");
        if no_swap() {
            assert_eq!(pages.read, 3, "only the resident pages: {pages:?}");
        } else {
            assert_eq!(pages.read, 1024, "swap on: every page: {pages:?}");
        }
        let mapped = map_private(&file, &ranges).unwrap();
        let mut all = vec![0u8; 4 << 20];
        mapped.read_slice(&mut all, GuestAddress(0)).unwrap();
        let mut want = vec![0u8; 4 << 20];
        for (addr, b) in marks {
            want[addr as usize] = b;
        }
        assert!(all == want, "the restored memory differs");
    }
}
