//! Malformed catalogs are refused with the file, the path inside it and the reason.

use meter::catalog::{parse, validate_successor};

fn err(yaml: &str) -> String {
    parse(yaml, "cat.yaml").map(|_| ()).unwrap_err().to_string()
}

const HEAD: &str =
    "version: 1\nmetrics:\n  api_calls: {unit: call}\n  seats: {unit: seat, kind: gauge}\n";

#[test]
fn unknown_metric_names_path() {
    let e = err(&format!("{HEAD}plans:\n  free:\n    versions:\n      1:\n        limits:\n          calls: [{{window: month, amount: 5}}]\n"));
    assert!(
        e.contains("cat.yaml: plans.free.versions.1.limits.calls: unknown metric \"calls\""),
        "{e}"
    );
}

#[test]
fn duplicate_keys_are_refused() {
    let e = err(&format!(
        "{HEAD}plans:\n  free: {{versions: {{1: {{}}}}}}\n  free: {{versions: {{1: {{}}}}}}\n"
    ));
    assert!(e.contains("duplicate key \"free\""), "{e}");
    assert!(e.starts_with("cat.yaml: plans"), "{e}");
}

#[test]
fn negative_and_overflowing_amounts_are_refused() {
    let e = err(&format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: month, amount: -5}}]}}}}}}}}\n"));
    assert!(
        e.contains("plans.free.versions.1.limits.api_calls[0].amount: must not be negative"),
        "{e}"
    );
    let e = err(&format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: month, amount: 99999999999999999999999}}]}}}}}}}}\n"));
    assert!(e.contains("api_calls[0].amount: is too large"), "{e}");
    let e = err(&format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: month, amount: 9223372036854775808}}]}}}}}}}}\n"));
    assert!(e.contains("api_calls[0].amount: is too large"), "{e}");
}

#[test]
fn windows_must_fit_the_limit_kind() {
    let e = err(&format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: second, amount: 5}}], seats: [{{window: month, amount: 3}}]}}}}}}}}\n"));
    assert!(
        e.contains("api_calls[0].rate: a second or minute window needs a rate"),
        "{e}"
    );
    assert!(
        e.contains("api_calls[0].amount: rate windows take rate and burst"),
        "{e}"
    );
    assert!(
        e.contains("seats[0].window: a gauge metric takes window none"),
        "{e}"
    );
    let e = err(&format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: none, amount: 5}}]}}}}}}}}\n"));
    assert!(e.contains("window none is for gauge metrics"), "{e}");
    let e = err(&format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: fortnight, amount: 5}}]}}}}}}}}\n"));
    assert!(e.contains("api_calls[0].window"), "{e}");
}

#[test]
fn unknown_fields_and_empty_files_are_refused() {
    let e = err(&format!(
        "{HEAD}plans:\n  free: {{versions: {{1: {{limts: {{}}}}}}}}\n"
    ));
    assert!(e.contains("unknown field `limts`"), "{e}");
    assert!(err("").contains("the catalog is empty"));
    assert!(
        err("version: 2\nmetrics: {a: {unit: x}}\nplans: {p: {versions: {1: {}}}}\n")
            .contains("version: unsupported catalog version 2")
    );
}

#[test]
fn published_versions_are_immutable() {
    let v1 = format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: month, amount: 5}}]}}}}}}}}\n");
    let changed = v1.replace("amount: 5", "amount: 6");
    let added = format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: month, amount: 5}}]}}}}, 2: {{limits: {{api_calls: [{{window: month, amount: 6}}]}}}}}}}}\n");
    let old = parse(&v1, "a").unwrap();
    let problems = validate_successor(&old, &parse(&changed, "b").unwrap()).unwrap_err();
    assert_eq!(problems[0].path, "plans.free.versions.1");
    assert!(problems[0].reason.contains("immutable"));
    assert!(validate_successor(&old, &parse(&added, "c").unwrap()).is_ok());
    let removed = format!("{HEAD}plans:\n  pro: {{versions: {{1: {{}}}}}}\n");
    let problems = validate_successor(&old, &parse(&removed, "d").unwrap()).unwrap_err();
    assert!(problems[0].reason.contains("cannot be removed"));
    // Drafts may change freely.
    let draft = v1.replace("{1: {limits", "{1: {published: false, limits");
    let old = parse(&draft, "e").unwrap();
    assert!(validate_successor(&old, &parse(&changed, "f").unwrap()).is_ok());
}

#[test]
fn scope_belongs_to_rate_limits() {
    let e = err(&format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: month, amount: 5, scope: global}}], seats: [{{window: none, amount: 3, scope: node}}]}}}}}}}}\n"));
    assert!(
        e.contains("plans.free.versions.1.limits.api_calls[0].scope: only rate limits (second, minute) have a scope"),
        "{e}"
    );
    assert!(e.contains("seats[0].scope: only rate limits"), "{e}");
    let e = err(&format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: second, rate: 5, scope: everywhere}}]}}}}}}}}\n"));
    assert!(e.contains("api_calls[0].scope"), "{e}");
    assert!(e.contains("unknown variant `everywhere`"), "{e}");
    for scope in ["node", "global"] {
        let ok = format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: minute, rate: 5, burst: 9, scope: {scope}}}]}}}}}}}}\n");
        parse(&ok, "cat.yaml").unwrap();
    }
}

#[test]
fn global_scope_stays_in_the_exact_range_of_the_shared_store() {
    // 37,529,996 per minute is the largest burst a Lua number keeps exact.
    let at = |rate: &str, burst: &str| {
        format!("{HEAD}plans:\n  free: {{versions: {{1: {{limits: {{api_calls: [{{window: minute, rate: {rate}{burst}, scope: global}}]}}}}}}}}\n")
    };
    parse(&at("100", ", burst: 37529996"), "cat.yaml").unwrap();
    let e = err(&at("100", ", burst: 37529997"));
    assert!(
        e.contains("api_calls[0].burst: a burst of 37529997 per minute is too large for scope global (at most 37529996"),
        "{e}"
    );
    // The burst defaults to the rate: the rate is named then.
    let e = err(&at("40000000", ""));
    assert!(e.contains("api_calls[0].rate: a burst of 40000000"), "{e}");
    // The same limit is fine on a node.
    parse(
        &at("40000000", "").replace("scope: global", "scope: node"),
        "cat.yaml",
    )
    .unwrap();
}

#[test]
fn prices_are_exact_on_billing_limits_of_plans_with_a_currency() {
    let priced = |currency: &str, limit: &str| {
        format!("version: 1\n{currency}metrics:\n  api_calls: {{unit: call}}\nplans:\n  pro: {{versions: {{1: {{limits: {{api_calls: [{limit}]}}}}}}}}\n")
    };
    let ok = priced(
        "currency: EUR\n",
        "{window: month, amount: 5, unit_price: \"0.002\"}",
    );
    let c = parse(&ok, "cat.yaml").unwrap();
    let price = c.plans["pro"].versions[&1].limits["api_calls"][0].unit_price;
    assert_eq!(price.map(|p| p.micros()), Some(2_000));
    let e = err(&priced(
        "",
        "{window: month, amount: 5, unit_price: \"0.002\"}",
    ));
    assert!(
        e.contains("cat.yaml: currency: a plan sets a unit_price"),
        "{e}"
    );
    let e = err(&priced(
        "currency: usd\n",
        "{window: month, amount: 5, unit_price: \"1\"}",
    ));
    assert!(
        e.contains("currency: \"usd\" is not an ISO 4217 code"),
        "{e}"
    );
    let e = err(&priced(
        "currency: USD\n",
        "{window: day, amount: 5, unit_price: \"1\"}",
    ));
    assert!(
        e.contains("api_calls[0].unit_price: billing prices the allowance of a billing_period or month limit"),
        "{e}"
    );
    // Prices are read from their text, never through a float, with at most six decimals.
    let unquoted = priced(
        "currency: USD\n",
        "{window: month, amount: 5, unit_price: 0.1}",
    );
    let c = parse(&unquoted, "cat.yaml").unwrap();
    let price = c.plans["pro"].versions[&1].limits["api_calls"][0].unit_price;
    assert_eq!(price.map(|p| p.micros()), Some(100_000));
    for bad in ["\"-1\"", "\"0.0000001\"", "1e3"] {
        let e = err(&priced(
            "currency: USD\n",
            &format!("{{window: month, amount: 5, unit_price: {bad}}}"),
        ));
        assert!(e.contains("unit_price"), "{bad}: {e}");
    }
    let addon = format!("{}addons:\n  more: {{limits: {{api_calls: [{{window: month, amount: 5, unit_price: \"1\"}}]}}}}\n", priced("currency: USD\n", "{window: month, amount: 5}"));
    let e = err(&addon);
    assert!(
        e.contains("addons.more.limits.api_calls[0].unit_price: only plans set prices"),
        "{e}"
    );
}

#[test]
fn grace_days_are_at_least_one_and_at_most_a_year() {
    const PLAN: &str = "plans:\n  free: {versions: {1: {}}}\n";
    for (days, says) in [
        ("0", "cat.yaml: grace_days: must be at least 1"),
        ("366", "cat.yaml: grace_days: 366 days is more than 365"),
        ("-1", "cat.yaml: grace_days: must not be negative"),
    ] {
        let e = err(&format!(
            "version: 1\ngrace_days: {days}\n{}{PLAN}",
            &HEAD[11..]
        ));
        assert!(e.starts_with(says), "{days}: {e}");
    }
    let c = parse(&format!("{HEAD}grace_days: 14\n{PLAN}"), "cat.yaml").unwrap();
    assert_eq!(c.status_machine().grace(), chrono::Duration::days(14));
    let c = parse(&format!("{HEAD}{PLAN}"), "cat.yaml").unwrap();
    assert_eq!(
        c.status_machine().grace(),
        chrono::Duration::days(meter::status_machine::DEFAULT_GRACE_DAYS.into())
    );
}

#[test]
fn access_rules_name_known_statuses_features_and_metrics() {
    const REST: &str = "features:\n  reports: {kind: boolean}\n  export: {kind: metered, metric: api_calls}\nplans:\n  free: {versions: {1: {}}}\n";
    let e = err(&format!("{HEAD}access:\n  overdue: read_only\n{REST}"));
    assert!(
        e.starts_with("cat.yaml: access")
            && e.contains("unknown variant `overdue`, expected one of `pending`"),
        "{e}"
    );
    let e = err(&format!("{HEAD}access:\n  grace: readonly\n{REST}"));
    assert!(e.contains("access.grace") && e.contains("readonly"), "{e}");
    let e = err(&format!(
        "{HEAD}access:\n  grace: {{level: read_only, features_off: [reports, repots], consumable: [seats, sets]}}\n{REST}"
    ));
    assert!(
        e.contains("access.grace.features_off[1]: unknown feature \"repots\""),
        "{e}"
    );
    assert!(
        e.contains("access.grace.consumable[1]: unknown metric \"sets\""),
        "{e}"
    );
    let e = err(&format!(
        "{HEAD}access:\n  grace: {{level: read_only, featurs_off: [reports]}}\n{REST}"
    ));
    assert!(e.contains("unknown field `featurs_off`"), "{e}");
    // Lists only where the level gives them a meaning, and no contradiction.
    let e = err(&format!(
        "{HEAD}access:\n  past_due: {{level: full, consumable: [seats]}}\n  suspended: {{level: none, features_off: [reports]}}\n  grace: {{level: read_only, features_off: [export], consumable: [api_calls]}}\n{REST}"
    ));
    assert!(
        e.contains("access.past_due.consumable: only level read_only keeps metrics consumable"),
        "{e}"
    );
    assert!(
        e.contains("access.suspended.features_off: with level none"),
        "{e}"
    );
    assert!(
        e.contains("access.grace.consumable[0]: api_calls is the metric of export, which features_off turns off"),
        "{e}"
    );
}
