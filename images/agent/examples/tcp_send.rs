//! Bench helper for `bench/network.rs`, never shipped: a guest → host TCP
//! sender whose own cost stays small next to the network's. busybox `nc`
//! moves 1 KiB per read and per write, so under TCG its system calls, not
//! the network, bound a `dd | nc` upload (every network mode measured the
//! same there).
//!
//! `tcp_send ADDR:PORT BYTES`: connect, write BYTES zeros in 256 KiB
//! writes, shut the sending side, print the server's one-line answer (the
//! bench's server says `GOT <bytes>\n`) and exit at its newline or at the
//! close, whichever comes first. It does not wait for the close after the
//! newline: Debian 12's passt has been seen not to relay it. A server that
//! neither answers nor closes fails it after 120 s instead of hanging the job.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fail = |m: String| -> ! {
        eprintln!("tcp_send: {m}");
        std::process::exit(2)
    };
    let [addr, bytes] = args.as_slice() else {
        fail("usage: tcp_send ADDR:PORT BYTES".into())
    };
    let mut left: u64 = bytes
        .parse()
        .unwrap_or_else(|_| fail(format!("'{bytes}' is not a byte count")));
    let mut s = TcpStream::connect(addr.as_str())
        .unwrap_or_else(|e| fail(format!("connect to {addr}: {e}")));
    let chunk = vec![0u8; 256 * 1024];
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])
            .unwrap_or_else(|e| fail(format!("write: {e} ({left} bytes left)")));
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)
        .unwrap_or_else(|e| fail(format!("shutdown: {e}")));
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap_or_else(|e| fail(format!("set a read timeout: {e}")));
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    while !answer.contains(&b'\n') && answer.len() < 4096 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => fail(format!("the server's answer: {e} (after {answer:?})")),
        }
    }
    std::io::stdout()
        .write_all(&answer)
        .unwrap_or_else(|e| fail(format!("stdout: {e}")));
}
