//! GitHub's runner distribution: a directory as it is, or a tarball
//! (`actions-runner-linux-x64-<version>.tar.gz`) checked against its
//! SHA-256 when one is configured and unpacked once into
//! `<cache>/github-runner/<sha256>/`. The VM gets a per-VM disk built from
//! that directory; the host copy is never written by a VM.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::config::GithubConfig;
use super::GithubError;

/// The directory to attach, unpacking the tarball when needed. Blocking.
pub fn prepare(cfg: &GithubConfig, cache_dir: &Path) -> Result<PathBuf, GithubError> {
    let path = &cfg.runner_dist;
    let err = |what: String| GithubError::Distribution {
        entry: cfg.name.clone(),
        path: path.clone(),
        what,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.is_dir() {
        if cfg.runner_dist_sha256.is_some() {
            return Err(err(
                "runner_dist_sha256 checks a tarball; this is a directory".into(),
            ));
        }
        if !path.join("run.sh").is_file() {
            return Err(err("has no run.sh".into()));
        }
        return Ok(path.clone());
    }
    let digest = sha256_file(path).map_err(|e| err(e.to_string()))?;
    if let Some(want) = &cfg.runner_dist_sha256 {
        if !want.eq_ignore_ascii_case(&digest) {
            return Err(err(format!(
                "SHA-256 is {digest}, not the configured {want}; download it again or correct runner_dist_sha256"
            )));
        }
    }
    let dest = cache_dir.join("github-runner").join(&digest);
    if dest.join("run.sh").is_file() {
        return Ok(dest);
    }
    let parent = cache_dir.join("github-runner");
    std::fs::create_dir_all(&parent).map_err(|e| err(format!("{}: {e}", parent.display())))?;
    let tmp = tempdir_in(&parent).map_err(|e| err(e.to_string()))?;
    let unpacked = (|| -> std::io::Result<()> {
        let f = std::fs::File::open(path)?;
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(f));
        a.set_preserve_permissions(true);
        a.set_overwrite(false);
        // `Archive::unpack` skips entries that would land outside `tmp`.
        a.unpack(&tmp)
    })();
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err(format!("unpacking: {e}")));
    }
    if !tmp.join("run.sh").is_file() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err("the tarball has no run.sh at its top".into()));
    }
    if let Err(e) = std::fs::rename(&tmp, &dest) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another kiln unpacked the same digest meanwhile.
        if !dest.join("run.sh").is_file() {
            return Err(err(format!("publishing {}: {e}", dest.display())));
        }
    }
    tracing::info!(dist = %dest.display(), sha256 = %digest, "runner distribution unpacked");
    Ok(dest)
}

fn tempdir_in(parent: &Path) -> std::io::Result<PathBuf> {
    for i in 0..100u32 {
        let p = parent.join(format!(".unpack-{}-{i}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary directory name"))
}

/// The file's SHA-256, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dist: &Path, sha: Option<String>) -> GithubConfig {
        let mut c: crate::config::Config = toml::from_str(&format!(
            "[[github]]\nname='g'\nrepository='a/b'\ntoken='t'\nrunner_dist={:?}\n\
             [[github.profiles]]\nname='p'\nlabels=['x']\nimage='i'\n",
            dist.display().to_string()
        ))
        .unwrap();
        c.github[0].runner_dist_sha256 = sha;
        c.github.remove(0)
    }

    fn tarball(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
        let p = dir.join("runner.tar.gz");
        let f = std::fs::File::create(&p).unwrap();
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            f,
            flate2::Compression::fast(),
        ));
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        p
    }

    #[test]
    fn a_tarball_is_checked_and_unpacked_once() {
        let d = tempfile::tempdir().unwrap();
        let t = tarball(d.path(), &[("run.sh", b"#!/bin/sh\n"), ("bin/x", b"x")]);
        let sha = sha256_file(&t).unwrap();
        let cache = d.path().join("cache");
        let got = prepare(&cfg(&t, Some(sha.clone())), &cache).unwrap();
        assert_eq!(got, cache.join("github-runner").join(&sha));
        assert_eq!(std::fs::read(got.join("run.sh")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(prepare(&cfg(&t, None), &cache).unwrap(), got, "cached");
        let wrong = "0".repeat(64);
        let e = prepare(&cfg(&t, Some(wrong)), &cache)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("SHA-256 is {sha}")), "{e}");
    }

    #[test]
    fn bad_distributions_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("cache");
        let t = tarball(d.path(), &[("README", b"no runner")]);
        assert!(prepare(&cfg(&t, None), &cache).is_err(), "no run.sh");
        let dir = d.path().join("dir");
        std::fs::create_dir(&dir).unwrap();
        assert!(prepare(&cfg(&dir, None), &cache).is_err(), "no run.sh");
        std::fs::write(dir.join("run.sh"), "").unwrap();
        assert_eq!(prepare(&cfg(&dir, None), &cache).unwrap(), dir);
        assert!(prepare(&cfg(&dir, Some("a".repeat(64))), &cache).is_err());
    }
}
