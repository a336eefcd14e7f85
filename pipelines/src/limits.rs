//! Bounds on everything a pipeline file controls, and the helpers that
//! enforce them: an expansion budget charged before memory is used, and a
//! quoting helper that keeps hostile text in messages short.
//!
//! Every pipeline file is hostile input: a few kilobytes of YAML aliases,
//! `extends`, `!reference` or `parallel: matrix` can describe gigabytes once
//! expanded. The defaults follow GitLab's and GitHub's own limits where they
//! have one, and are generous enough for the largest real configurations.

use std::borrow::Cow;
use std::cell::Cell;

/// Limits on a pipeline file and what it expands to. [`Default`] holds the
/// values kiln uses; a caller may raise them for a file it trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest pipeline file or `include: local` file read, in bytes
    /// (GitLab's `max_yaml_size_bytes`, 4 MiB).
    pub max_file_bytes: u64,
    /// Deepest nesting of YAML mappings and sequences (GitLab's
    /// `max_yaml_depth`, 100), also after `!reference` is resolved.
    pub max_yaml_depth: usize,
    /// Size the YAML of all files together may reach once aliases are
    /// expanded, counted as text bytes plus [`NODE_BYTES`] per node
    /// (roughly what it takes in memory).
    pub max_yaml_bytes: usize,
    /// Size everything derived from the YAML may reach: jobs after
    /// `extends`, `!reference` and `default:`, and the job specs built from
    /// them (scripts, variables, needs), counted like `max_yaml_bytes`.
    pub max_output_bytes: usize,
    /// Most `include:` entries in the whole pipeline, nested ones included
    /// (GitLab's `ci_max_includes`, 150).
    pub max_includes: usize,
    /// Deepest `include:` nesting (GitLab: 100).
    pub max_include_depth: usize,
    /// Most jobs in a pipeline, after `parallel` and matrix expansion.
    pub max_jobs: usize,
    /// Longest job name or id, in characters (GitLab: 255).
    pub max_job_name_chars: usize,
    /// Deepest `extends` chain, the job itself included (GitLab: 11).
    pub max_extends_depth: usize,
    /// Deepest `!reference` nesting (GitLab: 10).
    pub max_reference_depth: usize,
    /// Most jobs one `parallel:` may create (GitLab: 200).
    pub max_parallel: usize,
    /// Most jobs one GitHub `strategy.matrix` may create (GitHub: 256).
    pub max_matrix: usize,
    /// Most `needs` entries of one job (GitLab: 50).
    pub max_needs: usize,
    /// Most variables one `variables:`/`env:` mapping may define.
    pub max_variables: usize,
    /// Most script lines (commands) in one step.
    pub max_script_lines: usize,
    /// Largest step script and largest variable value, in bytes. A job's
    /// script and environment travel to the guest in one protocol frame
    /// (1 MiB), so nothing larger could run anyway.
    pub max_script_bytes: usize,
    /// Longest `${{ }}` expression or `rules: if`, in bytes (GitHub: 21,000).
    pub max_expression_bytes: usize,
    /// Deepest nesting of one expression (GitHub: 50).
    pub max_expression_depth: usize,
    /// Largest value one expression (or one text with several `${{ }}`)
    /// may produce, in bytes (GitHub: 1 MiB).
    pub max_expression_output: usize,
}

/// What one YAML node (or one string in a job spec) counts for in the
/// expansion budgets, besides its text.
pub const NODE_BYTES: usize = 64;

const MIB: usize = 1 << 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 4 << 20,
            max_yaml_depth: 100,
            max_yaml_bytes: 48 * MIB,
            max_output_bytes: 256 * MIB,
            max_includes: 150,
            max_include_depth: 100,
            max_jobs: 50_000,
            max_job_name_chars: 255,
            max_extends_depth: 11,
            max_reference_depth: 10,
            max_parallel: 200,
            max_matrix: 256,
            max_needs: 50,
            max_variables: 2_000,
            max_script_lines: 20_000,
            max_script_bytes: 512 << 10,
            max_expression_bytes: 21_000,
            max_expression_depth: 50,
            max_expression_output: MIB,
        }
    }
}

/// A running total charged before memory is used; once over, every
/// further charge fails too.
#[derive(Debug)]
pub(crate) struct Budget {
    used: Cell<usize>,
    max: usize,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Self {
        Budget {
            used: Cell::new(0),
            max,
        }
    }

    /// Adds `n`; `false` when the total is now over the limit.
    pub(crate) fn charge(&self, n: usize) -> bool {
        let used = self.used.get().saturating_add(n);
        self.used.set(used);
        used <= self.max
    }

    /// What is left before the limit.
    pub(crate) fn left(&self) -> usize {
        self.max.saturating_sub(self.used.get())
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

/// Longest piece of file-controlled text quoted in a message, in chars.
pub(crate) const QUOTE_CHARS: usize = 80;

/// `s` made safe to quote in a message: at most [`QUOTE_CHARS`] characters
/// (then `…`), control characters escaped so they cannot move the cursor,
/// recolour or clear a terminal.
pub(crate) fn short(s: &str) -> Cow<'_, str> {
    short_n(s, QUOTE_CHARS)
}

/// Like [`short`] with a caller-chosen length.
pub(crate) fn short_n(s: &str, max_chars: usize) -> Cow<'_, str> {
    let clean = !s.chars().any(char::is_control);
    let mut chars = s.char_indices();
    let cut = chars.nth(max_chars).map(|(i, _)| i);
    if clean && cut.is_none() {
        return Cow::Borrowed(s);
    }
    let kept = &s[..cut.unwrap_or(s.len())];
    let mut out = String::with_capacity(kept.len() + 8);
    for c in kept.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if cut.is_some() {
        out.push('…');
    }
    Cow::Owned(out)
}

/// Notes for a terminal: each shortened, control characters escaped.
pub(crate) fn printable(notes: Vec<String>) -> Vec<String> {
    notes
        .into_iter()
        .map(|n| short_n(&n, 300).into_owned())
        .collect()
}

/// Renders a byte count for messages: `4 MiB`, `300 KiB`, `17 bytes`.
pub(crate) fn bytes(n: usize) -> String {
    if n >= MIB && n & (MIB - 1) == 0 {
        format!("{} MiB", n / MIB)
    } else if n >= 1024 && n & 1023 == 0 {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} bytes")
    }
}

/// A cycle or chain of names for a message: at most the first and last
/// few, each shortened.
pub(crate) fn chain(names: &[&str]) -> String {
    const EACH_END: usize = 4;
    let quote = |n: &&str| short_n(n, 40).into_owned();
    if names.len() <= 2 * EACH_END {
        return names.iter().map(quote).collect::<Vec<_>>().join(" -> ");
    }
    let head: Vec<String> = names[..EACH_END].iter().map(quote).collect();
    let tail: Vec<String> = names[names.len() - EACH_END..].iter().map(quote).collect();
    format!(
        "{} -> … ({} more) … -> {}",
        head.join(" -> "),
        names.len() - 2 * EACH_END,
        tail.join(" -> ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_truncates_and_escapes() {
        assert_eq!(short("build"), "build");
        assert_eq!(short("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\n");
        let long = "x".repeat(1000);
        let s = short(&long);
        assert_eq!(s.chars().count(), QUOTE_CHARS + 1);
        assert!(s.ends_with('…'));
        // Multi-byte characters are cut on a boundary.
        let wide = "é".repeat(200);
        assert!(short(&wide).ends_with('…'));
    }

    #[test]
    fn budget_stays_failed_once_over() {
        let b = Budget::new(10);
        assert!(b.charge(6));
        assert_eq!(b.left(), 4);
        assert!(!b.charge(6));
        assert!(!b.charge(0));
    }

    #[test]
    fn chain_keeps_both_ends() {
        let names: Vec<String> = (0..100).map(|i| format!("j{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let c = chain(&refs);
        assert!(c.starts_with("j0 -> j1"), "{c}");
        assert!(c.ends_with("j98 -> j99"), "{c}");
        assert!(c.contains("92 more"), "{c}");
        assert_eq!(chain(&["a", "b", "a"]), "a -> b -> a");
    }
}
