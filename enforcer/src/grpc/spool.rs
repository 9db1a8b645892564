//! The `allot.v1.Spool` service: the embedded store's usage events for `allot aggregate`.

use allot_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::status::invalid;
use crate::embedded::EmbeddedStore;

/// Most events one read returns.
pub const MAX_READ: u32 = 10_000;

/// The Spool service over a node's embedded store.
pub struct SpoolService {
    store: EmbeddedStore,
}

impl SpoolService {
    /// A service over `store`'s spool.
    pub fn new(store: EmbeddedStore) -> Self {
        SpoolService { store }
    }
}

#[tonic::async_trait]
impl pb::spool_server::Spool for SpoolService {
    async fn read(
        &self,
        req: Request<pb::ReadSpoolRequest>,
    ) -> Result<Response<pb::ReadSpoolResponse>, Status> {
        let r = req.into_inner();
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
        self.store
            .spool_ack(req.into_inner().upto)
            .await
            .map_err(crate::engine::EngineError::from)?;
        Ok(Response::new(pb::AckSpoolResponse {}))
    }
}
