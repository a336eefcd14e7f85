//! Quoting the peer's (hostile) strings for error messages and logs.

/// How much of a peer's (hostile) string an error message quotes.
pub const QUOTE_MAX: usize = 200;

/// `data` for an error message or log line: at most `max` bytes of it,
/// control characters and bytes that are not UTF-8 escaped (`\n`, `\xff`,
/// `\x1b`, `\u{85}`; a backslash doubled), with the full length noted when it was
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
                // One byte in, four out at most: an ASCII control as the
                // byte it is (`\u{1b}` took six and broke the bound).
                c if c.is_control() && c.is_ascii() => {
                    let _ = write!(s, "\\x{:02x}", c as u32);
                }
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
        assert_eq!(quote("résumé \\ \x1b".as_bytes(), 50), "résumé \\\\ \\x1b");
    }

    /// Found by the libFuzzer target `quote` (docs/fuzzing.md): 19 ASCII
    /// control bytes quoted at most 19 came out as 6 bytes each
    /// (`\u{13}`), past the documented bound of about 4 per byte.
    #[test]
    fn control_bytes_stay_within_four_bytes_each() {
        let input = [
            0x13, 0x13, 0x13, 0x13, 0x13, 0x13, 0x13, 0x13, 0x13, 0x13, 0x13, 0x13, 0x13, 0x13,
            0x13, 0x13, 0x0e, 0xba, 0x83, 0x83,
        ];
        let q = quote(&input, 19);
        assert!(q.len() <= 4 * 19 + 40, "{} bytes: {q}", q.len());
        assert!(q.starts_with("\\x13\\x13"), "{q}");
        let all: Vec<u8> = (0..0x20).chain([0x7f]).collect();
        let q = quote(&all, all.len());
        assert!(q.len() <= 4 * all.len(), "{} bytes: {q}", q.len());
    }
}
