//! Bounds on everything an image controls.
//!
//! A layer is a few bytes that claim sizes: a header says a name is 1.5 GiB
//! long, a sparse map says a file is 2 TiB, a gzip stream unpacks a
//! thousandfold. Every such size is checked against one of these limits
//! *before* anything is allocated or written for it, and the counters in
//! [`Budget`] span all the layers of one image.

use std::cell::Cell;

use super::ApplyError;

/// The limits an image is converted under. [`Limits::default`] fits real
/// images (the largest public ones unpack to ~20 GB and ~500k files);
/// [`ImagesOptions::from_vars`](crate::ImagesOptions::from_vars) lets users
/// raise the two they may need to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Uncompressed tar bytes of all layers together: what gunzip or unzstd
    /// produce, headers and padding included (holes of sparse files are not
    /// in the stream, so they do not count). Default 32 GiB;
    /// `KILN_IMAGE_MAX_GB` sets it.
    pub max_image_bytes: u64,
    /// Uncompressed tar bytes of one layer. Default 32 GiB; also set by
    /// `KILN_IMAGE_MAX_GB`.
    pub max_layer_bytes: u64,
    /// Bytes of holes in the sparse files of an image: they take no disk
    /// space on the host, but the file system builder walks them
    /// (`mkfs.erofs` 1.5 reads them, ~6 s per GiB here). Default 8 GiB.
    pub max_hole_bytes: u64,
    /// Tar members of all layers together (files, directories, links, hard
    /// links, whiteouts, and extension headers such as PAX ones). Default
    /// 1,048,576; `KILN_IMAGE_MAX_ENTRIES` sets it.
    pub max_entries: u64,
    /// Layers of one image. Default 256 (Docker stops at 127).
    pub max_layers: usize,
    /// Bytes of one path or link target (`PATH_MAX`). Default 4096.
    pub max_path_bytes: usize,
    /// Components of one path. Default 256.
    pub max_path_depth: usize,
    /// Path and link target bytes of one layer together: the applier
    /// remembers what a layer created (for its whiteouts) until the layer
    /// ends, so this bounds its memory. Default 256 MiB.
    pub max_layer_name_bytes: u64,
    /// Bytes of one PAX extended header. Default 1 MiB, as Go's
    /// `archive/tar`.
    pub max_pax_bytes: u64,
    /// Records in one PAX extended header. Default 4096.
    pub max_pax_records: usize,
    /// Data segments in one sparse file's map. Default 65,536.
    pub max_sparse_segments: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_image_bytes: 32 << 30,
            max_layer_bytes: 32 << 30,
            max_hole_bytes: 8 << 30,
            max_entries: 1 << 20,
            max_layers: 256,
            max_path_bytes: 4096,
            max_path_depth: 256,
            max_layer_name_bytes: 256 << 20,
            max_pax_bytes: 1 << 20,
            max_pax_records: 4096,
            max_sparse_segments: 1 << 16,
        }
    }
}

/// A limit that was exceeded, for [`ApplyError::LimitExceeded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// [`Limits::max_image_bytes`].
    ImageBytes,
    /// [`Limits::max_layer_bytes`].
    LayerBytes,
    /// [`Limits::max_hole_bytes`].
    HoleBytes,
    /// [`Limits::max_entries`].
    Entries,
    /// [`Limits::max_path_bytes`], for a GNU long name or long link header.
    LongName,
    /// [`Limits::max_path_bytes`].
    PathBytes,
    /// [`Limits::max_path_depth`].
    PathDepth,
    /// [`Limits::max_layer_name_bytes`].
    LayerNameBytes,
    /// [`Limits::max_pax_bytes`].
    PaxBytes,
    /// [`Limits::max_pax_records`].
    PaxRecords,
    /// [`Limits::max_sparse_segments`].
    SparseSegments,
}

impl Limit {
    /// What is limited, for messages.
    pub fn what(self) -> &'static str {
        match self {
            Limit::ImageBytes => "the image's uncompressed layers",
            Limit::LayerBytes => "the uncompressed layer",
            Limit::HoleBytes => "the holes of the image's sparse files",
            Limit::Entries => "the image's tar entries",
            Limit::LongName => "a GNU long name or long link header",
            Limit::PathBytes => "a path or link target",
            Limit::PathDepth => "a path's components",
            Limit::LayerNameBytes => "the layer's paths and link targets together",
            Limit::PaxBytes => "a PAX extended header",
            Limit::PaxRecords => "the records of a PAX extended header",
            Limit::SparseSegments => "a sparse file's map",
        }
    }

    /// The unit of the limit.
    pub fn unit(self) -> &'static str {
        match self {
            Limit::Entries => "entries",
            Limit::PathDepth => "components",
            Limit::PaxRecords => "records",
            Limit::SparseSegments => "segments",
            _ => "bytes",
        }
    }

    /// How to raise the limit, where users may.
    pub fn hint(self) -> &'static str {
        match self {
            Limit::ImageBytes | Limit::LayerBytes => {
                "; set KILN_IMAGE_MAX_GB to allow bigger images"
            }
            Limit::Entries => "; set KILN_IMAGE_MAX_ENTRIES to allow more",
            _ => "",
        }
    }
}

/// What one image has used of its [`Limits`] so far, across its layers.
///
/// Counters are cells: the reader that counts uncompressed bytes and the
/// applier that counts entries and holes share one budget in one thread.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    bytes: Cell<u64>,
    entries: Cell<u64>,
    holes: Cell<u64>,
}

impl Budget {
    /// A fresh budget for one image.
    pub fn new(limits: Limits) -> Budget {
        Budget {
            limits,
            bytes: Cell::new(0),
            entries: Cell::new(0),
            holes: Cell::new(0),
        }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Uncompressed bytes counted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    /// Tar members counted so far.
    pub fn entries(&self) -> u64 {
        self.entries.get()
    }

    /// Hole bytes of sparse files counted so far.
    pub fn holes(&self) -> u64 {
        self.holes.get()
    }

    /// Counts `n` uncompressed bytes.
    pub(crate) fn add_bytes(&self, n: u64) -> Result<(), ApplyError> {
        let total = self.bytes.get().saturating_add(n);
        self.bytes.set(total);
        check(Limit::ImageBytes, total, self.limits.max_image_bytes)
    }

    /// Counts one tar member.
    pub(crate) fn add_entry(&self) -> Result<(), ApplyError> {
        let total = self.entries.get().saturating_add(1);
        self.entries.set(total);
        check(Limit::Entries, total, self.limits.max_entries)
    }

    /// Counts `n` bytes of holes; nothing is counted when it fails.
    pub(crate) fn add_holes(&self, n: u64) -> Result<(), ApplyError> {
        let total = self.holes.get().saturating_add(n);
        check(Limit::HoleBytes, total, self.limits.max_hole_bytes)?;
        self.holes.set(total);
        Ok(())
    }
}

/// `Ok` if `found` ≤ `max`; for running totals (the error shows no
/// number of its own: the total stops where the limit is met).
pub(crate) fn check(limit: Limit, found: u64, max: u64) -> Result<(), ApplyError> {
    if found > max {
        Err(ApplyError::LimitExceeded {
            limit,
            claimed: None,
            max,
            at: String::new(),
        })
    } else {
        Ok(())
    }
}

/// `Ok` if `claimed`, a size some header or map claims, is ≤ `max`.
pub(crate) fn check_claim(limit: Limit, claimed: u64, max: u64) -> Result<(), ApplyError> {
    if claimed > max {
        Err(ApplyError::LimitExceeded {
            limit,
            claimed: Some(claimed),
            max,
            at: String::new(),
        })
    } else {
        Ok(())
    }
}
