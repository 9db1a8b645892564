//! The `allot.v1` gRPC API, generated from `proto/allot/v1/allot.proto` at build time.
//!
//! The `.proto` file is the API reference: every field is commented there.
//! [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection.

#![allow(missing_docs, clippy::all)]

/// Generated messages and services of package `allot.v1`.
pub mod v1 {
    tonic::include_proto!("allot.v1");
}

/// The encoded descriptor set of the API, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/allot_descriptor.bin"));
