//! Artifacts: the workspace files a `CollectArtifacts` selects, sent as a
//! tar stream of `Artifact` frames, then `ArtifactsEnd` with what was sent
//! and what was left out.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use kiln_agent::glob::select_paths;
use kiln_agent::proto::{self, Frame};

use super::error::{Error, Result};
use super::job::Job;
use super::port::Port;
use super::NEWROOT;

/// Writes a tar stream to the host as `Artifact` frames.
struct ArtifactWriter<'a> {
    port: &'a mut Port,
    buf: Vec<u8>,
    /// Set when the console failed: that ends the agent, whereas an error
    /// about one file (unreadable, bad name) only leaves that file out.
    broken: Option<Error>,
}

impl ArtifactWriter<'_> {
    fn send(&mut self, chunk: Vec<u8>) -> std::io::Result<()> {
        self.port.send(&Frame::Artifact(chunk)).map_err(|e| {
            let told = std::io::Error::other(e.render());
            self.broken = Some(e);
            told
        })
    }
}

impl Write for ArtifactWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while self.buf.len() >= proto::MAX_OUTPUT_CHUNK {
            let rest = self.buf.split_off(proto::MAX_OUTPUT_CHUNK);
            let chunk = std::mem::replace(&mut self.buf, rest);
            self.send(chunk)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::take(&mut self.buf);
            self.send(chunk)?;
        }
        Ok(())
    }
}

/// Exactly `left` bytes of a file: cut if it grew since its size was
/// taken, zero-filled if it shrank or a read failed (a job's background
/// process may still write), so the tar entry always matches its header
/// and the stream stays in sync.
struct Exact<R> {
    inner: R,
    left: u64,
    /// Why the file was zero-filled, if it was.
    short: Option<String>,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = match self.inner.read(&mut buf[..want]) {
            Ok(n) if n > 0 => n,
            Ok(_) | Err(_) if self.short.is_some() => {
                buf[..want].fill(0);
                want
            }
            Ok(_) => {
                self.short = Some("it shrank while being sent (the rest is zeros)".into());
                buf[..want].fill(0);
                want
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                self.short = Some(format!("{e} (the rest is zeros)"));
                buf[..want].fill(0);
                want
            }
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// Send the workspace files `req` selects as a tar stream, then
/// `ArtifactsEnd`. Regular files only (and their directories); symbolic
/// links are skipped. Past `req.max_bytes` or [`proto::MAX_ARTIFACT_FILES`]
/// files are left out but counted, so the host can say exactly what it got.
pub fn send_artifacts(port: &mut Port, job: &Job, req: &proto::CollectArtifacts) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let root = format!("{NEWROOT}{}", job.workdir);
    let files = select_paths(Path::new(&root), &req.paths, &req.exclude);
    let max_bytes = req.max_bytes.min(proto::MAX_ARTIFACT_BYTES);
    let mut end = proto::ArtifactsEnd::default();
    let mut problems = 0usize;
    let mut problem = |end: &mut proto::ArtifactsEnd, rel: &Path, why: &str| {
        problems += 1;
        if end.problems.len() < proto::MAX_PROBLEMS {
            let name = proto::quote(rel.as_os_str().as_bytes(), proto::QUOTE_MAX);
            end.problems.push(format!("{name}: {why}"));
        }
    };
    {
        let mut tar = tar::Builder::new(ArtifactWriter {
            port: &mut *port,
            buf: Vec::new(),
            broken: None,
        });
        tar.follow_symlinks(false);
        for rel in &files {
            let path = Path::new(&root).join(rel);
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                problem(&mut end, rel, "vanished before it could be sent");
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            if end.truncated
                || end.bytes + meta.len() > max_bytes
                || end.files >= proto::MAX_ARTIFACT_FILES
            {
                // Count the rest, send none of it: "later files" must not
                // quietly include small ones that happened to fit.
                end.truncated = true;
                end.left_out_files += 1;
                end.left_out_bytes += meta.len();
                continue;
            }
            if rel.as_os_str().len() > proto::MAX_ARTIFACT_PATH {
                problem(&mut end, rel, "path longer than 4096 bytes");
                continue;
            }
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    problem(&mut end, rel, &e.to_string());
                    continue;
                }
            };
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let mut data = Exact {
                inner: file,
                left: meta.len(),
                short: None,
            };
            match tar.append_data(&mut header, rel, &mut data) {
                Ok(()) => {
                    end.files += 1;
                    end.bytes += meta.len();
                    if let Some(why) = &data.short {
                        problem(&mut end, rel, why);
                    }
                }
                Err(e) => {
                    if let Some(b) = tar.get_mut().broken.take() {
                        return Err(b);
                    }
                    // Only the header can fail now (e.g. its name): nothing
                    // of the entry was written.
                    problem(&mut end, rel, &e.to_string());
                }
            }
        }
        let mut w = tar.into_inner().map_err(Error::Artifacts)?;
        w.flush().map_err(Error::Artifacts)?;
    }
    if problems > end.problems.len() {
        let more = problems - end.problems.len();
        end.problems.push(format!("... and {more} more"));
    }
    port.send(&Frame::ArtifactsEnd(end))
}
