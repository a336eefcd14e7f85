//! Shared set-up for tests that boot VMs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use kiln::executor::FailureReason;
use kiln::joblog::{BufferSink, JobSink};
use kiln::{Executor, ExecutorConfig, JobResult};
use kiln_agent::proto::Stream;
use kiln_images::{Cache, Kernel};
use kiln_pipelines::{ArtifactSpec, ArtifactWhen, JobSpec, Step};
use kiln_testkit::Need;
use kiln_vmm::BackendKind;

use crate::fixtures::BusyboxImage;

/// The workspace's root directory.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else `target/` in the
/// workspace.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs `cargo build -q <args>` in the workspace (the cargo running the
/// tests, else `cargo` on the `PATH`); panics with `failed` if it fails.
/// Returns the target directory the build wrote into.
pub fn cargo_build(args: &[&str], failed: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-q"])
        .args(args)
        .current_dir(workspace_root())
        .status()
        .expect("run cargo build");
    assert!(st.success(), "{failed}");
    target_dir()
}

/// The cargo arguments that build a part of `kiln-agent` the way the guest
/// runs it: static (musl), with the `agent` profile.
pub const AGENT_BUILD: [&str; 6] = [
    "-p",
    "kiln-agent",
    "--target",
    "x86_64-unknown-linux-musl",
    "--profile",
    "agent",
];

/// `target/kiln-tests`: a cache shared by every test run (kernel, initramfs,
/// root filesystems), so only the first run pays for them. `KILN_TEST_ROOT`
/// puts it elsewhere (the nested tier's L1 uses a tmpfs).
pub fn test_root() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_TEST_ROOT") {
        let d = PathBuf::from(d);
        std::fs::create_dir_all(&d).expect("create $KILN_TEST_ROOT");
        return d;
    }
    let d = target_dir().join("kiln-tests");
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
            let target = cargo_build(
                &AGENT_BUILD,
                "building the agent failed (rustup target add x86_64-unknown-linux-musl)",
            );
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
            .find(Kernel::has_guest_modules)
            .unwrap_or_else(|| {
                panic!(
                    "no guest kernel with every guest module in the test cache {}: run \
                     scripts/setup.sh (it runs KILN_CACHE_DIR=<that dir> kiln kernel fetch)",
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

/// A static test helper from `images/agent/examples/NAME.rs`, built for
/// musl (the agent's target and profile, so it shares the agent's build).
pub fn agent_example(name: &str) -> Vec<u8> {
    agent();
    let args = [&AGENT_BUILD[..], &["--example", name]].concat();
    let target = cargo_build(&args, &format!("building the {name} example failed"));
    let path = target
        .join("x86_64-unknown-linux-musl/agent/examples")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The busybox image plus `files` (path in the image, content, mode), as
/// `<test root>/<name>-<pid>`, removed when the test process exits.
pub fn busybox_image_with(name: &str, files: Vec<(String, Vec<u8>, u32)>) -> PathBuf {
    let dir = test_root().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    BusyboxImage {
        files,
        ..BusyboxImage::default()
    }
    .build(&dir)
    .unwrap_or_else(|e| panic!("build the {name} image: {e}"));
    let d = dir.clone();
    kiln_testkit::at_exit(move || {
        let _ = std::fs::remove_dir_all(d);
    });
    dir
}

/// What [`service_image`]'s `serve` program writes into the page it
/// serves, before the variables' values: `hello from the service`.
pub const SERVICE_PAGE: &str = "hello from the service";
/// The port [`service_image`] serves on (its `ExposedPorts`).
pub const SERVICE_PORT: u16 = 8080;

/// A service image (built once per run): busybox whose entrypoint `serve`
/// writes a page (with `$GREETING`, `$JOBVAR`, and whether the job's root
/// `/newroot` or the agent's `/init` can be seen from the service) and runs
/// `httpd` on [`SERVICE_PORT`], logging requests to stderr. The layout's
/// directory is named `svc-image-<pid>`.
pub fn service_image() -> PathBuf {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let dir = test_root().join(format!("svc-image-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let serve = format!(
            "#!/bin/sh\n\
             mkdir -p /www\n\
             seen=hidden; [ -e /newroot ] || [ -e /init ] && seen=visible\n\
             echo \"{SERVICE_PAGE} GREETING=$GREETING JOBVAR=$JOBVAR outside=$seen\" > /www/index.html\n\
             echo \"serve: listening on {SERVICE_PORT}\"\n\
             exec httpd -f -v -p {SERVICE_PORT} -h /www\n"
        );
        BusyboxImage {
            files: vec![("usr/bin/serve".into(), serve.into_bytes(), 0o755)],
            entrypoint: vec!["serve".into()],
            cmd: Vec::new(),
            exposed_ports: vec![format!("{SERVICE_PORT}/tcp")],
            ..BusyboxImage::default()
        }
        .build(&dir)
        .expect("build the service fixture");
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

/// kiln's warnings (a refused open in a VMM process, a lost frame...) go to
/// the test's output, where a failure's reader sees them.
fn log_warnings() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_test_writer()
            .try_init();
    });
}

pub fn config(run_dir: &Path) -> ExecutorConfig {
    log_warnings();
    // Builds kiln-vmm as well, for the kvm backend (under cargo only: in a
    // nested L1 it was copied next to the test binary).
    if std::env::var_os("CARGO").is_some() {
        kiln_bin();
    }
    ExecutorConfig::builder(cache_dir(), run_dir)
        .agent(agent())
        .kernel(kernel())
        .backend(backend())
        .vcpus(1)
        .memory_mib(512)
        .disk_gib(4)
        // Generous: TCG (and TCG inside TCG in the nested tier) on a loaded
        // 2-core host has taken over 90 s to reach the agent.
        .boot_timeout(Duration::from_secs(180))
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
    // A killed process may take a moment to be reaped (tearing down a
    // guest's memory on a loaded host: seconds); only a QEMU still there
    // after 30 s is a leak.
    for _ in 0..300 {
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

/// The `kiln` binary (debug build), built once per test run with the
/// `kiln-vmm` binary next to it.
pub fn kiln_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // kiln-vmm too: the kvm backend runs each VM in it (found next to
        // kiln, or one directory above a test binary).
        let target = cargo_build(
            &[
                "-p", "kiln", "--bin", "kiln", "-p", "kiln-vmm", "--bin", "kiln-vmm",
            ],
            "building kiln failed",
        );
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
        .env("XDG_STATE_HOME", test_root().join("state"))
        // Jobs get no network unless a test asks (`--network`): kiln's
        // `nat` would change the firewall of the machine the tests run on.
        .env("KILN_NETWORK", "none");
    c
}

/// `kiln run-job` on the busybox fixture with 1 CPU and 512 MiB, logging
/// only kiln's errors; the caller adds what to run.
pub fn run_job_cmd(run_dir: &Path) -> Command {
    run_job_cmd_on(run_dir, &busybox_image())
}

/// [`run_job_cmd`] on another image.
pub fn run_job_cmd_on(run_dir: &Path, image: &Path) -> Command {
    let mut c = kiln_cmd(run_dir);
    c.args([
        "--log-level",
        "error",
        "run-job",
        "--cpus",
        "1",
        "--memory",
        "512",
        "--image",
    ])
    .arg(image);
    c
}

/// A one-step job (`script`) named `name` on the busybox fixture.
pub fn busybox_job(name: &str, script: &str) -> JobSpec {
    JobSpec::single(
        name,
        busybox_image().to_string_lossy(),
        Step::script("script", script),
    )
}

/// Artifacts: what is under `path` in the workspace, collected `when`.
pub fn artifacts_under(path: &str, when: ArtifactWhen) -> ArtifactSpec {
    ArtifactSpec {
        name: None,
        paths: vec![path.into()],
        exclude: Vec::new(),
        untracked: false,
        when,
        expire_in: None,
    }
}

/// Asserts that the job succeeded, showing its stderr where it did not.
pub fn assert_success(r: &JobResult, sink: &BufferSink) {
    assert!(
        r.success(),
        "{r:?}\nstderr: {}",
        String::from_utf8_lossy(&sink.stderr)
    );
}

/// Collects output and requests a graceful cancel at the first byte.
pub struct CancelAtFirstOutput {
    pub inner: BufferSink,
    tx: tokio::sync::watch::Sender<Option<bool>>,
}

impl CancelAtFirstOutput {
    /// The sink, and the cancel channel's receiver to hand the executor.
    pub fn new() -> (
        CancelAtFirstOutput,
        tokio::sync::watch::Receiver<Option<bool>>,
    ) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let sink = CancelAtFirstOutput {
            inner: BufferSink::default(),
            tx,
        };
        (sink, rx)
    }

    /// Asserts what a graceful cancel of `echo started; sleep 600` with an
    /// always-step `echo cleanup` leaves: a canceled job, the first step
    /// ended by SIGTERM, the always-step run.
    pub fn assert_canceled_and_cleaned_up(&self, r: &JobResult) {
        assert_eq!(r.failure, Some(FailureReason::Canceled), "{r:?}");
        assert_eq!(
            String::from_utf8_lossy(&self.inner.stdout),
            "started\ncleanup\n"
        );
        assert!(
            r.steps[0].canceled && r.steps[0].exit_code == 143,
            "SIGTERM ended the step: {r:?}"
        );
    }
}

impl JobSink for CancelAtFirstOutput {
    fn output(&mut self, step: u32, stream: Stream, data: &[u8]) {
        self.inner.output(step, stream, data);
        let _ = self.tx.send(Some(true));
    }
}
