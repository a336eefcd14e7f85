//! A small OCI distribution client (pull only) on reqwest.
//!
//! - Anonymous, bearer-token (`WWW-Authenticate: Bearer realm=…`) and basic
//!   authentication; credentials from a kiln registries file
//!   (`$KILN_REGISTRY_CONFIG`) and from `~/.docker/config.json` `auths`.
//! - Redirects are followed (blob downloads often go to object storage);
//!   reqwest drops `Authorization` when a redirect changes host or port, and
//!   an `https` → `http` downgrade is refused.
//! - Transient failures (connection errors, 429, 5xx) are retried with
//!   exponential backoff, honouring `Retry-After`; `ratelimit-*` headers are
//!   logged and put into errors.
//! - Plain `http://` only for loopback registries and those configured
//!   insecure.
//! - Manifests and configs are read with a 4 MiB bound; every byte is checked
//!   against its digest (and blobs against their size) before use.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use reqwest::header::{HeaderMap, ACCEPT, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};

use crate::reference::{is_loopback_host, Reference, DOCKER_HUB};
use crate::ImageError;

/// Largest manifest, index or config accepted.
pub const MAX_MANIFEST: u64 = 4 << 20;

pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// User name and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <redacted>)", self.username)
    }
}

/// How to talk to registries.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Credentials by registry host (`docker.io`, `ghcr.io`, `host:port`).
    pub auths: HashMap<String, Credential>,
    /// Registries reached over plain HTTP (loopback ones always are).
    pub insecure: HashSet<String>,
    /// Layer downloads in flight at once.
    pub max_concurrent_downloads: usize,
    /// Retries of a transient failure (after the first try).
    pub retries: u32,
    /// First backoff; doubled on every retry.
    pub backoff: Duration,
    /// How long a tag→digest resolution is trusted without asking the
    /// registry again.
    pub tag_ttl: Duration,
    /// Per-request timeout for connecting.
    pub connect_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            auths: HashMap::new(),
            insecure: HashSet::new(),
            max_concurrent_downloads: 4,
            retries: 4,
            backoff: Duration::from_millis(250),
            tag_ttl: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(15),
        }
    }
}

#[derive(serde::Deserialize, Default)]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    insecure: Vec<String>,
}

#[derive(serde::Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl RegistryConfig {
    /// Defaults plus credentials from `$DOCKER_CONFIG/config.json` (else
    /// `~/.docker/config.json`) and from `$KILN_REGISTRY_CONFIG` (same
    /// `auths` format, plus `"insecure": ["host:port", …]`), which wins.
    pub fn from_env() -> RegistryConfig {
        let mut c = RegistryConfig::default();
        let docker = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
            .map(|d| d.join("config.json"));
        for path in docker
            .into_iter()
            .chain(std::env::var_os("KILN_REGISTRY_CONFIG").map(PathBuf::from))
        {
            if path.is_file() {
                if let Err(e) = c.load_auth_file(&path) {
                    tracing::warn!("ignoring registry credentials in {}: {e}", path.display());
                }
            }
        }
        if let Some(ttl) = std::env::var("KILN_IMAGE_TAG_TTL")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            c.tag_ttl = Duration::from_secs(ttl);
        }
        c
    }

    /// Add the `auths` (and `insecure`) of a docker-style config file.
    pub fn load_auth_file(&mut self, path: &Path) -> Result<(), ImageError> {
        let bytes = std::fs::read(path).map_err(|e| ImageError::io("read", path, e))?;
        let f: AuthFile = serde_json::from_slice(&bytes).map_err(|e| ImageError::Corrupt {
            what: path.display().to_string(),
            detail: e.to_string(),
        })?;
        for (key, e) in f.auths {
            let cred = match (e.auth, e.username, e.password) {
                (Some(a), _, _) if !a.is_empty() => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(a.trim())
                        .map_err(|err| ImageError::Corrupt {
                            what: format!("{} auths[{key}].auth", path.display()),
                            detail: err.to_string(),
                        })?;
                    let s = String::from_utf8_lossy(&raw).to_string();
                    let Some((u, p)) = s.split_once(':') else {
                        return Err(ImageError::Corrupt {
                            what: format!("{} auths[{key}].auth", path.display()),
                            detail: "not base64 of user:password".into(),
                        });
                    };
                    Credential {
                        username: u.into(),
                        password: p.into(),
                    }
                }
                (_, Some(u), Some(p)) => Credential {
                    username: u,
                    password: p,
                },
                _ => continue, // credential helpers are not supported
            };
            self.auths.insert(normalize_auth_key(&key), cred);
        }
        self.insecure.extend(f.insecure);
        Ok(())
    }

    fn credential(&self, registry: &str) -> Option<&Credential> {
        self.auths.get(registry)
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://h:5000/x` → `h:5000`.
fn normalize_auth_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        h => h.to_string(),
    }
}

/// Progress of a pull, for progress bars.
pub trait PullProgress: Send + Sync {
    /// A download of `size` bytes starts (`cached`: it is already here).
    fn layer_start(&self, _digest: &str, _size: u64, _cached: bool) {}
    /// `bytes` more bytes of the layer arrived.
    fn layer_bytes(&self, _digest: &str, _bytes: u64) {}
    /// The layer is downloaded and verified.
    fn layer_done(&self, _digest: &str) {}
    /// A step other than downloading (applying a layer, building the fs).
    fn stage(&self, _msg: &str) {}
}

/// No progress reporting.
pub struct NoProgress;
impl PullProgress for NoProgress {}

#[derive(Debug, Clone)]
enum Auth {
    Bearer(String),
    Basic,
}

/// A registry client. Cheap to clone; tokens are shared.
#[derive(Clone)]
pub struct Registry {
    http: reqwest::Client,
    config: Arc<RegistryConfig>,
    /// Auth to send, by `host` + `repository`.
    auth: Arc<Mutex<HashMap<String, Auth>>>,
}

/// A fetched manifest or index.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: String,
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

    fn base(&self, r: &Reference) -> Result<String, ImageError> {
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
    async fn send(
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

    /// Answer a 401 challenge.
    async fn authenticate(&self, r: &Reference, challenge: &str) -> Result<Auth, ImageError> {
        let cred = self.config.credential(&r.registry);
        let (scheme, params) = parse_challenge(challenge);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => match cred {
                Some(_) => Ok(Auth::Basic),
                None => Err(registry_err(
                    r,
                    "the registry wants basic credentials and none are configured (docker login, or $KILN_REGISTRY_CONFIG)".into(),
                )),
            },
            "bearer" => {
                let realm = params.get("realm").ok_or_else(|| {
                    registry_err(r, format!("bearer challenge without a realm: {challenge:?}"))
                })?;
                let mut url = reqwest::Url::parse(realm).map_err(|e| {
                    registry_err(r, format!("bad token realm {realm:?}: {e}"))
                })?;
                let realm_host = host_port(&url);
                match url.scheme() {
                    "https" => {}
                    "http"
                        if is_loopback_host(&realm_host)
                            || self.config.insecure.contains(&realm_host) => {}
                    _ => {
                        return Err(registry_err(
                            r,
                            format!("refusing token realm {realm} (not https)"),
                        ))
                    }
                }
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = params.get("service") {
                        q.append_pair("service", s);
                    }
                    q.append_pair("scope", &format!("repository:{}:pull", r.repository));
                }
                let mut req = self.http.get(url.clone());
                if let Some(c) = cred {
                    req = req.basic_auth(&c.username, Some(&c.password));
                }
                let resp = req.send().await.map_err(|e| ImageError::Registry {
                    reference: r.to_string(),
                    detail: format!("token request to {realm} failed"),
                    source: Some(Box::new(e)),
                })?;
                if !resp.status().is_success() {
                    let status = resp.status();
                    return Err(registry_err(
                        r,
                        format!(
                            "token request to {realm}: {status}: {}",
                            read_text(resp).await
                        ),
                    ));
                }
                let body = read_bounded(resp, 1 << 20)
                    .await
                    .map_err(|e| registry_err(r, format!("token response: {e}")))?;
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token = serde_json::from_slice(&body)
                    .map_err(|e| registry_err(r, format!("token response from {realm}: {e}")))?;
                let token = t
                    .token
                    .or(t.access_token)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| registry_err(r, format!("no token in the response from {realm}")))?;
                tracing::debug!("{r}: got a bearer token from {realm}");
                Ok(Auth::Bearer(token))
            }
            _ => Err(registry_err(
                r,
                format!("unauthorized, with an unsupported challenge {challenge:?}"),
            )),
        }
    }

    /// The digest a tag points at (HEAD; no manifest download, and on Docker
    /// Hub no pull counted). `None` if the registry does not say.
    pub async fn head_digest(&self, r: &Reference) -> Result<Option<String>, ImageError> {
        let url = format!("{}/manifests/{}", self.base(r)?, r.target());
        let resp = self
            .send(r, Method::HEAD, &url, Some(MANIFEST_ACCEPT))
            .await?;
        if !resp.status().is_success() {
            return Err(status_err(r, &url, resp).await);
        }
        Ok(resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| crate::reference::is_sha256_digest(d))
            .map(String::from))
    }

    /// GET a manifest or index by tag or digest (`target`), bounded and
    /// verified: by digest, the body must hash to it; by tag, to the
    /// `Docker-Content-Digest` the registry sends, if any.
    pub async fn get_manifest(
        &self,
        r: &Reference,
        target: &str,
    ) -> Result<FetchedManifest, ImageError> {
        let url = format!("{}/manifests/{target}", self.base(r)?);
        let resp = self
            .send(r, Method::GET, &url, Some(MANIFEST_ACCEPT))
            .await?;
        if !resp.status().is_success() {
            return Err(status_err(r, &url, resp).await);
        }
        let media_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let bytes = read_bounded(resp, MAX_MANIFEST)
            .await
            .map_err(|e| registry_err(r, format!("manifest {target}: {e}")))?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let expected = if target.starts_with("sha256:") {
            Some(target.to_string())
        } else {
            header_digest.filter(|d| d.starts_with("sha256:"))
        };
        if let Some(e) = expected {
            if e != digest {
                return Err(ImageError::Corrupt {
                    what: format!("manifest {target} of {r}"),
                    detail: format!("expected {e}, the content hashes to {digest}"),
                });
            }
        }
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// GET a small blob (a config), bounded and verified.
    pub async fn get_small_blob(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
    ) -> Result<Vec<u8>, ImageError> {
        if size > MAX_MANIFEST {
            return Err(ImageError::Corrupt {
                what: format!("config {digest} of {r}"),
                detail: format!("{size} bytes is more than the 4 MiB allowed"),
            });
        }
        let url = format!("{}/blobs/{digest}", self.base(r)?);
        let resp = self.send(r, Method::GET, &url, None).await?;
        if !resp.status().is_success() {
            return Err(status_err(r, &url, resp).await);
        }
        let bytes = read_bounded(resp, MAX_MANIFEST)
            .await
            .map_err(|e| registry_err(r, format!("blob {digest}: {e}")))?;
        let got = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if got != digest || bytes.len() as u64 != size {
            return Err(ImageError::Corrupt {
                what: format!("blob {digest} of {r}"),
                detail: format!(
                    "got {} bytes hashing to {got}; the descriptor says {size} bytes",
                    bytes.len()
                ),
            });
        }
        Ok(bytes)
    }

    /// Download a layer blob into `file` (truncated first), hashing as it
    /// goes; an error if it is longer or shorter than `size` or does not hash
    /// to `digest`. Retries transient failures from the start.
    pub async fn download_blob(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        file: &Path,
        progress: &dyn PullProgress,
    ) -> Result<(), ImageError> {
        let url = format!("{}/blobs/{digest}", self.base(r)?);
        let what = || format!("layer {digest} of {r}");
        let mut attempt = 0;
        loop {
            let result = self
                .download_once(r, &url, digest, size, file, progress)
                .await;
            match result {
                Err(Transfer::Transient(e)) if attempt < self.config.retries => {
                    tracing::warn!("{}: {e}; retrying", what());
                    tokio::time::sleep(self.config.backoff * 2u32.pow(attempt)).await;
                    attempt += 1;
                }
                Err(Transfer::Transient(e)) => {
                    return Err(ImageError::Corrupt {
                        what: what(),
                        detail: format!("download failed: {e}"),
                    })
                }
                Err(Transfer::Fatal(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
    }

    async fn download_once(
        &self,
        r: &Reference,
        url: &str,
        digest: &str,
        size: u64,
        file: &Path,
        progress: &dyn PullProgress,
    ) -> Result<(), Transfer> {
        let what = || format!("layer {digest} of {r}");
        let mut resp = self
            .send(r, Method::GET, url, None)
            .await
            .map_err(Transfer::Fatal)?;
        if !resp.status().is_success() {
            return Err(Transfer::Fatal(status_err(r, url, resp).await));
        }
        if let Some(len) = resp.content_length() {
            if len != size {
                return Err(Transfer::Fatal(ImageError::Corrupt {
                    what: what(),
                    detail: format!("the registry sends {len} bytes, the descriptor says {size}"),
                }));
            }
        }
        let f = std::fs::File::create(file)
            .map_err(|e| Transfer::Fatal(ImageError::io("create", file, e)))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => return Err(Transfer::Transient(e.to_string())),
            };
            got += chunk.len() as u64;
            if got > size {
                return Err(Transfer::Fatal(ImageError::Corrupt {
                    what: what(),
                    detail: format!("more than the {size} bytes the descriptor says"),
                }));
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .map_err(|e| Transfer::Fatal(ImageError::io("write", file, e)))?;
            progress.layer_bytes(digest, chunk.len() as u64);
        }
        out.flush()
            .map_err(|e| Transfer::Fatal(ImageError::io("write", file, e)))?;
        if got < size {
            return Err(Transfer::Fatal(ImageError::Corrupt {
                what: what(),
                detail: format!("truncated: {got} of {size} bytes"),
            }));
        }
        let h = format!("sha256:{}", hex::encode(hasher.finalize()));
        if h != digest {
            return Err(Transfer::Fatal(ImageError::Corrupt {
                what: what(),
                detail: format!("the downloaded content hashes to {h}"),
            }));
        }
        Ok(())
    }
}

enum Transfer {
    Transient(String),
    Fatal(ImageError),
}

fn registry_err(r: &Reference, detail: String) -> ImageError {
    ImageError::Registry {
        reference: r.to_string(),
        detail,
        source: None,
    }
}

async fn status_err(r: &Reference, url: &str, resp: reqwest::Response) -> ImageError {
    let status = resp.status();
    let limits = rate_limits(resp.headers());
    let body = read_text(resp).await;
    if status == StatusCode::NOT_FOUND {
        return ImageError::NotFound(format!("{r}: {url}: {status}: {body}"));
    }
    registry_err(r, format!("{url}: {status}{limits}: {body}"))
}

/// The first 512 bytes of an error body, as text.
async fn read_text(resp: reqwest::Response) -> String {
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

async fn read_bounded(mut resp: reqwest::Response, max: u64) -> Result<Vec<u8>, String> {
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

fn host_port(u: &reqwest::Url) -> String {
    match (u.host_str(), u.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => String::new(),
    }
}

/// `Bearer realm="x",service="y"` → ("Bearer", {realm: x, service: y}).
pub fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n)
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    (scheme.to_string(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:samalba/my-app:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(s, "Basic");
        assert_eq!(p["realm"], "Registry Realm");
        let (_, p) = parse_challenge("Bearer realm=http://x/t, service=s");
        assert_eq!(p["realm"], "http://x/t");
        assert_eq!(p["service"], "s");
        assert!(parse_challenge("").1.is_empty());
    }

    #[test]
    fn docker_config_auths() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"127.0.0.1:5000":{{"username":"bob","password":"pw"}},"ghcr.io":{{}}}},"insecure":["10.0.0.1:5000"]}}"#
            ),
        )
        .unwrap();
        let mut c = RegistryConfig::default();
        c.load_auth_file(&p).unwrap();
        assert_eq!(
            c.credential("docker.io"),
            Some(&Credential {
                username: "alice".into(),
                password: "s3cr:et".into()
            })
        );
        assert_eq!(c.credential("127.0.0.1:5000").unwrap().username, "bob");
        assert!(c.credential("ghcr.io").is_none());
        assert!(c.insecure.contains("10.0.0.1:5000"));
        assert!(!format!("{:?}", c.credential("docker.io")).contains("s3cr"));
    }
}
