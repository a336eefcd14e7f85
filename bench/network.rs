//! Jobs' network throughput on the qemu backend, three ways in the same
//! run, in rotating order, as ratios against the third:
//!
//! - `nat`: kiln's `--network nat` (TAP, routed and masqueraded);
//! - `user`: kiln's `--network user` (passt, the rootless mode);
//! - `qemu-user`: the baseline, QEMU's own `-netdev user` (libslirp). kiln
//!   does not run it, so the bench runs `--network user` with `KILN_QEMU`
//!   pointing at a wrapper that swaps QEMU's passt netdev for `-netdev
//!   user` and execs the same QEMU: the same kernel, initramfs, guest
//!   command and guest addresses (passt copies slirp's 10.0.2.0/24 plan),
//!   only QEMU's side of the network differs. The wrapper leaves a mark
//!   that it did swap, which the bench checks.
//!
//! All three run with kiln's jail off (`KILN_ISOLATION=off`). The baseline
//! needs it: kiln's jail starts QEMU in an empty network namespace of its
//! own (its network is the TAP descriptor or passt's socket), where
//! libslirp's host sockets have no route, so every connection the guest
//! opens fails with ENETUNREACH, which libslirp hands back as an ICMP net
//! unreachable (busybox wget: "can't connect to remote host: Network is
//! unreachable"; the first version of this baseline failed so in CI). With
//! the jail off QEMU stays in the lab's host namespace, like kiln. `nat`
//! and `user` run without it too, so that the jail's CPU quota (1.5 CPUs
//! for one vCPU) weighs on none of the three: only the network differs.
//!
//! - guest → host TCP throughput: the job runs `tcp_send`
//!   (`images/agent/examples/tcp_send.rs`, static, 256 KiB writes; busybox
//!   `nc` moves 1 KiB per system call, which under TCG bounded every mode
//!   alike), which sends zeros, shuts its side and waits for the answer; a
//!   listener of the bench in the "outside" namespace times first byte to
//!   last and answers `GOT <bytes>` (so the job does not end with bytes in
//!   flight);
//! - a download's time: the job `wget`s a blob from a server of the bench,
//!   which times the request to the client's close after the last byte.
//!
//! Everything runs in the network namespaces of `kiln_tests::netlab`: no
//! packet leaves them. Under TCG (this machine) the absolute figures say
//! little; the ratio is the point.
//!
//! cargo bench -p kiln-tests --bench network [-- ROUNDS]
//! cargo test -p kiln-tests --bench network -- --smoke   (one small round, CI)

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_tests::harness;
use kiln_tests::netlab::{read_request, response_head, Lab, OUTSIDE_ADDR};

const UPLOAD_PORT: u16 = 9000;
const DOWNLOAD_PORT: u16 = 9001;
const MIB: u64 = 1 << 20;

/// What one job measured.
#[derive(Debug, Clone, Copy)]
struct Sample {
    upload_mib_s: f64,
    download_s: f64,
}

/// Accept uploads forever; for each, time the first byte to the
/// `expect`-th, answer `GOT <bytes>` and close (busybox `nc` waits for
/// that close), and send (bytes, seconds).
fn upload_server(l: TcpListener, expect: u64, tx: mpsc::Sender<(u64, f64)>) {
    for c in l.incoming().flatten() {
        let mut c = c;
        let _ = c.set_read_timeout(Some(Duration::from_secs(300)));
        let mut buf = vec![0u8; 256 * 1024];
        let (mut got, mut first) = (0u64, None);
        while got < expect {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    first.get_or_insert_with(Instant::now);
                    got += n as u64;
                }
            }
        }
        let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let _ = writeln!(c, "GOT {got}");
        let _ = tx.send((got, secs));
    }
}

/// Serve `body` to each HTTP request; time the request to the client's
/// close (it closes once it has every byte) and send the seconds.
fn download_server(l: TcpListener, body: Vec<u8>, tx: mpsc::Sender<f64>) {
    for c in l.incoming().flatten() {
        let mut c = c;
        let _ = c.set_read_timeout(Some(Duration::from_secs(300)));
        if !read_request(&mut c) {
            continue;
        }
        let t = Instant::now();
        let head = response_head(body.len());
        let sent = c.write_all(head.as_bytes()).is_ok() && c.write_all(&body).is_ok();
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut buf = [0u8; 1024];
        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(if sent {
            t.elapsed().as_secs_f64()
        } else {
            -1.0
        });
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut needs = vec![
        kiln_testkit::root(),
        kiln_testkit::tool("ip", "iproute2"),
        kiln_testkit::tool("iptables", "iptables"),
        kiln_testkit::tool("passt", "passt"),
    ];
    needs.extend(harness::vm());
    if !kiln_testkit::require("network", &needs) {
        return;
    }
    let smoke = std::env::args().any(|a| a == "--smoke");
    let rounds: usize = if smoke {
        1
    } else {
        std::env::args()
            .skip(1)
            .find_map(|a| a.parse().ok())
            .unwrap_or(3)
    };
    let (upload, download) = if smoke {
        (4 * MIB, 2 * MIB)
    } else {
        (16 * MIB, 10 * MIB)
    };
    // Seconds: several times a round's slowest job under TCG.
    let job_timeout = if smoke { 300 } else { 900 };
    let lab = Lab::new("bn").expect("the network lab");
    let (up_tx, up_rx) = mpsc::channel();
    let (down_tx, down_rx) = mpsc::channel();
    let ul = Lab::within(&lab.outside, || TcpListener::bind(("0.0.0.0", UPLOAD_PORT)))
        .unwrap()
        .unwrap();
    let dl = Lab::within(&lab.outside, || {
        TcpListener::bind(("0.0.0.0", DOWNLOAD_PORT))
    })
    .unwrap()
    .unwrap();
    std::thread::spawn(move || upload_server(ul, upload, up_tx));
    let body: Vec<u8> = (0..download).map(|i| (i * 7 % 251) as u8).collect();
    std::thread::spawn(move || download_server(dl, body, down_tx));

    let script = format!(
        "wget -q -O /dev/null http://{OUTSIDE_ADDR}:{DOWNLOAD_PORT}/blob && echo DOWNLOADED; \
         tcp_send {OUTSIDE_ADDR}:{UPLOAD_PORT} {upload} && echo UPLOADED"
    );
    let image = harness::busybox_image_with(
        "bench-net-image",
        vec![(
            "usr/bin/tcp_send".into(),
            harness::agent_example("tcp_send"),
            0o755,
        )],
    );
    let run_dir = harness::run_dir("bench-net");
    let (wrapper, swapped) = slirp_wrapper(&harness::run_dir("bench-net-qemu"));
    let modes = ["nat", "user", "qemu-user"];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        // Rotate which mode goes first, so drift hits all alike.
        let order: Vec<usize> = (0..modes.len())
            .map(|i| (i + round) % modes.len())
            .collect();
        for m in order {
            let mut cmd = harness::run_job_cmd_on(&run_dir, &image);
            cmd.env("KILN_ISOLATION", "off");
            // Before every job: the mark of the last round's baseline
            // must not count for the next mode.
            let _ = std::fs::remove_file(&swapped);
            let network = if modes[m] == "qemu-user" {
                cmd.env("KILN_QEMU", &wrapper);
                "user"
            } else {
                modes[m]
            };
            let o = lab
                .in_host(cmd)
                // A job that hangs (a connection never closed) fails
                // the bench in minutes, not at the default hour.
                .args(["--timeout", &job_timeout.to_string()])
                .args(["--network", network, "--", "sh", "-c", &script])
                .output()
                .expect("run kiln");
            assert_eq!(
                swapped.exists(),
                modes[m] == "qemu-user",
                "{}: the wrapper swaps the netdev in the baseline only",
                modes[m]
            );
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success() && out.contains("DOWNLOADED") && out.contains("UPLOADED"),
                "{}: the job failed: {out}\n{}",
                modes[m],
                String::from_utf8_lossy(&o.stderr)
            );
            let down = down_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the download was timed");
            let (got, secs) = up_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the upload was timed");
            assert!(down > 0.0, "{}: the download was cut short", modes[m]);
            assert_eq!(got, upload, "{}: every uploaded byte arrived", modes[m]);
            let s = Sample {
                upload_mib_s: got as f64 / MIB as f64 / secs.max(1e-6),
                download_s: down,
            };
            println!(
                "round {round} {:<4}: guest→host {:>7.1} MiB/s, {} MiB download {:.2} s",
                modes[m],
                s.upload_mib_s,
                download / MIB,
                s.download_s
            );
            samples[m].push(s);
        }
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    let _ = std::fs::remove_dir_all(wrapper.parent().unwrap());
    let up = |m: usize| median(samples[m].iter().map(|s| s.upload_mib_s).collect());
    let down = |m: usize| median(samples[m].iter().map(|s| s.download_s).collect());
    let base = modes.len() - 1;
    for (m, mode) in modes.iter().enumerate() {
        println!(
            "median of {rounds}: {:<9} guest→host {:>7.1} MiB/s ({:.2}× QEMU user), \
             {} MiB download {:.2} s ({:.2}× QEMU user's speed)",
            mode,
            up(m),
            up(m) / up(base),
            download / MIB,
            down(m),
            down(base) / down(m)
        );
    }
    let verdict = if up(0) >= 2.0 * up(base) {
        "met"
    } else {
        "NOT met"
    };
    println!(
        "target (issue 17): nat ≥ 2× QEMU user networking's throughput: {verdict} ({:.2}×){}",
        up(0) / up(base),
        if accel_is_tcg() {
            " (guests under TCG: the guest's CPU weighs on all three)"
        } else {
            ""
        }
    );
}

/// A `KILN_QEMU` for the baseline, in `dir`: the QEMU the tests run, with
/// kiln's passt netdev (`-netdev stream,id=net0,...`) replaced by `-netdev
/// user,id=net0`; it creates the second path returned when it did.
fn slirp_wrapper(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let (wrapper, mark) = (dir.join("qemu-slirp"), dir.join("swapped"));
    // QEMU runs with an empty environment: no PATH to find it by name.
    let qemu = harness::qemu_binary();
    let found = std::process::Command::new("sh")
        .args(["-c", "command -v \"$1\"", "sh", qemu.as_str()])
        .output()
        .expect("find QEMU");
    let qemu = String::from_utf8_lossy(&found.stdout).trim().to_string();
    assert!(
        found.status.success() && qemu.starts_with('/'),
        "no QEMU: {qemu}"
    );
    let script = format!(
        "#!/bin/sh\n\
         # kiln's QEMU command, with QEMU's user networking for passt's socket\n\
         for a do\n\
           shift\n\
           case \"$a\" in stream,id=net0,*) a=user,id=net0; : > '{}';; esac\n\
           set -- \"$@\" \"$a\"\n\
         done\n\
         exec '{}' \"$@\"\n",
        mark.display(),
        qemu
    );
    std::fs::write(&wrapper, script).expect("write the QEMU wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    (wrapper, mark)
}

fn accel_is_tcg() -> bool {
    !kiln_vmm::probe_kvm().runs_unmodified_guests()
}
