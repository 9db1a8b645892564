//! Conversions between the protobuf well-known types and the forms people read and type:
//! chrono instants and RFC 3339 text for `Timestamp`, std durations, milliseconds and
//! humantime text for `Duration`. Shared by the request builders, the tables and the JSON.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use prost_types::{Duration as PbDuration, Timestamp};

/// The wire form of an instant.
pub fn to_timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        // chrono counts a leap second as nanos past 1e9; protobuf does not allow that.
        nanos: t.timestamp_subsec_nanos().min(999_999_999) as i32,
    }
}

/// The wire form of a duration.
pub fn to_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// An instant as RFC 3339 in UTC, with fractional seconds only when there are some.
pub fn rfc3339(ts: &Timestamp) -> String {
    u32::try_from(ts.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
        .map(|t| t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
        // Out of chrono's range: prost's own rendering still says what was sent.
        .unwrap_or_else(|| ts.to_string())
}

/// An optional instant as RFC 3339, or an empty string when absent.
pub fn rfc3339_or_empty(ts: Option<&Timestamp>) -> String {
    ts.map(rfc3339).unwrap_or_default()
}

/// Whole milliseconds, rounded up: a retry-after rounded down would invite a retry that is
/// still too early.
pub fn millis(d: &PbDuration) -> i64 {
    let nanos = i64::from(d.nanos);
    d.seconds
        .saturating_mul(1000)
        .saturating_add(nanos.div_euclid(1_000_000))
        .saturating_add(i64::from(nanos.rem_euclid(1_000_000) != 0))
}

/// A duration for people, e.g. `1s 500ms`, at millisecond precision (see [`millis`]).
pub fn human(d: &PbDuration) -> String {
    let ms = millis(d);
    let text = humantime::format_duration(Duration::from_millis(ms.unsigned_abs())).to_string();
    if ms < 0 {
        format!("-{text}")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn timestamps_round_trip_through_rfc3339() {
        let ts = to_timestamp(utc("2025-03-01T12:00:00Z"));
        assert_eq!(ts.seconds, 1_740_830_400);
        assert_eq!(ts.nanos, 0);
        assert_eq!(rfc3339(&ts), "2025-03-01T12:00:00Z");

        let ts = to_timestamp(utc("2025-03-01T12:00:00.5+02:00"));
        assert_eq!(ts.nanos, 500_000_000);
        assert_eq!(rfc3339(&ts), "2025-03-01T10:00:00.500Z");
    }

    #[test]
    fn invalid_timestamps_still_render() {
        let ts = Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert!(!rfc3339(&ts).is_empty());
        assert_eq!(rfc3339_or_empty(None), "");
    }

    #[test]
    fn durations_convert_both_ways() {
        let d = to_duration(Duration::from_millis(1500));
        assert_eq!((d.seconds, d.nanos), (1, 500_000_000));
        assert_eq!(millis(&d), 1500);
        assert_eq!(human(&d), "1s 500ms");
    }

    #[test]
    fn millis_round_up() {
        let d = PbDuration {
            seconds: 0,
            nanos: 1,
        };
        assert_eq!(millis(&d), 1);
        assert_eq!(human(&d), "1ms");
        let zero = PbDuration::default();
        assert_eq!(human(&zero), "0s");
    }
}
