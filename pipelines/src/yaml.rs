//! YAML loading shared by both front ends: syntax errors with positions,
//! merge keys (`<<: *anchor`), and a best-effort locator that maps a key
//! path back to a line and column of the source text.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde_yaml::value::{Tag, TaggedValue};
use serde_yaml::{Mapping, Value};

use crate::error::{Error, Location};
use crate::limits::{bytes, short, Budget, Limits, NODE_BYTES};

/// Parses `text`, applying YAML merge keys. Aliases are expanded while the
/// document is built, each node charged to `budget` first, so an alias
/// bomb stops at the budget instead of filling memory; nesting deeper than
/// `limits.max_yaml_depth` is refused. `<<` keys are expanded by
/// [`Value::apply_merge`], which moves entries and never copies them.
pub(crate) fn load(
    file: &str,
    text: &str,
    limits: &Limits,
    budget: &Budget,
) -> Result<Value, Error> {
    if text.len() as u64 > limits.max_file_bytes {
        return Err(Error::Limit {
            file: file.to_string(),
            location: None,
            message: format!(
                "the file is {}, more than kiln reads ({}, max_file_bytes)",
                bytes(text.len()),
                bytes(usize::try_from(limits.max_file_bytes).unwrap_or(usize::MAX))
            ),
        });
    }
    let state = LoadState {
        budget,
        max_depth: limits.max_yaml_depth,
        exceeded: Cell::new(None),
    };
    let de = serde_yaml::Deserializer::from_str(text);
    let mut value = match (Seed {
        st: &state,
        depth: 0,
    })
    .deserialize(de)
    {
        Ok(v) => v,
        Err(e) => {
            return Err(match state.exceeded.get() {
                Some(what) => limit_error(file, &e, what, limits, budget),
                None => syntax(file, &e),
            })
        }
    };
    value.apply_merge().map_err(|e| syntax(file, &e))?;
    // `apply_merge` does not look again at a mapping that received a `<<`
    // from a merged mapping; run until stable (each pass is linear).
    for _ in 0..8 {
        if !has_merge_key(&value) {
            break;
        }
        value.apply_merge().map_err(|e| syntax(file, &e))?;
    }
    Ok(value)
}

#[derive(Debug, Clone, Copy)]
enum Exceeded {
    Size,
    Depth,
}

fn limit_error(
    file: &str,
    e: &serde_yaml::Error,
    what: Exceeded,
    limits: &Limits,
    budget: &Budget,
) -> Error {
    let location = e.location().map(|l| Location {
        line: l.line(),
        column: l.column(),
    });
    let message = match what {
        Exceeded::Size => format!(
            "the YAML expands to more than {} (max_yaml_bytes; aliases are counted each \
             time they are used)",
            bytes(budget.max())
        ),
        Exceeded::Depth => format!(
            "the YAML nests deeper than {} levels (max_yaml_depth)",
            limits.max_yaml_depth
        ),
    };
    Error::Limit {
        file: file.to_string(),
        location,
        message,
    }
}

struct LoadState<'a> {
    budget: &'a Budget,
    max_depth: usize,
    exceeded: Cell<Option<Exceeded>>,
}

impl LoadState<'_> {
    fn charge<E: de::Error>(&self, n: usize) -> Result<(), E> {
        if self.budget.charge(n) {
            Ok(())
        } else {
            self.exceeded.set(Some(Exceeded::Size));
            Err(E::custom("expansion limit"))
        }
    }
}

/// Builds a [`Value`] like serde_yaml's own `Deserialize`, charging every
/// node before it is allocated.
#[derive(Clone, Copy)]
struct Seed<'s, 'b> {
    st: &'s LoadState<'b>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Seed<'_, '_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl Seed<'_, '_> {
    fn nested<E: de::Error>(self) -> Result<Self, E> {
        if self.depth >= self.st.max_depth {
            self.st.exceeded.set(Some(Exceeded::Depth));
            return Err(E::custom("nesting limit"));
        }
        Ok(Seed {
            st: self.st,
            depth: self.depth + 1,
        })
    }
}

impl<'de> Visitor<'de> for Seed<'_, '_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.st.charge(NODE_BYTES)?;
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        self.st.charge(NODE_BYTES)?;
        Ok(Value::Number(i.into()))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        self.st.charge(NODE_BYTES)?;
        Ok(Value::Number(u.into()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        self.st.charge(NODE_BYTES)?;
        Ok(Value::Number(f.into()))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.st.charge(NODE_BYTES.saturating_add(s.len()))?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.st.charge(NODE_BYTES.saturating_add(s.len()))?;
        Ok(Value::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.st.charge(NODE_BYTES)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        self.st.charge(NODE_BYTES)?;
        let mut out = Vec::new();
        while let Some(v) = a.next_element_seed(inner)? {
            out.push(v);
        }
        Ok(Value::Sequence(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        self.st.charge(NODE_BYTES)?;
        let mut out = Mapping::new();
        while let Some(k) = a.next_key_seed(inner)? {
            match out.entry(k) {
                serde_yaml::mapping::Entry::Occupied(e) => {
                    let key = match e.key() {
                        Value::String(s) => short(s).into_owned(),
                        _ => "(a non-string key)".into(),
                    };
                    return Err(de::Error::custom(format!("duplicate key `{key}`")));
                }
                serde_yaml::mapping::Entry::Vacant(e) => {
                    e.insert(a.next_value_seed(inner)?);
                }
            }
        }
        Ok(Value::Mapping(out))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, a: A) -> Result<Value, A::Error> {
        use de::VariantAccess;
        let (tag, contents): (String, _) = a.variant()?;
        if tag.is_empty() {
            return Err(de::Error::custom("empty YAML tag is not allowed"));
        }
        self.st.charge(NODE_BYTES.saturating_add(tag.len()))?;
        let value = contents.newtype_variant_seed(self)?;
        Ok(Value::Tagged(Box::new(TaggedValue {
            tag: Tag::new(tag),
            value,
        })))
    }
}

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

fn has_merge_key(v: &Value) -> bool {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Mapping(m) => {
                if m.contains_key("<<") {
                    return true;
                }
                stack.extend(m.values());
            }
            Value::Sequence(s) => stack.extend(s.iter()),
            Value::Tagged(t) => stack.push(&t.value),
            _ => {}
        }
    }
    false
}

fn syntax(file: &str, e: &serde_yaml::Error) -> Error {
    let (location, message) = match e.location() {
        Some(l) => {
            let text = e.to_string();
            let suffix = format!(" at line {} column {}", l.line(), l.column());
            (
                Location {
                    line: l.line(),
                    column: l.column(),
                },
                text.replace(&suffix, ""),
            )
        }
        None => (Location { line: 1, column: 1 }, e.to_string()),
    };
    Error::Syntax {
        file: file.to_string(),
        location,
        message,
    }
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Renders a path as `jobs.build.steps[2]`.
pub(crate) fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

#[derive(Clone)]
struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

/// Finds the line and column of the node at `path` in block-style YAML.
/// Returns `None` when the node is not written literally (flow style,
/// aliases, keys that came from `extends` or `include`).
pub(crate) fn locate(text: &str, path: &[Seg]) -> Option<Location> {
    let mut lines: Vec<Line<'_>> = text
        .lines()
        .enumerate()
        .filter_map(|(no, raw)| {
            let trimmed = raw.trim_start_matches(' ');
            if trimmed.trim().is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
                return None;
            }
            Some(Line {
                no: no + 1,
                indent: raw.len() - trimmed.len(),
                text: trimmed,
            })
        })
        .collect();
    let mut start = 0usize;
    let mut end = lines.len();
    let mut parent: Option<usize> = None; // indent of the parent node
    let mut found = None;
    let is_child = |l: &Line<'_>, parent: Option<usize>| match parent {
        None => true,
        Some(p) => l.indent > p || (l.indent == p && is_item(l.text)),
    };
    for seg in path {
        let first = lines
            .get(start..end)?
            .iter()
            .position(|l| is_child(l, parent))?
            + start;
        let indent = lines[first].indent;
        match seg {
            Seg::Key(k) => {
                let idx = (first..end)
                    .find(|&i| lines[i].indent == indent && key_of(lines[i].text) == Some(k))?;
                found = Some(Location {
                    line: lines[idx].no,
                    column: indent + 1,
                });
                start = idx + 1;
                end = block_end(&lines, idx + 1, end, indent);
                parent = Some(indent);
            }
            Seg::Index(n) => {
                let idx = (first..end)
                    .filter(|&i| lines[i].indent == indent && is_item(lines[i].text))
                    .nth(*n)?;
                found = Some(Location {
                    line: lines[idx].no,
                    column: indent + 1,
                });
                let item_end = (idx + 1..end)
                    .find(|&i| lines[i].indent <= indent)
                    .unwrap_or(end);
                // Re-read the item line as the first line of its content.
                let rest = lines[idx].text[1..].trim_start_matches(' ');
                let shift = lines[idx].text.len() - rest.len();
                lines[idx].indent += shift;
                lines[idx].text = rest;
                start = idx;
                end = item_end;
                parent = Some(indent);
            }
        }
    }
    found
}

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

fn block_end(lines: &[Line<'_>], from: usize, end: usize, indent: usize) -> usize {
    (from..end)
        .find(|&i| {
            lines[i].indent < indent || (lines[i].indent == indent && !is_item(lines[i].text))
        })
        .unwrap_or(end)
}

fn key_of(text: &str) -> Option<&str> {
    let (key, _) = if let Some(rest) = text.strip_prefix('"') {
        let close = rest.find('"')?;
        return rest[close + 1..].starts_with(':').then(|| &rest[..close]);
    } else if let Some(rest) = text.strip_prefix('\'') {
        let close = rest.find('\'')?;
        return rest[close + 1..].starts_with(':').then(|| &rest[..close]);
    } else {
        let colon = text
            .find(": ")
            .or_else(|| text.strip_suffix(':').map(|s| s.len()))?;
        (text[..colon].trim_end(), ())
    };
    Some(key)
}

/// Context for semantic errors: the file name, its text, and the path of the
/// node being read.
pub(crate) struct Ctx<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl Ctx<'_> {
    pub(crate) fn err(&self, path: &[Seg], message: impl Into<String>) -> Error {
        Error::Invalid {
            file: self.file.to_string(),
            location: locate(self.text, path),
            path: path_string(path),
            message: message.into(),
        }
    }
}

/// Builds a path from a prefix and more segments.
pub(crate) fn join(path: &[Seg], more: &[Seg]) -> Vec<Seg> {
    let mut v = path.to_vec();
    v.extend_from_slice(more);
    v
}

pub(crate) fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
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

    const DOC: &str = "\
# comment
stages: [build]
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - name: Build
        run: cargo build
  test:
    steps:
    - run: a
    -   run: b
        shell: bash
";

    fn ld(file: &str, text: &str) -> Result<Value, Error> {
        let limits = Limits::default();
        load(file, text, &limits, &Budget::new(limits.max_yaml_bytes))
    }

    fn p(s: &[&str]) -> Vec<Seg> {
        s.iter()
            .map(|x| match x.parse::<usize>() {
                Ok(n) => Seg::Index(n),
                Err(_) => Seg::Key(x.to_string()),
            })
            .collect()
    }

    #[test]
    fn locates_keys_and_items() {
        assert_eq!(
            locate(DOC, &p(&["stages"])),
            Some(Location { line: 2, column: 1 })
        );
        assert_eq!(
            locate(DOC, &p(&["jobs", "build"])),
            Some(Location { line: 4, column: 3 })
        );
        assert_eq!(
            locate(DOC, &p(&["jobs", "build", "steps", "1"])),
            Some(Location { line: 8, column: 7 })
        );
        assert_eq!(
            locate(DOC, &p(&["jobs", "build", "steps", "1", "run"])),
            Some(Location { line: 9, column: 9 })
        );
        assert_eq!(
            locate(DOC, &p(&["jobs", "test", "steps", "1", "shell"])),
            Some(Location {
                line: 14,
                column: 9
            })
        );
        assert_eq!(locate(DOC, &p(&["jobs", "nope"])), None);
        assert_eq!(locate(DOC, &p(&["jobs", "build", "steps", "5"])), None);
    }

    #[test]
    fn syntax_error_has_position() {
        let e = ld("f.yml", "a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.location().is_some(), "{e}");
        assert!(e.to_string().starts_with("f.yml:"), "{e}");
    }

    #[test]
    fn merge_keys_are_applied() {
        let v = ld("f", "base: &b\n  x: 1\n  y: 2\njob:\n  <<: *b\n  y: 3\n").unwrap();
        assert_eq!(v["job"]["x"], Value::from(1));
        assert_eq!(v["job"]["y"], Value::from(3));
        assert!(v["job"].get("<<").is_none());
    }

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
