//! Sending the trace while the job runs (`PATCH /jobs/:id/trace` by
//! offset), watching for cancellation, and the final update.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::backoff::Backoff;
use super::client::{Client, RemoteState, UpdateJob};
use super::trace::Trace;
use crate::executor::error_chain;

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
/// How often the final update is tried before the job is given up.
const FINAL_ATTEMPTS: u32 = 30;

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

    /// Flush the trace, then `PUT` the final state until GitLab accepts it:
    /// 202 = retry after the interval, 412 = resend the whole trace.
    pub async fn send_final(
        mut self,
        state: &str,
        failure_reason: Option<String>,
        exit_code: Option<i32>,
    ) {
        let mut b = Backoff::new();
        for attempt in 0..FINAL_ATTEMPTS {
            if self.is_gone() {
                tracing::info!(
                    job = self.job_id,
                    "the job is gone on GitLab: no final update"
                );
                return;
            }
            if !self.patch().await {
                if self.is_gone() {
                    return;
                }
                tokio::time::sleep(b.next().min(Duration::from_secs(5))).await;
                continue;
            }
            let output = self.trace.output();
            let body = UpdateJob {
                token: self.token.clone(),
                state: state.into(),
                failure_reason: failure_reason.clone(),
                exit_code,
                checksum: output.checksum.clone(),
                output,
            };
            match self.client.update_job(self.job_id, &body).await {
                Ok(r) => match r.status {
                    200 => {
                        tracing::debug!(job = self.job_id, attempt, "final update accepted");
                        return;
                    }
                    202 => {
                        let d = r.remote.interval.unwrap_or(self.interval);
                        tokio::time::sleep(d).await;
                    }
                    412 => {
                        tracing::info!(job = self.job_id, "GitLab asked for the whole trace again");
                        self.sent = 0;
                    }
                    403 | 404 => {
                        tracing::warn!(
                            job = self.job_id,
                            status = r.status,
                            "the job is gone on the server"
                        );
                        return;
                    }
                    s => {
                        tracing::warn!(
                            job = self.job_id,
                            status = s,
                            "final update refused; retrying"
                        );
                        tokio::time::sleep(b.next().min(Duration::from_secs(5))).await;
                    }
                },
                Err(e) => {
                    tracing::warn!(job = self.job_id, "final update: {}", error_chain(&e));
                    tokio::time::sleep(b.next().min(Duration::from_secs(5))).await;
                }
            }
        }
        tracing::error!(job = self.job_id, "giving up on the final update");
    }
}
