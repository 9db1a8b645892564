//! The parts of Stripe's JSON this adapter reads, and nothing more: Stripe adds fields
//! all the time, so unknown ones are ignored here (unlike our own config). Shapes are
//! those of API versions up to 2025-02-24 (`invoice.subscription`, `invoice.charge`,
//! `charge.invoice`), with the newer `invoice.parent.subscription_details.subscription`
//! and per-item `current_period_end` read too.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The event envelope.
#[derive(Debug, Deserialize)]
pub(super) struct Envelope {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub created: i64,
    pub data: EnvelopeData,
}

#[derive(Debug, Deserialize)]
pub(super) struct EnvelopeData {
    pub object: serde_json::Value,
}

/// `data.object` of `customer.subscription.*`.
#[derive(Debug, Deserialize)]
pub(super) struct Subscription {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub items: List<Item>,
    pub billing_cycle_anchor: i64,
    #[serde(default)]
    pub trial_end: Option<i64>,
    #[serde(default)]
    pub cancel_at: Option<i64>,
    #[serde(default)]
    pub cancel_at_period_end: bool,
    #[serde(default)]
    pub current_period_end: Option<i64>,
    #[serde(default)]
    pub ended_at: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(super) struct List<T> {
    pub data: Vec<T>,
    #[serde(default)]
    pub has_more: bool,
}

/// A subscription item: one price, a quantity.
#[derive(Debug, Deserialize)]
pub(super) struct Item {
    pub price: Price,
    #[serde(default)]
    pub quantity: Option<u64>,
    #[serde(default)]
    pub current_period_end: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Price {
    pub id: String,
    pub product: Expandable,
}

/// An id, or the object it names when expanded.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Expandable {
    Id(String),
    Object { id: String },
}

impl Expandable {
    pub fn id(&self) -> &str {
        match self {
            Expandable::Id(id) | Expandable::Object { id } => id,
        }
    }
}

/// `data.object` of `invoice.*`.
#[derive(Debug, Deserialize)]
pub(super) struct Invoice {
    pub id: String,
    #[serde(default)]
    pub subscription: Option<Expandable>,
    #[serde(default)]
    pub parent: Option<InvoiceParent>,
    #[serde(default)]
    pub charge: Option<Expandable>,
    #[serde(default)]
    pub payment_intent: Option<Expandable>,
}

#[derive(Debug, Deserialize)]
pub(super) struct InvoiceParent {
    #[serde(default)]
    pub subscription_details: Option<SubscriptionDetails>,
}

#[derive(Debug, Deserialize)]
pub(super) struct SubscriptionDetails {
    #[serde(default)]
    pub subscription: Option<Expandable>,
}

impl Invoice {
    /// The subscription it bills, in either API shape.
    pub fn subscription_id(&self) -> Option<&str> {
        self.subscription.as_ref().map(Expandable::id).or_else(|| {
            self.parent
                .as_ref()?
                .subscription_details
                .as_ref()?
                .subscription
                .as_ref()
                .map(Expandable::id)
        })
    }
}

/// `data.object` of `charge.refunded`.
#[derive(Debug, Deserialize)]
pub(super) struct Charge {
    pub id: String,
    pub amount: u64,
    pub amount_refunded: u64,
    pub refunded: bool,
    /// Absent in newer API versions; present and null for a charge no invoice made.
    #[serde(default, deserialize_with = "present")]
    pub invoice: Option<Option<Expandable>>,
    #[serde(default)]
    pub payment_intent: Option<Expandable>,
}

/// `data.object` of `charge.dispute.created`.
#[derive(Debug, Deserialize)]
pub(super) struct Dispute {
    pub charge: Expandable,
    #[serde(default)]
    pub payment_intent: Option<Expandable>,
}

/// Tells a key that is present with `null` (`Some(None)`) from an absent one (`None`,
/// through `default`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}
