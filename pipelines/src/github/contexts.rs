//! What a job knows before it runs: the `github`, `runner`, `vars`,
//! `matrix` and `strategy` contexts of its expressions, and the `GITHUB_*`
//! and `RUNNER_*` variables of its environment, both from the
//! [`LocalContext`](crate::LocalContext) of the checkout.

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::env::Vars;
use super::job::JobBuilder;
use super::{Contexts, ExprLimits, ExprValue};

impl JobBuilder<'_> {
    /// The contexts static at parse time (`partial` set: the others are
    /// left for the executor).
    pub(super) fn base_contexts(&self) -> Contexts {
        let ctx = self.ctx;
        let (full_ref, ref_name, ref_type) = git_ref(ctx);
        let mut github: BTreeMap<String, ExprValue> = [
            ("sha", ctx.commit_sha.clone()),
            ("ref", full_ref),
            ("ref_name", ref_name),
            ("ref_type", ref_type.to_string()),
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
        cx.set("secrets", ExprValue::object(ctx.secrets.iter().cloned()));
        cx.set("inputs", self.inputs.clone());
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

    /// The variables GitHub's runner sets for every job.
    pub(super) fn default_variables(&self) -> Vars {
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
        let (full_ref, ref_name, ref_type) = git_ref(ctx);
        if !ref_name.is_empty() {
            variables.set("GITHUB_REF", full_ref);
            variables.set("GITHUB_REF_NAME", ref_name);
            variables.set("GITHUB_REF_TYPE", ref_type.into());
        }
        variables
    }
}

/// `github.ref`, `ref_name` and `ref_type`: the tag of a tag run, else the
/// branch (all empty on a detached HEAD without a tag).
fn git_ref(ctx: &crate::LocalContext) -> (String, String, &'static str) {
    match (&ctx.tag, &ctx.branch) {
        (Some(t), _) => (format!("refs/tags/{t}"), t.clone(), "tag"),
        (None, Some(b)) => (format!("refs/heads/{b}"), b.clone(), "branch"),
        (None, None) => (String::new(), String::new(), "branch"),
    }
}

/// The `inputs` context: the defaults the workflow declares under
/// `on.workflow_call.inputs` and `on.workflow_dispatch.inputs`, with the
/// caller's `--input` values (as the declared `type`: boolean, number or
/// string) over them.
pub(super) fn inputs(root: &serde_yaml::Mapping, given: &[(String, String)]) -> ExprValue {
    let mut out = BTreeMap::new();
    let mut types = BTreeMap::new();
    let on = root.get("on");
    for trigger in ["workflow_dispatch", "workflow_call"] {
        let Some(decl) = on
            .and_then(|o| o.get(trigger))
            .and_then(|t| t.get("inputs"))
            .and_then(Value::as_mapping)
        else {
            continue;
        };
        for (k, d) in decl {
            let Some(k) = k.as_str() else { continue };
            let ty = d.get("type").and_then(Value::as_str).unwrap_or("string");
            types.insert(k.to_string(), ty.to_string());
            let v = match d.get("default") {
                Some(v) => ExprValue::from_yaml(v),
                None if ty == "boolean" => ExprValue::Bool(false),
                None => ExprValue::String(String::new()),
            };
            out.insert(k.to_string(), v);
        }
    }
    for (k, v) in given {
        let typed = match types.get(k).map(String::as_str) {
            Some("boolean") => v.parse().map(ExprValue::Bool).ok(),
            Some("number") => v.parse().map(ExprValue::Number).ok(),
            _ => None,
        };
        out.insert(
            k.clone(),
            typed.unwrap_or_else(|| ExprValue::String(v.clone())),
        );
    }
    ExprValue::Object(out)
}
