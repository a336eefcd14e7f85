//! `kiln daemon`: the GitLab runners and the GitHub entries of one
//! `kiln.toml`, side by side under one `concurrent` budget (a GitLab job
//! and a GitHub runner each hold one permit while their VM may exist).

use std::sync::Arc;

use tokio::sync::{watch, Semaphore};

use crate::config::{Config, ConfigError};

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Gitlab(#[from] crate::gitlab::GitlabError),
    #[error(transparent)]
    Github(#[from] crate::github::GithubError),
}

/// Serve until `shutdown` resolves, then shut both providers down.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    config.validate()?;
    if config.runners.is_empty() && config.github.is_empty() {
        return Err(
            ConfigError::Invalid("no [[runners]] and no [[github]] configured".into()).into(),
        );
    }
    let global = Arc::new(Semaphore::new(config.concurrent));
    let (stop_tx, stop_rx) = watch::channel(false);
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let gitlab = (!config.runners.is_empty()).then(|| {
        tokio::spawn(crate::gitlab::daemon::run_shared(
            config.clone(),
            global.clone(),
            wait(stop_rx.clone()),
        ))
    });
    let github = (!config.github.is_empty()).then(|| {
        tokio::spawn(crate::github::daemon::run(
            config.clone(),
            global.clone(),
            stop_rx.clone(),
        ))
    });
    let mut github = github;
    let mut gitlab = gitlab;
    let mut result = Ok(());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Serving ends by itself only when an entry cannot be set up.
            r = async { github.as_mut().expect("guarded").await }, if github.is_some() => {
                github = None;
                if let Ok(Err(e)) = r {
                    result = Err(e.into());
                }
                break;
            }
            // Every GitLab runner stopped (its token refused): the daemon
            // goes on only while GitHub entries are served.
            r = async { gitlab.as_mut().expect("guarded").await }, if gitlab.is_some() => {
                gitlab = None;
                if let Ok(Err(e)) = r {
                    tracing::error!("{}", crate::executor::error_chain(&e));
                    result = Err(e.into());
                }
                if github.is_none() {
                    break;
                }
            }
        }
    }
    let _ = stop_tx.send(true);
    if let Some(g) = github {
        match g.await {
            Ok(Err(e)) => result = Err(e.into()),
            Err(e) => tracing::error!("the GitHub provider failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    if let Some(g) = gitlab {
        match g.await {
            Ok(Err(e)) => result = Err(e.into()),
            Err(e) => tracing::error!("the GitLab provider failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
    result
}
