//! The proxy's coarse clock: milliseconds on one process-wide monotonic clock, so that
//! deadlines and "last moved" stamps fit in an atomic shared by every serving thread.

use std::{sync::OnceLock, time::Instant};

/// Milliseconds on a process-wide monotonic clock, so deadlines fit in an atomic.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Start at 1 so that 0 can mean "never".
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}
