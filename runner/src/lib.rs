//! kiln: the CLI, the executor (job -> VM lifecycle) and the providers.

pub mod agent;
pub mod checkout;
pub mod config;
pub mod executor;
pub mod gitlab;
pub mod local;
pub mod paths;
pub mod sink;

pub use executor::{Executor, ExecutorConfig, FailureReason, JobResult};
