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
///
/// It holds maskers for one step at a time (one per stream): the step
/// numbers come from the guest, and a job that forges frames for a
/// thousand steps must not make the host keep a thousand maskers.
pub struct MaskingSink {
    inner: Box<dyn JobSink>,
    /// The step whose output the maskers hold back, if any.
    step: Option<u32>,
    /// stdout's and stderr's masker for `step`, each holding back a
    /// possible secret prefix.
    maskers: [Option<crate::gitlab::mask::Masker>; 2],
    secrets: Vec<String>,
}

fn stream_index(s: Stream) -> usize {
    match s {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

impl MaskingSink {
    pub fn new(inner: Box<dyn JobSink>, secrets: &[String]) -> MaskingSink {
        MaskingSink {
            inner,
            step: None,
            maskers: [None, None],
            secrets: secrets.to_vec(),
        }
    }

    /// Release what the maskers hold back (at the end of a step and of the job).
    pub fn flush(&mut self) {
        let Some(step) = self.step.take() else {
            return;
        };
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            if let Some(mut m) = self.maskers[i].take() {
                let rest = m.finish();
                if !rest.is_empty() {
                    self.inner.output(step, stream, &rest);
                }
            }
        }
    }

    /// How many maskers are alive (tests: bounded whatever the guest sends).
    pub fn maskers_held(&self) -> usize {
        self.maskers.iter().flatten().count()
    }
}

impl JobSink for MaskingSink {
    fn step_start(&mut self, step: u32, name: &str) {
        self.flush();
        self.inner.step_start(step, name);
    }

    fn output(&mut self, step: u32, stream: Stream, data: &[u8]) {
        if self.secrets.is_empty() {
            return self.inner.output(step, stream, data);
        }
        if self.step != Some(step) {
            self.flush();
            self.step = Some(step);
        }
        let secrets = &self.secrets;
        let m = self.maskers[stream_index(stream)]
            .get_or_insert_with(|| crate::gitlab::mask::Masker::new(secrets, &[] as &[&str]));
        let out = m.write(data);
        if !out.is_empty() {
            self.inner.output(step, stream, &out);
        }
    }

    fn step_end(&mut self, name: &str, end: &StepEnd) {
        self.flush();
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

    #[test]
    fn maskers_stay_bounded_whatever_steps_the_guest_names() {
        struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);
        impl JobSink for Count {
            fn output(&mut self, _: u32, _: Stream, data: &[u8]) {
                self.0
                    .fetch_add(data.len(), std::sync::atomic::Ordering::Relaxed);
            }
        }
        let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut sink = MaskingSink::new(Box::new(Count(n.clone())), &["hunter2".to_string()]);
        for step in 0..500_000u32 {
            sink.output(step, Stream::Stdout, b"x hun");
            assert!(sink.maskers_held() <= 2);
        }
        sink.flush();
        assert_eq!(sink.maskers_held(), 0);
        // Nothing was lost on the way: each step's held-back "hun" came out.
        assert_eq!(n.load(std::sync::atomic::Ordering::Relaxed), 500_000 * 5);
    }
}
