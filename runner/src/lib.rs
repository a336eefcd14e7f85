//! kiln: the CLI, the executor (job -> VM lifecycle) and the providers.
