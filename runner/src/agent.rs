//! Finding the guest agent binary (a static musl executable).

use std::path::{Path, PathBuf};

/// The command that builds the agent where kiln looks for it.
pub const BUILD_HINT: &str =
    "cargo build -p kiln-agent --target x86_64-unknown-linux-musl --profile agent";

/// Why no usable agent was found.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent binary (static, x86_64-unknown-linux-musl) was not found; build it with `{BUILD_HINT}` or set KILN_AGENT")]
    NotFound,
    #[error("cannot read the agent {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a static x86_64 ELF executable; build it with `{BUILD_HINT}`", path.display())]
    NotStatic { path: PathBuf },
}

/// `named` (the user's choice, e.g. `$KILN_AGENT` read at the edge) if it
/// is a static executable, else the cargo target directory's musl build,
/// else a static `kiln-agent` next to the kiln binary, else
/// `/usr/lib/kiln/kiln-agent`.
pub fn locate_agent(named: Option<&Path>) -> Result<PathBuf, AgentError> {
    if let Some(p) = named {
        return check(p).map(|()| p.to_path_buf());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            // target/{debug,release}/kiln -> target/x86_64-unknown-linux-musl/*/kiln-agent
            // (also from target/debug/deps for test binaries).
            for up in [dir.parent(), dir.parent().and_then(|d| d.parent())]
                .into_iter()
                .flatten()
            {
                for profile in ["agent", "release", "debug"] {
                    candidates.push(
                        up.join("x86_64-unknown-linux-musl")
                            .join(profile)
                            .join("kiln-agent"),
                    );
                }
            }
            candidates.push(dir.join("kiln-agent"));
        }
    }
    candidates.push("/usr/lib/kiln/kiln-agent".into());
    candidates
        .into_iter()
        .find(|p| check(p).is_ok())
        .ok_or(AgentError::NotFound)
}

/// The agent runs as PID 1 with nothing else in the initramfs: it must be a
/// static ELF (no program interpreter).
fn check(p: &Path) -> Result<(), AgentError> {
    let bytes = std::fs::read(p).map_err(|source| AgentError::Read {
        path: p.to_path_buf(),
        source,
    })?;
    if is_static_elf(&bytes) {
        Ok(())
    } else {
        Err(AgentError::NotStatic {
            path: p.to_path_buf(),
        })
    }
}

fn is_static_elf(elf: &[u8]) -> bool {
    let get = |o: usize, n: usize| elf.get(o..o.checked_add(n)?);
    let u16_at = |o| get(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at =
        |o| get(o, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize);
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) || u16_at(0x12) != Some(0x3e) {
        return false;
    }
    let (Some(phoff), Some(size), Some(n)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..n).all(|i| {
        let at = phoff.saturating_add(i.saturating_mul(size));
        get(at, 4).is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != 3)
        // PT_INTERP
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_executables_are_refused() {
        // The test binary itself is dynamically linked against glibc.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static_elf(&me));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(&me[..100]));
        let e = locate_agent(Some(&std::env::current_exe().unwrap())).unwrap_err();
        assert!(matches!(e, AgentError::NotStatic { .. }), "{e}");
    }
}
