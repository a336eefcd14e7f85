//! [`ExecutorConfig`]: the settings every job of one executor runs with,
//! their defaults (the `DEFAULT_*` constants here, the only place they are
//! written; `kiln run-job`'s flags and `kiln.toml` default to them), and the
//! one builder every front end uses: `kiln run-job`, the GitLab daemon and
//! the tests.
//!
//! Nothing here reads the process environment: the edge (`main.rs`) reads
//! it and passes paths down.

use std::path::PathBuf;
use std::time::Duration;

use kiln_images::{Cache, ImageError, ImagesOptions, Kernel};
use kiln_vmm::{BackendKind, IsolationMode, QemuOptions};

use crate::agent::{self, AgentError};

/// vCPUs per VM.
pub const DEFAULT_VCPUS: u32 = 2;
/// Guest memory, MiB.
pub const DEFAULT_MEMORY_MIB: u32 = 2048;
/// The per-VM scratch disk (and the workspace disk), GiB; sparse.
pub const DEFAULT_DISK_GIB: u64 = 16;
/// From starting the VM to the agent's `Ready`.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// A job's timeout when it sets none: GitLab's default for a project (60
/// minutes). GitLab sends each job's own timeout; `kiln run-job --timeout`
/// defaults to this.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(3600);

/// Settings for all jobs an executor runs. Build it with
/// [`ExecutorConfig::builder`]; the fields stay public so that a caller
/// (a test) can adjust one afterwards.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub cache_dir: PathBuf,
    /// How job images are pulled, converted and cached.
    pub images: ImagesOptions,
    /// Per-VM files go under here.
    pub run_dir: PathBuf,
    pub agent: PathBuf,
    pub kernel: Kernel,
    pub backend: BackendKind,
    /// The jail around the kvm backend's VMM process.
    pub isolation: IsolationMode,
    /// The `kiln-vmm` executable (kvm backend); `None`: found next to kiln.
    pub vmm_program: Option<PathBuf>,
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
    /// How the qemu backend runs QEMU.
    pub qemu: QemuOptions,
    /// The jobs' network (`crate::network`); default: none.
    pub network: crate::network::NetworkConfig,
    /// Start jobs from a snapshot where one can be used (kvm backend, no
    /// network); default: on.
    pub snapshots: bool,
}

/// Why an [`ExecutorConfig`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorConfigError {
    #[error("opening the cache {}", path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error(
        "provisioning the default guest kernel (or name one: `--kernel`, or `kernel` in kiln.toml)"
    )]
    DefaultKernel(#[source] ImageError),
    #[error("the guest kernel {}", path.display())]
    Kernel {
        path: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// Which guest kernel the VMs boot.
#[derive(Debug, Clone)]
enum KernelChoice {
    /// The cache's default kernel (fetched into the cache if missing).
    Default,
    /// A kernel image, and its modules.
    Files {
        image: PathBuf,
        modules: Option<PathBuf>,
    },
    /// One already found.
    Ready(Kernel),
}

/// Builds an [`ExecutorConfig`]: everything not set has its `DEFAULT_*`.
#[derive(Debug, Clone)]
#[must_use]
pub struct ExecutorConfigBuilder {
    cache_dir: PathBuf,
    images: ImagesOptions,
    run_dir: PathBuf,
    agent: Option<PathBuf>,
    kernel: KernelChoice,
    backend: BackendKind,
    isolation: IsolationMode,
    vmm_program: Option<PathBuf>,
    vcpus: u32,
    memory_mib: u32,
    scratch_bytes: u64,
    boot_timeout: Duration,
    default_job_timeout: Duration,
    log_dir: Option<PathBuf>,
    extra_cmdline: String,
    serial_log: Option<PathBuf>,
    qemu: QemuOptions,
    network: crate::network::NetworkConfig,
    snapshots: bool,
}

impl ExecutorConfig {
    /// Start from the defaults, with the image cache in `cache_dir` and
    /// per-VM files under `run_dir`.
    pub fn builder(
        cache_dir: impl Into<PathBuf>,
        run_dir: impl Into<PathBuf>,
    ) -> ExecutorConfigBuilder {
        ExecutorConfigBuilder {
            cache_dir: cache_dir.into(),
            images: ImagesOptions::default(),
            run_dir: run_dir.into(),
            agent: None,
            kernel: KernelChoice::Default,
            backend: BackendKind::Auto,
            isolation: IsolationMode::BestEffort,
            vmm_program: None,
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            scratch_bytes: DEFAULT_DISK_GIB << 30,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            default_job_timeout: DEFAULT_JOB_TIMEOUT,
            log_dir: None,
            extra_cmdline: String::new(),
            serial_log: None,
            qemu: QemuOptions::default(),
            network: crate::network::NetworkConfig::default(),
            snapshots: true,
        }
    }
}

impl ExecutorConfigBuilder {
    /// The guest agent binary, used as given; without one (`None`), a
    /// static build is looked for ([`agent::locate_agent`]).
    pub fn agent(mut self, agent: impl Into<Option<PathBuf>>) -> Self {
        self.agent = agent.into();
        self
    }

    /// Boot this kernel image (with `modules`, a `/lib/modules/<release>`
    /// tree or a directory of `.ko` files); `None`: the cache's default
    /// kernel, fetched if missing.
    pub fn kernel_files(
        mut self,
        image: impl Into<Option<PathBuf>>,
        modules: Option<PathBuf>,
    ) -> Self {
        self.kernel = match image.into() {
            Some(image) => KernelChoice::Files { image, modules },
            None => KernelChoice::Default,
        };
        self
    }

    /// Boot a kernel already found.
    pub fn kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = KernelChoice::Ready(kernel);
        self
    }

    pub fn backend(mut self, backend: BackendKind) -> Self {
        self.backend = backend;
        self
    }

    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }

    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// The scratch (and workspace) disk size, GiB.
    pub fn disk_gib(mut self, gib: u64) -> Self {
        self.scratch_bytes = gib << 30;
        self
    }

    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    pub fn default_job_timeout(mut self, timeout: Duration) -> Self {
        self.default_job_timeout = timeout;
        self
    }

    /// Keep serial logs of VMs that failed here (none: not kept).
    pub fn log_dir(mut self, dir: impl Into<Option<PathBuf>>) -> Self {
        self.log_dir = dir.into();
        self
    }

    /// Extra guest kernel command-line arguments.
    pub fn kernel_args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.extra_cmdline = args.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" ");
        self
    }

    /// Always write the guest's serial log (kernel messages) here.
    pub fn serial_log(mut self, path: impl Into<Option<PathBuf>>) -> Self {
        self.serial_log = path.into();
        self
    }

    /// How job images are pulled, converted and cached.
    pub fn images(mut self, images: ImagesOptions) -> Self {
        self.images = images;
        self
    }

    /// The jail around the kvm backend's VMM process (default best-effort).
    /// The `kiln-vmm` executable the kvm backend runs each VM in.
    pub fn vmm_program(mut self, program: Option<PathBuf>) -> Self {
        self.vmm_program = program;
        self
    }

    pub fn isolation(mut self, isolation: IsolationMode) -> Self {
        self.isolation = isolation;
        self
    }

    /// How the qemu backend runs QEMU (its binary).
    pub fn qemu(mut self, qemu: QemuOptions) -> Self {
        self.qemu = qemu;
        self
    }

    /// The jobs' network (mode, pool, allow/deny lists, DNS servers).
    pub fn network(mut self, network: crate::network::NetworkConfig) -> Self {
        self.network = network;
        self
    }

    /// Start jobs from a snapshot where one can be used (default on;
    /// `snapshots = false`, `--no-snapshot`: every job boots).
    pub fn snapshots(mut self, on: bool) -> Self {
        self.snapshots = on;
        self
    }

    /// Find the kernel and the agent; the configuration.
    pub fn build(self) -> Result<ExecutorConfig, ExecutorConfigError> {
        let kernel = match self.kernel {
            KernelChoice::Ready(k) => k,
            KernelChoice::Files { image, modules } => {
                Kernel::from_paths(&image, modules.as_deref()).map_err(|source| {
                    ExecutorConfigError::Kernel {
                        path: image,
                        source,
                    }
                })?
            }
            KernelChoice::Default => {
                let cache =
                    Cache::open(&self.cache_dir).map_err(|source| ExecutorConfigError::Cache {
                        path: self.cache_dir.clone(),
                        source,
                    })?;
                Kernel::default_kernel(&cache).map_err(ExecutorConfigError::DefaultKernel)?
            }
        };
        let agent = match self.agent {
            Some(a) => a,
            None => agent::locate_agent(None)?,
        };
        Ok(ExecutorConfig {
            cache_dir: self.cache_dir,
            images: self.images,
            run_dir: self.run_dir,
            agent,
            kernel,
            backend: self.backend,
            isolation: self.isolation,
            vmm_program: self.vmm_program,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            scratch_bytes: self.scratch_bytes,
            boot_timeout: self.boot_timeout,
            default_job_timeout: self.default_job_timeout,
            log_dir: self.log_dir,
            extra_cmdline: self.extra_cmdline,
            serial_log: self.serial_log,
            qemu: self.qemu,
            network: self.network,
            snapshots: self.snapshots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_settings_have_the_defaults() {
        let d = tempfile::tempdir().unwrap();
        let image = d.path().join("vmlinux");
        std::fs::write(&image, b"not a kernel, but a file").unwrap();
        let c = ExecutorConfig::builder(d.path().join("cache"), d.path().join("run"))
            .agent(d.path().join("agent"))
            .kernel_files(image.clone(), None)
            .kernel_args(&["a=1", "b"])
            .build()
            .unwrap();
        assert_eq!(c.kernel.image, image);
        assert_eq!(c.agent, d.path().join("agent"), "an agent is used as given");
        assert_eq!((c.vcpus, c.memory_mib), (DEFAULT_VCPUS, DEFAULT_MEMORY_MIB));
        assert_eq!(c.scratch_bytes, DEFAULT_DISK_GIB << 30);
        assert_eq!(c.boot_timeout, DEFAULT_BOOT_TIMEOUT);
        assert_eq!(c.default_job_timeout, Duration::from_secs(3600));
        assert_eq!(c.backend, BackendKind::Auto);
        assert_eq!(c.extra_cmdline, "a=1 b");
        assert_eq!((c.log_dir, c.serial_log), (None, None));
    }

    #[test]
    fn a_missing_kernel_is_named() {
        let d = tempfile::tempdir().unwrap();
        let e = ExecutorConfig::builder(d.path(), d.path())
            .agent(d.path().join("agent"))
            .kernel_files(d.path().join("nope"), None)
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
