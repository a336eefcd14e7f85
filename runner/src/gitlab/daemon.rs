//! `kiln daemon`: one job loop per `[[runners]]`, each job in its own VM.
//!
//! Concurrency: a global semaphore of `concurrent` permits and one of
//! `limit` permits per runner; a runner asks for a job only while it holds
//! one of each, and the job keeps them until its final update is sent.
//! Shutdown: stop asking, wait up to `shutdown_timeout` for running jobs,
//! then cancel them (reported as `runner_system_failure`).
//! A runner whose token GitLab refuses stops with an error; when every
//! runner has stopped, the daemon lets running jobs finish and exits with
//! that error instead of idling.
//! A job id is run at most once per daemon: GitLab handing the same job out
//! again (a resent answer, a retried request) is logged and ignored.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_images::{Cache, Kernel};
use kiln_pipelines::ArtifactWhen;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::client::{Client, UpdateJob};
use super::job::{Context, GitStrategy, JobResponse};
use super::mask::{Masker, DEFAULT_TOKEN_PREFIXES};
use super::trace::{Trace, TraceSink, Updater};
use super::{artifacts, source, GitlabError};
use crate::config::{Config, RunnerConfig};
use crate::executor::{error_chain, Executor, ExecutorConfig, FailureReason};

/// Errors are retried after a growing, jittered delay up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often the final update is tried before the job is given up.
const FINAL_ATTEMPTS: u32 = 30;
/// Job ids remembered after they finish, so that GitLab handing one out
/// again is recognised (at least this many, and twice `concurrent`).
const SEEN_JOBS: usize = 10_000;

/// A delay in [d/2, 3d/2): spreads retries of many runners apart.
pub fn jitter(d: Duration) -> Duration {
    static SEED: AtomicU64 = AtomicU64::new(0);
    let mut x = SEED.load(Ordering::Relaxed);
    if x == 0 {
        x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id());
    }
    // xorshift64
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    SEED.store(x | 1, Ordering::Relaxed);
    let frac = (x % 1000) as f64 / 1000.0;
    d.mul_f64(0.5 + frac)
}

/// Exponential backoff with jitter.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::from_secs(1))
    }
    fn next(&mut self) -> Duration {
        let d = jitter(self.0);
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        d
    }
    fn reset(&mut self) {
        self.0 = Duration::from_secs(1);
    }
}

/// `s_` + the machine id's first 12 characters, or `r_` + 12 pseudo-random
/// ones (gitlab-runner's `system_id`).
pub fn system_id() -> String {
    let mid = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let mid = mid.trim();
    if mid.len() >= 12 && mid.chars().all(|c| c.is_ascii_hexdigit()) {
        return format!("s_{}", &mid[..12]);
    }
    let n = jitter(Duration::from_secs(1_000_000)).as_nanos();
    format!("r_{:012x}", n & 0xffff_ffff_ffff)
}

/// State shared by every runner loop and job.
struct Shared {
    global: Arc<Semaphore>,
    concurrent: usize,
    check_interval: Duration,
    stopping: watch::Receiver<bool>,
    /// Running jobs were canceled because of shutdown.
    forced: AtomicBool,
    running: Mutex<HashMap<u64, Arc<watch::Sender<Option<bool>>>>>,
    /// Ids of the jobs taken, oldest first: running ones and recent ones.
    seen: Mutex<(HashSet<u64>, VecDeque<u64>)>,
    slots: Mutex<Vec<bool>>,
    system_id: String,
}

impl Shared {
    /// Take job `id`; false when this daemon already took it.
    fn claim(&self, id: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (set, order) = &mut *seen;
        if !set.insert(id) {
            return false;
        }
        order.push_back(id);
        let limit = SEEN_JOBS.max(2 * self.concurrent);
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        while order.len() > limit {
            let Some(old) = order.pop_front() else { break };
            if running.contains_key(&old) {
                // Never forget a job that still runs (at most `concurrent`).
                order.push_back(old);
            } else {
                set.remove(&old);
            }
        }
        true
    }

    fn take_slot(&self) -> usize {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match s.iter().position(|used| !used) {
            Some(i) => {
                s[i] = true;
                i
            }
            None => {
                s.push(true);
                s.len() - 1
            }
        }
    }
    fn free_slot(&self, i: usize) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(x) = s.get_mut(i) {
            *x = false;
        }
    }
}

struct Runner {
    cfg: RunnerConfig,
    client: Client,
    executor: Arc<Executor>,
    limit: Arc<Semaphore>,
    run_dir: PathBuf,
}

/// Build the executor config of one runner.
fn executor_config(config: &Config, r: &RunnerConfig) -> Result<ExecutorConfig, GitlabError> {
    let exec_err = |e: Box<dyn std::error::Error + Send + Sync>| GitlabError::Executor {
        runner: r.name.clone(),
        source: e,
    };
    let cache_dir = r.cache_dir.clone().unwrap_or_else(Cache::default_dir);
    let kernel = match &config.kernel {
        Some(k) => Kernel::from_paths(k, None).map_err(|e| exec_err(Box::new(e)))?,
        None => {
            let cache = Cache::open(&cache_dir).map_err(|e| exec_err(Box::new(e)))?;
            Kernel::default_kernel(&cache).map_err(|e| exec_err(Box::new(e)))?
        }
    };
    let agent = match &config.agent {
        Some(a) => a.clone(),
        None => crate::agent::locate_agent().map_err(|e| exec_err(e.into()))?,
    };
    Ok(ExecutorConfig {
        cache_dir,
        run_dir: config
            .run_dir
            .clone()
            .unwrap_or_else(crate::paths::default_run_dir),
        agent,
        kernel,
        backend: r.backend_kind()?,
        vcpus: r.cpus,
        memory_mib: r.memory,
        scratch_bytes: r.disk << 30,
        boot_timeout: Duration::from_secs(config.boot_timeout),
        default_job_timeout: super::job::DEFAULT_TIMEOUT,
        // Serial logs of VMs that failed to boot, for the operator.
        log_dir: config.log_dir.clone().or_else(|| {
            std::env::var_os("XDG_STATE_HOME")
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME")
                        .map(|h| std::path::PathBuf::from(h).join(".local/state"))
                })
                .map(|d| d.join("kiln").join("logs"))
        }),
        extra_cmdline: String::new(),
        serial_log: None,
        network: r.network_config()?,
    })
}

/// Run the daemon until `shutdown` resolves, then shut down cleanly.
/// Returns an error, after the running jobs have finished, when every
/// runner stopped on its own (GitLab refused its token).
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), GitlabError> {
    config.validate()?;
    if config.runners.is_empty() {
        return Err(GitlabError::Config(crate::config::ConfigError::Invalid(
            "no [[runners]] configured".into(),
        )));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        global: Arc::new(Semaphore::new(config.concurrent)),
        concurrent: config.concurrent,
        check_interval: config.check_interval(),
        stopping: stop_rx,
        forced: AtomicBool::new(false),
        running: Mutex::new(HashMap::new()),
        seen: Mutex::new((HashSet::new(), VecDeque::new())),
        slots: Mutex::new(Vec::new()),
        system_id: system_id(),
    });
    let mut loops = Vec::new();
    for r in &config.runners {
        let ec = executor_config(&config, r)?;
        let run_dir = ec.run_dir.clone();
        // Also removes job directories (VM files, workspaces) of a kiln
        // that was killed; its QEMUs died with it (PDEATHSIG).
        let executor = Executor::new(ec).map_err(|e| GitlabError::Executor {
            runner: r.name.clone(),
            source: e.into(),
        })?;
        let limit = if r.limit == 0 {
            config.concurrent
        } else {
            r.limit
        };
        let runner = Arc::new(Runner {
            cfg: r.clone(),
            client: Client::new(&r.url)?,
            executor: Arc::new(executor),
            limit: Arc::new(Semaphore::new(limit)),
            run_dir,
        });
        loops.push(tokio::spawn(runner_loop(runner, shared.clone())));
    }
    tracing::info!(
        runners = config.runners.len(),
        concurrent = config.concurrent,
        "kiln daemon started"
    );
    let all = shared.concurrent as u32;
    tokio::pin!(shutdown);
    let loops = async move {
        let mut errors = Vec::new();
        for l in loops {
            match l.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(e) => tracing::error!("a runner loop failed: {e}"),
            }
        }
        errors
    };
    tokio::pin!(loops);
    let stopped_alone = tokio::select! {
        _ = &mut shutdown => None,
        errors = &mut loops => Some(errors),
    };
    let _ = stop_tx.send(true);
    let mut refused = None;
    if let Some(mut errors) = stopped_alone {
        // Every runner loop ended by itself: nothing will ask for jobs any
        // more. Say so, let the running jobs finish, and exit with the error
        // (a daemon that idles forever would hide it).
        tracing::error!(
            "no runner is left asking GitLab for jobs; kiln exits once the running jobs have finished"
        );
        let finished = tokio::select! {
            p = shared.global.acquire_many(all) => { drop(p); true }
            _ = &mut shutdown => false,
        };
        let error = errors.pop().unwrap_or_else(|| {
            GitlabError::Config(crate::config::ConfigError::Invalid(
                "every runner stopped".into(),
            ))
        });
        if finished {
            tracing::info!("kiln daemon stopped");
            return Err(error);
        }
        // A signal arrived meanwhile: shut down as usual, then report.
        refused = Some(error);
    } else {
        loops.await;
    }
    tracing::info!("shutting down: no new jobs; waiting for running ones");
    let waited =
        tokio::time::timeout(config.shutdown_timeout(), shared.global.acquire_many(all)).await;
    if waited.is_err() {
        tracing::warn!("shutdown timeout reached: canceling running jobs");
        shared.forced.store(true, Ordering::SeqCst);
        let running: Vec<_> = shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for c in running {
            let _ = c.send(Some(false));
        }
        // The jobs now send their final updates (bounded retries).
        let _ = shared.global.acquire_many(all).await;
    }
    tracing::info!("kiln daemon stopped");
    match refused {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Wait for `d` unless the daemon stops first. Returns false when stopping.
async fn pause(shared: &Shared, d: Duration) -> bool {
    let mut s = shared.stopping.clone();
    if *s.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => !*shared.stopping.borrow(),
        _ = s.wait_for(|v| *v) => false,
    }
}

/// The runner's token was refused: log it loudly, end the runner's loop.
fn refused(name: &str, e: &GitlabError) -> GitlabError {
    let (status, body) = match e {
        GitlabError::Status { status, body, .. } => (*status, body.clone()),
        other => (other.status().unwrap_or(0), other.to_string()),
    };
    let e = GitlabError::TokenRefused {
        runner: name.to_string(),
        status,
        body: body.chars().take(200).collect(),
    };
    tracing::error!(runner = %name, "{e}; this runner stops asking for jobs");
    e
}

async fn runner_loop(runner: Arc<Runner>, shared: Arc<Shared>) -> Result<(), GitlabError> {
    let name = runner.cfg.name.clone();
    let mut backoff = Backoff::new();
    // Verify the token first (and learn the runner's id).
    let runner_id = loop {
        match runner
            .client
            .verify(&runner.cfg.token, &shared.system_id)
            .await
        {
            Ok(id) => {
                tracing::info!(runner = %name, id = ?id.id, "runner token verified");
                break id.id;
            }
            Err(e) if e.token_refused() => return Err(refused(&name, &e)),
            Err(e) => {
                tracing::warn!(runner = %name, "verifying the runner: {}", error_chain(&e));
                if !pause(&shared, backoff.next()).await {
                    return Ok(());
                }
            }
        }
    };
    backoff.reset();
    let mut last_update: Option<String> = None;
    let mut stopping = shared.stopping.clone();
    loop {
        if *stopping.borrow() {
            return Ok(());
        }
        // Capacity first: a job is only requested when it can start.
        let permits = tokio::select! {
            p = async {
                let a = runner.limit.clone().acquire_owned().await;
                let b = shared.global.clone().acquire_owned().await;
                (a, b)
            } => p,
            _ = stopping.wait_for(|v| *v) => return Ok(()),
        };
        let (Ok(rp), Ok(gp)) = permits else {
            return Ok(());
        };
        let req =
            runner
                .client
                .request_job(&runner.cfg.token, &shared.system_id, last_update.as_deref());
        let answer = tokio::select! {
            a = req => a,
            _ = stopping.wait_for(|v| *v) => return Ok(()),
        };
        match answer {
            Ok((Some(job), lu)) => {
                if lu.is_some() {
                    last_update = lu;
                }
                backoff.reset();
                if !shared.claim(job.id) {
                    // A resent answer or a retried request: this daemon
                    // runs (or ran) the job and alone reports it.
                    tracing::warn!(
                        runner = %name,
                        job = job.id,
                        "GitLab handed out job {} again; it is already taken here, ignoring the copy",
                        job.id
                    );
                    drop((rp, gp));
                    if !pause(&shared, shared.check_interval).await {
                        return Ok(());
                    }
                    continue;
                }
                tracing::info!(runner = %name, job = job.id, "received a job");
                let (r, s) = (runner.clone(), shared.clone());
                tokio::spawn(async move {
                    run_job(r, s, runner_id, job, (rp, gp)).await;
                });
                // Ask again at once (gitlab-runner does the same).
            }
            Ok((None, lu)) => {
                if lu.is_some() {
                    last_update = lu;
                }
                backoff.reset();
                drop((rp, gp));
                if !pause(&shared, shared.check_interval).await {
                    return Ok(());
                }
            }
            Err(e) => {
                drop((rp, gp));
                if e.token_refused() {
                    // GitLab answers 403 to a token it no longer knows
                    // (runner deleted, token reset): ask verify to tell a
                    // refused token from a passing fault.
                    match runner
                        .client
                        .verify(&runner.cfg.token, &shared.system_id)
                        .await
                    {
                        Err(v) if v.token_refused() => return Err(refused(&name, &v)),
                        _ => {}
                    }
                }
                let d = backoff.next();
                tracing::warn!(runner = %name, "{} (retrying in {d:.1?})", error_chain(&e));
                if !pause(&shared, d).await {
                    return Ok(());
                }
            }
        }
    }
}

/// The final state of a job as GitLab is told.
struct Final {
    state: &'static str,
    reason: Option<String>,
    exit_code: Option<i32>,
    message: String,
    /// GitLab answered 403/404 for the job: it no longer runs there, and
    /// nothing more is sent.
    gone: bool,
}

fn reason_for(job: &JobResponse, wanted: &str, fallback: &str) -> String {
    let accepted = &job.features.failure_reasons;
    if accepted.is_empty() || accepted.iter().any(|r| r == wanted) {
        wanted.to_string()
    } else {
        fallback.to_string()
    }
}

fn failed(reason: String, exit_code: Option<i32>, message: String) -> Final {
    Final {
        state: "failed",
        reason: Some(reason),
        exit_code,
        message,
        gone: false,
    }
}

async fn run_job(
    runner: Arc<Runner>,
    shared: Arc<Shared>,
    runner_id: Option<u64>,
    job: JobResponse,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) {
    let id = job.id;
    // Named like the executor's job directories, so a later kiln removes
    // it if this one is killed.
    let job_dir = runner
        .run_dir
        .join(format!("job-{}-gl{id}", std::process::id()));
    let workspace = job_dir.join("workspace");
    let slot = shared.take_slot();

    let mut masked: Vec<String> = job
        .variables
        .iter()
        .filter(|v| v.masked)
        .map(|v| v.value.clone())
        .collect();
    masked.push(job.token.clone());
    let mut prefixes: Vec<String> = DEFAULT_TOKEN_PREFIXES
        .iter()
        .map(|s| s.to_string())
        .collect();
    prefixes.extend(job.features.token_mask_prefixes.iter().cloned());
    let trace = Trace::new(
        Masker::new(&masked, &prefixes),
        runner.cfg.output_limit_bytes(),
    );
    let (cancel_tx, cancel_rx) = watch::channel(None);
    let cancel_tx = Arc::new(cancel_tx);
    shared
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, cancel_tx.clone());
    let updater = Updater::new(
        runner.client.clone(),
        id,
        job.token.clone(),
        trace.clone(),
        cancel_tx.clone(),
    );
    let remote_canceled = updater.remote_canceled.clone();
    let gone = updater.gone.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let updater = tokio::spawn(updater.run(stop_rx));

    let outcome = execute(
        &runner, &shared, runner_id, slot, &job, &trace, &job_dir, &workspace, cancel_rx,
    )
    .await;
    let mut fin = match outcome {
        Ok(f) => f,
        Err(e) => failed("runner_system_failure".into(), None, error_chain(&e)),
    };
    if fin.gone {
        gone.store(true, Ordering::SeqCst);
    }
    if fin.reason.as_deref() == Some("job_canceled") || fin.reason.as_deref() == Some("canceled") {
        if shared.forced.load(Ordering::SeqCst) && !remote_canceled.load(Ordering::SeqCst) {
            fin = failed(
                "runner_system_failure".into(),
                fin.exit_code,
                "the runner was shut down".into(),
            );
        } else {
            fin.reason = Some(reason_for(&job, "job_canceled", "script_failure"));
        }
    }
    if fin.state == "success" {
        trace.line("\x1b[32;1mJob succeeded\x1b[0;m");
    } else {
        trace.line(&format!(
            "\x1b[31;1mERROR: Job failed: {}\x1b[0;m",
            fin.message
        ));
    }
    trace.flush();

    let _ = stop_tx.send(true);
    match updater.await {
        Ok(up) => final_update(up, &fin).await,
        Err(e) => tracing::error!(job = id, "the trace task failed: {e}"),
    }
    shared
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    shared.free_slot(slot);
    if let Err(e) = std::fs::remove_dir_all(&job_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("could not remove {}: {e}", job_dir.display());
        }
    }
    tracing::info!(job = id, state = fin.state, reason = ?fin.reason, "job finished");
}

/// Everything between receiving the job and its final state.
#[allow(clippy::too_many_arguments)]
async fn execute(
    runner: &Runner,
    shared: &Shared,
    runner_id: Option<u64>,
    slot: usize,
    job: &JobResponse,
    trace: &Arc<Trace>,
    job_dir: &Path,
    workspace: &Path,
    cancel: watch::Receiver<Option<bool>>,
) -> Result<Final, GitlabError> {
    let sections = job.features.trace_sections;
    let section = |name: &str, header: &str| {
        if sections {
            trace.section_start(name, header)
        } else if !header.is_empty() {
            trace.line(&format!("\x1b[36;1m{header}\x1b[0;m"));
        }
    };
    let end = |name: &str| {
        if sections {
            trace.section_end(name)
        }
    };
    trace.line(&format!(
        "\x1b[1;m\x1b[0KRunning with kiln {}\x1b[0;m\n  on {} (system {})",
        env!("CARGO_PKG_VERSION"),
        runner.cfg.name,
        shared.system_id
    ));
    std::fs::create_dir_all(workspace)
        .map_err(|e| GitlabError::Workspace(format!("{}: {e}", workspace.display())))?;
    let ctx = Context {
        runner_id,
        runner_name: runner.cfg.name.clone(),
        default_image: runner.cfg.image.clone(),
        concurrent_id: slot,
        workspace: workspace.to_path_buf(),
    };
    let prepared = match job.to_spec(&ctx) {
        Ok(p) => p,
        Err(e) => {
            return Ok(failed(
                reason_for(job, "runner_configuration_error", "script_failure"),
                None,
                e.to_string(),
            ))
        }
    };
    section("prepare_executor", "Preparing the \"kiln\" VM executor");
    trace.line(&format!(
        "Using image {} in a disposable VM",
        prepared.spec.image
    ));
    end("prepare_executor");

    section("get_sources", "Getting source from Git repository");
    if prepared.git == GitStrategy::None {
        trace.line("Skipping Git repository setup");
    } else if let Err(e) = source::fetch(
        workspace,
        &job.git_info,
        prepared.git_depth,
        prepared.submodules,
        trace,
    )
    .await
    {
        end("get_sources");
        return Ok(failed("script_failure".into(), Some(1), error_chain(&e)));
    }
    end("get_sources");

    let deps: Vec<_> = job
        .dependencies
        .iter()
        .filter(|d| d.artifacts_file.is_some())
        .collect();
    if !deps.is_empty() {
        section("download_artifacts", "Downloading artifacts");
        for d in deps {
            trace.line(&format!(
                "Downloading artifacts for {} ({})...",
                d.name, d.id
            ));
            let got = download_with_retries(&runner.client, d.id, &d.token).await;
            let res = got.and_then(|zip| artifacts::unzip_into(&zip, workspace));
            if let Err(e) = res {
                end("download_artifacts");
                return Ok(failed(
                    "runner_system_failure".into(),
                    None,
                    format!("artifacts of {}: {}", d.name, error_chain(&e)),
                ));
            }
        }
        end("download_artifacts");
    }

    if cancel.borrow().is_some() {
        // Canceled while the sources or dependencies were fetched: no VM.
        return Ok(failed(
            "job_canceled".into(),
            None,
            "canceled before the VM started".into(),
        ));
    }
    let mut sink = TraceSink {
        trace: trace.clone(),
        sections,
        current: None,
    };
    // The guest sends the artifact files over its console; they land here.
    let collected = workspace.with_file_name("artifacts");
    let result = runner
        .executor
        .run_collecting(&prepared.spec, &mut sink, cancel, Some(&collected))
        .await;
    trace.flush();
    if let Some(open) = sink.current.take() {
        let name = if open == "after_script" {
            open
        } else {
            format!("step_{open}")
        };
        end(&name);
    }
    let _ = job_dir;

    let mut fin = match &result.failure {
        None => Final {
            state: "success",
            reason: None,
            exit_code: Some(0),
            message: String::new(),
            gone: false,
        },
        Some(FailureReason::ScriptFailure) => failed(
            "script_failure".into(),
            Some(result.exit_code),
            format!("exit code {}", result.exit_code),
        ),
        Some(FailureReason::JobExecutionTimeout) => failed(
            "job_execution_timeout".into(),
            None,
            "execution took longer than the job's timeout".into(),
        ),
        Some(FailureReason::ImagePullFailure(m)) => failed(
            reason_for(job, "image_pull_failure", "runner_system_failure"),
            None,
            format!("image: {m}"),
        ),
        Some(FailureReason::RunnerSystemFailure(m)) => {
            failed("runner_system_failure".into(), None, m.clone())
        }
        Some(FailureReason::Canceled) => failed("job_canceled".into(), None, "canceled".into()),
    };

    // Artifacts: the files the guest sent back, selected per artifact spec.
    let ok = fin.state == "success";
    let booted = result.boot_ms > 0;
    let wanted: Vec<_> = prepared
        .spec
        .artifacts
        .iter()
        .zip(&job.artifacts)
        .filter(|(a, _)| match a.when {
            ArtifactWhen::Always => true,
            ArtifactWhen::OnSuccess => ok,
            ArtifactWhen::OnFailure => !ok,
        })
        .collect();
    if !wanted.is_empty() && booted && fin.reason.as_deref() != Some("job_canceled") {
        let name = if ok {
            "upload_artifacts_on_success"
        } else {
            "upload_artifacts_on_failure"
        };
        section(name, "Uploading artifacts for job");
        for (spec, raw) in wanted {
            if spec.untracked {
                trace.line("WARNING: artifacts:untracked is not supported by kiln yet");
            }
            let files = artifacts::select(&collected, &spec.paths, &spec.exclude);
            if files.is_empty() {
                trace.line(&format!(
                    "WARNING: {}: no matching files",
                    spec.paths.join(", ")
                ));
                continue;
            }
            trace.line(&format!("Uploading {} file(s)...", files.len()));
            let base = raw
                .name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "artifacts".into());
            let format = raw.artifact_format.clone().unwrap_or_else(|| "zip".into());
            let kind = raw
                .artifact_type
                .clone()
                .unwrap_or_else(|| "archive".into());
            let up = match artifacts::zip_files(&collected, &files) {
                Ok(zip) => {
                    upload_with_retries(
                        &runner.client,
                        job,
                        zip,
                        &format!("{base}.zip"),
                        &kind,
                        &format,
                        spec.expire_in.as_deref(),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match up {
                Ok(()) => trace.line("Uploading artifacts... ok"),
                Err(e) if matches!(e.status(), Some(403 | 404)) => {
                    // The job is no longer running on GitLab (canceled,
                    // failed, erased): it takes nothing more from us.
                    tracing::warn!(job = job.id, "uploading artifacts: {}", error_chain(&e));
                    fin.gone = true;
                    break;
                }
                Err(e) => {
                    trace.line(&format!(
                        "\x1b[31;1mERROR: Uploading artifacts failed: {}\x1b[0;m",
                        error_chain(&e)
                    ));
                    if ok {
                        fin = match e.status() {
                            // GitLab refused these artifacts (413: larger
                            // than the instance allows): the job's doing,
                            // and retrying it elsewhere would not help.
                            Some(s @ 400..=499) => failed(
                                "script_failure".into(),
                                None,
                                format!("GitLab refused the artifacts ({s})"),
                            ),
                            _ => failed(
                                "runner_system_failure".into(),
                                None,
                                "uploading artifacts failed".into(),
                            ),
                        };
                    }
                }
            }
        }
        end(name);
    }
    Ok(fin)
}

async fn download_with_retries(
    client: &Client,
    id: u64,
    token: &str,
) -> Result<Vec<u8>, GitlabError> {
    let mut b = Backoff::new();
    let mut last = None;
    for _ in 0..5 {
        match client.download_artifacts(id, token).await {
            Ok(z) => return Ok(z),
            Err(e) if matches!(e.status(), Some(401 | 403 | 404)) => return Err(e),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(b.next()).await;
    }
    Err(last.unwrap_or_else(|| GitlabError::Archive("download failed".into())))
}

#[allow(clippy::too_many_arguments)]
async fn upload_with_retries(
    client: &Client,
    job: &JobResponse,
    zip: Vec<u8>,
    filename: &str,
    kind: &str,
    format: &str,
    expire_in: Option<&str>,
) -> Result<(), GitlabError> {
    let mut b = Backoff::new();
    let mut last = None;
    for _ in 0..5 {
        match client
            .upload_artifacts(
                job.id,
                &job.token,
                zip.clone(),
                filename,
                kind,
                format,
                expire_in,
            )
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.status(), Some(400..=499)) => return Err(e),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(b.next()).await;
    }
    Err(last.unwrap_or_else(|| GitlabError::Archive("upload failed".into())))
}

/// Flush the trace, then `PUT` the final state until GitLab accepts it:
/// 202 = retry after the interval, 412 = resend the whole trace.
async fn final_update(mut up: Updater, fin: &Final) {
    let mut b = Backoff::new();
    for attempt in 0..FINAL_ATTEMPTS {
        if up.is_gone() {
            tracing::info!(
                job = up.job_id,
                "the job is gone on GitLab: no final update"
            );
            return;
        }
        if !up.patch().await {
            if up.is_gone() {
                return;
            }
            tokio::time::sleep(b.next().min(Duration::from_secs(5))).await;
            continue;
        }
        let output = up.trace.output();
        let body = UpdateJob {
            token: up.token.clone(),
            state: fin.state.into(),
            failure_reason: fin.reason.clone(),
            exit_code: fin.exit_code,
            checksum: output.checksum.clone(),
            output,
        };
        match up.client.update_job(up.job_id, &body).await {
            Ok(r) => match r.status {
                200 => {
                    tracing::debug!(job = up.job_id, attempt, "final update accepted");
                    return;
                }
                202 => {
                    let d = r.remote.interval.unwrap_or(up.interval);
                    tokio::time::sleep(d).await;
                }
                412 => {
                    tracing::info!(job = up.job_id, "GitLab asked for the whole trace again");
                    up.sent = 0;
                }
                403 | 404 => {
                    tracing::warn!(
                        job = up.job_id,
                        status = r.status,
                        "the job is gone on the server"
                    );
                    return;
                }
                s => {
                    tracing::warn!(
                        job = up.job_id,
                        status = s,
                        "final update refused; retrying"
                    );
                    tokio::time::sleep(b.next().min(Duration::from_secs(5))).await;
                }
            },
            Err(e) => {
                tracing::warn!(job = up.job_id, "final update: {}", error_chain(&e));
                tokio::time::sleep(b.next().min(Duration::from_secs(5))).await;
            }
        }
    }
    tracing::error!(job = up.job_id, "giving up on the final update");
}

/// `kiln gitlab verify`: check every runner's token.
pub async fn verify_all(
    config: &Config,
) -> Result<Vec<(String, Result<Option<u64>, GitlabError>)>, GitlabError> {
    let sid = system_id();
    let mut out = Vec::new();
    for r in &config.runners {
        let c = Client::new(&r.url)?;
        out.push((r.name.clone(), c.verify(&r.token, &sid).await.map(|i| i.id)));
    }
    Ok(out)
}

/// `kiln gitlab register`: legacy registration; adds a `[[runners]]` entry
/// to the file (created when missing).
pub async fn register(
    config_path: &Path,
    url: &str,
    registration_token: &str,
    name: &str,
    tags: &[String],
    image: Option<String>,
) -> Result<u64, GitlabError> {
    let mut config = if config_path.exists() {
        Config::load(config_path)?
    } else {
        Config::default()
    };
    let c = Client::new(url)?;
    let id = c
        .register(registration_token, name, tags, tags.is_empty())
        .await?;
    let token = id.token.clone().ok_or_else(|| GitlabError::Status {
        what: "registering the runner",
        status: 201,
        body: "no token in the answer".into(),
    })?;
    let mut r: RunnerConfig = toml::from_str(&format!(
        "name = {}\nurl = {}\ntoken = {}\n",
        toml::Value::from(name),
        toml::Value::from(url),
        toml::Value::from(token)
    ))
    .map_err(|e| GitlabError::BadJob(e.to_string()))?;
    r.image = image;
    config.runners.retain(|x| x.name != name);
    config.runners.push(r);
    config.save(config_path)?;
    Ok(id.id.unwrap_or(0))
}
