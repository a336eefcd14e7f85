//! Streaming secret masking: the algorithm behind the masking front
//! ([`super::MaskingSink`]).
//!
//! Every byte of a job log passes through a [`Masker`] before it is shown,
//! stored or sent. The values of masked variables become `[MASKED]`, and so do the
//! bodies of tokens with a known prefix (`glpat-…` → `glpat-[MASKED]`).
//! Secrets split across writes are still found: the masker holds back the
//! longest tail of its input that could be the start of a secret (at most
//! the longest phrase minus one byte, or a token still being written) until
//! more input or [`Masker::finish`] decides it. Like gitlab-runner's
//! `internal/masker`.

/// What replaces a secret.
pub const MASK: &[u8] = b"[MASKED]";

/// Prefixes of GitLab tokens that are always masked (gitlab-runner masks
/// `glpat-` always and more when the server sends `token_mask_prefixes`).
pub const DEFAULT_TOKEN_PREFIXES: &[&str] = &["glpat-", "glrt-", "glcbt-", "gldt-", "glptt-"];

/// A token longer than this is cut: mask what we have and go on.
const MAX_TOKEN: usize = 256;

/// One stream's masker: finds the secrets in what is written to it.
pub struct Masker {
    /// Longest first, so the longest of overlapping phrases wins.
    phrases: Vec<Vec<u8>>,
    prefixes: Vec<Vec<u8>>,
    pending: Vec<u8>,
}

fn token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.'
}

enum At {
    /// A secret of this many bytes starts here; write this instead.
    Secret(usize, Vec<u8>),
    /// Undecided: the rest of the input could begin a secret.
    Maybe,
    No,
}

impl Masker {
    /// `phrases`: the values to mask (empty ones are ignored);
    /// `prefixes`: token prefixes whose following token body is masked.
    pub fn new<S: AsRef<str>, P: AsRef<str>>(phrases: &[S], prefixes: &[P]) -> Masker {
        let mut phrases: Vec<Vec<u8>> = phrases
            .iter()
            .map(|p| p.as_ref().as_bytes().to_vec())
            .filter(|p| !p.is_empty())
            .collect();
        phrases.sort_by_key(|p| std::cmp::Reverse(p.len()));
        phrases.dedup();
        let prefixes = prefixes
            .iter()
            .map(|p| p.as_ref().as_bytes().to_vec())
            .filter(|p| !p.is_empty())
            .collect();
        Masker {
            phrases,
            prefixes,
            pending: Vec::new(),
        }
    }

    /// Feed `data`; returns what can be written now.
    pub fn write(&mut self, data: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(data);
        self.drain(false)
    }

    /// End of input: returns everything still held back, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        self.drain(true)
    }

    /// How many bytes are held back now.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn at(&self, rest: &[u8], last: bool) -> At {
        let mut maybe = false;
        for p in &self.phrases {
            if rest.starts_with(p) {
                return At::Secret(p.len(), MASK.to_vec());
            }
            if !last && rest.len() < p.len() && p.starts_with(rest) {
                maybe = true;
            }
        }
        for p in &self.prefixes {
            if rest.starts_with(p) {
                let body = rest[p.len()..]
                    .iter()
                    .take(MAX_TOKEN)
                    .take_while(|b| token_byte(**b))
                    .count();
                let open = p.len() + body == rest.len() && body < MAX_TOKEN;
                if open && !last {
                    return At::Maybe;
                }
                if body == 0 {
                    continue;
                }
                let mut out = p.clone();
                out.extend_from_slice(MASK);
                return At::Secret(p.len() + body, out);
            }
            if !last && rest.len() < p.len() && p.starts_with(rest) {
                maybe = true;
            }
        }
        if maybe {
            At::Maybe
        } else {
            At::No
        }
    }

    fn drain(&mut self, last: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pending.len());
        if self.phrases.is_empty() && self.prefixes.is_empty() {
            return std::mem::take(&mut self.pending);
        }
        let firsts: Vec<u8> = self
            .phrases
            .iter()
            .chain(self.prefixes.iter())
            .map(|p| p[0])
            .collect();
        let buf = std::mem::take(&mut self.pending);
        let mut i = 0;
        while i < buf.len() {
            // Fast path: bytes that start no secret.
            if !firsts.contains(&buf[i]) {
                out.push(buf[i]);
                i += 1;
                continue;
            }
            match self.at(&buf[i..], last) {
                At::Secret(n, with) => {
                    out.extend_from_slice(&with);
                    i += n;
                }
                At::Maybe => {
                    self.pending = buf[i..].to_vec();
                    return out;
                }
                At::No => {
                    out.push(buf[i]);
                    i += 1;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(m: &mut Masker, parts: &[&str]) -> String {
        let mut out = Vec::new();
        for p in parts {
            out.extend(m.write(p.as_bytes()));
        }
        out.extend(m.finish());
        String::from_utf8(out).unwrap()
    }

    fn masker(phrases: &[&str]) -> Masker {
        Masker::new(phrases, DEFAULT_TOKEN_PREFIXES)
    }

    #[test]
    fn whole_and_split_secrets_are_masked() {
        let mut m = masker(&["secret"]);
        assert_eq!(run(&mut m, &["a secret b"]), "a [MASKED] b");
        assert_eq!(run(&mut m, &["a secret|s", "ecret"]), "a [MASKED]|[MASKED]");
        assert_eq!(
            run(&mut m, &["a s", "e", "c", "r", "e", "t!"]),
            "a [MASKED]!"
        );
        assert_eq!(
            run(&mut m, &["secre"]),
            "secre",
            "a prefix at the end is not a secret"
        );
        assert_eq!(run(&mut m, &["sssecret"]), "ss[MASKED]");
    }

    #[test]
    fn holds_back_at_most_the_longest_phrase_minus_one() {
        let mut m = masker(&["secret", "hunter2"]);
        let out = m.write(b"xxxxxhunter");
        assert_eq!(out, b"xxxxx");
        assert_eq!(m.pending(), 6);
        assert_eq!(m.write(b"3"), b"hunter3");
        assert_eq!(m.pending(), 0);
    }

    #[test]
    fn longest_overlapping_phrase_wins() {
        let mut m = masker(&["abc", "abcdef"]);
        assert_eq!(run(&mut m, &["xabcdefx abcx"]), "x[MASKED]x [MASKED]x");
    }

    #[test]
    fn token_prefixes_mask_the_token_body() {
        let mut m = masker(&[]);
        assert_eq!(
            run(&mut m, &["token glpat-abc", "DEF_123 done"]),
            "token glpat-[MASKED] done"
        );
        assert_eq!(run(&mut m, &["glrt-xyz"]), "glrt-[MASKED]");
        assert_eq!(
            run(&mut m, &["gl", "pat-"]),
            "glpat-",
            "a bare prefix stays"
        );
    }

    #[test]
    fn nothing_to_mask_passes_everything_through() {
        let mut m = Masker::new::<&str, &str>(&[], &[]);
        assert_eq!(m.write(b"\x00\xffabc"), b"\x00\xffabc");
    }

    #[test]
    fn every_split_of_a_stream_gives_the_same_result() {
        let text = "pre secret mid glpat-tok3n post secret";
        let want = "pre [MASKED] mid glpat-[MASKED] post [MASKED]";
        for cut in 0..text.len() {
            let mut m = masker(&["secret"]);
            assert_eq!(
                run(&mut m, &[&text[..cut], &text[cut..]]),
                want,
                "cut {cut}"
            );
        }
    }
}
