//! The host <-> guest protocol, spoken over one binary-safe virtio-console port.
//!
//! A frame is `len: u32 LE | kind: u8 | body`, where `len` counts `kind` and
//! `body`. `Output` and `Artifact` bodies are binary; every other body is a
//! JSON object. The guest's first frame is [`Frame::Ready`], which carries
//! [`PROTOCOL_VERSION`]; the host refuses any other version.
//!
//! Both sides treat the peer's bytes as hostile: a frame longer than
//! [`MAX_FRAME`], an unknown kind or a malformed body is a [`ProtoError`],
//! never a panic, and never an allocation larger than `MAX_FRAME`.

use serde::{Deserialize, Serialize};

/// Bumped on every incompatible change.
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest `len` either side accepts (kind + body).
pub const MAX_FRAME: usize = 1024 * 1024;
/// Largest `Output` payload the agent sends in one frame.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;

const HEADER: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Ready = 1,
    Start = 2,
    Cancel = 3,
    Output = 4,
    StepStart = 5,
    StepEnd = 6,
    Artifact = 7,
    Done = 8,
    Log = 9,
    Fatal = 10,
    RunStep = 11,
    Finish = 12,
    CollectArtifacts = 13,
    ArtifactsEnd = 14,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Ready,
            2 => Kind::Start,
            3 => Kind::Cancel,
            4 => Kind::Output,
            5 => Kind::StepStart,
            6 => Kind::StepEnd,
            7 => Kind::Artifact,
            8 => Kind::Done,
            9 => Kind::Log,
            10 => Kind::Fatal,
            11 => Kind::RunStep,
            12 => Kind::Finish,
            13 => Kind::CollectArtifacts,
            14 => Kind::ArtifactsEnd,
            _ => return None,
        })
    }
}

/// Which output stream of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdout = 1,
    Stderr = 2,
}

/// Guest -> host: the agent is up and waits for `Start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub protocol: u32,
    pub agent_version: String,
    /// Guest uptime when the agent sent this, from `/proc/uptime`.
    pub boot_ms: u64,
    /// The guest kernel's release (`uname -r`).
    pub kernel: String,
}

/// Host -> guest: the job's context. Steps follow one at a time as
/// [`Frame::RunStep`]; the host decides which steps run (their `when`,
/// conditions, earlier failures), the agent only runs what it is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// Environment for every step (image Env merged with the job's).
    pub env: Vec<(String, String)>,
    /// Absolute working directory inside the root filesystem; created if missing.
    pub workdir: String,
    /// The image's `User` (`name`, `uid`, `uid:gid`, `name:group`); empty = root.
    pub user: String,
}

/// One step as the agent runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Index of the step in the job (echoed in `Output`/`StepEnd`).
    pub index: u32,
    pub name: String,
    /// The program and its arguments. `{script}` in any argument is replaced by
    /// the path of a file holding `script`.
    pub argv: Vec<String>,
    /// Script body written to a file before the step runs (may be empty).
    pub script: String,
    /// The step's whole environment (replaces `Start::env` for this step).
    pub env: Vec<(String, String)>,
    /// Working directory, absolute or relative to `Start::workdir`; empty = that.
    pub workdir: String,
    /// Kill the step's process group after this long (0 = no limit).
    pub timeout_ms: u64,
    /// Give the step `GITHUB_ENV`, `GITHUB_OUTPUT` and `GITHUB_PATH` files and
    /// return their contents in [`StepEnd::files`].
    pub file_commands: bool,
}

/// Host -> guest: send the workspace files these patterns select (GitLab
/// artifact syntax, relative to `Start::workdir`) as a tar stream of
/// `Artifact` frames, then `ArtifactsEnd`. Only regular files and the
/// directories above them are sent; symbolic links are not followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectArtifacts {
    pub paths: Vec<String>,
    pub exclude: Vec<String>,
    /// Send at most this many bytes of file contents; files past it are left
    /// out and counted in [`ArtifactsEnd`].
    #[serde(default = "default_max_artifact_bytes")]
    pub max_bytes: u64,
}

fn default_max_artifact_bytes() -> u64 {
    MAX_ARTIFACT_BYTES
}

/// Guest -> host: the artifact tar stream is complete.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactsEnd {
    /// Files sent, and the bytes of their contents.
    pub files: u64,
    pub bytes: u64,
    /// The size or file limit was reached: the files counted in
    /// `left_out_files`/`left_out_bytes` were not sent.
    pub truncated: bool,
    #[serde(default)]
    pub left_out_files: u64,
    #[serde(default)]
    pub left_out_bytes: u64,
    /// Files that were selected but could not be sent (unreadable, name too
    /// long, ...): at most [`MAX_PROBLEMS`] lines, each at most
    /// [`QUOTE_MAX`] bytes of the name.
    #[serde(default)]
    pub problems: Vec<String>,
}

/// Most artifact bytes (file contents) the agent sends for one job, unless
/// the host asks for less ([`CollectArtifacts::max_bytes`]).
pub const MAX_ARTIFACT_BYTES: u64 = 4 << 30;
/// Most artifact files (and directories) in one job's archive.
pub const MAX_ARTIFACT_FILES: u64 = 100_000;
/// Longest artifact path (bytes, relative to the working directory).
pub const MAX_ARTIFACT_PATH: usize = 4096;
/// Most lines in [`ArtifactsEnd::problems`].
pub const MAX_PROBLEMS: usize = 20;
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

/// What a step wrote to its file-command files (raw; the host parses them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCommands {
    pub env: String,
    pub output: String,
    pub path: String,
    /// A file was larger than [`MAX_FILE_COMMANDS`] and was cut.
    pub truncated: bool,
}

/// Largest file-command file the agent returns.
pub const MAX_FILE_COMMANDS: usize = 256 * 1024;

/// Host -> guest: stop the job. Graceful: SIGTERM the running step, then run
/// the `Always` steps. Not graceful: SIGKILL and finish at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    pub graceful: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStart {
    pub step: u32,
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepEnd {
    pub step: u32,
    /// The shell convention: the exit status, or 128 + signal number.
    pub exit_code: i32,
    pub duration_ms: u64,
    pub timed_out: bool,
    pub canceled: bool,
    /// The step was not run (decided by the host; the agent never sets it).
    pub skipped: bool,
    #[serde(default)]
    pub files: Option<FileCommands>,
}

/// Agent diagnostics for the debug log (never the job log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Log {
    pub message: String,
}

/// The agent cannot go on (a system failure, not the job's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fatal {
    pub message: String,
}

/// Every frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Ready(Ready),
    Start(Start),
    Cancel(Cancel),
    Output {
        step: u32,
        stream: Stream,
        data: Vec<u8>,
    },
    StepStart(StepStart),
    StepEnd(StepEnd),
    Artifact(Vec<u8>),
    Done,
    Log(Log),
    Fatal(Fatal),
    RunStep(StepSpec),
    /// Host -> guest: no more steps; sync and answer `Done`.
    Finish,
    CollectArtifacts(CollectArtifacts),
    ArtifactsEnd(ArtifactsEnd),
}

#[derive(Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// The declared length is 0 or above [`MAX_FRAME`].
    BadLength(usize),
    UnknownKind(u8),
    /// The body does not parse as the kind's payload. `detail` quotes the
    /// peer's bytes only through [`quote`].
    BadBody {
        kind: u8,
        detail: String,
    },
    /// The frame is too large to encode.
    TooLarge(usize),
    /// An earlier error left the stream out of sync.
    Poisoned,
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::BadLength(n) => write!(f, "frame length {n} is outside 1..={MAX_FRAME}"),
            ProtoError::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            ProtoError::BadBody { kind, detail } => {
                write!(f, "malformed body in frame kind {kind}: {detail}")
            }
            ProtoError::TooLarge(n) => write!(f, "frame of {n} bytes exceeds {MAX_FRAME}"),
            ProtoError::Poisoned => write!(f, "the stream is out of sync after an earlier error"),
        }
    }
}

impl std::error::Error for ProtoError {}

impl Frame {
    /// Append the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0]);
        let json = |out: &mut Vec<u8>, kind: Kind, v: &dyn erased::Json| {
            out.push(kind as u8);
            v.write(out);
        };
        match self {
            Frame::Ready(v) => json(out, Kind::Ready, v),
            Frame::Start(v) => json(out, Kind::Start, v),
            Frame::Cancel(v) => json(out, Kind::Cancel, v),
            Frame::StepStart(v) => json(out, Kind::StepStart, v),
            Frame::StepEnd(v) => json(out, Kind::StepEnd, v),
            Frame::Log(v) => json(out, Kind::Log, v),
            Frame::Fatal(v) => json(out, Kind::Fatal, v),
            Frame::RunStep(v) => json(out, Kind::RunStep, v),
            Frame::CollectArtifacts(v) => json(out, Kind::CollectArtifacts, v),
            Frame::ArtifactsEnd(v) => json(out, Kind::ArtifactsEnd, v),
            Frame::Done => out.push(Kind::Done as u8),
            Frame::Finish => out.push(Kind::Finish as u8),
            Frame::Output { step, stream, data } => {
                out.push(Kind::Output as u8);
                out.extend_from_slice(&step.to_le_bytes());
                out.push(*stream as u8);
                out.extend_from_slice(data);
            }
            Frame::Artifact(data) => {
                out.push(Kind::Artifact as u8);
                out.extend_from_slice(data);
            }
        }
        let len = out.len() - start - HEADER;
        if len > MAX_FRAME {
            out.truncate(start);
            return Err(ProtoError::TooLarge(len));
        }
        out[start..start + HEADER].copy_from_slice(&(len as u32).to_le_bytes());
        Ok(())
    }

    /// A short description for error messages: the frame's kind and step or
    /// size, never its (peer-controlled) contents in full.
    pub fn describe(&self) -> String {
        match self {
            Frame::Ready(r) => format!("Ready (protocol {})", r.protocol),
            Frame::Start(_) => "Start".into(),
            Frame::Cancel(c) => format!("Cancel (graceful: {})", c.graceful),
            Frame::Output { step, stream, data } => {
                format!("Output for step {step} ({stream:?}, {} bytes)", data.len())
            }
            Frame::StepStart(s) => format!("StepStart for step {}", s.step),
            Frame::StepEnd(e) => format!("StepEnd for step {}", e.step),
            Frame::Artifact(d) => format!("Artifact ({} bytes)", d.len()),
            Frame::Done => "Done".into(),
            Frame::Log(l) => format!("Log \"{}\"", quote(l.message.as_bytes(), QUOTE_MAX)),
            Frame::Fatal(f) => format!("Fatal \"{}\"", quote(f.message.as_bytes(), QUOTE_MAX)),
            Frame::RunStep(s) => format!("RunStep for step {}", s.index),
            Frame::Finish => "Finish".into(),
            Frame::CollectArtifacts(_) => "CollectArtifacts".into(),
            Frame::ArtifactsEnd(_) => "ArtifactsEnd".into(),
        }
    }

    /// Encode into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtoError> {
        let mut v = Vec::new();
        self.encode(&mut v)?;
        Ok(v)
    }

    /// Decode one frame body (`kind` + payload, without the length prefix).
    fn decode_body(body: &[u8]) -> Result<Frame, ProtoError> {
        let (&k, payload) = body.split_first().ok_or(ProtoError::BadLength(0))?;
        let kind = Kind::from_u8(k).ok_or(ProtoError::UnknownKind(k))?;
        fn j<T: for<'de> Deserialize<'de>>(k: u8, p: &[u8]) -> Result<T, ProtoError> {
            // serde's messages quote the input ("invalid type: string \"...\""):
            // keep only the start of them.
            serde_json::from_slice(p).map_err(|e| ProtoError::BadBody {
                kind: k,
                detail: quote(e.to_string().as_bytes(), QUOTE_MAX),
            })
        }
        Ok(match kind {
            Kind::Ready => Frame::Ready(j(k, payload)?),
            Kind::Start => Frame::Start(j(k, payload)?),
            Kind::Cancel => Frame::Cancel(j(k, payload)?),
            Kind::StepStart => Frame::StepStart(j(k, payload)?),
            Kind::StepEnd => Frame::StepEnd(j(k, payload)?),
            Kind::Log => Frame::Log(j(k, payload)?),
            Kind::Fatal => Frame::Fatal(j(k, payload)?),
            Kind::RunStep => Frame::RunStep(j(k, payload)?),
            Kind::CollectArtifacts => Frame::CollectArtifacts(j(k, payload)?),
            Kind::ArtifactsEnd => Frame::ArtifactsEnd(j(k, payload)?),
            Kind::Done | Kind::Finish => {
                if !payload.is_empty() {
                    return Err(ProtoError::BadBody {
                        kind: k,
                        detail: "Done and Finish carry no body".into(),
                    });
                }
                if kind == Kind::Done {
                    Frame::Done
                } else {
                    Frame::Finish
                }
            }
            Kind::Output => {
                if payload.len() < 5 {
                    return Err(ProtoError::BadBody {
                        kind: k,
                        detail: "Output shorter than its header".into(),
                    });
                }
                let step = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                let stream = match payload[4] {
                    1 => Stream::Stdout,
                    2 => Stream::Stderr,
                    s => {
                        return Err(ProtoError::BadBody {
                            kind: k,
                            detail: format!("unknown stream {s}"),
                        })
                    }
                };
                Frame::Output {
                    step,
                    stream,
                    data: payload[5..].to_vec(),
                }
            }
            Kind::Artifact => Frame::Artifact(payload.to_vec()),
        })
    }
}

mod erased {
    /// Object-safe JSON writer, so `encode` can treat every JSON body alike.
    pub trait Json {
        fn write(&self, out: &mut Vec<u8>);
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, out: &mut Vec<u8>) {
            // Serialising these plain structs into a Vec cannot fail.
            let _ = serde_json::to_writer(out, self);
        }
    }
}

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

/// Split `data` into `Output` frames of at most [`MAX_OUTPUT_CHUNK`] bytes.
pub fn output_frames(step: u32, stream: Stream, data: &[u8]) -> impl Iterator<Item = Frame> + '_ {
    data.chunks(MAX_OUTPUT_CHUNK).map(move |c| Frame::Output {
        step,
        stream,
        data: c.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn output_is_chunked_below_the_frame_limit() {
        let data = vec![7u8; MAX_OUTPUT_CHUNK * 2 + 1];
        let frames: Vec<_> = output_frames(3, Stream::Stdout, &data).collect();
        assert_eq!(frames.len(), 3);
        for f in &frames {
            assert!(f.to_bytes().unwrap().len() <= MAX_FRAME + HEADER);
        }
    }

    #[test]
    fn hostile_bodies_are_quoted_short_in_errors_and_descriptions() {
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

        for f in [
            Frame::Artifact(vec![0xff; MAX_FRAME - 1]),
            Frame::Fatal(Fatal {
                message: "\n".repeat(MAX_FRAME / 2),
            }),
            Frame::Output {
                step: u32::MAX,
                stream: Stream::Stdout,
                data: vec![b'a'; MAX_OUTPUT_CHUNK],
            },
        ] {
            let s = f.describe();
            assert!(s.len() <= 4 * QUOTE_MAX + 40, "{} bytes", s.len());
        }
        assert_eq!(quote(b"ok\n\xff", 10), "ok\\n\\xff");
        assert_eq!(quote(b"abcdef", 3), "abc... (6 bytes)");
        assert_eq!(
            quote("résumé \\ \x1b".as_bytes(), 50),
            "résumé \\\\ \\u{1b}"
        );
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
    fn artifacts_end_without_the_newer_fields_still_parses() {
        let old = br#"{"files":1,"bytes":2,"truncated":false}"#;
        let end: ArtifactsEnd = serde_json::from_slice(old).unwrap();
        assert_eq!((end.files, end.left_out_files), (1, 0));
        let req: CollectArtifacts =
            serde_json::from_slice(br#"{"paths":[],"exclude":[]}"#).unwrap();
        assert_eq!(req.max_bytes, MAX_ARTIFACT_BYTES);
    }

    #[test]
    fn too_large_frames_are_refused_by_the_encoder() {
        let f = Frame::Artifact(vec![0; MAX_FRAME]);
        let mut out = vec![1, 2, 3];
        assert!(matches!(f.encode(&mut out), Err(ProtoError::TooLarge(_))));
        assert_eq!(out, vec![1, 2, 3]);
    }
}
