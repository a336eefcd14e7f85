//! `include:`: reads the main file and every `include: local` file it
//! names (nested, with `rules`), and merges them into one top-level
//! mapping, later definitions winning. Remote, project, template and
//! component includes cannot be resolved locally and are errors. Depth,
//! count and size are bounded by the [`Limits`](crate::Limits).

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use super::expr::eval_rule_if_with;
use super::Parser;
use crate::error::{Error, Location, Result};
use crate::limits::{bytes, short};
use crate::yaml::{self, join, key, merge_into, Seg};

impl Parser<'_> {
    /// Loads `file` (its `text` already read) and, depth first, its
    /// includes; records which source defined each top-level key.
    pub(super) fn load(&mut self, file: &str, text: String, depth: usize) -> Result<Mapping> {
        // The text is kept (for error positions): it counts like the YAML.
        if !self.yaml_budget.charge(text.len()) {
            return Err(Error::Limit {
                file: file.to_string(),
                location: None,
                message: format!(
                    "the pipeline's files and their YAML come to more than {} (max_yaml_bytes)",
                    bytes(self.yaml_budget.max())
                ),
            });
        }
        let value = yaml::load(file, &text, self.limits, &self.yaml_budget)?;
        let idx = self.sources.len();
        self.sources.push((file.to_string(), text));
        let mut map = match value {
            Value::Mapping(m) => m,
            Value::Null => Mapping::new(),
            _ => {
                return Err(Error::Invalid {
                    file: file.to_string(),
                    location: Some(Location { line: 1, column: 1 }),
                    path: "(top level)".into(),
                    message: "the top level must be a mapping of jobs".into(),
                });
            }
        };
        let mut merged = Value::Mapping(Mapping::new());
        if let Some(inc) = map.remove("include") {
            if depth >= self.limits.max_include_depth {
                return Err(Error::Limit {
                    file: file.to_string(),
                    location: yaml::locate(&self.sources[idx].1, &[key("include")]),
                    message: format!(
                        "include: includes are nested more than {} levels deep \
                         (max_include_depth)",
                        self.limits.max_include_depth
                    ),
                });
            }
            let entries = match inc {
                Value::Sequence(s) => s,
                other => vec![other],
            };
            for (i, entry) in entries.iter().enumerate() {
                let path = [key("include"), Seg::Index(i)];
                let Some(local) = self.include_path(entry, &path, idx)? else {
                    continue;
                };
                self.includes += 1;
                if self.includes > self.limits.max_includes {
                    return Err(Error::Limit {
                        file: file.to_string(),
                        location: yaml::locate(&self.sources[idx].1, &path),
                        message: format!(
                            "include: the pipeline includes more than {} files, nested and \
                             repeated ones counted (max_includes)",
                            self.limits.max_includes
                        ),
                    });
                }
                if !self.seen_includes.insert(local.clone()) {
                    continue;
                }
                let content = (self.read)(&local).map_err(|source| Error::Include {
                    file: file.to_string(),
                    include: local.clone(),
                    source,
                })?;
                let sub = self.load(&local, content, depth + 1)?;
                merge_into(&mut merged, Value::Mapping(sub));
            }
        }
        for (k, _) in &map {
            if let Some(k) = k.as_str() {
                self.origin.insert(k.to_string(), idx);
            }
        }
        merge_into(&mut merged, Value::Mapping(map));
        match merged {
            Value::Mapping(m) => Ok(m),
            _ => Ok(Mapping::new()),
        }
    }

    /// The local path of an `include:` entry, `None` when its `rules` skip it.
    fn include_path(&self, entry: &Value, path: &[Seg], src: usize) -> Result<Option<String>> {
        let (file, text) = &self.sources[src];
        let c = yaml::Ctx { file, text };
        let local = match entry {
            Value::String(s) if s.contains("://") => {
                return Err(c.err(
                    path,
                    format!("remote include `{}` cannot be resolved locally", short(s)),
                ))
            }
            Value::String(s) => s.clone(),
            Value::Mapping(m) => {
                if let Some(rules) = m.get("rules") {
                    let vars = self.base_vars();
                    let rules_path = join(path, &[key("rules")]);
                    if !self.include_rules_match(rules, &vars, &rules_path, &c)? {
                        return Ok(None);
                    }
                }
                match m.get("local").and_then(Value::as_str) {
                    Some(s) => s.to_string(),
                    None => {
                        let kind = ["remote", "project", "template", "component"]
                            .into_iter()
                            .find(|k| m.contains_key(*k))
                            .unwrap_or("this");
                        return Err(c.err(
                            path,
                            format!("`include: {kind}` is not supported locally; only `local`"),
                        ));
                    }
                }
            }
            _ => return Err(c.err(path, "an include must be a path or a mapping")),
        };
        if local.contains('*') {
            return Err(c.err(
                path,
                format!("wildcard include `{}` is not supported", short(&local)),
            ));
        }
        let trimmed = local.trim_start_matches('/').to_string();
        if trimmed.split('/').any(|part| part == "..") {
            return Err(c.err(
                path,
                format!("include `{}` leaves the project (`..`)", short(&local)),
            ));
        }
        Ok(Some(trimmed))
    }

    fn include_rules_match(
        &self,
        rules: &Value,
        vars: &BTreeMap<String, String>,
        path: &[Seg],
        c: &yaml::Ctx<'_>,
    ) -> Result<bool> {
        let Some(list) = rules.as_sequence() else {
            return Err(c.err(path, "`rules` must be a list"));
        };
        for (i, rule) in list.iter().enumerate() {
            let rp = join(path, &[Seg::Index(i)]);
            let matched = match rule.get("if").and_then(Value::as_str) {
                Some(cond) => eval_rule_if_with(cond, vars, self.limits)
                    .map_err(|e| c.err(&rp, e.to_string()))?,
                None => true,
            };
            if matched {
                return Ok(rule.get("when").and_then(Value::as_str) != Some("never"));
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{ctx, job, names, parse_files, parse_with, var};
    use crate::context::Options;

    #[test]
    fn local_includes_merge_and_the_including_file_wins() {
        let p = parse_files(
            "include:\n  - local: /ci/a.yml\n  - ci/b.yml\n\
             variables: {WHO: main}\n\
             j:\n  script: [from-main]\n",
            &[
                (
                    "ci/a.yml",
                    "include: ci/c.yml\nvariables: {WHO: a, A: a}\na:\n  script: x\n",
                ),
                ("ci/b.yml", "j:\n  image: from-b\n  script: [from-b]\n"),
                ("ci/c.yml", "c:\n  script: x\n"),
            ],
        )
        .unwrap();
        assert_eq!(names(&p), ["c", "a", "j"]);
        let j = job(&p, "j");
        assert_eq!(j.image, "from-b");
        assert_eq!(var(j, "WHO"), Some("main"));
        assert_eq!(var(j, "A"), Some("a"));
    }

    #[test]
    fn include_rules_decide_whether_a_file_is_read() {
        let p = parse_files(
            "include:\n  - local: yes.yml\n    rules:\n      - if: $CI_COMMIT_BRANCH == \"main\"\n\
             \x20 - local: no.yml\n    rules:\n      - if: $CI_COMMIT_BRANCH == \"main\"\n        when: never\n",
            &[("yes.yml", "y:\n  script: x\n")],
        )
        .unwrap();
        assert_eq!(names(&p), ["y"]);
    }

    #[test]
    fn includes_that_cannot_be_read_locally_are_errors() {
        for (entry, says) in [
            ("https://example.com/ci.yml", "remote include"),
            (
                "{project: group/p, file: ci.yml}",
                "`include: project` is not supported",
            ),
            ("ci/*.yml", "wildcard include"),
            ("../outside.yml", "leaves the project"),
            ("missing.yml", "cannot read included file `missing.yml`"),
        ] {
            let e = parse_files(&format!("include: {entry}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{entry}: {e}");
        }
    }

    #[test]
    fn errors_in_an_included_file_name_that_file() {
        let e = parse_files(
            "include: ci/jobs.yml\n",
            &[("ci/jobs.yml", "# jobs\nj:\n  script: x\n  timeout: soon\n")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("ci/jobs.yml:4:3: j.timeout:"), "{e}");
    }

    #[test]
    fn include_depth_and_count_are_bounded() {
        let files = [
            ("a.yml", "include: b.yml\n"),
            ("b.yml", "b:\n  script: x\n"),
        ];
        let mut opts = Options::default();
        opts.limits.max_include_depth = 1;
        let e = parse_with("include: a.yml\n", &ctx(), &opts, &files).unwrap_err();
        assert!(e.to_string().contains("max_include_depth"), "{e}");
        opts.limits.max_include_depth = 2;
        assert!(parse_with("include: a.yml\n", &ctx(), &opts, &files).is_ok());
        opts.limits.max_includes = 1;
        let e = parse_with("include: a.yml\n", &ctx(), &opts, &files).unwrap_err();
        assert!(e.to_string().contains("max_includes"), "{e}");
    }
}
