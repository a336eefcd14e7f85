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
    /// Where the job's sources come from.
    pub source: JobSource,
}

impl JobSpec {
    /// A job with a single step, as `kiln run-job --image IMG -- cmd...` builds it.
    pub fn single(name: impl Into<String>, image: impl Into<String>, step: Step) -> Self {
        JobSpec {
            name: name.into(),
            image: image.into(),
            entrypoint: None,
            steps: vec![step],
            variables: Vec::new(),
            working_dir: None,
            timeout: None,
            artifacts: Vec::new(),
            source: JobSource::None,
        }
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
