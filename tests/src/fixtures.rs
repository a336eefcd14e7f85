//! Small, real OCI image layouts built from the host's `busybox-static`,
//! without a registry or the internet, and a Debian minbase one from
//! `debootstrap` for the realistic case.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// What goes into a busybox image's config.
#[derive(Debug, Clone)]
pub struct BusyboxImage {
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    /// Extra files: (path inside the image, contents, mode).
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// The config's `Entrypoint` (none when empty).
    pub entrypoint: Vec<String>,
    /// The config's `Cmd`.
    pub cmd: Vec<String>,
    /// The config's `ExposedPorts` keys (`8080/tcp`).
    pub exposed_ports: Vec<String>,
}

impl Default for BusyboxImage {
    fn default() -> Self {
        BusyboxImage {
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            working_dir: String::new(),
            user: String::new(),
            files: Vec::new(),
            entrypoint: Vec::new(),
            cmd: vec!["/bin/sh".into()],
            exposed_ports: Vec::new(),
        }
    }
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// The static busybox on this host.
pub fn busybox_path() -> Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("busybox is not installed (apt-get install busybox-static)")
}

fn applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
        .map(String::from)
        .collect())
}

fn header(kind: tar::EntryType, path: &str, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_path(path)
        .expect("fixture paths are short and relative");
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

impl BusyboxImage {
    /// Write an OCI image layout at `dir` (created), tagged `latest`.
    pub fn build(&self, dir: &Path) -> Result<()> {
        let busybox = busybox_path()?;
        let bb = std::fs::read(&busybox)?;
        let mut layer = tar::Builder::new(Vec::new());
        for (d, mode) in [
            ("bin", 0o755),
            ("etc", 0o755),
            ("tmp", 0o1777),
            ("root", 0o700),
            ("home", 0o755),
            ("home/builder", 0o755),
            ("usr", 0o755),
            ("usr/bin", 0o755),
            ("var", 0o755),
        ] {
            let mut h = header(tar::EntryType::Directory, &format!("{d}/"), mode, 0);
            if d == "home/builder" {
                h.set_uid(1000);
                h.set_gid(1000);
                h.set_cksum();
            }
            layer.append(&h, std::io::empty())?;
        }
        layer.append(
            &header(
                tar::EntryType::Regular,
                "bin/busybox",
                0o755,
                bb.len() as u64,
            ),
            bb.as_slice(),
        )?;
        for a in applets(&busybox)? {
            let mut h = header(tar::EntryType::Symlink, &format!("bin/{a}"), 0o777, 0);
            h.set_link_name("busybox")?;
            h.set_cksum();
            layer.append(&h, std::io::empty())?;
        }
        let mut files: Vec<(String, Vec<u8>, u32)> = vec![
            ("etc/passwd".into(), b"root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000:builder:/home/builder:/bin/sh\n".to_vec(), 0o644),
            ("etc/group".into(), b"root:x:0:\nbuilder:x:1000:\nwheel:x:10:builder\n".to_vec(), 0o644),
            ("etc/os-release".into(), b"NAME=\"kiln busybox fixture\"\nID=busybox\n".to_vec(), 0o644),
        ];
        files.extend(self.files.iter().cloned());
        for (p, data, mode) in &files {
            layer.append(
                &header(tar::EntryType::Regular, p, *mode, data.len() as u64),
                data.as_slice(),
            )?;
        }
        let tar_bytes = layer.into_inner()?;
        let ports: serde_json::Map<String, serde_json::Value> = self
            .exposed_ports
            .iter()
            .map(|p| (p.clone(), serde_json::json!({})))
            .collect();
        let mut config = serde_json::json!({
            "Env": self.env, "WorkingDir": self.working_dir, "User": self.user,
            "Cmd": self.cmd, "ExposedPorts": ports,
        });
        if !self.entrypoint.is_empty() {
            config["Entrypoint"] = serde_json::json!(self.entrypoint);
        }
        write_layout_config(dir, &[tar_bytes], config)
    }
}

/// Write an OCI layout with `layers` (uncompressed tars, gzip-compressed here).
pub fn write_layout(
    dir: &Path,
    layers: &[Vec<u8>],
    env: &[String],
    working_dir: &str,
    user: &str,
) -> Result<()> {
    let config = serde_json::json!({"Env": env, "WorkingDir": working_dir, "User": user, "Cmd": ["/bin/sh"]});
    write_layout_config(dir, layers, config)
}

/// [`write_layout`] with the image config's `config` object as given.
pub fn write_layout_config(
    dir: &Path,
    layers: &[Vec<u8>],
    container_config: serde_json::Value,
) -> Result<()> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> Result<String> {
        let d = sha256(bytes);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes)?;
        Ok(d)
    };
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for tar_bytes in layers {
        diff_ids.push(sha256(tar_bytes));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar_bytes)?;
        let gz = gz.finish()?;
        let d = put(&gz)?;
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": gz.len()}));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config)?;
    let cd = put(&config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs,
    }))?;
    let md = put(&manifest)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}

/// A Debian minbase image from `debootstrap` (needs the package mirror the
/// host's apt uses; about 30 s). `suite` e.g. `bookworm`.
pub fn debian_minbase(dir: &Path, suite: &str) -> Result<()> {
    let work = dir.with_extension("debootstrap");
    let _ = std::fs::remove_dir_all(&work);
    let mirror = host_mirror(suite).unwrap_or_else(|| "http://deb.debian.org/debian".into());
    let st = Command::new("debootstrap")
        .args(["--variant=minbase", suite])
        .arg(&work)
        .arg(&mirror)
        .status()
        .context("running debootstrap (apt-get install debootstrap)")?;
    if !st.success() {
        bail!("debootstrap {suite} from {mirror} failed");
    }
    let _ = std::fs::remove_dir_all(work.join("var/cache/apt/archives"));
    // GNU tar keeps hard links, device nodes, owners and xattrs as they are.
    let out = Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-C"])
        .arg(&work)
        .args(["-cf", "-", "."])
        .output()
        .context("running tar")?;
    if !out.status.success() {
        bail!(
            "tar of the debootstrap tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tar_bytes = out.stdout;
    std::fs::remove_dir_all(&work)?;
    write_layout(
        dir,
        &[tar_bytes],
        &["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        "/",
        "",
    )
}

/// The host's apt mirror for `suite` (a `deb` line or a deb822 stanza that
/// lists that suite), so debootstrap uses what apt already reaches.
fn host_mirror(suite: &str) -> Option<String> {
    let mut texts = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            texts.push(std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    texts.push(std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    for t in &texts {
        // deb822: blank-line separated stanzas.
        for stanza in t.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
            };
            let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) else {
                continue;
            };
            if suites.split_whitespace().any(|s| s == suite) {
                if let Some(u) = uris.split_whitespace().next() {
                    return Some(u.to_string());
                }
            }
        }
        for l in t.lines() {
            let words: Vec<&str> = l.split_whitespace().collect();
            if words.first() == Some(&"deb") {
                let rest: Vec<&str> = words[1..]
                    .iter()
                    .copied()
                    .filter(|w| !w.starts_with('['))
                    .collect();
                if rest.len() >= 2 && rest[1] == suite {
                    return Some(rest[0].to_string());
                }
            }
        }
    }
    None
}

/// Runs `git <args>` in `dir` as a test user (no global configuration
/// needed); panics with git's stderr if it fails.
pub fn git(dir: &Path, args: &[&str]) {
    let o = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Makes `dir` a git checkout with everything in it committed.
pub fn git_commit_all(dir: &Path) {
    git(dir, &["init", "-q"]);
    git(dir, &["add", "."]);
    git(dir, &["commit", "-q", "-m", "init"]);
}
