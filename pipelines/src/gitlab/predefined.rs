//! GitLab's predefined variables that a local checkout can answer: the
//! project (from the `origin` remote URL), the ref and the kind of pipeline
//! (branch push, tag, merge request, schedule, ...: [`Pipeline`]), the
//! commit and the user. Values GitLab's server would know and a checkout
//! cannot (ids, tokens, the registry of a self-managed instance) are set to
//! a plausible value only where pipelines commonly compare them; the
//! caller's `--var` overrides every one.

use crate::context::{LocalContext, Options};

/// What GitLab's server knows about the project, derived from a remote URL
/// (`git@host:group/sub/proj.git`, `https://host/group/proj`,
/// `ssh://git@host:2222/group/proj.git`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Project {
    pub host: String,
    /// `group/sub/proj`.
    pub path: String,
}

impl Project {
    pub(crate) fn from_remote(url: &str) -> Option<Project> {
        let url = url.trim();
        let (host, path) = if let Some((scheme, rest)) = url.split_once("://") {
            if !matches!(scheme, "https" | "http" | "ssh" | "git") {
                return None;
            }
            let (authority, path) = rest.split_once('/')?;
            let host = authority.rsplit('@').next()?;
            // `ssh://host:2222/...` has a port; an https URL keeps it.
            let host = if scheme == "ssh" || scheme == "git" {
                host.split(':').next()?
            } else {
                host
            };
            (host.to_string(), path.to_string())
        } else {
            // scp-like: `[user@]host:path`.
            let (authority, path) = url.split_once(':')?;
            if authority.contains('/') {
                return None;
            }
            let host = authority.rsplit('@').next()?;
            (host.to_string(), path.to_string())
        };
        let path = path.trim_matches('/');
        let path = path.strip_suffix(".git").unwrap_or(path).to_string();
        let ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.~/:".contains(c))
        };
        if !ok(&host) || !ok(&path) || !path.contains('/') || path.split('/').any(|p| p == "..") {
            return None;
        }
        Some(Project { host, path })
    }

    fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    fn namespace(&self) -> &str {
        self.path.rsplit_once('/').map(|(n, _)| n).unwrap_or("")
    }
}

/// The kind of pipeline being simulated, from the context and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pipeline {
    /// `CI_PIPELINE_SOURCE`.
    pub source: String,
    /// The branch of a branch pipeline (or the source branch of a merge
    /// request pipeline).
    pub branch: Option<String>,
    /// The tag of a tag pipeline.
    pub tag: Option<String>,
}

impl Pipeline {
    pub(crate) fn of(ctx: &LocalContext, opts: &Options) -> Pipeline {
        Pipeline {
            source: opts.pipeline_source.clone(),
            branch: if ctx.tag.is_some() {
                None
            } else {
                ctx.branch.clone()
            },
            tag: ctx.tag.clone(),
        }
    }

    pub(crate) fn is_merge_request(&self) -> bool {
        self.source == "merge_request_event"
    }

    /// A branch pipeline (GitLab's `pipeline.branch?`): not a tag, not a
    /// merge request. A detached checkout without a tag counts as a branch
    /// pipeline whose branch name is unknown (it matches no name).
    pub(crate) fn is_branch(&self) -> bool {
        self.tag.is_none() && !self.is_merge_request()
    }

    pub(crate) fn is_tag(&self) -> bool {
        self.tag.is_some()
    }

    /// The ref the pipeline runs for.
    pub(crate) fn ref_name(&self) -> Option<&str> {
        self.tag.as_deref().or(self.branch.as_deref())
    }

    /// The names `only`/`except` use for the source (`schedules`, ...),
    /// singular and plural, as GitLab's `Policy::Refs` spells them.
    pub(crate) fn source_names(&self) -> [String; 2] {
        let s = self.source.strip_suffix("_event").unwrap_or(&self.source);
        let plural = if s.ends_with('h') {
            format!("{s}es")
        } else {
            format!("{s}s")
        };
        [s.to_string(), plural]
    }
}

/// The predefined variables of the pipeline (not of one job), lowest
/// precedence: the caller's variables and the file's override them.
pub(crate) fn pipeline_vars(ctx: &LocalContext, opts: &Options) -> Vec<(String, String)> {
    let pipe = Pipeline::of(ctx, opts);
    let mut v: Vec<(&str, String)> = vec![
        ("CI", "true".into()),
        ("GITLAB_CI", "true".into()),
        ("CI_SERVER", "yes".into()),
        ("CI_DISPOSABLE_ENVIRONMENT", "true".into()),
        ("CI_PIPELINE_SOURCE", pipe.source.clone()),
        ("CI_PIPELINE_ID", "1".into()),
        ("CI_PIPELINE_IID", "1".into()),
        ("CI_PROJECT_DIR", ctx.guest_dir.clone()),
        ("CI_BUILDS_DIR", parent_dir(&ctx.guest_dir)),
        ("CI_COMMIT_SHA", ctx.commit_sha.clone()),
        ("CI_COMMIT_SHORT_SHA", ctx.short_sha()),
        (
            "CI_COMMIT_BEFORE_SHA",
            "0000000000000000000000000000000000000000".into(),
        ),
        ("CI_COMMIT_REF_PROTECTED", "false".into()),
    ];
    let project = ctx.remote_url.as_deref().and_then(Project::from_remote);
    match &project {
        Some(p) => {
            let server = format!("https://{}", p.host);
            let registry = if p.host == "gitlab.com" {
                "registry.gitlab.com".to_string()
            } else {
                format!("registry.{}", p.host)
            };
            v.extend([
                ("CI_PROJECT_NAME", p.name().to_string()),
                ("CI_PROJECT_PATH", p.path.clone()),
                ("CI_PROJECT_PATH_SLUG", slug_n(&p.path, usize::MAX)),
                ("CI_PROJECT_NAMESPACE", p.namespace().to_string()),
                (
                    "CI_PROJECT_ROOT_NAMESPACE",
                    p.path.split('/').next().unwrap_or_default().to_string(),
                ),
                ("CI_PROJECT_URL", format!("{server}/{}", p.path)),
                ("CI_PROJECT_VISIBILITY", "private".into()),
                ("CI_SERVER_URL", server.clone()),
                ("CI_SERVER_HOST", p.host.clone()),
                ("CI_SERVER_PROTOCOL", "https".into()),
                ("CI_SERVER_PORT", "443".into()),
                ("CI_SERVER_FQDN", p.host.clone()),
                ("CI_API_V4_URL", format!("{server}/api/v4")),
                ("CI_REGISTRY", registry.clone()),
                (
                    "CI_REGISTRY_IMAGE",
                    format!("{registry}/{}", p.path.to_lowercase()),
                ),
                ("CI_PAGES_DOMAIN", format!("{}.io", p.host)),
            ]);
        }
        None => v.push(("CI_PROJECT_NAME", ctx.project_name.clone())),
    }
    if let Some(b) = &ctx.default_branch {
        v.push(("CI_DEFAULT_BRANCH", b.clone()));
    }
    if let Some(r) = pipe.ref_name() {
        v.push(("CI_COMMIT_REF_NAME", r.to_string()));
        v.push(("CI_COMMIT_REF_SLUG", slug(r)));
    }
    if pipe.is_branch() {
        if let Some(b) = &pipe.branch {
            v.push(("CI_COMMIT_BRANCH", b.clone()));
        }
    }
    if let Some(t) = &pipe.tag {
        v.push(("CI_COMMIT_TAG", t.clone()));
    }
    if pipe.is_merge_request() {
        let source = pipe.branch.clone().unwrap_or_default();
        let target = ctx.default_branch.clone().unwrap_or_else(|| "main".into());
        v.extend([
            ("CI_MERGE_REQUEST_ID", "1".into()),
            ("CI_MERGE_REQUEST_IID", "1".into()),
            ("CI_MERGE_REQUEST_EVENT_TYPE", "detached".into()),
            ("CI_MERGE_REQUEST_SOURCE_BRANCH_NAME", source),
            ("CI_MERGE_REQUEST_SOURCE_BRANCH_SHA", ctx.commit_sha.clone()),
            ("CI_MERGE_REQUEST_TARGET_BRANCH_NAME", target),
            (
                "CI_MERGE_REQUEST_TITLE",
                title(ctx.commit_message.as_deref().unwrap_or_default()),
            ),
        ]);
        if let Some(p) = &project {
            v.push(("CI_MERGE_REQUEST_PROJECT_PATH", p.path.clone()));
        }
    }
    if let Some(m) = &ctx.commit_message {
        v.push(("CI_COMMIT_MESSAGE", m.clone()));
        v.push(("CI_COMMIT_TITLE", title(m)));
        v.push(("CI_COMMIT_DESCRIPTION", description(m)));
    }
    if let Some(t) = &ctx.commit_timestamp {
        v.push(("CI_COMMIT_TIMESTAMP", t.clone()));
    }
    if let Some(a) = &ctx.commit_author {
        v.push(("CI_COMMIT_AUTHOR", a.clone()));
    }
    if let Some(u) = &ctx.user_login {
        v.push(("GITLAB_USER_LOGIN", u.clone()));
    }
    if let Some(u) = &ctx.user_name {
        v.push(("GITLAB_USER_NAME", u.clone()));
    }
    if let Some(u) = &ctx.user_email {
        v.push(("GITLAB_USER_EMAIL", u.clone()));
    }
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn title(message: &str) -> String {
    message.lines().next().unwrap_or_default().to_string()
}

fn description(message: &str) -> String {
    match message.split_once('\n') {
        Some((_, rest)) => rest.trim_start_matches('\n').to_string(),
        None => String::new(),
    }
}

/// GitLab's `CI_COMMIT_REF_SLUG`: lowercased, non-alphanumerics to `-`,
/// at most 63 characters, no leading or trailing `-`.
pub(crate) fn slug(s: &str) -> String {
    slug_n(s, 63)
}

fn slug_n(s: &str, n: usize) -> String {
    let lower: String = s
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(n)
        .collect();
    lower.trim_matches('-').to_string()
}

pub(crate) fn parent_dir(p: &str) -> String {
    match p.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/".to_string(),
        Some((parent, _)) => parent.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{ctx, job, names, parse_with, var};
    use super::*;

    #[test]
    fn remotes_of_every_form_give_the_project() {
        for url in [
            "git@gitlab.com:group/sub/proj.git",
            "https://gitlab.com/group/sub/proj.git",
            "https://user:token@gitlab.com/group/sub/proj",
            "ssh://git@gitlab.com:2222/group/sub/proj.git",
        ] {
            let p = Project::from_remote(url).unwrap_or_else(|| panic!("{url}"));
            assert_eq!(p.host, "gitlab.com", "{url}");
            assert_eq!(p.path, "group/sub/proj", "{url}");
            assert_eq!(p.namespace(), "group/sub");
            assert_eq!(p.name(), "proj");
        }
        for bad in [
            "/srv/git/proj",
            "proj",
            "file:///x/y",
            "https://h/../etc/x",
            "h:a b/c",
        ] {
            assert_eq!(Project::from_remote(bad), None, "{bad}");
        }
    }

    #[test]
    fn project_ref_and_user_variables_come_from_the_checkout() {
        let mut c = ctx();
        c.remote_url = Some("git@gitlab.example.org:Infra/Tools/Deployer.git".into());
        c.default_branch = Some("main".into());
        c.user_login = Some("alice".into());
        c.commit_message = Some("Fix it\n\nLonger text\n".into());
        let p = parse_with(
            "workflow:\n  rules:\n    - if: $CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH\n\
             j:\n  script: x\n",
            &c,
            &Options::default(),
            &[],
        )
        .unwrap();
        let j = job(&p, "j");
        for (k, want) in [
            ("CI_PROJECT_PATH", "Infra/Tools/Deployer"),
            ("CI_PROJECT_NAMESPACE", "Infra/Tools"),
            ("CI_PROJECT_NAME", "Deployer"),
            ("CI_PROJECT_PATH_SLUG", "infra-tools-deployer"),
            (
                "CI_PROJECT_URL",
                "https://gitlab.example.org/Infra/Tools/Deployer",
            ),
            ("CI_SERVER_URL", "https://gitlab.example.org"),
            (
                "CI_REGISTRY_IMAGE",
                "registry.gitlab.example.org/infra/tools/deployer",
            ),
            ("CI_DEFAULT_BRANCH", "main"),
            ("GITLAB_USER_LOGIN", "alice"),
            ("CI_COMMIT_TITLE", "Fix it"),
            ("CI_COMMIT_DESCRIPTION", "Longer text\n"),
            ("CI_PIPELINE_SOURCE", "push"),
        ] {
            assert_eq!(var(j, k), Some(want), "{k}");
        }
        assert_eq!(var(j, "CI_COMMIT_TAG"), None);
    }

    #[test]
    fn tag_and_merge_request_pipelines_set_their_refs() {
        let mut c = ctx();
        c.tag = Some("v1.2.0".into());
        let text = "j:\n  script: x\n";
        let p = parse_with(text, &c, &Options::default(), &[]).unwrap();
        let j = job(&p, "j");
        assert_eq!(var(j, "CI_COMMIT_TAG"), Some("v1.2.0"));
        assert_eq!(var(j, "CI_COMMIT_REF_NAME"), Some("v1.2.0"));
        assert_eq!(var(j, "CI_COMMIT_REF_SLUG"), Some("v1-2-0"));
        assert_eq!(var(j, "CI_COMMIT_BRANCH"), None);

        let opts = Options {
            pipeline_source: "merge_request_event".into(),
            ..Options::default()
        };
        let text = "j:\n  script: x\n  rules:\n    - if: $CI_MERGE_REQUEST_IID\n";
        let p = parse_with(text, &ctx(), &opts, &[]).unwrap();
        assert_eq!(names(&p), ["j"]);
        let j = job(&p, "j");
        assert_eq!(var(j, "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME"), Some("main"));
        assert_eq!(var(j, "CI_COMMIT_BRANCH"), None);
        assert_eq!(var(j, "CI_COMMIT_REF_NAME"), Some("main"));
    }

    #[test]
    fn source_names_follow_gitlab_spelling() {
        let p = |s: &str| Pipeline {
            source: s.into(),
            branch: None,
            tag: None,
        };
        assert_eq!(
            p("merge_request_event").source_names(),
            ["merge_request", "merge_requests"]
        );
        assert_eq!(p("schedule").source_names(), ["schedule", "schedules"]);
        assert_eq!(p("push").source_names(), ["push", "pushes"]);
    }

    #[test]
    fn slug_and_parent_dir() {
        assert_eq!(slug("--A/b.c--"), "a-b-c");
        assert_eq!(slug(&"x".repeat(70)).len(), 63);
        assert_eq!(parent_dir("/builds/demo/"), "/builds");
        assert_eq!(parent_dir("/demo"), "/");
        assert_eq!(parent_dir("demo"), "/");
    }
}
