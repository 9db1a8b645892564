//! Talking to a node: connecting, and turning every failure into the one line the CLI
//! prints, e.g. `error: invalid argument: amount: must be positive (at least 1)`.
//!
//! Each error's `Display` is that whole line, `error: ` included, so main prints it as is.

use std::fmt::Display;
use std::time::Duration;

use anyhow::anyhow;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::{InterceptedService, Interceptor};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

/// Long enough for a loaded node, short enough that a wrong address fails promptly.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A bound on each call, so that a wedged node cannot hang a script forever. Generous
/// because ApplyCatalog validates a whole catalog.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An error whose message is printed as `error: <msg>`.
pub fn fail(msg: impl Display) -> anyhow::Error {
    anyhow!("error: {msg}")
}

/// A gRPC status as `error: <code>: <message>`; a failure of the connection rather than
/// an answer of the node adds its causes (tonic's message says only "transport error").
pub fn status_error(status: Status) -> anyhow::Error {
    let code = code_name(status.code());
    let message = match std::error::Error::source(&status) {
        Some(cause) if status.message().is_empty() => chain(cause),
        Some(cause) => format!("{}: {}", status.message(), chain(cause)),
        None => status.message().to_string(),
    };
    if message.is_empty() {
        fail(code)
    } else {
        fail(format!("{code}: {message}"))
    }
}

/// The status code in words, as in the gRPC spec (`INVALID_ARGUMENT` → `invalid argument`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Connects to the node at `endpoint` (`http://host:port` or `https://host:port`; a bare
/// `host:port` means https when `tls` is given, else http). An https endpoint without `tls`
/// trusts the system's root certificates.
///
/// Connects eagerly, so that an unreachable node is reported as such rather than as the
/// `unavailable` status of whichever call happens to come first.
pub async fn connect(
    endpoint: &str,
    token: Option<&str>,
    tls: Option<ClientTlsConfig>,
) -> anyhow::Result<Conn> {
    let uri = if endpoint.contains("://") {
        endpoint.to_string()
    } else if tls.is_some() {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    };
    let mut target = Endpoint::from_shared(uri.clone())
        .map_err(|e| fail(format!("invalid endpoint {endpoint:?}: {}", chain(&e))))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    let https = uri.starts_with("https://");
    match tls {
        Some(_) if !https => {
            return Err(fail(format!(
                "--tls-* options given but the endpoint {uri} is not https://"
            )))
        }
        Some(tls) => target = target.tls_config(tls).map_err(|e| fail(chain(&e)))?,
        None if https => {
            target = target
                .tls_config(ClientTlsConfig::new().with_native_roots())
                .map_err(|e| {
                    fail(format!(
                        "{uri}: cannot load the system's root certificates ({}); pass the node's CA with --tls-ca",
                        chain(&e)
                    ))
                })?
        }
        None => {}
    }
    let unreachable = |why: String| {
        fail(format!(
            "cannot reach allot node at {uri}: {why}; {}",
            tls_hint(&why, https)
        ))
    };
    let channel = target.connect().await.map_err(|e| unreachable(chain(&e)))?;
    // A TCP connection (and, in TLS 1.3, the client's side of the handshake) does not
    // mean the node talks to us: a TLS node hangs up on plain text, and one that wants a
    // client certificate says so only after the handshake. One health check (no token
    // needed) surfaces either here, named as such, rather than as a bare "transport error"
    // of the first real call. Any answer from the node itself means it is reachable.
    let probe = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    if let Err(status) = probe {
        if let Some(cause) = std::error::Error::source(&status) {
            return Err(unreachable(chain(cause)));
        }
    }
    let bearer = match token {
        Some(t) => Some(
            format!("Bearer {}", t.trim())
                .parse()
                .map_err(|_| fail("--token: not a valid header value"))?,
        ),
        None => None,
    };
    Ok(InterceptedService::new(channel, Bearer(bearer)))
}

/// What to try after a failed connection, from what failed.
fn tls_hint(why: &str, https: bool) -> &'static str {
    let lower = why.to_lowercase();
    if why.contains("NotValidForName") || lower.contains("not valid for name") {
        "the node's certificate does not name the endpoint's host: connect by a name it has"
    } else if why.contains("UnknownIssuer") || why.contains("invalid peer certificate") {
        "is the node's certificate signed by the CA given with --tls-ca (ALLOT_TLS_CA)?"
    } else if lower.contains("refused")
        || lower.contains("dns error")
        || lower.contains("timed out")
        || lower.contains("deadline")
    {
        "is `allot serve` running?"
    } else if https {
        // The TCP connection was made and the node's certificate trusted, yet the node
        // hung up: in TLS 1.3 a refused client certificate shows only this way, as an
        // alert, a closed connection or a broken pipe, whichever the client sees first.
        "does the node require a client certificate (--tls-client-cert, --tls-client-key) signed by its --tls-client-ca?"
    } else {
        // A TLS node answers plain text with an alert, which HTTP/2 reads as a bad frame,
        // or just hangs up.
        "is `allot serve` running, and if it serves TLS, did you use https:// (and --tls-ca)?"
    }
}

/// A connection to a node that sends the API token with every call.
pub type Conn = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` when there is a token.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(b) = &self.0 {
            req.metadata_mut().insert("authorization", b.clone());
        }
        Ok(req)
    }
}

/// An error with its causes, `a: b: c`: tonic's own message ("transport error") says
/// nothing about what went wrong, its sources do ("Connection refused").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        // Some layers repeat their source's message in their own.
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        cause = c.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_one_line() {
        let e = status_error(Status::invalid_argument("amount: must be positive"));
        assert_eq!(
            e.to_string(),
            "error: invalid argument: amount: must be positive"
        );
        let e = status_error(Status::new(Code::NotFound, ""));
        assert_eq!(e.to_string(), "error: not found");
        let e = status_error(Status::failed_precondition("plan pro@1 is published"));
        assert_eq!(
            e.to_string(),
            "error: failed precondition: plan pro@1 is published"
        );
    }

    #[tokio::test]
    async fn unreachable_nodes_are_named() {
        // Port 1 on localhost: nothing listens there, so the connection is refused at once.
        let e = connect("127.0.0.1:1", None, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("error: cannot reach allot node at http://127.0.0.1:1: "),
            "{e}"
        );
        assert!(e.ends_with("is `allot serve` running?"), "{e}");
    }

    #[test]
    fn failed_connections_get_the_hint_that_fits() {
        let hint = |why| tls_hint(why, true);
        assert!(hint("invalid peer certificate: UnknownIssuer").contains("--tls-ca"));
        assert!(hint("invalid peer certificate: NotValidForName").contains("name"));
        // However a refused client certificate reaches the client, the hint is the same.
        for why in [
            "connection error: received fatal alert: CertificateRequired",
            "operation was canceled: connection closed",
            "connection error: stream closed because of a broken pipe",
        ] {
            assert!(hint(why).contains("--tls-client-cert"), "{why}");
        }
        assert!(hint("tcp connect error: Connection refused (os error 111)").ends_with("running?"));
        assert!(tls_hint("http2 error: frame with invalid size", false).contains("https://"));
    }

    #[tokio::test]
    async fn malformed_endpoints_are_refused() {
        let e = connect("http://exa mple", None, None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("error: invalid endpoint"), "{e}");
    }
}
