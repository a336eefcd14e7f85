//! Debian's cloud kernel: resolve the package with `apt-cache depends`,
//! fetch it with `apt-get download`, unpack it with `dpkg-deb -x`, keep the
//! vmlinux and only the modules the guest needs (dependencies first, via
//! `modinfo -F depends`), published atomically into the cache.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::cache::Cache;
use crate::ImageError;

/// Keep [`KVM_MODULES`] of a cached Debian kernel, downloading its package
/// again (the exact version) when the cache entry predates them.
pub fn fetch_kvm_modules(cache: &Cache, kernel: &Kernel) -> Result<Vec<PathBuf>, ImageError> {
    fetch_module_set(cache, kernel, KVM_MODULES_DIR, KVM_MODULES)
}

/// Keep [`L1_NET_MODULES`] of a cached Debian kernel, downloading its
/// package again (the exact version) the first time.
pub fn fetch_l1_net_modules(cache: &Cache, kernel: &Kernel) -> Result<Vec<PathBuf>, ImageError> {
    fetch_module_set(cache, kernel, L1_NET_MODULES_DIR, L1_NET_MODULES)
}

/// Keep the modules `wanted` (and their dependencies) of a cached Debian
/// kernel in its subdirectory `set`, from its package.
fn fetch_module_set(
    cache: &Cache,
    kernel: &Kernel,
    set: &str,
    wanted: &[&str],
) -> Result<Vec<PathBuf>, ImageError> {
    if let Some(m) = module_set(kernel, set) {
        return Ok(m);
    }
    let not_debian = || ImageError::Corrupt {
        what: kernel.image.display().to_string(),
        detail: format!(
            "not a kernel kiln fetched from a Debian package; its modules ({set}) are unknown"
        ),
    };
    let mut src = kernel.source.split_whitespace();
    let (Some(pkg), Some(version)) = (src.next(), src.next()) else {
        return Err(not_debian());
    };
    let dir = kernel.image.parent().ok_or_else(not_debian)?;
    let _lock = cache.lock(&format!("kernel-{pkg}"))?;
    if let Some(m) = module_set(kernel, set) {
        return Ok(m);
    }
    let tmp = cache.temp_dir(set)?;
    let x = download_and_unpack(tmp.path(), &format!("{pkg}={version}"))?;
    let out = tmp.path().join("out");
    keep_modules(&x, &kernel.release, wanted, &out)?;
    tmp.publish(&out, &dir.join(set))?;
    module_set(kernel, set).ok_or_else(|| ImageError::Corrupt {
        what: dir.display().to_string(),
        detail: format!("the modules ({set}) were not kept"),
    })
}

/// Copy `wanted` modules and their dependencies from an unpacked package
/// into `out` (created), with their load order in `out/order`.
fn keep_modules(
    unpacked: &Path,
    release: &str,
    wanted: &[&str],
    out: &Path,
) -> Result<(), ImageError> {
    let tree = unpacked.join("lib/modules").join(release);
    std::fs::create_dir_all(out).map_err(|e| ImageError::io("create", out, e))?;
    let order: String = copy_modules(&tree, wanted, out)?
        .iter()
        .map(|name| format!("{name}\n"))
        .collect();
    std::fs::write(out.join("order"), order).map_err(|e| ImageError::io("write", out, e))
}

/// Copy `wanted` modules of `tree` and their dependencies into `dest`;
/// their file names, dependencies first.
fn copy_modules(tree: &Path, wanted: &[&str], dest: &Path) -> Result<Vec<String>, ImageError> {
    let mut names = Vec::new();
    for m in &resolve_modules(tree, wanted, true)? {
        let name = m
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        std::fs::copy(m, dest.join(&name)).map_err(|e| ImageError::io("copy module", m, e))?;
        names.push(name);
    }
    Ok(names)
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
    // A kernel cached by a kiln that needed fewer modules is provisioned
    // again (its modules are a subset of what the guest loads now).
    let current = || {
        dest.join("kernel.json").exists()
            && Kernel::load(&dest).is_ok_and(|k| k.has_guest_modules())
    };
    if current() {
        return Kernel::load(&dest);
    }
    let _lock = cache.lock(&format!("kernel-{pkg}"))?;
    if current() {
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
    let names = copy_modules(&mod_tree, GUEST_MODULES, &out.join("modules"))?;
    keep_modules(&x, &release, KVM_MODULES, &out.join(KVM_MODULES_DIR))?;
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
    if dest.exists() {
        // The outdated entry goes with the temporary directory.
        tracing::info!(package = %pkg, "replacing a cached kernel that lacks guest modules");
        std::fs::rename(&dest, tmp.path().join("outdated"))
            .map_err(|e| ImageError::io("move aside", &dest, e))?;
    }
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
