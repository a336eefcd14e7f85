//! Image references: `[registry[:port]/]name[:tag][@digest]`, with Docker's
//! defaults (`docker.io`, `library/`, `latest`).

use std::fmt;

use crate::ImageError;

/// Docker Hub's name in references.
pub const DOCKER_HUB: &str = "docker.io";
/// Where Docker Hub's API actually is.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`, e.g. `docker.io`, `ghcr.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/debian`.
    pub repository: String,
    /// The tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// `sha256:<hex>` when pinned.
    pub digest: Option<String>,
}

impl Reference {
    /// Parse a reference the way `docker pull` does.
    pub fn parse(s: &str) -> Result<Reference, ImageError> {
        let bad = |why: &str| ImageError::BadReference {
            reference: s.to_string(),
            reason: why.to_string(),
        };
        if s.is_empty() || s.len() > 512 {
            return Err(bad("empty or longer than 512 characters"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if !is_sha256_digest(d) {
                    return Err(bad("the digest is not sha256:<64 lowercase hex digits>"));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is after the last ':' of the last path component (a ':' before
        // a '/' is a registry port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&rest[..i], Some(rest[i + 1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !ok {
                return Err(bad("invalid tag"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, more))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), more.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if registry.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(bad("the registry host must be lowercase"));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let valid_component = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        };
        if repository.len() > 255 || !repository.split('/').all(valid_component) {
            return Err(bad(
                "invalid repository name (lowercase letters, digits, '.', '_', '-' and '/')",
            ));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host to talk to (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// Whether the registry is on this machine (plain HTTP is allowed).
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.registry)
    }

    /// What to ask the registry for: the digest if pinned, else the tag.
    pub fn target(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same image pinned to `digest`.
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }

    /// `registry/repository[:tag]`, without the digest (the key tags are
    /// recorded under).
    pub fn name_and_tag(&self) -> String {
        match &self.tag {
            Some(t) => format!("{}/{}:{t}", self.registry, self.repository),
            None => format!("{}/{}", self.registry, self.repository),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `localhost`, `127.x.y.z`, `[::1]`, with or without a port.
pub fn is_loopback_host(host_port: &str) -> bool {
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
    };
    if host == "localhost" {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// `sha256:<64 lowercase hex>`.
pub fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("debian");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/debian", Some("latest"))
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(p("rust:1.80").tag.as_deref(), Some("1.80"));
        assert_eq!(p("bitnami/redis").repository, "bitnami/redis");
        assert_eq!(p("index.docker.io/library/alpine:3").registry, "docker.io");
        assert_eq!(
            p("alpine:3.20").to_string(),
            "docker.io/library/alpine:3.20"
        );
    }

    #[test]
    fn registries_ports_and_localhost() {
        let r = p("127.0.0.1:5000/test/busybox:v2");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "test/busybox");
        assert_eq!(r.tag.as_deref(), Some("v2"));
        assert!(r.is_loopback());
        let r = p("localhost/x");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost", "x")
        );
        assert!(r.is_loopback());
        let r = p("ghcr.io/o/r/deep:1");
        assert_eq!(r.repository, "o/r/deep");
        assert!(!r.is_loopback());
        assert!(p("[::1]:5000/a").is_loopback());
        assert!(!p("10.0.0.1:5000/a").is_loopback());
        // A port but no tag.
        assert_eq!(p("host:5000/a").tag.as_deref(), Some("latest"));
    }

    #[test]
    fn digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r = p(&format!("alpine@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.target(), d);
        let r = p(&format!("alpine:3@{d}"));
        assert_eq!(r.tag.as_deref(), Some("3"));
        assert_eq!(r.target(), d);
        assert!(Reference::parse("alpine@sha256:abc").is_err());
        assert!(Reference::parse(&format!("alpine@md5:{}", "a".repeat(64))).is_err());
    }

    #[test]
    fn bad_references() {
        for s in [
            "",
            "UPPER/case",
            "a//b",
            "a:",
            "a:-x",
            "-a",
            "a/b:c:d",
            "Registry.io/x",
        ] {
            assert!(Reference::parse(s).is_err(), "{s} should be refused");
        }
    }
}
