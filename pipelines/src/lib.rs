//! `JobSpec`: the one job model every provider (local pipeline files, GitLab,
//! GitHub) feeds into the executor, and the front ends that build it from
//! `.gitlab-ci.yml` ([`gitlab`]) and GitHub workflow files ([`github`]).
//!
//! This crate does no I/O beyond reading pipeline files, and spawns no
//! processes: facts about the checkout come in through [`LocalContext`].

mod context;
mod duration;
mod error;
mod files;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod github;
pub mod gitlab;
mod limits;
mod order;
mod remote;
pub mod services;
mod spec;
mod yaml;

use std::io;
use std::path::Path;

use serde_yaml::Value;

pub use context::{LocalContext, Options};
pub use duration::parse_duration;
pub use error::{Error, ExprError, Location, Result};
pub use files::{read_beneath, read_file, ProjectFiles};
pub use limits::{Limits, NODE_BYTES};
pub use remote::{FetchFn, GitlabApi, GitlabFiles, RemoteIncludes};
pub use spec::{
    AllowFailure, ArtifactSpec, ArtifactWhen, CachePolicy, CacheSpec, JobSource, JobSpec, JobWhen,
    NeedResult, ServiceSpec, Shell, Step, StepWhen, Variable,
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
/// A file that is not valid YAML (or goes past the default [`Limits`]) is
/// `Unknown`; [`load`] reports why.
pub fn detect(path: &Path, contents: &str) -> Format {
    if let Some(f) = format_from_path(path) {
        return f;
    }
    let limits = Limits::default();
    let budget = limits::Budget::new(limits.max_yaml_bytes);
    match yaml::load_lenient("", contents, &limits, &budget) {
        Ok(v) => format_from_keys(&v),
        Err(_) => Format::Unknown,
    }
}

fn format_from_path(path: &Path) -> Option<Format> {
    let p = path.to_string_lossy().replace('\\', "/");
    let yml = p.ends_with(".yml") || p.ends_with(".yaml");
    if p.ends_with(".gitlab-ci.yml") || p.ends_with(".gitlab-ci.yaml") {
        return Some(Format::GitLab);
    }
    if yml && p.contains(".github/workflows/") {
        return Some(Format::GitHub);
    }
    None
}

fn format_from_keys(top: &Value) -> Format {
    let Value::Mapping(top) = top else {
        return Format::Unknown;
    };
    if let Some(Value::Mapping(jobs)) = top.get("jobs") {
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

/// Adds what kiln assumed about the file to an error's message.
fn with_note(e: Error, note: &str) -> Error {
    let add = |m: String| format!("{} ({note})", limits::short_n(&m, 280));
    match e {
        Error::Syntax {
            file,
            location,
            message,
        } => Error::Syntax {
            file,
            location,
            message: add(message),
        },
        Error::Invalid {
            file,
            location,
            path,
            message,
        } => Error::Invalid {
            file,
            location,
            path,
            message: add(message),
        },
        Error::Limit {
            file,
            location,
            message,
        } => Error::Limit {
            file,
            location,
            message: add(message),
        },
        other => other,
    }
}

/// Jobs of either format, as one list.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub format: Format,
    pub jobs: Vec<JobSpec>,
    /// Ignored features, unsupported steps and excluded jobs, as text.
    pub notes: Vec<String>,
    /// Jobs the file defines that this pipeline leaves out, with why.
    pub excluded: Vec<Excluded>,
    /// GitHub: job name to the contexts of its run-time `if:`
    /// ([`github::Workflow::conditions`]); see [`github::job_should_run`].
    pub conditions: std::collections::BTreeMap<String, github::Contexts>,
    /// GitHub: a job that called a reusable workflow to that workflow's
    /// `on.workflow_call.outputs` ([`github::Workflow::call_outputs`]); see
    /// [`github::call_outputs`].
    pub call_outputs: std::collections::BTreeMap<String, Vec<(String, String)>>,
}

/// A job left out of the pipeline, and the clause that left it out
/// (`rules: no rule matched`, `only: ["tags"]`, `if: ...`, ...).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Excluded {
    pub name: String,
    pub reason: String,
}

/// Parses `contents` in the format [`detect`] finds. `read` reads files
/// relative to the project root (GitLab includes); give it
/// [`ProjectFiles::read`] so that includes stay inside the project.
///
/// When the name does not tell the format, the file is parsed to look at
/// its keys; a YAML error then comes back as it is (with its line and
/// column) and every error says which kind of file kiln assumed.
pub fn load(
    path: &Path,
    contents: &str,
    ctx: &LocalContext,
    opts: &Options,
    read: &dyn Fn(&str) -> io::Result<String>,
) -> Result<Pipeline> {
    let file = path.display().to_string();
    let (format, note) = match format_from_path(path) {
        Some(f) => (f, None),
        None => {
            let budget = limits::Budget::new(opts.limits.max_yaml_bytes);
            let top = yaml::load_lenient(&file, contents, &opts.limits, &budget).map_err(|e| {
                with_note(
                    e,
                    "kiln read it to tell a .gitlab-ci.yml from a GitHub workflow: \
                     it is neither named .gitlab-ci.yml nor under .github/workflows/",
                )
            })?;
            match format_from_keys(&top) {
                Format::GitLab => (
                    Format::GitLab,
                    Some("read as a .gitlab-ci.yml, from its keys"),
                ),
                Format::GitHub => (
                    Format::GitHub,
                    Some("read as a GitHub workflow, from its keys"),
                ),
                Format::Unknown => (Format::Unknown, None),
            }
        }
    };
    let noted = |e: Error| match note {
        Some(n) => with_note(e, n),
        None => e,
    };
    match format {
        Format::GitLab => {
            let p = gitlab::parse(&file, contents, ctx, opts, read).map_err(noted)?;
            let mut notes = p.warnings;
            let excluded: Vec<Excluded> = p
                .excluded
                .iter()
                .map(|j| Excluded {
                    name: j.clone(),
                    reason: p.why_excluded.get(j).cloned().unwrap_or_default(),
                })
                .collect();
            notes.extend(
                excluded
                    .iter()
                    .map(|e| format!("{}: excluded by {}", e.name, e.reason)),
            );
            let mut jobs = p.jobs;
            if let Some(image) = &opts.image {
                for j in &mut jobs {
                    j.image = image.clone();
                }
            }
            Ok(Pipeline {
                format: Format::GitLab,
                jobs,
                notes,
                excluded,
                conditions: Default::default(),
                call_outputs: Default::default(),
            })
        }
        Format::GitHub => {
            let w = github::parse_with(&file, contents, ctx, opts, read).map_err(noted)?;
            let mut notes = w.warnings;
            notes.extend(w.unsupported.iter().map(|u| format!("unsupported: {u}")));
            notes.extend(w.skipped.iter().map(|j| format!("{j}: skipped by `if`")));
            let mut excluded: Vec<Excluded> = w
                .skipped
                .iter()
                .map(|j| Excluded {
                    name: j.clone(),
                    reason: "if: false".into(),
                })
                .collect();
            for (name, reason) in &w.unmapped {
                notes.push(format!("{name}: left out: {reason}"));
                excluded.push(Excluded {
                    name: name.clone(),
                    reason: reason.clone(),
                });
            }
            Ok(Pipeline {
                format: Format::GitHub,
                jobs: w.jobs,
                notes,
                excluded,
                conditions: w.conditions,
                call_outputs: w.call_outputs,
            })
        }
        Format::Unknown => Err(Error::Invalid {
            file,
            location: None,
            path: "(file)".into(),
            message: "neither a .gitlab-ci.yml nor a GitHub workflow: no top-level `jobs` with \
                      `on`, `runs-on` or `steps` (GitHub), nor `stages`, `include`, `default`, \
                      `workflow` or a job with `script` (GitLab); name it .gitlab-ci.yml or put \
                      it under .github/workflows/"
                .into(),
        }),
    }
}

/// One line of `kiln list` (and one object of `--list --json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobSummary {
    pub name: String,
    pub id: String,
    pub stage: Option<String>,
    pub image: String,
    /// As GitLab writes it: `on_success`, `on_failure`, `always`, `manual`.
    #[serde(serialize_with = "ser_when")]
    pub when: JobWhen,
    /// `true`, `false` or `{"exit_codes": [..]}`, as in the YAML.
    #[serde(serialize_with = "ser_allow_failure")]
    pub allow_failure: AllowFailure,
    pub needs: Vec<String>,
    /// `when: delayed`: seconds after its turn that the job starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_in_s: Option<u64>,
}

/// `when` as GitLab writes it.
pub fn when_name(w: JobWhen) -> &'static str {
    match w {
        JobWhen::OnSuccess => "on_success",
        JobWhen::OnFailure => "on_failure",
        JobWhen::Always => "always",
        JobWhen::Manual => "manual",
    }
}

fn ser_when<S: serde::Serializer>(w: &JobWhen, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(when_name(*w))
}

fn ser_allow_failure<S: serde::Serializer>(
    a: &AllowFailure,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::Serialize;
    match a {
        AllowFailure::No => s.serialize_bool(false),
        AllowFailure::Yes => s.serialize_bool(true),
        AllowFailure::ExitCodes(c) => serde_json::json!({ "exit_codes": c }).serialize(s),
    }
}

impl JobSummary {
    pub fn of(j: &JobSpec) -> JobSummary {
        JobSummary {
            name: j.name.clone(),
            id: j.id.clone(),
            stage: j.stage.clone(),
            image: j.image.clone(),
            when: j.when,
            allow_failure: j.allow_failure.clone(),
            needs: j.needs.clone().unwrap_or_default(),
            start_in_s: j.start_in.map(|d| d.as_secs()),
        }
    }
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
    Ok(p.jobs.iter().map(JobSummary::of).collect())
}
