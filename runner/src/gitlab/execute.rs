//! One GitLab job, from receiving it to its final update: the trace and
//! its updater, the sources, the dependencies' artifacts, the VM, the
//! upload of the artifacts, the final state.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kiln_pipelines::ArtifactWhen;
use tokio::sync::{watch, OwnedSemaphorePermit};

use super::artifacts::{self, download_with_retries, upload_with_retries};
use super::daemon::{Runner, Shared};
use super::job::{Context, GitStrategy, JobResponse, Prepared};
use super::trace::{Sections, Trace, TraceSink};
use super::updater::Updater;
use super::{source, GitlabError};
use crate::cache::JobCaches;
use crate::executor::{error_chain, Collect, FailureReason, JobResult};
use crate::joblog::mask::DEFAULT_TOKEN_PREFIXES;
use crate::joblog::Secrets;

/// The final state of a job as GitLab is told.
struct Final {
    state: &'static str,
    reason: Option<String>,
    exit_code: Option<i32>,
    message: String,
    /// GitLab answered 403/404 for the job: it no longer runs there, and
    /// nothing more is sent.
    gone: bool,
}

fn reason_for(job: &JobResponse, wanted: &str, fallback: &str) -> String {
    let accepted = &job.features.failure_reasons;
    if accepted.is_empty() || accepted.iter().any(|r| r == wanted) {
        wanted.to_string()
    } else {
        fallback.to_string()
    }
}

fn failed(reason: String, exit_code: Option<i32>, message: String) -> Final {
    Final {
        state: "failed",
        reason: Some(reason),
        exit_code,
        message,
        gone: false,
    }
}

/// What the job's trace masks: its masked variables, its token, and the
/// tokens with GitLab's prefixes and the server's.
fn secrets(job: &JobResponse) -> Secrets {
    let prefixes = DEFAULT_TOKEN_PREFIXES
        .iter()
        .map(|s| s.to_string())
        .chain(job.features.token_mask_prefixes.iter().cloned());
    Secrets::new(job.masked_values()).with_token_prefixes(prefixes)
}

/// Run one job the daemon received, and tell GitLab how it ended.
pub(super) async fn run_job(
    runner: Arc<Runner>,
    shared: Arc<Shared>,
    runner_id: Option<u64>,
    job: JobResponse,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) {
    let id = job.id;
    // Named like the executor's job directories, so a later kiln removes
    // it if this one is killed.
    let job_dir = runner
        .run_dir
        .join(format!("job-{}-gl{id}", std::process::id()));
    let workspace = job_dir.join("workspace");
    let slot = shared.take_slot();

    let trace = Trace::new(secrets(&job), runner.cfg.output_limit_bytes());
    let (cancel_tx, cancel_rx) = watch::channel(None);
    let cancel_tx = Arc::new(cancel_tx);
    shared
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, cancel_tx.clone());
    let updater = Updater::new(
        runner.client.clone(),
        id,
        job.token.clone(),
        trace.clone(),
        cancel_tx.clone(),
    );
    let remote_canceled = updater.remote_canceled.clone();
    let gone = updater.gone.clone();
    let (stop_tx, stop_rx) = watch::channel(false);
    let updater = tokio::spawn(updater.run(stop_rx));

    let sections = Sections {
        trace: trace.clone(),
        enabled: job.features.trace_sections,
    };
    let outcome = execute(
        &runner, &shared, runner_id, slot, &job, &sections, &workspace, cancel_rx,
    )
    .await;
    let mut fin = match outcome {
        Ok(f) => f,
        Err(e) => failed("runner_system_failure".into(), None, error_chain(&e)),
    };
    if fin.gone {
        gone.store(true, Ordering::SeqCst);
    }
    if fin.reason.as_deref() == Some("job_canceled") || fin.reason.as_deref() == Some("canceled") {
        if shared.forced.load(Ordering::SeqCst) && !remote_canceled.load(Ordering::SeqCst) {
            fin = failed(
                "runner_system_failure".into(),
                fin.exit_code,
                "the runner was shut down".into(),
            );
        } else {
            fin.reason = Some(reason_for(&job, "job_canceled", "script_failure"));
        }
    }
    if fin.state == "success" {
        trace.line("\x1b[32;1mJob succeeded\x1b[0;m");
    } else {
        trace.line(&format!(
            "\x1b[31;1mERROR: Job failed: {}\x1b[0;m",
            fin.message
        ));
    }
    trace.flush();

    let _ = stop_tx.send(true);
    match updater.await {
        Ok(up) => {
            up.send_final(fin.state, fin.reason.clone(), fin.exit_code)
                .await
        }
        Err(e) => tracing::error!(job = id, "the trace task failed: {e}"),
    }
    shared
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    shared.free_slot(slot);
    if let Err(e) = std::fs::remove_dir_all(&job_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("could not remove {}: {e}", job_dir.display());
        }
    }
    tracing::info!(job = id, state = fin.state, reason = ?fin.reason, "job finished");
}

/// Everything between receiving the job and its final state.
#[allow(clippy::too_many_arguments)]
async fn execute(
    runner: &Runner,
    shared: &Shared,
    runner_id: Option<u64>,
    slot: usize,
    job: &JobResponse,
    sections: &Sections,
    workspace: &Path,
    cancel: watch::Receiver<Option<bool>>,
) -> Result<Final, GitlabError> {
    let trace = &sections.trace;
    trace.line(&format!(
        "\x1b[1;m\x1b[0KRunning with kiln {}\x1b[0;m\n  on {} (system {})",
        env!("CARGO_PKG_VERSION"),
        runner.cfg.name,
        shared.system_id
    ));
    std::fs::create_dir_all(workspace)
        .map_err(|e| GitlabError::Workspace(format!("{}: {e}", workspace.display())))?;
    let ctx = Context {
        runner_id,
        runner_name: runner.cfg.name.clone(),
        default_image: runner.cfg.image.clone(),
        image_policy: runner.cfg.image_policy(),
        concurrent_id: slot,
        workspace: workspace.to_path_buf(),
    };
    let prepared = match job.to_spec(&ctx) {
        Ok(p) => p,
        Err(e) => {
            let (wanted, fallback) = e.failure_reason();
            return Ok(failed(
                reason_for(job, wanted, fallback),
                None,
                e.to_string(),
            ));
        }
    };
    sections.start("prepare_executor", "Preparing the \"kiln\" VM executor");
    trace.line(&format!(
        "Using image {} in a disposable VM",
        prepared.spec.image
    ));
    sections.end("prepare_executor");

    sections.start("get_sources", "Getting source from Git repository");
    if prepared.git == GitStrategy::None {
        trace.line("Skipping Git repository setup");
    } else if let Err(e) = source::fetch(
        workspace,
        &job.git_info,
        prepared.git_depth,
        prepared.submodules,
        trace,
    )
    .await
    {
        sections.end("get_sources");
        return Ok(failed("script_failure".into(), Some(1), error_chain(&e)));
    }
    sections.end("get_sources");

    let caches = restore_caches(runner, job, &prepared, sections, workspace).await;

    if let Some(fin) = download_dependencies(runner, job, sections, workspace).await {
        return Ok(fin);
    }

    if cancel.borrow().is_some() {
        // Canceled while the sources or dependencies were fetched: no VM.
        return Ok(failed(
            "job_canceled".into(),
            None,
            "canceled before the VM started".into(),
        ));
    }
    let mut sink = TraceSink::new(sections.clone());
    // The guest sends the artifact and cache files over its console; they
    // land here.
    let collected = workspace.with_file_name("artifacts");
    let cache_files = workspace.with_file_name("caches");
    let collect = Collect {
        artifacts_to: Some(&collected),
        caches_to: caches
            .as_ref()
            .filter(|_| std::fs::create_dir_all(&cache_files).is_ok())
            .map(|_| cache_files.as_path()),
    };
    let result = runner
        .executor
        .run_image_with(&prepared.spec, prepared.image(), &mut sink, cancel, collect)
        .await;
    sink.finish();

    let mut fin = outcome(job, &result);
    // Caches: only from a VM that ran its steps, and not for a canceled job.
    if let Some(caches) =
        caches.filter(|_| result.boot_ms > 0 && fin.reason.as_deref() != Some("job_canceled"))
    {
        save_caches(caches, sections, &cache_files, fin.state == "success").await;
    }
    // Artifacts: only from a VM that booted, and not for a canceled job.
    if result.boot_ms > 0 && fin.reason.as_deref() != Some("job_canceled") {
        upload_artifacts(runner, job, sections, &prepared, &collected, &mut fin).await;
    }
    Ok(fin)
}

/// The job's caches, restored into its workspace (section
/// `restore_cache`); `None` when it has none.
async fn restore_caches(
    runner: &Runner,
    job: &JobResponse,
    prepared: &Prepared,
    sections: &Sections,
    workspace: &Path,
) -> Option<JobCaches> {
    if prepared.spec.cache.is_empty() {
        return None;
    }
    let cfg = runner.cfg.cache.clone().unwrap_or_default();
    // As gitlab-runner's object names: per runner (its short token) unless
    // shared, per project.
    let namespace = if cfg.shared {
        format!("project/{}", job.job_info.project_id)
    } else {
        format!(
            "runner/{}/project/{}",
            crate::cache::short_token(&runner.cfg.token),
            job.job_info.project_id
        )
    };
    let mut caches = JobCaches::new(
        runner.cache_store.clone(),
        namespace,
        prepared.spec.cache.clone(),
        job.variable("CACHE_FALLBACK_KEY").map(str::to_string),
        cfg.max_archive_bytes,
    );
    sections.start("restore_cache", "Restoring cache");
    let (trace, ws) = (sections.trace.clone(), workspace.to_path_buf());
    let caches = tokio::task::spawn_blocking(move || {
        caches.restore(&ws, &mut |line| trace.line(&line));
        caches
    })
    .await;
    sections.end("restore_cache");
    match caches {
        Ok(c) => Some(c),
        Err(e) => {
            sections
                .trace
                .line(&format!("WARNING: restoring the cache failed: {e}"));
            None
        }
    }
}

/// Save the job's caches from the files its guest sent back (section
/// `archive_cache` or `archive_cache_on_failure`).
async fn save_caches(caches: JobCaches, sections: &Sections, collected: &Path, succeeded: bool) {
    let (name, title) = if succeeded {
        ("archive_cache", "Saving cache for successful job")
    } else {
        ("archive_cache_on_failure", "Saving cache for failed job")
    };
    sections.start(name, title);
    let (trace, from) = (sections.trace.clone(), collected.to_path_buf());
    let done = tokio::task::spawn_blocking(move || {
        caches.save(&from, succeeded, &mut |line| trace.line(&line));
    })
    .await;
    if let Err(e) = done {
        sections
            .trace
            .line(&format!("WARNING: saving the cache failed: {e}"));
    }
    sections.end(name);
}

/// Unpack the artifacts of the job's `dependencies` into its workspace;
/// the job's final state when one cannot be had.
async fn download_dependencies(
    runner: &Runner,
    job: &JobResponse,
    sections: &Sections,
    workspace: &Path,
) -> Option<Final> {
    let deps: Vec<_> = job
        .dependencies
        .iter()
        .filter(|d| d.artifacts_file.is_some())
        .collect();
    if deps.is_empty() {
        return None;
    }
    sections.start("download_artifacts", "Downloading artifacts");
    for d in deps {
        sections.trace.line(&format!(
            "Downloading artifacts for {} ({})...",
            d.name, d.id
        ));
        let got = download_with_retries(&runner.client, d.id, &d.token).await;
        let res = got.and_then(|zip| artifacts::unzip_into(&zip, workspace));
        if let Err(e) = res {
            sections.end("download_artifacts");
            return Some(failed(
                "runner_system_failure".into(),
                None,
                format!("artifacts of {}: {}", d.name, error_chain(&e)),
            ));
        }
    }
    sections.end("download_artifacts");
    None
}

/// The job's state as the executor left it.
fn outcome(job: &JobResponse, result: &JobResult) -> Final {
    match &result.failure {
        None => Final {
            state: "success",
            reason: None,
            exit_code: Some(0),
            message: String::new(),
            gone: false,
        },
        Some(FailureReason::ScriptFailure) => failed(
            "script_failure".into(),
            Some(result.exit_code),
            format!("exit code {}", result.exit_code),
        ),
        Some(FailureReason::JobExecutionTimeout) => failed(
            "job_execution_timeout".into(),
            None,
            "execution took longer than the job's timeout".into(),
        ),
        Some(FailureReason::ImagePullFailure(m)) => failed(
            reason_for(job, "image_pull_failure", "runner_system_failure"),
            None,
            format!("image: {m}"),
        ),
        Some(FailureReason::RunnerSystemFailure(m)) => {
            failed("runner_system_failure".into(), None, m.clone())
        }
        Some(FailureReason::Canceled) => failed("job_canceled".into(), None, "canceled".into()),
    }
}

/// Upload the files the guest sent back into `collected`, selected per
/// artifact spec and `when`; a failed upload fails a job that succeeded.
async fn upload_artifacts(
    runner: &Runner,
    job: &JobResponse,
    sections: &Sections,
    prepared: &Prepared,
    collected: &Path,
    fin: &mut Final,
) {
    let trace = &sections.trace;
    let ok = fin.state == "success";
    let wanted: Vec<_> = prepared
        .spec
        .artifacts
        .iter()
        .zip(&job.artifacts)
        .filter(|(a, _)| match a.when {
            ArtifactWhen::Always => true,
            ArtifactWhen::OnSuccess => ok,
            ArtifactWhen::OnFailure => !ok,
        })
        .collect();
    if wanted.is_empty() {
        return;
    }
    let name = if ok {
        "upload_artifacts_on_success"
    } else {
        "upload_artifacts_on_failure"
    };
    sections.start(name, "Uploading artifacts for job");
    for (spec, raw) in wanted {
        if spec.untracked {
            trace.line("WARNING: artifacts:untracked is not supported by kiln yet");
        }
        let files = artifacts::select(collected, &spec.paths, &spec.exclude);
        if files.is_empty() {
            trace.line(&format!(
                "WARNING: {}: no matching files",
                spec.paths.join(", ")
            ));
            continue;
        }
        trace.line(&format!("Uploading {} file(s)...", files.len()));
        let base = raw
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "artifacts".into());
        let format = raw.artifact_format.clone().unwrap_or_else(|| "zip".into());
        let kind = raw
            .artifact_type
            .clone()
            .unwrap_or_else(|| "archive".into());
        let up = match artifacts::zip_files(collected, &files) {
            Ok(zip) => {
                upload_with_retries(
                    &runner.client,
                    job,
                    zip,
                    &format!("{base}.zip"),
                    &kind,
                    &format,
                    spec.expire_in.as_deref(),
                )
                .await
            }
            Err(e) => Err(e),
        };
        match up {
            Ok(()) => trace.line("Uploading artifacts... ok"),
            Err(e) if matches!(e.status(), Some(403 | 404)) => {
                // The job is no longer running on GitLab (canceled,
                // failed, erased): it takes nothing more from us.
                tracing::warn!(job = job.id, "uploading artifacts: {}", error_chain(&e));
                fin.gone = true;
                break;
            }
            Err(e) => {
                trace.line(&format!(
                    "\x1b[31;1mERROR: Uploading artifacts failed: {}\x1b[0;m",
                    error_chain(&e)
                ));
                if ok {
                    *fin = match e.status() {
                        // GitLab refused these artifacts (413: larger
                        // than the instance allows): the job's doing,
                        // and retrying it elsewhere would not help.
                        Some(s @ 400..=499) => failed(
                            "script_failure".into(),
                            None,
                            format!("GitLab refused the artifacts ({s})"),
                        ),
                        _ => failed(
                            "runner_system_failure".into(),
                            None,
                            "uploading artifacts failed".into(),
                        ),
                    };
                }
            }
        }
    }
    sections.end(name);
}
