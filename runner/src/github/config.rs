//! `[[github]]` in `kiln.toml`: one GitHub scope (a repository or an
//! organization) served by ephemeral just-in-time runners, each in its own
//! VM (see docs/github.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_vmm::{BackendKind, IsolationMode};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::executor;

/// One `[[github]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubConfig {
    /// A name for logs and `kiln github status`.
    pub name: String,
    /// The REST API's base (GitHub Enterprise Server: `https://HOST/api/v3`).
    #[serde(default = "api_url")]
    pub api_url: String,
    /// Repository scope: `owner/name`. Exactly one of `repository` and
    /// `organization`.
    #[serde(default)]
    pub repository: Option<String>,
    /// Organization scope: runners are registered in the organization.
    #[serde(default)]
    pub organization: Option<String>,
    /// Repositories (`owner/name`) whose queued jobs the reconciler lists
    /// (the REST API has no organization-wide job listing). Default: the
    /// `repository`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<String>,
    /// A token (fine-grained or classic) allowed to manage self-hosted
    /// runners, inline or in a file (preferred).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// GitHub App authentication instead of a token: the app's id, its
    /// private key (PEM) and the installation in the scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation_id: Option<u64>,
    /// The runner group new runners join (1: `Default`).
    #[serde(default = "one_u64")]
    pub runner_group_id: u64,
    /// The webhook's secret, inline or in a file (preferred). Required
    /// when `listen` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Address the webhook endpoint listens on (`0.0.0.0:8088`); any path
    /// is accepted. Without it, only the reconciler finds queued jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Seconds between listings of queued jobs (the webhook's safety net).
    #[serde(default = "sixty")]
    pub reconcile_interval: u64,
    /// Runners (VMs) of this entry at once; 0 = only `concurrent` limits.
    /// Every runner also holds one of the daemon's `concurrent` slots.
    #[serde(default)]
    pub capacity: usize,
    /// GitHub's runner distribution: a directory, or a `.tar.gz` as
    /// GitHub publishes it (`actions-runner-linux-x64-<version>.tar.gz`),
    /// unpacked once into kiln's cache.
    pub runner_dist: PathBuf,
    /// The tarball's SHA-256 (hex); kiln refuses a tarball that differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_dist_sha256: Option<String>,
    /// Runner names are `<name_prefix>-<profile>-<random>`.
    #[serde(default = "kiln")]
    pub name_prefix: String,
    /// Label sets and the VM each gets, first match wins.
    #[serde(default)]
    pub profiles: Vec<Profile>,
}

/// A label set and the VM a runner for it gets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    /// The runner's labels. A queued job is this profile's when every
    /// label of its `runs-on` is one of these (case-insensitive).
    pub labels: Vec<String>,
    /// The VM's image: a registry reference, or an OCI layout directory
    /// or image tar on this host. Its `User` runs the runner and must not
    /// be root.
    pub image: String,
    /// Where the runner distribution is mounted in the guest (the runner
    /// writes its configuration and `_work` there, on a per-VM disk).
    #[serde(default = "runner_dir")]
    pub runner_dir: String,
    #[serde(default = "vcpus")]
    pub cpus: u32,
    /// MiB.
    #[serde(default = "mem")]
    pub memory: u32,
    /// GiB, sparse.
    #[serde(default = "disk")]
    pub disk: u64,
    /// `auto`, `nat`, `user` or `none` (the real runner needs `nat` or
    /// `user`: it talks to GitHub).
    #[serde(default = "auto")]
    pub network: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_deny: Vec<String>,
    /// Connections one job may have open at once, UDP flows included.
    #[serde(default = "network_max_connections")]
    pub network_max_connections: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// `auto`, `kvm` or `qemu`.
    #[serde(default)]
    pub backend: String,
    /// `strict`, `best-effort` or `off`.
    #[serde(default)]
    pub isolation: String,
    /// Seconds a runner's VM may live (GitHub's own limit for a
    /// self-hosted job is 5 days; default 6 hours).
    #[serde(default = "six_hours")]
    pub timeout: u64,
    /// Let the image's root user run the runner (GitHub's runner refuses
    /// root unless told otherwise; so does kiln).
    #[serde(default)]
    pub allow_root: bool,
}

fn api_url() -> String {
    "https://api.github.com".into()
}
fn one_u64() -> u64 {
    1
}
fn sixty() -> u64 {
    60
}
fn kiln() -> String {
    "kiln".into()
}
fn runner_dir() -> String {
    "/actions-runner".into()
}
fn vcpus() -> u32 {
    executor::DEFAULT_VCPUS
}
fn mem() -> u32 {
    executor::DEFAULT_MEMORY_MIB
}
fn disk() -> u64 {
    executor::DEFAULT_DISK_GIB
}
fn auto() -> String {
    "auto".into()
}
fn network_max_connections() -> u32 {
    crate::network::DEFAULT_MAX_CONNECTIONS
}
fn six_hours() -> u64 {
    6 * 3600
}

fn invalid(entry: &str, what: String) -> ConfigError {
    ConfigError::Invalid(format!("[[github]] '{entry}': {what}"))
}

fn read_secret(entry: &str, key: &str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let s = text.trim().to_string();
    if s.is_empty() {
        return Err(invalid(entry, format!("{key} {} is empty", path.display())));
    }
    Ok(s)
}

/// How kiln authenticates to GitHub.
#[derive(Clone)]
pub enum Auth {
    Token(String),
    App {
        app_id: u64,
        key_pem: Vec<u8>,
        installation_id: u64,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Token(_) => f.write_str("Token(…)"),
            Auth::App {
                app_id,
                installation_id,
                ..
            } => write!(f, "App({app_id}, installation {installation_id})"),
        }
    }
}

impl GithubConfig {
    /// Check the entry (files are read later, by [`Self::auth`] and
    /// [`Self::webhook_secret`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.name;
        match (&self.repository, &self.organization) {
            (Some(r), None) if valid_repo(r) => {}
            (Some(r), None) => {
                return Err(invalid(n, format!("repository '{r}' is not owner/name")))
            }
            (None, Some(o)) if !o.is_empty() && !o.contains('/') => {}
            _ => {
                return Err(invalid(
                    n,
                    "set exactly one of repository = \"owner/name\" and organization = \"name\""
                        .into(),
                ))
            }
        }
        if let Some(r) = self.repositories.iter().find(|r| !valid_repo(r)) {
            return Err(invalid(n, format!("repositories: '{r}' is not owner/name")));
        }
        if !(self.api_url.starts_with("http://") || self.api_url.starts_with("https://")) {
            return Err(invalid(
                n,
                format!("api_url '{}' is not http(s)", self.api_url),
            ));
        }
        let token = self.token.is_some() || self.token_file.is_some();
        let app = self.app_id.is_some()
            || self.private_key_file.is_some()
            || self.installation_id.is_some();
        if token == app {
            return Err(invalid(
                n,
                "set a token (token or token_file) or a GitHub App (app_id, private_key_file, installation_id), not both".into(),
            ));
        }
        if app
            && (self.app_id.is_none()
                || self.private_key_file.is_none()
                || self.installation_id.is_none())
        {
            return Err(invalid(
                n,
                "a GitHub App needs app_id, private_key_file and installation_id".into(),
            ));
        }
        if self.listen.is_some()
            && self.webhook_secret.is_none()
            && self.webhook_secret_file.is_none()
        {
            return Err(invalid(
                n,
                "listen needs webhook_secret or webhook_secret_file (unsigned webhooks are refused)"
                    .into(),
            ));
        }
        if let Some(l) = &self.listen {
            l.parse::<std::net::SocketAddr>()
                .map_err(|e| invalid(n, format!("listen '{l}': {e}")))?;
        }
        if let Some(s) = &self.runner_dist_sha256 {
            if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(n, "runner_dist_sha256 is not 64 hex digits".into()));
            }
        }
        if self.name_prefix.is_empty()
            || !self
                .name_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                n,
                "name_prefix must be letters, digits, - or _".into(),
            ));
        }
        if self.profiles.is_empty() {
            return Err(invalid(n, "no [[github.profiles]]".into()));
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.profiles {
            if !names.insert(&p.name) {
                return Err(invalid(n, format!("two profiles are named '{}'", p.name)));
            }
            if p.labels.is_empty() || p.labels.len() > 100 {
                return Err(invalid(n, format!("profile '{}': 1 to 100 labels", p.name)));
            }
            if !p.runner_dir.starts_with('/')
                || p.runner_dir.split('/').any(|c| c == "..")
                || p.runner_dir.chars().any(char::is_whitespace)
            {
                return Err(invalid(
                    n,
                    format!("profile '{}': runner_dir must be an absolute path", p.name),
                ));
            }
            p.network_config()
                .map_err(|e| invalid(n, format!("profile '{}': {e}", p.name)))?;
            p.backend()
                .map_err(|e| invalid(n, format!("profile '{}': {e}", p.name)))?;
            p.isolation()
                .map_err(|e| invalid(n, format!("profile '{}': {e}", p.name)))?;
        }
        Ok(())
    }

    /// The credentials, read from their files.
    pub fn auth(&self) -> Result<Auth, ConfigError> {
        if let Some(t) = &self.token {
            return Ok(Auth::Token(t.clone()));
        }
        if let Some(p) = &self.token_file {
            return Ok(Auth::Token(read_secret(&self.name, "token_file", p)?));
        }
        match (self.app_id, &self.private_key_file, self.installation_id) {
            (Some(app_id), Some(key), Some(installation_id)) => Ok(Auth::App {
                app_id,
                key_pem: std::fs::read(key).map_err(|source| ConfigError::Read {
                    path: key.clone(),
                    source,
                })?,
                installation_id,
            }),
            _ => Err(invalid(&self.name, "no credentials".into())),
        }
    }

    /// The webhook secret, if webhooks are served.
    pub fn webhook_secret(&self) -> Result<Option<String>, ConfigError> {
        if let Some(s) = &self.webhook_secret {
            return Ok(Some(s.clone()));
        }
        match &self.webhook_secret_file {
            Some(p) => Ok(Some(read_secret(&self.name, "webhook_secret_file", p)?)),
            None => Ok(None),
        }
    }

    /// The repositories the reconciler lists.
    pub fn reconciled_repositories(&self) -> Vec<String> {
        if !self.repositories.is_empty() {
            return self.repositories.clone();
        }
        self.repository.iter().cloned().collect()
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_secs(self.reconcile_interval.max(1))
    }

    /// The first profile whose labels hold every label of a job.
    pub fn profile_for(&self, job_labels: &[String]) -> Option<usize> {
        self.profiles.iter().position(|p| p.matches(job_labels))
    }
}

fn valid_repo(r: &str) -> bool {
    let mut parts = r.split('/');
    let ok = |s: Option<&str>| {
        s.is_some_and(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

impl Profile {
    /// Every label of the job is one of ours (GitHub compares labels
    /// case-insensitively). A job without labels matches nothing.
    pub fn matches(&self, job_labels: &[String]) -> bool {
        !job_labels.is_empty()
            && job_labels
                .iter()
                .all(|l| self.labels.iter().any(|m| m.eq_ignore_ascii_case(l)))
    }

    pub fn network_config(&self) -> Result<crate::network::NetworkConfig, String> {
        Ok(crate::network::NetworkConfig {
            mode: self.network.parse().map_err(|e| format!("network: {e}"))?,
            allow: self.network_allow.clone(),
            deny: self.network_deny.clone(),
            dns: self.dns.clone(),
            max_connections: self.network_max_connections,
            ..crate::network::NetworkConfig::default()
        })
    }

    pub fn backend(&self) -> Result<BackendKind, String> {
        if self.backend.is_empty() {
            return Ok(BackendKind::Auto);
        }
        self.backend.parse().map_err(|e| format!("backend: {e}"))
    }

    pub fn isolation(&self) -> Result<IsolationMode, String> {
        if self.isolation.is_empty() {
            return Ok(IsolationMode::default());
        }
        self.isolation
            .parse()
            .map_err(|e| format!("isolation: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const ENTRY: &str = r#"
concurrent = 3
[[github]]
name = "gh"
repository = "acme/app"
token = "ghp_x"
listen = "127.0.0.1:0"
webhook_secret = "s"
runner_dist = "/opt/actions-runner"
[[github.profiles]]
name = "small"
labels = ["self-hosted", "Linux", "kiln"]
image = "ghcr.io/acme/runner:1"
"#;

    #[test]
    fn an_entry_parses_with_defaults() {
        let c: Config = toml::from_str(ENTRY).unwrap();
        c.validate().unwrap();
        let g = &c.github[0];
        assert_eq!(g.api_url, "https://api.github.com");
        assert_eq!(
            (g.runner_group_id, g.capacity, g.reconcile_interval),
            (1, 0, 60)
        );
        assert_eq!(g.reconciled_repositories(), vec!["acme/app".to_string()]);
        let p = &g.profiles[0];
        assert_eq!(p.runner_dir, "/actions-runner");
        assert_eq!(p.backend().unwrap(), BackendKind::Auto);
        assert_eq!(p.timeout, 6 * 3600);
        assert!(matches!(g.auth().unwrap(), Auth::Token(t) if t == "ghp_x"));
        assert_eq!(g.webhook_secret().unwrap().as_deref(), Some("s"));
    }

    #[test]
    fn labels_match_case_insensitively_and_as_a_subset() {
        let c: Config = toml::from_str(ENTRY).unwrap();
        let g = &c.github[0];
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(g.profile_for(&l(&["self-hosted", "linux"])), Some(0));
        assert_eq!(g.profile_for(&l(&["KILN"])), Some(0));
        assert_eq!(g.profile_for(&l(&["self-hosted", "gpu"])), None);
        assert_eq!(g.profile_for(&[]), None);
    }

    #[test]
    fn mistakes_are_refused() {
        let bad = [
            ("repository = \"acme/app\"", "repository = \"acme\""),
            ("repository = \"acme/app\"", "repository = \"../x\""),
            (
                "repository = \"acme/app\"",
                "repository = \"a/b\"\norganization = \"acme\"",
            ),
            ("token = \"ghp_x\"", "app_id = 1"),
            (
                "token = \"ghp_x\"",
                "token = \"t\"\napp_id = 1\nprivate_key_file = \"/k\"\ninstallation_id = 2",
            ),
            ("webhook_secret = \"s\"", ""),
            ("listen = \"127.0.0.1:0\"", "listen = \"nowhere\""),
            (
                "labels = [\"self-hosted\", \"Linux\", \"kiln\"]",
                "labels = []",
            ),
            (
                "image = \"ghcr.io/acme/runner:1\"",
                "image = \"x\"\nnetwork = \"wide\"",
            ),
            (
                "image = \"ghcr.io/acme/runner:1\"",
                "image = \"x\"\nrunner_dir = \"rel\"",
            ),
            (
                "runner_dist = \"/opt/actions-runner\"",
                "runner_dist = \"/x\"\nrunner_dist_sha256 = \"abc\"",
            ),
        ];
        for (from, to) in bad {
            let text = ENTRY.replace(from, to);
            let c: Config = toml::from_str(&text).unwrap();
            assert!(c.validate().is_err(), "accepted:\n{text}");
        }
    }
}
