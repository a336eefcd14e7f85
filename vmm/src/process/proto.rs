//! The wire format between kiln and a VMM process: frames of a 4-byte
//! little-endian length and that many bytes of JSON, at most [`MAX_FRAME`]
//! each. kiln sends one [`ToVmm::Start`] (and later, maybe, a
//! [`ToVmm::Stop`]); the VMM process answers [`FromVmm::Started`] or
//! [`FromVmm::StartFailed`], then streams serial output and ends with
//! [`FromVmm::Exit`]. Both sides check [`VERSION`]; a frame that is too long
//! or does not parse ends the conversation (the VMM process is hostile once
//! the guest runs: kiln bounds what it reads, and never trusts a size it
//! sends).

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::kvm::stats::ExitStats;
use crate::machine::ExitStatus;

/// Bumped on any change to the messages below.
pub const VERSION: u32 = 2;

/// Largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// Serial output is forwarded in chunks of at most this many bytes.
pub const SERIAL_CHUNK: usize = 64 * 1024;

/// kiln → VMM process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToVmm {
    Start(Box<StartVm>),
    /// Stop the VM and report how it ended.
    Stop,
    /// Pause the VM, write a snapshot for this profile into the file at
    /// [`super::fds::SNAPSHOT`] (the VM was started with
    /// [`StartVm::snapshot_out`]), let it run on, answer
    /// [`FromVmm::Snapshotted`].
    Snapshot(Box<crate::kvm::snapshot::Profile>),
}

/// The VM to build. Files come as descriptors at fixed numbers
/// ([`super::fds`]), never as paths.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartVm {
    pub version: u32,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub console_port: String,
    pub serial_log_limit: usize,
    pub disks: Vec<WireDisk>,
    pub jail: crate::jail::JailSpec,
    /// Test-only: make a thread of this kind call a syscall its filter
    /// forbids once the VM runs (ignored unless built with debug assertions
    /// or the `test-hooks` feature).
    pub test_forbidden_syscall: Option<String>,
    /// Restore the VM from the snapshot at [`super::fds::SNAPSHOT`]
    /// (read-only), which must be for this profile hash, instead of booting.
    #[serde(default)]
    pub restore: Option<String>,
    /// [`super::fds::SNAPSHOT`] is an empty writable file for a later
    /// [`ToVmm::Snapshot`] (the threads' filters then allow reading KVM's
    /// state).
    #[serde(default)]
    pub snapshot_out: bool,
    /// The guest's network interface; its backend is the descriptor after
    /// the last disk ([`super::fds::network`]).
    pub network: Option<WireNetwork>,
}

/// What kind of descriptor the network backend is, and what the guest sees.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireNetwork {
    pub kind: WireNetKind,
    pub mac: [u8; 6],
    pub mtu: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireNetKind {
    /// A TAP device: one frame per read or write.
    Tap,
    /// A connected stream socket, frames behind 4-byte big-endian lengths.
    Stream,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireDisk {
    pub read_only: bool,
    pub serial: String,
    pub ephemeral: bool,
}

/// VMM process → kiln.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromVmm {
    Started {
        version: u32,
        /// What of the jail was applied.
        jail: crate::jail::JailReport,
    },
    StartFailed(WireError),
    /// Bytes the guest wrote to its serial console.
    Serial(Vec<u8>),
    /// Microseconds from the start of VM set-up to the guest's first I/O exit.
    FirstExit(u64),
    /// A seccomp filter refused this syscall number; the process exits
    /// right after. Written by the SIGSYS handler, as the last frame.
    Violation(i64),
    /// A thread tried to open a file; it was refused (EACCES) and goes on.
    /// Written by the SIGSYS handler.
    Refused {
        nr: i64,
        thread: String,
        path: String,
    },
    /// A thread of the VMM process panicked (a kiln bug, whatever the guest
    /// did); the process exits right after. Written by the panic hook.
    Panicked(String),
    /// The answer to [`ToVmm::Snapshot`].
    Snapshotted(Result<Box<crate::kvm::snapshot::Header>, WireError>),
    Exit {
        status: WireStatus,
        stats: ExitStats,
        /// Guest RAM bytes resident in the VMM process at the end.
        guest_resident: u64,
    },
}

/// Why the VM could not be started, kept typed as far as kiln needs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    pub kind: WireErrorKind,
    /// The error's message and its `source()` chain, outermost first.
    pub chain: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireErrorKind {
    Config,
    Boot,
    Jail,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireStatus {
    Shutdown,
    Failed(String),
    Killed,
}

impl From<&ExitStatus> for WireStatus {
    fn from(s: &ExitStatus) -> WireStatus {
        match s {
            ExitStatus::Shutdown => WireStatus::Shutdown,
            ExitStatus::Failed(why) => WireStatus::Failed(why.clone()),
            ExitStatus::Killed => WireStatus::Killed,
        }
    }
}

impl From<WireStatus> for ExitStatus {
    fn from(s: WireStatus) -> ExitStatus {
        match s {
            WireStatus::Shutdown => ExitStatus::Shutdown,
            WireStatus::Failed(why) => ExitStatus::Failed(why),
            WireStatus::Killed => ExitStatus::Killed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("the other side closed the connection")]
    Closed,
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
    #[error("I/O error on the VMM control socket")]
    Io(#[source] std::io::Error),
}

/// One frame: length prefix and JSON.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtoError> {
    let body = serde_json::to_vec(msg).map_err(ProtoError::Malformed)?;
    if body.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Parse a frame body (without its length prefix).
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ProtoError> {
    serde_json::from_slice(body).map_err(ProtoError::Malformed)
}

/// The length a prefix announces, refused before anything is allocated when
/// it is over the limit.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, ProtoError> {
    let n = u32::from_le_bytes(prefix) as usize;
    if n > MAX_FRAME {
        return Err(ProtoError::TooLarge(n));
    }
    Ok(n)
}

/// Blocking write of one message.
pub fn write_blocking<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtoError> {
    w.write_all(&encode(msg)?).map_err(ProtoError::Io)
}

/// Blocking read of one message.
pub fn read_blocking<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, ProtoError> {
    let mut prefix = [0u8; 4];
    read_exact(r, &mut prefix)?;
    let mut body = vec![0u8; frame_len(prefix)?];
    read_exact(r, &mut body)?;
    decode(&body)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), ProtoError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtoError::Closed,
        _ => ProtoError::Io(e),
    })
}

/// Async read of one message (kiln's side).
pub async fn read_async<T: for<'de> Deserialize<'de>>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<T, ProtoError> {
    let mut prefix = [0u8; 4];
    async_exact(r, &mut prefix).await?;
    let mut body = vec![0u8; frame_len(prefix)?];
    async_exact(r, &mut body).await?;
    decode(&body)
}

async fn async_exact(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut [u8],
) -> Result<(), ProtoError> {
    use tokio::io::AsyncReadExt;
    r.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ProtoError::Closed,
            _ => ProtoError::Io(e),
        })
}

/// Async write of one message.
pub async fn write_async<T: Serialize>(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    msg: &T,
) -> Result<(), ProtoError> {
    use tokio::io::AsyncWriteExt;
    w.write_all(&encode(msg)?).await.map_err(ProtoError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_oversized_frames_are_refused_before_allocation() {
        let mut stats = ExitStats::default();
        stats
            .by_reason
            .insert(crate::kvm::stats::ExitReason::IoOut, 7);
        let msg = FromVmm::Exit {
            status: WireStatus::Failed("x".into()),
            stats: stats.clone(),
            guest_resident: 4096,
        };
        let frame = encode(&msg).unwrap();
        let back: FromVmm = read_blocking(&mut &frame[..]).unwrap();
        match back {
            FromVmm::Exit {
                status,
                stats: s,
                guest_resident,
            } => {
                assert_eq!(status, WireStatus::Failed("x".into()));
                assert_eq!(s, stats);
                assert_eq!(guest_resident, 4096);
            }
            other => panic!("{other:?}"),
        }
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_blocking::<FromVmm>(&mut &huge[..]),
            Err(ProtoError::TooLarge(_))
        ));
        assert!(matches!(
            read_blocking::<FromVmm>(&mut &frame[..3]),
            Err(ProtoError::Closed)
        ));
        let mut junk = 5u32.to_le_bytes().to_vec();
        junk.extend_from_slice(b"{{{{{");
        assert!(matches!(
            read_blocking::<FromVmm>(&mut &junk[..]),
            Err(ProtoError::Malformed(_))
        ));
    }
}
