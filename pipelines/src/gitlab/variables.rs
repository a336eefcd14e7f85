//! Variables: GitLab's predefined `CI_*` variables, `variables:` mappings
//! (with `expand: false`), the precedence of a job's layers, and `$X` /
//! `${X}` expansion bounded in size.
//!
//! Precedence, lowest first: predefined < global (as `inherit: variables`
//! allows) < job < `parallel: matrix` < `rules: variables` < the caller's.

use std::collections::{BTreeMap, HashMap};

use serde_yaml::{Mapping, Value};

use super::extends::inherits;
use super::parallel::Instance;
use super::predefined::slug;
use super::Parser;
use crate::error::{Error, Result};
use crate::limits::{bytes, short};
use crate::yaml::{join, key, scalar, Seg};

/// A variable name and whether its value may be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct VarKey(pub(super) String, pub(super) bool);

impl Parser<'_> {
    /// Predefined variables known before any job is looked at, plus the
    /// caller's variables.
    pub(super) fn base_vars(&self) -> BTreeMap<String, String> {
        let mut v: BTreeMap<String, String> = self.predefined(None, None).into_iter().collect();
        v.extend(self.ctx.extra_vars.iter().cloned());
        v
    }

    fn predefined(&self, job: Option<&str>, stage: Option<&str>) -> Vec<(String, String)> {
        let mut v = super::predefined::pipeline_vars(self.ctx, self.opts);
        if let Some(j) = job {
            v.push(("CI_JOB_NAME".into(), j.to_string()));
            v.push(("CI_JOB_NAME_SLUG".into(), slug(j)));
        }
        if let Some(s) = stage {
            v.push(("CI_JOB_STAGE".into(), s.to_string()));
        }
        v
    }

    /// Reads a `variables:` mapping. Keys carry whether `$X` in the value
    /// is expanded (`expand: false` turns that off).
    pub(super) fn variables(&self, v: &Value, path: &[Seg]) -> Result<Vec<(VarKey, String)>> {
        let Some(m) = v.as_mapping() else {
            return Err(self.err(path, "`variables` must be a mapping"));
        };
        if m.len() > self.limits.max_variables {
            return Err(self.limit(
                path,
                format!(
                    "more than {} variables (max_variables)",
                    self.limits.max_variables
                ),
            ));
        }
        let mut out = Vec::new();
        for (k, val) in m {
            let Some(k) = k.as_str() else {
                return Err(self.err(path, "variable names must be strings"));
            };
            let vp = join(path, &[key(k)]);
            let (value, expand) = match val {
                Value::Mapping(vm) => {
                    let value = vm.get("value").map(scalar).unwrap_or(Some(String::new()));
                    let expand = vm.get("expand").and_then(Value::as_bool).unwrap_or(true);
                    (value, expand)
                }
                other => (scalar(other), true),
            };
            let value = value.ok_or_else(|| {
                self.err(
                    &vp,
                    "a variable's value must be a string, number or boolean",
                )
            })?;
            out.push((VarKey(k.to_string(), expand), value));
        }
        Ok(out)
    }

    /// A job's variable layers, lowest first, up to its matrix values:
    /// predefined, global, the job's own, the instance's.
    pub(super) fn job_layers(
        &self,
        job: &Mapping,
        inst: &Instance,
        stage: &str,
        global_vars: &[(VarKey, String)],
        path: &[Seg],
    ) -> Result<Vec<(VarKey, String)>> {
        let inherit_vars = job.get("inherit").and_then(|i| i.get("variables"));
        let mut layers: Vec<(VarKey, String)> = self
            .predefined(Some(&inst.name), Some(stage))
            .into_iter()
            .map(|(k, v)| (VarKey(k, false), v))
            .collect();
        for (k, v) in global_vars {
            if inherits(inherit_vars, &k.0) {
                layers.push((k.clone(), v.clone()));
            }
        }
        if let Some(v) = job.get("variables") {
            if !v.is_null() {
                layers.extend(self.variables(v, path)?);
            }
        }
        layers.extend(
            inst.vars
                .iter()
                .map(|(k, v)| (VarKey(k.clone(), true), v.clone())),
        );
        Ok(layers)
    }

    /// `layers` with the caller's variables on top, flattened and expanded
    /// (see [`resolve_vars`]).
    pub(super) fn resolve_job_vars(
        &self,
        layers: &[(VarKey, String)],
        path: &[Seg],
    ) -> Result<Vec<(String, String)>> {
        let extra: Vec<(VarKey, String)> = self
            .ctx
            .extra_vars
            .iter()
            .map(|(k, v)| (VarKey(k.clone(), false), v.clone()))
            .collect();
        resolve_vars(
            layers.iter().chain(extra.iter()),
            self.limits.max_script_bytes,
        )
        .map_err(|name| self.var_too_long(path, &name))
    }

    fn var_too_long(&self, path: &[Seg], name: &str) -> Error {
        self.limit(
            path,
            format!(
                "variable `{}` expands to more than {} (max_script_bytes)",
                short(name),
                bytes(self.limits.max_script_bytes)
            ),
        )
    }
}

/// Flattens the layers (later wins), then expands `$X` / `${X}` in values
/// that allow it, using the other variables. Unknown references are left as
/// written so the shell can still expand them; `$$` is a literal `$`.
/// Fails with the name of a variable whose value would grow past `max`.
fn resolve_vars<'a>(
    layers: impl Iterator<Item = &'a (VarKey, String)>,
    max: usize,
) -> std::result::Result<Vec<(String, String)>, String> {
    let mut order: Vec<String> = Vec::new();
    let mut map: HashMap<String, (String, bool)> = HashMap::new();
    for (k, v) in layers {
        if !map.contains_key(&k.0) {
            order.push(k.0.clone());
        }
        map.insert(k.0.clone(), (v.clone(), k.1));
    }
    let raw: BTreeMap<String, String> = map.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
    order
        .into_iter()
        .map(|k| {
            let Some((v, exp)) = map.get(&k) else {
                return Ok((k, String::new()));
            };
            let v = if *exp {
                match expand_capped(v, &raw, max) {
                    Some(v) => v,
                    None => return Err(k),
                }
            } else {
                v.clone()
            };
            Ok((k, v))
        })
        .collect()
}

/// Expands `$NAME` and `${NAME}` from `vars`; unknown names stay as written.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    expand_capped(s, vars, usize::MAX).unwrap_or_default()
}

/// [`expand`], or `None` as soon as the result would be longer than `max`
/// bytes (`$A$A$A…` multiplies a value without bound otherwise).
pub(super) fn expand_capped(
    s: &str,
    vars: &BTreeMap<String, String>,
    max: usize,
) -> Option<String> {
    let mut out = String::new();
    let push = |out: &mut String, t: &str| -> Option<()> {
        if out.len().saturating_add(t.len()) > max {
            return None;
        }
        out.push_str(t);
        Some(())
    };
    let mut rest = s;
    let mut no_close = false;
    while let Some(pos) = rest.find('$') {
        push(&mut out, &rest[..pos])?;
        let after = &rest[pos + 1..];
        if let Some(r) = after.strip_prefix('$') {
            push(&mut out, "$")?;
            rest = r;
            continue;
        }
        let (name, consumed) = if let Some(r) = after.strip_prefix('{') {
            // Once no `}` follows, none will: do not search again (that
            // would be quadratic in a value of many `${`).
            let close = if no_close { None } else { r.find('}') };
            match close {
                Some(end) => (&r[..end], end + 2),
                None => {
                    no_close = true;
                    ("", 0)
                }
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        match vars.get(name) {
            Some(v) if !name.is_empty() => {
                push(&mut out, v)?;
                rest = &after[consumed..];
            }
            _ => {
                push(&mut out, "$")?;
                rest = after;
            }
        }
    }
    push(&mut out, rest)?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{ctx, job, parse_err, parse_ok, parse_with, var};
    use super::*;
    use crate::context::Options;

    #[test]
    fn precedence_global_job_matrix_rules_caller() {
        let text = "variables: {G: global, J: global, M: global, R: global, C: global}\n\
                    t:\n  script: x\n\
                    \x20 variables: {J: job, M: job, R: job, C: job}\n\
                    \x20 parallel:\n    matrix:\n      - {M: matrix, R: matrix, C: matrix}\n\
                    \x20 rules:\n    - variables: {R: rules, C: rules}\n";
        let mut c = ctx();
        c.extra_vars.push(("C".into(), "caller".into()));
        let p = parse_with(text, &c, &Options::default(), &[]).unwrap();
        let j = job(&p, "t: [matrix, matrix, matrix]");
        assert_eq!(var(j, "G"), Some("global"));
        assert_eq!(var(j, "J"), Some("job"));
        assert_eq!(var(j, "M"), Some("matrix"));
        assert_eq!(var(j, "R"), Some("rules"));
        assert_eq!(var(j, "C"), Some("caller"));
    }

    #[test]
    fn values_expand_other_variables_unless_told_not_to() {
        let p = parse_ok(
            "variables:\n  BASE: /opt\n\
             j:\n  script: x\n  variables:\n\
             \x20   BIN: $BASE/bin\n    LIB: ${BASE}/lib\n    LIT: $$BASE\n\
             \x20   KEEP: $UNKNOWN/x\n    RAW: {value: $BASE, expand: false}\n",
        );
        let j = job(&p, "j");
        assert_eq!(var(j, "BIN"), Some("/opt/bin"));
        assert_eq!(var(j, "LIB"), Some("/opt/lib"));
        assert_eq!(var(j, "LIT"), Some("$BASE"));
        assert_eq!(var(j, "KEEP"), Some("$UNKNOWN/x"));
        assert_eq!(var(j, "RAW"), Some("$BASE"));
    }

    #[test]
    fn inherit_variables_limits_the_globals() {
        let p = parse_ok(
            "variables: {A: a, B: b}\n\
             none:\n  script: x\n  inherit: {variables: false}\n\
             some:\n  script: x\n  inherit: {variables: [B]}\n",
        );
        let none = job(&p, "none");
        assert_eq!((var(none, "A"), var(none, "B")), (None, None));
        let some = job(&p, "some");
        assert_eq!((var(some, "A"), var(some, "B")), (None, Some("b")));
    }

    #[test]
    fn predefined_variables_describe_the_checkout_and_job() {
        let mut c = ctx();
        c.branch = Some("Feature/New_UI".into());
        let p = parse_with(
            "Build It:\n  stage: build\n  script: x\n",
            &c,
            &Options::default(),
            &[],
        )
        .unwrap();
        let j = job(&p, "Build It");
        assert_eq!(var(j, "CI_COMMIT_REF_SLUG"), Some("feature-new-ui"));
        assert_eq!(var(j, "CI_COMMIT_SHORT_SHA"), Some("01234567"));
        assert_eq!(var(j, "CI_JOB_NAME_SLUG"), Some("build-it"));
        assert_eq!(var(j, "CI_JOB_STAGE"), Some("build"));
        assert_eq!(var(j, "CI_BUILDS_DIR"), Some("/builds"));
    }

    #[test]
    fn expansion_is_capped() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "x".repeat(10))].into();
        assert_eq!(
            expand_capped("$A$A", &vars, 20).as_deref(),
            Some(&*"x".repeat(20))
        );
        assert_eq!(expand_capped("$A$A$A", &vars, 20), None);
        assert_eq!(expand("${A", &vars), "${A");
        let mut opts = Options::default();
        opts.limits.max_script_bytes = 30;
        let text = "variables:\n  A: aaaaaaaaaa\nj:\n  script: x\n  variables:\n    B: $A$A$A$A\n";
        let e = parse_with(text, &ctx(), &opts, &[]).unwrap_err();
        assert!(matches!(e, crate::Error::Limit { .. }), "{e}");
        assert!(
            e.to_string().contains("variable `B` expands to more than"),
            "{e}"
        );
    }

    #[test]
    fn variables_must_be_a_mapping_of_scalars() {
        let e = parse_err("variables: [A]\nj:\n  script: x\n");
        assert!(e.contains("`variables` must be a mapping"), "{e}");
        let e = parse_err("j:\n  script: x\n  variables:\n    A: [1]\n");
        assert!(e.contains(":4:5: j.variables.A: a variable's value"), "{e}");
    }
}
