//! Images for kiln's guests: the job image as a read-only root filesystem,
//! the guest kernel, and the initramfs that carries the agent.
//!
//! This crate knows nothing about VMs: it produces files (a vmlinux, a cpio,
//! an ext4 image) and the image's configuration. It reads no environment
//! variable: its settings are [`ImagesOptions`].
//!
//! A job's image: [`ImageSource::parse_with`] (the string, checked against
//! the edge's [`ImagePolicy`]) → [`Images::rootfs`] (the one async path:
//! `pull` resolves and downloads, `archive`/`oci` read local images,
//! `apply` applies layers, `rootfs` builds and caches the file system).

use std::path::{Path, PathBuf};

pub mod apply;
pub mod archive;
pub mod cache;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod initramfs;
pub mod kernel;
pub mod oci;
pub mod options;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod scratch;
pub mod source;
pub mod store;

mod service;

pub use cache::Cache;
pub use initramfs::build_initramfs;
pub use kernel::Kernel;
pub use oci::ImageConfig;
pub use options::ImagesOptions;
pub use reference::Reference;
pub use registry::{NoProgress, PullProgress, Registry, RegistryConfig};
pub use rootfs::{Rootfs, RootfsFormat};
pub use service::Images;
pub use source::{ImagePolicy, ImageSource, Refusal};

/// Errors of this crate. Messages name the file or layer that failed; text
/// that comes from an image (names, digests, media types, registry bodies)
/// is shown truncated (see [`quote`]).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot {op} {}", trunc(&.path.to_string_lossy(), MAX_SHOWN_DETAIL))]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is corrupt or unusable: {}", trunc(.what, MAX_SHOWN), trunc(.detail, MAX_SHOWN_DETAIL))]
    Corrupt { what: String, detail: String },
    #[error("{tool} failed: {}{}", trunc(.detail, MAX_SHOWN_DETAIL), if hint.is_empty() { String::new() } else { format!(" (hint: {hint})") })]
    Tool {
        tool: String,
        detail: String,
        hint: String,
    },
    #[error("image not found: {}", trunc(.0, MAX_SHOWN_DETAIL))]
    NotFound(String),
    #[error("invalid image reference {}: {reason}", quote(.reference))]
    BadReference { reference: String, reason: String },
    #[error("image {} is refused: {refusal}", quote(.image))]
    Refused {
        image: String,
        refusal: source::Refusal,
    },
    #[error("{}: {}", trunc(.reference, MAX_SHOWN), trunc(.detail, MAX_SHOWN_DETAIL))]
    Registry {
        reference: String,
        detail: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("layer {}", trunc(.layer, MAX_SHOWN))]
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

/// How much of a name from an image an error message shows, in bytes.
pub const MAX_SHOWN: usize = 200;
/// How much of a longer text (a detail, a tool's output) an error message
/// shows, in bytes.
pub const MAX_SHOWN_DETAIL: usize = 600;

/// `s` for an error message: at most `max` bytes of it (cut at a character
/// boundary), followed by `…(N bytes)` when it was cut.
pub fn trunc(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &s[..end], s.len())
}

/// `s` quoted and escaped like `{:?}`, for an error message: at most
/// [`MAX_SHOWN`] bytes of the escaped text, followed by `…(N bytes)` when it
/// was cut. Escaping happens first, so control characters cannot make the
/// message longer than the bound.
pub fn quote(s: &str) -> String {
    quote_prefix(s, s.len())
}

/// [`quote`] for bytes, decoded as UTF-8 where they are (lossily elsewhere).
pub fn quote_bytes(b: &[u8]) -> String {
    // Only a prefix is decoded: `b` may be long.
    let prefix = &b[..b.len().min(MAX_SHOWN * 4)];
    quote_prefix(&String::from_utf8_lossy(prefix), b.len())
}

/// Quotes `s`, the start of a text of `len` bytes.
fn quote_prefix(s: &str, len: usize) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_SHOWN) + 24);
    out.push('"');
    for c in s.chars() {
        if out.len() >= MAX_SHOWN {
            out.push_str(&format!("\"…({len} bytes)"));
            return out;
        }
        out.extend(c.escape_debug());
    }
    out.push('"');
    if s.len() < len {
        out.push_str(&format!("…({len} bytes)"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_bounds_hostile_text() {
        assert_eq!(quote("etc/passwd"), "\"etc/passwd\"");
        let long = "a".repeat(10_000);
        let q = quote(&long);
        assert!(q.len() < MAX_SHOWN + 40, "{q}");
        assert!(q.ends_with("\"…(10000 bytes)"), "{q}");
        // Control characters are escaped before the cut.
        let ctl = "\u{1}".repeat(10_000);
        assert!(quote(&ctl).len() < MAX_SHOWN + 40);
        let q = quote_bytes(&vec![b'x'; 5_000_000]);
        assert!(
            q.len() < MAX_SHOWN + 40 && q.ends_with("(5000000 bytes)"),
            "{q}"
        );
        assert_eq!(quote_bytes(b"a\xffb"), "\"a\u{fffd}b\"");
        assert_eq!(trunc("short", 10), "short");
        let t = trunc(&"é".repeat(300), 201);
        assert!(
            t.starts_with(&"é".repeat(100)) && t.ends_with("…(600 bytes)"),
            "{t}"
        );
        let e = ImageError::Corrupt {
            what: "w".repeat(1 << 20),
            detail: "d".repeat(1 << 20),
        };
        assert!(e.to_string().len() < 1024);
    }
}
