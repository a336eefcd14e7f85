//! The S3-compatible cache store (`[runners.cache] Type = "s3"`, settings
//! in `[runners.cache.s3]`, shaped like gitlab-runner's).
//!
//! Objects are named as gitlab-runner names them:
//! `[<Path>/]runner/<short token>/project/<id>/<key>` (or
//! `[<Path>/]project/<id>/<key>` when `Shared`); a key that would leave its
//! project's prefix (`../`) is refused. Requests are presigned by
//! `rusty-s3` (SigV4, no HTTP client of its own) and sent with kiln's
//! `reqwest`: downloads stream into a spool file through a size cap checked
//! before anything is written, uploads stream from the archive file.
//!
//! A missing object is a cache miss. Anything else that fails is an
//! [`S3Error`], which the caller turns into a warning in the job's log:
//! a cache never fails a job. Credentials and presigned URLs (which are
//! bearer tokens while they last) never reach a log or an error message.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{StatusCode, Url};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::store::Spool;

/// How long a presigned URL stays valid. Each is signed right before its
/// request; S3 checks the expiry when a request starts, not while its body
/// streams.
const URL_EXPIRY: Duration = Duration::from_secs(3600);
/// Time to connect to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence while a request is sent or a response is read.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest time of one transfer (a multi-GiB archive on a slow link).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(3 * 3600);
/// Most bytes of an error response read for its S3 error code.
const MAX_ERROR_BODY: usize = 4096;

/// A secret from kiln.toml or the environment: `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// `[runners.cache.s3]`, as gitlab-runner's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `host[:port]` of the S3-compatible server (default: AWS's endpoint
    /// of `BucketLocation`).
    #[serde(
        rename = "ServerAddress",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub server_address: Option<String>,
    /// Access key; with `SecretKey` (else `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` from kiln's environment).
    #[serde(rename = "AccessKey", default, skip_serializing_if = "Option::is_none")]
    pub access_key: Option<String>,
    #[serde(rename = "SecretKey", default, skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<Secret>,
    /// A session token for temporary credentials.
    #[serde(
        rename = "SessionToken",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub session_token: Option<Secret>,
    #[serde(rename = "BucketName", default)]
    pub bucket_name: String,
    /// The bucket's region (default `us-east-1`).
    #[serde(
        rename = "BucketLocation",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub bucket_location: Option<String>,
    /// Plain HTTP instead of HTTPS.
    #[serde(rename = "Insecure", default)]
    pub insecure: bool,
    /// Path-style URLs (`host/bucket/object`); default: virtual-hosted
    /// (`bucket.host/object`) for AWS and Google endpoints, path style for
    /// any other server, as gitlab-runner decides.
    #[serde(rename = "PathStyle", default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
}

/// Credentials from kiln's environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), read by `kiln::env`.
#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// What went wrong with the S3 store.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("[runners.cache.s3] has no BucketName")]
    NoBucket,
    #[error(
        "[runners.cache.s3] has no credentials: set AccessKey and SecretKey, or \
         AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in kiln's environment"
    )]
    NoCredentials,
    #[error("[runners.cache.s3] ServerAddress \"{0}\" is not a host[:port]")]
    Address(String),
    #[error("the S3 cache store needs a tokio runtime (kiln daemon)")]
    NoRuntime,
    #[error("computed cache path outside of project bucket. Please remove `../` from cache key")]
    OutsideProject,
    /// The server or the connection failed; `reason` never holds a URL.
    #[error("{op} {object} in bucket {bucket}: {reason}")]
    Request {
        op: &'static str,
        object: String,
        bucket: String,
        reason: String,
    },
    #[error("{object} in bucket {bucket} is larger than the limit of {max} bytes: not downloaded")]
    TooLarge {
        object: String,
        bucket: String,
        max: u64,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// gitlab-runner's short form of a runner token, its cache namespace: the
/// first 9 characters after the token's known prefix (`glrt-`, `glrt-t1_`,
/// `glrtr-`, `glcbt-`, `GR` and 7 hex digits).
pub fn short_token(token: &str) -> &str {
    let mut t = token;
    if let Some(rest) = t.strip_prefix("glrt-") {
        t = strip_partition(rest);
    } else if let Some(rest) = t.strip_prefix("glrtr-") {
        t = rest;
    } else if let Some(rest) = t.strip_prefix("glcbt-") {
        t = rest;
    } else {
        t = strip_partition(t);
    }
    if let Some(rest) = t.strip_prefix("GR") {
        if rest.len() >= 7 && rest.as_bytes()[..7].iter().all(u8::is_ascii_hexdigit) {
            t = &rest[7..];
        }
    }
    let end = t.char_indices().nth(9).map_or(t.len(), |(i, _)| i);
    &t[..end]
}

/// `t1_`, `t2_`, `t3_`: a token's partition prefix.
fn strip_partition(t: &str) -> &str {
    match t.as_bytes() {
        [b't', b'1'..=b'3', b'_', ..] => &t[3..],
        _ => t,
    }
}

/// The object of `key` in `namespace` under `prefix`, as gitlab-runner's
/// `path.Join(Path, namespace, key)`; refused when the key leaves the
/// namespace.
pub fn object_name(prefix: &str, namespace: &str, key: &str) -> Result<String, S3Error> {
    let mut parts: Vec<&str> = Vec::new();
    for seg in prefix.split('/').chain(namespace.split('/')) {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    let base = parts.len();
    for seg in key.split('/') {
        match seg {
            "" | "." => {}
            ".." if parts.len() > base => {
                parts.pop();
            }
            ".." => return Err(S3Error::OutsideProject),
            s => parts.push(s),
        }
    }
    if parts.len() == base {
        return Err(S3Error::OutsideProject);
    }
    Ok(parts.join("/"))
}

/// A bucket of cache archives on an S3-compatible server.
#[derive(Clone)]
pub struct S3Store {
    bucket: Bucket,
    credentials: Credentials,
    /// `Path`: the prefix of every object.
    prefix: String,
    client: reqwest::Client,
    /// The daemon's runtime, which the blocking callers' requests run on.
    handle: tokio::runtime::Handle,
    /// Where downloads are spooled and archives built.
    spool: Spool,
    /// Most bytes of an archive downloaded.
    max_download: u64,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket.name())
            .field("endpoint", &self.bucket.base_url().as_str())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// The store `cfg` describes, objects under `prefix` (`Path`), with
    /// credentials from `cfg` else `env`, spooling in `spool`, refusing
    /// downloads over `max_download` bytes. Must be called inside a tokio
    /// runtime, which the transfers then use.
    pub fn open(
        cfg: &S3Config,
        prefix: &str,
        env: Option<&AwsCredentials>,
        spool: Spool,
        max_download: u64,
    ) -> Result<S3Store, S3Error> {
        if cfg.bucket_name.trim().is_empty() {
            return Err(S3Error::NoBucket);
        }
        let credentials = match (&cfg.access_key, &cfg.secret_key, env) {
            (Some(k), Some(s), _) if !k.is_empty() && !s.0.is_empty() => {
                match cfg.session_token.as_ref().filter(|t| !t.0.is_empty()) {
                    Some(t) => Credentials::new_with_token(k, &s.0, &t.0),
                    None => Credentials::new(k, &s.0),
                }
            }
            (_, _, Some(e)) if !e.access_key_id.is_empty() && !e.secret_access_key.0.is_empty() => {
                match &e.session_token {
                    Some(t) if !t.0.is_empty() => {
                        Credentials::new_with_token(&e.access_key_id, &e.secret_access_key.0, &t.0)
                    }
                    _ => Credentials::new(&e.access_key_id, &e.secret_access_key.0),
                }
            }
            _ => return Err(S3Error::NoCredentials),
        };
        let (endpoint, style) = endpoint(cfg)?;
        let region = cfg
            .bucket_location
            .clone()
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "us-east-1".into());
        let address = endpoint.as_str().to_string();
        let bucket = Bucket::new(endpoint, style, cfg.bucket_name.clone(), region)
            .map_err(|_| S3Error::Address(address))?;
        let handle = tokio::runtime::Handle::try_current().map_err(|_| S3Error::NoRuntime)?;
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .timeout(TRANSFER_TIMEOUT)
            // A presigned URL is for its own host only.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| S3Error::Request {
                op: "setting up",
                object: String::new(),
                bucket: cfg.bucket_name.clone(),
                reason: reason(&e),
            })?;
        Ok(S3Store {
            bucket,
            credentials,
            prefix: prefix.trim_matches('/').to_string(),
            client,
            handle,
            spool,
            max_download,
        })
    }

    pub fn bucket(&self) -> &str {
        self.bucket.name()
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// The object of `key` in `namespace`.
    pub fn object(&self, namespace: &str, key: &str) -> Result<String, S3Error> {
        object_name(&self.prefix, namespace, key)
    }

    /// Run `f`'s future to its end on the daemon's runtime, from blocking
    /// code. A thread of its own is never inside the runtime, so this cannot
    /// panic whatever thread calls it.
    fn block_on<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| self.handle.block_on(f))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Download `object` into `to`: its size, or `None` when the bucket
    /// has no such object (a cache miss). Blocking.
    pub fn download(&self, object: &str, to: &Path) -> Result<Option<u64>, S3Error> {
        self.block_on(self.download_async(object, to))
    }

    /// Upload the file `from` as `object`: its size. Blocking.
    pub fn upload(&self, from: &Path, object: &str) -> Result<u64, S3Error> {
        self.block_on(self.upload_async(from, object))
    }

    fn request_error(&self, op: &'static str, object: &str, reason: String) -> S3Error {
        S3Error::Request {
            op,
            object: object.to_string(),
            bucket: self.bucket.name().to_string(),
            reason,
        }
    }

    async fn download_async(&self, object: &str, to: &Path) -> Result<Option<u64>, S3Error> {
        let op = "downloading";
        let url = self
            .bucket
            .get_object(Some(&self.credentials), object)
            .sign(URL_EXPIRY);
        let mut resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| self.request_error(op, object, reason(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let code = error_code(&mut resp).await;
            // A missing bucket is a configuration error, not a miss.
            if status == StatusCode::NOT_FOUND && code.as_deref() != Some("NoSuchBucket") {
                return Ok(None);
            }
            return Err(self.request_error(op, object, status_reason(status, code)));
        }
        let too_large = || S3Error::TooLarge {
            object: object.to_string(),
            bucket: self.bucket.name().to_string(),
            max: self.max_download,
        };
        if resp.content_length().is_some_and(|n| n > self.max_download) {
            return Err(too_large());
        }
        let io_err = |source| S3Error::Io {
            path: to.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::create(to).await.map_err(io_err)?;
        let mut got: u64 = 0;
        loop {
            let chunk = resp
                .chunk()
                .await
                .map_err(|e| self.request_error(op, object, reason(&e)))?;
            let Some(chunk) = chunk else { break };
            got = got.saturating_add(chunk.len() as u64);
            // A server may send more than it announced, or announce nothing.
            if got > self.max_download {
                return Err(too_large());
            }
            file.write_all(&chunk).await.map_err(io_err)?;
        }
        file.flush().await.map_err(io_err)?;
        Ok(Some(got))
    }

    async fn upload_async(&self, from: &Path, object: &str) -> Result<u64, S3Error> {
        let op = "uploading";
        let io_err = |source| S3Error::Io {
            path: from.to_path_buf(),
            source,
        };
        let file = tokio::fs::File::open(from).await.map_err(io_err)?;
        let size = file.metadata().await.map_err(io_err)?.len();
        let url = self
            .bucket
            .put_object(Some(&self.credentials), object)
            .sign(URL_EXPIRY);
        // S3 wants the length of a streamed body up front.
        let mut resp = self
            .client
            .put(url)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .header(reqwest::header::CONTENT_TYPE, "application/gzip")
            .body(reqwest::Body::from(file))
            .send()
            .await
            .map_err(|e| self.request_error(op, object, reason(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let code = error_code(&mut resp).await;
            return Err(self.request_error(op, object, status_reason(status, code)));
        }
        Ok(size)
    }
}

/// The endpoint URL and URL style of `cfg`, as gitlab-runner derives them.
fn endpoint(cfg: &S3Config) -> Result<(Url, UrlStyle), S3Error> {
    let region = cfg.bucket_location.as_deref().unwrap_or("us-east-1");
    let address = match cfg.server_address.as_deref().map(str::trim) {
        Some(a) if !a.is_empty() => a.to_string(),
        _ if region.is_empty() || region == "us-east-1" => "s3.amazonaws.com".into(),
        _ => format!("s3.{region}.amazonaws.com"),
    };
    // A host[:port], nothing else (no scheme, path, user or query).
    if address.contains(['/', '@', '?', '#', ' ']) {
        return Err(S3Error::Address(address));
    }
    let scheme = if cfg.insecure { "http" } else { "https" };
    let url: Url = format!("{scheme}://{address}")
        .parse()
        .map_err(|_| S3Error::Address(address.clone()))?;
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let path_style = cfg.path_style.unwrap_or_else(|| {
        let cloud = host.ends_with("amazonaws.com") || host.ends_with("googleapis.com");
        // A dotted bucket name does not fit a TLS wildcard certificate.
        let dotted_over_tls = scheme == "https" && cfg.bucket_name.contains('.');
        let virtual_host = cloud && !dotted_over_tls;
        !virtual_host
    });
    let style = if path_style {
        UrlStyle::Path
    } else {
        UrlStyle::VirtualHost
    };
    Ok((url, style))
}

/// A transport error's message and causes, without its URL.
fn reason(e: &reqwest::Error) -> String {
    let mut s = String::new();
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    let mut first = true;
    while let Some(err) = cur {
        let text = if first {
            // `reqwest::Error`'s Display names the URL: left out.
            let mut t = if e.is_timeout() {
                "timed out".to_string()
            } else if e.is_connect() {
                "cannot connect".to_string()
            } else {
                "request failed".to_string()
            };
            if let Some(st) = e.status() {
                t = format!("{t} (HTTP {st})");
            }
            t
        } else {
            err.to_string()
        };
        if !s.is_empty() {
            s.push_str(": ");
        }
        s.push_str(&text);
        first = false;
        cur = err.source();
    }
    // Belt and braces: no query string of a presigned URL gets through.
    match s.find("X-Amz-") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn status_reason(status: StatusCode, code: Option<String>) -> String {
    match code {
        Some(c) => format!("the server answered {status} ({c})"),
        None => format!("the server answered {status}"),
    }
}

/// The S3 error code (`<Code>AccessDenied</Code>`) of an error response,
/// read from at most [`MAX_ERROR_BODY`] bytes of it.
async fn error_code(resp: &mut reqwest::Response) -> Option<String> {
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY {
        match resp.chunk().await {
            Ok(Some(c)) => {
                let n = c.len().min(MAX_ERROR_BODY - body.len());
                body.extend_from_slice(&c[..n]);
            }
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&body);
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    let code: String = text[start..start + len]
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(64)
        .collect();
    (!code.is_empty()).then_some(code)
}

#[cfg(test)]
mod tests;
