//! `kiln`: CI jobs in disposable microVMs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use kiln::env::Env;
use kiln::executor::{self, ExecutorConfig};
use kiln_images::{Cache, Kernel};
use kiln_vmm::BackendKind;

mod doctor;
mod image_cmd;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Run CI jobs in disposable microVMs")]
struct Cli {
    /// Log verbosity (also RUST_LOG): error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    /// Cache directory (kernels, initramfs, root filesystems).
    #[arg(long, global = true, env = "KILN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one job in a fresh VM and stream its output.
    RunJob(Box<RunJob>),
    /// Report what this host has for running VMs, with a fix for each gap.
    Doctor {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Guest kernels.
    #[command(subcommand)]
    Kernel(KernelCmd),
    /// Job images: pull, list, remove, prune the cache.
    #[command(subcommand)]
    Image(image_cmd::ImageCmd),
    /// VM snapshots (kvm backend) in the cache: list, remove.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Serve CI jobs from GitLab and GitHub Actions (see docs/gitlab.md,
    /// docs/github.md), each in a fresh VM.
    Daemon {
        /// The configuration file.
        #[arg(long, default_value = "kiln.toml")]
        config: PathBuf,
    },
    /// GitLab runner registration.
    #[command(subcommand)]
    Gitlab(GitlabCmd),
    /// GitHub Actions runners of a running `kiln daemon`.
    #[command(subcommand)]
    Github(GithubCmd),
}

#[derive(Subcommand)]
enum GithubCmd {
    /// Queued jobs and the runners (starting, running, draining) with their VMs.
    Status {
        #[arg(long, default_value = "kiln.toml")]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GitlabCmd {
    /// Check the runner tokens of the configuration with GitLab.
    Verify {
        #[arg(long, default_value = "kiln.toml")]
        config: PathBuf,
    },
    /// Register with a (deprecated) registration token and add the runner
    /// to the configuration. For `glrt-` tokens, write them into the file
    /// and run `kiln gitlab verify`.
    Register {
        #[arg(long, default_value = "kiln.toml")]
        config: PathBuf,
        /// GitLab's address.
        #[arg(long)]
        url: String,
        #[arg(long)]
        registration_token: String,
        /// The runner's name (its description in GitLab).
        #[arg(long, default_value = "kiln")]
        name: String,
        /// Tags (repeatable); without any, the runner takes untagged jobs.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Default image for jobs that name none.
        #[arg(long)]
        image: Option<String>,
    },
}

#[derive(Subcommand)]
enum KernelCmd {
    /// Download the distribution's cloud kernel into the cache (idempotent).
    Fetch {
        /// Package to fetch (a metapackage is resolved to its kernel).
        #[arg(long, default_value = kiln_images::kernel::DEFAULT_KERNEL_PACKAGE)]
        package: String,
    },
    /// List cached kernels (the first is the default).
    Ls,
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// List cached snapshots: profile, size, whether this kiln can use them.
    Ls {
        /// One JSON array on stdout (name, path, bytes, state, why, profile).
        #[arg(long)]
        json: bool,
    },
    /// Remove the snapshots whose profile hash starts with PREFIX.
    Rm {
        /// A profile hash or its start (see `kiln snapshot ls`).
        #[arg(required_unless_present = "all")]
        prefix: Option<String>,
        /// Remove every snapshot.
        #[arg(long, conflicts_with = "prefix")]
        all: bool,
    },
}

#[derive(Args)]
struct VmArgs {
    /// Backend: auto, kvm or qemu.
    #[arg(long, default_value = "auto", env = "KILN_BACKEND")]
    backend: BackendKind,
    /// The jail around each VMM process (kvm backend): strict (refuse to
    /// start a VM when part of it cannot be applied), best-effort or off.
    #[arg(long, default_value = "best-effort", env = "KILN_ISOLATION")]
    isolation: kiln_vmm::IsolationMode,
    /// Boot every job instead of restoring it from a VM snapshot (kvm
    /// backend; see `kiln snapshot ls`).
    #[arg(long)]
    no_snapshot: bool,
    /// Guest kernel (vmlinux or bzImage); default: the cached Debian cloud kernel.
    #[arg(long, env = "KILN_KERNEL")]
    kernel: Option<PathBuf>,
    /// Modules for --kernel (a /lib/modules/<release> tree or a directory of .ko files).
    #[arg(long, requires = "kernel")]
    modules: Option<PathBuf>,
    /// vCPUs per VM.
    #[arg(long, default_value_t = executor::DEFAULT_VCPUS)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = executor::DEFAULT_MEMORY_MIB)]
    memory: u32,
    /// Size of the per-VM scratch disk in GiB (sparse).
    #[arg(long, default_value_t = executor::DEFAULT_DISK_GIB)]
    disk: u64,
    /// Seconds from VM start to the agent being ready.
    #[arg(long, default_value_t = executor::DEFAULT_BOOT_TIMEOUT.as_secs())]
    boot_timeout: u64,
    /// Guest agent binary (default: found next to kiln or in the cargo target dir).
    #[arg(long, env = "KILN_AGENT")]
    agent: Option<PathBuf>,
    /// Directory for per-VM files.
    #[arg(long, env = "KILN_RUN_DIR")]
    run_dir: Option<PathBuf>,
    /// Extra guest kernel command-line argument (repeatable).
    #[arg(long = "kernel-arg")]
    kernel_args: Vec<String>,
    /// Write the guest's serial console (kernel messages) to this file.
    #[arg(long)]
    serial_log: Option<PathBuf>,
    /// Job network: auto (nat where possible, else user), nat, user or none.
    #[arg(long, default_value = "auto", env = "KILN_NETWORK")]
    network: kiln::network::NetworkMode,
    /// CIDR the job may reach although private, link-local or the host's
    /// (nat; repeatable).
    #[arg(long = "network-allow")]
    network_allow: Vec<String>,
    /// CIDR the job may never reach (nat; repeatable).
    #[arg(long = "network-deny")]
    network_deny: Vec<String>,
    /// IPv4 range the VMs' addresses come from (nat).
    #[arg(long, default_value = kiln::network::pool::DEFAULT_POOL)]
    network_pool: String,
    /// Connections the job may have open at once, UDP flows included
    /// (nat); a new one past it is refused.
    #[arg(long, default_value_t = kiln::network::DEFAULT_MAX_CONNECTIONS)]
    network_max_connections: u32,
    /// DNS server kiln relays the job's queries to (repeatable; default:
    /// the host's /etc/resolv.conf).
    #[arg(long)]
    dns: Vec<String>,
}

/// `run-job`: the job's flags, then the VM's.
#[derive(Args)]
struct RunJob {
    #[command(flatten)]
    job: kiln::local::Args,
    #[command(flatten)]
    vm: VmArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "kiln={0},kiln_images={0},kiln_vmm={0}",
            cli.log_level
        ))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    // The environment, read once, here at the edge.
    let env = Env::read();
    let cache_dir = cli.cache_dir.clone().unwrap_or_else(|| env.cache_dir());
    match cli.command {
        Command::Doctor { json } => doctor::run(&cache_dir, &env, json),
        Command::Kernel(KernelCmd::Fetch { package }) => {
            let cache = Cache::open(&cache_dir)?;
            let k = kiln_images::kernel::fetch_debian(&cache, &package)
                .context("fetching the guest kernel")?;
            println!("{} ({})", k.image.display(), k.source);
            println!(
                "release {} · PVH entry: {} · {} modules",
                k.release,
                if k.pvh { "yes" } else { "no" },
                k.modules.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Kernel(KernelCmd::Ls) => {
            let cache = Cache::open(&cache_dir)?;
            let ks = Kernel::cached(&cache);
            if ks.is_empty() {
                println!("no cached kernels; run `kiln kernel fetch`");
            }
            for k in ks {
                println!("{}  {}  {}", k.release, k.source, k.image.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::RunJob(args) => {
            let RunJob { mut job, vm } = *args;
            job.pipeline.set_cache_dir(cache_dir.clone());
            let code = kiln::local::run(&job, || executor_config(&vm, cache_dir, &env))?;
            Ok(ExitCode::from(code))
        }
        Command::Daemon { config } => daemon(&config, &env),
        Command::Gitlab(cmd) => gitlab(cmd),
        Command::Github(GithubCmd::Status { config, json }) => github_status(&config, &env, json),
        Command::Image(cmd) => image_cmd::run(cmd, &cache_dir, env.images()),
        Command::Snapshot(cmd) => snapshot_cmd(cmd, &cache_dir),
    }
}

fn snapshot_cmd(cmd: SnapshotCmd, cache_dir: &std::path::Path) -> Result<ExitCode> {
    use kiln::snapshots::{EntryState, SnapshotCache};
    let cache = SnapshotCache::new(cache_dir);
    match cmd {
        SnapshotCmd::Ls { json } => {
            let list = cache.list();
            if json {
                let recs: Vec<serde_json::Value> = list
                    .iter()
                    .map(|e| {
                        let (state, why, profile) = match &e.state {
                            EntryState::Usable(h) => (
                                "usable",
                                None,
                                Some(serde_json::json!({
                                    "vcpus": h.profile.vcpus,
                                    "memory_mib": h.profile.memory_mib,
                                    "devices": h.profile.devices,
                                    "kernel_sha256": h.profile.kernel_sha256,
                                    "initramfs_sha256": h.profile.initramfs_sha256,
                                })),
                            ),
                            EntryState::Stale(why) => ("stale", Some(why.as_str()), None),
                            EntryState::Damaged(why) => ("damaged", Some(why.as_str()), None),
                        };
                        serde_json::json!({
                            "name": e.name,
                            "path": e.path,
                            "disk_bytes": e.disk_bytes,
                            "state": state,
                            "why": why,
                            "profile": profile,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&recs)?);
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                println!("no snapshots in {}", cache.dir().display());
            }
            for e in list {
                let size = format!("{:.1} MiB", e.disk_bytes as f64 / (1 << 20) as f64);
                let short = &e.name[..e.name.len().min(16)];
                match e.state {
                    EntryState::Usable(h) => println!(
                        "{short}  {size}  usable  {} vCPU, {} MiB, {}, kernel {}, initramfs {}",
                        h.profile.vcpus,
                        h.profile.memory_mib,
                        h.profile
                            .devices
                            .iter()
                            .find_map(|d| d.strip_prefix("net:"))
                            .map_or_else(|| "no network".to_string(), |n| format!("network {n}")),
                        &h.profile.kernel_sha256[..h.profile.kernel_sha256.len().min(12)],
                        &h.profile.initramfs_sha256[..h.profile.initramfs_sha256.len().min(12)],
                    ),
                    EntryState::Stale(why) => {
                        println!("{short}  {size}  stale ({why}): `kiln snapshot rm` it")
                    }
                    EntryState::Damaged(why) => {
                        println!("{short}  {size}  damaged ({why}): `kiln snapshot rm` it")
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCmd::Rm { prefix, all } => {
            let prefix = if all { None } else { prefix };
            if prefix.as_deref().is_some_and(str::is_empty) {
                anyhow::bail!("an empty prefix would remove every snapshot: use --all");
            }
            let n = cache
                .remove(prefix.as_deref())
                .with_context(|| format!("removing snapshots in {}", cache.dir().display()))?;
            if n == 0 {
                if let Some(p) = &prefix {
                    anyhow::bail!(
                        "no snapshot's profile hash starts with {p:?} in {}: `kiln snapshot ls` lists them",
                        cache.dir().display()
                    );
                }
            }
            println!("removed {n} snapshot file(s)");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn daemon(path: &std::path::Path, env: &Env) -> Result<ExitCode> {
    let mut config = kiln::config::Config::load(path)?;
    env.complete(&mut config)?;
    runtime()?.block_on(async move {
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                },
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        kiln::daemon::run(config, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn github_status(path: &std::path::Path, env: &Env, json: bool) -> Result<ExitCode> {
    let mut config = kiln::config::Config::load(path)?;
    env.complete(&mut config)?;
    let run_dir = config.run_dir.clone().unwrap_or_else(|| env.run_dir());
    let status = match kiln::github::status::read(&run_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kiln: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", kiln::github::status::render(&status));
    }
    Ok(ExitCode::SUCCESS)
}

fn gitlab(cmd: GitlabCmd) -> Result<ExitCode> {
    use kiln::gitlab::register;
    runtime()?.block_on(async move {
        match cmd {
            GitlabCmd::Verify { config } => {
                let config = kiln::config::Config::load(&config)?;
                let mut ok = true;
                for (name, r) in register::verify_all(&config).await? {
                    match r {
                        Ok(id) => println!(
                            "{name}: valid (runner id {})",
                            id.map(|i| i.to_string()).unwrap_or("?".into())
                        ),
                        Err(e) => {
                            ok = false;
                            println!("{name}: {}", kiln::executor::error_chain(&e));
                        }
                    }
                }
                Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            }
            GitlabCmd::Register {
                config,
                url,
                registration_token,
                name,
                tags,
                image,
            } => {
                let id =
                    register::register(&config, &url, &registration_token, &name, &tags, image)
                        .await?;
                println!("registered runner {id} as '{name}' in {}", config.display());
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

fn executor_config(vm: &VmArgs, cache_dir: PathBuf, env: &Env) -> Result<ExecutorConfig> {
    let run_dir = vm.run_dir.clone().unwrap_or_else(|| env.run_dir());
    Ok(ExecutorConfig::builder(cache_dir, run_dir)
        .kernel_files(vm.kernel.clone(), vm.modules.clone())
        .agent(vm.agent.clone())
        .backend(vm.backend)
        .isolation(vm.isolation)
        .snapshots(!vm.no_snapshot)
        .vmm_program(env.vmm())
        .vcpus(vm.cpus)
        .memory_mib(vm.memory)
        .disk_gib(vm.disk)
        .boot_timeout(Duration::from_secs(vm.boot_timeout))
        .log_dir(env.log_dir())
        .kernel_args(&vm.kernel_args)
        .serial_log(vm.serial_log.clone())
        .qemu(env.qemu())
        .images(env.images())
        .network(kiln::network::NetworkConfig {
            mode: vm.network,
            pool: vm.network_pool.clone(),
            allow: vm.network_allow.clone(),
            deny: vm.network_deny.clone(),
            dns: vm.dns.clone(),
            max_connections: vm.network_max_connections,
            ..Default::default()
        })
        .build()?)
}
