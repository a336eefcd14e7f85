//! kiln's DNS relay: a UDP socket on a VM's gateway address that passes the
//! guest's queries to the host's resolvers (from `/etc/resolv.conf`, or the
//! runner's `dns` setting) and their answers back. A resolver on the host's
//! loopback (127.0.0.53 and the like) is out of the guest's reach, which is
//! why kiln relays instead of handing the guest the host's servers.
//!
//! Bounded: queries of at most [`MAX_MESSAGE`] bytes, answers of at most
//! [`MAX_ANSWER`], at most [`MAX_IN_FLIGHT`] queries at once per VM (more
//! are dropped, as a busy server would), each answered within
//! [`UPSTREAM_TIMEOUT`] per server (at most three servers) or not at all.
//! Only standard queries (QR 0, opcode QUERY, one question) are relayed:
//! an UPDATE or NOTIFY would reach the upstream from the host's address.
//! The relay's socket and its queries belong to one task, so dropping the
//! [`Relay`] frees the gateway's port 53 for the slot's next VM.
//!
//! DNS over TCP (RFC 7766) is relayed too, for the answers too large for
//! the guest's UDP: at most [`MAX_TCP_CONNECTIONS`] connections per VM,
//! each closed after [`TCP_IDLE`] without a whole query or after
//! [`MAX_TCP_QUERIES`] queries; each query goes to the upstreams over TCP
//! with the same checks and timeouts as over UDP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::NetworkError;

/// Largest query relayed.
pub const MAX_MESSAGE: usize = 4096;
/// Largest answer relayed: a UDP datagram's largest payload (a resolver
/// cuts an answer to the client's EDNS0 size itself, with the TC bit set).
pub const MAX_ANSWER: usize = 65535;
/// Queries of one VM being relayed at once.
pub const MAX_IN_FLIGHT: usize = 32;
/// How long one upstream server may take to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP connections of one VM to the relay at once.
pub const MAX_TCP_CONNECTIONS: usize = 8;
/// How long a TCP connection may wait for its next whole query.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries one TCP connection may carry.
pub const MAX_TCP_QUERIES: usize = 64;
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
    tcp_task: JoinHandle<()>,
    pub addr: SocketAddr,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.tcp_task.abort();
    }
}

/// Listen on `listen` (port 53 of the VM's gateway address) for queries
/// from `guest` only.
pub async fn start(
    listen: SocketAddr,
    guest: IpAddr,
    upstreams: Vec<SocketAddr>,
) -> Result<Relay, NetworkError> {
    // The slot's previous relay may still be going away (its tasks are
    // aborted, not awaited): give it a moment.
    let sock = retry_in_use(|| UdpSocket::bind(listen))
        .await
        .map_err(|source| NetworkError::Tun {
            what: "bind kiln's DNS relay on the VM's gateway address",
            source,
        })?;
    let addr = sock.local_addr().unwrap_or(listen);
    // The same port over TCP (a port 0 `listen`, in tests, is UDP's).
    let tcp = retry_in_use(|| TcpListener::bind(addr))
        .await
        .map_err(|source| NetworkError::Tun {
            what: "bind kiln's DNS relay (TCP) on the VM's gateway address",
            source,
        })?;
    let tcp_task = tokio::spawn(serve_tcp(tcp, guest, upstreams.clone()));
    let task = tokio::spawn(serve(sock, guest, upstreams));
    Ok(Relay {
        task,
        tcp_task,
        addr,
    })
}

/// `bind` again while its address is in use, for up to 2 s.
async fn retry_in_use<T, F: std::future::Future<Output = std::io::Result<T>>>(
    mut bind: impl FnMut() -> F,
) -> std::io::Result<T> {
    let mut tries = 0;
    loop {
        match bind().await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 40 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => return r,
        }
    }
}

/// The TCP side's one task: it owns the listener and the connections, so
/// aborting it ends them all.
async fn serve_tcp(l: TcpListener, guest: IpAddr, upstreams: Vec<SocketAddr>) {
    let upstreams: Arc<[SocketAddr]> = upstreams.into();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            got = l.accept() => {
                let Ok((c, peer)) = got else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if peer.ip() != guest || conns.len() >= MAX_TCP_CONNECTIONS {
                    continue; // dropped: closed
                }
                conns.spawn(tcp_connection(c, upstreams.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Read one length-prefixed DNS message of at most `max` bytes; `None` at
/// the end, on a timeout, or for one over `max`.
async fn read_framed(c: &mut TcpStream, max: usize, within: Duration) -> Option<Vec<u8>> {
    let read = async {
        let n = usize::from(c.read_u16().await.ok()?);
        if !(12..=max).contains(&n) {
            return None;
        }
        let mut m = vec![0u8; n];
        c.read_exact(&mut m).await.ok()?;
        Some(m)
    };
    tokio::time::timeout(within, read).await.ok().flatten()
}

async fn write_framed(c: &mut TcpStream, m: &[u8]) -> Option<()> {
    let n = u16::try_from(m.len()).ok()?;
    let mut out = Vec::with_capacity(m.len() + 2);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(m);
    c.write_all(&out).await.ok()
}

/// One guest connection: standard queries in, answers out, in order.
async fn tcp_connection(mut c: TcpStream, upstreams: Arc<[SocketAddr]>) {
    for _ in 0..MAX_TCP_QUERIES {
        let Some(query) = read_framed(&mut c, MAX_MESSAGE, TCP_IDLE).await else {
            return;
        };
        if !is_standard_query(&query) {
            return;
        }
        let Some(answer) = relay_tcp(&query, &upstreams).await else {
            return;
        };
        if write_framed(&mut c, &answer).await.is_none() {
            return;
        }
    }
}

/// [`relay`] over TCP.
async fn relay_tcp(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for server in upstreams {
        let attempt = async {
            let mut s = TcpStream::connect(server).await.ok()?;
            write_framed(&mut s, query).await?;
            let a = read_framed(&mut s, MAX_ANSWER, UPSTREAM_TIMEOUT).await?;
            (a[..2] == query[..2] && a[2] & 0x80 != 0).then_some(a)
        };
        if let Ok(Some(a)) = tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
            return Some(a);
        }
    }
    None
}

/// Whether `m` is a standard query with one question (QR 0, opcode 0,
/// QDCOUNT 1), the only message the relay passes on.
pub fn is_standard_query(m: &[u8]) -> bool {
    m.len() >= 12 && m[2] & 0xf8 == 0 && m[4..6] == [0, 1]
}

/// The relay's one task: it owns the socket and the queries in flight
/// (their answers come back over a channel), so aborting it ends them all.
async fn serve(sock: UdpSocket, guest: IpAddr, upstreams: Vec<SocketAddr>) {
    let upstreams: Arc<[SocketAddr]> = upstreams.into();
    let (answers, mut answered) = mpsc::channel::<(Vec<u8>, SocketAddr)>(MAX_IN_FLIGHT);
    let mut in_flight = JoinSet::new();
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        tokio::select! {
            got = sock.recv_from(&mut buf) => {
                let (n, peer) = match got {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!("DNS relay: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if peer.ip() != guest || n > MAX_MESSAGE || !is_standard_query(&buf[..n]) {
                    continue;
                }
                if in_flight.len() >= MAX_IN_FLIGHT {
                    continue; // too many queries in flight: drop, the guest retries
                }
                let query = buf[..n].to_vec();
                let (answers, upstreams) = (answers.clone(), upstreams.clone());
                in_flight.spawn(async move {
                    if let Some(answer) = relay(&query, &upstreams).await {
                        let _ = answers.send((answer, peer)).await;
                    }
                });
            }
            Some((answer, peer)) = answered.recv() => {
                let _ = sock.send_to(&answer, peer).await;
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
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
        let mut buf = vec![0u8; MAX_ANSWER];
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            // An answer (QR 1) with the query's ID.
            if n >= 12 && buf[..2] == query[..2] && buf[2] & 0x80 != 0 {
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

    /// A relay on a free loopback port for the guest 127.0.0.1, asking `up`.
    async fn loopback_relay(up: SocketAddr) -> Relay {
        let guest: IpAddr = "127.0.0.1".parse().unwrap();
        start(SocketAddr::new(guest, 0), guest, vec![up])
            .await
            .unwrap()
    }

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
        let r = loopback_relay(up).await;
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

    /// Updates, notifies, answers and multi-question messages are never
    /// passed on: the upstream sees none of them.
    #[tokio::test]
    async fn only_standard_queries_reach_the_upstream() {
        assert!(is_standard_query(&[0, 1, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]));
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up = upstream.local_addr().unwrap();
        let guest = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = loopback_relay(up).await;
        let update = [0, 1, 5 << 3, 0, 0, 1, 0, 0, 0, 1, 0, 0];
        let notify = [0, 2, 4 << 3, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let response = [0, 3, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
        let two_questions = [0, 4, 1, 0, 0, 2, 0, 0, 0, 0, 0, 0];
        for m in [update, notify, response, two_questions] {
            assert!(!is_standard_query(&m), "{m:?}");
            guest.send_to(&m, r.addr).await.unwrap();
        }
        let mut b = [0u8; 64];
        assert!(
            tokio::time::timeout(Duration::from_millis(500), upstream.recv(&mut b))
                .await
                .is_err(),
            "a non-query reached the upstream"
        );
    }

    /// A relay dropped while a query waits on an upstream that never
    /// answers frees its address at once: the slot's next VM binds it,
    /// although the query's 3 s are not over.
    #[tokio::test]
    async fn a_dropped_relay_frees_its_address_with_queries_in_flight() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up = silent.local_addr().unwrap();
        let guest = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = loopback_relay(up).await;
        let addr = r.addr;
        let q = [0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        guest.send_to(&q, addr).await.unwrap();
        let mut b = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(5), silent.recv(&mut b))
            .await
            .expect("the query reaches the upstream")
            .unwrap();
        drop(r);
        let t = std::time::Instant::now();
        let again = start(addr, "127.0.0.1".parse().unwrap(), vec![up]).await;
        assert!(again.is_ok(), "rebinding {addr}: {:?}", again.err());
        assert!(t.elapsed() < UPSTREAM_TIMEOUT, "{:?}", t.elapsed());
    }

    /// Over TCP: a guest's length-prefixed query reaches a TCP upstream
    /// and its answer (larger than UDP's 512 bytes) comes back whole; a
    /// second query on the same connection too; an update closes the
    /// connection; a stranger's connection is closed at once.
    #[tokio::test]
    async fn relays_over_tcp_only_for_the_guest() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    while let Some(q) = read_framed(&mut c, 4096, UPSTREAM_TIMEOUT).await {
                        let mut a = q.clone();
                        a[2] |= 0x80;
                        a.resize(3000, 0x5a); // too large for plain UDP
                        if write_framed(&mut c, &a).await.is_none() {
                            return;
                        }
                    }
                });
            }
        });
        let r = loopback_relay(up).await;
        let mut c = TcpStream::connect(r.addr).await.unwrap();
        for id in [0x11u8, 0x22] {
            let q = [id, id, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            write_framed(&mut c, &q).await.unwrap();
            let a = read_framed(&mut c, MAX_ANSWER, Duration::from_secs(5))
                .await
                .expect("the relay answers over TCP");
            assert_eq!((a.len(), &a[..3]), (3000, &[id, id, 0x81][..]));
        }
        write_framed(&mut c, &[0, 9, 5 << 3, 0, 0, 1, 0, 0, 0, 1, 0, 0])
            .await
            .unwrap();
        let mut b = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
            .await
            .expect("an update closes the connection")
            .unwrap();
        assert_eq!(n, 0);

        // Bound to 127.0.0.2: not the guest's address.
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut stranger = s.connect(r.addr).await.unwrap();
        let q = [0x33, 0x33, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let _ = write_framed(&mut stranger, &q).await;
        let got = tokio::time::timeout(Duration::from_secs(5), stranger.read(&mut b))
            .await
            .expect("the stranger's connection is closed");
        assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    }
}
