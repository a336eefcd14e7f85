//! Build the test images as OCI layouts, for the README demo and by hand:
//!
//! ```text
//! kiln-fixture busybox DIR     # busybox-static, ~1 MB, instant
//! kiln-fixture debian DIR      # Debian minbase from debootstrap (~30 s, needs the apt mirror)
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (kind, dir) = match args.as_slice() {
        [k, d] => (k.as_str(), PathBuf::from(d)),
        _ => {
            eprintln!("usage: kiln-fixture busybox|debian DIR");
            return ExitCode::from(2);
        }
    };
    if dir.join("oci-layout").exists() {
        eprintln!("{} already holds an image; leaving it", dir.display());
        return ExitCode::SUCCESS;
    }
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let built = match kind {
        "busybox" => kiln_tests::fixtures::BusyboxImage::default().build(&tmp),
        "debian" => kiln_tests::fixtures::debian_minbase(&tmp, "bookworm"),
        other => {
            eprintln!("unknown fixture '{other}' (busybox or debian)");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = built.and_then(|()| std::fs::rename(&tmp, &dir).map_err(Into::into)) {
        let _ = std::fs::remove_dir_all(&tmp);
        eprintln!("kiln-fixture: {e:#}");
        return ExitCode::from(1);
    }
    println!("{}", dir.display());
    ExitCode::SUCCESS
}
