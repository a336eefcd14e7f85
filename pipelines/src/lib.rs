//! `JobSpec`: the one job model every provider (local pipeline files, GitLab,
//! GitHub) feeds into the executor, and the front ends that build it from
//! `.gitlab-ci.yml` ([`gitlab`]) and GitHub workflow files ([`github`]).
//!
//! This crate does no I/O beyond reading pipeline files, and spawns no
//! processes: facts about the checkout come in through [`LocalContext`].

mod context;
mod duration;
mod error;
pub mod github;
pub mod gitlab;
mod order;
mod spec;
mod yaml;

use std::io;
use std::path::Path;

pub use context::{LocalContext, Options};
pub use duration::parse_duration;
pub use error::{Error, ExprError, Location, Result};
pub use spec::{
    AllowFailure, ArtifactSpec, ArtifactWhen, JobSource, JobSpec, JobWhen, Shell, Step, StepWhen,
    Variable,
};

/// Which front end a file needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    GitLab,
    GitHub,
    Unknown,
}

/// Decides the format from the path (`.gitlab-ci.yml`,
/// `.github/workflows/*.yml`), else from the top-level keys (`jobs` with
/// `on`/`runs-on` is GitHub; `stages` or a mapping with `script` is GitLab).
pub fn detect(path: &Path, contents: &str) -> Format {
    let p = path.to_string_lossy().replace('\\', "/");
    let yml = p.ends_with(".yml") || p.ends_with(".yaml");
    if p.ends_with(".gitlab-ci.yml") || p.ends_with(".gitlab-ci.yaml") {
        return Format::GitLab;
    }
    if yml && p.contains(".github/workflows/") {
        return Format::GitHub;
    }
    let Ok(serde_yaml::Value::Mapping(top)) = serde_yaml::from_str::<serde_yaml::Value>(contents)
    else {
        return Format::Unknown;
    };
    if let Some(serde_yaml::Value::Mapping(jobs)) = top.get("jobs") {
        let looks_github = top.contains_key("on")
            || jobs
                .values()
                .any(|j| j.get("runs-on").is_some() || j.get("steps").is_some());
        if looks_github {
            return Format::GitHub;
        }
    }
    let gitlab_keys = ["stages", "include", "default", "workflow", "before_script"];
    if gitlab_keys.iter().any(|k| top.contains_key(*k))
        || top
            .values()
            .any(|v| v.get("script").is_some() || v.get("extends").is_some())
    {
        return Format::GitLab;
    }
    Format::Unknown
}

/// Jobs of either format, as one list.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub format: Format,
    pub jobs: Vec<JobSpec>,
    /// Ignored features, unsupported steps and excluded jobs, as text.
    pub notes: Vec<String>,
}

/// Parses `contents` in the format [`detect`] finds. `read` reads files
/// relative to the project root (GitLab includes).
pub fn load(
    path: &Path,
    contents: &str,
    ctx: &LocalContext,
    opts: &Options,
    read: &dyn Fn(&str) -> io::Result<String>,
) -> Result<Pipeline> {
    let file = path.display().to_string();
    match detect(path, contents) {
        Format::GitLab => {
            let p = gitlab::parse(&file, contents, ctx, opts, read)?;
            let mut notes = p.warnings;
            notes.extend(p.excluded.iter().map(|j| format!("{j}: excluded by rules")));
            Ok(Pipeline {
                format: Format::GitLab,
                jobs: p.jobs,
                notes,
            })
        }
        Format::GitHub => {
            let w = github::parse(&file, contents, ctx, opts)?;
            let mut notes = w.warnings;
            notes.extend(w.unsupported.iter().map(|u| format!("unsupported: {u}")));
            notes.extend(w.skipped.iter().map(|j| format!("{j}: skipped by `if`")));
            Ok(Pipeline {
                format: Format::GitHub,
                jobs: w.jobs,
                notes,
            })
        }
        Format::Unknown => Err(Error::Invalid {
            file,
            location: None,
            path: "(file)".into(),
            message: "neither a .gitlab-ci.yml nor a GitHub workflow".into(),
        }),
    }
}

/// One line of `kiln list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSummary {
    pub name: String,
    pub id: String,
    pub stage: Option<String>,
    pub image: String,
    pub when: JobWhen,
    pub needs: Vec<String>,
}

/// The jobs of a pipeline file, for listing.
pub fn list_jobs(
    path: &Path,
    contents: &str,
    ctx: &LocalContext,
    opts: &Options,
    read: &dyn Fn(&str) -> io::Result<String>,
) -> Result<Vec<JobSummary>> {
    let p = load(path, contents, ctx, opts, read)?;
    Ok(p.jobs
        .into_iter()
        .map(|j| JobSummary {
            name: j.name,
            id: j.id,
            stage: j.stage,
            image: j.image,
            when: j.when,
            needs: j.needs.unwrap_or_default(),
        })
        .collect())
}
