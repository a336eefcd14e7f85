//! A tiny HTTP/1.1 server on 127.0.0.1 for the tests of remote and GitLab
//! API includes: fixed raw responses by path and query, 404 for others.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running server; stops when dropped.
pub(crate) struct Server {
    pub url: String,
    /// The path (with the query) of each request, in order.
    pub hits: Arc<Mutex<Vec<String>>>,
    /// The `Authorization` header of each request, if any.
    pub auth: Arc<Mutex<Vec<Option<String>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A 200 response with `body`.
pub(crate) fn ok(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Serves `routes` (path with query, raw response).
pub(crate) fn serve(routes: Vec<(&'static str, String)>) -> Server {
    serve_owned(
        routes
            .into_iter()
            .map(|(p, r)| (p.to_string(), r))
            .collect(),
    )
}

/// As [`serve`], for paths built at run time.
pub(crate) fn serve_owned(routes: Vec<(String, String)>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(Mutex::new(Vec::new()));
    let auth = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (h, a, st) = (hits.clone(), auth.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            conn.set_nonblocking(false).unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let req = String::from_utf8_lossy(&req);
            let path = req.split(' ').nth(1).unwrap_or("").to_string();
            let authorization = req.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("authorization")
                    .then(|| v.trim().to_string())
            });
            h.lock().unwrap().push(path.clone());
            a.lock().unwrap().push(authorization);
            let resp = routes
                .iter()
                .find(|(p, _)| *p == path)
                .map(|(_, r)| r.clone())
                .unwrap_or_else(|| {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .into()
                });
            let _ = conn.write_all(resp.as_bytes());
        }
    });
    Server {
        url,
        hits,
        auth,
        stop,
        thread: Some(thread),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
