//! Image tars: `docker save` (legacy: `manifest.json`, `<id>/layer.tar`),
//! `skopeo copy docker-archive:`, and Docker ≥ 25's OCI layout in a tar
//! (`index.json` first, `manifest.json` as a fallback).
//!
//! The tar is indexed once (entry offsets, seeking over the data), then
//! layers are applied straight from their offsets: nothing is extracted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::apply::tarstream::{Seekable, TarReader};
use crate::apply::{apply_blob_reader, Budget, Limits};
use crate::oci::{self, Descriptor, ImageConfig};
use crate::{quote, ImageError};

/// Entries an image tar may have: a `docker save` tar has a few per layer.
const MAX_ARCHIVE_ENTRIES: u64 = 1 << 16;

/// Regular files of a tar: name → (data offset, size).
struct TarIndex {
    path: PathBuf,
    files: HashMap<String, (u64, u64)>,
}

fn norm(name: &str) -> String {
    name.trim_start_matches("./")
        .trim_start_matches('/')
        .to_string()
}

impl TarIndex {
    /// Indexes the regular files of the tar at `path`, skipping their data
    /// by seeking. The tar is as hostile as a layer: the same reader, with
    /// the same bounds on names and headers, and at most
    /// [`MAX_ARCHIVE_ENTRIES`] entries.
    fn open(path: &Path) -> Result<TarIndex, ImageError> {
        let corrupt = |e: crate::apply::ApplyError| ImageError::Corrupt {
            what: path.display().to_string(),
            detail: format!("not a readable image tar: {e}"),
        };
        let f = File::open(path).map_err(|e| ImageError::io("open", path, e))?;
        let src = Seekable::new(f).map_err(|e| ImageError::io("stat", path, e))?;
        // Layer sizes are the layers' business, checked when applied.
        let budget = Budget::new(Limits {
            max_entries: MAX_ARCHIVE_ENTRIES,
            max_layer_bytes: u64::MAX,
            max_image_bytes: u64::MAX,
            ..Limits::default()
        });
        let mut ar = TarReader::new(src, &budget);
        let mut files = HashMap::new();
        while let Some(e) = ar.next().map_err(corrupt)? {
            if !matches!(e.kind.as_byte(), b'0' | b'\0' | b'7') || e.sparse.is_some() {
                continue;
            }
            let name = norm(&String::from_utf8_lossy(&e.path));
            files.insert(name, (e.data_offset, e.size));
        }
        Ok(TarIndex {
            path: path.to_path_buf(),
            files,
        })
    }

    fn reader(&self, name: &str) -> Result<(impl Read, u64), ImageError> {
        let &(pos, size) = self.files.get(&norm(name)).ok_or_else(|| {
            ImageError::NotFound(format!(
                "{} has no file {}",
                self.path.display(),
                quote(name)
            ))
        })?;
        let mut f = File::open(&self.path).map_err(|e| ImageError::io("open", &self.path, e))?;
        f.seek(SeekFrom::Start(pos))
            .map_err(|e| ImageError::io("seek in", &self.path, e))?;
        Ok((f.take(size), size))
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let (mut r, size) = self.reader(name)?;
        if size > oci::MAX_MANIFEST {
            return Err(ImageError::Corrupt {
                what: format!("{}: {name}", self.path.display()),
                detail: "larger than 4 MiB".into(),
            });
        }
        let mut v = Vec::with_capacity(size as usize);
        r.read_to_end(&mut v)
            .map_err(|e| ImageError::io("read", &self.path, e))?;
        Ok(v)
    }

    fn has(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    /// A blob of the OCI layout inside, verified.
    fn read_blob(&self, d: &Descriptor) -> Result<Vec<u8>, ImageError> {
        let name = blob_name(d)?;
        let bytes = self.read_small(&name)?;
        let got = format!("sha256:{}", crate::cache::sha256_hex(&[&bytes]));
        if got != d.digest || bytes.len() as u64 != d.size {
            return Err(ImageError::Corrupt {
                what: format!("{}: {}", self.path.display(), d.digest),
                detail: format!("{} bytes hashing to {got}", bytes.len()),
            });
        }
        Ok(bytes)
    }
}

fn blob_name(d: &Descriptor) -> Result<String, ImageError> {
    let p = oci::blob_path(Path::new(""), &d.digest)?;
    Ok(p.to_string_lossy().to_string())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LegacyEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Layers to apply: (name in the tar, descriptor, DiffID).
type Plan = Vec<(String, Descriptor, String)>;

fn plan_oci(ix: &TarIndex, tag: Option<&str>) -> Result<(ImageConfig, Plan), ImageError> {
    let what = format!("{}: index.json", ix.path.display());
    let mut list = oci::parse_index(&ix.read_small("index.json")?, &what)?;
    let mut desc = match tag {
        Some(t) => list
            .iter()
            .find(|d| {
                d.annotations.iter().any(|(k, v)| {
                    (k == "org.opencontainers.image.ref.name" || k == "io.containerd.image.name")
                        && (v == t || v.ends_with(&format!(":{t}")))
                })
            })
            .cloned()
            .ok_or_else(|| {
                ImageError::NotFound(format!("no image tagged '{t}' in {}", ix.path.display()))
            })?,
        None => oci::select_platform(&list).cloned().ok_or_else(|| {
            ImageError::NotFound(format!("no linux/amd64 image in {}", ix.path.display()))
        })?,
    };
    for _ in 0..4 {
        if !oci::is_index(&desc.media_type) {
            break;
        }
        list = oci::parse_index(&ix.read_blob(&desc)?, &desc.digest)?;
        desc = oci::select_platform(&list).cloned().ok_or_else(|| {
            ImageError::NotFound(format!("no linux/amd64 image in {}", ix.path.display()))
        })?;
    }
    let manifest = oci::parse_manifest(&ix.read_blob(&desc)?, &desc.digest)?;
    let config = oci::parse_image_config(
        &ix.read_blob(&manifest.config)?,
        &manifest.config.digest,
        manifest.layers.len(),
    )?;
    let mut plan = Vec::new();
    for (l, diff_id) in manifest.layers.iter().zip(&config.diff_ids) {
        plan.push((blob_name(l)?, l.clone(), diff_id.clone()));
    }
    Ok((config, plan))
}

fn plan_legacy(ix: &TarIndex, tag: Option<&str>) -> Result<(ImageConfig, Plan), ImageError> {
    let what = format!("{}: manifest.json", ix.path.display());
    let entries: Vec<LegacyEntry> = serde_json::from_slice(&ix.read_small("manifest.json")?)
        .map_err(|e| ImageError::Corrupt {
            what: what.clone(),
            detail: e.to_string(),
        })?;
    let entry = match tag {
        Some(t) => entries.iter().find(|e| {
            e.repo_tags
                .iter()
                .flatten()
                .any(|rt| rt == t || rt.ends_with(&format!(":{t}")))
        }),
        None => entries.first(),
    }
    .ok_or_else(|| {
        ImageError::NotFound(format!(
            "no image{} in {}",
            tag.map(|t| format!(" tagged '{t}'")).unwrap_or_default(),
            ix.path.display()
        ))
    })?;
    let config = oci::parse_image_config(
        &ix.read_small(&entry.config)?,
        &format!("{}: {}", ix.path.display(), entry.config),
        entry.layers.len(),
    )?;
    let mut plan = Vec::new();
    for (name, diff_id) in entry.layers.iter().zip(&config.diff_ids) {
        let &(_, size) = ix
            .files
            .get(&norm(name))
            .ok_or_else(|| ImageError::Corrupt {
                what: what.clone(),
                detail: format!("layer {} is not in the archive", quote(name)),
            })?;
        let d = Descriptor {
            // No media type: the compression is sniffed. The "digest" names
            // the layer in messages; the DiffID check verifies the content.
            digest: format!(
                "{} (DiffID {diff_id})",
                crate::trunc(name, crate::MAX_SHOWN)
            ),
            size,
            ..Descriptor::default()
        };
        plan.push((name.clone(), d, diff_id.clone()));
    }
    Ok((config, plan))
}

/// An image in an image tar, indexed and planned: its config, and where
/// each layer is in the tar.
pub struct ArchiveImage {
    ix: TarIndex,
    /// Docker >= 25's OCI layout in a tar: blobs are named by digest and
    /// verified against it (legacy layer names are not digests).
    oci_form: bool,
    pub config: ImageConfig,
    plan: Plan,
}

impl ArchiveImage {
    /// Index the tar at `path` and choose the image tagged `tag` (else the
    /// first, or the linux/amd64 one).
    pub fn open(path: &Path, tag: Option<&str>) -> Result<ArchiveImage, ImageError> {
        let ix = TarIndex::open(path)?;
        let oci_form = ix.has("index.json") && ix.has("oci-layout");
        let (config, plan) = if oci_form {
            plan_oci(&ix, tag)?
        } else if ix.has("manifest.json") {
            plan_legacy(&ix, tag)?
        } else {
            return Err(ImageError::NotFound(format!(
                "{} is not an image archive (no index.json or manifest.json)",
                path.display()
            )));
        };
        Ok(ArchiveImage {
            ix,
            oci_form,
            config,
            plan,
        })
    }

    /// Apply the image's layers, base first, to `tree`, straight from their
    /// offsets in the tar.
    pub fn apply_layers(&self, tree: &Path, budget: &Budget) -> Result<(), ImageError> {
        for (name, d, diff_id) in &self.plan {
            let (r, size) = self.ix.reader(name)?;
            if size != d.size {
                return Err(ImageError::Corrupt {
                    what: format!("layer {}", d.digest),
                    detail: format!(
                        "the blob {} {size} bytes in the archive, its descriptor says {}",
                        if size < d.size { "is truncated:" } else { "is" },
                        d.size
                    ),
                });
            }
            apply_blob_reader(r, d, diff_id, tree, self.oci_form, budget)?;
        }
        Ok(())
    }
}
