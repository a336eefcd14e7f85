//! The runner API handlers, as strict as GitLab's: verify, register, job
//! requests, job updates, trace patches, artifact upload and download, and
//! `authenticate_job!`.

use std::collections::HashMap;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Multipart, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::server::{lock, Inner, Shared};
use super::{FakeJob, FinalUpdate, JobRequest, Upload, GITLAB_FAILURE_REASONS};

pub(super) fn header<'a>(h: &'a HeaderMap, k: &str) -> Option<&'a str> {
    h.get(k).and_then(|v| v.to_str().ok())
}

/// GitLab's error bodies: `{"message": "403 Forbidden - ..."}`.
pub(super) fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "message": message }))).into_response()
}

/// The answer to a runner token the fake does not accept (403, as GitLab;
/// or what the test set with `FakeGitlab::set_refusal`).
fn refused(st: &Inner) -> Response {
    let status = StatusCode::from_u16(st.refusal).unwrap_or(StatusCode::FORBIDDEN);
    error(status, &status.to_string())
}

pub(super) async fn verify(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    let mut st = lock(&s);
    st.verify_calls += 1;
    if st.verify_missing {
        // A GitLab (or a proxy in front of it) without this endpoint.
        return error(StatusCode::NOT_FOUND, "404 Not Found");
    }
    if body["token"].as_str() != Some(st.runner_token.as_str()) {
        return refused(&st);
    }
    st.verifies += 1;
    Json(json!({"id": 42, "token": st.runner_token, "token_expires_at": null})).into_response()
}

pub(super) async fn register(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
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

pub(super) async fn request_job(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut st = lock(&s);
    let tok = st.runner_token.clone();
    if body["token"].as_str() != Some(tok.as_str())
        || header(&headers, "runner-token") != Some(tok.as_str())
    {
        return refused(&st);
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

pub(super) async fn update_job(
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

pub(super) async fn patch_trace(
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

pub(super) async fn upload(
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

pub(super) async fn download(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges_are_checked_against_the_body() {
        assert_eq!(parse_range("0-9", 10), Ok(0));
        assert_eq!(parse_range("100-100", 1), Ok(100));
        assert!(parse_range("0-10", 10).is_err(), "end past the body");
        assert!(parse_range("bytes 0-9", 10).is_err(), "no `bytes` prefix");
        assert!(parse_range("5", 1).is_err());
        assert!(parse_range("0--1", 0).is_err(), "empty patch");
    }
}
