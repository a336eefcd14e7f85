//! Registry image → layer blobs in the cache: resolve the reference (tag →
//! digest once per pull, then everything by digest) and download the
//! layers concurrently into the shared blob store ([`Downloads`]), so that
//! the builder can apply each as soon as it and the ones below it are there.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::cache::Cache;
use crate::oci::{self, Descriptor, ImageConfig, Manifest};
use crate::reference::Reference;
use crate::registry::{FetchedManifest, PullProgress, Registry, MAX_MANIFEST};
use crate::rootfs;
use crate::store::{self, ImageRecord};
use crate::ImageError;

/// A reference resolved to one linux/amd64 image.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub record: ImageRecord,
    pub manifest: Manifest,
    pub config: ImageConfig,
}

fn from_record(cache: &Cache, r: &Reference, rec: &ImageRecord) -> Option<ResolvedImage> {
    let m = store::read_small_blob(cache, &rec.manifest)?;
    let manifest = oci::parse_manifest(&m, &rec.manifest).ok()?;
    let c = store::read_small_blob(cache, &rec.config)?;
    let config = oci::parse_image_config(&c, &rec.config, manifest.layers.len()).ok()?;
    if rec.reference != store::record_key(r) {
        return None;
    }
    Some(ResolvedImage {
        record: rec.clone(),
        manifest,
        config,
    })
}

async fn manifest_by_digest(
    cache: &Cache,
    reg: &Registry,
    r: &Reference,
    digest: &str,
) -> Result<FetchedManifest, ImageError> {
    if let Some(bytes) = store::read_small_blob(cache, digest) {
        return Ok(FetchedManifest {
            bytes,
            media_type: String::new(),
            digest: digest.to_string(),
        });
    }
    let m = reg.get_manifest(r, digest).await?;
    store::put_small_blob(cache, &m.digest, &m.bytes)?;
    Ok(m)
}

/// Resolve `r`. A tag recorded less than `tag_ttl` ago (or a pinned digest
/// already here) is used without asking the registry; otherwise the tag is
/// checked with a HEAD request, and only new manifests are downloaded.
/// `force`: always check the tag. If the registry cannot be reached and the
/// image is cached, the cached resolution is used (with a warning).
pub async fn resolve(
    cache: &Cache,
    reg: &Registry,
    r: &Reference,
    force: bool,
) -> Result<ResolvedImage, ImageError> {
    let old = store::load_record(cache, r);
    if let Some(rec) = &old {
        let age = store::now().saturating_sub(rec.resolved_at);
        let fresh = r.digest.is_some() || Duration::from_secs(age) < reg.config().tag_ttl;
        if fresh && !force {
            if let Some(img) = from_record(cache, r, rec) {
                tracing::debug!("{r}: cached resolution {} ({age} s old)", rec.digest);
                return Ok(img);
            }
        }
    }
    let mut top: Option<FetchedManifest> = None;
    let top_digest = match &r.digest {
        Some(d) => d.clone(),
        None => match reg.head_digest(r).await {
            Ok(Some(d)) => d,
            Ok(None) => {
                let m = reg.get_manifest(r, r.target()).await?;
                let d = m.digest.clone();
                top = Some(m);
                d
            }
            Err(e) => {
                if let Some(img) = old.as_ref().and_then(|rec| from_record(cache, r, rec)) {
                    tracing::warn!(
                        "{r}: cannot check the tag with the registry ({e}); using the cached {}",
                        img.record.digest
                    );
                    return Ok(img);
                }
                return Err(e);
            }
        },
    };
    if let Some(rec) = &old {
        if rec.digest == top_digest {
            if let Some(mut img) = from_record(cache, r, rec) {
                img.record.resolved_at = store::now();
                store::save_record(cache, &img.record)?;
                return Ok(img);
            }
        }
    }
    tracing::info!("{r}: resolved to {top_digest}");
    let pinned = r.with_digest(&top_digest);
    let top = match top {
        Some(m) => {
            store::put_small_blob(cache, &m.digest, &m.bytes)?;
            m
        }
        None => manifest_by_digest(cache, reg, &pinned, &top_digest).await?,
    };
    let (manifest_digest, manifest_bytes) = if oci::looks_like_index(&top.media_type, &top.bytes) {
        let list = oci::parse_index(&top.bytes, &format!("index {top_digest} of {r}"))?;
        let d = oci::select_platform(&list).ok_or_else(|| {
            let platforms: Vec<String> = list
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            ImageError::NotFound(format!(
                "{r}: no linux/amd64 image in the index (it has {})",
                platforms.join(", ")
            ))
        })?;
        if d.size > MAX_MANIFEST || !crate::reference::is_sha256_digest(&d.digest) {
            return Err(ImageError::Corrupt {
                what: format!("index {top_digest} of {r}"),
                detail: format!(
                    "unusable manifest descriptor {} ({} bytes)",
                    d.digest, d.size
                ),
            });
        }
        let m = manifest_by_digest(cache, reg, &pinned, &d.digest).await?;
        (d.digest.clone(), m.bytes)
    } else {
        (top_digest.clone(), top.bytes)
    };
    let manifest = oci::parse_manifest(
        &manifest_bytes,
        &format!("manifest {manifest_digest} of {r}"),
    )?;
    // Before the config is fetched and the image recorded.
    rootfs::check_layer_count(cache.limits(), manifest.layers.len(), &r.to_string())?;
    let config_bytes = match store::read_small_blob(cache, &manifest.config.digest) {
        Some(b) => b,
        None => {
            let b = reg
                .get_small_blob(&pinned, &manifest.config.digest, manifest.config.size)
                .await?;
            store::put_small_blob(cache, &manifest.config.digest, &b)?;
            b
        }
    };
    let config = oci::parse_image_config(
        &config_bytes,
        &format!("config {} of {r}", manifest.config.digest),
        manifest.layers.len(),
    )?;
    let record = ImageRecord {
        reference: store::record_key(r),
        digest: top_digest,
        manifest: manifest_digest,
        config: manifest.config.digest.clone(),
        layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
        size: manifest
            .layers
            .iter()
            .fold(0u64, |total, l| total.saturating_add(l.size)),
        chain_id: crate::apply::chain_id(&config.diff_ids),
        resolved_at: store::now(),
    };
    store::save_record(cache, &record)?;
    Ok(ResolvedImage {
        record,
        manifest,
        config,
    })
}

/// Make sure the layer blob is in the cache, verified; one download per
/// blob however many pulls want it (per-blob lock).
async fn ensure_blob(
    cache: Cache,
    reg: Registry,
    r: Reference,
    layer: Descriptor,
    progress: Arc<dyn PullProgress>,
    slots: Arc<tokio::sync::Semaphore>,
) -> Result<PathBuf, ImageError> {
    let d = &layer.digest;
    let cached = |p: PathBuf| {
        progress.layer_start(d, layer.size, true);
        progress.layer_done(d);
        Ok(p)
    };
    if let Some(p) = store::present_blob(&cache, d, layer.size) {
        return cached(p);
    }
    let key = format!("blob-{}", d.trim_start_matches("sha256:"));
    let _lock = loop {
        if let Some(l) = cache.try_lock(&key)? {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if let Some(p) = store::present_blob(&cache, d, layer.size) {
        return cached(p);
    }
    let _slot = slots.acquire().await.map_err(|e| ImageError::Corrupt {
        what: "download slots".into(),
        detail: e.to_string(),
    })?;
    progress.layer_start(d, layer.size, false);
    let tmp = cache.temp_dir("blob")?;
    let file = tmp.path().join("data");
    reg.download_blob(&r, d, layer.size, &file, progress.as_ref())
        .await?;
    let dest = store::blob_path(&cache, d)?;
    tmp.publish(&file, &dest)?;
    progress.layer_done(d);
    tracing::debug!("{r}: layer {d} downloaded ({} bytes)", layer.size);
    Ok(dest)
}

/// The layer downloads of one image, in flight on the runtime, base
/// first. Dropping it aborts those still running.
pub struct Downloads {
    pending: std::collections::VecDeque<oneshot::Receiver<Result<PathBuf, ImageError>>>,
    aborts: Vec<tokio::task::AbortHandle>,
}

impl Downloads {
    /// Start downloading what the cache lacks of `layers` (of `r`, pinned
    /// to a digest), at most [`RegistryConfig::max_concurrent_downloads`]
    /// at once. Must be called on a tokio runtime.
    ///
    /// [`RegistryConfig::max_concurrent_downloads`]: crate::RegistryConfig::max_concurrent_downloads
    pub fn start(
        cache: &Cache,
        reg: &Registry,
        r: &Reference,
        layers: &[Descriptor],
        progress: Arc<dyn PullProgress>,
    ) -> Downloads {
        let slots = Arc::new(tokio::sync::Semaphore::new(
            reg.config().max_concurrent_downloads.max(1),
        ));
        let mut d = Downloads {
            pending: Default::default(),
            aborts: Vec::new(),
        };
        for layer in layers {
            let (tx, rx) = oneshot::channel();
            let download = ensure_blob(
                cache.clone(),
                reg.clone(),
                r.clone(),
                layer.clone(),
                progress.clone(),
                slots.clone(),
            );
            let h = tokio::spawn(async move {
                let _ = tx.send(download.await);
            });
            d.aborts.push(h.abort_handle());
            d.pending.push_back(rx);
        }
        d
    }

    /// The path of the next layer (base first) once it is in the cache.
    /// Blocking: for the thread that applies the layers, never an async
    /// task.
    pub fn wait_next(&mut self, layer: &Descriptor) -> Result<PathBuf, ImageError> {
        let gone = || ImageError::Corrupt {
            what: format!("layer {}", layer.digest),
            detail: "the download task ended without a result".into(),
        };
        let rx = self.pending.pop_front().ok_or_else(gone)?;
        rx.blocking_recv().map_err(|_| gone())?
    }
}

impl Drop for Downloads {
    fn drop(&mut self) {
        for a in &self.aborts {
            a.abort();
        }
    }
}

/// `sha256:0123456789ab`.
pub fn short(digest: &str) -> &str {
    &digest[..digest.len().min(19)]
}
