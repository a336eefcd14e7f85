//! `.gitlab-ci.yml` front end: does locally what the GitLab server does
//! before a job reaches a runner (`include`, `extends`, `default`, `rules`,
//! `parallel`, variable precedence), then shapes each job the way the server
//! hands it to the runner: `before_script` + `script` as one step,
//! `after_script` as a second step that always runs.
//!
//! Scripts run as [`Shell::Sh`] with a preamble modelled on gitlab-runner's
//! bash shell (`shells/bash.go`): the script re-executes itself with `bash`
//! when the image has it (as the Docker executor does), enables `pipefail`
//! only when the running shell knows it, and sets `errexit`. Each command
//! is echoed as `$ cmd` and followed by an exit-code check, as the runner
//! does.

mod expr;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::time::Duration;

use serde_yaml::{Mapping, Value};

pub use expr::eval_rule_if;
use expr::eval_rule_if_with;

use crate::context::{LocalContext, Options};
use crate::duration::parse_duration;
use crate::error::{Error, Result};
use crate::limits::{bytes, chain, short, short_n, Budget, Limits};
use crate::spec::{
    AllowFailure, ArtifactSpec, ArtifactWhen, JobSource, JobSpec, JobWhen, Shell, Step, StepWhen,
    Variable,
};
use crate::yaml::{self, join, key, merge_into, scalar, Seg};

/// GitLab's default `stages`.
pub const DEFAULT_STAGES: [&str; 5] = [".pre", "build", "test", "deploy", ".post"];

/// `after_script` timeout (gitlab-runner `RUNNER_AFTER_SCRIPT_TIMEOUT`).
pub const AFTER_SCRIPT_TIMEOUT: Duration = Duration::from_secs(5 * 60);

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

/// Keys a job inherits from `default:`.
const DEFAULT_KEYS: [&str; 11] = [
    "image",
    "services",
    "before_script",
    "after_script",
    "cache",
    "artifacts",
    "retry",
    "timeout",
    "interruptible",
    "tags",
    "hooks",
];

/// The script preamble; see the module docs.
pub const PREAMBLE: &str = "\
# kiln: GitLab runs job scripts with bash when the image has it, else sh.
if [ -z \"${BASH_VERSION:-}\" ] && command -v bash >/dev/null 2>&1; then exec bash \"$0\" \"$@\"; fi
case \"$(set -o)\" in *pipefail*) set -o pipefail ;; esac
set -o errexit
set +o noclobber
";

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
        let targets: Vec<&str> = match self.parallel_groups.get(name) {
            Some(names) if self.job(name).is_none() => names.iter().map(String::as_str).collect(),
            _ => vec![name],
        };
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
        yaml_budget: Budget::new(limits.max_yaml_bytes),
        out_budget: Budget::new(limits.max_output_bytes),
    };
    let top = p.load(file, contents.to_string(), 0)?;
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
    /// The YAML of every file, aliases expanded, and the texts kept for
    /// error positions.
    yaml_budget: Budget,
    /// Everything built from the YAML: jobs after `extends`, `!reference`
    /// and `default:`, and the job specs.
    out_budget: Budget,
}

/// One instance of a job after `parallel` expansion.
struct Instance {
    name: String,
    vars: Vec<(String, String)>,
}

enum Outcome {
    Excluded,
    Included {
        when: JobWhen,
        allow_failure: Option<AllowFailure>,
        vars: Vec<(String, String)>,
        needs: Option<Value>,
    },
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

    fn load(&mut self, file: &str, text: String, depth: usize) -> Result<Mapping> {
        // The text is kept (for error positions): it counts like the YAML.
        if !self.yaml_budget.charge(text.len()) {
            return Err(Error::Limit {
                file: file.to_string(),
                location: None,
                message: format!(
                    "the pipeline's files and their YAML come to more than {} (max_yaml_bytes)",
                    bytes(self.yaml_budget.max())
                ),
            });
        }
        let value = yaml::load(file, &text, self.limits, &self.yaml_budget)?;
        let idx = self.sources.len();
        self.sources.push((file.to_string(), text));
        let mut map = match value {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => {
                return Err(Error::Invalid {
                    file: file.to_string(),
                    location: Some(crate::error::Location { line: 1, column: 1 }),
                    path: "(top level)".into(),
                    message: "the top level must be a mapping of jobs".into(),
                });
            }
        };
        let mut merged = Value::Mapping(Mapping::new());
        if let Some(inc) = map.remove("include") {
            if depth >= self.limits.max_include_depth {
                return Err(Error::Limit {
                    file: file.to_string(),
                    location: yaml::locate(&self.sources[idx].1, &[key("include")]),
                    message: format!(
                        "include: includes are nested more than {} levels deep \
                         (max_include_depth)",
                        self.limits.max_include_depth
                    ),
                });
            }
            let entries = match inc {
                Value::Sequence(s) => s,
                other => vec![other],
            };
            for (i, entry) in entries.iter().enumerate() {
                let path = [key("include"), Seg::Index(i)];
                let Some(local) = self.include_path(entry, &path, idx)? else {
                    continue;
                };
                self.includes += 1;
                if self.includes > self.limits.max_includes {
                    return Err(Error::Limit {
                        file: file.to_string(),
                        location: yaml::locate(&self.sources[idx].1, &path),
                        message: format!(
                            "include: the pipeline includes more than {} files, nested and \
                             repeated ones counted (max_includes)",
                            self.limits.max_includes
                        ),
                    });
                }
                if !self.seen_includes.insert(local.clone()) {
                    continue;
                }
                let content = (self.read)(&local).map_err(|source| Error::Include {
                    file: file.to_string(),
                    include: local.clone(),
                    source,
                })?;
                let sub = self.load(&local, content, depth + 1)?;
                merge_into(&mut merged, Value::Mapping(sub));
            }
        }
        for (k, _) in &map {
            if let Some(k) = k.as_str() {
                self.origin.insert(k.to_string(), idx);
            }
        }
        merge_into(&mut merged, Value::Mapping(map));
        match merged {
            Value::Mapping(m) => Ok(m),
            _ => Ok(Mapping::new()),
        }
    }

    /// Replaces every `!reference [job, key, ...]` with the value it names,
    /// references inside that value included (GitLab resolves them before
    /// `extends`). Nesting is bounded by `max_reference_depth`, cycles are
    /// errors, the result is at most `max_yaml_depth` deep, and every copy is
    /// charged to the output budget.
    fn resolve_references(&self, top: Mapping) -> Result<Mapping> {
        let with_refs: Vec<Value> = top
            .iter()
            .filter(|(_, v)| has_reference(v))
            .map(|(k, _)| k.clone())
            .collect();
        if with_refs.is_empty() {
            return Ok(top);
        }
        let mut replaced = Vec::with_capacity(with_refs.len());
        for k in with_refs {
            let name = k.as_str().unwrap_or("(key)").to_string();
            let mut r = Refs {
                p: self,
                top: &top,
                top_key: &name,
                stack: Vec::new(),
            };
            let v = top.get(&k).map(|v| r.resolve(v, 1)).transpose()?;
            replaced.push((k, v.unwrap_or(Value::Null)));
        }
        let mut top = top;
        for (k, v) in replaced {
            top.insert(k, v);
        }
        Ok(top)
    }

    /// The local path of an `include:` entry, `None` when its `rules` skip it.
    fn include_path(&self, entry: &Value, path: &[Seg], src: usize) -> Result<Option<String>> {
        let (file, text) = &self.sources[src];
        let c = yaml::Ctx { file, text };
        let local = match entry {
            Value::String(s) if s.contains("://") => {
                return Err(c.err(
                    path,
                    format!("remote include `{}` cannot be resolved locally", short(s)),
                ))
            }
            Value::String(s) => s.clone(),
            Value::Mapping(m) => {
                if let Some(rules) = m.get("rules") {
                    let vars = self.base_vars();
                    let rules_path = join(path, &[key("rules")]);
                    if !self.include_rules_match(rules, &vars, &rules_path, &c)? {
                        return Ok(None);
                    }
                }
                match m.get("local").and_then(Value::as_str) {
                    Some(s) => s.to_string(),
                    None => {
                        let kind = ["remote", "project", "template", "component"]
                            .into_iter()
                            .find(|k| m.contains_key(*k))
                            .unwrap_or("this");
                        return Err(c.err(
                            path,
                            format!("`include: {kind}` is not supported locally; only `local`"),
                        ));
                    }
                }
            }
            _ => return Err(c.err(path, "an include must be a path or a mapping")),
        };
        if local.contains('*') {
            return Err(c.err(
                path,
                format!("wildcard include `{}` is not supported", short(&local)),
            ));
        }
        let trimmed = local.trim_start_matches('/').to_string();
        if trimmed.split('/').any(|part| part == "..") {
            return Err(c.err(
                path,
                format!("include `{}` leaves the project (`..`)", short(&local)),
            ));
        }
        Ok(Some(trimmed))
    }

    fn include_rules_match(
        &self,
        rules: &Value,
        vars: &BTreeMap<String, String>,
        path: &[Seg],
        c: &yaml::Ctx<'_>,
    ) -> Result<bool> {
        let Some(list) = rules.as_sequence() else {
            return Err(c.err(path, "`rules` must be a list"));
        };
        for (i, rule) in list.iter().enumerate() {
            let rp = join(path, &[Seg::Index(i)]);
            let matched = match rule.get("if").and_then(Value::as_str) {
                Some(cond) => eval_rule_if_with(cond, vars, self.limits)
                    .map_err(|e| c.err(&rp, e.to_string()))?,
                None => true,
            };
            if matched {
                return Ok(rule.get("when").and_then(Value::as_str) != Some("never"));
            }
        }
        Ok(false)
    }

    /// Predefined variables known before any job is looked at, plus the
    /// caller's variables.
    fn base_vars(&self) -> BTreeMap<String, String> {
        let mut v: BTreeMap<String, String> = self.predefined(None, None).into_iter().collect();
        v.extend(self.ctx.extra_vars.iter().cloned());
        v
    }

    fn predefined(&self, job: Option<&str>, stage: Option<&str>) -> Vec<(String, String)> {
        let ctx = self.ctx;
        let mut v = vec![
            ("CI", "true".to_string()),
            ("GITLAB_CI", "true".to_string()),
            ("CI_SERVER", "yes".to_string()),
            ("CI_DISPOSABLE_ENVIRONMENT", "true".to_string()),
            ("CI_PIPELINE_SOURCE", "push".to_string()),
            ("CI_PROJECT_DIR", ctx.guest_dir.clone()),
            ("CI_BUILDS_DIR", parent_dir(&ctx.guest_dir)),
            ("CI_PROJECT_NAME", ctx.project_name.clone()),
            ("CI_COMMIT_SHA", ctx.commit_sha.clone()),
            ("CI_COMMIT_SHORT_SHA", ctx.short_sha()),
        ];
        if let Some(b) = &ctx.branch {
            v.push(("CI_COMMIT_REF_NAME", b.clone()));
            v.push(("CI_COMMIT_REF_SLUG", slug(b)));
            v.push(("CI_COMMIT_BRANCH", b.clone()));
        }
        if let Some(j) = job {
            v.push(("CI_JOB_NAME", j.to_string()));
            v.push(("CI_JOB_NAME_SLUG", slug(j)));
        }
        if let Some(s) = stage {
            v.push(("CI_JOB_STAGE", s.to_string()));
        }
        v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    fn build(mut self, mut top: Mapping) -> Result<GitlabPipeline> {
        let mut excluded = Vec::new();
        // Stages.
        let stages = match top.get("stages").or_else(|| top.get("types")) {
            None => DEFAULT_STAGES.iter().map(|s| s.to_string()).collect(),
            Some(v) => {
                let list = string_list(v).ok_or_else(|| {
                    self.err(&[key("stages")], "`stages` must be a list of strings")
                })?;
                let mut s = vec![".pre".to_string()];
                s.extend(list.into_iter().filter(|x| x != ".pre" && x != ".post"));
                s.push(".post".to_string());
                s
            }
        };
        let mut stage_pos: HashMap<String, usize> = HashMap::with_capacity(stages.len());
        for (i, s) in stages.iter().enumerate() {
            stage_pos.entry(s.clone()).or_insert(i);
        }
        // `default:`, with the legacy top-level keys folded in.
        let mut default = match top.get("default") {
            None => Mapping::new(),
            Some(Value::Mapping(m)) => m.clone(),
            Some(_) => return Err(self.err(&[key("default")], "`default` must be a mapping")),
        };
        for k in [
            "image",
            "services",
            "before_script",
            "after_script",
            "cache",
        ] {
            if let Some(v) = top.get(k) {
                if !default.contains_key(k) {
                    default.insert(Value::from(k), v.clone());
                }
            }
        }
        let mut global_vars = match top.get("variables") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => self.variables(v, &[key("variables")])?,
        };
        // `workflow: rules`.
        if let Some(rules) = top.get("workflow").and_then(|w| w.get("rules")) {
            let mut vars = self.base_vars();
            for (k, v) in &global_vars {
                vars.entry(k.0.clone()).or_insert_with(|| v.clone());
            }
            let path = [key("workflow"), key("rules")];
            match self.eval_rules(rules, &vars, &path, None)? {
                Outcome::Excluded => {
                    let names = top
                        .keys()
                        .filter_map(Value::as_str)
                        .filter(|k| !RESERVED.contains(k) && !k.starts_with('.'))
                        .map(String::from)
                        .collect();
                    self.warnings
                        .push("`workflow: rules` exclude this pipeline".into());
                    return Ok(GitlabPipeline {
                        stages,
                        jobs: Vec::new(),
                        excluded: names,
                        warnings: printable(self.warnings),
                        parallel_groups: BTreeMap::new(),
                    });
                }
                Outcome::Included { vars, .. } => {
                    global_vars.extend(vars.into_iter().map(|(k, v)| (VarKey(k, true), v)));
                }
            }
        }
        // Resolve `extends` for every job and template.
        let names: Vec<String> = top
            .keys()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect();
        for name in names
            .iter()
            .filter(|n| !RESERVED.contains(&n.as_str()) && !n.starts_with('.'))
        {
            self.check_job_name(name, &[key(name)])?;
        }
        let mut resolved: HashMap<String, Mapping> = HashMap::new();
        for name in &names {
            let hidden_scalar =
                name.starts_with('.') && !top.get(name.as_str()).is_some_and(Value::is_mapping);
            if RESERVED.contains(&name.as_str()) || hidden_scalar {
                continue;
            }
            self.resolve_extends(name, &top, &mut resolved, &mut Vec::new())?;
        }
        top.clear();
        let mut jobs = Vec::new();
        let mut groups = BTreeMap::new();
        let mut raw_needs: Vec<(usize, String, Value)> = Vec::new();
        let mut instances_made = 0usize;
        for name in names
            .iter()
            .filter(|n| !RESERVED.contains(&n.as_str()) && !n.starts_with('.'))
        {
            let Some(job) = resolved.get(name) else {
                continue;
            };
            let job = self.apply_default(job, &default);
            self.charge_out(
                yaml::mapping_size(&job, self.out_budget.left().saturating_add(1)),
                Some(name),
                name,
            )?;
            if job.contains_key("trigger") && !job.contains_key("script") {
                self.warnings
                    .push(format!("{name}: trigger jobs are not run locally"));
                excluded.push(name.clone());
                continue;
            }
            let instances = self.expand_parallel(name, &job)?;
            instances_made = instances_made.saturating_add(instances.len());
            if instances_made > self.limits.max_jobs {
                return Err(self.limit(
                    &[key(name)],
                    format!(
                        "the pipeline has more than {} jobs (max_jobs)",
                        self.limits.max_jobs
                    ),
                ));
            }
            if instances.len() > 1 || job.contains_key("parallel") {
                groups.insert(
                    name.clone(),
                    instances.iter().map(|i| i.name.clone()).collect(),
                );
            }
            for inst in instances {
                match self.job_spec(name, &job, &inst, &global_vars, &stages, &stage_pos)? {
                    Some((spec, needs)) => {
                        self.charge_out(spec.approx_bytes(), Some(name), &spec.name)?;
                        if let Some(n) = needs {
                            raw_needs.push((jobs.len(), name.clone(), n));
                        }
                        jobs.push(spec);
                    }
                    None => excluded.push(inst.name),
                }
            }
        }
        // Resolve `needs` to concrete job names.
        let known: BTreeSet<String> = jobs.iter().map(|j| j.name.clone()).collect();
        for (idx, name, needs) in raw_needs {
            let resolved = self.resolve_needs(&name, &needs, &known, &groups, &excluded)?;
            let size = resolved
                .iter()
                .map(|n| n.len() + crate::NODE_BYTES)
                .fold(0usize, usize::saturating_add);
            self.charge_out(size, Some(&name), &format!("{name}.needs"))?;
            jobs[idx].needs = Some(resolved);
        }
        let pos_of = |j: &JobSpec| {
            j.stage
                .as_ref()
                .and_then(|s| stage_pos.get(s).copied())
                .unwrap_or(0)
        };
        jobs.sort_by_key(pos_of);
        let all: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        if let Err(Error::Invalid { path, message, .. }) =
            crate::order::run_order(&jobs, &stages, &all)
        {
            let id = jobs
                .iter()
                .find(|j| j.name == path)
                .map(|j| j.id.clone())
                .unwrap_or(path);
            return Err(self.err(&[key(&id), key("needs")], message));
        }
        Ok(GitlabPipeline {
            stages,
            jobs,
            excluded,
            warnings: printable(self.warnings),
            parallel_groups: groups,
        })
    }

    /// Resolves `extends` of `name` into `done` (memoised). The chain is
    /// at most `max_extends_depth` long, and every copy a merge makes is
    /// charged to the output budget first.
    fn resolve_extends(
        &self,
        name: &str,
        top: &Mapping,
        done: &mut HashMap<String, Mapping>,
        stack: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains_key(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            let mut names: Vec<&str> = stack.iter().map(String::as_str).collect();
            names.push(name);
            let first = stack.first().cloned().unwrap_or_default();
            return Err(self.err(
                &[key(&first), key("extends")],
                format!("`extends` cycle: {}", chain(&names)),
            ));
        }
        if stack.len() >= self.limits.max_extends_depth {
            let first = stack.first().cloned().unwrap_or_default();
            return Err(self.limit(
                &[key(&first), key("extends")],
                format!(
                    "`extends` is nested more than {} levels deep (max_extends_depth)",
                    self.limits.max_extends_depth
                ),
            ));
        }
        let empty = Mapping::new();
        let job = match top.get(name) {
            Some(Value::Mapping(m)) => m,
            Some(_) => {
                return Err(self.err(
                    &[key(name)],
                    format!("job `{}` must be a mapping", short(name)),
                ));
            }
            None => &empty,
        };
        let parents = match job.get("extends") {
            None => Vec::new(),
            Some(v) => string_list(v).ok_or_else(|| {
                self.err(
                    &[key(name), key("extends")],
                    "`extends` must be a name or a list",
                )
            })?,
        };
        let mut base = Value::Mapping(Mapping::new());
        if !parents.is_empty() {
            stack.push(name.to_string());
            for parent in &parents {
                if top.get(parent.as_str()).is_none() {
                    return Err(self.err(
                        &[key(name), key("extends")],
                        format!("`extends` names `{}`, which does not exist", short(parent)),
                    ));
                }
                self.resolve_extends(parent, top, done, stack)?;
                let p = done.get(parent.as_str()).cloned().unwrap_or_default();
                self.charge_out(
                    yaml::mapping_size(&p, self.out_budget.left().saturating_add(1)),
                    Some(name),
                    &format!("{name}.extends"),
                )?;
                merge_into(&mut base, Value::Mapping(p));
            }
            stack.pop();
        }
        let mut own = job.clone();
        own.remove("extends");
        self.charge_out(
            yaml::mapping_size(&own, self.out_budget.left().saturating_add(1)),
            Some(name),
            name,
        )?;
        merge_into(&mut base, Value::Mapping(own));
        let merged = match base {
            Value::Mapping(m) => m,
            _ => Mapping::new(),
        };
        done.insert(name.to_string(), merged);
        Ok(())
    }

    /// A job name must be short and printable: it is shown in terminals and
    /// logs, and becomes part of directory names.
    fn check_job_name(&self, name: &str, path: &[Seg]) -> Result<()> {
        if name.chars().count() > self.limits.max_job_name_chars {
            return Err(self.limit(
                path,
                format!(
                    "the job name is longer than {} characters (max_job_name_chars)",
                    self.limits.max_job_name_chars
                ),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(self.err(
                path,
                format!("job name `{}` contains a control character", short(name)),
            ));
        }
        Ok(())
    }

    fn apply_default(&self, job: &Mapping, default: &Mapping) -> Mapping {
        let inherit = job.get("inherit").and_then(|i| i.get("default"));
        let allowed = |k: &str| match inherit {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => string_list(v).is_some_and(|l| l.iter().any(|x| x == k)),
        };
        let mut out = job.clone();
        for k in DEFAULT_KEYS {
            if !out.contains_key(k) && allowed(k) {
                if let Some(v) = default.get(k) {
                    out.insert(Value::from(k), v.clone());
                }
            }
        }
        out
    }

    fn expand_parallel(&self, name: &str, job: &Mapping) -> Result<Vec<Instance>> {
        let single = || {
            vec![Instance {
                name: name.to_string(),
                vars: Vec::new(),
            }]
        };
        let path = [key(name), key("parallel")];
        let Some(par) = job.get("parallel") else {
            return Ok(single());
        };
        let max = self.limits.max_parallel;
        let too_many = || {
            self.limit(
                &path,
                format!("`parallel` may create at most {max} jobs (max_parallel)"),
            )
        };
        if let Some(n) = par.as_u64() {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if !(1..=max).contains(&n) {
                return Err(too_many());
            }
            return Ok((1..=n)
                .map(|i| Instance {
                    name: format!("{name} {i}/{n}"),
                    vars: vec![
                        ("CI_NODE_INDEX".into(), i.to_string()),
                        ("CI_NODE_TOTAL".into(), n.to_string()),
                    ],
                })
                .collect());
        }
        let Some(matrix) = par.get("matrix").and_then(Value::as_sequence) else {
            return Err(self.err(&path, "`parallel` must be a number or have a `matrix` list"));
        };
        let mut combos = Vec::new();
        for (i, entry) in matrix.iter().enumerate() {
            let ep = join(&path, &[key("matrix"), Seg::Index(i)]);
            let room = max.saturating_sub(combos.len());
            combos.extend(matrix_entry(entry, room, self.out_budget.left()).map_err(
                |e| match e {
                    MatrixError::TooMany => too_many(),
                    MatrixError::TooLarge => self.limit(
                        &ep,
                        format!(
                            "the matrix's combinations come to more than {} (max_output_bytes)",
                            bytes(self.out_budget.max())
                        ),
                    ),
                    MatrixError::Shape => self.err(
                        &ep,
                        "a matrix entry maps variable names to a value or a list of values",
                    ),
                },
            )?);
        }
        let total = combos.len();
        Ok(combos
            .into_iter()
            .enumerate()
            .map(|(i, vars)| {
                let values: Vec<&str> = vars.iter().map(|(_, v)| v.as_str()).collect();
                let mut vars = vars.clone();
                vars.push(("CI_NODE_INDEX".into(), (i + 1).to_string()));
                vars.push(("CI_NODE_TOTAL".into(), total.to_string()));
                Instance {
                    name: format!("{name}: [{}]", values.join(", ")),
                    vars,
                }
            })
            .collect())
    }

    /// Reads a `variables:` mapping. Keys carry whether `$X` in the value
    /// is expanded (`expand: false` turns that off).
    fn variables(&self, v: &Value, path: &[Seg]) -> Result<Vec<(VarKey, String)>> {
        let Some(m) = v.as_mapping() else {
            return Err(self.err(path, "`variables` must be a mapping"));
        };
        if m.len() > self.limits.max_variables {
            return Err(self.limit(
                path,
                format!(
                    "more than {} variables (max_variables)",
                    self.limits.max_variables
                ),
            ));
        }
        let mut out = Vec::new();
        for (k, val) in m {
            let Some(k) = k.as_str() else {
                return Err(self.err(path, "variable names must be strings"));
            };
            let vp = join(path, &[key(k)]);
            let (value, expand) = match val {
                Value::Mapping(vm) => {
                    let value = vm.get("value").map(scalar).unwrap_or(Some(String::new()));
                    let expand = vm.get("expand").and_then(Value::as_bool).unwrap_or(true);
                    (value, expand)
                }
                other => (scalar(other), true),
            };
            let value = value.ok_or_else(|| {
                self.err(
                    &vp,
                    "a variable's value must be a string, number or boolean",
                )
            })?;
            out.push((VarKey(k.to_string(), expand), value));
        }
        Ok(out)
    }

    fn job_spec(
        &mut self,
        key_name: &str,
        job: &Mapping,
        inst: &Instance,
        global_vars: &[(VarKey, String)],
        stages: &[String],
        stage_pos: &HashMap<String, usize>,
    ) -> Result<Option<(JobSpec, Option<Value>)>> {
        let jp = [key(key_name)];
        let at = |k: &str| [key(key_name), key(k)];
        let stage = match job.get("stage") {
            None => "test".to_string(),
            Some(v) => v
                .as_str()
                .map(String::from)
                .ok_or_else(|| self.err(&at("stage"), "`stage` must be a string"))?,
        };
        if !stage_pos.contains_key(&stage) {
            return Err(self.err(
                &at("stage"),
                format!(
                    "stage `{}` is not one of `stages` ({})",
                    short(&stage),
                    short_n(&stages.join(", "), 200)
                ),
            ));
        }
        if inst.name.chars().any(char::is_control) {
            return Err(self.err(
                &jp,
                format!(
                    "job name `{}` contains a control character",
                    short(&inst.name)
                ),
            ));
        }
        // Variables: predefined < global < job < matrix < rules < caller.
        let inherit_vars = job.get("inherit").and_then(|i| i.get("variables"));
        let mut layers: Vec<(VarKey, String)> = self
            .predefined(Some(&inst.name), Some(&stage))
            .into_iter()
            .map(|(k, v)| (VarKey(k, false), v))
            .collect();
        for (k, v) in global_vars {
            let allowed = match inherit_vars {
                None => true,
                Some(Value::Bool(b)) => *b,
                Some(list) => string_list(list).is_some_and(|l| l.contains(&k.0)),
            };
            if allowed {
                layers.push((k.clone(), v.clone()));
            }
        }
        if let Some(v) = job.get("variables") {
            if !v.is_null() {
                layers.extend(self.variables(v, &at("variables"))?);
            }
        }
        layers.extend(
            inst.vars
                .iter()
                .map(|(k, v)| (VarKey(k.clone(), true), v.clone())),
        );
        let extra: Vec<(VarKey, String)> = self
            .ctx
            .extra_vars
            .iter()
            .map(|(k, v)| (VarKey(k.clone(), false), v.clone()))
            .collect();
        let max_value = self.limits.max_script_bytes;
        let vars = resolve_vars(layers.iter().chain(extra.iter()), max_value)
            .map_err(|name| self.var_too_long(&at("variables"), &name))?;
        let lookup: BTreeMap<String, String> = vars.iter().cloned().collect();

        // rules / only / except / when.
        let job_when = match job.get("when") {
            None => None,
            Some(v) => Some(self.when(v, &at("when"))?),
        };
        let outcome = if let Some(rules) = job.get("rules") {
            self.eval_rules(rules, &lookup, &at("rules"), job_when)?
        } else if !self.only_except(job, &lookup, &jp)? {
            Outcome::Excluded
        } else {
            match job_when {
                Some(None) => Outcome::Excluded,
                w => Outcome::Included {
                    when: w.flatten().unwrap_or(JobWhen::OnSuccess),
                    allow_failure: None,
                    vars: Vec::new(),
                    needs: None,
                },
            }
        };
        let Outcome::Included {
            when,
            allow_failure: rule_af,
            vars: rule_vars,
            needs: rule_needs,
        } = outcome
        else {
            return Ok(None);
        };
        let vars = if rule_vars.is_empty() {
            vars
        } else {
            layers.extend(rule_vars.into_iter().map(|(k, v)| (VarKey(k, true), v)));
            resolve_vars(layers.iter().chain(extra.iter()), max_value)
                .map_err(|name| self.var_too_long(&at("variables"), &name))?
        };
        let lookup: BTreeMap<String, String> = vars.iter().cloned().collect();

        // Image.
        let (image, entrypoint) = match job.get("image") {
            None => (self.opts.gitlab_default_image.clone(), None),
            Some(Value::String(s)) => (s.clone(), None),
            Some(Value::Mapping(m)) => {
                let name = m
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| self.err(&at("image"), "`image` needs a `name`"))?;
                let ep = match m.get("entrypoint") {
                    None => None,
                    Some(v) => {
                        let list = string_list(v).ok_or_else(|| {
                            self.err(&at("image"), "`entrypoint` must be a list of strings")
                        })?;
                        // `entrypoint: [""]` clears the image's entrypoint.
                        Some(list.into_iter().filter(|s| !s.is_empty()).collect())
                    }
                };
                (name.to_string(), ep)
            }
            Some(_) => return Err(self.err(&at("image"), "`image` must be a string or mapping")),
        };
        let image = expand_capped(&image, &lookup, max_value)
            .ok_or_else(|| self.limit(&at("image"), "`image` expands too far".into()))?;
        if job.contains_key("services") {
            self.warnings
                .push(format!("{}: `services` are ignored", inst.name));
        }

        // Scripts.
        let mut commands = Vec::new();
        for k in ["before_script", "script"] {
            if let Some(v) = job.get(k) {
                commands.extend(script_lines(v, self.limits.max_script_lines).ok_or_else(
                    || {
                        self.err(
                            &at(k),
                            format!("`{k}` must be a string or a list of strings"),
                        )
                    },
                )?);
            }
        }
        if !job.contains_key("script") {
            return Err(self.err(&jp, format!("job `{}` has no `script`", short(key_name))));
        }
        let script = self.render_checked(&commands, &at("script"))?;
        let mut steps = vec![Step {
            name: "script".into(),
            ..Step::script("", script)
        }];
        if let Some(v) = job.get("after_script") {
            let after = script_lines(v, self.limits.max_script_lines).ok_or_else(|| {
                self.err(
                    &at("after_script"),
                    "`after_script` must be a string or list of strings",
                )
            })?;
            if !after.is_empty() {
                let script = self.render_checked(&after, &at("after_script"))?;
                steps.push(Step {
                    when: StepWhen::Always,
                    timeout: Some(AFTER_SCRIPT_TIMEOUT),
                    allow_failure: true,
                    ..Step::script("after_script", script)
                });
            }
        }
        for s in &mut steps {
            s.shell = Shell::Sh;
        }

        // Timeout, allow_failure, artifacts.
        let timeout = match job.get("timeout") {
            None => None,
            Some(v) => Some(
                scalar(v)
                    .as_deref()
                    .and_then(parse_duration)
                    .ok_or_else(|| self.err(&at("timeout"), "`timeout` is not a duration"))?,
            ),
        };
        let allow_failure = match rule_af {
            Some(a) => a,
            None => match job.get("allow_failure") {
                Some(v) => self.allow_failure(v, &at("allow_failure"))?,
                // Manual jobs without rules may fail by default.
                None if when == JobWhen::Manual && !job.contains_key("rules") => AllowFailure::Yes,
                None => AllowFailure::No,
            },
        };
        let artifacts = match job.get("artifacts") {
            None => Vec::new(),
            Some(v) => self.artifacts(v, &at("artifacts"), &lookup)?,
        };
        let needs = rule_needs.or_else(|| job.get("needs").cloned());
        let spec = JobSpec {
            name: inst.name.clone(),
            image,
            entrypoint,
            steps,
            variables: vars.into_iter().map(|(k, v)| Variable::new(k, v)).collect(),
            working_dir: Some(self.ctx.guest_dir.clone()),
            timeout,
            artifacts,
            source: JobSource::LocalDir(self.ctx.project_dir.clone()),
            id: key_name.to_string(),
            stage: Some(stage),
            needs: None,
            when,
            allow_failure,
            condition: None,
        };
        Ok(Some((spec, needs)))
    }

    fn var_too_long(&self, path: &[Seg], name: &str) -> Error {
        self.limit(
            path,
            format!(
                "variable `{}` expands to more than {} (max_script_bytes)",
                short(name),
                bytes(self.limits.max_script_bytes)
            ),
        )
    }

    /// [`render`], once the commands are known to fit the script limits.
    fn render_checked(&self, commands: &[String], path: &[Seg]) -> Result<String> {
        if commands.len() > self.limits.max_script_lines {
            return Err(self.limit(
                path,
                format!(
                    "more than {} script lines (max_script_lines)",
                    self.limits.max_script_lines
                ),
            ));
        }
        // Each command is echoed, so it counts twice, plus its check.
        let size = commands
            .iter()
            .map(|c| 2 * c.len() + 80)
            .fold(PREAMBLE.len(), usize::saturating_add);
        if size > self.limits.max_script_bytes {
            return Err(self.limit(
                path,
                format!(
                    "the script comes to more than {} (max_script_bytes)",
                    bytes(self.limits.max_script_bytes)
                ),
            ));
        }
        Ok(render(commands))
    }

    /// `Some(None)` is `when: never`.
    fn when(&self, v: &Value, path: &[Seg]) -> Result<Option<JobWhen>> {
        match v.as_str() {
            Some("on_success") => Ok(Some(JobWhen::OnSuccess)),
            Some("on_failure") => Ok(Some(JobWhen::OnFailure)),
            Some("always") => Ok(Some(JobWhen::Always)),
            Some("manual") => Ok(Some(JobWhen::Manual)),
            Some("delayed") => Ok(Some(JobWhen::OnSuccess)),
            Some("never") => Ok(None),
            _ => Err(self.err(
                path,
                "`when` must be on_success, on_failure, always, manual, delayed or never",
            )),
        }
    }

    fn allow_failure(&self, v: &Value, path: &[Seg]) -> Result<AllowFailure> {
        match v {
            Value::Bool(true) => Ok(AllowFailure::Yes),
            Value::Bool(false) => Ok(AllowFailure::No),
            Value::Mapping(m) => {
                let codes = match m.get("exit_codes") {
                    Some(Value::Sequence(s)) => s.iter().map(exit_code).collect::<Option<Vec<_>>>(),
                    Some(v) => exit_code(v).map(|c| vec![c]),
                    None => None,
                };
                codes
                    .map(AllowFailure::ExitCodes)
                    .ok_or_else(|| self.err(path, "`allow_failure: exit_codes` must be integers"))
            }
            _ => Err(self.err(
                path,
                "`allow_failure` must be a boolean or have `exit_codes`",
            )),
        }
    }

    fn eval_rules(
        &mut self,
        rules: &Value,
        vars: &BTreeMap<String, String>,
        path: &[Seg],
        job_when: Option<Option<JobWhen>>,
    ) -> Result<Outcome> {
        let Some(list) = rules.as_sequence() else {
            return Err(self.err(path, "`rules` must be a list"));
        };
        for (i, rule) in list.iter().enumerate() {
            let rp = join(path, &[Seg::Index(i)]);
            let Some(rule) = rule.as_mapping() else {
                return Err(self.err(&rp, "a rule must be a mapping"));
            };
            let mut matched = true;
            if let Some(cond) = rule.get("if") {
                let cond = cond
                    .as_str()
                    .ok_or_else(|| self.err(&join(&rp, &[key("if")]), "`if` must be a string"))?;
                matched = eval_rule_if_with(cond, vars, self.limits)
                    .map_err(|e| self.err(&join(&rp, &[key("if")]), e.to_string()))?;
            }
            if matched && rule.contains_key("changes") {
                self.warnings.push(format!(
                    "{}: `rules: changes` cannot be evaluated locally; treated as changed",
                    yaml::path_string(&rp)
                ));
            }
            if matched {
                if let Some(ex) = rule.get("exists") {
                    let files = match ex {
                        Value::Mapping(m) => m.get("paths").and_then(string_list),
                        v => string_list(v),
                    }
                    .unwrap_or_default();
                    matched = false;
                    for f in &files {
                        let f = expand_capped(f, vars, self.limits.max_script_bytes)
                            .unwrap_or_default();
                        if f.contains('*') || self.file_exists(&f) {
                            matched = true;
                            break;
                        }
                    }
                }
            }
            if !matched {
                continue;
            }
            let when = match rule.get("when") {
                Some(v) => self.when(v, &join(&rp, &[key("when")]))?,
                None => job_when.unwrap_or(Some(JobWhen::OnSuccess)),
            };
            let Some(when) = when else {
                return Ok(Outcome::Excluded);
            };
            let allow_failure = match rule.get("allow_failure") {
                Some(v) => Some(self.allow_failure(v, &join(&rp, &[key("allow_failure")]))?),
                None => None,
            };
            let vars = match rule.get("variables") {
                Some(v) => self
                    .variables(v, &join(&rp, &[key("variables")]))?
                    .into_iter()
                    .map(|(k, v)| (k.0, v))
                    .collect(),
                None => Vec::new(),
            };
            return Ok(Outcome::Included {
                when,
                allow_failure,
                vars,
                needs: rule.get("needs").cloned(),
            });
        }
        Ok(Outcome::Excluded)
    }

    /// `rules: exists` for one path, asked of each file once. A file that
    /// exists but cannot be read (too large, not UTF-8, a link out of the
    /// project) still exists.
    fn file_exists(&mut self, path: &str) -> bool {
        let path = path.trim_start_matches('/');
        if let Some(&e) = self.exists.get(path) {
            return e;
        }
        let e = match (self.read)(path) {
            Ok(_) => true,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::FileTooLarge
                    | io::ErrorKind::InvalidData
                    | io::ErrorKind::PermissionDenied
            ),
        };
        self.exists.insert(path.to_string(), e);
        e
    }

    /// Legacy `only`/`except` on refs and variables, as far as a local
    /// checkout can answer them (no tags, merge requests or schedules).
    fn only_except(
        &self,
        job: &Mapping,
        vars: &BTreeMap<String, String>,
        path: &[Seg],
    ) -> Result<bool> {
        let matches = |v: &Value, k: &str| -> Result<bool> {
            let p = join(path, &[key(k)]);
            let (refs, var_exprs) = match v {
                Value::Mapping(m) => (
                    m.get("refs").and_then(string_list),
                    m.get("variables").and_then(string_list),
                ),
                other => (string_list(other), None),
            };
            let mut hit = false;
            if let Some(refs) = refs {
                let branch = self.ctx.branch.as_deref();
                for r in refs {
                    hit |= match r.as_str() {
                        "branches" | "pushes" => branch.is_some(),
                        "tags"
                        | "merge_requests"
                        | "external_pull_requests"
                        | "schedules"
                        | "triggers"
                        | "web"
                        | "api"
                        | "pipelines"
                        | "chat" => false,
                        pat if pat.len() > 1 && pat.starts_with('/') => {
                            let expr = format!("$CI_COMMIT_REF_NAME =~ {pat}");
                            eval_rule_if_with(&expr, vars, self.limits)
                                .map_err(|e| self.err(&p, e.to_string()))?
                        }
                        name => branch == Some(name),
                    };
                }
            } else {
                hit = true;
            }
            if let Some(exprs) = var_exprs {
                let mut any = false;
                for e in exprs {
                    any |= eval_rule_if_with(&e, vars, self.limits)
                        .map_err(|e| self.err(&p, e.to_string()))?;
                }
                hit &= any;
            }
            Ok(hit)
        };
        if let Some(only) = job.get("only") {
            if !matches(only, "only")? {
                return Ok(false);
            }
        }
        if let Some(except) = job.get("except") {
            if matches(except, "except")? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn artifacts(
        &self,
        v: &Value,
        path: &[Seg],
        vars: &BTreeMap<String, String>,
    ) -> Result<Vec<ArtifactSpec>> {
        let Some(m) = v.as_mapping() else {
            return Err(self.err(path, "`artifacts` must be a mapping"));
        };
        let max = self.limits.max_script_bytes;
        let exp = |s: &str| {
            expand_capped(s, vars, max).ok_or_else(|| {
                self.limit(
                    path,
                    format!(
                        "a value expands to more than {} (max_script_bytes)",
                        bytes(max)
                    ),
                )
            })
        };
        let list = |k: &str| -> Result<Vec<String>> {
            match m.get(k) {
                None => Ok(Vec::new()),
                Some(v) => string_list(v)
                    .ok_or_else(|| self.err(&join(path, &[key(k)]), "must be a list of strings"))?
                    .iter()
                    .map(|s| exp(s))
                    .collect(),
            }
        };
        let when = match m.get("when").and_then(Value::as_str) {
            None | Some("on_success") => ArtifactWhen::OnSuccess,
            Some("on_failure") => ArtifactWhen::OnFailure,
            Some("always") => ArtifactWhen::Always,
            Some(_) => {
                return Err(self.err(
                    &join(path, &[key("when")]),
                    "`artifacts: when` must be on_success, on_failure or always",
                ))
            }
        };
        let mut out = Vec::new();
        let paths = list("paths")?;
        let untracked = m.get("untracked").and_then(Value::as_bool).unwrap_or(false);
        let expire_in = m.get("expire_in").and_then(scalar);
        if !paths.is_empty() || untracked {
            out.push(ArtifactSpec {
                name: m
                    .get("name")
                    .and_then(scalar)
                    .map(|n| exp(&n))
                    .transpose()?,
                paths,
                exclude: list("exclude")?,
                untracked,
                when,
                expire_in: expire_in.clone(),
            });
        }
        if let Some(Value::Mapping(reports)) = m.get("reports") {
            for (kind, files) in reports {
                let (Some(kind), Some(paths)) = (kind.as_str(), string_list(files)) else {
                    continue;
                };
                out.push(ArtifactSpec {
                    name: Some(format!("reports:{kind}")),
                    paths,
                    exclude: Vec::new(),
                    untracked: false,
                    when: ArtifactWhen::Always,
                    expire_in: expire_in.clone(),
                });
            }
        }
        Ok(out)
    }

    fn resolve_needs(
        &self,
        job: &str,
        needs: &Value,
        known: &BTreeSet<String>,
        groups: &BTreeMap<String, Vec<String>>,
        excluded: &[String],
    ) -> Result<Vec<String>> {
        let path = [key(job), key("needs")];
        let list = match needs {
            Value::Sequence(s) => s.clone(),
            Value::Null => Vec::new(),
            other => vec![other.clone()],
        };
        if list.len() > self.limits.max_needs {
            return Err(self.limit(
                &path,
                format!(
                    "a job may need at most {} jobs (max_needs)",
                    self.limits.max_needs
                ),
            ));
        }
        let mut out = Vec::new();
        for (i, entry) in list.iter().enumerate() {
            let ep = join(&path, &[Seg::Index(i)]);
            let (name, optional, matrix) = match entry {
                Value::String(s) => (s.clone(), false, None),
                Value::Mapping(m) => {
                    if m.contains_key("pipeline") || m.contains_key("project") {
                        continue; // cross-pipeline artifacts: nothing to run locally
                    }
                    let Some(name) = m.get("job").and_then(Value::as_str) else {
                        return Err(self.err(&ep, "a `needs` entry needs a `job`"));
                    };
                    let optional = m.get("optional").and_then(Value::as_bool).unwrap_or(false);
                    let matrix = m.get("parallel").and_then(|p| p.get("matrix")).cloned();
                    (name.to_string(), optional, matrix)
                }
                _ => return Err(self.err(&ep, "a `needs` entry must be a job name or mapping")),
            };
            let names: Vec<String> = if let Some(Value::Sequence(entries)) = matrix {
                entries
                    .iter()
                    .filter_map(|e| {
                        matrix_entry(e, self.limits.max_parallel, self.out_budget.left()).ok()
                    })
                    .flatten()
                    .map(|vars| {
                        let vals: Vec<&str> = vars.iter().map(|(_, v)| v.as_str()).collect();
                        format!("{name}: [{}]", vals.join(", "))
                    })
                    .collect()
            } else if known.contains(&name) {
                vec![name.clone()]
            } else if let Some(g) = groups.get(&name) {
                g.iter().filter(|n| known.contains(*n)).cloned().collect()
            } else {
                Vec::new()
            };
            let missing: Vec<&String> = names.iter().filter(|n| !known.contains(*n)).collect();
            if names.is_empty() || !missing.is_empty() {
                if optional {
                    continue;
                }
                let why = if excluded.contains(&name) {
                    "which is not in the pipeline (excluded by its rules)"
                } else {
                    "which does not exist"
                };
                return Err(self.err(
                    &ep,
                    format!("job `{}` needs `{}`, {why}", short(job), short(&name)),
                ));
            }
            out.extend(names);
        }
        Ok(out)
    }
}

/// One top-level entry's `!reference` resolution.
struct Refs<'p, 'a> {
    p: &'p Parser<'a>,
    top: &'p Mapping,
    top_key: &'p str,
    /// The references being resolved, outermost first.
    stack: Vec<Vec<String>>,
}

impl Refs<'_, '_> {
    fn err(&self, message: String) -> Error {
        self.p.err(&[key(self.top_key)], message)
    }

    /// `v` with its references replaced; `depth` is where it will sit.
    fn resolve(&mut self, v: &Value, depth: usize) -> Result<Value> {
        let max_depth = self.p.limits.max_yaml_depth;
        if depth > max_depth {
            return Err(self.p.limit(
                &[key(self.top_key)],
                format!("`!reference` makes the YAML nest deeper than {max_depth} levels (max_yaml_depth)"),
            ));
        }
        Ok(match v {
            Value::Tagged(t) if t.tag == "reference" => {
                let path: Option<Vec<String>> = match &t.value {
                    Value::Sequence(s) if !s.is_empty() => {
                        s.iter().map(|x| x.as_str().map(String::from)).collect()
                    }
                    _ => None,
                };
                let Some(path) = path else {
                    return Err(
                        self.err("`!reference` takes a list of names: [job, key, ...]".into())
                    );
                };
                let shown = || {
                    let parts: Vec<String> = path.iter().map(|p| short(p).into_owned()).collect();
                    format!("[{}]", short_n(&parts.join(", "), 120))
                };
                if self.stack.contains(&path) {
                    let mut names: Vec<String> = self.stack.iter().map(|p| p.join(".")).collect();
                    names.push(path.join("."));
                    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                    return Err(self.err(format!("`!reference` cycle: {}", chain(&refs))));
                }
                if self.stack.len() >= self.p.limits.max_reference_depth {
                    return Err(self.p.limit(
                        &[key(self.top_key)],
                        format!(
                            "`!reference` is nested more than {} levels deep \
                             (max_reference_depth)",
                            self.p.limits.max_reference_depth
                        ),
                    ));
                }
                let mut target = self.top.get(path[0].as_str());
                for part in &path[1..] {
                    target = target.and_then(|t| t.get(part.as_str()));
                }
                let Some(target) = target else {
                    return Err(self.err(format!(
                        "`!reference {}` names nothing in the pipeline",
                        shown()
                    )));
                };
                self.p.charge_out(
                    yaml::size_of(target, self.p.out_budget.left().saturating_add(1)),
                    Some(self.top_key),
                    &format!("!reference {}", shown()),
                )?;
                self.stack.push(path);
                let r = self.resolve(target, depth)?;
                self.stack.pop();
                r
            }
            Value::Sequence(s) => Value::Sequence(
                s.iter()
                    .map(|x| self.resolve(x, depth + 1))
                    .collect::<Result<_>>()?,
            ),
            Value::Mapping(m) => {
                let mut out = Mapping::with_capacity(m.len());
                for (k, x) in m {
                    out.insert(k.clone(), self.resolve(x, depth + 1)?);
                }
                Value::Mapping(out)
            }
            other => other.clone(),
        })
    }
}

/// Notes for a terminal: each shortened, control characters escaped.
pub(crate) fn printable(notes: Vec<String>) -> Vec<String> {
    notes
        .into_iter()
        .map(|n| short_n(&n, 300).into_owned())
        .collect()
}

/// Whether `v` holds a `!reference` anywhere.
fn has_reference(v: &Value) -> bool {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Tagged(t) if t.tag == "reference" => return true,
            Value::Tagged(t) => stack.push(&t.value),
            Value::Sequence(s) => stack.extend(s.iter()),
            Value::Mapping(m) => stack.extend(m.values()),
            _ => {}
        }
    }
    false
}

/// A variable name and whether its value may be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VarKey(String, bool);

/// Flattens the layers (later wins), then expands `$X` / `${X}` in values
/// that allow it, using the other variables. Unknown references are left as
/// written so the shell can still expand them; `$$` is a literal `$`.
/// Fails with the name of a variable whose value would grow past `max`.
fn resolve_vars<'a>(
    layers: impl Iterator<Item = &'a (VarKey, String)>,
    max: usize,
) -> std::result::Result<Vec<(String, String)>, String> {
    let mut order: Vec<String> = Vec::new();
    let mut map: HashMap<String, (String, bool)> = HashMap::new();
    for (k, v) in layers {
        if !map.contains_key(&k.0) {
            order.push(k.0.clone());
        }
        map.insert(k.0.clone(), (v.clone(), k.1));
    }
    let raw: BTreeMap<String, String> = map.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    order
        .into_iter()
        .map(|k| {
            let Some((v, exp)) = map.get(&k) else {
                return Ok((k, String::new()));
            };
            let v = if *exp {
                match expand_capped(v, &raw, max) {
                    Some(v) => v,
                    None => return Err(k),
                }
            } else {
                v.clone()
            };
            Ok((k, v))
        })
        .collect()
}

/// Expands `$NAME` and `${NAME}` from `vars`; unknown names stay as written.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    expand_capped(s, vars, usize::MAX).unwrap_or_default()
}

/// [`expand`], or `None` as soon as the result would be longer than `max`
/// bytes (`$A$A$A…` multiplies a value without bound otherwise).
fn expand_capped(s: &str, vars: &BTreeMap<String, String>, max: usize) -> Option<String> {
    let mut out = String::new();
    let push = |out: &mut String, t: &str| -> Option<()> {
        if out.len().saturating_add(t.len()) > max {
            return None;
        }
        out.push_str(t);
        Some(())
    };
    let mut rest = s;
    let mut no_close = false;
    while let Some(pos) = rest.find('$') {
        push(&mut out, &rest[..pos])?;
        let after = &rest[pos + 1..];
        if let Some(r) = after.strip_prefix('$') {
            push(&mut out, "$")?;
            rest = r;
            continue;
        }
        let (name, consumed) = if let Some(r) = after.strip_prefix('{') {
            // Once no `}` follows, none will: do not search again (that
            // would be quadratic in a value of many `${`).
            let close = if no_close { None } else { r.find('}') };
            match close {
                Some(end) => (&r[..end], end + 2),
                None => {
                    no_close = true;
                    ("", 0)
                }
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        match vars.get(name) {
            Some(v) if !name.is_empty() => {
                push(&mut out, v)?;
                rest = &after[consumed..];
            }
            _ => {
                push(&mut out, "$")?;
                rest = after;
            }
        }
    }
    push(&mut out, rest)?;
    Some(out)
}

/// The script file for a list of commands; see the module docs.
pub fn render(commands: &[String]) -> String {
    let mut s = String::from(PREAMBLE);
    for cmd in commands {
        let shown = match cmd.trim_end().split_once('\n') {
            Some((first, _)) => format!("$ {first} # collapsed multi-line command"),
            None => format!("$ {}", cmd.trim_end()),
        };
        s.push_str(&format!("printf '%s\\n' {}\n", shell_quote(&shown)));
        s.push_str(cmd.trim_end());
        s.push_str("\n_kiln_rc=$?; if [ \"$_kiln_rc\" -ne 0 ]; then exit \"$_kiln_rc\"; fi\n");
    }
    s
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Script entries, flattening nested lists (anchors and `!reference`
/// often produce them). Stops a little past `cap` entries; the caller
/// checks the count.
fn script_lines(v: &Value, cap: usize) -> Option<Vec<String>> {
    fn walk(v: &Value, depth: usize, out: &mut Vec<String>, cap: usize) -> Option<()> {
        match v {
            Value::Sequence(s) if depth < 10 => {
                for x in s {
                    if out.len() > cap {
                        break;
                    }
                    walk(x, depth + 1, out, cap)?;
                }
                Some(())
            }
            Value::Sequence(_) | Value::Mapping(_) => None,
            Value::Null => Some(()),
            other => {
                out.push(scalar(other)?);
                Some(())
            }
        }
    }
    let mut out = Vec::new();
    walk(v, 0, &mut out, cap)?;
    Some(out)
}

/// A string or a list of strings.
fn string_list(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Sequence(s) => s.iter().map(|x| x.as_str().map(String::from)).collect(),
        Value::String(s) => Some(vec![s.clone()]),
        _ => None,
    }
}

fn exit_code(v: &Value) -> Option<i32> {
    v.as_i64().and_then(|n| i32::try_from(n).ok())
}

enum MatrixError {
    /// Not a mapping of names to values or lists of values.
    Shape,
    /// More than the room left.
    TooMany,
    /// The combinations would take more than the bytes left.
    TooLarge,
}

/// Expands one `parallel: matrix` entry into variable sets, keys in file
/// order, the last key varying fastest. The size of the product is checked
/// against `room` before any combination is built.
fn matrix_entry(
    entry: &Value,
    room: usize,
    max_bytes: usize,
) -> Result<Vec<Vec<(String, String)>>, MatrixError> {
    let m = entry.as_mapping().ok_or(MatrixError::Shape)?;
    let mut product = 1usize;
    for (_, v) in m {
        let n = match v {
            Value::Sequence(s) => s.len(),
            _ => 1,
        };
        product = product.saturating_mul(n);
    }
    if product > room {
        return Err(MatrixError::TooMany);
    }
    // Each value of a key with n values appears in product / n combinations.
    let mut total = 0usize;
    for (k, v) in m {
        let k_len = k.as_str().map_or(0, str::len) + crate::NODE_BYTES;
        let (n, text) = match v {
            Value::Sequence(s) => (s.len(), s.iter().map(|x| yaml::size_of(x, max_bytes)).sum()),
            other => (1, yaml::size_of(other, max_bytes)),
        };
        let copies = product / n.max(1);
        total = total
            .saturating_add(copies.saturating_mul(n).saturating_mul(k_len))
            .saturating_add(copies.saturating_mul(text));
    }
    if total > max_bytes {
        return Err(MatrixError::TooLarge);
    }
    let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (k, v) in m {
        let k = k.as_str().ok_or(MatrixError::Shape)?;
        let values: Vec<String> = match v {
            Value::Sequence(s) => s
                .iter()
                .map(scalar)
                .collect::<Option<_>>()
                .ok_or(MatrixError::Shape)?,
            other => vec![scalar(other).ok_or(MatrixError::Shape)?],
        };
        let mut next = Vec::with_capacity(combos.len() * values.len());
        for c in &combos {
            for val in &values {
                let mut c = c.clone();
                c.push((k.to_string(), val.clone()));
                next.push(c);
            }
        }
        combos = next;
    }
    Ok(combos)
}

/// GitLab's `CI_COMMIT_REF_SLUG`: lowercased, non-alphanumerics to `-`,
/// at most 63 bytes, no leading or trailing `-`.
fn slug(s: &str) -> String {
    let lower: String = s
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    lower.trim_matches('-').to_string()
}

fn parent_dir(p: &str) -> String {
    match p.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/".to_string(),
        Some((parent, _)) => parent.to_string(),
    }
}
