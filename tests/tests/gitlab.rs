//! End-to-end: `kiln daemon` against a fake GitLab, every job in a real VM
//! (qemu backend; TCG where KVM cannot run). Each test asserts that no QEMU
//! process and no per-job file is left behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kiln::config::Config;
use kiln_tests::fake_gitlab::{FakeGitlab, FakeJob, Faults};
use kiln_tests::harness::{self, assert_no_leaks};
use serde_json::json;

const TOKEN: &str = "glrt-test-runner-token";
const LIMIT: Duration = Duration::from_secs(420);

fn config(fake: &FakeGitlab, run_dir: &Path, concurrent: usize, shutdown_timeout: u64) -> Config {
    harness::kernel(); // provision the default kernel into the test cache
    let text = format!(
        r#"
concurrent = {concurrent}
check_interval = 1
shutdown_timeout = {shutdown_timeout}
boot_timeout = 120
run_dir = {run_dir:?}
agent = {agent:?}

[[runners]]
name = "test-runner"
url = "{url}"
token = "{TOKEN}"
cpus = 1
memory = 512
disk = 2
cache_dir = {cache:?}
"#,
        run_dir = run_dir.display().to_string(),
        agent = harness::agent().display().to_string(),
        url = fake.url,
        cache = harness::cache_dir().display().to_string(),
    );
    let c: Config = toml::from_str(&text).expect("valid test config");
    c.validate().expect("valid test config");
    c
}

/// The daemon in this process; stopped (cleanly) by the returned sender.
fn start_daemon(
    config: Config,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let h = tokio::spawn(async move {
        kiln::gitlab::daemon::run(config, async {
            let _ = rx.await;
        })
        .await
        .expect("the daemon runs");
    });
    (tx, h)
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

/// Every job was handed out once, finished once, with a trace whose
/// checksum and size are what the runner reported.
fn assert_consistent(j: &FakeJob) {
    assert_eq!(j.assigned, 1, "job {} assigned once", j.id);
    assert_eq!(
        j.finals.len(),
        1,
        "job {} has one accepted final update",
        j.id
    );
    let f = j.last_final();
    assert_eq!(
        f["output"]["checksum"].as_str().unwrap(),
        format!("crc32:{:08x}", crc32fast::hash(&j.trace))
    );
    assert_eq!(
        f["output"]["bytesize"].as_u64().unwrap(),
        j.trace.len() as u64
    );
    assert!(
        !j.trace_text().contains(&j.token),
        "the job token never reaches the trace"
    );
}

fn lines(n: usize) -> String {
    (0..n).map(|i| format!("line {i}\n")).collect()
}

const LOOP: &str = "i=0; while [ $i -lt 500 ]; do echo \"line $i\"; i=$((i+1)); done";

async fn jobs_pass_fail_time_out_and_miss_images_two_at_a_time() {
    let fake = FakeGitlab::start(TOKEN, &[("README", "hello from git\n")]).await;
    let run_dir = harness::run_dir("gitlab-main");

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

    let (stop, daemon) = start_daemon(config(&fake, &run_dir, 2, 30));

    let j = fake.wait_done(pass, LIMIT).await;
    let t = j.trace_text();
    assert_eq!(final_of(&j), ("success".into(), None, Some(0)), "{t}");
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

    let j = fake.wait_done(noimg, LIMIT).await;
    let (state, reason, _) = final_of(&j);
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("failed", Some("image_pull_failure"))
    );
    assert_consistent(&j);

    assert_eq!(
        fake.max_running(),
        2,
        "concurrent = 2: two jobs at once, never more"
    );
    let _ = stop.send(());
    daemon.await.unwrap();
    assert_no_leaks(&run_dir);
}

async fn a_canceled_job_runs_after_script_and_is_reported_canceled() {
    let fake = FakeGitlab::start(TOKEN, &[("README", "x\n")]).await;
    let run_dir = harness::run_dir("gitlab-cancel");
    let mut job = fake.job(&image(), &["while true; do echo tick; sleep 1; done"]);
    job["steps"].as_array_mut().unwrap().push(json!(
        {"name": "after_script", "script": ["echo cleanup-ran"], "timeout": 300, "when": "always", "allow_failure": true}
    ));
    let id = fake.push(job);
    let (stop, daemon) = start_daemon(config(&fake, &run_dir, 1, 30));
    fake.wait_for(id, LIMIT, "ticks in the trace", |j| {
        j.trace_text().contains("tick\n")
    })
    .await;
    fake.set_status(id, "canceling");
    let j = fake.wait_done(id, Duration::from_secs(120)).await;
    let (state, reason, _) = final_of(&j);
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("failed", Some("job_canceled"))
    );
    assert!(
        j.trace_text().contains("cleanup-ran\n"),
        "after_script ran:\n{}",
        j.trace_text()
    );
    assert_consistent(&j);
    let _ = stop.send(());
    daemon.await.unwrap();
    assert_no_leaks(&run_dir);
}

async fn server_faults_lose_no_job_and_report_none_twice() {
    let fake = FakeGitlab::start(TOKEN, &[("README", "x\n")]).await;
    fake.set_faults(Faults {
        error_before: 0.2,
        error_after: 0.15,
        drop_every: 4,
        final_202: 2,
        final_412: true,
        trace_lose_tail: false,
    });
    let run_dir = harness::run_dir("gitlab-faults");
    let ids: Vec<u64> = (0..2)
        .map(|_| fake.push(fake.job(&image(), &[LOOP, "sleep 2", LOOP])))
        .collect();
    let (stop, daemon) = start_daemon(config(&fake, &run_dir, 2, 30));
    for id in ids {
        let j = fake.wait_done(id, LIMIT).await;
        assert_eq!(final_of(&j).0, "success", "{}", j.trace_text());
        assert_consistent(&j);
        let block = format!("\x1b[32;1m$ {LOOP}\x1b[0;m\n{}", lines(500));
        assert_eq!(
            j.trace_text().matches(&block).count(),
            2,
            "{}",
            j.trace_text()
        );
    }
    assert!(fake.requests() > 2, "the runner kept asking through errors");
    assert!(
        fake.drops() >= 1,
        "connections were dropped mid-acknowledgement"
    );
    let _ = stop.send(());
    daemon.await.unwrap();
    assert_no_leaks(&run_dir);
}

/// The server loses the tail of a trace it acknowledged: the runner's next
/// patch gets 416 and resends from the server's `Range`.
async fn a_trace_the_server_lost_is_resent_from_its_range() {
    let fake = FakeGitlab::start(TOKEN, &[("README", "x\n")]).await;
    fake.set_faults(Faults {
        trace_lose_tail: true,
        ..Faults::default()
    });
    let run_dir = harness::run_dir("gitlab-416");
    let id = fake.push(fake.job(&image(), &[LOOP, "sleep 3", LOOP]));
    let (stop, daemon) = start_daemon(config(&fake, &run_dir, 1, 30));
    let j = fake.wait_done(id, LIMIT).await;
    assert_eq!(final_of(&j).0, "success", "{}", j.trace_text());
    assert_consistent(&j);
    assert!(j.range_errors >= 1, "the 416 path ran");
    let block = format!("\x1b[32;1m$ {LOOP}\x1b[0;m\n{}", lines(500));
    assert_eq!(
        j.trace_text().matches(&block).count(),
        2,
        "{}",
        j.trace_text()
    );
    let _ = stop.send(());
    daemon.await.unwrap();
    assert_no_leaks(&run_dir);
}

fn kiln_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "-q", "-p", "kiln", "--bin", "kiln"])
        .current_dir(root)
        .status()
        .expect("run cargo build -p kiln");
    assert!(st.success(), "building kiln failed");
    // target/debug/deps/gitlab-* -> target/debug/kiln
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("kiln");
    assert!(bin.exists(), "{} not found", bin.display());
    bin
}

fn spawn_daemon(bin: &Path, config: &Path) -> Child {
    Command::new(bin)
        .args(["--log-level", "info", "daemon", "--config"])
        .arg(config)
        .spawn()
        .expect("start kiln daemon")
}

fn leftovers(run_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect()
}

async fn kill_9_mid_job_then_restart_cleans_up_and_sigterm_fails_running_jobs() {
    let fake = FakeGitlab::start(TOKEN, &[("README", "x\n")]).await;
    let run_dir = harness::run_dir("gitlab-kill");
    let cfg = config(&fake, &run_dir, 1, 2);
    let cfg_path = run_dir
        .parent()
        .unwrap()
        .join(format!("gitlab-kill-{}.toml", std::process::id()));
    std::fs::write(&cfg_path, toml::to_string(&cfg).unwrap()).unwrap();
    let bin = kiln_binary();

    let id = fake.push(fake.job(&image(), &["echo started", "sleep 600"]));
    let mut child = spawn_daemon(&bin, &cfg_path);
    fake.wait_for(id, LIMIT, "the job started", |j| {
        j.trace_text().contains("started\n")
    })
    .await;
    assert!(
        !harness::qemu_processes_under(&run_dir).is_empty(),
        "a VM runs the job"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let t0 = Instant::now();
    while !harness::qemu_processes_under(&run_dir).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "QEMU outlived the killed daemon"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !leftovers(&run_dir).is_empty(),
        "a killed daemon cannot clean up (test precondition)"
    );

    // A new daemon removes what the dead one left, then serves jobs.
    let verified = fake.verifies();
    let mut child = spawn_daemon(&bin, &cfg_path);
    let t0 = Instant::now();
    while fake.verifies() == verified {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the daemon did not start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_no_leaks(&run_dir);

    // SIGTERM: running jobs get shutdown_timeout (2 s), then are canceled
    // and reported as runner_system_failure.
    let id = fake.push(fake.job(&image(), &["echo started", "sleep 600"]));
    fake.wait_for(id, LIMIT, "the job started", |j| {
        j.trace_text().contains("started\n")
    })
    .await;
    // SAFETY: kill(2) with plain integers, on our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
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
    assert_no_leaks(&run_dir);
    let _ = std::fs::remove_file(&cfg_path);
}

fn main() -> std::process::ExitCode {
    kiln_testkit::Suite::new()
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
            "server_faults_lose_no_job_and_report_none_twice",
            &harness::vm(),
            server_faults_lose_no_job_and_report_none_twice,
        )
        .tokio(
            "a_trace_the_server_lost_is_resent_from_its_range",
            &harness::vm(),
            a_trace_the_server_lost_is_resent_from_its_range,
        )
        .tokio(
            "kill_9_mid_job_then_restart_cleans_up_and_sigterm_fails_running_jobs",
            &harness::vm(),
            kill_9_mid_job_then_restart_cleans_up_and_sigterm_fails_running_jobs,
        )
        .run()
}
