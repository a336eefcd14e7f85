//! How to talk to registries: [`RegistryConfig`], credentials and
//! docker-style auth files (`auths`, plus kiln's `insecure`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use base64::Engine;

use crate::reference::DOCKER_HUB;
use crate::ImageError;

/// User name and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <redacted>)", self.username)
    }
}

/// How to talk to registries.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Credentials by registry host (`docker.io`, `ghcr.io`, `host:port`).
    pub auths: HashMap<String, Credential>,
    /// Registries reached over plain HTTP (loopback ones always are).
    pub insecure: HashSet<String>,
    /// Layer downloads in flight at once.
    pub max_concurrent_downloads: usize,
    /// Retries of a transient failure (after the first try).
    pub retries: u32,
    /// First backoff; doubled on every retry.
    pub backoff: Duration,
    /// How long a tag→digest resolution is trusted without asking the
    /// registry again.
    pub tag_ttl: Duration,
    /// Per-request timeout for connecting.
    pub connect_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            auths: HashMap::new(),
            insecure: HashSet::new(),
            max_concurrent_downloads: 4,
            retries: 4,
            backoff: Duration::from_millis(250),
            tag_ttl: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(15),
        }
    }
}

#[derive(serde::Deserialize, Default)]
struct AuthFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    insecure: Vec<String>,
}

#[derive(serde::Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl RegistryConfig {
    /// Add the `auths` (and `insecure`) of a docker-style config file.
    pub fn load_auth_file(&mut self, path: &Path) -> Result<(), ImageError> {
        let bytes = std::fs::read(path).map_err(|e| ImageError::io("read", path, e))?;
        let f: AuthFile = serde_json::from_slice(&bytes).map_err(|e| ImageError::Corrupt {
            what: path.display().to_string(),
            detail: e.to_string(),
        })?;
        for (key, e) in f.auths {
            let cred = match (e.auth, e.username, e.password) {
                (Some(a), _, _) if !a.is_empty() => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(a.trim())
                        .map_err(|err| ImageError::Corrupt {
                            what: format!("{} auths[{key}].auth", path.display()),
                            detail: err.to_string(),
                        })?;
                    let s = String::from_utf8_lossy(&raw).to_string();
                    let Some((u, p)) = s.split_once(':') else {
                        return Err(ImageError::Corrupt {
                            what: format!("{} auths[{key}].auth", path.display()),
                            detail: "not base64 of user:password".into(),
                        });
                    };
                    Credential {
                        username: u.into(),
                        password: p.into(),
                    }
                }
                (_, Some(u), Some(p)) => Credential {
                    username: u,
                    password: p,
                },
                _ => continue, // credential helpers are not supported
            };
            self.auths.insert(normalize_auth_key(&key), cred);
        }
        self.insecure.extend(f.insecure);
        Ok(())
    }

    pub(crate) fn credential(&self, registry: &str) -> Option<&Credential> {
        self.auths.get(registry)
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `http://h:5000/x` → `h:5000`.
fn normalize_auth_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        h => h.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_auths() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"127.0.0.1:5000":{{"username":"bob","password":"pw"}},"ghcr.io":{{}}}},"insecure":["10.0.0.1:5000"]}}"#
            ),
        )
        .unwrap();
        let mut c = RegistryConfig::default();
        c.load_auth_file(&p).unwrap();
        assert_eq!(
            c.credential("docker.io"),
            Some(&Credential {
                username: "alice".into(),
                password: "s3cr:et".into()
            })
        );
        assert_eq!(c.credential("127.0.0.1:5000").unwrap().username, "bob");
        assert!(c.credential("ghcr.io").is_none());
        assert!(c.insecure.contains("10.0.0.1:5000"));
        assert!(!format!("{:?}", c.credential("docker.io")).contains("s3cr"));
    }
}
