//! Allot's domain core: everything that decides, nothing that waits.
//!
//! No clocks, no I/O, no randomness: instants and ids are arguments, so every rule here is
//! a pure function that tests can pin down.
//!
//! A tour, in the order a request meets it:
//! - [`catalog`]: plans, add-ons, features, metrics and limits, loaded from YAML and
//!   validated ([`catalog::parse`]).
//! - [`lifecycle`]: subscriptions as stored (trials, scheduled downgrades, cancellation
//!   dates) and the plan changes and cancellations people ask for.
//! - [`status_machine`]: which status may follow which (pending → trialing/active →
//!   past_due → grace → suspended → canceled, refunded, chargeback), and the steps that
//!   happen by themselves (trial end, grace end, scheduled change, cancellation date):
//!   the one rule of time, built from the catalog
//!   ([`catalog::Catalog::status_machine`], `grace_days`) and used by resolution, the
//!   ledger and every status change.
//! - [`provider`]: billing-provider events (Stripe's, mapped) folded into a subscription,
//!   deduplicated and in any arrival order.
//! - [`grant`]: time-boxed overrides.
//! - [`ledger`]: the record of every entitlement change, and the ones time makes.
//! - [`resolve`]: catalog + subscription + overrides → [`resolve::Entitlements`], with
//!   provenance, the status's access rule ([`catalog::AccessRule`]) applied last.
//! - [`window`] and [`gcra`]: calendar periods in the tenant's zone, and token buckets.
//! - [`quota`]: a request → counter slots and buckets → [`decision::Decision`].
//! - [`hint`]: which plans or add-ons would have allowed a denied request.
//! - [`store`]: the storage traits every backend implements; [`conformance`] (feature
//!   `conformance`) is the suite they all pass.
//! - [`soft`]: soft-limit counters (CRDTs) each node keeps and gossips.
//! - [`keys`]: what valid codes, tenant ids and keys look like.

pub mod billing;
pub mod catalog;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod decision;
pub mod event;
pub mod gcra;
pub mod grant;
pub mod hint;
pub mod keys;
pub mod ledger;
pub mod lifecycle;
pub mod provider;
pub mod quota;
pub mod resolve;
pub mod soft;
pub mod status_machine;
pub mod store;
pub mod window;
