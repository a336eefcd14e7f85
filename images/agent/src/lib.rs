//! kiln's guest agent and its wire protocol.
//!
//! The library part is [`proto`], shared by the host (the executor) and the
//! guest (the agent binary, `src/main.rs`).

#[doc(hidden)]
pub mod fuzzing;
pub mod glob;
pub mod proto;
