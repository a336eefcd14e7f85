//! Thin wrappers over the kernel interfaces the agent uses (through
//! `rustix`), with the agent's errors.

use std::ffi::CStr;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use rustix::fs::{AtFlags, Gid, Uid, CWD};
use rustix::mount::MountFlags;

use super::error::{Error, Result};

/// `mount(2)`, creating `target` first if it is missing.
pub fn mount(src: &str, target: &str, fstype: &str, flags: MountFlags, data: &CStr) -> Result<()> {
    let _ = std::fs::create_dir_all(target);
    rustix::mount::mount(src, target, fstype, flags, data).map_err(|e| Error::Mount {
        src: src.into(),
        target: target.into(),
        fstype: fstype.into(),
        source: e.into(),
    })
}

pub fn set_mode(path: &str, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
        Error::Chmod {
            path: path.into(),
            source: e,
        }
    })
}

/// Give `path` (not following a final symlink) to `uid:gid`, as far as
/// possible: a failure leaves it root's, which the job then finds.
pub fn chown_nofollow(path: &str, uid: u32, gid: u32) {
    let _ = rustix::fs::chownat(
        CWD,
        path,
        Some(Uid::from_raw_unchecked(uid)),
        Some(Gid::from_raw_unchecked(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    );
}

/// A line in the kernel log (the VM's serial console), at error level.
pub fn kmsg(msg: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = writeln!(f, "<3>kiln-agent: {msg}");
    }
}

/// Flush every filesystem.
pub fn sync() {
    rustix::fs::sync();
}

/// End the VM: `reboot(2)` with `LINUX_REBOOT_CMD_RESTART` (`reboot=k` ->
/// i8042 reset, or QEMU's `-no-reboot`). Returns only on error, e.g. when
/// the agent is not PID 1.
pub fn reboot() {
    let _ = rustix::system::reboot(rustix::system::RebootCommand::Restart);
}

pub fn sethostname(name: &str) {
    let _ = rustix::system::sethostname(name.as_bytes());
}
