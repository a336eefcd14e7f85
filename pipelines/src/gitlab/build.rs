//! The passes after `!reference`, in order: `stages`, `default:`, global
//! `variables`, `workflow: rules`, `extends`, then every job (each
//! `parallel` instance) to a [`JobSpec`], then `needs`, then stage order.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use super::rules::Outcome;
use super::stages::{sort_by_stage, stage_positions};
use super::variables::VarKey;
use super::{is_job, GitlabPipeline, Parser};
use crate::error::Result;
use crate::limits::printable;
use crate::spec::JobSpec;
use crate::yaml::{self, key};

impl Parser<'_> {
    /// The pipeline, from the merged top level with `!reference` resolved.
    pub(super) fn build(mut self, mut top: Mapping) -> Result<GitlabPipeline> {
        let mut excluded = Vec::new();
        let stages = self.stages(&top)?;
        let stage_pos = stage_positions(&stages);
        let default = self.default_mapping(&top)?;
        let mut global_vars = match top.get("variables") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => self.variables(v, &[key("variables")])?,
        };
        if let Some(rules) = top.get("workflow").and_then(|w| w.get("rules")) {
            match self.workflow_rules(rules, &global_vars)? {
                Outcome::Excluded(why) if !self.opts.force_jobs.is_empty() => {
                    self.warnings.push(format!(
                        "`workflow: rules` exclude this pipeline ({why}); --force goes on"
                    ));
                }
                Outcome::Excluded(why) => {
                    let names: Vec<String> = top
                        .keys()
                        .filter_map(Value::as_str)
                        .filter(|k| is_job(k))
                        .map(String::from)
                        .collect();
                    let why_excluded = names
                        .iter()
                        .map(|n| (n.clone(), format!("workflow: {why}")))
                        .collect();
                    self.warnings.push(format!(
                        "`workflow: rules` exclude this pipeline ({why}; source {}, ref {})",
                        self.opts.pipeline_source,
                        super::predefined::Pipeline::of(self.ctx, self.opts)
                            .ref_name()
                            .unwrap_or("(none)")
                    ));
                    return Ok(GitlabPipeline {
                        stages,
                        jobs: Vec::new(),
                        excluded: names,
                        why_excluded,
                        warnings: printable(self.warnings),
                        parallel_groups: BTreeMap::new(),
                    });
                }
                Outcome::Included { vars, .. } => {
                    global_vars.extend(vars.into_iter().map(|(k, v)| (VarKey(k, true), v)));
                }
            }
        }
        let names: Vec<String> = top
            .keys()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect();
        for name in names.iter().filter(|n| is_job(n)) {
            self.check_job_name(name, &[key(name)])?;
        }
        let resolved = self.resolve_all_extends(&names, &top)?;
        top.clear();
        let mut jobs: Vec<JobSpec> = Vec::new();
        let mut groups = BTreeMap::new();
        let mut raw_needs: Vec<(usize, String, Value)> = Vec::new();
        let mut instances_made = 0usize;
        for name in names.iter().filter(|n| is_job(n)) {
            let Some(job) = resolved.get(name) else {
                continue;
            };
            let job = self.apply_default(job, &default);
            self.charge_out(
                yaml::mapping_size(&job, self.out_budget.left().saturating_add(1)),
                Some(name),
                name,
            )?;
            if job.contains_key("trigger") && !job.contains_key("script") {
                self.warnings
                    .push(format!("{name}: trigger jobs are not run locally"));
                excluded.push(name.clone());
                self.why_excluded
                    .insert(name.clone(), "trigger: (not run locally)".into());
                continue;
            }
            let instances = self.expand_parallel(name, &job)?;
            instances_made = instances_made.saturating_add(instances.len());
            if instances_made > self.limits.max_jobs {
                return Err(self.limit(
                    &[key(name)],
                    format!(
                        "the pipeline has more than {} jobs (max_jobs)",
                        self.limits.max_jobs
                    ),
                ));
            }
            if instances.len() > 1 || job.contains_key("parallel") {
                groups.insert(
                    name.clone(),
                    instances.iter().map(|i| i.name.clone()).collect(),
                );
            }
            for inst in instances {
                match self.job_spec(name, &job, &inst, &global_vars, &stages, &stage_pos)? {
                    Some((spec, needs)) => {
                        self.charge_out(spec.approx_bytes(), Some(name), &spec.name)?;
                        if let Some(n) = needs {
                            raw_needs.push((jobs.len(), name.clone(), n));
                        }
                        jobs.push(spec);
                    }
                    None => excluded.push(inst.name),
                }
            }
        }
        self.link_needs(&mut jobs, raw_needs, &groups, &excluded)?;
        sort_by_stage(&mut jobs, &stage_pos);
        self.check_order(&jobs, &stages)?;
        Ok(GitlabPipeline {
            stages,
            jobs,
            excluded,
            why_excluded: self.why_excluded,
            warnings: printable(self.warnings),
            parallel_groups: groups,
        })
    }
}
