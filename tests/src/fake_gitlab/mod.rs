//! A fake GitLab for end-to-end tests of `kiln daemon`, as strict as
//! GitLab's own runner API (`lib/api/ci/runner.rb`,
//! `lib/api/ci/helpers/runner.rb` `authenticate_job!`,
//! `app/services/ci/append_build_trace_service.rb`,
//! `app/services/ci/update_build_state_service.rb`; see docs/gitlab.md):
//!
//! - runner tokens on verify, register and job requests (403 when wrong);
//! - job requests: 201 with a job (no `X-GitLab-Last-Update`), else 204 with
//!   `X-GitLab-Last-Update`; a request whose `last_update` is the current
//!   queue value gets 204 at once, as GitLab answers "nothing changed";
//! - job endpoints (`PUT /jobs/:id`, trace `PATCH`, artifact upload) answer
//!   403 for unknown jobs and wrong job tokens, and 403 with `Job-Status:
//!   <status>` ("Job is not running") for jobs that are not `running` or
//!   `canceling`;
//! - trace `PATCH`: 400 without `Content-Range`; the start must equal the
//!   stored length, else 416 with `Range: 0-<length>`; a patch past the
//!   trace size limit drops the job (`failed`, `trace_size_exceeded`) and
//!   answers 403. Stricter than GitLab, which only reads the start: a
//!   malformed range, an end other than `start + len - 1` or an empty body
//!   is answered 400 and recorded as a violation;
//! - `PUT /jobs/:id`: `state` must be `running`, `success` or `failed`
//!   (else 400); a failure reason GitLab does not know is recorded as a
//!   violation and stored as `unknown_failure`, as GitLab stores it; the
//!   final update of a `canceling` job makes it `canceled`; 412 when the
//!   checksum or size does not match the stored trace;
//! - artifact uploads only while the job runs; 413 past the size limit;
//! - a git repository over smart HTTP (`git http-backend` as CGI) behind
//!   basic auth `gitlab-ci-token:<job token>` of a running job; each fetch
//!   counts as a run of that job.
//!
//! Everything a runner sends for a job is recorded (every assignment,
//! request, final update and answer), so tests can check that a job was run
//! once and finalised once ([`FakeJob::check_consistent`]) even when the
//! fake hands a job out twice ([`Faults::duplicate_every`]).
//!
//! Faults: 500 before handling a request, or after handling it (a lost
//! acknowledgement); dropped connections; 202/412 answers to final updates;
//! a trace tail lost after it was acknowledged; artifact upload answers.
//!
//! The server runs on its own thread and runtime, so tests may block.
//!
//! Layout: this file holds the records tests read ([`FakeJob`] and its
//! consistency check, [`Upload`], [`JobRequest`], [`FinalUpdate`]) and
//! GitLab's failure reasons; `server.rs` the server ([`FakeGitlab`]: start,
//! stop, the shared state, what tests call); `api.rs` the runner API
//! handlers; `faults.rs` fault injection ([`Faults`] and the middleware);
//! `git.rs` the served repository ([`make_repo`]) and smart HTTP.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use serde_json::Value;

mod api;
mod faults;
mod git;
mod server;
#[cfg(test)]
mod tests;

pub use faults::Faults;
pub use git::make_repo;
pub use server::FakeGitlab;

/// GitLab's `failure_reason` enum (`Enums::Ci::CommitStatus`), which it
/// also sends as the job's `features.failure_reasons`. `job_canceled` and
/// `image_pull_failure` are not in it: gitlab-runner maps them.
pub const GITLAB_FAILURE_REASONS: &[&str] = &[
    "unknown_failure",
    "script_failure",
    "api_failure",
    "stuck_or_timeout_failure",
    "runner_system_failure",
    "missing_dependency_failure",
    "runner_unsupported",
    "stale_schedule",
    "job_execution_timeout",
    "archived_failure",
    "unmet_prerequisites",
    "scheduler_failure",
    "data_integrity_failure",
    "forward_deployment_failure",
    "user_blocked",
    "project_deleted",
    "ci_quota_exceeded",
    "pipeline_loop_detected",
    "no_matching_runner",
    "trace_size_exceeded",
    "builds_disabled",
    "environment_creation_failure",
    "deployment_rejected",
    "failed_outdated_deployment_job",
    "job_execution_server_timeout",
    "stuck_pending_with_matching_runners",
    "stuck_pending_no_matching_runners",
    "no_updates_running",
    "no_updates_canceling",
    "server_timeout_running",
    "server_timeout_canceling",
    "runner_configuration_error",
    "runner_external_dependency_failure",
    "runner_interrupted",
    "protected_environment_failure",
    "insufficient_bridge_permissions",
    "downstream_bridge_project_not_found",
    "invalid_bridge_trigger",
    "upstream_bridge_project_not_found",
    "insufficient_upstream_permissions",
    "bridge_pipeline_is_child_pipeline",
    "downstream_pipeline_creation_failed",
    "secrets_provider_not_found",
    "reached_max_descendant_pipelines_depth",
    "ip_restriction_failure",
    "reached_max_pipeline_hierarchy_size",
    "reached_downstream_pipeline_trigger_rate_limit",
    "duo_workflow_not_allowed",
    "job_router_failure",
    "job_token_expired",
    "id_token_burned_project_path",
    "downstream_project_trigger_resolved_to_empty",
];

#[derive(Debug, Clone)]
pub struct Upload {
    pub query: HashMap<String, String>,
    pub filename: String,
    pub data: Vec<u8>,
}

/// One request a runner made for a job, and the answer.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub at: Instant,
    /// `PATCH 0-99`, `PUT running`, `PUT failed`, `POST artifacts`.
    pub what: String,
    /// Body bytes (trace patches and uploads).
    pub bytes: usize,
    /// The answer the runner got (0: none, the connection was dropped).
    pub status: u16,
}

/// A final update (`PUT` with state `success` or `failed`) and its answer.
#[derive(Debug, Clone)]
pub struct FinalUpdate {
    pub body: Value,
    pub status: u16,
}

#[derive(Debug, Clone)]
pub struct FakeJob {
    pub id: u64,
    pub token: String,
    pub payload: Value,
    /// How many times the job was handed to a runner.
    pub assigned: u32,
    /// The number of the job request (1, 2, ...) of each hand-out.
    pub assignments: Vec<u32>,
    /// How many times a runner started it: authenticated git fetches
    /// (`GET info/refs`) with its token.
    pub runs: u32,
    /// `pending`, `running`, `canceling`, `canceled`, `success`, `failed`.
    pub status: String,
    /// As GitLab stored it (unknown reasons become `unknown_failure`).
    pub failure_reason: Option<String>,
    pub trace: Vec<u8>,
    /// Every final update received, accepted or not, in order.
    pub finals: Vec<FinalUpdate>,
    /// Every request to the job's endpoints, in order.
    pub requests: Vec<JobRequest>,
    /// What GitLab would refuse or silently change.
    pub violations: Vec<String>,
    pub artifacts: Vec<Upload>,
    /// Upload requests received (refused ones included).
    pub upload_attempts: u32,
    /// How many trace patches were answered 416.
    pub range_errors: u32,
    /// When a test set the status (`set_status`).
    pub status_set_at: Option<Instant>,
    final_202_left: u32,
    final_412_left: bool,
    lose_tail_left: bool,
    upload_answers_left: VecDeque<u16>,
}

impl FakeJob {
    pub fn trace_text(&self) -> String {
        String::from_utf8_lossy(&self.trace).to_string()
    }

    /// The accepted final update (answered 200), if any.
    pub fn accepted_final(&self) -> Option<&Value> {
        self.finals
            .iter()
            .find(|f| f.status == 200)
            .map(|f| &f.body)
    }

    /// The accepted final update.
    pub fn last_final(&self) -> &Value {
        self.accepted_final().expect("an accepted final update")
    }

    /// A runner's final update was accepted.
    pub fn done(&self) -> bool {
        self.accepted_final().is_some()
    }

    /// Requests that arrived after the job answered 403 once: a runner
    /// must stop sending when GitLab says the job is not running.
    pub fn requests_after_forbidden(&self) -> Vec<&JobRequest> {
        match self.requests.iter().position(|r| r.status == 403) {
            Some(i) => self.requests[i + 1..].iter().collect(),
            None => Vec::new(),
        }
    }

    /// Sizes of the trace patches accepted (202).
    pub fn patch_sizes(&self) -> Vec<usize> {
        self.requests
            .iter()
            .filter(|r| r.what.starts_with("PATCH") && r.status == 202)
            .map(|r| r.bytes)
            .collect()
    }

    /// The job was run once and finalised once, consistently:
    /// - started at most once (one git fetch), whatever the hand-outs;
    /// - exactly one final update accepted, and every other final update a
    ///   resend of the same outcome (a retry after a lost answer);
    /// - the accepted one reports the checksum and size of the stored trace;
    /// - nothing sent after a 403, no protocol violation, and the job token
    ///   never in the trace.
    pub fn check_consistent(&self) -> Result<(), String> {
        let id = self.id;
        if self.runs > 1 {
            return Err(format!(
                "job {id} was run {} times (handed out {} times)",
                self.runs, self.assigned
            ));
        }
        let accepted: Vec<&FinalUpdate> = self.finals.iter().filter(|f| f.status == 200).collect();
        if accepted.len() != 1 {
            return Err(format!(
                "job {id} has {} accepted final updates, not one: {:?}",
                accepted.len(),
                self.finals
            ));
        }
        let outcome = |v: &Value| {
            (
                v["state"].clone(),
                v["failure_reason"].clone(),
                v["exit_code"].clone(),
            )
        };
        let want = outcome(&accepted[0].body);
        if let Some(other) = self.finals.iter().find(|f| outcome(&f.body) != want) {
            return Err(format!(
                "job {id} was finalised with two outcomes: {} and {}",
                accepted[0].body, other.body
            ));
        }
        let f = &accepted[0].body;
        let sum = format!("crc32:{:08x}", crc32fast::hash(&self.trace));
        if f["output"]["checksum"].as_str() != Some(sum.as_str())
            || f["output"]["bytesize"].as_u64() != Some(self.trace.len() as u64)
        {
            return Err(format!(
                "job {id}: the final update reports {} but the trace is {sum}, {} bytes",
                f["output"],
                self.trace.len()
            ));
        }
        let late = self.requests_after_forbidden();
        if !late.is_empty() {
            return Err(format!("job {id}: requests after a 403: {late:?}"));
        }
        if !self.violations.is_empty() {
            return Err(format!(
                "job {id}: protocol violations: {:?}",
                self.violations
            ));
        }
        if self.trace_text().contains(&self.token) {
            return Err(format!("job {id}: the job token reached the trace"));
        }
        Ok(())
    }

    fn processing(&self) -> bool {
        matches!(self.status.as_str(), "running" | "canceling")
    }
}
