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

use std::fs::File;
use std::path::{Path, PathBuf};

use kiln_vmm::kvm::snapshot::{self, Header, Profile, Snapshot, SnapshotError, KILN_VERSION};

const SUFFIX: &str = ".snap";

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

    /// The snapshot for `profile`, checked and opened, if one is cached and
    /// this kiln can use it; one it cannot use is removed (the caller cold
    /// boots, and may take a new one).
    pub fn lookup(&self, profile: &Profile) -> Option<Snapshot> {
        let path = self.path_for(profile);
        let file = File::open(&path).ok()?;
        match Snapshot::open(file, &profile.hash()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::info!(path = %path.display(), "snapshot not usable, removed: {e}");
                let _ = std::fs::remove_file(&path);
                None
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
        assert!(cache.lookup(&profile(128)).is_none());
        assert!(!old.exists(), "a snapshot of another kiln is removed");
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
