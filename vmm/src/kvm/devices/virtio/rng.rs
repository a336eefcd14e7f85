//! virtio-rng (entropy device): fills device-writable buffers from the
//! host's `getrandom(2)`.

use vm_memory::GuestMemoryMmap;

use super::mmio::VirtioDevice;
use super::queue::{Chain, Queue};

pub const VIRTIO_ID_RNG: u32 = 4;
/// At most this many bytes per request.
const MAX_CHUNK: usize = 64 * 1024;

#[derive(Default)]
pub struct Rng;

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes
        // for the duration of the call; getrandom writes at most that many.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[64]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> bool {
        queues[0].drain(mem, "virtio-rng", |descs| {
            let mut buf = vec![0u8; Chain::writable_len(descs).min(MAX_CHUNK)];
            match fill_random(&mut buf) {
                Ok(()) => Ok(Chain::write_to(descs, mem, &buf)? as u32),
                Err(e) => {
                    tracing::warn!("virtio-rng: getrandom failed: {e}");
                    Ok(0)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::kvm::devices::virtio::mmio::tests::init;
    use crate::kvm::devices::virtio::mmio::{MmioTransport, VIRTIO_F_VERSION_1};
    use crate::kvm::devices::virtio::queue::mock::*;

    #[test]
    fn fills_writable_buffers_and_rejects_bad_ones() {
        let mem = Arc::new(memory());
        let mut t = MmioTransport::new(Box::new(Rng), mem.clone()).unwrap();
        init(&mut t, VIRTIO_F_VERSION_1);
        set_desc(&mem, 0, DATA, 64, WRITE, 0);
        publish(&mem, 0);
        // Out of range, and read-only.
        set_desc(&mem, 1, 0xfff_0000, 64, WRITE, 0);
        publish(&mem, 1);
        set_desc(&mem, 2, DATA + 0x100, 64, 0, 0);
        publish(&mem, 2);
        t.process_queue(0);
        assert_eq!(used_idx(&mem), 3);
        assert_eq!(used_elem(&mem, 0), (0, 64));
        assert_eq!(used_elem(&mem, 1), (1, 0));
        assert_eq!(used_elem(&mem, 2), (2, 0));
        let mut b = [0u8; 64];
        mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        assert!(b.iter().any(|&x| x != 0));
    }
}
