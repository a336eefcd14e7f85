//! Applying OCI image layers to a directory.
//!
//! A layer is a tar "changeset" (image-spec `layer.md`): it adds, replaces
//! and, through whiteouts, deletes paths of the layers below it. This module
//! applies one uncompressed layer tar at a time to a directory that already
//! holds the lower layers, following these rules:
//!
//! - Every path is resolved *inside* the root, as if the root were `/`:
//!   absolute paths are taken relative to it, `..` components are refused,
//!   and symlinks left by lower layers (`etc -> /`, `x -> ../../..`) are
//!   followed with `openat2(RESOLVE_IN_ROOT)`, so they can never lead out.
//!   The final component is never followed: everything is done with `*at`
//!   system calls relative to the parent directory's descriptor, with
//!   `AT_SYMLINK_NOFOLLOW` / `O_NOFOLLOW`.
//! - Replacing an existing path: if both are directories only the attributes
//!   change, otherwise the old one (a whole tree, for a directory) is removed.
//! - `dir/.wh.NAME` deletes `dir/NAME` when it comes from a lower layer, and
//!   `dir/.wh..wh..opq` hides all lower children of `dir`, whatever its place
//!   in the tar; what this layer itself creates is kept in both cases.
//!   Whiteouts never appear in the result.
//! - Ownership is numeric (never looked up by name) and is applied only when
//!   running as root, like GNU tar's `--same-owner` default. Mode bits,
//!   including setuid, setgid and sticky, are set after the owner, because
//!   `chown` clears setuid. Extended attributes (`SCHILY.xattr.*` PAX records,
//!   including `security.capability`) are set after both, and directory
//!   modes and times are set in a final pass, after their contents.
//!
//! Everything a layer contains is treated as hostile. On error the root is
//! left half-applied; callers should apply into a scratch directory and
//! discard it on failure.

mod applier;
mod digest;
mod fsops;
mod path;

#[cfg(test)]
mod tests;

use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use digest::{chain_id, DiffIdReader};

/// Compression of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (RFC 1952), possibly several members.
    Gzip,
    /// Zstandard, possibly several frames.
    Zstd,
}

impl Compression {
    /// The compression a layer media type declares.
    ///
    /// Knows the OCI layer types (including the deprecated non-distributable
    /// ones) and the Docker schema 2 layer types.
    pub fn from_media_type(mt: &str) -> Result<Compression, ApplyError> {
        // Media types may carry parameters (`; foo=bar`); they do not change
        // the compression.
        let base = mt.split(';').next().unwrap_or("").trim();
        let compression = match base {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
            _ => return Err(ApplyError::UnsupportedMediaType(mt.to_owned())),
        };
        Ok(compression)
    }

    /// Guesses the compression from the first bytes of a blob (gzip and zstd
    /// magic numbers); anything else is taken to be a plain tar.
    pub fn sniff(first_bytes: &[u8]) -> Compression {
        if first_bytes.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if first_bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Wrap a layer blob reader in the right decompressor.
pub fn decompress<'a>(r: impl Read + 'a, c: Compression) -> Result<Box<dyn Read + 'a>, ApplyError> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r).map_err(|source| {
            ApplyError::Decompressor {
                kind: "zstd",
                source,
            }
        })?),
    })
}

/// What [`apply_layer`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Filesystem objects created or updated (whiteouts not included).
    pub entries: u64,
    /// Bytes of regular file contents written.
    pub bytes: u64,
    /// Whiteout entries seen, opaque ones included.
    pub whiteouts: u64,
}

/// Why applying a layer failed.
///
/// Messages name the failing entry; the underlying OS error, where there is
/// one, is the [`source`](std::error::Error::source), not repeated in the
/// message.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The media type is not a layer type this module knows.
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
    /// The decompressor could not be set up.
    #[error("failed to start the {kind} decompressor")]
    Decompressor {
        /// Which decompressor.
        kind: &'static str,
        /// The error it gave.
        #[source]
        source: io::Error,
    },
    /// The root directory could not be opened.
    #[error("failed to open the root directory {}", .path.display())]
    OpenRoot {
        /// The root given.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The tar stream could not be read or parsed.
    #[error("failed to read the layer tar {context}")]
    Read {
        /// Where in the stream it happened, e.g. `at entry "etc/passwd"`.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An entry's path is refused (e.g. it has a `..` component).
    #[error("layer entry {path:?}: unsafe path: {reason}")]
    UnsafePath {
        /// The entry's path as found in the tar.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry is malformed or cannot be applied as described.
    #[error("layer entry {path:?}: {reason}")]
    InvalidEntry {
        /// The entry's path as found in the tar.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry has a tar type flag this module does not apply.
    #[error("layer entry {path:?}: unsupported tar entry type {typeflag:?}")]
    UnsupportedEntryType {
        /// The entry's path as found in the tar.
        path: String,
        /// The type flag byte.
        typeflag: char,
    },
    /// A filesystem operation failed.
    #[error("layer entry {path:?}: failed to {op}")]
    Io {
        /// The entry's path as found in the tar (empty for the final pass
        /// over the root itself).
        path: String,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An extended attribute could not be set.
    #[error("layer entry {path:?}: failed to set extended attribute {name:?}")]
    Xattr {
        /// The entry's path as found in the tar.
        path: String,
        /// The attribute's name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// An expected DiffID is not of the form `sha256:<64 lowercase hex>`.
    #[error("invalid DiffID {0:?}: expected sha256:<64 lowercase hex digits>")]
    InvalidDigest(String),
    /// The uncompressed layer did not hash to the expected DiffID.
    #[error("layer DiffID mismatch: expected {expected}, got {actual}")]
    DiffIdMismatch {
        /// The DiffID the caller expected.
        expected: String,
        /// The DiffID of the stream that was applied.
        actual: String,
    },
}

/// Apply one uncompressed layer tar to the directory `root` (which holds the
/// lower layers already applied).
///
/// Reading stops at the tar's end-of-archive marker; use
/// [`apply_layer_verified`] to hash the whole stream.
pub fn apply_layer(root: &Path, tar: impl Read) -> Result<ApplyStats, ApplyError> {
    applier::Applier::open(root)?.run(tar)
}

/// Like [`apply_layer`], and also computes the layer's DiffID (the sha256 of
/// the whole uncompressed stream, read to EOF including the tar's trailing
/// padding), checking it against `expected_diff_id` when one is given.
///
/// The check can only happen after the layer has been applied: on a
/// [`ApplyError::DiffIdMismatch`] the root holds the unverified layer and must
/// be discarded.
pub fn apply_layer_verified(
    root: &Path,
    tar_reader: impl Read,
    expected_diff_id: Option<&str>,
) -> Result<(ApplyStats, String), ApplyError> {
    if let Some(expected) = expected_diff_id {
        if !digest::is_valid_sha256_digest(expected) {
            return Err(ApplyError::InvalidDigest(expected.to_owned()));
        }
    }
    let mut reader = DiffIdReader::new(tar_reader);
    let stats = apply_layer(root, &mut reader)?;
    let actual = reader.finish().map_err(|source| ApplyError::Read {
        context: "after its end-of-archive marker".to_owned(),
        source,
    })?;
    if let Some(expected) = expected_diff_id {
        if expected != actual {
            return Err(ApplyError::DiffIdMismatch {
                expected: expected.to_owned(),
                actual,
            });
        }
    }
    Ok((stats, actual))
}
