//! What a job ended with: [`JobResult`] and [`FailureReason`] (GitLab's
//! terms), how the steps' ends and the executor's errors map onto them, and
//! how failures are said ([`error_chain`], [`human_bytes`]).

use std::path::PathBuf;

use kiln_agent::proto;
use kiln_pipelines::JobSpec;
use serde::Serialize;

/// Why a job did not succeed, in the terms CI providers use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum FailureReason {
    /// A step exited non-zero.
    ScriptFailure,
    /// The job (or a step) ran past its timeout.
    JobExecutionTimeout,
    /// The image could not be found, pulled or converted.
    ImagePullFailure(String),
    /// kiln, the VM or the agent failed: not the job's fault.
    RunnerSystemFailure(String),
    /// Canceled by the user or the provider.
    Canceled,
}

/// The outcome of one job.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    /// The job's exit code: that of the first failing step, 0 on success.
    /// System failures use 1 unless a step already failed.
    pub exit_code: i32,
    pub failure: Option<FailureReason>,
    pub image: String,
    pub backend: String,
    /// Time to prepare the image, kernel and disks.
    pub prepare_ms: u64,
    /// From starting the VM to the agent's `Ready`.
    pub boot_ms: u64,
    /// The guest kernel's uptime when the agent was ready.
    pub guest_boot_ms: u64,
    /// From `Start` to `Done`.
    pub run_ms: u64,
    pub steps: Vec<proto::StepEnd>,
    /// Where the serial log was kept (system failures only).
    pub debug_log: Option<PathBuf>,
    /// GitHub: the job's `outputs:`, evaluated after its steps.
    pub outputs: Vec<(String, String)>,
    /// Where the time from starting the VM to the agent's `Ready` went
    /// (snapshot lookup, restore, the VMM process's own steps, `Resume`, or
    /// the cold boot), in order; see [`JobResult::describe_boot`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub boot_phases: Vec<BootPhase>,
}

/// One timed part of a job's VM start.
#[derive(Debug, Clone, Serialize)]
pub struct BootPhase {
    pub name: String,
    pub ms: f64,
}

impl BootPhase {
    /// Phase `name`, from `since` until now.
    pub fn since(name: impl Into<String>, since: std::time::Instant) -> BootPhase {
        BootPhase {
            name: name.into(),
            ms: since.elapsed().as_secs_f64() * 1e3,
        }
    }
}

impl JobResult {
    /// A job on `image` that has not ended yet (exit code 1 until it has).
    pub(super) fn pending(image: &str) -> JobResult {
        JobResult {
            exit_code: 1,
            failure: None,
            image: image.to_string(),
            backend: String::new(),
            prepare_ms: 0,
            boot_ms: 0,
            guest_boot_ms: 0,
            run_ms: 0,
            steps: Vec::new(),
            debug_log: None,
            outputs: Vec::new(),
            boot_phases: Vec::new(),
        }
    }

    /// The boot phases as `name 1.2 ms, ...`.
    pub fn describe_boot(&self) -> String {
        self.boot_phases
            .iter()
            .map(|p| format!("{} {:.1} ms", p.name, p.ms))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn success(&self) -> bool {
        self.failure.is_none()
    }

    /// One line for the terminal.
    pub fn summary(&self) -> String {
        self.summary_allowing(&kiln_pipelines::AllowFailure::No)
    }

    /// [`JobResult::summary`] for a job whose failure `allowed` may allow
    /// (GitLab `allow_failure`, GitHub `continue-on-error`): such a failure
    /// says "failed (allowed to fail)".
    pub fn summary_allowing(&self, allowed: &kiln_pipelines::AllowFailure) -> String {
        let outcome = match &self.failure {
            None => "succeeded".to_string(),
            Some(FailureReason::ScriptFailure) if allowed.allows(self.exit_code) => {
                format!("failed (allowed to fail; exit code {})", self.exit_code)
            }
            Some(FailureReason::ScriptFailure) => format!("failed (exit code {})", self.exit_code),
            Some(FailureReason::JobExecutionTimeout) => "failed: timed out".to_string(),
            Some(FailureReason::ImagePullFailure(m)) => format!("failed: image: {m}"),
            Some(FailureReason::RunnerSystemFailure(m)) => format!("failed: system failure: {m}"),
            Some(FailureReason::Canceled) => "canceled".to_string(),
        };
        format!(
            "job {outcome} · image {} · boot {:.2}s · run {:.2}s · {}",
            self.image,
            self.boot_ms as f64 / 1000.0,
            self.run_ms as f64 / 1000.0,
            self.backend
        )
    }

    /// Work out the job's exit code and failure from its steps: the first
    /// failing step that may not fail decides; a cancel wins over it.
    pub(super) fn settle(&mut self, job: &JobSpec, canceled: bool) {
        let failing = self.steps.iter().find(|e| {
            !e.skipped
                && e.exit_code != 0
                && !job
                    .steps
                    .get(e.step as usize)
                    .is_some_and(|s| s.allow_failure)
        });
        self.exit_code = failing.map(|e| e.exit_code).unwrap_or(0);
        self.failure = if canceled {
            Some(FailureReason::Canceled)
        } else if failing.is_some_and(|e| e.timed_out) {
            Some(FailureReason::JobExecutionTimeout)
        } else if failing.is_some() {
            Some(FailureReason::ScriptFailure)
        } else {
            None
        };
    }
}

/// A failure that ends the job early: the reason reported, and a message for
/// the debug log.
pub(super) type Early = (FailureReason, String);

/// kiln, the VM or the agent failed.
pub(super) fn sys(m: String) -> Early {
    (FailureReason::RunnerSystemFailure(m.clone()), m)
}

/// The guest broke the protocol. The agent never does, but a job running
/// as root can write to the agent's port: the job cannot go on, and the
/// message says why in one short line.
pub(super) fn protocol(detail: String) -> Early {
    sys(format!(
        "protocol error from the guest: {detail} (a job running as root can write to the agent's port)"
    ))
}

/// `n` bytes for people: "512 bytes", "3.0 MiB", "4.0 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `err` and its sources, joined with ": ".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_pipelines::Step;

    fn end(step: u32, exit_code: i32, timed_out: bool) -> proto::StepEnd {
        proto::StepEnd {
            step,
            exit_code,
            duration_ms: 1,
            timed_out,
            canceled: false,
            skipped: false,
            files: None,
        }
    }

    #[test]
    fn the_first_failing_step_that_may_not_fail_decides() {
        let mut job = JobSpec::single("j", "img", Step::script("a", "x"));
        job.steps[0].allow_failure = true;
        job.steps.push(Step::script("b", "x"));
        job.steps.push(Step::script("c", "x"));
        let mut r = JobResult::pending("img");
        r.steps = vec![end(0, 3, false), end(1, 0, false), end(2, 7, true)];
        r.settle(&job, false);
        assert_eq!(
            (r.exit_code, r.failure.clone()),
            (7, Some(FailureReason::JobExecutionTimeout))
        );
        r.steps[2].timed_out = false;
        r.settle(&job, false);
        assert_eq!(r.failure, Some(FailureReason::ScriptFailure));
        r.settle(&job, true);
        assert_eq!(r.failure, Some(FailureReason::Canceled));
        r.steps.truncate(2);
        r.settle(&job, false);
        assert_eq!((r.exit_code, r.failure.clone()), (0, None));
        assert!(r.success());
    }

    #[test]
    fn sizes_read_for_people() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(786432), "768.0 KiB");
        assert_eq!(human_bytes(4 << 30), "4.0 GiB");
    }
}
