//! The guest's initramfs: the agent as `/init` plus the kernel modules it
//! loads, as an uncompressed cpio "newc" archive (every kernel reads it, and
//! it costs no decompression at boot). Built once per (agent, kernel) pair
//! and cached under its content hash.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cache::{sha256_hex, Cache};
use crate::kernel::Kernel;
use crate::ImageError;

/// Writer for the cpio "newc" format (`070701`), as the kernel's
/// `Documentation/driver-api/early-userspace/buffer-format.rst` describes.
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> std::io::Result<()> {
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        let mut h = String::with_capacity(110);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> std::io::Result<()> {
        self.header(name, 0o040000 | perm, 0, (0, 0))
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> std::io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "file over 4 GiB")
        })?;
        self.header(name, 0o100000 | perm, size, (0, 0))?;
        self.put(data)?;
        self.pad()
    }

    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> std::io::Result<()> {
        self.header(name, 0o020000 | perm, 0, (major, minor))
    }

    /// Write the trailer and return the inner writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Build (or find in the cache) the initramfs for `agent` and `kernel`.
pub fn build_initramfs(
    cache: &Cache,
    agent: &Path,
    kernel: &Kernel,
) -> Result<PathBuf, ImageError> {
    let agent_bytes = std::fs::read(agent).map_err(|e| ImageError::io("read agent", agent, e))?;
    let mut modules = Vec::new();
    for m in &kernel.modules {
        let name = m
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let bytes = std::fs::read(m).map_err(|e| ImageError::io("read module", m, e))?;
        modules.push((name, bytes));
    }
    let mut parts: Vec<&[u8]> = vec![b"kiln-initramfs-v1", &agent_bytes];
    for (n, b) in &modules {
        parts.push(n.as_bytes());
        parts.push(b);
    }
    let key = sha256_hex(&parts);
    let dest = cache.dir("initramfs").join(format!("{}.cpio", &key[..32]));
    if dest.exists() {
        return Ok(dest);
    }
    let tmp = cache.temp_dir("initramfs")?;
    let path = tmp.path().join("initramfs.cpio");
    let file = std::fs::File::create(&path).map_err(|e| ImageError::io("create", &path, e))?;
    let write = || -> std::io::Result<()> {
        let mut w = CpioWriter::new(std::io::BufWriter::new(file));
        for d in [
            "dev",
            "proc",
            "sys",
            "lower",
            "scratch",
            "newroot",
            "lib",
            "lib/modules",
            "lib/modules/kiln",
        ] {
            w.dir(d, 0o755)?;
        }
        // The kernel opens /dev/console for init before devtmpfs is mounted.
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.file("init", 0o755, &agent_bytes)?;
        let order: String = modules.iter().map(|(n, _)| format!("{n}\n")).collect();
        w.file("lib/modules/kiln/order", 0o644, order.as_bytes())?;
        for (n, b) in &modules {
            w.file(&format!("lib/modules/kiln/{n}"), 0o644, b)?;
        }
        w.finish()?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
    };
    write().map_err(|e| ImageError::io("write initramfs", &path, e))?;
    tmp.publish(&path, &dest)?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_read_back_by_gnu_cpio() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = CpioWriter::new(Vec::new());
        w.dir("d", 0o755).unwrap();
        w.file("d/f", 0o644, b"hello\n").unwrap();
        w.file("odd", 0o600, b"12345").unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let cpio = dir.path().join("x.cpio");
        std::fs::write(&cpio, &bytes).unwrap();
        if !kiln_testkit::require("cpio", &[kiln_testkit::tool("cpio", "cpio")]) {
            return;
        }
        let out = std::process::Command::new("cpio")
            .args(["-i", "-d", "--quiet", "-F"])
            .arg(&cpio)
            .current_dir(dir.path())
            .output();
        match out {
            Err(e) => panic!("cpio(1) did not run: {e}"),
            Ok(o) => {
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                assert_eq!(std::fs::read(dir.path().join("d/f")).unwrap(), b"hello\n");
                assert_eq!(std::fs::read(dir.path().join("odd")).unwrap(), b"12345");
            }
        }
    }

    #[test]
    fn header_fields_are_hex_and_names_nul_terminated() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("init", 0o755, b"x").unwrap();
        let b = w.finish().unwrap();
        assert_eq!(&b[..6], b"070701");
        let mode = u32::from_str_radix(std::str::from_utf8(&b[14..22]).unwrap(), 16).unwrap();
        assert_eq!(mode, 0o100755);
        assert_eq!(&b[110..115], b"init\0");
    }
}
