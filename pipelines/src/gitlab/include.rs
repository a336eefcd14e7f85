//! `include:`: reads the main file and every file it includes (nested,
//! with `rules` and `inputs`), and merges them into one top-level mapping,
//! later definitions winning. `include: local` is read from the checkout;
//! `include: project` from a local checkout when the caller maps the
//! project to a directory (`Options::include_projects`); `include: remote`
//! through the caller's fetcher (`Options::remote_includes`); `include:
//! template` from `Options::include_template_dir`. Nested
//! includes resolve as on GitLab: a `local` include is read from the
//! project of the file that names it (a mapped project's own checkout), and
//! a remote file or a template has no project, so its `local` includes
//! are errors. Components, and template, project and remote includes kiln
//! was given no way to read, are skipped with a warning that says what to do, and the rest of
//! the pipeline still loads. Depth, count and size are bounded by the
//! [`Limits`](crate::Limits).

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use super::expr::eval_rule_if_with;
use super::include_source::*;
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
        base: &Base,
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
                for Include {
                    read,
                    shown,
                    inputs,
                } in self.include_path(entry, &path, idx, base)?
                {
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
                    let (content, sub_base) = match &read {
                        From::Project(p) => ((self.read)(p), Base::Project),
                        From::Dir(dir, p) => (
                            crate::ProjectFiles::new(dir, self.limits).read(p),
                            Base::Dir(dir.clone()),
                        ),
                        From::Remote(url, sri) => (
                            self.fetch(url)
                                .and_then(|t| check_integrity(t, sri.as_ref())),
                            Base::NoProject("remote"),
                        ),
                        From::Template(dir, name) => (
                            crate::ProjectFiles::new(dir, self.limits).read(name),
                            Base::NoProject("template"),
                        ),
                        From::Api(f) => (
                            self.api_file(&f.project, &f.file, f.git_ref.as_deref()),
                            Base::Api(f.project.clone(), f.git_ref.clone()),
                        ),
                        From::Component(c) => match self.component(c) {
                            Ok((text, base)) => (Ok(text), base),
                            Err(e) => (Err(e), Base::NoProject("component")),
                        },
                    };
                    let content = content.map_err(|source| Error::Include {
                        file: file.to_string(),
                        location: yaml::locate(&self.sources[idx].1, &path),
                        include: shown.clone(),
                        source,
                    })?;
                    let sub = self.load(
                        &shown,
                        content,
                        depth + 1,
                        Given::Include(inputs.as_ref()),
                        &sub_base,
                    )?;
                    merge_into(&mut merged, Value::Mapping(sub));
                }
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

    /// Reads a remote include with the caller's fetcher, bounded like any
    /// pipeline file.
    fn fetch(&self, url: &str) -> std::io::Result<String> {
        let Some(fetch) = self.opts.remote_includes.fetcher() else {
            return Err(std::io::Error::other("remote includes are not fetched"));
        };
        self.bounded(fetch(url)?)
    }

    /// Reads `file` of `project` through the GitLab API, bounded like any
    /// pipeline file.
    fn api_file(
        &self,
        project: &str,
        file: &str,
        git_ref: Option<&str>,
    ) -> std::io::Result<String> {
        let Some(api) = self.opts.gitlab_api.files() else {
            return Err(std::io::Error::other(
                "no GitLab server was given (--gitlab-url)",
            ));
        };
        self.bounded(api.file(project, file, git_ref)?)
    }

    /// The text of component `c` and where its `local` includes are read:
    /// `templates/NAME.yml` or `templates/NAME/template.yml` of its
    /// project at its version, from a mapped checkout or the GitLab API.
    fn component(&self, c: &Component) -> std::io::Result<(String, Base)> {
        let paths = [
            format!("templates/{}.yml", c.name),
            format!("templates/{}/template.yml", c.name),
        ];
        let not_found = |why: Option<std::io::Error>| {
            let why = why.map(|e| format!(" ({e})")).unwrap_or_default();
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "component `{}`: neither {} nor {} exists in project {}{why}",
                    c.name, paths[0], paths[1], c.project
                ),
            )
        };
        if let Some(dir) = &c.dir {
            let files = crate::ProjectFiles::new(dir, self.limits);
            for p in &paths {
                match files.read(p) {
                    Ok(text) => return Ok((text, Base::Dir(dir.clone()))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            return Err(not_found(None));
        }
        let Some(api) = self.opts.gitlab_api.files() else {
            return Err(std::io::Error::other(
                "no GitLab server was given (--gitlab-url)",
            ));
        };
        let version = if wants_release(&c.version) {
            let tags = api.releases(&c.project)?;
            pick_release(&c.version, &tags).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "component `{}`: project {} has no release matching `{}` \
                         (of {} releases read)",
                        c.name,
                        c.project,
                        short(&c.version),
                        tags.len()
                    ),
                )
            })?
        } else {
            c.version.clone()
        };
        let mut last = None;
        for p in &paths {
            match api.file(&c.project, p, Some(&version)) {
                Ok(text) => {
                    let text = self.bounded(text)?;
                    return Ok((text, Base::Api(c.project.clone(), Some(version))));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(not_found(last))
    }

    /// `text`, unless it is larger than a pipeline file may be.
    fn bounded(&self, text: String) -> std::io::Result<String> {
        if text.len() as u64 > self.limits.max_file_bytes {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!(
                    "it is larger than {} (max_file_bytes)",
                    bytes(usize::try_from(self.limits.max_file_bytes).unwrap_or(usize::MAX))
                ),
            ));
        }
        Ok(text)
    }

    /// Where to read an `include:` entry of source `src` (read from `base`)
    /// from: one file, several (`project` with a list of files), or none
    /// when its `rules` skip it or it cannot be read (then with a warning).
    fn include_path(
        &mut self,
        entry: &Value,
        path: &[Seg],
        src: usize,
        base: &Base,
    ) -> Result<Vec<Include>> {
        let (file, text) = &self.sources[src];
        let c = yaml::Ctx { file, text };
        // GitLab expands project, group, instance and pipeline variables
        // and the predefined ones in the location (not the file's
        // `variables:`): what `base_vars` holds.
        let vars = self.base_vars();
        let ex = |s: &str, at: &[Seg]| -> Result<String> {
            expand_location(s, &vars).map_err(|m| c.err(at, m))
        };
        let mut inputs = None;
        let (local, project_dir) = match entry {
            Value::String(s) => {
                let s = ex(s, path)?;
                if is_url(&s) {
                    return Ok(self.remote(&s, None, None, src).into_iter().collect());
                }
                (s, None)
            }
            Value::Mapping(m) => {
                if let Some(rules) = m.get("rules") {
                    let rules_path = join(path, &[key("rules")]);
                    if !self.include_rules_match(rules, &vars, &rules_path, &c)? {
                        return Ok(Vec::new());
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
                    (ex(s, &join(path, &[key("local")]))?, None)
                } else if let Some(url) = m.get("remote") {
                    let url = ex(
                        url.as_str().unwrap_or_default(),
                        &join(path, &[key("remote")]),
                    )?;
                    let url = url.as_str();
                    if !is_url(url) {
                        return Err(c.err(
                            &join(path, &[key("remote")]),
                            format!(
                                "include remote `{}`: expected an http:// or https:// URL",
                                short(url)
                            ),
                        ));
                    }
                    let sri = match m.get("integrity") {
                        None | Some(Value::Null) => None,
                        Some(v) => Some(parse_integrity(v).ok_or_else(|| {
                            c.err(
                                &join(path, &[key("integrity")]),
                                "`integrity` must be `sha256-` and the file's SHA-256 in \
                                 base64 (`sha256-$(openssl dgst -sha256 -binary FILE | base64)`)",
                            )
                        })?),
                    };
                    return Ok(self.remote(url, inputs, sri, src).into_iter().collect());
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
                    let git_ref = match m.get("ref").and_then(scalar) {
                        Some(r) => Some(ex(&r, &join(path, &[key("ref")]))?),
                        None => None,
                    };
                    let project = ex(project, &join(path, &[key("project")]))?;
                    let files = files
                        .iter()
                        .map(|f| ex(f, &join(path, &[key("file")])))
                        .collect::<Result<Vec<_>>>()?;
                    return self.project(&project, &files, git_ref, inputs, path, src);
                } else if let Some(name) = m.get("template") {
                    let name = scalar(name).unwrap_or_default();
                    return Ok(self
                        .template(&name, inputs, &join(path, &[key("template")]), src)?
                        .into_iter()
                        .collect());
                } else if let Some(what) = m.get("component") {
                    let path = join(path, &[key("component")]);
                    let what = ex(&scalar(what).unwrap_or_default(), &path)?;
                    return Ok(self
                        .component_path(&what, inputs, &path, src)?
                        .into_iter()
                        .collect());
                } else {
                    return Err(c.err(
                        path,
                        "an include needs one of local, project, remote, template or component",
                    ));
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
        // A `local` include is read from the project of the file naming it.
        let project_dir = match (project_dir, base) {
            (Some(dir), _) => Some(dir),
            (None, Base::Project) => None,
            (None, Base::Dir(dir)) => Some(dir.clone()),
            (None, Base::Api(project, git_ref)) => {
                let f = ApiFile {
                    project: project.clone(),
                    file: trimmed,
                    git_ref: git_ref.clone(),
                };
                return Ok(vec![Include {
                    shown: f.shown(),
                    read: From::Api(f),
                    inputs,
                }]);
            }
            (None, Base::NoProject(kind)) => {
                return Err(c.err(
                    path,
                    format!(
                        "local include `{}` in a {kind} file: a file included with `{kind}` \
                         has no project, so GitLab refuses its `local` includes (\"Local file \
                         does not have project!\"); include that file with `remote` (its full \
                         URL) or `project`",
                        short(&local)
                    ),
                ))
            }
        };
        Ok(vec![match project_dir {
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
        }])
    }

    /// An `include: project` of source `src`: each file from the project's
    /// local checkout (`--include-project`) or through the GitLab API
    /// (`--gitlab-url`), or skipped with a warning that says what to pass.
    fn project(
        &mut self,
        project: &str,
        files: &[String],
        git_ref: Option<String>,
        inputs: Option<Mapping>,
        path: &[Seg],
        src: usize,
    ) -> Result<Vec<Include>> {
        let (file, text) = &self.sources[src];
        let c = yaml::Ctx { file, text };
        let project = project.trim_matches('/').to_string();
        let mut out = Vec::new();
        for f in files {
            let trimmed = f.trim_start_matches('/').to_string();
            if trimmed.is_empty() || trimmed.split('/').any(|part| part == "..") {
                return Err(c.err(
                    &join(path, &[key("file")]),
                    format!(
                        "include project file `{}`: expected a path in the project",
                        short(f)
                    ),
                ));
            }
            let read = if let Some(dir) = self.mapped(&project) {
                From::Dir(dir, trimmed)
            } else if self.opts.gitlab_api.files().is_some() {
                From::Api(ApiFile {
                    project: project.clone(),
                    file: trimmed,
                    git_ref: git_ref.clone(),
                })
            } else {
                let w = format!(
                    "{file}: include project `{p}` skipped: pass --gitlab-url URL (with \
                     GITLAB_TOKEN for a private project) to read it through the GitLab API, or \
                     --include-project {p}=DIR (a local checkout of it)",
                    p = short(&project),
                );
                self.warnings.push(w);
                return Ok(Vec::new());
            };
            let shown = match &read {
                From::Dir(dir, p) => format!("{}/{p}", dir.display()),
                From::Api(f) => f.shown(),
                _ => unreachable!("a project include is read from a checkout or the API"),
            };
            out.push(Include {
                read,
                shown,
                inputs: inputs.clone(),
            });
        }
        Ok(out)
    }

    /// The local checkout `--include-project` maps `project` to.
    fn mapped(&self, project: &str) -> Option<std::path::PathBuf> {
        self.opts
            .include_projects
            .iter()
            .find(|(p, _)| p.trim_matches('/') == project)
            .map(|(_, d)| d.clone())
    }

    /// An `include: component` (`HOST/GROUP/PROJECT/NAME@VERSION`) of
    /// source `src`: from the project's local checkout or the GitLab API
    /// of that host, or skipped with a warning that says what to pass.
    fn component_path(
        &mut self,
        what: &str,
        inputs: Option<Mapping>,
        path: &[Seg],
        src: usize,
    ) -> Result<Option<Include>> {
        let (file, text) = &self.sources[src];
        let c = yaml::Ctx { file, text };
        let Some((host, project, name, version)) = parse_component(what) else {
            return Err(c.err(
                path,
                format!(
                    "include component `{}`: expected HOST/GROUP/PROJECT/NAME@VERSION, such as \
                     gitlab.com/components/opentofu/full-pipeline@1.0.0",
                    short(what)
                ),
            ));
        };
        let dir = self.mapped(&project);
        if dir.is_none() {
            match self.opts.gitlab_api.files() {
                None => {
                    self.warnings.push(format!(
                        "{file}: include component `{w}` skipped: pass --gitlab-url https://{host} \
                         (with GITLAB_TOKEN for a private project) to read it through the GitLab \
                         API, or --include-project {project}=DIR (a local checkout of it)",
                        w = short(what),
                        host = short(&host),
                        project = short(&project),
                    ));
                    return Ok(None);
                }
                Some(api) if !api.host().eq_ignore_ascii_case(&host) => {
                    return Err(c.err(
                        path,
                        format!(
                            "include component `{}`: it is on {}, but the GitLab server given \
                             (--gitlab-url) is {}; GitLab reads components only from its own \
                             host (CI_SERVER_FQDN)",
                            short(what),
                            short(&host),
                            api.host()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(Some(Include {
            shown: what.to_string(),
            read: From::Component(Component {
                project,
                name,
                version,
                dir,
            }),
            inputs,
        }))
    }

    /// An `include: template` of source `src`: read from
    /// `--include-template-dir` (a name that leaves it is refused), or
    /// skipped with a warning that names it and the option.
    fn template(
        &mut self,
        name: &str,
        inputs: Option<Mapping>,
        path: &[Seg],
        src: usize,
    ) -> Result<Option<Include>> {
        let (file, text) = &self.sources[src];
        let Some(dir) = self.opts.include_template_dir.clone() else {
            self.warnings.push(format!(
                "{file}: include template `{}` skipped: GitLab's templates (lib/gitlab/ci/templates \
                 in gitlab-org/gitlab) are not bundled with kiln; pass --include-template-dir DIR \
                 (a folder holding `{}`) or copy it into the project and include it as `local`",
                short(name),
                short(name)
            ));
            return Ok(None);
        };
        let c = yaml::Ctx { file, text };
        if name.is_empty() || name.split('/').any(|part| part == "..") {
            return Err(c.err(
                path,
                format!("include template `{}`: expected a template name such as Jobs/Build.gitlab-ci.yml", short(name)),
            ));
        }
        Ok(Some(Include {
            shown: format!("{}/{}", dir.display(), name.trim_start_matches('/')),
            read: From::Template(dir, name.to_string()),
            inputs,
        }))
    }

    /// An `include: remote` of source `src`: read with the caller's
    /// fetcher, or skipped with a warning when there is none.
    fn remote(
        &mut self,
        url: &str,
        inputs: Option<Mapping>,
        sri: Option<[u8; 32]>,
        src: usize,
    ) -> Option<Include> {
        if self.opts.remote_includes.fetcher().is_none() {
            let w = format!(
                "{}: include remote `{}` skipped: remote files are not fetched here; \
                 `kiln run-job` fetches them, or save it in the project and include it as `local`",
                self.sources[src].0,
                short(url)
            );
            self.warnings.push(w);
            return None;
        }
        Some(Include {
            read: From::Remote(url.to_string(), sri),
            shown: url.to_string(),
            inputs,
        })
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

/// One include to read.
struct Include {
    read: From,
    /// The name errors use.
    shown: String,
    inputs: Option<Mapping>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::super::test_util::{ctx, job, names, parse_files, parse_with, var};
    use crate::context::Options;
    use crate::RemoteIncludes;

    /// Options whose fetcher serves `files` (URL, text) and records each
    /// URL it is asked for; other URLs are "404".
    fn serving(files: &[(&str, &str)]) -> (Options, Arc<Mutex<Vec<String>>>) {
        let files: BTreeMap<String, String> = files
            .iter()
            .map(|(u, t)| (u.to_string(), t.to_string()))
            .collect();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let opts = Options {
            remote_includes: RemoteIncludes::with(move |url| {
                log.lock().unwrap().push(url.to_string());
                files
                    .get(url)
                    .cloned()
                    .ok_or_else(|| io::Error::other(format!("HTTP 404 Not Found from {url}")))
            }),
            ..Options::default()
        };
        (opts, asked)
    }

    /// The error `main` gives and its source, as text.
    fn chain_of(main: &str, opts: &Options) -> String {
        let e = parse_with(main, &ctx(), opts, &[]).unwrap_err();
        format!("{e}: {}", std::error::Error::source(&e).unwrap())
    }

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
                "include remote `https://example.com/ci.yml` skipped: remote files are not \
                 fetched here; `kiln run-job` fetches them",
            ),
            (
                "{project: group/p, file: ci.yml}",
                "include project `group/p` skipped: pass --gitlab-url URL (with GITLAB_TOKEN \
                 for a private project) to read it through the GitLab API, or --include-project \
                 group/p=DIR",
            ),
            (
                "{remote: 'https://x/y.yml'}",
                "include remote `https://x/y.yml` skipped",
            ),
            (
                "{template: Auto-DevOps.gitlab-ci.yml}",
                "include template `Auto-DevOps.gitlab-ci.yml` skipped: GitLab's templates \
                 (lib/gitlab/ci/templates in gitlab-org/gitlab) are not bundled with kiln; pass \
                 --include-template-dir DIR (a folder holding `Auto-DevOps.gitlab-ci.yml`)",
            ),
            (
                "{component: 'gitlab.com/a/b/c@1.0'}",
                "include component `gitlab.com/a/b/c@1.0` skipped: pass --gitlab-url \
                 https://gitlab.com (with GITLAB_TOKEN for a private project) to read it through \
                 the GitLab API, or --include-project a/b=DIR",
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

    #[test]
    fn remote_includes_are_fetched_merged_and_nested_as_on_gitlab() {
        let (opts, asked) = serving(&[
            (
                "https://ci.example.com/t/build.yml",
                "include:\n  - remote: https://ci.example.com/t/common.yml\n\
                 .build:\n  image: golang:1.22\n  script: make\n",
            ),
            (
                "https://ci.example.com/t/common.yml",
                "variables: {FROM_REMOTE: common}\n",
            ),
            (
                "https://ci.example.com/t/inputs.yml",
                "spec:\n  inputs:\n    stage: {default: test}\n---\n\
                 lint:\n  stage: $[[ inputs.stage ]]\n  script: lint\n",
            ),
        ]);
        let main = "stages: [build, check]\n\
                    include:\n  - https://ci.example.com/t/build.yml\n\
                    \x20 - remote: https://ci.example.com/t/inputs.yml\n    inputs: {stage: check}\n\
                    \x20 - remote: https://ci.example.com/t/build.yml\n\
                    b:\n  stage: build\n  extends: .build\n";
        let p = parse_with(main, &ctx(), &opts, &[]).unwrap();
        assert_eq!(names(&p), ["b", "lint"]);
        assert_eq!(job(&p, "b").image, "golang:1.22");
        assert_eq!(var(job(&p, "b"), "FROM_REMOTE"), Some("common"));
        assert_eq!(job(&p, "lint").stage.as_deref(), Some("check"));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        // A file included twice is read once, as a local one is.
        assert_eq!(
            *asked.lock().unwrap(),
            [
                "https://ci.example.com/t/build.yml",
                "https://ci.example.com/t/common.yml",
                "https://ci.example.com/t/inputs.yml",
            ]
        );
    }

    #[test]
    fn a_remote_include_that_cannot_be_fetched_is_an_error_at_its_entry() {
        let (opts, _) = serving(&[("https://ci.example.com/big.yml", &"x".repeat(64))]);
        let chain = chain_of(
            "j:\n  script: x\ninclude:\n  - remote: https://ci.example.com/gone.yml\n",
            &opts,
        );
        assert_eq!(
            chain,
            ".gitlab-ci.yml:4:3: cannot read included file `https://ci.example.com/gone.yml`: \
             HTTP 404 Not Found from https://ci.example.com/gone.yml"
        );
        // What the fetcher returns is bounded like any pipeline file.
        let mut small = opts.clone();
        small.limits.max_file_bytes = 48;
        let e = parse_with(
            "include: https://ci.example.com/big.yml\n",
            &ctx(),
            &small,
            &[],
        )
        .unwrap_err();
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert!(
            source
                .as_deref()
                .is_some_and(|s| s.contains("max_file_bytes")),
            "{e}: {source:?}"
        );
        // Only http(s) URLs.
        let e = parse_with(
            "include:\n  - remote: file:///etc/passwd\n",
            &ctx(),
            &opts,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("include remote `file:///etc/passwd`: expected an http:// or https:// URL"),
            "{e}"
        );
    }

    #[test]
    fn local_includes_of_a_remote_file_are_refused_as_gitlab_does() {
        // GitLab reads a remote file without a project: its `local`
        // includes fail with "Local file ... does not have project!".
        let (opts, _) = serving(&[(
            "https://ci.example.com/a.yml",
            "include:\n  - local: b.yml\na:\n  script: x\n",
        )]);
        let e = parse_with(
            "include: https://ci.example.com/a.yml\n",
            &ctx(),
            &opts,
            &[("b.yml", "b:\n  script: x\n")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(
                "https://ci.example.com/a.yml:2:3: include[0]: local include `b.yml` in a remote file"
            ),
            "{e}"
        );
    }

    #[test]
    fn local_includes_of_a_mapped_project_are_read_from_that_project() {
        // `include: project` changes the project: its `local` includes are
        // that project's files, not the main checkout's.
        let dir = std::env::temp_dir().join(format!("kiln-inc-nested-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("ci")).unwrap();
        std::fs::write(dir.join("ci/all.yml"), "include: /ci/jobs.yml\n").unwrap();
        std::fs::write(dir.join("ci/jobs.yml"), "from-lib:\n  script: x\n").unwrap();
        let opts = Options {
            include_projects: vec![("group/lib".into(), dir.clone())],
            ..Options::default()
        };
        let main = "include:\n  - project: group/lib\n    file: ci/all.yml\n";
        let p = parse_with(
            main,
            &ctx(),
            &opts,
            &[("ci/jobs.yml", "from-main:\n  script: x\n")],
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names(&p.unwrap()), ["from-lib"]);
    }

    #[test]
    fn templates_are_read_from_the_template_dir() {
        let dir = std::env::temp_dir().join(format!("kiln-inc-tpl-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("Jobs")).unwrap();
        std::fs::write(
            dir.join("Jobs/Build.gitlab-ci.yml"),
            "include:\n  - template: Jobs/Test.gitlab-ci.yml\nbuild:\n  script: make\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("Jobs/Test.gitlab-ci.yml"),
            "test:\n  script: make test\n",
        )
        .unwrap();
        std::fs::write(dir.join("Bad.gitlab-ci.yml"), "include: local.yml\n").unwrap();
        let opts = Options {
            include_template_dir: Some(dir.clone()),
            ..Options::default()
        };
        let parse =
            |main: &str| parse_with(main, &ctx(), &opts, &[("local.yml", "l:\n  script: x\n")]);
        let p = parse("include:\n  - template: Jobs/Build.gitlab-ci.yml\n");
        let missing = parse("include:\n  - template: Nope.gitlab-ci.yml\n");
        let escape = parse("include:\n  - template: ../x.yml\n");
        let local = parse("include:\n  - template: Bad.gitlab-ci.yml\n");
        std::fs::remove_dir_all(&dir).unwrap();
        let p = p.unwrap();
        // A file's includes come first, as for local ones.
        assert_eq!(names(&p), ["test", "build"]);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let e = missing.unwrap_err().to_string();
        assert!(
            e.starts_with(".gitlab-ci.yml:2:3: cannot read included file")
                && e.contains("Nope.gitlab-ci.yml"),
            "{e}"
        );
        let e = escape.unwrap_err().to_string();
        assert!(e.contains("expected a template name"), "{e}");
        let e = local.unwrap_err().to_string();
        assert!(
            e.contains("local include `local.yml` in a template file"),
            "{e}"
        );
    }

    /// A GitLab server in memory: files by (project, path, ref), the
    /// default branch `main`, releases by project; records each request.
    struct FakeGitlab {
        files: Vec<(&'static str, &'static str, &'static str, &'static str)>,
        releases: Vec<(&'static str, &'static str)>,
        asked: Arc<Mutex<Vec<String>>>,
    }

    impl crate::GitlabFiles for FakeGitlab {
        fn host(&self) -> &str {
            "gitlab.example.com"
        }

        fn file(&self, project: &str, file: &str, git_ref: Option<&str>) -> io::Result<String> {
            let r = git_ref.unwrap_or("main");
            self.asked
                .lock()
                .unwrap()
                .push(format!("{project}:{file}@{r}"));
            self.files
                .iter()
                .find(|f| (f.0, f.1, f.2) == (project, file, r))
                .map(|f| f.3.to_string())
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "404 File Not Found"))
        }

        fn releases(&self, project: &str) -> io::Result<Vec<String>> {
            self.asked
                .lock()
                .unwrap()
                .push(format!("{project}:releases"));
            Ok(self
                .releases
                .iter()
                .filter(|r| r.0 == project)
                .map(|r| r.1.to_string())
                .collect())
        }
    }

    fn gitlab(
        files: Vec<(&'static str, &'static str, &'static str, &'static str)>,
        releases: Vec<(&'static str, &'static str)>,
    ) -> (Options, Arc<Mutex<Vec<String>>>) {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let opts = Options {
            gitlab_api: crate::GitlabApi::with(FakeGitlab {
                files,
                releases,
                asked: asked.clone(),
            }),
            ..Options::default()
        };
        (opts, asked)
    }

    #[test]
    fn project_includes_are_read_through_the_gitlab_api() {
        let (opts, asked) = gitlab(
            vec![
                (
                    "group/ci",
                    "build.yml",
                    "v1",
                    "include: /common.yml\n.build:\n  script: make\n",
                ),
                ("group/ci", "common.yml", "v1", "variables: {FROM: v1}\n"),
                ("group/ci", "lint.yml", "main", "lint:\n  script: lint\n"),
                ("group/ci", "test.yml", "main", "test:\n  script: test\n"),
            ],
            Vec::new(),
        );
        let main = "include:\n  - project: /group/ci\n    ref: v1\n    file: /build.yml\n\
                    \x20 - project: group/ci\n    file: [lint.yml, test.yml]\n\
                    b:\n  extends: .build\n";
        let p = parse_with(
            main,
            &ctx(),
            &opts,
            &[("common.yml", "from-main:\n  script: x\n")],
        )
        .unwrap();
        assert_eq!(names(&p), ["lint", "test", "b"]);
        // The nested `local` include is the included project's, at its ref.
        assert_eq!(var(job(&p, "b"), "FROM"), Some("v1"));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(
            *asked.lock().unwrap(),
            [
                "group/ci:build.yml@v1",
                "group/ci:common.yml@v1",
                "group/ci:lint.yml@main",
                "group/ci:test.yml@main"
            ]
        );
        // A missing file is an error at its entry, naming project, file and ref.
        let chain = chain_of(
            "include:\n  - project: group/ci\n    ref: v2\n    file: build.yml\n",
            &opts,
        );
        assert_eq!(
            chain,
            ".gitlab-ci.yml:2:3: cannot read included file `group/ci/build.yml@v2`: 404 File Not \
             Found"
        );
        // `..` cannot leave the project.
        let e = parse_with(
            "include:\n  - project: group/ci\n    file: ../x.yml\n",
            &ctx(),
            &opts,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("expected a path in the project"), "{e}");
    }

    #[test]
    fn components_are_read_at_their_version_through_the_gitlab_api() {
        let (opts, asked) = gitlab(
            vec![
                (
                    "comp/go",
                    "templates/build.yml",
                    "1.2.0",
                    "go-build-1.2.0:\n  script: x\n",
                ),
                (
                    "comp/go",
                    "templates/build.yml",
                    "1.10.1",
                    "go-build-1.10.1:\n  script: x\n",
                ),
                (
                    "comp/go",
                    "templates/lint/template.yml",
                    "2.0.0",
                    "spec:\n  inputs:\n    stage: {default: test}\n---\n\
                     go-lint:\n  stage: $[[ inputs.stage ]]\n  script: x\n",
                ),
            ],
            vec![
                ("comp/go", "1.2.0"),
                ("comp/go", "1.10.1"),
                ("comp/go", "2.0.0"),
                ("comp/go", "2.1.0-rc1"),
                ("comp/go", "not-a-version"),
            ],
        );
        let parse = |entry: &str| {
            parse_with(
                &format!("stages: [build, check, test]\ninclude:\n  - {entry}\n"),
                &ctx(),
                &opts,
                &[],
            )
        };
        for (entry, job_name) in [
            (
                "component: gitlab.example.com/comp/go/build@1.2.0",
                "go-build-1.2.0",
            ),
            // A partial version is its highest release; ~latest the highest of all.
            (
                "component: gitlab.example.com/comp/go/build@1",
                "go-build-1.10.1",
            ),
            (
                "component: gitlab.example.com/comp/go/build@1.10",
                "go-build-1.10.1",
            ),
            (
                "{component: gitlab.example.com/comp/go/lint@~latest, inputs: {stage: check}}",
                "go-lint",
            ),
        ] {
            let p = parse(entry).unwrap_or_else(|e| panic!("{entry}: {e}"));
            assert_eq!(names(&p), [job_name], "{entry}");
            assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        }
        let p =
            parse("{component: gitlab.example.com/comp/go/lint@~latest, inputs: {stage: check}}")
                .unwrap();
        assert_eq!(job(&p, "go-lint").stage.as_deref(), Some("check"));
        assert!(asked
            .lock()
            .unwrap()
            .contains(&"comp/go:templates/lint/template.yml@2.0.0".to_string()));
        for (entry, says) in [
            (
                "component: gitlab.example.com/comp/go/nope@1.2.0",
                "component `nope`: neither templates/nope.yml nor templates/nope/template.yml \
                 exists in project comp/go",
            ),
            (
                "component: gitlab.example.com/comp/go/build@3",
                "project comp/go has no release matching `3` (of 5 releases read)",
            ),
        ] {
            let e = parse(entry).unwrap_err();
            let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
            assert!(chain.contains(says), "{entry}: {chain}");
        }
        for (entry, says) in [
            (
                "component: gitlab.com/comp/go/build@1.2.0",
                "it is on gitlab.com, but the GitLab server given (--gitlab-url) is \
                 gitlab.example.com",
            ),
            (
                "component: gitlab.example.com/go@1",
                "expected HOST/GROUP/PROJECT/NAME@VERSION",
            ),
            (
                "component: gitlab.example.com/a/../b@1",
                "expected HOST/GROUP/PROJECT/NAME@VERSION",
            ),
        ] {
            let e = parse(entry).unwrap_err().to_string();
            assert!(e.contains(says), "{entry}: {e}");
        }
    }

    #[test]
    fn a_component_of_a_mapped_project_is_read_from_its_checkout() {
        let dir = tempfile_dir("comp");
        std::fs::create_dir_all(dir.join("templates/deploy")).unwrap();
        std::fs::write(
            dir.join("templates/deploy/template.yml"),
            "deploy:\n  script: x\n",
        )
        .unwrap();
        // CI_SERVER_FQDN comes from the checkout's remote.
        let mut on_gitlab_com = ctx();
        on_gitlab_com.remote_url = Some("git@gitlab.com:demo/demo.git".into());
        let opts = Options {
            include_projects: vec![("comp/ops".into(), dir.clone())],
            ..Options::default()
        };
        let p = parse_with(
            "include:\n  - component: $CI_SERVER_FQDN/comp/ops/deploy@1.0.0\n",
            &on_gitlab_com,
            &opts,
            &[],
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names(&p.unwrap()), ["deploy"]);
    }

    fn tempfile_dir(what: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("kiln-inc-{what}-{}", std::process::id()))
    }

    #[test]
    fn include_locations_expand_pipeline_and_predefined_variables_only() {
        let mut c = ctx();
        c.extra_vars = vec![("CI_DIR".into(), "ci".into()), ("REF".into(), "v2".into())];
        let (mut opts, asked) = gitlab(
            vec![(
                "demo/lib",
                "jobs/main.yml",
                "v2",
                "from-lib:\n  script: x\n",
            )],
            Vec::new(),
        );
        let files = [("ci/main.yml", "from-local:\n  script: x\n")];
        let main = "include:\n  - local: $CI_DIR/${CI_COMMIT_BRANCH}.yml\n\
                    \x20 - project: $CI_PROJECT_NAME/lib\n    ref: $REF\n    file: jobs/${CI_COMMIT_BRANCH}.yml\n";
        let p = parse_with(main, &c, &opts, &files).unwrap();
        assert_eq!(names(&p), ["from-local", "from-lib"]);
        assert_eq!(*asked.lock().unwrap(), ["demo/lib:jobs/main.yml@v2"]);
        // The file's own `variables:` are not used, as on GitLab.
        let e = parse_with(
            "variables: {DIR: ci}\ninclude:\n  - local: $DIR/main.yml\n",
            &c,
            &opts,
            &files,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            ".gitlab-ci.yml:3:5: include[0].local: include `$DIR/main.yml`: variable `DIR` is not \
             defined here; GitLab expands only project, group and instance variables (give them \
             with --var DIR=VALUE) and predefined ones in `include:`, not those of `variables:`"
        );
        // `$$` is a dollar; a remote URL is expanded before it is checked.
        opts.remote_includes = crate::RemoteIncludes::with(|url| {
            assert_eq!(url, "https://ci.example.com/v2/a$b.yml");
            Ok("r:\n  script: x\n".into())
        });
        let p = parse_with(
            "include: https://ci.example.com/$REF/a$$b.yml\n",
            &c,
            &opts,
            &[],
        )
        .unwrap();
        assert_eq!(names(&p), ["r"]);
    }

    #[test]
    fn remote_includes_with_integrity_are_checked() {
        // sha256-$(printf 'r:\n  script: x\n' | openssl dgst -sha256 -binary | base64)
        let good = "sha256-PxiQ6AY3ZcvkLvgN2ucmqUxrUNOLYjWxS+KExwOl/us=";
        let (opts, _) = serving(&[("https://ci.example.com/r.yml", "r:\n  script: x\n")]);
        let parse = |sri: &str| {
            parse_with(
                &format!(
                    "include:\n  - remote: https://ci.example.com/r.yml\n    integrity: '{sri}'\n"
                ),
                &ctx(),
                &opts,
                &[],
            )
        };
        assert_eq!(names(&parse(good).unwrap()), ["r"]);
        let other = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        let e = parse(other).unwrap_err();
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert_eq!(
            chain,
            format!(
                ".gitlab-ci.yml:2:3: cannot read included file `https://ci.example.com/r.yml`: \
                 integrity check failed: `integrity:` wants {other} but the file is {good}; the \
                 file changed since `integrity` was written: check the new version, then update \
                 `integrity`"
            )
        );
        for bad in ["sha512-abc", "sha256-not base64!", "sha256-YWJj"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.starts_with(".gitlab-ci.yml:3:5: include[0].integrity: `integrity` must be"),
                "{bad}: {e}"
            );
        }
    }
}
