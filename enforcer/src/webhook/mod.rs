//! Billing-provider webhooks: checking that a delivery really comes from the provider and
//! turning its payload into [`meter::provider::ProviderEvent`]s. No HTTP here: the
//! listener hands in the raw body, the signature header and the time, and applies what
//! comes out with [`meter::provider::SyncState::apply`].
//!
//! - [`stripe`]: Stripe's signature scheme, event types and price → plan mapping.

pub mod stripe;
