//! The 8250 UART at COM1 (0x3f8, IRQ 4), from vm-superio. Output goes into a
//! bounded tail buffer: the per-VM debug log, never the job log.

use std::io::Write;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm::bus::{PioAction, PioDevice};
use crate::kvm::snapshot::state::SerialStateDef;
use crate::tail::SharedTail;
use vm_superio::serial::SerialState;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
pub struct SerialOut(pub SharedTail);

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut b) = self.0.lock() {
            b.push(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct SerialPort {
    uart: Serial<IrqTrigger, NoEvents, SerialOut>,
}

impl SerialPort {
    pub fn new(irq: EventFd, log: SharedTail) -> SerialPort {
        SerialPort {
            uart: Serial::new(IrqTrigger(irq), SerialOut(log)),
        }
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!("serial: {e:?}");
        }
    }
}

/// Snapshots (`kvm::snapshot`): the UART's registers and receive FIFO.
impl SerialPort {
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    pub fn set_state(&mut self, state: &SerialState) -> Result<(), String> {
        let irq = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("serial irqfd: {e}"))?;
        let out = SerialOut(self.uart.writer().0.clone());
        // Refuses a receive FIFO longer than the UART's.
        self.uart = Serial::from_state(state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(())
    }
}

/// COM1's eight registers, from `COM1_BASE`.
impl PioDevice for SerialPort {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.read(port.wrapping_sub(COM1_BASE) as u8);
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) -> PioAction {
        if let Some(&v) = data.first() {
            self.write(port.wrapping_sub(COM1_BASE) as u8, v);
        }
        PioAction::None
    }

    fn save_state(&self) -> Option<serde_json::Value> {
        SerialStateDef::serialize(&self.state(), serde_json::value::Serializer).ok()
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s = SerialStateDef::deserialize(state).map_err(|e| e.to_string())?;
        self.set_state(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lands_in_the_bounded_log() {
        let log = crate::tail::shared(4);
        let mut s = SerialPort::new(EventFd::new(0).unwrap(), log.clone());
        for b in b"hello" {
            s.write(0, *b);
        }
        // Line status: transmitter empty.
        assert_ne!(s.read(5) & 0x20, 0);
        let c = log.lock().unwrap().contents();
        assert!(c.ends_with(b"ello"), "{c:?}");
    }
}
