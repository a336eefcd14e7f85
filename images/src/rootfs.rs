//! Image -> read-only root filesystem image, cached by ChainID.
//!
//! Layers are applied in order into a scratch tree, then `mkfs.erofs` (or
//! `mkfs.ext4 -d`, see [`RootfsFormat`]) turns the tree into a read-only
//! image. Image and metadata are published by rename into
//! `rootfs/<chainid>.<fstype>{,.json}`; every VM of the image opens the same
//! file read-only.

use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::apply::{self, Budget};
use crate::cache::Cache;
use crate::oci::{Descriptor, ImageConfig, LayoutImage};
use crate::reference::Reference;
use crate::registry::{NoProgress, PullProgress, Registry, RegistryConfig};
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
    /// A `docker save` / `skopeo copy docker-archive:` tar (legacy
    /// `manifest.json` form or OCI layout in a tar), optionally `file:tag`.
    Archive { path: PathBuf, tag: Option<String> },
    /// An image in a registry.
    Registry(Reference),
}

impl ImageSource {
    /// Interpret what the user passed as `--image`: an OCI layout directory
    /// (`dir` or `dir:tag`), an image tar (`file` or `file:tag`), else a
    /// registry reference (`name[:tag][@digest]`).
    pub fn parse(s: &str) -> Result<ImageSource, ImageError> {
        let p = Path::new(s);
        if p.join("oci-layout").is_file() {
            return Ok(ImageSource::Layout {
                dir: p.to_path_buf(),
                tag: None,
            });
        }
        if p.is_file() {
            return Ok(ImageSource::Archive {
                path: p.to_path_buf(),
                tag: None,
            });
        }
        if let Some((path, tag)) = s.rsplit_once(':') {
            let pp = Path::new(path);
            if pp.join("oci-layout").is_file() {
                return Ok(ImageSource::Layout {
                    dir: path.into(),
                    tag: Some(tag.into()),
                });
            }
            if pp.is_file() && !path.is_empty() {
                return Ok(ImageSource::Archive {
                    path: path.into(),
                    tag: Some(tag.into()),
                });
            }
        }
        if p.exists() {
            return Err(ImageError::NotFound(format!(
                "{s} is neither an OCI image layout directory (no oci-layout file) nor an image tar"
            )));
        }
        if s.starts_with('/') || s.starts_with("./") || s.starts_with("../") || s.starts_with('~') {
            return Err(ImageError::NotFound(format!(
                "{s}: no such OCI layout directory or image tar"
            )));
        }
        Reference::parse(s).map(ImageSource::Registry)
    }

    /// For messages.
    pub fn label(&self) -> String {
        let with_tag = |p: &Path, t: &Option<String>| match t {
            Some(t) => format!("{}:{t}", p.display()),
            None => p.display().to_string(),
        };
        match self {
            ImageSource::Layout { dir, tag } => with_tag(dir, tag),
            ImageSource::Archive { path, tag } => with_tag(path, tag),
            ImageSource::Registry(r) => r.to_string(),
        }
    }
}

/// The rootfs for `source`, built now if the cache does not have it.
/// Registry images use [`RegistryConfig::from_env`].
///
/// Blocking: call it from `spawn_blocking` or a plain thread, never from an
/// async task (use [`rootfs_for_async`] there).
pub fn rootfs_for(cache: &Cache, source: &ImageSource) -> Result<Rootfs, ImageError> {
    match source {
        ImageSource::Registry(_) => {
            let reg = Registry::new(RegistryConfig::from_env())?;
            block_on(rootfs_for_async(cache, source, &reg, Arc::new(NoProgress)))?
        }
        _ => rootfs_for_local(cache, source),
    }
}

/// Async twin of [`rootfs_for`], with a registry client and progress.
pub async fn rootfs_for_async(
    cache: &Cache,
    source: &ImageSource,
    reg: &Registry,
    progress: Arc<dyn PullProgress>,
) -> Result<Rootfs, ImageError> {
    match source {
        ImageSource::Registry(r) => {
            crate::pull::rootfs_for_reference(cache, reg, r, progress).await
        }
        _ => {
            let (cache, source) = (cache.clone(), source.clone());
            tokio::task::spawn_blocking(move || rootfs_for_local(&cache, &source))
                .await
                .map_err(|e| ImageError::Corrupt {
                    what: "image build task".into(),
                    detail: e.to_string(),
                })?
        }
    }
}

/// Run a future to completion from synchronous code: on the current tokio
/// runtime when called from one of its blocking threads, else on a new
/// current-thread runtime.
pub fn block_on<F: Future>(f: F) -> Result<F::Output, ImageError> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => Ok(h.block_on(f)),
        Err(_) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ImageError::io("start", Path::new("tokio runtime"), e))?;
            Ok(rt.block_on(f))
        }
    }
}

fn rootfs_for_local(cache: &Cache, source: &ImageSource) -> Result<Rootfs, ImageError> {
    match source {
        ImageSource::Layout { dir, tag } => {
            let img = LayoutImage::open(dir, tag.as_deref())?;
            build_from_layout(cache, &img, &source.label())
        }
        ImageSource::Archive { path, tag } => {
            crate::archive::rootfs_from_archive(cache, path, tag.as_deref(), &source.label())
        }
        ImageSource::Registry(r) => Err(ImageError::NotFound(format!(
            "{r} is a registry image (use rootfs_for or rootfs_for_async)"
        ))),
    }
}

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
    /// `$KILN_ROOTFS_FS` (`erofs` or `ext4`), else erofs when `mkfs.erofs`
    /// is installed, else ext4.
    pub fn from_env() -> RootfsFormat {
        match std::env::var("KILN_ROOTFS_FS").as_deref() {
            Ok("ext4") => RootfsFormat::Ext4,
            Ok("erofs") => RootfsFormat::Erofs,
            _ => {
                static HAVE_EROFS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
                let have = *HAVE_EROFS
                    .get_or_init(|| Command::new("mkfs.erofs").arg("--help").output().is_ok());
                if have {
                    RootfsFormat::Erofs
                } else {
                    RootfsFormat::Ext4
                }
            }
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

fn paths_for(cache: &Cache, chain_id: &str, format: RootfsFormat) -> (PathBuf, PathBuf) {
    let hex = chain_id.trim_start_matches("sha256:");
    let dir = cache.dir("rootfs");
    let fs = format.fstype();
    (
        dir.join(format!("{hex}.{fs}")),
        dir.join(format!("{hex}.{fs}.json")),
    )
}

fn load_cached(image: &Path, meta: &Path) -> Option<Rootfs> {
    if !image.is_file() {
        return None;
    }
    let r: Rootfs = serde_json::from_slice(&std::fs::read(meta).ok()?).ok()?;
    // Touch for LRU eviction.
    crate::store::touch(meta);
    crate::store::touch(image);
    Some(r)
}

/// The cached rootfs of `chain_id`, if there is one (with `config` and
/// `label` as this image's own).
pub fn cached_rootfs(
    cache: &Cache,
    chain_id: &str,
    config: &ImageConfig,
    label: &str,
) -> Option<Rootfs> {
    let (image_path, meta_path) = paths_for(cache, chain_id, RootfsFormat::from_env());
    load_cached(&image_path, &meta_path).map(|r| Rootfs {
        source: label.to_string(),
        config: config.clone(),
        ..r
    })
}

/// Build (once, under a lock) the rootfs of `config.diff_ids`: `apply`
/// applies the layers into the empty tree it is given, counting against the
/// budget it is given (the cache's [`Limits`](crate::apply::Limits), for this
/// one image). On any error nothing is left in the cache.
pub fn build_rootfs_with(
    cache: &Cache,
    config: &ImageConfig,
    label: &str,
    apply: impl FnOnce(&Path, &Budget) -> Result<(), ImageError>,
) -> Result<Rootfs, ImageError> {
    check_layer_count(cache, config.diff_ids.len(), label)?;
    let format = RootfsFormat::from_env();
    let chain_id = apply::chain_id(&config.diff_ids);
    let (image_path, meta_path) = paths_for(cache, &chain_id, format);
    // The image is shared by every image with the same layers (same
    // ChainID); the config is each image's own, so it always comes from the
    // caller.
    let hit = |r: Rootfs| Rootfs {
        source: label.to_string(),
        config: config.clone(),
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
    let t0 = std::time::Instant::now();
    let tmp = cache.temp_dir("rootfs")?;
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).map_err(|e| ImageError::io("create", &tree, e))?;
    let budget = Budget::new(*cache.limits());
    apply(&tree, &budget)?;
    let t1 = std::time::Instant::now();
    let out = tmp.path().join(format!("rootfs.{}", format.fstype()));
    format.make_tree(&tree, &out, budget.holes() > 0)?;
    tracing::info!(
        "{label}: layers applied in {:.2} s, {} built in {:.2} s",
        (t1 - t0).as_secs_f64(),
        format.fstype(),
        t1.elapsed().as_secs_f64()
    );
    let rootfs = Rootfs {
        image: image_path.clone(),
        fstype: format.fstype().into(),
        chain_id: chain_id.clone(),
        config: config.clone(),
        source: label.to_string(),
    };
    let meta_tmp = tmp.path().join("rootfs.json");
    let json = serde_json::to_vec_pretty(&rootfs).map_err(|e| ImageError::Corrupt {
        what: "rootfs metadata".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(&meta_tmp, json).map_err(|e| ImageError::io("write", &meta_tmp, e))?;
    tmp.publish(&meta_tmp, &meta_path)?;
    tmp.publish(&out, &image_path)?;
    Ok(rootfs)
}

pub(crate) fn build_from_layout(
    cache: &Cache,
    img: &LayoutImage,
    label: &str,
) -> Result<Rootfs, ImageError> {
    build_rootfs_with(cache, &img.config, label, |tree, budget| {
        for (layer, diff_id) in img.manifest.layers.iter().zip(&img.config.diff_ids) {
            let path = img.blob_path(layer)?;
            apply_blob_file(&path, layer, diff_id, tree, true, budget)?;
        }
        Ok(())
    })
}

/// An error if an image has more layers than the cache's limits allow.
pub(crate) fn check_layer_count(
    cache: &Cache,
    layers: usize,
    label: &str,
) -> Result<(), ImageError> {
    let max = cache.limits().max_layers;
    if layers > max {
        return Err(ImageError::Corrupt {
            what: label.to_string(),
            detail: format!("{layers} layers: more than the {max} kiln allows"),
        });
    }
    Ok(())
}

/// Hashes what passes through, to check a blob against its digest.
struct HashingReader<R> {
    inner: R,
    hasher: Option<Sha256>,
    bytes: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Apply the layer blob at `path` to `tree`, checking the DiffID and, with
/// `verify_blob`, the blob's digest (blobs in the cache were verified when
/// they were downloaded); the size is always checked. Sizes count against
/// `budget`.
pub fn apply_blob_file(
    path: &Path,
    layer: &Descriptor,
    diff_id: &str,
    tree: &Path,
    verify_blob: bool,
    budget: &Budget,
) -> Result<(), ImageError> {
    let file = std::fs::File::open(path).map_err(|e| ImageError::io("open layer blob", path, e))?;
    // Not a FIFO or a device someone put in a layout directory.
    let meta = file
        .metadata()
        .map_err(|e| ImageError::io("stat layer blob", path, e))?;
    if !meta.is_file() {
        return Err(ImageError::Corrupt {
            what: format!("layer {}", layer.digest),
            detail: format!("{} is not a regular file", path.display()),
        });
    }
    if meta.len() != layer.size {
        return Err(ImageError::Corrupt {
            what: format!("layer {}", layer.digest),
            detail: if meta.len() < layer.size {
                format!(
                    "the blob is truncated: {} bytes, its descriptor says {}",
                    meta.len(),
                    layer.size
                )
            } else {
                format!(
                    "the blob is {} bytes, its descriptor says {}",
                    meta.len(),
                    layer.size
                )
            },
        });
    }
    apply_blob_reader(file, layer, diff_id, tree, verify_blob, budget)
}

/// [`apply_blob_file`] for a blob read from anywhere. A layer without a
/// media type (`docker save` archives) has its compression sniffed.
///
/// A blob that is not what its descriptor says (shorter, longer, another
/// digest) is reported as such, before whatever the applier made of it.
pub fn apply_blob_reader(
    blob: impl Read + Send,
    layer: &Descriptor,
    diff_id: &str,
    tree: &Path,
    verify_blob: bool,
    budget: &Budget,
) -> Result<(), ImageError> {
    use std::io::BufRead;
    let wrap = |source| ImageError::Layer {
        layer: layer.digest.clone(),
        source,
    };
    let read_err = |e| ImageError::Corrupt {
        what: format!("layer {}", layer.digest),
        detail: format!("reading the blob: {e}"),
    };
    let mut hashing = std::io::BufReader::with_capacity(
        1 << 20,
        HashingReader {
            inner: blob,
            hasher: verify_blob.then(Sha256::new),
            bytes: 0,
        },
    );
    let compression = if layer.media_type.is_empty() {
        apply::Compression::sniff(hashing.fill_buf().map_err(read_err)?)
    } else {
        apply::Compression::from_media_type(&layer.media_type).map_err(wrap)?
    };
    // Decompression (and the blob hash) runs on its own thread, feeding
    // the applier through a bounded channel: the two overlap.
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(8);
    let (applied, hashing) = std::thread::scope(|s| {
        let producer = s.spawn(move || -> Result<_, ImageError> {
            // Whether the applier read everything (else it failed: its error
            // is the one to report, and the rest of the blob is not read).
            let mut complete = true;
            {
                let mut reader = apply::decompress(&mut hashing, compression).map_err(wrap)?;
                loop {
                    let mut buf = vec![0u8; 256 << 10];
                    let n = match read_full(&mut reader, &mut buf) {
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            break;
                        }
                    };
                    if n == 0 {
                        break;
                    }
                    buf.truncate(n);
                    if tx.send(Ok(buf)).is_err() {
                        complete = false; // the applier stopped
                        break;
                    }
                }
            }
            drop(tx);
            if complete {
                // Whatever the decompressor left unread still belongs to
                // the blob.
                std::io::copy(&mut hashing, &mut std::io::sink()).map_err(read_err)?;
            }
            Ok((hashing.into_inner(), complete))
        });
        let applied =
            apply::apply_layer_verified_with(tree, ChannelReader::new(rx), Some(diff_id), budget);
        let hashing = producer.join().unwrap_or_else(|_| {
            Err(ImageError::Corrupt {
                what: format!("layer {}", layer.digest),
                detail: "the decompressor thread panicked".into(),
            })
        });
        (applied, hashing)
    });
    let (mut hashing, complete) = hashing?;
    let applied = match applied {
        Err(e) if !complete => return Err(wrap(e)),
        other => other,
    };
    let got = hashing
        .hasher
        .take()
        .map(|h| format!("sha256:{}", hex::encode(h.finalize())));
    if hashing.bytes < layer.size {
        return Err(ImageError::Corrupt {
            what: format!("layer {}", layer.digest),
            detail: format!(
                "the blob is truncated: {} bytes, its descriptor says {}",
                hashing.bytes, layer.size
            ),
        });
    }
    if got.as_ref().is_some_and(|g| *g != layer.digest) || hashing.bytes != layer.size {
        return Err(ImageError::Corrupt {
            what: format!("layer {}", layer.digest),
            detail: format!(
                "blob hashes to {} ({} bytes, descriptor says {})",
                got.as_deref().unwrap_or("(not hashed)"),
                hashing.bytes,
                layer.size
            ),
        });
    }
    applied.map_err(wrap)?;
    Ok(())
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads the chunks a decompressor thread sends.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    fn new(rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>) -> Self {
        ChannelReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(v)) => {
                    self.cur = v;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
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
