//! Errors of the pipeline front ends. Every variant names the file; syntax
//! errors always carry a line and column, semantic errors carry them when the
//! offending key can be found in the source text.

use std::fmt;

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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is not valid YAML.
    #[error("{file}:{location}: invalid YAML: {message}")]
    Syntax {
        file: String,
        location: Location,
        message: String,
    },
    /// The YAML is valid but does not describe a valid pipeline.
    /// `path` is the key path (`jobs.build.steps[2]`).
    #[error("{file}{}: {path}: {message}", at(.location))]
    Invalid {
        file: String,
        location: Option<Location>,
        path: String,
        message: String,
    },
    /// An `include:` could not be read.
    #[error("{file}: cannot read included file `{include}`")]
    Include {
        file: String,
        include: String,
        #[source]
        source: std::io::Error,
    },
    /// Strict mode: the workflow uses steps kiln cannot run.
    #[error("{file}: unsupported steps: {}", .steps.join("; "))]
    Unsupported { file: String, steps: Vec<String> },
    /// A job name given by the caller does not exist.
    #[error("no job named `{name}`")]
    NoSuchJob { name: String },
}

impl Error {
    /// The position the error points at, if known.
    pub fn location(&self) -> Option<Location> {
        match self {
            Error::Syntax { location, .. } => Some(*location),
            Error::Invalid { location, .. } => *location,
            _ => None,
        }
    }
}

/// An error in a GitHub expression (`${{ }}`) or GitLab `rules: if`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expression `{expr}`: {message}")]
pub struct ExprError {
    pub expr: String,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
