//! The per-VM address pool: a /30 per VM out of a configured IPv4 range.
//! Slot `n` is the n-th /30: `.0` network, `.1` the host's end (the TAP
//! device's address, the guest's gateway and DNS server), `.2` the guest,
//! `.3` broadcast. The slot also names the TAP device (`kiln-<n>`) and the
//! firewall chains (`KILN-<n>`), so everything of one VM is found from it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;

use super::NetworkError;

/// The default pool: inside 10.0.0.0/8, in a /16 few networks use.
pub const DEFAULT_POOL: &str = "10.213.0.0/16";

/// One VM's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
}

/// The prefix length of every VM's link.
pub const SLOT_PREFIX: u8 = 30;

impl Slot {
    /// The TAP device's name (at most 15 bytes: `kiln-` and 7 digits at most
    /// for a pool as large as a /8).
    pub fn tap_name(&self) -> String {
        tap_name(self.index)
    }

    /// The guest's MAC address (locally administered QEMU range, the slot
    /// in its last three bytes): the only source MAC its TAP accepts.
    pub fn mac(&self) -> [u8; 6] {
        let i = self.index;
        [0x52, 0x54, 0x00, (i >> 16) as u8, (i >> 8) as u8, i as u8]
    }

    /// The slot's /30.
    pub fn net(&self) -> Ipv4Net {
        Ipv4Net::new(Ipv4Addr::from(u32::from(self.host) - 1), SLOT_PREFIX)
            .expect("a /30 is a valid prefix")
    }

    /// [`Slot::mac`] as `iptables -m mac` writes it.
    pub fn mac_text(&self) -> String {
        mac_text(&self.mac())
    }
}

/// A MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn tap_name(index: u32) -> String {
    format!("kiln-{index}")
}

/// The slots of one range; the ones this process holds are taken. Other
/// processes' VMs are told apart by their TAP device, which exists while its
/// VM does (see `tap::create`, which refuses an existing name).
#[derive(Debug, Clone)]
pub struct Pool {
    range: Ipv4Net,
    taken: Arc<Mutex<BTreeSet<u32>>>,
}

impl Pool {
    pub fn new(range: &str) -> Result<Pool, NetworkError> {
        let range: Ipv4Net = range.parse().map_err(|_| {
            NetworkError::Config(format!(
                "network pool '{range}' is not an IPv4 CIDR (e.g. {DEFAULT_POOL})"
            ))
        })?;
        if range.prefix_len() > 30 {
            return Err(NetworkError::Config(format!(
                "network pool {range} is smaller than one VM's /30"
            )));
        }
        if range.prefix_len() < 8 {
            return Err(NetworkError::Config(format!(
                "network pool {range} is larger than a /8"
            )));
        }
        Ok(Pool {
            range: range.trunc(),
            taken: Arc::default(),
        })
    }

    pub fn range(&self) -> Ipv4Net {
        self.range
    }

    pub fn slots(&self) -> u32 {
        1u32 << (30 - self.range.prefix_len())
    }

    pub fn slot(&self, index: u32) -> Slot {
        let base = u32::from(self.range.network()) + index * 4;
        Slot {
            index,
            host: Ipv4Addr::from(base + 1),
            guest: Ipv4Addr::from(base + 2),
        }
    }

    /// Take the lowest free slot for which `claim` succeeds (`claim` creates
    /// the slot's TAP device; it fails where another process has it).
    /// Returns the slot and what `claim` returned; the slot is free again
    /// when [`Pool::release`] is called.
    pub fn take<T>(
        &self,
        mut claim: impl FnMut(Slot) -> Result<Option<T>, NetworkError>,
    ) -> Result<(Slot, T), NetworkError> {
        for index in 0..self.slots() {
            {
                let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
                if !taken.insert(index) {
                    continue;
                }
            }
            let slot = self.slot(index);
            match claim(slot) {
                Ok(Some(t)) => return Ok((slot, t)),
                Ok(None) => self.release(index),
                Err(e) => {
                    self.release(index);
                    return Err(e);
                }
            }
        }
        Err(NetworkError::PoolExhausted(self.range.to_string()))
    }

    pub fn release(&self, index: u32) {
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&index);
    }
}

/// A route of this host that is not kiln's: a slot overlapping one is
/// never used, since its TAP's addresses would take over traffic the host
/// sends there (a careless `network_pool` naming the LAN would cut the host
/// off its own gateway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub dst: Ipv4Net,
    /// The route's device; empty for one without (`unreachable`, ...).
    pub dev: String,
}

impl HostRoute {
    /// A route of a kiln VM's TAP (this kiln's or another's).
    pub fn is_kiln(&self) -> bool {
        self.dev.starts_with("kiln-")
    }

    pub fn overlaps(&self, net: &Ipv4Net) -> bool {
        self.dst.contains(&net.network()) || net.contains(&self.dst.network())
    }
}

impl std::fmt::Display for HostRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.dev.is_empty() {
            write!(f, "{}", self.dst)
        } else {
            write!(f, "{} (dev {})", self.dst, self.dev)
        }
    }
}

/// The routes of `ip -j -4 route show table all` but default routes and
/// those shorter than a /8, which a pool may not be (every address is
/// inside one; a VPN's `0.0.0.0/1` and `128.0.0.0/1` are a default route
/// in two halves). Routes of kiln's TAPs are kept ([`HostRoute::is_kiln`]):
/// another kiln's pool may overlap this one's without being the same.
pub fn parse_host_routes(json: &str) -> Result<Vec<HostRoute>, String> {
    #[derive(serde::Deserialize)]
    struct Route {
        #[serde(default)]
        dst: String,
        #[serde(default)]
        dev: String,
    }
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let routes: Vec<Route> =
        serde_json::from_str(json).map_err(|e| format!("`ip -j route` printed {e}"))?;
    let mut found = Vec::new();
    for r in routes {
        if r.dst.is_empty() || r.dst == "default" {
            continue;
        }
        let dst = r
            .dst
            .parse::<Ipv4Net>()
            .or_else(|_| r.dst.parse::<Ipv4Addr>().map(Ipv4Net::from))
            .map_err(|_| format!("`ip -j route` printed a destination '{}'", r.dst))?;
        if dst.prefix_len() < 8 {
            continue;
        }
        found.push(HostRoute {
            dst: dst.trunc(),
            dev: r.dev,
        });
    }
    Ok(found)
}

/// This host's routes (every table: the local table holds its own
/// addresses), from `ip`.
pub fn host_routes() -> Result<Vec<HostRoute>, NetworkError> {
    let args = ["-j", "-4", "route", "show", "table", "all"];
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetworkError::Tool { tool: "ip", source })?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    parse_host_routes(&String::from_utf8_lossy(&out.stdout)).map_err(NetworkError::Config)
}

/// Refuse a pool that lies wholly inside one of `routes` that is not
/// kiln's (no slot of it could ever be used); otherwise the routes it
/// overlaps that are not kiln's. ([`Pool::take`]'s caller skips every slot
/// that overlaps any route, kiln's included.)
pub fn check_against_routes(
    range: Ipv4Net,
    routes: &[HostRoute],
) -> Result<Vec<&HostRoute>, NetworkError> {
    let routes = routes.iter().filter(|r| !r.is_kiln());
    if let Some(r) = routes.clone().find(|r| r.dst.contains(&range)) {
        return Err(NetworkError::Config(format!(
            "network pool {range} lies inside this host's route {r}: its addresses \
             would take over the host's traffic there; set `network_pool` \
             (--network-pool) to a range this host does not use"
        )));
    }
    Ok(routes.filter(|r| r.overlaps(&range)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_disjoint_slash_30s_inside_the_range() {
        let p = Pool::new("10.213.0.0/16").unwrap();
        assert_eq!(p.slots(), 16384);
        let s = p.slot(3);
        assert_eq!(s.host, Ipv4Addr::new(10, 213, 0, 13));
        assert_eq!(s.guest, Ipv4Addr::new(10, 213, 0, 14));
        let last = p.slot(p.slots() - 1);
        assert_eq!(last.guest, Ipv4Addr::new(10, 213, 255, 254));
        assert!(tap_name(Pool::new("10.0.0.0/8").unwrap().slots() - 1).len() <= 15);
        assert!(Pool::new("10.0.0.1/31").is_err());
        assert!(Pool::new("not-a-cidr").is_err());
    }

    #[test]
    fn concurrent_takers_never_share_a_slot() {
        let p = Pool::new("10.213.0.0/28").unwrap(); // 4 slots
        let got: Vec<u32> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| p.take(|_| Ok(Some(()))).unwrap().0.index))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let set: BTreeSet<u32> = got.iter().copied().collect();
        assert_eq!(set.len(), 4, "{got:?}");
        assert!(matches!(
            p.take(|_| Ok(Some(()))),
            Err(NetworkError::PoolExhausted(_))
        ));
        p.release(2);
        // A slot another process holds (its claim fails) is skipped.
        p.release(1);
        let (slot, ()) = p.take(|s| Ok((s.index != 1).then_some(()))).unwrap();
        assert_eq!(slot.index, 2);
    }

    #[test]
    fn host_routes_are_read_and_default_like_ones_left_out() {
        let json = r#"[
          {"dst":"default","gateway":"192.168.1.1","dev":"eth0","flags":[]},
          {"dst":"192.168.1.0/24","dev":"eth0","protocol":"kernel","scope":"link"},
          {"dst":"10.213.0.0/30","dev":"kiln-0","protocol":"kernel"},
          {"type":"local","dst":"10.213.0.1","dev":"kiln-0","table":"local"},
          {"type":"local","dst":"10.99.0.7","dev":"lo","table":"local"},
          {"type":"unreachable","dst":"172.16.0.0/12","flags":[]},
          {"type":"blackhole","dst":"0.0.0.0/0","table":"7"},
          {"dst":"0.0.0.0/1","gateway":"10.8.0.1","dev":"tun0"},
          {"dst":"128.0.0.0/1","gateway":"10.8.0.1","dev":"tun0"}
        ]"#;
        let routes = parse_host_routes(json).unwrap();
        let shown: Vec<String> = routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            [
                "192.168.1.0/24 (dev eth0)",
                "10.213.0.0/30 (dev kiln-0)",
                "10.213.0.1/32 (dev kiln-0)",
                "10.99.0.7/32 (dev lo)",
                "172.16.0.0/12"
            ]
        );
        assert!(routes[1].is_kiln() && !routes[0].is_kiln());
        assert!(parse_host_routes("not json").is_err());
        assert!(parse_host_routes(r#"[{"dst":"nonsense"}]"#).is_err());
    }

    #[test]
    fn a_pool_inside_a_host_route_is_refused_and_overlapping_slots_are_named() {
        let routes = parse_host_routes(
            r#"[{"dst":"192.168.1.0/24","dev":"eth0"},{"dst":"10.213.0.5","dev":"lo"},
                {"dst":"10.214.0.0/30","dev":"kiln-0"}]"#,
        )
        .unwrap();
        // Another kiln's VM is no reason to refuse a pool, nor to warn.
        let tiny = "10.214.0.0/30".parse().unwrap();
        assert!(check_against_routes(tiny, &routes).unwrap().is_empty());
        let lan = Pool::new("192.168.1.0/26").unwrap();
        let e = check_against_routes(lan.range(), &routes).unwrap_err();
        assert!(e.to_string().contains("192.168.1.0/24 (dev eth0)"), "{e}");
        let p = Pool::new("10.213.0.0/16").unwrap();
        let over = check_against_routes(p.range(), &routes).unwrap();
        assert_eq!(over.len(), 1);
        // 10.213.0.5 is in slot 1's /30 only.
        let hit: Vec<u32> = (0..4)
            .filter(|&i| over.iter().any(|r| r.overlaps(&p.slot(i).net())))
            .collect();
        assert_eq!(hit, [1]);
        assert_eq!(p.slot(1).net().to_string(), "10.213.0.4/30");
    }
}
