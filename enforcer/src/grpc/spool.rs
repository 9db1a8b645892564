//! The `allot.v1.Spool` service: the embedded store's usage events for `allot aggregate`,
//! read by one consumer at a time (a lease renewed by its calls).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use allot_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::status::invalid;
use crate::embedded::EmbeddedStore;

/// Most events one read returns.
pub const MAX_READ: u32 = 10_000;
/// How long a consumer holds the spool after its last call.
pub const LEASE: Duration = Duration::from_secs(10);

/// The Spool service over a node's embedded store.
pub struct SpoolService {
    store: EmbeddedStore,
    holder: Mutex<Option<(String, Instant)>>,
}

impl SpoolService {
    /// A service over `store`'s spool.
    pub fn new(store: EmbeddedStore) -> Self {
        SpoolService {
            store,
            holder: Mutex::new(None),
        }
    }

    /// Takes or renews the lease for `consumer`.
    fn lease(&self, consumer: &str) -> Result<(), Status> {
        if consumer.is_empty() {
            return Err(invalid("consumer", "required: the reading aggregator's id"));
        }
        let mut h = self.holder.lock().unwrap_or_else(|p| p.into_inner());
        match &*h {
            Some((who, at)) if who != consumer && at.elapsed() < LEASE => {
                Err(Status::failed_precondition(format!(
                    "the spool is held by consumer {who:?} for {} more; one aggregator reads a node's spool at a time",
                    humantime::format_duration(Duration::from_secs(
                        (LEASE - at.elapsed()).as_secs() + 1
                    ))
                )))
            }
            _ => {
                *h = Some((consumer.to_string(), Instant::now()));
                Ok(())
            }
        }
    }
}

#[tonic::async_trait]
impl pb::spool_server::Spool for SpoolService {
    async fn read(
        &self,
        req: Request<pb::ReadSpoolRequest>,
    ) -> Result<Response<pb::ReadSpoolResponse>, Status> {
        let r = req.into_inner();
        self.lease(&r.consumer)?;
        let max = match r.max {
            0 => 1_000,
            m if m > MAX_READ => return Err(invalid("max", format!("must be at most {MAX_READ}"))),
            m => m,
        };
        let store = self.store.clone();
        let rows = tokio::task::spawn_blocking(move || store.spool_read(r.after, max as usize))
            .await
            .map_err(|e| Status::internal(format!("spool read: {e}")))?
            .map_err(crate::engine::EngineError::from)?;
        Ok(Response::new(pb::ReadSpoolResponse {
            entries: rows
                .into_iter()
                .map(|(seq, fields)| pb::SpoolEntry {
                    seq,
                    fields: fields.into_iter().collect(),
                })
                .collect(),
        }))
    }

    async fn ack(
        &self,
        req: Request<pb::AckSpoolRequest>,
    ) -> Result<Response<pb::AckSpoolResponse>, Status> {
        let r = req.into_inner();
        self.lease(&r.consumer)?;
        self.store
            .spool_ack(r.upto)
            .await
            .map_err(crate::engine::EngineError::from)?;
        Ok(Response::new(pb::AckSpoolResponse {}))
    }
}
