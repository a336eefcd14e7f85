//! Boot benchmark: the bare-metal test guest on the kvm backend against the
//! same guest on the qemu backend, measured in the same run, printed as
//! ratios. `cargo bench -p kiln-vmm --bench boot`.
//!
//! - start→first guest exit: kvm: from `Machine::start` to the guest's first
//!   exit, a POST code written to port 0x80 by its third instruction; qemu:
//!   from `Machine::start` to the first serial byte read back from QEMU (the
//!   guest's first output line, an upper bound: it includes the guest's
//!   first checks and the pipe).
//! - start→end: until the guest's i8042 reset ended the VM.
//! - VMM RSS besides guest memory: kvm: this process's RSS growth while the
//!   VM runs minus the guest pages resident (mincore); qemu: QEMU's VmRSS
//!   minus the guest pages the kvm run showed resident (same guest, same
//!   pages touched).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_vmm::{probe_kvm, BackendKind, Disk, KvmSupport, Machine, MachineConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const RUNS: usize = 5;

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
        run_dir: dir.join(format!("run{n}")),
        serial_log_limit: 64 * 1024,
        start_timeout: Duration::from_secs(10),
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    first_exit: Duration,
    end: Duration,
    /// VMM RSS besides guest memory (KiB), and guest-resident KiB (kvm only).
    vmm_rss_kib: u64,
    guest_resident_kib: u64,
}

async fn run_once(
    cfg: MachineConfig,
    backend: BackendKind,
    kvm: &KvmSupport,
    guest_kib: u64,
) -> Sample {
    let rss_before = rss_kib(std::process::id());
    let t0 = Instant::now();
    let (mut m, console) = Machine::start(cfg, backend, kvm).await.expect("start");
    let mut first_serial = None;
    let mut peak_rss = 0;
    let (rd, mut wr) = console.into_split();
    let mut lines = BufReader::new(rd).lines();
    // Answer the guest's ping and watch the serial log for the first byte.
    let reader = async {
        loop {
            match tokio::time::timeout(Duration::from_millis(1), lines.next_line()).await {
                Ok(Ok(Some(l))) if l == "WAIT ping" => wr.write_all(b"ping\n").await.unwrap(),
                Ok(Ok(Some(l))) if l.starts_with("DONE") => break,
                Ok(Ok(Some(_))) => {}
                Ok(_) => break, // console closed (qemu exited)
                Err(_) => {}
            }
            if first_serial.is_none() && !m.serial_log().is_empty() {
                first_serial = Some(t0.elapsed());
            }
            if let Some(pid) = m.pid() {
                peak_rss = peak_rss.max(rss_kib(pid));
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
    let (guest_total, guest_resident) = m.guest_memory_resident().unwrap_or((0, 0));
    let first_exit = m.first_guest_exit();
    let _ = guest_total;
    tokio::time::timeout(Duration::from_secs(30), m.wait())
        .await
        .expect("VM ended");
    let end = t0.elapsed();
    if first_serial.is_none() && !m.serial_log().is_empty() {
        first_serial = Some(end);
    }
    m.destroy().await.unwrap();
    let guest_resident_kib = guest_resident / 1024;
    let vmm_rss_kib = match backend {
        BackendKind::Kvm => peak_rss
            .saturating_sub(rss_before)
            .saturating_sub(guest_resident_kib),
        _ => peak_rss.saturating_sub(guest_kib),
    };
    Sample {
        first_exit: first_exit.or(first_serial).unwrap_or(end),
        end,
        vmm_rss_kib,
        guest_resident_kib,
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
    let kvm = probe_kvm();
    if !kvm.device_usable() {
        println!("SKIP boot bench: {}", kvm.describe());
        return;
    }
    let guest = build_guest();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let mut kvm_samples = Vec::new();
        for n in 0..RUNS {
            kvm_samples.push(run_once(config(dir.path(), &guest, n), BackendKind::Kvm, &kvm, 0).await);
        }
        let guest_kib = median(kvm_samples.iter().map(|s| s.guest_resident_kib).collect());
        let mut qemu_samples = Vec::new();
        let have_qemu = Command::new(kiln_vmm::qemu::qemu_binary()).arg("--version").output().is_ok();
        if have_qemu {
            for n in 0..RUNS {
                qemu_samples.push(
                    run_once(config(dir.path(), &guest, 100 + n), BackendKind::Qemu, &kvm, guest_kib).await,
                );
            }
        } else {
            println!("SKIP qemu baseline: {} not found", kiln_vmm::qemu::qemu_binary());
        }
        let summarize = |name: &str, s: &[Sample]| {
            let f = median(s.iter().map(|x| x.first_exit).collect());
            let e = median(s.iter().map(|x| x.end).collect());
            let r = median(s.iter().map(|x| x.vmm_rss_kib).collect());
            println!(
                "{name:5} start->first guest exit {:8.2} ms   start->end {:8.2} ms   VMM RSS besides guest memory {:6} KiB   (median of {})",
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
            "kvm   first run (cold process): VMM RSS besides guest memory {} KiB",
            kvm_samples[0].vmm_rss_kib
        );
        if !qemu_samples.is_empty() {
            let (qf, qe, qr) = summarize("qemu", &qemu_samples);
            println!(
                "ratio qemu/kvm: first exit {:.1}x, end {:.1}x, VMM RSS {:.1}x",
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
