mod common;

use common::*;
use kiln_pipelines::github::{self, Contexts, ExprValue, JobStatus, DEFAULT_SHELL_PROBE};
use kiln_pipelines::{AllowFailure, JobWhen, Options, Shell, StepWhen};

#[test]
fn rust_matrix_names_env_and_unsupported() {
    let w = github("rust.yml");
    assert_eq!(w.name.as_deref(), Some("CI"));
    assert_eq!(
        names(&w.jobs),
        [
            "test 1.80",
            "test stable",
            "test beta",
            "test nightly",
            "fmt"
        ]
    );
    let t = &w.jobs[0];
    assert_eq!(t.id, "test");
    assert_eq!(t.image, "catthehacker/ubuntu:act-latest");
    assert_eq!(t.timeout, mins(360));
    assert_eq!(var(t, "RUSTFLAGS"), Some("-D warnings"));
    assert_eq!(var(t, "RUST_BACKTRACE"), Some("1"));
    assert_eq!(var(t, "GITHUB_REF"), Some("refs/heads/main"));
    assert_eq!(var(t, "GITHUB_JOB"), Some("test"));
    // checkout is dropped, the toolchain action becomes a step that fails
    // the job and says why, `if` false drops doc.
    assert_eq!(t.steps.len(), 2);
    assert!(
        t.steps[0]
            .script
            .contains("uses `dtolnay/rust-toolchain@master`")
            && t.steps[0].script.contains("--skip-unsupported-actions")
            && t.steps[0].script.ends_with("exit 1\n"),
        "{}",
        t.steps[0].script
    );
    assert_eq!(t.steps[0].when, StepWhen::OnSuccess);
    let skip = Options {
        skip_unsupported_actions: true,
        ..Options::default()
    };
    let w2 = github_with("rust.yml", &ctx("github", Some("main")), &skip).unwrap();
    assert_eq!(w2.jobs[0].steps.len(), 1, "skipped on request");
    let t = &w2.jobs[0];
    assert_eq!(t.steps[0].name, "Test");
    assert!(!t.steps[0].allow_failure);
    assert_eq!(
        t.steps[0].shell,
        Shell::Custom(vec![
            "sh".into(),
            "-c".into(),
            DEFAULT_SHELL_PROBE.into(),
            "sh".into(),
            "{0}".into()
        ])
    );
    let stable = w2.job("test stable").unwrap();
    assert_eq!(stable.steps.len(), 2);
    assert_eq!(stable.steps[1].name, "Run cargo doc --no-deps");
    assert!(w2.job("test nightly").unwrap().steps[0].allow_failure);
    assert_eq!(w.unsupported.len(), 4);
    assert!(
        w.unsupported[0].contains("jobs.test.steps[1]"),
        "{:?}",
        w.unsupported
    );
    assert!(w.unsupported[0].contains("dtolnay/rust-toolchain@master"));
    assert_eq!(w.job("fmt").unwrap().timeout, mins(10));
}

#[test]
fn strict_mode_rejects_uses() {
    let opts = Options {
        strict: true,
        ..Options::default()
    };
    let e = github_with("rust.yml", &ctx("github", Some("main")), &opts).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("rust.yml: unsupported steps: jobs.test.steps[1]"),
        "{msg}"
    );
}

#[test]
fn node_runs_on_matrix_and_container() {
    let w = github("node.yml");
    assert_eq!(
        names(&w.jobs),
        [
            "build (ubuntu-latest, 18.x)",
            "build (ubuntu-latest, 20.x)",
            "build (ubuntu-latest, 22.x)",
            "container-test"
        ]
    );
    assert_eq!(w.groups["build"].len(), 3);
    assert_eq!(w.jobs[3].image, "node:20-bookworm");
    // Unmapped runs-on: listed with what to pass, not silently dropped.
    let windows: Vec<_> = w
        .unmapped
        .iter()
        .filter(|(_, why)| why.contains("pass -P windows-latest=IMAGE or --image IMAGE"))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(
        windows,
        [
            "build (windows-latest, 18.x)",
            "build (windows-latest, 20.x)",
            "build (windows-latest, 22.x)"
        ]
    );
    assert!(w
        .unsupported
        .iter()
        .any(|u| u.contains("actions/setup-node@v4")));
    assert_eq!(w.jobs[0].steps.len(), 4, "setup-node fails the job");
    // --image runs every job in one image.
    let every = Options {
        image: Some("debian:12".into()),
        ..Options::default()
    };
    let w = github_with("node.yml", &ctx("github", None), &every).unwrap();
    assert_eq!(w.jobs.len(), 7);
    assert!(w.jobs.iter().all(|j| j.image == "debian:12"));
    // -P maps another label.
    let mut opts = Options::default();
    opts.runner_images.set("windows-latest", "my/windows-ish:1");
    let w = github_with("node.yml", &ctx("github", None), &opts).unwrap();
    assert_eq!(w.jobs.len(), 7);
    assert_eq!(w.jobs[3].image, "my/windows-ish:1");
}

#[test]
fn python_matrix_include_exclude_defaults() {
    let w = github("python.yml");
    assert_eq!(
        names(&w.jobs),
        [
            "test (3.10, 4.2)",
            "test (3.11, 4.2)",
            "test (3.11, 5.0)",
            "test (3.12, 4.2, true)",
            "test (3.12, 5.0, true)",
            "test (3.13, 5.1)"
        ]
    );
    let j = &w.jobs[0];
    assert_eq!(j.image, "catthehacker/ubuntu:act-22.04");
    assert_eq!(j.steps.len(), 2, "experimental step is statically skipped");
    assert_eq!(j.steps[0].shell, Shell::Bash);
    assert_eq!(j.steps[0].working_dir.as_deref(), Some("app"));
    assert_eq!(j.steps[1].working_dir.as_deref(), Some("tests"));
    assert!(j.steps[0].script.contains("pip install \"django~=4.2\""));
    let exp = &w.jobs[3];
    assert_eq!(exp.steps.len(), 3);
    assert_eq!(
        exp.steps[2].shell,
        Shell::Custom(vec!["python".into(), "{0}".into()])
    );
}

#[test]
fn go_container_env_needs_and_job_if() {
    let w = github("go.yml");
    assert_eq!(names(&w.jobs), ["build", "deploy"]);
    assert_eq!(w.skipped, ["release"]);
    let b = &w.jobs[0];
    assert_eq!(b.image, "golang:1.22");
    assert_eq!(var(b, "GOFLAGS"), Some("-mod=readonly"));
    assert_eq!(
        var(b, "CGO_ENABLED"),
        Some("1"),
        "job env wins over container env"
    );
    assert_eq!(b.steps[0].timeout, mins(15));
    assert!(w.warnings.iter().any(|x| x.contains("container.options")));
    let d = &w.jobs[1];
    assert_eq!(d.needs.as_deref().unwrap(), ["build"]);
    assert_eq!(
        d.steps[0].script,
        "echo deploying 0123456789abcdef0123456789abcdef01234567"
    );
    let order: Vec<&str> = w
        .run_order("deploy")
        .unwrap()
        .iter()
        .map(|j| j.name.as_str())
        .collect();
    assert_eq!(order, ["build", "deploy"]);
    // On another branch deploy is skipped too.
    let w = github_with("go.yml", &ctx("github", Some("dev")), &Options::default()).unwrap();
    assert_eq!(w.skipped, ["deploy", "release"]);
}

#[test]
fn outputs_status_functions_and_runtime_expressions() {
    // `secrets` is known before the run (`--secret`): the last step's
    // `if: secrets.TOKEN != ''` is decided then.
    let mut with_token = ctx("github", Some("main"));
    with_token.secrets = vec![("TOKEN".into(), "t".into())];
    let w = github_with("outputs.yml", &with_token, &Options::default()).unwrap();
    assert_eq!(w.jobs[0].steps.len(), 7);
    assert_eq!(w.jobs[0].steps[6].condition, None);
    let w = github("outputs.yml");
    assert_eq!(w.jobs[0].steps.len(), 6, "no TOKEN: the step is left out");
    let w = github_with("outputs.yml", &with_token, &Options::default()).unwrap();
    let s = &w.jobs[0].steps;
    assert_eq!(s[0].id.as_deref(), Some("ver"));
    assert!(!s[0].runtime_expressions);
    assert!(s[1].runtime_expressions);
    assert_eq!(s[1].name, "Use ${{ steps.ver.outputs.version }}");
    assert_eq!(
        s[1].script,
        "echo \"building ${{ steps.ver.outputs.version }} at 0123456789abcdef0123456789abcdef01234567\""
    );
    assert_eq!(
        (s[2].when, s[2].condition.as_deref()),
        (StepWhen::OnSuccess, Some("steps.ver.outputs.version != ''"))
    );
    assert_eq!(
        (s[3].when, s[3].condition.as_deref()),
        (StepWhen::OnFailure, None)
    );
    assert_eq!(
        (s[4].when, s[4].condition.as_deref()),
        (StepWhen::Always, None)
    );
    assert_eq!(s[5].when, StepWhen::Always);
    assert!(s[5].condition.is_some());

    // What the executor does between steps.
    let outputs = github::parse_file_commands("version=1.2.3\n").unwrap();
    let mut cx = Contexts::default();
    cx.set("github", ExprValue::object([("sha", "abc")]));
    cx.set_step("ver", "success", "success", &outputs);
    cx.status = Some(JobStatus::Success);
    assert_eq!(
        github::substitute(&s[1].script, &cx).unwrap(),
        "echo \"building 1.2.3 at 0123456789abcdef0123456789abcdef01234567\""
    );
    assert_eq!(github::substitute(&s[1].env[0].1, &cx).unwrap(), "1.2.3");
    assert!(github::eval_condition(s[2].condition.as_deref().unwrap(), &cx).unwrap());
    assert!(!github::eval_condition(s[5].condition.as_deref().unwrap(), &cx).unwrap());
}

#[test]
fn shells() {
    let w = github("shells.yml");
    let shells: Vec<&Shell> = w.jobs[0].steps.iter().map(|s| &s.shell).collect();
    let custom = |v: &[&str]| Shell::Custom(v.iter().map(|s| s.to_string()).collect());
    assert_eq!(
        shells,
        [
            &custom(&["sh", "-c", DEFAULT_SHELL_PROBE, "sh", "{0}"]),
            &Shell::Bash,
            &Shell::Sh,
            &custom(&["python", "{0}"]),
            &custom(&["node", "{0}"]),
            &custom(&["pwsh", "-command", ". '{0}'"]),
        ]
    );
    assert!(w.unsupported.iter().any(|u| u.contains("shell: cmd")));
}

#[test]
fn env_precedence_static_and_dynamic() {
    let w = github("env.yml");
    let st = w.job("static").unwrap();
    assert_eq!(var(st, "LEVEL"), Some("job"));
    assert_eq!(var(st, "WF_ONLY"), Some("wf"));
    assert_eq!(st.steps[0].script, "echo \"step wf step\"");
    assert_eq!(
        st.steps[0].env,
        [
            ("STEP".to_string(), "step".to_string()),
            ("LEVEL".to_string(), "step".to_string())
        ]
    );
    // A step writes $GITHUB_ENV: env expressions wait for run time.
    let dy = w.job("dynamic").unwrap();
    assert_eq!(dy.steps[1].script, "echo \"${{ env.LEVEL }}\"");
    assert!(dy.steps[1].runtime_expressions);
    assert_eq!(
        dy.steps[2].condition.as_deref(),
        Some("env.LEVEL == 'changed'")
    );
    let mut cx = Contexts::default();
    for (k, v) in github::parse_env_file("LEVEL=changed\n").unwrap() {
        cx.set("env", ExprValue::object([(k, v)]));
    }
    assert!(github::eval_condition("env.LEVEL == 'changed'", &cx).unwrap());
}

#[test]
fn matrix_include_semantics_match_github_docs() {
    // The example from GitHub's "Expanding or adding matrix configurations".
    let w = github("matrix-include.yml");
    let scripts: Vec<&str> = w.jobs.iter().map(|j| j.steps[0].script.as_str()).collect();
    assert_eq!(
        scripts,
        [
            "echo \"apple-cat-pink-circle\"",
            "echo \"apple-dog-green-circle\"",
            "echo \"pear-cat-pink-\"",
            "echo \"pear-dog-green-\"",
            "echo \"banana---\"",
            "echo \"banana-cat--\"",
        ]
    );
}

#[test]
fn lint_labels_float_timeout_job_status_conditions() {
    let w = github("lint.yml");
    assert_eq!(names(&w.jobs), ["lint", "notify", "on-failure"]);
    assert_eq!(w.jobs[0].image, "catthehacker/ubuntu:act-24.04");
    assert_eq!(w.jobs[0].timeout, Some(std::time::Duration::from_secs(330)));
    assert_eq!(w.jobs[1].when, JobWhen::Always);
    assert_eq!(w.jobs[2].when, JobWhen::OnFailure);
    assert_eq!(w.jobs[1].allow_failure, AllowFailure::No);
    assert!(
        w.unmapped
            .iter()
            .any(|(_, why)| why.contains("reusable workflow")
                && why.contains("not in this checkout")),
        "a remote reusable workflow is left out with why: {:?}",
        w.unmapped
    );
}
