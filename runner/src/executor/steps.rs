//! The step runtime: which step runs (its `when`, earlier failures, a
//! cancel, a GitHub `if:`), what it runs with (the job's environment,
//! `GITHUB_ENV`/`GITHUB_PATH` updates from earlier steps, `${{ }}`
//! substitutions, `CI_JOB_STATUS`), and what it leaves for the next
//! (`StepState`: failures, outputs, `steps.<id>` contexts).

use kiln_agent::proto::{self, Frame, Start, StepEnd, StepSpec, Stream};
use kiln_images::rootfs::Rootfs;
use kiln_pipelines::github::{self, Contexts, ExprValue, JobStatus};
use kiln_pipelines::{JobSpec, Shell, Step, StepWhen};

use super::conversation::Conversation;
use super::outcome::{human_bytes, sys, Early};
use super::workflow::CommandSink;
use crate::joblog::JobSink;

/// Run `job`'s steps one at a time over `io`, starting from the `Start`
/// environment `start_env`; each step's end goes to `sink` and `ends`. Stops
/// early only for a hard cancel; a graceful one runs the `Always` steps.
pub(super) async fn run_steps(
    io: &mut Conversation<'_>,
    job: &JobSpec,
    start_env: &[(String, String)],
    sink: &mut dyn JobSink,
    ends: &mut Vec<StepEnd>,
) -> Result<Vec<(String, String)>, Early> {
    let mut state = StepState::new(job, start_env);
    for (i, step) in job.steps.iter().enumerate() {
        let index = i as u32;
        if io.cancel_state() == Some(false) {
            break;
        }
        let (end, outputs) = match state.should_run(step, io.cancel_state()) {
            Err(message) => {
                // A condition that cannot be evaluated fails the step.
                sink.output(
                    index,
                    Stream::Stderr,
                    format!("kiln: step '{}': {message}\n", step.name).as_bytes(),
                );
                (not_run(index, 1, false), Vec::new())
            }
            Ok(false) => (not_run(index, 0, true), Vec::new()),
            Ok(true) => {
                let spec = state
                    .spec(index, step, io.cancel_state().is_some())
                    .map_err(|m| sys(format!("step '{}': {m}", step.name)))?;
                let frame = Frame::RunStep(spec);
                if let Err(proto::ProtoError::TooLarge(n)) = frame.to_bytes() {
                    // The job's doing (its variables, or GITHUB_ENV grown
                    // step by step): the step fails, kiln does not.
                    let line = format!(
                        "kiln: step '{}' cannot be sent to the guest: its script and environment take {}, more than the {} one frame holds (did GITHUB_ENV grow too large?)\n",
                        step.name,
                        human_bytes(n as u64),
                        human_bytes(proto::MAX_FRAME as u64)
                    );
                    sink.output(index, Stream::Stderr, line.as_bytes());
                    (not_run(index, 1, false), Vec::new())
                } else {
                    let mut warnings = Vec::new();
                    let (end, mut outputs) = if state.file_commands {
                        // GitHub: workflow commands on the output are applied.
                        let mut cmds = CommandSink::new(&mut *sink);
                        let end = io.run_step(index, &frame, job, &mut cmds).await;
                        let (outputs, notes) = cmds.finish(index);
                        warnings.extend(notes);
                        (end?, outputs)
                    } else {
                        (io.run_step(index, &frame, job, sink).await?, Vec::new())
                    };
                    outputs.extend(state.apply_files(&end, &mut warnings));
                    for w in warnings {
                        // Parse errors may quote the guest's files.
                        let w = proto::quote(w.as_bytes(), 2 * proto::QUOTE_MAX);
                        sink.output(index, Stream::Stderr, format!("kiln: {w}\n").as_bytes());
                    }
                    (end, outputs)
                }
            }
        };
        state.record(step, &end, &outputs);
        sink.step_end(&step.name, &end);
        ends.push(end);
    }
    let last = job.steps.len().saturating_sub(1) as u32;
    Ok(state.job_outputs(job, io.cancel_state(), |m| {
        sink.output(last, Stream::Stderr, format!("kiln: {m}\n").as_bytes())
    }))
}

/// Most bytes a job's `outputs:` may take in all (GitHub: 1 MB per job).
pub const MAX_JOB_OUTPUTS: usize = 1024 * 1024;

/// The record of a step that did not run: skipped, or failed before it
/// could start (e.g. its condition could not be evaluated).
fn not_run(step: u32, exit_code: i32, skipped: bool) -> StepEnd {
    StepEnd {
        step,
        exit_code,
        duration_ms: 0,
        timed_out: false,
        canceled: false,
        skipped,
        files: None,
    }
}

/// What carries from one step to the next: failures, file-command updates,
/// and the expression contexts (GitHub `steps.*.outputs`, `env`).
struct StepState {
    failed: bool,
    env: Vec<(String, String)>,
    path_adds: Vec<String>,
    contexts: Contexts,
    /// Give steps `GITHUB_ENV`/`GITHUB_OUTPUT`/`GITHUB_PATH` (GitHub jobs).
    file_commands: bool,
}

impl StepState {
    fn new(job: &JobSpec, start_env: &[(String, String)]) -> StepState {
        let file_commands = job
            .variables
            .iter()
            .any(|v| v.key == "GITHUB_ACTIONS" && v.value == "true");
        let mut s = StepState {
            failed: false,
            env: start_env.to_vec(),
            path_adds: Vec::new(),
            contexts: Contexts::default(),
            file_commands,
        };
        if file_commands {
            s.contexts.set_needs(&job.needs_results);
        }
        s.refresh_env_context();
        s
    }

    /// The job's `outputs:` (GitHub), evaluated now that the steps ran;
    /// one that cannot be evaluated, or past [`MAX_JOB_OUTPUTS`], is left
    /// out and said with `note`.
    fn job_outputs(
        &mut self,
        job: &JobSpec,
        cancel: Option<bool>,
        mut note: impl FnMut(String),
    ) -> Vec<(String, String)> {
        self.contexts.status = Some(self.status(cancel));
        self.contexts.partial = false;
        self.refresh_env_context();
        let mut out = Vec::new();
        let mut total = 0usize;
        for (name, text) in &job.outputs {
            match github::substitute(text, &self.contexts) {
                Ok(v) if total + name.len() + v.len() > MAX_JOB_OUTPUTS => {
                    note(format!(
                        "job output '{name}' left out: the job's outputs take more than {}",
                        human_bytes(MAX_JOB_OUTPUTS as u64)
                    ));
                }
                Ok(v) => {
                    total += name.len() + v.len();
                    out.push((name.clone(), v));
                }
                Err(e) => note(format!("job output '{name}': {e}")),
            }
        }
        out
    }

    fn status(&self, cancel: Option<bool>) -> JobStatus {
        if cancel.is_some() {
            JobStatus::Cancelled
        } else if self.failed {
            JobStatus::Failure
        } else {
            JobStatus::Success
        }
    }

    fn refresh_env_context(&mut self) {
        self.contexts
            .set("env", ExprValue::object(self.env.iter().cloned()));
    }

    /// Whether `step` runs, given earlier failures, a cancel, its `when` and
    /// its condition (GitHub `if:`).
    fn should_run(&mut self, step: &Step, cancel: Option<bool>) -> Result<bool, String> {
        let by_when = match cancel {
            Some(_) => step.when == StepWhen::Always,
            None => match step.when {
                StepWhen::OnSuccess => !self.failed,
                StepWhen::OnFailure => self.failed,
                StepWhen::Always => true,
            },
        };
        let Some(cond) = &step.condition else {
            return Ok(by_when);
        };
        self.contexts.status = Some(self.status(cancel));
        self.refresh_env_context();
        // GitHub: an `if:` replaces the implicit success() unless it names a
        // status function itself; `eval_condition` adds it when absent.
        if cancel.is_some() && !cond.contains("always()") && !cond.contains("cancelled()") {
            return Ok(false);
        }
        github::eval_condition(cond, &self.contexts).map_err(|e| format!("if: {e}"))
    }

    /// The agent's spec for `step`: environment with file-command updates,
    /// runtime `${{ }}` expressions substituted.
    fn spec(&mut self, index: u32, step: &Step, canceled: bool) -> Result<StepSpec, String> {
        let mut env = self.env.clone();
        // GitLab: CI_JOB_STATUS is `running` in the script and the job's
        // outcome in after_script (the steps that run whatever happened).
        if env
            .iter()
            .any(|(k, _)| k == "GITLAB_CI" || k == "CI_JOB_STATUS")
        {
            let status = if step.when != StepWhen::Always {
                "running"
            } else if canceled {
                "canceled"
            } else if self.failed {
                "failed"
            } else {
                "success"
            };
            env.retain(|(k, _)| k != "CI_JOB_STATUS");
            env.push(("CI_JOB_STATUS".into(), status.into()));
        }
        for (k, v) in &step.env {
            env.retain(|(key, _)| key != k);
            env.push((k.clone(), v.clone()));
        }
        let mut script = step.script.clone();
        if step.runtime_expressions {
            self.refresh_env_context();
            self.contexts.partial = false;
            script = github::substitute(&script, &self.contexts).map_err(|e| e.to_string())?;
            for (_, v) in env.iter_mut() {
                *v = github::substitute(v, &self.contexts).map_err(|e| e.to_string())?;
            }
        }
        if !self.path_adds.is_empty() {
            let current = env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let path = github::prepend_path(&current, &self.path_adds);
            env.retain(|(k, _)| k != "PATH");
            env.push(("PATH".into(), path));
        }
        let (argv, script) = match &step.shell {
            Shell::Sh => (vec!["sh".into(), "-e".into(), "{script}".into()], script),
            Shell::Bash => (
                [
                    "bash",
                    "--noprofile",
                    "--norc",
                    "-eo",
                    "pipefail",
                    "{script}",
                ]
                .map(String::from)
                .to_vec(),
                script,
            ),
            Shell::Custom(args) => (
                args.iter().map(|a| a.replace("{0}", "{script}")).collect(),
                script,
            ),
            Shell::Exec(argv) => (argv.clone(), String::new()),
        };
        Ok(StepSpec {
            index,
            name: step.name.clone(),
            argv,
            script,
            env,
            workdir: step.working_dir.clone().unwrap_or_default(),
            timeout_ms: step.timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
            file_commands: self.file_commands,
        })
    }

    /// Apply a step's file commands; returns its outputs.
    fn apply_files(&mut self, end: &StepEnd, warnings: &mut Vec<String>) -> Vec<(String, String)> {
        let Some(files) = &end.files else {
            return Vec::new();
        };
        // The agent cuts each file at MAX_FILE_COMMANDS; a forged StepEnd
        // may not have: the host holds to the same bound.
        let cut = |s: &'_ str| -> (String, bool) {
            let mut i = s.len().min(proto::MAX_FILE_COMMANDS);
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            (s[..i].to_string(), i < s.len())
        };
        let (env, e_cut) = cut(&files.env);
        let (output, o_cut) = cut(&files.output);
        let (path, p_cut) = cut(&files.path);
        if files.truncated || e_cut || o_cut || p_cut {
            warnings.push(
                "a GITHUB_ENV/GITHUB_OUTPUT/GITHUB_PATH file was over 256 KiB and was cut".into(),
            );
        }
        match github::parse_env_file(&env) {
            Ok(vars) => {
                for (k, v) in vars {
                    self.env.retain(|(key, _)| key != &k);
                    self.env.push((k, v));
                }
            }
            Err(e) => warnings.push(format!("GITHUB_ENV: {e}")),
        }
        self.path_adds.splice(0..0, github::parse_path_file(&path));
        match github::parse_file_commands(&output) {
            Ok(o) => o,
            Err(e) => {
                warnings.push(format!("GITHUB_OUTPUT: {e}"));
                Vec::new()
            }
        }
    }

    /// Record how a step went, for later `when` and `steps.<id>` lookups.
    fn record(&mut self, step: &Step, end: &StepEnd, outputs: &[(String, String)]) {
        let ok = end.exit_code == 0;
        if !end.skipped && !ok && !step.allow_failure {
            self.failed = true;
        }
        if let Some(id) = &step.id {
            let outcome = if end.skipped {
                "skipped"
            } else if end.canceled {
                "cancelled"
            } else if ok {
                "success"
            } else {
                "failure"
            };
            let conclusion = if !ok && !end.skipped && step.allow_failure {
                "success"
            } else {
                outcome
            };
            self.contexts.set_step(id, outcome, conclusion, outputs);
        }
    }
}

/// The agent's `Start` for a job on an image: image Env, then the job's
/// variables; the job's working directory, else the image's, else `/`.
pub fn build_start(job: &JobSpec, rootfs: &Rootfs) -> Start {
    let mut env: Vec<(String, String)> = rootfs
        .config
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    for v in &job.variables {
        env.retain(|(k, _)| k != &v.key);
        env.push((v.key.clone(), v.value.clone()));
    }
    let workdir = job
        .working_dir
        .clone()
        .filter(|w| !w.is_empty())
        .or_else(|| Some(rootfs.config.working_dir.clone()).filter(|w| !w.is_empty()))
        .unwrap_or_else(|| "/".into());
    Start {
        env,
        workdir,
        user: rootfs.config.user.clone(),
        network: None,
        services: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_images::ImageConfig;
    use kiln_pipelines::Variable;
    use std::time::Duration;

    fn rootfs() -> Rootfs {
        Rootfs {
            image: "/x".into(),
            fstype: "ext4".into(),
            chain_id: "sha256:0".into(),
            config: ImageConfig {
                env: vec!["PATH=/bin".into(), "A=image".into(), "B=image".into()],
                working_dir: "/srv".into(),
                user: "1000".into(),
                ..Default::default()
            },
            source: "x".into(),
        }
    }

    #[test]
    fn job_variables_override_image_env_and_image_defaults_apply() {
        let mut job = JobSpec::single("j", "img", Step::script("s", "echo hi"));
        job.variables.push(Variable::new("A", "job"));
        let s = build_start(&job, &rootfs());
        assert_eq!(
            s.env,
            vec![
                ("PATH".into(), "/bin".into()),
                ("B".into(), "image".into()),
                ("A".into(), "job".into())
            ]
        );
        assert_eq!(s.workdir, "/srv");
        assert_eq!(s.user, "1000");
        let spec = StepState::new(&job, &s.env)
            .spec(0, &job.steps[0], false)
            .unwrap();
        assert_eq!(spec.argv, vec!["sh", "-e", "{script}"]);
        assert!(!spec.file_commands, "only GitHub jobs get file commands");
        job.working_dir = Some("/builds/p".into());
        assert_eq!(build_start(&job, &rootfs()).workdir, "/builds/p");
    }

    #[test]
    fn shells_map_to_argv() {
        let mut st = Step::script("s", "x");
        st.shell = Shell::Custom(vec!["python3".into(), "{0}".into()]);
        st.timeout = Some(Duration::from_secs(2));
        st.env.push(("A".into(), "step".into()));
        let mut job = JobSpec::single("j", "img", st);
        job.variables.push(Variable::new("GITHUB_ACTIONS", "true"));
        let s = build_start(&job, &rootfs());
        let mut state = StepState::new(&job, &s.env);
        state.path_adds = vec!["/opt/x".into()];
        let spec = state.spec(4, &job.steps[0], false).unwrap();
        assert_eq!(spec.argv, vec!["python3", "{script}"]);
        assert_eq!(
            (spec.index, spec.timeout_ms, spec.file_commands),
            (4, 2000, true)
        );
        assert!(spec.env.contains(&("A".into(), "step".into())));
        assert!(
            spec.env.contains(&("PATH".into(), "/opt/x:/bin".into())),
            "{:?}",
            spec.env
        );
    }

    /// Step 0's end, with these GITHUB_ENV, GITHUB_OUTPUT and GITHUB_PATH.
    fn ended_with(env: &str, output: &str, path: &str) -> StepEnd {
        StepEnd {
            step: 0,
            exit_code: 0,
            duration_ms: 1,
            timed_out: false,
            canceled: false,
            skipped: false,
            files: Some(proto::FileCommands {
                env: env.into(),
                output: output.into(),
                path: path.into(),
                truncated: false,
            }),
        }
    }

    #[test]
    fn file_commands_update_env_path_and_outputs() {
        let job = JobSpec::single("j", "img", Step::script("s", "x"));
        let mut state = StepState::new(&job, &[("PATH".into(), "/bin".into())]);
        let end = ended_with("X=1\nML<<EOF\na\nb\nEOF\n", "o=v\n", "/p1\n");
        let mut w = Vec::new();
        let outputs = state.apply_files(&end, &mut w);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(outputs, vec![("o".to_string(), "v".to_string())]);
        assert!(state.env.contains(&("ML".into(), "a\nb".into())));
        assert_eq!(state.path_adds, vec!["/p1"]);
    }

    #[test]
    fn forged_file_commands_are_held_to_the_agents_bound() {
        let job = JobSpec::single("j", "img", Step::script("s", "x"));
        let mut state = StepState::new(&job, &[]);
        let big = format!("BIG={}\n", "v".repeat(proto::MAX_FILE_COMMANDS * 3));
        let end = ended_with(&big, "", "");
        let mut w = Vec::new();
        state.apply_files(&end, &mut w);
        assert!(w.iter().any(|w| w.contains("was cut")), "{w:?}");
        let total: usize = state.env.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total <= proto::MAX_FILE_COMMANDS, "{total}");
    }

    #[test]
    fn when_and_if_decide_which_steps_run() {
        let mut job = JobSpec::single("j", "img", Step::script("s", "x"));
        job.variables.push(Variable::new("GITHUB_ACTIONS", "true"));
        let mut state = StepState::new(&job, &[]);
        let mut step = Step::script("s", "x");
        assert_eq!(state.should_run(&step, None), Ok(true));
        assert_eq!(state.should_run(&step, Some(true)), Ok(false), "canceled");
        state.failed = true;
        assert_eq!(state.should_run(&step, None), Ok(false));
        step.when = StepWhen::OnFailure;
        assert_eq!(state.should_run(&step, None), Ok(true));
        step.when = StepWhen::Always;
        assert_eq!(state.should_run(&step, Some(true)), Ok(true));
        step.when = StepWhen::OnSuccess;
        step.condition = Some("failure()".into());
        assert_eq!(state.should_run(&step, None), Ok(true));
        step.condition = Some("success()".into());
        assert_eq!(state.should_run(&step, Some(true)), Ok(false));
        step.condition = Some("always()".into());
        assert_eq!(state.should_run(&step, Some(true)), Ok(true));
        step.condition = Some("nosuchfunction(".into());
        assert!(state.should_run(&step, None).is_err());
    }
}
