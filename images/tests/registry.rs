//! Pulls from a real registry (Debian's `docker-registry`, started here on a
//! free port), pushed to with `skopeo`. Skipped, saying why, when those are
//! not installed.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use common::{Comp, TestRegistry};
use kiln_images::{
    Cache, ImageError, ImageSource, Images, ImagesOptions, NoProgress, Reference, RegistryConfig,
    Rootfs,
};

fn new_cache() -> (tempfile::TempDir, Cache) {
    let t = tempfile::tempdir().unwrap();
    let c = Cache::open(t.path()).unwrap();
    (t, c)
}

fn pull(cache: &Cache, reference: &str) -> Result<kiln_images::Rootfs, ImageError> {
    let src = ImageSource::parse(reference)?;
    assert!(matches!(src, ImageSource::Registry(_)), "{src:?}");
    rootfs_for(cache, &src)
}

/// The rootfs of `src` through a service over `cache` with registry
/// settings `cfg`, on a runtime of its own.
fn rootfs_with(
    cache: &Cache,
    cfg: RegistryConfig,
    src: &ImageSource,
) -> Result<Rootfs, ImageError> {
    let options = ImagesOptions {
        registry: cfg,
        ..Default::default()
    };
    let images = Images::new(cache.clone(), options)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(images.rootfs(src, Arc::new(NoProgress)))
}

/// [`rootfs_with`] with the default registry settings.
fn rootfs_for(cache: &Cache, src: &ImageSource) -> Result<Rootfs, ImageError> {
    rootfs_with(cache, RegistryConfig::default(), src)
}

fn read_in_rootfs(r: &kiln_images::Rootfs, path: &str) -> Vec<u8> {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("x");
    common::extract_rootfs(&r.image, &r.fstype, &dir);
    std::fs::read(dir.join(path)).unwrap_or_else(|e| panic!("{path} in {}: {e}", r.image.display()))
}

/// Files in the cache's tmp/ (must be empty after any pull, good or bad).
fn tmp_leftovers(cache: &Cache) -> Vec<String> {
    std::fs::read_dir(cache.dir("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect()
}

fn pulls_oci_gzip_and_zstd_images_and_caches_them() {
    let reg = TestRegistry::start();
    let src = tempfile::tempdir().unwrap();
    let mut warm = Vec::new();
    for (i, comp) in [Comp::Gzip, Comp::Zstd].into_iter().enumerate() {
        let dir = src.path().join(format!("l{i}"));
        let layers = [
            common::layer_tar(true, &[("etc/os-release", b"ID=base\n")]),
            common::layer_tar(
                false,
                &[("etc/os-release", format!("ID=top{i}\n").as_bytes())],
            ),
        ];
        let built = common::single_layout(&dir, &layers, comp, &["A=1"], "v1");
        reg.push(
            &format!("oci:{}:v1", dir.display()),
            &format!("test/img{i}:v1"),
            &[],
        );
        let (_t, cache) = new_cache();
        let r = pull(&cache, &format!("{}/test/img{i}:v1", reg.host())).unwrap();
        assert_eq!(r.chain_id, kiln_images::apply::chain_id(&built.diff_ids));
        assert_eq!(r.config.env, vec!["A=1".to_string()]);
        assert_eq!(
            read_in_rootfs(&r, "etc/os-release"),
            format!("ID=top{i}\n").as_bytes()
        );
        assert!(read_in_rootfs(&r, "bin/busybox").len() > 100_000);
        // Blobs are in the shared store; nothing is left in tmp/.
        for d in &built.layer_digests {
            let p = kiln_images::store::blob_path(&cache, d).unwrap();
            assert_eq!(common::sha256(&std::fs::read(&p).unwrap()), *d);
        }
        assert!(
            tmp_leftovers(&cache).is_empty(),
            "{:?}",
            tmp_leftovers(&cache)
        );
        warm.push((cache, format!("{}/test/img{i}:v1", reg.host()), r, _t));
    }
    // Warm: with the registry gone, the cached resolution and rootfs serve,
    // and the root filesystem is not rebuilt (a build publishes a new file by
    // rename; the LRU touches the mtime of the one it serves).
    drop(reg);
    for (cache, reference, r, _t) in warm {
        let before = std::fs::metadata(&r.image).unwrap();
        let again = pull(&cache, &reference).unwrap();
        assert_eq!(again.image, r.image);
        let after = std::fs::metadata(&again.image).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((before.ino(), before.len()), (after.ino(), after.len()));
    }
}

fn pulls_docker_v2s2_images_and_pins_by_digest() {
    let reg = TestRegistry::start();
    let src = tempfile::tempdir().unwrap();
    let layers = [common::layer_tar(true, &[("hello", b"v2s2\n")])];
    common::single_layout(src.path(), &layers, Comp::Gzip, &[], "t");
    reg.push(
        &format!("oci:{}:t", src.path().display()),
        "docker/img:t",
        &["--format", "v2s2"],
    );
    let (_t, cache) = new_cache();
    let reference = format!("{}/docker/img:t", reg.host());
    let r = pull(&cache, &reference).unwrap();
    assert_eq!(read_in_rootfs(&r, "hello"), b"v2s2\n");
    let rec = kiln_images::store::load_record(&cache, &Reference::parse(&reference).unwrap())
        .expect("an image record");
    // The registry converted it: the manifest is a Docker schema 2 one.
    let m = std::fs::read(kiln_images::store::blob_path(&cache, &rec.manifest).unwrap()).unwrap();
    assert!(String::from_utf8_lossy(&m)
        .contains("application/vnd.docker.distribution.manifest.v2+json"));
    // By digest, in a fresh cache.
    let (_t2, cache2) = new_cache();
    let pinned = format!("{}/docker/img@{}", reg.host(), rec.digest);
    let r2 = pull(&cache2, &pinned).unwrap();
    assert_eq!(r2.chain_id, r.chain_id);
    // A digest that is not there.
    let missing = format!("{}/docker/img@sha256:{}", reg.host(), "0".repeat(64));
    let e = pull(&cache2, &missing).unwrap_err().to_string();
    assert!(e.contains("404") || e.contains("not found"), "{e}");
}

fn picks_linux_amd64_from_a_multi_arch_index() {
    let reg = TestRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let arm = common::build_image(
        d,
        &[common::layer_tar(true, &[("arch", b"arm64\n")])],
        Comp::Gzip,
        "arm64",
        &[],
    );
    let amd = common::build_image(
        d,
        &[common::layer_tar(true, &[("arch", b"amd64\n")])],
        Comp::Zstd,
        "amd64",
        &[],
    );
    // An attestation manifest that claims nothing useful, listed first.
    let att = common::build_image(
        d,
        &[common::layer_tar(false, &[("att", b"x")])],
        Comp::Gzip,
        "unknown",
        &[],
    );
    let entry = |b: &common::Built, arch: &str, os: &str, ann: Option<(&str, &str)>| {
        let mut v = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": b.manifest_digest, "size": b.manifest.len(),
            "platform": {"architecture": arch, "os": os}});
        if let Some((k, val)) = ann {
            v["annotations"] = serde_json::json!({ k: val });
        }
        v
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            entry(&att, "unknown", "unknown", Some(("vnd.docker.reference.type", "attestation-manifest"))),
            entry(&arm, "arm64", "linux", None),
            entry(&amd, "amd64", "linux", None),
        ]}))
    .unwrap();
    let index_digest = common::put_blob(d, &index);
    common::write_index(
        d,
        vec![serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": index_digest, "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"}})],
    );
    reg.push(
        &format!("oci:{}:multi", d.display()),
        "test/multi:multi",
        &["--all"],
    );
    let (_t, cache) = new_cache();
    let r = pull(&cache, &format!("{}/test/multi:multi", reg.host())).unwrap();
    assert_eq!(read_in_rootfs(&r, "arch"), b"amd64\n");
    assert_eq!(r.chain_id, kiln_images::apply::chain_id(&amd.diff_ids));
    let rec = kiln_images::store::list_records(&cache).pop().unwrap();
    assert_eq!(rec.digest, index_digest);
    assert_eq!(rec.manifest, amd.manifest_digest);
    // The arm64 layer was never downloaded.
    assert!(
        !kiln_images::store::blob_path(&cache, &arm.layer_digests[0])
            .unwrap()
            .exists()
    );
}

fn a_corrupt_blob_names_the_layer_and_leaves_the_cache_clean() {
    let reg = TestRegistry::start();
    let src = tempfile::tempdir().unwrap();
    let layers = [
        common::layer_tar(true, &[]),
        common::layer_tar(false, &[("f", &[7u8; 100_000])]),
    ];
    let built = common::single_layout(src.path(), &layers, Comp::Gzip, &[], "c");
    reg.push(
        &format!("oci:{}:c", src.path().display()),
        "test/corrupt:c",
        &[],
    );
    let bad = &built.layer_digests[1];
    let data = reg.blob_data(bad);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&data, &bytes).unwrap();
    let (_t, cache) = new_cache();
    let e = pull(&cache, &format!("{}/test/corrupt:c", reg.host())).unwrap_err();
    let msg = format!("{e}");
    assert!(
        msg.contains(bad.as_str()),
        "the error should name layer {bad}: {msg}"
    );
    assert!(matches!(e, ImageError::Corrupt { .. }), "{e:?}");
    // Nothing half-written: not the bad blob, not a rootfs, nothing in tmp/.
    assert!(!kiln_images::store::blob_path(&cache, bad).unwrap().exists());
    assert!(std::fs::read_dir(cache.dir("rootfs"))
        .unwrap()
        .next()
        .is_none());
    assert!(
        tmp_leftovers(&cache).is_empty(),
        "{:?}",
        tmp_leftovers(&cache)
    );
    // A truncated blob too.
    bytes.truncate(mid);
    std::fs::write(&data, &bytes).unwrap();
    let msg = pull(&cache, &format!("{}/test/corrupt:c", reg.host()))
        .unwrap_err()
        .to_string();
    assert!(msg.contains(bad.as_str()), "{msg}");
    assert!(tmp_leftovers(&cache).is_empty());
}

fn imports_docker_save_tars_legacy_and_oci() {
    let src = tempfile::tempdir().unwrap();
    let layout = src.path().join("layout");
    let layers = [
        common::layer_tar(true, &[]),
        common::layer_tar(false, &[("etc/motd", b"from a tar\n")]),
    ];
    let built = common::single_layout(&layout, &layers, Comp::Gzip, &["X=y"], "v1");
    // Legacy `docker save` form, via skopeo.
    let legacy = src.path().join("legacy.tar");
    let o = std::process::Command::new("skopeo")
        .args(["copy", "-q"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker-archive:{}:test/img:v1", legacy.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // OCI layout in a tar (Docker ≥ 25's form).
    let ocitar = src.path().join("oci.tar");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&ocitar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    for (tar, tag) in [
        (&legacy, None),
        (&legacy, Some("v1")),
        (&ocitar, None),
        (&ocitar, Some("v1")),
    ] {
        let (_t, cache) = new_cache();
        let arg = match tag {
            Some(t) => format!("{}:{t}", tar.display()),
            None => tar.display().to_string(),
        };
        let source = ImageSource::parse(&arg).unwrap();
        assert!(matches!(source, ImageSource::Archive { .. }), "{source:?}");
        let r = rootfs_for(&cache, &source).unwrap();
        assert_eq!(
            r.chain_id,
            kiln_images::apply::chain_id(&built.diff_ids),
            "{arg}"
        );
        assert_eq!(r.config.env, vec!["X=y".to_string()]);
        assert_eq!(read_in_rootfs(&r, "etc/motd"), b"from a tar\n");
    }
    let (_t, cache) = new_cache();
    let e = rootfs_for(
        &cache,
        &ImageSource::parse(&format!("{}:nope", legacy.display())).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nope"), "{e}");
}

/// A reverse proxy in front of the registry that wants a bearer token
/// (issued by its `/token` for alice's basic credentials), redirects blob
/// downloads to another host name (where an `Authorization` header is an
/// error), sends `ratelimit-*` headers, and answers the first manifest
/// request with a 429.
struct AuthProxy {
    upstream: String,
    /// Plain basic auth (`WWW-Authenticate: Basic`) on every request instead.
    basic_only: bool,
    basic_refused: AtomicUsize,
    port: u16,
    tokens_issued: AtomicUsize,
    manifest_gets: AtomicUsize,
    blob_gets: std::sync::Mutex<Vec<String>>,
    leaked_auth: AtomicUsize,
    first_429: AtomicUsize,
}

const TOKEN: &str = "tok-3f9a";

async fn proxy(State(p): State<Arc<AuthProxy>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let resp = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .body(Body::from(body))
            .unwrap()
    };
    if path == "/token" {
        // alice:secret
        if auth.as_deref() != Some("Basic YWxpY2U6c2VjcmV0") {
            return resp(StatusCode::UNAUTHORIZED, "bad credentials".into());
        }
        let q = req.uri().query().unwrap_or("");
        if !q.contains("scope=repository%3Aprivate%2Fimg%3Apull") {
            return resp(StatusCode::BAD_REQUEST, format!("unexpected scope: {q}"));
        }
        p.tokens_issued.fetch_add(1, Ordering::SeqCst);
        return resp(
            StatusCode::OK,
            format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#),
        );
    }
    let upstream_path = if p.basic_only {
        if auth.as_deref() != Some("Basic YWxpY2U6c2VjcmV0") {
            p.basic_refused.fetch_add(1, Ordering::SeqCst);
            let mut r = resp(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.into(),
            );
            r.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static(r#"Basic realm="Registry Realm""#),
            );
            return r;
        }
        path.clone()
    } else if let Some(rest) = path.strip_prefix("/direct") {
        if auth.is_some() {
            p.leaked_auth.fetch_add(1, Ordering::SeqCst);
            return resp(
                StatusCode::BAD_REQUEST,
                "Authorization sent across hosts".into(),
            );
        }
        rest.to_string()
    } else {
        if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
            let mut r = resp(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#.into(),
            );
            r.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_str(&format!(
                    r#"Bearer realm="http://127.0.0.1:{}/token",service="test-registry",scope="repository:private/img:pull""#,
                    p.port
                ))
                .unwrap(),
            );
            return r;
        }
        if path.contains("/manifests/") && p.first_429.fetch_add(1, Ordering::SeqCst) == 0 {
            let mut r = resp(StatusCode::TOO_MANY_REQUESTS, "slow down".into());
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("0"));
            r.headers_mut()
                .insert("ratelimit-remaining", HeaderValue::from_static("0;w=21600"));
            return r;
        }
        if path.contains("/blobs/") && req.method() == "GET" {
            p.blob_gets.lock().unwrap().push(path.clone());
            let mut r = resp(StatusCode::TEMPORARY_REDIRECT, String::new());
            r.headers_mut().insert(
                "location",
                HeaderValue::from_str(&format!("http://localhost:{}/direct{path}", p.port))
                    .unwrap(),
            );
            return r;
        }
        if path.contains("/manifests/") && req.method() == "GET" {
            p.manifest_gets.fetch_add(1, Ordering::SeqCst);
        }
        path.clone()
    };
    let client = reqwest::Client::new();
    let mut up = client.request(
        req.method().clone(),
        format!("{}{upstream_path}", p.upstream),
    );
    if let Some(a) = req.headers().get("accept") {
        up = up.header("accept", a.clone());
    }
    let r = match up.send().await {
        Ok(r) => r,
        Err(e) => return resp(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    let mut b = Response::builder().status(r.status());
    for h in ["content-type", "docker-content-digest", "content-length"] {
        if let Some(v) = r.headers().get(h) {
            b = b.header(h, v.clone());
        }
    }
    b = b
        .header("ratelimit-limit", "100;w=21600")
        .header("ratelimit-remaining", "99;w=21600");
    b.body(Body::from(r.bytes().await.unwrap_or_default()))
        .unwrap()
}

fn start_proxy(upstream: String) -> Arc<AuthProxy> {
    start_proxy_with(upstream, false)
}

fn start_proxy_with(upstream: String, basic_only: bool) -> Arc<AuthProxy> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let p = Arc::new(AuthProxy {
        upstream,
        basic_only,
        basic_refused: AtomicUsize::new(0),
        port: listener.local_addr().unwrap().port(),
        tokens_issued: AtomicUsize::new(0),
        manifest_gets: AtomicUsize::new(0),
        blob_gets: Default::default(),
        leaked_auth: AtomicUsize::new(0),
        first_429: AtomicUsize::new(0),
    });
    let state = p.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = axum::Router::new().fallback(proxy).with_state(state);
            axum::serve(l, app).await.unwrap();
        });
    });
    p
}

fn bearer_token_auth_redirects_retries_and_one_download_for_concurrent_pulls() {
    let reg = TestRegistry::start();
    let src = tempfile::tempdir().unwrap();
    let layers = [
        common::layer_tar(true, &[]),
        common::layer_tar(false, &[("secret", b"pulled with a token\n")]),
    ];
    let built = common::single_layout(src.path(), &layers, Comp::Gzip, &[], "v1");
    reg.push(
        &format!("oci:{}:v1", src.path().display()),
        "private/img:v1",
        &[],
    );
    let proxy = start_proxy(format!("http://{}", reg.host()));
    let reference = Reference::parse(&format!("127.0.0.1:{}/private/img:v1", proxy.port)).unwrap();

    // Without credentials: a clear error.
    let (_t, cache) = new_cache();
    let mut cfg = RegistryConfig {
        backoff: std::time::Duration::from_millis(10),
        ..Default::default()
    };
    let src_ref = ImageSource::Registry(reference.clone());
    let e = rootfs_with(&cache, cfg.clone(), &src_ref)
        .unwrap_err()
        .to_string();
    assert!(e.contains("401"), "{e}");

    // With credentials from a docker config.json: three concurrent pulls of
    // the same image download each layer once.
    let dcfg = src.path().join("config.json");
    std::fs::write(
        &dcfg,
        format!(
            r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"YWxpY2U6c2VjcmV0"}}}}}}"#,
            proxy.port
        ),
    )
    .unwrap();
    cfg.load_auth_file(&dcfg).unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let (cache, cfg, src_ref) = (cache.clone(), cfg.clone(), src_ref.clone());
                s.spawn(move || rootfs_with(&cache, cfg, &src_ref))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = results[0].as_ref().unwrap().clone();
    for r in &results {
        assert_eq!(r.as_ref().unwrap().image, first.image);
    }
    assert_eq!(read_in_rootfs(&first, "secret"), b"pulled with a token\n");
    let gets = proxy.blob_gets.lock().unwrap().clone();
    for d in &built.layer_digests {
        let n = gets.iter().filter(|p| p.ends_with(d.as_str())).count();
        assert_eq!(n, 1, "layer {d} downloaded {n} times: {gets:?}");
    }
    assert_eq!(proxy.leaked_auth.load(Ordering::SeqCst), 0);
    assert!(proxy.tokens_issued.load(Ordering::SeqCst) >= 1);
    // The first manifest request got a 429 and was retried.
    assert!(proxy.first_429.load(Ordering::SeqCst) >= 2);
    // Within the tag TTL a pull asks the registry nothing.
    let gets = proxy.manifest_gets.load(Ordering::SeqCst);
    let before = proxy.first_429.load(Ordering::SeqCst);
    let again = rootfs_with(&cache, cfg.clone(), &src_ref).unwrap();
    assert_eq!(again.image, first.image);
    assert_eq!(proxy.manifest_gets.load(Ordering::SeqCst), gets);
    assert_eq!(proxy.first_429.load(Ordering::SeqCst), before);
}

/// A registry behind plain basic auth (`WWW-Authenticate: Basic`): no
/// credentials and a wrong password each give a clear error; the right
/// password from a docker config.json pulls the image.
fn basic_auth_pulls_with_the_right_password_and_refuses_a_wrong_one() {
    let reg = TestRegistry::start();
    let src = tempfile::tempdir().unwrap();
    let layers = [
        common::layer_tar(true, &[]),
        common::layer_tar(false, &[("secret", b"pulled with basic auth\n")]),
    ];
    common::single_layout(src.path(), &layers, Comp::Gzip, &[], "v1");
    reg.push(
        &format!("oci:{}:v1", src.path().display()),
        "private/basic:v1",
        &[],
    );
    let proxy = start_proxy_with(format!("http://{}", reg.host()), true);
    let reference =
        Reference::parse(&format!("127.0.0.1:{}/private/basic:v1", proxy.port)).unwrap();
    let src_ref = ImageSource::Registry(reference);
    let pull_with = |auth_b64: Option<&str>| {
        let (t, cache) = new_cache();
        let mut cfg = RegistryConfig {
            backoff: std::time::Duration::from_millis(10),
            ..Default::default()
        };
        if let Some(a) = auth_b64 {
            let dcfg = t.path().join("config.json");
            std::fs::write(
                &dcfg,
                format!(
                    r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"{a}"}}}}}}"#,
                    proxy.port
                ),
            )
            .unwrap();
            cfg.load_auth_file(&dcfg).unwrap();
        }
        let r = rootfs_with(&cache, cfg, &src_ref);
        (t, r)
    };
    let (_t, none) = pull_with(None);
    let e = none.unwrap_err().to_string();
    assert!(e.contains("basic credentials"), "{e}");
    // alice:wrong
    let (_t, wrong) = pull_with(Some("YWxpY2U6d3Jvbmc="));
    let e = wrong.unwrap_err().to_string();
    assert!(e.contains("401"), "{e}");
    assert!(
        !e.contains("d3Jvbmc") && !e.contains("wrong"),
        "no password in errors: {e}"
    );
    // alice:secret
    let refused = proxy.basic_refused.load(Ordering::SeqCst);
    let (_t, right) = pull_with(Some("YWxpY2U6c2VjcmV0"));
    let r = right.unwrap();
    assert_eq!(read_in_rootfs(&r, "secret"), b"pulled with basic auth\n");
    // Sent up front once the scheme is known: at most the first probe is refused.
    assert!(proxy.basic_refused.load(Ordering::SeqCst) <= refused + 1);
}

fn insecure_http_is_refused_for_non_loopback_hosts() {
    // No registry needed: the scheme is decided before connecting. The
    // attempt is made from a network namespace of its own (no interface
    // up, no route), so no packet to the non-loopback address leaves this
    // machine (tests may only reach loopback and their own namespaces)
    // and the connection fails at once instead of after a timeout.
    let chain = std::thread::spawn(|| {
        // SAFETY: unshare(2) of the network namespace only, for this
        // thread and the runtime threads `rootfs_with` starts from it;
        // nothing else of the test runs here.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
            .expect("a network namespace of the test's own (needs root)");
        let (_t, cache) = new_cache();
        let cfg = RegistryConfig {
            retries: 0,
            connect_timeout: std::time::Duration::from_secs(30),
            ..Default::default()
        };
        // 192.0.2.0/24 is TEST-NET-1. https is what is tried.
        let src = ImageSource::parse("192.0.2.1:5000/x/y:z").unwrap();
        let e = rootfs_with(&cache, cfg, &src).unwrap_err();
        kiln_testkit::error_chain(&e)
    })
    .join()
    .expect("the attempt in its own network namespace");
    assert!(
        chain.contains("https://192.0.2.1:5000/v2/x/y/manifests/z"),
        "{chain}"
    );
}

fn main() -> std::process::ExitCode {
    kiln_testkit::Suite::new()
        .test(
            "pulls_oci_gzip_and_zstd_images_and_caches_them",
            &common::tools(),
            pulls_oci_gzip_and_zstd_images_and_caches_them,
        )
        .test(
            "pulls_docker_v2s2_images_and_pins_by_digest",
            &common::tools(),
            pulls_docker_v2s2_images_and_pins_by_digest,
        )
        .test(
            "picks_linux_amd64_from_a_multi_arch_index",
            &common::tools(),
            picks_linux_amd64_from_a_multi_arch_index,
        )
        .test(
            "a_corrupt_blob_names_the_layer_and_leaves_the_cache_clean",
            &common::tools(),
            a_corrupt_blob_names_the_layer_and_leaves_the_cache_clean,
        )
        .test(
            "imports_docker_save_tars_legacy_and_oci",
            &common::tools(),
            imports_docker_save_tars_legacy_and_oci,
        )
        .test(
            "bearer_token_auth_redirects_retries_and_one_download_for_concurrent_pulls",
            &common::tools(),
            bearer_token_auth_redirects_retries_and_one_download_for_concurrent_pulls,
        )
        .test(
            "insecure_http_is_refused_for_non_loopback_hosts",
            &[kiln_testkit::root()],
            insecure_http_is_refused_for_non_loopback_hosts,
        )
        .test(
            "basic_auth_pulls_with_the_right_password_and_refuses_a_wrong_one",
            &common::tools(),
            basic_auth_pulls_with_the_right_password_and_refuses_a_wrong_one,
        )
        .run()
}
