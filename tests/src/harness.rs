//! Shared set-up for tests that boot VMs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use kiln::{Executor, ExecutorConfig};
use kiln_images::{Cache, Kernel};
use kiln_testkit::Need;
use kiln_vmm::BackendKind;

use crate::fixtures::BusyboxImage;

/// `target/kiln-tests`: a cache shared by every test run (kernel, initramfs,
/// root filesystems), so only the first run pays for them. `KILN_TEST_ROOT`
/// puts it elsewhere (the nested tier's L1 uses a tmpfs).
pub fn test_root() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_TEST_ROOT") {
        let d = PathBuf::from(d);
        std::fs::create_dir_all(&d).expect("create $KILN_TEST_ROOT");
        return d;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root")
                .join("target")
        });
    let d = target.join("kiln-tests");
    std::fs::create_dir_all(&d).expect("create target/kiln-tests");
    d
}

/// The QEMU the tests run: `KILN_QEMU` (read here, the tests' edge, as
/// the runner reads it at its own), else `kiln_vmm`'s default.
pub fn qemu_binary() -> String {
    kiln_vmm::QemuOptions::new(std::env::var_os("KILN_QEMU"))
        .binary
        .to_string_lossy()
        .into_owned()
}

/// QEMU, which runs every Linux VM on a host without hardware KVM.
pub fn qemu() -> Need {
    Need::custom("qemu", || {
        let bin = qemu_binary();
        match Command::new(&bin).arg("--version").output() {
            Ok(o) if o.status.success() => Ok(()),
            _ => Err(format!(
                "{bin} does not run (apt-get install qemu-system-x86, or run scripts/setup.sh)"
            )),
        }
    })
}

/// A static busybox, the fixture image's only program.
pub fn busybox() -> Need {
    Need::custom("busybox", || {
        crate::fixtures::busybox_path()
            .map(|_| ())
            .map_err(|e| format!("busybox-static is not installed: {e}"))
    })
}

/// Everything a test that boots a Linux VM needs.
pub fn vm() -> [Need; 2] {
    [qemu(), busybox()]
}

/// Why VM tests cannot run here, if they cannot.
pub fn vm_skip_reason() -> Option<String> {
    vm().iter().find_map(Need::unmet)
}

/// A host whose KVM runs unmodified guests (VT-x/AMD-V, or an L1 VM with
/// nested SVM), where the kvm backend can boot Linux.
pub fn hardware_kvm() -> Need {
    Need::custom("hardware-kvm", || {
        let kvm = kiln_vmm::probe_kvm();
        if kvm.runs_unmodified_guests() {
            Ok(())
        } else {
            Err(format!(
                "the kvm backend cannot boot Linux here: {}",
                kvm.describe()
            ))
        }
    })
}

/// The guest agent, built for musl once per test run; `KILN_AGENT` names a
/// prebuilt one instead (as it does for `kiln`).
pub fn agent() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("KILN_AGENT") {
                return PathBuf::from(p);
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let root = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root");
            let st = Command::new(cargo)
                .args([
                    "build",
                    "-q",
                    "-p",
                    "kiln-agent",
                    "--target",
                    "x86_64-unknown-linux-musl",
                    "--profile",
                    "agent",
                ])
                .current_dir(root)
                .status()
                .expect("run cargo to build the agent");
            assert!(
                st.success(),
                "building the agent failed (rustup target add x86_64-unknown-linux-musl)"
            );
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            target.join("x86_64-unknown-linux-musl/agent/kiln-agent")
        })
        .clone()
}

pub fn cache_dir() -> PathBuf {
    test_root().join("cache")
}

/// The default guest kernel, from the test cache (`scripts/setup.sh`).
pub fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    K.get_or_init(|| {
        // Tests never download: scripts/setup.sh fetches the kernel into
        // the test cache beforehand.
        let cache = Cache::open(cache_dir()).expect("open the test cache");
        Kernel::cached(&cache)
            .into_iter()
            .next()
            .unwrap_or_else(|| {
                panic!(
                    "no guest kernel in the test cache {}: run scripts/setup.sh \
                 (it runs KILN_CACHE_DIR=<that dir> kiln kernel fetch)",
                    cache_dir().display()
                )
            })
    })
    .clone()
}

/// The busybox fixture image (built once per run).
pub fn busybox_image() -> PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let dir = test_root().join(format!("busybox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        BusyboxImage::default()
            .build(&dir)
            .expect("build the busybox fixture");
        let d = dir.clone();
        kiln_testkit::at_exit(move || {
            let _ = std::fs::remove_dir_all(d);
        });
        dir
    })
    .clone()
}

/// A fresh, unique per-test run directory.
pub fn run_dir(name: &str) -> PathBuf {
    let d = test_root()
        .join("run")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create the run dir");
    d
}

/// The backend VM tests use: `KILN_TEST_BACKEND` (auto, kvm or qemu),
/// default auto.
pub fn backend() -> BackendKind {
    match std::env::var("KILN_TEST_BACKEND") {
        Ok(b) => b
            .parse()
            .unwrap_or_else(|e| panic!("KILN_TEST_BACKEND: {e}")),
        Err(_) => BackendKind::Auto,
    }
}

pub fn config(run_dir: &Path) -> ExecutorConfig {
    ExecutorConfig::builder(cache_dir(), run_dir)
        .agent(agent())
        .kernel(kernel())
        .backend(backend())
        .vcpus(1)
        .memory_mib(512)
        .disk_gib(4)
        .boot_timeout(Duration::from_secs(90))
        .default_job_timeout(Duration::from_secs(300))
        .log_dir(test_root().join("logs"))
        .qemu(kiln_vmm::QemuOptions::new(Some(qemu_binary())))
        .build()
        .expect("the test executor's configuration")
}

pub fn executor(run_dir: &Path) -> Executor {
    Executor::new(config(run_dir)).expect("create the executor")
}

/// QEMU processes whose command line mentions `dir`.
pub fn qemu_processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            found.push(pid);
        }
    }
    found
}

/// Assert that no VM process and no per-VM file is left under `run_dir`.
pub fn assert_no_leaks(run_dir: &Path) {
    // A killed process may take a moment to be reaped.
    for _ in 0..50 {
        if qemu_processes_under(run_dir).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        qemu_processes_under(run_dir),
        Vec::<u32>::new(),
        "QEMU processes left behind"
    );
    let left: Vec<_> = std::fs::read_dir(run_dir)
        .expect("read the run dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "per-VM files left behind: {left:?}");
}

/// The `kiln` binary (debug build), built once per test run.
pub fn kiln_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let st = Command::new(cargo)
            .args(["build", "-q", "-p", "kiln", "--bin", "kiln"])
            .current_dir(root)
            .status()
            .expect("run cargo to build kiln");
        assert!(st.success(), "building kiln failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        target.join("debug/kiln")
    })
    .clone()
}

/// A `kiln` command set up for tests: test cache, agent, a fresh run dir.
pub fn kiln_cmd(run_dir: &Path) -> Command {
    let mut c = Command::new(kiln_bin());
    c.env("KILN_CACHE_DIR", cache_dir())
        .env("KILN_AGENT", agent())
        .env("KILN_RUN_DIR", run_dir)
        .env("XDG_STATE_HOME", test_root().join("state"));
    c
}
