//! The file systems a root image is built as: uncompressed EROFS
//! (`mkfs.erofs`) or journal-less ext4 (`mkfs.ext4 -d`), made from a tree.

use std::path::Path;
use std::process::Command;

use crate::ImageError;

/// The filesystem root images are built as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsFormat {
    /// Uncompressed EROFS (`mkfs.erofs`): about twice as fast to build as
    /// ext4 and needs no size guess (docs/images.md). The default.
    Erofs,
    /// Journal-less ext4 (`mkfs.ext4 -d`).
    Ext4,
}

impl RootfsFormat {
    /// `erofs` or `ext4` (the values of `KILN_ROOTFS_FS`).
    pub fn parse(s: &str) -> Option<RootfsFormat> {
        match s {
            "erofs" => Some(RootfsFormat::Erofs),
            "ext4" => Some(RootfsFormat::Ext4),
            _ => None,
        }
    }

    /// Erofs when `mkfs.erofs` is installed, else ext4 (probed once).
    pub fn detect() -> RootfsFormat {
        static HAVE_EROFS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let have =
            *HAVE_EROFS.get_or_init(|| Command::new("mkfs.erofs").arg("--help").output().is_ok());
        if have {
            RootfsFormat::Erofs
        } else {
            RootfsFormat::Ext4
        }
    }

    pub fn fstype(self) -> &'static str {
        match self {
            RootfsFormat::Erofs => "erofs",
            RootfsFormat::Ext4 => "ext4",
        }
    }

    pub fn make(self, tree: &Path, out: &Path) -> Result<(), ImageError> {
        self.make_tree(tree, out, false)
    }

    /// [`make`](Self::make); `sparse`: the tree has sparse files, whose
    /// holes must stay holes in the image.
    pub fn make_tree(self, tree: &Path, out: &Path, sparse: bool) -> Result<(), ImageError> {
        match self {
            RootfsFormat::Erofs => erofs(tree, out, sparse),
            // mke2fs -d keeps holes (SEEK_DATA/SEEK_HOLE).
            RootfsFormat::Ext4 => make_ext4(tree, out),
        }
    }
}

/// `mkfs.erofs` (uncompressed) of `tree` into `out`.
pub fn make_erofs(tree: &Path, out: &Path) -> Result<(), ImageError> {
    erofs(tree, out, false)
}

/// `mkfs.erofs`; with `sparse`, chunk-based files (`--chunksize=4096`), in
/// which a hole takes no space: without it, every byte of a 2 GiB sparse
/// file is written into the image. (erofs-utils 1.5 still reads the holes,
/// and dedups the zero chunks; hence [`Limits::max_hole_bytes`].)
///
/// [`Limits::max_hole_bytes`]: crate::apply::Limits::max_hole_bytes
fn erofs(tree: &Path, out: &Path, sparse: bool) -> Result<(), ImageError> {
    let _ = std::fs::remove_file(out);
    let out = std::path::absolute(out).map_err(|e| ImageError::io("resolve", out, e))?;
    let mut cmd = Command::new("mkfs.erofs");
    cmd.arg("--quiet");
    if sparse {
        cmd.arg("--chunksize=4096");
    }
    // Run in the tree, so that the paths mkfs.erofs builds are the image's
    // own (up to PATH_MAX), without the cache's prefix.
    let o = cmd
        .arg(&out)
        .arg(".")
        .current_dir(tree)
        .output()
        .map_err(|e| ImageError::Tool {
            tool: "mkfs.erofs".into(),
            detail: e.to_string(),
            hint: "install erofs-utils (apt-get install erofs-utils), or set KILN_ROOTFS_FS=ext4"
                .into(),
        })?;
    if !o.status.success() {
        return Err(ImageError::Tool {
            tool: "mkfs.erofs".into(),
            detail: String::from_utf8_lossy(&o.stderr).trim().into(),
            hint: String::new(),
        });
    }
    Ok(())
}

/// Apparent size and entry count of a tree (not following symlinks).
fn tree_usage(root: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.path().symlink_metadata()?;
            entries += 1;
            // Allocated rather than apparent size: holes of sparse files
            // take no space in the image either.
            bytes += m.size().min(m.blocks() * 512).div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, entries))
}

/// `mkfs.ext4 -d tree out`, sized from the tree, retried larger if full.
pub fn make_ext4(tree: &Path, out: &Path) -> Result<(), ImageError> {
    use crate::scratch::{mkfs_ext4, Ext4};
    let (bytes, entries) = tree_usage(tree).map_err(|e| ImageError::io("measure", tree, e))?;
    let inodes = entries + entries / 4 + 1024;
    let mut size = (bytes + bytes / 4 + inodes * 256 + (32 << 20)).div_ceil(1 << 20) << 20;
    let mut attempt = 0;
    loop {
        let spec = Ext4 {
            label: kiln_agent::proto::ROOT_DISK_SERIAL,
            size,
            from: Some(tree),
            inodes: Some(inodes),
            eager: true,
        };
        match mkfs_ext4(out, &spec) {
            Err(ImageError::Tool { detail, .. })
                if attempt < 2
                    && (detail.contains("allocate")
                        || detail.contains("No space")
                        || detail.contains("full")) =>
            {
                attempt += 1;
                size = size * 3 / 2;
            }
            other => return other,
        }
    }
}
