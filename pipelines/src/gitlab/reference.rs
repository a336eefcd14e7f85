//! `!reference [job, key, ...]`: the YAML tag that copies part of another
//! job or template. GitLab resolves references before `extends`, so this
//! pass runs on the merged files, before any other.

use serde_yaml::{Mapping, Value};

use super::Parser;
use crate::error::{Error, Result};
use crate::limits::{chain, short, short_n};
use crate::yaml::{self, key};

impl Parser<'_> {
    /// Replaces every `!reference [job, key, ...]` with the value it names,
    /// references inside that value included (GitLab resolves them before
    /// `extends`). Nesting is bounded by `max_reference_depth`, cycles are
    /// errors, the result is at most `max_yaml_depth` deep, and every copy is
    /// charged to the output budget.
    pub(super) fn resolve_references(&self, top: Mapping) -> Result<Mapping> {
        let with_refs: Vec<Value> = top
            .iter()
            .filter(|(_, v)| has_reference(v))
            .map(|(k, _)| k.clone())
            .collect();
        if with_refs.is_empty() {
            return Ok(top);
        }
        let mut replaced = Vec::with_capacity(with_refs.len());
        for k in with_refs {
            let name = k.as_str().unwrap_or("(key)").to_string();
            let mut r = Refs {
                p: self,
                top: &top,
                top_key: &name,
                stack: Vec::new(),
            };
            let v = top.get(&k).map(|v| r.resolve(v, 1)).transpose()?;
            replaced.push((k, v.unwrap_or(Value::Null)));
        }
        let mut top = top;
        for (k, v) in replaced {
            top.insert(k, v);
        }
        Ok(top)
    }
}

/// One top-level entry's `!reference` resolution.
struct Refs<'p, 'a> {
    p: &'p Parser<'a>,
    top: &'p Mapping,
    top_key: &'p str,
    /// The references being resolved, outermost first.
    stack: Vec<Vec<String>>,
}

impl Refs<'_, '_> {
    fn err(&self, message: String) -> Error {
        self.p.err(&[key(self.top_key)], message)
    }

    /// `v` with its references replaced; `depth` is where it will sit.
    fn resolve(&mut self, v: &Value, depth: usize) -> Result<Value> {
        let max_depth = self.p.limits.max_yaml_depth;
        if depth > max_depth {
            return Err(self.p.limit(
                &[key(self.top_key)],
                format!("`!reference` makes the YAML nest deeper than {max_depth} levels (max_yaml_depth)"),
            ));
        }
        Ok(match v {
            Value::Tagged(t) if t.tag == "reference" => {
                let path: Option<Vec<String>> = match &t.value {
                    Value::Sequence(s) if !s.is_empty() => {
                        s.iter().map(|x| x.as_str().map(String::from)).collect()
                    }
                    _ => None,
                };
                let Some(path) = path else {
                    return Err(
                        self.err("`!reference` takes a list of names: [job, key, ...]".into())
                    );
                };
                let shown = || {
                    let parts: Vec<String> = path.iter().map(|p| short(p).into_owned()).collect();
                    format!("[{}]", short_n(&parts.join(", "), 120))
                };
                if self.stack.contains(&path) {
                    let mut names: Vec<String> = self.stack.iter().map(|p| p.join(".")).collect();
                    names.push(path.join("."));
                    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                    return Err(self.err(format!("`!reference` cycle: {}", chain(&refs))));
                }
                if self.stack.len() >= self.p.limits.max_reference_depth {
                    return Err(self.p.limit(
                        &[key(self.top_key)],
                        format!(
                            "`!reference` is nested more than {} levels deep \
                             (max_reference_depth)",
                            self.p.limits.max_reference_depth
                        ),
                    ));
                }
                let mut target = self.top.get(path[0].as_str());
                for part in &path[1..] {
                    target = target.and_then(|t| t.get(part.as_str()));
                }
                let Some(target) = target else {
                    return Err(self.err(format!(
                        "`!reference {}` names nothing in the pipeline",
                        shown()
                    )));
                };
                self.p.charge_out(
                    yaml::size_of(target, self.p.out_budget.left().saturating_add(1)),
                    Some(self.top_key),
                    &format!("!reference {}", shown()),
                )?;
                self.stack.push(path);
                let r = self.resolve(target, depth)?;
                self.stack.pop();
                r
            }
            Value::Sequence(s) => Value::Sequence(
                s.iter()
                    .map(|x| self.resolve(x, depth + 1))
                    .collect::<Result<_>>()?,
            ),
            Value::Mapping(m) => {
                let mut out = Mapping::with_capacity(m.len());
                for (k, x) in m {
                    let r = self.resolve(x, depth + 1)?;
                    if let Some(name) = k.as_str().filter(|k| SCRIPT_KEYS.contains(k)) {
                        self.check_script_reference(name, x, &r)?;
                    }
                    out.insert(k.clone(), r);
                }
                Value::Mapping(out)
            }
            other => other.clone(),
        })
    }
}

/// Keys whose value is a list of commands.
const SCRIPT_KEYS: [&str; 3] = ["before_script", "script", "after_script"];

impl Refs<'_, '_> {
    /// A `!reference` in a script key must name commands: a string or a
    /// list. Naming a mapping (a whole job, `variables`) is the usual
    /// mistake; say so instead of a shape error about the script.
    fn check_script_reference(&self, key_name: &str, raw: &Value, resolved: &Value) -> Result<()> {
        let pairs: Vec<(&Value, &Value)> = match (raw, resolved) {
            (Value::Sequence(a), Value::Sequence(b)) if a.len() == b.len() => {
                a.iter().zip(b.iter()).collect()
            }
            (a, b) => vec![(a, b)],
        };
        for (a, b) in pairs {
            let Value::Tagged(t) = a else { continue };
            if t.tag != "reference" || !b.is_mapping() {
                continue;
            }
            let names: Vec<String> = t
                .value
                .as_sequence()
                .map(|s| {
                    s.iter()
                        .filter_map(|x| x.as_str())
                        .map(|x| short(x).into_owned())
                        .collect()
                })
                .unwrap_or_default();
            return Err(self.err(format!(
                "`{key_name}: !reference [{}]` names a mapping, not commands; name a script \
                 (e.g. [{}, {key_name}])",
                short_n(&names.join(", "), 120),
                names.first().map(String::as_str).unwrap_or(".job")
            )));
        }
        Ok(())
    }
}

/// Whether `v` holds a `!reference` anywhere.
fn has_reference(v: &Value) -> bool {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Tagged(t) if t.tag == "reference" => return true,
            Value::Tagged(t) => stack.push(&t.value),
            Value::Sequence(s) => stack.extend(s.iter()),
            Value::Mapping(m) => stack.extend(m.values()),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{commands, job, parse_err, parse_ok, var};
    use super::*;

    #[test]
    fn references_are_replaced_and_nested_lists_flattened() {
        let p = parse_ok(
            ".setup:\n  script: [one, two]\n\
             j:\n  script:\n    - !reference [.setup, script]\n    - three\n",
        );
        assert_eq!(
            commands(&job(&p, "j").steps[0].script),
            ["one", "two", "three"]
        );
    }

    #[test]
    fn a_reference_may_name_a_nested_key_and_hold_references() {
        let p = parse_ok(
            ".vars:\n  variables:\n    A: from-vars\n\
             .more:\n  value: !reference [.vars, variables, A]\n\
             j:\n  variables:\n    A: !reference [.more, value]\n  script: x\n",
        );
        assert_eq!(var(job(&p, "j"), "A"), Some("from-vars"));
    }

    #[test]
    fn cycles_missing_targets_and_bad_shapes_are_errors() {
        let e = parse_err(".a:\n  x: !reference [.b, x]\n.b:\n  x: !reference [.a, x]\n");
        assert!(e.contains("`!reference` cycle"), "{e}");
        let e = parse_err("j:\n  script: !reference [.nope, script]\n");
        assert!(
            e.contains("`!reference [.nope, script]` names nothing"),
            "{e}"
        );
        assert!(e.contains(":1:1:"), "{e}");
        let e = parse_err("j:\n  script: !reference .nope\n");
        assert!(e.contains("takes a list of names"), "{e}");
        let e = parse_err(".v:\n  variables: {A: 1}\nj:\n  script: !reference [.v, variables]\n");
        assert!(
            e.contains("`script: !reference [.v, variables]` names a mapping, not commands"),
            "{e}"
        );
    }

    #[test]
    fn has_reference_looks_everywhere() {
        let v: Value = serde_yaml::from_str("a: [1, {b: !reference [x, y]}]").unwrap();
        assert!(has_reference(&v));
        let v: Value = serde_yaml::from_str("a: [1, {b: !other [x, y]}]").unwrap();
        assert!(!has_reference(&v));
    }
}
