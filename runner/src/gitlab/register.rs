//! The runner's identity with GitLab: its system id, `kiln gitlab verify`
//! and `kiln gitlab register`.

use std::path::Path;
use std::time::Duration;

use super::backoff::jitter;
use super::client::Client;
use super::GitlabError;
use crate::config::{Config, RunnerConfig};

/// `s_` + the machine id's first 12 characters, or `r_` + 12 pseudo-random
/// ones (gitlab-runner's `system_id`).
pub fn system_id() -> String {
    let mid = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let mid = mid.trim();
    if mid.len() >= 12 && mid.chars().all(|c| c.is_ascii_hexdigit()) {
        return format!("s_{}", &mid[..12]);
    }
    let n = jitter(Duration::from_secs(1_000_000)).as_nanos();
    format!("r_{:012x}", n & 0xffff_ffff_ffff)
}

/// `kiln gitlab verify`: check every runner's token.
pub async fn verify_all(
    config: &Config,
) -> Result<Vec<(String, Result<Option<u64>, GitlabError>)>, GitlabError> {
    let sid = system_id();
    let mut out = Vec::new();
    for r in &config.runners {
        let c = Client::new(&r.url)?;
        out.push((r.name.clone(), c.verify(&r.token, &sid).await.map(|i| i.id)));
    }
    Ok(out)
}

/// `kiln gitlab register`: legacy registration; adds a `[[runners]]` entry
/// to the file (created when missing).
pub async fn register(
    config_path: &Path,
    url: &str,
    registration_token: &str,
    name: &str,
    tags: &[String],
    image: Option<String>,
) -> Result<u64, GitlabError> {
    let mut config = if config_path.exists() {
        Config::load(config_path)?
    } else {
        Config::default()
    };
    let c = Client::new(url)?;
    let id = c
        .register(registration_token, name, tags, tags.is_empty())
        .await?;
    let token = id.token.clone().ok_or_else(|| GitlabError::Status {
        what: "registering the runner",
        status: 201,
        body: "no token in the answer".into(),
    })?;
    let mut r: RunnerConfig = toml::from_str(&format!(
        "name = {}\nurl = {}\ntoken = {}\n",
        toml::Value::from(name),
        toml::Value::from(url),
        toml::Value::from(token)
    ))
    .map_err(|e| GitlabError::BadJob(e.to_string()))?;
    r.image = image;
    config.runners.retain(|x| x.name != name);
    config.runners.push(r);
    config.save(config_path)?;
    Ok(id.id.unwrap_or(0))
}
