//! `include:`: reads the main file and every `include: local` file it
//! names (nested, with `rules` and `inputs`), and merges them into one
//! top-level mapping, later definitions winning. `include: project` is read
//! from a local checkout when the caller maps the project to a directory
//! (`Options::include_projects`). Remote, template, component and unmapped
//! project includes cannot be read locally: each is skipped with a warning
//! that says what to do, and the rest of the pipeline still loads. Depth,
//! count and size are bounded by the [`Limits`](crate::Limits).

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use super::expr::eval_rule_if_with;
use super::inputs::{self, Given};
use super::Parser;
use crate::error::{Error, Location, Result};
use crate::limits::{bytes, short};
use crate::yaml::{self, join, key, merge_into, scalar, Seg};

impl Parser<'_> {
    /// Loads `file` (its `text` already read) and, depth first, its
    /// includes; records which source defined each top-level key.
    pub(super) fn load(
        &mut self,
        file: &str,
        text: String,
        depth: usize,
        given: Given<'_>,
    ) -> Result<Mapping> {
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
        let docs = yaml::load_documents(
            file,
            &text,
            self.limits,
            &self.yaml_budget,
            yaml::Dialect::Psych,
        )?;
        let idx = self.sources.len();
        self.sources.push((file.to_string(), text));
        let value = match docs.header {
            None => docs.body,
            Some(header) => {
                let vars = self.base_vars();
                let (file, text) = &self.sources[idx];
                let env = inputs::Env {
                    c: yaml::Ctx { file, text },
                    limits: self.limits,
                    budget: &self.yaml_budget,
                    vars: &vars,
                };
                let values = inputs::values(&header, given, &env)?;
                inputs::interpolate(docs.body, &values, &env)?
            }
        };
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
                let Some(Include {
                    read,
                    shown,
                    inputs,
                }) = self.include_path(entry, &path, idx)?
                else {
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
                if inputs.is_none() && !self.seen_includes.insert(shown.clone()) {
                    continue;
                }
                let content = match &read {
                    From::Project(p) => (self.read)(p),
                    From::Dir(dir, p) => crate::ProjectFiles::new(dir, self.limits).read(p),
                };
                let content = content.map_err(|source| Error::Include {
                    file: file.to_string(),
                    location: yaml::locate(&self.sources[idx].1, &path),
                    include: shown.clone(),
                    source,
                })?;
                let sub = self.load(&shown, content, depth + 1, Given::Include(inputs.as_ref()))?;
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

    /// Where to read an `include:` entry from; `None` when its `rules`
    /// skip it or it cannot be read locally (then with a warning).
    fn include_path(&mut self, entry: &Value, path: &[Seg], src: usize) -> Result<Option<Include>> {
        let (file, text) = &self.sources[src];
        let c = yaml::Ctx { file, text };
        let mut inputs = None;
        let (local, project_dir) = match entry {
            Value::String(s) if s.starts_with("https://") || s.starts_with("http://") => {
                let w = format!(
                    "{file}: include `{}` skipped: remote files are not fetched; save it in the \
                     project and include it as `local`",
                    short(s)
                );
                self.warnings.push(w);
                return Ok(None);
            }
            Value::String(s) => (s.clone(), None),
            Value::Mapping(m) => {
                if let Some(rules) = m.get("rules") {
                    let vars = self.base_vars();
                    let rules_path = join(path, &[key("rules")]);
                    if !self.include_rules_match(rules, &vars, &rules_path, &c)? {
                        return Ok(None);
                    }
                }
                inputs = match m.get("inputs") {
                    None | Some(Value::Null) => None,
                    Some(Value::Mapping(i)) => Some(i.clone()),
                    Some(_) => {
                        return Err(
                            c.err(&join(path, &[key("inputs")]), "`inputs` must be a mapping")
                        )
                    }
                };
                if let Some(s) = m.get("local").and_then(Value::as_str) {
                    (s.to_string(), None)
                } else if let Some(project) = m.get("project").and_then(Value::as_str) {
                    let files = match m.get("file") {
                        Some(f) => yaml::strings(f),
                        None => None,
                    };
                    let Some(files) = files else {
                        return Err(
                            c.err(path, "`include: project` needs `file` (a path or a list)")
                        );
                    };
                    let Some(dir) = self
                        .opts
                        .include_projects
                        .iter()
                        .find(|(p, _)| p.trim_matches('/') == project.trim_matches('/'))
                        .map(|(_, d)| d.clone())
                    else {
                        let w = format!(
                            "{file}: include project `{}` skipped: pass --include-project {}=DIR \
                             (a local checkout of it) to read it",
                            short(project),
                            short(project)
                        );
                        self.warnings.push(w);
                        return Ok(None);
                    };
                    if files.len() != 1 {
                        // Each file of a multi-file project include is its own entry.
                        return Err(c.err(
                            path,
                            "`include: project` with several files: write one entry per file",
                        ));
                    }
                    (files[0].clone(), Some(dir))
                } else {
                    let kind = ["remote", "template", "component"]
                        .into_iter()
                        .find(|k| m.contains_key(*k));
                    let Some(kind) = kind else {
                        return Err(c.err(
                            path,
                            "an include needs one of local, project, remote, template or component",
                        ));
                    };
                    let what = m.get(kind).and_then(scalar).unwrap_or_default();
                    let how = match kind {
                        "remote" => "remote files are not fetched; save it in the project and include it as `local`",
                        "template" => "GitLab's templates are not bundled with kiln; copy it into the project and include it as `local`",
                        _ => "components are not fetched; include a local checkout's template as `local` or with --include-project",
                    };
                    self.warnings.push(format!(
                        "{file}: include {kind} `{}` skipped: {how}",
                        short(&what)
                    ));
                    return Ok(None);
                }
            }
            _ => return Err(c.err(path, "an include must be a path or a mapping")),
        };
        let (file, text) = &self.sources[src];
        let c = yaml::Ctx { file, text };
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
        Ok(Some(match project_dir {
            None => Include {
                shown: trimmed.clone(),
                read: From::Project(trimmed),
                inputs,
            },
            Some(dir) => Include {
                shown: format!("{}/{trimmed}", dir.display()),
                read: From::Dir(dir, trimmed),
                inputs,
            },
        }))
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

/// Where an include is read from.
enum From {
    /// A path in this project (through the caller's `read`).
    Project(String),
    /// A path in another project's local checkout (`--include-project`).
    Dir(std::path::PathBuf, String),
}

/// One include to read.
struct Include {
    read: From,
    /// The name errors use.
    shown: String,
    inputs: Option<Mapping>,
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
    fn includes_that_cannot_be_read_locally_are_skipped_with_a_warning() {
        for (entry, says) in [
            (
                "https://example.com/ci.yml",
                "include `https://example.com/ci.yml` skipped",
            ),
            (
                "{project: group/p, file: ci.yml}",
                "include project `group/p` skipped: pass --include-project group/p=DIR",
            ),
            (
                "{remote: 'https://x/y.yml'}",
                "include remote `https://x/y.yml` skipped",
            ),
            (
                "{template: Auto-DevOps.gitlab-ci.yml}",
                "include template `Auto-DevOps.gitlab-ci.yml` skipped",
            ),
            (
                "{component: 'gitlab.com/a/b/c@1.0'}",
                "include component `gitlab.com/a/b/c@1.0` skipped",
            ),
        ] {
            let p = parse_files(&format!("include:\n  - {entry}\nj:\n  script: x\n"), &[])
                .unwrap_or_else(|e| panic!("{entry}: {e}"));
            assert_eq!(names(&p), ["j"], "{entry}");
            assert!(
                p.warnings.iter().any(|w| w.contains(says)),
                "{entry}: {:?}",
                p.warnings
            );
        }
    }

    #[test]
    fn includes_that_cannot_be_read_are_errors_at_the_entry() {
        for (entry, says) in [
            ("ci/*.yml", "wildcard include"),
            ("../outside.yml", "leaves the project"),
            (
                "missing.yml",
                ".gitlab-ci.yml:4:3: cannot read included file `missing.yml`",
            ),
            ("{file: x.yml}", "needs one of local, project"),
        ] {
            let e = parse_files(&format!("j:\n  script: x\ninclude:\n  - {entry}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{entry}: {e}");
        }
    }

    #[test]
    fn a_mapped_project_is_read_from_its_directory() {
        let dir = std::env::temp_dir().join(format!("kiln-inc-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("templates")).unwrap();
        std::fs::write(dir.join("templates/build.yml"), ".build:\n  script: make\n").unwrap();
        let opts = Options {
            include_projects: vec![("group/ci".into(), dir.clone())],
            ..Options::default()
        };
        let main = "include:\n  - project: group/ci\n    ref: v1\n    file: /templates/build.yml\n\
                    b:\n  extends: .build\n";
        let p = parse_with(main, &ctx(), &opts, &[]);
        std::fs::remove_dir_all(&dir).unwrap();
        let p = p.unwrap();
        assert_eq!(names(&p), ["b"]);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
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
