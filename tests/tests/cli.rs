//! The `kiln` binary as a user runs it.

use kiln_tests::harness::{self, assert_no_leaks, kiln_cmd};

fn help_lists_the_commands() {
    let o = std::process::Command::new(harness::kiln_bin())
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for cmd in ["run-job", "doctor", "kernel"] {
        assert!(s.contains(cmd), "--help lacks {cmd}: {s}");
    }
}

fn doctor_reports_kvm_and_qemu_as_json() {
    let dir = harness::run_dir("doctor");
    let o = kiln_cmd(&dir).args(["doctor", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("doctor --json is JSON");
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    // ... and what of the VMM jail this host enforces.
    for n in [
        "kvm",
        "qemu",
        "backend",
        "kernel",
        "agent",
        "mkfs.ext4",
        "vmm process",
        "namespaces",
        "seccomp",
        "cgroup",
        "qemu jail",
    ] {
        assert!(names.contains(&n), "doctor lacks {n}: {names:?}");
    }
    for c in v.as_array().unwrap() {
        if c["status"] != "ok" {
            assert!(c["fix"].is_string(), "every gap has a fix: {c}");
        }
    }
}

fn run_job_keeps_streams_apart_and_passes_the_exit_code() {
    let dir = harness::run_dir("cli-exit");
    let o = harness::run_job_cmd(&dir)
        .args([
            "--",
            "sh",
            "-c",
            "echo to-stdout; echo to-stderr >&2; exit 7",
        ])
        .output()
        .unwrap();
    assert_no_leaks(&dir);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "to-stdout\n");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("to-stderr\n"), "{err}");
    assert!(
        err.contains("job failed (exit code 7)") && err.contains("boot "),
        "summary line: {err}"
    );
}

fn run_job_reports_a_killed_job_as_137_and_runs_scripts() {
    let dir = harness::run_dir("cli-137");
    // Outside the run dir (which must be left empty), and this run's own:
    // another run of this test may write its script meanwhile.
    let script = tempfile::Builder::new()
        .prefix("cli-137-")
        .suffix(".sh")
        .tempfile_in(harness::test_root())
        .unwrap();
    std::fs::write(
        script.path(),
        "echo from-script\nkill -9 $$\necho not reached\n",
    )
    .unwrap();
    let script = script.path();
    let o = kiln_cmd(&dir)
        .args(["run-job", "--cpus", "1", "--memory", "512", "--image"])
        .arg(harness::busybox_image())
        .arg("--script")
        .arg(script)
        .output()
        .unwrap();
    assert_no_leaks(&dir);
    assert_eq!(
        o.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "from-script\n");
}

fn bad_input_gets_clear_errors() {
    let dir = harness::run_dir("cli-bad");
    let o = kiln_cmd(&dir)
        .args(["run-job", "--image", "/nonexistent/img", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/nonexistent/img") && err.contains("image"),
        "{err}"
    );

    let o = kiln_cmd(&dir)
        .args(["run-job", "--image", "x", "-e", "NOEQUALS", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("NOEQUALS"));

    let o = kiln_cmd(&dir)
        .args(["run-job", "--image", "x"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nothing to run"));

    let o = kiln_cmd(&dir)
        .args([
            "run-job",
            "--backend",
            "vmware",
            "--image",
            "x",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown backend 'vmware'"));
    assert_no_leaks(&dir);
}

/// `kiln snapshot ls --json` and `rm` on a cache holding a damaged snapshot
/// and a file that is not one: the damaged one is listed and removed by its
/// prefix, a prefix that matches nothing (or names a path) is an error, and
/// nothing but snapshot files is ever removed.
fn snapshot_ls_and_rm_touch_only_snapshots() {
    let dir = harness::run_dir("cli-snap");
    let cache = dir.join("cache");
    let snaps = cache.join("snapshots");
    std::fs::create_dir_all(&snaps).unwrap();
    std::fs::write(snaps.join("abcd1234.snap"), b"not a snapshot").unwrap();
    std::fs::write(snaps.join("notes.txt"), b"the user's").unwrap();
    let kiln = |args: &[&str]| {
        kiln_cmd(&dir)
            .env("KILN_CACHE_DIR", &cache)
            .args(args)
            .output()
            .unwrap()
    };
    let o = kiln(&["snapshot", "ls", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).expect("ls --json is JSON");
    let list = list.as_array().expect("an array");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], "abcd1234");
    assert_eq!(list[0]["state"], "damaged");
    assert!(list[0]["why"].as_str().is_some_and(|w| !w.is_empty()));

    for bad in ["../../etc", "zz"] {
        let o = kiln(&["snapshot", "rm", bad]);
        assert_eq!(o.status.code(), Some(2), "rm {bad}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("kiln snapshot ls"), "{err}");
    }
    let o = kiln(&["snapshot", "rm", "abcd"]);
    assert!(o.status.success(), "{o:?}");
    assert!(!snaps.join("abcd1234.snap").exists());
    let o = kiln(&["snapshot", "rm", "--all"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        std::fs::read(snaps.join("notes.txt")).unwrap(),
        b"the user's",
        "only snapshot files are removed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--list` with `--source`, `--tag`, `--input`, `--all` and `--json`, on a
/// git checkout whose remote decides the project variables.
fn list_simulates_sources_refs_and_inputs() {
    let dir = harness::run_dir("cli-list");
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let ok = std::process::Command::new("git")
            .args(["-c", "user.name=T", "-c", "user.email=t@example.org"])
            .args(args)
            .current_dir(&repo)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["remote", "add", "origin", "git@gitlab.com:acme/shop.git"]);
    std::fs::write(
        repo.join(".gitlab-ci.yml"),
        "spec:\n  inputs:\n    py:\n      default: '3.12'\n---\n\
         variables: {A: 1}\nvariables: {IMG: $CI_REGISTRY_IMAGE}\n\
         test:\n  image: python:$[[ inputs.py ]]\n  script: pytest\n  allow_failure: true\n\
         deploy:\n  script: echo $IMG\n  only: [main@acme/shop]\n\
         mr:\n  script: x\n  rules:\n    - if: $CI_MERGE_REQUEST_IID\n      when: manual\n\
         later:\n  script: x\n  when: delayed\n  start_in: 5 minutes\n",
    )
    .unwrap();
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "ci"]);
    let list = |extra: &[&str]| {
        let o = kiln_cmd(&dir)
            .arg("run-job")
            .arg(repo.join(".gitlab-ci.yml"))
            .arg("--list")
            .args(extra)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "{extra:?}: {out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let out = list(&["--all"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[0].starts_with("test ") && lines[0].contains("image=python:3.12"),
        "{out}"
    );
    assert!(
        lines[0].contains("when=on_success allow_failure=yes"),
        "{out}"
    );
    assert!(lines[1].starts_with("deploy "), "{out}");
    assert!(
        lines[2].starts_with("later ") && lines[2].contains("when=delayed start_in=300s"),
        "{out}"
    );
    assert!(
        lines[3].starts_with("mr ") && lines[3].contains("excluded: mr.rules: no rule matched"),
        "{out}"
    );
    // `--force` keeps a job its rules leave out, and says which clause.
    let o = kiln_cmd(&dir)
        .arg("run-job")
        .arg(repo.join(".gitlab-ci.yml"))
        .args(["mr", "--force", "--list"])
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(out.lines().any(|l| l.starts_with("mr ")), "{out}{err}");
    assert!(
        err.contains("mr: excluded by mr.rules: no rule matched; kept because of --force"),
        "{err}"
    );

    let out = list(&[
        "--source",
        "merge_request_event",
        "--input",
        "py=3.9",
        "--all",
    ]);
    assert!(
        out.starts_with("mr ") && out.contains("when=manual"),
        "{out}"
    );
    assert!(
        out.contains("test ") && out.contains("excluded: only: [branches, tags]"),
        "{out}"
    );

    let out = list(&["--tag", "v1", "--json", "--all"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let jobs: Vec<&str> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(jobs, ["test", "later"]);
    assert_eq!(v["jobs"][1]["start_in_s"], 300);
    assert_eq!(v["jobs"][0]["allow_failure"], true);
    assert_eq!(v["jobs"][0]["when"], "on_success");
    let excluded: Vec<&str> = v["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(excluded, ["deploy", "mr"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `include: remote` from a server on 127.0.0.1: fetched and cached, read
/// from the cache with `--offline` once the server is gone; a 404 and an
/// oversize file are clear errors naming the URL and the entry.
fn remote_includes_are_fetched_cached_and_bounded() {
    use axum::routing::get;
    let dir = harness::run_dir("cli-remote-include");
    let cache = dir.join("cache");
    let big = "# padding\n".repeat(500_000); // 5 MB: over max_file_bytes (4 MiB)
    let app = axum::Router::new()
        .route(
            "/acme/ci/-/raw/v1/build.yml",
            get(|| async { ".build:\n  image: golang:1.22\n  script: make\n" }),
        )
        .route("/big.yml", get(move || async move { big.clone() }));
    let server = kiln_tests::fake_server::ServerThread::start("remote-include", app);
    std::fs::create_dir_all(dir.join("p")).unwrap();
    let write = |name: &str, path: &str| {
        let f = dir.join("p").join(name);
        std::fs::write(
            &f,
            format!(
                "include:\n  - remote: {}{path}\nbuild:\n  extends: .build\n",
                server.url
            ),
        )
        .unwrap();
        f
    };
    let ok = write("ok.gitlab-ci.yml", "/acme/ci/-/raw/v1/build.yml");
    let list = |file: &std::path::Path, extra: &[&str]| {
        kiln_cmd(&dir)
            .env("KILN_CACHE_DIR", &cache)
            .arg("run-job")
            .arg(file)
            .args(["--list", "--json"])
            .args(extra)
            .output()
            .unwrap()
    };
    let image = |o: &std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["jobs"][0]["image"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(image(&list(&ok, &[])), "golang:1.22");
    // Errors name the file, the entry and the URL, and say what failed.
    let missing = write("missing.gitlab-ci.yml", "/nope.yml");
    let o = list(&missing, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "missing.gitlab-ci.yml:2:3: cannot read included file `{}/nope.yml`: the server \
             answered 404 Not Found",
            server.url
        )),
        "{err}"
    );
    let big = write("big.gitlab-ci.yml", "/big.yml");
    let o = list(&big, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("big.yml`: it is larger than 4194304 bytes (max_file_bytes)"),
        "{err}"
    );
    // The server is gone: --offline reads the cached copy; a file never
    // fetched is a clear error.
    drop(server);
    assert_eq!(image(&list(&ok, &["--offline"])), "golang:1.22");
    let o = list(&missing, &["--offline"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--offline: it is not in kiln's cache")
            && err.contains("run once without --offline to fetch it"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `include: project` through the GitLab API of `--gitlab-url` (a fake
/// GitLab on 127.0.0.1): the default branch first, then the file, with the
/// token from `GITLAB_TOKEN` in `Authorization`, never in the output;
/// `--offline` reads the cached answers once the server is gone.
fn project_includes_come_through_the_gitlab_api() {
    use std::sync::{Arc, Mutex};

    use axum::response::IntoResponse;
    const TOKEN: &str = "glpat-cli-test-secret";
    let dir = harness::run_dir("cli-gitlab-api");
    let cache = dir.join("cache");
    let auth = Arc::new(Mutex::new(Vec::new()));
    let seen = auth.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                let a = headers.get("authorization").map(|v| v.to_str().unwrap_or("").to_string());
                seen.lock().unwrap().push((uri.to_string(), a));
                let body = match uri.to_string().as_str() {
                    "/api/v4/projects/acme%2Fci" => r#"{"default_branch": "trunk"}"#,
                    "/api/v4/projects/acme%2Fci/repository/files/jobs%2Fbuild.yml/raw?ref=trunk" => {
                        ".build:\n  image: golang:1.23\n  script: make\n"
                    }
                    _ => return (axum::http::StatusCode::NOT_FOUND, "").into_response(),
                };
                body.into_response()
            }
        },
    );
    let server = kiln_tests::fake_server::ServerThread::start("gitlab-api", app);
    let url = server.url.clone();
    std::fs::create_dir_all(dir.join("p")).unwrap();
    let file = dir.join("p/.gitlab-ci.yml");
    std::fs::write(
        &file,
        "include:\n  - project: acme/ci\n    file: /jobs/build.yml\nbuild:\n  extends: .build\n",
    )
    .unwrap();
    let list = |extra: &[&str]| {
        kiln_cmd(&dir)
            .env("KILN_CACHE_DIR", &cache)
            .env("GITLAB_TOKEN", TOKEN)
            .arg("run-job")
            .arg(&file)
            .args(["--list", "--json", "--gitlab-url", &url])
            .args(extra)
            .output()
            .unwrap()
    };
    let check = |o: std::process::Output| {
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        );
        assert!(o.status.success(), "{err}");
        assert!(!out.contains(TOKEN) && !err.contains(TOKEN), "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["jobs"][0]["image"], "golang:1.23", "{out}");
    };
    check(list(&[]));
    assert_eq!(
        *auth.lock().unwrap(),
        [
            (
                "/api/v4/projects/acme%2Fci".to_string(),
                Some(format!("Bearer {TOKEN}"))
            ),
            (
                "/api/v4/projects/acme%2Fci/repository/files/jobs%2Fbuild.yml/raw?ref=trunk"
                    .to_string(),
                Some(format!("Bearer {TOKEN}"))
            ),
        ]
    );
    drop(server);
    check(list(&["--offline"]));
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() -> std::process::ExitCode {
    kiln_testkit::Suite::new()
        .test("help_lists_the_commands", &[], help_lists_the_commands)
        .test(
            "snapshot_ls_and_rm_touch_only_snapshots",
            &[],
            snapshot_ls_and_rm_touch_only_snapshots,
        )
        .test(
            "doctor_reports_kvm_and_qemu_as_json",
            &[],
            doctor_reports_kvm_and_qemu_as_json,
        )
        .test(
            "run_job_keeps_streams_apart_and_passes_the_exit_code",
            &harness::vm(),
            run_job_keeps_streams_apart_and_passes_the_exit_code,
        )
        .test(
            "run_job_reports_a_killed_job_as_137_and_runs_scripts",
            &harness::vm(),
            run_job_reports_a_killed_job_as_137_and_runs_scripts,
        )
        .test(
            "list_simulates_sources_refs_and_inputs",
            &[kiln_testkit::tool("git", "git")],
            list_simulates_sources_refs_and_inputs,
        )
        .test(
            "remote_includes_are_fetched_cached_and_bounded",
            &[],
            remote_includes_are_fetched_cached_and_bounded,
        )
        .test(
            "project_includes_come_through_the_gitlab_api",
            &[],
            project_includes_come_through_the_gitlab_api,
        )
        .test(
            "bad_input_gets_clear_errors",
            &[],
            bad_input_gets_clear_errors,
        )
        .run()
}
