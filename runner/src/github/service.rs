//! One `[[github]]` entry at work.
//!
//! **Demand** is the set of queued jobs whose labels match a profile,
//! learnt from `workflow_job` webhooks (`queued` adds, `in_progress` and
//! `completed` remove) and from the reconciler, which lists the queued and
//! running jobs every `reconcile_interval` and replaces what it lists.
//!
//! **Capacity is counted in runners, not jobs**: GitHub gives a queued job
//! to any idle runner whose labels fit, so a runner started "for" job A may
//! take job B. A profile gets a new runner while it has more queued jobs
//! than runners that have not yet taken one (a runner is known to have
//! taken a job from an `in_progress` event or listing naming it); at most
//! `capacity` runners of the entry exist at once, and each holds one of the
//! daemon's `concurrent` slots from its JIT registration to its record's
//! removal.
//!
//! **Errors and rate limits** (5xx, transport errors, 403/429 with
//! `retry-after` or an exhausted rate limit) stop every call of the entry
//! until the wait GitHub asked for, or an exponential backoff, has passed.
//! A VM is only started after `generate-jitconfig` answered 201, so a
//! failed or retried call never starts a second VM; a registration whose
//! answer was lost is looked up by its unique name and removed.
//!
//! **Shutdown**: runners that have not taken a job are stopped at once;
//! those running a job get `shutdown_timeout`, then their VM is destroyed;
//! every runner's record is removed before the daemon exits.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use kiln_images::ImageSource;
use tokio::sync::{watch, Notify, Semaphore};

use super::api::{Api, ApiError};
use super::config::{GithubConfig, Profile};
use super::status::{Counters, EntryStatus, QueuedStatus, RunnerStatus};
use super::webhook::{Deliveries, JobEvent};
use crate::executor::Executor;

/// Errors are retried after a growing delay up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A profile with its executor and parsed image.
pub struct ProfileRt {
    pub cfg: Profile,
    pub executor: Arc<Executor>,
    pub image: ImageSource,
}

/// Where a runner is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Registering (JIT config) and booting its VM.
    Starting,
    /// The runner process runs in the VM.
    Running,
    /// The daemon is stopping; the VM goes when its job ends or at
    /// `shutdown_timeout`.
    Draining,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Draining => "draining",
        }
    }
}

pub(super) struct Slot {
    pub(super) profile: usize,
    pub(super) phase: Phase,
    pub(super) id: Option<u64>,
    pub(super) job: Option<u64>,
    pub(super) cancel: Option<Arc<watch::Sender<Option<bool>>>>,
    pub(super) since: SystemTime,
    pub(super) log: Option<PathBuf>,
}

struct Queued {
    profile: usize,
    repo: String,
    run_id: u64,
    since: Instant,
}

#[derive(Default)]
pub(super) struct State {
    queued: BTreeMap<u64, Queued>,
    pub(super) runners: BTreeMap<String, Slot>,
    deliveries: Deliveries,
    /// Jobs seen started or finished: a late `queued` delivery for one of
    /// them must not ask for a runner.
    started: Deliveries,
    not_before: Option<Instant>,
    backoff: Option<Duration>,
    pub(super) counters: Counters,
}

/// One `[[github]]` entry.
pub struct Service {
    pub(super) cfg: GithubConfig,
    pub(super) api: Api,
    secret: Option<String>,
    pub(super) profiles: Vec<ProfileRt>,
    pub(super) dist: PathBuf,
    pub(super) log_dir: PathBuf,
    global: Arc<Semaphore>,
    capacity: usize,
    pub(super) state: Mutex<State>,
    pub(super) wake: Notify,
    pub(super) stopping: watch::Receiver<bool>,
    shutdown_timeout: Duration,
    pub(super) webhook_addr: Mutex<Option<String>>,
}

impl Service {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: GithubConfig,
        api: Api,
        secret: Option<String>,
        profiles: Vec<ProfileRt>,
        dist: PathBuf,
        log_dir: PathBuf,
        global: Arc<Semaphore>,
        concurrent: usize,
        stopping: watch::Receiver<bool>,
        shutdown_timeout: Duration,
    ) -> Service {
        let capacity = if cfg.capacity == 0 {
            concurrent
        } else {
            cfg.capacity
        };
        Service {
            cfg,
            api,
            secret,
            profiles,
            dist,
            log_dir,
            global,
            capacity,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            stopping,
            shutdown_timeout,
            webhook_addr: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn webhook_secret(&self) -> Option<&str> {
        self.secret.as_deref()
    }

    pub(super) fn count_bad_signature(&self) {
        self.lock().counters.bad_signatures += 1;
    }

    pub(super) fn first_delivery(&self, id: &str) -> bool {
        let mut st = self.lock();
        st.counters.webhooks += 1;
        st.deliveries.first_time(id)
    }

    fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// A `workflow_job` event: what it changes in the demand. False when
    /// it is not this entry's (another repository, no matching profile).
    pub(super) fn on_event(&self, ev: &JobEvent) -> bool {
        let repo = ev
            .repository
            .as_ref()
            .map(|r| r.full_name.clone())
            .unwrap_or_default();
        if let Some(mine) = &self.cfg.repository {
            if !repo.eq_ignore_ascii_case(mine) {
                return false;
            }
        }
        let job = &ev.workflow_job;
        let mut st = self.lock();
        match ev.action.as_str() {
            "queued" => {
                if st.started.contains(&job.id.to_string()) {
                    return true;
                }
                let Some(profile) = self.cfg.profile_for(&job.labels) else {
                    tracing::debug!(github = %self.cfg.name, job = job.id, labels = ?job.labels, "no profile matches the job's labels");
                    return false;
                };
                tracing::info!(github = %self.cfg.name, job = job.id, profile = %self.profiles[profile].cfg.name, "job queued");
                st.queued.entry(job.id).or_insert(Queued {
                    profile,
                    repo,
                    run_id: job.run_id,
                    since: Instant::now(),
                });
                drop(st);
                self.wake.notify_one();
            }
            "in_progress" | "completed" => {
                st.started.first_time(&job.id.to_string());
                st.queued.remove(&job.id);
                if let Some(name) = &job.runner_name {
                    if let Some(slot) = st.runners.get_mut(name) {
                        slot.job = Some(job.id);
                    }
                }
                drop(st);
                self.wake.notify_one();
            }
            _ => {}
        }
        true
    }

    /// A call failed: wait what GitHub asked, else back off.
    pub(super) fn api_failed(&self, e: &ApiError) {
        let mut st = self.lock();
        st.counters.api_errors += 1;
        let d = match e.retry_after() {
            Some(d) => d,
            None => {
                let next = st
                    .backoff
                    .map_or(Duration::from_secs(1), |b| (b * 2).min(MAX_BACKOFF));
                st.backoff = Some(next);
                crate::gitlab::backoff::jitter(next)
            }
        };
        let until = Instant::now() + d;
        st.not_before = Some(st.not_before.map_or(until, |nb| nb.max(until)));
        tracing::warn!(
            github = %self.cfg.name,
            "{} (no GitHub call for {d:.1?})",
            crate::executor::error_chain(e)
        );
    }

    pub(super) fn api_ok(&self) {
        self.lock().backoff = None;
    }

    /// How long calls must still wait, if they must.
    pub(super) fn backing_off(&self) -> Option<Duration> {
        let mut st = self.lock();
        let nb = st.not_before?;
        let now = Instant::now();
        if now >= nb {
            st.not_before = None;
            return None;
        }
        Some(nb - now)
    }

    /// Start the runners the demand asks for and capacity allows.
    fn schedule(self: &Arc<Self>) {
        if self.stopping() || self.backing_off().is_some() {
            return;
        }
        let mut st = self.lock();
        for (i, p) in self.profiles.iter().enumerate() {
            let queued = st.queued.values().filter(|q| q.profile == i).count();
            let free = st
                .runners
                .values()
                .filter(|r| r.profile == i && r.job.is_none() && r.phase != Phase::Draining)
                .count();
            for _ in free..queued {
                if st.runners.len() >= self.capacity {
                    return;
                }
                let Ok(permit) = self.global.clone().try_acquire_owned() else {
                    return;
                };
                let name = runner_name(&self.cfg.name_prefix, &p.cfg.name);
                st.runners.insert(
                    name.clone(),
                    Slot {
                        profile: i,
                        phase: Phase::Starting,
                        id: None,
                        job: None,
                        cancel: None,
                        since: SystemTime::now(),
                        log: None,
                    },
                );
                tracing::info!(github = %self.cfg.name, runner = %name, profile = %p.cfg.name, "starting a runner");
                tokio::spawn(super::runner::serve(self.clone(), name, i, permit));
            }
        }
    }

    /// Start runners whenever something changed, until the daemon stops.
    pub async fn schedule_loop(self: Arc<Self>) {
        let mut stopping = self.stopping.clone();
        loop {
            self.schedule();
            let wait = self.backing_off().unwrap_or(Duration::from_secs(1));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    }

    /// List queued and running jobs every `reconcile_interval`.
    pub async fn reconcile_loop(self: Arc<Self>) {
        let mut stopping = self.stopping.clone();
        loop {
            if self.backing_off().is_none() {
                self.reconcile().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.reconcile_interval()) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    }

    async fn reconcile(&self) {
        for repo in self.cfg.reconciled_repositories() {
            let started = Instant::now();
            let jobs = match self.api.active_jobs(&repo).await {
                Ok(j) => j,
                Err(e) => {
                    self.api_failed(&e);
                    return;
                }
            };
            self.api_ok();
            let mut st = self.lock();
            st.counters.reconciles += 1;
            // What this listing shows replaces what an earlier one or an
            // older webhook said; newer webhooks stay.
            st.queued
                .retain(|_, q| !q.repo.eq_ignore_ascii_case(&repo) || q.since >= started);
            for j in jobs {
                if j.status == "queued" {
                    if st.started.contains(&j.id.to_string()) {
                        continue;
                    }
                    if let Some(profile) = self.cfg.profile_for(&j.labels) {
                        st.queued.entry(j.id).or_insert(Queued {
                            profile,
                            repo: repo.clone(),
                            run_id: j.run_id,
                            since: started,
                        });
                    }
                } else {
                    st.started.first_time(&j.id.to_string());
                    st.queued.remove(&j.id);
                    if let Some(slot) = j.runner_name.as_ref().and_then(|n| st.runners.get_mut(n)) {
                        slot.job = Some(j.id);
                    }
                }
            }
        }
        self.wake.notify_one();
    }

    /// Stop: idle runners at once, busy ones after `shutdown_timeout`;
    /// returns once every runner's VM is gone and its record removed.
    pub async fn shutdown(&self) {
        let stop_idle = |st: &mut State| {
            for slot in st.runners.values_mut() {
                slot.phase = Phase::Draining;
                if slot.job.is_none() {
                    if let Some(c) = &slot.cancel {
                        let _ = c.send(Some(false));
                    }
                }
            }
        };
        stop_idle(&mut self.lock());
        let deadline = Instant::now() + self.shutdown_timeout;
        loop {
            {
                let mut st = self.lock();
                if st.runners.is_empty() {
                    return;
                }
                if Instant::now() >= deadline {
                    for slot in st.runners.values_mut() {
                        if let Some(c) = &slot.cancel {
                            let _ = c.send(Some(false));
                        }
                    }
                } else {
                    // A runner that registered meanwhile.
                    stop_idle(&mut st);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What `kiln github status` shows of this entry.
    pub fn snapshot(&self) -> EntryStatus {
        let st = self.lock();
        let now = Instant::now();
        EntryStatus {
            name: self.cfg.name.clone(),
            webhook: self
                .webhook_addr
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            queued: st
                .queued
                .iter()
                .map(|(id, q)| QueuedStatus {
                    job: *id,
                    run: q.run_id,
                    repository: q.repo.clone(),
                    profile: self.profiles[q.profile].cfg.name.clone(),
                })
                .collect(),
            runners: st
                .runners
                .iter()
                .map(|(name, s)| RunnerStatus {
                    name: name.clone(),
                    id: s.id,
                    profile: self.profiles[s.profile].cfg.name.clone(),
                    state: s.phase.name().into(),
                    job: s.job,
                    since: s
                        .since
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    log: s.log.clone(),
                })
                .collect(),
            backoff_s: st
                .not_before
                .filter(|nb| *nb > now)
                .map(|nb| (nb - now).as_secs_f64()),
            counters: st.counters.clone(),
        }
    }
}

/// `<prefix>-<profile>-<12 random hex digits>`: unique, so a registration
/// whose answer was lost can be found by name.
fn runner_name(prefix: &str, profile: &str) -> String {
    let mut b = [0u8; 6];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !random {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&(t as u64 ^ u64::from(std::process::id())).to_le_bytes()[..6]);
    }
    let profile: String = profile
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(32)
        .collect();
    format!("{prefix}-{profile}-{}", hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_names_are_unique_and_tidy() {
        let a = runner_name("kiln", "small vm");
        let b = runner_name("kiln", "small vm");
        assert_ne!(a, b);
        assert!(a.starts_with("kiln-small-vm-"), "{a}");
        assert_eq!(a.len(), "kiln-small-vm-".len() + 12);
    }
}
