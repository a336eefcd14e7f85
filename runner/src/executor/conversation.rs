//! The framed host ↔ guest conversation over the VM's console: sending
//! frames, reading and decoding the guest's, and the rules of whose turn it
//! is. One read loop ([`Conversation::fill`] and
//! [`Conversation::next_event`]) serves the boot handshake and the job.
//!
//! The guest is hostile (a job running as root can write frames on the
//! agent's port): `Output`/`StepStart` for any step but the running one, or
//! any frame out of turn, is a protocol error; errors quote guest data only
//! through `proto::quote` and name frames by kind and size.

use std::time::Duration;

use kiln_agent::proto::{self, Decoder, Frame, Ready, Start, StepEnd};
use kiln_pipelines::JobSpec;
use kiln_vmm::{ConsoleStream, Machine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::outcome::{protocol, sys, Early, FailureReason};
use crate::joblog::JobSink;

/// How long the agent may take to answer `Finish` with `Done`, at most.
const DONE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the conversation is: what the deadline means and what the guest
/// may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the agent's `Ready`, within the boot timeout.
    Boot,
    /// The job runs (from `Start`), within the job timeout.
    Job,
}

/// The console and everything needed to wait on it.
pub(super) struct Conversation<'a> {
    machine: &'a mut Machine,
    console: &'a mut ConsoleStream,
    decoder: Decoder,
    buf: Vec<u8>,
    phase: Phase,
    /// When the current phase times out, and its timeout (for messages).
    deadline: tokio::time::Instant,
    timeout: Duration,
    cancel: &'a mut watch::Receiver<Option<bool>>,
    /// `Some(graceful)` once a cancel was requested.
    cancel_state: Option<bool>,
    /// The step the agent is running: the only one it may send output for.
    running: Option<u32>,
}

/// The next cancel request: whether it is graceful. Never resolves once
/// the sender is gone (nobody can cancel any more). That wait must stay
/// inside the future `select!` polls, never in a branch's handler: a
/// handler that waits forever stops the console read and the deadlines
/// with it, and the job hangs with its output unread.
async fn next_cancel(cancel: &mut watch::Receiver<Option<bool>>) -> bool {
    if cancel.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    cancel.borrow().unwrap_or(true)
}

/// An agent diagnostic, for the debug log only, cut to a sane length.
fn agent_log(message: &str) {
    tracing::debug!(target: "kiln::agent", "{}", proto::quote(message.as_bytes(), 1024));
}

impl<'a> Conversation<'a> {
    /// A conversation with a VM that was just started: the agent must be
    /// ready within `boot_timeout`.
    pub(super) fn new(
        machine: &'a mut Machine,
        console: &'a mut ConsoleStream,
        cancel: &'a mut watch::Receiver<Option<bool>>,
        boot_timeout: Duration,
    ) -> Conversation<'a> {
        Conversation {
            machine,
            console,
            decoder: Decoder::new(),
            buf: vec![0u8; 64 * 1024],
            phase: Phase::Boot,
            deadline: tokio::time::Instant::now() + boot_timeout,
            timeout: boot_timeout,
            cancel,
            cancel_state: None,
            running: None,
        }
    }

    /// `Some(graceful)` once the job was asked to stop.
    pub(super) fn cancel_state(&self) -> Option<bool> {
        self.cancel_state
    }

    /// Boot: the first frame must be `Ready` (only agent logs may come
    /// before it), within the boot timeout.
    pub(super) async fn handshake(
        &mut self,
        job: &JobSpec,
        sink: &mut dyn JobSink,
    ) -> Result<Ready, Early> {
        match self.next_event(job, sink).await? {
            Frame::Ready(r) => Ok(r),
            other => Err(self.out_of_turn(&other)),
        }
    }

    /// Send the job's `Start`; from now on the job timeout runs.
    pub(super) async fn start(&mut self, start: Start, timeout: Duration) -> Result<(), Early> {
        let bytes = Frame::Start(start)
            .to_bytes()
            .map_err(|e| sys(format!("job too large: {e}")))?;
        self.console
            .write_all(&bytes)
            .await
            .map_err(|e| sys(format!("sending the job to the guest: {e}")))?;
        self.phase = Phase::Job;
        self.deadline = tokio::time::Instant::now() + timeout;
        self.timeout = timeout;
        Ok(())
    }

    pub(super) async fn send(&mut self, frame: &Frame) -> Result<(), Early> {
        let bytes = frame
            .to_bytes()
            .map_err(|e| sys(format!("frame too large: {e}")))?;
        self.console
            .write_all(&bytes)
            .await
            .map_err(|e| sys(format!("writing to the guest: {e}")))
    }

    /// Run one step: send its `RunStep`, stream its output until the agent
    /// reports its end.
    pub(super) async fn run_step(
        &mut self,
        index: u32,
        frame: &Frame,
        job: &JobSpec,
        sink: &mut dyn JobSink,
    ) -> Result<StepEnd, Early> {
        self.running = Some(index);
        self.send(frame).await?;
        let end = match self.next_event(job, sink).await? {
            Frame::StepEnd(end) if end.step == index => end,
            other => {
                return Err(protocol(format!(
                    "{} while step {index} was running",
                    other.describe()
                )))
            }
        };
        self.running = None;
        Ok(end)
    }

    /// No more steps: `Finish` makes the agent sync and answer `Done`,
    /// which it must within [`DONE_TIMEOUT`] (and the job's timeout).
    pub(super) async fn finish(
        &mut self,
        job: &JobSpec,
        sink: &mut dyn JobSink,
    ) -> Result<(), Early> {
        self.send(&Frame::Finish).await?;
        self.deadline = self
            .deadline
            .min(tokio::time::Instant::now() + DONE_TIMEOUT);
        match self.next_event(job, sink).await? {
            Frame::Done => Ok(()),
            other => Err(protocol(format!("{} instead of Done", other.describe()))),
        }
    }

    /// Read more from the console; handles the deadline and cancels.
    async fn fill(&mut self) -> Result<(), Early> {
        tokio::select! {
            r = self.console.read(&mut self.buf) => match r {
                Ok(0) | Err(_) => {
                    let status = self.machine.wait().await;
                    Err(sys(match self.phase {
                        Phase::Boot => format!("the VM ended before its agent was ready ({status:?})"),
                        Phase::Job => format!("the VM ended before the job finished ({status:?})"),
                    }))
                }
                Ok(n) => {
                    self.decoder.push(&self.buf[..n]);
                    Ok(())
                }
            },
            _ = tokio::time::sleep_until(self.deadline) => Err(match self.phase {
                Phase::Boot => sys(format!(
                    "the guest did not answer within the boot timeout ({:?}); the VM was killed",
                    self.timeout
                )),
                Phase::Job => (
                    FailureReason::JobExecutionTimeout,
                    format!("the job ran past its timeout of {:?}; the VM was killed", self.timeout),
                ),
            }),
            graceful = next_cancel(&mut *self.cancel), if self.cancel_state != Some(false) => {
                if self.phase == Phase::Boot {
                    return Err((FailureReason::Canceled, "canceled during boot".into()));
                }
                if !graceful {
                    return Err((FailureReason::Canceled, "canceled".into()));
                }
                if self.cancel_state.is_none() {
                    self.cancel_state = Some(true);
                    self.send(&Frame::Cancel(proto::Cancel { graceful: true })).await?;
                }
                Ok(())
            }
        }
    }

    /// The next frame that needs a decision (`Ready`, `StepEnd`, `Done`,
    /// ...); output, step starts and agent logs are passed on along the way.
    pub(super) async fn next_event(
        &mut self,
        job: &JobSpec,
        sink: &mut dyn JobSink,
    ) -> Result<Frame, Early> {
        loop {
            while let Some(frame) = self
                .decoder
                .next_frame()
                .map_err(|e| protocol(e.to_string()))?
            {
                // Per-step state downstream (maskers, sections) exists only
                // for the step the host started: anything else is forged.
                match frame {
                    Frame::Output { step, stream, data } if Some(step) == self.running => {
                        sink.output(step, stream, &data)
                    }
                    Frame::StepStart(s) if Some(s.step) == self.running => {
                        let name = job
                            .steps
                            .get(s.step as usize)
                            .map(|s| s.name.as_str())
                            .unwrap_or("?");
                        sink.step_start(s.step, name);
                    }
                    f @ (Frame::Output { .. } | Frame::StepStart(_)) => {
                        return Err(self.out_of_turn(&f))
                    }
                    Frame::Log(l) => agent_log(&l.message),
                    Frame::Fatal(f) => {
                        let what = match self.phase {
                            Phase::Boot => "the guest agent failed to start",
                            Phase::Job => "the guest agent failed",
                        };
                        return Err(sys(format!(
                            "{what}: {}",
                            proto::quote(f.message.as_bytes(), proto::QUOTE_MAX)
                        )));
                    }
                    other => return Ok(other),
                }
            }
            self.fill().await?;
        }
    }

    /// The protocol error for `frame`, which the guest may not send now.
    fn out_of_turn(&self, frame: &Frame) -> Early {
        protocol(match (self.phase, self.running) {
            (Phase::Boot, _) => format!("the agent sent {} before Ready", frame.describe()),
            (Phase::Job, Some(i)) => format!("{} while step {i} was running", frame.describe()),
            (Phase::Job, None) => format!("{} while no step was running", frame.describe()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job whose cancel sender is gone (dropped by its provider) must
    /// still be served: the console's data and the deadline win over the
    /// closed channel, every time. Before the fix, `select!` picked the
    /// closed channel's branch at random, whose handler then waited
    /// forever: the console was no longer read and no timeout fired.
    #[tokio::test]
    async fn a_closed_cancel_channel_does_not_stop_the_read() {
        let (tx, mut rx) = watch::channel(None::<bool>);
        drop(tx);
        for _ in 0..200 {
            let (mut a, mut b) = tokio::io::duplex(64);
            a.write_all(b"frame").await.unwrap();
            let mut buf = [0u8; 16];
            let got = tokio::time::timeout(Duration::from_secs(60), async {
                tokio::select! {
                    r = b.read(&mut buf) => r.unwrap(),
                    _ = next_cancel(&mut rx) => unreachable!("a closed channel is no cancel"),
                }
            })
            .await
            .expect("the read was served");
            assert_eq!(&buf[..got], b"frame");
        }
    }

    #[tokio::test]
    async fn a_cancel_is_seen_with_its_kind() {
        let (tx, mut rx) = watch::channel(None);
        tx.send(Some(true)).unwrap();
        assert!(next_cancel(&mut rx).await, "graceful");
        tx.send(Some(false)).unwrap();
        assert!(!next_cancel(&mut rx).await, "hard");
    }
}
