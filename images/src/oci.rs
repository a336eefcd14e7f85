//! OCI image layouts (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`) and
//! image configuration.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::apply::Budget;
use crate::ImageError;

/// Largest manifest, index or config accepted.
pub const MAX_MANIFEST: u64 = 4 << 20;

/// What a job needs from the image's config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub diff_ids: Vec<String>,
    /// `ExposedPorts` keys (`5432/tcp`, `53/udp`, `8080`), at most
    /// [`MAX_EXPOSED_PORTS`], sorted: what a service's health check waits for.
    #[serde(default)]
    pub exposed_ports: Vec<String>,
}

/// Most `ExposedPorts` entries kept from an image's config.
pub const MAX_EXPOSED_PORTS: usize = 64;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    config: Option<RawContainerConfig>,
    rootfs: RawRootfs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawContainerConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    exposed_ports: Option<std::collections::BTreeMap<String, serde::de::IgnoredAny>>,
}

#[derive(Debug, Deserialize)]
struct RawRootfs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

/// An image inside an OCI layout directory, resolved to one manifest.
#[derive(Debug)]
pub struct LayoutImage {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub manifest_digest: String,
    pub config: ImageConfig,
}

impl LayoutImage {
    /// Open `dir`, choosing the manifest tagged `tag` (annotation
    /// `org.opencontainers.image.ref.name`), else the only one, else the
    /// linux/amd64 one.
    pub fn open(dir: &Path, tag: Option<&str>) -> Result<LayoutImage, ImageError> {
        if !dir.join("oci-layout").is_file() {
            return Err(ImageError::NotFound(format!(
                "{} is not an OCI image layout (no oci-layout file)",
                dir.display()
            )));
        }
        let index: Index = parse_json(&read_limited(&dir.join("index.json"))?, "index.json")?;
        let mut desc = pick(&index.manifests, tag, dir)?.clone();
        // Follow nested indexes down to an image manifest.
        for _ in 0..4 {
            if !is_index(&desc.media_type) {
                break;
            }
            let nested: Index = parse_json(&read_blob_verified(dir, &desc)?, &desc.digest)?;
            desc = pick(&nested.manifests, None, dir)?.clone();
        }
        let manifest = parse_manifest(&read_blob_verified(dir, &desc)?, &desc.digest)?;
        let config = parse_image_config(
            &read_blob_verified(dir, &manifest.config)?,
            &manifest.config.digest,
            manifest.layers.len(),
        )?;
        Ok(LayoutImage {
            dir: dir.to_path_buf(),
            manifest,
            manifest_digest: desc.digest.clone(),
            config,
        })
    }

    /// Path of a blob, after checking the digest's form (no path tricks).
    pub fn blob_path(&self, d: &Descriptor) -> Result<PathBuf, ImageError> {
        blob_path(&self.dir, &d.digest)
    }

    /// Apply the image's layers, base first, to `tree` (each blob verified
    /// against its digest: a layout directory is not the cache).
    pub fn apply_layers(&self, tree: &Path, budget: &Budget) -> Result<(), ImageError> {
        for (layer, diff_id) in self.manifest.layers.iter().zip(&self.config.diff_ids) {
            let path = self.blob_path(layer)?;
            crate::apply::apply_blob_file(&path, layer, diff_id, tree, true, budget)?;
        }
        Ok(())
    }
}

/// Parse an image config blob (`what` names it in errors), checking that it
/// has `layers` DiffIDs.
pub fn parse_image_config(
    bytes: &[u8],
    what: &str,
    layers: usize,
) -> Result<ImageConfig, ImageError> {
    let raw: RawConfig = parse_json(bytes, what)?;
    if raw.rootfs.kind != "layers" {
        return Err(corrupt(what, "rootfs.type is not \"layers\""));
    }
    if raw.rootfs.diff_ids.len() != layers {
        return Err(corrupt(
            what,
            &format!(
                "{} diff_ids for {} layers",
                raw.rootfs.diff_ids.len(),
                layers
            ),
        ));
    }
    if let Some(bad) = raw
        .rootfs
        .diff_ids
        .iter()
        .find(|d| !crate::reference::is_sha256_digest(d))
    {
        return Err(corrupt(what, &format!("bad DiffID {}", crate::quote(bad))));
    }
    let c = raw.config.unwrap_or_default();
    Ok(ImageConfig {
        env: c.env.unwrap_or_default(),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        working_dir: c.working_dir.unwrap_or_default(),
        user: c.user.unwrap_or_default(),
        diff_ids: raw.rootfs.diff_ids,
        exposed_ports: c
            .exposed_ports
            .unwrap_or_default()
            .into_keys()
            .filter(|k| k.len() <= 32)
            .take(MAX_EXPOSED_PORTS)
            .collect(),
    })
}

/// Parse an image manifest (OCI or Docker schema 2), checking its digests.
pub fn parse_manifest(bytes: &[u8], what: &str) -> Result<Manifest, ImageError> {
    let m: Manifest = parse_json(bytes, what)?;
    for d in std::iter::once(&m.config).chain(&m.layers) {
        if !crate::reference::is_sha256_digest(&d.digest) {
            return Err(corrupt(
                what,
                &format!("bad digest {}", crate::quote(&d.digest)),
            ));
        }
    }
    Ok(m)
}

/// The manifests listed by an image index (OCI or Docker manifest list).
pub fn parse_index(bytes: &[u8], what: &str) -> Result<Vec<Descriptor>, ImageError> {
    let i: Index = parse_json(bytes, what)?;
    Ok(i.manifests)
}

/// Whether a manifest body is an index: by media type, else by shape.
pub fn looks_like_index(media_type: &str, bytes: &[u8]) -> bool {
    if !media_type.is_empty() && media_type != "application/json" {
        return is_index(media_type);
    }
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Probe>(bytes)
        .map(|p| is_index(&p.media_type) || p.manifests.is_some())
        .unwrap_or(false)
}

/// The linux/amd64 entry of an index (the first that matches, skipping
/// attestation manifests); entries without a platform count as matching.
pub fn select_platform(list: &[Descriptor]) -> Option<&Descriptor> {
    list.iter()
        .filter(|d| !d.annotations.contains_key("vnd.docker.reference.type"))
        .find(|d| {
            d.platform
                .as_ref()
                .is_none_or(|p| p.os == "linux" && p.architecture == "amd64")
        })
}

pub(crate) fn is_index(mt: &str) -> bool {
    mt == "application/vnd.oci.image.index.v1+json"
        || mt == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn pick<'a>(
    list: &'a [Descriptor],
    tag: Option<&str>,
    dir: &Path,
) -> Result<&'a Descriptor, ImageError> {
    if let Some(t) = tag {
        return list
            .iter()
            .find(|d| {
                d.annotations
                    .get("org.opencontainers.image.ref.name")
                    .map(String::as_str)
                    == Some(t)
            })
            .ok_or_else(|| {
                ImageError::NotFound(format!("no image tagged '{t}' in {}", dir.display()))
            });
    }
    select_platform(list)
        .ok_or_else(|| ImageError::NotFound(format!("no linux/amd64 image in {}", dir.display())))
}

fn corrupt(what: &str, detail: &str) -> ImageError {
    ImageError::Corrupt {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(what, &e.to_string()))
}

fn read_limited(p: &Path) -> Result<Vec<u8>, ImageError> {
    use std::io::Read;
    let f = std::fs::File::open(p).map_err(|e| ImageError::io("open", p, e))?;
    // Not a FIFO (a read would wait forever) or a device.
    let m = f.metadata().map_err(|e| ImageError::io("stat", p, e))?;
    if !m.is_file() {
        return Err(corrupt(&p.display().to_string(), "not a regular file"));
    }
    if m.len() > MAX_MANIFEST {
        return Err(corrupt(&p.display().to_string(), "larger than 4 MiB"));
    }
    let mut v = Vec::new();
    f.take(MAX_MANIFEST + 1)
        .read_to_end(&mut v)
        .map_err(|e| ImageError::io("read", p, e))?;
    if v.len() as u64 > MAX_MANIFEST {
        return Err(corrupt(&p.display().to_string(), "larger than 4 MiB"));
    }
    Ok(v)
}

/// `blobs/<alg>/<hex>` for a well-formed `sha256:<64 hex>` digest.
pub fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, ImageError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| corrupt(digest, "not a sha256 digest"))?;
    Ok(dir.join("blobs").join("sha256").join(hex))
}

/// Read a small blob and check its size and digest.
fn read_blob_verified(dir: &Path, d: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let p = blob_path(dir, &d.digest)?;
    let bytes = read_limited(&p)?;
    if bytes.len() as u64 != d.size {
        return Err(corrupt(
            &d.digest,
            &format!("size {} but the descriptor says {}", bytes.len(), d.size),
        ));
    }
    let got = format!("sha256:{}", crate::cache::sha256_hex(&[&bytes]));
    if got != d.digest {
        return Err(corrupt(&d.digest, &format!("content hashes to {got}")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_with_path_tricks_are_refused() {
        let d = Path::new("/x");
        assert!(blob_path(d, "sha256:../../etc/passwd").is_err());
        assert!(blob_path(d, "md5:abc").is_err());
        assert!(blob_path(d, &format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(blob_path(d, &format!("sha256:{}", "a".repeat(64))).is_ok());
    }

    #[test]
    fn a_directory_without_oci_layout_is_not_found() {
        let t = tempfile::tempdir().unwrap();
        let e = LayoutImage::open(t.path(), None).unwrap_err().to_string();
        assert!(e.contains("not an OCI image layout"), "{e}");
    }

    #[test]
    fn exposed_ports_are_kept_bounded() {
        let d = format!("sha256:{}", "a".repeat(64));
        let mut ports: Vec<String> = (0..200)
            .map(|i| format!("\"{}/tcp\": {{}}", 1000 + i))
            .collect();
        ports.push(format!("\"{}\": {{}}", "9".repeat(100)));
        let cfg = format!(
            r#"{{"config": {{"ExposedPorts": {{{}}}}}, "rootfs": {{"type": "layers", "diff_ids": ["{d}"]}}}}"#,
            ports.join(",")
        );
        let c = parse_image_config(cfg.as_bytes(), "cfg", 1).unwrap();
        assert_eq!(c.exposed_ports.len(), MAX_EXPOSED_PORTS);
        assert_eq!(c.exposed_ports[0], "1000/tcp");
        assert!(c.exposed_ports.iter().all(|p| p.len() <= 32));
        let none = format!(r#"{{"rootfs": {{"type": "layers", "diff_ids": ["{d}"]}}}}"#);
        assert!(parse_image_config(none.as_bytes(), "cfg", 1)
            .unwrap()
            .exposed_ports
            .is_empty());
    }
}
