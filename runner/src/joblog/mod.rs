//! The job log, for every provider: the events a job's output makes
//! ([`JobSink`]), the one masking front every sink sits behind
//! ([`MaskingSink`]), how a step is announced ([`steps`]), and the local
//! sinks (terminal, JSON lines, a buffer).
//!
//! A log byte's path: the executor reads it from the guest and calls
//! [`JobSink::output`] on the job's sink.
//! - Local run: [`MaskingSink`] (one masker per stream) → [`TerminalSink`]
//!   or [`JsonSink`].
//! - GitLab: `gitlab::trace::TraceSink` (steps become trace sections) →
//!   `gitlab::trace::Trace`, which is a [`MaskingSink::merged`] (one masker
//!   for the whole trace, runner lines included) in front of the capped
//!   buffer that `gitlab::trace::Updater` sends.

use kiln_agent::proto::{StepEnd, Stream};

pub mod mask;
mod masking;
mod sinks;
pub mod steps;

pub use masking::{MaskingSink, Secrets};
pub use sinks::{BufferSink, JsonSink, TerminalSink};

/// Receives a job's events in order.
pub trait JobSink: Send {
    fn step_start(&mut self, _step: u32, _name: &str) {}
    fn output(&mut self, step: u32, stream: Stream, data: &[u8]);
    fn step_end(&mut self, _name: &str, _end: &StepEnd) {}
    /// Mask `value` in everything written after this call (GitHub's
    /// `::add-mask::`); sinks without a masking front ignore it.
    fn add_mask(&mut self, _value: &str) {}
}

impl<S: JobSink + ?Sized> JobSink for Box<S> {
    fn step_start(&mut self, step: u32, name: &str) {
        (**self).step_start(step, name)
    }
    fn output(&mut self, step: u32, stream: Stream, data: &[u8]) {
        (**self).output(step, stream, data)
    }
    fn step_end(&mut self, name: &str, end: &StepEnd) {
        (**self).step_end(name, end)
    }
    fn add_mask(&mut self, value: &str) {
        (**self).add_mask(value)
    }
}
