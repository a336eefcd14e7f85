//! The `user` mode: one `passt` process per VM (Debian package `passt`),
//! which turns the guest's frames into ordinary sockets of the user who
//! runs kiln: no root, no TAP device, no firewall. QEMU connects to passt's
//! Unix socket (`-netdev stream`).
//!
//! The guest sees a fixed network (QEMU's user-mode addresses): it is
//! 10.0.2.15/24, its gateway 10.0.2.2, its DNS server 10.0.2.3 (passt
//! relays that address to the host's resolvers). `--no-map-gw` keeps the
//! host's loopback out of reach through the gateway address.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::NetworkError;

pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
pub const PREFIX: u8 = 24;

/// Who passt runs as when kiln is root.
const NOBODY: u32 = 65534;

/// How long passt may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running passt; killed (and its socket removed) when dropped.
pub struct Passt {
    child: Child,
    pub socket: PathBuf,
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The passt binary kiln runs: `passt` in `PATH`.
pub fn binary() -> PathBuf {
    "passt".into()
}

/// Start passt for one VM with its socket at `socket` (in the VM's
/// directory); [`Passt::wait_ready`] waits for the socket.
///
/// Call it from a thread that lives as long as the job (an async task's
/// runtime thread), never from the blocking pool: passt's
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked it ends, and the
/// pool retires idle threads after 10 s. passt then died under a running
/// job whenever it kept the signal, i.e. whenever kiln was not root (as
/// root, `--runas` changes passt's uid, which clears it).
pub fn spawn(socket: &Path, mtu: u32) -> Result<Passt, NetworkError> {
    let bin = binary();
    let mut cmd = Command::new(&bin);
    // SAFETY: geteuid(2) cannot fail and has no side effects.
    if unsafe { libc::geteuid() } == 0 {
        // passt will not run as root: it becomes `nobody` before it binds
        // its socket, so the socket's directory must be nobody's.
        let dir = socket.parent().unwrap_or(Path::new("/"));
        std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).map_err(|source| {
            NetworkError::Tun {
                what: "give passt's socket directory to nobody",
                source,
            }
        })?;
        cmd.args(["--runas", &format!("{NOBODY}:{NOBODY}")]);
    }
    // `--one-off`: passt quits when its one client (QEMU, or kiln's
    // connection for the kvm backend's VMM) goes, so it cannot outlive the
    // VM even where the death signal does not reach it (see above).
    cmd.args([
        "--foreground",
        "--quiet",
        "--one-off",
        "-4",
        "--no-map-gw",
        "--no-dhcp",
    ])
    .arg("--socket")
    .arg(socket)
    .args(["--address", &GUEST.to_string()])
    .args(["--netmask", &PREFIX.to_string()])
    .args(["--gateway", &GATEWAY.to_string()])
    .args(["--dns-forward", &DNS.to_string()])
    .args(["--mtu", &mtu.to_string()])
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let log = socket.with_extension("log");
    if let Ok(f) = std::fs::File::create(&log) {
        cmd.stderr(f);
    }
    // SAFETY: runs in the forked child before exec; prctl(2) is
    // async-signal-safe. passt dies with kiln (no process left after a
    // kill -9 of kiln).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| NetworkError::Tool {
        tool: "passt (apt-get install passt, for --network user)",
        source,
    })?;
    Ok(Passt {
        child,
        socket: socket.to_path_buf(),
    })
}

/// Kill the passt processes whose socket lies under `dir`: those of a
/// killed kiln's job directory, before it is removed. As root, passt runs
/// as `nobody` (`--runas` clears its death signal), and one whose VM never
/// connected would wait on its socket for ever (`--one-off` ends it only
/// when its client goes). Returns how many were killed.
pub fn kill_under(dir: &Path) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if is_passt_under(&cmdline, dir) {
            // SAFETY: kill(2) on a pid just read; a passt of a dead kiln's
            // job. (Were the pid reused in between, it would be by a
            // process that is not this passt: a negligible window, as
            // `pkill` has.)
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    killed
}

/// Whether `cmdline` (NUL-separated, as `/proc/<pid>/cmdline`) is passt's
/// (Debian's re-executes itself as `passt.avx2`) with `--socket` under
/// `dir`.
pub fn is_passt_under(cmdline: &[u8], dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let mut args = cmdline.split(|b| *b == 0).map(std::ffi::OsStr::from_bytes);
    let is_passt = args
        .next()
        .and_then(|a0| Path::new(a0).file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == "passt" || n.starts_with("passt."));
    if !is_passt {
        return false;
    }
    let args: Vec<&std::ffi::OsStr> = args.collect();
    args.windows(2)
        .any(|w| w[0] == "--socket" && Path::new(w[1]).starts_with(dir))
}

impl Passt {
    /// Wait until passt has created its socket (blocking: run it on the
    /// blocking pool).
    pub fn wait_ready(mut self) -> Result<Passt, NetworkError> {
        let (bin, socket) = (binary(), self.socket.clone());
        let log = socket.with_extension("log");
        let t0 = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = std::fs::read(&log).unwrap_or_default();
                err.truncate(4096);
                let err = String::from_utf8_lossy(&err);
                return Err(NetworkError::Command {
                    command: format!("{} (exited: {status})", bin.display()),
                    stderr: err.trim().to_string(),
                });
            }
            if t0.elapsed() > START_TIMEOUT {
                return Err(NetworkError::Command {
                    command: bin.display().to_string(),
                    stderr: format!("no socket after {START_TIMEOUT:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_passts_of_the_directory_are_picked() {
        let dir = Path::new("/run/kiln/job-7-1");
        let line = |args: &[&str]| args.join("\0").into_bytes();
        let sock = "/run/kiln/job-7-1/passt/passt.sock";
        assert!(is_passt_under(
            &line(&["passt", "-f", "--socket", sock]),
            dir
        ));
        assert!(is_passt_under(
            &line(&["/usr/bin/passt.avx2", "--socket", sock]),
            dir
        ));
        let other = "/run/kiln/job-7-10/passt/passt.sock";
        assert!(!is_passt_under(&line(&["passt", "--socket", other]), dir));
        assert!(!is_passt_under(&line(&["qemu", "--socket", sock]), dir));
        assert!(!is_passt_under(&line(&["passt", sock]), dir));
        assert!(!is_passt_under(b"", dir));
    }

    /// A stand-in named passt, with its socket under a directory, is
    /// killed; the same under another directory is not.
    #[test]
    fn a_dead_jobs_passt_is_killed() {
        let d = tempfile::tempdir().unwrap();
        let (job, other) = (d.path().join("job-1-1"), d.path().join("job-1-2"));
        let spawn = |dir: &Path| {
            Command::new("sh")
                .arg0("passt")
                .args(["-c", "sleep 30; true", "--socket"])
                .arg(dir.join("passt/passt.sock"))
                .spawn()
                .unwrap()
        };
        let (mut victim, mut bystander) = (spawn(&job), spawn(&other));
        assert_eq!(kill_under(&job), 1);
        let status = victim.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert_eq!(bystander.try_wait().unwrap(), None);
        let _ = bystander.kill();
        let _ = bystander.wait();
    }
}
