//! The `nat` mode's firewall, through `iptables` (either backend).
//!
//! Everything kiln adds lives in chains named `KILN-*`:
//!
//! - `filter KILN-FORWARD` (jumped to first from `FORWARD`): replies to the
//!   VMs pass, nothing else enters a VM; per VM `-i kiln-<n> -j KILN-<n>`.
//! - `filter KILN-INPUT` (first in `INPUT`): per VM `-i kiln-<n> -j KILN-<n>-IN`.
//! - `filter KILN-REJECT`: fail fast (TCP reset, else ICMP port unreachable).
//! - `nat KILN-POSTROUTING` (first in `POSTROUTING`): per VM
//!   `-s <guest> -j KILN-<n>`, which masquerades.
//! - per VM `filter KILN-<n>` (what the guest may reach through the host;
//!   first of all, frames from another source MAC or IPv4 address than the
//!   VM's are dropped:
//!   `network_deny` rejected, `network_allow` accepted, the host's private
//!   and link-local ranges and the pool rejected, the rest accepted) and
//!   `filter KILN-<n>-IN` (what it may reach of the host itself: kiln's DNS
//!   relay on its gateway address, `network_allow`, nothing else).
//!
//! One VM's rules are found from its slot alone, so a later kiln removes
//! those of VMs whose TAP device is gone (a kiln that was killed) without
//! any record; the shared chains go when the last VM's do. Every change
//! runs under one lock file, so concurrent kilns never interleave.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

use ipnet::Ipv4Net;

use super::pool::{tap_name, Slot};
use super::{tap, NetworkError};

/// Ranges a guest never reaches unless `network_allow` says so: this
/// network, loopback, the private networks (RFC 1918), shared address
/// space (RFC 6598), link-local (cloud metadata at 169.254.169.254),
/// multicast and reserved space.
pub const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/3",
];

const FORWARD: &str = "KILN-FORWARD";
const INPUT: &str = "KILN-INPUT";
const REJECT: &str = "KILN-REJECT";
const POSTROUTING: &str = "KILN-POSTROUTING";
const LOCK: &str = "/run/kiln-firewall.lock";

/// What one VM may reach.
#[derive(Debug, Clone)]
pub struct Policy {
    pub allow: Vec<Ipv4Net>,
    pub deny: Vec<Ipv4Net>,
    /// The whole address pool (other VMs).
    pub pool: Option<Ipv4Net>,
    /// Connections the VM may have open at once (conntrack entries, UDP
    /// flows included); a new one past it is refused.
    pub max_connections: u32,
}

fn chain(index: u32) -> String {
    format!("KILN-{index}")
}

fn chain_in(index: u32) -> String {
    format!("KILN-{index}-IN")
}

/// Holds the firewall lock (an exclusive `flock`) while alive.
struct Locked(#[allow(dead_code)] File);

fn lock() -> Result<Locked, NetworkError> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK)
        .map_err(|source| NetworkError::Tun {
            what: "open the firewall lock /run/kiln-firewall.lock",
            source,
        })?;
    // SAFETY: flock on a descriptor `f` owns; blocks until it is ours.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(NetworkError::Tun {
            what: "lock /run/kiln-firewall.lock",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(Locked(f))
}

fn iptables(table: &str, args: &[&str]) -> Result<(), NetworkError> {
    let mut all = vec!["-w", "-t", table];
    all.extend_from_slice(args);
    super::run_tool("iptables", &all)
}

fn ok(table: &str, args: &[&str]) -> bool {
    iptables(table, args).is_ok()
}

/// `iptables -S` lines of `table` (of `chain` if given).
fn list(table: &str, chain: Option<&str>) -> Vec<String> {
    let mut c = Command::new("iptables");
    c.args(["-w", "-t", table, "-S"]);
    if let Some(ch) = chain {
        c.arg(ch);
    }
    match c.output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    }
}

/// Create a chain unless it exists; `true` if it was created.
fn new_chain(table: &str, name: &str) -> bool {
    ok(table, &["-N", name])
}

fn ensure_jump(table: &str, from: &str, to: &str) -> Result<(), NetworkError> {
    if !ok(table, &["-C", from, "-j", to]) {
        iptables(table, &["-I", from, "1", "-j", to])?;
    }
    Ok(())
}

/// Whether `chain` of `table` holds `rule`.
fn has(table: &str, chain: &str, rule: &[&str]) -> bool {
    let mut args = vec!["-C", chain];
    args.extend_from_slice(rule);
    ok(table, &args)
}

/// The shared chains, their rules and their jumps, put back where missing.
/// Checked at every VM's start, not only when a chain is created: a kiln
/// killed between creating a chain and filling it, or an `iptables -F`,
/// would otherwise leave `KILN-REJECT` empty, and a jump to an empty chain
/// returns, so the VMs' rules would fall through to their final `ACCEPT`.
fn ensure_base() -> Result<(), NetworkError> {
    new_chain("filter", REJECT);
    let tcp = ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"];
    let other = ["-j", "REJECT", "--reject-with", "icmp-port-unreachable"];
    if !has("filter", REJECT, &tcp) {
        let mut args = vec!["-I", REJECT, "1"];
        args.extend_from_slice(&tcp);
        iptables("filter", &args)?;
    }
    if !has("filter", REJECT, &other) {
        let mut args = vec!["-A", REJECT];
        args.extend_from_slice(&other);
        iptables("filter", &args)?;
    }
    new_chain("filter", FORWARD);
    let replies = [
        "-o",
        "kiln-+",
        "-m",
        "conntrack",
        "--ctstate",
        "RELATED,ESTABLISHED",
        "-j",
        "ACCEPT",
    ];
    // Nothing starts a connection into a VM (other VMs neither).
    let into = ["-o", "kiln-+", "-j", REJECT];
    if !(has("filter", FORWARD, &replies) && has("filter", FORWARD, &into)) {
        // Both first, ahead of the VMs' jumps (a copy left further down
        // does no harm).
        for (at, rule) in [("1", &replies[..]), ("2", &into[..])] {
            let mut args = vec!["-I", FORWARD, at];
            args.extend_from_slice(rule);
            iptables("filter", &args)?;
        }
    }
    new_chain("filter", INPUT);
    new_chain("nat", POSTROUTING);
    ensure_jump("filter", "FORWARD", FORWARD)?;
    ensure_jump("filter", "INPUT", INPUT)?;
    ensure_jump("nat", "POSTROUTING", POSTROUTING)
}

/// Routing between the TAP devices and the outside. Where forwarding was
/// off, the host routed nothing: the `FORWARD` chain's policy becomes
/// `DROP` first (as docker does), so that only what kiln's chains accept is
/// routed, not traffic between the host's other networks. Where it was on
/// already, the host's own routing is the admin's, and left alone.
fn enable_forwarding() -> Result<(), NetworkError> {
    let p = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(p)
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    iptables("filter", &["-P", "FORWARD", "DROP"])?;
    std::fs::write(p, b"1").map_err(|source| NetworkError::Tun {
        what: "enable IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)",
        source,
    })
}

/// Add the rules of the VM in `slot`.
pub fn add_vm(slot: &Slot, policy: &Policy) -> Result<(), NetworkError> {
    let _l = lock()?;
    enable_forwarding()?;
    ensure_base()?;
    let r = add_vm_locked(slot, policy);
    if r.is_err() {
        remove_vm_locked(slot.index);
    }
    r
}

fn add_vm_locked(slot: &Slot, policy: &Policy) -> Result<(), NetworkError> {
    let (fwd, inp, tap) = (chain(slot.index), chain_in(slot.index), slot.tap_name());
    let guest = format!("{}/32", slot.guest);
    let host = format!("{}/32", slot.host);
    for (table, c) in [("filter", &fwd), ("filter", &inp), ("nat", &fwd)] {
        // Left over by a VM that had this slot in a kiln that died.
        if !new_chain(table, c) {
            iptables(table, &["-F", c])?;
        }
    }
    let f = |args: &[&str]| iptables("filter", args);
    let mac = slot.mac_text();
    for c in [&fwd, &inp] {
        // Spoofed sources are dropped, whatever they are for: another
        // address gets no answer (it would go to someone else), another
        // MAC passes nothing (the guest's interface has one).
        f(&[
            "-A",
            c,
            "-m",
            "mac",
            "!",
            "--mac-source",
            &mac,
            "-j",
            "DROP",
        ])?;
        f(&["-A", c, "!", "-s", &guest, "-j", "DROP"])?;
        // The host's connection tracking table is shared by the host and
        // every VM: one guest opening flows without end would fill it.
        f(&[
            "-A",
            c,
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-m",
            "connlimit",
            "--connlimit-above",
            &policy.max_connections.to_string(),
            "--connlimit-mask",
            "32",
            "--connlimit-saddr",
            "-j",
            REJECT,
        ])?;
    }
    // Replies to what the host itself opened (the guest opens nothing
    // to the host but DNS).
    f(&[
        "-A",
        &inp,
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "ACCEPT",
    ])?;
    for proto in ["udp", "tcp"] {
        f(&[
            "-A", &inp, "-d", &host, "-p", proto, "--dport", "53", "-j", "ACCEPT",
        ])?;
    }
    // The gateways of the pool are the host too; `network_allow` (for a
    // registry in 10.0.0.0/8, say) does not open them.
    if let Some(p) = policy.pool {
        f(&["-A", &inp, "-d", &p.to_string(), "-j", REJECT])?;
    }
    for c in [&fwd, &inp] {
        for d in &policy.deny {
            f(&["-A", c, "-d", &d.to_string(), "-j", REJECT])?;
        }
        for a in &policy.allow {
            f(&["-A", c, "-d", &a.to_string(), "-j", "ACCEPT"])?;
        }
    }
    for b in BLOCKED
        .iter()
        .map(|s| s.to_string())
        .chain(policy.pool.map(|p| p.to_string()))
    {
        f(&["-A", &fwd, "-d", &b, "-j", REJECT])?;
    }
    f(&["-A", &fwd, "-j", "ACCEPT"])?;
    f(&["-A", &inp, "-j", REJECT])?;
    // Should `KILN-REJECT` ever return, the host is still closed.
    f(&["-A", &inp, "-j", "DROP"])?;
    iptables("nat", &["-A", &fwd, "-j", "MASQUERADE"])?;
    f(&["-A", FORWARD, "-i", &tap, "-j", &fwd])?;
    f(&["-A", INPUT, "-i", &tap, "-j", &inp])?;
    iptables("nat", &["-A", POSTROUTING, "-s", &guest, "-j", &fwd])
}

/// Remove the rules of the VM in slot `index` (and the shared chains if it
/// was the last VM).
pub fn remove_vm(index: u32) {
    let Ok(_l) = lock() else {
        return;
    };
    remove_vm_locked(index);
    remove_base_if_unused();
}

fn remove_vm_locked(index: u32) {
    let targets = [chain(index), chain_in(index)];
    for (table, base) in [("filter", FORWARD), ("filter", INPUT), ("nat", POSTROUTING)] {
        for line in list(table, Some(base)) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let jumps_to_vm = words
                .windows(2)
                .any(|w| w[0] == "-j" && targets.iter().any(|t| t == w[1]));
            if jumps_to_vm && words.first() == Some(&"-A") {
                let mut args = words.clone();
                args[0] = "-D";
                let _ = iptables(table, &args);
            }
        }
    }
    for (table, c) in [
        ("filter", &targets[0]),
        ("filter", &targets[1]),
        ("nat", &targets[0]),
    ] {
        if ok(table, &["-F", c]) {
            let _ = iptables(table, &["-X", c]);
        }
    }
}

/// The slots that have per-VM chains in this network namespace.
fn vm_chains() -> Vec<u32> {
    let mut v: Vec<u32> = ["filter", "nat"]
        .iter()
        .flat_map(|t| list(t, None))
        .filter_map(|l| {
            l.strip_prefix("-N KILN-")
                .map(|r| r.trim_end_matches("-IN").to_string())
        })
        .filter_map(|n| n.parse::<u32>().ok())
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn remove_base_if_unused() {
    if !vm_chains().is_empty() {
        return;
    }
    for (table, from, to) in [
        ("filter", "FORWARD", FORWARD),
        ("filter", "INPUT", INPUT),
        ("nat", "POSTROUTING", POSTROUTING),
    ] {
        while ok(table, &["-D", from, "-j", to]) {}
    }
    for (table, c) in [
        ("filter", FORWARD),
        ("filter", INPUT),
        ("filter", REJECT),
        ("nat", POSTROUTING),
    ] {
        if ok(table, &["-F", c]) {
            let _ = iptables(table, &["-X", c]);
        }
    }
}

/// Remove the rules of VMs whose TAP device is gone: those of a kiln that
/// was killed. Returns how many VMs' rules were removed.
pub fn remove_stale() -> usize {
    if !iptables_present() {
        return 0;
    }
    let Ok(_l) = lock() else {
        return 0;
    };
    let stale: Vec<u32> = vm_chains()
        .into_iter()
        .filter(|n| !tap::exists(&tap_name(*n)))
        .collect();
    for n in &stale {
        remove_vm_locked(*n);
    }
    remove_base_if_unused();
    stale.len()
}

/// Whether `iptables` runs here, and which backend it drives.
pub fn iptables_version() -> Result<String, String> {
    match Command::new("iptables").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

fn iptables_present() -> bool {
    // Only root can change the firewall; others have nothing of kiln's there.
    // SAFETY: geteuid(2) cannot fail and has no side effects.
    let root = unsafe { libc::geteuid() == 0 };
    root && iptables_version().is_ok()
}
