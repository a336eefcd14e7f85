//! Staging the checkout: a copy of it becomes the job's workspace, so the
//! job never modifies the user's files.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::artifacts::job_dir_name;
use super::copy::{copy_file_new, make_dirs, walk};

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

/// A job's staged workspace in the run directory, removed when the job is
/// done.
pub struct StageDir(PathBuf);

impl StageDir {
    /// Stage `project_dir` as the workspace of job `job` in `run_dir`.
    pub fn stage(project_dir: &Path, run_dir: &Path, job: &str) -> Result<StageDir> {
        // Named like job directories, so a later kiln removes them if this one dies.
        let stage = run_dir.join(format!(
            "job-{}-stage-{}",
            std::process::id(),
            job_dir_name(job)
        ));
        // Ours (the run directory, this pid): a leftover of an earlier job.
        let _ = std::fs::remove_dir_all(&stage);
        let staged = stage_workspace(project_dir, &stage)?;
        tracing::info!(
            "staged {} files of {} as the workspace",
            staged.files,
            project_dir.display()
        );
        if let Some(first) = staged.beyond_links.first() {
            eprintln!(
                "kiln: note: {} file(s) lie beyond a symbolic link in the checkout and were not staged (e.g. {})",
                staged.beyond_links.len(),
                first.display()
            );
        }
        Ok(StageDir(stage))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `<stage>-artifacts`: where the guest's artifact files land.
    pub fn artifacts_dir(&self) -> PathBuf {
        PathBuf::from(format!("{}-artifacts", self.0.display()))
    }
}

impl Drop for StageDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
}
