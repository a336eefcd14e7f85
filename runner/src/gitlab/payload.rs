//! The job payload of `POST /jobs/request` (201), as GitLab sends it: the
//! wire format only (see docs/gitlab.md); [`super::job`] turns it into a
//! `JobSpec`.

use serde::{Deserialize, Deserializer};

/// `null` and missing both mean "default".
fn nd<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobResponse {
    pub id: u64,
    pub token: String,
    #[serde(default, deserialize_with = "nd")]
    pub allow_git_fetch: bool,
    #[serde(default, deserialize_with = "nd")]
    pub job_info: JobInfo,
    #[serde(default, deserialize_with = "nd")]
    pub git_info: GitInfo,
    #[serde(default, deserialize_with = "nd")]
    pub runner_info: RunnerInfo,
    #[serde(default, deserialize_with = "nd")]
    pub variables: Vec<JobVariable>,
    #[serde(default, deserialize_with = "nd")]
    pub steps: Vec<JobStep>,
    #[serde(default, deserialize_with = "nd")]
    pub image: Option<Image>,
    #[serde(default, deserialize_with = "nd")]
    pub services: Vec<Service>,
    #[serde(default, deserialize_with = "nd")]
    pub artifacts: Vec<Artifact>,
    #[serde(default, deserialize_with = "nd")]
    pub dependencies: Vec<Dependency>,
    #[serde(default, deserialize_with = "nd")]
    pub cache: Vec<Cache>,
    #[serde(default, deserialize_with = "nd")]
    pub features: Features,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobInfo {
    #[serde(default, deserialize_with = "nd")]
    pub name: String,
    #[serde(default, deserialize_with = "nd")]
    pub stage: String,
    #[serde(default, deserialize_with = "nd")]
    pub project_id: u64,
    #[serde(default, deserialize_with = "nd")]
    pub project_name: String,
    #[serde(default, deserialize_with = "nd")]
    pub project_full_path: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GitInfo {
    #[serde(default, deserialize_with = "nd")]
    pub repo_url: String,
    #[serde(rename = "ref", default, deserialize_with = "nd")]
    pub git_ref: String,
    #[serde(default, deserialize_with = "nd")]
    pub sha: String,
    #[serde(default, deserialize_with = "nd")]
    pub before_sha: String,
    #[serde(default, deserialize_with = "nd")]
    pub ref_type: String,
    #[serde(default, deserialize_with = "nd")]
    pub refspecs: Vec<String>,
    #[serde(default, deserialize_with = "nd")]
    pub depth: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RunnerInfo {
    #[serde(default, deserialize_with = "nd")]
    pub timeout: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobVariable {
    pub key: String,
    #[serde(default, deserialize_with = "nd")]
    pub value: String,
    #[serde(default, deserialize_with = "nd")]
    pub public: bool,
    #[serde(default, deserialize_with = "nd")]
    pub masked: bool,
    #[serde(default, deserialize_with = "nd")]
    pub file: bool,
    #[serde(default, deserialize_with = "nd")]
    pub raw: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct JobStep {
    pub name: String,
    #[serde(default, deserialize_with = "nd")]
    pub script: Vec<String>,
    #[serde(default, deserialize_with = "nd")]
    pub timeout: i64,
    #[serde(default, deserialize_with = "nd")]
    pub when: String,
    #[serde(default, deserialize_with = "nd")]
    pub allow_failure: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Image {
    #[serde(default, deserialize_with = "nd")]
    pub name: String,
}

/// One of `services` (`common/spec` `Image`): the image `name`, its
/// `alias`(es), `entrypoint`, `command` and `variables`. `ports`,
/// `pull_policy` and `executor_opts` are not used.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Service {
    #[serde(default, deserialize_with = "nd")]
    pub name: String,
    #[serde(default, deserialize_with = "nd")]
    pub alias: String,
    #[serde(default, deserialize_with = "nd")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nd")]
    pub command: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nd")]
    pub variables: Vec<JobVariable>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Artifact {
    #[serde(default, deserialize_with = "nd")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "nd")]
    pub untracked: bool,
    #[serde(default, deserialize_with = "nd")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "nd")]
    pub exclude: Vec<String>,
    #[serde(default, deserialize_with = "nd")]
    pub when: Option<String>,
    #[serde(default, deserialize_with = "nd")]
    pub artifact_type: Option<String>,
    #[serde(default, deserialize_with = "nd")]
    pub artifact_format: Option<String>,
    #[serde(default, deserialize_with = "nd")]
    pub expire_in: Option<String>,
}

/// One `cache:` entry as GitLab sends it (the key already has its
/// `-protected`/`-non_protected` suffix; variables are the runner's to
/// expand).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Cache {
    #[serde(default, deserialize_with = "nd")]
    pub key: String,
    #[serde(default, deserialize_with = "nd")]
    pub untracked: bool,
    #[serde(default, deserialize_with = "nd")]
    pub policy: String,
    #[serde(default, deserialize_with = "nd")]
    pub paths: Vec<String>,
    #[serde(default, deserialize_with = "nd")]
    pub when: String,
    #[serde(default, deserialize_with = "nd")]
    pub fallback_keys: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Dependency {
    pub id: u64,
    #[serde(default, deserialize_with = "nd")]
    pub name: String,
    #[serde(default, deserialize_with = "nd")]
    pub token: String,
    #[serde(default, deserialize_with = "nd")]
    pub artifacts_file: Option<ArtifactsFile>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ArtifactsFile {
    #[serde(default, deserialize_with = "nd")]
    pub filename: String,
    #[serde(default, deserialize_with = "nd")]
    pub size: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Features {
    #[serde(default, deserialize_with = "nd")]
    pub trace_sections: bool,
    #[serde(default, deserialize_with = "nd")]
    pub token_mask_prefixes: Vec<String>,
    #[serde(default, deserialize_with = "nd")]
    pub failure_reasons: Vec<String>,
}

/// Where the sources come from (`GIT_STRATEGY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitStrategy {
    /// No sources (`none`, `empty`).
    None,
    /// Fetch into a fresh workspace (`fetch`, `clone`: the same thing in a
    /// disposable workspace).
    Clone,
}

/// `GIT_SUBMODULE_STRATEGY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submodules {
    None,
    Normal,
    Recursive,
}
