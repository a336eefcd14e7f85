//! What a pull fetches: the digest a tag points at, manifests and configs
//! (bounded, verified), and layer blobs streamed to a file (hashed, sized,
//! retried from the start on transient failures).

use std::io::Write;
use std::path::Path;

use reqwest::Method;
use sha2::{Digest, Sha256};

use super::client::{read_bounded, registry_err, status_err};
use super::{PullProgress, Registry, MANIFEST_ACCEPT, MAX_MANIFEST};
use crate::reference::Reference;
use crate::ImageError;

/// A fetched manifest or index.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: String,
}

impl Registry {
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
