//! Artifacts: asking the agent for the job's files, spooling the tar
//! stream it sends (bounded), and extracting that hostile archive
//! ([`extract_artifacts`]): only regular files and directories with plain
//! relative paths, never through a link, without setuid bits, with every
//! size the guest controls bounded before it is read.

use std::path::{Path, PathBuf};

use kiln_agent::proto::{self, Frame, Stream};
use kiln_pipelines::JobSpec;

use super::conversation::Conversation;
use super::outcome::{human_bytes, protocol, sys, Early};
use crate::joblog::JobSink;

/// Ask the agent for the artifact files, spool the tar stream to `tar`
/// (bounded), and extract it into `to`. What could not be collected is
/// said in the job's log. Returns whether the artifacts were over
/// `max_bytes` (some were left out): the job then fails.
pub(super) async fn collect_artifacts(
    io: &mut Conversation<'_>,
    job: &JobSpec,
    sink: &mut dyn JobSink,
    paths: Vec<String>,
    max_bytes: u64,
    tar: &Path,
    to: &Path,
) -> Result<bool, Early> {
    let req = proto::CollectArtifacts {
        paths,
        exclude: Vec::new(),
        max_bytes,
    };
    let (end, got) = collect_files(io, job, sink, req, tar, to, "artifact").await?;
    if end.truncated {
        say(
            sink,
            format!(
                "ERROR: the job's artifacts are over the limit of {}: {} files ({}) were collected, \
                 {} more files ({}) were left out; failing the job",
                human_bytes(max_bytes),
                got.files,
                human_bytes(got.bytes),
                end.left_out_files,
                human_bytes(end.left_out_bytes),
            ),
        );
    }
    Ok(end.truncated)
}

/// A runner line in the job's log.
fn say(sink: &mut dyn JobSink, line: String) {
    sink.output(0, Stream::Stderr, format!("kiln: {line}\n").as_bytes());
}

/// Ask the agent for the workspace files `req` selects, spool the tar
/// stream to `tar` (bounded by `req.max_bytes` plus the tar's overhead),
/// and extract it into `to` (which must not exist). Files left out are
/// said in the job's log as "`what` left out". Returns the agent's
/// account and what was extracted.
pub(super) async fn collect_files(
    io: &mut Conversation<'_>,
    job: &JobSpec,
    sink: &mut dyn JobSink,
    req: proto::CollectArtifacts,
    tar: &Path,
    to: &Path,
    what: &str,
) -> Result<(proto::ArtifactsEnd, Extracted), Early> {
    use std::io::Write;
    let max_bytes = req.max_bytes;
    io.send(&Frame::CollectArtifacts(req)).await?;
    let io_err = |e: std::io::Error| sys(format!("spooling {what}s to {}: {e}", tar.display()));
    let mut file = std::io::BufWriter::new(std::fs::File::create(tar).map_err(io_err)?);
    let limit = max_bytes + ARTIFACT_TAR_OVERHEAD;
    let mut written = 0u64;
    let end = loop {
        match io.next_event(job, sink).await? {
            Frame::Artifact(chunk) => {
                written += chunk.len() as u64;
                if written > limit {
                    return Err(protocol(format!(
                        "more than {limit} bytes of {what}s (the limit is {max_bytes} bytes of files)"
                    )));
                }
                file.write_all(&chunk).map_err(io_err)?;
            }
            Frame::ArtifactsEnd(end) => break end,
            other => {
                return Err(protocol(format!(
                    "{} while sending {what}s",
                    other.describe()
                )))
            }
        }
    };
    file.flush().map_err(io_err)?;
    drop(file);
    // The agent's own notes (guest data: quoted and counted there,
    // re-checked here).
    for p in end.problems.iter().take(proto::MAX_PROBLEMS + 1) {
        let max = 2 * proto::QUOTE_MAX + 100;
        let p = if proto::is_clean_line(p, max) {
            p.clone()
        } else {
            proto::quote(p.as_bytes(), max)
        };
        say(sink, format!("{what} left out: {p}"));
    }
    let (tar, to2) = (tar.to_path_buf(), to.to_path_buf());
    let got = tokio::task::spawn_blocking(move || extract_artifacts(&tar, &to2))
        .await
        .map_err(|e| sys(format!("{what}s task: {e}")))?
        .map_err(|e| match e {
            ArtifactError::Io { .. } => sys(format!("extracting {what}s: {e}")),
            _ => protocol(e.to_string()),
        })?;
    for p in &got.problems {
        say(sink, format!("{what} left out: {p}"));
    }
    tracing::debug!(files = got.files, bytes = got.bytes, "{what}s received");
    Ok((end, got))
}

/// Tar headers, GNU long names and padding around the artifact files'
/// contents, at most: per file a header, a long name of up to
/// [`proto::MAX_ARTIFACT_PATH`] bytes with its header, and padding.
const ARTIFACT_TAR_OVERHEAD: u64 = proto::MAX_ARTIFACT_FILES * 6 * 1024 + (1 << 20);
/// Most bytes of names in one job's artifact archive (all paths together).
const MAX_ARTIFACT_NAME_BYTES: u64 = 64 << 20;
/// Most PAX extension bytes per entry (kiln's agent writes none).
const MAX_PAX_BYTES: u64 = 64 * 1024;

/// What extracting the guest's artifact archive gave.
#[derive(Debug, Default)]
pub struct Extracted {
    pub files: u64,
    /// Bytes of file contents.
    pub bytes: u64,
    /// Entries that were not extracted, and why (guest names quoted, at most
    /// [`proto::MAX_PROBLEMS`] lines plus a count).
    pub problems: Vec<String>,
}

/// Why the guest's artifact archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("malformed artifact archive: {0}")]
    Malformed(String),
    #[error("the artifact archive has more than {0}")]
    TooMany(String),
}

/// Extract the guest's artifact tar into `to` (created; must not exist).
/// The tar is hostile: only regular files and directories with plain
/// relative paths are written, never through a symlink (none is ever
/// created), never over an existing file, without setuid/setgid bits.
/// Every size it controls is bounded before anything is allocated: names
/// ([`proto::MAX_ARTIFACT_PATH`] each, [`MAX_ARTIFACT_NAME_BYTES`] in all),
/// extension headers, the number of files and of directories. Names need
/// not be UTF-8.
pub fn extract_artifacts(tar: &Path, to: &Path) -> Result<Extracted, ArtifactError> {
    let file = std::fs::File::open(tar).map_err(|err| ArtifactError::Io {
        path: tar.to_path_buf(),
        err,
    })?;
    extract_tar(std::io::BufReader::new(file), to)
}

/// [`extract_artifacts`] from any reader of a tar stream (a cache archive
/// is gzipped, and its reader bounds the bytes it inflates).
pub fn extract_tar(reader: impl std::io::Read, to: &Path) -> Result<Extracted, ArtifactError> {
    use std::ffi::OsString;
    use std::io::Read;
    use std::os::unix::ffi::OsStringExt;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Component;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| ArtifactError::Io { path, err }
    };
    let bad = |e: std::io::Error| ArtifactError::Malformed(e.to_string());
    std::fs::create_dir(to).map_err(io(to))?;
    let mut archive = tar::Archive::new(reader);
    // Raw: the tar crate would read GNU long names and PAX headers of any
    // size into memory; here they are bounded first.
    let entries = archive.entries().map_err(bad)?.raw(true);
    let mut out = Extracted::default();
    let mut problems = 0usize;
    let mut problem = |out: &mut Extracted, name: &[u8], why: &str| {
        problems += 1;
        if out.problems.len() < proto::MAX_PROBLEMS {
            out.problems
                .push(format!("{}: {why}", proto::quote(name, proto::QUOTE_MAX)));
        }
    };
    let (mut dirs, mut name_bytes) = (0u64, 0u64);
    let max_dirs = 2 * proto::MAX_ARTIFACT_FILES;
    let mut long_name: Option<Vec<u8>> = None;
    for entry in entries {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        let size = entry.header().entry_size().map_err(bad)?;
        let long = kind.is_gnu_longname() || kind.is_gnu_longlink();
        if long || kind.is_pax_local_extensions() || kind.is_pax_global_extensions() {
            let limit = if long {
                proto::MAX_ARTIFACT_PATH as u64 + 1
            } else {
                MAX_PAX_BYTES
            };
            if size > limit {
                return Err(ArtifactError::Malformed(format!(
                    "an extension header of {size} bytes (at most {limit})"
                )));
            }
            let mut data = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut data).map_err(bad)?;
            if kind.is_gnu_longname() {
                if long_name.is_some() {
                    return Err(ArtifactError::Malformed(
                        "two long names for one entry".into(),
                    ));
                }
                while data.last() == Some(&0) {
                    data.pop();
                }
                long_name = Some(data);
            }
            // Long link names and PAX records: kiln's agent writes none,
            // and links are never extracted; ignored.
            continue;
        }
        let name = match long_name.take() {
            Some(n) => n,
            None => entry.path_bytes().into_owned(),
        };
        name_bytes += name.len() as u64;
        if name_bytes > MAX_ARTIFACT_NAME_BYTES {
            return Err(ArtifactError::TooMany(format!(
                "{MAX_ARTIFACT_NAME_BYTES} bytes of names"
            )));
        }
        let rel = PathBuf::from(OsString::from_vec(name.clone()));
        if name.len() > proto::MAX_ARTIFACT_PATH
            || rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            problem(&mut out, &name, "not a plain relative path");
            continue;
        }
        if rel.components().any(|c| c.as_os_str().len() > 255) {
            problem(&mut out, &name, "a name in it is longer than 255 bytes");
            continue;
        }
        if kind.is_dir() {
            dirs += make_dirs(to, &rel)?;
            if dirs > max_dirs {
                return Err(ArtifactError::TooMany(format!("{max_dirs} directories")));
            }
            continue;
        }
        if !kind.is_file() {
            // Symlinks, hard links, devices: never extracted.
            problem(&mut out, &name, "not a regular file");
            continue;
        }
        out.files += 1;
        if out.files > proto::MAX_ARTIFACT_FILES {
            return Err(ArtifactError::TooMany(format!(
                "{} files",
                proto::MAX_ARTIFACT_FILES
            )));
        }
        if let Some(parent) = rel.parent() {
            dirs += make_dirs(to, parent)?;
            if dirs > max_dirs {
                return Err(ArtifactError::TooMany(format!("{max_dirs} directories")));
            }
        }
        let dest = to.join(&rel);
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode | 0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&dest)
            .map_err(io(&dest))?;
        std::io::copy(&mut entry, &mut f).map_err(io(&dest))?;
        out.bytes += size;
    }
    if problems > out.problems.len() {
        let more = problems - out.problems.len();
        out.problems.push(format!("... and {more} more"));
    }
    Ok(out)
}

/// Create the directories of `rel` below `root` one by one, never through
/// anything but a real directory. Returns how many were created.
fn make_dirs(root: &Path, rel: &Path) -> Result<u64, ArtifactError> {
    let mut path = root.to_path_buf();
    let mut made = 0;
    for c in rel.components() {
        path.push(c);
        match std::fs::create_dir(&path) {
            Ok(()) => made += 1,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                    return Err(ArtifactError::Malformed(format!(
                        "{} is both a file and a directory",
                        proto::quote(
                            path.strip_prefix(root)
                                .unwrap_or(&path)
                                .as_os_str()
                                .as_encoded_bytes(),
                            proto::QUOTE_MAX
                        )
                    )));
                }
            }
            Err(err) => return Err(ArtifactError::Io { path, err }),
        }
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_artifact_tars_cannot_escape_or_plant_links() {
        let d = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |kind: tar::EntryType, path: &str, link: Option<&str>, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            // Write the name bytes raw, so `..` and absolute paths get through.
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_size(data.len() as u64);
            h.set_mode(0o4755);
            h.set_cksum();
            b.append(&h, data).unwrap();
        };
        add(tar::EntryType::Symlink, "evil", Some("/etc"), b"");
        add(tar::EntryType::Regular, "evil/passwd", None, b"owned");
        add(tar::EntryType::Regular, "../escape.txt", None, b"x");
        add(tar::EntryType::Regular, "/abs.txt", None, b"x");
        add(tar::EntryType::Char, "dev-null", None, b"");
        add(tar::EntryType::Regular, "dist/ok.txt", None, b"fine");
        add(tar::EntryType::Regular, "dist/ok.txt", None, b"again");
        let tar_path = d.path().join("a.tar");
        std::fs::write(&tar_path, b.into_inner().unwrap()).unwrap();
        let to = d.path().join("out");
        // The duplicate is refused (never written over).
        assert!(extract_artifacts(&tar_path, &to).is_err());
        assert_eq!(std::fs::read(to.join("dist/ok.txt")).unwrap(), b"fine");
        assert!(
            std::fs::symlink_metadata(to.join("evil")).is_ok_and(|m| m.is_dir()),
            "a real directory, no link"
        );
        assert_eq!(std::fs::read(to.join("evil/passwd")).unwrap(), b"owned");
        assert!(!to.join("dev-null").exists());
        assert!(!d.path().join("escape.txt").exists() && !to.join("abs.txt").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(to.join("dist/ok.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "no setuid from the guest");
    }

    /// A tar header block for `name` (raw bytes) of `kind` and `size`.
    fn raw_header(kind: u8, name: &[u8], size: u64) -> [u8; 512] {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        *h.as_bytes()
    }

    #[test]
    fn artifact_long_names_are_bounded_before_they_are_read() {
        let d = tempfile::tempdir().unwrap();
        // A GNU long name declaring 1.5 GiB (the tar crate would read it all
        // into memory); the file itself is tiny.
        let mut t = raw_header(b'L', b"././@LongLink", 3 << 29).to_vec();
        t.extend_from_slice(&[b'a'; 1024]);
        let tar_path = d.path().join("a.tar");
        std::fs::write(&tar_path, &t).unwrap();
        let e = extract_artifacts(&tar_path, &d.path().join("out")).unwrap_err();
        assert!(
            e.to_string()
                .contains("extension header of 1610612736 bytes"),
            "{e}"
        );
        // A legitimate long name, and a name that is not UTF-8.
        let long = format!("{}/f.txt", vec!["d".repeat(100); 3].join("/"));
        let mut t = raw_header(b'L', b"././@LongLink", long.len() as u64 + 1).to_vec();
        let mut name = long.clone().into_bytes();
        name.push(0);
        name.resize(512, 0);
        t.extend_from_slice(&name);
        t.extend_from_slice(&raw_header(b'0', b"ignored", 2));
        t.extend_from_slice(b"hi");
        t.resize(t.len() + 510, 0);
        t.extend_from_slice(&raw_header(b'0', b"odd\xffname", 1));
        t.push(b'x');
        t.resize(t.len() + 511, 0);
        let mut t2 = raw_header(b'L', b"././@LongLink", 301).to_vec();
        let mut n2 = vec![b'e'; 300];
        n2.resize(512, 0);
        t2.extend_from_slice(&n2);
        t2.extend_from_slice(&raw_header(b'0', b"x", 0));
        t.extend_from_slice(&t2);
        t.resize(t.len() + 1024, 0);
        std::fs::write(&tar_path, &t).unwrap();
        let to = d.path().join("out2");
        let got = extract_artifacts(&tar_path, &to).unwrap();
        assert_eq!((got.files, got.bytes), (2, 3), "{:?}", got.problems);
        assert_eq!(
            got.problems.len(),
            1,
            "the 300-byte name: {:?}",
            got.problems
        );
        assert_eq!(std::fs::read(to.join(&long)).unwrap(), b"hi");
        use std::os::unix::ffi::OsStrExt;
        let odd = to.join(std::ffi::OsStr::from_bytes(b"odd\xffname"));
        assert_eq!(std::fs::read(odd).unwrap(), b"x");
    }
}
