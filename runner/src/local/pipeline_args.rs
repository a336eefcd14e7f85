//! `run-job FILE` options that shape which pipeline is simulated (ref,
//! tag, source, CI/CD inputs, project includes) and `--list` output.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_pipelines::{JobSummary, LocalContext, Options, Pipeline};

#[derive(Args, Debug, Default, Clone)]
pub struct PipelineArgs {
    /// GitLab CI/CD input of FILE's `spec: inputs` header (NAME=VALUE,
    /// repeatable); converted to the input's declared type.
    #[arg(long = "input")]
    inputs: Vec<String>,
    /// Read GitLab `include: project: GROUP/PROJ` from a local checkout
    /// (GROUP/PROJ=DIR, repeatable).
    #[arg(long = "include-project")]
    include_projects: Vec<String>,
    /// Read GitLab `include: template: NAME` from DIR/NAME (a folder of
    /// GitLab's templates, e.g. lib/gitlab/ci/templates of gitlab-org/gitlab).
    #[arg(long = "include-template-dir", value_name = "DIR")]
    include_template_dir: Option<PathBuf>,
    /// Simulate a pipeline for this branch instead of the checkout's.
    #[arg(long = "ref", conflicts_with = "git_tag")]
    git_ref: Option<String>,
    /// Simulate a tag pipeline for this tag (`CI_COMMIT_TAG`).
    #[arg(long = "tag")]
    git_tag: Option<String>,
    /// Pipeline source: push, merge_request_event, schedule, web, api,
    /// trigger, pipeline, ... (GitLab `CI_PIPELINE_SOURCE`; for a GitHub
    /// workflow, `github.event_name`, e.g. pull_request).
    #[arg(long)]
    source: Option<String>,
    /// GitHub: leave out `uses:` steps kiln cannot run instead of failing
    /// the job at them.
    #[arg(long)]
    skip_unsupported_actions: bool,
    /// With --list: also list the jobs this pipeline leaves out, with the
    /// clause that leaves each out.
    #[arg(long, requires = "list")]
    all: bool,
    /// GitLab: run JOB even when its `rules`, `only`/`except` or the
    /// `workflow: rules` leave it out of this pipeline (a note names the
    /// clause).
    #[arg(long, requires = "job")]
    force: bool,
    /// GitLab `include: remote`: read the files from kiln's cache only
    /// (fetched by an earlier run), without the network.
    #[arg(long)]
    offline: bool,
    /// GitLab server whose API reads `include: project` and `include:
    /// component` files (e.g. https://gitlab.com); cached like remote
    /// includes, so --offline works once they were read. Not taken from
    /// CI_SERVER_URL: kiln inside a GitLab job (a test suite) must not
    /// reach the network unasked.
    #[arg(long = "gitlab-url", env = "KILN_GITLAB_URL", value_name = "URL")]
    gitlab_url: Option<String>,
    /// Access token for --gitlab-url (read_api scope), for private
    /// projects; prefer the GITLAB_TOKEN variable (a flag shows in `ps`).
    /// Never printed.
    #[arg(
        long = "gitlab-token",
        env = "GITLAB_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    gitlab_token: Option<super::gitlab_include::Token>,
    /// kiln's cache directory: remote includes are kept there (set by
    /// `main`; without it remote includes are skipped with a warning).
    #[arg(skip)]
    cache_dir: Option<PathBuf>,
}

impl PipelineArgs {
    /// Where `include: remote` files are cached (kiln's cache directory).
    pub fn set_cache_dir(&mut self, dir: PathBuf) {
        self.cache_dir = Some(dir);
    }

    /// Applies the options to the context and parse options.
    /// `job`: the job asked for (what `--force` keeps).
    pub fn apply(
        &self,
        ctx: &mut LocalContext,
        opts: &mut Options,
        job: Option<&str>,
    ) -> Result<()> {
        opts.inputs = super::plan::key_values(&self.inputs, "--input")?;
        opts.skip_unsupported_actions = self.skip_unsupported_actions;
        if let Some(dir) = &self.cache_dir {
            let fetcher = super::remote_include::RemoteFetcher::new(
                dir,
                self.offline,
                opts.limits.max_file_bytes,
            );
            if let Some(url) = &self.gitlab_url {
                let client = super::gitlab_include::GitlabClient::new(
                    url,
                    self.gitlab_token.clone(),
                    fetcher.clone(),
                )?;
                opts.gitlab_api = kiln_pipelines::GitlabApi::with(client);
            }
            opts.remote_includes = fetcher.hook();
        }
        if self.force {
            opts.force_jobs.extend(job.map(String::from));
        }
        for (project, dir) in super::plan::key_values(&self.include_projects, "--include-project")?
        {
            let dir = PathBuf::from(dir);
            let dir = dir
                .canonicalize()
                .with_context(|| format!("--include-project {project}: {}", dir.display()))?;
            opts.include_projects.push((project, dir));
        }
        if let Some(dir) = &self.include_template_dir {
            let dir = dir
                .canonicalize()
                .with_context(|| format!("--include-template-dir {}", dir.display()))?;
            opts.include_template_dir = Some(dir);
        }
        if let Some(r) = &self.git_ref {
            ctx.branch = Some(r.clone());
            ctx.tag = None;
        }
        if let Some(t) = &self.git_tag {
            ctx.tag = Some(t.clone());
            ctx.branch = None;
        }
        if let Some(s) = &self.source {
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                bail!("--source '{s}': expected a source name such as push, merge_request_event, schedule, web or api");
            }
            opts.pipeline_source = s.clone();
            opts.event_name = s.clone();
        }
        Ok(())
    }

    /// Prints `--list`: a line per job (JSON with `json`), then with
    /// `--all` the excluded jobs.
    pub fn list(&self, pipeline: &Pipeline, json: bool) -> Result<()> {
        let jobs: Vec<JobSummary> = pipeline.jobs.iter().map(JobSummary::of).collect();
        if json {
            let mut out = serde_json::json!({ "jobs": jobs });
            if self.all {
                out["excluded"] = serde_json::to_value(&pipeline.excluded)?;
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok(());
        }
        for j in &jobs {
            println!("{}", line(j));
        }
        if self.all {
            for e in &pipeline.excluded {
                println!("{:<40} excluded: {}", e.name, e.reason);
            }
        }
        Ok(())
    }
}

/// One `--list` line.
fn line(j: &JobSummary) -> String {
    let needs = j.needs.join(",");
    let when = match j.start_in_s {
        Some(s) => format!("delayed start_in={s}s"),
        None => kiln_pipelines::when_name(j.when).to_string(),
    };
    let af = match &j.allow_failure {
        kiln_pipelines::AllowFailure::No => "no".to_string(),
        kiln_pipelines::AllowFailure::Yes => "yes".to_string(),
        kiln_pipelines::AllowFailure::ExitCodes(c) => {
            let c: Vec<String> = c.iter().map(i32::to_string).collect();
            format!("exit:{}", c.join(","))
        }
    };
    let id = if j.id == j.name {
        String::new()
    } else {
        format!(" id={}", j.id)
    };
    format!(
        "{:<40} stage={:<10} image={:<30} when={when} allow_failure={af} needs={}{id}",
        j.name,
        j.stage.as_deref().unwrap_or("-"),
        j.image,
        if needs.is_empty() { "-" } else { &needs }
    )
}
