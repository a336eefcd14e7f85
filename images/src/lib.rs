//! Images for kiln's guests: the job image as a read-only root filesystem,
//! the guest kernel, and the initramfs that carries the agent.

pub mod apply;
