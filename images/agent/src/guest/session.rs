//! The frame loop: wait for `Start`, start the job's services (and say how
//! each went), then serve `RunStep` and `CollectArtifacts` until `Finish`
//! (or a hard `Cancel`), then `Done`.

use kiln_agent::proto::{Cancel, Frame, StepStart};

use super::artifacts::send_artifacts;
use super::error::Result;
use super::job::Job;
use super::port::Port;
use super::services::Services;
use super::step::run_step;
use super::sys;

/// Everything after `Ready`.
pub fn serve(port: &mut Port) -> Result<()> {
    let start = loop {
        match port.read_frame()? {
            Frame::Start(s) => break s,
            Frame::Cancel(_) => return port.send(&Frame::Done),
            other => port.log(&format!("ignoring {other:?} before Start")),
        }
    };
    let mut services = Services::mount(start.services.as_ref());
    let names = super::net::setup(start.network.as_ref(), &services.aliases())?;
    services.write_name_files(&names, port);
    let job = Job::prepare(&start)?;
    if start.services.is_some() {
        services.start();
        services.report(port)?;
    }
    run_job(port, &job)?;
    // The host may kill the VM as soon as it sees Done: flush every
    // filesystem first.
    sys::sync();
    port.send(&Frame::Done)
}

/// Serve `RunStep` frames until `Finish` (or a hard cancel between steps).
fn run_job(port: &mut Port, job: &Job) -> Result<()> {
    loop {
        match port.read_frame()? {
            Frame::RunStep(step) => {
                port.send(&Frame::StepStart(StepStart { step: step.index }))?;
                let end = run_step(port, job, &step)?;
                port.send(&Frame::StepEnd(end))?;
            }
            Frame::CollectArtifacts(req) => send_artifacts(port, job, &req)?,
            Frame::Finish | Frame::Cancel(Cancel { graceful: false }) => return Ok(()),
            Frame::Cancel(_) => {} // nothing running; the host decides what comes next
            other => port.log(&format!("ignoring {other:?} between steps")),
        }
    }
}
