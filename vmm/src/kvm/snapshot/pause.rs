//! Pausing a running VM: each vCPU thread, kicked out of `KVM_RUN`, sees
//! the request, finishes the exit it was handling, reads its own vCPU's
//! state (only the thread that owns a `VcpuFd` touches it) and waits to be
//! resumed or stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use super::state::VcpuState;
use super::SnapshotError;

/// How long a parked vCPU sleeps between looks at the stop flag.
const PARKED_POLL: Duration = Duration::from_millis(50);

struct Inner {
    requested: bool,
    parked: Vec<bool>,
    states: Vec<Option<Result<VcpuState, String>>>,
}

/// The pause request every vCPU thread looks at between exits.
pub struct Pause {
    requested: AtomicBool,
    inner: Mutex<Inner>,
    cv: Condvar,
    /// The MSRs each vCPU saves (KVM's list, see `vcpu::msrs_to_save`).
    msrs: Vec<u32>,
}

impl Pause {
    pub fn new(vcpus: usize, msrs: Vec<u32>) -> Pause {
        Pause {
            requested: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                requested: false,
                parked: vec![false; vcpus],
                states: (0..vcpus).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
            msrs,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the vCPU threads are asked to park (cheap; checked every exit).
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// On vCPU thread `id`, after a pause was requested: complete the exit
    /// handled last, save the vCPU's state, and wait until resumed or
    /// `stopping()`.
    pub fn park(&self, id: usize, vcpu: &mut VcpuFd, stopping: impl Fn() -> bool) {
        // An MMIO or port read handled last is completed by the next
        // KVM_RUN (the data goes into the guest's register then); with
        // immediate_exit KVM completes it and returns EINTR at once, so the
        // saved registers are the ones the guest will see next.
        vcpu.set_kvm_immediate_exit(1);
        match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => tracing::warn!(id, "pausing vCPU: KVM_RUN: {e}"),
            Ok(exit) => tracing::warn!(id, "pausing vCPU: unexpected exit {exit:?}"),
        }
        vcpu.set_kvm_immediate_exit(0);
        let saved = super::vcpu::save(vcpu, &self.msrs).map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s.push_str(&format!(": {c}"));
                src = c.source();
            }
            s
        });
        let mut g = self.lock();
        if let Some(slot) = g.states.get_mut(id) {
            *slot = Some(saved);
        }
        if let Some(p) = g.parked.get_mut(id) {
            *p = true;
        }
        self.cv.notify_all();
        while g.requested && !stopping() {
            g = self
                .cv
                .wait_timeout(g, PARKED_POLL)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if let Some(p) = g.parked.get_mut(id) {
            *p = false;
        }
    }

    /// Ask every vCPU to park and wait until all have, calling `kick` (a
    /// signal that gets them out of `KVM_RUN`) until then. Returns each
    /// vCPU's state; the vCPUs stay parked until [`Pause::resume`], which
    /// the caller must call whatever this returns.
    pub fn pause(
        &self,
        kick: impl Fn(),
        stopped: impl Fn() -> bool,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, SnapshotError> {
        {
            let mut g = self.lock();
            if g.requested {
                return Err(SnapshotError::Pause("already paused".into()));
            }
            g.requested = true;
            g.states.iter_mut().for_each(|s| *s = None);
        }
        self.requested.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut g = self.lock();
                if g.states.iter().all(|s| s.is_some()) {
                    return g
                        .states
                        .iter_mut()
                        .enumerate()
                        .map(|(id, s)| match s.take() {
                            Some(Ok(s)) => Ok(s),
                            Some(Err(e)) => Err(SnapshotError::Pause(format!("vCPU {id}: {e}"))),
                            None => Err(SnapshotError::Pause(format!("vCPU {id} has no state"))),
                        })
                        .collect();
                }
                if stopped() {
                    return Err(SnapshotError::Pause("the VM stopped".into()));
                }
                if Instant::now() > deadline {
                    let n = g.parked.iter().filter(|p| **p).count();
                    return Err(SnapshotError::Pause(format!(
                        "{n} of {} vCPUs parked within {timeout:?}",
                        g.parked.len()
                    )));
                }
            }
            kick();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Let parked vCPUs run again.
    pub fn resume(&self) {
        let mut g = self.lock();
        g.requested = false;
        self.requested.store(false, Ordering::Release);
        self.cv.notify_all();
    }
}
