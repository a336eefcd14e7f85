//! Boot benchmark: the bare-metal test guest on the kvm backend against the
//! same guest on the qemu backend, measured in the same run, printed as
//! ratios. `cargo bench -p kiln-vmm --bench boot [-- --smoke]` (`--smoke`:
//! one round each).
//!
//! - start→first serial byte: from `Machine::start` to the first byte the
//!   guest writes to its serial console (its first line), on both backends
//!   the same event, awaited by notification (`Machine::serial_updates`).
//! - start→end: until the guest's i8042 reset ended the VM.
//! - VMM RSS besides guest memory: kvm: this process's RSS growth while the
//!   VM runs minus the guest pages resident (mincore); qemu: QEMU's peak RSS
//!   (VmHWM) minus the guest pages the kvm run showed resident (same guest,
//!   same pages touched).
//! - kvm only: the exits that reached the VMM, by reason.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_vmm::{probe_kvm, BackendKind, Disk, KvmSupport, Machine, MachineConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn build_guest() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_TESTGUEST") {
        return p.into();
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testguest");
    let out = Command::new("sh")
        .arg(dir.join("build.sh"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("run build.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The bench's edge: `KILN_QEMU` names the QEMU to run, as for kiln itself.
fn qemu_options() -> kiln_vmm::QemuOptions {
    kiln_vmm::QemuOptions::new(std::env::var_os("KILN_QEMU"))
}

fn config(dir: &Path, kernel: &Path, n: usize) -> MachineConfig {
    let initrd: Vec<u8> = (0..5000usize).map(|i| (i * 7 + 7) as u8).collect();
    std::fs::write(dir.join("initrd"), initrd).unwrap();
    let ro: Vec<u8> = (0..4096usize).map(|i| ((i % 512) * 13 + 5) as u8).collect();
    std::fs::write(dir.join("ro.img"), ro).unwrap();
    std::fs::write(dir.join("rw.img"), vec![0u8; 4096]).unwrap();
    MachineConfig {
        kernel: kernel.to_path_buf(),
        initramfs: dir.join("initrd"),
        cmdline:
            "kiln.testguest mem_mib=64 vcpus=1 initrd_len=5000 initrd_seed=7 disk_ro=kiln-test-ro \
                  disk_rw=kiln-test-rw disk_ro_sectors=8 virtio=4"
                .into(),
        vcpus: 1,
        memory_mib: 64,
        disks: vec![
            Disk {
                path: dir.join("ro.img"),
                read_only: true,
                serial: "kiln-test-ro".into(),
                ephemeral: true,
            },
            Disk {
                path: dir.join("rw.img"),
                read_only: false,
                serial: "kiln-test-rw".into(),
                ephemeral: true,
            },
        ],
        // The port the test guest looks for (`testguest/src/checks.rs`).
        console_port: "org.kiln.agent.0".into(),
        run_dir: dir.join(format!("run{n}")),
        serial_log_limit: 64 * 1024,
        start_timeout: Duration::from_secs(10),
        qemu: qemu_options(),
        network: kiln_vmm::Network::None,
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    first_serial: Duration,
    end: Duration,
    /// VMM RSS besides guest memory (KiB), and guest-resident KiB (kvm only).
    vmm_rss_kib: u64,
    guest_resident_kib: u64,
    /// Exits that reached the VMM (kvm only).
    exits: u64,
}

async fn run_once(
    cfg: MachineConfig,
    backend: BackendKind,
    kvm: &KvmSupport,
    guest_kib: u64,
) -> Sample {
    let rss_before = status_kib(std::process::id(), "VmRSS:");
    let t0 = Instant::now();
    let (mut m, console) = Machine::start(cfg, backend, kvm).await.expect("start");
    let mut serial = m.serial_updates();
    let mut first_serial = None;
    let (rd, mut wr) = console.into_split();
    let mut lines = BufReader::new(rd).lines();
    // Answer the guest's ping; note the first serial byte when it comes.
    let reader = async {
        loop {
            tokio::select! {
                l = lines.next_line() => match l {
                    Ok(Some(l)) if l == "WAIT ping" => wr.write_all(b"ping\n").await.unwrap(),
                    Ok(Some(l)) if l.starts_with("DONE") => break,
                    Ok(Some(_)) => {}
                    _ => break, // console closed (qemu exited)
                },
                r = serial.changed(), if first_serial.is_none() => {
                    if r.is_err() || *serial.borrow() > 0 {
                        first_serial = Some(t0.elapsed());
                    }
                }
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .is_err()
    {
        panic!(
            "{backend:?}: guest did not finish; serial: {}",
            String::from_utf8_lossy(&m.serial_log())
        );
    }
    let (_, guest_resident) = m.guest_memory_resident().unwrap_or((0, 0));
    let rss = match (backend, m.pid()) {
        (BackendKind::Kvm, Some(pid)) => status_kib(pid, "VmRSS:"),
        (_, Some(pid)) => status_kib(pid, "VmHWM:"),
        _ => 0,
    };
    tokio::time::timeout(Duration::from_secs(30), m.wait())
        .await
        .expect("VM ended");
    let end = t0.elapsed();
    let exits = m.exit_stats().map(|s| s.total()).unwrap_or(0);
    m.destroy().await.unwrap();
    let guest_resident_kib = guest_resident / 1024;
    let vmm_rss_kib = match backend {
        BackendKind::Kvm => rss
            .saturating_sub(rss_before)
            .saturating_sub(guest_resident_kib),
        _ => rss.saturating_sub(guest_kib),
    };
    Sample {
        first_serial: first_serial.expect("the guest wrote to its serial console"),
        end,
        vmm_rss_kib,
        guest_resident_kib,
        exits,
    }
}

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let runs = if std::env::args().any(|a| a == "--smoke") {
        1
    } else {
        5
    };
    let kvm = probe_kvm();
    if !kvm.device_usable() {
        println!("SKIP boot bench: {}", kvm.describe());
        return;
    }
    let guest = build_guest();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let mut kvm_samples = Vec::new();
        for n in 0..runs {
            kvm_samples.push(run_once(config(dir.path(), &guest, n), BackendKind::Kvm, &kvm, 0).await);
        }
        let guest_kib = median(kvm_samples.iter().map(|s| s.guest_resident_kib).collect());
        let mut qemu_samples = Vec::new();
        let qemu = qemu_options().binary;
        let have_qemu = Command::new(&qemu).arg("--version").output().is_ok();
        if have_qemu {
            for n in 0..runs {
                qemu_samples.push(
                    run_once(config(dir.path(), &guest, 100 + n), BackendKind::Qemu, &kvm, guest_kib).await,
                );
            }
        } else {
            println!("SKIP qemu baseline: {} not found", qemu.display());
        }
        let summarize = |name: &str, s: &[Sample]| {
            let f = median(s.iter().map(|x| x.first_serial).collect());
            let e = median(s.iter().map(|x| x.end).collect());
            let r = median(s.iter().map(|x| x.vmm_rss_kib).collect());
            println!(
                "{name:5} start->first serial byte {:8.2} ms   start->end {:8.2} ms   VMM RSS besides guest memory {:6} KiB   (median of {})",
                f.as_secs_f64() * 1e3,
                e.as_secs_f64() * 1e3,
                r,
                s.len()
            );
            (f, e, r)
        };
        println!("test guest: 1 vCPU, 64 MiB, console + 2 disks + rng; guest pages resident {guest_kib} KiB");
        let (kf, ke, kr) = summarize("kvm", &kvm_samples);
        println!(
            "kvm   first run (cold process): VMM RSS besides guest memory {} KiB; exits that reached the VMM {}",
            kvm_samples[0].vmm_rss_kib,
            median(kvm_samples.iter().map(|x| x.exits).collect())
        );
        if !qemu_samples.is_empty() {
            let (qf, qe, qr) = summarize("qemu", &qemu_samples);
            println!(
                "ratio qemu/kvm: first serial byte {:.1}x, end {:.1}x, VMM RSS {:.1}x",
                qf.as_secs_f64() / kf.as_secs_f64(),
                qe.as_secs_f64() / ke.as_secs_f64(),
                qr as f64 / kvm_samples[0].vmm_rss_kib.max(1) as f64
            );
            println!(
                "(VMM RSS ratio against the kvm cold run; the warm median is {kr} KiB. On nested PVM the \
                 kvm guest itself runs by instruction emulation, so start->end favours TCG here.)"
            );
        }
    });
}
