//! GitHub Actions expressions (`${{ }}` and `if:`).
//!
//! Supported: literals (`'str'` with `''` escapes, numbers, `true`, `false`,
//! `null`), context access (`a.b`, `a['b']`, `a.*.b`), `!`, `==`, `!=`,
//! `<`, `<=`, `>`, `>=`, `&&`, `||`, parentheses, and the functions
//! `contains`, `startsWith`, `endsWith`, `format`, `join`, `toJSON`,
//! `fromJSON`, `success`, `failure`, `always`, `cancelled`. Comparisons
//! follow GitHub: strings compare case-insensitively, mixed types are
//! compared as numbers, `&&`/`||` return an operand.
//!
//! `parse.rs` reads an expression into a tree, `eval.rs` evaluates it
//! against the [`Contexts`] (`contexts.rs`), `functions.rs` holds the
//! functions, `value.rs` the values and their comparisons. This file is the
//! API: evaluation, `if:` conditions and `${{ }}` substitution.

mod contexts;
mod eval;
mod functions;
mod parse;
mod value;

#[cfg(test)]
mod tests;

pub use contexts::{Contexts, ExprLimits, JobStatus};
pub use value::ExprValue;

use crate::error::ExprError;
use crate::limits::{short, Budget};
use eval::{Ev, Stop};
use parse::{parse, uses_status, Ast};

pub(super) fn expr_error(expr: &str, message: String) -> ExprError {
    ExprError {
        expr: short(expr.trim()).into_owned(),
        message,
    }
}

fn stop_error(expr: &str, s: Stop) -> ExprError {
    expr_error(
        expr,
        match s {
            Stop::Deferred => "needs contexts that are only known at run time".into(),
            Stop::Error(e) => e,
        },
    )
}

/// Evaluates an expression (with or without the `${{ }}` wrapper).
/// With `ctx.partial`, an expression that needs run-time contexts is an
/// error saying so; use [`substitute`]/[`classify_condition`] to defer.
pub fn eval_expr(expr: &str, ctx: &Contexts) -> Result<ExprValue, ExprError> {
    let ast = parse(expr, &ctx.limits)?;
    let budget = Budget::new(ctx.limits.max_output);
    Ev {
        ctx,
        budget: &budget,
    }
    .eval(&ast)
    .map_err(|s| stop_error(expr, s))
}

/// Evaluates an `if:` condition the way the runner does: without a status
/// function it means `success() && (expr)`.
pub fn eval_condition(cond: &str, ctx: &Contexts) -> Result<bool, ExprError> {
    let ast = parse(cond, &ctx.limits)?;
    let ast = if uses_status(&ast) {
        ast
    } else {
        Ast::And(
            Box::new(Ast::Call("success".into(), Vec::new())),
            Box::new(ast),
        )
    };
    let budget = Budget::new(ctx.limits.max_output);
    Ev {
        ctx,
        budget: &budget,
    }
    .eval(&ast)
    .map(|v| v.truthy())
    .map_err(|s| stop_error(cond, s))
}

/// What a condition means at parse time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Decided now: run (on success) or skip.
    Static(bool),
    /// Only a status function: `success()`, `failure()`, `always()`.
    Status(&'static str),
    /// Must be evaluated at run time; `uses_status` says whether it calls a
    /// status function (then it may run after a failure).
    Runtime { uses_status: bool },
}

/// Classifies a condition with the static contexts (`ctx.partial` set).
pub fn classify_condition(cond: &str, ctx: &Contexts) -> Result<Condition, ExprError> {
    let ast = parse(cond, &ctx.limits)?;
    if let Ast::Call(name, args) = &ast {
        if args.is_empty() {
            for s in ["success", "failure", "always"] {
                if name == s {
                    return Ok(Condition::Status(s));
                }
            }
        }
    }
    let status = uses_status(&ast);
    let budget = Budget::new(ctx.limits.max_output);
    match (Ev {
        ctx,
        budget: &budget,
    })
    .eval(&ast)
    {
        Ok(v) if !status => Ok(Condition::Static(v.truthy())),
        Ok(_) | Err(Stop::Deferred) => Ok(Condition::Runtime {
            uses_status: status,
        }),
        Err(s @ Stop::Error(_)) => Err(stop_error(cond, s)),
    }
}

/// Replaces every `${{ expr }}` in `text`. Expressions that need run-time
/// contexts are kept verbatim when `ctx.partial` is set; the flag returned
/// says whether any were kept. All expressions of one text share one output
/// budget (`ctx.limits.max_output`).
pub fn substitute_partial(text: &str, ctx: &Contexts) -> Result<(String, bool), ExprError> {
    let mut out = String::new();
    let mut rest = text;
    let mut deferred = false;
    let budget = Budget::new(ctx.limits.max_output);
    let ev = Ev {
        ctx,
        budget: &budget,
    };
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let body = &rest[start + 3..];
        let end = find_close(body)
            .ok_or_else(|| expr_error(&rest[start..], "`${{` without a closing `}}`".into()))?;
        let expr = &body[..end];
        let ast = parse(expr, &ctx.limits)?;
        match ev.eval(&ast).and_then(|v| ev.text(&v)) {
            Ok(v) => out.push_str(&v),
            Err(Stop::Deferred) => {
                deferred = true;
                out.push_str(&rest[start..start + 3 + end + 2]);
            }
            Err(s @ Stop::Error(_)) => return Err(stop_error(expr, s)),
        }
        rest = &body[end + 2..];
    }
    out.push_str(rest);
    Ok((out, deferred))
}

/// Replaces every `${{ expr }}` in `text` (run time: `ctx.partial` unset).
pub fn substitute(text: &str, ctx: &Contexts) -> Result<String, ExprError> {
    substitute_partial(text, ctx).map(|(s, _)| s)
}

/// Index of the `}}` closing an expression, skipping string literals.
fn find_close(body: &str) -> Option<usize> {
    let bytes = body.as_bytes();
    let mut in_str = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => in_str = !in_str,
            b'}' if !in_str && bytes.get(i + 1) == Some(&b'}') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}
