//! virtio devices on the virtio-mmio transport.

pub mod block;
pub mod console;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;
