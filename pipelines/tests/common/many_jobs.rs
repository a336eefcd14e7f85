//! A large generated `.gitlab-ci.yml`, shared by the hostile tests and the
//! `plan` bench (which includes this file with `#[path]`).

/// `n` jobs over three stages; every tenth job `needs` the two jobs of its
/// stage before it instead of waiting for the earlier stages.
pub fn many_jobs(n: usize) -> String {
    let mut s = String::from("stages: [build, test, deploy]\n");
    for i in 0..n {
        let stage = ["build", "test", "deploy"][i % 3];
        s.push_str(&format!("j{i}:\n  stage: {stage}\n  script: [make]\n"));
        if i % 10 == 9 && i >= 6 {
            s.push_str(&format!("  needs: [j{}, j{}]\n", i - 3, i - 6));
        }
    }
    s
}
