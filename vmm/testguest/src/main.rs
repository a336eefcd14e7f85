//! kiln's bare-metal conformance guest for the embedded KVM VMM.
//!
//! Entered through the PVH ELF note in 32-bit protected mode (`ebx` =
//! `hvm_start_info`), it builds an identity map of the first 4 GiB, switches
//! to long mode and runs [`kmain`], which checks what the VMM set up: the
//! PVH start info and memory map, the command line, the initrd, the ACPI
//! tables, and the virtio-mmio console, block and rng devices (driven by
//! polling: interrupts are never enabled). Every result is a line
//! `CHECK <name> ok|fail <detail>` on the serial port and on the console
//! port `org.kiln.agent.0`; the last line is `DONE <ok> <fail>`, then the
//! guest resets through the i8042.
#![no_std]
#![no_main]

mod checks;
mod hw;
mod net;
mod virtio;

use core::arch::global_asm;
use core::fmt::Write;

global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long _start32
    .balign 4
    .popsection

    .section .text.entry, "ax"
    .code32
    .global _start32
_start32:
    cli
    # POST code 0x01 on port 0x80: the VMM's first exit, "guest is running".
    movb $0x01, %al
    outb %al, $0x80
    movl %ebx, %esi
    movl $pdpt, %eax
    orl $3, %eax
    movl %eax, pml4
    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $12, %eax
    addl $pd, %eax
    orl $3, %eax
    movl %eax, pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jb 1b
    xorl %ecx, %ecx
2:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, pd(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    lgdt gdt64_ptr
    ljmp $0x08, $_start64

    .code64
_start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movabsq $stack_top, %rsp
    movl %esi, %edi
    call kmain
3:
    hlt
    jmp 3b

    .section .rodata.gdt, "a"
    .balign 16
gdt64:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
gdt64_ptr:
    .word gdt64_ptr - gdt64 - 1
    .long gdt64

    .section .bss.boot, "aw", @nobits
    .balign 4096
pml4:
    .skip 4096
pdpt:
    .skip 4096
pd:
    .skip 4 * 4096
stack:
    .skip 65536
stack_top:
"#,
    options(att_syntax)
);

#[no_mangle]
extern "C" fn kmain(start_info: u32) -> ! {
    let mut ctx = checks::Ctx::new();
    checks::run(&mut ctx, u64::from(start_info));
    let (ok, fail) = (ctx.ok, ctx.fail);
    let _ = writeln!(ctx.out(), "DONE {ok} {fail}");
    ctx.flush_line();
    hw::reset()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut s = hw::Serial;
    let _ = writeln!(s, "CHECK panic fail {info}");
    hw::reset()
}
