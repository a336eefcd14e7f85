//! The process environment kiln uses, read here, at the edge, and passed
//! down as values: no other module of kiln, and none of its libraries
//! (`kiln-images`, `kiln-vmm`, `kiln-pipelines`), reads an environment
//! variable. (Flags with an `env = ...` in `main.rs` are read by clap, also
//! at the edge.)

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kiln_images::ImagesOptions;

use crate::cache::s3::{AwsCredentials, Secret};
use crate::config::Config;

/// What kiln takes from its environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `$KILN_RUN_DIR`: per-VM files.
    run_dir: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`: per-VM files go in its `kiln/` when nothing
    /// else names a place.
    runtime_dir: Option<PathBuf>,
    /// `$KILN_AGENT`: the guest agent.
    agent: Option<PathBuf>,
    /// `$XDG_STATE_HOME` and `$HOME`: where serial logs are kept.
    state_home: Option<PathBuf>,
    home: Option<PathBuf>,
    /// `$KILN_QEMU`: the QEMU binary of the qemu backend.
    qemu: Option<PathBuf>,
    /// `$KILN_VMM`: the VMM process of the kvm backend.
    vmm: Option<PathBuf>,
    /// `$KILN_CACHE_DIR` and `$XDG_CACHE_HOME`: the cache.
    cache_dir: Option<PathBuf>,
    cache_home: Option<PathBuf>,
    /// The image settings (`KILN_ROOTFS_FS`, `KILN_CACHE_MAX_GB`,
    /// `KILN_IMAGE_MAX_GB`, `KILN_IMAGE_MAX_ENTRIES`, `KILN_IMAGE_TAG_TTL`,
    /// `KILN_REGISTRY_CONFIG`, `DOCKER_CONFIG`; see
    /// [`kiln_images::options::vars`] and docs/images.md).
    images: ImagesOptions,
    /// `$AWS_ACCESS_KEY_ID`, `$AWS_SECRET_ACCESS_KEY` and
    /// `$AWS_SESSION_TOKEN`: credentials of an S3 cache store whose
    /// `[runners.cache.s3]` names none.
    aws: Option<AwsCredentials>,
}

fn var(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).map(PathBuf::from)
}

impl Env {
    /// Read the process environment.
    pub fn read() -> Env {
        Env {
            run_dir: var("KILN_RUN_DIR"),
            runtime_dir: var("XDG_RUNTIME_DIR"),
            agent: var("KILN_AGENT"),
            state_home: var("XDG_STATE_HOME"),
            home: var("HOME"),
            qemu: var("KILN_QEMU"),
            vmm: var("KILN_VMM"),
            cache_dir: var("KILN_CACHE_DIR"),
            cache_home: var("XDG_CACHE_HOME"),
            images: ImagesOptions::from_vars(|name| std::env::var_os(name)),
            aws: aws_credentials(|name| std::env::var(name).ok()),
        }
    }

    /// Per-VM files: `$KILN_RUN_DIR`, else `$XDG_RUNTIME_DIR/kiln`, else
    /// `/run/kiln` for root, else `/tmp/kiln-<uid>`.
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| crate::paths::default_run_dir(self.runtime_dir.as_deref()))
    }

    /// `$KILN_AGENT`.
    pub fn agent(&self) -> Option<&Path> {
        self.agent.as_deref()
    }

    /// Serial logs of VMs that failed: `$XDG_STATE_HOME/kiln/logs`, else
    /// `~/.local/state/kiln/logs`.
    pub fn log_dir(&self) -> Option<PathBuf> {
        crate::paths::default_log_dir(self.state_home.as_deref(), self.home.as_deref())
    }

    /// The cache when none is configured: `$KILN_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            crate::paths::default_cache_dir(self.cache_home.as_deref(), self.home.as_deref())
        })
    }

    /// How images are pulled, converted and cached.
    pub fn images(&self) -> ImagesOptions {
        self.images.clone()
    }

    /// `$KILN_VMM`: the `kiln-vmm` executable (else found next to kiln).
    pub fn vmm(&self) -> Option<PathBuf> {
        self.vmm.clone()
    }

    /// How to run QEMU: `$KILN_QEMU`, else `qemu-system-x86_64` from `PATH`.
    pub fn qemu(&self) -> kiln_vmm::QemuOptions {
        kiln_vmm::QemuOptions::new(self.qemu.clone())
    }

    /// Fill in what `kiln.toml` leaves to the environment: the run
    /// directory, the agent (`$KILN_AGENT`, checked as before it is used)
    /// and the log directory.
    pub fn complete(&self, config: &mut Config) -> Result<()> {
        if config.run_dir.is_none() {
            config.run_dir = Some(self.run_dir());
        }
        if config.agent.is_none() {
            if let Some(a) = self.agent() {
                let a = crate::agent::locate_agent(Some(a))
                    .with_context(|| format!("KILN_AGENT={}", a.display()))?;
                config.agent = Some(a);
            }
        }
        if config.cache_dir.is_none() {
            config.cache_dir = Some(self.cache_dir());
        }
        config.images = self.images();
        if config.vmm.is_none() {
            config.vmm = self.vmm();
        }
        if config.qemu.is_none() {
            config.qemu = self.qemu.clone();
        }
        if config.log_dir.is_none() {
            config.log_dir = self.log_dir();
        }
        if config.aws_credentials.is_none() {
            config.aws_credentials = self.aws.clone();
        }
        Ok(())
    }
}

/// The AWS credentials `var` names, when both the key and the secret are
/// set.
fn aws_credentials(var: impl Fn(&str) -> Option<String>) -> Option<AwsCredentials> {
    let key = var("AWS_ACCESS_KEY_ID").filter(|k| !k.is_empty())?;
    let secret = var("AWS_SECRET_ACCESS_KEY").filter(|s| !s.is_empty())?;
    Some(AwsCredentials {
        access_key_id: key,
        secret_access_key: Secret(secret),
        session_token: var("AWS_SESSION_TOKEN")
            .filter(|t| !t.is_empty())
            .map(Secret),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_keeps_what_it_names() {
        let env = Env {
            run_dir: Some("/env/run".into()),
            state_home: Some("/state".into()),
            ..Env::default()
        };
        let mut c = Config::default();
        env.complete(&mut c).unwrap();
        assert_eq!(c.run_dir, Some("/env/run".into()));
        assert_eq!(c.log_dir, Some("/state/kiln/logs".into()));
        assert_eq!(c.agent, None, "found next to kiln when the daemon starts");
        let mut c = Config {
            run_dir: Some("/toml/run".into()),
            ..Config::default()
        };
        env.complete(&mut c).unwrap();
        assert_eq!(c.run_dir, Some("/toml/run".into()));
    }

    #[test]
    fn aws_credentials_come_from_the_environment_and_stay_out_of_the_file_and_logs() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(aws_credentials(vars(&[("AWS_ACCESS_KEY_ID", "AKIA1")])).is_none());
        let creds = aws_credentials(vars(&[
            ("AWS_ACCESS_KEY_ID", "AKIA1"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t-value"),
        ]))
        .unwrap();
        assert_eq!(creds.access_key_id, "AKIA1");
        assert!(creds.session_token.is_none());
        let env = Env {
            aws: Some(creds),
            ..Env::default()
        };
        let mut c: Config =
            toml::from_str("[[runners]]\nname='a'\nurl='https://x'\ntoken='t'\n").unwrap();
        env.complete(&mut c).unwrap();
        assert_eq!(
            c.aws_credentials
                .as_ref()
                .map(|a| a.secret_access_key.0.as_str()),
            Some("s3cr3t-value")
        );
        assert!(
            !format!("{c:?}").contains("s3cr3t"),
            "Debug hides the secret"
        );
        assert!(
            !toml::to_string(&c).unwrap().contains("s3cr3t"),
            "never written to kiln.toml"
        );
    }
}
