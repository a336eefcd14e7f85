//! The agent's end of the protocol: the virtio-console port named
//! [`AGENT_PORT_NAME`], framed with `kiln_agent::proto`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use kiln_agent::proto::{Decoder, Frame, Log, AGENT_PORT_NAME};

use super::boot::{find_device, wait_for};
use super::error::{Error, Result};
use super::sys::kmsg;
use super::DEVICE_WAIT;

/// The open port and the frames received on it so far.
pub struct Port {
    file: File,
    decoder: Decoder,
}

impl Port {
    /// Wait for the port to appear (its module may still be probing), then
    /// open it.
    pub fn open() -> Result<Port> {
        let path = wait_for(DEVICE_WAIT, "the agent's virtio-console port", || {
            find_device("/sys/class/virtio-ports", "name", AGENT_PORT_NAME)
        })?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::OpenPort { path, source: e })?;
        Ok(Port {
            file,
            decoder: Decoder::new(),
        })
    }

    pub fn send(&mut self, frame: &Frame) -> Result<()> {
        let bytes = frame.to_bytes().map_err(Error::Encode)?;
        self.file.write_all(&bytes).map_err(Error::PortWrite)
    }

    /// A diagnostic for the host's debug log and the kernel log.
    pub fn log(&mut self, message: &str) {
        kmsg(message);
        let _ = self.send(&Frame::Log(Log {
            message: message.into(),
        }));
    }

    /// Block until one whole frame has arrived.
    pub fn read_frame(&mut self) -> Result<Frame> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(f) = self.next_frame()? {
                return Ok(f);
            }
            let n = self.file.read(&mut buf).map_err(Error::PortRead)?;
            if n == 0 {
                // The host side is not connected (yet); virtio-console reads 0.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            self.decoder.push(&buf[..n]);
        }
    }

    /// One read of what the host sent (the caller polled the port), into
    /// the decoder. Whether any bytes came.
    pub fn receive(&mut self, buf: &mut [u8]) -> bool {
        match self.file.read(buf) {
            Ok(n) if n > 0 => {
                self.decoder.push(&buf[..n]);
                true
            }
            _ => false,
        }
    }

    /// The next complete frame received, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        self.decoder.next_frame().map_err(Error::FromHost)
    }
}

impl AsFd for Port {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
