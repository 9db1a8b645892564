//! The gRPC layer: `allot.v1` services, and Envoy's rate limit service ([`envoy_rls`]), as
//! thin adapters over the [`crate::engine`].
//!
//! Conversions live in [`convert`], the error → status table in [`status`]; handlers hold
//! no logic of their own beyond reading optional proto fields.

pub mod admin;
pub mod billing;
pub mod convert;
pub mod enforcer;
pub mod envoy_rls;
pub mod spool;
pub mod status;
