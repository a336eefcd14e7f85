//! Just enough of the i8042 keyboard controller for Linux's `reboot=k`: the
//! guest writes 0xFE (pulse reset line) to port 0x64 and the VM ends.
//! Ports: 0x60 data, 0x64 status/command.

use crate::kvm::bus::{PioAction, PioDevice};

pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_RESET_CPU: u8 = 0xfe;
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;

#[derive(Debug, Default)]
pub struct I8042 {
    output: Option<u8>,
    ctr: u8,
    expect_ctr: bool,
}

impl I8042 {
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            DATA_PORT => self.output.take().unwrap_or(0),
            COMMAND_PORT => {
                STATUS_SYSTEM
                    | if self.output.is_some() {
                        STATUS_OUTPUT_FULL
                    } else {
                        0
                    }
            }
            _ => 0xff,
        }
    }

    pub fn write(&mut self, port: u16, value: u8) -> PioAction {
        match (port, value) {
            (COMMAND_PORT, CMD_RESET_CPU) => return PioAction::Reset,
            (COMMAND_PORT, CMD_READ_CTR) => self.output = Some(self.ctr),
            (COMMAND_PORT, CMD_WRITE_CTR) => self.expect_ctr = true,
            (COMMAND_PORT, CMD_SELF_TEST) => self.output = Some(0x55),
            (DATA_PORT, v) if self.expect_ctr => {
                self.ctr = v;
                self.expect_ctr = false;
            }
            _ => {}
        }
        PioAction::None
    }
}

/// Ports `DATA_PORT` and `COMMAND_PORT` (two one-port ranges).
impl PioDevice for I8042 {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.read(port);
        }
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) -> PioAction {
        match data.first() {
            Some(&v) => self.write(port, v),
            None => PioAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm_and_ctr_round_trips() {
        let mut k = I8042::default();
        assert_eq!(k.read(COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(k.write(COMMAND_PORT, CMD_WRITE_CTR), PioAction::None);
        k.write(DATA_PORT, 0x47);
        k.write(COMMAND_PORT, CMD_READ_CTR);
        assert_ne!(k.read(COMMAND_PORT) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(k.read(DATA_PORT), 0x47);
        assert_eq!(k.write(COMMAND_PORT, 0xfe), PioAction::Reset);
    }
}
