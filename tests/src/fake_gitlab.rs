//! A fake GitLab for end-to-end tests of `kiln daemon`, following the
//! runner API as documented in docs/gitlab.md (reference: gitlab-runner's
//! `network/gitlab.go` and GitLab's `lib/api/ci/runner.rb`):
//!
//! - runner token checks on verify and job requests (403 when wrong);
//! - a job queue: 201 with the job, else 204 with `X-GitLab-Last-Update`;
//! - job token checks on every job endpoint;
//! - trace appends at the `Content-Range` start offset, 416 with
//!   `Range: 0-<size>` when the offset is past the end;
//! - `Job-Status` on job endpoints (tests set `canceling`/`canceled`);
//! - final updates: 412 when the checksum does not match the stored trace,
//!   optional forced 202/412 answers;
//! - artifact upload storage and dependency artifact download;
//! - a real git repository over smart HTTP (`git http-backend` as CGI)
//!   behind basic auth `gitlab-ci-token:<job token>`;
//! - faults: 500 before handling a request, or after handling it (a lost
//!   acknowledgement: the client must not count on the effect being absent).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Multipart, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::{Json, Router};
use serde_json::{json, Value};

/// Fault injection rates (0.0 ..= 1.0).
#[derive(Debug, Clone, Copy, Default)]
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
    /// stored trace, so the whole trace must be sent again.
    pub final_412: bool,
    /// Once per job, after the trace passes 1 KiB, acknowledge a patch but
    /// keep only half of the trace (the server lost data): the runner's next
    /// patch starts past the end, gets 416 and must resync from `Range`.
    pub trace_lose_tail: bool,
}

#[derive(Debug, Clone)]
pub struct Upload {
    pub query: HashMap<String, String>,
    pub filename: String,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct FakeJob {
    pub id: u64,
    pub token: String,
    pub payload: Value,
    /// How many times the job was handed to a runner.
    pub assigned: u32,
    /// `pending`, `running`, `canceling`, `canceled`, `success`, `failed`.
    pub status: String,
    pub trace: Vec<u8>,
    /// Bodies of the final `PUT`s (state success/failed), in order.
    pub finals: Vec<Value>,
    pub artifacts: Vec<Upload>,
    pub final_202_left: u32,
    pub final_412_left: bool,
    pub lose_tail_left: bool,
    /// How many trace patches were answered 416.
    pub range_errors: u32,
}

impl FakeJob {
    pub fn trace_text(&self) -> String {
        String::from_utf8_lossy(&self.trace).to_string()
    }
    /// The accepted final update.
    pub fn last_final(&self) -> &Value {
        self.finals.last().expect("a final update")
    }
    pub fn done(&self) -> bool {
        matches!(self.status.as_str(), "success" | "failed")
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
    acks: u32,
    drops: u32,
    running: usize,
    max_running: usize,
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
}

/// A running fake GitLab on loopback.
pub struct FakeGitlab {
    pub url: String,
    pub runner_token: String,
    /// Commit of `main` in the served repository.
    pub sha: String,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
    _repo: tempfile::TempDir,
}

impl Drop for FakeGitlab {
    fn drop(&mut self) {
        self.task.abort();
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

impl FakeGitlab {
    /// Start on 127.0.0.1 with a repository holding `files`.
    pub async fn start(runner_token: &str, files: &[(&str, &str)]) -> FakeGitlab {
        let repo = tempfile::tempdir().expect("tempdir");
        let sha = make_repo(repo.path(), files);
        let state: Shared = Arc::new(Mutex::new(Inner {
            runner_token: runner_token.into(),
            next_id: 100,
            queue_version: 1,
            rng: 0x9e37_79b9_7f4a_7c15,
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
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGitlab {
            url,
            runner_token: runner_token.into(),
            sha,
            state,
            task,
            _repo: repo,
        }
    }

    pub fn set_faults(&self, f: Faults) {
        lock(&self.state).faults = f;
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
            "features": {"trace_sections": true, "failure_reasons": [
                "unknown_failure", "script_failure", "runner_system_failure", "job_execution_timeout",
                "image_pull_failure", "job_canceled"]}
        })
    }

    /// Queue a job; returns its id.
    pub fn push(&self, payload: Value) -> u64 {
        let mut s = lock(&self.state);
        let id = payload["id"].as_u64().expect("job id");
        let token = payload["token"].as_str().expect("job token").to_string();
        let f = s.faults;
        s.jobs.insert(
            id,
            FakeJob {
                id,
                token,
                payload,
                assigned: 0,
                status: "pending".into(),
                trace: Vec::new(),
                finals: Vec::new(),
                artifacts: Vec::new(),
                final_202_left: f.final_202,
                final_412_left: f.final_412,
                lose_tail_left: f.trace_lose_tail,
                range_errors: 0,
            },
        );
        s.queue.push_back(id);
        s.queue_version += 1;
        id
    }

    pub fn get(&self, id: u64) -> FakeJob {
        lock(&self.state).jobs.get(&id).cloned().expect("known job")
    }

    /// Set the job's remote status (`canceling`, `canceled`).
    pub fn set_status(&self, id: u64, status: &str) {
        if let Some(j) = lock(&self.state).jobs.get_mut(&id) {
            j.status = status.into();
        }
    }

    /// Serve `zip` as the artifacts of job `id` to holders of `token`.
    pub fn add_dependency_artifacts(&self, id: u64, token: &str, zip: Vec<u8>) {
        lock(&self.state)
            .dependency_artifacts
            .insert(id, (token.into(), zip));
    }

    pub fn max_running(&self) -> usize {
        lock(&self.state).max_running
    }

    pub fn verifies(&self) -> u32 {
        lock(&self.state).verifies
    }

    pub fn requests(&self) -> u32 {
        lock(&self.state).requests
    }

    /// Connections dropped by the `drop_every` fault.
    pub fn drops(&self) -> u32 {
        lock(&self.state).drops
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
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

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
        let f = st.faults;
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
        return (StatusCode::INTERNAL_SERVER_ERROR, "injected fault (before)").into_response();
    }
    let resp = next.run(req).await;
    if api && is_ack && after {
        return (StatusCode::INTERNAL_SERVER_ERROR, "injected fault (after)").into_response();
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

async fn verify(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    let mut st = lock(&s);
    if body["token"].as_str() != Some(st.runner_token.as_str()) {
        return (StatusCode::FORBIDDEN, "403 Forbidden").into_response();
    }
    st.verifies += 1;
    Json(json!({"id": 42, "token": st.runner_token, "token_expires_at": null})).into_response()
}

async fn register(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    if body["token"].as_str() != Some("registration-token") {
        return (StatusCode::FORBIDDEN, "403 Forbidden").into_response();
    }
    let st = lock(&s);
    (
        StatusCode::CREATED,
        Json(json!({"id": 43, "token": st.runner_token})),
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
        return (StatusCode::FORBIDDEN, "403 Forbidden").into_response();
    }
    st.requests += 1;
    let version = st.queue_version.to_string();
    let lu = HeaderValue::from_str(&version).unwrap();
    if st.queue.is_empty()
        || body["last_update"].as_str() == Some(version.as_str()) && st.queue.is_empty()
    {
        let mut r = StatusCode::NO_CONTENT.into_response();
        r.headers_mut().insert("x-gitlab-last-update", lu);
        return r;
    }
    let id = st.queue.pop_front().expect("non-empty");
    st.queue_version += 1;
    st.running += 1;
    st.max_running = st.max_running.max(st.running);
    let job = st.jobs.get_mut(&id).expect("queued job exists");
    job.assigned += 1;
    job.status = "running".into();
    let mut r = (StatusCode::CREATED, Json(job.payload.clone())).into_response();
    r.headers_mut().insert("x-gitlab-last-update", lu);
    r
}

fn job_headers(r: &mut Response, job: &FakeJob) {
    let h = r.headers_mut();
    h.insert("job-status", HeaderValue::from_str(&job.status).unwrap());
    h.insert(
        "x-gitlab-trace-update-interval",
        HeaderValue::from_static("1"),
    );
}

/// The job, if `token` is its token.
fn authed<'a>(
    st: &'a mut Inner,
    id: u64,
    token: Option<&str>,
) -> Result<&'a mut FakeJob, (StatusCode, &'static str)> {
    match st.jobs.get_mut(&id) {
        Some(j) if token == Some(j.token.as_str()) => Ok(j),
        Some(_) => Err((StatusCode::FORBIDDEN, "403 Forbidden")),
        None => Err((StatusCode::NOT_FOUND, "404 Not Found")),
    }
}

async fn update_job(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut st = lock(&s);
    let token = header(&headers, "job-token")
        .or(body["token"].as_str())
        .map(str::to_string);
    let job = match authed(&mut st, id, token.as_deref()) {
        Ok(j) => j,
        Err(r) => return r.into_response(),
    };
    let state = body["state"].as_str().unwrap_or("");
    if state == "running" {
        let mut r = StatusCode::OK.into_response();
        job_headers(&mut r, job);
        return r;
    }
    if job.done() {
        // Already final: idempotent, as GitLab is.
        let mut r = StatusCode::OK.into_response();
        job_headers(&mut r, job);
        return r;
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
        job.finals.push(body.clone());
        job.status = state.into();
    }
    let mut r = status.into_response();
    job_headers(&mut r, job);
    if status == StatusCode::OK {
        st.running = st.running.saturating_sub(1);
    }
    r
}

async fn patch_trace(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = lock(&s);
    let job = match authed(&mut st, id, header(&headers, "job-token")) {
        Ok(j) => j,
        Err(r) => return r.into_response(),
    };
    let Some(start) = header(&headers, "content-range")
        .and_then(|r| r.split('-').next())
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return (StatusCode::BAD_REQUEST, "missing Content-Range").into_response();
    };
    if job.done() {
        return (StatusCode::FORBIDDEN, "job is finished").into_response();
    }
    let mut acknowledged = None;
    let mut r = if start > job.trace.len() {
        job.range_errors += 1;
        StatusCode::RANGE_NOT_SATISFIABLE.into_response()
    } else {
        job.trace.truncate(start);
        job.trace.extend_from_slice(&body);
        if job.lose_tail_left && job.trace.len() > 1024 {
            job.lose_tail_left = false;
            acknowledged = Some(job.trace.len());
            let keep = job.trace.len() / 2;
            job.trace.truncate(keep);
        }
        StatusCode::ACCEPTED.into_response()
    };
    let range = format!("0-{}", acknowledged.unwrap_or(job.trace.len()));
    r.headers_mut()
        .insert("range", HeaderValue::from_str(&range).unwrap());
    job_headers(&mut r, job);
    r
}

async fn upload(
    State(s): State<Shared>,
    UrlPath(id): UrlPath<u64>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    mut mp: Multipart,
) -> Response {
    {
        let mut st = lock(&s);
        if let Err(r) = authed(&mut st, id, header(&headers, "job-token")) {
            return r.into_response();
        }
    }
    let mut got = None;
    while let Ok(Some(field)) = mp.next_field().await {
        if field.name() == Some("file") {
            let filename = field.file_name().unwrap_or("").to_string();
            let data = field.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            got = Some(Upload {
                query: query.clone(),
                filename,
                data,
            });
        }
    }
    let Some(up) = got else {
        return (StatusCode::BAD_REQUEST, "no file part").into_response();
    };
    let mut st = lock(&s);
    if let Some(j) = st.jobs.get_mut(&id) {
        j.artifacts.push(up);
    }
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
        Some(_) => (StatusCode::FORBIDDEN, "403").into_response(),
        None => (StatusCode::NOT_FOUND, "404").into_response(),
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
        let st = lock(&s);
        let auth = header(&headers, "authorization").unwrap_or("");
        let ok = st.jobs.values().any(|j| {
            j.status == "running"
                && auth
                    == format!(
                        "Basic {}",
                        b64(format!("gitlab-ci-token:{}", j.token).as_bytes())
                    )
        });
        (st.repo_root.clone(), ok)
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
    use super::b64;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
    }
}
