//! GitHub Actions workflow front end: `jobs.<id>` with `run:` steps,
//! `strategy.matrix`, `env`/`defaults`, `if:` and `${{ }}` expressions.
//!
//! What is static at parse time (`github`, `matrix`, `strategy`, `runner`,
//! `vars`, and `env` unless a step of the job writes `$GITHUB_ENV`) is
//! evaluated here. Everything else stays in the spec for the executor:
//! [`Step::condition`] holds an `if:` to check with [`eval_condition`], and
//! [`Step::runtime_expressions`] marks a step whose script, env or name
//! still contain `${{ }}` to pass through [`substitute`]. The executor runs
//! a step when its `when` allows it and its `condition` (if any) is true.
//!
//! `uses: actions/checkout@*` steps are dropped (the workspace already holds
//! the checkout); any other `uses:` is listed in
//! [`Workflow::unsupported`], or is an error in strict mode.

mod expr;
mod filecmd;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde_yaml::{Mapping, Value};

pub use expr::{
    classify_condition, eval_condition, eval_expr, substitute, substitute_partial, Condition,
    Contexts, ExprLimits, ExprValue, JobStatus,
};
pub use filecmd::{
    parse_env_file, parse_file_commands, parse_path_file, prepend_path, FileCommandError,
};

use crate::context::{LocalContext, Options};
use crate::error::{Error, ExprError, Result};
use crate::limits::{bytes, short, short_n, Budget, Limits};
use crate::spec::{AllowFailure, JobSource, JobSpec, JobWhen, Shell, Step, StepWhen, Variable};
use crate::yaml::{self, join, key, scalar, Seg};

/// GitHub's default job timeout (`timeout-minutes`), 360 minutes.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(360 * 60);

/// The script GitHub runs when no `shell` is given on Linux: `bash -e {0}`
/// when bash is on `PATH`, else `sh -e {0}`.
pub const DEFAULT_SHELL_PROBE: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash -e \"$1\"; else exec sh -e \"$1\"; fi";

/// `runs-on` label to image, like act's `-P label=image`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerImages(pub BTreeMap<String, String>);

impl Default for RunnerImages {
    /// act's "medium" images for the Ubuntu labels.
    fn default() -> Self {
        let pairs = [
            ("ubuntu-latest", "catthehacker/ubuntu:act-latest"),
            ("ubuntu-24.04", "catthehacker/ubuntu:act-24.04"),
            ("ubuntu-22.04", "catthehacker/ubuntu:act-22.04"),
            ("ubuntu-20.04", "catthehacker/ubuntu:act-20.04"),
        ];
        RunnerImages(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl RunnerImages {
    /// Adds or replaces a mapping (`-P label=image`).
    pub fn set(&mut self, label: impl Into<String>, image: impl Into<String>) {
        self.0.insert(label.into(), image.into());
    }

    /// The image for a job's `runs-on` labels: the first label with one.
    pub fn image_for(&self, labels: &[String]) -> Option<&str> {
        labels
            .iter()
            .find_map(|l| self.0.get(l).map(String::as_str))
    }
}

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
        let targets: Vec<&str> = match self.groups.get(name) {
            Some(g) if self.job(name).is_none() => g.iter().map(String::as_str).collect(),
            _ => vec![name],
        };
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
        groups: BTreeMap::new(),
    };
    let Some(jobs) = root.get("jobs").and_then(Value::as_mapping) else {
        return Err(c.err(&[key("jobs")], "`jobs` is missing or not a mapping"));
    };
    let wf_env = env_map(root.get("env"), &[key("env")], &c, limits)?;
    let wf_defaults = run_defaults(root.get("defaults"), &[key("defaults")], &c)?;
    let workflow_name = w.name.clone().unwrap_or_else(|| file.to_string());
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
            Some(v) => str_list(v).ok_or_else(|| {
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
    w.warnings = crate::limits::printable(std::mem::take(&mut w.warnings));
    w.unsupported = crate::limits::printable(std::mem::take(&mut w.unsupported));
    w.skipped = crate::limits::printable(std::mem::take(&mut w.skipped));
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

/// GitHub's rule for job ids: a letter or `_`, then letters, digits, `-`
/// and `_`; and not longer than `max_job_name_chars`.
fn check_job_id(id: &str, path: &[Seg], c: &yaml::Ctx<'_>, limits: &Limits) -> Result<()> {
    if id.chars().count() > limits.max_job_name_chars {
        return Err(limit_err(
            c,
            path,
            format!(
                "the job id is longer than {} characters (max_job_name_chars)",
                limits.max_job_name_chars
            ),
        ));
    }
    let mut chars = id.chars();
    let first_ok = chars
        .next()
        .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_');
    if !first_ok || !chars.all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_') {
        return Err(c.err(
            path,
            format!(
                "job id `{}` must start with a letter or `_` and contain only letters, \
                 digits, `-` and `_`",
                short(id)
            ),
        ));
    }
    Ok(())
}

/// A job's display name made safe to show: control characters escaped, at
/// most `max_chars` characters.
fn display_name(name: &str, max_chars: usize) -> String {
    short_n(name, max_chars).into_owned()
}

#[derive(Debug, Clone, Default)]
struct RunDefaults {
    shell: Option<String>,
    working_dir: Option<String>,
}

fn run_defaults(v: Option<&Value>, path: &[Seg], c: &yaml::Ctx<'_>) -> Result<RunDefaults> {
    let Some(run) = v.and_then(|d| d.get("run")) else {
        return Ok(RunDefaults::default());
    };
    let get = |k: &str| -> Result<Option<String>> {
        match run.get(k) {
            None => Ok(None),
            Some(v) => scalar(v).map(Some).ok_or_else(|| {
                c.err(
                    &join(path, &[key("run"), key(k)]),
                    format!("`{k}` must be a string"),
                )
            }),
        }
    };
    Ok(RunDefaults {
        shell: get("shell")?,
        working_dir: get("working-directory")?,
    })
}

fn env_map(
    v: Option<&Value>,
    path: &[Seg],
    c: &yaml::Ctx<'_>,
    limits: &Limits,
) -> Result<Vec<(String, String)>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Mapping(m)) if m.len() > limits.max_variables => Err(limit_err(
            c,
            path,
            format!(
                "more than {} variables (max_variables)",
                limits.max_variables
            ),
        )),
        Some(Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| {
                let k = scalar(k).unwrap_or_default();
                let val = scalar(v).ok_or_else(|| {
                    c.err(
                        &join(path, &[key(&k)]),
                        "an env value must be a string, number or bool",
                    )
                })?;
                Ok((k, val))
            })
            .collect(),
        Some(Value::String(s)) if s.contains("${{") => Err(c.err(
            path,
            "`env` computed by an expression is not supported; list the variables",
        )),
        Some(_) => Err(c.err(path, "`env` must be a mapping")),
    }
}

fn str_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Sequence(s) => s.iter().map(scalar).collect(),
        other => scalar(other).map(|s| vec![s]),
    }
}

/// One matrix combination: key and value, in order.
type Combo = Vec<(String, Value)>;

/// Expands `strategy.matrix`: the product of the keys, minus `exclude`,
/// plus `include` (merged into matching combinations or appended).
/// `Ok(None)` when the matrix is an expression. The product is checked
/// before it is built (at most 16 × `max_matrix` before `exclude`,
/// `max_matrix` after `include`), `include` and `exclude` may list at most
/// `max_matrix` entries each, and every copied value is charged to `out`.
fn matrix(
    job: &Mapping,
    jp: &[Seg],
    c: &yaml::Ctx<'_>,
    limits: &Limits,
    out: &Budget,
) -> Result<Option<Vec<Combo>>> {
    let path = join(jp, &[key("strategy"), key("matrix")]);
    let Some(m) = job.get("strategy").and_then(|s| s.get("matrix")) else {
        return Ok(Some(vec![Vec::new()]));
    };
    let m = match m {
        Value::Mapping(m) => m,
        Value::String(s) if s.contains("${{") => return Ok(None),
        _ => return Err(c.err(&path, "`matrix` must be a mapping")),
    };
    let max = limits.max_matrix;
    let too_many = || {
        limit_err(
            c,
            &path,
            format!("a matrix may create at most {max} jobs (max_matrix)"),
        )
    };
    let too_large = || {
        limit_err(
            c,
            &path,
            format!(
                "the matrix's combinations come to more than {} (max_output_bytes)",
                bytes(out.max())
            ),
        )
    };
    let mut product = 1usize;
    let mut keys: Vec<(String, &Vec<Value>)> = Vec::new();
    for (k, v) in m {
        let k = scalar(k).unwrap_or_default();
        if k == "include" || k == "exclude" {
            continue;
        }
        let values = match v {
            Value::Sequence(s) => s,
            Value::String(s) if s.contains("${{") => return Ok(None),
            _ => {
                return Err(c.err(
                    &join(&path, &[key(&k)]),
                    "a matrix key must list its values",
                ))
            }
        };
        product = product.saturating_mul(values.len());
        keys.push((k, values));
    }
    if product > max.saturating_mul(16) {
        return Err(too_many());
    }
    // Each value of a key with n values appears in product / n combinations.
    let mut size = 0usize;
    for (k, values) in &keys {
        let copies = product / values.len().max(1);
        for v in *values {
            let one = yaml::size_of(v, out.left()) + k.len() + crate::NODE_BYTES;
            size = size.saturating_add(copies.saturating_mul(one));
        }
    }
    if !out.charge(size) {
        return Err(too_large());
    }
    let mut combos: Vec<Combo> = vec![Vec::new()];
    let base_keys: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
    for (k, values) in &keys {
        let mut next = Vec::with_capacity(combos.len().saturating_mul(values.len()));
        for combo in &combos {
            for val in *values {
                let mut cmb = combo.clone();
                cmb.push((k.clone(), val.clone()));
                next.push(cmb);
            }
        }
        combos = next;
    }
    if base_keys.is_empty() {
        combos.clear();
    }
    let entries = |k: &str| -> Result<Vec<&Mapping>> {
        match m.get(k) {
            None => Ok(Vec::new()),
            Some(Value::Sequence(s)) if s.len() > max => Err(limit_err(
                c,
                &join(&path, &[key(k)]),
                format!("more than {max} `{k}` entries (max_matrix)"),
            )),
            Some(Value::Sequence(s)) => s
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    e.as_mapping().ok_or_else(|| {
                        c.err(&join(&path, &[key(k), Seg::Index(i)]), "must be a mapping")
                    })
                })
                .collect(),
            Some(_) => Err(c.err(&join(&path, &[key(k)]), format!("`{k}` must be a list"))),
        }
    };
    for ex in entries("exclude")? {
        combos.retain(|combo| {
            !ex.iter().all(|(k, v)| {
                let k = scalar(k).unwrap_or_default();
                combo
                    .iter()
                    .any(|(ck, cv)| *ck == k && partial_match(cv, v))
            })
        });
    }
    let original = combos.len();
    for inc in entries("include")? {
        let pairs: Vec<(String, Value)> = inc
            .iter()
            .map(|(k, v)| (scalar(k).unwrap_or_default(), v.clone()))
            .collect();
        let pairs_size: usize = pairs
            .iter()
            .map(|(k, v)| k.len() + yaml::size_of(v, out.left()))
            .fold(crate::NODE_BYTES, usize::saturating_add);
        let mut matched = false;
        for combo in combos.iter_mut().take(original) {
            // Applies when it overwrites none of the original values.
            let fits = pairs.iter().all(|(k, v)| {
                !base_keys.contains(k) || combo.iter().any(|(ck, cv)| ck == k && cv == v)
            });
            if fits {
                matched = true;
                if !out.charge(pairs_size) {
                    return Err(too_large());
                }
                for (k, v) in &pairs {
                    match combo.iter_mut().find(|(ck, _)| ck == k) {
                        Some(slot) => slot.1 = v.clone(),
                        None => combo.push((k.clone(), v.clone())),
                    }
                }
            }
        }
        if !matched {
            if !out.charge(pairs_size) {
                return Err(too_large());
            }
            combos.push(pairs);
        }
    }
    if combos.len() > max {
        return Err(too_many());
    }
    if combos.is_empty() {
        return Err(c.err(&path, "the matrix is empty after `exclude`"));
    }
    Ok(Some(combos))
}

/// `exclude` entries may give a partial object for object-valued keys.
fn partial_match(value: &Value, pattern: &Value) -> bool {
    match (value, pattern) {
        (Value::Mapping(v), Value::Mapping(p)) => p
            .iter()
            .all(|(k, pv)| v.get(k).is_some_and(|vv| partial_match(vv, pv))),
        _ => value == pattern,
    }
}

struct JobBuilder<'a> {
    c: &'a yaml::Ctx<'a>,
    ctx: &'a LocalContext,
    opts: &'a Options,
    id: &'a str,
    jp: &'a [Seg],
    job: &'a Mapping,
    combo: &'a [(String, Value)],
    index: usize,
    total: usize,
    wf_env: &'a [(String, String)],
    wf_defaults: &'a RunDefaults,
    workflow_name: &'a str,
    /// The output budget: per-step copies of the contexts are charged here.
    out: &'a Budget,
}

impl JobBuilder<'_> {
    fn at(&self, more: &[Seg]) -> Vec<Seg> {
        join(self.jp, more)
    }

    fn expr_err(&self, path: &[Seg], e: &ExprError) -> Error {
        self.c.err(path, e.to_string())
    }

    /// Static substitution; returns the text and whether run-time
    /// expressions remain.
    fn sub(&self, text: &str, cx: &Contexts, path: &[Seg]) -> Result<(String, bool)> {
        substitute_partial(text, cx).map_err(|e| self.expr_err(path, &e))
    }

    fn base_contexts(&self) -> Contexts {
        let ctx = self.ctx;
        let branch = ctx.branch.clone().unwrap_or_default();
        let mut github: BTreeMap<String, ExprValue> = [
            ("sha", ctx.commit_sha.clone()),
            (
                "ref",
                if branch.is_empty() {
                    String::new()
                } else {
                    format!("refs/heads/{branch}")
                },
            ),
            ("ref_name", branch.clone()),
            ("ref_type", "branch".to_string()),
            ("head_ref", String::new()),
            ("base_ref", String::new()),
            ("repository", ctx.project_name.clone()),
            ("event_name", self.opts.event_name.clone()),
            ("workspace", ctx.guest_dir.clone()),
            ("job", self.id.to_string()),
            ("workflow", self.workflow_name.to_string()),
            ("actor", "kiln".to_string()),
            ("run_id", "1".to_string()),
            ("run_number", "1".to_string()),
            ("run_attempt", "1".to_string()),
            ("server_url", "https://github.com".to_string()),
            ("action", String::new()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ExprValue::String(v)))
        .collect();
        github.insert("event".into(), ExprValue::Object(BTreeMap::new()));
        let mut cx = Contexts {
            partial: true,
            limits: ExprLimits::from(&self.opts.limits),
            ..Contexts::default()
        };
        cx.set("github", ExprValue::Object(github));
        cx.set(
            "runner",
            ExprValue::object([
                ("os", "Linux"),
                ("arch", "X64"),
                ("name", "kiln"),
                ("temp", "/tmp"),
                ("tool_cache", "/opt/hostedtoolcache"),
            ]),
        );
        cx.set("vars", ExprValue::object(ctx.extra_vars.iter().cloned()));
        cx.set(
            "matrix",
            ExprValue::Object(
                self.combo
                    .iter()
                    .map(|(k, v)| (k.clone(), ExprValue::from_yaml(v)))
                    .collect(),
            ),
        );
        let fail_fast = self
            .job
            .get("strategy")
            .and_then(|s| s.get("fail-fast"))
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let mut strategy = BTreeMap::new();
        strategy.insert("fail-fast".into(), ExprValue::Bool(fail_fast));
        strategy.insert("job-index".into(), ExprValue::Number(self.index as f64));
        strategy.insert("job-total".into(), ExprValue::Number(self.total as f64));
        cx.set("strategy", ExprValue::Object(strategy));
        cx
    }

    fn build(&self, w: &mut Workflow) -> Result<Option<JobSpec>> {
        let job = self.job;
        let mut cx = self.base_contexts();

        // Name.
        let values: Vec<String> = self
            .combo
            .iter()
            .map(|(_, v)| match v {
                Value::Mapping(_) | Value::Sequence(_) => ExprValue::from_yaml(v).to_text(),
                other => scalar(other).unwrap_or_default(),
            })
            .collect();
        let name = match job.get("name").and_then(scalar) {
            Some(n) if n.contains("${{") => self.sub(&n, &cx, &self.at(&[key("name")]))?.0,
            other => {
                let base = other.unwrap_or_else(|| self.id.to_string());
                if values.is_empty() {
                    base
                } else {
                    format!("{base} ({})", values.join(", "))
                }
            }
        };
        // A display name only (`needs` use ids): keep it short and printable.
        let name = display_name(&name, self.opts.limits.max_job_name_chars);

        // Job-level `if`.
        let mut when = JobWhen::OnSuccess;
        let mut condition = None;
        if let Some(cond) = job.get("if").and_then(scalar) {
            let p = self.at(&[key("if")]);
            match classify_condition(&cond, &cx).map_err(|e| self.expr_err(&p, &e))? {
                Condition::Static(false) => {
                    w.skipped.push(name);
                    return Ok(None);
                }
                Condition::Static(true) | Condition::Status("success") => {}
                Condition::Status("failure") => when = JobWhen::OnFailure,
                Condition::Status(_) => when = JobWhen::Always,
                Condition::Runtime { uses_status } => {
                    if uses_status {
                        when = JobWhen::Always;
                    }
                    condition = Some(cond);
                }
            }
        }

        // Image: `container` wins over `runs-on`.
        let labels = match job.get("runs-on") {
            None => return Err(self.c.err(self.jp, "`runs-on` is missing")),
            Some(Value::Mapping(m)) => m.get("labels").and_then(str_list).unwrap_or_default(),
            Some(v) => str_list(v).ok_or_else(|| {
                self.c.err(
                    &self.at(&[key("runs-on")]),
                    "`runs-on` must be a label or a list",
                )
            })?,
        };
        let labels: Vec<String> = labels
            .iter()
            .map(|l| {
                self.sub(l, &cx, &self.at(&[key("runs-on")]))
                    .map(|(s, _)| s)
            })
            .collect::<Result<_>>()?;
        let mut container_env = Vec::new();
        let image = match job.get("container") {
            Some(Value::String(s)) => Some(self.sub(s, &cx, &self.at(&[key("container")]))?.0),
            Some(Value::Mapping(m)) => {
                let p = self.at(&[key("container")]);
                let img = m
                    .get("image")
                    .and_then(Value::as_str)
                    .ok_or_else(|| self.c.err(&p, "`container` needs an `image`"))?;
                container_env = env_map(
                    m.get("env"),
                    &join(&p, &[key("env")]),
                    self.c,
                    &self.opts.limits,
                )?;
                for k in ["options", "volumes", "ports", "credentials"] {
                    if m.contains_key(k) {
                        w.warnings
                            .push(format!("{name}: `container.{k}` is ignored"));
                    }
                }
                Some(self.sub(img, &cx, &p)?.0)
            }
            Some(Value::Null) | None => None,
            Some(_) => {
                return Err(self.c.err(
                    &self.at(&[key("container")]),
                    "`container` must be an image or mapping",
                ))
            }
        };
        let image = match image.filter(|i| !i.is_empty()) {
            Some(i) => i,
            None => match self.opts.runner_images.image_for(&labels) {
                Some(i) => i.to_string(),
                None => {
                    w.unsupported.push(format!(
                        "jobs.{} ({name}): no image for runs-on `{}` (map one with -P label=image)",
                        self.id,
                        labels.join(", ")
                    ));
                    return Ok(None);
                }
            },
        };
        if job.contains_key("services") {
            w.warnings.push(format!("{name}: `services` are ignored"));
        }

        // Env: workflow < job; container env lowest; caller's vars highest.
        let job_env = env_map(
            job.get("env"),
            &self.at(&[key("env")]),
            self.c,
            &self.opts.limits,
        )?;
        let writes_env = job
            .get("steps")
            .and_then(Value::as_sequence)
            .is_some_and(|s| {
                s.iter().any(|st| {
                    st.get("run")
                        .and_then(Value::as_str)
                        .is_some_and(|r| r.contains("GITHUB_ENV"))
                })
            });
        let mut env = Vars::default();
        let mut job_runtime = false;
        for (k, v) in self.wf_env.iter().chain(job_env.iter()) {
            let (v, d) = self.sub(v, &cx, &self.at(&[key("env"), key(k)]))?;
            job_runtime |= d;
            env.set(k, v);
        }
        let env = env.list;
        if !writes_env {
            cx.set("env", ExprValue::object(env.iter().cloned()));
        }

        let mut variables = Vars::default();
        let ctx = self.ctx;
        for (k, v) in [
            ("CI", "true".to_string()),
            ("GITHUB_ACTIONS", "true".to_string()),
            ("GITHUB_WORKSPACE", ctx.guest_dir.clone()),
            ("GITHUB_SHA", ctx.commit_sha.clone()),
            ("GITHUB_REPOSITORY", ctx.project_name.clone()),
            ("GITHUB_EVENT_NAME", self.opts.event_name.clone()),
            ("GITHUB_JOB", self.id.to_string()),
            ("GITHUB_WORKFLOW", self.workflow_name.to_string()),
            ("GITHUB_ACTOR", "kiln".to_string()),
            ("GITHUB_RUN_ID", "1".to_string()),
            ("GITHUB_RUN_NUMBER", "1".to_string()),
            ("GITHUB_SERVER_URL", "https://github.com".to_string()),
            ("RUNNER_OS", "Linux".to_string()),
            ("RUNNER_ARCH", "X64".to_string()),
            ("RUNNER_TEMP", "/tmp".to_string()),
        ] {
            variables.set(k, v);
        }
        if let Some(b) = &ctx.branch {
            variables.set("GITHUB_REF", format!("refs/heads/{b}"));
            variables.set("GITHUB_REF_NAME", b.clone());
            variables.set("GITHUB_REF_TYPE", "branch".into());
        }
        for (k, v) in container_env
            .into_iter()
            .chain(env)
            .chain(ctx.extra_vars.iter().cloned())
        {
            variables.set(&k, v);
        }
        let variables = variables.list;

        // Defaults: workflow < job.
        let job_defaults = run_defaults(job.get("defaults"), &self.at(&[key("defaults")]), self.c)?;
        let default_shell = job_defaults
            .shell
            .clone()
            .or_else(|| self.wf_defaults.shell.clone());
        let default_wd = job_defaults
            .working_dir
            .clone()
            .or_else(|| self.wf_defaults.working_dir.clone());

        // Steps.
        let Some(steps) = job.get("steps").and_then(Value::as_sequence) else {
            return Err(self.c.err(self.jp, "`steps` is missing or not a list"));
        };
        let mut out = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let sp = self.at(&[key("steps"), Seg::Index(i)]);
            if let Some(s) = self.step(
                step,
                &sp,
                &cx,
                default_shell.as_deref(),
                default_wd.as_deref(),
                &name,
                w,
            )? {
                out.push(s);
            }
        }
        if job_runtime {
            for s in &mut out {
                s.runtime_expressions = true;
            }
        }

        let timeout = match job.get("timeout-minutes") {
            None => Some(DEFAULT_JOB_TIMEOUT),
            Some(v) => Some(self.minutes(v, &self.at(&[key("timeout-minutes")]), &cx)?),
        };
        let allow_failure = match job.get("continue-on-error") {
            None => AllowFailure::No,
            Some(v) => {
                if self.flag(v, &self.at(&[key("continue-on-error")]), &cx)? {
                    AllowFailure::Yes
                } else {
                    AllowFailure::No
                }
            }
        };
        Ok(Some(JobSpec {
            name,
            image,
            entrypoint: None,
            steps: out,
            variables: variables
                .into_iter()
                .map(|(k, v)| Variable::new(k, v))
                .collect(),
            working_dir: Some(ctx.guest_dir.clone()),
            timeout,
            artifacts: Vec::new(),
            source: JobSource::LocalDir(ctx.project_dir.clone()),
            id: self.id.to_string(),
            stage: None,
            needs: None,
            when,
            allow_failure,
            condition,
        }))
    }

    fn minutes(&self, v: &Value, path: &[Seg], cx: &Contexts) -> Result<Duration> {
        let text = scalar(v).unwrap_or_default();
        let (text, _) = self.sub(&text, cx, path)?;
        text.trim()
            .parse::<f64>()
            .ok()
            .filter(|m| m.is_finite() && *m > 0.0 && *m < 1e9)
            .map(|m| Duration::from_secs_f64(m * 60.0))
            .ok_or_else(|| {
                self.c
                    .err(path, format!("`{text}` is not a number of minutes"))
            })
    }

    fn flag(&self, v: &Value, path: &[Seg], cx: &Contexts) -> Result<bool> {
        match v {
            Value::Bool(b) => Ok(*b),
            Value::String(s) => {
                let (t, deferred) = self.sub(s, cx, path)?;
                if deferred {
                    return Err(self.c.err(path, "must be decidable before the job runs"));
                }
                Ok(t == "true")
            }
            _ => Err(self.c.err(path, "must be a boolean")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        step: &Value,
        sp: &[Seg],
        job_cx: &Contexts,
        default_shell: Option<&str>,
        default_wd: Option<&str>,
        job_name: &str,
        w: &mut Workflow,
    ) -> Result<Option<Step>> {
        let c = self.c;
        let Some(m) = step.as_mapping() else {
            return Err(c.err(sp, "a step must be a mapping"));
        };
        let run = m.get("run");
        let uses = m.get("uses").and_then(Value::as_str);
        let label = m
            .get("name")
            .and_then(scalar)
            .or_else(|| m.get("id").and_then(scalar));
        let describe = || match &label {
            Some(l) => format!("{} ({l})", yaml::path_string(sp)),
            None => yaml::path_string(sp),
        };
        match (run, uses) {
            (Some(_), Some(_)) => return Err(c.err(sp, "`run` and `uses` both set")),
            (None, None) => return Err(c.err(sp, "a step needs `run` or `uses`")),
            (None, Some(u)) => {
                let action = u.split('@').next().unwrap_or(u).to_ascii_lowercase();
                if action == "actions/checkout" {
                    if m.get("with")
                        .is_some_and(|w| w.get("repository").is_some() || w.get("path").is_some())
                    {
                        w.unsupported.push(format!(
                            "{} in {job_name}: checkout of another repository or path",
                            describe()
                        ));
                    }
                    return Ok(None);
                }
                w.unsupported
                    .push(format!("{} in {job_name}: uses `{u}`", describe()));
                return Ok(None);
            }
            (Some(_), None) => {}
        }
        let run = run
            .and_then(scalar)
            .ok_or_else(|| c.err(&join(sp, &[key("run")]), "`run` must be a string"))?;

        // Step env extends the env context for this step's expressions.
        let step_env = env_map(m.get("env"), &join(sp, &[key("env")]), c, &self.opts.limits)?;
        let mut runtime = false;
        let mut env = Vec::new();
        for (k, v) in &step_env {
            let (v, d) = self.sub(v, job_cx, &join(sp, &[key("env"), key(k)]))?;
            runtime |= d;
            env.push((k.clone(), v));
        }
        // Only a step with its own env needs its own copy of the contexts;
        // that copy is charged like any other.
        let step_cx;
        let cx = match job_cx.values.get("env") {
            Some(ExprValue::Object(e)) if !env.is_empty() => {
                let size: usize = e
                    .iter()
                    .map(|(k, v)| k.len() + v.to_text().len() + 16)
                    .chain(env.iter().map(|(k, v)| k.len() + v.len() + 16))
                    .sum();
                if !self.out.charge(size) {
                    return Err(limit_err(
                        c,
                        sp,
                        format!(
                            "the workflow expands to more than {} (max_output_bytes)",
                            bytes(self.out.max())
                        ),
                    ));
                }
                let mut e = e.clone();
                for (k, v) in &env {
                    e.insert(k.clone(), ExprValue::String(v.clone()));
                }
                let mut x = job_cx.clone();
                x.set("env", ExprValue::Object(e));
                step_cx = x;
                &step_cx
            }
            _ => job_cx,
        };
        let (script, d) = self.sub(&run, cx, &join(sp, &[key("run")]))?;
        runtime |= d;
        let name = match &label {
            Some(n) => {
                let (n, d) = self.sub(n, cx, &join(sp, &[key("name")]))?;
                runtime |= d;
                n
            }
            None => format!("Run {}", run.lines().next().unwrap_or("").trim()),
        };

        let shell_name = m
            .get("shell")
            .and_then(scalar)
            .or(default_shell.map(String::from));
        let shell = match shell_name.as_deref() {
            None => Shell::Custom(
                ["sh", "-c", DEFAULT_SHELL_PROBE, "sh", "{0}"]
                    .map(String::from)
                    .to_vec(),
            ),
            Some("bash") => Shell::Bash,
            Some("sh") => Shell::Sh,
            Some("python") => Shell::Custom(vec!["python".into(), "{0}".into()]),
            Some(ps @ ("pwsh" | "powershell")) => {
                Shell::Custom(vec![ps.into(), "-command".into(), ". '{0}'".into()])
            }
            Some("cmd") => {
                w.unsupported.push(format!(
                    "{} in {job_name}: `shell: cmd` needs Windows",
                    describe()
                ));
                return Ok(None);
            }
            Some(custom) if custom.contains("{0}") => {
                Shell::Custom(custom.split_whitespace().map(String::from).collect())
            }
            Some(other) => {
                return Err(c.err(
                    &join(sp, &[key("shell")]),
                    format!("custom shell `{other}` must contain `{{0}}`"),
                ))
            }
        };

        let mut when = StepWhen::OnSuccess;
        let mut condition = None;
        if let Some(cond) = m.get("if").and_then(scalar) {
            let p = join(sp, &[key("if")]);
            match classify_condition(&cond, cx).map_err(|e| self.expr_err(&p, &e))? {
                Condition::Static(false) => return Ok(None),
                Condition::Static(true) | Condition::Status("success") => {}
                Condition::Status("failure") => when = StepWhen::OnFailure,
                Condition::Status(_) => when = StepWhen::Always,
                Condition::Runtime { uses_status } => {
                    if uses_status {
                        when = StepWhen::Always;
                    }
                    condition = Some(cond);
                }
            }
        }
        let timeout = match m.get("timeout-minutes") {
            None => None,
            Some(v) => Some(self.minutes(v, &join(sp, &[key("timeout-minutes")]), cx)?),
        };
        let allow_failure = match m.get("continue-on-error") {
            None => false,
            Some(v) => self.flag(v, &join(sp, &[key("continue-on-error")]), cx)?,
        };
        let working_dir = match m.get("working-directory").and_then(scalar) {
            Some(wd) => Some(self.sub(&wd, cx, &join(sp, &[key("working-directory")]))?.0),
            None => default_wd.map(String::from),
        };
        Ok(Some(Step {
            name,
            script,
            shell,
            env,
            when,
            timeout,
            allow_failure,
            id: m.get("id").and_then(scalar),
            working_dir,
            condition,
            runtime_expressions: runtime,
        }))
    }
}

/// Variables in order of first definition; setting one again replaces its
/// value in place. Constant time per `set`.
#[derive(Default)]
struct Vars {
    list: Vec<(String, String)>,
    pos: HashMap<String, usize>,
}

impl Vars {
    fn set(&mut self, k: &str, v: String) {
        match self.pos.get(k) {
            Some(&i) => self.list[i].1 = v,
            None => {
                self.pos.insert(k.to_string(), self.list.len());
                self.list.push((k.to_string(), v));
            }
        }
    }
}
