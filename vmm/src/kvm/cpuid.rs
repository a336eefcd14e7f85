//! The CPUID a vCPU is given: KVM's supported CPUID, patched per vCPU
//! (APIC ids, topology, hypervisor bit, TSC deadline timer) and normalized
//! the way Firecracker does where a stock guest kernel looks.

use kvm_bindings::CpuId;

const CPUID_HYPERVISOR: u32 = 1 << 31;
const CPUID_TSC_DEADLINE: u32 = 1 << 24;
const CPUID_HTT: u32 = 1 << 28;
const CPUID_EPB: u32 = 1 << 3;
const CPUID_PDCM: u32 = 1 << 15;
/// Leaf 7 EDX: the IA32_ARCH_CAPABILITIES MSR (Intel's; Firecracker hides it on AMD).
const CPUID_ARCH_CAPABILITIES: u32 = 1 << 29;
/// Leaf 0x8000_0001 ECX: topology extensions (leaves 0x8000_001d/1e).
const CPUID_TOPOEXT: u32 = 1 << 22;
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

/// The host's CPUID (the machine KVM runs on).
pub fn host_cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = std::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

fn is_amd(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| {
            let v = [e.ebx, e.edx, e.ecx];
            v == [0x6874_7541, 0x6974_6e65, 0x444d_4163] // AuthenticAMD
                || v == [0x6f67_7948, 0x6e65_476e, 0x656e_6975] // HygonGenuine
        })
}

/// Patch the host's supported CPUID for vCPU `id` of `count`.
pub fn normalize_cpuid(cpuid: &mut CpuId, id: u32, count: u32, tsc_deadline: bool) {
    normalize_cpuid_with(cpuid, id, count, tsc_deadline, &host_cpuid);
}

/// [`normalize_cpuid`] with the host's CPUID given (for tests). Follows
/// Firecracker's normalization where the stock guest kernel looks: one
/// thread per core and `count` cores in one package, no PMU, and on AMD no
/// `arch_capabilities`, topology extensions (0x8000_001d/1e), cache and TLB
/// leaves and the brand string filled from the host when KVM leaves them
/// empty.
pub fn normalize_cpuid_with(
    cpuid: &mut CpuId,
    id: u32,
    count: u32,
    tsc_deadline: bool,
    host: &dyn Fn(u32, u32) -> [u32; 4],
) {
    // Bits needed to number `count` logical processors.
    let shift = 32 - count.saturating_sub(1).leading_zeros();
    let amd = is_amd(cpuid);
    let max_ext = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0000)
        .map_or(0, |e| e.eax);
    // Leaves KVM left out or empty that the host has: brand string, L1/L2
    // cache and TLB descriptions, and on AMD the cache topology.
    let mut fill: Vec<(u32, u32)> = (0x8000_0002..=0x8000_0006)
        .filter(|l| *l <= max_ext)
        .map(|l| (l, 0))
        .collect();
    let topoext = amd && max_ext >= 0x8000_001e;
    if topoext {
        for sub in 0..8 {
            let r = host(0x8000_001d, sub);
            if r[0] & 0x1f == 0 {
                break; // no more cache levels
            }
            fill.push((0x8000_001d, sub));
        }
        fill.push((0x8000_001e, 0));
    }
    for (leaf, sub) in fill {
        let have = cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == leaf && e.index == sub);
        let r = host(leaf, sub);
        match have {
            Some(e) if [e.eax, e.ebx, e.ecx, e.edx] == [0; 4] => {
                [e.eax, e.ebx, e.ecx, e.edx] = r;
            }
            Some(_) => {}
            None => {
                let entry = kvm_bindings::kvm_cpuid_entry2 {
                    function: leaf,
                    index: sub,
                    flags: if leaf == 0x8000_001d {
                        KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                    } else {
                        0
                    },
                    eax: r[0],
                    ebx: r[1],
                    ecx: r[2],
                    edx: r[3],
                    ..Default::default()
                };
                if cpuid.push(entry).is_err() {
                    tracing::debug!(leaf, sub, "no room for another CPUID entry");
                }
            }
        }
    }
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ecx |= CPUID_HYPERVISOR;
                e.ecx &= !CPUID_PDCM;
                if tsc_deadline {
                    e.ecx |= CPUID_TSC_DEADLINE;
                }
                // APIC id, CLFLUSH line size (8 * 8 bytes), logical count.
                e.ebx = (id << 24) | (8 << 8) | if count > 1 { (count & 0xff) << 16 } else { 0 };
                if count > 1 {
                    e.edx |= CPUID_HTT;
                } else {
                    e.edx &= !CPUID_HTT;
                }
            }
            0x6 => e.ecx &= !CPUID_EPB,
            0x7 if amd && e.index == 0 => e.edx &= !CPUID_ARCH_CAPABILITIES,
            // No PMU.
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Topology: one thread per core, `count` cores in one package.
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8; // SMT level
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = count;
                        e.ecx = 1 | (2 << 8); // core level
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0x8000_0001 if topoext => e.ecx |= CPUID_TOPOEXT,
            0x8000_0008 if amd => {
                // Cores in the package - 1, and the APIC id bits they use.
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (count.saturating_sub(1) & 0xff);
            }
            0x8000_001d => {
                // Threads sharing the cache - 1: L1/L2 are per core (one
                // thread each), L3 is shared by the package.
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & !(0xfff << 14)) | ((sharing & 0xfff) << 14);
            }
            0x8000_001e => {
                e.eax = id; // extended APIC id
                e.ebx = id & 0xff; // core id; one thread per core
                e.ecx = 0; // node 0, one node
                e.edx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    #[test]
    fn cpuid_is_patched_per_vcpu() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                edx: 0,
                ecx: CPUID_PDCM,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 2,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        normalize_cpuid(&mut c, 2, 4, false);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & CPUID_HYPERVISOR, 0);
        assert_eq!(e[0].ecx & CPUID_PDCM, 0);
        assert_ne!(e[0].edx & CPUID_HTT, 0);
        assert_eq!(e[1].edx, 2);
        assert_eq!((e[2].eax, e[2].ebx), (2, 4));
        assert_eq!(e[3].ecx, 2);
    }

    fn entry(function: u32, index: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
            ..Default::default()
        }
    }

    /// An AMD host with three cache levels and a brand string.
    fn amd_host(leaf: u32, sub: u32) -> [u32; 4] {
        let brand = |b: &[u8; 16]| {
            [0, 4, 8, 12].map(|i| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]))
        };
        match (leaf, sub) {
            (0x8000_0002, _) => brand(b"AMD EPYC 7B13 64"),
            (0x8000_0005, _) => [1, 2, 3, 4],
            (0x8000_001d, 0) => [0x121 | (1 << 14), 0, 0, 0], // L1d, shared by 2
            (0x8000_001d, 1) => [0x122 | (1 << 14), 0, 0, 0], // L1i
            (0x8000_001d, 2) => [0x143 | (1 << 14), 0, 0, 0], // L2
            (0x8000_001d, 3) => [0x163 | (15 << 14), 0, 0, 0], // L3, shared by 16
            (0x8000_001e, _) => [9, 0x104, 0x100, 0],
            _ => [0; 4],
        }
    }

    #[test]
    fn amd_cpuid_gets_topology_extensions_caches_and_brand_but_no_arch_capabilities() {
        let entries = [
            entry(0, 0, [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            entry(7, 0, [0, 0, 0, CPUID_ARCH_CAPABILITIES | 1]),
            entry(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 1, 0]),
            entry(0x8000_0002, 0, [0; 4]),
            entry(0x8000_0008, 0, [0x3030, 0, 0xffff_ffff, 0]),
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        normalize_cpuid_with(&mut c, 1, 2, false, &|l, s| amd_host(l, s));
        let get = |f: u32, i: u32| {
            *c.as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap_or_else(|| panic!("leaf {f:#x}.{i} missing"))
        };
        assert_eq!(get(7, 0).edx, 1, "arch_capabilities hidden on AMD");
        assert_ne!(get(0x8000_0001, 0).ecx & CPUID_TOPOEXT, 0);
        let brand = get(0x8000_0002, 0);
        assert_eq!(brand.eax.to_le_bytes(), *b"AMD ");
        assert_eq!(
            get(0x8000_0005, 0).edx,
            4,
            "L1 cache/TLB leaf from the host"
        );
        // L1d per core; L3 shared by both vCPUs; subleaves are indexed.
        let l1 = get(0x8000_001d, 0);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!(l1.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        assert_eq!((get(0x8000_001d, 3).eax >> 14) & 0xfff, 1);
        let e = get(0x8000_001e, 0);
        assert_eq!((e.eax, e.ebx, e.ecx), (1, 1, 0));
        let nc = get(0x8000_0008, 0).ecx;
        assert_eq!((nc & 0xff, (nc >> 12) & 0xf), (1, 1));
        assert_eq!(nc & 0xffff_0000, 0xffff_0000, "other bits kept");
    }

    #[test]
    fn intel_cpuid_keeps_arch_capabilities_and_gets_no_amd_leaves() {
        let entries = [
            entry(0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(7, 0, [0, 0, 0, CPUID_ARCH_CAPABILITIES]),
            entry(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            entry(0x8000_0001, 0, [0; 4]),
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        normalize_cpuid_with(&mut c, 0, 1, false, &|l, s| amd_host(l, s));
        let e = c.as_slice();
        assert_eq!(e[1].edx, CPUID_ARCH_CAPABILITIES);
        assert_eq!(e[3].ecx & CPUID_TOPOEXT, 0);
        assert!(!e.iter().any(|x| x.function == 0x8000_001d));
    }
}
