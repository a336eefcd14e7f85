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
//! | workflow commands on a step's output (`::set-output`, `::add-mask::`, `::group::`) | `command.rs` |

mod command;
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

pub use command::{log_line, parse_command, resumes_commands, WorkflowCommand};
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
    /// Job name to the contexts its `if:` is evaluated with at run time
    /// (`github`, `vars`, `inputs`, ...; the provider adds `needs` and the
    /// status), for the jobs whose `if:` waits for run time.
    pub conditions: BTreeMap<String, Contexts>,
    /// This file's `on.workflow_call.outputs`: (name, `value`, an
    /// expression on `jobs.<id>.outputs`/`.result`).
    pub outputs: Vec<(String, String)>,
    /// A job that called a reusable workflow (`CALLER`, or `OUTER / INNER`
    /// for nested calls) to that workflow's `outputs`: what the caller's
    /// `needs.CALLER.outputs` are made of (see [`call_outputs`]).
    pub call_outputs: BTreeMap<String, Vec<(String, String)>>,
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

/// Parses a workflow file. `file` is used in messages only. Reusable
/// workflows it calls are not read: see [`parse_with`].
pub fn parse(file: &str, contents: &str, ctx: &LocalContext, opts: &Options) -> Result<Workflow> {
    let none = |_: &str| -> std::io::Result<String> { Err(std::io::ErrorKind::NotFound.into()) };
    parse_with(file, contents, ctx, opts, &none)
}

/// How deep reusable workflows may call each other (GitHub: 4 levels
/// below the caller at the time of writing; 10 since 2025).
pub const MAX_CALL_DEPTH: usize = 10;

/// [`parse`], reading the local reusable workflows that jobs call
/// (`uses: ./.github/workflows/x.yml`) with `read` (paths relative to the
/// project root; give it [`crate::ProjectFiles::read`]). Their jobs join
/// the workflow as `CALLER / JOB` (with `stage` = the caller's id, as
/// GitHub groups them), after the caller's `needs`; a job that needs the
/// caller needs them all. A reusable workflow from another repository
/// cannot be run: the caller is left out with why, and a job that needs it
/// says so when it is run.
pub fn parse_with(
    file: &str,
    contents: &str,
    ctx: &LocalContext,
    opts: &Options,
    read: &dyn Fn(&str) -> std::io::Result<String>,
) -> Result<Workflow> {
    parse_at(file, contents, ctx, opts, read, 0)
}

fn parse_at(
    file: &str,
    contents: &str,
    ctx: &LocalContext,
    opts: &Options,
    read: &dyn Fn(&str) -> std::io::Result<String>,
    depth: usize,
) -> Result<Workflow> {
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
        conditions: BTreeMap::new(),
        outputs: declared_outputs(root),
        call_outputs: BTreeMap::new(),
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
        if let Some(u) = job.get("uses").and_then(Value::as_str) {
            let call = Call {
                id: &id,
                uses: u,
                job,
                needs: &needs,
                depth,
                inputs: &inputs,
            };
            let called = call.run(&c, ctx, opts, read, &mut w, &mut needs_raw)?;
            instances = count_jobs(instances, called, &c, &jp, limits)?;
            continue;
        }
        let combos = matrix(job, &jp, &c, limits, &out)?;
        let Some(combos) = combos else {
            w.unsupported.push(format!(
                "jobs.{id}: `strategy.matrix` computed by an expression"
            ));
            continue;
        };
        let total = combos.len();
        instances = count_jobs(instances, total, &c, &jp, limits)?;
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
        let mut resolved = w.jobs[idx].needs.take().unwrap_or_default();
        for n in needs {
            let group = match w.groups.get(&n) {
                Some(g) => g.clone(),
                // A job left out (a reusable workflow kiln cannot run): kept
                // by its id, so that running a job that needs it says why.
                None => vec![n.clone()],
            };
            let size: usize = group.iter().map(|g| g.len() + crate::NODE_BYTES).sum();
            if !out.charge(size) {
                return Err(over(&[key("jobs"), key(&id), key("needs")], &id));
            }
            resolved.extend(group);
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

/// Whether a GitHub job runs, as GitHub decides a job-level `if:` once the
/// jobs it needs have ended: `status` is how they ended, all of them up the
/// chain of `needs` (`Failure` when one failed, `Skipped` when one was
/// skipped and none failed), `contexts` the job's
/// [`Workflow::conditions`] entry. Without an `if:` (or with a bare status
/// function, decided into `job.when` at parse time) the job runs only when
/// every needed job succeeded; `always()` runs it whatever happened.
pub fn job_should_run(
    job: &JobSpec,
    contexts: Option<&Contexts>,
    status: JobStatus,
) -> std::result::Result<bool, crate::ExprError> {
    use crate::JobWhen;
    match &job.condition {
        Some(cond) => {
            let mut cx = contexts.cloned().unwrap_or_default();
            cx.partial = false;
            cx.status = Some(status);
            cx.set_needs(&job.needs_results);
            eval_condition(cond, &cx)
        }
        None => Ok(match job.when {
            JobWhen::OnSuccess | JobWhen::Manual => status == JobStatus::Success,
            JobWhen::OnFailure => status == JobStatus::Failure,
            JobWhen::Always => true,
        }),
    }
}

/// `so_far` jobs plus `more`, within `max_jobs`.
fn count_jobs(
    so_far: usize,
    more: usize,
    c: &yaml::Ctx<'_>,
    path: &[Seg],
    limits: &crate::Limits,
) -> Result<usize> {
    let n = so_far.saturating_add(more);
    if n > limits.max_jobs {
        return Err(limit_err(
            c,
            path,
            format!(
                "the workflow has more than {} jobs (max_jobs)",
                limits.max_jobs
            ),
        ));
    }
    Ok(n)
}

/// A job that calls a reusable workflow (`jobs.<id>.uses`).
struct Call<'a> {
    id: &'a str,
    uses: &'a str,
    job: &'a serde_yaml::Mapping,
    needs: &'a [String],
    depth: usize,
    /// The caller's `inputs` context (for `with:` and `secrets:` values).
    inputs: &'a ExprValue,
}

impl Call<'_> {
    /// Adds the called workflow's jobs to `w` (or notes why it cannot be
    /// run); returns how many jobs it added.
    fn run(
        &self,
        c: &yaml::Ctx<'_>,
        ctx: &LocalContext,
        opts: &Options,
        read: &dyn Fn(&str) -> std::io::Result<String>,
        w: &mut Workflow,
        needs_raw: &mut Vec<(usize, String, Vec<String>)>,
    ) -> Result<usize> {
        let id = self.id;
        let jp = [key("jobs"), key(id), key("uses")];
        let Some(rel) = self
            .uses
            .strip_prefix("./")
            .filter(|r| !r.contains('@') && (r.ends_with(".yml") || r.ends_with(".yaml")))
        else {
            w.unmapped.push((
                id.to_string(),
                format!(
                    "reusable workflow `{}` is not in this checkout: kiln runs only local ones \
                     (`uses: ./.github/workflows/FILE.yml`); copy it into the project to run it",
                    short(self.uses)
                ),
            ));
            return Ok(0);
        };
        if self.depth >= MAX_CALL_DEPTH {
            return Err(limit_err(
                c,
                &jp,
                format!("reusable workflows call each other more than {MAX_CALL_DEPTH} deep"),
            ));
        }
        let text = read(rel).map_err(|e| {
            c.err(
                &jp,
                format!("cannot read the reusable workflow `{}`: {e}", short(rel)),
            )
        })?;
        let mut inner_opts = opts.clone();
        inner_opts.inputs.clear();
        // `with:` and `secrets:` values may use what is known now: the
        // caller's inputs, vars and secrets.
        let mut cx = Contexts {
            partial: true,
            limits: ExprLimits::from(&opts.limits),
            ..Contexts::default()
        };
        cx.set("inputs", self.inputs.clone());
        cx.set("vars", ExprValue::object(ctx.extra_vars.iter().cloned()));
        cx.set("secrets", ExprValue::object(ctx.secrets.iter().cloned()));
        let now = |v: &str| match substitute_partial(v, &cx) {
            Ok((v, false)) => Some(v),
            _ => None,
        };
        if let Some(with) = self.job.get("with").and_then(Value::as_mapping) {
            for (k, v) in with {
                let (Some(k), Some(v)) = (scalar(k), scalar(v)) else {
                    continue;
                };
                let Some(v) = now(&v) else {
                    w.warnings.push(format!(
                        "jobs.{id}: input `{}` is computed at run time; the called workflow sees its default",
                        short(&k)
                    ));
                    continue;
                };
                inner_opts.inputs.push((k, v));
            }
        }
        // GitHub passes secrets to a called workflow only when asked:
        // `secrets: inherit`, or each by name.
        let mut inner_ctx = ctx.clone();
        inner_ctx.secrets = match self.job.get("secrets") {
            Some(Value::String(s)) if s == "inherit" => ctx.secrets.clone(),
            Some(Value::Mapping(m)) => {
                let mut given = Vec::new();
                for (k, v) in m {
                    let (Some(k), Some(v)) = (scalar(k), scalar(v)) else {
                        continue;
                    };
                    match now(&v) {
                        Some(v) => given.push((k, v)),
                        None => w.warnings.push(format!(
                            "jobs.{id}: secret `{}` cannot be computed before the run; the called workflow does not get it",
                            short(&k)
                        )),
                    }
                }
                given
            }
            Some(_) => {
                return Err(c.err(
                    &[key("jobs"), key(id), key("secrets")],
                    "`secrets` must be `inherit` or a mapping of names to values",
                ))
            }
            None => Vec::new(),
        };
        let ctx = &inner_ctx;
        if self.job.contains_key("if") {
            w.warnings.push(format!(
                "jobs.{id}: the `if:` of a job that calls a reusable workflow is not evaluated"
            ));
        }
        let called = parse_at(rel, &text, ctx, &inner_opts, read, self.depth + 1)?;
        let prefix = |n: &str| format!("{id} / {n}");
        let mut names = Vec::new();
        for mut job in called.jobs {
            job.name = prefix(&job.name);
            job.id = prefix(&job.id);
            job.stage = Some(match &job.stage {
                Some(s) => format!("{id} / {s}"),
                None => id.to_string(),
            });
            let inner: Vec<String> = job.needs.iter().flatten().map(|n| prefix(n)).collect();
            job.needs = Some(inner);
            if !self.needs.is_empty() {
                needs_raw.push((w.jobs.len(), id.to_string(), self.needs.to_vec()));
            }
            names.push(job.name.clone());
            w.jobs.push(job);
        }
        for (name, cx) in called.conditions {
            w.conditions.insert(prefix(&name), cx);
        }
        w.call_outputs.insert(id.to_string(), called.outputs);
        for (inner, outputs) in called.call_outputs {
            w.call_outputs.insert(prefix(&inner), outputs);
        }
        let from = |m: String| format!("{id} ({rel}): {m}");
        w.warnings.extend(called.warnings.into_iter().map(from));
        w.unsupported
            .extend(called.unsupported.into_iter().map(from));
        w.skipped.extend(called.skipped.iter().map(|n| prefix(n)));
        w.unmapped
            .extend(called.unmapped.into_iter().map(|(n, r)| (prefix(&n), r)));
        let n = names.len();
        w.groups.insert(id.to_string(), names);
        Ok(n)
    }
}

/// `on.workflow_call.outputs` of a workflow: (name, `value`).
fn declared_outputs(root: &serde_yaml::Mapping) -> Vec<(String, String)> {
    let Some(decl) = root
        .get("on")
        .and_then(|o| o.get("workflow_call"))
        .and_then(|t| t.get("outputs"))
        .and_then(Value::as_mapping)
    else {
        return Vec::new();
    };
    decl.iter()
        .filter_map(|(k, d)| Some((scalar(k)?, d.get("value").and_then(scalar)?)))
        .collect()
}

/// `needs.CALLER.outputs` of a job that called a reusable workflow: the
/// called workflow's `on.workflow_call.outputs` (`outputs`, see
/// [`Workflow::call_outputs`]) evaluated with its jobs' `jobs.<id>.result`
/// and `jobs.<id>.outputs` (`jobs`, by their ids in the called workflow),
/// once they ran. An output that cannot be evaluated is left out, and
/// said in the second list.
pub fn call_outputs(
    outputs: &[(String, String)],
    jobs: &[crate::NeedResult],
    limits: ExprLimits,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut cx = Contexts {
        limits,
        ..Contexts::default()
    };
    cx.set_needs(jobs);
    if let Some(v) = cx.values.remove("needs") {
        cx.set("jobs", v);
    }
    let (mut out, mut errors) = (Vec::new(), Vec::new());
    for (name, value) in outputs {
        match substitute(value, &cx) {
            Ok(v) => out.push((name.clone(), v)),
            Err(e) => errors.push(format!("workflow output `{}`: {e}", short(name))),
        }
    }
    (out, errors)
}

/// A limit error at `path`.
fn limit_err(c: &yaml::Ctx<'_>, path: &[Seg], message: String) -> Error {
    c.err(path, message).into_limit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NeedResult;

    const CALLED: &str = "on:\n  workflow_call:\n    inputs:\n      target: {type: string}\n\
        \x20     debug: {type: boolean, default: false}\n\
        \x20   outputs:\n      version:\n        value: ${{ jobs.compile.outputs.v }}\n\
        \x20     status:\n        value: ${{ jobs.compile.result }}\n\
        jobs:\n  compile:\n    runs-on: ubuntu-latest\n    outputs:\n      v: ${{ steps.v.outputs.v }}\n\
        \x20   steps:\n      - run: make TARGET=${{ inputs.target }} DEBUG=${{ inputs.debug }} TOKEN=${{ secrets.token }}\n";

    fn with_called(main: &str, secrets: &[(&str, &str)]) -> Workflow {
        let mut ctx = LocalContext::new("/nonexistent", "demo");
        ctx.secrets = secrets
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let read = |p: &str| match p {
            ".github/workflows/called.yml" => Ok(CALLED.to_string()),
            _ => Err(std::io::ErrorKind::NotFound.into()),
        };
        parse_with("ci.yml", main, &ctx, &Options::default(), &read)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_callers_with_reaches_the_called_inputs_typed_and_computed() {
        // GitHub: `with:` values may use the caller's `inputs` (and
        // `vars`, `secrets`); each is converted to the declared `type`.
        let w = with_called(
            "on:\n  workflow_dispatch:\n    inputs:\n      os: {default: linux}\n\
             jobs:\n  build:\n    uses: ./.github/workflows/called.yml\n\
             \x20   with:\n      target: ${{ inputs.os }}-amd64\n      debug: true\n",
            &[],
        );
        assert_eq!(w.jobs[0].name, "build / compile");
        assert_eq!(
            w.jobs[0].steps[0].script,
            "make TARGET=linux-amd64 DEBUG=true TOKEN="
        );
        assert!(w.warnings.is_empty(), "{:?}", w.warnings);
    }

    #[test]
    fn secrets_reach_a_called_workflow_only_when_passed() {
        let call = |secrets: &str| {
            let main = format!(
                "on: push\njobs:\n  build:\n    uses: ./.github/workflows/called.yml\n{secrets}"
            );
            let w = with_called(&main, &[("token", "s3cret"), ("DEPLOY", "d3ploy")]);
            w.jobs[0].steps[0].script.clone()
        };
        assert!(call("    secrets: inherit\n").ends_with("TOKEN=s3cret"));
        assert!(
            call("    secrets:\n      token: ${{ secrets.DEPLOY }}\n").ends_with("TOKEN=d3ploy")
        );
        assert!(call("").ends_with("TOKEN="), "no `secrets:`, no secrets");
    }

    #[test]
    fn a_called_workflows_outputs_are_kept_for_its_caller() {
        let w = with_called(
            "on: push\njobs:\n  build:\n    uses: ./.github/workflows/called.yml\n\
             \x20 deploy:\n    needs: build\n    runs-on: ubuntu-latest\n\
             \x20   steps:\n      - run: deploy ${{ needs.build.outputs.version }}\n",
            &[],
        );
        let declared = &w.call_outputs["build"];
        assert_eq!(
            declared,
            &[
                (
                    "version".to_string(),
                    "${{ jobs.compile.outputs.v }}".to_string()
                ),
                (
                    "status".to_string(),
                    "${{ jobs.compile.result }}".to_string()
                ),
            ]
        );
        // Once the called jobs ran: `needs.build.outputs.version`.
        let ran = [NeedResult {
            id: "compile".into(),
            result: "success".into(),
            outputs: vec![("v".into(), "1.4.0".into())],
        }];
        let (out, errors) = call_outputs(declared, &ran, ExprLimits::default());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            out,
            [
                ("version".to_string(), "1.4.0".to_string()),
                ("status".to_string(), "success".to_string()),
            ]
        );
        let deploy = w.job("deploy").unwrap();
        assert_eq!(
            deploy.needs.as_deref(),
            Some(&["build / compile".to_string()][..])
        );
        assert!(deploy.steps[0].runtime_expressions);
    }

    #[test]
    fn bad_secrets_are_an_error_at_the_key() {
        let read = |_: &str| Ok(CALLED.to_string());
        let e = parse_with(
            "ci.yml",
            "on: push\njobs:\n  build:\n    uses: ./.github/workflows/called.yml\n    secrets: [a]\n",
            &LocalContext::new("/nonexistent", "demo"),
            &Options::default(),
            &read,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("ci.yml:5:5: jobs.build.secrets: `secrets` must be `inherit`"),
            "{e}"
        );
    }
}
