//! A byte buffer that keeps only the tail of what was written to it: the
//! serial console (kernel messages) of either backend and QEMU's stderr.

use std::collections::VecDeque;

/// A byte buffer that keeps only the last `limit` bytes written to it.
#[derive(Debug)]
pub struct TailBuffer {
    buf: VecDeque<u8>,
    limit: usize,
    dropped: u64,
    /// Bytes pushed so far, for whoever waits for output.
    written: tokio::sync::watch::Sender<u64>,
}

impl TailBuffer {
    pub fn new(limit: usize) -> Self {
        TailBuffer {
            buf: VecDeque::new(),
            limit,
            dropped: 0,
            written: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes whenever bytes are pushed (its value counts them all).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.written.subscribe()
    }

    pub fn push(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.written.send_modify(|n| *n += data.len() as u64);
        }
        let data = if data.len() > self.limit {
            self.dropped += (data.len() - self.limit) as u64;
            &data[data.len() - self.limit..]
        } else {
            data
        };
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.limit);
        self.buf.drain(..overflow);
        self.dropped += overflow as u64;
        self.buf.extend(data);
    }

    /// Bytes pushed since `written` bytes had been pushed in all, as far as
    /// they are still held, and the new total: a reader that forwards the
    /// stream calls this with the total it got last time.
    pub fn since(&self, written: u64) -> (Vec<u8>, u64) {
        let total = self.dropped + self.buf.len() as u64;
        let skip = written
            .saturating_sub(self.dropped)
            .min(self.buf.len() as u64) as usize;
        (self.buf.iter().skip(skip).copied().collect(), total)
    }

    pub fn contents(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len() + 64);
        if self.dropped > 0 {
            out.extend_from_slice(
                format!("[... {} earlier bytes dropped]\n", self.dropped).as_bytes(),
            );
        }
        out.extend(self.buf.iter());
        out
    }
}

/// A [`TailBuffer`] shared between the thread or task that fills it and the
/// machine that reads it.
pub type SharedTail = std::sync::Arc<std::sync::Mutex<TailBuffer>>;

/// A new shared tail of `limit` bytes.
pub fn shared(limit: usize) -> SharedTail {
    std::sync::Arc::new(std::sync::Mutex::new(TailBuffer::new(limit)))
}

/// What a machine's `serial_log` returns: the tail's contents (empty if a
/// writer panicked while holding it).
pub fn contents(tail: &SharedTail) -> Vec<u8> {
    tail.lock().map(|b| b.contents()).unwrap_or_default()
}

/// What a machine's `serial_updates` returns: a receiver that changes with
/// every push (one that never changes if a writer panicked).
pub fn subscribe(tail: &SharedTail) -> tokio::sync::watch::Receiver<u64> {
    tail.lock()
        .map(|b| b.subscribe())
        .unwrap_or_else(|_| tokio::sync::watch::channel(0).1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_buffer_keeps_the_last_bytes_and_counts_the_rest() {
        let mut t = TailBuffer::new(8);
        t.push(b"0123");
        t.push(b"456789ab");
        let c = t.contents();
        assert!(
            c.ends_with(b"456789ab"),
            "{:?}",
            String::from_utf8_lossy(&c)
        );
        assert!(String::from_utf8_lossy(&c).contains("4 earlier bytes dropped"));
        let mut t = TailBuffer::new(4);
        t.push(b"abcdefgh");
        assert!(t.contents().ends_with(b"efgh"));
        // A forwarder gets what is new, and what is still held after a gap.
        let mut t = TailBuffer::new(4);
        t.push(b"ab");
        let (new, n) = t.since(0);
        assert_eq!((new.as_slice(), n), (&b"ab"[..], 2));
        t.push(b"c");
        assert_eq!(t.since(n), (b"c".to_vec(), 3));
        t.push(b"defgh");
        assert_eq!(t.since(3), (b"efgh".to_vec(), 8));
        assert_eq!(t.since(8), (Vec::new(), 8));
    }
}
