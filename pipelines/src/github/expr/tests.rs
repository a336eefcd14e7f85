//! Tests of the expression language through its API.

use std::collections::BTreeMap;

use super::*;

fn ctx() -> Contexts {
    let mut c = Contexts::default();
    c.set(
        "github",
        ExprValue::object([("ref", "refs/heads/main"), ("event_name", "push")]),
    );
    c.set(
        "env",
        ExprValue::object([("MODE", "release"), ("EMPTY", "")]),
    );
    let mut m = BTreeMap::new();
    m.insert("rust".to_string(), ExprValue::String("1.80".into()));
    m.insert("n".to_string(), ExprValue::Number(3.0));
    m.insert(
        "os".to_string(),
        ExprValue::Array(vec![ExprValue::String("linux".into())]),
    );
    c.set("matrix", ExprValue::Object(m));
    c
}

fn ev(e: &str) -> ExprValue {
    eval_expr(e, &ctx()).unwrap()
}

#[test]
fn operators_and_literals() {
    assert_eq!(ev("github.ref == 'refs/heads/main'"), ExprValue::Bool(true));
    assert_eq!(ev("github.ref == 'REFS/HEADS/MAIN'"), ExprValue::Bool(true));
    assert_eq!(ev("github.event_name != 'push'"), ExprValue::Bool(false));
    assert_eq!(ev("!env.EMPTY"), ExprValue::Bool(true));
    assert_eq!(ev("env.MODE && 'yes'"), ExprValue::String("yes".into()));
    assert_eq!(
        ev("env.EMPTY || 'fallback'"),
        ExprValue::String("fallback".into())
    );
    assert_eq!(ev("matrix.n > 2 && matrix.n <= 3"), ExprValue::Bool(true));
    assert_eq!(ev("'3' == matrix.n"), ExprValue::Bool(true));
    assert_eq!(ev("null == env.MISSING"), ExprValue::Bool(true));
    assert_eq!(ev("(1 == 2) || !(false)"), ExprValue::Bool(true));
    assert_eq!(ev("env['MODE']"), ExprValue::String("release".into()));
    assert_eq!(ev("'it''s'"), ExprValue::String("it's".into()));
    assert_eq!(ev("-1.5 < 0"), ExprValue::Bool(true));
}

#[test]
fn functions() {
    assert_eq!(ev("contains(github.ref, 'MAIN')"), ExprValue::Bool(true));
    assert_eq!(ev("contains(matrix.os, 'linux')"), ExprValue::Bool(true));
    assert_eq!(
        ev("startsWith(github.ref, 'refs/heads/')"),
        ExprValue::Bool(true)
    );
    assert_eq!(ev("endsWith(github.ref, '/dev')"), ExprValue::Bool(false));
    assert_eq!(
        ev("format('{0}-{1}{{x}}', matrix.rust, matrix.n)"),
        ExprValue::String("1.80-3{x}".into())
    );
    assert_eq!(
        ev("join(matrix.os, '+')"),
        ExprValue::String("linux".into())
    );
    assert_eq!(ev("fromJSON('[1,2]')[1]"), ExprValue::Number(2.0));
    assert_eq!(ev("toJSON(matrix.os)").to_text(), "[\n  \"linux\"\n]");
}

#[test]
fn substitution_defers_runtime_contexts() {
    let mut c = ctx();
    c.partial = true;
    let (s, d) = substitute_partial("v=${{ matrix.rust }} x=${{ steps.a.outputs.b }}", &c).unwrap();
    assert_eq!(s, "v=1.80 x=${{ steps.a.outputs.b }}");
    assert!(d);
    let mut run = ctx();
    run.set_step("a", "success", "success", &[("b".into(), "42".into())]);
    assert_eq!(substitute(&s, &run).unwrap(), "v=1.80 x=42");
    assert_eq!(substitute("${{ '}}' }}", &run).unwrap(), "}}");
}

#[test]
fn conditions() {
    let mut c = ctx();
    c.partial = true;
    assert_eq!(
        classify_condition("always()", &c).unwrap(),
        Condition::Status("always")
    );
    assert_eq!(
        classify_condition("${{ failure() }}", &c).unwrap(),
        Condition::Status("failure")
    );
    assert_eq!(
        classify_condition("github.event_name == 'push'", &c).unwrap(),
        Condition::Static(true)
    );
    assert_eq!(
        classify_condition("matrix.rust == 'nightly'", &c).unwrap(),
        Condition::Static(false)
    );
    assert_eq!(
        classify_condition("steps.x.outputs.y == '1'", &c).unwrap(),
        Condition::Runtime { uses_status: false }
    );
    assert_eq!(
        classify_condition("failure() && steps.t.outcome == 'failure'", &c).unwrap(),
        Condition::Runtime { uses_status: true }
    );
    let mut run = ctx();
    run.status = Some(JobStatus::Failure);
    assert!(!eval_condition("env.MODE == 'release'", &run).unwrap());
    assert!(eval_condition("failure()", &run).unwrap());
    assert!(eval_condition("always() && env.MODE", &run).unwrap());
    assert!(eval_condition("cancelled() || true", &run).unwrap());
}

#[test]
fn bad_expressions_are_errors() {
    for bad in [
        "",
        "a ==",
        "(a",
        "'x",
        "a.",
        "nope(1)",
        "contains(1)",
        "a b",
        "format('{9}')",
        "$x",
    ] {
        assert!(eval_expr(bad, &ctx()).is_err(), "{bad}");
    }
    let deep = "!".repeat(500) + "true";
    assert!(eval_expr(&deep, &ctx()).is_err());
    let deep = "(".repeat(500) + "true" + &")".repeat(500);
    assert!(eval_expr(&deep, &ctx()).is_err());
}
