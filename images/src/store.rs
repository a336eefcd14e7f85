//! The registry side of the cache: content-addressed blobs shared by every
//! image (`blobs/sha256/<hex>`: layers, manifests, indexes, configs), image
//! records (`images/<key>.json`: what a reference resolved to, and when), and
//! eviction (unreferenced entries, and least-recently-used ones beyond a size
//! bound; use touches mtime).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cache::{remove_any, sha256_hex, Cache};
use crate::reference::Reference;
use crate::ImageError;

/// Default cache size bound ([`ImagesOptions::cache_max_bytes`]).
///
/// [`ImagesOptions::cache_max_bytes`]: crate::ImagesOptions::cache_max_bytes
pub const DEFAULT_MAX_BYTES: u64 = 20 << 30;

/// What a reference resolved to when it was pulled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference as normalised (`docker.io/library/debian:12`).
    pub reference: String,
    /// What the tag (or pinned digest) names: an index or a manifest.
    pub digest: String,
    /// The linux/amd64 image manifest.
    pub manifest: String,
    pub config: String,
    /// Layer blob digests, base first.
    pub layers: Vec<String>,
    /// Compressed size of the layers.
    pub size: u64,
    /// The rootfs key.
    pub chain_id: String,
    /// Unix time of the last check of the tag with the registry.
    pub resolved_at: u64,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `blobs/sha256/<hex>` in the cache.
pub fn blob_path(cache: &Cache, digest: &str) -> Result<PathBuf, ImageError> {
    crate::oci::blob_path(cache.root(), digest)
}

/// The blob's path if it is present with `size` bytes (and marks it used).
pub fn present_blob(cache: &Cache, digest: &str, size: u64) -> Option<PathBuf> {
    let p = blob_path(cache, digest).ok()?;
    let m = std::fs::metadata(&p).ok()?;
    if m.len() != size {
        return None;
    }
    touch(&p);
    Some(p)
}

/// Read a small blob (manifest, config) back, verified; `None` if absent.
pub fn read_small_blob(cache: &Cache, digest: &str) -> Option<Vec<u8>> {
    let p = blob_path(cache, digest).ok()?;
    let m = std::fs::metadata(&p).ok()?;
    if m.len() > crate::oci::MAX_MANIFEST {
        return None;
    }
    let bytes = std::fs::read(&p).ok()?;
    if format!("sha256:{}", sha256_hex(&[&bytes])) != digest {
        tracing::warn!("cached blob {digest} is corrupt; removing it");
        let _ = std::fs::remove_file(&p);
        return None;
    }
    touch(&p);
    Some(bytes)
}

/// Store a small, already verified blob.
pub fn put_small_blob(cache: &Cache, digest: &str, bytes: &[u8]) -> Result<(), ImageError> {
    let dest = blob_path(cache, digest)?;
    if dest.is_file() {
        return Ok(());
    }
    let tmp = cache.temp_dir("blob")?;
    let f = tmp.path().join("data");
    std::fs::write(&f, bytes).map_err(|e| ImageError::io("write", &f, e))?;
    tmp.publish(&f, &dest)
}

/// Set a file's mtime to now (LRU).
pub fn touch(p: &Path) {
    let _ = std::fs::File::open(p).and_then(|f| f.set_modified(SystemTime::now()));
}

/// The record key of a reference: `registry/repo:tag`, or with `@digest`
/// when pinned.
pub fn record_key(r: &Reference) -> String {
    if r.digest.is_some() {
        r.to_string()
    } else {
        r.name_and_tag()
    }
}

fn record_path(cache: &Cache, key: &str) -> PathBuf {
    cache
        .dir("images")
        .join(format!("{}.json", &sha256_hex(&[key.as_bytes()])[..32]))
}

pub fn load_record(cache: &Cache, r: &Reference) -> Option<ImageRecord> {
    let key = record_key(r);
    let rec: ImageRecord =
        serde_json::from_slice(&std::fs::read(record_path(cache, &key)).ok()?).ok()?;
    (rec.reference == key).then_some(rec)
}

pub fn save_record(cache: &Cache, rec: &ImageRecord) -> Result<(), ImageError> {
    let dest = record_path(cache, &rec.reference);
    let tmp = cache.temp_dir("record")?;
    let f = tmp.path().join("record.json");
    let json = serde_json::to_vec_pretty(rec).map_err(|e| ImageError::Corrupt {
        what: "image record".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(&f, json).map_err(|e| ImageError::io("write", &f, e))?;
    tmp.publish(&f, &dest)
}

/// Every image record, sorted by reference.
pub fn list_records(cache: &Cache) -> Vec<ImageRecord> {
    let mut v: Vec<ImageRecord> = std::fs::read_dir(cache.dir("images"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    v.sort_by(|a: &ImageRecord, b| a.reference.cmp(&b.reference));
    v
}

/// Forget `r`. Returns the record that was removed.
pub fn remove_record(cache: &Cache, r: &Reference) -> Option<ImageRecord> {
    let rec = load_record(cache, r)?;
    std::fs::remove_file(record_path(cache, &rec.reference)).ok()?;
    Some(rec)
}

/// What [`prune`] did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PruneReport {
    pub removed: Vec<String>,
    pub freed_bytes: u64,
    pub remaining_bytes: u64,
}

#[derive(Debug)]
struct Entry {
    name: String,
    lock: String,
    paths: Vec<PathBuf>,
    bytes: u64,
    mtime: SystemTime,
    referenced: bool,
}

fn entries(cache: &Cache) -> Vec<Entry> {
    let records = list_records(cache);
    let mut blob_refs = std::collections::HashSet::new();
    let mut chain_refs = std::collections::HashSet::new();
    for r in &records {
        blob_refs.insert(r.digest.clone());
        blob_refs.insert(r.manifest.clone());
        blob_refs.insert(r.config.clone());
        blob_refs.extend(r.layers.iter().cloned());
        chain_refs.insert(r.chain_id.trim_start_matches("sha256:").to_string());
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(cache.dir("blobs/sha256"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(m) = e.metadata() else { continue };
        let hex = e.file_name().to_string_lossy().to_string();
        let digest = format!("sha256:{hex}");
        out.push(Entry {
            referenced: blob_refs.contains(&digest),
            name: format!("blob {digest}"),
            lock: format!("blob-{hex}"),
            paths: vec![e.path()],
            bytes: m.len(),
            mtime: m.modified().unwrap_or(UNIX_EPOCH),
        });
    }
    // rootfs/<hex>.<fstype> with its <hex>.json.
    let mut by_chain: std::collections::BTreeMap<String, Vec<(PathBuf, std::fs::Metadata)>> =
        Default::default();
    for e in std::fs::read_dir(cache.dir("rootfs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(m) = e.metadata() else { continue };
        let name = e.file_name().to_string_lossy().to_string();
        let Some((hex, _)) = name.split_once('.') else {
            continue;
        };
        by_chain
            .entry(hex.to_string())
            .or_default()
            .push((e.path(), m));
    }
    for (hex, files) in by_chain {
        use std::os::unix::fs::MetadataExt;
        out.push(Entry {
            referenced: chain_refs.contains(&hex),
            name: format!("rootfs sha256:{hex}"),
            lock: format!("rootfs-{hex}"),
            bytes: files.iter().map(|(_, m)| m.blocks() * 512).sum(),
            mtime: files
                .iter()
                .filter_map(|(_, m)| m.modified().ok())
                .max()
                .unwrap_or(UNIX_EPOCH),
            paths: files.into_iter().map(|(p, _)| p).collect(),
        });
    }
    out
}

/// Bytes the blobs and root filesystems take (rootfs images are sparse:
/// allocated blocks count).
pub fn usage(cache: &Cache) -> u64 {
    entries(cache).iter().map(|e| e.bytes).sum()
}

/// Evict: with `unreferenced`, every blob and rootfs no image record uses
/// (rootfs built from layout directories and archives have no record);
/// then, least recently used first, until the cache is under `max_bytes`.
/// Entries being built or downloaded (locked) are skipped; a VM that has
/// the rootfs open keeps its (unlinked) file.
pub fn prune(
    cache: &Cache,
    unreferenced: bool,
    max_bytes: Option<u64>,
) -> Result<PruneReport, ImageError> {
    cache.clean_tmp();
    let mut all = entries(cache);
    all.sort_by_key(|e| e.mtime);
    let mut total: u64 = all.iter().map(|e| e.bytes).sum();
    let mut report = PruneReport::default();
    for e in all {
        let over = max_bytes.is_some_and(|m| total > m);
        if !(over || (unreferenced && !e.referenced)) {
            continue;
        }
        let Some(_lock) = cache.try_lock(&e.lock)? else {
            tracing::debug!("{} is in use; kept", e.name);
            continue;
        };
        for p in &e.paths {
            remove_any(p).map_err(|err| ImageError::io("remove", p, err))?;
        }
        tracing::info!("evicted {} ({} bytes)", e.name, e.bytes);
        total -= e.bytes;
        report.freed_bytes += e.bytes;
        report.removed.push(e.name);
    }
    report.remaining_bytes = total;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(cache: &Cache, data: &[u8], age_s: u64) -> String {
        let d = format!("sha256:{}", sha256_hex(&[data]));
        put_small_blob(cache, &d, data).unwrap();
        let p = blob_path(cache, &d).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - std::time::Duration::from_secs(age_s))
            .unwrap();
        d
    }

    #[test]
    fn lru_eviction_keeps_recent_and_locked_entries() {
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::open(t.path()).unwrap();
        let old = put(&cache, &[1u8; 1000], 300);
        let locked = put(&cache, &[2u8; 1000], 200);
        let mid = put(&cache, &[3u8; 1000], 100);
        let new = put(&cache, &[4u8; 1000], 0);
        // Using a blob makes it recent.
        assert!(read_small_blob(&cache, &mid).is_some());
        let _held = cache
            .lock(&format!("blob-{}", locked.trim_start_matches("sha256:")))
            .unwrap();
        let r = prune(&cache, false, Some(2000)).unwrap();
        // Oldest first, skipping the locked one; `mid` was used after `new`.
        assert_eq!(
            r.removed,
            vec![format!("blob {old}"), format!("blob {new}")],
            "{r:?}"
        );
        assert_eq!(r.remaining_bytes, 2000);
        let exists = |d: &str| blob_path(&cache, d).unwrap().exists();
        assert!(!exists(&old) && !exists(&new));
        assert!(exists(&locked) && exists(&mid));
        // Unreferenced pruning removes what no record names.
        let rec = ImageRecord {
            reference: "x/y:z".into(),
            digest: mid.clone(),
            manifest: mid.clone(),
            config: mid.clone(),
            layers: vec![],
            size: 0,
            chain_id: "sha256:00".into(),
            resolved_at: 0,
        };
        save_record(&cache, &rec).unwrap();
        drop(_held);
        let r = prune(&cache, true, None).unwrap();
        assert_eq!(r.removed, vec![format!("blob {locked}")], "{r:?}");
        assert!(exists(&mid) && !exists(&locked));
    }

    #[test]
    fn records_round_trip_by_reference() {
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::open(t.path()).unwrap();
        let r = Reference::parse("127.0.0.1:5000/a/b:1").unwrap();
        assert!(load_record(&cache, &r).is_none());
        let rec = ImageRecord {
            reference: record_key(&r),
            digest: "sha256:1".into(),
            manifest: "sha256:2".into(),
            config: "sha256:3".into(),
            layers: vec!["sha256:4".into()],
            size: 5,
            chain_id: "sha256:6".into(),
            resolved_at: 7,
        };
        save_record(&cache, &rec).unwrap();
        assert_eq!(load_record(&cache, &r), Some(rec.clone()));
        assert_eq!(list_records(&cache), vec![rec.clone()]);
        assert_eq!(remove_record(&cache, &r), Some(rec));
        assert!(list_records(&cache).is_empty());
    }

    #[test]
    fn corrupt_cached_blobs_are_dropped() {
        let t = tempfile::tempdir().unwrap();
        let cache = Cache::open(t.path()).unwrap();
        let d = put(&cache, b"hello", 0);
        std::fs::write(blob_path(&cache, &d).unwrap(), b"hellO").unwrap();
        assert!(read_small_blob(&cache, &d).is_none());
        assert!(!blob_path(&cache, &d).unwrap().exists());
    }
}
