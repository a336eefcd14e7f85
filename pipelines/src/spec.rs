use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One CI job, independent of the provider it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Job name as the provider shows it (`test`, `build (ubuntu, 1.80)`).
    pub name: String,
    /// Image reference, OCI layout directory or `docker save` tar.
    pub image: String,
    /// Overrides the image's entrypoint; `None` keeps the image's.
    pub entrypoint: Option<Vec<String>>,
    /// Steps in order. A step with [`StepWhen::OnSuccess`] runs only while no
    /// earlier non-allowed step has failed; [`StepWhen::Always`] steps always run.
    pub steps: Vec<Step>,
    /// Job-level variables, in precedence order already resolved by the front end.
    pub variables: Vec<Variable>,
    /// Working directory inside the guest; `None` keeps the image's `WorkingDir`.
    pub working_dir: Option<String>,
    /// Whole-job timeout. The VM is destroyed when it expires.
    pub timeout: Option<Duration>,
    pub artifacts: Vec<ArtifactSpec>,
    /// GitLab `cache:` entries, in order (keys resolved).
    #[serde(default)]
    pub cache: Vec<CacheSpec>,
    /// Where the job's sources come from.
    pub source: JobSource,
    /// Provider job key: the GitHub `jobs.<id>` key, or the GitLab job name
    /// before `parallel` expansion. Equals `name` for jobs built by hand.
    pub id: String,
    /// GitLab stage (`build`, `test`, ...); `None` for GitHub jobs.
    pub stage: Option<String>,
    /// Names of the jobs (other `JobSpec::name`s of the same pipeline) that
    /// must finish first. `None` means "no `needs:` keyword": GitLab then
    /// orders by stage (every job of an earlier stage); `Some(vec![])` means
    /// "start at once".
    pub needs: Option<Vec<String>>,
    /// When the job runs, as decided by GitLab `rules`/`when` (jobs that
    /// resolve to `never` are left out of the pipeline altogether).
    pub when: JobWhen,
    /// Whether a failure of this job fails the pipeline.
    pub allow_failure: AllowFailure,
    /// A GitHub job-level `if:` that could not be decided when the file was
    /// parsed (it uses `needs.*` or a status function); evaluate it with
    /// `github::eval_condition` before starting the job.
    pub condition: Option<String>,
    /// GitHub job `outputs:` (name, text with `${{ }}`), evaluated by the
    /// executor after the steps (`steps.*`, `needs.*`, `env` contexts).
    #[serde(default)]
    pub outputs: Vec<(String, String)>,
    /// GitHub: how the jobs this one `needs` ended (the `needs` context),
    /// filled by the provider before the job runs.
    #[serde(default)]
    pub needs_results: Vec<NeedResult>,
    /// GitLab `when: delayed`: how long after its turn the job starts
    /// (`start_in`, at most a week); `when` is then `OnSuccess`.
    #[serde(default)]
    pub start_in: Option<Duration>,
    /// Services started in the job's VM before its first step (GitLab
    /// `services:`, GitHub `services:`); at most
    /// [`MAX_SERVICES`](crate::services::MAX_SERVICES).
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
}

/// One entry of GitHub's `needs` context: `needs.<id>.result` and
/// `needs.<id>.outputs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeedResult {
    /// The job id (`jobs.<id>` key).
    pub id: String,
    /// `success`, `failure`, `cancelled` or `skipped`.
    pub result: String,
    pub outputs: Vec<(String, String)>,
}

/// One service beside the job: an image run in the job's VM, reachable at
/// `localhost` and at its `aliases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Image reference, OCI layout directory or `docker save` tar.
    pub image: String,
    /// Host names for it in `/etc/hosts` (checked with
    /// [`crate::services::check_alias`]): those derived from the image
    /// name as gitlab-runner derives them, then the job's `alias`es.
    pub aliases: Vec<String>,
    /// Replaces the image's entrypoint (and then its command too, as
    /// Docker does); `None` keeps the image's.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's command; `None` keeps it.
    pub command: Option<Vec<String>>,
    /// The service's own variables, over the job's.
    pub variables: Vec<Variable>,
}

impl JobSpec {
    /// A job with a single step, as `kiln run-job --image IMG -- cmd...` builds it.
    pub fn single(name: impl Into<String>, image: impl Into<String>, step: Step) -> Self {
        let name = name.into();
        JobSpec {
            name: name.clone(),
            image: image.into(),
            entrypoint: None,
            steps: vec![step],
            variables: Vec::new(),
            working_dir: None,
            timeout: None,
            artifacts: Vec::new(),
            cache: Vec::new(),
            source: JobSource::None,
            id: name,
            stage: None,
            needs: None,
            when: JobWhen::OnSuccess,
            allow_failure: AllowFailure::No,
            condition: None,
            outputs: Vec::new(),
            needs_results: Vec::new(),
            start_in: None,
            services: Vec::new(),
        }
    }

    /// Roughly what the job takes in memory: its text plus
    /// [`crate::NODE_BYTES`] per string. The front ends charge it to the
    /// output budget (`Limits::max_output_bytes`).
    pub(crate) fn approx_bytes(&self) -> usize {
        let s = |t: &str| t.len() + crate::NODE_BYTES;
        let opt = |t: &Option<String>| t.as_deref().map_or(0, s);
        let list = |l: &[String]| l.iter().map(|t| s(t)).sum::<usize>();
        let mut n = s(&self.name) + s(&self.image) + s(&self.id) + 256;
        n += self.entrypoint.as_deref().map_or(0, list);
        n += opt(&self.working_dir) + opt(&self.stage) + opt(&self.condition);
        n += self.needs.as_deref().map_or(0, list);
        n += self.outputs.iter().map(|(k, v)| s(k) + s(v)).sum::<usize>();
        for st in &self.steps {
            n += s(&st.name) + s(&st.script) + opt(&st.id) + opt(&st.working_dir);
            n += opt(&st.condition);
            n += st.env.iter().map(|(k, v)| s(k) + s(v)).sum::<usize>();
            if let Shell::Custom(argv) | Shell::Exec(argv) = &st.shell {
                n += list(argv);
            }
        }
        n += self
            .variables
            .iter()
            .map(|v| s(&v.key) + s(&v.value))
            .sum::<usize>();
        for a in &self.artifacts {
            n += opt(&a.name) + list(&a.paths) + list(&a.exclude) + opt(&a.expire_in);
        }
        for c in &self.cache {
            n += s(&c.key) + list(&c.fallback_keys) + list(&c.paths);
        }
        for sv in &self.services {
            n += s(&sv.image) + list(&sv.aliases);
            n += sv.entrypoint.as_deref().map_or(0, list) + sv.command.as_deref().map_or(0, list);
            n += sv
                .variables
                .iter()
                .map(|v| s(&v.key) + s(&v.value))
                .sum::<usize>();
        }
        n
    }
}

/// One step: a script run by a shell, or a command run directly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    /// Script body, run as one file by `shell`.
    pub script: String,
    pub shell: Shell,
    /// Step-level environment, added over the job's variables.
    pub env: Vec<(String, String)>,
    pub when: StepWhen,
    pub timeout: Option<Duration>,
    /// A failure of this step does not fail the job.
    pub allow_failure: bool,
    /// GitHub step `id` (the key of `steps.<id>.outputs`).
    pub id: Option<String>,
    /// Working directory for this step (GitHub `working-directory`);
    /// `None` uses the job's `working_dir`.
    pub working_dir: Option<String>,
    /// A GitHub `if:` expression that must be evaluated at run time with
    /// `github::eval_condition`, after `when` has been checked. `None`: no
    /// extra condition.
    pub condition: Option<String>,
    /// `script`, `env` values or `name` still contain `${{ }}` expressions
    /// that need run-time contexts (`steps.*.outputs`, `secrets`, ...):
    /// pass them through `github::substitute` before running the step.
    pub runtime_expressions: bool,
}

impl Step {
    pub fn script(name: impl Into<String>, script: impl Into<String>) -> Self {
        Step {
            name: name.into(),
            script: script.into(),
            shell: Shell::Sh,
            env: Vec::new(),
            when: StepWhen::OnSuccess,
            timeout: None,
            allow_failure: false,
            id: None,
            working_dir: None,
            condition: None,
            runtime_expressions: false,
        }
    }
}

/// How a step's script is run inside the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shell {
    /// `sh -e FILE` (POSIX shell, stop at the first failing command).
    Sh,
    /// `bash --noprofile --norc -eo pipefail FILE` (GitHub's `bash`).
    Bash,
    /// Run the script as the argument list given, `{0}` replaced by the file
    /// (GitHub's custom `shell:`), e.g. `["python3", "{0}"]`.
    Custom(Vec<String>),
    /// No shell: `script` is ignored and this argv is executed directly.
    Exec(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepWhen {
    OnSuccess,
    OnFailure,
    Always,
}

/// When a job runs relative to the rest of the pipeline (GitLab `when`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobWhen {
    /// Run when every job it depends on succeeded (the default).
    OnSuccess,
    /// Run only when a job it depends on failed.
    OnFailure,
    /// Run regardless of earlier failures.
    Always,
    /// Run only when started by hand.
    Manual,
}

/// Whether a job's failure fails the pipeline (GitLab `allow_failure`,
/// GitHub job `continue-on-error`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AllowFailure {
    No,
    Yes,
    /// Allowed only when the job's script exits with one of these codes.
    ExitCodes(Vec<i32>),
}

impl AllowFailure {
    /// Whether a job that exited with `code` counts as allowed to fail.
    pub fn allows(&self, code: i32) -> bool {
        match self {
            AllowFailure::No => false,
            AllowFailure::Yes => true,
            AllowFailure::ExitCodes(codes) => codes.contains(&code),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variable {
    pub key: String,
    pub value: String,
    /// Masked in every log sink.
    pub masked: bool,
    /// Written to a file whose path becomes the variable's value (GitLab `file` type).
    pub file: bool,
}

impl Variable {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Variable {
            key: key.into(),
            value: value.into(),
            masked: false,
            file: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactSpec {
    pub name: Option<String>,
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    pub untracked: bool,
    pub when: ArtifactWhen,
    pub expire_in: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArtifactWhen {
    OnSuccess,
    OnFailure,
    Always,
}

/// One GitLab `cache:` entry: files kept between jobs under a key, restored
/// into the workspace before the first step and saved from it after the
/// last one (GitLab's semantics; see docs/cache.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    /// The key, resolved: variables expanded, `key: files:` hashed, the
    /// `-protected`/`-non_protected` suffix added (by GitLab for jobs it
    /// sends; by the front end for local runs).
    pub key: String,
    /// Keys tried in order when `key` has no cache (`fallback_keys`).
    pub fallback_keys: Vec<String>,
    /// Workspace paths (GitLab artifact patterns) the cache holds.
    pub paths: Vec<String>,
    /// Also every file git does not track.
    pub untracked: bool,
    pub policy: CachePolicy,
    /// Whether the cache is saved after a job that succeeded, failed, or
    /// either.
    pub when: ArtifactWhen,
}

/// `cache: policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CachePolicy {
    /// Restore only.
    Pull,
    /// Save only.
    Push,
    /// Restore, then save (the default).
    PullPush,
}

impl CachePolicy {
    /// Whether the cache is restored before the job.
    pub fn pulls(self) -> bool {
        matches!(self, CachePolicy::Pull | CachePolicy::PullPush)
    }

    /// Whether the cache is saved after the job.
    pub fn pushes(self) -> bool {
        matches!(self, CachePolicy::Push | CachePolicy::PullPush)
    }

    /// `pull`, `push`, `pull-push` (empty: the default).
    pub fn parse(s: &str) -> Option<CachePolicy> {
        match s {
            "pull" => Some(CachePolicy::Pull),
            "push" => Some(CachePolicy::Push),
            "" | "pull-push" => Some(CachePolicy::PullPush),
            _ => None,
        }
    }
}

/// Where a job's workspace comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobSource {
    /// No sources: the job starts in an empty workspace.
    None,
    /// A host directory copied into the VM's workspace (a local checkout).
    LocalDir(std::path::PathBuf),
    /// A git repository fetched on the host.
    Git {
        url: String,
        refspecs: Vec<String>,
        sha: String,
        depth: Option<u32>,
    },
}
