//! The GitLab provider: `kiln daemon` asks GitLab for jobs and runs each in
//! a disposable VM (see docs/gitlab.md).
//!
//! - [`client`]: the runner API over HTTP.
//! - [`job`]: the job payload and its translation into a `JobSpec`.
//! - [`source`]: git fetch on the host into the job's workspace.
//! - [`mask`], [`trace`]: the log path (masking, cap, incremental upload).
//! - [`artifacts`]: artifact selection, zip, dependency download.
//! - [`daemon`]: the job loop, concurrency, shutdown.

pub mod artifacts;
pub mod client;
pub mod daemon;
pub mod job;
pub mod mask;
pub mod source;
pub mod trace;

/// Errors of the GitLab provider.
#[derive(Debug, thiserror::Error)]
pub enum GitlabError {
    #[error("{what}: transport error")]
    Transport {
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: GitLab answered {status}: {body}")]
    Status {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("the job payload is not valid: {0}")]
    BadJob(String),
    #[error("fetching sources: {0}")]
    Git(String),
    #[error("artifacts: {0}")]
    Archive(String),
    #[error("workspace: {0}")]
    Workspace(String),
    #[error("runner '{runner}': the executor could not start")]
    Executor {
        runner: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

impl GitlabError {
    /// An HTTP status GitLab answered, if that is what this is.
    pub fn status(&self) -> Option<u16> {
        match self {
            GitlabError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}
