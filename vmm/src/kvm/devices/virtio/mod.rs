//! virtio devices on the virtio-mmio transport.

pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
