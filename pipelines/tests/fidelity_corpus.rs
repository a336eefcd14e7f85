//! Real-world-shaped files that GitLab and GitHub accept and kiln used to
//! reject or list partly (issue 14), through the common entry point
//! ([`kiln_pipelines::load`]), for several refs and pipeline sources.
//!
//! Each expectation says how it was derived: from GitLab's documented
//! semantics (Psych's YAML loading, `workflow: rules`, `rules`,
//! `only`/`except` in `Gitlab::Ci::Build::Policy::Refs`, CI/CD inputs) or
//! GitHub's (`runs-on`, matrix `exclude`, `if:` with `github.event_name`).

mod common;

use std::path::Path;

use common::{corpus, var};
use kiln_pipelines::{JobWhen, LocalContext, Options, Pipeline};

/// The checkout: `acme/tool` on gitlab.com, on `main`, its default branch.
fn checkout(dir: &str) -> LocalContext {
    let mut c = LocalContext::new(corpus(dir), "tool");
    c.commit_sha = "0123456789abcdef0123456789abcdef01234567".into();
    c.branch = Some("main".into());
    c.remote_url = Some("git@gitlab.com:acme/tool.git".into());
    c.default_branch = Some("main".into());
    c.user_login = Some("dev".into());
    c
}

fn load_in(dir: &str, file: &str, c: &LocalContext, opts: &Options) -> Pipeline {
    let root = corpus(dir);
    let text = std::fs::read_to_string(root.join(file)).expect("corpus file");
    let files = kiln_pipelines::ProjectFiles::new(&root, &opts.limits);
    kiln_pipelines::load(Path::new(file), &text, c, opts, &|p| files.read(p))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn gitlab(file: &str, c: &LocalContext, opts: &Options) -> Pipeline {
    load_in("fidelity/gitlab", file, c, opts)
}

fn github(file: &str, opts: &Options) -> Pipeline {
    load_in(
        "fidelity/github",
        &format!(".github/workflows/{file}"),
        &checkout("fidelity/github"),
        opts,
    )
}

fn jobs(p: &Pipeline) -> Vec<&str> {
    p.jobs.iter().map(|j| j.name.as_str()).collect()
}

fn excluded(p: &Pipeline) -> Vec<(&str, &str)> {
    p.excluded
        .iter()
        .map(|e| (e.name.as_str(), e.reason.as_str()))
        .collect()
}

fn source(s: &str) -> Options {
    Options {
        pipeline_source: s.into(),
        ..Options::default()
    }
}

#[test]
fn duplicate_keys_later_wins_as_psych() {
    // Psych's revive_hash assigns `hash[key] = val` for each pair: the
    // later `variables:` and the later `build:` replace the earlier ones,
    // keeping the first one's position (Ruby hashes keep insertion order).
    let p = gitlab(
        "duplicate-keys.gitlab-ci.yml",
        &checkout("x"),
        &Options::default(),
    );
    assert_eq!(jobs(&p), ["build", "test"]);
    let build = &p.jobs[0];
    assert_eq!(build.image, "golang:1.22");
    assert_eq!(var(build, "CGO_ENABLED"), Some("0"));
    assert!(build.steps[0]
        .script
        .contains("go build -trimpath -o bin/ ./..."));
    assert!(!build.steps[0].script.contains("go build ./..."));
}

#[test]
fn repeated_merge_keys_merge_in_order() {
    // Psych merges each `<<` with `hash.merge!`, overwriting what came
    // before; a `<<` list is merged last-to-first, so the first wins.
    let p = gitlab(
        "merge-keys.gitlab-ci.yml",
        &checkout("x"),
        &Options::default(),
    );
    assert_eq!(jobs(&p), ["lint", "test"]);
    assert_eq!(p.jobs[0].image, "python:3.11-slim", "the later *retry wins");
    assert_eq!(
        p.jobs[1].image, "python:3.12-slim",
        "the first of the list wins"
    );
}

#[test]
fn branch_mr_and_tag_pipelines() {
    // GitLab's documented workflow: MR pipelines for merge requests, branch
    // pipelines otherwise, tag pipelines for tags. Jobs with neither
    // `rules` nor `only` get `only: [branches, tags]` (GitLab's default),
    // which a merge request pipeline does not match; `pages` needs the
    // default branch, `publish` a version tag.
    let c = checkout("x");
    let p = gitlab("branch-mr-tag.gitlab-ci.yml", &c, &source("push"));
    assert_eq!(jobs(&p), ["build", "unit", "pages"]);
    assert_eq!(
        var(&p.jobs[0], "IMAGE"),
        Some("registry.gitlab.com/acme/tool:main")
    );
    assert_eq!(
        excluded(&p),
        [
            ("mr-review", "mr-review.rules: no rule matched"),
            ("publish", "publish.rules: no rule matched")
        ]
    );

    let p = gitlab(
        "branch-mr-tag.gitlab-ci.yml",
        &c,
        &source("merge_request_event"),
    );
    assert_eq!(jobs(&p), ["mr-review"]);

    let mut t = checkout("x");
    t.tag = Some("v1.4.0".into());
    let p = gitlab("branch-mr-tag.gitlab-ci.yml", &t, &source("push"));
    assert_eq!(jobs(&p), ["build", "unit", "publish"]);
    assert_eq!(
        var(&p.jobs[0], "IMAGE"),
        Some("registry.gitlab.com/acme/tool:v1-4-0")
    );
}

#[test]
fn legacy_only_except_by_source_ref_and_project() {
    // Policy::Refs: `schedules` matches a schedule pipeline, `branches` a
    // branch pipeline, `/re/@acme/tool` a matching ref in that project only,
    // `merge_requests` an MR pipeline.
    let c = checkout("x");
    let p = gitlab("legacy-only.gitlab-ci.yml", &c, &source("push"));
    assert_eq!(jobs(&p), ["test", "not-on-schedule", "docs"]);
    let why = excluded(&p);
    assert!(
        why.contains(&("nightly", "only: [\"schedules\"]")),
        "{why:?}"
    );

    let p = gitlab("legacy-only.gitlab-ci.yml", &c, &source("schedule"));
    assert_eq!(jobs(&p), ["test", "nightly", "docs"]);

    let mut t = checkout("x");
    t.tag = Some("v2.0".into());
    let p = gitlab("legacy-only.gitlab-ci.yml", &t, &source("push"));
    assert_eq!(jobs(&p), ["test", "not-on-schedule", "release"]);

    // A fork (another project path) does not release or publish docs.
    let mut fork = t.clone();
    fork.remote_url = Some("https://gitlab.com/someone/tool.git".into());
    let p = gitlab("legacy-only.gitlab-ci.yml", &fork, &source("push"));
    assert_eq!(jobs(&p), ["test", "not-on-schedule"]);

    let p = gitlab(
        "legacy-only.gitlab-ci.yml",
        &c,
        &source("merge_request_event"),
    );
    assert_eq!(jobs(&p), ["mr-only"]);
}

#[test]
fn includes_that_cannot_be_read_are_skipped_the_rest_lists() {
    let c = checkout("x");
    let p = gitlab("includes.gitlab-ci.yml", &c, &Options::default());
    // The local include with inputs creates `deploy-staging` (manual by
    // its default input); the project include is skipped until mapped.
    assert_eq!(jobs(&p), ["unit", "deploy-staging"]);
    assert_eq!(p.jobs[1].when, JobWhen::Manual);
    let skipped: Vec<&String> = p.notes.iter().filter(|n| n.contains("skipped")).collect();
    assert_eq!(skipped.len(), 5, "{skipped:?}");
    assert!(skipped
        .iter()
        .any(|n| n.contains("--include-project acme/ci-lib=DIR")));

    let opts = Options {
        include_projects: vec![("acme/ci-lib".into(), corpus("fidelity/ci-lib"))],
        ..Options::default()
    };
    let p = gitlab("includes.gitlab-ci.yml", &c, &opts);
    assert_eq!(jobs(&p), ["build", "unit", "deploy-staging"]);
}

#[test]
fn a_pipeline_with_inputs() {
    let c = checkout("x");
    // Defaults: python 3.12, 2 parallel jobs, no e2e.
    let p = gitlab("inputs.gitlab-ci.yml", &c, &Options::default());
    assert_eq!(jobs(&p), ["pytest-3.12 1/2", "pytest-3.12 2/2"]);
    assert_eq!(var(&p.jobs[0], "BUILD_ID"), Some("abcd"));
    let opts = Options {
        inputs: vec![
            ("python".into(), "3.9".into()),
            ("parallel".into(), "1".into()),
            ("run_e2e".into(), "true".into()),
        ],
        ..Options::default()
    };
    let p = gitlab("inputs.gitlab-ci.yml", &c, &opts);
    assert_eq!(jobs(&p), ["pytest-3.9 1/1", "e2e"]);
    assert_eq!(p.jobs[1].image, "python:3.9");
}

#[test]
fn references_in_scripts_and_rules() {
    let c = checkout("x");
    let p = gitlab("references.gitlab-ci.yml", &c, &Options::default());
    assert_eq!(jobs(&p), ["build"]);
    let script = &p.jobs[0].steps[0].script;
    assert!(script.contains("apt-get install -y make") && script.contains("echo ready"));
    let mut t = checkout("x");
    t.tag = Some("v1".into());
    let p = gitlab("references.gitlab-ci.yml", &t, &Options::default());
    assert_eq!(jobs(&p), ["build", "package"]);
}

#[test]
fn project_and_registry_variables_from_the_remote() {
    let c = checkout("x");
    let p = gitlab("registry.gitlab-ci.yml", &c, &Options::default());
    assert_eq!(jobs(&p), ["build-image", "release-image"]);
    let j = &p.jobs[0];
    assert_eq!(
        var(j, "IMAGE_TAG"),
        Some("registry.gitlab.com/acme/tool:01234567")
    );
    assert_eq!(var(j, "CI_PROJECT_PATH"), Some("acme/tool"));
    assert_eq!(var(j, "CI_SERVER_URL"), Some("https://gitlab.com"));
    assert_eq!(var(j, "GITLAB_USER_LOGIN"), Some("dev"));
}

#[test]
fn github_os_matrix_lists_unmapped_runners() {
    // 4 os x 2 python - 1 excluded = 7 instances; the 4 on Windows and
    // macOS have no image and are listed as excluded with what to pass.
    let p = github("os-matrix.yml", &Options::default());
    assert_eq!(
        jobs(&p),
        [
            "test (ubuntu-18.04, 3.8)",
            "test (ubuntu-22.04, 3.8)",
            "test (ubuntu-22.04, 3.12)"
        ]
    );
    assert_eq!(p.jobs[0].image, "catthehacker/ubuntu:act-18.04");
    let why = excluded(&p);
    assert_eq!(why.len(), 4, "{why:?}");
    assert!(why[0].1.contains("-P windows-latest=IMAGE"), "{why:?}");
    let opts = Options {
        image: Some("python:3.12".into()),
        ..Options::default()
    };
    assert_eq!(github("os-matrix.yml", &opts).jobs.len(), 7);
}

#[test]
fn github_runner_from_an_input_and_self_hosted() {
    // `inputs.os` defaults to ubuntu-latest (workflow_call default); an
    // `--input os=...` replaces it.
    let p = github("self-hosted.yml", &Options::default());
    assert_eq!(jobs(&p), ["build"]);
    assert_eq!(p.jobs[0].image, "catthehacker/ubuntu:act-latest");
    let opts = Options {
        inputs: vec![("os".into(), "ubuntu-20.04".into())],
        ..Options::default()
    };
    let p2 = github("self-hosted.yml", &opts);
    assert_eq!(p2.jobs[0].image, "catthehacker/ubuntu:act-20.04");
    let why = excluded(&p);
    assert!(
        why.iter()
            .any(|(n, r)| *n == "gpu" && r.contains("-P self-hosted=IMAGE")),
        "{why:?}"
    );
    let mut opts = Options::default();
    opts.runner_images.set("self-hosted", "my/runner:1");
    let p = github("self-hosted.yml", &opts);
    assert_eq!(jobs(&p), ["build", "gpu"]);
    assert_eq!(p.jobs[1].needs.as_deref(), Some(&["build".to_string()][..]));
}

#[test]
fn github_computed_env_and_actions() {
    let p = github("computed-env.yml", &Options::default());
    assert_eq!(jobs(&p), ["deploy"]);
    assert!(p
        .notes
        .iter()
        .any(|n| n.contains("`env` computed by an expression")));
    let steps = &p.jobs[0].steps;
    // login fails the job; upload-artifact keeps its `if: failure()`.
    assert_eq!(steps.len(), 3);
    assert!(steps[0].script.contains("docker/login-action@v3"));
    assert_eq!(steps[2].when, kiln_pipelines::StepWhen::OnFailure);
    let opts = Options {
        skip_unsupported_actions: true,
        ..Options::default()
    };
    assert_eq!(github("computed-env.yml", &opts).jobs[0].steps.len(), 1);
}

#[test]
fn github_jobs_gated_on_the_event() {
    let p = github("events.yml", &Options::default());
    assert_eq!(jobs(&p), ["test"]);
    assert_eq!(p.jobs[0].image, "catthehacker/ubuntu:act-24.04");
    let opts = Options {
        event_name: "pull_request".into(),
        ..Options::default()
    };
    assert_eq!(jobs(&github("events.yml", &opts)), ["test", "pr-lint"]);
    let opts = Options {
        event_name: "schedule".into(),
        ..Options::default()
    };
    assert_eq!(jobs(&github("events.yml", &opts)), ["test", "nightly"]);
}

#[test]
fn deploy_environments_by_source() {
    // rules: `exists` asks the checkout (a Dockerfile is there); production
    // is manual and allowed to fail as its rule says.
    let c = checkout("x");
    let p = gitlab("deploy-environments.gitlab-ci.yml", &c, &source("push"));
    assert_eq!(jobs(&p), ["docker-build", "staging", "production"]);
    assert_eq!(p.jobs[2].when, JobWhen::Manual);
    assert_eq!(p.jobs[2].allow_failure, kiln_pipelines::AllowFailure::Yes);
    let p = gitlab(
        "deploy-environments.gitlab-ci.yml",
        &c,
        &source("merge_request_event"),
    );
    assert_eq!(jobs(&p), ["docker-build", "review"]);
    // Another branch: nothing but what the rules allow there.
    let mut dev = checkout("x");
    dev.branch = Some("feature/x".into());
    let p = gitlab("deploy-environments.gitlab-ci.yml", &dev, &source("push"));
    assert!(jobs(&p).is_empty(), "{:?}", jobs(&p));
    assert_eq!(p.excluded.len(), 4);
}

#[test]
fn scheduled_and_web_pipelines() {
    let c = checkout("x");
    let p = gitlab("scheduled.gitlab-ci.yml", &c, &source("push"));
    assert_eq!(jobs(&p), ["test", "lint"]);
    let p = gitlab("scheduled.gitlab-ci.yml", &c, &source("schedule"));
    assert_eq!(jobs(&p), ["fuzz"]);
    let why = excluded(&p);
    assert!(
        why.contains(&("test", "test.rules[0]: when: never")),
        "{why:?}"
    );
    assert!(
        why.contains(&("lint", "except: [\"schedules\"]")),
        "{why:?}"
    );
    let p = gitlab("scheduled.gitlab-ci.yml", &c, &source("web"));
    assert_eq!(jobs(&p), ["test", "lint", "web-triggered"]);
}

#[test]
fn anchored_variables_merge_in_order() {
    // Psych: `<<: *common` then `<<: *debug` (overwrites LOG_LEVEL), then
    // the explicit LANG overwrites both. The job's own `variables` win.
    let p = gitlab(
        "anchored-variables.gitlab-ci.yml",
        &checkout("x"),
        &Options::default(),
    );
    let j = &p.jobs[0];
    assert_eq!(var(j, "LANG"), Some("C.UTF-8"), "job variables win");
    assert_eq!(var(j, "LOG_LEVEL"), Some("info"), "job variables win");
    assert_eq!(var(j, "RUST_BACKTRACE"), Some("1"), "from the global merge");
    let plain = &p.jobs[1];
    assert_eq!(
        var(plain, "LANG"),
        Some("en_US.UTF-8"),
        "the later key wins"
    );
    assert_eq!(
        var(plain, "LOG_LEVEL"),
        Some("debug"),
        "the later merge wins"
    );
}

#[test]
fn github_release_on_tags() {
    // `if: startsWith(github.ref, 'refs/tags/v')` is false on a branch.
    let p = github("release.yml", &Options::default());
    assert_eq!(jobs(&p), ["build"]);
    let root = corpus("fidelity/github");
    let text = std::fs::read_to_string(root.join(".github/workflows/release.yml")).unwrap();
    let mut c = checkout("fidelity/github");
    c.tag = Some("v2.1.0".into());
    c.branch = None;
    let p = kiln_pipelines::load(
        Path::new(".github/workflows/release.yml"),
        &text,
        &c,
        &Options::default(),
        &|_| Err(std::io::ErrorKind::NotFound.into()),
    )
    .unwrap();
    assert_eq!(jobs(&p), ["build", "publish"]);
    assert_eq!(var(&p.jobs[1], "GITHUB_REF"), Some("refs/tags/v2.1.0"));
    assert_eq!(var(&p.jobs[1], "GITHUB_REF_TYPE"), Some("tag"));
}

#[test]
fn github_container_with_services() {
    let p = github("container-services.yml", &Options::default());
    assert_eq!(jobs(&p), ["integration"]);
    assert_eq!(p.jobs[0].image, "python:3.12");
    assert_eq!(
        var(&p.jobs[0], "DATABASE_URL"),
        Some("postgres://postgres@postgres/test")
    );
    let svc = &p.jobs[0].services;
    assert_eq!(svc.len(), 1);
    assert_eq!(svc[0].image, "postgres:16");
    assert_eq!(svc[0].aliases, vec!["postgres"]);
}

#[test]
fn github_dispatch_inputs() {
    // workflow_dispatch defaults: target staging, dry_run true (notify off).
    let p = github("dispatch.yml", &Options::default());
    assert_eq!(jobs(&p), ["deploy staging"]);
    let opts = Options {
        inputs: vec![
            ("target".into(), "production".into()),
            ("dry_run".into(), "false".into()),
        ],
        ..Options::default()
    };
    let p = github("dispatch.yml", &opts);
    assert_eq!(jobs(&p), ["deploy production", "notify"]);
}

#[test]
fn github_job_outputs_needs_and_job_level_status() {
    use kiln_pipelines::github::{job_should_run, JobStatus};
    use kiln_pipelines::NeedResult;
    // GitHub's documented rules: a job's `outputs:` are evaluated after its
    // steps (`steps.<id>.outputs`), `needs.<id>.result`/`.outputs` are read
    // by later jobs' `if:`, `env:` and `run:`; a job-level `if:` without a
    // status function means `success() && (...)`; `failure()` is true when
    // any ancestor job failed; `always()` runs whatever happened.
    let p = github("release-outputs.yml", &Options::default());
    assert_eq!(
        jobs(&p),
        [
            "version",
            "build (x86_64)",
            "build (aarch64)",
            "publish",
            "notify",
            "cleanup"
        ]
    );
    let job = |n: &str| p.jobs.iter().find(|j| j.name == n).unwrap();
    assert_eq!(
        job("version").outputs,
        vec![
            ("tag".to_string(), "${{ steps.v.outputs.tag }}".to_string()),
            (
                "sha".to_string(),
                "0123456789abcdef0123456789abcdef01234567".to_string()
            )
        ],
        "static contexts substituted, steps left for run time"
    );
    assert!(job("build (x86_64)").steps[0].runtime_expressions);
    assert_eq!(job("cleanup").when, JobWhen::OnFailure);
    assert!(p.conditions.contains_key("publish") && p.conditions.contains_key("notify"));
    let ran = |name: &str, status: JobStatus, needs: &[(&str, &str)]| {
        let mut j = job(name).clone();
        j.needs_results = needs
            .iter()
            .map(|(id, result)| NeedResult {
                id: id.to_string(),
                result: result.to_string(),
                outputs: vec![("tag".into(), "v1.0".into())],
            })
            .collect();
        job_should_run(&j, p.conditions.get(name), status).unwrap()
    };
    // Everything passed.
    assert!(ran(
        "publish",
        JobStatus::Success,
        &[("version", "success"), ("build", "success")]
    ));
    assert!(!ran(
        "notify",
        JobStatus::Success,
        &[("build", "success"), ("publish", "success")]
    ));
    assert!(!ran(
        "cleanup",
        JobStatus::Success,
        &[("publish", "success")]
    ));
    // A build failed: publish is skipped, notify and cleanup run.
    assert!(!ran(
        "publish",
        JobStatus::Failure,
        &[("version", "success"), ("build", "failure")]
    ));
    assert!(ran(
        "notify",
        JobStatus::Failure,
        &[("build", "failure"), ("publish", "skipped")]
    ));
    assert!(ran(
        "cleanup",
        JobStatus::Failure,
        &[("publish", "skipped")]
    ));
    // A plain job after a skipped one is skipped.
    assert!(!ran(
        "build (x86_64)",
        JobStatus::Skipped,
        &[("version", "skipped")]
    ));
}

#[test]
fn github_reusable_workflows_local_and_remote() {
    // GitHub: a job with `uses: ./.github/workflows/x.yml` runs the called
    // workflow's jobs (shown as "caller / job") with `with:` as its inputs,
    // after the caller's `needs`; a job that needs the caller waits for all
    // of them. A workflow from another repository is not in the checkout.
    let p = github("call-reusable.yml", &Options::default());
    assert_eq!(
        jobs(&p),
        [
            "lint",
            "build / compile",
            "build / test",
            "deploy",
            "report"
        ]
    );
    let job = |n: &str| p.jobs.iter().find(|j| j.name == n).unwrap();
    let compile = job("build / compile");
    assert_eq!(compile.steps[0].script, "make TARGET=linux");
    assert_eq!(compile.stage.as_deref(), Some("build"));
    assert_eq!(compile.id, "build / compile");
    assert_eq!(compile.needs.as_deref(), Some(&["lint".to_string()][..]));
    assert_eq!(
        job("build / test").needs.as_deref(),
        Some(&["build / compile".to_string(), "lint".to_string()][..])
    );
    assert_eq!(
        job("deploy").needs.as_deref(),
        Some(
            &[
                "build / compile".to_string(),
                "build / test".to_string(),
                "scan".to_string()
            ][..]
        ),
        "the remote call is kept by its id"
    );
    let ex = excluded(&p);
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].0, "scan");
    assert!(ex[0].1.contains("not in this checkout"), "{}", ex[0].1);
    // The called workflow alone: its input's default (empty target).
    let p = github("reusable-build.yml", &Options::default());
    assert_eq!(jobs(&p), ["compile", "test"]);
    assert_eq!(p.jobs[0].steps[0].script, "make TARGET=");
}

#[test]
fn delayed_jobs_allowed_failures_and_forced_jobs() {
    use kiln_pipelines::AllowFailure;
    use std::time::Duration;
    // GitLab: `when: delayed` needs `start_in` (at most a week) and runs
    // the job that long after its stage's turn; a rule's `when` replaces
    // the job's; `only: [schedules]` keeps a job to scheduled pipelines.
    let p = gitlab(
        "delayed-canary.gitlab-ci.yml",
        &checkout("x"),
        &Options::default(),
    );
    assert_eq!(
        jobs(&p),
        ["build", "canary", "rollout", "smoke", "rollback"]
    );
    let job = |p: &Pipeline, n: &str| p.jobs.iter().find(|j| j.name == n).unwrap().clone();
    assert_eq!(job(&p, "rollout").start_in, Some(Duration::from_secs(1800)));
    assert_eq!(job(&p, "rollout").when, JobWhen::OnSuccess);
    assert_eq!(job(&p, "smoke").allow_failure, AllowFailure::Yes);
    assert_eq!(job(&p, "rollback").when, JobWhen::OnFailure);
    assert_eq!(excluded(&p), [("nightly-cleanup", "only: [\"schedules\"]")]);
    let s = kiln_pipelines::JobSummary::of(&job(&p, "rollout"));
    assert_eq!(s.start_in_s, Some(1800));
    let p = gitlab(
        "delayed-canary.gitlab-ci.yml",
        &checkout("x"),
        &source("schedule"),
    );
    assert_eq!(
        job(&p, "nightly-cleanup").start_in,
        Some(Duration::from_secs(86400))
    );
    // A feature branch: the canary and the rollout are left out ...
    let mut feature = checkout("x");
    feature.branch = Some("feature".into());
    let p = gitlab(
        "delayed-canary.gitlab-ci.yml",
        &feature,
        &Options::default(),
    );
    assert_eq!(jobs(&p), ["build", "smoke", "rollback"]);
    // ... unless asked for by name (`kiln run-job FILE rollout --force`).
    let forced = Options {
        force_jobs: vec!["rollout".into()],
        ..Options::default()
    };
    let p = gitlab("delayed-canary.gitlab-ci.yml", &feature, &forced);
    assert_eq!(jobs(&p), ["build", "rollout", "smoke", "rollback"]);
    assert!(
        p.notes.iter().any(|n| n.contains("rollout: excluded by")
            && n.contains("when: never")
            && n.contains("--force")),
        "{:?}",
        p.notes
    );
}

#[test]
fn delayed_needs_a_start_in_of_at_most_a_week() {
    for (text, says) in [
        ("j:\n  script: x\n  when: delayed\n", "needs `start_in`"),
        (
            "j:\n  script: x\n  when: delayed\n  start_in: 8 days\n",
            "at most one week",
        ),
        (
            "j:\n  script: x\n  when: delayed\n  start_in: soon\n",
            "not a duration",
        ),
    ] {
        let e = kiln_pipelines::gitlab::parse(
            "t.gitlab-ci.yml",
            text,
            &checkout("x"),
            &Options::default(),
            &|_| Err(std::io::ErrorKind::NotFound.into()),
        )
        .unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
        assert!(e.to_string().contains("t.gitlab-ci.yml:"), "{e}");
    }
}

/// Options whose `include: remote` reads `https://HOST/PATH` from
/// `corpus/fidelity/remote/HOST/PATH`: the files a server would send
/// (`tests/tests/cli.rs` fetches over HTTP from a server on 127.0.0.1).
fn with_remote_mirror() -> Options {
    let mirror = corpus("fidelity/remote");
    Options {
        remote_includes: kiln_pipelines::RemoteIncludes::with(move |url| {
            let rel = url.strip_prefix("https://").unwrap_or(url);
            kiln_pipelines::read_beneath(&mirror, rel, 1 << 20)
        }),
        ..Options::default()
    }
}

#[test]
fn remote_includes_nest_and_take_inputs_and_rules() {
    // GitLab: a remote file is read without a project, its own `remote`
    // includes resolve by full URL; `rules:` decide whether an include is
    // read (here: only for tags) and `inputs:` reach its `spec:` header.
    // Included files come first, then the including file's jobs; jobs
    // order by stage.
    let opts = with_remote_mirror();
    let p = gitlab("remote-templates.gitlab-ci.yml", &checkout("x"), &opts);
    assert_eq!(jobs(&p), ["go-mod-tidy", "lint", "unit"]);
    let unit = p.jobs.iter().find(|j| j.name == "unit").unwrap();
    assert_eq!(unit.image, "golang:1.22");
    assert_eq!(var(unit, "FROM_TEMPLATE"), Some("common-v3"));
    assert_eq!(var(unit, "GOFLAGS"), Some("-race"));
    assert!(p.notes.is_empty(), "{:?}", p.notes);
    let mut tag = checkout("x");
    tag.branch = None;
    tag.tag = Some("v1.0.0".into());
    let p = gitlab("remote-templates.gitlab-ci.yml", &tag, &opts);
    assert_eq!(jobs(&p), ["go-mod-tidy", "lint", "unit", "publish"]);
    assert_eq!(p.jobs[3].stage.as_deref(), Some("deploy"), "inputs.stage");
    // Without a fetcher (a library caller): skipped with a warning, and the
    // jobs that extend its templates fail as GitLab's would without them.
    let root = corpus("fidelity/gitlab");
    let text = std::fs::read_to_string(root.join("remote-templates.gitlab-ci.yml")).unwrap();
    let e = kiln_pipelines::load(
        Path::new("remote-templates.gitlab-ci.yml"),
        &text,
        &checkout("x"),
        &Options::default(),
        &|_| Err(std::io::ErrorKind::NotFound.into()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("which does not exist"), "{e}");
    // The earlier includes file: its remote lint job joins once fetched,
    // before `unit` in their stage (included content is merged first).
    let p = gitlab("includes.gitlab-ci.yml", &checkout("x"), &opts);
    assert_eq!(jobs(&p), ["lint", "unit", "deploy-staging"]);
}

#[test]
fn reusable_workflow_outputs_inputs_and_secrets() {
    // GitHub: `with:` gives the called workflow's `inputs` (typed as
    // declared; `${{ inputs.channel }}` of the caller resolves first);
    // `secrets: inherit` passes every secret, `secrets: {NAME: ...}` only
    // those named; `on.workflow_call.outputs` are what the caller's
    // `needs.version.outputs` hold once the called jobs ran.
    let mut c = checkout("fidelity/github");
    c.secrets = vec![
        ("GH_TOKEN".into(), "tok".into()),
        ("SIGNING_KEY".into(), "key".into()),
    ];
    let opts = Options::default();
    let root = corpus("fidelity/github");
    let file = ".github/workflows/release-call.yml";
    let text = std::fs::read_to_string(root.join(file)).unwrap();
    let files = kiln_pipelines::ProjectFiles::new(&root, &opts.limits);
    let p = kiln_pipelines::load(Path::new(file), &text, &c, &opts, &|f| files.read(f)).unwrap();
    assert_eq!(
        jobs(&p),
        [
            "version / compute",
            "version / notes",
            "sign / compute",
            "sign / notes",
            "publish"
        ]
    );
    let job = |n: &str| p.jobs.iter().find(|j| j.name == n).unwrap();
    assert!(job("version / compute").steps[0]
        .script
        .contains("-stable\" >> \"$GITHUB_OUTPUT\""));
    assert!(job("sign / compute").steps[0].script.contains("-signing\""));
    assert_eq!(var(job("version / notes"), "GH_TOKEN"), Some("tok"));
    assert_eq!(var(job("version / notes"), "PRERELEASE"), Some("false"));
    assert_eq!(var(job("sign / notes"), "GH_TOKEN"), Some("key"));
    assert_eq!(
        p.call_outputs["version"],
        [
            (
                "version".to_string(),
                "${{ jobs.compute.outputs.version }}".to_string()
            ),
            (
                "notes-file".to_string(),
                "${{ jobs.notes.outputs.file }}".to_string()
            ),
        ]
    );
    assert_eq!(
        job("publish").needs.as_deref().map(<[String]>::len),
        Some(4),
        "publish needs every called job"
    );
}

/// A GitLab API (for `include: project` and `component`) that answers from
/// `corpus/fidelity/gitlab-api`: `PROJECT/-/REF/FILE`, the project's
/// `PROJECT/-/project.json` (`default_branch`) and `PROJECT/-/releases.json`
/// (release tags), as `GET /api/v4/projects/:id/...` would
/// (`runner/src/local/gitlab_include.rs` sends those requests).
struct GitlabMirror(std::path::PathBuf);

impl GitlabMirror {
    fn json(&self, project: &str, name: &str) -> std::io::Result<serde_json::Value> {
        let text = kiln_pipelines::read_beneath(&self.0, &format!("{project}/-/{name}"), 1 << 20)?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }
}

impl kiln_pipelines::GitlabFiles for GitlabMirror {
    fn host(&self) -> &str {
        "gitlab.com"
    }

    fn file(&self, project: &str, file: &str, git_ref: Option<&str>) -> std::io::Result<String> {
        let git_ref = match git_ref {
            Some(r) => r.to_string(),
            None => self.json(project, "project.json")?["default_branch"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        };
        kiln_pipelines::read_beneath(&self.0, &format!("{project}/-/{git_ref}/{file}"), 1 << 20)
    }

    fn releases(&self, project: &str) -> std::io::Result<Vec<String>> {
        let list = self.json(project, "releases.json")?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["tag_name"].as_str().map(String::from))
            .collect())
    }
}

#[test]
fn project_and_component_includes_through_the_gitlab_api() {
    // GitLab: `project` files at `ref` (default: the project's default
    // branch, here `main`), their `local` includes from that project at
    // that ref; the component `.../secret-detection@1` is the highest 1.x.y
    // release (1.1.2, not 2.0.0), its file `templates/secret-detection.yml`,
    // its `stage` input `check`; `$CI_SERVER_FQDN` is gitlab.com (the
    // checkout's remote); the remote file matches its `integrity:`. Jobs
    // order by stage: build, check, test.
    let mut opts = with_remote_mirror();
    opts.gitlab_api = kiln_pipelines::GitlabApi::with(GitlabMirror(corpus("fidelity/gitlab-api")));
    let p = gitlab("api-includes.gitlab-ci.yml", &checkout("x"), &opts);
    assert_eq!(jobs(&p), ["build-image", "secret_detection", "yamllint"]);
    assert!(p.notes.is_empty(), "{:?}", p.notes);
    let build = &p.jobs[0];
    assert_eq!(build.image, "docker:27");
    assert_eq!(var(build, "FROM_TEMPLATE"), Some("common-v3"));
    assert_eq!(p.jobs[1].stage.as_deref(), Some("check"));
    assert!(p.jobs[2].allow_failure != kiln_pipelines::AllowFailure::No);
    // Without a server: both are skipped with a warning, and the job that
    // extends a skipped template fails as GitLab's would without it.
    let root = corpus("fidelity/gitlab");
    let text = std::fs::read_to_string(root.join("api-includes.gitlab-ci.yml")).unwrap();
    let e = kiln_pipelines::load(
        Path::new("api-includes.gitlab-ci.yml"),
        &text,
        &checkout("x"),
        &with_remote_mirror(),
        &|_| Err(std::io::ErrorKind::NotFound.into()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(".docker-build") && e.contains("does not exist"),
        "{e}"
    );
}
