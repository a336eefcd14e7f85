//! Reading and sizing values: scalars as text, string lists, the size a
//! value counts for in the budgets, and GitLab's deep merge.

use serde_yaml::{Mapping, Value};

use crate::limits::NODE_BYTES;

/// What `v` counts for in the budgets: its text plus [`NODE_BYTES`] per
/// node. Stops counting once past `cap` (returns more than `cap`), so the
/// cost of asking is bounded by the answer that matters.
pub(crate) fn size_of(v: &Value, cap: usize) -> usize {
    let mut total = 0usize;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        total = total.saturating_add(NODE_BYTES);
        match v {
            Value::String(s) => total = total.saturating_add(s.len()),
            Value::Sequence(s) => stack.extend(s.iter()),
            Value::Mapping(m) => {
                for (k, v) in m {
                    stack.push(k);
                    stack.push(v);
                }
            }
            Value::Tagged(t) => {
                total = total.saturating_add(t.tag.to_string().len());
                stack.push(&t.value);
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
        if total > cap {
            break;
        }
    }
    total
}

/// [`size_of`] for a mapping.
pub(crate) fn mapping_size(m: &Mapping, cap: usize) -> usize {
    let mut total = NODE_BYTES;
    for (k, v) in m {
        total = total
            .saturating_add(size_of(k, cap))
            .saturating_add(size_of(v, cap));
        if total > cap {
            break;
        }
    }
    total
}

/// A scalar as text (`1.80` stays `1.8` only if YAML wrote it so; numbers
/// keep serde_yaml's rendering). `None` for mappings and sequences.
pub(crate) fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Null => Some(String::new()),
        Value::Tagged(t) => scalar(&t.value),
        _ => None,
    }
}

/// A string or a list of strings (GitLab keys such as `stages`, `extends`).
pub(crate) fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Sequence(s) => s.iter().map(|x| x.as_str().map(String::from)).collect(),
        Value::String(s) => Some(vec![s.clone()]),
        _ => None,
    }
}

/// A scalar or a list of scalars, as text (GitHub keys such as `needs`,
/// `runs-on`).
pub(crate) fn scalars(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Sequence(s) => s.iter().map(scalar).collect(),
        other => scalar(other).map(|s| vec![s]),
    }
}

/// Deep merge GitLab-style, in place: mappings merge recursively, anything
/// else in `over` replaces `base`. Moves `over` in; copies nothing.
pub(crate) fn merge_into(base: &mut Value, over: Value) {
    if let (Value::Mapping(b), Value::Mapping(_)) = (&mut *base, &over) {
        let Value::Mapping(o) = over else { return };
        for (k, v) in o {
            match b.get_mut(&k) {
                Some(existing) => merge_into(existing, v),
                None => {
                    b.insert(k, v);
                }
            }
        }
        return;
    }
    *base = over;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_merge_replaces_sequences() {
        let a: Value = serde_yaml::from_str("v: {A: 1, B: 2}\ns: [1, 2]").unwrap();
        let b: Value = serde_yaml::from_str("v: {B: 3}\ns: [9]").unwrap();
        let mut m = a;
        merge_into(&mut m, b);
        assert_eq!(m["v"]["A"], Value::from(1));
        assert_eq!(m["v"]["B"], Value::from(3));
        assert_eq!(m["s"], serde_yaml::from_str::<Value>("[9]").unwrap());
    }
}
