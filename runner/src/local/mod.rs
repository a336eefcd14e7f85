//! `kiln run-job FILE JOB`: pipeline files on a developer's machine, like act
//! and gitlab-ci-local, each job in a VM.
//!
//! The workspace is a *copy* of the checkout (git-tracked files plus
//! uncommitted and untracked-but-not-ignored ones, like act), staged in the
//! run directory: the job can never modify the user's checkout, and staging
//! only reads it (read-only opens, never through a symbolic link). Artifacts
//! are copied from the job's view of the workspace into a host folder that
//! kiln creates (and marks): kiln never deletes or overwrites anything it
//! did not make.

//!
//! - [`plan`]: the context from git, the pipeline, the jobs to run.
//! - [`stage`]: the checkout staged as a job's workspace.
//! - [`artifacts`]: `--artifacts-dir` and the artifacts between jobs.
//! - this module: `run-job`'s flags and the run itself (signals, one VM per
//!   job in order, exit codes).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use kiln_pipelines::{JobSource, JobSpec};
use tokio::sync::watch;

use kiln_images::{ImagePolicy, ImageSource};

use crate::cache::JobCaches;
use crate::executor::{Collect, Executor, ExecutorConfig, FailureReason, JobResult};
use crate::joblog::{JobSink, JsonSink, MaskingSink, Secrets, TerminalSink};
use results::{Ended, Results};

pub mod artifacts;
mod copy;
pub mod gitlab_include;
pub mod pipeline_args;
pub mod plan;
pub mod remote_include;
mod results;
pub mod stage;
#[cfg(test)]
mod test_http;

pub use artifacts::{
    check_artifacts_target, collect_artifacts, copy_tree, job_dir_name, Collected, ARTIFACTS_MARKER,
};
pub use plan::{load_pipeline, local_context, plan_jobs, select_jobs, Plan};
pub use stage::{stage_workspace, StageDir, Staged};

/// `kiln run-job`'s flags (the VM's own flags are the CLI's).
#[derive(clap::Args)]
pub struct Args {
    /// A pipeline file (.gitlab-ci.yml or a GitHub workflow). Without it:
    /// the current directory's `.gitlab-ci.yml` or only workflow in
    /// `.github/workflows` (then the first argument is the JOB), or
    /// --image with a command or --script.
    pub file: Option<PathBuf>,
    /// The job to run from FILE (its `needs` run first).
    pub job: Option<String>,
    /// List FILE's jobs and exit (with --json: as JSON; with --all: the
    /// excluded jobs too).
    #[arg(long)]
    pub list: bool,
    /// Job image: a registry reference (NAME[:TAG][@DIGEST]), an OCI image
    /// layout directory (DIR[:TAG]) or a `docker save` tar (FILE[:TAG]).
    /// With FILE, it replaces every job's image.
    #[arg(long)]
    pub image: Option<String>,
    /// Run this script file with `sh -e` instead of a command.
    #[arg(long, conflicts_with = "command")]
    pub script: Option<PathBuf>,
    /// Shell for --script: sh or bash.
    #[arg(long, default_value = "sh")]
    pub shell: String,
    /// Variable for the job (KEY=VALUE), repeatable; with FILE it takes
    /// precedence over the file's variables.
    #[arg(long = "var", short = 'e', alias = "env")]
    pub vars: Vec<String>,
    /// Like --var, but the value is masked in all output.
    #[arg(long = "secret", short = 's')]
    pub secrets: Vec<String>,
    /// With FILE: run only the matrix combination with KEY=VALUE (repeatable).
    #[arg(long)]
    pub matrix: Vec<String>,
    /// GitHub `runs-on` label to image (LABEL=IMAGE, repeatable), like act's -P.
    #[arg(long = "platform", short = 'P')]
    pub platforms: Vec<String>,
    /// With FILE: where artifacts are copied (a folder per job).
    #[arg(long, default_value = "kiln-artifacts")]
    pub artifacts_dir: PathBuf,
    /// Working directory inside the guest (default: the image's WorkingDir).
    #[arg(long)]
    pub workdir: Option<String>,
    /// Job timeout in seconds: the VM is killed when it expires.
    #[arg(long, default_value_t = crate::executor::DEFAULT_JOB_TIMEOUT.as_secs())]
    pub timeout: u64,
    /// Emit JSON lines (events and the result) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Which pipeline FILE is read as (ref, tag, source, inputs).
    #[command(flatten)]
    pub pipeline: pipeline_args::PipelineArgs,
    /// The command to run, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// `kiln run-job`: run the jobs `args` ask for, each in a fresh VM, and
/// return the exit code. `config` is asked for only once the plan holds
/// (a bad file or `--artifacts-dir` fails before any kernel is provisioned).
pub fn run(args: &Args, config: impl FnOnce() -> Result<ExecutorConfig>) -> Result<u8> {
    let Some(plan) = plan_jobs(args)? else {
        return Ok(0);
    };
    if plan.project_dir.is_some() {
        // Before anything runs: artifacts go only where kiln may put them.
        for job in plan.jobs.iter().filter(|j| !j.artifacts.is_empty()) {
            let to = args.artifacts_dir.join(job_dir_name(&job.name));
            check_artifacts_target(&to)
                .with_context(|| format!("--artifacts-dir for job '{}'", job.name))?;
        }
    }
    let config = config()?;
    let run_dir = config.run_dir.clone();
    // Jobs' `cache:`, kept in kiln's cache directory, per project directory.
    let cache_store = match plan.jobs.iter().any(|j| !j.cache.is_empty()) {
        true => Some(
            crate::cache::CacheConfig::default()
                .open(&config.cache_dir, None)
                .context("opening the cache store")?,
        ),
        false => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let executor = Executor::new(config)?;
        let (tx, rx) = watch::channel(None);
        let canceled_by = cancel_on_signals(tx)?;
        let many = plan.jobs.len() > 1 || plan.project_dir.is_some();
        let mut code = 0u8;
        let mut results = Results::with_call_outputs(plan.call_outputs);
        // Artifacts of the jobs that ran, for the later ones.
        let mut collected_dirs: Vec<PathBuf> = Vec::new();
        for mut job in plan.jobs {
            if canceled_by.load(Ordering::Relaxed) != 0 {
                break;
            }
            if let Some(why) = skip(&plan.github, &plan.conditions, &mut job, &results, code) {
                match why {
                    Ok(why) => {
                        eprintln!("kiln: job {} skipped: {why}", job.name);
                        results.record(&job, Ended::Skipped, Vec::new());
                    }
                    Err(e) => {
                        eprintln!(
                            "kiln: job {} failed: its `if:` cannot be evaluated: {e}",
                            job.name
                        );
                        results.record(&job, Ended::Failure, Vec::new());
                        if code == 0 {
                            code = 1;
                        }
                    }
                }
                continue;
            }
            let stage = match &plan.project_dir {
                Some(dir) => {
                    let stage = StageDir::stage(dir, &run_dir, &job.name)?;
                    // Artifacts of the jobs that ran before (this job's needs)
                    // are in its workspace, as GitLab downloads them.
                    for earlier in &collected_dirs {
                        copy_tree(earlier, stage.path())?;
                    }
                    job.source = JobSource::LocalDir(stage.path().to_path_buf());
                    Some(stage)
                }
                None => None,
            };
            if many && !args.json {
                eprintln!("\x1b[1;36m▶ job {}\x1b[0m (image {})", job.name, job.image);
            }
            if let Some(d) = job.start_in {
                eprintln!(
                    "kiln: note: job {} is `when: delayed` (start_in {}s): GitLab would start it then; kiln runs it at once",
                    job.name,
                    d.as_secs()
                );
            }
            // The guest sends the artifact files over its console; they land here.
            let collected = stage.as_ref().map(StageDir::artifacts_dir);
            if let Some(c) = &collected {
                let _ = std::fs::remove_dir_all(c);
            }
            let caches = match (&cache_store, &stage, &plan.project_dir) {
                (Some(store), Some(stage), Some(dir)) if !job.cache.is_empty() => {
                    let fallback = job
                        .variables
                        .iter()
                        .rev()
                        .find(|v| v.key == "CACHE_FALLBACK_KEY")
                        .map(|v| v.value.clone());
                    let mut c = JobCaches::new(
                        store.clone(),
                        format!("local/{}", dir.display()),
                        job.cache.clone(),
                        fallback,
                        None,
                    );
                    c.restore(stage.path(), &mut |l| eprintln!("kiln: {l}"));
                    let files = PathBuf::from(format!("{}-caches", stage.path().display()));
                    let _ = std::fs::remove_dir_all(&files);
                    std::fs::create_dir_all(&files)
                        .with_context(|| format!("creating {}", files.display()))?;
                    Some((c, files))
                }
                _ => None,
            };
            let caches_to = caches.as_ref().map(|(_, f)| f.as_path());
            let result = run_one(
                &executor,
                &job,
                args.json,
                many,
                rx.clone(),
                &collected,
                caches_to,
            )
            .await;
            if let Some((c, files)) = caches {
                let canceled = matches!(result.failure, Some(FailureReason::Canceled));
                if result.boot_ms > 0 && !canceled {
                    c.save(&files, result.success(), &mut |l| eprintln!("kiln: {l}"));
                }
                let _ = std::fs::remove_dir_all(&files);
            }
            // Only when the guest sent artifacts back (the VM ran).
            if let Some(from) = collected.as_ref().filter(|c| c.is_dir()) {
                if !job.artifacts.is_empty() {
                    let to = args.artifacts_dir.join(job_dir_name(&job.name));
                    if artifacts::collect_and_report(&job, from, &to, result.success()) {
                        collected_dirs.push(to);
                    }
                }
            }
            if let Some(from) = &collected {
                // Ours: `<stage>-artifacts` in the run directory.
                let _ = std::fs::remove_dir_all(from);
            }
            let job_code = exit_code(&result, canceled_by.load(Ordering::Relaxed));
            let ended = ended(&job, &result);
            results.record(&job, ended, result.outputs.clone());
            if matches!(ended, Ended::Failure | Ended::Cancelled) && code == 0 {
                code = job_code.max(1);
            }
        }
        if results.len() > 1 && !args.json {
            let warn = if results.with_warnings() {
                " (passed with warnings: only jobs allowed to fail failed)"
            } else {
                ""
            };
            eprintln!("kiln: pipeline: {}{warn}", results.summary());
        }
        Ok(code)
    })
}

/// How `job` ended, from its result.
fn ended(job: &JobSpec, result: &JobResult) -> Ended {
    match &result.failure {
        None => Ended::Success,
        Some(FailureReason::Canceled) => Ended::Cancelled,
        Some(FailureReason::ScriptFailure) if job.allow_failure.allows(result.exit_code) => {
            Ended::AllowedFailure
        }
        Some(_) => Ended::Failure,
    }
}

/// Whether `job` is skipped given the jobs that ended (`Some(Ok(why))`),
/// fails because its `if:` cannot be evaluated (`Some(Err)`), or runs
/// (`None`; GitHub jobs then get their `needs` context). GitHub: the job's
/// `if:` decides, with the status of its whole chain of `needs`. GitLab:
/// once a job failed (`failed` is the run's exit code so far), only
/// `when: always` and `when: on_failure` jobs still run.
fn skip(
    github: &bool,
    conditions: &std::collections::BTreeMap<String, kiln_pipelines::github::Contexts>,
    job: &mut JobSpec,
    results: &Results,
    failed: u8,
) -> Option<std::result::Result<String, String>> {
    use kiln_pipelines::github::{job_should_run, JobStatus};
    use kiln_pipelines::JobWhen;
    if *github {
        job.needs_results = results.needs_of(job);
        let status = results.status_for(job);
        return match job_should_run(job, conditions.get(&job.name), status) {
            Ok(true) => None,
            Ok(false) => Some(Ok(match (&job.condition, status) {
                (Some(c), _) => {
                    format!("`if: {}` is false", c.chars().take(200).collect::<String>())
                }
                (None, JobStatus::Failure) => "a job it needs failed".into(),
                (None, JobStatus::Skipped) => "a job it needs was skipped".into(),
                (None, JobStatus::Cancelled) => "a job it needs was canceled".into(),
                (None, JobStatus::Success) => "`if: failure()` and nothing failed".into(),
            })),
            Err(e) => Some(Err(e.to_string())),
        };
    }
    match (failed != 0, job.when) {
        (true, JobWhen::OnSuccess | JobWhen::Manual) => {
            Some(Ok("an earlier job failed (`when: on_success`)".into()))
        }
        _ => None,
    }
}

/// First SIGINT or SIGTERM: graceful cancel (after_script and always()
/// steps still run); second: kill the VM. Returns the signal that canceled
/// the run (0: none yet), for the exit code.
fn cancel_on_signals(tx: watch::Sender<Option<bool>>) -> Result<Arc<AtomicI32>> {
    use tokio::signal::unix::{signal, SignalKind};
    let canceled_by = Arc::new(AtomicI32::new(0));
    let by = canceled_by.clone();
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    tokio::spawn(async move {
        for graceful in [true, false] {
            let sig = tokio::select! {
                s = int.recv() => s.map(|()| libc::SIGINT),
                s = term.recv() => s.map(|()| libc::SIGTERM),
            };
            let Some(sig) = sig else { return };
            let _ = by.compare_exchange(0, sig, Ordering::Relaxed, Ordering::Relaxed);
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
    Ok(canceled_by)
}

/// Run one job with its output, masked, on the terminal (or as JSON
/// lines), then its result.
async fn run_one(
    executor: &Executor,
    job: &JobSpec,
    json: bool,
    headers: bool,
    cancel: watch::Receiver<Option<bool>>,
    collected: &Option<PathBuf>,
    caches_to: Option<&std::path::Path>,
) -> JobResult {
    let secrets = job
        .variables
        .iter()
        .filter(|v| v.masked && !v.value.is_empty())
        .map(|v| v.value.clone());
    let inner: Box<dyn JobSink> = if json {
        Box::new(JsonSink)
    } else {
        Box::new(TerminalSink { headers })
    };
    let mut sink = MaskingSink::new(inner, Secrets::new(secrets));
    // The image as `--image` takes it.
    let image = ImageSource::parse_with(&job.image, &ImagePolicy::local());
    let collect = Collect {
        artifacts_to: collected.as_deref(),
        caches_to,
    };
    let result = executor
        .run_image_with(job, image.as_ref(), &mut sink, cancel, collect)
        .await;
    sink.flush();
    if json {
        println!(
            "{}",
            serde_json::json!({"event": "result", "job": job.name, "result": result})
        );
    } else {
        eprintln!("kiln: {}", result.summary_allowing(&job.allow_failure));
        if let Some(p) = &result.debug_log {
            eprintln!("kiln: the guest's serial log is in {}", p.display());
        }
    }
    result
}

/// `run-job`'s exit code for a job: its own, 124 for a timeout, 130/143
/// when SIGINT/SIGTERM (`signal`) canceled it, 125 when kiln failed.
fn exit_code(result: &JobResult, signal: i32) -> u8 {
    match &result.failure {
        None => 0,
        Some(FailureReason::ScriptFailure) => result.exit_code.clamp(1, 255) as u8,
        Some(FailureReason::JobExecutionTimeout) => 124,
        Some(FailureReason::Canceled) => match signal {
            libc::SIGTERM => 143,
            _ => 130,
        },
        Some(_) => 125,
    }
}
