//! Metering windows and the calendar periods they cut time into.
//!
//! This module owns the answer to "which period does this instant belong
//! to?" for every [`Window`]: aligned UTC seconds and minutes for rate
//! windows, local clock hours, days and months in the tenant's time zone, and
//! billing periods anchored at the subscription's billing anchor. It is pure:
//! the instant is always an argument and nothing here reads a clock.
//!
//! Every calendar window tiles time: the period that ends at instant `e` is
//! immediately followed by the period that starts at `e`, with no gap and no
//! overlap, even across daylight-saving changes. Local times that do not
//! exist (a DST gap) resolve to the first instant after the gap; local times
//! that exist twice (a fall-back) resolve to the earlier instant.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{
    DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeZone, Utc,
};
use chrono_tz::{GapInfo, Tz};

/// How usage of a limit is grouped over time.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// A rate per second, enforced by GCRA.
    Second,
    /// A rate per minute, enforced by GCRA.
    Minute,
    /// A quota per local clock hour.
    Hour,
    /// A quota per local calendar day.
    Day,
    /// A quota per local calendar month.
    Month,
    /// A quota per billing period, anchored at the subscription's billing anchor.
    BillingPeriod,
    /// A gauge: a level that never resets (for example, seats in use).
    None,
}

impl Window {
    /// Every window, in declaration order.
    pub const ALL: [Window; 7] = [
        Window::Second,
        Window::Minute,
        Window::Hour,
        Window::Day,
        Window::Month,
        Window::BillingPeriod,
        Window::None,
    ];

    /// The name used in configuration and on the wire (the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Second => "second",
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
            Window::BillingPeriod => "billing_period",
            Window::None => "none",
        }
    }

    /// Whether this window is a rate, limited by a token bucket (GCRA).
    pub fn is_rate(self) -> bool {
        matches!(self, Window::Second | Window::Minute)
    }

    /// Whether this window is a quota, counted per calendar period.
    pub fn is_quota(self) -> bool {
        matches!(
            self,
            Window::Hour | Window::Day | Window::Month | Window::BillingPeriod
        )
    }

    /// Whether this window is a gauge, which never resets.
    pub fn is_gauge(self) -> bool {
        matches!(self, Window::None)
    }

    /// The period of a rate window (1 s or 60 s); `None` for other windows.
    pub fn rate_period(self) -> Option<Duration> {
        match self {
            Window::Second => Some(Duration::from_secs(1)),
            Window::Minute => Some(Duration::from_secs(60)),
            _ => None,
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Window {
    type Err = UnknownWindow;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Window::ALL
            .into_iter()
            .find(|w| w.as_str() == s)
            .ok_or_else(|| UnknownWindow(s.to_owned()))
    }
}

/// A window name that is not one of the known windows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown window {0:?}: expected one of \"second\", \"minute\", \"hour\", \"day\", \"month\", \"billing_period\", \"none\""
)]
pub struct UnknownWindow(pub String);

/// A time zone name that is not in the IANA time zone database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid time zone {0:?}: must be an IANA time zone name like \"Europe/Paris\"")]
pub struct InvalidTimeZone(pub String);

/// Parses an IANA time zone name such as `"Europe/Paris"` or `"UTC"`.
pub fn parse_time_zone(name: &str) -> Result<Tz, InvalidTimeZone> {
    name.parse::<Tz>()
        .map_err(|_| InvalidTimeZone(name.to_owned()))
}

/// The start of the single period of [`Window::None`].
///
/// The Unix epoch rather than `DateTime::<Utc>::MIN_UTC`, so the value fits
/// every timestamp encoding downstream (protobuf `Timestamp` cannot represent
/// dates before year 1). The engine's time domain starts at the epoch, so the
/// gauge period still contains every instant the engine deals with.
pub const GAUGE_START: DateTime<Utc> = DateTime::<Utc>::UNIX_EPOCH;

/// A half-open period `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Period {
    /// The first instant of the period.
    pub start: DateTime<Utc>,
    /// The first instant after the period; `None` only for [`Window::None`],
    /// because a gauge never resets.
    pub end: Option<DateTime<Utc>>,
}

impl Period {
    /// Whether `at` falls inside the period.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        self.start <= at && self.end.is_none_or(|end| at < end)
    }
}

/// The period of `window` that contains `at`, for a tenant in time zone `tz`
/// whose billing is anchored at `anchor`.
///
/// `tz` matters only for hour, day, month and billing periods; `anchor` only
/// for billing periods. For [`Window::None`] the period is
/// `[GAUGE_START, ∞)`.
///
/// Billing period `k` starts at the local date-time with the anchor's local
/// day of month and time of day, `k` months after the anchor's month (`k` may
/// be negative); a day past the end of a shorter month clamps to the month's
/// last day without being forgotten for later months. Because an ambiguous
/// local time resolves to its earlier instant, the period containing the
/// anchor may start up to one DST shift before it.
pub fn period_at(window: Window, at: DateTime<Utc>, tz: Tz, anchor: DateTime<Utc>) -> Period {
    match window {
        Window::Second => aligned_utc(at, 1),
        Window::Minute => aligned_utc(at, 60),
        Window::Hour => local_hour(at, tz),
        Window::Day => {
            let guess = i64::from(local_naive(at, tz).date().num_days_from_ce());
            locate(at, guess, |k| day_start(k, tz))
        }
        Window::Month => {
            let guess = month_index(local_naive(at, tz).date());
            locate(at, guess, |k| month_start(k, tz))
        }
        Window::BillingPeriod => {
            let anchor_local = local_naive(anchor, tz);
            let guess = month_index(local_naive(at, tz).date());
            locate(at, guess, |k| billing_start(k, anchor_local, tz))
        }
        Window::None => Period {
            start: GAUGE_START,
            end: None,
        },
    }
}

/// The `len`-second UTC period containing `at`, aligned to the epoch.
fn aligned_utc(at: DateTime<Utc>, len: i64) -> Period {
    let start = at.timestamp().div_euclid(len) * len;
    Period {
        start: from_secs(start),
        end: Some(from_secs(start.saturating_add(len))),
    }
}

/// The local clock hour containing `at`.
///
/// Hours cannot use [`resolve`] like days do: resolving both occurrences of a
/// repeated local hour to the earlier one would merge them into one two-hour
/// period. Instead the period is cut by both local hour boundaries (in the
/// offset in force at `at`) and offset transitions, so each stretch of time
/// that shows one local hour under one offset is its own period.
fn local_hour(at: DateTime<Utc>, tz: Tz) -> Period {
    let secs = at.timestamp();
    let offset = offset_at(tz, secs);
    let hour = secs.saturating_add(offset).div_euclid(3600) * 3600;

    let naive_start = hour.saturating_sub(offset);
    let start = if offset_at(tz, naive_start) == offset {
        naive_start
    } else {
        // A transition happened since the local hour began: the period starts
        // at the transition. Transitions fall on whole seconds, and no zone
        // changes offset twice within an hour (checked for every zone,
        // 1970-2100), so bisection finds it.
        first_second_with(tz, naive_start, secs, |o| o == offset)
    };

    let naive_end = hour.saturating_add(3600).saturating_sub(offset);
    let end = if offset_at(tz, naive_end.saturating_sub(1)) == offset {
        naive_end
    } else {
        first_second_with(tz, secs, naive_end.saturating_sub(1), |o| o != offset)
    };

    Period {
        start: from_secs(start),
        end: Some(from_secs(end)),
    }
}

/// The smallest whole second in `(lo, hi]` whose offset satisfies `pred`,
/// given that `lo` does not and `hi` does.
fn first_second_with(tz: Tz, mut lo: i64, mut hi: i64, pred: impl Fn(i64) -> bool) -> i64 {
    while hi.saturating_sub(lo) > 1 {
        let mid = lo + (hi - lo) / 2;
        if pred(offset_at(tz, mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

/// Finds the period `[boundary(k), boundary(k + 1))` containing `at`,
/// starting from a guess of `k` taken from `at`'s local date.
///
/// The guess can be off by one in either direction: a billing period that
/// starts later in the month than `at`, or a fall-back across midnight that
/// shows an earlier local date after a later one. Stepping from the guess
/// (rather than trusting it) is what makes consecutive periods tile time even
/// then. The step limits only guard against pathological time zone data;
/// boundaries are strictly increasing for every zone in the database.
fn locate(at: DateTime<Utc>, guess: i64, boundary: impl Fn(i64) -> DateTime<Utc>) -> Period {
    const MAX_STEPS: usize = 64;
    let mut k = guess;
    let mut start = boundary(k);
    for _ in 0..MAX_STEPS {
        if start <= at {
            break;
        }
        k = k.saturating_sub(1);
        start = boundary(k);
    }
    let mut end = boundary(k.saturating_add(1));
    for _ in 0..MAX_STEPS {
        if end > at {
            break;
        }
        k = k.saturating_add(1);
        start = end;
        end = boundary(k.saturating_add(1));
    }
    Period {
        start,
        end: Some(end),
    }
}

/// The first instant of local day `k` (days from the common era).
fn day_start(k: i64, tz: Tz) -> DateTime<Utc> {
    match i32::try_from(k)
        .ok()
        .and_then(NaiveDate::from_num_days_from_ce_opt)
    {
        Some(date) => resolve(tz, date.and_time(NaiveTime::MIN)),
        None => saturated(k),
    }
}

/// The first instant of local month `k` (see [`month_index`]).
fn month_start(k: i64, tz: Tz) -> DateTime<Utc> {
    match ymd_clamped(k, 1) {
        Some(date) => resolve(tz, date.and_time(NaiveTime::MIN)),
        None => saturated(k),
    }
}

/// The first instant of the billing period that starts in local month `k`.
fn billing_start(k: i64, anchor_local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    match ymd_clamped(k, anchor_local.day()) {
        Some(date) => resolve(tz, date.and_time(anchor_local.time())),
        None => saturated(k),
    }
}

/// Months since year 0, so that month arithmetic is integer addition.
fn month_index(date: NaiveDate) -> i64 {
    i64::from(date.year()) * 12 + i64::from(date.month0())
}

/// Day `day` of month `k`, clamped to the month's last day.
fn ymd_clamped(k: i64, day: u32) -> Option<NaiveDate> {
    let year = i32::try_from(k.div_euclid(12)).ok()?;
    let month = u32::try_from(k.rem_euclid(12)).ok()? + 1;
    let first = NaiveDate::from_ymd_opt(year, month, 1)?;
    let last = first
        .checked_add_months(chrono::Months::new(1))
        .and_then(|d| d.pred_opt())
        .map_or(31, |d| d.day());
    NaiveDate::from_ymd_opt(year, month, day.min(last))
}

/// The instant at which local time `local` first occurs in `tz`, or, if it
/// never occurs because of a DST gap, the first instant after the gap.
fn resolve(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(a, b) => a.with_timezone(&Utc).min(b.with_timezone(&Utc)),
        LocalResult::None => gap_end(tz, local),
    }
}

/// The first instant after the DST gap that swallows `local`.
fn gap_end(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let gap = GapInfo::new(&local, &tz);
    // `begin` is the gap's first local time read in the offset before it, so
    // subtracting that offset gives the transition instant exactly. `end` is
    // only a fallback: chrono-tz leaves it empty when the local time right
    // after the gap is itself ambiguous.
    if let Some((begin, offset)) = gap.as_ref().and_then(|g| g.begin) {
        let secs = begin
            .and_utc()
            .timestamp()
            .saturating_sub(i64::from(offset.fix().local_minus_utc()));
        return from_secs(secs);
    }
    if let Some(end) = gap.and_then(|g| g.end) {
        return end.with_timezone(&Utc);
    }
    local.and_utc()
}

/// The local wall-clock time of `at` in `tz`.
fn local_naive(at: DateTime<Utc>, tz: Tz) -> NaiveDateTime {
    let offset = tz.offset_from_utc_datetime(&at.naive_utc()).fix();
    // `DateTime::naive_local` panics when the offset pushes the local time
    // past chrono's range; saturate instead, as only the calendar's very
    // first and last day are affected.
    at.naive_utc()
        .checked_add_offset(offset)
        .unwrap_or(if offset.local_minus_utc() < 0 {
            NaiveDateTime::MIN
        } else {
            NaiveDateTime::MAX
        })
}

/// The UTC offset of `tz`, in seconds, at Unix time `secs`.
fn offset_at(tz: Tz, secs: i64) -> i64 {
    let utc = from_secs(secs).naive_utc();
    i64::from(tz.offset_from_utc_datetime(&utc).fix().local_minus_utc())
}

/// Unix time `secs` as an instant, saturating at chrono's range.
fn from_secs(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or(if secs < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

/// A boundary for an index beyond chrono's calendar, kept monotonic.
fn saturated(k: i64) -> DateTime<Utc> {
    if k < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    }
}
