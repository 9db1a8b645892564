//! The engine's error: what went wrong, in terms a caller can act on.
//!
//! The gRPC layer maps each kind to a status code in one place (`grpc::status`).

use meter::quota::RequestError;
use meter::store::StoreError;

/// Why an engine call failed. Every variant that is about input names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A field's value is unacceptable; nothing changed.
    #[error("{field}: {reason}")]
    Invalid {
        /// The request field.
        field: String,
        /// Why.
        reason: String,
    },
    /// A field names something that does not exist (tenant, metric, reservation…).
    #[error("{field}: {reason}")]
    NotFound {
        /// The request field.
        field: String,
        /// What is missing.
        reason: String,
    },
    /// Something with that identity exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request contradicts the state (reservation already released, published plan
    /// changed, no catalog applied yet…).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A backend is down; the same call may succeed later.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or corrupt data.
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    /// An invalid field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        EngineError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A missing thing.
    pub fn not_found(field: impl Into<String>, reason: impl Into<String>) -> Self {
        EngineError::NotFound {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid { field, reason } => EngineError::Invalid { field, reason },
            StoreError::NotFound { field, reason } => EngineError::NotFound { field, reason },
            StoreError::Conflict(m) => EngineError::FailedPrecondition(m),
            StoreError::Unavailable(m) => EngineError::Unavailable(m),
            StoreError::Indeterminate(m) => EngineError::Unavailable(format!(
                "{m}; the request may have been applied: retry with the same idempotency key or event id"
            )),
            StoreError::Corrupt(m) => EngineError::Internal(m),
        }
    }
}

impl From<RequestError> for EngineError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Invalid { field, reason } => EngineError::Invalid { field, reason },
            RequestError::NotFound { field, reason } => EngineError::NotFound { field, reason },
        }
    }
}
