//! Jobs' network (see `docs/network.md`): the modes, and per VM what the
//! host sets up before the VM starts and removes after it ends.
//!
//! - `nat`: a TAP device `kiln-<n>` with the host's end of a /30 from the
//!   address pool ([`pool`]), masquerading and isolation rules in kiln's own
//!   iptables chains ([`firewall`]), and a DNS relay on the gateway address
//!   ([`dns`]). Needs root (or CAP_NET_ADMIN), `/dev/net/tun` and iptables.
//! - `user`: a `passt` process per VM ([`passt`]); works as any user.
//! - `none`: no interface (only the guest's loopback).
//!
//! [`Networks`] is the executor's: built once (it removes what a killed
//! kiln left behind), it hands each VM a [`JobNetwork`], whose drop removes
//! everything of that VM.

pub mod dns;
pub mod firewall;
pub mod passt;
pub mod pool;
pub mod tap;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::Ipv4Net;
use kiln_agent::proto::GuestNetwork;

use pool::{Pool, Slot, SLOT_PREFIX};

/// Why a VM's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid network configuration: {0}")]
    Config(String),
    #[error("could not {what}")]
    Tun {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("could not run {tool}")]
    Tool {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error(
        "every address of the network pool {0} is in use or overlaps one of this host's routes \
         (configure a larger or another `network_pool`)"
    )]
    PoolExhausted(String),
    #[error("--network {mode} is not possible here: {why}")]
    Unavailable { mode: NetworkMode, why: String },
}

/// How a job's VM reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// `nat` where this host can, else `user`, else `none` (with a warning).
    #[default]
    Auto,
    None,
    Nat,
    User,
}

impl FromStr for NetworkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<NetworkMode, String> {
        match s {
            "auto" => Ok(NetworkMode::Auto),
            "none" => Ok(NetworkMode::None),
            "nat" => Ok(NetworkMode::Nat),
            "user" => Ok(NetworkMode::User),
            other => Err(format!(
                "unknown network mode '{other}' (auto, nat, user or none)"
            )),
        }
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetworkMode::Auto => "auto",
            NetworkMode::None => "none",
            NetworkMode::Nat => "nat",
            NetworkMode::User => "user",
        })
    }
}

/// A runner's network settings (`kiln.toml` or `kiln run-job` flags).
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub mode: NetworkMode,
    /// IPv4 range the VMs' /30s come from (`nat`).
    pub pool: String,
    /// CIDRs a guest may reach although they are private, link-local or
    /// the host's own (`nat`).
    pub allow: Vec<String>,
    /// CIDRs a guest may not reach, whatever `allow` says (`nat`).
    pub deny: Vec<String>,
    /// Servers kiln's DNS relay asks; empty: the host's `/etc/resolv.conf`.
    pub dns: Vec<String>,
    pub mtu: u32,
    /// Connections one VM may have open at once (`nat`; conntrack entries,
    /// UDP flows included): a guest cannot fill the host's connection
    /// tracking table, which the host and every other VM share.
    pub max_connections: u32,
}

/// [`NetworkConfig::max_connections`] unless configured.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
/// The most `max_connections` may be.
pub const MAX_MAX_CONNECTIONS: u32 = 1 << 20;

impl Default for NetworkConfig {
    /// No network: what library users and tests get unless they ask.
    fn default() -> NetworkConfig {
        NetworkConfig {
            mode: NetworkMode::None,
            pool: pool::DEFAULT_POOL.into(),
            allow: Vec::new(),
            deny: Vec::new(),
            dns: Vec::new(),
            mtu: 1500,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

fn cidrs(list: &[String], what: &str) -> Result<Vec<Ipv4Net>, NetworkError> {
    list.iter()
        .map(|c| {
            let c = c.trim();
            c.parse::<Ipv4Net>()
                .or_else(|_| c.parse::<std::net::Ipv4Addr>().map(Ipv4Net::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    NetworkError::Config(format!("{what} entry '{c}' is not an IPv4 CIDR"))
                })
        })
        .collect()
}

const NO_NET_MODULE: &str = "the guest kernel's modules lack virtio_net (a kernel cached before \
     kiln had networking: remove it from the cache's kernels/ folder and run `kiln kernel fetch`)";

/// Whether the guest kernel can drive a virtio-net device: its kept
/// modules include `virtio_net`, or it keeps none (everything built in).
pub fn kernel_has_net(kernel: &kiln_images::Kernel) -> bool {
    kernel.modules.is_empty()
        || kernel.modules.iter().any(|m| {
            m.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.replace('-', "_").starts_with("virtio_net."))
        })
}

/// One line of `kiln doctor` per mode: `(mode, why not)`.
pub fn doctor() -> Vec<(NetworkMode, Option<String>)> {
    [NetworkMode::Nat, NetworkMode::User]
        .into_iter()
        .map(|m| (m, unavailable(m)))
        .collect()
}

/// Run `tool ARGS`; its stderr is the error's detail.
fn run_tool(tool: &'static str, args: &[&str]) -> Result<(), NetworkError> {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .map_err(|source| NetworkError::Tool { tool, source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Command {
            command: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Why `mode` cannot work on this host, if it cannot.
pub fn unavailable(mode: NetworkMode) -> Option<String> {
    match mode {
        NetworkMode::Auto | NetworkMode::None => None,
        NetworkMode::Nat => {
            // SAFETY: geteuid(2) cannot fail and has no side effects.
            if unsafe { libc::geteuid() } != 0 {
                return Some(
                    "nat needs root (TAP devices and firewall rules); use --network user".into(),
                );
            }
            if let Err(e) = std::fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
            {
                return Some(format!("/dev/net/tun cannot be opened ({e}): modprobe tun"));
            }
            if let Err(e) = firewall::iptables_version() {
                return Some(format!(
                    "iptables does not run ({e}): apt-get install iptables"
                ));
            }
            if let Err(e) = std::process::Command::new("ip").arg("-V").output() {
                return Some(format!("`ip` does not run ({e}): apt-get install iproute2"));
            }
            None
        }
        NetworkMode::User => match std::process::Command::new(passt::binary())
            .arg("--help")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            Ok(_) => None,
            Err(e) => Some(format!(
                "{} does not run ({e}): apt-get install passt",
                passt::binary().display()
            )),
        },
    }
}

/// The executor's network: the resolved mode and, for `nat`, the pool and
/// what the guests may reach.
#[derive(Debug)]
pub struct Networks {
    mode: NetworkMode,
    pool: Pool,
    policy: firewall::Policy,
    dns: Vec<IpAddr>,
    mtu: u32,
}

impl Networks {
    /// Check `config` and this host; resolve `auto`. The same modes work on
    /// both backends. Removes the firewall rules of VMs a killed kiln left
    /// behind.
    pub fn new(
        config: &NetworkConfig,
        kernel: &kiln_images::Kernel,
    ) -> Result<Networks, NetworkError> {
        let pool = Pool::new(&config.pool)?;
        let policy = firewall::Policy {
            allow: cidrs(&config.allow, "network_allow")?,
            deny: cidrs(&config.deny, "network_deny")?,
            pool: Some(pool.range()),
            max_connections: config.max_connections,
        };
        if !(1..=MAX_MAX_CONNECTIONS).contains(&config.max_connections) {
            return Err(NetworkError::Config(format!(
                "network_max_connections {} is outside 1..{MAX_MAX_CONNECTIONS}",
                config.max_connections
            )));
        }
        let dns = config
            .dns
            .iter()
            .map(|d| {
                d.trim().parse::<IpAddr>().map_err(|_| {
                    NetworkError::Config(format!("dns entry '{d}' is not an IP address"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !(576..=65535).contains(&config.mtu) {
            return Err(NetworkError::Config(format!(
                "MTU {} is outside 576..65535",
                config.mtu
            )));
        }
        let kernel_net = kernel_has_net(kernel);
        let mode = match config.mode {
            NetworkMode::Auto if !kernel_net => {
                tracing::warn!("no network for jobs: {}", NO_NET_MODULE);
                NetworkMode::None
            }
            NetworkMode::Auto => {
                let nat = unavailable(NetworkMode::Nat);
                let user = unavailable(NetworkMode::User);
                match (nat, user) {
                    (None, _) => NetworkMode::Nat,
                    (Some(why), None) => {
                        // Not silently: `user` has no isolation (cloud
                        // metadata and the host's private networks are
                        // reachable as for any process of this user).
                        tracing::warn!(
                            "jobs get `user` networking (passt), without nat's isolation: \
                             they reach what this user reaches, cloud metadata at \
                             169.254.169.254 included ({why}); choose --network user or \
                             none to silence this"
                        );
                        NetworkMode::User
                    }
                    (Some(a), Some(b)) => {
                        tracing::warn!("jobs get no network: {a}; {b}");
                        NetworkMode::None
                    }
                }
            }
            m => {
                if let Some(why) = unavailable(m) {
                    return Err(NetworkError::Unavailable { mode: m, why });
                }
                if !kernel_net && m != NetworkMode::None {
                    return Err(NetworkError::Unavailable {
                        mode: m,
                        why: NO_NET_MODULE.into(),
                    });
                }
                m
            }
        };
        if mode == NetworkMode::Nat {
            let routes = pool::host_routes()?;
            let over = pool::check_against_routes(pool.range(), &routes)?;
            if !over.is_empty() {
                let over: Vec<String> = over.iter().map(|r| r.to_string()).collect();
                tracing::warn!(
                    "network pool {} overlaps this host's routes {}: the VMs' addresses skip them",
                    pool.range(),
                    over.join(", ")
                );
            }
            let stale = firewall::remove_stale();
            if stale > 0 {
                tracing::info!("removed the firewall rules of {stale} VMs of a kiln that died");
            }
        }
        Ok(Networks {
            mode,
            pool,
            policy,
            dns,
            mtu: config.mtu,
        })
    }

    pub fn mode(&self) -> NetworkMode {
        self.mode
    }

    /// Set up one VM's network; `vm_dir` is the job's directory (passt's
    /// socket goes there).
    pub async fn attach(&self, vm_dir: &Path) -> Result<JobNetwork, NetworkError> {
        match self.mode {
            NetworkMode::Auto | NetworkMode::None => Ok(JobNetwork {
                machine: kiln_vmm::Network::None,
                guest: None,
                _held: Held::Nothing,
            }),
            NetworkMode::User => {
                let dir = vm_dir.join("passt");
                std::fs::create_dir(&dir).map_err(|source| NetworkError::Tun {
                    what: "create passt's directory in the job's",
                    source,
                })?;
                let socket = dir.join("passt.sock");
                let mtu = self.mtu;
                // Forked here, on a runtime thread, and only waited for on
                // the blocking pool (see `passt::spawn`).
                let p = passt::spawn(&socket, mtu)?;
                let p = tokio::task::spawn_blocking(move || p.wait_ready())
                    .await
                    .map_err(|e| NetworkError::Config(format!("passt task: {e}")))??;
                Ok(JobNetwork {
                    machine: kiln_vmm::Network::Passt {
                        socket: p.socket.clone(),
                        mac: PASST_GUEST_MAC,
                        mtu: self.mtu,
                    },
                    guest: Some(GuestNetwork {
                        address: passt::GUEST.to_string(),
                        prefix: passt::PREFIX,
                        gateway: passt::GATEWAY.to_string(),
                        mtu: self.mtu,
                        dns: vec![passt::DNS.to_string()],
                        hostname: "kiln".into(),
                        mac: pool::mac_text(&PASST_GUEST_MAC),
                    }),
                    _held: Held::Passt(p),
                })
            }
            NetworkMode::Nat => self.attach_nat().await,
        }
    }

    async fn attach_nat(&self) -> Result<JobNetwork, NetworkError> {
        let upstreams = dns::upstreams(&self.dns)?;
        let (pool, policy, mtu) = (self.pool.clone(), self.policy.clone(), self.mtu);
        let lease = tokio::task::spawn_blocking(move || NatLease::create(pool, &policy, mtu))
            .await
            .map_err(|e| NetworkError::Config(format!("network set-up task: {e}")))??;
        let slot = lease.slot;
        let relay = dns::start(
            SocketAddr::new(slot.host.into(), 53),
            slot.guest.into(),
            upstreams,
        )
        .await?;
        Ok(JobNetwork {
            machine: kiln_vmm::Network::Tap {
                fd: lease
                    .tap
                    .clone()
                    .ok_or_else(|| NetworkError::Config("TAP gone".into()))?,
                mac: slot.mac(),
                mtu: self.mtu,
            },
            guest: Some(GuestNetwork {
                address: slot.guest.to_string(),
                prefix: SLOT_PREFIX,
                gateway: slot.host.to_string(),
                mtu: self.mtu,
                dns: vec![slot.host.to_string()],
                hostname: "kiln".into(),
                mac: slot.mac_text(),
            }),
            _held: Held::Nat(lease, relay),
        })
    }
}

/// The guest's MAC address in `user` mode (passt learns it from the
/// guest's first frame).
const PASST_GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// One VM's network; dropping it removes everything the host set up for it.
/// Drop it after the VM is gone.
pub struct JobNetwork {
    machine: kiln_vmm::Network,
    guest: Option<GuestNetwork>,
    _held: Held,
}

impl JobNetwork {
    /// What the VM's backend gets.
    pub fn machine(&self) -> kiln_vmm::Network {
        self.machine.clone()
    }

    /// What the agent gets in `Start`.
    pub fn guest(&self) -> Option<GuestNetwork> {
        self.guest.clone()
    }

    /// The TAP device's name (`nat`).
    pub fn tap_name(&self) -> Option<String> {
        match &self._held {
            Held::Nat(l, _) => Some(l.slot.tap_name()),
            _ => None,
        }
    }
}

enum Held {
    Nothing,
    Passt(#[allow(dead_code)] passt::Passt),
    // The relay is declared after the lease: the lease's drop removes the
    // rules first, then the relay stops.
    Nat(NatLease, #[allow(dead_code)] dns::Relay),
}

/// A slot of the pool with its TAP device and firewall rules.
struct NatLease {
    pool: Pool,
    slot: Slot,
    tap: Option<Arc<OwnedFd>>,
}

impl NatLease {
    fn create(pool: Pool, policy: &firewall::Policy, mtu: u32) -> Result<NatLease, NetworkError> {
        // Read at each VM's start: a route added since is honoured too.
        let routes = pool::host_routes()?;
        let (slot, tap) = pool.take(|slot| {
            if let Some(r) = routes.iter().find(|r| r.overlaps(&slot.net())) {
                tracing::debug!("{} overlaps this host's route {r}: skipped", slot.net());
                return Ok(None);
            }
            tap::create(&slot.tap_name())
        })?;
        let lease = NatLease {
            pool,
            slot,
            tap: Some(Arc::new(tap)),
        };
        tap::configure(&slot, mtu)?;
        firewall::add_vm(&slot, policy)?;
        Ok(lease)
    }
}

impl Drop for NatLease {
    fn drop(&mut self) {
        // Rules first (a TAP-less chain would look stale to another kiln),
        // then the device, then the slot.
        firewall::remove_vm(self.slot.index);
        drop(self.tap.take());
        self.pool.release(self.slot.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel with the guest's modules, with or without `virtio_net`.
    fn kernel(net: bool) -> kiln_images::Kernel {
        let mut modules: Vec<std::path::PathBuf> =
            vec!["/k/virtio_mmio.ko".into(), "/k/virtio-rng.ko".into()];
        if net {
            modules.push("/k/virtio_net.ko".into());
        }
        kiln_images::Kernel {
            image: "/k/vmlinux".into(),
            release: "6.1".into(),
            pvh: true,
            modules,
            source: "test".into(),
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for m in ["auto", "none", "nat", "user"] {
            assert_eq!(m.parse::<NetworkMode>().unwrap().to_string(), m);
        }
        assert!("bridge".parse::<NetworkMode>().unwrap_err().contains("nat"));
    }

    #[test]
    fn bad_settings_are_refused_before_anything_is_set_up() {
        let base = NetworkConfig::default();
        let bad = [
            NetworkConfig {
                allow: vec!["10.0.0.0/33".into()],
                ..base.clone()
            },
            NetworkConfig {
                deny: vec!["fd00::/8".into()],
                ..base.clone()
            },
            NetworkConfig {
                dns: vec!["resolver".into()],
                ..base.clone()
            },
            NetworkConfig {
                pool: "10.0.0.0/31".into(),
                ..base.clone()
            },
            NetworkConfig {
                max_connections: 0,
                ..base.clone()
            },
            NetworkConfig {
                mtu: 70000,
                ..base.clone()
            },
        ];
        for c in bad {
            assert!(Networks::new(&c, &kernel(true)).is_err(), "{c:?}");
        }
        let ok = NetworkConfig {
            allow: vec!["192.168.7.0/24".into(), "10.1.2.3".into()],
            ..base
        };
        let n = Networks::new(&ok, &kernel(true)).unwrap();
        assert_eq!(n.mode(), NetworkMode::None);
        assert_eq!(n.policy.allow[1].to_string(), "10.1.2.3/32");
    }

    #[test]
    fn a_kernel_without_virtio_net_gets_no_network_on_auto_and_an_error_when_asked() {
        let auto = NetworkConfig {
            mode: NetworkMode::Auto,
            ..NetworkConfig::default()
        };
        assert_eq!(
            Networks::new(&auto, &kernel(false)).unwrap().mode(),
            NetworkMode::None
        );
        let user = NetworkConfig {
            mode: NetworkMode::User,
            ..NetworkConfig::default()
        };
        if unavailable(NetworkMode::User).is_none() {
            let e = Networks::new(&user, &kernel(false))
                .unwrap_err()
                .to_string();
            assert!(e.contains("virtio_net"), "{e}");
        }
    }
}
