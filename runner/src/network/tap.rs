//! TAP devices: one per VM, `kiln-<slot>`, created with `TUNSETIFF` on
//! `/dev/net/tun` (with a 12-byte virtio-net header on every frame) and
//! never made persistent, so the kernel removes it (with
//! its address and route) when the last descriptor closes: kiln's and
//! QEMU's. A kiln killed with SIGKILL therefore leaves no TAP behind (its
//! QEMU dies with it through `PR_SET_PDEATHSIG`).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};

use super::pool::{Slot, SLOT_PREFIX};
use super::NetworkError;

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Create the TAP device `name`; `Ok(None)` when that name exists already
/// (another VM, maybe of another kiln, has it).
pub fn create(name: &str) -> Result<Option<OwnedFd>, NetworkError> {
    if name.len() >= libc::IFNAMSIZ
        || name
            .bytes()
            .any(|b| !b.is_ascii_alphanumeric() && b != b'-')
    {
        return Err(NetworkError::Config(format!("bad interface name '{name}'")));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| NetworkError::Tun {
            what: "open /dev/net/tun (kiln needs root, or CAP_NET_ADMIN, for --network nat)",
            source,
        })?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_TUN_EXCL | libc::IFF_VNET_HDR)
            as libc::c_short,
        _pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads a `struct ifreq` (40 bytes: a NUL-terminated
    // name of at most IFNAMSIZ bytes and the flags); `req` is that layout,
    // lives across the call, and `tun` is an open /dev/net/tun descriptor.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EBUSY) | Some(libc::EEXIST) => Ok(None),
            _ => Err(NetworkError::Tun {
                what: "create a TAP device (TUNSETIFF)",
                source: e,
            }),
        };
    }
    // Every frame carries a `virtio_net_hdr_v1` (12 bytes, the virtio 1.x
    // header with `num_buffers`), so the VMM can hand checksum and
    // segmentation offloads to the host's stack instead of the guest's
    // CPU (QEMU negotiates them itself; kiln's own device, see
    // `kiln_vmm::Network::Tap`).
    // The size kiln's own device reads and writes (`virtio_net_hdr_v1`).
    let len = kiln_vmm::kvm::devices::virtio::net::NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which
    // points at `len` for the duration of the call; `tun` is the TAP.
    let rc = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETVNETHDRSZ,
            &len as *const libc::c_int,
        )
    };
    if rc != 0 {
        return Err(NetworkError::Tun {
            what: "set the TAP's virtio-net header size (TUNSETVNETHDRSZ)",
            source: std::io::Error::last_os_error(),
        });
    }
    // The host may hand the guest's side unchecksummed and unsegmented TCP
    // (the guest's device drops what its driver did not take; QEMU sets
    // this again from what its guest negotiated). The jailed VMM may not
    // call ioctl on the TAP, so kiln sets it here.
    let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    // SAFETY: TUNSETOFFLOAD takes its flags as the integer argument; no
    // memory is passed.
    let rc = unsafe {
        libc::ioctl(
            tun.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(offloads),
        )
    };
    if rc != 0 {
        return Err(NetworkError::Tun {
            what: "set the TAP's offloads (TUNSETOFFLOAD)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(Some(tun.into()))
}

/// Whether an interface `name` exists in this network namespace.
pub fn exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated string, which `c` is
    // for the duration of the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Give the TAP its host address (the on-link route comes with it), the
/// MTU, no IPv6 (the guest gets none, so nothing of the host is reachable
/// over link-local IPv6), strict reverse-path filtering, and bring it up.
pub fn configure(slot: &Slot, mtu: u32) -> Result<(), NetworkError> {
    let name = slot.tap_name();
    // No IPv6 on the TAP: the isolation rules are IPv4 ones. Where the host
    // has no IPv6 at all (no /proc/sys/net/ipv6) there is nothing to turn
    // off; a write that fails otherwise leaves a way around the firewall,
    // so the job does not get this network.
    let v6 = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if std::path::Path::new("/proc/sys/net/ipv6").exists() {
        std::fs::write(&v6, b"1").map_err(|source| NetworkError::Tun {
            what: "turn IPv6 off on the TAP (its isolation rules are IPv4 only)",
            source,
        })?;
    }
    // Strict reverse-path filtering: a source the host would not route back
    // through this TAP is dropped before the firewall (which drops it too).
    let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), b"1");
    ip(&[
        "addr",
        "add",
        &format!("{}/{SLOT_PREFIX}", slot.host),
        "dev",
        &name,
    ])?;
    ip(&["link", "set", "dev", &name, "mtu", &mtu.to_string(), "up"])
}

/// Run `ip ARGS` (iproute2).
pub fn ip(args: &[&str]) -> Result<(), NetworkError> {
    super::run_tool("ip", args)
}
