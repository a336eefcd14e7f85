//! GitLab `rules: if` / `workflow: rules: if` expressions.
//!
//! Grammar: `a || b`, `a && b` (binds tighter), parentheses, and
//! comparisons `x == y`, `x != y`, `x =~ /re/`, `x !~ /re/`, where operands
//! are `$VAR`/`${VAR}`, quoted strings, `/regex/flags` and `null`. A bare
//! operand is true when it is a defined, non-empty variable or string.
//! Regexes match anywhere in the string (RE2 semantics, as GitLab).

use std::collections::BTreeMap;

use crate::error::ExprError;
use crate::limits::{short, Limits};

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Var(String),
    Str(String),
    Regex(String, String),
    Null,
    Eq,
    Ne,
    Match,
    NoMatch,
    And,
    Or,
    LParen,
    RParen,
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        let two: String = chars[i..chars.len().min(i + 2)].iter().collect();
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            '$' => {
                i += 1;
                let braced = chars.get(i) == Some(&'{');
                if braced {
                    i += 1;
                }
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                if start == i {
                    return Err("`$` without a variable name".into());
                }
                let name: String = chars[start..i].iter().collect();
                if braced {
                    if chars.get(i) != Some(&'}') {
                        return Err(format!("unclosed `${{{}`", short(&name)));
                    }
                    i += 1;
                }
                out.push(Tok::Var(name));
            }
            '"' | '\'' => {
                let quote = c;
                i += 1;
                let start = i;
                while i < chars.len() && chars[i] != quote {
                    i += 1;
                }
                if i >= chars.len() {
                    return Err("unterminated string".into());
                }
                out.push(Tok::Str(chars[start..i].iter().collect()));
                i += 1;
            }
            '/' => {
                i += 1;
                let mut pat = String::new();
                loop {
                    match chars.get(i) {
                        None => return Err("unterminated regex".into()),
                        Some('\\') if chars.get(i + 1) == Some(&'/') => {
                            pat.push('/');
                            i += 2;
                        }
                        Some('\\') => {
                            pat.push('\\');
                            if let Some(n) = chars.get(i + 1) {
                                pat.push(*n);
                            }
                            i += 2;
                        }
                        Some('/') => {
                            i += 1;
                            break;
                        }
                        Some(ch) => {
                            pat.push(*ch);
                            i += 1;
                        }
                    }
                }
                let start = i;
                while i < chars.len() && chars[i].is_ascii_alphabetic() {
                    i += 1;
                }
                out.push(Tok::Regex(pat, chars[start..i].iter().collect()));
            }
            _ if two == "==" => {
                out.push(Tok::Eq);
                i += 2;
            }
            _ if two == "!=" => {
                out.push(Tok::Ne);
                i += 2;
            }
            _ if two == "=~" => {
                out.push(Tok::Match);
                i += 2;
            }
            _ if two == "!~" => {
                out.push(Tok::NoMatch);
                i += 2;
            }
            _ if two == "&&" => {
                out.push(Tok::And);
                i += 2;
            }
            _ if two == "||" => {
                out.push(Tok::Or);
                i += 2;
            }
            _ if chars[i..].iter().take(4).collect::<String>() == "null" => {
                out.push(Tok::Null);
                i += 4;
            }
            _ => return Err(format!("unexpected `{c}`")),
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq)]
enum Val {
    Null,
    Str(String),
    Regex(String, String),
}

struct Parser<'a> {
    toks: Vec<Tok>,
    pos: usize,
    vars: &'a BTreeMap<String, String>,
    /// Open parentheses around the current position, at most `max_depth`.
    depth: usize,
    max_depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn or(&mut self) -> Result<bool, String> {
        let mut v = self.and()?;
        while self.peek() == Some(&Tok::Or) {
            self.pos += 1;
            let r = self.and()?;
            v = v || r;
        }
        Ok(v)
    }

    fn and(&mut self) -> Result<bool, String> {
        let mut v = self.primary()?;
        while self.peek() == Some(&Tok::And) {
            self.pos += 1;
            let r = self.primary()?;
            v = v && r;
        }
        Ok(v)
    }

    fn primary(&mut self) -> Result<bool, String> {
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            self.depth += 1;
            if self.depth > self.max_depth {
                return Err(format!(
                    "parentheses nest deeper than {} levels (max_expression_depth)",
                    self.max_depth
                ));
            }
            let v = self.or()?;
            if self.peek() != Some(&Tok::RParen) {
                return Err("missing `)`".into());
            }
            self.pos += 1;
            self.depth -= 1;
            return Ok(v);
        }
        let left = self.operand()?;
        let op = match self.peek() {
            Some(t @ (Tok::Eq | Tok::Ne | Tok::Match | Tok::NoMatch)) => t.clone(),
            _ => {
                return Ok(match left {
                    Val::Null => false,
                    Val::Str(s) => !s.is_empty(),
                    Val::Regex(..) => true,
                })
            }
        };
        self.pos += 1;
        let right = self.operand()?;
        match op {
            Tok::Eq => Ok(left == right),
            Tok::Ne => Ok(left != right),
            Tok::Match => regex_match(&left, &right),
            _ => regex_match(&left, &right).map(|m| !m),
        }
    }

    fn operand(&mut self) -> Result<Val, String> {
        let tok = self.toks.get(self.pos).cloned().ok_or("expected a value")?;
        self.pos += 1;
        Ok(match tok {
            Tok::Var(name) => match self.vars.get(&name) {
                Some(v) => Val::Str(v.clone()),
                None => Val::Null,
            },
            Tok::Str(s) => Val::Str(s),
            Tok::Regex(p, f) => Val::Regex(p, f),
            Tok::Null => Val::Null,
            other => {
                return Err(format!(
                    "expected a value, found {}",
                    short(&format!("{other:?}"))
                ))
            }
        })
    }
}

fn regex_match(left: &Val, right: &Val) -> Result<bool, String> {
    let (pat, flags) = match right {
        Val::Regex(p, f) => (p.clone(), f.clone()),
        // GitLab allows the pattern to come from a variable: "/re/".
        Val::Str(s) if s.len() >= 2 && s.starts_with('/') => {
            let end = s.rfind('/').unwrap_or(0);
            if end == 0 {
                return Err(format!("`{}` is not a /regex/", short(s)));
            }
            (s[1..end].to_string(), s[end + 1..].to_string())
        }
        _ => return Err("the right side of `=~`/`!~` must be a /regex/".into()),
    };
    let prefix = if flags.contains('i') { "(?i)" } else { "" };
    // The compiled program is bounded (well below the crate's 10 MiB
    // default): a pattern comes from the file.
    let re = regex::RegexBuilder::new(&format!("{prefix}{pat}"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("bad regex: {}", short(&e.to_string())))?;
    let text = match left {
        Val::Str(s) => s.as_str(),
        Val::Null => return Ok(false),
        Val::Regex(..) => return Err("a regex cannot be matched against a regex".into()),
    };
    Ok(re.is_match(text))
}

/// Evaluates a `rules: if` expression against `vars`, with the default
/// [`Limits`] on its length and nesting.
pub fn eval_rule_if(expr: &str, vars: &BTreeMap<String, String>) -> Result<bool, ExprError> {
    eval_rule_if_with(expr, vars, &Limits::default())
}

/// [`eval_rule_if`] with the caller's limits.
pub(crate) fn eval_rule_if_with(
    expr: &str,
    vars: &BTreeMap<String, String>,
    limits: &Limits,
) -> Result<bool, ExprError> {
    let err = |message: String| ExprError {
        expr: short(expr).into_owned(),
        message,
    };
    if expr.len() > limits.max_expression_bytes {
        return Err(err(format!(
            "the expression is {} bytes long, more than {} (max_expression_bytes)",
            expr.len(),
            limits.max_expression_bytes
        )));
    }
    let toks = lex(expr).map_err(err)?;
    let mut p = Parser {
        toks,
        pos: 0,
        vars,
        depth: 0,
        max_depth: limits.max_expression_depth,
    };
    let v = p.or().map_err(err)?;
    if p.pos != p.toks.len() {
        return Err(err(format!(
            "unexpected {}",
            short(&format!("{:?}", p.toks[p.pos]))
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        [
            ("CI_COMMIT_BRANCH", "main"),
            ("EMPTY", ""),
            ("RE", "/^ma/"),
            ("V", "1.2.3"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn ev(e: &str) -> bool {
        eval_rule_if(e, &vars()).unwrap()
    }

    #[test]
    fn comparisons() {
        assert!(ev(r#"$CI_COMMIT_BRANCH == "main""#));
        assert!(ev(r#"$CI_COMMIT_BRANCH != 'dev'"#));
        assert!(!ev(r#"${CI_COMMIT_BRANCH} == "dev""#));
        assert!(ev("$UNDEFINED == null"));
        assert!(!ev("$EMPTY == null"));
        assert!(ev(r#"$EMPTY == """#));
        assert!(ev("$CI_COMMIT_BRANCH"));
        assert!(!ev("$EMPTY"));
        assert!(!ev("$UNDEFINED"));
    }

    #[test]
    fn regexes() {
        assert!(ev("$CI_COMMIT_BRANCH =~ /^ma/"));
        assert!(ev("$CI_COMMIT_BRANCH =~ /AI/i"));
        assert!(!ev("$CI_COMMIT_BRANCH =~ /AI/"));
        assert!(ev("$V =~ /^\\d+\\.\\d+\\.\\d+$/"));
        assert!(ev("$CI_COMMIT_BRANCH !~ /^release/"));
        assert!(!ev("$UNDEFINED =~ /.*/"));
        assert!(ev("$CI_COMMIT_BRANCH =~ $RE"));
    }

    #[test]
    fn boolean_logic_and_precedence() {
        assert!(ev(r#"$UNDEFINED || $CI_COMMIT_BRANCH == "main""#));
        assert!(!ev(r#"$UNDEFINED && $CI_COMMIT_BRANCH == "main""#));
        // && binds tighter than ||
        assert!(ev(r#"$CI_COMMIT_BRANCH == "main" || $UNDEFINED && $EMPTY"#));
        assert!(!ev(
            r#"($CI_COMMIT_BRANCH == "main" || $UNDEFINED) && $EMPTY"#
        ));
    }

    #[test]
    fn errors_do_not_panic() {
        for bad in [
            "$",
            "(",
            "$A ==",
            "\"x",
            "/x",
            "$A =~ 'x'",
            "$A == == $B",
            "x",
            "$A =~ /(/",
        ] {
            assert!(eval_rule_if(bad, &vars()).is_err(), "{bad}");
        }
    }

    #[test]
    fn deep_parentheses_are_refused_not_recursed() {
        let deep = format!("{}$A{}", "(".repeat(5000), ")".repeat(5000));
        let e = eval_rule_if(&deep, &vars()).unwrap_err();
        assert!(e.message.contains("max_expression_depth"), "{e}");
        assert!(e.to_string().len() < 300, "{e}");
        let ok = format!("{}$CI_COMMIT_BRANCH{}", "(".repeat(50), ")".repeat(50));
        assert!(ev(&ok));
        let long = format!("$A == '{}'", "x".repeat(30_000));
        let e = eval_rule_if(&long, &vars()).unwrap_err();
        assert!(e.message.contains("max_expression_bytes"), "{e}");
    }
}
