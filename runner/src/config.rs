//! `kiln.toml`: the daemon's configuration (see `runner/kiln.example.toml`
//! and `docs/gitlab.md`). Modelled on gitlab-runner's `config.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_images::ImagePolicy;
use kiln_vmm::{BackendKind, IsolationMode};
use serde::{Deserialize, Serialize};

use crate::executor;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid kiln.toml")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Jobs running at once across all runners.
    #[serde(default = "one")]
    pub concurrent: usize,
    /// Seconds between job requests of one runner when there is no work.
    #[serde(default = "three")]
    pub check_interval: u64,
    /// Seconds running jobs may take to finish after SIGTERM/SIGINT; then
    /// they are canceled and reported as `runner_system_failure`.
    #[serde(default = "thirty")]
    pub shutdown_timeout: u64,
    /// Per-VM files and per-job workspaces (default: `$KILN_RUN_DIR`, else
    /// [`crate::paths::default_run_dir`]; filled in by `kiln daemon`).
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    /// Guest agent binary (default: `$KILN_AGENT`, else found next to kiln).
    #[serde(default)]
    pub agent: Option<PathBuf>,
    /// Guest kernel (default: the cached distribution kernel).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Seconds from VM start to the agent being ready.
    #[serde(default = "boot_timeout")]
    pub boot_timeout: u64,
    /// Where serial logs of VMs that failed are kept (default:
    /// `$XDG_STATE_HOME/kiln/logs`, else `~/.local/state/kiln/logs`; see
    /// [`crate::paths::default_log_dir`]).
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
    /// The cache of runners that name none, from the environment (filled at
    /// the edge, `kiln::env::Env::complete`).
    #[serde(skip)]
    pub cache_dir: Option<PathBuf>,
    /// How images are pulled, converted and cached, from the environment
    /// (filled at the edge, `kiln::env::Env::complete`).
    #[serde(skip)]
    pub images: kiln_images::ImagesOptions,
    /// S3 credentials for `[runners.cache.s3]` that names none, from
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (filled at the edge,
    /// `kiln::env::Env::complete`; never written to the file).
    #[serde(skip)]
    pub aws_credentials: Option<crate::cache::AwsCredentials>,
    /// The `kiln-vmm` executable of the kvm backend (default: `$KILN_VMM`,
    /// else next to `kiln`, else `/usr/lib/kiln/kiln-vmm`).
    #[serde(default)]
    pub vmm: Option<PathBuf>,
    /// The QEMU binary of the qemu backend (default: `$KILN_QEMU`, else
    /// `qemu-system-x86_64` from `PATH`).
    #[serde(default)]
    pub qemu: Option<PathBuf>,
    #[serde(default)]
    pub runners: Vec<RunnerConfig>,
    /// GitHub Actions scopes served by ephemeral JIT runners
    /// (docs/github.md); they share `concurrent` with the GitLab runners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub github: Vec<crate::github::config::GithubConfig>,
}

/// One `[[runners]]` entry: a GitLab runner registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerConfig {
    pub name: String,
    /// GitLab's base URL (`https://gitlab.example.com`).
    pub url: String,
    /// The runner authentication token (`glrt-…`).
    pub token: String,
    /// Jobs of this runner at once; 0 = only `concurrent` limits.
    #[serde(default)]
    pub limit: usize,
    /// Image for jobs that name none: a registry reference, or a path on
    /// this host (an OCI layout directory or an image tar). The runner's
    /// own choice, so neither `allowed_images` nor `allow_local_images`
    /// applies to it.
    #[serde(default)]
    pub image: Option<String>,
    /// Images a job's `image:` may name, as gitlab-runner's
    /// `allowed_images`: `*` matches within one path component
    /// (`docker.io/library/*`), `**` across them (`ghcr.io/acme/**`);
    /// matched against the image as written and normalised
    /// (`alpine` is `docker.io/library/alpine:latest`). Empty (the
    /// default): any registry image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_images: Vec<String>,
    /// Whether a job's `image:` may be a path on this host (absolute, an
    /// OCI layout directory or an image tar). Off by default: a job could
    /// otherwise have the runner read any image-shaped path it can read.
    /// With `allowed_images`, a path must also match one of them.
    #[serde(default)]
    pub allow_local_images: bool,
    /// vCPUs per VM.
    #[serde(default = "vcpus")]
    pub cpus: u32,
    /// Guest memory, MiB.
    #[serde(default = "mem")]
    pub memory: u32,
    /// Scratch and workspace disk size, GiB (sparse).
    #[serde(default = "disk")]
    pub disk: u64,
    /// Trace size cap in KiB.
    #[serde(default = "output_limit")]
    pub output_limit: u64,
    /// Image, kernel and initramfs cache (default: kiln's cache directory).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// `auto`, `kvm` or `qemu`, as `--backend` takes it.
    #[serde(default, with = "backend_name")]
    pub backend: BackendKind,
    /// The jail around each VMM process (kvm backend): `strict` (refuse to
    /// start a VM when part of it cannot be applied), `best-effort` or `off`,
    /// as `--isolation` takes it.
    #[serde(default, with = "isolation_name")]
    pub isolation: IsolationMode,
    /// Start jobs from a VM snapshot where one can be used (kvm backend,
    /// no network); `false`: every job boots.
    #[serde(default = "yes")]
    pub snapshots: bool,
    /// Jobs' network: `auto` (`nat` where possible, else `user`), `nat`,
    /// `user` or `none` (see docs/network.md).
    #[serde(default = "auto")]
    pub network: String,
    /// CIDRs jobs may reach although private, link-local or the host's (`nat`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_allow: Vec<String>,
    /// CIDRs jobs may never reach (`nat`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_deny: Vec<String>,
    /// IPv4 range the VMs' addresses come from (`nat`).
    #[serde(default = "network_pool")]
    pub network_pool: String,
    /// Connections one job may have open at once, UDP flows included
    /// (`nat`).
    #[serde(default = "network_max_connections")]
    pub network_max_connections: u32,
    /// DNS servers kiln relays jobs' queries to (default: the host's
    /// /etc/resolv.conf).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// `[runners.cache]`: where jobs' `cache:` archives are kept (see
    /// docs/cache.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<crate::cache::CacheConfig>,
}

fn auto() -> String {
    "auto".into()
}

fn yes() -> bool {
    true
}

fn network_pool() -> String {
    crate::network::pool::DEFAULT_POOL.into()
}

fn network_max_connections() -> u32 {
    crate::network::DEFAULT_MAX_CONNECTIONS
}

// The VM settings default to the executor's (`executor::DEFAULT_*`).
fn one() -> usize {
    1
}
fn three() -> u64 {
    3
}
fn thirty() -> u64 {
    30
}
fn boot_timeout() -> u64 {
    executor::DEFAULT_BOOT_TIMEOUT.as_secs()
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
fn output_limit() -> u64 {
    4096
}

/// `backend = "kvm"`: the backend by the name `--backend` takes; an
/// unknown name is refused with the names there are.
mod backend_name {
    use kiln_vmm::BackendKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &BackendKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match b {
            BackendKind::Auto => "auto",
            BackendKind::Kvm => "kvm",
            BackendKind::Qemu => "qemu",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BackendKind, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `isolation = "strict"`: by the name `--isolation` takes.
mod isolation_name {
    use kiln_vmm::IsolationMode;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &IsolationMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IsolationMode, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let c: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.concurrent == 0 {
            return Err(ConfigError::Invalid("concurrent must be at least 1".into()));
        }
        let mut names = std::collections::HashSet::new();
        for r in &self.runners {
            if !names.insert(&r.name) {
                return Err(ConfigError::Invalid(format!(
                    "two runners are named '{}'",
                    r.name
                )));
            }
            if !(r.url.starts_with("http://") || r.url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "runner '{}': url '{}' is not http(s)",
                    r.name, r.url
                )));
            }
            r.network_config()?;
            if let Some(c) = &r.cache {
                c.validate(&r.name).map_err(ConfigError::Invalid)?;
            }
        }
        let mut names = std::collections::HashSet::new();
        for g in &self.github {
            if !names.insert(&g.name) {
                return Err(ConfigError::Invalid(format!(
                    "two [[github]] entries are named '{}'",
                    g.name
                )));
            }
            g.validate()?;
        }
        Ok(())
    }

    /// Write the file (used by `kiln gitlab register`). It holds runner
    /// tokens, so it is only readable by its owner (mode 0600, whatever the
    /// umask or the mode of the file it replaces), and it is replaced
    /// atomically: a crash leaves the old file or the new one, never half.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let text = toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let werr = |source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        let name = path.file_name().ok_or_else(|| {
            ConfigError::Invalid(format!("{} is not a file name", path.display()))
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            // The mode given to open(2) is filtered by the umask; 0600 is
            // what we want whatever the umask allows.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(werr(e));
        }
        Ok(())
    }

    pub fn check_interval(&self) -> Duration {
        Duration::from_secs(self.check_interval.max(1))
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout)
    }
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("an empty kiln.toml is valid")
    }
}

impl RunnerConfig {
    /// The runner's network settings (the mode checked, the rest when the
    /// executor starts).
    pub fn network_config(&self) -> Result<crate::network::NetworkConfig, ConfigError> {
        Ok(crate::network::NetworkConfig {
            mode: self.network.parse().map_err(|e| {
                ConfigError::Invalid(format!("runner '{}': network: {e}", self.name))
            })?,
            pool: self.network_pool.clone(),
            allow: self.network_allow.clone(),
            deny: self.network_deny.clone(),
            dns: self.dns.clone(),
            max_connections: self.network_max_connections,
            ..crate::network::NetworkConfig::default()
        })
    }

    /// What a job's `image:` may name on this runner.
    pub fn image_policy(&self) -> ImagePolicy {
        ImagePolicy::provider(self.allow_local_images, self.allowed_images.clone())
    }

    /// The trace cap in bytes.
    pub fn output_limit_bytes(&self) -> usize {
        (self.output_limit.max(1) as usize).saturating_mul(1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_runners_parse() {
        let c: Config = toml::from_str(
            r#"
concurrent = 4
[[runners]]
name = "a"
url = "https://gitlab.example.com"
token = "glrt-x"
limit = 2
image = "/images/debian"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.concurrent, 4);
        assert_eq!(c.check_interval, 3);
        assert_eq!(c.shutdown_timeout, 30);
        let r = &c.runners[0];
        assert_eq!(
            (r.limit, r.output_limit, r.cpus, r.memory),
            (2, 4096, 2, 2048)
        );
        assert_eq!(r.output_limit_bytes(), 4096 * 1024);
        assert_eq!(r.backend, BackendKind::Auto);
        // Registry images only, any of them, unless configured.
        assert_eq!(r.image_policy(), ImagePolicy::provider(false, vec![]));
        let c: Config = toml::from_str(
            "[[runners]]\nname='a'\nurl='https://x'\ntoken='t'\n\
             allowed_images=['docker.io/library/*']\nallow_local_images=true\n",
        )
        .unwrap();
        assert_eq!(
            c.runners[0].image_policy(),
            ImagePolicy::provider(true, vec!["docker.io/library/*".into()])
        );
    }

    #[test]
    fn mistakes_are_refused() {
        assert!(toml::from_str::<Config>("concurent = 1").is_err(), "typo");
        let c: Config = toml::from_str("concurrent = 0").unwrap();
        assert!(c.validate().is_err());
        let c: Config =
            toml::from_str("[[runners]]\nname='a'\nurl='ftp://x'\ntoken='t'\n").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn backends_are_named_as_on_the_command_line() {
        let c: Config =
            toml::from_str("[[runners]]\nname='a'\nurl='https://x'\ntoken='t'\nbackend='qemu'\n")
                .unwrap();
        assert_eq!(c.runners[0].backend, BackendKind::Qemu);
        let back: Config = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.runners[0].backend, BackendKind::Qemu);
        assert_eq!(c.runners[0].isolation, IsolationMode::BestEffort);
        assert!(c.runners[0].snapshots, "on unless turned off");
        let off: Config =
            toml::from_str("[[runners]]\nname='a'\nurl='https://x'\ntoken='t'\nsnapshots=false\n")
                .unwrap();
        assert!(!off.runners[0].snapshots);
        let c: Config = toml::from_str(
            "[[runners]]\nname='a'\nurl='https://x'\ntoken='t'\nisolation='strict'\n",
        )
        .unwrap();
        assert_eq!(c.runners[0].isolation, IsolationMode::Strict);
        let back: Config = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.runners[0].isolation, IsolationMode::Strict);
        assert!(toml::from_str::<Config>(
            "[[runners]]\nname='a'\nurl='https://x'\ntoken='t'\nisolation='strictly'\n",
        )
        .is_err());
        let e = toml::from_str::<Config>(
            "[[runners]]\nname='a'\nurl='https://x'\ntoken='t'\nbackend='vmware'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unknown backend 'vmware' (expected auto, kvm or qemu)"),
            "{e}"
        );
    }

    #[test]
    fn saved_files_are_private_and_round_trip() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kiln.toml");
        // An existing, world-readable file is replaced by a private one.
        std::fs::write(&p, "concurrent = 1\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut c: Config = toml::from_str(
            "concurrent = 3\n[[runners]]\nname='a'\nurl='https://x'\ntoken='glrt-secret'\n",
        )
        .unwrap();
        c.log_dir = Some(d.path().join("logs"));
        c.save(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the token file is private: {mode:o}");
        let back = Config::load(&p).unwrap();
        assert_eq!(back.concurrent, 3);
        assert_eq!(back.runners[0].token, "glrt-secret");
        assert_eq!(back.log_dir, Some(d.path().join("logs")));
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("kiln.toml")],
            "no temporary file left"
        );
    }

    #[test]
    fn runners_cache_is_read_like_gitlab_runners() {
        let base = "[[runners]]\nname='a'\nurl='https://x'\ntoken='t'\n[runners.cache]\n";
        let c: Config = toml::from_str(&format!(
            "{base}Type='local'\nPath='/c'\nShared=true\nMaxSize=10\nMaxUploadedArchiveSize=99\n"
        ))
        .unwrap();
        c.validate().unwrap();
        let cache = c.runners[0].cache.as_ref().unwrap();
        assert_eq!(cache.path.as_deref(), Some(Path::new("/c")));
        assert!(cache.shared);
        assert_eq!(
            (cache.max_size_mib, cache.max_archive_bytes),
            (Some(10), Some(99))
        );
        let s3: Config = toml::from_str(&format!("{base}Type='s3'\n")).unwrap();
        let e = s3.validate().unwrap_err().to_string();
        assert!(
            e.contains("needs [runners.cache.s3] with a BucketName"),
            "{e}"
        );
        let s3: Config = toml::from_str(&format!(
            "{base}Type='s3'\n[runners.cache.s3]\nBucketName='b'\nServerAddress='h:9000'\n"
        ))
        .unwrap();
        s3.validate().unwrap();
        let gcs: Config = toml::from_str(&format!("{base}Type='gcs'\n")).unwrap();
        let e = gcs.validate().unwrap_err().to_string();
        assert!(e.contains("Type = \"gcs\" is not supported"), "{e}");
        assert!(toml::from_str::<Config>(&format!("{base}Bucket='b'\n")).is_err());
    }

    #[test]
    fn the_example_file_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("kiln.example.toml");
        Config::load(&p).unwrap();
    }
}
