//! One VMM process per VM: the kvm backend as kiln sees it.
//!
//! kiln opens everything the VM needs (`/dev/kvm`, kernel, initramfs, disks)
//! and starts the `kiln-vmm` executable with those descriptors at fixed
//! numbers ([`fds`]), a control socket and the VMM's end of the console
//! socket, an empty environment, and `PR_SET_PDEATHSIG` (a kiln killed with
//! `kill -9` takes its VMs with it). The VMM process jails itself
//! ([`crate::jail`]), builds the VM ([`crate::kvm::KvmMachine`]) and then
//! talks [`proto`] over the control socket: serial output, the first exit,
//! how the VM ended and its exit counters. kiln never maps guest memory.
//!
//! A VMM process that dies without saying how the VM ended is a
//! [`ExitStatus::Failed`] naming why: the signal, a seccomp violation (with
//! the syscall when the process reported it), or the memory cgroup's OOM
//! killer.

mod child;
pub mod fds;
pub(crate) mod handover;
pub(crate) mod pids;
pub mod proto;
mod report;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::watch;

pub use self::child::main as child_main;
use self::handover::{high_copy, io_err, network_backend, open};
use self::pids::{end_failed_start, kill_through, only_child, pidfd_open};
use self::proto::{FromVmm, StartVm, ToVmm, WireDisk};
use self::report::{describe_death, read_reports, remote_error, Reported};
use crate::config::MachineConfig;
use crate::error::MachineError;
use crate::jail::cgroup::{self, Cgroup};
use crate::jail::{IsolationMode, JailReport, JailSpec, Step};
use crate::kvm::snapshot::SnapshotUse;
use crate::kvm::stats::ExitStats;
use crate::machine::{ConsoleStream, ExitStatus};
use crate::run_dir::RunDir;
use crate::tail::{self, SharedTail};

/// Where the high copies of handed-over descriptors go before they are
/// moved to their fixed numbers in the child (above every fixed number, so
/// no move overwrites a source not yet moved).
const HIGH_FD: i32 = 1000;

/// How long a snapshot may take (pausing, writing guest memory).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a VMM process that said how the VM ended may take to exit.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// The `kiln-vmm` executable: `configured` (kiln's runner passes
/// `$KILN_VMM` or `vmm` from kiln.toml), else next to the running executable or one directory up (test binaries live in
/// `target/*/deps`), else `/usr/lib/kiln/kiln-vmm`.
pub fn locate_vmm(configured: Option<&Path>) -> Result<PathBuf, MachineError> {
    if let Some(p) = configured {
        return Ok(p.to_path_buf());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("kiln-vmm"));
            if let Some(up) = dir.parent() {
                candidates.push(up.join("kiln-vmm"));
            }
        }
    }
    candidates.push("/usr/lib/kiln/kiln-vmm".into());
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(MachineError::BackendUnavailable {
            backend: "kvm",
            why: "the kiln-vmm executable was not found next to kiln or in /usr/lib/kiln \
                  (build it with `cargo build -p kiln-vmm --bin kiln-vmm`, or set KILN_VMM)"
                .into(),
        })
}

/// A VM run by a VMM process.
pub struct VmmProcess {
    child: tokio::process::Child,
    /// The process kiln started (in a PID namespace, the waiter).
    pid: Option<u32>,
    /// The VMM in its PID namespace, the child of `pid`, and a pidfd of
    /// it (killed and waited for through it: a number could be reused).
    vmm_pid: Option<u32>,
    vmm_pidfd: Option<OwnedFd>,
    serial: SharedTail,
    reported: Arc<Mutex<Reported>>,
    /// Set by the reader when the conversation ends: how the VM ended if
    /// the VMM process said so.
    ended: watch::Receiver<Option<Option<ExitStatus>>>,
    reader: tokio::task::JoinHandle<()>,
    /// Kept open: the VMM process stops when it sees the end of it.
    control: OwnedWriteHalf,
    exited: Option<ExitStatus>,
    memory_bytes: u64,
    jail: JailReport,
    cgroup: Option<Cgroup>,
    run_dir: RunDir,
}

impl VmmProcess {
    pub async fn start(config: MachineConfig) -> Result<(VmmProcess, ConsoleStream), MachineError> {
        VmmProcess::start_with_snapshot(config, SnapshotUse::None).await
    }

    /// [`VmmProcess::start`], restoring from a snapshot or ready to take one.
    pub async fn start_with_snapshot(
        config: MachineConfig,
        snapshot: SnapshotUse,
    ) -> Result<(VmmProcess, ConsoleStream), MachineError> {
        let iso = &config.isolation;
        let program = locate_vmm(iso.vmm_program.as_deref())?;
        let run_dir = RunDir::create(&config.run_dir)?;
        let root = run_dir.path().join("root");
        std::fs::create_dir(&root).map_err(io_err("jail root"))?;

        let kvm = open("KVM device", Path::new("/dev/kvm"), true)?;
        let kernel = open("kernel", &config.kernel, false)?;
        let initramfs = open("initramfs", &config.initramfs, false)?;
        let disks = config
            .disks
            .iter()
            .map(|d| open("disk image", &d.path, !d.read_only))
            .collect::<Result<Vec<_>, _>>()?;
        let (control, control_child) =
            std::os::unix::net::UnixStream::pair().map_err(io_err("control socket"))?;
        let (console_vmm, console_user) =
            std::os::unix::net::UnixStream::pair().map_err(io_err("console socket"))?;

        let mut handed: Vec<(OwnedFd, i32)> = vec![
            (high_copy(&control_child)?, fds::CONTROL),
            (high_copy(&console_vmm)?, fds::CONSOLE),
            (high_copy(&kvm)?, fds::KVM),
            (high_copy(&kernel)?, fds::KERNEL),
            (high_copy(&initramfs)?, fds::INITRAMFS),
        ];
        for (i, d) in disks.iter().enumerate() {
            handed.push((high_copy(d)?, fds::FIRST_DISK + i as i32));
        }
        let snapshot_file = match &snapshot {
            SnapshotUse::None => None,
            SnapshotUse::Restore { path, .. } => Some(open("snapshot", path, false)?),
            SnapshotUse::WriteTo(path) => Some(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)
                    .map_err(|source| MachineError::MissingFile {
                        what: "snapshot file",
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        if let Some(f) = &snapshot_file {
            handed.push((high_copy(f)?, fds::SNAPSHOT));
        }
        let network = network_backend(&config.network)?;
        if let Some((fd, _)) = &network {
            handed.push((high_copy(fd)?, fds::network(disks.len())));
        }
        // Only the child holds these now (through the high copies).
        drop((control_child, console_vmm, kvm, kernel, initramfs, disks));
        drop(snapshot_file);

        let (uid, gid) = crate::jail::next_vm_ids(iso);

        let mut missing = Vec::new();
        let mut steps = Vec::new();
        let t = Instant::now();
        let cgroup = if iso.mode == IsolationMode::Off {
            None
        } else {
            match cgroup::detect()
                .and_then(|h| Cgroup::create(&h, &iso.limits, config.memory_mib, config.vcpus))
            {
                Ok(c) => Some(c),
                Err(e) => {
                    missing.push(format!("cgroup: {e}"));
                    None
                }
            }
        };
        if iso.mode == IsolationMode::Strict && !missing.is_empty() {
            return Err(MachineError::Jail(missing.join("; ")));
        }
        steps.push(Step::since("kiln: create the cgroup", t));

        let t = Instant::now();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let moves: Vec<(i32, i32)> = handed.iter().map(|(f, n)| (f.as_raw_fd(), *n)).collect();
        // The child moves itself into its cgroup before exec (the cheap
        // way, see `Cgroup::join_files`); kiln checks and falls back below.
        let join_files = match &cgroup {
            Some(cg) => cg.join_files().unwrap_or_default(),
            None => Vec::new(),
        };
        let join_fds: Vec<i32> = join_files.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), write(2) (`cgroup::join_self`) and dup2(2), which
        // are async-signal-safe, on descriptors that `handed` and
        // `join_files` keep open until spawn returns; it allocates nothing. PR_SET_PDEATHSIG makes the kernel SIGKILL the
        // VMM if kiln dies without cleaning up. dup2 clears close-on-exec on
        // the fixed numbers; every other descriptor of kiln is close-on-exec.
        unsafe {
            cmd.as_std_mut().pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // A failure shows in the check after spawn.
                cgroup::join_self(&join_fds);
                for &(from, to) in &moves {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| MachineError::Spawn {
            program: program.clone(),
            source,
        })?;
        drop(handed);
        drop(join_files);
        let pid = child.id();
        steps.push(Step::since("kiln: spawn kiln-vmm", t));
        let t = Instant::now();

        if let (Some(cg), Some(pid)) = (&cgroup, pid) {
            let joined = cg.contains(pid) || {
                tracing::debug!(pid, "the VMM process did not join its cgroup itself");
                false
            };
            if let Err(e) = if joined { Ok(()) } else { cg.add(pid) } {
                missing.push(format!("cgroup: {e}"));
                if iso.mode == IsolationMode::Strict {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return Err(MachineError::Jail(missing.join("; ")));
                }
            }
        }

        steps.push(Step::since("kiln: join the cgroup", t));
        let t = Instant::now();
        control
            .set_nonblocking(true)
            .map_err(io_err("control socket"))?;
        let control =
            tokio::net::UnixStream::from_std(control).map_err(io_err("control socket"))?;
        let (mut rd, mut wr) = control.into_split();
        let start = StartVm {
            version: proto::VERSION,
            cmdline: config.cmdline.clone(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            console_port: config.console_port.clone(),
            serial_log_limit: config.serial_log_limit,
            disks: config
                .disks
                .iter()
                .map(|d| WireDisk {
                    read_only: d.read_only,
                    serial: d.serial.clone(),
                    ephemeral: d.ephemeral,
                })
                .collect(),
            jail: JailSpec {
                mode: iso.mode,
                uid,
                gid,
                root,
                keep_fds: (fds::CONTROL
                    ..fds::network(config.disks.len()) + i32::from(network.is_some()))
                    .chain((snapshot != SnapshotUse::None).then_some(fds::SNAPSHOT))
                    .collect(),
            },
            test_forbidden_syscall: config.test_forbidden_syscall.clone(),
            restore: match &snapshot {
                SnapshotUse::Restore { profile_hash, .. } => Some(profile_hash.clone()),
                _ => None,
            },
            snapshot_out: matches!(snapshot, SnapshotUse::WriteTo(_)),
            network: network.map(|(_, wire)| wire),
        };

        let answer = tokio::time::timeout(config.start_timeout, async {
            proto::write_async(&mut wr, &ToVmm::Start(Box::new(start))).await?;
            proto::read_async::<FromVmm>(&mut rd).await
        })
        .await;
        let mut jail = match answer {
            Ok(Ok(FromVmm::Started { version, jail })) if version == proto::VERSION => jail,
            Ok(Ok(FromVmm::StartFailed(e))) => {
                end_failed_start(&mut child, pid).await;
                return Err(remote_error(e));
            }
            Ok(Ok(FromVmm::Violation(nr))) => {
                end_failed_start(&mut child, pid).await;
                return Err(MachineError::EarlyExit(format!(
                    "the VMM process was killed by its seccomp filter while starting the VM: \
                     it made the forbidden system call {}",
                    crate::jail::seccomp::syscall_name(nr)
                )));
            }
            Ok(Ok(other)) => {
                end_failed_start(&mut child, pid).await;
                return Err(MachineError::EarlyExit(format!(
                    "the VMM process answered {other:?} instead of starting (version {} expected)",
                    proto::VERSION
                )));
            }
            Ok(Err(e)) => {
                let status = tokio::time::timeout(REAP_TIMEOUT, child.wait()).await;
                end_failed_start(&mut child, pid).await;
                let why = match status {
                    Ok(Ok(s)) => describe_death(s, None, None, None),
                    _ => format!("the VMM process broke the protocol: {e}"),
                };
                return Err(MachineError::EarlyExit(why));
            }
            Err(_) => {
                end_failed_start(&mut child, pid).await;
                return Err(MachineError::StartTimeout(config.start_timeout));
            }
        };
        // In a PID namespace the VM runs in the child of the process kiln
        // started (see `jail::enter_pid_namespace`); it exists by now.
        let vmm_pid = if jail.namespaces.iter().any(|n| n == "pid") {
            pid.and_then(only_child)
        } else {
            None
        };
        let vmm_pidfd = vmm_pid.and_then(pidfd_open);
        jail.missing.extend(missing);
        // kiln's steps, then the VMM process's, then the whole exchange
        // (which includes the VMM process's).
        jail.steps.splice(0..0, steps);
        jail.steps
            .push(Step::since("kiln: start message until Started", t));
        jail.cgroup = cgroup.as_ref().map(|c| c.path().display().to_string());
        if !jail.missing.is_empty() {
            tracing::warn!(
                "the VMM process runs with part of its jail missing: {}",
                jail.missing.join("; ")
            );
        }
        tracing::debug!(pid, jail = %jail.summary(), steps = %jail.describe_steps(), "VMM process started");

        let serial = tail::shared(config.serial_log_limit.max(4096));
        let reported = Arc::new(Mutex::new(Reported::default()));
        let (ended_tx, ended) = watch::channel(None);
        let reader = tokio::spawn(read_reports(rd, serial.clone(), reported.clone(), ended_tx));

        console_user
            .set_nonblocking(true)
            .map_err(io_err("console socket"))?;
        let console = ConsoleStream::from_std(console_user).map_err(io_err("console socket"))?;
        Ok((
            VmmProcess {
                child,
                pid,
                vmm_pid,
                vmm_pidfd,
                serial,
                reported,
                ended,
                reader,
                control: wr,
                exited: None,
                memory_bytes: u64::from(config.memory_mib) << 20,
                jail,
                cgroup,
                run_dir,
            },
            console,
        ))
    }

    pub fn describe(&self) -> String {
        "kvm".to_string()
    }

    /// The process that runs the VM, as kiln's PID namespace numbers it:
    /// PID 1 of the VM's own namespace when it has one, else the process
    /// kiln started (`None` once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.exited
            .is_none()
            .then_some(self.vmm_pid.or(self.pid))
            .flatten()
    }

    /// What of the jail was applied.
    pub fn jail(&self) -> &JailReport {
        &self.jail
    }

    /// Files the VMM process's threads tried to open and were refused
    /// (`thread: path`), the first few.
    pub fn refused_opens(&self) -> Vec<String> {
        self.reported
            .lock()
            .map(|r| r.refused.clone())
            .unwrap_or_default()
    }

    /// The VMM process's cgroup, when it has one.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    pub fn serial_log(&self) -> Vec<u8> {
        tail::contents(&self.serial)
    }

    pub fn serial_updates(&self) -> watch::Receiver<u64> {
        tail::subscribe(&self.serial)
    }

    pub fn first_exit(&self) -> Option<Duration> {
        self.reported.lock().ok()?.first_exit
    }

    /// The exit counters as last reported (at the end of the VM).
    pub fn exit_stats(&self) -> ExitStats {
        self.reported
            .lock()
            .map(|r| r.stats.clone())
            .unwrap_or_default()
    }

    /// Guest RAM size, and how much of it was resident when the VM ended
    /// (0 before).
    pub fn guest_memory_resident(&self) -> (u64, u64) {
        let resident = self.reported.lock().map(|r| r.guest_resident).unwrap_or(0);
        (self.memory_bytes, resident)
    }

    pub async fn wait(&mut self) -> ExitStatus {
        if let Some(s) = &self.exited {
            return s.clone();
        }
        let reported = match self.ended.wait_for(|e| e.is_some()).await {
            Ok(e) => e.clone().flatten(),
            Err(_) => None,
        };
        let status = match reported {
            Some(s) => {
                if tokio::time::timeout(REAP_TIMEOUT, self.child.wait())
                    .await
                    .is_err()
                {
                    let _ = self.child.start_kill();
                    let _ = self.child.wait().await;
                }
                s
            }
            None => match self.child.wait().await {
                Ok(s) => {
                    let (violation, panic) = match self.reported.lock() {
                        Ok(r) => (r.violation, r.panic.clone()),
                        Err(_) => (None, None),
                    };
                    ExitStatus::Failed(describe_death(
                        s,
                        self.cgroup.as_ref(),
                        violation,
                        panic.as_deref(),
                    ))
                }
                Err(e) => {
                    ExitStatus::Failed(format!("the VMM process could not be waited for: {e}"))
                }
            },
        };
        self.exited = Some(status.clone());
        status
    }

    /// Ask the VMM process for a snapshot into the file it was started
    /// with ([`SnapshotUse::WriteTo`]) and wait for its answer. The VM runs
    /// on afterwards.
    pub async fn snapshot(
        &mut self,
        profile: &crate::kvm::snapshot::Profile,
    ) -> Result<crate::kvm::snapshot::Header, MachineError> {
        if let Ok(mut r) = self.reported.lock() {
            r.snapshot = None;
        }
        proto::write_async(
            &mut self.control,
            &ToVmm::Snapshot(Box::new(profile.clone())),
        )
        .await
        .map_err(|e| MachineError::Io {
            what: "VMM control socket",
            source: std::io::Error::other(e.to_string()),
        })?;
        let deadline = tokio::time::Instant::now() + SNAPSHOT_TIMEOUT;
        loop {
            if let Some(r) = self
                .reported
                .lock()
                .ok()
                .and_then(|mut r| r.snapshot.take())
            {
                return r.map(|h| *h).map_err(remote_error);
            }
            if self.ended.borrow().is_some() {
                let status = self.wait().await;
                return Err(MachineError::EarlyExit(format!(
                    "the VMM process ended before its snapshot was written: {status:?}"
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(MachineError::Io {
                    what: "snapshot",
                    source: std::io::Error::other(format!(
                        "no answer from the VMM process within {SNAPSHOT_TIMEOUT:?}"
                    )),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Kill the VMM in its PID namespace, when it has one, and wait
    /// (briefly) until it has exited: its cgroup can be removed only then.
    /// Killing the waiter alone would kill it too, but later.
    fn kill_vmm(&self) {
        if let Some(fd) = &self.vmm_pidfd {
            kill_through(fd);
        }
    }

    pub async fn destroy(mut self) -> Result<(), MachineError> {
        if self.exited.is_none() {
            self.kill_vmm();
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
            self.exited = Some(ExitStatus::Killed);
        }
        self.reader.abort();
        if let Some(mut c) = self.cgroup.take() {
            c.remove();
        }
        self.run_dir.remove()
    }
}

impl Drop for VmmProcess {
    /// Kills the VMM process and reaps it (briefly) so that its cgroup can
    /// go; the per-VM directory goes with the `run_dir` field after.
    fn drop(&mut self) {
        self.reader.abort();
        if self.exited.is_none() {
            self.kill_vmm();
            let _ = self.child.start_kill();
            for _ in 0..1000 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
