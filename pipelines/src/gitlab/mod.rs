//! `.gitlab-ci.yml` front end: does locally what the GitLab server does
//! before a job reaches a runner (`include`, `extends`, `default`, `rules`,
//! `parallel`, variable precedence), then shapes each job the way the server
//! hands it to the runner: `before_script` + `script` as one step,
//! `after_script` as a second step that always runs.
//!
//! The passes, in the order [`parse`] runs them, each in its own module:
//!
//! | pass | module |
//! |---|---|
//! | read the file and its `include:`s, merge them | `include.rs` |
//! | replace `!reference [job, key]` tags | `reference.rs` |
//! | `stages:` and the order of jobs | `stages.rs` |
//! | `default:` and `extends:` (with `inherit: default`) | `extends.rs` |
//! | `workflow: rules`, job `rules`, `only`/`except`, `when` | `rules.rs` |
//! | `parallel:` (numbered and `matrix`) | `parallel.rs` |
//! | variables: predefined, layers, `$X` expansion | `variables.rs` |
//! | one job to a [`JobSpec`] (stage, image, timeout, ...) | `job.rs` |
//! | `before_script`/`script`/`after_script` to step scripts | `script.rs` |
//! | `artifacts:` | `artifacts.rs` |
//! | `cache:` (keys resolved as GitLab resolves them) | `cache.rs` |
//! | `needs:` to job names, and the final order check | `needs.rs` |
//! | `rules: if` expressions | `expr.rs` |
//!
//! `build.rs` strings the passes after `!reference` together.
//!
//! Scripts run as [`Shell::Sh`](crate::Shell::Sh) with a preamble modelled
//! on gitlab-runner's bash shell (`shells/bash.go`): the script re-executes
//! itself with `bash` when the image has it (as the Docker executor does),
//! enables `pipefail` only when the running shell knows it, and sets
//! `errexit`. Each command is echoed as `$ cmd` and followed by an
//! exit-code check, as the runner does.

mod artifacts;
mod build;
mod cache;
mod expr;
mod extends;
mod include;
mod include_source;
mod inputs;
mod job;
mod needs;
mod parallel;
mod predefined;
mod reference;
mod rules;
mod script;
mod services;
mod stages;
mod variables;

#[cfg(test)]
mod test_util;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;

pub use expr::eval_rule_if;
pub use script::{render, AFTER_SCRIPT_TIMEOUT, PREAMBLE};
pub use stages::DEFAULT_STAGES;
pub use variables::expand;

use crate::context::{LocalContext, Options};
use crate::error::{Error, Result};
use crate::limits::{bytes, short, Budget, Limits};
use crate::spec::JobSpec;
use crate::yaml::{self, key, Seg};

/// Top-level keys that are not jobs.
const RESERVED: [&str; 13] = [
    "image",
    "services",
    "stages",
    "types",
    "before_script",
    "after_script",
    "variables",
    "cache",
    "include",
    "default",
    "workflow",
    "spec",
    "pages:deploy",
];

/// Whether a top-level key names a job: neither a reserved keyword nor
/// hidden (`.template`).
fn is_job(name: &str) -> bool {
    !RESERVED.contains(&name) && !name.starts_with('.')
}

/// A parsed `.gitlab-ci.yml` with its includes.
#[derive(Debug, Clone, PartialEq)]
pub struct GitlabPipeline {
    /// Stages in order, `.pre` first and `.post` last.
    pub stages: Vec<String>,
    /// Jobs in pipeline order (stage, then file order).
    pub jobs: Vec<JobSpec>,
    /// Jobs left out because `rules`, `only`/`except` or `when: never`
    /// excluded them, or `workflow: rules` excluded the pipeline.
    pub excluded: Vec<String>,
    /// For each excluded job, the clause that excluded it
    /// (`rules: no rule matched`, `only: ["main"]`, ...).
    pub why_excluded: BTreeMap<String, String>,
    /// Things that were ignored (`services`, `changes:` rules, ...).
    pub warnings: Vec<String>,
    /// Job key before `parallel` expansion to the expanded job names.
    pub parallel_groups: BTreeMap<String, Vec<String>>,
}

impl GitlabPipeline {
    pub fn job(&self, name: &str) -> Option<&JobSpec> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// The jobs to run to run `name` locally, in run order, `name` last:
    /// its `needs` (transitively) or, for a job without `needs`, every job
    /// of the earlier stages (and their dependencies). Manual jobs of
    /// earlier stages are left out unless needed explicitly. `name` may be a
    /// job key of a `parallel` job, which selects all its instances.
    pub fn run_order(&self, name: &str) -> Result<Vec<&JobSpec>> {
        let targets = crate::order::select(&self.jobs, &self.parallel_groups, name);
        crate::order::run_order(&self.jobs, &self.stages, &targets)
    }
}

/// Reads `<project_dir>/.gitlab-ci.yml` and its local includes from disk,
/// includes strictly inside the project (see [`crate::ProjectFiles`]).
pub fn parse_project(ctx: &LocalContext, opts: &Options) -> Result<GitlabPipeline> {
    let files = crate::ProjectFiles::new(&ctx.project_dir, &opts.limits);
    let text = files
        .read(".gitlab-ci.yml")
        .map_err(|source| Error::Include {
            file: ctx.project_dir.display().to_string(),
            location: None,
            include: ".gitlab-ci.yml".to_string(),
            source,
        })?;
    parse(".gitlab-ci.yml", &text, ctx, opts, &|p| files.read(p))
}

/// Parses a `.gitlab-ci.yml`. `read` returns the contents of a file given
/// its path relative to the project root (for `include: local` and
/// `rules: exists`).
pub fn parse(
    file: &str,
    contents: &str,
    ctx: &LocalContext,
    opts: &Options,
    read: &dyn Fn(&str) -> io::Result<String>,
) -> Result<GitlabPipeline> {
    let limits = &opts.limits;
    let mut p = Parser {
        ctx,
        opts,
        limits,
        read,
        sources: Vec::new(),
        origin: HashMap::new(),
        seen_includes: BTreeSet::new(),
        includes: 0,
        exists: HashMap::new(),
        warnings: Vec::new(),
        why_excluded: BTreeMap::new(),
        yaml_budget: Budget::new(limits.max_yaml_bytes),
        out_budget: Budget::new(limits.max_output_bytes),
    };
    let top = p.load(
        file,
        contents.to_string(),
        0,
        inputs::Given::Cli(&opts.inputs),
        &include_source::Base::Project,
    )?;
    let top = p.resolve_references(top)?;
    p.build(top)
}

struct Parser<'a> {
    ctx: &'a LocalContext,
    opts: &'a Options,
    limits: &'a Limits,
    read: &'a dyn Fn(&str) -> io::Result<String>,
    /// (file name, text) of the main file and every include.
    sources: Vec<(String, String)>,
    /// Top-level key to the index of the source that defined it last.
    origin: HashMap<String, usize>,
    seen_includes: BTreeSet<String>,
    /// `include:` entries met so far, nested ones and repeats included.
    includes: usize,
    /// `rules: exists` answers, by path: each file is looked at once.
    exists: HashMap<String, bool>,
    warnings: Vec<String>,
    /// Excluded job to the clause that excluded it.
    why_excluded: BTreeMap<String, String>,
    /// The YAML of every file, aliases expanded, and the texts kept for
    /// error positions.
    yaml_budget: Budget,
    /// Everything built from the YAML: jobs after `extends`, `!reference`
    /// and `default:`, and the job specs.
    out_budget: Budget,
}

impl Parser<'_> {
    fn err_in(&self, top_key: Option<&str>, path: &[Seg], message: impl Into<String>) -> Error {
        let idx = top_key
            .and_then(|k| self.origin.get(k).copied())
            .unwrap_or(0);
        let (file, text) = self.sources.get(idx).cloned().unwrap_or_default();
        yaml::Ctx {
            file: &file,
            text: &text,
        }
        .err(path, message)
    }

    fn err(&self, path: &[Seg], message: impl Into<String>) -> Error {
        let top = match path.first() {
            Some(Seg::Key(k)) => Some(k.clone()),
            _ => None,
        };
        self.err_in(top.as_deref(), path, message)
    }

    /// Charges `n` bytes of `what` to the output budget.
    fn charge_out(&self, n: usize, top_key: Option<&str>, what: &str) -> Result<()> {
        if self.out_budget.charge(n) {
            return Ok(());
        }
        let (file, location) = match top_key {
            Some(k) => {
                let idx = self.origin.get(k).copied().unwrap_or(0);
                let (file, text) = self.sources.get(idx).cloned().unwrap_or_default();
                let location = yaml::locate(&text, &[key(k)]);
                (file, location)
            }
            None => (
                self.sources
                    .first()
                    .map(|s| s.0.clone())
                    .unwrap_or_default(),
                None,
            ),
        };
        Err(Error::Limit {
            file,
            location,
            message: format!(
                "the pipeline expands to more than {} at {} (max_output_bytes; `extends`, \
                 `!reference`, `default:`, `parallel` and variables copy what they use)",
                bytes(self.out_budget.max()),
                short(what)
            ),
        })
    }

    fn limit(&self, path: &[Seg], message: String) -> Error {
        self.err(path, message).into_limit()
    }
}
