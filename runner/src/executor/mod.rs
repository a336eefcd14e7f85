//! The executor: one job, one fresh VM.
//!
//! prepare (kernel, initramfs, rootfs, scratch disk) -> boot -> `Ready` ->
//! `Start` -> stream frames to the sink -> `Done` -> destroy. Every exit path
//! destroys the VM and removes the job's directory; every failure becomes a
//! [`FailureReason`] a provider can report.
//!
//! This file is the VM's lifecycle (prepare, job directory, boot, drive,
//! destroy). Around it: `config` (the settings and their one builder),
//! `conversation` (the framed host ↔ guest conversation), `steps` (which
//! step runs, with what), `artifacts` (the files a job sends back) and
//! `outcome` (what a job ended with).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_agent::proto::{self, Start};
use kiln_images::scratch::{mkfs_ext4, Ext4};
use kiln_images::{Cache, ImagePolicy, ImageSource, Images, Rootfs};
use kiln_pipelines::{JobSource, JobSpec};
use kiln_vmm::{Disk, KvmSupport, Machine, MachineConfig};
use tokio::sync::watch;

use crate::joblog::JobSink;

mod artifacts;
mod caches;
mod config;
mod conversation;
mod outcome;
mod services;
mod snapshot;
mod steps;
mod workflow;

pub use artifacts::{extract_artifacts, extract_tar, ArtifactError, Extracted};
pub use caches::saved_when;
pub use config::{
    ExecutorConfig, ExecutorConfigBuilder, ExecutorConfigError, DEFAULT_BOOT_TIMEOUT,
    DEFAULT_DISK_GIB, DEFAULT_JOB_TIMEOUT, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS,
};
pub use outcome::{error_chain, human_bytes, BootPhase, FailureReason, JobResult};
pub use services::{DEFAULT_SERVICES_WAIT, HEALTHCHECK_PORT_VAR, WAIT_VAR};
pub use snapshot::SnapshotStartError;
pub use steps::build_start;

use conversation::Conversation;
use outcome::{sys, Early};

/// Runs jobs, each in a fresh VM.
pub struct Executor {
    config: ExecutorConfig,
    /// Job images; one registry client for every job.
    images: Images,
    kvm: KvmSupport,
    initramfs: PathBuf,
    networks: crate::network::Networks,
    /// Jobs from a snapshot (`snapshot`).
    snapshots: snapshot::Snapshots,
    /// Most artifact bytes (file contents) one job may send back.
    max_artifact_bytes: u64,
    /// Most bytes (file contents) of one cache a job may send back.
    max_cache_bytes: u64,
}

/// Where the files a job sends back after its steps go.
#[derive(Debug, Default, Clone, Copy)]
pub struct Collect<'a> {
    /// The artifacts (see [`Executor::run_collecting`]).
    pub artifacts_to: Option<&'a Path>,
    /// The files of each cache the job saves: `job.cache[i]` into
    /// `<caches_to>/<i>` (a directory that exists; see `crate::cache`).
    pub caches_to: Option<&'a Path>,
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

/// One job in a started VM: what the conversation needs besides the VM.
struct Run<'a> {
    job: &'a JobSpec,
    sink: &'a mut dyn JobSink,
    result: &'a mut JobResult,
    /// When the VM was started.
    boot_started: Instant,
    /// The job's timeout, from `Start`.
    timeout: Duration,
    cancel: &'a mut watch::Receiver<Option<bool>>,
    /// Where to extract the artifacts, and where to spool their tar.
    artifacts: Option<(&'a Path, PathBuf)>,
    /// A VM restored from a snapshot: its agent's `Ready`, already
    /// received (the handshake is done).
    ready: Option<proto::Ready>,
    /// Where to extract the caches' files, and where to spool their tars.
    caches: Option<(&'a Path, PathBuf)>,
}

/// Why an executor could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("opening the cache")]
    Cache(#[source] kiln_images::ImageError),
    #[error("creating the run directory {}", path.display())]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Backend(#[from] kiln_vmm::MachineError),
    #[error("building the guest initramfs")]
    Initramfs(#[source] kiln_images::ImageError),
    #[error("setting up the image service")]
    Images(#[source] kiln_images::ImageError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
}

impl Executor {
    /// Check the host, build (or find) the initramfs, clean leftovers of a
    /// kiln that died.
    pub fn new(config: ExecutorConfig) -> Result<Executor, ExecutorError> {
        let cache = Cache::open(&config.cache_dir).map_err(ExecutorError::Cache)?;
        cache.clean_tmp();
        std::fs::create_dir_all(&config.run_dir).map_err(|source| ExecutorError::RunDir {
            path: config.run_dir.clone(),
            source,
        })?;
        let stale = crate::paths::clean_stale_jobs(&config.run_dir);
        if stale > 0 {
            tracing::info!("removed {stale} job directories left by a kiln that died");
        }
        let kvm = kiln_vmm::probe_kvm();
        let (_, why) = config.backend.resolve(&kvm)?;
        if let Some(why) = why {
            tracing::info!("{why}");
        }
        let networks = crate::network::Networks::new(&config.network, &config.kernel)?;
        let initramfs = kiln_images::build_initramfs(&cache, &config.agent, &config.kernel)
            .map_err(ExecutorError::Initramfs)?;
        let images = Images::new(cache, config.images.clone()).map_err(ExecutorError::Images)?;
        let snapshots = snapshot::Snapshots::new(&config.cache_dir);
        Ok(Executor {
            config,
            images,
            kvm,
            initramfs,
            networks,
            snapshots,
            max_artifact_bytes: proto::MAX_ARTIFACT_BYTES,
            max_cache_bytes: proto::MAX_ARTIFACT_BYTES,
        })
    }

    pub fn cache(&self) -> &Cache {
        self.images.cache()
    }

    /// Limit the artifact bytes (file contents) a job may send back; at
    /// most, and by default, [`proto::MAX_ARTIFACT_BYTES`]. A job whose
    /// artifacts are over it fails, as GitLab fails an upload that is too
    /// large.
    pub fn set_max_artifact_bytes(&mut self, bytes: u64) {
        self.max_artifact_bytes = bytes.min(proto::MAX_ARTIFACT_BYTES);
    }

    /// Limit the bytes (file contents) of one cache a job may send back
    /// (at most [`proto::MAX_ARTIFACT_BYTES`]); a larger cache is not saved.
    pub fn set_max_cache_bytes(&mut self, bytes: u64) {
        self.max_cache_bytes = bytes.min(proto::MAX_ARTIFACT_BYTES);
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
    pub async fn prepare_image(&self, source: &ImageSource) -> Result<Rootfs, FailureReason> {
        self.images
            .rootfs(source, std::sync::Arc::new(kiln_images::NoProgress))
            .await
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
        cancel: watch::Receiver<Option<bool>>,
        artifacts_to: Option<&Path>,
    ) -> JobResult {
        // `kiln run-job` and local pipelines: the image as `--image` takes it.
        let image = ImageSource::parse_with(&job.image, &ImagePolicy::local());
        self.run_image(job, image.as_ref(), sink, cancel, artifacts_to)
            .await
    }

    /// [`Executor::run_collecting`] on `image`: the job's image as its
    /// provider parsed it with its policy, or why it could not (reported as
    /// an image failure).
    pub async fn run_image(
        &self,
        job: &JobSpec,
        image: Result<&ImageSource, &kiln_images::ImageError>,
        sink: &mut dyn JobSink,
        cancel: watch::Receiver<Option<bool>>,
        artifacts_to: Option<&Path>,
    ) -> JobResult {
        let collect = Collect {
            artifacts_to,
            caches_to: None,
        };
        self.run_image_with(job, image, sink, cancel, collect).await
    }

    /// [`Executor::run_image`], collecting what `collect` asks for: the
    /// artifacts, and the files of the caches the job saves.
    pub async fn run_image_with(
        &self,
        job: &JobSpec,
        image: Result<&ImageSource, &kiln_images::ImageError>,
        sink: &mut dyn JobSink,
        mut cancel: watch::Receiver<Option<bool>>,
        collect: Collect<'_>,
    ) -> JobResult {
        let artifacts_to = collect.artifacts_to;
        let t0 = Instant::now();
        let mut result = JobResult::pending(&job.image);
        let rootfs = match image {
            Ok(source) => self.prepare_image(source).await,
            Err(e) => Err(FailureReason::ImagePullFailure(error_chain(&e))),
        };
        let rootfs = match rootfs {
            Ok(r) => r,
            Err(reason) => {
                result.failure = Some(reason);
                return result;
            }
        };
        let services = match self.prepare_services(job).await {
            Ok(s) => s,
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
        start.services = services.start(job);
        // Dropped after the VM is gone (below), before the job's directory.
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
        // Services' disks last: their serials name them.
        disks.extend(services.disks());

        let mconfig = MachineConfig {
            kernel: self.config.kernel.image.clone(),
            initramfs: self.initramfs.clone(),
            cmdline,
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            disks,
            console_port: proto::AGENT_PORT_NAME.into(),
            run_dir: dir.0.join("vm"),
            serial_log_limit: 256 * 1024,
            // Until QEMU connects its console or the VMM process reports
            // the VM built; a loaded host (TCG in TCG in the nested tier)
            // has taken more than 10 s. The boot timeout bounds the rest.
            start_timeout: Duration::from_secs(60).min(self.config.boot_timeout),
            qemu: self.config.qemu.clone(),
            isolation: kiln_vmm::Isolation {
                mode: self.config.isolation,
                vmm_program: self.config.vmm_program.clone(),
                ..Default::default()
            },
            test_forbidden_syscall: None,
            network: network.machine(),
        };
        let boot_started = Instant::now();
        let root = snapshot::JobRoot {
            rootfstype: &rootfs.fstype,
            workdir: workspace.as_ref().map(|_| start.workdir.as_str()),
        };
        let started = self
            .start_vm(mconfig, &dir.0, root, &mut result.boot_phases)
            .await;
        let (machine, console, ready) = match started {
            Ok(m) => m,
            Err(e) => {
                result.failure = Some(FailureReason::RunnerSystemFailure(error_chain(&e)));
                return result;
            }
        };
        result.backend = machine.describe();
        if ready.is_some() {
            result.backend.push_str(", from a snapshot");
        }
        let timeout = job.timeout.unwrap_or(self.config.default_job_timeout);
        let run = Run {
            job,
            sink,
            result: &mut result,
            boot_started,
            timeout,
            cancel: &mut cancel,
            ready,
            artifacts: artifacts_to.map(|to| (to, dir.0.join("artifacts.tar"))),
            caches: collect.caches_to.map(|to| (to, dir.0.clone())),
        };
        let outcome = self.drive(machine, console, start, run).await;
        if let Err((reason, serial)) = outcome {
            if let FailureReason::RunnerSystemFailure(_) = reason {
                result.debug_log = self.keep_serial_log(&dir.0, &serial);
            }
            result.failure = Some(reason);
        }
        // Its removal runs iptables and waits for a lock: off the runtime's
        // threads, but finished before the job's result is.
        let _ = tokio::task::spawn_blocking(move || drop(network)).await;
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
    async fn drive(
        &self,
        mut machine: Machine,
        mut console: kiln_vmm::ConsoleStream,
        start: Start,
        mut run: Run<'_>,
    ) -> Result<(), (FailureReason, Vec<u8>)> {
        let r = self
            .converse(&mut machine, &mut console, start, &mut run)
            .await;
        let (result, boot_started) = (run.result, run.boot_started);
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

    /// The conversation with the agent: the boot handshake, `Start`, the
    /// steps, the artifacts, `Finish`; then the job's outcome.
    async fn converse(
        &self,
        machine: &mut Machine,
        console: &mut kiln_vmm::ConsoleStream,
        start: Start,
        run: &mut Run<'_>,
    ) -> Result<(), Early> {
        let mut io = Conversation::new(machine, console, run.cancel, self.config.boot_timeout);
        let ready = match run.ready.take() {
            Some(ready) => ready,
            None => {
                let t = Instant::now();
                let ready = io.handshake(run.job, run.sink).await?;
                run.result
                    .boot_phases
                    .push(BootPhase::since("cold boot to agent Ready", t));
                ready
            }
        };
        if ready.protocol != proto::PROTOCOL_VERSION {
            return Err(sys(format!(
                "the guest agent speaks protocol {} but kiln speaks {}; rebuild the agent",
                ready.protocol,
                proto::PROTOCOL_VERSION
            )));
        }
        run.result.boot_ms = run.boot_started.elapsed().as_millis() as u64;
        run.result.guest_boot_ms = ready.boot_ms;
        tracing::debug!(
            kernel = %proto::quote(ready.kernel.as_bytes(), proto::QUOTE_MAX),
            agent = %proto::quote(ready.agent_version.as_bytes(), proto::QUOTE_MAX),
            "guest ready"
        );

        let run_started = Instant::now();
        let start_env = start.env.clone();
        let services = start.services.clone();
        io.start(start, run.timeout).await?;
        if let Some(s) = &services {
            services::await_services(&mut io, run.job, s, run.sink).await?;
        }
        run.result.outputs = steps::run_steps(
            &mut io,
            run.job,
            &start_env,
            run.sink,
            &mut run.result.steps,
        )
        .await?;
        if let Some((to, dir)) = &run.caches {
            // gitlab-runner's order: archive_cache, then the artifacts.
            caches::collect_caches(
                &mut io,
                run.job,
                run.sink,
                run.result,
                to,
                dir,
                self.max_cache_bytes,
            )
            .await?;
        }
        let mut artifacts_over = false;
        if let Some((to, tar)) = &run.artifacts {
            let paths: Vec<String> = run
                .job
                .artifacts
                .iter()
                .flat_map(|a| a.paths.iter().cloned())
                .collect();
            if !paths.is_empty() && io.cancel_state() != Some(false) {
                let max = self.max_artifact_bytes;
                artifacts_over =
                    artifacts::collect_artifacts(&mut io, run.job, run.sink, paths, max, tar, to)
                        .await?;
            }
        }
        io.finish(run.job, run.sink).await?;
        run.result.run_ms = run_started.elapsed().as_millis() as u64;
        let canceled = io.cancel_state().is_some();
        run.result.settle(run.job, canceled);
        if artifacts_over && run.result.failure.is_none() {
            // As GitLab fails a job whose artifacts are too large to upload.
            run.result.failure = Some(FailureReason::ScriptFailure);
            run.result.exit_code = 1;
        }
        Ok(())
    }
}
