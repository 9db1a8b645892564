//! The Allot node: gRPC `Enforcer` and `Admin` services over the embedded, durable store.
//!
//! A tour:
//! - [`server::run`] wires everything: store, engine, gRPC services (with health checking
//!   and reflection), the reservation sweeper.
//! - [`engine`] holds the request logic (validation, entitlement cache, token buckets,
//!   store calls, decisions) and knows nothing of protobuf.
//! - [`grpc`] adapts `allot.v1` messages, and Envoy's rate limit service
//!   ([`grpc::envoy_rls`]), to the engine; [`grpc::status`] maps errors to gRPC codes in
//!   one table.
//! - [`embedded`] is the default store: memory + redb with group commit.
//! - [`config`] is `allot serve`'s configuration (file, environment, flags); [`auth`]
//!   checks every call's API token and scope before it is routed.
//! - [`webhook`] verifies and parses billing-provider webhooks (Stripe) into
//!   [`meter::provider`] events; no HTTP listener yet.
//!
//! The `allot` binary (src/main.rs) adds the client commands (src/cli/).

pub mod auth;
pub mod config;
pub mod degraded;
pub mod embedded;
pub mod engine;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod peer;
pub mod redis;
pub mod server;
pub mod soft;
pub mod webhook;
