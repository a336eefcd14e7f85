//! Hostile images, converted the way a job's image is (`Images::rootfs`): tars
//! that claim huge names, PAX headers and sparse files, zip bombs, layers cut
//! short or that are no tar at all, manifests pointing outside their archive,
//! deep trees, symlink loops, millions of entries.
//!
//! Each test builds its image here (small compressed inputs that claim huge
//! sizes; nothing large is committed), then converts it in a child process:
//! this test binary, run again with `--exact <test>` and `KILN_HOSTILE_CHILD`
//! set, converts the image and writes its result and its peak memory
//! (`VmHWM` from `/proc/self/status`) before it exits. The test then checks
//! that the error is clear (it names what failed) and short (< 1 KiB), that
//! the child's peak memory stayed under the bound the test states, that the
//! cache holds no partial output (`tmp/` and, after a failure, `rootfs/`
//! empty), and that nothing outside the test's directories changed (an
//! `outside/` directory next to the cache, which symlinks in the layers aim
//! at, is compared before and after).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

const CHILD: &str = "KILN_HOSTILE_CHILD";
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

// ---------------------------------------------------------------------------
// The child process

/// In the child: converts the image named in `<dir>/source` with the cache
/// `<dir>/cache`, writes `<dir>/result` (peak memory in KiB, `ok` or `err`,
/// then the image path or the error with its sources) and exits.
fn child(dir: &Path) -> ! {
    use kiln_images::{ImageSource, Images, ImagesOptions, NoProgress};
    let source = fs::read_to_string(dir.join("source")).unwrap();
    // The variables the test set, read as `kiln` reads them.
    let options = ImagesOptions::from_vars(|k| std::env::var_os(k));
    let images = Images::open(dir.join("cache"), options).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = ImageSource::parse(&source)
        .and_then(|s| rt.block_on(images.rootfs(&s, std::sync::Arc::new(NoProgress))));
    let text = match result {
        Ok(r) => format!("ok\n{}", r.image.display()),
        Err(e) => format!("err\n{}", kiln_testkit::error_chain(&e)),
    };
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/self/status");
    fs::write(dir.join("result"), format!("{hwm}\n{text}")).unwrap();
    std::process::exit(0);
}

// ---------------------------------------------------------------------------
// A test's directories and the conversion

/// One test's directories, under a temporary directory: `input/` (the
/// image), `cache/`, `outside/` (what an escape would reach).
struct Case {
    test: &'static str,
    _tmp: tempfile::TempDir,
    base: PathBuf,
}

/// What the child reported.
struct Outcome {
    /// Peak resident memory (VmHWM), bytes.
    peak: u64,
    /// The rootfs image, or the error message.
    result: Result<PathBuf, String>,
}

impl Case {
    /// In the child process, converts and exits; in the test, makes the
    /// directories. `test` must be the calling test's name.
    fn new(test: &'static str) -> Case {
        if let Ok(dir) = std::env::var(CHILD) {
            child(Path::new(&dir));
        }
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().to_owned();
        for d in ["input", "outside"] {
            fs::create_dir(base.join(d)).unwrap();
        }
        fs::write(base.join("outside/victim"), b"keep").unwrap();
        Case {
            test,
            _tmp: tmp,
            base,
        }
    }

    fn input(&self) -> PathBuf {
        self.base.join("input")
    }

    fn outside(&self) -> PathBuf {
        self.base.join("outside")
    }

    fn cache(&self) -> PathBuf {
        self.base.join("cache")
    }

    /// Writes `layers` as the OCI layout in `input/` and converts it (see
    /// [`Case::convert`]).
    fn convert_layers(&self, layers: &[Layer], env: &[(&str, &str)]) -> Outcome {
        layout(&self.input(), layers);
        self.convert(&self.input(), env)
    }

    /// Converts `source` (a layout directory or an image tar) in a child
    /// process with `env` set, and checks that nothing outside the cache
    /// changed and that the cache holds no partial output.
    fn convert(&self, source: &Path, env: &[(&str, &str)]) -> Outcome {
        let before = snapshot(&self.base, &["cache", "source", "result"]);
        let _ = fs::remove_file(self.base.join("result"));
        fs::write(
            self.base.join("source"),
            source.as_os_str().as_encoded_bytes(),
        )
        .unwrap();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([self.test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, &self.base)
            .env_remove("KILN_IMAGE_MAX_GB")
            .env_remove("KILN_IMAGE_MAX_ENTRIES")
            .env_remove("KILN_REGISTRY_CONFIG")
            .env_remove("KILN_ROOTFS_FS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let result = fs::read_to_string(self.base.join("result")).unwrap_or_else(|e| {
            panic!(
                "the child wrote no result ({e}); status {}, stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let mut lines = result.splitn(3, '\n');
        let peak = lines.next().unwrap().parse::<u64>().unwrap() * KIB;
        let kind = lines.next().unwrap();
        let rest = lines.next().unwrap_or("").to_owned();
        let result = match kind {
            "ok" => Ok(PathBuf::from(rest)),
            _ => Err(rest),
        };
        assert_eq!(
            snapshot(&self.base, &["cache", "source", "result"]),
            before,
            "something changed outside the cache"
        );
        assert_eq!(fs::read(self.outside().join("victim")).unwrap(), b"keep");
        let tmp = names(&self.cache().join("tmp"));
        assert!(tmp.is_empty(), "partial output left in the cache: {tmp:?}");
        if result.is_err() {
            let rootfs = names(&self.cache().join("rootfs"));
            assert!(rootfs.is_empty(), "a rootfs after a failure: {rootfs:?}");
        }
        Outcome { peak, result }
    }
}

impl Outcome {
    /// The error, checked to be short and to contain each of `needles`.
    fn error(&self, needles: &[&str]) -> &str {
        let e = match &self.result {
            Ok(p) => panic!("converted to {} instead of failing", p.display()),
            Err(e) => e.as_str(),
        };
        assert!(
            e.len() < 1024,
            "error of {} bytes: {}",
            e.len(),
            e.chars().take(2000).collect::<String>()
        );
        for n in needles {
            assert!(e.contains(n), "error does not say {n:?}: {e}");
        }
        eprintln!("error ({} bytes): {e}", e.len());
        e
    }

    fn image(&self) -> &Path {
        match &self.result {
            Ok(p) => p,
            Err(e) => panic!("conversion failed: {e}"),
        }
    }

    fn assert_peak_under(&self, bound: u64) {
        eprintln!(
            "peak memory: {} MiB (bound {} MiB)",
            self.peak / MIB,
            bound / MIB
        );
        assert!(
            self.peak < bound,
            "peak memory {} MiB, more than the {} MiB allowed",
            self.peak / MIB,
            bound / MIB
        );
    }
}

/// Every path below `root` (not entering the `skip`ped top-level names),
/// with its type, size, mode and link target.
fn snapshot(root: &Path, skip: &[&str]) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, skip: &[&str], out: &mut BTreeMap<PathBuf, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_owned();
            if dir == root && skip.iter().any(|s| e.file_name() == *s) {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let link = fs::read_link(&p).ok();
            out.insert(
                rel,
                format!(
                    "{:o} {} {:?} {:?}",
                    m.mode(),
                    m.len(),
                    link,
                    m.modified().ok()
                ),
            );
            if m.is_dir() {
                walk(root, &p, skip, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, skip, &mut out);
    out
}

fn names(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

// ---------------------------------------------------------------------------
// Tar pieces

/// A GNU header of type `kind` for `name` (at most 100 bytes), written
/// field by field so nothing is refused.
fn header(kind: u8, name: &[u8], size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_mut_bytes()[..name.len()].copy_from_slice(name);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h.set_cksum();
    h
}

fn block(h: &tar::Header) -> Vec<u8> {
    h.as_bytes().to_vec()
}

fn padding(size: u64) -> Vec<u8> {
    vec![0; ((512 - size % 512) % 512) as usize]
}

/// A PAX extended header for the next entry, with `records`.
fn pax(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (k, v) in records {
        let body = [b" ", k.as_bytes(), b"=", v, b"\n"].concat();
        // The length counts its own digits.
        let mut len = body.len();
        while len.to_string().len() + body.len() != len {
            len = len.to_string().len() + body.len();
        }
        data.extend_from_slice(len.to_string().as_bytes());
        data.extend_from_slice(&body);
    }
    let mut out = block(&header(b'x', b"PaxHeader", data.len() as u64));
    let pad = padding(data.len() as u64);
    out.extend_from_slice(&data);
    out.extend_from_slice(&pad);
    out
}

/// A regular file entry with its data.
fn file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut out = block(&header(b'0', name.as_bytes(), data.len() as u64));
    out.extend_from_slice(data);
    out.extend_from_slice(&padding(data.len() as u64));
    out
}

fn entry(kind: u8, name: &str, link: &str) -> Vec<u8> {
    let mut h = header(kind, name.as_bytes(), 0);
    h.as_mut_bytes()[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    block(&h)
}

fn end() -> Vec<u8> {
    vec![0; 1024]
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A gzip member of 1 MiB of `a` (about 1 KB): repeated, it makes huge
/// streams from little (gzip members concatenate, and deflate cannot do
/// better than ~1:1000 however long the input).
fn gz_1m_of_a() -> &'static [u8] {
    static MEMBER: OnceLock<Vec<u8>> = OnceLock::new();
    MEMBER.get_or_init(|| gz(&vec![b'a'; 1 << 20]))
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A DiffID for layers that must fail before theirs is checked.
fn some_diff_id() -> String {
    sha256(b"never checked")
}

// ---------------------------------------------------------------------------
// Images

/// A layer of a layout: its blob's bytes, media type and DiffID.
struct Layer {
    blob: Vec<u8>,
    media_type: &'static str,
    diff_id: String,
}

/// A layer of `blob` as it is, whose DiffID is never checked (it must fail
/// before that).
fn unchecked(blob: Vec<u8>, media_type: &'static str) -> Layer {
    Layer {
        blob,
        media_type,
        diff_id: some_diff_id(),
    }
}

/// The digest `layout` gives a layer's blob.
fn digest(l: &Layer) -> String {
    sha256(&l.blob)
}

/// A gzip layer blob: `head`, then `mib` MiB of `a` (gzip members of about
/// 1 KB each), then `tail`: an entry that claims a huge header, from little.
fn gz_claiming(head: &tar::Header, mib: usize, tail: &[u8]) -> Vec<u8> {
    let mut blob = gz(&block(head));
    for _ in 0..mib {
        blob.extend_from_slice(gz_1m_of_a());
    }
    blob.extend_from_slice(&gz(tail));
    blob
}

/// A layer whose DiffID is right (the sha256 of `tar`), compressed as
/// `media_type` says.
fn layer(tar: &[u8], media_type: &'static str) -> Layer {
    let blob = match media_type {
        TAR => tar.to_vec(),
        TAR_GZ => gz(tar),
        _ => zstd::encode_all(tar, 3).unwrap(),
    };
    Layer {
        blob,
        media_type,
        diff_id: sha256(tar),
    }
}

fn put_blob(dir: &Path, bytes: &[u8]) -> (String, u64) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let d = sha256(bytes);
    fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
    (d, bytes.len() as u64)
}

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// An OCI layout of `layers` in `dir`; returns the layer digests.
fn layout(dir: &Path, layers: &[Layer]) -> Vec<String> {
    let mut descs = Vec::new();
    let mut digests = Vec::new();
    for l in layers {
        let (d, size) = put_blob(dir, &l.blob);
        descs.push(serde_json::json!({"mediaType": l.media_type, "digest": d, "size": size}));
        digests.push(d);
    }
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config = config_json(&diff_ids);
    let (cd, cs) = put_blob(dir, &config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    }))
    .unwrap();
    let (md, ms) = put_blob(dir, &manifest);
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms}
        ]}))
        .unwrap(),
    )
    .unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    digests
}

/// A `docker save` tar (legacy form) at `path`: `files` (name, bytes) and a
/// `manifest.json` naming `config` and `layers`.
fn docker_save(path: &Path, files: &[(&str, &[u8])], config: &str, layers: &[&str]) {
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": config, "RepoTags": ["hostile:latest"], "Layers": layers}
    ]))
    .unwrap();
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    let mut all: Vec<(&str, &[u8])> = files.to_vec();
    all.push(("manifest.json", &manifest));
    for (name, data) in all {
        let mut h = tar::Header::new_gnu();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.finish().unwrap();
}

// ---------------------------------------------------------------------------
// Names and extension headers

/// The issue's case: a 7 MB gzip layer whose tar has a 1.5 GiB GNU long
/// name took 7.9 GB and printed a 1.6-billion-byte error. The size is
/// refused from the header, before a byte of the name is read.
#[test]
fn gnu_long_name_of_1_5_gib_is_refused_from_its_header() {
    let case = Case::new("gnu_long_name_of_1_5_gib_is_refused_from_its_header");
    let head = header(b'L', b"././@LongLink", 1536 * MIB);
    let blob = gz_claiming(&head, 1536, &[file("f", b"x"), end()].concat());
    eprintln!("layer blob: {} KB", blob.len() / 1000);
    let l = unchecked(blob, TAR_GZ);
    let layer_digest = digest(&l);
    let out = case.convert_layers(&[l], &[]);
    out.error(&[
        &layer_digest,
        "GNU long name",
        "(1610612736 bytes) exceeds kiln's limit of 4097 bytes",
    ]);
    out.assert_peak_under(64 * MIB);
}

#[test]
fn gnu_long_link_of_1_gib_is_refused_from_its_header() {
    let case = Case::new("gnu_long_link_of_1_gib_is_refused_from_its_header");
    let head = header(b'K', b"././@LongLink", GIB);
    let blob = gz_claiming(&head, 1024, &[entry(b'2', "l", ""), end()].concat());
    let out = case.convert_layers(&[unchecked(blob, TAR_GZ)], &[]);
    out.error(&["long link", "(1073741824 bytes) exceeds kiln's limit"]);
    out.assert_peak_under(64 * MIB);
}

#[test]
fn pax_header_of_1_gib_is_refused_from_its_header() {
    let case = Case::new("pax_header_of_1_gib_is_refused_from_its_header");
    let head = header(b'x', b"PaxHeader", GIB);
    let blob = gz_claiming(&head, 1024, &[file("f", b"x"), end()].concat());
    let out = case.convert_layers(&[unchecked(blob, TAR_GZ)], &[]);
    out.error(&["PAX extended header (1073741824 bytes) exceeds kiln's limit of 1048576 bytes"]);
    out.assert_peak_under(64 * MIB);
}

#[test]
fn pax_header_with_50k_records_is_refused() {
    let case = Case::new("pax_header_with_50k_records_is_refused");
    let records: Vec<(String, Vec<u8>)> = (0..50_000)
        .map(|i| (format!("k{i}"), b"v".to_vec()))
        .collect();
    let refs: Vec<(&str, &[u8])> = records
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let tar = [pax(&refs), file("f", b"x"), end()].concat();
    let out = case.convert_layers(&[layer(&tar, TAR_GZ)], &[]);
    out.error(&["records of a PAX extended header exceeds kiln's limit of 4096 records"]);
    out.assert_peak_under(64 * MIB);
}

/// Paths: one too long (through PAX), one too deep, and a tree taken deeper
/// than a path may be through a symlink to a deep directory.
#[test]
fn deep_and_long_paths_are_refused() {
    let case = Case::new("deep_and_long_paths_are_refused");
    let long = "d/".repeat(2500) + "f";
    let tar = [pax(&[("path", long.as_bytes())]), file("x", b"x"), end()].concat();
    let out = case.convert_layers(&[layer(&tar, TAR)], &[]);
    out.error(&["a path or link target (5001 bytes) exceeds kiln's limit of 4096 bytes"]);

    let deep = "a/".repeat(300) + "f";
    let tar = [pax(&[("path", deep.as_bytes())]), file("x", b"x"), end()].concat();
    let out = case.convert_layers(&[layer(&tar, TAR)], &[]);
    out.error(&["a path's components (301 components) exceeds kiln's limit of 256"]);

    // 200 levels, a symlink to the bottom, 200 more below the symlink:
    // every path is within the limits, the tree would not be.
    let half = "a/".repeat(200);
    let tar = [
        pax(&[("path", format!("{half}f").as_bytes())]),
        file("x", b"x"),
        pax(&[("linkpath", half.trim_end_matches('/').as_bytes())]),
        entry(b'2', "s", ""),
        pax(&[("path", format!("s/{half}f").as_bytes())]),
        file("x", b"deep"),
        end(),
    ]
    .concat();
    let out = case.convert_layers(&[layer(&tar, TAR)], &[]);
    out.error(&["a path's components (257 components) exceeds kiln's limit of 256"]);
    out.assert_peak_under(64 * MIB);
}

#[test]
fn symlink_loops_fail_cleanly() {
    let case = Case::new("symlink_loops_fail_cleanly");
    let outside = case.outside();
    let tar = [
        entry(b'2', "a", "b"),
        entry(b'2', "b", "a"),
        file("a/x", b"x"),
        end(),
    ]
    .concat();
    let out = case.convert_layers(&[layer(&tar, TAR)], &[]);
    out.error(&["\"a/x\"", "symbolic links"]);

    let tar = [
        entry(b'2', "self", "self/self"),
        file("self/x", b"x"),
        end(),
    ]
    .concat();
    let out = case.convert_layers(&[layer(&tar, TAR)], &[]);
    out.error(&["\"self/x\"", "symbolic links"]);
    assert_eq!(names(&outside), ["victim"]);
    out.assert_peak_under(64 * MIB);
}

// ---------------------------------------------------------------------------
// Sizes

/// The issue's case: a 10 KB layer with a 2 GiB GNU sparse file was
/// written out in full (4.3 GB of cache at peak, a 2.15 GB rootfs). Holes
/// stay holes: in the tree and in the image.
#[test]
fn sparse_file_of_2_gib_keeps_its_holes() {
    let case = Case::new("sparse_file_of_2_gib_keeps_its_holes");
    let real = 2 * GIB;
    let mut h = header(b'S', b"sparse", 8192);
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.sparse[0].set_offset(0);
        gnu.sparse[0].set_length(4096);
        gnu.sparse[1].set_offset(real - 4096);
        gnu.sparse[1].set_length(4096);
        gnu.set_real_size(real);
    }
    h.set_cksum();
    let data: Vec<u8> = [vec![b'A'; 4096], vec![b'Z'; 4096]].concat();
    let tar = [block(&h), data, end()].concat();

    // Applied directly: 2 GiB apparent, 8 KiB of data on disk.
    let direct = tempfile::tempdir().unwrap();
    let stats = kiln_images::apply::apply_layer(direct.path(), &tar[..]).unwrap();
    assert_eq!((stats.bytes, stats.holes), (8192, real - 8192));
    let f = direct.path().join("sparse");
    let m = fs::metadata(&f).unwrap();
    assert_eq!(m.len(), real);
    assert!(
        m.blocks() * 512 <= 64 * KIB,
        "{} bytes allocated",
        m.blocks() * 512
    );
    let mut head = [0u8; 4];
    let mut tail = [0u8; 4];
    let mut middle = [1u8; 4];
    {
        use std::os::unix::fs::FileExt;
        let file = fs::File::open(&f).unwrap();
        file.read_exact_at(&mut head, 0).unwrap();
        file.read_exact_at(&mut tail, real - 4).unwrap();
        file.read_exact_at(&mut middle, GIB).unwrap();
    }
    assert_eq!((&head, &tail, &middle), (b"AAAA", b"ZZZZ", &[0u8; 4]));

    // Converted: the image stays small.
    let l = layer(&tar, TAR_GZ);
    eprintln!("layer blob: {} bytes", l.blob.len());
    let out = case.convert_layers(&[l], &[]);
    let image = out.image();
    let allocated = fs::metadata(image).unwrap().blocks() * 512;
    eprintln!(
        "rootfs {}: {} KiB allocated",
        image.display(),
        allocated / KIB
    );
    assert!(allocated < 16 * MIB, "rootfs takes {} MiB", allocated / MIB);
    let cache_total: u64 = walk_sizes(&case.cache());
    eprintln!("cache: {} KiB allocated", cache_total / KIB);
    assert!(
        cache_total < 32 * MIB,
        "cache takes {} MiB",
        cache_total / MIB
    );
    out.assert_peak_under(64 * MIB);
}

/// Allocated bytes of every file below `dir`.
fn walk_sizes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        total += m.blocks() * 512;
        if m.is_dir() {
            total += walk_sizes(&e.path());
        }
    }
    total
}

#[test]
fn sparse_holes_beyond_the_budget_are_refused_before_writing() {
    let case = Case::new("sparse_holes_beyond_the_budget_are_refused_before_writing");
    let real = 1 << 40;
    let mut h = header(b'S', b"huge", 512);
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.sparse[0].set_offset(real - 512);
        gnu.sparse[0].set_length(512);
        gnu.set_real_size(real);
    }
    h.set_cksum();
    let tar = [block(&h), vec![b'z'; 512], end()].concat();
    let out = case.convert_layers(&[layer(&tar, TAR_GZ)], &[]);
    out.error(&[
        "the holes of the image's sparse files exceeds kiln's limit of 8589934592 bytes",
        "\"huge\"",
    ]);
    out.assert_peak_under(64 * MIB);
}

/// Sparse maps that claim millions of segments: GNU 1.0 (a count at the
/// start of the data) and old GNU (extension blocks, 21 segments each).
#[test]
fn sparse_maps_with_millions_of_segments_are_refused() {
    let case = Case::new("sparse_maps_with_millions_of_segments_are_refused");
    let map = b"100000000\n0\n512\n".to_vec();
    let stored = 512 + 512;
    let tar = [
        pax(&[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"f"),
            ("GNU.sparse.realsize", b"1048576"),
        ]),
        block(&header(b'0', b"GNUSparseFile.0/f", stored)),
        [map.clone(), vec![0; 512 - map.len()]].concat(),
        vec![b'd'; 512],
        end(),
    ]
    .concat();
    let out = case.convert_layers(&[layer(&tar, TAR_GZ)], &[]);
    out.error(&["a sparse file's map (100000000 segments) exceeds kiln's limit of 65536"]);

    // Old GNU: 4 segments in the header, then extension blocks; 70,000
    // segments (the data after them is never reached).
    let segments: Vec<(u64, u64)> = (0..70_000u64).map(|i| (i * 1024, 512)).collect();
    let mut h = header(b'S', b"old", 512 * 70_000);
    {
        let gnu = h.as_gnu_mut().unwrap();
        for (i, &(o, l)) in segments.iter().take(4).enumerate() {
            gnu.sparse[i].set_offset(o);
            gnu.sparse[i].set_length(l);
        }
        gnu.set_real_size(70_000 * 1024);
        gnu.set_is_extended(true);
    }
    h.set_cksum();
    let mut tar = block(&h);
    let rest = &segments[4..];
    for (n, chunk) in rest.chunks(21).enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (i, &(o, l)) in chunk.iter().enumerate() {
            ext.sparse[i].set_offset(o);
            ext.sparse[i].set_length(l);
        }
        ext.set_is_extended(n + 1 < rest.len().div_ceil(21));
        tar.extend_from_slice(ext.as_bytes());
    }
    let out = case.convert_layers(&[layer(&tar, TAR_ZST)], &[]);
    out.error(&[
        "a sparse file's map exceeds kiln's limit of 65536 segments",
        "\"old\"",
    ]);
    out.assert_peak_under(64 * MIB);
}

/// A zstd bomb: a few KB that unpack to 512 MiB of zeros after the tar's
/// end-of-archive marker (no tar reader looks there, but the DiffID covers
/// them, so kiln reads them). The stream stops at the layer limit, here
/// lowered to 16 MiB with `KILN_IMAGE_MAX_GB` (which is what a user who
/// needs bigger images raises; the default, 32 GiB, works the same, only
/// slower to show). An entry claiming 64 GiB is refused from its header.
#[test]
fn zstd_bomb_stops_at_the_layer_limit() {
    let case = Case::new("zstd_bomb_stops_at_the_layer_limit");
    let frame = zstd::encode_all(&vec![0u8; 1 << 20][..], 3).unwrap();
    let mut blob = zstd::encode_all(&[file("f", b"x"), end()].concat()[..], 3).unwrap();
    for _ in 0..512 {
        blob.extend_from_slice(&frame);
    }
    eprintln!("layer blob: {} KB for 512 MiB of zeros", blob.len() / 1000);
    let l = unchecked(blob, TAR_ZST);
    let layer_digest = digest(&l);
    let limit = [("KILN_IMAGE_MAX_GB", "0.015625")];
    let out = case.convert_layers(&[l], &limit);
    out.error(&[
        &layer_digest,
        "the uncompressed layer exceeds kiln's limit of 16777216 bytes",
        "after its end-of-archive marker",
        "KILN_IMAGE_MAX_GB",
    ]);
    out.assert_peak_under(256 * MIB);

    let mut blob = zstd::encode_all(&block(&header(b'0', b"zeros", 64 * GIB))[..], 3).unwrap();
    blob.extend_from_slice(&frame);
    let out = case.convert_layers(&[unchecked(blob, TAR_ZST)], &limit);
    out.error(&[
        "the uncompressed layer (68719476736 bytes) exceeds kiln's limit of 16777216 bytes",
        "\"zeros\"",
    ]);
    out.assert_peak_under(256 * MIB);
}

/// The per-image limit spans layers: two layers of 12 MiB each pass the
/// per-layer check, the second breaks the image's 16 MiB.
#[test]
fn image_limit_spans_layers() {
    let case = Case::new("image_limit_spans_layers");
    let tar = [
        block(&header(b'0', b"big", 12 * MIB)),
        vec![0u8; (12 * MIB) as usize],
        end(),
    ]
    .concat();
    let l1 = layer(&tar, TAR_ZST);
    let l2 = layer(&tar, TAR_ZST);
    drop(tar);
    let out = case.convert_layers(&[l1, l2], &[("KILN_IMAGE_MAX_GB", "0.015625")]);
    out.error(&[
        "the image's uncompressed layers",
        "exceeds kiln's limit of 16777216 bytes",
        "KILN_IMAGE_MAX_GB",
    ]);
    out.assert_peak_under(64 * MIB);
}

/// A layer of 2,097,152 tiny entries (512 bytes each, AUFS metadata,
/// which costs no file system work) stops at the entry limit. The limit is
/// lowered here to 50,000 (`KILN_IMAGE_MAX_ENTRIES`): in a debug build,
/// hashing the 512 MiB stream up to the default 1,048,576 takes minutes.
#[test]
fn millions_of_tiny_entries_stop_at_the_entry_limit() {
    let case = Case::new("millions_of_tiny_entries_stop_at_the_entry_limit");
    let one = block(&header(b'0', b".wh..wh.aufs", 0));
    let frame = zstd::encode_all(&one.repeat(2048)[..], 3).unwrap(); // 1 MiB of headers
    let mut blob = Vec::new();
    for _ in 0..1024 {
        blob.extend_from_slice(&frame);
    }
    blob.extend_from_slice(&zstd::encode_all(&end()[..], 3).unwrap());
    eprintln!("layer blob: {} KB", blob.len() / 1000);
    let out = case.convert_layers(
        &[unchecked(blob, TAR_ZST)],
        &[("KILN_IMAGE_MAX_ENTRIES", "50000")],
    );
    out.error(&[
        "the image's tar entries exceeds kiln's limit of 50000 entries",
        "KILN_IMAGE_MAX_ENTRIES",
    ]);
    out.assert_peak_under(64 * MIB);
}

/// Hard links count as entries (here against a limit lowered to 1,000).
#[test]
fn hard_links_count_as_entries() {
    let case = Case::new("hard_links_count_as_entries");
    let mut tar = file("target", b"t");
    for i in 0..2000 {
        tar.extend(entry(b'1', &format!("link{i}"), "target"));
    }
    tar.extend(end());
    let out = case.convert_layers(
        &[layer(&tar, TAR_GZ)],
        &[("KILN_IMAGE_MAX_ENTRIES", "1000")],
    );
    out.error(&[
        "the image's tar entries exceeds kiln's limit of 1000 entries",
        "\"link998\"",
    ]);
    out.assert_peak_under(64 * MIB);
}

#[test]
fn huge_uid_gid_and_mtime() {
    let case = Case::new("huge_uid_gid_and_mtime");
    let mut h = header(b'0', b"owned", 0);
    h.set_uid(1 << 40);
    h.set_cksum();
    let tar = [block(&h), end()].concat();
    let out = case.convert_layers(&[layer(&tar, TAR)], &[]);
    out.error(&["\"owned\"", "uid 1099511627776 out of range"]);

    let tar = [
        pax(&[("gid", b"99999999999999999999999")]),
        file("g", b""),
        end(),
    ]
    .concat();
    let out = case.convert_layers(&[layer(&tar, TAR)], &[]);
    out.error(&["\"g\"", "bad PAX gid"]);

    // Times far out of any file system's range are clamped by the kernel;
    // the image converts.
    let mut h = header(b'0', b"future", 0);
    h.set_mtime(1 << 62);
    h.set_cksum();
    let tar = [
        block(&h),
        pax(&[("mtime", b"-99999999999.5")]),
        file("past", b""),
        end(),
    ]
    .concat();
    let out = case.convert_layers(&[layer(&tar, TAR)], &[]);
    out.image();
    out.assert_peak_under(64 * MIB);
}

// ---------------------------------------------------------------------------
// Layers that are not what they say

/// A plain layer cut short is reported as truncated (not as a DiffID
/// mismatch), naming the layer: in an OCI layout (the blob is shorter than
/// its descriptor), and in a `docker save` tar (whose layer.tar is all there
/// is), cut inside a file's data and at a header boundary.
#[test]
fn plain_layer_cut_short_is_reported_as_truncated() {
    let case = Case::new("plain_layer_cut_short_is_reported_as_truncated");
    let tar = [file("a", &[b'a'; 3000]), file("b", &[b'b'; 3000]), end()].concat();
    let full = layer(&tar, TAR);
    let digests = layout(&case.input(), &[full]);
    // Cut the blob in the layout, keeping its descriptor.
    let blob = case
        .input()
        .join("blobs/sha256")
        .join(digests[0].trim_start_matches("sha256:"));
    fs::write(&blob, &tar[..2000]).unwrap();
    let out = case.convert(&case.input(), &[]);
    out.error(&[
        &digests[0],
        "truncated",
        "2000 bytes",
        "descriptor says 8192",
    ]);

    let diff_id = sha256(&tar);
    let config = config_json(std::slice::from_ref(&diff_id));
    // Inside the data of "b": 512 + 3072 + 512 + 100.
    let archive = case.base.join("input/cut-in-data.tar");
    docker_save(
        &archive,
        &[("config.json", &config), ("l1/layer.tar", &tar[..4196])],
        "config.json",
        &["l1/layer.tar"],
    );
    let out = case.convert(&archive, &[]);
    out.error(&[
        "l1/layer.tar",
        &diff_id,
        "ends unexpectedly in the contents of entry \"b\"",
        "truncated",
    ]);

    // Right after "a": a tar that just ends, without its end-of-archive
    // marker, and whose DiffID is not the expected one.
    let archive = case.base.join("input/cut-between.tar");
    docker_save(
        &archive,
        &[("config.json", &config), ("l1/layer.tar", &tar[..3584])],
        "config.json",
        &["l1/layer.tar"],
    );
    let out = case.convert(&archive, &[]);
    out.error(&[
        "l1/layer.tar",
        "without the end-of-archive marker",
        "truncated",
    ]);
    out.assert_peak_under(64 * MIB);
}

#[test]
fn layers_that_are_not_tars() {
    let case = Case::new("layers_that_are_not_tars");
    let junk: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let l = unchecked(junk.clone(), TAR);
    let layer_digest = digest(&l);
    let out = case.convert_layers(&[l], &[]);
    out.error(&[&layer_digest, "not a tar archive"]);

    // gzip data declared as a plain tar.
    let tar = [file("f", b"x"), end()].concat();
    let gz_as_plain = Layer {
        blob: gz(&tar),
        media_type: TAR,
        diff_id: sha256(&tar),
    };
    let out = case.convert_layers(&[gz_as_plain], &[]);
    out.error(&["not a tar archive but a compressed one"]);

    // Junk declared as gzip, and as zstd.
    for mt in [TAR_GZ, TAR_ZST] {
        let out = case.convert_layers(&[unchecked(junk.clone(), mt)], &[]);
        out.error(&["failed to read the layer tar"]);
        out.assert_peak_under(64 * MIB);
    }
}

/// A `.wh..wh..opq` whose directory is a lower layer's file, or a symlink
/// to a directory outside the root.
#[test]
fn opaque_whiteout_on_a_file_or_an_outside_symlink() {
    let case = Case::new("opaque_whiteout_on_a_file_or_an_outside_symlink");
    let lower = [file("x", b"lower"), end()].concat();
    let upper = [file("x/.wh..wh..opq", b""), end()].concat();
    let out = case.convert_layers(&[layer(&lower, TAR), layer(&upper, TAR)], &[]);
    out.error(&["\"x/.wh..wh..opq\"", "Not a directory"]);

    let target = case.outside().to_string_lossy().into_owned();
    let lower = [entry(b'2', "out", &target), end()].concat();
    let upper = [file("out/.wh..wh..opq", b""), end()].concat();
    let out = case.convert_layers(&[layer(&lower, TAR), layer(&upper, TAR)], &[]);
    out.error(&["\"out/.wh..wh..opq\"", "symlink to a missing directory"]);
    out.assert_peak_under(64 * MIB);
}

// ---------------------------------------------------------------------------
// Manifests and archives

/// A `docker save` manifest.json naming files outside the archive: they
/// are looked up in the archive only, never on the host.
#[test]
fn docker_save_manifest_pointing_outside_the_tar() {
    let case = Case::new("docker_save_manifest_pointing_outside_the_tar");
    let secret = case.outside().join("victim");
    let tar = [file("f", b"x"), end()].concat();
    let config = config_json(&[sha256(&tar)]);
    let archive = case.base.join("input/image.tar");
    let escape = format!("../../../../../../..{}", secret.display());
    docker_save(
        &archive,
        &[("config.json", &config), ("l1/layer.tar", &tar)],
        "config.json",
        &[&escape],
    );
    let out = case.convert(&archive, &[]);
    out.error(&["is not in the archive", "victim"]);

    let long = "../".repeat(100_000);
    docker_save(
        &archive,
        &[("config.json", &config), ("l1/layer.tar", &tar)],
        &long,
        &["l1/layer.tar"],
    );
    let out = case.convert(&archive, &[]);
    out.error(&["has no file", "(300000 bytes)"]);
    out.assert_peak_under(64 * MIB);
}

/// JSON is read with a bound before it is parsed, and the number of layers
/// is bounded, in layouts and in `docker save` tars; the tar's own headers
/// are as bounded as a layer's.
#[test]
fn image_json_and_archive_headers_are_bounded() {
    let case = Case::new("image_json_and_archive_headers_are_bounded");
    let big = vec![b' '; (5 * MIB) as usize];

    // index.json of 5 MiB.
    let tar = [file("f", b"x"), end()].concat();
    layout(&case.input(), &[layer(&tar, TAR)]);
    fs::write(case.input().join("index.json"), &big).unwrap();
    let out = case.convert(&case.input(), &[]);
    out.error(&["index.json", "larger than 4 MiB"]);

    // 300 layers.
    fs::remove_dir_all(case.input()).unwrap();
    fs::create_dir(case.input()).unwrap();
    let layers: Vec<Layer> = (0..300).map(|_| layer(&tar, TAR)).collect();
    let out = case.convert_layers(&layers, &[]);
    out.error(&["300 layers: more than the 256 kiln allows"]);

    // docker save: a 5 MiB manifest.json, then a 1 GiB long name header.
    let archive = case.base.join("input/image.tar");
    let config = config_json(&[sha256(&tar)]);
    {
        let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_path("manifest.json").unwrap();
        h.set_size(big.len() as u64);
        h.set_cksum();
        b.append(&h, &big[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_path("config.json").unwrap();
        h.set_size(config.len() as u64);
        h.set_cksum();
        b.append(&h, &config[..]).unwrap();
        b.finish().unwrap();
    }
    let out = case.convert(&archive, &[]);
    out.error(&["manifest.json", "larger than 4 MiB"]);

    let mut f = fs::File::create(&archive).unwrap();
    f.write_all(&block(&header(b'L', b"././@LongLink", GIB)))
        .unwrap();
    f.write_all(&vec![b'a'; MIB as usize]).unwrap();
    drop(f);
    let out = case.convert(&archive, &[]);
    out.error(&[
        "not a readable image tar",
        "GNU long name",
        "(1073741824 bytes)",
    ]);
    out.assert_peak_under(64 * MIB);
}

// ---------------------------------------------------------------------------
// Registries

/// A registry on 127.0.0.1 (a free port) that answers `GET path` with
/// `routes[path]`, sent chunked (no `Content-Length`, so only the client's
/// own bound stops it), and counts blob requests.
fn fake_registry(routes: Vec<(String, Vec<u8>)>) -> (u16, std::sync::Arc<AtomicUsize>) {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let blobs = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = blobs.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).map(|n| n == 0).unwrap_or(true) || line == "\r\n" {
                    break;
                }
            }
            let mut parts = request.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if path.contains("/blobs/") {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            let _ = match routes.iter().find(|(p, _)| p == path) {
                Some((_, body)) => {
                    let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
                    if method != "HEAD" {
                        for chunk in body.chunks(64 << 10) {
                            out.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
                            out.extend(chunk);
                            out.extend(b"\r\n");
                        }
                        out.extend(b"0\r\n\r\n");
                    }
                    conn.write_all(&out)
                }
                None => conn.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ),
            };
        }
    });
    (port, blobs)
}

fn manifest_json(config: (&str, u64), layers: &[(String, u64)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(d, s)| serde_json::json!({"mediaType": TAR_GZ, "digest": d, "size": s}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config.0, "size": config.1},
        "layers": layers,
    }))
    .unwrap()
}

/// From a registry: a manifest bigger than 4 MiB (sent without a length),
/// a config whose descriptor says 5 MiB, and an image of 300 layers are all
/// refused before anything else is fetched or recorded.
#[test]
fn registry_json_and_layer_count_are_bounded() {
    let case = Case::new("registry_json_and_layer_count_are_bounded");
    let env = |dir: &Path| -> Vec<(String, String)> {
        vec![("DOCKER_CONFIG".into(), dir.display().to_string())]
    };
    let docker_config = case.base.join("input");
    let env_owned = env(&docker_config);
    let env: Vec<(&str, &str)> = env_owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let assert_nothing_recorded = || {
        assert!(names(&case.cache().join("images")).is_empty());
    };

    let big = vec![b' '; (5 * MIB) as usize];
    let (port, blobs) = fake_registry(vec![("/v2/hostile/manifests/v1".into(), big)]);
    let image = PathBuf::from(format!("127.0.0.1:{port}/hostile:v1"));
    let out = case.convert(&image, &env);
    out.error(&["manifest v1", "larger than the 4194304 bytes allowed"]);
    assert_eq!(blobs.load(Ordering::SeqCst), 0);
    assert_nothing_recorded();

    let config = config_json(&[some_diff_id()]);
    let manifest = manifest_json((&sha256(&config), 5 * MIB), &[(some_diff_id(), 100)]);
    let (port, blobs) = fake_registry(vec![("/v2/hostile/manifests/v1".into(), manifest)]);
    let image = PathBuf::from(format!("127.0.0.1:{port}/hostile:v1"));
    let out = case.convert(&image, &env);
    out.error(&["config", "5242880 bytes is more than the 4 MiB allowed"]);
    assert_eq!(blobs.load(Ordering::SeqCst), 0);
    assert_nothing_recorded();

    let layers: Vec<(String, u64)> = (0..300).map(|i| (sha256(&[i as u8, 1]), 100)).collect();
    let diff_ids: Vec<String> = (0..300).map(|i| sha256(&[i as u8, 2])).collect();
    let config = config_json(&diff_ids);
    let manifest = manifest_json((&sha256(&config), config.len() as u64), &layers);
    let (port, blobs) = fake_registry(vec![
        ("/v2/hostile/manifests/v1".into(), manifest),
        (format!("/v2/hostile/blobs/{}", sha256(&config)), config),
    ]);
    let image = PathBuf::from(format!("127.0.0.1:{port}/hostile:v1"));
    let out = case.convert(&image, &env);
    out.error(&["300 layers: more than the 256 kiln allows"]);
    assert_eq!(blobs.load(Ordering::SeqCst), 0, "no blob is fetched");
    assert_nothing_recorded();
    out.assert_peak_under(64 * MIB);
}
