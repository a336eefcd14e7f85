//! GitHub workflow commands on a step's output (`::set-output`,
//! `::add-mask::`, `::group::`, annotations), applied as the output streams
//! by: [`CommandSink`] sits in front of the job's sink for one step of a
//! GitHub job.
//!
//! Output is held back only while a line may still be a command (it starts
//! with `::` after blanks); any other line passes through at once, so a
//! step's output streams as before. A command line is consumed: masks go to
//! the job log's masking front ([`JobSink::add_mask`]), outputs to the
//! step's outputs, groups and annotations are shown as GitHub's raw log
//! shows them (`##[group]title`). Everything here is the guest's: a line is
//! held to [`MAX_COMMAND_LINE`] bytes, outputs to
//! `proto::MAX_FILE_COMMANDS` bytes in all.

use kiln_agent::proto::{self, StepEnd, Stream};
use kiln_pipelines::github::{self, WorkflowCommand};

use crate::joblog::JobSink;

/// The longest line read as a command; a longer one is plain output.
pub const MAX_COMMAND_LINE: usize = 64 * 1024;

/// One stream's line state.
#[derive(Default)]
struct Line {
    /// The current line so far, while it may be a command.
    held: Vec<u8>,
    /// The current line is plain output (it cannot be a command).
    plain: bool,
}

/// The job's sink, with one step's workflow commands taken out of its
/// output and applied.
pub struct CommandSink<'a> {
    inner: &'a mut dyn JobSink,
    lines: [Line; 2],
    /// `::stop-commands::TOKEN` in effect.
    stopped: Option<String>,
    /// `::set-output` values, in order.
    outputs: Vec<(String, String)>,
    output_bytes: usize,
    /// Problems to report once the step ended.
    notes: Vec<String>,
}

/// Whether `held` (a line's start) may still become a command.
fn may_be_command(held: &[u8]) -> bool {
    let rest: &[u8] = {
        let n = held
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        &held[n..]
    };
    let n = rest.len().min(2);
    rest[..n] == b"::"[..n]
}

impl<'a> CommandSink<'a> {
    pub fn new(inner: &'a mut dyn JobSink) -> CommandSink<'a> {
        CommandSink {
            inner,
            lines: [Line::default(), Line::default()],
            stopped: None,
            outputs: Vec::new(),
            output_bytes: 0,
            notes: Vec::new(),
        }
    }

    /// The step ended: what is still held back is read as a last line.
    /// Returns the step's `::set-output` values and notes for the log.
    pub fn finish(mut self, step: u32) -> (Vec<(String, String)>, Vec<String>) {
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            let held = std::mem::take(&mut self.lines[i].held);
            if !held.is_empty() {
                self.line(step, stream, held, false);
            }
        }
        (self.outputs, self.notes)
    }

    /// A whole line (with its `\n` when `ended`): a command, or output.
    fn line(&mut self, step: u32, stream: Stream, line: Vec<u8>, ended: bool) {
        let text = std::str::from_utf8(&line).ok();
        let body = text.map(|t| t.strip_suffix('\n').unwrap_or(t));
        if let (Some(token), Some(body)) = (&self.stopped, body) {
            if github::resumes_commands(body, token) {
                self.stopped = None;
                return;
            }
            return self.inner.output(step, stream, &line);
        }
        let Some(cmd) = body.and_then(github::parse_command) else {
            return self.inner.output(step, stream, &line);
        };
        match &cmd {
            WorkflowCommand::SetOutput { name, value } => {
                let size = name.len() + value.len();
                if self.output_bytes + size > proto::MAX_FILE_COMMANDS {
                    self.notes.push(format!(
                        "::set-output values over {} bytes in all are ignored",
                        proto::MAX_FILE_COMMANDS
                    ));
                } else {
                    self.output_bytes += size;
                    self.outputs.push((name.clone(), value.clone()));
                }
            }
            WorkflowCommand::AddMask(v) => {
                // GitHub masks each line of a multi-line value.
                for part in v.split('\n').map(str::trim).filter(|p| !p.is_empty()) {
                    self.inner.add_mask(part);
                }
            }
            WorkflowCommand::StopCommands(token) => {
                self.stopped = Some(token.clone()).filter(|t| !t.is_empty());
            }
            _ => {}
        }
        if let Some(shown) = github::log_line(&cmd) {
            let mut shown = shown.into_bytes();
            if ended {
                shown.push(b'\n');
            }
            self.inner.output(step, stream, &shown);
        }
    }
}

impl JobSink for CommandSink<'_> {
    fn step_start(&mut self, step: u32, name: &str) {
        self.inner.step_start(step, name);
    }

    fn output(&mut self, step: u32, stream: Stream, data: &[u8]) {
        let i = usize::from(stream == Stream::Stderr);
        let mut plain_from = 0;
        for (at, &b) in data.iter().enumerate() {
            if self.lines[i].plain {
                if b == b'\n' {
                    self.lines[i].plain = false;
                    // Pass through the plain run up to here, line end included.
                    self.inner.output(step, stream, &data[plain_from..=at]);
                    plain_from = at + 1;
                }
                continue;
            }
            let line = &mut self.lines[i];
            line.held.push(b);
            if b == b'\n' {
                let held = std::mem::take(&mut line.held);
                self.line(step, stream, held, true);
                plain_from = at + 1;
            } else if !may_be_command(&line.held) || line.held.len() > MAX_COMMAND_LINE {
                line.plain = true;
                let held = std::mem::take(&mut line.held);
                self.inner.output(step, stream, &held);
                plain_from = at + 1;
            } else {
                plain_from = at + 1;
            }
        }
        if self.lines[i].plain && plain_from < data.len() {
            self.inner.output(step, stream, &data[plain_from..]);
        }
    }

    fn step_end(&mut self, name: &str, end: &StepEnd) {
        self.inner.step_end(name, end);
    }

    fn add_mask(&mut self, value: &str) {
        self.inner.add_mask(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::joblog::{BufferSink, MaskingSink, Secrets};

    fn run(chunks: &[&[u8]]) -> (String, Vec<(String, String)>) {
        let mut sink = MaskingSink::new(BufferSink::default(), Secrets::default());
        let outputs = {
            let mut cmds = CommandSink::new(&mut sink);
            for c in chunks {
                cmds.output(0, Stream::Stdout, c);
            }
            cmds.finish(0).0
        };
        sink.flush();
        (
            String::from_utf8_lossy(&sink.inner().stdout).into_owned(),
            outputs,
        )
    }

    #[test]
    fn commands_are_applied_and_plain_output_passes() {
        let (out, outputs) = run(&[
            b"hello\n::set-output name=v",
            b"er::1.2\n  ::group::Build\nin group\n::endgroup::\n",
            b"::add-mask::hunter2\nthe password is hunter2\n::warning::careful\nno newline",
        ]);
        assert_eq!(
            out,
            "hello\n##[group]Build\nin group\n##[endgroup]\nthe password is [MASKED]\n##[warning]careful\nno newline"
        );
        assert_eq!(outputs, vec![("ver".to_string(), "1.2".to_string())]);
    }

    #[test]
    fn stop_commands_and_a_last_line_without_newline() {
        let (out, outputs) = run(&[
            b"::stop-commands::tok\n::set-output name=a::1\n::tok::\n::set-output name=b::2",
        ]);
        assert_eq!(out, "::set-output name=a::1\n");
        assert_eq!(outputs, vec![("b".to_string(), "2".to_string())]);
    }

    #[test]
    fn long_lines_and_colons_mid_line_are_output() {
        let long = format!("::{}\n", "x".repeat(MAX_COMMAND_LINE + 10));
        let (out, outputs) = run(&[long.as_bytes(), b"a ::set-output name=a::1\n"]);
        assert_eq!(out, format!("{long}a ::set-output name=a::1\n"));
        assert!(outputs.is_empty());
    }

    #[test]
    fn outputs_are_bounded() {
        let big = format!("::set-output name=a::{}\n", "v".repeat(40_000));
        let chunks: Vec<&[u8]> = (0..20).map(|_| big.as_bytes()).collect();
        let (_, outputs) = run(&chunks);
        let total: usize = outputs.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total <= proto::MAX_FILE_COMMANDS, "{total}");
    }
}
