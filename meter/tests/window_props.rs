//! Properties and calendar edge cases of `meter::window`.

use chrono::{
    DateTime, Datelike, LocalResult, Months, NaiveDate, NaiveDateTime, Offset, TimeDelta, TimeZone,
    Timelike, Utc,
};
use chrono_tz::Tz;
use meter::window::{parse_time_zone, period_at, Period, Window, GAUGE_START};
use proptest::prelude::*;

const NS: TimeDelta = TimeDelta::nanoseconds(1);

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
}

fn zone(name: &str) -> Tz {
    parse_time_zone(name).unwrap()
}

fn local(t: DateTime<Utc>, tz: Tz) -> NaiveDateTime {
    t.with_timezone(&tz).naive_local()
}

fn offset(t: DateTime<Utc>, tz: Tz) -> i32 {
    tz.offset_from_utc_datetime(&t.naive_utc())
        .fix()
        .local_minus_utc()
}

fn hours(p: Period) -> i64 {
    (p.end.unwrap() - p.start).num_hours()
}

/// A local date-time in `tz` that exists exactly once.
fn at_local(tz: Tz, y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    tz.with_ymd_and_hms(y, mo, d, h, mi, 0)
        .single()
        .unwrap()
        .with_timezone(&Utc)
}

/// Independent oracle for "the instant local time `l` first occurs, or the
/// first instant after the gap that swallows it": checks `t` against it.
fn is_resolution_of(t: DateTime<Utc>, l: NaiveDateTime, tz: Tz) -> bool {
    match tz.from_local_datetime(&l) {
        LocalResult::Single(x) => x.with_timezone(&Utc) == t,
        LocalResult::Ambiguous(a, b) => a.with_timezone(&Utc).min(b.with_timezone(&Utc)) == t,
        LocalResult::None => local(t - NS, tz) < l && l < local(t, tz),
    }
}

fn any_tz() -> impl Strategy<Value = Tz> {
    prop::sample::select(&chrono_tz::TZ_VARIANTS[..])
}

fn instant_in_years(from: i32, to_inclusive: i32) -> impl Strategy<Value = DateTime<Utc>> {
    let lo = utc(from, 1, 1, 0, 0, 0).timestamp();
    let hi = utc(to_inclusive + 1, 1, 1, 0, 0, 0).timestamp();
    (lo..hi, 0u32..1_000_000_000).prop_map(|(s, ns)| DateTime::from_timestamp(s, ns).unwrap())
}

fn any_window() -> impl Strategy<Value = Window> {
    prop::sample::select(&Window::ALL[..])
}

/// The period contains `at`, is reproduced from its own start and its last
/// nanosecond, and is followed by a period starting exactly at its end.
fn check_tiling(w: Window, at: DateTime<Utc>, tz: Tz, anchor: DateTime<Utc>) -> Period {
    let p = period_at(w, at, tz, anchor);
    assert!(p.contains(at), "{w} {tz} {at}: {p:?}");
    assert_eq!(period_at(w, p.start, tz, anchor), p, "{w} {tz} from start");
    if let Some(end) = p.end {
        assert!(p.start < end);
        assert_eq!(period_at(w, end - NS, tz, anchor), p, "{w} {tz} last ns");
        assert_eq!(period_at(w, end, tz, anchor).start, end, "{w} {tz} next");
    } else {
        assert_eq!(w, Window::None);
    }
    p
}

/// The first instant after `t` (within about a year) at which `tz` changes
/// its UTC offset.
fn next_transition(tz: Tz, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let base = offset(t, tz);
    let mut lo = t;
    let mut hi = (1..=400)
        .map(|d| t + TimeDelta::days(d))
        .find(|x| offset(*x, tz) != base)?;
    while hi - lo > TimeDelta::seconds(1) {
        let mid = lo + (hi - lo) / 2;
        if offset(mid, tz) == base {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(DateTime::from_timestamp(hi.timestamp(), 0).unwrap())
}

proptest! {
    #[test]
    fn periods_tile_time_around_transitions(
        tz in any_tz(),
        from in instant_in_years(1970, 2099),
        anchor in instant_in_years(1970, 2100),
        delta_s in -7200i64..7200,
        delta_ns in 0i64..1_000_000_000,
    ) {
        if let Some(t) = next_transition(tz, from) {
            let at = t + TimeDelta::seconds(delta_s) + TimeDelta::nanoseconds(delta_ns);
            for w in [Window::Hour, Window::Day, Window::Month, Window::BillingPeriod] {
                check_tiling(w, at, tz, anchor);
                check_tiling(w, t, tz, anchor);
            }
            let hour = period_at(Window::Hour, at, tz, anchor);
            prop_assert_eq!(offset(hour.start, tz), offset(at, tz));
            prop_assert_eq!(offset(hour.end.unwrap() - NS, tz), offset(at, tz));
            let day = period_at(Window::Day, at, tz, anchor);
            let date = local(at, tz).date();
            // A fall-back across midnight (America/Goose_Bay, 1989-10-29 00:01) makes the
            // local date go backwards for a while: those instants belong to the day whose
            // first midnight already passed, so the date check does not apply to them.
            let dates_went_back =
                (1..=180).any(|m| local(at - TimeDelta::minutes(m), tz).date() > date);
            if dates_went_back {
                return Ok(());
            }
            let midnight = date.and_hms_opt(0, 0, 0).unwrap();
            prop_assert!(is_resolution_of(day.start, midnight, tz), "{} {} {:?}", tz, at, day);
            let next = date.succ_opt().unwrap().and_hms_opt(0, 0, 0).unwrap();
            prop_assert!(is_resolution_of(day.end.unwrap(), next, tz), "{} {} {:?}", tz, at, day);
        }
    }

    #[test]
    fn periods_tile_time(
        w in any_window(),
        tz in any_tz(),
        at in instant_in_years(1970, 2100),
        anchor in instant_in_years(1970, 2100),
    ) {
        check_tiling(w, at, tz, anchor);
    }

    #[test]
    fn periods_tile_time_far_future(
        w in any_window(),
        tz in any_tz(),
        at in instant_in_years(1970, 9000),
        anchor in instant_in_years(1970, 9000),
    ) {
        check_tiling(w, at, tz, anchor);
    }

    #[test]
    fn rate_windows_are_aligned_utc(at in instant_in_years(1970, 9000), tz in any_tz()) {
        let s = period_at(Window::Second, at, tz, at);
        prop_assert_eq!(s.start.nanosecond(), 0);
        prop_assert_eq!(s.end, Some(s.start + TimeDelta::seconds(1)));
        let m = period_at(Window::Minute, at, tz, at);
        prop_assert_eq!(m.start.timestamp() % 60, 0);
        prop_assert_eq!(m.start.nanosecond(), 0);
        prop_assert_eq!(m.end, Some(m.start + TimeDelta::minutes(1)));
    }

    #[test]
    fn hour_is_one_offset_and_local_hour(tz in any_tz(), at in instant_in_years(1970, 2100)) {
        let p = period_at(Window::Hour, at, tz, at);
        let end = p.end.unwrap();
        prop_assert!(end - p.start <= TimeDelta::hours(1));
        // One offset throughout, so one local hour throughout.
        prop_assert_eq!(offset(p.start, tz), offset(at, tz));
        prop_assert_eq!(offset(end - NS, tz), offset(at, tz));
        prop_assert_eq!(local(p.start, tz).hour(), local(at, tz).hour());
        // Each boundary is a local hour boundary or an offset transition.
        for b in [p.start, end] {
            let l = local(b, tz);
            let on_hour = l.minute() == 0 && l.second() == 0;
            prop_assert!(on_hour || offset(b - NS, tz) != offset(b, tz), "{} {}", tz, b);
        }
    }

    #[test]
    fn day_starts_at_first_instant_of_local_date(tz in any_tz(), at in instant_in_years(1970, 2100)) {
        let p = period_at(Window::Day, at, tz, at);
        let date = local(at, tz).date();
        let midnight = date.and_hms_opt(0, 0, 0).unwrap();
        prop_assert!(is_resolution_of(p.start, midnight, tz), "{} {} {:?}", tz, at, p);
        prop_assert_eq!(local(p.start, tz).date(), date);
        let next = date.succ_opt().unwrap().and_hms_opt(0, 0, 0).unwrap();
        prop_assert!(is_resolution_of(p.end.unwrap(), next, tz), "{} {} {:?}", tz, at, p);
    }

    #[test]
    fn month_starts_at_first_instant_of_local_month(tz in any_tz(), at in instant_in_years(1970, 2100)) {
        let p = period_at(Window::Month, at, tz, at);
        let first = local(at, tz).date().with_day(1).unwrap();
        let midnight = first.and_hms_opt(0, 0, 0).unwrap();
        prop_assert!(is_resolution_of(p.start, midnight, tz), "{} {} {:?}", tz, at, p);
        prop_assert_eq!(local(p.start, tz).date(), first);
        let next = (first + Months::new(1)).and_hms_opt(0, 0, 0).unwrap();
        prop_assert!(is_resolution_of(p.end.unwrap(), next, tz), "{} {} {:?}", tz, at, p);
    }

    #[test]
    fn billing_period_follows_anchor(
        tz in any_tz(),
        at in instant_in_years(1970, 2100),
        anchor in instant_in_years(1970, 2100),
    ) {
        let p = period_at(Window::BillingPeriod, at, tz, anchor);
        let a = local(anchor, tz);
        let anchor_month = a.year() * 12 + a.month0() as i32;
        // chrono's month arithmetic clamps relative to the anchor itself, so
        // it keeps day 31 after a short month: an independent oracle.
        let nth = |k: i32| {
            let d = if k >= 0 {
                a.checked_add_months(Months::new(k as u32))
            } else {
                a.checked_sub_months(Months::new(k.unsigned_abs()))
            };
            d.unwrap()
        };
        let s = local(p.start, tz);
        let k = s.year() * 12 + s.month0() as i32 - anchor_month;
        // A gap can push a start past midnight into the next month.
        let k = if is_resolution_of(p.start, nth(k), tz) { k } else { k - 1 };
        prop_assert!(is_resolution_of(p.start, nth(k), tz), "{} {} {} {:?}", tz, anchor, at, p);
        prop_assert!(is_resolution_of(p.end.unwrap(), nth(k + 1), tz), "{} {} {} {:?}", tz, anchor, at, p);
    }
}

#[test]
fn window_names_round_trip() {
    for w in Window::ALL {
        assert_eq!(w.as_str().parse::<Window>(), Ok(w));
        assert_eq!(w.to_string(), w.as_str());
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(json, format!("\"{}\"", w.as_str()));
        assert_eq!(serde_json::from_str::<Window>(&json).unwrap(), w);
    }
    assert_eq!(Window::BillingPeriod.as_str(), "billing_period");
}

#[test]
fn window_kinds_partition_windows() {
    for w in Window::ALL {
        let kinds = [w.is_rate(), w.is_quota(), w.is_gauge()];
        assert_eq!(kinds.iter().filter(|k| **k).count(), 1, "{w}");
        assert_eq!(w.rate_period().is_some(), w.is_rate());
    }
    assert_eq!(
        Window::Second.rate_period(),
        Some(std::time::Duration::from_secs(1))
    );
    assert_eq!(
        Window::Minute.rate_period(),
        Some(std::time::Duration::from_secs(60))
    );
}

#[test]
fn unknown_window_names_value_and_lists_valid_ones() {
    let err = "weekly".parse::<Window>().unwrap_err();
    assert_eq!(err.0, "weekly");
    let msg = err.to_string();
    assert!(msg.contains("\"weekly\""), "{msg}");
    for w in Window::ALL {
        assert!(msg.contains(w.as_str()), "{msg}");
    }
    assert!("Day".parse::<Window>().is_err());
}

#[test]
fn time_zones_parse_by_iana_name() {
    assert_eq!(
        parse_time_zone("Europe/Paris"),
        Ok(chrono_tz::Europe::Paris)
    );
    assert_eq!(parse_time_zone("UTC"), Ok(chrono_tz::UTC));
    let err = parse_time_zone("Mars/Olympus").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("Mars/Olympus") && msg.contains("IANA") && msg.contains("Europe/Paris"));
}

#[test]
fn gauge_period_never_ends() {
    let p = period_at(
        Window::None,
        utc(2024, 5, 1, 0, 0, 0),
        zone("Asia/Tokyo"),
        GAUGE_START,
    );
    assert_eq!(
        p,
        Period {
            start: GAUGE_START,
            end: None
        }
    );
    assert_eq!(GAUGE_START, DateTime::<Utc>::UNIX_EPOCH);
    assert!(p.contains(utc(9000, 12, 31, 23, 59, 59)));
}

#[test]
fn paris_dst_days_are_23_and_25_hours() {
    let paris = zone("Europe/Paris");
    let spring = period_at(Window::Day, utc(2024, 3, 31, 12, 0, 0), paris, GAUGE_START);
    assert_eq!(spring.start, utc(2024, 3, 30, 23, 0, 0));
    assert_eq!(hours(spring), 23);
    let fall = period_at(Window::Day, utc(2024, 10, 27, 12, 0, 0), paris, GAUGE_START);
    assert_eq!(fall.start, utc(2024, 10, 26, 22, 0, 0));
    assert_eq!(hours(fall), 25);
    let normal = period_at(Window::Day, utc(2024, 10, 28, 12, 0, 0), paris, GAUGE_START);
    assert_eq!(hours(normal), 24);
}

#[test]
fn new_york_dst_days_and_hours() {
    let ny = zone("America/New_York");
    let spring = period_at(Window::Day, utc(2024, 3, 10, 12, 0, 0), ny, GAUGE_START);
    assert_eq!(spring.start, utc(2024, 3, 10, 5, 0, 0));
    assert_eq!(hours(spring), 23);
    let fall = period_at(Window::Day, utc(2024, 11, 3, 12, 0, 0), ny, GAUGE_START);
    assert_eq!(fall.start, utc(2024, 11, 3, 4, 0, 0));
    assert_eq!(hours(fall), 25);
    // 01:59 EST is followed by 03:00 EDT: the 01:00 hour ends at the jump.
    let before_jump = period_at(Window::Hour, utc(2024, 3, 10, 6, 30, 0), ny, GAUGE_START);
    assert_eq!(before_jump.start, utc(2024, 3, 10, 6, 0, 0));
    assert_eq!(before_jump.end, Some(utc(2024, 3, 10, 7, 0, 0)));
    let after_jump = period_at(Window::Hour, utc(2024, 3, 10, 7, 0, 0), ny, GAUGE_START);
    assert_eq!(local(after_jump.start, ny).hour(), 3);
}

#[test]
fn fall_back_repeated_hour_is_two_periods() {
    let paris = zone("Europe/Paris");
    // Local 02:00-03:00 on 2024-10-27 happens first in CEST, then in CET.
    let first = period_at(
        Window::Hour,
        utc(2024, 10, 27, 0, 30, 0),
        paris,
        GAUGE_START,
    );
    let second = period_at(
        Window::Hour,
        utc(2024, 10, 27, 1, 30, 0),
        paris,
        GAUGE_START,
    );
    assert_eq!(first.start, utc(2024, 10, 27, 0, 0, 0));
    assert_eq!(first.end, Some(utc(2024, 10, 27, 1, 0, 0)));
    assert_eq!(second.start, utc(2024, 10, 27, 1, 0, 0));
    assert_eq!(second.end, Some(utc(2024, 10, 27, 2, 0, 0)));
    assert_eq!(local(first.start, paris), local(second.start, paris));
    assert_ne!(first, second);
}

#[test]
fn lord_howe_half_hour_shift_gives_half_hour_period() {
    // Australia/Lord_Howe falls back 30 minutes: 02:00 (+11) becomes 01:30 (+10:30).
    let lh = zone("Australia/Lord_Howe");
    let transition = utc(2024, 4, 6, 15, 0, 0);
    let before = period_at(Window::Hour, transition - NS, lh, GAUGE_START);
    assert_eq!(before.start, utc(2024, 4, 6, 14, 0, 0));
    assert_eq!(before.end, Some(transition));
    let after = period_at(Window::Hour, transition, lh, GAUGE_START);
    assert_eq!(after.start, transition);
    assert_eq!(after.end, Some(utc(2024, 4, 6, 15, 30, 0)));
    assert_eq!(local(after.start, lh).time().to_string(), "01:30:00");
}

#[test]
fn transition_inside_a_local_hour_splits_it() {
    // St. John's sprang forward at 00:01 local: 00:01 NST (-3:30) became
    // 01:01 NDT (-2:30), so the 00:00 hour lasted one minute.
    let st_johns = zone("America/St_Johns");
    let transition = utc(2010, 3, 14, 3, 31, 0);
    let short = period_at(
        Window::Hour,
        utc(2010, 3, 14, 3, 30, 30),
        st_johns,
        GAUGE_START,
    );
    assert_eq!(short.start, utc(2010, 3, 14, 3, 30, 0));
    assert_eq!(short.end, Some(transition));
    let next = period_at(Window::Hour, transition, st_johns, GAUGE_START);
    assert_eq!(
        local(next.start, st_johns).to_string(),
        "2010-03-14 01:01:00"
    );
    assert_eq!(next.end, Some(utc(2010, 3, 14, 4, 30, 0)));
}

#[test]
fn kolkata_and_kathmandu_hours_use_local_boundaries() {
    let kolkata = zone("Asia/Kolkata");
    let p = period_at(
        Window::Hour,
        utc(2024, 5, 1, 10, 45, 0),
        kolkata,
        GAUGE_START,
    );
    assert_eq!(p.start, utc(2024, 5, 1, 10, 30, 0));
    assert_eq!(p.end, Some(utc(2024, 5, 1, 11, 30, 0)));
    let kathmandu = zone("Asia/Kathmandu");
    let p = period_at(
        Window::Hour,
        utc(2024, 5, 1, 10, 0, 0),
        kathmandu,
        GAUGE_START,
    );
    assert_eq!(p.start, utc(2024, 5, 1, 9, 15, 0));
    assert_eq!(p.end, Some(utc(2024, 5, 1, 10, 15, 0)));
}

#[test]
fn skipped_midnight_starts_day_after_the_gap() {
    // Santiago, 2022-09-11: 00:00 (-04) jumps to 01:00 (-03).
    let santiago = zone("America/Santiago");
    assert_eq!(
        santiago.from_local_datetime(&NaiveDate::from_ymd_opt(2022, 9, 11).unwrap().into()),
        LocalResult::None
    );
    let day = period_at(
        Window::Day,
        utc(2022, 9, 11, 12, 0, 0),
        santiago,
        GAUGE_START,
    );
    assert_eq!(day.start, utc(2022, 9, 11, 4, 0, 0));
    assert_eq!(
        local(day.start, santiago).to_string(),
        "2022-09-11 01:00:00"
    );
    assert_eq!(hours(day), 23);
    let eve = period_at(Window::Day, day.start - NS, santiago, GAUGE_START);
    assert_eq!(eve.end, Some(day.start));
    assert_eq!(hours(eve), 24);

    // Havana, 2024-03-10: also skips midnight.
    let havana = zone("America/Havana");
    let day = period_at(Window::Day, utc(2024, 3, 10, 12, 0, 0), havana, GAUGE_START);
    assert_eq!(local(day.start, havana).to_string(), "2024-03-10 01:00:00");
    assert_eq!(hours(day), 23);
    // ... and repeats it in the fall (01:00 CDT back to 00:00 CST): the day
    // starts at the first midnight.
    let day = period_at(Window::Day, utc(2024, 11, 3, 12, 0, 0), havana, GAUGE_START);
    assert_eq!(day.start, utc(2024, 11, 3, 4, 0, 0));
    assert_eq!(hours(day), 25);

    // Historical Sao Paulo, 2018-11-04.
    let sp = zone("America/Sao_Paulo");
    let day = period_at(Window::Day, utc(2018, 11, 4, 12, 0, 0), sp, GAUGE_START);
    assert_eq!(local(day.start, sp).to_string(), "2018-11-04 01:00:00");
    assert_eq!(hours(day), 23);
}

#[test]
fn skipped_first_of_month_starts_month_after_the_gap() {
    // Asuncion moved clocks forward at 00:00 on Sunday 2017-10-01.
    let asuncion = zone("America/Asuncion");
    let month = period_at(
        Window::Month,
        utc(2017, 10, 15, 0, 0, 0),
        asuncion,
        GAUGE_START,
    );
    assert_eq!(
        local(month.start, asuncion).to_string(),
        "2017-10-01 01:00:00"
    );
    let september = period_at(Window::Month, month.start - NS, asuncion, GAUGE_START);
    assert_eq!(september.end, Some(month.start));
}

#[test]
fn skipped_day_has_no_period() {
    // Samoa skipped 2011-12-30 entirely when it crossed the date line.
    let apia = zone("Pacific/Apia");
    let dec29 = period_at(Window::Day, utc(2011, 12, 30, 9, 0, 0), apia, GAUGE_START);
    assert_eq!(local(dec29.start, apia).date().day(), 29);
    assert_eq!(hours(dec29), 24);
    let dec31 = period_at(Window::Day, dec29.end.unwrap(), apia, GAUGE_START);
    assert_eq!(local(dec31.start, apia).date().day(), 31);
    assert_eq!(hours(dec31), 24);
}

#[test]
fn leap_years_shape_february() {
    let days = |y| {
        let p = period_at(
            Window::Month,
            utc(y, 2, 10, 0, 0, 0),
            chrono_tz::UTC,
            GAUGE_START,
        );
        (p.end.unwrap() - p.start).num_days()
    };
    assert_eq!(days(2024), 29);
    assert_eq!(days(2023), 28);
    assert_eq!(days(2000), 29);
    assert_eq!(days(2100), 28);
}

#[test]
fn billing_anchor_on_31st_clamps_and_recovers() {
    let anchor = utc(2024, 1, 31, 0, 0, 0);
    let starts: Vec<_> = [(2, 29), (3, 31), (4, 30), (5, 31)]
        .into_iter()
        .map(|(m, d)| utc(2024, m, d, 0, 0, 0))
        .collect();
    for pair in starts.windows(2) {
        let p = period_at(Window::BillingPeriod, pair[0], chrono_tz::UTC, anchor);
        assert_eq!(
            p,
            Period {
                start: pair[0],
                end: Some(pair[1])
            }
        );
    }
    // 2023 is not a leap year.
    let anchor = utc(2023, 1, 31, 0, 0, 0);
    let p = period_at(
        Window::BillingPeriod,
        utc(2023, 3, 1, 0, 0, 0),
        chrono_tz::UTC,
        anchor,
    );
    assert_eq!(p.start, utc(2023, 2, 28, 0, 0, 0));
    assert_eq!(p.end, Some(utc(2023, 3, 31, 0, 0, 0)));
}

#[test]
fn billing_anchor_on_31st_in_local_time() {
    // 10:00 on the 31st in New York stays 10:00 local across DST, so its
    // UTC time moves from 15:00 to 14:00.
    let ny = zone("America/New_York");
    let anchor = at_local(ny, 2024, 1, 31, 10, 0);
    let p = period_at(Window::BillingPeriod, utc(2024, 3, 15, 0, 0, 0), ny, anchor);
    assert_eq!(p.start, at_local(ny, 2024, 2, 29, 10, 0));
    assert_eq!(p.end, Some(utc(2024, 3, 31, 14, 0, 0)));

    // 08:00 on the 31st in Tokyo is still the 30th in UTC: the local day of
    // month is the one kept.
    let tokyo = zone("Asia/Tokyo");
    let anchor = at_local(tokyo, 2024, 1, 31, 8, 0);
    assert_eq!(anchor, utc(2024, 1, 30, 23, 0, 0));
    let p = period_at(
        Window::BillingPeriod,
        utc(2024, 4, 15, 0, 0, 0),
        tokyo,
        anchor,
    );
    assert_eq!(p.start, at_local(tokyo, 2024, 3, 31, 8, 0));
    assert_eq!(p.end, Some(at_local(tokyo, 2024, 4, 30, 8, 0)));
}

#[test]
fn billing_time_in_dst_gap_moves_after_the_gap() {
    // Anchor at 02:30 Paris; on 2024-03-31 02:30 does not exist.
    let paris = zone("Europe/Paris");
    let anchor = at_local(paris, 2024, 1, 31, 2, 30);
    let p = period_at(
        Window::BillingPeriod,
        utc(2024, 4, 10, 0, 0, 0),
        paris,
        anchor,
    );
    assert_eq!(p.start, utc(2024, 3, 31, 1, 0, 0));
    assert_eq!(local(p.start, paris).to_string(), "2024-03-31 03:00:00");
    assert_eq!(p.end, Some(at_local(paris, 2024, 4, 30, 2, 30)));
}

#[test]
fn billing_ambiguous_anchor_time_takes_the_earlier_instant() {
    // 02:30 on 2023-10-29 happens twice in Paris; the anchor is the second.
    let paris = zone("Europe/Paris");
    let anchor = utc(2023, 10, 29, 1, 30, 0);
    assert_eq!(local(anchor, paris).to_string(), "2023-10-29 02:30:00");
    let p = period_at(Window::BillingPeriod, anchor, paris, anchor);
    assert_eq!(p.start, utc(2023, 10, 29, 0, 30, 0));
    assert_eq!(p.end, Some(utc(2023, 11, 29, 1, 30, 0)));
}

#[test]
fn billing_periods_extend_before_the_anchor() {
    let anchor = utc(2024, 3, 31, 12, 0, 0);
    let p = period_at(
        Window::BillingPeriod,
        utc(2024, 2, 10, 0, 0, 0),
        chrono_tz::UTC,
        anchor,
    );
    assert_eq!(p.start, utc(2024, 1, 31, 12, 0, 0));
    assert_eq!(p.end, Some(utc(2024, 2, 29, 12, 0, 0)));
    let p = period_at(
        Window::BillingPeriod,
        utc(2024, 3, 31, 11, 0, 0),
        chrono_tz::UTC,
        anchor,
    );
    assert_eq!(p.start, utc(2024, 2, 29, 12, 0, 0));
    assert_eq!(p.end, Some(anchor));
    let p = period_at(
        Window::BillingPeriod,
        utc(1999, 12, 31, 13, 0, 0),
        chrono_tz::UTC,
        anchor,
    );
    assert_eq!(p.start, utc(1999, 12, 31, 12, 0, 0));
    assert_eq!(p.end, Some(utc(2000, 1, 31, 12, 0, 0)));
}

#[test]
fn extreme_instants_do_not_panic() {
    let instants = [
        DateTime::<Utc>::MIN_UTC,
        DateTime::<Utc>::MAX_UTC,
        DateTime::<Utc>::UNIX_EPOCH,
        utc(9000, 12, 31, 23, 59, 59),
    ];
    let zones = ["UTC", "Pacific/Kiritimati", "Pacific/Niue", "Europe/Paris"];
    for w in Window::ALL {
        for &at in &instants {
            for &anchor in &instants {
                for z in zones {
                    let _ = period_at(w, at, zone(z), anchor);
                }
            }
        }
    }
}
