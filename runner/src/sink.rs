//! Where a job's output goes: the terminal, JSON lines, a buffer (tests).

use std::io::Write;

use kiln_agent::proto::{StepEnd, Stream};

/// Receives a job's events in order.
pub trait JobSink: Send {
    fn step_start(&mut self, _step: u32, _name: &str) {}
    fn output(&mut self, step: u32, stream: Stream, data: &[u8]);
    fn step_end(&mut self, _name: &str, _end: &StepEnd) {}
}

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

/// A step header that reads like the provider's log: GitLab's stage lines
/// for `script`/`after_script`, GitHub's `Run ...` for named steps.
pub fn step_header(name: &str) -> String {
    match name {
        "script" => "Executing \"step_script\" stage of the job script".to_string(),
        "after_script" => "Running after_script".to_string(),
        n if n.starts_with("Run ") => n.to_string(),
        n => format!("Run {n}"),
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

/// Masks secret values in every stream before the inner sink sees them,
/// across chunk boundaries (a secret split over two frames is still masked).
pub struct MaskingSink {
    inner: Box<dyn JobSink>,
    /// One masker per (step, stream): each holds back a possible secret prefix.
    maskers: std::collections::BTreeMap<(u32, u8), crate::gitlab::mask::Masker>,
    secrets: Vec<String>,
}

impl MaskingSink {
    pub fn new(inner: Box<dyn JobSink>, secrets: &[String]) -> MaskingSink {
        MaskingSink {
            inner,
            maskers: Default::default(),
            secrets: secrets.to_vec(),
        }
    }

    /// Release what the maskers hold back (at the end of the job).
    pub fn flush(&mut self) {
        let keys: Vec<(u32, u8)> = self.maskers.keys().copied().collect();
        for (step, s) in keys {
            self.flush_one(step, s);
        }
    }

    fn flush_one(&mut self, step: u32, s: u8) {
        if let Some(m) = self.maskers.get_mut(&(step, s)) {
            let rest = m.finish();
            if !rest.is_empty() {
                let stream = if s == Stream::Stdout as u8 {
                    Stream::Stdout
                } else {
                    Stream::Stderr
                };
                self.inner.output(step, stream, &rest);
            }
        }
    }
}

impl JobSink for MaskingSink {
    fn step_start(&mut self, step: u32, name: &str) {
        self.inner.step_start(step, name);
    }

    fn output(&mut self, step: u32, stream: Stream, data: &[u8]) {
        if self.secrets.is_empty() {
            return self.inner.output(step, stream, data);
        }
        let secrets = &self.secrets;
        let m = self
            .maskers
            .entry((step, stream as u8))
            .or_insert_with(|| crate::gitlab::mask::Masker::new(secrets, &[] as &[&str]));
        let out = m.write(data);
        if !out.is_empty() {
            self.inner.output(step, stream, &out);
        }
    }

    fn step_end(&mut self, name: &str, end: &StepEnd) {
        self.flush_one(end.step, Stream::Stdout as u8);
        self.flush_one(end.step, Stream::Stderr as u8);
        self.inner.step_end(name, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_read_like_the_providers_logs() {
        assert_eq!(
            step_header("script"),
            "Executing \"step_script\" stage of the job script"
        );
        assert_eq!(step_header("after_script"), "Running after_script");
        assert_eq!(step_header("Run cargo test"), "Run cargo test");
        assert_eq!(step_header("build"), "Run build");
    }

    /// Forwards into a shared buffer so the test can look after the sink is boxed.
    struct Shared(std::sync::Arc<std::sync::Mutex<BufferSink>>);

    impl JobSink for Shared {
        fn output(&mut self, step: u32, stream: Stream, data: &[u8]) {
            self.0.lock().unwrap().output(step, stream, data);
        }
    }

    #[test]
    fn secrets_split_across_chunks_and_streams_are_masked() {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(BufferSink::default()));
        let mut sink = MaskingSink::new(Box::new(Shared(buf.clone())), &["hunter2".to_string()]);
        sink.output(0, Stream::Stdout, b"pass=hun");
        sink.output(0, Stream::Stderr, b"hunter");
        sink.output(0, Stream::Stdout, b"ter2 done");
        sink.output(0, Stream::Stderr, b"2!");
        sink.flush();
        let b = buf.lock().unwrap();
        assert_eq!(String::from_utf8_lossy(&b.stdout), "pass=[MASKED] done");
        assert_eq!(String::from_utf8_lossy(&b.stderr), "[MASKED]!");
    }
}
