//! The node's token buckets (rate limits with `scope: node`), in memory.
//!
//! A request passes all of its buckets or takes from none; a request refused later (by a
//! quota) gives its tokens back.

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
pub struct Refusal<'a> {
    /// The bucket.
    pub slot: &'a RateSlot,
    /// When to retry.
    pub retry_after: Option<std::time::Duration>,
}

impl Buckets {
    /// Takes `n` from every bucket, or from none. With `peek`, changes nothing.
    pub fn take<'a>(
        &self,
        tenant: &str,
        slots: &'a [RateSlot],
        now_ns: u64,
        n: u64,
        peek: bool,
    ) -> Result<(), Refusal<'a>> {
        if slots.is_empty() || n == 0 {
            return Ok(());
        }
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        for slot in slots {
            let state = states
                .get(&(tenant.to_string(), slot.bucket.clone()))
                .map(|(g, s)| s.rescaled(g, &slot.gcra))
                .unwrap_or_default();
            match slot.gcra.peek(&state, now_ns, n) {
                GcraOutcome::Allowed { .. } => {}
                GcraOutcome::Denied { retry_after, .. } => {
                    return Err(Refusal {
                        slot,
                        retry_after: Some(retry_after),
                    })
                }
                GcraOutcome::TooLarge => {
                    return Err(Refusal {
                        slot,
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
    use meter::gcra::Gcra;
    use meter::window::Window;

    fn slot(rate: u64) -> RateSlot {
        RateSlot {
            window: Window::Second,
            bucket: "calls|second".into(),
            gcra: Gcra::new(rate, std::time::Duration::from_secs(1), rate).unwrap(),
        }
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
