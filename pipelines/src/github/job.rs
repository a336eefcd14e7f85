//! One job of a workflow (one matrix instance of it) to a [`JobSpec`]:
//! its name, `if`, image, environment, steps, `timeout-minutes` and
//! `continue-on-error`; and GitHub's rules for job ids.

use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::step::{run_defaults, RunDefaults};
use super::{
    classify_condition, limit_err, substitute_partial, Condition, Contexts, ExprValue, Workflow,
};
use crate::context::{LocalContext, Options};
use crate::error::{Error, ExprError, Result};
use crate::limits::{short, short_n, Budget, Limits};
use crate::spec::{AllowFailure, JobSource, JobSpec, JobWhen, Variable};
use crate::yaml::{self, join, key, scalar, Seg};

/// GitHub's default job timeout (`timeout-minutes`), 360 minutes.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(360 * 60);

/// What building one job instance needs.
pub(super) struct JobBuilder<'a> {
    pub(super) c: &'a yaml::Ctx<'a>,
    pub(super) ctx: &'a LocalContext,
    pub(super) opts: &'a Options,
    pub(super) id: &'a str,
    pub(super) jp: &'a [Seg],
    pub(super) job: &'a Mapping,
    pub(super) combo: &'a [(String, Value)],
    pub(super) index: usize,
    pub(super) total: usize,
    pub(super) wf_env: &'a [(String, String)],
    pub(super) wf_defaults: &'a RunDefaults,
    pub(super) workflow_name: &'a str,
    /// The `inputs` context (`workflow_call`/`workflow_dispatch`).
    pub(super) inputs: &'a ExprValue,
    /// The output budget: per-step copies of the contexts are charged here.
    pub(super) out: &'a Budget,
}

impl JobBuilder<'_> {
    pub(super) fn at(&self, more: &[Seg]) -> Vec<Seg> {
        join(self.jp, more)
    }

    pub(super) fn expr_err(&self, path: &[Seg], e: &ExprError) -> Error {
        self.c.err(path, e.to_string())
    }

    /// Static substitution; returns the text and whether run-time
    /// expressions remain.
    pub(super) fn sub(&self, text: &str, cx: &Contexts, path: &[Seg]) -> Result<(String, bool)> {
        substitute_partial(text, cx).map_err(|e| self.expr_err(path, &e))
    }

    /// The job's spec, or `None` when it is left out: skipped by its `if`
    /// (noted in [`Workflow::skipped`]) or without an image (noted in
    /// [`Workflow::unsupported`]).
    pub(super) fn build(&self, w: &mut Workflow) -> Result<Option<JobSpec>> {
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

        let (when, condition) = match job.get("if").and_then(scalar) {
            None => (JobWhen::OnSuccess, None),
            Some(cond) => {
                let whens = [JobWhen::OnSuccess, JobWhen::OnFailure, JobWhen::Always];
                match self.decide_if(cond, &cx, &self.at(&[key("if")]), whens)? {
                    None => {
                        w.skipped.push(name);
                        return Ok(None);
                    }
                    Some(d) => d,
                }
            }
        };
        if condition.is_some() {
            let size = cx.approx_bytes();
            if !self.out.charge(size) {
                return Err(limit_err(
                    self.c,
                    &self.at(&[key("if")]),
                    "the workflow's contexts take more than max_output_bytes".into(),
                ));
            }
            w.conditions.insert(name.clone(), cx.clone());
        }
        let Some((image, container_env)) = self.image(&cx, &name, w)? else {
            return Ok(None);
        };
        let services = self.services(&cx, &name, w)?;

        let (env, job_runtime) = self.job_env(&mut cx)?;
        let variables = self.variables(container_env, env);
        let ctx = self.ctx;
        let defaults = run_defaults(job.get("defaults"), &self.at(&[key("defaults")]), self.c)?
            .or(self.wf_defaults);

        // Steps.
        let Some(steps) = job.get("steps").and_then(Value::as_sequence) else {
            return Err(self.c.err(self.jp, "`steps` is missing or not a list"));
        };
        let mut out = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let sp = self.at(&[key("steps"), Seg::Index(i)]);
            if let Some(s) = self.step(step, &sp, &cx, &defaults, &name, w)? {
                out.push(s);
            }
        }
        if job_runtime {
            for s in &mut out {
                s.runtime_expressions = true;
            }
        }

        let outputs = self.outputs(&cx)?;
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
            cache: Vec::new(),
            source: JobSource::LocalDir(ctx.project_dir.clone()),
            id: self.id.to_string(),
            stage: None,
            needs: None,
            when,
            allow_failure,
            condition,
            outputs,
            needs_results: Vec::new(),
            start_in: None,
            services,
        }))
    }

    /// The job's `outputs:`, with what is static substituted; the rest
    /// (`steps.*`, `needs.*`) is left for the executor.
    fn outputs(&self, cx: &Contexts) -> Result<Vec<(String, String)>> {
        let path = self.at(&[key("outputs")]);
        let Some(v) = self.job.get("outputs") else {
            return Ok(Vec::new());
        };
        let Some(m) = v.as_mapping() else {
            return Err(self
                .c
                .err(&path, "`outputs` must be a mapping of names to values"));
        };
        let mut out = Vec::new();
        for (k, v) in m {
            let (Some(name), Some(text)) = (scalar(k), scalar(v)) else {
                return Err(self
                    .c
                    .err(&path, "each output must be a name and a text value"));
            };
            let (text, _) = self.sub(&text, cx, &join(&path, &[key(&name)]))?;
            out.push((name, text));
        }
        Ok(out)
    }

    /// An `if:` at `path`, decided as far as the static contexts allow:
    /// `None` to leave the job or step out; else when it runs (of `whens`:
    /// on success, on failure, always) and the condition left for run time.
    pub(super) fn decide_if<W: Copy>(
        &self,
        cond: String,
        cx: &Contexts,
        path: &[Seg],
        [success, failure, always]: [W; 3],
    ) -> Result<Option<(W, Option<String>)>> {
        let decided = classify_condition(&cond, cx).map_err(|e| self.expr_err(path, &e))?;
        Ok(Some(match decided {
            Condition::Static(false) => return Ok(None),
            Condition::Static(true) | Condition::Status("success") => (success, None),
            Condition::Status("failure") => (failure, None),
            Condition::Status(_) => (always, None),
            Condition::Runtime { uses_status } => {
                (if uses_status { always } else { success }, Some(cond))
            }
        }))
    }

    pub(super) fn minutes(&self, v: &Value, path: &[Seg], cx: &Contexts) -> Result<Duration> {
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

    pub(super) fn flag(&self, v: &Value, path: &[Seg], cx: &Contexts) -> Result<bool> {
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
}

/// GitHub's rule for job ids: a letter or `_`, then letters, digits, `-`
/// and `_`; and not longer than `max_job_name_chars`.
pub(super) fn check_job_id(
    id: &str,
    path: &[Seg],
    c: &yaml::Ctx<'_>,
    limits: &Limits,
) -> Result<()> {
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
