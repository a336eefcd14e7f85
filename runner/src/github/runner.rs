//! One runner's life: check the profile's image, register just in time
//! (`generate-jitconfig`), boot a VM from the profile's image with the
//! runner distribution as its workspace disk, start GitHub's runner there
//! with the JIT config, destroy the VM when the runner exits (or at the
//! profile's timeout, or at shutdown), and remove the runner's record.
//!
//! The JIT config is a credential. It reaches the guest only inside the
//! agent's `RunStep` frame, as the step's `ACTIONS_RUNNER_INPUT_JITCONFIG`
//! (GitHub's runner reads `--jitconfig` from that variable and clears it),
//! so it is on no command line, kernel command line or host file; the
//! runner's output is masked against it before it reaches the per-VM log
//! or `tracing`.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent::proto::{StepEnd, Stream};
use kiln_pipelines::{JobSource, JobSpec, Step};
use tokio::sync::{watch, OwnedSemaphorePermit};

use super::api::{ApiError, JitConfig};
use super::service::{Phase, Service};
use crate::executor::{error_chain, JobResult};
use crate::joblog::{JobSink, MaskingSink, Secrets};

/// The variable GitHub's runner reads `--jitconfig` from
/// (`ACTIONS_RUNNER_INPUT_` + the option, `Runner.Common` `CommandSettings`).
pub const JITCONFIG_VAR: &str = "ACTIONS_RUNNER_INPUT_JITCONFIG";

/// The guest's step: GitHub's runner, in its directory, as the image's
/// user. No argument carries the JIT config.
const RUNNER_SCRIPT: &str = "exec ./run.sh\n";

/// Tries to remove a runner's record before giving up (logged).
const DELETE_TRIES: u32 = 5;

/// A runner log line longer than this is cut in `tracing` (the file keeps
/// everything the masker let through).
const MAX_TRACE_LINE: usize = 4096;

/// Why a runner did not run.
#[derive(Debug, thiserror::Error)]
enum RunnerError {
    #[error("profile '{profile}': image {image}: {message}")]
    Image {
        profile: String,
        image: String,
        message: String,
    },
    #[error(
        "profile '{profile}': image {image} runs as root ('{user}'); \
         GitHub's runner must run as an unprivileged user: set USER in the image, \
         or allow_root = true in the profile"
    )]
    Root {
        profile: String,
        image: String,
        user: String,
    },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("the daemon is stopping")]
    Stopping,
}

fn is_root(user: &str) -> bool {
    let u = user.split(':').next().unwrap_or("");
    u.is_empty() || u == "root" || u == "0"
}

/// Run runner `name` of profile `profile`; `permit` is its slot of the
/// daemon's `concurrent` budget, released when everything is cleaned up.
pub(super) async fn serve(
    service: Arc<Service>,
    name: String,
    profile: usize,
    permit: OwnedSemaphorePermit,
) {
    let mut registered = Registered::No;
    let res = run(&service, &name, profile, &mut registered).await;
    match &res {
        Ok(r) => tracing::info!(
            github = %service.name(),
            runner = %name,
            "runner VM ended: {}",
            r.summary()
        ),
        Err(RunnerError::Api(e)) => service.api_failed(e),
        Err(RunnerError::Stopping) => {}
        Err(e) => {
            tracing::error!(github = %service.name(), runner = %name, "{}", error_chain(e));
            // A broken profile must not spin: wait before the next try.
            service.api_failed(&ApiError::Status {
                what: format!("runner {name}"),
                status: 0,
                body: e.to_string(),
                retry_after: Some(Duration::from_secs(30)),
            });
        }
    }
    remove_record(&service, &name, registered).await;
    service.lock().runners.remove(&name);
    drop(permit);
    service.wake.notify_one();
}

/// What GitHub may hold for the runner.
#[derive(Clone, Copy)]
enum Registered {
    No,
    /// The call failed without an answer: it may have registered.
    Maybe,
    Yes(u64),
}

async fn run(
    service: &Service,
    name: &str,
    profile: usize,
    registered: &mut Registered,
) -> Result<JobResult, RunnerError> {
    let p = &service.profiles[profile];
    // The image first: a runner is only registered when its VM can start.
    let rootfs = p
        .executor
        .prepare_image(&p.image)
        .await
        .map_err(|r| RunnerError::Image {
            profile: p.cfg.name.clone(),
            image: p.cfg.image.clone(),
            message: match r {
                crate::FailureReason::ImagePullFailure(m)
                | crate::FailureReason::RunnerSystemFailure(m) => m,
                other => format!("{other:?}"),
            },
        })?;
    if !p.cfg.allow_root && is_root(&rootfs.config.user) {
        return Err(RunnerError::Root {
            profile: p.cfg.name.clone(),
            image: p.cfg.image.clone(),
            user: rootfs.config.user.clone(),
        });
    }
    if *service.stopping.borrow() {
        return Err(RunnerError::Stopping);
    }
    if let Some(wait) = service.backing_off() {
        // Another call hit a rate limit meanwhile.
        tokio::time::sleep(wait).await;
    }
    let jit = match service
        .api
        .generate_jitconfig(name, &p.cfg.labels, service.cfg.runner_group_id)
        .await
    {
        Ok(j) => j,
        Err(e) => {
            if !matches!(e.status(), Some(s) if s < 500) {
                *registered = Registered::Maybe;
            }
            return Err(e.into());
        }
    };
    *registered = Registered::Yes(jit.id);
    service.api_ok();
    let (cancel_tx, cancel_rx) = watch::channel(None);
    let log_path = service
        .log_dir
        .join("github")
        .join(&service.cfg.name)
        .join(format!("{name}.log"));
    {
        let mut st = service.lock();
        st.counters.jit_configs += 1;
        st.counters.vms_started += 1;
        if let Some(slot) = st.runners.get_mut(name) {
            slot.id = Some(jit.id);
            slot.cancel = Some(Arc::new(cancel_tx));
            slot.log = Some(log_path.clone());
            if slot.phase == Phase::Draining && slot.job.is_none() {
                return Err(RunnerError::Stopping);
            }
        }
    }
    if *service.stopping.borrow() {
        return Err(RunnerError::Stopping);
    }
    tracing::info!(github = %service.name(), runner = %name, id = jit.id, "runner registered; booting its VM");
    let spec = runner_job(name, &p.cfg, &service.dist, &jit.config);
    let log = RunnerLog::open(service, name, &log_path);
    let mut sink = MaskingSink::new(log, Secrets::new([jit.config.0.clone()]));
    let result = p.executor.run(&spec, &mut sink, cancel_rx).await;
    sink.flush();
    service.lock().counters.vms_finished += 1;
    Ok(result)
}

/// The job the runner's VM runs.
fn runner_job(
    name: &str,
    profile: &super::config::Profile,
    dist: &std::path::Path,
    jit: &JitConfig,
) -> JobSpec {
    let mut step = Step::script("github-runner", RUNNER_SCRIPT);
    step.env.push((JITCONFIG_VAR.into(), jit.0.clone()));
    let mut spec = JobSpec::single(name, profile.image.clone(), step);
    spec.working_dir = Some(profile.runner_dir.clone());
    spec.source = JobSource::LocalDir(dist.to_path_buf());
    spec.timeout = Some(Duration::from_secs(profile.timeout.max(1)));
    spec
}

/// Remove the runner's record (GitHub removes a JIT runner's after its job;
/// this removes one that never took a job, or whose VM was stopped).
async fn remove_record(service: &Service, name: &str, registered: Registered) {
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=DELETE_TRIES {
        if let Some(wait) = service.backing_off() {
            tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
        }
        let done = match registered {
            Registered::No => return,
            Registered::Yes(id) => service.api.delete_runner(id).await.map(|gone| {
                if gone {
                    service.lock().counters.records_removed += 1;
                }
            }),
            Registered::Maybe => match service.api.runners_named(name).await {
                Ok(found) => {
                    let mut r = Ok(());
                    for rec in found {
                        match service.api.delete_runner(rec.id).await {
                            Ok(true) => service.lock().counters.records_removed += 1,
                            Ok(false) => {}
                            Err(e) => r = Err(e),
                        }
                    }
                    r
                }
                Err(e) => Err(e),
            },
        };
        match done {
            Ok(()) => {
                service.api_ok();
                tracing::info!(github = %service.name(), runner = %name, "runner record removed");
                return;
            }
            Err(e) => {
                tracing::warn!(
                    github = %service.name(),
                    runner = %name,
                    "removing the runner's record (try {attempt} of {DELETE_TRIES}): {}",
                    error_chain(&e)
                );
                if let Some(d) = e.retry_after() {
                    delay = d.min(Duration::from_secs(60));
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
    tracing::error!(
        github = %service.name(),
        runner = %name,
        "could not remove the runner's record; remove it in GitHub's runner settings"
    );
}

/// The runner's output: the per-VM log file and `tracing`, behind the
/// masking front. Marks the runner running when its step starts.
struct RunnerLog<'a> {
    service: &'a Service,
    name: String,
    file: Option<std::fs::File>,
    line: Vec<u8>,
}

impl<'a> RunnerLog<'a> {
    fn open(service: &'a Service, name: &str, path: &std::path::Path) -> RunnerLog<'a> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = path
            .parent()
            .map(std::fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|_| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)
            });
        let file = match file {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(runner = %name, "cannot write {}: {e}", path.display());
                None
            }
        };
        RunnerLog {
            service,
            name: name.into(),
            file,
            line: Vec::new(),
        }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end();
        if !text.is_empty() {
            tracing::info!(runner = %self.name, "| {text}");
        }
        self.line.clear();
    }
}

impl JobSink for RunnerLog<'_> {
    fn step_start(&mut self, _step: u32, _name: &str) {
        if let Some(slot) = self.service.lock().runners.get_mut(&self.name) {
            if slot.phase == Phase::Starting {
                slot.phase = Phase::Running;
            }
        }
    }

    fn output(&mut self, _step: u32, _stream: Stream, data: &[u8]) {
        if let Some(f) = &mut self.file {
            let _ = f.write_all(data);
        }
        for &b in data {
            if b == b'\n' {
                self.emit();
            } else if self.line.len() < MAX_TRACE_LINE {
                self.line.push(b);
            }
        }
    }

    fn step_end(&mut self, _name: &str, end: &StepEnd) {
        self.emit();
        tracing::info!(runner = %self.name, exit_code = end.exit_code, "the runner exited");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_users_are_recognised() {
        for u in ["", "root", "0", "0:0", "root:wheel"] {
            assert!(is_root(u), "{u}");
        }
        for u in ["runner", "1000", "1001:1001", "builder:root"] {
            assert!(!is_root(u), "{u}");
        }
    }

    #[test]
    fn the_jit_config_travels_only_in_the_steps_environment() {
        let c: crate::config::Config = toml::from_str(
            "[[github]]\nname='g'\nrepository='a/b'\ntoken='t'\nrunner_dist='/d'\n\
             [[github.profiles]]\nname='p'\nlabels=['x']\nimage='img'\ntimeout=60\n",
        )
        .unwrap();
        let jit = JitConfig("eyJzZWNyZXQiOjF9".into());
        let spec = runner_job("kiln-p-1", &c.github[0].profiles[0], "/d".as_ref(), &jit);
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(text.matches(&jit.0).count(), 1, "{text}");
        assert_eq!(
            spec.steps[0].env,
            vec![(JITCONFIG_VAR.to_string(), jit.0.clone())]
        );
        assert!(!spec.steps[0].script.contains(&jit.0));
        assert_eq!(spec.working_dir.as_deref(), Some("/actions-runner"));
        assert_eq!(spec.source, JobSource::LocalDir("/d".into()));
        assert_eq!(spec.timeout, Some(Duration::from_secs(60)));
    }
}
