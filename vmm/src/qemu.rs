//! The qemu backend: `qemu-system-x86_64 -M microvm,acpi=on` (the binary
//! is [`QemuOptions::binary`]).
//!
//! Devices are virtio-mmio, described to the guest in ACPI (`LNRO0005`), so a
//! stock distribution kernel finds them once `virtio_mmio` is loaded. The
//! console is a virtio-serial port named [`MachineConfig::console_port`]
//! (binary-safe, no TTY layer)
//! whose host end is a Unix socket in the per-VM directory; the 8250 serial
//! (kernel messages) is read from QEMU's stdout into a bounded buffer.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::process::{Child, Command};

use crate::config::MachineConfig;
use crate::error::MachineError;
use crate::jail::cgroup::{self, Cgroup};
use crate::jail::qemu::{self as qemu_jail, QemuJail};
use crate::jail::{IsolationMode, JailReport};
use crate::machine::{ConsoleStream, ExitStatus};
use crate::process::handover::{network_backend, open};
use crate::process::pids;
use crate::run_dir::RunDir;
use crate::tail::{self, SharedTail};

/// The QEMU system emulator [`QemuOptions::default`] runs, looked up in `PATH`.
pub const DEFAULT_QEMU_BINARY: &str = "qemu-system-x86_64";

/// How the qemu backend runs QEMU. The caller decides (kiln's runner reads
/// `KILN_QEMU`); this crate reads no environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuOptions {
    /// The QEMU system emulator: a path, or a name looked up in `PATH`.
    pub binary: PathBuf,
}

impl QemuOptions {
    /// `binary` where the caller has one (e.g. from its configuration), else
    /// [`DEFAULT_QEMU_BINARY`].
    pub fn new(binary: Option<impl Into<PathBuf>>) -> QemuOptions {
        binary.map_or_else(QemuOptions::default, |b| QemuOptions { binary: b.into() })
    }
}

impl Default for QemuOptions {
    fn default() -> QemuOptions {
        QemuOptions {
            binary: DEFAULT_QEMU_BINARY.into(),
        }
    }
}

pub(crate) struct QemuMachine {
    /// The process kiln started: QEMU, or, with the whole jail, the waiter
    /// whose one child QEMU is.
    child: Child,
    /// QEMU's pid (in kiln's PID namespace), and a pidfd for it with the
    /// whole jail (killed through it before the waiter).
    qemu_pid: Option<u32>,
    qemu_pidfd: Option<OwnedFd>,
    accel: &'static str,
    serial: SharedTail,
    stderr: SharedTail,
    exited: Option<ExitStatus>,
    /// QEMU's cgroup (memory, pids, CPU), as the kvm backend's VMM has.
    cgroup: Option<Cgroup>,
    /// What of the jail around QEMU was applied.
    jail: JailReport,
    // Last: removed after the `Drop` impl has killed QEMU.
    run_dir: RunDir,
}

impl QemuMachine {
    pub(crate) async fn start(
        config: MachineConfig,
        hardware_kvm: bool,
    ) -> Result<(QemuMachine, ConsoleStream), MachineError> {
        let jailed = config.isolation.mode != IsolationMode::Off;
        // The whole jail needs root (mounts, pivot_root, another uid).
        let full = jailed && qemu_jail::available();
        if config.isolation.mode == IsolationMode::Strict && !full {
            return Err(MachineError::Jail(
                "the qemu backend's whole jail around QEMU (PID and mount namespaces, \
                 pivot_root, a per-VM uid) needs kiln to run as root; run kiln as root or \
                 use isolation = \"best-effort\""
                    .into(),
            ));
        }
        check_readable("kernel", &config.kernel)?;
        check_readable("initramfs", &config.initramfs)?;
        // Disks are descriptors QEMU inherits (`-add-fd`): opened here, so
        // QEMU needs neither their paths nor write access to host files.
        let mut disks = Vec::with_capacity(config.disks.len());
        for d in &config.disks {
            if d.serial.len() > 20 || d.serial.contains(',') {
                return Err(MachineError::Config(format!(
                    "disk serial '{}' must be at most 20 bytes without commas",
                    d.serial
                )));
            }
            // QEMU opens a read-write disk read-only first: its fdset
            // holds a descriptor of each kind.
            let mut fds = vec![OwnedFd::from(open("disk image", &d.path, false)?)];
            if !d.read_only {
                fds.push(OwnedFd::from(open("disk image", &d.path, true)?));
            }
            disks.push(fds);
        }
        let disk_fds: Vec<Vec<i32>> = disks
            .iter()
            .map(|fds| fds.iter().map(AsRawFd::as_raw_fd).collect())
            .collect();
        // The TAP, or a connection to passt's socket made here.
        let net = network_backend(&config.network)?.map(|(fd, _)| fd);
        // From here on, failures remove the directory: `run_dir`'s drop does.
        let run_dir = RunDir::create(&config.run_dir)?;
        let accel = if hardware_kvm { "kvm" } else { "tcg" };

        let jail = if full {
            let (uid, gid) = crate::jail::next_vm_ids(&config.isolation);
            Some(QemuJail::prepare(
                run_dir.path(),
                &config.kernel,
                &config.initramfs,
                &config.qemu.binary,
                accel == "kvm",
                uid,
                gid,
            )?)
        } else {
            None
        };
        let sock = match &jail {
            Some(j) => j.console_socket(),
            None => run_dir.path().join("console.sock"),
        };
        let listener = UnixListener::bind(&sock).map_err(|source| MachineError::Io {
            what: "console socket",
            source,
        })?;
        let inputs = match &jail {
            Some(j) => {
                j.give(&sock)?;
                QemuInputs {
                    kernel: qemu_jail::KERNEL.into(),
                    initramfs: qemu_jail::INITRD.into(),
                    console: qemu_jail::CONSOLE.into(),
                    disk_fds: disk_fds.clone(),
                    net_fd: net.as_ref().map(AsRawFd::as_raw_fd),
                }
            }
            None => QemuInputs {
                kernel: config.kernel.clone(),
                initramfs: config.initramfs.clone(),
                console: sock.clone(),
                disk_fds,
                net_fd: net.as_ref().map(AsRawFd::as_raw_fd),
            },
        };
        let args = qemu_args(&config, accel, &inputs);
        tracing::debug!(?args, "starting qemu");
        // QEMU inherits the disks and the network's descriptor.
        let inherit: Vec<i32> = inputs
            .disk_fds
            .iter()
            .flatten()
            .copied()
            .chain(inputs.net_fd)
            .collect();

        // QEMU's cgroup, joined by the child before exec (QEMU never runs
        // outside it).
        let cgroup = if jailed {
            // TCG's translation cache may grow to 1 GiB (QEMU's default
            // tb-size): allowed for, so that a busy guest is not killed.
            let mut limits = config.isolation.limits.clone();
            if accel == "tcg" {
                limits.memory_overhead_mib = limits.memory_overhead_mib.saturating_add(1024);
            }
            // QEMU's waiter (the whole jail) is one more process there.
            if jail.is_some() {
                limits.extra_pids = limits.extra_pids.saturating_add(1);
            }
            match cgroup::detect()
                .and_then(|h| Cgroup::create(&h, &limits, config.memory_mib, config.vcpus))
            {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!("QEMU runs without its cgroup: {e}");
                    None
                }
            }
        } else {
            None
        };
        let join_files = match &cgroup {
            Some(c) => c.join_files().unwrap_or_default(),
            None => Vec::new(),
        };
        let join_fds: Vec<i32> = join_files.iter().map(AsRawFd::as_raw_fd).collect();

        let program = jail
            .as_ref()
            .map_or_else(|| config.qemu.binary.clone(), |j| j.binary().to_path_buf());
        let mut cmd = Command::new(&program);
        // None of kiln's environment (its tokens) reaches QEMU; PATH finds it.
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let jail = jail.map(Arc::new);
        let in_child = jail.clone();
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), fcntl(2), write(2) (`cgroup::join_self`),
        // unshare(2) and, with the whole jail, what `QemuJail::enter`
        // calls, all async-signal-safe, and allocates nothing.
        // PR_SET_PDEATHSIG makes the kernel SIGKILL QEMU if kiln dies without
        // cleaning up (kill -9), so no VM outlives the runner. Clearing
        // FD_CLOEXEC on the disks' and the network's descriptors (the
        // child's copy of the table only) lets QEMU inherit them; `disks`
        // and `net` keep them open until then, as `join_files` keeps the
        // cgroup's files.
        unsafe {
            cmd.as_std_mut().pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if jailed {
                    // What fails here shows in `qemu_jail_report`.
                    cgroup::join_self(&join_fds);
                }
                match &in_child {
                    Some(j) => j.enter(),
                    None if jailed => qemu_jail_self(),
                    None => {}
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| MachineError::Spawn {
            program: program.clone(),
            source,
        })?;
        drop((join_files, disks, net));

        let serial = tail::shared(config.serial_log_limit.max(4096));
        let stderr = tail::shared(64 * 1024);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(drain(out, serial.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(drain(err, stderr.clone()));
        }

        // With the whole jail, the process kiln started is the waiter and
        // QEMU its one child (PID 1 of its namespace).
        let waiter = child.id();
        let qemu_pid = match (&jail, waiter) {
            (Some(_), Some(w)) => pids::only_child(w),
            (None, w) => w,
            _ => None,
        };
        let qemu_pidfd = if jail.is_some() {
            qemu_pid.and_then(pids::pidfd_open)
        } else {
            None
        };
        let jail_report = match qemu_pid {
            Some(pid) if jailed => {
                if let Some(c) = &cgroup {
                    if !c.contains(pid) {
                        if let Err(e) = c.add(pid) {
                            tracing::warn!("QEMU runs without its cgroup: {e}");
                        }
                    }
                }
                qemu_jail_report(pid, cgroup.as_ref(), jail.as_deref())
            }
            _ => JailReport::default(),
        };
        let mut machine = QemuMachine {
            child,
            qemu_pid,
            qemu_pidfd,
            jail: jail_report,
            run_dir,
            accel,
            serial,
            stderr,
            exited: None,
            cgroup,
        };
        if !machine.jail.missing.is_empty() && machine.qemu_pid.is_some() {
            if config.isolation.mode == IsolationMode::Strict {
                machine.kill_now().await;
                return Err(MachineError::Jail(format!(
                    "isolation is strict but part of QEMU's jail is missing: {}",
                    machine.jail.missing.join("; ")
                )));
            }
            tracing::warn!(
                "QEMU runs with part of its jail missing: {}",
                machine.jail.missing.join("; ")
            );
        }
        tracing::debug!(jail = %machine.jail.summary(), "QEMU started");
        // QEMU connects to our socket while it initialises its devices.
        let console = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(source) => {
                    machine.kill_now().await;
                    return Err(MachineError::Io { what: "console socket", source });
                }
            },
            status = machine.child.wait() => {
                // Give the stderr reader a moment to collect QEMU's last words.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let msg = String::from_utf8_lossy(&tail::contents(&machine.stderr)).trim().to_string();
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                machine.exited = Some(ExitStatus::Failed(status.clone()));
                return Err(MachineError::EarlyExit(if msg.is_empty() { status } else { msg }));
            }
            _ = tokio::time::sleep(config.start_timeout) => {
                machine.kill_now().await;
                return Err(MachineError::StartTimeout(config.start_timeout));
            }
        };
        // The socket file is not needed once connected.
        let _ = std::fs::remove_file(&sock);
        Ok((machine, console))
    }

    pub(crate) fn describe(&self) -> String {
        format!("qemu/{}", self.accel)
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.qemu_pid.or_else(|| self.child.id())
    }

    pub(crate) fn serial_log(&self) -> Vec<u8> {
        tail::contents(&self.serial)
    }

    pub(crate) fn serial_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        tail::subscribe(&self.serial)
    }

    pub(crate) async fn wait(&mut self) -> ExitStatus {
        if let Some(s) = &self.exited {
            return s.clone();
        }
        let status = match self.child.wait().await {
            Ok(s) if s.success() => ExitStatus::Shutdown,
            Ok(s) => {
                let err = tail::contents(&self.stderr);
                ExitStatus::Failed(format!("{s}: {}", String::from_utf8_lossy(&err).trim()))
            }
            Err(e) => ExitStatus::Failed(e.to_string()),
        };
        self.exited = Some(status.clone());
        status
    }

    async fn kill_now(&mut self) {
        if self.exited.is_none() {
            // QEMU first, so that its cgroup is empty once the waiter is.
            if let Some(fd) = &self.qemu_pidfd {
                pids::kill_through(fd);
            }
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
            self.exited = Some(ExitStatus::Killed);
        }
    }

    pub(crate) async fn destroy(mut self) -> Result<(), MachineError> {
        self.kill_now().await;
        if let Some(mut c) = self.cgroup.take() {
            c.remove();
        }
        self.run_dir.remove()
    }

    /// What of the jail around QEMU was applied.
    pub(crate) fn jail(&self) -> &JailReport {
        &self.jail
    }

    /// QEMU's cgroup, when it has one.
    pub(crate) fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }
}

impl Drop for QemuMachine {
    /// Kills QEMU; the per-VM directory goes with the `run_dir` field after.
    fn drop(&mut self) {
        if self.exited.is_none() {
            // Synchronous best effort: SIGKILL and reap if it is already gone.
            if let Some(fd) = &self.qemu_pidfd {
                pids::kill_through(fd);
            }
            let _ = self.child.start_kill();
            let _ = self.child.try_wait();
        }
    }
}

fn check_readable(what: &'static str, path: &Path) -> Result<(), MachineError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| MachineError::MissingFile {
            what,
            path: path.to_path_buf(),
            source,
        })
}

async fn drain(mut from: impl tokio::io::AsyncRead + Unpin, into: SharedTail) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut b) = into.lock() {
                    b.push(&buf[..n]);
                }
            }
        }
    }
}

/// What QEMU is given besides `config`: paths as QEMU sees them (in its
/// jail, or the host's) and the descriptors it inherits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuInputs {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub console: PathBuf,
    /// Per disk of `config.disks`, its descriptors (QEMU's fdset for it):
    /// one opened read-only, and for a read-write disk one opened so too.
    pub disk_fds: Vec<Vec<i32>>,
    /// The TAP, or a connection to passt's socket.
    pub net_fd: Option<i32>,
}

/// The QEMU command line for `config`.
pub fn qemu_args(config: &MachineConfig, accel: &str, inputs: &QemuInputs) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |s: &str| a.push(s.to_string());
    push("-M");
    push("microvm,acpi=on,rtc=on,pit=on,pic=on,isa-serial=on");
    push("-accel");
    push(accel);
    push("-cpu");
    push(if accel == "kvm" { "host" } else { "max" });
    push("-smp");
    push(&config.vcpus.to_string());
    push("-m");
    push(&format!("{}M", config.memory_mib));
    // Which VM this is, for `ps` and for leak checks: a jailed QEMU has no
    // other host path on its command line. A label only (QEMU opens
    // nothing by it); commas doubled for QEMU's option parser.
    push("-name");
    push(&format!("guest=kiln:{}", config.run_dir.display()).replace(',', ",,"));
    for s in [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ] {
        push(s);
    }
    // QEMU's own seccomp filter: no spawning, no privilege changes.
    push("-sandbox");
    push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
    // Modern (version 2) virtio-mmio, as the kvm backend offers; QEMU
    // defaults to the legacy interface.
    push("-global");
    push("virtio-mmio.force-legacy=false");
    push("-chardev");
    push("stdio,id=serial0,signal=off");
    push("-serial");
    push("chardev:serial0");
    push("-device");
    push("virtio-serial-device,max_ports=2");
    push("-chardev");
    push(&format!(
        "socket,id=console,path={}",
        qemu_escape(&inputs.console.to_string_lossy())
    ));
    push("-device");
    push(&format!(
        "virtserialport,chardev=console,name={}",
        qemu_escape(&config.console_port)
    ));
    for ((i, d), fds) in config.disks.iter().enumerate().zip(&inputs.disk_fds) {
        // fdset i + 1 holds the disk's descriptors; QEMU opens no path.
        for fd in fds {
            push("-add-fd");
            push(&format!("fd={fd},set={}", i + 1));
        }
        let mut drive = format!(
            "id=disk{i},file=/dev/fdset/{},format=raw,if=none,read-only={}",
            i + 1,
            if d.read_only { "on" } else { "off" }
        );
        if d.ephemeral {
            drive.push_str(",cache=unsafe");
        }
        push("-drive");
        push(&drive);
        push("-device");
        push(&format!(
            "virtio-blk-device,drive=disk{i},serial={}",
            d.serial
        ));
    }
    push("-device");
    push("virtio-rng-device");
    net_args(&config.network, inputs.net_fd, &mut push);
    push("-kernel");
    push(&inputs.kernel.to_string_lossy());
    push("-initrd");
    push(&inputs.initramfs.to_string_lossy());
    push("-append");
    let mut cmdline = config.cmdline.clone();
    if accel == "tcg" {
        // Under TCG the guest's TSC runs at the host's rate, and PIT-based
        // calibration fails on a loaded host (the kernel then stalls for
        // seconds or more): tell the guest the rate instead.
        // Likewise the delay-loop calibration of each vCPU (about 0.6 s per
        // secondary vCPU under TCG): loops_per_jiffy for a TSC delay loop is
        // the TSC rate over HZ (Debian's kernels use HZ=250).
        if let Some(khz) = host_tsc_khz() {
            cmdline.push_str(&format!(" tsc_early_khz={khz} lpj={}", khz * 4));
        }
    }
    push(&cmdline);
    a
}

/// The namespaces QEMU always gets: an empty network namespace (its
/// network is the TAP or passt's connection, a descriptor), IPC and UTS.
/// With the whole jail ([`QemuJail`]) also PID and mount namespaces.
const QEMU_NAMESPACES: [(libc::c_int, &str); 3] = [
    (libc::CLONE_NEWNET, "net"),
    (libc::CLONE_NEWIPC, "ipc"),
    (libc::CLONE_NEWUTS, "uts"),
];

/// Without the whole jail (kiln is not root), in the child before QEMU's
/// exec (async-signal-safe calls only, no allocation): new namespaces
/// ([`QEMU_NAMESPACES`]), an empty capability bounding set, `no_new_privs`.
/// Each may fail (kiln without root); kiln reads what QEMU got from /proc
/// after the spawn ([`qemu_jail_report`]).
fn qemu_jail_self() {
    // SAFETY: unshare(2) and prctl(2) take integers only.
    unsafe {
        for (flag, _) in QEMU_NAMESPACES {
            libc::unshare(flag);
        }
        for cap in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    }
}

/// What of its jail QEMU (process `pid`) runs with, read from /proc;
/// `jail`: the whole jail, when kiln made one.
fn qemu_jail_report(pid: u32, cgroup: Option<&Cgroup>, jail: Option<&QemuJail>) -> JailReport {
    let mut r = JailReport::default();
    for (_, ns) in QEMU_NAMESPACES {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        match (mine, its) {
            (Ok(a), Ok(b)) if a != b => r.namespaces.push(ns.to_string()),
            _ => r.missing.push(format!("{ns} namespace")),
        }
    }
    match jail {
        Some(j) => qemu_jail::check(pid, j, &mut r),
        None => r.missing.push(
            "pid and mount namespaces, pivot_root and a per-VM uid around QEMU (they need \
             kiln to run as root)"
                .into(),
        ),
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    r.capabilities_dropped = ["CapPrm:", "CapEff:", "CapBnd:"]
        .iter()
        .all(|f| field(f) == "0000000000000000");
    if !r.capabilities_dropped {
        r.missing.push("capabilities: some remain".into());
    }
    r.no_new_privs = field("NoNewPrivs:") == "1";
    if !r.no_new_privs {
        r.missing.push("no_new_privs".into());
    }
    // QEMU installs its `-sandbox` filter itself while it starts.
    r.seccomp = true;
    match cgroup {
        Some(c) if c.contains(pid) => r.cgroup = Some(c.path().display().to_string()),
        _ => r.missing.push("cgroup".into()),
    }
    r
}

/// The guest's virtio-net device and its QEMU netdev: `fd` is the TAP, or
/// kiln's connection to passt's socket.
fn net_args(network: &crate::Network, fd: Option<i32>, push: &mut impl FnMut(&str)) {
    let netdev = match (network, fd) {
        (crate::Network::None, _) | (_, None) => return,
        // The TAP carries a virtio-net header (`IFF_VNET_HDR`), which QEMU
        // finds on the descriptor (`vnet_hdr=` is refused with `fd=`): it
        // then offers the guest checksum and segmentation offloads.
        (crate::Network::Tap { .. }, Some(fd)) => format!("tap,id=net0,fd={fd}"),
        (crate::Network::Passt { .. }, Some(fd)) => {
            format!("stream,id=net0,server=off,addr.type=fd,addr.str={fd}")
        }
    };
    push("-netdev");
    push(&netdev);
    push("-device");
    push(&format!(
        "virtio-net-device,netdev=net0,mac={}",
        network.mac_text().unwrap_or_default()
    ));
}

/// The host CPU's nominal rate in kHz, from `/proc/cpuinfo`.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

/// QEMU option values escape ',' by doubling it.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_name_every_disk_by_serial_and_escape_commas() {
        let cfg = MachineConfig {
            kernel: "/k".into(),
            initramfs: "/i".into(),
            cmdline: "console=ttyS0".into(),
            vcpus: 2,
            memory_mib: 256,
            disks: vec![
                crate::Disk {
                    path: "/a,b.img".into(),
                    read_only: true,
                    serial: "kiln-root".into(),
                    ephemeral: false,
                },
                crate::Disk {
                    path: "/s.img".into(),
                    read_only: false,
                    serial: "kiln-scratch".into(),
                    ephemeral: true,
                },
            ],
            console_port: "org.example.port,0".into(),
            run_dir: "/tmp/x".into(),
            serial_log_limit: 1024,
            start_timeout: Duration::from_secs(1),
            qemu: QemuOptions::default(),
            isolation: Default::default(),
            test_forbidden_syscall: None,
            network: crate::Network::None,
        };
        let inputs = QemuInputs {
            kernel: "/kernel".into(),
            initramfs: "/initrd".into(),
            console: "/tmp/x/console.sock".into(),
            disk_fds: vec![vec![7], vec![8, 9]],
            net_fd: None,
        };
        let a = qemu_args(&cfg, "tcg", &inputs);
        let joined = a.join(" ");
        assert!(
            joined.contains(
                "-add-fd fd=7,set=1 -drive id=disk0,file=/dev/fdset/1,format=raw,if=none,read-only=on"
            ),
            "{joined}"
        );
        assert!(
            joined.contains(
                "-add-fd fd=8,set=2 -add-fd fd=9,set=2 -drive id=disk1,file=/dev/fdset/2"
            ),
            "{joined}"
        );
        assert!(
            joined.contains("-kernel /kernel -initrd /initrd"),
            "{joined}"
        );
        assert!(
            joined.contains(&format!("-name guest=kiln:{}", cfg.run_dir.display())),
            "the VM's directory names it: {joined}"
        );
        assert!(
            !joined.contains("a,,b.img"),
            "disks are descriptors: {joined}"
        );
        assert!(joined.contains("virtio-blk-device,drive=disk1,serial=kiln-scratch"));
        assert!(joined.contains("read-only=off,cache=unsafe"));
        assert!(joined.contains("-cpu max"));
        assert!(joined.contains("socket,id=console,path=/tmp/x/console.sock"));
        assert!(joined.contains("virtserialport,chardev=console,name=org.example.port,,0"));
        assert!(
            !joined.contains("-netdev"),
            "no network unless asked: {joined}"
        );
    }

    #[test]
    fn network_devices_carry_the_mac_and_the_backend() {
        let mut cfg = MachineConfig {
            kernel: "/k".into(),
            initramfs: "/i".into(),
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 128,
            disks: Vec::new(),
            console_port: "p".into(),
            run_dir: "/tmp/x".into(),
            serial_log_limit: 1024,
            start_timeout: Duration::from_secs(1),
            qemu: QemuOptions::default(),
            isolation: Default::default(),
            test_forbidden_syscall: None,
            network: crate::Network::Passt {
                socket: "/run/a,b/passt.sock".into(),
                mac: [0x52, 0x54, 0, 1, 2, 0xab],
                mtu: 1500,
            },
        };
        let mut inputs = QemuInputs {
            kernel: "/k".into(),
            initramfs: "/i".into(),
            console: "/c".into(),
            disk_fds: Vec::new(),
            net_fd: Some(11),
        };
        let joined = qemu_args(&cfg, "tcg", &inputs).join(" ");
        assert!(
            joined.contains("-netdev stream,id=net0,server=off,addr.type=fd,addr.str=11"),
            "{joined}"
        );
        assert!(joined.contains("virtio-net-device,netdev=net0,mac=52:54:00:01:02:ab"));
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd: std::os::fd::OwnedFd = null.into();
        cfg.network = crate::Network::Tap {
            fd: std::sync::Arc::new(fd),
            mac: [0x52, 0x54, 0, 0, 0, 1],
            mtu: 1500,
        };
        inputs.net_fd = Some(12);
        let joined = qemu_args(&cfg, "tcg", &inputs).join(" ");
        assert!(joined.contains("-netdev tap,id=net0,fd=12"), "{joined}");
        inputs.net_fd = None;
        let joined = qemu_args(&cfg, "tcg", &inputs).join(" ");
        assert!(!joined.contains("-netdev"), "{joined}");
    }
}
