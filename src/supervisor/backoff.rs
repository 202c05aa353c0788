//! How long to wait before starting a worker again: immediately the first time, then
//! exponentially longer while it keeps dying young, so a crash loop costs little CPU and log.

use std::time::Duration;

/// The restart delay policy of one worker slot (`supervisor.backoff_*`, `min_uptime`).
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Delay before the second restart of a crash loop (`backoff_initial`).
    initial: Duration,
    /// The cap (`backoff_max`).
    max: Duration,
    /// A process that lived this long was healthy: its death starts a fresh count.
    min_uptime: Duration,
    /// Restarts in a row of processes that died before `min_uptime`.
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, min_uptime: Duration) -> Self {
        Self {
            initial,
            max,
            min_uptime,
            failures: 0,
        }
    }

    /// The delay before restarting a process that ended after `uptime`, counting this restart.
    pub fn next_delay(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.min_uptime {
            self.failures = 0;
        }
        let delay = match self.failures {
            0 => Duration::ZERO,
            n => self
                .initial
                .saturating_mul(1u32 << (n - 1).min(20))
                .min(self.max),
        };
        self.failures = self.failures.saturating_add(1);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn first_restart_is_immediate_then_doubles_up_to_the_cap() {
        let mut backoff = Backoff::new(MS(500), MS(3000), MS(10_000));
        let delays: Vec<_> = (0..6).map(|_| backoff.next_delay(MS(100))).collect();
        assert_eq!(
            delays,
            [MS(0), MS(500), MS(1000), MS(2000), MS(3000), MS(3000)]
        );
    }

    #[test]
    fn a_process_that_stayed_up_min_uptime_resets_the_count() {
        let mut backoff = Backoff::new(MS(500), MS(30_000), MS(10_000));
        for _ in 0..4 {
            backoff.next_delay(MS(10));
        }
        assert_eq!(backoff.next_delay(MS(10_000)), MS(0));
        assert_eq!(backoff.next_delay(MS(10)), MS(500));
    }

    #[test]
    fn a_long_crash_loop_does_not_overflow() {
        let mut backoff = Backoff::new(MS(500), MS(30_000), MS(10_000));
        for _ in 0..100 {
            assert!(backoff.next_delay(MS(1)) <= MS(30_000));
        }
    }
}
