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
