//! `JobSpec`: the one job model every provider (local pipeline files, GitLab,
//! GitHub) feeds into the executor.
//!
//! This crate does no I/O beyond reading pipeline files.

mod spec;

pub use spec::{ArtifactSpec, ArtifactWhen, JobSource, JobSpec, Shell, Step, StepWhen, Variable};
