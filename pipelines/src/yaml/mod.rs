//! YAML loading shared by both front ends: a deserializer that charges
//! every node to an expansion budget before it is built (alias bombs stop
//! there), nesting bounded, syntax errors with positions, and merge keys
//! (`<<: *anchor`) applied.
//!
//! Two dialects ([`Dialect`]): GitHub refuses duplicate keys and applies
//! merge keys as the YAML merge type says (explicit keys win). GitLab loads
//! files with Ruby's Psych, which is more lenient, and kiln does the same in
//! its own map visitor (serde_yaml has no switch for it): a repeated key
//! replaces the earlier value (keeping its place), and each `<<` key merges
//! its mapping (or list of mappings) into the keys read so far, overwriting
//! them, so one mapping may hold several `<<` keys. See docs/pipelines.md.
//!
//! `locate.rs` maps a key path back to a line and column of the source for
//! semantic errors; `value.rs` has the helpers that read and size values.

mod locate;
mod value;

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde_yaml::value::{Tag, TaggedValue};
use serde_yaml::{Mapping, Value};

pub(crate) use locate::{join, key, locate, path_string, Ctx, Seg};
pub(crate) use value::{mapping_size, merge_into, scalar, scalars, size_of, strings};

use crate::error::{Error, Location};
use crate::limits::{bytes, short, Budget, Limits, NODE_BYTES};

/// How duplicate keys and merge keys are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// Duplicate keys are errors; `<<` as the YAML merge type says.
    Strict,
    /// Ruby Psych (GitLab): later keys win, `<<` merges in file order.
    Psych,
}

/// A file's documents: GitLab allows a `spec:` header document, then
/// `---`, then the pipeline.
#[derive(Debug)]
pub(crate) struct Documents {
    pub header: Option<Value>,
    pub body: Value,
}

/// Parses `text`, one document, strictly ([`Dialect::Strict`]).
pub(crate) fn load(
    file: &str,
    text: &str,
    limits: &Limits,
    budget: &Budget,
) -> Result<Value, Error> {
    let docs = load_documents(file, text, limits, budget, Dialect::Strict)?;
    if docs.header.is_some() {
        return Err(second_document(file, text));
    }
    Ok(docs.body)
}

/// The pipeline document of `text`, read as GitLab reads it (to tell the
/// format of a file from its keys).
pub(crate) fn load_lenient(
    file: &str,
    text: &str,
    limits: &Limits,
    budget: &Budget,
) -> Result<Value, Error> {
    load_documents(file, text, limits, budget, Dialect::Psych).map(|d| d.body)
}

/// Parses `text`: one document, or a `spec:` header document, `---` and
/// the body. Any other second document is an error at its `---`.
pub(crate) fn load_documents(
    file: &str,
    text: &str,
    limits: &Limits,
    budget: &Budget,
    dialect: Dialect,
) -> Result<Documents, Error> {
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
    let mut docs = Vec::with_capacity(2);
    for de in serde_yaml::Deserializer::from_str(text) {
        if docs.len() == 2 {
            return Err(second_document(file, text));
        }
        docs.push(load_one(file, de, limits, budget, dialect)?);
    }
    // A stream that ends with `---` and nothing after it has an empty
    // last document.
    if docs.len() == 2 && docs[1].is_null() && !docs[0].is_null() && docs[0].get("spec").is_none() {
        docs.pop();
    }
    let mut docs = docs.into_iter();
    let first = docs.next().unwrap_or(Value::Null);
    match docs.next() {
        None => Ok(Documents {
            header: None,
            body: first,
        }),
        Some(body) => {
            let is_header = first
                .as_mapping()
                .is_some_and(|m| m.len() == 1 && m.contains_key("spec"));
            if !is_header {
                return Err(second_document(file, text));
            }
            Ok(Documents {
                header: Some(first),
                body,
            })
        }
    }
}

/// The error for a second document that is not allowed, at its `---`.
fn second_document(file: &str, text: &str) -> Error {
    let mut seen_content = false;
    let mut line = 1;
    for (i, l) in text.lines().enumerate() {
        if l.starts_with("---") && seen_content {
            line = i + 1;
            break;
        }
        let t = l.trim();
        if !t.is_empty() && !t.starts_with('#') && !t.starts_with("---") && !t.starts_with('%') {
            seen_content = true;
        }
    }
    Error::Syntax {
        file: file.to_string(),
        location: Location { line, column: 1 },
        message: "more than one YAML document: a pipeline file holds one, or a header with only \
                  `spec:` (CI/CD inputs), then `---`, then the pipeline"
            .into(),
    }
}

/// Parses one document, applying YAML merge keys. Aliases are expanded while the
/// document is built, each node charged to `budget` first, so an alias
/// bomb stops at the budget instead of filling memory; nesting deeper than
/// `limits.max_yaml_depth` is refused. `<<` keys are expanded by
/// [`Value::apply_merge`], which moves entries and never copies them.
fn load_one(
    file: &str,
    de: serde_yaml::Deserializer<'_>,
    limits: &Limits,
    budget: &Budget,
    dialect: Dialect,
) -> Result<Value, Error> {
    let state = LoadState {
        budget,
        max_depth: limits.max_yaml_depth,
        exceeded: Cell::new(None),
        dialect,
    };
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
    if dialect == Dialect::Psych {
        // The map visitor merged `<<` keys already.
        return Ok(value);
    }
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
    dialect: Dialect,
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
            if self.st.dialect == Dialect::Psych {
                let v = a.next_value_seed(inner)?;
                psych_insert(&mut out, k, v);
                continue;
            }
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

/// One entry of a mapping as Psych's `revive_hash` adds it: `<<` with a
/// mapping merges it over the keys so far; with a list of mappings merges
/// them, the first winning; anything else is a plain key. A plain key
/// replaces an earlier one in its place.
fn psych_insert(out: &mut Mapping, k: Value, v: Value) {
    if k.as_str() != Some("<<") {
        out.insert(k, v);
        return;
    }
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                out.insert(k, v);
            }
        }
        Value::Sequence(list) if list.iter().all(Value::is_mapping) => {
            let mut merged = Mapping::new();
            for m in list.into_iter().rev() {
                if let Value::Mapping(m) = m {
                    for (k, v) in m {
                        merged.insert(k, v);
                    }
                }
            }
            for (k, v) in merged {
                out.insert(k, v);
            }
        }
        other => {
            out.insert(k, other);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(file: &str, text: &str) -> Result<Value, Error> {
        let limits = Limits::default();
        load(file, text, &limits, &Budget::new(limits.max_yaml_bytes))
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

    fn psych(text: &str) -> Result<Documents, Error> {
        let limits = Limits::default();
        let budget = Budget::new(limits.max_yaml_bytes);
        load_documents("f.yml", text, &limits, &budget, Dialect::Psych)
    }

    #[test]
    fn psych_lets_a_later_key_win_in_its_place() {
        let v = psych("a: 1\nb: 2\na: 3\n").unwrap().body;
        assert_eq!(v["a"], Value::from(3));
        let keys: Vec<_> = v.as_mapping().unwrap().keys().cloned().collect();
        assert_eq!(keys, [Value::from("a"), Value::from("b")]);
        let e = ld("f.yml", "a: 1\na: 3\n").unwrap_err().to_string();
        assert!(e.contains("duplicate key `a`"), "strict refuses: {e}");
    }

    #[test]
    fn psych_merges_each_merge_key_in_file_order() {
        let text = ".a: &a {x: a, y: a}\n.b: &b {y: b, z: b}\n\
                    j:\n  x: own\n  <<: *a\n  <<: *b\n  z: own\n\
                    k:\n  <<: [*a, *b]\n";
        let v = psych(text).unwrap().body;
        // Psych's revive_hash: a merge overwrites the keys read before it.
        assert_eq!(v["j"]["x"], Value::from("a"));
        assert_eq!(v["j"]["y"], Value::from("b"));
        assert_eq!(v["j"]["z"], Value::from("own"));
        assert!(v["j"].get("<<").is_none());
        // A list of mappings: the first one wins.
        assert_eq!(v["k"]["y"], Value::from("a"));
        assert_eq!(v["k"]["z"], Value::from("b"));
    }

    #[test]
    fn a_spec_header_may_precede_the_pipeline() {
        let d = psych("spec:\n  inputs:\n    x:\n---\nj:\n  script: x\n").unwrap();
        assert!(d.header.unwrap()["spec"]["inputs"].get("x").is_some());
        assert_eq!(d.body["j"]["script"], Value::from("x"));
        // One document, and one with a trailing `---`, have no header.
        let d = psych("---\nj: 1\n---\n").unwrap();
        assert!(d.header.is_none());
        assert_eq!(d.body["j"], Value::from(1));
    }

    #[test]
    fn other_second_documents_are_errors_at_their_separator() {
        let e = psych("a: 1\nb: 2\n---\nc: 3\n").unwrap_err();
        assert_eq!(e.location(), Some(Location { line: 3, column: 1 }), "{e}");
        assert!(e.to_string().contains("more than one YAML document"), "{e}");
        let e = ld("f.yml", "spec: {}\n---\nc: 3\n").unwrap_err();
        assert!(e.to_string().contains("more than one YAML document"), "{e}");
    }

    #[test]
    fn errors_in_the_body_keep_their_position() {
        let e = psych("spec:\n  inputs: {}\n---\nj:\n  script: [x\n").unwrap_err();
        assert!(e.location().unwrap().line >= 5, "{e}");
    }
}
