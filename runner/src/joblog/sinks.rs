//! The local sinks: the terminal, JSON lines, a buffer (tests, benchmarks).

use std::io::Write;

use kiln_agent::proto::{StepEnd, Stream};

use super::steps::step_header;
use super::JobSink;

/// Job stdout to our stdout, job stderr to our stderr, byte for byte.
pub struct TerminalSink {
    /// Print a header line (to stderr) when a step starts.
    pub headers: bool,
}

impl JobSink for TerminalSink {
    fn step_start(&mut self, _step: u32, name: &str) {
        if self.headers {
            eprintln!("\x1b[1;36m{}\x1b[0m", step_header(name));
        }
    }

    fn output(&mut self, _step: u32, stream: Stream, data: &[u8]) {
        let _ = match stream {
            Stream::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(data).and_then(|_| o.flush())
            }
            Stream::Stderr => {
                let mut e = std::io::stderr().lock();
                e.write_all(data).and_then(|_| e.flush())
            }
        };
    }

    fn step_end(&mut self, name: &str, end: &StepEnd) {
        if end.timed_out {
            eprintln!(
                "kiln: step '{name}' timed out after {} ms and was killed",
                end.duration_ms
            );
        }
    }
}

/// One JSON object per line on stdout, for machines.
pub struct JsonSink;

impl JobSink for JsonSink {
    fn step_start(&mut self, step: u32, name: &str) {
        println!(
            "{}",
            serde_json::json!({"event": "step_start", "step": step, "name": name})
        );
    }

    fn output(&mut self, step: u32, stream: Stream, data: &[u8]) {
        let s = match stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        println!(
            "{}",
            serde_json::json!({"event": "output", "step": step, "stream": s, "data": String::from_utf8_lossy(data)})
        );
    }

    fn step_end(&mut self, name: &str, end: &StepEnd) {
        println!(
            "{}",
            serde_json::json!({"event": "step_end", "step": end.step, "name": name, "exit_code": end.exit_code,
                "duration_ms": end.duration_ms, "timed_out": end.timed_out, "skipped": end.skipped})
        );
    }
}

/// Collects everything (tests, benchmarks).
#[derive(Default)]
pub struct BufferSink {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Every chunk in arrival order.
    pub chunks: Vec<(u32, Stream, Vec<u8>)>,
    pub ends: Vec<StepEnd>,
    pub first_output: Option<std::time::Instant>,
}

impl JobSink for BufferSink {
    fn output(&mut self, step: u32, stream: Stream, data: &[u8]) {
        self.first_output
            .get_or_insert_with(std::time::Instant::now);
        match stream {
            Stream::Stdout => self.stdout.extend_from_slice(data),
            Stream::Stderr => self.stderr.extend_from_slice(data),
        }
        self.chunks.push((step, stream, data.to_vec()));
    }

    fn step_end(&mut self, _name: &str, end: &StepEnd) {
        self.ends.push(end.clone());
    }
}
