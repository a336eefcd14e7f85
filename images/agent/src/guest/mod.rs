//! The agent's life as PID 1 (Linux only).
//!
//! - `boot`: API filesystems, kernel modules, the command line, devices;
//! - `disks`: the job's root filesystem (image, scratch, overlay, workspace);
//! - `identity`: a fresh identity after a restore from a snapshot (`Resume`);
//! - `port`: the protocol's virtio-console port;
//! - `session`: the frame loop (`Ready`, `Start`, `ServiceStatus`, `RunStep`,
//!   `CollectArtifacts`, `Cancel`, `Finish`, `Done`);
//! - `services`: the job's services (their roots, processes, output and
//!   health check);
//! - `job`: the job's context (user, working directory, environment) and a
//!   step's files;
//! - `step`: running one step (output, timeout, cancel, its `StepEnd`);
//! - `spawn`: fork and exec a step's process in the job's root;
//! - `artifacts`: the tar stream of artifacts;
//! - `net`: `lo`, `eth0` and the name-service files, from `Start`;
//! - `sys`: thin wrappers over the kernel's interfaces; `error`: the agent's [`error::Error`].

mod artifacts;
mod boot;
mod disks;
mod error;
mod identity;
mod job;
mod net;
mod port;
mod services;
mod session;
mod spawn;
mod step;
mod sys;

use std::time::{Duration, Instant};

use kiln_agent::proto::{self, Fatal, Frame, Ready, Resume};

use error::Result;
use port::Port;

/// Where the image's root filesystem is assembled.
const NEWROOT: &str = "/newroot";
/// Inside the job's root: step scripts live here (a tmpfs).
const SCRIPT_DIR: &str = "/run/kiln";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long devices may take to appear after their modules load.
const DEVICE_WAIT: Duration = Duration::from_secs(20);

pub fn main() {
    let mut port: Option<Port> = None;
    let outcome = run(&mut port);
    let ok = outcome.is_ok();
    if let Err(e) = outcome {
        let message = e.render();
        sys::kmsg(&format!("fatal: {message}"));
        if let Some(p) = port.as_mut() {
            let _ = p.send(&Frame::Fatal(Fatal { message }));
        }
    }
    sys::sync();
    sys::reboot();
    // Still here (not PID 1, e.g. under test): exit instead.
    std::process::exit(if ok { 0 } else { 1 });
}

/// Boot, tell the host we are ready, serve the job. Booted to be
/// snapshotted (`kiln.snapshot=wait`): tell the host we are ready before
/// anything of a job is there, wait (the snapshot is taken here) for
/// `Resume`, take its fresh identity, then mount the job's disks and go on
/// as a cold boot does.
fn run(port_slot: &mut Option<Port>) -> Result<()> {
    boot::mount_early()?;
    let cmdline = boot::cmdline();
    boot::load_modules()?;
    let port = port_slot.insert(Port::open()?);

    if boot::cmdline_value(&cmdline, proto::CMDLINE_SNAPSHOT) == Some(proto::SNAPSHOT_WAIT) {
        // 0 in the snapshot: every restored VM starts from it.
        let mut generation = 0u64;
        port.send(&ready())?;
        let Some(resume) = wait_for_resume(port)? else {
            return port.send(&Frame::Done);
        };
        let t = Instant::now();
        identity::apply(&resume, &mut generation, &mut identity::Guest)?;
        let identity_ms = t.elapsed();
        let t = Instant::now();
        disks::wait_for_disk(proto::ROOT_DISK_SERIAL, "root")?;
        let disk_ms = t.elapsed();
        let t = Instant::now();
        disks::mount_root(&disks::RootPlan::from_resume(&resume))?;
        // Where the resume's time went, for the host's boot breakdown (not
        // to the kernel log: the serial console is slow).
        port.send(&Frame::Log(proto::Log {
            message: format!(
                "{}identity={:.1} root-disk={:.1} mounts={:.1}",
                proto::RESUME_TIMINGS,
                identity_ms.as_secs_f64() * 1e3,
                disk_ms.as_secs_f64() * 1e3,
                t.elapsed().as_secs_f64() * 1e3
            ),
        }))?;
    } else {
        disks::mount_root(&disks::RootPlan::from_cmdline(&cmdline))?;
        sys::sethostname("kiln");
    }
    port.send(&ready())?;
    session::serve(port)
}

fn ready() -> Frame {
    Frame::Ready(Ready {
        protocol: proto::PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        boot_ms: boot::uptime_ms(),
        kernel: boot::kernel_release(),
    })
}

/// At the snapshot point: the next `Resume` (`None`: the host cancelled).
fn wait_for_resume(port: &mut Port) -> Result<Option<Resume>> {
    loop {
        match port.read_frame()? {
            Frame::Resume(r) => return Ok(Some(r)),
            Frame::Cancel(_) => return Ok(None),
            other => port.log(&format!("ignoring {} before Resume", other.describe())),
        }
    }
}
