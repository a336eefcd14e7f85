//! How images are pulled, converted and cached: [`ImagesOptions`].
//!
//! The library reads no environment variable. Each setting has one, named
//! in [`vars`]; [`ImagesOptions::from_vars`] turns their values into
//! options, given a lookup the edge provides (the `kiln` binary passes
//! `std::env::var_os`; tests pass their own).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::apply::Limits;
use crate::registry::RegistryConfig;
use crate::rootfs::RootfsFormat;
use crate::store::DEFAULT_MAX_BYTES;

/// The environment variables [`ImagesOptions::from_vars`] reads.
pub mod vars {
    /// `erofs` or `ext4`: [`ImagesOptions::rootfs_format`](super::ImagesOptions::rootfs_format).
    pub const ROOTFS_FS: &str = "KILN_ROOTFS_FS";
    /// GiB, fractions allowed: [`ImagesOptions::cache_max_bytes`](super::ImagesOptions::cache_max_bytes).
    pub const CACHE_MAX_GB: &str = "KILN_CACHE_MAX_GB";
    /// GiB, fractions allowed: the uncompressed size of an image and of a
    /// layer ([`Limits::max_image_bytes`](crate::apply::Limits::max_image_bytes),
    /// [`Limits::max_layer_bytes`](crate::apply::Limits::max_layer_bytes)).
    pub const IMAGE_MAX_GB: &str = "KILN_IMAGE_MAX_GB";
    /// [`Limits::max_entries`](crate::apply::Limits::max_entries).
    pub const IMAGE_MAX_ENTRIES: &str = "KILN_IMAGE_MAX_ENTRIES";
    /// Seconds: [`RegistryConfig::tag_ttl`](crate::RegistryConfig::tag_ttl).
    pub const IMAGE_TAG_TTL: &str = "KILN_IMAGE_TAG_TTL";
    /// A kiln registries file (docker `auths` format, plus `insecure`).
    pub const REGISTRY_CONFIG: &str = "KILN_REGISTRY_CONFIG";
    /// Docker's configuration directory (`config.json` in it).
    pub const DOCKER_CONFIG: &str = "DOCKER_CONFIG";
    /// Where `~/.docker` is, without `DOCKER_CONFIG`.
    pub const HOME: &str = "HOME";
}

/// Settings of an [`Images`](crate::Images) service.
#[derive(Debug, Clone)]
pub struct ImagesOptions {
    /// What root images are built as; `None`: erofs when `mkfs.erofs` is
    /// installed, else ext4 ([`RootfsFormat::detect`]).
    pub rootfs_format: Option<RootfsFormat>,
    /// Size the cache is pruned to (least recently used first) after a
    /// registry pull. Default 20 GiB.
    pub cache_max_bytes: u64,
    /// Bounds on what an image may make kiln do.
    pub limits: Limits,
    /// Registry credentials, insecure registries, retries, tag TTL.
    pub registry: RegistryConfig,
}

impl Default for ImagesOptions {
    fn default() -> ImagesOptions {
        ImagesOptions {
            rootfs_format: None,
            cache_max_bytes: DEFAULT_MAX_BYTES,
            limits: Limits::default(),
            registry: RegistryConfig::default(),
        }
    }
}

impl ImagesOptions {
    /// The defaults, with the variables of [`vars`] that `var` has applied:
    /// `KILN_ROOTFS_FS`, `KILN_CACHE_MAX_GB`, `KILN_IMAGE_MAX_GB`,
    /// `KILN_IMAGE_MAX_ENTRIES`, `KILN_IMAGE_TAG_TTL`, and registry
    /// credentials from `$DOCKER_CONFIG/config.json` (else
    /// `$HOME/.docker/config.json`) and from `$KILN_REGISTRY_CONFIG`, which
    /// wins. Unusable values are ignored with a warning.
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> ImagesOptions {
        let text = |name: &str| var(name).map(|v| v.to_string_lossy().trim().to_string());
        let mut o = ImagesOptions::default();
        if let Some(v) = text(vars::ROOTFS_FS) {
            o.rootfs_format = RootfsFormat::parse(&v);
        }
        if let Some(v) = text(vars::CACHE_MAX_GB) {
            // As before: anything that is not a number means the default.
            if let Ok(gb) = v.parse::<f64>() {
                o.cache_max_bytes = gib(gb);
            }
        }
        if let Some(v) = text(vars::IMAGE_MAX_GB) {
            match v.parse::<f64>() {
                Ok(gb) if gb.is_finite() && gb > 0.0 => {
                    o.limits.max_image_bytes = gib(gb);
                    o.limits.max_layer_bytes = gib(gb);
                }
                _ => tracing::warn!("ignoring KILN_IMAGE_MAX_GB={v:?}: not a positive number"),
            }
        }
        if let Some(v) = text(vars::IMAGE_MAX_ENTRIES) {
            match v.parse::<u64>() {
                Ok(n) if n > 0 => o.limits.max_entries = n,
                _ => {
                    tracing::warn!("ignoring KILN_IMAGE_MAX_ENTRIES={v:?}: not a positive integer")
                }
            }
        }
        if let Some(ttl) = text(vars::IMAGE_TAG_TTL).and_then(|s| s.parse().ok()) {
            o.registry.tag_ttl = Duration::from_secs(ttl);
        }
        let docker = var(vars::DOCKER_CONFIG)
            .map(PathBuf::from)
            .or_else(|| var(vars::HOME).map(|h| PathBuf::from(h).join(".docker")))
            .map(|d| d.join("config.json"));
        let kiln = var(vars::REGISTRY_CONFIG).map(PathBuf::from);
        for path in docker.into_iter().chain(kiln) {
            if path.is_file() {
                if let Err(e) = o.registry.load_auth_file(&path) {
                    tracing::warn!("ignoring registry credentials in {}: {e}", path.display());
                }
            }
        }
        o
    }
}

fn gib(gb: f64) -> u64 {
    (gb * (1u64 << 30) as f64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_become_options() {
        let t = tempfile::tempdir().unwrap();
        let auth = t.path().join("registries.json");
        std::fs::write(
            &auth,
            r#"{"auths":{"r.example:5000":{"username":"u","password":"p"}},"insecure":["r.example:5000"]}"#,
        )
        .unwrap();
        let env = [
            ("KILN_ROOTFS_FS", "ext4".into()),
            ("KILN_CACHE_MAX_GB", "0.5".into()),
            ("KILN_IMAGE_MAX_GB", "1".into()),
            ("KILN_IMAGE_MAX_ENTRIES", "77".into()),
            ("KILN_IMAGE_TAG_TTL", "9".into()),
            ("KILN_REGISTRY_CONFIG", auth.clone().into_os_string()),
            ("HOME", t.path().join("nohome").into_os_string()),
        ];
        let o = ImagesOptions::from_vars(|k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v): &(&str, OsString)| v.clone())
        });
        assert_eq!(o.rootfs_format, Some(RootfsFormat::Ext4));
        assert_eq!(o.cache_max_bytes, 512 << 20);
        assert_eq!(o.limits.max_image_bytes, 1 << 30);
        assert_eq!(o.limits.max_layer_bytes, 1 << 30);
        assert_eq!(o.limits.max_entries, 77);
        assert_eq!(o.registry.tag_ttl, Duration::from_secs(9));
        assert!(o.registry.insecure.contains("r.example:5000"));
        assert!(o.registry.auths.contains_key("r.example:5000"));

        let none = ImagesOptions::from_vars(|_| None);
        assert_eq!(none.rootfs_format, None);
        assert_eq!(none.cache_max_bytes, DEFAULT_MAX_BYTES);
        assert_eq!(none.limits, Limits::default());
        let bad = ImagesOptions::from_vars(|k| (k == "KILN_IMAGE_MAX_GB").then(|| "-1".into()));
        assert_eq!(bad.limits, Limits::default());
    }
}
