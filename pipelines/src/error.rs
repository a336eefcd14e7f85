//! Errors of the pipeline front ends. Every variant names the file; syntax
//! errors always carry a line and column, semantic errors carry them when the
//! offending key can be found in the source text.

use std::fmt;

use crate::limits::{short, short_n};

/// A 1-based position in a pipeline file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

fn at(location: &Option<Location>) -> String {
    match location {
        Some(l) => format!(":{l}"),
        None => String::new(),
    }
}

/// Every variant's message is bounded: text that came from the file (names,
/// keys, values, paths) is shortened and its control characters escaped, so
/// an error is always a short line whatever the file holds.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is not valid YAML.
    #[error("{}:{location}: invalid YAML: {}", short_n(.file, FILE_CHARS), short_n(.message, MESSAGE_CHARS))]
    Syntax {
        file: String,
        location: Location,
        message: String,
    },
    /// The YAML is valid but does not describe a valid pipeline.
    /// `path` is the key path (`jobs.build.steps[2]`).
    #[error("{}{}: {}: {}", short_n(.file, FILE_CHARS), at(.location), short_n(.path, PATH_CHARS), short_n(.message, MESSAGE_CHARS))]
    Invalid {
        file: String,
        location: Option<Location>,
        path: String,
        message: String,
    },
    /// The file goes past one of the [`crate::Limits`]; `message` says
    /// which, and what the limit is.
    #[error("{}{}: {}", short_n(.file, FILE_CHARS), at(.location), short_n(.message, MESSAGE_CHARS))]
    Limit {
        file: String,
        location: Option<Location>,
        message: String,
    },
    /// An `include:` could not be read, or was refused (see `source`).
    #[error("{}{}: cannot read included file `{}`", short_n(.file, FILE_CHARS), at(.location), short_n(.include, FILE_CHARS))]
    Include {
        file: String,
        location: Option<Location>,
        include: String,
        #[source]
        source: std::io::Error,
    },
    /// Strict mode: the workflow uses steps kiln cannot run.
    #[error("{}: unsupported steps: {}", short_n(.file, FILE_CHARS), list(.steps))]
    Unsupported { file: String, steps: Vec<String> },
    /// A job name given by the caller does not exist.
    #[error("no job named `{}`", short(.name))]
    NoSuchJob { name: String },
}

/// Longest file name, key path and message in an error, in characters.
const FILE_CHARS: usize = 160;
const PATH_CHARS: usize = 160;
const MESSAGE_CHARS: usize = 400;

fn list(items: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s: Vec<String> = items
        .iter()
        .take(SHOWN)
        .map(|i| short_n(i, 120).into_owned())
        .collect();
    if items.len() > SHOWN {
        s.push(format!("and {} more", items.len() - SHOWN));
    }
    s.join("; ")
}

impl Error {
    /// The position the error points at, if known.
    pub fn location(&self) -> Option<Location> {
        match self {
            Error::Syntax { location, .. } => Some(*location),
            Error::Invalid { location, .. }
            | Error::Limit { location, .. }
            | Error::Include { location, .. } => *location,
            _ => None,
        }
    }

    /// The same error, reported as a limit that was reached (the path
    /// shortened into the message).
    pub(crate) fn into_limit(self) -> Error {
        match self {
            Error::Invalid {
                file,
                location,
                path,
                message,
            } => Error::Limit {
                file,
                location,
                message: format!("{}: {message}", short_n(&path, 120)),
            },
            other => other,
        }
    }
}

/// An error in a GitHub expression (`${{ }}`) or GitLab `rules: if`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expression `{}`: {}", short(.expr), short_n(.message, MESSAGE_CHARS))]
pub struct ExprError {
    pub expr: String,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
