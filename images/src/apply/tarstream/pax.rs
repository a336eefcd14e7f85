//! PAX extended header records (`LEN KEY=VALUE\n`), parsed without
//! trusting the lengths, and the GNU sparse keys among them.

use super::super::limits::Limit;
use super::super::ApplyError;

/// A plain non-negative decimal number (no sign, no spaces; at most 19
/// digits, so it fits in an `i64` as Go requires).
pub(super) fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

/// A PAX record's key and value.
pub(super) type PaxRecord<'a> = (&'a [u8], &'a [u8]);

pub(super) enum PaxError {
    Malformed(String),
    Limit(ApplyError),
}

/// Splits PAX extended header data into `(key, value)` records
/// (`"%d %s=%s\n"`, the length counting the whole record). Values may hold
/// any byte, newlines included (extended attributes are binary).
pub(super) fn parse_pax(data: &[u8], max_records: usize) -> Result<Vec<PaxRecord<'_>>, PaxError> {
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
pub(super) struct GnuSparsePax {
    major: Option<Vec<u8>>,
    minor: Option<Vec<u8>>,
    pub(super) name: Option<Vec<u8>>,
    pub(super) real_size: Option<u64>,
    /// Format 0.1's map, or format 0.0's offset/numbytes pairs.
    pub(super) map: Vec<(u64, u64)>,
    has_map: bool,
    /// A 0.0 offset waiting for its numbytes.
    pending_offset: Option<u64>,
    pub(super) version_1: bool,
}

impl GnuSparsePax {
    pub(super) fn record(&mut self, key: &[u8], value: &[u8], max: usize) -> Result<(), PaxError> {
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
    pub(super) fn is_sparse(&mut self) -> bool {
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
