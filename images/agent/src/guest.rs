//! The agent's life as PID 1. Linux only, raw syscalls through `libc`.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_agent::proto::{
    self, Cancel, Decoder, Fatal, Frame, Log, Ready, Start, StepEnd, StepSpec, StepStart, Stream,
};

use crate::user::{self, Identity};

/// Where the image's root filesystem is assembled.
const NEWROOT: &str = "/newroot";
/// Inside the job's root: step scripts live here (a tmpfs).
const SCRIPT_DIR: &str = "/run/kiln";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long devices may take to appear after their modules load.
const DEVICE_WAIT: Duration = Duration::from_secs(20);
/// After a step's process exits, how long we keep reading output its
/// background children may still write to the inherited pipes.
const DRAIN_GRACE: Duration = Duration::from_millis(200);
/// Graceful cancel: SIGTERM, then SIGKILL after this long.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// Linux's signal numbers are 1..NSIG (`_NSIG` is 65 on x86_64).
const NSIG: i32 = 65;

type Result<T> = std::result::Result<T, String>;

pub fn main() {
    let mut port: Option<File> = None;
    let outcome = run(&mut port);
    let ok = outcome.is_ok();
    if let Err(msg) = outcome {
        kmsg(&format!("fatal: {msg}"));
        if let Some(p) = port.as_mut() {
            let _ = send(p, &Frame::Fatal(Fatal { message: msg }));
        }
    }
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with RB_AUTOBOOT ends the VM (reboot=k -> i8042
    // reset, or QEMU -no-reboot). It only returns on error.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // Still here (not PID 1, e.g. under test): exit instead.
    std::process::exit(if ok { 0 } else { 1 });
}

fn run(port_slot: &mut Option<File>) -> Result<()> {
    mount_early()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    load_modules()?;
    let port_path = wait_for(DEVICE_WAIT, "the agent's virtio-console port", find_port)?;
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port_path)
        .map_err(|e| format!("open {port_path}: {e}"))?;
    let port = port_slot.insert(port);

    mount_root(&cmdline)?;

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    send(
        port,
        &Frame::Ready(Ready {
            protocol: proto::PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            boot_ms: uptime_ms(),
            kernel: kernel.trim().into(),
        }),
    )?;

    let mut decoder = Decoder::new();
    let start = loop {
        match read_frame(port, &mut decoder)? {
            Frame::Start(s) => break s,
            Frame::Cancel(_) => {
                send(port, &Frame::Done)?;
                return Ok(());
            }
            other => log(port, &format!("ignoring {other:?} before Start")),
        }
    };
    run_job(port, &mut decoder, start)?;
    // The host may kill the VM as soon as it sees Done, and it reads the
    // workspace disk back afterwards: flush every filesystem first.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    send(port, &Frame::Done)?;
    Ok(())
}

// ---------------------------------------------------------------- boot

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| format!("path with NUL byte: {s:?}"))
}

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (cstr(src)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: every pointer is a valid NUL-terminated string that outlives
    // the call; mount(2) does not keep them.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc != 0 {
        return Err(format!(
            "mount {src} on {target} ({fstype}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn mount_early() -> Result<()> {
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    Ok(())
}

/// Load `/lib/modules/kiln/*.ko` in the order `/lib/modules/kiln/order` gives
/// (dependencies first, computed on the host when the initramfs was built).
fn load_modules() -> Result<()> {
    let order = match std::fs::read_to_string("/lib/modules/kiln/order") {
        Ok(o) => o,
        Err(_) => return Ok(()), // a kernel with everything built in
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = format!("/lib/modules/kiln/{name}");
        let f = File::open(&path).map_err(|e| format!("open module {path}: {e}"))?;
        let params = cstr("")?;
        // SAFETY: finit_module(2) reads the module from the open descriptor
        // `f` and the NUL-terminated (empty) parameter string.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("load module {name}: {err}"));
            }
        }
    }
    Ok(())
}

fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            return Err(format!("{what} did not appear within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn find_port() -> Option<String> {
    for e in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == "org.kiln.agent.0" {
            let dev = format!("/dev/{}", e.file_name().to_string_lossy());
            if Path::new(&dev).exists() {
                return Some(dev);
            }
        }
    }
    None
}

fn find_disk(serial: &str) -> Option<String> {
    for e in std::fs::read_dir("/sys/block").ok()?.flatten() {
        let s = std::fs::read_to_string(e.path().join("serial")).unwrap_or_default();
        if s.trim() == serial {
            let dev = format!("/dev/{}", e.file_name().to_string_lossy());
            if Path::new(&dev).exists() {
                return Some(dev);
            }
        }
    }
    None
}

fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Root filesystem: the image read-only, an overlay whose upper layer is on
/// the scratch disk (or a tmpfs without one), and the API filesystems.
fn mount_root(cmdline: &str) -> Result<()> {
    let fstype = cmdline_value(cmdline, "kiln.rootfstype").unwrap_or("ext4");
    let root = wait_for(DEVICE_WAIT, "the root disk (serial kiln-root)", || {
        find_disk("kiln-root")
    })?;
    mount(&root, "/lower", fstype, libc::MS_RDONLY, "")?;
    match find_disk("kiln-scratch") {
        Some(dev) => mount(&dev, "/scratch", "ext4", libc::MS_NOATIME, "")?,
        None if cmdline_value(cmdline, "kiln.scratch") == Some("none") => {
            mount("tmpfs", "/scratch", "tmpfs", 0, "mode=0755")?
        }
        None => {
            let dev = wait_for(
                DEVICE_WAIT,
                "the scratch disk (serial kiln-scratch)",
                || find_disk("kiln-scratch"),
            )?;
            mount(&dev, "/scratch", "ext4", libc::MS_NOATIME, "")?
        }
    }
    for d in ["/scratch/upper", "/scratch/work"] {
        std::fs::create_dir_all(d).map_err(|e| format!("mkdir {d}: {e}"))?;
    }
    mount(
        "overlay",
        NEWROOT,
        "overlay",
        0,
        "lowerdir=/lower,upperdir=/scratch/upper,workdir=/scratch/work",
    )?;
    let nr = |p: &str| format!("{NEWROOT}{p}");
    mount(
        "proc",
        &nr("/proc"),
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    mount(
        "sysfs",
        &nr("/sys"),
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
        "",
    )?;
    mount(
        "devtmpfs",
        &nr("/dev"),
        "devtmpfs",
        libc::MS_NOSUID,
        "mode=0755",
    )?;
    mount(
        "devpts",
        &nr("/dev/pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    mount(
        "tmpfs",
        &nr("/dev/shm"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    mount(
        "tmpfs",
        &nr(SCRIPT_DIR),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;
    let _ = std::fs::create_dir_all(nr("/tmp"));
    let _ = set_mode(&nr("/tmp"), 0o1777);
    mount_workspace(cmdline)?;
    let hostname = b"kiln";
    // SAFETY: the buffer is valid for `len` bytes.
    unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) };
    Ok(())
}

/// The job's workspace: when the host attached a disk with serial
/// `kiln-work` (an ext4 image built from a host directory, e.g. a git
/// checkout) and named its mount point with `kiln.workdir=<abs path>`, mount
/// it read-write there, inside the job's root. The host reads the disk back
/// after the VM ends (artifacts), so writes must reach it: `main` syncs
/// before the VM reboots.
fn mount_workspace(cmdline: &str) -> Result<()> {
    let Some(workdir) = cmdline_value(cmdline, "kiln.workdir") else {
        return Ok(());
    };
    if !workdir.starts_with('/') || workdir.split('/').any(|c| c == "..") {
        return Err(format!(
            "kiln.workdir '{workdir}' is not a clean absolute path"
        ));
    }
    let dev = wait_for(DEVICE_WAIT, "the workspace disk (serial kiln-work)", || {
        find_disk("kiln-work")
    })?;
    let target = format!("{NEWROOT}{workdir}");
    mount(&dev, &target, "ext4", libc::MS_NOATIME, "")?;
    // mkfs.ext4 always creates lost+found; it is not part of the workspace.
    let _ = std::fs::remove_dir(format!("{target}/lost+found"));
    Ok(())
}

fn set_mode(path: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {path}: {e}"))
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|s| (s * 1000.0) as u64)
        .unwrap_or(0)
}

fn kmsg(msg: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = writeln!(f, "<3>kiln-agent: {msg}");
    }
}

// ---------------------------------------------------------------- protocol

fn send(port: &mut File, frame: &Frame) -> Result<()> {
    let bytes = frame.to_bytes().map_err(|e| e.to_string())?;
    port.write_all(&bytes)
        .map_err(|e| format!("write to console port: {e}"))
}

fn log(port: &mut File, message: &str) {
    kmsg(message);
    let _ = send(
        port,
        &Frame::Log(Log {
            message: message.into(),
        }),
    );
}

/// Block until one whole frame has arrived.
fn read_frame(port: &mut File, decoder: &mut Decoder) -> Result<Frame> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(f) = decoder
            .next_frame()
            .map_err(|e| format!("from host: {e}"))?
        {
            return Ok(f);
        }
        let n = port
            .read(&mut buf)
            .map_err(|e| format!("read console port: {e}"))?;
        if n == 0 {
            // The host side is not connected (yet); virtio-console reads 0.
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        decoder.push(&buf[..n]);
    }
}

// ---------------------------------------------------------------- steps

/// The job's context, fixed by `Start`.
struct Job {
    ident: Identity,
    workdir: String,
    /// Defaults (`PATH`, `HOME`, `HOSTNAME`) for variables a step leaves unset.
    defaults: Vec<(String, String)>,
}

fn prepare_job(start: &Start) -> Result<Job> {
    let read = |p: &str| std::fs::read_to_string(format!("{NEWROOT}{p}")).unwrap_or_default();
    let ident = user::resolve(&start.user, &read("/etc/passwd"), &read("/etc/group"))
        .map_err(|e| format!("image user: {e}"))?;
    let workdir = if start.workdir.is_empty() {
        "/".to_string()
    } else {
        start.workdir.clone()
    };
    if !workdir.starts_with('/') {
        return Err(format!("working directory '{workdir}' is not absolute"));
    }
    ensure_dir(&workdir, &ident)?;
    let defaults = vec![
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("HOME".to_string(), ident.home.clone()),
        ("HOSTNAME".to_string(), "kiln".to_string()),
    ];
    Ok(Job {
        ident,
        workdir,
        defaults,
    })
}

/// Create `dir` (inside the job's root) owned by the job's user if missing.
fn ensure_dir(dir: &str, ident: &Identity) -> Result<()> {
    let host = format!("{NEWROOT}{dir}");
    if !Path::new(&host).exists() {
        std::fs::create_dir_all(&host)
            .map_err(|e| format!("create working directory {dir}: {e}"))?;
        let c = cstr(&host)?;
        // SAFETY: `c` is a valid path string; lchown(2) does not keep it.
        unsafe { libc::lchown(c.as_ptr(), ident.uid, ident.gid) };
    }
    Ok(())
}

/// Serve `RunStep` frames until `Finish` (or a hard cancel between steps).
fn run_job(port: &mut File, decoder: &mut Decoder, start: Start) -> Result<()> {
    let job = prepare_job(&start)?;
    loop {
        match read_frame(port, decoder)? {
            Frame::RunStep(step) => {
                send(port, &Frame::StepStart(StepStart { step: step.index }))?;
                let end = run_step(port, decoder, &job, &step)?;
                send(port, &Frame::StepEnd(end))?;
            }
            Frame::CollectArtifacts(req) => send_artifacts(port, &job, &req)?,
            Frame::Finish | Frame::Cancel(Cancel { graceful: false }) => return Ok(()),
            Frame::Cancel(_) => {} // nothing running; the host decides what comes next
            other => log(port, &format!("ignoring {other:?} between steps")),
        }
    }
}

/// Writes a tar stream to the host as `Artifact` frames.
struct ArtifactWriter<'a> {
    port: &'a mut File,
    buf: Vec<u8>,
    /// Set when the console failed: that ends the agent, whereas an error
    /// about one file (unreadable, bad name) only leaves that file out.
    broken: Option<String>,
}

impl ArtifactWriter<'_> {
    fn send(&mut self, chunk: Vec<u8>) -> std::io::Result<()> {
        send(self.port, &Frame::Artifact(chunk)).map_err(|e| {
            self.broken = Some(e.clone());
            std::io::Error::other(e)
        })
    }
}

impl Write for ArtifactWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while self.buf.len() >= proto::MAX_OUTPUT_CHUNK {
            let rest = self.buf.split_off(proto::MAX_OUTPUT_CHUNK);
            let chunk = std::mem::replace(&mut self.buf, rest);
            self.send(chunk)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::take(&mut self.buf);
            self.send(chunk)?;
        }
        Ok(())
    }
}

/// Exactly `left` bytes of a file: cut if it grew since its size was
/// taken, zero-filled if it shrank or a read failed (a job's background
/// process may still write), so the tar entry always matches its header
/// and the stream stays in sync.
struct Exact<R> {
    inner: R,
    left: u64,
    /// Why the file was zero-filled, if it was.
    short: Option<String>,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = match self.inner.read(&mut buf[..want]) {
            Ok(n) if n > 0 => n,
            Ok(_) | Err(_) if self.short.is_some() => {
                buf[..want].fill(0);
                want
            }
            Ok(_) => {
                self.short = Some("it shrank while being sent (the rest is zeros)".into());
                buf[..want].fill(0);
                want
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                self.short = Some(format!("{e} (the rest is zeros)"));
                buf[..want].fill(0);
                want
            }
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// Send the workspace files `req` selects as a tar stream, then
/// `ArtifactsEnd`. Regular files only (and their directories); symbolic
/// links are skipped. Past `req.max_bytes` or [`proto::MAX_ARTIFACT_FILES`]
/// files are left out but counted, so the host can say exactly what it got.
fn send_artifacts(port: &mut File, job: &Job, req: &proto::CollectArtifacts) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let root = format!("{NEWROOT}{}", job.workdir);
    let files = kiln_agent::glob::select_paths(Path::new(&root), &req.paths, &req.exclude);
    let max_bytes = req.max_bytes.min(proto::MAX_ARTIFACT_BYTES);
    let mut end = proto::ArtifactsEnd::default();
    let mut problems = 0usize;
    let mut problem = |end: &mut proto::ArtifactsEnd, rel: &Path, why: &str| {
        problems += 1;
        if end.problems.len() < proto::MAX_PROBLEMS {
            let name = proto::quote(rel.as_os_str().as_bytes(), proto::QUOTE_MAX);
            end.problems.push(format!("{name}: {why}"));
        }
    };
    {
        let mut tar = tar::Builder::new(ArtifactWriter {
            port: &mut *port,
            buf: Vec::new(),
            broken: None,
        });
        tar.follow_symlinks(false);
        for rel in &files {
            let path = Path::new(&root).join(rel);
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                problem(&mut end, rel, "vanished before it could be sent");
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            if end.truncated
                || end.bytes + meta.len() > max_bytes
                || end.files >= proto::MAX_ARTIFACT_FILES
            {
                // Count the rest, send none of it: "later files" must not
                // quietly include small ones that happened to fit.
                end.truncated = true;
                end.left_out_files += 1;
                end.left_out_bytes += meta.len();
                continue;
            }
            if rel.as_os_str().len() > proto::MAX_ARTIFACT_PATH {
                problem(&mut end, rel, "path longer than 4096 bytes");
                continue;
            }
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    problem(&mut end, rel, &e.to_string());
                    continue;
                }
            };
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let mut data = Exact {
                inner: file,
                left: meta.len(),
                short: None,
            };
            match tar.append_data(&mut header, rel, &mut data) {
                Ok(()) => {
                    end.files += 1;
                    end.bytes += meta.len();
                    if let Some(why) = &data.short {
                        problem(&mut end, rel, why);
                    }
                }
                Err(e) => {
                    if let Some(b) = &tar.get_ref().broken {
                        return Err(b.clone());
                    }
                    // Only the header can fail now (e.g. its name): nothing
                    // of the entry was written.
                    problem(&mut end, rel, &e.to_string());
                }
            }
        }
        let mut w = tar.into_inner().map_err(|e| format!("artifacts: {e}"))?;
        w.flush().map_err(|e| format!("artifacts: {e}"))?;
    }
    if problems > end.problems.len() {
        let more = problems - end.problems.len();
        end.problems.push(format!("... and {more} more"));
    }
    send(port, &Frame::ArtifactsEnd(end))
}

/// The step's environment: its own, then the defaults for what it leaves unset.
fn step_env(job: &Job, step: &StepSpec, files: Option<&StepFiles>) -> Vec<(String, String)> {
    let mut env = step.env.clone();
    for (k, v) in &job.defaults {
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.clone(), v.clone()));
        }
    }
    if let Some(f) = files {
        for (k, v) in [
            ("GITHUB_ENV", &f.env),
            ("GITHUB_OUTPUT", &f.output),
            ("GITHUB_PATH", &f.path),
        ] {
            env.retain(|(key, _)| key != k);
            env.push((k.to_string(), v.clone()));
        }
    }
    env
}

/// A step's file-command files, as guest paths.
struct StepFiles {
    env: String,
    output: String,
    path: String,
}

fn make_step_files(idx: u32, ident: &Identity) -> Result<StepFiles> {
    let dir = format!("{SCRIPT_DIR}/files-{idx}");
    let host_dir = format!("{NEWROOT}{dir}");
    std::fs::create_dir_all(&host_dir).map_err(|e| describe_io(&format!("create {dir}"), &e))?;
    let files = StepFiles {
        env: format!("{dir}/env"),
        output: format!("{dir}/output"),
        path: format!("{dir}/path"),
    };
    for p in [&dir, &files.env, &files.output, &files.path] {
        let host = format!("{NEWROOT}{p}");
        if p != &dir {
            std::fs::write(&host, b"").map_err(|e| describe_io(&format!("create {p}"), &e))?;
        }
        let c = cstr(&host)?;
        // SAFETY: `c` is a valid path string; lchown(2) does not keep it.
        unsafe { libc::lchown(c.as_ptr(), ident.uid, ident.gid) };
    }
    Ok(files)
}

/// Read a file-command file back, at most `MAX_FILE_COMMANDS` bytes.
fn read_step_file(guest_path: &str, truncated: &mut bool) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = File::open(format!("{NEWROOT}{guest_path}")) {
        let _ = f
            .take(proto::MAX_FILE_COMMANDS as u64 + 1)
            .read_to_end(&mut buf);
    }
    if buf.len() > proto::MAX_FILE_COMMANDS {
        buf.truncate(proto::MAX_FILE_COMMANDS);
        *truncated = true;
    }
    String::from_utf8_lossy(&buf).into_owned()
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

fn pipe() -> Result<Pipe> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2(2) writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by us alone.
    Ok(unsafe {
        Pipe {
            read: OwnedFd::from_raw_fd(fds[0]),
            write: OwnedFd::from_raw_fd(fds[1]),
        }
    })
}

/// A started step: its process and the read ends of its output pipes.
struct Started {
    child: i32,
    out: OwnedFd,
    err: OwnedFd,
    files: Option<StepFiles>,
}

/// Everything before the step's process runs: its script, working
/// directory, file-command files, pipes, fork. A failure here is the
/// step's (the job may have filled `/run/kiln`, or fork-bombed the VM),
/// never the agent's: the caller reports it as the step's failure.
fn start_step(job: &Job, step: &StepSpec) -> Result<Started> {
    let idx = step.index;
    let ident = &job.ident;
    let script_path = format!("{SCRIPT_DIR}/step-{idx}.sh");
    let host_script = format!("{NEWROOT}{script_path}");
    std::fs::write(&host_script, &step.script)
        .map_err(|e| describe_io(&format!("cannot write the step's script {script_path}"), &e))?;
    set_mode(&host_script, 0o755)?;
    let argv: Vec<String> = step
        .argv
        .iter()
        .map(|a| a.replace("{script}", &script_path))
        .collect();
    if argv.is_empty() {
        return Err(format!("step '{}' has no command", step.name));
    }
    let workdir = match step.workdir.as_str() {
        "" => job.workdir.clone(),
        w if w.starts_with('/') => w.to_string(),
        w => format!("{}/{w}", job.workdir.trim_end_matches('/')),
    };
    if workdir.split('/').any(|c| c == "..") {
        return Err(format!("step working directory '{workdir}' contains '..'"));
    }
    ensure_dir(&workdir, ident)?;
    let files = if step.file_commands {
        Some(make_step_files(idx, ident)?)
    } else {
        None
    };
    let env = step_env(job, step, files.as_ref());
    let out = pipe()?;
    let err = pipe()?;
    let child = spawn(&argv, &env, &workdir, ident, &out, &err)?;
    Ok(Started {
        child,
        out: out.read,
        err: err.read,
        files,
    })
}

/// "what: error", with a hint when the job filled the filesystem.
fn describe_io(what: &str, e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        format!("{what}: {e}: the job filled {SCRIPT_DIR} (a tmpfs in the guest's memory)")
    } else {
        format!("{what}: {e}")
    }
}

fn run_step(port: &mut File, decoder: &mut Decoder, job: &Job, step: &StepSpec) -> Result<StepEnd> {
    let started = Instant::now();
    let idx = step.index;
    let Started {
        child,
        out,
        err,
        files,
    } = match start_step(job, step) {
        Ok(s) => s,
        Err(msg) => {
            // The job's failure, told in its own log: exit code 125 like
            // the other "could not run the command" cases in `spawn`.
            kmsg(&msg);
            let line = format!("kiln: step '{}' could not start: {msg}\n", step.name);
            for f in proto::output_frames(idx, Stream::Stderr, line.as_bytes()) {
                send(port, &f)?;
            }
            return Ok(StepEnd {
                step: idx,
                exit_code: 125,
                duration_ms: started.elapsed().as_millis() as u64,
                timed_out: false,
                canceled: false,
                skipped: false,
                files: None,
            });
        }
    };
    let mut term_sent = false;

    let mut fds: Vec<(Option<OwnedFd>, Stream)> =
        vec![(Some(out), Stream::Stdout), (Some(err), Stream::Stderr)];
    let deadline = (step.timeout_ms > 0).then(|| started + Duration::from_millis(step.timeout_ms));
    let mut status: Option<i32> = None;
    let mut exited_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut term_sent_at: Option<Instant> = None;
    let mut step_canceled = false;
    let mut buf = vec![0u8; proto::MAX_OUTPUT_CHUNK];

    loop {
        // Reap: our child, and any orphan re-parented to PID 1.
        loop {
            let mut st = 0;
            // SAFETY: waitpid(2) with a valid out-pointer; WNOHANG never blocks.
            let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == child && status.is_none() {
                status = Some(st);
                exited_at = Some(Instant::now());
            }
        }
        let open = fds.iter().any(|(fd, _)| fd.is_some());
        if status.is_some() && (!open || exited_at.is_some_and(|t| t.elapsed() > DRAIN_GRACE)) {
            break;
        }
        let now = Instant::now();
        if status.is_none() {
            if let Some(d) = deadline {
                if now >= d && !timed_out {
                    timed_out = true;
                    kill_group(child, libc::SIGKILL);
                }
            }
            if let Some(t) = term_sent_at {
                if t.elapsed() > TERM_GRACE {
                    kill_group(child, libc::SIGKILL);
                }
            }
        }

        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(3);
        let mut which: Vec<usize> = Vec::new();
        for (i, (fd, _)) in fds.iter().enumerate() {
            if let Some(fd) = fd {
                pfds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                which.push(i);
            }
        }
        let port_fd: RawFd = port.as_raw_fd();
        pfds.push(libc::pollfd {
            fd: port_fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let mut wait_ms: i64 = 50;
        if let Some(d) = deadline {
            wait_ms = wait_ms.min(d.saturating_duration_since(now).as_millis() as i64);
        }
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
        let n = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                wait_ms.max(0) as i32,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        for (pi, &fi) in which.iter().enumerate() {
            if pfds[pi].revents == 0 {
                continue;
            }
            let stream = fds[fi].1;
            let fd = match &fds[fi].0 {
                Some(fd) => fd.as_raw_fd(),
                None => continue,
            };
            // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is open.
            let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if r > 0 {
                send(
                    port,
                    &Frame::Output {
                        step: idx,
                        stream,
                        data: buf[..r as usize].to_vec(),
                    },
                )?;
            } else if r == 0
                || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                fds[fi].0 = None; // EOF or error: this stream is done
            }
        }
        if pfds.last().is_some_and(|p| p.revents & libc::POLLIN != 0) {
            // SAFETY: as above, for the port descriptor.
            let r = unsafe { libc::read(port_fd, buf.as_mut_ptr().cast(), buf.len()) };
            if r > 0 {
                decoder.push(&buf[..r as usize]);
                while let Some(f) = decoder
                    .next_frame()
                    .map_err(|e| format!("from host: {e}"))?
                {
                    if let Frame::Cancel(c) = f {
                        step_canceled = true;
                        if c.graceful && !term_sent {
                            term_sent = true;
                            kill_group(child, libc::SIGTERM);
                            term_sent_at = Some(Instant::now());
                        } else {
                            kill_group(child, libc::SIGKILL);
                        }
                    }
                }
            }
        }
    }
    if timed_out || step_canceled {
        kill_group(child, libc::SIGKILL);
    }
    let exit_code = status.map(exit_code).unwrap_or(-1);
    Ok(StepEnd {
        step: idx,
        exit_code,
        duration_ms: started.elapsed().as_millis() as u64,
        timed_out,
        canceled: step_canceled,
        skipped: false,
        files: files.map(|f| {
            let mut truncated = false;
            let env = read_step_file(&f.env, &mut truncated);
            let output = read_step_file(&f.output, &mut truncated);
            let path = read_step_file(&f.path, &mut truncated);
            proto::FileCommands {
                env,
                output,
                path,
                truncated,
            }
        }),
    })
}

/// The shell convention: the exit status, or 128 + the signal that killed it.
fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        -1
    }
}

fn kill_group(pid: i32, sig: i32) {
    // SAFETY: kill(2) on the step's process group (it called setsid, so its
    // pgid is its pid); a stale id at worst fails with ESRCH.
    unsafe { libc::kill(-pid, sig) };
}

/// Fork and exec `argv` chrooted into the job's root, as `ident`.
fn spawn(
    argv: &[String],
    env: &[(String, String)],
    workdir: &str,
    ident: &Identity,
    out: &Pipe,
    err: &Pipe,
) -> Result<i32> {
    // Everything the child needs is prepared before fork: the agent is
    // single-threaded, but the child should only make raw syscalls.
    let c_root = cstr(NEWROOT)?;
    let c_wd = cstr(workdir)?;
    let c_slash = cstr("/")?;
    let c_null = cstr("/dev/null")?;
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    let candidates: Vec<CString> = exec_candidates(&argv[0], path_var)
        .into_iter()
        .filter_map(|p| CString::new(p).ok())
        .collect();
    let c_args: Vec<CString> = argv.iter().map(|a| cstr(a)).collect::<Result<_>>()?;
    let c_env: Vec<CString> = env
        .iter()
        .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
        .collect();
    let mut p_args: Vec<*const libc::c_char> = c_args.iter().map(|c| c.as_ptr()).collect();
    p_args.push(std::ptr::null());
    let mut p_env: Vec<*const libc::c_char> = c_env.iter().map(|c| c.as_ptr()).collect();
    p_env.push(std::ptr::null());
    let groups: Vec<libc::gid_t> = ident.groups.clone();
    let not_found = format!("kiln: {}: command not found\n", argv[0]);
    let (out_w, err_w) = (out.write.as_raw_fd(), err.write.as_raw_fd());
    // SAFETY: an all-zero sigaction is a valid value (no flags, empty mask);
    // SIG_DFL is then set as its handler.
    let mut default_action: libc::sigaction = unsafe { std::mem::zeroed() };
    default_action.sa_sigaction = libc::SIG_DFL;

    // SAFETY: fork(2) in a single-threaded process; the child only performs
    // raw syscalls on memory prepared above and then execs or _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: in the child, every pointer refers to data allocated before
        // fork and still alive; we never return from this block.
        unsafe {
            let fail = |msg: &[u8], code: i32| -> ! {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(code)
            };
            libc::setsid();
            // The job starts as from a plain init: every signal at its
            // default disposition (Rust's runtime ignores SIGPIPE, and an
            // ignored signal stays ignored across execve, which POSIX
            // shells cannot undo) and none blocked. sigaction(2) and
            // sigprocmask(2) are async-signal-safe; the kernel refuses
            // SIGKILL/SIGSTOP and libc its internal signals, harmlessly.
            // The agent changes no rlimits, so the kernel's defaults apply.
            for sig in 1..NSIG {
                libc::sigaction(sig, &default_action, std::ptr::null_mut());
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            let null = libc::open(c_null.as_ptr(), libc::O_RDONLY);
            libc::dup2(null, 0);
            libc::dup2(out_w, 1);
            libc::dup2(err_w, 2);
            if null > 2 {
                libc::close(null);
            }
            if libc::chroot(c_root.as_ptr()) != 0 || libc::chdir(c_slash.as_ptr()) != 0 {
                fail(b"kiln: cannot enter the job's root filesystem\n", 125);
            }
            if libc::chdir(c_wd.as_ptr()) != 0 {
                fail(b"kiln: cannot enter the working directory\n", 125);
            }
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(ident.gid) != 0
                || libc::setuid(ident.uid) != 0
            {
                fail(b"kiln: cannot switch to the image's user\n", 125);
            }
            let mut eacces = false;
            for c in &candidates {
                libc::execve(c.as_ptr(), p_args.as_ptr(), p_env.as_ptr());
                if *libc::__errno_location() == libc::EACCES {
                    eacces = true;
                }
            }
            if eacces {
                fail(b"kiln: permission denied\n", 126);
            }
            fail(not_found.as_bytes(), 127);
        }
    }
    Ok(pid)
}

/// Where to look for `prog`: itself if it has a slash, else each PATH entry.
fn exec_candidates(prog: &str, path: &str) -> Vec<String> {
    if prog.contains('/') {
        return vec![prog.to_string()];
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{prog}", d.trim_end_matches('/')))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(libc::SIGKILL), 137);
    }

    #[test]
    fn path_search() {
        assert_eq!(exec_candidates("/bin/sh", "/x"), vec!["/bin/sh"]);
        assert_eq!(
            exec_candidates("sh", "/usr/bin:/bin/:"),
            vec!["/usr/bin/sh", "/bin/sh"]
        );
    }

    #[test]
    fn cmdline_values() {
        let c = "quiet kiln.rootfstype=erofs kiln.scratch=none";
        assert_eq!(cmdline_value(c, "kiln.rootfstype"), Some("erofs"));
        assert_eq!(cmdline_value(c, "kiln.scratch"), Some("none"));
        assert_eq!(cmdline_value(c, "kiln.x"), Option::None);
    }
}
