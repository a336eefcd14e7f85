//! An entry's metadata from its tar header and PAX records (owner, mode,
//! times, extended attributes), and setting it on what was created.

use std::io;
use std::os::fd::BorrowedFd;

use rustix::fs::{self as rfs, Gid, Timespec, Timestamps, Uid};

use super::invalid;
use crate::apply::fsops;
use crate::apply::tarstream::{Member, PAX_XATTR_PREFIX};
use crate::apply::ApplyError;
use crate::quote_bytes;

/// The metadata of an entry.
#[derive(Debug)]
pub(super) struct Meta {
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// Permission bits with setuid, setgid and sticky.
    pub(super) mode: u32,
    pub(super) atime: Timespec,
    pub(super) mtime: Timespec,
    pub(super) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    pub(super) fn times(&self) -> Timestamps {
        Timestamps {
            last_access: self.atime,
            last_modification: self.mtime,
        }
    }
}

pub(super) fn owner(meta: &Meta) -> (Uid, Gid) {
    (Uid::from_raw(meta.uid), Gid::from_raw(meta.gid))
}

/// Whether an extended attribute from a layer is applied. Layers are
/// hostile: `trusted.*` (overlayfs keeps its redirects and opaque markers
/// there) and `user.overlay.*` (the same, for unprivileged overlayfs) could
/// change how the tree behaves once it is used as an overlay layer, so only
/// the user, security and POSIX ACL namespaces are kept.
pub(super) fn xattr_allowed(name: &[u8]) -> bool {
    (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
        || name.starts_with(b"security.")
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

pub(super) fn set_xattrs_fd(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    shown: &str,
) -> Result<u64, ApplyError> {
    let mut skipped = 0;
    for (name, value) in &meta.xattrs {
        if !xattr_allowed(name) {
            tracing::debug!(path = shown, xattr = %quote_bytes(name), "skipping extended attribute");
            skipped += 1;
            continue;
        }
        rfs::fsetxattr(fd, name.as_slice(), value, rfs::XattrFlags::empty()).map_err(|e| {
            ApplyError::Xattr {
                path: shown.to_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                source: e.into(),
            }
        })?;
    }
    Ok(skipped)
}

pub(super) fn set_xattrs_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    meta: &Meta,
    is_symlink: bool,
    shown: &str,
) -> Result<u64, ApplyError> {
    let mut skipped = 0;
    for (key, value) in &meta.xattrs {
        // Linux refuses user.* attributes on symlinks.
        if !xattr_allowed(key) || (is_symlink && key.starts_with(b"user.")) {
            tracing::debug!(path = shown, xattr = %quote_bytes(key), "skipping extended attribute");
            skipped += 1;
            continue;
        }
        fsops::lsetxattr_at(dir, name, key, value).map_err(|e| ApplyError::Xattr {
            path: shown.to_owned(),
            name: String::from_utf8_lossy(key).into_owned(),
            source: e,
        })?;
    }
    Ok(skipped)
}

/// Reads an entry's metadata from its header and PAX records.
pub(super) fn read_meta(entry: &Member, shown: &str) -> Result<Meta, ApplyError> {
    let header = &entry.header;
    // Go's archive/tar (Docker, containerd, skopeo, umoci) reads an empty
    // (all NUL or space) numeric field as 0; images built with it do exist.
    let raw = header.as_old();
    let mode = or_zero(&raw.mode, header.mode().map(u64::from))
        .map_err(|e| bad_field(shown, "mode", &e))? as u32
        & 0o7777;
    let mut uid = or_zero(&raw.uid, header.uid()).map_err(|e| bad_field(shown, "uid", &e))?;
    let mut gid = or_zero(&raw.gid, header.gid()).map_err(|e| bad_field(shown, "gid", &e))?;
    let mtime = or_zero(&raw.mtime, header.mtime()).map_err(|e| bad_field(shown, "mtime", &e))?;
    let mut mtime = Timespec {
        tv_sec: i64::try_from(mtime).map_err(|_| invalid(shown, "mtime out of range"))?,
        tv_nsec: 0,
    };
    let mut atime = None;
    let mut xattrs = Vec::new();
    for (key, value) in &entry.pax {
        match key.as_slice() {
            b"uid" => uid = parse_pax_u64(value).ok_or_else(|| invalid(shown, "bad PAX uid"))?,
            b"gid" => gid = parse_pax_u64(value).ok_or_else(|| invalid(shown, "bad PAX gid"))?,
            b"mtime" => {
                mtime = parse_pax_time(value).ok_or_else(|| invalid(shown, "bad PAX mtime"))?
            }
            b"atime" => {
                atime = Some(parse_pax_time(value).ok_or_else(|| invalid(shown, "bad PAX atime"))?)
            }
            _ => {
                if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                    xattrs.push((name.to_vec(), value.clone()));
                }
            }
        }
    }
    // u32::MAX means "leave unchanged" to chown.
    let id = |v: u64, what: &str| {
        u32::try_from(v)
            .ok()
            .filter(|&v| v != u32::MAX)
            .ok_or_else(|| invalid(shown, format!("{what} {v} out of range")))
    };
    Ok(Meta {
        uid: id(uid, "uid")?,
        gid: id(gid, "gid")?,
        mode,
        atime: atime.unwrap_or(mtime),
        mtime,
        xattrs,
    })
}

/// The link target of a symlink or hard link entry.
pub(super) fn link_name<'m>(entry: &'m Member, shown: &str) -> Result<&'m [u8], ApplyError> {
    if entry.link.is_empty() {
        return Err(invalid(shown, "link without a target"));
    }
    Ok(&entry.link)
}

pub(super) fn parse_pax_u64(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// Parses a PAX time, `[-]SECONDS[.FRACTION]`.
pub(super) fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (secs, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, digit) in frac.bytes().take(9).enumerate() {
        let place = 10i64.pow(8 - i as u32);
        nanos += i64::from(digit - b'0') * place;
    }
    Some(if negative && nanos > 0 {
        Timespec {
            tv_sec: -secs - 1,
            tv_nsec: 1_000_000_000 - nanos,
        }
    } else {
        Timespec {
            tv_sec: if negative { -secs } else { secs },
            tv_nsec: nanos,
        }
    })
}

/// `parsed`, or 0 when the raw field is empty (only NUL bytes and spaces).
pub(super) fn or_zero(raw: &[u8], parsed: std::io::Result<u64>) -> std::io::Result<u64> {
    if raw.iter().all(|b| *b == 0 || *b == b' ') {
        Ok(0)
    } else {
        parsed
    }
}

pub(super) fn bad_field(path: &str, field: &str, e: &io::Error) -> ApplyError {
    invalid(path, format!("bad {field} field in the tar header ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec, t.tv_nsec));
        assert_eq!(t("1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(t("1700000000.5"), Some((1_700_000_000, 500_000_000)));
        assert_eq!(t("12.000000001999"), Some((12, 1)));
        assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(t("-3"), Some((-3, 0)));
        assert_eq!(t(""), None);
        assert_eq!(t("1e9"), None);
        assert_eq!(t(".5"), None);
        assert_eq!(t("99999999999999999999999"), None);
    }

    #[test]
    fn xattr_namespaces() {
        assert!(xattr_allowed(b"user.foo"));
        assert!(xattr_allowed(b"security.capability"));
        assert!(xattr_allowed(b"system.posix_acl_access"));
        assert!(!xattr_allowed(b"trusted.overlay.redirect"));
        assert!(!xattr_allowed(b"user.overlay.opaque"));
        assert!(!xattr_allowed(b"system.nfs4_acl"));
    }
}
