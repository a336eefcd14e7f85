//! Retrying GitLab calls: exponential backoff with jitter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Errors are retried after a growing, jittered delay up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A delay in [d/2, 3d/2): spreads retries of many runners apart.
pub fn jitter(d: Duration) -> Duration {
    static SEED: AtomicU64 = AtomicU64::new(0);
    let mut x = SEED.load(Ordering::Relaxed);
    if x == 0 {
        x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id());
    }
    // xorshift64
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    SEED.store(x | 1, Ordering::Relaxed);
    let frac = (x % 1000) as f64 / 1000.0;
    d.mul_f64(0.5 + frac)
}

/// Exponential backoff with jitter.
pub(super) struct Backoff(Duration);

impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff(Duration::from_secs(1))
    }
    pub(super) fn next(&mut self) -> Duration {
        let d = jitter(self.0);
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        d
    }
    pub(super) fn reset(&mut self) {
        self.0 = Duration::from_secs(1);
    }
}
