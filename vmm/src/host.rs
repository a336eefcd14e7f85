//! What the host can run: hardware KVM, nested PVM, or nothing.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `KVM_GET_API_VERSION` (`_IO(KVMIO, 0x00)`).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// `KVM_CHECK_EXTENSION` (`_IO(KVMIO, 0x03)`).
const KVM_CHECK_EXTENSION: libc::c_ulong = 0xAE03;
const KVM_API_VERSION: libc::c_int = 12;

/// Capabilities the kvm backend cannot run without (see `kvm::KvmMachine::start`).
pub(crate) const REQUIRED_CAPS: [kvm_ioctls::Cap; 5] = [
    kvm_ioctls::Cap::Irqchip,
    kvm_ioctls::Cap::Ioeventfd,
    kvm_ioctls::Cap::Irqfd,
    kvm_ioctls::Cap::UserMemory,
    kvm_ioctls::Cap::Pit2,
];

/// What the CPU this runs on says about virtualization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuVirt {
    /// `svm` (AMD-V) or `vmx` (VT-x) in `/proc/cpuinfo`.
    pub extension: Option<&'static str>,
    /// The CPU reports a hypervisor underneath (CPUID.1:ECX bit 31): this host
    /// is itself a VM.
    pub in_vm: bool,
    /// That hypervisor's CPUID signature (leaf 0x4000_0000), e.g.
    /// `KVMKVMKVM` or `TCGTCGTCGTCG` (QEMU's emulator).
    pub hypervisor: Option<String>,
}

impl CpuVirt {
    /// One clause: "AMD-V, inside a VM run by QEMU TCG (TCGTCGTCGTCG)".
    pub fn describe(&self) -> String {
        let ext = match self.extension {
            Some("svm") => "AMD-V (svm)",
            Some(_) => "VT-x (vmx)",
            None => "no VT-x/AMD-V",
        };
        if !self.in_vm {
            return format!("{ext}, bare metal");
        }
        let who = match self.hypervisor.as_deref() {
            Some("TCGTCGTCGTCG") => "QEMU's TCG emulator (nested virtualization; every guest exit is emulated, so guests are far slower than on hardware)".to_string(),
            Some(sig) if sig.starts_with("KVMKVMKVM") => "KVM (nested virtualization)".to_string(),
            Some(sig) => format!("a hypervisor with CPUID signature '{sig}' (nested virtualization)"),
            None => "an unidentified hypervisor (nested virtualization)".to_string(),
        };
        format!("{ext}, inside a VM run by {who}")
    }
}

/// Read the CPU's virtualization flags and, inside a VM, its hypervisor.
pub fn cpu_virt() -> CpuVirt {
    cpu_virt_from(
        &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
        &crate::kvm::cpuid::host_cpuid,
    )
}

fn cpu_virt_from(cpuinfo: &str, cpuid: &dyn Fn(u32, u32) -> [u32; 4]) -> CpuVirt {
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let extension = ["svm", "vmx"].into_iter().find(|f| flags.contains(f));
    let in_vm = cpuid(1, 0)[2] & (1 << 31) != 0 || flags.contains(&"hypervisor");
    let hypervisor = in_vm
        .then(|| {
            let r = cpuid(0x4000_0000, 0);
            let mut sig = Vec::with_capacity(12);
            for w in [r[1], r[2], r[3]] {
                sig.extend_from_slice(&w.to_le_bytes());
            }
            let sig: String = sig
                .iter()
                .take_while(|b| **b != 0)
                .map(|&b| char::from(b))
                .collect();
            (!sig.is_empty() && sig.chars().all(|c| c.is_ascii_graphic() || c == ' '))
                .then_some(sig)
        })
        .flatten();
    CpuVirt {
        extension,
        in_vm,
        hypervisor,
    }
}

/// Whether `/dev/kvm` can run an unmodified guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmSupport {
    /// Hardware virtualization (VT-x/AMD-V) behind a usable `/dev/kvm`.
    Hardware,
    /// `/dev/kvm` works but the host has no VT-x/AMD-V (e.g. nested PVM):
    /// tiny guests run, stock Linux kernels do not.
    NoHardwareVirt(String),
    /// `/dev/kvm` is missing or cannot be used.
    Unavailable(String),
}

impl KvmSupport {
    pub fn runs_unmodified_guests(&self) -> bool {
        matches!(self, KvmSupport::Hardware)
    }

    /// `/dev/kvm` answers at all (tiny guests may run).
    pub fn device_usable(&self) -> bool {
        !matches!(self, KvmSupport::Unavailable(_))
    }

    /// One line for `kiln doctor` and warnings.
    pub fn describe(&self) -> String {
        match self {
            KvmSupport::Hardware => {
                "hardware virtualization (VT-x/AMD-V) behind /dev/kvm: unmodified guests run".into()
            }
            KvmSupport::NoHardwareVirt(why) | KvmSupport::Unavailable(why) => why.clone(),
        }
    }
}

/// Probe `/dev/kvm` and the CPU flags.
pub fn probe_kvm() -> KvmSupport {
    probe_kvm_at(Path::new("/dev/kvm"), Path::new("/proc/cpuinfo"))
}

fn probe_kvm_at(dev: &Path, cpuinfo: &Path) -> KvmSupport {
    let file = match OpenOptions::new().read(true).write(true).open(dev) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return KvmSupport::Unavailable(format!(
                "{} does not exist: load the kvm_intel or kvm_amd module, or enable \
                 virtualization in the firmware",
                dev.display()
            ))
        }
        Err(e) => {
            return KvmSupport::Unavailable(format!(
                "cannot open {}: {e} (add your user to the 'kvm' group or run as root)",
                dev.display()
            ))
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int;
    // `file` is an open descriptor that outlives the call.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version != KVM_API_VERSION {
        return KvmSupport::Unavailable(format!(
            "{} answered KVM API version {version}, expected {KVM_API_VERSION}",
            dev.display()
        ));
    }
    for cap in REQUIRED_CAPS {
        // SAFETY: KVM_CHECK_EXTENSION takes an integer and returns one; the
        // descriptor is open for the duration of the call.
        let has = unsafe { libc::ioctl(file.as_raw_fd(), KVM_CHECK_EXTENSION as _, cap as i32) };
        if has <= 0 {
            return KvmSupport::Unavailable(format!(
                "{} lacks the {cap:?} capability the kvm backend needs",
                dev.display()
            ));
        }
    }
    let flags = std::fs::read_to_string(cpuinfo).unwrap_or_default();
    let has_hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if has_hw {
        return KvmSupport::Hardware;
    }
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    KvmSupport::NoHardwareVirt(if pvm {
        "/dev/kvm is nested PVM (module kvm_pvm) and the CPU shows no vmx/svm: \
         unmodified guest kernels cannot run on it"
            .into()
    } else {
        "/dev/kvm works but the CPU shows no vmx/svm flag: unmodified guest kernels \
         cannot run on it"
            .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_unavailable_with_a_hint() {
        let s = probe_kvm_at(Path::new("/nonexistent/kvm"), Path::new("/proc/cpuinfo"));
        match s {
            KvmSupport::Unavailable(why) => assert!(why.contains("kvm_intel"), "{why}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }

    #[test]
    fn cpu_virt_tells_bare_metal_from_a_tcg_l1() {
        // "TCGT" "CGTC" "GTCG" in EBX, ECX, EDX.
        let tcg = |leaf: u32, _: u32| match leaf {
            1 => [0, 0, 1 << 31, 0],
            0x4000_0000 => [
                0x4000_0001,
                u32::from_le_bytes(*b"TCGT"),
                u32::from_le_bytes(*b"CGTC"),
                u32::from_le_bytes(*b"GTCG"),
            ],
            _ => [0; 4],
        };
        let v = cpu_virt_from("flags\t\t: fpu svm hypervisor\n", &tcg);
        assert_eq!(v.extension, Some("svm"));
        assert!(v.in_vm);
        assert_eq!(v.hypervisor.as_deref(), Some("TCGTCGTCGTCG"));
        assert!(v.describe().contains("TCG emulator"), "{}", v.describe());
        let bare = cpu_virt_from("flags\t\t: fpu vmx\n", &|_, _| [0; 4]);
        assert_eq!(
            (bare.extension, bare.in_vm, bare.hypervisor.clone()),
            (Some("vmx"), false, None)
        );
        assert!(bare.describe().contains("bare metal"));
    }

    #[test]
    fn a_non_kvm_device_is_rejected() {
        // /dev/null opens read-write but is not KVM: the ioctl fails.
        let s = probe_kvm_at(Path::new("/dev/null"), Path::new("/proc/cpuinfo"));
        assert!(matches!(s, KvmSupport::Unavailable(_)), "{s:?}");
    }
}
