//! Guest kernel provisioning.
//!
//! By default kiln boots Debian's cloud kernel: the package is fetched with
//! `apt-get download` (so the host's mirrors, proxies and keys apply),
//! unpacked with `dpkg-deb`, the vmlinux ELF is extracted from the bzImage
//! (PVH entry: no decompression at boot), and only the modules the guest
//! needs are kept, in dependency order. `--kernel`/`--modules` override it.
//!
//! - `debian.rs`: fetching and unpacking the package, choosing the modules.
//! - `vmlinux.rs`: bzImage → vmlinux ELF, and its PVH entry note.

mod debian;
mod vmlinux;

pub use debian::{fetch_debian, fetch_kvm_modules, fetch_l1_net_modules, resolve_modules};
pub use vmlinux::{elf_has_pvh_note, extract_vmlinux, pvh_entry};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::ImageError;

/// The distribution's metapackage that points at the current cloud kernel.
pub const DEFAULT_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the guest needs, by module name; their dependencies are added.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "virtio_net",
    "overlay",
    "erofs",
];

/// Modules a VM booted on this kernel needs to offer KVM to its own guests
/// (the nested-KVM test tier's L1), by module name; their dependencies
/// (`kvm`, `irqbypass`) are added. Kept beside the guest's modules, never
/// loaded by kiln's guests.
pub const KVM_MODULES: &[&str] = &["kvm_amd"];

/// Subdirectory of a cached kernel holding [`KVM_MODULES`] and the file
/// `order` (their file names, dependencies first).
const KVM_MODULES_DIR: &str = "kvm-modules";

/// Modules the nested-KVM tier's L1 needs to run kiln's jobs with a network
/// (`nat`: TAP devices and kiln's iptables rules over nf_tables, as
/// `iptables-nft` writes them; the test's network lab: veth pairs), by
/// module name; dependencies are added. Kept like [`KVM_MODULES`], never
/// loaded by kiln's guests.
pub const L1_NET_MODULES: &[&str] = &[
    "tun",
    "veth",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nft_ct",
    "nft_masq",
    "nft_reject_ipv4",
    "nf_nat",
    "nf_conntrack",
    "xt_conntrack",
    "xt_mac",
    "xt_MASQUERADE",
    "xt_nat",
    "xt_length",
    "xt_connlimit",
    "ipt_REJECT",
];

/// Subdirectory of a cached kernel holding [`L1_NET_MODULES`] and `order`;
/// its number changes with the list, so that a cache kept from before
/// fetches the new set.
const L1_NET_MODULES_DIR: &str = "l1-net-modules-2";

/// A provisioned kernel: the image to boot and its modules in load order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kernel {
    /// vmlinux (ELF) or bzImage.
    pub image: PathBuf,
    /// `uname -r` of the kernel, when known.
    pub release: String,
    /// The image is an ELF with a PVH entry note.
    pub pvh: bool,
    /// Module files, dependencies first.
    pub modules: Vec<PathBuf>,
    /// Where it came from (package name and version, or "user").
    pub source: String,
}

#[derive(Serialize, Deserialize)]
struct KernelMeta {
    release: String,
    pvh: bool,
    modules: Vec<String>,
    source: String,
}

impl Kernel {
    /// A kernel the user gave: `image` (vmlinux or bzImage) and optionally a
    /// modules tree (`/lib/modules/<release>` or a directory of `.ko` files).
    pub fn from_paths(image: &Path, modules_dir: Option<&Path>) -> Result<Kernel, ImageError> {
        let bytes = std::fs::read(image).map_err(|e| ImageError::io("read kernel", image, e))?;
        let pvh = elf_has_pvh_note(&bytes);
        let modules = match modules_dir {
            Some(dir) => resolve_modules(dir, GUEST_MODULES, false)?,
            None => Vec::new(),
        };
        Ok(Kernel {
            image: image.to_path_buf(),
            release: modules_dir
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            pvh,
            modules,
            source: "user".into(),
        })
    }

    fn load(dir: &Path) -> Result<Kernel, ImageError> {
        let meta_path = dir.join("kernel.json");
        let raw = std::fs::read(&meta_path).map_err(|e| ImageError::io("read", &meta_path, e))?;
        let meta: KernelMeta = serde_json::from_slice(&raw).map_err(|e| ImageError::Corrupt {
            what: meta_path.display().to_string(),
            detail: e.to_string(),
        })?;
        Ok(Kernel {
            image: dir.join("vmlinux"),
            release: meta.release,
            pvh: meta.pvh,
            modules: meta
                .modules
                .iter()
                .map(|m| dir.join("modules").join(m))
                .collect(),
            source: meta.source,
        })
    }

    /// Cached kernels, newest first.
    pub fn cached(cache: &Cache) -> Vec<Kernel> {
        let mut found: Vec<(std::time::SystemTime, Kernel)> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(cache.dir("kernels")) {
            for e in rd.flatten() {
                let meta = e.path().join("kernel.json");
                let t = std::fs::metadata(&meta).and_then(|m| m.modified());
                if let (Ok(t), Ok(k)) = (t, Kernel::load(&e.path())) {
                    found.push((t, k));
                }
            }
        }
        found.sort_by_key(|k| std::cmp::Reverse(k.0));
        found.into_iter().map(|(_, k)| k).collect()
    }

    /// The default kernel: the newest cached one that has every module in
    /// [`GUEST_MODULES`], else fetched now (which also refreshes a cached
    /// kernel that lacks one).
    pub fn default_kernel(cache: &Cache) -> Result<Kernel, ImageError> {
        if let Some(k) = Kernel::cached(cache)
            .into_iter()
            .find(Kernel::has_guest_modules)
        {
            return Ok(k);
        }
        fetch_debian(cache, DEFAULT_KERNEL_PACKAGE)
    }

    /// Whether every module of [`GUEST_MODULES`] is among this kernel's
    /// (file names compared as module names: `virtio-rng.ko` is
    /// `virtio_rng`).
    pub fn has_guest_modules(&self) -> bool {
        let have: Vec<String> = self
            .modules
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| module_name(&n.to_string_lossy()))
            .collect();
        GUEST_MODULES.iter().all(|m| have.iter().any(|h| h == m))
    }
}

/// A module's name from its file name: `virtio-rng.ko.xz` → `virtio_rng`.
fn module_name(file: &str) -> String {
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// The KVM modules of a cached Debian kernel (dependencies first), if they
/// were kept: kernels fetched before kiln kept them have none (see
/// [`fetch_kvm_modules`]).
pub fn kvm_modules(kernel: &Kernel) -> Option<Vec<PathBuf>> {
    module_set(kernel, KVM_MODULES_DIR)
}

/// The modules kept in subdirectory `set` of a cached kernel, in their
/// load order, if all are there.
fn module_set(kernel: &Kernel, set: &str) -> Option<Vec<PathBuf>> {
    let dir = kernel.image.parent()?.join(set);
    let order = std::fs::read_to_string(dir.join("order")).ok()?;
    let mods: Vec<PathBuf> = order
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| dir.join(l))
        .collect();
    (!mods.is_empty() && mods.iter().all(|m| m.is_file())).then_some(mods)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(files: &[&str]) -> Kernel {
        Kernel {
            image: "/k/vmlinux".into(),
            release: "6.1".into(),
            pvh: true,
            modules: files
                .iter()
                .map(|f| Path::new("/k/modules").join(f))
                .collect(),
            source: "test".into(),
        }
    }

    #[test]
    fn a_kernel_cached_before_a_module_was_added_is_outdated() {
        let old = [
            "virtio_ring.ko",
            "virtio.ko",
            "virtio_mmio.ko",
            "virtio_blk.ko",
            "virtio_console.ko",
            "virtio-rng.ko",
            "overlay.ko",
            "libcrc32c.ko",
            "erofs.ko",
        ];
        assert!(!kernel(&old).has_guest_modules(), "no virtio_net");
        let mut new = old.to_vec();
        new.extend(["failover.ko", "net_failover.ko", "virtio_net.ko.xz"]);
        assert!(kernel(&new).has_guest_modules());
        assert_eq!(module_name("virtio-rng.ko.zst"), "virtio_rng");
    }
}
