//! [`Images`]: the one way to a job's root filesystem.
//!
//! One async path for every source: network work (resolving, downloading)
//! runs on the runtime, and everything CPU- or disk-bound (opening a layout
//! or an image tar, applying the layers, `mkfs`, pruning) runs in a single
//! `spawn_blocking`. One registry client is shared by every job, so tokens
//! and connections are reused.

use std::path::PathBuf;
use std::sync::Arc;

use crate::apply::apply_blob_file;
use crate::archive::ArchiveImage;
use crate::cache::Cache;
use crate::oci::LayoutImage;
use crate::pull::{self, Downloads};
use crate::reference::Reference;
use crate::registry::{PullProgress, Registry};
use crate::rootfs::{self, Rootfs, RootfsFormat};
use crate::source::ImageSource;
use crate::{store, ImageError, ImagesOptions};

/// Images to root filesystems, with their cache and registry client. Cheap
/// to clone (clones share the registry client).
#[derive(Clone)]
pub struct Images {
    cache: Cache,
    registry: Registry,
    format: RootfsFormat,
    cache_max_bytes: u64,
}

impl Images {
    /// Open (creating what is missing) the cache at `cache_dir`.
    pub fn open(
        cache_dir: impl Into<PathBuf>,
        options: ImagesOptions,
    ) -> Result<Images, ImageError> {
        Images::new(Cache::open(cache_dir)?, options)
    }

    /// The service over `cache`, converting under `options.limits`.
    pub fn new(cache: Cache, options: ImagesOptions) -> Result<Images, ImageError> {
        Ok(Images {
            cache: cache.with_limits(options.limits),
            registry: Registry::new(options.registry)?,
            format: options.rootfs_format.unwrap_or_else(RootfsFormat::detect),
            cache_max_bytes: options.cache_max_bytes,
        })
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// What root images are built as.
    pub fn format(&self) -> RootfsFormat {
        self.format
    }

    /// The size the cache is pruned to after a registry pull.
    pub fn cache_max_bytes(&self) -> u64 {
        self.cache_max_bytes
    }

    /// The rootfs of `source`, built now if the cache does not have it. A
    /// registry tag resolved less than
    /// [`tag_ttl`](crate::RegistryConfig::tag_ttl) ago is not asked again.
    pub async fn rootfs(
        &self,
        source: &ImageSource,
        progress: Arc<dyn PullProgress>,
    ) -> Result<Rootfs, ImageError> {
        self.rootfs_inner(source, false, progress).await
    }

    /// [`rootfs`](Self::rootfs), always checking a registry tag with the
    /// registry (`kiln image pull`).
    pub async fn pull(
        &self,
        source: &ImageSource,
        progress: Arc<dyn PullProgress>,
    ) -> Result<Rootfs, ImageError> {
        self.rootfs_inner(source, true, progress).await
    }

    async fn rootfs_inner(
        &self,
        source: &ImageSource,
        force: bool,
        progress: Arc<dyn PullProgress>,
    ) -> Result<Rootfs, ImageError> {
        match source {
            ImageSource::Registry(r) => self.registry_rootfs(r, force, progress).await,
            local => {
                let (this, local) = (self.clone(), local.clone());
                blocking(local.label(), move || this.local_rootfs(&local)).await
            }
        }
    }

    /// Blocking: a layout directory or an image tar.
    fn local_rootfs(&self, source: &ImageSource) -> Result<Rootfs, ImageError> {
        let label = source.label();
        match source {
            ImageSource::Layout { dir, tag } => {
                let img = LayoutImage::open(dir, tag.as_deref())?;
                self.build(&img.config, &label, |tree, budget| {
                    img.apply_layers(tree, budget)
                })
            }
            ImageSource::Archive { path, tag } => {
                let img = ArchiveImage::open(path, tag.as_deref())?;
                self.build(&img.config, &label, |tree, budget| {
                    img.apply_layers(tree, budget)
                })
            }
            ImageSource::Registry(r) => Err(ImageError::NotFound(format!(
                "{r} is a registry image, not a local one"
            ))),
        }
    }

    fn build(
        &self,
        config: &crate::ImageConfig,
        label: &str,
        apply: impl FnOnce(&std::path::Path, &crate::apply::Budget) -> Result<(), ImageError>,
    ) -> Result<Rootfs, ImageError> {
        rootfs::build_rootfs_with(&self.cache, self.format, config, label, apply)
    }

    /// Resolve, download what is missing, and build while the downloads
    /// run: each layer is applied as soon as it and the ones below it are
    /// here.
    async fn registry_rootfs(
        &self,
        r: &Reference,
        force: bool,
        progress: Arc<dyn PullProgress>,
    ) -> Result<Rootfs, ImageError> {
        let img = pull::resolve(&self.cache, &self.registry, r, force).await?;
        let label = r.to_string();
        let chain_id = &img.record.chain_id;
        if let Some(rf) =
            rootfs::cached_rootfs(&self.cache, self.format, chain_id, &img.config, &label)
        {
            return Ok(rf);
        }
        // Before any download.
        rootfs::check_layer_count(self.cache.limits(), img.manifest.layers.len(), &label)?;
        let pinned = r.with_digest(&img.record.digest);
        let mut downloads = Downloads::start(
            &self.cache,
            &self.registry,
            &pinned,
            &img.manifest.layers,
            progress.clone(),
        );
        let this = self.clone();
        blocking(format!("rootfs of {label}"), move || {
            let rootfs = this.build(&img.config, &label, |tree, budget| {
                let layers = img.manifest.layers.iter().zip(&img.config.diff_ids);
                for (layer, diff_id) in layers {
                    let path = downloads.wait_next(layer)?;
                    progress.stage(&format!("applying layer {}", pull::short(&layer.digest)));
                    apply_blob_file(&path, layer, diff_id, tree, false, budget)?;
                }
                progress.stage("building the root filesystem");
                Ok(())
            })?;
            if let Err(e) = store::prune(&this.cache, false, Some(this.cache_max_bytes)) {
                tracing::warn!("cache eviction failed: {e}");
            }
            Ok(rootfs)
        })
        .await
    }
}

/// Run `f` on tokio's blocking pool; `what` names it if the task dies.
async fn blocking<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Corrupt {
            what,
            detail: format!("build task: {e}"),
        })?
}
