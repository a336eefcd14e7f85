//! Fuzz harnesses for the pipeline front ends (see docs/fuzzing.md): a
//! `.gitlab-ci.yml` or a workflow file comes from whoever can push a
//! branch, and its includes from the same project.
//!
//! Each harness takes arbitrary bytes and panics only when a property that
//! must hold for every input is broken: no panic, in parsing, in planning a
//! job's run order, or in reporting an error. `cargo test` drives them with
//! proptest for a bounded number of cases (`PROPTEST_CASES` raises it); the
//! cargo-fuzz targets in `fuzz/` call the same functions. Not part of the
//! API.

use std::path::Path;

use crate::{detect, LocalContext, Options};

fn context() -> LocalContext {
    let mut ctx = LocalContext::new("/nonexistent/fuzz", "fuzz");
    ctx.branch = Some("main".into());
    ctx
}

/// A `.gitlab-ci.yml` (its `include: local` files are the same bytes, so
/// includes recurse until a limit stops them).
pub fn gitlab(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = detect(Path::new("x.yml"), &text);
    let read = |_: &str| Ok(text.to_string());
    match crate::gitlab::parse(
        ".gitlab-ci.yml",
        &text,
        &context(),
        &Options::default(),
        &read,
    ) {
        Ok(p) => {
            for j in &p.jobs {
                let _ = p.run_order(&j.name);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// A GitHub workflow file.
pub fn github(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match crate::github::parse("w.yml", &text, &context(), &Options::default()) {
        Ok(w) => {
            for j in &w.jobs {
                let _ = w.run_order(&j.name);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_testkit::fuzz::{config, json};
    use proptest::prelude::*;

    use super::*;

    const GITLAB_KEYS: &[&str] = &[
        "stages",
        "variables",
        "default",
        "include",
        "workflow",
        "rules",
        "if",
        "when",
        "build",
        "test",
        ".base",
        "extends",
        "stage",
        "script",
        "before_script",
        "after_script",
        "image",
        "name",
        "entrypoint",
        "services",
        "needs",
        "job",
        "artifacts",
        "paths",
        "exclude",
        "parallel",
        "matrix",
        "local",
        "inputs",
        "spec",
        "timeout",
        "allow_failure",
        "only",
        "except",
        "dependencies",
        "cache",
        "retry",
        "tags",
        "environment",
        "trigger",
        "!reference",
        "exists",
        "changes",
        "value",
        "options",
        "description",
        "expand",
    ];

    const GITHUB_KEYS: &[&str] = &[
        "on",
        "name",
        "env",
        "jobs",
        "build",
        "test",
        "runs-on",
        "steps",
        "run",
        "uses",
        "with",
        "if",
        "needs",
        "strategy",
        "matrix",
        "include",
        "exclude",
        "container",
        "image",
        "services",
        "outputs",
        "shell",
        "working-directory",
        "defaults",
        "timeout-minutes",
        "continue-on-error",
        "id",
        "fail-fast",
        "max-parallel",
        "permissions",
        "concurrency",
        "push",
        "workflow_dispatch",
        "inputs",
    ];

    /// Hand-written hostile YAML: anchors and aliases that multiply,
    /// merge keys, deep nesting, tags, huge counts and expressions.
    fn tricks() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nc: &c [*b, *b, *b, *b]\nd: [*c, *c, *c, *c]\n",
            "j: &j {script: [x], extends: j}\nk: {<<: *j, extends: [k, j]}\n",
            "job: {script: x, parallel: 100000}\n",
            "job: {script: x, parallel: {matrix: [{A: [1,2,3,4,5,6,7,8,9,10], B: [1,2,3,4,5,6,7,8,9,10], C: [1,2,3,4,5,6,7,8,9,10]}]}}\n",
            "include: [{local: x.yml}, {local: x.yml}]\njob: {script: x}\n",
            "job: {script: !reference [job, script]}\n",
            "job: {script: x, rules: [{if: '$A == \"x\" && ($B =~ /(a+)+$/ || !$C)'}]}\n",
            "on: push\njobs: {b: {runs-on: x, strategy: {matrix: {a: [1,2,3,4,5,6,7,8,9,10], b: [1,2,3,4,5,6,7,8,9,10], c: [1,2,3,4,5,6,7,8,9,10]}}, steps: [{run: x}]}}\n",
            "on: push\njobs: {b: {runs-on: x, if: \"${{ fromJSON('[[[[[[[[[[1]]]]]]]]]]') && format('{0}{0}{0}', github.x) }}\", steps: [{run: x}]}}\n",
            "on: push\njobs: {a: {runs-on: x, needs: b, steps: [{run: x}]}, b: {runs-on: x, needs: a, steps: [{run: x}]}}\n",
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[x",
            "{a: !!binary 'AAAA', b: !!float .nan, c: 0x7fffffffffffffffffff, ? [x] : y}\n",
        ])
        .prop_map(str::to_string)
    }

    /// A trick with a few bytes changed.
    fn damaged() -> impl Strategy<Value = Vec<u8>> {
        (
            tricks(),
            prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        )
            .prop_map(|(t, flips)| {
                let mut b = t.into_bytes();
                for (at, v) in flips {
                    let i = at % b.len();
                    b[i] = v;
                }
                b
            })
    }

    proptest! {
        #![proptest_config(config(200))]

        #[test]
        fn gitlab_files_never_panic(data in json(GITLAB_KEYS)) {
            gitlab(data.as_bytes());
        }

        #[test]
        fn github_files_never_panic(data in json(GITHUB_KEYS)) {
            github(data.as_bytes());
        }

        #[test]
        fn hostile_yaml_never_panics(data in damaged()) {
            gitlab(&data);
            github(&data);
        }
    }
}
