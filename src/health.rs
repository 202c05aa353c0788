//! Consecutive rise/fall thresholds: the one rule behind the proxy's active health checks
//! (`proxy.health.rise` / `fall`) and the supervisor's liveness probes
//! (`supervisor.probe_threshold`). A target goes down after `fall` failed checks in a row and
//! comes back up after `rise` passing ones in a row, so one lost probe neither ejects a worker
//! nor does one lucky answer bring a failing one back.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};

/// Counts of consecutive passing and failing checks, and the state they lead to. Atomic, so a
/// serving thread may [`restart_passes`](Self::restart_passes) while the checker records.
#[derive(Debug)]
pub struct Consecutive {
    passes: AtomicU32,
    fails: AtomicU32,
    up: AtomicBool,
}

impl Consecutive {
    /// A fresh count, starting `up` or down.
    pub const fn new(up: bool) -> Self {
        Self {
            passes: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            up: AtomicBool::new(up),
        }
    }

    /// Records one check. Returns the new state when this check flipped it: `Some(true)` on the
    /// `rise`th pass in a row of a target that was down, `Some(false)` on the `fall`th failure in
    /// a row of one that was up.
    pub fn record(&self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.fails.store(0, Relaxed);
            let passes = self.passes.fetch_add(1, Relaxed).saturating_add(1);
            (passes >= rise && !self.up.swap(true, Relaxed)).then_some(true)
        } else {
            self.passes.store(0, Relaxed);
            let fails = self.fails.fetch_add(1, Relaxed).saturating_add(1);
            (fails >= fall && self.up.swap(false, Relaxed)).then_some(false)
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Passing checks in a row so far.
    pub fn passes(&self) -> u32 {
        self.passes.load(Relaxed)
    }

    /// Failed checks in a row so far.
    pub fn fails(&self) -> u32 {
        self.fails.load(Relaxed)
    }

    /// Counts passes from zero again: after a passive ejection the checker must see `rise`
    /// fresh passes before it may end the ejection early.
    pub fn restart_passes(&self) {
        self.passes.store(0, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goes_down_after_fall_failures_in_a_row_and_up_after_rise_passes() {
        let health = Consecutive::new(true);
        assert_eq!(health.record(false, 2, 3), None);
        assert_eq!(health.record(false, 2, 3), None);
        // A pass in between starts the failure count again.
        assert_eq!(health.record(true, 2, 3), None);
        assert_eq!(health.record(false, 2, 3), None);
        assert_eq!(health.record(false, 2, 3), None);
        assert_eq!(health.record(false, 2, 3), Some(false));
        assert!(!health.is_up());
        assert_eq!(health.fails(), 3);
        // Further failures flip nothing.
        assert_eq!(health.record(false, 2, 3), None);
        assert_eq!(health.record(true, 2, 3), None);
        assert_eq!(health.record(true, 2, 3), Some(true));
        assert!(health.is_up());
        assert_eq!(health.record(true, 2, 3), None);
    }

    #[test]
    fn restarted_passes_need_rise_again() {
        let health = Consecutive::new(false);
        assert_eq!(health.record(true, 2, 1), None);
        health.restart_passes();
        assert_eq!(health.record(true, 2, 1), None);
        assert_eq!(health.record(true, 2, 1), Some(true));
        assert_eq!(health.passes(), 2);
    }
}
