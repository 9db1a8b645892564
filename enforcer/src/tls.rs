//! TLS and mutual TLS (rustls, ring provider) for the node and its clients.
//!
//! This module owns reading the PEM files named by the `--tls-*` options and checking them
//! before anything listens or dials: each file is readable, holds what it should, every
//! certificate parses, and a private key matches the certificate it goes with. A bad file
//! is then reported at start, naming the option and the path, rather than as a failed
//! handshake on every connection later. It builds tonic's configs from them:
//! [`server_config`] for `allot serve`, [`client_config`] for whoever dials a node (the
//! CLI, `allot aggregate --spool`, and a node dialing its peers).
//!
//! What mTLS checks is the chain to the CA, nothing else: no name on the client
//! certificate is looked at, and the principal of a call still comes from its API token.

use std::path::PathBuf;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Longest TLS handshake, either side: a client that opens a connection and never finishes
/// its handshake must not hold a task on the node forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A PEM file and the option that named it (`--tls-cert`), for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pem {
    /// The option, as typed on the command line (`--tls-cert`).
    pub flag: &'static str,
    /// The file.
    pub path: PathBuf,
}

impl Pem {
    /// `path`, named by `flag`.
    pub fn new(flag: &'static str, path: impl Into<PathBuf>) -> Pem {
        Pem {
            flag,
            path: path.into(),
        }
    }
}

/// Why TLS could not be set up. Every variant names the option and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{flag} {path}: cannot read: {source}")]
    Read {
        /// The option.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file holds no PEM block of the kind expected.
    #[error(
        "{flag} {path}: no {what} in it (expected a PEM block such as -----BEGIN {block}-----)"
    )]
    Missing {
        /// The option.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What was looked for ("certificate", "private key").
        what: &'static str,
        /// The PEM label expected.
        block: &'static str,
    },
    /// The file is not valid PEM, or what it holds does not parse.
    #[error("{flag} {path}: malformed {what}: {reason}")]
    Malformed {
        /// The option.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What was read ("PEM", "certificate", "private key").
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The private key is not the one the certificate was issued for.
    #[error(
        "{key_flag} {key}: this private key does not match the certificate in {cert_flag} {cert}"
    )]
    KeyMismatch {
        /// The key's option.
        key_flag: &'static str,
        /// The key file.
        key: PathBuf,
        /// The certificate's option.
        cert_flag: &'static str,
        /// The certificate file.
        cert: PathBuf,
    },
    /// Trusting the system's root certificates was asked for (an `https://` endpoint
    /// without a CA file) and there are none, or tonic refused the settings.
    #[error("{0}")]
    Setup(String),
}

/// The server side of `allot serve --tls-cert … --tls-key … [--tls-client-ca …]`: the
/// node's identity and, with `client_ca`, a client certificate chaining to that CA is
/// required on every connection (mTLS).
pub fn server_config(
    cert: &Pem,
    key: &Pem,
    client_ca: Option<&Pem>,
) -> Result<ServerTlsConfig, TlsError> {
    let mut config = ServerTlsConfig::new()
        .identity(identity(cert, key)?)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = client_ca {
        config = config.client_ca_root(ca_certificate(ca)?);
    }
    Ok(config)
}

/// The client side: trust the certificates of `ca` (the system's roots when `None`), and
/// present `identity` (certificate, key) when the node asks for one.
pub fn client_config(
    ca: Option<&Pem>,
    identity_files: Option<(&Pem, &Pem)>,
) -> Result<ClientTlsConfig, TlsError> {
    let mut config = ClientTlsConfig::new().timeout(HANDSHAKE_TIMEOUT);
    config = match ca {
        Some(ca) => config.ca_certificate(ca_certificate(ca)?),
        None => config.with_native_roots(),
    };
    if let Some((cert, key)) = identity_files {
        config = config.identity(identity(cert, key)?);
    }
    Ok(config)
}

fn read(file: &Pem) -> Result<Vec<u8>, TlsError> {
    std::fs::read(&file.path).map_err(|source| TlsError::Read {
        flag: file.flag,
        path: file.path.clone(),
        source,
    })
}

fn malformed(file: &Pem, what: &'static str, reason: impl ToString) -> TlsError {
    TlsError::Malformed {
        flag: file.flag,
        path: file.path.clone(),
        what,
        reason: reason.to_string(),
    }
}

/// The certificates of a PEM file, in order; at least one.
fn certificates(file: &Pem, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(file, "PEM", e))?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            flag: file.flag,
            path: file.path.clone(),
            what: "certificate",
            block: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// A certificate chain and its key, checked to belong together.
fn identity(cert: &Pem, key: &Pem) -> Result<Identity, TlsError> {
    let cert_pem = read(cert)?;
    let chain = certificates(cert, &cert_pem)?;
    let key_pem = read(key)?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Missing {
            flag: key.flag,
            path: key.path.clone(),
            what: "private key",
            block: "PRIVATE KEY",
        },
        e => malformed(key, "PEM", e),
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| malformed(key, "private key", e))?;
    match rustls::sign::CertifiedKey::new(chain, signer).keys_match() {
        // ring derives the public key of every key type it loads, so Unknown does not
        // happen here; were it to, the handshake still fails on a wrong key.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch {
                key_flag: key.flag,
                key: key.path.clone(),
                cert_flag: cert.flag,
                cert: cert.path.clone(),
            })
        }
        Err(e) => return Err(malformed(cert, "certificate", e)),
    }
    Ok(Identity::from_pem(cert_pem, key_pem))
}

/// A CA file: every certificate in it must be usable as a trust anchor.
fn ca_certificate(file: &Pem) -> Result<Certificate, TlsError> {
    let bytes = read(file)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(file, &bytes)? {
        roots
            .add(cert)
            .map_err(|e| malformed(file, "certificate", e))?;
    }
    Ok(Certificate::from_pem(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named_with_their_option() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Pem::new("--tls-cert", dir.path().join("nope.pem"));
        let key = Pem::new("--tls-key", dir.path().join("nope.key"));
        let e = server_config(&missing, &key, None).unwrap_err().to_string();
        assert!(e.starts_with("--tls-cert "), "{e}");
        assert!(e.contains("nope.pem: cannot read"), "{e}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem at all\n").unwrap();
        let e = server_config(&Pem::new("--tls-cert", &empty), &key, None)
            .unwrap_err()
            .to_string();
        // The certificate is read first, so the missing key file is not reached.
        assert!(e.contains("--tls-cert "), "{e}");
        assert!(e.contains("no certificate in it"), "{e}");

        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = client_config(Some(&Pem::new("--tls-ca", &broken)), None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--tls-ca "), "{e}");
        assert!(e.contains("malformed"), "{e}");
    }
}
