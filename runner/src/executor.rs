//! The executor: one job, one fresh VM.
//!
//! prepare (kernel, initramfs, rootfs, scratch disk) -> boot -> `Ready` ->
//! `Start` -> stream frames to the sink -> `Done` -> destroy. Every exit path
//! destroys the VM and removes the job's directory; every failure becomes a
//! [`FailureReason`] a provider can report.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_agent::proto::{self, Decoder, Frame, Start, StepSpec, When};
use kiln_images::rootfs::{rootfs_for, ImageSource, Rootfs};
use kiln_images::{Cache, Kernel};
use kiln_pipelines::{JobSource, JobSpec, Shell, StepWhen};
use kiln_vmm::{BackendKind, Disk, KvmSupport, Machine, MachineConfig};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::sink::JobSink;

/// Why a job did not succeed, in the terms CI providers use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum FailureReason {
    /// A step exited non-zero.
    ScriptFailure,
    /// The job (or a step) ran past its timeout.
    JobExecutionTimeout,
    /// The image could not be found, pulled or converted.
    ImagePullFailure(String),
    /// kiln, the VM or the agent failed: not the job's fault.
    RunnerSystemFailure(String),
    /// Canceled by the user or the provider.
    Canceled,
}

/// The outcome of one job.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    /// The job's exit code: that of the first failing step, 0 on success.
    /// System failures use 1 unless a step already failed.
    pub exit_code: i32,
    pub failure: Option<FailureReason>,
    pub image: String,
    pub backend: String,
    /// Time to prepare the image, kernel and disks.
    pub prepare_ms: u64,
    /// From starting the VM to the agent's `Ready`.
    pub boot_ms: u64,
    /// The guest kernel's uptime when the agent was ready.
    pub guest_boot_ms: u64,
    /// From `Start` to `Done`.
    pub run_ms: u64,
    pub steps: Vec<proto::StepEnd>,
    /// Where the serial log was kept (system failures only).
    pub debug_log: Option<PathBuf>,
}

impl JobResult {
    pub fn success(&self) -> bool {
        self.failure.is_none()
    }

    /// One line for the terminal.
    pub fn summary(&self) -> String {
        let outcome = match &self.failure {
            None => "succeeded".to_string(),
            Some(FailureReason::ScriptFailure) => format!("failed (exit code {})", self.exit_code),
            Some(FailureReason::JobExecutionTimeout) => "failed: timed out".to_string(),
            Some(FailureReason::ImagePullFailure(m)) => format!("failed: image: {m}"),
            Some(FailureReason::RunnerSystemFailure(m)) => format!("failed: system failure: {m}"),
            Some(FailureReason::Canceled) => "canceled".to_string(),
        };
        format!(
            "job {outcome} · image {} · boot {:.2}s · run {:.2}s · {}",
            self.image,
            self.boot_ms as f64 / 1000.0,
            self.run_ms as f64 / 1000.0,
            self.backend
        )
    }
}

/// Settings for all jobs an executor runs.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub cache_dir: PathBuf,
    /// Per-VM files go under here.
    pub run_dir: PathBuf,
    pub agent: PathBuf,
    pub kernel: Kernel,
    pub backend: BackendKind,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub scratch_bytes: u64,
    /// From starting the VM to the agent's `Ready`.
    pub boot_timeout: Duration,
    /// Used when the job sets none.
    pub default_job_timeout: Duration,
    /// Keep serial logs of failed boots here.
    pub log_dir: Option<PathBuf>,
    /// Extra kernel command-line arguments.
    pub extra_cmdline: String,
}

/// Runs jobs, each in a fresh VM.
pub struct Executor {
    config: ExecutorConfig,
    cache: Cache,
    kvm: KvmSupport,
    initramfs: PathBuf,
}

static JOB_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The job's directory (scratch disk, the VM's run dir); removed on drop.
struct JobDir(PathBuf);

impl Drop for JobDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("could not remove {}: {e}", self.0.display());
            }
        }
    }
}

/// A failure before the job ran: reason and message.
type Early = (FailureReason, String);

impl Executor {
    /// Check the host, build (or find) the initramfs, clean leftovers of a
    /// kiln that died.
    pub fn new(config: ExecutorConfig) -> anyhow::Result<Executor> {
        use anyhow::Context;
        let cache = Cache::open(&config.cache_dir).context("opening the cache")?;
        cache.clean_tmp();
        std::fs::create_dir_all(&config.run_dir)
            .with_context(|| format!("creating the run directory {}", config.run_dir.display()))?;
        let stale = crate::paths::clean_stale_jobs(&config.run_dir);
        if stale > 0 {
            tracing::info!("removed {stale} job directories left by a kiln that died");
        }
        let kvm = kiln_vmm::probe_kvm();
        let (_, why) = config.backend.resolve(&kvm)?;
        if let Some(why) = why {
            tracing::info!("{why}");
        }
        let initramfs = kiln_images::build_initramfs(&cache, &config.agent, &config.kernel)
            .context("building the guest initramfs")?;
        Ok(Executor {
            config,
            cache,
            kvm,
            initramfs,
        })
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The kernel command line every VM gets.
    fn cmdline(&self, rootfs: &Rootfs) -> String {
        let mut c = MachineConfig::default_cmdline().to_string();
        c.push_str(&format!(" kiln.rootfstype={}", rootfs.fstype));
        if !self.config.extra_cmdline.is_empty() {
            c.push(' ');
            c.push_str(&self.config.extra_cmdline);
        }
        c
    }

    /// Resolve the job's image to a root filesystem (cached by ChainID).
    pub async fn prepare_image(&self, image: &str) -> Result<Rootfs, FailureReason> {
        let cache = self.cache.clone();
        let image = image.to_string();
        tokio::task::spawn_blocking(move || {
            let src = ImageSource::parse(&image)?;
            rootfs_for(&cache, &src)
        })
        .await
        .map_err(|e| FailureReason::RunnerSystemFailure(format!("image task: {e}")))?
        .map_err(|e| FailureReason::ImagePullFailure(error_chain(&e)))
    }

    /// Run `job` in a fresh VM. Never panics on guest input; the VM and the
    /// job's files are gone when this returns. `cancel`: `Some(graceful)`
    /// once the job should stop.
    pub async fn run(
        &self,
        job: &JobSpec,
        sink: &mut dyn JobSink,
        mut cancel: watch::Receiver<Option<bool>>,
    ) -> JobResult {
        let t0 = Instant::now();
        let mut result = JobResult {
            exit_code: 1,
            failure: None,
            image: job.image.clone(),
            backend: String::new(),
            prepare_ms: 0,
            boot_ms: 0,
            guest_boot_ms: 0,
            run_ms: 0,
            steps: Vec::new(),
            debug_log: None,
        };
        let rootfs = match self.prepare_image(&job.image).await {
            Ok(r) => r,
            Err(reason) => {
                result.failure = Some(reason);
                return result;
            }
        };
        let n = JOB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = JobDir(self.config.run_dir.join(crate::paths::job_dir_name(n)));
        if let Err(e) = std::fs::create_dir(&dir.0) {
            result.failure = Some(FailureReason::RunnerSystemFailure(format!(
                "cannot create {}: {e}",
                dir.0.display()
            )));
            return result;
        }
        let scratch = dir.0.join("scratch.ext4");
        let size = self.config.scratch_bytes;
        let s2 = scratch.clone();
        let made =
            tokio::task::spawn_blocking(move || kiln_images::scratch::create_scratch(&s2, size))
                .await;
        match made {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                result.failure = Some(FailureReason::RunnerSystemFailure(error_chain(&e)));
                return result;
            }
            Err(e) => {
                result.failure = Some(FailureReason::RunnerSystemFailure(e.to_string()));
                return result;
            }
        }
        // The job's sources (`JobSource::LocalDir`) travel as a third disk.
        let start = build_start(job, &rootfs);
        let workspace = match &job.source {
            JobSource::LocalDir(src) => {
                let img = dir.0.join("work.ext4");
                match self.make_workspace(src, &img, &start.workdir).await {
                    Ok(()) => Some((src.clone(), img)),
                    Err(m) => {
                        result.failure = Some(FailureReason::RunnerSystemFailure(m));
                        return result;
                    }
                }
            }
            _ => None,
        };
        result.prepare_ms = t0.elapsed().as_millis() as u64;

        let mut cmdline = self.cmdline(&rootfs);
        let mut disks = vec![
            Disk {
                path: rootfs.image.clone(),
                read_only: true,
                serial: "kiln-root".into(),
                ephemeral: false,
            },
            Disk {
                path: scratch,
                read_only: false,
                serial: "kiln-scratch".into(),
                ephemeral: true,
            },
        ];
        if let Some((_, img)) = &workspace {
            // The agent mounts it at the job's working directory (checked
            // for whitespace in `make_workspace`).
            cmdline.push_str(&format!(" kiln.workdir={}", start.workdir));
            disks.push(Disk {
                path: img.clone(),
                read_only: false,
                serial: "kiln-work".into(),
                // Read back after the VM ends: writes must reach the file.
                ephemeral: false,
            });
        }

        let mconfig = MachineConfig {
            kernel: self.config.kernel.image.clone(),
            initramfs: self.initramfs.clone(),
            cmdline,
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            disks,
            run_dir: dir.0.join("vm"),
            serial_log_limit: 256 * 1024,
            start_timeout: Duration::from_secs(10),
        };
        let boot_started = Instant::now();
        let (machine, console) = match Machine::start(mconfig, self.config.backend, &self.kvm).await
        {
            Ok(m) => m,
            Err(e) => {
                result.failure = Some(FailureReason::RunnerSystemFailure(error_chain(&e)));
                return result;
            }
        };
        result.backend = machine.describe();
        let timeout = job.timeout.unwrap_or(self.config.default_job_timeout);
        let outcome = self
            .drive(
                machine,
                console,
                start,
                job,
                sink,
                &mut result,
                boot_started,
                timeout,
                &mut cancel,
            )
            .await;
        if let Err((reason, serial)) = outcome {
            if let FailureReason::RunnerSystemFailure(_) = reason {
                result.debug_log = self.keep_serial_log(&dir.0, &serial);
            }
            result.failure = Some(reason);
        }
        // Artifacts are collected from the workspace by the caller: copy the
        // guest's view of it back (the VM is gone, the disk is quiescent).
        if let Some((src, img)) = &workspace {
            if !job.artifacts.is_empty() && result.boot_ms > 0 {
                if let Err(m) = read_back_workspace(img, src).await {
                    tracing::warn!("reading the workspace back: {m}");
                    if result.failure.is_none() {
                        result.failure = Some(FailureReason::RunnerSystemFailure(m));
                    }
                }
            }
        }
        drop(dir);
        result
    }

    /// Build `img`, an ext4 image holding a copy of `src`, sized like the
    /// scratch disk (sparse) so the job can write into its workspace.
    async fn make_workspace(&self, src: &Path, img: &Path, workdir: &str) -> Result<(), String> {
        if workdir.is_empty() || workdir.contains(char::is_whitespace) || !workdir.starts_with('/')
        {
            return Err(format!(
                "the working directory '{workdir}' must be an absolute path without spaces to hold the workspace"
            ));
        }
        let f = std::fs::File::create(img).map_err(|e| format!("create {}: {e}", img.display()))?;
        f.set_len(self.config.scratch_bytes)
            .map_err(|e| format!("size {}: {e}", img.display()))?;
        drop(f);
        let o = tokio::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0"])
            .args([
                "-L",
                "kiln-work",
                "-E",
                "lazy_itable_init=1,nodiscard",
                "-d",
            ])
            .arg(src)
            .arg(img)
            .output()
            .await
            .map_err(|e| format!("running mkfs.ext4 (install e2fsprogs): {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "mkfs.ext4 -d {}: {}",
                src.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(())
    }

    fn keep_serial_log(&self, job_dir: &Path, serial: &[u8]) -> Option<PathBuf> {
        let dir = self.config.log_dir.as_ref()?;
        std::fs::create_dir_all(dir).ok()?;
        let name = job_dir.file_name()?.to_string_lossy().to_string();
        let p = dir.join(format!("{name}.serial.log"));
        std::fs::write(&p, serial).ok()?;
        Some(p)
    }

    /// Talk to the agent until the job is done; always destroys the machine.
    #[allow(clippy::too_many_arguments)]
    async fn drive(
        &self,
        mut machine: Machine,
        mut console: kiln_vmm::ConsoleStream,
        start: Start,
        job: &JobSpec,
        sink: &mut dyn JobSink,
        result: &mut JobResult,
        boot_started: Instant,
        timeout: Duration,
        cancel: &mut watch::Receiver<Option<bool>>,
    ) -> Result<(), (FailureReason, Vec<u8>)> {
        let r = self
            .converse(
                &mut machine,
                &mut console,
                start,
                job,
                sink,
                result,
                boot_started,
                timeout,
                cancel,
            )
            .await;
        let serial = machine.serial_log();
        if let Err(e) = machine.destroy().await {
            tracing::warn!("destroying the VM: {e}");
        }
        r.map_err(|(reason, msg)| {
            tracing::debug!("job ended early: {msg}");
            (reason, serial)
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn converse(
        &self,
        machine: &mut Machine,
        console: &mut kiln_vmm::ConsoleStream,
        start: Start,
        job: &JobSpec,
        sink: &mut dyn JobSink,
        result: &mut JobResult,
        boot_started: Instant,
        timeout: Duration,
        cancel: &mut watch::Receiver<Option<bool>>,
    ) -> Result<(), Early> {
        let sys = |m: String| (FailureReason::RunnerSystemFailure(m.clone()), m);
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 64 * 1024];

        // Boot: the first frame must be Ready, within the boot timeout.
        let boot_deadline = tokio::time::Instant::now() + self.config.boot_timeout;
        let ready = loop {
            match decoder.next_frame() {
                Ok(Some(Frame::Ready(r))) => break r,
                Ok(Some(Frame::Fatal(f))) => {
                    return Err(sys(format!(
                        "the guest agent failed to start: {}",
                        f.message
                    )))
                }
                Ok(Some(Frame::Log(l))) => {
                    tracing::debug!(target: "kiln::agent", "{}", l.message);
                    continue;
                }
                Ok(Some(other)) => {
                    return Err(sys(format!("the agent sent {other:?} before Ready")))
                }
                Ok(None) => {}
                Err(e) => return Err(sys(format!("protocol error from the guest: {e}"))),
            }
            tokio::select! {
                r = console.read(&mut buf) => match r {
                    Ok(0) | Err(_) => {
                        let status = machine.wait().await;
                        return Err(sys(format!("the VM ended before its agent was ready ({status:?})")));
                    }
                    Ok(n) => decoder.push(&buf[..n]),
                },
                _ = tokio::time::sleep_until(boot_deadline) => {
                    return Err(sys(format!(
                        "the guest did not answer within the boot timeout ({:?}); the VM was killed",
                        self.config.boot_timeout
                    )));
                }
                _ = cancel.changed() => return Err((FailureReason::Canceled, "canceled during boot".into())),
            }
        };
        if ready.protocol != proto::PROTOCOL_VERSION {
            return Err(sys(format!(
                "the guest agent speaks protocol {} but kiln speaks {}; rebuild the agent",
                ready.protocol,
                proto::PROTOCOL_VERSION
            )));
        }
        result.boot_ms = boot_started.elapsed().as_millis() as u64;
        result.guest_boot_ms = ready.boot_ms;
        tracing::debug!(kernel = %ready.kernel, agent = %ready.agent_version, "guest ready");

        let run_started = Instant::now();
        let bytes = Frame::Start(start)
            .to_bytes()
            .map_err(|e| sys(format!("job too large: {e}")))?;
        console
            .write_all(&bytes)
            .await
            .map_err(|e| sys(format!("sending the job to the guest: {e}")))?;

        let deadline = tokio::time::Instant::now() + timeout;
        let mut canceled = false;
        let mut cancel_sent = false;
        loop {
            loop {
                let frame = match decoder.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Err(sys(format!("protocol error from the guest: {e}"))),
                };
                match frame {
                    Frame::Output { step, stream, data } => sink.output(step, stream, &data),
                    Frame::StepStart(s) => {
                        let name = job
                            .steps
                            .get(s.step as usize)
                            .map(|s| s.name.as_str())
                            .unwrap_or("?");
                        sink.step_start(s.step, name);
                    }
                    Frame::StepEnd(end) => {
                        let name = job
                            .steps
                            .get(end.step as usize)
                            .map(|s| s.name.as_str())
                            .unwrap_or("?");
                        sink.step_end(name, &end);
                        result.steps.push(end);
                    }
                    Frame::Log(l) => tracing::debug!(target: "kiln::agent", "{}", l.message),
                    Frame::Fatal(f) => {
                        return Err(sys(format!("the guest agent failed: {}", f.message)))
                    }
                    Frame::Done => {
                        result.run_ms = run_started.elapsed().as_millis() as u64;
                        self.finish(job, result, canceled);
                        return Ok(());
                    }
                    other => {
                        return Err(sys(format!("unexpected frame from the guest: {other:?}")))
                    }
                }
            }
            tokio::select! {
                r = console.read(&mut buf) => match r {
                    Ok(0) | Err(_) => {
                        let status = machine.wait().await;
                        return Err(sys(format!("the VM ended before the job finished ({status:?})")));
                    }
                    Ok(n) => decoder.push(&buf[..n]),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    result.run_ms = run_started.elapsed().as_millis() as u64;
                    return Err((
                        FailureReason::JobExecutionTimeout,
                        format!("the job ran past its timeout of {timeout:?}; the VM was killed"),
                    ));
                }
                changed = cancel.changed(), if !cancel_sent => {
                    if changed.is_err() {
                        cancel_sent = true; // sender gone: nobody will cancel
                        continue;
                    }
                    let graceful = cancel.borrow().unwrap_or(true);
                    canceled = true;
                    if !graceful {
                        return Err((FailureReason::Canceled, "canceled".into()));
                    }
                    let bytes = Frame::Cancel(proto::Cancel { graceful }).to_bytes().unwrap_or_default();
                    let _ = console.write_all(&bytes).await;
                    cancel_sent = graceful;
                }
            }
        }
    }

    /// Work out the job's exit code and failure from its steps.
    fn finish(&self, job: &JobSpec, result: &mut JobResult, canceled: bool) {
        let failing = result.steps.iter().find(|e| {
            !e.skipped
                && e.exit_code != 0
                && !job
                    .steps
                    .get(e.step as usize)
                    .is_some_and(|s| s.allow_failure)
        });
        result.exit_code = failing.map(|e| e.exit_code).unwrap_or(0);
        result.failure = if canceled {
            Some(FailureReason::Canceled)
        } else if failing.is_some_and(|e| e.timed_out) {
            Some(FailureReason::JobExecutionTimeout)
        } else if failing.is_some() {
            Some(FailureReason::ScriptFailure)
        } else {
            None
        };
    }
}

/// The agent's `Start` for a job on an image.
pub fn build_start(job: &JobSpec, rootfs: &Rootfs) -> Start {
    let mut env: Vec<(String, String)> = rootfs
        .config
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    for v in &job.variables {
        env.retain(|(k, _)| k != &v.key);
        env.push((v.key.clone(), v.value.clone()));
    }
    let workdir = job
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| Some(rootfs.config.working_dir.clone()).filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    let steps = job
        .steps
        .iter()
        .map(|s| {
            let (argv, script) = match &s.shell {
                Shell::Sh => (
                    vec!["sh".into(), "-e".into(), "{script}".into()],
                    s.script.clone(),
                ),
                Shell::Bash => (
                    [
                        "bash",
                        "--noprofile",
                        "--norc",
                        "-eo",
                        "pipefail",
                        "{script}",
                    ]
                    .map(String::from)
                    .to_vec(),
                    s.script.clone(),
                ),
                Shell::Custom(args) => (
                    args.iter().map(|a| a.replace("{0}", "{script}")).collect(),
                    s.script.clone(),
                ),
                Shell::Exec(argv) => (argv.clone(), String::new()),
            };
            StepSpec {
                name: s.name.clone(),
                argv,
                script,
                env: s.env.clone(),
                when: match s.when {
                    StepWhen::OnSuccess => When::OnSuccess,
                    StepWhen::OnFailure => When::OnFailure,
                    StepWhen::Always => When::Always,
                },
                timeout_ms: s.timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
                allow_failure: s.allow_failure,
            }
        })
        .collect();
    Start {
        env,
        workdir,
        user: rootfs.config.user.clone(),
        steps,
    }
}

/// Replace the contents of `dest` with the files of the ext4 image `img`
/// (`debugfs rdump`, which needs no mount and no privileges).
async fn read_back_workspace(img: &Path, dest: &Path) -> Result<(), String> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(|e| format!("clear {}: {e}", dest.display()))?;
    }
    std::fs::create_dir_all(dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
    let o = tokio::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dest.display()))
        .arg(img)
        .output()
        .await
        .map_err(|e| format!("running debugfs (install e2fsprogs): {e}"))?;
    let err = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        return Err(format!("debugfs rdump: {}", err.trim()));
    }
    // debugfs exits 0 even when a command fails; it reports on stderr
    // after its version banner.
    for l in err.lines().filter(|l| !l.starts_with("debugfs ")) {
        tracing::warn!("debugfs rdump: {l}");
    }
    let _ = std::fs::remove_dir(dest.join("lost+found"));
    Ok(())
}

/// `err` and its sources, joined with ": ".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_images::ImageConfig;
    use kiln_pipelines::{Step, Variable};

    fn rootfs() -> Rootfs {
        Rootfs {
            image: "/x".into(),
            fstype: "ext4".into(),
            chain_id: "sha256:0".into(),
            config: ImageConfig {
                env: vec!["PATH=/bin".into(), "A=image".into(), "B=image".into()],
                working_dir: "/srv".into(),
                user: "1000".into(),
                ..Default::default()
            },
            source: "x".into(),
        }
    }

    #[test]
    fn job_variables_override_image_env_and_image_defaults_apply() {
        let mut job = JobSpec::single("j", "img", Step::script("s", "echo hi"));
        job.variables.push(Variable::new("A", "job"));
        let s = build_start(&job, &rootfs());
        assert_eq!(
            s.env,
            vec![
                ("PATH".into(), "/bin".into()),
                ("B".into(), "image".into()),
                ("A".into(), "job".into())
            ]
        );
        assert_eq!(s.workdir, "/srv");
        assert_eq!(s.user, "1000");
        assert_eq!(s.steps[0].argv, vec!["sh", "-e", "{script}"]);
        job.working_dir = Some("/builds/p".into());
        assert_eq!(build_start(&job, &rootfs()).workdir, "/builds/p");
    }

    #[test]
    fn shells_map_to_argv() {
        let mut st = Step::script("s", "x");
        st.shell = Shell::Custom(vec!["python3".into(), "{0}".into()]);
        st.timeout = Some(Duration::from_secs(2));
        let job = JobSpec::single("j", "img", st);
        let s = build_start(&job, &rootfs());
        assert_eq!(s.steps[0].argv, vec!["python3", "{script}"]);
        assert_eq!(s.steps[0].timeout_ms, 2000);
    }
}
