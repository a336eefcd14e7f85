//! `kiln daemon`: one job loop per `[[runners]]`, each job in its own VM
//! (one job's run: [`super::execute`]).
//!
//! Concurrency: a global semaphore of `concurrent` permits and one of
//! `limit` permits per runner; a runner asks for a job only while it holds
//! one of each, and the job keeps them until its final update is sent.
//! Shutdown: stop asking, wait up to `shutdown_timeout` for running jobs,
//! then cancel them (reported as `runner_system_failure`).
//! A runner asks for jobs whether or not `POST /runners/verify` works (a
//! 404 there is logged and ignored, as gitlab-runner's `run` does).
//! A runner whose token GitLab refuses (401/403 on verify or on a job
//! request) stops with an error naming it; the others go on. When every
//! runner has stopped, the daemon lets running jobs finish and exits with
//! that error instead of idling.
//! A job id is run at most once per daemon: GitLab handing the same job out
//! again (a resent answer, a retried request) is logged and ignored.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use super::backoff::Backoff;
use super::client::Client;
use super::execute::run_job;
use super::register::system_id;
use super::GitlabError;
use crate::config::{Config, RunnerConfig};
use crate::executor::{error_chain, Executor, ExecutorConfig};

/// Job ids remembered after they finish, so that GitLab handing one out
/// again is recognised (at least this many, and twice `concurrent`).
const SEEN_JOBS: usize = 10_000;

/// State shared by every runner loop and job.
pub(super) struct Shared {
    global: Arc<Semaphore>,
    concurrent: usize,
    check_interval: Duration,
    stopping: watch::Receiver<bool>,
    /// Running jobs were canceled because of shutdown.
    pub(super) forced: AtomicBool,
    pub(super) running: Mutex<HashMap<u64, Arc<watch::Sender<Option<bool>>>>>,
    /// Ids of the jobs taken, oldest first: running ones and recent ones.
    seen: Mutex<(HashSet<u64>, VecDeque<u64>)>,
    slots: Mutex<Vec<bool>>,
    pub(super) system_id: String,
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

    pub(super) fn take_slot(&self) -> usize {
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
    pub(super) fn free_slot(&self, i: usize) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(x) = s.get_mut(i) {
            *x = false;
        }
    }
}

/// One `[[runners]]` entry, ready to ask for and run jobs.
pub(super) struct Runner {
    pub(super) cfg: RunnerConfig,
    pub(super) client: Client,
    pub(super) executor: Arc<Executor>,
    limit: Arc<Semaphore>,
    /// Where the jobs' directories go.
    pub(super) run_dir: PathBuf,
    /// Where the jobs' caches are kept (`[runners.cache]`).
    pub(super) cache_store: crate::cache::Store,
}

/// Build the executor config of one runner.
fn executor_config(config: &Config, r: &RunnerConfig) -> Result<ExecutorConfig, GitlabError> {
    let run_dir = config
        .run_dir
        .clone()
        .unwrap_or_else(|| crate::paths::default_run_dir(None));
    ExecutorConfig::builder(
        r.cache_dir
            .clone()
            .or_else(|| config.cache_dir.clone())
            .unwrap_or_else(|| crate::paths::default_cache_dir(None, None)),
        run_dir,
    )
    .kernel_files(config.kernel.clone(), None)
    .agent(config.agent.clone())
    .backend(r.backend)
    .isolation(r.isolation)
    .snapshots(r.snapshots)
    .vmm_program(config.vmm.clone())
    .vcpus(r.cpus)
    .memory_mib(r.memory)
    .disk_gib(r.disk)
    .boot_timeout(Duration::from_secs(config.boot_timeout))
    // Serial logs of VMs that failed to boot, for the operator.
    .log_dir(config.log_dir.clone())
    .qemu(kiln_vmm::QemuOptions::new(config.qemu.clone()))
    .images(config.images.clone())
    .network(r.network_config()?)
    .build()
    .map_err(|e| GitlabError::Executor {
        runner: r.name.clone(),
        source: Box::new(e),
    })
}

/// Run the daemon until `shutdown` resolves, then shut down cleanly.
/// Returns an error, after the running jobs have finished, when every
/// runner stopped on its own (GitLab refused its token).
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), GitlabError> {
    let global = Arc::new(Semaphore::new(config.concurrent));
    run_shared(config, global, shutdown).await
}

/// [`run`] with the daemon's `concurrent` budget shared with other
/// providers (`crate::daemon`): `global` holds `concurrent` permits.
pub async fn run_shared(
    config: Config,
    global: Arc<Semaphore>,
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
        global,
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
        let cache_store = r
            .cache
            .clone()
            .unwrap_or_default()
            .open(&ec.cache_dir, config.aws_credentials.as_ref())
            .map_err(|e| GitlabError::Executor {
                runner: r.name.clone(),
                source: format!("opening the cache store: {}", error_chain(&e)).into(),
            })?;
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
            cache_store,
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
    // Verify the token once, to learn the runner's id. Job requests do not
    // depend on it (gitlab-runner's `run` does not call it): a GitLab or a
    // proxy that answers 404 or fails here is logged and ignored; only a
    // refused token stops the runner.
    let runner_id = match runner
        .client
        .verify(&runner.cfg.token, &shared.system_id)
        .await
    {
        Ok(id) => {
            tracing::info!(runner = %name, id = ?id.id, "runner token verified");
            id.id
        }
        Err(e) if e.token_refused() => return Err(refused(&name, &e)),
        Err(e) => {
            tracing::warn!(
                runner = %name,
                "verifying the runner failed ({}); asking for jobs anyway",
                error_chain(&e)
            );
            None
        }
    };
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
                    // GitLab answers 401/403 to a token it no longer knows
                    // (runner deleted, token reset). Verify tells a refused
                    // token from a passing fault (a proxy's 403); where
                    // GitLab has no verify (404, 405) the job request's
                    // answer stands; a verify that fails otherwise (5xx,
                    // transport) proves nothing: ask again after the backoff.
                    match runner
                        .client
                        .verify(&runner.cfg.token, &shared.system_id)
                        .await
                    {
                        Ok(_) => {}
                        Err(v) if v.token_refused() => return Err(refused(&name, &v)),
                        Err(v) if matches!(v.status(), Some(404 | 405)) => {
                            return Err(refused(&name, &e))
                        }
                        Err(_) => {}
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
