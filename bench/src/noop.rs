//! The ceiling: a gRPC service that does nothing, with messages shaped like Check's.
//!
//! `bench noop-server` (a hidden subcommand) runs it in its own process, so that it
//! competes with the bench for the CPU the way a real node does. Its request and response
//! types mirror `allot.v1.CheckRequest` / `CheckResponse` field for field, so an encoded
//! `CheckResponse` decodes as an [`pb::EchoResponse`] of the same length: the bench hands
//! the server a real Check answer (or [`typical_check_response`]) to send back.

use std::io::Write as _;

use anyhow::Context as _;
use prost::Message as _;
use tokio::io::AsyncReadExt as _;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::cli::NoopServerArgs;

/// Code generated from `proto/noop.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("bench.noop");
}

use pb::noop_server::{Noop, NoopServer};
use pb::{EchoRequest, EchoResponse};

/// The no-op service: answers every Echo with the same canned response.
#[derive(Debug, Clone)]
pub struct Echo {
    response: EchoResponse,
}

#[tonic::async_trait]
impl Noop for Echo {
    async fn echo(&self, _request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(self.response.clone()))
    }
}

/// A Check answer like the node's to an allowed 1-unit metric check under the bench
/// catalog (Check consumes nothing, so `used` stays 0); the ceiling's response when no
/// real one was captured. It encodes to 57 bytes, as the node's did when this was written.
pub fn typical_check_response() -> allot_proto::v1::CheckResponse {
    use allot_proto::v1::{CheckResponse, Decision, Outcome};
    let limit = 9_000_000_000_000_u64;
    CheckResponse {
        decision: Some(Decision {
            outcome: Outcome::Allow as i32,
            reason: "ok".into(),
            message: "allowed".into(),
            window: "day".into(),
            limit: Some(limit),
            used: 0,
            reserved: 0,
            remaining: Some(limit - 1),
            retry_after: None,
            resets_at: Some(prost_types::Timestamp {
                seconds: 1_767_225_600,
                nanos: 0,
            }),
            warning_percent: None,
            overage: false,
            upgrade: Vec::new(),
        }),
        value: None,
        // The node's versions are 64-bit hashes: a 10-byte varint.
        entitlements_version: 0xA17D_5EED_2B3C_4D1E,
    }
}

/// The request the ceiling sends: the same fields as the `check` scenario's CheckRequest.
pub fn echo_request(check: &allot_proto::v1::CheckRequest) -> EchoRequest {
    EchoRequest {
        tenant: check.tenant.clone(),
        feature: check.feature.clone(),
        metric: check.metric.clone(),
        amount: check.amount,
        dimensions: check.dimensions.clone(),
    }
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(s.len().is_multiple_of(2), "odd number of hex digits");
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .with_context(|| format!("bad hex digits at {i}"))
        })
        .collect()
}

/// Runs the no-op server until killed, or until its stdin closes (the bench that started
/// it is gone). Prints `listening on ADDR` on stdout once bound.
pub async fn serve(args: NoopServerArgs) -> anyhow::Result<()> {
    let response = match &args.response_hex {
        Some(hex) => EchoResponse::decode(from_hex(hex)?.as_slice())
            .context("--response-hex is not an encoded CheckResponse")?,
        None => EchoResponse::decode(typical_check_response().encode_to_vec().as_slice())?,
    };
    let incoming = TcpIncoming::bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?
        .with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {addr}")?;
    stdout.flush()?;

    tokio::spawn(async {
        let mut sink = [0u8; 64];
        let mut stdin = tokio::io::stdin();
        while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
        std::process::exit(0);
    });

    tonic::transport::Server::builder()
        .add_service(NoopServer::new(Echo { response }))
        .serve_with_incoming(incoming)
        .await
        .context("no-op server failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_encodes_identically() {
        let check = typical_check_response();
        let bytes = check.encode_to_vec();
        let echo = EchoResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(echo.encode_to_vec(), bytes);
        assert_eq!(bytes.len(), 57);

        let req = allot_proto::v1::CheckRequest {
            tenant: "bench-12".into(),
            metric: "api_calls".into(),
            amount: 1,
            ..Default::default()
        };
        assert_eq!(echo_request(&req).encode_to_vec(), req.encode_to_vec());
    }

    #[test]
    fn hex_round_trip() {
        let bytes = typical_check_response().encode_to_vec();
        assert_eq!(from_hex(&to_hex(&bytes)).unwrap(), bytes);
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
    }
}
