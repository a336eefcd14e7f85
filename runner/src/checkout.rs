//! Facts about a git checkout that GitLab's predefined variables are made
//! of: the `origin` remote, its default branch, the tag of a detached HEAD,
//! the commit's message, author and time, and the user. Each is read with
//! one `git` command; a fact git cannot tell stays unknown.

use std::path::Path;
use std::process::Command;

use kiln_pipelines::LocalContext;

/// Runs `git args` in `dir`; its trimmed stdout when it succeeds.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let o = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim_end().to_string())
        .filter(|s| !s.is_empty())
}

/// Fills the checkout facts of `ctx` from the git repository at
/// `ctx.project_dir` (nothing when it is not one).
pub fn fill(ctx: &mut LocalContext) {
    let dir = ctx.project_dir.clone();
    let g = |args: &[&str]| git(&dir, args);
    ctx.remote_url = g(&["remote", "get-url", "origin"]).or_else(|| {
        let first = g(&["remote"])?;
        g(&["remote", "get-url", first.lines().next()?])
    });
    ctx.default_branch = default_branch(&dir);
    if ctx.branch.is_none() {
        // A detached HEAD exactly at a tag is what a tag pipeline checks out.
        ctx.tag = g(&["describe", "--tags", "--exact-match", "HEAD"]);
    }
    if !ctx.commit_sha.is_empty() {
        ctx.commit_message = g(&["log", "-1", "--format=%B", "HEAD"]).map(|m| m + "\n");
        ctx.commit_author = g(&["log", "-1", "--format=%an <%ae>", "HEAD"]);
        ctx.commit_timestamp = g(&["log", "-1", "--format=%cI", "HEAD"]);
    }
    ctx.user_name = g(&["config", "user.name"]);
    ctx.user_email = g(&["config", "user.email"]);
    // GitLab's login is not known locally: the local part of the
    // committer's git e-mail stands in for it (`--var` overrides).
    ctx.user_login = ctx
        .user_email
        .as_deref()
        .and_then(|email| email.split('@').next())
        .filter(|u| !u.is_empty())
        .map(str::to_string);
}

/// The remote's default branch (`origin/HEAD`), else `init.defaultBranch`
/// when that branch exists, else `main` or `master`, whichever exists.
fn default_branch(dir: &Path) -> Option<String> {
    let g = |args: &[&str]| git(dir, args);
    if let Some(r) = g(&["symbolic-ref", "--short", "-q", "refs/remotes/origin/HEAD"]) {
        if let Some(b) = r.strip_prefix("origin/") {
            return Some(b.to_string());
        }
    }
    let exists = |b: &str| {
        g(&["rev-parse", "--verify", "-q", &format!("refs/heads/{b}")]).is_some()
            || g(&[
                "rev-parse",
                "--verify",
                "-q",
                &format!("refs/remotes/origin/{b}"),
            ])
            .is_some()
    };
    let configured = g(&["config", "init.defaultBranch"]);
    configured
        .into_iter()
        .chain(["main".to_string(), "master".to_string()])
        .find(|b| exists(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_come_from_the_repository() {
        let dir = std::env::temp_dir().join(format!("kiln-checkout-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let ok = Command::new("git")
                .args(["-c", "user.name=T", "-c", "user.email=t@example.org"])
                .args(args)
                .current_dir(&dir)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(ok, "git {args:?}");
        };
        run(&["init", "-q", "-b", "trunk"]);
        run(&["config", "user.email", "t@example.org"]);
        run(&["commit", "-q", "--allow-empty", "-m", "Title\n\nBody"]);
        run(&["remote", "add", "origin", "git@gitlab.com:grp/proj.git"]);
        run(&["tag", "v1"]);
        run(&["checkout", "-q", "--detach"]);
        let mut ctx = LocalContext::new(&dir, "proj");
        ctx.commit_sha = git(&dir, &["rev-parse", "HEAD"]).unwrap();
        fill(&mut ctx);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            ctx.remote_url.as_deref(),
            Some("git@gitlab.com:grp/proj.git")
        );
        assert_eq!(ctx.tag.as_deref(), Some("v1"));
        assert_eq!(ctx.commit_message.as_deref(), Some("Title\n\nBody\n"));
        assert_eq!(ctx.user_email.as_deref(), Some("t@example.org"));
        // No origin/HEAD, no main or master: not known.
        assert_eq!(ctx.default_branch, None);
    }
}
