//! The device event loop, one thread per VM: queue notifications (the
//! ioeventfds KVM signals when the guest writes `QueueNotify`) and the
//! devices' host-side descriptors (e.g. the console socket), in one epoll.
//! Register accesses are not handled here: they run on the vCPU thread that
//! exits.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::bus::Bus;
use super::control::Control;
use super::devices::virtio::mmio::HostInterest;
use crate::machine::ExitStatus;

/// How long a stopped VM's devices may take to hand the host what they
/// still hold for it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
enum Token {
    Wake,
    /// Device `d`'s queue `q` was notified.
    Notify(usize, usize),
    /// Device `d`'s host-side descriptor is ready.
    Host(usize),
}

pub struct EventLoop {
    bus: Arc<Bus>,
    control: Arc<Control>,
    epoll: Epoll,
    tokens: Vec<Token>,
    /// Per device: the host interest currently registered.
    host: Vec<Option<HostInterest>>,
}

impl EventLoop {
    /// Watch the wake-up eventfd and every queue of every virtio device.
    pub fn new(bus: Arc<Bus>, control: Arc<Control>) -> std::io::Result<EventLoop> {
        let epoll = Epoll::new()?;
        let mut tokens = vec![Token::Wake];
        epoll.ctl(
            ControlOperation::Add,
            control.wake_fd().as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        for (d, slot) in bus.virtio_devices().iter().enumerate() {
            let t = slot
                .transport
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
        let host = vec![None; bus.virtio_devices().len()];
        Ok(EventLoop {
            bus,
            control,
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
            let Ok(t) = self.bus.virtio_devices()[d].transport.lock() else {
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

    /// The VM is over: hand the host what the devices still hold for it
    /// (the guest's last console line: a guest that writes it and resets at
    /// once has it taken from its queue, but not yet written to a socket
    /// that was full), for at most [`DRAIN_TIMEOUT`]. No queue is processed
    /// any more.
    fn drain_host_output(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let mut pending = false;
            for d in 0..self.host.len() {
                self.update_host(d);
                pending |= self.host[d].is_some_and(|i| i.write);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !pending || left.is_zero() {
                return;
            }
            let ms = left.as_millis().clamp(1, 1000) as i32;
            let n = match self.epoll.wait(ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for ev in &events[..n] {
                match self.tokens.get(ev.data() as usize).copied() {
                    Some(Token::Host(d)) => {
                        if let Ok(mut t) = self.bus.virtio_devices()[d].transport.lock() {
                            t.host_ready();
                        }
                    }
                    Some(Token::Wake) => {
                        let _ = self.control.wake_fd().read();
                    }
                    Some(Token::Notify(d, q)) => {
                        if let Ok(t) = self.bus.virtio_devices()[d].transport.lock() {
                            let _ = t.queue_evts[q].read();
                        }
                    }
                    None => {}
                }
            }
        }
    }

    /// Run until the VM stops (or epoll fails, which ends the VM).
    pub fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("event loop: epoll_wait failed: {e}");
                    self.control
                        .finish(ExitStatus::Failed(format!("VMM event loop failed: {e}")));
                    self.control.close_console();
                    return;
                }
            };
            for ev in &events[..n] {
                let Some(&token) = self.tokens.get(ev.data() as usize) else {
                    continue;
                };
                match token {
                    Token::Wake => {
                        let _ = self.control.wake_fd().read();
                        if self.control.stopping() {
                            self.drain_host_output();
                            self.control.close_console();
                            return;
                        }
                        for d in 0..self.host.len() {
                            self.update_host(d);
                        }
                    }
                    Token::Notify(d, q) => {
                        if let Ok(mut t) = self.bus.virtio_devices()[d].transport.lock() {
                            let _ = t.queue_evts[q].read();
                            t.process_queue(q);
                        }
                        self.update_host(d);
                    }
                    Token::Host(d) => {
                        if let Ok(mut t) = self.bus.virtio_devices()[d].transport.lock() {
                            t.host_ready();
                        }
                        self.update_host(d);
                    }
                }
            }
        }
    }
}
