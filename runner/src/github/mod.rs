//! The GitHub Actions provider: `kiln daemon` serves ephemeral
//! just-in-time runners, one VM per runner (see docs/github.md).
//!
//! - [`config`]: `[[github]]` in `kiln.toml` (scope, credentials, webhook,
//!   runner distribution, label profiles).
//! - [`api`]: the REST calls kiln makes (octocrab), rate limits read from
//!   every answer.
//! - [`webhook`]: the signed `workflow_job` endpoint.
//! - [`service`]: one entry at work: demand (queued jobs), capacity
//!   (runners), the reconciler, backoff, shutdown.
//! - [`runner`]: one runner's life: JIT config, VM, record removal.
//! - [`distribution`]: the runner distribution (directory or tarball,
//!   checked by SHA-256).
//! - [`status`]: what `kiln github status` shows.
//! - [`daemon`]: every entry, under the daemon's shared `concurrent` budget.

pub mod api;
pub mod config;
pub mod daemon;
pub mod distribution;
pub mod runner;
pub mod service;
pub mod status;
pub mod webhook;

/// Errors of the GitHub provider.
#[derive(Debug, thiserror::Error)]
pub enum GithubError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("[[github]] '{entry}': the GitHub client")]
    Api {
        entry: String,
        #[source]
        source: Box<api::ApiError>,
    },
    #[error("[[github]] '{entry}': profile '{profile}': the executor could not start")]
    Executor {
        entry: String,
        profile: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("[[github]] '{entry}': the runner distribution {path}: {what}")]
    Distribution {
        entry: String,
        path: std::path::PathBuf,
        what: String,
    },
    #[error("[[github]] '{entry}': cannot listen on {addr} for webhooks")]
    Listen {
        entry: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
}
