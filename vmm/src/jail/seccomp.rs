//! The seccomp filters of a VMM process, one allow-list per thread kind,
//! built with `seccompiler` and installed by each thread for itself once
//! set-up is done and before the guest runs: vCPU threads before their first
//! `KVM_RUN`, the device event loop before its first `epoll_wait`, the main
//! thread after the runtime that reports to kiln is built.
//!
//! A syscall off the list raises SIGSYS (`SECCOMP_RET_TRAP`); the handler
//! writes the syscall number to kiln as the last frame on the control
//! socket ([`crate::process::proto::FromVmm::Violation`]) and exits the whole
//! process with [`VIOLATION_EXIT`]. kiln reports the VM failed, naming the
//! syscall. The handler can only be replaced through `rt_sigaction`, which
//! no list allows.
//!
//! One exception: `open`/`openat` fail with `EACCES` instead (the handler
//! sets the return value and resumes the thread) and are reported as
//! [`crate::process::proto::FromVmm::Refused`] with the path and the thread.
//! Nothing can be opened inside the jail anyway, and the C library opens
//! files on its own in rare paths (it falls back when that fails), which
//! must not kill a running job.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit status of a VMM process its filter stopped.
pub const VIOLATION_EXIT: i32 = 128 + libc::SIGSYS;

/// Which allow-list a thread gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Vcpu,
    EventLoop,
    Main,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the filter failed: {0}")]
    Build(String),
    #[error("installing the filter failed: {0}")]
    Apply(String),
}

/// Syscalls every thread makes: locks, memory, signals, time, logging to
/// stderr, exiting.
const COMMON: &[i64] = &[
    libc::SYS_futex,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    // The thread that sees the VM end (a vCPU on the guest's reset) shuts
    // the console socket down.
    libc::SYS_shutdown,
];

/// vCPU threads: `KVM_RUN` (and nothing else through ioctl), eventfd
/// writes (irqfds), the serial tail.
const VCPU: &[i64] = &[];

/// Threads that wait in epoll and move bytes through sockets (the event
/// loop: the console; the main thread: the control socket).
const SOCKETS: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_readv,
];

/// The device event loop, besides [`SOCKETS`]: disk I/O, the rng.
const EVENT_LOOP: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_getrandom,
];

/// The main thread, besides [`SOCKETS`]: the residency count at the end
/// (stopping and joining the other threads needs only [`COMMON`]).
const MAIN: &[i64] = &[libc::SYS_mincore];

/// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;

/// `_IOR(KVMIO, nr, T)` (`_IOWR` with `write`), as kvm-ioctls defines them.
const fn kvm_ioctl<T>(nr: u64, write: bool) -> u64 {
    let dir = if write { 3 } else { 2 };
    (dir << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xae << 8) | nr
}

/// What a vCPU thread reads of its vCPU when the VM is paused for a
/// snapshot (`kvm::snapshot::vcpu::save`), on VMs that may be snapshotted.
const SNAPSHOT_VCPU_IOCTLS: &[u64] = {
    use kvm_bindings::*;
    &[
        kvm_ioctl::<kvm_mp_state>(0x98, false),
        kvm_ioctl::<kvm_regs>(0x81, false),
        kvm_ioctl::<kvm_sregs>(0x83, false),
        kvm_ioctl::<kvm_xsave>(0xa4, false),
        kvm_ioctl::<kvm_xcrs>(0xa6, false),
        kvm_ioctl::<kvm_debugregs>(0xa1, false),
        kvm_ioctl::<kvm_lapic_state>(0x8e, false),
        kvm_ioctl::<kvm_cpuid2>(0x91, true),
        kvm_ioctl::<kvm_msrs>(0x88, true),
        kvm_ioctl::<kvm_vcpu_events>(0x9f, false),
    ]
};

/// What the main thread reads of the VM for a snapshot
/// (`kvm::snapshot::vm::save`).
const SNAPSHOT_VM_IOCTLS: &[u64] = {
    use kvm_bindings::*;
    &[
        kvm_ioctl::<kvm_irqchip>(0x62, true),
        kvm_ioctl::<kvm_pit_state2>(0x9f, false),
        kvm_ioctl::<kvm_clock_data>(0x7c, false),
    ]
};

/// The main thread writes the snapshot file.
const SNAPSHOT_MAIN: &[i64] = &[libc::SYS_pwrite64, libc::SYS_ftruncate];

/// The three compiled filters.
pub struct Filters {
    vcpu: BpfProgram,
    event_loop: BpfProgram,
    main: BpfProgram,
}

fn compile(lists: &[&[i64]], kind: Kind, snapshots: bool) -> Result<BpfProgram, SeccompError> {
    let b = |e: seccompiler::BackendError| SeccompError::Build(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in COMMON.iter().chain(lists.iter().copied().flatten()) {
        rules.insert(nr, Vec::new());
    }
    // Rust's standard library checks a descriptor is open before it closes
    // it (`fcntl(fd, F_GETFD)`); nothing else of fcntl is needed.
    let getfd = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::F_GETFD as u64,
    )
    .map_err(b)?;
    rules.insert(
        libc::SYS_fcntl,
        vec![SeccompRule::new(vec![getfd]).map_err(b)?],
    );
    let ioctls: Vec<u64> = match (kind, snapshots) {
        (Kind::Vcpu, false) => vec![KVM_RUN],
        (Kind::Vcpu, true) => [&[KVM_RUN][..], SNAPSHOT_VCPU_IOCTLS].concat(),
        (Kind::Main, true) => SNAPSHOT_VM_IOCTLS.to_vec(),
        _ => Vec::new(),
    };
    if !ioctls.is_empty() {
        let rules_for = ioctls
            .iter()
            .map(|&nr| {
                let c = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, nr)
                    .map_err(b)?;
                SeccompRule::new(vec![c]).map_err(b)
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, rules_for);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(b)?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Build(e.to_string()))
}

impl Filters {
    pub fn build() -> Result<Filters, SeccompError> {
        Filters::build_for(false)
    }

    /// `snapshots`: the VM may be snapshotted (kiln sent `snapshot_out`),
    /// so vCPU threads may read their vCPU's state and the main thread the
    /// VM's, and write the snapshot file.
    pub fn build_for(snapshots: bool) -> Result<Filters, SeccompError> {
        let main_extra: &[i64] = if snapshots { SNAPSHOT_MAIN } else { &[] };
        Ok(Filters {
            vcpu: compile(&[VCPU], Kind::Vcpu, snapshots)?,
            event_loop: compile(&[SOCKETS, EVENT_LOOP], Kind::EventLoop, snapshots)?,
            main: compile(&[SOCKETS, MAIN, main_extra], Kind::Main, snapshots)?,
        })
    }

    /// Install `kind`'s filter on the calling thread (it needs
    /// `no_new_privs`, which the jail sets, or CAP_SYS_ADMIN).
    pub fn apply(&self, kind: Kind) -> Result<(), SeccompError> {
        let prog = match kind {
            Kind::Vcpu => &self.vcpu,
            Kind::EventLoop => &self.event_loop,
            Kind::Main => &self.main,
        };
        seccompiler::apply_filter(prog).map_err(|e| SeccompError::Apply(e.to_string()))?;
        THREAD_KIND.with(|k| {
            k.set(match kind {
                Kind::Vcpu => 1,
                Kind::EventLoop => 2,
                Kind::Main => 3,
            })
        });
        Ok(())
    }
}

thread_local! {
    /// The calling thread's [`Kind`] (1 + its index; 0 before its filter),
    /// for the SIGSYS handler: a const-initialised plain value, safe to
    /// read in a signal handler.
    static THREAD_KIND: Cell<u8> = const { Cell::new(0) };
}

/// Thread names as reports give them, by `THREAD_KIND`.
const THREAD_NAMES: [&[u8]; 4] = [b"set-up", b"vcpu", b"event-loop", b"main"];

/// Where the SIGSYS handler reports (the control socket).
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// Offset of `si_syscall` in x86_64's `siginfo_t` (after si_signo, si_errno,
/// si_code, padding and `_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

/// A JSON frame built without allocating (the SIGSYS handler's).
struct Frame {
    buf: [u8; 256],
    len: usize,
}

impl Frame {
    fn new() -> Frame {
        Frame {
            buf: [0; 256],
            len: 4,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn number(&mut self, v: i64) {
        if v < 0 {
            self.push(b"-");
        }
        let mut n = v.unsigned_abs();
        let mut digits = [0u8; 20];
        let mut d = 0;
        loop {
            digits[d] = b'0' + (n % 10) as u8;
            d += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for i in (0..d).rev() {
            self.push(&[digits[i]]);
        }
    }

    /// A JSON string of printable ASCII (anything else becomes `?`).
    fn string(&mut self, bytes: &[u8]) {
        self.push(b"\"");
        for &b in bytes {
            let b = if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
                b
            } else {
                b'?'
            };
            self.push(&[b]);
        }
        self.push(b"\"");
    }

    /// Fill in the length prefix; the frame's bytes.
    fn finish(&mut self) -> &[u8] {
        let body = (self.len - 4) as u32;
        self.buf[..4].copy_from_slice(&body.to_le_bytes());
        &self.buf[..self.len]
    }
}

/// Copy the NUL-terminated string at `p` (at most `out.len()` bytes).
///
/// # Safety
/// `p` must be null or point to readable memory up to its NUL or
/// `out.len()` bytes, whichever comes first.
unsafe fn c_string(p: *const u8, out: &mut [u8]) -> usize {
    if p.is_null() {
        return 0;
    }
    let mut n = 0;
    while n < out.len() {
        // SAFETY: the caller guarantees `p + n` is readable up to the NUL.
        let b = unsafe { p.add(n).read() };
        if b == 0 {
            break;
        }
        out[n] = b;
        n += 1;
    }
    n
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS with
    // SA_SIGINFO; si_syscall is an int at this offset on x86_64.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let nr = i64::from(nr);
    let thread = THREAD_KIND.with(Cell::get) as usize;
    let thread = THREAD_NAMES[thread.min(THREAD_NAMES.len() - 1)];
    let fd = REPORT_FD.load(Ordering::Relaxed);
    // A frame by hand: no allocation, no locks (async-signal-safe).
    let mut frame = Frame::new();
    let ctx = ctx.cast::<libc::ucontext_t>();
    if (nr == libc::SYS_open || nr == libc::SYS_openat) && !ctx.is_null() {
        // SAFETY: with SA_SIGINFO the third argument is the interrupted
        // thread's ucontext_t, ours to read and change until we return.
        let gregs = unsafe { &mut (*ctx).uc_mcontext.gregs };
        // open(path, ...) has the path in rdi; openat(dirfd, path, ...) in rsi.
        let arg = if nr == libc::SYS_open {
            libc::REG_RDI
        } else {
            libc::REG_RSI
        };
        let mut path = [0u8; 128];
        // SAFETY: the path argument of the refused call: a string the
        // thread passed to the kernel, in this process's memory.
        let n = unsafe { c_string(gregs[arg as usize] as *const u8, &mut path) };
        frame.push(b"{\"Refused\":{\"nr\":");
        frame.number(nr);
        frame.push(b",\"thread\":");
        frame.string(thread);
        frame.push(b",\"path\":");
        frame.string(&path[..n]);
        frame.push(b"}}");
        // The call fails with EACCES when the thread resumes.
        gregs[libc::REG_RAX as usize] = -i64::from(libc::EACCES);
        let bytes = frame.finish();
        if fd >= 0 {
            // SAFETY: write(2) is async-signal-safe and allowed by every
            // filter; `bytes` is valid for its length.
            unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        }
        return;
    }
    frame.push(b"{\"Violation\":");
    frame.number(nr);
    frame.push(b"}");
    let bytes = frame.finish();
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed by
    // every filter; `bytes` is valid for its length.
    unsafe {
        if fd >= 0 {
            libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        }
        libc::_exit(VIOLATION_EXIT);
    }
}

/// Install the SIGSYS handler that reports a violation on `fd`.
pub fn install_sigsys_reporter(fd: i32) -> Result<(), SeccompError> {
    REPORT_FD.store(fd, Ordering::Relaxed);
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(|e| SeccompError::Apply(format!("SIGSYS handler: {e}")))
}

/// Test hook: an `openat` (refused with EACCES, reported, survived).
pub fn make_refused_open() -> std::io::Result<std::fs::File> {
    std::fs::File::open("/etc/kiln-test-hook")
}

/// Test hook: a syscall no filter allows (`ptrace(PTRACE_TRACEME)`).
pub fn make_forbidden_syscall() {
    // SAFETY: PTRACE_TRACEME takes no pointers; under the filter it never
    // runs (SIGSYS); without one it merely marks us traceable by kiln.
    unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
}

/// `name (number)` for the syscalls a VMM is likely to be caught making,
/// else the number alone.
pub fn syscall_name(nr: i64) -> String {
    let known: &[(i64, &str)] = &[
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_open, "open"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_execveat, "execveat"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_clone3, "clone3"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_vfork, "vfork"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_rt_sigaction, "rt_sigaction"),
        (libc::SYS_prctl, "prctl"),
        (libc::SYS_bpf, "bpf"),
        (libc::SYS_unshare, "unshare"),
        (libc::SYS_setns, "setns"),
        (libc::SYS_statx, "statx"),
        (libc::SYS_newfstatat, "newfstatat"),
        (libc::SYS_fstat, "fstat"),
        (libc::SYS_readlink, "readlink"),
        (libc::SYS_getrandom, "getrandom"),
        (libc::SYS_eventfd2, "eventfd2"),
        (libc::SYS_epoll_create1, "epoll_create1"),
        (libc::SYS_fcntl, "fcntl"),
        (libc::SYS_sched_getaffinity, "sched_getaffinity"),
        (libc::SYS_poll, "poll"),
        (libc::SYS_shutdown, "shutdown"),
        (libc::SYS_ppoll, "ppoll"),
    ];
    match known.iter().find(|(n, _)| *n == nr) {
        Some((_, name)) => format!("{name} ({nr})"),
        None => format!("number {nr} (x86_64)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_name_syscalls() {
        Filters::build().unwrap();
        assert_eq!(syscall_name(libc::SYS_ptrace), "ptrace (101)");
        assert!(syscall_name(9999).contains("9999"));
    }

    #[test]
    fn handler_frames_decode_as_reports() {
        use crate::process::proto::{decode, FromVmm};
        let mut f = Frame::new();
        f.push(b"{\"Refused\":{\"nr\":");
        f.number(257);
        f.push(b",\"thread\":");
        f.string(b"vcpu");
        f.push(b",\"path\":");
        f.string(b"/sys/\"x\"\\\n");
        f.push(b"}}");
        let bytes = f.finish().to_vec();
        assert_eq!(
            u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len() - 4
        );
        match decode::<FromVmm>(&bytes[4..]).unwrap() {
            FromVmm::Refused { nr, thread, path } => {
                assert_eq!(
                    (nr, thread.as_str(), path.as_str()),
                    (257, "vcpu", "/sys/?x???")
                );
            }
            other => panic!("{other:?}"),
        }
        let mut f = Frame::new();
        f.push(b"{\"Violation\":");
        f.number(-3);
        f.push(b"}");
        let bytes = f.finish().to_vec();
        assert!(matches!(
            decode::<FromVmm>(&bytes[4..]).unwrap(),
            FromVmm::Violation(-3)
        ));
        // A long string is cut at the frame's end, never past it.
        let mut f = Frame::new();
        f.string(&[b'a'; 1000]);
        assert_eq!(f.finish().len(), 256);
    }
}
