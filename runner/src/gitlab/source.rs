//! Fetching a job's sources on the host with the git CLI, into the job's
//! workspace directory (which then reaches the VM as its workspace disk).
//! The commands follow gitlab-runner's `writeRefspecFetchCmd` and
//! `writeCheckoutCmd`.

use std::path::Path;

use super::job::{GitInfo, Submodules};
use super::trace::Trace;
use super::GitlabError;

async fn git(ws: &Path, args: &[&str], trace: &Trace) -> Result<(), GitlabError> {
    let out = tokio::process::Command::new("git")
        .arg("-C")
        .arg(ws)
        .args([
            "-c",
            "credential.interactive=never",
            "-c",
            "fetch.recurseSubmodules=false",
        ])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| GitlabError::Git(format!("running git (is it installed?): {e}")))?;
    // Both go to the trace, which masks the job token in the URL.
    trace.write(&out.stdout);
    trace.write(&out.stderr);
    trace.flush();
    if !out.status.success() {
        return Err(GitlabError::Git(format!(
            "git {} exited with {}",
            args.first().copied().unwrap_or(""),
            out.status
        )));
    }
    Ok(())
}

/// Fetch `info.sha` into the empty directory `ws`.
pub async fn fetch(
    ws: &Path,
    info: &GitInfo,
    depth: u32,
    submodules: Submodules,
    trace: &Trace,
) -> Result<(), GitlabError> {
    if info.repo_url.is_empty() || info.sha.is_empty() {
        return Err(GitlabError::Git(
            "the job has no repository URL or commit".into(),
        ));
    }
    if depth > 0 {
        trace.line(&format!(
            "Fetching changes with git depth set to {depth}..."
        ));
    } else {
        trace.line("Fetching changes...");
    }
    git(
        ws,
        &["-c", "init.defaultBranch=none", "init", "-q", "."],
        trace,
    )
    .await?;
    git(ws, &["remote", "add", "origin", &info.repo_url], trace).await?;
    let mut args: Vec<String> = vec![
        "fetch".into(),
        "-q".into(),
        "origin".into(),
        "--no-recurse-submodules".into(),
        "--prune".into(),
    ];
    if info.refspecs.is_empty() {
        args.push(format!("+{}", info.sha));
    } else {
        args.extend(info.refspecs.iter().cloned());
    }
    if depth > 0 {
        args.push("--depth".into());
        args.push(depth.to_string());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    git(ws, &a, trace).await?;
    trace.line(&format!(
        "Checking out {} as detached HEAD (ref is {})...",
        short(&info.sha),
        info.git_ref
    ));
    git(ws, &["checkout", "-f", "-q", &info.sha], trace).await?;
    match submodules {
        Submodules::None => {}
        Submodules::Normal | Submodules::Recursive => {
            trace.line("Updating/initializing submodules...");
            git(ws, &["submodule", "sync", "--recursive"], trace).await?;
            let mut a = vec!["submodule", "update", "--init"];
            if submodules == Submodules::Recursive {
                a.push("--recursive");
            }
            git(ws, &a, trace).await?;
        }
    }
    Ok(())
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(8)]
}
