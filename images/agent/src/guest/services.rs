//! The job's services (`Start::services`): each image's disk read-only
//! under an overlay whose upper layer is on the scratch disk, started in a
//! mount namespace of its own with its entrypoint and command, its output
//! kept (the last [`MAX_SERVICE_LOG`] bytes) by a reader thread, and a
//! health check like gitlab-runner's: one of its TCP ports on 127.0.0.1
//! must accept a connection within `Services::wait_ms`. The host hears how
//! each one went (`ServiceStatus`) before the first step; it decides what
//! that means for the job.
//!
//! A service that cannot be mounted or started is reported as unhealthy,
//! never as the agent's failure: the job goes on, as under gitlab-runner.

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_agent::proto::{
    self, service_disk_serial, Frame, ServiceStart, ServiceStatus, MAX_SERVICES, MAX_SERVICE_LOG,
};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::mount::MountFlags;
use rustix::process::{Pid, WaitOptions};

use super::disks::{mount_api, wait_for_disk};
use super::error::Result;
use super::net::{write_files, NameFile};
use super::port::Port;
use super::spawn::{pipe, spawn_in, Root};
use super::step::exit_code;
use super::sys::mount;
use super::DEFAULT_PATH;
use crate::user;

/// How long one connection attempt to a service's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between rounds of connection attempts.
const RETRY: Duration = Duration::from_millis(100);
/// How long the report waits for the rest of an exited service's output:
/// its pipe closes when the service is gone, unless a process it left
/// behind holds it open.
const EXITED_DRAIN: Duration = Duration::from_secs(5);

/// One service and how far it got.
struct Service {
    spec: ServiceStart,
    /// Its root (a mount point in the agent's namespace).
    root: String,
    state: State,
}

enum State {
    /// Could not be mounted or started: why.
    Failed(String),
    Mounted,
    Running(Pid),
    /// Exited before the health check was over: its exit code.
    Exited(i32),
    Healthy,
}

/// The job's services.
pub struct Services {
    list: Vec<Service>,
    wait: Duration,
    /// The end of each service's output, by index in `list`.
    logs: Arc<Logs>,
}

/// What the log reader keeps of each service's output.
struct Logs {
    state: Mutex<Vec<Log>>,
    /// Notified when a service's pipe closes.
    closed: Condvar,
}

#[derive(Clone, Default)]
struct Log {
    /// The last [`MAX_SERVICE_LOG`] bytes.
    tail: Vec<u8>,
    /// The pipe closed: the reader has everything the service wrote.
    ended: bool,
}

impl Logs {
    fn new(n: usize) -> Logs {
        Logs {
            state: Mutex::new(vec![Log::default(); n]),
            closed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Log>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Services {
    /// Mount every service's root (the host sent at most [`MAX_SERVICES`];
    /// more are reported as failed, not mounted).
    pub fn mount(start: Option<&proto::Services>) -> Services {
        let (list, wait_ms) = match start {
            Some(s) => (s.list.as_slice(), s.wait_ms),
            None => (&[][..], 0),
        };
        let list: Vec<Service> = list
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let root = format!("/svc/{i}/root");
                let state = if i >= MAX_SERVICES || spec.index as usize != i {
                    State::Failed(format!(
                        "more than {MAX_SERVICES} services, or out of order"
                    ))
                } else {
                    match mount_service(i, spec, &root) {
                        Ok(()) => State::Mounted,
                        Err(e) => State::Failed(e),
                    }
                };
                Service {
                    spec: spec.clone(),
                    root,
                    state,
                }
            })
            .collect();
        let logs = Arc::new(Logs::new(list.len()));
        Services {
            list,
            wait: Duration::from_millis(wait_ms),
            logs,
        }
    }

    /// Every alias of every service, for `/etc/hosts`.
    pub fn aliases(&self) -> Vec<String> {
        self.list
            .iter()
            .flat_map(|s| s.spec.aliases.iter().cloned())
            .collect()
    }

    /// Give each mounted service the job's name-service files (`/etc/hosts`
    /// with every alias, resolv.conf, hostname), as far as its image lets.
    pub fn write_name_files(&mut self, files: &[NameFile], port: &mut Port) {
        for s in &self.list {
            if matches!(s.state, State::Mounted) {
                if let Err(e) = write_files(&s.root, files) {
                    port.log(&format!("service {}: {}", s.spec.index, e.render()));
                }
            }
        }
    }

    /// Start every mounted service, and the thread that keeps their output.
    pub fn start(&mut self) {
        let mut readers: Vec<(usize, OwnedFd)> = Vec::new();
        for (i, s) in self.list.iter_mut().enumerate() {
            if !matches!(s.state, State::Mounted) {
                continue;
            }
            match start_service(s) {
                Ok((pid, out)) => {
                    s.state = State::Running(pid);
                    readers.push((i, out));
                }
                Err(e) => s.state = State::Failed(e),
            }
        }
        if !readers.is_empty() {
            let logs = self.logs.clone();
            let spawned = std::thread::Builder::new()
                .name("service-logs".into())
                .spawn(move || keep_logs(readers, &logs));
            if let Err(e) = spawned {
                // Without the reader a service blocks once its pipe is
                // full: say so in the serial log; the services still run.
                super::sys::kmsg(&format!("cannot start the service log reader: {e}"));
            }
        }
    }

    /// Wait (at most `wait_ms`) until every running service with ports
    /// accepts a connection on one of them, then tell the host how each
    /// service is.
    pub fn report(&mut self, port: &mut Port) -> Result<()> {
        for status in self.statuses() {
            port.send(&Frame::ServiceStatus(status))?;
        }
        Ok(())
    }

    /// The health check, and how each service is after it.
    fn statuses(&mut self) -> Vec<ServiceStatus> {
        self.wait_healthy();
        let mut out = Vec::with_capacity(self.list.len());
        for s in &self.list {
            let (healthy, error) = match &s.state {
                State::Healthy => (true, String::new()),
                State::Running(_) if s.spec.ports.is_empty() || self.wait.is_zero() => {
                    (true, String::new())
                }
                State::Running(_) => {
                    let ports: Vec<String> = s.spec.ports.iter().map(u16::to_string).collect();
                    let error = format!(
                        "no connection to 127.0.0.1 on port {} within {} s",
                        ports.join(" or "),
                        self.wait.as_secs_f64()
                    );
                    (false, error)
                }
                State::Mounted => (false, "it was not started".into()),
                State::Failed(e) => (false, e.clone()),
                State::Exited(code) => (
                    false,
                    format!("it exited with code {code} before it accepted a connection"),
                ),
            };
            let log = if healthy {
                String::new()
            } else {
                self.tail(s.spec.index as usize, matches!(s.state, State::Exited(_)))
            };
            out.push(ServiceStatus {
                index: s.spec.index,
                healthy,
                error,
                log,
            });
        }
        out
    }

    /// The end of service `i`'s output, from a line start where it was cut.
    /// An `exited` service's last words may still be in its pipe: wait
    /// (at most [`EXITED_DRAIN`]) until the reader has read it to its end,
    /// rather than for a fixed pause a loaded guest may not give the reader
    /// time in.
    fn tail(&self, i: usize, exited: bool) -> String {
        let logs = if exited {
            let ended = |l: &mut Vec<Log>| l.get(i).is_none_or(|l| l.ended);
            self.logs
                .closed
                .wait_timeout_while(self.logs.lock(), EXITED_DRAIN, |l| !ended(l))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0)
        } else {
            // Still running: there is no end to wait for; a pause lets the
            // reader take what it wrote last.
            std::thread::sleep(Duration::from_millis(50));
            self.logs.lock()
        };
        let Some(log) = logs.get(i).map(|l| &l.tail) else {
            return String::new();
        };
        let mut from = 0;
        if log.len() >= MAX_SERVICE_LOG {
            from = log.iter().position(|&b| b == b'\n').map_or(0, |p| p + 1);
        }
        String::from_utf8_lossy(&log[from..]).into_owned()
    }

    /// Poll the running services with ports until each accepts a
    /// connection, exits, or the wait is over.
    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + self.wait;
        loop {
            let mut pending = false;
            for s in &mut self.list {
                let State::Running(pid) = s.state else {
                    continue;
                };
                if s.spec.ports.is_empty() || self.wait.is_zero() {
                    continue;
                }
                if let Ok(Some((_, st))) = rustix::process::waitpid(Some(pid), WaitOptions::NOHANG)
                {
                    s.state = State::Exited(exit_code(st.as_raw()));
                    continue;
                }
                let up = s.spec.ports.iter().any(|&p| {
                    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, p);
                    TcpStream::connect_timeout(&addr.into(), CONNECT_TIMEOUT).is_ok()
                });
                if up {
                    s.state = State::Healthy;
                } else {
                    pending = true;
                }
            }
            if !pending || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(RETRY);
        }
    }
}

/// Service `i`'s root at `root`: its disk read-only at `/svc/<i>/lower`, an
/// overlay with its upper layer on the scratch disk, the API filesystems.
fn mount_service(i: usize, spec: &ServiceStart, root: &str) -> std::result::Result<(), String> {
    let render = |e: super::error::Error| e.render();
    if !matches!(spec.fstype.as_str(), "ext4" | "erofs") {
        return Err(format!(
            "unknown root filesystem type {}",
            proto::quote(spec.fstype.as_bytes(), 40)
        ));
    }
    let serial = service_disk_serial(spec.index);
    let dev = wait_for_disk(&serial, "service").map_err(render)?;
    let lower = format!("/svc/{i}/lower");
    mount(&dev, &lower, &spec.fstype, MountFlags::RDONLY, c"").map_err(render)?;
    let (upper, work) = (
        format!("/scratch/svc-{i}/upper"),
        format!("/scratch/svc-{i}/work"),
    );
    for d in [&upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("mkdir {d}: {e}"))?;
    }
    let opts = std::ffi::CString::new(format!("lowerdir={lower},upperdir={upper},workdir={work}"))
        .map_err(|_| "bad overlay options".to_string())?;
    mount("overlay", root, "overlay", MountFlags::empty(), &opts).map_err(render)?;
    mount_api(root).map_err(render)
}

/// Fork and exec the service in its root: its user from its own
/// `/etc/passwd`, its working directory, its environment with defaults.
/// Returns its pid and the read end of its output pipe.
fn start_service(s: &Service) -> std::result::Result<(Pid, OwnedFd), String> {
    let spec = &s.spec;
    if spec.argv.is_empty() {
        return Err("the image has no entrypoint or command, and the service names none".into());
    }
    let read = |p: &str| std::fs::read_to_string(format!("{}{p}", s.root)).unwrap_or_default();
    let ident = user::resolve(&spec.user, &read("/etc/passwd"), &read("/etc/group"))
        .map_err(|e| format!("its user: {e}"))?;
    let workdir = if spec.workdir.is_empty() {
        "/".to_string()
    } else {
        spec.workdir.clone()
    };
    if !workdir.starts_with('/') || workdir.split('/').any(|c| c == "..") {
        return Err(format!(
            "working directory {} is not a clean absolute path",
            proto::quote(workdir.as_bytes(), 80)
        ));
    }
    let _ = std::fs::create_dir_all(format!("{}{workdir}", s.root));
    let mut env = spec.env.clone();
    for (k, v) in [
        ("PATH", DEFAULT_PATH),
        ("HOME", ident.home.as_str()),
        ("HOSTNAME", "kiln"),
    ] {
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.into(), v.into()));
        }
    }
    let out = pipe().map_err(|e| e.render())?;
    let pid = spawn_in(
        Root::Isolated(&s.root),
        &spec.argv,
        &env,
        &workdir,
        &ident,
        &out,
        &out,
    )
    .map_err(|e| e.render())?;
    Ok((pid, out.read))
}

/// The log reader: poll the services' pipes, keep the last
/// [`MAX_SERVICE_LOG`] bytes of each; ends when every pipe is closed.
fn keep_logs(mut fds: Vec<(usize, OwnedFd)>, logs: &Logs) {
    let mut buf = vec![0u8; 16 * 1024];
    while !fds.is_empty() {
        let mut pfds: Vec<PollFd<'_>> = fds
            .iter()
            .map(|(_, fd)| PollFd::from_borrowed_fd(fd.as_fd(), PollFlags::IN))
            .collect();
        let timeout = Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut pfds, Some(&timeout)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => return,
        }
        let ready: Vec<usize> = pfds
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.revents().is_empty())
            .map(|(i, _)| i)
            .collect();
        drop(pfds);
        let mut closed = Vec::new();
        for i in ready {
            let (svc, fd) = &fds[i];
            match rustix::io::read(fd, &mut buf) {
                Ok(n) if n > 0 => {
                    if let Some(log) = logs.lock().get_mut(*svc) {
                        let log = &mut log.tail;
                        log.extend_from_slice(&buf[..n]);
                        if log.len() > MAX_SERVICE_LOG {
                            let cut = log.len() - MAX_SERVICE_LOG;
                            log.drain(..cut);
                        }
                    }
                }
                Err(Errno::INTR) | Err(Errno::AGAIN) => {}
                _ => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            let (svc, _) = fds.remove(i);
            if let Some(log) = logs.lock().get_mut(svc) {
                log.ended = true;
            }
            logs.closed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(pid: u32, ports: Vec<u16>) -> Service {
        Service {
            spec: ServiceStart {
                ports,
                ..Default::default()
            },
            root: String::new(),
            state: State::Running(Pid::from_raw(pid as i32).unwrap()),
        }
    }

    fn services(list: Vec<Service>, wait: Duration) -> Services {
        let n = list.len();
        let mut list = list;
        for (i, s) in list.iter_mut().enumerate() {
            s.spec.index = i as u32;
        }
        let logs = Arc::new(Logs::new(n));
        // No reader in these tests unless one says so: nothing more comes.
        for l in logs.lock().iter_mut() {
            l.ended = true;
        }
        Services { list, wait, logs }
    }

    /// The health check against real processes and sockets: one listens,
    /// one never does, one exits first, one has no ports.
    #[test]
    fn the_health_check_tells_listening_silent_and_exited_services_apart() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap().port();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut quitter = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let mut idle = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let mut s = services(
            vec![
                running(sleeper.id(), vec![closed, open]),
                running(sleeper.id(), vec![closed]),
                running(quitter.id(), vec![closed]),
                running(idle.id(), vec![]),
            ],
            Duration::from_secs(1),
        );
        s.logs.lock()[1].tail = format!("{}\nlast words\n", "x".repeat(2 * MAX_SERVICE_LOG))
            .into_bytes()
            .split_off(MAX_SERVICE_LOG + 11);
        let st = s.statuses();
        assert!(
            st[0].healthy && st[0].error.is_empty() && st[0].log.is_empty(),
            "{:?}",
            st[0]
        );
        assert!(!st[1].healthy);
        assert_eq!(
            st[1].error,
            format!("no connection to 127.0.0.1 on port {closed} within 1 s")
        );
        assert_eq!(st[1].log, "last words\n", "cut at a line start");
        assert!(!st[2].healthy);
        assert_eq!(
            st[2].error,
            "it exited with code 3 before it accepted a connection"
        );
        assert!(st[3].healthy, "no ports: no wait");
        for c in [&mut sleeper, &mut idle] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = quitter.wait();
    }

    /// A service that exited: its last words are in the report even when
    /// the log reader runs late (a loaded guest). The report used to pause
    /// 50 ms and take whatever had been read by then.
    #[test]
    fn an_exited_services_last_words_are_waited_for() {
        let p = pipe().unwrap();
        rustix::io::write(&p.write, b"starting\nno port here\n").unwrap();
        drop(p.write); // the service is gone
        let mut s = services(vec![running(1, vec![1])], Duration::from_secs(1));
        s.list[0].state = State::Exited(3);
        s.logs.lock()[0].ended = false;
        let logs = s.logs.clone();
        let read = p.read;
        let reader = std::thread::spawn(move || {
            // The reader is scheduled late.
            std::thread::sleep(Duration::from_millis(300));
            keep_logs(vec![(0, read)], &logs);
        });
        let st = s.statuses();
        reader.join().unwrap();
        assert!(!st[0].healthy);
        assert_eq!(st[0].log, "starting\nno port here\n");
    }
}
