//! Fuzz harnesses for the host <-> guest protocol (see docs/fuzzing.md).
//!
//! Each harness takes arbitrary bytes, as a libFuzzer target does, and
//! panics only when a property that must hold for every input is broken.
//! `cargo test` drives them with proptest for a bounded number of cases
//! (`PROPTEST_CASES` raises it); the cargo-fuzz targets in `fuzz/` call the
//! same functions. Not part of the API.

use crate::proto::{quote, Decoder, Frame, ProtoError, MAX_FRAME, QUOTE_MAX};

/// Decode `stream` pushed in pieces whose sizes come from `cuts` (one byte
/// a piece, 0 meaning "the rest"), the way reads from the port arrive.
/// Returns the frames and the first error.
pub fn decode_in_pieces(stream: &[u8], cuts: &[u8]) -> (Vec<Frame>, Option<ProtoError>) {
    let mut d = Decoder::new();
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut cuts = cuts.iter().copied().cycle();
    // At most one more piece than bytes: every piece but "the rest" is >= 1.
    while !rest.is_empty() {
        let n = match cuts.next() {
            Some(0) | None => rest.len(),
            Some(c) => usize::from(c).min(rest.len()),
        };
        d.push(&rest[..n]);
        rest = &rest[n..];
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
        // A complete frame never stays buffered: only a partial one.
        assert!(
            d.pending() < MAX_FRAME + 4,
            "{} bytes pending after taking every frame out",
            d.pending()
        );
    }
    (frames, None)
}

/// The decoder (both directions use it) on any byte stream: no panic; the
/// same frames and error whatever the read sizes; after an error, nothing
/// more; every decoded frame re-encodes to bytes that decode to it again;
/// error messages and frame descriptions stay short.
pub fn decoder(data: &[u8]) {
    // First byte: how many bytes of cut sizes follow; then the cuts.
    let (cuts, stream) = match data.split_first() {
        Some((&n, rest)) => rest.split_at(usize::from(n % 16).min(rest.len())),
        None => (&[][..], data),
    };
    let whole = decode_in_pieces(stream, &[]);
    let pieces = decode_in_pieces(stream, cuts);
    assert_eq!(whole, pieces, "read sizes changed what was decoded");
    let (frames, err) = whole;
    if let Some(e) = err {
        let msg = e.to_string();
        assert!(
            msg.len() <= 4 * QUOTE_MAX + 200,
            "error of {} bytes",
            msg.len()
        );
    }
    for f in frames {
        assert!(f.describe().len() <= 4 * QUOTE_MAX + 60, "long description");
        round_trip(&f);
    }
}

/// A frame survives encoding and decoding unchanged (or is refused as too
/// large by the encoder, never by the decoder).
pub fn round_trip(f: &Frame) {
    let bytes = match f.to_bytes() {
        Ok(b) => b,
        Err(ProtoError::TooLarge(_)) => return,
        Err(e) => panic!("encoding {} failed: {e}", f.describe()),
    };
    let mut d = Decoder::new();
    d.push(&bytes);
    assert_eq!(d.next_frame().as_ref(), Ok(&Some(f.clone())));
    assert_eq!(d.pending(), 0);
}

/// `quote` on any bytes: one line, no control characters, bounded.
pub fn quoting(data: &[u8]) {
    let max = usize::from(data.first().copied().unwrap_or(0));
    let q = quote(data, max);
    assert!(!q.chars().any(char::is_control), "{q:?}");
    assert!(q.len() <= 4 * max + 40, "{} bytes for max {max}", q.len());
}

/// Artifact patterns (from the job's configuration) against paths (from the
/// guest's file system): no panic, and `**` never blows up (the input is
/// split at the first NUL into pattern and path).
pub fn glob(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let (pattern, path) = s.split_once('\0').unwrap_or((&s, "a/b/c"));
    crate::glob::matches(pattern, path);
    // A pattern always matches itself when it has no wildcards and no
    // empty, `.` or `..` components.
    if !pattern.is_empty()
        && !pattern.contains(['*', '?'])
        && pattern
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
    {
        assert!(crate::glob::matches(pattern, pattern), "{pattern:?}");
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use kiln_testkit::fuzz::config;

    use super::*;
    use crate::proto::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            Just(String::new()),
            Just("\u{0}\n\\\"\u{1b}[31m".to_string())
        ]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let bytes = proptest::collection::vec(any::<u8>(), 0..300);
        prop_oneof![
            (any::<u32>(), any::<bool>(), bytes.clone()).prop_map(|(step, e, data)| {
                Frame::Output {
                    step,
                    stream: if e { Stream::Stderr } else { Stream::Stdout },
                    data,
                }
            }),
            bytes.prop_map(Frame::Artifact),
            text().prop_map(|message| Frame::Log(Log { message })),
            text().prop_map(|message| Frame::Fatal(Fatal { message })),
            any::<u32>().prop_map(|step| Frame::StepStart(StepStart { step })),
            (any::<u32>(), any::<i32>(), any::<u64>(), any::<[bool; 3]>()).prop_map(
                |(step, exit_code, duration_ms, b)| Frame::StepEnd(StepEnd {
                    step,
                    exit_code,
                    duration_ms,
                    timed_out: b[0],
                    canceled: b[1],
                    skipped: b[2],
                    files: None,
                })
            ),
            (any::<u32>(), text(), any::<u64>()).prop_map(|(protocol, kernel, boot_ms)| {
                Frame::Ready(Ready {
                    protocol,
                    agent_version: kernel.clone(),
                    boot_ms,
                    kernel,
                })
            }),
            (
                proptest::collection::vec((text(), text()), 0..4),
                text(),
                any::<u32>()
            )
                .prop_map(|(env, script, index)| Frame::RunStep(StepSpec {
                    index,
                    name: script.clone(),
                    argv: vec![script.clone()],
                    script,
                    env,
                    workdir: "/".into(),
                    timeout_ms: 1,
                    file_commands: true,
                })),
            proptest::collection::vec(text(), 0..4).prop_map(|paths| Frame::CollectArtifacts(
                CollectArtifacts {
                    exclude: paths.clone(),
                    paths,
                    max_bytes: 7,
                }
            )),
            any::<bool>().prop_map(|graceful| Frame::Cancel(Cancel { graceful })),
            Just(Frame::Done),
            Just(Frame::Finish),
        ]
    }

    /// A stream of valid frames, then damaged: bytes overwritten, the
    /// stream cut, and cut sizes prepended as `decoder` expects.
    fn damaged_stream() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::collection::vec(frame(), 0..6),
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 0..16),
        )
            .prop_map(|(frames, flips, cut, cuts)| {
                let mut s = Vec::new();
                for f in frames {
                    f.encode(&mut s).unwrap();
                }
                if !s.is_empty() {
                    for (at, b) in flips {
                        let i = at % s.len();
                        s[i] = b;
                    }
                    s.truncate(s.len() - cut % (s.len() / 4 + 1));
                }
                let mut data = vec![cuts.len() as u8];
                data.extend(cuts);
                data.extend(s);
                data
            })
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(frame(), 1..8),
                             cuts in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut s = Vec::new();
            for f in &frames {
                round_trip(f);
                f.encode(&mut s).unwrap();
            }
            let (got, err) = decode_in_pieces(&s, &cuts);
            prop_assert_eq!(err, None);
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn the_decoder_survives_damaged_streams(data in damaged_stream()) {
            decoder(&data);
        }

        #[test]
        fn the_decoder_survives_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            decoder(&data);
        }

        #[test]
        fn quoting_is_one_bounded_line(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            quoting(&data);
        }

        #[test]
        fn globs_never_panic(pattern in "[a*?/.]{0,24}", path in "[a./]{0,24}") {
            let mut data = pattern.into_bytes();
            data.push(0);
            data.extend(path.into_bytes());
            glob(&data);
        }
    }
}
