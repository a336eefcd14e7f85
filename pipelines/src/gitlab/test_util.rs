//! Helpers for the unit tests of the GitLab passes: parse a pipeline
//! given as text, with included files given as (path, text) pairs.

use std::io;

use super::{parse, GitlabPipeline};
use crate::context::{LocalContext, Options};
use crate::error::Result;
use crate::spec::JobSpec;

/// A checkout of project `demo` on branch `main`.
pub(super) fn ctx() -> LocalContext {
    let mut c = LocalContext::new("/nonexistent/demo", "demo");
    c.commit_sha = "0123456789abcdef0123456789abcdef01234567".into();
    c.branch = Some("main".into());
    c
}

/// Parses `main` as `.gitlab-ci.yml`, with `files` as the project's other
/// files.
pub(super) fn parse_with(
    main: &str,
    ctx: &LocalContext,
    opts: &Options,
    files: &[(&str, &str)],
) -> Result<GitlabPipeline> {
    let read = |p: &str| -> io::Result<String> {
        files
            .iter()
            .find(|(name, _)| *name == p)
            .map(|(_, text)| text.to_string())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, p.to_string()))
    };
    parse(".gitlab-ci.yml", main, ctx, opts, &read)
}

pub(super) fn parse_files(main: &str, files: &[(&str, &str)]) -> Result<GitlabPipeline> {
    parse_with(main, &ctx(), &Options::default(), files)
}

pub(super) fn parse_ok(main: &str) -> GitlabPipeline {
    parse_files(main, &[]).unwrap_or_else(|e| panic!("{e}"))
}

/// The error `main` gives, as text.
pub(super) fn parse_err(main: &str) -> String {
    match parse_files(main, &[]) {
        Ok(p) => panic!("expected an error, got {:?}", names(&p)),
        Err(e) => e.to_string(),
    }
}

pub(super) fn names(p: &GitlabPipeline) -> Vec<&str> {
    p.jobs.iter().map(|j| j.name.as_str()).collect()
}

pub(super) fn job<'a>(p: &'a GitlabPipeline, name: &str) -> &'a JobSpec {
    p.job(name)
        .unwrap_or_else(|| panic!("no job `{name}` in {:?}", names(p)))
}

pub(super) fn var<'a>(job: &'a JobSpec, key: &str) -> Option<&'a str> {
    job.variables
        .iter()
        .find(|v| v.key == key)
        .map(|v| v.value.as_str())
}

/// The user commands of a rendered script, without the preamble and the
/// echo and exit-code lines.
pub(super) fn commands(script: &str) -> Vec<&str> {
    script
        .strip_prefix(super::PREAMBLE)
        .expect("script starts with the preamble")
        .lines()
        .filter(|l| !l.starts_with("printf '%s\\n'") && !l.starts_with("_kiln_rc=$?"))
        .collect()
}
