//! INTERIM layer applier, replaced by the full one from the `apply` branch.
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("unsupported layer media type {0}")]
    MediaType(String),
    #[error("I/O error applying layer")]
    Io(#[from] std::io::Error),
    #[error("diff id mismatch: expected {expected}, got {actual}")]
    DiffId { expected: String, actual: String },
}

#[derive(Debug, Clone, Copy)]
pub enum Compression {
    None,
    Gzip,
}

impl Compression {
    pub fn from_media_type(mt: &str) -> Result<Compression, ApplyError> {
        if mt.ends_with("+gzip") || mt.ends_with(".gzip") {
            Ok(Compression::Gzip)
        } else if mt.ends_with(".tar") {
            Ok(Compression::None)
        } else {
            Err(ApplyError::MediaType(mt.into()))
        }
    }
}

pub fn decompress<'a>(r: impl Read + 'a, c: Compression) -> Result<Box<dyn Read + 'a>, ApplyError> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(r)),
    })
}

struct H<R> {
    r: R,
    h: Sha256,
}
impl<R: Read> Read for H<R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(b)?;
        self.h.update(&b[..n]);
        Ok(n)
    }
}

pub fn apply_layer_verified(
    root: &Path,
    tar: impl Read,
    expected: Option<&str>,
) -> Result<((), String), ApplyError> {
    let mut h = H {
        r: tar,
        h: Sha256::new(),
    };
    {
        let mut a = tar::Archive::new(&mut h);
        a.set_preserve_permissions(true);
        a.set_preserve_ownerships(true);
        for e in a.entries()? {
            let mut e = e?;
            let p = e.path()?.to_path_buf();
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            if let Some(target) = name.strip_prefix(".wh.") {
                let _ = std::fs::remove_dir_all(root.join(p.with_file_name(target)));
                let _ = std::fs::remove_file(root.join(p.with_file_name(target)));
                continue;
            }
            e.unpack_in(root)?;
        }
    }
    std::io::copy(&mut h, &mut std::io::sink())?;
    let actual = format!("sha256:{}", hex::encode(h.h.finalize()));
    if let Some(x) = expected {
        if x != actual {
            return Err(ApplyError::DiffId {
                expected: x.into(),
                actual,
            });
        }
    }
    Ok(((), actual))
}

pub fn chain_id(diff_ids: &[String]) -> String {
    let mut it = diff_ids.iter();
    let mut c = it.next().cloned().unwrap_or_default();
    for d in it {
        c = format!("sha256:{}", hex::encode(Sha256::digest(format!("{c} {d}"))));
    }
    c
}
