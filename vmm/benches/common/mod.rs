//! What the vmm benches share: the test guest and a VM to boot it in.

#![allow(dead_code)] // each bench uses part of it

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kiln_vmm::kvm::{Sources, ThreadStart};
use kiln_vmm::{Disk, MachineConfig};

/// How long a console line may take (a loaded host, nested PVM).
pub const LINE_TIMEOUT: Duration = Duration::from_secs(120);

pub fn build_guest() -> PathBuf {
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
pub fn qemu_options() -> kiln_vmm::QemuOptions {
    kiln_vmm::QemuOptions::new(std::env::var_os("KILN_QEMU"))
}

pub fn config(dir: &Path, kernel: &Path, n: usize) -> MachineConfig {
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
        isolation: Default::default(),
        test_forbidden_syscall: None,
        network: kiln_vmm::Network::None,
    }
}

/// What the VM is built from, and the host end of its console.
pub fn sources(config: &MachineConfig) -> (Sources, BufReader<UnixStream>, UnixStream) {
    let (host, vmm) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(LINE_TIMEOUT)).unwrap();
    let disks = config
        .disks
        .iter()
        .map(|d| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(!d.read_only)
                .open(&d.path)
                .unwrap()
        })
        .collect();
    let sources = Sources {
        kvm: kvm_ioctls::Kvm::new().unwrap(),
        kernel: File::open(&config.kernel).unwrap(),
        initramfs: File::open(&config.initramfs).unwrap(),
        disks,
        console: vmm,
        network: None,
    };
    let writer = host.try_clone().unwrap();
    (sources, BufReader::new(host), writer)
}

/// No seccomp or other hook on the VM's threads (VMs in this process).
pub fn no_hook() -> ThreadStart {
    Arc::new(|_| Ok(()))
}

/// Console lines up to and including the first that `last` accepts.
pub fn lines_until(
    console: &mut BufReader<UnixStream>,
    last: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let mut l = String::new();
        match console.read_line(&mut l) {
            Ok(0) => panic!("the console ended; lines so far: {got:#?}"),
            Ok(_) => {}
            Err(e) => panic!("console: {e}; lines so far: {got:#?}"),
        }
        let l = l.trim_end().to_string();
        let done = last(&l);
        got.push(l);
        if done {
            return got;
        }
    }
}

/// The benches' test-guest VM (one vCPU), with a second vCPU (its state
/// is that of one waiting for INIT/SIPI) and no poll limit at the wait.
pub fn snapshot_config(dir: &Path) -> MachineConfig {
    let mut c = config(dir, &build_guest(), 0);
    c.vcpus = 2;
    c.cmdline = c.cmdline.replace("vcpus=1", "vcpus=2") + " wait_forever";
    c
}

pub fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}
