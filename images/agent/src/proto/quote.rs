//! Quoting the peer's (hostile) strings for error messages and logs.

/// How much of a peer's (hostile) string an error message quotes.
pub const QUOTE_MAX: usize = 200;

/// `data` for an error message or log line: at most `max` bytes of it,
/// control characters and bytes that are not UTF-8 escaped (`\n`, `\xff`,
/// `\u{1b}`; a backslash doubled), with the full length noted when it was
/// cut. One line, never longer than about `4 * max + 30` bytes.
pub fn quote(data: &[u8], max: usize) -> String {
    use std::fmt::Write;
    let shown = &data[..data.len().min(max)];
    let mut s = String::with_capacity(shown.len() + 16);
    for chunk in shown.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '\n' => s.push_str("\\n"),
                '\r' => s.push_str("\\r"),
                '\t' => s.push_str("\\t"),
                c if c.is_control() => {
                    let _ = write!(s, "\\u{{{:x}}}", c as u32);
                }
                c => s.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    if data.len() > max {
        let _ = write!(s, "... ({} bytes)", data.len());
    }
    s
}

/// Whether `line` (from the peer) can be shown as it is: one line, no
/// control characters, at most `max` bytes.
pub fn is_clean_line(line: &str, max: usize) -> bool {
    line.len() <= max && !line.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes_and_cuts() {
        assert_eq!(quote(b"ok\n\xff", 10), "ok\\n\\xff");
        assert_eq!(quote(b"abcdef", 3), "abc... (6 bytes)");
        assert_eq!(
            quote("résumé \\ \x1b".as_bytes(), 50),
            "résumé \\\\ \\u{1b}"
        );
    }
}
