//! QEMU's jail (the qemu backend), made between fork and QEMU's exec when
//! kiln runs as root.
//!
//! kiln prepares it ([`QemuJail::prepare`]): a per-VM root directory
//! (`<run_dir>/root`, mode 0755) with a mount point for each thing QEMU
//! reads by path — `/usr` (its binary, libraries, firmware and option ROMs,
//! read-only), the host's `/lib*`, `/bin`, `/sbin` symlinks into it (or
//! read-only binds where they are directories), `/etc/ld.so.cache`, the
//! kernel and initramfs (read-only, at [`KERNEL`] and [`INITRD`]),
//! `/dev/null`, `/dev/urandom`, and `/dev/kvm` only with `-accel kvm` (a
//! node of the VM's own, `<run_dir>/kvm`, owned by its uid, mode 0600, as
//! Firecracker's jailer makes one: the host's may be 0600 root) — and
//! the console socket ([`CONSOLE`], owned by the VM's uid). Disks, the TAP
//! and passt's connection are descriptors QEMU inherits (`-add-fd`,
//! `fd=`), opened by kiln, so QEMU needs no path for them and no write
//! access to any host file.
//!
//! In the forked child ([`QemuJail::enter`], async-signal-safe calls only,
//! nothing allocated): a new PID namespace and a fork (QEMU is PID 1 there;
//! the process kiln started stays behind as a waiter with no descriptor and
//! the VM's uid, and ends as QEMU ended), new mount, IPC, UTS and network
//! namespaces, the binds, `pivot_root` into the root (then read-only), the
//! capability bounding set cleared, the per-VM uid/gid (no supplementary
//! group; no capability left),
//! `no_new_privs`. A step that fails ends the child with a message on
//! QEMU's stderr naming it: kiln reports it as the start's failure.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::MachineError;

/// The kernel, as QEMU sees it in its jail.
pub const KERNEL: &str = "/kernel";
/// The initramfs, as QEMU sees it in its jail.
pub const INITRD: &str = "/initrd";
/// The console socket, as QEMU sees it in its jail.
pub const CONSOLE: &str = "/console.sock";

/// Host directories (or symlinks to them) QEMU's binary and its libraries
/// are found in; what exists on this host is mirrored into the jail.
const SYSTEM_DIRS: [&str; 7] = [
    "/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BindKind {
    /// Read-only, no devices, no setuid.
    ReadOnly,
    /// A device node: writable, no setuid, no exec.
    Device,
}

#[derive(Debug)]
struct Bind {
    src: CString,
    /// The mount point, a host path under the jail root.
    dst: CString,
    kind: BindKind,
}

/// QEMU's jail, prepared by kiln before the fork.
#[derive(Debug)]
pub struct QemuJail {
    root: PathBuf,
    root_c: CString,
    binds: Vec<Bind>,
    uid: u32,
    gid: u32,
    /// Supplementary groups: none (QEMU reaches KVM through a node of its
    /// own uid).
    groups: Vec<libc::gid_t>,
    /// QEMU's executable as an absolute path (it is looked up in `PATH`
    /// before the jail hides the host).
    binary: PathBuf,
}

/// Whether kiln can make the whole jail around QEMU (it runs as root).
pub fn available() -> bool {
    super::namespaces::privileged()
}

fn c_path(p: &Path) -> Result<CString, MachineError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| MachineError::Config(format!("path {} contains a NUL byte", p.display())))
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> MachineError {
    move |source| MachineError::Io { what, source }
}

/// `binary` as an absolute path: as given when it has a `/`, else the first
/// executable file of that name in `path` (kiln's `PATH`).
pub fn resolve_binary(binary: &Path, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if binary.as_os_str().as_bytes().contains(&b'/') {
        return std::fs::canonicalize(binary).ok();
    }
    std::env::split_paths(path?)
        .map(|d| d.join(binary))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .and_then(|p| std::fs::canonicalize(p).ok())
}

impl QemuJail {
    /// Make the jail's root under `run_dir` and its mount points; the VM
    /// runs as `uid`/`gid`. `kvm`: whether QEMU uses `-accel kvm` (only
    /// then is `/dev/kvm` in the jail).
    pub fn prepare(
        run_dir: &Path,
        kernel: &Path,
        initrd: &Path,
        binary: &Path,
        kvm: bool,
        uid: u32,
        gid: u32,
    ) -> Result<QemuJail, MachineError> {
        use std::os::unix::fs::PermissionsExt;
        let binary =
            resolve_binary(binary, std::env::var_os("PATH").as_deref()).ok_or_else(|| {
                MachineError::Config(format!(
                    "QEMU ({}) is not an executable file here nor in PATH",
                    binary.display()
                ))
            })?;
        let root = run_dir.join("root");
        std::fs::create_dir(&root).map_err(io("QEMU's jail directory"))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
            .map_err(io("QEMU's jail directory"))?;
        let mut jail = QemuJail {
            root_c: c_path(&root)?,
            root,
            binds: Vec::new(),
            uid,
            gid,
            groups: Vec::new(),
            binary: binary.clone(),
        };
        for dir in SYSTEM_DIRS {
            let Ok(meta) = std::fs::symlink_metadata(dir) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(dir).map_err(io("QEMU's jail: a symlink"))?;
                std::os::unix::fs::symlink(target, jail.inside(Path::new(dir)))
                    .map_err(io("QEMU's jail: a symlink"))?;
            } else if meta.is_dir() {
                jail.bind(Path::new(dir), Path::new(dir), BindKind::ReadOnly)?;
            }
        }
        if !binary.starts_with("/usr") {
            // Its libraries and data still come from the jail's /usr.
            jail.bind(&binary, &binary, BindKind::ReadOnly)?;
        }
        let cache = Path::new("/etc/ld.so.cache");
        if cache.is_file() {
            jail.bind(cache, cache, BindKind::ReadOnly)?;
        }
        jail.bind(kernel, Path::new(KERNEL), BindKind::ReadOnly)?;
        jail.bind(initrd, Path::new(INITRD), BindKind::ReadOnly)?;
        for dev in ["/dev/null", "/dev/urandom"] {
            jail.bind(Path::new(dev), Path::new(dev), BindKind::Device)?;
        }
        if kvm {
            // A /dev/kvm node of the VM's own, as Firecracker's jailer
            // makes one in its chroot: the host's node is often 0600
            // root (no udev rule for group kvm, e.g. in a nested L1), and
            // QEMU opens it by path as the VM's uid.
            let dev = Path::new("/dev/kvm");
            let meta = std::fs::metadata(dev).map_err(io("/dev/kvm"))?;
            let node = run_dir.join("kvm");
            let node_c = c_path(&node)?;
            // SAFETY: mknod on a NUL-terminated path alive across the call;
            // it only creates a node in kiln's own per-VM run directory.
            if unsafe { libc::mknod(node_c.as_ptr(), libc::S_IFCHR | 0o600, meta.rdev()) } != 0 {
                return Err(io("QEMU's jail: a /dev/kvm node")(
                    std::io::Error::last_os_error(),
                ));
            }
            std::os::unix::fs::chown(&node, Some(uid), Some(gid))
                .map_err(io("QEMU's jail: a /dev/kvm node"))?;
            jail.bind(&node, dev, BindKind::Device)?;
        }
        Ok(jail)
    }

    /// Where `path` (as QEMU sees it) is on the host.
    fn inside(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Bind host `src` at `dst` in the jail: its mount point (an empty
    /// directory or file, with its parents) is made now.
    fn bind(&mut self, src: &Path, dst: &Path, kind: BindKind) -> Result<(), MachineError> {
        let at = self.inside(dst);
        let is_dir = std::fs::metadata(src)
            .map_err(|source| MachineError::MissingFile {
                what: "file for QEMU's jail",
                path: src.to_path_buf(),
                source,
            })?
            .is_dir();
        let parent = at.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(io("QEMU's jail: a mount point"))?;
        if is_dir {
            std::fs::create_dir(&at).map_err(io("QEMU's jail: a mount point"))?;
        } else {
            std::fs::File::create(&at).map_err(io("QEMU's jail: a mount point"))?;
        }
        self.binds.push(Bind {
            src: c_path(src)?,
            dst: c_path(&at)?,
            kind,
        });
        Ok(())
    }

    /// The jail's root directory on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// QEMU's executable (absolute).
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Where QEMU's console socket is made on the host (QEMU sees
    /// [`CONSOLE`]).
    pub fn console_socket(&self) -> PathBuf {
        self.inside(Path::new(CONSOLE))
    }

    /// Make `path` (a file in the jail QEMU must write, e.g. its console
    /// socket) the VM's.
    pub fn give(&self, path: &Path) -> Result<(), MachineError> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .map_err(io("QEMU's jail: give a file to the VM's uid"))
    }

    /// In the child std forked for QEMU, before exec: enter the jail (see
    /// the module's documentation). Returns in the process that goes on to
    /// exec QEMU; the waiter never returns, nor does a child whose jail
    /// failed (it exits with a message on stderr).
    ///
    /// # Safety
    /// Only between fork and exec, in a single-threaded child.
    pub unsafe fn enter(&self) {
        // SAFETY: only async-signal-safe system calls on integers, the
        // `CString`s and vectors prepared by `prepare` (alive as `self` is)
        // and locals; nothing is allocated; the caller runs it
        // single-threaded between fork and exec.
        unsafe {
            // kiln: this child's parent until it changes credentials.
            let parent = libc::getppid();
            if libc::unshare(libc::CLONE_NEWPID) != 0 {
                fail("unshare a PID namespace");
            }
            match libc::fork() {
                -1 => fail("fork into the PID namespace"),
                0 => {}
                child => self.wait_for(child, parent),
            }
            // QEMU dies with the waiter, which dies with kiln.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET,
            ) != 0
            {
                fail("unshare mount, IPC, UTS and network namespaces");
            }
            let name = b"kiln-qemu";
            libc::sethostname(name.as_ptr().cast(), name.len());
            self.mount_and_pivot();
            for cap in 0..64 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setresgid(self.gid, self.gid, self.gid) != 0
                || libc::setresuid(self.uid, self.uid, self.uid) != 0
                || libc::getuid() != self.uid
                || self.uid == 0
            {
                fail("take the VM's uid and gid");
            }
            // The credential change cleared the parent-death signal.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                fail("set no_new_privs");
            }
        }
    }

    /// The binds, `pivot_root` into the jail's root and the old root
    /// detached, the new root read-only.
    ///
    /// # Safety
    /// As [`QemuJail::enter`], in a new mount namespace.
    unsafe fn mount_and_pivot(&self) {
        let null = std::ptr::null::<libc::c_char>();
        let slash = c"/";
        // SAFETY: mount/chdir/pivot_root/umount2/chroot take NUL-terminated
        // strings alive across each call and null for the unused type and
        // data; they change only this child's new mount namespace.
        unsafe {
            let mount = |src: *const libc::c_char, dst: *const libc::c_char, flags| {
                libc::mount(src, dst, null, flags, std::ptr::null()) == 0
            };
            if !mount(null, slash.as_ptr(), libc::MS_REC | libc::MS_PRIVATE) {
                fail("make the mounts private");
            }
            let root = self.root_c.as_ptr();
            if !mount(root, root, libc::MS_BIND) {
                fail("bind-mount the jail root");
            }
            for b in &self.binds {
                if !mount(b.src.as_ptr(), b.dst.as_ptr(), libc::MS_BIND | libc::MS_REC) {
                    fail("bind-mount a file or directory into the jail");
                }
                let flags = match b.kind {
                    BindKind::ReadOnly => libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                    BindKind::Device => libc::MS_NOSUID | libc::MS_NOEXEC,
                };
                if !mount(
                    null,
                    b.dst.as_ptr(),
                    libc::MS_BIND | libc::MS_REMOUNT | flags,
                ) {
                    fail("make a bind mount in the jail read-only");
                }
            }
            if libc::chdir(root) != 0 {
                fail("enter the jail root");
            }
            if let Err(step) = super::root_here() {
                fail(step);
            }
            if libc::chdir(slash.as_ptr()) != 0 {
                fail("enter the new root");
            }
            let ro = libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC;
            if !mount(null, slash.as_ptr(), ro) {
                fail("make the jail root read-only");
            }
        }
    }

    /// The waiter: no descriptor, the VM's uid, no capability; ends as
    /// `child` (QEMU) ends.
    ///
    /// # Safety
    /// As [`QemuJail::enter`].
    unsafe fn wait_for(&self, child: libc::pid_t, parent: libc::pid_t) -> ! {
        // SAFETY: close_range, setgroups (empty list), setresgid/uid and
        // prctl take integers only.
        unsafe {
            libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
            libc::setgroups(0, std::ptr::null());
            libc::setresgid(self.gid, self.gid, self.gid);
            libc::setresuid(self.uid, self.uid, self.uid);
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        }
        super::namespaces::end_as(child, parent)
    }
}

/// Write "kiln: QEMU's jail: could not STEP: errno N" to stderr and exit
/// 126 (async-signal-safe: no allocation).
fn fail(step: &str) -> ! {
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut num = [0u8; 12];
    let mut i = num.len();
    let mut n = errno.unsigned_abs();
    loop {
        i -= 1;
        num[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    let parts: [&[u8]; 5] = [
        b"kiln: QEMU's jail: could not ",
        step.as_bytes(),
        b": errno ",
        &num[i..],
        b"\n",
    ];
    for p in parts {
        // SAFETY: write(2) of a valid buffer; _exit ends the process
        // without running anything of the parent's.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
    // SAFETY: as above.
    unsafe { libc::_exit(126) }
}

/// What of QEMU's jail (QEMU is process `pid`, its jail `jail`) shows in
/// /proc: its namespaces besides net/IPC/UTS, its root and its uid.
pub(crate) fn check(pid: u32, jail: &QemuJail, report: &mut super::JailReport) {
    for ns in ["pid", "mnt"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        match (mine, its) {
            (Ok(a), Ok(b)) if a != b => report.namespaces.push(ns.to_string()),
            _ => report.missing.push(format!("{ns} namespace")),
        }
    }
    // Its root is the jail's directory (the same inode), not the host's.
    let same =
        |a: &std::fs::Metadata, b: &std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
    match (
        std::fs::metadata(format!("/proc/{pid}/root")),
        std::fs::metadata(&jail.root),
    ) {
        (Ok(its), Ok(dir)) if same(&its, &dir) => report.pivot_root = true,
        _ => report.missing.push("pivot_root into the jail".into()),
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let ids = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (uids, gids) = (ids("Uid:"), ids("Gid:"));
    if uids.len() == 4 && uids.iter().all(|&u| u == jail.uid) && gids.iter().all(|&g| g == jail.gid)
    {
        report.uid = Some(jail.uid);
        report.gid = Some(jail.gid);
    } else {
        report.missing.push(format!("per-VM uid {}", jail.uid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_resolve_through_path_or_as_given() {
        let tmp = tempfile::tempdir().unwrap();
        let exe = tmp.path().join("qemu-fake");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        let plain = tmp.path().join("not-exec");
        std::fs::write(&plain, b"").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths(["/nonexistent", tmp.path().to_str().unwrap()]).unwrap();
        let real = std::fs::canonicalize(&exe).unwrap();
        assert_eq!(
            resolve_binary(Path::new("qemu-fake"), Some(&path)),
            Some(real.clone())
        );
        assert_eq!(resolve_binary(&exe, None), Some(real));
        assert_eq!(resolve_binary(Path::new("not-exec"), Some(&path)), None);
        assert_eq!(resolve_binary(Path::new("qemu-fake"), None), None);
    }

    #[test]
    fn prepare_makes_mount_points_and_no_kvm_without_kvm() {
        let (tmp, jail) = prepared(false, 64001, 64001);
        let root = tmp.path().join("root");
        assert!(root.join("kernel").is_file() && root.join("initrd").is_file());
        assert!(root.join("dev/null").exists());
        assert!(!root.join("dev/kvm").exists(), "no /dev/kvm with tcg");
        assert!(root.join("usr").is_dir() || root.join("usr").is_symlink());
        assert!(jail.groups.is_empty());
        assert!(jail.binary().is_absolute());
        assert_eq!(jail.console_socket(), root.join("console.sock"));
        // Only the mount points: nothing of the host's files is copied in.
        assert_eq!(std::fs::read(root.join("kernel")).unwrap(), b"");
        assert!(
            jail.binds
                .iter()
                .all(|b| b.dst.to_bytes().starts_with(root.as_os_str().as_bytes())),
            "{:?}",
            jail.binds
        );
    }

    #[test]
    fn with_kvm_the_vm_gets_a_kvm_node_of_its_own() {
        use std::os::unix::fs::FileTypeExt;
        let Ok(host) = std::fs::metadata("/dev/kvm") else {
            eprintln!("skipped: no /dev/kvm here");
            return;
        };
        if is_root() {
            let (tmp, jail) = prepared(true, 64002, 64003);
            let node = std::fs::metadata(tmp.path().join("kvm")).unwrap();
            assert!(node.file_type().is_char_device());
            assert_eq!(node.rdev(), host.rdev(), "the same device as the host's");
            assert_eq!((node.uid(), node.gid()), (64002, 64003));
            assert_eq!(node.mode() & 0o777, 0o600);
            assert!(tmp.path().join("root/dev/kvm").exists(), "its mount point");
            assert!(jail.groups.is_empty());
        } else {
            eprintln!("skipped: making a device node needs root");
        }
    }

    /// A jail prepared in a temporary run directory with a kernel and an
    /// initramfs of one byte each.
    fn prepared(kvm: bool, uid: u32, gid: u32) -> (tempfile::TempDir, QemuJail) {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("k");
        let initrd = tmp.path().join("i");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        let jail = QemuJail::prepare(tmp.path(), &kernel, &initrd, Path::new("sh"), kvm, uid, gid)
            .unwrap();
        (tmp, jail)
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
    }
}
