//! GitHub Actions workflow front end: `jobs.<id>` with `run:` steps,
//! `strategy.matrix`, `env`/`defaults`, `if:` and `${{ }}` expressions.
//!
//! What is static at parse time (`github`, `matrix`, `strategy`, `runner`,
//! `vars`, and `env` unless a step of the job writes `$GITHUB_ENV`) is
//! evaluated here. Everything else stays in the spec for the executor:
//! [`Step::condition`](crate::Step::condition) holds an `if:` to check with [`eval_condition`], and
//! [`Step::runtime_expressions`](crate::Step::runtime_expressions) marks a step whose script, env or name
//! still contain `${{ }}` to pass through [`substitute`]. The executor runs
//! a step when its `when` allows it and its `condition` (if any) is true.
//!
//! `uses: actions/checkout@*` steps are dropped (the workspace already holds
//! the checkout); any other `uses:` is listed in
//! [`Workflow::unsupported`], or is an error in strict mode.
//!
//! Where each concern lives:
//!
//! | concern | module |
//! |---|---|
//! | the workflow: jobs in order, `needs`, limits | `mod.rs` ([`parse`]) |
//! | `strategy.matrix` (product, `exclude`, `include`) | `matrix.rs` |
//! | one job (one matrix instance) to a `JobSpec` | `job.rs` |
//! | the contexts known at parse time, and `GITHUB_*` variables | `contexts.rs` |
//! | `env:` mappings and the job's environment | `env.rs` |
//! | `runs-on` and `container` to an image ([`RunnerImages`]) | `image.rs` |
//! | one step: `run`, `uses`, `shell`, `if`, `defaults: run` | `step.rs` |
//! | `${{ }}` expressions: syntax, evaluation, functions | `expr/` |
//! | `$GITHUB_ENV`, `$GITHUB_OUTPUT`, `$GITHUB_STATE`, `$GITHUB_PATH` | `filecmd.rs` |

mod contexts;
mod env;
mod expr;
mod filecmd;
mod image;
mod job;
mod matrix;
mod services;
mod step;

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml::Value;

pub use expr::{
    classify_condition, eval_condition, eval_expr, substitute, substitute_partial, Condition,
    Contexts, ExprLimits, ExprValue, JobStatus,
};
pub use filecmd::{
    parse_env_file, parse_file_commands, parse_path_file, prepend_path, FileCommandError,
};
pub use image::RunnerImages;
pub use job::DEFAULT_JOB_TIMEOUT;
pub use step::DEFAULT_SHELL_PROBE;

use crate::context::{LocalContext, Options};
use crate::error::{Error, Result};
use crate::limits::{bytes, printable, short, Budget};
use crate::spec::JobSpec;
use crate::yaml::{self, join, key, scalar, scalars, Seg};
use env::env_map;
use job::{check_job_id, JobBuilder};
use matrix::matrix;
use step::run_defaults;

/// A parsed workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub name: Option<String>,
    /// Jobs in file order, matrix instances in expansion order.
    pub jobs: Vec<JobSpec>,
    /// Steps and jobs kiln cannot run, each as `path (name): reason`. Those
    /// steps are left out of their job; those jobs are left out.
    pub unsupported: Vec<String>,
    /// Things that were ignored (`services`, container options, ...).
    pub warnings: Vec<String>,
    /// Jobs whose `if:` is false when the file is parsed.
    pub skipped: Vec<String>,
    /// Jobs left out because no image is known for their `runs-on`, with
    /// what to pass (`-P label=IMAGE`).
    pub unmapped: Vec<(String, String)>,
    /// Job id to the names of its matrix instances.
    pub groups: BTreeMap<String, Vec<String>>,
}

impl Workflow {
    pub fn job(&self, name: &str) -> Option<&JobSpec> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// `name` (a job name, or a job id selecting all its matrix instances)
    /// with everything it `needs`, in run order.
    pub fn run_order(&self, name: &str) -> Result<Vec<&JobSpec>> {
        let targets = crate::order::select(&self.jobs, &self.groups, name);
        crate::order::run_order(&self.jobs, &[], &targets)
    }
}

/// Parses a workflow file. `file` is used in messages only.
pub fn parse(file: &str, contents: &str, ctx: &LocalContext, opts: &Options) -> Result<Workflow> {
    let limits = &opts.limits;
    let root = yaml::load(file, contents, limits, &Budget::new(limits.max_yaml_bytes))?;
    let out = Budget::new(limits.max_output_bytes);
    let c = yaml::Ctx {
        file,
        text: contents,
    };
    let over = |path: &[Seg], what: &str| {
        limit_err(
            &c,
            path,
            format!(
                "the workflow expands to more than {} at {} (max_output_bytes)",
                bytes(out.max()),
                short(what)
            ),
        )
    };
    let Some(root) = root.as_mapping() else {
        return Err(c.err(&[], "a workflow must be a mapping"));
    };
    let mut w = Workflow {
        name: root.get("name").and_then(scalar),
        jobs: Vec::new(),
        unsupported: Vec::new(),
        warnings: Vec::new(),
        skipped: Vec::new(),
        unmapped: Vec::new(),
        groups: BTreeMap::new(),
    };
    w.warnings.extend(env::computed_envs(root));
    let Some(jobs) = root.get("jobs").and_then(Value::as_mapping) else {
        return Err(c.err(&[key("jobs")], "`jobs` is missing or not a mapping"));
    };
    let wf_env = env_map(root.get("env"), &[key("env")], &c, limits)?;
    let wf_defaults = run_defaults(root.get("defaults"), &[key("defaults")], &c)?;
    let workflow_name = w.name.clone().unwrap_or_else(|| file.to_string());
    let inputs = contexts::inputs(root, &opts.inputs);
    let mut needs_raw: Vec<(usize, String, Vec<String>)> = Vec::new();
    let ids: BTreeSet<String> = jobs.keys().filter_map(scalar).collect();
    let mut instances = 0usize;
    for (id, job) in jobs {
        let id = scalar(id).unwrap_or_default();
        let jp = [key("jobs"), key(&id)];
        check_job_id(&id, &jp, &c, limits)?;
        let Some(job) = job.as_mapping() else {
            return Err(c.err(&jp, "a job must be a mapping"));
        };
        if let Some(u) = job.get("uses").and_then(Value::as_str) {
            w.unsupported
                .push(format!("jobs.{id}: reusable workflow `{}`", short(u)));
            continue;
        }
        let needs = match job.get("needs") {
            None => Vec::new(),
            Some(v) => scalars(v).ok_or_else(|| {
                c.err(
                    &join(&jp, &[key("needs")]),
                    "`needs` must be a job id or a list of ids",
                )
            })?,
        };
        if needs.len() > limits.max_needs {
            return Err(limit_err(
                &c,
                &join(&jp, &[key("needs")]),
                format!(
                    "a job may need at most {} jobs (max_needs)",
                    limits.max_needs
                ),
            ));
        }
        for n in &needs {
            if !ids.contains(n) {
                return Err(c.err(
                    &join(&jp, &[key("needs")]),
                    format!("job `{id}` needs `{}`, which does not exist", short(n)),
                ));
            }
        }
        let combos = matrix(job, &jp, &c, limits, &out)?;
        let Some(combos) = combos else {
            w.unsupported.push(format!(
                "jobs.{id}: `strategy.matrix` computed by an expression"
            ));
            continue;
        };
        let total = combos.len();
        instances = instances.saturating_add(total);
        if instances > limits.max_jobs {
            return Err(limit_err(
                &c,
                &jp,
                format!(
                    "the workflow has more than {} jobs (max_jobs)",
                    limits.max_jobs
                ),
            ));
        }
        let mut names = Vec::new();
        for (index, combo) in combos.iter().enumerate() {
            let built = JobBuilder {
                c: &c,
                ctx,
                opts,
                id: &id,
                jp: &jp,
                job,
                combo,
                index,
                total,
                wf_env: &wf_env,
                wf_defaults: &wf_defaults,
                workflow_name: &workflow_name,
                inputs: &inputs,
                out: &out,
            }
            .build(&mut w)?;
            if let Some(spec) = built {
                if !out.charge(spec.approx_bytes()) {
                    return Err(over(&jp, &spec.name));
                }
                names.push(spec.name.clone());
                if !needs.is_empty() {
                    needs_raw.push((w.jobs.len(), id.clone(), needs.clone()));
                }
                w.jobs.push(spec);
            }
        }
        w.groups.insert(id.clone(), names);
    }
    for (idx, id, needs) in needs_raw {
        let mut resolved = Vec::new();
        for n in needs {
            let group = w.groups.get(&n).map(Vec::as_slice).unwrap_or_default();
            let size: usize = group.iter().map(|g| g.len() + crate::NODE_BYTES).sum();
            if !out.charge(size) {
                return Err(over(&[key("jobs"), key(&id), key("needs")], &id));
            }
            resolved.extend(group.iter().cloned());
        }
        w.jobs[idx].needs = Some(resolved);
    }
    for j in &mut w.jobs {
        if j.needs.is_none() {
            j.needs = Some(Vec::new());
        }
    }
    let all: Vec<&str> = w.jobs.iter().map(|j| j.name.as_str()).collect();
    if let Err(Error::Invalid { path, message, .. }) = crate::order::run_order(&w.jobs, &[], &all) {
        let id = w.job(&path).map(|j| j.id.clone()).unwrap_or(path);
        return Err(c.err(&[key("jobs"), key(&id), key("needs")], message));
    }
    w.warnings = printable(std::mem::take(&mut w.warnings));
    w.unsupported = printable(std::mem::take(&mut w.unsupported));
    w.skipped = printable(std::mem::take(&mut w.skipped));
    if opts.strict && !w.unsupported.is_empty() {
        return Err(Error::Unsupported {
            file: file.to_string(),
            steps: w.unsupported,
        });
    }
    Ok(w)
}

/// A limit error at `path`.
fn limit_err(c: &yaml::Ctx<'_>, path: &[Seg], message: String) -> Error {
    c.err(path, message).into_limit()
}
