//! From a [`MachineConfig`] and the descriptors it names ([`Sources`]) to a
//! running [`KvmMachine`]: the configuration is checked, then the VM (irqchip, PIT), guest memory, kernel and initrd,
//! devices, ACPI and boot tables and vCPUs are set up in that order; the
//! event loop and vCPU threads start last. Every step can fail, and a
//! failure leaves nothing behind (the per-VM directory, descriptors and
//! mappings go with the values that own them).

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{Bus, BusBuilder};
use super::control::Control;
use super::devices::i8042::{self, I8042};
use super::devices::serial::{SerialPort, COM1_BASE, COM1_IRQ};
use super::devices::virtio::block::{Block, VIRTIO_BLK_ID_BYTES};
use super::devices::virtio::console::Console;
use super::devices::virtio::net::{Net, NetBackend};
use super::devices::virtio::rng::Rng;
use super::event_loop::EventLoop;
use super::snapshot::pause::Pause;
use super::snapshot::{self, Snapshot};
use super::{acpi, boot, io_err, kick, kvm_err, memory, vcpu, KvmMachine, MAX_VCPUS};
use crate::config::MachineConfig;
use crate::error::MachineError;
use crate::machine::ExitStatus;
use crate::tail;

/// Devices besides the disks: the console and the rng.
const FIXED_VIRTIO_DEVICES: usize = 2;

fn validate(config: &MachineConfig, network: bool) -> Result<(), MachineError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(MachineError::Config(format!(
            "vcpus must be 1..={MAX_VCPUS}, not {}",
            config.vcpus
        )));
    }
    if config.memory_mib < memory::MIN_MEMORY_MIB {
        return Err(MachineError::Config(format!(
            "memory must be at least {} MiB, not {}",
            memory::MIN_MEMORY_MIB,
            config.memory_mib
        )));
    }
    let fixed = FIXED_VIRTIO_DEVICES + usize::from(network);
    if config.disks.len() + fixed > memory::VIRTIO_MAX_DEVICES {
        return Err(MachineError::Config(format!(
            "at most {} disks are supported",
            memory::VIRTIO_MAX_DEVICES - fixed
        )));
    }
    for d in &config.disks {
        if d.serial.len() > VIRTIO_BLK_ID_BYTES {
            return Err(MachineError::Config(format!(
                "disk serial '{}' must be at most {VIRTIO_BLK_ID_BYTES} bytes",
                d.serial
            )));
        }
    }
    Ok(())
}

/// What the VM is built from: descriptors opened by whoever may open them
/// (the VMM process gets descriptors, never paths, and may run where no
/// path resolves).
pub struct Sources {
    pub kvm: Kvm,
    pub kernel: File,
    pub initramfs: File,
    /// One per [`MachineConfig::disks`] entry, in that order, opened
    /// read-only where the disk is.
    pub disks: Vec<File>,
    /// The VMM's end of the console socket; the other end is the caller's
    /// [`crate::ConsoleStream`].
    pub console: UnixStream,
    /// The guest's network interface, if it has one: a virtio-net device
    /// over a backend the caller opened.
    pub network: Option<NetSource>,
}

/// A virtio-net device's backend and what the guest is told about it.
pub struct NetSource {
    pub backend: NetBackend,
    pub mac: [u8; 6],
    pub mtu: u16,
}

/// Which thread a [`ThreadStart`] hook runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    EventLoop,
}

/// Runs first on every thread the VM starts, before it touches guest data
/// (the VMM process installs that thread's seccomp filter here). An error
/// ends the VM with that reason.
pub type ThreadStart = Arc<dyn Fn(ThreadKind) -> Result<(), String> + Send + Sync>;

/// Create and start the VM from `sources`; `config`'s paths and `run_dir`
/// are not used (the caller owns the per-VM directory).
pub fn start(
    config: &MachineConfig,
    sources: Sources,
    thread_start: ThreadStart,
) -> Result<KvmMachine, MachineError> {
    build(config, sources, thread_start, None)
}

/// Create a VM from `snapshot` (checked by the caller against `config`'s
/// profile) and start it where the snapshot was taken: guest memory is the
/// snapshot's, mapped copy-on-write; kernel and initramfs are not loaded.
pub fn restore(
    config: &MachineConfig,
    sources: Sources,
    snapshot: Snapshot,
    thread_start: ThreadStart,
) -> Result<KvmMachine, MachineError> {
    build(config, sources, thread_start, Some(snapshot))
}

fn build(
    config: &MachineConfig,
    sources: Sources,
    thread_start: ThreadStart,
    snapshot: Option<Snapshot>,
) -> Result<KvmMachine, MachineError> {
    let created = Instant::now();
    validate(config, sources.network.is_some())?;
    kick::install_handler()?;
    let Sources {
        kvm,
        mut kernel,
        mut initramfs,
        disks,
        console: vmm_end,
        network,
    } = sources;
    if disks.len() != config.disks.len() {
        return Err(MachineError::Config(format!(
            "{} disks configured but {} opened",
            config.disks.len(),
            disks.len()
        )));
    }

    let vm = create_vm(&kvm)?;
    let mem = Arc::new(match &snapshot {
        None => memory::create(config.memory_mib).map_err(|source| MachineError::GuestMemory {
            mib: config.memory_mib,
            source,
        })?,
        Some(s) => snapshot::restored_memory(config, s)?,
    });
    register_memory(&vm, &mem)?;

    let cold = match snapshot {
        None => {
            let kernel = boot::load_kernel_from(&mem, &mut kernel)?;
            let initrd = boot::load_initrd_from(&mem, &mut initramfs, kernel.end)?;
            let cmdline_len = boot::write_cmdline(&mem, &config.cmdline)?;
            Ok((kernel, initrd, cmdline_len))
        }
        Some(s) => Err(s),
    };

    // Devices.
    let serial_log = tail::shared(config.serial_log_limit.max(4096));
    vmm_end
        .set_nonblocking(true)
        .map_err(io_err("console socket"))?;
    let console_end = vmm_end.try_clone().map_err(io_err("console socket"))?;

    let mut devices = BusBuilder::new(&vm, mem.clone());
    let serial = SerialPort::new(devices.irq_line(COM1_IRQ)?, serial_log.clone());
    devices.add_pio(COM1_BASE..COM1_BASE + 8, Arc::new(Mutex::new(serial)));
    let i8042 = Arc::new(Mutex::new(I8042::default()));
    for port in [i8042::DATA_PORT, i8042::COMMAND_PORT] {
        devices.add_pio(port..port + 1, i8042.clone());
    }
    devices.add_virtio(Box::new(Console::new(&config.console_port, vmm_end)))?;
    for (d, file) in config.disks.iter().zip(disks) {
        let b =
            Block::new(file, d.read_only, d.ephemeral, &d.serial).map_err(io_err("disk image"))?;
        devices.add_virtio(Box::new(b))?;
    }
    devices.add_virtio(Box::new(Rng))?;
    if let Some(n) = network {
        let net = Net::new(n.backend, n.mac, n.mtu).map_err(io_err("network backend"))?;
        devices.add_virtio(Box::new(net))?;
    }

    let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("event loop eventfd"))?;
    let (vcpus, bus) = match cold {
        Ok((kernel, initrd, cmdline_len)) => {
            // Boot tables.
            let infos = devices.virtio_infos();
            let rsdp = acpi::write_tables(&mem, config.vcpus, &infos)?;
            boot::write_gdt_idt(&mem, kernel.entry)?;
            match kernel.entry {
                boot::EntryMode::Pvh(_) => boot::write_pvh_info(&mem, Some(initrd), rsdp)?,
                boot::EntryMode::Linux64(_) => {
                    boot::write_page_tables(&mem)?;
                    boot::write_zero_page(
                        &mem,
                        kernel.setup_header,
                        cmdline_len,
                        Some(initrd),
                        rsdp,
                    )?;
                }
            }
            tracing::debug!(entry = ?kernel.entry, initrd = ?initrd, devices = infos.len(), "kernel loaded");
            let vcpus = create_vcpus(&kvm, &vm, config.vcpus, kernel.entry)?;
            let bus = devices.build(wake.try_clone().map_err(io_err("event loop eventfd"))?);
            (vcpus, bus)
        }
        Err(s) => {
            let bus = devices.build(wake.try_clone().map_err(io_err("event loop eventfd"))?);
            let vcpus = snapshot::restore_machine(&vm, &bus, &s, config.vcpus)?;
            (vcpus, bus)
        }
    };
    let bus = Arc::new(bus);
    let pause = Pause::new(
        vcpus.len(),
        snapshot::vcpu::msrs_to_save(&kvm).unwrap_or_default(),
    );
    let (control, exit_rx) = Control::new(wake, console_end, created, pause);
    let control = Arc::new(control);

    let el = EventLoop::new(bus.clone(), control.clone()).map_err(io_err("event loop"))?;
    let (hook, el_control) = (thread_start.clone(), control.clone());
    let event_thread = std::thread::Builder::new()
        .name("kiln-vmm-io".into())
        .spawn(move || match hook(ThreadKind::EventLoop) {
            Ok(()) => el.run(),
            Err(why) => el_control.finish(ExitStatus::Failed(why)),
        })
        .map_err(io_err("event loop thread"))?;
    let mut machine = KvmMachine {
        control: control.clone(),
        vcpu_threads: Vec::new(),
        event_thread: Some(event_thread),
        exit_rx,
        exited: None,
        serial: serial_log,
        memory_bytes: u64::from(config.memory_mib) << 20,
        bus: bus.clone(),
        guest_memory: mem,
        vm,
    };
    spawn_vcpus(&mut machine, vcpus, &bus, &control, &thread_start)?;
    // A restored device may already want host I/O (the event loop
    // registers host descriptors when woken).
    control.wake();
    tracing::debug!(elapsed = ?created.elapsed(), "kvm VM started");
    Ok(machine)
}

/// Open `/dev/kvm`, check what the backend needs, and create the VM with
/// its in-kernel irqchip and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd, MachineError> {
    for cap in crate::host::REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(MachineError::BackendUnavailable {
                backend: "kvm",
                why: format!("/dev/kvm lacks the {cap:?} capability"),
            });
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    vm.set_tss_address(memory::KVM_TSS_ADDR)
        .map_err(kvm_err("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
    Ok(vm)
}

/// Hand guest RAM to the VM, one slot per region.
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MachineError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes
        // owned by `mem`, which outlives the VM: `KvmMachine` holds both
        // and drops the VM fd (after joining every vCPU thread) no later
        // than the memory. Slots do not overlap (distinct regions).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("register guest memory"))?;
    }
    Ok(())
}

/// Create and configure every vCPU before any runs.
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    count: u32,
    entry: boot::EntryMode,
) -> Result<Vec<VcpuFd>, MachineError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("read the supported CPUID"))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    (0..count)
        .map(|id| {
            let v = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            vcpu::configure(&v, id, count, &cpuid, entry, tsc_deadline)
                .map_err(|source| MachineError::Vcpu { id, source })?;
            Ok(v)
        })
        .collect()
}

/// One thread per vCPU; each is joined by `machine` when it stops.
fn spawn_vcpus(
    machine: &mut KvmMachine,
    vcpus: Vec<VcpuFd>,
    bus: &Arc<Bus>,
    control: &Arc<Control>,
    thread_start: &ThreadStart,
) -> Result<(), MachineError> {
    for (id, v) in vcpus.into_iter().enumerate() {
        let (bus, control, hook) = (bus.clone(), control.clone(), thread_start.clone());
        let h = std::thread::Builder::new()
            .name(format!("kiln-vcpu{id}"))
            .spawn(move || match hook(ThreadKind::Vcpu) {
                Ok(()) => vcpu::run(v, id as u32, bus, control),
                Err(why) => control.finish(ExitStatus::Failed(why)),
            })
            .map_err(io_err("vCPU thread"))?;
        machine.vcpu_threads.push(h);
    }
    Ok(())
}
