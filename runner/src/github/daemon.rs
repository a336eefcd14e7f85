//! Every `[[github]]` entry of `kiln daemon`: per entry a [`Service`] with
//! its webhook endpoint, reconciler and scheduler; one status file for all.

use std::sync::Arc;
use std::time::Duration;

use kiln_images::{ImagePolicy, ImageSource};
use tokio::sync::{watch, Semaphore};

use super::api::Api;
use super::config::{GithubConfig, Profile};
use super::service::{ProfileRt, Service};
use super::status::{self, Status};
use super::{distribution, GithubError};
use crate::config::Config;
use crate::executor::{Executor, ExecutorConfig};

fn executor_config(
    config: &Config,
    entry: &GithubConfig,
    p: &Profile,
) -> Result<ExecutorConfig, GithubError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| GithubError::Executor {
        entry: entry.name.clone(),
        profile: p.name.clone(),
        source,
    };
    let run_dir = config
        .run_dir
        .clone()
        .unwrap_or_else(|| crate::paths::default_run_dir(None));
    ExecutorConfig::builder(
        config
            .cache_dir
            .clone()
            .unwrap_or_else(|| crate::paths::default_cache_dir(None, None)),
        run_dir,
    )
    .kernel_files(config.kernel.clone(), None)
    .agent(config.agent.clone())
    .backend(p.backend().map_err(|e| err(e.into()))?)
    .isolation(p.isolation().map_err(|e| err(e.into()))?)
    .vmm_program(config.vmm.clone())
    .vcpus(p.cpus)
    .memory_mib(p.memory)
    .disk_gib(p.disk)
    .boot_timeout(Duration::from_secs(config.boot_timeout))
    .log_dir(config.log_dir.clone())
    .qemu(kiln_vmm::QemuOptions::new(config.qemu.clone()))
    .images(config.images.clone())
    .network(p.network_config().map_err(|e| err(e.into()))?)
    .build()
    .map_err(|e| err(Box::new(e)))
}

/// Set up one entry: credentials, client, distribution, executors.
async fn service(
    config: &Config,
    entry: &GithubConfig,
    global: Arc<Semaphore>,
    stopping: watch::Receiver<bool>,
) -> Result<Arc<Service>, GithubError> {
    let auth = entry.auth()?;
    let secret = entry.webhook_secret()?;
    let api = Api::new(entry, &auth).map_err(|source| GithubError::Api {
        entry: entry.name.clone(),
        source: Box::new(source),
    })?;
    let cache = config
        .cache_dir
        .clone()
        .unwrap_or_else(|| crate::paths::default_cache_dir(None, None));
    let e2 = entry.clone();
    let dist = tokio::task::spawn_blocking(move || distribution::prepare(&e2, &cache))
        .await
        .map_err(|e| GithubError::Distribution {
            entry: entry.name.clone(),
            path: entry.runner_dist.clone(),
            what: e.to_string(),
        })??;
    let mut profiles = Vec::new();
    for p in &entry.profiles {
        let ec = executor_config(config, entry, p)?;
        let executor = Executor::new(ec).map_err(|e| GithubError::Executor {
            entry: entry.name.clone(),
            profile: p.name.clone(),
            source: e.into(),
        })?;
        // The operator's choice: a path on this host is allowed.
        let image = ImageSource::parse_with(&p.image, &ImagePolicy::local()).map_err(|e| {
            GithubError::Executor {
                entry: entry.name.clone(),
                profile: p.name.clone(),
                source: e.into(),
            }
        })?;
        profiles.push(ProfileRt {
            cfg: p.clone(),
            executor: Arc::new(executor),
            image,
        });
    }
    let log_dir = config
        .log_dir
        .clone()
        .or_else(|| config.run_dir.clone())
        .unwrap_or_else(|| crate::paths::default_run_dir(None));
    Ok(Arc::new(Service::new(
        entry.clone(),
        api,
        secret,
        profiles,
        dist,
        log_dir,
        global,
        config.concurrent,
        stopping,
        config.shutdown_timeout(),
    )))
}

/// Serve every `[[github]]` entry until `stopping` turns true, then stop
/// their runners (see [`Service::shutdown`]) and return.
pub async fn run(
    config: Config,
    global: Arc<Semaphore>,
    mut stopping: watch::Receiver<bool>,
) -> Result<(), GithubError> {
    let run_dir = config
        .run_dir
        .clone()
        .unwrap_or_else(|| crate::paths::default_run_dir(None));
    let _ = std::fs::create_dir_all(&run_dir);
    let mut services = Vec::new();
    let mut tasks = Vec::new();
    for entry in &config.github {
        let s = service(&config, entry, global.clone(), stopping.clone()).await?;
        if let Some(addr) = &entry.listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| GithubError::Listen {
                    entry: entry.name.clone(),
                    addr: addr.clone(),
                    source,
                })?;
            let bound = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| addr.clone());
            tracing::info!(github = %entry.name, "webhook endpoint on {bound}");
            *s.webhook_addr.lock().unwrap_or_else(|p| p.into_inner()) = Some(bound);
            let app = super::webhook::router(s.clone());
            let mut stop = stopping.clone();
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|v| *v).await;
                    })
                    .await;
            }));
        }
        tasks.push(tokio::spawn(s.clone().reconcile_loop()));
        tasks.push(tokio::spawn(s.clone().schedule_loop()));
        tracing::info!(github = %entry.name, profiles = entry.profiles.len(), "serving GitHub runners");
        services.push(s);
    }
    let write_status = |services: &[Arc<Service>]| Status {
        pid: std::process::id(),
        entries: services.iter().map(|s| s.snapshot()).collect(),
    };
    let mut last = String::new();
    loop {
        let st = write_status(&services);
        let text = serde_json::to_string(&st).unwrap_or_default();
        if text != last {
            if let Err(e) = status::write(&run_dir, &st) {
                tracing::warn!("cannot write {}: {e}", status::path(&run_dir).display());
            }
            last = text;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stopping.wait_for(|v| *v) => break,
        }
    }
    tracing::info!("GitHub runners: stopping");
    let shutdowns: Vec<_> = services
        .iter()
        .map(|s| {
            let s = s.clone();
            tokio::spawn(async move { s.shutdown().await })
        })
        .collect();
    let all_stopped = async {
        for s in shutdowns {
            let _ = s.await;
        }
    };
    tokio::pin!(all_stopped);
    loop {
        let _ = status::write(&run_dir, &write_status(&services));
        tokio::select! {
            _ = &mut all_stopped => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(status::path(&run_dir));
    tracing::info!("GitHub runners stopped");
    Ok(())
}
