//! Where a job's image comes from ([`ImageSource`]), and which sources a
//! front end accepts ([`ImagePolicy`]).
//!
//! An image string is parsed once, at the edge that received it, with that
//! edge's policy: `kiln run-job --image` takes host paths and registry
//! references alike ([`ImagePolicy::local`]); a CI provider's job takes
//! registry references, host paths only where the runner's configuration
//! allows them, and only images its allow-list names (as gitlab-runner's
//! `allowed_images`). A reference is never mistaken for a path: without
//! [`ImagePolicy::bare_paths`], `alpine` is `docker.io/library/alpine`
//! whatever `./alpine` is on the host, and only the syntax decides.

use std::path::{Path, PathBuf};

use crate::reference::Reference;
use crate::{quote, trunc, ImageError, MAX_SHOWN};

/// Longest image string accepted (`PATH_MAX`).
pub const MAX_IMAGE_LEN: usize = 4096;

/// Where a job's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An OCI image layout directory, optionally `dir:tag`.
    Layout { dir: PathBuf, tag: Option<String> },
    /// A `docker save` / `skopeo copy docker-archive:` tar (legacy
    /// `manifest.json` form or OCI layout in a tar), optionally `file:tag`.
    Archive { path: PathBuf, tag: Option<String> },
    /// An image in a registry.
    Registry(Reference),
}

/// Which image sources an edge accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImagePolicy {
    /// Paths on this host (OCI layout directories, image tars) may be used.
    pub allow_local: bool,
    /// With `allow_local`: a name not written as a path (`images/oci`,
    /// `alpine`) is looked up on the host first, as `kiln run-job --image`
    /// does. Without it, a host path must be absolute, without `.` or `..`
    /// components, and anything else is a registry reference.
    pub bare_paths: bool,
    /// Patterns the image must match, as gitlab-runner's `allowed_images`:
    /// `*` matches within one path component, `**` across them. A registry
    /// reference is matched as written and normalised
    /// (`docker.io/library/alpine:latest`), a path as written. Empty: any
    /// registry reference (and any path, where paths are allowed).
    pub allowed: Vec<String>,
}

/// Why an image was refused by an [`ImagePolicy`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The image names a path on this host, and the policy allows none.
    #[error("a path on the runner host, and only registry images are allowed")]
    HostPath,
    /// The image matches none of [`ImagePolicy::allowed`].
    #[error("not allowed: it matches none of the allowed images ({})", trunc(&.0.join(", "), MAX_SHOWN))]
    NotAllowed(Vec<String>),
}

impl ImagePolicy {
    /// `kiln run-job --image`: host paths (bare or not) and registry
    /// references, as the user on this host may name any.
    pub fn local() -> ImagePolicy {
        ImagePolicy {
            allow_local: true,
            bare_paths: true,
            allowed: Vec::new(),
        }
    }

    /// A CI provider's jobs: registry references matching `allowed` (any if
    /// empty), and absolute host paths where `allow_local`.
    pub fn provider(allow_local: bool, allowed: Vec<String>) -> ImagePolicy {
        ImagePolicy {
            allow_local,
            bare_paths: false,
            allowed,
        }
    }

    /// Whether any of [`allowed`](Self::allowed) matches one of `names`.
    fn allows(&self, names: &[&str]) -> bool {
        self.allowed.is_empty()
            || self
                .allowed
                .iter()
                .any(|p| names.iter().any(|n| glob_match(p, n)))
    }
}

impl ImageSource {
    /// Interpret what the user passed as `--image`: an OCI layout directory
    /// (`dir` or `dir:tag`), an image tar (`file` or `file:tag`), else a
    /// registry reference (`name[:tag][@digest]`). Same as
    /// [`parse_with`](Self::parse_with) and [`ImagePolicy::local`].
    pub fn parse(s: &str) -> Result<ImageSource, ImageError> {
        ImageSource::parse_with(s, &ImagePolicy::local())
    }

    /// Parse `s` and check it against `policy`. A refusal is
    /// [`ImageError::Refused`]; nothing on the host is looked at for a
    /// string the policy refuses, nor for a registry reference unless
    /// [`ImagePolicy::bare_paths`].
    pub fn parse_with(s: &str, policy: &ImagePolicy) -> Result<ImageSource, ImageError> {
        let bad = |reason: &str| ImageError::BadReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > MAX_IMAGE_LEN {
            return Err(bad("longer than 4096 bytes"));
        }
        if s.chars().any(char::is_control) {
            return Err(bad("it contains control characters"));
        }
        let refused = |refusal| ImageError::Refused {
            image: s.to_string(),
            refusal,
        };
        if let Some((scheme, _)) = s.split_once("://") {
            if scheme.eq_ignore_ascii_case("file") && !policy.allow_local {
                return Err(refused(Refusal::HostPath));
            }
            return Err(bad("a URL, not an image reference or a path"));
        }
        if is_path_syntax(s) {
            if !policy.allow_local {
                return Err(refused(Refusal::HostPath));
            }
            if !policy.bare_paths && !is_clean_absolute(s) {
                return Err(bad(
                    "a host path must be absolute, without `.` or `..` components",
                ));
            }
            if !policy.allows(&[s]) {
                return Err(refused(Refusal::NotAllowed(policy.allowed.clone())));
            }
            return local_source(s);
        }
        if policy.allow_local && policy.bare_paths {
            if let Some(found) = bare_local_source(s) {
                return found;
            }
        }
        let r = Reference::parse(s)?;
        if !policy.allows(&[s, &r.to_string(), &r.name_and_tag()]) {
            return Err(refused(Refusal::NotAllowed(policy.allowed.clone())));
        }
        Ok(ImageSource::Registry(r))
    }

    /// For messages.
    pub fn label(&self) -> String {
        let with_tag = |p: &Path, t: &Option<String>| match t {
            Some(t) => format!("{}:{t}", p.display()),
            None => p.display().to_string(),
        };
        match self {
            ImageSource::Layout { dir, tag } => with_tag(dir, tag),
            ImageSource::Archive { path, tag } => with_tag(path, tag),
            ImageSource::Registry(r) => r.to_string(),
        }
    }
}

/// Written as a path: absolute, `~`, `.`/`..` first, `..` anywhere, or a
/// `file:` prefix. No registry reference looks like this.
fn is_path_syntax(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with('~')
        || s.starts_with("file:")
        || s.split('/').any(|c| c == "." || c == "..")
}

/// Absolute, with no empty, `.` or `..` component.
fn is_clean_absolute(s: &str) -> bool {
    match s.strip_prefix('/') {
        Some(rest) => rest
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".."),
        None => false,
    }
}

/// `s`, known to be a path: a layout directory or an image tar, optionally
/// with `:tag`.
fn local_source(s: &str) -> Result<ImageSource, ImageError> {
    if let Some(found) = bare_local_source(s) {
        return found;
    }
    Err(ImageError::NotFound(format!(
        "{}: no such OCI layout directory or image tar",
        quote(s)
    )))
}

/// `s` as a layout directory or an image tar (`s` or `s` = `path:tag`),
/// if the host has one there.
fn bare_local_source(s: &str) -> Option<Result<ImageSource, ImageError>> {
    let p = Path::new(s);
    if p.join("oci-layout").is_file() {
        return Some(Ok(ImageSource::Layout {
            dir: p.to_path_buf(),
            tag: None,
        }));
    }
    if p.is_file() {
        return Some(Ok(ImageSource::Archive {
            path: p.to_path_buf(),
            tag: None,
        }));
    }
    if let Some((path, tag)) = s.rsplit_once(':') {
        let pp = Path::new(path);
        if pp.join("oci-layout").is_file() {
            return Some(Ok(ImageSource::Layout {
                dir: path.into(),
                tag: Some(tag.into()),
            }));
        }
        if pp.is_file() && !path.is_empty() {
            return Some(Ok(ImageSource::Archive {
                path: path.into(),
                tag: Some(tag.into()),
            }));
        }
    }
    if p.exists() {
        return Some(Err(ImageError::NotFound(format!(
            "{} is neither an OCI image layout directory (no oci-layout file) nor an image tar",
            quote(s)
        ))));
    }
    None
}

/// `text` matches `pattern`: `**` matches any run of characters, `*` any run
/// without `/`, everything else itself. Linear in `text` for each pattern
/// position (no backtracking blow-up on long inputs).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    enum Tok {
        Any,
        AnyInComponent,
        Char(char),
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                Tok::Any
            }
            '*' => Tok::AnyInComponent,
            c => Tok::Char(c),
        });
    }
    let text: Vec<char> = text.chars().collect();
    // reach[i]: the tokens so far can match text[..i].
    let mut reach = vec![false; text.len() + 1];
    reach[0] = true;
    for tok in &toks {
        let mut next = vec![false; text.len() + 1];
        match tok {
            Tok::Char(c) => {
                for i in 0..text.len() {
                    next[i + 1] = reach[i] && text[i] == *c;
                }
            }
            Tok::Any | Tok::AnyInComponent => {
                let crosses = matches!(tok, Tok::Any);
                let mut on = false;
                for i in 0..=text.len() {
                    on = reach[i] || (on && i > 0 && (crosses || text[i - 1] != '/'));
                    next[i] = on;
                }
            }
        }
        reach = next;
    }
    reach[text.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gitlab(allow_local: bool, allowed: &[&str]) -> ImagePolicy {
        ImagePolicy::provider(allow_local, allowed.iter().map(|s| s.to_string()).collect())
    }

    fn refusal(r: Result<ImageSource, ImageError>) -> Option<Refusal> {
        match r {
            Err(ImageError::Refused { refusal, .. }) => Some(refusal),
            _ => None,
        }
    }

    fn layout_dir() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("oci-layout"), "{}").unwrap();
        t
    }

    #[test]
    fn host_paths_are_refused_unless_allowed() {
        let t = layout_dir();
        let dir = t.path().to_str().unwrap();
        let p = gitlab(false, &[]);
        for s in [
            dir,
            "/etc/passwd",
            "/nonexistent/x",
            "./alpine",
            "../alpine",
            ".",
            "..",
            "~/images/x",
            "a/../b",
            "file:///etc",
            "FILE:///etc",
            "file:/etc",
        ] {
            assert_eq!(
                refusal(ImageSource::parse_with(s, &p)),
                Some(Refusal::HostPath),
                "{s}"
            );
        }
        let ok = ImageSource::parse_with(dir, &gitlab(true, &[])).unwrap();
        assert!(matches!(ok, ImageSource::Layout { .. }), "{ok:?}");
        let tagged = ImageSource::parse_with(&format!("{dir}:v1"), &gitlab(true, &[])).unwrap();
        assert_eq!(
            tagged,
            ImageSource::Layout {
                dir: dir.into(),
                tag: Some("v1".into())
            }
        );
    }

    #[test]
    fn allowed_local_paths_must_be_absolute_and_clean() {
        let p = gitlab(true, &[]);
        for s in ["./x", "../x", "/a/../etc", "/a/./b", "/a//b", "~/x"] {
            assert!(
                matches!(
                    ImageSource::parse_with(s, &p),
                    Err(ImageError::BadReference { .. })
                ),
                "{s}"
            );
        }
        // Paths are checked against the allow-list too.
        let t = layout_dir();
        let dir = t.path().to_str().unwrap();
        let only = gitlab(true, &["/srv/images/**"]);
        assert!(matches!(
            refusal(ImageSource::parse_with(dir, &only)),
            Some(Refusal::NotAllowed(_))
        ));
        let here = gitlab(true, &[dir]);
        assert!(ImageSource::parse_with(dir, &here).is_ok());
    }

    #[test]
    fn a_reference_is_never_a_path_for_a_provider() {
        let t = layout_dir();
        std::fs::create_dir(t.path().join("alpine")).unwrap();
        std::fs::write(t.path().join("alpine/oci-layout"), "{}").unwrap();
        // `alpine` in a directory that has an `./alpine` layout.
        let cwd = std::env::current_dir().unwrap();
        let bare = t.path().join("alpine");
        for p in [gitlab(false, &[]), gitlab(true, &[])] {
            let s = ImageSource::parse_with("alpine", &p).unwrap();
            assert_eq!(
                s,
                ImageSource::Registry(Reference::parse("alpine").unwrap())
            );
        }
        // The local policy looks at the host first, as `--image` always did.
        let rel = bare.strip_prefix(&cwd).ok();
        if let Some(rel) = rel {
            let s = ImageSource::parse(rel.to_str().unwrap()).unwrap();
            assert!(matches!(s, ImageSource::Layout { .. }));
        }
        let s = ImageSource::parse(bare.to_str().unwrap()).unwrap();
        assert!(matches!(s, ImageSource::Layout { .. }));
    }

    #[test]
    fn allowed_images_globs() {
        let p = gitlab(false, &["docker.io/library/*", "ghcr.io/acme/**", "ruby:*"]);
        for ok in [
            "alpine",
            "alpine:3.19",
            "docker.io/library/debian:12",
            "ghcr.io/acme/tools/build:1",
            "ruby:3.3",
        ] {
            assert!(ImageSource::parse_with(ok, &p).is_ok(), "{ok}");
        }
        for no in [
            "someone/alpine",
            "ghcr.io/other/x",
            "quay.io/library/alpine",
            "127.0.0.1:5000/library/alpine",
        ] {
            assert!(
                matches!(
                    refusal(ImageSource::parse_with(no, &p)),
                    Some(Refusal::NotAllowed(_))
                ),
                "{no}"
            );
        }
        // Empty: any registry image.
        assert!(ImageSource::parse_with("quay.io/x/y:1", &gitlab(false, &[])).is_ok());
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", "alpine:3"));
        assert!(!glob_match("*", "library/alpine"));
        assert!(glob_match("**", "a/b/c"));
        assert!(glob_match("a/**/z", "a/b/c/z"));
        assert!(glob_match("a/*/z", "a/b/z"));
        assert!(!glob_match("a/*/z", "a/b/c/z"));
        assert!(glob_match("ruby:*", "ruby:3.3"));
        assert!(!glob_match("ruby:*", "rubyx:3.3"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "x"));
        // Many stars on a long input: no blow-up.
        let long = "a".repeat(4000);
        assert!(!glob_match(&"*a".repeat(50).replace("a", "a*b"), &long));
    }

    #[test]
    fn odd_inputs_are_clear_errors() {
        let p = gitlab(false, &[]);
        let long = "a".repeat(MAX_IMAGE_LEN + 1);
        for s in [
            "",
            &long,
            "alpine\n",
            "a\0b",
            "http://x/y",
            "docker://alpine",
        ] {
            let e = ImageSource::parse_with(s, &p).unwrap_err();
            assert!(matches!(e, ImageError::BadReference { .. }), "{s:?}: {e}");
            assert!(e.to_string().len() < 400, "{e}");
        }
        // Long but under the bound: the reference parser's own error, short.
        let e = ImageSource::parse_with(&"a".repeat(4000), &p).unwrap_err();
        assert!(e.to_string().len() < 400, "{e}");
        let e = ImageSource::parse_with(&format!("/{}", "x".repeat(4000)), &p).unwrap_err();
        assert!(e.to_string().len() < 400, "{e}");
    }
}
