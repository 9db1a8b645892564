//! Where the engine gets time from: the adapters own the clock, `meter` only takes instants.

use chrono::{DateTime, Utc};

/// A source of wall-clock instants and monotonic nanoseconds.
pub trait Clock: Send + Sync {
    /// Now, for windows, TTLs and resolution.
    fn now(&self) -> DateTime<Utc>;
    /// Nanoseconds on a clock that never goes backwards, for token buckets.
    fn monotonic_ns(&self) -> u64;
}

/// The system's clocks.
pub struct SystemClock {
    start: std::time::Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            start: std::time::Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn monotonic_ns(&self) -> u64 {
        // Offset by one second so that the first takes see a non-zero clock.
        u64::try_from(self.start.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1_000_000_000)
    }
}
