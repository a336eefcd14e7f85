//! The job's network, from `Start`: `lo` always; with a network, `eth0`
//! (the VM's virtio-net device) with its address, MTU and default route,
//! through the classic ioctls (no netlink, no tools in the image needed),
//! and `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` written inside
//! the job's root (the overlay whose upper layer is the VM's scratch disk,
//! never the shared image).
//!
//! The values come from the host, which is trusted more than the job, but
//! they are checked all the same: each is parsed, lengths and characters
//! are bounded, the gateway must be on the link.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use kiln_agent::proto::{is_host_alias, GuestNetwork};

use super::error::{Error, Result};
use super::NEWROOT;

/// The VM's one network interface.
pub const IFACE: &str = "eth0";
/// How long `eth0` may take to appear after `virtio_net` loads.
const IFACE_WAIT: Duration = Duration::from_secs(10);

const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
const SIOCSIFMTU: libc::c_ulong = 0x8922;
const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
const ARPHRD_ETHER: u16 = 1;
const SIOCADDRT: libc::c_ulong = 0x890b;
const RTF_UP: libc::c_ushort = 0x1;
const RTF_GATEWAY: libc::c_ushort = 0x2;

/// A checked [`GuestNetwork`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub address: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    pub dns: Vec<IpAddr>,
    pub hostname: String,
    pub mac: Option<[u8; 6]>,
}

fn bad(what: &str, value: &str) -> Error {
    Error::Network(format!(
        "the host sent a bad {what}: {:?}",
        value.chars().take(80).collect::<String>()
    ))
}

/// Parse and bound everything the host sent.
pub fn check(n: &GuestNetwork) -> Result<Checked> {
    let ip = |what: &str, s: &str| -> Result<Ipv4Addr> {
        if s.len() > 15 {
            return Err(bad(what, s));
        }
        s.parse().map_err(|_| bad(what, s))
    };
    let address = ip("address", &n.address)?;
    let gateway = ip("gateway", &n.gateway)?;
    if !(8..=31).contains(&n.prefix) {
        return Err(bad("prefix length", &n.prefix.to_string()));
    }
    let netmask = Ipv4Addr::from(u32::MAX << (32 - u32::from(n.prefix)));
    let mask = u32::from(netmask);
    if u32::from(address) & mask != u32::from(gateway) & mask || address == gateway {
        return Err(bad("gateway (not on the link)", &n.gateway));
    }
    if !(576..=65535).contains(&n.mtu) {
        return Err(bad("MTU", &n.mtu.to_string()));
    }
    if n.dns.len() > 3 {
        return Err(bad("DNS server list (more than 3)", &n.dns.join(" ")));
    }
    let dns = n
        .dns
        .iter()
        .map(|d| {
            if d.len() > 39 {
                return Err(bad("DNS server", d));
            }
            d.parse::<IpAddr>().map_err(|_| bad("DNS server", d))
        })
        .collect::<Result<Vec<_>>>()?;
    let h = &n.hostname;
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if h.len() > 64 || !h.split('.').all(label_ok) {
        return Err(bad("host name", h));
    }
    let mac = match n.mac.as_str() {
        "" => None,
        m => Some(parse_mac(m).ok_or_else(|| bad("MAC address", m))?),
    };
    Ok(Checked {
        address,
        netmask,
        gateway,
        mtu: n.mtu,
        dns,
        hostname: h.clone(),
        mac,
    })
}

/// `aa:bb:cc:dd:ee:ff`, a unicast address (the low bit of the first octet
/// clear) other than all zeros.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// Bring up `lo`, and `eth0` with `net` if the job has a network; write
/// the name-service files into the job's root, with `aliases` (the
/// services') on 127.0.0.1. Returns those files, for the services' roots.
pub fn setup(net: Option<&GuestNetwork>, aliases: &[String]) -> Result<Vec<NameFile>> {
    let sock = Sock::open()?;
    sock.up("lo")?;
    let Some(net) = net else {
        // No network, but `localhost` resolves, as under docker.
        let files = vec![("/etc/hosts", hosts(None, "kiln", aliases))];
        write_files(NEWROOT, &files)?;
        return Ok(files);
    };
    let c = check(net)?;
    wait_for_iface()?;
    if let Some(mac) = c.mac {
        sock.set_mac(IFACE, mac)?;
    }
    sock.ioctl_int(IFACE, SIOCSIFMTU, c.mtu as libc::c_int, "set the MTU of")?;
    sock.ioctl_addr(IFACE, SIOCSIFADDR, c.address, "set the address of")?;
    sock.ioctl_addr(IFACE, SIOCSIFNETMASK, c.netmask, "set the netmask of")?;
    sock.up(IFACE)?;
    sock.default_route(c.gateway)?;
    let files = files(&c, aliases).to_vec();
    write_files(NEWROOT, &files)?;
    super::sys::sethostname(&c.hostname);
    Ok(files)
}

/// A name-service file: its path inside a root, and its contents.
pub type NameFile = (&'static str, String);

fn wait_for_iface() -> Result<()> {
    let name = CString::new(IFACE).map_err(|_| Error::NulByte(IFACE.into()))?;
    let t0 = Instant::now();
    loop {
        // SAFETY: if_nametoindex reads the NUL-terminated `name`.
        if unsafe { libc::if_nametoindex(name.as_ptr()) } != 0 {
            return Ok(());
        }
        if t0.elapsed() > IFACE_WAIT {
            return Err(Error::NotFound {
                what: format!(
                    "network interface {IFACE} (the guest kernel's initramfs may lack \
                     virtio_net: refetch the kernel with `kiln kernel fetch`)"
                ),
                limit: IFACE_WAIT,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `struct ifreq`: a name and a 24-byte union, filled per request.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(iface: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        for (d, s) in r
            .name
            .iter_mut()
            .zip(iface.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        r
    }
}

/// `struct sockaddr_in` bytes for `ip` (port 0), as `struct sockaddr`.
fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let mut sa = libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: [0; 14],
    };
    for (d, s) in sa.sa_data[2..6].iter_mut().zip(ip.octets()) {
        *d = s as libc::c_char;
    }
    sa
}

/// The kernel's `struct rtentry` (x86_64 layout).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// An `AF_INET` datagram socket to issue interface ioctls on.
struct Sock(OwnedFd);

impl Sock {
    fn open() -> Result<Sock> {
        // SAFETY: socket(2) with constant arguments; the result is checked
        // and owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Error::NetIoctl {
                what: "open a socket for".into(),
                iface: String::new(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Ok(Sock(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ioctl(&self, iface: &str, req: libc::c_ulong, r: &mut IfReq, what: &str) -> Result<()> {
        // SAFETY: every request used here (SIOC[GS]IF*) reads or writes a
        // `struct ifreq`, which `IfReq` lays out (16-byte name, 24-byte
        // union); `r` lives across the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), req as _, r as *mut IfReq) };
        if rc != 0 {
            return Err(Error::NetIoctl {
                what: what.into(),
                iface: iface.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn ioctl_int(&self, iface: &str, req: libc::c_ulong, v: libc::c_int, what: &str) -> Result<()> {
        let mut r = IfReq::new(iface);
        r.data[..4].copy_from_slice(&v.to_ne_bytes());
        self.ioctl(iface, req, &mut r, what)
    }

    fn ioctl_addr(&self, iface: &str, req: libc::c_ulong, ip: Ipv4Addr, what: &str) -> Result<()> {
        let mut r = IfReq::new(iface);
        let sa = sockaddr(ip);
        r.data[..2].copy_from_slice(&sa.sa_family.to_ne_bytes());
        for (d, s) in r.data[2..16].iter_mut().zip(sa.sa_data) {
            *d = s as u8;
        }
        self.ioctl(iface, req, &mut r, what)
    }

    /// Set `iface`'s hardware address (while it is down).
    fn set_mac(&self, iface: &str, mac: [u8; 6]) -> Result<()> {
        let mut r = IfReq::new(iface);
        r.data[..2].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        r.data[2..8].copy_from_slice(&mac);
        self.ioctl(iface, SIOCSIFHWADDR, &mut r, "set the MAC address of")
    }

    fn up(&self, iface: &str) -> Result<()> {
        let mut r = IfReq::new(iface);
        self.ioctl(iface, SIOCGIFFLAGS, &mut r, "read the flags of")?;
        let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as i16;
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        self.ioctl(iface, SIOCSIFFLAGS, &mut r, "bring up")
    }

    fn default_route(&self, gateway: Ipv4Addr) -> Result<()> {
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr(gateway),
            rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_flags: RTF_UP | RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: SIOCADDRT reads a `struct rtentry`, which `RtEntry` lays
        // out; its pointers are null (no device name: the kernel finds the
        // interface from the gateway's on-link route).
        let rc =
            unsafe { libc::ioctl(self.0.as_raw_fd(), SIOCADDRT as _, &mut rt as *mut RtEntry) };
        if rc != 0 {
            return Err(Error::NetIoctl {
                what: "add the default route via".into(),
                iface: gateway.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// The contents of the job's `/etc/resolv.conf`, `/etc/hosts` and
/// `/etc/hostname`; `aliases` on 127.0.0.1.
pub fn files(c: &Checked, aliases: &[String]) -> [NameFile; 3] {
    let mut resolv = String::from("# written by kiln\n");
    for d in &c.dns {
        resolv.push_str(&format!("nameserver {d}\n"));
    }
    // glibc asks without EDNS0 unless told, and an answer over 512 bytes
    // then comes truncated, for a retry over TCP, which kiln does not relay.
    resolv.push_str("options edns0\n");
    [
        ("/etc/resolv.conf", resolv),
        ("/etc/hosts", hosts(Some(c.address), &c.hostname, aliases)),
        ("/etc/hostname", format!("{}\n", c.hostname)),
    ]
}

/// `/etc/hosts`: localhost and `aliases` (the services', those that are
/// host names: [`is_host_alias`]), and the host name on the guest's address
/// (on loopback without one).
fn hosts(address: Option<Ipv4Addr>, hostname: &str, aliases: &[String]) -> String {
    let mut local = String::from("localhost");
    for a in aliases.iter().filter(|a| is_host_alias(a)) {
        local.push(' ');
        local.push_str(a);
    }
    format!(
        "127.0.0.1\t{local}\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{hostname}\n",
        address.map_or_else(|| "127.0.1.1".to_string(), |a| a.to_string())
    )
}

/// Write [`files`] inside `root` (the job's, or a service's): whatever the
/// image has there (a file, or a symbolic link that could point anywhere) is
/// removed first, and the new file is created without following links.
pub fn write_files(root: &str, files: &[(&str, String)]) -> Result<()> {
    let etc = format!("{root}/etc");
    match std::fs::symlink_metadata(&etc) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Error::Network("the image's /etc is not a directory".into())),
        Err(_) => std::fs::create_dir(&etc).map_err(|e| Error::Mkdir {
            path: etc.clone(),
            source: e,
        })?,
    }
    for (path, text) in files {
        let host = format!("{root}{path}");
        let fail = |e: std::io::Error| Error::StepFile {
            what: format!("cannot write {path}"),
            error: e,
        };
        match std::fs::remove_file(&host) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&host)
            .map_err(fail)?;
        f.write_all(text.as_bytes()).map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> GuestNetwork {
        GuestNetwork {
            address: "10.213.0.2".into(),
            prefix: 30,
            gateway: "10.213.0.1".into(),
            mtu: 1500,
            dns: vec!["10.213.0.1".into()],
            hostname: "kiln".into(),
            mac: "52:54:00:0a:d5:02".into(),
        }
    }

    #[test]
    fn a_good_config_gives_the_files() {
        let c = check(&good()).unwrap();
        assert_eq!(c.netmask, Ipv4Addr::new(255, 255, 255, 252));
        let [resolv, hosts, hostname] =
            files(&c, &["db".into(), "a b".into(), "x\n1.2.3.4 y".into()]);
        assert!(resolv.1.ends_with("nameserver 10.213.0.1\noptions edns0\n"));
        assert!(hosts.1.contains("127.0.0.1\tlocalhost db\n"), "{}", hosts.1);
        assert!(hosts.1.contains("10.213.0.2\tkiln\n"));
        assert_eq!(hostname.1, "kiln\n");
        assert_eq!(c.mac, Some([0x52, 0x54, 0x00, 0x0a, 0xd5, 0x02]));
        let keep = GuestNetwork {
            mac: String::new(),
            ..good()
        };
        assert_eq!(check(&keep).unwrap().mac, None, "no MAC: the device's");
    }

    #[test]
    fn hostile_values_are_refused() {
        type Edit = Box<dyn Fn(&mut GuestNetwork)>;
        let cases: Vec<Edit> = vec![
            Box::new(|n| n.address = "10.213.0.2\nnameserver 6.6.6.6".into()),
            Box::new(|n| n.address = "999.1.1.1".into()),
            Box::new(|n| n.gateway = "10.99.0.1".into()),
            Box::new(|n| n.gateway = n.address.clone()),
            Box::new(|n| n.prefix = 32),
            Box::new(|n| n.prefix = 0),
            Box::new(|n| n.mtu = 100),
            Box::new(|n| n.dns = vec!["1.1.1.1".into(); 4]),
            Box::new(|n| n.dns = vec!["evil\n".into()]),
            Box::new(|n| n.hostname = "a b".into()),
            Box::new(|n| n.hostname = "-x".into()),
            Box::new(|n| n.hostname = "x".repeat(65)),
            Box::new(|n| n.hostname = "x/../../etc".into()),
            Box::new(|n| n.hostname = String::new()),
            Box::new(|n| n.mac = "53:54:00:0a:d5:02".into()), // multicast
            Box::new(|n| n.mac = "00:00:00:00:00:00".into()),
            Box::new(|n| n.mac = "52:54:00:0a:d5".into()),
            Box::new(|n| n.mac = "52:54:00:0a:d5:02:03".into()),
            Box::new(|n| n.mac = "52:54:00:0a:d5:2".into()),
            Box::new(|n| n.mac = "52:54:00:0a:d5:+2".into()),
            Box::new(|n| n.mac = "52-54-00-0a-d5-02".into()),
        ];
        for (i, f) in cases.iter().enumerate() {
            let mut n = good();
            f(&mut n);
            assert!(check(&n).is_err(), "case {i} accepted: {n:?}");
        }
    }
}
