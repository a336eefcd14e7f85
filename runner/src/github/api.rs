//! GitHub's REST API as kiln uses it (`shared/reference/ci-protocols.md`
//! §2.2), through octocrab: its client, its GitHub App installation tokens,
//! and its raw calls (`_get`/`_post`/`_delete`), so that every answer's
//! status and rate-limit headers reach kiln's own backoff. octocrab's retry
//! feature is off: a retried `generate-jitconfig` must be kiln's decision.

use std::time::{Duration, SystemTime};

use http::header::HeaderMap;
use octocrab::Octocrab;
use serde::Deserialize;
use serde_json::json;

use super::config::{Auth, GithubConfig};

type Body = http_body_util::combinators::BoxBody<bytes::Bytes, octocrab::Error>;

/// The longest wait a rate-limit answer may impose before kiln asks again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Error bodies are quoted this short.
const QUOTE: usize = 200;
/// Runs and jobs per listing (GitHub's page maximum).
const PER_PAGE: u32 = 100;

/// A call that failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{what}: cannot reach GitHub")]
    Transport {
        what: String,
        #[source]
        source: octocrab::Error,
    },
    #[error("{what}: GitHub answered {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
        /// From `retry-after`, or `x-ratelimit-reset` when
        /// `x-ratelimit-remaining` is 0.
        retry_after: Option<Duration>,
    },
    #[error("{what}: GitHub's answer is not what its API documents")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot set up the GitHub client")]
    Setup(#[source] octocrab::Error),
    #[error("the GitHub App's private key is not an RSA PEM key")]
    Key(#[source] octocrab::jsonwebtoken::errors::Error),
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How long GitHub asked kiln to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The encoded JIT configuration: a credential. Never printed.
#[derive(Clone)]
pub struct JitConfig(pub String);

impl std::fmt::Debug for JitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JitConfig({} bytes)", self.0.len())
    }
}

/// A runner registered just in time.
#[derive(Debug)]
pub struct JitRunner {
    pub id: u64,
    pub config: JitConfig,
}

/// A runner record as `GET …/actions/runners` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct RunnerRecord {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub busy: bool,
}

/// A workflow job as the runs' job listing shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkflowJob {
    pub id: u64,
    #[serde(default)]
    pub run_id: u64,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub runner_name: Option<String>,
}

#[derive(Deserialize)]
struct Runs {
    #[serde(default)]
    workflow_runs: Vec<Run>,
}
#[derive(Deserialize)]
struct Run {
    id: u64,
}
#[derive(Deserialize)]
struct Jobs {
    #[serde(default)]
    jobs: Vec<WorkflowJob>,
}
#[derive(Deserialize)]
struct RunnerList {
    #[serde(default)]
    runners: Vec<RunnerRecord>,
}
#[derive(Deserialize)]
struct JitAnswer {
    runner: RunnerRecord,
    encoded_jit_config: String,
}

/// One `[[github]]` scope's API.
#[derive(Clone)]
pub struct Api {
    oc: Octocrab,
    base: String,
    /// `/repos/owner/name` or `/orgs/name`.
    scope: String,
}

impl Api {
    pub fn new(cfg: &GithubConfig, auth: &Auth) -> Result<Api, ApiError> {
        let base = cfg.api_url.trim_end_matches('/').to_string();
        let builder = Octocrab::builder()
            .base_uri(base.as_str())
            .map_err(ApiError::Setup)?
            .set_connect_timeout(Some(Duration::from_secs(10)))
            .set_read_timeout(Some(Duration::from_secs(30)))
            .set_write_timeout(Some(Duration::from_secs(30)))
            .add_header(
                http::header::HeaderName::from_static("x-github-api-version"),
                "2022-11-28".to_string(),
            );
        let oc = match auth {
            Auth::Token(t) => builder
                .personal_token(t.clone())
                .build()
                .map_err(ApiError::Setup)?,
            Auth::App {
                app_id,
                key_pem,
                installation_id,
            } => {
                let key = octocrab::EncodingKey::from_rsa_pem(key_pem).map_err(ApiError::Key)?;
                builder
                    .app(octocrab::models::AppId(*app_id), key)
                    .build()
                    .map_err(ApiError::Setup)?
                    .installation(octocrab::models::InstallationId(*installation_id))
                    .map_err(ApiError::Setup)?
            }
        };
        let scope = match (&cfg.repository, &cfg.organization) {
            (Some(r), _) => format!("/repos/{r}"),
            (None, Some(o)) => format!("/orgs/{o}"),
            (None, None) => String::new(),
        };
        Ok(Api { oc, base, scope })
    }

    fn uri(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Read an answer: the body on `ok`, else a [`ApiError::Status`].
    async fn answer(
        &self,
        what: &str,
        ok: &[u16],
        got: Result<http::Response<Body>, octocrab::Error>,
    ) -> Result<(u16, String), ApiError> {
        let resp = got.map_err(|source| ApiError::Transport {
            what: what.into(),
            source,
        })?;
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers(), SystemTime::now());
        let body = self
            .oc
            .body_to_string(resp)
            .await
            .map_err(|source| ApiError::Transport {
                what: what.into(),
                source,
            })?;
        if ok.contains(&status) {
            return Ok((status, body));
        }
        Err(ApiError::Status {
            what: what.into(),
            status,
            body: body.chars().take(QUOTE).collect(),
            retry_after,
        })
    }

    fn decode<T: for<'de> Deserialize<'de>>(what: &str, body: &str) -> Result<T, ApiError> {
        serde_json::from_str(body).map_err(|source| ApiError::Decode {
            what: what.into(),
            source,
        })
    }

    /// `POST …/actions/runners/generate-jitconfig`: a runner named `name`
    /// with `labels`, in group `group`.
    pub async fn generate_jitconfig(
        &self,
        name: &str,
        labels: &[String],
        group: u64,
    ) -> Result<JitRunner, ApiError> {
        let what = format!("registering runner {name} (generate-jitconfig)");
        let body = json!({
            "name": name,
            "runner_group_id": group,
            "labels": labels,
            "work_folder": "_work",
        });
        let got = self
            .oc
            ._post(
                self.uri(&format!(
                    "{}/actions/runners/generate-jitconfig",
                    self.scope
                )),
                Some(&body),
            )
            .await;
        let (_, body) = self.answer(&what, &[201], got).await?;
        let a: JitAnswer = Self::decode(&what, &body)?;
        if a.encoded_jit_config.is_empty() {
            return Err(ApiError::Status {
                what,
                status: 201,
                body: "no encoded_jit_config".into(),
                retry_after: None,
            });
        }
        Ok(JitRunner {
            id: a.runner.id,
            config: JitConfig(a.encoded_jit_config),
        })
    }

    /// `DELETE …/actions/runners/{id}`: true when it was there.
    pub async fn delete_runner(&self, id: u64) -> Result<bool, ApiError> {
        let what = format!("removing runner {id}");
        let got = self
            .oc
            ._delete(
                self.uri(&format!("{}/actions/runners/{id}", self.scope)),
                None::<&()>,
            )
            .await;
        let (status, _) = self.answer(&what, &[204, 404], got).await?;
        Ok(status == 204)
    }

    /// `GET …/actions/runners?name=`: the records named `name`.
    pub async fn runners_named(&self, name: &str) -> Result<Vec<RunnerRecord>, ApiError> {
        let what = format!("looking up runner {name}");
        let got = self
            .oc
            ._get(self.uri(&format!(
                "{}/actions/runners?name={name}&per_page={PER_PAGE}",
                self.scope
            )))
            .await;
        let (_, body) = self.answer(&what, &[200], got).await?;
        let l: RunnerList = Self::decode(&what, &body)?;
        Ok(l.runners.into_iter().filter(|r| r.name == name).collect())
    }

    /// The queued and running jobs of `repo`'s queued and in-progress runs
    /// (a run is `in_progress` once its first job started, so jobs waiting
    /// on `needs:` sit in running runs). The first page of each listing.
    pub async fn active_jobs(&self, repo: &str) -> Result<Vec<WorkflowJob>, ApiError> {
        let mut jobs = Vec::new();
        for status in ["queued", "in_progress"] {
            let what = format!("listing {status} runs of {repo}");
            let got = self
                .oc
                ._get(self.uri(&format!(
                    "/repos/{repo}/actions/runs?status={status}&per_page={PER_PAGE}"
                )))
                .await;
            let (_, body) = self.answer(&what, &[200], got).await?;
            let runs: Runs = Self::decode(&what, &body)?;
            for run in runs.workflow_runs {
                let what = format!("listing the jobs of run {} of {repo}", run.id);
                let got = self
                    .oc
                    ._get(self.uri(&format!(
                        "/repos/{repo}/actions/runs/{}/jobs?filter=latest&per_page={PER_PAGE}",
                        run.id
                    )))
                    .await;
                let (_, body) = self.answer(&what, &[200], got).await?;
                let l: Jobs = Self::decode(&what, &body)?;
                jobs.extend(
                    l.jobs
                        .into_iter()
                        .filter(|j| j.status == "queued" || j.status == "in_progress"),
                );
            }
        }
        jobs.sort_by_key(|j| j.id);
        jobs.dedup_by_key(|j| j.id);
        Ok(jobs)
    }
}

/// How long GitHub asked to wait: `retry-after` (seconds), else the
/// primary rate limit's reset when none is left. Capped at an hour.
pub fn retry_after(h: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let num = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(s) = num("retry-after") {
        return Some(Duration::from_secs(s).min(MAX_RETRY_AFTER));
    }
    if num("x-ratelimit-remaining") == Some(0) {
        let reset = num("x-ratelimit-reset")?;
        let now = now.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
        return Some(Duration::from_secs(reset.saturating_sub(now).max(1)).min(MAX_RETRY_AFTER));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_headers_give_the_wait() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert("x-ratelimit-remaining", "0".parse().unwrap());
        h.insert("x-ratelimit-reset", "1030".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        h.insert("retry-after", "999999".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(MAX_RETRY_AFTER));
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining", "5".parse().unwrap());
        h.insert("x-ratelimit-reset", "1030".parse().unwrap());
        assert_eq!(retry_after(&h, now), None, "not exhausted");
    }

    #[test]
    fn the_jit_config_never_prints() {
        let j = JitConfig("c2VjcmV0".into());
        assert_eq!(format!("{j:?}"), "JitConfig(8 bytes)");
    }
}
