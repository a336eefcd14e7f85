//! `kiln run-job` start → first output byte, against a bare
//! `qemu-system-x86_64` booting the same kernel, initramfs and rootfs to the
//! same point (the agent's first Output frame), measured in the same run.
//! Also prints kiln's resident memory (the guest's memory is QEMU's).
//!
//! cargo bench -p kiln-tests --bench first_output [-- ITERATIONS]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent::proto::{Decoder, Frame, Start, StepSpec};
use kiln_images::rootfs::{rootfs_for, ImageSource};
use kiln_images::Cache;
use kiln_tests::harness;
use kiln_vmm::{Disk, MachineConfig};

const VCPUS: u32 = 1;
const MEMORY: u32 = 512;

fn main() {
    if let Some(why) = harness::vm_skip_reason() {
        eprintln!("skipping: {why}");
        return;
    }
    let iterations: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let st = Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["build", "-q", "--release", "-p", "kiln"])
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(st.success());
    let kiln = root.join("target/release/kiln");
    let agent = harness::agent();
    let kernel = harness::kernel();
    let image = harness::busybox_image();
    let cache = Cache::open(harness::cache_dir()).unwrap();
    // Warm: rootfs and initramfs cached, as the target says.
    let rootfs = rootfs_for(
        &cache,
        &ImageSource::parse(&image.to_string_lossy()).unwrap(),
    )
    .unwrap();
    let initramfs = kiln_images::build_initramfs(&cache, &agent, &kernel).unwrap();
    let run_dir = harness::run_dir("bench");

    let mut kiln_times = Vec::new();
    let mut bare_times = Vec::new();
    let mut kiln_rss = Vec::new();
    for i in 0..iterations + 1 {
        // Alternate, so drift in host load hits both alike; the first
        // round of each is a warm-up and not counted.
        let (t, rss) = kiln_once(&kiln, &image, &run_dir);
        let b = bare_once(
            &kernel.image,
            &initramfs,
            &rootfs.image,
            &rootfs.fstype,
            &run_dir,
            i,
        );
        if i > 0 {
            kiln_times.push(t);
            kiln_rss.push(rss);
            bare_times.push(b);
        }
        eprintln!(
            "round {i}: kiln {:.0} ms, bare qemu {:.0} ms",
            t.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3
        );
    }
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (k, b) = (med(&mut kiln_times), med(&mut bare_times));
    kiln_rss.sort();
    println!(
        "first output byte, median of {iterations} (qemu/{}):",
        if kiln_vmm::probe_kvm().runs_unmodified_guests() {
            "kvm"
        } else {
            "tcg"
        }
    );
    println!("  kiln run-job    {:>8.1} ms", k.as_secs_f64() * 1e3);
    println!("  bare qemu       {:>8.1} ms", b.as_secs_f64() * 1e3);
    println!(
        "  ratio           {:>8.3}  (target <= 1.10)",
        k.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "  kiln RSS        {:>8.1} MiB (median; the guest's memory is in QEMU's RSS)",
        kiln_rss[kiln_rss.len() / 2] as f64 / 1024.0
    );
    let _ = std::fs::remove_dir_all(&run_dir);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn kiln_once(kiln: &Path, image: &Path, run_dir: &Path) -> (Duration, u64) {
    let t = Instant::now();
    let mut child = Command::new(kiln)
        .args([
            "run-job",
            "--cpus",
            &VCPUS.to_string(),
            "--memory",
            &MEMORY.to_string(),
            "--image",
        ])
        .arg(image)
        .arg("--run-dir")
        .arg(run_dir)
        .args(["--", "echo", "x"])
        .env("KILN_CACHE_DIR", harness::cache_dir())
        .env("KILN_AGENT", harness::agent())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    out.read_exact(&mut b).unwrap();
    let elapsed = t.elapsed();
    let rss = rss_kib(child.id());
    let _ = child.wait();
    (elapsed, rss)
}

/// QEMU with kiln's own arguments, driven by a minimal host: accept the
/// console, wait for Ready, send Start, stop at the first Output frame.
fn bare_once(
    kernel: &Path,
    initramfs: &Path,
    rootfs: &Path,
    fstype: &str,
    run_dir: &Path,
    i: usize,
) -> Duration {
    let dir = run_dir.join(format!("bare-{i}"));
    std::fs::create_dir_all(&dir).unwrap();
    let scratch = dir.join("scratch.ext4");
    kiln_images::scratch::create_scratch(&scratch, 4 << 30).unwrap();
    let sock = dir.join("agent.sock");
    let config = MachineConfig {
        kernel: kernel.to_path_buf(),
        initramfs: initramfs.to_path_buf(),
        cmdline: format!(
            "{} kiln.rootfstype={fstype}",
            MachineConfig::default_cmdline()
        ),
        vcpus: VCPUS,
        memory_mib: MEMORY,
        disks: vec![
            Disk {
                path: rootfs.to_path_buf(),
                read_only: true,
                serial: "kiln-root".into(),
                ephemeral: false,
            },
            Disk {
                path: scratch.clone(),
                read_only: false,
                serial: "kiln-scratch".into(),
                ephemeral: true,
            },
        ],
        run_dir: dir.clone(),
        serial_log_limit: 0,
        start_timeout: Duration::from_secs(10),
    };
    let accel = if kiln_vmm::probe_kvm().runs_unmodified_guests() {
        "kvm"
    } else {
        "tcg"
    };
    let args = kiln_vmm::qemu::qemu_args(&config, accel, &sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let t = Instant::now();
    let mut qemu = Command::new(kiln_vmm::qemu::qemu_binary())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (mut con, _) = listener.accept().unwrap();
    let mut dec = Decoder::new();
    let mut buf = [0u8; 65536];
    let mut started = false;
    let elapsed = 'outer: loop {
        let n = con.read(&mut buf).unwrap();
        assert!(n > 0, "the bare VM closed its console");
        dec.push(&buf[..n]);
        while let Some(f) = dec.next_frame().unwrap() {
            match f {
                Frame::Ready(_) if !started => {
                    started = true;
                    let start = Start {
                        env: vec![],
                        workdir: "/".into(),
                        user: String::new(),
                    };
                    let step = StepSpec {
                        index: 0,
                        name: "x".into(),
                        argv: vec!["echo".into(), "x".into()],
                        script: String::new(),
                        env: vec![],
                        workdir: String::new(),
                        timeout_ms: 0,
                        file_commands: false,
                    };
                    use std::io::Write;
                    let mut bytes = Frame::Start(start).to_bytes().unwrap();
                    Frame::RunStep(step).encode(&mut bytes).unwrap();
                    con.write_all(&bytes).unwrap();
                }
                Frame::Output { .. } => break 'outer t.elapsed(),
                _ => {}
            }
        }
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    let _ = std::fs::remove_dir_all(&dir);
    elapsed
}
