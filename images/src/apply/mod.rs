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
//! - Sparse files keep their holes: data segments are written at their
//!   offsets and the file is extended with `ftruncate`, so a 2 GiB file with
//!   10 KB of data takes 10 KB on the host. Holes are not counted as data,
//!   but have a budget of their own ([`Limits::max_hole_bytes`]).
//!
//! Everything a layer contains is treated as hostile: every size it
//! controls is checked against [`Limits`] before anything is allocated or
//! written for it (see `tarstream.rs`). On error the root is left
//! half-applied; callers should apply into a scratch directory and discard it
//! on failure.

mod applier;
mod blob;
mod digest;
pub(crate) mod fsops;
mod limits;
mod path;
pub(crate) mod tarstream;

#[cfg(test)]
mod tests;

use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use digest::{chain_id, DiffIdReader};
pub use limits::{Budget, Limit, Limits};

use crate::quote;

pub use blob::{apply_blob_file, apply_blob_reader};

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
    /// Bytes of holes in sparse files, left as holes.
    pub holes: u64,
}

/// Why applying a layer failed.
///
/// Messages name the failing entry; the underlying OS error, where there is
/// one, is the [`source`](std::error::Error::source), not repeated in the
/// message.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The media type is not a layer type this module knows.
    #[error("unsupported layer media type {}", quote(.0))]
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
    /// The tar stream could not be read (a decompressor's error, an I/O
    /// error).
    #[error("failed to read the layer tar {context}")]
    Read {
        /// Where in the stream it happened, e.g. `at entry "etc/passwd"`.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The stream ends inside a header or an entry's contents.
    #[error("the layer tar ends unexpectedly {context}: the layer is truncated")]
    Truncated {
        /// Where, e.g. `in the contents of entry "etc/passwd"`.
        context: String,
    },
    /// The stream is not a valid tar.
    #[error("the layer is not a valid tar {context}: {reason}")]
    Malformed {
        /// Where, e.g. `after entry "etc/passwd"`.
        context: String,
        /// What is wrong.
        reason: String,
    },
    /// A size the layer controls is over one of the [`Limits`].
    #[error(
        "{} {}exceeds kiln's limit of {max} {}{}{}",
        .limit.what(),
        match .claimed { Some(c) => format!("({c} {}) ", .limit.unit()), None => String::new() },
        .limit.unit(),
        if .at.is_empty() { String::new() } else { format!(" ({})", .at) },
        .limit.hint()
    )]
    LimitExceeded {
        /// Which limit.
        limit: Limit,
        /// The size a header or map claimed, when the limit was met by one
        /// claim rather than by a running total.
        claimed: Option<u64>,
        /// The limit.
        max: u64,
        /// Where, e.g. `at entry "x"` (empty if unknown).
        at: String,
    },
    /// An entry's path is refused (e.g. it has a `..` component).
    #[error("layer entry {}: unsafe path: {reason}", quote(.path))]
    UnsafePath {
        /// The entry's path as found in the tar.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry is malformed or cannot be applied as described.
    #[error("layer entry {}: {reason}", quote(.path))]
    InvalidEntry {
        /// The entry's path as found in the tar.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry has a tar type flag this module does not apply.
    #[error("layer entry {}: unsupported tar entry type {typeflag:?}", quote(.path))]
    UnsupportedEntryType {
        /// The entry's path as found in the tar.
        path: String,
        /// The type flag byte.
        typeflag: char,
    },
    /// A filesystem operation failed.
    #[error("layer entry {}: failed to {op}", quote(.path))]
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
    #[error("layer entry {}: failed to set extended attribute {}", quote(.path), quote(.name))]
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
    #[error("invalid DiffID {}: expected sha256:<64 lowercase hex digits>", quote(.0))]
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

impl ApplyError {
    /// A limit error that does not yet say where it was hit, located `at`.
    pub(crate) fn located(self, at: impl FnOnce() -> String) -> ApplyError {
        match self {
            ApplyError::LimitExceeded {
                limit,
                claimed,
                max,
                at: here,
            } if here.is_empty() => ApplyError::LimitExceeded {
                limit,
                claimed,
                max,
                at: at(),
            },
            e => e,
        }
    }
}

/// Apply one uncompressed layer tar to the directory `root` (which holds the
/// lower layers already applied), under the default [`Limits`].
///
/// Reading stops at the tar's end-of-archive marker; use
/// [`apply_layer_verified`] to hash the whole stream.
pub fn apply_layer(root: &Path, tar: impl Read) -> Result<ApplyStats, ApplyError> {
    let budget = Budget::new(Limits::default());
    apply_layer_with(root, tar, &budget)
}

/// [`apply_layer`], counting against `budget` (shared by the layers of one
/// image).
pub fn apply_layer_with(
    root: &Path,
    tar: impl Read,
    budget: &Budget,
) -> Result<ApplyStats, ApplyError> {
    let counted = Counted::new(tar, budget);
    applier::Applier::open(root, budget)?
        .run(counted)
        .map(|(stats, _)| stats)
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
    let budget = Budget::new(Limits::default());
    apply_layer_verified_with(root, tar_reader, expected_diff_id, &budget)
}

/// [`apply_layer_verified`], counting against `budget` (shared by the layers
/// of one image). Every uncompressed byte counts, those after the
/// end-of-archive marker included.
pub fn apply_layer_verified_with(
    root: &Path,
    tar_reader: impl Read,
    expected_diff_id: Option<&str>,
    budget: &Budget,
) -> Result<(ApplyStats, String), ApplyError> {
    if let Some(expected) = expected_diff_id {
        if !digest::is_valid_sha256_digest(expected) {
            return Err(ApplyError::InvalidDigest(expected.to_owned()));
        }
    }
    let mut reader = DiffIdReader::new(Counted::new(tar_reader, budget));
    let (stats, end) = applier::Applier::open(root, budget)?.run(&mut reader)?;
    let actual = reader
        .finish()
        .map_err(|e| from_io(e, "after its end-of-archive marker".to_owned()))?;
    if let Some(expected) = expected_diff_id {
        if expected != actual {
            if end == tarstream::End::Eof {
                // What a layer cut at a header boundary looks like.
                return Err(ApplyError::Truncated {
                    context: format!(
                        "after {} entries, without the end-of-archive marker \
                         (and its DiffID {actual} is not the expected {expected})",
                        stats.entries + stats.whiteouts
                    ),
                });
            }
            return Err(ApplyError::DiffIdMismatch {
                expected: expected.to_owned(),
                actual,
            });
        }
    }
    Ok((stats, actual))
}

/// Counts the uncompressed bytes of a layer against its own limit and the
/// image's budget.
struct Counted<'b, R> {
    inner: R,
    budget: &'b Budget,
    bytes: u64,
}

impl<'b, R: Read> Counted<'b, R> {
    fn new(inner: R, budget: &'b Budget) -> Self {
        Counted {
            inner,
            budget,
            bytes: 0,
        }
    }
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes = self.bytes.saturating_add(n as u64);
        let max = self.budget.limits().max_layer_bytes;
        if self.bytes > max {
            return Err(io::Error::other(LimitHit(Limit::LayerBytes, max)));
        }
        if self.budget.add_bytes(n as u64).is_err() {
            let max = self.budget.limits().max_image_bytes;
            return Err(io::Error::other(LimitHit(Limit::ImageBytes, max)));
        }
        Ok(n)
    }
}

/// A limit met while reading, carried through `io::Error`.
#[derive(Debug)]
struct LimitHit(Limit, u64);

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} exceeds {} {}", self.0.what(), self.1, self.0.unit())
    }
}

impl std::error::Error for LimitHit {}

/// The error for an I/O error met while reading the layer `context`.
pub(crate) fn from_io(e: io::Error, context: String) -> ApplyError {
    if let Some(LimitHit(limit, max)) = e.get_ref().and_then(|i| i.downcast_ref::<LimitHit>()) {
        return ApplyError::LimitExceeded {
            limit: *limit,
            claimed: None,
            max: *max,
            at: context,
        };
    }
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return ApplyError::Truncated { context };
    }
    ApplyError::Read { context, source: e }
}
