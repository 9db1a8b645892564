//! The crate's errors: [`AggregateError`] at its boundary (what `run` returns), and the
//! errors of its two backends, each saying whether a retry can help.

/// Why the aggregator stopped, or could not start.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    /// An option is unusable (its name and why).
    #[error("option {field}: {reason}")]
    Invalid {
        /// The option.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A schema migration failed: nothing after it was applied.
    #[error(transparent)]
    Migration(#[from] crate::schema::MigrationError),
    /// ClickHouse failed in a way retrying does not fix.
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] SinkError),
    /// The event source (Redis) failed in a way retrying does not fix, or could not be
    /// reached at start.
    #[error("event source: {0}")]
    Source(#[from] SourceError),
    /// The HTTP listener could not start.
    #[error("{0}")]
    Http(String),
}

/// What went wrong with ClickHouse.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// Unreachable or timed out.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The server is overloaded or cannot write right now (too many parts, memory,
    /// read-only, disk full…): the same request may succeed later.
    #[error("busy (code {code}): {message}")]
    Busy {
        /// ClickHouse's exception code.
        code: u32,
        /// The server's message.
        message: String,
    },
    /// The server refused the request because of how it is set up (unknown database,
    /// table or column, authentication, access): nothing to do with the data, and no
    /// retry fixes it until an operator does. Inserts retry it, loudly, rather than
    /// dead-letter good events; at start it stops the aggregator.
    #[error("refused by the server's setup (code {code}): {message}")]
    Setup {
        /// ClickHouse's exception code.
        code: u32,
        /// The server's message.
        message: String,
    },
    /// The server refused the statement or its data (for an insert: one of its rows is
    /// bad; the batch is bisected to find it).
    #[error("rejected (code {code}): {message}")]
    Rejected {
        /// ClickHouse's exception code (0 when the answer carried none).
        code: u32,
        /// The server's message.
        message: String,
    },
}

impl SinkError {
    /// Whether the same request may succeed later without anyone doing anything.
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Unreachable(_) | SinkError::Busy { .. })
    }
}

/// What went wrong with an event source.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// This aggregator no longer holds the partition (another one may): stop working on it
    /// without acknowledging anything.
    #[error("partition {partition}: lease lost (held by {owner:?})")]
    LeaseLost {
        /// The partition's name.
        partition: String,
        /// Who holds it now, if anyone.
        owner: Option<String>,
    },
    /// Unreachable or timed out: retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A reply or setting that makes no sense (not worth retrying).
    #[error("invalid: {0}")]
    Invalid(String),
}

impl SourceError {
    /// Whether the same call may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Unavailable(_))
    }
}
