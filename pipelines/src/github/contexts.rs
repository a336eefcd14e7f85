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
        if let Some(b) = &ctx.branch {
            variables.set("GITHUB_REF", format!("refs/heads/{b}"));
            variables.set("GITHUB_REF_NAME", b.clone());
            variables.set("GITHUB_REF_TYPE", "branch".into());
        }
        variables
    }
}
