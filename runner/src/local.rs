//! `kiln run-job FILE JOB`: pipeline files on a developer's machine, like act
//! and gitlab-ci-local, each job in a VM.
//!
//! The workspace is a *copy* of the checkout (git-tracked files plus
//! uncommitted and untracked-but-not-ignored ones, like act), staged in the
//! run directory: the job can never modify the user's checkout. Artifacts
//! are copied from the job's view of the workspace into a host folder.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

/// Copy the checkout's files (tracked, modified, untracked-not-ignored; or
/// every file when it is not a git checkout) into `dest`.
pub fn stage_workspace(project_dir: &Path, dest: &Path) -> Result<u64> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
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
        Ok(o) if o.status.success() => o
            .stdout
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| PathBuf::from(String::from_utf8_lossy(p).to_string()))
            .collect(),
        _ => walk(project_dir)?,
    };
    let mut n = 0;
    for rel in files {
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            continue;
        }
        let src = project_dir.join(&rel);
        let Ok(meta) = std::fs::symlink_metadata(&src) else {
            continue;
        }; // deleted but tracked
        let to = dest.join(&rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &to)?;
        } else if meta.is_file() {
            std::fs::copy(&src, &to).with_context(|| format!("copying {}", src.display()))?;
        } else {
            continue; // submodule directories and the like
        }
        n += 1;
    }
    Ok(n)
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
            if e.file_type()?.is_dir() {
                stack.push(r);
            } else {
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// Copy the job's artifacts (per spec: `paths` minus `exclude`, if its
/// `when` matches) from `from` (what the guest sent back) into `to`, which
/// is replaced. Returns the relative paths copied. Regular files only.
pub fn collect_artifacts(
    job: &JobSpec,
    from: &Path,
    to: &Path,
    succeeded: bool,
) -> Result<Vec<String>> {
    use kiln_pipelines::ArtifactWhen;
    let mut copied = Vec::new();
    let _ = std::fs::remove_dir_all(to);
    for a in &job.artifacts {
        let wanted = match a.when {
            ArtifactWhen::OnSuccess => succeeded,
            ArtifactWhen::OnFailure => !succeeded,
            ArtifactWhen::Always => true,
        };
        if !wanted {
            continue;
        }
        for rel in kiln_agent::glob::select(from, &a.paths, &a.exclude) {
            let dest = to.join(&rel);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::copy(from.join(&rel), &dest)
                .with_context(|| format!("copying artifact {rel}"))?;
            copied.push(rel);
        }
    }
    Ok(copied)
}

/// Copy every file under `from` into `to` (same relative paths).
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for rel in walk(from)? {
        if !std::fs::symlink_metadata(from.join(&rel))?.is_file() {
            continue; // never follow a link out of `from`
        }
        let dest = to.join(&rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from.join(&rel), &dest)
            .with_context(|| format!("copying {}", rel.display()))?;
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
        if !git(&["init", "-q"]) {
            eprintln!("skipping: git is not installed");
            return;
        }
        std::fs::write(repo.join(".gitignore"), "ignored.txt\n").unwrap();
        std::fs::write(repo.join("src/main.rs"), "fn main() {}").unwrap();
        std::fs::write(repo.join("ignored.txt"), "no").unwrap();
        git(&["add", "."]);
        std::fs::write(repo.join("new.txt"), "uncommitted").unwrap();
        let dest = d.path().join("stage");
        let n = stage_workspace(&repo, &dest).unwrap();
        assert_eq!(n, 3, "src/main.rs, .gitignore, new.txt");
        assert!(dest.join("new.txt").exists() && dest.join("src/main.rs").exists());
        assert!(!dest.join("ignored.txt").exists() && !dest.join(".git").exists());
    }
}
