//! Billing-provider webhooks: checking that a delivery really comes from the provider,
//! turning its payload into [`meter::provider::ProviderEvent`]s, and applying those to
//! tenants.
//!
//! - [`stripe`]: Stripe's signature scheme, event types and price → plan mapping (pure).
//! - [`sync`]: each provider object's sync state, the tenant's subscription and the ledger.
//! - [`http`]: the HTTP endpoint Stripe delivers to.

pub mod http;
pub mod stripe;
pub mod sync;
