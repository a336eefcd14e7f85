//! The snapshot file:
//!
//! ```text
//! 0     "KILNSNAP" | format: u32 LE | header length: u32 LE | header (JSON)
//! 4096  machine state (JSON, `state_len` bytes)
//! ...   guest memory, page-aligned, one range per RAM region (sparse)
//! ```
//!
//! The header is written last, so a file cut short by a crash has none and
//! is refused. On load every length and offset is checked against the file
//! before anything is allocated or mapped.

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use super::state::MachineState;
use super::{io, Profile, SnapshotError, KILN_VERSION};

pub const MAGIC: &[u8; 8] = b"KILNSNAP";
/// Bumped whenever the file layout or the state's meaning changes.
pub const FORMAT_VERSION: u32 = 1;
/// The header's area: the state starts here.
pub const HEADER_AREA: u64 = 4096;
const PREFIX: usize = 16;
/// More state than any machine we build has (vCPU state is ~20 KiB each).
pub const MAX_STATE_BYTES: u64 = 64 << 20;
const PAGE: u64 = 4096;

/// Where one RAM region lives in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// What a snapshot says about itself (`kiln snapshot ls` reads only this).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub kiln_version: String,
    /// [`Profile::hash`] of `profile`.
    pub profile_hash: String,
    pub profile: Profile,
    pub state_len: u64,
    pub memory: Vec<MemoryRange>,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// Read and parse the header, checking only that it is one (not whether
/// this kiln can use it: see [`Snapshot::open`]).
pub fn read_header(file: &File) -> Result<(u32, Header), SnapshotError> {
    let mut prefix = [0u8; PREFIX];
    file.read_exact_at(&mut prefix, 0).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            SnapshotError::NotASnapshot
        } else {
            SnapshotError::Io {
                what: "read the snapshot header",
                source: e,
            }
        }
    })?;
    if &prefix[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let format = u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]]);
    let len = u32::from_le_bytes([prefix[12], prefix[13], prefix[14], prefix[15]]) as u64;
    if format != FORMAT_VERSION {
        // Its header may mean something else: do not parse it.
        return Err(SnapshotError::Format {
            found: format,
            expected: FORMAT_VERSION,
        });
    }
    if len == 0 || len > HEADER_AREA - PREFIX as u64 {
        return Err(SnapshotError::Corrupt(format!("header of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, PREFIX as u64)
        .map_err(io("read the snapshot header"))?;
    let header: Header =
        serde_json::from_slice(&buf).map_err(|e| SnapshotError::Corrupt(format!("header: {e}")))?;
    Ok((format, header))
}

/// Write `header` into the header area (last, once the rest is on disk).
pub fn write_header(file: &File, header: &Header) -> Result<(), SnapshotError> {
    let json =
        serde_json::to_vec(header).map_err(|e| SnapshotError::Corrupt(format!("header: {e}")))?;
    if json.len() > HEADER_AREA as usize - PREFIX {
        return Err(SnapshotError::Corrupt(format!(
            "header of {} bytes does not fit its {HEADER_AREA}-byte area",
            json.len()
        )));
    }
    let mut area = Vec::with_capacity(PREFIX + json.len());
    area.extend_from_slice(MAGIC);
    area.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    area.extend_from_slice(&(json.len() as u32).to_le_bytes());
    area.extend_from_slice(&json);
    file.write_all_at(&area, 0)
        .map_err(io("write the snapshot header"))
}

/// Write the state and guest memory, then the header; `file` is empty and
/// writable. The caller syncs and publishes it.
pub fn write(
    file: &File,
    profile: &Profile,
    state: &MachineState,
    mem: &vm_memory::GuestMemoryMmap,
) -> Result<Header, SnapshotError> {
    let json =
        serde_json::to_vec(state).map_err(|e| SnapshotError::Corrupt(format!("state: {e}")))?;
    file.write_all_at(&json, HEADER_AREA)
        .map_err(io("write the machine state"))?;
    let memory_start = (HEADER_AREA + json.len() as u64).next_multiple_of(PAGE);
    let (memory, pages) = super::memory::write(mem, file, memory_start)?;
    tracing::debug!(
        read = pages.read,
        written = pages.written,
        "guest memory pages in the snapshot"
    );
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let header = Header {
        kiln_version: KILN_VERSION.into(),
        profile_hash: profile.hash(),
        profile: profile.clone(),
        state_len: json.len() as u64,
        memory,
        created,
    };
    write_header(file, &header)?;
    Ok(header)
}

/// A snapshot checked against the profile it must match, its state parsed.
pub struct Snapshot {
    pub header: Header,
    pub state: MachineState,
    /// The file, for the copy-on-write mapping of guest memory.
    pub file: File,
}

impl Snapshot {
    /// Open a snapshot for `expected_profile` ([`Profile::hash`]): refused
    /// when it is not one, is from another format or kiln version, or was
    /// taken for another profile; damaged when its ranges do not fit the
    /// file.
    pub fn open(file: File, expected_profile: &str) -> Result<Snapshot, SnapshotError> {
        let header = Snapshot::check(&file, expected_profile)?;
        let mut json = vec![0u8; header.state_len as usize];
        file.read_exact_at(&mut json, HEADER_AREA)
            .map_err(io("read the machine state"))?;
        let state: MachineState = serde_json::from_slice(&json)
            .map_err(|e| SnapshotError::Corrupt(format!("machine state: {e}")))?;
        Ok(Snapshot {
            header,
            state,
            file,
        })
    }

    /// What [`Snapshot::open`] checks before it reads the machine state
    /// (which the VMM that restores it reads and checks): the header, its
    /// version and profile, and that its ranges fit the file.
    pub fn check(file: &File, expected_profile: &str) -> Result<Header, SnapshotError> {
        let (_, header) = read_header(file)?;
        if header.kiln_version != KILN_VERSION {
            return Err(SnapshotError::KilnVersion {
                found: header.kiln_version,
                expected: KILN_VERSION.into(),
            });
        }
        if header.profile_hash != expected_profile || header.profile.hash() != expected_profile {
            return Err(SnapshotError::Profile {
                found: header.profile_hash,
                expected: expected_profile.into(),
            });
        }
        let file_len = file
            .metadata()
            .map_err(io("read the snapshot's size"))?
            .len();
        if header.state_len == 0 || header.state_len > MAX_STATE_BYTES {
            return Err(SnapshotError::Corrupt(format!(
                "machine state of {} bytes",
                header.state_len
            )));
        }
        let state_end = HEADER_AREA + header.state_len;
        let mut at = state_end;
        for r in &header.memory {
            let end = r.file_offset.checked_add(r.len);
            if r.file_offset % PAGE != 0
                || r.len % PAGE != 0
                || r.len == 0
                || r.file_offset < at
                || end.is_none_or(|e| e > file_len)
            {
                return Err(SnapshotError::Corrupt(format!(
                    "memory range {r:?} does not fit a file of {file_len} bytes"
                )));
            }
            at = r.file_offset + r.len;
        }
        if state_end > file_len {
            return Err(SnapshotError::Corrupt("file ends inside the state".into()));
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        let profile = Profile {
            kernel_sha256: "k".into(),
            initramfs_sha256: "i".into(),
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 16,
            devices: vec![],
        };
        Header {
            kiln_version: KILN_VERSION.into(),
            profile_hash: profile.hash(),
            profile,
            state_len: 2,
            memory: vec![],
            created: 0,
        }
    }

    #[test]
    fn the_header_round_trips_and_bad_ones_are_typed_errors() {
        let f = tempfile::tempfile().unwrap();
        assert!(matches!(read_header(&f), Err(SnapshotError::NotASnapshot)));
        let h = header();
        write_header(&f, &h).unwrap();
        assert_eq!(read_header(&f).unwrap(), (FORMAT_VERSION, h.clone()));

        // Another format is refused before its header is parsed.
        f.write_all_at(&99u32.to_le_bytes(), 8).unwrap();
        assert!(matches!(
            read_header(&f),
            Err(SnapshotError::Format { found: 99, .. })
        ));
        // A header length past its area.
        write_header(&f, &h).unwrap();
        f.write_all_at(&u32::MAX.to_le_bytes(), 12).unwrap();
        assert!(matches!(read_header(&f), Err(SnapshotError::Corrupt(_))));
        f.write_all_at(b"NOTASNAP", 0).unwrap();
        assert!(matches!(read_header(&f), Err(SnapshotError::NotASnapshot)));
    }

    #[test]
    fn open_refuses_other_versions_profiles_and_ranges_outside_the_file() {
        let f = tempfile::tempfile().unwrap();
        let mut h = header();
        let good = h.profile_hash.clone();
        f.write_all_at(b"{}", HEADER_AREA).unwrap();
        h.kiln_version = "0.0.0-other".into();
        write_header(&f, &h).unwrap();
        match Snapshot::open(f.try_clone().unwrap(), &good) {
            Err(SnapshotError::KilnVersion { found, .. }) => assert_eq!(found, "0.0.0-other"),
            other => panic!("{:?}", other.err()),
        }
        h.kiln_version = KILN_VERSION.into();
        write_header(&f, &h).unwrap();
        assert!(matches!(
            Snapshot::open(f.try_clone().unwrap(), "another"),
            Err(SnapshotError::Profile { .. })
        ));
        // The header's hash must be its profile's.
        let mut forged = h.clone();
        forged.profile_hash = "forged".into();
        write_header(&f, &forged).unwrap();
        assert!(matches!(
            Snapshot::open(f.try_clone().unwrap(), "forged"),
            Err(SnapshotError::Profile { .. })
        ));
        h.memory = vec![MemoryRange {
            guest_addr: 0,
            len: 1 << 30,
            file_offset: 8192,
        }];
        write_header(&f, &h).unwrap();
        assert!(matches!(
            Snapshot::open(f.try_clone().unwrap(), &good),
            Err(SnapshotError::Corrupt(_))
        ));
        h.state_len = MAX_STATE_BYTES + 1;
        h.memory.clear();
        write_header(&f, &h).unwrap();
        assert!(matches!(
            Snapshot::open(f, &good),
            Err(SnapshotError::Corrupt(_))
        ));
    }
}
