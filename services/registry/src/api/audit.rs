//! The audit trail's signed checkpoints (`ListAuditCheckpoints`), served from the checkpoint
//! file, which the registry's checkpointer
//! ([`dsrelay_runtime::audit::signer::Checkpointer`]) appends to.

use dsrelay_proto::v1::{AuditCheckpoint, AuditCheckpoints, ListAuditCheckpointsRequest};
use dsrelay_runtime::audit::checkpoint::Checkpoint;
use dsrelay_runtime::identity::FieldViolation;

use crate::error::ApiError;

use super::Api;

impl Api {
    /// A page of checkpoints after `after_seq`, with the key that checks them. Partners and
    /// operators alike: a checkpoint holds nothing but a seq, a hash and a time.
    pub(super) async fn audit_checkpoints(
        &self,
        req: tonic::Request<ListAuditCheckpointsRequest>,
    ) -> Result<AuditCheckpoints, ApiError> {
        self.partner_api_caller(&req)?;
        let r = req.into_inner();
        let page_size = match r.page_size {
            0 => 500,
            n @ 1..=1000 => n as usize,
            _ => {
                return Err(ApiError::invalid([FieldViolation::new(
                    "page_size",
                    "must be 0 (default 500) to 1000",
                )]))
            }
        };
        let Some(checkpointer) = &self.shared.checkpoints else {
            return Err(ApiError::failed_precondition(
                "this registry signs no audit checkpoints (audit.checkpoints = false)",
            ));
        };
        let (page, more) = checkpointer
            .page(r.after_seq, page_size)
            .await
            .map_err(|e| ApiError::data_loss(format!("the checkpoint file: {e:#}")))?;
        let next_after_seq = match page.last() {
            Some(last) if more => {
                Checkpoint::read_unchecked(last)
                    .map_err(ApiError::unexpected)?
                    .seq
            }
            _ => 0,
        };
        let key = checkpointer.public_key();
        Ok(AuditCheckpoints {
            checkpoints: page
                .into_iter()
                .map(|s| AuditCheckpoint {
                    // Checkpoints are signed as UTF-8 JSON text; lossless here.
                    body: String::from_utf8_lossy(&s.body).into_owned(),
                    signature: s.signature,
                    key_id: s.key_id,
                })
                .collect(),
            next_after_seq,
            public_key: key.to_base64(),
            key_id: key.key_id(),
        })
    }
}
