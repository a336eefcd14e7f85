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
    let script = dir.join("../cli-137-script.sh");
    std::fs::write(&script, "echo from-script\nkill -9 $$\necho not reached\n").unwrap();
    let o = kiln_cmd(&dir)
        .args(["run-job", "--cpus", "1", "--memory", "512", "--image"])
        .arg(harness::busybox_image())
        .arg("--script")
        .arg(&script)
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

fn main() -> std::process::ExitCode {
    kiln_testkit::Suite::new()
        .test("help_lists_the_commands", &[], help_lists_the_commands)
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
            "bad_input_gets_clear_errors",
            &[],
            bad_input_gets_clear_errors,
        )
        .run()
}
