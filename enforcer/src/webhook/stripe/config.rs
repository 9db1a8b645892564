//! The Stripe section of a node's configuration: the signing secret, the tolerance
//! window, where the Allot tenant id is found, and which Stripe prices (or products)
//! sell which plan version or add-on.
//!
//! In TOML (the same keys in YAML):
//!
//! ```toml
//! signing_secret = "whsec_…"        # the endpoint's secret, from the Stripe dashboard
//! tolerance = "5m"                  # default 300 s
//! tenant_metadata_key = "tenant"    # default: subscription metadata `tenant`
//!
//! [prices]
//! price_1PpRo = { plan = "pro", version = 1 }
//! price_1PpSe = { addon = "extra_seats_10" }
//!
//! [products]                        # for prices not listed above
//! prod_QhEnt = { plan = "enterprise", version = 1 }
//! ```
//!
//! Unknown keys are refused, so a typo never silently does nothing. A plan target names
//! its version: a price sells one version, and tenants stay on it when a new one is
//! published (grandfathering). [`StripeConfig::validate`] checks every target against the
//! catalog and names the key of the first wrong one.

use std::collections::BTreeMap;

use meter::catalog::Catalog;
use meter::lifecycle::PlanRef;
use serde::{Deserialize, Deserializer};
use thiserror::Error;

use super::signature::DEFAULT_TOLERANCE_SECS;

/// The subscription metadata key naming the Allot tenant, when not configured.
pub const DEFAULT_TENANT_METADATA_KEY: &str = "tenant";

/// The Stripe section, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeConfig {
    /// The webhook endpoint's signing secret (`whsec_…`).
    pub signing_secret: SigningSecret,
    /// How far a delivery's signed timestamp may be from the receiver's clock, either
    /// way, as a duration (`"300s"`, `"5m"`). Default 300 s.
    #[serde(default = "default_tolerance", deserialize_with = "seconds")]
    pub tolerance: u64,
    /// The Stripe subscription's metadata key whose value is the Allot tenant id.
    #[serde(default = "default_tenant_key")]
    pub tenant_metadata_key: String,
    /// Stripe price id → what it sells.
    #[serde(default)]
    pub prices: BTreeMap<String, Target>,
    /// Stripe product id → what it sells, for prices not in `prices`.
    #[serde(default)]
    pub products: BTreeMap<String, Target>,
}

/// What a price or product sells: a plan version, or an add-on (quantity from the
/// subscription item).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Plan code.
    #[serde(default)]
    pub plan: Option<String>,
    /// Plan version (required with `plan`).
    #[serde(default)]
    pub version: Option<u32>,
    /// Add-on code.
    #[serde(default)]
    pub addon: Option<String>,
}

/// A validated target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sells {
    /// A plan version.
    Plan(PlanRef),
    /// An add-on.
    Addon(String),
}

/// The signing secret: never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SigningSecret(String);

impl SigningSecret {
    /// A secret from its text.
    pub fn new(secret: impl Into<String>) -> Self {
        SigningSecret(secret.into())
    }

    /// The key bytes: Stripe uses the whole `whsec_…` string.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret([redacted])")
    }
}

/// A Stripe section that cannot be used; names the key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// A value is missing or out of range.
    #[error("{key}: {reason}")]
    Invalid {
        /// The key, like `prices.price_123`.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A target names a plan the catalog does not have.
    #[error("{key}: unknown plan {code:?}; the catalog has {known}")]
    UnknownPlan {
        /// The key.
        key: String,
        /// The plan code.
        code: String,
        /// The catalog's plan codes.
        known: String,
    },
    /// A target names a plan version that does not exist or is a draft.
    #[error("{key}: plan {code} has no published version {version}")]
    UnknownVersion {
        /// The key.
        key: String,
        /// The plan code.
        code: String,
        /// The version.
        version: u32,
    },
    /// A target names an add-on the catalog does not have.
    #[error("{key}: unknown add-on {code:?}; the catalog has {known}")]
    UnknownAddon {
        /// The key.
        key: String,
        /// The add-on code.
        code: String,
        /// The catalog's add-on codes.
        known: String,
    },
}

/// The mapping, checked against a catalog: what [`super::StripeAdapter`] uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Price id → target.
    pub prices: BTreeMap<String, Sells>,
    /// Product id → target.
    pub products: BTreeMap<String, Sells>,
}

impl StripeConfig {
    /// Checks the section against `catalog`: secret and keys present, every target
    /// exactly one of a published plan version or an existing add-on.
    pub fn validate(&self, catalog: &Catalog) -> Result<Mapping, ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.to_string(),
        };
        if self.signing_secret.0.trim().is_empty() {
            return Err(invalid("signing_secret", "must not be empty"));
        }
        if self.tolerance == 0 {
            return Err(invalid(
                "tolerance",
                "must be more than 0 s (Stripe's clock and ours are never exactly equal)",
            ));
        }
        if self.tenant_metadata_key.trim().is_empty() {
            return Err(invalid("tenant_metadata_key", "must not be empty"));
        }
        if self.prices.is_empty() && self.products.is_empty() {
            return Err(invalid(
                "prices",
                "map at least one Stripe price (or product) to a plan",
            ));
        }
        let check = |table: &str, map: &BTreeMap<String, Target>| {
            map.iter()
                .map(|(id, t)| {
                    let key = format!("{table}.{id}");
                    if id.trim().is_empty() {
                        return Err(invalid(&key, "the Stripe id must not be empty"));
                    }
                    t.check(&key, catalog).map(|s| (id.clone(), s))
                })
                .collect::<Result<BTreeMap<_, _>, _>>()
        };
        Ok(Mapping {
            prices: check("prices", &self.prices)?,
            products: check("products", &self.products)?,
        })
    }
}

impl Target {
    fn check(&self, key: &str, catalog: &Catalog) -> Result<Sells, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            key: key.to_string(),
            reason,
        };
        match (&self.plan, self.version, &self.addon) {
            (Some(code), Some(version), None) => {
                let plan = catalog.plans.get(code).ok_or_else(|| ConfigError::UnknownPlan {
                    key: key.to_string(),
                    code: code.clone(),
                    known: list(catalog.plans.keys()),
                })?;
                if !plan.versions.get(&version).is_some_and(|b| b.published) {
                    return Err(ConfigError::UnknownVersion {
                        key: key.to_string(),
                        code: code.clone(),
                        version,
                    });
                }
                Ok(Sells::Plan(PlanRef {
                    code: code.clone(),
                    version,
                }))
            }
            (Some(code), None, None) => Err(invalid(format!(
                "plan {code} needs a version: a price sells one version, and tenants keep it when a newer one is published"
            ))),
            (None, None, Some(code)) => {
                if !catalog.addons.contains_key(code) {
                    return Err(ConfigError::UnknownAddon {
                        key: key.to_string(),
                        code: code.clone(),
                        known: list(catalog.addons.keys()),
                    });
                }
                Ok(Sells::Addon(code.clone()))
            }
            (None, Some(_), Some(_)) => Err(invalid(
                "version belongs to a plan; an add-on has none".into(),
            )),
            (Some(_), _, Some(_)) => Err(invalid(
                "set plan (with version) or addon, not both".into(),
            )),
            (None, _, None) => Err(invalid(
                "set plan (with version) or addon".into(),
            )),
        }
    }
}

fn list<'a>(codes: impl Iterator<Item = &'a String>) -> String {
    let codes: Vec<&str> = codes.map(String::as_str).collect();
    if codes.is_empty() {
        "none".into()
    } else {
        codes.join(", ")
    }
}

fn default_tolerance() -> u64 {
    DEFAULT_TOLERANCE_SECS
}

fn default_tenant_key() -> String {
    DEFAULT_TENANT_METADATA_KEY.into()
}

/// A humantime duration (`"300s"`, `"5m"`) as whole seconds.
fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map(|d| d.as_secs())
        .map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration like \"300s\" or \"5m\": {e}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        meter::catalog::parse(
            "version: 1\nmetrics: {calls: {unit: call}}\nplans:\n  pro:\n    versions:\n      1: {}\n      2: {published: false}\naddons:\n  sso: {}\n",
            "test",
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse(toml_text: &str) -> Result<StripeConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn a_full_section_parses_and_validates() {
        let c = parse(
            r#"
            signing_secret = "whsec_abc"
            tolerance = "10m"
            tenant_metadata_key = "allot_tenant"
            [prices]
            price_pro = { plan = "pro", version = 1 }
            price_sso = { addon = "sso" }
            [products]
            prod_pro = { plan = "pro", version = 1 }
            "#,
        )
        .unwrap();
        assert_eq!(c.tolerance, 600);
        assert_eq!(
            format!("{:?}", c.signing_secret),
            "SigningSecret([redacted])"
        );
        assert!(!format!("{c:?}").contains("whsec_abc"));
        let m = c.validate(&catalog()).unwrap();
        assert_eq!(m.prices["price_sso"], Sells::Addon("sso".into()));
        assert_eq!(
            m.products["prod_pro"],
            Sells::Plan(PlanRef {
                code: "pro".into(),
                version: 1
            })
        );
    }

    #[test]
    fn defaults_apply_and_unknown_keys_are_refused() {
        let c =
            parse("signing_secret = \"whsec_abc\"\nprices = { p = { addon = \"sso\" } }").unwrap();
        assert_eq!(
            (c.tolerance, c.tenant_metadata_key.as_str()),
            (300, "tenant")
        );
        let e = parse("signing_secret = \"s\"\ntolerence = \"5m\"").unwrap_err();
        assert!(e.to_string().contains("unknown field `tolerence`"), "{e}");
        let e = parse("signing_secret = \"s\"\n[prices]\np = { plan = \"pro\", versoin = 1 }")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `versoin`"), "{e}");
        let e = parse("signing_secret = \"s\"\ntolerance = \"soon\"").unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
    }

    #[test]
    fn validation_names_the_key_and_the_reason() {
        let cat = catalog();
        for (toml_text, want) in [
            (
                "[prices]\np1 = { plan = \"pr\", version = 1 }",
                "prices.p1: unknown plan \"pr\"; the catalog has pro",
            ),
            (
                "[prices]\np1 = { plan = \"pro\", version = 2 }",
                "prices.p1: plan pro has no published version 2",
            ),
            (
                "[prices]\np1 = { plan = \"pro\" }",
                "prices.p1: plan pro needs a version",
            ),
            (
                "[products]\nx = { addon = \"ssso\" }",
                "products.x: unknown add-on \"ssso\"; the catalog has sso",
            ),
            (
                "[prices]\np1 = { plan = \"pro\", version = 1, addon = \"sso\" }",
                "prices.p1: set plan (with version) or addon, not both",
            ),
            (
                "[prices]\np1 = { addon = \"sso\", version = 1 }",
                "prices.p1: version belongs to a plan",
            ),
            (
                "[prices]\np1 = {}",
                "prices.p1: set plan (with version) or addon",
            ),
            (
                "tolerance = \"0s\"\n[prices]\np1 = { addon = \"sso\" }",
                "tolerance: must be more than 0 s",
            ),
            ("", "prices: map at least one Stripe price"),
        ] {
            let c = parse(&format!("signing_secret = \"whsec_x\"\n{toml_text}")).unwrap();
            let e = c.validate(&cat).unwrap_err();
            assert!(e.to_string().starts_with(want), "{toml_text}: {e}");
        }
        let c = parse("signing_secret = \" \"\nprices = { p = { addon = \"sso\" } }").unwrap();
        assert_eq!(
            c.validate(&cat).unwrap_err().to_string(),
            "signing_secret: must not be empty"
        );
    }
}
