//! GitLab `include: remote` for `kiln run-job`: each URL is fetched over
//! HTTP(S) with the HTTP client kiln already has (reqwest) and kept in
//! kiln's cache directory by URL (`<cache>/remote-includes/<sha256 of the
//! URL>.yml`), so that `--offline` can read it again without the network.
//!
//! The server is as untrusted as the file: only `http`/`https` URLs, and
//! redirects only to them (at most 5); the size is checked against
//! `max_file_bytes` from `Content-Length` before anything is read and again
//! while the body streams in; the whole request has a timeout. A failure
//! says what failed for that URL; the pipelines crate names the include
//! entry.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::executor::error_chain;

/// How long one remote include may take, connecting included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Redirects followed per include.
const MAX_REDIRECTS: usize = 5;

/// Why a remote include could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RemoteIncludeError {
    #[error("not an http:// or https:// URL; kiln fetches remote includes only over HTTP(S)")]
    Scheme,
    #[error("cannot reach the server: {0}")]
    Unreachable(String),
    #[error(
        "the server answered {0}; check the URL (GitLab needs it to be readable without a login)"
    )]
    Status(reqwest::StatusCode),
    #[error(
        "the server redirects to `{0}`, which kiln does not follow (only http:// and https://, \
         at most {MAX_REDIRECTS} redirects)"
    )]
    Redirect(String),
    #[error("it is larger than {max} bytes (max_file_bytes); the server sent or announced more")]
    TooLarge { max: u64 },
    #[error("it is not UTF-8 text")]
    NotText,
    #[error(
        "--offline: it is not in kiln's cache ({}); run once without --offline to fetch it",
        .0.display()
    )]
    NotCached(PathBuf),
    #[error("cannot read the cached copy {}: {source}", .path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Fetches remote includes and keeps them in the cache.
#[derive(Debug, Clone)]
pub struct RemoteFetcher {
    /// `<cache>/remote-includes`.
    dir: PathBuf,
    /// Read the cache only.
    offline: bool,
    max_bytes: u64,
    timeout: Duration,
}

impl RemoteFetcher {
    /// A fetcher that caches in `<cache_dir>/remote-includes`.
    pub fn new(cache_dir: &Path, offline: bool, max_bytes: u64) -> Self {
        RemoteFetcher {
            dir: cache_dir.join("remote-includes"),
            offline,
            max_bytes,
            timeout: FETCH_TIMEOUT,
        }
    }

    /// The same fetcher with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where `url` is cached.
    pub fn cache_path(&self, url: &str) -> PathBuf {
        let name = hex::encode(Sha256::digest(url.as_bytes()));
        self.dir.join(format!("{name}.yml"))
    }

    /// The text of `url`: from the server (then cached), or with
    /// `offline` from the cache only.
    pub fn fetch(&self, url: &str) -> Result<String, RemoteIncludeError> {
        self.fetch_with(url, None)
    }

    /// As [`fetch`](Self::fetch), sending `token` as `Authorization:
    /// Bearer` (marked sensitive: never logged, and dropped by the HTTP
    /// client on a redirect to another host or port). The cache is keyed by
    /// the URL alone: the token is never written anywhere.
    pub fn fetch_with(&self, url: &str, token: Option<&str>) -> Result<String, RemoteIncludeError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| RemoteIncludeError::Scheme)?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(RemoteIncludeError::Scheme);
        }
        let path = self.cache_path(url);
        if self.offline {
            return match kiln_pipelines::read_file(&path, self.max_bytes) {
                Ok(text) => {
                    tracing::debug!(url, path = %path.display(), "remote include from the cache");
                    Ok(text)
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Err(RemoteIncludeError::NotCached(path))
                }
                Err(source) => Err(RemoteIncludeError::Cache { path, source }),
            };
        }
        let text = self.download(parsed, token)?;
        if let Err(e) = self.store(&path, &text) {
            // The pipeline still loads; only --offline will miss it.
            tracing::warn!(url, path = %path.display(), "cannot cache a remote include: {e}");
        }
        Ok(text)
    }

    /// As [`fetch`](Self::fetch), for `Options::remote_includes`: the
    /// error as text, with a hint when a cached copy could stand in.
    pub fn hook(self) -> kiln_pipelines::RemoteIncludes {
        kiln_pipelines::RemoteIncludes::with(move |url| {
            self.fetch(url).map_err(|e| {
                let cached = !self.offline
                    && !matches!(e, RemoteIncludeError::Scheme)
                    && self.cache_path(url).is_file();
                match cached {
                    true => io::Error::other(format!(
                        "{e} (a copy fetched earlier is cached: --offline uses it)"
                    )),
                    false => io::Error::other(e.to_string()),
                }
            })
        })
    }

    fn download(
        &self,
        url: reqwest::Url,
        token: Option<&str>,
    ) -> Result<String, RemoteIncludeError> {
        let loopback = url.host_str().is_some_and(|h| {
            h == "localhost"
                || h.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback())
        });
        let mut builder = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::custom(|a| {
                if a.previous().len() >= MAX_REDIRECTS {
                    a.error(format!("more than {MAX_REDIRECTS} redirects"))
                } else if !matches!(a.url().scheme(), "http" | "https") {
                    let to = a.url().scheme().to_string();
                    a.error(format!(
                        "a redirect to a {to}: URL (only http and https are followed)"
                    ))
                } else {
                    a.follow()
                }
            }));
        if loopback {
            // A proxy cannot reach this machine's loopback.
            builder = builder.no_proxy();
        }
        let client = builder
            .build()
            .map_err(|e| RemoteIncludeError::Unreachable(error_chain(&e)))?;
        let max = self.max_bytes;
        let mut request = client.get(url);
        if let Some(token) = token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| {
                    RemoteIncludeError::Unreachable(
                        "the token has characters an HTTP header cannot carry".into(),
                    )
                })?;
            value.set_sensitive(true);
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let get = async move {
            let mut resp = request
                .send()
                .await
                .map_err(|e| RemoteIncludeError::Unreachable(error_chain(&e.without_url())))?;
            if resp.status().is_redirection() {
                // Not followed: reqwest leaves a redirect to another scheme
                // as the response.
                let to = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .map(|l| {
                        String::from_utf8_lossy(l.as_bytes())
                            .chars()
                            .take(200)
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(RemoteIncludeError::Redirect(to));
            }
            if !resp.status().is_success() {
                return Err(RemoteIncludeError::Status(resp.status()));
            }
            if resp.content_length().is_some_and(|n| n > max) {
                return Err(RemoteIncludeError::TooLarge { max });
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| RemoteIncludeError::Unreachable(error_chain(&e.without_url())))?
            {
                if (body.len() + chunk.len()) as u64 > max {
                    return Err(RemoteIncludeError::TooLarge { max });
                }
                body.extend_from_slice(&chunk);
            }
            String::from_utf8(body).map_err(|_| RemoteIncludeError::NotText)
        };
        // A runtime of its own, on a thread of its own: the pipeline is
        // loaded outside any runtime, but a caller inside one must not
        // block it.
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| RemoteIncludeError::Unreachable(e.to_string()))?;
                rt.block_on(get)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(RemoteIncludeError::Unreachable(
                    "the fetch thread panicked".into(),
                ))
            })
        })
    }

    /// Writes `text` to `path` through a temporary file, so that a reader
    /// sees the old copy or the new one.
    fn store(&self, path: &Path, text: &str) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_http::{ok, serve};
    use super::*;

    fn fetcher(dir: &Path, offline: bool) -> RemoteFetcher {
        RemoteFetcher::new(dir, offline, 1024).with_timeout(Duration::from_secs(20))
    }

    #[test]
    fn fetched_files_are_cached_and_offline_reads_the_cache() {
        let cache = tempfile::tempdir().unwrap();
        let server = serve(vec![("/t/build.yml", ok(".build:\n  script: make\n"))]);
        let url = format!("{}/t/build.yml", server.url);
        let text = fetcher(cache.path(), false).fetch(&url).unwrap();
        assert_eq!(text, ".build:\n  script: make\n");
        assert_eq!(*server.hits.lock().unwrap(), ["/t/build.yml"]);
        let cached = fetcher(cache.path(), false).cache_path(&url);
        assert_eq!(std::fs::read_to_string(&cached).unwrap(), text);
        drop(server);
        // The server is gone: --offline still reads it, from the cache.
        assert_eq!(fetcher(cache.path(), true).fetch(&url).unwrap(), text);
        // Online, the failure says that a cached copy exists.
        let e = fetcher(cache.path(), false).hook();
        let opts = kiln_pipelines::Options {
            remote_includes: e,
            ..Default::default()
        };
        let ctx = kiln_pipelines::LocalContext::new(cache.path(), "p");
        let err = kiln_pipelines::gitlab::parse(
            ".gitlab-ci.yml",
            &format!("include: {url}\n"),
            &ctx,
            &opts,
            &|_| Err(io::Error::other("no local files")),
        )
        .unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            chain.starts_with(&format!(
                ".gitlab-ci.yml: cannot read included file `{url}`: cannot reach the server:"
            )) && chain.contains("Connection refused"),
            "{chain}"
        );
        assert!(
            chain.ends_with("(a copy fetched earlier is cached: --offline uses it)"),
            "{chain}"
        );
        // Not cached: --offline says so and what to do.
        let other = format!("{url}.other");
        let e = fetcher(cache.path(), true).fetch(&other).unwrap_err();
        assert!(matches!(e, RemoteIncludeError::NotCached(_)), "{e}");
        assert!(
            e.to_string()
                .contains("run once without --offline to fetch it"),
            "{e}"
        );
    }

    #[test]
    fn oversize_files_are_refused_announced_or_streamed() {
        let cache = tempfile::tempdir().unwrap();
        let big = "x".repeat(2000);
        let server = serve(vec![
            ("/announced.yml", ok(&big)),
            (
                "/streamed.yml",
                format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{big}"),
            ),
        ]);
        for path in ["/announced.yml", "/streamed.yml"] {
            let e = fetcher(cache.path(), false)
                .fetch(&format!("{}{path}", server.url))
                .unwrap_err();
            assert!(
                matches!(e, RemoteIncludeError::TooLarge { max: 1024 }),
                "{path}: {e}"
            );
            assert!(e.to_string().contains("max_file_bytes"), "{e}");
        }
        // Nothing was cached.
        assert_eq!(
            std::fs::read_dir(cache.path())
                .map(|d| d.count())
                .unwrap_or(0),
            0
        );
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let cache = tempfile::tempdir().unwrap();
        let server = serve(Vec::new());
        let e = fetcher(cache.path(), false)
            .fetch(&format!("{}/gone.yml", server.url))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the server answered 404 Not Found; check the URL (GitLab needs it to be readable \
             without a login)"
        );
    }

    #[test]
    fn only_http_and_https_are_fetched_or_followed() {
        let cache = tempfile::tempdir().unwrap();
        for url in ["file:///etc/passwd", "ftp://127.0.0.1/x.yml", "not a url"] {
            let e = fetcher(cache.path(), false).fetch(url).unwrap_err();
            assert!(matches!(e, RemoteIncludeError::Scheme), "{url}: {e}");
        }
        let server = serve(vec![(
            "/moved.yml",
            "HTTP/1.1 302 Found\r\nLocation: file:///etc/passwd\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
                .into(),
        )]);
        let e = fetcher(cache.path(), false)
            .fetch(&format!("{}/moved.yml", server.url))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the server redirects to `file:///etc/passwd`, which kiln does not follow \
             (only http:// and https://, at most 5 redirects)"
        );
    }
}
