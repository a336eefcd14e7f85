//! `artifacts:`: the files a job keeps (`paths`, `exclude`, `untracked`,
//! `name`, `when`, `expire_in`), and `reports:` as artifacts kept always.

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::variables::expand_capped;
use super::Parser;
use crate::error::Result;
use crate::limits::bytes;
use crate::spec::{ArtifactSpec, ArtifactWhen};
use crate::yaml::{join, key, scalar, strings, Seg};

impl Parser<'_> {
    /// The artifacts of `artifacts:` at `path`, values expanded with `vars`.
    pub(super) fn artifacts(
        &self,
        v: &Value,
        path: &[Seg],
        vars: &BTreeMap<String, String>,
    ) -> Result<Vec<ArtifactSpec>> {
        let Some(m) = v.as_mapping() else {
            return Err(self.err(path, "`artifacts` must be a mapping"));
        };
        let max = self.limits.max_script_bytes;
        let exp = |s: &str| {
            expand_capped(s, vars, max).ok_or_else(|| {
                self.limit(
                    path,
                    format!(
                        "a value expands to more than {} (max_script_bytes)",
                        bytes(max)
                    ),
                )
            })
        };
        let list = |k: &str| -> Result<Vec<String>> {
            match m.get(k) {
                None => Ok(Vec::new()),
                Some(v) => strings(v)
                    .ok_or_else(|| self.err(&join(path, &[key(k)]), "must be a list of strings"))?
                    .iter()
                    .map(|s| exp(s))
                    .collect(),
            }
        };
        let when = match m.get("when").and_then(Value::as_str) {
            None | Some("on_success") => ArtifactWhen::OnSuccess,
            Some("on_failure") => ArtifactWhen::OnFailure,
            Some("always") => ArtifactWhen::Always,
            Some(_) => {
                return Err(self.err(
                    &join(path, &[key("when")]),
                    "`artifacts: when` must be on_success, on_failure or always",
                ))
            }
        };
        let mut out = Vec::new();
        let paths = list("paths")?;
        let untracked = m.get("untracked").and_then(Value::as_bool).unwrap_or(false);
        let expire_in = m.get("expire_in").and_then(scalar);
        if !paths.is_empty() || untracked {
            out.push(ArtifactSpec {
                name: m
                    .get("name")
                    .and_then(scalar)
                    .map(|n| exp(&n))
                    .transpose()?,
                paths,
                exclude: list("exclude")?,
                untracked,
                when,
                expire_in: expire_in.clone(),
            });
        }
        if let Some(Value::Mapping(reports)) = m.get("reports") {
            for (kind, files) in reports {
                let (Some(kind), Some(paths)) = (kind.as_str(), strings(files)) else {
                    continue;
                };
                out.push(ArtifactSpec {
                    name: Some(format!("reports:{kind}")),
                    paths,
                    exclude: Vec::new(),
                    untracked: false,
                    when: ArtifactWhen::Always,
                    expire_in: expire_in.clone(),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{job, parse_err, parse_ok};
    use super::*;

    #[test]
    fn paths_and_reports_become_artifacts() {
        let p = parse_ok(
            "j:\n  script: x\n  variables: {OUT: target}\n  artifacts:\n\
             \x20   name: build-$CI_COMMIT_REF_SLUG\n    paths: [$OUT/bin]\n\
             \x20   exclude: [$OUT/tmp]\n    when: on_failure\n    expire_in: 1 week\n\
             \x20   reports:\n      junit: report.xml\n",
        );
        let a = &job(&p, "j").artifacts;
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].name.as_deref(), Some("build-main"));
        assert_eq!(a[0].paths, ["target/bin"]);
        assert_eq!(a[0].exclude, ["target/tmp"]);
        assert_eq!(a[0].when, ArtifactWhen::OnFailure);
        assert_eq!(a[0].expire_in.as_deref(), Some("1 week"));
        assert_eq!(a[1].name.as_deref(), Some("reports:junit"));
        assert_eq!(a[1].paths, ["report.xml"]);
        assert_eq!(a[1].when, ArtifactWhen::Always);
    }

    #[test]
    fn untracked_alone_is_an_artifact_and_nothing_is_none() {
        let p = parse_ok(
            "u:\n  script: x\n  artifacts: {untracked: true}\n\
             n:\n  script: x\n  artifacts: {expire_in: 1d}\n",
        );
        let u = &job(&p, "u").artifacts;
        assert!(u[0].untracked && u[0].paths.is_empty());
        assert_eq!(u[0].when, ArtifactWhen::OnSuccess);
        assert!(job(&p, "n").artifacts.is_empty());
    }

    #[test]
    fn bad_artifacts_point_at_the_key() {
        let e = parse_err("j:\n  script: x\n  artifacts:\n    when: later\n");
        assert!(e.contains(":4:5: j.artifacts.when:"), "{e}");
        let e = parse_err("j:\n  script: x\n  artifacts: [a]\n");
        assert!(e.contains("`artifacts` must be a mapping"), "{e}");
    }
}
