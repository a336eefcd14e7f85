//! Parsing of layer entry paths and whiteout names.

/// The prefix of whiteout names.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The name of an opaque whiteout.
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
/// The prefix of AUFS metadata names (`.wh..wh.plnk`, `.wh..wh.aufs`), which
/// layers made by old Docker versions may still carry.
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";

/// A path inside the root, as a list of plain components: no empty, `.` or
/// `..` components, no `/` and no NUL bytes in any of them. The empty list is
/// the root itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LayerPath {
    comps: Vec<Vec<u8>>,
}

impl LayerPath {
    /// Parses a path from a tar entry. A leading `/` is dropped (absolute
    /// paths are taken relative to the root); `..` anywhere is refused, as it
    /// has no meaning in a changeset and only serves escapes.
    pub(super) fn parse(raw: &[u8]) -> Result<LayerPath, &'static str> {
        let mut comps = Vec::new();
        for comp in raw.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => return Err("it has a `..` component"),
                _ if comp.contains(&0) => return Err("it contains a NUL byte"),
                _ => comps.push(comp.to_vec()),
            }
        }
        Ok(LayerPath { comps })
    }

    /// All components but the last (empty for the root and its children).
    pub(super) fn parent(&self) -> &[Vec<u8>] {
        match self.comps.split_last() {
            Some((_, parent)) => parent,
            None => &[],
        }
    }

    /// The last component; `None` for the root.
    pub(super) fn name(&self) -> Option<&[u8]> {
        self.comps.last().map(Vec::as_slice)
    }

    /// The components.
    pub(super) fn components(&self) -> &[Vec<u8>] {
        &self.comps
    }

    /// The path with this one's parent and `name` as its last component.
    pub(super) fn sibling(&self, name: &[u8]) -> LayerPath {
        let mut comps = self.parent().to_vec();
        comps.push(name.to_vec());
        LayerPath { comps }
    }

    /// The canonical spelling, `a/b/c` (empty for the root), used as a key.
    pub(super) fn key(&self) -> Vec<u8> {
        self.comps.join(&b'/')
    }
}

/// What an entry is, judged by its name.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum EntryKind {
    /// An ordinary entry.
    Normal,
    /// `.wh.NAME`: delete the lower `NAME` next to it.
    Whiteout(Vec<u8>),
    /// `.wh..wh..opq`: hide all lower children of the parent directory.
    Opaque,
    /// AUFS metadata (`.wh..wh.*` other than the opaque marker, or anything
    /// below such a directory): not part of the filesystem, skipped.
    AufsMeta,
}

/// Classifies a parsed path by its whiteout markers.
pub(super) fn classify(path: &LayerPath) -> Result<EntryKind, &'static str> {
    let Some((name, parents)) = path.components().split_last() else {
        return Ok(EntryKind::Normal);
    };
    for parent in parents {
        if parent.starts_with(AUFS_META_PREFIX) {
            return Ok(EntryKind::AufsMeta);
        }
        if parent.starts_with(WHITEOUT_PREFIX) {
            return Err("a whiteout name is used as a directory");
        }
    }
    if name.as_slice() == OPAQUE_WHITEOUT {
        return Ok(EntryKind::Opaque);
    }
    if name.starts_with(AUFS_META_PREFIX) {
        return Ok(EntryKind::AufsMeta);
    }
    match name.strip_prefix(WHITEOUT_PREFIX) {
        None => Ok(EntryKind::Normal),
        Some(b"") => Err("a bare `.wh.` whiteout is invalid"),
        Some(b"." | b"..") => Err("a whiteout may not name `.` or `..`"),
        Some(target) => Ok(EntryKind::Whiteout(target.to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps(raw: &str) -> Vec<String> {
        LayerPath::parse(raw.as_bytes())
            .unwrap()
            .components()
            .iter()
            .map(|c| String::from_utf8(c.clone()).unwrap())
            .collect()
    }

    #[test]
    fn parse_normalises() {
        assert_eq!(comps("./etc//passwd"), ["etc", "passwd"]);
        assert_eq!(comps("/abs/path/"), ["abs", "path"]);
        assert_eq!(comps("a/./b"), ["a", "b"]);
        assert!(LayerPath::parse(b"./").unwrap().name().is_none());
        assert!(LayerPath::parse(b"/").unwrap().name().is_none());
        assert!(LayerPath::parse(b"").unwrap().name().is_none());
        let p = LayerPath::parse(b"a/b/c").unwrap();
        assert_eq!(p.key(), b"a/b/c");
        assert_eq!(p.parent(), [b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(p.name(), Some(&b"c"[..]));
        assert_eq!(p.sibling(b"d").key(), b"a/b/d");
    }

    #[test]
    fn parse_refuses_dotdot_and_nul() {
        assert!(LayerPath::parse(b"../x").is_err());
        assert!(LayerPath::parse(b"a/../../x").is_err());
        assert!(LayerPath::parse(b"a/..").is_err());
        assert!(LayerPath::parse(b"a\0b").is_err());
        // `...` is an ordinary name.
        assert_eq!(comps("a/..."), ["a", "..."]);
    }

    #[test]
    fn classify_whiteouts() {
        let kind = |raw: &str| classify(&LayerPath::parse(raw.as_bytes()).unwrap());
        assert_eq!(kind("a/b"), Ok(EntryKind::Normal));
        assert_eq!(kind("./"), Ok(EntryKind::Normal));
        assert_eq!(kind("a/.wh.b"), Ok(EntryKind::Whiteout(b"b".to_vec())));
        assert_eq!(kind(".wh.b"), Ok(EntryKind::Whiteout(b"b".to_vec())));
        assert_eq!(kind("a/.wh..wh..opq"), Ok(EntryKind::Opaque));
        assert_eq!(kind(".wh..wh.plnk/123.456"), Ok(EntryKind::AufsMeta));
        assert_eq!(kind(".wh..wh.aufs"), Ok(EntryKind::AufsMeta));
        assert!(kind("a/.wh.").is_err());
        assert!(kind("a/.wh..").is_err());
        assert!(kind("a/.wh.x/y").is_err());
        // Only the prefix counts.
        assert_eq!(kind("a/x.wh.b"), Ok(EntryKind::Normal));
    }
}
