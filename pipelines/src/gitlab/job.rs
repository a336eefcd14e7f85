//! One job (one `parallel` instance of it) to a [`JobSpec`]: its stage,
//! variables, whether and when it runs, image, steps, timeout,
//! `allow_failure`, artifacts, caches and (raw) `needs`; and the rules for job
//! names.

use std::collections::{BTreeMap, HashMap};

use serde_yaml::{Mapping, Value};

use super::parallel::Instance;
use super::rules::Outcome;
use super::variables::{expand_capped, VarKey};
use super::Parser;
use crate::duration::parse_duration;
use crate::error::Result;
use crate::limits::{short, short_n};
use crate::spec::{AllowFailure, JobSource, JobSpec, JobWhen, Variable};
use crate::yaml::{key, scalar, strings, Seg};

impl Parser<'_> {
    /// The spec of instance `inst` of job `key_name` and its raw `needs`,
    /// or `None` when its rules exclude it (the reason goes to
    /// `why_excluded`).
    pub(super) fn job_spec(
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
        // Matrix values become part of the name: check it again.
        self.check_printable(&inst.name, &jp)?;
        let mut layers = self.job_layers(job, inst, &stage, global_vars, &at("variables"))?;
        let vars = self.resolve_job_vars(&layers, &at("variables"))?;
        let lookup: BTreeMap<String, String> = vars.iter().cloned().collect();
        let forced = self
            .opts
            .force_jobs
            .iter()
            .any(|f| f == &inst.name || f == key_name);
        let (when, rule_af, rule_vars, rule_needs, start_in) =
            match self.job_outcome(job, &lookup, &jp)? {
                Outcome::Included {
                    when,
                    allow_failure,
                    vars,
                    needs,
                    start_in,
                } => (when, allow_failure, vars, needs, start_in),
                Outcome::Excluded(why) if forced => {
                    self.warnings.push(format!(
                        "{}: excluded by {why}; kept because of --force",
                        inst.name
                    ));
                    (JobWhen::OnSuccess, None, Vec::new(), None, None)
                }
                Outcome::Excluded(why) => {
                    self.why_excluded.insert(inst.name.clone(), why);
                    return Ok(None);
                }
            };
        let vars = if rule_vars.is_empty() {
            vars
        } else {
            layers.extend(rule_vars.into_iter().map(|(k, v)| (VarKey(k, true), v)));
            self.resolve_job_vars(&layers, &at("variables"))?
        };
        let lookup: BTreeMap<String, String> = vars.iter().cloned().collect();
        let (image, entrypoint) = self.image(job, &at("image"), &lookup)?;
        let services = self.services(job, &at("services"), &lookup)?;
        let steps = self.steps(key_name, job)?;
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
        let cache = match job.get("cache") {
            None => Vec::new(),
            Some(v) => self.caches(v, &at("cache"), &lookup)?,
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
            cache,
            source: JobSource::LocalDir(self.ctx.project_dir.clone()),
            id: key_name.to_string(),
            stage: Some(stage),
            needs: None,
            when,
            allow_failure,
            condition: None,
            outputs: Vec::new(),
            needs_results: Vec::new(),
            start_in,
            services,
        };
        Ok(Some((spec, needs)))
    }

    /// The image (expanded with `vars`) and entrypoint of `image:` at
    /// `path`; [`Options::gitlab_default_image`](crate::Options) without one.
    fn image(
        &self,
        job: &Mapping,
        path: &[Seg],
        vars: &BTreeMap<String, String>,
    ) -> Result<(String, Option<Vec<String>>)> {
        let (image, entrypoint) = match job.get("image") {
            None => (self.opts.gitlab_default_image.clone(), None),
            Some(Value::String(s)) => (s.clone(), None),
            Some(Value::Mapping(m)) => {
                let name = m
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| self.err(path, "`image` needs a `name`"))?;
                let ep = match m.get("entrypoint") {
                    None => None,
                    Some(v) => {
                        let list = strings(v).ok_or_else(|| {
                            self.err(path, "`entrypoint` must be a list of strings")
                        })?;
                        // `entrypoint: [""]` clears the image's entrypoint.
                        Some(list.into_iter().filter(|s| !s.is_empty()).collect())
                    }
                };
                (name.to_string(), ep)
            }
            Some(_) => return Err(self.err(path, "`image` must be a string or mapping")),
        };
        let image = expand_capped(&image, vars, self.limits.max_script_bytes)
            .ok_or_else(|| self.limit(path, "`image` expands too far".into()))?;
        Ok((image, entrypoint))
    }

    /// A job name must be short and printable: it is shown in terminals and
    /// logs, and becomes part of directory names.
    pub(super) fn check_job_name(&self, name: &str, path: &[Seg]) -> Result<()> {
        if name.chars().count() > self.limits.max_job_name_chars {
            return Err(self.limit(
                path,
                format!(
                    "the job name is longer than {} characters (max_job_name_chars)",
                    self.limits.max_job_name_chars
                ),
            ));
        }
        self.check_printable(name, path)
    }

    /// A job name must not hold control characters.
    fn check_printable(&self, name: &str, path: &[Seg]) -> Result<()> {
        if name.chars().any(char::is_control) {
            return Err(self.err(
                path,
                format!("job name `{}` contains a control character", short(name)),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_util::{ctx, job, names, parse_err, parse_ok, parse_with};
    use super::*;
    use crate::context::Options;

    #[test]
    fn image_forms_and_expansion() {
        let p = parse_ok(
            "variables: {TAG: '3.12'}\n\
             plain:\n  image: python:$TAG\n  script: x\n\
             mapped:\n  image: {name: alpine, entrypoint: ['']}\n  script: x\n\
             entry:\n  image: {name: alpine, entrypoint: [sh, -c]}\n  script: x\n\
             none:\n  script: x\n",
        );
        assert_eq!(job(&p, "plain").image, "python:3.12");
        let mapped = job(&p, "mapped");
        assert_eq!(mapped.image, "alpine");
        assert_eq!(mapped.entrypoint, Some(vec![]));
        assert_eq!(
            job(&p, "entry").entrypoint,
            Some(vec!["sh".to_string(), "-c".to_string()])
        );
        assert_eq!(
            job(&p, "none").image,
            Options::default().gitlab_default_image
        );
        let e = parse_err("j:\n  script: x\n  image: {entrypoint: [a]}\n");
        assert!(e.contains(":3:3: j.image: `image` needs a `name`"), "{e}");
    }

    #[test]
    fn timeout_allow_failure_and_identity() {
        let p = parse_ok(
            "j:\n  stage: deploy\n  script: x\n  timeout: 1h 30m\n\
             \x20 allow_failure: {exit_codes: 42}\n",
        );
        let j = job(&p, "j");
        assert_eq!(j.timeout, Some(Duration::from_secs(90 * 60)));
        assert_eq!(j.allow_failure, AllowFailure::ExitCodes(vec![42]));
        assert_eq!((j.id.as_str(), j.stage.as_deref()), ("j", Some("deploy")));
        assert_eq!(j.working_dir.as_deref(), Some("/builds/demo"));
        let e = parse_err("j:\n  script: x\n  timeout: soon\n");
        assert!(
            e.contains(":3:3: j.timeout: `timeout` is not a duration"),
            "{e}"
        );
        let e = parse_err("j:\n  script: x\n  allow_failure: {exit_codes: [x]}\n");
        assert!(e.contains("must be integers"), "{e}");
    }

    #[test]
    fn the_stage_must_be_listed() {
        let e = parse_err("stages: [build]\nj:\n  stage: test\n  script: x\n");
        assert!(
            e.contains(":3:3: j.stage: stage `test` is not one of `stages`"),
            "{e}"
        );
    }

    #[test]
    fn job_names_are_bounded_and_printable() {
        let mut opts = Options::default();
        opts.limits.max_job_name_chars = 5;
        let e = parse_with("sixsix:\n  script: x\n", &ctx(), &opts, &[]).unwrap_err();
        assert!(e.to_string().contains("max_job_name_chars"), "{e}");
        let e = parse_err("\"a\\x1bb\":\n  script: x\n");
        assert!(e.contains("contains a control character"), "{e}");
        assert!(e.contains("a\\u{1b}b"), "{e}");
        let e = parse_err("t:\n  script: x\n  parallel:\n    matrix:\n      - {V: \"\\x07\"}\n");
        assert!(e.contains("contains a control character"), "{e}");
    }

    #[test]
    fn trigger_jobs_are_noted() {
        let p = parse_ok(
            "j:\n  script: x\n  services: [postgres]\n\
             down:\n  trigger: other/project\n",
        );
        assert_eq!(names(&p), ["j"]);
        assert_eq!(p.excluded, ["down"]);
        assert_eq!(p.warnings, ["down: trigger jobs are not run locally"]);
    }
}
