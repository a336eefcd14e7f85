//! The host <-> guest contract outside the frames: the names the host gives
//! the agent's port and disks, the kernel command-line keys the agent reads,
//! and the exit codes the agent gives a step it could not run. Both sides
//! take them from here; a change to any of them is a protocol change.

/// Bumped on every incompatible change (to the frames or to the names below).
pub const PROTOCOL_VERSION: u32 = 3;

/// Name of the virtio-console port the protocol is spoken on. The agent
/// finds it in `/sys/class/virtio-ports/*/name`.
pub const AGENT_PORT_NAME: &str = "org.kiln.agent.0";

/// Serial of the disk holding the image's root filesystem (read-only). The
/// agent finds disks by serial in `/sys/block/*/serial`; the host also uses
/// the serial as the label of the filesystem it makes for that disk.
pub const ROOT_DISK_SERIAL: &str = "kiln-root";
/// Serial of the per-VM scratch disk (ext4): the overlay's upper layer.
pub const SCRATCH_DISK_SERIAL: &str = "kiln-scratch";
/// Serial of the optional workspace disk (ext4), mounted at
/// [`CMDLINE_WORKDIR`].
pub const WORK_DISK_SERIAL: &str = "kiln-work";

/// Serial prefix of a service's root filesystem disk (read-only, the
/// image's, as [`ROOT_DISK_SERIAL`]): service `i` of `Start::services` is
/// on the disk with serial `kiln-svc-<i>` ([`service_disk_serial`]).
pub const SERVICE_DISK_SERIAL_PREFIX: &str = "kiln-svc-";
/// Most services one job may have (each is a disk of the VM).
pub const MAX_SERVICES: usize = 8;

/// The serial of service `index`'s disk.
pub fn service_disk_serial(index: u32) -> String {
    format!("{SERVICE_DISK_SERIAL_PREFIX}{index}")
}

/// Whether `name` may stand in `/etc/hosts` as a service alias: dot-separated
/// labels of ASCII letters, digits, `-` and `_` (Docker accepts the `__` of
/// gitlab-runner's derived aliases), each 1..=63 bytes and not starting or
/// ending with `-`, at most 253 bytes in all.
pub fn is_host_alias(name: &str) -> bool {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label)
}

/// Kernel command-line key (`kiln.rootfstype=erofs`): the root disk's
/// filesystem type; [`DEFAULT_ROOTFSTYPE`] when absent.
pub const CMDLINE_ROOTFSTYPE: &str = "kiln.rootfstype";
/// The root filesystem type when the command line names none.
pub const DEFAULT_ROOTFSTYPE: &str = "ext4";
/// Kernel command-line key (`kiln.workdir=/builds/x`): where, inside the
/// job's root, the agent mounts the [`WORK_DISK_SERIAL`] disk; a clean
/// absolute path. Absent: no workspace disk.
pub const CMDLINE_WORKDIR: &str = "kiln.workdir";
/// Kernel command-line key: `kiln.scratch=`[`SCRATCH_NONE`] tells the agent
/// not to wait for a scratch disk (the overlay's upper layer is a tmpfs).
pub const CMDLINE_SCRATCH: &str = "kiln.scratch";
/// The [`CMDLINE_SCRATCH`] value for "no scratch disk".
pub const SCRATCH_NONE: &str = "none";
/// Kernel command-line key: `kiln.snapshot=`[`SNAPSHOT_WAIT`] boots a VM to
/// be snapshotted: the agent sends `Ready` before it mounts anything and
/// waits for [`Frame::Resume`](super::Frame::Resume), which carries what
/// the per-job keys above would have said.
pub const CMDLINE_SNAPSHOT: &str = "kiln.snapshot";
/// The [`CMDLINE_SNAPSHOT`] value.
pub const SNAPSHOT_WAIT: &str = "wait";
/// A `Log` the agent sends after a `Resume`, before its `Ready`: this
/// prefix, then `name=milliseconds` pairs separated by spaces (where the
/// resume's time went; informational).
pub const RESUME_TIMINGS: &str = "resume timings: ";

/// A step's exit code when the agent could not start it (its script or
/// working directory could not be made, fork failed, it could not enter the
/// job's root or switch to the image's user).
pub const EXIT_CANNOT_START: i32 = 125;
/// A step's exit code when its program exists but cannot be executed
/// (permission denied), as in POSIX shells.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
/// A step's exit code when its program was not found, as in POSIX shells.
pub const EXIT_NOT_FOUND: i32 = 127;
/// A step killed by signal `n` ends with `EXIT_SIGNALED + n` (the shell
/// convention; a step timeout's SIGKILL gives 137).
pub const EXIT_SIGNALED: i32 = 128;
