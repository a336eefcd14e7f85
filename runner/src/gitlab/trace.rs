//! The job log: masked, capped, sent to GitLab incrementally by offset.
//!
//! Order of the log path (every writer goes through it, in this order):
//! job output / runner messages → [`Masker`] → size cap (`output_limit`) →
//! the trace buffer, from which [`Updater`] sends `PATCH /jobs/:id/trace`
//! increments and whose CRC-32 the final update reports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_agent::proto::{StepEnd, Stream};
use tokio::sync::watch;

use super::client::{Client, Output, RemoteState, UpdateJob};
use super::mask::Masker;
use crate::sink::JobSink;

/// GitLab's patch size cap (`DefaultTracePatchLimit`).
const PATCH_LIMIT: usize = 1 << 20;
/// The longest a job goes without contact with GitLab: without a patch to
/// send for the update interval (capped at this), the job is "touched"
/// (`PUT {state: running}`) to learn whether it was canceled. gitlab-runner
/// touches only every 30 s or more (`MinTraceForceSendInterval`); kiln's
/// quiet phases (image preparation, VM boot) are long enough that a cancel
/// would go unnoticed that long, so it asks once per update interval, the
/// request rate GitLab asks of a job that prints.
const TOUCH_INTERVAL: Duration = Duration::from_secs(30);
/// The default update interval; the server's header overrides it.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3);

struct Inner {
    masker: Masker,
    data: Vec<u8>,
    limit: usize,
    truncated: bool,
}

/// The job's trace, shared by the sink, the runner and the updater.
pub struct Trace {
    inner: Mutex<Inner>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Cut `data` to at most `max` bytes without splitting a UTF-8 sequence.
fn utf8_cut(data: &[u8], max: usize) -> usize {
    if data.len() <= max {
        return data.len();
    }
    let mut cut = max;
    // Step back over continuation bytes (at most 3) to a sequence start.
    for _ in 0..3 {
        if cut > 0 && (data[cut] & 0xC0) == 0x80 {
            cut -= 1;
        } else {
            break;
        }
    }
    cut
}

impl Trace {
    pub fn new(masker: Masker, limit: usize) -> Arc<Trace> {
        Arc::new(Trace {
            inner: Mutex::new(Inner {
                masker,
                data: Vec::new(),
                limit,
                truncated: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(inner: &mut Inner, bytes: &[u8]) {
        if inner.truncated || bytes.is_empty() {
            return;
        }
        let room = inner.limit.saturating_sub(inner.data.len());
        if bytes.len() <= room {
            inner.data.extend_from_slice(bytes);
            return;
        }
        let cut = utf8_cut(bytes, room);
        inner.data.extend_from_slice(&bytes[..cut]);
        inner.truncated = true;
        let msg = format!(
            "\n\x1b[31;1mJob's log exceeded limit of {} bytes.\nJob execution will continue but no more output will be collected.\x1b[0;m\n",
            inner.limit
        );
        inner.data.extend_from_slice(msg.as_bytes());
    }

    /// Append job output or a runner message (masked).
    pub fn write(&self, bytes: &[u8]) {
        let mut inner = self.lock();
        let out = inner.masker.write(bytes);
        Self::append(&mut inner, &out);
    }

    /// Flush what the masker holds back (before the runner's own lines and
    /// at the end).
    pub fn flush(&self) {
        let mut inner = self.lock();
        let out = inner.masker.finish();
        Self::append(&mut inner, &out);
    }

    pub fn line(&self, s: &str) {
        self.flush();
        self.write(s.as_bytes());
        self.write(b"\n");
        self.flush();
    }

    pub fn section_start(&self, name: &str, header: &str) {
        self.flush();
        self.write(format!("section_start:{}:{name}\r\x1b[0K", now_secs()).as_bytes());
        if !header.is_empty() {
            self.write(format!("\x1b[0K\x1b[36;1m{header}\x1b[0;m\n").as_bytes());
        }
        self.flush();
    }

    pub fn section_end(&self, name: &str) {
        self.flush();
        self.write(format!("section_end:{}:{name}\r\x1b[0K", now_secs()).as_bytes());
        self.flush();
    }

    pub fn len(&self) -> u64 {
        self.lock().data.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` bytes from `offset`.
    pub fn chunk(&self, offset: u64, max: usize) -> Vec<u8> {
        let inner = self.lock();
        let start = (offset as usize).min(inner.data.len());
        let end = start.saturating_add(max).min(inner.data.len());
        inner.data[start..end].to_vec()
    }

    /// `crc32:%08x` of the whole trace, and its size.
    pub fn output(&self) -> Output {
        let inner = self.lock();
        Output {
            checksum: format!("crc32:{:08x}", crc32fast::hash(&inner.data)),
            bytesize: inner.data.len() as u64,
        }
    }

    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }
}

/// The executor's sink for GitLab jobs: output into the trace, each step
/// in its own section (`step_script`, `after_script`, ...).
pub struct TraceSink {
    pub trace: Arc<Trace>,
    pub sections: bool,
    pub current: Option<String>,
}

fn section_name(step: &str) -> String {
    if step == "after_script" {
        step.to_string()
    } else {
        format!("step_{step}")
    }
}

impl JobSink for TraceSink {
    fn step_start(&mut self, _step: u32, name: &str) {
        if self.sections {
            let header = if name == "after_script" {
                "Running after_script".to_string()
            } else {
                "Executing \"step_script\" stage of the job script".replace("script", name)
            };
            self.trace.section_start(&section_name(name), &header);
            self.current = Some(name.to_string());
        }
    }

    fn output(&mut self, _step: u32, _stream: Stream, data: &[u8]) {
        self.trace.write(data);
    }

    fn step_end(&mut self, name: &str, end: &StepEnd) {
        if end.timed_out {
            self.trace.line(&format!(
                "\x1b[31;1mERROR: {name} timed out after {} ms\x1b[0;m",
                end.duration_ms
            ));
        }
        if self.sections && self.current.as_deref() == Some(name) {
            self.trace.section_end(&section_name(name));
            self.current = None;
        }
    }
}

/// Sends the trace while the job runs and watches for cancellation.
pub struct Updater {
    pub client: Client,
    pub job_id: u64,
    pub token: String,
    pub trace: Arc<Trace>,
    /// Bytes the server has (as far as we know).
    pub sent: u64,
    pub interval: Duration,
    /// Cancel the job: `Some(graceful)`.
    pub cancel: Arc<watch::Sender<Option<bool>>>,
    /// Set once GitLab said the job was canceled or failed.
    pub remote_canceled: Arc<AtomicBool>,
    /// The job is gone on the server (GitLab answered 403 or 404: not
    /// running any more, dropped, or unknown): nothing more may be sent.
    pub gone: Arc<AtomicBool>,
    last_contact: Instant,
}

impl Updater {
    pub fn new(
        client: Client,
        job_id: u64,
        token: String,
        trace: Arc<Trace>,
        cancel: Arc<watch::Sender<Option<bool>>>,
    ) -> Updater {
        Updater {
            client,
            job_id,
            token,
            trace,
            sent: 0,
            interval: DEFAULT_INTERVAL,
            cancel,
            remote_canceled: Arc::new(AtomicBool::new(false)),
            gone: Arc::new(AtomicBool::new(false)),
            last_contact: Instant::now(),
        }
    }

    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    /// GitLab answered 403/404 for the job: it is no longer running there
    /// (canceled, failed, dropped for its trace size, erased). Stop the VM
    /// and send nothing more.
    fn lost(&mut self, status: u16, r: &RemoteState) {
        tracing::warn!(
            job = self.job_id,
            status,
            job_status = r.job_status.as_deref().unwrap_or("?"),
            "the job is no longer running on GitLab; stopping it"
        );
        self.gone.store(true, Ordering::SeqCst);
        self.remote_canceled.store(true, Ordering::SeqCst);
        self.cancel.send_replace(Some(false));
    }

    fn remote(&mut self, r: &RemoteState) {
        if let Some(i) = r.interval {
            self.interval = i.clamp(Duration::from_millis(100), Duration::from_secs(900));
        }
        if let Some(graceful) = r.cancel() {
            if !self.remote_canceled.swap(true, Ordering::SeqCst) || !graceful {
                tracing::info!(job = self.job_id, graceful, "GitLab canceled the job");
                // A hard cancel replaces a graceful one, never the reverse.
                self.cancel.send_if_modified(|c| {
                    let next = match *c {
                        Some(false) => false,
                        _ => graceful,
                    };
                    let changed = *c != Some(next);
                    *c = Some(next);
                    changed
                });
            }
        }
    }

    /// Send what the server lacks, in patches of at most 1 MiB. Returns
    /// whether everything was acknowledged.
    pub async fn patch(&mut self) -> bool {
        loop {
            if self.is_gone() {
                return false;
            }
            let data = self.trace.chunk(self.sent, PATCH_LIMIT);
            if data.is_empty() {
                return true;
            }
            let n = data.len() as u64;
            match self
                .client
                .patch_trace(self.job_id, &self.token, self.sent, data)
                .await
            {
                Ok(r) => {
                    self.last_contact = Instant::now();
                    self.remote(&r.remote);
                    match r.status {
                        202 => self.sent += n,
                        416 => {
                            // The server has a different length: resend from there.
                            let end = r.range_end.unwrap_or(0).min(self.trace.len());
                            tracing::debug!(
                                job = self.job_id,
                                from = self.sent,
                                to = end,
                                "trace offset resync"
                            );
                            self.sent = end;
                        }
                        403 | 404 => {
                            self.lost(r.status, &r.remote);
                            return false;
                        }
                        s => {
                            tracing::debug!(
                                job = self.job_id,
                                status = s,
                                "trace patch not accepted"
                            );
                            return false;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(job = self.job_id, "trace patch: {e}");
                    return false;
                }
            }
        }
    }

    /// `PUT {state: running}` to learn the job's remote state.
    async fn touch(&mut self) {
        let body = UpdateJob {
            token: self.token.clone(),
            state: "running".into(),
            failure_reason: None,
            exit_code: None,
            checksum: self.trace.output().checksum,
            output: self.trace.output(),
        };
        match self.client.update_job(self.job_id, &body).await {
            Ok(r) if matches!(r.status, 403 | 404) => {
                self.last_contact = Instant::now();
                self.lost(r.status, &r.remote);
            }
            Ok(r) => {
                self.last_contact = Instant::now();
                self.remote(&r.remote);
            }
            Err(e) => tracing::debug!(job = self.job_id, "touching the job: {e}"),
        }
    }

    /// Send increments every interval until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Updater {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                r = stop.changed() => if r.is_err() || *stop.borrow() { return self; },
            }
            if *stop.borrow() {
                return self;
            }
            if self.trace.len() > self.sent {
                self.patch().await;
            }
            if self.last_contact.elapsed() >= self.interval.min(TOUCH_INTERVAL) && !self.is_gone() {
                self.touch().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_cuts_on_a_character_boundary_and_says_so() {
        let t = Trace::new(Masker::new::<&str, &str>(&[], &[]), 5);
        t.write("abcdé".as_bytes()); // é is 2 bytes: 6 in all
        t.write(b"XYZ");
        let c = String::from_utf8(t.contents()).unwrap();
        assert!(c.starts_with("abcd\n"), "{c:?}");
        assert!(c.contains("exceeded limit of 5 bytes"));
        assert!(!c.contains("XYZ"));
    }

    #[test]
    fn masking_happens_before_the_buffer() {
        let t = Trace::new(Masker::new(&["hunter22"], &["glpat-"]), 1 << 20);
        t.write(b"pw hunt");
        t.write(b"er22 ");
        t.line("end");
        assert_eq!(t.contents(), b"pw [MASKED] end\n");
        assert_eq!(t.chunk(3, 8), b"[MASKED]");
        assert_eq!(
            t.output().checksum,
            format!("crc32:{:08x}", crc32fast::hash(b"pw [MASKED] end\n"))
        );
    }
}
