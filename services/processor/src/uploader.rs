//! Delivers each written export to where its request sends it, two files at a time, each in
//! 1 MiB chunks: a RETURN_OF_DATA's to its controller's registry (`ExportUploadService`), a
//! TRANSFER's straight to the recipient the registry named (`TransferReceiver`, over mutual
//! TLS, checking that the recipient presents the identity the registry gave). Both take the
//! same steps through [`Sink`]: ask where each file stands and resume there, send the rest
//! with each chunk's checksum, close the part. A recipient answers a receipt, which must match
//! the part the processor sent (canonical manifest digest, bytes, files), name the
//! recipient it was sent to, and name no sender but this processor's certificate identity
//! (an empty sender is taken) before the task may complete. Then the task moves to COMPLETED
//! through the task machine, so the acknowledgement carries it (and the receipt), and the
//! export's files are deleted from the data folder: they were kept only until delivered. A
//! contract end's return goes to the registry the same way as the task's part of the
//! package, or, when its terms name a transfer recipient, to that recipient as for a
//! TRANSFER; the task then waits for the controller's confirmation (with the receipt)
//! instead of completing, since the data is still at the holder, scheduled for the end of the
//! grace period, when the data is deleted confirmed or not.
//!
//! A return of data's files (and a contract end's returned to the registry) usually reach
//! the registry before this worker sees them: the runner streams them while the connector
//! writes them (`crate::head_start`), so that GetUploadState here answers them complete and
//! only the part is closed.
//!
//! A failed attempt (destination down, wrong identity, a refused chunk or receipt, a
//! FAILED_PRECONDITION) leaves the task IN_PROGRESS with a note saying what is missing, and
//! is tried again after the backoff until the request's due date; then the task fails with
//! the last reason. A later attempt that gets through (the destination takes one of its
//! files whole, or holds part of one the attempt resumes) replaces that note, once per
//! attempt, with one saying the delivery is under way, acknowledged like the others. An export that no longer matches what the connector wrote (a file
//! vanished or changed), or that the destination refuses for good, fails the task at once.
//! Files are read in chunks, never whole.
//!
//! An attempt holds its upload under the claim's lease (`uploads.lease_ms`, on the database's
//! clock), renewed every third of it while the files are sent, however long one of them
//! takes. The attempt stops at once, mid-file, when a renewal finds the lease no longer the
//! claim's (another claim took the upload, or a cancellation found it idle; what the attempt
//! records then matches the claim's token and changes nothing of the new holder's), or when
//! renewals failed until the lease may have run out. A file the destination takes no chunk
//! of for `uploads.stall_ms` ends the attempt too, and the next resumes where the destination
//! stands.
//!
//! A Cancel that comes while an export is on its way to a recipient (a TRANSFER, or a
//! contract end's return to one) marks the task, whichever replica takes it; the sender reads
//! the task in the store before each file and before closing the part. Once it finds the
//! mark (or the task ended), the files already being sent go to their end, no other file
//! starts, the part is not closed (which is all a recipient learns of an abandoned transfer:
//! it discards the parts no CompleteTransfer closed), and the task is CANCELLED. A mark that
//! comes while the part is being closed is read again once the recipient answers: its receipt
//! is recorded as a delivery too late to stop (a TRANSFER COMPLETED, a contract end's return
//! CANCELLED with the receipt). A return to the registry is sent on: the data goes back to
//! the controller.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsrelay_connectors::ExportedFile;
use dsrelay_proto::v1::export_upload_service_client::ExportUploadServiceClient;
use dsrelay_proto::v1::transfer_receiver_client::TransferReceiverClient;
use dsrelay_proto::v1::{
    CompletePartRequest, CompleteTransferRequest, ExportFileHeader, GetUploadStateRequest,
    RequestKind, TaskState, TransferReceipt, TransferRecipient, UploadFileChunk, UploadState,
};
use dsrelay_runtime::log_text::Said;
use dsrelay_runtime::server::MAX_MESSAGE_BYTES;
use dsrelay_runtime::signing::{KeyRing, PublicKey};
use dsrelay_runtime::tls::{ClientTls, ReloadingChannel};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tonic::Code;

use crate::app::Shared;
use crate::lease::{LeaseClock, Renewal};
use crate::store::{
    Delivered, NextAttempt, TaskKey, TaskRow, UploadClaim, UploadFinish, UploadJob,
};
use crate::task_machine::{
    awaiting_confirmation, decide, delivery_retry_at, Context, Decision, Destination, Event,
    Transition,
};

/// Bytes of a file in one message: the most the registry and the recipient take.
pub(crate) const CHUNK: usize = 1024 * 1024;

/// Files of one export sent at the same time (each its own stream): two keep both ends of a
/// 2-core machine busy with a large export's files, where one at a time left each end waiting
/// for the other half of the time.
pub(crate) const FILES_AT_ONCE: usize = 2;

/// Runs until `stop` turns true. Deliveries in flight then get the shutdown grace to
/// finish; those still sending after it are dropped and their leases released, so another
/// replica or the next start resumes them at once (the destination keeps what it received).
pub(crate) async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let cfg = shared.config.uploads.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let jobs = match shared
            .store
            .claim_uploads(
                shared.clock.now_ms(),
                i64::from(cfg.concurrency),
                cfg.lease_ms as i64,
            )
            .await
        {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "claiming uploads failed");
                Vec::new()
            }
        };
        let full = jobs.len() == cfg.concurrency as usize;
        let claims: Vec<(TaskKey, String)> = jobs
            .iter()
            .map(|j| (j.key.clone(), j.lease_owner.clone()))
            .collect();
        let sending = futures::future::join_all(jobs.into_iter().map(|j| upload(&shared, j)));
        let grace = Duration::from_millis(shared.config.service.shutdown_grace_ms);
        let mut watching = stop.clone();
        let overdue = async {
            if watching.wait_for(|s| *s).await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = sending => {}
            () = overdue => {
                for (key, lease_owner) in &claims {
                    let claim = UploadClaim { key, lease_owner };
                    if let Err(e) = shared.store.release_upload(claim).await {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "releasing an abandoned upload failed; its lease runs out instead"
                        );
                    }
                }
                tracing::warn!(
                    released = claims.len(),
                    "shutting down: uploads still sending abandoned and released"
                );
                return;
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            _ = stop.changed() => {}
            _ = shared.upload_wakeup.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(cfg.poll_interval_ms)) => {}
        }
    }
}

/// Why a delivery did not finish: the processor's words, and apart what the destination
/// said (its status's message, its receipt), which the upload's last error and the task's
/// note or reason hold and log lines only as a keyed hash.
#[derive(Debug)]
enum Failure {
    /// Try again later (until the due date): the destination was unreachable, presented
    /// another identity, or refused a chunk or answered a receipt it may get right next time.
    Retry(Said),
    /// The export cannot be delivered as written; the task fails with this reason.
    Undeliverable(Said),
    /// The task was cancelled (or ended) while its export went to a recipient: no further
    /// file starts and the part is not closed.
    Cancelled,
}

/// Channels to transfer recipients, made on first use with the processor's client TLS and
/// kept per (endpoint, identity): recipients come with requests, not with the configuration.
pub(crate) struct RecipientClients {
    tls: ClientTls,
    cached: Mutex<HashMap<(String, String), TransferReceiverClient<ReloadingChannel>>>,
}

impl RecipientClients {
    /// Clients that present the processor's certificate (`tls`, as it is when each
    /// connection opens).
    pub(crate) fn new(tls: ClientTls) -> Self {
        Self {
            tls,
            cached: Mutex::new(HashMap::new()),
        }
    }

    /// The client for `r`, checking that the recipient presents `r.identity`.
    fn client(
        &self,
        r: &TransferRecipient,
    ) -> anyhow::Result<TransferReceiverClient<ReloadingChannel>> {
        let key = (r.endpoint.clone(), r.identity.clone());
        // A poisoned lock only means another delivery panicked; the map is still whole.
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cached.get(&key) {
            return Ok(c.clone());
        }
        let channel = dsrelay_runtime::tls::reloading_channel(
            &r.endpoint,
            Some(r.identity.clone()),
            &self.tls,
        )?;
        // MAX_MESSAGE_BYTES (4 MiB) leaves room for a 1 MiB chunk with its header.
        let client = TransferReceiverClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        cached.insert(key, client.clone());
        Ok(client)
    }
}

/// Where one export goes, with the three calls every destination takes.
enum Sink<'a> {
    /// The controller's registry: the task's part of a return-of-data or contract end
    /// package.
    Registry(ExportUploadServiceClient<ReloadingChannel>),
    /// A transfer's recipient.
    Recipient {
        /// The registry's name for it.
        name: &'a str,
        client: TransferReceiverClient<ReloadingChannel>,
        /// The keys the registry checks its receipts with, as it sent them; `None` when it
        /// sent none.
        keys: Option<KeyRing>,
    },
}

impl Sink<'_> {
    fn destination(&self) -> Destination<'_> {
        match self {
            Sink::Registry(_) => Destination::Registry,
            Sink::Recipient { name, .. } => Destination::Recipient(name),
        }
    }

    /// How much of the file `header` describes the destination holds.
    async fn state(
        &self,
        header: &ExportFileHeader,
        timeout: Duration,
    ) -> Result<UploadState, tonic::Status> {
        let mut req = tonic::Request::new(GetUploadStateRequest {
            header: Some(header.clone()),
        });
        req.set_timeout(timeout);
        Ok(match self {
            Sink::Registry(c) => c.clone().get_upload_state(req).await?,
            Sink::Recipient { client, .. } => client.clone().get_transfer_state(req).await?,
        }
        .into_inner())
    }

    /// Sends `chunks` of one file. No deadline for the whole call: a large file on a slow
    /// link takes as long as it takes, and [`send_file`] ends a send that stops moving.
    async fn send(
        &self,
        chunks: impl futures::Stream<Item = UploadFileChunk> + Send + 'static,
    ) -> Result<UploadState, tonic::Status> {
        let req = tonic::Request::new(chunks);
        Ok(match self {
            Sink::Registry(c) => c.clone().upload_file(req).await?,
            Sink::Recipient { client, .. } => client.clone().send_file(req).await?,
        }
        .into_inner())
    }

    /// Closes the part: the registry stores it, a recipient answers its receipt.
    async fn complete(
        &self,
        key: &TaskKey,
        files: Vec<ExportFileHeader>,
        timeout: Duration,
    ) -> Result<Option<TransferReceipt>, tonic::Status> {
        match self {
            Sink::Registry(c) => {
                let mut req = tonic::Request::new(CompletePartRequest {
                    request_id: key.request_id.clone(),
                    subprocessor: key.subprocessor.clone(),
                    files,
                });
                req.set_timeout(timeout);
                c.clone().complete_part(req).await?;
                Ok(None)
            }
            Sink::Recipient { client, .. } => {
                let mut req = tonic::Request::new(CompleteTransferRequest {
                    request_id: key.request_id.clone(),
                    subprocessor: key.subprocessor.clone(),
                    files,
                });
                req.set_timeout(timeout);
                Ok(Some(
                    client.clone().complete_transfer(req).await?.into_inner(),
                ))
            }
        }
    }
}

#[tracing::instrument(skip_all, fields(request_id = %job.key.request_id, subprocessor = %job.key.subprocessor))]
pub(crate) async fn upload(shared: &Shared, job: UploadJob) {
    if let Err(e) = try_upload(shared, &job).await {
        // The lease runs out and the upload is claimed again.
        tracing::error!(error = format!("{e:#}"), "recording an upload failed");
    }
}

async fn try_upload(shared: &Shared, job: &UploadJob) -> anyhow::Result<()> {
    let key = &job.key;
    let Some(task) = shared.store.task(key).await? else {
        return retire(shared, job, None, None, 0, 0).await.map(drop);
    };
    if task.state != TaskState::InProgress {
        // Cancelled (or otherwise finished) meanwhile: nothing is waiting for the part.
        return retire(shared, job, None, None, task.sequence, task.attempts)
            .await
            .map(drop);
    }
    let sink = match sink(shared, job) {
        Ok(s) => s,
        Err(reason) => {
            // Named before any sink exists: the request says where it goes.
            let to = match job.recipient_name() {
                Some("") => Destination::Recipient("(none named)"),
                Some(name) => Destination::Recipient(name),
                None => Destination::Registry,
            };
            return undeliverable(shared, job, &task, to, &Said::ours(reason)).await;
        }
    };
    let to = sink.destination();
    let bytes: u64 = job.files.iter().map(|f| f.size).sum();
    if task.cancel_requested_at.is_some() {
        // Cancelled while an earlier attempt was on its way (which made the cancellation wait
        // for it): nothing more is sent.
        return cancelled(shared, job, &task, to).await;
    }
    let under_way = UnderWay {
        said: AtomicBool::new(false),
        since: shared.clock.now_ms(),
    };
    let sent = send_export(shared, job, &sink, &under_way).await;
    // A failure is decided on the task as it stands: the note of this attempt under way may
    // have moved it, and a Cancel taken meanwhile may have marked it (a return to a recipient
    // whose part was being closed), whose failure then ends it CANCELLED, never retried nor
    // FAILED over the mark. A mark after this read is caught by the guarded writes below.
    let task = if matches!(sent, Err(Failure::Retry(_) | Failure::Undeliverable(_))) {
        match shared.store.task(key).await? {
            Some(now)
                if now.state == TaskState::InProgress && now.cancel_requested_at.is_some() =>
            {
                return cancelled(shared, job, &now, to).await;
            }
            Some(now) => now,
            None => return retire(shared, job, None, None, 0, 0).await.map(drop),
        }
    } else {
        task
    };
    match sent {
        Ok(receipt) => {
            tracing::info!(files = job.files.len(), %to, "export delivered");
            let delivered = Delivered {
                recipient: match to {
                    Destination::Registry => None,
                    Destination::Recipient(name) => Some(name),
                },
                files: job.files.len(),
                bytes,
            };
            if !record_delivery(shared, job, to, &delivered, receipt).await? {
                // Decided again on the task as it stands; the files stay until then.
                return Ok(());
            }
            // The destination holds the files now; the processor kept them only until then.
            let dir = crate::exports::task_dir(&shared.config.data_dir, key);
            if let Err(e) = crate::exports::remove(&dir).await {
                tracing::warn!(error = %e, dir = %dir.display(), "deleting a delivered export failed");
            }
            Ok(())
        }
        Err(Failure::Undeliverable(reason)) => undeliverable(shared, job, &task, to, &reason).await,
        Err(Failure::Cancelled) => {
            tracing::info!(%to, "the request was cancelled: no further file sent, part not closed");
            cancelled_meanwhile(shared, job, to).await
        }
        Err(Failure::Retry(said)) => {
            let error = said.full();
            let logged = said.logged(shared.log_key());
            let cfg = &shared.config.uploads;
            let attempt = u32::try_from(job.attempts).unwrap_or(u32::MAX);
            let ctx = Context {
                due_at: job.due_at,
                backoff_ms: cfg.backoff.delay(attempt).as_millis() as i64,
                ..Context::at(shared.clock.now_ms())
            };
            let event = Event::DeliveryFailed {
                to,
                files: job.files.len(),
                bytes,
                attempt: job.attempts,
                error: &error,
            };
            match decide(&task.current(), event, &ctx) {
                Decision::Move(t) if t.state == TaskState::InProgress => {
                    let next = delivery_retry_at(&ctx);
                    tracing::warn!(
                        error = %logged,
                        %to,
                        retry_in_ms = next - ctx.now,
                        "delivering an export failed; will retry (the task's note holds the \
                         destination's words)"
                    );
                    let moved = shared
                        .store
                        .upload_failed_unless_marked(
                            job.claim(),
                            task.sequence,
                            &t,
                            NextAttempt {
                                at: next,
                                error: &error,
                            },
                            ctx.now,
                            task.attempts,
                        )
                        .await?;
                    match moved {
                        // Marked since the task was read: decided again as the cancellation's.
                        None => decide_again_later(shared, job, ctx.now).await,
                        Some(moved) => {
                            if moved.is_some() {
                                shared.ack_wakeup.notify_one();
                            }
                            Ok(())
                        }
                    }
                }
                Decision::Later { at, .. } => {
                    // Nothing new for the controller: only the next attempt is scheduled.
                    tracing::warn!(
                        error = %logged,
                        %to,
                        retry_in_ms = at - ctx.now,
                        "delivering an export failed; will retry (the upload's last_error holds \
                         the destination's words)"
                    );
                    shared
                        .store
                        .upload_retry_later(job.claim(), NextAttempt { at, error: &error })
                        .await
                }
                decision => {
                    tracing::warn!(
                        error = %logged,
                        %to,
                        "delivering an export failed at the due date; giving up (the task's \
                         reason holds the destination's words)"
                    );
                    record_unless_marked(shared, job, decision, &task)
                        .await
                        .map(drop)
                }
            }
        }
    }
}

/// Records a delivery the destination answered (with the recipient's `receipt`), decided on
/// the task as it stands once the destination answered, not as the attempt found it: a
/// Cancel recorded while the part was being closed has marked it meanwhile, and the delivery
/// is then reported as too late to stop (a contract end's return CANCELLED with the receipt,
/// not left waiting for a confirmation). A decision made on an unmarked task is recorded only
/// while no mark came since; one that came is decided again. Answers whether the upload is
/// retired.
async fn record_delivery(
    shared: &Shared,
    job: &UploadJob,
    to: Destination<'_>,
    delivered: &Delivered<'_>,
    receipt: Option<TransferReceipt>,
) -> anyhow::Result<bool> {
    // A mark comes once, so the second look decides on a marked task; a third covers a
    // move by another uploader (or a new grace end) in between, after which the upload is
    // decided again later.
    for _ in 0..3 {
        // A contract end's return then waits for the confirmation until the grace end, read
        // each time: the store writes the wait only while the terms still hold that grace
        // end, and a new one is decided again here.
        let terms = match job.kind {
            RequestKind::ContractEnd => (shared.store)
                .contract_terms_and_recipient(&job.key.controller, &job.key.request_id)
                .await?
                .map(|(terms, _)| terms),
            _ => None,
        };
        let Some(task) = shared.store.task(&job.key).await? else {
            return retire(shared, job, None, Some(delivered), 0, 0).await;
        };
        let event = Event::Delivered {
            to,
            files: delivered.files,
            bytes: delivered.bytes,
            receipt: receipt.clone(),
        };
        let now = shared.clock.now_ms();
        let t = match decide(&task.current(), event, &Context::at(now)) {
            Decision::Move(t) => Some(match &terms {
                Some(terms) => awaiting_confirmation(t, &job.key.request_id, to, terms),
                None => t,
            }),
            _ => None,
        };
        let (t, sequence, attempts) = (t.as_ref(), task.sequence, task.attempts);
        let (store, claim) = (&shared.store, job.claim());
        let finish = if task.cancel_requested_at.is_none() {
            store
                .upload_finished_unless_marked(claim, sequence, t, Some(delivered), now, attempts)
                .await?
        } else {
            (store.upload_finished(claim, sequence, t, Some(delivered), now, attempts)).await?
        };
        log_if_failed(shared, job, t, &finish);
        if retired(shared, &finish) {
            return Ok(true);
        }
    }
    decide_again_later(shared, job, shared.clock.now_ms()).await?;
    Ok(false)
}

/// Ends an attempt that found its task cancelled (or ended) while its export went to a
/// recipient, as the task stands now.
async fn cancelled_meanwhile(
    shared: &Shared,
    job: &UploadJob,
    to: Destination<'_>,
) -> anyhow::Result<()> {
    match shared.store.task(&job.key).await? {
        Some(now) if now.state != TaskState::InProgress => {
            // Ended meanwhile (cancelled between attempts, say): nothing is waiting for the
            // part.
            retire(shared, job, None, None, now.sequence, now.attempts)
                .await
                .map(drop)
        }
        Some(now) => cancelled(shared, job, &now, to).await,
        None => retire(shared, job, None, None, 0, 0).await.map(drop),
    }
}

/// Ends the attempt of a task whose cancellation came while its export was on its way, as
/// the task machine says for a delivery that did not arrive: CANCELLED, with what was not
/// delivered; the upload is retired and the export's files swept.
async fn cancelled(
    shared: &Shared,
    job: &UploadJob,
    task: &TaskRow,
    to: Destination<'_>,
) -> anyhow::Result<()> {
    let event = Event::DeliveryFailed {
        to,
        files: job.files.len(),
        bytes: job.files.iter().map(|f| f.size).sum(),
        attempt: job.attempts,
        error: "the request was cancelled",
    };
    let decision = decide(&task.current(), event, &Context::at(shared.clock.now_ms()));
    record(shared, job, decision, None, task.sequence, task.attempts)
        .await
        .map(drop)
}

/// Where `job`'s export goes: the controller's registry, or the recipient its request names.
fn sink<'a>(shared: &Shared, job: &'a UploadJob) -> Result<Sink<'a>, String> {
    let Some(name) = job.recipient_name() else {
        return shared
            .uploaders
            .get(&job.key.controller)
            .map(|c| Sink::Registry(c.clone()))
            .ok_or_else(|| format!("controller {} is no longer configured", job.key.controller));
    };
    let Some(r) = job.recipient.as_ref().filter(|r| r.name == name) else {
        return Err(if job.kind == RequestKind::Transfer {
            "the transfer came without a recipient".to_string()
        } else {
            format!(
                "the registry does not configure recipient {name} any more, so there is \
                 nowhere to send the data"
            )
        });
    };
    let client = shared.recipients.client(r).map_err(|e| {
        format!(
            "recipient {} cannot be called at {}: {e:#}",
            r.name, r.endpoint
        )
    })?;
    let keys = receipt_keys(&r.public_keys)
        .map_err(|e| format!("recipient {}'s public keys are unusable: {e:#}", r.name))?;
    Ok(Sink::Recipient {
        name: &r.name,
        client,
        keys,
    })
}

async fn undeliverable(
    shared: &Shared,
    job: &UploadJob,
    task: &TaskRow,
    to: Destination<'_>,
    reason: &Said,
) -> anyhow::Result<()> {
    tracing::warn!(
        reason = %reason.logged(shared.log_key()),
        %to,
        "export cannot be delivered; the task fails with the reason in full"
    );
    let reason = reason.full();
    let decision = decide(
        &task.current(),
        Event::Undeliverable {
            to,
            reason: &reason,
        },
        &Context::at(shared.clock.now_ms()),
    );
    record_unless_marked(shared, job, decision, task)
        .await
        .map(drop)
}

/// [`record`] of a failure decided on `task` as read: decided on an unmarked task, it is
/// written only while no cancellation marked the task since, and one that did is decided
/// again ([`decide_again_later`]: the next attempt finds the mark and ends CANCELLED).
async fn record_unless_marked(
    shared: &Shared,
    job: &UploadJob,
    decision: Decision,
    task: &TaskRow,
) -> anyhow::Result<bool> {
    let Decision::Move(t) = decision else {
        return record(shared, job, decision, None, task.sequence, task.attempts).await;
    };
    if task.cancel_requested_at.is_some() {
        return retire(shared, job, Some(&t), None, task.sequence, task.attempts).await;
    }
    let now = shared.clock.now_ms();
    let (claim, at) = (job.claim(), (task.sequence, task.attempts));
    let finish = (shared.store)
        .upload_finished_unless_marked(claim, at.0, Some(&t), None, now, at.1)
        .await?;
    log_if_failed(shared, job, Some(&t), &finish);
    settled(shared, job, &finish, now).await
}

/// Records what the task machine decided and retires the upload (`delivered`: where the
/// export went, when it did); answers whether the upload is retired (by this call or another
/// uploader's).
async fn record(
    shared: &Shared,
    job: &UploadJob,
    decision: Decision,
    delivered: Option<&Delivered<'_>>,
    sequence: i64,
    attempts: i64,
) -> anyhow::Result<bool> {
    match decision {
        Decision::Move(t) => retire(shared, job, Some(&t), delivered, sequence, attempts).await,
        _ => retire(shared, job, None, delivered, sequence, attempts).await,
    }
}

async fn retire(
    shared: &Shared,
    job: &UploadJob,
    t: Option<&Transition>,
    delivered: Option<&Delivered<'_>>,
    sequence: i64,
    attempts: i64,
) -> anyhow::Result<bool> {
    let now = shared.clock.now_ms();
    let finish = shared
        .store
        .upload_finished(job.claim(), sequence, t, delivered, now, attempts)
        .await?;
    log_if_failed(shared, job, t, &finish);
    settled(shared, job, &finish, now).await
}

/// Logs the task as failed for good ([`crate::runner::failed_for_good`]) when `finish`
/// recorded `t` and `t` failed it.
fn log_if_failed(shared: &Shared, job: &UploadJob, t: Option<&Transition>, finish: &UploadFinish) {
    let recorded = matches!(finish, UploadFinish::Retired { sequence: Some(_) });
    if let Some(t) = t.filter(|t| recorded && t.state == TaskState::Failed) {
        crate::runner::failed_for_good(shared, &job.key, &t.reason);
    }
}

/// Whether `finish` retired the upload (by this call or another uploader's), waking the
/// acknowledgement sender for a step it recorded.
fn retired(shared: &Shared, finish: &UploadFinish) -> bool {
    match finish {
        UploadFinish::Retired { sequence } => {
            if sequence.is_some() {
                shared.ack_wakeup.notify_one();
            }
            true
        }
        UploadFinish::RetiredAlready => true,
        UploadFinish::TaskChanged => false,
    }
}

/// [`retired`], and an upload whose task changed meanwhile decided again
/// ([`decide_again_later`]); answers whether it is retired.
async fn settled(
    shared: &Shared,
    job: &UploadJob,
    finish: &UploadFinish,
    now: i64,
) -> anyhow::Result<bool> {
    if retired(shared, finish) {
        return Ok(true);
    }
    decide_again_later(shared, job, now).await?;
    Ok(false)
}

/// After an outcome found the task changed: another uploader's attempt moved the task while
/// this one sent, or an extension moved the due date past this give-up. The upload is taken
/// again at once, and what it finds (the destination holding every file, say) decided on the
/// task and the due date as they stand.
async fn decide_again_later(shared: &Shared, job: &UploadJob, now: i64) -> anyhow::Result<()> {
    tracing::info!("the task or its due date changed while its export was sent; deciding again");
    shared
        .store
        .upload_retry_later(
            job.claim(),
            NextAttempt {
                at: now,
                error: "the task or its due date changed while its export was sent; decided \
                        again",
            },
        )
        .await
}

/// Whether an attempt said it got through ([`under_way`]), and when it began (ms).
struct UnderWay {
    said: AtomicBool,
    since: i64,
}

/// Sends every file of the export the destination does not hold whole yet, then closes the
/// part; answers the recipient's receipt, checked against the headers sent. The first file
/// that gets through replaces an earlier attempt's failure note ([`under_way`]).
async fn send_export(
    shared: &Shared,
    job: &UploadJob,
    sink: &Sink<'_>,
    attempt: &UnderWay,
) -> Result<Option<TransferReceipt>, Failure> {
    let key = &job.key;
    let to = sink.destination();
    let cfg = &shared.config.uploads;
    let timeout = Duration::from_millis(cfg.call_timeout_ms);
    let dir = crate::exports::task_dir(&shared.config.data_dir, key);
    let headers: Vec<ExportFileHeader> = job.files.iter().map(|f| header(key, f)).collect();
    // Files go FILES_AT_ONCE at a time, so that one file's reading and hashing here overlaps
    // another's storing at the destination; the first failure ends the attempt (the files
    // still sending are dropped, and the destination keeps what it stored of them).
    // The futures are made first: a stream's own map over borrowed closures trips the
    // compiler's Send check of the runner's future.
    let stopped = AtomicBool::new(false);
    let files: Vec<_> = job
        .files
        .iter()
        .zip(&headers)
        .map(|(f, header)| {
            let file = Outgoing {
                dir: &dir,
                f,
                header,
            };
            deliver_file(shared, job, sink, file, timeout, (&stopped, attempt))
        })
        .collect();
    let sending = async {
        let mut sending = futures::stream::iter(files).buffer_unordered(FILES_AT_ONCE);
        while let Some(sent) = sending.next().await {
            match sent {
                // A file already on its way when the cancellation was found goes to its end:
                // the store is read between files, not mid-file, and cutting the one still
                // sending whenever another ended would cut by which file ended first. The
                // later ones find `stopped` and never start.
                Err(Failure::Cancelled) => {}
                Err(_) if stopped.load(Ordering::Relaxed) => return Err(Failure::Cancelled),
                sent => sent?,
            }
        }
        if stopped.load(Ordering::Relaxed) {
            return Err(Failure::Cancelled);
        }
        Ok(())
    };
    // The lease is renewed while the files go, however long one of them takes: a file
    // that outlasted it used to lose the upload to another claim mid-file, every attempt.
    let mut lease = UploadLease::new(shared, job);
    tokio::select! {
        sent = sending => sent?,
        lost = lease.keep() => return Err(lost),
    }
    // The part is closed only under a lease held now: a cancellation reads a leased upload
    // as busy and only marks its task, but it cancels the task of one whose lease ran out
    // (renewals that failed while the files were sent leave the lease running down, and it
    // may end before this point), and this sender must then not deliver.
    hold_lease(shared, job).await?;
    // A recipient's part is not closed once the task was marked cancelled, wherever the
    // Cancel was taken: the data would reach a third party after the subject withdrew.
    still_wanted(shared, job, sink).await?;
    let receipt = sink
        .complete(key, headers.clone(), timeout)
        .await
        .map_err(|s| refused(to, "closing the part", &s))?;
    if let (Some(r), Sink::Recipient { name, keys, .. }) = (&receipt, sink) {
        // Read when a receipt comes, not at start: a reloaded certificate is what the
        // recipient saw on the connection this attempt opened.
        let own = shared.config.service.tls.own_identity().map_err(|e| {
            Failure::Retry(Said::ours(format!(
                "reading the processor's own certificate identity to check the receipt of \
                 {to}: {e:#}"
            )))
        })?;
        // `why` quotes the receipt's fields, the recipient's words.
        check_receipt(key, name, &own, &headers, r).map_err(|why| {
            Failure::Retry(Said::quoting(
                format!(
                    "the receipt of {to} does not match what was sent (a part the recipient \
                     closed answers the same receipt again: unless what disagrees is set right \
                     on this side, such as the registry's name for the recipient, the \
                     recipient's operator discards that part once the recipient is set \
                     right, and the next attempt sends it anew); what disagreed"
                ),
                why,
            ))
        })?;
        let problem = match keys {
            Some(keys) => signature_problem(keys, r),
            None => form_problem(r),
        };
        if let Some(why) = problem {
            // Taken, it would complete the task here and be refused at the registry, where
            // the acknowledgement would end dead-lettered; refused, the part is closed again
            // for a new receipt until the recipient signs one.
            return Err(Failure::Retry(Said::quoting(
                format!("the receipt of {to} is not one the registry takes"),
                format!("it {why}"),
            )));
        }
    }
    Ok(receipt)
}

/// What the registry refuses in any receipt, whatever keys it holds: a signature that is not
/// 64 bytes with a key id of the form `sha256:<hex>` (or absent with no key id), or a
/// `received_at` finer than the milliseconds the signed body holds.
fn form_problem(r: &TransferReceipt) -> Option<String> {
    use dsrelay_runtime::transfer_receipt::{received_in_whole_ms, signature_well_formed};
    if !signature_well_formed(r) {
        return Some(format!(
            "has a signature of {} bytes with key id {:?}, not 64 bytes with a key id \
             `sha256:` and 64 lowercase hex digits",
            r.signature.len(),
            r.key_id
        ));
    }
    match &r.received_at {
        Some(t) if !received_in_whole_ms(r) => Some(format!(
            "is dated {}.{:09} s, not in whole milliseconds",
            t.seconds, t.nanos
        )),
        _ => None,
    }
}

/// The ring of the keys the registry sent for a recipient (base64, checked at delivery);
/// `None` for none.
fn receipt_keys(keys: &[String]) -> anyhow::Result<Option<KeyRing>> {
    let mut keys = keys.iter().map(|k| PublicKey::parse(k));
    let Some(current) = keys.next() else {
        return Ok(None);
    };
    KeyRing::new(current?, keys.collect::<anyhow::Result<_>>()?).map(Some)
}

/// Why the registry, holding `keys` for the recipient, would refuse receipt `r`: unsigned, or
/// signed with one of `keys` and not over its fields. A receipt signed with another key is let
/// through: the recipient may have rotated its key after the registry sent these, and the
/// registry checks it against the keys it holds then.
fn signature_problem(keys: &KeyRing, r: &TransferReceipt) -> Option<String> {
    if let Some(why) = form_problem(r) {
        return Some(why);
    }
    // Well formed (above), a signature comes with a key id.
    if !r.signature.is_empty() && !keys.holds(&r.key_id) {
        tracing::warn!(
            request_id = %r.request_id,
            key_id = %r.key_id,
            "a receipt is signed with a key the registry did not send; the registry checks it"
        );
        return None;
    }
    dsrelay_runtime::transfer_receipt::verify(r, keys).err()
}

/// Fails with [`Failure::Cancelled`] when `job`'s export goes to a recipient and its task no
/// longer waits for it: marked cancelled (the Cancel came while the export was on its way),
/// or ended. One keyed read of the task in the store, so a Cancel any replica took counts.
/// A return to the registry goes on: the data goes back to the controller that cancelled,
/// and most of it is usually there already (`crate::head_start`).
async fn still_wanted(shared: &Shared, job: &UploadJob, sink: &Sink<'_>) -> Result<(), Failure> {
    if matches!(sink, Sink::Registry(_)) {
        return Ok(());
    }
    match shared.store.task(&job.key).await {
        Ok(Some(t)) if t.state == TaskState::InProgress && t.cancel_requested_at.is_none() => {
            Ok(())
        }
        Ok(_) => Err(Failure::Cancelled),
        Err(e) => Err(Failure::Retry(Said::ours(format!(
            "reading whether the task was cancelled before sending more to {}: {e:#}",
            sink.destination()
        )))),
    }
}

/// One file of an export on its way: where it is read from, and its header.
struct Outgoing<'a> {
    dir: &'a Path,
    f: &'a ExportedFile,
    header: &'a ExportFileHeader,
}

/// Sends one file of `job`'s export unless the destination holds it whole already (asking
/// with `timeout`); the caller keeps the upload's lease meanwhile. At a recipient the file
/// does not start once the task was found cancelled, by this file's look at the store or an
/// earlier one's (`stopped`). A file the destination holds part of (resumed), or takes whole
/// from its start, is the attempt getting through: the first says so ([`under_way`]).
async fn deliver_file(
    shared: &Shared,
    job: &UploadJob,
    sink: &Sink<'_>,
    file: Outgoing<'_>,
    timeout: Duration,
    (stopped, attempt): (&AtomicBool, &UnderWay),
) -> Result<(), Failure> {
    let Outgoing { dir, f, header } = file;
    if stopped.load(Ordering::Relaxed) {
        return Err(Failure::Cancelled);
    }
    if let Err(e) = still_wanted(shared, job, sink).await {
        if matches!(e, Failure::Cancelled) {
            stopped.store(true, Ordering::Relaxed);
        }
        return Err(e);
    }
    let cfg = &shared.config.uploads;
    let state = sink
        .state(header, timeout)
        .await
        .map_err(|s| refused(sink.destination(), "asking the state", &s))?;
    // A file the destination holds whole was checked there against its SHA-256; the others
    // are checked here as they are read for sending.
    if !state.complete {
        if state.offset > 0 {
            under_way(shared, job, sink, attempt, (&f.name, state.offset)).await;
        }
        let path = dir.join(&f.name);
        send_file(sink, &path, header, state.offset, cfg.stall_ms, timeout).await?;
        if state.offset == 0 {
            under_way(shared, job, sink, attempt, (&f.name, 0)).await;
        }
        shared.metrics.export_sent(
            &job.key.subprocessor,
            false,
            f.size.saturating_sub(state.offset),
        );
    }
    Ok(())
}

/// Replaces the note of an earlier attempt's failure, once per attempt, with one saying this
/// attempt got through (`file` from byte `from`): a slow destination taking a large export
/// for minutes otherwise showed the last failure, and when the next attempt would come,
/// until the part was closed. Decided on the task as it stands, recorded while this claim
/// holds the upload; a note that cannot be written is logged, and the delivery goes on.
async fn under_way(
    shared: &Shared,
    job: &UploadJob,
    sink: &Sink<'_>,
    attempt: &UnderWay,
    (file, from): (&str, u64),
) {
    if attempt.said.swap(true, Ordering::Relaxed) {
        return;
    }
    let recorded = async {
        let Some(task) = shared.store.task(&job.key).await? else {
            return Ok(None);
        };
        let event = Event::DeliveryUnderWay {
            to: sink.destination(),
            files: job.files.len(),
            bytes: job.files.iter().map(|f| f.size).sum(),
            attempt: job.attempts,
            since: attempt.since,
            file,
            from,
        };
        let now = shared.clock.now_ms();
        let Decision::Move(t) = decide(&task.current(), event, &Context::at(now)) else {
            return Ok(None);
        };
        (shared.store)
            .upload_under_way(job.claim(), task.sequence, &t, now, task.attempts)
            .await
    };
    match recorded.await {
        Ok(Some(_)) => shared.ack_wakeup.notify_one(),
        Ok(None) => {}
        Err(e) => tracing::warn!(
            error = format!("{e:#}"),
            "noting that a delivery got through failed; the earlier failure's note stands"
        ),
    }
}

/// This sender's lease on its upload while the files are sent ([`UploadLease::keep`]).
struct UploadLease<'a> {
    shared: &'a Shared,
    job: &'a UploadJob,
    clock: LeaseClock,
}

impl<'a> UploadLease<'a> {
    fn new(shared: &'a Shared, job: &'a UploadJob) -> Self {
        Self {
            shared,
            job,
            clock: LeaseClock::new(job.claimed_at, shared.config.uploads.lease_ms),
        }
    }

    /// Renews the lease every third of `uploads.lease_ms` for as long as it is awaited;
    /// resolves only when the lease is lost, with the attempt's failure.
    async fn keep(&mut self) -> Failure {
        loop {
            tokio::time::sleep(self.clock.every()).await;
            if let Err(lost) = self.renew().await {
                return lost;
            }
        }
    }

    /// Extends the lease by `uploads.lease_ms` from now (the database's clock). A renewal
    /// that finds the lease no longer this claim's loses it at once: another claim took the
    /// upload (that sender goes on, and what this one would record changes nothing), or
    /// the lease ran out and a cancellation may have read the upload as idle; the store
    /// revives no ended lease. A renewal that fails (the database unreachable) is tried
    /// again at the next one while the lease lasts, as the runner keeps a task's: a
    /// moment's outage should not throw away a large file half sent. Once the failures
    /// would outlast the lease the sender cannot tell it still holds the upload, so it
    /// stops as if it knew it did not.
    async fn renew(&mut self) -> Result<(), Failure> {
        let lease_ms = self.shared.config.uploads.lease_ms as i64;
        let extend = self
            .shared
            .store
            .extend_upload_lease(self.job.claim(), lease_ms);
        match self.clock.renew(extend).await {
            Renewal::Held => Ok(()),
            Renewal::Lost => Err(Failure::Retry(Said::ours(
                "another sender took this export over, or a cancellation found it idle: this \
                 sender's lease ran out while it sent",
            ))),
            Renewal::RanOut(e) => Err(Failure::Retry(Said::ours(format!(
                "renewing the export's lease failed until it ran out: {e:#}"
            )))),
            Renewal::Failed(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "renewing an upload's lease failed; tried again while the lease lasts"
                );
                Ok(())
            }
        }
    }
}

/// Renews the upload's lease, or fails the attempt (to be retried) when the lease is no
/// longer this sender's or cannot be renewed.
async fn hold_lease(shared: &Shared, job: &UploadJob) -> Result<(), Failure> {
    let lease_ms = shared.config.uploads.lease_ms as i64;
    match shared
        .store
        .extend_upload_lease(job.claim(), lease_ms)
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err(Failure::Retry(Said::ours(
            "this sender's lease on the export ran out before the part was closed",
        ))),
        Err(e) => Err(Failure::Retry(Said::ours(format!(
            "renewing the export's lease before closing the part: {e:#}"
        )))),
    }
}

/// Whether `r` is the receipt for exactly the part `headers` describe, from the recipient it
/// was sent to: same request and subprocessor, naming `recipient` (the registry's
/// `[[recipients]]` name, which the controller is shown as the one holding the data), the
/// canonical manifest digest computed here, and the same bytes and files. A receipt naming
/// a sender must name `sender`, this processor's certificate identity: subprocessor names
/// are unique only within a processor, and the registry refuses an acknowledgement whose
/// receipt names another. An empty sender (a recipient written before senders were named)
/// is taken.
fn check_receipt(
    key: &TaskKey,
    recipient: &str,
    sender: &str,
    headers: &[ExportFileHeader],
    r: &TransferReceipt,
) -> Result<(), String> {
    let manifest =
        dsrelay_runtime::transfer_manifest::sha256(&key.request_id, &key.subprocessor, headers);
    let bytes: u64 = headers.iter().map(|h| h.size).sum();
    let mut wrong = Vec::new();
    if r.request_id != key.request_id || r.subprocessor != key.subprocessor {
        wrong.push(format!(
            "it is for request {} at {}",
            r.request_id, r.subprocessor
        ));
    }
    if r.recipient != recipient {
        wrong.push(format!(
            "it names recipient {:?}, sent to {recipient:?}",
            r.recipient
        ));
    }
    if dsrelay_runtime::transfer_receipt::names_other_sender(r, Some(sender)) {
        wrong.push(format!(
            "it names sender {:?}, sent by {sender:?}",
            r.sender
        ));
    }
    if r.manifest_sha256 != manifest {
        wrong.push(format!(
            "manifest SHA-256 {}, expected {manifest}",
            r.manifest_sha256
        ));
    }
    if r.bytes != bytes {
        wrong.push(format!("{} bytes, expected {bytes}", r.bytes));
    }
    if r.files as usize != headers.len() {
        wrong.push(format!("{} file(s), expected {}", r.files, headers.len()));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

/// The header the destination gets for `f` (a file still being written has no size or
/// digest yet, and its header none either).
pub(crate) fn header(key: &TaskKey, f: &ExportedFile) -> ExportFileHeader {
    ExportFileHeader {
        request_id: key.request_id.clone(),
        subprocessor: key.subprocessor.clone(),
        name: f.name.clone(),
        media_type: f.media_type.clone(),
        categories: f.categories.clone(),
        size: f.size,
        sha256: f.sha256.clone(),
    }
}

/// The size and SHA-256 of a file read so far, to check it is still the one the connector
/// wrote.
#[derive(Default)]
struct Reading {
    hasher: Sha256,
    bytes: u64,
    /// The whole file was read.
    to_end: bool,
    /// Reading failed: the check cannot be made this time.
    failed: bool,
    /// When the transport last asked for a message of the file (`None`: not yet).
    moved_at: Option<Instant>,
}

impl Reading {
    /// Once the whole file was read: whether it still has the size and SHA-256 the connector
    /// wrote. `None` while that cannot be known.
    fn changed(&self, f: &ExportedFile) -> Option<Failure> {
        if !self.to_end || self.failed {
            return None;
        }
        let digest = hex::encode(self.hasher.clone().finalize());
        (self.bytes != f.size || digest != f.sha256).then(|| {
            Failure::Undeliverable(Said::ours(format!(
                "export file {} changed at the processor: {} bytes with SHA-256 {digest}, \
                 written as {} bytes with SHA-256 {}",
                f.name, self.bytes, f.size, f.sha256
            )))
        })
    }
}

async fn open(path: &Path, f: &ExportedFile) -> Result<tokio::fs::File, Failure> {
    tokio::fs::File::open(path).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Failure::Undeliverable(Said::ours(format!(
                "export file {} vanished from the processor's data folder",
                f.name
            )))
        } else {
            Failure::Retry(Said::ours(format!("opening export file {}: {e}", f.name)))
        }
    })
}

/// Streams the file at `path` from `offset` to its end, in chunks of [`CHUNK`] bytes with
/// their checksums; the first message carries the header. The whole file is hashed on the way
/// (the part before `offset` first), so a file that changed since the connector wrote it
/// fails the task instead of being retried: it is read once per attempt, not twice. The send
/// fails when the destination takes no chunk, or does not answer after the last, for
/// `idle_ms`: a slow link's file goes on for as long as it moves, a stuck one holds the
/// upload no longer. A send the destination ends with an error is followed by one state
/// call (`timeout`), so the failure says how much of the file it holds.
async fn send_file(
    sink: &Sink<'_>,
    path: &Path,
    header: &ExportFileHeader,
    offset: u64,
    idle_ms: u64,
    timeout: Duration,
) -> Result<(), Failure> {
    let meta = ExportedFile {
        name: header.name.clone(),
        media_type: String::new(),
        categories: Vec::new(),
        size: header.size,
        sha256: header.sha256.clone(),
    };
    let read_error = |e: std::io::Error| {
        Failure::Retry(Said::ours(format!(
            "reading export file {}: {e}",
            header.name
        )))
    };
    let mut file = open(path, &meta).await?;
    let mut reading = Reading::default();
    // The part the destination holds already is hashed, not sent.
    let mut buf = vec![0u8; CHUNK];
    while reading.bytes < offset {
        let want = (offset - reading.bytes).min(CHUNK as u64) as usize;
        let n = file.read(&mut buf[..want]).await.map_err(read_error)?;
        if n == 0 {
            break;
        }
        reading.hasher.update(&buf[..n]);
        reading.bytes += n as u64;
    }
    if reading.bytes < offset {
        // Shorter than what the destination holds: it changed.
        reading.to_end = true;
        return Err(reading.changed(&meta).unwrap_or_else(|| {
            Failure::Undeliverable(Said::ours(format!(
                "export file {} shrank at the processor",
                header.name
            )))
        }));
    }
    drop(buf);
    let reading = Arc::new(std::sync::Mutex::new(reading));
    let first = Some(header.clone());
    let chunks = futures::stream::unfold(
        (file, offset, first, false, reading.clone()),
        |(mut file, offset, header, done, reading)| async move {
            // Asked for the next message: the transport has room, the destination moves.
            reading.lock().unwrap_or_else(|p| p.into_inner()).moved_at = Some(Instant::now());
            if done {
                return None;
            }
            let mut data = vec![0u8; CHUNK];
            let mut filled = 0;
            let mut to_end = false;
            while filled < CHUNK {
                match file.read(&mut data[filled..]).await {
                    Ok(0) => {
                        to_end = true;
                        break;
                    }
                    Ok(n) => filled += n,
                    // The stream ends short; the destination's answer says where it stopped and
                    // the next attempt reads the file again.
                    Err(_) => {
                        reading.lock().unwrap_or_else(|p| p.into_inner()).failed = true;
                        break;
                    }
                }
            }
            data.truncate(filled);
            {
                let mut r = reading.lock().unwrap_or_else(|p| p.into_inner());
                r.hasher.update(&data);
                r.bytes += filled as u64;
                r.to_end |= to_end;
            }
            if filled == 0 && header.is_none() {
                return None;
            }
            let chunk = UploadFileChunk {
                header,
                offset,
                chunk_crc32: dsrelay_runtime::export_files::chunk_crc32(&data),
                data: data.into(),
                ..Default::default()
            };
            let next = offset + filled as u64;
            Some((chunk, (file, next, None, filled == 0, reading)))
        },
    );
    let to = sink.destination();
    let idle = Duration::from_millis(idle_ms);
    let started = Instant::now();
    let moved_at = || {
        reading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .moved_at
            .unwrap_or(started)
    };
    let send = sink.send(chunks);
    tokio::pin!(send);
    let sent = loop {
        let moved = moved_at();
        tokio::select! {
            sent = &mut send => break Some(sent),
            () = tokio::time::sleep_until((moved + idle).into()) => {
                if moved_at() == moved {
                    // Dropping the call ends the stream; the destination keeps what it took.
                    break None;
                }
            }
        }
    };
    // A file that changed is the reason, whatever the destination made of it.
    let changed = reading
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .changed(&meta);
    if let Some(changed) = changed {
        return Err(changed);
    }
    let Some(sent) = sent else {
        return Err(Failure::Retry(Said::ours(format!(
            "{to} took no more of {} for {idle_ms} ms (uploads.stall_ms); the next attempt \
             resumes where it stands",
            header.name
        ))));
    };
    let state = match sent {
        Ok(state) => state,
        Err(s) => {
            // Where the stream began is not where it broke: the destination's own count says
            // what this attempt left there, and the next resumes from it.
            let stored = match sink.state(header, timeout).await {
                Ok(now) if now.complete => "stored whole".to_string(),
                Ok(now) => format!("{} bytes stored", now.offset),
                Err(_) => {
                    let read = reading.lock().unwrap_or_else(|p| p.into_inner()).bytes;
                    format!("sent up to byte {read}, how much was stored unknown")
                }
            };
            let doing = format!("sending {} (from byte {offset}; {stored})", header.name);
            return Err(refused(to, &doing, &s));
        }
    };
    if !state.complete {
        return Err(Failure::Retry(Said::ours(format!(
            "{to} holds {} of {} bytes of {} after sending it",
            state.offset, header.size, header.name
        ))));
    }
    Ok(())
}

/// What a refusal by the destination means for the export: input it will never take, or a
/// request it does not know us for, fails the task; anything else (FAILED_PRECONDITION
/// included) is tried again, until the due date.
fn refused(to: Destination<'_>, doing: &str, s: &tonic::Status) -> Failure {
    let error = Said::about_status(format!("{doing} at {to}: {:?}", s.code()), s);
    match s.code() {
        Code::InvalidArgument | Code::NotFound | Code::PermissionDenied => {
            Failure::Undeliverable(error)
        }
        _ => Failure::Retry(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sending processor's certificate identity.
    const ME: &str = "spiffe://example.org/processor/payroll-bureau";

    fn key() -> TaskKey {
        TaskKey {
            controller: "controller".into(),
            request_id: "r1".into(),
            subprocessor: "accounting".into(),
        }
    }

    fn sent() -> Vec<ExportFileHeader> {
        let f = |name: &str, size| ExportFileHeader {
            request_id: "r1".into(),
            subprocessor: "accounting".into(),
            name: name.into(),
            media_type: "application/json".into(),
            categories: vec!["contact".into()],
            size,
            sha256: "ab".repeat(32),
        };
        vec![f("a.json", 10), f("b.json", 20)]
    }

    fn receipt() -> TransferReceipt {
        TransferReceipt {
            request_id: "r1".into(),
            subprocessor: "accounting".into(),
            manifest_sha256: dsrelay_runtime::transfer_manifest::sha256(
                "r1",
                "accounting",
                &sent(),
            ),
            bytes: 30,
            files: 2,
            received_at: None,
            recipient: "new-bookkeeper".into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_receipt_for_exactly_the_files_sent_is_accepted() {
        let to = "new-bookkeeper";
        assert_eq!(check_receipt(&key(), to, ME, &sent(), &receipt()), Ok(()));
        // A receipt over other files (one left out here) is not proof of this part.
        let fewer = &sent()[..1];
        let why = check_receipt(&key(), to, ME, fewer, &receipt()).unwrap_err();
        assert!(why.contains("manifest SHA-256"), "{why}");
        assert!(why.contains("30 bytes, expected 10"), "{why}");
        assert!(why.contains("2 file(s), expected 1"), "{why}");
        let other = TransferReceipt {
            subprocessor: "newsletter".into(),
            ..receipt()
        };
        let why = check_receipt(&key(), to, ME, &sent(), &other).unwrap_err();
        assert_eq!(why, "it is for request r1 at newsletter");
    }

    #[test]
    fn a_receipt_naming_another_recipient_is_refused() {
        // The registry would show the controller this name as the one holding the data.
        let other = TransferReceipt {
            recipient: "someone-else entirely".into(),
            ..receipt()
        };
        let why = check_receipt(&key(), "new-bookkeeper", ME, &sent(), &other).unwrap_err();
        assert_eq!(
            why,
            "it names recipient \"someone-else entirely\", sent to \"new-bookkeeper\""
        );
    }

    #[test]
    fn a_receipt_naming_another_sender_is_refused_and_one_naming_none_taken() {
        // Another processor's receipt for a subprocessor of the same name would pass every
        // other check; the registry would refuse the acknowledgement carrying it.
        let other = TransferReceipt {
            sender: "spiffe://example.org/processor/other-bureau".into(),
            ..receipt()
        };
        let why = check_receipt(&key(), "new-bookkeeper", ME, &sent(), &other).unwrap_err();
        assert_eq!(
            why,
            format!(
                "it names sender \"spiffe://example.org/processor/other-bureau\", sent by {ME:?}"
            )
        );
        let ours = TransferReceipt {
            sender: ME.into(),
            ..receipt()
        };
        assert_eq!(
            check_receipt(&key(), "new-bookkeeper", ME, &sent(), &ours),
            Ok(())
        );
        // A recipient written before receipts named their sender.
        assert_eq!(receipt().sender, "");
        assert_eq!(
            check_receipt(&key(), "new-bookkeeper", ME, &sent(), &receipt()),
            Ok(())
        );
    }

    /// What the registry would refuse is refused here, where the part can still be closed
    /// again for a new receipt; a key the registry did not send is left to the registry.
    #[test]
    fn a_receipt_the_registry_would_refuse_for_its_signature_is_refused() {
        use dsrelay_runtime::signing::SigningKey;
        use dsrelay_runtime::transfer_receipt::sign;
        let (old, new, stranger) = (
            SigningKey::generate(),
            SigningKey::generate(),
            SigningKey::generate(),
        );
        let sent_keys = [new.public_key().to_base64(), old.public_key().to_base64()];
        let ring = receipt_keys(&sent_keys).unwrap().expect("keys were sent");
        assert_eq!(receipt_keys(&[]).unwrap(), None);

        assert_eq!(
            signature_problem(&ring, &sign(receipt(), &new).unwrap()),
            None
        );
        assert_eq!(
            signature_problem(&ring, &sign(receipt(), &old).unwrap()),
            None
        );
        let why = signature_problem(&ring, &receipt()).expect("unsigned");
        assert_eq!(why, "is not signed by the recipient");
        let changed = TransferReceipt {
            bytes: 31,
            ..sign(receipt(), &new).unwrap()
        };
        let why = signature_problem(&ring, &changed).expect("changed since signed");
        assert_eq!(why, "has a signature that does not match its fields");
        let garbled = TransferReceipt {
            key_id: "not a key id".into(),
            ..sign(receipt(), &new).unwrap()
        };
        let why = signature_problem(&ring, &garbled).expect("a key id of no key");
        assert!(
            why.starts_with("has a signature of 64 bytes with key id"),
            "{why}"
        );
        // What the registry refuses whatever its keys is refused without keys too.
        assert_eq!(form_problem(&receipt()), None);
        assert_eq!(form_problem(&sign(receipt(), &stranger).unwrap()), None);
        let cut = TransferReceipt {
            signature: vec![7; 63],
            ..sign(receipt(), &new).unwrap()
        };
        assert!(form_problem(&cut).is_some());
        let fine_grained = TransferReceipt {
            received_at: Some(dsrelay_proto::prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 1,
            }),
            ..receipt()
        };
        assert_eq!(
            form_problem(&fine_grained).as_deref(),
            Some("is dated 1700000000.000000001 s, not in whole milliseconds")
        );
        // Rotated after the registry sent the keys: the registry, holding the new key by
        // then, decides.
        assert_eq!(
            signature_problem(&ring, &sign(receipt(), &stranger).unwrap()),
            None
        );
    }
}

#[cfg(test)]
#[path = "upload_lease_tests.rs"]
mod lease_tests;
