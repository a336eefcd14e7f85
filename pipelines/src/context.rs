//! What a local run knows about the checkout, and parse options.

use std::path::PathBuf;

use crate::github::RunnerImages;
use crate::limits::Limits;
use crate::remote::{GitlabApi, RemoteIncludes};

/// Facts about the local checkout that the caller reads (from git) and
/// passes in: this crate spawns no processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalContext {
    /// Host directory of the checkout. GitLab `include: local` paths are
    /// relative to it, and jobs get it as `JobSource::LocalDir`.
    pub project_dir: PathBuf,
    /// `CI_PROJECT_NAME` / `github.repository`.
    pub project_name: String,
    /// Full commit id (may be empty when unknown).
    pub commit_sha: String,
    /// Current branch; `None` on a detached HEAD.
    pub branch: Option<String>,
    /// Variables given on the command line. They take precedence over
    /// every variable defined in the file (like GitLab pipeline variables)
    /// and are visible to `rules: if` and GitHub `vars.*`.
    pub extra_vars: Vec<(String, String)>,
    /// Secrets given on the command line (also in `extra_vars`): GitHub's
    /// `secrets` context, passed to a reusable workflow only with
    /// `secrets: inherit` or by name.
    pub secrets: Vec<(String, String)>,
    /// Where the checkout appears inside the guest (`CI_PROJECT_DIR`,
    /// `GITHUB_WORKSPACE`, each job's `working_dir`).
    pub guest_dir: String,
    /// The tag the pipeline runs for (a tag pipeline: `CI_COMMIT_TAG`, no
    /// `CI_COMMIT_BRANCH`); `None` for a branch pipeline.
    pub tag: Option<String>,
    /// URL of the `origin` remote: the project path, server and registry
    /// (`CI_PROJECT_PATH`, `CI_SERVER_URL`, `CI_REGISTRY_IMAGE`, ...).
    pub remote_url: Option<String>,
    /// The remote's default branch (`CI_DEFAULT_BRANCH`).
    pub default_branch: Option<String>,
    /// The commit's full message, author (`Name <email>`) and ISO 8601
    /// time (`CI_COMMIT_MESSAGE`/`_TITLE`/`_DESCRIPTION`, `_AUTHOR`,
    /// `_TIMESTAMP`).
    pub commit_message: Option<String>,
    pub commit_author: Option<String>,
    pub commit_timestamp: Option<String>,
    /// Who runs the pipeline (`GITLAB_USER_LOGIN`, `_NAME`, `_EMAIL`).
    pub user_login: Option<String>,
    pub user_name: Option<String>,
    pub user_email: Option<String>,
}

impl LocalContext {
    /// A context with an unknown commit, no branch and the guest directory
    /// `/builds/<project_name>` (GitLab's layout).
    pub fn new(project_dir: impl Into<PathBuf>, project_name: impl Into<String>) -> Self {
        let project_name = project_name.into();
        LocalContext {
            project_dir: project_dir.into(),
            guest_dir: format!("/builds/{project_name}"),
            project_name,
            commit_sha: String::new(),
            branch: None,
            extra_vars: Vec::new(),
            secrets: Vec::new(),
            tag: None,
            remote_url: None,
            default_branch: None,
            commit_message: None,
            commit_author: None,
            commit_timestamp: None,
            user_login: None,
            user_name: None,
            user_email: None,
        }
    }

    pub(crate) fn short_sha(&self) -> String {
        self.commit_sha.chars().take(8).collect()
    }
}

/// Parse options that are not facts about the checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Image for GitLab jobs that name none (GitLab.com's default is `ruby:3.1`).
    pub gitlab_default_image: String,
    /// `runs-on` label to image map for GitHub jobs (act's `-P`).
    pub runner_images: RunnerImages,
    /// GitHub: fail on `uses:` steps kiln cannot run, instead of listing them
    /// in `Workflow::unsupported`.
    pub strict: bool,
    /// GitHub: leave out `uses:` steps kiln cannot run (noted). Without it
    /// such a step fails its job with a message that says so.
    pub skip_unsupported_actions: bool,
    /// The image of every job, whatever the file says (`--image`); GitHub
    /// jobs whose `runs-on` has no mapping then run too.
    pub image: Option<String>,
    /// GitHub `github.event_name` (default `push`).
    pub event_name: String,
    /// GitLab `CI_PIPELINE_SOURCE` (default `push`): `merge_request_event`,
    /// `schedule`, `web`, `api`, `trigger`, ...; decides `rules` and
    /// `only`/`except` as on GitLab.
    pub pipeline_source: String,
    /// Bounds on the file and on what it expands to.
    pub limits: Limits,
    /// CI/CD inputs (`--input k=v`) as text, converted to each input's
    /// declared type: GitLab `spec: inputs` of the main file, GitHub
    /// `workflow_call`/`workflow_dispatch` inputs.
    pub inputs: Vec<(String, String)>,
    /// GitLab `include: project` paths mapped to local checkouts
    /// (`--include-project group/proj=DIR`).
    pub include_projects: Vec<(String, PathBuf)>,
    /// GitLab `include: template` read from this folder
    /// (`--include-template-dir DIR`: `DIR/Jobs/Build.gitlab-ci.yml` for
    /// `template: Jobs/Build.gitlab-ci.yml`); without it they are skipped
    /// with a warning.
    pub include_template_dir: Option<PathBuf>,
    /// GitLab jobs (names or keys) to keep even when their `rules`,
    /// `only`/`except` or the `workflow: rules` leave them out (`kiln
    /// run-job --force`); a warning names the clause.
    pub force_jobs: Vec<String>,
    /// GitLab `include: remote`: how the files are fetched (`kiln run-job`
    /// gives HTTP(S) with a cache); by default they are skipped with a
    /// warning.
    pub remote_includes: RemoteIncludes,
    /// GitLab `include: project` (of projects `include_projects` does not
    /// map) and `include: component`: read through this server's API
    /// (`kiln run-job --gitlab-url`); by default they are skipped with a
    /// warning.
    pub gitlab_api: GitlabApi,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            gitlab_default_image: "ruby:3.1".to_string(),
            runner_images: RunnerImages::default(),
            strict: false,
            skip_unsupported_actions: false,
            image: None,
            event_name: "push".to_string(),
            pipeline_source: "push".to_string(),
            limits: Limits::default(),
            inputs: Vec::new(),
            include_projects: Vec::new(),
            include_template_dir: None,
            force_jobs: Vec::new(),
            remote_includes: RemoteIncludes::none(),
            gitlab_api: GitlabApi::none(),
        }
    }
}
