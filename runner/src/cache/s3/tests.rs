use std::path::PathBuf;

use kiln_pipelines::{ArtifactWhen, CachePolicy, CacheSpec};
use kiln_testkit::moto::{self, MotoServer};

use super::*;
use crate::cache::store::{Spool, Store};
use crate::cache::{CacheConfig, JobCaches};

#[test]
fn object_names_are_gitlab_runners_and_keys_cannot_leave_their_project() {
    let ns = "runner/abcdefghi/project/7";
    assert_eq!(
        object_name("", ns, "deps-1-non_protected").unwrap(),
        "runner/abcdefghi/project/7/deps-1-non_protected"
    );
    assert_eq!(
        object_name("/ci/cache/", "project/7", "a/./b//c").unwrap(),
        "ci/cache/project/7/a/b/c"
    );
    assert_eq!(
        object_name("p", ns, "a/../b").unwrap(),
        "p/runner/abcdefghi/project/7/b"
    );
    for bad in ["../x", "a/../../x", "..", "", ".", "a/.."] {
        assert!(
            matches!(object_name("p", ns, bad), Err(S3Error::OutsideProject)),
            "{bad}"
        );
    }
}

#[test]
fn runner_tokens_are_shortened_as_gitlab_runner_does() {
    assert_eq!(short_token("glrt-abcdefghijklmnop"), "abcdefghi");
    assert_eq!(short_token("glrt-t1_abcdefghijkl"), "abcdefghi");
    assert_eq!(short_token("t2_abcdefghijkl"), "abcdefghi");
    assert_eq!(short_token("glrtr-abcdefghijkl"), "abcdefghi");
    assert_eq!(short_token("GR1348941abcdefghijkl"), "abcdefghi");
    assert_eq!(short_token("GRxyz"), "GRxyz");
    assert_eq!(short_token("short"), "short");
    assert_eq!(short_token("0123456789abcdef"), "012345678");
}

#[test]
fn endpoints_and_url_styles_follow_gitlab_runner() {
    let cfg = |addr: Option<&str>, insecure, bucket: &str| S3Config {
        server_address: addr.map(str::to_string),
        bucket_name: bucket.into(),
        insecure,
        ..S3Config::default()
    };
    let (u, s) = endpoint(&cfg(Some("127.0.0.1:9000"), true, "b")).unwrap();
    assert_eq!(u.as_str(), "http://127.0.0.1:9000/");
    assert!(matches!(s, UrlStyle::Path));
    let (u, s) = endpoint(&cfg(None, false, "b")).unwrap();
    assert_eq!(u.as_str(), "https://s3.amazonaws.com/");
    assert!(matches!(s, UrlStyle::VirtualHost));
    let (_, s) = endpoint(&cfg(Some("s3.amazonaws.com"), false, "a.b")).unwrap();
    assert!(matches!(s, UrlStyle::Path), "a dotted bucket over TLS");
    let mut c = cfg(None, false, "b");
    c.bucket_location = Some("eu-west-1".into());
    assert_eq!(
        endpoint(&c).unwrap().0.as_str(),
        "https://s3.eu-west-1.amazonaws.com/"
    );
    for bad in ["http://x", "u@host", "host/path"] {
        assert!(endpoint(&cfg(Some(bad), false, "b")).is_err(), "{bad}");
    }
}

#[test]
fn the_config_reads_like_gitlab_runners_and_hides_secrets() {
    let text = r#"
Type = "s3"
Path = "kiln"
Shared = true
[s3]
ServerAddress = "minio:9000"
AccessKey = "AKIAEXAMPLE"
SecretKey = "wJalr-very-secret"
BucketName = "runner"
BucketLocation = "eu-west-1"
Insecure = true
"#;
    let c: CacheConfig = toml::from_str(text).unwrap();
    c.validate("r").unwrap();
    let s3 = c.s3.as_ref().unwrap();
    assert_eq!(s3.server_address.as_deref(), Some("minio:9000"));
    assert_eq!(s3.bucket_name, "runner");
    assert!(s3.insecure);
    assert!(
        !format!("{c:?}").contains("wJalr"),
        "Debug hides the secret"
    );
    let no_bucket: CacheConfig = toml::from_str("Type = \"s3\"\n").unwrap();
    assert!(no_bucket.validate("r").unwrap_err().contains("BucketName"));
    let other: CacheConfig = toml::from_str("Type = \"gcs\"\n").unwrap();
    assert!(other.validate("r").unwrap_err().contains("\"s3\""));
    // No credentials anywhere: a clear error, not an anonymous store.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _g = rt.enter();
    let d = tempfile::tempdir().unwrap();
    let mut anon = c.clone();
    anon.s3.as_mut().unwrap().secret_key = None;
    let e = anon.open(d.path(), None).unwrap_err();
    assert!(e.to_string().contains("AWS_ACCESS_KEY_ID"), "{e}");
    let env = AwsCredentials {
        access_key_id: "AKIAENV".into(),
        secret_access_key: Secret("from-env".into()),
        session_token: None,
    };
    assert!(matches!(
        anon.open(d.path(), Some(&env)).unwrap(),
        Store::S3(_)
    ));
}

const BUCKET: &str = "kiln-cache";
const SECRET: &str = "moto-secret-key-0123";

/// The store of `[runners.cache]` on the server at `address`, objects
/// under `prefix`.
fn s3_store(address: &str, prefix: &str, bucket: &str, spool: &Path, max: u64) -> Store {
    let cfg = S3Config {
        server_address: Some(address.into()),
        access_key: Some("AKIAKILNTEST".into()),
        secret_key: Some(Secret(SECRET.into())),
        bucket_name: bucket.into(),
        insecure: true,
        ..S3Config::default()
    };
    let spool = Spool::open(spool).unwrap();
    Store::S3(Box::new(
        S3Store::open(&cfg, prefix, None, spool, max).unwrap(),
    ))
}

fn spec(key: &str, policy: CachePolicy, fallback: &[&str]) -> CacheSpec {
    CacheSpec {
        key: key.into(),
        fallback_keys: fallback.iter().map(|s| s.to_string()).collect(),
        paths: vec!["vendor/".into()],
        untracked: false,
        policy,
        when: ArtifactWhen::OnSuccess,
    }
}

/// A job's collected files for its first cache: `vendor/` with 300 KB of
/// incompressible bytes.
fn collected(dir: &Path) -> (PathBuf, Vec<u8>) {
    let files = dir.join("collected");
    std::fs::create_dir_all(files.join("0/vendor/sub")).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(files.join("0/vendor/sub/data.bin"), &data).unwrap();
    std::fs::write(files.join("0/vendor/a.txt"), b"hello\n").unwrap();
    (files, data)
}

/// A job's caches: the one `spec`, in `namespace` of `store`.
fn job(store: Store, namespace: &str, spec: CacheSpec) -> JobCaches {
    JobCaches::new(store, namespace.into(), vec![spec], None, None)
}

fn lines_of(f: impl FnOnce(&mut dyn FnMut(String))) -> String {
    let mut out = Vec::new();
    f(&mut |l| out.push(l));
    out.join("\n")
}

/// The store against a real S3 server, through `JobCaches` as a job uses
/// it: push then pull byte-identical, `policy: pull` uploads nothing, a
/// fallback key hits, a refusing server and a dead one are warnings, an
/// object over the cap is refused before it is kept, and no message holds
/// a secret or a presigned URL.
#[test]
fn a_cache_goes_through_a_real_s3_server() {
    if !kiln_testkit::require("a_cache_goes_through_a_real_s3_server", &[moto::need()]) {
        return;
    }
    let moto = MotoServer::start();
    moto.create_bucket(BUCKET);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    let ns = "runner/abcdefghi/project/7";
    let store = s3_store(&moto.address(), "ci", BUCKET, &spool, 64 << 20);
    let object = "ci/runner/abcdefghi/project/7/deps-1";
    let (files, data) = collected(d.path());

    // Job 1 pushes (pull-push: a miss first).
    let ws1 = d.path().join("ws1");
    std::fs::create_dir(&ws1).unwrap();
    let mut job1 = job(
        store.clone(),
        ns,
        spec("deps-1", CachePolicy::PullPush, &[]),
    );
    let log = lines_of(|say| job1.restore(&ws1, say));
    assert!(
        log.contains("WARNING: no cache for deps-1 in bucket kiln-cache\nFailed to extract cache"),
        "{log}"
    );
    let log = lines_of(|say| job1.save(&files, true, say));
    assert!(log.contains("Created cache (2 files"), "{log}");
    let stored = moto
        .object(BUCKET, object)
        .expect("the object is in the bucket");
    assert!(stored.starts_with(&[0x1f, 0x8b]), "a gzipped tar");

    // Job 2 pulls it: byte-identical files; `policy: pull` uploads nothing.
    let ws2 = d.path().join("ws2");
    std::fs::create_dir(&ws2).unwrap();
    let job2 = job(store.clone(), ns, spec("deps-2", CachePolicy::Pull, &[]));
    let mut job2b = job(store.clone(), ns, spec("deps-1", CachePolicy::Pull, &[]));
    let log = lines_of(|say| job2b.restore(&ws2, say));
    assert!(
        log.contains("Successfully extracted cache (2 files"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(ws2.join("vendor/sub/data.bin")).unwrap(),
        data
    );
    assert_eq!(std::fs::read(ws2.join("vendor/a.txt")).unwrap(), b"hello\n");
    let log = lines_of(|say| job2.save(&files, true, say));
    assert!(
        log.contains("Not uploading cache deps-2 due to policy"),
        "{log}"
    );
    assert!(
        moto.object(BUCKET, "ci/runner/abcdefghi/project/7/deps-2")
            .is_none(),
        "policy: pull uploaded"
    );
    assert_eq!(moto.object(BUCKET, object).unwrap(), stored, "unchanged");

    // Job 3: its key misses, the fallback key hits.
    let ws3 = d.path().join("ws3");
    std::fs::create_dir(&ws3).unwrap();
    let mut job3 = job(
        store.clone(),
        ns,
        spec("deps-3", CachePolicy::PullPush, &["deps-1"]),
    );
    let log = lines_of(|say| job3.restore(&ws3, say));
    assert!(
        log.contains("Checking cache for deps-3...\nWARNING: no cache for deps-3"),
        "{log}"
    );
    assert!(
        log.contains(
            "Trying fallback cache key deps-1...\nChecking cache for deps-1...\n\
             Successfully extracted cache (2 files"
        ),
        "{log}"
    );
    assert_eq!(
        std::fs::read(ws3.join("vendor/sub/data.bin")).unwrap(),
        data
    );
    // Another project does not see it; a key cannot climb out of its own.
    let ws4 = d.path().join("ws4");
    std::fs::create_dir(&ws4).unwrap();
    let mut other = job(
        store.clone(),
        "runner/abcdefghi/project/8",
        spec("../7/deps-1", CachePolicy::Pull, &["deps-1"]),
    );
    let log = lines_of(|say| other.restore(&ws4, say));
    assert!(log.contains("outside of project bucket"), "{log}");
    assert!(log.contains("WARNING: no cache for deps-1"), "{log}");
    assert!(!ws4.join("vendor").exists());

    // An object over the download cap is refused, and nothing is kept.
    let small = s3_store(&moto.address(), "ci", BUCKET, &spool, 100 << 10);
    let e = small.fetch(ns, "deps-1").unwrap_err();
    assert!(e.to_string().contains("larger than the limit"), "{e}");
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "spool emptied"
    );

    // A server that refuses (here a bucket policy; moto does not check
    // presigned signatures, see docs/cache.md) and a server that is gone:
    // warnings, and the job's caches go on.
    moto.put_bucket_policy(
        BUCKET,
        &format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Deny","Principal":"*",
            "Action":["s3:GetObject","s3:PutObject"],"Resource":"arn:aws:s3:::{BUCKET}/denied/*"}}]}}"#
        ),
    );
    let denied = s3_store(&moto.address(), "denied", BUCKET, &spool, 64 << 20);
    let mut job5 = job(denied, ns, spec("deps-1", CachePolicy::PullPush, &[]));
    let ws5 = d.path().join("ws5");
    std::fs::create_dir(&ws5).unwrap();
    let mut log = lines_of(|say| job5.restore(&ws5, say));
    log += "\n";
    log += &lines_of(|say| job5.save(&files, true, say));
    assert!(
        log.contains("WARNING: downloading denied/runner/abcdefghi/project/7/deps-1 in bucket kiln-cache: the server answered 403 Forbidden\nFailed to extract cache"),
        "{log}"
    );
    assert!(
        log.contains("the server answered 403 Forbidden\nFailed to create cache"),
        "{log}"
    );
    let missing_bucket = s3_store(&moto.address(), "ci", "no-such-bucket", &spool, 64 << 20);
    let e = missing_bucket.fetch(ns, "deps-1").unwrap_err();
    assert!(e.to_string().contains("NoSuchBucket"), "not a miss: {e}");
    let port = moto.port();
    drop(moto);
    let gone = s3_store(&format!("127.0.0.1:{port}"), "ci", BUCKET, &spool, 1 << 20);
    let mut job6 = job(gone, ns, spec("deps-1", CachePolicy::PullPush, &[]));
    log += "\n";
    log += &lines_of(|say| job6.restore(&ws5, say));
    log += "\n";
    log += &lines_of(|say| job6.save(&files, true, say));
    assert!(log.contains("cannot connect"), "{log}");
    for secret in [SECRET, "X-Amz", "Signature", "AKIAKILNTEST"] {
        assert!(!log.contains(secret), "{secret} in the log: {log}");
    }
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "spool emptied"
    );
}
