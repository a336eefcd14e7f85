//! `kiln run-job FILE JOB` end to end: a `.gitlab-ci.yml` job and a GitHub
//! workflow job, each in a VM, from a real git checkout.

use std::path::{Path, PathBuf};
use std::process::Output;

use kiln_tests::harness::{self, assert_no_leaks, kiln_cmd};

const GITLAB: &str = r#"
variables:
  FROM_FILE: file-value
build:
  image: registry.example.com/not/used:1
  variables:
    JOB_VAR: job-value
  before_script:
    - echo "before $FROM_FILE $JOB_VAR"
  script:
    - pwd
    - cat tracked.txt
    - cat uncommitted.txt
    - echo "secret is $MY_SECRET, split ${MY_SECRET%%-*}-${MY_SECRET#*-}"
    - mkdir -p dist && echo built > dist/out.txt && echo skip > dist/skip.log
    - ln -s /etc/passwd dist/leak && ln -s / dist/root
  artifacts:
    paths: [dist/]
    exclude: ["dist/*.log"]
uses-artifact:
  needs: [build]
  script:
    - cat dist/out.txt
pipefail:
  script:
    - false | true
    - echo after-pipe
flaky:
  allow_failure: true
  script:
    - echo flaky-ran
    - exit 7
fail:
  script:
    - echo one
    - exit 4
    - echo never
  after_script:
    - echo "after ran with status $CI_JOB_STATUS"
"#;

const GITHUB: &str = r#"
on: push
env:
  WF: wf-value
jobs:
  build:
    runs-on: ubuntu-latest
    env:
      JOB: job-value
    defaults:
      run:
        shell: sh
    steps:
      - uses: actions/checkout@v4
      - id: first
        run: |
          echo "wf=$WF job=$JOB ws=$GITHUB_WORKSPACE pwd=$(pwd)"
          echo "FROM_STEP=carried" >> "$GITHUB_ENV"
          echo "answer=42" >> "$GITHUB_OUTPUT"
      - run: echo "env=$FROM_STEP out=${{ steps.first.outputs.answer }}"
      - if: failure()
        run: echo must-not-run
      - name: in a subdirectory
        working-directory: sub
        run: pwd && cat file.txt
      - run: exit 5
      - run: echo skipped-after-failure
      - if: always()
        run: echo always-ran
"#;

/// Jobs that hand values on: workflow commands, job outputs, `needs.*`,
/// and job-level `if:` after a failure.
const CHAIN: &str = r#"
on: push
defaults:
  run:
    shell: sh
jobs:
  a:
    runs-on: ubuntu-latest
    outputs:
      ver: ${{ steps.s.outputs.ver }}
      file: ${{ steps.s.outputs.file }}
    steps:
      - id: s
        run: |
          echo "::set-output name=ver::1.2"
          echo "file=from-file" >> "$GITHUB_OUTPUT"
          echo "::add-mask::tops3cret"
          echo "the token is tops3cret"
          echo "::group::Compile"
          echo inside
          echo "::endgroup::"
          exit 3
  b:
    needs: a
    runs-on: ubuntu-latest
    steps:
      - run: echo b-must-not-run
  c:
    needs: [a, b]
    if: always() && needs.a.result == 'failure'
    runs-on: ubuntu-latest
    env:
      VER: ${{ needs.a.outputs.ver }}
    steps:
      - run: echo "c got $VER ${{ needs.a.outputs.file }} b=${{ needs.b.result }}"
"#;

/// A git checkout with both pipeline files, one committed file and one not.
fn repo(name: &str) -> PathBuf {
    let dir = harness::test_root().join(format!("repo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join(".github/workflows")).unwrap();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join(".gitlab-ci.yml"), GITLAB).unwrap();
    std::fs::write(dir.join(".github/workflows/ci.yml"), GITHUB).unwrap();
    std::fs::write(dir.join(".github/workflows/chain.yml"), CHAIN).unwrap();
    std::fs::write(dir.join("tracked.txt"), "tracked content\n").unwrap();
    std::fs::write(dir.join("sub/file.txt"), "in sub\n").unwrap();
    kiln_tests::fixtures::git_commit_all(&dir);
    std::fs::write(dir.join("uncommitted.txt"), "not committed yet\n").unwrap();
    dir
}

fn run(repo: &Path, file: &str, job: &str, extra: &[&str], run_dir: &Path) -> Output {
    let o = kiln_cmd(run_dir)
        .args(["--log-level", "error", "run-job"])
        .arg(repo.join(file))
        .arg(job)
        .arg("--image")
        .arg(harness::busybox_image())
        .args(["--cpus", "1", "--memory", "512", "--artifacts-dir"])
        .arg(repo.join("artifacts"))
        .args(extra)
        .output()
        .unwrap();
    assert_no_leaks(run_dir);
    o
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn gitlab_job_gets_env_workspace_masking_and_artifacts() {
    let repo = repo("gl-build");
    let dir = harness::run_dir("gl-build");
    let o = run(
        &repo,
        ".gitlab-ci.yml",
        "uses-artifact",
        &["--secret", "MY_SECRET=hunter2-topsecret"],
        &dir,
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}\n{}", text(&o.stderr));
    let name = repo.file_name().unwrap().to_string_lossy().to_string();
    assert!(out.contains("before file-value job-value"), "{out}");
    assert!(
        out.contains(&format!("/builds/{name}\n")),
        "working dir: {out}"
    );
    assert!(
        out.contains("tracked content") && out.contains("not committed yet"),
        "{out}"
    );
    assert!(
        out.contains("secret is [MASKED], split hunter2-topsecret")
            || out.contains("secret is [MASKED], split [MASKED]"),
        "{out}"
    );
    assert!(
        !out.contains("hunter2-topsecret") && !text(&o.stderr).contains("hunter2-topsecret"),
        "secret leaked: {out}"
    );
    // The build job's artifact, copied back, then handed to the job that needs it.
    assert_eq!(
        std::fs::read_to_string(repo.join("artifacts/build/dist/out.txt")).unwrap(),
        "built\n"
    );
    assert!(
        !repo.join("artifacts/build/dist/skip.log").exists(),
        "exclude honoured"
    );
    // Links the guest planted are not followed on the host, nor recreated.
    assert!(std::fs::symlink_metadata(repo.join("artifacts/build/dist/leak")).is_err());
    assert!(std::fs::symlink_metadata(repo.join("artifacts/build/dist/root")).is_err());
    assert!(out.ends_with("built\n"), "needs get the artifacts: {out}");
    // The user's checkout was not touched.
    assert!(!repo.join("dist").exists());
}

fn gitlab_shell_semantics_and_after_script_on_failure() {
    let repo = repo("gl-fail");
    let dir = harness::run_dir("gl-fail");
    let o = run(&repo, ".gitlab-ci.yml", "fail", &[], &dir);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(4), "{out}\n{}", text(&o.stderr));
    assert!(
        out.contains("one\n") && !out.contains("never"),
        "set -e: {out}"
    );
    assert!(
        out.contains("after ran with status failed"),
        "after_script after a failure: {out}"
    );

    let o = run(&repo, ".gitlab-ci.yml", "pipefail", &[], &dir);
    let out = text(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(1),
        "pipefail: {out}\n{}",
        text(&o.stderr)
    );
    assert!(!out.contains("after-pipe"), "{out}");
}

fn github_job_gets_env_file_commands_conditions_and_exit_code() {
    let repo = repo("gh");
    let dir = harness::run_dir("gh");
    let o = run(&repo, ".github/workflows/ci.yml", "build", &[], &dir);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(5), "{out}\n{}", text(&o.stderr));
    let name = repo.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        out.contains(&format!(
            "wf=wf-value job=job-value ws=/builds/{name} pwd=/builds/{name}"
        )),
        "{out}"
    );
    assert!(
        out.contains("env=carried out=42"),
        "GITHUB_ENV and GITHUB_OUTPUT: {out}"
    );
    assert!(
        out.contains(&format!("/builds/{name}/sub\nin sub\n")),
        "working-directory: {out}"
    );
    assert!(
        !out.contains("must-not-run") && !out.contains("skipped-after-failure"),
        "{out}"
    );
    assert!(out.ends_with("always-ran\n"), "{out}");
}

/// Two VMs (`a`, `c`); `b` is skipped without one.
fn github_workflow_commands_job_outputs_and_needs() {
    let repo = repo("chain");
    let dir = harness::run_dir("chain");
    let o = run(&repo, ".github/workflows/chain.yml", "c", &[], &dir);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(3), "a's exit code: {out}\n{err}");
    assert!(
        out.contains("the token is [MASKED]\n"),
        "::add-mask:: {out}"
    );
    assert!(
        !out.contains("tops3cret") && !err.contains("tops3cret"),
        "{out}\n{err}"
    );
    assert!(
        out.contains("##[group]Compile\ninside\n##[endgroup]\n"),
        "::group:: {out}"
    );
    assert!(
        !out.contains("::set-output"),
        "commands are consumed: {out}"
    );
    assert!(!out.contains("b-must-not-run"), "{out}");
    assert!(
        err.contains("job b skipped: a job it needs failed"),
        "{err}"
    );
    assert!(
        out.contains("c got 1.2 from-file b=skipped\n"),
        "needs.a.outputs in env and run, needs.b.result: {out}\n{err}"
    );
    assert!(
        err.contains("kiln: pipeline: a: failed · b: skipped · c: passed"),
        "{err}"
    );
}

/// One VM: a job allowed to fail says so, and the run passes.
fn gitlab_allowed_failure_passes_with_a_warning() {
    let repo = repo("flaky");
    let dir = harness::run_dir("flaky");
    let o = run(&repo, ".gitlab-ci.yml", "flaky", &[], &dir);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(out.contains("flaky-ran"), "{out}");
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("job failed (allowed to fail; exit code 7)"),
        "{err}"
    );
}

fn list_and_bad_files_give_clear_answers() {
    let repo = repo("list");
    let dir = harness::run_dir("list");
    let o = kiln_cmd(&dir)
        .arg("run-job")
        .arg(repo.join(".gitlab-ci.yml"))
        .arg("--list")
        .output()
        .unwrap();
    let out = text(&o.stdout);
    assert!(o.status.success());
    for j in ["build", "uses-artifact", "pipefail", "flaky", "fail"] {
        assert!(
            out.lines().any(|l| l.starts_with(j)),
            "--list lacks {j}: {out}"
        );
    }
    std::fs::write(repo.join("bad.gitlab-ci.yml"), "job:\n  script: [echo\n").unwrap();
    let o = kiln_cmd(&dir)
        .arg("run-job")
        .arg(repo.join("bad.gitlab-ci.yml"))
        .arg("job")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(
        err.contains("bad.gitlab-ci.yml:") && err.contains(':'),
        "line and column: {err}"
    );
    let o = kiln_cmd(&dir)
        .arg("run-job")
        .arg(repo.join(".gitlab-ci.yml"))
        .arg("nope")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("no job 'nope'"));
}

const CACHED: &str = r#"
cached:
  cache:
    key:
      files: [deps.lock]
      prefix: deps
    paths: [vendor/]
  script:
    - if [ -f vendor/data.bin ]; then echo restored; else mkdir -p vendor && head -c 200000 /dev/urandom > vendor/data.bin; fi
    - sha256sum vendor/data.bin
"#;

/// `cache:` in `kiln run-job`: the first run saves the job's files under a
/// key from `key: files:` in kiln's cache directory, the second restores
/// them byte-identical before its first step.
fn gitlab_cache_is_saved_then_restored_locally() {
    let dir = harness::test_root().join(format!("repo-gl-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".gitlab-ci.yml"), CACHED).unwrap();
    std::fs::write(dir.join("deps.lock"), "v1\n").unwrap();
    kiln_tests::fixtures::git_commit_all(&dir);
    let run_dir = harness::run_dir("gl-cache");
    let first = run(&dir, ".gitlab-ci.yml", "cached", &[], &run_dir);
    let (out1, err1) = (text(&first.stdout), text(&first.stderr));
    assert_eq!(first.status.code(), Some(0), "{out1}\n{err1}");
    let key = err1
        .lines()
        .find_map(|l| l.strip_prefix("kiln: Checking cache for "))
        .and_then(|k| k.strip_suffix("..."))
        .unwrap_or_else(|| panic!("no cache check in:\n{err1}"))
        .to_string();
    assert!(
        key.starts_with("deps-") && key.ends_with("-non_protected"),
        "{key}"
    );
    for want in [
        "Failed to extract cache",
        &format!("Creating cache {key}..."),
        "Created cache (1 files",
    ] {
        assert!(err1.contains(want), "{want:?} missing from:\n{err1}");
    }
    let sum = out1
        .lines()
        .find(|l| l.ends_with("  vendor/data.bin"))
        .unwrap_or_else(|| panic!("no checksum in:\n{out1}"))
        .to_string();
    assert!(!out1.lines().any(|l| l == "restored"), "{out1}");

    let second = run(&dir, ".gitlab-ci.yml", "cached", &[], &run_dir);
    let (out2, err2) = (text(&second.stdout), text(&second.stderr));
    assert_eq!(second.status.code(), Some(0), "{out2}\n{err2}");
    assert!(
        err2.contains(&format!("Checking cache for {key}..."))
            && err2.contains("Successfully extracted cache (1 files"),
        "{err2}"
    );
    assert!(out2.lines().any(|l| l == "restored"), "{out2}");
    assert!(out2.lines().any(|l| l == sum), "byte-identical: {out2}");
    // The user's checkout was not touched.
    assert!(!dir.join("vendor").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() -> std::process::ExitCode {
    kiln_testkit::Suite::new()
        .test(
            "gitlab_job_gets_env_workspace_masking_and_artifacts",
            &[
                harness::qemu(),
                harness::busybox(),
                kiln_testkit::tool("git", "git"),
            ],
            gitlab_job_gets_env_workspace_masking_and_artifacts,
        )
        .test(
            "gitlab_shell_semantics_and_after_script_on_failure",
            &[
                harness::qemu(),
                harness::busybox(),
                kiln_testkit::tool("git", "git"),
            ],
            gitlab_shell_semantics_and_after_script_on_failure,
        )
        .test(
            "github_job_gets_env_file_commands_conditions_and_exit_code",
            &[
                harness::qemu(),
                harness::busybox(),
                kiln_testkit::tool("git", "git"),
            ],
            github_job_gets_env_file_commands_conditions_and_exit_code,
        )
        .test(
            "gitlab_cache_is_saved_then_restored_locally",
            &[
                harness::qemu(),
                harness::busybox(),
                kiln_testkit::tool("git", "git"),
            ],
            gitlab_cache_is_saved_then_restored_locally,
        )
        .test(
            "github_workflow_commands_job_outputs_and_needs",
            &[
                harness::qemu(),
                harness::busybox(),
                kiln_testkit::tool("git", "git"),
            ],
            github_workflow_commands_job_outputs_and_needs,
        )
        .test(
            "gitlab_allowed_failure_passes_with_a_warning",
            &[
                harness::qemu(),
                harness::busybox(),
                kiln_testkit::tool("git", "git"),
            ],
            gitlab_allowed_failure_passes_with_a_warning,
        )
        .test(
            "list_and_bad_files_give_clear_answers",
            &[
                harness::qemu(),
                harness::busybox(),
                kiln_testkit::tool("git", "git"),
            ],
            list_and_bad_files_give_clear_answers,
        )
        .run()
}
