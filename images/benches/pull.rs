//! Cold pull-to-rootfs of a Debian minbase image from a local registry,
//! against `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d` in the same run,
//! and the warm (cached) time.
//!
//! `cargo bench -p kiln-images --bench pull`. The debootstrap tree is built
//! once and kept as an OCI layout under `target/bench-images/`
//! (`$KILN_DEBIAN_MIRROR` picks the mirror).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_images::rootfs::{rootfs_for, ImageSource};
use kiln_images::Cache;

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
    if let Some(why) = common::skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    for tool in ["umoci", "debootstrap", "mkfs.ext4"] {
        if Command::new("which")
            .arg(tool)
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("SKIPPED: {tool} is not installed");
            return;
        }
    }
    let layout = debian_layout();
    let reg = common::TestRegistry::start();
    reg.push(
        &format!("oci:{}:bookworm", layout.display()),
        "bench/debian:bookworm",
        &[],
    );
    let reference = format!("{}/bench/debian:bookworm", reg.host());
    let rounds = 3;

    // Baseline: skopeo copy + umoci unpack + mkfs.ext4 -d.
    let baseline = best(rounds, || {
        let w = tempfile::tempdir().unwrap();
        let oci = w.path().join("oci");
        run(Command::new("skopeo")
            .args(["copy", "-q", "--src-tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .arg(format!("oci:{}:t", oci.display())));
        let bundle = w.path().join("bundle");
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:t", oci.display()))
            .arg(&bundle));
        kiln_images::rootfs::make_ext4(&bundle.join("rootfs"), &w.path().join("r.ext4")).unwrap();
    });

    // kiln, cold: a fresh cache every round.
    let mut fstype = String::new();
    let cold = best(rounds, || {
        let w = tempfile::tempdir().unwrap();
        let cache = Cache::open(w.path()).unwrap();
        let r = rootfs_for(&cache, &ImageSource::parse(&reference).unwrap()).unwrap();
        fstype = r.fstype;
    });

    // kiln, warm: the same cache, image already pulled and built.
    let w = tempfile::tempdir().unwrap();
    let cache = Cache::open(w.path()).unwrap();
    let src = ImageSource::parse(&reference).unwrap();
    rootfs_for(&cache, &src).unwrap();
    let warm = best(20, || rootfs_for(&cache, &src).unwrap());

    let ratio = cold.as_secs_f64() / baseline.as_secs_f64();
    println!(
        "image: Debian bookworm minbase, 1 gzip layer, local docker-registry; best of {rounds}"
    );
    println!(
        "baseline skopeo copy + umoci unpack + mkfs.ext4 -d: {:>8.3} s",
        baseline.as_secs_f64()
    );
    println!(
        "kiln cold pull → {fstype} rootfs:                      {:>8.3} s",
        cold.as_secs_f64()
    );
    println!(
        "ratio kiln/baseline: {ratio:.2}× (target ≤ 0.60×) {}",
        if ratio <= 0.6 { "OK" } else { "MISSED" }
    );
    println!(
        "kiln warm (cached):  {:.1} ms (target ≤ 50 ms) {}",
        warm.as_secs_f64() * 1e3,
        if warm <= Duration::from_millis(50) {
            "OK"
        } else {
            "MISSED"
        }
    );
}
