//! kiln's DNS relay: a UDP socket on a VM's gateway address that passes the
//! guest's queries to the host's resolvers (from `/etc/resolv.conf`, or the
//! runner's `dns` setting) and their answers back. A resolver on the host's
//! loopback (127.0.0.53 and the like) is out of the guest's reach, which is
//! why kiln relays instead of handing the guest the host's servers.
//!
//! Bounded: queries and answers of at most [`MAX_MESSAGE`] bytes, at most
//! [`MAX_IN_FLIGHT`] queries at once per VM (more are dropped, as a busy
//! server would), each answered within [`UPSTREAM_TIMEOUT`] per server or
//! not at all.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::NetworkError;

/// Largest DNS message relayed (EDNS0 answers above this are cut by the
/// resolver to fit, with the TC bit set).
pub const MAX_MESSAGE: usize = 4096;
/// Queries of one VM being relayed at once.
pub const MAX_IN_FLIGHT: usize = 32;
/// How long one upstream server may take to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// At most this many upstream servers are tried, as glibc does.
const MAX_SERVERS: usize = 3;

/// The `nameserver` lines of a resolv.conf.
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.split('%').next()?.parse().ok())
        })
        .take(MAX_SERVERS)
        .collect()
}

/// The servers to relay to: `configured`, else the host's resolv.conf.
pub fn upstreams(configured: &[IpAddr]) -> Result<Vec<SocketAddr>, NetworkError> {
    if !configured.is_empty() {
        return Ok(configured
            .iter()
            .take(MAX_SERVERS)
            .map(|a| SocketAddr::new(*a, 53))
            .collect());
    }
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let servers = parse_resolv_conf(&text);
    if servers.is_empty() {
        return Err(NetworkError::Config(
            "no DNS server in /etc/resolv.conf: set `dns` in kiln.toml (or --dns)".into(),
        ));
    }
    Ok(servers
        .into_iter()
        .map(|a| SocketAddr::new(a, 53))
        .collect())
}

/// A running relay; stops when dropped.
pub struct Relay {
    task: JoinHandle<()>,
    pub addr: SocketAddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listen on `listen` (port 53 of the VM's gateway address) for queries
/// from `guest` only.
pub async fn start(
    listen: SocketAddr,
    guest: IpAddr,
    upstreams: Vec<SocketAddr>,
) -> Result<Relay, NetworkError> {
    let sock = UdpSocket::bind(listen)
        .await
        .map_err(|source| NetworkError::Tun {
            what: "bind kiln's DNS relay on the VM's gateway address",
            source,
        })?;
    let addr = sock.local_addr().unwrap_or(listen);
    let sock = Arc::new(sock);
    let task = tokio::spawn(serve(sock, guest, upstreams));
    Ok(Relay { task, addr })
}

async fn serve(sock: Arc<UdpSocket>, guest: IpAddr, upstreams: Vec<SocketAddr>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let upstreams: Arc<[SocketAddr]> = upstreams.into();
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("DNS relay: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if peer.ip() != guest || !(12..=MAX_MESSAGE).contains(&n) {
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // too many queries in flight: drop, the guest retries
        };
        let query = buf[..n].to_vec();
        let (sock, upstreams) = (sock.clone(), upstreams.clone());
        tokio::spawn(async move {
            if let Some(answer) = relay(&query, &upstreams).await {
                let _ = sock.send_to(&answer, peer).await;
            }
            drop(permit);
        });
    }
}

/// Ask each upstream in turn; the first answer with the query's ID wins.
async fn relay(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for server in upstreams {
        let bind: SocketAddr = match server {
            SocketAddr::V4(_) => "0.0.0.0:0".parse().ok()?,
            SocketAddr::V6(_) => "[::]:0".parse().ok()?,
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(*server).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            if n >= 12 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Some(buf);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_servers_in_order_at_most_three() {
        let t = "# c\nsearch x\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n\
                 nameserver bogus\nnameserver 1.1.1.1\nnameserver 8.8.8.8\n";
        let s = parse_resolv_conf(t);
        assert_eq!(
            s,
            vec![
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap(),
                "1.1.1.1".parse().unwrap()
            ]
        );
    }

    /// A fake upstream on loopback answers the guest's query with its ID;
    /// a query from another address, and a runt, get nothing.
    #[tokio::test]
    async fn relays_answers_only_to_the_guest() {
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut b = [0u8; 512];
            while let Ok((n, p)) = upstream.recv_from(&mut b).await {
                let mut ans = b[..n].to_vec();
                ans[2] |= 0x80; // QR: a response
                let _ = upstream.send_to(&ans, p).await;
            }
        });
        let guest = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = start(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            vec![up],
        )
        .await
        .unwrap();
        let q = [0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        guest.send_to(&q, r.addr).await.unwrap();
        let mut b = [0u8; 64];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), guest.recv_from(&mut b))
            .await
            .expect("the relay answers")
            .unwrap();
        assert_eq!((n, from), (12, r.addr));
        assert_eq!(&b[..3], &[0xab, 0xcd, 0x81]);

        guest.send_to(&q[..5], r.addr).await.unwrap();
        let stranger = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        stranger.send_to(&q, r.addr).await.unwrap();
        let quiet = Duration::from_millis(300);
        assert!(tokio::time::timeout(quiet, stranger.recv(&mut b))
            .await
            .is_err());
        assert!(tokio::time::timeout(quiet, guest.recv(&mut b))
            .await
            .is_err());
    }
}
