//! The rootfs cache: `rootfs/<chainid>.<fstype>{,.json}`, looked up by
//! ChainID and built once under a per-ChainID lock, published by rename.

use std::path::{Path, PathBuf};

use super::{Rootfs, RootfsFormat};
use crate::apply::{self, Budget, Limits};
use crate::cache::Cache;
use crate::oci::ImageConfig;
use crate::ImageError;

fn paths_for(cache: &Cache, chain_id: &str, format: RootfsFormat) -> (PathBuf, PathBuf) {
    let hex = chain_id.trim_start_matches("sha256:");
    let dir = cache.dir("rootfs");
    let fs = format.fstype();
    (
        dir.join(format!("{hex}.{fs}")),
        dir.join(format!("{hex}.{fs}.json")),
    )
}

fn load_cached(image: &Path, meta: &Path) -> Option<Rootfs> {
    if !image.is_file() {
        return None;
    }
    let r: Rootfs = serde_json::from_slice(&std::fs::read(meta).ok()?).ok()?;
    // Touch for LRU eviction.
    crate::store::touch(meta);
    crate::store::touch(image);
    Some(r)
}

/// The cached `format` rootfs of `chain_id`, if there is one (with
/// `config` and `label` as this image's own).
pub fn cached_rootfs(
    cache: &Cache,
    format: RootfsFormat,
    chain_id: &str,
    config: &ImageConfig,
    label: &str,
) -> Option<Rootfs> {
    let (image_path, meta_path) = paths_for(cache, chain_id, format);
    load_cached(&image_path, &meta_path).map(|r| Rootfs {
        source: label.to_string(),
        config: config.clone(),
        ..r
    })
}

/// Build (once, under a lock) the `format` rootfs of `config.diff_ids`: `apply`
/// applies the layers into the empty tree it is given, counting against the
/// budget it is given (the cache's [`Limits`](crate::apply::Limits), for this
/// one image). On any error nothing is left in the cache.
pub fn build_rootfs_with(
    cache: &Cache,
    format: RootfsFormat,
    config: &ImageConfig,
    label: &str,
    apply: impl FnOnce(&Path, &Budget) -> Result<(), ImageError>,
) -> Result<Rootfs, ImageError> {
    check_layer_count(cache.limits(), config.diff_ids.len(), label)?;
    let chain_id = apply::chain_id(&config.diff_ids);
    let (image_path, meta_path) = paths_for(cache, &chain_id, format);
    // The image is shared by every image with the same layers (same
    // ChainID); the config is each image's own, so it always comes from the
    // caller.
    let hit = |r: Rootfs| Rootfs {
        source: label.to_string(),
        config: config.clone(),
        ..r
    };
    if let Some(r) = load_cached(&image_path, &meta_path) {
        return Ok(hit(r));
    }
    let _lock = cache.lock(&format!(
        "rootfs-{}",
        chain_id.trim_start_matches("sha256:")
    ))?;
    if let Some(r) = load_cached(&image_path, &meta_path) {
        return Ok(hit(r));
    }
    let t0 = std::time::Instant::now();
    let tmp = cache.temp_dir("rootfs")?;
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).map_err(|e| ImageError::io("create", &tree, e))?;
    let budget = Budget::new(*cache.limits());
    apply(&tree, &budget)?;
    let t1 = std::time::Instant::now();
    let out = tmp.path().join(format!("rootfs.{}", format.fstype()));
    format.make_tree(&tree, &out, budget.holes() > 0)?;
    tracing::info!(
        "{label}: layers applied in {:.2} s, {} built in {:.2} s",
        (t1 - t0).as_secs_f64(),
        format.fstype(),
        t1.elapsed().as_secs_f64()
    );
    let rootfs = Rootfs {
        image: image_path.clone(),
        fstype: format.fstype().into(),
        chain_id: chain_id.clone(),
        config: config.clone(),
        source: label.to_string(),
    };
    let meta_tmp = tmp.path().join("rootfs.json");
    let json = serde_json::to_vec_pretty(&rootfs).map_err(|e| ImageError::Corrupt {
        what: "rootfs metadata".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(&meta_tmp, json).map_err(|e| ImageError::io("write", &meta_tmp, e))?;
    tmp.publish(&meta_tmp, &meta_path)?;
    tmp.publish(&out, &image_path)?;
    Ok(rootfs)
}

/// An error if an image has more layers than `limits` allow.
pub(crate) fn check_layer_count(
    limits: &Limits,
    layers: usize,
    label: &str,
) -> Result<(), ImageError> {
    let max = limits.max_layers;
    if layers > max {
        return Err(ImageError::Corrupt {
            what: label.to_string(),
            detail: format!("{layers} layers: more than the {max} kiln allows"),
        });
    }
    Ok(())
}
