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
    probe_kvm, BackendKind, Disk, ExitStatus, KvmSupport, Machine, MachineConfig, MachineError,
    QemuOptions,
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
    (got, status, serial, exits)
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
    let (lines, status, serial, exits) = boot(&fx, BackendKind::Kvm, &kvm).await;
    assert_all_ok(&lines, ALL_CHECKS);
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
    let (lines, status, _, exits) = boot(&fx, BackendKind::Qemu, &kvm).await;
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
        let (machine, console) = Machine::start(fx.config.clone(), BackendKind::Kvm, &kvm)
            .await
            .expect("start");
        let mut lines = BufReader::new(console).lines();
        // The guest now polls for a ping that never comes.
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l == "WAIT ping" {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(waited, Ok(true));
        let t = std::time::Instant::now();
        if use_drop {
            tokio::task::spawn_blocking(move || drop(machine))
                .await
                .unwrap();
        } else {
            machine.destroy().await.unwrap();
        }
        // Not a speed target (that is the boot bench's job): a stop that
        // hangs on a guest spinning forever is the failure looked for.
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "stopping hung for {:?}",
            t.elapsed()
        );
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

fn main() -> std::process::ExitCode {
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
    let kvms = [kvm];
    kiln_testkit::Suite::new()
        .tokio(
            "testguest_passes_every_check_on_the_kvm_backend",
            &kvms,
            testguest_passes_every_check_on_the_kvm_backend,
        )
        .tokio(
            "testguest_passes_every_check_on_the_qemu_backend",
            &[qemu],
            testguest_passes_every_check_on_the_qemu_backend,
        )
        .tokio(
            "kvm_destroy_and_drop_stop_a_running_guest",
            &kvms,
            kvm_destroy_and_drop_stop_a_running_guest,
        )
        .tokio(
            "kvm_start_failures_clean_up",
            &kvms,
            kvm_start_failures_clean_up,
        )
        .run()
}
