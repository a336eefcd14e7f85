//! The job's trace: masked, capped, marked into sections; what
//! [`super::updater::Updater`] sends to GitLab by offset.
//!
//! Order of the log path (every writer goes through it, in this order):
//! job events → [`TraceSink`] (steps become sections) → [`Trace::write`] →
//! the masking front ([`MaskingSink::merged`], shared with every local
//! sink; runner messages join here) → size cap (`output_limit`) → the
//! trace buffer, from which the updater sends `PATCH /jobs/:id/trace`
//! increments and whose CRC-32 the final update reports.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_agent::proto::{StepEnd, Stream};

use super::client::Output;
use crate::joblog::steps::{section_header, section_name};
use crate::joblog::{JobSink, MaskingSink, Secrets};

/// The executor's sink for GitLab jobs: output into the trace, each step
/// in its own section (`step_script`, `after_script`, ...).
pub struct TraceSink {
    sections: Sections,
    /// The step whose section is open.
    current: Option<String>,
}

impl TraceSink {
    pub fn new(sections: Sections) -> TraceSink {
        TraceSink {
            sections,
            current: None,
        }
    }

    /// The job is over: release what the masker holds back and close the
    /// section of a step that never ended (the VM stopped in it).
    pub fn finish(&mut self) {
        self.sections.trace.flush();
        if let Some(open) = self.current.take() {
            self.sections.end(&section_name(&open));
        }
    }
}

impl JobSink for TraceSink {
    fn step_start(&mut self, _step: u32, name: &str) {
        // Without sections a step gets no header (the script echoes its
        // commands).
        if self.sections.enabled {
            self.sections
                .start(&section_name(name), &section_header(name));
            self.current = Some(name.to_string());
        }
    }

    fn output(&mut self, _step: u32, _stream: Stream, data: &[u8]) {
        self.sections.trace.write(data);
    }

    fn step_end(&mut self, name: &str, end: &StepEnd) {
        if end.timed_out {
            self.sections.trace.line(&format!(
                "\x1b[31;1mERROR: {name} timed out after {} ms\x1b[0;m",
                end.duration_ms
            ));
        }
        if self.current.as_deref() == Some(name) {
            self.sections.end(&section_name(name));
            self.current = None;
        }
    }
}

/// The trace's sections: GitLab's collapsible markers where the job's
/// GitLab supports them (`features.trace_sections`), else plain headers.
#[derive(Clone)]
pub struct Sections {
    pub trace: Arc<Trace>,
    pub enabled: bool,
}

impl Sections {
    /// Open section `name` under `header`.
    pub fn start(&self, name: &str, header: &str) {
        if self.enabled {
            self.trace.section_start(name, header)
        } else if !header.is_empty() {
            self.trace.line(&format!("\x1b[36;1m{header}\x1b[0;m"));
        }
    }

    pub fn end(&self, name: &str) {
        if self.enabled {
            self.trace.section_end(name)
        }
    }
}

/// The job's trace, shared by the sink, the runner and the updater.
pub struct Trace {
    log: Mutex<MaskingSink<Capped>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Trace {
    /// A trace that masks `secrets` and keeps at most `limit` bytes.
    pub fn new(secrets: Secrets, limit: usize) -> Arc<Trace> {
        let capped = Capped {
            data: Vec::new(),
            limit,
            truncated: false,
        };
        Arc::new(Trace {
            log: Mutex::new(MaskingSink::merged(capped, secrets)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MaskingSink<Capped>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn data<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
        f(&self.lock().inner().data)
    }

    /// Append job output or a runner message (masked).
    pub fn write(&self, bytes: &[u8]) {
        self.lock().output(0, Stream::Stdout, bytes);
    }

    /// Flush what the masker holds back (before the runner's own lines and
    /// at the end).
    pub fn flush(&self) {
        self.lock().flush();
    }

    pub fn line(&self, s: &str) {
        self.flush();
        self.write(s.as_bytes());
        self.write(b"\n");
        self.flush();
    }

    pub fn section_start(&self, name: &str, header: &str) {
        self.flush();
        self.write(format!("section_start:{}:{name}\r\x1b[0K", now_secs()).as_bytes());
        if !header.is_empty() {
            self.write(format!("\x1b[0K\x1b[36;1m{header}\x1b[0;m\n").as_bytes());
        }
        self.flush();
    }

    pub fn section_end(&self, name: &str) {
        self.flush();
        self.write(format!("section_end:{}:{name}\r\x1b[0K", now_secs()).as_bytes());
        self.flush();
    }

    pub fn len(&self) -> u64 {
        self.data(|d| d.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `max` bytes from `offset`.
    pub fn chunk(&self, offset: u64, max: usize) -> Vec<u8> {
        self.data(|d| {
            let start = (offset as usize).min(d.len());
            let end = start.saturating_add(max).min(d.len());
            d[start..end].to_vec()
        })
    }

    /// `crc32:%08x` of the whole trace, and its size.
    pub fn output(&self) -> Output {
        self.data(|d| Output {
            checksum: format!("crc32:{:08x}", crc32fast::hash(d)),
            bytesize: d.len() as u64,
        })
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data(<[u8]>::to_vec)
    }
}

/// The trace buffer behind the masking front: masked bytes, up to `limit`.
struct Capped {
    data: Vec<u8>,
    limit: usize,
    truncated: bool,
}

/// Cut `data` to at most `max` bytes without splitting a UTF-8 sequence.
fn utf8_cut(data: &[u8], max: usize) -> usize {
    if data.len() <= max {
        return data.len();
    }
    let mut cut = max;
    // Step back over continuation bytes (at most 3) to a sequence start.
    for _ in 0..3 {
        if cut > 0 && (data[cut] & 0xC0) == 0x80 {
            cut -= 1;
        } else {
            break;
        }
    }
    cut
}

impl JobSink for Capped {
    /// Both streams and the runner's lines, in one log.
    fn output(&mut self, _step: u32, _stream: Stream, bytes: &[u8]) {
        if self.truncated || bytes.is_empty() {
            return;
        }
        let room = self.limit.saturating_sub(self.data.len());
        if bytes.len() <= room {
            self.data.extend_from_slice(bytes);
            return;
        }
        let cut = utf8_cut(bytes, room);
        self.data.extend_from_slice(&bytes[..cut]);
        self.truncated = true;
        let msg = format!(
            "\n\x1b[31;1mJob's log exceeded limit of {} bytes.\nJob execution will continue but no more output will be collected.\x1b[0;m\n",
            self.limit
        );
        self.data.extend_from_slice(msg.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_cuts_on_a_character_boundary_and_says_so() {
        let t = Trace::new(Secrets::default(), 5);
        t.write("abcdé".as_bytes()); // é is 2 bytes: 6 in all
        t.write(b"XYZ");
        let c = String::from_utf8(t.contents()).unwrap();
        assert!(c.starts_with("abcd\n"), "{c:?}");
        assert!(c.contains("exceeded limit of 5 bytes"));
        assert!(!c.contains("XYZ"));
    }

    #[test]
    fn masking_happens_before_the_buffer() {
        let secrets = Secrets::new(["hunter22"]).with_token_prefixes(["glpat-"]);
        let t = Trace::new(secrets, 1 << 20);
        t.write(b"pw hunt");
        t.write(b"er22 ");
        t.line("end");
        assert_eq!(t.contents(), b"pw [MASKED] end\n");
        assert_eq!(t.chunk(3, 8), b"[MASKED]");
        assert_eq!(
            t.output().checksum,
            format!("crc32:{:08x}", crc32fast::hash(b"pw [MASKED] end\n"))
        );
    }
}
