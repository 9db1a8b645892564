//! Stripe as a billing provider: the `Stripe-Signature` check, and Stripe events as
//! [`ProviderEvent`]s for [`meter::provider::SyncState::apply`]. Pure: the caller passes
//! the raw body, the header and `now`, and owns storage and HTTP.
//!
//! Start with [`StripeAdapter::new`] (a validated [`StripeConfig`]), then
//! [`StripeAdapter::receive`] per delivery.
//!
//! # Events
//!
//! | Stripe event | becomes | what it does ([`meter::provider`]) |
//! |---|---|---|
//! | `customer.subscription.created` | snapshot (created) | creates the subscription, in the status it reports |
//! | `customer.subscription.updated` | snapshot (updated) | moves to the reported status if reachable; plan, add-ons, trial end, anchor, `cancel_at` |
//! | `customer.subscription.trial_will_end` | snapshot (trial will end) | usually nothing new |
//! | `customer.subscription.deleted` | snapshot, status `canceled` | ends it |
//! | `invoice.paid` | paid | `pending`, `past_due`, `grace`, `suspended` → `active` |
//! | `invoice.payment_failed` | payment failed | `trialing`, `active` → `past_due` |
//! | `charge.refunded`, fully refunded | refunded | → `refunded` |
//! | `charge.dispute.created` | disputed | → `chargeback` |
//! | an invoice or charge of no subscription, a partial refund, any other type | [`Parsed::Ignored`] | nothing: acknowledge and log |
//!
//! Stripe statuses map as `incomplete` → pending, `incomplete_expired` → canceled,
//! `trialing`, `active`, `past_due`, `canceled` → the same, `unpaid` → grace (our grace
//! clock then suspends), `paused` → suspended. Events are ordered by their `created`
//! second (Stripe objects carry no version); the provider module breaks ties.
//!
//! Charges and disputes do not name their subscription. Invoice events do, and name
//! their charge and payment intent: [`Received::links`] lists those ids, the caller
//! keeps them, and a refund or dispute comes back as [`Parsed::NeedsSubscription`] with
//! the ids to look up; [`Unlinked::link`] completes it. If none is known yet (a refund
//! delivered before the invoice that was refunded), answer with a non-2xx status: Stripe
//! redelivers for three days, by when the invoice event will have arrived. Newer API
//! versions (2025-03-31 on) no longer put `charge`/`payment_intent` on invoices; pin the
//! endpoint's API version below that until a payments lookup exists.
//!
//! # Answering Stripe
//!
//! Any non-2xx answer makes Stripe redeliver. A [`SignatureError`] should get 400 (and
//! be logged: a wrong secret, a replay, or a forgery). A [`ParseError`] means our mapping
//! or Stripe's payload is not what we expect: 500, so the delivery is retried once the
//! configuration is fixed. Ignored events, duplicates and refused transitions get 200:
//! they were understood, and the audit trail holds why nothing changed.

mod config;
mod payload;
mod signature;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use meter::catalog::Catalog;
use meter::lifecycle::{PlanRef, Status};
use meter::provider::{AddonQuantity, Change, ProviderEvent, Snapshot, SnapshotReason};
use serde::de::DeserializeOwned;
use thiserror::Error;

pub use config::{
    ConfigError, Mapping, Sells, SigningSecret, StripeConfig, Target, DEFAULT_TENANT_METADATA_KEY,
};
pub use signature::{sign, SignatureError, DEFAULT_TOLERANCE_SECS};

/// Verifies and parses Stripe deliveries with one validated configuration.
#[derive(Debug, Clone)]
pub struct StripeAdapter {
    secret: SigningSecret,
    tolerance_secs: u64,
    tenant_key: String,
    mapping: Mapping,
}

/// What a delivery holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// An event ready for [`meter::provider::SyncState::apply`].
    Event(Received),
    /// A refund or dispute: its subscription is found through a payment id.
    NeedsSubscription(Unlinked),
    /// Nothing for Allot: acknowledge and log.
    Ignored(Ignored),
}

/// A parsed event, and the payment ids it ties to its subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The event.
    pub event: ProviderEvent,
    /// Invoice, charge and payment-intent ids that belong to `event.object_id` (from
    /// invoice events; empty otherwise). Keep them to link later refunds and disputes.
    pub links: Vec<String>,
}

/// A refund or dispute waiting for its subscription id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unlinked {
    /// Stripe's event id.
    pub event_id: String,
    /// Stripe's event type.
    pub event_type: String,
    /// Ids to look up among kept [`Received::links`], best first.
    pub payments: Vec<String>,
    version: u64,
    occurred_at: DateTime<Utc>,
    change: Change,
}

impl Unlinked {
    /// The event, now that its subscription is known.
    pub fn link(self, subscription_id: impl Into<String>) -> ProviderEvent {
        ProviderEvent {
            id: self.event_id,
            object_id: subscription_id.into(),
            version: self.version,
            occurred_at: self.occurred_at,
            change: self.change,
        }
    }
}

/// An event with nothing for Allot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// Stripe's event id.
    pub event_id: String,
    /// Stripe's event type.
    pub event_type: String,
    /// Why.
    pub reason: IgnoreReason,
}

/// Why an event is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IgnoreReason {
    /// Not a type this adapter handles.
    #[error("event type not handled")]
    UnhandledType,
    /// An invoice or charge that belongs to no subscription (a one-off payment).
    #[error("not about a subscription")]
    NotForSubscription,
    /// Part of a charge was refunded: the subscription goes on.
    #[error("partial refund: {refunded} of {amount}")]
    PartialRefund {
        /// The charge, in the currency's smallest unit.
        amount: u64,
        /// How much of it was refunded.
        refunded: u64,
    },
}

/// A payload that cannot be turned into an event; names the field and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    /// One subscription of a list (a reconciliation file) is unusable; the inner error's
    /// paths are relative to it (`data.object` is the subscription).
    #[error("{item}: {source}")]
    Item {
        /// Which (`data[3] (sub_…)`).
        item: String,
        /// Why.
        source: Box<ParseError>,
    },
    /// Not the JSON shape expected.
    #[error("{field}: {reason}")]
    Malformed {
        /// The JSON path (`data.object.items.data[0].price.id`).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A subscription status this adapter does not know.
    #[error("{field}: Stripe status {status:?} is not one Allot maps (incomplete, incomplete_expired, trialing, active, past_due, unpaid, canceled, paused)")]
    UnknownStatus {
        /// The JSON path.
        field: String,
        /// The status.
        status: String,
    },
    /// An item's price and product are both missing from the mapping.
    #[error("{field}: price {price} (product {product}) is in neither prices nor products of the Stripe mapping")]
    Unmapped {
        /// The JSON path of the item's price.
        field: String,
        /// The price id.
        price: String,
        /// The product id.
        product: String,
    },
    /// No item sells a plan.
    #[error("data.object.items: no item sells a plan (only add-ons): map the plan's price")]
    NoPlan,
    /// Two items sell different plans.
    #[error("{field}: sells plan {second} while another item sells {first}; a subscription has one plan")]
    SeveralPlans {
        /// The JSON path of the second item.
        field: String,
        /// The first plan.
        first: PlanRef,
        /// The second plan.
        second: PlanRef,
    },
    /// The subscription's metadata does not name a tenant.
    #[error("data.object.metadata.{key}: missing; set it on the Stripe subscription to the Allot tenant id")]
    MissingTenant {
        /// The configured metadata key.
        key: String,
    },
    /// The metadata names something that is not a tenant id.
    #[error("data.object.metadata.{key}: {value:?} is not a tenant id: it {reason}")]
    BadTenant {
        /// The configured metadata key.
        key: String,
        /// The value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// A refused delivery.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WebhookError {
    /// The signature check failed.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The payload could not be read.
    #[error(transparent)]
    Parse(#[from] ParseError),
}

impl StripeAdapter {
    /// An adapter for `config`, validated against `catalog`.
    pub fn new(config: &StripeConfig, catalog: &Catalog) -> Result<Self, ConfigError> {
        Ok(StripeAdapter {
            mapping: config.validate(catalog)?,
            secret: config.signing_secret.clone(),
            tolerance_secs: config.tolerance,
            tenant_key: config.tenant_metadata_key.clone(),
        })
    }

    /// Checks a delivery's `Stripe-Signature` header against its raw body at `now`.
    pub fn verify(
        &self,
        signature_header: &str,
        payload: &[u8],
        now: DateTime<Utc>,
    ) -> Result<(), SignatureError> {
        signature::verify(
            signature_header,
            payload,
            self.secret.expose(),
            self.tolerance_secs,
            now,
        )
        .map(|_| ())
    }

    /// Verifies, then parses, one delivery.
    pub fn receive(
        &self,
        signature_header: &str,
        payload: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Parsed, WebhookError> {
        self.verify(signature_header, payload, now)?;
        Ok(self.parse(payload)?)
    }

    /// Parses a (verified) delivery.
    pub fn parse(&self, payload: &[u8]) -> Result<Parsed, ParseError> {
        let mut de = serde_json::Deserializer::from_slice(payload);
        let env: payload::Envelope =
            serde_path_to_error::deserialize(&mut de).map_err(|e| malformed("", e))?;
        let version = u64::try_from(env.created).map_err(|_| ParseError::Malformed {
            field: "created".into(),
            reason: "is before 1970".into(),
        })?;
        let occurred_at = instant("created", env.created)?;
        let object = env.data.object;
        let ignored = |reason| {
            Ok(Parsed::Ignored(Ignored {
                event_id: env.id.clone(),
                event_type: env.kind.clone(),
                reason,
            }))
        };
        let event = |object_id: &str, change| ProviderEvent {
            id: env.id.clone(),
            object_id: object_id.to_string(),
            version,
            occurred_at,
            change,
        };
        let unlinked = |payments: Vec<String>, change| {
            Ok(Parsed::NeedsSubscription(Unlinked {
                event_id: env.id.clone(),
                event_type: env.kind.clone(),
                payments,
                version,
                occurred_at,
                change,
            }))
        };
        let reason = match env.kind.as_str() {
            "customer.subscription.created" => Some(SnapshotReason::Created),
            "customer.subscription.updated" => Some(SnapshotReason::Updated),
            "customer.subscription.trial_will_end" => Some(SnapshotReason::TrialWillEnd),
            "customer.subscription.deleted" => Some(SnapshotReason::Deleted),
            _ => None,
        };
        if let Some(reason) = reason {
            let sub: payload::Subscription = object_of(object)?;
            let snapshot = self.snapshot(&sub, reason)?;
            return Ok(Parsed::Event(Received {
                event: event(&sub.id, Change::Snapshot { reason, snapshot }),
                links: Vec::new(),
            }));
        }
        match env.kind.as_str() {
            "invoice.paid" | "invoice.payment_failed" => {
                let inv: payload::Invoice = object_of(object)?;
                let Some(sub) = inv.subscription_id() else {
                    return ignored(IgnoreReason::NotForSubscription);
                };
                let change = if env.kind == "invoice.paid" {
                    Change::Paid
                } else {
                    Change::PaymentFailed
                };
                let links = std::iter::once(inv.id.clone())
                    .chain(inv.charge.as_ref().map(|c| c.id().to_string()))
                    .chain(inv.payment_intent.as_ref().map(|p| p.id().to_string()))
                    .collect();
                Ok(Parsed::Event(Received {
                    event: event(sub, change),
                    links,
                }))
            }
            "charge.refunded" => {
                let ch: payload::Charge = object_of(object)?;
                if !ch.refunded {
                    return ignored(IgnoreReason::PartialRefund {
                        amount: ch.amount,
                        refunded: ch.amount_refunded,
                    });
                }
                let invoice = match &ch.invoice {
                    // `invoice: null`: a charge no invoice made.
                    Some(None) => return ignored(IgnoreReason::NotForSubscription),
                    Some(Some(i)) => Some(i.id().to_string()),
                    None => None,
                };
                let payments = invoice
                    .into_iter()
                    .chain([ch.id.clone()])
                    .chain(ch.payment_intent.as_ref().map(|p| p.id().to_string()))
                    .collect();
                unlinked(payments, Change::Refunded)
            }
            "charge.dispute.created" => {
                let dp: payload::Dispute = object_of(object)?;
                let payments = std::iter::once(dp.charge.id().to_string())
                    .chain(dp.payment_intent.as_ref().map(|p| p.id().to_string()))
                    .collect();
                unlinked(payments, Change::Disputed)
            }
            _ => ignored(IgnoreReason::UnhandledType),
        }
    }

    /// Stripe's subscriptions as they are now, each as a snapshot: the body of
    /// `GET /v1/subscriptions?status=all` (a list object, every page merged into `data`)
    /// or a JSON array of subscription objects. For reconciliation.
    pub fn current_subscriptions(
        &self,
        body: &[u8],
    ) -> Result<Vec<(String, Snapshot)>, ParseError> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Listing {
            List { data: Vec<serde_json::Value> },
            Array(Vec<serde_json::Value>),
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let listing: Listing =
            serde_path_to_error::deserialize(&mut de).map_err(|e| ParseError::Malformed {
                field: "file".into(),
                reason: format!(
                    "neither a Stripe list object nor a JSON array of subscriptions: {}",
                    e.into_inner()
                ),
            })?;
        let (Listing::List { data: items } | Listing::Array(items)) = listing;
        items
            .into_iter()
            .enumerate()
            .map(|(i, object)| {
                let id = object.get("id").and_then(|v| v.as_str()).unwrap_or("?");
                let item = format!("data[{i}] ({id})");
                let wrap = |e: ParseError| ParseError::Item {
                    item: item.clone(),
                    source: Box::new(e),
                };
                let sub: payload::Subscription = object_of(object).map_err(wrap)?;
                let snap = self.snapshot(&sub, SnapshotReason::Updated).map_err(wrap)?;
                Ok((sub.id, snap))
            })
            .collect()
    }

    /// A Stripe subscription as a snapshot in Allot's terms.
    fn snapshot(
        &self,
        sub: &payload::Subscription,
        reason: SnapshotReason,
    ) -> Result<Snapshot, ParseError> {
        let key = &self.tenant_key;
        let tenant = sub
            .metadata
            .get(key)
            .ok_or_else(|| ParseError::MissingTenant { key: key.clone() })?;
        meter::keys::check_tenant(tenant).map_err(|reason| ParseError::BadTenant {
            key: key.clone(),
            value: tenant.clone(),
            reason,
        })?;
        let status = if reason == SnapshotReason::Deleted {
            // The event means it ended, whatever else the object says.
            Status::Canceled
        } else {
            stripe_status(&sub.status)?
        };
        if sub.items.has_more {
            return Err(ParseError::Malformed {
                field: "data.object.items.has_more".into(),
                reason: "the event lists only some of the items; Allot needs them all".into(),
            });
        }
        let mut plan: Option<PlanRef> = None;
        let mut addons: BTreeMap<String, u32> = BTreeMap::new();
        for (i, item) in sub.items.data.iter().enumerate() {
            let field = format!("data.object.items.data[{i}]");
            let product = item.price.product.id();
            let sells = self
                .mapping
                .prices
                .get(&item.price.id)
                .or_else(|| self.mapping.products.get(product))
                .ok_or_else(|| ParseError::Unmapped {
                    field: format!("{field}.price"),
                    price: item.price.id.clone(),
                    product: product.to_string(),
                })?;
            match sells {
                Sells::Plan(p) => match &plan {
                    Some(first) if first != p => {
                        return Err(ParseError::SeveralPlans {
                            field,
                            first: first.clone(),
                            second: p.clone(),
                        })
                    }
                    // The plan item's quantity (seats, with per-seat pricing) sells
                    // nothing more in Allot: seat limits come from the plan.
                    _ => plan = Some(p.clone()),
                },
                Sells::Addon(code) => {
                    let quantity = item.quantity.unwrap_or(1);
                    let quantity = u32::try_from(quantity).map_err(|_| ParseError::Malformed {
                        field: format!("{field}.quantity"),
                        reason: format!("{quantity} is more than an add-on quantity can be"),
                    })?;
                    if quantity > 0 {
                        let q = addons.entry(code.clone()).or_default();
                        *q = q.saturating_add(quantity);
                    }
                }
            }
        }
        let plan = plan.ok_or(ParseError::NoPlan)?;
        let at = |field: &str, secs: Option<i64>| {
            secs.map(|s| instant(&format!("data.object.{field}"), s))
                .transpose()
        };
        let period_end = sub.current_period_end.or_else(|| {
            sub.items
                .data
                .iter()
                .filter_map(|i| i.current_period_end)
                .max()
        });
        let cancel_at = if status == Status::Canceled {
            at("ended_at", sub.ended_at.or(sub.cancel_at))?
        } else if sub.cancel_at.is_some() {
            at("cancel_at", sub.cancel_at)?
        } else if sub.cancel_at_period_end {
            at("current_period_end", period_end)?
        } else {
            None
        };
        Ok(Snapshot {
            tenant: tenant.clone(),
            status,
            plan,
            addons: addons
                .into_iter()
                .map(|(code, quantity)| AddonQuantity { code, quantity })
                .collect(),
            trial_ends_at: if status == Status::Trialing {
                at("trial_end", sub.trial_end)?
            } else {
                None
            },
            billing_anchor: instant("data.object.billing_cycle_anchor", sub.billing_cycle_anchor)?,
            cancel_at,
        })
    }
}

fn stripe_status(s: &str) -> Result<Status, ParseError> {
    Ok(match s {
        "incomplete" => Status::Pending,
        "incomplete_expired" => Status::Canceled,
        "trialing" => Status::Trialing,
        "active" => Status::Active,
        "past_due" => Status::PastDue,
        "unpaid" => Status::Grace,
        "canceled" => Status::Canceled,
        "paused" => Status::Suspended,
        other => {
            return Err(ParseError::UnknownStatus {
                field: "data.object.status".into(),
                status: other.to_string(),
            })
        }
    })
}

fn instant(field: &str, secs: i64) -> Result<DateTime<Utc>, ParseError> {
    DateTime::from_timestamp(secs, 0).ok_or_else(|| ParseError::Malformed {
        field: field.to_string(),
        reason: format!("{secs} is not a Unix time in seconds"),
    })
}

fn object_of<T: DeserializeOwned>(object: serde_json::Value) -> Result<T, ParseError> {
    serde_path_to_error::deserialize(object).map_err(|e| malformed("data.object", e))
}

fn malformed<E: std::fmt::Display>(prefix: &str, e: serde_path_to_error::Error<E>) -> ParseError {
    let path = e.path().to_string();
    let field = match (prefix, path.as_str()) {
        ("", ".") => "payload".to_string(),
        (p, ".") => p.to_string(),
        ("", rest) => rest.to_string(),
        (p, rest) => format!("{p}.{rest}"),
    };
    ParseError::Malformed {
        field,
        reason: e.into_inner().to_string(),
    }
}
