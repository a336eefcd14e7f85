//! kiln: the CLI, the executor (job -> VM lifecycle) and the providers.

pub mod agent;
pub mod cache;
pub mod checkout;
pub mod config;
pub mod daemon;
pub mod env;
pub mod executor;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod github;
pub mod gitlab;
pub mod joblog;
pub mod local;
pub mod network;
pub mod paths;
pub mod snapshots;

pub use executor::{Executor, ExecutorConfig, FailureReason, JobResult};
