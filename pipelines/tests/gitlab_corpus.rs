mod common;

use common::*;
use kiln_pipelines::{AllowFailure, ArtifactWhen, JobWhen, Shell, StepWhen};

#[test]
fn rust_basic_defaults_variables_steps_artifacts() {
    let p = gitlab("gitlab", "rust-basic.gitlab-ci.yml");
    assert_eq!(p.stages, [".pre", "check", "test", "release", ".post"]);
    assert_eq!(names(&p.jobs), ["fmt", "clippy", "test", "build-release"]);
    let fmt = p.job("fmt").unwrap();
    assert_eq!(fmt.image, "rust:1.80-slim");
    assert_eq!(fmt.timeout, mins(45));
    assert_eq!(fmt.steps.len(), 1);
    assert_eq!(fmt.steps[0].name, "script");
    assert_eq!(fmt.steps[0].shell, Shell::Sh);
    assert_eq!(
        commands(&fmt.steps[0].script),
        [
            "rustc --version && cargo --version",
            "rustup component add rustfmt",
            "cargo fmt --all -- --check"
        ]
    );
    assert!(fmt.steps[0]
        .script
        .contains("printf '%s\\n' '$ cargo fmt --all -- --check'"));
    assert_eq!(var(fmt, "CARGO_HOME"), Some("/builds/demo/.cargo"));
    assert_eq!(var(fmt, "RUSTFLAGS"), Some("-D warnings"));
    assert_eq!(var(fmt, "CI_JOB_NAME"), Some("fmt"));
    assert_eq!(var(fmt, "CI_JOB_STAGE"), Some("check"));
    assert_eq!(var(fmt, "CI_COMMIT_SHORT_SHA"), Some("01234567"));
    assert_eq!(var(fmt, "CI_COMMIT_BRANCH"), Some("main"));
    assert_eq!(var(fmt, "GITLAB_CI"), Some("true"));
    assert_eq!(fmt.working_dir.as_deref(), Some("/builds/demo"));

    assert_eq!(p.job("clippy").unwrap().allow_failure, AllowFailure::Yes);

    let test = p.job("test").unwrap();
    assert_eq!(test.timeout, mins(90));
    assert_eq!(
        var(test, "RUSTFLAGS"),
        Some(""),
        "job variables win over global ones"
    );
    assert_eq!(var(test, "RUST_BACKTRACE"), Some("1"));
    assert_eq!(test.steps.len(), 2);
    let after = &test.steps[1];
    assert_eq!(after.name, "after_script");
    assert_eq!(after.when, StepWhen::Always);
    assert_eq!(after.timeout, mins(5));
    assert!(after.allow_failure);
    assert_eq!(commands(&after.script), ["du -sh target || true"]);

    let rel = p.job("build-release").unwrap();
    assert_eq!(rel.artifacts.len(), 1);
    let a = &rel.artifacts[0];
    assert_eq!(a.name.as_deref(), Some("kiln-01234567"));
    assert_eq!(a.paths, ["target/release/kiln"]);
    assert_eq!(a.exclude, ["target/release/*.d"]);
    assert_eq!(a.expire_in.as_deref(), Some("1 week"));
    assert_eq!(a.when, ArtifactWhen::OnSuccess);
}

#[test]
fn preamble_enables_pipefail_only_where_supported() {
    let p = gitlab("gitlab", "rust-basic.gitlab-ci.yml");
    let s = &p.jobs[0].steps[0].script;
    assert!(s.starts_with("# kiln:"));
    assert!(s.contains("case \"$(set -o)\" in *pipefail*) set -o pipefail ;; esac"));
    assert!(s.contains("exec bash \"$0\""));
    assert!(s.contains("_kiln_rc=$?; if [ \"$_kiln_rc\" -ne 0 ]; then exit \"$_kiln_rc\"; fi"));
}

#[test]
fn parallel_matrix_and_numbered_parallel() {
    let p = gitlab("gitlab", "rust-matrix.gitlab-ci.yml");
    assert_eq!(
        names(&p.jobs),
        [
            "test: [1.80, x86_64-unknown-linux-gnu]",
            "test: [1.80, x86_64-unknown-linux-musl]",
            "test: [stable, x86_64-unknown-linux-gnu]",
            "test: [stable, x86_64-unknown-linux-musl]",
            "test: [nightly, x86_64-unknown-linux-gnu]",
            "shards 1/3",
            "shards 2/3",
            "shards 3/3",
            "report",
        ]
    );
    let t = &p.jobs[1];
    assert_eq!(t.id, "test");
    assert_eq!(t.image, "rust:1.80", "image expands matrix variables");
    assert_eq!(var(t, "TARGET"), Some("x86_64-unknown-linux-musl"));
    assert_eq!(var(t, "CI_NODE_INDEX"), Some("2"));
    assert_eq!(var(t, "CI_NODE_TOTAL"), Some("5"));
    assert_eq!(
        var(t, "CI_JOB_NAME"),
        Some("test: [1.80, x86_64-unknown-linux-musl]")
    );
    assert_eq!(var(&p.jobs[6], "CI_NODE_INDEX"), Some("2"));
    assert_eq!(p.parallel_groups["test"].len(), 5);
    assert_eq!(
        p.job("report").unwrap().needs.as_deref().unwrap(),
        [
            "test: [nightly, x86_64-unknown-linux-gnu]",
            "shards 1/3",
            "shards 2/3",
            "shards 3/3"
        ]
    );
    let order = p.run_order("report").unwrap();
    assert_eq!(order.last().unwrap().name, "report");
    assert_eq!(order.len(), 5);
}

#[test]
fn extends_multi_level_and_list() {
    let p = gitlab("gitlab", "extends.gitlab-ci.yml");
    assert_eq!(names(&p.jobs), ["unit", "integration"]);
    let unit = p.job("unit").unwrap();
    assert_eq!(unit.image, "rust:1.80");
    assert_eq!(var(unit, "LEVEL"), Some("unit"));
    assert_eq!(var(unit, "KEEP"), Some("from-base"));
    assert_eq!(var(unit, "CACHE"), Some("on"));
    assert_eq!(unit.timeout, mins(20));
    assert_eq!(
        commands(&unit.steps[0].script),
        ["echo base-before", "cargo test --lib"]
    );
    let integ = p.job("integration").unwrap();
    assert_eq!(integ.timeout, mins(40));
    assert_eq!(var(integ, "LEVEL"), Some("unit"));
    assert_eq!(
        commands(&integ.steps[0].script),
        ["echo base-before", "cargo test --test '*'"]
    );
}

#[test]
fn rules_on_main() {
    let p = gitlab("gitlab", "rules.gitlab-ci.yml");
    assert_eq!(names(&p.jobs), ["build", "lint", "deploy", "cleanup"]);
    assert_eq!(p.excluded, ["docs", "nightly"]);
    let lint = p.job("lint").unwrap();
    assert_eq!(lint.allow_failure, AllowFailure::ExitCodes(vec![137, 255]));
    assert!(lint.allow_failure.allows(137) && !lint.allow_failure.allows(1));
    let deploy = p.job("deploy").unwrap();
    assert_eq!(deploy.when, JobWhen::Manual);
    assert_eq!(
        deploy.allow_failure,
        AllowFailure::No,
        "manual by rules is blocking"
    );
    assert_eq!(var(deploy, "DEPLOY_ENV"), Some("production"));
    assert!(commands(&deploy.steps[0].script)[0].contains("./deploy.sh $DEPLOY_ENV"));
    let cleanup = p.job("cleanup").unwrap();
    assert_eq!(cleanup.when, JobWhen::Always);
    assert_eq!(cleanup.stage.as_deref(), Some(".post"));
    // run order of a job without needs: every earlier-stage non-manual job.
    let order: Vec<&str> = p
        .run_order("cleanup")
        .unwrap()
        .iter()
        .map(|j| j.name.as_str())
        .collect();
    assert_eq!(order, ["build", "lint", "cleanup"]);
}

#[test]
fn rules_on_other_branches_and_variables() {
    let mut c = ctx("gitlab", Some("docs/intro"));
    c.extra_vars
        .push(("CI_PIPELINE_SOURCE".into(), "schedule".into()));
    let p = gitlab_with("gitlab", "rules.gitlab-ci.yml", &c).unwrap();
    assert_eq!(names(&p.jobs), ["build", "docs", "nightly", "cleanup"]);
    assert_eq!(p.excluded, ["lint", "deploy"]);

    let mut c = ctx("gitlab", Some("main"));
    c.extra_vars.push(("SKIP_LINT".into(), "true".into()));
    let p = gitlab_with("gitlab", "rules.gitlab-ci.yml", &c).unwrap();
    assert!(p.job("lint").is_none());

    let detached = gitlab_with("gitlab", "rules.gitlab-ci.yml", &ctx("gitlab", None)).unwrap();
    assert_eq!(names(&detached.jobs), ["cleanup"]);
}

#[test]
fn anchors_and_merge_keys() {
    let p = gitlab("gitlab", "anchors.gitlab-ci.yml");
    assert_eq!(names(&p.jobs), ["test1", "test2"]);
    let t1 = p.job("test1").unwrap();
    assert_eq!(t1.image, "node:20");
    assert_eq!(var(t1, "NODE_ENV"), Some("test"));
    assert_eq!(
        commands(&t1.steps[0].script),
        ["npm ci", "echo setup-one", "echo setup-two", "npm test"]
    );
    let t2 = p.job("test2").unwrap();
    assert_eq!(var(t2, "NODE_ENV"), Some("integration"));
    assert_eq!(var(t2, "CI_RETRY"), Some("2"));
}

#[test]
fn node_needs_reports_and_legacy_globals() {
    let p = gitlab("gitlab", "node.gitlab-ci.yml");
    assert_eq!(names(&p.jobs), ["install", "unit-tests", "build"]);
    assert!(p.jobs.iter().all(|j| j.image == "node:20-alpine"));
    let unit = p.job("unit-tests").unwrap();
    assert_eq!(unit.needs.as_deref().unwrap(), ["install"]);
    assert_eq!(unit.artifacts.len(), 1);
    assert_eq!(unit.artifacts[0].name.as_deref(), Some("reports:junit"));
    assert_eq!(unit.artifacts[0].when, ArtifactWhen::Always);
    let order: Vec<&str> = p
        .run_order("build")
        .unwrap()
        .iter()
        .map(|j| j.name.as_str())
        .collect();
    assert_eq!(order, ["install", "unit-tests", "build"]);
    assert_eq!(
        p.job("install").unwrap().artifacts[0].expire_in.as_deref(),
        Some("1 hour")
    );
}

#[test]
fn python_image_map_services_variables() {
    let p = gitlab("gitlab", "python.gitlab-ci.yml");
    let t = p.job("test").unwrap();
    assert_eq!(t.image, "python:3.12-slim");
    assert_eq!(
        t.entrypoint,
        Some(vec![]),
        "entrypoint [\"\"] clears the image's"
    );
    assert_eq!(var(t, "PIP_CACHE_DIR"), Some("/builds/demo/.cache/pip"));
    assert_eq!(var(t, "LITERAL"), Some("$NOT_EXPANDED"));
    assert_eq!(t.image, "python:3.12-slim");
    assert_eq!(t.services.len(), 1);
    assert_eq!(t.services[0].image, "postgres:16");
    assert_eq!(t.services[0].aliases, vec!["postgres"]);
    assert!(
        !p.warnings.iter().any(|w| w.contains("services")),
        "{:?}",
        p.warnings
    );
    assert_eq!(
        commands(&t.steps[1].script),
        ["echo \"job finished\"", "rm -rf .pytest_cache"]
    );
    assert_eq!(t.artifacts.len(), 2);
    assert_eq!(t.artifacts[0].when, ArtifactWhen::Always);
}

#[test]
fn go_dag_and_exit_codes() {
    let p = gitlab("gitlab", "go.gitlab-ci.yml");
    assert_eq!(
        names(&p.jobs),
        ["compile", "vet", "unit", "flaky-e2e", "publish"]
    );
    assert_eq!(p.job("unit").unwrap().timeout, mins(90));
    assert_eq!(
        p.job("flaky-e2e").unwrap().allow_failure,
        AllowFailure::ExitCodes(vec![42])
    );
    assert_eq!(p.job("flaky-e2e").unwrap().needs, Some(vec![]));
    assert_eq!(p.job("publish").unwrap().needs, None);
    let order: Vec<&str> = p
        .run_order("unit")
        .unwrap()
        .iter()
        .map(|j| j.name.as_str())
        .collect();
    assert_eq!(order, ["compile", "unit"]);
    let order: Vec<&str> = p
        .run_order("publish")
        .unwrap()
        .iter()
        .map(|j| j.name.as_str())
        .collect();
    assert_eq!(order, ["compile", "vet", "unit", "flaky-e2e", "publish"]);
    assert!(matches!(
        p.run_order("nope"),
        Err(kiln_pipelines::Error::NoSuchJob { .. })
    ));
}

#[test]
fn only_except() {
    let mut c = ctx("gitlab", Some("main"));
    c.extra_vars.push(("DEPLOY".into(), "yes".into()));
    let p = gitlab_with("gitlab", "only-except.gitlab-ci.yml", &c).unwrap();
    assert_eq!(names(&p.jobs), ["build", "main-only"]);
    let p = gitlab_with(
        "gitlab",
        "only-except.gitlab-ci.yml",
        &ctx("gitlab", Some("wip-x")),
    )
    .unwrap();
    assert!(p.jobs.is_empty(), "{:?}", names(&p.jobs));
}

#[test]
fn workflow_rules() {
    let p = gitlab("gitlab", "workflow.gitlab-ci.yml");
    assert_eq!(var(&p.jobs[0], "ENVIRONMENT"), Some("production"));
    let p = gitlab_with(
        "gitlab",
        "workflow.gitlab-ci.yml",
        &ctx("gitlab", Some("feature")),
    )
    .unwrap();
    assert_eq!(var(&p.jobs[0], "ENVIRONMENT"), Some("review"));
    let p = gitlab_with("gitlab", "workflow.gitlab-ci.yml", &ctx("gitlab", None)).unwrap();
    assert!(p.jobs.is_empty());
    assert_eq!(p.excluded, ["show"]);
}

#[test]
fn include_local_nested_with_rules() {
    let p = gitlab("gitlab-include", ".gitlab-ci.yml");
    assert_eq!(names(&p.jobs), ["lint", "unit", "deploy"]);
    let unit = p.job("unit").unwrap();
    assert_eq!(unit.image, "python:3.12");
    assert_eq!(var(unit, "GLOBAL"), Some("main-file"), "the main file wins");
    assert_eq!(var(unit, "FROM_INCLUDE"), Some("yes"));
    assert_eq!(
        commands(&unit.steps[0].script),
        ["pip install -e .", "make test"]
    );
    let deploy = p.job("deploy").unwrap();
    assert_eq!(deploy.when, JobWhen::Manual);
    assert_eq!(deploy.allow_failure, AllowFailure::Yes);

    let mut c = ctx("gitlab-include", Some("main"));
    c.extra_vars.push(("WITH_OPTIONAL".into(), "1".into()));
    let p = gitlab_with("gitlab-include", ".gitlab-ci.yml", &c).unwrap();
    assert!(p.job("optional").is_some());
}

#[test]
fn missing_include_is_an_error() {
    let read = |_: &str| Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    let e = kiln_pipelines::gitlab::parse(
        ".gitlab-ci.yml",
        "include: ci/x.yml\njob:\n  script: x\n",
        &ctx("gitlab", None),
        &kiln_pipelines::Options::default(),
        &read,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        ".gitlab-ci.yml: cannot read included file `ci/x.yml`"
    );
}
