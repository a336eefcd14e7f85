//! `strategy.matrix`: one job per combination of the matrix's values,
//! minus `exclude`, plus `include`; bounded by `max_matrix` and the output
//! budget before anything is built.

use serde_yaml::{Mapping, Value};

use super::limit_err;
use crate::error::Result;
use crate::limits::{bytes, Budget, Limits};
use crate::yaml::{self, join, key, scalar, Seg};

/// One matrix combination: key and value, in order.
pub(super) type Combo = Vec<(String, Value)>;

/// Expands `strategy.matrix`: the product of the keys, minus `exclude`,
/// plus `include` (merged into matching combinations or appended).
/// `Ok(None)` when the matrix is an expression. The product is checked
/// before it is built (at most 16 × `max_matrix` before `exclude`,
/// `max_matrix` after `include`), `include` and `exclude` may list at most
/// `max_matrix` entries each, and every copied value is charged to `out`.
pub(super) fn matrix(
    job: &Mapping,
    jp: &[Seg],
    c: &yaml::Ctx<'_>,
    limits: &Limits,
    out: &Budget,
) -> Result<Option<Vec<Combo>>> {
    let path = join(jp, &[key("strategy"), key("matrix")]);
    let Some(m) = job.get("strategy").and_then(|s| s.get("matrix")) else {
        return Ok(Some(vec![Vec::new()]));
    };
    let m = match m {
        Value::Mapping(m) => m,
        Value::String(s) if s.contains("${{") => return Ok(None),
        _ => return Err(c.err(&path, "`matrix` must be a mapping")),
    };
    let max = limits.max_matrix;
    let too_many = || {
        limit_err(
            c,
            &path,
            format!("a matrix may create at most {max} jobs (max_matrix)"),
        )
    };
    let too_large = || {
        limit_err(
            c,
            &path,
            format!(
                "the matrix's combinations come to more than {} (max_output_bytes)",
                bytes(out.max())
            ),
        )
    };
    let mut product = 1usize;
    let mut keys: Vec<(String, &Vec<Value>)> = Vec::new();
    for (k, v) in m {
        let k = scalar(k).unwrap_or_default();
        if k == "include" || k == "exclude" {
            continue;
        }
        let values = match v {
            Value::Sequence(s) => s,
            Value::String(s) if s.contains("${{") => return Ok(None),
            _ => {
                return Err(c.err(
                    &join(&path, &[key(&k)]),
                    "a matrix key must list its values",
                ))
            }
        };
        product = product.saturating_mul(values.len());
        keys.push((k, values));
    }
    if product > max.saturating_mul(16) {
        return Err(too_many());
    }
    // Each value of a key with n values appears in product / n combinations.
    let mut size = 0usize;
    for (k, values) in &keys {
        let copies = product / values.len().max(1);
        for v in *values {
            let one = yaml::size_of(v, out.left()) + k.len() + crate::NODE_BYTES;
            size = size.saturating_add(copies.saturating_mul(one));
        }
    }
    if !out.charge(size) {
        return Err(too_large());
    }
    let mut combos: Vec<Combo> = vec![Vec::new()];
    let base_keys: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
    for (k, values) in &keys {
        let mut next = Vec::with_capacity(combos.len().saturating_mul(values.len()));
        for combo in &combos {
            for val in *values {
                let mut cmb = combo.clone();
                cmb.push((k.clone(), val.clone()));
                next.push(cmb);
            }
        }
        combos = next;
    }
    if base_keys.is_empty() {
        combos.clear();
    }
    let entries = |k: &str| -> Result<Vec<&Mapping>> {
        match m.get(k) {
            None => Ok(Vec::new()),
            Some(Value::Sequence(s)) if s.len() > max => Err(limit_err(
                c,
                &join(&path, &[key(k)]),
                format!("more than {max} `{k}` entries (max_matrix)"),
            )),
            Some(Value::Sequence(s)) => s
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    e.as_mapping().ok_or_else(|| {
                        c.err(&join(&path, &[key(k), Seg::Index(i)]), "must be a mapping")
                    })
                })
                .collect(),
            Some(_) => Err(c.err(&join(&path, &[key(k)]), format!("`{k}` must be a list"))),
        }
    };
    for ex in entries("exclude")? {
        combos.retain(|combo| {
            !ex.iter().all(|(k, v)| {
                let k = scalar(k).unwrap_or_default();
                combo
                    .iter()
                    .any(|(ck, cv)| *ck == k && partial_match(cv, v))
            })
        });
    }
    let original = combos.len();
    for inc in entries("include")? {
        let pairs: Vec<(String, Value)> = inc
            .iter()
            .map(|(k, v)| (scalar(k).unwrap_or_default(), v.clone()))
            .collect();
        let pairs_size: usize = pairs
            .iter()
            .map(|(k, v)| k.len() + yaml::size_of(v, out.left()))
            .fold(crate::NODE_BYTES, usize::saturating_add);
        let mut matched = false;
        for combo in combos.iter_mut().take(original) {
            // Applies when it overwrites none of the original values.
            let fits = pairs.iter().all(|(k, v)| {
                !base_keys.contains(k) || combo.iter().any(|(ck, cv)| ck == k && cv == v)
            });
            if fits {
                matched = true;
                if !out.charge(pairs_size) {
                    return Err(too_large());
                }
                for (k, v) in &pairs {
                    match combo.iter_mut().find(|(ck, _)| ck == k) {
                        Some(slot) => slot.1 = v.clone(),
                        None => combo.push((k.clone(), v.clone())),
                    }
                }
            }
        }
        if !matched {
            if !out.charge(pairs_size) {
                return Err(too_large());
            }
            combos.push(pairs);
        }
    }
    if combos.len() > max {
        return Err(too_many());
    }
    if combos.is_empty() {
        return Err(c.err(&path, "the matrix is empty after `exclude`"));
    }
    Ok(Some(combos))
}

/// `exclude` entries may give a partial object for object-valued keys.
fn partial_match(value: &Value, pattern: &Value) -> bool {
    match (value, pattern) {
        (Value::Mapping(v), Value::Mapping(p)) => p
            .iter()
            .all(|(k, pv)| v.get(k).is_some_and(|vv| partial_match(vv, pv))),
        _ => value == pattern,
    }
}
