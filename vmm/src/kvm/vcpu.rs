//! vCPU set-up (CPUID from [`super::cpuid`], MSRs, registers, FPU, LAPIC)
//! and the `KVM_RUN` loop.
//!
//! Per-vCPU order follows Firecracker: CPUID before MSRs (KVM reports
//! CPUID-dependent MSRs as absent otherwise), then registers, FPU, special
//! registers and the LAPIC's LINT0/LINT1.

use std::sync::Arc;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::boot::{self, EntryMode};
use super::bus::{Bus, PioAction};
use super::control::Control;
use super::cpuid;
use crate::machine::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("could not build the MSR list")]
    Msrs,
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
    move |e| VcpuError::Kvm(what, e)
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;

pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

/// A `kvm_segment` from a GDT descriptor at `index`.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = (((entry >> 48) & 0xf) << 16 | (entry & 0xffff)) as u32;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Configure one vCPU for boot. Only the boot vCPU (id 0) gets entry
/// registers; the others wait for INIT/SIPI in the in-kernel LAPIC.
pub fn configure(
    vcpu: &VcpuFd,
    id: u32,
    count: u32,
    cpuid: &CpuId,
    entry: EntryMode,
    tsc_deadline: bool,
) -> Result<(), VcpuError> {
    let mut cpuid = cpuid.clone();
    cpuid::normalize_cpuid(&mut cpuid, id, count, tsc_deadline);
    vcpu.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;

    let msrs = Msrs::from_entries(&boot_msrs()).map_err(|_| VcpuError::Msrs)?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
    if n != msrs.as_slice().len() {
        // Nested or paravirtual KVM may lack some (e.g. MTRRs): not fatal.
        tracing::debug!(
            set = n,
            wanted = msrs.as_slice().len(),
            "KVM accepted only some boot MSRs"
        );
    }

    if id == 0 {
        let mut regs = kvm_regs {
            rflags: 0x2,
            ..Default::default()
        };
        match entry {
            EntryMode::Pvh(rip) => {
                regs.rip = rip.0;
                regs.rbx = boot::PVH_INFO_ADDR;
            }
            EntryMode::Linux64(rip) => {
                regs.rip = rip.0;
                regs.rsp = boot::BOOT_STACK;
                regs.rbp = boot::BOOT_STACK;
                regs.rsi = boot::ZERO_PAGE_ADDR;
            }
        }
        vcpu.set_regs(&regs).map_err(kvm("set registers"))?;
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set FPU state"))?;

    if id == 0 {
        let mut sregs = vcpu.get_sregs().map_err(kvm("get special registers"))?;
        let gdt = boot::gdt(entry);
        let code = segment_from_gdt(gdt[1], 1);
        let data = segment_from_gdt(gdt[2], 2);
        let tss = segment_from_gdt(gdt[3], 3);
        sregs.gdt.base = boot::GDT_ADDR;
        sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
        sregs.idt.base = boot::IDT_ADDR;
        sregs.idt.limit = 7;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        match entry {
            EntryMode::Pvh(_) => {
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
            EntryMode::Linux64(_) => {
                sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
                sregs.cr3 = boot::PML4_ADDR;
                sregs.cr4 |= X86_CR4_PAE;
                sregs.efer |= EFER_LME | EFER_LMA;
            }
        }
        vcpu.set_sregs(&sregs)
            .map_err(kvm("set special registers"))?;
    }

    let mut lapic = vcpu.get_lapic().map_err(kvm("get the LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[reg + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("set the LAPIC"))?;
    Ok(())
}

/// The vCPU thread: run until the guest resets, fails, or we are told to stop.
pub fn run(mut vcpu: VcpuFd, id: u32, bus: Arc<Bus>, control: Arc<Control>) {
    use super::stats::ExitReason as R;
    let exits = &control.exits;
    let status = loop {
        if control.stopping() {
            return;
        }
        if control.pause.requested() {
            control
                .pause
                .park(id as usize, &mut vcpu, || control.stopping());
            continue;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                exits.count(R::IoOut);
                control.first_exit();
                match bus.pio_write(port, data) {
                    Some(PioAction::Reset) => {
                        tracing::debug!(id, port, "guest reset the machine");
                        break ExitStatus::Shutdown;
                    }
                    Some(PioAction::None) => {}
                    None => exits.unhandled_port(port, true),
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                exits.count(R::IoIn);
                control.first_exit();
                if !bus.pio_read(port, data) {
                    exits.unhandled_port(port, false);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                exits.count(R::MmioRead);
                control.first_exit();
                bus.mmio_read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                exits.count(R::MmioWrite);
                control.first_exit();
                bus.mmio_write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {
                exits.count(R::Hlt);
                // Only without an in-kernel LAPIC; ours has one.
                tracing::debug!(id, "vCPU halted");
            }
            Ok(VcpuExit::Shutdown) => {
                exits.count(R::Shutdown);
                break ExitStatus::Failed(format!("vCPU {id}: guest triple fault (CPU shutdown)"));
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                exits.count(R::SystemEvent);
                tracing::debug!(id, kind, "guest system event");
                break ExitStatus::Shutdown;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                exits.count(R::Other);
                break ExitStatus::Failed(format!(
                    "vCPU {id}: VM entry failed (reason {reason:#x}, cpu {cpu})"
                ));
            }
            Ok(VcpuExit::InternalError) => {
                exits.count(R::Other);
                break ExitStatus::Failed(format!(
                    "vCPU {id}: KVM internal error (emulation failure)"
                ));
            }
            Ok(other) => {
                exits.count(R::Other);
                break ExitStatus::Failed(format!("vCPU {id}: unexpected exit {other:?}"));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                exits.count(R::Interrupted);
            }
            Err(e) => break ExitStatus::Failed(format!("vCPU {id}: KVM_RUN failed: {e}")),
        }
    };
    tracing::debug!(id, ?status, "vCPU stopped");
    control.finish(status);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_become_segments() {
        let cs = segment_from_gdt(boot::gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (cs.selector, cs.l, cs.present, cs.type_, cs.limit),
            (8, 1, 1, 0xb, 0xffff_ffff)
        );
        let ds = segment_from_gdt(boot::gdt_entry(0xc093, 0, 0xffff_ffff), 2);
        assert_eq!((ds.db, ds.l, ds.s, ds.type_), (1, 0, 1, 3));
        let tss = segment_from_gdt(boot::gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.s, tss.g), (0x67, 0, 0));
    }
}
