//! `kiln run-job FILE JOB`: pipeline files on a developer's machine, like act
//! and gitlab-ci-local, each job in a VM.
//!
//! The workspace is a *copy* of the checkout (git-tracked files plus
//! uncommitted and untracked-but-not-ignored ones, like act), staged in the
//! run directory: the job can never modify the user's checkout, and staging
//! only reads it (read-only opens, never through a symbolic link). Artifacts
//! are copied from the job's view of the workspace into a host folder that
//! kiln creates (and marks): kiln never deletes or overwrites anything it
//! did not make.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use kiln_pipelines::{JobSpec, LocalContext, Options, Pipeline};

/// Facts about the checkout around `file`, read from git.
pub fn local_context(file: &Path, extra_vars: Vec<(String, String)>) -> Result<LocalContext> {
    let file_dir = file
        .canonicalize()
        .with_context(|| format!("cannot open {}", file.display()))?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let git = |args: &[&str]| -> Option<String> {
        let o = Command::new("git")
            .args(args)
            .current_dir(&file_dir)
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let project_dir = git(&["rev-parse", "--show-toplevel"])
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Not a git checkout: the file's directory (or the one above `.github/workflows`).
            let mut d = file_dir.clone();
            if d.ends_with(".github/workflows") {
                d.pop();
                d.pop();
            }
            d
        });
    let name = project_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "project".into());
    let mut ctx = LocalContext::new(project_dir, name);
    ctx.commit_sha = git(&["rev-parse", "HEAD"]).unwrap_or_default();
    ctx.branch = git(&["symbolic-ref", "--short", "-q", "HEAD"]).filter(|b| !b.is_empty());
    ctx.extra_vars = extra_vars;
    crate::checkout::fill(&mut ctx);
    Ok(ctx)
}

/// Parse `file` (format detected). The file and its includes are read with
/// the size limit of `opts.limits`; includes only from inside the project.
pub fn load_pipeline(file: &Path, ctx: &LocalContext, opts: &Options) -> Result<Pipeline> {
    let contents = kiln_pipelines::read_file(file, opts.limits.max_file_bytes)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let files = kiln_pipelines::ProjectFiles::new(&ctx.project_dir, &opts.limits);
    Ok(kiln_pipelines::load(file, &contents, ctx, opts, &|rel| {
        files.read(rel)
    })?)
}

/// The jobs to run for `name`: every job called `name` (or expanded from the
/// job key `name` by a matrix), filtered by `matrix` (`key=value` pairs,
/// matched against the job's variables or its name), with their `needs`
/// first, in dependency order.
pub fn select_jobs<'a>(
    pipeline: &'a Pipeline,
    name: &str,
    matrix: &[(String, String)],
) -> Result<Vec<&'a JobSpec>> {
    let matches_matrix = |j: &JobSpec| {
        matrix.iter().all(|(k, v)| {
            j.variables
                .iter()
                .any(|var| &var.key == k && &var.value == v)
                || j.name.contains(v.as_str())
        })
    };
    let targets: Vec<&JobSpec> = pipeline
        .jobs
        .iter()
        .filter(|j| (j.name == name || j.id == name) && matches_matrix(j))
        .collect();
    if targets.is_empty() {
        const SHOWN: usize = 20;
        let mut names: Vec<String> = pipeline
            .jobs
            .iter()
            .take(SHOWN)
            .map(|j| j.name.chars().take(80).collect())
            .collect();
        if pipeline.jobs.len() > SHOWN {
            names.push(format!(
                "and {} more (see --list)",
                pipeline.jobs.len() - SHOWN
            ));
        }
        let shown: String = name.chars().take(80).collect();
        bail!(
            "no job '{}'{} in the pipeline; jobs: {}",
            shown.escape_debug(),
            if matrix.is_empty() {
                ""
            } else {
                " matching --matrix"
            },
            names.join(", ")
        );
    }
    // Dependencies first, in O(jobs + needs); cycles were rejected by the parser.
    let index: HashMap<&str, usize> = pipeline
        .jobs
        .iter()
        .enumerate()
        .rev()
        .map(|(i, j)| (j.name.as_str(), i))
        .collect();
    let mut order: Vec<&JobSpec> = Vec::new();
    let mut state = vec![0u8; pipeline.jobs.len()]; // 0 new, 1 open, 2 done
    for t in targets {
        let Some(&start) = index.get(t.name.as_str()) else {
            continue;
        };
        let mut stack: Vec<(usize, usize)> = Vec::new();
        if state[start] == 0 {
            state[start] = 1;
            stack.push((start, 0));
        }
        while let Some(&mut (i, ref mut next)) = stack.last_mut() {
            let job = &pipeline.jobs[i];
            let Some(n) = job.needs.as_deref().unwrap_or_default().get(*next) else {
                state[i] = 2;
                order.push(job);
                stack.pop();
                continue;
            };
            *next += 1;
            let &d = index.get(n.as_str()).with_context(|| {
                format!(
                    "job '{}' needs '{}', which is not in the pipeline",
                    job.name.chars().take(80).collect::<String>(),
                    n.chars().take(80).collect::<String>()
                )
            })?;
            if state[d] == 0 {
                state[d] = 1;
                stack.push((d, 0));
            }
        }
    }
    Ok(order)
}

/// What staging the checkout did.
#[derive(Debug, Default)]
pub struct Staged {
    /// Files and symbolic links copied.
    pub files: u64,
    /// Paths left out because they lie beyond a symbolic link in the
    /// checkout (as git sees them: a tracked directory replaced by a link
    /// to elsewhere holds no tracked files).
    pub beyond_links: Vec<PathBuf>,
}

/// Copy the checkout's files (tracked, modified, untracked-not-ignored; or
/// every file when it is not a git checkout) into `dest`, a directory this
/// creates (it must not exist). The checkout is only read: files are opened
/// read-only and never through a symbolic link; links are copied as links
/// (they point wherever they point inside the VM); nothing beyond a link is
/// read. Names need not be UTF-8.
pub fn stage_workspace(project_dir: &Path, dest: &Path) -> Result<Staged> {
    std::fs::create_dir(dest).with_context(|| format!("creating {}", dest.display()))?;
    let listed = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(project_dir)
        .output();
    let files: Vec<PathBuf> = match listed {
        Ok(o) if o.status.success() => {
            let mut v: Vec<PathBuf> = o
                .stdout
                .split(|b| *b == 0)
                .filter(|p| !p.is_empty())
                .map(|p| PathBuf::from(OsStr::from_bytes(p)))
                .collect();
            // Tracked and untracked lists can name a path twice (e.g. a
            // file both in the index and re-added).
            v.sort();
            v.dedup();
            v
        }
        _ => walk(project_dir)?,
    };
    let mut staged = Staged::default();
    let mut real_dirs: BTreeSet<PathBuf> = BTreeSet::new();
    for rel in files {
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            continue;
        }
        // Every directory above the file must be a real directory of the
        // checkout, not a link out of it.
        if !ancestors_are_dirs(project_dir, &rel, &mut real_dirs) {
            staged.beyond_links.push(rel);
            continue;
        }
        let src = project_dir.join(&rel);
        let Ok(meta) = std::fs::symlink_metadata(&src) else {
            continue; // deleted but tracked
        };
        if !meta.file_type().is_symlink() && !meta.is_file() {
            continue; // submodule directories and the like
        }
        if let Some(parent) = rel.parent() {
            make_dirs(dest, parent)?;
        }
        let to = dest.join(&rel);
        if meta.file_type().is_symlink() {
            let target =
                std::fs::read_link(&src).with_context(|| format!("reading {}", src.display()))?;
            std::os::unix::fs::symlink(target, &to)
                .with_context(|| format!("creating {}", to.display()))?;
        } else {
            copy_file_new(&src, &to)?;
        }
        staged.files += 1;
    }
    Ok(staged)
}

/// Whether every directory above `rel` in `root` is a real directory (not
/// a symbolic link); `known` caches the ones already checked.
fn ancestors_are_dirs(root: &Path, rel: &Path, known: &mut BTreeSet<PathBuf>) -> bool {
    let mut dirs: Vec<&Path> = rel.ancestors().skip(1).collect();
    dirs.pop(); // ""
    for d in dirs.into_iter().rev() {
        if known.contains(d) {
            continue;
        }
        match std::fs::symlink_metadata(root.join(d)) {
            Ok(m) if m.is_dir() => {
                known.insert(d.to_path_buf());
            }
            _ => return false,
        }
    }
    true
}

/// Create the directories of `rel` below `root`, one by one; an existing
/// one must be a real directory (never a link: nothing is written through
/// one).
fn make_dirs(root: &Path, rel: &Path) -> Result<()> {
    let mut path = root.to_path_buf();
    for c in rel.components() {
        path.push(c);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                    bail!(
                        "{} is not a directory (a file or a symbolic link is in the way)",
                        path.display()
                    );
                }
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
    Ok(())
}

/// Copy the regular file `src` to `to`, which must not exist. `src` is
/// opened read-only and not through a final symbolic link; `to` is created
/// new, never through a link.
fn copy_file_new(src: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut from = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(src)
        .with_context(|| format!("opening {}", src.display()))?;
    let meta = from
        .metadata()
        .with_context(|| format!("reading {}", src.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", src.display());
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .with_context(|| format!("creating {}", to.display()))?;
    std::io::copy(&mut from, &mut out).with_context(|| format!("copying {}", src.display()))?;
    out.set_permissions(std::fs::Permissions::from_mode(
        meta.permissions().mode() & 0o777,
    ))
    .with_context(|| format!("setting the mode of {}", to.display()))?;
    Ok(())
}

fn walk(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel))? {
            let e = e?;
            let name = e.file_name();
            if name == ".git" {
                continue;
            }
            let r = rel.join(&name);
            // DirEntry::file_type does not follow links: a link to a
            // directory is listed (and staged) as a link.
            if e.file_type()?.is_dir() {
                stack.push(r);
            } else {
                out.push(r);
            }
        }
    }
    Ok(out)
}

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
    fn staging_copies_tracked_and_untracked_but_not_ignored_files() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("repo");
        std::fs::create_dir_all(repo.join("src")).unwrap();
        let git = |args: &[&str]| {
            let ok = Command::new("git")
                .args(args)
                .current_dir(&repo)
                .output()
                .map(|o| o.status.success());
            ok.unwrap_or(false)
        };
        if !kiln_testkit::require("staging", &[kiln_testkit::tool("git", "git")]) {
            return;
        }
        assert!(git(&["init", "-q"]), "git init failed");
        std::fs::write(repo.join(".gitignore"), "ignored.txt\n").unwrap();
        std::fs::write(repo.join("src/main.rs"), "fn main() {}").unwrap();
        std::fs::write(repo.join("ignored.txt"), "no").unwrap();
        git(&["add", "."]);
        std::fs::write(repo.join("new.txt"), "uncommitted").unwrap();
        let dest = d.path().join("stage");
        let n = stage_workspace(&repo, &dest).unwrap().files;
        assert_eq!(n, 3, "src/main.rs, .gitignore, new.txt");
        assert!(dest.join("new.txt").exists() && dest.join("src/main.rs").exists());
        assert!(!dest.join("ignored.txt").exists() && !dest.join(".git").exists());
    }

    fn sha_tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut v: Vec<(PathBuf, Vec<u8>)> = walk(root)
            .unwrap()
            .into_iter()
            .map(|r| {
                let p = root.join(&r);
                let m = std::fs::symlink_metadata(&p).unwrap();
                let data = if m.file_type().is_symlink() {
                    std::fs::read_link(&p).unwrap().into_os_string().into_vec()
                } else {
                    std::fs::read(&p).unwrap()
                };
                (r, data)
            })
            .collect();
        v.sort();
        v
    }
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn staging_never_writes_through_a_tracked_directory_replaced_by_a_link() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("repo");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(repo.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(repo.join("sub/file.txt"), "tracked").unwrap();
        std::fs::write(outside.join("file.txt"), "precious, outside the checkout").unwrap();
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(&repo)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !kiln_testkit::require("staging_links", &[kiln_testkit::tool("git", "git")]) {
            return;
        }
        assert!(git(&["init", "-q"]), "git init failed");
        assert!(git(&["add", "."]));
        // The tracked directory becomes a link to a directory elsewhere.
        std::fs::remove_dir_all(repo.join("sub")).unwrap();
        std::os::unix::fs::symlink(&outside, repo.join("sub")).unwrap();
        let before = (sha_tree(&repo), sha_tree(&outside));
        let dest = d.path().join("stage");
        let staged = stage_workspace(&repo, &dest).unwrap();
        assert_eq!(
            before,
            (sha_tree(&repo), sha_tree(&outside)),
            "nothing changed"
        );
        assert_eq!(staged.beyond_links, vec![PathBuf::from("sub/file.txt")]);
        let m = std::fs::symlink_metadata(dest.join("sub")).unwrap();
        assert!(m.file_type().is_symlink(), "the link is staged as a link");
        // A staged tree is never written into twice.
        assert!(stage_workspace(&repo, &dest).is_err());
    }

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
