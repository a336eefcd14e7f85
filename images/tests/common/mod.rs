//! Test support: a local `docker-registry` on a port it picks, image layouts
//! built from the host's busybox, and `skopeo` pushes.
#![allow(dead_code, unused_macros, unused_imports)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Why registry tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    tools().iter().find_map(kiln_testkit::Need::unmet)
}

/// What the registry tests need: a local registry, skopeo to push to it,
/// and busybox to build the images pushed.
pub fn tools() -> [kiln_testkit::Need; 3] {
    [
        kiln_testkit::tool("docker-registry", "docker-registry"),
        kiln_testkit::tool("skopeo", "skopeo"),
        kiln_testkit::tool("busybox", "busybox-static"),
    ]
}

/// A `docker-registry` serving on 127.0.0.1; killed on drop.
pub struct TestRegistry {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

/// The port in the registry's `listening on 127.0.0.1:<port>` log line.
fn listening_port(log: &str) -> Option<u16> {
    let rest = &log[log.find("listening on 127.0.0.1:")? + "listening on 127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

impl TestRegistry {
    /// The registry binds a port the kernel picks (`127.0.0.1:0`) and
    /// holds it from then on; the port is read from its log. (Picking a
    /// free port first and handing it over would race with every other
    /// process binding ports meanwhile.)
    pub fn start() -> TestRegistry {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n  secret: kiln-test-registry\n",
                data.display()
            ),
        )
        .unwrap();
        let log_path = dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .env_remove("REGISTRY_HTTP_ADDR")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let t0 = Instant::now();
        let port = loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(port) = listening_port(&log) {
                break port;
            }
            let exited = child.try_wait().ok().flatten();
            // Generous: it starts in well under a second, unless the host
            // is loaded.
            if exited.is_some() || t0.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("docker-registry did not start ({exited:?}): {log}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        TestRegistry { port, dir, child }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `skopeo copy` a layout (`oci:DIR:TAG`) to `REPO:TAG` here.
    pub fn push(&self, src: &str, repo_tag: &str, extra: &[&str]) {
        push_to(&self.host(), src, repo_tag, extra)
    }

    /// Where the registry keeps a blob's bytes.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn push_to(host: &str, src: &str, repo_tag: &str, extra: &[&str]) {
    let o = Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .args(extra)
        .arg(src)
        .arg(format!("docker://{host}/{repo_tag}"))
        .output()
        .expect("run skopeo");
    assert!(
        o.status.success(),
        "skopeo copy {src} → {repo_tag}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn header(kind: tar::EntryType, path: &str, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_path(path).unwrap();
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

/// A layer tar: busybox (with `sh`, `cat`, `ls` links) when `base`, plus
/// `files`.
pub fn layer_tar(base: bool, files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    if base {
        for d in ["bin", "etc", "tmp"] {
            b.append(
                &header(tar::EntryType::Directory, &format!("{d}/"), 0o755, 0),
                std::io::empty(),
            )
            .unwrap();
        }
        let bb = std::fs::read("/bin/busybox").unwrap();
        b.append(
            &header(
                tar::EntryType::Regular,
                "bin/busybox",
                0o755,
                bb.len() as u64,
            ),
            bb.as_slice(),
        )
        .unwrap();
        for a in ["sh", "cat", "ls"] {
            let mut h = header(tar::EntryType::Symlink, &format!("bin/{a}"), 0o777, 0);
            h.set_link_name("busybox").unwrap();
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        }
    }
    for (p, data) in files {
        b.append(
            &header(tar::EntryType::Regular, p, 0o644, data.len() as u64),
            *data,
        )
        .unwrap();
    }
    b.into_inner().unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Comp {
    Gzip,
    Zstd,
}

/// Blobs of an image, written into `dir/blobs/sha256`.
pub struct Built {
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub layer_digests: Vec<String>,
    pub diff_ids: Vec<String>,
}

pub fn put_blob(dir: &Path, bytes: &[u8]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let d = sha256(bytes);
    std::fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
    d
}

/// Write an image's blobs (layers compressed with `comp`) into the layout
/// at `dir`; `arch` goes into the config.
pub fn build_image(dir: &Path, layers: &[Vec<u8>], comp: Comp, arch: &str, env: &[&str]) -> Built {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut layer_digests = Vec::new();
    for t in layers {
        diff_ids.push(sha256(t));
        let (bytes, mt) = match comp {
            Comp::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(t).unwrap();
                (
                    gz.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Comp::Zstd => (
                zstd::encode_all(t.as_slice(), 3).unwrap(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        let d = put_blob(dir, &bytes);
        layer_digests.push(d.clone());
        descs.push(serde_json::json!({"mediaType": mt, "digest": d, "size": bytes.len()}));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": env, "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let cd = put_blob(dir, &config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let manifest_digest = put_blob(dir, &manifest);
    Built {
        manifest,
        manifest_digest,
        layer_digests,
        diff_ids,
    }
}

/// Write `oci-layout` and an `index.json` naming `entries` (descriptor
/// JSON values).
pub fn write_index(dir: &Path, entries: Vec<serde_json::Value>) {
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": entries})).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A single-image OCI layout tagged `tag`.
pub fn single_layout(dir: &Path, layers: &[Vec<u8>], comp: Comp, env: &[&str], tag: &str) -> Built {
    let b = build_image(dir, layers, comp, "amd64", env);
    write_index(
        dir,
        vec![serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": b.manifest_digest, "size": b.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag}})],
    );
    b
}

/// Extract an erofs or ext4 image to a directory, to look inside.
pub fn extract_rootfs(image: &Path, fstype: &str, out: &Path) {
    let o = match fstype {
        "erofs" => Command::new("fsck.erofs")
            .arg(format!("--extract={}", out.display()))
            .arg(image)
            .output()
            .unwrap(),
        _ => {
            std::fs::create_dir_all(out).unwrap();
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("rdump / {}", out.display()))
                .arg(image)
                .output()
                .unwrap()
        }
    };
    assert!(
        o.status.success(),
        "extract {}: {}",
        image.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}
