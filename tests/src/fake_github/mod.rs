//! A fake GitHub for end-to-end tests of kiln's JIT runners, after the
//! REST API and webhooks of `shared/reference/ci-protocols.md` §2:
//!
//! - `GET /repos/{o}/{r}/actions/runs?status=` and `…/runs/{id}/jobs`;
//! - `POST …/actions/runners/generate-jitconfig` (repository and
//!   organization): 422 without `runner_group_id` or with 0 or more than 100
//!   labels, 409 for a name in use; 201 with the runner and an
//!   `encoded_jit_config` shaped like GitHub's (base64 of a JSON map of
//!   base64 files: `.runner`, `.credentials`, `.credentials_rsaparams`);
//! - `GET …/actions/runners[?name=]`, `DELETE …/actions/runners/{id}`
//!   (204, 404 when gone);
//! - `POST /app/installations/{id}/access_tokens` (a JWT bearer in, a
//!   `ghs_` installation token out);
//! - every call needs `Authorization: Bearer|token <token>` (401 else);
//! - injectable answers, in order, for paths containing a string: 5xx, and
//!   403/429 with `retry-after` (the secondary rate limit).
//!
//! The runner model: a runner takes a job the moment it is registered (as
//! if GitHub's runner connected at once): the oldest queued job whose labels
//! its labels hold goes `in_progress` with the runner's name; deleting the
//! runner's record (kiln does when the VM is gone) completes that job, as
//! an ephemeral runner's job is over when its runner is. `in_progress` and
//! `completed` webhooks are sent as those happen; `queued` ones when a test
//! queues a job and asks for it. Webhooks are signed (`X-Hub-Signature-256`)
//! with the configured secret. Everything is recorded for the tests: every
//! request and its answer, every JIT config issued, the most runner records
//! alive at once.
//!
//! The server runs on its own thread and runtime on 127.0.0.1, port 0.

mod server;

pub use server::FakeGithub;

/// A workflow job.
#[derive(Debug, Clone)]
pub struct FakeJob {
    pub id: u64,
    pub run_id: u64,
    pub labels: Vec<String>,
    /// `queued`, `in_progress` or `completed`.
    pub status: String,
    pub runner_name: Option<String>,
    pub runner_id: Option<u64>,
}

/// A runner record and the JIT config it was issued.
#[derive(Debug, Clone)]
pub struct FakeRunner {
    pub id: u64,
    pub name: String,
    pub labels: Vec<String>,
    pub group: u64,
    pub encoded_jit_config: String,
    /// The job it took.
    pub job: Option<u64>,
    pub deleted: bool,
}

/// One request and the status it got.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// `sha256=<hex>` of `body` under `secret`, as GitHub signs webhooks.
pub fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn signatures_match_githubs_test_vector() {
        assert_eq!(
            super::sign("It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }
}
