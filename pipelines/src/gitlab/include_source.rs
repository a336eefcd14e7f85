//! Where `include:` entries come from (see `include.rs`, which reads
//! them): the kinds of source, CI/CD component references and the release
//! they resolve to, `integrity:` checks, and `$VARIABLES` in locations.

use std::collections::BTreeMap;

use serde_yaml::Value;

use crate::limits::short;

/// Where an include is read from.
pub(super) enum From {
    /// A path in this project (through the caller's `read`).
    Project(String),
    /// A path in another project's local checkout (`--include-project`).
    Dir(std::path::PathBuf, String),
    /// A URL (`include: remote`), through the caller's fetcher, with the
    /// SHA-256 its `integrity:` wants.
    Remote(String, Option<[u8; 32]>),
    /// A GitLab template (`include: template`) in `--include-template-dir`.
    Template(std::path::PathBuf, String),
    /// Another project's file through the GitLab API.
    Api(ApiFile),
    /// A CI/CD component (`include: component`).
    Component(Component),
}

/// A file of another project, read through the GitLab API.
pub(super) struct ApiFile {
    pub(super) project: String,
    /// Without a leading `/`.
    pub(super) file: String,
    /// `None`: the project's default branch.
    pub(super) git_ref: Option<String>,
}

impl ApiFile {
    /// The name errors use: `group/project/path@ref`.
    pub(super) fn shown(&self) -> String {
        match &self.git_ref {
            Some(r) => format!("{}/{}@{r}", self.project, self.file),
            None => format!("{}/{}", self.project, self.file),
        }
    }
}

/// A component to read.
pub(super) struct Component {
    pub(super) project: String,
    pub(super) name: String,
    /// As written: a tag, branch or SHA, `~latest`, or a partial version.
    pub(super) version: String,
    /// The project's local checkout (`--include-project`), if mapped.
    pub(super) dir: Option<std::path::PathBuf>,
}

/// Splits `HOST/GROUP[/SUBGROUP...]/PROJECT/NAME@VERSION` into its host,
/// project path, component name and version.
pub(super) fn parse_component(s: &str) -> Option<(String, String, String, String)> {
    let (path, version) = s.trim().rsplit_once('@')?;
    let parts: Vec<&str> = path.split('/').collect();
    let ok = |p: &&str| {
        !p.is_empty()
            && *p != ".."
            && *p != "."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if parts.len() < 4 || !parts.iter().all(ok) || version.is_empty() {
        return None;
    }
    let name = parts[parts.len() - 1].to_string();
    let project = parts[1..parts.len() - 1].join("/");
    Some((parts[0].to_string(), project, name, version.to_string()))
}

/// Whether a component version names a release to look up: `~latest`,
/// or a partial version (`1`, `1.2`) meaning its latest patch.
pub(super) fn wants_release(v: &str) -> bool {
    v == "~latest" || (semver(v).is_none() && partial(v).is_some())
}

/// `MAJOR.MINOR.PATCH` (GitLab's catalog versions; no prerelease).
pub(super) fn semver(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.').map(|n| n.parse::<u64>().ok());
    let t = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(t)
}

/// `MAJOR` or `MAJOR.MINOR`.
pub(super) fn partial(v: &str) -> Option<Vec<u64>> {
    let nums: Option<Vec<u64>> = v.split('.').map(|n| n.parse().ok()).collect();
    nums.filter(|n| (1..=2).contains(&n.len()))
}

/// The release `version` (`~latest` or a partial version) picks from
/// `tags`, as GitLab does: the highest `MAJOR.MINOR.PATCH` that matches.
pub(super) fn pick_release(version: &str, tags: &[String]) -> Option<String> {
    let prefix = if version == "~latest" {
        Vec::new()
    } else {
        partial(version)?
    };
    tags.iter()
        .filter_map(|t| semver(t).map(|v| (v, t)))
        .filter(|((a, b, _), _)| match prefix.as_slice() {
            [] => true,
            [ma] => a == ma,
            [ma, mi] => a == ma && b == mi,
            _ => false,
        })
        .max_by_key(|(v, _)| *v)
        .map(|(_, t)| t.clone())
}

/// Where the `local` includes of a file are read from: GitLab reads them
/// in the context of the file that names them.
#[derive(Debug, Clone)]
pub(super) enum Base {
    /// The main project (the checkout).
    Project,
    /// A mapped project's checkout (`include: project`).
    Dir(std::path::PathBuf),
    /// Another project through the GitLab API, at a ref (`None`: its
    /// default branch).
    Api(String, Option<String>),
    /// A remote file or a template (the kind): it has no project, so
    /// `local` includes are refused.
    NoProject(&'static str),
}

/// The SHA-256 of an `integrity:` value (`sha256-<base64>`, a subresource
/// integrity string as GitLab takes it).
pub(super) fn parse_integrity(v: &Value) -> Option<[u8; 32]> {
    use base64::Engine as _;
    let b64 = v.as_str()?.trim().strip_prefix("sha256-")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    raw.try_into().ok()
}

/// `text`, when `want` is none or its SHA-256; otherwise an error with
/// both digests.
pub(super) fn check_integrity(text: String, want: Option<&[u8; 32]>) -> std::io::Result<String> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let Some(want) = want else {
        return Ok(text);
    };
    let got = sha2::Sha256::digest(text.as_bytes());
    if got.as_slice() == want {
        return Ok(text);
    }
    let b64 = |d: &[u8]| base64::engine::general_purpose::STANDARD.encode(d);
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "integrity check failed: `integrity:` wants sha256-{} but the file is sha256-{}; \
             the file changed since `integrity` was written: check the new version, then update \
             `integrity`",
            b64(want),
            b64(&got)
        ),
    ))
}

/// An include location with `$NAME`/`${NAME}` replaced from `vars`
/// (`$$` is a `$`), or a message naming the first variable it does not
/// define (GitLab would make it empty and then fail to find the file).
pub(super) fn expand_location(
    s: &str,
    vars: &BTreeMap<String, String>,
) -> std::result::Result<String, String> {
    /// Longer locations are surely wrong; this bounds `$A$A$A...`.
    const MAX: usize = 4096;
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        let after = &rest[pos + 1..];
        if let Some(r) = after.strip_prefix('$') {
            rest = r;
            continue;
        }
        let (name, next) = match after.strip_prefix('{') {
            Some(r) => match r.find('}') {
                Some(end) => (&r[..end], &r[end + 1..]),
                None => ("", r),
            },
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        if !name.is_empty() && !vars.contains_key(name) {
            return Err(format!(
                "include `{}`: variable `{}` is not defined here; GitLab expands only project, \
                 group and instance variables (give them with --var {}=VALUE) and predefined \
                 ones in `include:`, not those of `variables:`",
                short(s),
                short(name),
                short(name)
            ));
        }
        rest = next;
    }
    super::variables::expand_capped(s, vars, MAX).ok_or_else(|| {
        format!(
            "include `{}`: it expands to more than {MAX} bytes",
            short(s)
        )
    })
}

/// Whether `s` is an `http://` or `https://` URL (GitLab's `remote`, and
/// the short form `include: https://...`).
pub(super) fn is_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}
