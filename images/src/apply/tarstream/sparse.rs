//! Sparse files: the data map of an old GNU sparse header (and its
//! extension blocks), of PAX GNU sparse 0.0/0.1, and of 1.0 (a decimal map
//! at the start of the member's data), each bounded and validated.

use super::*;

impl<S: Source> TarReader<'_, S> {
    /// The map of an old GNU sparse member (type `S`): up to 4 segments in
    /// the header, then extension blocks of 21 each.
    pub(super) fn old_gnu_sparse(
        &mut self,
        header: &tar::Header,
        shown: &str,
    ) -> Result<Sparse, ApplyError> {
        let gnu = header.as_gnu().ok_or_else(|| {
            self.malformed(format!("entry {shown}: sparse, but not a GNU header"))
        })?;
        let max = self.limits.max_sparse_segments;
        let real_size = gnu
            .real_size()
            .map_err(|_| self.malformed(format!("entry {shown}: bad sparse real size")))?;
        let mut segments = Vec::new();
        let there = format!("at entry {shown}");
        // The error for a map of more than `max` segments.
        let too_many = |this: &Self| {
            this.located(
                ApplyError::LimitExceeded {
                    limit: Limit::SparseSegments,
                    claimed: None,
                    max: max as u64,
                    at: String::new(),
                },
                &there,
            )
        };
        let mut push = |this: &Self, offset: io::Result<u64>, length: io::Result<u64>| {
            let (Ok(offset), Ok(length)) = (offset, length) else {
                return Err(this.malformed(format!("entry {shown}: bad sparse map field")));
            };
            if segments.len() >= max {
                return Err(too_many(this));
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
                return Err(too_many(self));
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
    pub(super) fn pax_sparse(
        &mut self,
        gnu: GnuSparsePax,
        shown: &str,
    ) -> Result<Sparse, ApplyError> {
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
    pub(super) fn sparse_map_1x0(&mut self, shown: &str) -> Result<Vec<(u64, u64)>, ApplyError> {
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
}
