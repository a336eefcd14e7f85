//! Counters of the VM exits that reach the VMM, by reason, and of the
//! guest's accesses to ports no device answers.
//!
//! Only exits KVM hands to user space are seen here (port I/O, MMIO,
//! shutdown, ...); exits KVM handles itself (CPUID, MSRs, HLT with the
//! in-kernel LAPIC, page faults) show in KVM's own statistics
//! (`/sys/kernel/debug/kvm/<pid>-<fd>/`). Under nested virtualization every
//! exit is expensive, so these counts point at what slows a boot down.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Why a vCPU left `KVM_RUN`, as counted by [`ExitCounters`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum ExitReason {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Shutdown,
    SystemEvent,
    /// `KVM_RUN` returned EINTR/EAGAIN (a kick or a signal).
    Interrupted,
    Other,
}

impl ExitReason {
    pub const ALL: [ExitReason; 9] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Hlt,
        ExitReason::Shutdown,
        ExitReason::SystemEvent,
        ExitReason::Interrupted,
        ExitReason::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitReason::IoIn => "io_in",
            ExitReason::IoOut => "io_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::Hlt => "hlt",
            ExitReason::Shutdown => "shutdown",
            ExitReason::SystemEvent => "system_event",
            ExitReason::Interrupted => "interrupted",
            ExitReason::Other => "other",
        }
    }
}

/// Reads and writes of one port that no device claims.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortAccesses {
    pub reads: u64,
    pub writes: u64,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitStats {
    /// Exits by reason (reasons never seen are absent).
    pub by_reason: BTreeMap<ExitReason, u64>,
    /// Unhandled port accesses by port.
    pub unhandled_ports: BTreeMap<u16, PortAccesses>,
}

impl ExitStats {
    /// Exits that reached the VMM, interrupted `KVM_RUN` calls excluded.
    pub fn total(&self) -> u64 {
        self.by_reason
            .iter()
            .filter(|(r, _)| **r != ExitReason::Interrupted)
            .map(|(_, n)| n)
            .sum()
    }

    /// One line: `io_in=12 io_out=40 ...; unhandled ports 0x70:r0/w3 ...`
    /// (the `max_ports` busiest ports).
    pub fn summary(&self, max_ports: usize) -> String {
        let mut s = self
            .by_reason
            .iter()
            .map(|(r, n)| format!("{}={n}", r.name()))
            .collect::<Vec<_>>()
            .join(" ");
        if !self.unhandled_ports.is_empty() {
            let mut ports: Vec<_> = self.unhandled_ports.iter().collect();
            ports.sort_by_key(|(p, a)| (std::cmp::Reverse(a.reads + a.writes), **p));
            s.push_str("; unhandled ports");
            for (p, a) in ports.iter().take(max_ports) {
                s.push_str(&format!(" {p:#x}:r{}/w{}", a.reads, a.writes));
            }
            if ports.len() > max_ports {
                s.push_str(&format!(" (+{} more)", ports.len() - max_ports));
            }
        }
        s
    }
}

/// Shared by every vCPU thread of one VM.
#[derive(Debug, Default)]
pub struct ExitCounters {
    by_reason: [AtomicU64; ExitReason::ALL.len()],
    /// At most 65,536 entries: bounded by the port space.
    unhandled: Mutex<BTreeMap<u16, PortAccesses>>,
}

impl ExitCounters {
    pub fn count(&self, reason: ExitReason) {
        self.by_reason[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn unhandled_port(&self, port: u16, write: bool) {
        if let Ok(mut m) = self.unhandled.lock() {
            let e = m.entry(port).or_default();
            if write {
                e.writes += 1;
            } else {
                e.reads += 1;
            }
        }
    }

    pub fn snapshot(&self) -> ExitStats {
        let by_reason = ExitReason::ALL
            .iter()
            .map(|r| (*r, self.by_reason[*r as usize].load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let unhandled_ports = self.unhandled.lock().map(|m| m.clone()).unwrap_or_default();
        ExitStats {
            by_reason,
            unhandled_ports,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_reason_and_port_and_summarises_the_busiest() {
        let c = ExitCounters::default();
        for _ in 0..3 {
            c.count(ExitReason::IoIn);
        }
        c.count(ExitReason::MmioWrite);
        c.count(ExitReason::Interrupted);
        c.unhandled_port(0x71, false);
        c.unhandled_port(0x71, false);
        c.unhandled_port(0x70, true);
        c.unhandled_port(0x80, true);
        let s = c.snapshot();
        assert_eq!(s.by_reason.get(&ExitReason::IoIn), Some(&3));
        assert_eq!(s.by_reason.get(&ExitReason::Hlt), None);
        assert_eq!(s.total(), 4, "interrupted KVM_RUN calls are not exits");
        assert_eq!(
            s.unhandled_ports.get(&0x71),
            Some(&PortAccesses {
                reads: 2,
                writes: 0
            })
        );
        let line = s.summary(2);
        assert!(
            line.starts_with("io_in=3 mmio_write=1 interrupted=1"),
            "{line}"
        );
        assert!(
            line.contains("unhandled ports 0x71:r2/w0 0x70:r0/w1 (+1 more)"),
            "{line}"
        );
    }
}
