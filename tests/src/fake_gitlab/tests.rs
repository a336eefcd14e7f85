//! The consistency check ([`FakeJob::check_consistent`]) against recorded
//! runs, clean and broken.

use serde_json::json;

use super::*;

const TOKEN: &str = "jobtok";

/// A job as the fake records it after one clean run: handed out once,
/// fetched once, one trace patch, one accepted final update.
fn recorded() -> FakeJob {
    let trace = b"Running with kiln\nJob succeeded\n".to_vec();
    let body = json!({"token": TOKEN, "state": "success", "exit_code": 0,
        "output": {"checksum": format!("crc32:{:08x}", crc32fast::hash(&trace)),
                   "bytesize": trace.len()}});
    let now = Instant::now();
    FakeJob {
        id: 7,
        token: TOKEN.into(),
        payload: json!({}),
        assigned: 1,
        assignments: vec![1],
        runs: 1,
        status: "success".into(),
        failure_reason: None,
        requests: vec![
            JobRequest {
                at: now,
                what: format!("PATCH 0-{}", trace.len() - 1),
                bytes: trace.len(),
                status: 202,
            },
            JobRequest {
                at: now,
                what: "PUT success".into(),
                bytes: 0,
                status: 200,
            },
        ],
        trace,
        finals: vec![FinalUpdate { body, status: 200 }],
        violations: Vec::new(),
        artifacts: Vec::new(),
        upload_attempts: 0,
        range_errors: 0,
        status_set_at: None,
        final_202_left: 0,
        final_412_left: false,
        lose_tail_left: false,
        upload_answers_left: VecDeque::new(),
    }
}

#[test]
fn a_clean_run_is_consistent() {
    recorded().check_consistent().unwrap();
}

#[test]
fn a_resent_final_update_is_a_retry_not_a_second_outcome() {
    // The first answer was lost; the resend met a finished job.
    let mut j = recorded();
    let again = j.finals[0].body.clone();
    j.finals.push(FinalUpdate {
        body: again,
        status: 403,
    });
    j.check_consistent().unwrap();
}

#[test]
fn a_double_finalise_is_caught() {
    // Two accepted final updates (a fake that lets it happen)...
    let mut j = recorded();
    j.finals.push(j.finals[0].clone());
    let e = j.check_consistent().unwrap_err();
    assert!(e.contains("2 accepted final updates"), "{e}");
    // ...or a second run's different outcome, refused by GitLab.
    let mut j = recorded();
    let mut other = j.finals[0].body.clone();
    other["state"] = json!("failed");
    other["failure_reason"] = json!("script_failure");
    j.finals.push(FinalUpdate {
        body: other,
        status: 403,
    });
    let e = j.check_consistent().unwrap_err();
    assert!(e.contains("two outcomes"), "{e}");
}

#[test]
fn a_job_run_twice_is_caught() {
    let mut j = recorded();
    j.assigned = 2;
    j.assignments.push(2);
    j.runs = 2;
    let e = j.check_consistent().unwrap_err();
    assert!(e.contains("run 2 times"), "{e}");
    // Handed out twice but run once is what a runner must do.
    j.runs = 1;
    j.check_consistent().unwrap();
}

#[test]
fn no_final_update_or_a_wrong_checksum_is_caught() {
    let mut j = recorded();
    j.finals.clear();
    assert!(j.check_consistent().unwrap_err().contains("0 accepted"));
    let mut j = recorded();
    j.trace.push(b'x');
    assert!(j.check_consistent().unwrap_err().contains("the trace is"));
}

#[test]
fn requests_after_a_403_are_caught() {
    let mut j = recorded();
    let now = Instant::now();
    j.requests.insert(
        1,
        JobRequest {
            at: now,
            what: "PUT running".into(),
            bytes: 0,
            status: 403,
        },
    );
    let e = j.check_consistent().unwrap_err();
    assert!(e.contains("after a 403"), "{e}");
}

#[test]
fn violations_and_a_leaked_token_are_caught() {
    let mut j = recorded();
    j.violations.push("PUT with state \"done\"".into());
    assert!(j.check_consistent().unwrap_err().contains("violations"));
    let mut j = recorded();
    j.trace = format!("token {TOKEN}\n").into_bytes();
    let sum = format!("crc32:{:08x}", crc32fast::hash(&j.trace));
    j.finals[0].body["output"] = json!({"checksum": sum, "bytesize": j.trace.len()});
    assert!(j.check_consistent().unwrap_err().contains("job token"));
}
