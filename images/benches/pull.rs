//! Cold pull-to-rootfs of a Debian minbase image from a local registry,
//! against `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d` in the same run,
//! and the warm (cached) time.
//!
//! `cargo bench -p kiln-images --bench pull`. The debootstrap tree is built
//! once and kept as an OCI layout under `target/bench-images/`
//! (`$KILN_DEBIAN_MIRROR` picks the mirror). The baseline unpacks with
//! `umoci raw unpack` (no mtree manifest, which kiln does not build either).
//!
//! `cargo test -p kiln-images --bench pull -- --smoke` (CI) runs one round
//! on a small busybox image, so the bench keeps working.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_images::{ImageError, ImageSource, Images, ImagesOptions, NoProgress, Rootfs};

/// Root filesystems the way the executor gets them: one service (one
/// registry client) over a cache, on a runtime.
struct Kiln {
    rt: tokio::runtime::Runtime,
    images: Images,
}

impl Kiln {
    fn open(cache_dir: &Path) -> Kiln {
        let options = ImagesOptions::from_vars(|k| std::env::var_os(k));
        Kiln {
            rt: tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap(),
            images: Images::open(cache_dir, options).unwrap(),
        }
    }

    fn rootfs(&self, src: &ImageSource) -> Result<Rootfs, ImageError> {
        self.rt
            .block_on(self.images.rootfs(src, std::sync::Arc::new(NoProgress)))
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn run(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The Debian minbase layout (one gzip layer), built once.
fn debian_layout() -> PathBuf {
    let dir = target_dir().join("bench-images/debian-minbase");
    if dir.join("index.json").is_file() {
        return dir;
    }
    let tree = target_dir().join("bench-images/debootstrap");
    let _ = std::fs::remove_dir_all(&tree);
    let mirror = std::env::var("KILN_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    eprintln!("building the Debian minbase image with debootstrap from {mirror} (once)…");
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&tree)
        .arg(&mirror));
    let _ = std::fs::remove_dir_all(tree.join("var/cache/apt/archives"));
    let o = Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-C"])
        .arg(&tree)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(o.status.success());
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    common::single_layout(
        &tmp,
        &[o.stdout],
        common::Comp::Gzip,
        &["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "bookworm",
    );
    std::fs::rename(&tmp, &dir).unwrap();
    let _ = std::fs::remove_dir_all(&tree);
    dir
}

/// A ≥ 1 GB image: the minbase layer plus a 1.1 GiB layer of 1,100 files of
/// about 2:1 compressible data (like a toolchain), built once.
fn large_layout(minbase: &Path) -> PathBuf {
    use std::io::Read;
    let dir = target_dir().join("bench-images/debian-large");
    if dir.join("index.json").is_file() {
        return dir;
    }
    eprintln!("building the 1.1 GiB image (once)…");
    // The minbase layer's tar, from its (gzip) blob.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(minbase.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| {
        minbase
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let gz = std::fs::read(blob(manifest["layers"][0]["digest"].as_str().unwrap())).unwrap();
    let mut base = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut base)
        .unwrap();
    // The big layer: half random 64-byte chunks, half repeated text.
    let mut big = tar::Builder::new(Vec::with_capacity(1200 << 20));
    let mut x: u64 = 0x2545f4914f6cdd1d;
    let mut data = vec![0u8; 1 << 20];
    for i in 0..1100u32 {
        for (c, chunk) in data.chunks_mut(64).enumerate() {
            if c % 2 == 0 {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            } else {
                let line =
                    format!("file {i:05} chunk {c:06} of a large CI image......................");
                chunk.copy_from_slice(&line.as_bytes()[..64]);
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_path(format!("opt/big/{:02}/{i:05}.bin", i % 50))
            .unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        big.append(&h, data.as_slice()).unwrap();
    }
    let big = big.into_inner().unwrap();
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    common::single_layout(
        &tmp,
        &[base, big],
        common::Comp::Gzip,
        &["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "large",
    );
    std::fs::rename(&tmp, &dir).unwrap();
    dir
}

fn best<T>(n: usize, mut f: impl FnMut() -> T) -> Duration {
    (0..n)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed()
        })
        .min()
        .unwrap()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let smoke = std::env::args().any(|a| a == "--smoke");
    let mut needs = common::tools().to_vec();
    needs.push(kiln_testkit::tool("umoci", "umoci"));
    needs.push(kiln_testkit::tool("mkfs.ext4", "e2fsprogs"));
    if !smoke {
        needs.push(kiln_testkit::tool("debootstrap", "debootstrap"));
    }
    if !kiln_testkit::require("pull", &needs) {
        return;
    }
    let reg = common::TestRegistry::start();
    if smoke {
        let w = tempfile::tempdir().unwrap();
        let base = common::layer_tar(true, &[]);
        let extra = common::layer_tar(false, &[("etc/smoke.txt", b"smoke\n")]);
        common::single_layout(w.path(), &[base, extra], common::Comp::Gzip, &[], "t");
        reg.push(
            &format!("oci:{}:t", w.path().display()),
            "bench/busybox:smoke",
            &[],
        );
        compare(
            &reg,
            "bench/busybox:smoke",
            "busybox, 2 gzip layers (smoke)",
            1,
            1,
        );
        return;
    }
    let layout = debian_layout();
    reg.push(
        &format!("oci:{}:bookworm", layout.display()),
        "bench/debian:bookworm",
        &[],
    );
    compare(
        &reg,
        "bench/debian:bookworm",
        "Debian bookworm minbase, 1 gzip layer",
        3,
        20,
    );
    if std::env::args().any(|a| a == "--skip-large") {
        return;
    }
    let large = large_layout(&layout);
    reg.push(
        &format!("oci:{}:large", large.display()),
        "bench/debian:large",
        &[],
    );
    compare(
        &reg,
        "bench/debian:large",
        "minbase + a 1.1 GiB layer (2 gzip layers)",
        1,
        20,
    );
}

/// Cold pull→rootfs against skopeo + umoci + mkfs.ext4 in the same run,
/// then a warm (cached) pull; prints the ratio.
fn compare(reg: &common::TestRegistry, name: &str, what: &str, rounds: usize, warm_rounds: usize) {
    let reference = format!("{}/{name}", reg.host());

    // Baseline: skopeo copy + umoci unpack + mkfs.ext4 -d.
    let baseline = best(rounds, || {
        let w = tempfile::tempdir().unwrap();
        let oci = w.path().join("oci");
        run(Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:t", oci.display())));
        let rootfs = w.path().join("rootfs");
        run(Command::new("umoci")
            .args(["raw", "unpack", "--image"])
            .arg(format!("{}:t", oci.display()))
            .arg(&rootfs));
        kiln_images::rootfs::make_ext4(&rootfs, &w.path().join("r.ext4")).unwrap();
    });

    // kiln, cold: a fresh cache every round.
    let mut fstype = String::new();
    let cold = best(rounds, || {
        let w = tempfile::tempdir().unwrap();
        let kiln = Kiln::open(w.path());
        let r = kiln
            .rootfs(&ImageSource::parse(&reference).unwrap())
            .unwrap();
        fstype = r.fstype;
    });

    // kiln, warm: the same cache, image already pulled and built.
    let w = tempfile::tempdir().unwrap();
    let kiln = Kiln::open(w.path());
    let src = ImageSource::parse(&reference).unwrap();
    kiln.rootfs(&src).unwrap();
    let warm = best(warm_rounds, || kiln.rootfs(&src).unwrap());

    let ratio = cold.as_secs_f64() / baseline.as_secs_f64();
    if what.contains("smoke") {
        println!(
            "smoke run (one round, possibly a debug build): the figures are not a measurement"
        );
    }
    println!("image: {what}, local docker-registry; best of {rounds}");
    println!(
        "  baseline skopeo copy + umoci raw unpack + mkfs.ext4 -d: {:>8.3} s",
        baseline.as_secs_f64()
    );
    println!(
        "  kiln cold pull → {fstype} rootfs:                          {:>8.3} s",
        cold.as_secs_f64()
    );
    println!(
        "  ratio kiln/baseline: {ratio:.2}× (target ≤ 0.60×) {}",
        if ratio <= 0.6 { "OK" } else { "MISSED" }
    );
    println!(
        "  kiln warm (cached):  {:.1} ms (target ≤ 50 ms) {}",
        warm.as_secs_f64() * 1e3,
        if warm <= Duration::from_millis(50) {
            "OK"
        } else {
            "MISSED"
        }
    );
}
