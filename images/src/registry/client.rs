//! The registry client: one HTTP client (redirect policy, timeouts) and
//! its tokens, shared by every pull; requests with auth, retries and
//! backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{HeaderMap, ACCEPT, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};

use super::auth::Auth;
use super::RegistryConfig;
use crate::reference::{is_loopback_host, Reference};
use crate::ImageError;

/// A registry client. Cheap to clone; tokens are shared.
#[derive(Clone)]
pub struct Registry {
    pub(super) http: reqwest::Client,
    pub(super) config: Arc<RegistryConfig>,
    /// Auth to send, by `host` + `repository`.
    auth: Arc<Mutex<HashMap<String, Auth>>>,
}

impl Registry {
    pub fn new(config: RegistryConfig) -> Result<Registry, ImageError> {
        let insecure = config.insecure.clone();
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                return attempt.error("more than 10 redirects");
            }
            let downgrade = attempt.url().scheme() == "http"
                && attempt.previous().iter().any(|u| u.scheme() == "https");
            let host = host_port(attempt.url());
            if downgrade && !is_loopback_host(&host) && !insecure.contains(&host) {
                let msg = format!("refusing a redirect from https to {}", attempt.url());
                return attempt.error(msg);
            }
            attempt.follow()
        });
        let http = reqwest::Client::builder()
            .redirect(policy)
            .connect_timeout(config.connect_timeout)
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ImageError::Registry {
                reference: "registry client".into(),
                detail: "cannot build the HTTP client".into(),
                source: Some(Box::new(e)),
            })?;
        Ok(Registry {
            http,
            config: Arc::new(config),
            auth: Arc::default(),
        })
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    pub(super) fn base(&self, r: &Reference) -> Result<String, ImageError> {
        let host = r.api_host();
        let scheme = if r.is_loopback() || self.config.insecure.contains(&r.registry) {
            "http"
        } else {
            "https"
        };
        Ok(format!("{scheme}://{host}/v2/{}", r.repository))
    }

    /// Send a request with auth, retries and backoff. Returns the response
    /// whatever its status, except for 401 (authenticated and retried once),
    /// 429 and 5xx (retried).
    pub(super) async fn send(
        &self,
        r: &Reference,
        method: Method,
        url: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, ImageError> {
        let key = format!("{}/{}", r.registry, r.repository);
        let mut authenticated = false;
        let mut attempt = 0u32;
        loop {
            let mut req = self.http.request(method.clone(), url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            let auth = self.auth.lock().ok().and_then(|m| m.get(&key).cloned());
            match auth {
                Some(Auth::Bearer(t)) => req = req.bearer_auth(t),
                Some(Auth::Basic) => {
                    if let Some(c) = self.config.credential(&r.registry) {
                        req = req.basic_auth(&c.username, Some(&c.password));
                    }
                }
                None => {}
            }
            let res = req.send().await;
            let retry_in = match res {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !authenticated => {
                    authenticated = true;
                    let challenge = resp
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let a = self.authenticate(r, &challenge).await?;
                    if let Ok(mut m) = self.auth.lock() {
                        m.insert(key.clone(), a);
                    }
                    continue;
                }
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    return Err(registry_err(
                        r,
                        format!(
                            "{method} {url}: 401 Unauthorized after authenticating{}",
                            if self.config.credential(&r.registry).is_some() {
                                " (check the credentials)"
                            } else {
                                " (no credentials configured for this registry: docker login, or $KILN_REGISTRY_CONFIG)"
                            }
                        ),
                    ));
                }
                Ok(resp)
                    if resp.status() == StatusCode::TOO_MANY_REQUESTS
                        || resp.status().is_server_error() =>
                {
                    let limits = rate_limits(resp.headers());
                    if attempt >= self.config.retries {
                        let status = resp.status();
                        let body = read_text(resp).await;
                        return Err(registry_err(
                            r,
                            format!("{method} {url}: {status}{limits}: {body}"),
                        ));
                    }
                    let after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s.min(60)));
                    tracing::warn!("{r}: {method} {url}: {}{limits}; retrying", resp.status());
                    after.unwrap_or(self.config.backoff * 2u32.pow(attempt))
                }
                Ok(resp) => {
                    let limits = rate_limits(resp.headers());
                    if !limits.is_empty() {
                        tracing::info!("{r}: registry rate limit{limits}");
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    if attempt >= self.config.retries || !is_transient(&e) {
                        return Err(ImageError::Registry {
                            reference: r.to_string(),
                            detail: format!("{method} {url} failed"),
                            source: Some(Box::new(e)),
                        });
                    }
                    tracing::warn!("{r}: {method} {url}: {e}; retrying");
                    self.config.backoff * 2u32.pow(attempt)
                }
            };
            attempt += 1;
            tokio::time::sleep(retry_in).await;
        }
    }
}

pub(super) fn registry_err(r: &Reference, detail: String) -> ImageError {
    ImageError::Registry {
        reference: r.to_string(),
        detail,
        source: None,
    }
}

pub(super) async fn status_err(r: &Reference, url: &str, resp: reqwest::Response) -> ImageError {
    let status = resp.status();
    let limits = rate_limits(resp.headers());
    let body = read_text(resp).await;
    if status == StatusCode::NOT_FOUND {
        return ImageError::NotFound(format!("{r}: {url}: {status}: {body}"));
    }
    registry_err(r, format!("{url}: {status}{limits}: {body}"))
}

/// The first 512 bytes of an error body, as text.
pub(super) async fn read_text(resp: reqwest::Response) -> String {
    let b = read_bounded(resp, 64 << 10).await.unwrap_or_default();
    let s = String::from_utf8_lossy(&b[..b.len().min(512)])
        .trim()
        .to_string();
    if s.is_empty() {
        "(empty body)".into()
    } else {
        s
    }
}

pub(super) async fn read_bounded(mut resp: reqwest::Response, max: u64) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|l| l > max) {
        return Err(format!("larger than the {max} bytes allowed"));
    }
    let mut v = Vec::new();
    while let Some(c) = resp.chunk().await.map_err(|e| e.to_string())? {
        if (v.len() + c.len()) as u64 > max {
            return Err(format!("larger than the {max} bytes allowed"));
        }
        v.extend_from_slice(&c);
    }
    Ok(v)
}

/// `; ratelimit-limit=…, ratelimit-remaining=…` when the registry sends them.
fn rate_limits(h: &HeaderMap) -> String {
    let parts: Vec<String> = ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"]
        .iter()
        .filter_map(|n| {
            h.get(*n)
                .and_then(|v| v.to_str().ok())
                .map(|v| format!("{n}={v}"))
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

fn is_transient(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
}

pub(super) fn host_port(u: &reqwest::Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    }
}
