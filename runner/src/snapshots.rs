//! kiln's snapshot cache: `<cache>/snapshots/<profile hash>.snap`, one VM
//! snapshot per profile (`kiln_vmm::kvm::snapshot::Profile`: kernel and
//! initramfs digests, command line, vCPUs, memory, devices; the agent is in
//! the initramfs). A new kernel, initramfs, agent or profile is a new hash,
//! so its snapshot is taken anew; one from another kiln version is removed
//! when it is looked up (and listed as stale). `kiln snapshot ls|rm` and
//! `kiln doctor` show them.
//!
//! The executor takes and restores them (`executor/snapshot.rs`; the
//! "Snapshots" section of docs/architecture.md).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_vmm::kvm::snapshot::{self, Header, Profile, Snapshot, SnapshotError, KILN_VERSION};

const SUFFIX: &str = ".snap";
/// File digests [`SnapshotCache::file_digest`] remembers.
const DIGESTS: &str = "digests.json";
/// At most this many remembered digests (then they start over).
const MAX_DIGESTS: usize = 64;
/// Files modified more recently than this are hashed every time.
const RACY: std::time::Duration = std::time::Duration::from_secs(3);
/// A digest store larger than this is ignored.
const MAX_DIGESTS_BYTES: u64 = 64 * 1024;

fn read_digests(path: &Path) -> BTreeMap<String, String> {
    let Ok(f) = File::open(path) else {
        return BTreeMap::new();
    };
    let mut bytes = Vec::new();
    use std::io::Read;
    if f.take(MAX_DIGESTS_BYTES + 1)
        .read_to_end(&mut bytes)
        .is_err()
        || bytes.len() as u64 > MAX_DIGESTS_BYTES
    {
        return BTreeMap::new();
    }
    serde_json::from_slice(&bytes).unwrap_or_default()
}

/// Write the digest store whole and rename it into place.
fn write_digests(dir: &Path, d: &BTreeMap<String, String>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".digests.{}.tmp", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(d).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, dir.join(DIGESTS))
}

/// What a file in the cache is.
#[derive(Debug)]
pub enum EntryState {
    /// A snapshot this kiln can restore (for the profile it names).
    Usable(Box<Header>),
    /// A snapshot from another kiln version or format: never used, removed
    /// when looked up.
    Stale(String),
    /// Not a snapshot, cut short, or its name does not match its profile.
    Damaged(String),
}

#[derive(Debug)]
pub struct Entry {
    pub path: PathBuf,
    /// The profile hash its name says.
    pub name: String,
    /// Bytes on disk (guest memory is sparse).
    pub disk_bytes: u64,
    pub state: EntryState,
}

/// The snapshot directory of one cache.
#[derive(Debug, Clone)]
pub struct SnapshotCache {
    dir: PathBuf,
}

fn classify(path: &Path, name: &str) -> EntryState {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return EntryState::Damaged(format!("cannot open: {e}")),
    };
    match snapshot::read_header(&file) {
        Ok((_, h)) if h.kiln_version != KILN_VERSION => {
            EntryState::Stale(format!("taken by kiln {}", h.kiln_version))
        }
        Ok((_, h)) if h.profile_hash != name || h.profile.hash() != name => {
            EntryState::Damaged("its profile does not match its name".into())
        }
        Ok((_, h)) => EntryState::Usable(Box::new(h)),
        Err(e @ SnapshotError::Format { .. }) => EntryState::Stale(e.to_string()),
        Err(e) => EntryState::Damaged(e.to_string()),
    }
}

impl SnapshotCache {
    /// The snapshots of the cache at `cache_root` (created when first
    /// written).
    pub fn new(cache_root: &Path) -> SnapshotCache {
        SnapshotCache {
            dir: cache_root.join("snapshots"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the snapshot for `profile` is (or would be).
    pub fn path_for(&self, profile: &Profile) -> PathBuf {
        self.dir.join(format!("{}{SUFFIX}", profile.hash()))
    }

    /// The header of the snapshot for `profile`, checked, if one is cached
    /// and this kiln can use it; one it cannot use is removed (the caller
    /// cold boots, and may take a new one). The machine state is read and
    /// checked by whoever restores it.
    pub fn lookup(&self, profile: &Profile) -> Option<Header> {
        self.lookup_or_refusal(profile).ok()
    }

    /// [`SnapshotCache::lookup`], saying why there is none: `Err(None)`
    /// when none is cached, `Err(Some(why))` when the cached one was
    /// refused (and removed).
    pub fn lookup_or_refusal(&self, profile: &Profile) -> Result<Header, Option<String>> {
        let path = self.path_for(profile);
        let file = File::open(&path).map_err(|_| None)?;
        match Snapshot::check(&file, &profile.hash()) {
            Ok(s) => Ok(s),
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    "cached snapshot refused and removed (a new one is taken): {e}"
                );
                let _ = std::fs::remove_file(&path);
                Err(Some(e.to_string()))
            }
        }
    }

    /// Where to write a new snapshot for `profile` before
    /// [`SnapshotCache::publish`] (in the cache directory, so the rename is
    /// atomic; a name no lookup or listing takes).
    pub fn staging(&self, profile: &Profile) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        Ok(self
            .dir
            .join(format!(".{}.{}.tmp", profile.hash(), std::process::id())))
    }

    /// Make a written snapshot the cached one for `profile`: synced, then
    /// renamed into place (a crash leaves the old one or none, never half).
    pub fn publish(&self, staged: &Path, profile: &Profile) -> std::io::Result<PathBuf> {
        File::open(staged)?.sync_all()?;
        let path = self.path_for(profile);
        std::fs::rename(staged, &path)?;
        Ok(path)
    }

    /// SHA-256 (hex) of the file at `path` (a kernel, an initramfs: what a
    /// [`Profile`] names), remembered by the file's identity (device,
    /// inode, size, modification and change times: a file replaced or
    /// written since has another) in this process and in
    /// `<cache>/snapshots/digests.json`, so that a job does not hash tens
    /// of MiB of kernel before it can look its snapshot up.
    pub fn file_digest(&self, path: &Path) -> std::io::Result<String> {
        use std::os::unix::fs::MetadataExt;
        static SEEN: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
        let file = File::open(path)?;
        let m = file.metadata()?;
        let key = format!(
            "{}:{}:{}:{}.{}:{}.{}:{}",
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            path.display()
        );
        // A file modified in the last seconds may be modified again within
        // the file system's timestamp granularity, size unchanged: hashed
        // every time until it is older (git's "racy" entries).
        let settled = m
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > RACY);
        if !settled {
            return snapshot::sha256_of(&file);
        }
        let seen = |k: &str| SEEN.lock().ok().and_then(|s| s.get(k).cloned());
        if let Some(d) = seen(&key) {
            return Ok(d);
        }
        let store = self.dir.join(DIGESTS);
        let mut stored = read_digests(&store);
        let digest = match stored.get(&key) {
            Some(d) if d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) => d.clone(),
            _ => {
                let d = snapshot::sha256_of(&file)?;
                if stored.len() >= MAX_DIGESTS {
                    stored.clear();
                }
                stored.insert(key.clone(), d.clone());
                // Only a cache: a failed write costs a hash next time.
                if let Err(e) = write_digests(&self.dir, &stored) {
                    tracing::debug!("remembering file digests in {}: {e}", store.display());
                }
                d
            }
        };
        if let Ok(mut s) = SEEN.lock() {
            s.insert(key, digest.clone());
        }
        Ok(digest)
    }

    /// Every snapshot file, by name.
    pub fn list(&self) -> Vec<Entry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<Entry> = rd
            .flatten()
            .filter_map(|e| {
                let file_name = e.file_name().to_string_lossy().to_string();
                let name = file_name.strip_suffix(SUFFIX)?.to_string();
                if name.starts_with('.') {
                    return None;
                }
                let path = e.path();
                let disk_bytes = std::fs::symlink_metadata(&path)
                    .map(|m| {
                        use std::os::unix::fs::MetadataExt;
                        m.blocks() * 512
                    })
                    .unwrap_or(0);
                let state = classify(&path, &name);
                Some(Entry {
                    path,
                    name,
                    disk_bytes,
                    state,
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Remove the snapshots whose name starts with `prefix` (`None`: all,
    /// staging files of dead writers included). Returns how many went.
    pub fn remove(&self, prefix: Option<&str>) -> std::io::Result<usize> {
        let mut n = 0;
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Ok(0);
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let matches = match prefix {
                None => name.ends_with(SUFFIX) || name.ends_with(".tmp"),
                Some(p) => name.ends_with(SUFFIX) && name.starts_with(p),
            };
            if matches {
                std::fs::remove_file(e.path())?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn profile(memory_mib: u32) -> Profile {
        Profile {
            kernel_sha256: "k".repeat(64),
            initramfs_sha256: "i".repeat(64),
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            memory_mib,
            devices: vec!["rng".into()],
        }
    }

    /// A snapshot file with a real header and a machine state of no vCPUs
    /// or devices (what the cache reads; no VM is restored from it).
    fn fake(cache: &SnapshotCache, p: &Profile, kiln_version: &str) -> PathBuf {
        use kiln_vmm::kvm::snapshot::state::{MachineState, VmState};
        std::fs::create_dir_all(cache.dir()).unwrap();
        let path = cache.path_for(p);
        let f = File::create(&path).unwrap();
        let state = serde_json::to_vec(&MachineState {
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![],
            pio: vec![],
            virtio: vec![],
        })
        .unwrap();
        f.write_all_at(&state, snapshot::file::HEADER_AREA).unwrap();
        let header = Header {
            kiln_version: kiln_version.into(),
            profile_hash: p.hash(),
            profile: p.clone(),
            state_len: state.len() as u64,
            memory: vec![],
            created: 0,
        };
        snapshot::write_header(&f, &header).unwrap();
        path
    }

    #[test]
    fn lists_usable_stale_and_damaged_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path());
        assert!(cache.list().is_empty(), "no directory yet");
        fake(&cache, &profile(64), KILN_VERSION);
        fake(&cache, &profile(128), "0.0.0-old");
        std::fs::write(cache.dir().join("junk.snap"), b"not a snapshot").unwrap();
        // A snapshot under another profile's name.
        let moved = fake(&cache, &profile(256), KILN_VERSION);
        std::fs::rename(&moved, cache.dir().join(format!("{}.snap", "f".repeat(64)))).unwrap();
        // Staging files are not listed.
        std::fs::write(cache.staging(&profile(64)).unwrap(), b"half").unwrap();

        let list = cache.list();
        assert_eq!(list.len(), 4, "{list:?}");
        let state = |p: &Profile| {
            &list
                .iter()
                .find(|e| e.name == p.hash())
                .unwrap_or_else(|| panic!("{list:?}"))
                .state
        };
        assert!(matches!(state(&profile(64)), EntryState::Usable(h) if h.profile.memory_mib == 64));
        assert!(
            matches!(state(&profile(128)), EntryState::Stale(why) if why.contains("0.0.0-old"))
        );
        let damaged = list
            .iter()
            .filter(|e| matches!(e.state, EntryState::Damaged(_)))
            .count();
        assert_eq!(damaged, 2, "{list:?}");

        assert_eq!(cache.remove(Some(&profile(128).hash()[..12])).unwrap(), 1);
        assert_eq!(cache.list().len(), 3);
        assert_eq!(
            cache.remove(None).unwrap(),
            4,
            "three snapshots and the staging file"
        );
        assert!(cache.list().is_empty());
    }

    #[test]
    fn lookup_finds_only_its_profile_and_removes_what_it_cannot_use() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path());
        assert!(cache.lookup(&profile(64)).is_none());
        fake(&cache, &profile(64), KILN_VERSION);
        assert!(cache.lookup(&profile(64)).is_some());
        // Another profile (say, a new kernel) has no snapshot yet.
        assert!(cache.lookup(&profile(65)).is_none());
        let old = fake(&cache, &profile(128), "0.0.0-old");
        match cache.lookup_or_refusal(&profile(128)) {
            Err(Some(why)) => assert!(why.contains("kiln 0.0.0-old"), "{why}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        assert!(!old.exists(), "a snapshot of another kiln is removed");
        assert!(matches!(cache.lookup_or_refusal(&profile(128)), Err(None)));
    }

    #[test]
    fn file_digests_are_remembered_until_the_file_changes() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(&dir.path().join("cache"));
        let f = dir.path().join("vmlinux");
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let age = |f: &Path| {
            let w = File::options().write(true).open(f).unwrap();
            w.set_modified(hour_ago).unwrap();
        };
        std::fs::write(&f, b"kernel one").unwrap();
        // Just written: hashed, not remembered (it may change again within
        // the timestamps' granularity).
        let one = cache.file_digest(&f).unwrap();
        assert_eq!(one, hex::encode(sha2::Sha256::digest(b"kernel one")));
        assert!(!cache.dir().join(DIGESTS).exists());
        age(&f);
        assert_eq!(cache.file_digest(&f).unwrap(), one);
        let stored = std::fs::read_to_string(cache.dir().join(DIGESTS)).unwrap();
        assert!(stored.contains(&one), "{stored}");
        // Same size, written again: another identity, hashed again.
        std::fs::write(&f, b"kernel two").unwrap();
        let two = cache.file_digest(&f).unwrap();
        assert_eq!(two, hex::encode(sha2::Sha256::digest(b"kernel two")));
        // A damaged store is only a miss.
        std::fs::write(cache.dir().join(DIGESTS), b"{not json").unwrap();
        std::fs::write(&f, b"kernel 3").unwrap();
        age(&f);
        assert_eq!(
            cache.file_digest(&f).unwrap(),
            hex::encode(sha2::Sha256::digest(b"kernel 3"))
        );
        assert_eq!(cache.list().len(), 0, "the store is not a snapshot");
    }

    #[test]
    fn publish_moves_a_staged_snapshot_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let cache = SnapshotCache::new(dir.path());
        let p = profile(64);
        let staged = cache.staging(&p).unwrap();
        let written = fake(&cache, &p, KILN_VERSION);
        std::fs::rename(&written, &staged).unwrap();
        assert!(cache.lookup(&p).is_none());
        let path = cache.publish(&staged, &p).unwrap();
        assert_eq!(path, cache.path_for(&p));
        assert!(!staged.exists());
        assert!(cache.lookup(&p).is_some());
    }
}
