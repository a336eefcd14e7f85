//! The `Machine` API: one disposable VM, whatever runs it.
//!
//! A [`MachineConfig`] names a kernel, an initramfs, disks and the size of the
//! VM; [`Machine::start`] boots it on a backend and hands back the agent's
//! console as a byte stream. Dropping a [`Machine`] (or calling
//! [`Machine::destroy`]) kills the VM and removes every per-VM file, on every
//! exit path.
//!
//! Backends:
//! - `qemu`: `qemu-system-x86_64 -M microvm,acpi=on`, KVM where it runs
//!   unmodified guests, TCG elsewhere.
//! - `kvm`: the embedded VMM ([`kvm`]): kvm-ioctls, vm-memory, linux-loader,
//!   ACPI, 8250 serial, i8042 reset, virtio-mmio console/block/rng.

mod host;
pub mod kvm;
mod machine;
pub mod qemu;

pub use host::{cpu_virt, probe_kvm, CpuVirt, KvmSupport};
pub use machine::{
    BackendKind, ConsoleStream, Disk, ExitStatus, Machine, MachineConfig, MachineError,
};
