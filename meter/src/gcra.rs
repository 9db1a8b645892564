//! The Generic Cell Rate Algorithm (GCRA) that enforces rate windows.
//!
//! This module owns the admission decision for rate limits ("`rate` units per
//! `period`, bursting up to `burst`"): whether a take of `n` units is allowed
//! at a given instant, how many units remain, and how long to wait. It is the
//! "virtual scheduling" form of GCRA, whose whole state is one number, the
//! theoretical arrival time (TAT).
//!
//! All arithmetic is exact integer arithmetic. The emission interval
//! `I = period / rate` is generally not a whole number of nanoseconds, so time
//! is measured in units of `1 / rate` nanoseconds (nanoseconds × `rate`,
//! held in a `u128`), in which `I` is exactly `period` in nanoseconds. That
//! makes the admitted total, from an empty bucket over an elapsed span `E`,
//! at most `burst + floor(rate × E / period)`, with no rounding drift.
//! Arithmetic that could overflow `u128` (only with absurd rates, bursts,
//! periods or clock values) saturates or fails closed: it never panics and
//! never admits more than the exact computation would.
//!
//! Two scopes build on it. With `scope: node` each of `n` live nodes runs
//! [`Gcra::per_node`], a share of the limit, so that the fleet together admits
//! at most `floor(rate × E / period) + n × ceil(burst / n)` over a span `E`
//! (derived there). With `scope: global` one bucket lives in a shared store
//! that computes in doubles; [`GLOBAL_EXACT_MAX`] is the range in which it is
//! still exact.

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The largest `burst × period` (in microseconds) and the largest `rate` of a bucket
/// kept in a shared store that computes in IEEE doubles (Redis Lua), whose integers are
/// exact below 2^53. Such a bucket keeps its debt in microseconds × rate, at most
/// `2 × burst × period` mid-computation, so 2^51 leaves a factor of two to spare:
/// a burst of 37,529,996 per minute, or 2,251,799,813 per second.
pub const GLOBAL_EXACT_MAX: u128 = 1 << 51;

/// A rate limit: `rate` units per `period`, bursting up to `burst` units at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    rate: u64,
    period: Duration,
    burst: u64,
    /// The emission interval in scaled units; equals the period in nanoseconds.
    interval: u128,
    /// The burst tolerance (`burst × interval`) in scaled units.
    tolerance: u128,
}

/// The state of one GCRA bucket. The default state is a full bucket.
///
/// The state is only meaningful together with the [`Gcra`] that produced it:
/// its unit of time depends on the rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcraState {
    /// Theoretical arrival time, in nanoseconds × rate.
    tat: u128,
}

impl GcraState {
    /// Rebuilds a state from the value returned by [`GcraState::to_raw`], for
    /// storage. Only valid with a [`Gcra`] of the same rate.
    pub fn from_raw(tat: u128) -> GcraState {
        GcraState { tat }
    }

    /// The theoretical arrival time in nanoseconds × rate, for storage.
    pub fn to_raw(self) -> u128 {
        self.tat
    }

    /// The same theoretical arrival time expressed for `to`, when a bucket's limit
    /// changes (a downgrade, an override that ends, another node count for a node
    /// share): without it the old units would be read with the new rate and the bucket
    /// would look empty for hours, or full. The instant the bucket is full again is
    /// kept, so a node share keeps its fill fraction when the count of nodes changes
    /// (exactly when the burst divides evenly).
    pub fn rescaled(self, from: &Gcra, to: &Gcra) -> GcraState {
        if from.rate == to.rate {
            return self;
        }
        let ns = self.tat.div_ceil(u128::from(from.rate));
        GcraState {
            tat: ns.saturating_mul(u128::from(to.rate)),
        }
    }
}

/// The answer to a request for units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GcraOutcome {
    /// The units were (or, for a peek, would be) granted.
    Allowed {
        /// Whole units still takeable right now, after this take.
        remaining: u64,
        /// Time until the bucket is full again.
        reset_after: Duration,
    },
    /// The units were not granted, and nothing changed.
    Denied {
        /// Whole units takeable right now (fewer than requested).
        remaining: u64,
        /// The shortest wait after which the same request would be allowed.
        retry_after: Duration,
    },
    /// More units were requested than the burst: never allowed.
    TooLarge,
}

impl GcraOutcome {
    /// Whether the request was allowed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, GcraOutcome::Allowed { .. })
    }
}

/// An invalid rate limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GcraError {
    /// The rate was zero.
    #[error("rate must be greater than zero")]
    ZeroRate,
    /// The period was zero.
    #[error("period must be greater than zero")]
    ZeroPeriod,
    /// The burst was zero.
    #[error("burst must be greater than zero")]
    ZeroBurst,
}

impl Gcra {
    /// A limit of `rate` units per `period`, bursting up to `burst` units.
    pub fn new(rate: u64, period: Duration, burst: u64) -> Result<Gcra, GcraError> {
        if rate == 0 {
            return Err(GcraError::ZeroRate);
        }
        if period.is_zero() {
            return Err(GcraError::ZeroPeriod);
        }
        if burst == 0 {
            return Err(GcraError::ZeroBurst);
        }
        let interval = period.as_nanos();
        Ok(Gcra {
            rate,
            period,
            burst,
            interval,
            tolerance: interval.saturating_mul(u128::from(burst)),
        })
    }

    /// Units admitted per period.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Units admitted at once from a full bucket.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// The period over which `rate` units are admitted.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// This node's share of the limit when `nodes` live nodes each run their own
    /// bucket (`scope: node`): the same rate over `nodes` times the period (so
    /// `rate / nodes` per period, exactly, in integers) and a burst of
    /// `ceil(burst / nodes)`, which is at least 1. `nodes` of 0 counts as 1.
    ///
    /// The bound: node `i` admits at most `ceil(burst / n) + floor(rate × E_i /
    /// (n × period))` units over the span `E_i` from its first admission to its
    /// last (the single-bucket bound of this module). With `E` the span from
    /// the first admission on any node to the last one, `E_i <= E`, and
    /// `n × floor(x / n) <= floor(x)`, so the `n` nodes together admit at most
    ///
    /// `floor(rate × E / period) + n × ceil(burst / n)`
    ///
    /// units, whatever the schedule: at most `n - 1` more than one shared bucket
    /// at once, and the same rate over time. The price of needing no
    /// coordination is that a node receiving all the traffic admits only its
    /// share: the whole limit is available only when the load is spread.
    ///
    /// A period that would pass [`Duration::MAX`] saturates there, which only
    /// slows the share down.
    pub fn per_node(&self, nodes: usize) -> Gcra {
        let n = u64::try_from(nodes.max(1)).unwrap_or(u64::MAX);
        if n == 1 {
            return *self;
        }
        let period = u32::try_from(n)
            .ok()
            .and_then(|m| self.period.checked_mul(m))
            .unwrap_or(Duration::MAX);
        Gcra::new(self.rate, period, self.burst.div_ceil(n)).expect("a share of a valid limit")
    }

    /// Whether a store computing in doubles keeps this bucket exactly (see
    /// [`GLOBAL_EXACT_MAX`]).
    pub fn global_exact(&self) -> bool {
        let period_us = self.period.as_micros();
        u128::from(self.rate) <= GLOBAL_EXACT_MAX
            && u128::from(self.burst).saturating_mul(period_us) <= GLOBAL_EXACT_MAX
    }

    /// The limit lowered into the range a store computing in doubles keeps exactly:
    /// rate at most [`GLOBAL_EXACT_MAX`], `burst × period_µs` at most that too. Only
    /// ever stricter than `self`; unchanged when [`Gcra::global_exact`].
    pub fn clamped_for_global(&self) -> Gcra {
        if self.global_exact() {
            return *self;
        }
        let max = GLOBAL_EXACT_MAX as u64;
        let period_us = u64::try_from(self.period.as_micros().max(1)).unwrap_or(u64::MAX);
        let burst = self.burst.min(max / period_us).max(1);
        let rate = self.rate.min(max);
        Gcra::new(rate, self.period, burst).expect("a clamp of a valid limit")
    }

    /// Take `n` units at `now` (nanoseconds on any monotonic clock chosen by
    /// the caller) if allowed; updates state only when allowed.
    pub fn take(&self, state: &mut GcraState, now_ns: u64, n: u64) -> GcraOutcome {
        let (outcome, tat) = self.decide(*state, now_ns, n);
        state.tat = tat;
        outcome
    }

    /// Same answer as [`Gcra::take`] without changing state.
    pub fn peek(&self, state: &GcraState, now_ns: u64, n: u64) -> GcraOutcome {
        self.decide(*state, now_ns, n).0
    }

    /// Give back `n` units taken earlier (e.g. when a later step of the same
    /// request was denied); never makes the bucket fuller than its burst at
    /// `now_ns`.
    pub fn refund(&self, state: &mut GcraState, now_ns: u64, n: u64) {
        let now = self.scale(now_ns);
        if state.tat > now {
            // A TAT at or before now already means "full"; clamping there
            // keeps the refund from banking capacity beyond the burst.
            let refunded = state.tat.saturating_sub(self.cost(n));
            state.tat = refunded.max(now);
        }
    }

    /// The outcome of taking `n` units at `now_ns`, and the TAT afterwards.
    fn decide(&self, state: GcraState, now_ns: u64, n: u64) -> (GcraOutcome, u128) {
        if n > self.burst {
            return (GcraOutcome::TooLarge, state.tat);
        }
        let now = self.scale(now_ns);
        let base = state.tat.max(now);
        let Some(new_tat) = base.checked_add(self.cost(n)) else {
            // Past the end of the scaled clock. Saturating would make the
            // bucket look emptier than it is, so fail closed instead.
            let outcome = GcraOutcome::Denied {
                remaining: self.remaining(base, now),
                retry_after: Duration::MAX,
            };
            return (outcome, state.tat);
        };
        // new_tat >= now, so this difference never underflows.
        if new_tat - now <= self.tolerance {
            let outcome = GcraOutcome::Allowed {
                remaining: self.remaining(new_tat, now),
                reset_after: self.unscale(new_tat - now),
            };
            (outcome, if n == 0 { state.tat } else { new_tat })
        } else {
            // The request fits once now + tolerance reaches new_tat.
            let wait = new_tat - now - self.tolerance;
            let outcome = GcraOutcome::Denied {
                remaining: self.remaining(base, now),
                retry_after: self.unscale(wait),
            };
            (outcome, state.tat)
        }
    }

    /// Whole units takeable at `now` when the TAT is `tat` (both scaled).
    fn remaining(&self, tat: u128, now: u128) -> u64 {
        let used = tat.saturating_sub(now);
        let free = self.tolerance.saturating_sub(used) / self.interval;
        u64::try_from(free).unwrap_or(u64::MAX).min(self.burst)
    }

    /// `n` emission intervals, in scaled units. Never saturates for
    /// `n <= burst` unless the tolerance itself did, and a saturated cost
    /// only ever makes a take fail.
    fn cost(&self, n: u64) -> u128 {
        self.interval.saturating_mul(u128::from(n))
    }

    /// Nanoseconds to scaled units; exact, as u64 × u64 fits in u128.
    fn scale(&self, ns: u64) -> u128 {
        u128::from(ns) * u128::from(self.rate)
    }

    /// Scaled units to a duration, rounded up so that waiting it is enough.
    fn unscale(&self, scaled: u128) -> Duration {
        let ns = scaled.div_ceil(u128::from(self.rate));
        match (
            u64::try_from(ns / NANOS_PER_SEC),
            u32::try_from(ns % NANOS_PER_SEC),
        ) {
            (Ok(secs), Ok(nanos)) => Duration::new(secs, nanos),
            _ => Duration::MAX,
        }
    }
}
