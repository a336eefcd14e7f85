//! Handing things to the VMM process: files opened by kiln, descriptor
//! copies out of the way of the fixed numbers ([`super::fds`]), and the
//! network backend's descriptor.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::proto::{WireNetKind, WireNetwork};
use super::HIGH_FD;
use crate::error::MachineError;

pub(crate) fn open(
    what: &'static str,
    path: &Path,
    write: bool,
) -> Result<std::fs::File, MachineError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|source| MachineError::MissingFile {
            what,
            path: path.to_path_buf(),
            source,
        })
}

pub(super) fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> MachineError {
    move |source| MachineError::Io { what, source }
}

/// A copy of `fd` at a number >= [`HIGH_FD`], close-on-exec.
pub(super) fn high_copy(fd: &impl AsRawFd) -> Result<OwnedFd, MachineError> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one (or
    // -1); ownership of the new one passes to the OwnedFd.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if n < 0 {
        return Err(MachineError::Io {
            what: "VMM descriptors",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `n` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// The descriptor the VMM process's virtio-net device uses, and what it is:
/// the TAP itself (kiln keeps its own handle), or a fresh connection to
/// passt's socket, made here because the jailed VMM process resolves no
/// path.
pub(crate) fn network_backend(
    network: &crate::Network,
) -> Result<Option<(OwnedFd, WireNetwork)>, MachineError> {
    let mtu = |m: u32| u16::try_from(m).unwrap_or(u16::MAX);
    Ok(match network {
        crate::Network::None => None,
        crate::Network::Tap { fd, mac, mtu: m } => Some((
            fd.try_clone().map_err(io_err("TAP descriptor"))?,
            WireNetwork {
                kind: WireNetKind::Tap,
                mac: *mac,
                mtu: mtu(*m),
            },
        )),
        crate::Network::Passt {
            socket,
            mac,
            mtu: m,
        } => {
            let s = std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
                MachineError::MissingFile {
                    what: "passt socket",
                    path: socket.clone(),
                    source,
                }
            })?;
            Some((
                s.into(),
                WireNetwork {
                    kind: WireNetKind::Stream,
                    mac: *mac,
                    mtu: mtu(*m),
                },
            ))
        }
    })
}
