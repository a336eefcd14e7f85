//! CI/CD inputs: a file's `spec: inputs` header (the YAML document before
//! `---`), the values given for them (`--input k=v` for the main file,
//! `include: ... inputs:` for an included one), and `$[[ inputs.x ]]`
//! interpolation in the body's keys and values, as GitLab does it before
//! anything else reads the file.
//!
//! A value that is exactly one `$[[ ]]` block becomes the input's typed
//! value (a number, boolean or list); inside other text the input is
//! written as text (lists as JSON). The functions `expand_vars`,
//! `truncate(offset,length)` and `posix_escape` are applied left to right.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use super::variables::expand_capped;
use crate::error::Result;
use crate::limits::{short, Budget, Limits, NODE_BYTES};
use crate::yaml::{self, join, key, scalar, Seg};

/// Where the values of a file's inputs come from.
pub(super) enum Given<'a> {
    /// `--input k=v` on the command line: text, converted to each input's
    /// declared type.
    Cli(&'a [(String, String)]),
    /// An `include:` entry's `inputs:` mapping, typed YAML.
    Include(Option<&'a Mapping>),
}

/// What interpolation needs besides the file.
pub(super) struct Env<'a> {
    pub c: yaml::Ctx<'a>,
    pub limits: &'a Limits,
    pub budget: &'a Budget,
    /// Variables `expand_vars` sees.
    pub vars: &'a BTreeMap<String, String>,
}

/// The declared inputs of `header` (`spec: inputs`) with the `given`
/// values (or the defaults) checked against their `type`, `options` and
/// `regex`.
pub(super) fn values(header: &Value, given: Given<'_>, env: &Env<'_>) -> Result<Mapping> {
    let spec_path = [key("spec"), key("inputs")];
    let declared = match header.get("spec").and_then(|s| s.get("inputs")) {
        None | Some(Value::Null) => Mapping::new(),
        Some(Value::Mapping(m)) => m.clone(),
        Some(_) => return Err(env.c.err(&spec_path, "`spec: inputs` must be a mapping")),
    };
    let names = || {
        let n: Vec<String> = declared
            .keys()
            .filter_map(Value::as_str)
            .map(|s| short(s).into_owned())
            .collect();
        if n.is_empty() {
            "none".to_string()
        } else {
            n.join(", ")
        }
    };
    let mut given_map: BTreeMap<String, (Value, bool)> = BTreeMap::new();
    match given {
        Given::Cli(kv) => {
            for (k, v) in kv {
                given_map.insert(k.clone(), (Value::String(v.clone()), true));
            }
        }
        Given::Include(Some(m)) => {
            for (k, v) in m {
                let k = scalar(k).unwrap_or_default();
                given_map.insert(k, (v.clone(), false));
            }
        }
        Given::Include(None) => {}
    }
    if let Some(unknown) = given_map
        .keys()
        .find(|k| !declared.contains_key(k.as_str()))
    {
        return Err(env.c.err(
            &spec_path,
            format!(
                "input `{}` is given but the file declares no such input (it declares: {})",
                short(unknown),
                names()
            ),
        ));
    }
    let mut out = Mapping::new();
    for (name, decl) in &declared {
        let Some(name) = name.as_str() else {
            return Err(env.c.err(&spec_path, "input names must be strings"));
        };
        let dp = join(&spec_path, &[key(name)]);
        let decl = match decl {
            Value::Null => Mapping::new(),
            Value::Mapping(m) => m.clone(),
            _ => {
                return Err(env
                    .c
                    .err(&dp, "an input must be a mapping (`default`, `type`, ...)"))
            }
        };
        let ty = match decl.get("type") {
            None => "string",
            Some(t) => match t.as_str() {
                Some(t @ ("string" | "number" | "boolean" | "array")) => t,
                _ => {
                    return Err(env.c.err(
                        &join(&dp, &[key("type")]),
                        "`type` must be string, number, boolean or array",
                    ))
                }
            },
        };
        let value = match given_map.remove(name) {
            Some((v, from_text)) => {
                let v = if from_text { from_cli(&v, ty) } else { Some(v) };
                v.filter(|v| has_type(v, ty)).ok_or_else(|| {
                    env.c.err(
                        &dp,
                        format!("the value given for input `{}` is not a {ty}", short(name)),
                    )
                })?
            }
            None => match decl.get("default") {
                Some(d) => d.clone(),
                None => {
                    return Err(env.c.err(
                        &dp,
                        format!(
                            "input `{}` has no default and no value was given: pass \
                             --input {}=VALUE (or `inputs:` on the include)",
                            short(name),
                            short(name)
                        ),
                    ))
                }
            },
        };
        if let Some(Value::Sequence(options)) = decl.get("options") {
            if !options.contains(&value) {
                return Err(env.c.err(
                    &join(&dp, &[key("options")]),
                    format!(
                        "input `{}` is `{}`, not one of its `options`",
                        short(name),
                        short(&scalar(&value).unwrap_or_default())
                    ),
                ));
            }
        }
        if let Some(re) = decl.get("regex").and_then(Value::as_str) {
            let pat = re
                .strip_prefix('/')
                .and_then(|r| r.strip_suffix('/'))
                .unwrap_or(re);
            let re = regex::RegexBuilder::new(pat)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| env.c.err(&join(&dp, &[key("regex")]), e.to_string()))?;
            if !re.is_match(&scalar(&value).unwrap_or_default()) {
                return Err(env.c.err(
                    &join(&dp, &[key("regex")]),
                    format!("input `{}` does not match its `regex`", short(name)),
                ));
            }
        }
        out.insert(Value::String(name.to_string()), value);
    }
    Ok(out)
}

/// A `--input` text as a value of type `ty`.
fn from_cli(v: &Value, ty: &str) -> Option<Value> {
    let s = v.as_str()?;
    Some(match ty {
        "number" => serde_yaml::from_str::<Value>(s)
            .ok()
            .filter(Value::is_number)?,
        "boolean" => Value::Bool(s.parse().ok()?),
        "array" => serde_yaml::from_str::<Value>(s)
            .ok()
            .filter(Value::is_sequence)?,
        _ => v.clone(),
    })
}

fn has_type(v: &Value, ty: &str) -> bool {
    match ty {
        "number" => v.is_number(),
        "boolean" => v.is_bool(),
        "array" => v.is_sequence(),
        _ => v.is_string() || v.is_number() || v.is_bool(),
    }
}

/// `body` with every `$[[ inputs.x ]]` in its keys and values replaced.
pub(super) fn interpolate(body: Value, inputs: &Mapping, env: &Env<'_>) -> Result<Value> {
    walk(body, inputs, env, &mut Vec::new())
}

fn walk(v: Value, inputs: &Mapping, env: &Env<'_>, path: &mut Vec<Seg>) -> Result<Value> {
    Ok(match v {
        Value::String(s) if s.contains("$[[") => text(&s, inputs, env, path)?,
        Value::Sequence(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (i, x) in list.into_iter().enumerate() {
                path.push(Seg::Index(i));
                out.push(walk(x, inputs, env, path)?);
                path.pop();
            }
            Value::Sequence(out)
        }
        Value::Mapping(m) => {
            let mut out = Mapping::with_capacity(m.len());
            for (k, x) in m {
                let name = scalar(&k).unwrap_or_default();
                let k = match k {
                    Value::String(s) if s.contains("$[[") => {
                        let k = text(&s, inputs, env, path)?;
                        Value::String(scalar(&k).unwrap_or_default())
                    }
                    k => k,
                };
                path.push(key(&name));
                let x = walk(x, inputs, env, path)?;
                path.pop();
                out.insert(k, x);
            }
            Value::Mapping(out)
        }
        Value::Tagged(mut t) => {
            t.value = walk(t.value, inputs, env, path)?;
            Value::Tagged(t)
        }
        other => other,
    })
}

/// One string: a lone block gives the typed value, otherwise text.
fn text(s: &str, inputs: &Mapping, env: &Env<'_>, path: &[Seg]) -> Result<Value> {
    let mut out = String::new();
    let mut rest = s;
    let mut lone = None;
    while let Some(start) = rest.find("$[[") {
        let Some(len) = rest[start..].find("]]") else {
            return Err(env.c.err(path, "`$[[` without its closing `]]`"));
        };
        let block = &rest[start + 3..start + len];
        let value = block_value(block, inputs, env)
            .map_err(|m| env.c.err(path, format!("`$[[{}]]`: {m}", short(block))))?;
        if start == 0 && start + len + 2 == rest.len() && out.is_empty() {
            lone = Some(value.clone());
        }
        out.push_str(&rest[..start]);
        out.push_str(&as_text(&value));
        rest = &rest[start + len + 2..];
        if out.len() > env.limits.max_script_bytes {
            break;
        }
    }
    out.push_str(rest);
    let result = match lone {
        Some(v) => v,
        None => Value::String(out),
    };
    let size = yaml::size_of(&result, env.limits.max_script_bytes.saturating_add(1));
    if size > env.limits.max_script_bytes || !env.budget.charge(size.max(NODE_BYTES)) {
        return Err(env
            .c
            .err(
                path,
                format!(
                    "inputs make this value larger than {} bytes (max_script_bytes) or the \
                     YAML larger than max_yaml_bytes",
                    env.limits.max_script_bytes
                ),
            )
            .into_limit());
    }
    Ok(result)
}

fn as_text(v: &Value) -> String {
    match v {
        Value::Sequence(_) | Value::Mapping(_) => serde_json::to_string(v).unwrap_or_default(),
        other => scalar(other).unwrap_or_default(),
    }
}

/// `inputs.name | fn | fn(args)`.
fn block_value(block: &str, inputs: &Mapping, env: &Env<'_>) -> Result<Value, String> {
    let mut parts = block.split('|').map(str::trim);
    let head = parts.next().unwrap_or_default();
    let Some(name) = head.strip_prefix("inputs.") else {
        return Err("unknown interpolation key: only `inputs.NAME` can be interpolated".into());
    };
    let mut value = inputs
        .get(name)
        .cloned()
        .ok_or_else(|| format!("unknown input `{}`", short(name)))?;
    for f in parts {
        let s = as_text(&value);
        value = Value::String(if f == "expand_vars" {
            expand_capped(&s, env.vars, env.limits.max_script_bytes)
                .ok_or("`expand_vars` makes the value too large")?
        } else if f == "posix_escape" {
            posix_escape(&s)
        } else if let Some(args) = f
            .strip_prefix("truncate(")
            .and_then(|a| a.strip_suffix(')'))
        {
            let nums: Vec<usize> = args
                .split(',')
                .map(|n| n.trim().parse().ok())
                .collect::<Option<_>>()
                .filter(|n: &Vec<usize>| n.len() == 2)
                .ok_or("`truncate` takes two numbers: truncate(offset,length)")?;
            s.chars().skip(nums[0]).take(nums[1]).collect()
        } else {
            return Err(format!(
                "unknown function `{}` (expand_vars, truncate, posix_escape)",
                short(f)
            ));
        });
    }
    Ok(value)
}

/// Backslash-escapes every character a POSIX shell treats specially.
fn posix_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if !(c.is_ascii_alphanumeric() || "_-.,:/@\n".contains(c)) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{ctx, job, names, parse_files, parse_with, var};
    use crate::context::Options;

    const TEMPLATE: &str = "spec:\n  inputs:\n    stage:\n      default: test\n    \
                            image:\n    parallel:\n      type: number\n      default: 1\n    \
                            flags:\n      type: array\n      default: [-v]\n---\n\
                            \"lint-$[[ inputs.stage ]]\":\n  stage: $[[ inputs.stage ]]\n  \
                            image: $[[ inputs.image | truncate(0,6) ]]\n  \
                            parallel: $[[ inputs.parallel ]]\n  \
                            variables:\n    FLAGS: \"x $[[ inputs.flags ]]\"\n  script: lint\n";

    #[test]
    fn inputs_of_an_include_are_typed_and_interpolated() {
        let p = parse_files(
            "stages: [build, check]\ninclude:\n  - local: lint.yml\n    inputs:\n      \
             stage: check\n      image: alpine:3.20\n      parallel: 2\n",
            &[("lint.yml", TEMPLATE)],
        )
        .unwrap();
        assert_eq!(names(&p), ["lint-check 1/2", "lint-check 2/2"]);
        let j = job(&p, "lint-check 1/2");
        assert_eq!(j.stage.as_deref(), Some("check"));
        assert_eq!(j.image, "alpine");
        assert_eq!(var(j, "FLAGS"), Some("x [\"-v\"]"));
    }

    #[test]
    fn the_main_file_takes_inputs_from_the_caller() {
        let main = "spec:\n  inputs:\n    target:\n      options: [x86, arm]\n---\n\
                    build:\n  script: make $[[ inputs.target ]]\n  \
                    variables: {T: \"$[[ inputs.target | posix_escape ]]\"}\n";
        let mut opts = Options {
            inputs: vec![("target".into(), "arm".into())],
            ..Options::default()
        };
        let p = parse_with(main, &ctx(), &opts, &[]).unwrap();
        assert_eq!(var(job(&p, "build"), "T"), Some("arm"));
        opts.inputs = vec![("target".into(), "mips".into())];
        let e = parse_with(main, &ctx(), &opts, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not one of its `options`"), "{e}");
        assert!(e.contains(":4:7: spec.inputs.target.options:"), "{e}");
        opts.inputs = vec![];
        let e = parse_with(main, &ctx(), &opts, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("pass --input target=VALUE"), "{e}");
        opts.inputs = vec![("nope".into(), "1".into())];
        let e = parse_with(main, &ctx(), &opts, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("declares no such input (it declares: target)"),
            "{e}"
        );
    }

    #[test]
    fn bad_blocks_and_types_are_errors_at_their_place() {
        let bad = |body: &str, inputs: &str| {
            parse_files(
                &format!("include:\n  - local: t.yml\n    inputs: {inputs}\n"),
                &[(
                    "t.yml",
                    &format!("spec:\n  inputs:\n    n:\n      type: number\n---\n{body}"),
                )],
            )
            .unwrap_err()
            .to_string()
        };
        let e = bad("j:\n  script: $[[ inputs.m ]]\n", "{n: 1}");
        assert!(e.starts_with("t.yml:7:3: j.script:"), "{e}");
        assert!(e.contains("unknown input `m`"), "{e}");
        let e = bad("j:\n  script: $[[ env.X ]]\n", "{n: 1}");
        assert!(e.contains("unknown interpolation key"), "{e}");
        let e = bad("j:\n  script: x\n", "{n: one}");
        assert!(e.contains("not a number"), "{e}");
        let e = bad("j:\n  script: $[[ inputs.n | upcase ]]\n", "{n: 1}");
        assert!(e.contains("unknown function `upcase`"), "{e}");
    }

    #[test]
    fn interpolation_is_bounded() {
        // A 100 KiB input used 64 times in one value, then in 1000 values.
        let big = "x".repeat(100 << 10);
        let header = "spec:\n  inputs:\n    b:\n---\n";
        let one = format!(
            "{header}j:\n  script: \"{}\"\n",
            "$[[ inputs.b ]]".repeat(64)
        );
        let mut opts = Options {
            inputs: vec![("b".into(), big.clone())],
            ..Options::default()
        };
        let e = parse_with(&one, &ctx(), &opts, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_script_bytes"), "{e}");
        let many: String = (0..1000)
            .map(|i| format!("j{i}:\n  script: $[[ inputs.b ]]\n"))
            .collect();
        opts.limits.max_yaml_bytes = 16 << 20;
        let e = parse_with(&format!("{header}{many}"), &ctx(), &opts, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_yaml_bytes"), "{e}");
    }

    #[test]
    fn without_a_header_text_is_left_alone() {
        let p = parse_files("j:\n  script: echo '$[[ inputs.x ]]'\n", &[]).unwrap();
        assert_eq!(names(&p), ["j"]);
    }
}
