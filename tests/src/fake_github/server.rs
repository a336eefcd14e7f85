//! The fake's server, its shared state, and what tests call.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request as AxRequest, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};

use super::{sign, FakeJob, FakeRunner, Request};

/// An answer injected for the next request whose path contains `path`.
#[derive(Debug, Clone)]
struct Fault {
    path: String,
    status: u16,
    retry_after: Option<u64>,
}

#[derive(Default)]
struct Inner {
    repo: String,
    token: String,
    installation_tokens: Vec<String>,
    jobs: BTreeMap<u64, FakeJob>,
    runners: BTreeMap<u64, FakeRunner>,
    next_id: u64,
    faults: VecDeque<Fault>,
    requests: Vec<Request>,
    max_live_runners: usize,
    webhook: Option<(String, String)>,
    deliveries: u64,
}

type Shared = Arc<Mutex<Inner>>;

fn lock(s: &Shared) -> MutexGuard<'_, Inner> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

impl Inner {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn live_runners(&self) -> usize {
        self.runners.values().filter(|r| !r.deleted).count()
    }

    fn job_json(&self, j: &FakeJob) -> Value {
        json!({
            "id": j.id, "run_id": j.run_id, "status": j.status,
            "conclusion": if j.status == "completed" { json!("success") } else { Value::Null },
            "name": format!("job-{}", j.id), "workflow_name": "ci",
            "head_branch": "main", "head_sha": "0".repeat(40),
            "labels": j.labels, "runner_id": j.runner_id, "runner_name": j.runner_name,
            "runner_group_id": j.runner_id.map(|_| 1), "steps": [],
            "url": format!("https://api.github.com/repos/{}/actions/jobs/{}", self.repo, j.id),
        })
    }

    fn event(&self, action: &str, job: u64) -> Option<Value> {
        let j = self.jobs.get(&job)?;
        Some(json!({
            "action": action,
            "workflow_job": self.job_json(j),
            "repository": {"full_name": self.repo, "name": self.repo.split('/').nth(1)},
            "sender": {"login": "octocat"},
        }))
    }
}

/// A running fake GitHub.
pub struct FakeGithub {
    pub url: String,
    pub token: String,
    pub repo: String,
    state: Shared,
    /// Stopped and joined on drop (before the fields below).
    server: crate::fake_server::ServerThread,
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"message": message, "documentation_url": "https://docs.github.com/rest"})),
    )
        .into_response()
}

async fn middleware(State(s): State<Shared>, req: AxRequest, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let fault = {
        let mut st = lock(&s);
        let i = st.faults.iter().position(|f| path.contains(&f.path));
        i.and_then(|i| st.faults.remove(i))
    };
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let resp = if let Some(f) = fault {
        let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = error(status, "injected fault");
        if let Some(s) = f.retry_after {
            r.headers_mut()
                .insert("retry-after", s.to_string().parse().expect("a number"));
        }
        if f.status == 403 || f.status == 429 {
            *r.body_mut() = axum::body::Body::from(
                r#"{"message":"You have exceeded a secondary rate limit."}"#,
            );
        }
        r
    } else if path.starts_with("/app/") {
        // JWT: three base64url parts.
        let jwt = auth.strip_prefix("Bearer ").unwrap_or("");
        if jwt.split('.').count() != 3 {
            error(
                StatusCode::UNAUTHORIZED,
                "A JSON web token could not be decoded",
            )
        } else {
            next.run(req).await
        }
    } else {
        let token = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("token "))
            .unwrap_or("");
        let ok = {
            let st = lock(&s);
            !token.is_empty()
                && (token == st.token || st.installation_tokens.iter().any(|t| t == token))
        };
        if ok {
            next.run(req).await
        } else {
            error(StatusCode::UNAUTHORIZED, "Bad credentials")
        }
    };
    lock(&s).requests.push(Request {
        method,
        path,
        status: resp.status().as_u16(),
    });
    resp
}

async fn access_token(State(s): State<Shared>, Path(_id): Path<u64>) -> Response {
    let mut st = lock(&s);
    let n = st.id();
    let t = format!("ghs_installation{n}");
    st.installation_tokens.push(t.clone());
    (
        StatusCode::CREATED,
        Json(json!({"token": t, "expires_at": "2099-01-01T00:00:00Z"})),
    )
        .into_response()
}

async fn runs(
    State(s): State<Shared>,
    Path((o, r)): Path<(String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let st = lock(&s);
    if format!("{o}/{r}") != st.repo {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    let mut by_run: BTreeMap<u64, Vec<&FakeJob>> = BTreeMap::new();
    for j in st.jobs.values() {
        by_run.entry(j.run_id).or_default().push(j);
    }
    let runs: Vec<Value> = by_run
        .iter()
        .filter_map(|(id, jobs)| {
            let status = if jobs.iter().all(|j| j.status == "queued") {
                "queued"
            } else if jobs.iter().all(|j| j.status == "completed") {
                "completed"
            } else {
                "in_progress"
            };
            let wanted = q.get("status").is_none_or(|w| w == status);
            wanted.then(|| json!({"id": id, "status": status, "name": "ci"}))
        })
        .collect();
    Json(json!({"total_count": runs.len(), "workflow_runs": runs})).into_response()
}

async fn run_jobs(
    State(s): State<Shared>,
    Path((o, r, run)): Path<(String, String, u64)>,
) -> Response {
    let st = lock(&s);
    if format!("{o}/{r}") != st.repo {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    let jobs: Vec<Value> = st
        .jobs
        .values()
        .filter(|j| j.run_id == run)
        .map(|j| st.job_json(j))
        .collect();
    Json(json!({"total_count": jobs.len(), "jobs": jobs})).into_response()
}

fn runner_json(r: &FakeRunner) -> Value {
    json!({
        "id": r.id, "name": r.name, "os": "unknown",
        "status": if r.job.is_some() { "online" } else { "offline" },
        "busy": r.job.is_some(),
        "labels": r.labels.iter().enumerate().map(|(i, l)| json!({"id": i + 1, "name": l, "type": "custom"})).collect::<Vec<_>>(),
    })
}

async fn generate(State(s): State<Shared>, body: Bytes) -> Response {
    let Ok(b) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "Problems parsing JSON");
    };
    let name = b["name"].as_str().unwrap_or("").to_string();
    let Some(group) = b["runner_group_id"].as_u64() else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "runner_group_id is required",
        );
    };
    let labels: Vec<String> = b["labels"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if name.is_empty() || labels.is_empty() || labels.len() > 100 {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name and 1 to 100 labels are required",
        );
    }
    let mut st = lock(&s);
    if st.runners.values().any(|r| !r.deleted && r.name == name) {
        return error(
            StatusCode::CONFLICT,
            "Already exists - A runner with the name already exists.",
        );
    }
    let id = st.id();
    let nonce = st.id();
    let runner_file = json!({"agentId": id, "agentName": name, "poolId": group,
                             "serverUrl": "https://pipelines.example/fake", "gitHubUrl": format!("https://github.com/{}", st.repo),
                             "workFolder": b["work_folder"].as_str().unwrap_or("_work"), "ephemeral": true});
    let files = json!({
        ".runner": b64(runner_file.to_string().as_bytes()),
        ".credentials": b64(json!({"scheme": "OAuth", "data": {"clientId": format!("client-{id}-{nonce}")}}).to_string().as_bytes()),
        ".credentials_rsaparams": b64(format!("fake-rsa-{id}-{nonce}").as_bytes()),
    });
    let encoded = b64(files.to_string().as_bytes());
    // The runner connects at once and takes the oldest job it fits.
    let job = st
        .jobs
        .values()
        .find(|j| {
            j.status == "queued"
                && j.labels
                    .iter()
                    .all(|l| labels.iter().any(|m| m.eq_ignore_ascii_case(l)))
        })
        .map(|j| j.id);
    let runner = FakeRunner {
        id,
        name: name.clone(),
        labels,
        group,
        encoded_jit_config: encoded.clone(),
        job,
        deleted: false,
    };
    let answer = json!({"runner": runner_json(&runner), "encoded_jit_config": encoded});
    st.runners.insert(id, runner);
    st.max_live_runners = st.max_live_runners.max(st.live_runners());
    let mut event = None;
    if let Some(j) = job.and_then(|j| st.jobs.get_mut(&j)) {
        j.status = "in_progress".into();
        j.runner_name = Some(name);
        j.runner_id = Some(id);
        let jid = j.id;
        event = st.event("in_progress", jid);
    }
    let hook = st.webhook.clone();
    drop(st);
    if let (Some(ev), Some(hook)) = (event, hook) {
        tokio::spawn(deliver(s.clone(), hook, ev));
    }
    (StatusCode::CREATED, Json(answer)).into_response()
}

async fn list_runners(
    State(s): State<Shared>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let st = lock(&s);
    let rs: Vec<Value> = st
        .runners
        .values()
        .filter(|r| !r.deleted && q.get("name").is_none_or(|n| *n == r.name))
        .map(runner_json)
        .collect();
    Json(json!({"total_count": rs.len(), "runners": rs})).into_response()
}

async fn delete_runner(State(s): State<Shared>, Path(p): Path<Vec<String>>) -> Response {
    let Some(id) = p.last().and_then(|i| i.parse::<u64>().ok()) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    let mut st = lock(&s);
    let Some(r) = st.runners.get_mut(&id).filter(|r| !r.deleted) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    r.deleted = true;
    let job = r.job;
    let mut event = None;
    if let Some(j) = job.and_then(|j| st.jobs.get_mut(&j)) {
        if j.status == "in_progress" {
            j.status = "completed".into();
            let jid = j.id;
            event = st.event("completed", jid);
        }
    }
    let hook = st.webhook.clone();
    drop(st);
    if let (Some(ev), Some(hook)) = (event, hook) {
        tokio::spawn(deliver(s.clone(), hook, ev));
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Send one signed `workflow_job` delivery; the status kiln answered.
async fn deliver(s: Shared, (url, secret): (String, String), event: Value) -> u16 {
    let body = event.to_string().into_bytes();
    let delivery = {
        let mut st = lock(&s);
        st.deliveries += 1;
        format!("fake-delivery-{}-{}", st.deliveries, std::process::id())
    };
    post_webhook(&url, &body, &sign(&secret, &body), &delivery).await
}

async fn post_webhook(url: &str, body: &[u8], signature: &str, delivery: &str) -> u16 {
    let client = reqwest::Client::new();
    match client
        .post(url)
        .header("content-type", "application/json")
        .header("x-github-event", "workflow_job")
        .header("x-github-delivery", delivery)
        .header("x-hub-signature-256", signature)
        .body(body.to_vec())
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

impl FakeGithub {
    /// Start on 127.0.0.1 for repository `repo`, accepting `token`.
    pub fn start(repo: &str, token: &str) -> FakeGithub {
        let state: Shared = Arc::new(Mutex::new(Inner {
            repo: repo.into(),
            token: token.into(),
            next_id: 1000,
            ..Default::default()
        }));
        let runners = |scope: &str| {
            Router::new()
                .route(
                    &format!("{scope}/actions/runners/generate-jitconfig"),
                    post(generate),
                )
                .route(&format!("{scope}/actions/runners"), get(list_runners))
                .route(
                    &format!("{scope}/actions/runners/{{id}}"),
                    delete(delete_runner),
                )
        };
        let app = Router::new()
            .route("/app/installations/{id}/access_tokens", post(access_token))
            .route("/repos/{o}/{r}/actions/runs", get(runs))
            .route("/repos/{o}/{r}/actions/runs/{run}/jobs", get(run_jobs))
            .merge(runners("/repos/{o}/{r}"))
            .merge(runners("/orgs/{org}"))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                middleware,
            ))
            .with_state(state.clone());
        let server = crate::fake_server::ServerThread::start("fake-github", app);
        let url = server.url.clone();
        FakeGithub {
            url,
            token: token.into(),
            repo: repo.into(),
            state,
            server,
        }
    }

    /// Where webhooks go, signed with `secret`.
    pub fn set_webhook(&self, url: &str, secret: &str) {
        lock(&self.state).webhook = Some((url.into(), secret.into()));
    }

    /// Queue a job (in a run of its own) with `labels`; with `notify`,
    /// send its `queued` webhook (the status kiln answered, else 0).
    pub async fn queue(&self, labels: &[&str], notify: bool) -> (u64, u16) {
        let (id, event, hook) = {
            let mut st = lock(&self.state);
            let run_id = st.id();
            let id = st.id();
            st.jobs.insert(
                id,
                FakeJob {
                    id,
                    run_id,
                    labels: labels.iter().map(|l| l.to_string()).collect(),
                    status: "queued".into(),
                    runner_name: None,
                    runner_id: None,
                },
            );
            (id, st.event("queued", id), st.webhook.clone())
        };
        let status = match (notify, event, hook) {
            (true, Some(ev), Some(hook)) => {
                let s = self.state.clone();
                self.server
                    .rt
                    .spawn(deliver(s, hook, ev))
                    .await
                    .unwrap_or(0)
            }
            _ => 0,
        };
        (id, status)
    }

    /// Post a webhook body as given, with this signature and delivery id
    /// (the status kiln answered, else 0).
    pub async fn post_raw(&self, body: &[u8], signature: &str, delivery: &str) -> u16 {
        let url = lock(&self.state)
            .webhook
            .clone()
            .map(|(u, _)| u)
            .expect("set_webhook first");
        let (body, signature, delivery) =
            (body.to_vec(), signature.to_string(), delivery.to_string());
        self.server
            .rt
            .spawn(async move { post_webhook(&url, &body, &signature, &delivery).await })
            .await
            .unwrap_or(0)
    }

    /// A `workflow_job` event body for job `id` as GitHub would send it.
    pub fn event_body(&self, action: &str, id: u64) -> Vec<u8> {
        lock(&self.state)
            .event(action, id)
            .expect("a known job")
            .to_string()
            .into_bytes()
    }

    /// Answer the next request whose path contains `path` with `status`
    /// (and `retry-after`), without handling it. Faults queue in order.
    pub fn fail_next(&self, path: &str, status: u16, retry_after: Option<u64>) {
        lock(&self.state).faults.push_back(Fault {
            path: path.into(),
            status,
            retry_after,
        });
    }

    pub fn jobs(&self) -> Vec<FakeJob> {
        lock(&self.state).jobs.values().cloned().collect()
    }

    pub fn runners(&self) -> Vec<FakeRunner> {
        lock(&self.state).runners.values().cloned().collect()
    }

    pub fn requests(&self) -> Vec<Request> {
        lock(&self.state).requests.clone()
    }

    /// The most runner records that existed at once.
    pub fn max_live_runners(&self) -> usize {
        lock(&self.state).max_live_runners
    }

    pub fn live_runners(&self) -> usize {
        lock(&self.state).live_runners()
    }

    /// Faults not yet played.
    pub fn faults_left(&self) -> usize {
        lock(&self.state).faults.len()
    }
}
