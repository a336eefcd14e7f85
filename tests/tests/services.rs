//! End-to-end: a job's `services:` in the job's own VM (qemu backend; TCG
//! where KVM cannot run unmodified guests). One VM per test: a service
//! reachable at its aliases and at `localhost` with its and the job's
//! variables, in a root of its own, next to one that exits before it
//! listens (the health-check warning with its last output, and the job
//! failing when it uses it); and the same through `kiln run-job` on a `.gitlab-ci.yml`.
//! The fake GitLab's test is in `gitlab.rs`.

use kiln::executor::{FailureReason, WAIT_VAR};
use kiln::joblog::BufferSink;
use kiln_pipelines::services::service;
use kiln_pipelines::Variable;
use kiln_tests::harness::{self, assert_no_leaks, SERVICE_PAGE, SERVICE_PORT};

/// The service fixture, as a job names it.
fn image() -> String {
    harness::service_image().display().to_string()
}

async fn services_answer_at_aliases_and_localhost_and_a_failed_one_warns() {
    let dir = harness::run_dir("services");
    let ex = harness::executor(&dir);
    let derived = harness::service_image()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let script = format!(
        "grep -w db /etc/hosts\n\
         wget -qO- http://db:{SERVICE_PORT}/ | sed 's/^/via-db: /'\n\
         wget -qO- http://localhost:{SERVICE_PORT}/ | sed 's/^/via-localhost: /'\n\
         wget -qO- http://{derived}:{SERVICE_PORT}/ | sed 's/^/via-name: /'\n\
         echo before-sleeper\n\
         wget -qO- http://sleeper:8081/\n\
         echo never-here"
    );
    let mut job = harness::busybox_job("services", &script);
    job.variables.push(Variable::new("JOBVAR", "from-the-job"));
    // Generous: under TCG on a loaded host `httpd` may take seconds.
    job.variables.push(Variable::new(WAIT_VAR, "120"));
    job.services.push(
        service(
            &image(),
            Some("db"),
            None,
            None,
            vec![Variable::new("GREETING", "hi")],
        )
        .unwrap(),
    );
    // The same image, started with a command that exits before it ever
    // listens; its health check is for port 8081 (the other one has 8080).
    // (The wait's timeout itself is checked by the agent's unit tests,
    // without a VM.)
    job.services.push(
        service(
            &image(),
            Some("sleeper"),
            Some(vec!["sh".into(), "-c".into()]),
            Some(vec![
                "echo sleeper starting; echo no port here >&2; exit 3".into()
            ]),
            vec![Variable::new("HEALTHCHECK_TCP_PORT", "8081")],
        )
        .unwrap(),
    );
    let (_tx, rx) = tokio::sync::watch::channel(None);
    let mut sink = BufferSink::default();
    let r = ex.run(&job, &mut sink, rx).await;
    assert_no_leaks(&dir);
    let out = String::from_utf8_lossy(&sink.stdout).to_string();
    let err = String::from_utf8_lossy(&sink.stderr).to_string();
    let page = format!("{SERVICE_PAGE} GREETING=hi JOBVAR=from-the-job outside=hidden");
    for want in [
        format!("via-db: {page}\n"),
        format!("via-localhost: {page}\n"),
        format!("via-name: {page}\n"),
        "before-sleeper\n".to_string(),
    ] {
        assert!(
            out.contains(&want),
            "stdout lacks {want:?}:\n{out}\nstderr:\n{err}"
        );
    }
    assert!(
        out.contains("127.0.0.1\tlocalhost") && out.contains(" db"),
        "{out}"
    );
    assert!(!out.contains("never-here"), "{out}");
    // The job fails where it uses the service that never started...
    assert_eq!(
        r.failure,
        Some(FailureReason::ScriptFailure),
        "{r:?}\n{err}"
    );
    assert_ne!(r.exit_code, 0);
    // ...and its log says why, as gitlab-runner's does.
    for want in [
        format!("Starting service {} ...", image()),
        "Waiting for services to be up and running (timeout 120 seconds)...".to_string(),
        format!(
            "*** WARNING:\x1b[0;m Service {} probably didn't start properly.",
            image()
        ),
        "Health check error:\nit exited with code 3 before it accepted a connection\n".to_string(),
        "Service container logs:\n".to_string(),
        "sleeper starting\n".to_string(),
        "no port here\n".to_string(),
    ] {
        assert!(err.contains(&want), "stderr lacks {want:?}:\n{err}");
    }
    assert_eq!(
        err.matches("probably didn't start properly").count(),
        1,
        "only the failed service warns:\n{err}"
    );
}

/// The same through `kiln run-job` on a `.gitlab-ci.yml` (the services
/// come from the file, `default:` included).
fn gitlab_ci_services_run_under_run_job() {
    let repo = harness::test_root().join(format!("repo-services-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(&repo).unwrap();
    let yml = format!(
        "default:\n  services:\n    - name: {img}\n      alias: db\n      variables: {{GREETING: from-yaml}}\n\
         test:\n  variables: {{JOBVAR: jv}}\n  script:\n    - wget -qO- http://db:{SERVICE_PORT}/\n    - wget -qO- http://localhost:{SERVICE_PORT}/\n",
        img = image()
    );
    std::fs::write(repo.join(".gitlab-ci.yml"), yml).unwrap();
    kiln_tests::fixtures::git_commit_all(&repo);
    let dir = harness::run_dir("services-cli");
    let o = harness::kiln_cmd(&dir)
        .args(["--log-level", "error", "run-job"])
        .arg(repo.join(".gitlab-ci.yml"))
        .arg("test")
        .arg("--image")
        .arg(harness::busybox_image())
        .args(["--cpus", "1", "--memory", "512"])
        .output()
        .unwrap();
    assert_no_leaks(&dir);
    let _ = std::fs::remove_dir_all(&repo);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let page = format!("{SERVICE_PAGE} GREETING=from-yaml JOBVAR=jv outside=hidden\n");
    assert_eq!(out.matches(&page).count(), 2, "{out}\n{err}");
    assert!(err.contains("Starting service"), "{err}");
    assert!(!err.contains("WARNING"), "{err}");
}

fn main() -> std::process::ExitCode {
    kiln_testkit::Suite::new()
        .tokio(
            "services_answer_at_aliases_and_localhost_and_a_failed_one_warns",
            &harness::vm(),
            services_answer_at_aliases_and_localhost_and_a_failed_one_warns,
        )
        .test(
            "gitlab_ci_services_run_under_run_job",
            &[
                harness::qemu(),
                harness::busybox(),
                kiln_testkit::tool("git", "git"),
            ],
            gitlab_ci_services_run_under_run_job,
        )
        .run()
}
