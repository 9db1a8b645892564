//! ClickHouse over HTTP (the official `clickhouse` crate): inserting a batch of rows as
//! one part, reading how far a source got (`max(src_offset)`), fencing an insert whose
//! outcome is unknown, and sorting the server's errors into retry or reject.
//!
//! The client runs with validation off and `RowBinary`, the only way the crate talks to
//! ClickHouse 18.16 (see the workspace notes); values are bound client-side (`bind`).

use std::time::Duration;

use async_trait::async_trait;
use clickhouse::Client;

use crate::error::SinkError;
use crate::row::EventRow;
use crate::schema::Sql;

/// The raw events table.
pub const EVENTS_TABLE: &str = "usage_events";

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct ClickHouseConfig {
    /// `http://host:port`.
    pub url: String,
    /// Database (created at start if missing).
    pub database: String,
    /// User, if not the server's default.
    pub user: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Longest wait for any one request (an insert included).
    pub timeout: Duration,
}

/// A ClickHouse database.
#[derive(Clone)]
pub struct ClickHouse {
    client: Client,
    timeout: Duration,
}

impl ClickHouse {
    /// A client of `cfg.database` (no request is made).
    pub fn new(cfg: &ClickHouseConfig) -> ClickHouse {
        let mut client = Client::default().with_url(&cfg.url).with_validation(false);
        if let Some(u) = &cfg.user {
            client = client.with_user(u);
        }
        if let Some(p) = &cfg.password {
            client = client.with_password(p);
        }
        ClickHouse {
            client: client.with_database(&cfg.database),
            timeout: cfg.timeout,
        }
    }

    /// Creates `cfg.database` if it does not exist (through the default database).
    pub async fn create_database(cfg: &ClickHouseConfig) -> Result<(), SinkError> {
        let mut other = cfg.clone();
        other.database = "default".into();
        let db = ClickHouse::new(&other);
        let mut sql = String::from("CREATE DATABASE IF NOT EXISTS ");
        quote_identifier(&cfg.database, &mut sql);
        db.execute(&sql).await
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> Result<T, SinkError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(SinkError::Unreachable(format!(
                "{what}: no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// The highest `src_offset` of `src` in `usage_events` (0 when it has none): every
    /// entry of `src` at or below it is in the table, since a source's rows are inserted
    /// in offset order, each insert one atomic part.
    ///
    /// Reads the `src` and `src_offset` columns of every part (the sort key starts with
    /// the tenant): cheap next to an insert, and done only when a partition is taken and
    /// after a failed insert.
    pub async fn max_offset(&self, src: &str) -> Result<u64, SinkError> {
        self.bounded(
            "max(src_offset)",
            self.client
                .query("SELECT max(src_offset) FROM usage_events WHERE src = ?")
                .bind(src)
                .fetch_one::<u64>(),
        )
        .await
    }

    /// Whether ClickHouse answers a query (readiness).
    pub async fn ping(&self) -> Result<(), SinkError> {
        self.bounded("ping", self.client.query("SELECT 1").fetch_one::<u8>())
            .await
            .map(|_| ())
    }

    /// Inserts `rows` as one INSERT under `query_id` (so that [`ClickHouse::fence`] can
    /// stop it if its answer is lost). The caller keeps them to one month, so that they
    /// make one part: the whole insert lands or none of it.
    pub async fn insert(&self, rows: &[EventRow], query_id: &str) -> Result<(), SinkError> {
        let run = async {
            let mut insert = self
                .client
                .insert::<EventRow>(EVENTS_TABLE)
                .await?
                .with_timeouts(Some(self.timeout), Some(self.timeout))
                .with_setting("query_id", query_id);
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        };
        let started = std::time::Instant::now();
        let result = self.bounded("insert", run).await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        metrics::histogram!(crate::metrics::INSERT_SECONDS, "result" => outcome)
            .record(started.elapsed().as_secs_f64());
        if result.is_ok() {
            metrics::counter!(crate::metrics::ROWS_INSERTED).increment(rows.len() as u64);
        }
        result
    }

    /// Inserts `rows` into `table` as one INSERT.
    pub async fn insert_rows<T>(&self, table: &str, rows: &[T]) -> Result<(), SinkError>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite,
    {
        let run = async {
            let mut insert = self
                .client
                .insert::<T>(table)
                .await?
                .with_timeouts(Some(self.timeout), Some(self.timeout));
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        };
        self.bounded("insert", run).await
    }

    /// The rows of a query (values already in its text).
    pub async fn fetch_all<T>(&self, sql: &str) -> Result<Vec<T>, SinkError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.bounded("query", self.client.query_raw(sql).fetch_all::<T>())
            .await
    }

    /// Makes sure the insert `query_id` is no longer running (`KILL QUERY … SYNC`): after
    /// this, `usage_events` shows it either complete or not at all, and it cannot land
    /// later. Used when an insert's answer was lost, before deciding from
    /// [`ClickHouse::max_offset`] whether it landed.
    pub async fn fence(&self, query_id: &str) -> Result<(), SinkError> {
        self.bounded(
            "kill query",
            self.client
                .query("KILL QUERY WHERE query_id = ? SYNC")
                .bind(query_id)
                .execute(),
        )
        .await
    }

    /// Makes the rollups and `denials` agree with `usage_events` for `tenants` × `metrics`
    /// in `month` (`yyyymm`): inserts, per rollup key, the difference between the raw
    /// events and the rollup, and the denials missing from `denials`. Needed after an
    /// insert whose answer was an error but whose part landed: the views run after the
    /// part is written, so a server stopped in between leaves the rollups short. Safe to
    /// repeat (a second run finds nothing to add) as long as nobody else writes these
    /// tenants meanwhile, which the partition's lease guarantees: a tenant's events all
    /// come through one partition.
    pub async fn repair_derived(
        &self,
        month: u32,
        tenants: &[String],
        metrics: &[String],
    ) -> Result<(), SinkError> {
        for sql in crate::schema::repair_statements(month, tenants, metrics) {
            self.bounded(
                "repair derived tables",
                self.client.query_raw(&sql).execute(),
            )
            .await?;
        }
        Ok(())
    }

    /// The month, tenants and metrics of the last insert of `src` (the one holding
    /// `max_offset`), or more (every insert of that month in the same second): what
    /// [`ClickHouse::repair_derived`] must check when a partition is taken, in case its
    /// previous holder died between a failed insert and its repair.
    pub async fn last_insert_keys(
        &self,
        src: &str,
        max_offset: u64,
    ) -> Result<Option<(u32, Vec<String>, Vec<String>)>, SinkError> {
        let last: Option<(u32, u32)> = self
            .bounded(
                "find the last insert",
                self.client
                    .query(
                        "SELECT toYYYYMM(event_time), toUInt32(inserted_at) FROM usage_events
                         WHERE src = ? AND src_offset = ? LIMIT 1",
                    )
                    .bind(src)
                    .bind(max_offset)
                    .fetch_optional(),
            )
            .await?;
        let Some((month, at)) = last else {
            return Ok(None);
        };
        #[derive(serde::Deserialize, clickhouse::Row)]
        struct Keys {
            tenants: Vec<String>,
            metrics: Vec<String>,
        }
        let keys: Keys = self
            .bounded(
                "keys of the last insert",
                self.client
                    .query(&format!(
                        "SELECT groupUniqArray(tenant) AS tenants, groupUniqArray(metric) AS metrics
                         FROM usage_events
                         WHERE src = ? AND toYYYYMM(event_time) = {month}
                           AND toUInt32(inserted_at) >= {at}"
                    ))
                    .bind(src)
                    .fetch_one(),
            )
            .await?;
        Ok(Some((month, keys.tenants, keys.metrics)))
    }

    /// Keeps a bad entry in `dead_letters`: its source and offset, its fields (a JSON
    /// object) and why it was refused. Writing it again (after a crash before the entry
    /// was acknowledged) replaces it when parts merge (`ReplacingMergeTree`).
    pub async fn dead_letter(
        &self,
        src: &str,
        offset: u64,
        fields_json: &str,
        error: &str,
    ) -> Result<(), SinkError> {
        self.bounded(
            "dead letter",
            self.client
                .query(
                    "INSERT INTO dead_letters (src, src_offset, fields, error, at)
                     VALUES (?, ?, ?, ?, now())",
                )
                .bind(src)
                .bind(offset)
                .bind(fields_json)
                .bind(error)
                .execute(),
        )
        .await
    }

    /// The underlying client (for queries of the rollups).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

#[async_trait]
impl Sql for ClickHouse {
    async fn execute(&self, sql: &str) -> Result<(), SinkError> {
        self.bounded("statement", self.client.query_raw(sql).execute())
            .await
    }

    async fn fetch_u32(&self, sql: &str) -> Result<Vec<u32>, SinkError> {
        self.bounded("query", self.client.query_raw(sql).fetch_all::<u32>())
            .await
    }
}

fn quote_identifier(name: &str, out: &mut String) {
    out.push('`');
    for c in name.chars() {
        if c == '`' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('`');
}

/// Server exception codes that say "not now": overload, limits, a replica or disk
/// problem, a cancelled query.
const BUSY_CODES: &[u32] = &[
    159,  // TIMEOUT_EXCEEDED
    160,  // TOO_SLOW
    164,  // READONLY
    202,  // TOO_MANY_SIMULTANEOUS_QUERIES
    203,  // NO_FREE_CONNECTION
    209,  // SOCKET_TIMEOUT
    210,  // NETWORK_ERROR
    225,  // NO_ZOOKEEPER
    236,  // ABORTED
    241,  // MEMORY_LIMIT_EXCEEDED
    242,  // TABLE_IS_READ_ONLY
    243,  // NOT_ENOUGH_SPACE
    252,  // TOO_MANY_PARTS
    285,  // TOO_FEW_LIVE_REPLICAS
    286,  // UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
    319,  // UNKNOWN_STATUS_OF_INSERT
    394,  // QUERY_WAS_CANCELLED
    425,  // SYSTEM_ERROR
    439,  // CANNOT_SCHEDULE_TASK
    999,  // KEEPER_EXCEPTION
    1000, // POCO_EXCEPTION
    1001, // STD_EXCEPTION
    1002, // UNKNOWN_EXCEPTION
];

/// Server exception codes about the server's setup rather than the data.
const SETUP_CODES: &[u32] = &[
    16,  // NO_SUCH_COLUMN_IN_TABLE
    60,  // UNKNOWN_TABLE
    81,  // UNKNOWN_DATABASE
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    194, // REQUIRED_PASSWORD
    195, // IP_ADDRESS_NOT_ALLOWED
    291, // DATABASE_ACCESS_DENIED
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

/// The exception code in a ClickHouse error text (`Code: 395, e.displayText() = …` on
/// 18.16, `Code: 395. DB::Exception: …` later), if any.
pub fn exception_code(message: &str) -> Option<u32> {
    let at = message.find("Code: ")? + "Code: ".len();
    let digits: String = message[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn classify(e: clickhouse::error::Error) -> SinkError {
    use clickhouse::error::Error as E;
    match e {
        E::BadResponse(message) => match exception_code(&message) {
            Some(code) if BUSY_CODES.contains(&code) => SinkError::Busy { code, message },
            Some(code) if SETUP_CODES.contains(&code) => SinkError::Setup { code, message },
            Some(code) => SinkError::Rejected { code, message },
            // An HTTP error without an exception (a proxy's 502…): not the server's word.
            None => SinkError::Unreachable(message),
        },
        other => SinkError::Unreachable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exception_codes_of_old_and_new_servers() {
        assert_eq!(
            exception_code("Code: 395, e.displayText() = DB::Exception: Value passed"),
            Some(395)
        );
        assert_eq!(
            exception_code("Code: 62. DB::Exception: Syntax error"),
            Some(62)
        );
        assert_eq!(exception_code("502 Bad Gateway"), None);
    }

    #[test]
    fn identifiers_are_quoted() {
        let mut s = String::new();
        quote_identifier("a`b", &mut s);
        assert_eq!(s, "`a\\`b`");
    }
}
