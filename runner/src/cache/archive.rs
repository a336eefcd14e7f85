//! Cache archives: gzipped tars of regular files, built on the host from
//! the files the guest sent back (already extracted safely), and restored
//! into a job's workspace before its VM starts.
//!
//! An archive is hostile input when it is restored (a job wrote what is in
//! it): it is inflated through a bound, extracted by the artifact extractor
//! (`crate::executor::extract_tar`: plain relative paths, regular files and
//! directories only, no links, no setuid bits, names and counts bounded)
//! into a fresh directory beside the workspace, and only then moved into
//! the workspace, never through a link or over a directory there.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use crate::executor::{extract_tar, ArtifactError};

/// Why an archive could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: io::Error },
    #[error(transparent)]
    Refused(#[from] ArtifactError),
    #[error("the archive inflates to more than {0} bytes")]
    TooLarge(u64),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |err| ArchiveError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// Write `files` (relative to `from`, regular files) as a gzipped tar to
/// `out`. Returns the archive's size.
pub fn pack(from: &Path, files: &[PathBuf], out: &Path) -> Result<u64, ArchiveError> {
    let file = std::fs::File::create(out).map_err(io_at(out))?;
    let mut tar = tar::Builder::new(GzEncoder::new(
        io::BufWriter::new(file),
        flate2::Compression::fast(),
    ));
    tar.follow_symlinks(false);
    for rel in files {
        let path = from.join(rel);
        let meta = std::fs::symlink_metadata(&path).map_err(io_at(&path))?;
        if !meta.is_file() {
            continue;
        }
        let f = std::fs::File::open(&path).map_err(io_at(&path))?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        header.set_mode(meta_mode(&meta));
        tar.append_data(&mut header, rel, f.take(meta.len()))
            .map_err(io_at(&path))?;
    }
    let gz = tar.into_inner().map_err(io_at(out))?;
    let w = gz.finish().map_err(io_at(out))?;
    let f = w.into_inner().map_err(|e| ArchiveError::Io {
        path: out.to_path_buf(),
        err: e.into_error(),
    })?;
    f.sync_all().map_err(io_at(out))?;
    Ok(f.metadata().map_err(io_at(out))?.len())
}

fn meta_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o777
}

/// A reader that fails once more than `left` bytes come through it, and
/// says so in `tripped`.
struct Bounded<R> {
    inner: R,
    left: u64,
    max: u64,
    tripped: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.tripped.set(true);
            return Err(io::Error::other(format!(
                "the archive inflates to more than {} bytes",
                self.max
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// What restoring an archive did.
#[derive(Debug, Default)]
pub struct Restored {
    pub files: u64,
    pub bytes: u64,
    /// Entries left out, and why.
    pub problems: Vec<String>,
}

/// Restore `archive` into `workspace`, inflating at most `max_bytes`.
/// Files already there are replaced (a link is replaced, never followed);
/// a directory in the workspace is never replaced, nor entered when it is
/// a link. `scratch` is a path beside the workspace (same filesystem) that
/// must not exist; it is removed afterwards.
pub fn unpack(
    archive: &Path,
    workspace: &Path,
    scratch: &Path,
    max_bytes: u64,
) -> Result<Restored, ArchiveError> {
    let file = std::fs::File::open(archive).map_err(io_at(archive))?;
    let tripped = std::rc::Rc::new(std::cell::Cell::new(false));
    let reader = Bounded {
        inner: GzDecoder::new(io::BufReader::new(file)),
        left: max_bytes,
        max: max_bytes,
        tripped: tripped.clone(),
    };
    let got = extract_tar(reader, scratch);
    let got = match got {
        Ok(g) => g,
        Err(e) => {
            let _ = std::fs::remove_dir_all(scratch);
            if tripped.get() {
                return Err(ArchiveError::TooLarge(max_bytes));
            }
            return Err(e.into());
        }
    };
    let mut out = Restored {
        files: got.files,
        bytes: got.bytes,
        problems: got.problems,
    };
    let merged = merge(scratch, workspace, Path::new(""), &mut out.problems);
    let _ = std::fs::remove_dir_all(scratch);
    merged?;
    Ok(out)
}

/// Move the tree `from/rel` into `to/rel`, whose directories are checked
/// to be real directories before anything goes into them.
fn merge(
    from: &Path,
    to: &Path,
    rel: &Path,
    problems: &mut Vec<String>,
) -> Result<(), ArchiveError> {
    let dir = from.join(rel);
    for entry in std::fs::read_dir(&dir).map_err(io_at(&dir))? {
        let entry = entry.map_err(io_at(&dir))?;
        let r = rel.join(entry.file_name());
        let (src, dst) = (from.join(&r), to.join(&r));
        // Only directories and regular files come out of the extractor.
        let src_dir = entry.file_type().map_err(io_at(&src))?.is_dir();
        let there = std::fs::symlink_metadata(&dst);
        match there {
            Ok(m) if m.is_dir() && src_dir => merge(from, to, &r, problems)?,
            Ok(m) if m.is_dir() => {
                problems.push(format!("{}: a directory in the workspace", r.display()));
            }
            Ok(_) if src_dir => {
                problems.push(format!("{}: not a directory in the workspace", r.display()));
            }
            // A file or a link: replaced by the rename, never followed.
            Ok(_) => std::fs::rename(&src, &dst).map_err(io_at(&dst))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::rename(&src, &dst).map_err(io_at(&dst))?
            }
            Err(e) => return Err(ArchiveError::Io { path: dst, err: e }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gzipped tar of raw entries (name bytes written as they are, so
    /// `..` and absolute names get through).
    fn hostile(entries: &[(tar::EntryType, &str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (kind, path, link, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_size(data.len() as u64);
            h.set_mode(0o6755);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn pack_then_unpack_is_byte_identical_and_replaces_files() {
        let d = tempfile::tempdir().unwrap();
        let from = d.path().join("from");
        std::fs::create_dir_all(from.join("vendor/lib")).unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(from.join("vendor/lib/big.bin"), &big).unwrap();
        std::fs::write(from.join("vendor/a.txt"), b"a").unwrap();
        let archive = d.path().join("c.tar.gz");
        let files = vec![
            PathBuf::from("vendor/lib/big.bin"),
            PathBuf::from("vendor/a.txt"),
        ];
        pack(&from, &files, &archive).unwrap();
        let ws = d.path().join("ws");
        std::fs::create_dir_all(ws.join("vendor")).unwrap();
        std::fs::write(ws.join("vendor/a.txt"), b"old").unwrap();
        std::fs::write(ws.join("tracked.txt"), b"kept").unwrap();
        let got = unpack(&archive, &ws, &d.path().join("scratch"), 1 << 30).unwrap();
        assert_eq!(
            (got.files, got.problems.len()),
            (2, 0),
            "{:?}",
            got.problems
        );
        assert_eq!(std::fs::read(ws.join("vendor/lib/big.bin")).unwrap(), big);
        assert_eq!(std::fs::read(ws.join("vendor/a.txt")).unwrap(), b"a");
        assert_eq!(std::fs::read(ws.join("tracked.txt")).unwrap(), b"kept");
        assert!(!d.path().join("scratch").exists());
    }

    #[test]
    fn hostile_archives_cannot_escape_plant_links_or_inflate_without_bound() {
        use tar::EntryType::{Regular, Symlink};
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let ws = d.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        // The workspace's own link (from the checkout) to a host directory.
        std::os::unix::fs::symlink(&outside, ws.join("linkdir")).unwrap();
        std::os::unix::fs::symlink(outside.join("target.txt"), ws.join("linkfile")).unwrap();
        let archive = d.path().join("evil.tar.gz");
        std::fs::write(
            &archive,
            hostile(&[
                (Regular, "../escape.txt", None, b"x"),
                (Regular, "/abs.txt", None, b"x"),
                (Symlink, "evil", Some("/etc"), b""),
                (Regular, "evil/passwd", None, b"owned"),
                (Regular, "linkdir/planted.txt", None, b"x"),
                (Regular, "linkfile", None, b"replaced"),
                (Regular, "ok.txt", None, b"fine"),
            ]),
        )
        .unwrap();
        let got = unpack(&archive, &ws, &d.path().join("scratch"), 1 << 20).unwrap();
        assert!(!d.path().join("escape.txt").exists() && !Path::new("/abs.txt").exists());
        assert!(
            std::fs::symlink_metadata(ws.join("evil")).unwrap().is_dir(),
            "no link is ever created"
        );
        assert!(
            !outside.join("planted.txt").exists(),
            "never through a link"
        );
        assert!(
            !outside.join("target.txt").exists(),
            "a link is replaced, not followed"
        );
        assert!(std::fs::symlink_metadata(ws.join("linkfile"))
            .unwrap()
            .is_file());
        assert_eq!(std::fs::read(ws.join("ok.txt")).unwrap(), b"fine");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ws.join("ok.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "no setuid from a cache");
        let text = got.problems.join("\n");
        assert!(text.contains("not a plain relative path"), "{text}");
        assert!(text.contains("not a regular file"), "{text}");
        assert!(
            text.contains("linkdir: not a directory in the workspace"),
            "{text}"
        );

        // Oversize: 2 MiB of zeros (a few KiB gzipped) past a 1 MiB bound.
        let bomb = d.path().join("bomb.tar.gz");
        std::fs::write(
            &bomb,
            hostile(&[(Regular, "zeros", None, &vec![0u8; 2 << 20])]),
        )
        .unwrap();
        assert!(std::fs::metadata(&bomb).unwrap().len() < 64 << 10);
        let ws2 = d.path().join("ws2");
        std::fs::create_dir(&ws2).unwrap();
        let e = unpack(&bomb, &ws2, &d.path().join("scratch2"), 1 << 20).unwrap_err();
        assert!(matches!(e, ArchiveError::TooLarge(_)), "{e}");
        assert!(!ws2.join("zeros").exists() && !d.path().join("scratch2").exists());
        // Not an archive at all.
        std::fs::write(&bomb, b"not gzip").unwrap();
        assert!(unpack(&bomb, &ws2, &d.path().join("scratch3"), 1 << 20).is_err());
    }
}
