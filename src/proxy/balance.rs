//! Choosing an upstream for a request: round-robin or least-connections over the available
//! upstreams, in proportion to their weights (`weight=N`, and a slow start's ramp).
//!
//! With equal weights (the common case, and every upstream of `taskd serve`) round-robin is a
//! strict turn: with four upstreams, each gets every fourth request. With unequal ones, position
//! `i` of the turn is spread over the total weight by a Weyl sequence (`i × φ`, modulo 1), so
//! that an upstream of weight 3 gets three requests in four of a 3:1 pair, interleaved rather
//! than in runs — without a lock or any state but the one counter.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use super::{
    Shared,
    clock::now_ms,
    upstream::{Upstream, UpstreamState},
};
use crate::config::Strategy;

/// 2^64 / φ: consecutive multiples, modulo 2^64, are spread evenly over the whole range.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl Shared {
    /// The next upstream to try, among those not tried yet: round-robin or least-connections
    /// over the available ones, by weight; when none is available, any not draining
    /// (docs/contract.md §5: still try before a 503).
    pub(super) fn pick(&self, upstreams: &[Arc<Upstream>], tried: &[usize]) -> Option<usize> {
        let n = upstreams.len();
        if n == 0 {
            return None;
        }
        let now = now_ms();
        let start = self.next.fetch_add(1, Relaxed);
        let open = |i: usize| !tried.contains(&i) && upstreams[i].is_available(now);
        let weighted = upstreams
            .iter()
            .any(|u| u.weight() != upstreams[0].weight() || u.is_ramping(now));
        // The turn goes round the available upstreams only: an unavailable one's share is
        // spread over all the others instead of falling to its neighbour.
        let chosen = match (self.strategy(), weighted) {
            (Strategy::RoundRobin, false) => nth_of(n, start, open),
            (Strategy::RoundRobin, true) => by_weight(upstreams, now, start, open),
            (Strategy::LeastConn, _) => {
                // Fewest requests in flight per unit of weight; ties in turn.
                let load = |i: usize| {
                    (upstreams[i].in_flight() as u128 + 1) * 1_000_000
                        / u128::from(upstreams[i].effective_weight(now))
                };
                (0..n)
                    .filter(|&i| open(i))
                    .map(load)
                    .min()
                    .and_then(|least| nth_of(n, start, |i| open(i) && load(i) == least))
            }
        };
        chosen.or_else(|| (0..n).find(|&i| open(i))).or_else(|| {
            (0..n)
                .map(|i| (start + i) % n)
                .filter(|i| !tried.contains(i))
                .filter(|i| upstreams[*i].state(now) != UpstreamState::Draining)
                .min_by_key(|i| upstreams[*i].in_flight())
        })
    }
}

/// The `start`-th (modulo their number) of the indices below `n` that `keep` accepts; no
/// allocation.
fn nth_of(n: usize, start: usize, keep: impl Fn(usize) -> bool) -> Option<usize> {
    let count = (0..n).filter(|&i| keep(i)).count();
    if count == 0 {
        return None;
    }
    (0..n).filter(|&i| keep(i)).nth(start % count)
}

/// Position `start` of a weighted turn over the upstreams `keep` accepts: each gets a share of
/// positions in proportion to its effective weight.
fn by_weight(
    upstreams: &[Arc<Upstream>],
    now: u64,
    start: usize,
    keep: impl Fn(usize) -> bool,
) -> Option<usize> {
    let total: u64 = (0..upstreams.len())
        .filter(|&i| keep(i))
        .map(|i| upstreams[i].effective_weight(now))
        .sum();
    if total == 0 {
        return None;
    }
    let point = (start as u64).wrapping_mul(GOLDEN);
    let mut at = ((u128::from(point) * u128::from(total)) >> 64) as u64;
    (0..upstreams.len()).filter(|&i| keep(i)).find(|&i| {
        let weight = upstreams[i].effective_weight(now);
        if at < weight {
            true
        } else {
            at -= weight;
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proxy::upstream::{Joining, Origin};

    fn upstream(port: u16, weight: u32, slow_start: Duration) -> Arc<Upstream> {
        let joining = Joining {
            weight,
            origin: Origin::Config,
            healthy: true,
            slow_start,
        };
        Arc::new(Upstream::new(
            &format!("http://127.0.0.1:{port}"),
            joining,
            1,
        ))
    }

    #[test]
    fn weights_share_requests_in_proportion_and_interleaved() {
        let upstreams = [
            upstream(1, 3, Duration::ZERO),
            upstream(2, 1, Duration::ZERO),
        ];
        let now = now_ms();
        let picks: Vec<usize> = (0..4000)
            .map(|i| by_weight(&upstreams, now, i, |_| true).unwrap())
            .collect();
        let heavy = picks.iter().filter(|&&p| p == 0).count();
        assert!((2950..=3050).contains(&heavy), "{heavy} of 4000");
        // Never a long run of the light one's turns, nor of the heavy one's.
        let longest = |who: usize| {
            picks
                .split(|&p| p != who)
                .map(<[usize]>::len)
                .max()
                .unwrap()
        };
        assert!(longest(1) <= 2, "{:?}", &picks[..40]);
        assert!(longest(0) <= 8, "{:?}", &picks[..40]);
    }

    #[test]
    fn a_slow_start_begins_at_a_tenth_of_the_weight() {
        let fresh = upstream(1, 2, Duration::from_secs(10));
        let now = now_ms();
        let weight = fresh.effective_weight(now);
        assert!((200..=220).contains(&weight), "{weight}");
        assert!(fresh.is_ramping(now));
        assert_eq!(fresh.effective_weight(now + 5_000), 1100);
        assert_eq!(fresh.effective_weight(now + 10_000), 2000);
        assert!(!fresh.is_ramping(now + 10_000));
    }

    #[test]
    fn equal_weights_take_strict_turns() {
        let upstreams: Vec<_> = (1..=4).map(|p| upstream(p, 1, Duration::ZERO)).collect();
        let picks: Vec<usize> = (0..8)
            .map(|i| nth_of(upstreams.len(), i, |_| true).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 3, 0, 1, 2, 3]);
    }
}
