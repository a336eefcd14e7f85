//! Jobs' network, end to end: kiln in a "host" network namespace the test
//! creates, servers in an "outside" one (see `kiln_tests::netlab`). No
//! packet leaves those namespaces.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_testkit::{self as testkit, Need};
use kiln_tests::harness::{self, assert_no_leaks};
use kiln_tests::lab_registry::{self, LabRegistry, MANIFEST_TYPE, REGISTRY_PORT};
use kiln_tests::netlab::*;

fn needs() -> Vec<Need> {
    let mut n = vec![
        testkit::root(),
        testkit::tool("ip", "iproute2"),
        testkit::tool("iptables", "iptables"),
    ];
    n.extend(harness::vm());
    n
}

fn registry_needs() -> Vec<Need> {
    let mut n = needs();
    n.push(testkit::tool("docker-registry", "docker-registry"));
    n
}

fn passt_needs() -> Vec<Need> {
    let mut n = needs();
    n.push(testkit::tool("passt", "passt"));
    n
}

fn unprivileged_needs() -> Vec<Need> {
    let mut n = passt_needs();
    n.push(testkit::tool("setpriv", "util-linux"));
    n
}

/// `kiln` inside the lab's host namespace, on the qemu backend.
fn kiln(lab: &Lab, run_dir: &Path) -> Command {
    lab.kiln(run_dir)
}

fn job_args(network: &str, script: &str) -> Vec<String> {
    [
        "--log-level",
        "warn",
        "run-job",
        "--cpus",
        "1",
        "--memory",
        "512",
        "--network",
        network,
        "--network-deny",
        DENIED_CIDR,
        "--image",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([harness::busybox_image().to_string_lossy().into_owned()])
    .chain(["--", "sh", "-c", script].iter().map(|s| s.to_string()))
    .collect()
}

fn run(lab: &Lab, run_dir: &Path, network: &str, script: &str) -> Output {
    show(
        kiln(lab, run_dir)
            .args(job_args(network, script))
            .output()
            .expect("run kiln"),
    )
}

/// Print `o`'s output (the test's log) and return it.
fn show(o: Output) -> Output {
    println!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// What a job pulls from the lab's registry ([`download_by_name`] with
/// `pull`): the manifest's and the layer's digests to find in its output.
struct Pulled {
    manifest: String,
    layer: String,
}

/// Start the test registry in the lab's outside namespace, push an image
/// to it, and return the guest script that pulls it by name with busybox
/// `wget` over the registry HTTP API (the manifest, then the layer it
/// names) and checks both digests with `sha256sum`.
fn registry_pull(lab: &Lab, dir: &Path) -> (LabRegistry, String, Pulled) {
    let registry = LabRegistry::start(lab, dir).unwrap();
    // 256 KiB unlike the downloaded blob.
    let layer: Vec<u8> = blob().iter().take(256 << 10).map(|b| b ^ 0xa5).collect();
    let (_, manifest) = registry.push_image("kiln/pull", "v1", &layer).unwrap();
    let base = format!("http://{FILE_HOST}:{REGISTRY_PORT}/v2/kiln/pull");
    let script = format!(
        "wget -q -O /tmp/m --header 'Accept: {MANIFEST_TYPE}' {base}/manifests/v1 || \
         {{ echo REGISTRY-FAILED manifest; exit 1; }}; sha256sum /tmp/m; \
         l=$(grep -o 'sha256:[0-9a-f]*' /tmp/m | tail -n 1); \
         wget -q -O /tmp/l {base}/blobs/$l || {{ echo REGISTRY-FAILED blob $l; exit 1; }}; \
         [ \"$(sha256sum /tmp/l | cut -d' ' -f1)\" = \"${{l#sha256:}}\" ] && echo LAYER-VERIFIED $l"
    );
    let pulled = Pulled {
        manifest: manifest.trim_start_matches("sha256:").to_string(),
        layer: lab_registry::digest(&layer),
    };
    (registry, script, pulled)
}

/// A job downloads a file by name (the outside DNS server answers it)
/// and checks its SHA-256; the job's name-service files are kiln's.
/// `pull`: the same VM also pulls from the local test registry
/// ([`registry_pull`]).
fn download_by_name(
    tag: &str,
    mode: &str,
    resolver: &str,
    user: Option<&Unprivileged>,
    pull: bool,
) {
    let (lab, want) = lab_serving_blob(tag);
    let dir = harness::run_dir(&format!("net-{tag}"));
    let mut script = download_script();
    // Offloads are a TAP's (`nat`): QEMU's device takes them there, and
    // the guest's segments must arrive whole. (A long upload through
    // Debian 12's passt can be reset: docs/network.md.)
    let nat = mode == "nat";
    if nat {
        script.push_str("; ");
        script.push_str(&upload_script());
    }
    // The registry's storage lives outside the job's run directory, which
    // must be left empty.
    let registry_dir = harness::run_dir(&format!("net-{tag}-registry"));
    let pulled = pull.then(|| {
        let (registry, pull, pulled) = registry_pull(&lab, &registry_dir);
        script.push_str("; ");
        script.push_str(&pull);
        (registry, pulled)
    });
    let o = match user {
        None => run(&lab, &dir, mode, &script),
        Some(u) => {
            u.own(&dir);
            show(
                u.kiln(&lab, &dir)
                    .args(job_args(mode, &script))
                    .output()
                    .unwrap(),
            )
        }
    };
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}\n{err}");
    assert_downloaded(&out, &want, resolver);
    if nat {
        assert_uploaded_with_offloads(&out, &want);
    }
    if let Some((registry, pulled)) = pulled {
        assert!(
            out.contains(&format!("{}  /tmp/m", pulled.manifest)),
            "{out}"
        );
        assert!(
            out.contains(&format!("LAYER-VERIFIED {}", pulled.layer)),
            "{out}"
        );
        drop(registry);
    }
    let _ = std::fs::remove_dir_all(&registry_dir);
    assert_no_leaks(&dir);
    assert_eq!(leftovers(&lab, &dir), Vec::<String>::new());
}

fn downloads_by_name_and_pulls_from_the_registry_over_nat() {
    download_by_name("dl", "nat", "10.213.", None, true);
}

fn user_mode_downloads_through_passt() {
    download_by_name("us", "user", "10.0.2.3", None, false);
}

/// `nobody`, with a home of its own under the test root: kiln's cache (the
/// test cache's kernels and initramfs copied, so nothing is downloaded),
/// state and the job's run directory are the user's, as on a developer's
/// laptop; nothing of root's is writable to it.
struct Unprivileged {
    home: std::path::PathBuf,
}

const NOBODY: u32 = 65534;

impl Unprivileged {
    fn new(tag: &str) -> Unprivileged {
        harness::kernel();
        let home = harness::test_root().join(format!("nobody-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(home.join("cache")).unwrap();
        for d in ["kernels", "initramfs"] {
            let from = harness::cache_dir().join(d);
            if from.is_dir() {
                let ok = Command::new("cp")
                    .arg("-a")
                    .arg(&from)
                    .arg(home.join("cache"))
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "copy {}", from.display());
            }
        }
        let u = Unprivileged { home };
        u.own(&u.home);
        let h = u.home.clone();
        kiln_testkit::at_exit(move || {
            let _ = std::fs::remove_dir_all(h);
        });
        u
    }

    /// Give `path` (recursively) to the user.
    fn own(&self, path: &Path) {
        let ok = Command::new("chown")
            .args(["-R", &format!("{NOBODY}:{NOBODY}")])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "chown {}", path.display());
    }

    /// `cmd` run as the user (no supplementary groups, no capabilities)
    /// inside the lab's host namespace.
    fn wrap(&self, lab: &Lab, cmd: Command) -> Command {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(cmd.get_program())
        .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                c.env(k, v);
            }
        }
        c.env("HOME", &self.home);
        lab.in_host(c)
    }

    /// `kiln` as the user, with its cache and state in the user's home.
    fn kiln(&self, lab: &Lab, run_dir: &Path) -> Command {
        let mut k = harness::kiln_cmd(run_dir);
        k.env("KILN_CACHE_DIR", self.home.join("cache"))
            .env("XDG_STATE_HOME", self.home.join("state"));
        self.wrap(lab, k)
    }
}

/// `--network user` needs no privilege: kiln, QEMU (TCG) and passt run as
/// `nobody` and the job downloads by name as it does for root.
fn user_mode_works_as_an_unprivileged_user() {
    let u = Unprivileged::new("us");
    let lab = Lab::new("un").unwrap();
    // The wrapper does drop to the user: the control.
    let mut id = Command::new("sh");
    id.args(["-c", "id -u; grep CapEff /proc/self/status"]);
    let id = show(u.wrap(&lab, id).output().unwrap());
    let id = String::from_utf8_lossy(&id.stdout).to_string();
    assert!(
        id.starts_with(&format!("{NOBODY}\n")) && id.contains("CapEff:\t0000000000000000"),
        "not unprivileged: {id}"
    );
    drop(lab);
    download_by_name("un", "user", "10.0.2.3", Some(&u), false);
}
fn cannot_reach_the_host_metadata_private_or_denied_networks() {
    let lab = Lab::new("iso").unwrap();
    lab.http_server(&lab.outside, b"outside".to_vec()).unwrap();
    lab.http_server(&lab.host, b"host".to_vec()).unwrap();
    lab.dns_server().unwrap();
    let dir = harness::run_dir("net-iso");
    let (host, outside, hp) = (
        HOST_ADDR.to_string(),
        OUTSIDE_ADDR.to_string(),
        HOST_PRIVATE.to_string(),
    );
    let (md, pn, dn) = (
        METADATA.to_string(),
        PRIVATE_NET.to_string(),
        DENIED.to_string(),
    );
    // What a kiln killed between creating the shared chains and filling
    // them leaves, while another kiln's VM (kiln-9, whose TAP exists) keeps
    // the next kiln from removing them: empty chains. A jump to an empty
    // chain returns, so unrepaired they would let everything through.
    let host_sh = |script: &str| {
        let o = Command::new("ip")
            .args(["netns", "exec", &lab.host, "sh", "-c", script])
            .output()
            .unwrap();
        assert!(o.status.success(), "{script}: {o:?}");
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    // And a namespace that routes nothing (a new one may inherit the
    // machine's forwarding).
    host_sh(
        "echo 0 > /proc/sys/net/ipv4/ip_forward && \
         ip tuntap add dev kiln-9 mode tap && iptables -N KILN-9 && \
         iptables -N KILN-REJECT && iptables -N KILN-FORWARD && \
         iptables -I FORWARD -j KILN-FORWARD",
    );
    let t0 = Instant::now();
    let o = run(
        &lab,
        &dir,
        "nat",
        &format!(
            "{} nslookup {FILE_HOST} >/dev/null && echo DNS-OK; \
             nc -w 5 $gw 53 </dev/null; echo TCP53 rc=$?",
            tries(&[&outside, "$gw", &host, &hp, &md, &pn, &dn])
        ),
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    println!("job took {:?}", t0.elapsed());
    // The control: the same server, on an address the guest may reach.
    assert!(try_line(&out, &outside).contains("200 OK"), "{out}");
    assert!(
        out.contains("DNS-OK"),
        "kiln's DNS relay on the gateway: {out}"
    );
    assert!(out.contains("TCP53 rc=0"), "the relay's TCP side: {out}");
    for a in ["$gw", &host, &hp, &md, &pn, &dn] {
        let a = if a == "$gw" {
            // The line names the gateway's address.
            out.lines()
                .find(|l| l.starts_with("TRY 10.213."))
                .map(|l| l.split(' ').nth(1).unwrap().to_string())
                .unwrap_or_else(|| panic!("no attempt at the gateway: {out}"))
        } else {
            a.to_string()
        };
        assert_refused_fast(&out, &a);
    }
    // The namespace routed nothing before: kiln's forwarding routes only
    // what its chains accept.
    assert!(
        host_sh("iptables -S FORWARD").contains("-P FORWARD DROP"),
        "{}",
        host_sh("iptables -S FORWARD")
    );
    host_sh("ip link del kiln-9 && iptables-save | grep -v KILN | iptables-restore");
    assert_no_leaks(&dir);
    assert_eq!(leftovers(&lab, &dir), Vec::<String>::new());
}

/// A kiln that is killed if the test ends early (it would outlive the
/// test's namespaces otherwise).
struct Killed(Child);

impl Killed {
    /// Wait for the child and collect what it printed (piped).
    fn output(&mut self) -> Output {
        let read = |r: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut b = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut b);
                }
                b
            })
        };
        let out = read(self.0.stdout.take().map(|r| Box::new(r) as _));
        let err = read(self.0.stderr.take().map(|r| Box::new(r) as _));
        let status = self.0.wait().unwrap();
        Output {
            status,
            stdout: out.join().unwrap(),
            stderr: err.join().unwrap(),
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Read `child`'s stdout until a line starts with `prefix`.
fn wait_line(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.as_mut().unwrap();
    let mut r = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap() == 0 {
            panic!("kiln ended before printing {prefix}");
        }
        print!("A: {line}");
        if line.starts_with(prefix) {
            return line.trim().to_string();
        }
    }
}

fn cannot_reach_another_jobs_vm() {
    let lab = Lab::new("vm").unwrap();
    let dir_a = harness::run_dir("net-vm-a");
    let dir_b = harness::run_dir("net-vm-b");
    // Job A listens until one connection has come (the test's own, below),
    // and says its address only once it listens: B's attempt must meet
    // the isolation, not a port nobody listens on yet (which is refused
    // too, and would let the test pass on a kiln that does not isolate).
    let mut a = Killed(
        kiln(&lab, &dir_a)
            .args(job_args(
                "nat",
                "(echo hello-from-a | nc -l -p 8080; echo A-DONE) & \
             while ! netstat -ltn | grep -q ':8080 '; do sleep 0.1; done; \
             echo \"ADDR $(ip -4 addr show eth0 | awk '/inet /{print $2}' | cut -d/ -f1)\"; wait",
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let addr = wait_line(&mut a.0, "ADDR ");
    let addr = addr.trim_start_matches("ADDR ").to_string();
    assert!(addr.starts_with("10.213."), "{addr}");
    let o = run(&lab, &dir_b, "nat", &tries(&[&addr]));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_refused_fast(&out, &addr);
    // A was there all along: the host itself reaches it.
    let to: SocketAddr = format!("{addr}:8080").parse().unwrap();
    let mut s = Lab::connect_from(&lab.host, to).expect("the host reaches job A");
    let mut got = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut got);
    assert_eq!(got.trim(), "hello-from-a");
    drop(s);
    let status = a.0.wait().unwrap();
    assert!(status.success());
    assert_no_leaks(&dir_a);
    assert_no_leaks(&dir_b);
    assert_eq!(leftovers(&lab, &dir_a), Vec::<String>::new());
}

fn none_has_no_interface_but_loopback() {
    let lab = Lab::new("no").unwrap();
    let dir = harness::run_dir("net-none");
    let o = run(
        &lab,
        &dir,
        "none",
        "ls /sys/class/net | tr '\\n' ' '; echo; (httpd -p 127.0.0.1:8081 -h /etc && wget -q -O - http://localhost:8081/hosts >/dev/null && echo LOCALHOST-OK)",
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.lines().next().unwrap_or("").trim(), "lo", "{out}");
    assert!(out.contains("LOCALHOST-OK"), "services on localhost: {out}");
    assert_no_leaks(&dir);
    assert_eq!(leftovers(&lab, &dir), Vec::<String>::new());
}

fn nothing_is_left_after_kill_9_and_a_restart() {
    let lab = Lab::new("k9").unwrap();
    let dir = harness::run_dir("net-k9");
    let mut k = Killed(
        kiln(&lab, &dir)
            .args(job_args("nat", "echo STARTED; sleep 600"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_line(&mut k.0, "STARTED");
    let before = leftovers(&lab, &dir);
    assert!(
        before.iter().any(|l| l.starts_with("link: "))
            && before.iter().any(|l| l.contains("KILN-0")),
        "a running job has its TAP and chains: {before:?}"
    );
    // SAFETY: kill(2) on our own child's pid (`ip netns exec` execs kiln).
    unsafe { libc::kill(k.0.id() as i32, libc::SIGKILL) };
    let _ = k.0.wait();
    // QEMU dies with kiln (PDEATHSIG), its TAP with QEMU; the rules stay
    // until the next kiln.
    let t0 = Instant::now();
    while leftovers(&lab, &dir)
        .iter()
        .any(|l| !l.starts_with("iptables"))
    {
        // QEMU dies at once (PDEATHSIG); its TAP goes when its memory is
        // torn down, which a loaded host may take a while to do.
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "{:?}",
            leftovers(&lab, &dir)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let stale = leftovers(&lab, &dir);
    assert!(stale.iter().any(|l| l.contains("KILN-0")), "{stale:?}");
    let o = run(&lab, &dir, "nat", "true");
    assert!(o.status.success());
    assert_eq!(leftovers(&lab, &dir), Vec::<String>::new());
    assert_no_leaks(&dir);
}

/// Ten `nat` jobs, two kilns at a time (each one `kiln run-job` of a
/// five-job pipeline: four jobs and a fifth that needs them), each job
/// downloading by name: every job has its network, and afterwards no TAP
/// device, route, iptables rule or chain, QEMU or passt process remains.
/// The two kilns share the host namespace, so their slots must not
/// collide.
fn ten_jobs_leave_nothing_behind() {
    let lab = Lab::new("10").unwrap();
    lab.http_server(&lab.outside, b"job-payload".to_vec())
        .unwrap();
    lab.dns_server().unwrap();
    let t0 = Instant::now();
    let kilns: Vec<_> = ["a", "b"]
        .iter()
        .map(|k| {
            let repo = harness::test_root().join(format!("repo-net10{k}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&repo);
            std::fs::create_dir_all(&repo).unwrap();
            let job = |name: &str, needs: &str| {
                format!(
                    "{name}:\n  {needs}script:\n    - echo \"$CI_JOB_NAME got $(wget -q -O - \
                     http://{FILE_HOST}:{HTTP_PORT}/) at $(ip -4 addr show eth0 | grep -o 'inet [0-9.]*')\"\n"
                )
            };
            let mut yml: String = (1..5).map(|i| job(&format!("j{i}"), "")).collect();
            yml.push_str(&job("last", "needs: [j1, j2, j3, j4]\n  "));
            std::fs::write(repo.join(".gitlab-ci.yml"), yml).unwrap();
            let dir = harness::run_dir(&format!("net-10{k}"));
            let child = Killed(
                kiln(&lab, &dir)
                    .args(["--log-level", "warn", "run-job"])
                    .arg(repo.join(".gitlab-ci.yml"))
                    .arg("last")
                    .arg("--image")
                    .arg(harness::busybox_image())
                    .args(["--cpus", "1", "--memory", "512", "--network", "nat"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
            );
            (child, dir, repo)
        })
        .collect();
    let mut got = Vec::new();
    let mut dirs = Vec::new();
    for (mut child, dir, repo) in kilns {
        let o = show(child.output());
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "{out}");
        // `<job> got job-payload at inet 10.213.x.y`, once per job.
        let jobs: std::collections::BTreeSet<_> = out
            .lines()
            .filter_map(|l| l.split_once(" got job-payload at inet 10.213."))
            .filter_map(|(pre, _)| pre.split_whitespace().last())
            .map(str::to_string)
            .collect();
        assert_eq!(jobs.len(), 5, "every job of this kiln downloaded: {out}");
        got.extend(jobs);
        assert_no_leaks(&dir);
        let _ = std::fs::remove_dir_all(repo);
        dirs.push(dir);
    }
    println!("10 jobs took {:?}", t0.elapsed());
    assert_eq!(got.len(), 10, "{got:?}");
    for d in &dirs {
        assert_eq!(leftovers(&lab, d), Vec::<String>::new());
    }
}

/// A guest that floods the host with pings from a spoofed source, first
/// another IPv4 address, then another MAC, gets none of them past its TAP:
/// the outside namespace counts echo requests by size (one size per phase)
/// and sees only those sent from the guest's real address and MAC.
fn spoofed_source_addresses_and_macs_are_dropped() {
    let lab = Lab::new("sp").unwrap();
    // IP length = payload + 8 (ICMP) + 20 (IP).
    let (real, spoof_ip, spoof_mac) = (100u32, 200u32, 300u32);
    let len = |payload: u32| payload + 28;
    lab.count_echoes(&lab.outside, &[len(real), len(spoof_ip), len(spoof_mac)])
        .unwrap();
    let dir = harness::run_dir("net-spoof");
    let o = run(
        &lab,
        &dir,
        "nat",
        &format!(
            "ping -q -c 5 -i 0.2 -w 20 -s {real} {OUTSIDE_ADDR}; echo REAL rc=$?; \
             ip addr add 198.51.100.77/32 dev eth0; \
             ping -q -c 300 -i 0.01 -w 5 -s {spoof_ip} -I 198.51.100.77 {OUTSIDE_ADDR}; \
             echo SPOOF-IP rc=$?; ip addr del 198.51.100.77/32 dev eth0; \
             ip link set dev eth0 address 02:00:00:00:00:99 && echo MAC-CHANGED; \
             ping -q -c 300 -i 0.01 -w 5 -s {spoof_mac} {OUTSIDE_ADDR}; echo SPOOF-MAC rc=$?"
        ),
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("REAL rc=0"), "the control pings: {out}");
    assert!(out.contains("MAC-CHANGED"), "{out}");
    assert!(
        out.contains("SPOOF-IP rc=") && out.contains("SPOOF-MAC rc="),
        "{out}"
    );
    let count = |payload| lab.echo_count(&lab.outside, len(payload)).unwrap();
    assert!(count(real) >= 5, "the real address got through: {out}");
    assert_eq!(count(spoof_ip), 0, "spoofed IPv4 source got through: {out}");
    assert_eq!(count(spoof_mac), 0, "spoofed MAC got through: {out}");
    assert_no_leaks(&dir);
    assert_eq!(leftovers(&lab, &dir), Vec::<String>::new());
}

/// The address pool never takes over addresses the host uses: a pool
/// inside one of the host namespace's routes (the lab's veth network) is
/// refused before any VM starts, and a slot overlapping a route (the host
/// holding `10.213.0.1/30`, slot 0's, on its loopback) is skipped: the job gets slot
/// 1, `10.213.0.6`, and its network works. `network_allow` of a range
/// holding the pool leaves the VM's gateway (the host) closed.
fn the_pool_skips_the_hosts_own_routes() {
    let (lab, want) = lab_serving_blob("rt");
    let dir = harness::run_dir("net-routes");
    let mut args = job_args("nat", "true");
    let at = args.iter().position(|a| a == "run-job").unwrap() + 1;
    args.splice(at..at, ["--network-pool".into(), "198.51.100.0/28".into()]);
    let o = show(kiln(&lab, &dir).args(&args).output().unwrap());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("network pool 198.51.100.0/28 lies inside this host's route 198.51.100.0/24 (dev veth0)"),
        "{err}"
    );
    let host = |args: &[&str]| {
        let o = Command::new("ip")
            .args(["-n", &lab.host])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "ip {args:?}: {o:?}");
    };
    host(&["addr", "add", "10.213.0.1/30", "dev", "lo"]);
    // A host service, on every address of the host namespace: allowing
    // 10.0.0.0/8 (a private registry, say) must not open the VMs'
    // gateways, which are the host.
    lab.http_server(&lab.host, b"host".to_vec()).unwrap();
    let script = format!(
        "ip -4 -o addr show dev eth0; {} {}",
        tries(&["$gw"]),
        download_script()
    );
    let mut args = job_args("nat", &script);
    let at = args.iter().position(|a| a == "run-job").unwrap() + 1;
    args.splice(at..at, ["--network-allow".into(), "10.0.0.0/8".into()]);
    let o = show(kiln(&lab, &dir).args(&args).output().unwrap());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("inet 10.213.0.6/30"),
        "slot 1's address: {out}"
    );
    assert_refused_fast(&out, "10.213.0.5");
    assert_downloaded(&out, &want, "10.213.0.5");
    host(&["addr", "del", "10.213.0.1/30", "dev", "lo"]);
    assert_no_leaks(&dir);
    assert_eq!(leftovers(&lab, &dir), Vec::<String>::new());
}

/// A job may hold `--network-max-connections` connections at once: with 4,
/// a first connection outside works (it is closed after), then 6 held open
/// at once (the outside server waits 10 s for their requests) leave a new
/// one refused at once, not timed out.
fn connections_past_the_limit_are_refused() {
    let lab = Lab::new("cl").unwrap();
    lab.http_server(&lab.outside, b"outside".to_vec()).unwrap();
    let dir = harness::run_dir("net-connlimit");
    let out_addr = OUTSIDE_ADDR.to_string();
    let script = format!(
        "{tries} echo FIRST-DONE; \
         for i in 1 2 3 4 5 6; do (sleep 8 | nc {out_addr} 8080 >/dev/null 2>&1 &); done; \
         sleep 3; try {out_addr}",
        tries = tries(&[&out_addr]),
    );
    let mut args = job_args("nat", &script);
    let at = args.iter().position(|a| a == "run-job").unwrap() + 1;
    args.splice(at..at, ["--network-max-connections".into(), "4".into()]);
    let o = show(kiln(&lab, &dir).args(&args).output().unwrap());
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let (first, rest) = out
        .split_once("FIRST-DONE")
        .unwrap_or_else(|| panic!("{out}"));
    assert!(try_line(first, &out_addr).contains("200 OK"), "{out}");
    assert_refused_fast(rest.trim_start(), &out_addr);
    assert_no_leaks(&dir);
    assert_eq!(leftovers(&lab, &dir), Vec::<String>::new());
}

fn main() -> std::process::ExitCode {
    kiln_testkit::Suite::new()
        .test(
            "downloads_by_name_and_pulls_from_the_registry_over_nat",
            &registry_needs(),
            downloads_by_name_and_pulls_from_the_registry_over_nat,
        )
        .test(
            "cannot_reach_the_host_metadata_private_or_denied_networks",
            &needs(),
            cannot_reach_the_host_metadata_private_or_denied_networks,
        )
        .test(
            "cannot_reach_another_jobs_vm",
            &needs(),
            cannot_reach_another_jobs_vm,
        )
        .test(
            "none_has_no_interface_but_loopback",
            &needs(),
            none_has_no_interface_but_loopback,
        )
        .test(
            "nothing_is_left_after_kill_9_and_a_restart",
            &needs(),
            nothing_is_left_after_kill_9_and_a_restart,
        )
        .test(
            "ten_jobs_leave_nothing_behind",
            &needs(),
            ten_jobs_leave_nothing_behind,
        )
        .test(
            "connections_past_the_limit_are_refused",
            &needs(),
            connections_past_the_limit_are_refused,
        )
        .test(
            "the_pool_skips_the_hosts_own_routes",
            &needs(),
            the_pool_skips_the_hosts_own_routes,
        )
        .test(
            "spoofed_source_addresses_and_macs_are_dropped",
            &needs(),
            spoofed_source_addresses_and_macs_are_dropped,
        )
        .test(
            "user_mode_downloads_through_passt",
            &passt_needs(),
            user_mode_downloads_through_passt,
        )
        .test(
            "user_mode_works_as_an_unprivileged_user",
            &unprivileged_needs(),
            user_mode_works_as_an_unprivileged_user,
        )
        .run()
}
