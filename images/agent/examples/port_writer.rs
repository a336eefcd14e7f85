//! Test helper for `tests/tests/hostile.rs`, never shipped: what a job
//! running as root inside a kiln guest can do to the agent's console port.
//! The port opens only once (the agent holds it), so this takes the agent's
//! own descriptor with pidfd_getfd(2) and writes forged frames on it.
//!
//! `port_writer outputs N`: N `Output` frames for steps that never ran;
//! `port_writer oversize`: a frame header declaring 16 MiB;
//! `port_writer big-artifact`: one `Artifact` frame of almost 1 MiB.

#[cfg(target_os = "linux")]
fn main() {
    use std::io::Write;
    use std::os::fd::FromRawFd;

    use kiln_agent::proto::{Frame, Stream, MAX_FRAME};

    let args: Vec<String> = std::env::args().skip(1).collect();
    let fail = |m: String| -> ! {
        eprintln!("port_writer: {m}");
        std::process::exit(2)
    };
    // The agent's descriptor for the port: /proc/1/fd/N -> /dev/vport*.
    let target = std::fs::read_dir("/proc/1/fd")
        .unwrap_or_else(|e| fail(format!("/proc/1/fd: {e}")))
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("vport")))
        .and_then(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .unwrap_or_else(|| fail("the agent holds no vport descriptor".into()));
    // SAFETY: plain syscalls with integer arguments; results are checked.
    let fd = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, 1, 0);
        if pidfd < 0 {
            fail(format!("pidfd_open: {}", std::io::Error::last_os_error()));
        }
        libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, target, 0)
    };
    if fd < 0 {
        fail(format!("pidfd_getfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pidfd_getfd returned a new descriptor that only we own.
    let mut port = unsafe { std::fs::File::from_raw_fd(fd as i32) };
    let mut out = Vec::new();
    match args.first().map(String::as_str) {
        Some("outputs") => {
            let n: u32 = args
                .get(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| fail("outputs N".into()));
            for i in 0..n {
                let f = Frame::Output {
                    step: 1000 + i,
                    stream: Stream::Stdout,
                    data: b"forged\n".to_vec(),
                };
                f.encode(&mut out).expect("small frame");
                // Whole frames per write: the agent writes between them.
                if out.len() >= 60 * 1024 {
                    let _ = port.write_all(&out);
                    out.clear();
                }
            }
        }
        Some("oversize") => {
            out.extend_from_slice(&(16u32 << 20).to_le_bytes());
            out.extend_from_slice(&[4; 64]);
        }
        Some("big-artifact") => {
            Frame::Artifact(vec![b'A'; MAX_FRAME - 1])
                .encode(&mut out)
                .expect("fits one frame");
        }
        _ => fail("usage: port_writer outputs N | oversize | big-artifact".into()),
    }
    let _ = port.write_all(&out);
    let _ = port.flush();
    println!("port_writer: done");
}

#[cfg(not(target_os = "linux"))]
fn main() {}
