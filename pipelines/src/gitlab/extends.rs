//! `default:` and `extends:`: what a job inherits. `extends` merges the
//! named jobs and templates into the job, deep and in order (a later
//! parent wins over an earlier one, the job over all of them); `default:`
//! (with the legacy top-level `image`, `services`, `before_script`,
//! `after_script`, `cache`) fills the keys the job still lacks, as far as
//! `inherit: default` allows.

use std::collections::HashMap;

use serde_yaml::{Mapping, Value};

use super::{Parser, RESERVED};
use crate::error::Result;
use crate::limits::{chain, short};
use crate::yaml::{self, key, merge_into, strings};

/// Keys a job inherits from `default:`.
const DEFAULT_KEYS: [&str; 11] = [
    "image",
    "services",
    "before_script",
    "after_script",
    "cache",
    "artifacts",
    "retry",
    "timeout",
    "interruptible",
    "tags",
    "hooks",
];

/// Top-level keys older files use instead of `default:`.
const LEGACY_DEFAULT_KEYS: [&str; 5] = [
    "image",
    "services",
    "before_script",
    "after_script",
    "cache",
];

/// Whether `inherit: default` or `inherit: variables` (`inherit`, absent,
/// `true`, `false` or a list of names) lets a job inherit `name`.
pub(super) fn inherits(inherit: Option<&Value>, name: &str) -> bool {
    match inherit {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => strings(v).is_some_and(|l| l.iter().any(|x| x == name)),
    }
}

impl Parser<'_> {
    /// `default:`, with the legacy top-level keys folded in.
    pub(super) fn default_mapping(&self, top: &Mapping) -> Result<Mapping> {
        let mut default = match top.get("default") {
            None => Mapping::new(),
            Some(Value::Mapping(m)) => m.clone(),
            Some(_) => return Err(self.err(&[key("default")], "`default` must be a mapping")),
        };
        for k in LEGACY_DEFAULT_KEYS {
            if let Some(v) = top.get(k) {
                if !default.contains_key(k) {
                    default.insert(Value::from(k), v.clone());
                }
            }
        }
        Ok(default)
    }

    /// Every job and template (`.name` mappings) with its `extends`
    /// resolved, by name.
    pub(super) fn resolve_all_extends(
        &self,
        names: &[String],
        top: &Mapping,
    ) -> Result<HashMap<String, Mapping>> {
        let mut resolved: HashMap<String, Mapping> = HashMap::new();
        for name in names {
            let hidden_scalar =
                name.starts_with('.') && !top.get(name.as_str()).is_some_and(Value::is_mapping);
            if RESERVED.contains(&name.as_str()) || hidden_scalar {
                continue;
            }
            self.resolve_extends(name, top, &mut resolved, &mut Vec::new())?;
        }
        Ok(resolved)
    }

    /// Resolves `extends` of `name` into `done` (memoised). The chain is
    /// at most `max_extends_depth` long, and every copy a merge makes is
    /// charged to the output budget first.
    fn resolve_extends(
        &self,
        name: &str,
        top: &Mapping,
        done: &mut HashMap<String, Mapping>,
        stack: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains_key(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            let mut names: Vec<&str> = stack.iter().map(String::as_str).collect();
            names.push(name);
            let first = stack.first().cloned().unwrap_or_default();
            return Err(self.err(
                &[key(&first), key("extends")],
                format!("`extends` cycle: {}", chain(&names)),
            ));
        }
        if stack.len() >= self.limits.max_extends_depth {
            let first = stack.first().cloned().unwrap_or_default();
            return Err(self.limit(
                &[key(&first), key("extends")],
                format!(
                    "`extends` is nested more than {} levels deep (max_extends_depth)",
                    self.limits.max_extends_depth
                ),
            ));
        }
        let empty = Mapping::new();
        let job = match top.get(name) {
            Some(Value::Mapping(m)) => m,
            Some(_) => {
                return Err(self.err(
                    &[key(name)],
                    format!("job `{}` must be a mapping", short(name)),
                ));
            }
            None => &empty,
        };
        let parents = match job.get("extends") {
            None => Vec::new(),
            Some(v) => strings(v).ok_or_else(|| {
                self.err(
                    &[key(name), key("extends")],
                    "`extends` must be a name or a list",
                )
            })?,
        };
        let mut base = Value::Mapping(Mapping::new());
        if !parents.is_empty() {
            stack.push(name.to_string());
            for parent in &parents {
                if top.get(parent.as_str()).is_none() {
                    return Err(self.err(
                        &[key(name), key("extends")],
                        format!("`extends` names `{}`, which does not exist", short(parent)),
                    ));
                }
                self.resolve_extends(parent, top, done, stack)?;
                let p = done.get(parent.as_str()).cloned().unwrap_or_default();
                self.charge_out(
                    yaml::mapping_size(&p, self.out_budget.left().saturating_add(1)),
                    Some(name),
                    &format!("{name}.extends"),
                )?;
                merge_into(&mut base, Value::Mapping(p));
            }
            stack.pop();
        }
        let mut own = job.clone();
        own.remove("extends");
        self.charge_out(
            yaml::mapping_size(&own, self.out_budget.left().saturating_add(1)),
            Some(name),
            name,
        )?;
        merge_into(&mut base, Value::Mapping(own));
        let merged = match base {
            Value::Mapping(m) => m,
            _ => Mapping::new(),
        };
        done.insert(name.to_string(), merged);
        Ok(())
    }

    /// `job` with the keys of `default` it lacks and may inherit.
    pub(super) fn apply_default(&self, job: &Mapping, default: &Mapping) -> Mapping {
        let inherit = job.get("inherit").and_then(|i| i.get("default"));
        let mut out = job.clone();
        for k in DEFAULT_KEYS {
            if !out.contains_key(k) && inherits(inherit, k) {
                if let Some(v) = default.get(k) {
                    out.insert(Value::from(k), v.clone());
                }
            }
        }
        out
    }
}
