//! The GitLab provider: `kiln daemon` asks GitLab for jobs and runs each in
//! a disposable VM (see docs/gitlab.md).
//!
//! - [`daemon`]: the runner loops, concurrency, shutdown.
//! - [`execute`]: one job, from the trace's first line to the final update.
//! - [`register`]: the runner's identity: `system_id`, verify, register.
//! - [`client`]: the runner API over HTTP; [`backoff`]: its retry delays.
//! - [`payload`]: the job payload as GitLab sends it; [`job`]: its
//!   translation into a `JobSpec`.
//! - [`source`]: git fetch on the host into the job's workspace.
//! - [`trace`]: the job's trace (sections, behind the masking front of
//!   `crate::joblog`, capped); [`updater`]: sending it incrementally.
//! - [`artifacts`]: artifact selection, zip, upload and download.

pub mod artifacts;
pub mod backoff;
pub mod client;
pub mod daemon;
pub mod execute;
pub mod job;
pub mod payload;
pub mod register;
pub mod source;
pub mod trace;
pub mod updater;

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
    /// A bug in kiln's use of the API.
    #[error("internal error: {0}")]
    Internal(String),
    #[error("runner '{runner}': the executor could not start")]
    Executor {
        runner: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "runner '{runner}': GitLab refused the runner token ({status}: {body}); \
         put a valid runner authentication token in the configuration \
         (check it with `kiln gitlab verify`)"
    )]
    TokenRefused {
        runner: String,
        status: u16,
        body: String,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

impl GitlabError {
    /// An HTTP status GitLab answered, if that is what this is.
    pub fn status(&self) -> Option<u16> {
        match self {
            GitlabError::Status { status, .. } | GitlabError::TokenRefused { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }

    /// GitLab said the runner token is not (or no longer) valid: 401, 403,
    /// or 422 ("Runner is orphaned").
    pub fn token_refused(&self) -> bool {
        matches!(self.status(), Some(401 | 403 | 422))
    }
}
