//! `$GITHUB_ENV`, `$GITHUB_OUTPUT`, `$GITHUB_STATE` and `$GITHUB_PATH` file
//! commands, as `actions/runner` `FileCommandManager.cs` reads them. The
//! executor creates the files before each step and applies what these
//! functions return to the following steps.

/// An error in a file-command file; `line` is 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct FileCommandError {
    pub line: usize,
    pub message: String,
}

/// Parses `NAME=value` lines and `NAME<<DELIM` heredocs (ending at a line
/// that is exactly `DELIM`). Empty lines are skipped; `\r\n` is accepted.
pub fn parse_file_commands(content: &str) -> Result<Vec<(String, String)>, FileCommandError> {
    let lines: Vec<&str> = content
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    // A trailing newline leaves one empty element.
    let n = if content.ends_with('\n') {
        lines.len() - 1
    } else {
        lines.len()
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let line = lines[i];
        let no = i + 1;
        i += 1;
        if line.is_empty() {
            continue;
        }
        let eq = line.find('=');
        let heredoc = line.find("<<");
        let err = |message: String| FileCommandError { line: no, message };
        match (eq, heredoc) {
            (Some(e), h) if h.filter(|&h| h < e).is_none() => {
                let name = &line[..e];
                if name.is_empty() {
                    return Err(err("empty name before `=`".into()));
                }
                out.push((name.to_string(), line[e + 1..].to_string()));
            }
            (_, Some(h)) => {
                let name = &line[..h];
                let delim = &line[h + 2..];
                if name.is_empty() || delim.is_empty() {
                    return Err(err(format!("invalid heredoc `{line}`")));
                }
                let start = i;
                let end = (start..n)
                    .find(|&k| lines[k] == delim)
                    .ok_or_else(|| err(format!("no line `{delim}` ends the value of `{name}`")))?;
                out.push((name.to_string(), lines[start..end].join("\n")));
                i = end + 1;
            }
            _ => {
                return Err(err(format!(
                    "expected `NAME=value` or `NAME<<DELIMITER`, got `{line}`"
                )))
            }
        }
    }
    Ok(out)
}

/// `$GITHUB_ENV`: like [`parse_file_commands`], but `NODE_OPTIONS` is
/// refused as the runner does.
pub fn parse_env_file(content: &str) -> Result<Vec<(String, String)>, FileCommandError> {
    let vars = parse_file_commands(content)?;
    if vars
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("NODE_OPTIONS"))
    {
        return Err(FileCommandError {
            line: 0,
            message: "`NODE_OPTIONS` cannot be set through $GITHUB_ENV".into(),
        });
    }
    Ok(vars)
}

/// `$GITHUB_PATH`: one directory per line, in the order to prepend them
/// (the last line ends up first in `PATH`).
pub fn parse_path_file(content: &str) -> Vec<String> {
    content
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Prepends `$GITHUB_PATH` entries to `path` (later entries first,
/// duplicates removed).
pub fn prepend_path(path: &str, added: &[String]) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for a in added.iter().rev() {
        if !parts.contains(&a.as_str()) {
            parts.push(a);
        }
    }
    for p in path.split(':').filter(|p| !p.is_empty()) {
        if !parts.contains(&p) {
            parts.push(p);
        }
    }
    parts.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn simple_and_heredoc() {
        let f =
            "A=1\nB=x=y\r\n\nJSON<<EOF\n{\n  \"a\": 1\n}\nEOF\nC<<ghadelim_1\n\nghadelim_1\nD=\n";
        assert_eq!(
            parse_file_commands(f).unwrap(),
            vec![
                kv("A", "1"),
                kv("B", "x=y"),
                kv("JSON", "{\n  \"a\": 1\n}"),
                kv("C", ""),
                kv("D", "")
            ]
        );
        // `=` before `<<` is a plain assignment.
        assert_eq!(
            parse_file_commands("X=a<<b").unwrap(),
            vec![kv("X", "a<<b")]
        );
    }

    #[test]
    fn errors() {
        assert_eq!(parse_file_commands("A<<EOF\nnope\n").unwrap_err().line, 1);
        assert_eq!(parse_file_commands("A=1\njunk\n").unwrap_err().line, 2);
        assert!(parse_file_commands("=1").is_err());
        assert!(parse_file_commands("A<<").is_err());
        assert!(parse_env_file("NODE_OPTIONS=--inspect\n").is_err());
        assert!(parse_env_file("OK=1\n").is_ok());
    }

    #[test]
    fn path_file() {
        let added = parse_path_file("/opt/a\n\n  /opt/b  \n");
        assert_eq!(added, vec!["/opt/a", "/opt/b"]);
        assert_eq!(
            prepend_path("/usr/bin:/opt/a", &added),
            "/opt/b:/opt/a:/usr/bin"
        );
    }
}
