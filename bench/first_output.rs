//! `kiln run-job --backend qemu` start → first output byte, against a bare
//! `qemu-system-x86_64` booting the same kernel, initramfs and rootfs to the
//! same point (the agent's first Output frame), measured in the same run.
//! Both sides use the qemu backend with the same accelerator, and both make
//! their 4 GiB scratch disk inside the clock. The timed byte is checked on
//! both sides, and kiln's exit status. Also prints kiln's resident memory
//! (the guest's memory is QEMU's).
//!
//! cargo bench -p kiln-tests --bench first_output [-- ITERATIONS]
//! cargo test -p kiln-tests --bench first_output -- --smoke   (one round, CI)

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_agent::proto::{
    Decoder, Frame, Start, StepSpec, CMDLINE_ROOTFSTYPE, ROOT_DISK_SERIAL, SCRATCH_DISK_SERIAL,
};
use kiln_images::{Cache, ImageSource, Images, NoProgress};
use kiln_tests::harness;
use kiln_vmm::{Disk, MachineConfig};

const VCPUS: u32 = 1;
const MEMORY: u32 = 512;
/// Scratch disk size on both sides (kiln's `--disk`).
const SCRATCH_GIB: u64 = 4;

fn main() {
    if !kiln_testkit::require("first_output", &harness::vm()) {
        return;
    }
    let smoke = std::env::args().any(|a| a == "--smoke");
    let iterations: usize = if smoke {
        1
    } else {
        std::env::args()
            .skip(1)
            .find_map(|a| a.parse().ok())
            .unwrap_or(5)
    };
    // One warm-up round per side, not counted (none in smoke mode).
    let warmup = usize::from(!smoke);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    // A measurement runs the release build; a smoke run (CI) the debug
    // build the tests already made, so CI builds no release kiln.
    let kiln = if smoke {
        harness::kiln_bin()
    } else {
        let st = Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .args(["build", "-q", "--release", "-p", "kiln"])
            .current_dir(&root)
            .status()
            .unwrap();
        assert!(st.success());
        root.join("target/release/kiln")
    };
    let agent = harness::agent();
    let kernel = harness::kernel();
    let image = harness::busybox_image();
    let cache = Cache::open(harness::cache_dir()).unwrap();
    // Warm: rootfs and initramfs cached, as the target says.
    let images = Images::new(cache.clone(), kiln::env::Env::read().images()).unwrap();
    let rootfs = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(images.rootfs(
            &ImageSource::parse(&image.to_string_lossy()).unwrap(),
            std::sync::Arc::new(NoProgress),
        ))
        .unwrap();
    let initramfs = kiln_images::build_initramfs(&cache, &agent, &kernel).unwrap();
    let run_dir = harness::run_dir("bench");

    let mut kiln_times = Vec::new();
    let mut bare_times = Vec::new();
    let mut kiln_rss = Vec::new();
    let accel = if kiln_vmm::probe_kvm().runs_unmodified_guests() {
        "kvm"
    } else {
        "tcg"
    };
    for i in 0..iterations + warmup {
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
            accel,
        );
        if i >= warmup {
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
    if smoke {
        println!("smoke run (one round, no warm-up): the figures are not a measurement");
    }
    println!("first output byte, median of {iterations}:");
    println!(
        "  kiln run-job --backend qemu (qemu/{accel})  {:>8.1} ms",
        k.as_secs_f64() * 1e3
    );
    println!(
        "  bare qemu-system-x86_64 (qemu/{accel})      {:>8.1} ms",
        b.as_secs_f64() * 1e3
    );
    println!(
        "  ratio           {:>8.3}  (target <= 1.10)",
        k.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "  kiln RSS        {:>8.1} MiB (median; the guest's memory is in QEMU's RSS)",
        kiln_rss[kiln_rss.len() / 2] as f64 / 1024.0
    );
    let _ = std::fs::remove_dir_all(&run_dir);
    let _ = std::fs::remove_dir_all(&image);
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
            "--backend",
            "qemu",
            "--disk",
            &SCRATCH_GIB.to_string(),
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
    out.read_exact(&mut b).expect("kiln printed nothing");
    let elapsed = t.elapsed();
    let rss = rss_kib(child.id());
    assert_eq!(b[0], b'x', "the timed byte is the job's output");
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "kiln run-job failed: {st}");
    assert_eq!(rest, b"\n", "the job printed exactly \"x\\n\"");
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
    accel: &str,
) -> Duration {
    let dir = run_dir.join(format!("bare-{i}"));
    std::fs::create_dir_all(&dir).unwrap();
    let scratch = dir.join("scratch.ext4");
    let sock = dir.join("agent.sock");
    // The clock starts before the scratch disk is made, as kiln's does.
    let t = Instant::now();
    kiln_images::scratch::create_scratch(&scratch, SCRATCH_GIB << 30).unwrap();
    let config = MachineConfig {
        kernel: kernel.to_path_buf(),
        initramfs: initramfs.to_path_buf(),
        cmdline: format!(
            "{} {CMDLINE_ROOTFSTYPE}={fstype}",
            MachineConfig::default_cmdline()
        ),
        vcpus: VCPUS,
        memory_mib: MEMORY,
        disks: vec![
            Disk {
                path: rootfs.to_path_buf(),
                read_only: true,
                serial: ROOT_DISK_SERIAL.into(),
                ephemeral: false,
            },
            Disk {
                path: scratch.clone(),
                read_only: false,
                serial: SCRATCH_DISK_SERIAL.into(),
                ephemeral: true,
            },
        ],
        console_port: "org.kiln.agent.0".into(),
        run_dir: dir.clone(),
        serial_log_limit: 0,
        start_timeout: Duration::from_secs(10),
        qemu: kiln_vmm::QemuOptions::new(Some(harness::qemu_binary())),
        isolation: Default::default(),
        test_forbidden_syscall: None,
        network: kiln_vmm::Network::None,
    };
    // QEMU inherits the disks as descriptors (`-add-fd`), as kiln hands them.
    // A read-write disk also gets a read-only descriptor (QEMU opens it so
    // first).
    let disks: Vec<Vec<std::fs::File>> = config
        .disks
        .iter()
        .map(|d| {
            let open = |write| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(&d.path)
                    .unwrap()
            };
            let mut fds = vec![open(false)];
            if !d.read_only {
                fds.push(open(true));
            }
            fds
        })
        .collect();
    let inputs = kiln_vmm::qemu::QemuInputs {
        kernel: config.kernel.clone(),
        initramfs: config.initramfs.clone(),
        console: sock.clone(),
        disk_fds: disks
            .iter()
            .map(|fds| fds.iter().map(|f| f.as_raw_fd()).collect())
            .collect(),
        net_fd: None,
    };
    let args = kiln_vmm::qemu::qemu_args(&config, accel, &inputs);
    let inherit: Vec<i32> = inputs.disk_fds.iter().flatten().copied().collect();
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut cmd = Command::new(&config.qemu.binary);
    // SAFETY: fcntl(2) on descriptors `disks` keeps open, in the child
    // before exec (async-signal-safe, nothing allocated).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut qemu = cmd
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
                        network: None,
                        services: None,
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
                Frame::Output { data, .. } => {
                    let elapsed = t.elapsed();
                    assert_eq!(
                        data.first(),
                        Some(&b'x'),
                        "the timed byte is the step's output"
                    );
                    break 'outer elapsed;
                }
                _ => {}
            }
        }
    };
    let _ = qemu.kill();
    let _ = qemu.wait();
    let _ = std::fs::remove_dir_all(&dir);
    elapsed
}
