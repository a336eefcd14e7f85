//! The artifacts of local runs: the `--artifacts-dir` rules (a folder per
//! job, only ever one kiln made, marked `.kiln-artifacts`, or an empty
//! one), collecting what the guest sent back, and handing it to later jobs.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kiln_pipelines::JobSpec;

use super::copy::{copy_file_new, make_dirs, walk};

/// The file that marks a job's artifact folder as made by kiln. kiln
/// replaces a folder holding it on the next run, and no other.
pub const ARTIFACTS_MARKER: &str = ".kiln-artifacts";

/// A job's folder name under `--artifacts-dir`: the job's name when it is a
/// plain file name (letters, digits, `-`, `_`, `.`, not starting with a
/// dot, at most 100 bytes), else a sanitized form with a hash of the name,
/// so `../x`, `/etc` or `a/b` can never become a path and two names never
/// share a folder.
pub fn job_dir_name(job: &str) -> String {
    let plain = !job.is_empty()
        && job.len() <= 100
        && !job.starts_with('.')
        && job
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if plain {
        return job.to_string();
    }
    let mut clean: String = job
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if clean.is_empty() {
        clean.push('_');
    }
    format!("{clean}-{:08x}", crc32fast::hash(job.as_bytes()))
}

/// Check, before any job runs, that kiln may put artifacts at `to`: it does
/// not exist, is an empty directory, or is a folder kiln made (marked).
/// Anything else is the user's and is never touched.
pub fn check_artifacts_target(to: &Path) -> Result<()> {
    match std::fs::symlink_metadata(to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("checking {}", to.display())),
        Ok(m) if m.is_dir() => {
            if is_kilns(to) || is_empty_dir(to) {
                Ok(())
            } else {
                bail!(
                    "{} exists and kiln did not create it; kiln puts each job's artifacts in \
                     <artifacts-dir>/<job> and never replaces a folder it did not make. \
                     Choose another --artifacts-dir (default: kiln-artifacts) or move {} away",
                    to.display(),
                    to.display()
                )
            }
        }
        Ok(_) => bail!(
            "{} exists and is not a folder kiln made; choose another --artifacts-dir or move it away",
            to.display()
        ),
    }
}

fn is_kilns(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join(ARTIFACTS_MARKER)).is_ok_and(|m| m.is_file())
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

/// What collecting a job's artifacts did.
#[derive(Debug, Default)]
pub struct Collected {
    /// Files put into the target folder (relative paths).
    pub files: Vec<PathBuf>,
    /// Selected files that were not copied, and why.
    pub skipped: Vec<String>,
    /// A folder of an earlier run (kiln's) was removed because this run
    /// produced no artifacts.
    pub removed_stale: bool,
}

/// Copy the job's artifacts (per spec: `paths` minus `exclude`, if its
/// `when` matches) from `from` (what the guest sent back) into `to`.
/// They are copied into a fresh folder kiln creates next to `to`, marked
/// as kiln's, then moved into place; an existing `to` is replaced only when
/// kiln made it or it is empty (see [`check_artifacts_target`]), otherwise
/// this fails and changes nothing. Regular files only.
pub fn collect_artifacts(
    job: &JobSpec,
    from: &Path,
    to: &Path,
    succeeded: bool,
) -> Result<Collected> {
    use kiln_agent::glob::select_paths;
    use kiln_pipelines::ArtifactWhen;
    check_artifacts_target(to)?;
    let parent = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = to
        .file_name()
        .with_context(|| format!("{} has no folder name", to.display()))?
        .to_os_string();
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    clean_stale_staging(parent);
    let mut wanted: BTreeSet<PathBuf> = BTreeSet::new();
    for a in &job.artifacts {
        let take = match a.when {
            ArtifactWhen::OnSuccess => succeeded,
            ArtifactWhen::OnFailure => !succeeded,
            ArtifactWhen::Always => true,
        };
        if take {
            wanted.extend(select_paths(from, &a.paths, &a.exclude));
        }
    }
    let mut out = Collected::default();
    if wanted.is_empty() {
        if to.exists() && is_kilns(to) {
            std::fs::remove_dir_all(to).with_context(|| format!("removing {}", to.display()))?;
            out.removed_stale = true;
        }
        return Ok(out);
    }
    let pid = std::process::id();
    let mut staging_name = std::ffi::OsString::from(format!(".kiln-staging-{pid}-"));
    staging_name.push(&name);
    let staging = parent.join(staging_name);
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let marker = || -> Result<()> {
        std::fs::write(
            staging.join(ARTIFACTS_MARKER),
            "This folder was made by kiln (run-job --artifacts-dir); kiln replaces it on the next run.\n",
        )?;
        Ok(())
    };
    let filled = marker().and_then(|()| {
        for rel in wanted {
            if rel.as_os_str() == ARTIFACTS_MARKER {
                out.skipped
                    .push(format!("{ARTIFACTS_MARKER}: the name is kiln's marker"));
                continue;
            }
            if let Some(p) = rel.parent() {
                make_dirs(&staging, p)?;
            }
            copy_file_new(&from.join(&rel), &staging.join(&rel))?;
            out.files.push(rel);
        }
        Ok(())
    });
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if let Err(e) = replace_with(to, &staging, parent, &name) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    Ok(out)
}

/// Collect the artifacts of `job` (see [`collect_artifacts`]) and say on
/// stderr what came of it. Returns whether files were copied (`to` then
/// goes into later jobs' workspaces).
pub fn collect_and_report(job: &JobSpec, from: &Path, to: &Path, succeeded: bool) -> bool {
    match collect_artifacts(job, from, to, succeeded) {
        Ok(c) => {
            for s in &c.skipped {
                eprintln!("kiln: artifact left out: {s}");
            }
            if !c.files.is_empty() {
                eprintln!(
                    "kiln: {} artifact files copied to {}",
                    c.files.len(),
                    to.display()
                );
                return true;
            }
            eprintln!(
                "kiln: no artifact matched {:?}{}",
                job.artifacts.iter().map(|a| &a.paths).collect::<Vec<_>>(),
                if c.removed_stale {
                    format!("; removed the previous run's {}", to.display())
                } else {
                    String::new()
                }
            );
        }
        Err(e) => eprintln!("kiln: collecting artifacts: {e:#}"),
    }
    false
}

/// Put `staging` at `to`: `to` is absent, empty or kiln's (checked again
/// now, right before it is replaced).
fn replace_with(to: &Path, staging: &Path, parent: &Path, name: &OsStr) -> Result<()> {
    check_artifacts_target(to)?;
    if std::fs::symlink_metadata(to).is_err() {
        return std::fs::rename(staging, to)
            .with_context(|| format!("moving {} to {}", staging.display(), to.display()));
    }
    if !is_kilns(to) {
        // Empty (checked above): rmdir removes only an empty folder.
        std::fs::remove_dir(to).with_context(|| format!("replacing {}", to.display()))?;
        return std::fs::rename(staging, to)
            .with_context(|| format!("moving {} to {}", staging.display(), to.display()));
    }
    let mut old_name = std::ffi::OsString::from(format!(".kiln-old-{}-", std::process::id()));
    old_name.push(name);
    let old = parent.join(old_name);
    std::fs::rename(to, &old).with_context(|| format!("moving {} aside", to.display()))?;
    if let Err(e) = std::fs::rename(staging, to) {
        let _ = std::fs::rename(&old, to);
        return Err(e).with_context(|| format!("moving {} to {}", staging.display(), to.display()));
    }
    // `old` was kiln's; remove_dir_all does not follow links inside it.
    std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    Ok(())
}

/// Remove `.kiln-staging-<pid>-*` and `.kiln-old-<pid>-*` folders a kiln
/// that died left in `dir` (only marked ones, and only if that kiln is gone).
fn clean_stale_staging(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(rest) = name
            .strip_prefix(".kiln-staging-")
            .or_else(|| name.strip_prefix(".kiln-old-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let path = e.path();
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && e.file_type().is_ok_and(|t| t.is_dir())
            && is_kilns(&path)
        {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Copy every regular file under `from` (artifacts of an earlier job) into
/// the staged workspace `to` (same relative paths), replacing what is
/// there, as GitLab unpacks dependencies' artifacts into the workspace.
/// Never writes through a symbolic link the checkout put in the staged
/// tree: such files are left out, with a warning. kiln's marker is skipped.
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for rel in walk(from)? {
        if rel.as_os_str() == ARTIFACTS_MARKER
            || !std::fs::symlink_metadata(from.join(&rel))?.is_file()
        {
            continue; // never follow a link out of `from`
        }
        if let Some(parent) = rel.parent() {
            if let Err(e) = make_dirs(to, parent) {
                tracing::warn!("artifact {} not put in the workspace: {e:#}", rel.display());
                continue;
            }
        }
        let dest = to.join(&rel);
        if let Ok(m) = std::fs::symlink_metadata(&dest) {
            if m.is_dir() {
                tracing::warn!(
                    "artifact {} not put in the workspace: a folder is in the way",
                    rel.display()
                );
                continue;
            }
            // A file or link of the staged checkout (kiln's copy): unlink
            // it, never write through it.
            std::fs::remove_file(&dest).with_context(|| format!("replacing {}", dest.display()))?;
        }
        copy_file_new(&from.join(&rel), &dest)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_from_earlier_jobs_never_go_through_a_staged_link() {
        let d = tempfile::tempdir().unwrap();
        let (arts, stage, outside) = (d.path().join("a"), d.path().join("s"), d.path().join("o"));
        for p in [&arts, &stage, &outside] {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::create_dir_all(arts.join("dist")).unwrap();
        std::fs::write(arts.join("dist/out.txt"), "new").unwrap();
        std::fs::write(arts.join("top.txt"), "new top").unwrap();
        std::fs::write(arts.join(ARTIFACTS_MARKER), "").unwrap();
        std::fs::write(outside.join("out.txt"), "precious").unwrap();
        std::fs::write(outside.join("top.txt"), "precious too").unwrap();
        std::os::unix::fs::symlink(&outside, stage.join("dist")).unwrap();
        std::os::unix::fs::symlink(outside.join("top.txt"), stage.join("top.txt")).unwrap();
        copy_tree(&arts, &stage).unwrap();
        assert_eq!(std::fs::read(outside.join("out.txt")).unwrap(), b"precious");
        assert_eq!(
            std::fs::read(outside.join("top.txt")).unwrap(),
            b"precious too"
        );
        assert_eq!(std::fs::read(stage.join("top.txt")).unwrap(), b"new top");
        assert!(!stage.join(ARTIFACTS_MARKER).exists());
    }

    #[test]
    fn job_names_never_become_paths() {
        assert_eq!(job_dir_name("build"), "build");
        assert_eq!(job_dir_name("test-1.2_x"), "test-1.2_x");
        for hostile in [
            "..",
            ".",
            "../x",
            "/etc",
            "a/b",
            "",
            ".hidden",
            &"x".repeat(300),
        ] {
            let n = job_dir_name(hostile);
            assert!(
                !n.is_empty() && !n.starts_with('.') && !n.contains('/') && n.len() <= 80,
                "{hostile:?} -> {n:?}"
            );
        }
        assert_ne!(job_dir_name("a/b"), job_dir_name("a_b"), "no shared folder");
    }

    #[test]
    fn artifacts_replace_only_folders_kiln_made() {
        use kiln_pipelines::{ArtifactSpec, ArtifactWhen, Step};
        let d = tempfile::tempdir().unwrap();
        let from = d.path().join("from");
        std::fs::create_dir_all(from.join("dist")).unwrap();
        std::fs::write(from.join("dist/out.txt"), "built").unwrap();
        let mut job = JobSpec::single("docs", "img", Step::script("s", "x"));
        job.artifacts.push(ArtifactSpec {
            name: None,
            paths: vec!["dist/".into()],
            exclude: Vec::new(),
            untracked: false,
            when: ArtifactWhen::OnSuccess,
            expire_in: None,
        });
        // A user's folder of that name: refused, untouched.
        let users = d.path().join("docs");
        std::fs::create_dir_all(&users).unwrap();
        std::fs::write(users.join("guide.md"), "mine").unwrap();
        let e = collect_artifacts(&job, &from, &users, true).unwrap_err();
        assert!(format!("{e:#}").contains("kiln did not create it"), "{e:#}");
        assert_eq!(std::fs::read(users.join("guide.md")).unwrap(), b"mine");
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            2,
            "no staging left"
        );
        // A fresh folder: made and marked; the next run replaces it.
        let to = d.path().join("arts/docs");
        let got = collect_artifacts(&job, &from, &to, true).unwrap();
        assert_eq!(got.files, vec![PathBuf::from("dist/out.txt")]);
        assert!(to.join(ARTIFACTS_MARKER).is_file());
        std::fs::write(from.join("dist/out.txt"), "rebuilt").unwrap();
        collect_artifacts(&job, &from, &to, true).unwrap();
        assert_eq!(std::fs::read(to.join("dist/out.txt")).unwrap(), b"rebuilt");
        assert_eq!(std::fs::read_dir(d.path().join("arts")).unwrap().count(), 1);
        // No artifacts this time: the stale folder of the last run goes.
        let got = collect_artifacts(&job, &from, &to, false).unwrap();
        assert!(got.removed_stale && !to.exists());
        // An empty folder is taken.
        std::fs::create_dir_all(&to).unwrap();
        collect_artifacts(&job, &from, &to, true).unwrap();
        assert!(to.join("dist/out.txt").is_file());
    }
}
