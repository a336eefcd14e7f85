//! The payloads of the protocol's JSON frames, and the limits they carry.

use serde::{Deserialize, Serialize};

/// Which output stream of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdout = 1,
    Stderr = 2,
}

/// Guest -> host: the agent is up and waits for `Start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub protocol: u32,
    pub agent_version: String,
    /// Guest uptime when the agent sent this, from `/proc/uptime`.
    pub boot_ms: u64,
    /// The guest kernel's release (`uname -r`).
    pub kernel: String,
}

/// Host -> guest, first frame to a VM restored from a snapshot (booted with
/// `kiln.snapshot=wait`): take a fresh identity, then mount the job's disks
/// (attached after the restore) and send `Ready` again. Every field is
/// checked in the guest ([`Resume::check`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// Drawn by the host per restore, never 0; the agent refuses one not
    /// above the generation it holds (0 in the snapshot).
    pub generation: u64,
    /// Fresh random bytes for the guest's CRNG,
    /// [`MIN_RESUME_ENTROPY`]..=[`MAX_RESUME_ENTROPY`].
    pub entropy: Vec<u8>,
    /// The host's `CLOCK_REALTIME`, nanoseconds since the epoch.
    pub time_ns: u64,
    /// The guest's host name (`kiln` on a cold boot).
    pub hostname: String,
    /// What `kiln.rootfstype` would say: the root disk's filesystem.
    pub rootfstype: String,
    /// What `kiln.workdir` would say; empty: no workspace disk.
    #[serde(default)]
    pub workdir: String,
    /// What `kiln.scratch=none` would say: no scratch disk.
    #[serde(default)]
    pub no_scratch: bool,
}

/// Fewest entropy bytes a [`Resume`] may carry (256 bits).
pub const MIN_RESUME_ENTROPY: usize = 32;
/// Most entropy bytes a [`Resume`] may carry.
pub const MAX_RESUME_ENTROPY: usize = 512;
/// Longest host name (`HOST_NAME_MAX`).
pub const MAX_HOSTNAME: usize = 64;

impl Resume {
    /// Whether the agent may apply this `Resume` in a VM whose generation
    /// is `current`: a later generation, enough (and not too much)
    /// entropy, a host name that is one, a root filesystem type the agent
    /// mounts, a clean absolute workspace path.
    pub fn check(&self, current: u64) -> Result<(), String> {
        if self.generation == 0 || self.generation <= current {
            return Err(format!(
                "generation {} is not above {current}: this VM was already resumed",
                self.generation
            ));
        }
        if !(MIN_RESUME_ENTROPY..=MAX_RESUME_ENTROPY).contains(&self.entropy.len()) {
            return Err(format!(
                "{} entropy bytes, not {MIN_RESUME_ENTROPY}..={MAX_RESUME_ENTROPY}",
                self.entropy.len()
            ));
        }
        if self.hostname.len() > MAX_HOSTNAME || !super::is_host_alias(&self.hostname) {
            return Err("the host name is not a host name".into());
        }
        if !matches!(self.rootfstype.as_str(), "ext4" | "erofs") {
            return Err("the root filesystem type is neither ext4 nor erofs".into());
        }
        if !self.workdir.is_empty()
            && (!self.workdir.starts_with('/')
                || self.workdir.split('/').any(|c| c == "..")
                || self.workdir.contains(char::is_whitespace))
        {
            return Err("the workspace directory is not a clean absolute path".into());
        }
        Ok(())
    }
}

/// Host -> guest: the job's context. Steps follow one at a time as
/// [`Frame::RunStep`](super::Frame::RunStep); the host decides which steps run (their `when`,
/// conditions, earlier failures), the agent only runs what it is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// Environment for every step (image Env merged with the job's).
    pub env: Vec<(String, String)>,
    /// Absolute working directory inside the root filesystem; created if missing.
    pub workdir: String,
    /// The image's `User` (`name`, `uid`, `uid:gid`, `name:group`); empty = root.
    pub user: String,
    /// The job's network interface; `None`: no network (only `lo`). Absent
    /// in frames of hosts that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
    /// The job's services, started before the first step; absent in frames
    /// of hosts that predate them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Services>,
}

/// The services a job runs beside its steps, each from its own image on
/// its own disk, in the VM's one network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Services {
    /// How long the agent waits for each service's `ports` to accept a
    /// connection (0: not at all). At most [`MAX_SERVICES`](super::MAX_SERVICES).
    pub wait_ms: u64,
    pub list: Vec<ServiceStart>,
}

/// One service as the agent starts it: the image's root filesystem (the
/// disk with serial [`service_disk_serial`](super::service_disk_serial)`(index)`,
/// read-only, under an overlay) in a mount namespace of its own, running
/// `argv` as `user` with `env`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStart {
    /// Its place in `Services::list`, which its disk's serial carries.
    pub index: u32,
    /// The service's image name, for messages.
    pub name: String,
    /// Host names that resolve to 127.0.0.1 in the job's and every
    /// service's `/etc/hosts` (checked again with
    /// [`is_host_alias`](super::is_host_alias)).
    pub aliases: Vec<String>,
    /// The disk's filesystem (`erofs`, `ext4`).
    pub fstype: String,
    /// The program (its entrypoint and command, as Docker joins them).
    pub argv: Vec<String>,
    /// Its whole environment.
    pub env: Vec<(String, String)>,
    /// Absolute working directory inside its root; empty: `/`.
    pub workdir: String,
    /// The image's `User`; empty: root.
    pub user: String,
    /// TCP ports on 127.0.0.1 of which one must accept a connection within
    /// `Services::wait_ms`; empty: no wait.
    pub ports: Vec<u16>,
}

/// Guest -> host: how service `index` started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub index: u32,
    /// It runs and (if it has ports) one of them accepted a connection.
    pub healthy: bool,
    /// Why not, when not healthy.
    pub error: String,
    /// The end of its output (stdout and stderr as they came), at most
    /// [`MAX_SERVICE_LOG`] bytes; sent only when not healthy.
    pub log: String,
}

/// Most bytes of a service's output the agent keeps (and sends).
pub const MAX_SERVICE_LOG: usize = 16 * 1024;

/// How the agent configures `eth0` (the VM's one virtio-net device) and the
/// job's name-service files. Every value is checked again in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// The guest's IPv4 address, dotted quad.
    pub address: String,
    /// Its prefix length (the on-link network).
    pub prefix: u8,
    /// The default route's next hop, dotted quad, on the link.
    pub gateway: String,
    /// Interface MTU.
    pub mtu: u32,
    /// Name servers for `/etc/resolv.conf`, dotted quads.
    pub dns: Vec<String>,
    /// The VM's host name (also in `/etc/hosts`).
    pub hostname: String,
    /// `eth0`'s MAC address (`52:54:00:..`), set before it comes up: a VM
    /// restored from a snapshot has the address its driver read when the
    /// snapshot's VM booted. Empty: keep the device's.
    #[serde(default)]
    pub mac: String,
}

/// One step as the agent runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Index of the step in the job (echoed in `Output`/`StepEnd`).
    pub index: u32,
    pub name: String,
    /// The program and its arguments. `{script}` in any argument is replaced by
    /// the path of a file holding `script`.
    pub argv: Vec<String>,
    /// Script body written to a file before the step runs (may be empty).
    pub script: String,
    /// The step's whole environment (replaces `Start::env` for this step).
    pub env: Vec<(String, String)>,
    /// Working directory, absolute or relative to `Start::workdir`; empty = that.
    pub workdir: String,
    /// Kill the step's process group after this long (0 = no limit).
    pub timeout_ms: u64,
    /// Give the step `GITHUB_ENV`, `GITHUB_OUTPUT` and `GITHUB_PATH` files and
    /// return their contents in [`StepEnd::files`].
    pub file_commands: bool,
}

/// Host -> guest: send the workspace files these patterns select (GitLab
/// artifact syntax, relative to `Start::workdir`) as a tar stream of
/// `Artifact` frames, then `ArtifactsEnd`. Only regular files and the
/// directories above them are sent; symbolic links are not followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectArtifacts {
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    /// Send at most this many bytes of file contents; files past it are left
    /// out and counted in [`ArtifactsEnd`].
    #[serde(default = "default_max_artifact_bytes")]
    pub max_bytes: u64,
}

fn default_max_artifact_bytes() -> u64 {
    MAX_ARTIFACT_BYTES
}

/// Guest -> host: the artifact tar stream is complete.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactsEnd {
    /// Files sent, and the bytes of their contents.
    pub files: u64,
    pub bytes: u64,
    /// The size or file limit was reached: the files counted in
    /// `left_out_files`/`left_out_bytes` were not sent.
    pub truncated: bool,
    #[serde(default)]
    pub left_out_files: u64,
    #[serde(default)]
    pub left_out_bytes: u64,
    /// Files that were selected but could not be sent (unreadable, name too
    /// long, ...): at most [`MAX_PROBLEMS`] lines, each at most
    /// [`QUOTE_MAX`](super::QUOTE_MAX) bytes of the name.
    #[serde(default)]
    pub problems: Vec<String>,
}

/// Most artifact bytes (file contents) the agent sends for one job, unless
/// the host asks for less ([`CollectArtifacts::max_bytes`]).
pub const MAX_ARTIFACT_BYTES: u64 = 4 << 30;
/// Most artifact files (and directories) in one job's archive.
pub const MAX_ARTIFACT_FILES: u64 = 100_000;
/// Longest artifact path (bytes, relative to the working directory).
pub const MAX_ARTIFACT_PATH: usize = 4096;
/// Most lines in [`ArtifactsEnd::problems`].
pub const MAX_PROBLEMS: usize = 20;

/// What a step wrote to its file-command files (raw; the host parses them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCommands {
    pub env: String,
    pub output: String,
    pub path: String,
    /// A file was larger than [`MAX_FILE_COMMANDS`] and was cut.
    pub truncated: bool,
}

/// Largest file-command file the agent returns.
pub const MAX_FILE_COMMANDS: usize = 256 * 1024;

/// Host -> guest: stop the job. Graceful: SIGTERM the running step, then run
/// the `Always` steps. Not graceful: SIGKILL and finish at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    pub graceful: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStart {
    pub step: u32,
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEnd {
    pub step: u32,
    /// The shell convention: the exit status, or 128 + signal number.
    pub exit_code: i32,
    pub duration_ms: u64,
    pub timed_out: bool,
    pub canceled: bool,
    /// The step was not run (decided by the host; the agent never sets it).
    pub skipped: bool,
    #[serde(default)]
    pub files: Option<FileCommands>,
}

/// Agent diagnostics for the debug log (never the job log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Log {
    pub message: String,
}

/// The agent cannot go on (a system failure, not the job's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fatal {
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume() -> Resume {
        Resume {
            generation: 7,
            entropy: vec![1; 64],
            time_ns: 1_700_000_000_000_000_000,
            hostname: "kiln".into(),
            rootfstype: "erofs".into(),
            workdir: "/builds/x".into(),
            no_scratch: false,
        }
    }

    #[test]
    fn a_resume_is_checked_before_it_is_applied() {
        assert_eq!(resume().check(0), Ok(()));
        assert_eq!(resume().check(6), Ok(()));
        type Change = fn(&mut Resume);
        let bad: [(Change, u64); 9] = [
            (|_| {}, 7),
            (|_| {}, 8),
            (|r| r.generation = 0, 0),
            (|r| r.entropy = vec![1; MIN_RESUME_ENTROPY - 1], 0),
            (|r| r.entropy = vec![1; MAX_RESUME_ENTROPY + 1], 0),
            (|r| r.hostname = "a b".into(), 0),
            (|r| r.rootfstype = "nfs".into(), 0),
            (|r| r.workdir = "/a/../etc".into(), 0),
            (|r| r.workdir = "builds".into(), 0),
        ];
        for (change, current) in bad {
            let mut r = resume();
            change(&mut r);
            assert!(r.check(current).is_err(), "{r:?} at {current}");
        }
    }

    /// Hosts and agents of before the network field understand each other.
    #[test]
    fn start_without_network_is_compatible_both_ways() {
        let old = r#"{"env":[],"workdir":"/","user":""}"#;
        let s: Start = serde_json::from_str(old).unwrap();
        assert_eq!(s.network, None);
        assert_eq!(s.services, None);
        assert_eq!(serde_json::to_string(&s).unwrap(), old);
    }

    #[test]
    fn artifacts_end_without_the_newer_fields_still_parses() {
        let old = br#"{"files":1,"bytes":2,"truncated":false}"#;
        let end: ArtifactsEnd = serde_json::from_slice(old).unwrap();
        assert_eq!((end.files, end.left_out_files), (1, 0));
        let req: CollectArtifacts =
            serde_json::from_slice(br#"{"paths":[],"exclude":[]}"#).unwrap();
        assert_eq!(req.max_bytes, MAX_ARTIFACT_BYTES);
    }
}
