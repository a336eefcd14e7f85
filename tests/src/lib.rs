//! Test support for kiln's end-to-end tests: image fixtures, the guest agent
//! build, a shared kernel cache, and leak checks (no QEMU process, no per-VM
//! file left behind).

pub mod fake_github;
pub mod fake_gitlab;
pub mod fake_server;
pub mod fixtures;
pub mod harness;
pub mod lab_registry;
pub mod nested;
pub mod netlab;
