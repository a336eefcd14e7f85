//! The qemu backend: `qemu-system-x86_64 -M microvm,acpi=on`.
//!
//! Devices are virtio-mmio, described to the guest in ACPI (`LNRO0005`), so a
//! stock distribution kernel finds them once `virtio_mmio` is loaded. The
//! agent's console is a named virtio-serial port (binary-safe, no TTY layer)
//! whose host end is a Unix socket in the per-VM directory; the 8250 serial
//! (kernel messages) is read from QEMU's stdout into a bounded buffer.

use std::collections::VecDeque;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::process::{Child, Command};

use crate::machine::{ConsoleStream, ExitStatus, MachineConfig, MachineError};

/// Name of the agent's virtio-serial port; the agent looks for it in
/// `/sys/class/virtio-ports/*/name`.
pub const AGENT_PORT_NAME: &str = "org.kiln.agent.0";

/// The QEMU binary; `KILN_QEMU` overrides it.
pub fn qemu_binary() -> String {
    std::env::var("KILN_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

/// A byte buffer that keeps only the last `limit` bytes written to it.
#[derive(Debug)]
pub struct TailBuffer {
    buf: VecDeque<u8>,
    limit: usize,
    dropped: u64,
    /// Bytes pushed so far, for whoever waits for output.
    written: tokio::sync::watch::Sender<u64>,
}

impl TailBuffer {
    pub fn new(limit: usize) -> Self {
        TailBuffer {
            buf: VecDeque::new(),
            limit,
            dropped: 0,
            written: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes whenever bytes are pushed (its value counts them all).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.written.subscribe()
    }

    pub fn push(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.written.send_modify(|n| *n += data.len() as u64);
        }
        let data = if data.len() > self.limit {
            self.dropped += (data.len() - self.limit) as u64;
            &data[data.len() - self.limit..]
        } else {
            data
        };
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.limit);
        self.buf.drain(..overflow);
        self.dropped += overflow as u64;
        self.buf.extend(data);
    }

    pub fn contents(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len() + 64);
        if self.dropped > 0 {
            out.extend_from_slice(
                format!("[... {} earlier bytes dropped]\n", self.dropped).as_bytes(),
            );
        }
        out.extend(self.buf.iter());
        out
    }
}

pub(crate) struct QemuMachine {
    child: Child,
    run_dir: PathBuf,
    accel: &'static str,
    serial: Arc<Mutex<TailBuffer>>,
    stderr: Arc<Mutex<TailBuffer>>,
    exited: Option<ExitStatus>,
}

impl QemuMachine {
    pub(crate) async fn start(
        config: MachineConfig,
        hardware_kvm: bool,
    ) -> Result<(QemuMachine, ConsoleStream), MachineError> {
        check_readable("kernel", &config.kernel)?;
        check_readable("initramfs", &config.initramfs)?;
        for d in &config.disks {
            check_readable("disk image", &d.path)?;
            if d.serial.len() > 20 || d.serial.contains(',') {
                return Err(MachineError::Config(format!(
                    "disk serial '{}' must be at most 20 bytes without commas",
                    d.serial
                )));
            }
        }
        std::fs::create_dir(&config.run_dir).map_err(|source| MachineError::RunDir {
            path: config.run_dir.clone(),
            source,
        })?;
        // From here on, failures must remove the directory: `RunDirGuard` does.
        let guard = RunDirGuard(Some(config.run_dir.clone()));

        let sock = config.run_dir.join("agent.sock");
        let listener = UnixListener::bind(&sock).map_err(|source| MachineError::Io {
            what: "console socket",
            source,
        })?;
        let accel = if hardware_kvm { "kvm" } else { "tcg" };
        let args = qemu_args(&config, accel, &sock);
        tracing::debug!(?args, "starting qemu");

        let mut cmd = Command::new(qemu_binary());
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe. PR_SET_PDEATHSIG makes
        // the kernel SIGKILL QEMU if kiln dies without cleaning up (kill -9),
        // so no VM outlives the runner.
        unsafe {
            cmd.as_std_mut().pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| MachineError::Spawn {
            program: qemu_binary(),
            source,
        })?;

        let serial = Arc::new(Mutex::new(TailBuffer::new(
            config.serial_log_limit.max(4096),
        )));
        let stderr = Arc::new(Mutex::new(TailBuffer::new(64 * 1024)));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(drain(out, serial.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(drain(err, stderr.clone()));
        }

        let mut machine = QemuMachine {
            child,
            run_dir: config.run_dir.clone(),
            accel,
            serial,
            stderr,
            exited: None,
        };
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
                let msg = String::from_utf8_lossy(&machine.stderr.lock().map(|b| b.contents()).unwrap_or_default()).trim().to_string();
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
        std::mem::forget(guard); // `machine` now owns the directory
        Ok((machine, console))
    }

    pub(crate) fn describe(&self) -> String {
        format!("qemu/{}", self.accel)
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub(crate) fn serial_log(&self) -> Vec<u8> {
        self.serial.lock().map(|b| b.contents()).unwrap_or_default()
    }

    pub(crate) fn serial_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.serial
            .lock()
            .map(|b| b.subscribe())
            .unwrap_or_else(|_| tokio::sync::watch::channel(0).1)
    }

    pub(crate) async fn wait(&mut self) -> ExitStatus {
        if let Some(s) = &self.exited {
            return s.clone();
        }
        let status = match self.child.wait().await {
            Ok(s) if s.success() => ExitStatus::Shutdown,
            Ok(s) => {
                let err = self.stderr.lock().map(|b| b.contents()).unwrap_or_default();
                ExitStatus::Failed(format!("{s}: {}", String::from_utf8_lossy(&err).trim()))
            }
            Err(e) => ExitStatus::Failed(e.to_string()),
        };
        self.exited = Some(status.clone());
        status
    }

    async fn kill_now(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
            self.exited = Some(ExitStatus::Killed);
        }
    }

    pub(crate) async fn destroy(mut self) -> Result<(), MachineError> {
        self.kill_now().await;
        let dir = std::mem::take(&mut self.run_dir);
        remove_run_dir(&dir)
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        if self.exited.is_none() {
            // Synchronous best effort: SIGKILL and reap if it is already gone.
            let _ = self.child.start_kill();
            let _ = self.child.try_wait();
        }
        if !self.run_dir.as_os_str().is_empty() {
            if let Err(e) = remove_run_dir(&self.run_dir) {
                tracing::warn!("{e}");
            }
        }
    }
}

/// Removes the per-VM directory if start-up fails half-way.
struct RunDirGuard(Option<PathBuf>);

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = remove_run_dir(&dir);
        }
    }
}

fn remove_run_dir(dir: &Path) -> Result<(), MachineError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(MachineError::Io {
            what: "per-VM directory",
            source,
        }),
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

async fn drain(mut from: impl tokio::io::AsyncRead + Unpin, into: Arc<Mutex<TailBuffer>>) {
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

/// The QEMU command line for `config`.
pub fn qemu_args(config: &MachineConfig, accel: &str, console_sock: &Path) -> Vec<String> {
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
        "socket,id=agent,path={}",
        qemu_escape(&console_sock.to_string_lossy())
    ));
    push("-device");
    push(&format!(
        "virtserialport,chardev=agent,name={AGENT_PORT_NAME}"
    ));
    for (i, d) in config.disks.iter().enumerate() {
        let mut drive = format!(
            "id=disk{i},file={},format=raw,if=none,read-only={}",
            qemu_escape(&d.path.to_string_lossy()),
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
    push("-kernel");
    push(&config.kernel.to_string_lossy());
    push("-initrd");
    push(&config.initramfs.to_string_lossy());
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
    fn tail_buffer_keeps_the_last_bytes_and_counts_the_rest() {
        let mut t = TailBuffer::new(8);
        t.push(b"0123");
        t.push(b"456789ab");
        let c = t.contents();
        assert!(
            c.ends_with(b"456789ab"),
            "{:?}",
            String::from_utf8_lossy(&c)
        );
        assert!(String::from_utf8_lossy(&c).contains("4 earlier bytes dropped"));
        let mut t = TailBuffer::new(4);
        t.push(b"abcdefgh");
        assert!(t.contents().ends_with(b"efgh"));
    }

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
            run_dir: "/tmp/x".into(),
            serial_log_limit: 1024,
            start_timeout: Duration::from_secs(1),
        };
        let a = qemu_args(&cfg, "tcg", Path::new("/tmp/x/agent.sock"));
        let joined = a.join(" ");
        assert!(
            joined.contains("file=/a,,b.img,format=raw,if=none,read-only=on"),
            "{joined}"
        );
        assert!(joined.contains("virtio-blk-device,drive=disk1,serial=kiln-scratch"));
        assert!(joined.contains("read-only=off,cache=unsafe"));
        assert!(joined.contains("-cpu max"));
        assert!(joined.contains(&format!("name={AGENT_PORT_NAME}")));
    }
}
