//! `kiln`: CI jobs in disposable microVMs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kiln::executor::{Executor, ExecutorConfig, FailureReason};
use kiln::sink::{JobSink, JsonSink, TerminalSink};
use kiln_images::{Cache, Kernel};
use kiln_pipelines::{JobSpec, Shell, Step};
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
    RunJob(RunJob),
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

#[derive(Args)]
struct VmArgs {
    /// Backend: auto, kvm or qemu.
    #[arg(long, default_value = "auto", env = "KILN_BACKEND")]
    backend: BackendKind,
    /// Guest kernel (vmlinux or bzImage); default: the cached Debian cloud kernel.
    #[arg(long, env = "KILN_KERNEL")]
    kernel: Option<PathBuf>,
    /// Modules for --kernel (a /lib/modules/<release> tree or a directory of .ko files).
    #[arg(long, requires = "kernel")]
    modules: Option<PathBuf>,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// Size of the per-VM scratch disk in GiB (sparse).
    #[arg(long, default_value_t = 16)]
    disk: u64,
    /// Seconds from VM start to the agent being ready.
    #[arg(long, default_value_t = 60)]
    boot_timeout: u64,
    /// Guest agent binary (default: found next to kiln or in the cargo target dir).
    #[arg(long, env = "KILN_AGENT")]
    agent: Option<PathBuf>,
    /// Directory for per-VM files.
    #[arg(long, env = "KILN_RUN_DIR")]
    run_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RunJob {
    /// Job image: a registry reference (NAME[:TAG][@DIGEST]), an OCI image
    /// layout directory (DIR[:TAG]) or a `docker save` tar (FILE[:TAG]).
    #[arg(long)]
    image: String,
    /// Run this script file with `sh -e` instead of a command.
    #[arg(long, conflicts_with = "command")]
    script: Option<PathBuf>,
    /// Shell for --script: sh or bash.
    #[arg(long, default_value = "sh")]
    shell: String,
    /// Environment variable for the job (KEY=VALUE), repeatable.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Working directory inside the guest (default: the image's WorkingDir).
    #[arg(long)]
    workdir: Option<String>,
    /// Job timeout in seconds: the VM is killed when it expires.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Emit JSON lines (events and the result) on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    vm: VmArgs,
    /// The command to run, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
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

fn cache_dir(cli_dir: &Option<PathBuf>) -> PathBuf {
    cli_dir.clone().unwrap_or_else(Cache::default_dir)
}

fn run(cli: Cli) -> Result<ExitCode> {
    let cache_dir = cache_dir(&cli.cache_dir);
    match cli.command {
        Command::Doctor { json } => doctor::run(&cache_dir, json),
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
        Command::RunJob(args) => run_job(args, cache_dir),
        Command::Image(cmd) => image_cmd::run(cmd, &cache_dir),
    }
}

fn executor_config(vm: &VmArgs, cache_dir: PathBuf) -> Result<ExecutorConfig> {
    let cache = Cache::open(&cache_dir)?;
    let kernel = match &vm.kernel {
        Some(k) => Kernel::from_paths(k, vm.modules.as_deref())?,
        None => Kernel::default_kernel(&cache)
            .context("provisioning the default guest kernel (or pass --kernel)")?,
    };
    let agent = match &vm.agent {
        Some(a) => a.clone(),
        None => kiln::agent::locate_agent().map_err(anyhow::Error::msg)?,
    };
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .map(|d| d.join("kiln").join("logs"));
    Ok(ExecutorConfig {
        cache_dir,
        run_dir: vm
            .run_dir
            .clone()
            .unwrap_or_else(kiln::paths::default_run_dir),
        agent,
        kernel,
        backend: vm.backend,
        vcpus: vm.cpus,
        memory_mib: vm.memory,
        scratch_bytes: vm.disk << 30,
        boot_timeout: Duration::from_secs(vm.boot_timeout),
        default_job_timeout: Duration::from_secs(3600),
        log_dir: state,
        extra_cmdline: String::new(),
    })
}

fn run_job(args: RunJob, cache_dir: PathBuf) -> Result<ExitCode> {
    let step = match (&args.script, args.command.is_empty()) {
        (Some(path), _) => {
            let body = std::fs::read_to_string(path)
                .with_context(|| format!("reading the script {}", path.display()))?;
            let mut s = Step::script(path.display().to_string(), body);
            s.shell = match args.shell.as_str() {
                "sh" => Shell::Sh,
                "bash" => Shell::Bash,
                other => bail!("unknown --shell '{other}' (expected sh or bash)"),
            };
            s
        }
        (None, false) => {
            let mut s = Step::script(args.command.join(" "), String::new());
            s.shell = Shell::Exec(args.command.clone());
            s
        }
        (None, true) => bail!("nothing to run: give a command after `--` or --script FILE"),
    };
    let mut job = JobSpec::single("run-job", args.image.clone(), step);
    job.timeout = Some(Duration::from_secs(args.timeout));
    job.working_dir = args.workdir.clone();
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env '{kv}' is not KEY=VALUE"))?;
        job.variables.push(kiln_pipelines::Variable::new(k, v));
    }
    let config = executor_config(&args.vm, cache_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let executor = Executor::new(config)?;
        let (tx, rx) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            // First Ctrl-C: graceful cancel; second: kill the VM.
            for graceful in [true, false] {
                if tokio::signal::ctrl_c().await.is_err() {
                    return;
                }
                eprintln!(
                    "kiln: {}",
                    if graceful {
                        "canceling the job (Ctrl-C again to kill the VM)"
                    } else {
                        "killing the VM"
                    }
                );
                let _ = tx.send(Some(graceful));
            }
        });
        let mut sink: Box<dyn JobSink> = if args.json {
            Box::new(JsonSink)
        } else {
            Box::new(TerminalSink { headers: false })
        };
        let result = executor.run(&job, sink.as_mut(), rx).await;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"event": "result", "result": result})
            );
        } else {
            eprintln!("kiln: {}", result.summary());
            if let Some(p) = &result.debug_log {
                eprintln!("kiln: the guest's serial log is in {}", p.display());
            }
        }
        let code = match &result.failure {
            None => 0,
            Some(FailureReason::ScriptFailure) => result.exit_code.clamp(1, 255),
            Some(FailureReason::JobExecutionTimeout) => 124,
            Some(FailureReason::Canceled) => 130,
            Some(_) => 125,
        };
        Ok(ExitCode::from(code as u8))
    })
}
