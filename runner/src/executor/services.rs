//! The job's services (`JobSpec::services`) on the host side: each image
//! to a root filesystem (the job image's path, [`Executor::prepare_image`]),
//! attached read-only as disk `kiln-svc-<i>` of the job's own VM; what the
//! agent is told to run (Docker's entrypoint/command rules, the image's
//! environment, the job's variables, the service's own), which ports it
//! waits for; and, after `Start`, the agent's `ServiceStatus` reports,
//! shown like gitlab-runner shows them.
//!
//! As under gitlab-runner, a service that fails its health check is a
//! warning in the job's log (with the service's last output), not a
//! failure: the job runs, and fails when its script cannot reach the
//! service. The wait comes out of the job's timeout; the VM's memory and
//! vCPUs are the job's, shared with its services.

use std::time::Duration;

use kiln_agent::proto::{self, Frame, ServiceStart, ServiceStatus, Stream};
use kiln_images::{ImagePolicy, ImageSource, Rootfs};
use kiln_pipelines::{JobSpec, ServiceSpec};
use kiln_vmm::Disk;

use super::conversation::Conversation;
use super::outcome::{protocol, Early, FailureReason};
use super::{error_chain, Executor};
use crate::joblog::JobSink;

/// How long the agent waits for a service's ports unless the job sets
/// [`WAIT_VAR`] (gitlab-runner's `wait_for_services_timeout` default).
pub const DEFAULT_SERVICES_WAIT: Duration = Duration::from_secs(30);
/// The job variable that sets the wait in seconds, named after
/// gitlab-runner's `wait_for_services_timeout` (a `config.toml` setting
/// there): `-1` (any negative) waits not at all, `0` or absent is
/// [`DEFAULT_SERVICES_WAIT`].
pub const WAIT_VAR: &str = "WAIT_FOR_SERVICES_TIMEOUT";
/// A service variable naming the one TCP port to wait for, instead of the
/// image's `ExposedPorts` (gitlab-runner's `HEALTHCHECK_TCP_PORT`).
pub const HEALTHCHECK_PORT_VAR: &str = "HEALTHCHECK_TCP_PORT";

/// A job's services with their root filesystems.
pub(super) struct Prepared {
    pub list: Vec<(ServiceSpec, Rootfs)>,
}

impl Executor {
    /// Every service's image as a root filesystem. A service image that
    /// cannot be had fails the job as the job's image would.
    pub(super) async fn prepare_services(&self, job: &JobSpec) -> Result<Prepared, FailureReason> {
        if job.services.len() > proto::MAX_SERVICES {
            return Err(FailureReason::RunnerSystemFailure(
                kiln_pipelines::services::ServiceError::TooMany(job.services.len()).to_string(),
            ));
        }
        let mut list = Vec::with_capacity(job.services.len());
        for svc in &job.services {
            // Providers check service images with their own policy first
            // (GitLab: the runner's `allowed_images`); here they are taken
            // as `kiln run-job --image` takes an image.
            let source = ImageSource::parse_with(&svc.image, &ImagePolicy::local())
                .map_err(|e| service_image_failure(&svc.image, &error_chain(&e)))?;
            let rootfs = self.prepare_image(&source).await.map_err(|r| match r {
                FailureReason::ImagePullFailure(m) => service_image_failure(&svc.image, &m),
                other => other,
            })?;
            list.push((svc.clone(), rootfs));
        }
        Ok(Prepared { list })
    }
}

fn service_image_failure(image: &str, why: &str) -> FailureReason {
    FailureReason::ImagePullFailure(format!(
        "service image {}: {why}",
        kiln_images::trunc(&image.escape_debug().to_string(), kiln_images::MAX_SHOWN)
    ))
}

impl Prepared {
    /// The services' disks, in order (serial `kiln-svc-<i>`).
    pub fn disks(&self) -> Vec<Disk> {
        self.list
            .iter()
            .enumerate()
            .map(|(i, (_, rootfs))| Disk {
                path: rootfs.image.clone(),
                read_only: true,
                serial: proto::service_disk_serial(i as u32),
                ephemeral: false,
            })
            .collect()
    }

    /// What the agent runs; `None` without services.
    pub fn start(&self, job: &JobSpec) -> Option<proto::Services> {
        if self.list.is_empty() {
            return None;
        }
        let list = self
            .list
            .iter()
            .enumerate()
            .map(|(i, (svc, rootfs))| service_start(i as u32, job, svc, rootfs))
            .collect();
        Some(proto::Services {
            wait_ms: services_wait(job).as_millis() as u64,
            list,
        })
    }
}

/// The wait for services' ports that `job` asks for ([`WAIT_VAR`]).
pub fn services_wait(job: &JobSpec) -> Duration {
    let set = job
        .variables
        .iter()
        .rev()
        .find(|v| v.key == WAIT_VAR)
        .and_then(|v| v.value.trim().parse::<i64>().ok());
    match set {
        Some(s) if s < 0 => Duration::ZERO,
        Some(s) if s > 0 => Duration::from_secs(s as u64),
        _ => DEFAULT_SERVICES_WAIT,
    }
}

/// Service `index` as the agent starts it.
fn service_start(index: u32, job: &JobSpec, svc: &ServiceSpec, rootfs: &Rootfs) -> ServiceStart {
    let cfg = &rootfs.config;
    let mut env: Vec<(String, String)> = cfg
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for v in job.variables.iter().chain(&svc.variables) {
        env.retain(|(k, _)| k != &v.key);
        env.push((v.key.clone(), v.value.clone()));
    }
    let ports = match svc.variables.iter().find(|v| v.key == HEALTHCHECK_PORT_VAR) {
        Some(v) => v.value.trim().parse::<u16>().ok().into_iter().collect(),
        None => tcp_ports(&cfg.exposed_ports),
    };
    ServiceStart {
        index,
        name: svc.image.clone(),
        aliases: svc.aliases.clone(),
        fstype: rootfs.fstype.clone(),
        argv: service_argv(svc, &cfg.entrypoint, &cfg.cmd),
        env,
        workdir: cfg.working_dir.clone(),
        user: cfg.user.clone(),
        ports,
    }
}

/// Docker's rules: a service `entrypoint` replaces the image's and drops
/// its command (unless the entrypoint is cleared with `[""]`); a `command`
/// replaces the image's command.
pub fn service_argv(svc: &ServiceSpec, image_ep: &[String], image_cmd: &[String]) -> Vec<String> {
    let mut cmd = svc.command.clone().unwrap_or_default();
    let ep = match &svc.entrypoint {
        Some(ep) if !ep.is_empty() => ep.clone(),
        Some(_) => Vec::new(),
        None => image_ep.to_vec(),
    };
    let keeps_image_cmd = !matches!(&svc.entrypoint, Some(ep) if !ep.is_empty());
    if cmd.is_empty() && keeps_image_cmd {
        cmd = image_cmd.to_vec();
    }
    ep.into_iter().chain(cmd).collect()
}

/// The TCP ports of `ExposedPorts` keys (`5432/tcp`, `8080`); others
/// (`53/udp`, junk) are left out.
pub fn tcp_ports(exposed: &[String]) -> Vec<u16> {
    let mut ports: Vec<u16> = exposed
        .iter()
        .filter_map(|k| {
            let (port, proto) = k.split_once('/').unwrap_or((k, "tcp"));
            (proto.eq_ignore_ascii_case("tcp"))
                .then(|| port.parse::<u16>().ok())
                .flatten()
                .filter(|&p| p != 0)
        })
        .collect();
    ports.dedup();
    ports
}

/// After `Start`: tell the job's log which services start, then read one
/// `ServiceStatus` per service (within the job's timeout) and show each
/// unhealthy one as gitlab-runner does.
pub(super) async fn await_services(
    io: &mut Conversation<'_>,
    job: &JobSpec,
    start: &proto::Services,
    sink: &mut dyn JobSink,
) -> Result<(), Early> {
    let say = |sink: &mut dyn JobSink, text: &str| sink.output(0, Stream::Stderr, text.as_bytes());
    for s in &start.list {
        say(sink, &format!("Starting service {} ...\n", s.name));
    }
    if start.wait_ms > 0 && start.list.iter().any(|s| !s.ports.is_empty()) {
        say(
            sink,
            &format!(
                "Waiting for services to be up and running (timeout {} seconds)...\n",
                start.wait_ms / 1000
            ),
        );
    }
    let mut seen = vec![false; start.list.len()];
    for _ in 0..start.list.len() {
        let status = match io.next_event(job, sink).await? {
            Frame::ServiceStatus(s) => s,
            other => {
                return Err(protocol(format!(
                    "{} while the services were starting",
                    other.describe()
                )))
            }
        };
        let i = status.index as usize;
        if i >= seen.len() || seen[i] {
            return Err(protocol(format!(
                "a ServiceStatus for service {} (the job has {}, each reported once)",
                status.index,
                seen.len()
            )));
        }
        seen[i] = true;
        if !status.healthy {
            say(sink, &warning(&start.list[i], &status));
        }
    }
    Ok(())
}

/// gitlab-runner's warning for a service that did not start properly,
/// with the end of its output (bounded again: the guest sent it).
fn warning(svc: &ServiceStart, status: &ServiceStatus) -> String {
    let cut = |s: &str, max: usize| {
        let mut i = s.len().min(max);
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        s[s.len() - i..].to_string()
    };
    let log = cut(&status.log, proto::MAX_SERVICE_LOG);
    let error = proto::quote(status.error.as_bytes(), 4 * proto::QUOTE_MAX);
    let mut w = format!(
        "\n\x1b[0;33m*** WARNING:\x1b[0;m Service {} probably didn't start properly.\n\n\
         Health check error:\n{error}\n\nService container logs:\n{log}",
        svc.name
    );
    if !log.is_empty() && !log.ends_with('\n') {
        w.push('\n');
    }
    w.push_str("\n\x1b[0;33m*********\x1b[0;m\n\n");
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_pipelines::{Step, Variable};

    fn svc(ep: Option<&[&str]>, cmd: Option<&[&str]>) -> ServiceSpec {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        ServiceSpec {
            image: "img".into(),
            aliases: vec!["img".into()],
            entrypoint: ep.map(v),
            command: cmd.map(v),
            variables: Vec::new(),
        }
    }

    #[test]
    fn entrypoint_and_command_follow_dockers_rules() {
        let (ep, cmd) = (vec!["/ep".to_string()], vec!["serve".to_string()]);
        assert_eq!(service_argv(&svc(None, None), &ep, &cmd), ["/ep", "serve"]);
        assert_eq!(
            service_argv(&svc(None, Some(&["x"])), &ep, &cmd),
            ["/ep", "x"]
        );
        // A new entrypoint drops the image's command.
        assert_eq!(service_argv(&svc(Some(&["nc"]), None), &ep, &cmd), ["nc"]);
        assert_eq!(
            service_argv(&svc(Some(&["nc"]), Some(&["-l"])), &ep, &cmd),
            ["nc", "-l"]
        );
        // `entrypoint: [""]` clears it and keeps the command.
        assert_eq!(service_argv(&svc(Some(&[]), None), &ep, &cmd), ["serve"]);
    }

    #[test]
    fn ports_and_wait() {
        let exposed = ["5432/tcp", "53/udp", "8080", "x/tcp", "0/tcp", "70000/tcp"];
        let exposed: Vec<String> = exposed.iter().map(|s| s.to_string()).collect();
        assert_eq!(tcp_ports(&exposed), vec![5432, 8080]);
        let mut job = JobSpec::single("j", "img", Step::script("s", "x"));
        assert_eq!(services_wait(&job), DEFAULT_SERVICES_WAIT);
        job.variables.push(Variable::new(WAIT_VAR, "5"));
        assert_eq!(services_wait(&job), Duration::from_secs(5));
        job.variables.push(Variable::new(WAIT_VAR, "-1"));
        assert_eq!(services_wait(&job), Duration::ZERO);
        job.variables.push(Variable::new(WAIT_VAR, "junk"));
        assert_eq!(services_wait(&job), DEFAULT_SERVICES_WAIT);
    }

    #[test]
    fn the_warning_is_gitlab_runners_and_bounded() {
        let start = ServiceStart {
            name: "postgres:15".into(),
            ..Default::default()
        };
        let status = ServiceStatus {
            index: 0,
            healthy: false,
            error: "no connection\n\x1b[2J".into(),
            log: format!("{}last line", "x".repeat(3 * proto::MAX_SERVICE_LOG)),
        };
        let w = warning(&start, &status);
        assert!(
            w.contains("*** WARNING:\x1b[0;m Service postgres:15 probably didn't start properly.")
        );
        assert!(
            w.contains("Health check error:\nno connection\\n\\x1b[2J\n"),
            "{w:?}"
        );
        assert!(w.contains("last line\n"));
        assert!(w.len() < proto::MAX_SERVICE_LOG + 1024, "{}", w.len());
        assert_eq!(proto::MAX_SERVICES, kiln_pipelines::services::MAX_SERVICES);
    }
}
