//! GitLab's `cache:` for both providers (see docs/cache.md): archives kept
//! on the runner host between jobs.
//!
//! - before the VM starts, [`JobCaches::restore`] puts each cache the job
//!   pulls into the job's workspace on the host (its key, then its
//!   `fallback_keys`, then `CACHE_FALLBACK_KEY`);
//! - after the steps, the executor has the guest send the files of each
//!   cache the job pushes (`crate::executor::Collect::caches_to`), and
//!   [`JobCaches::save`] archives them under the cache's key.
//!
//! Neither ever fails the job: a cache that cannot be restored or saved is
//! a warning in the job's log, worded like gitlab-runner's.
//!
//! - [`store`]: where archives are kept: the local directory (bounded,
//!   LRU-pruned) or, through [`s3`], an S3-compatible bucket;
//! - [`archive`]: building archives, and restoring hostile ones safely.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use kiln_agent::proto;
use kiln_pipelines::CacheSpec;
use serde::{Deserialize, Serialize};

use crate::executor::{error_chain, human_bytes, saved_when};

pub mod archive;
pub mod s3;
pub mod store;

pub use s3::{short_token, AwsCredentials, S3Config};
pub use store::{LocalStore, Store};

/// `[runners.cache]` in kiln.toml, shaped like gitlab-runner's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// `local` (the default): a directory on this host; `s3`: a bucket
    /// of an S3-compatible server (`[runners.cache.s3]`).
    #[serde(rename = "Type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `local`: the directory of archives (default: `ci-cache` in the
    /// runner's cache directory). `s3`: the prefix of the objects' names.
    #[serde(rename = "Path", default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Share caches between runners (keys are otherwise per runner and
    /// project, as gitlab-runner's).
    #[serde(rename = "Shared", default)]
    pub shared: bool,
    /// Most MiB of archives the directory keeps; least recently used ones
    /// are removed past it (default 5120).
    #[serde(rename = "MaxSize", default, skip_serializing_if = "Option::is_none")]
    pub max_size_mib: Option<u64>,
    /// Most bytes of one archive; a larger cache is not saved (default:
    /// no limit but the store's).
    #[serde(
        rename = "MaxUploadedArchiveSize",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_archive_bytes: Option<u64>,
    /// `[runners.cache.s3]`, for `Type = "s3"`.
    #[serde(rename = "s3", default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Config>,
}

/// Why a cache store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    S3(#[from] s3::S3Error),
}

impl CacheConfig {
    fn is_s3(&self) -> bool {
        self.kind.as_deref() == Some("s3")
    }

    /// Check the settings kiln cannot honour.
    pub fn validate(&self, runner: &str) -> Result<(), String> {
        match self.kind.as_deref() {
            None | Some("") | Some("local") => Ok(()),
            Some("s3") => match &self.s3 {
                Some(s) if !s.bucket_name.trim().is_empty() => Ok(()),
                _ => Err(format!(
                    "runner '{runner}': [runners.cache] Type = \"s3\" needs \
                     [runners.cache.s3] with a BucketName"
                )),
            },
            Some(other) => Err(format!(
                "runner '{runner}': [runners.cache] Type = \"{other}\" is not supported; \
                 use \"local\" (the default) or \"s3\""
            )),
        }
    }

    /// The store these settings describe: `local`, in `cache_dir/ci-cache`
    /// unless `Path` says otherwise; `s3`, with the credentials of
    /// `[runners.cache.s3]`, else `env`'s, spooling in
    /// `cache_dir/ci-cache-spool` (an `s3` store must be opened inside the
    /// daemon's tokio runtime).
    pub fn open(&self, cache_dir: &Path, env: Option<&AwsCredentials>) -> Result<Store, OpenError> {
        let io_at = |path: PathBuf| move |source| OpenError::Io { path, source };
        if self.is_s3() {
            let dir = cache_dir.join("ci-cache-spool");
            let spool = store::Spool::open(&dir).map_err(io_at(dir))?;
            spool.clean();
            let prefix = self
                .path
                .as_deref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let cfg = self.s3.clone().unwrap_or_default();
            let max = self.max_archive_bytes.unwrap_or(MAX_INFLATED);
            let store = s3::S3Store::open(&cfg, &prefix, env, spool, max)?;
            return Ok(Store::S3(Box::new(store)));
        }
        let root = self
            .path
            .clone()
            .unwrap_or_else(|| cache_dir.join("ci-cache"));
        let max = self
            .max_size_mib
            .map(|m| m.saturating_mul(1 << 20))
            .unwrap_or(store::DEFAULT_MAX_BYTES);
        let s = LocalStore::open(&root, max).map_err(io_at(root.clone()))?;
        s.clean_tmp();
        Ok(Store::Local(s))
    }
}

/// Most bytes a cache archive may inflate to when restored: the most a
/// job may save, plus tar headers.
const MAX_INFLATED: u64 = proto::MAX_ARTIFACT_BYTES + (1 << 30);

/// One job's caches: what it restores before and saves after its VM.
pub struct JobCaches {
    store: Store,
    /// The project (and runner) the keys belong to.
    namespace: String,
    specs: Vec<CacheSpec>,
    /// `CACHE_FALLBACK_KEY`, tried last.
    fallback: Option<String>,
    max_archive_bytes: Option<u64>,
    /// The workspace's files before any cache was restored (the checkout):
    /// what `untracked` leaves out.
    tracked: HashSet<PathBuf>,
}

impl JobCaches {
    /// The caches `specs` of a job in `namespace`, with the job's
    /// `CACHE_FALLBACK_KEY`.
    pub fn new(
        store: Store,
        namespace: String,
        specs: Vec<CacheSpec>,
        fallback: Option<String>,
        max_archive_bytes: Option<u64>,
    ) -> JobCaches {
        JobCaches {
            store,
            namespace,
            specs,
            fallback: fallback.filter(|k| !k.is_empty()),
            max_archive_bytes,
            tracked: HashSet::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Restore every cache the job pulls into `workspace`, the first of
    /// its keys that has one. `say` gets the job log's lines.
    pub fn restore(&mut self, workspace: &Path, say: &mut dyn FnMut(String)) {
        self.tracked = kiln_agent::glob::select_paths(workspace, &["*".into()], &[".git".into()])
            .into_iter()
            .collect();
        for (i, c) in self.specs.iter().enumerate() {
            if !c.policy.pulls() {
                say(format!("Not downloading cache {} due to policy", c.key));
                continue;
            }
            let mut keys: Vec<&str> = vec![c.key.as_str()];
            keys.extend(c.fallback_keys.iter().map(String::as_str));
            if let Some(f) = &self.fallback {
                if f.ends_with("-protected") {
                    say(format!(
                        "WARNING: CACHE_FALLBACK_KEY \"{f}\" not allowed to end in \"-protected\""
                    ));
                } else {
                    keys.push(f);
                }
            }
            for (n, key) in keys.iter().enumerate() {
                if n > 0 {
                    say(format!("Trying fallback cache key {key}..."));
                }
                say(format!("Checking cache for {key}..."));
                let archive = match self.store.fetch(&self.namespace, key) {
                    Ok(Some(a)) => a,
                    Ok(None) => {
                        say(format!(
                            "WARNING: no cache for {key} {}",
                            self.store.location()
                        ));
                        say("Failed to extract cache".into());
                        continue;
                    }
                    Err(e) => {
                        say(format!("WARNING: {}", error_chain(&e)));
                        say("Failed to extract cache".into());
                        continue;
                    }
                };
                let scratch = workspace
                    .with_file_name(format!("job-{}-cache-restore-{i}-{n}", std::process::id()));
                match archive::unpack(archive.path(), workspace, &scratch, MAX_INFLATED) {
                    Ok(got) => {
                        for p in got.problems.iter().take(proto::MAX_PROBLEMS) {
                            say(format!("WARNING: cache entry left out: {p}"));
                        }
                        say(format!(
                            "Successfully extracted cache ({} files, {})",
                            got.files,
                            human_bytes(got.bytes)
                        ));
                        break;
                    }
                    Err(e) => {
                        say(format!("WARNING: {key}: {e}"));
                        say("Failed to extract cache".into());
                    }
                }
            }
        }
    }

    /// Save each cache the job pushes after steps that `succeeded`, from
    /// the files the guest sent back into `collected/<index>`.
    pub fn save(&self, collected: &Path, succeeded: bool, say: &mut dyn FnMut(String)) {
        for (i, c) in self.specs.iter().enumerate() {
            if !c.policy.pushes() {
                say(format!("Not uploading cache {} due to policy", c.key));
                continue;
            }
            if !saved_when(c.when, succeeded) {
                continue;
            }
            say(format!("Creating cache {}...", c.key));
            let from = collected.join(i.to_string());
            if !from.is_dir() {
                // The executor said why (over the limit, or no VM).
                say("WARNING: the job sent no files for this cache".into());
                say("Failed to create cache".into());
                continue;
            }
            let mut files = kiln_agent::glob::select_paths(&from, &c.paths, &[]);
            if c.untracked {
                let all = kiln_agent::glob::select_paths(&from, &["*".into()], &[".git".into()]);
                files.extend(all.into_iter().filter(|f| !self.tracked.contains(f)));
                files.sort();
                files.dedup();
            }
            if files.is_empty() {
                say(format!(
                    "WARNING: {}: no matching files",
                    if c.paths.is_empty() {
                        "untracked".to_string()
                    } else {
                        c.paths.join(", ")
                    }
                ));
            }
            let tmp = self.store.temp_path();
            let saved = archive::pack(&from, &files, &tmp).map_err(|e| e.to_string());
            let saved = saved.and_then(|size| match self.max_archive_bytes {
                Some(max) if size > max => Err(format!(
                    "the archive ({}) is over MaxUploadedArchiveSize ({})",
                    human_bytes(size),
                    human_bytes(max)
                )),
                _ => self
                    .store
                    .publish(&tmp, &self.namespace, &c.key)
                    .map(|()| size)
                    .map_err(|e| error_chain(&e)),
            });
            match saved {
                Ok(size) => say(format!(
                    "Created cache ({} files, {})",
                    files.len(),
                    human_bytes(size)
                )),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    say(format!("WARNING: {e}"));
                    say("Failed to create cache".into());
                }
            }
        }
    }
}
