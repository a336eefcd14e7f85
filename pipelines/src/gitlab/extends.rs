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

#[cfg(test)]
mod tests {
    use super::super::test_util::{commands, job, parse_err, parse_ok, parse_with, var};
    use super::*;
    use crate::context::Options;

    #[test]
    fn later_parents_win_and_the_job_wins_over_all() {
        let p = parse_ok(
            ".a:\n  variables: {X: a, Y: a, Z: a}\n  script: [from-a]\n\
             .b:\n  variables: {Y: b, Z: b}\n\
             j:\n  extends: [.a, .b]\n  variables: {Z: j}\n",
        );
        let j = job(&p, "j");
        assert_eq!(var(j, "X"), Some("a"));
        assert_eq!(var(j, "Y"), Some("b"));
        assert_eq!(var(j, "Z"), Some("j"));
        assert_eq!(commands(&j.steps[0].script), ["from-a"]);
    }

    #[test]
    fn lists_are_replaced_not_merged() {
        let p = parse_ok(".t:\n  script: [one, two]\nj:\n  extends: .t\n  script: [three]\n");
        assert_eq!(commands(&job(&p, "j").steps[0].script), ["three"]);
    }

    #[test]
    fn chains_resolve_through_every_level() {
        let p = parse_ok(
            ".a:\n  image: alpine\n  script: [a]\n\
             .b:\n  extends: .a\n  variables: {B: '1'}\n\
             j:\n  extends: .b\n",
        );
        let j = job(&p, "j");
        assert_eq!(j.image, "alpine");
        assert_eq!(var(j, "B"), Some("1"));
    }

    #[test]
    fn cycles_and_missing_parents_are_errors() {
        let e = parse_err("a:\n  extends: b\n  script: x\nb:\n  extends: a\n  script: x\n");
        assert!(e.contains("`extends` cycle"), "{e}");
        assert!(e.contains("a.extends"), "{e}");
        let e = parse_err("a:\n  script: x\n  extends: .nope\n");
        assert!(e.contains("`.nope`, which does not exist"), "{e}");
        assert!(e.contains(":3:3:"), "{e}");
    }

    #[test]
    fn extends_depth_is_bounded() {
        let mut opts = Options::default();
        // Four levels, the job included; written job first so that no
        // parent is resolved on its own before.
        opts.limits.max_extends_depth = 3;
        let text = "j:\n  extends: .c\n.c:\n  extends: .b\n.b:\n  extends: .a\n.a:\n  script: x\n";
        let e = parse_with(text, &super::super::test_util::ctx(), &opts, &[]).unwrap_err();
        assert!(matches!(e, crate::Error::Limit { .. }), "{e}");
        assert!(e.to_string().contains("max_extends_depth"), "{e}");
        opts.limits.max_extends_depth = 4;
        assert!(parse_with(text, &super::super::test_util::ctx(), &opts, &[]).is_ok());
    }

    #[test]
    fn default_fills_missing_keys_and_legacy_keys_yield_to_it() {
        let p = parse_ok(
            "image: legacy\nbefore_script: [legacy-before]\n\
             default:\n  image: from-default\n\
             a:\n  script: [x]\n\
             b:\n  image: own\n  script: [x]\n",
        );
        let a = job(&p, "a");
        assert_eq!(a.image, "from-default");
        assert_eq!(commands(&a.steps[0].script), ["legacy-before", "x"]);
        assert_eq!(job(&p, "b").image, "own");
    }

    #[test]
    fn inherit_default_limits_what_is_inherited() {
        let p = parse_ok(
            "default:\n  image: img\n  before_script: [setup]\n\
             none:\n  inherit: {default: false}\n  script: [x]\n\
             some:\n  inherit: {default: [image]}\n  script: [x]\n",
        );
        let none = job(&p, "none");
        assert_eq!(none.image, Options::default().gitlab_default_image);
        assert_eq!(commands(&none.steps[0].script), ["x"]);
        let some = job(&p, "some");
        assert_eq!(some.image, "img");
        assert_eq!(commands(&some.steps[0].script), ["x"]);
    }

    #[test]
    fn inherits_reads_absent_bool_and_list() {
        let list: Value = serde_yaml::from_str("[A, B]").unwrap();
        assert!(inherits(None, "A"));
        assert!(!inherits(Some(&Value::Bool(false)), "A"));
        assert!(inherits(Some(&Value::Bool(true)), "A"));
        assert!(inherits(Some(&list), "B"));
        assert!(!inherits(Some(&list), "C"));
    }

    #[test]
    fn default_must_be_a_mapping() {
        let e = parse_err("default: [x]\nj:\n  script: x\n");
        assert!(e.contains("`default` must be a mapping"), "{e}");
    }
}
