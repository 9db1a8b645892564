//! The one table from engine errors to gRPC status codes.

use tonic::{Code, Status};

use crate::engine::EngineError;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        let code = match &e {
            EngineError::Invalid { .. } => Code::InvalidArgument,
            EngineError::NotFound { .. } => Code::NotFound,
            EngineError::AlreadyExists(_) => Code::AlreadyExists,
            EngineError::FailedPrecondition(_) => Code::FailedPrecondition,
            EngineError::Unavailable(_) => Code::Unavailable,
            EngineError::Internal(_) => Code::Internal,
        };
        if code == Code::Internal || code == Code::Unavailable {
            tracing::warn!(error = %e, ?code, "request failed");
        }
        Status::new(code, e.to_string())
    }
}

/// A missing or malformed proto field, as INVALID_ARGUMENT naming it.
pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}
