//! End-to-end: `kiln daemon` against a fake GitLab as strict as GitLab's
//! runner API, every job in a real VM (qemu backend; TCG where KVM cannot
//! run). VM tests assert that no QEMU process and no per-job file is left
//! behind, and that every job was run once and finalised once
//! (`FakeJob::check_consistent`). Tests without a VM check the fake's own
//! rules, registration, token checks and the daemon's reaction to a refused
//! token.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::config::Config;
use kiln::gitlab::client::{Client, Output, UpdateJob};
use kiln_tests::fake_gitlab::{FakeGitlab, FakeJob, Faults};
use kiln_tests::harness::{self, assert_no_leaks};
use serde_json::json;

const TOKEN: &str = "glrt-test-runner-token";
/// The S3 cache's bucket and secret key (`Setup::cache_s3`).
const S3_BUCKET: &str = "kiln-cache";
const S3_SECRET: &str = "moto-secret-key-0123";
const LIMIT: Duration = Duration::from_secs(420);

/// A per-test run directory, removed when the test ends.
struct RunDir(PathBuf);

impl RunDir {
    fn new(name: &str) -> RunDir {
        RunDir(harness::run_dir(name))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a test changes in the daemon's configuration.
struct Setup {
    concurrent: usize,
    shutdown_timeout: u64,
    boot_timeout: u64,
    /// Trace cap, KiB.
    output_limit: u64,
    agent: PathBuf,
    /// Jobs name the fixture by its path on the host: allowed unless a
    /// test says otherwise.
    allow_local_images: bool,
    /// `[runners.cache] Path` (default: in the shared test cache).
    cache_path: Option<PathBuf>,
    /// `[runners.cache] Type = "s3"` on this `ServerAddress` (a moto
    /// server of the test's), objects under `kiln/`.
    cache_s3: Option<String>,
}

impl Setup {
    /// The default set-up, with two jobs at a time.
    fn two_at_a_time() -> Setup {
        Setup {
            concurrent: 2,
            ..Setup::default()
        }
    }
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            concurrent: 1,
            shutdown_timeout: 30,
            boot_timeout: 120,
            output_limit: 4096,
            agent: PathBuf::new(),
            allow_local_images: true,
            cache_path: None,
            cache_s3: None,
        }
    }
}

fn config(fake: &FakeGitlab, run_dir: &Path, s: Setup) -> Config {
    harness::kernel(); // provision the default kernel into the test cache
    let agent = if s.agent.as_os_str().is_empty() {
        harness::agent()
    } else {
        s.agent
    };
    let text = format!(
        r#"
concurrent = {concurrent}
check_interval = 1
shutdown_timeout = {shutdown_timeout}
boot_timeout = {boot_timeout}
run_dir = {run_dir:?}
agent = {agent:?}
log_dir = {log_dir:?}

[[runners]]
name = "test-runner"
url = "{url}"
token = "{TOKEN}"
cpus = 1
memory = 512
disk = 2
output_limit = {output_limit}
cache_dir = {cache:?}
network = "none"
allow_local_images = {allow_local_images}
{cache_section}
"#,
        concurrent = s.concurrent,
        shutdown_timeout = s.shutdown_timeout,
        boot_timeout = s.boot_timeout,
        output_limit = s.output_limit,
        allow_local_images = s.allow_local_images,
        run_dir = run_dir.display().to_string(),
        agent = agent.display().to_string(),
        log_dir = harness::test_root().join("logs").display().to_string(),
        url = fake.url,
        cache = harness::cache_dir().display().to_string(),
        cache_section = match (&s.cache_path, &s.cache_s3) {
            (_, Some(address)) => format!(
                "[runners.cache]\nType = \"s3\"\nPath = \"kiln\"\n\
                 [runners.cache.s3]\nServerAddress = {address:?}\nAccessKey = \"AKIAKILNTEST\"\n\
                 SecretKey = {S3_SECRET:?}\nBucketName = {S3_BUCKET:?}\nInsecure = true\n"
            ),
            (Some(p), None) => format!(
                "[runners.cache]\nPath = {:?}\nMaxSize = 64\n",
                p.display().to_string()
            ),
            (None, None) => String::new(),
        },
    );
    let c: Config = toml::from_str(&text).expect("valid test config");
    c.validate().expect("valid test config");
    c
}

/// The daemon, running in this process.
struct Daemon {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Daemon {
    /// Starts the daemon on `fake`'s jobs with `s`, running them under
    /// `run_dir`.
    fn start(fake: &FakeGitlab, run_dir: &Path, s: Setup) -> Daemon {
        let config = config(fake, run_dir, s);
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            kiln::gitlab::daemon::run(config, async {
                let _ = rx.await;
            })
            .await
            .expect("the daemon runs");
        });
        Daemon { stop, task }
    }

    /// Stops the daemon cleanly and waits until it has.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

/// A fake GitLab for this runner's token, whose repository holds one file.
fn fake_gitlab() -> FakeGitlab {
    FakeGitlab::start(TOKEN, &[("README", "x\n")])
}

fn image() -> String {
    harness::busybox_image().display().to_string()
}

fn final_of(j: &FakeJob) -> (String, Option<String>, Option<i64>) {
    let f = j.last_final();
    (
        f["state"].as_str().unwrap_or("").to_string(),
        f["failure_reason"].as_str().map(str::to_string),
        f["exit_code"].as_i64(),
    )
}

/// The job was handed out once, started once (one git fetch) and
/// finalised once, with a trace whose checksum and size are what the
/// runner reported, nothing sent after a 403 and no protocol violation.
fn assert_consistent(j: &FakeJob) {
    assert_eq!(j.assigned, 1, "job {} handed out once", j.id);
    assert_eq!(j.runs, 1, "job {} started once", j.id);
    if let Err(e) = j.check_consistent() {
        panic!("{e}\ntrace:\n{}", j.trace_text());
    }
}

fn lines(n: usize) -> String {
    (0..n).map(|i| format!("line {i}\n")).collect()
}

/// Wait until no QEMU runs under `dir` and `dir` is empty: the daemon has
/// finished with every job it took (it removes a job's directory last).
async fn wait_idle(dir: &Path, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let busy = !harness::qemu_processes_under(dir).is_empty()
            || std::fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
        if !busy {
            return;
        }
        assert!(t0.elapsed() < limit, "the daemon did not finish its jobs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const LOOP: &str = "i=0; while [ $i -lt 500 ]; do echo \"line $i\"; i=$((i+1)); done";

async fn jobs_pass_fail_time_out_and_miss_images_two_at_a_time() {
    let fake = FakeGitlab::start(TOKEN, &[("README", "hello from git\n")]);
    let run_dir = RunDir::new("gitlab-main");

    // Artifacts of an earlier job this one depends on.
    let dep = tempfile::tempdir().unwrap();
    std::fs::write(dep.path().join("from-dep.txt"), "dependency data\n").unwrap();
    let zip = kiln::gitlab::artifacts::zip_files(dep.path(), &["from-dep.txt".into()]).unwrap();
    fake.add_dependency_artifacts(999, "dep-token", zip.clone());

    let mut pass = fake.job(
        &image(),
        &[
            "cat README",
            "cat from-dep.txt",
            "cat \"$CONFIG_FILE\"; echo",
            "echo \"secret is $MY_SECRET\"",
            "printf 'split hunter'; sleep 1; printf '2secret\\n'",
            LOOP,
            "mkdir -p out && echo artifact-data > out/result.txt && echo not-this > other.txt",
        ],
    );
    let vars = pass["variables"].as_array_mut().unwrap();
    vars.push(json!({"key": "MY_SECRET", "value": "hunter2secret", "masked": true}));
    vars.push(json!({"key": "CONFIG_FILE", "value": "file-content", "file": true}));
    pass["steps"].as_array_mut().unwrap().push(json!(
        {"name": "after_script", "script": ["echo after-script-ran"], "timeout": 300, "when": "always", "allow_failure": true}
    ));
    pass["artifacts"] = json!([{"name": "results", "untracked": false, "paths": ["out/"],
        "when": "on_success", "artifact_type": "archive", "artifact_format": "zip", "expire_in": "1 day"}]);
    pass["dependencies"] = json!([{"id": 999, "name": "build", "token": "dep-token",
        "artifacts_file": {"filename": "artifacts.zip", "size": zip.len()}}]);
    let pass = fake.push(pass);

    let fail = fake.push(fake.job(&image(), &["echo failing", "exit 3", "echo never"]));
    let mut slow = fake.job(&image(), &["echo sleeping", "sleep 100"]);
    slow["runner_info"]["timeout"] = json!(8);
    let slow = fake.push(slow);
    let noimg = fake.push(fake.job("/nonexistent/kiln/image", &["true"]));

    let daemon = Daemon::start(&fake, run_dir.path(), Setup::two_at_a_time());

    let j = fake.wait_done(pass, LIMIT).await;
    let t = j.trace_text();
    assert_eq!(final_of(&j), ("success".into(), None, Some(0)), "{t}");
    assert_eq!(j.status, "success");
    assert_consistent(&j);
    for want in [
        "hello from git\n",
        "dependency data\n",
        "file-content\n",
        "secret is [MASKED]\n",
        "split [MASKED]\n",
        "after-script-ran\n",
        "section_start:",
        ":step_script\r\x1b[0K",
        "section_end:",
        "\x1b[32;1m$ cat README\x1b[0;m\n",
        "Job succeeded",
    ] {
        assert!(t.contains(want), "trace lacks {want:?}:\n{t}");
    }
    assert!(
        !t.contains("hunter2secret") && !t.contains("hunter2"),
        "masked:\n{t}"
    );
    // The loop's output arrives byte for byte, right after its command line.
    let echoed = format!("\x1b[32;1m$ {LOOP}\x1b[0;m\n{}", lines(500));
    assert!(t.contains(&echoed), "the loop's output is intact:\n{t}");
    assert_eq!(j.artifacts.len(), 1, "one artifact upload:\n{t}");
    assert_eq!(j.upload_attempts, 1);
    let up = &j.artifacts[0];
    assert_eq!(up.filename, "results.zip");
    assert_eq!(up.query.get("expire_in").map(String::as_str), Some("1 day"));
    assert_eq!(
        up.query.get("artifact_type").map(String::as_str),
        Some("archive")
    );
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(up.data.clone())).unwrap();
    let names: Vec<String> = z.file_names().map(str::to_string).collect();
    assert_eq!(names, vec!["out/result.txt"]);
    let mut s = String::new();
    std::io::Read::read_to_string(&mut z.by_name("out/result.txt").unwrap(), &mut s).unwrap();
    assert_eq!(s, "artifact-data\n");

    let j = fake.wait_done(fail, LIMIT).await;
    assert_eq!(
        final_of(&j),
        ("failed".into(), Some("script_failure".into()), Some(3))
    );
    assert!(j.trace_text().contains("failing\n") && !j.trace_text().contains("never\n"));
    assert_consistent(&j);

    let j = fake.wait_done(slow, LIMIT).await;
    let (state, reason, _) = final_of(&j);
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("failed", Some("job_execution_timeout")),
        "{}",
        j.trace_text()
    );
    assert_consistent(&j);

    // GitLab does not know image_pull_failure (it is not in the job's
    // features.failure_reasons): kiln falls back as gitlab-runner does.
    let j = fake.wait_done(noimg, LIMIT).await;
    let (state, reason, _) = final_of(&j);
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("failed", Some("runner_system_failure"))
    );
    assert!(j.trace_text().contains("image"), "{}", j.trace_text());
    assert_consistent(&j);

    assert_eq!(
        fake.max_running(),
        2,
        "concurrent = 2: two jobs at once, never more"
    );
    daemon.stop().await;
    assert_no_leaks(run_dir.path());
}

/// A job that prints `tick` every second until it is canceled, with an
/// `after_script` that prints `cleanup-ran`; returned once it ticks.
async fn a_ticking_job(fake: &FakeGitlab, run_dir: &Path) -> (u64, Daemon) {
    let mut job = fake.job(&image(), &["while true; do echo tick; sleep 1; done"]);
    job["steps"].as_array_mut().unwrap().push(json!(
        {"name": "after_script", "script": ["echo cleanup-ran"], "timeout": 300, "when": "always", "allow_failure": true}
    ));
    let id = fake.push(job);
    let daemon = Daemon::start(fake, run_dir, Setup::default());
    fake.wait_for(id, LIMIT, "ticks in the trace", |j| {
        j.trace_text().contains("tick\n")
    })
    .await;
    (id, daemon)
}

/// Nothing was sent for `j` after the 403 that told of its cancel: no
/// request, no final update, and no protocol violation.
fn assert_nothing_after_the_403(j: &FakeJob) {
    assert!(
        j.requests_after_forbidden().is_empty(),
        "nothing is sent after the 403: {:?}",
        j.requests_after_forbidden()
    );
    assert!(j.finals.is_empty(), "no final update: {:?}", j.finals);
    assert!(j.violations.is_empty(), "{:?}", j.violations);
}

/// Cancels job `id` hard (the job is `canceled` on GitLab: every job
/// endpoint answers 403), waits until the daemon is done with it and stops
/// the daemon. Returns the job as the fake saw it, checked to have had one
/// request refused and nothing sent after it.
async fn hard_cancel(fake: &FakeGitlab, run_dir: &Path, id: u64, daemon: Daemon) -> FakeJob {
    fake.set_status(id, "canceled");
    wait_idle(run_dir, Duration::from_secs(120)).await;
    daemon.stop().await;
    let j = fake.get(id);
    let refused = j.requests.iter().filter(|r| r.status == 403).count();
    assert_eq!(
        refused, 1,
        "one request learnt of the cancel: {:?}",
        j.requests
    );
    assert_nothing_after_the_403(&j);
    j
}

/// `LOOP` ran twice in `j` and its output arrived intact both times.
fn assert_loop_output_twice(j: &FakeJob) {
    let block = format!("\x1b[32;1m$ {LOOP}\x1b[0;m\n{}", lines(500));
    assert_eq!(
        j.trace_text().matches(&block).count(),
        2,
        "{}",
        j.trace_text()
    );
}

async fn a_canceled_job_runs_after_script_and_is_reported_canceled() {
    let fake = fake_gitlab();
    let run_dir = RunDir::new("gitlab-cancel");
    let (id, daemon) = a_ticking_job(&fake, run_dir.path()).await;
    fake.set_status(id, "canceling");
    let j = fake.wait_done(id, Duration::from_secs(120)).await;
    assert_eq!(j.status, "canceled", "GitLab ends a canceling job canceled");
    assert_eq!(final_of(&j).0, "failed");
    assert!(
        j.trace_text().contains("cleanup-ran\n"),
        "after_script ran:\n{}",
        j.trace_text()
    );
    assert_consistent(&j);
    daemon.stop().await;
    assert_no_leaks(run_dir.path());
}

/// The `PUT {state: running}` touches the fake has seen for `j`.
fn touches(j: &FakeJob) -> usize {
    j.requests
        .iter()
        .filter(|r| r.what == "PUT running")
        .count()
}

/// The boot timeout of [`a_job_stuck_in_boot`]'s job.
const STUCK_BOOT_TIMEOUT: u64 = 120;
/// Touches [`a_job_stuck_in_boot`] waits for while the VM boots. kiln
/// touches once per update interval (the fake asks for 1 s); a kiln that
/// touched only every 30 s (gitlab-runner's pace, kiln's before the fix)
/// could send at most `STUCK_BOOT_TIMEOUT / 30` = 4 before the boot
/// timeout ends the job, so it fails this wait, whatever the load.
const TOUCHES_WHILE_BOOTING: usize = 6;

/// A job whose VM never becomes ready (busybox is its init; the boot
/// timeout is [`STUCK_BOOT_TIMEOUT`]), caught while it boots: everything
/// kiln wrote before the boot has reached the fake, QEMU runs, and kiln
/// has touched the job [`TOUCHES_WHILE_BOOTING`] times since QEMU started
/// (it asks at each update interval, not at gitlab-runner's 30 s).
async fn a_job_stuck_in_boot(fake: &FakeGitlab, run_dir: &Path) -> (u64, Daemon) {
    let id = fake.push(fake.job(&image(), &["echo should-not-run"]));
    let daemon = Daemon::start(
        fake,
        run_dir,
        Setup {
            boot_timeout: STUCK_BOOT_TIMEOUT,
            agent: kiln_tests::fixtures::busybox_path().unwrap(),
            ..Setup::default()
        },
    );
    fake.wait_for(id, LIMIT, "the trace up to the boot", |j| {
        j.trace_text().contains(":get_sources\r")
    })
    .await;
    let t0 = Instant::now();
    while harness::qemu_processes_under(run_dir).is_empty() {
        assert!(t0.elapsed() < LIMIT, "no VM started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = touches(&fake.get(id));
    let j = fake
        .wait_for(id, LIMIT, "touches while the VM boots", |j| {
            j.done() || touches(j) >= before + TOUCHES_WHILE_BOOTING
        })
        .await;
    assert!(
        !j.done(),
        "the job ended before kiln touched it {TOUCHES_WHILE_BOOTING} times while booting \
         (it touched it {} times): kiln does not ask at the update interval:\n{}",
        touches(&j) - before,
        j.trace_text()
    );
    assert!(
        !harness::qemu_processes_under(run_dir).is_empty(),
        "the VM still boots"
    );
    (id, daemon)
}

/// A cancel that arrives while the VM boots is noticed at the next update
/// interval (1 s here), not at gitlab-runner's 30 s "touch" (kiln before
/// this test: 27 s). That pace is what [`a_job_stuck_in_boot`] checks,
/// by counting touches rather than by a clock; here the cancel must end
/// the job (only it can, before the boot timeout).
async fn a_cancel_during_boot_is_noticed_at_the_update_interval() {
    let fake = fake_gitlab();
    let run_dir = RunDir::new("gitlab-boot-cancel");
    let (id, daemon) = a_job_stuck_in_boot(&fake, run_dir.path()).await;
    fake.set_status(id, "canceling");
    let j = fake.wait_done(id, Duration::from_secs(120)).await;
    // For the log only: a timed assertion would fail on a loaded host.
    eprintln!(
        "a cancel during boot was reported after {:?}",
        j.status_set_at.unwrap().elapsed()
    );
    assert_eq!(j.status, "canceled");
    let t = j.trace_text();
    assert!(
        t.contains("ERROR: Job failed: canceled"),
        "the cancel ended the job:\n{t}"
    );
    assert!(!t.contains("should-not-run\n"));
    assert_consistent(&j);
    daemon.stop().await;
    assert_no_leaks(run_dir.path());
}

/// A hard cancel during the boot is learnt from a touch answered 403:
/// the VM is killed, nothing more is sent (kiln before this test sent one
/// more trace patch).
async fn a_hard_cancel_during_boot_sends_nothing_after_the_403() {
    let fake = fake_gitlab();
    let run_dir = RunDir::new("gitlab-boot-hard-cancel");
    let (id, daemon) = a_job_stuck_in_boot(&fake, run_dir.path()).await;
    let j = hard_cancel(&fake, run_dir.path(), id, daemon).await;
    let refused = j.requests.iter().find(|r| r.status == 403).unwrap();
    assert_eq!(refused.what, "PUT running", "a touch learnt of it");
    assert_no_leaks(run_dir.path());
}

/// A hard cancel (the job is `canceled` on GitLab: every job endpoint
/// answers 403 "Job is not running"): the VM is killed and nothing more is
/// sent for the job, neither trace nor final update.
async fn a_hard_cancel_kills_the_vm_and_nothing_is_sent_after_it() {
    let fake = fake_gitlab();
    let run_dir = RunDir::new("gitlab-hard-cancel");
    let (id, daemon) = a_ticking_job(&fake, run_dir.path()).await;
    let j = hard_cancel(&fake, run_dir.path(), id, daemon).await;
    assert_eq!(j.status, "canceled");
    assert!(!j.trace_text().contains("cleanup-ran"));
    assert_no_leaks(run_dir.path());
}

async fn server_faults_lose_no_job_and_report_none_twice() {
    let fake = fake_gitlab();
    fake.set_faults(Faults {
        error_before: 0.2,
        error_after: 0.15,
        drop_every: 4,
        final_202: 2,
        final_412: true,
        fail_first_requests: 3,
        ..Faults::default()
    });
    let run_dir = RunDir::new("gitlab-faults");
    let ids: Vec<u64> = (0..2)
        .map(|_| fake.push(fake.job(&image(), &[LOOP, "sleep 2", LOOP])))
        .collect();
    let daemon = Daemon::start(&fake, run_dir.path(), Setup::two_at_a_time());
    for id in ids {
        let j = fake.wait_done(id, LIMIT).await;
        assert_eq!(final_of(&j).0, "success", "{}", j.trace_text());
        assert_consistent(&j);
        assert_loop_output_twice(&j);
    }
    // Both jobs ran although the runner's first job requests got 500s:
    // it kept asking through errors.
    assert!(
        fake.request_errors() >= 3,
        "the first job requests were refused ({} were)",
        fake.request_errors()
    );
    assert!(
        fake.requests() >= 2,
        "the runner asked again after the errors"
    );
    assert!(
        fake.drops() >= 1,
        "connections were dropped mid-acknowledgement"
    );
    daemon.stop().await;
    assert_no_leaks(run_dir.path());
}

/// GitLab hands the same job out twice (a resent answer, a retried
/// request): kiln runs it once and reports it once.
async fn a_job_handed_out_twice_runs_once() {
    let fake = fake_gitlab();
    fake.set_faults(Faults {
        duplicate_every: 1,
        ..Faults::default()
    });
    let run_dir = RunDir::new("gitlab-dup");
    let id = fake.push(fake.job(&image(), &["echo once", "sleep 2"]));
    let daemon = Daemon::start(&fake, run_dir.path(), Setup::two_at_a_time());
    let j = fake.wait_done(id, LIMIT).await;
    wait_idle(run_dir.path(), Duration::from_secs(120)).await;
    daemon.stop().await;
    let j2 = fake.get(id);
    assert_eq!(j.assigned, 2, "the fake handed the job out twice");
    assert_eq!(final_of(&j2).0, "success");
    assert_eq!(j2.runs, 1, "run once");
    if let Err(e) = j2.check_consistent() {
        panic!("{e}");
    }
    assert_eq!(j2.trace_text().matches("once\n").count(), 1);
    assert_no_leaks(run_dir.path());
}

/// The server loses the tail of a trace it acknowledged: the runner's next
/// patch gets 416 and resends from the server's `Range`.
async fn a_trace_the_server_lost_is_resent_from_its_range() {
    let fake = fake_gitlab();
    fake.set_faults(Faults {
        trace_lose_tail: true,
        ..Faults::default()
    });
    let run_dir = RunDir::new("gitlab-416");
    let id = fake.push(fake.job(&image(), &[LOOP, "sleep 3", LOOP]));
    let daemon = Daemon::start(&fake, run_dir.path(), Setup::default());
    let j = fake.wait_done(id, LIMIT).await;
    assert_eq!(final_of(&j).0, "success", "{}", j.trace_text());
    assert_consistent(&j);
    assert!(j.range_errors >= 1, "the 416 path ran");
    assert_loop_output_twice(&j);
    daemon.stop().await;
    assert_no_leaks(run_dir.path());
}

fn artifact_job(fake: &FakeGitlab) -> serde_json::Value {
    let mut job = fake.job(&image(), &["mkdir -p out && echo data > out/a.txt"]);
    job["artifacts"] = json!([{"name": "out", "paths": ["out/"], "when": "on_success",
        "artifact_type": "archive", "artifact_format": "zip"}]);
    job
}

/// Uploads answered 5xx are retried (the third attempt is stored); a 413
/// (larger than the instance allows) is not retried and fails the job as
/// the job's doing, not the runner's.
async fn artifact_uploads_are_retried_after_5xx_and_a_413_is_not() {
    let fake = fake_gitlab();
    let run_dir = RunDir::new("gitlab-upload");
    fake.set_faults(Faults {
        upload_answers: vec![500, 502],
        ..Faults::default()
    });
    let retried = fake.push(artifact_job(&fake));
    fake.set_faults(Faults {
        upload_answers: vec![413],
        ..Faults::default()
    });
    let too_large = fake.push(artifact_job(&fake));
    let daemon = Daemon::start(&fake, run_dir.path(), Setup::two_at_a_time());

    let j = fake.wait_done(retried, LIMIT).await;
    assert_eq!(final_of(&j).0, "success", "{}", j.trace_text());
    assert_eq!(j.upload_attempts, 3, "two 5xx answers, then stored");
    assert_eq!(j.artifacts.len(), 1);
    assert_consistent(&j);

    let j = fake.wait_done(too_large, LIMIT).await;
    let t = j.trace_text();
    assert_eq!(j.upload_attempts, 1, "a 413 is not retried:\n{t}");
    assert!(j.artifacts.is_empty());
    assert_eq!(
        final_of(&j),
        ("failed".into(), Some("script_failure".into()), None),
        "{t}"
    );
    assert!(
        t.contains("ERROR: Uploading artifacts failed") && t.contains("413"),
        "the trace says why:\n{t}"
    );
    assert_consistent(&j);
    daemon.stop().await;
    assert_no_leaks(run_dir.path());
}

/// Output past `output_limit` is dropped (the job goes on and says so),
/// and a trace sent in one go travels in patches of at most 1 MiB: the
/// fake asks for an update every 60 s, so everything after the first
/// patch is sent when the job ends.
async fn a_large_trace_is_capped_and_sent_in_1_mib_patches() {
    const MIB: usize = 1 << 20;
    let fake = fake_gitlab();
    fake.set_update_interval(60);
    let run_dir = RunDir::new("gitlab-cap");
    let id = fake.push(fake.job(
        &image(),
        &[
            // 3 MiB of 'x', no newline.
            "dd if=/dev/zero bs=65536 count=48 2>/dev/null | tr '\\0' x",
            "echo; echo after-the-cap",
        ],
    ));
    let daemon = Daemon::start(
        &fake,
        run_dir.path(),
        Setup {
            output_limit: 2048,
            ..Setup::default()
        },
    );
    let j = fake.wait_done(id, LIMIT).await;
    let t = j.trace_text();
    assert_eq!(final_of(&j).0, "success", "the job goes on past the cap");
    assert!(t.contains("Job's log exceeded limit of 2097152 bytes"));
    assert!(
        !t.contains("after-the-cap"),
        "output past the cap is dropped"
    );
    assert!(j.trace.len() <= 2 * MIB + 512, "{} bytes", j.trace.len());
    let sizes = j.patch_sizes();
    assert!(sizes.iter().all(|&n| n <= MIB), "{sizes:?}");
    assert!(
        sizes.iter().filter(|&&n| n == MIB).count() >= 1,
        "a full 1 MiB patch: {sizes:?}"
    );
    assert_consistent(&j);
    daemon.stop().await;
    assert_no_leaks(run_dir.path());
}

/// GitLab drops a job whose trace passes its size limit (403 to the
/// patch, the job `failed` with `trace_size_exceeded`): kiln kills the VM
/// and sends nothing more.
async fn the_server_trace_size_limit_stops_the_job() {
    let fake = fake_gitlab();
    fake.set_trace_limit(256 << 10);
    let run_dir = RunDir::new("gitlab-tracelimit");
    let id = fake.push(fake.job(
        &image(),
        &[
            "dd if=/dev/zero bs=65536 count=16 2>/dev/null | tr '\\0' x",
            "sleep 600",
        ],
    ));
    let daemon = Daemon::start(&fake, run_dir.path(), Setup::default());
    fake.wait_for(id, LIMIT, "the job dropped", |j| j.status == "failed")
        .await;
    wait_idle(run_dir.path(), Duration::from_secs(120)).await;
    daemon.stop().await;
    let j = fake.get(id);
    assert_eq!(j.failure_reason.as_deref(), Some("trace_size_exceeded"));
    assert!(j.trace.len() <= 256 << 10);
    assert_nothing_after_the_403(&j);
    assert_no_leaks(run_dir.path());
}

/// The sha256sum line of `file` in a trace.
fn sum_of(trace: &str, file: &str) -> String {
    trace
        .lines()
        .find(|l| l.ends_with(&format!("  {file}")) && !l.contains('$'))
        .unwrap_or_else(|| panic!("no checksum of {file} in:\n{trace}"))
        .to_string()
}

fn assert_in_order(trace: &str, wanted: &[&str]) {
    let mut at = 0;
    for w in wanted {
        match trace[at..].find(w) {
            Some(i) => at += i + w.len(),
            None => panic!("{w:?} missing (in order) from:\n{trace}"),
        }
    }
}

/// `cache:` against a GitLab that answers 404 to verify: job 1 pushes two
/// caches (paths, and untracked files); job 2 pulls with `policy: pull` and
/// changes the files, which must not be uploaded; job 3's changed key
/// (as a changed `key: files:` gives) misses and its fallback key hits
/// with job 1's files, byte-identical, and the untracked cache holds the
/// file job 1 made but not the tracked one it changed.
async fn a_cache_is_pushed_pulled_and_falls_back() {
    let fake = fake_gitlab();
    fake.set_verify_missing(true);
    let run_dir = RunDir::new("gitlab-cache");
    let store = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &fake,
        run_dir.path(),
        Setup {
            cache_path: Some(store.path().to_path_buf()),
            ..Setup::default()
        },
    );
    let deps = |key: &str, policy: &str, fallback: &[&str]| {
        json!({"key": key, "paths": ["vendor/"], "policy": policy, "when": "on_success",
               "untracked": false, "fallback_keys": fallback})
    };
    let untracked = |policy: &str| {
        json!({"key": "untracked-1-non_protected", "paths": [], "policy": policy,
               "when": "always", "untracked": true})
    };
    let mut j1 = fake.job(
        &image(),
        &[
            "mkdir -p vendor/sub",
            "head -c 300000 /dev/urandom > vendor/sub/data.bin",
            "echo hello > vendor/a.txt",
            "sha256sum vendor/sub/data.bin",
            "echo built > build.log",
            "echo changed-by-job > README",
        ],
    );
    j1["cache"] = json!([
        deps("deps-1-non_protected", "pull-push", &[]),
        untracked("push")
    ]);
    let id1 = fake.push(j1);
    let j = fake.wait_done(id1, LIMIT).await;
    let t1 = j.trace_text();
    assert_eq!(final_of(&j), ("success".into(), None, Some(0)), "{t1}");
    assert_consistent(&j);
    assert_in_order(
        &t1,
        &[
            "Checking cache for deps-1-non_protected...",
            "Failed to extract cache",
            "Not downloading cache untracked-1-non_protected due to policy",
            "Creating cache deps-1-non_protected...",
            "Created cache (2 files",
            "Creating cache untracked-1-non_protected...",
            "Created cache",
            "Job succeeded",
        ],
    );
    let sum = sum_of(&t1, "vendor/sub/data.bin");

    let mut j2 = fake.job(
        &image(),
        &[
            "sha256sum vendor/sub/data.bin",
            "echo overwritten > vendor/sub/data.bin",
        ],
    );
    j2["cache"] = json!([deps("deps-1-non_protected", "pull", &[])]);
    let id2 = fake.push(j2);
    let j = fake.wait_done(id2, LIMIT).await;
    let t2 = j.trace_text();
    assert_eq!(final_of(&j), ("success".into(), None, Some(0)), "{t2}");
    assert_in_order(
        &t2,
        &[
            "Checking cache for deps-1-non_protected...",
            "Successfully extracted cache (2 files",
            &sum,
            "Not uploading cache deps-1-non_protected due to policy",
        ],
    );
    assert!(!t2.contains("Creating cache"), "{t2}");

    let mut j3 = fake.job(
        &image(),
        &[
            "sha256sum vendor/sub/data.bin",
            "cat vendor/a.txt build.log README",
        ],
    );
    j3["cache"] = json!([
        deps(
            "deps-2-non_protected",
            "pull-push",
            &["deps-1-non_protected"]
        ),
        untracked("pull")
    ]);
    let id3 = fake.push(j3);
    let j = fake.wait_done(id3, LIMIT).await;
    let t3 = j.trace_text();
    assert_eq!(final_of(&j), ("success".into(), None, Some(0)), "{t3}");
    assert_consistent(&j);
    assert_in_order(
        &t3,
        &[
            "Checking cache for deps-2-non_protected...",
            "Failed to extract cache",
            "Trying fallback cache key deps-1-non_protected...",
            "Checking cache for deps-1-non_protected...",
            "Successfully extracted cache (2 files",
            "Checking cache for untracked-1-non_protected...",
            "Successfully extracted cache (3 files",
            &sum,
            "hello\nbuilt\nx\n",
            "Creating cache deps-2-non_protected...",
            "Created cache",
        ],
    );
    // Two caches of job 1, and job 3's.
    let archives = std::fs::read_dir(store.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar.gz"))
        .count();
    assert_eq!(archives, 3);
    wait_idle(run_dir.path(), Duration::from_secs(120)).await;
    daemon.stop().await;
    assert_no_leaks(run_dir.path());
}

/// `cache:` with `[runners.cache] Type = "s3"` against a real S3 server
/// (moto), in one VM: the job's first cache misses its key in the bucket
/// and restores its fallback key (an object planted by the test, as a job
/// of this runner would have pushed it: gitlab-runner's object name
/// `<Path>/runner/<short token>/project/<id>/<key>`), byte-identical;
/// `policy: pull` uploads nothing; its second cache (`policy: push`) is
/// uploaded, and holds what the job wrote.
async fn an_s3_cache_falls_back_pulls_and_pushes_through_a_real_server() {
    use sha2::Digest;
    let moto = kiln_testkit::moto::MotoServer::start();
    moto.create_bucket(S3_BUCKET);
    let object = |key: &str| format!("kiln/runner/test-runn/project/1/{key}");
    // The seed: an archive as kiln makes them.
    let d = tempfile::tempdir().unwrap();
    let seed = d.path().join("seed");
    std::fs::create_dir_all(seed.join("vendor")).unwrap();
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(seed.join("vendor/data.bin"), &data).unwrap();
    let archive = d.path().join("seed.tar.gz");
    kiln::cache::archive::pack(&seed, &[PathBuf::from("vendor/data.bin")], &archive).unwrap();
    moto.put_object(
        S3_BUCKET,
        &object("seed-1-non_protected"),
        &std::fs::read(&archive).unwrap(),
    );
    let seed_sum = format!(
        "{}  vendor/data.bin",
        hex::encode(sha2::Sha256::digest(&data))
    );

    let fake = fake_gitlab();
    let run_dir = RunDir::new("gitlab-s3-cache");
    let daemon = Daemon::start(
        &fake,
        run_dir.path(),
        Setup {
            cache_s3: Some(moto.address()),
            ..Setup::default()
        },
    );
    let mut j = fake.job(
        &image(),
        &[
            "sha256sum vendor/data.bin",
            "mkdir out",
            "head -c 200000 /dev/urandom > out/o.bin",
            "sha256sum out/o.bin",
        ],
    );
    j["cache"] = json!([
        {"key": "deps-2-non_protected", "paths": ["vendor/"], "policy": "pull",
         "when": "on_success", "untracked": false, "fallback_keys": ["seed-1-non_protected"]},
        {"key": "out-1-non_protected", "paths": ["out/"], "policy": "push",
         "when": "on_success", "untracked": false}
    ]);
    let id = fake.push(j);
    let j = fake.wait_done(id, LIMIT).await;
    let t = j.trace_text();
    assert_eq!(final_of(&j), ("success".into(), None, Some(0)), "{t}");
    assert_consistent(&j);
    assert_in_order(
        &t,
        &[
            "Checking cache for deps-2-non_protected...",
            "WARNING: no cache for deps-2-non_protected in bucket kiln-cache",
            "Failed to extract cache",
            "Trying fallback cache key seed-1-non_protected...",
            "Checking cache for seed-1-non_protected...",
            "Successfully extracted cache (1 files",
            "Not downloading cache out-1-non_protected due to policy",
            &seed_sum,
            "Not uploading cache deps-2-non_protected due to policy",
            "Creating cache out-1-non_protected...",
            "Created cache (1 files",
            "Job succeeded",
        ],
    );
    for secret in [S3_SECRET, "X-Amz-"] {
        assert!(!t.contains(secret), "{secret} in the trace:\n{t}");
    }
    wait_idle(run_dir.path(), Duration::from_secs(120)).await;
    daemon.stop().await;
    assert_no_leaks(run_dir.path());

    assert!(
        moto.object(S3_BUCKET, &object("deps-2-non_protected"))
            .is_none(),
        "policy: pull uploaded"
    );
    let pushed = moto
        .object(S3_BUCKET, &object("out-1-non_protected"))
        .expect("the pushed cache is in the bucket");
    let got = d.path().join("got.tar.gz");
    std::fs::write(&got, pushed).unwrap();
    let ws = d.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    kiln::cache::archive::unpack(&got, &ws, &d.path().join("scratch"), 1 << 30).unwrap();
    let out_sum = format!(
        "{}  out/o.bin",
        hex::encode(sha2::Sha256::digest(
            std::fs::read(ws.join("out/o.bin")).unwrap()
        ))
    );
    assert!(t.contains(&out_sum), "{out_sum} not in:\n{t}");
}

fn kiln_binary() -> PathBuf {
    harness::kiln_bin()
}

/// Environment for a `kiln` child: nothing from `$HOME`.
fn isolated(cmd: &mut Command, home: &Path) {
    cmd.env("HOME", home)
        .env("XDG_STATE_HOME", home.join("state"))
        .env("DOCKER_CONFIG", home.join("docker"))
        .env("KILN_REGISTRY_CONFIG", home.join("registry.json"));
}

fn spawn_daemon(bin: &Path, config: &Path, home: &Path) -> Child {
    let mut c = Command::new(bin);
    c.args(["--log-level", "info", "daemon", "--config"])
        .arg(config);
    isolated(&mut c, home);
    c.spawn().expect("start kiln daemon")
}

fn leftovers(run_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect()
}

async fn kill_9_mid_job_then_restart_cleans_up_and_sigterm_fails_running_jobs() {
    let fake = fake_gitlab();
    let run_dir = RunDir::new("gitlab-kill");
    let home = tempfile::tempdir().unwrap();
    let cfg = config(
        &fake,
        run_dir.path(),
        Setup {
            shutdown_timeout: 2,
            ..Setup::default()
        },
    );
    let cfg_path = home.path().join("kiln.toml");
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();
    let bin = kiln_binary();

    let id = fake.push(fake.job(&image(), &["echo started", "sleep 600"]));
    let mut child = spawn_daemon(&bin, &cfg_path, home.path());
    fake.wait_for(id, LIMIT, "the job started", |j| {
        j.trace_text().contains("started\n")
    })
    .await;
    assert!(
        !harness::qemu_processes_under(run_dir.path()).is_empty(),
        "a VM runs the job"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let t0 = Instant::now();
    while !harness::qemu_processes_under(run_dir.path()).is_empty() {
        // PDEATHSIG kills it at once; tearing down its memory on a loaded
        // host is what may take a while.
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "QEMU outlived the killed daemon"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !leftovers(run_dir.path()).is_empty(),
        "a killed daemon cannot clean up (test precondition)"
    );

    // A new daemon removes what the dead one left, then serves jobs.
    let verified = fake.verifies();
    let mut child = spawn_daemon(&bin, &cfg_path, home.path());
    let t0 = Instant::now();
    while fake.verifies() == verified {
        assert!(t0.elapsed() < LIMIT, "the daemon did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_no_leaks(run_dir.path());

    // SIGTERM: running jobs get shutdown_timeout (2 s), then are canceled
    // and reported as runner_system_failure.
    let id = fake.push(fake.job(&image(), &["echo started", "sleep 600"]));
    fake.wait_for(id, LIMIT, "the job started", |j| {
        j.trace_text().contains("started\n")
    })
    .await;
    // SAFETY: kill(2) with plain integers, on our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        st.success(),
        "the daemon exits cleanly after SIGTERM: {st:?}"
    );
    let j = fake.get(id);
    assert!(j.done(), "the job was finished before exit: {}", j.status);
    let (state, reason, _) = final_of(&j);
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("failed", Some("runner_system_failure"))
    );
    assert_consistent(&j);
    assert_no_leaks(run_dir.path());
}

// ---- Without a VM: the fake's rules, registration, refused tokens. ----

fn update(token: &str, state: &str, trace: &[u8]) -> UpdateJob {
    let output = Output {
        checksum: format!("crc32:{:08x}", crc32fast::hash(trace)),
        bytesize: trace.len() as u64,
    };
    UpdateJob {
        token: token.into(),
        state: state.into(),
        failure_reason: None,
        exit_code: None,
        checksum: output.checksum.clone(),
        output,
    }
}

/// The fake answers what GitLab answers (`runner.rb`,
/// `append_build_trace_service.rb`, `authenticate_job!`), so a runner
/// that sends what GitLab refuses is caught.
async fn the_fake_refuses_what_gitlab_refuses() {
    let fake = fake_gitlab();
    let c = Client::new(&fake.url).unwrap();
    let sid = "s_000000000000";

    // Runner tokens.
    assert_eq!(
        c.verify("wrong", sid).await.unwrap_err().status(),
        Some(403)
    );
    assert_eq!(c.verify(TOKEN, sid).await.unwrap().id, Some(42));
    let e = c.request_job("wrong", sid, None).await.unwrap_err();
    assert_eq!(e.status(), Some(403));

    // Job requests: 204 + X-GitLab-Last-Update; sending that value back
    // means "nothing changed since" (204 at once); queuing a job changes it.
    let (none, lu) = c.request_job(TOKEN, sid, None).await.unwrap();
    assert!(none.is_none());
    let lu = lu.expect("X-GitLab-Last-Update");
    let (none, lu2) = c.request_job(TOKEN, sid, Some(&lu)).await.unwrap();
    assert!(none.is_none());
    assert_eq!(lu2.as_deref(), Some(lu.as_str()), "nothing changed");
    let id = fake.push(fake.job("img", &["true"]));
    let (job, lu3) = c.request_job(TOKEN, sid, Some(&lu)).await.unwrap();
    let job = job.expect("the queued job");
    assert_eq!(job.id, id);
    assert_eq!(lu3, None, "GitLab sends no X-GitLab-Last-Update with a job");
    let tok = job.token.clone();

    // Trace patches: the start must be the stored length.
    let r = c
        .patch_trace(id, &tok, 0, b"hello ".to_vec())
        .await
        .unwrap();
    assert_eq!((r.status, r.range_end), (202, Some(6)));
    assert_eq!(r.remote.job_status.as_deref(), Some("running"));
    let r = c
        .patch_trace(id, &tok, 0, b"hello ".to_vec())
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.range_end),
        (416, Some(6)),
        "a start below the length"
    );
    let r = c.patch_trace(id, &tok, 9, b"x".to_vec()).await.unwrap();
    assert_eq!(
        (r.status, r.range_end),
        (416, Some(6)),
        "a start past the length"
    );
    let r = c.patch_trace(id, "wrong", 6, b"x".to_vec()).await.unwrap();
    assert_eq!(r.status, 403, "a wrong job token");
    let r = c
        .patch_trace(id, &tok, 6, b"world\n".to_vec())
        .await
        .unwrap();
    assert_eq!((r.status, r.range_end), (202, Some(12)));

    // Updates: a touch, a state GitLab does not know, a wrong checksum.
    let r = c
        .update_job(id, &update(&tok, "running", b""))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.remote.job_status.as_deref()),
        (200, Some("running"))
    );
    let r = c.update_job(id, &update(&tok, "done", b"")).await.unwrap();
    assert_eq!(r.status, 400);
    let r = c
        .update_job(id, &update(&tok, "success", b"hello"))
        .await
        .unwrap();
    assert_eq!(
        r.status, 412,
        "the checksum does not match the stored trace"
    );
    let r = c
        .update_job(id, &update(&tok, "success", b"hello world\n"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    // A finished job: 403 "Job is not running" with Job-Status.
    let r = c.patch_trace(id, &tok, 12, b"late".to_vec()).await.unwrap();
    assert_eq!(
        (r.status, r.remote.job_status.as_deref()),
        (403, Some("success"))
    );
    let r = c
        .update_job(id, &update(&tok, "running", b""))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.remote.job_status.as_deref()),
        (403, Some("success"))
    );
    let e = c
        .upload_artifacts(id, &tok, b"PK".to_vec(), "a.zip", "archive", "zip", None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "uploads only while the job runs");

    let j = fake.get(id);
    assert_eq!(j.status, "success");
    assert_eq!(j.trace, b"hello world\n");
    assert_eq!(j.violations, vec!["PUT with state \"done\"".to_string()]);
    assert_eq!(j.range_errors, 2);
    assert_eq!(j.requests_after_forbidden().len(), 2);
    let e = j.check_consistent().unwrap_err();
    assert!(e.contains("requests after a 403"), "{e}");
}

/// Failure reasons GitLab does not know are stored as `unknown_failure`
/// and recorded; the trace size limit drops the job with 403.
async fn the_fake_checks_failure_reasons_and_the_trace_size_limit() {
    let fake = fake_gitlab();
    let c = Client::new(&fake.url).unwrap();
    let sid = "s_000000000000";
    fake.set_trace_limit(100);
    let a = fake.push(fake.job("img", &["true"]));
    let b = fake.push(fake.job("img", &["true"]));
    let ja = c.request_job(TOKEN, sid, None).await.unwrap().0.unwrap();
    let jb = c.request_job(TOKEN, sid, None).await.unwrap().0.unwrap();
    assert_eq!((ja.id, jb.id), (a, b));

    let mut u = update(&ja.token, "failed", b"");
    u.failure_reason = Some("image_pull_failure".into());
    assert_eq!(c.update_job(a, &u).await.unwrap().status, 200);
    let j = fake.get(a);
    assert_eq!(
        (j.status.as_str(), j.failure_reason.as_deref()),
        ("failed", Some("unknown_failure"))
    );
    assert_eq!(j.violations.len(), 1, "{:?}", j.violations);

    let r = c
        .patch_trace(b, &jb.token, 0, vec![b'x'; 101])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let j = fake.get(b);
    assert_eq!(
        (j.status.as_str(), j.failure_reason.as_deref()),
        ("failed", Some("trace_size_exceeded"))
    );
    assert!(j.trace.is_empty());
}

/// With `duplicate_every`, the fake hands the same job to two requests,
/// and a runner that ran both copies is caught by `check_consistent`.
async fn the_fake_can_hand_a_job_out_twice_and_catches_a_double_run() {
    let fake = fake_gitlab();
    fake.set_faults(Faults {
        duplicate_every: 1,
        ..Faults::default()
    });
    let c = Client::new(&fake.url).unwrap();
    let sid = "s_000000000000";
    let id = fake.push(fake.job("img", &["true"]));
    let first = c.request_job(TOKEN, sid, None).await.unwrap().0.unwrap();
    let second = c.request_job(TOKEN, sid, None).await.unwrap().0.unwrap();
    assert_eq!((first.id, second.id), (id, id));
    assert!(c.request_job(TOKEN, sid, None).await.unwrap().0.is_none());
    assert_eq!(fake.get(id).assignments, vec![1, 2]);

    // A runner that runs both copies: each fetches the sources and sends
    // its own trace and final update.
    let ws = tempfile::tempdir().unwrap();
    for (n, copy) in [&first, &second].into_iter().enumerate() {
        let dir = ws.path().join(format!("copy{n}"));
        let st = Command::new("git")
            .args(["clone", "-q", &copy.git_info.repo_url])
            .arg(&dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    }
    let trace = b"ran\n".to_vec();
    assert_eq!(
        c.patch_trace(id, &first.token, 0, trace.clone())
            .await
            .unwrap()
            .status,
        202
    );
    let done = c
        .update_job(id, &update(&first.token, "success", &trace))
        .await
        .unwrap();
    assert_eq!(done.status, 200);
    let again = c
        .update_job(id, &update(&second.token, "failed", &trace))
        .await
        .unwrap();
    assert_eq!(again.status, 403);
    let j = fake.get(id);
    assert_eq!(j.runs, 2);
    let e = j.check_consistent().unwrap_err();
    assert!(e.contains("run 2 times"), "{e}");
}

/// A kernel and an agent that are files but never boot: enough for the
/// daemon to start without a VM.
fn no_vm_config(fake: &FakeGitlab, dir: &Path, token: &str) -> PathBuf {
    std::fs::write(dir.join("vmlinux"), b"not a kernel").unwrap();
    std::fs::write(dir.join("agent"), b"not an agent").unwrap();
    std::fs::create_dir_all(dir.join("run")).unwrap();
    let text = format!(
        r#"
check_interval = 1
run_dir = {run:?}
agent = {agent:?}
kernel = {kernel:?}
log_dir = {logs:?}

[[runners]]
name = "refused-runner"
url = "{url}"
token = "{token}"
backend = "qemu"
cache_dir = {cache:?}
network = "none"
"#,
        run = dir.join("run").display().to_string(),
        agent = dir.join("agent").display().to_string(),
        kernel = dir.join("vmlinux").display().to_string(),
        logs = dir.join("logs").display().to_string(),
        url = fake.url,
        cache = dir.join("cache").display().to_string(),
    );
    let p = dir.join("kiln.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A token GitLab refuses at start: `kiln daemon` says so and exits with
/// an error instead of idling.
async fn a_refused_runner_token_stops_the_daemon_loudly() {
    let fake = fake_gitlab();
    let home = tempfile::tempdir().unwrap();
    let cfg = no_vm_config(&fake, home.path(), "glrt-wrong");
    let mut c = Command::new(kiln_binary());
    c.args(["daemon", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    isolated(&mut c, home.path());
    let child = c.spawn().unwrap();
    let pid = child.id();
    let waited = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let out = match waited {
        Ok(r) => r.unwrap().unwrap(),
        Err(_) => {
            // SAFETY: kill(2) with plain integers, on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("the daemon kept running with a refused token");
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "kiln's exit code for errors:\n{err}"
    );
    assert!(
        err.contains("runner 'refused-runner': GitLab refused the runner token (403"),
        "{err}"
    );
}

/// A token that stops working while the daemon serves (runner deleted,
/// token reset): job requests get 403, verify confirms it, the daemon
/// returns the error.
async fn a_token_revoked_while_serving_stops_the_daemon() {
    let fake = fake_gitlab();
    let home = tempfile::tempdir().unwrap();
    let cfg = Config::load(&no_vm_config(&fake, home.path(), TOKEN)).unwrap();
    let daemon = tokio::spawn(kiln::gitlab::daemon::run(cfg, std::future::pending()));
    let t0 = Instant::now();
    while fake.requests() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no job request");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fake.set_runner_token("glrt-rotated");
    let r = tokio::time::timeout(Duration::from_secs(120), daemon)
        .await
        .expect("the daemon stops")
        .unwrap();
    let e = r.expect_err("a refused token is an error");
    assert!(
        matches!(
            e,
            kiln::gitlab::GitlabError::TokenRefused { status: 403, .. }
        ),
        "{e}"
    );
}

/// A GitLab that answers 404 to `POST /runners/verify` (as an independent
/// server may): the daemon still asks for jobs and serves them. A second
/// runner whose token is refused stops alone, and the first goes on; when
/// the first runner's token is refused too (401 on the job request, verify
/// still 404), the daemon stops with an error naming the runner.
async fn a_gitlab_without_verify_is_served_and_refused_runners_stop_alone() {
    let fake = fake_gitlab();
    fake.set_verify_missing(true);
    fake.set_refusal(401);
    let home = tempfile::tempdir().unwrap();
    let path = no_vm_config(&fake, home.path(), TOKEN);
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "\n[[runners]]\nname = \"wrong-token\"\nurl = \"{}\"\ntoken = \"glrt-wrong\"\n\
         backend = \"qemu\"\ncache_dir = {:?}\nnetwork = \"none\"\n",
        fake.url,
        home.path().join("cache").display().to_string()
    ));
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(&path).unwrap();
    let daemon = tokio::spawn(kiln::gitlab::daemon::run(cfg, std::future::pending()));
    // A host-path image: refused before any VM, so no VM is needed here.
    let id = fake.push(fake.job("/srv/images/absent", &["echo never"]));
    let j = fake.wait_done(id, Duration::from_secs(120)).await;
    assert_eq!(j.assigned, 1);
    assert!(
        j.trace_text().contains("is a path on the runner host"),
        "{}",
        j.trace_text()
    );
    // Each runner verifies once, first, and concurrently with the other's
    // job: the second may still be on its way when the first job is done.
    let t0 = Instant::now();
    while fake.verify_calls() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "both runners tried verify ({} calls)",
            fake.verify_calls()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fake.verifies(), 0, "verify never answered 200");
    // The wrong-token runner has stopped by now; the first one still serves.
    let id2 = fake.push(fake.job("/srv/images/absent", &["echo never"]));
    fake.wait_done(id2, Duration::from_secs(120)).await;
    assert!(!daemon.is_finished(), "one runner still serves");

    fake.set_runner_token("glrt-rotated");
    let r = tokio::time::timeout(Duration::from_secs(120), daemon)
        .await
        .expect("the daemon stops once no runner is left")
        .unwrap();
    let e = r.expect_err("a refused token is an error");
    assert!(
        matches!(
            &e,
            kiln::gitlab::GitlabError::TokenRefused { status: 401, runner, .. }
                if runner == "refused-runner" || runner == "wrong-token"
        ),
        "{e}"
    );
    assert!(e.to_string().contains("kiln gitlab verify"), "{e}");
}

/// `kiln gitlab register` writes the runner token into a file only its
/// owner can read; `kiln gitlab verify` accepts the token, and says which
/// runner fails when GitLab refuses it.
async fn register_writes_a_private_config_and_verify_checks_it() {
    use std::os::unix::fs::PermissionsExt;
    let fake = fake_gitlab();
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join("kiln.toml");
    let kiln = |args: &[&str]| {
        let mut c = Command::new(kiln_binary());
        c.args(args);
        isolated(&mut c, home.path());
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let cfg_s = cfg.display().to_string();

    let (code, _, err) = kiln(&[
        "gitlab",
        "register",
        "--config",
        &cfg_s,
        "--url",
        &fake.url,
        "--registration-token",
        "wrong",
        "--name",
        "r1",
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("403"), "{err}");
    assert!(!cfg.exists(), "nothing written for a refused registration");

    let (code, out, err) = kiln(&[
        "gitlab",
        "register",
        "--config",
        &cfg_s,
        "--url",
        &fake.url,
        "--registration-token",
        "registration-token",
        "--name",
        "r1",
        "--tag",
        "vm",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("registered runner 43 as 'r1'"), "{out}");
    let mode = std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "the runner token is readable by its owner only"
    );
    let written = Config::load(&cfg).unwrap();
    assert_eq!(written.runners.len(), 1);
    assert_eq!(written.runners[0].token, TOKEN);
    assert_eq!(written.runners[0].url, fake.url);

    let (code, out, err) = kiln(&["gitlab", "verify", "--config", &cfg_s]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("r1: valid (runner id 42)"), "{out}");

    fake.set_runner_token("glrt-rotated");
    let (code, out, _) = kiln(&["gitlab", "verify", "--config", &cfg_s]);
    assert_eq!(code, Some(1));
    assert!(out.contains("r1:") && out.contains("403"), "{out}");
}

/// A job whose `image:` is a path on the runner host (a real OCI layout)
/// is failed before any VM starts, saying why, unless the runner's
/// kiln.toml has `allow_local_images = true`; then the same job runs.
async fn a_host_path_image_is_refused_unless_the_runner_allows_local_images() {
    let fake = fake_gitlab();
    let run_dir = RunDir::new("gitlab-host-image");
    assert!(harness::busybox_image().join("oci-layout").is_file());
    let refused = fake.push(fake.job(&image(), &["echo should-not-run"]));
    let daemon = Daemon::start(
        &fake,
        run_dir.path(),
        Setup {
            allow_local_images: false,
            ..Setup::default()
        },
    );
    let j = fake.wait_done(refused, LIMIT).await;
    // The fake's jobs do not list image_pull_failure among their failure
    // reasons: the fallback, as gitlab-runner's.
    let (state, reason, _) = final_of(&j);
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("failed", Some("runner_system_failure"))
    );
    let trace = j.trace_text();
    let message = format!(
        "image '{}' is a path on the runner host; GitLab jobs may only use registry images \
         unless `allow_local_images = true` in kiln.toml",
        image()
    );
    assert!(trace.contains(&message), "{trace}");
    // Refused before the executor: no VM, no image built.
    assert!(!trace.contains("disposable VM"), "{trace}");
    assert!(harness::qemu_processes_under(run_dir.path()).is_empty());
    assert_eq!(
        (j.assigned, j.runs),
        (1, 0),
        "handed out once, no sources fetched"
    );
    if let Err(e) = j.check_consistent() {
        panic!("{e}\ntrace:\n{trace}");
    }
    daemon.stop().await;

    let allowed = fake.push(fake.job(&image(), &["echo ran-on-a-host-image"]));
    let daemon = Daemon::start(&fake, run_dir.path(), Setup::default());
    let j = fake.wait_done(allowed, LIMIT).await;
    assert_eq!(
        final_of(&j),
        ("success".into(), None, Some(0)),
        "{}",
        j.trace_text()
    );
    assert!(j.trace_text().contains("ran-on-a-host-image\n"));
    assert_consistent(&j);
    wait_idle(run_dir.path(), Duration::from_secs(120)).await;
    daemon.stop().await;
    assert_no_leaks(run_dir.path());
}

/// `services` in the job payload: started in the job's VM, reachable at
/// their alias and at `localhost`, with their variables; the start-up
/// lines in the trace, no warning.
async fn payload_services_run_in_the_jobs_vm() {
    let fake = fake_gitlab();
    let run_dir = RunDir::new("gitlab-services");
    let port = harness::SERVICE_PORT;
    let mut job = fake.job(
        &image(),
        &[
            &format!("wget -qO- http://db:{port}/"),
            &format!("wget -qO- http://localhost:{port}/"),
        ],
    );
    job["services"] = json!([{
        "name": harness::service_image().display().to_string(),
        "alias": "db",
        "entrypoint": null,
        "variables": [{"key": "GREETING", "value": "from-gitlab"}],
    }]);
    let id = fake.push(job);
    let daemon = Daemon::start(&fake, run_dir.path(), Setup::default());
    let j = fake.wait_done(id, LIMIT).await;
    let t = j.trace_text();
    assert_eq!(final_of(&j), ("success".into(), None, Some(0)), "{t}");
    let page = format!("{} GREETING=from-gitlab ", harness::SERVICE_PAGE);
    assert_eq!(t.matches(&page).count(), 2, "{t}");
    assert!(t.contains("Starting service "), "{t}");
    assert!(!t.contains("probably didn't start properly"), "{t}");
    assert_consistent(&j);
    wait_idle(run_dir.path(), Duration::from_secs(120)).await;
    daemon.stop().await;
    assert_no_leaks(run_dir.path());
}

fn main() -> std::process::ExitCode {
    kiln_testkit::Suite::new()
        .tokio(
            "payload_services_run_in_the_jobs_vm",
            &harness::vm(),
            payload_services_run_in_the_jobs_vm,
        )
        .tokio(
            "a_host_path_image_is_refused_unless_the_runner_allows_local_images",
            &harness::vm(),
            a_host_path_image_is_refused_unless_the_runner_allows_local_images,
        )
        .tokio(
            "a_cache_is_pushed_pulled_and_falls_back",
            &harness::vm(),
            a_cache_is_pushed_pulled_and_falls_back,
        )
        .tokio(
            "an_s3_cache_falls_back_pulls_and_pushes_through_a_real_server",
            &[
                harness::qemu(),
                harness::busybox(),
                kiln_testkit::moto::need(),
            ],
            an_s3_cache_falls_back_pulls_and_pushes_through_a_real_server,
        )
        .tokio(
            "jobs_pass_fail_time_out_and_miss_images_two_at_a_time",
            &harness::vm(),
            jobs_pass_fail_time_out_and_miss_images_two_at_a_time,
        )
        .tokio(
            "a_canceled_job_runs_after_script_and_is_reported_canceled",
            &harness::vm(),
            a_canceled_job_runs_after_script_and_is_reported_canceled,
        )
        .tokio(
            "a_cancel_during_boot_is_noticed_at_the_update_interval",
            &harness::vm(),
            a_cancel_during_boot_is_noticed_at_the_update_interval,
        )
        .tokio(
            "a_hard_cancel_during_boot_sends_nothing_after_the_403",
            &harness::vm(),
            a_hard_cancel_during_boot_sends_nothing_after_the_403,
        )
        .tokio(
            "a_hard_cancel_kills_the_vm_and_nothing_is_sent_after_it",
            &harness::vm(),
            a_hard_cancel_kills_the_vm_and_nothing_is_sent_after_it,
        )
        .tokio(
            "server_faults_lose_no_job_and_report_none_twice",
            &harness::vm(),
            server_faults_lose_no_job_and_report_none_twice,
        )
        .tokio(
            "a_job_handed_out_twice_runs_once",
            &harness::vm(),
            a_job_handed_out_twice_runs_once,
        )
        .tokio(
            "a_trace_the_server_lost_is_resent_from_its_range",
            &harness::vm(),
            a_trace_the_server_lost_is_resent_from_its_range,
        )
        .tokio(
            "artifact_uploads_are_retried_after_5xx_and_a_413_is_not",
            &harness::vm(),
            artifact_uploads_are_retried_after_5xx_and_a_413_is_not,
        )
        .tokio(
            "a_large_trace_is_capped_and_sent_in_1_mib_patches",
            &harness::vm(),
            a_large_trace_is_capped_and_sent_in_1_mib_patches,
        )
        .tokio(
            "the_server_trace_size_limit_stops_the_job",
            &harness::vm(),
            the_server_trace_size_limit_stops_the_job,
        )
        .tokio(
            "kill_9_mid_job_then_restart_cleans_up_and_sigterm_fails_running_jobs",
            &harness::vm(),
            kill_9_mid_job_then_restart_cleans_up_and_sigterm_fails_running_jobs,
        )
        .tokio(
            "the_fake_refuses_what_gitlab_refuses",
            &[],
            the_fake_refuses_what_gitlab_refuses,
        )
        .tokio(
            "the_fake_checks_failure_reasons_and_the_trace_size_limit",
            &[],
            the_fake_checks_failure_reasons_and_the_trace_size_limit,
        )
        .tokio(
            "the_fake_can_hand_a_job_out_twice_and_catches_a_double_run",
            &[],
            the_fake_can_hand_a_job_out_twice_and_catches_a_double_run,
        )
        .tokio(
            "a_refused_runner_token_stops_the_daemon_loudly",
            &[],
            a_refused_runner_token_stops_the_daemon_loudly,
        )
        .tokio(
            "a_token_revoked_while_serving_stops_the_daemon",
            &[],
            a_token_revoked_while_serving_stops_the_daemon,
        )
        .tokio(
            "a_gitlab_without_verify_is_served_and_refused_runners_stop_alone",
            &[],
            a_gitlab_without_verify_is_served_and_refused_runners_stop_alone,
        )
        .tokio(
            "register_writes_a_private_config_and_verify_checks_it",
            &[],
            register_writes_a_private_config_and_verify_checks_it,
        )
        .run()
}
