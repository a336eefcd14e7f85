//! Jobs from a snapshot (kvm backend; docs/architecture.md, "Snapshots").
//!
//! A job's VM has a profile: kernel, initramfs (the agent is inside), the
//! snapshot command line (`kiln.snapshot=wait`, none of the per-job keys),
//! vCPUs, memory and its devices (disk serials and read-only flags). The
//! first job of a profile boots a VM for it with empty disks, waits for the
//! agent's `Ready` (sent before it mounts anything), snapshots it into the
//! cache and throws it away; every job then restores a new VM from the
//! snapshot with its own disks (the VMM raises a configuration-change
//! interrupt for them) and sends `Resume` (fresh identity, what the command
//! line would have said) before the usual handshake. A job with a network
//! has its kind of network device in the profile (TAP or passt's stream,
//! and the MTU): the snapshot's VM boots with a stand-in backend, its
//! driver binds the device but the interface stays down, and the restored
//! VM gets the job's TAP or passt connection; the agent sets the job's MAC
//! address before it brings the interface up. Any error on this path is
//! logged and the job cold-boots; so do jobs on the qemu backend, and with
//! `snapshots = false` / `--no-snapshot`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_agent::proto::{self, Decoder, Frame, Ready, Resume};
use kiln_vmm::kvm::snapshot::{Profile, SnapshotUse};
use kiln_vmm::{BackendKind, ConsoleStream, Disk, Machine, MachineConfig, MachineError};
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

use super::{BootPhase, Executor};
use crate::snapshots::SnapshotCache;

/// Entropy bytes each restored VM gets.
const RESUME_ENTROPY: usize = 64;

/// Per restore, never 0 (the agent's generation in the snapshot).
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Why a job could not start from a snapshot (it then cold-boots).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotStartError {
    #[error("hashing the kernel and initramfs for the snapshot profile")]
    Digest(#[source] std::io::Error),
    #[error("snapshot cache {what}")]
    Cache {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("another job is taking this profile's snapshot")]
    Busy,
    #[error("the VM booted for the snapshot: {0}")]
    Boot(String),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("the restored VM's agent: {0}")]
    Resume(String),
    #[error("drawing entropy for the restored VM from /dev/urandom")]
    Entropy(#[source] std::io::Error),
}

/// The executor's snapshot state: the cache, the kernel's and initramfs's
/// digests (hashed once), one snapshot taken at a time.
pub(super) struct Snapshots {
    cache: SnapshotCache,
    digests: OnceLock<(String, String)>,
    taking: tokio::sync::Mutex<()>,
}

impl Snapshots {
    pub(super) fn new(cache_root: &Path) -> Snapshots {
        Snapshots {
            cache: SnapshotCache::new(cache_root),
            digests: OnceLock::new(),
            taking: tokio::sync::Mutex::new(()),
        }
    }
}

/// What the agent needs after a restore instead of the per-job command-line
/// keys.
pub(super) struct JobRoot<'a> {
    pub rootfstype: &'a str,
    /// The workspace disk's mount point, when there is one.
    pub workdir: Option<&'a str>,
}

/// The command line of every VM of a snapshot profile.
pub(super) fn snapshot_cmdline(extra: &str) -> String {
    let mut c = MachineConfig::default_cmdline().to_string();
    if !extra.is_empty() {
        c.push(' ');
        c.push_str(extra);
    }
    c.push_str(&format!(
        " {}={}",
        proto::CMDLINE_SNAPSHOT,
        proto::SNAPSHOT_WAIT
    ));
    c
}

/// A fresh identity for one restored VM.
pub(super) fn fresh_resume(root: &JobRoot<'_>) -> std::io::Result<Resume> {
    let mut entropy = vec![0u8; RESUME_ENTROPY];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut entropy)?;
    let time_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    Ok(Resume {
        generation: GENERATION.fetch_add(1, Ordering::Relaxed) + 1,
        entropy,
        time_ns,
        hostname: "kiln".into(),
        rootfstype: root.rootfstype.into(),
        workdir: root.workdir.unwrap_or_default().into(),
        no_scratch: false,
    })
}

/// `config` as the snapshot profile has it: the snapshot command line, the
/// same disks (serials, read-only flags) backed by empty files under `dir`.
fn profile_config(config: &MachineConfig, cmdline: &str, dir: &Path) -> MachineConfig {
    let mut c = config.clone();
    c.cmdline = cmdline.into();
    c.disks = config
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| Disk {
            path: dir.join(format!("empty-{i}.img")),
            ..d.clone()
        })
        .collect();
    c.run_dir = dir.join("vm");
    c
}

/// What stands in for the job's network while the snapshot's VM boots:
/// the other end of a socketpair for a TAP, a listener nobody serves for
/// passt's socket (the kvm backend connects to it; nothing is ever read).
/// The guest never brings its interface up before `Start`, so nothing
/// moves; the job's own TAP or passt (which serves one connection only)
/// is kept for the restored VM.
enum StandIn {
    None,
    Tap(#[allow(dead_code)] std::os::unix::net::UnixDatagram),
    Stream(#[allow(dead_code)] std::os::unix::net::UnixListener),
}

fn stand_in_network(config: &mut MachineConfig, dir: &Path) -> std::io::Result<StandIn> {
    Ok(match &mut config.network {
        kiln_vmm::Network::None => StandIn::None,
        kiln_vmm::Network::Tap { fd, .. } => {
            let (vmm_end, ours) = std::os::unix::net::UnixDatagram::pair()?;
            *fd = std::sync::Arc::new(vmm_end.into());
            StandIn::Tap(ours)
        }
        kiln_vmm::Network::Passt { socket, .. } => {
            let path = dir.join("stand-in-net.sock");
            let _ = std::fs::remove_file(&path);
            let l = std::os::unix::net::UnixListener::bind(&path)?;
            *socket = path;
            StandIn::Stream(l)
        }
    })
}

/// The guest's `name=ms` pairs of a [`proto::RESUME_TIMINGS`] log, as
/// boot phases (`guest: name`); nothing for any other log.
fn guest_phases(message: &str) -> Vec<BootPhase> {
    let Some(pairs) = message.strip_prefix(proto::RESUME_TIMINGS) else {
        return Vec::new();
    };
    pairs
        .split_whitespace()
        .take(16)
        .filter_map(|p| {
            let (name, ms) = p.split_once('=')?;
            let ms: f64 = ms.parse().ok().filter(|m: &f64| m.is_finite())?;
            // Hostile bytes: short names of plain characters only.
            let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
            if name.is_empty() || name.len() > 32 || !name.chars().all(plain) {
                return None;
            }
            Some(BootPhase {
                name: format!("guest: {name}"),
                ms,
            })
        })
        .collect()
}

/// Read frames until the agent's `Ready` (its logs are passed to tracing).
async fn wait_ready(console: &mut ConsoleStream, limit: Duration) -> Result<Ready, String> {
    wait_ready_phases(console, limit, &mut Vec::new()).await
}

/// [`wait_ready`], adding the guest's timings it sends to `phases`.
async fn wait_ready_phases(
    console: &mut ConsoleStream,
    limit: Duration,
    phases: &mut Vec<BootPhase>,
) -> Result<Ready, String> {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        while let Some(frame) = decoder.next_frame().map_err(|e| e.to_string())? {
            match frame {
                Frame::Ready(r) if r.protocol == proto::PROTOCOL_VERSION => {
                    // The agent says nothing more until it is sent a frame:
                    // bytes after `Ready` are a broken agent.
                    if decoder.pending() > 0 {
                        return Err("the agent sent bytes after Ready".into());
                    }
                    return Ok(r);
                }
                Frame::Log(l) => {
                    tracing::debug!(
                        "agent: {}",
                        proto::quote(l.message.as_bytes(), proto::QUOTE_MAX)
                    );
                    phases.extend(guest_phases(&l.message));
                }
                other => return Err(format!("the agent sent {}", other.describe())),
            }
        }
        let n = tokio::time::timeout_at(deadline, console.read(&mut buf))
            .await
            .map_err(|_| format!("no Ready within {limit:?}"))?
            .map_err(|e| format!("reading the console: {e}"))?;
        if n == 0 {
            return Err("the VM ended before its agent was ready".into());
        }
        decoder.push(&buf[..n]);
    }
}

/// Send the restored agent its `Resume`; its `Ready` (or why not).
async fn resume_agent(
    console: &mut ConsoleStream,
    resume: Resume,
    limit: Duration,
    phases: &mut Vec<BootPhase>,
) -> Result<Ready, String> {
    let bytes = Frame::Resume(resume)
        .to_bytes()
        .map_err(|e| format!("encoding Resume: {e}"))?;
    console
        .write_all(&bytes)
        .await
        .map_err(|e| format!("sending Resume: {e}"))?;
    wait_ready_phases(console, limit, phases).await
}

/// Phase `name` (from `since`), then the VMM process's own steps, which
/// it took within that phase (`vmm: ` before each).
fn vmm_phases(phases: &mut Vec<BootPhase>, name: &str, since: Instant, m: &Machine) {
    phases.push(BootPhase::since(name, since));
    if let Some(jail) = m.jail() {
        phases.extend(jail.steps.iter().map(|s| BootPhase {
            name: format!("vmm: {}", s.name),
            ms: s.micros as f64 / 1e3,
        }));
    }
}

impl Executor {
    /// Whether this job's VM may start from a snapshot, and why not.
    fn snapshot_refusal(&self) -> Option<&'static str> {
        if !self.config.snapshots {
            return Some("snapshots are off");
        }
        match self.config.backend.resolve(&self.kvm) {
            Ok((BackendKind::Kvm, _)) => {}
            _ => return Some("the qemu backend always boots"),
        }
        None
    }

    /// Start the job's VM: restored from its profile's snapshot (taken
    /// first if there is none) when it can, else booted. A restored VM
    /// comes with the agent's `Ready` (after `Resume`: it has its fresh
    /// identity and the job's disks mounted); until that `Ready` any
    /// failure destroys it and the job boots cold.
    pub(super) async fn start_vm(
        &self,
        config: MachineConfig,
        job_dir: &Path,
        root: JobRoot<'_>,
        phases: &mut Vec<BootPhase>,
    ) -> Result<(Machine, ConsoleStream, Option<Ready>), MachineError> {
        match self.snapshot_refusal() {
            Some(why) => tracing::debug!("booting cold: {why}"),
            None => match self.restore(&config, job_dir, &root, phases).await {
                Ok(started) => return Ok(started),
                Err(e) => tracing::warn!(
                    "starting the job from a snapshot failed, booting cold: {}",
                    super::error_chain(&e)
                ),
            },
        }
        let t = Instant::now();
        let (m, c) = Machine::start(config, self.config.backend, &self.kvm).await?;
        vmm_phases(phases, "VMM process start (cold)", t, &m);
        Ok((m, c, None))
    }

    async fn restore(
        &self,
        config: &MachineConfig,
        job_dir: &Path,
        root: &JobRoot<'_>,
        phases: &mut Vec<BootPhase>,
    ) -> Result<(Machine, ConsoleStream, Option<Ready>), SnapshotStartError> {
        let cmdline = snapshot_cmdline(&self.config.extra_cmdline);
        let t = Instant::now();
        let (kernel, initramfs) = self.digests().await?;
        phases.push(BootPhase::since("kernel and initramfs digests", t));
        let empty_dir = job_dir.join("snapshot-boot");
        let boot_config = profile_config(config, &cmdline, &empty_dir);
        let profile = Profile::for_config(&boot_config, &kernel, &initramfs);
        let t = Instant::now();
        let found = self.snapshots.cache.lookup_or_refusal(&profile);
        let path = match found {
            Ok(_) => {
                phases.push(BootPhase::since("snapshot lookup", t));
                self.snapshots.cache.path_for(&profile)
            }
            Err(refused) => {
                // The phase says why a snapshot is taken: none, or the
                // cached one was refused (another kiln, format, profile).
                let why = refused.map_or_else(|| "none cached".into(), |e| format!("refused: {e}"));
                phases.push(BootPhase::since(format!("snapshot lookup ({why})"), t));
                self.take_snapshot(boot_config, &profile, phases).await?
            }
        };
        let resume = fresh_resume(root).map_err(SnapshotStartError::Entropy)?;
        let mut restored = config.clone();
        restored.cmdline = cmdline;
        let t = Instant::now();
        let (m, mut c) = Machine::start_with_snapshot(
            restored,
            self.config.backend,
            &self.kvm,
            SnapshotUse::Restore {
                path: path.clone(),
                profile_hash: profile.hash(),
            },
        )
        .await
        .inspect_err(|e| {
            // The lookup checked only its header: a snapshot whose state
            // the VMM refuses (damaged) is removed, and the next job takes
            // a new one.
            tracing::warn!(
                path = %path.display(),
                "restoring the cached snapshot failed; it is removed: {}",
                super::error_chain(e)
            );
            let _ = std::fs::remove_file(&path);
        })?;
        vmm_phases(phases, "VMM process start (restore)", t, &m);
        let t = Instant::now();
        let mut guest = Vec::new();
        let resumed = resume_agent(&mut c, resume, self.config.boot_timeout, &mut guest).await;
        phases.push(BootPhase::since("Resume to agent Ready", t));
        phases.extend(guest);
        match resumed {
            Ok(ready) => {
                tracing::debug!(profile = %profile.hash(), "job VM restored from a snapshot");
                Ok((m, c, Some(ready)))
            }
            Err(e) => {
                if let Err(d) = m.destroy().await {
                    tracing::warn!("destroying the restored VM: {d}");
                }
                Err(SnapshotStartError::Resume(e))
            }
        }
    }

    /// The kernel's and the initramfs's SHA-256, hashed once per file
    /// (`SnapshotCache::file_digest` remembers them across executors and
    /// processes).
    async fn digests(&self) -> Result<(String, String), SnapshotStartError> {
        if let Some(d) = self.snapshots.digests.get() {
            return Ok(d.clone());
        }
        let (k, i) = (self.config.kernel.image.clone(), self.initramfs.clone());
        let cache = self.snapshots.cache.clone();
        let d = tokio::task::spawn_blocking(move || -> std::io::Result<(String, String)> {
            Ok((cache.file_digest(&k)?, cache.file_digest(&i)?))
        })
        .await
        .map_err(|e| SnapshotStartError::Digest(std::io::Error::other(e)))?
        .map_err(SnapshotStartError::Digest)?;
        Ok(self.snapshots.digests.get_or_init(|| d).clone())
    }

    /// Boot `config` (empty disks, the snapshot command line) to the
    /// agent's `Ready`, snapshot it for `profile` into the cache, destroy
    /// it. One at a time: a job that finds another taking one cold-boots.
    async fn take_snapshot(
        &self,
        config: MachineConfig,
        profile: &Profile,
        phases: &mut Vec<BootPhase>,
    ) -> Result<PathBuf, SnapshotStartError> {
        let _one = self
            .snapshots
            .taking
            .try_lock()
            .map_err(|_| SnapshotStartError::Busy)?;
        let cache = &self.snapshots.cache;
        if cache.lookup(profile).is_some() {
            return Ok(cache.path_for(profile));
        }
        let cache_err = |what| move |source| SnapshotStartError::Cache { what, source };
        // Owned: `config` is changed below (its network).
        let dir = config
            .run_dir
            .parent()
            .unwrap_or(Path::new("/"))
            .to_path_buf();
        std::fs::create_dir_all(&dir).map_err(cache_err("boot directory"))?;
        for d in &config.disks {
            std::fs::File::create(&d.path).map_err(cache_err("empty disk"))?;
        }
        let mut config = config;
        // Held until the snapshot's VM is gone.
        let _stand_in =
            stand_in_network(&mut config, &dir).map_err(cache_err("stand-in network"))?;
        let staging = cache.staging(profile).map_err(cache_err("staging"))?;
        let started = Instant::now();
        let (mut machine, mut console) = Machine::start_with_snapshot(
            config,
            self.config.backend,
            &self.kvm,
            SnapshotUse::WriteTo(staging.clone()),
        )
        .await?;
        vmm_phases(phases, "snapshot: VMM process start", started, &machine);
        let t = Instant::now();
        let booted = wait_ready(&mut console, self.config.boot_timeout).await;
        phases.push(BootPhase::since("snapshot: boot to agent Ready", t));
        let t = Instant::now();
        let taken = match booted {
            Ok(_) => machine
                .snapshot(profile)
                .await
                .map_err(SnapshotStartError::from),
            Err(e) => Err(SnapshotStartError::Boot(e)),
        };
        phases.push(BootPhase::since("snapshot: pause, save, write", t));
        let t = Instant::now();
        if let Err(e) = machine.destroy().await {
            tracing::warn!("destroying the VM booted for a snapshot: {e}");
        }
        phases.push(BootPhase::since("snapshot: destroy its VM", t));
        let t = Instant::now();
        let published = taken.and_then(|_| {
            cache
                .publish(&staging, profile)
                .map_err(cache_err("publish"))
        });
        phases.push(BootPhase::since("snapshot: sync and publish", t));
        if published.is_err() {
            let _ = std::fs::remove_file(&staging);
        }
        let path = published?;
        tracing::info!(
            profile = %profile.hash(),
            elapsed = ?started.elapsed(),
            "took a VM snapshot for jobs of this profile"
        );
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_command_line_has_no_per_job_keys() {
        let c = snapshot_cmdline("foo=1");
        assert!(c.ends_with(" foo=1 kiln.snapshot=wait"), "{c}");
        for key in [
            proto::CMDLINE_ROOTFSTYPE,
            proto::CMDLINE_WORKDIR,
            proto::CMDLINE_SCRATCH,
        ] {
            assert!(!c.contains(key), "{c}");
        }
    }

    #[test]
    fn every_restore_has_its_own_identity() {
        let root = JobRoot {
            rootfstype: "erofs",
            workdir: Some("/builds/p"),
        };
        let (a, b) = (fresh_resume(&root).unwrap(), fresh_resume(&root).unwrap());
        assert!(a.check(0).is_ok() && b.check(0).is_ok(), "{a:?}");
        assert!(b.generation > a.generation);
        assert_ne!(a.entropy, b.entropy);
        assert_eq!(a.workdir, "/builds/p");
        assert!(a.time_ns > 1_700_000_000 * 1_000_000_000);
    }

    fn test_config() -> MachineConfig {
        MachineConfig {
            disks: vec![
                Disk {
                    path: "/img/root.erofs".into(),
                    read_only: true,
                    serial: proto::ROOT_DISK_SERIAL.into(),
                    ephemeral: false,
                },
                Disk {
                    path: "/run/j/scratch.ext4".into(),
                    read_only: false,
                    serial: proto::SCRATCH_DISK_SERIAL.into(),
                    ephemeral: true,
                },
            ],
            kernel: "/k".into(),
            initramfs: "/i".into(),
            cmdline: "console=ttyS0 kiln.rootfstype=erofs".into(),
            vcpus: 2,
            memory_mib: 512,
            console_port: proto::AGENT_PORT_NAME.into(),
            run_dir: "/run/j/vm".into(),
            serial_log_limit: 1024,
            start_timeout: Duration::from_secs(1),
            qemu: Default::default(),
            isolation: Default::default(),
            test_forbidden_syscall: None,
            network: kiln_vmm::Network::None,
        }
    }

    #[test]
    fn the_profile_is_the_jobs_disks_unbacked() {
        let dir = Path::new("/run/j/snapshot-boot");
        let job = test_config();
        let c = profile_config(&job, "x kiln.snapshot=wait", dir);
        assert_eq!(c.cmdline, "x kiln.snapshot=wait");
        assert!(c.disks.iter().all(|d| d.path.starts_with(dir)));
        let p = Profile::for_config(&c, "k", "i");
        let mut other_paths = job.clone();
        other_paths.cmdline = c.cmdline.clone();
        assert_eq!(
            p,
            Profile::for_config(&other_paths, "k", "i"),
            "the backing files are not part of the profile"
        );

        // The network device's kind and MTU are; the job's TAP, passt
        // socket and MAC are not (the agent sets the MAC).
        let (tap_a, _) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let (tap_b, _) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let with = |network| {
            let mut j = c.clone();
            j.network = network;
            Profile::for_config(&j, "k", "i").hash()
        };
        let tap = |fd: &std::os::unix::net::UnixDatagram, mac, mtu| kiln_vmm::Network::Tap {
            fd: std::sync::Arc::new(fd.try_clone().unwrap().into()),
            mac,
            mtu,
        };
        let passt = |socket: &str, mtu| kiln_vmm::Network::Passt {
            socket: socket.into(),
            mac: [2; 6],
            mtu,
        };
        let none = p.hash();
        let t = with(tap(&tap_a, [2; 6], 1500));
        assert_eq!(t, with(tap(&tap_b, [4; 6], 1500)));
        assert_ne!(t, with(tap(&tap_a, [2; 6], 9000)));
        let s = with(passt("/a.sock", 1500));
        assert_eq!(s, with(passt("/b.sock", 1500)));
        assert!(none != t && none != s && t != s);
    }

    /// The snapshot's VM never gets the job's network: a TAP becomes a
    /// socketpair of kiln's, passt's socket a listener in the boot
    /// directory (passt serves one connection, the restored VM's).
    #[test]
    fn the_snapshots_vm_boots_on_a_stand_in_network() {
        let dir = tempfile::tempdir().unwrap();
        let (job_tap, _) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let job_fd: std::sync::Arc<std::os::fd::OwnedFd> = std::sync::Arc::new(job_tap.into());
        let mut c = MachineConfig {
            network: kiln_vmm::Network::Tap {
                fd: job_fd.clone(),
                mac: [2; 6],
                mtu: 1500,
            },
            ..test_config()
        };
        let held = stand_in_network(&mut c, dir.path()).unwrap();
        assert!(matches!(held, StandIn::Tap(_)));
        match &c.network {
            kiln_vmm::Network::Tap { fd, .. } => assert!(!std::sync::Arc::ptr_eq(fd, &job_fd)),
            n => panic!("{n:?}"),
        }
        c.network = kiln_vmm::Network::Passt {
            socket: "/run/passt.sock".into(),
            mac: [2; 6],
            mtu: 1500,
        };
        let held = stand_in_network(&mut c, dir.path()).unwrap();
        assert!(matches!(held, StandIn::Stream(_)));
        match &c.network {
            kiln_vmm::Network::Passt { socket, .. } => {
                assert!(socket.starts_with(dir.path()));
                std::os::unix::net::UnixStream::connect(socket).expect("the stand-in listens");
            }
            n => panic!("{n:?}"),
        }
    }

    #[test]
    fn the_guests_resume_timings_become_phases_and_nothing_else_does() {
        let p = guest_phases(&format!(
            "{}identity=1.5 root-disk=20 mounts=x bad inf=inf",
            proto::RESUME_TIMINGS
        ));
        let got: Vec<(String, f64)> = p.into_iter().map(|p| (p.name, p.ms)).collect();
        assert_eq!(
            got,
            vec![
                ("guest: identity".to_string(), 1.5),
                ("guest: root-disk".to_string(), 20.0)
            ]
        );
        assert!(guest_phases("mounting /lower").is_empty());
    }

    fn ready() -> Frame {
        Frame::Ready(Ready {
            protocol: proto::PROTOCOL_VERSION,
            agent_version: "t".into(),
            boot_ms: 1,
            kernel: "6.1".into(),
        })
    }

    /// The host side of a restore against a scripted agent: `Resume` goes
    /// out first, and only a clean `Ready` (nothing after it) is a resumed
    /// agent; anything else sends the job to a cold boot.
    #[tokio::test]
    async fn resume_then_ready_or_a_reason_to_boot_cold() {
        let root = JobRoot {
            rootfstype: "ext4",
            workdir: None,
        };
        let answers: [(Vec<Frame>, Result<(), &str>); 4] = [
            (vec![ready()], Ok(())),
            (
                vec![
                    Frame::Log(proto::Log {
                        message: "mounting".into(),
                    }),
                    ready(),
                ],
                Ok(()),
            ),
            (
                vec![Frame::Fatal(proto::Fatal {
                    message: "the root disk did not appear".into(),
                })],
                Err("Fatal"),
            ),
            (vec![ready(), Frame::Done], Err("after Ready")),
        ];
        for (frames, want) in answers {
            let (mut host, mut guest) = tokio::net::UnixStream::pair().unwrap();
            let agent = tokio::spawn(async move {
                let mut d = Decoder::new();
                let mut buf = [0u8; 4096];
                let resume = loop {
                    if let Some(f) = d.next_frame().unwrap() {
                        break f;
                    }
                    let n = guest.read(&mut buf).await.unwrap();
                    d.push(&buf[..n]);
                };
                let mut out = Vec::new();
                for f in &frames {
                    f.encode(&mut out).unwrap();
                }
                guest.write_all(&out).await.unwrap();
                (resume, guest)
            });
            let r = resume_agent(
                &mut host,
                fresh_resume(&root).unwrap(),
                Duration::from_secs(30),
                &mut Vec::new(),
            )
            .await;
            let (resume, _guest) = agent.await.unwrap();
            assert!(
                matches!(&resume, Frame::Resume(r) if r.check(0).is_ok()),
                "{resume:?}"
            );
            match want {
                Ok(()) => assert_eq!(r.unwrap().kernel, "6.1"),
                Err(what) => {
                    let e = r.unwrap_err();
                    assert!(e.contains(what), "{e}");
                }
            }
        }
        // A guest that never answers: the limit, not a hang.
        let (mut host, _guest) = tokio::net::UnixStream::pair().unwrap();
        let e = resume_agent(
            &mut host,
            fresh_resume(&root).unwrap(),
            Duration::from_millis(50),
            &mut Vec::new(),
        )
        .await
        .unwrap_err();
        assert!(e.contains("no Ready"), "{e}");
    }
}
