//! End-to-end: jobs in real VMs (qemu backend; TCG where KVM cannot run
//! unmodified guests). Every test asserts that no QEMU process and no per-VM
//! file is left behind.

use std::time::{Duration, Instant};

use kiln::executor::FailureReason;
use kiln::joblog::BufferSink;
use kiln_agent::proto::Stream;
use kiln_pipelines::{JobSpec, Shell, Step, StepWhen, Variable};
use kiln_tests::fixtures::BusyboxImage;
use kiln_tests::harness::{self, assert_no_leaks, CancelAtFirstOutput};

fn job(script: &str) -> JobSpec {
    harness::busybox_job("test", script)
}

async fn run(name: &str, job: &JobSpec) -> (kiln::JobResult, BufferSink) {
    let dir = harness::run_dir(name);
    let ex = harness::executor(&dir);
    let (_tx, rx) = tokio::sync::watch::channel(None);
    let mut sink = BufferSink::default();
    let result = ex.run(job, &mut sink, rx).await;
    assert_no_leaks(&dir);
    (result, sink)
}

async fn stdout_and_stderr_arrive_intact_and_in_order() {
    let (r, sink) = run(
        "order",
        &job("i=0; while [ $i -lt 3000 ]; do echo \"out $i\"; echo \"err $i\" >&2; i=$((i+1)); done; uname -r; cat /etc/os-release"),
    )
    .await;
    harness::assert_success(&r, &sink);
    let out = String::from_utf8(sink.stdout).unwrap();
    let err = String::from_utf8(sink.stderr).unwrap();
    let out_lines: Vec<&str> = out.lines().collect();
    let err_lines: Vec<&str> = err.lines().collect();
    for i in 0..3000 {
        assert_eq!(out_lines[i], format!("out {i}"));
        assert_eq!(err_lines[i], format!("err {i}"));
    }
    assert_eq!(err_lines.len(), 3000, "stderr has only the job's lines");
    assert!(
        out.contains("cloud-amd64") || out.contains('.'),
        "uname -r from inside the VM: {out}"
    );
    assert!(
        out.contains("kiln busybox fixture"),
        "the image's /etc/os-release: {out}"
    );
}

async fn ten_mib_of_binary_output_arrives_byte_for_byte() {
    let (r, sink) = run(
        "binary",
        &job("head -c 10485760 /dev/urandom > /tmp/blob\ncat /tmp/blob\nsha256sum /tmp/blob >&2\nprintf '\\000\\001\\377' >&2"),
    )
    .await;
    harness::assert_success(&r, &sink);
    assert_eq!(sink.stdout.len(), 10 << 20);
    use sha2::Digest;
    let ours = hex::encode(sha2::Sha256::digest(&sink.stdout));
    let theirs = String::from_utf8_lossy(&sink.stderr[..64]).to_string();
    assert_eq!(ours, theirs, "hash of what arrived vs what the guest sent");
    assert!(
        sink.stderr.ends_with(&[0, 1, 0xff]),
        "binary bytes on stderr"
    );
    // Chunks of one stream concatenate in order (no reordering in transit).
    let rebuilt: Vec<u8> = sink
        .chunks
        .iter()
        .filter(|c| c.1 == Stream::Stdout)
        .flat_map(|c| c.2.clone())
        .collect();
    assert_eq!(rebuilt, sink.stdout);
}

async fn exit_codes_0_1_and_137_pass_through() {
    let mut j = job("exit 0");
    for (name, script) in [("one", "exit 1"), ("killed", "kill -9 $$")] {
        let mut s = Step::script(name, script);
        s.when = StepWhen::Always;
        s.allow_failure = true;
        j.steps.push(s);
    }
    let mut last = Step::script("fails", "echo about to fail; exit 1");
    last.when = StepWhen::Always;
    j.steps.push(last);
    let (r, sink) = run("exit-codes", &j).await;
    let codes: Vec<i32> = r.steps.iter().map(|s| s.exit_code).collect();
    assert_eq!(codes, vec![0, 1, 137, 1], "{r:?}");
    assert_eq!(r.failure, Some(FailureReason::ScriptFailure));
    assert_eq!(
        r.exit_code, 1,
        "allowed failures do not set the job's code; the last step does"
    );
    assert_eq!(String::from_utf8_lossy(&sink.stdout), "about to fail\n");
}

async fn a_step_timeout_ends_the_step_and_is_reported() {
    let mut j = job("echo started; sleep 600");
    j.steps[0].timeout = Some(Duration::from_secs(2));
    let mut after = Step::script("after", "echo after ran");
    after.when = StepWhen::Always;
    j.steps.push(after);
    let mut never = Step::script("never", "echo must not run");
    never.when = StepWhen::OnSuccess;
    j.steps.push(never);
    let (r, sink) = run("step-timeout", &j).await;
    assert_eq!(r.failure, Some(FailureReason::JobExecutionTimeout), "{r:?}");
    // The sleep was cut short by the step's timeout, not by the job's (300
    // s, which kills the VM: no step would be marked timed out and the
    // always-step would not run). No clock needed.
    assert!(r.steps[0].timed_out);
    assert_eq!(r.steps[0].exit_code, 137);
    assert!(r.steps[2].skipped);
    assert_eq!(
        String::from_utf8_lossy(&sink.stdout),
        "started\nafter ran\n"
    );
}

async fn a_job_timeout_kills_the_vm() {
    // The executor's default job timeout (300 s) is shorter than the
    // sleep: had the job's own 3 s been ignored, the default would end it
    // with the same failure. Above the sleep, only the job's timeout can
    // (a kiln that ignored it would see the job succeed after 600 s), so
    // no clock is needed to tell which one ended it.
    let mut j = job("echo started; sleep 600; echo not-killed");
    j.timeout = Some(Duration::from_secs(3));
    let dir = harness::run_dir("job-timeout");
    let mut cfg = harness::config(&dir);
    cfg.default_job_timeout = Duration::from_secs(3600);
    let ex = kiln::Executor::new(cfg).unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(None);
    let mut sink = BufferSink::default();
    let r = ex.run(&j, &mut sink, rx).await;
    assert_no_leaks(&dir);
    assert_eq!(r.failure, Some(FailureReason::JobExecutionTimeout), "{r:?}");
    assert_eq!(String::from_utf8_lossy(&sink.stdout), "started\n");
    eprintln!("killed at its timeout after {} ms", r.run_ms);
}

async fn a_guest_that_never_answers_is_killed_at_the_boot_timeout() {
    // busybox as /init boots fine but never speaks the protocol.
    let dir = harness::run_dir("boot-timeout");
    let mut cfg = harness::config(&dir);
    cfg.agent = kiln_tests::fixtures::busybox_path().unwrap();
    cfg.boot_timeout = Duration::from_secs(8);
    let ex = kiln::Executor::new(cfg).unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(None);
    let t = Instant::now();
    let r = ex
        .run(&job("echo hi"), &mut BufferSink::default(), rx)
        .await;
    let elapsed = t.elapsed();
    assert_no_leaks(&dir);
    match &r.failure {
        Some(FailureReason::RunnerSystemFailure(m)) => assert!(m.contains("boot timeout"), "{m}"),
        other => panic!("expected a system failure, got {other:?}"),
    }
    // The boot timeout fired (the message above says so; nothing else
    // ends a boot), and not before its time. No upper bound: how long the
    // VM takes to start and die depends on the host's load.
    assert!(elapsed >= Duration::from_secs(8), "{elapsed:?}");
    assert!(
        r.debug_log.as_ref().is_some_and(|p| p.exists()),
        "the serial log is kept for failed boots"
    );
}

async fn a_missing_image_fails_before_any_vm_starts() {
    let j = JobSpec::single("x", "/nonexistent/image", Step::script("s", "true"));
    let (r, _) = run("missing-image", &j).await;
    match &r.failure {
        Some(FailureReason::ImagePullFailure(m)) => {
            assert!(m.contains("/nonexistent/image"), "{m}")
        }
        other => panic!("expected an image failure, got {other:?}"),
    }
}

async fn steps_see_the_image_env_workdir_and_user() {
    let dir = harness::test_root().join(format!("user-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    BusyboxImage {
        env: vec![
            "PATH=/bin".into(),
            "FROM_IMAGE=image-value".into(),
            "OVERRIDDEN=image".into(),
        ],
        working_dir: "/home/builder/work".into(),
        user: "builder".into(),
        ..BusyboxImage::default()
    }
    .build(&dir)
    .unwrap();
    let mut j = JobSpec::single(
        "env",
        dir.to_string_lossy(),
        Step::script("s", "id -u; id -g; id -G; pwd; echo $FROM_IMAGE $OVERRIDDEN $HOME; touch here && echo writable"),
    );
    j.variables.push(Variable::new("OVERRIDDEN", "job"));
    j.steps[0].shell = Shell::Sh;
    let (r, sink) = run("image-env", &j).await;
    harness::assert_success(&r, &sink);
    assert_eq!(
        String::from_utf8_lossy(&sink.stdout),
        "1000\n1000\n1000 10\n/home/builder/work\nimage-value job /home/builder\nwritable\n"
    );
}

async fn a_graceful_cancel_stops_the_step_and_runs_always_steps() {
    let mut j = job("echo started; sleep 600; echo not reached");
    let mut after = Step::script("after", "echo cleanup");
    after.when = StepWhen::Always;
    j.steps.push(after);
    let dir = harness::run_dir("cancel");
    let ex = harness::executor(&dir);
    let (mut sink, rx) = CancelAtFirstOutput::new();
    let r = ex.run(&j, &mut sink, rx).await;
    assert_no_leaks(&dir);
    // SIGTERM ended the sleep (exit 143, the step marked canceled) and the
    // always-step ran: the job timeout (300 s) would have killed the VM
    // instead. No clock needed.
    sink.assert_canceled_and_cleaned_up(&r);
}

async fn github_file_commands_and_conditions_carry_between_steps() {
    let mut j = job("echo FROM_ENV_FILE=hello >> $GITHUB_ENV\necho 'greeting=hi there' >> $GITHUB_OUTPUT\nmkdir -p /opt/tool && printf '#!/bin/sh\\necho tool ran\\n' > /opt/tool/mytool && chmod +x /opt/tool/mytool\necho /opt/tool >> $GITHUB_PATH");
    j.variables.push(Variable::new("GITHUB_ACTIONS", "true"));
    j.steps[0].id = Some("first".into());
    let mut second = Step::script(
        "second",
        "echo \"$FROM_ENV_FILE\"; mytool; echo '${{ steps.first.outputs.greeting }}'",
    );
    second.runtime_expressions = true;
    j.steps.push(second);
    let mut skipped = Step::script("skipped", "echo must not run");
    skipped.condition = Some("steps.first.outputs.greeting == 'nope'".into());
    j.steps.push(skipped);
    let mut taken = Step::script("taken", "echo condition held");
    taken.condition =
        Some("steps.first.outcome == 'success' && env.FROM_ENV_FILE == 'hello'".into());
    j.steps.push(taken);
    let (r, sink) = run("file-commands", &j).await;
    harness::assert_success(&r, &sink);
    assert_eq!(
        String::from_utf8_lossy(&sink.stdout),
        "hello\ntool ran\nhi there\ncondition held\n"
    );
    assert!(r.steps[2].skipped && !r.steps[3].skipped);
}

/// The embedded KVM backend boots the stock Debian kernel and runs a job.
/// Needs KVM that runs unmodified guests (VT-x/AMD-V, or the nested-KVM
/// tier's L1); elsewhere it is reported as skipped, with the reason.
async fn linux_job_runs_on_the_kvm_backend_with_hardware_kvm() {
    let dir = harness::run_dir("kvm-linux");
    let mut cfg = harness::config(&dir);
    cfg.backend = kiln_vmm::BackendKind::Kvm;
    let ex = kiln::Executor::new(cfg).unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(None);
    let mut sink = BufferSink::default();
    let r = ex
        .run(
            &job("uname -r; echo from-kvm; echo err >&2; exit 3"),
            &mut sink,
            rx,
        )
        .await;
    assert_no_leaks(&dir);
    assert!(r.backend.starts_with("kvm"), "{r:?}");
    assert_eq!(r.exit_code, 3, "{r:?}; serial log: {:?}", r.debug_log);
    let out = String::from_utf8_lossy(&sink.stdout);
    assert!(out.ends_with("from-kvm\n"), "{out}");
    assert_eq!(String::from_utf8_lossy(&sink.stderr), "err\n");
    eprintln!(
        "kvm backend: boot {} ms (guest {} ms), run {} ms",
        r.boot_ms, r.guest_boot_ms, r.run_ms
    );
}

fn main() -> std::process::ExitCode {
    kiln_testkit::Suite::new()
        .tokio(
            "stdout_and_stderr_arrive_intact_and_in_order",
            &harness::vm(),
            stdout_and_stderr_arrive_intact_and_in_order,
        )
        .tokio(
            "ten_mib_of_binary_output_arrives_byte_for_byte",
            &harness::vm(),
            ten_mib_of_binary_output_arrives_byte_for_byte,
        )
        .tokio(
            "exit_codes_0_1_and_137_pass_through",
            &harness::vm(),
            exit_codes_0_1_and_137_pass_through,
        )
        .tokio(
            "a_step_timeout_ends_the_step_and_is_reported",
            &harness::vm(),
            a_step_timeout_ends_the_step_and_is_reported,
        )
        .tokio(
            "a_job_timeout_kills_the_vm",
            &harness::vm(),
            a_job_timeout_kills_the_vm,
        )
        .tokio(
            "a_guest_that_never_answers_is_killed_at_the_boot_timeout",
            &harness::vm(),
            a_guest_that_never_answers_is_killed_at_the_boot_timeout,
        )
        .tokio(
            "a_missing_image_fails_before_any_vm_starts",
            &harness::vm(),
            a_missing_image_fails_before_any_vm_starts,
        )
        .tokio(
            "steps_see_the_image_env_workdir_and_user",
            &harness::vm(),
            steps_see_the_image_env_workdir_and_user,
        )
        .tokio(
            "a_graceful_cancel_stops_the_step_and_runs_always_steps",
            &harness::vm(),
            a_graceful_cancel_stops_the_step_and_runs_always_steps,
        )
        .tokio(
            "github_file_commands_and_conditions_carry_between_steps",
            &harness::vm(),
            github_file_commands_and_conditions_carry_between_steps,
        )
        .tokio(
            "linux_job_runs_on_the_kvm_backend_with_hardware_kvm",
            &[harness::qemu(), harness::busybox(), harness::hardware_kvm()],
            linux_job_runs_on_the_kvm_backend_with_hardware_kvm,
        )
        .run()
}
