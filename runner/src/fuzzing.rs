//! Fuzz harnesses for what a GitLab server and a guest send the runner
//! (see docs/fuzzing.md): the job payload, and the artifact archive the
//! guest sends back.
//!
//! Each harness takes arbitrary bytes and panics only when a property that
//! must hold for every input is broken. `cargo test` drives them with
//! proptest for a bounded number of cases (`PROPTEST_CASES` raises it);
//! the cargo-fuzz targets in `fuzz/` call the same functions. Not part of
//! the API.

use std::os::unix::fs::PermissionsExt;

use crate::gitlab::job::{Context, JobResponse};

/// A job payload as `POST /jobs/request` answers it: parsing and the
/// translation into a `JobSpec` fail or succeed, never panic; every masked
/// variable's value is among the values the trace masks.
pub fn payload(data: &[u8]) {
    let Ok(job) = serde_json::from_slice::<JobResponse>(data) else {
        return;
    };
    let ctx = Context {
        runner_id: Some(1),
        runner_name: "fuzz".into(),
        default_image: Some("alpine:3".into()),
        image_policy: kiln_images::ImagePolicy::provider(false, vec!["alpine*".into()]),
        concurrent_id: 0,
        workspace: "/nonexistent/fuzz".into(),
    };
    let masked = job.masked_values();
    for v in job
        .variables
        .iter()
        .filter(|v| v.masked && !v.value.is_empty())
    {
        assert!(
            masked.contains(&v.value),
            "masked variable {:?} is not masked",
            v.key
        );
    }
    let _ = job.to_spec(&ctx);
}

/// The guest's artifact archive, extracted beside a tree it must not touch
/// (`kiln_testkit::fuzz::Sandbox`): nothing outside the target changes,
/// and what is extracted is only plain files and directories without
/// setuid or setgid bits.
pub fn artifacts(tar: &[u8]) {
    let tmp = tempfile::tempdir().expect("temporary directory");
    let sandbox = kiln_testkit::fuzz::Sandbox::new(tmp.path());
    let archive = tmp.path().join("root/artifacts.tar");
    std::fs::write(&archive, tar).expect("archive");
    let to = sandbox.root().join("out");
    let _ = crate::executor::extract_artifacts(&archive, &to);
    sandbox.check();
    let mut stack = vec![to];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let m = std::fs::symlink_metadata(e.path()).expect("stat");
            assert!(
                m.is_file() || m.is_dir(),
                "{:?} is neither a file nor a directory",
                e.path()
            );
            assert_eq!(
                m.permissions().mode() & 0o6000,
                0,
                "{:?} is setuid",
                e.path()
            );
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_testkit::fuzz::{config, hostile_tar, json};
    use proptest::prelude::*;

    use super::*;

    const PAYLOAD_KEYS: &[&str] = &[
        "id",
        "token",
        "allow_git_fetch",
        "job_info",
        "git_info",
        "runner_info",
        "variables",
        "steps",
        "image",
        "artifacts",
        "dependencies",
        "features",
        "name",
        "stage",
        "repo_url",
        "ref",
        "sha",
        "depth",
        "timeout",
        "key",
        "value",
        "masked",
        "public",
        "file",
        "script",
        "when",
        "allow_failure",
        "entrypoint",
        "paths",
        "exclude",
        "untracked",
        "expire_in",
        "artifacts_file",
        "filename",
        "size",
    ];

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn payloads_never_panic(data in json(PAYLOAD_KEYS)) {
            // With the two fields a payload must have, so that most get
            // past the first check.
            let data = match data.strip_prefix('{') {
                Some("}") => r#"{"id":1,"token":"t"}"#.to_string(),
                Some(rest) => format!(r#"{{"id":1,"token":"t",{rest}"#),
                None => data,
            };
            payload(data.as_bytes());
        }

        #[test]
        fn payloads_of_any_bytes(data in prop::collection::vec(any::<u8>(), 0..300)) {
            payload(&data);
        }
    }

    proptest! {
        #![proptest_config(config(48))]

        #[test]
        fn artifact_archives_stay_inside_their_target(tar in hostile_tar()) {
            artifacts(&tar);
        }
    }
}
