//! The VMM process (`kiln-vmm`): read the VM from the control socket, jail
//! this process, build the VM from the descriptors kiln handed over, install
//! the seccomp filters, then report serial output and how the VM ended.
//!
//! Nothing here trusts the guest; the only input besides the guest is kiln's
//! start message, read once before the jail closes in.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

use super::fds;
use super::proto::{
    self, FromVmm, StartVm, ToVmm, WireError, WireErrorKind, WireNetKind, WireStatus,
};
use crate::config::{Disk, MachineConfig};
use crate::error::MachineError;
use crate::jail::{self, seccomp};
use crate::kvm::devices::virtio::net::NetBackend;
use crate::kvm::snapshot::Snapshot;
use crate::kvm::{KvmMachine, NetSource, Sources, ThreadKind};
use crate::machine::ExitStatus;

/// Set once kiln has been told the VM started (read by the test hook).
static STARTED: AtomicBool = AtomicBool::new(false);

fn chain(e: &dyn std::error::Error) -> Vec<String> {
    std::iter::successors(Some(e), |e| e.source())
        .map(|e| e.to_string())
        .collect()
}

fn jail_error(e: &jail::JailError) -> WireError {
    WireError {
        kind: WireErrorKind::Jail,
        chain: chain(e),
    }
}

fn wire_error(e: &MachineError) -> WireError {
    match e {
        MachineError::Config(s) => WireError {
            kind: WireErrorKind::Config,
            chain: vec![s.clone()],
        },
        MachineError::Boot(b) => WireError {
            kind: WireErrorKind::Boot,
            chain: chain(b),
        },
        other => WireError {
            kind: WireErrorKind::Other,
            chain: chain(other),
        },
    }
}

/// Entry point of the `kiln-vmm` executable.
/// Exit status of a VMM process whose thread panicked.
pub const PANIC_EXIT: i32 = 158;

/// Report a panic on the control socket and end the whole process.
///
/// The default hook would capture a backtrace, which opens
/// `/proc/self/exe`: inside the seccomp filter that is a violation that
/// hides the panic. This hook only formats, writes and exits; the VM must
/// not go on with one of its threads gone.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let text = info.to_string();
        eprintln!("kiln-vmm: {text}");
        if let Ok(frame) = proto::encode(&FromVmm::Panicked(text)) {
            // SAFETY: write(2) on the control socket kiln handed over at
            // this number, from a buffer valid for its length; a frame
            // another thread is writing at the same time may be torn, and
            // kiln then reports the death without the message.
            unsafe { libc::write(fds::CONTROL, frame.as_ptr().cast(), frame.len()) };
        }
        // SAFETY: _exit(2) ends the process without running destructors
        // that could touch guest memory or the VM's descriptors.
        unsafe { libc::_exit(PANIC_EXIT) };
    }));
}

pub fn main() -> ExitCode {
    install_panic_hook();
    // One malloc arena for every thread. glibc trims a thread arena's heap
    // after frees and, the first time, reads
    // /proc/sys/vm/overcommit_memory to decide how: an open(2) under the
    // seccomp filter (refused, see `seccomp`), seen from the event-loop
    // thread in the nested tier. The main arena trims with brk alone.
    // SAFETY: mallopt(3) with a valid parameter, before any other thread
    // exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1)
    };
    // SAFETY: kiln starts this process with the control socket at this
    // number (`super::fds`) and nothing else owns it here.
    let mut control = unsafe { UnixStream::from_raw_fd(fds::CONTROL) };
    let start = match proto::read_blocking::<ToVmm>(&mut control) {
        Ok(ToVmm::Start(s)) if s.version == proto::VERSION => s,
        Ok(_) => {
            eprintln!(
                "kiln-vmm: expected a version {} start message",
                proto::VERSION
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("kiln-vmm: is an internal program of kiln, started by it ({e})");
            return ExitCode::from(2);
        }
    };
    let fail = |control: &mut UnixStream, e: WireError| {
        let _ = proto::write_blocking(control, &FromVmm::StartFailed(e));
        ExitCode::from(1)
    };

    // Take the handed-over descriptors before the jail closes the rest.
    // SAFETY: kiln put these at these numbers (`super::fds`); each is
    // owned by exactly one object from here on.
    let sources = unsafe {
        Sources {
            kvm: Kvm::from_raw_fd(fds::KVM),
            kernel: File::from_raw_fd(fds::KERNEL),
            initramfs: File::from_raw_fd(fds::INITRAMFS),
            disks: (0..start.disks.len() as i32)
                .map(|i| File::from_raw_fd(fds::FIRST_DISK + i))
                .collect(),
            console: UnixStream::from_raw_fd(fds::CONSOLE),
            network: start.network.as_ref().map(|n| {
                let fd = fds::network(start.disks.len());
                NetSource {
                    backend: match n.kind {
                        WireNetKind::Tap => NetBackend::Tap(File::from_raw_fd(fd)),
                        WireNetKind::Stream => NetBackend::Stream(UnixStream::from_raw_fd(fd)),
                    },
                    mac: n.mac,
                    mtu: n.mtu,
                }
            }),
        }
    };
    // SAFETY: as above; kiln hands this number only with one of these.
    let snapshot_file = (start.restore.is_some() || start.snapshot_out)
        .then(|| unsafe { File::from_raw_fd(fds::SNAPSHOT) });

    if start.snapshot_out {
        // Whether a snapshot may skip pages the host has not resident;
        // `/proc` is out of reach once jailed.
        crate::kvm::snapshot::memory::no_swap();
    }

    // Kiln put this process in its cgroup before it sent the start message:
    // the VMM forked here inherits it.
    let t = Instant::now();
    let user_ns = jail::enter_user_namespace(&start.jail);
    let user_ns_step = jail::Step::since("user namespace", t);
    let t = Instant::now();
    let pid_ns = match jail::enter_pid_namespace(&start.jail, &user_ns) {
        Ok(p) => p,
        Err(e) => return fail(&mut control, jail_error(&e)),
    };
    let pid_ns_step = jail::Step::since("pid namespace", t);
    let mut report = match jail::apply(&start.jail, &user_ns, &pid_ns) {
        Ok(r) => r,
        Err(e) => return fail(&mut control, jail_error(&e)),
    };
    report.steps.splice(0..0, [user_ns_step, pid_ns_step]);
    let t = Instant::now();
    let filters = if start.jail.mode == jail::IsolationMode::Off {
        None
    } else {
        match seccomp::Filters::build_for(start.snapshot_out) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                report.missing.push(format!("seccomp: {e}"));
                if start.jail.mode == jail::IsolationMode::Strict {
                    return fail(
                        &mut control,
                        WireError {
                            kind: WireErrorKind::Jail,
                            chain: vec![format!("seccomp: {e}")],
                        },
                    );
                }
                None
            }
        }
    };
    if let Some(f) = &filters {
        // The SIGSYS handler reports a violation on the control socket.
        if let Err(e) = seccomp::install_sigsys_reporter(fds::CONTROL) {
            report.missing.push(format!("seccomp reporter: {e}"));
        }
        report.seccomp = true;
        let _ = f;
    }
    report.timed("seccomp filters", t);

    let mut snapshot_out = None;
    let forbidden = test_hook(&start);
    let config = machine_config(&start);
    let thread_filters = filters.clone();
    let thread_start: crate::kvm::ThreadStart = Arc::new(move |kind| {
        if let Some(f) = &thread_filters {
            f.apply(match kind {
                ThreadKind::Vcpu => seccomp::Kind::Vcpu,
                ThreadKind::EventLoop => seccomp::Kind::EventLoop,
            })
            .map_err(|e| format!("could not install the seccomp filter: {e}"))?;
        }
        let hook = |prefix: &str| {
            forbidden
                .as_deref()
                .and_then(|h| h.strip_prefix(prefix))
                .is_some_and(|k| k == kind_name(kind))
        };
        if hook("panic:") {
            wait_until_started();
            panic!("test hook: the {} thread panics", kind_name(kind));
        }
        if hook("open:") {
            wait_until_started();
            if let Err(e) = seccomp::make_refused_open() {
                eprintln!("kiln-vmm: test hook: open refused: {e}");
            }
        }
        if hook("") {
            wait_until_started();
            seccomp::make_forbidden_syscall();
        }
        Ok(())
    });
    let t = Instant::now();
    let built = match (&start.restore, snapshot_file) {
        (Some(profile_hash), Some(file)) => Snapshot::open(file, profile_hash)
            .map_err(MachineError::from)
            .and_then(|snap| {
                report.timed("open the snapshot", t);
                let t = Instant::now();
                let m = KvmMachine::restore(&config, sources, snap, thread_start);
                report.timed("restore the VM", t);
                m
            }),
        (_, file) => {
            snapshot_out = file;
            let m = KvmMachine::start(&config, sources, thread_start);
            report.timed("build the VM", t);
            m
        }
    };
    let machine = match built {
        Ok(m) => m,
        Err(e) => return fail(&mut control, wire_error(&e)),
    };
    if let Err(e) = proto::write_blocking(
        &mut control,
        &FromVmm::Started {
            version: proto::VERSION,
            jail: report,
        },
    ) {
        eprintln!("kiln-vmm: cannot report to kiln: {e}");
        return ExitCode::from(1);
    }
    STARTED.store(true, Ordering::Release);

    // The runtime is built before the main thread's filter: it needs
    // syscalls (epoll_create, eventfd) the running VMM never makes again.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln-vmm: no runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // Also before the filter: FIONBIO and the epoll registration.
    let control = {
        let _guard = rt.enter();
        match control
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(control))
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("kiln-vmm: control socket: {e}");
                machine.request_stop();
                return ExitCode::from(1);
            }
        }
    };
    if let Some(f) = &filters {
        if let Err(e) = f.apply(seccomp::Kind::Main) {
            eprintln!("kiln-vmm: could not install the main thread's seccomp filter: {e}");
            machine.request_stop();
            return ExitCode::from(1);
        }
    }
    if test_hook(&start).as_deref() == Some("main") {
        seccomp::make_forbidden_syscall();
    }
    rt.block_on(serve(machine, control, snapshot_out))
}

/// Test hooks wait until kiln has heard the VM started, so that they end a
/// running VM (the case they are for).
fn wait_until_started() {
    for _ in 0..5000 {
        if STARTED.load(Ordering::Acquire) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn kind_name(kind: ThreadKind) -> &'static str {
    match kind {
        ThreadKind::Vcpu => "vcpu",
        ThreadKind::EventLoop => "event-loop",
    }
}

/// The test hook: which thread must make a forbidden syscall (only in
/// builds that allow test hooks).
fn test_hook(start: &StartVm) -> Option<String> {
    if cfg!(any(debug_assertions, feature = "test-hooks")) {
        start.test_forbidden_syscall.clone()
    } else {
        None
    }
}

/// The [`MachineConfig`] the builder wants; paths are unused (descriptors
/// come in [`Sources`]).
fn machine_config(start: &StartVm) -> MachineConfig {
    MachineConfig {
        kernel: PathBuf::new(),
        initramfs: PathBuf::new(),
        cmdline: start.cmdline.clone(),
        vcpus: start.vcpus,
        memory_mib: start.memory_mib,
        disks: start
            .disks
            .iter()
            .map(|d| Disk {
                path: PathBuf::new(),
                read_only: d.read_only,
                serial: d.serial.clone(),
                ephemeral: d.ephemeral,
            })
            .collect(),
        console_port: start.console_port.clone(),
        run_dir: PathBuf::new(),
        serial_log_limit: start.serial_log_limit,
        start_timeout: Duration::from_secs(0),
        qemu: Default::default(),
        isolation: Default::default(),
        test_forbidden_syscall: None,
        // The network comes as a descriptor (`Sources::network`).
        network: Default::default(),
    }
}

/// Forward serial output until the VM ends, then report how.
async fn serve(
    machine: KvmMachine,
    control: tokio::net::UnixStream,
    snapshot_out: Option<File>,
) -> ExitCode {
    let (mut rd, mut wr) = control.into_split();
    let mut serial = machine.serial_updates();
    let mut exited = machine.exit_updates();
    let mut sent = 0u64;
    let mut first_exit_sent = false;
    let status = loop {
        tokio::select! {
            r = serial.changed() => {
                if r.is_err() {
                    continue;
                }
                if forward(&machine, &mut sent, &mut first_exit_sent, &mut wr).await.is_err() {
                    break None;
                }
            }
            s = exited.wait_for(|s| s.is_some()) => {
                break Some(s.map(|s| s.clone().unwrap_or(ExitStatus::Killed))
                    .unwrap_or(ExitStatus::Killed));
            }
            m = proto::read_async::<ToVmm>(&mut rd) => match m {
                Ok(ToVmm::Stop) => machine.request_stop(),
                Ok(ToVmm::Snapshot(profile)) => {
                    let r = match &snapshot_out {
                        Some(f) => machine.snapshot(f, &profile).map(Box::new).map_err(|e| {
                            wire_error(&MachineError::from(e))
                        }),
                        None => Err(WireError {
                            kind: WireErrorKind::Config,
                            chain: vec!["the VM was not started for a snapshot".into()],
                        }),
                    };
                    if proto::write_async(&mut wr, &FromVmm::Snapshotted(r)).await.is_err() {
                        break None;
                    }
                }
                // kiln is gone or talks nonsense: stop without a report.
                _ => break None,
            },
        }
    };
    let Some(status) = status else {
        machine.destroy();
        return ExitCode::SUCCESS;
    };
    let _ = forward(&machine, &mut sent, &mut first_exit_sent, &mut wr).await;
    let stats = machine.exit_stats();
    let (_, guest_resident) = machine.guest_memory_resident();
    let _ = proto::write_async(
        &mut wr,
        &FromVmm::Exit {
            status: WireStatus::from(&status),
            stats,
            guest_resident,
        },
    )
    .await;
    machine.destroy();
    ExitCode::SUCCESS
}

/// Send what the guest wrote to its serial console since the last call (and
/// the first exit's time, once known).
async fn forward(
    machine: &KvmMachine,
    sent: &mut u64,
    first_exit_sent: &mut bool,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
) -> Result<(), proto::ProtoError> {
    if !*first_exit_sent {
        if let Some(t) = machine.first_exit() {
            *first_exit_sent = true;
            proto::write_async(wr, &FromVmm::FirstExit(t.as_micros() as u64)).await?;
        }
    }
    let (bytes, total) = machine.serial_since(*sent);
    *sent = total;
    for chunk in bytes.chunks(proto::SERIAL_CHUNK) {
        proto::write_async(wr, &FromVmm::Serial(chunk.to_vec())).await?;
    }
    Ok(())
}
