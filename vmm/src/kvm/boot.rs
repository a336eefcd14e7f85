//! Loading the kernel, initrd and command line, and the boot-time tables the
//! kernel reads: the PVH `hvm_start_info` (with memory map and module list)
//! or the Linux zero page (`boot_params` with e820), page tables and GDT.
//!
//! Layout below 1 MiB (after Firecracker): GDT 0x500, IDT 0x520, PVH start
//! info 0x6000, PVH module list 0x6040, PVH memory map / zero page 0x7000,
//! boot stack 0x8ff0, page tables 0x9000-0xbfff, command line 0x20000, ACPI
//! tables in [0x9fc00, 0xe0000) with the RSDP at 0xe0000.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::memory::{HIGH_RAM_START, MIB};

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const PVH_MEMMAP_ADDR: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPTE_ADDR: u64 = 0xa000;
pub const PDE_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 2048;
/// End of conventional RAM; [EBDA_START, 1 MiB) is reserved.
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xa0000;
pub const RSDP_ADDR: u64 = 0xe0000;
pub const HIMEM_START: u64 = MIB;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PVH_MAGIC: u32 = 0x336e_c578;
const XLF_KERNEL_64: u16 = 1;
/// Linux keeps its initrd below 2 GiB unless the header says otherwise.
const INITRD_MAX: u64 = 0x8000_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel is neither an ELF (vmlinux) nor a bzImage: {0}")]
    KernelFormat(String),
    #[error("the bzImage does not support the 64-bit boot protocol (needs version >= 2.12 and XLF_KERNEL_64)")]
    BzImageTooOld,
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("the kernel command line is invalid or longer than {CMDLINE_MAX} bytes: {0}")]
    Cmdline(String),
    #[error("writing boot data into guest memory failed at {0:#x}")]
    Memory(u64),
    /// Reported by the VMM process (the message and its causes).
    #[error("{0}")]
    InVmmProcess(String),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `rbx` = start info.
    Pvh(GuestAddress),
    /// Linux 64-bit boot protocol: long mode, `rsi` = zero page.
    Linux64(GuestAddress),
}

/// A loaded kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub entry: EntryMode,
    pub end: u64,
    pub setup_header: Option<setup_header>,
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Load a vmlinux ELF (PVH entry if it has the note, else its ELF entry with
/// the 64-bit protocol) or a bzImage (64-bit entry at load + 0x200).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<Kernel, BootError> {
    load_kernel_from(mem, &mut open("kernel", path)?)
}

/// [`load_kernel`] from a file already open (the VMM process gets
/// descriptors, not paths).
pub fn load_kernel_from(mem: &GuestMemoryMmap, f: &mut File) -> Result<Kernel, BootError> {
    match Elf::load(mem, None, f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryMode::Pvh(addr),
                _ => EntryMode::Linux64(r.kernel_load),
            };
            return Ok(Kernel {
                entry,
                end: r.kernel_end,
                setup_header: None,
            });
        }
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => {}
        Err(e) => return Err(BootError::KernelFormat(e.to_string())),
    }
    let r = BzImage::load(mem, None, f, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| BootError::KernelFormat(e.to_string()))?;
    let hdr = r
        .setup_header
        .ok_or_else(|| BootError::KernelFormat("bzImage without a setup header".into()))?;
    if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::BzImageTooOld);
    }
    Ok(Kernel {
        entry: EntryMode::Linux64(r.kernel_load.unchecked_add(0x200)),
        end: r.kernel_end,
        setup_header: Some(hdr),
    })
}

/// End of the first RAM region (below the MMIO hole).
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.find_region(GuestAddress(0)).map_or(0, |r| r.len())
}

/// Place the initrd page-aligned at the top of low memory (below 2 GiB).
/// Returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    load_initrd_from(mem, &mut open("initramfs", path)?, kernel_end)
}

/// [`load_initrd`] from a file already open.
pub fn load_initrd_from(
    mem: &GuestMemoryMmap,
    f: &mut File,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let size = f
        .metadata()
        .map_err(|source| BootError::Open {
            what: "initramfs",
            path: "(descriptor)".into(),
            source,
        })?
        .len();
    let limit = low_ram_end(mem).min(INITRD_MAX);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end && a >= HIMEM_START)
        .ok_or(BootError::InitrdTooLarge { size, limit })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), f, len)
        .map_err(|_| BootError::Memory(addr))?;
    Ok((addr, size))
}

/// Write the NUL-terminated command line at `CMDLINE_ADDR`; returns its
/// length including the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &c)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(cmdline.len() + 1)
}

/// The e820-style memory map: (address, size, type).
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut m = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for r in mem.iter() {
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.start_addr().raw_value() + r.len();
        if end > start {
            m.push((start, end - start, E820_RAM));
        }
    }
    debug_assert!(m.iter().all(|e| e.0 < HIGH_RAM_START || e.2 == E820_RAM));
    m
}

/// Write `hvm_start_info`, its memory map and the initrd module.
pub fn write_pvh_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let map = memory_map(mem);
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at = PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(at))
            .map_err(|_| BootError::Memory(at))?;
    }
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(|_| BootError::Memory(PVH_MODLIST_ADDR))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_ADDR))
        .map_err(|_| BootError::Memory(PVH_INFO_ADDR))
}

/// Write the Linux zero page (`boot_params`).
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut p = boot_params::default();
    if let Some(h) = header {
        p.hdr = h;
    } else {
        p.hdr.kernel_alignment = 0x0100_0000;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    p.acpi_rsdp_addr = rsdp;
    let map = memory_map(mem);
    for (i, &(addr, size, type_)) in map.iter().enumerate().take(p.e820_table.len()) {
        p.e820_table[i].addr = addr;
        p.e820_table[i].size = size;
        p.e820_table[i].r#type = type_;
    }
    p.e820_entries = map.len().min(p.e820_table.len()) as u8;
    mem.write_obj(p, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|_| BootError::Memory(ZERO_PAGE_ADDR))
}

/// Identity-map the first 1 GiB with 2 MiB pages (64-bit entry only).
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|_| BootError::Memory(at))
    };
    w(PDPTE_ADDR | 0x03, PML4_ADDR)?;
    w(PDE_ADDR | 0x03, PDPTE_ADDR)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, PDE_ADDR + i * 8)?;
    }
    Ok(())
}

/// A GDT descriptor from flags, base and limit (Firecracker's `gdt_entry`).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// GDT for the entry mode: NULL, code (0x08), data (0x10), TSS (0x18).
pub fn gdt(mode: EntryMode) -> [u64; 4] {
    match mode {
        EntryMode::Pvh(_) => [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
        EntryMode::Linux64(_) => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
    }
}

pub fn write_gdt_idt(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), BootError> {
    for (i, e) in gdt(mode).iter().enumerate() {
        let at = GDT_ADDR + 8 * i as u64;
        mem.write_obj(*e, GuestAddress(at))
            .map_err(|_| BootError::Memory(at))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|_| BootError::Memory(IDT_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        super::super::memory::create(64).unwrap()
    }

    #[test]
    fn pvh_info_lists_memory_cmdline_and_initrd() {
        let m = mem();
        write_pvh_info(&m, Some((0x300_0000, 4096)), RSDP_ADDR).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, PVH_MAGIC);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        let e: hvm_memmap_table_entry = m.read_obj(GuestAddress(PVH_MEMMAP_ADDR + 2 * 24)).unwrap();
        assert_eq!((e.addr, e.size, e.type_), (MIB, 63 * MIB, E820_RAM));
        let md: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!((md.paddr, md.size), (0x300_0000, 4096));
    }

    #[test]
    fn zero_page_and_cmdline() {
        let m = mem();
        let n = write_cmdline(&m, "console=ttyS0 reboot=k").unwrap();
        write_zero_page(&m, None, n, Some((0x200_0000, 10)), RSDP_ADDR).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.ramdisk_size }, 10);
        assert_eq!(p.e820_entries, 3);
        let mut c = [0u8; 23];
        m.read_slice(&mut c, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&c, b"console=ttyS0 reboot=k\0");
        assert!(write_cmdline(&m, &"x".repeat(4000)).is_err());
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_memory() {
        let m = mem();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &[7u8; 5000]).unwrap();
        let (addr, size) = load_initrd(&m, f.path(), 2 * MIB).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr, (64 * MIB - 5000) & !0xfff);
        assert_eq!(m.read_obj::<u8>(GuestAddress(addr + 4999)).unwrap(), 7);
        assert!(matches!(
            load_initrd(&m, f.path(), 64 * MIB),
            Err(BootError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let m = mem();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &[0u8; 8192]).unwrap();
        assert!(matches!(
            load_kernel(&m, f.path()),
            Err(BootError::KernelFormat(_))
        ));
    }
}
