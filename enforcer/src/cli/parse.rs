//! Parsers for option values richer than a plain string: dimensions (`key=value`), add-ons
//! (`code[:qty]`), plan references (`plan[@version]`), JSON feature values, instants and
//! durations.
//!
//! They serve as clap `value_parser`s, so a malformed value is reported by clap next to the
//! option that carried it, before anything is sent. They only check shape: the node stays
//! the judge of what is valid (known codes, allowed characters, ranges), so that its error
//! messages remain the single source of truth.

use std::collections::HashMap;
use std::time::Duration;

use allot_proto::v1::{value::Kind, AddonItem, StringList, Value};
use chrono::{DateTime, SubsecRound, Utc};

/// A request dimension, `key=value`. The value may contain `=`; only the first one splits.
pub fn dimension(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if key.is_empty() {
        return Err(format!("missing key before '=' in {s:?}"));
    }
    Ok((key.to_string(), value.to_string()))
}

/// Gathers repeated `--dim` options into the request's map. A key given twice is refused:
/// letting the last one win silently would hide a typo in a script.
pub fn dimensions(pairs: &[(String, String)]) -> Result<HashMap<String, String>, String> {
    let mut map = HashMap::with_capacity(pairs.len());
    for (key, value) in pairs {
        if map.insert(key.clone(), value.clone()).is_some() {
            return Err(format!("--dim: key {key:?} given more than once"));
        }
    }
    Ok(map)
}

/// An add-on, `code` or `code:quantity`. Without a quantity it is 1.
pub fn addon(s: &str) -> Result<AddonItem, String> {
    let (code, quantity) = match s.rsplit_once(':') {
        Some((code, qty)) => {
            let quantity: u32 = qty.parse().map_err(|_| {
                format!("expected CODE or CODE:QUANTITY with a whole quantity, got {s:?}")
            })?;
            // On the wire 0 means 1, which would make `seats:0` quietly add one seat.
            if quantity == 0 {
                return Err(format!("quantity must be at least 1 in {s:?}"));
            }
            (code, quantity)
        }
        None => (s, 1),
    };
    if code.is_empty() {
        return Err(format!("missing add-on code in {s:?}"));
    }
    Ok(AddonItem {
        code: code.to_string(),
        quantity,
    })
}

/// A plan, optionally pinned to a version: `pro` or `pro@2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRef {
    /// Plan code.
    pub code: String,
    /// Version, when one was given.
    pub version: Option<u32>,
}

/// Parses `plan` or `plan@version`, the form the node prints plans in.
pub fn plan_ref(s: &str) -> Result<PlanRef, String> {
    let (code, version) = match s.split_once('@') {
        Some((code, version)) => {
            let version = version.parse().map_err(|_| {
                format!("expected PLAN or PLAN@VERSION with a whole version, got {s:?}")
            })?;
            (code, Some(version))
        }
        None => (s, None),
    };
    if code.is_empty() {
        return Err(format!("missing plan code in {s:?}"));
    }
    Ok(PlanRef {
        code: code.to_string(),
        version,
    })
}

/// A feature value written as JSON: `true`, `123`, `"gold"` or `["a","b"]`.
///
/// Bare words are refused rather than taken as strings, so that a typo such as `ture` does
/// not become the string "ture".
pub fn feature_value(s: &str) -> Result<Value, String> {
    use serde_json::Value as Json;

    let json: Json = serde_json::from_str(s).map_err(|_| {
        format!(
            "{s:?} is not JSON; give true or false, an integer, a quoted string \
             ('\"gold\"') or a list of strings ('[\"a\",\"b\"]')"
        )
    })?;
    let kind = match json {
        Json::Bool(b) => Kind::BoolValue(b),
        Json::Number(n) => Kind::IntValue(
            n.as_i64()
                .ok_or_else(|| format!("{s} is not a whole number that fits in 64 bits"))?,
        ),
        Json::String(text) => Kind::StringValue(text),
        Json::Array(items) => Kind::ListValue(StringList {
            items: items
                .into_iter()
                .map(|item| match item {
                    Json::String(text) => Ok(text),
                    other => Err(format!("list items must be strings, got {other}")),
                })
                .collect::<Result<_, _>>()?,
        }),
        Json::Null | Json::Object(_) => {
            return Err(format!(
            "{s} is not a feature value: give a boolean, an integer, a string or a list of strings"
        ))
        }
    };
    Ok(Value { kind: Some(kind) })
}

/// An instant: RFC 3339 (`2025-03-01T00:00:00Z`, any offset), `now`, or `now+DURATION` /
/// `now-DURATION` (`now+30d`), the last being handy to preview what a tenant will have.
pub fn instant(s: &str) -> Result<DateTime<Utc>, String> {
    instant_at(s, now())
}

/// The current instant in whole seconds: what gets stored and shown back (a trial end,
/// a billing anchor) reads better without nine digits of noise.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(0)
}

/// [`instant`] with the clock as an argument, for tests.
fn instant_at(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("now") {
        if rest.is_empty() {
            return Ok(now);
        }
        let (later, offset) = if let Some(d) = rest.strip_prefix('+') {
            (true, d)
        } else if let Some(d) = rest.strip_prefix('-') {
            (false, d)
        } else {
            return Err(format!(
                "expected now, now+DURATION or now-DURATION, got {s:?}"
            ));
        };
        let offset = duration(offset.trim())?;
        let offset =
            chrono::Duration::from_std(offset).map_err(|_| format!("{s:?} is too far from now"))?;
        let at = if later {
            now.checked_add_signed(offset)
        } else {
            now.checked_sub_signed(offset)
        };
        return at.ok_or_else(|| format!("{s:?} is too far from now"));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!(
                "{s:?} is not an instant: give RFC 3339 (2025-03-01T00:00:00Z) or \
                 now[+-DURATION] ({e})"
            )
        })
}

/// A duration in humantime form: `60s`, `15m`, `48h`, `7days`, `1h 30m`.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 60s, 15m, 48h or 7days ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimension_splits_at_the_first_equals_sign() {
        assert_eq!(
            dimension("api_key=k1").unwrap(),
            ("api_key".to_string(), "k1".to_string())
        );
        assert_eq!(
            dimension("q=a=b").unwrap(),
            ("q".to_string(), "a=b".to_string())
        );
        // An empty value is the node's to judge.
        assert_eq!(dimension("k=").unwrap(), ("k".to_string(), String::new()));
    }

    #[test]
    fn dimension_needs_a_key_and_an_equals_sign() {
        assert!(dimension("api_key").unwrap_err().contains("KEY=VALUE"));
        assert!(dimension("=v").unwrap_err().contains("missing key"));
    }

    #[test]
    fn dimensions_refuse_a_repeated_key() {
        let pairs = vec![
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ];
        let map = dimensions(&pairs).unwrap();
        assert_eq!(map.len(), 2);
        assert_eq!(map["a"], "1");

        let repeated = vec![
            ("a".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
        ];
        assert!(dimensions(&repeated).unwrap_err().contains("\"a\""));
    }

    #[test]
    fn addon_quantity_defaults_to_one() {
        let item = addon("sso").unwrap();
        assert_eq!((item.code.as_str(), item.quantity), ("sso", 1));
        let item = addon("seats:5").unwrap();
        assert_eq!((item.code.as_str(), item.quantity), ("seats", 5));
    }

    #[test]
    fn addon_rejects_bad_quantities_and_empty_codes() {
        assert!(addon("seats:0").unwrap_err().contains("at least 1"));
        assert!(addon("seats:many").is_err());
        assert!(addon("seats:-1").is_err());
        assert!(addon("seats:").is_err());
        assert!(addon(":3").unwrap_err().contains("missing add-on code"));
        assert!(addon("").is_err());
    }

    #[test]
    fn plan_ref_takes_an_optional_version() {
        assert_eq!(
            plan_ref("pro").unwrap(),
            PlanRef {
                code: "pro".into(),
                version: None
            }
        );
        assert_eq!(
            plan_ref("pro@2").unwrap(),
            PlanRef {
                code: "pro".into(),
                version: Some(2)
            }
        );
        assert!(plan_ref("pro@").is_err());
        assert!(plan_ref("pro@two").is_err());
        assert!(plan_ref("@2").unwrap_err().contains("missing plan code"));
        assert!(plan_ref("").is_err());
    }

    #[test]
    fn feature_value_maps_json_kinds() {
        let kind = |s| feature_value(s).unwrap().kind.unwrap();
        assert_eq!(kind("true"), Kind::BoolValue(true));
        assert_eq!(kind("false"), Kind::BoolValue(false));
        assert_eq!(kind("123"), Kind::IntValue(123));
        assert_eq!(kind("-7"), Kind::IntValue(-7));
        assert_eq!(kind("\"gold\""), Kind::StringValue("gold".into()));
        assert_eq!(
            kind(r#"["a","b"]"#),
            Kind::ListValue(StringList {
                items: vec!["a".into(), "b".into()]
            })
        );
        assert_eq!(kind("[]"), Kind::ListValue(StringList { items: vec![] }));
    }

    #[test]
    fn feature_value_refuses_what_has_no_proto_form() {
        assert!(feature_value("gold").unwrap_err().contains("not JSON"));
        assert!(feature_value("ture").is_err());
        assert!(feature_value("1.5").unwrap_err().contains("whole number"));
        assert!(feature_value("18446744073709551615").is_err());
        assert!(feature_value("null").is_err());
        assert!(feature_value(r#"{"a":1}"#).is_err());
        assert!(feature_value(r#"["a",1]"#)
            .unwrap_err()
            .contains("must be strings"));
    }

    #[test]
    fn instant_reads_rfc3339_in_any_offset() {
        let t = instant("2025-03-01T00:00:00Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2025-03-01T00:00:00+00:00");
        let t = instant("2025-03-01T01:30:00+01:30").unwrap();
        assert_eq!(t.to_rfc3339(), "2025-03-01T00:00:00+00:00");
        let t = instant("2025-03-01T00:00:00.250Z").unwrap();
        assert_eq!(t.timestamp_subsec_millis(), 250);
    }

    #[test]
    fn instant_reads_now_and_offsets_from_it() {
        let now = DateTime::parse_from_rfc3339("2025-03-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(instant_at("now", now).unwrap(), now);
        assert_eq!(
            instant_at("now+30d", now).unwrap().to_rfc3339(),
            "2025-03-31T00:00:00+00:00"
        );
        assert_eq!(
            instant_at("now-1h 30m", now).unwrap().to_rfc3339(),
            "2025-02-28T22:30:00+00:00"
        );
    }

    #[test]
    fn instant_refuses_other_forms() {
        assert!(instant("2025-03-01").unwrap_err().contains("RFC 3339"));
        assert!(instant("tomorrow").is_err());
        assert!(instant("nowish").is_err());
        assert!(instant("now+soon").is_err());
    }

    #[test]
    fn duration_reads_humantime() {
        assert_eq!(duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(duration("48h").unwrap(), Duration::from_secs(48 * 3600));
        assert_eq!(duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(duration("60").unwrap_err().contains("not a duration"));
    }
}
