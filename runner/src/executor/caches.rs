//! Cache files the guest sends back after the steps: for each `cache:`
//! entry the job saves (its `policy` pushes, its `when` matches how the
//! steps went), the workspace files its `paths` select (every file but
//! `.git` for `untracked`; the provider keeps only the untracked ones),
//! collected like artifacts (bounded spool, safe extraction) into
//! `<caches_to>/<index>`. A cache over the limit is left out with a
//! warning: a cache never fails a job. Archiving and storing them is the
//! provider's (`crate::cache`).

use std::path::Path;

use kiln_agent::proto::{self, Stream};
use kiln_pipelines::{ArtifactWhen, JobSpec};

use super::artifacts::collect_files;
use super::conversation::Conversation;
use super::outcome::{human_bytes, Early, JobResult};
use crate::joblog::JobSink;

/// Whether a cache saved `when` is saved after steps that `succeeded`.
pub fn saved_when(when: ArtifactWhen, succeeded: bool) -> bool {
    match when {
        ArtifactWhen::Always => true,
        ArtifactWhen::OnSuccess => succeeded,
        ArtifactWhen::OnFailure => !succeeded,
    }
}

/// Collect the files of every cache the job saves into `to/<index>`
/// (`dir`: where the tar streams are spooled).
pub(super) async fn collect_caches(
    io: &mut Conversation<'_>,
    job: &JobSpec,
    sink: &mut dyn JobSink,
    steps: &JobResult,
    to: &Path,
    dir: &Path,
    max_bytes: u64,
) -> Result<(), Early> {
    if job.cache.is_empty() || io.cancel_state().is_some() {
        return Ok(());
    }
    let mut probe = steps.clone();
    probe.settle(job, false);
    let succeeded = probe.failure.is_none();
    for (i, c) in job.cache.iter().enumerate() {
        if !c.policy.pushes() || !saved_when(c.when, succeeded) {
            continue;
        }
        let (mut paths, mut exclude) = (c.paths.clone(), Vec::new());
        if c.untracked {
            paths.push("*".into());
            exclude.push(".git".into());
        }
        let req = proto::CollectArtifacts {
            paths,
            exclude,
            max_bytes,
        };
        let tar = dir.join(format!("cache-{i}.tar"));
        let dest = to.join(i.to_string());
        let (end, got) = collect_files(io, job, sink, req, &tar, &dest, "cache file").await?;
        let _ = std::fs::remove_file(&tar);
        if end.truncated {
            let line = format!(
                "kiln: WARNING: cache {} is over the limit of {} ({} more files, {}, were left \
                 out); it is not saved\n",
                c.key,
                human_bytes(max_bytes),
                end.left_out_files,
                human_bytes(end.left_out_bytes),
            );
            sink.output(0, Stream::Stderr, line.as_bytes());
            if let Err(e) = std::fs::remove_dir_all(&dest) {
                tracing::warn!("removing {}: {e}", dest.display());
            }
        }
        tracing::debug!(cache = %c.key, files = got.files, bytes = got.bytes, "cache files received");
    }
    Ok(())
}
