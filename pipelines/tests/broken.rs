mod common;

use common::*;
use kiln_pipelines::{Error, Location, Options};

fn gitlab_err(file: &str) -> Error {
    gitlab_with("broken", file, &ctx("broken", Some("main"))).expect_err("must fail")
}

fn github_err(file: &str) -> Error {
    let text = std::fs::read_to_string(corpus("broken").join(file)).unwrap();
    kiln_pipelines::github::parse(
        file,
        &text,
        &ctx("broken", Some("main")),
        &Options::default(),
    )
    .expect_err("must fail")
}

fn check(e: Error, line: usize, column: usize, msg: &str) {
    assert_eq!(e.location(), Some(Location { line, column }), "{e}");
    assert_eq!(e.to_string(), msg);
}

#[test]
fn yaml_syntax_errors() {
    check(
        gitlab_err("syntax.gitlab-ci.yml"),
        4,
        4,
        "syntax.gitlab-ci.yml:4:4: invalid YAML: did not find expected key, while parsing a block mapping at line 2 column 3",
    );
    check(
        github_err("gh-syntax.yml"),
        8,
        1,
        "gh-syntax.yml:8:1: invalid YAML: found unexpected end of stream, while scanning a quoted scalar at line 7 column 14",
    );
}

#[test]
fn gitlab_semantic_errors() {
    check(
        gitlab_err("cycle.gitlab-ci.yml"),
        2,
        3,
        "cycle.gitlab-ci.yml:2:3: .a.extends: `extends` cycle: .a -> .b -> .c -> .a",
    );
    check(
        gitlab_err("missing-extends.gitlab-ci.yml"),
        2,
        3,
        "missing-extends.gitlab-ci.yml:2:3: job.extends: `extends` names `.nope`, which does not exist",
    );
    check(
        gitlab_err("stage.gitlab-ci.yml"),
        8,
        3,
        "stage.gitlab-ci.yml:8:3: deploy.stage: stage `deploy` is not one of `stages` (.pre, build, test, .post)",
    );
    check(
        gitlab_err("rule.gitlab-ci.yml"),
        4,
        7,
        "rule.gitlab-ci.yml:4:7: job.rules[0].if: expression `$CI_COMMIT_BRANCH == \"main\" &&`: expected a value",
    );
    check(
        gitlab_err("timeout.gitlab-ci.yml"),
        3,
        3,
        "timeout.gitlab-ci.yml:3:3: job.timeout: `timeout` is not a duration",
    );
}

#[test]
fn github_semantic_errors() {
    check(
        github_err("run-uses.yml"),
        9,
        7,
        "run-uses.yml:9:7: jobs.build.steps[2]: `run` and `uses` both set",
    );
    check(
        github_err("gh-needs.yml"),
        8,
        5,
        "gh-needs.yml:8:5: jobs.test.needs: job `test` needs `compile`, which does not exist",
    );
    check(
        github_err("gh-cycle.yml"),
        4,
        5,
        "gh-cycle.yml:4:5: jobs.a.needs: `needs` form a cycle: a -> b -> a",
    );
    check(
        github_err("gh-expr.yml"),
        7,
        9,
        "gh-expr.yml:7:9: jobs.build.steps[0].if: expression `github.ref ==`: unexpected end of expression",
    );
}

/// Odd but valid-YAML inputs never panic.
#[test]
fn garbage_does_not_panic() {
    let c = ctx("broken", None);
    let read = |_: &str| Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    let inputs = [
        "",
        "~",
        "[]",
        "42",
        "a: b",
        "jobs: 1",
        "jobs: {x: 1}",
        "jobs: {x: {steps: 3}}",
        "jobs: {x: {runs-on: 1, steps: [1]}}",
        "jobs: {x: {runs-on: u, steps: [{run: [1]}]}}",
        "jobs: {x: {runs-on: ubuntu-latest, strategy: {matrix: {a: []}}, steps: [{run: a}]}}",
        "jobs: {x: {runs-on: ubuntu-latest, steps: [{run: '${{ '}]}}",
        "job: {script: [[[[[[[[[[[[x]]]]]]]]]]]]}",
        "job: {script: x, parallel: 0}",
        "job: {script: x, parallel: {matrix: [{A: [{}]}]}}",
        "job: {script: x, rules: [1]}",
        "job: {script: x, needs: [nope]}",
        "job: {script: x, extends: [1]}",
        "job: []",
        "include: [{remote: 'https://x'}]",
        "include: '../etc/passwd'",
        "variables: [1]",
        "job: {script: x, image: {}}",
        "job: {script: x, artifacts: {when: nope}}",
        "a: &a [*a]",
        "job: {script: x, allow_failure: {exit_codes: [x]}}",
        "job: {script: x, only: {refs: ['/(/']}}",
        "stages: 1",
    ];
    for input in inputs {
        let _ = kiln_pipelines::gitlab::parse("f", input, &c, &Options::default(), &read);
        let _ = kiln_pipelines::github::parse("f", input, &c, &Options::default());
        let _ = kiln_pipelines::detect(std::path::Path::new("x.yml"), input);
    }
}
