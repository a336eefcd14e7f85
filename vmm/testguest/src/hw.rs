//! Port I/O, physical memory access (identity-mapped) and the serial port.

use core::arch::asm;
use core::ptr::{read_volatile, write_volatile};

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

// SAFETY (for the accessors below): the first 4 GiB are identity-mapped and
// the guest only touches RAM the VMM described, its own statics, and device
// windows; volatile accesses keep the compiler from caching them.
pub fn rd8(a: u64) -> u8 {
    unsafe { read_volatile(a as *const u8) }
}
pub fn rd16(a: u64) -> u16 {
    unsafe { read_volatile(a as *const u16) }
}
pub fn rd32(a: u64) -> u32 {
    unsafe { read_volatile(a as *const u32) }
}
pub fn rd64(a: u64) -> u64 {
    unsafe { read_volatile(a as *const u64) }
}
pub fn wr8(a: u64, v: u8) {
    unsafe { write_volatile(a as *mut u8, v) }
}
pub fn wr16(a: u64, v: u16) {
    unsafe { write_volatile(a as *mut u16, v) }
}
pub fn wr32(a: u64, v: u32) {
    unsafe { write_volatile(a as *mut u32, v) }
}
pub fn wr64(a: u64, v: u64) {
    unsafe { write_volatile(a as *mut u64, v) }
}

/// Sum of bytes (ACPI checksums are zero when valid).
pub fn sum(a: u64, len: u64) -> u8 {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd8(a + i)))
}

pub fn bytes_eq(a: u64, s: &[u8]) -> bool {
    s.iter().enumerate().all(|(i, &b)| rd8(a + i as u64) == b)
}

/// COM1, polled.
pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            while inb(0x3fd) & 0x20 == 0 {}
            outb(0x3f8, b);
        }
        Ok(())
    }
}

/// Pulse the reset line through the i8042: the VM ends. Machines without
/// an i8042 (QEMU microvm) get a triple fault instead, which `-no-reboot`
/// also turns into the end of the VM.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    for _ in 0..100_000 {
        core::hint::spin_loop();
    }
    let null_idt = [0u16; 5];
    // SAFETY: deliberately loads an empty IDT and raises an exception: the
    // CPU shuts down. Nothing after this runs.
    unsafe { asm!("lidt [{0}]", "int3", in(reg) null_idt.as_ptr(), options(nostack)) };
    loop {
        // SAFETY: halting with interrupts off just stops this vCPU.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}

/// A bump allocator of zeroed 4 KiB pages from a static pool.
#[repr(C, align(4096))]
struct Pool([u8; 64 * 4096]);
static mut POOL: Pool = Pool([0; 64 * 4096]);
static mut NEXT_PAGE: usize = 0;

pub fn alloc_page() -> u64 {
    // SAFETY: single-threaded guest; the pool is only handed out page by page.
    unsafe {
        let base = core::ptr::addr_of!(POOL) as u64;
        let n = NEXT_PAGE;
        if n >= 64 {
            panic!("page pool exhausted");
        }
        NEXT_PAGE = n + 1;
        base + (n as u64) * 4096
    }
}
