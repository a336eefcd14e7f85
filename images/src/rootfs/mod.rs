//! Image -> read-only root filesystem image, cached by ChainID.
//!
//! Layers are applied in order into a scratch tree, then `mkfs.erofs` (or
//! `mkfs.ext4 -d`, see [`RootfsFormat`]) turns the tree into a read-only
//! image. Image and metadata are published by rename into
//! `rootfs/<chainid>.<fstype>{,.json}`; every VM of the image opens the same
//! file read-only. Where the layers come from is the caller's business
//! ([`crate::Images`]): this module only builds and looks up.
//!
//! - `format.rs`: the file systems and their `mkfs`.
//! - `build.rs`: the cache lookup and the locked, published build.

mod build;
mod format;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::oci::ImageConfig;

pub(crate) use build::check_layer_count;
pub use build::{build_rootfs_with, cached_rootfs};
pub use format::{make_erofs, make_ext4, RootfsFormat};

/// A root filesystem image ready to attach to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rootfs {
    pub image: PathBuf,
    pub fstype: String,
    pub chain_id: String,
    pub config: ImageConfig,
    /// Where the image came from (for messages).
    pub source: String,
}
