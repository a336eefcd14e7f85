//! Settings kiln takes from its environment, read in one place, at the
//! edge: the libraries read none.

use std::path::PathBuf;

use kiln_images::ImagesOptions;

/// The image settings (`KILN_ROOTFS_FS`, `KILN_CACHE_MAX_GB`,
/// `KILN_IMAGE_MAX_GB`, `KILN_IMAGE_MAX_ENTRIES`, `KILN_IMAGE_TAG_TTL`,
/// `KILN_REGISTRY_CONFIG`, `DOCKER_CONFIG`/`HOME`; see
/// [`kiln_images::options::vars`] and docs/images.md) from the environment.
pub fn images_options_from_env() -> ImagesOptions {
    ImagesOptions::from_vars(|name| std::env::var_os(name))
}

/// The cache directory when none is configured: `$KILN_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kiln");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache").join("kiln")
}
