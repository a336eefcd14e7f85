//! Device models of the embedded VMM.

pub mod i8042;
pub mod serial;
pub mod virtio;
