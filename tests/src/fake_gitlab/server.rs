//! The fake's server: [`FakeGitlab`] (start on loopback, stop on drop,
//! the methods tests call) and the state its handlers share.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post, put};
use axum::Router;
use serde_json::{json, Value};

use super::api::{download, patch_trace, register, request_job, update_job, upload, verify};
use super::faults::faults;
use super::git::{git_http, make_repo};
use super::{FakeJob, Faults, GITLAB_FAILURE_REASONS};

/// GitLab's defaults: `ci_jobs_trace_size_limit` (100 MB) and
/// `max_artifacts_size` (100 MB).
const DEFAULT_TRACE_LIMIT: usize = 100 << 20;
const DEFAULT_ARTIFACT_LIMIT: usize = 100 << 20;

#[derive(Default)]
pub(super) struct Inner {
    pub(super) runner_token: String,
    pub(super) queue: VecDeque<u64>,
    pub(super) jobs: BTreeMap<u64, FakeJob>,
    pub(super) next_id: u64,
    pub(super) queue_version: u64,
    pub(super) faults: Faults,
    pub(super) rng: u64,
    pub(super) verifies: u32,
    /// Verify calls, answered or not.
    pub(super) verify_calls: u32,
    /// Answer 404 to `POST /runners/verify`.
    pub(super) verify_missing: bool,
    /// The status a refused runner token gets (403 unless set).
    pub(super) refusal: u16,
    pub(super) requests: u32,
    /// Job requests answered with an injected 500.
    pub(super) request_errors: u32,
    pub(super) handed_out: u32,
    pub(super) acks: u32,
    pub(super) drops: u32,
    pub(super) max_running: usize,
    pub(super) trace_limit: usize,
    pub(super) artifact_limit: usize,
    pub(super) update_interval: u64,
    pub(super) dependency_artifacts: HashMap<u64, (String, Vec<u8>)>,
    pub(super) repo_root: PathBuf,
}

pub(super) type Shared = Arc<Mutex<Inner>>;

pub(super) fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Inner> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    pub(super) fn random(&mut self) -> f64 {
        let mut x = self.rng.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x % 10_000) as f64 / 10_000.0
    }

    pub(super) fn running(&self) -> usize {
        self.jobs.values().filter(|j| j.processing()).count()
    }
}

/// A running fake GitLab on loopback, served from its own thread.
pub struct FakeGitlab {
    pub url: String,
    pub runner_token: String,
    /// Commit of `main` in the served repository.
    pub sha: String,
    state: Shared,
    /// Stopped and joined on drop (before the fields below).
    _server: crate::fake_server::ServerThread,
    _repo: tempfile::TempDir,
}

impl FakeGitlab {
    /// Start on 127.0.0.1 (a port the kernel picks, held from bind to
    /// drop) with a repository holding `files`.
    pub fn start(runner_token: &str, files: &[(&str, &str)]) -> FakeGitlab {
        let repo = tempfile::tempdir().expect("tempdir");
        let sha = make_repo(repo.path(), files);
        let state: Shared = Arc::new(Mutex::new(Inner {
            runner_token: runner_token.into(),
            next_id: 100,
            queue_version: 1,
            rng: 0x9e37_79b9_7f4a_7c15,
            trace_limit: DEFAULT_TRACE_LIMIT,
            artifact_limit: DEFAULT_ARTIFACT_LIMIT,
            update_interval: 1,
            refusal: 403,
            repo_root: repo.path().to_path_buf(),
            ..Default::default()
        }));
        let app = Router::new()
            .route("/api/v4/runners/verify", post(verify))
            .route("/api/v4/runners", post(register))
            .route("/api/v4/jobs/request", post(request_job))
            .route("/api/v4/jobs/{id}", put(update_job))
            .route("/api/v4/jobs/{id}/trace", axum::routing::patch(patch_trace))
            .route(
                "/api/v4/jobs/{id}/artifacts",
                post(upload).merge(get(download)),
            )
            .route("/repo.git/{*rest}", any(git_http))
            .layer(axum::middleware::from_fn_with_state(state.clone(), faults))
            // Our own limits answer 413; axum's 2 MB default must not.
            .layer(DefaultBodyLimit::max(1 << 30))
            .with_state(state.clone());
        let server = crate::fake_server::ServerThread::start("fake-gitlab", app);
        let url = server.url.clone();
        FakeGitlab {
            url,
            runner_token: runner_token.into(),
            sha,
            state,
            _server: server,
            _repo: repo,
        }
    }

    pub fn set_faults(&self, f: Faults) {
        lock(&self.state).faults = f;
    }

    /// GitLab's `ci_jobs_trace_size_limit`, in bytes.
    pub fn set_trace_limit(&self, bytes: usize) {
        lock(&self.state).trace_limit = bytes;
    }

    /// GitLab's maximum artifacts size, in bytes (413 past it).
    pub fn set_artifact_limit(&self, bytes: usize) {
        lock(&self.state).artifact_limit = bytes;
    }

    /// `X-GitLab-Trace-Update-Interval` in seconds (default 1; GitLab
    /// sends 3 while someone watches the job, else 60).
    pub fn set_update_interval(&self, secs: u64) {
        lock(&self.state).update_interval = secs;
    }

    /// Change the runner token (the old one is refused from now on, as
    /// after a token reset or the runner's deletion).
    pub fn set_runner_token(&self, token: &str) {
        lock(&self.state).runner_token = token.into();
    }

    /// A job payload like GitLab's (see docs/gitlab.md), ready to adjust
    /// and [`push`](Self::push).
    pub fn job(&self, image: &str, script: &[&str]) -> Value {
        let mut s = lock(&self.state);
        s.next_id += 1;
        let id = s.next_id;
        let token = format!("jobtok-{id}-{:x}", (s.random() * 1e9) as u64);
        let host = self.url.trim_start_matches("http://");
        json!({
            "id": id, "token": token, "allow_git_fetch": true,
            "job_info": {"name": format!("job-{id}"), "stage": "test", "project_id": 1,
                         "project_name": "proj", "project_full_path": "group/proj"},
            "git_info": {"repo_url": format!("http://gitlab-ci-token:{token}@{host}/repo.git"),
                         "ref": "main", "sha": self.sha, "before_sha": "0000000000000000000000000000000000000000",
                         "ref_type": "branch", "refspecs": ["+refs/heads/main:refs/remotes/origin/main"], "depth": 5},
            "runner_info": {"timeout": 300},
            "variables": [
                {"key": "CI_JOB_ID", "value": id.to_string(), "public": true, "masked": false},
                {"key": "CI_JOB_TOKEN", "value": token, "public": false, "masked": true},
                {"key": "CI_PROJECT_PATH", "value": "group/proj", "public": true, "masked": false}
            ],
            "steps": [
                {"name": "script", "script": script, "timeout": 300, "when": "on_success", "allow_failure": false}
            ],
            "image": {"name": image},
            "artifacts": [],
            "dependencies": [],
            "features": {"trace_sections": true, "failure_reasons": GITLAB_FAILURE_REASONS}
        })
    }

    /// Queue a job; returns its id.
    pub fn push(&self, payload: Value) -> u64 {
        let mut s = lock(&self.state);
        let id = payload["id"].as_u64().expect("job id");
        let token = payload["token"].as_str().expect("job token").to_string();
        let f = s.faults.clone();
        s.jobs.insert(
            id,
            FakeJob {
                id,
                token,
                payload,
                assigned: 0,
                assignments: Vec::new(),
                runs: 0,
                status: "pending".into(),
                failure_reason: None,
                trace: Vec::new(),
                finals: Vec::new(),
                requests: Vec::new(),
                violations: Vec::new(),
                artifacts: Vec::new(),
                upload_attempts: 0,
                range_errors: 0,
                status_set_at: None,
                final_202_left: f.final_202,
                final_412_left: f.final_412,
                lose_tail_left: f.trace_lose_tail,
                upload_answers_left: f.upload_answers.into(),
            },
        );
        s.queue.push_back(id);
        s.queue_version += 1;
        id
    }

    pub fn get(&self, id: u64) -> FakeJob {
        lock(&self.state).jobs.get(&id).cloned().expect("known job")
    }

    /// Set the job's status as GitLab's UI would: `canceling` (graceful
    /// cancel of a running job) or `canceled` (hard cancel: every job
    /// endpoint answers 403 from now on).
    pub fn set_status(&self, id: u64, status: &str) {
        if let Some(j) = lock(&self.state).jobs.get_mut(&id) {
            j.status = status.into();
            j.status_set_at = Some(Instant::now());
        }
    }

    /// Serve `zip` as the artifacts of job `id` to holders of `token`.
    pub fn add_dependency_artifacts(&self, id: u64, token: &str, zip: Vec<u8>) {
        lock(&self.state)
            .dependency_artifacts
            .insert(id, (token.into(), zip));
    }

    /// The most jobs running (or canceling) at once.
    pub fn max_running(&self) -> usize {
        lock(&self.state).max_running
    }

    /// Answer 404 to `POST /runners/verify`, as a GitLab (or a proxy) that
    /// does not serve it; job requests still work.
    pub fn set_verify_missing(&self, missing: bool) {
        lock(&self.state).verify_missing = missing;
    }

    /// The status a refused runner token gets on verify and job requests:
    /// 403 (GitLab's) unless set, e.g. 401.
    pub fn set_refusal(&self, status: u16) {
        lock(&self.state).refusal = status;
    }

    /// `POST /runners/verify` calls, answered or not.
    pub fn verify_calls(&self) -> u32 {
        lock(&self.state).verify_calls
    }

    /// Verify calls answered 200.
    pub fn verifies(&self) -> u32 {
        lock(&self.state).verifies
    }

    /// Authenticated job requests.
    pub fn requests(&self) -> u32 {
        lock(&self.state).requests
    }

    /// Job requests answered with an injected 500 (not counted in
    /// [`FakeGitlab::requests`]).
    pub fn request_errors(&self) -> u32 {
        lock(&self.state).request_errors
    }

    /// Connections dropped by the `drop_every` fault.
    pub fn drops(&self) -> u32 {
        lock(&self.state).drops
    }

    /// Every job, in id order.
    pub fn jobs(&self) -> Vec<FakeJob> {
        lock(&self.state).jobs.values().cloned().collect()
    }

    /// Wait until `f` holds for the job, or panic after `limit`.
    pub async fn wait_for(
        &self,
        id: u64,
        limit: Duration,
        what: &str,
        f: impl Fn(&FakeJob) -> bool,
    ) -> FakeJob {
        let t0 = Instant::now();
        loop {
            let j = self.get(id);
            if f(&j) {
                return j;
            }
            assert!(
                t0.elapsed() < limit,
                "job {id}: {what} did not happen within {limit:?}; status {} trace:\n{}",
                j.status,
                j.trace_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait for the job's accepted final update.
    pub async fn wait_done(&self, id: u64, limit: Duration) -> FakeJob {
        self.wait_for(id, limit, "the final update", FakeJob::done)
            .await
    }
}
