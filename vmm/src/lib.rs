//! The `Machine` API: one disposable VM, whatever runs it.
//!
//! A [`MachineConfig`] names a kernel, an initramfs, disks and the size of the
//! VM; [`Machine::start`] boots it on a backend and hands back the guest's
//! console (one named virtio-serial port) as a byte stream. Dropping a [`Machine`] (or calling
//! [`Machine::destroy`]) kills the VM and removes every per-VM file, on every
//! exit path.
//!
//! Backends:
//! - `qemu`: `qemu-system-x86_64 -M microvm,acpi=on` ([`QemuOptions`]), KVM where it runs
//!   unmodified guests, TCG elsewhere.
//! - `kvm`: the embedded VMM ([`kvm`]), one jailed process per VM
//!   ([`process`], [`jail`]): kvm-ioctls, vm-memory, linux-loader,
//!   ACPI, 8250 serial, i8042 reset, virtio-mmio console/block/rng.

mod config;
mod error;
mod host;
pub mod jail;
pub mod kvm;
mod machine;
pub mod process;
pub mod qemu;
mod run_dir;
mod tail;

pub use config::{Disk, MachineConfig};
pub use error::MachineError;
pub use host::{cpu_virt, probe_kvm, CpuVirt, KvmSupport};
pub use jail::{Isolation, IsolationMode, JailReport};
pub use machine::{BackendKind, ConsoleStream, ExitStatus, Machine};
pub use qemu::QemuOptions;
