//! [`ExprValue`], the values of the expression language, and GitHub's
//! rules for them: truthiness, text, loose equality (strings compare
//! case-insensitively, mixed types as numbers), ordering, property access,
//! and the JSON they convert to and from.

use std::collections::BTreeMap;

/// A value of the expression language.
#[derive(Debug, Clone, PartialEq)]
pub enum ExprValue {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<ExprValue>),
    Object(BTreeMap<String, ExprValue>),
}

impl ExprValue {
    /// Roughly what the value takes in memory (for the output budget).
    pub fn approx_bytes(&self) -> usize {
        crate::NODE_BYTES
            + match self {
                ExprValue::String(s) => s.len(),
                ExprValue::Array(a) => a.iter().map(ExprValue::approx_bytes).sum(),
                ExprValue::Object(m) => m.iter().map(|(k, v)| k.len() + v.approx_bytes()).sum(),
                _ => 0,
            }
    }

    pub fn truthy(&self) -> bool {
        match self {
            ExprValue::Null => false,
            ExprValue::Bool(b) => *b,
            ExprValue::Number(n) => *n != 0.0 && !n.is_nan(),
            ExprValue::String(s) => !s.is_empty(),
            ExprValue::Array(_) | ExprValue::Object(_) => true,
        }
    }

    /// The text `${{ }}` substitutes: `null` is empty, whole numbers have no
    /// fraction, arrays and objects are JSON.
    pub fn to_text(&self) -> String {
        match self {
            ExprValue::Null => String::new(),
            ExprValue::Bool(b) => b.to_string(),
            ExprValue::Number(n) => fmt_number(*n),
            ExprValue::String(s) => s.clone(),
            other => to_json(other).to_string(),
        }
    }

    pub(super) fn to_number(&self) -> f64 {
        match self {
            ExprValue::Null => 0.0,
            ExprValue::Bool(b) => f64::from(u8::from(*b)),
            ExprValue::Number(n) => *n,
            ExprValue::String(s) if s.trim().is_empty() => 0.0,
            ExprValue::String(s) => parse_number(s.trim()).unwrap_or(f64::NAN),
            _ => f64::NAN,
        }
    }

    /// An object from string pairs.
    pub fn object<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> ExprValue {
        ExprValue::Object(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), ExprValue::String(v.into())))
                .collect(),
        )
    }

    /// Converts a YAML value (matrix entries).
    pub fn from_yaml(v: &serde_yaml::Value) -> ExprValue {
        use serde_yaml::Value as Y;
        match v {
            Y::Null => ExprValue::Null,
            Y::Bool(b) => ExprValue::Bool(*b),
            Y::Number(n) => ExprValue::Number(n.as_f64().unwrap_or(f64::NAN)),
            Y::String(s) => ExprValue::String(s.clone()),
            Y::Sequence(s) => ExprValue::Array(s.iter().map(ExprValue::from_yaml).collect()),
            Y::Mapping(m) => ExprValue::Object(
                m.iter()
                    .filter_map(|(k, v)| Some((crate::yaml::scalar(k)?, ExprValue::from_yaml(v))))
                    .collect(),
            ),
            Y::Tagged(t) => ExprValue::from_yaml(&t.value),
        }
    }
}

pub(super) fn fmt_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

pub(super) fn parse_number(s: &str) -> Option<f64> {
    if let Some(hex) = s.strip_prefix("0x") {
        return i64::from_str_radix(hex, 16).ok().map(|n| n as f64);
    }
    s.parse::<f64>().ok()
}

pub(super) fn to_json(v: &ExprValue) -> serde_json::Value {
    match v {
        ExprValue::Null => serde_json::Value::Null,
        ExprValue::Bool(b) => serde_json::Value::Bool(*b),
        ExprValue::Number(n) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        ExprValue::String(s) => serde_json::Value::String(s.clone()),
        ExprValue::Array(a) => serde_json::Value::Array(a.iter().map(to_json).collect()),
        ExprValue::Object(o) => {
            serde_json::Value::Object(o.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
    }
}

pub(super) fn from_json(v: &serde_json::Value) -> ExprValue {
    match v {
        serde_json::Value::Null => ExprValue::Null,
        serde_json::Value::Bool(b) => ExprValue::Bool(*b),
        serde_json::Value::Number(n) => ExprValue::Number(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => ExprValue::String(s.clone()),
        serde_json::Value::Array(a) => ExprValue::Array(a.iter().map(from_json).collect()),
        serde_json::Value::Object(o) => {
            ExprValue::Object(o.iter().map(|(k, v)| (k.clone(), from_json(v))).collect())
        }
    }
}

/// Property `key` of an object: the exact key, else the first that
/// matches it ignoring ASCII case.
pub(super) fn property<'v>(m: &'v BTreeMap<String, ExprValue>, key: &str) -> Option<&'v ExprValue> {
    m.get(key).or_else(|| {
        m.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

pub(super) fn index(o: &ExprValue, k: &ExprValue) -> ExprValue {
    match (o, k) {
        (ExprValue::Object(m), ExprValue::String(key)) => {
            property(m, key).cloned().unwrap_or(ExprValue::Null)
        }
        (ExprValue::Array(a), ExprValue::Number(n)) => {
            if *n >= 0.0 && n.fract() == 0.0 {
                a.get(*n as usize).cloned().unwrap_or(ExprValue::Null)
            } else {
                ExprValue::Null
            }
        }
        // `a.*.b`: property access maps over the filtered array.
        (ExprValue::Array(a), ExprValue::String(_)) => ExprValue::Array(
            a.iter()
                .map(|x| index(x, k))
                .filter(|v| *v != ExprValue::Null)
                .collect(),
        ),
        _ => ExprValue::Null,
    }
}

pub(super) fn loose_eq(l: &ExprValue, r: &ExprValue) -> bool {
    match (l, r) {
        (ExprValue::Null, ExprValue::Null) => true,
        (ExprValue::String(a), ExprValue::String(b)) => a.to_lowercase() == b.to_lowercase(),
        (ExprValue::Bool(a), ExprValue::Bool(b)) => a == b,
        (ExprValue::Array(_) | ExprValue::Object(_), _)
        | (_, ExprValue::Array(_) | ExprValue::Object(_)) => false,
        _ => l.to_number() == r.to_number(),
    }
}

pub(super) fn compare(op: &str, l: &ExprValue, r: &ExprValue) -> bool {
    match op {
        "==" => loose_eq(l, r),
        "!=" => !loose_eq(l, r),
        _ => {
            let ord = match (l, r) {
                (ExprValue::String(a), ExprValue::String(b)) => {
                    Some(a.to_lowercase().cmp(&b.to_lowercase()))
                }
                _ => l.to_number().partial_cmp(&r.to_number()),
            };
            let Some(ord) = ord else { return false };
            match op {
                "<" => ord.is_lt(),
                "<=" => ord.is_le(),
                ">" => ord.is_gt(),
                _ => ord.is_ge(),
            }
        }
    }
}
