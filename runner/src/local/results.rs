//! How the jobs of a local run ended, for the jobs after them: GitHub's
//! `needs` context (`needs.<id>.result`, `needs.<id>.outputs`), the status
//! a job-level `if:` sees, and the run's closing summary.

use std::collections::{BTreeMap, HashMap};

use kiln_pipelines::github::{self, JobStatus};
use kiln_pipelines::{JobSpec, NeedResult};

/// How one job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Success,
    Failure,
    /// Failed, and its `allow_failure` (GitHub `continue-on-error`) allows it.
    AllowedFailure,
    Cancelled,
    Skipped,
}

impl Ended {
    /// `needs.<id>.result` as GitHub says it (`continue-on-error` makes a
    /// failed job's result `success`).
    pub fn result(self) -> &'static str {
        match self {
            Ended::Success | Ended::AllowedFailure => "success",
            Ended::Failure => "failure",
            Ended::Cancelled => "cancelled",
            Ended::Skipped => "skipped",
        }
    }

    fn status(self) -> JobStatus {
        match self {
            Ended::Success | Ended::AllowedFailure => JobStatus::Success,
            Ended::Failure => JobStatus::Failure,
            Ended::Cancelled => JobStatus::Cancelled,
            Ended::Skipped => JobStatus::Skipped,
        }
    }
}

/// The worse of two statuses for the jobs after them.
fn worse(a: JobStatus, b: JobStatus) -> JobStatus {
    let rank = |s| match s {
        JobStatus::Success => 0,
        JobStatus::Skipped => 1,
        JobStatus::Failure => 2,
        JobStatus::Cancelled => 3,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

/// A job that ended: how, its outputs, its id and (GitHub) the
/// reusable-workflow call it ran in (`stage`, `CALLER` or `OUTER / INNER`).
#[derive(Debug, Clone)]
struct Need {
    id: String,
    stage: Option<String>,
    ended: Ended,
    outputs: Vec<(String, String)>,
}

/// The key of `need` in the `needs` context of a job in `stage`: its own
/// job id inside the same called workflow (ids there are `CALLER / ID`),
/// else the id of the calling job it ran under, as GitHub shows a called
/// workflow as one job to the caller's other jobs. In that case also the
/// call's full path (`CALLER`, or `OUTER / INNER` seen from `OUTER`), the
/// key of [`kiln_pipelines::Pipeline::call_outputs`].
fn needs_key(need: &Need, stage: Option<&str>) -> (String, Option<String>) {
    match (&need.stage, stage) {
        (Some(s), Some(c)) if s == c => (
            need.id
                .strip_prefix(&format!("{c} / "))
                .unwrap_or(&need.id)
                .to_string(),
            None,
        ),
        (None, _) => (need.id.clone(), None),
        (Some(s), c) => {
            let inside = c.filter(|c| s.starts_with(&format!("{c} / ")));
            let rel = inside.map_or(s.as_str(), |c| &s[c.len() + 3..]);
            let key = rel.split(" / ").next().unwrap_or(rel).to_string();
            let path = match inside {
                Some(c) => format!("{c} / {key}"),
                None => key.clone(),
            };
            (key, Some(path))
        }
    }
}

/// The jobs that ended so far, in order.
#[derive(Default)]
pub struct Results {
    /// Job name to how it ended, its outputs and its key in the `needs`
    /// context of a job in the same workflow (see [`needs_key`]).
    ended: HashMap<String, Need>,
    /// Job name to the status of its whole chain of `needs` and itself.
    chain: HashMap<String, JobStatus>,
    /// Names in the order they ended, with a word on how.
    order: Vec<(String, Ended)>,
    /// GitHub: a job that called a reusable workflow to that workflow's
    /// `on.workflow_call.outputs`.
    call_outputs: BTreeMap<String, Vec<(String, String)>>,
}

impl Results {
    /// The status `job`'s `if:` sees: how every job up its chain of
    /// `needs` ended (GitHub skips a job whose needs' needs failed even if
    /// its own needs ran with `always()`).
    pub fn status_for(&self, job: &JobSpec) -> JobStatus {
        job.needs
            .iter()
            .flatten()
            .filter_map(|n| self.chain.get(n))
            .fold(JobStatus::Success, |a, s| worse(a, *s))
    }

    /// `job`'s `needs` context: one entry per job id it needs (matrix
    /// instances together: failure if one failed, else cancelled, else
    /// skipped; outputs of the last instance that set them).
    /// A need that is a called workflow has that workflow's
    /// `on.workflow_call.outputs` as its outputs, evaluated with its jobs.
    pub fn needs_of(&self, job: &JobSpec) -> Vec<NeedResult> {
        let names: Vec<&String> = job.needs.iter().flatten().collect();
        self.needs_among(&names, job.stage.as_deref())
    }

    /// The results for the jobs in `names`, seen from a job in `stage`.
    fn needs_among(&self, names: &[&String], stage: Option<&str>) -> Vec<NeedResult> {
        let mut out: Vec<NeedResult> = Vec::new();
        let mut calls: Vec<(usize, String)> = Vec::new();
        for name in names {
            let Some(need) = self.ended.get(*name) else {
                continue;
            };
            let (ended, outputs) = (&need.ended, &need.outputs);
            let (id, call) = needs_key(need, stage);
            let id = &id;
            let at = match out.iter().position(|n| &n.id == id) {
                Some(i) => i,
                None => {
                    out.push(NeedResult {
                        id: id.clone(),
                        result: "success".into(),
                        outputs: Vec::new(),
                    });
                    out.len() - 1
                }
            };
            let n = &mut out[at];
            let rank = |r: &str| match r {
                "failure" => 3,
                "cancelled" => 2,
                "skipped" => 1,
                _ => 0,
            };
            if rank(ended.result()) > rank(&n.result) {
                n.result = ended.result().to_string();
            }
            if !outputs.is_empty() {
                n.outputs = outputs.clone();
            }
            if let Some(path) = call {
                if !calls.iter().any(|(i, _)| *i == at) {
                    calls.push((at, path));
                }
            }
        }
        for (at, path) in calls {
            let Some(declared) = self.call_outputs.get(&path) else {
                continue;
            };
            let inside = format!("{path} / ");
            let names: Vec<&String> = self
                .order
                .iter()
                .map(|(n, _)| n)
                .filter(|n| {
                    self.ended
                        .get(*n)
                        .and_then(|e| e.stage.as_deref())
                        .is_some_and(|s| s == path || s.starts_with(&inside))
                })
                .collect();
            let jobs = self.needs_among(&names, Some(&path));
            let (outputs, errors) =
                github::call_outputs(declared, &jobs, github::ExprLimits::default());
            for e in errors {
                eprintln!("kiln: note: {path}: {e}");
            }
            out[at].outputs = outputs;
        }
        out
    }

    /// The results of a GitHub run whose reusable-workflow calls have
    /// these `on.workflow_call.outputs` (by caller).
    pub fn with_call_outputs(call_outputs: BTreeMap<String, Vec<(String, String)>>) -> Self {
        Results {
            call_outputs,
            ..Results::default()
        }
    }

    /// Records how `job` ended.
    pub fn record(&mut self, job: &JobSpec, ended: Ended, outputs: Vec<(String, String)>) {
        let chain = worse(self.status_for(job), ended.status());
        self.chain.insert(job.name.clone(), chain);
        let need = Need {
            id: job.id.clone(),
            stage: job.stage.clone(),
            ended,
            outputs,
        };
        self.ended.insert(job.name.clone(), need);
        self.order.push((job.name.clone(), ended));
    }

    /// How many jobs ended (skipped ones included).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// One line on how each job ended, for the end of a run of several.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .order
            .iter()
            .map(|(name, e)| {
                let how = match e {
                    Ended::Success => "passed",
                    Ended::Failure => "failed",
                    Ended::AllowedFailure => "failed (allowed to fail)",
                    Ended::Cancelled => "canceled",
                    Ended::Skipped => "skipped",
                };
                format!("{name}: {how}")
            })
            .collect();
        parts.join(" · ")
    }

    /// Whether only jobs allowed to fail failed (GitLab: "passed with
    /// warnings").
    pub fn with_warnings(&self) -> bool {
        self.order.iter().any(|(_, e)| *e == Ended::AllowedFailure)
            && !self
                .order
                .iter()
                .any(|(_, e)| matches!(e, Ended::Failure | Ended::Cancelled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_pipelines::Step;

    fn job(name: &str, id: &str, needs: &[&str]) -> JobSpec {
        let mut j = JobSpec::single(name, "img", Step::script("s", "true"));
        j.id = id.into();
        j.needs = Some(needs.iter().map(|n| n.to_string()).collect());
        j
    }

    #[test]
    fn a_failure_reaches_every_job_down_the_chain() {
        let mut r = Results::default();
        let a = job("a", "a", &[]);
        let b = job("b", "b", &["a"]);
        let c = job("c", "c", &["b"]);
        assert_eq!(r.status_for(&a), JobStatus::Success);
        r.record(&a, Ended::Failure, vec![]);
        assert_eq!(r.status_for(&b), JobStatus::Failure);
        // b ran anyway (`if: always()`) and passed; c still sees the failure.
        r.record(&b, Ended::Success, vec![]);
        assert_eq!(r.status_for(&c), JobStatus::Failure);
        let mut r = Results::default();
        r.record(&a, Ended::Skipped, vec![]);
        assert_eq!(r.status_for(&b), JobStatus::Skipped);
        r.record(&a, Ended::AllowedFailure, vec![]);
        assert_eq!(r.status_for(&b), JobStatus::Success);
    }

    #[test]
    fn needs_context_groups_matrix_instances_by_id() {
        let mut r = Results::default();
        let x1 = job("build (1)", "build", &[]);
        let x2 = job("build (2)", "build", &[]);
        let d = job("deploy", "deploy", &["build (1)", "build (2)"]);
        r.record(&x1, Ended::Success, vec![("v".into(), "1".into())]);
        r.record(&x2, Ended::Failure, vec![]);
        let needs = r.needs_of(&d);
        assert_eq!(needs.len(), 1);
        assert_eq!(needs[0].id, "build");
        assert_eq!(needs[0].result, "failure");
        assert_eq!(needs[0].outputs, vec![("v".to_string(), "1".to_string())]);
        assert_eq!(r.summary(), "build (1): passed · build (2): failed");
        assert!(!r.with_warnings());
    }

    #[test]
    fn a_called_workflow_is_one_need_outside_and_its_own_ids_inside() {
        let mut r = Results::default();
        let mut build = job("call / build", "call / build", &[]);
        build.stage = Some("call".into());
        let mut test = job("call / test", "call / test", &["call / build"]);
        test.stage = Some("call".into());
        let after = job("after", "after", &["call / build", "call / test"]);
        r.record(&build, Ended::Success, vec![("o".into(), "1".into())]);
        let inner = r.needs_of(&test);
        assert_eq!(inner[0].id, "build");
        r.record(&test, Ended::Failure, vec![]);
        let outer = r.needs_of(&after);
        assert_eq!(outer.len(), 1);
        assert_eq!(
            (outer[0].id.as_str(), outer[0].result.as_str()),
            ("call", "failure")
        );
        let n = Need {
            id: "a / b / j".into(),
            stage: Some("a / b".into()),
            ended: Ended::Success,
            outputs: Vec::new(),
        };
        assert_eq!(needs_key(&n, None), ("a".into(), Some("a".into())));
        assert_eq!(needs_key(&n, Some("a")), ("b".into(), Some("a / b".into())));
        assert_eq!(needs_key(&n, Some("a / b")), ("j".into(), None));
    }

    #[test]
    fn only_allowed_failures_pass_with_warnings() {
        let mut r = Results::default();
        r.record(&job("a", "a", &[]), Ended::AllowedFailure, vec![]);
        r.record(&job("b", "b", &[]), Ended::Success, vec![]);
        assert!(r.with_warnings());
        assert_eq!(r.summary(), "a: failed (allowed to fail) · b: passed");
    }

    #[test]
    fn a_called_workflow_gives_its_declared_outputs_to_the_caller() {
        // `on.workflow_call.outputs.version.value: ${{ jobs.build.outputs.v }}`
        let mut outputs = BTreeMap::new();
        outputs.insert(
            "call".to_string(),
            vec![
                (
                    "version".to_string(),
                    "${{ jobs.build.outputs.v }}".to_string(),
                ),
                (
                    "how".to_string(),
                    "${{ jobs.build.result }}/${{ jobs.inner.outputs.deep }}".to_string(),
                ),
            ],
        );
        outputs.insert(
            "call / inner".to_string(),
            vec![("deep".to_string(), "${{ jobs.leaf.outputs.x }}".to_string())],
        );
        let mut r = Results::with_call_outputs(outputs);
        let mut build = job("call / build", "call / build", &[]);
        build.stage = Some("call".into());
        let mut leaf = job("call / inner / leaf", "call / inner / leaf", &[]);
        leaf.stage = Some("call / inner".into());
        let after = job("after", "after", &["call / build", "call / inner / leaf"]);
        r.record(
            &build,
            Ended::Success,
            vec![("v".into(), "1.2.3".into()), ("other".into(), "x".into())],
        );
        r.record(
            &leaf,
            Ended::Success,
            vec![("x".into(), "deep-value".into())],
        );
        let needs = r.needs_of(&after);
        assert_eq!(needs.len(), 1);
        assert_eq!(needs[0].id, "call");
        // Only the declared outputs: the jobs' own outputs stay inside.
        assert_eq!(
            needs[0].outputs,
            [
                ("version".to_string(), "1.2.3".to_string()),
                ("how".to_string(), "success/deep-value".to_string()),
            ]
        );
    }
}
