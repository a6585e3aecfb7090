//! A subprocessor reached through the adapter API (`dsrelay.v1.SubprocessorAdapter`, see
//! `proto/dsrelay/v1/adapter.proto`) over mutual TLS: the way to connect a holder written in
//! any language, or a shim in front of a SaaS system.
//!
//! # Calls
//! - [`Phase::Start`]: `Execute` with the task's id as the adapter's idempotency key, so a
//!   retry after a lost answer does the work once.
//! - [`Phase::Confirm`]: `GetTaskStatus` with the handle, which is the `task_id` that the
//!   accepted `Execute` carried.
//! - [`Phase::RetentionExpired`]: `Execute` again under the key
//!   `<task_id>#retention-expired-<retain-until ms>` (`RETENTION_EXPIRED_SUFFIX`). A new key
//!   is needed because the adapter answers a repeated key with the first outcome (RETAINED);
//!   the suffix keeps the key stable across retries of this run, so the erasure of the rest
//!   is still done once, and the date gives a later stage of kept data a run of its own.
//!   The adapter sees a new task with the same `request_id`. If it answers RETAINED with a
//!   date that has already passed (it keeps data past its own date, or replayed its first
//!   answer), at once or when the run it ACCEPTED is confirmed ([`Phase::Confirm`] with this
//!   key), the task fails for an operator instead of being re-run in a loop.
//!   NOT_FOUND there means nothing was left to erase: the task COMPLETES with no records,
//!   as the SQL connector's does, rather than ending NOT_FOUND after its first run found
//!   the subject. The same holds when the run was ACCEPTED and NOT_FOUND comes at
//!   [`Phase::Confirm`], which knows the run only by its handle, this key.
//!
//! # Supported kinds
//! `supported_kinds` in the configuration wins. Without it the adapter's `Describe` is asked
//! once, lazily on the first task (never at start, so a subprocessor that is down for hours
//! does not block the processor), and the answer is cached. A transient Describe failure is
//! not cached (asked again on the next task); any other failure, or an empty list, is cached
//! as "unknown" and every kind is then passed on to `Execute`, which answers for itself.
//!
//! # Exports
//! A RETURN_OF_DATA or TRANSFER answered COMPLETED becomes `export.json` in the task's folder,
//! in one of two forms:
//! - `export_paged` (wins when set): the records are fetched with `GetExportPage` under the
//!   key the answer was given under, one page of at most 1 MiB (`EXPORT_PAGE_BYTES`) at a
//!   time, and each record, checked to be one JSON value in UTF-8, is appended to a JSON array
//!   streamed to the file. What is held is one page, whatever the size of the export. A page
//!   that fails transiently is asked again (same token) up to `PAGE_RETRIES` times before
//!   the error is passed on, except ABORTED (the token expired), passed on at once; the
//!   processor then re-runs the step after its backoff into an emptied folder: `Execute`, or
//!   `GetTaskStatus` for a task the adapter ACCEPTED, and the first page. A page larger than
//!   asked, a record that is not JSON, an empty page that is not the last, a token answered
//!   with itself, or an export beyond `MAX_EXPORT_PAGES` pages or `MAX_EXPORT_BYTES` bytes
//!   are permanent errors, and so is an export of no record from an answer whose
//!   `records_affected` is above 0 (the subject would be sent an empty file).
//! - `export_json` (adapters that answer inline): one JSON value in the answer itself, so at
//!   most the 16 MiB this connector decodes; checked to be JSON in UTF-8 and written as it
//!   came. `null`, `[]` or `{}` from an answer whose `records_affected` is above 0 is a
//!   permanent error.
//!
//! # Controllers
//! Every `Execute` carries the task's `controller`, and the adapter scopes itself by it. The
//! optional `controllers` list of the configuration tells the processor which controllers the
//! adapter holds data of: work for any other is REFUSED without a call. Without it the
//! adapter is unscoped and [`Connector::scoped_controllers`] is `None`.
//!
//! # Contract ends
//! [`Connector::run_bulk`] calls `ExecuteBulk` (see `bulk`): under the job's id at
//! [`Phase::Start`], under `<job_id>#retention-expired-<retain-until ms>` at
//! [`Phase::RetentionExpired`], and
//! `GetBulkStatus` with the handle at [`Phase::Confirm`]. Each answer's `progress` is
//! reported to the processor, its counts by place (`BulkJobProgress.erased`) with it; the
//! erased counts of an erasure's start answer, the whole job's, are given as what they list
//! beyond the counts recorded before the call ([`crate::BulkJob::beyond_recorded`]), which
//! the processor adds to them. An adapter whose step takes longer than `timeout_ms` answers
//! ACCEPTED and is asked again later. A completed export is fetched with `GetExportPage`
//! under the key it was answered for, exactly as a paged RETURN_OF_DATA export, into
//! `export.json` (an empty array when the answer has no `export_paged`); its progress is
//! reported only once the file holds at least one record per subject the answer counts as
//! done, and fewer is a permanent error: the counts would be taken as returned, and the
//! erasure checked against them would erase data nobody received. A COMPLETED answer whose
//! progress has a done count other than its total (a total above 0) and a negative erased
//! count are permanent errors too. A retention run's
//! NOT_FOUND, at once or at the confirmation of its key, completes the step with no records,
//! and its RETAINED with a date already past fails the step for an operator, as a single
//! task's do. A RETAINED date must lie between the years 2000 and 9999 here too. The
//! erasure that follows a return carries the export's progress (`returned`,
//! [`crate::BulkJob::returned`]): the adapter checks it before erasing and answers
//! FAILED_PRECONDITION, a permanent error here, when data arrived after the export: an
//! adapter comparing totals lets an arrival offset by a deletion pass, one keeping a snapshot
//! with its export (the example adapter) refuses it.
//!
//! # Outcomes and errors
//! COMPLETED, NOT_FOUND, RETAINED, ACCEPTED and REFUSED map to the [`Outcome`] of the same
//! name; FAILED, UNSPECIFIED and malformed answers (invalid export JSON, RETAINED without a
//! legal basis or date, an answer that does not decode as the method's message) are
//! permanent errors. gRPC UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, errors
//! raised by the transport itself (connection refused, TLS failures, resets) and calls
//! exceeding `timeout_ms` (whether tonic's client deadline or this connector's timer ends
//! them, said as no answer within the configured timeout_ms) are transient; every other
//! status is permanent and reported with its code and message.
//!
//! # Tracing
//! Every call is built by `AdapterConnector::outgoing`, which sets the deadline and injects
//! the current span's W3C trace context, so that the adapter's spans join the task's trace.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use dsrelay_proto::tonic::transport::Uri;
use dsrelay_proto::tonic::{self, Code, Status};
use dsrelay_proto::v1::subprocessor_adapter_client::SubprocessorAdapterClient;
use dsrelay_proto::v1::{
    DescribeRequest, ExecuteOutcome, ExecuteRequest, ExecuteResponse, ExportPage,
    GetExportPageRequest, GetTaskStatusRequest, RequestKind, Scope,
};
use dsrelay_proto::{millis_from_timestamp, timestamp_from_millis};
use dsrelay_runtime::config::{check_ms, MAX_DURATION_MS};
use dsrelay_runtime::grpc::timed_out;
use dsrelay_runtime::tls::{LiveTls, ReloadingChannel, TlsFiles};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::export::{JsonArrayWriter, JSON};
use crate::{
    kind_label, BoxFuture, BulkJob, Connector, ConnectorError, ExportSink, ExportedFile, Outcome,
    Phase, Task,
};

mod bulk;

#[cfg(test)]
mod answer_tests;

/// Appended to the task id to form the idempotency key of the [`Phase::RetentionExpired`]
/// call.
const RETENTION_EXPIRED_SUFFIX: &str = "#retention-expired";

/// The default deadline of one call (ms).
const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// The longest deadline accepted (ms) of one call to a holder, here and at Mailchimp: a call
/// must end well within the processor's task lease.
pub(crate) const MAX_TIMEOUT_MS: u64 = 300_000;

/// Largest answer accepted: a 16 MiB inline export plus room for the rest of the answer.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024 + 64 * 1024;

/// The `max_bytes` asked of every export page: what is held of a paged export at a time.
const EXPORT_PAGE_BYTES: u32 = 1024 * 1024;

/// A paged export of more pages than this is refused: an adapter that never ends is a bug.
const MAX_EXPORT_PAGES: u64 = 1_000_000;

/// A paged export of more bytes than this is refused (64 GiB), before it fills the disk.
const MAX_EXPORT_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// How many times a page that failed transiently is asked again before the error is passed
/// on (the delay grows by `PAGE_RETRY_DELAY` each time).
const PAGE_RETRIES: u32 = 3;

/// See [`PAGE_RETRIES`].
const PAGE_RETRY_DELAY: Duration = Duration::from_millis(200);

/// Notes and reasons are cut to this many bytes, the limit of the acknowledgement fields.
const MAX_TEXT: usize = 4096;

/// The configuration of one adapter subprocessor (everything after `type = "adapter"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// Where the adapter listens: `https://host:port`.
    pub endpoint: String,
    /// The certificate identity the adapter must present (its URI SAN, e.g.
    /// `spiffe://dsrelay.dev/adapter/example`); any other server is refused.
    pub identity: String,
    /// The processor's own client certificate and key, and the CA the adapter's certificate
    /// must chain to.
    pub tls: TlsFiles,
    /// Deadline of one call (ms), 1 to 300000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The request kinds the adapter supports (`erasure`, `return_of_data`, `transfer`,
    /// `rectification`, `restriction`, `objection`, `contract_end`). When absent the
    /// adapter's Describe is asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported_kinds: Option<Vec<String>>,
    /// The controllers (the processor's names for them, `ControllerConfig.name`) whose data
    /// the adapter holds separately, each scoped by the adapter itself from the `controller`
    /// it is sent. A task or contract end of a controller not listed is refused without a
    /// call. Absent: the adapter is not scoped, and its data belongs to whichever controller
    /// asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controllers: Option<Vec<String>>,
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

/// The request kind named `name` (`erasure`, `RETURN_OF_DATA`, `return-of-data`, ...), if it
/// is a real kind.
fn parse_kind(name: &str) -> Option<RequestKind> {
    let upper = name.trim().to_ascii_uppercase().replace('-', "_");
    let bare = upper.strip_prefix("REQUEST_KIND_").unwrap_or(&upper);
    RequestKind::from_str_name(&format!("REQUEST_KIND_{bare}"))
        .filter(|k| *k != RequestKind::Unspecified)
}

impl AdapterConfig {
    /// Every problem with the configuration; empty when usable. The TLS files are looked at
    /// too (there, readable, PEM of their kind), so that a wrong one is reported with the
    /// processor's other settings rather than failing [`build`](crate::build) after the
    /// start; whether the key matches the certificate is left to `build`.
    pub fn validate(&self) -> Vec<String> {
        let mut out = Vec::new();
        match self.endpoint.parse::<Uri>() {
            Ok(uri) if uri.scheme_str() == Some("https") && uri.host().is_some() => {}
            _ => out.push(format!(
                "endpoint: {:?} must be https://host:port",
                self.endpoint
            )),
        }
        if self.identity.trim().is_empty() {
            out.push(
                "identity: the adapter's certificate identity is required (e.g. \
                 spiffe://dsrelay.dev/adapter/example)"
                    .to_string(),
            );
        }
        check_ms(&mut out, "timeout_ms", self.timeout_ms, 1..=MAX_TIMEOUT_MS);
        // Bounded as the service's own `[tls]` is, so the one range documented for both holds.
        check_ms(
            &mut out,
            "tls.reload_interval_ms",
            self.tls.reload_interval_ms,
            0..=MAX_DURATION_MS,
        );
        if let Some(controllers) = &self.controllers {
            if controllers.is_empty() {
                out.push(
                    "controllers: must not be empty (leave it out when the adapter is not \
                     scoped per controller)"
                        .to_string(),
                );
            }
            let mut seen = BTreeSet::new();
            for (i, name) in controllers.iter().enumerate() {
                if name.trim().is_empty() {
                    out.push(format!("controllers[{i}]: must not be empty"));
                } else if !seen.insert(name.as_str()) {
                    out.push(format!("controllers[{i}]: {name:?} is listed twice"));
                }
            }
        }
        if let Some(kinds) = &self.supported_kinds {
            if kinds.is_empty() {
                out.push(
                    "supported_kinds: must not be empty (leave it out to ask the adapter)"
                        .to_string(),
                );
            }
            for (i, k) in kinds.iter().enumerate() {
                if parse_kind(k).is_none() {
                    out.push(format!(
                        "supported_kinds[{i}]: {k:?} is not one of erasure, return_of_data, \
                         transfer, rectification, restriction, objection, contract_end"
                    ));
                }
            }
        }
        dsrelay_runtime::config::check_tls_files(&mut out, &self.tls);
        out
    }
}

/// See the module documentation.
pub(crate) struct AdapterConnector {
    endpoint: String,
    client: SubprocessorAdapterClient<ReloadingChannel>,
    /// Dropped with the connector, which ends the watcher that reloads the `tls` files.
    _tls_watch: tokio::sync::watch::Sender<bool>,
    timeout: Duration,
    /// From the configuration; `None` means ask Describe.
    configured: Option<BTreeSet<i32>>,
    /// Describe's answer once known; `None` inside means "unknown, let Execute answer".
    described: OnceCell<Option<BTreeSet<i32>>>,
    /// The `max_bytes` of each export page ([`EXPORT_PAGE_BYTES`]; smaller in tests).
    page_bytes: u32,
    /// The controllers the adapter scopes its data to; `None` when it does not.
    controllers: Option<BTreeSet<String>>,
}

impl std::fmt::Debug for AdapterConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterConnector")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("configured", &self.configured)
            .field("described", &self.described.get())
            .field("controllers", &self.controllers)
            .finish_non_exhaustive()
    }
}

impl AdapterConnector {
    /// Validates `config`, reads the TLS files and prepares a lazily connecting channel. Does
    /// not contact the adapter: a subprocessor that is down does not stop the processor.
    pub(crate) fn connect(config: &AdapterConfig) -> anyhow::Result<Self> {
        let problems = config.validate();
        if !problems.is_empty() {
            anyhow::bail!("invalid adapter configuration: {}", problems.join("; "));
        }
        let tls = LiveTls::load(&config.tls).context("loading the TLS files for the adapter")?;
        // Reloaded like the service's own files, so that a certificate replaced after the
        // adapter refused the old one is presented from the next call on.
        let watcher = tls
            .watcher()
            .context("watching the TLS files for the adapter")?;
        let (tls_watch, stop) = tokio::sync::watch::channel(false);
        tokio::spawn(watcher.run(stop));
        let channel = dsrelay_runtime::tls::reloading_channel(
            &config.endpoint,
            Some(config.identity.clone()),
            &tls,
        )?;
        let client = SubprocessorAdapterClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(dsrelay_runtime::server::MAX_MESSAGE_BYTES);
        let configured = config.supported_kinds.as_ref().map(|kinds| {
            kinds
                .iter()
                .filter_map(|k| parse_kind(k))
                .map(|k| k as i32)
                .collect()
        });
        Ok(Self {
            endpoint: config.endpoint.clone(),
            client,
            _tls_watch: tls_watch,
            timeout: Duration::from_millis(config.timeout_ms),
            configured,
            described: OnceCell::new(),
            page_bytes: EXPORT_PAGE_BYTES,
            controllers: config
                .controllers
                .as_ref()
                .map(|c| c.iter().cloned().collect()),
        })
    }

    /// The refusal of work for `controller` when the adapter is scoped and does not list it.
    fn refuse_controller(&self, controller: &str) -> Option<Outcome> {
        let listed = self.controllers.as_ref()?;
        if listed.contains(controller) {
            return None;
        }
        let names: Vec<&str> = listed.iter().map(String::as_str).collect();
        Some(Outcome::Refused {
            reason: format!(
                "the adapter at {} holds no data of controller {controller:?} (its \
                 controllers: {}); add it to controllers in the connector configuration",
                self.endpoint,
                names.join(", ")
            ),
        })
    }

    /// Wraps an outgoing message: the one place every call's metadata is set (the deadline
    /// and the W3C trace context).
    fn outgoing<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        // The adapter's spans join the task's trace.
        dsrelay_runtime::trace_context::inject_current(request.metadata_mut());
        request
    }

    /// Ends a call: a deadline overrun or a status becomes a [`ConnectorError`].
    fn finish<R>(
        &self,
        rpc: &str,
        result: Result<Result<tonic::Response<R>, Status>, tokio::time::error::Elapsed>,
    ) -> Result<R, ConnectorError> {
        let no_answer = || {
            ConnectorError::Transient(format!(
                "adapter {} at {}: no answer within the configured timeout_ms ({} ms)",
                rpc,
                self.endpoint,
                self.timeout.as_millis()
            ))
        };
        match result {
            Ok(Ok(response)) => Ok(response.into_inner()),
            // The deadline sent with the call is enforced by the client too, which usually
            // ends the call before the timer here does, as CANCELLED "Timeout expired".
            Ok(Err(status)) if timed_out(&status) => Err(no_answer()),
            Ok(Err(status)) => Err(status_error(rpc, &self.endpoint, &status)),
            Err(_) => Err(no_answer()),
        }
    }

    async fn execute(&self, task: &Task, task_id: &str) -> Result<ExecuteResponse, ConnectorError> {
        let mut client = self.client.clone();
        let request = self.outgoing(execute_request(task, task_id));
        let result = tokio::time::timeout(self.timeout, client.execute(request)).await;
        self.finish("Execute", result)
    }

    async fn task_status(&self, task_id: &str) -> Result<ExecuteResponse, ConnectorError> {
        let mut client = self.client.clone();
        let request = self.outgoing(GetTaskStatusRequest {
            task_id: task_id.to_string(),
        });
        let result = tokio::time::timeout(self.timeout, client.get_task_status(request)).await;
        self.finish("GetTaskStatus", result)
    }

    /// One page of the export of `task_id`; transient failures are asked again (the same
    /// token names the same page) up to [`PAGE_RETRIES`] times, except ABORTED, passed on at
    /// once.
    async fn export_page(&self, task_id: &str, token: &str) -> Result<ExportPage, ConnectorError> {
        let mut retries = 0;
        loop {
            let mut client = self.client.clone();
            let request = self.outgoing(GetExportPageRequest {
                task_id: task_id.to_string(),
                page_token: token.to_string(),
                max_bytes: self.page_bytes,
            });
            let result = tokio::time::timeout(self.timeout, client.get_export_page(request)).await;
            let code = code_of(&result);
            match self.finish("GetExportPage", result) {
                // ABORTED says the token expired (`adapter.proto`): asking it again cannot
                // succeed, and the export restarts from the step that answered it.
                Err(e) if e.is_transient() && code != Code::Aborted && retries < PAGE_RETRIES => {
                    retries += 1;
                    tracing::debug!(
                        endpoint = %self.endpoint,
                        ?code,
                        error = %e.logged(),
                        retries,
                        "export page asked again"
                    );
                    tokio::time::sleep(PAGE_RETRY_DELAY * retries).await;
                }
                other => return other,
            }
        }
    }

    /// Fetches the paged export of `task_id` page by page into `export.json`, a JSON array
    /// of its records, and returns the file with the number of records written. See the
    /// module documentation for what is refused.
    async fn write_paged_export(
        &self,
        sink: &ExportSink,
        task_id: &str,
    ) -> Result<(ExportedFile, u64), ConnectorError> {
        let file = sink.file("export.json", JSON).await?;
        let mut array = JsonArrayWriter::new(file).await?;
        let mut token = String::new();
        let mut pages: u64 = 0;
        loop {
            pages += 1;
            if pages > MAX_EXPORT_PAGES {
                return Err(ConnectorError::Permanent(format!(
                    "the adapter's export has more than {MAX_EXPORT_PAGES} pages"
                )));
            }
            let page = self.export_page(task_id, &token).await?;
            let size: usize = page.records.iter().map(Vec::len).sum();
            if size > self.page_bytes as usize {
                return Err(ConnectorError::Permanent(format!(
                    "the adapter's export page {pages} holds {size} bytes of records, more than \
                     the {} asked",
                    self.page_bytes
                )));
            }
            if page.records.is_empty() && !page.next_page_token.is_empty() {
                return Err(ConnectorError::Permanent(format!(
                    "the adapter's export page {pages} is empty but not the last"
                )));
            }
            for record in &page.records {
                check_json(record).map_err(|e| {
                    ConnectorError::Permanent(format!(
                        "record {} of the adapter's export is not valid JSON: {e}",
                        array.count() + 1
                    ))
                })?;
                array.push_json(record).await?;
            }
            if array.size() > MAX_EXPORT_BYTES {
                return Err(ConnectorError::Permanent(format!(
                    "the adapter's export is larger than {MAX_EXPORT_BYTES} bytes"
                )));
            }
            if page.next_page_token.is_empty() {
                break;
            }
            if page.next_page_token == token {
                return Err(ConnectorError::Permanent(format!(
                    "the adapter answered page {pages} of its export with the same page token"
                )));
            }
            token = page.next_page_token;
        }
        let records = array.count();
        tracing::debug!(
            endpoint = %self.endpoint,
            pages,
            records,
            "paged export written"
        );
        Ok((array.finish().await?, records))
    }

    /// Turns an adapter's answer to `task` into an [`Outcome`], writing a completed export
    /// into the task's folder as `export.json` (paged or inline, see the module
    /// documentation). `handle` is the key the answer was given under.
    async fn complete(
        &self,
        task: &Task,
        handle: &str,
        mut response: ExecuteResponse,
    ) -> Result<Outcome, ConnectorError> {
        let inline = std::mem::take(&mut response.export_json);
        let paged = response.export_paged;
        let mut outcome = outcome_from_response(handle, response)?;
        if let Outcome::Completed {
            files,
            records_affected,
            ..
        } = &mut outcome
        {
            // Data the request did not ask for is not kept (nor fetched).
            if matches!(task.kind, RequestKind::ReturnOfData | RequestKind::Transfer) {
                let file = if paged {
                    let (file, written) =
                        self.write_paged_export(task.export_sink()?, handle).await?;
                    if written == 0 && *records_affected > 0 {
                        return Err(ConnectorError::Permanent(format!(
                            "the adapter completed {} with records_affected {} but its paged \
                             export holds no record; an empty export is not delivered for it",
                            kind_label(task.kind),
                            records_affected
                        )));
                    }
                    file
                } else {
                    write_export(task, &inline, *records_affected).await?
                };
                *files = vec![file];
            }
        }
        Ok(outcome)
    }

    /// Asks Describe; `Ok(None)` when the answer does not say (failed for good, or listed no
    /// kinds), `Err` when it may say later.
    async fn describe(&self) -> Result<Option<BTreeSet<i32>>, ConnectorError> {
        let mut client = self.client.clone();
        let request = self.outgoing(DescribeRequest {});
        let result = tokio::time::timeout(self.timeout, client.describe(request)).await;
        let code = code_of(&result);
        match self.finish("Describe", result) {
            Ok(d) => {
                let kinds: BTreeSet<i32> = d
                    .supported_kinds
                    .into_iter()
                    .filter(|k| *k != RequestKind::Unspecified as i32)
                    .collect();
                // The adapter's name for itself, from a call about no request: it cannot be
                // about a subject.
                tracing::info!(
                    endpoint = %self.endpoint,
                    adapter = %d.name,
                    kinds = kinds.len(),
                    "adapter described itself"
                );
                Ok((!kinds.is_empty()).then_some(kinds))
            }
            Err(e) if e.is_transient() => Err(e),
            Err(e) => {
                tracing::warn!(
                    endpoint = %self.endpoint,
                    ?code,
                    error = %e.logged(),
                    "adapter Describe failed; every kind is passed on to Execute"
                );
                Ok(None)
            }
        }
    }

    /// Whether Describe rules `kind` out. Unknown (or Describe unreachable) means no.
    async fn refused_by_describe(&self, kind: RequestKind) -> bool {
        if self.configured.is_some() {
            return false;
        }
        match self.described.get_or_try_init(|| self.describe()).await {
            Ok(Some(kinds)) => !kinds.contains(&(kind as i32)),
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(
                    endpoint = %self.endpoint,
                    error = %e.logged(),
                    "adapter Describe unavailable"
                );
                false
            }
        }
    }
}

impl Connector for AdapterConnector {
    fn kind_name(&self) -> &'static str {
        "adapter"
    }

    fn supports(&self, kind: RequestKind) -> bool {
        if kind == RequestKind::Unspecified {
            return false;
        }
        match (&self.configured, self.described.get()) {
            (Some(kinds), _) | (None, Some(Some(kinds))) => kinds.contains(&(kind as i32)),
            // Not asked yet (or unknown): `run` asks, and Execute answers for itself.
            _ => true,
        }
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(async move {
            if let Some(refusal) = self.refuse_controller(&task.controller) {
                return Ok(refusal);
            }
            match &task.phase {
                Phase::Start => {
                    if self.refused_by_describe(task.kind).await {
                        return Ok(Outcome::Refused {
                            reason: format!(
                                "the adapter at {} does not support {} (per its Describe)",
                                self.endpoint,
                                kind_label(task.kind)
                            ),
                        });
                    }
                    let response = self.execute(task, &task.task_id).await?;
                    self.complete(task, &task.task_id, response).await
                }
                Phase::Confirm { handle } => {
                    let response = self.task_status(handle).await?;
                    let outcome = self.complete(task, handle, response).await?;
                    if is_retention_run(&task.phase, &task.task_id) {
                        return Ok(nothing_left(not_past_its_date(outcome, task.now_ms)?));
                    }
                    Ok(outcome)
                }
                Phase::RetentionExpired { until_ms } => {
                    let key = retention_expired_key(&task.task_id, *until_ms);
                    let response = self.execute(task, &key).await?;
                    let outcome = outcome_from_response(&key, response)?;
                    Ok(nothing_left(not_past_its_date(outcome, task.now_ms)?))
                }
            }
        })
    }

    fn scopes_by_category(&self) -> bool {
        true
    }

    fn scoped_controllers(&self) -> Option<Vec<String>> {
        self.controllers
            .as_ref()
            .map(|c| c.iter().cloned().collect())
    }

    fn run_bulk<'a>(&'a self, job: &'a BulkJob) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        Box::pin(self.bulk(job))
    }
}

/// What an answer at a retention date means: NOT_FOUND there says nothing was left to erase
/// (as the SQL connector reads it), since the first run found data and kept some. Passed on
/// as NOT_FOUND, it would end the task as if the holder had never had any, losing the
/// evidence of the first run; it is COMPLETED with no records instead.
fn nothing_left(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::NotFound { note } => Outcome::Completed {
            records_affected: 0,
            note: clip(format!("nothing left to erase: {note}")),
            files: Vec::new(),
            erased: Vec::new(),
        },
        other => other,
    }
}

/// `outcome` of a retention run (at once or at the confirmation of its key), unless it is
/// RETAINED until a date already past at `now_ms`: the processor would wake the task at once
/// and replay the run, whose key the adapter answers with the same date, for ever.
fn not_past_its_date(outcome: Outcome, now_ms: i64) -> Result<Outcome, ConnectorError> {
    match outcome {
        Outcome::Retained { until_ms, .. } if until_ms <= now_ms => {
            Err(ConnectorError::Permanent(format!(
                "the adapter still retains data after its retain-until date ({until_ms} ms \
                 since the epoch); an operator must check it"
            )))
        }
        other => Ok(other),
    }
}

/// The idempotency key of the [`Phase::RetentionExpired`] call for `task_id` at the
/// retain-until date `until_ms`: the same for every retry of that run, another for the run
/// at a later date when data was kept in stages (the adapter would answer a repeated key
/// with its first answer, RETAINED until a date already past).
fn retention_expired_key(task_id: &str, until_ms: i64) -> String {
    format!("{task_id}{RETENTION_EXPIRED_SUFFIX}-{until_ms}")
}

/// Whether a call in `phase` for `id` (a task's or a bulk job's) belongs to a retention
/// run: the run itself, or the confirmation of one the adapter ACCEPTED.
fn is_retention_run(phase: &Phase, id: &str) -> bool {
    match phase {
        Phase::Start => false,
        Phase::RetentionExpired { .. } => true,
        Phase::Confirm { handle } => is_retention_expired_key(id, handle),
    }
}

/// Whether `handle` is the key of a [`Phase::RetentionExpired`] call for `task_id`. A run
/// the adapter ACCEPTED is confirmed by [`Phase::Confirm`], which carries only the handle:
/// the key is all that tells its answer apart from a first run's. The whole key is rebuilt
/// and compared, so a handle that merely contains the suffix, or that of another task, is no
/// retention run.
fn is_retention_expired_key(task_id: &str, handle: &str) -> bool {
    let Some(rest) = handle
        .strip_prefix(task_id)
        .and_then(|r| r.strip_prefix(RETENTION_EXPIRED_SUFFIX))
    else {
        return false;
    };
    // A handle stored before the key carried the date ends at the suffix; its task may
    // still be awaiting confirmation after an upgrade.
    rest.is_empty()
        || rest
            .strip_prefix('-')
            .and_then(|ms| ms.parse::<i64>().ok())
            .is_some_and(|ms| retention_expired_key(task_id, ms) == handle)
}

/// The body of an `Execute` call for `task` under the idempotency key `task_id`.
fn execute_request(task: &Task, task_id: &str) -> ExecuteRequest {
    ExecuteRequest {
        task_id: task_id.to_string(),
        request_id: task.request_id.clone(),
        kind: task.kind as i32,
        identities: task.identities.clone(),
        scope: Some(Scope {
            data_categories: task.categories.clone(),
        }),
        parameters: Some(task.parameters.clone()),
        due_at: Some(timestamp_from_millis(task.due_at_ms)),
        controller: task.controller.clone(),
    }
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Checks that `bytes` are one JSON value in UTF-8. `serde_json::from_slice` alone is not
/// enough: skipping a value it does not check the bytes of its strings, so `"\xff"` would pass.
fn check_json(bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("it is not UTF-8 ({e})"))?;
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Whether `json`, one JSON value (checked before), holds no data: `null`, `[]` or `{}`.
/// Looks at no more than its first five bytes besides whitespace, whatever its size: a
/// value whose only ones are those of `null`, `[]` or `{}` is that value.
fn holds_nothing(json: &[u8]) -> bool {
    let bare: Vec<u8> = json
        .iter()
        .copied()
        .filter(|b| !b" \t\n\r".contains(b))
        .take(5)
        .collect();
    matches!(bare.as_slice(), b"null" | b"[]" | b"{}")
}

/// Checks that the adapter's inline `export_json` is JSON and writes it as `export.json`. It
/// came in one message of at most 16 MiB, which is what this connector holds of it. An
/// export holding nothing (`null`, `[]`, `{}`) from an answer counting `records_affected`
/// records is refused: the subject would be sent an empty file for data the adapter holds.
async fn write_export(
    task: &Task,
    export: &[u8],
    records_affected: i64,
) -> Result<ExportedFile, ConnectorError> {
    if export.is_empty() {
        return Err(ConnectorError::Permanent(format!(
            "the adapter completed {} without export_json or export_paged",
            kind_label(task.kind)
        )));
    }
    check_json(export).map_err(|e| {
        ConnectorError::Permanent(format!("the adapter's export_json is not valid JSON: {e}"))
    })?;
    if records_affected > 0 && holds_nothing(export) {
        return Err(ConnectorError::Permanent(format!(
            "the adapter completed {} with records_affected {records_affected} but its \
             export_json holds nothing ({}); an empty export is not delivered for it",
            kind_label(task.kind),
            String::from_utf8_lossy(export).trim()
        )));
    }
    let mut file = task.export_sink()?.file("export.json", JSON).await?;
    file.write(export).await?;
    file.finish().await
}

/// Turns an adapter's answer into an [`Outcome`] (a COMPLETED one without
/// files: [`AdapterConnector::complete`] writes them); `handle` is the key
/// the answer was given under (returned in [`Outcome::Accepted`]).
fn outcome_from_response(
    handle: &str,
    response: ExecuteResponse,
) -> Result<Outcome, ConnectorError> {
    let evidence = response.evidence.unwrap_or_default();
    let note = clip(evidence.note);
    let outcome = ExecuteOutcome::try_from(response.outcome).unwrap_or(ExecuteOutcome::Unspecified);
    match outcome {
        ExecuteOutcome::Completed => Ok(Outcome::Completed {
            records_affected: evidence.records_affected.max(0),
            note,
            files: Vec::new(),
            erased: Vec::new(),
        }),
        ExecuteOutcome::NotFound => Ok(Outcome::NotFound {
            note: if note.is_empty() {
                "the adapter holds no data on the subject".into()
            } else {
                note
            },
        }),
        ExecuteOutcome::Retained => {
            let until_ms = retained_until(&response.legal_basis, response.retain_until.as_ref())?;
            Ok(Outcome::Retained {
                legal_basis: clip(response.legal_basis),
                until_ms,
                records_affected: evidence.records_affected.max(0),
                note,
                erased: Vec::new(),
            })
        }
        ExecuteOutcome::Accepted => Ok(Outcome::Accepted {
            handle: handle.to_string(),
            note: if note.is_empty() {
                "the adapter accepted the task".into()
            } else {
                note
            },
        }),
        ExecuteOutcome::Refused => Ok(Outcome::Refused {
            reason: if response.reason.trim().is_empty() {
                "refused by the adapter (no reason given)".into()
            } else {
                clip(response.reason)
            },
        }),
        ExecuteOutcome::Failed => Err(ConnectorError::Permanent(clip(format!(
            "the adapter failed the task: {}",
            if response.reason.is_empty() {
                "(no reason given)"
            } else {
                response.reason.as_str()
            }
        )))),
        ExecuteOutcome::Unspecified => Err(ConnectorError::Permanent(format!(
            "the adapter answered without a valid outcome ({})",
            response.outcome
        ))),
    }
}

/// The retain-until date (ms since the epoch) of a RETAINED answer, task or bulk step, or
/// why the answer is malformed: it needs a legal basis and a date within the years 2000 to
/// 9999, as the registry takes it (a date beyond would wake the task never, or shows in a
/// certificate as no date at all).
fn retained_until(
    legal_basis: &str,
    until: Option<&dsrelay_proto::prost_types::Timestamp>,
) -> Result<i64, ConnectorError> {
    if legal_basis.trim().is_empty() {
        return Err(ConnectorError::Permanent(
            "the adapter answered RETAINED without a legal_basis".into(),
        ));
    }
    let Some(until) = until else {
        return Err(ConnectorError::Permanent(
            "the adapter answered RETAINED without retain_until".into(),
        ));
    };
    if !dsrelay_proto::is_real_instant(until) {
        return Err(ConnectorError::Permanent(format!(
            "the adapter answered RETAINED until {} seconds since the epoch, which is not a \
             date between the years 2000 and 9999",
            until.seconds
        )));
    }
    Ok(millis_from_timestamp(until))
}

/// The code an adapter's call ended with, for a log line that shows no message:
/// DEADLINE_EXCEEDED when no answer came in time, OK for an answer.
fn code_of<R>(
    result: &Result<Result<tonic::Response<R>, Status>, tokio::time::error::Elapsed>,
) -> Code {
    match result {
        Ok(Ok(_)) => Code::Ok,
        Ok(Err(status)) if timed_out(status) => Code::DeadlineExceeded,
        Ok(Err(status)) => status.code(),
        Err(_) => Code::DeadlineExceeded,
    }
}

/// Classifies a failed call: conditions that pass by themselves are transient, the rest
/// permanent. An answer this side could not decode (a string that is not UTF-8, bytes that
/// are not the method's answer) is a malformed answer, permanent as the others are: the
/// adapter answers a repeated call with the same outcome. Any other status carrying a source
/// error was raised by the transport on our side (connection refused, TLS, reset), not
/// answered by the adapter, and is transient.
fn status_error(rpc: &str, endpoint: &str, status: &Status) -> ConnectorError {
    if let Some(bad) = dsrelay_proto::codec::undecodable(status) {
        return ConnectorError::Permanent(clip(format!(
            "adapter {rpc} at {endpoint}: its answer could not be decoded: it is not a valid \
             protobuf {}: {}",
            bad.type_name, bad.error
        )));
    }
    let transient = matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
    ) || std::error::Error::source(status).is_some();
    let message = clip(format!(
        "adapter {rpc} at {endpoint}: {:?}: {}",
        status.code(),
        status.message()
    ));
    if transient {
        ConnectorError::Transient(message)
    } else {
        ConnectorError::Permanent(message)
    }
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::{Evidence, IdentityEncoding, IdentityType, SubjectIdentity};

    use super::*;

    fn config(tls: TlsFiles) -> AdapterConfig {
        AdapterConfig {
            endpoint: "https://localhost:1".into(),
            identity: "spiffe://dsrelay.dev/adapter/example".into(),
            tls,
            timeout_ms: 2000,
            supported_kinds: None,
            controllers: None,
        }
    }

    fn task(phase: Phase) -> Task {
        Task {
            task_id: "controller/r1/newsletter".into(),
            request_id: "r1".into(),
            controller: "acme".into(),
            kind: RequestKind::Erasure,
            identities: vec![SubjectIdentity {
                r#type: IdentityType::Email as i32,
                encoding: IdentityEncoding::Raw as i32,
                value: "a@b.fi".into(),
                label: String::new(),
            }],
            categories: vec!["marketing".into()],
            parameters: Default::default(),
            due_at_ms: 1_700_000_000_000,
            now_ms: 1_600_000_000_000,
            export: None,
            phase,
            interrupted: false,
        }
    }

    fn response(outcome: ExecuteOutcome) -> ExecuteResponse {
        ExecuteResponse {
            outcome: outcome as i32,
            evidence: Some(Evidence {
                records_affected: 2,
                note: "done".into(),
                confirmed: true,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn parses_kind_names() {
        assert_eq!(parse_kind("erasure"), Some(RequestKind::Erasure));
        assert_eq!(
            parse_kind("RETURN_OF_DATA"),
            Some(RequestKind::ReturnOfData)
        );
        assert_eq!(
            parse_kind("return-of-data"),
            Some(RequestKind::ReturnOfData)
        );
        assert_eq!(
            parse_kind("REQUEST_KIND_OBJECTION"),
            Some(RequestKind::Objection)
        );
        assert_eq!(parse_kind("unspecified"), None);
        assert_eq!(parse_kind("deletion"), None);
    }

    #[test]
    fn validation_names_each_key() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(dir.path()).unwrap();
        let mut c = config(pki.files("processor"));
        assert!(c.validate().is_empty(), "{:?}", c.validate());
        c.endpoint = "http://localhost:1".into();
        c.identity = " ".into();
        c.timeout_ms = 0;
        c.supported_kinds = Some(vec!["erasure".into(), "nope".into()]);
        let problems = c.validate();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("endpoint"));
        assert!(problems[1].starts_with("identity"));
        assert!(problems[2].starts_with("timeout_ms"));
        assert!(problems[3].starts_with("supported_kinds[1]"));
        c.timeout_ms = 300_001;
        c.supported_kinds = None;
        assert_eq!(
            c.validate()[2],
            "timeout_ms: must be from 1 ms to 300000 ms; it is 300001"
        );
        c.timeout_ms = 2000;
        c.supported_kinds = Some(vec![]);
        assert!(c
            .validate()
            .iter()
            .any(|p| p.starts_with("supported_kinds:")));
        c.controllers = Some(vec![]);
        assert!(c.validate().iter().any(|p| p.starts_with("controllers:")));
        c.controllers = Some(vec!["acme".into(), " ".into(), "acme".into()]);
        let problems = c.validate().join("\n");
        assert!(
            problems.contains("controllers[1]: must not be empty"),
            "{problems}"
        );
        assert!(
            problems.contains("controllers[2]: \"acme\" is listed twice"),
            "{problems}"
        );
    }

    /// `tls.reload_interval_ms` has the bounds of the service's own `[tls]`: 0 (reload only on
    /// SIGHUP) to 30 days, refused above with the service's message.
    #[test]
    fn the_tls_reload_interval_is_bounded_as_the_service_s() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(dir.path()).unwrap();
        let mut c = config(pki.files("processor"));
        for ok in [0, MAX_DURATION_MS] {
            c.tls.reload_interval_ms = ok;
            assert!(c.validate().is_empty(), "{ok}: {:?}", c.validate());
        }
        for bad in [MAX_DURATION_MS + 1, u64::MAX >> 1] {
            c.tls.reload_interval_ms = bad;
            assert_eq!(
                c.validate(),
                [format!(
                    "tls.reload_interval_ms: must be from 0 ms to 2592000000 ms (30 days); \
                     it is {bad}"
                )]
            );
        }
        // Read from the connector's table, as the processor's file has it.
        let text = format!(
            "type = \"adapter\"\nendpoint = \"https://localhost:1\"\n\
             identity = \"spiffe://dsrelay.dev/adapter/example\"\n[tls]\nca = {:?}\n\
             cert = {:?}\nkey = {:?}\nreload_interval_ms = 9223372036854775807\n",
            c.tls.ca, c.tls.cert, c.tls.key
        );
        let parsed: crate::ConnectorConfig = toml::from_str(&text).unwrap();
        let problems = parsed.validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("tls.reload_interval_ms: must be from 0 ms"),
            "{problems:?}"
        );
    }

    /// The TLS files are checked with the settings (the processor's exit 64), each problem
    /// naming its key and file, not only read when the connector is built after the start.
    #[test]
    fn tls_files_are_checked_with_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(dir.path()).unwrap();
        let good = pki.files("processor");
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "just text\n").unwrap();
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let missing = dir.path().join("missing.pem");
        let mut files = good.clone();
        files.ca = missing.clone();
        files.cert = not_pem.clone();
        // A certificate where the key belongs: PEM, but not of its kind.
        files.key = good.cert.clone();
        files.crls = vec![good.ca.clone(), dir.path().to_path_buf()];
        let c = crate::ConnectorConfig::Adapter(config(files));
        let problems = c.validate();
        let shown = |p: &std::path::Path| p.display().to_string();
        assert_eq!(
            problems[..4],
            [
                format!("tls.ca: {} is not a readable file", shown(&missing)),
                format!("tls.cert: {} holds no PEM certificate", shown(&not_pem)),
                format!("tls.key: {} holds no PEM private key", shown(&good.cert)),
                format!(
                    "tls.crls[0]: {} holds no PEM revocation list",
                    shown(&good.ca)
                ),
            ],
            "{problems:?}"
        );
        assert_eq!(
            problems[4],
            format!("tls.crls[1]: {} is not a readable file", shown(dir.path()))
        );
        assert_eq!(problems.len(), 5, "{problems:?}");
        let mut bad_base64 = good.clone();
        bad_base64.ca = broken.clone();
        let problems = config(bad_base64).validate();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!(
                "tls.ca: {} is not a PEM certificate: ",
                shown(&broken)
            )),
            "{problems:?}"
        );
        assert!(config(good).validate().is_empty());
    }

    #[test]
    fn config_is_tagged_adapter() {
        let text = r#"
            type = "adapter"
            endpoint = "https://localhost:50071"
            identity = "spiffe://dsrelay.dev/adapter/example"
            supported_kinds = ["erasure", "objection"]
            [tls]
            ca = "ca.pem"
            cert = "processor.pem"
            key = "processor.key"
        "#;
        let c: crate::ConnectorConfig = toml::from_str(text).unwrap();
        let crate::ConnectorConfig::Adapter(a) = &c else {
            panic!("not an adapter config: {c:?}");
        };
        assert_eq!(a.timeout_ms, DEFAULT_TIMEOUT_MS);
        // Nothing but the TLS files, which are not there.
        let problems = c.validate();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems
                .iter()
                .all(|p| p.ends_with("is not a readable file")),
            "{problems:?}"
        );
        let back: crate::ConnectorConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn maps_outcomes() {
        assert_eq!(
            outcome_from_response("h", response(ExecuteOutcome::Completed)).unwrap(),
            Outcome::Completed {
                records_affected: 2,
                note: "done".into(),
                files: Vec::new(),
                erased: Vec::new(),
            }
        );
        assert!(matches!(
            outcome_from_response("h", response(ExecuteOutcome::NotFound)).unwrap(),
            Outcome::NotFound { .. }
        ));
        assert_eq!(
            outcome_from_response("h", response(ExecuteOutcome::Accepted)).unwrap(),
            Outcome::Accepted {
                handle: "h".into(),
                note: "done".into()
            }
        );
        let mut refused = response(ExecuteOutcome::Refused);
        refused.reason = "not here".into();
        assert_eq!(
            outcome_from_response("h", refused).unwrap(),
            Outcome::Refused {
                reason: "not here".into()
            }
        );
        let mut failed = response(ExecuteOutcome::Failed);
        failed.reason = "disk full".into();
        let e = outcome_from_response("h", failed).unwrap_err();
        assert!(
            !e.is_transient() && e.to_string().contains("disk full"),
            "{e}"
        );
        let e = outcome_from_response("h", response(ExecuteOutcome::Unspecified)).unwrap_err();
        assert!(!e.is_transient());
        let mut bogus = response(ExecuteOutcome::Completed);
        bogus.outcome = 99;
        assert!(!outcome_from_response("h", bogus)
            .unwrap_err()
            .is_transient());
    }

    #[test]
    fn maps_retained_and_requires_its_date() {
        let mut r = response(ExecuteOutcome::Retained);
        r.legal_basis = "Kirjanpitolaki 2:10 §".into();
        r.retain_until = Some(timestamp_from_millis(1_800_000_000_000));
        assert_eq!(
            outcome_from_response("h", r.clone()).unwrap(),
            Outcome::Retained {
                legal_basis: "Kirjanpitolaki 2:10 §".into(),
                until_ms: 1_800_000_000_000,
                records_affected: 2,
                note: "done".into(),
                erased: Vec::new(),
            }
        );
        let mut no_date = r.clone();
        no_date.retain_until = None;
        let e = outcome_from_response("h", no_date).unwrap_err();
        assert!(!e.is_transient() && e.to_string().contains("retain_until"));
        for seconds in [i64::MIN, -1, 946_684_799, 253_402_300_800, i64::MAX] {
            let mut no_real_date = r.clone();
            no_real_date.retain_until =
                Some(dsrelay_proto::prost_types::Timestamp { seconds, nanos: 0 });
            let e = outcome_from_response("h", no_real_date).unwrap_err();
            assert!(
                !e.is_transient() && e.to_string().contains("not a date"),
                "{seconds}: {e}"
            );
        }
        let mut no_basis = r;
        no_basis.legal_basis.clear();
        assert!(outcome_from_response("h", no_basis).is_err());
    }

    fn export_task(dir: &std::path::Path, task_id: &str, kind: RequestKind) -> Task {
        Task {
            task_id: task_id.into(),
            request_id: "r-1".into(),
            controller: "acme".into(),
            kind,
            identities: Vec::new(),
            categories: Vec::new(),
            parameters: Default::default(),
            due_at_ms: 0,
            now_ms: 0,
            phase: Phase::Start,
            interrupted: false,
            export: Some(crate::ExportSink::new(
                dir.join(task_id).join(kind_label(kind)),
                vec!["crm".into()],
            )),
        }
    }

    #[tokio::test]
    async fn writes_inline_exports_into_the_task_folder() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        // Inline answers need no further call: the adapter is never reached.
        let connector = AdapterConnector::connect(&config(pki.files("processor"))).unwrap();
        let task = |kind| export_task(dir.path(), "c/r-1/crm", kind);
        let mut r = response(ExecuteOutcome::Completed);
        let body = br#"{"subscribers":[{"name":"A"}]}"#;
        r.export_json = body.to_vec();
        let t = task(RequestKind::ReturnOfData);
        let Outcome::Completed { files, .. } =
            connector.complete(&t, "h", r.clone()).await.unwrap()
        else {
            panic!("not completed");
        };
        assert_eq!(files.len(), 1);
        assert_eq!((files[0].name.as_str(), files[0].size), ("export.json", 30));
        let path = t.export.as_ref().unwrap().dir().join("export.json");
        assert_eq!(std::fs::read(path).unwrap(), body);
        // Not kept for kinds that did not ask for data.
        let t = task(RequestKind::Erasure);
        let Outcome::Completed { files, .. } =
            connector.complete(&t, "h", r.clone()).await.unwrap()
        else {
            panic!("not completed");
        };
        assert!(files.is_empty());
        assert!(!t.export.as_ref().unwrap().dir().exists());
        r.export_json = b"{not json".to_vec();
        let e = connector
            .complete(&task(RequestKind::Transfer), "h", r.clone())
            .await
            .unwrap_err();
        assert!(
            !e.is_transient() && e.to_string().contains("not valid JSON"),
            "{e}"
        );
        // A string of bytes that are not UTF-8 is no JSON, though a parser skipping it
        // would not look.
        r.export_json = b"\"\xff\xfe\"".to_vec();
        let e = connector
            .complete(&task(RequestKind::ReturnOfData), "h", r.clone())
            .await
            .unwrap_err();
        assert!(
            !e.is_transient() && e.to_string().contains("not valid JSON: it is not UTF-8"),
            "{e}"
        );
        // Nothing in it, for records the adapter counted: no empty file for the subject.
        for empty in [&b"[]"[..], b" null ", b"{ }", b"[\n]"] {
            r.export_json = empty.to_vec();
            let e = connector
                .complete(&task(RequestKind::ReturnOfData), "h", r.clone())
                .await
                .unwrap_err();
            assert!(
                !e.is_transient()
                    && e.to_string()
                        .contains("with records_affected 2 but its export_json holds nothing"),
                "{e}"
            );
        }
        // Nothing counted, nothing held: an empty export is right.
        let mut none = r.clone();
        none.export_json = b"[]".to_vec();
        none.evidence.as_mut().unwrap().records_affected = 0;
        // Each written into a folder of its own.
        let fresh = |n: usize| {
            export_task(
                dir.path(),
                &format!("c/r-{n}/crm"),
                RequestKind::ReturnOfData,
            )
        };
        let out = connector.complete(&fresh(2), "h", none).await;
        assert!(out.is_ok(), "{out:?}");
        // Values that merely look empty hold data.
        for (n, some) in [&b"[[]]"[..], b"\"[]\"", b"[null]", b"0"]
            .into_iter()
            .enumerate()
        {
            r.export_json = some.to_vec();
            let out = connector.complete(&fresh(3 + n), "h", r.clone()).await;
            assert!(out.is_ok(), "{out:?}");
        }
        r.export_json.clear();
        let e = connector
            .complete(&task(RequestKind::ReturnOfData), "h", r)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("without export_json"), "{e}");
    }

    /// An adapter whose export pages are scripted per (task id, page token); a listed
    /// (task id, token) fails UNAVAILABLE the first time it is asked.
    #[derive(Default)]
    struct ScriptedPages {
        /// Execute answers NOT_FOUND instead of a paged COMPLETED.
        not_found: bool,
        /// Execute answers ACCEPTED, and GetTaskStatus what Execute would have answered.
        accepted: bool,
        /// The answer is RETAINED until this date (ms), instead of a paged COMPLETED.
        retained_until_ms: Option<i64>,
        /// The task ids GetTaskStatus was asked about.
        statuses: std::sync::Mutex<Vec<String>>,
        pages: std::collections::HashMap<(String, String), Result<ExportPage, Code>>,
        fail_once: std::sync::Mutex<BTreeSet<(String, String)>>,
        asked: std::sync::atomic::AtomicUsize,
    }

    /// The served side of a [`ScriptedPages`] the test keeps a handle on.
    struct Scripted(std::sync::Arc<ScriptedPages>);

    impl Scripted {
        /// The task's outcome, whether answered by Execute or by GetTaskStatus.
        fn answer(&self) -> Result<tonic::Response<ExecuteResponse>, Status> {
            if self.0.not_found {
                return Ok(tonic::Response::new(ExecuteResponse {
                    evidence: Some(Evidence {
                        note: "no such subscriber".into(),
                        ..Default::default()
                    }),
                    ..response(ExecuteOutcome::NotFound)
                }));
            }
            if let Some(until_ms) = self.0.retained_until_ms {
                return Ok(tonic::Response::new(ExecuteResponse {
                    legal_basis: "Kirjanpitolaki 2:10 §".into(),
                    retain_until: Some(timestamp_from_millis(until_ms)),
                    ..response(ExecuteOutcome::Retained)
                }));
            }
            Ok(tonic::Response::new(ExecuteResponse {
                export_paged: true,
                // Ignored: the paged form wins.
                export_json: b"{}".to_vec(),
                ..response(ExecuteOutcome::Completed)
            }))
        }
    }

    #[tonic::async_trait]
    impl dsrelay_proto::v1::subprocessor_adapter_server::SubprocessorAdapter for Scripted {
        async fn describe(
            &self,
            _: tonic::Request<DescribeRequest>,
        ) -> Result<tonic::Response<dsrelay_proto::v1::DescribeResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn execute(
            &self,
            _: tonic::Request<ExecuteRequest>,
        ) -> Result<tonic::Response<ExecuteResponse>, Status> {
            if self.0.accepted {
                return Ok(tonic::Response::new(response(ExecuteOutcome::Accepted)));
            }
            self.answer()
        }

        async fn get_task_status(
            &self,
            req: tonic::Request<GetTaskStatusRequest>,
        ) -> Result<tonic::Response<ExecuteResponse>, Status> {
            let task_id = req.into_inner().task_id;
            self.0.statuses.lock().unwrap().push(task_id);
            if !self.0.accepted {
                return Err(Status::unimplemented("not scripted"));
            }
            self.answer()
        }

        async fn execute_bulk(
            &self,
            _: tonic::Request<dsrelay_proto::v1::ExecuteBulkRequest>,
        ) -> Result<tonic::Response<dsrelay_proto::v1::ExecuteBulkResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn get_bulk_status(
            &self,
            _: tonic::Request<dsrelay_proto::v1::GetBulkStatusRequest>,
        ) -> Result<tonic::Response<dsrelay_proto::v1::ExecuteBulkResponse>, Status> {
            Err(Status::unimplemented("not scripted"))
        }

        async fn get_export_page(
            &self,
            req: tonic::Request<GetExportPageRequest>,
        ) -> Result<tonic::Response<ExportPage>, Status> {
            let this = &self.0;
            this.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let r = req.into_inner();
            assert_eq!(r.max_bytes, 64, "the connector asks for its page size");
            let key = (r.task_id, r.page_token);
            if this.fail_once.lock().unwrap().remove(&key) {
                return Err(Status::unavailable("restarting"));
            }
            match this.pages.get(&key) {
                Some(Ok(page)) => Ok(tonic::Response::new(page.clone())),
                Some(Err(code)) => Err(Status::new(*code, "scripted")),
                None => Err(Status::invalid_argument(format!("no page {key:?}"))),
            }
        }
    }

    fn page(records: &[&str], next: &str) -> Result<ExportPage, Code> {
        Ok(ExportPage {
            records: records.iter().map(|r| r.as_bytes().to_vec()).collect(),
            next_page_token: next.into(),
        })
    }

    /// Serves `script` over mutual TLS on a free port; send on the sender to stop it.
    async fn serve_scripted(
        pki: &dsrelay_runtime::pki::DevPki,
        script: std::sync::Arc<ScriptedPages>,
    ) -> (
        u16,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), anyhow::Error>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let router =
            dsrelay_runtime::server::builder(pki.files("adapter").server_config().unwrap())
                .unwrap()
                .add_service(
                    dsrelay_proto::v1::subprocessor_adapter_server::SubprocessorAdapterServer::new(
                        Scripted(script),
                    ),
                );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(dsrelay_runtime::server::serve(router, listener, async {
            let _ = stopped.await;
        }));
        (port, stop, server)
    }

    /// At its retention date the first run's subject may be gone from the adapter entirely:
    /// that completes the task (nothing left), where a first run ends NOT_FOUND.
    #[test]
    fn at_a_retention_date_not_found_is_nothing_left_and_other_answers_pass() {
        assert_eq!(
            nothing_left(Outcome::NotFound {
                note: "no such subscriber".into()
            }),
            Outcome::Completed {
                records_affected: 0,
                note: "nothing left to erase: no such subscriber".into(),
                files: Vec::new(),
                erased: Vec::new(),
            }
        );
        let accepted = Outcome::Accepted {
            handle: "job-1".into(),
            note: "working".into(),
        };
        assert_eq!(nothing_left(accepted.clone()), accepted);
    }

    #[tokio::test]
    async fn nothing_left_at_the_retention_date_completes() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        let script = std::sync::Arc::new(ScriptedPages {
            not_found: true,
            ..ScriptedPages::default()
        });
        let (port, stop, server) = serve_scripted(&pki, script).await;
        let mut c = config(pki.files("processor"));
        c.endpoint = format!("https://localhost:{port}");
        c.supported_kinds = Some(vec!["erasure".into()]);
        let connector = AdapterConnector::connect(&c).unwrap();

        assert_eq!(
            connector.run(&task(Phase::Start)).await.unwrap(),
            Outcome::NotFound {
                note: "no such subscriber".into()
            }
        );
        assert_eq!(
            connector
                .run(&task(Phase::RetentionExpired { until_ms: 0 }))
                .await
                .unwrap(),
            Outcome::Completed {
                records_affected: 0,
                note: "nothing left to erase: no such subscriber".into(),
                files: Vec::new(),
                erased: Vec::new(),
            }
        );

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// A retention run the adapter ACCEPTED is answered at its confirmation, which carries
    /// only the handle: NOT_FOUND there is nothing left too, not a subject never held.
    #[tokio::test]
    async fn nothing_left_confirmed_after_the_retention_date_completes() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        let script = std::sync::Arc::new(ScriptedPages {
            not_found: true,
            accepted: true,
            ..ScriptedPages::default()
        });
        let (port, stop, server) = serve_scripted(&pki, script.clone()).await;
        let mut c = config(pki.files("processor"));
        c.endpoint = format!("https://localhost:{port}");
        c.supported_kinds = Some(vec!["erasure".into()]);
        let connector = &AdapterConnector::connect(&c).unwrap();
        let confirm = |phase| async move {
            let Outcome::Accepted { handle, .. } = connector.run(&task(phase)).await.unwrap()
            else {
                panic!("not accepted");
            };
            connector
                .run(&task(Phase::Confirm { handle }))
                .await
                .unwrap()
        };

        // A first run's NOT_FOUND stands: the adapter never held the subject.
        assert_eq!(
            confirm(Phase::Start).await,
            Outcome::NotFound {
                note: "no such subscriber".into()
            }
        );
        assert_eq!(
            confirm(Phase::RetentionExpired {
                until_ms: 1_700_000_000_000
            })
            .await,
            Outcome::Completed {
                records_affected: 0,
                note: "nothing left to erase: no such subscriber".into(),
                files: Vec::new(),
                erased: Vec::new(),
            }
        );
        assert_eq!(
            *script.statuses.lock().unwrap(),
            [
                "controller/r1/newsletter",
                "controller/r1/newsletter#retention-expired-1700000000000"
            ]
        );

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// A retention run the adapter ACCEPTED and then confirms RETAINED with a date already
    /// past would wake at once and be confirmed again, with the same answer, for ever: it
    /// fails for an operator, as it does when answered at once.
    #[tokio::test]
    async fn retained_past_its_date_at_a_retention_runs_confirmation_fails() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        let past = 1_500_000_000_000;
        let script = std::sync::Arc::new(ScriptedPages {
            accepted: true,
            retained_until_ms: Some(past),
            ..ScriptedPages::default()
        });
        let (port, stop, server) = serve_scripted(&pki, script.clone()).await;
        let mut c = config(pki.files("processor"));
        c.endpoint = format!("https://localhost:{port}");
        c.supported_kinds = Some(vec!["erasure".into()]);
        let connector = &AdapterConnector::connect(&c).unwrap();
        let confirm = |phase| async move {
            let Outcome::Accepted { handle, .. } = connector.run(&task(phase)).await.unwrap()
            else {
                panic!("not accepted");
            };
            connector.run(&task(Phase::Confirm { handle })).await
        };

        // A first run's RETAINED passes, past date or not: the retention run comes next.
        let first = confirm(Phase::Start).await.unwrap();
        assert!(
            matches!(first, Outcome::Retained { until_ms, .. } if until_ms == past),
            "{first:?}"
        );
        let err = confirm(Phase::RetentionExpired { until_ms: past })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectorError::Permanent(m) if m.contains("after its retain-until")),
            "{err:?}"
        );
        assert_eq!(
            *script.statuses.lock().unwrap(),
            [
                "controller/r1/newsletter",
                "controller/r1/newsletter#retention-expired-1500000000000"
            ]
        );

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// Only a key this connector built for a retention run of the same task counts as one.
    #[test]
    fn recognises_the_keys_of_retention_runs() {
        let id = "controller/r1/newsletter";
        for until_ms in [0, 1_700_000_000_000, -1, i64::MAX] {
            let key = retention_expired_key(id, until_ms);
            assert!(is_retention_expired_key(id, &key), "{key}");
            assert!(
                !is_retention_expired_key("controller/r1/other", &key),
                "{key}"
            );
        }
        // Stored as the handle of a run accepted before the key carried its date.
        assert!(is_retention_expired_key(
            id,
            &format!("{id}#retention-expired")
        ));
        for not_one in [
            id.to_string(),
            format!("{id}#retention-expired-"),
            format!("{id}#retention-expired-x"),
            format!("{id}#retention-expired-+5"),
            format!("{id}#retention-expired-05"),
            format!("{id}#retention-expired-5#retention-expired-5"),
            format!("other{id}#retention-expired-5"),
        ] {
            assert!(!is_retention_expired_key(id, &not_one), "{not_one}");
        }
    }

    #[tokio::test]
    async fn fetches_paged_exports_page_by_page() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        let mut script = ScriptedPages::default();
        let mut add = |task: &str, token: &str, p| {
            script.pages.insert((task.into(), token.into()), p);
        };
        add("ok", "", page(&[r#"{"n":1}"#, r#"{"n":2}"#], "a"));
        add("ok", "a", page(&[r#""three""#], "b"));
        add("ok", "b", page(&[r#"[4]"#], ""));
        add("bad-json", "", page(&[r#"{"n":1"#], ""));
        add("loop", "", page(&["1"], "x"));
        add("loop", "x", page(&["2"], "x"));
        add("big", "", page(&[&format!("\"{}\"", "x".repeat(70))], ""));
        add("hole", "", page(&[], "more"));
        add("empty", "", page(&[], ""));
        add(
            "not-utf8",
            "",
            Ok(ExportPage {
                records: vec![b"\"\xff\xfe\"".to_vec()],
                next_page_token: String::new(),
            }),
        );
        add("gone", "", Err(Code::NotFound));
        add("down", "", Err(Code::Unavailable));
        script
            .fail_once
            .lock()
            .unwrap()
            .insert(("ok".into(), "a".into()));
        let script = std::sync::Arc::new(script);
        let (port, stop, server) = serve_scripted(&pki, script.clone()).await;
        let mut c = config(pki.files("processor"));
        c.endpoint = format!("https://localhost:{port}");
        c.supported_kinds = Some(vec!["return_of_data".into()]);
        let mut connector = AdapterConnector::connect(&c).unwrap();
        connector.page_bytes = 64;

        let t = export_task(dir.path(), "ok", RequestKind::ReturnOfData);
        let Outcome::Completed { files, .. } = connector.run(&t).await.unwrap() else {
            panic!("not completed");
        };
        let written = std::fs::read(t.export.as_ref().unwrap().dir().join("export.json")).unwrap();
        assert_eq!(written, br#"[{"n":1},{"n":2},"three",[4]]"#);
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].size, written.len() as u64);
        // Three pages, one asked twice after it failed.
        assert_eq!(script.asked.load(std::sync::atomic::Ordering::SeqCst), 4);

        for (task_id, says) in [
            (
                "bad-json",
                "record 1 of the adapter's export is not valid JSON",
            ),
            ("loop", "with the same page token"),
            ("big", "more than the 64 asked"),
            ("hole", "empty but not the last"),
            // Completed with 2 records affected (`response`), yet nothing to deliver.
            (
                "empty",
                "with records_affected 2 but its paged export holds no record",
            ),
            (
                "not-utf8",
                "record 1 of the adapter's export is not valid JSON: it is not UTF-8",
            ),
            ("gone", "NotFound"),
        ] {
            let t = export_task(dir.path(), task_id, RequestKind::ReturnOfData);
            let e = connector.run(&t).await.unwrap_err();
            assert!(
                !e.is_transient() && e.to_string().contains(says),
                "{task_id}: {e}"
            );
        }
        // Still down after the retries: passed on as transient, for the processor to re-run.
        let t = export_task(dir.path(), "down", RequestKind::ReturnOfData);
        let e = connector.run(&t).await.unwrap_err();
        assert!(e.is_transient(), "{e}");

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// An expired page token (ABORTED) is not asked again: the processor runs the task's
    /// step again from Execute and the first page, as `adapter.proto` says.
    #[tokio::test]
    async fn an_expired_page_token_restarts_the_export_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        let mut script = ScriptedPages::default();
        script
            .pages
            .insert(("expired".into(), String::new()), page(&["1"], "t1"));
        script
            .pages
            .insert(("expired".into(), "t1".into()), Err(Code::Aborted));
        let script = std::sync::Arc::new(script);
        let (port, stop, server) = serve_scripted(&pki, script.clone()).await;
        let mut c = config(pki.files("processor"));
        c.endpoint = format!("https://localhost:{port}");
        c.supported_kinds = Some(vec!["return_of_data".into()]);
        let mut connector = AdapterConnector::connect(&c).unwrap();
        connector.page_bytes = 64;

        let t = export_task(dir.path(), "expired", RequestKind::ReturnOfData);
        let e = connector.run(&t).await.unwrap_err();
        // Transient: the processor re-runs the task, which starts with Execute.
        assert!(e.is_transient() && e.to_string().contains("Aborted"), "{e}");
        // The first page, then the stale token once.
        assert_eq!(script.asked.load(std::sync::atomic::Ordering::SeqCst), 2);

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[test]
    fn classifies_statuses() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
        ] {
            assert!(status_error("Execute", "e", &Status::new(code, "x")).is_transient());
        }
        for code in [
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::Unimplemented,
            Code::Internal,
            Code::NotFound,
        ] {
            let e = status_error("Execute", "e", &Status::new(code, "bad field"));
            assert!(!e.is_transient(), "{code:?}");
            assert!(e.to_string().contains("bad field"));
            assert!(e.to_string().contains(&format!("{code:?}")));
        }
        let io = std::io::Error::other("reset");
        let from_transport = Status::from_error(Box::new(io));
        assert!(status_error("Execute", "e", &from_transport).is_transient());
        assert!(!timed_out(&from_transport));
        // The client's own deadline, which tonic words "Timeout expired" under CANCELLED.
        let expired = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(expired.code(), Code::Cancelled);
        assert!(timed_out(&expired));
        // The same words from the adapter are its own status.
        assert!(!timed_out(&Status::cancelled("Timeout expired")));
    }

    #[test]
    fn builds_the_execute_body() {
        let t = task(Phase::Start);
        let body = execute_request(&t, &retention_expired_key(&t.task_id, 1_700_000_000_000));
        assert_eq!(
            body.task_id,
            "controller/r1/newsletter#retention-expired-1700000000000"
        );
        // Data kept in stages: the run at a later date is a new task to the adapter, which
        // would otherwise answer with the first run's RETAINED.
        assert_ne!(
            retention_expired_key(&t.task_id, 1_700_000_000_000),
            retention_expired_key(&t.task_id, 1_800_000_000_000)
        );
        assert_eq!(body.request_id, "r1");
        assert_eq!(body.kind, RequestKind::Erasure as i32);
        assert_eq!(
            body.scope.unwrap().data_categories,
            vec!["marketing".to_string()]
        );
        assert_eq!(millis_from_timestamp(&body.due_at.unwrap()), t.due_at_ms);
        // The adapter scopes itself by the controller.
        assert_eq!(body.controller, "acme");
    }

    #[tokio::test]
    async fn a_scoped_adapter_refuses_other_controllers_without_a_call() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(&dir.path().join("pki")).unwrap();
        // Nothing listens on port 1: a call would fail transiently, a refusal makes none.
        let c = AdapterConfig {
            controllers: Some(vec!["globex".into(), "acme".into()]),
            ..config(pki.files("processor"))
        };
        let connector = AdapterConnector::connect(&c).unwrap();
        assert_eq!(
            connector.scoped_controllers(),
            Some(vec!["acme".to_string(), "globex".to_string()])
        );
        let mut t = task(Phase::Start);
        t.controller = "initech".into();
        let out = connector.run(&t).await.unwrap();
        assert!(
            matches!(&out, Outcome::Refused { reason } if reason.contains("\"initech\"")),
            "{out:?}"
        );
        let (progress, _) = crate::ProgressReporter::new();
        let job = BulkJob {
            job_id: "ce/initech/newsletter".into(),
            request_id: "ce".into(),
            controller: "initech".into(),
            op: crate::BulkOp::Erase,
            phase: Phase::Start,
            due_at_ms: 2_000_000_000_000,
            now_ms: 1_700_000_000_000,
            interrupted: false,
            recorded_progress: Default::default(),
            export: None,
            progress,
            returned: None,
            returned_since_ms: None,
        };
        let out = connector.run_bulk(&job).await.unwrap();
        assert!(matches!(out, Outcome::Refused { .. }), "{out:?}");
        // A listed controller does reach the (absent) adapter.
        let mut t = task(Phase::Start);
        t.controller = "acme".into();
        assert!(connector.run(&t).await.unwrap_err().is_transient());
        let unscoped = AdapterConnector::connect(&config(pki.files("processor"))).unwrap();
        assert_eq!(unscoped.scoped_controllers(), None);
    }

    #[tokio::test]
    async fn an_adapter_that_is_down_is_transient_and_does_not_block_building() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(dir.path()).unwrap();
        // A port nothing listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut c = config(pki.files("processor"));
        c.endpoint = format!("https://127.0.0.1:{port}");
        let built = crate::build(&crate::ConnectorConfig::Adapter(c))
            .await
            .unwrap();
        assert_eq!(built.kind_name(), "adapter");
        // Describe is unknown yet: every real kind is passed on.
        assert!(built.supports(RequestKind::Rectification));
        assert!(!built.supports(RequestKind::Unspecified));
        for phase in [
            Phase::Start,
            Phase::Confirm {
                handle: "controller/r1/newsletter".into(),
            },
            Phase::RetentionExpired { until_ms: 0 },
        ] {
            let e = built.run(&task(phase)).await.unwrap_err();
            assert!(e.is_transient(), "{e}");
        }
    }

    #[tokio::test]
    async fn configured_kinds_decide_support_without_a_call() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dsrelay_runtime::pki::DevPki::ensure(dir.path()).unwrap();
        let mut c = config(pki.files("processor"));
        c.supported_kinds = Some(vec!["erasure".into(), "objection".into()]);
        let built = AdapterConnector::connect(&c).unwrap();
        assert!(built.supports(RequestKind::Erasure));
        assert!(built.supports(RequestKind::Objection));
        assert!(!built.supports(RequestKind::Transfer));
        // Missing TLS files are a configuration error at build time.
        let mut broken = c;
        broken.tls.cert = dir.path().join("missing.pem");
        assert!(AdapterConnector::connect(&broken).is_err());
    }
}
