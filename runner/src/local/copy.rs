//! Copying files without ever following a symbolic link: the checkout
//! into a staged workspace, artifacts out of the guest's view and back into
//! later jobs' workspaces.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Create the directories of `rel` below `root`, one by one; an existing
/// one must be a real directory (never a link: nothing is written through
/// one).
pub(super) fn make_dirs(root: &Path, rel: &Path) -> Result<()> {
    let mut path = root.to_path_buf();
    for c in rel.components() {
        path.push(c);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                    bail!(
                        "{} is not a directory (a file or a symbolic link is in the way)",
                        path.display()
                    );
                }
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
    Ok(())
}

/// Copy the regular file `src` to `to`, which must not exist. `src` is
/// opened read-only and not through a final symbolic link; `to` is created
/// new, never through a link.
pub(super) fn copy_file_new(src: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut from = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(src)
        .with_context(|| format!("opening {}", src.display()))?;
    let meta = from
        .metadata()
        .with_context(|| format!("reading {}", src.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", src.display());
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
        .with_context(|| format!("creating {}", to.display()))?;
    std::io::copy(&mut from, &mut out).with_context(|| format!("copying {}", src.display()))?;
    out.set_permissions(std::fs::Permissions::from_mode(
        meta.permissions().mode() & 0o777,
    ))
    .with_context(|| format!("setting the mode of {}", to.display()))?;
    Ok(())
}

/// Every file below `root` (relative paths), `.git` left out; links are
/// listed, never followed.
pub(super) fn walk(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel))? {
            let e = e?;
            let name = e.file_name();
            if name == ".git" {
                continue;
            }
            let r = rel.join(&name);
            // DirEntry::file_type does not follow links: a link to a
            // directory is listed (and staged) as a link.
            if e.file_type()?.is_dir() {
                stack.push(r);
            } else {
                out.push(r);
            }
        }
    }
    Ok(out)
}
