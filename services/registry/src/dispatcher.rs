//! Delivers the outbox: each due row is sent to its processor (Deliver, Cancel, a contract
//! end's UpdateContractEnd with its terms as they stand, or ExtendDueDate with the request's
//! due date as it stands) until the processor durably accepts it, with exponential backoff
//! and jitter between attempts. A row the processor refuses with an answer retrying cannot
//! change ([`is_refusal`]) is dead-lettered after `delivery.max_refusals` refusals: no longer
//! sent, shown in Get and the request's events, counted in
//! `dsrelay_deliveries_dead_lettered_total`, until an operator requeues it
//! (`RequestService.RequeueDelivery`, which also wakes this loop).
//!
//! Acceptances are written by one recorder ([`Recorder`]): a call that ends while others are
//! being written waits with the rest of the queue, and the next transaction records them all,
//! so concurrent calls share one commit. A call's slot frees once its acceptance is queued,
//! so the next claim and calls overlap that write; the row's lease keeps it from being
//! claimed again until the write lands.
//!
//! With `delivery.yield_to_intake_ms` set (off by default), while Submits queue for the
//! intake writer the dispatcher claims at most once per that interval
//! ([`Pressure`](crate::intake::Pressure)): a burst is accepted first and delivered as it
//! ends.
//!
//! Each claim leases its row under a random token on the database's clock
//! ([`Store::claim_deliveries`](crate::store::Store::claim_deliveries)); the outcome of an
//! attempt is recorded only while that claim still holds the row, so a dispatcher paused past
//! its lease records nothing over the replica that took the row since.
//!
//! When the registry stops (its [`Stop`](dsrelay_runtime::host::Stop) turns true) no row is
//! claimed any more; calls in flight get `shutdown_grace_ms` to finish and be recorded. A call
//! still waiting for its processor then is dropped and its lease released on the spot
//! ([`Store::release_delivery`](crate::store::Store::release_delivery)), so another replica
//! sends the row at once instead of waiting `delivery.lease_ms`; the processor deduplicates
//! the second Deliver.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsrelay_proto::v1::TaskStatus;
use dsrelay_proto::v1::{
    CancelDeliveryRequest, DeliverRequest, ExtendDueDateRequest, RequestKind, SubmitRequest,
    TransferRecipient, UpdateContractEndRequest,
};
use dsrelay_proto::{prost::Message, timestamp_from_millis};
use dsrelay_runtime::log_text::Said;
use dsrelay_runtime::trace_context;
use dsrelay_runtime::worker::{run_pool_gated, PoolSettings};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::app::Shared;
use crate::store::{DeliveryJob, FailureRecorded, Operation};

/// What the dispatcher did once shutdown began, for the log line it ends with.
#[derive(Default)]
struct Stopping {
    /// Attempts that ended (their outcome recorded or queued for the recorder, or their lease
    /// found lost) after the stop.
    finished: AtomicUsize,
    /// Leases given up by calls dropped at the end of the grace.
    released: AtomicUsize,
}

/// Runs until `stop` turns true, then lets the calls in flight finish within the grace,
/// drops and releases the rest, and logs what it finished, released and left queued.
pub(crate) async fn run(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let grace = Duration::from_millis(shared.config.service.shutdown_grace_ms);
    let (abandon_tx, abandon) = watch::channel(false);
    let deadline = {
        let mut stop = stop.clone();
        tokio::spawn(async move {
            if stop.wait_for(|s| *s).await.is_ok() {
                tokio::time::sleep(grace).await;
                abandon_tx.send_replace(true);
            }
        })
    };
    let tally = Arc::new(Stopping::default());
    let (recorder, recording) = Recorder::start(shared.clone());
    pool(
        shared.clone(),
        stop.clone(),
        grace,
        abandon,
        tally.clone(),
        recorder,
    )
    .await;
    // Every call has ended and handed its acceptance over: the recorder writes what is
    // queued and stops.
    let _ = recording.await;
    deadline.abort();
    if *stop.borrow() {
        let left = shared
            .store
            .unsent_delivery_count()
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "counting queued deliveries failed"
                );
                -1
            });
        tracing::info!(
            finished = tally.finished.load(Ordering::SeqCst),
            released = tally.released.load(Ordering::SeqCst),
            left_queued = left,
            "dispatcher stopped"
        );
    }
}

/// The claim-and-send loop.
async fn pool(
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    grace: Duration,
    abandon: watch::Receiver<bool>,
    tally: Arc<Stopping>,
    recorder: Recorder,
) {
    let cfg = shared.config.delivery.clone();
    let stopping = stop.clone();
    let settings = PoolSettings {
        concurrency: cfg.concurrency,
        batch: cfg.batch_size as usize,
        poll: Duration::from_millis(cfg.poll_interval_ms),
    };
    let claimer = shared.clone();
    let runner = shared.clone();
    let gatekeeper = shared.clone();
    let give_way_stop = stopping.clone();
    let give_way = Duration::from_millis(cfg.yield_to_intake_ms);
    run_pool_gated(
        settings,
        &shared.dispatch_wakeup,
        stop,
        // Dropped calls release their leases within the margin after the grace.
        grace + dsrelay_runtime::host::SHUTDOWN_MARGIN / 2,
        move || {
            let shared = gatekeeper.clone();
            let stop = give_way_stop.clone();
            async move {
                while let Some(pause) = shared.intake.pressure.defer_claim(give_way) {
                    if *stop.borrow() {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        },
        move |n| {
            let shared = claimer.clone();
            async move {
                shared
                    .store
                    .claim_deliveries(shared.clock.now_ms(), n as i64, cfg.lease_ms as i64)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = format!("{e:#}"), "claiming deliveries failed");
                        Vec::new()
                    })
            }
        },
        move |job| {
            let shared = runner.clone();
            let recorder = recorder.clone();
            let (stopping, abandon, tally) = (stopping.clone(), abandon.clone(), tally.clone());
            // Each attempt is a span of the request's trace, a child of its intake.
            let span = tracing::info_span!(
                "deliver",
                request_id = %job.request_id,
                processor = %job.processor,
                op = %job.op,
                attempt = job.attempts + 1,
                trace_id = %job.trace_id,
            );
            if let Some(tp) = &job.traceparent {
                trace_context::set_parent(&span, trace_context::from_traceparent(tp));
            }
            async move {
                let outcome = attempt(&shared, &recorder, job, abandon).await;
                let stopped = *stopping.borrow();
                match outcome {
                    Attempt::Ended if stopped => {
                        tally.finished.fetch_add(1, Ordering::SeqCst);
                    }
                    Attempt::Released => {
                        tally.released.fetch_add(1, Ordering::SeqCst);
                    }
                    Attempt::Ended | Attempt::Dropped => {}
                }
            }
            .instrument(span)
        },
    )
    .await;
}

/// Puts the attempt's trace context in the call; without a tracer, a `traceparent` naming the
/// request's trace id still tells the processor which trace the request belongs to.
fn propagate(metadata: &mut tonic::metadata::MetadataMap, trace_id: &str) {
    if trace_context::inject_current(metadata) {
        return;
    }
    let span = format!("{:016x}", fastrand::u64(1..));
    if let Ok(v) = format!("00-{trace_id}-{span}-01").parse() {
        metadata.insert("traceparent", v);
    }
}

/// How an attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// The processor answered (or could not be called) and that was recorded, or found the
    /// lease lost.
    Ended,
    /// The shutdown grace ended during the call: it was dropped and its lease released.
    Released,
    /// As `Released`, but the lease could not be released (already lost, or the store
    /// failed): it runs out instead.
    Dropped,
}

/// One attempt: the call, raced against the end of the shutdown grace, then its outcome.
async fn attempt(
    shared: &Shared,
    recorder: &Recorder,
    job: DeliveryJob,
    abandon: watch::Receiver<bool>,
) -> Attempt {
    let call = tokio::select! {
        result = call(shared, &job) => result,
        () = abandoned(abandon) => return release(shared, &job).await,
    };
    match call {
        Call::Answered(Ok(tasks)) => {
            tracing::info!(tasks = tasks.len(), "processor accepted");
            // The call's slot frees once the acceptance is queued, not once it is written:
            // the claim's lease keeps the row from being claimed again meanwhile, and the
            // next claim and calls overlap this write instead of waiting for it.
            recorder.queue(shared, job, tasks).await;
        }
        Call::Answered(Err(status)) => {
            let said = Said::status(&status);
            record_failure(shared, &job, &said, is_refusal(status.code())).await;
        }
        Call::NotMade { error, refused } => {
            record_failure(shared, &job, &Said::ours(error), refused).await
        }
    }
    Attempt::Ended
}

/// The processors' acceptances of concurrent calls, written together: a call that ends while
/// others are being written queues its own, and the next write takes every one queued
/// ([`Store::deliveries_succeeded`](crate::store::Store::deliveries_succeeded), one
/// transaction). A call hands its acceptance over and ends; the writer logs each outcome
/// under the call's span and wakes the request's watchers once it is committed. The queue
/// holds at most [`QUEUED_ACCEPTANCES`]: a call that finds it full waits for room, so claims
/// never run further ahead of the writes than that.
#[derive(Clone)]
struct Recorder(mpsc::Sender<Accepted>);

/// An accepted call's job, the tasks its processor reported, and the call's span.
type Accepted = (DeliveryJob, Vec<TaskStatus>, tracing::Span);

/// At most this many acceptances per transaction.
const ACCEPTED_PER_WRITE: usize = 64;

/// At most this many acceptances waiting for the writer.
const QUEUED_ACCEPTANCES: usize = 2 * ACCEPTED_PER_WRITE;

impl Recorder {
    /// The recorder and its writer, which ends once every `Recorder` is dropped and what was
    /// queued is written.
    fn start(shared: Arc<Shared>) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUED_ACCEPTANCES);
        (Self(tx), tokio::spawn(write_accepted(shared, rx)))
    }

    /// Queues `job` as accepted with `tasks`, to be recorded by the writer.
    async fn queue(&self, shared: &Shared, job: DeliveryJob, tasks: Vec<TaskStatus>) {
        if let Err(mpsc::error::SendError((job, tasks, span))) =
            self.0.send((job, tasks, tracing::Span::current())).await
        {
            // The writer is gone (it never is while calls run): write this one alone.
            let held = shared
                .store
                .delivery_succeeded(&job, &tasks, shared.clock.now_ms())
                .await;
            recorded(shared, &job, held, &span);
        }
    }
}

/// Logs what recording an acceptance came to, under the call's span, and wakes the
/// request's watchers.
fn recorded(shared: &Shared, job: &DeliveryJob, held: anyhow::Result<bool>, span: &tracing::Span) {
    span.in_scope(|| match held {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "lease lost to another claim; the processor's acceptance is not recorded"
        ),
        // The lease expires and the row is sent again; the processor deduplicates.
        Err(e) => tracing::error!(error = format!("{e:#}"), "recording a delivery failed"),
    });
    shared.publish(&job.request_id);
}

/// The recorder's writer: each write takes every acceptance queued (up to
/// [`ACCEPTED_PER_WRITE`]). When a write of several fails, each is written again alone, so
/// that one row's failure leaves the others recorded.
async fn write_accepted(shared: Arc<Shared>, mut queued: mpsc::Receiver<Accepted>) {
    let mut batch = Vec::with_capacity(ACCEPTED_PER_WRITE);
    while queued.recv_many(&mut batch, ACCEPTED_PER_WRITE).await > 0 {
        let now = shared.clock.now_ms();
        let done: Vec<(&DeliveryJob, &[TaskStatus])> = batch
            .iter()
            .map(|(job, tasks, _)| (job, tasks.as_slice()))
            .collect();
        let written = shared.store.deliveries_succeeded(&done, now).await;
        drop(done);
        match written {
            Ok(held) => {
                for ((job, _, span), held) in batch.drain(..).zip(held) {
                    recorded(&shared, &job, Ok(held), &span);
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some((job, _, span)) = batch.pop() {
                    recorded(&shared, &job, Err(e), &span);
                }
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    accepted = batch.len(),
                    "recording accepted deliveries together failed; recording each alone"
                );
                for (job, tasks, span) in batch.drain(..) {
                    let one = shared.store.delivery_succeeded(&job, &tasks, now).await;
                    recorded(&shared, &job, one, &span);
                }
            }
        }
    }
}

/// Resolves when the shutdown grace is over.
async fn abandoned(mut abandon: watch::Receiver<bool>) {
    if abandon.wait_for(|a| *a).await.is_err() {
        // The grace's timer is gone without ending the grace: it never ends.
        std::future::pending::<()>().await;
    }
}

/// A call dropped at the end of the shutdown grace gives its lease up, so that another
/// replica sends the row at once; nothing is recorded for it.
async fn release(shared: &Shared, job: &DeliveryJob) -> Attempt {
    match shared.store.release_delivery(job).await {
        Ok(true) => {
            tracing::warn!("shutting down: call dropped and its lease released");
            Attempt::Released
        }
        Ok(false) => {
            tracing::warn!("shutting down: call dropped; its lease was already lost");
            Attempt::Dropped
        }
        Err(e) => {
            tracing::warn!(
                error = format!("{e:#}"),
                "shutting down: call dropped; releasing its lease failed, it runs out instead"
            );
            Attempt::Dropped
        }
    }
}

/// What calling the processor came to.
enum Call {
    /// The processor's answer: the tasks it reported, or its status.
    Answered(Result<Vec<dsrelay_proto::v1::TaskStatus>, tonic::Status>),
    /// No call could be made; `refused`: retrying cannot help.
    NotMade { error: &'static str, refused: bool },
}

async fn call(shared: &Shared, job: &DeliveryJob) -> Call {
    shared.metrics.delivery_attempts.inc(&[&job.processor]);
    let cfg = &shared.config.delivery;
    let Some(client) = shared.processors.get(&job.processor) else {
        // The processor was removed from the configuration; keep the row for an operator.
        return Call::NotMade {
            error: "processor is no longer configured",
            refused: false,
        };
    };
    let mut client = client.clone();
    let timeout = Duration::from_millis(cfg.call_timeout_ms);
    let result = match job.op {
        Operation::Deliver => {
            let body = job
                .body
                .as_deref()
                .and_then(|b| SubmitRequest::decode(b).ok())
                .unwrap_or_default();
            let mut req =
                tonic::Request::new(deliver_request(job, body, |name| recipient(shared, name)));
            req.set_timeout(timeout);
            propagate(req.metadata_mut(), &job.trace_id);
            client.deliver(req).await.map(|r| r.into_inner().tasks)
        }
        Operation::Cancel => {
            let mut req = tonic::Request::new(CancelDeliveryRequest {
                request_id: job.request_id.clone(),
                reason: job.cancel_reason.clone().unwrap_or_default(),
            });
            req.set_timeout(timeout);
            propagate(req.metadata_mut(), &job.trace_id);
            client.cancel(req).await.map(|r| r.into_inner().tasks)
        }
        Operation::Extend => {
            let mut req = tonic::Request::new(ExtendDueDateRequest {
                request_id: job.request_id.clone(),
                due_at: Some(timestamp_from_millis(job.due_at)),
            });
            req.set_timeout(timeout);
            propagate(req.metadata_mut(), &job.trace_id);
            client
                .extend_due_date(req)
                .await
                .map(|r| r.into_inner().tasks)
        }
        Operation::Update => {
            let Some(terms) = job.terms.contract_end() else {
                return Call::NotMade {
                    error: "the request is not a contract end",
                    refused: true,
                };
            };
            let recipient = contract_recipient(&terms, |name| recipient(shared, name));
            let mut req = tonic::Request::new(UpdateContractEndRequest {
                request_id: job.request_id.clone(),
                contract_end: Some(terms),
                recipient,
            });
            req.set_timeout(timeout);
            propagate(req.metadata_mut(), &job.trace_id);
            client
                .update_contract_end(req)
                .await
                .map(|r| r.into_inner().tasks)
        }
    };
    Call::Answered(result.map(|tasks| {
        crate::api::acknowledgement::well_formed_reports(&job.processor, &job.request_id, tasks)
    }))
}

/// The Deliver of `job`'s request: a TRANSFER carries its recipient as `recipient` finds it
/// configured now, so the processor knows where the data goes and whom to expect there; a
/// CONTRACT_END carries its terms as the `contracts` table holds them (never the body's,
/// which forgetting removes and which a later choice makes stale), and no identities.
fn deliver_request(
    job: &DeliveryJob,
    body: SubmitRequest,
    recipient: impl Fn(&str) -> Option<TransferRecipient>,
) -> DeliverRequest {
    if job.kind == RequestKind::ContractEnd as i64 {
        let terms = job.terms.contract_end();
        let recipient = terms
            .as_ref()
            .and_then(|t| contract_recipient(t, &recipient));
        return DeliverRequest {
            request_id: job.request_id.clone(),
            kind: RequestKind::ContractEnd as i32,
            identities: Vec::new(),
            scope: None,
            parameters: Some(dsrelay_proto::v1::RequestParameters {
                contract_end: terms,
                ..Default::default()
            }),
            received_at: Some(timestamp_from_millis(job.received_at)),
            due_at: Some(timestamp_from_millis(job.due_at)),
            recipient,
        };
    }
    let recipient = (body.kind == RequestKind::Transfer as i32)
        .then(|| {
            body.parameters
                .as_ref()
                .and_then(|p| recipient(&p.transfer_recipient))
        })
        .flatten();
    DeliverRequest {
        request_id: job.request_id.clone(),
        kind: body.kind,
        identities: body.identities,
        scope: body.scope,
        parameters: body.parameters,
        received_at: Some(timestamp_from_millis(job.received_at)),
        due_at: Some(timestamp_from_millis(job.due_at)),
        recipient,
    }
}

/// The recipient named `name` as the processors are to have it, from the configuration read
/// at the start: where it receives, the identity it must present, and the keys its receipts
/// are checked with (so a processor refuses a receipt the registry would refuse): a revoked
/// key only until its `revoked_at`. A processor holding a Deliver sent before then still
/// takes what the key signs after it, and the registry refuses that when it arrives.
fn recipient(shared: &Shared, name: &str) -> Option<TransferRecipient> {
    let mut to = shared.config.recipient(name)?;
    if let Some(keys) = shared.store.receipt_keys(name) {
        let keys = keys.as_of(shared.clock.now_ms());
        to.public_keys = keys.keys().iter().map(|k| k.to_base64()).collect();
    }
    Some(to)
}

/// The recipient a contract end's terms return the data to, as `recipient` finds it
/// configured now; `None` for a return to the registry or a recipient no longer configured.
fn contract_recipient(
    terms: &dsrelay_proto::v1::ContractEnd,
    recipient: impl Fn(&str) -> Option<TransferRecipient>,
) -> Option<TransferRecipient> {
    (!terms.transfer_recipient.is_empty())
        .then(|| recipient(&terms.transfer_recipient))
        .flatten()
}

/// Whether the processor's answer says the call itself is wrong, so sending it again unchanged
/// gets the same answer: a malformed or unsupported call, a caller it does not serve, or a
/// state it will not leave. Unavailability, deadlines, RESOURCE_EXHAUSTED, ABORTED and internal
/// errors pass with time and are retried without limit.
pub(crate) fn is_refusal(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        InvalidArgument | PermissionDenied | Unimplemented | FailedPrecondition
    )
}

/// Records a failed attempt: the delivery's `last_error` and the request's DELIVERY_FAILED
/// event hold all that was `said` (until the request is forgotten); the log line holds the
/// code and only a keyed hash of the processor's message, which may quote the subject (a
/// holder's answer naming an address), and says where to read it. The line is written once
/// the store said what became of the row: only an attempt that will be retried names when.
async fn record_failure(shared: &Shared, job: &DeliveryJob, said: &Said, refused: bool) {
    shared.metrics.delivery_failures.inc(&[&job.processor]);
    let attempt = u32::try_from(job.attempts + 1).unwrap_or(u32::MAX);
    let delay = shared.config.delivery.backoff.delay(attempt);
    let now = shared.clock.now_ms();
    let logged = said.logged(&shared.identity_hash_key);
    let failed = || {
        tracing::warn!(
            error = %logged,
            "delivery failed; `dsrctl get` shows the whole error until the request is forgotten"
        )
    };
    let max_refusals = refused.then_some(shared.config.delivery.max_refusals);
    let error = said.full();
    match shared
        .store
        .delivery_failed(
            job,
            &error,
            now + delay.as_millis() as i64,
            now,
            max_refusals,
        )
        .await
    {
        Ok(FailureRecorded::DeadLettered) => {
            shared
                .metrics
                .deliveries_dead_lettered
                .inc(&[&job.processor]);
            tracing::error!(
                error = %logged,
                request_id = %job.request_id,
                processor = %job.processor,
                "delivery dead-lettered after repeated refusal: it is not sent again until \
                 the cause is fixed and an operator runs `dsrctl deliveries requeue {} \
                 --processor {}`; `dsrctl get` shows the whole error until the request is \
                 forgotten",
                job.request_id,
                job.processor
            );
        }
        Ok(FailureRecorded::Retrying) => tracing::warn!(
            error = %logged,
            retry_in_ms = delay.as_millis() as u64,
            "delivery failed; `dsrctl get` shows the whole error until the request is forgotten"
        ),
        Ok(FailureRecorded::LeaseLost) => {
            failed();
            tracing::warn!("lease lost to another claim; the failed attempt is not recorded")
        }
        Ok(FailureRecorded::Withdrawn) => {
            failed();
            tracing::info!("the request was cancelled during the attempt; it is not sent again")
        }
        Err(e) => {
            failed();
            tracing::error!(
                error = format!("{e:#}"),
                "recording a delivery failure failed"
            )
        }
    }
    shared.publish(&job.request_id);
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsrelay_proto::v1::RequestParameters;

    fn job() -> DeliveryJob {
        DeliveryJob {
            request_id: "0190-t".into(),
            processor: "payroll".into(),
            op: Operation::Deliver,
            attempts: 0,
            body: None,
            received_at: 1,
            due_at: 2,
            trace_id: String::new(),
            cancel_reason: None,
            traceparent: None,
            kind: RequestKind::Transfer as i64,
            terms: Default::default(),
            lease_owner: String::new(),
        }
    }

    fn submit(kind: RequestKind, recipient: &str) -> SubmitRequest {
        SubmitRequest {
            kind: kind as i32,
            parameters: Some(RequestParameters {
                transfer_recipient: recipient.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn configured(name: &str) -> Option<TransferRecipient> {
        (name == "new-bookkeeper").then(|| TransferRecipient {
            name: name.into(),
            endpoint: "https://dsr.bookkeeper.example:8443".into(),
            identity: "spiffe://bookkeeper.example/recipient".into(),
            ..Default::default()
        })
    }

    #[test]
    fn only_answers_retrying_cannot_change_are_refusals() {
        use tonic::Code::*;
        for c in [
            InvalidArgument,
            PermissionDenied,
            Unimplemented,
            FailedPrecondition,
        ] {
            assert!(is_refusal(c), "{c:?}");
        }
        for c in [
            Unavailable,
            DeadlineExceeded,
            ResourceExhausted,
            Aborted,
            Internal,
            Unknown,
            Cancelled,
        ] {
            assert!(!is_refusal(c), "{c:?}");
        }
    }

    #[test]
    fn a_transfer_carries_its_configured_recipient() {
        let req = deliver_request(
            &job(),
            submit(RequestKind::Transfer, "new-bookkeeper"),
            configured,
        );
        assert_eq!(req.recipient, configured("new-bookkeeper"));
        assert_eq!(req.request_id, "0190-t");
        assert_eq!(req.kind, RequestKind::Transfer as i32);
        // A recipient no longer configured is not invented.
        let gone = deliver_request(&job(), submit(RequestKind::Transfer, "old"), configured);
        assert_eq!(gone.recipient, None);
    }

    #[test]
    fn a_contract_end_carries_its_stored_terms_and_no_identities() {
        use dsrelay_proto::v1::{ContractEndChoice, SubjectIdentity};
        let mut j = job();
        j.kind = RequestKind::ContractEnd as i64;
        j.terms = crate::store::ContractTerms {
            contract_choice: Some(ContractEndChoice::Delete as i64),
            contract_effective_at: Some(10),
            contract_grace_ends_at: Some(20),
            contract_return_confirmed: Some(0),
            contract_transfer_recipient: Some(String::new()),
            contract_version: Some(2),
        };
        // A stale body (choice NONE, an identity) never reaches the processor.
        let mut body = submit(RequestKind::ContractEnd, "");
        body.identities.push(SubjectIdentity::default());
        let req = deliver_request(&j, body, configured);
        assert_eq!(req.kind, RequestKind::ContractEnd as i32);
        assert!(req.identities.is_empty());
        let terms = req.parameters.unwrap().contract_end.unwrap();
        assert_eq!(terms.choice, ContractEndChoice::Delete as i32);
        assert_eq!(terms.effective_at, Some(timestamp_from_millis(10)));
        assert_eq!(terms.grace_ends_at, Some(timestamp_from_millis(20)));
        assert!(!terms.return_confirmed);
        assert_eq!(req.recipient, None);
    }

    #[test]
    fn a_contract_end_returned_to_a_recipient_carries_it() {
        use dsrelay_proto::v1::ContractEndChoice;
        let mut j = job();
        j.kind = RequestKind::ContractEnd as i64;
        j.terms = crate::store::ContractTerms {
            contract_choice: Some(ContractEndChoice::ReturnThenDelete as i64),
            contract_effective_at: Some(10),
            contract_grace_ends_at: Some(20),
            contract_return_confirmed: Some(0),
            contract_transfer_recipient: Some("new-bookkeeper".into()),
            contract_version: Some(1),
        };
        let req = deliver_request(&j, submit(RequestKind::ContractEnd, ""), configured);
        assert_eq!(req.recipient, configured("new-bookkeeper"));
        let terms = req.parameters.unwrap().contract_end.unwrap();
        assert_eq!(terms.transfer_recipient, "new-bookkeeper");
        j.terms.contract_transfer_recipient = Some("old".into());
        let gone = deliver_request(&j, submit(RequestKind::ContractEnd, ""), configured);
        assert_eq!(gone.recipient, None);
    }

    #[test]
    fn other_kinds_carry_no_recipient() {
        let req = deliver_request(
            &job(),
            submit(RequestKind::ReturnOfData, "new-bookkeeper"),
            configured,
        );
        assert_eq!(req.recipient, None);
    }
}
