//! GitLab-style artifact patterns (`out/`, `*.log`, `dist/**/*.js`) and file
//! selection, shared by the guest agent (which picks the files) and the
//! host (which filters per artifact spec).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Does `name` match the single-component pattern `pat` (`*`, `?`)?
/// Linear in practice: on a mismatch it only backtracks to the last `*`.
fn match_component(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// Does `pat` match `parts[..n]` for some `n >= 1`? (A matching directory
/// takes everything below it.) One pass over the pattern: no exponential
/// backtracking on `**`, whatever the depth of the path.
fn match_prefix(pat: &[&[u8]], parts: &[&[u8]]) -> bool {
    let m = parts.len();
    // reach[j]: the pattern so far matches parts[..j].
    let mut reach = vec![false; m + 1];
    reach[0] = true;
    for p in pat {
        let mut next = vec![false; m + 1];
        if *p == b"**" {
            let mut any = false;
            for j in 0..=m {
                any |= reach[j];
                next[j] = any;
            }
        } else {
            for j in 0..m {
                if reach[j] && match_component(p, parts[j]) {
                    next[j + 1] = true;
                }
            }
        }
        reach = next;
    }
    reach[1..].iter().any(|&r| r)
}

/// Does the relative path `path` (or a directory above it) match the
/// GitLab artifact pattern `pattern` (`out/`, `*.log`, `dist/**/*.js`)?
pub fn matches(pattern: &str, path: &str) -> bool {
    matches_path(pattern, Path::new(path))
}

/// [`matches`] for any path, also one whose name is not UTF-8.
pub fn matches_path(pattern: &str, path: &Path) -> bool {
    let pattern = pattern.trim_start_matches("./").trim_end_matches('/');
    let pat: Vec<&[u8]> = pattern
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::as_bytes)
        .collect();
    if pat.is_empty() {
        return false;
    }
    let parts: Vec<&[u8]> = path.as_os_str().as_bytes().split(|&b| b == b'/').collect();
    match_prefix(&pat, &parts)
}

/// Regular files below `root`, as relative paths, sorted. Names are kept
/// as they are (bytes), UTF-8 or not. Symbolic links are not followed (nor
/// archived).
fn walk(root: &Path) -> Vec<PathBuf> {
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
                out.push(r);
            }
        }
    }
    out.sort();
    out
}

/// The files of `root` that `paths` select and `exclude` does not, with
/// their names as they are.
pub fn select_paths(root: &Path, paths: &[String], exclude: &[String]) -> Vec<PathBuf> {
    walk(root)
        .into_iter()
        .filter(|f| paths.iter().any(|p| matches_path(p, f)))
        .filter(|f| !exclude.iter().any(|p| matches_path(p, f)))
        .collect()
}

/// [`select_paths`] as strings. A name that is not UTF-8 cannot be a
/// string: such files are returned in `not_utf8`, never dropped unseen.
pub fn select_utf8(
    root: &Path,
    paths: &[String],
    exclude: &[String],
    not_utf8: &mut Vec<PathBuf>,
) -> Vec<String> {
    let mut out = Vec::new();
    for p in select_paths(root, paths, exclude) {
        match p.into_os_string().into_string() {
            Ok(s) => out.push(s),
            Err(os) => not_utf8.push(PathBuf::from(os)),
        }
    }
    out
}

/// [`select_paths`] as strings, for callers that need UTF-8 names; files
/// whose names are not UTF-8 are left out (use [`select_utf8`] to see them).
pub fn select(root: &Path, paths: &[String], exclude: &[String]) -> Vec<String> {
    select_utf8(root, paths, exclude, &mut Vec::new())
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
        assert!(matches("a?c", "abc") && !matches("a?c", "ac"));
        assert!(matches("*x*y", "axxby") && !matches("*x*y", "axxb"));
        assert!(matches("**/b", "a/b") && matches("**", "a") && matches("a/**", "a/b/c"));
        use std::os::unix::ffi::OsStrExt;
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"dist/a\xffb.bin"));
        assert!(matches_path("dist/", odd) && matches_path("dist/*.bin", odd));
    }

    #[test]
    fn hostile_names_and_patterns_match_in_polynomial_time() {
        // Exponential backtracking would not finish: many stars against a
        // long name, many `**` against a deep path.
        let name = "a".repeat(4000);
        assert!(!matches("*a*a*a*a*a*a*a*a*a*a*b", &name));
        let deep = vec!["d"; 2000].join("/");
        assert!(!matches("**/**/**/**/**/**/**/**/**/x", &deep));
        assert!(matches("**/**/**/**/d", &deep));
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
        use std::os::unix::ffi::OsStrExt;
        let odd = std::ffi::OsStr::from_bytes(b"out/n\xffme");
        std::fs::write(d.join(odd), b"c").unwrap();
        let mut not_utf8 = Vec::new();
        let got = select_utf8(&d, &["out/".into()], &[], &mut not_utf8);
        assert_eq!(got.len(), 2);
        assert_eq!(not_utf8, vec![PathBuf::from(odd)]);
        assert_eq!(
            select_paths(&d, &["out/".into()], &["**/*.log".into()]).len(),
            2
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
