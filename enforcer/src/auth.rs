//! Who may call what: API tokens with scopes, checked on every gRPC call before it is
//! routed.
//!
//! Tokens live in a TOML file (`--tokens`, default `<data-dir>/tokens.toml`), stored
//! hashed (SHA-256: tokens are 256 random bits, so a fast hash does not help guessing):
//!
//! ```toml
//! [[token]]
//! principal = "support@example.com"
//! scopes = ["support:read"]
//! sha256 = "…"
//! ```
//!
//! A call carries `authorization: Bearer <token>`. No token, or one that is not in the
//! file, is UNAUTHENTICATED; a token without the scope the method needs is
//! PERMISSION_DENIED. Either way the call never reaches its service (nothing changes), and
//! the refusal is recorded in the ledger ([`meter::ledger`], action `access.denied`). The
//! file is read again when it changes, so a token is revoked by deleting its line.
//!
//! | scope | methods |
//! |---|---|
//! | `admin` | everything |
//! | `support:read` | Admin GetTenant, GetTenantHistory, GetCatalog, GetPeers |
//! | `enforce` | Enforcer (Check, Reserve, Commit, Release, Record, GetUsage), Envoy's ShouldRateLimit |
//! | `billing` | Billing (Overage, Export) |
//! | `spool` | Spool (for `allot aggregate --spool`) |
//! | `peer` | Peer Sync (between nodes) |
//!
//! Health and reflection are open: load balancers and `grpcurl list` need no token.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::Status;

/// Every scope a token may have.
pub const SCOPES: [&str; 6] = [
    "admin",
    "support:read",
    "enforce",
    "billing",
    "spool",
    "peer",
];

/// The principal of an authenticated call, in its request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub String);

/// One token, as kept in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who calls with it (recorded as the actor of its changes).
    pub principal: String,
    /// What it may call.
    pub scopes: Vec<String>,
    /// SHA-256 of the token, hex.
    pub sha256: String,
}

/// The token file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// The tokens.
    #[serde(default)]
    pub token: Vec<TokenEntry>,
}

/// Why the token file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// It cannot be read or written.
    #[error("token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// It is malformed (the key and why).
    #[error("token file {path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The hex SHA-256 of a token.
pub fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new random token (256 bits from the system's generator, via UUIDv4).
pub fn generate() -> String {
    format!(
        "al_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

impl TokenFile {
    /// Reads and checks `path`; a missing file is empty.
    pub fn read(path: &Path) -> Result<TokenFile, TokenError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TokenFile::default()),
            Err(source) => {
                return Err(TokenError::Io {
                    path: path.into(),
                    source,
                })
            }
        };
        let invalid = |reason: String| TokenError::Invalid {
            path: path.into(),
            reason,
        };
        let file: TokenFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        for (i, t) in file.token.iter().enumerate() {
            if t.principal.trim().is_empty() {
                return Err(invalid(format!("token[{i}].principal: must not be empty")));
            }
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(format!(
                    "token[{i}].sha256: expected 64 hex digits (allot token create writes it)"
                )));
            }
            if t.scopes.is_empty() {
                return Err(invalid(format!("token[{i}].scopes: give at least one")));
            }
            for s in &t.scopes {
                if !SCOPES.contains(&s.as_str()) {
                    return Err(invalid(format!(
                        "token[{i}].scopes: unknown scope {s:?}; one of {}",
                        SCOPES.join(", ")
                    )));
                }
            }
        }
        Ok(file)
    }

    /// Adds a new token for `principal` with `scopes` to `path` (created 0600 if
    /// missing); returns the token, which is stored only hashed.
    pub fn add(path: &Path, principal: &str, scopes: &[String]) -> Result<String, TokenError> {
        let mut file = TokenFile::read(path)?;
        let token = generate();
        file.token.push(TokenEntry {
            principal: principal.to_string(),
            scopes: scopes.to_vec(),
            sha256: hash(&token),
        });
        let text = toml::to_string(&file).map_err(|e| TokenError::Invalid {
            path: path.into(),
            reason: e.to_string(),
        })?;
        // Check what is written the way it will be read.
        let _: TokenFile = toml::from_str(&text).map_err(|e| TokenError::Invalid {
            path: path.into(),
            reason: e.to_string(),
        })?;
        write_private(path, &text).map_err(|source| TokenError::Io {
            path: path.into(),
            source,
        })?;
        TokenFile::read(path)?;
        Ok(token)
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("toml.tmp");
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The scope a gRPC method needs; `None`: open to all.
pub fn required_scope(path: &str) -> Option<&'static str> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    Some(match service {
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => return None,
        "allot.v1.Enforcer" | "envoy.service.ratelimit.v3.RateLimitService" => "enforce",
        "allot.v1.Admin" if method.starts_with("Get") => "support:read",
        "allot.v1.Billing" => "billing",
        "allot.v1.Spool" => "spool",
        "allot.v1.Peer" => "peer",
        // Admin changes, and anything unknown: the strictest.
        _ => "admin",
    })
}

/// Why a call was refused.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The caller, when its token was known.
    pub principal: Option<String>,
    /// The status it gets.
    pub status: Status,
}

/// The tokens in force, reloaded when their file changes.
pub struct Tokens {
    path: PathBuf,
    state: RwLock<(Option<SystemTime>, Vec<TokenEntry>)>,
}

impl Tokens {
    /// The tokens of `path`.
    pub fn load(path: &Path) -> Result<Tokens, TokenError> {
        let file = TokenFile::read(path)?;
        Ok(Tokens {
            path: path.into(),
            state: RwLock::new((modified(path), file.token)),
        })
    }

    /// How many tokens are in force.
    pub fn len(&self) -> usize {
        self.state.read().unwrap_or_else(|p| p.into_inner()).1.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the file again if it changed; a malformed file keeps the tokens in force
    /// (and is logged), so a bad edit cannot lock everyone out or let everyone in.
    pub fn refresh(&self) {
        let now = modified(&self.path);
        if now == self.state.read().unwrap_or_else(|p| p.into_inner()).0 {
            return;
        }
        match TokenFile::read(&self.path) {
            Ok(f) => {
                tracing::info!(path = %self.path.display(), tokens = f.token.len(), "token file reloaded");
                *self.state.write().unwrap_or_else(|p| p.into_inner()) = (now, f.token);
            }
            Err(e) => {
                tracing::error!(error = %e, "token file not reloaded; the previous tokens stay in force")
            }
        }
    }

    /// Checks the `authorization` header value of a call to `path`.
    pub fn check(
        &self,
        path: &str,
        authorization: Option<&str>,
    ) -> Result<Option<Principal>, Refusal> {
        let Some(scope) = required_scope(path) else {
            return Ok(None);
        };
        let unauthenticated = |why: &str| Refusal {
            principal: None,
            status: Status::unauthenticated(format!(
                "{why}: send `authorization: Bearer <token>` (allot --token / ALLOT_TOKEN)"
            )),
        };
        let Some(value) = authorization else {
            return Err(unauthenticated("no token"));
        };
        let Some(token) = value.strip_prefix("Bearer ").map(str::trim) else {
            return Err(unauthenticated(
                "the authorization header is not a bearer token",
            ));
        };
        let digest = hash(token);
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = state.1.iter().find(|t| constant_eq(&t.sha256, &digest)) else {
            return Err(unauthenticated("unknown token"));
        };
        if entry.scopes.iter().any(|s| s == scope || s == "admin") {
            Ok(Some(Principal(entry.principal.clone())))
        } else {
            Err(Refusal {
                principal: Some(entry.principal.clone()),
                status: Status::permission_denied(format!(
                    "{} may not call {path}: it needs scope {scope} (it has {})",
                    entry.principal,
                    entry.scopes.join(", ")
                )),
            })
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Compares two hex digests without stopping at the first difference.
fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| {
            acc | (x.to_ascii_lowercase() ^ y.to_ascii_lowercase())
        }) == 0
}

/// What a refusal is reported to (the node records it in the ledger).
pub type OnRefusal = Arc<dyn Fn(&str, &Refusal) + Send + Sync>;

/// A tower layer that checks every call's token before it is routed.
#[derive(Clone)]
pub struct AuthLayer {
    /// `None`: every call passes (`--insecure-no-auth`).
    tokens: Option<Arc<Tokens>>,
    on_refusal: OnRefusal,
}

impl AuthLayer {
    /// Checks calls against `tokens`; refusals go to `on_refusal` too.
    pub fn new(tokens: Arc<Tokens>, on_refusal: OnRefusal) -> AuthLayer {
        AuthLayer {
            tokens: Some(tokens),
            on_refusal,
        }
    }

    /// Lets every call through.
    pub fn open() -> AuthLayer {
        AuthLayer {
            tokens: None,
            on_refusal: Arc::new(|_, _| {}),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the node's routes.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let Some(tokens) = &self.layer.tokens else {
            return Box::pin(self.inner.call(req));
        };
        match tokens.check(&path, header) {
            Ok(principal) => {
                if let Some(p) = principal {
                    req.extensions_mut().insert(p);
                }
                Box::pin(self.inner.call(req))
            }
            Err(refusal) => {
                (self.layer.on_refusal)(&path, &refusal);
                let response = refusal.status.into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// The token file's default place.
pub fn default_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tokens.toml")
}

/// `BTreeSet` of the scopes named, checked.
pub fn parse_scopes(list: &[String]) -> Result<Vec<String>, String> {
    let mut out = BTreeSet::new();
    for s in list {
        if !SCOPES.contains(&s.as_str()) {
            return Err(format!("unknown scope {s:?}; one of {}", SCOPES.join(", ")));
        }
        out.insert(s.clone());
    }
    if out.is_empty() {
        return Err("give at least one --scope".into());
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_need_their_scopes() {
        let cases = [
            ("/allot.v1.Enforcer/Reserve", Some("enforce")),
            ("/allot.v1.Admin/GetTenant", Some("support:read")),
            ("/allot.v1.Admin/GetTenantHistory", Some("support:read")),
            ("/allot.v1.Admin/PutSubscription", Some("admin")),
            ("/allot.v1.Billing/Export", Some("billing")),
            ("/allot.v1.Spool/Ack", Some("spool")),
            ("/allot.v1.Peer/Sync", Some("peer")),
            (
                "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
                Some("enforce"),
            ),
            ("/grpc.health.v1.Health/Check", None),
            ("/something.Else/Call", Some("admin")),
        ];
        for (path, scope) in cases {
            assert_eq!(required_scope(path), scope, "{path}");
        }
    }

    #[test]
    fn tokens_are_checked_by_hash_and_scope() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let support = TokenFile::add(&path, "sam", &["support:read".into()]).unwrap();
        let admin = TokenFile::add(&path, "ada", &["admin".into()]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&support) && text.contains(&hash(&support)));
        let t = Tokens::load(&path).unwrap();
        let bearer = |tok: &str| format!("Bearer {tok}");
        let ok = |p: &str, tok: &str| t.check(p, Some(&bearer(tok))).map(|p| p.map(|p| p.0));
        assert_eq!(
            ok("/allot.v1.Admin/GetTenant", &support).unwrap(),
            Some("sam".into())
        );
        let e = ok("/allot.v1.Admin/PutSubscription", &support).unwrap_err();
        assert_eq!(e.status.code(), tonic::Code::PermissionDenied);
        assert_eq!(e.principal.as_deref(), Some("sam"));
        assert!(
            e.status.message().contains("needs scope admin"),
            "{}",
            e.status.message()
        );
        assert_eq!(
            ok("/allot.v1.Enforcer/Check", &admin).unwrap(),
            Some("ada".into())
        );
        let e = ok("/allot.v1.Enforcer/Check", "al_wrong").unwrap_err();
        assert_eq!(e.status.code(), tonic::Code::Unauthenticated);
        let e = t.check("/allot.v1.Enforcer/Check", None).unwrap_err();
        assert!(e.status.message().starts_with("no token"));
        assert_eq!(t.check("/grpc.health.v1.Health/Check", None).unwrap(), None);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn malformed_token_files_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        let cases = [
            (
                "[[token]]\nprincipal = \"a\"\nscopes = [\"root\"]\nsha256 = \"00\"\n",
                "token[0].sha256",
            ),
            (
                &format!(
                    "[[token]]\nprincipal = \"a\"\nscopes = [\"root\"]\nsha256 = \"{}\"\n",
                    "a".repeat(64)
                ),
                "unknown scope \"root\"",
            ),
            (
                &format!(
                    "[[token]]\nprincipal = \" \"\nscopes = [\"admin\"]\nsha256 = \"{}\"\n",
                    "a".repeat(64)
                ),
                "token[0].principal",
            ),
            ("[[token]]\nwho = \"a\"\n", "unknown field `who`"),
        ];
        for (text, want) in cases {
            std::fs::write(&path, text).unwrap();
            let e = TokenFile::read(&path).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn a_bad_edit_keeps_the_tokens_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        let tok = TokenFile::add(&path, "ada", &["admin".into()]).unwrap();
        let t = Tokens::load(&path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "not toml [").unwrap();
        t.refresh();
        assert!(t
            .check("/allot.v1.Enforcer/Check", Some(&format!("Bearer {tok}")))
            .is_ok());
        // Removing the line revokes it.
        std::fs::write(&path, "").unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(later).unwrap();
        t.refresh();
        assert!(t
            .check("/allot.v1.Enforcer/Check", Some(&format!("Bearer {tok}")))
            .is_err());
    }
}
