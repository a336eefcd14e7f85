//! Boot benchmark: the bare-metal test guest on the kvm backend against the
//! same guest on the qemu backend, measured in the same run, printed as
//! ratios. `cargo bench -p kiln-vmm --bench boot [-- --smoke]` (`--smoke`:
//! one round each).
//!
//! - start→first serial byte: from `Machine::start` to the first byte the
//!   guest writes to its serial console (its first line), on both backends
//!   the same event, awaited by notification (`Machine::serial_updates`).
//! - start→end: until the guest's i8042 reset ended the VM.
//! - VMM RSS besides guest memory: kvm: the VMM process's peak RSS (VmHWM)
//!   minus the guest pages it reported resident (mincore) when the VM
//!   ended; qemu: QEMU's peak RSS minus the guest pages the kvm run showed
//!   resident (same guest, same pages touched).
//! - kvm only: the exits that reached the VMM, by reason.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{build_guest, config, median, qemu_options};
use kiln_vmm::{probe_kvm, BackendKind, KvmSupport, Machine, MachineConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

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
    let rss = m.pid().map_or(0, |pid| status_kib(pid, "VmHWM:"));
    tokio::time::timeout(Duration::from_secs(30), m.wait())
        .await
        .expect("VM ended");
    let end = t0.elapsed();
    // Reported by the kvm backend's VMM process when the VM ended.
    let (_, guest_resident) = m.guest_memory_resident().unwrap_or((0, 0));
    let exits = m.exit_stats().map(|s| s.total()).unwrap_or(0);
    m.destroy().await.unwrap();
    let guest_resident_kib = guest_resident / 1024;
    let vmm_rss_kib = match backend {
        BackendKind::Kvm => rss.saturating_sub(guest_resident_kib),
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
