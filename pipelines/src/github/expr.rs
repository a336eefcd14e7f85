//! GitHub Actions expressions (`${{ }}` and `if:`).
//!
//! Supported: literals (`'str'` with `''` escapes, numbers, `true`, `false`,
//! `null`), context access (`a.b`, `a['b']`, `a.*.b`), `!`, `==`, `!=`,
//! `<`, `<=`, `>`, `>=`, `&&`, `||`, parentheses, and the functions
//! `contains`, `startsWith`, `endsWith`, `format`, `join`, `toJSON`,
//! `fromJSON`, `success`, `failure`, `always`, `cancelled`. Comparisons
//! follow GitHub: strings compare case-insensitively, mixed types are
//! compared as numbers, `&&`/`||` return an operand.

use std::collections::BTreeMap;

use crate::error::ExprError;
use crate::limits::{bytes, short, Budget, Limits};

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

    fn to_number(&self) -> f64 {
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

fn fmt_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

fn parse_number(s: &str) -> Option<f64> {
    if let Some(hex) = s.strip_prefix("0x") {
        return i64::from_str_radix(hex, 16).ok().map(|n| n as f64);
    }
    s.parse::<f64>().ok()
}

fn to_json(v: &ExprValue) -> serde_json::Value {
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

fn from_json(v: &serde_json::Value) -> ExprValue {
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

/// The job's status as status functions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Success,
    Failure,
    Cancelled,
}

/// The contexts an expression can read.
///
/// At parse time the front end fills what is static (`github`, `matrix`,
/// `strategy`, `runner`, `vars`, and `env` when no step can change it) and
/// sets `partial`: an expression that touches anything else is *deferred*
/// and left in place for the executor. At run time the executor fills
/// `steps` (see [`Contexts::set_step`]), `env`, `secrets`, `needs`, sets
/// `status`, and clears `partial`; unknown contexts then read as `null`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Contexts {
    /// Context name (`github`, `env`, ...) to its value.
    pub values: BTreeMap<String, ExprValue>,
    /// The job status for `success()`/`failure()`/`cancelled()`.
    pub status: Option<JobStatus>,
    pub partial: bool,
    /// Bounds on the expressions evaluated with these contexts.
    pub limits: ExprLimits,
}

/// Bounds on one expression: its length, its nesting, and the size of what
/// it produces (GitHub's runner enforces the same three). Expressions come
/// from the workflow file, so each is checked before parsing or allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExprLimits {
    /// Longest expression, in bytes (GitHub: 21,000).
    pub max_bytes: usize,
    /// Deepest nesting of operators, calls and property accesses (GitHub: 50).
    pub max_depth: usize,
    /// Most bytes one evaluation may produce, all values it builds counted
    /// (GitHub: 1 MiB). One `substitute` call shares one such budget.
    pub max_output: usize,
}

impl Default for ExprLimits {
    fn default() -> Self {
        ExprLimits::from(&Limits::default())
    }
}

impl From<&Limits> for ExprLimits {
    fn from(l: &Limits) -> Self {
        ExprLimits {
            max_bytes: l.max_expression_bytes,
            max_depth: l.max_expression_depth,
            max_output: l.max_expression_output,
        }
    }
}

impl Contexts {
    pub fn set(&mut self, name: &str, value: ExprValue) {
        self.values.insert(name.to_string(), value);
    }

    /// Records a finished step: `steps.<id>.outputs`, `.outcome` and
    /// `.conclusion` (`success`, `failure`, `cancelled`, `skipped`).
    pub fn set_step(
        &mut self,
        id: &str,
        outcome: &str,
        conclusion: &str,
        outputs: &[(String, String)],
    ) {
        let mut step = BTreeMap::new();
        step.insert(
            "outputs".to_string(),
            ExprValue::object(outputs.iter().cloned()),
        );
        step.insert(
            "outcome".to_string(),
            ExprValue::String(outcome.to_string()),
        );
        step.insert(
            "conclusion".to_string(),
            ExprValue::String(conclusion.to_string()),
        );
        let steps = self
            .values
            .entry("steps".to_string())
            .or_insert_with(|| ExprValue::Object(BTreeMap::new()));
        if let ExprValue::Object(m) = steps {
            m.insert(id.to_string(), ExprValue::Object(step));
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Str(String),
    Num(f64),
    Ident(String),
    Op(&'static str),
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    const OPS: [&str; 15] = [
        "==", "!=", "<=", ">=", "&&", "||", "<", ">", "!", "(", ")", "[", "]", ",", ".",
    ];
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("unterminated string".into()),
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                        s.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(ch) => {
                        s.push(*ch);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(s));
        } else if c.is_ascii_digit()
            || (c == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || chars[i] == '+' && matches!(chars[i - 1], 'e' | 'E')
                    || chars[i] == '-' && matches!(chars[i - 1], 'e' | 'E'))
            {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let n = parse_number(&text).ok_or_else(|| format!("bad number `{text}`"))?;
            out.push(Tok::Num(n));
        } else if c.is_ascii_alphabetic() || c == '_' || c == '*' {
            let start = i;
            if c == '*' {
                i += 1;
            } else {
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '-')
                {
                    i += 1;
                }
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else {
            let two: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let op = OPS
                .iter()
                .find(|op| two.starts_with(**op))
                .ok_or_else(|| format!("unexpected `{c}`"))?;
            out.push(Tok::Op(op));
            i += op.len();
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
enum Ast {
    Lit(ExprValue),
    Ctx(String),
    Index(Box<Ast>, Box<Ast>),
    Star(Box<Ast>),
    Not(Box<Ast>),
    And(Box<Ast>, Box<Ast>),
    Or(Box<Ast>, Box<Ast>),
    Cmp(&'static str, Box<Ast>, Box<Ast>),
    Call(String, Vec<Ast>),
}

/// A parsed node and the height of its tree. Every tree is at most
/// `max_depth` high, so the recursive passes over it (evaluation,
/// `uses_status`, dropping it) stay shallow.
type Parsed = Result<(Ast, usize), String>;

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    /// Nested `or`/`!` calls in progress: the parser's own recursion.
    depth: usize,
    max_depth: usize,
}

impl Parser {
    fn peek_op(&self, op: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Op(o)) if *o == op)
    }

    fn expect(&mut self, op: &str) -> Result<(), String> {
        if self.peek_op(op) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("expected `{op}`"))
        }
    }

    fn too_deep(&self) -> String {
        format!(
            "the expression nests deeper than {} levels (max_expression_depth)",
            self.max_depth
        )
    }

    /// `ast`, whose tree is `height` high, if that is within the limit.
    fn node(&self, ast: Ast, height: usize) -> Parsed {
        if height > self.max_depth {
            return Err(self.too_deep());
        }
        Ok((ast, height))
    }

    fn enter(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > self.max_depth {
            return Err(self.too_deep());
        }
        Ok(())
    }

    fn or(&mut self) -> Parsed {
        self.enter()?;
        let (mut l, mut h) = self.and()?;
        while self.peek_op("||") {
            self.pos += 1;
            let (r, rh) = self.and()?;
            (l, h) = self.node(Ast::Or(Box::new(l), Box::new(r)), h.max(rh) + 1)?;
        }
        self.depth -= 1;
        Ok((l, h))
    }

    fn and(&mut self) -> Parsed {
        let (mut l, mut h) = self.cmp()?;
        while self.peek_op("&&") {
            self.pos += 1;
            let (r, rh) = self.cmp()?;
            (l, h) = self.node(Ast::And(Box::new(l), Box::new(r)), h.max(rh) + 1)?;
        }
        Ok((l, h))
    }

    fn cmp(&mut self) -> Parsed {
        let (l, lh) = self.unary()?;
        for op in ["==", "!=", "<=", ">=", "<", ">"] {
            if self.peek_op(op) {
                self.pos += 1;
                let (r, rh) = self.unary()?;
                return self.node(
                    Ast::Cmp(op_static(op), Box::new(l), Box::new(r)),
                    lh.max(rh) + 1,
                );
            }
        }
        Ok((l, lh))
    }

    fn unary(&mut self) -> Parsed {
        if self.peek_op("!") {
            self.pos += 1;
            self.enter()?;
            let (inner, h) = self.unary()?;
            self.depth -= 1;
            return self.node(Ast::Not(Box::new(inner)), h + 1);
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Parsed {
        let (mut e, mut h) = self.primary()?;
        loop {
            if self.peek_op(".") {
                self.pos += 1;
                match self.toks.get(self.pos).cloned() {
                    Some(Tok::Ident(name)) if name == "*" => {
                        self.pos += 1;
                        (e, h) = self.node(Ast::Star(Box::new(e)), h + 1)?;
                    }
                    Some(Tok::Ident(name)) => {
                        self.pos += 1;
                        let key = Ast::Lit(ExprValue::String(name));
                        (e, h) = self.node(Ast::Index(Box::new(e), Box::new(key)), h + 1)?;
                    }
                    _ => return Err("expected a property name after `.`".into()),
                }
            } else if self.peek_op("[") {
                self.pos += 1;
                if matches!(self.toks.get(self.pos), Some(Tok::Ident(s)) if s == "*") {
                    self.pos += 1;
                    self.expect("]")?;
                    (e, h) = self.node(Ast::Star(Box::new(e)), h + 1)?;
                } else {
                    let (idx, ih) = self.or()?;
                    self.expect("]")?;
                    (e, h) = self.node(Ast::Index(Box::new(e), Box::new(idx)), h.max(ih) + 1)?;
                }
            } else {
                return Ok((e, h));
            }
        }
    }

    fn primary(&mut self) -> Parsed {
        let tok = self
            .toks
            .get(self.pos)
            .cloned()
            .ok_or("unexpected end of expression")?;
        self.pos += 1;
        let lit = |v| Ok((Ast::Lit(v), 1));
        match tok {
            Tok::Str(s) => lit(ExprValue::String(s)),
            Tok::Num(n) => lit(ExprValue::Number(n)),
            Tok::Op("(") => {
                let e = self.or()?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Ident(name) => match name.as_str() {
                "true" => lit(ExprValue::Bool(true)),
                "false" => lit(ExprValue::Bool(false)),
                "null" => lit(ExprValue::Null),
                "NaN" => lit(ExprValue::Number(f64::NAN)),
                "Infinity" => lit(ExprValue::Number(f64::INFINITY)),
                _ if self.peek_op("(") => {
                    self.pos += 1;
                    let mut args = Vec::new();
                    let mut h = 0;
                    if !self.peek_op(")") {
                        loop {
                            let (a, ah) = self.or()?;
                            args.push(a);
                            h = h.max(ah);
                            if self.peek_op(",") {
                                self.pos += 1;
                            } else {
                                break;
                            }
                        }
                    }
                    self.expect(")")?;
                    self.node(Ast::Call(name.to_ascii_lowercase(), args), h + 1)
                }
                _ => Ok((Ast::Ctx(name.to_ascii_lowercase()), 1)),
            },
            Tok::Op(op) => Err(format!("unexpected `{op}`")),
        }
    }
}

fn op_static(op: &str) -> &'static str {
    match op {
        "==" => "==",
        "!=" => "!=",
        "<=" => "<=",
        ">=" => ">=",
        "<" => "<",
        _ => ">",
    }
}

const STATUS_FNS: [&str; 4] = ["success", "failure", "always", "cancelled"];

fn uses_status(ast: &Ast) -> bool {
    match ast {
        Ast::Call(name, args) => {
            STATUS_FNS.contains(&name.as_str()) || args.iter().any(uses_status)
        }
        Ast::Index(a, b) | Ast::And(a, b) | Ast::Or(a, b) | Ast::Cmp(_, a, b) => {
            uses_status(a) || uses_status(b)
        }
        Ast::Star(a) | Ast::Not(a) => uses_status(a),
        Ast::Lit(_) | Ast::Ctx(_) => false,
    }
}

/// Why evaluation stopped.
#[derive(Debug)]
enum Stop {
    /// Needs a context only known at run time.
    Deferred,
    Error(String),
}

type Eval = Result<ExprValue, Stop>;

/// One evaluation: the contexts and the output budget every value built
/// is charged to before it is kept.
struct Ev<'a> {
    ctx: &'a Contexts,
    budget: &'a Budget,
}

impl Ev<'_> {
    fn charge(&self, n: usize) -> Result<(), Stop> {
        if self.budget.charge(n) {
            Ok(())
        } else {
            Err(self.over())
        }
    }

    fn over(&self) -> Stop {
        Stop::Error(format!(
            "the expression produces more than {} (max_expression_output)",
            bytes(self.budget.max())
        ))
    }

    /// Charges a copy of `v`, counted up to what is left.
    fn charge_value(&self, v: &ExprValue) -> Result<(), Stop> {
        self.charge(value_size(v, self.budget.left().saturating_add(1)))
    }

    fn eval(&self, ast: &Ast) -> Eval {
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
enum Found<'c> {
    Value(&'c ExprValue),
    Null,
    NotAPath,
}

fn lookup<'c>(ast: &Ast, ctx: &'c Contexts) -> Result<Found<'c>, Stop> {
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
                (ExprValue::Object(m), ExprValue::String(key)) => m
                    .get(key)
                    .or_else(|| {
                        m.iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case(key))
                            .map(|(_, v)| v)
                    })
                    .map_or(Found::Null, Found::Value),
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
fn value_size(v: &ExprValue, cap: usize) -> usize {
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

fn index(o: &ExprValue, k: &ExprValue) -> ExprValue {
    match (o, k) {
        (ExprValue::Object(m), ExprValue::String(key)) => m
            .get(key)
            .or_else(|| {
                m.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(key))
                    .map(|(_, v)| v)
            })
            .cloned()
            .unwrap_or(ExprValue::Null),
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

fn loose_eq(l: &ExprValue, r: &ExprValue) -> bool {
    match (l, r) {
        (ExprValue::Null, ExprValue::Null) => true,
        (ExprValue::String(a), ExprValue::String(b)) => a.to_lowercase() == b.to_lowercase(),
        (ExprValue::Bool(a), ExprValue::Bool(b)) => a == b,
        (ExprValue::Array(_) | ExprValue::Object(_), _)
        | (_, ExprValue::Array(_) | ExprValue::Object(_)) => false,
        _ => l.to_number() == r.to_number(),
    }
}

fn compare(op: &str, l: &ExprValue, r: &ExprValue) -> bool {
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

/// Text being built that charges the budget before it grows.
struct Out<'a, 'b> {
    ev: &'a Ev<'b>,
    buf: Vec<u8>,
}

impl<'a, 'b> Out<'a, 'b> {
    fn new(ev: &'a Ev<'b>) -> Self {
        Out {
            ev,
            buf: Vec::new(),
        }
    }

    fn push(&mut self, text: &str) -> Result<(), Stop> {
        self.ev.charge(text.len())?;
        self.buf.extend_from_slice(text.as_bytes());
        Ok(())
    }

    fn into_string(self) -> String {
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

impl Ev<'_> {
    fn call(&self, name: &str, args: &[Ast]) -> Eval {
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
    fn text(&self, v: &ExprValue) -> Result<String, Stop> {
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

fn format_str(f: &str, vals: &[String], out: &mut Out<'_, '_>) -> Result<(), Stop> {
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

fn strip_wrapper(expr: &str) -> &str {
    let t = expr.trim();
    match t.strip_prefix("${{").and_then(|r| r.strip_suffix("}}")) {
        Some(inner) if !inner.contains("${{") => inner.trim(),
        _ => t,
    }
}

fn expr_error(expr: &str, message: String) -> ExprError {
    ExprError {
        expr: short(expr.trim()).into_owned(),
        message,
    }
}

fn parse(expr: &str, limits: &ExprLimits) -> Result<Ast, ExprError> {
    let err = |message: String| expr_error(expr, message);
    if expr.len() > limits.max_bytes {
        return Err(err(format!(
            "the expression is {} bytes long, more than {} (max_expression_bytes)",
            expr.len(),
            limits.max_bytes
        )));
    }
    let toks = lex(strip_wrapper(expr)).map_err(err)?;
    if toks.is_empty() {
        return Err(err("empty expression".into()));
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
        max_depth: limits.max_depth,
    };
    let (ast, _) = p.or().map_err(err)?;
    if p.pos != p.toks.len() {
        return Err(err(format!(
            "unexpected {}",
            short(&format!("{:?}", p.toks[p.pos]))
        )));
    }
    Ok(ast)
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

#[cfg(test)]
mod tests {
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
        let (s, d) =
            substitute_partial("v=${{ matrix.rust }} x=${{ steps.a.outputs.b }}", &c).unwrap();
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
}
