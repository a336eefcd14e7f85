//! Early boot: the API filesystems, the kernel modules, the kernel command
//! line, and waiting for devices to appear.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::mount::MountFlags;

use super::error::{Error, Result};
use super::sys::mount;

/// Where the initramfs keeps the modules and their load order.
const MODULES: &str = "/lib/modules/kiln";

/// devtmpfs on `/dev`, proc and sysfs.
pub fn mount_early() -> Result<()> {
    let api = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MountFlags::NOSUID,
        c"mode=0755",
    )?;
    mount("proc", "/proc", "proc", api, c"")?;
    mount("sysfs", "/sys", "sysfs", api, c"")?;
    Ok(())
}

/// Load `/lib/modules/kiln/*.ko` in the order `/lib/modules/kiln/order` gives
/// (dependencies first, computed on the host when the initramfs was built).
pub fn load_modules() -> Result<()> {
    let order = match std::fs::read_to_string(format!("{MODULES}/order")) {
        Ok(o) => o,
        Err(_) => return Ok(()), // a kernel with everything built in
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("{MODULES}/{name}");
        let f = File::open(&path).map_err(|e| Error::OpenModule {
            path: path.clone(),
            source: e,
        })?;
        match rustix::system::finit_module(&f, c"", 0) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => {
                return Err(Error::LoadModule {
                    name: name.into(),
                    source: e.into(),
                })
            }
        }
    }
    Ok(())
}

/// The kernel command line (empty if unreadable).
pub fn cmdline() -> String {
    std::fs::read_to_string("/proc/cmdline").unwrap_or_default()
}

/// The value of `key=value` on the kernel command line.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Poll `f` until it finds something, for at most `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            return Err(Error::NotFound {
                what: what.into(),
                limit,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The `/dev` node of the device under `sys_dir` (`/sys/block`,
/// `/sys/class/virtio-ports`) whose attribute file `attr` reads `value`.
pub fn find_device(sys_dir: &str, attr: &str, value: &str) -> Option<String> {
    for e in std::fs::read_dir(sys_dir).ok()?.flatten() {
        let found = std::fs::read_to_string(e.path().join(attr)).unwrap_or_default();
        if found.trim() == value {
            let dev = format!("/dev/{}", e.file_name().to_string_lossy());
            if Path::new(&dev).exists() {
                return Some(dev);
            }
        }
    }
    None
}

/// Guest uptime in milliseconds, from `/proc/uptime` (0 if unreadable).
pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

/// The guest kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_values() {
        let c = "quiet kiln.rootfstype=erofs kiln.scratch=none";
        assert_eq!(cmdline_value(c, "kiln.rootfstype"), Some("erofs"));
        assert_eq!(cmdline_value(c, "kiln.scratch"), Some("none"));
        assert_eq!(cmdline_value(c, "kiln.x"), Option::None);
    }
}
