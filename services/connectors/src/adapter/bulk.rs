//! A contract end through the adapter: `ExecuteBulk` and `GetBulkStatus` (see the parent
//! module's documentation).

use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{
    BulkErasedCount, BulkJobProgress, BulkOperation, ExecuteBulkRequest, ExecuteBulkResponse,
    ExecuteOutcome, GetBulkStatusRequest,
};

use super::{
    clip, is_retention_run, not_past_its_date, retained_until, retention_expired_key,
    AdapterConnector,
};
use crate::export::{JsonArrayWriter, JSON};
use crate::{BulkJob, BulkOp, BulkProgress, ConnectorError, ErasedCount, Outcome, Phase};

impl AdapterConnector {
    /// Takes one step of `job`.
    pub(super) async fn bulk(&self, job: &BulkJob) -> Result<Outcome, ConnectorError> {
        if let Some(refusal) = self.refuse_controller(&job.controller) {
            return Ok(refusal);
        }
        let (key, response) = match &job.phase {
            // A call resumed after one cut off (`job.interrupted`) needs no care here: the
            // adapter answers a repeated job_id with the first call's outcome or progress and
            // does the work once (`adapter.proto`), so it never meets its own erasure's result.
            Phase::Start => (
                job.job_id.clone(),
                self.execute_bulk(job, &job.job_id, false).await?,
            ),
            Phase::RetentionExpired { until_ms } => {
                if job.op != BulkOp::Erase {
                    return Err(ConnectorError::Permanent(
                        "only an erasure has data retained until a date".into(),
                    ));
                }
                let key = retention_expired_key(&job.job_id, *until_ms);
                let response = self.execute_bulk(job, &key, true).await?;
                (key, response)
            }
            Phase::Confirm { handle } => (handle.clone(), self.bulk_status(handle).await?),
        };
        let progress = response.progress.clone().map(bulk_progress).transpose()?;
        let paged = response.export_paged;
        let exported =
            job.op == BulkOp::Export && response.outcome == ExecuteOutcome::Completed as i32;
        // A completed export's counts become what was returned, which the erasure after it
        // is checked against: they are reported only once its records are seen to hold them.
        // Any other answer's are reported at once, a failed one's too (what it erased).
        if !exported {
            if let Some(p) = &progress {
                job.progress.report(p.clone());
            }
        }
        let mut outcome = bulk_outcome(&key, response)?;
        // The adapter's answer to a repeated job_id is the whole job's, an earlier call's
        // work included, to which the processor adds what it recorded of the step.
        if let Outcome::Completed { erased, .. } | Outcome::Retained { erased, .. } = &mut outcome {
            *erased = job.beyond_recorded(std::mem::take(erased));
        }
        match &mut outcome {
            Outcome::Completed { files, .. } if exported => {
                let sink = job.export.as_ref().ok_or_else(|| {
                    ConnectorError::Permanent(
                        "no export folder was given for the contract end's export".into(),
                    )
                })?;
                let (file, written) = if paged {
                    self.write_paged_export(sink, &key).await?
                } else {
                    // Nothing to read: the controller has no data here.
                    let file = JsonArrayWriter::new(sink.file("export.json", JSON).await?)
                        .await?
                        .finish()
                        .await?;
                    (file, 0)
                };
                let subjects = progress.as_ref().map_or(0, |p| p.subjects_done);
                check_exported_subjects(subjects, written, paged)?;
                if let Some(p) = progress {
                    job.progress.report(p);
                }
                *files = vec![file];
            }
            _ => {}
        }
        // An ACCEPTED retention run is confirmed under its key, the only trace of the run
        // that Confirm carries.
        if is_retention_run(&job.phase, &job.job_id) {
            return Ok(super::nothing_left(not_past_its_date(outcome, job.now_ms)?));
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
            // The adapter checks it when the erasure starts (`adapter.proto`); a retention
            // run follows the erasure, which was checked.
            returned: job
                .returned
                .clone()
                .filter(|_| job.op == BulkOp::Erase && !retention_expired)
                .map(|p| BulkJobProgress {
                    subjects_done: p.subjects_done,
                    subjects_total: p.subjects_total,
                    records_done: p.records_done,
                    records_total: p.records_total,
                    erased: Vec::new(),
                }),
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

/// An adapter's count of what a bulk step erased in one place, clipped as its notes are; a
/// negative count is a malformed answer (a certificate would list it as nothing erased).
fn erased_count(e: BulkErasedCount) -> Result<ErasedCount, ConnectorError> {
    if e.count < 0 {
        return Err(ConnectorError::Permanent(clip(format!(
            "the adapter answered the contract end's step with a negative count of records \
             {} in {:?} ({}); a count of what was erased must be 0 or more",
            clip(e.action),
            clip(e.target),
            e.count
        ))));
    }
    Ok(ErasedCount {
        target: clip(e.target),
        action: clip(e.action),
        count: e.count,
    })
}

/// An adapter's progress as the processor records it; its counts by place are checked as an
/// answer's are ([`erased_count`]).
fn bulk_progress(p: BulkJobProgress) -> Result<BulkProgress, ConnectorError> {
    Ok(BulkProgress {
        subjects_done: p.subjects_done,
        subjects_total: p.subjects_total,
        records_done: p.records_done,
        records_total: p.records_total,
        erased: p
            .erased
            .into_iter()
            .map(erased_count)
            .collect::<Result<_, _>>()?,
    })
}

/// Checks that a completed export wrote (`written` records) at least one record per subject
/// its answer counted as done (`subjects`): each subject is a top-level record, so fewer
/// records means data that was counted as returned never came. The erasure that would
/// follow is then never started, since its check would compare the holder's data with counts
/// of data nobody received.
fn check_exported_subjects(subjects: u64, written: u64, paged: bool) -> Result<(), ConnectorError> {
    if written >= subjects {
        return Ok(());
    }
    let how = if paged {
        "its pages held"
    } else {
        "it set no export_paged, so its export holds"
    };
    Err(ConnectorError::Permanent(format!(
        "the adapter answered the contract end's export COMPLETED with {subjects} subject(s) \
         done, but {how} {written} record(s) (each subject is at least one record): the \
         controller's data was not returned, and nothing was erased"
    )))
}

/// Checks the progress of a COMPLETED answer: each done count equals its total
/// (`adapter.proto`), but where the total is 0, which says the adapter cannot count it. A
/// step whose own counts show it unfinished is not taken as done, nor certified.
fn check_finished(p: &BulkJobProgress) -> Result<(), ConnectorError> {
    let unfinished = |done: u64, total: u64| total > 0 && done != total;
    if unfinished(p.subjects_done, p.subjects_total) || unfinished(p.records_done, p.records_total)
    {
        return Err(ConnectorError::Permanent(format!(
            "the adapter answered the contract end's step COMPLETED with its progress \
             unfinished (subjects {} of {}, records {} of {}); a COMPLETED step's done counts \
             must equal their totals",
            p.subjects_done, p.subjects_total, p.records_done, p.records_total
        )));
    }
    Ok(())
}

/// Turns an adapter's answer to a bulk step into an [`Outcome`] (a COMPLETED export without
/// its file: [`AdapterConnector::bulk`] writes it); `handle` is the key the answer was given
/// under.
fn bulk_outcome(handle: &str, r: ExecuteBulkResponse) -> Result<Outcome, ConnectorError> {
    let note = clip(r.note);
    let erased: Vec<ErasedCount> = r
        .erased
        .into_iter()
        .map(erased_count)
        .collect::<Result<_, _>>()?;
    let outcome = ExecuteOutcome::try_from(r.outcome).unwrap_or(ExecuteOutcome::Unspecified);
    if outcome == ExecuteOutcome::Completed {
        if let Some(p) = &r.progress {
            check_finished(p)?;
        }
    }
    let records = if erased.is_empty() {
        r.progress
            .map_or(0, |p| i64::try_from(p.records_done).unwrap_or(i64::MAX))
    } else {
        erased
            .iter()
            .map(|e| e.count)
            .fold(0i64, i64::saturating_add)
    };
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
            let until_ms = retained_until(&r.legal_basis, r.retain_until.as_ref())?;
            Ok(Outcome::Retained {
                legal_basis: clip(r.legal_basis),
                until_ms,
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
    use std::sync::{Arc, Mutex};

    use dsrelay_proto::tonic::{self, Request, Response, Status};
    use dsrelay_proto::v1::subprocessor_adapter_server::{
        SubprocessorAdapter, SubprocessorAdapterServer,
    };
    use dsrelay_proto::v1::{
        BulkErasedCount, BulkJobProgress, DescribeRequest, DescribeResponse, ExecuteRequest,
        ExecuteResponse, ExportPage, GetExportPageRequest, GetTaskStatusRequest,
    };

    use super::*;
    use crate::adapter::{AdapterConfig, AdapterConnector};
    use crate::{Connector, ProgressReporter};

    /// An adapter whose bulk steps take a while: ExecuteBulk answers ACCEPTED with some
    /// progress, GetBulkStatus COMPLETED; a retention-expired erasure answers RETAINED with a
    /// date that has passed. It records the ExecuteBulk bodies.
    #[derive(Clone, Default)]
    struct SlowBulk(Arc<Mutex<Vec<ExecuteBulkRequest>>>);

    fn progress(done: u64) -> Option<BulkJobProgress> {
        Some(BulkJobProgress {
            subjects_done: done,
            subjects_total: 4,
            records_done: done * 2,
            records_total: 8,
            erased: Vec::new(),
        })
    }

    #[tonic::async_trait]
    impl SubprocessorAdapter for SlowBulk {
        async fn describe(
            &self,
            _: Request<DescribeRequest>,
        ) -> Result<Response<DescribeResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn execute(
            &self,
            _: Request<ExecuteRequest>,
        ) -> Result<Response<ExecuteResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn get_task_status(
            &self,
            _: Request<GetTaskStatusRequest>,
        ) -> Result<Response<ExecuteResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn get_export_page(
            &self,
            _: Request<GetExportPageRequest>,
        ) -> Result<Response<ExportPage>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn execute_bulk(
            &self,
            req: Request<ExecuteBulkRequest>,
        ) -> Result<Response<ExecuteBulkResponse>, Status> {
            let r = req.into_inner();
            self.0.lock().unwrap().push(r.clone());
            if r.retention_expired {
                return Ok(Response::new(ExecuteBulkResponse {
                    outcome: ExecuteOutcome::Retained as i32,
                    legal_basis: "bookkeeping act".into(),
                    retain_until: Some(timestamp_from_millis(1_650_000_000_000)),
                    ..Default::default()
                }));
            }
            Ok(Response::new(ExecuteBulkResponse {
                outcome: ExecuteOutcome::Accepted as i32,
                progress: progress(1),
                ..Default::default()
            }))
        }

        async fn get_bulk_status(
            &self,
            _: Request<GetBulkStatusRequest>,
        ) -> Result<Response<ExecuteBulkResponse>, Status> {
            Ok(Response::new(ExecuteBulkResponse {
                outcome: ExecuteOutcome::Completed as i32,
                erased: vec![BulkErasedCount {
                    target: "subscribers".into(),
                    action: "deleted".into(),
                    count: 4,
                }],
                progress: progress(4),
                ..Default::default()
            }))
        }
    }

    /// A server stopped by sending on its sender, and a connector to it.
    type Served = (
        AdapterConnector,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), anyhow::Error>>,
    );

    /// Serves `adapter` over mutual TLS on a free port.
    async fn serve<A: SubprocessorAdapter>(
        pki: &dsrelay_runtime::pki::DevPki,
        adapter: A,
    ) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let router =
            dsrelay_runtime::server::builder(pki.files("adapter").server_config().unwrap())
                .unwrap()
                .add_service(SubprocessorAdapterServer::new(adapter));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
            let _ = stopped.await;
        }));
        let connector = AdapterConnector::connect(&AdapterConfig {
            endpoint: format!("https://localhost:{port}"),
            identity: "spiffe://dsrelay.dev/adapter/example".into(),
            tls: pki.files("processor"),
            timeout_ms: 5_000,
            supported_kinds: Some(vec!["contract_end".into()]),
            controllers: None,
        })
        .unwrap();
        (connector, stop, server)
    }

    fn erase_job(progress: ProgressReporter) -> BulkJob {
        BulkJob {
            job_id: "ce1/newsletter".into(),
            request_id: "ce1".into(),
            controller: "acme".into(),
            op: BulkOp::Erase,
            phase: Phase::Start,
            due_at_ms: 2_000_000_000_000,
            now_ms: 1_700_000_000_000,
            interrupted: false,
            recorded_progress: Default::default(),
            export: None,
            progress,
            returned: None,
            returned_since_ms: None,
        }
    }

    #[tokio::test]
    async fn an_accepted_bulk_step_is_confirmed_with_its_progress() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        let adapter = SlowBulk::default();
        let (connector, stop, server) = serve(&pki, adapter.clone()).await;
        assert!(connector.supports(dsrelay_proto::v1::RequestKind::ContractEnd));
        let (reporter, seen) = ProgressReporter::new();
        let job = erase_job(reporter);
        let out = connector.run_bulk(&job).await.unwrap();
        let Outcome::Accepted { handle, .. } = out else {
            panic!("{out:?}");
        };
        assert_eq!(handle, "ce1/newsletter");
        assert_eq!(seen.borrow().subjects_done, 1);
        let sent = adapter.0.lock().unwrap()[0].clone();
        assert_eq!(sent.controller, "acme");
        assert_eq!(sent.operation, BulkOperation::Erase as i32);
        assert!(!sent.retention_expired);

        let confirm = BulkJob {
            phase: Phase::Confirm { handle },
            ..job.clone()
        };
        let out = connector.run_bulk(&confirm).await.unwrap();
        let Outcome::Completed {
            records_affected: 4,
            erased,
            ..
        } = out
        else {
            panic!("{out:?}");
        };
        assert_eq!(erased[0].target, "subscribers");
        assert_eq!(seen.borrow().records_done, 8);

        // Retained data past its date: sent under its own key, and an operator must look.
        let expired = BulkJob {
            phase: Phase::RetentionExpired {
                until_ms: 1_700_000_000_000,
            },
            ..job.clone()
        };
        let err = connector.run_bulk(&expired).await.unwrap_err();
        assert!(
            err.to_string().contains("after its retain-until date"),
            "{err}"
        );
        let sent = adapter.0.lock().unwrap()[1].clone();
        assert_eq!(
            sent.job_id,
            "ce1/newsletter#retention-expired-1700000000000"
        );
        assert!(sent.retention_expired);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// An adapter whose controller's data is gone by the time a step is confirmed:
    /// ExecuteBulk answers ACCEPTED, GetBulkStatus NOT_FOUND. It records the job ids asked.
    #[derive(Clone, Default)]
    struct GoneBulk(Arc<Mutex<Vec<String>>>);

    #[tonic::async_trait]
    impl SubprocessorAdapter for GoneBulk {
        async fn describe(
            &self,
            _: Request<DescribeRequest>,
        ) -> Result<Response<DescribeResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn execute(
            &self,
            _: Request<ExecuteRequest>,
        ) -> Result<Response<ExecuteResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn get_task_status(
            &self,
            _: Request<GetTaskStatusRequest>,
        ) -> Result<Response<ExecuteResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn get_export_page(
            &self,
            _: Request<GetExportPageRequest>,
        ) -> Result<Response<ExportPage>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn execute_bulk(
            &self,
            _: Request<ExecuteBulkRequest>,
        ) -> Result<Response<ExecuteBulkResponse>, Status> {
            Ok(Response::new(ExecuteBulkResponse {
                outcome: ExecuteOutcome::Accepted as i32,
                ..Default::default()
            }))
        }

        async fn get_bulk_status(
            &self,
            req: Request<GetBulkStatusRequest>,
        ) -> Result<Response<ExecuteBulkResponse>, Status> {
            self.0.lock().unwrap().push(req.into_inner().job_id);
            Ok(Response::new(ExecuteBulkResponse {
                outcome: ExecuteOutcome::NotFound as i32,
                note: "no such list".into(),
                ..Default::default()
            }))
        }
    }

    /// A retention run the adapter ACCEPTED is answered at its confirmation, which carries
    /// only the handle: NOT_FOUND there is nothing left too, as when answered at once.
    #[tokio::test]
    async fn nothing_left_confirmed_after_the_retention_date_completes_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        let adapter = GoneBulk::default();
        let (connector, stop, server) = serve(&pki, adapter.clone()).await;
        let (reporter, _) = ProgressReporter::new();
        let job = erase_job(reporter);
        let confirm = |phase| {
            let job = BulkJob {
                phase,
                ..job.clone()
            };
            let connector = &connector;
            async move {
                let out = connector.run_bulk(&job).await.unwrap();
                let Outcome::Accepted { handle, .. } = out else {
                    panic!("{out:?}");
                };
                let confirm = BulkJob {
                    phase: Phase::Confirm { handle },
                    ..job
                };
                connector.run_bulk(&confirm).await.unwrap()
            }
        };

        // A first step's NOT_FOUND stands: the adapter never held the controller's data.
        assert_eq!(
            confirm(Phase::Start).await,
            Outcome::NotFound {
                note: "no such list".into()
            }
        );
        assert_eq!(
            confirm(Phase::RetentionExpired {
                until_ms: 1_700_000_000_000
            })
            .await,
            Outcome::Completed {
                records_affected: 0,
                note: "nothing left to erase: no such list".into(),
                files: Vec::new(),
                erased: Vec::new(),
            }
        );
        assert_eq!(
            *adapter.0.lock().unwrap(),
            [
                "ce1/newsletter",
                "ce1/newsletter#retention-expired-1700000000000"
            ]
        );
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// An adapter that accepts every bulk step and confirms it RETAINED until a date that
    /// has passed, as one replaying its first answer would. It records the job ids asked.
    #[derive(Clone, Default)]
    struct ReplayedBulk(Arc<Mutex<Vec<String>>>);

    /// ReplayedBulk's date: before the jobs' clock.
    const PAST_MS: i64 = 1_650_000_000_000;

    #[tonic::async_trait]
    impl SubprocessorAdapter for ReplayedBulk {
        async fn describe(
            &self,
            _: Request<DescribeRequest>,
        ) -> Result<Response<DescribeResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn execute(
            &self,
            _: Request<ExecuteRequest>,
        ) -> Result<Response<ExecuteResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn get_task_status(
            &self,
            _: Request<GetTaskStatusRequest>,
        ) -> Result<Response<ExecuteResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn get_export_page(
            &self,
            _: Request<GetExportPageRequest>,
        ) -> Result<Response<ExportPage>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn execute_bulk(
            &self,
            _: Request<ExecuteBulkRequest>,
        ) -> Result<Response<ExecuteBulkResponse>, Status> {
            Ok(Response::new(ExecuteBulkResponse {
                outcome: ExecuteOutcome::Accepted as i32,
                ..Default::default()
            }))
        }

        async fn get_bulk_status(
            &self,
            req: Request<GetBulkStatusRequest>,
        ) -> Result<Response<ExecuteBulkResponse>, Status> {
            self.0.lock().unwrap().push(req.into_inner().job_id);
            Ok(Response::new(ExecuteBulkResponse {
                outcome: ExecuteOutcome::Retained as i32,
                legal_basis: "bookkeeping act".into(),
                retain_until: Some(timestamp_from_millis(PAST_MS)),
                ..Default::default()
            }))
        }
    }

    /// A retention run the adapter ACCEPTED and confirms RETAINED until a date already past
    /// would wake at once and be confirmed again, for ever: it fails for an operator, as
    /// when answered at once. A first step's RETAINED passes: the retention run follows it.
    #[tokio::test]
    async fn retained_past_its_date_at_a_retention_runs_confirmation_fails() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        let adapter = ReplayedBulk::default();
        let (connector, stop, server) = serve(&pki, adapter.clone()).await;
        let (reporter, _) = ProgressReporter::new();
        let job = erase_job(reporter);
        let confirm = |phase| {
            let job = BulkJob {
                phase,
                ..job.clone()
            };
            let connector = &connector;
            async move {
                let out = connector.run_bulk(&job).await.unwrap();
                let Outcome::Accepted { handle, .. } = out else {
                    panic!("{out:?}");
                };
                let confirm = BulkJob {
                    phase: Phase::Confirm { handle },
                    ..job
                };
                connector.run_bulk(&confirm).await
            }
        };

        let first = confirm(Phase::Start).await.unwrap();
        assert!(
            matches!(first, Outcome::Retained { until_ms, .. } if until_ms == PAST_MS),
            "{first:?}"
        );
        let err = confirm(Phase::RetentionExpired { until_ms: PAST_MS })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectorError::Permanent(m) if m.contains("after its retain-until")),
            "{err:?}"
        );
        assert_eq!(
            *adapter.0.lock().unwrap(),
            [
                "ce1/newsletter",
                "ce1/newsletter#retention-expired-1650000000000"
            ]
        );
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// An adapter scripted with one answer to every ExecuteBulk (and GetBulkStatus) and one
    /// page of export records, as a reviewer's adapter answering badly on purpose would be.
    #[derive(Clone)]
    struct ScriptedBulk {
        answer: ExecuteBulkResponse,
        records: Vec<Vec<u8>>,
    }

    #[tonic::async_trait]
    impl SubprocessorAdapter for ScriptedBulk {
        async fn describe(
            &self,
            _: Request<DescribeRequest>,
        ) -> Result<Response<DescribeResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn execute(
            &self,
            _: Request<ExecuteRequest>,
        ) -> Result<Response<ExecuteResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn get_task_status(
            &self,
            _: Request<GetTaskStatusRequest>,
        ) -> Result<Response<ExecuteResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn get_export_page(
            &self,
            _: Request<GetExportPageRequest>,
        ) -> Result<Response<ExportPage>, Status> {
            Ok(Response::new(ExportPage {
                records: self.records.clone(),
                next_page_token: String::new(),
            }))
        }

        async fn execute_bulk(
            &self,
            _: Request<ExecuteBulkRequest>,
        ) -> Result<Response<ExecuteBulkResponse>, Status> {
            Ok(Response::new(self.answer.clone()))
        }

        async fn get_bulk_status(
            &self,
            _: Request<GetBulkStatusRequest>,
        ) -> Result<Response<ExecuteBulkResponse>, Status> {
            Ok(Response::new(self.answer.clone()))
        }
    }

    fn counts(subjects: (u64, u64), records: (u64, u64)) -> Option<BulkJobProgress> {
        Some(BulkJobProgress {
            subjects_done: subjects.0,
            subjects_total: subjects.1,
            records_done: records.0,
            records_total: records.1,
            erased: Vec::new(),
        })
    }

    /// Runs `job` (Start, then Confirm for each listed handle) against `adapter`.
    async fn run_scripted(
        pki: &dsrelay_runtime::pki::DevPki,
        adapter: ScriptedBulk,
        job: &BulkJob,
    ) -> Result<Outcome, ConnectorError> {
        let (connector, stop, server) = serve(pki, adapter).await;
        let out = connector.run_bulk(job).await;
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        out
    }

    /// A contract end's export whose answer counts subjects as done but whose records never
    /// come (no export_paged, or an empty last page) fails for good, saying nothing was
    /// erased, and does not report the counts as returned: an erasure checked against them
    /// would pass and erase data nobody received.
    #[tokio::test]
    async fn an_export_returning_fewer_records_than_subjects_fails_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        let completed = |paged| ExecuteBulkResponse {
            outcome: ExecuteOutcome::Completed as i32,
            export_paged: paged,
            progress: counts((40, 40), (40, 40)),
            ..Default::default()
        };
        let export_job = |name: &str, progress| BulkJob {
            op: BulkOp::Export,
            export: Some(crate::ExportSink::new(
                dir.path().join(name),
                vec!["newsletter".into()],
            )),
            ..erase_job(progress)
        };
        for (name, paged, records) in [
            ("unpaged", false, Vec::new()),
            ("empty-page", true, Vec::new()),
            ("too-few", true, vec![b"{\"id\":1}".to_vec()]),
        ] {
            let (reporter, seen) = ProgressReporter::new();
            let adapter = ScriptedBulk {
                answer: completed(paged),
                records,
            };
            let err = run_scripted(&pki, adapter, &export_job(name, reporter))
                .await
                .unwrap_err();
            let written = if name == "too-few" { 1 } else { 0 };
            assert!(
                matches!(&err, ConnectorError::Permanent(m)
                    if m.contains("with 40 subject(s) done")
                        && m.contains(&format!(" {written} record(s)"))
                        && m.contains("nothing was erased")),
                "{name}: {err:?}"
            );
            assert_eq!(*seen.borrow(), BulkProgress::default(), "{name}");
        }

        // One record per subject at least (a subject's data may be several): done.
        let (reporter, seen) = ProgressReporter::new();
        let adapter = ScriptedBulk {
            answer: ExecuteBulkResponse {
                progress: counts((2, 2), (3, 3)),
                ..completed(true)
            },
            records: vec![
                b"{\"id\":1}".to_vec(),
                b"{\"id\":2}".to_vec(),
                b"[]".to_vec(),
            ],
        };
        let out = run_scripted(&pki, adapter, &export_job("enough", reporter))
            .await
            .unwrap();
        let Outcome::Completed {
            records_affected: 3,
            files,
            ..
        } = out
        else {
            panic!("{out:?}");
        };
        assert_eq!(files.len(), 1);
        assert_eq!(seen.borrow().subjects_done, 2);
        // Nothing counted, nothing held: an empty export is right.
        let (reporter, _) = ProgressReporter::new();
        let adapter = ScriptedBulk {
            answer: ExecuteBulkResponse {
                progress: counts((0, 0), (0, 0)),
                ..completed(false)
            },
            records: Vec::new(),
        };
        let out = run_scripted(&pki, adapter, &export_job("none", reporter))
            .await
            .unwrap();
        assert!(matches!(out, Outcome::Completed { .. }), "{out:?}");
    }

    /// An erasure answered COMPLETED with its own progress unfinished is not done, nor
    /// certified; a negative count of what was erased is a malformed answer.
    #[tokio::test]
    async fn an_unfinished_or_negative_erasure_fails_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        let erased = |count| BulkErasedCount {
            target: "subscribers".into(),
            action: "deleted".into(),
            count,
        };
        let completed = ExecuteBulkResponse {
            outcome: ExecuteOutcome::Completed as i32,
            erased: vec![erased(5)],
            progress: counts((5, 50), (7, 70)),
            ..Default::default()
        };
        let (reporter, seen) = ProgressReporter::new();
        let adapter = ScriptedBulk {
            answer: completed.clone(),
            records: Vec::new(),
        };
        let err = run_scripted(&pki, adapter, &erase_job(reporter))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectorError::Permanent(m)
                if m.contains("progress unfinished (subjects 5 of 50, records 7 of 70)")),
            "{err:?}"
        );
        // What it did do is still recorded.
        assert_eq!(seen.borrow().subjects_done, 5);

        let mut negative = ExecuteBulkResponse {
            erased: vec![erased(-213)],
            progress: counts((213, 213), (213, 213)),
            ..completed.clone()
        };
        for in_progress in [false, true] {
            if in_progress {
                negative.erased = vec![erased(213)];
                negative.progress.as_mut().unwrap().erased = vec![erased(-1)];
            }
            let (reporter, _) = ProgressReporter::new();
            let adapter = ScriptedBulk {
                answer: negative.clone(),
                records: Vec::new(),
            };
            let err = run_scripted(&pki, adapter, &erase_job(reporter))
                .await
                .unwrap_err();
            assert!(
                matches!(&err, ConnectorError::Permanent(m)
                    if m.contains("negative count") && m.contains("\"subscribers\"")),
                "{in_progress}: {err:?}"
            );
        }
    }

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
                erased: Vec::new(),
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
        // Totals of 0: the adapter cannot count them, and its done counts stand.
        let uncounted = ExecuteBulkResponse {
            outcome: ExecuteOutcome::Completed as i32,
            progress: counts((5, 0), (7, 0)),
            ..Default::default()
        };
        assert!(matches!(
            bulk_outcome("j", uncounted).unwrap(),
            Outcome::Completed {
                records_affected: 7,
                ..
            }
        ));
        // Only a COMPLETED step must be finished.
        let running = ExecuteBulkResponse {
            outcome: ExecuteOutcome::Accepted as i32,
            progress: counts((5, 50), (7, 70)),
            ..Default::default()
        };
        assert!(bulk_outcome("j", running).is_ok());
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
        let e = bulk_outcome("j", retained.clone()).unwrap_err();
        assert!(e.to_string().contains("retain_until"), "{e}");
        // A date outside the years 2000 to 9999 would wake the step never, or at once.
        for ms in [1_000, 253_402_300_800_000] {
            let r = ExecuteBulkResponse {
                retain_until: Some(timestamp_from_millis(ms)),
                ..retained.clone()
            };
            let e = bulk_outcome("j", r).unwrap_err();
            assert!(
                e.to_string().contains("between the years 2000 and 9999"),
                "{e}"
            );
        }
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
