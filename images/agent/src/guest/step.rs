//! Running one step: start its process, stream its stdout and stderr as
//! `Output` frames, reap it (and any orphan re-parented to PID 1), enforce
//! its timeout, act on `Cancel`, and describe how it ended.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use kiln_agent::proto::{self, Frame, StepEnd, StepSpec, Stream, EXIT_CANNOT_START, EXIT_SIGNALED};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::process::{Pid, Signal, WaitOptions};

use super::error::{Error, Result};
use super::job::{Job, StepFiles};
use super::port::Port;
use super::spawn::{pipe, spawn_in, Root};
use super::sys::kmsg;

/// After a step's process exits, how long we keep reading output its
/// background children may still write to the inherited pipes.
const DRAIN_GRACE: Duration = Duration::from_millis(200);
/// Graceful cancel: SIGTERM, then SIGKILL after this long.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// The longest the loop sleeps in poll before it looks at the clock again.
const POLL_MS: u64 = 50;

/// A started step: its process and the read ends of its output pipes.
struct Started {
    child: Pid,
    out: OwnedFd,
    err: OwnedFd,
    files: Option<StepFiles>,
}

/// Everything before the step's process runs: its script, working
/// directory, file-command files, pipes, fork. A failure here is the
/// step's (the job may have filled `/run/kiln`, or fork-bombed the VM),
/// never the agent's: the caller reports it as the step's failure.
fn start_step(job: &Job, step: &StepSpec) -> Result<Started> {
    let argv = job.write_script(step)?;
    let workdir = job.step_workdir(step)?;
    let files = if step.file_commands {
        Some(StepFiles::create(step.index, &job.ident)?)
    } else {
        None
    };
    let env = job.step_env(step, files.as_ref());
    let out = pipe()?;
    let err = pipe()?;
    let child = spawn_in(Root::Job, &argv, &env, &workdir, &job.ident, &out, &err)?;
    Ok(Started {
        child,
        out: out.read,
        err: err.read,
        files,
    })
}

/// Run `step` to its end. Only a failure of the console is an error; a
/// step that cannot start ends with [`EXIT_CANNOT_START`] and says why in
/// its own output.
pub fn run_step(port: &mut Port, job: &Job, step: &StepSpec) -> Result<StepEnd> {
    let started = Instant::now();
    let idx = step.index;
    let Started {
        child,
        out,
        err,
        files,
    } = match start_step(job, step) {
        Ok(s) => s,
        Err(e) => {
            // The job's failure, told in its own log: exit code 125 like
            // the other "could not run the command" cases in `spawn`.
            let msg = e.render();
            kmsg(&msg);
            let line = format!("kiln: step '{}' could not start: {msg}\n", step.name);
            for f in proto::output_frames(idx, Stream::Stderr, line.as_bytes()) {
                port.send(&f)?;
            }
            return Ok(StepEnd {
                step: idx,
                exit_code: EXIT_CANNOT_START,
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
        while let Ok(Some((pid, st))) = rustix::process::wait(WaitOptions::NOHANG) {
            if pid == child && status.is_none() {
                status = Some(st.as_raw());
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
                    kill_group(child, Signal::KILL);
                }
            }
            if let Some(t) = term_sent_at {
                if t.elapsed() > TERM_GRACE {
                    kill_group(child, Signal::KILL);
                }
            }
        }

        let mut wait_ms = POLL_MS;
        if let Some(d) = deadline {
            wait_ms = wait_ms.min(d.saturating_duration_since(now).as_millis() as u64);
        }
        let (ready, port_ready) = poll_step(&fds, port, wait_ms)?;
        for fi in ready {
            let stream = fds[fi].1;
            let Some(fd) = &fds[fi].0 else { continue };
            match rustix::io::read(fd, &mut buf) {
                Ok(n) if n > 0 => port.send(&Frame::Output {
                    step: idx,
                    stream,
                    data: buf[..n].to_vec(),
                })?,
                Err(Errno::INTR) => {}
                _ => fds[fi].0 = None, // EOF or error: this stream is done
            }
        }
        if port_ready && port.receive(&mut buf) {
            while let Some(f) = port.next_frame()? {
                if let Frame::Cancel(c) = f {
                    step_canceled = true;
                    if c.graceful && !term_sent {
                        term_sent = true;
                        kill_group(child, Signal::TERM);
                        term_sent_at = Some(Instant::now());
                    } else {
                        kill_group(child, Signal::KILL);
                    }
                }
            }
        }
    }
    if timed_out || step_canceled {
        kill_group(child, Signal::KILL);
    }
    let exit_code = status.map(exit_code).unwrap_or(-1);
    Ok(StepEnd {
        step: idx,
        exit_code,
        duration_ms: started.elapsed().as_millis() as u64,
        timed_out,
        canceled: step_canceled,
        skipped: false,
        files: files.map(|f| f.read_back()),
    })
}

/// Wait up to `wait_ms` for output on the step's open pipes or a frame on
/// the port: the indices in `fds` that have something (data, EOF or an
/// error), and whether the port has data.
fn poll_step(
    fds: &[(Option<OwnedFd>, Stream)],
    port: &Port,
    wait_ms: u64,
) -> Result<(Vec<usize>, bool)> {
    let mut which: Vec<usize> = Vec::with_capacity(fds.len());
    let mut pfds: Vec<PollFd<'_>> = Vec::with_capacity(fds.len() + 1);
    for (i, (fd, _)) in fds.iter().enumerate() {
        if let Some(fd) = fd {
            pfds.push(PollFd::new(fd, PollFlags::IN));
            which.push(i);
        }
    }
    pfds.push(PollFd::from_borrowed_fd(port.as_fd(), PollFlags::IN));
    let timeout = Timespec {
        tv_sec: 0,
        tv_nsec: (wait_ms * 1_000_000) as _,
    };
    match rustix::event::poll(&mut pfds, Some(&timeout)) {
        Ok(_) => {}
        Err(Errno::INTR) => return Ok((Vec::new(), false)),
        Err(e) => return Err(Error::Poll(e.into())),
    }
    let ready = which
        .into_iter()
        .zip(&pfds)
        .filter(|(_, p)| !p.revents().is_empty())
        .map(|(i, _)| i)
        .collect();
    let port_ready = pfds
        .last()
        .is_some_and(|p| p.revents().contains(PollFlags::IN));
    Ok((ready, port_ready))
}

/// The shell convention: the exit status, or 128 + the signal that killed it.
pub(super) fn exit_code(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        EXIT_SIGNALED + libc::WTERMSIG(status)
    } else {
        -1
    }
}

/// Signal the step's process group (it called setsid, so its pgid is its
/// pid); a stale id at worst fails with ESRCH.
fn kill_group(pid: Pid, sig: Signal) {
    let _ = rustix::process::kill_process_group(pid, sig);
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
}
