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
//!
//! - `contract`: names and numbers outside the frames (port name, disk
//!   serials, command-line keys, step exit codes, protocol version);
//! - `messages`: the JSON payloads and their limits;
//! - `frame`: [`Frame`], its encoding, [`ProtoError`];
//! - `decoder`: the incremental [`Decoder`];
//! - `quote`: [`quote`], how peer strings appear in messages.

mod contract;
mod decoder;
mod frame;
mod messages;
mod quote;

pub use contract::*;
pub use decoder::Decoder;
pub use frame::{output_frames, Frame, ProtoError, MAX_FRAME, MAX_OUTPUT_CHUNK};
pub use messages::*;
pub use quote::{is_clean_line, quote, QUOTE_MAX};
