//! The local test registry (`docker-registry`, Debian package
//! `docker-registry`) inside a network lab's "outside" namespace, for jobs
//! that pull over the registry HTTP API through their network. It listens
//! on every address of that namespace, port [`REGISTRY_PORT`], and on
//! nothing else: no packet to or from it leaves the lab.
//!
//! Content goes in over the same HTTP API (monolithic blob uploads and a
//! manifest `PUT`), from a socket of this process inside the namespace.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::netlab::{Lab, OUTSIDE_ADDR};

/// The registry's port in the outside namespace.
pub const REGISTRY_PORT: u16 = 5000;

/// Media type of the manifests pushed (Docker's schema 2: what
/// `docker-registry` 2.8 serves to a client that asks for it).
pub const MANIFEST_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// `sha256:<hex>` of `b`.
pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A `docker-registry` running in a lab's outside namespace; killed on
/// drop (its storage is under the directory it was given).
pub struct LabRegistry {
    ns: String,
    child: Child,
}

impl LabRegistry {
    /// Start it in `lab`'s outside namespace, its storage and log under
    /// `dir`, and wait (generously) until it answers `GET /v2/`.
    pub fn start(lab: &Lab, dir: &Path) -> Result<LabRegistry> {
        let data = dir.join("registry-data");
        std::fs::create_dir_all(&data)?;
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 0.0.0.0:{REGISTRY_PORT}\n  secret: kiln-test-registry\n",
                data.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("registry.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.outside, "docker-registry", "serve"])
            .arg(&config)
            .env_remove("REGISTRY_HTTP_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start docker-registry")?;
        let mut r = LabRegistry {
            ns: lab.outside.clone(),
            child,
        };
        let t0 = Instant::now();
        loop {
            if let Ok((200, _, _)) = r.request("GET", "/v2/", &[], b"") {
                return Ok(r);
            }
            let exited = r.child.try_wait().ok().flatten();
            if exited.is_some() || t0.elapsed() > Duration::from_secs(120) {
                let log = std::fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
                bail!("docker-registry did not start ({exited:?}): {log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One HTTP/1.1 request (`Connection: close`) to the registry from
    /// inside the outside namespace: (status, headers, body).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(u16, String, Vec<u8>)> {
        let to = SocketAddr::from((OUTSIDE_ADDR, REGISTRY_PORT));
        let mut c = Lab::connect_from(&self.ns, to)?;
        c.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        c.write_all(head.as_bytes())?;
        c.write_all(body)?;
        let mut answer = Vec::new();
        c.read_to_end(&mut answer)?;
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("an HTTP answer without a head")?;
        let head = String::from_utf8_lossy(&answer[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no status in {head}"))?;
        Ok((status, head, answer[split + 4..].to_vec()))
    }

    /// Upload `blob` to repository `repo` (a `POST`, then the monolithic
    /// `PUT` with its digest); its digest.
    pub fn push_blob(&self, repo: &str, blob: &[u8]) -> Result<String> {
        let d = digest(blob);
        let (status, head, _) =
            self.request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"")?;
        if status != 202 {
            bail!("start an upload to {repo}: {head}");
        }
        let location = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("location")
                    .then(|| v.trim().to_string())
            })
            .with_context(|| format!("no Location in {head}"))?;
        // Absolute (http://host/...) or a path: the path is what we send.
        let path = match location.find("/v2/") {
            Some(i) => location[i..].to_string(),
            None => bail!("an upload location without /v2/: {location}"),
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let (status, head, _) = self.request(
            "PUT",
            &format!("{path}{sep}digest={d}"),
            &[("Content-Type", "application/octet-stream")],
            blob,
        )?;
        if status != 201 {
            bail!("upload {d} to {repo}: {head}");
        }
        Ok(d)
    }

    /// Push an image to `repo:tag` whose one layer is `layer` (as given,
    /// not a real tar: the registry does not look inside); the manifest's
    /// bytes and digest.
    pub fn push_image(&self, repo: &str, tag: &str, layer: &[u8]) -> Result<(Vec<u8>, String)> {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_digest = self.push_blob(repo, config)?;
        let layer_digest = self.push_blob(repo, layer)?;
        let manifest = format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"{MANIFEST_TYPE}\",\
             \"config\":{{\"mediaType\":\"application/vnd.docker.container.image.v1+json\",\
             \"size\":{},\"digest\":\"{config_digest}\"}},\
             \"layers\":[{{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\
             \"size\":{},\"digest\":\"{layer_digest}\"}}]}}",
            config.len(),
            layer.len()
        )
        .into_bytes();
        let (status, head, _) = self.request(
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", MANIFEST_TYPE)],
            &manifest,
        )?;
        if status != 201 {
            bail!("push the manifest {repo}:{tag}: {head}");
        }
        let d = digest(&manifest);
        Ok((manifest, d))
    }
}

impl Drop for LabRegistry {
    fn drop(&mut self) {
        // `ip netns exec` execs the registry: this is its process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
