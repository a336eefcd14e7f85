//! `include: remote`: the caller reads remote files (this crate does no
//! network I/O). `kiln run-job` gives a fetcher that uses HTTP(S) and a
//! cache (`runner/src/local/remote_include.rs`); without one, remote
//! includes are skipped with a warning.

use std::fmt;
use std::io;
use std::sync::Arc;

/// A function from a URL (`http://` or `https://`, checked before it is
/// called) to the file's text. Its error says why the file cannot be read;
/// the front end names the URL and the include entry.
pub type FetchFn = dyn Fn(&str) -> io::Result<String> + Send + Sync;

/// How `include: remote` files are read: [`RemoteIncludes::none`] (the
/// default) skips them with a warning.
#[derive(Clone, Default)]
pub struct RemoteIncludes(Option<Arc<FetchFn>>);

impl RemoteIncludes {
    /// Remote includes are skipped with a warning.
    pub fn none() -> Self {
        RemoteIncludes(None)
    }

    /// Remote includes are read with `fetch`.
    pub fn with(fetch: impl Fn(&str) -> io::Result<String> + Send + Sync + 'static) -> Self {
        RemoteIncludes(Some(Arc::new(fetch)))
    }

    /// The fetcher, if one was given.
    pub(crate) fn fetcher(&self) -> Option<&FetchFn> {
        self.0.as_deref()
    }
}

impl fmt::Debug for RemoteIncludes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "RemoteIncludes(fetched)",
            None => "RemoteIncludes(skipped)",
        })
    }
}

/// Two options are equal when both skip remote includes or both use the
/// same fetcher.
impl PartialEq for RemoteIncludes {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for RemoteIncludes {}

/// Reads files of other GitLab projects through the GitLab API, for
/// `include: project` and `include: component` (`kiln run-job` gives one
/// when a server URL is given: `runner/src/local/gitlab_include.rs`). Like
/// [`FetchFn`], an implementation does the network I/O and its errors say
/// what failed; the front end bounds what it returns and names the entry.
pub trait GitlabFiles: Send + Sync {
    /// The server's host name (`CI_SERVER_FQDN`): components must name it.
    fn host(&self) -> &str;

    /// The text of `file` (a path in the repository, without a leading
    /// `/`) of `project` (`group/name`) at `git_ref`, or at the project's
    /// default branch when `None`. A file or project that does not exist
    /// is an error of kind [`io::ErrorKind::NotFound`].
    fn file(&self, project: &str, file: &str, git_ref: Option<&str>) -> io::Result<String>;

    /// The tags of `project`'s releases (for a component's `~latest` or
    /// partial version), at most as many as the implementation reads.
    fn releases(&self, project: &str) -> io::Result<Vec<String>>;
}

/// How `include: project` and `include: component` reach a GitLab server:
/// [`GitlabApi::none`] (the default) skips them with a warning unless
/// `--include-project` maps the project to a local checkout.
#[derive(Clone, Default)]
pub struct GitlabApi(Option<Arc<dyn GitlabFiles>>);

impl GitlabApi {
    /// No server: such includes are skipped with a warning.
    pub fn none() -> Self {
        GitlabApi(None)
    }

    /// Such includes are read through `files`.
    pub fn with(files: impl GitlabFiles + 'static) -> Self {
        GitlabApi(Some(Arc::new(files)))
    }

    /// The server, if one was given.
    pub(crate) fn files(&self) -> Option<&dyn GitlabFiles> {
        self.0.as_deref()
    }
}

impl fmt::Debug for GitlabApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(api) => write!(f, "GitlabApi({})", api.host()),
            None => f.write_str("GitlabApi(none)"),
        }
    }
}

/// Two options are equal when both have no server or both the same one.
impl PartialEq for GitlabApi {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for GitlabApi {}
