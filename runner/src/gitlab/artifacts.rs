//! Artifacts: pick files of the workspace by GitLab's glob patterns, zip
//! them for upload, and unpack the archives of `dependencies`; their
//! transfer, with retries.

use std::io::{Read, Write};
use std::path::{Component, Path};

use super::backoff::Backoff;
use super::client::Client;
use super::job::JobResponse;
use super::GitlabError;

pub use kiln_agent::glob::{matches, select};

/// A zip archive (deflate) of `files` (relative to `root`).
pub fn zip_files(root: &Path, files: &[String]) -> Result<Vec<u8>, GitlabError> {
    let zerr = |e: zip::result::ZipError| GitlabError::Archive(e.to_string());
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for f in files {
        let p = root.join(f);
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(&p)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0o644)
        };
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(mode)
            .large_file(true);
        w.start_file(f.as_str(), opts).map_err(zerr)?;
        let mut src = std::fs::File::open(&p)
            .map_err(|e| GitlabError::Archive(format!("{}: {e}", p.display())))?;
        std::io::copy(&mut src, &mut w)
            .map_err(|e| GitlabError::Archive(format!("{}: {e}", p.display())))?;
    }
    let c = w.finish().map_err(zerr)?;
    Ok(c.into_inner())
}

/// Unpack a zip archive into `root`; entries that would land outside it
/// are refused. Returns how many files were written.
pub fn unzip_into(archive: &[u8], root: &Path) -> Result<usize, GitlabError> {
    let zerr = |e: zip::result::ZipError| GitlabError::Archive(e.to_string());
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(archive)).map_err(zerr)?;
    let mut n = 0;
    for i in 0..z.len() {
        let mut entry = z.by_index(i).map_err(zerr)?;
        let Some(rel) = entry.enclosed_name() else {
            return Err(GitlabError::Archive(format!(
                "unsafe path in archive: {}",
                entry.name()
            )));
        };
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(GitlabError::Archive(format!(
                "unsafe path in archive: {}",
                entry.name()
            )));
        }
        let dest = root.join(&rel);
        let io = |e: std::io::Error| GitlabError::Archive(format!("{}: {e}", dest.display()));
        if entry.is_dir() {
            std::fs::create_dir_all(&dest).map_err(io)?;
            continue;
        }
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut buf = Vec::new();
        entry.read_to_end(&mut buf).map_err(io)?;
        let mut f = std::fs::File::create(&dest).map_err(io)?;
        f.write_all(&buf).map_err(io)?;
        if let Some(mode) = entry.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode & 0o777));
        }
        n += 1;
    }
    Ok(n)
}

/// Download a dependency's artifacts, retrying passing faults.
pub async fn download_with_retries(
    client: &Client,
    id: u64,
    token: &str,
) -> Result<Vec<u8>, GitlabError> {
    let mut b = Backoff::new();
    let mut last = None;
    for _ in 0..5 {
        match client.download_artifacts(id, token).await {
            Ok(z) => return Ok(z),
            Err(e) if matches!(e.status(), Some(401 | 403 | 404)) => return Err(e),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(b.next()).await;
    }
    Err(last.unwrap_or_else(|| GitlabError::Archive("download failed".into())))
}

/// Upload the job's artifacts, retrying passing faults (not 4xx).
#[allow(clippy::too_many_arguments)]
pub async fn upload_with_retries(
    client: &Client,
    job: &JobResponse,
    zip: Vec<u8>,
    filename: &str,
    kind: &str,
    format: &str,
    expire_in: Option<&str>,
) -> Result<(), GitlabError> {
    let mut b = Backoff::new();
    let mut last = None;
    for _ in 0..5 {
        match client
            .upload_artifacts(
                job.id,
                &job.token,
                zip.clone(),
                filename,
                kind,
                format,
                expire_in,
            )
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if matches!(e.status(), Some(400..=499)) => return Err(e),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(b.next()).await;
    }
    Err(last.unwrap_or_else(|| GitlabError::Archive("upload failed".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_patterns_match() {
        assert!(matches("out/", "out/a.txt"));
        assert!(matches("out", "out/sub/b"));
        assert!(matches("out/*", "out/a.txt"));
        assert!(
            matches("out/*", "out/sub/b"),
            "a matched directory takes its contents"
        );
        assert!(matches("*.log", "x.log"));
        assert!(!matches("*.log", "d/x.log"));
        assert!(matches("**/*.log", "d/e/x.log"));
        assert!(matches("./build/a?.bin", "build/ab.bin"));
        assert!(!matches("out/", "outside/a"));
        assert!(!matches("", "a"));
    }

    #[test]
    fn select_zip_and_unzip_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("out/sub")).unwrap();
        std::fs::write(src.join("out/a.txt"), "a").unwrap();
        std::fs::write(src.join("out/sub/b.log"), "b").unwrap();
        std::fs::write(src.join("other"), "o").unwrap();
        let files = select(&src, &["out/".into()], &["**/*.log".into()]);
        assert_eq!(files, vec!["out/a.txt"]);
        let z = zip_files(&src, &files).unwrap();
        let dst = d.path().join("dst");
        assert_eq!(unzip_into(&z, &dst).unwrap(), 1);
        assert_eq!(std::fs::read_to_string(dst.join("out/a.txt")).unwrap(), "a");
    }
}
