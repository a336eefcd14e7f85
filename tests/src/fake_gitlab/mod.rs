//! A fake GitLab for end-to-end tests of `kiln daemon`, as strict as
//! GitLab's own runner API (`lib/api/ci/runner.rb`,
//! `lib/api/ci/helpers/runner.rb` `authenticate_job!`,
//! `app/services/ci/append_build_trace_service.rb`,
//! `app/services/ci/update_build_state_service.rb`; see docs/gitlab.md):
//!
//! - runner tokens on verify, register and job requests (403 when wrong);
//! - job requests: 201 with a job (no `X-GitLab-Last-Update`), else 204 with
//!   `X-GitLab-Last-Update`; a request whose `last_update` is the current
//!   queue value gets 204 at once, as GitLab answers "nothing changed";
//! - job endpoints (`PUT /jobs/:id`, trace `PATCH`, artifact upload) answer
//!   403 for unknown jobs and wrong job tokens, and 403 with `Job-Status:
//!   <status>` ("Job is not running") for jobs that are not `running` or
//!   `canceling`;
//! - trace `PATCH`: 400 without `Content-Range`; the start must equal the
//!   stored length, else 416 with `Range: 0-<length>`; a patch past the
//!   trace size limit drops the job (`failed`, `trace_size_exceeded`) and
//!   answers 403. Stricter than GitLab, which only reads the start: a
//!   malformed range, an end other than `start + len - 1` or an empty body
//!   is answered 400 and recorded as a violation;
//! - `PUT /jobs/:id`: `state` must be `running`, `success` or `failed`
//!   (else 400); a failure reason GitLab does not know is recorded as a
//!   violation and stored as `unknown_failure`, as GitLab stores it; the
//!   final update of a `canceling` job makes it `canceled`; 412 when the
//!   checksum or size does not match the stored trace;
//! - artifact uploads only while the job runs; 413 past the size limit;
//! - a git repository over smart HTTP (`git http-backend` as CGI) behind
//!   basic auth `gitlab-ci-token:<job token>` of a running job; each fetch
//!   counts as a run of that job.
//!
//! Everything a runner sends for a job is recorded (every assignment,
//! request, final update and answer), so tests can check that a job was run
//! once and finalised once ([`FakeJob::check_consistent`]) even when the
//! fake hands a job out twice ([`Faults::duplicate_every`]).
//!
//! Faults: 500 before handling a request, or after handling it (a lost
//! acknowledgement); dropped connections; 202/412 answers to final updates;
//! a trace tail lost after it was acknowledged; artifact upload answers.
//!
//! The server runs on its own thread and runtime, so tests may block.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};

/// GitLab's `failure_reason` enum (`Enums::Ci::CommitStatus`), which it
/// also sends as the job's `features.failure_reasons`. `job_canceled` and
/// `image_pull_failure` are not in it: gitlab-runner maps them.
pub const GITLAB_FAILURE_REASONS: &[&str] = &[
    "unknown_failure",
    "script_failure",
    "api_failure",
    "stuck_or_timeout_failure",
    "runner_system_failure",
    "missing_dependency_failure",
    "runner_unsupported",
    "stale_schedule",
    "job_execution_timeout",
    "archived_failure",
    "unmet_prerequisites",
    "scheduler_failure",
    "data_integrity_failure",
    "forward_deployment_failure",
    "user_blocked",
    "project_deleted",
    "ci_quota_exceeded",
    "pipeline_loop_detected",
    "no_matching_runner",
    "trace_size_exceeded",
    "builds_disabled",
    "environment_creation_failure",
    "deployment_rejected",
    "failed_outdated_deployment_job",
    "job_execution_server_timeout",
    "stuck_pending_with_matching_runners",
    "stuck_pending_no_matching_runners",
    "no_updates_running",
    "no_updates_canceling",
    "server_timeout_running",
    "server_timeout_canceling",
    "runner_configuration_error",
    "runner_external_dependency_failure",
    "runner_interrupted",
    "protected_environment_failure",
    "insufficient_bridge_permissions",
    "downstream_bridge_project_not_found",
    "invalid_bridge_trigger",
    "upstream_bridge_project_not_found",
    "insufficient_upstream_permissions",
    "bridge_pipeline_is_child_pipeline",
    "downstream_pipeline_creation_failed",
    "secrets_provider_not_found",
    "reached_max_descendant_pipelines_depth",
    "ip_restriction_failure",
    "reached_max_pipeline_hierarchy_size",
    "reached_downstream_pipeline_trigger_rate_limit",
    "duo_workflow_not_allowed",
    "job_router_failure",
    "job_token_expired",
    "id_token_burned_project_path",
    "downstream_project_trigger_resolved_to_empty",
];

/// GitLab's defaults: `ci_jobs_trace_size_limit` (100 MB) and
/// `max_artifacts_size` (100 MB).
const DEFAULT_TRACE_LIMIT: usize = 100 << 20;
const DEFAULT_ARTIFACT_LIMIT: usize = 100 << 20;

/// Fault injection (rates are 0.0 ..= 1.0).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Answer 500 without handling the request.
    pub error_before: f64,
    /// Handle the request, then answer 500 (trace patches and job updates).
    pub error_after: f64,
    /// Every Nth trace patch or job update (0: none) is handled, then its
    /// connection is dropped without an answer: the acknowledgement is lost
    /// on the wire.
    pub drop_every: u32,
    /// Answer the first N final updates of each job with 202.
    pub final_202: u32,
    /// Answer the first final update of each job with 412 and drop the
    /// second half of the stored trace, so it must be sent again.
    pub final_412: bool,
    /// Once per job, after the trace passes 1 KiB, acknowledge a patch but
    /// keep only half of the trace (the server lost data): the runner's next
    /// patch starts past the end, gets 416 and must resync from `Range`.
    pub trace_lose_tail: bool,
    /// Hand every Nth job (0: none) out twice: the next job request gets
    /// the same job again, as when GitLab's answer is resent or two
    /// requests race. The runner must run it once.
    pub duplicate_every: u32,
    /// Answer each job's first artifact uploads with these statuses, in
    /// order (the upload is read, then refused); later ones are handled.
    pub upload_answers: Vec<u16>,
}

#[derive(Debug, Clone)]
pub struct Upload {
    pub query: HashMap<String, String>,
    pub filename: String,
    pub data: Vec<u8>,
}

/// One request a runner made for a job, and the answer.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub at: Instant,
    /// `PATCH 0-99`, `PUT running`, `PUT failed`, `POST artifacts`.
    pub what: String,
    /// Body bytes (trace patches and uploads).
    pub bytes: usize,
    /// The answer the runner got (0: none, the connection was dropped).
    pub status: u16,
}

/// A final update (`PUT` with state `success` or `failed`) and its answer.
#[derive(Debug, Clone)]
pub struct FinalUpdate {
    pub body: Value,
    pub status: u16,
}

#[derive(Debug, Clone)]
pub struct FakeJob {
    pub id: u64,
    pub token: String,
    pub payload: Value,
    /// How many times the job was handed to a runner.
    pub assigned: u32,
    /// The number of the job request (1, 2, ...) of each hand-out.
    pub assignments: Vec<u32>,
    /// How many times a runner started it: authenticated git fetches
    /// (`GET info/refs`) with its token.
    pub runs: u32,
    /// `pending`, `running`, `canceling`, `canceled`, `success`, `failed`.
    pub status: String,
    /// As GitLab stored it (unknown reasons become `unknown_failure`).
    pub failure_reason: Option<String>,
    pub trace: Vec<u8>,
    /// Every final update received, accepted or not, in order.
    pub finals: Vec<FinalUpdate>,
    /// Every request to the job's endpoints, in order.
    pub requests: Vec<JobRequest>,
    /// What GitLab would refuse or silently change.
    pub violations: Vec<String>,
    pub artifacts: Vec<Upload>,
    /// Upload requests received (refused ones included).
    pub upload_attempts: u32,
    /// How many trace patches were answered 416.
    pub range_errors: u32,
    /// When a test set the status (`set_status`).
    pub status_set_at: Option<Instant>,
    final_202_left: u32,
    final_412_left: bool,
    lose_tail_left: bool,
    upload_answers_left: VecDeque<u16>,
}

impl FakeJob {
    pub fn trace_text(&self) -> String {
        String::from_utf8_lossy(&self.trace).to_string()
    }

    /// The accepted final update (answered 200), if any.
    pub fn accepted_final(&self) -> Option<&Value> {
        self.finals
            .iter()
            .find(|f| f.status == 200)
            .map(|f| &f.body)
    }

    /// The accepted final update.
    pub fn last_final(&self) -> &Value {
        self.accepted_final().expect("an accepted final update")
    }

    /// A runner's final update was accepted.
    pub fn done(&self) -> bool {
        self.accepted_final().is_some()
    }

    /// Requests that arrived after the job answered 403 once: a runner
    /// must stop sending when GitLab says the job is not running.
    pub fn requests_after_forbidden(&self) -> Vec<&JobRequest> {
        match self.requests.iter().position(|r| r.status == 403) {
            Some(i) => self.requests[i + 1..].iter().collect(),
            None => Vec::new(),
        }
    }

    /// Sizes of the trace patches accepted (202).
    pub fn patch_sizes(&self) -> Vec<usize> {
        self.requests
            .iter()
            .filter(|r| r.what.starts_with("PATCH") && r.status == 202)
            .map(|r| r.bytes)
            .collect()
    }

    /// The job was run once and finalised once, consistently:
    /// - started at most once (one git fetch), whatever the hand-outs;
    /// - exactly one final update accepted, and every other final update a
    ///   resend of the same outcome (a retry after a lost answer);
    /// - the accepted one reports the checksum and size of the stored trace;
    /// - nothing sent after a 403, no protocol violation, and the job token
    ///   never in the trace.
    pub fn check_consistent(&self) -> Result<(), String> {
        let id = self.id;
        if self.runs > 1 {
            return Err(format!(
                "job {id} was run {} times (handed out {} times)",
                self.runs, self.assigned
            ));
        }
        let accepted: Vec<&FinalUpdate> = self.finals.iter().filter(|f| f.status == 200).collect();
        if accepted.len() != 1 {
            return Err(format!(
                "job {id} has {} accepted final updates, not one: {:?}",
                accepted.len(),
                self.finals
            ));
        }
        let outcome = |v: &Value| {
            (
                v["state"].clone(),
                v["failure_reason"].clone(),
                v["exit_code"].clone(),
            )
        };
        let want = outcome(&accepted[0].body);
        if let Some(other) = self.finals.iter().find(|f| outcome(&f.body) != want) {
            return Err(format!(
                "job {id} was finalised with two outcomes: {} and {}",
                accepted[0].body, other.body
            ));
        }
        let f = &accepted[0].body;
        let sum = format!("crc32:{:08x}", crc32fast::hash(&self.trace));
        if f["output"]["checksum"].as_str() != Some(sum.as_str())
            || f["output"]["bytesize"].as_u64() != Some(self.trace.len() as u64)
        {
            return Err(format!(
                "job {id}: the final update reports {} but the trace is {sum}, {} bytes",
                f["output"],
                self.trace.len()
            ));
        }
        let late = self.requests_after_forbidden();
        if !late.is_empty() {
            return Err(format!("job {id}: requests after a 403: {late:?}"));
        }
        if !self.violations.is_empty() {
            return Err(format!(
                "job {id}: protocol violations: {:?}",
                self.violations
            ));
        }
        if self.trace_text().contains(&self.token) {
            return Err(format!("job {id}: the job token reached the trace"));
        }
        Ok(())
    }

    fn processing(&self) -> bool {
        matches!(self.status.as_str(), "running" | "canceling")
    }
}

#[derive(Default)]
struct Inner {
    runner_token: String,
    queue: VecDeque<u64>,
    jobs: BTreeMap<u64, FakeJob>,
    next_id: u64,
    queue_version: u64,
    faults: Faults,
    rng: u64,
    verifies: u32,
    requests: u32,
    handed_out: u32,
    acks: u32,
    drops: u32,
    max_running: usize,
    trace_limit: usize,
    artifact_limit: usize,
    update_interval: u64,
    dependency_artifacts: HashMap<u64, (String, Vec<u8>)>,
    repo_root: PathBuf,
}

type Shared = Arc<Mutex<Inner>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Inner> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn random(&mut self) -> f64 {
        let mut x = self.rng.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x % 10_000) as f64 / 10_000.0
    }

    fn running(&self) -> usize {
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
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _repo: tempfile::TempDir,
}

impl Drop for FakeGitlab {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(cmd: &mut Command) {
    let o = cmd.output().expect("run git");
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A bare repository `repo.git` under `root` with one commit on `main`
/// holding `files`; returns the commit.
pub fn make_repo(root: &Path, files: &[(&str, &str)]) -> String {
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.arg("-C").arg(&work).args(args);
        c.env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@e")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@e");
        c
    };
    run(&mut git(&["init", "-q", "-b", "main"]));
    for (name, body) in files {
        let p = work.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    run(&mut git(&["add", "-A"]));
    run(&mut git(&["commit", "-q", "-m", "initial"]));
    run(Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(&work)
        .arg(root.join("repo.git")));
    let o = git(&["rev-parse", "HEAD"]).output().unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn b64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in input.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn header<'a>(h: &'a HeaderMap, k: &str) -> Option<&'a str> {
    h.get(k).and_then(|v| v.to_str().ok())
}

/// GitLab's error bodies: `{"message": "403 Forbidden - ..."}`.
fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "message": message }))).into_response()
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
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fake-gitlab".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("the fake GitLab's runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    tokio::select! {
                        _ = axum::serve(listener, app) => {}
                        _ = stop_rx => {}
                    }
                });
                rt.shutdown_background();
            })
            .expect("start the fake GitLab's thread");
        FakeGitlab {
            url,
            runner_token: runner_token.into(),
            sha,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
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

    pub fn verifies(&self) -> u32 {
        lock(&self.state).verifies
    }

    /// Authenticated job requests.
    pub fn requests(&self) -> u32 {
        lock(&self.state).requests
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

async fn faults(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let api = path.starts_with("/api/v4/jobs");
    let is_ack = path.ends_with("/trace") || req.method() == Method::PUT;
    let (before, after, drop) = {
        let mut st = lock(&s);
        let f = st.faults.clone();
        let drop = api && is_ack && f.drop_every > 0 && {
            st.acks += 1;
            st.acks.is_multiple_of(f.drop_every)
        };
        if drop {
            st.drops += 1;
        }
        (
            st.random() < f.error_before,
            st.random() < f.error_after,
            drop,
        )
    };
    if api && before {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "injected fault (before)");
    }
    let resp = next.run(req).await;
    if api && is_ack && (after || drop) {
        // The request was handled, but the runner gets another answer (or
        // none): the record says what the runner saw.
        let seen = if drop { 0 } else { 500 };
        amend(&s, &path, resp.status().as_u16(), seen);
    }
    if api && is_ack && after {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "injected fault (after)");
    }
    if drop {
        // Unwinding out of the connection's task closes the socket with no
        // response written: the client sees the connection drop.
        std::panic::resume_unwind(Box::new(
            "fake GitLab: dropping the connection (injected fault)",
        ));
    }
    resp
}

/// Record that the runner saw `seen` (0: no answer) instead of `answered`
/// for its last request to the job of `path` (`/api/v4/jobs/<id>...`).
fn amend(s: &Shared, path: &str, answered: u16, seen: u16) {
    let id = path
        .trim_start_matches("/api/v4/jobs/")
        .split('/')
        .next()
        .and_then(|i| i.parse::<u64>().ok());
    let mut st = lock(s);
    if let Some(job) = id.and_then(|id| st.jobs.get_mut(&id)) {
        if let Some(r) = job.requests.iter_mut().rev().find(|r| r.status == answered) {
            r.status = seen;
        }
    }
}

async fn verify(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    let mut st = lock(&s);
    if body["token"].as_str() != Some(st.runner_token.as_str()) {
        return error(StatusCode::FORBIDDEN, "403 Forbidden");
    }
    st.verifies += 1;
    Json(json!({"id": 42, "token": st.runner_token, "token_expires_at": null})).into_response()
}

async fn register(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    if body["token"].as_str() != Some("registration-token") {
        return error(StatusCode::FORBIDDEN, "403 Forbidden");
    }
    let st = lock(&s);
    (
        StatusCode::CREATED,
        Json(json!({"id": 43, "token": st.runner_token, "token_expires_at": null})),
    )
        .into_response()
}

async fn request_job(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut st = lock(&s);
    let tok = st.runner_token.clone();
    if body["token"].as_str() != Some(tok.as_str())
        || header(&headers, "runner-token") != Some(tok.as_str())
    {
        return error(StatusCode::FORBIDDEN, "403 Forbidden");
    }
    st.requests += 1;
    let version = st.queue_version.to_string();
    let no_content = |v: &str| {
        let mut r = StatusCode::NO_CONTENT.into_response();
        r.headers_mut()
            .insert("x-gitlab-last-update", HeaderValue::from_str(v).unwrap());
        r
    };
    // "Nothing changed since you last asked": GitLab does not even look.
    if body["last_update"].as_str() == Some(version.as_str()) {
        return no_content(&version);
    }
    let Some(id) = st.queue.pop_front() else {
        return no_content(&version);
    };
    st.handed_out += 1;
    let dup = st.faults.duplicate_every;
    let again = dup > 0 && st.handed_out.is_multiple_of(dup);
    let request_no = st.requests;
    let job = st.jobs.get_mut(&id).expect("queued job exists");
    let first = job.assigned == 0;
    job.assigned += 1;
    job.assignments.push(request_no);
    if job.status == "pending" {
        job.status = "running".into();
    }
    let payload = job.payload.clone();
    if again && first {
        // The same job goes to the next request as well.
        st.queue.push_front(id);
        st.queue_version += 1;
    }
    let running = st.running();
    st.max_running = st.max_running.max(running);
    // GitLab sends no X-GitLab-Last-Update with a job.
    (StatusCode::CREATED, Json(payload)).into_response()
}

fn job_headers(r: &mut Response, job: &FakeJob, interval: u64) {
    let h = r.headers_mut();
    h.insert("job-status", HeaderValue::from_str(&job.status).unwrap());
    h.insert(
        "x-gitlab-trace-update-interval",
        HeaderValue::from_str(&interval.to_string()).unwrap(),
    );
}

/// `authenticate_job!`: the job, if `token` is its token and it runs.
/// Errors are GitLab's answers; a job that does not run also gets
/// `Job-Status` and the refused request is recorded.
fn authed<'a>(
    st: &'a mut Inner,
    id: u64,
    token: Option<&str>,
    what: &str,
    bytes: usize,
) -> Result<&'a mut FakeJob, Box<Response>> {
    let Some(j) = st.jobs.get_mut(&id) else {
        return Err(Box::new(error(StatusCode::FORBIDDEN, "403 Forbidden")));
    };
    if token != Some(j.token.as_str()) {
        return Err(Box::new(error(StatusCode::FORBIDDEN, "403 Forbidden")));
    }
    if !j.processing() {
        j.requests.push(JobRequest {
            at: Instant::now(),
            what: what.into(),
            bytes,
            status: 403,
        });
        let mut r = error(StatusCode::FORBIDDEN, "403 Forbidden - Job is not running");
        r.headers_mut()
            .insert("job-status", HeaderValue::from_str(&j.status).unwrap());
        return Err(Box::new(r));
    }
    Ok(j)
}

fn record(job: &mut FakeJob, what: String, bytes: usize, status: StatusCode) {
    job.requests.push(JobRequest {
        at: Instant::now(),
        what,
        bytes,
        status: status.as_u16(),
    });
}

async fn update_job(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut st = lock(&s);
    let interval = st.update_interval;
    let token = header(&headers, "job-token")
        .or(body["token"].as_str())
        .map(str::to_string);
    let state = body["state"].as_str().unwrap_or("").to_string();
    let what = format!("PUT {state}");
    let is_final = matches!(state.as_str(), "success" | "failed");
    if let Err(r) = authed(&mut st, id, token.as_deref(), &what, 0) {
        if is_final && r.status() == StatusCode::FORBIDDEN {
            if let Some(j) = st.jobs.get_mut(&id) {
                if token.as_deref() == Some(j.token.as_str()) {
                    j.finals.push(FinalUpdate { body, status: 403 });
                }
            }
        }
        return *r;
    }
    let job = st.jobs.get_mut(&id).expect("authenticated job");
    if state == "running" {
        // A touch: GitLab records the contact.
        record(job, what, 0, StatusCode::OK);
        let mut r = StatusCode::OK.into_response();
        job_headers(&mut r, job, interval);
        return r;
    }
    if !is_final {
        // `pending` is only for two-phase commit, which kiln does not
        // announce; anything else is not a state.
        job.violations.push(format!("PUT with state {state:?}"));
        record(job, what, 0, StatusCode::BAD_REQUEST);
        return error(StatusCode::BAD_REQUEST, "400 Bad request");
    }
    let mut status = StatusCode::OK;
    if job.final_412_left {
        job.final_412_left = false;
        job.trace.truncate(job.trace.len() / 2);
        status = StatusCode::PRECONDITION_FAILED;
    } else if job.final_202_left > 0 {
        job.final_202_left -= 1;
        status = StatusCode::ACCEPTED;
    } else {
        let want = format!("crc32:{:08x}", crc32fast::hash(&job.trace));
        if body["output"]["checksum"].as_str() != Some(want.as_str())
            || body["output"]["bytesize"].as_u64() != Some(job.trace.len() as u64)
        {
            status = StatusCode::PRECONDITION_FAILED;
        }
    }
    if status == StatusCode::OK {
        let reason = body["failure_reason"].as_str();
        let accepted: Vec<&str> = job.payload["features"]["failure_reasons"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        job.failure_reason = match (state.as_str(), reason) {
            ("success", None) => None,
            ("success", Some(r)) => {
                job.violations
                    .push(format!("failure_reason {r:?} on a success"));
                None
            }
            (_, Some(r)) if GITLAB_FAILURE_REASONS.contains(&r) && accepted.contains(&r) => {
                Some(r.to_string())
            }
            (_, r) => {
                job.violations.push(format!(
                    "failure_reason {r:?} is not one the server accepts (stored as unknown_failure)"
                ));
                Some("unknown_failure".into())
            }
        };
        // A canceling job ends canceled whatever the runner reports.
        job.status = if job.status == "canceling" {
            "canceled".into()
        } else {
            state.clone()
        };
    }
    job.finals.push(FinalUpdate {
        body: body.clone(),
        status: status.as_u16(),
    });
    record(job, what, 0, status);
    let mut r = status.into_response();
    job_headers(&mut r, job, interval);
    r
}

/// `Content-Range: <start>-<end>` with `end = start + len - 1`.
fn parse_range(v: &str, len: usize) -> Result<usize, String> {
    let (a, b) = v
        .split_once('-')
        .ok_or_else(|| format!("Content-Range {v:?} is not <start>-<end>"))?;
    let start: usize = a
        .parse()
        .map_err(|_| format!("Content-Range {v:?}: bad start"))?;
    let end: usize = b
        .parse()
        .map_err(|_| format!("Content-Range {v:?}: bad end"))?;
    if len == 0 {
        return Err(format!("empty trace patch (Content-Range {v:?})"));
    }
    if end != start + len - 1 {
        return Err(format!(
            "Content-Range {v:?} does not match a body of {len} bytes"
        ));
    }
    Ok(start)
}

async fn patch_trace(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = lock(&s);
    let interval = st.update_interval;
    let limit = st.trace_limit;
    let range = header(&headers, "content-range").map(str::to_string);
    let what = format!("PATCH {}", range.as_deref().unwrap_or("?"));
    let job = match authed(
        &mut st,
        id,
        header(&headers, "job-token"),
        &what,
        body.len(),
    ) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    let Some(range) = range else {
        job.violations
            .push("trace patch without Content-Range".into());
        record(job, what, body.len(), StatusCode::BAD_REQUEST);
        return error(StatusCode::BAD_REQUEST, "400 Missing header Content-Range");
    };
    let start = match parse_range(&range, body.len()) {
        Ok(s) => s,
        Err(e) => {
            job.violations.push(e.clone());
            record(job, what, body.len(), StatusCode::BAD_REQUEST);
            return error(StatusCode::BAD_REQUEST, &format!("400 {e}"));
        }
    };
    if start + body.len() > limit {
        // `trace_size_exceeded?`: the job is dropped.
        job.status = "failed".into();
        job.failure_reason = Some("trace_size_exceeded".into());
        record(job, what, body.len(), StatusCode::FORBIDDEN);
        return error(StatusCode::FORBIDDEN, "403 Forbidden");
    }
    if start != job.trace.len() {
        job.range_errors += 1;
        record(job, what, body.len(), StatusCode::RANGE_NOT_SATISFIABLE);
        let mut r = error(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "416 Range Not Satisfiable",
        );
        r.headers_mut().insert(
            "range",
            HeaderValue::from_str(&format!("0-{}", job.trace.len())).unwrap(),
        );
        return r;
    }
    job.trace.extend_from_slice(&body);
    let acknowledged = job.trace.len();
    if job.lose_tail_left && job.trace.len() > 1024 {
        job.lose_tail_left = false;
        let keep = job.trace.len() / 2;
        job.trace.truncate(keep);
    }
    record(job, what, body.len(), StatusCode::ACCEPTED);
    let mut r = StatusCode::ACCEPTED.into_response();
    r.headers_mut().insert(
        "range",
        HeaderValue::from_str(&format!("0-{acknowledged}")).unwrap(),
    );
    job_headers(&mut r, job, interval);
    r
}

async fn upload(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<u64>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    mut mp: Multipart,
) -> Response {
    // The whole body is read first: a client must see the answer, not a
    // connection closed under its upload.
    let mut got = None;
    let mut bytes = 0;
    while let Ok(Some(field)) = mp.next_field().await {
        let is_file = field.name() == Some("file");
        let filename = field.file_name().unwrap_or("").to_string();
        let data = field.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        bytes += data.len();
        if is_file {
            got = Some(Upload {
                query: query.clone(),
                filename,
                data,
            });
        }
    }
    let mut st = lock(&s);
    let limit = st.artifact_limit;
    let job = match authed(
        &mut st,
        id,
        header(&headers, "job-token"),
        "POST artifacts",
        bytes,
    ) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    job.upload_attempts += 1;
    if let Some(code) = job.upload_answers_left.pop_front() {
        let status = StatusCode::from_u16(code).expect("a valid status");
        record(job, "POST artifacts".into(), bytes, status);
        return error(status, &format!("{code} (injected)"));
    }
    let Some(up) = got else {
        record(job, "POST artifacts".into(), bytes, StatusCode::BAD_REQUEST);
        return error(StatusCode::BAD_REQUEST, "400 Bad request - file is missing");
    };
    if up.data.len() > limit {
        record(
            job,
            "POST artifacts".into(),
            bytes,
            StatusCode::PAYLOAD_TOO_LARGE,
        );
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "413 Request Entity Too Large",
        );
    }
    record(job, "POST artifacts".into(), bytes, StatusCode::CREATED);
    job.artifacts.push(up);
    (StatusCode::CREATED, "201").into_response()
}

async fn download(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
) -> Response {
    let st = lock(&s);
    match st.dependency_artifacts.get(&id) {
        Some((tok, zip)) if header(&headers, "job-token") == Some(tok.as_str()) => {
            zip.clone().into_response()
        }
        Some(_) => error(StatusCode::FORBIDDEN, "403 Forbidden"),
        None => error(StatusCode::NOT_FOUND, "404 Not Found"),
    }
}

/// `git http-backend` as CGI, behind `gitlab-ci-token:<job token>` basic auth.
async fn git_http(
    State(s): State<Shared>,
    UrlPath(rest): UrlPath<String>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (root, ok) = {
        let mut st = lock(&s);
        let auth = header(&headers, "authorization").unwrap_or("");
        let job = st.jobs.values_mut().find(|j| {
            j.processing()
                && auth
                    == format!(
                        "Basic {}",
                        b64(format!("gitlab-ci-token:{}", j.token).as_bytes())
                    )
        });
        // Every fetch starts with one authenticated `GET info/refs`.
        if let Some(j) = job {
            if method == Method::GET && rest == "info/refs" {
                j.runs += 1;
            }
            (st.repo_root.clone(), true)
        } else {
            (st.repo_root.clone(), false)
        }
    };
    if !ok {
        let mut r = (StatusCode::UNAUTHORIZED, "HTTP Basic: Access denied").into_response();
        r.headers_mut().insert(
            "www-authenticate",
            HeaderValue::from_static("Basic realm=\"GitLab\""),
        );
        return r;
    }
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/repo.git/{rest}"))
        .env("REQUEST_METHOD", method.as_str())
        .env("QUERY_STRING", uri.query().unwrap_or(""))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", "gitlab-ci-token")
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(ct) = header(&headers, "content-type") {
        cmd.env("CONTENT_TYPE", ct);
    }
    if let Some(ce) = header(&headers, "content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", ce);
    }
    if let Some(p) = header(&headers, "git-protocol") {
        cmd.env("GIT_PROTOCOL", p);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(&body).await;
    });
    let out = match child.wait_with_output().await {
        Ok(o) => o,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let _ = writer.await;
    // CGI: headers, a blank line, the body.
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, p + 4))
        .or_else(|| {
            raw.windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| (p, p + 2))
        });
    let Some((hend, bstart)) = split else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
            .into_response();
    };
    let mut resp = Response::new(Body::from(raw[bstart..].to_vec()));
    for line in String::from_utf8_lossy(&raw[..hend]).lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            let code = v
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(500);
            *resp.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.trim().as_bytes()),
            HeaderValue::from_str(v),
        ) {
            resp.headers_mut().insert(k, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn content_ranges_are_checked_against_the_body() {
        assert_eq!(parse_range("0-9", 10), Ok(0));
        assert_eq!(parse_range("100-100", 1), Ok(100));
        assert!(parse_range("0-10", 10).is_err(), "end past the body");
        assert!(parse_range("bytes 0-9", 10).is_err(), "no `bytes` prefix");
        assert!(parse_range("5", 1).is_err());
        assert!(parse_range("0--1", 0).is_err(), "empty patch");
    }

    const TOKEN: &str = "jobtok";

    /// A job as the fake records it after one clean run: handed out once,
    /// fetched once, one trace patch, one accepted final update.
    fn recorded() -> FakeJob {
        let trace = b"Running with kiln\nJob succeeded\n".to_vec();
        let body = json!({"token": TOKEN, "state": "success", "exit_code": 0,
            "output": {"checksum": format!("crc32:{:08x}", crc32fast::hash(&trace)),
                       "bytesize": trace.len()}});
        let now = Instant::now();
        FakeJob {
            id: 7,
            token: TOKEN.into(),
            payload: json!({}),
            assigned: 1,
            assignments: vec![1],
            runs: 1,
            status: "success".into(),
            failure_reason: None,
            requests: vec![
                JobRequest {
                    at: now,
                    what: format!("PATCH 0-{}", trace.len() - 1),
                    bytes: trace.len(),
                    status: 202,
                },
                JobRequest {
                    at: now,
                    what: "PUT success".into(),
                    bytes: 0,
                    status: 200,
                },
            ],
            trace,
            finals: vec![FinalUpdate { body, status: 200 }],
            violations: Vec::new(),
            artifacts: Vec::new(),
            upload_attempts: 0,
            range_errors: 0,
            status_set_at: None,
            final_202_left: 0,
            final_412_left: false,
            lose_tail_left: false,
            upload_answers_left: VecDeque::new(),
        }
    }

    #[test]
    fn a_clean_run_is_consistent() {
        recorded().check_consistent().unwrap();
    }

    #[test]
    fn a_resent_final_update_is_a_retry_not_a_second_outcome() {
        // The first answer was lost; the resend met a finished job.
        let mut j = recorded();
        let again = j.finals[0].body.clone();
        j.finals.push(FinalUpdate {
            body: again,
            status: 403,
        });
        j.check_consistent().unwrap();
    }

    #[test]
    fn a_double_finalise_is_caught() {
        // Two accepted final updates (a fake that lets it happen)...
        let mut j = recorded();
        j.finals.push(j.finals[0].clone());
        let e = j.check_consistent().unwrap_err();
        assert!(e.contains("2 accepted final updates"), "{e}");
        // ...or a second run's different outcome, refused by GitLab.
        let mut j = recorded();
        let mut other = j.finals[0].body.clone();
        other["state"] = json!("failed");
        other["failure_reason"] = json!("script_failure");
        j.finals.push(FinalUpdate {
            body: other,
            status: 403,
        });
        let e = j.check_consistent().unwrap_err();
        assert!(e.contains("two outcomes"), "{e}");
    }

    #[test]
    fn a_job_run_twice_is_caught() {
        let mut j = recorded();
        j.assigned = 2;
        j.assignments.push(2);
        j.runs = 2;
        let e = j.check_consistent().unwrap_err();
        assert!(e.contains("run 2 times"), "{e}");
        // Handed out twice but run once is what a runner must do.
        j.runs = 1;
        j.check_consistent().unwrap();
    }

    #[test]
    fn no_final_update_or_a_wrong_checksum_is_caught() {
        let mut j = recorded();
        j.finals.clear();
        assert!(j.check_consistent().unwrap_err().contains("0 accepted"));
        let mut j = recorded();
        j.trace.push(b'x');
        assert!(j.check_consistent().unwrap_err().contains("the trace is"));
    }

    #[test]
    fn requests_after_a_403_are_caught() {
        let mut j = recorded();
        let now = Instant::now();
        j.requests.insert(
            1,
            JobRequest {
                at: now,
                what: "PUT running".into(),
                bytes: 0,
                status: 403,
            },
        );
        let e = j.check_consistent().unwrap_err();
        assert!(e.contains("after a 403"), "{e}");
    }

    #[test]
    fn violations_and_a_leaked_token_are_caught() {
        let mut j = recorded();
        j.violations.push("PUT with state \"done\"".into());
        assert!(j.check_consistent().unwrap_err().contains("violations"));
        let mut j = recorded();
        j.trace = format!("token {TOKEN}\n").into_bytes();
        let sum = format!("crc32:{:08x}", crc32fast::hash(&j.trace));
        j.finals[0].body["output"] = json!({"checksum": sum, "bytesize": j.trace.len()});
        assert!(j.check_consistent().unwrap_err().contains("job token"));
    }
}
