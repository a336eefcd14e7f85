//! Evaluation of an [`Ast`] against the [`Contexts`], every value built
//! charged to the output budget first; what needs a run-time context stops
//! as [`Stop::Deferred`].

use super::parse::Ast;
use super::value::{compare, index, property};
use super::{Contexts, ExprValue};
use crate::limits::{bytes, Budget};

/// Why evaluation stopped.
#[derive(Debug)]
pub(super) enum Stop {
    /// Needs a context only known at run time.
    Deferred,
    Error(String),
}

pub(super) type Eval = Result<ExprValue, Stop>;

/// One evaluation: the contexts and the output budget every value built
/// is charged to before it is kept.
pub(super) struct Ev<'a> {
    pub(super) ctx: &'a Contexts,
    pub(super) budget: &'a Budget,
}

impl Ev<'_> {
    pub(super) fn charge(&self, n: usize) -> Result<(), Stop> {
        if self.budget.charge(n) {
            Ok(())
        } else {
            Err(self.over())
        }
    }

    pub(super) fn over(&self) -> Stop {
        Stop::Error(format!(
            "the expression produces more than {} (max_expression_output)",
            bytes(self.budget.max())
        ))
    }

    /// Charges a copy of `v`, counted up to what is left.
    pub(super) fn charge_value(&self, v: &ExprValue) -> Result<(), Stop> {
        self.charge(value_size(v, self.budget.left().saturating_add(1)))
    }

    pub(super) fn eval(&self, ast: &Ast) -> Eval {
        match lookup(ast, self.ctx)? {
            Found::Value(v) => {
                self.charge_value(v)?;
                return Ok(v.clone());
            }
            Found::Null => return Ok(ExprValue::Null),
            Found::NotAPath => {}
        }
        let v = match ast {
            Ast::Lit(v) => v.clone(),
            Ast::Ctx(_) => ExprValue::Null, // `lookup` answers every context
            Ast::Index(o, k) => {
                let o = self.eval(o)?;
                let k = self.eval(k)?;
                index(&o, &k)
            }
            Ast::Star(o) => match self.eval(o)? {
                ExprValue::Object(m) => ExprValue::Array(m.into_values().collect()),
                a @ ExprValue::Array(_) => a,
                _ => ExprValue::Array(Vec::new()),
            },
            Ast::Not(e) => ExprValue::Bool(!self.eval(e)?.truthy()),
            Ast::And(l, r) => {
                return match self.eval(l) {
                    Ok(l) if !l.truthy() => Ok(l),
                    Ok(_) => self.eval(r),
                    Err(Stop::Deferred) => match self.eval(r) {
                        Ok(r) if !r.truthy() => Ok(r),
                        Err(Stop::Error(e)) => Err(Stop::Error(e)),
                        _ => Err(Stop::Deferred),
                    },
                    Err(e) => Err(e),
                }
            }
            Ast::Or(l, r) => {
                return match self.eval(l) {
                    Ok(l) if l.truthy() => Ok(l),
                    Ok(_) => self.eval(r),
                    Err(Stop::Deferred) => match self.eval(r) {
                        Ok(r) if r.truthy() => Ok(r),
                        Err(Stop::Error(e)) => Err(Stop::Error(e)),
                        _ => Err(Stop::Deferred),
                    },
                    Err(e) => Err(e),
                }
            }
            Ast::Cmp(op, l, r) => {
                let l = self.eval(l)?;
                let r = self.eval(r)?;
                ExprValue::Bool(compare(op, &l, &r))
            }
            Ast::Call(name, args) => return self.call(name, args),
        };
        self.charge_value(&v)?;
        Ok(v)
    }
}

/// What a pure property path (`github.event.ref`, `matrix['os']`) names,
/// found by reference so that reading one key never copies a context.
pub(super) enum Found<'c> {
    Value(&'c ExprValue),
    Null,
    NotAPath,
}

pub(super) fn lookup<'c>(ast: &Ast, ctx: &'c Contexts) -> Result<Found<'c>, Stop> {
    match ast {
        Ast::Ctx(name) => match ctx.values.get(name) {
            Some(v) => Ok(Found::Value(v)),
            None if ctx.partial => Err(Stop::Deferred),
            None => Ok(Found::Null),
        },
        Ast::Index(o, k) => {
            let key = match &**k {
                Ast::Lit(k @ (ExprValue::String(_) | ExprValue::Number(_))) => k,
                _ => return Ok(Found::NotAPath),
            };
            let o = match lookup(o, ctx)? {
                Found::Value(o) => o,
                other => return Ok(other),
            };
            Ok(match (o, key) {
                (ExprValue::Object(m), ExprValue::String(key)) => {
                    property(m, key).map_or(Found::Null, Found::Value)
                }
                (ExprValue::Array(a), ExprValue::Number(n)) if *n >= 0.0 && n.fract() == 0.0 => {
                    a.get(*n as usize).map_or(Found::Null, Found::Value)
                }
                // `array.name` maps over the array: a new value.
                (ExprValue::Array(_), ExprValue::String(_)) => Found::NotAPath,
                _ => Found::Null,
            })
        }
        _ => Ok(Found::NotAPath),
    }
}

/// What a value counts for in the output budget: its text plus a little
/// per element. Stops counting past `cap`.
pub(super) fn value_size(v: &ExprValue, cap: usize) -> usize {
    let mut total = 0usize;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        total = total.saturating_add(8);
        match v {
            ExprValue::String(s) => total = total.saturating_add(s.len()),
            ExprValue::Array(a) => stack.extend(a.iter()),
            ExprValue::Object(o) => {
                for (k, v) in o {
                    total = total.saturating_add(k.len());
                    stack.push(v);
                }
            }
            ExprValue::Null | ExprValue::Bool(_) | ExprValue::Number(_) => {}
        }
        if total > cap {
            break;
        }
    }
    total
}

/// Text being built that charges the budget before it grows.
pub(super) struct Out<'a, 'b> {
    ev: &'a Ev<'b>,
    buf: Vec<u8>,
}

impl<'a, 'b> Out<'a, 'b> {
    pub(super) fn new(ev: &'a Ev<'b>) -> Self {
        Out {
            ev,
            buf: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, text: &str) -> Result<(), Stop> {
        self.ev.charge(text.len())?;
        self.buf.extend_from_slice(text.as_bytes());
        Ok(())
    }

    pub(super) fn into_string(self) -> String {
        String::from_utf8(self.buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into())
    }
}

impl std::io::Write for Out<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.ev.budget.charge(buf.len()) {
            return Err(std::io::Error::other("output limit"));
        }
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
