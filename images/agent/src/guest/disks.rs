//! The job's root filesystem: the image's disk read-only under an overlay
//! whose upper layer is the scratch disk, the API filesystems inside it, and
//! the optional workspace disk. Disks are found by serial
//! (`kiln_agent::proto::*_DISK_SERIAL`).

use rustix::mount::MountFlags;

use kiln_agent::proto::{
    Resume, CMDLINE_ROOTFSTYPE, CMDLINE_SCRATCH, CMDLINE_WORKDIR, DEFAULT_ROOTFSTYPE,
    ROOT_DISK_SERIAL, SCRATCH_DISK_SERIAL, SCRATCH_NONE, WORK_DISK_SERIAL,
};

use super::boot::{cmdline_value, find_device, wait_for};
use super::error::{Error, Result};
use super::sys::{mount, set_mode};
use super::{DEVICE_WAIT, NEWROOT, SCRIPT_DIR};

/// How the job's root is assembled: from the kernel command line on a
/// cold boot, from `Resume` after a restore (the snapshot's command line
/// is every job's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootPlan {
    pub fstype: String,
    /// Where the workspace disk goes; `None`: there is none.
    pub workdir: Option<String>,
    /// No scratch disk: the overlay's upper layer is a tmpfs.
    pub no_scratch: bool,
}

impl RootPlan {
    pub fn from_cmdline(cmdline: &str) -> RootPlan {
        RootPlan {
            fstype: cmdline_value(cmdline, CMDLINE_ROOTFSTYPE)
                .unwrap_or(DEFAULT_ROOTFSTYPE)
                .into(),
            workdir: cmdline_value(cmdline, CMDLINE_WORKDIR).map(String::from),
            no_scratch: cmdline_value(cmdline, CMDLINE_SCRATCH) == Some(SCRATCH_NONE),
        }
    }

    pub fn from_resume(r: &Resume) -> RootPlan {
        RootPlan {
            fstype: r.rootfstype.clone(),
            workdir: Some(r.workdir.clone()).filter(|w| !w.is_empty()),
            no_scratch: r.no_scratch,
        }
    }
}

/// The block device whose virtio serial is `serial`, if it is there yet
/// and not empty: after a restore a disk keeps the capacity 0 it was
/// probed with until the guest has handled the VMM's configuration-change
/// interrupt.
fn find_disk(serial: &str) -> Option<String> {
    let dev = find_device("/sys/block", "serial", serial)?;
    let name = dev.strip_prefix("/dev/")?;
    let size = std::fs::read_to_string(format!("/sys/block/{name}/size")).ok()?;
    has_sectors(&size).then_some(dev)
}

/// Whether a `/sys/block/*/size` reading is a non-empty disk.
fn has_sectors(size: &str) -> bool {
    size.trim().parse::<u64>().is_ok_and(|n| n > 0)
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
pub fn mount_root(plan: &RootPlan) -> Result<()> {
    let root = wait_for_disk(ROOT_DISK_SERIAL, "root")?;
    mount(&root, "/lower", &plan.fstype, MountFlags::RDONLY, c"")?;
    match find_disk(SCRATCH_DISK_SERIAL) {
        Some(dev) => mount(&dev, "/scratch", "ext4", MountFlags::NOATIME, c"")?,
        None if plan.no_scratch => mount(
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
    mount_workspace(plan.workdir.as_deref())
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
/// checkout) and named its mount point (`kiln.workdir=<abs path>`, or
/// `Resume::workdir`), mount it read-write there, inside the job's root.
/// Artifacts go back over the console, never by reading this disk.
fn mount_workspace(workdir: Option<&str>) -> Result<()> {
    let Some(workdir) = workdir else {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_from_the_command_line_or_a_resume() {
        let cold = RootPlan::from_cmdline("quiet kiln.rootfstype=erofs kiln.workdir=/b/x");
        let r = Resume {
            generation: 1,
            entropy: vec![0; 32],
            time_ns: 0,
            hostname: "kiln".into(),
            rootfstype: "erofs".into(),
            workdir: "/b/x".into(),
            no_scratch: false,
        };
        assert_eq!(RootPlan::from_resume(&r), cold);
        let bare = RootPlan::from_cmdline("quiet kiln.scratch=none");
        let r = Resume {
            rootfstype: "ext4".into(),
            workdir: String::new(),
            no_scratch: true,
            ..r
        };
        assert_eq!(RootPlan::from_resume(&r), bare);
        assert_eq!(bare.workdir, None);
    }

    #[test]
    fn an_empty_disk_is_not_there_yet() {
        assert!(has_sectors("2048\n"));
        assert!(!has_sectors("0\n"));
        assert!(!has_sectors(""));
        assert!(!has_sectors("-1"));
    }
}
