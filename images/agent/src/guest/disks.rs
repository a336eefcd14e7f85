//! The job's root filesystem: the image's disk read-only under an overlay
//! whose upper layer is the scratch disk, the API filesystems inside it, and
//! the optional workspace disk. Disks are found by serial
//! (`kiln_agent::proto::*_DISK_SERIAL`).

use rustix::mount::MountFlags;

use kiln_agent::proto::{
    CMDLINE_ROOTFSTYPE, CMDLINE_SCRATCH, CMDLINE_WORKDIR, DEFAULT_ROOTFSTYPE, ROOT_DISK_SERIAL,
    SCRATCH_DISK_SERIAL, SCRATCH_NONE, WORK_DISK_SERIAL,
};

use super::boot::{cmdline_value, find_device, wait_for};
use super::error::{Error, Result};
use super::sys::{mount, set_mode};
use super::{DEVICE_WAIT, NEWROOT, SCRIPT_DIR};

/// The block device whose virtio serial is `serial`, if it is there yet.
fn find_disk(serial: &str) -> Option<String> {
    find_device("/sys/block", "serial", serial)
}

/// Wait for the disk with serial `serial`.
pub(super) fn wait_for_disk(serial: &str, what: &str) -> Result<String> {
    wait_for(
        DEVICE_WAIT,
        &format!("the {what} disk (serial {serial})"),
        || find_disk(serial),
    )
}

/// Root filesystem: the image read-only, an overlay whose upper layer is on
/// the scratch disk (or a tmpfs without one), and the API filesystems.
pub fn mount_root(cmdline: &str) -> Result<()> {
    let fstype = cmdline_value(cmdline, CMDLINE_ROOTFSTYPE).unwrap_or(DEFAULT_ROOTFSTYPE);
    let root = wait_for_disk(ROOT_DISK_SERIAL, "root")?;
    mount(&root, "/lower", fstype, MountFlags::RDONLY, c"")?;
    match find_disk(SCRATCH_DISK_SERIAL) {
        Some(dev) => mount(&dev, "/scratch", "ext4", MountFlags::NOATIME, c"")?,
        None if cmdline_value(cmdline, CMDLINE_SCRATCH) == Some(SCRATCH_NONE) => mount(
            "tmpfs",
            "/scratch",
            "tmpfs",
            MountFlags::empty(),
            c"mode=0755",
        )?,
        None => {
            let dev = wait_for_disk(SCRATCH_DISK_SERIAL, "scratch")?;
            mount(&dev, "/scratch", "ext4", MountFlags::NOATIME, c"")?
        }
    }
    for d in ["/scratch/upper", "/scratch/work"] {
        std::fs::create_dir_all(d).map_err(|e| Error::Mkdir {
            path: d.into(),
            source: e,
        })?;
    }
    mount(
        "overlay",
        NEWROOT,
        "overlay",
        MountFlags::empty(),
        c"lowerdir=/lower,upperdir=/scratch/upper,workdir=/scratch/work",
    )?;
    mount_api(NEWROOT)?;
    let tmpfs = MountFlags::NOSUID | MountFlags::NODEV;
    mount(
        "tmpfs",
        &format!("{NEWROOT}{SCRIPT_DIR}"),
        "tmpfs",
        tmpfs,
        c"mode=0755",
    )?;
    mount_workspace(cmdline)
}

/// The API filesystems inside `root` (the job's, or a service's): proc,
/// sysfs (read-only), devtmpfs, devpts, `/dev/shm`; and `/tmp` (in the
/// overlay) open to everyone.
pub(super) fn mount_api(root: &str) -> Result<()> {
    let r = |p: &str| format!("{root}{p}");
    let api = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount("proc", &r("/proc"), "proc", api, c"")?;
    mount("sysfs", &r("/sys"), "sysfs", api | MountFlags::RDONLY, c"")?;
    mount(
        "devtmpfs",
        &r("/dev"),
        "devtmpfs",
        MountFlags::NOSUID,
        c"mode=0755",
    )?;
    mount(
        "devpts",
        &r("/dev/pts"),
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        c"newinstance,ptmxmode=0666,mode=0620",
    )?;
    let tmpfs = MountFlags::NOSUID | MountFlags::NODEV;
    mount("tmpfs", &r("/dev/shm"), "tmpfs", tmpfs, c"mode=1777")?;
    let _ = std::fs::create_dir_all(r("/tmp"));
    let _ = set_mode(&r("/tmp"), 0o1777);
    Ok(())
}

/// The job's workspace: when the host attached a disk with serial
/// `kiln-work` (an ext4 image built from a host directory, e.g. a git
/// checkout) and named its mount point with `kiln.workdir=<abs path>`, mount
/// it read-write there, inside the job's root. Artifacts go back over the
/// console, never by reading this disk.
fn mount_workspace(cmdline: &str) -> Result<()> {
    let Some(workdir) = cmdline_value(cmdline, CMDLINE_WORKDIR) else {
        return Ok(());
    };
    if !workdir.starts_with('/') || workdir.split('/').any(|c| c == "..") {
        return Err(Error::BadWorkspace(workdir.into()));
    }
    let dev = wait_for_disk(WORK_DISK_SERIAL, "workspace")?;
    let target = format!("{NEWROOT}{workdir}");
    mount(&dev, &target, "ext4", MountFlags::NOATIME, c"")?;
    // mkfs.ext4 always creates lost+found; it is not part of the workspace.
    let _ = std::fs::remove_dir(format!("{target}/lost+found"));
    Ok(())
}
