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

    /// The map of an old GNU sparse member (type `S`): up to 4 segments in
    /// the header, then extension blocks of 21 each.
    fn old_gnu_sparse(&mut self, header: &tar::Header, shown: &str) -> Result<Sparse, ApplyError> {
        let gnu = header.as_gnu().ok_or_else(|| {
            self.malformed(format!("entry {shown}: sparse, but not a GNU header"))
        })?;
        let max = self.limits.max_sparse_segments;
        let real_size = gnu
            .real_size()
            .map_err(|_| self.malformed(format!("entry {shown}: bad sparse real size")))?;
        let mut segments = Vec::new();
        let there = format!("at entry {shown}");
        let mut push = |this: &Self, offset: io::Result<u64>, length: io::Result<u64>| {
            let (Ok(offset), Ok(length)) = (offset, length) else {
                return Err(this.malformed(format!("entry {shown}: bad sparse map field")));
            };
            if segments.len() >= max {
                return Err(this.located(
                    ApplyError::LimitExceeded {
                        limit: Limit::SparseSegments,
                        claimed: None,
                        max: max as u64,
                        at: String::new(),
                    },
                    &there,
                ));
            }
            segments.push((offset, length));
            Ok(())
        };
        for s in gnu.sparse.iter().filter(|s| !s.is_empty()) {
            push(self, s.offset(), s.length())?;
        }
        let mut extended = gnu.is_extended();
        let mut blocks = 0usize;
        while extended {
            // Each block may list nothing; bound the blocks as well.
            blocks += 1;
            if blocks > max / 21 + 1 {
                return Err(self.located(
                    ApplyError::LimitExceeded {
                        limit: Limit::SparseSegments,
                        claimed: None,
                        max: max as u64,
                        at: String::new(),
                    },
                    &there,
                ));
            }
            let mut ext = tar::GnuExtSparseHeader::new();
            let context = || format!("in the sparse map of entry {shown}");
            self.fill_data(ext.as_mut_bytes(), &context)?;
            for s in ext.sparse().iter().filter(|s| !s.is_empty()) {
                push(self, s.offset(), s.length())?;
            }
            extended = ext.is_extended();
        }
        self.validated(real_size, segments, shown)
    }

    /// The map of a PAX sparse member: in the records (0.0, 0.1) or at the
    /// start of the data (1.0).
    fn pax_sparse(&mut self, gnu: GnuSparsePax, shown: &str) -> Result<Sparse, ApplyError> {
        let real_size = gnu
            .real_size
            .ok_or_else(|| self.malformed(format!("entry {shown}: sparse without a real size")))?;
        let segments = if gnu.version_1 {
            self.sparse_map_1x0(shown)?
        } else {
            gnu.map
        };
        self.validated(real_size, segments, shown)
    }

    /// Reads a GNU sparse 1.0 map: decimal numbers, one per line (the count,
    /// then offset and length pairs), padded to a block, at the start of the
    /// member's data.
    fn sparse_map_1x0(&mut self, shown: &str) -> Result<Vec<(u64, u64)>, ApplyError> {
        let max = self.limits.max_sparse_segments;
        let there = format!("at entry {shown}");
        let mut block = [0u8; BLOCK as usize];
        let mut pos = BLOCK as usize;
        let mut token = Vec::with_capacity(20);
        let mut numbers: Vec<u64> = Vec::new();
        let mut wanted: Option<usize> = None;
        loop {
            if let Some(w) = wanted {
                if numbers.len() == w * 2 {
                    break;
                }
            }
            if pos == block.len() {
                if self.remaining < BLOCK {
                    return Err(self.malformed(format!(
                        "entry {shown}: its sparse map is longer than its data"
                    )));
                }
                let context = || format!("in the sparse map of entry {shown}");
                self.fill_data(&mut block, &context)?;
                self.remaining -= BLOCK;
                pos = 0;
            }
            let b = block[pos];
            pos += 1;
            if b != b'\n' {
                if !b.is_ascii_digit() || token.len() >= 20 {
                    return Err(self.malformed(format!("entry {shown}: bad sparse map")));
                }
                token.push(b);
                continue;
            }
            let n = parse_decimal(&token)
                .ok_or_else(|| self.malformed(format!("entry {shown}: bad sparse map")))?;
            token.clear();
            match wanted {
                None => {
                    check_claim(Limit::SparseSegments, n, max as u64)
                        .map_err(|e| self.located(e, &there))?;
                    wanted = Some(n as usize);
                    numbers.reserve(n as usize * 2);
                }
                Some(_) => numbers.push(n),
            }
        }
        Ok(numbers.chunks(2).map(|p| (p[0], p[1])).collect())
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

/// A plain non-negative decimal number (no sign, no spaces; at most 19
/// digits, so it fits in an `i64` as Go requires).
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// A PAX record's key and value.
type PaxRecord<'a> = (&'a [u8], &'a [u8]);

enum PaxError {
    Malformed(String),
    Limit(ApplyError),
}

/// Splits PAX extended header data into `(key, value)` records
/// (`"%d %s=%s\n"`, the length counting the whole record). Values may hold
/// any byte, newlines included (extended attributes are binary).
fn parse_pax(data: &[u8], max_records: usize) -> Result<Vec<PaxRecord<'_>>, PaxError> {
    let malformed = || PaxError::Malformed("malformed PAX record".to_owned());
    let mut records = Vec::new();
    let mut rest = data;
    // Some writers pad the data with NULs.
    while rest.first().is_some_and(|&b| b != 0) {
        let space = rest
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or_else(malformed)?;
        let len = parse_decimal(&rest[..space]).ok_or_else(malformed)? as usize;
        if len <= space + 1 || len > rest.len() {
            return Err(malformed());
        }
        let record = &rest[space + 1..len];
        let kv = record.strip_suffix(b"\n").ok_or_else(malformed)?;
        let eq = kv.iter().position(|&b| b == b'=').ok_or_else(malformed)?;
        let (key, value) = (&kv[..eq], &kv[eq + 1..]);
        if key.is_empty() || key.contains(&0) {
            return Err(malformed());
        }
        if records.len() >= max_records {
            return Err(PaxError::Limit(ApplyError::LimitExceeded {
                limit: Limit::PaxRecords,
                claimed: None,
                max: max_records as u64,
                at: String::new(),
            }));
        }
        records.push((key, value));
        rest = &rest[len..];
    }
    Ok(records)
}

/// What the `GNU.sparse.*` PAX records say.
#[derive(Default)]
struct GnuSparsePax {
    major: Option<Vec<u8>>,
    minor: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    real_size: Option<u64>,
    /// Format 0.1's map, or format 0.0's offset/numbytes pairs.
    map: Vec<(u64, u64)>,
    has_map: bool,
    /// A 0.0 offset waiting for its numbytes.
    pending_offset: Option<u64>,
    version_1: bool,
}

impl GnuSparsePax {
    fn record(&mut self, key: &[u8], value: &[u8], max: usize) -> Result<(), PaxError> {
        let bad = || PaxError::Malformed(format!("bad {} record", String::from_utf8_lossy(key)));
        let limit = || {
            PaxError::Limit(ApplyError::LimitExceeded {
                limit: Limit::SparseSegments,
                claimed: None,
                max: max as u64,
                at: String::new(),
            })
        };
        match key {
            b"GNU.sparse.major" => self.major = Some(value.to_vec()),
            b"GNU.sparse.minor" => self.minor = Some(value.to_vec()),
            b"GNU.sparse.name" => self.name = Some(value.to_vec()),
            b"GNU.sparse.size" | b"GNU.sparse.realsize" => {
                self.real_size = Some(parse_decimal(value).ok_or_else(bad)?)
            }
            b"GNU.sparse.map" => {
                self.has_map = true;
                self.map.clear();
                if value.is_empty() {
                    return Ok(());
                }
                // Counted before the numbers are collected.
                let count = value.iter().filter(|&&b| b == b',').count() + 1;
                if count / 2 > max {
                    return Err(limit());
                }
                let numbers: Vec<&[u8]> = value.split(|&b| b == b',').collect();
                let pairs = numbers.chunks_exact(2);
                if !pairs.remainder().is_empty() {
                    return Err(bad());
                }
                if pairs.len() > max {
                    return Err(limit());
                }
                for pair in pairs {
                    let offset = parse_decimal(pair[0]).ok_or_else(bad)?;
                    let length = parse_decimal(pair[1]).ok_or_else(bad)?;
                    self.map.push((offset, length));
                }
            }
            b"GNU.sparse.offset" => {
                if self.pending_offset.is_some() {
                    return Err(bad());
                }
                self.pending_offset = Some(parse_decimal(value).ok_or_else(bad)?);
            }
            b"GNU.sparse.numbytes" => {
                let offset = self.pending_offset.take().ok_or_else(bad)?;
                if self.map.len() >= max {
                    return Err(limit());
                }
                self.map
                    .push((offset, parse_decimal(value).ok_or_else(bad)?));
                self.has_map = true;
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether the records describe a sparse file (Go's
    /// `readGNUSparsePAXHeaders`), noting which format.
    fn is_sparse(&mut self) -> bool {
        match (self.major.as_deref(), self.minor.as_deref()) {
            (Some(b"0"), Some(b"0" | b"1")) => true,
            (Some(b"1"), Some(b"0")) => {
                self.version_1 = true;
                true
            }
            // An unknown version: not ours to interpret.
            (Some(_), _) | (_, Some(_)) => false,
            (None, None) => self.has_map,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_are_split_by_length_not_by_newline() {
        let value = b"a\nb=c";
        let body = b"SCHILY.xattr.user.x=a\nb=c\n";
        let len = body.len() + 3; // "NN " prefix
        let data = [format!("{len} ").as_bytes(), body].concat();
        let recs = parse_pax(&data, 10).ok().unwrap();
        assert_eq!(recs, vec![(&b"SCHILY.xattr.user.x"[..], &value[..])]);
        assert!(parse_pax(b"5 a=b\n", 10).is_err());
        assert!(parse_pax(b"99999999999999999999 a=b\n", 10).is_err());
        assert!(parse_pax(b"6 a=b\n6 c=d\n", 1).is_err());
        assert!(parse_pax(b"6 a=b\n\0\0\0", 1).is_ok());
    }

    #[test]
    fn decimals() {
        assert_eq!(parse_decimal(b"0"), Some(0));
        assert_eq!(parse_decimal(b"9223372036854775807"), Some(i64::MAX as u64));
        assert_eq!(parse_decimal(b"99999999999999999999"), None);
        assert_eq!(parse_decimal(b"-1"), None);
        assert_eq!(parse_decimal(b" 1"), None);
        assert_eq!(parse_decimal(b""), None);
    }
}
