//! Access rules per status: a plain level, or a level with features it turns off and
//! metrics it keeps consumable. Whatever the catalog declares, a degraded result is
//! never more than the full one, full access removes nothing, and a metric is consumable
//! under `read_only` exactly when the rule keeps it.

mod common;

use std::collections::BTreeMap;

use common::{sub, t0};
use meter::catalog::{parse, AccessLevel, Catalog};
use meter::decision::Reason;
use meter::lifecycle::Status;
use meter::quota::{plan_request, Demand, Intent, Planned};
use meter::resolve::{resolve, Entitlements, Source};
use proptest::prelude::*;

const FEATURES: [&str; 3] = ["f0", "f1", "f2"];
const METRICS: [&str; 3] = ["m0", "m1", "m2"];

/// A catalog with boolean features f0..f2, metrics m0..m2 each with a metered feature
/// e0..e2, one plan `p` granting the chosen ones, and `access` as written.
fn catalog(features: &[bool], metrics: &[bool], access: &str) -> Catalog {
    let mut y = String::from("version: 1\n");
    y.push_str(access);
    y.push_str("metrics:\n");
    for m in METRICS {
        y.push_str(&format!("  {m}: {{unit: u}}\n"));
    }
    y.push_str("features:\n");
    for f in FEATURES {
        y.push_str(&format!("  {f}: {{kind: boolean}}\n"));
    }
    for (i, m) in METRICS.iter().enumerate() {
        y.push_str(&format!("  e{i}: {{kind: metered, metric: {m}}}\n"));
    }
    y.push_str("plans:\n  p:\n    versions:\n      1:\n        features: {");
    let on: Vec<String> = FEATURES
        .iter()
        .zip(features)
        .map(|(f, on)| format!("{f}: {on}"))
        .collect();
    y.push_str(&on.join(", "));
    y.push_str("}\n        limits:\n");
    for (m, granted) in METRICS.iter().zip(metrics) {
        if *granted {
            y.push_str(&format!("          {m}: [{{window: month, amount: 10}}]\n"));
        }
    }
    parse(&y, "access").unwrap_or_else(|e| panic!("{e}\n{y}"))
}

/// A valid rule for `grace`: the level, features off, metrics kept consumable.
#[derive(Debug, Clone)]
struct Rule {
    level: AccessLevel,
    off: Vec<String>,
    consumable: Vec<String>,
}

impl Rule {
    fn yaml(&self) -> String {
        format!(
            "access:\n  grace:\n    level: {}\n    features_off: [{}]\n    consumable: [{}]\n",
            self.level.as_str(),
            self.off.join(", "),
            self.consumable.join(", ")
        )
    }
}

fn rule() -> impl Strategy<Value = Rule> {
    let level = prop::sample::select(vec![
        AccessLevel::Full,
        AccessLevel::ReadOnly,
        AccessLevel::None,
    ]);
    let all_features: Vec<String> = FEATURES
        .iter()
        .map(|f| f.to_string())
        .chain((0..3).map(|i| format!("e{i}")))
        .collect();
    (
        level,
        prop::sample::subsequence(all_features.clone(), 0..=all_features.len()),
        prop::sample::subsequence(METRICS.to_vec(), 0..=3),
    )
        .prop_map(|(level, off, consumable)| {
            let off = if level == AccessLevel::None {
                vec![]
            } else {
                off
            };
            // The rules validation enforces: consumable only under read_only, and not
            // the metric of a feature turned off.
            let consumable = if level == AccessLevel::ReadOnly {
                consumable
                    .into_iter()
                    .filter(|m| !off.contains(&format!("e{}", &m[1..])))
                    .map(String::from)
                    .collect()
            } else {
                vec![]
            };
            Rule {
                level,
                off,
                consumable,
            }
        })
}

fn in_status(c: &Catalog, status: Status) -> Entitlements {
    let mut s = sub("acme", "p");
    s.status = status;
    resolve(c, &s, &[], t0())
}

/// The decision for consuming one unit of `metric`, when decided before storage.
fn consume(c: &Catalog, e: &Entitlements, metric: &str) -> Option<Reason> {
    let dims = BTreeMap::new();
    let demand = Demand {
        metric,
        amount: 1,
        dimensions: &dims,
        intent: Intent::Reserve,
    };
    match plan_request(c, e, &demand, t0()).unwrap() {
        Planned::Decided(d) => Some(d.reason),
        Planned::Plan(_) => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_degraded_result_is_never_more_than_the_full_one(
        features in prop::collection::vec(any::<bool>(), 3),
        metrics in prop::collection::vec(any::<bool>(), 3),
        rule in rule(),
    ) {
        let c = catalog(&features, &metrics, &rule.yaml());
        let full = in_status(&c, Status::Active);
        let degraded = in_status(&c, Status::Grace);
        prop_assert_eq!(degraded.access, rule.level);

        // Full access removes nothing: every feature as granted, every metric open.
        prop_assert!(full.closed.is_empty());
        for (code, g) in &full.features {
            prop_assert!(g.off_by_status().is_none(), "{}", code);
        }

        // Degraded: never a feature full does not have, with the same value when on; the
        // same limits; a closed metric for every one full closes (none).
        for (code, g) in &degraded.features {
            let f = &full.features[code];
            if g.enabled() {
                prop_assert!(f.enabled(), "{} on only when degraded", code);
                prop_assert_eq!(&g.value, &f.value);
            }
            let off = rule.off.contains(code);
            prop_assert_eq!(off, g.off_by_status() == Some(Status::Grace), "{}", code);
            if off {
                prop_assert!(!g.enabled());
                prop_assert_eq!(g.sources.len(), 1);
                prop_assert_eq!(&g.sources[0].source, &Source::Status { status: Status::Grace });
            }
        }
        prop_assert_eq!(&degraded.limits, &full.limits);
        prop_assert!(degraded.closed.keys().all(|m| degraded.limits.contains_key(m)));

        for m in METRICS {
            if !degraded.limits.contains_key(m) {
                continue;
            }
            let feature_off = rule.off.contains(&format!("e{}", &m[1..]));
            let open = match rule.level {
                AccessLevel::Full => !feature_off,
                AccessLevel::ReadOnly => rule.consumable.iter().any(|k| k == m),
                AccessLevel::None => false,
            };
            // A kept metric is consumable exactly when the level is read_only.
            if rule.level == AccessLevel::ReadOnly {
                prop_assert_eq!(open, rule.consumable.iter().any(|k| k == m));
            }
            prop_assert_eq!(!degraded.closed.contains_key(m), open, "{}", m);
            if let Some(closed) = degraded.closed.get(m) {
                prop_assert_eq!(&closed.rule.source, &Source::Status { status: Status::Grace });
                prop_assert_eq!(closed.feature.is_some(), feature_off);
            }

            // And decisions follow: consuming a closed metric is refused for the status,
            // an open one goes to storage as under full access.
            let reason = consume(&c, &degraded, m);
            let expected = match (rule.level, open, feature_off) {
                (AccessLevel::None, _, _) => Some(Reason::SubscriptionInactive),
                (_, true, _) => None,
                (_, false, true) => Some(Reason::SubscriptionRestricted),
                (_, false, false) => Some(Reason::SubscriptionReadOnly),
            };
            prop_assert_eq!(reason, expected, "{}", m);
            prop_assert_eq!(consume(&c, &full, m), None);
        }
        // The version tells the two apart whenever they differ.
        if degraded.closed != full.closed || degraded.features != full.features {
            prop_assert_ne!(degraded.version, full.version);
        }
    }
}

#[test]
fn a_plain_level_still_works_and_round_trips_as_written() {
    let c = catalog(
        &[true, true, true],
        &[true, true, true],
        "access:\n  grace: read_only\n  past_due: full\n",
    );
    assert_eq!(c.access_rule(Status::Grace).level, AccessLevel::ReadOnly);
    let e = in_status(&c, Status::Grace);
    assert_eq!(e.closed.len(), 3);
    assert!(e.features.values().all(|g| g.off_by_status().is_none()));
    let text = serde_yaml_ng::to_string(&c).unwrap();
    assert!(text.contains("grace: read_only"), "{text}");
    assert_eq!(parse(&text, "again").unwrap(), c);

    let c = catalog(
        &[true, true, true],
        &[true, true, true],
        "access:\n  grace: {level: read_only, features_off: [f1], consumable: [m2]}\n",
    );
    let text = serde_yaml_ng::to_string(&c).unwrap();
    assert_eq!(parse(&text, "again").unwrap(), c);
}

#[test]
fn an_override_does_not_lift_a_feature_the_status_turns_off() {
    use meter::grant::{Change, Override};
    let c = catalog(
        &[false, false, false],
        &[true, true, true],
        "access:\n  past_due: {level: full, features_off: [f0, e1]}\n",
    );
    let mut s = sub("acme", "p");
    s.status = Status::PastDue;
    let o = Override {
        id: "o1".into(),
        tenant: "acme".into(),
        change: Change::EnableFeature {
            feature: "f0".into(),
        },
        valid_from: t0(),
        valid_to: None,
        actor: "support".into(),
        reason: "goodwill".into(),
        created_at: t0(),
    };
    let e = resolve(&c, &s, &[o], t0());
    assert_eq!(e.features["f0"].off_by_status(), Some(Status::PastDue));
    // Full level: only the metric of the metered feature turned off is closed.
    assert_eq!(e.closed.keys().collect::<Vec<_>>(), vec!["m1"]);
    assert_eq!(consume(&c, &e, "m1"), Some(Reason::SubscriptionRestricted));
    assert_eq!(consume(&c, &e, "m0"), None);
}
