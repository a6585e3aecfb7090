//! Asks processors for status when a request has been quiet too long, so a lost
//! acknowledgement (or a processor outbox that is stuck) cannot leave a request hanging. A
//! request whose checks at all its processors find nothing new backs off
//! (`reconcile.max_backoff_ms`), so requests that wait for months cost a call a day, not one
//! every `ack_timeout_ms`. A check that gets no answer (or is skipped) puts its request
//! behind the other quiet ones, not backed off by its other processors' answers, and when
//! the processor is down or too slow (UNAVAILABLE, DEADLINE_EXCEEDED) the round skips the
//! rest of its requests, so requests that cannot be checked never keep the others from
//! being checked. Why the last check at a processor failed, which the log line withholds, is
//! kept for GetChain until one there is answered.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::{GetStatusRequest, ListSubprocessorsRequest};
use dsrelay_runtime::log_text::Said;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::app::Shared;
use crate::store::ChainReport;

/// Asks every processor for its subprocessor list and stores the answers, so the controller
/// sees its whole chain. Asks at start and then every `chain_interval_ms` after an answer;
/// a processor whose ask failed is asked again after `delivery.backoff` (growing with each
/// failure in a row, capped at `chain_interval_ms`), so a processor that was down shows its
/// chain soon after it is back. Runs until `stop`.
pub(crate) async fn refresh_chain(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let interval = Duration::from_millis(shared.config.reconcile.chain_interval_ms);
    let backoff = shared.config.delivery.backoff;
    // Per processor: when it is asked next, and how many asks in a row have failed.
    let mut due: HashMap<&str, (Instant, u32)> = shared
        .processors
        .keys()
        .map(|name| (name.as_str(), (Instant::now(), 0)))
        .collect();
    loop {
        for (name, client) in &shared.processors {
            let Some((at, failures)) = due.get_mut(name.as_str()) else {
                continue;
            };
            if *at > Instant::now() {
                continue;
            }
            let mut req = tonic::Request::new(ListSubprocessorsRequest {});
            req.set_timeout(Duration::from_millis(
                shared.config.delivery.call_timeout_ms,
            ));
            let mut client = client.clone();
            let answer = tokio::select! {
                a = client.list_subprocessors(req) => a,
                () = stopped(&mut stop) => return,
            };
            let (report, wait) = match answer {
                Ok(r) => {
                    *failures = 0;
                    (
                        ChainReport::Listed(r.into_inner().encode_to_vec()),
                        interval,
                    )
                }
                Err(s) => {
                    *failures = failures.saturating_add(1);
                    let wait = backoff.delay(*failures).min(interval);
                    let said = Said::status(&s);
                    tracing::warn!(
                        processor = %name,
                        error = %said.logged(&shared.identity_hash_key),
                        retry_in_ms = wait.as_millis() as u64,
                        "asking for subprocessors failed; `dsrctl chain` shows its answer"
                    );
                    (ChainReport::Unanswered(said.full()), wait)
                }
            };
            *at = Instant::now() + wait;
            if let Err(e) = shared
                .store
                .record_chain(name, report, shared.clock.now_ms())
                .await
            {
                tracing::error!(error = format!("{e:#}"), "recording subprocessors failed");
            }
        }
        let next = due
            .values()
            .map(|(at, _)| *at)
            .min()
            .unwrap_or_else(|| Instant::now() + interval);
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

/// Runs until `stop` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let cfg = shared.config.reconcile.clone();
    // The processors whose last status check may have left its failure in the store: an
    // answer from one of them clears it, once. At the start, all of them, since a check
    // before a restart may have failed.
    let mut failing: BTreeSet<String> = shared.processors.keys().cloned().collect();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(cfg.interval_ms)) => {}
        }
        let now = shared.clock.now_ms();
        let quiet = match shared
            .store
            .quiet_requests(now - cfg.ack_timeout_ms as i64, 100)
            .await
        {
            Ok(q) => q,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "finding quiet requests failed");
                continue;
            }
        };
        // Processors down or too slow this round: their other requests wait for the next
        // round instead of a timeout each.
        let mut unanswered: BTreeSet<String> = BTreeSet::new();
        for (request_id, processors) in by_request(quiet) {
            // Whether every check of this request so far in the round answered with nothing
            // new: only then may its last check back it off.
            let mut all_quiet = true;
            // Whether a check of it got no answer or was skipped.
            let mut postponed = false;
            let last = processors.len().saturating_sub(1);
            for (i, processor) in processors.into_iter().enumerate() {
                let client = match shared.processors.get(&processor) {
                    Some(client) if !unanswered.contains(&processor) => client,
                    _ => {
                        (all_quiet, postponed) = (false, true);
                        continue;
                    }
                };
                let mut req = tonic::Request::new(GetStatusRequest {
                    request_id: request_id.clone(),
                });
                req.set_timeout(Duration::from_millis(
                    shared.config.delivery.call_timeout_ms,
                ));
                // A processor slow to answer does not hold the registry's shutdown; the
                // question is asked again after the restart.
                let mut client = client.clone();
                let answer = tokio::select! {
                    a = client.get_status(req) => a,
                    () = stopped(&mut stop) => return,
                };
                match answer {
                    Ok(resp) => {
                        if failing.contains(&processor)
                            && record_status_check(&shared, &processor, None).await
                        {
                            failing.remove(&processor);
                        }
                        let tasks = crate::api::acknowledgement::well_formed_reports(
                            &processor,
                            &request_id,
                            resp.into_inner().tasks,
                        );
                        // Backing off pushes back every check of the request (`checked_at`
                        // is kept per request), so it waits for the last of them; 0 counts
                        // this one as made now.
                        let max_backoff_ms = if i == last && all_quiet {
                            cfg.max_backoff_ms as i64
                        } else {
                            0
                        };
                        match shared
                            .store
                            .reconcile(
                                &request_id,
                                &processor,
                                &tasks,
                                shared.clock.now_ms(),
                                max_backoff_ms,
                            )
                            .await
                        {
                            Ok(changed) => {
                                if changed > 0 {
                                    all_quiet = false;
                                    tracing::info!(%request_id, %processor, changed, "reconciled late acknowledgements");
                                    shared.publish(&request_id);
                                }
                            }
                            Err(e) => {
                                all_quiet = false;
                                tracing::error!(%request_id, error = format!("{e:#}"), "reconciling failed")
                            }
                        }
                    }
                    Err(status) => {
                        shared.metrics.status_check_failures.inc(&[&processor]);
                        let said = Said::status(&status);
                        tracing::warn!(
                            %request_id,
                            %processor,
                            error = %said.logged(&shared.identity_hash_key),
                            "status check failed; `dsrctl chain` shows its answer"
                        );
                        let error = format!("request {request_id}: {}", said.full());
                        record_status_check(&shared, &processor, Some(&error)).await;
                        failing.insert(processor.clone());
                        // Down or too slow, not an answer about this request alone.
                        if matches!(
                            status.code(),
                            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                        ) {
                            unanswered.insert(processor);
                        }
                        (all_quiet, postponed) = (false, true);
                    }
                }
            }
            if postponed {
                postpone(&shared, &request_id).await;
            }
        }
    }
}

/// The rows of `quiet` (request, processor) gathered by request, in the order each request
/// first comes: every check of a request must be known before it is backed off.
fn by_request(quiet: Vec<(String, String)>) -> Vec<(String, Vec<String>)> {
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut grouped: Vec<(String, Vec<String>)> = Vec::new();
    for (request_id, processor) in quiet {
        match at.get(&request_id).and_then(|&k| grouped.get_mut(k)) {
            Some((_, processors)) => processors.push(processor),
            None => {
                at.insert(request_id.clone(), grouped.len());
                grouped.push((request_id, vec![processor]));
            }
        }
    }
    grouped
}

/// Keeps why a status check at `processor` failed (`error`), or clears it with `None`, for
/// GetChain; whether that was written (a store failure is logged).
async fn record_status_check(shared: &Shared, processor: &str, error: Option<&str>) -> bool {
    let now = shared.clock.now_ms();
    match shared
        .store
        .record_status_check(processor, error, now)
        .await
    {
        Ok(()) => true,
        Err(e) => {
            let error = format!("{e:#}");
            tracing::error!(%processor, error, "recording a status check failed");
            false
        }
    }
}

/// Puts `request_id` behind the other quiet requests after a status check of it that got
/// no answer or was skipped this round; a store failure is logged (the request is then asked
/// about first again).
async fn postpone(shared: &Shared, request_id: &str) {
    if let Err(e) = shared
        .store
        .status_check_unanswered(request_id, shared.clock.now_ms())
        .await
    {
        tracing::error!(%request_id, error = format!("{e:#}"), "postponing a status check failed");
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
#[path = "reconcile_round_tests.rs"]
mod round_tests;

#[cfg(test)]
mod tests {
    //! Through the real registry (its server over mutual TLS with the development PKI's
    //! certificates, its store on SQLite) and a processor stand-in served here with the
    //! processor's certificate.

    use std::sync::atomic::{AtomicBool, Ordering};

    use dsrelay_proto::v1::processor_service_server::ProcessorService;
    use dsrelay_proto::v1::request_service_client::RequestServiceClient;
    use dsrelay_proto::v1::{
        CancelDeliveryRequest, Chain, DeliverRequest, DeliverResponse, ExtendDueDateRequest,
        GetChainRequest, IdentityEncoding, IdentityType, RequestKind, SubjectIdentity,
        SubmitRequest, Subprocessor, SubprocessorList, TaskList, TaskState, TaskStatus,
        UpdateContractEndRequest,
    };
    use tonic::transport::Channel;
    use tonic::{Request, Response, Status};

    use super::*;
    use crate::test_registry::{self, Setup, PROCESSOR};

    /// A processor that accepts deliveries, fails GetStatus (UNAVAILABLE) until
    /// `status_up`, and fails ListSubprocessors until `up`.
    #[derive(Clone, Default)]
    struct StandIn {
        up: Arc<AtomicBool>,
        status_up: Arc<AtomicBool>,
    }

    #[tonic::async_trait]
    impl ProcessorService for StandIn {
        async fn deliver(
            &self,
            _req: Request<DeliverRequest>,
        ) -> Result<Response<DeliverResponse>, Status> {
            Ok(Response::new(DeliverResponse {
                tasks: vec![TaskStatus {
                    processor: PROCESSOR.into(),
                    subprocessor: "accounting".into(),
                    state: TaskState::Pending as i32,
                    sequence: 1,
                    ..Default::default()
                }],
                duplicate: false,
            }))
        }

        async fn cancel(
            &self,
            _req: Request<CancelDeliveryRequest>,
        ) -> Result<Response<TaskList>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn get_status(
            &self,
            _req: Request<GetStatusRequest>,
        ) -> Result<Response<TaskList>, Status> {
            if !self.status_up.load(Ordering::SeqCst) {
                return Err(Status::unavailable("status store offline at 10.0.3.7"));
            }
            Ok(Response::new(TaskList::default()))
        }

        async fn list_subprocessors(
            &self,
            _req: Request<ListSubprocessorsRequest>,
        ) -> Result<Response<SubprocessorList>, Status> {
            if !self.up.load(Ordering::SeqCst) {
                return Err(Status::unavailable("restarting"));
            }
            Ok(Response::new(SubprocessorList {
                subprocessors: vec![Subprocessor {
                    name: "accounting".into(),
                    country: "FI".into(),
                    ..Default::default()
                }],
            }))
        }

        async fn update_contract_end(
            &self,
            _req: Request<UpdateContractEndRequest>,
        ) -> Result<Response<TaskList>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn extend_due_date(
            &self,
            _req: Request<ExtendDueDateRequest>,
        ) -> Result<Response<TaskList>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// A running registry whose one processor is a [`StandIn`], with its admin port.
    struct Registry {
        served: test_registry::Registry,
        processor: StandIn,
        _dir: tempfile::TempDir,
    }

    impl Registry {
        /// `reconcile` is the TOML of its `[reconcile]` table. A failed call is retried
        /// after 20 to 100 ms (`delivery.backoff`).
        async fn start(reconcile: &str) -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let url = format!("sqlite://{}/registry.db", dir.path().display());
            Self::start_on(&url, dir, reconcile).await
        }

        /// [`Self::start`] on the database at `url`, its files in `dir`.
        async fn start_on(url: &str, dir: tempfile::TempDir, reconcile: &str) -> Self {
            let processor = StandIn::default();
            let setup = Setup {
                tables: format!(
                    "[delivery]\npoll_interval_ms = 20\n\
                     backoff = {{ initial_ms = 20, max_ms = 100 }}\n\
                     [reconcile]\n{reconcile}\n"
                ),
                admin: true,
                ..Setup::default()
            }
            .answered_by(processor.clone());
            let served = test_registry::Registry::start(dir.path(), url, setup).await;
            Self {
                served,
                processor,
                _dir: dir,
            }
        }

        /// A client of the registry with the certificate of the PKI's party `stem`.
        fn requests(&self, stem: &str) -> RequestServiceClient<Channel> {
            RequestServiceClient::new(self.served.channel(stem))
        }

        async fn chain(&self) -> Chain {
            self.requests("operator")
                .get_chain(GetChainRequest {})
                .await
                .expect("chain")
                .into_inner()
        }

        async fn scrape(&self) -> String {
            self.served.scrape().await
        }

        async fn stop(self) {
            self.served.stop().await;
        }
    }

    /// Waits up to 20 s for `check` to hold.
    async fn eventually<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check().await {
            assert!(Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A processor down when the registry starts and back soon after: its chain shows within
    /// the failed check's backoff, not `chain_interval_ms` (10 minutes) later. Before, a
    /// failed check was tried again only at the next interval.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_chain_check_is_tried_again_before_the_interval() {
        let registry = Registry::start("chain_interval_ms = 600000").await;
        eventually("the failed check recorded", || async {
            registry.chain().await.processors[0].last_error == "Unavailable: restarting"
        })
        .await;
        registry.processor.up.store(true, Ordering::SeqCst);
        eventually("the chain reported", || async {
            let chain = registry.chain().await;
            let p = &chain.processors[0];
            p.last_error.is_empty()
                && p.subprocessors.len() == 1
                && p.subprocessors[0].name == "accounting"
        })
        .await;
        registry.stop().await;
    }

    /// The reconciler's failed GetStatus calls count in
    /// `dsrelay_status_check_failures_total`, which starts at 0. Before, they were only
    /// logged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_status_checks_are_counted() {
        let registry =
            Registry::start("interval_ms = 20\nack_timeout_ms = 1\nmax_backoff_ms = 0").await;
        let series = format!("dsrelay_status_check_failures_total{{processor=\"{PROCESSOR}\"}}");
        let count = |text: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .and_then(|v| v.trim().parse().ok())
        };
        let before = registry.scrape().await;
        assert!(count(&before).is_some(), "{before}");
        registry
            .requests("partner-crm")
            .submit(SubmitRequest {
                kind: RequestKind::Erasure as i32,
                identities: vec![SubjectIdentity {
                    r#type: IdentityType::Email as i32,
                    encoding: IdentityEncoding::Raw as i32,
                    value: "status.check@example.com".into(),
                    label: String::new(),
                }],
                idempotency_key: "status-check".into(),
                ..Default::default()
            })
            .await
            .expect("submit");
        eventually("a failed status check counted", || async {
            count(&registry.scrape().await).is_some_and(|n| n > 0)
        })
        .await;
        registry.stop().await;
    }
    /// A failed status check's whole answer is kept for operators in GetChain (the log line
    /// withholds it and says so), with the request it was about; partners see none of it,
    /// and an answer clears it. Before, the text was not kept anywhere.
    async fn a_failed_status_check_shows_in_the_chain(url: &str, dir: tempfile::TempDir) {
        let logs = dsrelay_runtime::testing::captured_logs();
        let registry = Registry::start_on(
            url,
            dir,
            "interval_ms = 20\nack_timeout_ms = 1\nmax_backoff_ms = 0",
        )
        .await;
        let id = registry
            .requests("partner-crm")
            .submit(SubmitRequest {
                kind: RequestKind::Erasure as i32,
                identities: vec![SubjectIdentity {
                    r#type: IdentityType::Email as i32,
                    encoding: IdentityEncoding::Raw as i32,
                    value: "status.check@example.com".into(),
                    label: String::new(),
                }],
                idempotency_key: "status-check".into(),
                ..Default::default()
            })
            .await
            .expect("submit")
            .into_inner()
            .request_id;
        let expected = format!("request {id}: Unavailable: status store offline at 10.0.3.7");
        eventually("the failed status check shown", || async {
            registry.chain().await.processors[0].status_check_error == expected
        })
        .await;
        let chain = registry.chain().await;
        assert!(chain.processors[0].status_check_failed_at.is_some());
        let partner = registry
            .requests("partner-crm")
            .get_chain(GetChainRequest {})
            .await
            .expect("chain")
            .into_inner();
        assert!(partner.processors[0].status_check_error.is_empty());
        assert!(partner.processors[0].status_check_failed_at.is_none());
        let said_where = logs.text().lines().any(|l| {
            l.contains("status check failed; `dsrctl chain` shows its answer")
                && !l.contains("status store offline")
        });
        assert!(said_where, "{}", logs.text());
        registry.processor.status_up.store(true, Ordering::SeqCst);
        eventually("the answer clears it", || async {
            let chain = registry.chain().await;
            let p = &chain.processors[0];
            p.status_check_error.is_empty() && p.status_check_failed_at.is_none()
        })
        .await;
        registry.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_status_check_shows_in_the_chain_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_failed_status_check_shows_in_the_chain(&url, dir).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_status_check_shows_in_the_chain_on_postgres() {
        crate::test_postgres::on_postgres(|url, dir| async move {
            let dir = tempfile::tempdir_in(&dir).expect("tempdir");
            a_failed_status_check_shows_in_the_chain(&url, dir).await;
        })
        .await;
    }
}
