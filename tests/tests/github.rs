//! End-to-end: `kiln daemon` serving GitHub Actions JIT runners against a
//! fake GitHub (`kiln_tests::fake_github`), each runner in a real VM (qemu
//! backend; TCG where KVM cannot run Linux). The runner distribution is a
//! fake: a `run.sh` that checks the JIT config it was given (in
//! `ACTIONS_RUNNER_INPUT_JITCONFIG`, as GitHub's runner reads it), prints
//! its SHA-256 and the config itself (which kiln must mask), and exits.
//! The image is the busybox fixture with `USER builder` (uid 1000).
//!
//! VMs: 1 + 5 + 1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kiln::config::Config;
use kiln::github::status::Status;
use kiln_tests::fake_github::{sign, FakeGithub, FakeRunner};
use kiln_tests::fixtures::BusyboxImage;
use kiln_tests::harness::{self, assert_no_leaks};
use sha2::{Digest, Sha256};

const TOKEN: &str = "ghp_fake_test_token";
const SECRET: &str = "webhook-secret-for-tests";
const REPO: &str = "acme/app";
const LABELS: &[&str] = &["self-hosted", "linux", "kiln"];
const LIMIT: Duration = Duration::from_secs(420);

/// The fake runner: checks and prints what it got, sleeps `sleep`
/// seconds (a file next to it), exits 0.
const RUN_SH: &str = r#"#!/bin/sh
cfg="${ACTIONS_RUNNER_INPUT_JITCONFIG:-}"
if [ "$1" = "--jitconfig" ]; then cfg="$2"; fi
unset ACTIONS_RUNNER_INPUT_JITCONFIG
if [ -z "$cfg" ]; then echo "fake-runner: no JIT config" >&2; exit 1; fi
files=$(printf '%s' "$cfg" | base64 -d) || { echo "fake-runner: the JIT config is not base64" >&2; exit 1; }
for f in '".runner"' '".credentials"'; do
  case "$files" in
    *"$f"*) ;;
    *) echo "fake-runner: the JIT config holds no $f" >&2; exit 1 ;;
  esac
done
echo "fake-runner: started as uid=$(id -u)"
echo "fake-runner: jitconfig-sha256=$(printf '%s' "$cfg" | sha256sum | cut -d' ' -f1)"
echo "fake-runner: the config itself: $cfg"
sleep "$(cat ./sleep 2>/dev/null || echo 0)"
echo "fake-runner: done"
exit 0
"#;

/// A per-test directory (run dir, logs, distribution, image), removed at
/// the end.
struct Dirs {
    run: PathBuf,
    root: tempfile::TempDir,
}

impl Dirs {
    fn new(name: &str, sleep: u32) -> Dirs {
        let root = tempfile::tempdir_in(harness::test_root()).expect("a test dir");
        let dist = root.path().join("dist");
        std::fs::create_dir_all(&dist).unwrap();
        std::fs::write(dist.join("run.sh"), RUN_SH).unwrap();
        std::fs::write(dist.join("sleep"), sleep.to_string()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dist.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        BusyboxImage {
            user: "builder".into(),
            ..BusyboxImage::default()
        }
        .build(&root.path().join("image"))
        .expect("the busybox image");
        Dirs {
            run: harness::run_dir(name),
            root,
        }
    }
    fn logs(&self) -> PathBuf {
        self.root.path().join("logs")
    }
    fn dist(&self) -> PathBuf {
        self.root.path().join("dist")
    }
    fn image(&self) -> PathBuf {
        self.root.path().join("image")
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

struct Setup {
    concurrent: usize,
    capacity: usize,
    webhook: bool,
    reconcile_interval: u64,
    shutdown_timeout: u64,
}

fn config(fake: &FakeGithub, d: &Dirs, s: &Setup) -> Config {
    harness::kernel(); // the default kernel, into the test cache
    let listen = if s.webhook {
        format!("listen = \"127.0.0.1:0\"\nwebhook_secret = \"{SECRET}\"\n")
    } else {
        String::new()
    };
    let text = format!(
        r#"
concurrent = {concurrent}
shutdown_timeout = {shutdown_timeout}
boot_timeout = 120
run_dir = {run:?}
agent = {agent:?}
log_dir = {logs:?}

[[github]]
name = "gh"
api_url = "{url}"
repository = "{REPO}"
token = "{TOKEN}"
{listen}reconcile_interval = {reconcile}
capacity = {capacity}
runner_dist = {dist:?}

[[github.profiles]]
name = "small"
labels = ["self-hosted", "linux", "kiln"]
image = {image:?}
cpus = 1
memory = 512
disk = 2
network = "none"
timeout = 300
"#,
        concurrent = s.concurrent,
        shutdown_timeout = s.shutdown_timeout,
        run = d.run.display().to_string(),
        agent = harness::agent().display().to_string(),
        logs = d.logs().display().to_string(),
        url = fake.url,
        reconcile = s.reconcile_interval,
        capacity = s.capacity,
        dist = d.dist().display().to_string(),
        image = d.image().display().to_string(),
    );
    let mut c: Config = toml::from_str(&text).expect("valid test config");
    c.validate().expect("valid test config");
    c.cache_dir = Some(harness::cache_dir());
    c
}

/// The daemon, in this process.
struct Daemon {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Daemon {
    fn start(config: Config) -> Daemon {
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            kiln::daemon::run(config, async {
                let _ = rx.await;
            })
            .await
            .expect("the daemon runs");
        });
        Daemon { stop, task }
    }
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

fn read_status(run_dir: &Path) -> Option<Status> {
    kiln::github::status::read(run_dir).ok()
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < LIMIT, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn sha256(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn log_of(d: &Dirs, name: &str) -> String {
    std::fs::read_to_string(d.logs().join("github/gh").join(format!("{name}.log")))
        .unwrap_or_default()
}

/// The runner's VM ran the fake runner with exactly its JIT config, as
/// the image's unprivileged user, and its log shows the config masked.
fn assert_ran_with_its_config(d: &Dirs, r: &FakeRunner) {
    let log = log_of(d, &r.name);
    assert!(
        log.contains(&format!(
            "jitconfig-sha256={}",
            sha256(&r.encoded_jit_config)
        )),
        "runner {} got its JIT config:\n{log}",
        r.name
    );
    assert!(log.contains("started as uid=1000"), "{log}");
    assert!(log.contains("the config itself: [MASKED]"), "{log}");
    assert!(log.contains("fake-runner: done"), "{log}");
}

/// Files under `dir` (recursively) that contain `needle`; files larger
/// than 64 MiB (sparse VM disks) are skipped while a VM runs.
fn files_containing(dir: &Path, needle: &str, skip_large: bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() && !(skip_large && m.len() > 64 << 20) {
                if let Ok(b) = std::fs::read(&p) {
                    if b.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                        found.push(p);
                    }
                }
            }
        }
    }
    found
}

/// Processes whose argument list holds `needle`.
fn processes_with_argument(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if cmd.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                found.push(e.file_name().to_string_lossy().to_string());
            }
        }
    }
    found
}

fn assert_secret_nowhere(d: &Dirs, jit: &str, vm_running: bool) {
    for dir in [
        d.run.clone(),
        d.logs(),
        harness::cache_dir().join("github-runner"),
    ] {
        let f = files_containing(&dir, jit, vm_running);
        assert!(f.is_empty(), "the JIT config is in host files: {f:?}");
    }
    let p = processes_with_argument(jit);
    assert!(p.is_empty(), "the JIT config is in the argv of pids {p:?}");
}

async fn a_queued_webhook_starts_one_runner_vm_with_its_jit_config() {
    let fake = FakeGithub::start(REPO, TOKEN);
    let d = Dirs::new("github-webhook", 3);
    let cfg = config(
        &fake,
        &d,
        &Setup {
            concurrent: 2,
            capacity: 2,
            webhook: true,
            // Only the first listing (before any job) runs: webhooks alone
            // drive this test.
            reconcile_interval: 3600,
            shutdown_timeout: 30,
        },
    );
    let daemon = Daemon::start(cfg);
    // The first listing must be over before the job is queued, or it finds
    // the job and starts a runner without any webhook (a loaded host may
    // run it after the endpoint is up).
    let addr = wait_for("the webhook endpoint and the first listing", || {
        read_status(&d.run)
            .filter(|s| s.entries[0].counters.reconciles >= 1)
            .and_then(|s| s.entries[0].webhook.clone())
    })
    .await;
    fake.set_webhook(&format!("http://{addr}/github"), SECRET);

    let (job, _) = fake.queue(LABELS, false).await;
    let body = fake.event_body("queued", job);
    // Forged deliveries start nothing.
    assert_eq!(
        fake.post_raw(&body, &format!("sha256={}", "0".repeat(64)), "d-1")
            .await,
        401
    );
    assert_eq!(
        fake.post_raw(&body, &sign("another secret", &body), "d-2")
            .await,
        401
    );
    assert_eq!(fake.post_raw(&body, "", "d-3").await, 401);
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    assert_eq!(
        fake.post_raw(&tampered, &sign(SECRET, &body), "d-4").await,
        401
    );
    // Labels no profile has start nothing either.
    let (gpu, status) = fake.queue(&["self-hosted", "gpu"], true).await;
    assert_eq!(status, 202, "a job for no profile is not accepted");
    // The status file is rewritten every 250 ms: wait until it has counted
    // the forged deliveries (it must count exactly 4, checked below).
    let st = wait_for("the status counts the forged deliveries", || {
        read_status(&d.run).filter(|s| s.entries[0].counters.bad_signatures >= 4)
    })
    .await;
    assert_eq!(st.entries[0].counters.bad_signatures, 4);
    assert!(st.entries[0].queued.is_empty());
    assert!(fake.runners().is_empty(), "nothing registered");
    assert!(harness::qemu_processes_under(&d.run).is_empty(), "no VM");

    // The real one, delivered twice (GitHub redelivers): one runner.
    let sig = sign(SECRET, &body);
    assert_eq!(fake.post_raw(&body, &sig, "d-5").await, 200);
    assert_eq!(fake.post_raw(&body, &sig, "d-5").await, 200);
    let runner = wait_for("a runner took the job", || {
        fake.runners().into_iter().find(|r| r.job == Some(job))
    })
    .await;
    // While its VM runs: the runner shows as running, and its JIT config
    // is on no command line and in no file of kiln's.
    wait_for("the runner runs", || {
        log_of(&d, &runner.name)
            .contains("fake-runner: started")
            .then_some(())
    })
    .await;
    assert_eq!(harness::qemu_processes_under(&d.run).len(), 1, "one VM");
    let st = wait_for("the status shows the runner running", || {
        read_status(&d.run).filter(|s| s.entries[0].runners.iter().any(|r| r.state == "running"))
    })
    .await;
    let rs = &st.entries[0].runners;
    assert_eq!(rs.len(), 1, "{rs:?}");
    assert_eq!((rs[0].state.as_str(), rs[0].job), ("running", Some(job)));
    assert_eq!(rs[0].id, Some(runner.id));
    assert_secret_nowhere(&d, &runner.encoded_jit_config, true);

    // The runner exits: VM gone, record removed, job completed.
    wait_for("the runner's record is removed", || {
        (fake.live_runners() == 0).then_some(())
    })
    .await;
    wait_for("the VM is gone", || {
        harness::qemu_processes_under(&d.run)
            .is_empty()
            .then_some(())
    })
    .await;
    let runners = fake.runners();
    assert_eq!(runners.len(), 1, "one JIT config: {runners:?}");
    assert!(runners[0].deleted);
    assert_eq!(runners[0].labels, LABELS);
    assert_eq!(runners[0].group, 1);
    assert_ran_with_its_config(&d, &runners[0]);
    let jobs = fake.jobs();
    let j = jobs.iter().find(|j| j.id == job).unwrap();
    assert_eq!(j.status, "completed");
    let g = jobs.iter().find(|j| j.id == gpu).unwrap();
    assert_eq!(g.status, "queued", "nobody served the gpu job");
    assert_secret_nowhere(&d, &runners[0].encoded_jit_config, false);
    let st = wait_for("the status settles", || {
        read_status(&d.run).filter(|s| s.entries[0].runners.is_empty())
    })
    .await;
    assert_eq!(st.entries[0].counters.jit_configs, 1);
    assert_eq!(st.entries[0].counters.vms_finished, 1);
    daemon.stop().await;
    assert_no_leaks(&d.run);
}

async fn five_queued_jobs_two_at_a_time_through_the_reconciler_and_api_faults() {
    let fake = FakeGithub::start(REPO, TOKEN);
    let d = Dirs::new("github-five", 0);
    // No webhook at all: every job is missed and found by listing.
    let cfg = config(
        &fake,
        &d,
        &Setup {
            concurrent: 3,
            capacity: 2,
            webhook: false,
            reconcile_interval: 1,
            shutdown_timeout: 30,
        },
    );
    let mut jobs = Vec::new();
    for _ in 0..5 {
        jobs.push(fake.queue(LABELS, false).await.0);
    }
    // Errors and rate limits on the way: none may start a second VM.
    fake.fail_next("generate-jitconfig", 500, None);
    fake.fail_next("generate-jitconfig", 429, Some(1));
    fake.fail_next("/actions/runs", 502, None);
    fake.fail_next("generate-jitconfig", 403, Some(1));
    let daemon = Daemon::start(cfg);
    let mut most_vms = 0;
    let t0 = Instant::now();
    loop {
        most_vms = most_vms.max(harness::qemu_processes_under(&d.run).len());
        let done = fake.jobs().iter().all(|j| j.status == "completed") && fake.live_runners() == 0;
        if done {
            break;
        }
        assert!(
            t0.elapsed() < LIMIT,
            "the jobs were not all served: {:?}",
            fake.jobs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fake.faults_left(), 0, "every injected fault was met");
    assert!(most_vms <= 2, "{most_vms} VMs at once");
    assert!(
        fake.max_live_runners() <= 2,
        "{} runners at once",
        fake.max_live_runners()
    );
    let runners = fake.runners();
    assert_eq!(
        runners.len(),
        5,
        "one runner per job, no duplicate: {runners:?}"
    );
    for r in &runners {
        assert!(r.deleted, "{} removed", r.name);
        assert!(r.job.is_some(), "{} took a job", r.name);
        assert_ran_with_its_config(&d, r);
    }
    let mut taken: Vec<_> = runners.iter().filter_map(|r| r.job).collect();
    taken.sort();
    assert_eq!(taken, jobs, "every job once");
    let limited = fake
        .requests()
        .iter()
        .filter(|r| r.status == 429 || r.status == 403)
        .count();
    assert_eq!(limited, 2);
    // The status file lags up to 250 ms behind: wait until it shows every
    // VM finished, then check its counters.
    let st = wait_for("the status shows the five VMs finished", || {
        read_status(&d.run)
            .filter(|s| s.entries[0].counters.vms_finished >= 5 && s.entries[0].runners.is_empty())
    })
    .await;
    assert!(st.entries[0].counters.api_errors >= 4);
    assert_eq!(st.entries[0].counters.jit_configs, 5);
    daemon.stop().await;
    assert_no_leaks(&d.run);
}

fn spawn_daemon(config: &Path, home: &Path) -> Child {
    Command::new(harness::kiln_bin())
        .args(["--log-level", "info", "daemon", "--config"])
        .arg(config)
        .env("HOME", home)
        .env("XDG_STATE_HOME", home.join("state"))
        .env("KILN_CACHE_DIR", harness::cache_dir())
        .spawn()
        .expect("start kiln daemon")
}

async fn sigterm_mid_job_destroys_the_vm_and_removes_the_runner() {
    let fake = FakeGithub::start(REPO, TOKEN);
    let d = Dirs::new("github-sigterm", 600);
    let cfg = config(
        &fake,
        &d,
        &Setup {
            concurrent: 1,
            capacity: 1,
            webhook: false,
            reconcile_interval: 1,
            shutdown_timeout: 1,
        },
    );
    let cfg_path = d.root.path().join("kiln.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();
    let home = d.root.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let (job, _) = fake.queue(LABELS, false).await;
    let mut child = spawn_daemon(&cfg_path, &home);
    let runner = wait_for("a runner took the job", || {
        fake.runners().into_iter().find(|r| r.job == Some(job))
    })
    .await;
    wait_for("the runner runs", || {
        log_of(&d, &runner.name)
            .contains("fake-runner: started")
            .then_some(())
    })
    .await;
    assert_eq!(harness::qemu_processes_under(&d.run).len(), 1);
    assert_secret_nowhere(&d, &runner.encoded_jit_config, true);
    // The daemon rewrites its status file every 250 ms: wait until it
    // shows the runner running before asking the CLI.
    wait_for("the status shows the runner running", || {
        read_status(&d.run)
            .filter(|s| s.entries[0].runners.iter().any(|r| r.state == "running"))
            .map(|_| ())
    })
    .await;
    // `kiln github status --json` shows it.
    let out = Command::new(harness::kiln_bin())
        .args(["github", "status", "--json", "--config"])
        .arg(&cfg_path)
        .env("HOME", &home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: Status = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st.entries[0].runners[0].name, runner.name);
    assert_eq!(st.entries[0].runners[0].state, "running");
    let human = Command::new(harness::kiln_bin())
        .args(["github", "status", "--config"])
        .arg(&cfg_path)
        .env("HOME", &home)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("running 1"), "{text}");
    assert!(text.contains(&runner.name), "{text}");

    // SIGTERM: the busy runner gets shutdown_timeout (1 s), then its VM is
    // destroyed and its record removed; the daemon exits cleanly.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the daemon did not stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.success(),
        "the daemon exits cleanly after SIGTERM: {status:?}"
    );
    assert!(
        harness::qemu_processes_under(&d.run).is_empty(),
        "VM destroyed"
    );
    let r = fake.runners();
    assert_eq!(r.len(), 1);
    assert!(r[0].deleted, "runner record removed");
    assert!(
        !log_of(&d, &runner.name).contains("fake-runner: done"),
        "stopped mid-job"
    );
    assert_secret_nowhere(&d, &runner.encoded_jit_config, false);
    let out = Command::new(harness::kiln_bin())
        .args(["github", "status", "--config"])
        .arg(&cfg_path)
        .env("HOME", &home)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "no daemon, no status");
    assert_no_leaks(&d.run);
}

async fn the_fake_refuses_what_github_refuses() {
    let fake = FakeGithub::start(REPO, TOKEN);
    let c = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", fake.url);
    let gen = url(&format!("/repos/{REPO}/actions/runners/generate-jitconfig"));
    let r = c
        .post(&gen)
        .json(&serde_json::json!({"name": "a", "runner_group_id": 1, "labels": ["x"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no token");
    let auth = format!("Bearer {TOKEN}");
    let post = |body: serde_json::Value| {
        c.post(&gen)
            .header("authorization", &auth)
            .json(&body)
            .send()
    };
    assert_eq!(
        post(serde_json::json!({"name": "a", "labels": ["x"]}))
            .await
            .unwrap()
            .status(),
        422
    );
    assert_eq!(
        post(serde_json::json!({"name": "a", "runner_group_id": 1, "labels": []}))
            .await
            .unwrap()
            .status(),
        422
    );
    assert_eq!(
        post(serde_json::json!({"name": "a", "runner_group_id": 1, "labels": ["x"]}))
            .await
            .unwrap()
            .status(),
        201
    );
    assert_eq!(
        post(serde_json::json!({"name": "a", "runner_group_id": 1, "labels": ["x"]}))
            .await
            .unwrap()
            .status(),
        409
    );
    fake.fail_next("generate-jitconfig", 429, Some(7));
    let r = post(serde_json::json!({"name": "b", "runner_group_id": 1, "labels": ["x"]}))
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    let id = fake.runners()[0].id;
    let del = url(&format!("/repos/{REPO}/actions/runners/{id}"));
    assert_eq!(
        c.delete(&del)
            .header("authorization", &auth)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        c.delete(&del)
            .header("authorization", &auth)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

fn main() -> std::process::ExitCode {
    kiln_testkit::Suite::new()
        .tokio(
            "a_queued_webhook_starts_one_runner_vm_with_its_jit_config",
            &harness::vm(),
            a_queued_webhook_starts_one_runner_vm_with_its_jit_config,
        )
        .tokio(
            "five_queued_jobs_two_at_a_time_through_the_reconciler_and_api_faults",
            &harness::vm(),
            five_queued_jobs_two_at_a_time_through_the_reconciler_and_api_faults,
        )
        .tokio(
            "sigterm_mid_job_destroys_the_vm_and_removes_the_runner",
            &harness::vm(),
            sigterm_mid_job_destroys_the_vm_and_removes_the_runner,
        )
        .tokio(
            "the_fake_refuses_what_github_refuses",
            &[],
            the_fake_refuses_what_github_refuses,
        )
        .run()
}
