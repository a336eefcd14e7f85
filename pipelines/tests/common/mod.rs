#![allow(dead_code, unused_imports)]

mod many_jobs;
pub use many_jobs::many_jobs;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_pipelines::{github, gitlab, JobSpec, LocalContext, Options};

pub fn corpus(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(rel)
}

pub fn ctx(dir: &str, branch: Option<&str>) -> LocalContext {
    let mut c = LocalContext::new(corpus(dir), "demo");
    c.commit_sha = "0123456789abcdef0123456789abcdef01234567".into();
    c.branch = branch.map(String::from);
    c
}

pub fn gitlab_with(
    dir: &str,
    file: &str,
    c: &LocalContext,
) -> kiln_pipelines::Result<gitlab::GitlabPipeline> {
    let root = corpus(dir);
    let text = std::fs::read_to_string(root.join(file)).expect("corpus file");
    let read = |p: &str| std::fs::read_to_string(root.join(p));
    gitlab::parse(file, &text, c, &Options::default(), &read)
}

pub fn gitlab(dir: &str, file: &str) -> gitlab::GitlabPipeline {
    match gitlab_with(dir, file, &ctx(dir, Some("main"))) {
        Ok(p) => p,
        Err(e) => panic!("{file}: {e}"),
    }
}

pub fn github_with(
    file: &str,
    c: &LocalContext,
    opts: &Options,
) -> kiln_pipelines::Result<github::Workflow> {
    let path = corpus("github/.github/workflows").join(file);
    let text = std::fs::read_to_string(path).expect("corpus file");
    github::parse(file, &text, c, opts)
}

pub fn github(file: &str) -> github::Workflow {
    match github_with(file, &ctx("github", Some("main")), &Options::default()) {
        Ok(w) => w,
        Err(e) => panic!("{file}: {e}"),
    }
}

pub fn var<'a>(job: &'a JobSpec, key: &str) -> Option<&'a str> {
    job.variables
        .iter()
        .find(|v| v.key == key)
        .map(|v| v.value.as_str())
}

pub fn names(jobs: &[JobSpec]) -> Vec<&str> {
    jobs.iter().map(|j| j.name.as_str()).collect()
}

pub fn mins(m: u64) -> Option<Duration> {
    Some(Duration::from_secs(m * 60))
}

/// The user commands of a rendered GitLab script, without preamble and
/// echo/exit-code lines.
pub fn commands(script: &str) -> Vec<String> {
    let body = script
        .strip_prefix(gitlab::PREAMBLE)
        .expect("script starts with the preamble");
    body.lines()
        .filter(|l| !l.starts_with("printf '%s\\n'") && !l.starts_with("_kiln_rc=$?"))
        .map(String::from)
        .collect()
}
