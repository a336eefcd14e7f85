//! Syntax: the lexer, and a recursive-descent parser to an [`Ast`] whose
//! height is bounded by `max_expression_depth`.

use super::value::parse_number;
use super::{expr_error, ExprLimits, ExprValue};
use crate::error::ExprError;
use crate::limits::short;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
    Str(String),
    Num(f64),
    Ident(String),
    Op(&'static str),
}

pub(super) fn lex(src: &str) -> Result<Vec<Tok>, String> {
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
pub(super) enum Ast {
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
pub(super) type Parsed = Result<(Ast, usize), String>;

pub(super) struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    /// Nested `or`/`!` calls in progress: the parser's own recursion.
    depth: usize,
    max_depth: usize,
}

impl Parser {
    pub(super) fn peek_op(&self, op: &str) -> bool {
        matches!(self.toks.get(self.pos), Some(Tok::Op(o)) if *o == op)
    }

    pub(super) fn expect(&mut self, op: &str) -> Result<(), String> {
        if self.peek_op(op) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("expected `{op}`"))
        }
    }

    pub(super) fn too_deep(&self) -> String {
        format!(
            "the expression nests deeper than {} levels (max_expression_depth)",
            self.max_depth
        )
    }

    /// `ast`, whose tree is `height` high, if that is within the limit.
    pub(super) fn node(&self, ast: Ast, height: usize) -> Parsed {
        if height > self.max_depth {
            return Err(self.too_deep());
        }
        Ok((ast, height))
    }

    pub(super) fn enter(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > self.max_depth {
            return Err(self.too_deep());
        }
        Ok(())
    }

    pub(super) fn or(&mut self) -> Parsed {
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

    pub(super) fn and(&mut self) -> Parsed {
        let (mut l, mut h) = self.cmp()?;
        while self.peek_op("&&") {
            self.pos += 1;
            let (r, rh) = self.cmp()?;
            (l, h) = self.node(Ast::And(Box::new(l), Box::new(r)), h.max(rh) + 1)?;
        }
        Ok((l, h))
    }

    pub(super) fn cmp(&mut self) -> Parsed {
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

    pub(super) fn unary(&mut self) -> Parsed {
        if self.peek_op("!") {
            self.pos += 1;
            self.enter()?;
            let (inner, h) = self.unary()?;
            self.depth -= 1;
            return self.node(Ast::Not(Box::new(inner)), h + 1);
        }
        self.postfix()
    }

    pub(super) fn postfix(&mut self) -> Parsed {
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

    pub(super) fn primary(&mut self) -> Parsed {
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

pub(super) fn op_static(op: &str) -> &'static str {
    match op {
        "==" => "==",
        "!=" => "!=",
        "<=" => "<=",
        ">=" => ">=",
        "<" => "<",
        _ => ">",
    }
}

pub(super) const STATUS_FNS: [&str; 4] = ["success", "failure", "always", "cancelled"];

pub(super) fn uses_status(ast: &Ast) -> bool {
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

pub(super) fn strip_wrapper(expr: &str) -> &str {
    let t = expr.trim();
    match t.strip_prefix("${{").and_then(|r| r.strip_suffix("}}")) {
        Some(inner) if !inner.contains("${{") => inner.trim(),
        _ => t,
    }
}

pub(super) fn parse(expr: &str, limits: &ExprLimits) -> Result<Ast, ExprError> {
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
