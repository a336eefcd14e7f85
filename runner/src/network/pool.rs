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
}
