//! Images for kiln's guests: the job image as a read-only root filesystem,
//! the guest kernel, and the initramfs that carries the agent.
//!
//! This crate knows nothing about VMs: it produces files (a vmlinux, a cpio,
//! an ext4 image) and the image's configuration.

use std::path::{Path, PathBuf};

pub mod apply;
pub mod archive;
pub mod cache;
pub mod initramfs;
pub mod kernel;
pub mod oci;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod scratch;
pub mod store;

pub use cache::Cache;
pub use initramfs::build_initramfs;
pub use kernel::Kernel;
pub use oci::ImageConfig;
pub use reference::Reference;
pub use registry::{PullProgress, RegistryConfig};
pub use rootfs::Rootfs;

/// Errors of this crate. Messages name the file or layer that failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is corrupt or unusable: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("{tool} failed: {detail}{}", if hint.is_empty() { String::new() } else { format!(" (hint: {hint})") })]
    Tool {
        tool: String,
        detail: String,
        hint: String,
    },
    #[error("image not found: {0}")]
    NotFound(String),
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("{reference}: {detail}")]
    Registry {
        reference: String,
        detail: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("layer {layer}")]
    Layer {
        layer: String,
        #[source]
        source: apply::ApplyError,
    },
}

impl ImageError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        ImageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}
