//! What of the jail this host enforces, for `kiln doctor`.

use super::*;

/// One part of the jail and whether this host enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enforced {
    pub part: &'static str,
    /// `Ok(how)` or `Err(why not)`.
    pub status: Result<String, String>,
}

/// What of the jail this host enforces, for `kiln doctor`: root (for the
/// namespaces, `pivot_root` and the uid change), seccomp, the cgroup
/// hierarchy (a probe group is created and removed) and the `kiln-vmm`
/// executable. Nothing is changed on the host.
pub fn probe(vmm_program: Option<&std::path::Path>) -> Vec<Enforced> {
    let root = privileged();
    // Without root, the namespaces and pivot_root are made inside a user
    // namespace: is one allowed here?
    let userns = if root {
        Ok(())
    } else {
        user_namespaces_allowed()
    };
    let priv_part = |ok: &str| match (&userns, root) {
        (_, true) => Ok(ok.to_string()),
        (Ok(()), false) => Ok(format!(
            "{ok}, inside a user namespace (kiln does not run as root)"
        )),
        (Err(why), false) => Err(format!(
            "kiln does not run as root and cannot make a user namespace: {why}"
        )),
    };
    // SAFETY: getuid has no arguments.
    let uid = unsafe { libc::getuid() };
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .ok()
        .is_some_and(|s| s.lines().any(|l| l.starts_with("Seccomp:")));
    let cgroup = cgroup::detect().map_err(|e| e.to_string()).and_then(|h| {
        let limits = cgroup::Limits::default();
        cgroup::Cgroup::create(&h, &limits, 64, 1)
            .map(|mut c| {
                c.remove();
                format!("{}: memory, pids and cpu limits", h.describe())
            })
            .map_err(|e| e.to_string())
    });
    vec![
        Enforced {
            part: "vmm process",
            status: crate::process::locate_vmm(vmm_program)
                .map(|p| format!("one per VM: {}", p.display()))
                .map_err(|e| e.to_string()),
        },
        Enforced {
            part: "namespaces",
            status: priv_part(
                "PID (the VMM is its PID 1), mount, IPC, UTS and an empty network namespace",
            ),
        },
        Enforced {
            part: "pivot_root",
            status: priv_part("into an empty, read-only per-VM directory"),
        },
        Enforced {
            part: "uid",
            status: if root {
                Ok(format!(
                    "one unprivileged uid/gid per VM from {UID_BASE}, no capabilities"
                ))
            } else {
                Err(format!(
                    "kiln does not run as root: every VMM runs as kiln's uid {uid} \
                     (without capabilities)"
                ))
            },
        },
        Enforced {
            part: "no_new_privs",
            status: Ok("always".into()),
        },
        Enforced {
            part: "seccomp",
            status: if seccomp {
                Ok("an allow-list per thread (vCPU, event loop, main)".into())
            } else {
                Err("the kernel has no seccomp".into())
            },
        },
        Enforced {
            part: "cgroup",
            status: cgroup,
        },
        Enforced {
            part: "qemu jail",
            status: if root {
                Ok(
                    "qemu backend: QEMU is PID 1 of its own PID namespace, in mount, IPC, UTS \
                    and network namespaces, pivot_root into a per-VM directory (read-only \
                    /usr, kernel, initramfs; disks and network as descriptors), a per-VM \
                    uid, no capabilities, -sandbox; isolation = \"strict\" accepts it"
                        .into(),
                )
            } else {
                Err(format!(
                    "kiln does not run as root: QEMU runs as kiln's uid {uid} without PID \
                     and mount namespaces or pivot_root; isolation = \"strict\" refuses \
                     the qemu backend"
                ))
            },
        },
    ]
}

/// Whether this (unprivileged) process may make a user namespace: a child
/// process tries and exits. Nothing changes for this process.
fn user_namespaces_allowed() -> Result<(), String> {
    // SAFETY: the child calls only unshare(2) and _exit(2), both
    // async-signal-safe (this process may have other threads); the parent
    // reaps it with waitpid into a local.
    unsafe {
        match libc::fork() {
            -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
            0 => {
                let ok = libc::unshare(libc::CLONE_NEWUSER) == 0;
                libc::_exit(if ok { 0 } else { 1 })
            }
            child => {
                let mut status = 0;
                while libc::waitpid(child, &mut status, 0) < 0 {
                    if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                        return Err("waitpid failed".into());
                    }
                }
                if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                    Ok(())
                } else {
                    Err(
                        "unprivileged user namespaces are disabled on this host (sysctl \
                         kernel.unprivileged_userns_clone, user.max_user_namespaces or \
                         kernel.apparmor_restrict_unprivileged_userns)"
                            .into(),
                    )
                }
            }
        }
    }
}
