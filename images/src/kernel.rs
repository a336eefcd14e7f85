//! Guest kernel provisioning.
//!
//! By default kiln boots Debian's cloud kernel: the package is fetched with
//! `apt-get download` (so the host's mirrors, proxies and keys apply),
//! unpacked with `dpkg-deb`, the vmlinux ELF is extracted from the bzImage
//! (PVH entry: no decompression at boot), and only the modules the guest
//! needs are kept, in dependency order. `--kernel`/`--modules` override it.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

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

    /// The default kernel: the newest cached one, else fetched now.
    pub fn default_kernel(cache: &Cache) -> Result<Kernel, ImageError> {
        if let Some(k) = Kernel::cached(cache).into_iter().next() {
            return Ok(k);
        }
        fetch_debian(cache, DEFAULT_KERNEL_PACKAGE)
    }
}

/// The KVM modules of a cached Debian kernel (dependencies first), if they
/// were kept: kernels fetched before kiln kept them have none (see
/// [`fetch_kvm_modules`]).
pub fn kvm_modules(kernel: &Kernel) -> Option<Vec<PathBuf>> {
    let dir = kernel.image.parent()?.join(KVM_MODULES_DIR);
    let order = std::fs::read_to_string(dir.join("order")).ok()?;
    let mods: Vec<PathBuf> = order
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| dir.join(l))
        .collect();
    (!mods.is_empty() && mods.iter().all(|m| m.is_file())).then_some(mods)
}

/// Keep [`KVM_MODULES`] of a cached Debian kernel, downloading its package
/// again (the exact version) when the cache entry predates them.
pub fn fetch_kvm_modules(cache: &Cache, kernel: &Kernel) -> Result<Vec<PathBuf>, ImageError> {
    if let Some(m) = kvm_modules(kernel) {
        return Ok(m);
    }
    let not_debian = || ImageError::Corrupt {
        what: kernel.image.display().to_string(),
        detail: "not a kernel kiln fetched from a Debian package; its KVM modules are unknown"
            .into(),
    };
    let mut src = kernel.source.split_whitespace();
    let (Some(pkg), Some(version)) = (src.next(), src.next()) else {
        return Err(not_debian());
    };
    let dir = kernel.image.parent().ok_or_else(not_debian)?;
    let _lock = cache.lock(&format!("kernel-{pkg}"))?;
    if let Some(m) = kvm_modules(kernel) {
        return Ok(m);
    }
    let tmp = cache.temp_dir("kvm-modules")?;
    let x = download_and_unpack(tmp.path(), &format!("{pkg}={version}"))?;
    let out = tmp.path().join("out");
    keep_kvm_modules(&x, &kernel.release, &out)?;
    tmp.publish(&out, &dir.join(KVM_MODULES_DIR))?;
    kvm_modules(kernel).ok_or_else(|| ImageError::Corrupt {
        what: dir.display().to_string(),
        detail: "the KVM modules were not kept".into(),
    })
}

/// Copy [`KVM_MODULES`] and their dependencies from an unpacked package
/// into `out` (created), with their load order in `out/order`.
fn keep_kvm_modules(unpacked: &Path, release: &str, out: &Path) -> Result<(), ImageError> {
    let tree = unpacked.join("lib/modules").join(release);
    let modules = resolve_modules(&tree, KVM_MODULES, true)?;
    std::fs::create_dir_all(out).map_err(|e| ImageError::io("create", out, e))?;
    let mut order = String::new();
    for m in &modules {
        let name = m
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        std::fs::copy(m, out.join(&name)).map_err(|e| ImageError::io("copy module", m, e))?;
        order.push_str(&name);
        order.push('\n');
    }
    std::fs::write(out.join("order"), order).map_err(|e| ImageError::io("write", out, e))
}

/// `apt-get download SPEC` into `dir`, then `dpkg-deb -x` it into `dir/x`.
/// Returns the unpacked tree.
fn download_and_unpack(dir: &Path, spec: &str) -> Result<PathBuf, ImageError> {
    run(
        Command::new("apt-get")
            .args(["download", "-q", spec])
            .current_dir(dir),
        "apt-get download",
        "run `apt-get update` (the package lists may be stale) or pass --kernel",
    )?;
    let deb = deb_in(dir, spec)?;
    let x = dir.join("x");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x),
        "dpkg-deb -x",
        "install dpkg (Debian/Ubuntu hosts have it)",
    )?;
    Ok(x)
}

fn deb_in(dir: &Path, what: &str) -> Result<PathBuf, ImageError> {
    std::fs::read_dir(dir)
        .map_err(|e| ImageError::io("list", dir, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| ImageError::Corrupt {
            what: what.to_string(),
            detail: "apt-get download produced no .deb".into(),
        })
}

fn run(cmd: &mut Command, what: &str, hint: &str) -> Result<String, ImageError> {
    let out = cmd.output().map_err(|e| ImageError::Tool {
        tool: what.to_string(),
        detail: e.to_string(),
        hint: hint.to_string(),
    })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            tool: what.to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            hint: hint.to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Resolve a metapackage (`linux-image-cloud-amd64`) to the versioned kernel
/// package it depends on; a versioned name is returned as is.
fn resolve_package(package: &str) -> Result<String, ImageError> {
    let out = run(
        Command::new("apt-cache").args(["depends", "--no-recommends", "--no-suggests", package]),
        "apt-cache depends",
        "is this a Debian/Ubuntu host with the package lists updated (apt-get update)?",
    )?;
    let dep = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| {
            d.starts_with("linux-image-") && d.chars().nth(12).is_some_and(|c| c.is_ascii_digit())
        });
    Ok(dep
        .map(str::to_string)
        .unwrap_or_else(|| package.to_string()))
}

/// Fetch and unpack a Debian kernel package into the cache (idempotent).
pub fn fetch_debian(cache: &Cache, package: &str) -> Result<Kernel, ImageError> {
    let pkg = resolve_package(package)?;
    let dest = cache.dir("kernels").join(&pkg);
    if dest.join("kernel.json").exists() {
        return Kernel::load(&dest);
    }
    let _lock = cache.lock(&format!("kernel-{pkg}"))?;
    if dest.join("kernel.json").exists() {
        return Kernel::load(&dest);
    }
    let tmp = cache.temp_dir("kernel")?;
    tracing::info!(package = %pkg, "downloading the guest kernel package");
    let x = download_and_unpack(tmp.path(), &pkg)?;
    let deb = deb_in(tmp.path(), &pkg)?;
    let version = run(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Version"),
        "dpkg-deb -f",
        "",
    )?;

    let boot = x.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|e| ImageError::io("list", &boot, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| ImageError::Corrupt {
            what: pkg.clone(),
            detail: "no boot/vmlinuz-* in the package".into(),
        })?;
    let release = vmlinuz
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();

    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join("modules")).map_err(|e| ImageError::io("create", &out, e))?;
    let bz = std::fs::read(&vmlinuz).map_err(|e| ImageError::io("read", &vmlinuz, e))?;
    let vmlinux = extract_vmlinux(&bz)?;
    let pvh = elf_has_pvh_note(&vmlinux);
    if !pvh {
        tracing::warn!(
            "the kernel's vmlinux has no PVH note; it will boot through the 64-bit protocol"
        );
    }
    std::fs::write(out.join("vmlinux"), &vmlinux)
        .map_err(|e| ImageError::io("write", &out.join("vmlinux"), e))?;

    let mod_tree = x.join("lib/modules").join(&release);
    let modules = resolve_modules(&mod_tree, GUEST_MODULES, true)?;
    let mut names = Vec::new();
    for m in &modules {
        let name = m
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let target = out.join("modules").join(&name);
        std::fs::copy(m, &target).map_err(|e| ImageError::io("copy module", m, e))?;
        names.push(name);
    }
    keep_kvm_modules(&x, &release, &out.join(KVM_MODULES_DIR))?;
    let meta = KernelMeta {
        release,
        pvh,
        modules: names,
        source: format!("{pkg} {}", version.trim()),
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| ImageError::Corrupt {
        what: "kernel.json".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(out.join("kernel.json"), json).map_err(|e| ImageError::io("write", &out, e))?;
    tmp.publish(&out, &dest)?;
    Kernel::load(&dest)
}

/// Find `wanted` modules (and their dependencies, via `modinfo -F depends`)
/// under `tree`, returned dependencies first. `strict`: a wanted module that
/// is missing is an error (else it is assumed built in).
pub fn resolve_modules(
    tree: &Path,
    wanted: &[&str],
    strict: bool,
) -> Result<Vec<PathBuf>, ImageError> {
    let mut index: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut stack = vec![tree.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d).map_err(|e| ImageError::io("list modules", &d, e))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                index.insert(stem.replace('-', "_"), p);
            }
        }
    }
    let mut order = Vec::new();
    let mut done = HashSet::new();
    let mut visiting = HashSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        order: &mut Vec<PathBuf>,
        done: &mut HashSet<String>,
        visiting: &mut HashSet<String>,
        strict: bool,
    ) -> Result<(), ImageError> {
        let name = name.replace('-', "_");
        if done.contains(&name) || !visiting.insert(name.clone()) {
            return Ok(());
        }
        let Some(path) = index.get(&name) else {
            if strict {
                return Err(ImageError::Corrupt {
                    what: "kernel modules".into(),
                    detail: format!("module {name} is not in the kernel package"),
                });
            }
            return Ok(());
        };
        let deps = run(
            Command::new("modinfo").args(["-F", "depends"]).arg(path),
            "modinfo",
            "install kmod (apt-get install kmod)",
        )?;
        for dep in deps.trim().split(',').filter(|d| !d.is_empty()) {
            visit(dep, index, order, done, visiting, true)?;
        }
        order.push(path.clone());
        done.insert(name);
        Ok(())
    }
    for w in wanted {
        visit(w, &index, &mut order, &mut done, &mut visiting, strict)?;
    }
    Ok(order)
}

/// Decompress the kernel payload of a bzImage into the vmlinux ELF.
pub fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>, ImageError> {
    let bad = |d: &str| ImageError::Corrupt {
        what: "bzImage".into(),
        detail: d.to_string(),
    };
    if bz.len() < 0x250 || &bz[0x202..0x206] != b"HdrS" {
        if bz.starts_with(b"\x7fELF") {
            return Ok(bz.to_vec());
        }
        return Err(bad("no Linux boot header (HdrS)"));
    }
    let version = u16::from_le_bytes([bz[0x206], bz[0x207]]);
    if version < 0x208 {
        return Err(bad("boot protocol older than 2.08 has no payload fields"));
    }
    let setup_sects = if bz[0x1f1] == 0 {
        4
    } else {
        bz[0x1f1] as usize
    };
    let off = u32::from_le_bytes(bz[0x248..0x24c].try_into().unwrap_or_default()) as usize;
    let len = u32::from_le_bytes(bz[0x24c..0x250].try_into().unwrap_or_default()) as usize;
    let start = (setup_sects + 1) * 512 + off;
    let payload = bz
        .get(start..start.saturating_add(len))
        .ok_or_else(|| bad("payload outside the file"))?;
    let out = if payload.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
        lz4_legacy(&payload[4..]).map_err(|d| bad(&d))?
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(payload), &mut v)
            .map_err(|e| bad(&format!("gzip payload: {e}")))?;
        v
    } else {
        return Err(bad(&format!(
            "unsupported payload compression (magic {:02x?}); pass a vmlinux with --kernel",
            &payload[..payload.len().min(6)]
        )));
    };
    if !out.starts_with(b"\x7fELF") {
        return Err(bad("the decompressed payload is not an ELF"));
    }
    Ok(out)
}

/// LZ4 "legacy" frames as the kernel's `lz4 -l` writes them: after the magic,
/// blocks of `u32 LE size | data`, each inflating to at most 8 MiB, then the
/// 4-byte uncompressed size the kernel build appends.
fn lz4_legacy(mut data: &[u8]) -> Result<Vec<u8>, String> {
    const BLOCK: usize = 8 << 20;
    const MAGIC: u32 = 0x184c2102;
    let mut out = Vec::new();
    let mut block = vec![0u8; BLOCK];
    while data.len() >= 4 {
        let size = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if size == MAGIC as usize {
            data = &data[4..];
            continue;
        }
        if size == 0 || size > data.len() - 4 {
            break; // the trailing size field
        }
        let n = lz4_flex::block::decompress_into(&data[4..4 + size], &mut block)
            .map_err(|e| format!("lz4 block: {e}"))?;
        out.extend_from_slice(&block[..n]);
        data = &data[4 + size..];
    }
    if out.is_empty() {
        return Err("empty lz4 payload".into());
    }
    Ok(out)
}

/// Does this ELF carry a Xen PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`)?
pub fn elf_has_pvh_note(elf: &[u8]) -> bool {
    pvh_entry(elf).is_some()
}

/// The PVH 32-bit entry point from the ELF notes, if any. Bounds-checked.
pub fn pvh_entry(elf: &[u8]) -> Option<u64> {
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let get = |o: usize, n: usize| elf.get(o..o.checked_add(n)?);
    let rd16 = |o: usize| get(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let rd32 = |o: usize| get(o, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let rd64 = |o: usize| get(o, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) {
        return None; // not ELF64
    }
    let phoff = rd64(0x20)? as usize;
    let phentsize = rd16(0x36)? as usize;
    let phnum = rd16(0x38)? as usize;
    for i in 0..phnum.min(256) {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if rd32(ph)? != 4 {
            continue; // PT_NOTE only
        }
        let off = rd64(ph.checked_add(8)?)? as usize;
        let size = rd64(ph.checked_add(32)?)? as usize;
        let end = off.checked_add(size)?.min(elf.len());
        let mut p = off;
        while p.checked_add(12)? <= end {
            let namesz = rd32(p)? as usize;
            let descsz = rd32(p + 4)? as usize;
            let typ = rd32(p + 8)?;
            let name_at = p + 12;
            let desc_at = name_at.checked_add(namesz.checked_add(3)? & !3)?;
            if namesz == 4 && typ == XEN_ELFNOTE_PHYS32_ENTRY && get(name_at, 4) == Some(b"Xen\0") {
                return match descsz {
                    4 => rd32(desc_at).map(u64::from),
                    8 => rd64(desc_at),
                    _ => None,
                };
            }
            p = desc_at.checked_add(descsz.checked_add(3)? & !3)?;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_with_note(name: &[u8], typ: u32, desc: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let note_off = 64 + 56;
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&4u32.to_le_bytes());
        ph[8..16].copy_from_slice(&(note_off as u64).to_le_bytes());
        let mut note = Vec::new();
        note.extend_from_slice(&(name.len() as u32).to_le_bytes());
        note.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        note.extend_from_slice(&typ.to_le_bytes());
        note.extend_from_slice(name);
        while note.len() % 4 != 0 {
            note.push(0);
        }
        note.extend_from_slice(desc);
        ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        e.extend_from_slice(&ph);
        e.extend_from_slice(&note);
        e
    }

    #[test]
    fn pvh_note_is_found_and_others_are_not() {
        assert_eq!(
            pvh_entry(&elf_with_note(b"Xen\0", 18, &0x1000u32.to_le_bytes())),
            Some(0x1000)
        );
        assert_eq!(
            pvh_entry(&elf_with_note(b"Xen\0", 17, &0x1000u32.to_le_bytes())),
            None
        );
        assert_eq!(
            pvh_entry(&elf_with_note(b"GNU\0", 18, &0x1000u32.to_le_bytes())),
            None
        );
    }

    #[test]
    fn truncated_or_hostile_elves_do_not_panic() {
        let good = elf_with_note(b"Xen\0", 18, &0x1000u32.to_le_bytes());
        for cut in 0..good.len() {
            let _ = pvh_entry(&good[..cut]);
        }
        let mut huge = good.clone();
        huge[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(pvh_entry(&huge), None);
    }

    #[test]
    fn lz4_legacy_round_trip() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let block = lz4_flex::block::compress(&data);
        let mut stream = Vec::new();
        stream.extend_from_slice(&(block.len() as u32).to_le_bytes());
        stream.extend_from_slice(&block);
        stream.extend_from_slice(&(data.len() as u32).to_le_bytes()); // appended size
        assert_eq!(lz4_legacy(&stream).unwrap(), data);
    }

    #[test]
    fn not_a_kernel_is_a_clear_error() {
        let e = extract_vmlinux(b"hello").unwrap_err().to_string();
        assert!(e.contains("HdrS"), "{e}");
    }
}
