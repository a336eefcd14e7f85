//! Fault injection: what can go wrong ([`Faults`]) and the middleware that
//! makes it go wrong before or after a handler runs. Per-job faults (202 and
//! 412 final updates, a lost trace tail, refused uploads) are played by the
//! handlers in `api.rs`.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::api::error;
use super::server::{lock, Shared};

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
    /// Answer the first N job requests (`POST /jobs/request`) with 500
    /// before handling them: a runner that gives up on errors never gets
    /// a job.
    pub fail_first_requests: u32,
}

pub(super) async fn faults(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let api = path.starts_with("/api/v4/jobs");
    let is_ack = path.ends_with("/trace") || req.method() == Method::PUT;
    let is_request = path == "/api/v4/jobs/request";
    let (before, after, drop) = {
        let mut st = lock(&s);
        let f = st.faults.clone();
        if is_request && st.request_errors < f.fail_first_requests {
            st.request_errors += 1;
            drop(st);
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "injected fault (request)",
            );
        }
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
        if is_request {
            lock(&s).request_errors += 1;
        }
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
