//! `kiln doctor`: what this host has, and how to fix each gap.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::Result;
use kiln_images::{Cache, Kernel};
use kiln_vmm::{BackendKind, KvmSupport};
use serde::Serialize;

use kiln::env::Env;

#[derive(Serialize)]
struct Check {
    name: &'static str,
    /// ok, warn or fail
    status: &'static str,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn tool_version(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    let text = if o.stdout.is_empty() {
        o.stderr
    } else {
        o.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

pub fn run(cache_dir: &Path, env: &Env, json: bool) -> Result<ExitCode> {
    let mut checks = Vec::new();
    let kvm = kiln_vmm::probe_kvm();
    let cpu = kiln_vmm::cpu_virt();
    checks.push(kvm_check(&kvm, &cpu));
    let qemu = env.qemu().binary.to_string_lossy().into_owned();
    let qemu_version = tool_version(&qemu, &["--version"]);
    checks.push(match &qemu_version {
        Some(v) => Check {
            name: "qemu",
            status: "ok",
            detail: v.clone(),
            fix: None,
        },
        None => Check {
            name: "qemu",
            status: if kvm.runs_unmodified_guests() {
                "warn"
            } else {
                "fail"
            },
            detail: format!("{qemu} not found"),
            fix: Some("apt-get install qemu-system-x86".into()),
        },
    });
    checks.push(backend_check(&kvm, &cpu, qemu_version.is_some()));
    // (tool, package, what it is for; None = required)
    for (tool, pkg, optional) in [
        ("mkfs.ext4", "e2fsprogs", None),
        (
            "mkfs.erofs",
            "erofs-utils",
            Some("root filesystems are built as ext4 instead of erofs (slower)"),
        ),
        (
            "git",
            "git",
            Some("GitLab jobs cannot fetch sources; run-job copies the directory instead"),
        ),
        (
            "modinfo",
            "kmod",
            Some("needed to fetch a kernel or use --modules"),
        ),
        ("apt-get", "apt", Some("needed to fetch the default kernel")),
        (
            "dpkg-deb",
            "dpkg",
            Some("needed to fetch the default kernel"),
        ),
    ] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        checks.push(if found {
            Check {
                name: tool,
                status: "ok",
                detail: "found".into(),
                fix: None,
            }
        } else {
            Check {
                name: tool,
                status: if optional.is_some() { "warn" } else { "fail" },
                detail: match optional {
                    Some(why) => format!("not found: {why}"),
                    None => "not found".into(),
                },
                fix: Some(format!("apt-get install {pkg}")),
            }
        });
    }
    match Cache::open(cache_dir) {
        Ok(cache) => {
            let ks = Kernel::cached(&cache);
            checks.push(match ks.first() {
                Some(k) => Check {
                    name: "kernel",
                    status: "ok",
                    detail: format!(
                        "{} ({}), PVH {}",
                        k.release,
                        k.source,
                        if k.pvh { "yes" } else { "no" }
                    ),
                    fix: None,
                },
                None => Check {
                    name: "kernel",
                    status: "warn",
                    detail: format!("no guest kernel cached in {}", cache_dir.display()),
                    fix: Some("kiln kernel fetch (run-job also fetches it on first use)".into()),
                },
            });
        }
        Err(e) => checks.push(Check {
            name: "cache",
            status: "fail",
            detail: format!("{e}"),
            fix: Some(format!(
                "make {} writable or pass --cache-dir",
                cache_dir.display()
            )),
        }),
    }
    checks.push(match kiln::agent::locate_agent(env.agent()) {
        Ok(p) => Check {
            name: "agent",
            status: "ok",
            detail: p.display().to_string(),
            fix: None,
        },
        Err(e) => Check {
            name: "agent",
            status: "fail",
            detail: kiln::executor::error_chain(&e),
            fix: Some(kiln::agent::BUILD_HINT.into()),
        },
    });
    checks.extend(isolation_checks(env));
    checks.extend(network_checks());
    checks.push(snapshot_check(cache_dir));
    let run_dir = env.run_dir();
    let writable = std::fs::create_dir_all(&run_dir).is_ok() && tempfile_in(&run_dir);
    checks.push(if writable {
        Check {
            name: "run-dir",
            status: "ok",
            detail: run_dir.display().to_string(),
            fix: None,
        }
    } else {
        Check {
            name: "run-dir",
            status: "fail",
            detail: format!("{} is not writable", run_dir.display()),
            fix: Some("set KILN_RUN_DIR to a writable directory".into()),
        }
    });

    let failed = checks.iter().any(|c| c.status == "fail");
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!("{:<5} {:<10} {}", c.status, c.name, c.detail);
            if let Some(f) = &c.fix {
                println!("{:<16} fix: {f}", "");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The VM snapshots in the cache (`kiln snapshot ls` lists them). Jobs do
/// not start from them yet: this only says what is there and what is stale.
fn snapshot_check(cache_dir: &Path) -> Check {
    use kiln::snapshots::{EntryState, SnapshotCache};
    let list = SnapshotCache::new(cache_dir).list();
    let bytes: u64 = list.iter().map(|e| e.disk_bytes).sum();
    let usable = list
        .iter()
        .filter(|e| matches!(e.state, EntryState::Usable(_)))
        .count();
    let unusable = list.len() - usable;
    Check {
        name: "snapshots",
        status: if unusable == 0 { "ok" } else { "warn" },
        detail: format!(
            "{usable} usable, {unusable} stale or damaged, {:.1} MiB on disk \
             (kvm backend; jobs still cold-boot)",
            bytes as f64 / (1 << 20) as f64
        ),
        fix: (unusable > 0).then(|| "kiln snapshot ls; kiln snapshot rm <hash>".into()),
    }
}

/// What of the jail around each VMM process (kvm backend) this host
/// enforces. A missing part is a warning: `isolation = "best-effort"` (the
/// default) runs without it, `"strict"` refuses to start VMs.
fn isolation_checks(env: &Env) -> Vec<Check> {
    kiln_vmm::jail::probe(env.vmm().as_deref())
        .into_iter()
        .map(|e| match e.status {
            Ok(how) => Check {
                name: e.part,
                status: "ok",
                detail: how,
                fix: None,
            },
            Err(why) => Check {
                name: e.part,
                status: "warn",
                detail: format!("not enforced: {why}"),
                fix: Some(
                    "run kiln as root for the whole jail; with isolation = \"strict\" VMs \
                     do not start without it"
                        .into(),
                ),
            },
        })
        .collect()
}

/// Which `--network` modes this host can do, and why not.
fn network_checks() -> Vec<Check> {
    use kiln::network::NetworkMode;
    kiln::network::doctor()
        .into_iter()
        .map(|(mode, why_not)| {
            let (name, what, fix) = if mode == NetworkMode::Nat {
                (
                    "network-nat",
                    format!(
                        "--network nat: TAP devices, {}",
                        kiln::network::firewall::iptables_version().unwrap_or_default()
                    ),
                    "run kiln as root with iptables and iproute2, or use --network user",
                )
            } else {
                (
                    "network-user",
                    "--network user: passt".into(),
                    "apt-get install passt",
                )
            };
            match why_not {
                None => Check {
                    name,
                    status: "ok",
                    detail: what,
                    fix: None,
                },
                Some(why) => Check {
                    name,
                    status: "warn",
                    detail: why,
                    fix: Some(fix.into()),
                },
            }
        })
        .collect()
}

/// What `/dev/kvm` can do here, and on what CPU.
fn kvm_check(kvm: &KvmSupport, cpu: &kiln_vmm::CpuVirt) -> Check {
    match kvm {
        KvmSupport::Hardware => Check {
            name: "kvm",
            status: "ok",
            detail: format!(
                "/dev/kvm runs unmodified guests: {}",
                cpu.describe()
            ),
            fix: None,
        },
        KvmSupport::NoHardwareVirt(d) => Check {
            name: "kvm",
            status: "warn",
            detail: format!("{d} ({})", cpu.describe()),
            fix: Some(
                "run kiln on a host with VT-x/AMD-V (bare metal or nested virtualization) for fast VMs"
                    .into(),
            ),
        },
        KvmSupport::Unavailable(d) => Check {
            name: "kvm",
            status: "warn",
            detail: format!("{d} ({})", cpu.describe()),
            fix: Some(
                "modprobe kvm_intel (or kvm_amd) and give this user access to /dev/kvm".into(),
            ),
        },
    }
}

/// The backend `--backend auto` picks, and why: the same decision
/// `Machine::start` makes ([`BackendKind::resolve`]).
fn backend_check(kvm: &KvmSupport, cpu: &kiln_vmm::CpuVirt, have_qemu: bool) -> Check {
    let resolved = BackendKind::Auto.resolve(kvm);
    match resolved {
        Ok((BackendKind::Kvm, _)) => {
            let slow = if cpu.hypervisor.as_deref() == Some("TCGTCGTCGTCG") {
                "; this host is itself emulated, so expect guests to be slow anyway"
            } else {
                ""
            };
            Check {
                name: "backend",
                status: "ok",
                detail: format!(
                    "auto selects kvm (kiln's embedded VMM): /dev/kvm runs unmodified guests \
                     ({}){slow}; --backend qemu would run QEMU with -accel kvm{}",
                    cpu.extension.unwrap_or("?"),
                    if have_qemu { "" } else { " (not installed)" }
                ),
                fix: None,
            }
        }
        Ok(_) if have_qemu => {
            let tiny = if kvm.device_usable() {
                "; --backend kvm runs only tiny guests here"
            } else {
                ""
            };
            Check {
                name: "backend",
                status: "warn",
                detail: format!(
                    "auto selects qemu with TCG (every guest instruction emulated, slow): {}{tiny}",
                    kvm.describe()
                ),
                fix: Some("a host with VT-x/AMD-V behind /dev/kvm makes auto select kvm".into()),
            }
        }
        Ok(_) => Check {
            name: "backend",
            status: "fail",
            detail: format!("no backend: {} and QEMU is not installed", kvm.describe()),
            fix: Some("apt-get install qemu-system-x86".into()),
        },
        Err(e) => Check {
            name: "backend",
            status: "fail",
            detail: e.to_string(),
            fix: None,
        },
    }
}

fn tempfile_in(dir: &Path) -> bool {
    let p = dir.join(format!(".doctor-{}", std::process::id()));
    let ok = std::fs::write(&p, b"").is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::CpuVirt;

    fn cpu(extension: Option<&'static str>, hypervisor: Option<&str>) -> CpuVirt {
        CpuVirt {
            extension,
            in_vm: hypervisor.is_some(),
            hypervisor: hypervisor.map(str::to_string),
        }
    }

    #[test]
    fn backend_verdict_matches_what_auto_runs_on_every_kind_of_host() {
        // Bare metal with VT-x.
        let c = backend_check(&KvmSupport::Hardware, &cpu(Some("vmx"), None), true);
        assert_eq!(c.status, "ok");
        assert!(c.detail.starts_with("auto selects kvm"), "{}", c.detail);
        assert!(!c.detail.contains("qemu with"), "{}", c.detail);
        // An L1 VM under QEMU TCG with emulated AMD-V: kvm, and slow.
        let c = backend_check(
            &KvmSupport::Hardware,
            &cpu(Some("svm"), Some("TCGTCGTCGTCG")),
            true,
        );
        assert!(c.detail.starts_with("auto selects kvm"), "{}", c.detail);
        assert!(c.detail.contains("emulated"), "{}", c.detail);
        let k = kvm_check(
            &KvmSupport::Hardware,
            &cpu(Some("svm"), Some("TCGTCGTCGTCG")),
        );
        assert!(k.detail.contains("TCG emulator"), "{}", k.detail);
        // Nested PVM: qemu with TCG; the kvm backend only for tiny guests.
        let pvm = KvmSupport::NoHardwareVirt("/dev/kvm is nested PVM".into());
        let c = backend_check(&pvm, &cpu(None, Some("KVMKVMKVM")), true);
        assert_eq!(c.status, "warn");
        assert!(
            c.detail.starts_with("auto selects qemu with TCG"),
            "{}",
            c.detail
        );
        assert!(c.detail.contains("nested PVM") && c.detail.contains("tiny guests"));
        // No /dev/kvm: qemu with TCG; without QEMU nothing runs.
        let none = KvmSupport::Unavailable("/dev/kvm does not exist".into());
        let c = backend_check(&none, &cpu(None, None), true);
        assert!(
            c.detail.starts_with("auto selects qemu with TCG"),
            "{}",
            c.detail
        );
        assert!(!c.detail.contains("tiny guests"), "{}", c.detail);
        let c = backend_check(&none, &cpu(None, None), false);
        assert_eq!(c.status, "fail");
        assert!(c.detail.contains("no backend"), "{}", c.detail);
    }
}
