//! The 8250 UART at COM1 (0x3f8, IRQ 4), from vm-superio. Output goes into a
//! bounded tail buffer: the per-VM debug log, never the job log.

use std::io::Write;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm::bus::{PioAction, PioDevice};
use crate::tail::SharedTail;

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
