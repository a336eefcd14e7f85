//! A streaming tar reader that bounds everything an archive can make it
//! allocate.
//!
//! The fields of one 512-byte header are decoded by the `tar` crate
//! (`tar::Header`). Its `Archive` is not used: it reads GNU long names, long
//! links and PAX extended headers whole into memory whatever size they claim
//! (a 7 MB gzip layer holding a 1.5 GiB long name took 7.9 GB), keeps one
//! record per sparse segment without a bound, yields sparse holes as runs of
//! zeros (a 10 KB layer became a 2 GiB file), and takes an end of input
//! between two members for the end of the archive. Here every size is
//! checked against [`Limits`] before anything is read into memory, holes are
//! handed to the caller as a map, and an archive that stops inside a header
//! or a member's data is reported as truncated.
//!
//! Semantics follow Go's `archive/tar` (which Docker, containerd, skopeo and
//! umoci use), including where it differs from the `tar` crate: a GNU long
//! name wins over a PAX `path`, and types that have no data (links,
//! directories, devices, FIFOs) have none whatever their size field says.
//! Supported: ustar, GNU (long names and links, old sparse files with
//! extension blocks) and PAX (local and global headers, `path`, `linkpath`,
//! `size`, ids, times, `SCHILY.xattr.*`, GNU sparse formats 0.0, 0.1 and
//! 1.0).
//!
//! - `pax.rs`: PAX records and the GNU sparse keys in them.
//! - `sparse.rs`: sparse maps (old GNU headers, PAX 0.x, 1.0 data blocks).

mod pax;
mod sparse;

use pax::{parse_decimal, parse_pax, GnuSparsePax, PaxError};

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use super::limits::{check_claim, Budget, Limit, Limits};
use super::ApplyError;
use crate::quote_bytes;

/// The tar block size.
const BLOCK: u64 = 512;

/// The PAX records a member keeps for the applier: ids, times and extended
/// attributes.
const KEPT_PAX_KEYS: [&[u8]; 4] = [b"uid", b"gid", b"mtime", b"atime"];
/// The prefix of PAX records that carry extended attributes.
pub(super) const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// Where a tar comes from: a stream, or a file that can skip by seeking.
pub(crate) trait Source: Read {
    /// Skips up to `n` bytes; returns how many were skipped (fewer only at
    /// the end of the input).
    fn skip(&mut self, n: u64) -> io::Result<u64>;
}

/// A [`Source`] that skips by reading.
pub(crate) struct Streamed<R>(pub R);

impl<R: Read> Read for Streamed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read> Source for Streamed<R> {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        io::copy(&mut (&mut self.0).take(n), &mut io::sink())
    }
}

/// A [`Source`] over a file, which skips by seeking (never past its end).
pub(crate) struct Seekable {
    file: File,
    len: u64,
    pos: u64,
}

impl Seekable {
    pub(crate) fn new(file: File) -> io::Result<Seekable> {
        let len = file.metadata()?.len();
        Ok(Seekable { file, len, pos: 0 })
    }
}

impl Read for Seekable {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Source for Seekable {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let n = n.min(self.len.saturating_sub(self.pos));
        self.pos = self.file.seek(SeekFrom::Start(self.pos + n))?;
        Ok(n)
    }
}

/// A sparse file's layout: data segments `(offset, length)` in ascending
/// order, not overlapping, within `real_size`; the rest is holes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sparse {
    pub real_size: u64,
    pub segments: Vec<(u64, u64)>,
}

impl Sparse {
    /// Bytes of holes.
    pub(crate) fn hole_bytes(&self) -> u64 {
        let data: u64 = self.segments.iter().map(|&(_, len)| len).sum();
        self.real_size.saturating_sub(data)
    }
}

/// One member of the archive (extension headers already folded in).
pub(crate) struct Member {
    /// The member's own header.
    pub header: tar::Header,
    pub kind: tar::EntryType,
    /// The path: GNU long name, else PAX `path`, else the header's.
    pub path: Vec<u8>,
    /// The link target (empty when there is none).
    pub link: Vec<u8>,
    /// PAX `uid`, `gid`, `mtime`, `atime` and `SCHILY.xattr.*` records.
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes of data that follow in the archive (a sparse file's segments
    /// together).
    pub size: u64,
    /// The map of a sparse file.
    pub sparse: Option<Sparse>,
    /// Offset of the data in the archive.
    pub data_offset: u64,
}

/// How the archive ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Not yet.
    No,
    /// At the end-of-archive marker (a zero block).
    Marker,
    /// At the end of the input, between two members, without a marker: what
    /// a truncated archive looks like, and what Go's `archive/tar` accepts.
    Eof,
}

/// Reads members one by one; see the module documentation.
pub(crate) struct TarReader<'b, S> {
    src: S,
    budget: &'b Budget,
    limits: Limits,
    /// Bytes consumed from `src`.
    offset: u64,
    /// Unread data bytes of the current member.
    remaining: u64,
    /// Padding after the current member's data.
    padding: u64,
    /// Path and link bytes of this archive so far.
    name_bytes: u64,
    /// Members read so far.
    members: u64,
    /// The previous member's path, quoted, for messages.
    last: Option<String>,
    end: End,
}

impl<'b, S: Source> TarReader<'b, S> {
    pub(crate) fn new(src: S, budget: &'b Budget) -> Self {
        TarReader {
            src,
            budget,
            limits: *budget.limits(),
            offset: 0,
            remaining: 0,
            padding: 0,
            name_bytes: 0,
            members: 0,
            last: None,
            end: End::No,
        }
    }

    /// How the archive ended (`End::No` until [`next`](Self::next) returned
    /// `None`).
    pub(crate) fn end(&self) -> End {
        self.end
    }

    /// Where the next header would be, for messages.
    fn at(&self) -> String {
        match &self.last {
            Some(path) => format!("after entry {path}"),
            None => "at its first entry".to_owned(),
        }
    }

    /// Fills in where a limit was exceeded.
    fn located(&self, e: ApplyError, what: &str) -> ApplyError {
        e.located(|| what.to_owned())
    }

    fn malformed(&self, reason: impl Into<String>) -> ApplyError {
        ApplyError::Malformed {
            context: self.at(),
            reason: reason.into(),
        }
    }

    /// Reads exactly `buf.len()` bytes; `Ok(false)` if the input ended
    /// before the first byte, a truncation error if it ended later.
    fn fill(&mut self, buf: &mut [u8], context: &dyn Fn() -> String) -> Result<bool, ApplyError> {
        let mut n = 0;
        while n < buf.len() {
            match self.src.read(&mut buf[n..]) {
                Ok(0) if n == 0 => return Ok(false),
                Ok(0) => return Err(ApplyError::Truncated { context: context() }),
                Ok(k) => {
                    n += k;
                    self.offset += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(super::from_io(e, context())),
            }
        }
        Ok(true)
    }

    /// Reads exactly `buf.len()` bytes of data, which must be there.
    fn fill_data(
        &mut self,
        buf: &mut [u8],
        context: &dyn Fn() -> String,
    ) -> Result<(), ApplyError> {
        if buf.is_empty() || self.fill(buf, context)? {
            Ok(())
        } else {
            Err(ApplyError::Truncated { context: context() })
        }
    }

    fn skip(&mut self, n: u64, context: &dyn Fn() -> String) -> Result<(), ApplyError> {
        if n == 0 {
            return Ok(());
        }
        let skipped = self.src.skip(n).map_err(|e| super::from_io(e, context()))?;
        self.offset += skipped;
        if skipped < n {
            return Err(ApplyError::Truncated { context: context() });
        }
        Ok(())
    }

    /// Skips what is left of the current member.
    fn finish_member(&mut self) -> Result<(), ApplyError> {
        let n = self.remaining + self.padding;
        self.remaining = 0;
        self.padding = 0;
        let context = self.in_contents();
        self.skip(n, &|| context.clone())
    }

    /// Reads the next header block; `None` at the end of the archive.
    fn header(&mut self) -> Result<Option<tar::Header>, ApplyError> {
        let mut header = tar::Header::new_old();
        let at = self.at();
        let context = || format!("in a header {at}");
        let filled = self.fill(header.as_mut_bytes(), &context);
        let bytes = header.as_bytes();
        if self.members == 0
            && (bytes.starts_with(&[0x1f, 0x8b]) || bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]))
        {
            return Err(ApplyError::Malformed {
                context: "at its start".to_owned(),
                reason: "this is not a tar archive but a compressed one (gzip or zstd), \
                         although its media type says uncompressed"
                    .to_owned(),
            });
        }
        if !filled? {
            self.end = End::Eof;
            return Ok(None);
        }
        if header.as_bytes().iter().all(|&b| b == 0) {
            // A zero block ends the archive. Like Go: a second one (or the
            // end of the input) must follow, not another header.
            let mut second = [0u8; BLOCK as usize];
            if self.fill(&mut second, &context)? && second.iter().any(|&b| b != 0) {
                return Err(self.malformed("a header follows the end-of-archive marker"));
            }
            self.end = End::Marker;
            return Ok(None);
        }
        let bytes = header.as_bytes();
        // The checksum field counts as spaces. Some old writers summed
        // signed bytes; both are accepted (as Go does).
        let (mut unsigned, mut signed) = (8 * 32i64, 8 * 32i64);
        for (i, &b) in bytes.iter().enumerate() {
            if !(148..156).contains(&i) {
                unsigned += i64::from(b);
                signed += i64::from(b as i8);
            }
        }
        let stored = header.cksum().ok().map(i64::from);
        if stored != Some(unsigned) && stored != Some(signed) {
            return Err(if self.members == 0 {
                ApplyError::Malformed {
                    context: "at its start".to_owned(),
                    reason: "this is not a tar archive (the first header's checksum is wrong)"
                        .to_owned(),
                }
            } else {
                self.malformed("a header's checksum is wrong")
            });
        }
        Ok(Some(header))
    }

    /// The size field of `header`; empty reads as 0 (as in Go).
    fn size_field(&self, header: &tar::Header) -> Result<u64, ApplyError> {
        let raw = &header.as_old().size;
        if raw.iter().all(|&b| b == 0 || b == b' ') {
            return Ok(0);
        }
        header
            .entry_size()
            .map_err(|_| self.malformed("a header's size field is not a number"))
    }

    /// Reads the data of an extension header (at most `max` bytes, checked
    /// before anything is allocated) and skips its padding.
    fn special(&mut self, size: u64, max: u64, limit: Limit) -> Result<Vec<u8>, ApplyError> {
        let at = self.at();
        check_claim(limit, size, max).map_err(|e| self.located(e, &at))?;
        let mut data = vec![0u8; size as usize];
        let context = || format!("in an extension header {at}");
        self.fill_data(&mut data, &context)?;
        self.skip(padding(size), &context)?;
        Ok(data)
    }

    /// The next member; `None` at the end of the archive.
    pub(crate) fn next(&mut self) -> Result<Option<Member>, ApplyError> {
        self.finish_member()?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<u8>> = None;
        let header = loop {
            let Some(header) = self.header()? else {
                if long_name.is_some() || long_link.is_some() || pax.is_some() {
                    return Err(ApplyError::Truncated {
                        context: format!(
                            "{}: extension headers are not followed by their entry",
                            self.at()
                        ),
                    });
                }
                return Ok(None);
            };
            let at = self.at();
            self.budget.add_entry().map_err(|e| self.located(e, &at))?;
            self.members += 1;
            let size = self.size_field(&header)?;
            match header.entry_type().as_byte() {
                b'L' | b'K' => {
                    let is_name = header.entry_type().as_byte() == b'L';
                    let slot = if is_name { &long_name } else { &long_link };
                    if slot.is_some() {
                        return Err(self.malformed("two GNU long names for one entry"));
                    }
                    // The name and its terminating NUL.
                    let max = self.limits.max_path_bytes as u64 + 1;
                    let data = self.special(size, max, Limit::LongName)?;
                    let name = c_string(&data).to_vec();
                    if is_name {
                        long_name = Some(name);
                    } else {
                        long_link = Some(name);
                    }
                }
                b'x' => {
                    if pax.is_some() {
                        return Err(self.malformed("two PAX headers for one entry"));
                    }
                    pax = Some(self.special(size, self.limits.max_pax_bytes, Limit::PaxBytes)?);
                }
                b'g' => {
                    // Archive-wide defaults (comments, in practice); no
                    // layer tool relies on them. Skipped, but counted.
                    tracing::debug!("skipping a global PAX header");
                    let context = || format!("in a global PAX header {at}");
                    self.skip(size.saturating_add(padding(size)), &context)?;
                }
                _ => break header,
            }
        };
        let member = self.member(header, long_name, long_link, pax.as_deref())?;
        Ok(Some(member))
    }

    /// Folds the extension headers into the member of `header`.
    fn member(
        &mut self,
        header: tar::Header,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        pax: Option<&[u8]>,
    ) -> Result<Member, ApplyError> {
        let at = self.at();
        let records = match pax {
            Some(data) => parse_pax(data, self.limits.max_pax_records).map_err(|e| match e {
                PaxError::Malformed(reason) => self.malformed(reason),
                PaxError::Limit(e) => self.located(e, &at),
            })?,
            None => Vec::new(),
        };
        let mut path = header.path_bytes().into_owned();
        let mut link = header
            .link_name_bytes()
            .map(|l| l.into_owned())
            .unwrap_or_default();
        let mut size = self.size_field(&header)?;
        let mut kept = Vec::new();
        let mut gnu = GnuSparsePax::default();
        for (key, value) in &records {
            match *key {
                b"path" => path = value.to_vec(),
                b"linkpath" => link = value.to_vec(),
                b"size" => {
                    size =
                        parse_decimal(value).ok_or_else(|| self.malformed("bad PAX size record"))?
                }
                k if KEPT_PAX_KEYS.contains(&k) || k.starts_with(PAX_XATTR_PREFIX) => {
                    kept.push((key.to_vec(), value.to_vec()))
                }
                k if k.starts_with(b"GNU.sparse.") => gnu
                    .record(k, value, self.limits.max_sparse_segments)
                    .map_err(|e| match e {
                        PaxError::Malformed(reason) => self.malformed(reason),
                        PaxError::Limit(e) => self.located(e, &at),
                    })?,
                _ => {}
            }
        }
        if let Some(name) = long_name {
            path = name;
        }
        if let Some(name) = long_link {
            link = name;
        }
        if let Some(name) = gnu.name.take() {
            path = name;
        }
        let kind = header.entry_type();
        let shown = quote_bytes(&path);
        self.last = Some(shown.clone());
        let there = format!("at entry {shown}");
        self.check_names(&path, &link)
            .map_err(|e| self.located(e, &there))?;

        // Types that have no data have none, whatever the size says (Go).
        if matches!(kind.as_byte(), b'1' | b'2' | b'3' | b'4' | b'5' | b'6') {
            size = 0;
        }
        // A size beyond what the layer or the image may still hold is
        // refused from the header, before anything is written.
        let image_total = self.budget.bytes().saturating_add(size);
        check_claim(Limit::LayerBytes, size, self.limits.max_layer_bytes)
            .and_then(|()| check_claim(Limit::ImageBytes, image_total, self.limits.max_image_bytes))
            .map_err(|e| self.located(e, &there))?;
        self.remaining = size;
        self.padding = padding(size);
        let sparse = if kind.as_byte() == b'S' {
            Some(self.old_gnu_sparse(&header, &shown)?)
        } else if gnu.is_sparse() {
            if !matches!(kind.as_byte(), b'0' | b'\0' | b'7') {
                return Err(self.malformed(format!("entry {shown}: a sparse map on a non-file")));
            }
            Some(self.pax_sparse(gnu, &shown)?)
        } else {
            None
        };
        if let Some(sparse) = &sparse {
            let data: u64 = sparse.segments.iter().map(|&(_, len)| len).sum();
            if data != self.remaining {
                return Err(self.malformed(format!(
                    "entry {shown}: its sparse map lists {data} bytes of data, the entry has {}",
                    self.remaining
                )));
            }
        }
        Ok(Member {
            header,
            kind,
            path,
            link,
            pax: kept,
            size: self.remaining,
            sparse,
            data_offset: self.offset,
        })
    }

    /// Checks a member's path and link against the limits.
    fn check_names(&mut self, path: &[u8], link: &[u8]) -> Result<(), ApplyError> {
        let max = self.limits.max_path_bytes as u64;
        check_claim(Limit::PathBytes, path.len() as u64, max)?;
        check_claim(Limit::PathBytes, link.len() as u64, max)?;
        for name in [path, link] {
            let depth = name.split(|&b| b == b'/').filter(|c| !c.is_empty()).count();
            check_claim(
                Limit::PathDepth,
                depth as u64,
                self.limits.max_path_depth as u64,
            )?;
        }
        self.name_bytes += (path.len() + link.len()) as u64;
        check_claim(
            Limit::LayerNameBytes,
            self.name_bytes,
            self.limits.max_layer_name_bytes,
        )
    }

    /// Checks a sparse map (Go's `validateSparseEntries`).
    fn validated(
        &self,
        real_size: u64,
        segments: Vec<(u64, u64)>,
        shown: &str,
    ) -> Result<Sparse, ApplyError> {
        let mut end = 0u64;
        for &(offset, length) in &segments {
            let Some(seg_end) = offset.checked_add(length) else {
                return Err(self.malformed(format!("entry {shown}: sparse segment overflows")));
            };
            if offset < end || seg_end > real_size || i64::try_from(seg_end).is_err() {
                return Err(self.malformed(format!(
                    "entry {shown}: sparse segments out of order, overlapping or past the end"
                )));
            }
            end = seg_end;
        }
        Ok(Sparse {
            real_size,
            segments,
        })
    }

    /// Reads the current member's data; `Ok(0)` once it is all read.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, ApplyError> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        loop {
            match self.src.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(ApplyError::Truncated {
                        context: self.in_contents(),
                    })
                }
                Ok(n) => {
                    self.offset += n as u64;
                    self.remaining -= n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(super::from_io(e, self.in_contents())),
            }
        }
    }

    fn in_contents(&self) -> String {
        format!(
            "in the contents of entry {}",
            self.last.as_deref().unwrap_or("")
        )
    }
}

/// Bytes of padding after `size` bytes of data.
fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// `data` up to its first NUL.
fn c_string(data: &[u8]) -> &[u8] {
    match data.iter().position(|&b| b == 0) {
        Some(i) => &data[..i],
        None => data,
    }
}
