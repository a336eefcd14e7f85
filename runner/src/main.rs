//! `kiln`: CI jobs in disposable microVMs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kiln::executor::{Executor, ExecutorConfig, FailureReason};
use kiln::sink::{JobSink, JsonSink, TerminalSink};
use kiln_images::{Cache, Kernel};
use kiln_pipelines::{JobSource, JobSpec, Shell, Step, Variable};
use kiln_vmm::BackendKind;

mod doctor;
mod image_cmd;
mod pipeline_args;

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
    /// Serve CI jobs from GitLab (see docs/gitlab.md), each in a fresh VM.
    Daemon {
        /// The configuration file.
        #[arg(long, default_value = "kiln.toml")]
        config: PathBuf,
    },
    /// GitLab runner registration.
    #[command(subcommand)]
    Gitlab(GitlabCmd),
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
    /// Extra guest kernel command-line argument (repeatable).
    #[arg(long = "kernel-arg")]
    kernel_args: Vec<String>,
    /// Write the guest's serial console (kernel messages) to this file.
    #[arg(long)]
    serial_log: Option<PathBuf>,
}

#[derive(Args)]
struct RunJob {
    /// A pipeline file (.gitlab-ci.yml or a GitHub workflow); without it,
    /// give --image and a command or --script.
    file: Option<PathBuf>,
    /// The job to run from FILE (its `needs` run first).
    job: Option<String>,
    /// List FILE's jobs and exit (with --json: as JSON; with --all: the
    /// excluded jobs too).
    #[arg(long, requires = "file")]
    list: bool,
    /// Job image: a registry reference (NAME[:TAG][@DIGEST]), an OCI image
    /// layout directory (DIR[:TAG]) or a `docker save` tar (FILE[:TAG]).
    /// With FILE, it replaces every job's image.
    #[arg(long)]
    image: Option<String>,
    /// Run this script file with `sh -e` instead of a command.
    #[arg(long, conflicts_with = "command")]
    script: Option<PathBuf>,
    /// Shell for --script: sh or bash.
    #[arg(long, default_value = "sh")]
    shell: String,
    /// Variable for the job (KEY=VALUE), repeatable; with FILE it takes
    /// precedence over the file's variables.
    #[arg(long = "var", short = 'e', alias = "env")]
    vars: Vec<String>,
    /// Like --var, but the value is masked in all output.
    #[arg(long = "secret", short = 's')]
    secrets: Vec<String>,
    /// With FILE: run only the matrix combination with KEY=VALUE (repeatable).
    #[arg(long)]
    matrix: Vec<String>,
    /// GitHub `runs-on` label to image (LABEL=IMAGE, repeatable), like act's -P.
    #[arg(long = "platform", short = 'P')]
    platforms: Vec<String>,
    /// With FILE: where artifacts are copied (a folder per job).
    #[arg(long, default_value = "kiln-artifacts")]
    artifacts_dir: PathBuf,
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
    pipeline: pipeline_args::PipelineArgs,
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
        Command::RunJob(args) => run_job(*args, cache_dir),
        Command::Daemon { config } => daemon(&config),
        Command::Gitlab(cmd) => gitlab(cmd),
        Command::Image(cmd) => image_cmd::run(cmd, &cache_dir),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn daemon(path: &std::path::Path) -> Result<ExitCode> {
    let config = kiln::config::Config::load(path)?;
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
        kiln::gitlab::daemon::run(config, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn gitlab(cmd: GitlabCmd) -> Result<ExitCode> {
    use kiln::gitlab::daemon;
    runtime()?.block_on(async move {
        match cmd {
            GitlabCmd::Verify { config } => {
                let config = kiln::config::Config::load(&config)?;
                let mut ok = true;
                for (name, r) in daemon::verify_all(&config).await? {
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
                let id = daemon::register(&config, &url, &registration_token, &name, &tags, image)
                    .await?;
                println!("registered runner {id} as '{name}' in {}", config.display());
                Ok(ExitCode::SUCCESS)
            }
        }
    })
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
        extra_cmdline: vm.kernel_args.join(" "),
        serial_log: vm.serial_log.clone(),
    })
}

fn key_values(items: &[String], what: &str) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{what} '{kv}' is not KEY=VALUE"))
        })
        .collect()
}

/// The jobs `run-job` was asked for: one ad-hoc job, or jobs from a file.
fn plan_jobs(args: &RunJob) -> Result<Option<(Vec<JobSpec>, Option<PathBuf>)>> {
    let vars = key_values(&args.vars, "--var")?;
    let secrets = key_values(&args.secrets, "--secret")?;
    let Some(file) = &args.file else {
        let Some(image) = &args.image else {
            bail!("give a pipeline FILE and JOB, or --image with a command after `--` or --script");
        };
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
        let mut job = JobSpec::single("run-job", image.clone(), step);
        job.timeout = Some(Duration::from_secs(args.timeout));
        job.working_dir = args.workdir.clone();
        for (k, v) in vars {
            job.variables.push(Variable::new(k, v));
        }
        for (k, v) in secrets {
            job.variables.push(Variable {
                masked: true,
                ..Variable::new(k, v)
            });
        }
        return Ok(Some((vec![job], None)));
    };
    let mut all_vars = vars.clone();
    all_vars.extend(secrets.iter().cloned());
    let mut ctx = kiln::local::local_context(file, all_vars)?;
    let mut opts = kiln_pipelines::Options::default();
    for (label, image) in key_values(&args.platforms, "--platform")? {
        opts.runner_images.set(label, image);
    }
    args.pipeline.apply(&mut ctx, &mut opts)?;
    opts.image = args.image.clone();
    let pipeline = kiln::local::load_pipeline(file, &ctx, &opts)?;
    for n in &pipeline.notes {
        eprintln!("kiln: note: {n}");
    }
    if args.list {
        args.pipeline.list(&pipeline, args.json)?;
        return Ok(None);
    }
    let Some(name) = &args.job else {
        bail!("which job? give its name after the file (list them with --list)");
    };
    let matrix = key_values(&args.matrix, "--matrix")?;
    let mut jobs: Vec<JobSpec> = kiln::local::select_jobs(&pipeline, name, &matrix)?
        .into_iter()
        .cloned()
        .collect();
    for job in &mut jobs {
        if let Some(image) = &args.image {
            job.image = image.clone();
        }
        for v in &mut job.variables {
            if secrets.iter().any(|(k, _)| k == &v.key) {
                v.masked = true;
            }
        }
        if job.timeout.is_none() {
            job.timeout = Some(Duration::from_secs(args.timeout));
        }
    }
    Ok(Some((jobs, Some(ctx.project_dir))))
}

fn run_job(args: RunJob, cache_dir: PathBuf) -> Result<ExitCode> {
    let Some((jobs, project_dir)) = plan_jobs(&args)? else {
        return Ok(ExitCode::SUCCESS);
    };
    if project_dir.is_some() {
        // Before anything runs: artifacts go only where kiln may put them.
        for job in jobs.iter().filter(|j| !j.artifacts.is_empty()) {
            let to = args
                .artifacts_dir
                .join(kiln::local::job_dir_name(&job.name));
            kiln::local::check_artifacts_target(&to)
                .with_context(|| format!("--artifacts-dir for job '{}'", job.name))?;
        }
    }
    let config = executor_config(&args.vm, cache_dir)?;
    let run_dir = config.run_dir.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let executor = Executor::new(config)?;
        let (tx, rx) = tokio::sync::watch::channel(None);
        // The signal that canceled the run (SIGINT or SIGTERM), for the exit code.
        let canceled_by = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
        let by = canceled_by.clone();
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        tokio::spawn(async move {
            // First SIGINT or SIGTERM: graceful cancel (after_script and
            // always() steps still run); second: kill the VM.
            for graceful in [true, false] {
                let sig = tokio::select! {
                    s = int.recv() => s.map(|()| libc::SIGINT),
                    s = term.recv() => s.map(|()| libc::SIGTERM),
                };
                let Some(sig) = sig else { return };
                let _ = by.compare_exchange(
                    0,
                    sig,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                );
                eprintln!(
                    "kiln: {}",
                    if graceful {
                        "canceling the job (Ctrl-C or SIGTERM again to kill the VM)"
                    } else {
                        "killing the VM"
                    }
                );
                let _ = tx.send(Some(graceful));
            }
        });
        let many = jobs.len() > 1 || project_dir.is_some();
        let mut code = 0u8;
        let mut collected_dirs: Vec<PathBuf> = Vec::new();
        for mut job in jobs {
            let stage = match &project_dir {
                Some(dir) => {
                    // Named like job directories, so a later kiln removes them if this one dies.
                    let stage = run_dir.join(format!(
                        "job-{}-stage-{}",
                        std::process::id(),
                        kiln::local::job_dir_name(&job.name)
                    ));
                    // Ours (the run directory, this pid): a leftover of an earlier job.
                    let _ = std::fs::remove_dir_all(&stage);
                    let staged = kiln::local::stage_workspace(dir, &stage)?;
                    tracing::info!(
                        "staged {} files of {} as the workspace",
                        staged.files,
                        dir.display()
                    );
                    if let Some(first) = staged.beyond_links.first() {
                        eprintln!(
                            "kiln: note: {} file(s) lie beyond a symbolic link in the checkout and were not staged (e.g. {})",
                            staged.beyond_links.len(),
                            first.display()
                        );
                    }
                    // Artifacts of the jobs that ran before (this job's needs)
                    // are in its workspace, as GitLab downloads them.
                    for earlier in &collected_dirs {
                        kiln::local::copy_tree(earlier, &stage)?;
                    }
                    job.source = JobSource::LocalDir(stage.clone());
                    Some(StageDir(stage))
                }
                None => None,
            };
            if many && !args.json {
                eprintln!("\x1b[1;36m▶ job {}\x1b[0m (image {})", job.name, job.image);
            }
            let secrets: Vec<String> = job
                .variables
                .iter()
                .filter(|v| v.masked && !v.value.is_empty())
                .map(|v| v.value.clone())
                .collect();
            let inner: Box<dyn JobSink> = if args.json {
                Box::new(JsonSink)
            } else {
                Box::new(TerminalSink { headers: many })
            };
            let mut sink = kiln::sink::MaskingSink::new(inner, &secrets);
            let collected = stage
                .as_ref()
                .map(|s| PathBuf::from(format!("{}-artifacts", s.0.display())));
            if let Some(c) = &collected {
                let _ = std::fs::remove_dir_all(c);
            }
            let result = executor
                .run_collecting(&job, &mut sink, rx.clone(), collected.as_deref())
                .await;
            sink.flush();
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"event": "result", "job": job.name, "result": result})
                );
            } else {
                eprintln!("kiln: {}", result.summary());
                if let Some(p) = &result.debug_log {
                    eprintln!("kiln: the guest's serial log is in {}", p.display());
                }
            }
            // Only when the guest sent artifacts back (the VM ran).
            if let Some(from) = collected.as_ref().filter(|c| c.is_dir()) {
                if !job.artifacts.is_empty() {
                    let to = args
                        .artifacts_dir
                        .join(kiln::local::job_dir_name(&job.name));
                    match kiln::local::collect_artifacts(&job, from, &to, result.success()) {
                        Ok(c) => {
                            for s in &c.skipped {
                                eprintln!("kiln: artifact left out: {s}");
                            }
                            if !c.files.is_empty() {
                                eprintln!(
                                    "kiln: {} artifact files copied to {}",
                                    c.files.len(),
                                    to.display()
                                );
                                collected_dirs.push(to.clone());
                            } else {
                                eprintln!(
                                    "kiln: no artifact matched {:?}{}",
                                    job.artifacts.iter().map(|a| &a.paths).collect::<Vec<_>>(),
                                    if c.removed_stale {
                                        format!("; removed the previous run's {}", to.display())
                                    } else {
                                        String::new()
                                    }
                                );
                            }
                        }
                        Err(e) => eprintln!("kiln: collecting artifacts: {e:#}"),
                    }
                }
            }
            if let Some(from) = &collected {
                // Ours: `<stage>-artifacts` in the run directory.
                let _ = std::fs::remove_dir_all(from);
            }
            code = match &result.failure {
                None => 0,
                Some(FailureReason::ScriptFailure) => result.exit_code.clamp(1, 255) as u8,
                Some(FailureReason::JobExecutionTimeout) => 124,
                Some(FailureReason::Canceled) => {
                    match canceled_by.load(std::sync::atomic::Ordering::Relaxed) {
                        libc::SIGTERM => 143,
                        _ => 130,
                    }
                }
                Some(_) => 125,
            };
            let allowed = job.allow_failure.allows(result.exit_code)
                && matches!(result.failure, Some(FailureReason::ScriptFailure));
            if code != 0 && !allowed {
                break;
            }
            if allowed {
                code = 0;
            }
        }
        Ok(ExitCode::from(code))
    })
}

/// A staged workspace, removed when the job is done.
struct StageDir(PathBuf);

impl Drop for StageDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
