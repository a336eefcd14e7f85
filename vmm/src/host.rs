//! What the host can run: hardware KVM, nested PVM, or nothing.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `KVM_GET_API_VERSION` (`_IO(KVMIO, 0x00)`).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_API_VERSION: libc::c_int = 12;

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
            KvmSupport::Hardware => "hardware KVM: unmodified guests run at native speed".into(),
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
         unmodified guest kernels cannot run on it; QEMU with TCG is used instead"
            .into()
    } else {
        "/dev/kvm works but the CPU shows no vmx/svm flag: unmodified guest kernels \
         cannot run on it; QEMU with TCG is used instead"
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
    fn a_non_kvm_device_is_rejected() {
        // /dev/null opens read-write but is not KVM: the ioctl fails.
        let s = probe_kvm_at(Path::new("/dev/null"), Path::new("/proc/cpuinfo"));
        assert!(matches!(s, KvmSupport::Unavailable(_)), "{s:?}");
    }
}
