//! Boots the bare-metal conformance guest (`vmm/testguest`) and checks every
//! `CHECK` line it reports over the agent's console port.
//!
//! The guest is built with `vmm/testguest/build.sh` (or taken from
//! `KILN_TESTGUEST`). Tests that the host cannot run are reported as
//! ignored, with the reason (`kiln_testkit`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_vmm::{
    probe_kvm, BackendKind, ConsoleStream, Disk, ExitStatus, IsolationMode, KvmSupport, Machine,
    MachineConfig, MachineError, QemuOptions,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const INITRD_LEN: usize = 5000;
const INITRD_SEED: usize = 7;
/// The console port the test guest looks for (`testguest/src/checks.rs`).
const PORT_NAME: &str = "org.kiln.agent.0";

/// The test's edge: `KILN_QEMU` names the QEMU to run, as for kiln itself.
fn qemu_options() -> QemuOptions {
    QemuOptions::new(std::env::var_os("KILN_QEMU"))
}

fn testguest() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KILN_TESTGUEST") {
        return Ok(PathBuf::from(p));
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testguest");
    let out = Command::new("sh")
        .arg(dir.join("build.sh"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| format!("cannot run build.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "build.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

struct Fixture {
    dir: tempfile::TempDir,
    config: MachineConfig,
}

fn fixture(kernel: PathBuf, extra: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let initrd: Vec<u8> = (0..INITRD_LEN)
        .map(|i| (i * 7 + INITRD_SEED) as u8)
        .collect();
    std::fs::write(dir.path().join("initrd"), initrd).unwrap();
    let ro: Vec<u8> = (0..4096usize).map(|i| ((i % 512) * 13 + 5) as u8).collect();
    std::fs::write(dir.path().join("ro.img"), ro).unwrap();
    std::fs::write(dir.path().join("rw.img"), vec![0u8; 4096]).unwrap();
    let config = MachineConfig {
        kernel,
        initramfs: dir.path().join("initrd"),
        cmdline: format!(
            "kiln.testguest mem_mib=64 vcpus=2 initrd_len={INITRD_LEN} initrd_seed={INITRD_SEED} \
             disk_ro=kiln-test-ro disk_rw=kiln-test-rw disk_ro_sectors=8 virtio=4{extra}"
        ),
        vcpus: 2,
        memory_mib: 64,
        disks: vec![
            Disk {
                path: dir.path().join("ro.img"),
                read_only: true,
                serial: "kiln-test-ro".into(),
                ephemeral: false,
            },
            Disk {
                path: dir.path().join("rw.img"),
                read_only: false,
                serial: "kiln-test-rw".into(),
                ephemeral: false,
            },
        ],
        console_port: PORT_NAME.into(),
        run_dir: dir.path().join("run"),
        serial_log_limit: 64 * 1024,
        start_timeout: Duration::from_secs(10),
        qemu: qemu_options(),
        isolation: Default::default(),
        test_forbidden_syscall: None,
        network: kiln_vmm::Network::None,
    };
    Fixture { dir, config }
}

/// Boot the guest, answer its ping, and return (console lines, exit status).
async fn boot(
    fx: &Fixture,
    backend: BackendKind,
    kvm: &KvmSupport,
) -> (
    Vec<String>,
    ExitStatus,
    Vec<u8>,
    Option<kiln_vmm::kvm::stats::ExitStats>,
    Vec<String>,
) {
    let (mut machine, console) = Machine::start(fx.config.clone(), backend, kvm)
        .await
        .expect("start");
    let (rd, mut wr) = console.into_split();
    let mut lines = BufReader::new(rd).lines();
    let mut got = Vec::new();
    let read_all = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line == "WAIT ping" {
                wr.write_all(b"ping\n").await.unwrap();
            }
            let done = line.starts_with("DONE");
            got.push(line);
            if done {
                break;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(120), read_all)
        .await
        .is_err()
    {
        eprintln!("console lines so far: {got:#?}");
        eprintln!("serial: {}", String::from_utf8_lossy(&machine.serial_log()));
        panic!(
            "the guest did not finish within 120 s on {}",
            machine.describe()
        );
    }
    let status = tokio::time::timeout(Duration::from_secs(30), machine.wait())
        .await
        .unwrap_or(ExitStatus::Failed("did not end within 30 s".into()));
    if status == ExitStatus::Shutdown {
        // Whoever reads the console sees its end once the VM is over (the
        // executor notices a guest that reset or crashed that way).
        let eof = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(_)) = lines.next_line().await {}
        })
        .await;
        assert!(
            eof.is_ok(),
            "the console stream did not end with the VM on {}",
            machine.describe()
        );
    }
    let serial = machine.serial_log();
    let exits = machine.exit_stats();
    let refused = machine.refused_opens();
    if !got.last().is_some_and(|l| l.starts_with("DONE")) {
        eprintln!(
            "{}: exit {status:?}; serial log:\n{}",
            machine.describe(),
            String::from_utf8_lossy(&serial)
        );
    }
    let run_dir = fx.config.run_dir.clone();
    machine.destroy().await.unwrap();
    assert!(
        !run_dir.exists(),
        "destroy must remove the per-VM directory"
    );
    (got, status, serial, exits, refused)
}

fn assert_all_ok(lines: &[String], expected: &[&str]) {
    for l in lines {
        eprintln!("  {l}");
    }
    let checks: Vec<&String> = lines.iter().filter(|l| l.starts_with("CHECK ")).collect();
    let failed: Vec<&&String> = checks
        .iter()
        .filter(|l| l.split(' ').nth(2) != Some("ok"))
        .collect();
    assert!(failed.is_empty(), "failed checks: {failed:#?}");
    for name in expected {
        assert!(
            checks.iter().any(|l| l.split(' ').nth(1) == Some(name)),
            "check {name} missing from {lines:#?}"
        );
    }
    let done = lines.last().expect("no output");
    assert_eq!(done, &format!("DONE {} 0", checks.len()));
}

const ALL_CHECKS: &[&str] = &[
    "pvh-start-info",
    "cmdline",
    "memmap",
    "initrd",
    "acpi-rsdp",
    "acpi-xsdt",
    "acpi-fadt",
    "acpi-dsdt",
    "acpi-madt",
    "virtio-mmio-scan",
    "virtio-console-init",
    "console-port-name",
    "virtio-blk-get-id",
    "virtio-blk-read",
    "virtio-blk-ro",
    "virtio-blk-bad-chain",
    "virtio-blk-write",
    "virtio-rng",
    "console-rx",
];

async fn testguest_passes_every_check_on_the_kvm_backend() {
    let kvm = probe_kvm();
    let guest = match testguest() {
        Ok(g) => g,
        Err(why) => panic!("cannot build the test guest: {why}"),
    };
    let fx = fixture(guest, "");
    let (lines, status, serial, exits, refused) = boot(&fx, BackendKind::Kvm, &kvm).await;
    assert_all_ok(&lines, ALL_CHECKS);
    assert!(refused.is_empty(), "the VMM opened nothing: {refused:?}");
    assert_eq!(
        status,
        ExitStatus::Shutdown,
        "the VM must end by the guest's i8042 reset"
    );
    let serial = String::from_utf8_lossy(&serial);
    assert!(
        serial.contains("CHECK pvh-start-info ok"),
        "serial log: {serial}"
    );
    assert!(serial.contains("DONE"), "serial log: {serial}");
    // Every serial byte was a port write; the POST code to port 0x80 (no
    // device there) is counted by port; the virtio devices were driven by
    // MMIO.
    use kiln_vmm::kvm::stats::ExitReason;
    let exits = exits.expect("the kvm backend counts exits");
    let n = |r| exits.by_reason.get(&r).copied().unwrap_or(0);
    assert!(
        n(ExitReason::IoOut) >= serial.len() as u64,
        "{}",
        exits.summary(8)
    );
    assert!(n(ExitReason::MmioRead) > 0 && n(ExitReason::MmioWrite) > 0);
    assert!(
        exits
            .unhandled_ports
            .get(&0x80)
            .is_some_and(|p| p.writes >= 1),
        "{}",
        exits.summary(8)
    );
    // The guest's write reached the read-write disk.
    let rw = std::fs::read(fx.dir.path().join("rw.img")).unwrap();
    assert!(rw[512..1024]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (0x5a ^ i) as u8));
}

/// The same guest on the qemu backend (microvm, PVH `-kernel`, TCG here):
/// the checks describe what any kiln backend must provide, so both must pass
/// them. QEMU marks a device broken on a bad descriptor instead of failing
/// the request, so that one check is skipped there.
async fn testguest_passes_every_check_on_the_qemu_backend() {
    let guest = testguest().unwrap_or_else(|why| panic!("cannot build the test guest: {why}"));
    let kvm = probe_kvm();
    let fx = fixture(guest, " no_bad_chain");
    let (lines, status, _, exits, _) = boot(&fx, BackendKind::Qemu, &kvm).await;
    assert!(exits.is_none(), "exit counts are the kvm backend's");
    let expected: Vec<&str> = ALL_CHECKS
        .iter()
        .copied()
        .filter(|c| *c != "virtio-blk-bad-chain")
        .collect();
    assert_all_ok(&lines, &expected);
    assert_eq!(status, ExitStatus::Shutdown);
    let rw = std::fs::read(fx.dir.path().join("rw.img")).unwrap();
    assert!(rw[512..1024]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (0x5a ^ i) as u8));
}

// Linux on the kvm backend (Debian's kernel, our initramfs and agent, a
// whole job) is `linux_job_runs_on_the_kvm_backend_with_hardware_kvm` in
// tests/tests/vm.rs: it needs hardware KVM and says why it skips elsewhere.

/// `destroy` stops a guest that is still running (vCPU 0 polling, vCPU 1
/// waiting for SIPI inside KVM_RUN) promptly, and dropping works the same.
async fn kvm_destroy_and_drop_stop_a_running_guest() {
    let kvm = probe_kvm();
    let guest = testguest().unwrap_or_else(|why| panic!("cannot build the test guest: {why}"));
    for use_drop in [false, true] {
        let fx = fixture(guest.clone(), "");
        // The guest then polls for a ping that never comes.
        let (machine, console) = start_and_wait_for_ping(&fx, &kvm).await;
        let mut lines = BufReader::new(console).lines();
        // Not a speed target (that is the boot bench's job): a stop that
        // hangs on a guest spinning forever is the failure looked for, so
        // the limit is only there to turn a hang into a failure.
        let stop = async move {
            if use_drop {
                tokio::task::spawn_blocking(move || drop(machine))
                    .await
                    .unwrap();
            } else {
                machine.destroy().await.unwrap();
            }
        };
        let stopped = tokio::time::timeout(Duration::from_secs(300), stop).await;
        assert!(stopped.is_ok(), "stopping the VM hung");
        assert!(!fx.config.run_dir.exists());
        // The console sees EOF once the VM is gone.
        let eof = tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await;
        assert!(matches!(eof, Ok(Ok(None)) | Ok(Err(_))), "{eof:?}");
    }
}

/// Start-up failures are typed errors and leave no per-VM directory behind.
async fn kvm_start_failures_clean_up() {
    let kvm = probe_kvm();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk"), vec![0u8; 8192]).unwrap();
    let mut fx = fixture(dir.path().join("junk"), "");
    let err = match Machine::start(fx.config.clone(), BackendKind::Kvm, &kvm).await {
        Err(e) => e,
        Ok(_) => panic!("a zero-filled kernel must not boot"),
    };
    // The message says what failed; the cause is in the source chain.
    assert!(matches!(err, MachineError::Boot(_)), "{err:?}");
    let chain: Vec<String> =
        std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
            .map(|e| e.to_string())
            .collect();
    assert!(chain.join(": ").contains("neither an ELF"), "{chain:?}");
    assert!(!fx.config.run_dir.exists());
    fx.config.vcpus = 0;
    assert!(Machine::start(fx.config.clone(), BackendKind::Kvm, &kvm)
        .await
        .is_err());
    fx.config.vcpus = 1;
    fx.config.disks[0].serial = "x".repeat(21);
    assert!(Machine::start(fx.config.clone(), BackendKind::Kvm, &kvm)
        .await
        .is_err());
    assert!(!fx.config.run_dir.exists());
}

/// Start the guest and wait until it polls for a ping that never comes: the
/// VMM process is then running the guest, filters installed.
async fn start_and_wait_for_ping(fx: &Fixture, kvm: &KvmSupport) -> (Machine, ConsoleStream) {
    let (machine, console) = Machine::start(fx.config.clone(), BackendKind::Kvm, kvm)
        .await
        .expect("start");
    let (rd, wr) = console.into_split();
    let mut lines = BufReader::new(rd).lines();
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l == "WAIT ping" {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        waited,
        Ok(true),
        "serial: {}",
        String::from_utf8_lossy(&machine.serial_log())
    );
    let console = lines.into_inner().into_inner().reunite(wr).unwrap();
    (machine, console)
}

fn proc_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// While the guest runs, its VMM process is read from /proc: another uid,
/// no capabilities, no_new_privs, seccomp filter mode, its own namespaces
/// (PID 1 of its own PID namespace),
/// an empty root, an empty environment, only the descriptors it needs, and
/// a cgroup with the memory limit; the cgroup is gone after destroy.
async fn kvm_vmm_process_is_jailed() {
    let kvm = probe_kvm();
    let guest = testguest().unwrap_or_else(|why| panic!("cannot build the test guest: {why}"));
    let mut fx = fixture(guest.clone(), "");
    // Strict: everything the jail has must be applied here (root).
    fx.config.isolation.mode = kiln_vmm::IsolationMode::Strict;
    let (machine, _console) = start_and_wait_for_ping(&fx, &kvm).await;
    let pid = machine.pid().expect("a VMM process");
    assert_ne!(pid, std::process::id());
    let report = machine.jail().expect("kvm backend").clone();
    eprintln!("jail: {}", report.summary());

    let uids: Vec<u32> = proc_field(pid, "Uid:")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(uids.len(), 4);
    assert!(
        uids.iter()
            .all(|&u| u >= kiln_vmm::jail::UID_BASE && u == uids[0]),
        "{uids:?}"
    );
    let gids = proc_field(pid, "Gid:");
    assert!(!gids.split_whitespace().any(|g| g == "0"), "{gids}");
    assert_eq!(proc_field(pid, "Groups:"), "");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(proc_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(proc_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(proc_field(pid, "Seccomp:"), "2", "filter mode");
    // Every thread has its own filter (the vCPUs' and event loop's were
    // installed by themselves, the main thread's last).
    let threads: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(threads.len() >= 4, "main, event loop, 2 vCPUs: {threads:?}");
    for t in &threads {
        let st = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).unwrap();
        assert!(st.contains("\nSeccomp:\t2\n"), "thread {t}: {st}");
    }

    for ns in ["pid", "mnt", "net", "ipc", "uts"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(mine, its, "{ns} namespace");
    }
    // The VMM is PID 1 of its PID namespace (its vCPU kicks, tgkill, work
    // there), the child of a waiter that stayed in kiln's: that one holds
    // no descriptor, no capability, and runs as the VM's uid.
    let nspid = proc_field(pid, "NSpid:");
    assert_eq!(nspid, format!("{pid}\t1"), "NSpid");
    let waiter: u32 = proc_field(pid, "PPid:").parse().unwrap();
    assert_ne!(waiter, std::process::id());
    assert_eq!(proc_field(waiter, "PPid:"), std::process::id().to_string());
    assert_eq!(proc_field(waiter, "Uid:"), proc_field(pid, "Uid:"));
    assert_eq!(proc_field(waiter, "CapEff:"), "0000000000000000");
    assert_eq!(proc_field(waiter, "CapBnd:"), "0000000000000000");
    let waiter_fds: Vec<_> = std::fs::read_dir(format!("/proc/{waiter}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        waiter_fds
            .iter()
            .all(|f| ["0", "1", "2"].contains(&f.as_str())),
        "the waiter holds {waiter_fds:?}"
    );
    assert!(report.namespaces.iter().any(|n| n == "pid"), "{report:?}");
    // Its root is the empty per-VM jail directory.
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .collect();
    assert!(root.is_empty(), "{root:?}");
    assert!(std::fs::read_dir("/").unwrap().count() > 0);
    // No environment (kiln's tokens live there).
    assert!(std::env::var_os("PATH").is_some());
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.is_empty(), "{}", String::from_utf8_lossy(&environ));
    // Descriptors: what was handed over, and what the VM made itself.
    let stderr = std::fs::read_link(format!("/proc/{pid}/fd/2")).unwrap();
    let mut files = vec![
        std::path::PathBuf::from("/dev/null"),
        "/dev/kvm".into(),
        stderr,
        fx.config.kernel.clone(),
        fx.config.initramfs.clone(),
    ];
    files.extend(fx.config.disks.iter().map(|d| d.path.clone()));
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(e.unwrap().path()).unwrap();
        let t = target.to_string_lossy();
        assert!(
            files.contains(&target) || t.starts_with("anon_inode:") || t.starts_with("socket:"),
            "unexpected descriptor to {t}"
        );
    }
    // The cgroup and its memory limit (guest memory plus overhead).
    let (cg_dir, limit_file) = machine.cgroup().expect("a cgroup");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let leaf = cg_dir.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        cgroups
            .lines()
            .any(|l| l.ends_with(&format!("kiln-vmm/{leaf}"))),
        "{cgroups}"
    );
    let limit: u64 = std::fs::read_to_string(&limit_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        limit,
        kiln_vmm::jail::cgroup::Limits::default().memory_bytes(fx.config.memory_mib)
    );
    assert!(report.pivot_root && report.capabilities_dropped && report.no_new_privs);
    assert!(report.seccomp && report.missing.is_empty(), "{report:?}");

    machine.destroy().await.unwrap();
    assert!(!cg_dir.exists(), "destroy removes the cgroup");
    assert!(!fx.config.run_dir.exists());

    // A part that cannot be applied (a CPU limit the kernel refuses):
    // strict refuses to start the VM, best-effort runs it and says what is
    // missing.
    let mut fx = fixture(guest, "");
    fx.config.isolation.limits.cpu_percent = Some(0);
    fx.config.isolation.mode = kiln_vmm::IsolationMode::Strict;
    match Machine::start(fx.config.clone(), BackendKind::Kvm, &kvm).await {
        Err(MachineError::Jail(why)) => assert!(why.contains("cgroup"), "{why}"),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("strict isolation started a VM without its cgroup"),
    }
    assert!(!fx.config.run_dir.exists());
    fx.config.isolation.mode = kiln_vmm::IsolationMode::BestEffort;
    let (machine, _console) = start_and_wait_for_ping(&fx, &kvm).await;
    let report = machine.jail().unwrap();
    assert!(
        report.missing.iter().any(|m| m.contains("cgroup")) && report.seccomp,
        "{report:?}"
    );
    machine.destroy().await.unwrap();
}

/// A forbidden syscall made by any thread of the VMM process (a test hook)
/// kills that VM only: the job's status names the syscall, and another VM
/// started alongside passes every check.
async fn kvm_forbidden_syscall_kills_only_that_vm() {
    let kvm = probe_kvm();
    let guest = testguest().unwrap_or_else(|why| panic!("cannot build the test guest: {why}"));
    for kind in ["vcpu", "event-loop", "main"] {
        let good = fixture(guest.clone(), "");
        let mut bad = fixture(guest.clone(), "");
        bad.config.test_forbidden_syscall = Some(kind.into());
        let (mut doomed, _console) = Machine::start(bad.config.clone(), BackendKind::Kvm, &kvm)
            .await
            .expect("start");
        let (lines, status, _, _, _) = boot(&good, BackendKind::Kvm, &kvm).await;
        assert_all_ok(&lines, ALL_CHECKS);
        assert_eq!(status, ExitStatus::Shutdown);
        let status = tokio::time::timeout(Duration::from_secs(30), doomed.wait())
            .await
            .expect("the VMM process ends");
        match &status {
            ExitStatus::Failed(why) => assert!(
                why.contains("seccomp") && why.contains("ptrace (101)"),
                "{kind}: {why}"
            ),
            other => panic!("{kind}: {other:?}"),
        }
        doomed.destroy().await.unwrap();
        assert!(!bad.config.run_dir.exists());
    }
    // An open(2) in a VMM thread (a test hook, as the C library may do on
    // its own) fails with EACCES and is reported; the VM goes on.
    for kind in ["vcpu", "event-loop"] {
        let mut fx = fixture(guest.clone(), "");
        fx.config.test_forbidden_syscall = Some(format!("open:{kind}"));
        let (lines, status, _, _, refused) = boot(&fx, BackendKind::Kvm, &kvm).await;
        assert_all_ok(&lines, ALL_CHECKS);
        assert_eq!(status, ExitStatus::Shutdown, "{kind}");
        // Once per thread of that kind.
        let expected = format!("{kind}: /etc/kiln-test-hook");
        assert!(
            !refused.is_empty() && refused.iter().all(|r| *r == expected),
            "{kind}: {refused:?}"
        );
    }
    // A panic in a VMM thread (a test hook) is reported with its message,
    // not hidden behind the seccomp violation a default backtrace makes.
    for kind in ["vcpu", "event-loop"] {
        let mut bad = fixture(guest.clone(), "");
        bad.config.test_forbidden_syscall = Some(format!("panic:{kind}"));
        let (mut doomed, _console) = Machine::start(bad.config.clone(), BackendKind::Kvm, &kvm)
            .await
            .expect("start");
        let status = tokio::time::timeout(Duration::from_secs(30), doomed.wait())
            .await
            .expect("the VMM process ends");
        match &status {
            ExitStatus::Failed(why) => assert!(
                why.contains("panicked") && why.contains(&format!("the {kind} thread panics")),
                "{kind}: {why}"
            ),
            other => panic!("{kind}: {other:?}"),
        }
        doomed.destroy().await.unwrap();
        assert!(!bad.config.run_dir.exists());
    }
}

/// QEMU gets none of kiln's environment and runs in a cgroup of its own,
/// under its seccomp sandbox, with no capabilities, no_new_privs, its own
/// PID, mount, network, IPC and UTS namespaces, a per-VM uid, and a root
/// (`pivot_root`) holding only what it needs (read from /proc while the
/// guest runs): strict isolation accepts the qemu backend. One VM for all.
async fn qemu_process_has_a_cgroup_and_no_environment() {
    let kvm = probe_kvm();
    let guest = testguest().unwrap_or_else(|why| panic!("cannot build the test guest: {why}"));
    let mut fx = fixture(guest, " no_bad_chain");
    // A stand-in for the daemon's token file, next to the VM's inputs.
    let token = fx.dir.path().join("kiln-token");
    std::fs::write(&token, b"glrt-secret").unwrap();
    fx.config.isolation.mode = kiln_vmm::IsolationMode::Strict;
    let (machine, console) = Machine::start(fx.config.clone(), BackendKind::Qemu, &kvm)
        .await
        .expect("strict isolation starts QEMU in its jail");
    let pid = machine.pid().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<_> = environ
        .split(|&b| b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).to_string())
        .collect();
    assert!(vars.iter().all(|v| v.starts_with("PATH=")), "{vars:?}");
    let (cg_dir, limit_file) = machine.cgroup().expect("a cgroup");
    let leaf = cg_dir.file_name().unwrap().to_string_lossy().to_string();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroups
            .lines()
            .any(|l| l.ends_with(&format!("kiln-vmm/{leaf}"))),
        "{cgroups}"
    );
    assert!(limit_file.is_file());
    assert!(
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .unwrap()
            .to_string_lossy()
            .contains("qemu"),
        "the pid is QEMU's, not its waiter's"
    );
    assert_eq!(proc_field(pid, "Seccomp:"), "2", "QEMU's -sandbox filter");
    assert_eq!(proc_field(pid, "NoNewPrivs:"), "1");
    for caps in ["CapPrm:", "CapEff:", "CapBnd:"] {
        assert_eq!(proc_field(pid, caps), "0000000000000000", "{caps}");
    }
    for ns in ["net", "ipc", "uts", "pid", "mnt"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(mine, its, "{ns} namespace");
    }
    // QEMU is PID 1 of its PID namespace.
    let nspid = proc_field(pid, "NSpid:");
    assert!(
        nspid.ends_with("\t1") || nspid.ends_with(" 1"),
        "NSpid: {nspid}"
    );
    // A per-VM unprivileged uid and gid, no supplementary group (tcg).
    let report = machine.jail().expect("a jail report");
    let uid = report.uid.expect("a per-VM uid");
    assert!(uid >= kiln_vmm::jail::UID_BASE, "{uid}");
    for ids in ["Uid:", "Gid:"] {
        let all: Vec<u32> = proc_field(pid, ids)
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(all, vec![uid; 4], "{ids}");
    }
    let tcg = machine.describe() == "qemu/tcg";
    if tcg {
        assert_eq!(proc_field(pid, "Groups:"), "");
    }
    // Its root is the jail: what QEMU needs, nothing else of the host's.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    top.sort();
    let allowed = [
        "bin", "dev", "etc", "initrd", "kernel", "lib", "lib32", "lib64", "libx32", "sbin", "usr",
    ];
    assert!(
        top.iter().all(|t| allowed.contains(&t.as_str())),
        "QEMU's root holds {top:?}"
    );
    assert!(top.contains(&"kernel".to_string()) && top.contains(&"usr".to_string()));
    let token_inside = root.join(token.strip_prefix("/").unwrap());
    assert!(!token_inside.exists(), "the token file is reachable");
    for host_file in ["etc/passwd", "etc/shadow", "root", "proc/1", "tmp", "var"] {
        assert!(
            !root.join(host_file).exists(),
            "{host_file} is in QEMU's root"
        );
    }
    let mut etc: Vec<_> = std::fs::read_dir(root.join("etc"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    etc.sort();
    assert!(etc.iter().all(|e| e == "ld.so.cache"), "{etc:?}");
    assert_eq!(
        root.join("dev/kvm").exists(),
        !tcg,
        "/dev/kvm only with -accel kvm"
    );
    // The inputs are read-only, the root too (written as root here, so
    // this is the mount's refusal, not a permission).
    assert_eq!(
        std::fs::write(root.join("kernel"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    assert_eq!(
        std::fs::write(root.join("new-file"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    assert!(report.pivot_root, "{}", report.summary());
    assert!(report.missing.is_empty(), "{}", report.summary());
    assert!(report.not_yet.is_empty(), "{:?}", report.not_yet);
    drop(console);
    machine.destroy().await.unwrap();
    assert!(!cg_dir.exists());
    assert!(!fx.config.run_dir.exists());
}

/// The guest's MAC in the virtio-net tests, and on its command line.
const NET_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x4b, 0x49, 0x4c];

/// Serve the guest's frames on a TAP-like descriptor (one frame per
/// datagram) or a passt-like stream (4-byte big-endian length, frame) until
/// the guest's own frame comes, answer it, and return every frame seen.
fn serve_frames(
    mut next: impl FnMut() -> std::io::Result<Vec<u8>>,
    mut send: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    while let Ok(f) = next() {
        let good = f.windows(20).any(|w| w == b"kiln-testguest frame");
        frames.push(f);
        if good {
            let mut reply = vec![0u8; 60];
            reply[..6].copy_from_slice(&NET_MAC);
            reply[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
            reply[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
            reply[14..29].copy_from_slice(b"kiln-host frame");
            send(&reply).unwrap();
            break;
        }
    }
    frames
}

/// The kvm backend's virtio-net device end to end, through the jailed VMM
/// process and its seccomp filters, for both kinds of descriptor kiln hands
/// over: a TAP (a datagram socketpair stands in: one frame per read and
/// write, as a TAP without a vnet header) and a connection to passt's
/// socket (a listener of the test's, speaking the same length-prefixed
/// protocol). The guest's frame reaches the host whole, the oversize and
/// short frames it sent first do not, and the host's answer reaches the
/// guest (`testguest/src/net.rs`).
async fn kvm_virtio_net_moves_frames_both_ways() {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixDatagram, UnixListener};
    let kvm = probe_kvm();
    let guest = testguest().unwrap_or_else(|why| panic!("cannot build the test guest: {why}"));
    let mac_arg: String = NET_MAC.iter().map(|b| format!("{b:02x}")).collect();
    for stream in [false, true] {
        let mut fx = fixture(guest.clone(), &format!(" net_mac={mac_arg}"));
        fx.config.cmdline = fx.config.cmdline.replace("virtio=4", "virtio=5");
        let timeout = Some(Duration::from_secs(120));
        let server = if stream {
            let path = fx.dir.path().join("passt.sock");
            let listener = UnixListener::bind(&path).unwrap();
            fx.config.network = kiln_vmm::Network::Passt {
                socket: path,
                mac: NET_MAC,
                mtu: 1500,
            };
            std::thread::spawn(move || {
                let (s, _) = listener.accept().unwrap();
                s.set_read_timeout(timeout).unwrap();
                let (mut rd, mut wr) = (s.try_clone().unwrap(), s);
                serve_frames(
                    || {
                        let mut len = [0u8; 4];
                        rd.read_exact(&mut len)?;
                        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
                        rd.read_exact(&mut f)?;
                        Ok(f)
                    },
                    |f| {
                        wr.write_all(&(f.len() as u32).to_be_bytes())?;
                        wr.write_all(f)
                    },
                )
            })
        } else {
            let (vmm_end, host) = UnixDatagram::pair().unwrap();
            fx.config.network = kiln_vmm::Network::Tap {
                fd: std::sync::Arc::new(vmm_end.into()),
                mac: NET_MAC,
                mtu: 1500,
            };
            host.set_read_timeout(timeout).unwrap();
            std::thread::spawn(move || {
                serve_frames(
                    // Every datagram is a virtio-net header and a frame,
                    // as on kiln's TAP devices (the test guest takes no
                    // offloads, so its headers are empty).
                    || {
                        let mut f = vec![0u8; 65536];
                        let n = host.recv(&mut f)?;
                        f.truncate(n);
                        assert!(n >= 12 && f[..12] == [0; 12], "an empty header: {f:02x?}");
                        Ok(f.split_off(12))
                    },
                    |f| host.send(&[&[0u8; 12][..], f].concat()).map(|_| ()),
                )
            })
        };
        let (lines, status, _, _, _) = boot(&fx, BackendKind::Kvm, &kvm).await;
        let mut expected = ALL_CHECKS.to_vec();
        expected.extend(["virtio-net-mac", "virtio-net-tx", "virtio-net-rx"]);
        assert_all_ok(&lines, &expected);
        assert_eq!(status, ExitStatus::Shutdown);
        let frames = server.join().unwrap();
        let kind = if stream { "stream" } else { "TAP" };
        assert_eq!(
            frames.len(),
            1,
            "{kind}: only the well-formed frame reaches the host: {frames:02x?}"
        );
        let f = &frames[0];
        assert_eq!(f.len(), 60, "{kind}: the frame without its virtio header");
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &NET_MAC);
        assert_eq!(&f[14..34], b"kiln-testguest frame");
    }
}

/// The runtime of a helper process (this binary started again by a test).
fn helper_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The first line a helper process prints (within `secs`).
async fn first_line(helper: &mut tokio::process::Child, secs: u64, what: &str) -> String {
    let mut out = BufReader::new(helper.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(secs), out.next_line())
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .unwrap()
        .expect("a line")
}

/// The helper for `kvm_vmm_processes_die_with_kiln`: start a VM, print its
/// VMM process and cgroup, and wait to be killed.
fn hold_vm(guest: PathBuf) -> std::process::ExitCode {
    let rt = helper_runtime();
    // kiln's secrets, as a daemon holds them: a token read from a file
    // (kept, with the file open) and one in the environment.
    let _held = std::env::var_os("KILN_TEST_TOKEN_FILE").map(|p| {
        let token = std::fs::read_to_string(&p).unwrap();
        (std::fs::File::open(&p).unwrap(), token)
    });
    rt.block_on(async {
        let fx = fixture(guest, "");
        let (machine, _console) = start_and_wait_for_ping(&fx, &probe_kvm()).await;
        let cgroup = machine.cgroup().map(|c| c.0).unwrap_or_default();
        println!(
            "VMM {} {} {}",
            machine.pid().unwrap(),
            fx.dir.path().display(),
            cgroup.display()
        );
        std::future::pending::<()>().await;
    });
    std::process::ExitCode::SUCCESS
}

/// `kill -9` of kiln kills its VMM processes (PR_SET_PDEATHSIG, set again
/// after the uid change), and the cgroup a dead kiln left is removed by the
/// next one's sweep.
async fn kvm_vmm_processes_die_with_kiln() {
    let guest = testguest().unwrap_or_else(|why| panic!("cannot build the test guest: {why}"));
    let mut helper = tokio::process::Command::new(std::env::current_exe().unwrap())
        .env("KILN_TEST_HOLD_VM", &guest)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let line = first_line(&mut helper, 60, "the helper started a VM").await;
    let parts: Vec<&str> = line.split(' ').collect();
    assert_eq!(parts[0], "VMM", "{line}");
    let (pid, dir, cgroup) = (parts[1], PathBuf::from(parts[2]), PathBuf::from(parts[3]));
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    helper.start_kill().unwrap();
    helper.wait().await.unwrap();
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        while Path::new(&format!("/proc/{pid}")).exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "VMM process {pid} outlived kiln");
    assert!(cgroup.exists(), "a killed kiln cannot remove its cgroup");
    let h = kiln_vmm::jail::cgroup::detect().unwrap();
    kiln_vmm::jail::cgroup::remove_stale(&h);
    assert!(!cgroup.exists(), "the next kiln removes it");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A guest that touches more memory than its VMM's cgroup allows (512 MiB
/// of RAM, a 160 MiB limit) gets its VMM process killed by the cgroup's OOM
/// killer, and the VM's status says so; the cgroup goes with the VM.
async fn kvm_guest_past_its_memory_limit_is_killed_by_the_cgroup() {
    let kvm = probe_kvm();
    let guest = testguest().unwrap_or_else(|why| panic!("cannot build the test guest: {why}"));
    let mut fx = fixture(guest, " touch_ram");
    fx.config.memory_mib = 512;
    fx.config.isolation.limits.memory_max_mib = Some(160);
    let (mut machine, console) = Machine::start(fx.config.clone(), BackendKind::Kvm, &kvm)
        .await
        .unwrap();
    let (cg_dir, _) = machine.cgroup().expect("a cgroup");
    let status = tokio::time::timeout(Duration::from_secs(120), machine.wait())
        .await
        .expect("the VM ends");
    match status {
        ExitStatus::Failed(why) => assert!(why.contains("OOM"), "{why}"),
        other => panic!("the guest outgrew its cgroup and the VM ended with {other:?}"),
    }
    drop(console);
    machine.destroy().await.unwrap();
    assert!(!cg_dir.exists());
}

/// Every readable mapping of process `pid`, through `/proc/PID/mem`,
/// searched for each of `needles`.
fn memory_holds(pid: u32, needles: &[&[u8]]) -> Vec<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut found = vec![false; needles.len()];
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        // std's (optimised) substring search: this test binary is a debug
        // build, and the guest's RAM alone is 64 MiB. The needles are ASCII,
        // which the lossy conversion keeps as they are.
        let text = String::from_utf8_lossy(&buf);
        for (n, needle) in needles.iter().enumerate() {
            found[n] |= text.contains(std::str::from_utf8(needle).unwrap());
        }
    }
    found
}

/// kiln's tokens (one in its environment, one read from a file it keeps
/// open) cannot be read from the VMM process while the VM runs: not in its
/// environment, not through its descriptors, mappings or file system view,
/// not anywhere in its memory, guest RAM included; the same search finds
/// both in kiln's own memory.
async fn kvm_vmm_process_holds_none_of_kilns_tokens() {
    let guest = testguest().unwrap_or_else(|why| panic!("cannot build the test guest: {why}"));
    let tmp = tempfile::tempdir().unwrap();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let env_token = format!("glrt-env-token-{stamp}");
    let file_token = format!("glrt-file-token-{stamp}");
    let token_file = tmp.path().join("runner-token");
    std::fs::write(&token_file, &file_token).unwrap();
    let mut helper = tokio::process::Command::new(std::env::current_exe().unwrap())
        .env("KILN_TEST_HOLD_VM", &guest)
        .env("KILN_TEST_TOKEN", &env_token)
        .env("KILN_TEST_TOKEN_FILE", &token_file)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let kiln = helper.id().unwrap();
    let line = first_line(&mut helper, 60, "the helper started a VM").await;
    let parts: Vec<&str> = line.split(' ').collect();
    assert_eq!(parts[0], "VMM", "{line}");
    let (vmm, dir, cgroup): (u32, PathBuf, PathBuf) =
        (parts[1].parse().unwrap(), parts[2].into(), parts[3].into());
    assert_ne!(vmm, kiln);

    let tokens = [env_token.as_bytes(), file_token.as_bytes()];
    let environ = std::fs::read(format!("/proc/{vmm}/environ")).unwrap();
    for t in tokens {
        assert!(
            !environ.windows(t.len()).any(|w| w == t),
            "token in the environment"
        );
    }
    let path = token_file.to_string_lossy().to_string();
    for e in std::fs::read_dir(format!("/proc/{vmm}/fd")).unwrap() {
        let target = std::fs::read_link(e.unwrap().path()).unwrap();
        assert_ne!(target, token_file, "the token file is open in the VMM");
    }
    let maps = std::fs::read_to_string(format!("/proc/{vmm}/maps")).unwrap();
    assert!(!maps.contains(&path), "the token file is mapped");
    // Its file system view is the empty jail: the token file is not in it.
    let mountinfo = std::fs::read_to_string(format!("/proc/{vmm}/mountinfo")).unwrap();
    assert!(
        !mountinfo.contains(&tmp.path().to_string_lossy().to_string()),
        "{mountinfo}"
    );
    assert!(std::fs::metadata(format!("/proc/{vmm}/root{path}")).is_err());
    assert_eq!(
        std::fs::read_dir(format!("/proc/{vmm}/root"))
            .unwrap()
            .count(),
        0
    );
    // Its memory holds neither; kiln's (the positive control) both.
    assert_eq!(memory_holds(vmm, &tokens), vec![false, false], "VMM memory");
    assert_eq!(
        memory_holds(kiln, &tokens),
        vec![true, true],
        "kiln's memory"
    );

    helper.start_kill().unwrap();
    helper.wait().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while Path::new(&format!("/proc/{vmm}")).exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Its own group only: `remove_stale` would also take the one
    // `kvm_vmm_processes_die_with_kiln` expects to find.
    if !cgroup.as_os_str().is_empty() {
        let _ = std::fs::remove_dir(&cgroup);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The uid the unprivileged tests run kiln's side as (`nobody`).
const NOBODY: &str = "65534";

/// `cmd` run as uid and gid [`NOBODY`] with no supplementary groups.
fn as_nobody(program: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
    ])
    .arg(program);
    cmd
}

/// The helper for `unprivileged_jail_uses_a_user_namespace` (started as
/// uid 65534): jail this process as a VMM process jails itself, with no
/// VM, into `root`; print what was applied and wait until stdin closes.
/// `KILN_TEST_JAIL_STRICT` set: strict isolation, print the refusal.
fn jail_only(root: PathBuf) -> std::process::ExitCode {
    use kiln_vmm::jail;
    use std::io::{Read, Write};
    let strict = std::env::var_os("KILN_TEST_JAIL_STRICT").is_some();
    let spec = jail::JailSpec {
        mode: if strict {
            IsolationMode::Strict
        } else {
            IsolationMode::BestEffort
        },
        uid: jail::UID_BASE,
        gid: jail::UID_BASE,
        root,
        keep_fds: Vec::new(),
    };
    let user = jail::enter_user_namespace(&spec);
    let pid = jail::enter_pid_namespace(&spec, &user).expect("pid namespace");
    let mut out = std::io::stdout();
    match jail::apply(&spec, &user, &pid) {
        Ok(r) => {
            let _ = writeln!(
                out,
                "JAIL ns={} pivot_root={} caps_dropped={} no_new_privs={} missing={}",
                r.namespaces.join(","),
                r.pivot_root,
                r.capabilities_dropped,
                r.no_new_privs,
                r.missing.join("|")
            );
        }
        Err(e) => {
            let _ = writeln!(out, "REFUSED {e}");
        }
    }
    let _ = out.flush();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    std::process::ExitCode::SUCCESS
}

/// kiln without root: the VMM process's jail is made in a user namespace
/// (kiln's uid is root there): PID 1 of its own PID namespace, its own
/// mount, IPC, UTS and network namespaces, an empty root, no capabilities,
/// no_new_privs; it runs as kiln's uid, which the report names as missing
/// (no per-VM uid without root), so strict isolation refuses. Read from
/// /proc while it runs. No VM: the jail alone, as uid 65534.
async fn unprivileged_jail_uses_a_user_namespace() {
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut helper = as_nobody(&exe)
        .env("KILN_TEST_JAIL_ONLY", root.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let waiter = helper.id().unwrap();
    let line = first_line(&mut helper, 30, "the helper jailed itself").await;
    eprintln!("{line}");
    assert!(
        line.starts_with(
            "JAIL ns=user,pid,mnt,ipc,uts,net pivot_root=true caps_dropped=true \
             no_new_privs=true missing=per-VM uid: kiln runs without root"
        ),
        "{line}"
    );
    assert!(!line.contains('|'), "only the uid is missing: {line}");
    // The jailed process: the waiter's only child, PID 1 of its namespace.
    let children =
        std::fs::read_to_string(format!("/proc/{waiter}/task/{waiter}/children")).unwrap();
    let pid: u32 = children.trim().parse().expect("one child");
    assert_eq!(proc_field(pid, "NSpid:"), format!("{pid}\t1"));
    assert_eq!(
        proc_field(pid, "Uid:"),
        [NOBODY; 4].join("\t"),
        "kiln's uid"
    );
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(proc_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(proc_field(pid, "NoNewPrivs:"), "1");
    let uid_map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
    assert_eq!(
        uid_map.split_whitespace().collect::<Vec<_>>(),
        ["0", NOBODY, "1"],
        "kiln's uid is root of the user namespace, nothing else is mapped"
    );
    for ns in ["user", "pid", "mnt", "net", "ipc", "uts"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(mine, its, "{ns} namespace");
    }
    let its_root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .collect();
    assert!(its_root.is_empty(), "{its_root:?}");
    drop(helper.stdin.take());
    assert!(helper.wait().await.unwrap().success());

    // Strict isolation refuses what best-effort accepted.
    let out = as_nobody(&exe)
        .env("KILN_TEST_JAIL_ONLY", root.path())
        .env("KILN_TEST_JAIL_STRICT", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("REFUSED isolation is strict") && text.contains("per-VM uid"),
        "{text}"
    );
}

/// The test guest on the kvm backend with kiln as uid 65534 (the helper):
/// the VM runs, in a user namespace, with seccomp; strict isolation
/// refuses to start it.
async fn unprivileged_kvm_vm_runs_in_a_user_namespace() {
    let guest = testguest().unwrap_or_else(|why| panic!("cannot build the test guest: {why}"));
    let out = as_nobody(&std::env::current_exe().unwrap())
        .env("KILN_TEST_UNPRIVILEGED_VM", &guest)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("STRICT refused"), "{text}");
    assert!(text.contains("RAN"), "{text}");
}

/// The helper for `unprivileged_kvm_vm_runs_in_a_user_namespace`.
fn unprivileged_vm(guest: PathBuf) -> std::process::ExitCode {
    let rt = helper_runtime();
    rt.block_on(async {
        let kvm = probe_kvm();
        let mut fx = fixture(guest.clone(), "");
        fx.config.isolation.mode = IsolationMode::Strict;
        match Machine::start(fx.config.clone(), BackendKind::Kvm, &kvm).await {
            Err(MachineError::Jail(why)) => println!("STRICT refused: {why}"),
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("strict isolation started a VM without root"),
        }
        let fx = fixture(guest, "");
        let (lines, status, _, _, _) = boot(&fx, BackendKind::Kvm, &kvm).await;
        assert_all_ok(&lines, ALL_CHECKS);
        assert_eq!(status, ExitStatus::Shutdown);
        let (machine, _console) = start_and_wait_for_ping(&fx, &kvm).await;
        let report = machine.jail().expect("kvm backend").clone();
        let pid = machine.pid().expect("a VMM process");
        assert!(
            report.namespaces.iter().any(|n| n == "user")
                && report.pivot_root
                && report.seccomp
                && report.capabilities_dropped,
            "{report:?}"
        );
        assert_eq!(proc_field(pid, "Seccomp:"), "2");
        assert_eq!(proc_field(pid, "CapEff:"), "0000000000000000");
        println!("RAN {}", report.summary());
        machine.destroy().await.unwrap();
    });
    std::process::ExitCode::SUCCESS
}

fn main() -> std::process::ExitCode {
    if let Some(guest) = std::env::var_os("KILN_TEST_HOLD_VM") {
        return hold_vm(guest.into());
    }
    if let Some(root) = std::env::var_os("KILN_TEST_JAIL_ONLY") {
        return jail_only(root.into());
    }
    if let Some(guest) = std::env::var_os("KILN_TEST_UNPRIVILEGED_VM") {
        return unprivileged_vm(guest.into());
    }
    // Runs a command as uid 65534 (setpriv needs root); Ok when it succeeds.
    let nobody_can = |what: &'static str, args: &'static [&'static str]| {
        kiln_testkit::Need::custom(what, move || {
            // SAFETY: geteuid has no arguments.
            if unsafe { libc::geteuid() } != 0 {
                return Err("needs root to switch to uid 65534 (setpriv)".into());
            }
            match Command::new("setpriv")
                .args([
                    &format!("--reuid={NOBODY}"),
                    &format!("--regid={NOBODY}"),
                    "--clear-groups",
                ])
                .args(args)
                .output()
            {
                Ok(o) if o.status.success() => Ok(()),
                Ok(o) => Err(format!(
                    "as uid {NOBODY}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => Err(format!(
                    "setpriv does not run ({e}; apt-get install util-linux)"
                )),
            }
        })
    };
    let userns = nobody_can(
        "unprivileged user namespaces",
        &["unshare", "--user", "true"],
    );
    // Never changed by a test: the device's own permissions decide.
    // Named `unprivileged-kvm` so that CI can declare it absent, as it does
    // `hardware-kvm`: whether uid 65534 may open /dev/kvm is the host's
    // choice (0600 root here, 0660 root:kvm on a stock Debian).
    let kvm_for_nobody = nobody_can(
        "unprivileged-kvm",
        &[
            "sh",
            "-c",
            "test -r /dev/kvm -a -w /dev/kvm || { echo \"/dev/kvm is $(stat -c '%A %U:%G' \
             /dev/kvm): not usable by uid 65534; the test does not change it\" >&2; exit 1; }",
        ],
    );
    let kvm = kiln_testkit::Need::custom("kvm", || {
        let kvm = probe_kvm();
        if kvm.device_usable() {
            Ok(())
        } else {
            Err(kvm.describe())
        }
    });
    let qemu = kiln_testkit::Need::custom("qemu", || {
        let qemu = qemu_options().binary;
        match Command::new(&qemu).arg("--version").output() {
            Ok(o) if o.status.success() => Ok(()),
            _ => Err(format!(
                "{} does not run (apt-get install qemu-system-x86)",
                qemu.display()
            )),
        }
    });
    // The whole jail (namespaces, another uid, cgroups) needs root.
    let jailed = [kvm.clone(), kiln_testkit::root()];
    let kvms = [kvm];
    kiln_testkit::Suite::new()
        .tokio(
            "testguest_passes_every_check_on_the_kvm_backend",
            &kvms,
            testguest_passes_every_check_on_the_kvm_backend,
        )
        .tokio(
            "testguest_passes_every_check_on_the_qemu_backend",
            std::slice::from_ref(&qemu),
            testguest_passes_every_check_on_the_qemu_backend,
        )
        .tokio(
            "kvm_destroy_and_drop_stop_a_running_guest",
            &kvms,
            kvm_destroy_and_drop_stop_a_running_guest,
        )
        .tokio(
            "kvm_virtio_net_moves_frames_both_ways",
            &kvms,
            kvm_virtio_net_moves_frames_both_ways,
        )
        .tokio(
            "kvm_start_failures_clean_up",
            &kvms,
            kvm_start_failures_clean_up,
        )
        .tokio(
            "kvm_vmm_process_is_jailed",
            &jailed,
            kvm_vmm_process_is_jailed,
        )
        .tokio(
            "kvm_guest_past_its_memory_limit_is_killed_by_the_cgroup",
            &jailed,
            kvm_guest_past_its_memory_limit_is_killed_by_the_cgroup,
        )
        .tokio(
            "kvm_vmm_process_holds_none_of_kilns_tokens",
            &jailed,
            kvm_vmm_process_holds_none_of_kilns_tokens,
        )
        .tokio(
            "qemu_process_has_a_cgroup_and_no_environment",
            &[qemu.clone(), kiln_testkit::root()],
            qemu_process_has_a_cgroup_and_no_environment,
        )
        .tokio(
            "kvm_vmm_processes_die_with_kiln",
            &jailed,
            kvm_vmm_processes_die_with_kiln,
        )
        .tokio(
            "kvm_forbidden_syscall_kills_only_that_vm",
            &kvms,
            kvm_forbidden_syscall_kills_only_that_vm,
        )
        .tokio(
            "unprivileged_jail_uses_a_user_namespace",
            std::slice::from_ref(&userns),
            unprivileged_jail_uses_a_user_namespace,
        )
        .tokio(
            "unprivileged_kvm_vm_runs_in_a_user_namespace",
            &[kvms[0].clone(), userns, kvm_for_nobody],
            unprivileged_kvm_vm_runs_in_a_user_namespace,
        )
        .run()
}
