//! Reading a stopped vCPU's state out of KVM and writing it into a new one.
//!
//! Orders follow Firecracker (`arch/x86_64/vcpu.rs`): on save, MP state
//! first (`KVM_GET_MP_STATE` may deliver pending LAPIC events, changing
//! what comes after); on restore, CPUID first (KVM drops MSRs the CPUID
//! does not announce), then MP state, registers, FPU/XSAVE, XCRs, debug
//! registers, LAPIC, MSRs (TSC deadline after the TSC), events last.

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use super::state::VcpuState;
use super::{kvm, SnapshotError};

/// IA32_MCG_CTL: listed by KVM, not readable unless MCG_CTL_P (Firecracker
/// leaves it out too).
const MSR_IA32_MCG_CTL: u32 = 0x17b;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The MSRs to save: what KVM lists, less the ones never readable, TSC
/// deadline last (it is relative to the TSC, restored before it).
pub fn msrs_to_save(kvm_fd: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("list the MSRs to save"))?;
    let mut v: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|&i| i != MSR_IA32_MCG_CTL)
        .collect();
    if let Some(p) = v.iter().position(|&i| i == MSR_IA32_TSC_DEADLINE) {
        let d = v.remove(p);
        v.push(d);
    }
    Ok(v)
}

fn entries(indices: &[u32]) -> Vec<kvm_msr_entry> {
    indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect()
}

/// Read `indices`; an MSR KVM cannot read is left out (it stops at the
/// first one it cannot read: skip it and go on).
fn get_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    let mut skipped = Vec::new();
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let mut msrs = Msrs::from_entries(&entries(chunk))
            .map_err(|e| SnapshotError::Corrupt(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("read MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(chunk.len())]);
        if n < chunk.len() {
            skipped.push(chunk[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    if !skipped.is_empty() {
        tracing::debug!(?skipped, "MSRs KVM lists but cannot read; not saved");
    }
    Ok(out)
}

/// Read one vCPU's state. The vCPU must not be running (its thread is
/// parked, or it has never run).
pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, SnapshotError> {
    let mp_state = vcpu.get_mp_state().map_err(kvm("read the MP state"))?;
    let regs = vcpu.get_regs().map_err(kvm("read the registers"))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(kvm("read the special registers"))?;
    let xsave = vcpu.get_xsave().map_err(kvm("read the XSAVE area"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm("read the XCRs"))?;
    let debugregs = vcpu
        .get_debug_regs()
        .map_err(kvm("read the debug registers"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("read the LAPIC"))?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("read the CPUID"))?;
    let msrs = get_msrs(vcpu, msr_indices)?;
    let events = vcpu
        .get_vcpu_events()
        .map_err(kvm("read the vCPU events"))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// Load `s` into a vCPU that has never run.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), SnapshotError> {
    if s.cpuid.is_empty() || s.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(SnapshotError::Corrupt(format!(
            "{} CPUID entries",
            s.cpuid.len()
        )));
    }
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|e| SnapshotError::Corrupt(format!("CPUID: {e:?}")))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("set the CPUID"))?;
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("set the MP state"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("set the registers"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(kvm("set the special registers"))?;
    // SAFETY: KVM_SET_XSAVE reads past the legacy 4 KiB `kvm_xsave` only
    // when XSTATE features were enabled dynamically (arch_prctl
    // ARCH_REQ_XCOMP_GUEST_PERM); the VMM never enables any, so KVM reads
    // exactly the structure passed.
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm("set the XSAVE area"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("set the XCRs"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(kvm("set the debug registers"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("set the LAPIC"))?;
    for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk)
            .map_err(|e| SnapshotError::Corrupt(format!("MSRs: {e:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        if n != chunk.len() {
            let index = chunk.get(n).map_or(0, |m| m.index);
            return Err(SnapshotError::Mismatch(format!(
                "KVM refused MSR {index:#x} (this host's KVM differs from the one \
                 that took the snapshot)"
            )));
        }
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("set the vCPU events"))?;
    Ok(())
}
