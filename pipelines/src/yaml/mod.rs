//! YAML loading shared by both front ends: a deserializer that charges
//! every node to an expansion budget before it is built (alias bombs stop
//! there), nesting bounded, duplicate keys refused, syntax errors with
//! positions, and merge keys (`<<: *anchor`) applied.
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
}
