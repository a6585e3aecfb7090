//! A contract end through the adapter: `ExecuteBulk` and `GetBulkStatus` (see the parent
//! module's documentation).

use dsrelay_proto::millis_from_timestamp;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    BulkOperation, ExecuteBulkRequest, ExecuteBulkResponse, ExecuteOutcome, GetBulkStatusRequest,
};

use super::{clip, retention_expired_key, AdapterConnector};
use crate::export::{JsonArrayWriter, JSON};
use crate::{BulkJob, BulkOp, BulkProgress, ConnectorError, ErasedCount, Outcome, Phase};

impl AdapterConnector {
    /// Takes one step of `job`.
    pub(super) async fn bulk(&self, job: &BulkJob) -> Result<Outcome, ConnectorError> {
        if let Some(refusal) = self.refuse_controller(&job.controller) {
            return Ok(refusal);
        }
        let (key, response) = match &job.phase {
            Phase::Start => (
                job.job_id.clone(),
                self.execute_bulk(job, &job.job_id, false).await?,
            ),
            Phase::RetentionExpired => {
                if job.op != BulkOp::Erase {
                    return Err(ConnectorError::Permanent(
                        "only an erasure has data retained until a date".into(),
                    ));
                }
                let key = retention_expired_key(&job.job_id);
                let response = self.execute_bulk(job, &key, true).await?;
                (key, response)
            }
            Phase::Confirm { handle } => (handle.clone(), self.bulk_status(handle).await?),
        };
        if let Some(p) = response.progress {
            job.progress.report(BulkProgress {
                subjects_done: p.subjects_done,
                subjects_total: p.subjects_total,
                records_done: p.records_done,
                records_total: p.records_total,
            });
        }
        let paged = response.export_paged;
        let mut outcome = bulk_outcome(&key, response)?;
        match &mut outcome {
            Outcome::Completed { files, .. } if job.op == BulkOp::Export => {
                let sink = job.export.as_ref().ok_or_else(|| {
                    ConnectorError::Permanent(
                        "no export folder was given for the contract end's export".into(),
                    )
                })?;
                let file = if paged {
                    self.write_paged_export(sink, &key).await?
                } else {
                    // Nothing to read: the controller has no data here.
                    JsonArrayWriter::new(sink.file("export.json", JSON).await?)
                        .await?
                        .finish()
                        .await?
                };
                *files = vec![file];
            }
            Outcome::Retained { until_ms, .. }
                if job.phase == Phase::RetentionExpired && *until_ms <= job.now_ms =>
            {
                return Err(ConnectorError::Permanent(format!(
                    "the adapter still retains data after its retain-until date ({until_ms} ms \
                     since the epoch); an operator must check it"
                )));
            }
            _ => {}
        }
        Ok(outcome)
    }

    async fn execute_bulk(
        &self,
        job: &BulkJob,
        key: &str,
        retention_expired: bool,
    ) -> Result<ExecuteBulkResponse, ConnectorError> {
        let operation = match job.op {
            BulkOp::Export => BulkOperation::Export,
            BulkOp::Erase => BulkOperation::Erase,
        };
        let request = self.outgoing(ExecuteBulkRequest {
            job_id: key.to_string(),
            request_id: job.request_id.clone(),
            controller: job.controller.clone(),
            operation: operation as i32,
            retention_expired,
            due_at: Some(timestamp_from_millis(job.due_at_ms)),
        });
        let mut client = self.client.clone();
        let result = tokio::time::timeout(self.timeout, client.execute_bulk(request)).await;
        self.finish("ExecuteBulk", result)
    }

    async fn bulk_status(&self, job_id: &str) -> Result<ExecuteBulkResponse, ConnectorError> {
        let request = self.outgoing(GetBulkStatusRequest {
            job_id: job_id.to_string(),
        });
        let mut client = self.client.clone();
        let result = tokio::time::timeout(self.timeout, client.get_bulk_status(request)).await;
        self.finish("GetBulkStatus", result)
    }
}

/// Turns an adapter's answer to a bulk step into an [`Outcome`] (a COMPLETED export without
/// its file: [`AdapterConnector::bulk`] writes it); `handle` is the key the answer was given
/// under.
fn bulk_outcome(handle: &str, r: ExecuteBulkResponse) -> Result<Outcome, ConnectorError> {
    let note = clip(r.note);
    let erased: Vec<ErasedCount> = r
        .erased
        .into_iter()
        .map(|e| ErasedCount {
            target: clip(e.target),
            action: clip(e.action),
            count: e.count.max(0),
        })
        .collect();
    let records = if erased.is_empty() {
        r.progress
            .map_or(0, |p| i64::try_from(p.records_done).unwrap_or(i64::MAX))
    } else {
        erased
            .iter()
            .map(|e| e.count)
            .fold(0i64, i64::saturating_add)
    };
    let outcome = ExecuteOutcome::try_from(r.outcome).unwrap_or(ExecuteOutcome::Unspecified);
    match outcome {
        ExecuteOutcome::Completed => Ok(Outcome::Completed {
            records_affected: records,
            note,
            files: Vec::new(),
            erased,
        }),
        ExecuteOutcome::NotFound => Ok(Outcome::NotFound {
            note: if note.is_empty() {
                "the adapter holds no data of the controller".into()
            } else {
                note
            },
        }),
        ExecuteOutcome::Retained => {
            if r.legal_basis.trim().is_empty() {
                return Err(ConnectorError::Permanent(
                    "the adapter answered RETAINED without a legal_basis".into(),
                ));
            }
            let Some(until) = r.retain_until.as_ref() else {
                return Err(ConnectorError::Permanent(
                    "the adapter answered RETAINED without retain_until".into(),
                ));
            };
            Ok(Outcome::Retained {
                legal_basis: clip(r.legal_basis),
                until_ms: millis_from_timestamp(until),
                records_affected: records,
                note,
                erased,
            })
        }
        ExecuteOutcome::Accepted => Ok(Outcome::Accepted {
            handle: handle.to_string(),
            note: if note.is_empty() {
                "the adapter accepted the contract end's step".into()
            } else {
                note
            },
        }),
        ExecuteOutcome::Refused => Ok(Outcome::Refused {
            reason: if r.reason.trim().is_empty() {
                "refused by the adapter (no reason given)".into()
            } else {
                clip(r.reason)
            },
        }),
        ExecuteOutcome::Failed => Err(ConnectorError::Permanent(clip(format!(
            "the adapter failed the contract end's step: {}",
            if r.reason.is_empty() {
                "(no reason given)"
            } else {
                r.reason.as_str()
            }
        )))),
        ExecuteOutcome::Unspecified => Err(ConnectorError::Permanent(format!(
            "the adapter answered without a valid outcome ({})",
            r.outcome
        ))),
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{BulkErasedCount, BulkJobProgress};

    use super::*;

    #[test]
    fn maps_bulk_answers() {
        let r = ExecuteBulkResponse {
            outcome: ExecuteOutcome::Completed as i32,
            note: "deleted".into(),
            erased: vec![
                BulkErasedCount {
                    target: "subscribers".into(),
                    action: "deleted".into(),
                    count: 3,
                },
                BulkErasedCount {
                    target: "deliveries".into(),
                    action: "deleted".into(),
                    count: 7,
                },
            ],
            progress: Some(BulkJobProgress {
                subjects_done: 3,
                subjects_total: 3,
                records_done: 10,
                records_total: 10,
            }),
            ..Default::default()
        };
        let Outcome::Completed {
            records_affected: 10,
            erased,
            ..
        } = bulk_outcome("j", r).unwrap()
        else {
            panic!()
        };
        assert_eq!(erased.len(), 2);
        let accepted = ExecuteBulkResponse {
            outcome: ExecuteOutcome::Accepted as i32,
            ..Default::default()
        };
        assert!(matches!(
            bulk_outcome("j#retention-expired", accepted).unwrap(),
            Outcome::Accepted { handle, .. } if handle == "j#retention-expired"
        ));
        let retained = ExecuteBulkResponse {
            outcome: ExecuteOutcome::Retained as i32,
            legal_basis: "bookkeeping act".into(),
            ..Default::default()
        };
        let e = bulk_outcome("j", retained).unwrap_err();
        assert!(e.to_string().contains("retain_until"), "{e}");
        for (outcome, permanent) in [
            (ExecuteOutcome::Failed, true),
            (ExecuteOutcome::Unspecified, true),
        ] {
            let r = ExecuteBulkResponse {
                outcome: outcome as i32,
                ..Default::default()
            };
            assert_eq!(bulk_outcome("j", r).is_err(), permanent);
        }
    }
}
