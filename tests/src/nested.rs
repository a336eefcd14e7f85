//! The nested-KVM tier: run a program inside an L1 VM whose `/dev/kvm` is
//! real Linux KVM, on hosts that have none.
//!
//! QEMU's TCG emulates AMD-V (SVM with nested paging) for `-cpu max`, so an
//! L1 VM booted under TCG on the Debian cloud kernel kiln already uses can
//! load `irqbypass`, `kvm` and `kvm_amd` and offer a real `/dev/kvm` to the
//! programs inside it. That is where the kvm backend boots stock Linux when
//! the host's own `/dev/kvm` cannot (nested PVM) or does not exist.
//!
//! L1 is `qemu-system-x86_64 -M microvm,acpi=on -accel tcg -cpu max` with
//! one initramfs holding everything it runs, at the same absolute paths as
//! on the host: busybox (the L1's `/init` and shell), the KVM modules, the
//! program with every ELF's shared libraries (`ldd`), the tools kiln calls
//! (`mkfs.ext4`, `mkfs.erofs`), the guest agent, and the cached guest kernel
//! under a fresh test root. Its root filesystem is in memory and writable;
//! nothing of the host is mounted. The program's stdout and stderr go to
//! L1's serial console, which QEMU hands to us line by line; its exit
//! status comes back as a marker line.
//!
//! L1 itself needs `tsc_early_khz`/`lpj` on its command line (as kiln's qemu
//! backend passes under TCG) or it stalls calibrating its TSC.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_images::initramfs::CpioWriter;
use kiln_images::{Cache, Kernel};

/// Where the test root is inside L1 (tmpfs-backed, writable).
pub const L1_TEST_ROOT: &str = "/tmp/kiln-tests";
/// Set for the program run inside L1.
pub const IN_L1_ENV: &str = "KILN_NESTED_L1";

const MARK_READY: &str = "KILN-L1-READY ";
const MARK_RUN: &str = "KILN-L1-RUN";
const MARK_NOKVM: &str = "KILN-L1-NOKVM";
const MARK_EXIT: &str = "KILN-L1-EXIT ";

/// Are we the program running inside an L1 VM?
pub fn in_l1() -> bool {
    std::env::var_os(IN_L1_ENV).is_some()
}

/// The environment a program in L1 gets: the agent, a writable test root
/// and cache (holding the cached guest kernel), and [`IN_L1_ENV`].
pub fn l1_env(agent: &Path) -> Vec<(String, String)> {
    let root = L1_TEST_ROOT;
    vec![
        (IN_L1_ENV.into(), "1".into()),
        ("KILN_AGENT".into(), agent.to_string_lossy().into()),
        ("KILN_TEST_ROOT".into(), root.into()),
        ("KILN_CACHE_DIR".into(), format!("{root}/cache")),
        ("KILN_RUN_DIR".into(), format!("{root}/run-cli")),
        ("XDG_STATE_HOME".into(), format!("{root}/state")),
        ("HOME".into(), "/tmp".into()),
        ("RUST_BACKTRACE".into(), "1".into()),
    ]
}

/// How to boot L1.
#[derive(Debug, Clone)]
pub struct L1Config {
    /// The L1 kernel (a vmlinux with a PVH note): also what L2 guests boot.
    pub kernel: Kernel,
    /// `irqbypass.ko`, `kvm.ko`, `kvm-amd.ko`, dependencies first.
    pub kvm_modules: Vec<PathBuf>,
    /// What kiln's networks and the network lab need in L1 (TAP, veth,
    /// nf_tables for `iptables-nft`, ...), loaded after the KVM modules.
    pub net_modules: Vec<PathBuf>,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The whole run, boot included; L1 is killed past it.
    pub timeout: Duration,
}

/// What runs inside L1.
#[derive(Debug, Clone, Default)]
pub struct Payload {
    /// Program (an absolute path or a name on `PATH`) and its arguments.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Working directory inside L1 (created).
    pub cwd: PathBuf,
    /// More files or directories to copy, at the same path (ELF files get
    /// their shared libraries too).
    pub include: Vec<PathBuf>,
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The program ran; its exit status.
    Exited(i32),
    /// L1 booted but offered no `/dev/kvm` (no SVM emulation?): why.
    NoKvm(String),
}

#[derive(Debug, Clone)]
pub struct Report {
    pub outcome: Outcome,
    /// Time to write L1's initramfs.
    pub build: Duration,
    /// Host time from starting QEMU to L1's init running.
    pub l1_boot: Option<Duration>,
    /// From L1's init running to the program starting (modules loaded).
    pub setup: Option<Duration>,
    /// The program's run, start to exit status.
    pub program: Option<Duration>,
    /// From the exit status to QEMU gone.
    pub shutdown: Duration,
    /// L1's own uptime when its init ran.
    pub l1_uptime_at_init: Option<f64>,
    pub total: Duration,
    /// Size of the L1 initramfs in bytes.
    pub initramfs_bytes: u64,
}

/// Why this host cannot run the nested tier, if it cannot.
pub fn skip_reason() -> Option<String> {
    if std::env::consts::ARCH != "x86_64" {
        return Some(format!(
            "the nested tier needs an x86_64 host (this is {})",
            std::env::consts::ARCH
        ));
    }
    let qemu = crate::harness::qemu_binary();
    let Ok(out) = Command::new(&qemu).args(["-cpu", "help"]).output() else {
        return Some(format!(
            "{qemu} is not installed (apt-get install qemu-system-x86)"
        ));
    };
    if !String::from_utf8_lossy(&out.stdout).contains(" max ") {
        return Some(format!(
            "{qemu} has no 'max' CPU model, which carries TCG's SVM emulation"
        ));
    }
    let accel = Command::new(&qemu)
        .args(["-accel", "help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    if !accel.lines().any(|l| l.trim() == "tcg") {
        return Some(format!("{qemu} was built without TCG"));
    }
    if crate::fixtures::busybox_path().is_err() {
        return Some("busybox-static is not installed (L1's init and shell)".into());
    }
    None
}

/// The L1 configuration for the test cache's kernel, fetching its KVM
/// modules into the cache when they are missing.
pub fn default_config() -> Result<L1Config> {
    let kernel = crate::harness::kernel();
    let cache = Cache::open(crate::harness::cache_dir())?;
    let kvm_modules = kiln_images::kernel::fetch_kvm_modules(&cache, &kernel)
        .context("keeping the kernel's KVM modules (irqbypass, kvm, kvm-amd)")?;
    let net_modules = kiln_images::kernel::fetch_l1_net_modules(&cache, &kernel)
        .context("keeping the kernel's network modules (tun, veth, nf_tables, ...)")?;
    Ok(L1Config {
        kernel,
        kvm_modules,
        net_modules,
        memory_mib: 3072,
        vcpus: 1,
        timeout: Duration::from_secs(1200),
    })
}

/// Kills and reaps QEMU on every exit path.
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boot L1, run `payload` in it, and hand every line it prints (without
/// the line end) to `line`. Returns when the program ended and L1 is gone.
pub fn run(cfg: &L1Config, payload: &Payload, line: &mut dyn FnMut(&str)) -> Result<Report> {
    let t0 = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("kiln-nested-")
        .tempdir()
        .context("creating a temporary directory for L1")?;
    let initrd = work.path().join("l1.cpio");
    let initramfs_bytes = build_initramfs(cfg, payload, &initrd)?;
    let build = t0.elapsed();
    let khz = kiln_vmm::qemu::host_tsc_khz().unwrap_or(0);
    let mut cmdline = String::from(
        "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 pci=off quiet loglevel=3 rdinit=/init",
    );
    if khz > 0 {
        cmdline.push_str(&format!(" tsc_early_khz={khz} lpj={}", khz * 4));
    }
    let qemu = crate::harness::qemu_binary();
    let mut cmd = Command::new(&qemu);
    cmd.args([
        "-M",
        "microvm,acpi=on,rtc=on",
        "-accel",
        "tcg",
        "-cpu",
        "max",
    ])
    .args(["-smp", &cfg.vcpus.to_string()])
    .args(["-m", &format!("{}M", cfg.memory_mib)])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args([
        "-chardev",
        "stdio,id=serial0,signal=off",
        "-serial",
        "chardev:serial0",
    ])
    .arg("-kernel")
    .arg(&cfg.kernel.image)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", &cmdline])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = QemuGuard(
        cmd.spawn()
            .with_context(|| format!("starting {qemu} (apt-get install qemu-system-x86)"))?,
    );
    let stdout = child.0.stdout.take().context("QEMU's stdout")?;
    let mut stderr = child.0.stderr.take().context("QEMU's stderr")?;
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.by_ref().take(64 * 1024).read_to_end(&mut s);
        String::from_utf8_lossy(&s).to_string()
    });
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            // Bounded: a line longer than 1 MiB is cut.
            match r.by_ref().take(1 << 20).read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let s = String::from_utf8_lossy(&buf);
                    let s = s.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send((Instant::now(), s)).is_err() {
                        return;
                    }
                }
            }
        }
    });

    let deadline = started + cfg.timeout;
    let mut l1_boot = None;
    let mut l1_uptime = None;
    let mut program_start = None;
    let mut program = None;
    let mut outcome = None;
    let mut nokvm: Option<Vec<String>> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, l)) => {
                if let Some(up) = l.strip_prefix(MARK_READY) {
                    l1_boot = Some(at - started);
                    l1_uptime = up.trim().parse().ok();
                } else if l.starts_with(MARK_RUN) {
                    program_start = Some(at);
                } else if l.starts_with(MARK_NOKVM) {
                    nokvm = Some(Vec::new());
                } else if let Some(code) = l.strip_prefix(MARK_EXIT) {
                    let code: i32 = code.trim().parse().unwrap_or(-1);
                    program = program_start.map(|p| at - p);
                    outcome = Some(match nokvm.take() {
                        Some(why) => Outcome::NoKvm(why.join("\n")),
                        None => Outcome::Exited(code),
                    });
                    break;
                } else if let Some(why) = nokvm.as_mut() {
                    why.push(l);
                } else {
                    line(&l);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("L1 did not finish within {:?}; killed it", cfg.timeout);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // L1 powers off after the marker; give it a moment, then kill it.
    let exited = Instant::now();
    let end = exited + Duration::from_secs(20);
    while Instant::now() < end {
        if child.0.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(child);
    let shutdown = exited.elapsed();
    let qemu_err = err_thread.join().unwrap_or_default();
    let Some(outcome) = outcome else {
        bail!(
            "L1 ended without reporting the program's exit status; QEMU said: {}",
            qemu_err.trim()
        );
    };
    let setup = match (l1_boot, program_start) {
        (Some(b), Some(p)) => Some(p - started - b),
        _ => None,
    };
    Ok(Report {
        outcome,
        build,
        l1_boot,
        setup,
        program,
        shutdown,
        l1_uptime_at_init: l1_uptime,
        total: t0.elapsed(),
        initramfs_bytes,
    })
}

/// Network tools copied into L1 when the host has them.
const NET_TOOLS: &[&str] = &["ip", "iptables", "iptables-save", "passt"];
/// Where iptables finds its extensions.
const XTABLES_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/xtables",
    "/usr/lib/xtables",
    "/usr/lib64/xtables",
];

/// `'...'` for sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The L1's `/init`.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s /bin
# The initramfs (rootfs) cannot be pivoted out of, which passt's sandbox
# and the kvm backend's jail do: move everything onto a tmpfs and switch
# root to it first.
if [ ! -e /.kiln-l1-switched ]; then
  mkdir -p /newroot
  mount -t tmpfs -o size=95% tmpfs /newroot
  for d in /*; do
    case "$d" in /proc|/sys|/dev|/newroot) ;; *) cp -a "$d" /newroot/ ;; esac
  done
  mkdir -p /newroot/proc /newroot/sys /newroot/dev
  : > /newroot/.kiln-l1-switched
  exec switch_root /newroot /init
fi
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
# cgroup v2, as a host runs with it: the VMM jail puts each VM in one.
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
echo "{MARK_READY}$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /kiln-l1/modules/order); do
  insmod /kiln-l1/modules/$m || echo "kiln-l1: insmod $m failed"
done
if [ ! -c /dev/kvm ]; then
  echo "{MARK_NOKVM}"
  grep -c -w svm /proc/cpuinfo | sed 's/^/cpus with svm: /'
  dmesg | grep -i -E 'kvm|svm' | tail -n 8
  echo "{MARK_EXIT}125"
  poweroff -f
fi
echo 1 > /proc/sys/kernel/printk
echo "{MARK_RUN}"
sh /kiln-l1/run.sh </dev/null
echo "{MARK_EXIT}$?"
sync
poweroff -f
"#
    )
}

fn run_script(p: &Payload, program: &Path) -> String {
    let mut s = String::from("#!/bin/sh\n");
    for (k, v) in &p.env {
        s.push_str(&format!("export {k}={}\n", sh_quote(v)));
    }
    s.push_str(&format!(
        "mkdir -p {0} && cd {0} || exit 125\n",
        sh_quote(&p.cwd.to_string_lossy())
    ));
    s.push_str("exec");
    s.push_str(&format!(" {}", sh_quote(&program.to_string_lossy())));
    for a in p.argv.iter().skip(1) {
        s.push_str(&format!(" {}", sh_quote(a)));
    }
    s.push_str(" 2>&1\n");
    s
}

/// `name` on `PATH`, or the path itself.
pub fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The files the L1 initramfs holds, by their path inside L1.
struct Files {
    /// L1 path → host file (read at write time).
    files: std::collections::BTreeMap<PathBuf, PathBuf>,
    /// Hosts files already scanned for libraries.
    seen_elf: BTreeSet<PathBuf>,
}

impl Report {
    /// One line: where the time went.
    pub fn timing(&self) -> String {
        let s = |d: Option<Duration>| d.map_or("?".into(), |d| format!("{:.1} s", d.as_secs_f64()));
        format!(
            "initramfs {} MiB built in {:.1} s, L1 init after {}, modules {}, program {}, \
             power-off {:.1} s, total {:.1} s",
            self.initramfs_bytes >> 20,
            self.build.as_secs_f64(),
            s(self.l1_boot),
            s(self.setup),
            s(self.program),
            self.shutdown.as_secs_f64(),
            self.total.as_secs_f64()
        )
    }
}

impl Files {
    fn new() -> Files {
        Files {
            files: Default::default(),
            seen_elf: Default::default(),
        }
    }

    /// Add `host` at `at`; ELF files bring their shared libraries.
    fn add(&mut self, at: &Path, host: &Path) -> Result<()> {
        let meta = std::fs::metadata(host).with_context(|| format!("{}", host.display()))?;
        if meta.is_dir() {
            for e in std::fs::read_dir(host).with_context(|| format!("{}", host.display()))? {
                let e = e?;
                self.add(&at.join(e.file_name()), &e.path())?;
            }
            return Ok(());
        }
        self.files.insert(at.to_path_buf(), host.to_path_buf());
        self.add_libs(host)
    }

    /// Add an executable found on the host's `PATH` under the name it was
    /// asked by (mke2fs behaves by the name it is called by).
    fn add_tool(&mut self, name: &str) -> Result<bool> {
        let Some(p) = which(name) else {
            return Ok(false);
        };
        let real = std::fs::canonicalize(&p)?;
        let dir = real.parent().unwrap_or(Path::new("/usr/bin"));
        self.add(&dir.join(p.file_name().unwrap_or_default()), &real)?;
        Ok(true)
    }

    fn add_libs(&mut self, host: &Path) -> Result<()> {
        let mut head = [0u8; 4];
        let is_elf = std::fs::File::open(host)
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok()
            && &head == b"\x7fELF";
        if !is_elf || !self.seen_elf.insert(host.to_path_buf()) {
            return Ok(());
        }
        let out = Command::new("ldd").arg(host).output();
        let Ok(out) = out else {
            return Ok(()); // no ldd: static binaries only
        };
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match l.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next(),
                None => l.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                let p = PathBuf::from(p);
                if !self.files.contains_key(&p) {
                    let real = std::fs::canonicalize(&p)?;
                    self.files.insert(p.clone(), real.clone());
                    self.add_libs(&real)?;
                }
            }
        }
        Ok(())
    }
}

/// Write L1's initramfs; returns its size.
fn build_initramfs(cfg: &L1Config, p: &Payload, to: &Path) -> Result<u64> {
    let program = p.argv.first().and_then(|a| which(a)).with_context(|| {
        format!(
            "the program to run in L1 ({:?}) was not found",
            p.argv.first()
        )
    })?;
    let program = std::path::absolute(&program)?;
    let mut f = Files::new();
    f.add(&program, &program)?;
    // The kvm backend runs each VM in kiln-vmm, found next to the program
    // or one directory up (test binaries live in target/*/deps). Under
    // cargo, one built now in the program's profile goes next to it: a
    // `kiln-vmm` an older build left in `target/release` speaks another
    // protocol version, and a fresh clone has none there (`cargo bench`
    // failed so). Elsewhere (L1's own payload) the one found is taken.
    let dir = program.parent();
    match (dir, std::env::var_os("CARGO").is_some()) {
        (Some(dir), true) => {
            let profile = dir
                .parent()
                .filter(|_| dir.ends_with("deps"))
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().to_string());
            let release = profile.as_deref() == Some("release");
            let mut args = vec!["-p", "kiln-vmm", "--bin", "kiln-vmm"];
            if release {
                args.push("--release");
            }
            let target = crate::harness::cargo_build(&args, "building kiln-vmm failed");
            let fresh = target
                .join(if release { "release" } else { "debug" })
                .join("kiln-vmm");
            f.files.insert(dir.join("kiln-vmm"), fresh);
        }
        _ => {
            for d in [dir, dir.and_then(Path::parent)].into_iter().flatten() {
                let vmm = d.join("kiln-vmm");
                if vmm.is_file() {
                    f.add(&vmm, &vmm)?;
                }
            }
        }
    }
    let busybox = crate::fixtures::busybox_path()?;
    f.files.insert("/bin/busybox".into(), busybox.clone());
    if busybox != Path::new("/bin/busybox") {
        f.files.insert(busybox.clone(), busybox.clone());
    }
    for tool in ["mkfs.ext4", "mke2fs", "mkfs.erofs"] {
        f.add_tool(tool)?;
    }
    // Jobs' networks (`nat`: `ip`, `iptables`; `user`: passt) and the
    // network lab (`ip netns`, `iptables-save`), where the host has them;
    // iptables loads its extensions from `xtables/` (not in `ldd`).
    for tool in NET_TOOLS {
        f.add_tool(tool)?;
    }
    for dir in XTABLES_DIRS {
        if Path::new(dir).is_dir() {
            f.add(Path::new(dir), Path::new(dir))?;
        }
    }
    if Path::new("/etc/mke2fs.conf").is_file() {
        f.add(Path::new("/etc/mke2fs.conf"), Path::new("/etc/mke2fs.conf"))?;
    }
    // The cached guest kernel, inside the L1 test root's cache.
    let kdir = cfg
        .kernel
        .image
        .parent()
        .context("the kernel is not in a cache directory")?;
    let kname = kdir.file_name().context("kernel directory name")?;
    let l1_kdir = Path::new(L1_TEST_ROOT).join("cache/kernels").join(kname);
    f.add(&l1_kdir.join("vmlinux"), &cfg.kernel.image)?;
    f.add(&l1_kdir.join("kernel.json"), &kdir.join("kernel.json"))?;
    f.add(&l1_kdir.join("modules"), &kdir.join("modules"))?;
    for inc in &p.include {
        let inc = std::path::absolute(inc)?;
        f.add(&inc, &inc)?;
    }

    let out = std::fs::File::create(to).with_context(|| format!("{}", to.display()))?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(out));
    let mut dirs = BTreeSet::new();
    let mut mkdirs = |w: &mut CpioWriter<_>, path: &Path| -> std::io::Result<()> {
        let mut acc = PathBuf::from("/");
        if let Some(parent) = path.parent() {
            for c in parent.components().skip(1) {
                acc.push(c);
                let name = acc.to_string_lossy()[1..].to_string();
                if dirs.insert(name.clone()) {
                    w.dir(&name, 0o755)?;
                }
            }
        }
        Ok(())
    };
    for d in ["dev", "proc", "sys", "tmp", "run", "kiln-l1/modules"] {
        mkdirs(&mut w, &Path::new("/").join(d).join("x"))?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("init", 0o755, init_script().as_bytes())?;
    w.file("kiln-l1/run.sh", 0o755, run_script(p, &program).as_bytes())?;
    let mut order = String::new();
    for m in cfg.kvm_modules.iter().chain(&cfg.net_modules) {
        let name = m
            .file_name()
            .context("module file name")?
            .to_string_lossy()
            .to_string();
        let data = std::fs::read(m).with_context(|| format!("{}", m.display()))?;
        w.file(&format!("kiln-l1/modules/{name}"), 0o644, &data)?;
        order.push_str(&name);
        order.push('\n');
    }
    w.file("kiln-l1/modules/order", 0o644, order.as_bytes())?;
    for (at, host) in &f.files {
        mkdirs(&mut w, at)?;
        let data = std::fs::read(host).with_context(|| format!("{}", host.display()))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(host)?.permissions());
        let name = at.to_string_lossy()[1..].to_string();
        w.file(&name, mode & 0o7777, &data)?;
    }
    let mut out = w.finish()?;
    out.flush()?;
    Ok(std::fs::metadata(to)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_script_quotes_everything() {
        let p = Payload {
            argv: vec!["/bin/prog".into(), "a b".into(), "it's".into()],
            env: vec![("X".into(), "1 2".into())],
            cwd: "/w d".into(),
            include: vec![],
        };
        let s = run_script(&p, Path::new("/bin/prog"));
        assert!(s.contains("export X='1 2'\n"), "{s}");
        assert!(s.contains("cd '/w d'"), "{s}");
        assert!(s.contains("exec '/bin/prog' 'a b' 'it'\\''s' 2>&1"), "{s}");
    }
}
