//! Error positions: key paths (`jobs.build.steps[2]`), a best-effort
//! locator that finds a path's line and column in block-style YAML, and
//! [`Ctx`], which builds an [`Error::Invalid`] pointing there.

use crate::error::{Error, Location};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Renders a path as `jobs.build.steps[2]`.
pub(crate) fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

#[derive(Clone)]
struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

/// Finds the line and column of the node at `path` in block-style YAML.
/// Returns `None` when the node is not written literally (flow style,
/// aliases, keys that came from `extends` or `include`).
pub(crate) fn locate(text: &str, path: &[Seg]) -> Option<Location> {
    let mut lines: Vec<Line<'_>> = text
        .lines()
        .enumerate()
        .filter_map(|(no, raw)| {
            let trimmed = raw.trim_start_matches(' ');
            if trimmed.trim().is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
                return None;
            }
            Some(Line {
                no: no + 1,
                indent: raw.len() - trimmed.len(),
                text: trimmed,
            })
        })
        .collect();
    let mut start = 0usize;
    let mut end = lines.len();
    let mut parent: Option<usize> = None; // indent of the parent node
    let mut found = None;
    let is_child = |l: &Line<'_>, parent: Option<usize>| match parent {
        None => true,
        Some(p) => l.indent > p || (l.indent == p && is_item(l.text)),
    };
    for seg in path {
        let first = lines
            .get(start..end)?
            .iter()
            .position(|l| is_child(l, parent))?
            + start;
        let indent = lines[first].indent;
        match seg {
            Seg::Key(k) => {
                let idx = (first..end)
                    .find(|&i| lines[i].indent == indent && key_of(lines[i].text) == Some(k))?;
                found = Some(Location {
                    line: lines[idx].no,
                    column: indent + 1,
                });
                start = idx + 1;
                end = block_end(&lines, idx + 1, end, indent);
                parent = Some(indent);
            }
            Seg::Index(n) => {
                let idx = (first..end)
                    .filter(|&i| lines[i].indent == indent && is_item(lines[i].text))
                    .nth(*n)?;
                found = Some(Location {
                    line: lines[idx].no,
                    column: indent + 1,
                });
                let item_end = (idx + 1..end)
                    .find(|&i| lines[i].indent <= indent)
                    .unwrap_or(end);
                // Re-read the item line as the first line of its content.
                let rest = lines[idx].text[1..].trim_start_matches(' ');
                let shift = lines[idx].text.len() - rest.len();
                lines[idx].indent += shift;
                lines[idx].text = rest;
                start = idx;
                end = item_end;
                parent = Some(indent);
            }
        }
    }
    found
}

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

fn block_end(lines: &[Line<'_>], from: usize, end: usize, indent: usize) -> usize {
    (from..end)
        .find(|&i| {
            lines[i].indent < indent || (lines[i].indent == indent && !is_item(lines[i].text))
        })
        .unwrap_or(end)
}

fn key_of(text: &str) -> Option<&str> {
    let (key, _) = if let Some(rest) = text.strip_prefix('"') {
        let close = rest.find('"')?;
        return rest[close + 1..].starts_with(':').then(|| &rest[..close]);
    } else if let Some(rest) = text.strip_prefix('\'') {
        let close = rest.find('\'')?;
        return rest[close + 1..].starts_with(':').then(|| &rest[..close]);
    } else {
        let colon = text
            .find(": ")
            .or_else(|| text.strip_suffix(':').map(|s| s.len()))?;
        (text[..colon].trim_end(), ())
    };
    Some(key)
}

/// Context for semantic errors: the file name, its text, and the path of the
/// node being read.
pub(crate) struct Ctx<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl Ctx<'_> {
    pub(crate) fn err(&self, path: &[Seg], message: impl Into<String>) -> Error {
        Error::Invalid {
            file: self.file.to_string(),
            location: locate(self.text, path),
            path: path_string(path),
            message: message.into(),
        }
    }
}

/// Builds a path from a prefix and more segments.
pub(crate) fn join(path: &[Seg], more: &[Seg]) -> Vec<Seg> {
    let mut v = path.to_vec();
    v.extend_from_slice(more);
    v
}

pub(crate) fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
# comment
stages: [build]
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - name: Build
        run: cargo build
  test:
    steps:
    - run: a
    -   run: b
        shell: bash
";

    fn p(s: &[&str]) -> Vec<Seg> {
        s.iter()
            .map(|x| match x.parse::<usize>() {
                Ok(n) => Seg::Index(n),
                Err(_) => Seg::Key(x.to_string()),
            })
            .collect()
    }

    #[test]
    fn locates_keys_and_items() {
        assert_eq!(
            locate(DOC, &p(&["stages"])),
            Some(Location { line: 2, column: 1 })
        );
        assert_eq!(
            locate(DOC, &p(&["jobs", "build"])),
            Some(Location { line: 4, column: 3 })
        );
        assert_eq!(
            locate(DOC, &p(&["jobs", "build", "steps", "1"])),
            Some(Location { line: 8, column: 7 })
        );
        assert_eq!(
            locate(DOC, &p(&["jobs", "build", "steps", "1", "run"])),
            Some(Location { line: 9, column: 9 })
        );
        assert_eq!(
            locate(DOC, &p(&["jobs", "test", "steps", "1", "shell"])),
            Some(Location {
                line: 14,
                column: 9
            })
        );
        assert_eq!(locate(DOC, &p(&["jobs", "nope"])), None);
        assert_eq!(locate(DOC, &p(&["jobs", "build", "steps", "5"])), None);
    }
}
