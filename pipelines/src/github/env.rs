//! `env:` mappings (workflow, job, container, step) and the environment a
//! job gets: workflow `env` < job `env`, over the container's `env` and the
//! default variables, under the caller's variables.

use std::collections::HashMap;

use serde_yaml::{Mapping, Value};

use super::job::JobBuilder;
use super::{limit_err, Contexts, ExprValue};
use crate::error::Result;
use crate::limits::Limits;
use crate::yaml::{self, join, key, scalar, Seg};

/// An `env:` mapping at `path`, values as text.
pub(super) fn env_map(
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
        // Noted once by `computed_envs`; the variables stay unset.
        Some(Value::String(s)) if s.contains("${{") => Ok(Vec::new()),
        Some(_) => Err(c.err(path, "`env` must be a mapping")),
    }
}

/// Notes for every `env:` computed by an expression (workflow, job,
/// container and step `env`): kiln cannot know its keys before running,
/// so those variables are left unset instead of failing the file.
pub(super) fn computed_envs(root: &Mapping) -> Vec<String> {
    let computed = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| s.contains("${{"));
    let mut out = Vec::new();
    let mut note = |path: String| {
        out.push(format!(
            "{path}: `env` computed by an expression is left unset (list the variables to set them)"
        ))
    };
    if computed(root.get("env")) {
        note("env".into());
    }
    let Some(jobs) = root.get("jobs").and_then(Value::as_mapping) else {
        return out;
    };
    for (id, job) in jobs {
        let id = scalar(id).unwrap_or_default();
        if computed(job.get("env")) {
            note(format!("jobs.{id}.env"));
        }
        if computed(job.get("container").and_then(|c| c.get("env"))) {
            note(format!("jobs.{id}.container.env"));
        }
        if let Some(steps) = job.get("steps").and_then(Value::as_sequence) {
            for (i, st) in steps.iter().enumerate() {
                if computed(st.get("env")) {
                    note(format!("jobs.{id}.steps[{i}].env"));
                }
            }
        }
    }
    out
}

impl JobBuilder<'_> {
    /// The job's `env` (workflow < job), expressions substituted, and
    /// whether any is left for run time. When no step writes
    /// `$GITHUB_ENV`, the `env` context is set in `cx` too.
    pub(super) fn job_env(&self, cx: &mut Contexts) -> Result<(Vec<(String, String)>, bool)> {
        let job = self.job;
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
            let (v, d) = self.sub(v, cx, &self.at(&[key("env"), key(k)]))?;
            job_runtime |= d;
            env.set(k, v);
        }
        let env = env.list;
        if !writes_env {
            cx.set("env", ExprValue::object(env.iter().cloned()));
        }
        Ok((env, job_runtime))
    }

    /// The job's variables: the default ones < the container's `env` < the
    /// job's `env` < the caller's variables.
    pub(super) fn variables(
        &self,
        container_env: Vec<(String, String)>,
        env: Vec<(String, String)>,
    ) -> Vec<(String, String)> {
        let mut variables = self.default_variables();
        for (k, v) in container_env
            .into_iter()
            .chain(env)
            .chain(self.ctx.extra_vars.iter().cloned())
        {
            variables.set(&k, v);
        }
        variables.list
    }
}

/// Variables in order of first definition; setting one again replaces its
/// value in place. Constant time per `set`.
#[derive(Default)]
pub(super) struct Vars {
    pub(super) list: Vec<(String, String)>,
    pos: HashMap<String, usize>,
}

impl Vars {
    pub(super) fn set(&mut self, k: &str, v: String) {
        match self.pos.get(k) {
            Some(&i) => self.list[i].1 = v,
            None => {
                self.pos.insert(k.to_string(), self.list.len());
                self.list.push((k.to_string(), v));
            }
        }
    }
}
