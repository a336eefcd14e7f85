//! The embedded KVM backend: one VM in this process, one thread per vCPU
//! plus one event-loop thread for device I/O.
//!
//! - Memory: [`memory`] (RAM below 3 GiB, the rest above 4 GiB).
//! - Boot: [`boot`] (ELF with PVH note, ELF/bzImage with the 64-bit
//!   protocol), [`acpi`] (RSDP, XSDT, FADT, MADT, DSDT).
//! - vCPUs: [`vcpu`] (CPUID, MSRs, registers, LAPIC; the `KVM_RUN` loop).
//! - Devices: 8250 serial (kernel log, bounded), i8042 (reset ends the VM),
//!   virtio-mmio console (the agent's named port), block and rng.
//!
//! Port I/O and MMIO register accesses are handled on the vCPU thread that
//! exits; queue notifications arrive through ioeventfds and are handled by
//! the event loop, which also moves console bytes to and from the host
//! socket. Interrupts are raised through irqfds on the in-kernel IOAPIC.
//!
//! Where `/dev/kvm` is nested PVM (no VT-x/AMD-V), guest code runs by
//! instruction emulation and interrupts cannot be delivered into a
//! protected- or long-mode guest: stock Linux does not boot there, and the
//! backend is verified with the polling test guest in `vmm/testguest`.
//! `start_timeout` is not needed here: start-up is synchronous and takes
//! milliseconds.

pub mod acpi;
pub mod boot;
pub mod devices;
pub mod memory;
pub mod stats;
pub mod vcpu;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use self::acpi::MmioDeviceInfo;
use self::devices::i8042::{I8042Action, I8042};
use self::devices::serial::{SerialPort, COM1_BASE, COM1_IRQ};
use self::devices::virtio::block::Block;
use self::devices::virtio::console::Console;
use self::devices::virtio::mmio::{HostInterest, MmioTransport, MMIO_SIZE, REG_STATUS};
use self::devices::virtio::rng::Rng;
use self::stats::{ExitCounters, ExitStats};
use crate::machine::{ConsoleStream, ExitStatus, MachineConfig, MachineError};
use crate::qemu::{TailBuffer, AGENT_PORT_NAME};

/// Most vCPUs we configure (xAPIC ids fit in a byte; 0xff is broadcast).
pub const MAX_VCPUS: u32 = 254;

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> MachineError {
    move |e| MachineError::Kvm {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> MachineError {
    move |source| MachineError::Io { what, source }
}

/// What vCPU threads and the event loop share.
pub struct Bus {
    serial: Mutex<SerialPort>,
    i8042: Mutex<I8042>,
    mmio: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
    stop: AtomicBool,
    /// Wakes the event loop to re-evaluate host-side interest (a device
    /// changed status) or to stop.
    wake: EventFd,
    exit: tokio::sync::watch::Sender<Option<ExitStatus>>,
    /// The VMM's end of the console socket (a second descriptor of it).
    console: std::os::unix::net::UnixStream,
    created: Instant,
    first_exit: OnceLock<Duration>,
    exits: ExitCounters,
}

impl Bus {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn first_exit(&self) {
        self.first_exit.get_or_init(|| self.created.elapsed());
    }

    /// Record how the VM ended (the first report wins). The VM is over:
    /// every thread is told to stop, and the console is shut down so that
    /// whoever reads it sees the end of the stream, as when QEMU exits.
    fn finish(&self, status: ExitStatus) {
        let first = self.exit.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(status);
                true
            } else {
                false
            }
        });
        if first {
            self.stop.store(true, Ordering::Release);
            let _ = self.wake.write(1);
            let _ = self.console.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Returns true when the guest asked for a reset.
    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                if let (Ok(mut s), Some(&v)) = (self.serial.lock(), data.first()) {
                    s.write((p - COM1_BASE) as u8, v);
                }
            }
            devices::i8042::DATA_PORT | devices::i8042::COMMAND_PORT => {
                if let (Ok(mut k), Some(&v)) = (self.i8042.lock(), data.first()) {
                    if k.write(port, v) == I8042Action::Reset {
                        tracing::debug!("guest reset through the i8042");
                        return true;
                    }
                }
            }
            _ => self.exits.unhandled_port(port, true),
        }
        false
    }

    /// Ports no device claims read as 0, as on Firecracker. Not 0xff (an
    /// empty ISA bus): Linux's CMOS RTC driver reads 0xff as "update in
    /// progress" and polls it thousands of times before giving up.
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0);
        match port {
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                if let (Ok(mut s), Some(b)) = (self.serial.lock(), data.first_mut()) {
                    *b = s.read((p - COM1_BASE) as u8);
                }
            }
            devices::i8042::DATA_PORT | devices::i8042::COMMAND_PORT => {
                if let (Ok(mut k), Some(b)) = (self.i8042.lock(), data.first_mut()) {
                    *b = k.read(port);
                }
            }
            _ => self.exits.unhandled_port(port, false),
        }
    }

    fn find_mmio(&self, addr: u64) -> Option<(u64, &Arc<Mutex<MmioTransport>>)> {
        self.mmio
            .iter()
            .find(|(base, _)| (*base..*base + MMIO_SIZE).contains(&addr))
            .map(|(base, t)| (addr - base, t))
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some((off, t)) = self.find_mmio(addr) {
            if let Ok(mut t) = t.lock() {
                t.read(off, data);
            }
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((off, t)) = self.find_mmio(addr) {
            if let Ok(mut t) = t.lock() {
                t.write(off, data);
            }
            if off == REG_STATUS {
                let _ = self.wake.write(1);
            }
        }
    }
}

/// A VM run by the embedded VMM.
pub struct KvmMachine {
    bus: Arc<Bus>,
    vcpu_threads: Vec<JoinHandle<()>>,
    event_thread: Option<JoinHandle<()>>,
    exit_rx: tokio::sync::watch::Receiver<Option<ExitStatus>>,
    exited: Option<ExitStatus>,
    serial: Arc<Mutex<TailBuffer>>,
    run_dir: PathBuf,
    memory_bytes: u64,
    guest_memory: Arc<GuestMemoryMmap>,
    // Dropped after the threads are joined (see `Drop`).
    _vm: VmFd,
}

/// Removes the per-VM directory if start-up fails half-way.
struct RunDirGuard(Option<PathBuf>);

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), MachineError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| e.errno())
    });
    r.map_err(|errno| MachineError::Kvm {
        what: "install the vCPU kick signal handler",
        source: std::io::Error::from_raw_os_error(errno),
    })
}

fn validate(config: &MachineConfig) -> Result<(), MachineError> {
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
    if config.disks.len() + 2 > memory::VIRTIO_MAX_DEVICES {
        return Err(MachineError::Config(format!(
            "at most {} disks are supported",
            memory::VIRTIO_MAX_DEVICES - 2
        )));
    }
    for d in &config.disks {
        if d.serial.len() > devices::virtio::block::VIRTIO_BLK_ID_BYTES {
            return Err(MachineError::Config(format!(
                "disk serial '{}' must be at most 20 bytes",
                d.serial
            )));
        }
    }
    Ok(())
}

impl KvmMachine {
    /// Create and start the VM. Must run inside a tokio runtime (the console
    /// stream is registered with it).
    pub fn start(config: MachineConfig) -> Result<(KvmMachine, ConsoleStream), MachineError> {
        let created = Instant::now();
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(MachineError::Config(
                "the kvm backend must be started inside a tokio runtime".into(),
            ));
        }
        validate(&config)?;
        std::fs::create_dir(&config.run_dir).map_err(|source| MachineError::RunDir {
            path: config.run_dir.clone(),
            source,
        })?;
        let guard = RunDirGuard(Some(config.run_dir.clone()));
        install_kick_handler()?;

        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
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

        let mem = Arc::new(memory::create(config.memory_mib).map_err(|e| {
            MachineError::Config(format!(
                "cannot map {} MiB of guest memory: {e}",
                config.memory_mib
            ))
        })?);
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

        let kernel = boot::load_kernel(&mem, &config.kernel).map_err(boot_err)?;
        let initrd = boot::load_initrd(&mem, &config.initramfs, kernel.end).map_err(boot_err)?;
        let cmdline_len = boot::write_cmdline(&mem, &config.cmdline).map_err(boot_err)?;

        // Devices.
        let serial_log = Arc::new(Mutex::new(TailBuffer::new(
            config.serial_log_limit.max(4096),
        )));
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("serial irqfd"))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("register the serial irqfd"))?;
        let serial = SerialPort::new(serial_irq, serial_log.clone());

        let (vmm_end, user_end) =
            std::os::unix::net::UnixStream::pair().map_err(io_err("console socket"))?;
        vmm_end
            .set_nonblocking(true)
            .map_err(io_err("console socket"))?;
        let console_end = vmm_end.try_clone().map_err(io_err("console socket"))?;
        let mut models: Vec<Box<dyn devices::virtio::mmio::VirtioDevice>> =
            vec![Box::new(Console::new(AGENT_PORT_NAME, vmm_end))];
        for d in &config.disks {
            let file = OpenOptions::new()
                .read(true)
                .write(!d.read_only)
                .open(&d.path)
                .map_err(|source| MachineError::MissingFile {
                    what: "disk image",
                    path: d.path.clone(),
                    source,
                })?;
            let b = Block::new(file, d.read_only, d.ephemeral, &d.serial)
                .map_err(io_err("disk image"))?;
            models.push(Box::new(b));
        }
        models.push(Box::new(Rng));

        let mut mmio = Vec::new();
        let mut infos = Vec::new();
        for (i, model) in models.into_iter().enumerate() {
            let base = memory::VIRTIO_MMIO_BASE + i as u64 * MMIO_SIZE;
            let gsi = memory::VIRTIO_FIRST_GSI + i as u32;
            let t = MmioTransport::new(model, mem.clone()).map_err(io_err("virtio eventfds"))?;
            for (q, evt) in t.queue_evts.iter().enumerate() {
                let addr = IoEventAddress::Mmio(base + devices::virtio::mmio::REG_QUEUE_NOTIFY);
                vm.register_ioevent(evt, &addr, q as u32)
                    .map_err(kvm_err("register a queue ioeventfd"))?;
            }
            vm.register_irqfd(&t.irq_evt, gsi)
                .map_err(kvm_err("register a virtio irqfd"))?;
            infos.push(MmioDeviceInfo {
                base,
                size: MMIO_SIZE,
                gsi,
            });
            mmio.push((base, Arc::new(Mutex::new(t))));
        }

        // Boot tables.
        let rsdp = acpi::write_tables(&mem, config.vcpus, &infos)
            .map_err(|e| MachineError::Boot(e.to_string()))?;
        boot::write_gdt_idt(&mem, kernel.entry).map_err(boot_err)?;
        match kernel.entry {
            boot::EntryMode::Pvh(_) => {
                boot::write_pvh_info(&mem, Some(initrd), rsdp).map_err(boot_err)?
            }
            boot::EntryMode::Linux64(_) => {
                boot::write_page_tables(&mem).map_err(boot_err)?;
                boot::write_zero_page(&mem, kernel.setup_header, cmdline_len, Some(initrd), rsdp)
                    .map_err(boot_err)?;
            }
        }
        tracing::debug!(entry = ?kernel.entry, initrd = ?initrd, devices = infos.len(), "kernel loaded");

        // vCPUs: all created and configured before any runs.
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read the supported CPUID"))?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let v = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            vcpu::configure(&v, id, config.vcpus, &cpuid, kernel.entry, tsc_deadline)
                .map_err(|e| MachineError::Boot(format!("vCPU {id}: {e}")))?;
            vcpus.push(v);
        }

        let (exit_tx, exit_rx) = tokio::sync::watch::channel(None);
        let bus = Arc::new(Bus {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042::default()),
            mmio,
            stop: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("event loop eventfd"))?,
            exit: exit_tx,
            console: console_end,
            created,
            first_exit: OnceLock::new(),
            exits: ExitCounters::default(),
        });

        let el = EventLoop::new(bus.clone()).map_err(io_err("event loop"))?;
        let event_thread = std::thread::Builder::new()
            .name("kiln-vmm-io".into())
            .spawn(move || el.run())
            .map_err(io_err("event loop thread"))?;
        let mut machine = KvmMachine {
            bus: bus.clone(),
            vcpu_threads: Vec::new(),
            event_thread: Some(event_thread),
            exit_rx,
            exited: None,
            serial: serial_log,
            run_dir: config.run_dir.clone(),
            memory_bytes: u64::from(config.memory_mib) << 20,
            guest_memory: mem,
            _vm: vm,
        };
        for (id, v) in vcpus.into_iter().enumerate() {
            let bus = bus.clone();
            let h = std::thread::Builder::new()
                .name(format!("kiln-vcpu{id}"))
                .spawn(move || vcpu::run(v, id as u32, bus))
                .map_err(io_err("vCPU thread"))?;
            machine.vcpu_threads.push(h);
        }
        std::mem::forget(guard); // `machine` owns the directory now

        user_end
            .set_nonblocking(true)
            .map_err(io_err("console socket"))?;
        let console = ConsoleStream::from_std(user_end).map_err(io_err("console socket"))?;
        tracing::debug!(elapsed = ?created.elapsed(), "kvm VM started");
        Ok((machine, console))
    }

    pub fn describe(&self) -> String {
        "kvm".to_string()
    }

    /// The VM runs inside this process.
    pub fn pid(&self) -> Option<u32> {
        Some(std::process::id())
    }

    pub fn serial_log(&self) -> Vec<u8> {
        self.serial.lock().map(|b| b.contents()).unwrap_or_default()
    }

    /// Time from `start` to the guest's first port-I/O or MMIO exit.
    pub fn first_exit(&self) -> Option<Duration> {
        self.bus.first_exit.get().copied()
    }

    /// VM exits that reached the VMM so far, by reason, and the guest's
    /// accesses to ports no device claims.
    pub fn exit_stats(&self) -> ExitStats {
        self.bus.exits.snapshot()
    }

    /// Notified on every byte the guest writes to its serial console (the
    /// value counts them); wait on it instead of polling [`Self::serial_log`].
    pub fn serial_updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.serial
            .lock()
            .map(|b| b.subscribe())
            .unwrap_or_else(|_| tokio::sync::watch::channel(0).1)
    }

    /// Guest RAM size in bytes, and how much of it is resident in the host.
    pub fn guest_memory_resident(&self) -> (u64, u64) {
        let mut resident = 0u64;
        for r in self.guest_memory.iter() {
            let len = r.len() as usize;
            let pages = len.div_ceil(4096);
            let mut vec = vec![0u8; pages];
            // SAFETY: the range is a live mapping owned by `guest_memory`,
            // page-aligned (mmap), and `vec` has one byte per page.
            let rc = unsafe { libc::mincore(r.as_ptr().cast(), len, vec.as_mut_ptr()) };
            if rc == 0 {
                resident += vec.iter().filter(|&&b| b & 1 == 1).count() as u64 * 4096;
            }
        }
        (self.memory_bytes, resident)
    }

    pub async fn wait(&mut self) -> ExitStatus {
        if let Some(s) = &self.exited {
            return s.clone();
        }
        let status = match self.exit_rx.wait_for(|s| s.is_some()).await {
            Ok(s) => s.clone().unwrap_or(ExitStatus::Killed),
            Err(_) => ExitStatus::Failed("the VMM's exit channel closed".into()),
        };
        self.exited = Some(status.clone());
        status
    }

    /// Stop every thread: vCPUs are kicked out of `KVM_RUN` with a signal
    /// until they notice the stop flag.
    fn stop(&mut self) {
        let running = !self.vcpu_threads.is_empty();
        self.bus.stop.store(true, Ordering::Release);
        self.bus.finish(ExitStatus::Killed);
        let _ = self.bus.wake.write(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        for h in self.vcpu_threads.drain(..) {
            while !h.is_finished() && Instant::now() < deadline {
                // SAFETY: the thread has not been joined, so its pthread_t
                // is valid; the signal's handler is a no-op installed before
                // any vCPU thread started.
                unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
                std::thread::sleep(Duration::from_millis(1));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                tracing::error!("a vCPU thread did not stop; leaking it");
            }
        }
        if let Some(h) = self.event_thread.take() {
            let _ = h.join();
        }
        if self.exited.is_none() {
            self.exited = self.exit_rx.borrow().clone();
        }
        if running {
            tracing::debug!(exits = %self.bus.exits.snapshot().summary(16), "kvm VM stopped");
        }
    }

    pub async fn destroy(mut self) -> Result<(), MachineError> {
        self.stop();
        let dir = std::mem::take(&mut self.run_dir);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(MachineError::Io {
                what: "per-VM directory",
                source,
            }),
        }
    }
}

impl Drop for KvmMachine {
    fn drop(&mut self) {
        self.stop();
        if !self.run_dir.as_os_str().is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&self.run_dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("could not remove {}: {e}", self.run_dir.display());
                }
            }
        }
    }
}

fn boot_err(e: boot::BootError) -> MachineError {
    match e {
        boot::BootError::Open { what, path, source } => MachineError::MissingFile {
            what,
            path: path.into(),
            source,
        },
        other => MachineError::Boot(other.to_string()),
    }
}

#[derive(Debug, Clone, Copy)]
enum Token {
    Wake,
    Notify(usize, usize),
    Host(usize),
}

/// The device event loop: queue notifications and host-side sockets.
struct EventLoop {
    bus: Arc<Bus>,
    epoll: Epoll,
    tokens: Vec<Token>,
    /// Per device: the host interest currently registered.
    host: Vec<Option<HostInterest>>,
}

impl EventLoop {
    fn new(bus: Arc<Bus>) -> std::io::Result<EventLoop> {
        let epoll = Epoll::new()?;
        let mut tokens = vec![Token::Wake];
        epoll.ctl(
            ControlOperation::Add,
            bus.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        for (d, (_, t)) in bus.mmio.iter().enumerate() {
            let t = t
                .lock()
                .map_err(|_| std::io::Error::other("device lock poisoned"))?;
            for (q, evt) in t.queue_evts.iter().enumerate() {
                let token = tokens.len() as u64;
                tokens.push(Token::Notify(d, q));
                epoll.ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )?;
            }
        }
        let host = vec![None; bus.mmio.len()];
        Ok(EventLoop {
            bus,
            epoll,
            tokens,
            host,
        })
    }

    fn host_token(&mut self, d: usize) -> u64 {
        if let Some(i) = self
            .tokens
            .iter()
            .position(|t| matches!(t, Token::Host(x) if *x == d))
        {
            return i as u64;
        }
        self.tokens.push(Token::Host(d));
        (self.tokens.len() - 1) as u64
    }

    /// Register, change or drop a device's host-side descriptor in epoll.
    fn update_host(&mut self, d: usize) {
        let (fd, want) = {
            let Ok(t) = self.bus.mmio[d].1.lock() else {
                return;
            };
            match t.host_fd() {
                Some(fd) => (fd, t.host_interest()),
                None => return,
            }
        };
        let want = (want.read || want.write).then_some(want);
        if want == self.host[d] {
            return;
        }
        let token = self.host_token(d);
        let events = |i: HostInterest| {
            let mut e = EventSet::empty();
            if i.read {
                e |= EventSet::IN;
            }
            if i.write {
                e |= EventSet::OUT;
            }
            EpollEvent::new(e, token)
        };
        let r = match (self.host[d], want) {
            (None, Some(w)) => self.epoll.ctl(ControlOperation::Add, fd, events(w)),
            (Some(_), Some(w)) => self.epoll.ctl(ControlOperation::Modify, fd, events(w)),
            (Some(_), None) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (None, None) => Ok(()),
        };
        match r {
            Ok(()) => self.host[d] = want,
            Err(e) => tracing::warn!("event loop: epoll update failed: {e}"),
        }
    }

    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("event loop: epoll_wait failed: {e}");
                    self.bus
                        .finish(ExitStatus::Failed(format!("VMM event loop failed: {e}")));
                    return;
                }
            };
            for ev in &events[..n] {
                let Some(&token) = self.tokens.get(ev.data() as usize) else {
                    continue;
                };
                match token {
                    Token::Wake => {
                        let _ = self.bus.wake.read();
                        if self.bus.stopping() {
                            return;
                        }
                        for d in 0..self.bus.mmio.len() {
                            self.update_host(d);
                        }
                    }
                    Token::Notify(d, q) => {
                        if let Ok(mut t) = self.bus.mmio[d].1.lock() {
                            let _ = t.queue_evts[q].read();
                            t.process_queue(q);
                        }
                        self.update_host(d);
                    }
                    Token::Host(d) => {
                        if let Ok(mut t) = self.bus.mmio[d].1.lock() {
                            t.host_ready();
                        }
                        self.update_host(d);
                    }
                }
            }
        }
    }
}
