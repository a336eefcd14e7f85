//! One step of a job: `run` with its `env`, `shell`, `if`,
//! `working-directory`, `timeout-minutes` and `continue-on-error`, and the
//! `defaults: run` of workflow and job. `uses:` steps other than
//! `actions/checkout` cannot run locally: they are noted and left out.

use serde_yaml::Value;

use super::env::env_map;
use super::job::JobBuilder;
use super::{limit_err, Contexts, ExprValue, Workflow};
use crate::error::Result;
use crate::limits::bytes;
use crate::spec::{Shell, Step, StepWhen};
use crate::yaml::{self, join, key, scalar, Seg};

/// The script GitHub runs when no `shell` is given on Linux: `bash -e {0}`
/// when bash is on `PATH`, else `sh -e {0}`.
pub const DEFAULT_SHELL_PROBE: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash -e \"$1\"; else exec sh -e \"$1\"; fi";

/// `defaults: run`: the shell and working directory of steps that name none.
#[derive(Debug, Clone, Default)]
pub(super) struct RunDefaults {
    pub(super) shell: Option<String>,
    pub(super) working_dir: Option<String>,
}

impl RunDefaults {
    /// These defaults, each falling back to `outer`'s (job over workflow).
    pub(super) fn or(self, outer: &RunDefaults) -> RunDefaults {
        RunDefaults {
            shell: self.shell.or_else(|| outer.shell.clone()),
            working_dir: self.working_dir.or_else(|| outer.working_dir.clone()),
        }
    }
}

/// `defaults: run` in `v` (a workflow or job mapping's `defaults`).
pub(super) fn run_defaults(
    v: Option<&Value>,
    path: &[Seg],
    c: &yaml::Ctx<'_>,
) -> Result<RunDefaults> {
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

impl JobBuilder<'_> {
    /// The step at `sp`, or `None` when it is left out: a `uses:` step
    /// (noted in `w` unless it is a plain checkout), `shell: cmd`, or an
    /// `if:` that is false already.
    pub(super) fn step(
        &self,
        step: &Value,
        sp: &[Seg],
        job_cx: &Contexts,
        defaults: &RunDefaults,
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
                if self.opts.skip_unsupported_actions {
                    return Ok(None);
                }
                let mut step = unsupported_action(&describe(), u, label);
                if let Some(cond) = m.get("if").and_then(scalar) {
                    let whens = [StepWhen::OnSuccess, StepWhen::OnFailure, StepWhen::Always];
                    match self.decide_if(cond, job_cx, &join(sp, &[key("if")]), whens)? {
                        None => return Ok(None),
                        Some((when, condition)) => {
                            step.when = when;
                            step.condition = condition;
                        }
                    }
                }
                return Ok(Some(step));
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
        let shell_name = m.get("shell").and_then(scalar).or(defaults.shell.clone());
        let Some(shell) = shell(shell_name.as_deref(), c, &join(sp, &[key("shell")]))? else {
            w.unsupported.push(format!(
                "{} in {job_name}: `shell: cmd` needs Windows",
                describe()
            ));
            return Ok(None);
        };
        let (when, condition) = match m.get("if").and_then(scalar) {
            None => (StepWhen::OnSuccess, None),
            Some(cond) => {
                let whens = [StepWhen::OnSuccess, StepWhen::OnFailure, StepWhen::Always];
                match self.decide_if(cond, cx, &join(sp, &[key("if")]), whens)? {
                    None => return Ok(None),
                    Some(d) => d,
                }
            }
        };
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
            None => defaults.working_dir.clone(),
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

/// A step that stands for a `uses:` step kiln cannot run: it fails the job
/// with a message that says so, instead of the job passing without it.
fn unsupported_action(what: &str, uses: &str, label: Option<String>) -> Step {
    let message = format!(
        "kiln: {what} uses `{uses}`, an action kiln cannot run; replace it with `run:` \
         steps, or pass --skip-unsupported-actions to leave it out"
    );
    let quoted = format!("'{}'", message.replace('\'', r"'\''"));
    let mut step = Step::script(
        label.unwrap_or_else(|| format!("Run {uses}")),
        format!("printf '%s\\n' {quoted} >&2\nexit 1\n"),
    );
    step.shell = Shell::Sh;
    step
}

/// The shell a step's `shell:` names (GitHub's default without one);
/// `None` for `cmd`, which needs Windows.
fn shell(name: Option<&str>, c: &yaml::Ctx<'_>, path: &[Seg]) -> Result<Option<Shell>> {
    Ok(Some(match name {
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
        Some("cmd") => return Ok(None),
        Some(custom) if custom.contains("{0}") => {
            Shell::Custom(custom.split_whitespace().map(String::from).collect())
        }
        Some(other) => {
            return Err(c.err(path, format!("custom shell `{other}` must contain `{{0}}`")))
        }
    }))
}
