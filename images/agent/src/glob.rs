//! GitLab-style artifact patterns (`out/`, `*.log`, `dist/**/*.js`) and file
//! selection, shared by the guest agent (which picks the files) and the
//! host (which filters per artifact spec).

use std::path::{Path, PathBuf};

/// Does `name` match the single-component pattern `pat` (`*`, `?`)?
fn match_component(pat: &[u8], name: &[u8]) -> bool {
    match (pat.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            match_component(&pat[1..], name)
                || (!name.is_empty() && match_component(pat, &name[1..]))
        }
        (Some(b'?'), Some(_)) => match_component(&pat[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => match_component(&pat[1..], &name[1..]),
        _ => false,
    }
}

fn match_parts(pat: &[&str], path: &[&str]) -> bool {
    match pat.first() {
        None => path.is_empty(),
        Some(&"**") => (0..=path.len()).any(|i| match_parts(&pat[1..], &path[i..])),
        Some(p) => {
            !path.is_empty()
                && match_component(p.as_bytes(), path[0].as_bytes())
                && match_parts(&pat[1..], &path[1..])
        }
    }
}

/// Does the relative path `path` (or a directory above it) match the
/// GitLab artifact pattern `pattern` (`out/`, `*.log`, `dist/**/*.js`)?
pub fn matches(pattern: &str, path: &str) -> bool {
    let pattern = pattern.trim_start_matches("./").trim_end_matches('/');
    let pat: Vec<&str> = pattern
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let parts: Vec<&str> = path.split('/').collect();
    if pat.is_empty() {
        return false;
    }
    // A matching directory takes everything below it.
    (1..=parts.len()).any(|n| match_parts(&pat, &parts[..n]))
}

/// Regular files below `root`, as relative `/`-separated paths, sorted.
/// Symbolic links are not followed (nor archived).
fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(root.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let r = rel.join(e.file_name());
            if ft.is_dir() {
                stack.push(r);
            } else if ft.is_file() {
                out.push(r.to_string_lossy().to_string());
            }
        }
    }
    out.sort();
    out
}

/// The files of `root` that `paths` select and `exclude` does not.
pub fn select(root: &Path, paths: &[String], exclude: &[String]) -> Vec<String> {
    walk(root)
        .into_iter()
        .filter(|f| paths.iter().any(|p| matches(p, f)))
        .filter(|f| !exclude.iter().any(|p| matches(p, f)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(matches("out/", "out/a/b.txt"));
        assert!(matches("*.log", "x.log") && !matches("*.log", "d/x.log"));
        assert!(matches("dist/**/*.js", "dist/a/b/c.js") && matches("dist/**/*.js", "dist/c.js"));
        assert!(matches("./target/rel", "target/rel/bin"));
        assert!(!matches("", "anything") && !matches("out", "outside"));
    }

    #[test]
    fn select_skips_symlinks_and_applies_exclude() {
        let d = std::env::temp_dir().join(format!("kiln-glob-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("out/sub")).unwrap();
        std::fs::write(d.join("out/a.txt"), b"a").unwrap();
        std::fs::write(d.join("out/sub/b.log"), b"b").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("out/link")).unwrap();
        let got = select(&d, &["out/".into()], &["**/*.log".into()]);
        assert_eq!(got, vec!["out/a.txt".to_string()]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
