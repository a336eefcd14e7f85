//! kiln: the CLI, the executor (job -> VM lifecycle) and the providers.

pub mod agent;
pub mod checkout;
pub mod config;
pub mod daemon;
pub mod env;
pub mod executor;
pub mod github;
pub mod gitlab;
pub mod joblog;
pub mod local;
pub mod network;
pub mod paths;

pub use executor::{Executor, ExecutorConfig, FailureReason, JobResult};
