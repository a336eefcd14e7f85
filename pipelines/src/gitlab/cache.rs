//! `cache:` (one mapping or a list of up to four): what GitLab resolves on
//! the server before a job reaches a runner, done here for local runs:
//! `key` (a string, variables expanded; or `files:` hashed, with
//! `prefix`), `fallback_keys`, `paths`, `untracked`, `policy`, `when`, and
//! the `-protected`/`-non_protected` suffix GitLab adds to every key
//! (separated caches, its default).
//!
//! `key: files:` is hashed as GitLab hashes it (`Seed::Build::Cache`
//! `hash_of_file_contents`): the SHA-1 of the files' git blob IDs, sorted,
//! joined by `-`; the blob ID is git's (`git hash-object`), so the key is
//! the one GitLab gives the same files, checkout or not. Without any of the
//! files the key is `default`, as GitLab's.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};
use sha1::{Digest, Sha1};

use super::variables::expand_capped;
use super::Parser;
use crate::error::Result;
use crate::limits::{bytes, short};
use crate::spec::{ArtifactWhen, CachePolicy, CacheSpec};
use crate::yaml::{join, key, scalar, strings, Seg};

/// GitLab's limits: caches per job, files per `key: files:`, fallback keys.
const MAX_CACHES: usize = 4;
const MAX_KEY_FILES: usize = 2;
const MAX_FALLBACK_KEYS: usize = 5;

/// A key GitLab accepts: not `.` or `..`, without `/` (or its URL form).
fn valid_key(k: &str) -> bool {
    !(k == "." || k == ".." || k.contains('/') || k.to_ascii_lowercase().contains("%2f"))
}

impl Parser<'_> {
    /// The caches of `cache:` at `path`, values expanded with `vars`.
    pub(super) fn caches(
        &self,
        v: &Value,
        path: &[Seg],
        vars: &BTreeMap<String, String>,
    ) -> Result<Vec<CacheSpec>> {
        let entries: Vec<(Vec<Seg>, &Mapping)> = match v {
            Value::Mapping(m) => vec![(path.to_vec(), m)],
            Value::Sequence(list) => {
                if list.len() > MAX_CACHES {
                    return Err(self.err(path, format!("a job has at most {MAX_CACHES} caches")));
                }
                let mut out = Vec::new();
                for (i, e) in list.iter().enumerate() {
                    let at = join(path, &[Seg::Index(i)]);
                    match e {
                        Value::Mapping(m) => out.push((at, m)),
                        _ => return Err(self.err(&at, "a cache must be a mapping")),
                    }
                }
                out
            }
            // `cache: {}` or `cache: null` in a job turns the default off.
            Value::Null => Vec::new(),
            _ => return Err(self.err(path, "`cache` must be a mapping or a list of them")),
        };
        let protected = vars.get("CI_COMMIT_REF_PROTECTED").map(String::as_str) == Some("true");
        let suffix = if protected {
            "-protected"
        } else {
            "-non_protected"
        };
        let mut out = Vec::new();
        for (at, m) in entries {
            if let Some(mut c) = self.cache(m, &at, vars)? {
                c.key.push_str(suffix);
                for k in &mut c.fallback_keys {
                    k.push_str(suffix);
                }
                out.push(c);
            }
        }
        Ok(out)
    }

    /// One cache entry; `None` when it names nothing to cache.
    fn cache(
        &self,
        m: &Mapping,
        path: &[Seg],
        vars: &BTreeMap<String, String>,
    ) -> Result<Option<CacheSpec>> {
        let max = self.limits.max_script_bytes;
        let at = |k: &str| join(path, &[key(k)]);
        let exp = |s: &str, k: &str| {
            expand_capped(s, vars, max).ok_or_else(|| {
                self.limit(
                    &at(k),
                    format!(
                        "a value expands to more than {} (max_script_bytes)",
                        bytes(max)
                    ),
                )
            })
        };
        let list = |k: &str| -> Result<Vec<String>> {
            match m.get(k) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(v) => strings(v)
                    .ok_or_else(|| self.err(&at(k), "must be a list of strings"))?
                    .iter()
                    .map(|s| exp(s, k))
                    .collect(),
            }
        };
        let paths = list("paths")?;
        let untracked = match m.get("untracked") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(self.err(&at("untracked"), "`untracked` must be true or false")),
        };
        if paths.is_empty() && !untracked {
            return Ok(None);
        }
        let key = match m.get("key") {
            None | Some(Value::Null) => "default".to_string(),
            Some(Value::Mapping(km)) => self.files_key(km, &at("key"), vars)?,
            Some(v) => {
                let raw = scalar(v).ok_or_else(|| {
                    self.err(&at("key"), "`key` must be a string or a `files:` mapping")
                })?;
                let k = exp(&raw, "key")?;
                if k.is_empty() {
                    "default".to_string()
                } else {
                    k
                }
            }
        };
        if !valid_key(&key) {
            return Err(self.err(
                &at("key"),
                format!(
                    "cache key `{}` must not be `.` or `..` nor contain `/`",
                    short(&key)
                ),
            ));
        }
        let fallback_keys = list("fallback_keys")?;
        if fallback_keys.len() > MAX_FALLBACK_KEYS {
            return Err(self.err(
                &at("fallback_keys"),
                format!("at most {MAX_FALLBACK_KEYS} fallback keys"),
            ));
        }
        let policy_text = match m.get("policy") {
            None => String::new(),
            Some(v) => exp(&scalar(v).unwrap_or_default(), "policy")?,
        };
        let policy = CachePolicy::parse(&policy_text).ok_or_else(|| {
            self.err(
                &at("policy"),
                "`cache: policy` must be pull, push or pull-push",
            )
        })?;
        let when = match m.get("when").and_then(Value::as_str) {
            None | Some("on_success") => ArtifactWhen::OnSuccess,
            Some("on_failure") => ArtifactWhen::OnFailure,
            Some("always") => ArtifactWhen::Always,
            Some(_) => {
                return Err(self.err(
                    &at("when"),
                    "`cache: when` must be on_success, on_failure or always",
                ))
            }
        };
        Ok(Some(CacheSpec {
            key,
            fallback_keys: fallback_keys.into_iter().filter(|k| valid_key(k)).collect(),
            paths,
            untracked,
            policy,
            when,
        }))
    }

    /// `key: {files: [..], prefix: ..}`: `prefix-` + GitLab's digest of the
    /// files' contents (`default` when none of them exists).
    fn files_key(
        &self,
        km: &Mapping,
        path: &[Seg],
        vars: &BTreeMap<String, String>,
    ) -> Result<String> {
        let files_at = join(path, &[key("files")]);
        let files = km
            .get("files")
            .and_then(strings)
            .ok_or_else(|| self.err(&files_at, "`key: files` must be a list of paths"))?;
        if files.is_empty() || files.len() > MAX_KEY_FILES {
            return Err(self.err(
                &files_at,
                format!("`key: files` lists one or {MAX_KEY_FILES} files"),
            ));
        }
        // Read beneath the project directory, bounded, like includes.
        let mut blobs: Vec<String> = files
            .iter()
            .filter_map(|f| (self.read)(f).ok())
            .map(|text| git_blob_id(text.as_bytes()))
            .collect();
        blobs.sort();
        blobs.dedup();
        let digest = if blobs.is_empty() {
            "default".to_string()
        } else {
            hex(&Sha1::digest(blobs.join("-").as_bytes()))
        };
        let prefix = match km.get("prefix") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let raw = scalar(v).ok_or_else(|| {
                    self.err(&join(path, &[key("prefix")]), "`prefix` must be a string")
                })?;
                expand_capped(&raw, vars, self.limits.max_script_bytes).filter(|p| !p.is_empty())
            }
        };
        Ok(match prefix {
            Some(p) => format!("{p}-{digest}"),
            None => digest,
        })
    }
}

/// Git's object ID of a blob holding `bytes` (`git hash-object`).
fn git_blob_id(bytes: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{ctx, job, parse_err, parse_files, parse_ok, parse_with};
    use super::*;
    use crate::context::Options;

    #[test]
    fn a_cache_resolves_like_gitlab_resolves_it() {
        let p = parse_ok(
            "variables: {DIR: vendor}\n\
             j:\n  script: x\n  cache:\n    key: deps-$CI_COMMIT_REF_SLUG\n\
             \x20   paths: [$DIR/, .npm/]\n    policy: pull\n    when: always\n\
             \x20   fallback_keys: [deps-main]\n\
             d:\n  script: x\n  cache: {paths: [a]}\n\
             u:\n  script: x\n  cache: {untracked: true, policy: push}\n",
        );
        let c = &job(&p, "j").cache;
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].key, "deps-main-non_protected");
        assert_eq!(c[0].fallback_keys, ["deps-main-non_protected"]);
        assert_eq!(c[0].paths, ["vendor/", ".npm/"]);
        assert_eq!(c[0].policy, CachePolicy::Pull);
        assert_eq!(c[0].when, ArtifactWhen::Always);
        let d = &job(&p, "d").cache[0];
        assert_eq!(d.key, "default-non_protected");
        assert_eq!(
            (d.policy, d.when),
            (CachePolicy::PullPush, ArtifactWhen::OnSuccess)
        );
        let u = &job(&p, "u").cache[0];
        assert!(u.untracked && u.paths.is_empty());
        assert_eq!(u.policy, CachePolicy::Push);
    }

    #[test]
    fn several_caches_default_and_protected_refs() {
        let main = "default:\n  cache: [{key: a, paths: [a]}, {key: b, paths: [b]}]\n\
                    j:\n  script: x\n\
                    off:\n  script: x\n  cache: []\n";
        let mut c = ctx();
        c.extra_vars
            .push(("CI_COMMIT_REF_PROTECTED".into(), "true".into()));
        let p = parse_with(main, &c, &Options::default(), &[]).unwrap();
        let keys: Vec<&str> = job(&p, "j").cache.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["a-protected", "b-protected"]);
        assert!(job(&p, "off").cache.is_empty());
    }

    #[test]
    fn a_files_key_changes_with_the_files() {
        let main =
            "j:\n  script: x\n  cache:\n    key: {files: [Cargo.lock], prefix: $CI_JOB_NAME}\n\
                    \x20   paths: [target/]\n";
        let one = parse_files(main, &[("Cargo.lock", "v1")]).unwrap();
        let again = parse_files(main, &[("Cargo.lock", "v1")]).unwrap();
        let two = parse_files(main, &[("Cargo.lock", "v2")]).unwrap();
        let none = parse_files(main, &[]).unwrap();
        let k = |p: &super::super::GitlabPipeline| job(p, "j").cache[0].key.clone();
        assert_eq!(k(&one), k(&again));
        assert_ne!(k(&one), k(&two));
        assert!(k(&one).starts_with("j-") && k(&one).ends_with("-non_protected"));
        assert_eq!(k(&one).len(), "j-".len() + 40 + "-non_protected".len());
        assert_eq!(k(&none), "j-default-non_protected");
        // GitLab's digest, from git's own blob IDs:
        // `printf v1 | git hash-object --stdin` is 28c218c4..., and
        // `printf 28c218c4... | sha1sum` is c4ba0f99....
        assert_eq!(
            git_blob_id(b"v1"),
            "28c218c44b49222f91536daf5b4d9871638edc8e"
        );
        assert_eq!(
            k(&one),
            "j-c4ba0f99a41707ad2007f794bbde65742f6a1f5b-non_protected"
        );
        // Two files: their blob IDs sorted and joined by `-`.
        let main2 = "j:\n  script: x\n  cache:\n    key: {files: [b.txt, a.lock]}\n\
                    \x20   paths: [target/]\n";
        let both = parse_files(main2, &[("a.lock", "v1"), ("b.txt", "x\n")]).unwrap();
        assert_eq!(
            k(&both),
            "95bba56391e78dddfe75da82ed656f8a0a75bcb7-non_protected"
        );
    }

    #[test]
    fn bad_caches_point_at_the_key() {
        let e = parse_err("j:\n  script: x\n  cache: {key: a/b, paths: [x]}\n");
        assert!(e.contains("must not be `.` or `..` nor contain `/`"), "{e}");
        let e = parse_err("j:\n  script: x\n  cache: {paths: [x], policy: sometimes}\n");
        assert!(e.contains("pull, push or pull-push"), "{e}");
        let e = parse_err("j:\n  script: x\n  cache: {key: {files: [a, b, c]}, paths: [x]}\n");
        assert!(e.contains("one or 2 files"), "{e}");
        let e = parse_err(
            "j:\n  script: x\n  cache: [{paths: [a]}, {paths: [a]}, {paths: [a]}, {paths: [a]}, {paths: [a]}]\n",
        );
        assert!(e.contains("at most 4 caches"), "{e}");
    }
}
