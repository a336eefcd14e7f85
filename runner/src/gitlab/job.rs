//! The translation of a job payload ([`super::payload`]) into a
//! provider-neutral [`JobSpec`], with what the runner adds to it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use super::payload::*;
use kiln_images::{ImageError, ImagePolicy, ImageSource, Refusal};
use kiln_pipelines::{
    ArtifactSpec, ArtifactWhen, CachePolicy, CacheSpec, JobSource, JobSpec, Shell, Step, StepWhen,
    Variable,
};

/// What the runner adds to a job.
#[derive(Debug, Clone)]
pub struct Context {
    pub runner_id: Option<u64>,
    pub runner_name: String,
    pub default_image: Option<String>,
    /// What a job's own `image:` may name (the runner's `allowed_images`
    /// and `allow_local_images`). The default image is the runner's own
    /// choice and is taken as `kiln run-job --image` takes it.
    pub image_policy: ImagePolicy,
    /// Slot of this job among the daemon's running jobs (`CI_CONCURRENT_ID`).
    pub concurrent_id: usize,
    /// Host directory holding the job's workspace.
    pub workspace: PathBuf,
}

/// A job ready for the executor, plus what the runner needs around it.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub spec: JobSpec,
    /// `spec.image`, parsed with the runner's policy. A refusal fails
    /// [`JobResponse::to_spec`], before anything runs; another error (no
    /// such image) is the executor's to report, as for an image that cannot
    /// be pulled.
    pub image: Result<ImageSource, Arc<ImageError>>,
    pub git: GitStrategy,
    pub git_depth: u32,
    pub submodules: Submodules,
    pub project_dir: String,
}

/// Jobs whose `builds_dir` is `/builds`, like the Docker executor.
pub const BUILDS_DIR: &str = "/builds";
/// Default `after_script` timeout (gitlab-runner's
/// `RUNNER_AFTER_SCRIPT_TIMEOUT`), as for local runs of `.gitlab-ci.yml`.
pub use kiln_pipelines::gitlab::AFTER_SCRIPT_TIMEOUT;
/// Used when the server sends no timeout: kiln's one default job timeout.
pub const DEFAULT_TIMEOUT: Duration = crate::executor::DEFAULT_JOB_TIMEOUT;

/// Longest cache key (after expansion) a job may use.
const MAX_CACHE_KEY: usize = 1024;

/// The job's name, or `job-<id>` when GitLab sent none.
fn name_or_id(job: &JobResponse) -> String {
    if job.job_info.name.is_empty() {
        format!("job-{}", job.id)
    } else {
        job.job_info.name.clone()
    }
}

/// Why a job cannot be run as sent.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("the job names no image and the runner has no default `image`")]
    NoImage,
    #[error(
        "image '{}' is a path on the runner host; GitLab jobs may only use registry images \
         unless `allow_local_images = true` in kiln.toml",
        shown(.0)
    )]
    HostPathImage(String),
    #[error(
        "image '{}' is not allowed: it matches none of this runner's `allowed_images` in kiln.toml ({})",
        shown(.image), kiln_images::trunc(&.allowed.join(", "), kiln_images::MAX_SHOWN)
    )]
    ImageNotAllowed { image: String, allowed: Vec<String> },
    #[error("service {}: {}", .index, .source)]
    Service {
        index: usize,
        #[source]
        source: Box<JobError>,
    },
    #[error(transparent)]
    ServiceSpec(#[from] kiln_pipelines::services::ServiceError),
}

impl JobError {
    /// The failure reason GitLab is sent, and the one it gets when it does
    /// not know that one (as gitlab-runner falls back).
    pub fn failure_reason(&self) -> (&'static str, &'static str) {
        match self {
            JobError::NoImage | JobError::ServiceSpec(_) => {
                ("runner_configuration_error", "script_failure")
            }
            JobError::Service { source, .. } => source.failure_reason(),
            _ => ("image_pull_failure", "runner_system_failure"),
        }
    }
}

/// An image string from a job, escaped and cut for a message.
fn shown(image: &str) -> String {
    kiln_images::trunc(&image.escape_debug().to_string(), kiln_images::MAX_SHOWN)
}

/// Parse a job's `image:` with the runner's policy: refusals in GitLab's
/// terms, other errors for the executor to report.
fn parse_image(
    image: &str,
    policy: &ImagePolicy,
) -> Result<Result<ImageSource, Arc<ImageError>>, JobError> {
    match ImageSource::parse_with(image, policy) {
        Ok(source) => Ok(Ok(source)),
        Err(ImageError::Refused {
            image,
            refusal: Refusal::HostPath,
        }) => Err(JobError::HostPathImage(image)),
        Err(ImageError::Refused {
            image,
            refusal: Refusal::NotAllowed(allowed),
        }) => Err(JobError::ImageNotAllowed { image, allowed }),
        Err(e) => Ok(Err(Arc::new(e))),
    }
}

impl Prepared {
    /// The job's image, or why it cannot be used.
    pub fn image(&self) -> Result<&ImageSource, &ImageError> {
        self.image.as_ref().map_err(|e| e.as_ref())
    }
}

/// `s` in single quotes for `sh`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// A path below `/builds` for the project: `CI_PROJECT_PATH` cleaned.
fn project_path(job: &JobResponse) -> String {
    let var = job
        .variables
        .iter()
        .find(|v| v.key == "CI_PROJECT_PATH")
        .map(|v| v.value.clone())
        .unwrap_or_else(|| job.job_info.project_full_path.clone());
    let clean: Vec<String> = var
        .split('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
        .map(|c| {
            c.chars()
                .map(|ch| {
                    if ch.is_ascii_alphanumeric() || "._-".contains(ch) {
                        ch
                    } else {
                        '_'
                    }
                })
                .collect()
        })
        .collect();
    if clean.is_empty() {
        format!("project-{}", job.job_info.project_id)
    } else {
        clean.join("/")
    }
}

impl JobResponse {
    /// What the job's trace masks besides token-shaped strings: the job's
    /// token and its masked variables' values.
    pub fn masked_values(&self) -> Vec<String> {
        std::iter::once(&self.token)
            .chain(self.variables.iter().filter(|v| v.masked).map(|v| &v.value))
            .filter(|m| !m.is_empty())
            .cloned()
            .collect()
    }

    pub fn variable(&self, key: &str) -> Option<&str> {
        self.variables
            .iter()
            .rev()
            .find(|v| v.key == key)
            .map(|v| v.value.as_str())
    }

    /// The job's caches, as gitlab-runner reads them: key, paths and
    /// fallback keys expanded with the job's variables; an empty key is
    /// `<job name>/<ref>`; an unknown policy is the default (`pull-push`),
    /// an unknown `when` `on_success`.
    fn caches(&self, vars: &[Variable], name: &str) -> Vec<CacheSpec> {
        let lookup: std::collections::BTreeMap<String, String> = vars
            .iter()
            .map(|v| (v.key.clone(), v.value.clone()))
            .collect();
        // Expanded values are bounded: a key names an archive, not a file.
        let exp = |s: &str| {
            let e = kiln_pipelines::gitlab::expand(s, &lookup);
            (e.len() <= MAX_CACHE_KEY).then_some(e)
        };
        self.cache
            .iter()
            .filter(|c| !c.paths.is_empty() || c.untracked)
            .filter_map(|c| {
                let key = match exp(&c.key)? {
                    k if k.trim().is_empty() => format!("{name}/{}", self.git_info.git_ref),
                    k => k,
                };
                Some(CacheSpec {
                    key,
                    fallback_keys: c
                        .fallback_keys
                        .iter()
                        .filter_map(|k| exp(k))
                        .filter(|k| !k.trim().is_empty())
                        .collect(),
                    paths: c.paths.iter().filter_map(|p| exp(p)).collect(),
                    untracked: c.untracked,
                    policy: CachePolicy::parse(&c.policy).unwrap_or(CachePolicy::PullPush),
                    when: match c.when.as_str() {
                        "always" => ArtifactWhen::Always,
                        "on_failure" => ArtifactWhen::OnFailure,
                        _ => ArtifactWhen::OnSuccess,
                    },
                })
            })
            .collect()
    }

    /// The job's `services`, each image checked with the runner's image
    /// policy (as the job's own image), each alias a host name, at most
    /// [`MAX_SERVICES`](kiln_pipelines::services::MAX_SERVICES).
    fn service_specs(&self, ctx: &Context) -> Result<Vec<kiln_pipelines::ServiceSpec>, JobError> {
        kiln_pipelines::services::check_count(self.services.len())?;
        self.services
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let wrap = |e: JobError| JobError::Service {
                    index,
                    source: Box::new(e),
                };
                // A name that does not parse is the executor's to report,
                // as for the job's image.
                if let Err(refused) = parse_image(&s.name, &ctx.image_policy) {
                    return Err(wrap(refused));
                }
                let variables = s
                    .variables
                    .iter()
                    .map(|v| Variable::new(&v.key, &v.value))
                    .collect();
                kiln_pipelines::services::service(
                    &s.name,
                    Some(s.alias.as_str()),
                    s.entrypoint.clone(),
                    s.command.clone(),
                    variables,
                )
                .map_err(|e| wrap(e.into()))
            })
            .collect()
    }

    /// Translate to a [`JobSpec`] (see docs/gitlab.md for the mapping).
    pub fn to_spec(&self, ctx: &Context) -> Result<Prepared, JobError> {
        let own = self.image.as_ref().map(|i| i.name.clone());
        let (image, source) = match own.filter(|n| !n.is_empty()) {
            Some(name) => {
                let source = parse_image(&name, &ctx.image_policy)?;
                (name, source)
            }
            None => {
                let name = ctx.default_image.clone().ok_or(JobError::NoImage)?;
                let source =
                    ImageSource::parse_with(&name, &ImagePolicy::local()).map_err(Arc::new);
                (name, source)
            }
        };
        let services = self.service_specs(ctx)?;
        let project_dir = format!("{BUILDS_DIR}/{}", project_path(self));
        let tmp_dir = format!("{project_dir}.tmp");
        let timeout = if self.runner_info.timeout > 0 {
            Duration::from_secs(self.runner_info.timeout as u64)
        } else {
            DEFAULT_TIMEOUT
        };

        // Server variables, then the runner's (gitlab-runner appends its
        // own after the server's; later ones win).
        let mut vars: Vec<Variable> = Vec::new();
        let mut prelude = String::new();
        for v in &self.variables {
            let mut var = Variable::new(&v.key, &v.value);
            var.masked = v.masked;
            if v.file {
                // File variables: the value goes to a file, the variable
                // holds its path (written by every step's prelude).
                let path = format!("{tmp_dir}/{}", v.key);
                if prelude.is_empty() {
                    prelude.push_str(&format!("mkdir -p {}\n", sh_quote(&tmp_dir)));
                }
                prelude.push_str(&format!(
                    "printf '%s' {} > {}\n",
                    sh_quote(&v.value),
                    sh_quote(&path)
                ));
                var.value = path;
            }
            vars.push(var);
        }
        // The runner's own values describe its layout: they win.
        let mut add = |k: &str, v: String| {
            vars.retain(|x| x.key != k);
            vars.push(Variable::new(k, v));
        };
        add("CI_BUILDS_DIR", BUILDS_DIR.into());
        add("CI_PROJECT_DIR", project_dir.clone());
        add("CI_CONCURRENT_ID", ctx.concurrent_id.to_string());
        add("CI_CONCURRENT_PROJECT_ID", ctx.concurrent_id.to_string());
        add("CI_SERVER", "yes".into());
        add("CI_JOB_STATUS", "running".into());
        add("CI_JOB_TIMEOUT", timeout.as_secs().to_string());
        add("CI_JOB_IMAGE", image.clone());
        add("CI_DISPOSABLE_ENVIRONMENT", "true".into());
        add("CI_RUNNER_VERSION", env!("CARGO_PKG_VERSION").into());
        add("CI_RUNNER_REVISION", "unknown".into());
        add(
            "CI_RUNNER_EXECUTABLE_ARCH",
            format!(
                "linux/{}",
                std::env::consts::ARCH.replace("x86_64", "amd64")
            ),
        );
        // Normally sent by the server; filled in when it does not.
        if let Some(id) = ctx
            .runner_id
            .filter(|_| self.variable("CI_RUNNER_ID").is_none())
        {
            add("CI_RUNNER_ID", id.to_string());
        }
        if self.variable("CI_RUNNER_DESCRIPTION").is_none() {
            add("CI_RUNNER_DESCRIPTION", ctx.runner_name.clone());
        }

        let mut steps = Vec::new();
        for s in &self.steps {
            let mut body = String::from(&prelude);
            for cmd in &s.script {
                let shown = match cmd.split_once('\n') {
                    Some((first, _)) => format!("{first} # collapsed multi-line command"),
                    None => cmd.clone(),
                };
                body.push_str(&format!(
                    "printf '\\033[32;1m$ %s\\033[0;m\\n' {}\n{cmd}\n",
                    sh_quote(&shown)
                ));
            }
            let mut step = Step::script(&s.name, body);
            step.shell = Shell::Sh;
            step.allow_failure = s.allow_failure;
            step.when = match s.when.as_str() {
                "always" => StepWhen::Always,
                "on_failure" => StepWhen::OnFailure,
                _ => StepWhen::OnSuccess,
            };
            if s.name == "after_script" {
                // Its own shell (every step is) and its own timeout.
                step.when = StepWhen::Always;
                step.allow_failure = true;
                step.timeout = Some(AFTER_SCRIPT_TIMEOUT);
            }
            steps.push(step);
        }

        let artifacts = self
            .artifacts
            .iter()
            .map(|a| ArtifactSpec {
                name: a.name.clone(),
                paths: a.paths.clone(),
                exclude: a.exclude.clone(),
                untracked: a.untracked,
                when: match a.when.as_deref() {
                    Some("always") => ArtifactWhen::Always,
                    Some("on_failure") => ArtifactWhen::OnFailure,
                    _ => ArtifactWhen::OnSuccess,
                },
                expire_in: a.expire_in.clone(),
            })
            .collect();

        let cache = self.caches(&vars, &name_or_id(self));

        let git = match self.variable("GIT_STRATEGY") {
            Some("none") | Some("empty") => GitStrategy::None,
            _ => GitStrategy::Clone,
        };
        let git_depth = self
            .variable("GIT_DEPTH")
            .and_then(|d| d.trim().parse().ok())
            .unwrap_or(self.git_info.depth);
        let submodules = match self.variable("GIT_SUBMODULE_STRATEGY") {
            Some("normal") => Submodules::Normal,
            Some("recursive") => Submodules::Recursive,
            _ => Submodules::None,
        };

        let name = if self.job_info.name.is_empty() {
            format!("job-{}", self.id)
        } else {
            self.job_info.name.clone()
        };
        let mut spec = JobSpec::single(&name, image, Step::script("-", ""));
        spec.steps = steps;
        spec.variables = vars;
        spec.working_dir = Some(project_dir.clone());
        spec.timeout = Some(timeout);
        spec.artifacts = artifacts;
        spec.cache = cache;
        spec.source = JobSource::LocalDir(ctx.workspace.clone());
        spec.stage = Some(self.job_info.stage.clone()).filter(|s| !s.is_empty());
        spec.services = services;
        Ok(Prepared {
            spec,
            image: source,
            git,
            git_depth,
            submodules,
            project_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobResponse {
        serde_json::from_value(serde_json::json!({
            "id": 10, "token": "job-token",
            "job_info": {"name": "test-job", "stage": "test", "project_id": 123, "project_name": "p"},
            "git_info": {"repo_url": "http://x/g/p.git", "ref": "main", "sha": "abc", "refspecs": ["+refs/heads/main:refs/remotes/origin/main"], "depth": 20},
            "runner_info": {"timeout": 600},
            "variables": [
                {"key": "CI_PROJECT_PATH", "value": "group/p", "public": true},
                {"key": "SECRET", "value": "hunter22", "masked": true},
                {"key": "CFG", "value": "it's\nfile", "file": true},
                {"key": "GIT_DEPTH", "value": "3"}
            ],
            "steps": [
                {"name": "script", "script": ["echo hi", "false"], "timeout": 600, "when": "on_success"},
                {"name": "after_script", "script": ["echo bye"], "timeout": 600, "when": "always", "allow_failure": true}
            ],
            "image": null,
            "artifacts": [{"name": "a", "paths": ["out/"], "when": "always", "expire_in": "1d"}],
            "dependencies": null
        }))
        .unwrap()
    }

    fn ctx() -> Context {
        Context {
            runner_id: Some(7),
            runner_name: "r".into(),
            default_image: Some("registry.example/img:1".into()),
            image_policy: ImagePolicy::provider(false, vec![]),
            concurrent_id: 0,
            workspace: "/ws".into(),
        }
    }

    #[test]
    fn the_payload_becomes_a_job_spec() {
        let p = job().to_spec(&ctx()).unwrap();
        let s = &p.spec;
        assert_eq!(s.image, "registry.example/img:1");
        assert_eq!(p.image().unwrap().label(), "registry.example/img:1");
        assert_eq!(s.timeout, Some(Duration::from_secs(600)));
        assert_eq!(s.working_dir.as_deref(), Some("/builds/group/p"));
        assert_eq!(job().masked_values(), vec!["job-token", "hunter22"]);
        assert_eq!(p.git_depth, 3);
        assert_eq!(s.steps.len(), 2);
        assert!(s.steps[0].script.contains("echo hi\n"));
        assert!(s.steps[0]
            .script
            .contains("printf '%s' 'it'\\''s\nfile' > '/builds/group/p.tmp/CFG'"));
        assert_eq!(s.steps[1].when, StepWhen::Always);
        assert_eq!(s.steps[1].timeout, Some(AFTER_SCRIPT_TIMEOUT));
        let var = |k: &str| {
            s.variables
                .iter()
                .find(|v| v.key == k)
                .unwrap()
                .value
                .clone()
        };
        assert_eq!(var("CFG"), "/builds/group/p.tmp/CFG");
        assert_eq!(var("CI_PROJECT_DIR"), "/builds/group/p");
        assert_eq!(var("CI_RUNNER_ID"), "7");
        assert_eq!(s.artifacts[0].when, ArtifactWhen::Always);
        assert_eq!(s.source, JobSource::LocalDir("/ws".into()));
    }

    #[test]
    fn caches_are_read_as_gitlab_runner_reads_them() {
        let mut j = job();
        j.cache = serde_json::from_value(serde_json::json!([
            {"key": "deps-$CI_PROJECT_PATH-non_protected", "paths": ["vendor/$GIT_DEPTH"],
             "policy": "pull", "when": "always", "untracked": false,
             "fallback_keys": ["main-non_protected", ""]},
            {"key": "", "untracked": true, "policy": "", "when": null},
            {"key": "nothing", "paths": [], "untracked": false}
        ]))
        .unwrap();
        let c = j.to_spec(&ctx()).unwrap().spec.cache;
        assert_eq!(c.len(), 2, "a cache of nothing is left out");
        assert_eq!(c[0].key, "deps-group/p-non_protected");
        assert_eq!(c[0].paths, ["vendor/3"]);
        assert_eq!(c[0].fallback_keys, ["main-non_protected"]);
        assert_eq!(
            (c[0].policy, c[0].when),
            (CachePolicy::Pull, ArtifactWhen::Always)
        );
        assert_eq!(c[1].key, "test-job/main", "gitlab-runner's default key");
        assert!(c[1].untracked);
        assert_eq!(
            (c[1].policy, c[1].when),
            (CachePolicy::PullPush, ArtifactWhen::OnSuccess)
        );
    }

    #[test]
    fn a_host_path_image_is_refused_unless_allowed() {
        let layout = tempfile::tempdir().unwrap();
        std::fs::write(layout.path().join("oci-layout"), "{}").unwrap();
        let dir = layout.path().to_str().unwrap().to_string();
        let mut j = job();
        j.image = Some(Image { name: dir.clone() });
        let e = j.to_spec(&ctx()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "image '{dir}' is a path on the runner host; GitLab jobs may only use \
                 registry images unless `allow_local_images = true` in kiln.toml"
            )
        );
        assert_eq!(e.failure_reason().0, "image_pull_failure");
        let mut c = ctx();
        c.image_policy = ImagePolicy::provider(true, vec![]);
        let p = j.to_spec(&c).unwrap();
        assert!(
            matches!(p.image(), Ok(ImageSource::Layout { .. })),
            "{:?}",
            p.image
        );
        // An allowed path that is not there: the executor reports it.
        j.image = Some(Image {
            name: format!("{dir}/nothing-here"),
        });
        assert!(j.to_spec(&c).unwrap().image().is_err());

        // A registry image that the allow-list does not name.
        j.image = Some(Image {
            name: "quay.io/x/y:1".into(),
        });
        c.image_policy = ImagePolicy::provider(false, vec!["docker.io/library/*".into()]);
        let e = j.to_spec(&c).unwrap_err();
        assert!(
            e.to_string()
                .contains("matches none of this runner's `allowed_images`"),
            "{e}"
        );
        j.image = Some(Image {
            name: "alpine:3".into(),
        });
        assert!(j.to_spec(&c).is_ok());
    }

    #[test]
    fn no_image_anywhere_is_an_error() {
        let mut c = ctx();
        c.default_image = None;
        assert!(job().to_spec(&c).is_err());
    }

    #[test]
    fn services_come_from_the_payload_checked() {
        let with = |services: serde_json::Value| {
            let mut j = job();
            j.services = serde_json::from_value(services).unwrap();
            j
        };
        let j = with(serde_json::json!([
            {"name": "postgres:15", "alias": "db", "variables": [{"key": "POSTGRES_PASSWORD", "value": "x"}]},
            {"name": "registry.example.com/group/img", "entrypoint": ["/bin/sh"], "command": ["-c", "serve"], "alias": null},
        ]));
        let s = j.to_spec(&ctx()).unwrap().spec.services;
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].aliases, vec!["postgres", "db"]);
        assert_eq!(s[0].variables[0].key, "POSTGRES_PASSWORD");
        assert_eq!(
            s[1].aliases,
            vec![
                "registry.example.com__group__img",
                "registry.example.com-group-img"
            ]
        );
        assert_eq!(s[1].entrypoint, Some(vec!["/bin/sh".to_string()]));

        let e = with(serde_json::json!([{"name": "pg", "alias": "x\n6.6.6.6 gitlab.com"}]))
            .to_spec(&ctx())
            .unwrap_err();
        assert!(e.to_string().contains("service 0: service alias"), "{e}");
        assert_eq!(e.failure_reason().0, "runner_configuration_error");
        let nine: Vec<_> = (0..9)
            .map(|i| serde_json::json!({"name": format!("s{i}")}))
            .collect();
        let e = with(serde_json::Value::Array(nine))
            .to_spec(&ctx())
            .unwrap_err();
        assert!(e.to_string().contains("at most 8"), "{e}");
        // The runner's image policy holds for services as for the image.
        let e = with(serde_json::json!([{"name": "/srv/layout"}]))
            .to_spec(&ctx())
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("service 0: image '/srv/layout' is a path"),
            "{e}"
        );
        assert_eq!(e.failure_reason().0, "image_pull_failure");
    }
}
