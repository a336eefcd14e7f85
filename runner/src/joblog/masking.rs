//! The masking front: one [`MaskingSink`] in front of every sink, local or
//! GitLab, so that no secret reaches a terminal, a JSON line or a trace.

use kiln_agent::proto::{StepEnd, Stream};

use super::mask::Masker;
use super::JobSink;

/// What a job's log must not show: the values of masked variables, and the
/// bodies of tokens with a known prefix (`glpat-…`).
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    values: Vec<String>,
    token_prefixes: Vec<String>,
    /// How many values the job added while it ran ([`Secrets::add`]).
    added: usize,
}

/// Most values a job may add to the masks while it runs (`::add-mask::`):
/// the job is hostile, and every value costs the masker on every byte.
pub const MAX_ADDED_MASKS: usize = 256;

impl Secrets {
    /// Mask these values (empty ones are ignored).
    pub fn new<I, S>(values: I) -> Secrets
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Secrets {
            values: values.into_iter().map(Into::into).collect(),
            token_prefixes: Vec::new(),
            added: 0,
        }
    }

    /// Also mask the body of every token that starts with one of `prefixes`.
    pub fn with_token_prefixes<I, S>(mut self, prefixes: I) -> Secrets
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.token_prefixes
            .extend(prefixes.into_iter().map(Into::into));
        self
    }

    /// Also mask `value` (empty ones are ignored). Returns false, adding
    /// nothing, once [`MAX_ADDED_MASKS`] values were added this way.
    pub fn add(&mut self, value: &str) -> bool {
        if value.is_empty() || self.values.iter().any(|v| v == value) {
            return true;
        }
        if self.added >= MAX_ADDED_MASKS {
            return false;
        }
        self.added += 1;
        self.values.push(value.to_string());
        true
    }

    /// Nothing to mask: output passes through untouched.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.token_prefixes.is_empty()
    }

    fn masker(&self) -> Masker {
        Masker::new(&self.values, &self.token_prefixes)
    }
}

/// Masks secret values in every stream before the inner sink sees them,
/// across chunk boundaries (a secret split over two frames is still masked).
///
/// Two layouts, after what the inner sink shows:
/// - [`MaskingSink::new`]: the streams stay apart (a terminal, JSON lines),
///   so each stream has its own masker. It holds maskers for one step at a
///   time: the step numbers come from the guest, and a job that forges
///   frames for a thousand steps must not make the host keep a thousand
///   maskers.
/// - [`MaskingSink::merged`]: the inner sink is one log (GitLab's trace),
///   so one masker reads it as the reader will, whatever the step or
///   stream, and holds back until [`MaskingSink::flush`].
pub struct MaskingSink<S: JobSink + ?Sized = Box<dyn JobSink>> {
    secrets: Secrets,
    merged: bool,
    /// The step whose output the maskers hold back, if any.
    step: Option<u32>,
    /// stdout's and stderr's masker for `step` (merged: only the first),
    /// each holding back a possible secret prefix.
    maskers: [Option<Masker>; 2],
    inner: S,
}

const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

impl<S: JobSink> MaskingSink<S> {
    /// A front whose inner sink keeps stdout and stderr apart.
    pub fn new(inner: S, secrets: Secrets) -> MaskingSink<S> {
        MaskingSink {
            secrets,
            merged: false,
            step: None,
            maskers: [None, None],
            inner,
        }
    }

    /// A front whose inner sink is one log of both streams (and of the
    /// runner's own lines).
    pub fn merged(inner: S, secrets: Secrets) -> MaskingSink<S> {
        MaskingSink {
            merged: true,
            ..MaskingSink::new(inner, secrets)
        }
    }
}

impl<S: JobSink + ?Sized> MaskingSink<S> {
    /// The sink behind the front (it holds only masked bytes).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Release what the maskers hold back (at the end of a step and of the
    /// job; in a merged log, before and after the runner's own lines).
    pub fn flush(&mut self) {
        let Some(step) = self.step.take() else {
            return;
        };
        for (i, stream) in STREAMS.into_iter().enumerate() {
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

impl<S: JobSink + ?Sized> JobSink for MaskingSink<S> {
    fn step_start(&mut self, step: u32, name: &str) {
        self.flush();
        self.inner.step_start(step, name);
    }

    fn output(&mut self, step: u32, stream: Stream, data: &[u8]) {
        if self.secrets.is_empty() {
            return self.inner.output(step, stream, data);
        }
        let index = if self.merged {
            // Held-back bytes come out as the first stream's: one log.
            0
        } else {
            if self.step != Some(step) {
                self.flush();
            }
            STREAMS.iter().position(|s| *s == stream).unwrap_or(0)
        };
        self.step.get_or_insert(step);
        let secrets = &self.secrets;
        let m = self.maskers[index].get_or_insert_with(|| secrets.masker());
        let out = m.write(data);
        if !out.is_empty() {
            self.inner.output(step, stream, &out);
        }
    }

    fn step_end(&mut self, name: &str, end: &StepEnd) {
        self.flush();
        self.inner.step_end(name, end);
    }

    fn add_mask(&mut self, value: &str) {
        // What the maskers hold back was written before the command: it is
        // released under the masks it was written under.
        self.flush();
        if !self.secrets.add(value) {
            tracing::warn!(
                "more than {MAX_ADDED_MASKS} masks added by the job; later ones are ignored"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::BufferSink;
    use super::*;

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
        let mut sink = MaskingSink::new(Shared(buf.clone()), Secrets::new(["hunter2"]));
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
    fn a_merged_log_is_masked_as_it_reads_across_streams_and_steps() {
        let mut sink = MaskingSink::merged(
            BufferSink::default(),
            Secrets::new(["hunter2"]).with_token_prefixes(["glpat-"]),
        );
        sink.output(0, Stream::Stdout, b"pass=hun");
        sink.output(0, Stream::Stderr, b"ter2 glpat-");
        sink.output(1, Stream::Stdout, b"abc done");
        sink.flush();
        let b = sink.inner();
        let all: Vec<u8> = b.chunks.iter().flat_map(|c| c.2.clone()).collect();
        assert_eq!(
            String::from_utf8_lossy(&all),
            "pass=[MASKED] glpat-[MASKED] done"
        );
    }

    #[test]
    fn a_mask_added_while_the_job_runs_masks_what_follows() {
        let mut sink = MaskingSink::new(BufferSink::default(), Secrets::default());
        sink.output(0, Stream::Stdout, b"before tok3n ");
        sink.add_mask("tok3n");
        sink.add_mask("");
        sink.output(0, Stream::Stdout, b"after tok3n");
        sink.output(1, Stream::Stderr, b" tok3n");
        sink.flush();
        let b = sink.inner();
        assert_eq!(
            String::from_utf8_lossy(&b.stdout),
            "before tok3n after [MASKED]"
        );
        assert_eq!(String::from_utf8_lossy(&b.stderr), " [MASKED]");
        let mut s = Secrets::default();
        for i in 0..MAX_ADDED_MASKS {
            assert!(s.add(&format!("v{i}")));
        }
        assert!(!s.add("one-too-many"), "bounded");
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
        let mut sink = MaskingSink::new(Count(n.clone()), Secrets::new(["hunter2"]));
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
