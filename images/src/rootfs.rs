//! Image -> read-only root filesystem image, cached by ChainID.
//!
//! Layers are applied in order into a scratch tree, then `mkfs.ext4 -d` turns
//! the tree into a journal-less ext4 image. Image and config are published
//! by rename into `rootfs/<chainid>.{ext4,json}`; every VM of the image opens
//! the same file read-only.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::apply;
use crate::cache::Cache;
use crate::oci::{Descriptor, ImageConfig, LayoutImage};
use crate::ImageError;

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

/// Where a job's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An OCI image layout directory, optionally `dir:tag`.
    Layout { dir: PathBuf, tag: Option<String> },
}

impl ImageSource {
    /// Interpret what the user passed as `--image`.
    pub fn parse(s: &str) -> Result<ImageSource, ImageError> {
        let p = Path::new(s);
        if p.join("oci-layout").is_file() {
            return Ok(ImageSource::Layout {
                dir: p.to_path_buf(),
                tag: None,
            });
        }
        if let Some((dir, tag)) = s.rsplit_once(':') {
            if Path::new(dir).join("oci-layout").is_file() {
                return Ok(ImageSource::Layout {
                    dir: dir.into(),
                    tag: Some(tag.into()),
                });
            }
        }
        if p.exists() {
            return Err(ImageError::NotFound(format!(
                "{s} is not an OCI image layout directory (no oci-layout file)"
            )));
        }
        Err(ImageError::NotFound(format!(
            "{s}: no such OCI layout directory (registry references and docker-save tars are not supported yet)"
        )))
    }
}

/// The rootfs for `source`, built now if the cache does not have it.
pub fn rootfs_for(cache: &Cache, source: &ImageSource) -> Result<Rootfs, ImageError> {
    match source {
        ImageSource::Layout { dir, tag } => {
            let img = LayoutImage::open(dir, tag.as_deref())?;
            let label = match tag {
                Some(t) => format!("{}:{t}", dir.display()),
                None => dir.display().to_string(),
            };
            build_from_layout(cache, &img, &label)
        }
    }
}

fn paths_for(cache: &Cache, chain_id: &str) -> (PathBuf, PathBuf) {
    let hex = chain_id.trim_start_matches("sha256:");
    let dir = cache.dir("rootfs");
    (
        dir.join(format!("{hex}.ext4")),
        dir.join(format!("{hex}.json")),
    )
}

fn load_cached(image: &Path, meta: &Path) -> Option<Rootfs> {
    if !image.is_file() {
        return None;
    }
    let r: Rootfs = serde_json::from_slice(&std::fs::read(meta).ok()?).ok()?;
    // Touch for LRU eviction.
    let _ = std::fs::File::open(meta).and_then(|f| f.set_modified(std::time::SystemTime::now()));
    Some(r)
}

fn build_from_layout(cache: &Cache, img: &LayoutImage, label: &str) -> Result<Rootfs, ImageError> {
    let chain_id = apply::chain_id(&img.config.diff_ids);
    let (image_path, meta_path) = paths_for(cache, &chain_id);
    // The ext4 image is shared by every image with the same layers (same
    // ChainID); the config is each image's own, so it always comes from `img`.
    let hit = |r: Rootfs| Rootfs {
        source: label.to_string(),
        config: img.config.clone(),
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
    let tmp = cache.temp_dir("rootfs")?;
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).map_err(|e| ImageError::io("create", &tree, e))?;
    for (layer, diff_id) in img.manifest.layers.iter().zip(&img.config.diff_ids) {
        apply_blob(img, layer, diff_id, &tree)?;
    }
    let ext4 = tmp.path().join("rootfs.ext4");
    make_ext4(&tree, &ext4)?;
    let rootfs = Rootfs {
        image: image_path.clone(),
        fstype: "ext4".into(),
        chain_id: chain_id.clone(),
        config: img.config.clone(),
        source: label.to_string(),
    };
    let meta_tmp = tmp.path().join("rootfs.json");
    let json = serde_json::to_vec_pretty(&rootfs).map_err(|e| ImageError::Corrupt {
        what: "rootfs metadata".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(&meta_tmp, json).map_err(|e| ImageError::io("write", &meta_tmp, e))?;
    tmp.publish(&meta_tmp, &meta_path)?;
    tmp.publish(&ext4, &image_path)?;
    Ok(rootfs)
}

/// Hashes what passes through, to check a blob against its digest.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

fn apply_blob(
    img: &LayoutImage,
    layer: &Descriptor,
    diff_id: &str,
    tree: &Path,
) -> Result<(), ImageError> {
    let wrap = |source| ImageError::Layer {
        layer: layer.digest.clone(),
        source,
    };
    let path = img.blob_path(layer)?;
    let file =
        std::fs::File::open(&path).map_err(|e| ImageError::io("open layer blob", &path, e))?;
    let mut hashing = HashingReader {
        inner: std::io::BufReader::new(file),
        hasher: Sha256::new(),
        bytes: 0,
    };
    let compression = apply::Compression::from_media_type(&layer.media_type).map_err(wrap)?;
    {
        let reader = apply::decompress(&mut hashing, compression).map_err(wrap)?;
        apply::apply_layer_verified(tree, reader, Some(diff_id)).map_err(wrap)?;
    }
    // Whatever the decompressor left unread still belongs to the blob.
    std::io::copy(&mut hashing, &mut std::io::sink())
        .map_err(|e| ImageError::io("read layer blob", &path, e))?;
    let got = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    if got != layer.digest || hashing.bytes != layer.size {
        return Err(ImageError::Corrupt {
            what: format!("layer {}", layer.digest),
            detail: format!(
                "blob hashes to {got} ({} bytes, descriptor says {})",
                hashing.bytes, layer.size
            ),
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
            bytes += m.size().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, entries))
}

/// `mkfs.ext4 -d tree out`, sized from the tree, retried larger if full.
pub fn make_ext4(tree: &Path, out: &Path) -> Result<(), ImageError> {
    let (bytes, entries) = tree_usage(tree).map_err(|e| ImageError::io("measure", tree, e))?;
    let inodes = entries + entries / 4 + 1024;
    let mut size = (bytes + bytes / 4 + inodes * 256 + (32 << 20)).div_ceil(1 << 20) << 20;
    for attempt in 0..3 {
        let _ = std::fs::remove_file(out);
        let f = std::fs::File::create(out).map_err(|e| ImageError::io("create", out, e))?;
        f.set_len(size)
            .map_err(|e| ImageError::io("size", out, e))?;
        drop(f);
        let o = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-O",
                "^has_journal",
                "-m",
                "0",
                "-L",
                "kiln-root",
            ])
            .args(["-E", "root_owner=0:0,lazy_itable_init=0,nodiscard"])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-d")
            .arg(tree)
            .arg(out)
            .output()
            .map_err(|e| ImageError::Tool {
                tool: "mkfs.ext4".into(),
                detail: e.to_string(),
                hint: "install e2fsprogs (apt-get install e2fsprogs)".into(),
            })?;
        if o.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if attempt < 2
            && (err.contains("allocate") || err.contains("No space") || err.contains("full"))
        {
            size = size * 3 / 2;
            continue;
        }
        return Err(ImageError::Tool {
            tool: "mkfs.ext4 -d".into(),
            detail: err.trim().into(),
            hint: String::new(),
        });
    }
    unreachable!("the loop returns on its last attempt")
}
