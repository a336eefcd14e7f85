//! `needs:`: a job's dependencies, resolved to the names of the jobs in
//! the pipeline (a `parallel` job's key names all its instances,
//! `parallel: matrix` entries name some), then the check that the whole
//! pipeline has a run order (no cycles).

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml::Value;

use super::parallel::{matrix_entry, matrix_name};
use super::Parser;
use crate::error::{Error, Result};
use crate::limits::short;
use crate::spec::JobSpec;
use crate::yaml::{join, key, Seg};

impl Parser<'_> {
    /// Sets `needs` of the jobs in `raw` (index into `jobs`, job key, the
    /// `needs:` value) to job names.
    pub(super) fn link_needs(
        &self,
        jobs: &mut [JobSpec],
        raw: Vec<(usize, String, Value)>,
        groups: &BTreeMap<String, Vec<String>>,
        excluded: &[String],
    ) -> Result<()> {
        let known: BTreeSet<String> = jobs.iter().map(|j| j.name.clone()).collect();
        for (idx, name, needs) in raw {
            let resolved = self.resolve_needs(&name, &needs, &known, groups, excluded)?;
            let size = resolved
                .iter()
                .map(|n| n.len() + crate::NODE_BYTES)
                .fold(0usize, usize::saturating_add);
            self.charge_out(size, Some(&name), &format!("{name}.needs"))?;
            jobs[idx].needs = Some(resolved);
        }
        Ok(())
    }

    /// Fails, at the `needs` of a job on a cycle, when `jobs` (in stage
    /// order) have no run order.
    pub(super) fn check_order(&self, jobs: &[JobSpec], stages: &[String]) -> Result<()> {
        let all: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        if let Err(Error::Invalid { path, message, .. }) =
            crate::order::run_order(jobs, stages, &all)
        {
            let id = jobs
                .iter()
                .find(|j| j.name == path)
                .map(|j| j.id.clone())
                .unwrap_or(path);
            return Err(self.err(&[key(&id), key("needs")], message));
        }
        Ok(())
    }

    /// Job `job`'s `needs:` as job names. `known` are the jobs in the
    /// pipeline, `groups` the instances of each `parallel` job, `excluded`
    /// those the rules left out (for the message).
    fn resolve_needs(
        &self,
        job: &str,
        needs: &Value,
        known: &BTreeSet<String>,
        groups: &BTreeMap<String, Vec<String>>,
        excluded: &[String],
    ) -> Result<Vec<String>> {
        let path = [key(job), key("needs")];
        let list = match needs {
            Value::Sequence(s) => s.clone(),
            Value::Null => Vec::new(),
            other => vec![other.clone()],
        };
        if list.len() > self.limits.max_needs {
            return Err(self.limit(
                &path,
                format!(
                    "a job may need at most {} jobs (max_needs)",
                    self.limits.max_needs
                ),
            ));
        }
        let mut out = Vec::new();
        for (i, entry) in list.iter().enumerate() {
            let ep = join(&path, &[Seg::Index(i)]);
            let (name, optional, matrix) = match entry {
                Value::String(s) => (s.clone(), false, None),
                Value::Mapping(m) => {
                    if m.contains_key("pipeline") || m.contains_key("project") {
                        continue; // cross-pipeline artifacts: nothing to run locally
                    }
                    let Some(name) = m.get("job").and_then(Value::as_str) else {
                        return Err(self.err(&ep, "a `needs` entry needs a `job`"));
                    };
                    let optional = m.get("optional").and_then(Value::as_bool).unwrap_or(false);
                    let matrix = m.get("parallel").and_then(|p| p.get("matrix")).cloned();
                    (name.to_string(), optional, matrix)
                }
                _ => return Err(self.err(&ep, "a `needs` entry must be a job name or mapping")),
            };
            let names: Vec<String> = if let Some(Value::Sequence(entries)) = matrix {
                entries
                    .iter()
                    .filter_map(|e| {
                        matrix_entry(e, self.limits.max_parallel, self.out_budget.left()).ok()
                    })
                    .flatten()
                    .map(|vars| matrix_name(&name, &vars))
                    .collect()
            } else if known.contains(&name) {
                vec![name.clone()]
            } else if let Some(g) = groups.get(&name) {
                g.iter().filter(|n| known.contains(*n)).cloned().collect()
            } else {
                Vec::new()
            };
            let missing: Vec<&String> = names.iter().filter(|n| !known.contains(*n)).collect();
            if names.is_empty() || !missing.is_empty() {
                if optional {
                    continue;
                }
                let why = if excluded.contains(&name) {
                    "which is not in the pipeline (excluded by its rules)"
                } else {
                    "which does not exist"
                };
                return Err(self.err(
                    &ep,
                    format!("job `{}` needs `{}`, {why}", short(job), short(&name)),
                ));
            }
            out.extend(names);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{job, parse_err, parse_ok};

    fn needs<'a>(p: &'a super::super::GitlabPipeline, name: &str) -> Vec<&'a str> {
        job(p, name)
            .needs
            .iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn a_parallel_key_needs_every_instance_a_matrix_entry_some() {
        let p = parse_ok(
            "b:\n  stage: build\n  script: x\n  parallel:\n    matrix:\n      - {OS: [linux, mac]}\n\
             all:\n  script: x\n  needs: [b]\n\
             one:\n  script: x\n  needs:\n    - job: b\n      parallel:\n        matrix:\n          - {OS: mac}\n\
             nothing:\n  script: x\n  needs: []\n\
             stage:\n  script: x\n",
        );
        assert_eq!(needs(&p, "all"), ["b: [linux]", "b: [mac]"]);
        assert_eq!(needs(&p, "one"), ["b: [mac]"]);
        assert!(job(&p, "nothing").needs.as_ref().unwrap().is_empty());
        // No `needs:`: the stage order decides.
        assert_eq!(job(&p, "stage").needs, None);
    }

    #[test]
    fn optional_and_cross_pipeline_needs_are_skipped() {
        let p = parse_ok(
            "j:\n  script: x\n  needs:\n    - {job: gone, optional: true}\n\
             \x20   - {pipeline: $PARENT, job: other}\n",
        );
        assert!(needs(&p, "j").is_empty());
    }

    #[test]
    fn missing_excluded_and_cyclic_needs_are_errors() {
        let e = parse_err("j:\n  script: x\n  needs: [gone]\n");
        assert!(
            e.contains("job `j` needs `gone`, which does not exist"),
            "{e}"
        );
        let e = parse_err("k:\n  script: x\n  when: never\nj:\n  script: x\n  needs: [k]\n");
        assert!(e.contains("excluded by its rules"), "{e}");
        let e = parse_err("a:\n  script: x\n  needs: [b]\nb:\n  script: x\n  needs: [a]\n");
        assert!(e.contains("cycle"), "{e}");
        assert!(e.contains(".needs:"), "{e}");
    }
}
