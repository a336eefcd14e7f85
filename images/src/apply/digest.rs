//! DiffIDs and ChainIDs (image-spec `config.md`).

use std::io::{self, Read};

use sha2::{Digest, Sha256};

/// The OCI ChainID of an ordered list of DiffIDs (base layer first):
/// `ChainID(L0) = DiffID(L0)` and
/// `ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln))`,
/// written as `sha256:<hex>`.
///
/// The ChainID of no layers is the empty string.
pub fn chain_id(diff_ids: &[String]) -> String {
    let mut ids = diff_ids.iter();
    let Some(first) = ids.next() else {
        return String::new();
    };
    ids.fold(first.clone(), |chain, diff_id| {
        let mut hasher = Sha256::new();
        hasher.update(chain.as_bytes());
        hasher.update(b" ");
        hasher.update(diff_id.as_bytes());
        format!("sha256:{}", hex::encode(hasher.finalize()))
    })
}

/// Whether `s` is `sha256:` followed by 64 lowercase hex digits.
pub(super) fn is_valid_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// A reader that hashes everything read through it, to compute the DiffID of
/// an uncompressed layer while it is being applied.
#[derive(Debug)]
pub struct DiffIdReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> DiffIdReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        DiffIdReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// Reads the rest of the stream to EOF (a tar reader stops at the
    /// end-of-archive marker, before the padding) and returns the DiffID of
    /// the whole stream, `sha256:<hex>`.
    pub fn finish(mut self) -> io::Result<String> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(format!("sha256:{}", hex::encode(self.hasher.finalize())))
    }
}

impl<R: Read> Read for DiffIdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        // `n <= buf.len()` by the `Read` contract; `get` keeps a reader that
        // breaks it from panicking here.
        let read = buf.get(..n).unwrap_or(buf);
        self.hasher.update(read);
        self.bytes += read.len() as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_hex(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn chain_id_matches_the_spec_formula() {
        let d0 = format!("sha256:{}", sha256_hex(b"layer zero"));
        let d1 = format!("sha256:{}", sha256_hex(b"layer one"));
        let d2 = format!("sha256:{}", sha256_hex(b"layer two"));

        // Computed independently: hash the literal concatenations by hand.
        let c1 = format!("sha256:{}", sha256_hex(format!("{d0} {d1}").as_bytes()));
        let c2 = format!("sha256:{}", sha256_hex(format!("{c1} {d2}").as_bytes()));

        assert_eq!(chain_id(&[]), "");
        assert_eq!(chain_id(std::slice::from_ref(&d0)), d0);
        assert_eq!(chain_id(&[d0.clone(), d1.clone()]), c1);
        assert_eq!(chain_id(&[d0.clone(), d1.clone(), d2.clone()]), c2);
        // Order matters.
        assert_ne!(chain_id(&[d1, d0]), c1);
    }

    #[test]
    fn chain_id_known_vector() {
        // sha256("sha256:aaaa…a sha256:bbbb…b"), computed with coreutils:
        // printf 'sha256:%s sha256:%s' $(printf 'a%.0s' $(seq 64)) \
        //   $(printf 'b%.0s' $(seq 64)) | sha256sum
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let expected = "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c";
        assert_eq!(chain_id(&[a, b]), expected);
    }

    #[test]
    fn diff_id_reader_hashes_to_eof() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut r = DiffIdReader::new(&data[..]);
        let mut first = [0u8; 100];
        r.read_exact(&mut first).unwrap();
        assert_eq!(r.bytes_read(), 100);
        // finish() reads the remaining 9900 bytes before hashing.
        let digest = r.finish().unwrap();
        assert_eq!(digest, format!("sha256:{}", sha256_hex(&data)));
    }

    #[test]
    fn digest_validation() {
        assert!(is_valid_sha256_digest(&format!(
            "sha256:{}",
            "0f".repeat(32)
        )));
        assert!(!is_valid_sha256_digest(&format!(
            "sha256:{}",
            "0F".repeat(32)
        )));
        assert!(!is_valid_sha256_digest(&format!(
            "sha512:{}",
            "0f".repeat(32)
        )));
        assert!(!is_valid_sha256_digest(&format!(
            "sha256:{}",
            "0f".repeat(31)
        )));
        assert!(!is_valid_sha256_digest(""));
    }
}
