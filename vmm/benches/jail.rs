//! The jail's cost on VM start: the test guest on the kvm backend with the
//! VMM process jailed (`isolation = best-effort`: namespaces, pivot_root,
//! uid, cgroup, seccomp where the host allows) against the same VMM process
//! with no jail (`off`), alternating, in the same run; printed as medians,
//! the difference and the ratio. `cargo bench -p kiln-vmm --bench jail
//! [-- --smoke]` (`--smoke`: three rounds each). Target: <= 10 ms added.
//!
//! - start: `Machine::start` until it returns (the VMM process has jailed
//!   itself and built the VM, and said so).
//! - first serial byte: until the guest's first serial output reached kiln.
//! - then each step of the start (`JailReport::steps`: kiln's cgroup,
//!   spawn and join, the VMM process's namespaces, pivot_root, uid,
//!   seccomp, the VM's build, the whole exchange), medians, jailed against
//!   not: where the added time goes.

mod common;

use std::time::{Duration, Instant};

use common::{build_guest, config, median};
use kiln_vmm::{probe_kvm, BackendKind, IsolationMode, KvmSupport, Machine, MachineConfig};

struct Sample {
    start: Duration,
    first_serial: Duration,
    /// The timed steps of the start (`JailReport::steps`).
    steps: Vec<kiln_vmm::jail::Step>,
}

async fn run_once(mut cfg: MachineConfig, mode: IsolationMode, kvm: &KvmSupport) -> Sample {
    cfg.isolation.mode = mode;
    let t0 = Instant::now();
    let (m, _console) = Machine::start(cfg, BackendKind::Kvm, kvm)
        .await
        .expect("start");
    let start = t0.elapsed();
    let mut serial = m.serial_updates();
    tokio::time::timeout(Duration::from_secs(30), serial.wait_for(|n| *n > 0))
        .await
        .expect("the guest wrote to its serial console")
        .expect("serial updates");
    let first_serial = t0.elapsed();
    let jail = m.jail().expect("kvm backend").clone();
    if mode != IsolationMode::Off {
        assert!(jail.seccomp, "{}", jail.summary());
    }
    m.destroy().await.unwrap();
    Sample {
        start,
        first_serial,
        steps: jail.steps,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let rounds = if std::env::args().any(|a| a == "--smoke") {
        3
    } else {
        21
    };
    let kvm = probe_kvm();
    if !kvm.device_usable() {
        println!("SKIP jail bench: {}", kvm.describe());
        return;
    }
    let guest = build_guest();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut jailed, mut open) = (Vec::new(), Vec::new());
        // One warm-up each (page cache, kiln-vmm's first exec), then
        // alternate so that drift on a shared machine hits both alike.
        for n in 0..=rounds {
            let j = run_once(config(dir.path(), &guest, 2 * n), IsolationMode::BestEffort, &kvm).await;
            let o = run_once(config(dir.path(), &guest, 2 * n + 1), IsolationMode::Off, &kvm).await;
            if n > 0 {
                jailed.push(j);
                open.push(o);
            }
        }
        let report = |what: &str, f: fn(&Sample) -> Duration| {
            let j = median(jailed.iter().map(f).collect());
            let o = median(open.iter().map(f).collect());
            println!(
                "{what:18} jailed {:8.2} ms   no jail {:8.2} ms   added {:+7.2} ms   ratio {:.2}   (median of {rounds})",
                ms(j),
                ms(o),
                ms(j) - ms(o),
                ms(j) / ms(o).max(1e-6),
            );
        };
        report("start", |s| s.start);
        report("first serial byte", |s| s.first_serial);
        // Where the start goes, step by step (medians; a step only one
        // side has shows 0 on the other).
        let step = |samples: &[Sample], name: &str| {
            let v: Vec<u64> = samples
                .iter()
                .map(|s| s.steps.iter().find(|t| t.name == name).map_or(0, |t| t.micros))
                .collect();
            median(v) as f64 / 1e3
        };
        let mut names: Vec<String> = Vec::new();
        for s in jailed.iter().chain(&open) {
            for t in &s.steps {
                if !names.contains(&t.name) {
                    names.push(t.name.clone());
                }
            }
        }
        for name in &names {
            let (j, o) = (step(&jailed, name), step(&open, name));
            println!("  {name:34} jailed {j:8.2} ms   no jail {o:8.2} ms   added {:+7.2} ms", j - o);
        }
    });
}
