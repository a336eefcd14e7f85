//! Why the agent (or a step's start) failed. Messages name what failed; the
//! cause is the `source`, and [`Error::render`] joins the chain into the one
//! line that goes to the host (`Fatal`, or the step's log) and `/dev/kmsg`.

use std::io;
use std::time::Duration;

use kiln_agent::proto::ProtoError;

use super::SCRIPT_DIR;
use crate::user::UserError;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("path with NUL byte: {0:?}")]
    NulByte(String),
    #[error("mount {src} on {target} ({fstype})")]
    Mount {
        src: String,
        target: String,
        fstype: String,
        source: io::Error,
    },
    #[error("open module {path}")]
    OpenModule { path: String, source: io::Error },
    #[error("load module {name}")]
    LoadModule { name: String, source: io::Error },
    #[error("{what} did not appear within {limit:?}")]
    NotFound { what: String, limit: Duration },
    #[error("open {path}")]
    OpenPort { path: String, source: io::Error },
    #[error("write to console port")]
    PortWrite(#[source] io::Error),
    #[error("read console port")]
    PortRead(#[source] io::Error),
    #[error(transparent)]
    Encode(ProtoError),
    #[error("from host")]
    FromHost(#[source] ProtoError),
    #[error("kiln.workdir '{0}' is not a clean absolute path")]
    BadWorkspace(String),
    #[error("mkdir {path}")]
    Mkdir { path: String, source: io::Error },
    #[error("chmod {path}")]
    Chmod { path: String, source: io::Error },
    #[error("image user")]
    User(#[source] UserError),
    #[error("working directory '{0}' is not absolute")]
    RelativeWorkdir(String),
    #[error("create working directory {dir}")]
    CreateWorkdir { dir: String, source: io::Error },
    /// Writing a step's script or file-command files: the job may have
    /// filled the tmpfs they live on, which the message then says.
    #[error("{what}: {error}{}", full_hint(.error))]
    StepFile { what: String, error: io::Error },
    #[error("step '{0}' has no command")]
    NoCommand(String),
    #[error("step working directory '{0}' contains '..'")]
    DotDotWorkdir(String),
    #[error("pipe")]
    Pipe(#[source] io::Error),
    #[error("fork")]
    Fork(#[source] io::Error),
    #[error("poll")]
    Poll(#[source] io::Error),
    #[error("artifacts")]
    Artifacts(#[source] io::Error),
    #[error("network: {0}")]
    Network(String),
    #[error("refused the host's Resume: {0}")]
    BadResume(String),
    #[error("could not {what} after a restore")]
    Identity {
        what: &'static str,
        source: io::Error,
    },
    #[error("network: could not {what} {iface}")]
    NetIoctl {
        what: String,
        iface: String,
        source: io::Error,
    },
}

fn full_hint(e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::StorageFull {
        format!(": the job filled {SCRIPT_DIR} (a tmpfs in the guest's memory)")
    } else {
        String::new()
    }
}

impl Error {
    /// The message and its causes on one line: `what: cause: cause`.
    pub fn render(&self) -> String {
        let mut line = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            line.push_str(": ");
            line.push_str(&c.to_string());
            cause = c.source();
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_joins_the_causes() {
        let e = Error::Mount {
            src: "/dev/vda".into(),
            target: "/lower".into(),
            fstype: "erofs".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(
            e.render(),
            format!(
                "mount /dev/vda on /lower (erofs): {}",
                io::Error::from_raw_os_error(libc::ENOENT)
            )
        );
        let full = Error::StepFile {
            what: "create /run/kiln/files-1".into(),
            error: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(full
            .render()
            .ends_with("the job filled /run/kiln (a tmpfs in the guest's memory)"));
        assert_eq!(
            full.render().matches("No space").count(),
            1,
            "{}",
            full.render()
        );
    }
}
