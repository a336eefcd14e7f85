//! The per-VM scratch disk: a sparse ext4 file holding the overlay's upper
//! layer and the workspace. Created empty for every VM, deleted with it.

use std::path::Path;
use std::process::Command;

use crate::ImageError;

/// Create a sparse ext4 image of `size` bytes at `path` (must not exist).
pub fn create_scratch(path: &Path, size: u64) -> Result<(), ImageError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ImageError::io("create scratch disk", path, e))?;
    f.set_len(size)
        .map_err(|e| ImageError::io("size scratch disk", path, e))?;
    drop(f);
    let o = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-O",
            "^has_journal",
            "-m",
            "0",
            "-L",
            "kiln-scratch",
        ])
        .args(["-E", "lazy_itable_init=1,nodiscard"])
        .arg(path)
        .output()
        .map_err(|e| ImageError::Tool {
            tool: "mkfs.ext4".into(),
            detail: e.to_string(),
            hint: "install e2fsprogs (apt-get install e2fsprogs)".into(),
        })?;
    if !o.status.success() {
        return Err(ImageError::Tool {
            tool: "mkfs.ext4 (scratch disk)".into(),
            detail: String::from_utf8_lossy(&o.stderr).trim().into(),
            hint: String::new(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_disk_is_sparse_ext4() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.img");
        if let Err(e) = create_scratch(&p, 1 << 30) {
            eprintln!("skipping: {e}");
            return;
        }
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
}
