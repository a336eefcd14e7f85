//! Snapshot benchmark: the bare-metal test guest on the kvm backend,
//! started cold and restored from a snapshot taken at its wait point, in
//! the same run, printed as a ratio. `cargo bench -p kiln-vmm --bench
//! snapshot [-- --smoke]` (`--smoke`: one round each).
//!
//! Both measure the same span: from the call that creates the VM
//! (`KvmMachine::start`, or `Snapshot::open` + `KvmMachine::restore`) to
//! the guest's first line after the host's ping (`CHECK console-rx`), the
//! test guest's "first job output". The cold VM is pinged when it says it
//! waits; the restored one as soon as it exists. Measured twice: VMs in
//! this process (no VMM process or jail, the same for both), and through
//! `Machine` (one jailed `kiln-vmm` process per VM, as kiln runs them).

mod common;

use std::fs::File;
use std::io::Write;
use std::time::{Duration, Instant};

use common::{lines_until, median, no_hook, snapshot_config, sources};
use kiln_vmm::kvm::snapshot::{sha256_of, Profile, Snapshot};
use kiln_vmm::kvm::KvmMachine;

fn first_output(console: &mut std::io::BufReader<std::os::unix::net::UnixStream>) {
    let got = lines_until(console, |l| l.starts_with("CHECK console-rx"));
    assert!(
        got.last()
            .is_some_and(|l| l.starts_with("CHECK console-rx ok")),
        "{got:?}"
    );
}

fn main() {
    if !kiln_vmm::probe_kvm().device_usable() {
        println!("snapshot bench: skipped, /dev/kvm is not usable here");
        return;
    }
    let rounds = if std::env::args().any(|a| a == "--smoke") {
        1
    } else {
        10
    };
    let dir = tempfile::tempdir().unwrap();
    let config = snapshot_config(dir.path());
    let digest = |p: &std::path::Path| sha256_of(File::open(p).unwrap()).unwrap();
    let profile = Profile::for_config(&config, &digest(&config.kernel), &digest(&config.initramfs));
    let path = dir.path().join("vm.snap");

    let (mut cold, mut restored) = (Vec::new(), Vec::new());
    let mut snapshot_took = Duration::ZERO;
    for round in 0..rounds {
        // Cold: boot to the wait, ping, first output.
        let (src, mut console, mut w) = sources(&config);
        let t = Instant::now();
        let m = KvmMachine::start(&config, src, no_hook()).expect("start");
        lines_until(&mut console, |l| l == "WAIT ping");
        w.write_all(b"ping cold\n").unwrap();
        first_output(&mut console);
        cold.push(t.elapsed());
        m.destroy();

        if round == 0 {
            let (src, mut console, _w) = sources(&config);
            let m = KvmMachine::start(&config, src, no_hook()).expect("start");
            lines_until(&mut console, |l| l == "WAIT ping");
            let out = File::create(&path).unwrap();
            let t = Instant::now();
            m.snapshot(&out, &profile).expect("snapshot");
            snapshot_took = t.elapsed();
            m.destroy();
        }

        // Restored: open, restore, ping, first output.
        let (src, mut console, mut w) = sources(&config);
        let t = Instant::now();
        let snap = Snapshot::open(File::open(&path).unwrap(), &profile.hash()).expect("open");
        let m = KvmMachine::restore(&config, src, snap, no_hook()).expect("restore");
        w.write_all(b"ping restored\n").unwrap();
        first_output(&mut console);
        restored.push(t.elapsed());
        m.destroy();
    }
    let (c, r) = (median(cold), median(restored));
    let (pc, pr) = through_the_vmm_process(&config, &profile, &path, rounds);
    println!("snapshot bench (test guest, kvm backend, {rounds} rounds, medians):");
    println!("  taking the snapshot (once):        {snapshot_took:?}");
    println!("  in this process:");
    println!("    cold start -> first output:      {c:?}");
    println!("    restore -> first output:         {r:?}");
    println!(
        "    restored / cold:                 {:.3}",
        r.as_secs_f64() / c.as_secs_f64()
    );
    println!("  through the jailed VMM process (Machine, as kiln runs VMs):");
    println!("    cold start -> first output:      {pc:?}");
    println!("    restore -> first output:         {pr:?}");
    println!(
        "    restored / cold:                 {:.3}",
        pr.as_secs_f64() / pc.as_secs_f64()
    );
}

/// The same two spans through `Machine` (one jailed `kiln-vmm` per VM,
/// seccomp on), restoring from the snapshot taken above.
fn through_the_vmm_process(
    config: &kiln_vmm::MachineConfig,
    profile: &Profile,
    path: &std::path::Path,
    rounds: usize,
) -> (Duration, Duration) {
    use kiln_vmm::kvm::snapshot::SnapshotUse;
    use kiln_vmm::{BackendKind, Machine};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let rt = tokio::runtime::Runtime::new().unwrap();
    let kvm = kiln_vmm::probe_kvm();
    rt.block_on(async {
        let (mut cold, mut restored) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for restore in [false, true] {
                let mut cfg = config.clone();
                cfg.run_dir = path.with_file_name(format!("m{round}{restore}"));
                let use_ = if restore {
                    SnapshotUse::Restore {
                        path: path.to_path_buf(),
                        profile_hash: profile.hash(),
                    }
                } else {
                    SnapshotUse::None
                };
                let t = Instant::now();
                let (m, console) = Machine::start_with_snapshot(cfg, BackendKind::Kvm, &kvm, use_)
                    .await
                    .expect("start");
                let (rd, mut wr) = console.into_split();
                let mut lines = BufReader::new(rd).lines();
                if restore {
                    wr.write_all(b"ping restored\n").await.unwrap();
                }
                let first = tokio::time::timeout(common::LINE_TIMEOUT, async {
                    while let Ok(Some(l)) = lines.next_line().await {
                        if l == "WAIT ping" {
                            wr.write_all(b"ping cold\n").await.unwrap();
                        }
                        if l.starts_with("CHECK console-rx") {
                            return l;
                        }
                    }
                    String::new()
                })
                .await
                .expect("first output");
                assert!(first.starts_with("CHECK console-rx ok"), "{first}");
                if restore { &mut restored } else { &mut cold }.push(t.elapsed());
                m.destroy().await.unwrap();
            }
        }
        (median(cold), median(restored))
    })
}
