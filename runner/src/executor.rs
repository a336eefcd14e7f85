//! The executor: one job, one fresh VM.
//!
//! prepare (kernel, initramfs, rootfs, scratch disk) -> boot -> `Ready` ->
//! `Start` -> stream frames to the sink -> `Done` -> destroy. Every exit path
//! destroys the VM and removes the job's directory; every failure becomes a
//! [`FailureReason`] a provider can report.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_agent::proto::{self, Decoder, Frame, Start, StepEnd, StepSpec, Stream};
use kiln_images::rootfs::{rootfs_for, ImageSource, Rootfs};
use kiln_images::scratch::{mkfs_ext4, Ext4};
use kiln_images::{Cache, Kernel};
use kiln_pipelines::github::{self, Contexts, ExprValue, JobStatus};
use kiln_pipelines::{JobSource, JobSpec, Shell, Step, StepWhen};
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
    /// Always write the guest's serial log (kernel messages) here.
    pub serial_log: Option<PathBuf>,
    /// The jobs' network (`crate::network`).
    pub network: crate::network::NetworkConfig,
}

/// Runs jobs, each in a fresh VM.
pub struct Executor {
    config: ExecutorConfig,
    cache: Cache,
    kvm: KvmSupport,
    initramfs: PathBuf,
    networks: crate::network::Networks,
    /// Most artifact bytes (file contents) one job may send back.
    max_artifact_bytes: u64,
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
        let (resolved, why) = config.backend.resolve(&kvm)?;
        if let Some(why) = why {
            tracing::info!("{why}");
        }
        let networks = crate::network::Networks::new(
            &config.network,
            resolved == BackendKind::Kvm,
            &config.kernel,
        )?;
        let initramfs = kiln_images::build_initramfs(&cache, &config.agent, &config.kernel)
            .context("building the guest initramfs")?;
        Ok(Executor {
            config,
            cache,
            kvm,
            initramfs,
            networks,
            max_artifact_bytes: proto::MAX_ARTIFACT_BYTES,
        })
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Limit the artifact bytes (file contents) a job may send back; at
    /// most, and by default, [`proto::MAX_ARTIFACT_BYTES`]. A job whose
    /// artifacts are over it fails, as GitLab fails an upload that is too
    /// large.
    pub fn set_max_artifact_bytes(&mut self, bytes: u64) {
        self.max_artifact_bytes = bytes.min(proto::MAX_ARTIFACT_BYTES);
    }

    /// The kernel command line every VM gets.
    fn cmdline(&self, rootfs: &Rootfs) -> String {
        let mut c = MachineConfig::default_cmdline().to_string();
        c.push_str(&format!(" {}={}", proto::CMDLINE_ROOTFSTYPE, rootfs.fstype));
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
        cancel: watch::Receiver<Option<bool>>,
    ) -> JobResult {
        self.run_collecting(job, sink, cancel, None).await
    }

    /// [`Executor::run`], and when the job has artifacts, put the workspace
    /// files any of its artifact specs' `paths` select (regardless of `when`
    /// and `exclude`, which the caller applies) into `artifacts_to`, a
    /// directory that must not exist yet. The guest sends them as a tar
    /// stream; only regular files and directories are extracted, inside
    /// `artifacts_to`.
    pub async fn run_collecting(
        &self,
        job: &JobSpec,
        sink: &mut dyn JobSink,
        mut cancel: watch::Receiver<Option<bool>>,
        artifacts_to: Option<&Path>,
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
        let mut start = build_start(job, &rootfs);
        // Dropped after the VM (declared after `dir`, before `machine`).
        let network = match self.networks.attach(&dir.0).await {
            Ok(n) => n,
            Err(e) => {
                result.failure = Some(FailureReason::RunnerSystemFailure(error_chain(&e)));
                return result;
            }
        };
        start.network = network.guest();
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
                serial: proto::ROOT_DISK_SERIAL.into(),
                ephemeral: false,
            },
            Disk {
                path: scratch,
                read_only: false,
                serial: proto::SCRATCH_DISK_SERIAL.into(),
                ephemeral: true,
            },
        ];
        if let Some((_, img)) = &workspace {
            // The agent mounts it at the job's working directory (checked
            // for whitespace in `make_workspace`).
            cmdline.push_str(&format!(" {}={}", proto::CMDLINE_WORKDIR, start.workdir));
            disks.push(Disk {
                path: img.clone(),
                read_only: false,
                serial: proto::WORK_DISK_SERIAL.into(),
                // Artifacts come back over the console, never from this disk.
                ephemeral: true,
            });
        }

        let mconfig = MachineConfig {
            kernel: self.config.kernel.image.clone(),
            initramfs: self.initramfs.clone(),
            cmdline,
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            disks,
            console_port: "org.kiln.agent.0".into(),
            run_dir: dir.0.join("vm"),
            serial_log_limit: 256 * 1024,
            start_timeout: Duration::from_secs(10),
            // edge: read at the runner
            qemu: kiln_vmm::QemuOptions::new(std::env::var_os("KILN_QEMU")),
            network: network.machine(),
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
                artifacts_to.map(|to| (to, dir.0.join("artifacts.tar"))),
            )
            .await;
        if let Err((reason, serial)) = outcome {
            if let FailureReason::RunnerSystemFailure(_) = reason {
                result.debug_log = self.keep_serial_log(&dir.0, &serial);
            }
            result.failure = Some(reason);
        }
        drop(network);
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
        let (src, img, size) = (
            src.to_path_buf(),
            img.to_path_buf(),
            self.config.scratch_bytes,
        );
        tokio::task::spawn_blocking(move || {
            let spec = Ext4 {
                label: proto::WORK_DISK_SERIAL,
                size,
                from: Some(&src),
                inodes: None,
                eager: false,
            };
            mkfs_ext4(&img, &spec).map_err(|e| error_chain(&e))
        })
        .await
        .map_err(|e| format!("workspace task: {e}"))??;
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
        artifacts: Option<(&Path, PathBuf)>,
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
                artifacts,
            )
            .await;
        let serial = machine.serial_log();
        if let Err(e) = machine.destroy().await {
            tracing::warn!("destroying the VM: {e}");
        }
        if let Some(p) = &self.config.serial_log {
            if let Err(e) = std::fs::write(p, &serial) {
                tracing::warn!("writing the serial log {}: {e}", p.display());
            }
        }
        if r.is_err() && result.boot_ms > 0 && result.run_ms == 0 {
            // Ended early (timeout, cancel, protocol error): the job ran from
            // the agent's `Ready` until now.
            result.run_ms =
                (boot_started.elapsed().as_millis() as u64).saturating_sub(result.boot_ms);
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
        artifacts: Option<(&Path, PathBuf)>,
    ) -> Result<(), Early> {
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
                        proto::quote(f.message.as_bytes(), proto::QUOTE_MAX)
                    )))
                }
                Ok(Some(Frame::Log(l))) => {
                    agent_log(&l.message);
                    continue;
                }
                Ok(Some(other)) => {
                    return Err(protocol(format!(
                        "the agent sent {} before Ready",
                        other.describe()
                    )))
                }
                Ok(None) => {}
                Err(e) => return Err(protocol(e.to_string())),
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
        tracing::debug!(
            kernel = %proto::quote(ready.kernel.as_bytes(), proto::QUOTE_MAX),
            agent = %proto::quote(ready.agent_version.as_bytes(), proto::QUOTE_MAX),
            "guest ready"
        );

        let run_started = Instant::now();
        let start_env = start.env.clone();
        let bytes = Frame::Start(start)
            .to_bytes()
            .map_err(|e| sys(format!("job too large: {e}")))?;
        console
            .write_all(&bytes)
            .await
            .map_err(|e| sys(format!("sending the job to the guest: {e}")))?;

        let deadline = tokio::time::Instant::now() + timeout;
        let mut io = Conversation {
            machine,
            console,
            decoder,
            buf,
            deadline,
            timeout,
            cancel,
            cancel_state: None,
            running: None,
        };
        let mut state = StepState::new(job, &start_env);
        for (i, step) in job.steps.iter().enumerate() {
            let index = i as u32;
            if io.cancel_state == Some(false) {
                break;
            }
            let (end, outputs) = match self.should_run(step, &mut state, io.cancel_state) {
                Err(message) => {
                    // A condition that cannot be evaluated fails the step.
                    sink.output(
                        index,
                        Stream::Stderr,
                        format!("kiln: step '{}': {message}\n", step.name).as_bytes(),
                    );
                    (not_run(index, 1, false), Vec::new())
                }
                Ok(false) => (not_run(index, 0, true), Vec::new()),
                Ok(true) => {
                    let spec = state
                        .spec(index, step, io.cancel_state.is_some())
                        .map_err(|m| sys(format!("step '{}': {m}", step.name)))?;
                    let frame = Frame::RunStep(spec);
                    if let Err(proto::ProtoError::TooLarge(n)) = frame.to_bytes() {
                        // The job's doing (its variables, or GITHUB_ENV grown
                        // step by step): the step fails, kiln does not.
                        let line = format!(
                            "kiln: step '{}' cannot be sent to the guest: its script and environment take {}, more than the {} one frame holds (did GITHUB_ENV grow too large?)\n",
                            step.name,
                            human_bytes(n as u64),
                            human_bytes(proto::MAX_FRAME as u64)
                        );
                        sink.output(index, Stream::Stderr, line.as_bytes());
                        (not_run(index, 1, false), Vec::new())
                    } else {
                        io.running = Some(index);
                        io.send(&frame).await?;
                        let end = io.wait_step(index, job, sink).await?;
                        io.running = None;
                        let mut warnings = Vec::new();
                        let outputs = state.apply_files(&end, &mut warnings);
                        for w in warnings {
                            // Parse errors may quote the guest's files.
                            let w = proto::quote(w.as_bytes(), 2 * proto::QUOTE_MAX);
                            sink.output(index, Stream::Stderr, format!("kiln: {w}\n").as_bytes());
                        }
                        (end, outputs)
                    }
                }
            };
            state.record(step, &end, &outputs);
            sink.step_end(&step.name, &end);
            result.steps.push(end);
        }
        let mut artifacts_over = false;
        if let Some((to, tar)) = artifacts {
            let paths: Vec<String> = job
                .artifacts
                .iter()
                .flat_map(|a| a.paths.iter().cloned())
                .collect();
            if !paths.is_empty() && io.cancel_state != Some(false) {
                let max = self.max_artifact_bytes;
                artifacts_over = io
                    .collect_artifacts(job, sink, paths, max, &tar, to)
                    .await?;
            }
        }
        // No more steps: the agent syncs and answers Done.
        io.send(&Frame::Finish).await?;
        io.wait_done(job, sink).await?;
        result.run_ms = run_started.elapsed().as_millis() as u64;
        let canceled = io.cancel_state.is_some();
        self.finish(job, result, canceled);
        if artifacts_over && result.failure.is_none() {
            // As GitLab fails a job whose artifacts are too large to upload.
            result.failure = Some(FailureReason::ScriptFailure);
            result.exit_code = 1;
        }
        Ok(())
    }

    /// Whether a step runs, given earlier failures, a cancel, its `when` and
    /// its condition (GitHub `if:`).
    fn should_run(
        &self,
        step: &Step,
        state: &mut StepState,
        cancel: Option<bool>,
    ) -> Result<bool, String> {
        let by_when = match cancel {
            Some(_) => step.when == StepWhen::Always,
            None => match step.when {
                StepWhen::OnSuccess => !state.failed,
                StepWhen::OnFailure => state.failed,
                StepWhen::Always => true,
            },
        };
        let Some(cond) = &step.condition else {
            return Ok(by_when);
        };
        state.contexts.status = Some(if cancel.is_some() {
            JobStatus::Cancelled
        } else if state.failed {
            JobStatus::Failure
        } else {
            JobStatus::Success
        });
        state.refresh_env_context();
        // GitHub: an `if:` replaces the implicit success() unless it names a
        // status function itself; `eval_condition` adds it when absent.
        if cancel.is_some() && !cond.contains("always()") && !cond.contains("cancelled()") {
            return Ok(false);
        }
        github::eval_condition(cond, &state.contexts).map_err(|e| format!("if: {e}"))
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

/// The console and everything needed to wait on it.
struct Conversation<'a> {
    machine: &'a mut Machine,
    console: &'a mut kiln_vmm::ConsoleStream,
    decoder: Decoder,
    buf: Vec<u8>,
    deadline: tokio::time::Instant,
    timeout: Duration,
    cancel: &'a mut watch::Receiver<Option<bool>>,
    /// `Some(graceful)` once a cancel was requested.
    cancel_state: Option<bool>,
    /// The step the agent is running: the only one it may send output for.
    running: Option<u32>,
}

fn sys(m: String) -> Early {
    (FailureReason::RunnerSystemFailure(m.clone()), m)
}

/// The guest broke the protocol. The agent never does, but a job running
/// as root can write to the agent's port: the job cannot go on, and the
/// message says why in one short line.
fn protocol(detail: String) -> Early {
    sys(format!(
        "protocol error from the guest: {detail} (a job running as root can write to the agent's port)"
    ))
}

/// An agent diagnostic, for the debug log only, cut to a sane length.
fn agent_log(message: &str) {
    tracing::debug!(target: "kiln::agent", "{}", proto::quote(message.as_bytes(), 1024));
}

impl Conversation<'_> {
    async fn send(&mut self, frame: &Frame) -> Result<(), Early> {
        let bytes = frame
            .to_bytes()
            .map_err(|e| sys(format!("frame too large: {e}")))?;
        self.console
            .write_all(&bytes)
            .await
            .map_err(|e| sys(format!("writing to the guest: {e}")))
    }

    /// Read more from the console; handles the job deadline and cancels.
    async fn fill(&mut self) -> Result<(), Early> {
        tokio::select! {
            r = self.console.read(&mut self.buf) => match r {
                Ok(0) | Err(_) => {
                    let status = self.machine.wait().await;
                    Err(sys(format!("the VM ended before the job finished ({status:?})")))
                }
                Ok(n) => {
                    self.decoder.push(&self.buf[..n]);
                    Ok(())
                }
            },
            _ = tokio::time::sleep_until(self.deadline) => Err((
                FailureReason::JobExecutionTimeout,
                format!("the job ran past its timeout of {:?}; the VM was killed", self.timeout),
            )),
            changed = self.cancel.changed(), if self.cancel_state != Some(false) => {
                if changed.is_err() {
                    // The sender is gone: nobody can cancel any more.
                    std::future::pending::<()>().await;
                }
                let graceful = self.cancel.borrow().unwrap_or(true);
                if !graceful {
                    return Err((FailureReason::Canceled, "canceled".into()));
                }
                if self.cancel_state.is_none() {
                    self.cancel_state = Some(true);
                    self.send(&Frame::Cancel(proto::Cancel { graceful: true })).await?;
                }
                Ok(())
            }
        }
    }

    /// The next frame that needs a decision (`StepEnd`, `Done`, ...);
    /// output, step starts and agent logs are passed on along the way.
    async fn next_event(&mut self, job: &JobSpec, sink: &mut dyn JobSink) -> Result<Frame, Early> {
        loop {
            while let Some(frame) = self
                .decoder
                .next_frame()
                .map_err(|e| protocol(e.to_string()))?
            {
                // Per-step state downstream (maskers, sections) exists only
                // for the step the host started: anything else is forged.
                match frame {
                    Frame::Output { step, stream, data } if Some(step) == self.running => {
                        sink.output(step, stream, &data)
                    }
                    Frame::StepStart(s) if Some(s.step) == self.running => {
                        let name = job
                            .steps
                            .get(s.step as usize)
                            .map(|s| s.name.as_str())
                            .unwrap_or("?");
                        sink.step_start(s.step, name);
                    }
                    f @ (Frame::Output { .. } | Frame::StepStart(_)) => {
                        let running = match self.running {
                            Some(i) => format!("step {i} was running"),
                            None => "no step was running".into(),
                        };
                        return Err(protocol(format!("{} while {running}", f.describe())));
                    }
                    Frame::Log(l) => agent_log(&l.message),
                    Frame::Fatal(f) => {
                        return Err(sys(format!(
                            "the guest agent failed: {}",
                            proto::quote(f.message.as_bytes(), proto::QUOTE_MAX)
                        )))
                    }
                    other => return Ok(other),
                }
            }
            self.fill().await?;
        }
    }

    /// Ask the agent for the artifact files, spool the tar stream to `tar`
    /// (bounded), and extract it into `to`. What could not be collected is
    /// said in the job's log. Returns whether the artifacts were over
    /// `max_bytes` (some were left out): the job then fails.
    async fn collect_artifacts(
        &mut self,
        job: &JobSpec,
        sink: &mut dyn JobSink,
        paths: Vec<String>,
        max_bytes: u64,
        tar: &Path,
        to: &Path,
    ) -> Result<bool, Early> {
        use std::io::Write;
        self.send(&Frame::CollectArtifacts(proto::CollectArtifacts {
            paths,
            exclude: Vec::new(),
            max_bytes,
        }))
        .await?;
        let io_err =
            |e: std::io::Error| sys(format!("spooling artifacts to {}: {e}", tar.display()));
        let mut file = std::io::BufWriter::new(std::fs::File::create(tar).map_err(io_err)?);
        let limit = max_bytes + ARTIFACT_TAR_OVERHEAD;
        let mut written = 0u64;
        let end = loop {
            match self.next_event(job, sink).await? {
                Frame::Artifact(chunk) => {
                    written += chunk.len() as u64;
                    if written > limit {
                        return Err(protocol(format!(
                            "more than {limit} bytes of artifacts (the limit is {max_bytes} bytes of files)"
                        )));
                    }
                    file.write_all(&chunk).map_err(io_err)?;
                }
                Frame::ArtifactsEnd(end) => break end,
                other => {
                    return Err(protocol(format!(
                        "{} while sending artifacts",
                        other.describe()
                    )))
                }
            }
        };
        file.flush().map_err(io_err)?;
        drop(file);
        let mut say = |line: String| {
            sink.output(0, Stream::Stderr, format!("kiln: {line}\n").as_bytes());
        };
        // The agent's own notes (guest data: quoted and counted there,
        // re-checked here).
        for p in end.problems.iter().take(proto::MAX_PROBLEMS + 1) {
            let max = 2 * proto::QUOTE_MAX + 100;
            let p = if proto::is_clean_line(p, max) {
                p.clone()
            } else {
                proto::quote(p.as_bytes(), max)
            };
            say(format!("artifact left out: {p}"));
        }
        let (tar, to2) = (tar.to_path_buf(), to.to_path_buf());
        let got = tokio::task::spawn_blocking(move || extract_artifacts(&tar, &to2))
            .await
            .map_err(|e| sys(format!("artifacts task: {e}")))?
            .map_err(|e| match e {
                ArtifactError::Io { .. } => sys(format!("extracting artifacts: {e}")),
                _ => protocol(e.to_string()),
            })?;
        for p in &got.problems {
            say(format!("artifact left out: {p}"));
        }
        tracing::debug!(files = got.files, bytes = got.bytes, "artifacts received");
        if end.truncated {
            say(format!(
                "ERROR: the job's artifacts are over the limit of {}: {} files ({}) were collected, \
                 {} more files ({}) were left out; failing the job",
                human_bytes(max_bytes),
                got.files,
                human_bytes(got.bytes),
                end.left_out_files,
                human_bytes(end.left_out_bytes),
            ));
        }
        Ok(end.truncated)
    }

    /// Stream output until the agent reports the end of step `index`.
    async fn wait_step(
        &mut self,
        index: u32,
        job: &JobSpec,
        sink: &mut dyn JobSink,
    ) -> Result<StepEnd, Early> {
        match self.next_event(job, sink).await? {
            Frame::StepEnd(end) if end.step == index => Ok(end),
            other => Err(protocol(format!(
                "{} while step {index} was running",
                other.describe()
            ))),
        }
    }

    /// After `Finish`: wait (at most 30 s more) for `Done`.
    async fn wait_done(&mut self, job: &JobSpec, sink: &mut dyn JobSink) -> Result<(), Early> {
        self.deadline = self
            .deadline
            .min(tokio::time::Instant::now() + Duration::from_secs(30));
        match self.next_event(job, sink).await? {
            Frame::Done => Ok(()),
            other => Err(protocol(format!("{} instead of Done", other.describe()))),
        }
    }
}

/// The record of a step that did not run: skipped, or failed before it
/// could start (e.g. its condition could not be evaluated).
fn not_run(step: u32, exit_code: i32, skipped: bool) -> StepEnd {
    StepEnd {
        step,
        exit_code,
        duration_ms: 0,
        timed_out: false,
        canceled: false,
        skipped,
        files: None,
    }
}

/// What carries from one step to the next: failures, file-command updates,
/// and the expression contexts (GitHub `steps.*.outputs`, `env`).
struct StepState {
    failed: bool,
    env: Vec<(String, String)>,
    path_adds: Vec<String>,
    contexts: Contexts,
    /// Give steps `GITHUB_ENV`/`GITHUB_OUTPUT`/`GITHUB_PATH` (GitHub jobs).
    file_commands: bool,
}

impl StepState {
    fn new(job: &JobSpec, start_env: &[(String, String)]) -> StepState {
        let file_commands = job
            .variables
            .iter()
            .any(|v| v.key == "GITHUB_ACTIONS" && v.value == "true");
        let mut s = StepState {
            failed: false,
            env: start_env.to_vec(),
            path_adds: Vec::new(),
            contexts: Contexts::default(),
            file_commands,
        };
        s.refresh_env_context();
        s
    }

    fn refresh_env_context(&mut self) {
        self.contexts
            .set("env", ExprValue::object(self.env.iter().cloned()));
    }

    /// The agent's spec for `step`: environment with file-command updates,
    /// runtime `${{ }}` expressions substituted.
    fn spec(&mut self, index: u32, step: &Step, canceled: bool) -> Result<StepSpec, String> {
        let mut env = self.env.clone();
        // GitLab: CI_JOB_STATUS is `running` in the script and the job's
        // outcome in after_script (the steps that run whatever happened).
        if env
            .iter()
            .any(|(k, _)| k == "GITLAB_CI" || k == "CI_JOB_STATUS")
        {
            let status = if step.when != StepWhen::Always {
                "running"
            } else if canceled {
                "canceled"
            } else if self.failed {
                "failed"
            } else {
                "success"
            };
            env.retain(|(k, _)| k != "CI_JOB_STATUS");
            env.push(("CI_JOB_STATUS".into(), status.into()));
        }
        for (k, v) in &step.env {
            env.retain(|(key, _)| key != k);
            env.push((k.clone(), v.clone()));
        }
        let mut script = step.script.clone();
        if step.runtime_expressions {
            self.refresh_env_context();
            self.contexts.partial = false;
            script = github::substitute(&script, &self.contexts).map_err(|e| e.to_string())?;
            for (_, v) in env.iter_mut() {
                *v = github::substitute(v, &self.contexts).map_err(|e| e.to_string())?;
            }
        }
        if !self.path_adds.is_empty() {
            let current = env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let path = github::prepend_path(&current, &self.path_adds);
            env.retain(|(k, _)| k != "PATH");
            env.push(("PATH".into(), path));
        }
        let (argv, script) = match &step.shell {
            Shell::Sh => (vec!["sh".into(), "-e".into(), "{script}".into()], script),
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
                script,
            ),
            Shell::Custom(args) => (
                args.iter().map(|a| a.replace("{0}", "{script}")).collect(),
                script,
            ),
            Shell::Exec(argv) => (argv.clone(), String::new()),
        };
        Ok(StepSpec {
            index,
            name: step.name.clone(),
            argv,
            script,
            env,
            workdir: step.working_dir.clone().unwrap_or_default(),
            timeout_ms: step.timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
            file_commands: self.file_commands,
        })
    }

    /// Apply a step's file commands; returns its outputs.
    fn apply_files(&mut self, end: &StepEnd, warnings: &mut Vec<String>) -> Vec<(String, String)> {
        let Some(files) = &end.files else {
            return Vec::new();
        };
        // The agent cuts each file at MAX_FILE_COMMANDS; a forged StepEnd
        // may not have: the host holds to the same bound.
        let cut = |s: &'_ str| -> (String, bool) {
            let mut i = s.len().min(proto::MAX_FILE_COMMANDS);
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            (s[..i].to_string(), i < s.len())
        };
        let (env, e_cut) = cut(&files.env);
        let (output, o_cut) = cut(&files.output);
        let (path, p_cut) = cut(&files.path);
        if files.truncated || e_cut || o_cut || p_cut {
            warnings.push(
                "a GITHUB_ENV/GITHUB_OUTPUT/GITHUB_PATH file was over 256 KiB and was cut".into(),
            );
        }
        match github::parse_env_file(&env) {
            Ok(vars) => {
                for (k, v) in vars {
                    self.env.retain(|(key, _)| key != &k);
                    self.env.push((k, v));
                }
            }
            Err(e) => warnings.push(format!("GITHUB_ENV: {e}")),
        }
        self.path_adds.splice(0..0, github::parse_path_file(&path));
        match github::parse_file_commands(&output) {
            Ok(o) => o,
            Err(e) => {
                warnings.push(format!("GITHUB_OUTPUT: {e}"));
                Vec::new()
            }
        }
    }

    /// Record how a step went, for later `when` and `steps.<id>` lookups.
    fn record(&mut self, step: &Step, end: &StepEnd, outputs: &[(String, String)]) {
        let ok = end.exit_code == 0;
        if !end.skipped && !ok && !step.allow_failure {
            self.failed = true;
        }
        if let Some(id) = &step.id {
            let outcome = if end.skipped {
                "skipped"
            } else if end.canceled {
                "cancelled"
            } else if ok {
                "success"
            } else {
                "failure"
            };
            let conclusion = if !ok && !end.skipped && step.allow_failure {
                "success"
            } else {
                outcome
            };
            self.contexts.set_step(id, outcome, conclusion, outputs);
        }
    }
}

/// The agent's `Start` for a job on an image: image Env, then the job's
/// variables; the job's working directory, else the image's, else `/`.
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
    Start {
        env,
        workdir,
        user: rootfs.config.user.clone(),
        network: None,
    }
}

/// Tar headers, GNU long names and padding around the artifact files'
/// contents, at most: per file a header, a long name of up to
/// [`proto::MAX_ARTIFACT_PATH`] bytes with its header, and padding.
const ARTIFACT_TAR_OVERHEAD: u64 = proto::MAX_ARTIFACT_FILES * 6 * 1024 + (1 << 20);
/// Most bytes of names in one job's artifact archive (all paths together).
const MAX_ARTIFACT_NAME_BYTES: u64 = 64 << 20;
/// Most PAX extension bytes per entry (kiln's agent writes none).
const MAX_PAX_BYTES: u64 = 64 * 1024;

/// What extracting the guest's artifact archive gave.
#[derive(Debug, Default)]
pub struct Extracted {
    pub files: u64,
    /// Bytes of file contents.
    pub bytes: u64,
    /// Entries that were not extracted, and why (guest names quoted, at most
    /// [`proto::MAX_PROBLEMS`] lines plus a count).
    pub problems: Vec<String>,
}

/// Why the guest's artifact archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("malformed artifact archive: {0}")]
    Malformed(String),
    #[error("the artifact archive has more than {0}")]
    TooMany(String),
}

/// Extract the guest's artifact tar into `to` (created; must not exist).
/// The tar is hostile: only regular files and directories with plain
/// relative paths are written, never through a symlink (none is ever
/// created), never over an existing file, without setuid/setgid bits.
/// Every size it controls is bounded before anything is allocated: names
/// ([`proto::MAX_ARTIFACT_PATH`] each, [`MAX_ARTIFACT_NAME_BYTES`] in all),
/// extension headers, the number of files and of directories. Names need
/// not be UTF-8.
pub fn extract_artifacts(tar: &Path, to: &Path) -> Result<Extracted, ArtifactError> {
    use std::ffi::OsString;
    use std::io::Read;
    use std::os::unix::ffi::OsStringExt;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Component;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| ArtifactError::Io { path, err }
    };
    let bad = |e: std::io::Error| ArtifactError::Malformed(e.to_string());
    std::fs::create_dir(to).map_err(io(to))?;
    let file = std::fs::File::open(tar).map_err(io(tar))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    // Raw: the tar crate would read GNU long names and PAX headers of any
    // size into memory; here they are bounded first.
    let entries = archive.entries().map_err(bad)?.raw(true);
    let mut out = Extracted::default();
    let mut problems = 0usize;
    let mut problem = |out: &mut Extracted, name: &[u8], why: &str| {
        problems += 1;
        if out.problems.len() < proto::MAX_PROBLEMS {
            out.problems
                .push(format!("{}: {why}", proto::quote(name, proto::QUOTE_MAX)));
        }
    };
    let (mut dirs, mut name_bytes) = (0u64, 0u64);
    let max_dirs = 2 * proto::MAX_ARTIFACT_FILES;
    let mut long_name: Option<Vec<u8>> = None;
    for entry in entries {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        let size = entry.header().entry_size().map_err(bad)?;
        let long = kind.is_gnu_longname() || kind.is_gnu_longlink();
        if long || kind.is_pax_local_extensions() || kind.is_pax_global_extensions() {
            let limit = if long {
                proto::MAX_ARTIFACT_PATH as u64 + 1
            } else {
                MAX_PAX_BYTES
            };
            if size > limit {
                return Err(ArtifactError::Malformed(format!(
                    "an extension header of {size} bytes (at most {limit})"
                )));
            }
            let mut data = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut data).map_err(bad)?;
            if kind.is_gnu_longname() {
                if long_name.is_some() {
                    return Err(ArtifactError::Malformed(
                        "two long names for one entry".into(),
                    ));
                }
                while data.last() == Some(&0) {
                    data.pop();
                }
                long_name = Some(data);
            }
            // Long link names and PAX records: kiln's agent writes none,
            // and links are never extracted; ignored.
            continue;
        }
        let name = match long_name.take() {
            Some(n) => n,
            None => entry.path_bytes().into_owned(),
        };
        name_bytes += name.len() as u64;
        if name_bytes > MAX_ARTIFACT_NAME_BYTES {
            return Err(ArtifactError::TooMany(format!(
                "{MAX_ARTIFACT_NAME_BYTES} bytes of names"
            )));
        }
        let rel = PathBuf::from(OsString::from_vec(name.clone()));
        if name.len() > proto::MAX_ARTIFACT_PATH
            || rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            problem(&mut out, &name, "not a plain relative path");
            continue;
        }
        if rel.components().any(|c| c.as_os_str().len() > 255) {
            problem(&mut out, &name, "a name in it is longer than 255 bytes");
            continue;
        }
        if kind.is_dir() {
            dirs += make_dirs(to, &rel)?;
            if dirs > max_dirs {
                return Err(ArtifactError::TooMany(format!("{max_dirs} directories")));
            }
            continue;
        }
        if !kind.is_file() {
            // Symlinks, hard links, devices: never extracted.
            problem(&mut out, &name, "not a regular file");
            continue;
        }
        out.files += 1;
        if out.files > proto::MAX_ARTIFACT_FILES {
            return Err(ArtifactError::TooMany(format!(
                "{} files",
                proto::MAX_ARTIFACT_FILES
            )));
        }
        if let Some(parent) = rel.parent() {
            dirs += make_dirs(to, parent)?;
            if dirs > max_dirs {
                return Err(ArtifactError::TooMany(format!("{max_dirs} directories")));
            }
        }
        let dest = to.join(&rel);
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode | 0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&dest)
            .map_err(io(&dest))?;
        std::io::copy(&mut entry, &mut f).map_err(io(&dest))?;
        out.bytes += size;
    }
    if problems > out.problems.len() {
        let more = problems - out.problems.len();
        out.problems.push(format!("... and {more} more"));
    }
    Ok(out)
}

/// Create the directories of `rel` below `root` one by one, never through
/// anything but a real directory. Returns how many were created.
fn make_dirs(root: &Path, rel: &Path) -> Result<u64, ArtifactError> {
    let mut path = root.to_path_buf();
    let mut made = 0;
    for c in rel.components() {
        path.push(c);
        match std::fs::create_dir(&path) {
            Ok(()) => made += 1,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                    return Err(ArtifactError::Malformed(format!(
                        "{} is both a file and a directory",
                        proto::quote(
                            path.strip_prefix(root)
                                .unwrap_or(&path)
                                .as_os_str()
                                .as_encoded_bytes(),
                            proto::QUOTE_MAX
                        )
                    )));
                }
            }
            Err(err) => return Err(ArtifactError::Io { path, err }),
        }
    }
    Ok(made)
}

/// `n` bytes for people: "512 bytes", "3.0 MiB", "4.0 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
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
        let spec = StepState::new(&job, &s.env)
            .spec(0, &job.steps[0], false)
            .unwrap();
        assert_eq!(spec.argv, vec!["sh", "-e", "{script}"]);
        assert!(!spec.file_commands, "only GitHub jobs get file commands");
        job.working_dir = Some("/builds/p".into());
        assert_eq!(build_start(&job, &rootfs()).workdir, "/builds/p");
    }

    #[test]
    fn shells_map_to_argv() {
        let mut st = Step::script("s", "x");
        st.shell = Shell::Custom(vec!["python3".into(), "{0}".into()]);
        st.timeout = Some(Duration::from_secs(2));
        st.env.push(("A".into(), "step".into()));
        let mut job = JobSpec::single("j", "img", st);
        job.variables.push(Variable::new("GITHUB_ACTIONS", "true"));
        let s = build_start(&job, &rootfs());
        let mut state = StepState::new(&job, &s.env);
        state.path_adds = vec!["/opt/x".into()];
        let spec = state.spec(4, &job.steps[0], false).unwrap();
        assert_eq!(spec.argv, vec!["python3", "{script}"]);
        assert_eq!(
            (spec.index, spec.timeout_ms, spec.file_commands),
            (4, 2000, true)
        );
        assert!(spec.env.contains(&("A".into(), "step".into())));
        assert!(
            spec.env.contains(&("PATH".into(), "/opt/x:/bin".into())),
            "{:?}",
            spec.env
        );
    }

    #[test]
    fn hostile_artifact_tars_cannot_escape_or_plant_links() {
        let d = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |kind: tar::EntryType, path: &str, link: Option<&str>, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            // Write the name bytes raw, so `..` and absolute paths get through.
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_size(data.len() as u64);
            h.set_mode(0o4755);
            h.set_cksum();
            b.append(&h, data).unwrap();
        };
        add(tar::EntryType::Symlink, "evil", Some("/etc"), b"");
        add(tar::EntryType::Regular, "evil/passwd", None, b"owned");
        add(tar::EntryType::Regular, "../escape.txt", None, b"x");
        add(tar::EntryType::Regular, "/abs.txt", None, b"x");
        add(tar::EntryType::Char, "dev-null", None, b"");
        add(tar::EntryType::Regular, "dist/ok.txt", None, b"fine");
        add(tar::EntryType::Regular, "dist/ok.txt", None, b"again");
        let tar_path = d.path().join("a.tar");
        std::fs::write(&tar_path, b.into_inner().unwrap()).unwrap();
        let to = d.path().join("out");
        // The duplicate is refused (never written over).
        assert!(extract_artifacts(&tar_path, &to).is_err());
        assert_eq!(std::fs::read(to.join("dist/ok.txt")).unwrap(), b"fine");
        assert!(
            std::fs::symlink_metadata(to.join("evil")).is_ok_and(|m| m.is_dir()),
            "a real directory, no link"
        );
        assert_eq!(std::fs::read(to.join("evil/passwd")).unwrap(), b"owned");
        assert!(!to.join("dev-null").exists());
        assert!(!d.path().join("escape.txt").exists() && !to.join("abs.txt").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(to.join("dist/ok.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "no setuid from the guest");
    }

    #[test]
    fn file_commands_update_env_path_and_outputs() {
        let job = JobSpec::single("j", "img", Step::script("s", "x"));
        let mut state = StepState::new(&job, &[("PATH".into(), "/bin".into())]);
        let end = StepEnd {
            step: 0,
            exit_code: 0,
            duration_ms: 1,
            timed_out: false,
            canceled: false,
            skipped: false,
            files: Some(proto::FileCommands {
                env: "X=1\nML<<EOF\na\nb\nEOF\n".into(),
                output: "o=v\n".into(),
                path: "/p1\n".into(),
                truncated: false,
            }),
        };
        let mut w = Vec::new();
        let outputs = state.apply_files(&end, &mut w);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(outputs, vec![("o".to_string(), "v".to_string())]);
        assert!(state.env.contains(&("ML".into(), "a\nb".into())));
        assert_eq!(state.path_adds, vec!["/p1"]);
    }

    /// A tar header block for `name` (raw bytes) of `kind` and `size`.
    fn raw_header(kind: u8, name: &[u8], size: u64) -> [u8; 512] {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        *h.as_bytes()
    }

    #[test]
    fn artifact_long_names_are_bounded_before_they_are_read() {
        let d = tempfile::tempdir().unwrap();
        // A GNU long name declaring 1.5 GiB (the tar crate would read it all
        // into memory); the file itself is tiny.
        let mut t = raw_header(b'L', b"././@LongLink", 3 << 29).to_vec();
        t.extend_from_slice(&[b'a'; 1024]);
        let tar_path = d.path().join("a.tar");
        std::fs::write(&tar_path, &t).unwrap();
        let e = extract_artifacts(&tar_path, &d.path().join("out")).unwrap_err();
        assert!(
            e.to_string()
                .contains("extension header of 1610612736 bytes"),
            "{e}"
        );
        // A legitimate long name, and a name that is not UTF-8.
        let long = format!("{}/f.txt", vec!["d".repeat(100); 3].join("/"));
        let mut t = raw_header(b'L', b"././@LongLink", long.len() as u64 + 1).to_vec();
        let mut name = long.clone().into_bytes();
        name.push(0);
        name.resize(512, 0);
        t.extend_from_slice(&name);
        t.extend_from_slice(&raw_header(b'0', b"ignored", 2));
        t.extend_from_slice(b"hi");
        t.resize(t.len() + 510, 0);
        t.extend_from_slice(&raw_header(b'0', b"odd\xffname", 1));
        t.push(b'x');
        t.resize(t.len() + 511, 0);
        let mut t2 = raw_header(b'L', b"././@LongLink", 301).to_vec();
        let mut n2 = vec![b'e'; 300];
        n2.resize(512, 0);
        t2.extend_from_slice(&n2);
        t2.extend_from_slice(&raw_header(b'0', b"x", 0));
        t.extend_from_slice(&t2);
        t.resize(t.len() + 1024, 0);
        std::fs::write(&tar_path, &t).unwrap();
        let to = d.path().join("out2");
        let got = extract_artifacts(&tar_path, &to).unwrap();
        assert_eq!((got.files, got.bytes), (2, 3), "{:?}", got.problems);
        assert_eq!(
            got.problems.len(),
            1,
            "the 300-byte name: {:?}",
            got.problems
        );
        assert_eq!(std::fs::read(to.join(&long)).unwrap(), b"hi");
        use std::os::unix::ffi::OsStrExt;
        let odd = to.join(std::ffi::OsStr::from_bytes(b"odd\xffname"));
        assert_eq!(std::fs::read(odd).unwrap(), b"x");
    }

    #[test]
    fn forged_file_commands_are_held_to_the_agents_bound() {
        let job = JobSpec::single("j", "img", Step::script("s", "x"));
        let mut state = StepState::new(&job, &[]);
        let big = format!("BIG={}\n", "v".repeat(proto::MAX_FILE_COMMANDS * 3));
        let end = StepEnd {
            step: 0,
            exit_code: 0,
            duration_ms: 1,
            timed_out: false,
            canceled: false,
            skipped: false,
            files: Some(proto::FileCommands {
                env: big,
                output: String::new(),
                path: String::new(),
                truncated: false,
            }),
        };
        let mut w = Vec::new();
        state.apply_files(&end, &mut w);
        assert!(w.iter().any(|w| w.contains("was cut")), "{w:?}");
        let total: usize = state.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total <= proto::MAX_FILE_COMMANDS, "{total}");
    }

    #[test]
    fn sizes_read_for_people() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(786432), "768.0 KiB");
        assert_eq!(human_bytes(4 << 30), "4.0 GiB");
    }
}
