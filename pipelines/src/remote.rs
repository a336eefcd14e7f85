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
