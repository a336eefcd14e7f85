//! A real S3 server for tests: `moto_server` (PyPI `moto[server]`),
//! started on 127.0.0.1 with a free port, stopped when dropped. Gate the
//! test with [`need`].
//!
//! Setup requests (create a bucket, set a policy, plant or read an object)
//! are plain HTTP/1.1 over a loopback socket with a dummy signature: moto
//! does not check credentials unless asked to.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Need;

/// The need of a test that starts [`MotoServer`].
pub fn need() -> Need {
    crate::pip_tool("moto_server", "moto[server]")
}

/// moto serves a private object only to a request that looks signed; it
/// checks no signature unless asked to.
const AUTHORIZATION: &str = "Authorization: AWS4-HMAC-SHA256 \
    Credential=AKIATEST/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";

/// A running `moto_server`.
pub struct MotoServer {
    child: Child,
    port: u16,
}

impl MotoServer {
    /// Start one on 127.0.0.1 and wait until it answers (60 s at most).
    pub fn start() -> MotoServer {
        // A free port: taken, noted and given back (moto cannot be handed a
        // socket). Another process taking it in between shows as a start
        // that never answers below, with a clear message.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let mut m = MotoServer { child, port };
        let t0 = Instant::now();
        loop {
            if let Ok((200, _)) = m.try_request("GET", "/", b"") {
                return m;
            }
            if let Ok(Some(status)) = m.child.try_wait() {
                panic!("moto_server exited at start ({status})");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "moto_server did not answer on 127.0.0.1:{port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, a `ServerAddress`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Send one unsigned request; the status and the body.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path} to moto_server: {e}"))
    }

    fn try_request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{AUTHORIZATION}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )?;
        s.write_all(body)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        let bad = || std::io::Error::other("not an HTTP response");
        let head_end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(bad)?;
        let head = String::from_utf8_lossy(&out[..head_end]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(bad)?;
        let mut body = out[head_end + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        Ok((status, body))
    }

    /// Create `bucket`.
    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = self.request("PUT", &format!("/{bucket}"), b"");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// The object `name` of `bucket`, if there is one.
    pub fn object(&self, bucket: &str, name: &str) -> Option<Vec<u8>> {
        match self.request("GET", &format!("/{bucket}/{name}"), b"") {
            (200, body) => Some(body),
            (404, _) => None,
            (status, body) => panic!(
                "GET {bucket}/{name}: {status} {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    /// Plant `data` as the object `name` of `bucket`.
    pub fn put_object(&self, bucket: &str, name: &str, data: &[u8]) {
        let (status, body) = self.request("PUT", &format!("/{bucket}/{name}"), data);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// Set `bucket`'s policy (a JSON document).
    pub fn put_bucket_policy(&self, bucket: &str, policy: &str) {
        let (status, body) = self.request("PUT", &format!("/{bucket}?policy"), policy.as_bytes());
        assert!(
            status == 200 || status == 204,
            "{status} {}",
            String::from_utf8_lossy(&body)
        );
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        let end = (start + size).min(b.len());
        out.extend_from_slice(&b[start..end]);
        b = &b[(end + 2).min(b.len())..];
    }
    out
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
