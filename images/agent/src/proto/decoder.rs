//! The incremental frame decoder (sans I/O).

use super::frame::{Frame, ProtoError, HEADER, MAX_FRAME};

/// Incremental, sans-I/O frame decoder: feed it bytes as they arrive, take
/// frames out. A caller that takes every complete frame out before pushing
/// more keeps at most one frame plus one push's worth buffered; each byte is
/// moved at most once however small the frames are.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Where the next frame starts in `buf` (decoded frames before it).
    start: usize,
    /// Set after an error: the stream is out of sync and must be dropped.
    poisoned: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes read from the peer.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 {
            // Drop the frames already taken out (once per push, not per frame).
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet part of a complete frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        if self.poisoned {
            return Err(ProtoError::Poisoned);
        }
        let rest = &self.buf[self.start..];
        if rest.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len == 0 || len > MAX_FRAME {
            self.poisoned = true;
            return Err(ProtoError::BadLength(len));
        }
        if rest.len() < HEADER + len {
            return Ok(None);
        }
        let result = Frame::decode_body(&rest[HEADER..HEADER + len]);
        self.start += HEADER + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        if result.is_err() {
            self.poisoned = true;
        }
        result.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use crate::proto::frame::Kind;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Ready(Ready {
                protocol: PROTOCOL_VERSION,
                agent_version: "0.1.0".into(),
                boot_ms: 812,
                kernel: "6.1.0".into(),
            }),
            Frame::Start(Start {
                env: vec![
                    ("PATH".into(), "/bin".into()),
                    ("EMPTY".into(), String::new()),
                ],
                workdir: "/builds/x".into(),
                user: "1000:1000".into(),
                network: Some(GuestNetwork {
                    address: "10.213.0.2".into(),
                    prefix: 30,
                    gateway: "10.213.0.1".into(),
                    mtu: 1500,
                    dns: vec!["10.213.0.1".into()],
                    hostname: "kiln".into(),
                    mac: "52:54:00:00:00:01".into(),
                }),
                services: Some(Services {
                    wait_ms: 30_000,
                    list: vec![ServiceStart {
                        index: 0,
                        name: "postgres:15".into(),
                        aliases: vec!["postgres".into(), "db".into()],
                        fstype: "erofs".into(),
                        argv: vec!["docker-entrypoint.sh".into(), "postgres".into()],
                        env: vec![("POSTGRES_PASSWORD".into(), "x".into())],
                        workdir: String::new(),
                        user: "postgres".into(),
                        ports: vec![5432],
                    }],
                }),
            }),
            Frame::Resume(Resume {
                generation: 3,
                entropy: (0..=255).collect(),
                time_ns: 1_764_500_000_000_000_000,
                hostname: "kiln".into(),
                rootfstype: "erofs".into(),
                workdir: "/builds/x".into(),
                no_scratch: true,
            }),
            Frame::ServiceStatus(ServiceStatus {
                index: 0,
                healthy: false,
                error: "no connection".into(),
                log: "line\n\u{1b}[31m".into(),
            }),
            Frame::RunStep(StepSpec {
                index: 3,
                name: "script".into(),
                argv: vec!["sh".into(), "-e".into(), "{script}".into()],
                script: "echo 'hi'\nexit 3\n".into(),
                env: vec![("A".into(), "b=c".into())],
                workdir: "sub".into(),
                timeout_ms: 5000,
                file_commands: true,
            }),
            Frame::Finish,
            Frame::CollectArtifacts(CollectArtifacts {
                paths: vec!["dist/".into()],
                exclude: vec!["*.log".into()],
                max_bytes: 1 << 20,
            }),
            Frame::ArtifactsEnd(ArtifactsEnd {
                files: 2,
                bytes: 10,
                truncated: true,
                left_out_files: 3,
                left_out_bytes: 4 << 30,
                problems: vec!["a\\xff: unreadable".into()],
            }),
            Frame::Cancel(Cancel { graceful: true }),
            Frame::Output {
                step: 7,
                stream: Stream::Stderr,
                data: (0..=255u8).collect(),
            },
            Frame::Output {
                step: 0,
                stream: Stream::Stdout,
                data: vec![],
            },
            Frame::StepStart(StepStart { step: 2 }),
            Frame::StepEnd(StepEnd {
                step: 1,
                exit_code: 137,
                duration_ms: 10,
                timed_out: true,
                canceled: false,
                skipped: false,
                files: None,
            }),
            Frame::StepEnd(StepEnd {
                step: 2,
                exit_code: 0,
                duration_ms: 1,
                timed_out: false,
                canceled: false,
                skipped: false,
                files: Some(FileCommands {
                    env: "A=1\n".into(),
                    output: "x<<EOF\ny\nEOF\n".into(),
                    path: "/opt/bin\n".into(),
                    truncated: false,
                }),
            }),
            Frame::Artifact(vec![0, 1, 2, 0xff]),
            Frame::Done,
            Frame::Log(Log {
                message: "loaded virtio_mmio".into(),
            }),
            Frame::Fatal(Fatal {
                message: "no root disk".into(),
            }),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in all_frames() {
            let bytes = f.to_bytes().unwrap();
            let mut d = Decoder::new();
            d.push(&bytes);
            assert_eq!(d.next_frame().unwrap(), Some(f));
            assert_eq!(d.next_frame().unwrap(), None);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn frames_split_at_every_byte_boundary_reassemble() {
        let mut stream = Vec::new();
        for f in all_frames() {
            f.encode(&mut stream).unwrap();
        }
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &stream {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, all_frames());
    }

    #[test]
    fn oversized_and_zero_lengths_are_rejected_without_allocating() {
        for len in [0u32, (MAX_FRAME + 1) as u32, u32::MAX] {
            let mut d = Decoder::new();
            d.push(&len.to_le_bytes());
            assert_eq!(d.next_frame(), Err(ProtoError::BadLength(len as usize)));
            // Poisoned: nothing more comes out of an out-of-sync stream.
            d.push(&Frame::Done.to_bytes().unwrap());
            assert!(d.next_frame().is_err());
        }
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            vec![99],                     // unknown kind
            vec![1, b'{'],                // truncated JSON
            vec![1, b'[', b']'],          // wrong JSON shape
            vec![4, 1, 0],                // Output shorter than its header
            vec![4, 0, 0, 0, 0, 3, b'x'], // unknown stream
            vec![8, 0],                   // Done with a body
            vec![12, 1],                  // Finish with a body
            vec![11, b'{', b'}'],         // RunStep without its fields
            vec![6, 0xff, 0xfe],          // invalid UTF-8 JSON
        ];
        for body in cases {
            let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
            bytes.extend_from_slice(&body);
            let mut d = Decoder::new();
            d.push(&bytes);
            assert!(d.next_frame().is_err(), "accepted {body:?}");
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        // A small deterministic xorshift: the decoder must survive any bytes.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..2000 {
            let mut d = Decoder::new();
            let n = (x % 64) as usize;
            let mut bytes = Vec::with_capacity(n);
            for _ in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            // Keep lengths small so some frames complete and get parsed.
            if bytes.len() >= 4 {
                bytes[1] = 0;
                bytes[2] = 0;
                bytes[3] = 0;
                bytes[0] %= 40;
            }
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
        }
    }

    #[test]
    fn many_tiny_frames_decode_in_one_pass() {
        // 300k frames of 5 bytes, pushed 64 KiB at a time as the host reads
        // them: every frame comes out, and the buffer never holds more than
        // one push plus a partial frame.
        let one = Frame::Done.to_bytes().unwrap();
        let stream: Vec<u8> = one
            .iter()
            .copied()
            .cycle()
            .take(one.len() * 300_000)
            .collect();
        let mut d = Decoder::new();
        let mut n = 0;
        for chunk in stream.chunks(64 * 1024) {
            d.push(chunk);
            assert!(d.buf.len() <= 64 * 1024 + one.len());
            while let Some(f) = d.next_frame().unwrap() {
                assert_eq!(f, Frame::Done);
                n += 1;
            }
        }
        assert_eq!((n, d.pending()), (300_000, 0));
    }

    #[test]
    fn hostile_bodies_are_quoted_short_in_errors() {
        // A 1 MiB string where a number belongs: serde quotes the input.
        let huge = "x".repeat(MAX_FRAME - 100);
        let mut body = vec![Kind::StepStart as u8];
        body.extend_from_slice(format!("{{\"step\":\"{huge}\"}}").as_bytes());
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        let mut d = Decoder::new();
        d.push(&bytes);
        let e = d.next_frame().unwrap_err().to_string();
        assert!(e.len() < 400, "{} bytes: {}", e.len(), &e[..400]);
        assert!(e.contains("malformed body in frame kind 5"), "{e}");
        assert_eq!(d.next_frame(), Err(ProtoError::Poisoned));
    }
}
