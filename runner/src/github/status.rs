//! `kiln github status`: the daemon writes what its GitHub entries are
//! doing to `<run_dir>/kiln-github.json` (atomically, whenever it changes);
//! the command reads it and prints it, or the JSON with `--json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file under the run directory.
pub const STATUS_FILE: &str = "kiln-github.json";

/// Counters since the daemon started (Prometheus-style, monotonic).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub webhooks: u64,
    pub bad_signatures: u64,
    pub reconciles: u64,
    pub jit_configs: u64,
    pub vms_started: u64,
    pub vms_finished: u64,
    pub records_removed: u64,
    pub api_errors: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedStatus {
    pub job: u64,
    pub run: u64,
    pub repository: String,
    pub profile: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerStatus {
    pub name: String,
    /// GitHub's runner id, once registered.
    pub id: Option<u64>,
    pub profile: String,
    /// `starting`, `running` or `draining`.
    pub state: String,
    /// The job it took, once known.
    pub job: Option<u64>,
    /// Unix seconds.
    pub since: u64,
    /// The VM's log (masked runner output).
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryStatus {
    pub name: String,
    /// The webhook endpoint's bound address.
    pub webhook: Option<String>,
    pub queued: Vec<QueuedStatus>,
    pub runners: Vec<RunnerStatus>,
    /// Seconds before kiln calls GitHub again (rate limit or errors).
    pub backoff_s: Option<f64>,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub entries: Vec<EntryStatus>,
}

pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join(STATUS_FILE)
}

/// Replace the file atomically.
pub fn write(run_dir: &Path, status: &Status) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    let tmp = run_dir.join(format!(".{STATUS_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path(run_dir))
}

/// The daemon's last status, if it is still running.
pub fn read(run_dir: &Path) -> Result<Status, String> {
    let p = path(run_dir);
    let text = std::fs::read(&p).map_err(|e| {
        format!(
            "no status at {} ({e}): is `kiln daemon` running with [[github]] entries and this run_dir?",
            p.display()
        )
    })?;
    let s: Status = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", p.display()))?;
    if !Path::new(&format!("/proc/{}", s.pid)).exists() {
        return Err(format!(
            "the daemon that wrote {} (pid {}) is not running",
            p.display(),
            s.pid
        ));
    }
    Ok(s)
}

/// The human form.
pub fn render(s: &Status) -> String {
    let mut out = format!("kiln daemon (pid {})\n", s.pid);
    for e in &s.entries {
        let count = |state: &str| e.runners.iter().filter(|r| r.state == state).count();
        out.push_str(&format!(
            "\n[{}] queued {} · starting {} · running {} · draining {}{}\n",
            e.name,
            e.queued.len(),
            count("starting"),
            count("running"),
            count("draining"),
            e.webhook
                .as_ref()
                .map(|w| format!(" · webhook on {w}"))
                .unwrap_or_default(),
        ));
        if let Some(b) = e.backoff_s {
            out.push_str(&format!("  backing off: next GitHub call in {b:.0} s\n"));
        }
        for q in &e.queued {
            out.push_str(&format!(
                "  queued   job {} (run {}, {}) → profile {}\n",
                q.job, q.run, q.repository, q.profile
            ));
        }
        for r in &e.runners {
            out.push_str(&format!(
                "  {:<8} {} (id {}, profile {}, job {}) VM log {}\n",
                r.state,
                r.name,
                r.id.map_or("-".into(), |i| i.to_string()),
                r.profile,
                r.job.map_or("-".into(), |j| j.to_string()),
                r.log
                    .as_ref()
                    .map_or("-".into(), |l| l.display().to_string()),
            ));
        }
        let c = &e.counters;
        out.push_str(&format!(
            "  counters: webhooks {} (bad signatures {}), reconciles {}, JIT configs {}, VMs {} started / {} finished, records removed {}, API errors {}\n",
            c.webhooks, c.bad_signatures, c.reconciles, c.jit_configs, c.vms_started, c.vms_finished, c.records_removed, c.api_errors
        ));
    }
    out
}
