//! The HTTP side of GitLab's runner API (`/api/v4`), as described in
//! docs/gitlab.md and gitlab-runner's `network/gitlab.go`.

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

use super::job::JobResponse;
use super::GitlabError;

/// What kiln tells GitLab it can do. Only what it really does: no
/// terminal, sessions or two-phase commit.
pub fn features() -> serde_json::Value {
    serde_json::json!({
        "variables": true,
        "image": true,
        "services": true,
        "service_variables": true,
        "service_multiple_aliases": true,
        "artifacts": true,
        "artifacts_exclude": true,
        "cache": true,
        "fallback_cache_keys": true,
        "upload_multiple_artifacts": true,
        "refspecs": true,
        "masking": true,
        "multi_build_steps": true,
        "trace_reset": true,
        "trace_checksum": true,
        "trace_size": true,
        "cancelable": true,
        "cancel_gracefully": true,
        "return_exit_code": true,
    })
}

/// The `info` object sent with verify and job requests.
pub fn info() -> serde_json::Value {
    serde_json::json!({
        "name": "kiln",
        "version": env!("CARGO_PKG_VERSION"),
        "revision": "unknown",
        "platform": "linux",
        "architecture": std::env::consts::ARCH.replace("x86_64", "amd64"),
        "executor": "kiln-vm",
        "shell": "sh",
        "features": features(),
    })
}

/// A client for one GitLab instance.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `<url>/api/v4`
    base: String,
}

/// Answer to `POST /runners/verify` or `POST /runners`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RunnerIdentity {
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_expires_at: Option<String>,
}

/// What a job endpoint said about the job besides its status code.
#[derive(Debug, Clone, Default)]
pub struct RemoteState {
    /// `Job-Status`: `running`, `canceling`, `canceled`, `failed`, ...
    pub job_status: Option<String>,
    /// `X-GitLab-Trace-Update-Interval`.
    pub interval: Option<Duration>,
}

impl RemoteState {
    fn from(h: &HeaderMap) -> RemoteState {
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        RemoteState {
            job_status: get("job-status"),
            interval: get("x-gitlab-trace-update-interval")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
        }
    }

    /// `Some(graceful)` when GitLab wants the job stopped.
    pub fn cancel(&self) -> Option<bool> {
        match self.job_status.as_deref() {
            Some("canceling") => Some(true),
            Some("canceled") | Some("failed") => Some(false),
            _ => None,
        }
    }
}

/// Answer to a trace patch.
#[derive(Debug, Clone)]
pub struct PatchResponse {
    pub status: u16,
    pub remote: RemoteState,
    /// The end of the server's trace (`Range: 0-<end>`), when given.
    pub range_end: Option<u64>,
}

/// Answer to `PUT /jobs/:id`.
#[derive(Debug, Clone)]
pub struct UpdateResponse {
    pub status: u16,
    pub remote: RemoteState,
}

/// `PUT /jobs/:id` body.
#[derive(Debug, Clone, Serialize)]
pub struct UpdateJob {
    pub token: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub checksum: String,
    pub output: Output,
}

#[derive(Debug, Clone, Serialize)]
pub struct Output {
    pub checksum: String,
    pub bytesize: u64,
}

fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "kiln-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl Client {
    pub fn new(url: &str) -> Result<Client, GitlabError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            // Covers Workhorse's 50 s long poll on /jobs/request.
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|source| GitlabError::Transport {
                what: "building the HTTP client",
                source,
            })?;
        Ok(Client {
            http,
            base: format!("{}/api/v4", url.trim_end_matches('/')),
        })
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(m, format!("{}{path}", self.base))
            .header("X-Request-Id", request_id())
            .header("Accept", "application/json")
    }

    async fn send(
        what: &'static str,
        rb: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, GitlabError> {
        rb.send()
            .await
            .map_err(|source| GitlabError::Transport { what, source })
    }

    async fn status_error(what: &'static str, r: reqwest::Response) -> GitlabError {
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        GitlabError::Status {
            what,
            status,
            body: body.chars().take(500).collect(),
        }
    }

    /// `POST /runners/verify`: is this runner authentication token valid?
    pub async fn verify(
        &self,
        token: &str,
        system_id: &str,
    ) -> Result<RunnerIdentity, GitlabError> {
        let what = "verifying the runner token";
        let r = Self::send(
            what,
            self.req(reqwest::Method::POST, "/runners/verify")
                .json(&serde_json::json!({"token": token, "system_id": system_id, "info": info()})),
        )
        .await?;
        if r.status().as_u16() != 200 {
            return Err(Self::status_error(what, r).await);
        }
        // Older servers answer a bare `200`.
        let text = r.text().await.unwrap_or_default();
        Ok(serde_json::from_str(&text).unwrap_or_default())
    }

    /// `POST /runners` with a (deprecated) registration token.
    pub async fn register(
        &self,
        registration_token: &str,
        description: &str,
        tags: &[String],
        run_untagged: bool,
    ) -> Result<RunnerIdentity, GitlabError> {
        let what = "registering the runner";
        let r = Self::send(
            what,
            self.req(reqwest::Method::POST, "/runners")
                .json(&serde_json::json!({
                    "token": registration_token,
                    "description": description,
                    "tag_list": tags.join(","),
                    "run_untagged": run_untagged,
                    "info": info(),
                })),
        )
        .await?;
        if r.status().as_u16() != 201 {
            return Err(Self::status_error(what, r).await);
        }
        r.json()
            .await
            .map_err(|source| GitlabError::Transport { what, source })
    }

    /// `POST /jobs/request`. Returns the job, if any, and the new
    /// `X-GitLab-Last-Update` to send next time.
    pub async fn request_job(
        &self,
        token: &str,
        system_id: &str,
        last_update: Option<&str>,
    ) -> Result<(Option<JobResponse>, Option<String>), GitlabError> {
        let what = "requesting a job";
        let mut body = serde_json::json!({"token": token, "system_id": system_id, "info": info()});
        if let Some(lu) = last_update {
            body["last_update"] = lu.into();
        }
        let r = Self::send(
            what,
            self.req(reqwest::Method::POST, "/jobs/request")
                .header("RUNNER-TOKEN", token)
                .json(&body),
        )
        .await?;
        let lu = r
            .headers()
            .get("x-gitlab-last-update")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        match r.status().as_u16() {
            201 => {
                let text = r
                    .text()
                    .await
                    .map_err(|source| GitlabError::Transport { what, source })?;
                let job =
                    serde_json::from_str(&text).map_err(|e| GitlabError::BadJob(e.to_string()))?;
                Ok((Some(job), lu))
            }
            // 503: "no job, healthy" for gitlab-runner too.
            204 | 503 => Ok((None, lu)),
            _ => Err(Self::status_error(what, r).await),
        }
    }

    /// `PUT /jobs/:id`.
    pub async fn update_job(
        &self,
        id: u64,
        body: &UpdateJob,
    ) -> Result<UpdateResponse, GitlabError> {
        let r = Self::send(
            "updating the job",
            self.req(reqwest::Method::PUT, &format!("/jobs/{id}"))
                .header("JOB-TOKEN", &body.token)
                .json(body),
        )
        .await?;
        Ok(UpdateResponse {
            status: r.status().as_u16(),
            remote: RemoteState::from(r.headers()),
        })
    }

    /// `PATCH /jobs/:id/trace` with `data` at `offset`.
    pub async fn patch_trace(
        &self,
        id: u64,
        token: &str,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<PatchResponse, GitlabError> {
        if data.is_empty() {
            // GitLab's runner never sends an empty patch (its range would
            // end before it starts).
            return Err(GitlabError::Internal("an empty trace patch".into()));
        }
        let end = offset + data.len() as u64 - 1;
        let r = Self::send(
            "sending the trace",
            self.req(
                reqwest::Method::PATCH,
                &format!("/jobs/{id}/trace?debug_trace=false"),
            )
            .header("JOB-TOKEN", token)
            .header("Content-Type", "text/plain")
            // No `bytes ` prefix: that is what GitLab expects.
            .header("Content-Range", format!("{offset}-{end}"))
            .body(data),
        )
        .await?;
        let range_end = r
            .headers()
            .get("range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('-').next())
            .and_then(|v| v.trim().parse().ok());
        Ok(PatchResponse {
            status: r.status().as_u16(),
            remote: RemoteState::from(r.headers()),
            range_end,
        })
    }

    /// `POST /jobs/:id/artifacts` (multipart, one `file` part).
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_artifacts(
        &self,
        id: u64,
        token: &str,
        archive: Vec<u8>,
        filename: &str,
        artifact_type: &str,
        artifact_format: &str,
        expire_in: Option<&str>,
    ) -> Result<(), GitlabError> {
        let what = "uploading artifacts";
        let part = reqwest::multipart::Part::bytes(archive).file_name(filename.to_string());
        let form = reqwest::multipart::Form::new().part("file", part);
        let mut query = vec![
            ("artifact_format", artifact_format.to_string()),
            ("artifact_type", artifact_type.to_string()),
        ];
        if let Some(e) = expire_in {
            query.push(("expire_in", e.to_string()));
        }
        let r = Self::send(
            what,
            self.req(reqwest::Method::POST, &format!("/jobs/{id}/artifacts"))
                .header("JOB-TOKEN", token)
                .query(&query)
                .multipart(form),
        )
        .await?;
        if r.status().as_u16() != 201 {
            return Err(Self::status_error(what, r).await);
        }
        Ok(())
    }

    /// `GET /jobs/:id/artifacts` with the dependency's own job token.
    pub async fn download_artifacts(&self, id: u64, token: &str) -> Result<Vec<u8>, GitlabError> {
        let what = "downloading artifacts";
        let r = Self::send(
            what,
            self.req(reqwest::Method::GET, &format!("/jobs/{id}/artifacts"))
                .header("JOB-TOKEN", token),
        )
        .await?;
        if r.status().as_u16() != 200 {
            return Err(Self::status_error(what, r).await);
        }
        Ok(r.bytes()
            .await
            .map_err(|source| GitlabError::Transport { what, source })?
            .to_vec())
    }
}
