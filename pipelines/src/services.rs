//! Services as every front end builds them ([`ServiceSpec`]): their host
//! names (derived from the image name as gitlab-runner derives them, plus
//! the job's `alias`), checked here once for every provider, and the bound
//! on how many one job may have.

use crate::limits::short;
use crate::spec::{ServiceSpec, Variable};

/// Most services one job may have: each is a disk of the job's VM (the
/// guest agent holds to the same number, `kiln_agent::proto::MAX_SERVICES`).
pub const MAX_SERVICES: usize = 8;

/// Why a job's services cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("the job has {0} services; at most {MAX_SERVICES} are supported")]
    TooMany(usize),
    #[error("a service needs an image `name`")]
    NoName,
    #[error(
        "service alias `{}` is not a host name (letters, digits, `-`, `_` and dots, \
         at most 63 characters per label): use another `alias`",
        short(.0)
    )]
    BadAlias(String),
    #[error("service name `{}` contains whitespace or a control character", short(.0))]
    BadName(String),
}

/// Whether `name` may be a host name in `/etc/hosts`: dot-separated labels
/// of ASCII letters, digits, `-` and `_` (Docker accepts the `__` of
/// gitlab-runner's derived aliases), 1..=63 bytes each, not starting or
/// ending with `-`, at most 253 bytes in all. The guest agent checks again.
pub fn check_alias(name: &str) -> Result<(), ServiceError> {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !name.is_empty() && name.len() <= 253 && name.split('.').all(label) {
        Ok(())
    } else {
        Err(ServiceError::BadAlias(name.to_string()))
    }
}

/// The host names gitlab-runner gives a service named `image`: the name
/// without its tag or digest, with `/` as `__` and as `-`
/// (`registry.example.com/group/img:1` → `registry.example.com__group__img`,
/// `registry.example.com-group-img`; `postgres:15` → `postgres`). A local
/// image (a path, for `kiln run-job`) gets its last path component. Names
/// that are not host names (a registry port's `:`) are left out.
pub fn derived_aliases(image: &str) -> Vec<String> {
    let image = image.split('@').next().unwrap_or_default();
    let local = image.starts_with('/') || image.starts_with("./") || image.starts_with("../");
    let (path, last) = match image.rsplit_once('/') {
        Some((p, l)) => (Some(p), l),
        None => (None, image),
    };
    let last = last.split(':').next().unwrap_or_default();
    let candidates = match (local, path) {
        (true, _) | (false, None) => vec![last.to_string()],
        (false, Some(p)) => {
            let full = format!("{p}/{last}");
            vec![full.replace('/', "__"), full.replace('/', "-")]
        }
    };
    let mut out: Vec<String> = Vec::new();
    for c in candidates {
        if check_alias(&c).is_ok() && !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// A service for `image` with the job's `alias` (one or more names,
/// separated by commas or spaces, as gitlab-runner's multiple aliases),
/// checked (any other whitespace or control character is refused).
pub fn service(
    image: &str,
    alias: Option<&str>,
    entrypoint: Option<Vec<String>>,
    command: Option<Vec<String>>,
    variables: Vec<Variable>,
) -> Result<ServiceSpec, ServiceError> {
    if image.is_empty() {
        return Err(ServiceError::NoName);
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ServiceError::BadName(image.to_string()));
    }
    let mut aliases = derived_aliases(image);
    for a in alias
        .unwrap_or_default()
        .split([',', ' '])
        .filter(|a| !a.is_empty())
    {
        check_alias(a)?;
        if !aliases.iter().any(|x| x == a) {
            aliases.push(a.to_string());
        }
    }
    Ok(ServiceSpec {
        image: image.to_string(),
        aliases,
        entrypoint,
        command,
        variables,
    })
}

/// Refuse more than [`MAX_SERVICES`].
pub fn check_count(n: usize) -> Result<(), ServiceError> {
    if n > MAX_SERVICES {
        Err(ServiceError::TooMany(n))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_derived_as_gitlab_runner_derives_them() {
        assert_eq!(derived_aliases("postgres:15"), vec!["postgres"]);
        assert_eq!(derived_aliases("postgres"), vec!["postgres"]);
        assert_eq!(
            derived_aliases("registry.example.com/group/img:1.2"),
            vec![
                "registry.example.com__group__img",
                "registry.example.com-group-img"
            ]
        );
        assert_eq!(
            derived_aliases("tutum/wordpress@sha256:abc"),
            vec!["tutum__wordpress", "tutum-wordpress"]
        );
        // A registry port makes no host name.
        assert_eq!(derived_aliases("localhost:5000/db:1"), Vec::<String>::new());
        assert_eq!(
            derived_aliases("/tmp/x/svc-image:latest"),
            vec!["svc-image"]
        );
    }

    #[test]
    fn explicit_aliases_are_checked_and_added() {
        let s = service("postgres:15", Some("db, pg"), None, None, Vec::new()).unwrap();
        assert_eq!(s.aliases, vec!["postgres", "db", "pg"]);
        for bad in [
            "a/b",
            "-x",
            "x\n127.0.0.1 gitlab.com",
            "évil",
            &"x".repeat(64),
            "a..b",
        ] {
            let e = service("postgres", Some(bad), None, None, Vec::new()).unwrap_err();
            assert!(
                matches!(e, ServiceError::BadAlias(_)),
                "{bad:?} accepted: {e:?}"
            );
            assert!(e.to_string().contains("is not a host name"), "{e}");
        }
        assert_eq!(
            service("", None, None, None, Vec::new()),
            Err(ServiceError::NoName)
        );
        assert!(matches!(
            service("a b", None, None, None, Vec::new()),
            Err(ServiceError::BadName(_))
        ));
        assert!(check_count(MAX_SERVICES).is_ok());
        assert_eq!(
            check_count(MAX_SERVICES + 1),
            Err(ServiceError::TooMany(MAX_SERVICES + 1))
        );
    }
}
