//! A layer blob, compressed as its descriptor says (or sniffed), applied
//! to a tree: the blob's digest and size and the layer's DiffID are checked
//! while it streams; decompression runs on its own thread, overlapping the
//! applier.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::Budget;
use crate::oci::Descriptor;
use crate::ImageError;

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
        super::Compression::sniff(hashing.fill_buf().map_err(read_err)?)
    } else {
        super::Compression::from_media_type(&layer.media_type).map_err(wrap)?
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
                let mut reader = super::decompress(&mut hashing, compression).map_err(wrap)?;
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
            super::apply_layer_verified_with(tree, ChannelReader::new(rx), Some(diff_id), budget);
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
