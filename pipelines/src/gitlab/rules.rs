//! Whether a job (or the whole pipeline) runs, and how: `workflow: rules`,
//! job `rules` (`if`, `changes`, `exists`, `when`, `allow_failure`,
//! `variables`, `needs`), legacy `only`/`except`, and `when:`. The kind of
//! pipeline (branch, tag, merge request, schedule, ...) comes from the
//! context and `Options::pipeline_source` ([`super::predefined::Pipeline`]);
//! `changes` counts as changed, and `exists` asks the project's files. An
//! excluded job keeps the clause that excluded it.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use serde_yaml::{Mapping, Value};

use super::expr::eval_rule_if_with;
use super::predefined::Pipeline;
use super::variables::{expand_capped, VarKey};
use super::Parser;
use crate::error::Result;
use crate::limits::short;
use crate::spec::{AllowFailure, JobWhen};
use crate::yaml::{self, join, key, strings, Seg};

/// What the rules decided for a job or the pipeline.
pub(super) enum Outcome {
    /// With the clause that excluded it (`rules[2]: when: never`).
    Excluded(String),
    Included {
        when: JobWhen,
        allow_failure: Option<AllowFailure>,
        vars: Vec<(String, String)>,
        needs: Option<Value>,
        /// `when: delayed`: its `start_in`.
        start_in: Option<Duration>,
    },
}

impl Parser<'_> {
    /// `workflow: rules`, seen with the predefined, global and caller's
    /// variables (the caller's win).
    pub(super) fn workflow_rules(
        &mut self,
        rules: &Value,
        global_vars: &[(VarKey, String)],
    ) -> Result<Outcome> {
        let mut vars = self.base_vars();
        for (k, v) in global_vars {
            vars.entry(k.0.clone()).or_insert_with(|| v.clone());
        }
        let path = [key("workflow"), key("rules")];
        self.eval_rules(rules, &vars, &path, None, None)
    }

    /// Whether the job at `jp` runs, from its `rules`, else its
    /// `only`/`except` and `when`; `vars` are the job's variables.
    pub(super) fn job_outcome(
        &mut self,
        job: &Mapping,
        vars: &BTreeMap<String, String>,
        jp: &[Seg],
    ) -> Result<Outcome> {
        let job_when = match job.get("when") {
            None => None,
            Some(v) => Some(self.when(v, &join(jp, &[key("when")]))?),
        };
        let job_start_in = self.start_in(job, jp)?;
        Ok(if let Some(rules) = job.get("rules") {
            self.eval_rules(
                rules,
                vars,
                &join(jp, &[key("rules")]),
                job_when,
                job_start_in,
            )?
        } else if let Some(why) = self.only_except(job, vars, jp)? {
            Outcome::Excluded(why)
        } else {
            match job_when {
                Some(None) => Outcome::Excluded("when: never".into()),
                w => Outcome::Included {
                    when: w.flatten().unwrap_or(JobWhen::OnSuccess),
                    allow_failure: None,
                    vars: Vec::new(),
                    needs: None,
                    start_in: job_start_in,
                },
            }
        })
    }

    /// The `start_in` of a mapping (a job or a rule) whose `when` is
    /// `delayed`: required, and at most a week (GitLab's limits).
    fn start_in(&self, m: &Mapping, path: &[Seg]) -> Result<Option<Duration>> {
        if m.get("when").and_then(Value::as_str) != Some("delayed") {
            return Ok(None);
        }
        let at = join(path, &[key("start_in")]);
        let Some(text) = m.get("start_in").and_then(yaml::scalar) else {
            return Err(self.err(
                &join(path, &[key("when")]),
                "`when: delayed` needs `start_in` (e.g. `start_in: 30 minutes`)",
            ));
        };
        match crate::parse_duration(&text) {
            Some(d) if d <= Duration::from_secs(7 * 24 * 3600) => Ok(Some(d)),
            Some(_) => Err(self.err(&at, "`start_in` must be at most one week")),
            None => Err(self.err(
                &at,
                format!("`{}` is not a duration (e.g. `30 minutes`)", short(&text)),
            )),
        }
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

    /// `allow_failure:`: a boolean, or `exit_codes` (one or a list).
    pub(super) fn allow_failure(&self, v: &Value, path: &[Seg]) -> Result<AllowFailure> {
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

    /// The first rule at `path` that matches `vars` decides; when none
    /// does, the job is excluded. `job_when` is the job's own `when:`
    /// (`Some(None)` for `never`), the default for a rule without one.
    fn eval_rules(
        &mut self,
        rules: &Value,
        vars: &BTreeMap<String, String>,
        path: &[Seg],
        job_when: Option<Option<JobWhen>>,
        job_start_in: Option<Duration>,
    ) -> Result<Outcome> {
        let Some(list) = rules.as_sequence() else {
            return Err(self.err(path, "`rules` must be a list"));
        };
        // `- !reference [.x, rules]` puts a list in the list: GitLab
        // flattens it (one level, as it does for scripts).
        let flat = list.iter().enumerate().flat_map(|(i, r)| match r {
            Value::Sequence(inner) => inner.iter().map(|x| (i, x)).collect::<Vec<_>>(),
            other => vec![(i, other)],
        });
        for (i, rule) in flat {
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
                        Value::Mapping(m) => m.get("paths").and_then(strings),
                        v => strings(v),
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
            let (when, start_in) = match rule.get("when") {
                Some(v) => (
                    self.when(v, &join(&rp, &[key("when")]))?,
                    self.start_in(rule, &rp)?,
                ),
                None => (job_when.unwrap_or(Some(JobWhen::OnSuccess)), job_start_in),
            };
            let Some(when) = when else {
                return Ok(Outcome::Excluded(format!(
                    "{}: when: never",
                    yaml::path_string(&rp)
                )));
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
                start_in,
            });
        }
        Ok(Outcome::Excluded(format!(
            "{}: no rule matched",
            yaml::path_string(path)
        )))
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

    /// Legacy `only`/`except`: `None` when the job runs, else the clause
    /// that excludes it. Without either, `only: [branches, tags]` applies
    /// (GitLab's default), so merge request pipelines leave such jobs out.
    fn only_except(
        &self,
        job: &Mapping,
        vars: &BTreeMap<String, String>,
        path: &[Seg],
    ) -> Result<Option<String>> {
        let pipe = Pipeline::of(self.ctx, self.opts);
        let matches = |v: &Value, k: &str| -> Result<bool> {
            let p = join(path, &[key(k)]);
            let (refs, var_exprs) = match v {
                Value::Mapping(m) => (
                    m.get("refs").and_then(strings),
                    m.get("variables").and_then(strings),
                ),
                other => (
                    Some(strings(other).ok_or_else(|| {
                        self.err(&p, format!("`{k}` must be a list of refs or a mapping"))
                    })?),
                    None,
                ),
            };
            let mut hit = true;
            if let Some(refs) = refs {
                hit = false;
                for r in refs {
                    if self.ref_matches(&r, &pipe, vars, &p)? {
                        hit = true;
                        break;
                    }
                }
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
        let shown = |v: &Value| {
            let text = serde_json::to_string(v).unwrap_or_default();
            short(&text).into_owned()
        };
        match job.get("only") {
            Some(only) => {
                if !matches(only, "only")? {
                    return Ok(Some(format!("only: {}", shown(only))));
                }
            }
            None => {
                if !(pipe.is_branch() || pipe.is_tag()) {
                    return Ok(Some(
                        "only: [branches, tags] (the default without rules or only)".into(),
                    ));
                }
            }
        }
        if let Some(except) = job.get("except") {
            if matches(except, "except")? {
                return Ok(Some(format!("except: {}", shown(except))));
            }
        }
        Ok(None)
    }

    /// One `only`/`except` ref pattern, as GitLab's `Policy::Refs`:
    /// `branches`, `tags`, a source name (`schedules`, `merge_requests`,
    /// ...), a `/regex/` or a name, each optionally `@group/project`.
    fn ref_matches(
        &self,
        pattern: &str,
        pipe: &Pipeline,
        vars: &BTreeMap<String, String>,
        p: &[Seg],
    ) -> Result<bool> {
        let (pattern, project) = match pattern.split_once('@') {
            Some((pat, proj)) => (pat, Some(proj)),
            None => (pattern, None),
        };
        if let (Some(proj), Some(path)) = (project, vars.get("CI_PROJECT_PATH")) {
            if proj != path {
                return Ok(false);
            }
        }
        if (pattern == "tags" && pipe.is_tag()) || (pattern == "branches" && pipe.is_branch()) {
            return Ok(true);
        }
        if pipe.source_names().iter().any(|n| n == pattern) {
            return Ok(true);
        }
        if !(pipe.is_branch() || pipe.is_tag()) {
            return Ok(false);
        }
        let Some(r) = pipe.ref_name() else {
            return Ok(false);
        };
        if pattern.len() > 1 && pattern.starts_with('/') {
            let mut v = BTreeMap::new();
            v.insert("R".to_string(), r.to_string());
            return eval_rule_if_with(&format!("$R =~ {pattern}"), &v, self.limits)
                .map_err(|e| self.err(p, e.to_string()));
        }
        Ok(pattern == r)
    }
}

fn exit_code(v: &Value) -> Option<i32> {
    v.as_i64().and_then(|n| i32::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{
        ctx, job, names, parse_err, parse_files, parse_ok, parse_with, var,
    };
    use super::*;
    use crate::context::Options;

    #[test]
    fn the_first_matching_rule_decides() {
        let p = parse_ok(
            "j:\n  script: x\n  rules:\n\
             \x20   - if: $CI_COMMIT_BRANCH == \"dev\"\n      when: never\n\
             \x20   - if: $CI_COMMIT_BRANCH == \"main\"\n      when: manual\n\
             \x20   - when: always\n",
        );
        let j = job(&p, "j");
        assert_eq!(j.when, JobWhen::Manual);
        // A manual job with rules may not fail, unlike one without.
        assert_eq!(j.allow_failure, AllowFailure::No);
        let p = parse_ok("j:\n  script: x\n  when: manual\n");
        assert_eq!(job(&p, "j").allow_failure, AllowFailure::Yes);
    }

    #[test]
    fn no_matching_rule_or_when_never_excludes() {
        let p = parse_ok(
            "a:\n  script: x\n  rules:\n    - if: $NOPE\n\
             b:\n  script: x\n  rules:\n    - when: never\n\
             c:\n  script: x\n  when: never\n\
             d:\n  script: x\n",
        );
        assert_eq!(names(&p), ["d"]);
        assert_eq!(p.excluded, ["a", "b", "c"]);
    }

    #[test]
    fn a_rule_sets_allow_failure_variables_and_needs() {
        let p = parse_ok(
            "b:\n  stage: build\n  script: x\n\
             j:\n  variables: {V: job}\n  script: x\n  rules:\n\
             \x20   - allow_failure: {exit_codes: [3]}\n      variables: {V: rule}\n      needs: [b]\n",
        );
        let j = job(&p, "j");
        assert_eq!(j.allow_failure, AllowFailure::ExitCodes(vec![3]));
        assert_eq!(var(j, "V"), Some("rule"));
        assert_eq!(j.needs.as_deref(), Some(&["b".to_string()][..]));
    }

    #[test]
    fn changes_count_as_changed_with_a_warning() {
        let p = parse_ok("j:\n  script: x\n  rules:\n    - changes: [src/*]\n");
        assert_eq!(names(&p), ["j"]);
        assert!(
            p.warnings[0].contains("j.rules[0]: `rules: changes`"),
            "{:?}",
            p.warnings
        );
    }

    #[test]
    fn exists_asks_the_project_files() {
        let text = "j:\n  script: x\n  rules:\n    - exists: [Cargo.toml]\n\
                    k:\n  script: x\n  rules:\n    - exists: {paths: [$DIR/go.mod]}\n\
                    g:\n  script: x\n  rules:\n    - exists: ['**/*.rs']\n";
        let p = parse_files(text, &[("Cargo.toml", "")]).unwrap();
        assert_eq!(names(&p), ["j", "g"]);
        let mut c = ctx();
        c.extra_vars.push(("DIR".into(), "sub".into()));
        let p = parse_with(text, &c, &Options::default(), &[("sub/go.mod", "")]).unwrap();
        assert_eq!(names(&p), ["k", "g"]);
    }

    #[test]
    fn only_and_except_on_refs_and_variables() {
        let text = "on-main:\n  script: x\n  only: [main]\n\
                    on-dev:\n  script: x\n  only: [dev]\n\
                    regex:\n  script: x\n  only: ['/^ma/']\n\
                    tags:\n  script: x\n  only: [tags]\n\
                    not-main:\n  script: x\n  except: [main]\n\
                    branches:\n  script: x\n  only: [branches]\n\
                    var:\n  script: x\n  only: {variables: [$FLAG == \"1\"]}\n";
        let p = parse_ok(text);
        assert_eq!(names(&p), ["on-main", "regex", "branches"]);
        let mut c = ctx();
        c.branch = None;
        c.extra_vars.push(("FLAG".into(), "1".into()));
        // A detached checkout: a branch pipeline of no known branch.
        let p = parse_with(text, &c, &Options::default(), &[]).unwrap();
        assert_eq!(names(&p), ["not-main", "branches", "var"]);
    }

    #[test]
    fn only_and_except_follow_the_pipeline_kind_and_project() {
        let text = "default-only:\n  script: x\n\
                    tags:\n  script: x\n  only: [tags]\n\
                    release:\n  script: x\n  only: ['/^v\\d+/']\n\
                    mr:\n  script: x\n  only: [merge_requests]\n\
                    nightly:\n  script: x\n  only: [schedules]\n\
                    not-nightly:\n  script: x\n  except: [schedules]\n\
                    upstream:\n  script: x\n  only: ['main@group/proj', '/^v/@group/proj']\n";
        let run = |tag: Option<&str>, source: &str, remote: &str| {
            let mut c = ctx();
            c.tag = tag.map(String::from);
            c.remote_url = Some(remote.to_string());
            let opts = Options {
                pipeline_source: source.into(),
                ..Options::default()
            };
            let p = parse_with(text, &c, &opts, &[]).unwrap();
            (
                names(&p).iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                p.why_excluded,
            )
        };
        let up = "git@gitlab.com:group/proj.git";
        let (jobs, why) = run(None, "push", up);
        assert_eq!(jobs, ["default-only", "not-nightly", "upstream"]);
        assert_eq!(why["tags"], "only: [\"tags\"]");
        let (jobs, _) = run(None, "push", "git@gitlab.com:fork/proj.git");
        assert_eq!(jobs, ["default-only", "not-nightly"]);
        let (jobs, _) = run(Some("v1.0"), "push", up);
        assert_eq!(
            jobs,
            ["default-only", "tags", "release", "not-nightly", "upstream"]
        );
        let (jobs, why) = run(None, "merge_request_event", up);
        assert_eq!(jobs, ["mr"]);
        assert!(
            why["default-only"].starts_with("only: [branches, tags]"),
            "{why:?}"
        );
        let (jobs, why) = run(None, "schedule", up);
        assert_eq!(jobs, ["default-only", "nightly", "upstream"]);
        assert_eq!(why["not-nightly"], "except: [\"schedules\"]");
    }

    #[test]
    fn workflow_rules_exclude_the_pipeline_or_add_variables() {
        let p = parse_ok(
            "workflow:\n  rules:\n    - if: $CI_COMMIT_BRANCH == \"dev\"\n\
             a:\n  script: x\n.hidden:\n  script: x\n",
        );
        assert!(p.jobs.is_empty());
        assert_eq!(p.excluded, ["a"]);
        assert_eq!(
            p.warnings,
            [
                "`workflow: rules` exclude this pipeline (workflow.rules: no rule matched; \
              source push, ref main)"
            ]
        );
        assert_eq!(
            p.why_excluded["a"],
            "workflow: workflow.rules: no rule matched"
        );
        let p = parse_ok(
            "variables: {G: global}\n\
             workflow:\n  rules:\n    - if: $G == \"global\"\n      variables: {W: set}\n\
             a:\n  script: x\n",
        );
        assert_eq!(var(job(&p, "a"), "W"), Some("set"));
    }

    #[test]
    fn bad_rules_point_at_the_rule() {
        let e = parse_err("j:\n  script: x\n  when: sometimes\n");
        assert!(e.contains(":3:3: j.when: `when` must be"), "{e}");
        let e = parse_err("j:\n  script: x\n  rules:\n    - if: $A ==\n");
        assert!(e.contains(":4:7: j.rules[0].if:"), "{e}");
        let e = parse_err("j:\n  script: x\n  rules: {if: x}\n");
        assert!(e.contains("`rules` must be a list"), "{e}");
    }
}
