//! Shared pieces of the property tests that stand in for fuzzing on stable
//! (docs/fuzzing.md): the case count, and hostile inputs several crates
//! parse (tar streams: image layers, artifacts sent back by the guest).

use proptest::prelude::*;

/// A proptest configuration running `cases` cases, unless `PROPTEST_CASES`
/// says otherwise (`scripts/fuzz.sh` raises it). Failures are not saved
/// to `proptest-regressions/`: each one found becomes a named regression
/// test next to the parser instead.
pub fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c.failure_persistence = None;
    c
}
/// Path components a hostile archive would use, among them the names the
/// harnesses plant beside and inside their roots (`up` and `abs` are links
/// out, `outside`, `v` and `d` what they must not touch).
fn component() -> impl Strategy<Value = &'static str> {
    // Plain names more often than tricks, so that tricks land on trees the
    // earlier entries built.
    let plain = prop::sample::select(vec!["a", "b", "up", "abs", "outside", "v", "d", "etc"]);
    let tricky = prop::sample::select(vec![
        "..",
        ".",
        "",
        ".wh.a",
        ".wh.v",
        ".wh..wh..opq",
        "dev",
        "x\u{7f}",
    ]);
    prop_oneof![4 => plain, 1 => tricky]
}

fn path() -> impl Strategy<Value = String> {
    (any::<bool>(), prop::collection::vec(component(), 1..5)).prop_map(|(abs, c)| {
        let p = c.join("/");
        if abs {
            format!("/{p}")
        } else {
            p
        }
    })
}

/// One ustar entry with raw name and link bytes (the `tar` builder
/// refuses `..` and absolute paths, which is the point here).
pub fn tar_entry() -> impl Strategy<Value = Vec<u8>> {
    (
        path(),
        path(),
        prop::sample::select(vec![
            b'0', b'5', b'2', b'1', b'3', b'6', b'x', b'L', b'S', b'7',
        ]),
        prop::sample::select(vec![0o644u32, 0o755, 0o4755, 0o1777, 0o7777]),
        prop::collection::vec(any::<u8>(), 0..700),
    )
        .prop_map(|(name, link, ty, mode, data)| {
            let data = if ty == b'x' {
                // `LEN path=LINK\n`, LEN counting its own digits.
                let rec = format!(" path={link}\n");
                let mut n = rec.len() + 1;
                while n.to_string().len() + rec.len() != n {
                    n += 1;
                }
                format!("{n}{rec}").into_bytes()
            } else if ty == b'L' {
                let mut d = link.clone().into_bytes();
                d.push(0);
                d
            } else {
                data
            };
            // GNU extensions (long names, sparse files) need a GNU header.
            let mut h = if matches!(ty, b'L' | b'S') {
                tar::Header::new_gnu()
            } else {
                tar::Header::new_ustar()
            };
            let b = h.as_mut_bytes();
            let n = name.len().min(100);
            b[..n].copy_from_slice(&name.as_bytes()[..n]);
            let l = link.len().min(100);
            b[157..157 + l].copy_from_slice(&link.as_bytes()[..l]);
            h.set_entry_type(tar::EntryType::new(ty));
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            let size = if matches!(ty, b'0' | b'7' | b'x' | b'L' | b'S') {
                data.len() as u64
            } else {
                0
            };
            h.set_size(size);
            h.set_cksum();
            let mut out = h.as_bytes().to_vec();
            if size > 0 {
                out.extend_from_slice(&data);
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
            out
        })
}

/// A layer of hostile entries, sometimes damaged afterwards.
pub fn hostile_tar() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(tar_entry(), 0..12),
        prop::option::weighted(0.25, (any::<usize>(), any::<u8>())),
        any::<bool>(),
    )
        .prop_map(|(entries, flips, end)| {
            let mut t: Vec<u8> = entries.concat();
            if let Some((at, b)) = flips {
                if !t.is_empty() {
                    let i = at % t.len();
                    t[i] = b;
                }
            }
            if end {
                t.extend_from_slice(&[0; 1024]);
            }
            t
        })
}

/// JSON (and so YAML) documents whose object keys come from `keys` (the
/// names a parser looks for) and whose values are of any type, nested a
/// few levels: what a hostile server or file sends to get past the first
/// `serde` checks.
pub fn json(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1e308".to_string()),
        Just(
            "\"sha256:0000000000000000000000000000000000000000000000000000000000000000\""
                .to_string()
        ),
        Just("\"../../etc/passwd\"".to_string()),
        Just("\"${{ github.x }} $CI_JOB_TOKEN\"".to_string()),
        "\"[a-z0-9:/.*$ {}-]{0,16}\"",
        (0u64..5000).prop_map(|n| n.to_string()),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((prop::sample::select(keys), inner), 0..6).prop_map(|kv| {
                let fields: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", serde_quote(k)))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

fn serde_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A temporary directory with `root/` for the code under test to write
/// into, and beside it `outside/` (a file, a directory with a file) that
/// it must never touch; `root/up` links to `../outside` and `root/abs` to
/// its absolute path, so that hostile entries can try their way out through them.
pub struct Sandbox {
    tmp: std::path::PathBuf,
    before: Snapshot,
}

type Snapshot = std::collections::BTreeMap<String, (u32, u64, Vec<u8>)>;

impl Sandbox {
    /// Plant the tree under `tmp` (an empty directory).
    pub fn new(tmp: &std::path::Path) -> Sandbox {
        use std::fs;
        let root = tmp.join("root");
        let outside = tmp.join("outside");
        fs::create_dir_all(root.join("a")).expect("sandbox root");
        fs::create_dir_all(outside.join("d")).expect("sandbox outside");
        fs::write(outside.join("v"), b"victim").expect("sandbox file");
        fs::write(outside.join("d/v"), b"victim").expect("sandbox file");
        std::os::unix::fs::symlink("../outside", root.join("up")).expect("sandbox link");
        // Absolute, to the same place: a link to `/` would make a bug
        // write into the host's own tree, where no check would see it.
        std::os::unix::fs::symlink(&outside, root.join("abs")).expect("sandbox link");
        Sandbox {
            tmp: tmp.to_path_buf(),
            before: Self::outside_of(tmp),
        }
    }

    pub fn root(&self) -> std::path::PathBuf {
        self.tmp.join("root")
    }

    /// Panics if anything beside `root/` was created, changed or removed.
    pub fn check(&self) {
        assert_eq!(
            Self::outside_of(&self.tmp),
            self.before,
            "something outside the root was created, changed or removed"
        );
    }

    /// Everything under `tmp` but `root/`, without following links.
    fn outside_of(tmp: &std::path::Path) -> Snapshot {
        use std::os::unix::fs::MetadataExt;
        let mut out = Snapshot::new();
        let mut stack = vec![tmp.to_path_buf()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p == tmp.join("root") {
                    continue;
                }
                let Ok(m) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                let body = if m.file_type().is_symlink() {
                    std::fs::read_link(&p)
                        .map(|t| t.into_os_string().into_encoded_bytes())
                        .unwrap_or_default()
                } else if m.is_file() {
                    std::fs::read(&p).unwrap_or_default()
                } else {
                    Vec::new()
                };
                if m.is_dir() {
                    stack.push(p.clone());
                }
                out.insert(
                    p.to_string_lossy().into_owned(),
                    (m.mode(), m.nlink(), body),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_sees_a_write_outside_its_root() {
        let tmp = std::env::temp_dir().join(format!("kiln-sandbox-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let s = Sandbox::new(&tmp);
        std::fs::write(s.root().join("a/inside"), b"x").unwrap();
        s.check();
        std::fs::write(s.root().join("up/d/v"), b"changed").unwrap();
        let caught = std::panic::catch_unwind(|| s.check()).is_err();
        std::fs::remove_dir_all(&tmp).unwrap();
        assert!(caught, "a change through root/up went unnoticed");
    }
}
