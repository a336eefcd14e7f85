//! Frames: the wire format (`len: u32 LE | kind: u8 | body`), encoding and
//! decoding one frame's body.

use serde::Deserialize;

use super::messages::*;
use super::quote::{quote, QUOTE_MAX};

/// Largest `len` either side accepts (kind + body).
pub const MAX_FRAME: usize = 1024 * 1024;
/// Largest `Output` payload the agent sends in one frame.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;

pub(super) const HEADER: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Kind {
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
    ServiceStatus = 15,
    Resume = 16,
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
            15 => Kind::ServiceStatus,
            16 => Kind::Resume,
            _ => return None,
        })
    }
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
    /// Guest -> host: how one of `Start::services` started (one frame per
    /// service, before the first step).
    ServiceStatus(ServiceStatus),
    /// Host -> guest: the first frame to a VM restored from a snapshot.
    Resume(Resume),
}

/// A frame that cannot be encoded, or bytes from the peer that are not a
/// frame. After a decoding error the stream is out of sync for good.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The declared length is 0 or above [`MAX_FRAME`].
    #[error("frame length {0} is outside 1..={max}", max = MAX_FRAME)]
    BadLength(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The body does not parse as the kind's payload. `detail` quotes the
    /// peer's bytes only through [`quote`].
    #[error("malformed body in frame kind {kind}: {detail}")]
    BadBody { kind: u8, detail: String },
    /// The frame is too large to encode.
    #[error("frame of {0} bytes exceeds {max}", max = MAX_FRAME)]
    TooLarge(usize),
    /// An earlier error left the stream out of sync.
    #[error("the stream is out of sync after an earlier error")]
    Poisoned,
}

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
            Frame::ServiceStatus(v) => json(out, Kind::ServiceStatus, v),
            Frame::Resume(v) => json(out, Kind::Resume, v),
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
            Frame::ServiceStatus(s) => format!("ServiceStatus for service {}", s.index),
            Frame::Resume(r) => format!("Resume (generation {})", r.generation),
        }
    }

    /// Encode into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtoError> {
        let mut v = Vec::new();
        self.encode(&mut v)?;
        Ok(v)
    }

    /// Decode one frame body (`kind` + payload, without the length prefix).
    pub(super) fn decode_body(body: &[u8]) -> Result<Frame, ProtoError> {
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
            Kind::ServiceStatus => Frame::ServiceStatus(j(k, payload)?),
            Kind::Resume => Frame::Resume(j(k, payload)?),
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
    fn hostile_frames_are_described_short() {
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
    }

    #[test]
    fn too_large_frames_are_refused_by_the_encoder() {
        let f = Frame::Artifact(vec![0; MAX_FRAME]);
        let mut out = vec![1, 2, 3];
        assert!(matches!(f.encode(&mut out), Err(ProtoError::TooLarge(_))));
        assert_eq!(out, vec![1, 2, 3]);
    }
}
