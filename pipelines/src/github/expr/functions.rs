//! The functions: `contains`, `startsWith`, `endsWith`, `format`, `join`,
//! `toJSON`, `fromJSON`, `hashFiles` (run time only), and the status
//! functions `success`, `failure`, `always`, `cancelled`.

use super::eval::{Ev, Eval, Out, Stop};
use super::parse::Ast;
use super::value::{from_json, loose_eq, to_json};
use super::{ExprValue, JobStatus};
use crate::limits::short;

impl Ev<'_> {
    pub(super) fn call(&self, name: &str, args: &[Ast]) -> Eval {
        let ctx = self.ctx;
        let arity = |min: usize, max: usize| -> Result<(), Stop> {
            if args.len() < min || args.len() > max {
                Err(Stop::Error(format!(
                    "`{}` takes {min} to {max} arguments",
                    short(name)
                )))
            } else {
                Ok(())
            }
        };
        let status = |f: &dyn Fn(JobStatus) -> bool| -> Eval {
            arity(0, 0)?;
            match ctx.status {
                Some(s) => Ok(ExprValue::Bool(f(s))),
                None if ctx.partial => Err(Stop::Deferred),
                None => Ok(ExprValue::Bool(f(JobStatus::Success))),
            }
        };
        let mut out = Out::new(self);
        match name {
            "success" => status(&|s| s == JobStatus::Success),
            "failure" => status(&|s| s == JobStatus::Failure),
            "cancelled" => status(&|s| s == JobStatus::Cancelled),
            "always" => {
                arity(0, 0)?;
                if ctx.partial && ctx.status.is_none() {
                    // Decided by the executor together with the other status
                    // functions; the front end maps a bare `always()` to `when`.
                    return Err(Stop::Deferred);
                }
                Ok(ExprValue::Bool(true))
            }
            "contains" | "startswith" | "endswith" => {
                arity(2, 2)?;
                let a = self.eval(&args[0])?;
                let b = self.eval(&args[1])?;
                let r = match (name, &a) {
                    ("contains", ExprValue::Array(items)) => items.iter().any(|x| loose_eq(x, &b)),
                    _ => {
                        let a = self.text(&a)?.to_lowercase();
                        let b = self.text(&b)?.to_lowercase();
                        match name {
                            "contains" => a.contains(&b),
                            "startswith" => a.starts_with(&b),
                            _ => a.ends_with(&b),
                        }
                    }
                };
                Ok(ExprValue::Bool(r))
            }
            "format" => {
                if args.is_empty() {
                    return Err(Stop::Error("`format` needs a format string".into()));
                }
                let f = self.eval(&args[0])?;
                let f = self.text(&f)?;
                let mut vals = Vec::with_capacity(args.len() - 1);
                for a in &args[1..] {
                    let v = self.eval(a)?;
                    vals.push(self.text(&v)?);
                }
                format_str(&f, &vals, &mut out)?;
                Ok(ExprValue::String(out.into_string()))
            }
            "join" => {
                arity(1, 2)?;
                let a = self.eval(&args[0])?;
                let sep = match args.get(1) {
                    Some(s) => {
                        let s = self.eval(s)?;
                        self.text(&s)?
                    }
                    None => ",".to_string(),
                };
                match a {
                    ExprValue::Array(items) => {
                        for (i, item) in items.iter().enumerate() {
                            if i > 0 {
                                out.push(&sep)?;
                            }
                            out.push(&self.text(item)?)?;
                        }
                    }
                    other => out.push(&self.text(&other)?)?,
                }
                Ok(ExprValue::String(out.into_string()))
            }
            "tojson" => {
                arity(1, 1)?;
                let v = self.eval(&args[0])?;
                match serde_json::to_writer_pretty(&mut out, &to_json(&v)) {
                    Ok(()) => Ok(ExprValue::String(out.into_string())),
                    Err(_) => Err(self.over()),
                }
            }
            "fromjson" => {
                arity(1, 1)?;
                let s = self.eval(&args[0])?;
                let s = self.text(&s)?;
                let v = serde_json::from_str::<serde_json::Value>(&s)
                    .map(|v| from_json(&v))
                    .map_err(|e| Stop::Error(format!("fromJSON: {}", short(&e.to_string()))))?;
                self.charge_value(&v)?;
                Ok(v)
            }
            "hashfiles" if ctx.partial => Err(Stop::Deferred),
            _ => Err(Stop::Error(format!("unknown function `{}`", short(name)))),
        }
    }

    /// `v` as text: arrays and objects become JSON, charged as they are
    /// written (a scalar was charged when it was produced).
    pub(super) fn text(&self, v: &ExprValue) -> Result<String, Stop> {
        match v {
            ExprValue::Array(_) | ExprValue::Object(_) => {
                let mut out = Out::new(self);
                match serde_json::to_writer(&mut out, &to_json(v)) {
                    Ok(()) => Ok(out.into_string()),
                    Err(_) => Err(self.over()),
                }
            }
            other => Ok(other.to_text()),
        }
    }
}

pub(super) fn format_str(f: &str, vals: &[String], out: &mut Out<'_, '_>) -> Result<(), Stop> {
    let err = |m: String| Stop::Error(m);
    let mut rest = f;
    while let Some(pos) = rest.find(['{', '}']) {
        out.push(&rest[..pos])?;
        let tail = &rest[pos..];
        if let Some(r) = tail.strip_prefix("{{") {
            out.push("{")?;
            rest = r;
        } else if let Some(r) = tail.strip_prefix("}}") {
            out.push("}")?;
            rest = r;
        } else if let Some(r) = tail.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| err("unclosed `{` in format".into()))?;
            let n = &r[..end];
            let i: usize = n
                .parse()
                .map_err(|_| err(format!("bad placeholder `{{{}}}`", short(n))))?;
            let v = vals
                .get(i)
                .ok_or_else(|| err(format!("no argument for `{{{i}}}`")))?;
            out.push(v)?;
            rest = &r[end + 1..];
        } else {
            out.push("}")?;
            rest = &tail[1..];
        }
    }
    out.push(rest)
}
