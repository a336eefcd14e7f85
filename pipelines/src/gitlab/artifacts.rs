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
