//! The node's token buckets, in memory: its share of each `scope: node` rate limit, and
//! `scope: global` ones when there is no shared store to keep them (a single node, or a
//! shared store that is down and a limit that fails open).
//!
//! A request passes all of its buckets or takes from none; a request refused later (by a
//! quota) gives its tokens back. The caller passes each bucket with the limit it runs now
//! (a share depends on the count of live nodes); a stored state made under another limit
//! is carried over by [`GcraState::rescaled`] at its next use.

use std::collections::HashMap;
use std::sync::Mutex;

use meter::gcra::{Gcra, GcraOutcome, GcraState};
use meter::quota::RateSlot;

/// Buckets by tenant and bucket key.
#[derive(Default)]
pub struct Buckets {
    states: Mutex<HashMap<(String, String), (Gcra, GcraState)>>,
}

/// The first bucket that refused, and when to retry (`None`: never fits the burst).
pub struct Refusal {
    /// The bucket's place among those given.
    pub index: usize,
    /// When to retry.
    pub retry_after: Option<std::time::Duration>,
}

impl Buckets {
    /// Takes `n` from every bucket, or from none. With `peek`, changes nothing.
    pub fn take(
        &self,
        tenant: &str,
        slots: &[RateSlot],
        now_ns: u64,
        n: u64,
        peek: bool,
    ) -> Result<(), Refusal> {
        if slots.is_empty() || n == 0 {
            return Ok(());
        }
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        for (index, slot) in slots.iter().enumerate() {
            let state = states
                .get(&(tenant.to_string(), slot.bucket.clone()))
                .map(|(g, s)| s.rescaled(g, &slot.gcra))
                .unwrap_or_default();
            match slot.gcra.peek(&state, now_ns, n) {
                GcraOutcome::Allowed { .. } => {}
                GcraOutcome::Denied { retry_after, .. } => {
                    return Err(Refusal {
                        index,
                        retry_after: Some(retry_after),
                    })
                }
                GcraOutcome::TooLarge => {
                    return Err(Refusal {
                        index,
                        retry_after: None,
                    })
                }
            }
        }
        if !peek {
            for slot in slots {
                let entry = states
                    .entry((tenant.to_string(), slot.bucket.clone()))
                    .or_insert((slot.gcra, GcraState::default()));
                entry.1 = entry.1.rescaled(&entry.0, &slot.gcra);
                entry.0 = slot.gcra;
                slot.gcra.take(&mut entry.1, now_ns, n);
            }
        }
        Ok(())
    }

    /// Gives back `n` taken earlier from every bucket.
    pub fn refund(&self, tenant: &str, slots: &[RateSlot], now_ns: u64, n: u64) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        for slot in slots {
            if let Some((gcra, state)) = states.get_mut(&(tenant.to_string(), slot.bucket.clone()))
            {
                *state = state.rescaled(gcra, &slot.gcra);
                *gcra = slot.gcra;
                slot.gcra.refund(state, now_ns, n);
            }
        }
    }

    /// Forgets buckets that are full again: a missing bucket behaves as a full one, so
    /// this changes no decision and bounds memory to the recently active buckets.
    pub fn prune(&self, now_ns: u64) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.retain(|_, (gcra, state)| {
            !matches!(
                gcra.peek(state, now_ns, gcra.burst()),
                GcraOutcome::Allowed { .. }
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meter::catalog::Scope;
    use meter::gcra::Gcra;
    use meter::window::Window;

    fn slot(rate: u64) -> RateSlot {
        RateSlot {
            window: Window::Second,
            bucket: "calls|second".into(),
            gcra: Gcra::new(rate, std::time::Duration::from_secs(1), rate).unwrap(),
            scope: Scope::Node,
            fail_open: false,
        }
    }

    fn share(rate: u64, nodes: usize) -> RateSlot {
        let mut s = slot(rate);
        s.gcra = s.gcra.per_node(nodes);
        s
    }

    #[test]
    fn a_share_follows_the_node_count() {
        let b = Buckets::default();
        let t0 = 10_000_000_000u64;
        // Alone, the node has the whole burst of 10.
        assert!(b.take("acme", &[share(10, 1)], t0, 10, false).is_ok());
        assert!(b.take("acme", &[share(10, 1)], t0, 1, false).is_err());
        // A second node joins: this one's share is 5 per second, bursting 5, and the
        // bucket it emptied is still empty, full again at the same instant as before.
        let half = [share(10, 2)];
        assert!(b.take("acme", &half, t0, 1, true).is_err());
        assert!(b.take("acme", &half, t0 + 999_999_999, 5, true).is_err());
        assert!(b.take("acme", &half, t0 + 1_000_000_000, 5, false).is_ok());
        let refused = b
            .take("acme", &half, t0 + 1_000_000_000, 1, false)
            .unwrap_err();
        assert_eq!(refused.index, 0);
        assert_eq!(
            refused.retry_after,
            Some(std::time::Duration::from_millis(200))
        );
        // Six units at once never fit a share of 5.
        let never = b
            .take("acme", &half, t0 + 9_000_000_000, 6, true)
            .unwrap_err();
        assert_eq!(never.retry_after, None);
    }

    #[test]
    fn a_lower_rate_keeps_the_bucket_in_time() {
        let b = Buckets::default();
        let day_ns = 86_400 * 1_000_000_000u64;
        let high = [slot(200)];
        // Empty the high bucket a day into the node's life.
        assert!(b.take("acme", &high, day_ns, 200, false).is_ok());
        // The limit drops to 100/s: one second later the bucket has refilled (100 units),
        // it is not locked out for a day as it would be if its state were misread.
        let low = [slot(100)];
        let later = day_ns + 1_000_000_000;
        assert!(b.take("acme", &low, later, 100, false).is_ok());
        assert!(b.take("acme", &low, later, 1, false).is_err());
    }
}
