//! ext4 images made with the distribution's `mkfs.ext4`: the per-VM scratch
//! disk (overlay upper layer), a job's workspace disk, and ext4 root
//! filesystems. All are journal-less (disposable or read-only) and sparse.

use std::path::Path;
use std::process::Command;

use crate::ImageError;

/// What to put in a new ext4 image.
#[derive(Debug, Clone, Copy)]
pub struct Ext4<'a> {
    /// Volume label (`kiln-root`, `kiln-scratch`, `kiln-work`).
    pub label: &'a str,
    /// Size of the (sparse) image file in bytes.
    pub size: u64,
    /// Copy this directory's contents in (`mkfs.ext4 -d`).
    pub from: Option<&'a Path>,
    /// Number of inodes (`-N`); `None` lets mkfs decide.
    pub inodes: Option<u64>,
    /// Initialise inode tables now (images that are read a lot, e.g. a
    /// rootfs) rather than lazily in the guest.
    pub eager: bool,
}

/// Create `out` (replacing any file there) as an ext4 image.
pub fn mkfs_ext4(out: &Path, spec: &Ext4<'_>) -> Result<(), ImageError> {
    let _ = std::fs::remove_file(out);
    let f = std::fs::File::create(out).map_err(|e| ImageError::io("create", out, e))?;
    f.set_len(spec.size)
        .map_err(|e| ImageError::io("size", out, e))?;
    drop(f);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args([
        "-q",
        "-F",
        "-t",
        "ext4",
        "-O",
        "^has_journal",
        "-m",
        "0",
        "-L",
        spec.label,
    ]);
    cmd.arg("-E").arg(if spec.eager {
        "root_owner=0:0,lazy_itable_init=0,nodiscard"
    } else {
        "lazy_itable_init=1,nodiscard"
    });
    if let Some(n) = spec.inodes {
        cmd.arg("-N").arg(n.to_string());
    }
    if let Some(dir) = spec.from {
        cmd.arg("-d").arg(dir);
    }
    let o = cmd.arg(out).output().map_err(|e| ImageError::Tool {
        tool: "mkfs.ext4".into(),
        detail: e.to_string(),
        hint: "install e2fsprogs (apt-get install e2fsprogs)".into(),
    })?;
    if !o.status.success() {
        let _ = std::fs::remove_file(out);
        return Err(ImageError::Tool {
            tool: format!("mkfs.ext4 ({})", spec.label),
            detail: String::from_utf8_lossy(&o.stderr).trim().into(),
            hint: String::new(),
        });
    }
    Ok(())
}

/// Create the per-VM scratch disk: an empty sparse ext4 of `size` bytes at
/// `path` (which must not exist).
pub fn create_scratch(path: &Path, size: u64) -> Result<(), ImageError> {
    if path.exists() {
        return Err(ImageError::io(
            "create scratch disk",
            path,
            std::io::ErrorKind::AlreadyExists.into(),
        ));
    }
    mkfs_ext4(
        path,
        &Ext4 {
            label: kiln_agent::proto::SCRATCH_DISK_SERIAL,
            size,
            from: None,
            inodes: None,
            eager: false,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_disk_is_sparse_ext4() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.img");
        if !kiln_testkit::require("scratch", &[kiln_testkit::tool("mkfs.ext4", "e2fsprogs")]) {
            return;
        }
        create_scratch(&p, 1 << 30).unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 1 << 30);
        assert!(
            m.blocks() * 512 < 64 << 20,
            "not sparse: {} blocks",
            m.blocks()
        );
        let sb = std::fs::read(&p).unwrap();
        assert_eq!(&sb[1080..1082], &[0x53, 0xef], "ext4 superblock magic");
        assert!(create_scratch(&p, 1 << 20).is_err(), "must not overwrite");
    }

    #[test]
    fn a_directory_is_copied_in_and_failures_leave_no_file() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("hello.txt"), b"hi").unwrap();
        let img = d.path().join("w.img");
        let spec = Ext4 {
            label: kiln_agent::proto::WORK_DISK_SERIAL,
            size: 64 << 20,
            from: Some(&src),
            inodes: None,
            eager: false,
        };
        if !kiln_testkit::require(
            "mkfs_ext4",
            &[
                kiln_testkit::tool("mkfs.ext4", "e2fsprogs"),
                kiln_testkit::tool("debugfs", "e2fsprogs"),
            ],
        ) {
            return;
        }
        mkfs_ext4(&img, &spec).unwrap();
        let o = Command::new("debugfs")
            .args(["-R", "cat /hello.txt"])
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(o.stdout, b"hi");
        // Too small for mkfs: an error, and nothing half-made left behind.
        let tiny = d.path().join("tiny.img");
        assert!(mkfs_ext4(&tiny, &Ext4 { size: 4096, ..spec }).is_err());
        assert!(!tiny.exists());
    }
}
