//! GitLab `include: project` and `include: component` for `kiln run-job
//! --gitlab-url URL`: files of other projects are read through the GitLab
//! REST API (v4) with the remote-include fetcher, so they have the same
//! bounds (size checked before and while reading, timeout, at most 5
//! redirects, HTTP(S) only) and the same cache (`--offline` reads it):
//!
//! - a file: `GET /api/v4/projects/:id/repository/files/:path/raw?ref=REF`;
//! - without `ref:`, the project's default branch first:
//!   `GET /api/v4/projects/:id` (`default_branch`);
//! - a component's `~latest` or partial version: the release tags,
//!   `GET /api/v4/projects/:id/releases?per_page=100`.
//!
//! The token (`--gitlab-token`/`GITLAB_TOKEN`) goes in `Authorization:
//! Bearer` (GitLab accepts personal, project and group access tokens
//! there), marked sensitive; it is never printed, logged or cached (the
//! cache is keyed by the URL).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::Mutex;

use super::remote_include::{RemoteFetcher, RemoteIncludeError};

/// Release tags read for a component's `~latest` (one page).
const RELEASES_PER_PAGE: usize = 100;

/// A GitLab access token; its `Debug` does not show it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(***)")
    }
}

impl FromStr for Token {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Token(s.trim().to_string()))
    }
}

/// Why the server URL is not usable.
#[derive(Debug, thiserror::Error)]
#[error(
    "--gitlab-url `{0}`: expected the server's http:// or https:// URL, such as https://gitlab.com"
)]
pub struct BadServerUrl(String);

/// A GitLab server reached through its API (the
/// [`kiln_pipelines::GitlabFiles`] that `kiln run-job` gives).
pub struct GitlabClient {
    /// The server (`https://gitlab.example.com`, maybe with a path).
    base: reqwest::Url,
    host: String,
    token: Option<Token>,
    fetcher: RemoteFetcher,
    /// Default branches already read, by project.
    default_branches: Mutex<HashMap<String, String>>,
}

impl fmt::Debug for GitlabClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitlabClient")
            .field("base", &self.base.as_str())
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl GitlabClient {
    /// A client of the server at `url` that fetches (and caches) with
    /// `fetcher`.
    pub fn new(
        url: &str,
        token: Option<Token>,
        fetcher: RemoteFetcher,
    ) -> Result<Self, BadServerUrl> {
        let bad = || BadServerUrl(url.chars().take(200).collect());
        let base = reqwest::Url::parse(url.trim()).map_err(|_| bad())?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(bad());
        }
        let host = base.host_str().ok_or_else(bad)?.to_string();
        Ok(GitlabClient {
            base,
            host,
            token: token.filter(|t| !t.0.is_empty()),
            fetcher,
            default_branches: Mutex::new(HashMap::new()),
        })
    }

    /// `<base>/api/v4/projects/<project, encoded>/<rest...>` with `query`.
    fn api_url(&self, project: &str, rest: &[&str], query: &[(&str, &str)]) -> String {
        let mut url = self.base.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            // `push` encodes a `/` inside a segment as %2F, as the API
            // wants for project ids and file paths.
            segs.pop_if_empty()
                .extend(["api", "v4", "projects", project])
                .extend(rest);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url.to_string()
    }

    fn get(&self, url: &str, what: &str) -> io::Result<String> {
        self.fetcher
            .fetch_with(url, self.token.as_ref().map(Token::as_str))
            .map_err(|e| self.explain(e, what))
    }

    /// The fetch error as an `io::Error` that says what was asked for;
    /// a missing file or project is `NotFound`.
    fn explain(&self, e: RemoteIncludeError, what: &str) -> io::Error {
        let kind = match &e {
            RemoteIncludeError::Status(s) if *s == reqwest::StatusCode::NOT_FOUND => {
                io::ErrorKind::NotFound
            }
            RemoteIncludeError::NotCached(_) => io::ErrorKind::NotFound,
            _ => io::ErrorKind::Other,
        };
        let msg = match &e {
            RemoteIncludeError::Status(s)
                if matches!(s.as_u16(), 401 | 403 | 404) && self.token.is_none() =>
            {
                format!(
                    "{what}: {} answered {s}; a private project needs a token: set GITLAB_TOKEN \
                     (or --gitlab-token) to an access token with the read_api scope",
                    self.host
                )
            }
            RemoteIncludeError::Status(s) if matches!(s.as_u16(), 401 | 403 | 404) => format!(
                "{what}: {} answered {s}; check the project path, file and ref, and that the \
                 token can read the project (read_api scope)",
                self.host
            ),
            RemoteIncludeError::Status(s) => format!("{what}: {} answered {s}", self.host),
            _ => format!("{what}: {e}"),
        };
        io::Error::new(kind, msg)
    }

    /// `project`'s default branch (`GET /projects/:id`), read once.
    fn default_branch(&self, project: &str) -> io::Result<String> {
        if let Some(b) = self.lock().get(project) {
            return Ok(b.clone());
        }
        #[derive(serde::Deserialize)]
        struct Project {
            default_branch: Option<String>,
        }
        let what = format!("project {project}");
        let text = self.get(&self.api_url(project, &[], &[]), &what)?;
        let p: Project = serde_json::from_str(&text).map_err(|e| {
            io::Error::other(format!(
                "{what}: the server's answer is not a GitLab project: {e}"
            ))
        })?;
        let branch = p.default_branch.filter(|b| !b.is_empty()).ok_or_else(|| {
            io::Error::other(format!(
                "{what} has no default branch (an empty repository?)"
            ))
        })?;
        self.lock().insert(project.to_string(), branch.clone());
        Ok(branch)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.default_branches
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl kiln_pipelines::GitlabFiles for GitlabClient {
    fn host(&self) -> &str {
        &self.host
    }

    fn file(&self, project: &str, file: &str, git_ref: Option<&str>) -> io::Result<String> {
        let git_ref = match git_ref {
            Some(r) => r.to_string(),
            None => self.default_branch(project)?,
        };
        let url = self.api_url(
            project,
            &["repository", "files", file, "raw"],
            &[("ref", &git_ref)],
        );
        self.get(
            &url,
            &format!("file {file} of project {project} at {git_ref}"),
        )
    }

    fn releases(&self, project: &str) -> io::Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Release {
            tag_name: String,
        }
        let what = format!("the releases of project {project}");
        let per_page = RELEASES_PER_PAGE.to_string();
        let url = self.api_url(project, &["releases"], &[("per_page", &per_page)]);
        let text = self.get(&url, &what)?;
        let releases: Vec<Release> = serde_json::from_str(&text).map_err(|e| {
            io::Error::other(format!(
                "{what}: the server's answer is not a release list: {e}"
            ))
        })?;
        Ok(releases.into_iter().map(|r| r.tag_name).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use kiln_pipelines::{GitlabFiles, LocalContext, Options};

    use super::super::test_http::{ok, serve_owned, Server};
    use super::*;

    const TOKEN: &str = "glpat-secret-token-123";

    fn client(server: &str, cache: &Path, offline: bool, token: Option<&str>) -> GitlabClient {
        let fetcher =
            RemoteFetcher::new(cache, offline, 4096).with_timeout(Duration::from_secs(20));
        GitlabClient::new(server, token.map(|t| Token(t.into())), fetcher).unwrap()
    }

    /// A fake GitLab: project `group/ci` (default branch `trunk`) and the
    /// component project `comp/go` with releases.
    fn fake_gitlab() -> Server {
        let routes = vec![
            (
                "/api/v4/projects/group%2Fci".to_string(),
                ok(r#"{"id": 7, "path_with_namespace": "group/ci", "default_branch": "trunk"}"#),
            ),
            (
                "/api/v4/projects/group%2Fci/repository/files/ci%2Fbuild.yml/raw?ref=trunk"
                    .to_string(),
                ok("include: /ci/common.yml\n.build:\n  script: make\n"),
            ),
            (
                "/api/v4/projects/group%2Fci/repository/files/ci%2Fcommon.yml/raw?ref=trunk"
                    .to_string(),
                ok("variables: {FROM: trunk}\n"),
            ),
            (
                "/api/v4/projects/group%2Fci/repository/files/ci%2Fbuild.yml/raw?ref=v1"
                    .to_string(),
                ok(".build:\n  script: make-v1\n"),
            ),
            (
                "/api/v4/projects/comp%2Fgo/releases?per_page=100".to_string(),
                ok(r#"[{"tag_name": "1.2.0"}, {"tag_name": "1.10.0"}, {"tag_name": "0.9.0"}]"#),
            ),
            (
                "/api/v4/projects/comp%2Fgo/repository/files/templates%2Fbuild%2Ftemplate.yml/raw?ref=1.10.0"
                    .to_string(),
                ok("go-build:\n  script: go build\n"),
            ),
        ];
        serve_owned(routes)
    }

    fn parse(
        main: &str,
        api: GitlabClient,
    ) -> Result<kiln_pipelines::gitlab::GitlabPipeline, String> {
        let opts = Options {
            gitlab_api: kiln_pipelines::GitlabApi::with(api),
            ..Default::default()
        };
        let ctx = LocalContext::new("/nonexistent", "p");
        kiln_pipelines::gitlab::parse(".gitlab-ci.yml", main, &ctx, &opts, &|_| {
            Err(io::Error::other("no local files"))
        })
        .map_err(|e| match std::error::Error::source(&e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        })
    }

    #[test]
    fn project_files_and_components_come_through_the_api_and_the_cache() {
        let cache = tempfile::tempdir().unwrap();
        let server = fake_gitlab();
        let main = "include:\n  - project: group/ci\n    file: /ci/build.yml\n\
                    \x20 - component: 127.0.0.1/comp/go/build@~latest\n\
                    b:\n  extends: .build\n";
        let p = parse(main, client(&server.url, cache.path(), false, Some(TOKEN))).unwrap();
        let names: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["go-build", "b"]);
        assert!(p.job("b").unwrap().steps[0].script.contains("make"));
        assert_eq!(
            *server.hits.lock().unwrap(),
            [
                "/api/v4/projects/group%2Fci",
                "/api/v4/projects/group%2Fci/repository/files/ci%2Fbuild.yml/raw?ref=trunk",
                "/api/v4/projects/group%2Fci/repository/files/ci%2Fcommon.yml/raw?ref=trunk",
                "/api/v4/projects/comp%2Fgo/releases?per_page=100",
                // templates/build.yml is not there (404): the folder form is.
                "/api/v4/projects/comp%2Fgo/repository/files/templates%2Fbuild.yml/raw?ref=1.10.0",
                "/api/v4/projects/comp%2Fgo/repository/files/templates%2Fbuild%2Ftemplate.yml/raw?ref=1.10.0",
            ]
        );
        // Every request carried the token.
        assert!(server
            .auth
            .lock()
            .unwrap()
            .iter()
            .all(|a| a.as_deref() == Some(&format!("Bearer {TOKEN}") as &str)));
        drop(server);
        // The cache is keyed by URL: the token was written nowhere.
        for entry in std::fs::read_dir(cache.path().join("remote-includes")).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            assert!(!text.contains(TOKEN));
        }
    }

    #[test]
    fn offline_reads_what_an_online_run_cached() {
        let cache = tempfile::tempdir().unwrap();
        let server = fake_gitlab();
        let url = server.url.clone();
        let main = "include:\n  - project: group/ci\n    ref: v1\n    file: ci/build.yml\n\
                    b:\n  extends: .build\n";
        parse(main, client(&url, cache.path(), false, None)).unwrap();
        drop(server);
        let p = parse(main, client(&url, cache.path(), true, None)).unwrap();
        assert!(p.job("b").unwrap().steps[0].script.contains("make-v1"));
    }

    #[test]
    fn errors_say_what_was_asked_and_what_to_do() {
        let cache = tempfile::tempdir().unwrap();
        let server = fake_gitlab();
        let e = parse(
            "include:\n  - project: group/ci\n    ref: v9\n    file: ci/build.yml\n",
            client(&server.url, cache.path(), false, None),
        )
        .unwrap_err();
        assert_eq!(
            e,
            ".gitlab-ci.yml:2:3: cannot read included file `group/ci/ci/build.yml@v9`: file \
             ci/build.yml of project group/ci at v9: 127.0.0.1 answered 404 Not Found; a private \
             project needs a token: set GITLAB_TOKEN (or --gitlab-token) to an access token with \
             the read_api scope"
        );
        let api = client(&server.url, cache.path(), false, Some(TOKEN));
        let e = api.file("nope/nope", "x.yml", None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(
            e.to_string()
                .contains("check the project path, file and ref"),
            "{e}"
        );
        assert!(!format!("{e} {api:?}").contains(TOKEN));
        assert!(GitlabClient::new("ftp://x", None, api.fetcher.clone()).is_err());
    }

    #[test]
    fn the_token_is_not_sent_to_another_host() {
        let cache = tempfile::tempdir().unwrap();
        let other = serve_owned(vec![("/x.yml".into(), ok("x:\n  script: x\n"))]);
        let moved = format!(
            "HTTP/1.1 302 Found\r\nLocation: {}/x.yml\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            other.url
        );
        let server = serve_owned(vec![(
            "/api/v4/projects/g%2Fp/repository/files/x.yml/raw?ref=main".into(),
            moved,
        )]);
        let api = client(&server.url, cache.path(), false, Some(TOKEN));
        assert_eq!(
            api.file("g/p", "x.yml", Some("main")).unwrap(),
            "x:\n  script: x\n"
        );
        assert_eq!(
            server.auth.lock().unwrap()[0].as_deref(),
            Some(&format!("Bearer {TOKEN}") as &str)
        );
        assert_eq!(*other.auth.lock().unwrap(), [None]);
    }
}
