//! Snapshots on the kvm backend, with the bare-metal test guest
//! (`vmm/testguest`, built with its `build.sh` or taken from
//! `KILN_TESTGUEST`): boot it to the point where it waits for the host's
//! ping, snapshot it, restore it into fresh VMs and check that each
//! finishes its checks where the first stopped, that what one restored VM
//! writes to its memory neither reaches the file nor the next VM, and that
//! a snapshot for another kiln or profile is refused.
//!
//! The VMs run in this process (`KvmMachine`, no VMM process or jail):
//! what is tested is the snapshot, not the jail.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

#[path = "../benches/common/mod.rs"]
mod common;

use common::{lines_until, no_hook, snapshot_config, sources, LINE_TIMEOUT};
use kiln_vmm::kvm::snapshot::{self, Profile, Snapshot, SnapshotError};
use kiln_vmm::kvm::KvmMachine;
use kiln_vmm::{probe_kvm, ExitStatus};

fn wait_exit(m: &KvmMachine) -> ExitStatus {
    let rx = m.exit_updates();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = rx.borrow().clone() {
            return s;
        }
        assert!(Instant::now() < deadline, "the VM did not end within 60 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn failed(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|l| l.starts_with("CHECK ") && l.split(' ').nth(2) != Some("ok"))
        .collect()
}

fn file_digest(p: &Path) -> String {
    snapshot::sha256_of(File::open(p).unwrap()).unwrap()
}

/// Boot, snapshot at the wait point, restore twice, refuse what does not fit.
fn snapshot_restores_into_fresh_vms_that_share_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = snapshot_config(dir.path());
    let profile = Profile::for_config(
        &config,
        &file_digest(&config.kernel),
        &file_digest(&config.initramfs),
    );

    // A cold boot, up to the guest's wait.
    let (src, mut console, _w) = sources(&config);
    let source = KvmMachine::start(&config, src, no_hook()).expect("cold start");
    let before = lines_until(&mut console, |l| l == "WAIT ping");
    assert!(failed(&before).is_empty(), "{before:#?}");
    let checks_before = before.iter().filter(|l| l.starts_with("CHECK ")).count();
    assert!(checks_before >= 15, "{before:#?}");

    let path = dir.path().join("vm.snap");
    let out = File::create_new(&path).unwrap();
    let t = Instant::now();
    let header = source.snapshot(&out, &profile).expect("snapshot");
    out.sync_all().unwrap();
    eprintln!(
        "snapshot written in {:?}: {} bytes of state, memory {:?}, {} bytes on disk",
        t.elapsed(),
        header.state_len,
        header.memory,
        std::fs::metadata(&path).unwrap().len()
    );
    assert_eq!(header.profile_hash, profile.hash());
    // The source VM runs on after its snapshot; it is not needed.
    source.destroy();
    let digest = file_digest(&path);

    for tag in ["vm1", "vm2"] {
        let snap = Snapshot::open(File::open(&path).unwrap(), &profile.hash()).expect("open");
        let (src, mut console, mut w) = sources(&config);
        let t = Instant::now();
        let m = KvmMachine::restore(&config, src, snap, no_hook()).expect("restore");
        let restored_in = t.elapsed();
        w.write_all(format!("ping {tag}\n").as_bytes()).unwrap();
        let after = lines_until(&mut console, |l| l.starts_with("DONE"));
        eprintln!("{tag} (restored in {restored_in:?}):");
        for l in &after {
            eprintln!("  {l}");
        }
        assert!(failed(&after).is_empty(), "{after:#?}");
        assert!(
            after.iter().any(|l| l.starts_with("CHECK console-rx ok")),
            "{after:#?}"
        );
        // The mark the first restored VM left is not in the second: each
        // writes to its own copy of the snapshot's pages.
        assert!(
            after.contains(&format!("CHECK memory-marker ok before='' after='{tag}'")),
            "{after:#?}"
        );
        // The guest counted the checks it made before the snapshot too.
        let checks_after = after.iter().filter(|l| l.starts_with("CHECK ")).count();
        assert_eq!(
            after.last().unwrap(),
            &format!("DONE {} 0", checks_before + checks_after)
        );
        assert_eq!(wait_exit(&m), ExitStatus::Shutdown, "the guest's reset");
        m.destroy();
        assert_eq!(file_digest(&path), digest, "{tag} wrote to the snapshot");
    }

    // Another profile (a different kernel, say) is refused.
    let mut other = profile.clone();
    other.kernel_sha256 = "0".repeat(64);
    match Snapshot::open(File::open(&path).unwrap(), &other.hash()) {
        Err(SnapshotError::Profile { found, .. }) => assert_eq!(found, profile.hash()),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a snapshot for another profile was accepted"),
    }
    // So is one from another kiln.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let (_, mut h) = snapshot::read_header(&f).unwrap();
    h.kiln_version = "0.0.0-elsewhere".into();
    snapshot::write_header(&f, &h).unwrap();
    match Snapshot::open(f, &profile.hash()) {
        Err(SnapshotError::KilnVersion { found, .. }) => assert_eq!(found, "0.0.0-elsewhere"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a snapshot from another kiln was accepted"),
    }
    // And one taken for this profile but restored into a VM of another
    // shape (here: more memory) does not fit.
    std::fs::remove_file(&path).unwrap();
    let (src, mut console, _w) = sources(&config);
    let source = KvmMachine::start(&config, src, no_hook()).expect("cold start");
    lines_until(&mut console, |l| l == "WAIT ping");
    let out = File::create_new(&path).unwrap();
    source.snapshot(&out, &profile).expect("snapshot");
    source.destroy();
    let snap = Snapshot::open(File::open(&path).unwrap(), &profile.hash()).unwrap();
    let mut bigger = config.clone();
    bigger.memory_mib = 128;
    let (src, _console, _w) = sources(&bigger);
    match KvmMachine::restore(&bigger, src, snap, no_hook()) {
        Err(kiln_vmm::MachineError::Snapshot(SnapshotError::Mismatch(why))) => {
            assert!(why.contains("memory"), "{why}")
        }
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("a snapshot was restored into a VM of another size"),
    }
}

/// The same through kiln's way of running a VM (`Machine`, one jailed
/// `kiln-vmm` process per VM, seccomp filters on every thread): the VMM
/// process writes the snapshot into the file kiln handed it and restores
/// from the one it hands it.
async fn snapshot_through_the_vmm_process() {
    use kiln_vmm::kvm::snapshot::SnapshotUse;
    use kiln_vmm::{BackendKind, Machine};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let kvm = probe_kvm();
    let dir = tempfile::tempdir().unwrap();
    let mut config = snapshot_config(dir.path());
    let profile = Profile::for_config(
        &config,
        &file_digest(&config.kernel),
        &file_digest(&config.initramfs),
    );
    let path = dir.path().join("vm.snap");
    let (mut source, console) = Machine::start_with_snapshot(
        config.clone(),
        BackendKind::Kvm,
        &kvm,
        SnapshotUse::WriteTo(path.clone()),
    )
    .await
    .expect("start");
    assert!(
        source.jail().is_some_and(|j| j.seccomp),
        "{:?}",
        source.jail()
    );
    let mut lines = BufReader::new(console).lines();
    let waited = tokio::time::timeout(LINE_TIMEOUT, async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l == "WAIT ping" {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(waited, Ok(true));
    let header = source.snapshot(&profile).await.expect("snapshot");
    assert_eq!(header.profile_hash, profile.hash());
    // The VM runs on after its snapshot (its filters let it read its state).
    assert!(source.pid().is_some());
    source.destroy().await.unwrap();

    for (n, tag) in ["vm1", "vm2"].into_iter().enumerate() {
        config.run_dir = dir.path().join(format!("restored{n}"));
        let (mut m, console) = Machine::start_with_snapshot(
            config.clone(),
            BackendKind::Kvm,
            &kvm,
            SnapshotUse::Restore {
                path: path.clone(),
                profile_hash: profile.hash(),
            },
        )
        .await
        .expect("restore");
        let (rd, mut wr) = console.into_split();
        wr.write_all(format!("ping {tag}\n").as_bytes())
            .await
            .unwrap();
        let mut lines = BufReader::new(rd).lines();
        let mut got = Vec::new();
        let done = tokio::time::timeout(LINE_TIMEOUT, async {
            while let Ok(Some(l)) = lines.next_line().await {
                let done = l.starts_with("DONE");
                got.push(l);
                if done {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(done, Ok(true), "{got:#?}");
        assert!(failed(&got).is_empty(), "{got:#?}");
        assert!(
            got.contains(&format!("CHECK memory-marker ok before='' after='{tag}'")),
            "{got:#?}"
        );
        assert!(got.last().unwrap().ends_with(" 0"), "{got:#?}");
        let status = tokio::time::timeout(Duration::from_secs(60), m.wait()).await;
        assert_eq!(status, Ok(ExitStatus::Shutdown));
        m.destroy().await.unwrap();
    }

    // A snapshot for another profile: the VMM process refuses it, typed.
    config.run_dir = dir.path().join("refused");
    let err = Machine::start_with_snapshot(
        config.clone(),
        BackendKind::Kvm,
        &kvm,
        SnapshotUse::Restore {
            path: path.clone(),
            profile_hash: "0".repeat(64),
        },
    )
    .await
    .err()
    .expect("another profile must be refused");
    let chain = kiln_testkit::error_chain(&err);
    assert!(chain.contains("profile"), "{chain}");
    assert!(!config.run_dir.exists());
    // The qemu backend has no snapshots.
    assert!(matches!(
        Machine::start_with_snapshot(
            config.clone(),
            BackendKind::Qemu,
            &kvm,
            SnapshotUse::WriteTo(path.clone()),
        )
        .await,
        Err(kiln_vmm::MachineError::Unsupported(_))
    ));
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
    kiln_testkit::Suite::new()
        .test(
            "snapshot_restores_into_fresh_vms_that_share_nothing",
            std::slice::from_ref(&kvm),
            snapshot_restores_into_fresh_vms_that_share_nothing,
        )
        .tokio(
            "snapshot_through_the_vmm_process",
            &[kvm],
            snapshot_through_the_vmm_process,
        )
        .run()
}
