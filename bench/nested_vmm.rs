//! kiln's kvm backend against Firecracker and QEMU (`-accel kvm -M
//! microvm`) on the same KVM, kernel, initramfs and command line, and kiln
//! against QEMU to a job's first output byte. Printed as ratios measured in
//! one run.
//!
//! `cargo bench -p kiln-tests --bench nested_vmm [-- --smoke | ROUNDS]`
//!
//! Where `/dev/kvm` cannot run Linux (nested PVM, none), the bench runs
//! itself inside an L1 VM with real KVM (`kiln_tests::nested`: QEMU TCG
//! emulating AMD-V). Times there are nested under TCG, not hardware
//! figures: only the ratios mean something.
//!
//! Per VMM, the same 1-vCPU 256 MiB guest whose busybox `/init` prints a
//! marker with its uptime on the serial console and resets:
//! - start → marker: from spawning the VMM's process (kiln: this binary
//!   re-run as a child that starts the VM through `kiln_vmm::Machine` and
//!   copies the serial console to its stdout on every notification) to the
//!   marker line on its stdout, read from a pipe (no polling).
//! - guest uptime at the marker, from the marker itself.
//! - exits: KVM's count for the VM (`/sys/kernel/debug/kvm/<pid>-<fd>/exits`,
//!   every exit, handled in the kernel or not) when the marker arrives.
//! - VMM RSS besides guest memory: the process's RSS minus the resident
//!   part of its guest-RAM mapping (`/proc/<pid>/smaps`) at the marker.
//!
//! First job output: `Executor::run` on the kvm backend from a snapshot,
//! on the kvm backend booted cold and on the qemu backend (`-accel kvm`),
//! image and initramfs cached, to the first output byte of `echo`: from the
//! call, and from the VM's start (issue 15: restored vs cold boot, target
//! <= 0.05x), with where each VM start's time went.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_images::initramfs::CpioWriter;
use kiln_tests::{harness, nested};

const MARKER: &str = "KILN-MARKER";
/// The kiln child's line with the exits that reached its VMM.
const KILN_EXITS: &str = "KILN-EXITS";
const MEMORY_MIB: u32 = 256;
const FIRECRACKER: &str = "/work/shared/tools/firecracker/firecracker-v1.16.1";

fn cmdline() -> String {
    let mut c = String::from(
        "console=ttyS0 reboot=k panic=1 pci=off quiet 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd",
    );
    if let Some(khz) = kiln_vmm::qemu::host_tsc_khz() {
        c.push_str(&format!(" tsc_early_khz={khz} lpj={}", khz * 4));
    }
    c
}

fn firecracker() -> Option<PathBuf> {
    std::env::var_os("KILN_FIRECRACKER")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from(FIRECRACKER)))
        .filter(|p| p.is_file())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--kiln-child") {
        kiln_child(&args[1..]);
        return;
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let rounds: usize = if smoke {
        1
    } else {
        args.iter().find_map(|a| a.parse().ok()).unwrap_or(3)
    };
    if kiln_vmm::probe_kvm().runs_unmodified_guests() {
        measure(rounds);
        return;
    }
    if nested::in_l1() {
        panic!(
            "inside L1 but /dev/kvm cannot run Linux: {}",
            kiln_vmm::probe_kvm().describe()
        );
    }
    if let Some(why) = nested::skip_reason() {
        println!(
            "SKIP nested_vmm: {} and no nested tier: {why}",
            kiln_vmm::probe_kvm().describe()
        );
        return;
    }
    // Run this bench inside an L1 VM with real KVM.
    let cfg = nested::default_config().expect("the L1 kernel and its KVM modules");
    let agent = harness::agent();
    let mut include = vec![agent.clone()];
    if let Some(fc) = firecracker() {
        include.push(fc);
    }
    if let Some(q) = nested::which(&harness::qemu_binary()) {
        include.push(q);
    }
    for f in [
        "bios-microvm.bin",
        "qboot.rom",
        "kvmvapic.bin",
        "linuxboot.bin",
        "linuxboot_dma.bin",
        "pvh.bin",
    ] {
        let p = Path::new("/usr/share/qemu").join(f);
        if p.exists() {
            include.push(p);
        }
    }
    let me = std::env::current_exe().unwrap();
    let mut argv = vec![me.to_string_lossy().to_string()];
    argv.push(rounds.to_string());
    let mut env = nested::l1_env(&agent);
    if let Some(fc) = firecracker() {
        env.push(("KILN_FIRECRACKER".into(), fc.to_string_lossy().into()));
    }
    println!("running inside an L1 VM (QEMU TCG emulating AMD-V); {rounds} round(s)");
    let report = nested::run(
        &cfg,
        &nested::Payload {
            argv,
            env,
            cwd: nested::L1_TEST_ROOT.into(),
            include,
        },
        &mut |l| println!("{l}"),
    )
    .expect("the nested tier ran");
    match report.outcome {
        nested::Outcome::Exited(0) => {}
        other => panic!("the bench failed inside L1: {other:?}"),
    }
}

/// A busybox initramfs whose `/init` prints the marker and its uptime.
fn marker_initramfs(to: &Path) {
    let busybox = kiln_tests::fixtures::busybox_path().expect("busybox-static");
    let f = std::fs::File::create(to).unwrap();
    let mut w = CpioWriter::new(std::io::BufWriter::new(f));
    for d in ["bin", "dev", "proc"] {
        w.dir(d, 0o755).unwrap();
    }
    w.char_dev("dev/console", 0o600, 5, 1).unwrap();
    w.file("bin/busybox", 0o755, &std::fs::read(busybox).unwrap())
        .unwrap();
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
         read up idle < /proc/uptime\necho \"{MARKER} $up\"\n/bin/busybox reboot -f\n"
    );
    w.file("init", 0o755, init.as_bytes()).unwrap();
    w.finish().unwrap().flush().unwrap();
}

/// The kiln side, in its own process like the other VMMs: start the VM
/// and copy its serial console to stdout as it arrives.
fn kiln_child(args: &[String]) {
    let [kernel, initrd, cmdline, run_dir] = args else {
        panic!("--kiln-child KERNEL INITRD CMDLINE RUN_DIR");
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = kiln_vmm::MachineConfig {
            kernel: kernel.into(),
            initramfs: initrd.into(),
            cmdline: cmdline.clone(),
            vcpus: 1,
            memory_mib: MEMORY_MIB,
            disks: vec![],
            console_port: "org.kiln.agent.0".into(),
            run_dir: run_dir.into(),
            serial_log_limit: 1 << 20,
            start_timeout: Duration::from_secs(10),
            qemu: kiln_vmm::QemuOptions::default(),
            isolation: Default::default(),
            test_forbidden_syscall: None,
            network: kiln_vmm::Network::None,
        };
        let kvm = kiln_vmm::probe_kvm();
        let (mut m, _console) = kiln_vmm::Machine::start(cfg, kiln_vmm::BackendKind::Kvm, &kvm)
            .await
            .expect("start the VM");
        let mut updates = m.serial_updates();
        let mut sent = 0usize;
        let mut pending: Vec<u8> = Vec::new();
        let mut told = false;
        let mut out = std::io::stdout();
        loop {
            let log = m.serial_log();
            if log.len() > sent {
                pending.extend_from_slice(&log[sent..]);
                sent = log.len();
                // Whole lines only, so the exit counts go out just before
                // the marker's line (the guest writes a byte per exit).
                while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=nl).collect();
                    if !told && line.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()) {
                        if let Some(s) = m.exit_stats() {
                            let _ = writeln!(out, "{KILN_EXITS} {}", s.summary(8));
                        }
                        told = true;
                    }
                    let _ = out.write_all(&line);
                }
                let _ = out.flush();
            }
            tokio::select! {
                r = updates.changed() => if r.is_err() { break },
                _ = m.wait() => break,
            }
        }
        let _ = m.destroy().await;
    });
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    to_marker: Duration,
    uptime: f64,
    exits: u64,
    vmm_rss_kib: u64,
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "start->marker {:7.2} s  guest uptime {:6.2} s  exits {:8}  VMM RSS besides guest {:6} KiB",
            self.to_marker.as_secs_f64(),
            self.uptime,
            self.exits,
            self.vmm_rss_kib
        )
    }
}

/// KVM's exit count for the VM of `pid` (debugfs; 0 if unavailable).
fn kvm_exits(pid: u32) -> u64 {
    let Ok(rd) = std::fs::read_dir("/sys/kernel/debug/kvm") else {
        return 0;
    };
    rd.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{pid}-"))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("exits")).ok())
        .filter_map(|s| s.trim().parse::<u64>().ok())
        .sum()
}

/// `pid` and its descendants (from `/proc/<pid>/task/*/children`).
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() && all.len() < 64 {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", all[i]));
        for t in tasks.into_iter().flatten().flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            all.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    all
}

/// RSS of `pid` besides its guest-RAM mapping (the anonymous mapping of at
/// least the guest's size), in KiB.
fn vmm_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut total, mut guest) = (0u64, 0u64);
    let mut size = 0u64;
    for l in smaps.lines() {
        let mut it = l.split_whitespace();
        match (it.next(), it.next()) {
            (Some("Size:"), Some(v)) => size = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) => {
                let rss: u64 = v.parse().unwrap_or(0);
                total += rss;
                if size >= u64::from(MEMORY_MIB) * 1024 {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    total - guest
}

/// How long a VMM may take to print the marker (about 10-15 s in L1).
const MARKER_TIMEOUT: Duration = Duration::from_secs(180);

/// Spawn `cmd`, wait for the marker on its stdout (at most
/// [`MARKER_TIMEOUT`]), measure, kill it.
fn run_vmm(mut cmd: Command) -> Result<Sample, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn the VMM");
    let pid = child.id();
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let sample = loop {
        let left = MARKER_TIMEOUT.saturating_sub(t0.elapsed());
        match lines.recv_timeout(left) {
            Ok(Ok(l)) => {
                if let Some(rest) = l.trim_end_matches('\r').split(MARKER).nth(1) {
                    let to_marker = t0.elapsed();
                    break Sample {
                        to_marker,
                        uptime: rest.trim().parse().unwrap_or(0.0),
                        // kiln's kvm backend runs the VM in a `kiln-vmm`
                        // child process: KVM's exits of the whole process
                        // tree, and the RSS of the process that runs the VM
                        // (the tree's last one: the VMM, not kiln itself).
                        exits: tree(pid).into_iter().map(kvm_exits).sum(),
                        vmm_rss_kib: tree(pid).last().map_or(0, |&p| vmm_rss_kib(p)),
                    };
                }
                if let Some(x) = l.strip_prefix(KILN_EXITS) {
                    println!("  kiln VMM exits up to the marker: {}", x.trim());
                }
                if seen.len() < 200 {
                    seen.push(l);
                }
            }
            end => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                let why = match end {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        format!("no marker in {MARKER_TIMEOUT:?}")
                    }
                    _ => "no marker before its output ended".into(),
                };
                return Err(format!(
                    "{cmd:?}: {why}; console: {}\nstderr: {}",
                    seen.join("\n"),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    Ok(sample)
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn measure(rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = harness::kernel();
    let initrd = dir.path().join("marker.cpio");
    marker_initramfs(&initrd);
    let cmdline = cmdline();
    let cpu = kiln_vmm::cpu_virt();
    let nested_tcg = cpu.hypervisor.as_deref() == Some("TCGTCGTCGTCG");
    println!(
        "kernel {} · marker initramfs {} KiB · 1 vCPU · {MEMORY_MIB} MiB · {}",
        kernel.release,
        std::fs::metadata(&initrd).unwrap().len() / 1024,
        cpu.describe()
    );
    if nested_tcg {
        println!("NOTE: nested under TCG, not hardware figures: compare the ratios only");
    }
    let me = std::env::current_exe().unwrap();
    let fc = firecracker();
    let qemu = harness::qemu_binary();
    let have_qemu = Command::new(&qemu).arg("--version").output().is_ok();
    let mut results: Vec<(&str, Vec<Sample>)> = vec![("kiln", vec![])];
    if fc.is_some() {
        results.push(("firecracker", vec![]));
    } else {
        println!("SKIP firecracker: not found at {FIRECRACKER} (set KILN_FIRECRACKER)");
    }
    if have_qemu {
        results.push(("qemu", vec![]));
    }
    for round in 0..rounds {
        for (name, samples) in results.iter_mut() {
            let build = |attempt: u32| match *name {
                "kiln" => {
                    let mut c = Command::new(&me);
                    c.arg("--kiln-child")
                        .arg(&kernel.image)
                        .arg(&initrd)
                        .arg(&cmdline)
                        .arg(dir.path().join(format!("kiln-{round}-{attempt}")));
                    c
                }
                "firecracker" => {
                    let cfg = dir.path().join("fc.json");
                    let json = serde_json::json!({
                        "boot-source": {
                            "kernel_image_path": kernel.image,
                            "initrd_path": initrd,
                            "boot_args": cmdline,
                        },
                        "drives": [],
                        "machine-config": { "vcpu_count": 1, "mem_size_mib": MEMORY_MIB, "smt": false },
                    });
                    std::fs::write(&cfg, json.to_string()).unwrap();
                    let mut c = Command::new(fc.as_ref().unwrap());
                    c.args(["--no-api", "--config-file"]).arg(&cfg);
                    c
                }
                _ => {
                    let mut c = Command::new(&qemu);
                    c.args(["-M", "microvm,acpi=on", "-accel", "kvm", "-cpu", "host"])
                        .args(["-smp", "1", "-m", &format!("{MEMORY_MIB}M")])
                        .args(["-nodefaults", "-no-user-config", "-display", "none"])
                        .args(["-no-reboot", "-serial", "stdio"])
                        .arg("-kernel")
                        .arg(&kernel.image)
                        .arg("-initrd")
                        .arg(&initrd)
                        .args(["-append", &cmdline]);
                    c
                }
            };
            // A guest that never prints the marker (nested under TCG, a
            // boot has hung once in CI) gets one more try, then fails the
            // bench: never the L1's whole time limit.
            let s = run_vmm(build(0))
                .or_else(|why| {
                    println!("round {round} {name}: {why}; once more");
                    run_vmm(build(1))
                })
                .unwrap_or_else(|why| panic!("round {round} {name}: {why}"));
            println!("round {round} {name:12} {s}");
            samples.push(s);
        }
    }
    let med = |s: &[Sample]| Sample {
        to_marker: median(s.iter().map(|x| x.to_marker).collect()),
        uptime: median(s.iter().map(|x| x.uptime).collect()),
        exits: median(s.iter().map(|x| x.exits).collect()),
        vmm_rss_kib: median(s.iter().map(|x| x.vmm_rss_kib).collect()),
    };
    let kiln = med(&results[0].1);
    for (name, samples) in &results {
        let m = med(samples);
        println!("median {name:12} {m}  (of {})", samples.len());
        if *name != "kiln" {
            println!(
                "ratio kiln/{name}: start->marker {:.2}x{}  guest uptime {:.2}x  exits {:.2}x  VMM RSS {:.2}x",
                kiln.to_marker.as_secs_f64() / m.to_marker.as_secs_f64(),
                if *name == "firecracker" { " (target <= 1.0)" } else { "" },
                kiln.uptime / m.uptime.max(1e-3),
                kiln.exits as f64 / m.exits.max(1) as f64,
                kiln.vmm_rss_kib as f64 / m.vmm_rss_kib.max(1) as f64
            );
        }
    }
    if have_qemu {
        first_output(rounds, &cpu);
    }
}

/// kiln's kvm backend from a snapshot, booted cold (`snapshots = false`)
/// and its qemu backend (QEMU with KVM), through the executor, to the first
/// byte of a job's output: from the call (image cached) and from the VM's
/// start (after the image, kernel and disks are prepared: what a snapshot
/// can save). Round 0 fills the image cache and takes the kvm profile's
/// snapshot (its breakdown is printed, not counted).
fn first_output(rounds: usize, cpu: &kiln_vmm::CpuVirt) {
    use kiln::joblog::BufferSink;
    use kiln_pipelines::{JobSpec, Step};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let image = harness::busybox_image();
    let job = JobSpec::single(
        "bench",
        image.to_string_lossy(),
        Step::script("s", "echo first"),
    );
    let run_dir = harness::run_dir("bench-first-output");
    // (name, backend, snapshots, from the call, from the VM's start)
    type Row = (
        &'static str,
        kiln_vmm::BackendKind,
        bool,
        Vec<Duration>,
        Vec<Duration>,
    );
    let mut times: Vec<Row> = vec![
        (
            "kvm snapshot",
            kiln_vmm::BackendKind::Kvm,
            true,
            vec![],
            vec![],
        ),
        (
            "kvm cold",
            kiln_vmm::BackendKind::Kvm,
            false,
            vec![],
            vec![],
        ),
        ("qemu", kiln_vmm::BackendKind::Qemu, false, vec![], vec![]),
    ];
    rt.block_on(async {
        for round in 0..=rounds {
            for (name, backend, snapshots, call, vm) in times.iter_mut() {
                // Round 0 is only for the cache and the snapshot.
                if round == 0 && !*snapshots {
                    continue;
                }
                let mut cfg = harness::config(&run_dir);
                cfg.backend = *backend;
                cfg.snapshots = *snapshots;
                let ex = kiln::Executor::new(cfg).unwrap();
                let (_tx, rx) = tokio::sync::watch::channel(None);
                let mut sink = BufferSink::default();
                let t0 = Instant::now();
                let r = ex.run(&job, &mut sink, rx).await;
                assert!(r.success(), "{name}: {r:?}");
                let first = sink.first_output.expect("output") - t0;
                let from_vm = first.saturating_sub(Duration::from_millis(r.prepare_ms));
                println!(
                    "round {round} {name:12} first output {:7.2} s, from the VM's start {:7.2} s ({}){}",
                    first.as_secs_f64(),
                    from_vm.as_secs_f64(),
                    r.backend,
                    if round == 0 { " [not counted]" } else { "" }
                );
                println!("  boot: {}", r.describe_boot());
                if round > 0 {
                    call.push(first);
                    vm.push(from_vm);
                }
            }
        }
    });
    let secs = |v: &Vec<Duration>| median(v.clone()).as_secs_f64();
    let (snap, cold, qemu) = (&times[0], &times[1], &times[2]);
    println!(
        "first job output from the VM's start: kvm from a snapshot {:.2} s, kvm cold boot {:.2} s: \
         ratio {:.3}x (target <= 0.05) [{}]",
        secs(&snap.4),
        secs(&cold.4),
        secs(&snap.4) / secs(&cold.4),
        cpu.describe()
    );
    println!(
        "first job output from the call: kvm from a snapshot {:.2} s, kvm cold boot {:.2} s ({:.3}x), \
         kiln qemu (QEMU -accel kvm) {:.2} s: kvm/qemu ratio {:.2}x (target <= 0.8)",
        secs(&snap.3),
        secs(&cold.3),
        secs(&snap.3) / secs(&cold.3),
        secs(&qemu.3),
        secs(&snap.3) / secs(&qemu.3),
    );
    let _ = std::fs::remove_dir_all(&run_dir);
}
