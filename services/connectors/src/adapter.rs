//! A subprocessor reached through the adapter API (`dsrelay.v1.SubprocessorAdapter`, see
//! `proto/dsrelay/v1/adapter.proto`) over mutual TLS: the way to connect a holder written in
//! any language, or a shim in front of a SaaS system.
//!
//! # Calls
//! - [`Phase::Start`]: `Execute` with the task's id as the adapter's idempotency key, so a
//!   retry after a lost answer does the work once.
//! - [`Phase::Confirm`]: `GetTaskStatus` with the handle, which is the `task_id` that the
//!   accepted `Execute` carried.
//! - [`Phase::RetentionExpired`]: `Execute` again under the key `<task_id>#retention-expired`
//!   (`RETENTION_EXPIRED_SUFFIX`). A new key is needed because the adapter answers a repeated
//!   key with the first outcome (RETAINED); the suffix keeps the key stable across retries of
//!   this phase, so the erasure of the rest is still done once. The adapter sees a new task
//!   with the same `request_id`. If it answers RETAINED with a date that has already passed
//!   (it keeps data past its own date, or replayed its first answer), the task fails for an
//!   operator instead of being re-run in a loop.
//!
//! # Supported kinds
//! `supported_kinds` in the configuration wins. Without it the adapter's `Describe` is asked
//! once, lazily on the first task (never at start, so a subprocessor that is down for hours
//! does not block the processor), and the answer is cached. A transient Describe failure is
//! not cached (asked again on the next task); any other failure, or an empty list, is cached
//! as "unknown" and every kind is then passed on to `Execute`, which answers for itself.
//!
//! # Exports
//! The protocol carries an export in one `ExecuteResponse.export_json` of at most 16 MiB, so
//! the adapter's part of a package is small and bounded: it is checked to be JSON and written
//! as it came, as `export.json` in the task's folder. (Paging would matter only for larger
//! exports, which the protocol does not allow.)
//!
//! # Outcomes and errors
//! COMPLETED, NOT_FOUND, RETAINED, ACCEPTED and REFUSED map to the [`Outcome`] of the same
//! name; FAILED, UNSPECIFIED and malformed answers (invalid export JSON, RETAINED without a
//! legal basis or date) are permanent errors. gRPC UNAVAILABLE, DEADLINE_EXCEEDED,
//! RESOURCE_EXHAUSTED, ABORTED, errors raised by the transport itself (connection refused,
//! TLS failures, resets) and calls exceeding `timeout_ms` are transient; every other status
//! is permanent and reported with its code and message.
//!
//! # Tracing
//! Every call is built by `AdapterConnector::outgoing`, which sets the deadline and injects
//! the current span's W3C trace context, so that the adapter's spans join the task's trace.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use dsrelay_proto::tonic::transport::{Channel, Uri};
use dsrelay_proto::tonic::{self, Code, Status};
use dsrelay_proto::v1::subprocessor_adapter_client::SubprocessorAdapterClient;
use dsrelay_proto::v1::{
    DescribeRequest, ExecuteOutcome, ExecuteRequest, ExecuteResponse, GetTaskStatusRequest,
    RequestKind, Scope,
};
use dsrelay_proto::{millis_from_timestamp, timestamp_from_millis};
use dsrelay_runtime::tls::TlsFiles;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::export::JSON;
use crate::{kind_label, BoxFuture, Connector, ConnectorError, ExportedFile, Outcome, Phase, Task};

/// Appended to the task id to form the idempotency key of the [`Phase::RetentionExpired`]
/// call.
const RETENTION_EXPIRED_SUFFIX: &str = "#retention-expired";

/// The default deadline of one call (ms).
const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// The longest deadline accepted (ms): a call must end well within the processor's task
/// lease.
const MAX_TIMEOUT_MS: u64 = 300_000;

/// Largest answer accepted: the 16 MiB export the protocol allows plus room for the rest.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024 + 64 * 1024;

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
    /// `rectification`, `restriction`, `objection`). When absent the adapter's Describe is
    /// asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supported_kinds: Option<Vec<String>>,
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
    /// Every problem with the configuration; empty when usable. TLS files are read by
    /// [`build`](crate::build).
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
        if !(1..=MAX_TIMEOUT_MS).contains(&self.timeout_ms) {
            out.push(format!(
                "timeout_ms: must be 1 to {MAX_TIMEOUT_MS}, got {}",
                self.timeout_ms
            ));
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
                         transfer, rectification, restriction, objection"
                    ));
                }
            }
        }
        out
    }
}

/// See the module documentation.
pub(crate) struct AdapterConnector {
    endpoint: String,
    client: SubprocessorAdapterClient<Channel>,
    timeout: Duration,
    /// From the configuration; `None` means ask Describe.
    configured: Option<BTreeSet<i32>>,
    /// Describe's answer once known; `None` inside means "unknown, let Execute answer".
    described: OnceCell<Option<BTreeSet<i32>>>,
}

impl std::fmt::Debug for AdapterConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterConnector")
            .field("endpoint", &self.endpoint)
            .field("timeout", &self.timeout)
            .field("configured", &self.configured)
            .field("described", &self.described.get())
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
        let tls = config
            .tls
            .client_config()
            .context("loading the TLS files for the adapter")?;
        let channel =
            dsrelay_runtime::tls::channel(&config.endpoint, Some(config.identity.clone()), &tls)?;
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
            timeout: Duration::from_millis(config.timeout_ms),
            configured,
            described: OnceCell::new(),
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
        match result {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(status_error(rpc, &self.endpoint, &status)),
            Err(_) => Err(ConnectorError::Transient(format!(
                "adapter {} at {}: no answer within {} ms",
                rpc,
                self.endpoint,
                self.timeout.as_millis()
            ))),
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

    /// Asks Describe; `Ok(None)` when the answer does not say (failed for good, or listed no
    /// kinds), `Err` when it may say later.
    async fn describe(&self) -> Result<Option<BTreeSet<i32>>, ConnectorError> {
        let mut client = self.client.clone();
        let request = self.outgoing(DescribeRequest {});
        let result = tokio::time::timeout(self.timeout, client.describe(request)).await;
        match self.finish("Describe", result) {
            Ok(d) => {
                let kinds: BTreeSet<i32> = d
                    .supported_kinds
                    .into_iter()
                    .filter(|k| *k != RequestKind::Unspecified as i32)
                    .collect();
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
                    error = %e,
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
                tracing::debug!(endpoint = %self.endpoint, error = %e, "adapter Describe unavailable");
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
                    finish(task, &task.task_id, response).await
                }
                Phase::Confirm { handle } => {
                    let response = self.task_status(handle).await?;
                    finish(task, handle, response).await
                }
                Phase::RetentionExpired => {
                    let key = retention_expired_key(&task.task_id);
                    let response = self.execute(task, &key).await?;
                    match outcome_from_response(&key, response)? {
                        Outcome::Retained { until_ms, .. } if until_ms <= task.now_ms => {
                            Err(ConnectorError::Permanent(format!(
                                "the adapter still retains data after its retain-until date \
                                 ({until_ms} ms since the epoch); an operator must check it"
                            )))
                        }
                        other => Ok(other),
                    }
                }
            }
        })
    }
}

/// The idempotency key of the [`Phase::RetentionExpired`] call for `task_id`.
fn retention_expired_key(task_id: &str) -> String {
    format!("{task_id}{RETENTION_EXPIRED_SUFFIX}")
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

/// Turns an adapter's answer to `task` into an [`Outcome`], writing a completed export into
/// the task's folder as `export.json`.
async fn finish(
    task: &Task,
    handle: &str,
    mut response: ExecuteResponse,
) -> Result<Outcome, ConnectorError> {
    let export = std::mem::take(&mut response.export_json);
    let mut outcome = outcome_from_response(handle, response)?;
    if let Outcome::Completed { files, .. } = &mut outcome {
        // Data the request did not ask for is not kept.
        if matches!(task.kind, RequestKind::ReturnOfData | RequestKind::Transfer) {
            *files = vec![write_export(task, &export).await?];
        }
    }
    Ok(outcome)
}

/// Checks that the adapter's `export_json` is JSON and writes it as `export.json`. The
/// protocol bounds it to 16 MiB in one message, which is what this connector holds of it.
async fn write_export(task: &Task, export: &[u8]) -> Result<ExportedFile, ConnectorError> {
    if export.is_empty() {
        return Err(ConnectorError::Permanent(format!(
            "the adapter completed {} without export_json",
            kind_label(task.kind)
        )));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(export).map_err(|e| {
        ConnectorError::Permanent(format!("the adapter's export_json is not valid JSON: {e}"))
    })?;
    let mut file = task.export_sink()?.file("export.json", JSON).await?;
    file.write(export).await?;
    file.finish().await
}

/// Turns an adapter's answer into an [`Outcome`] (a COMPLETED one without
/// files: [`finish`] writes them); `handle` is the key
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
            if response.legal_basis.trim().is_empty() {
                return Err(ConnectorError::Permanent(
                    "the adapter answered RETAINED without a legal_basis".into(),
                ));
            }
            let Some(until) = response.retain_until.as_ref() else {
                return Err(ConnectorError::Permanent(
                    "the adapter answered RETAINED without retain_until".into(),
                ));
            };
            Ok(Outcome::Retained {
                legal_basis: clip(response.legal_basis),
                until_ms: millis_from_timestamp(until),
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

/// Classifies a failed call: conditions that pass by themselves are transient, the rest
/// permanent. A status carrying a source error was raised by the transport on our side
/// (connection refused, TLS, reset), not answered by the adapter, and is transient.
fn status_error(rpc: &str, endpoint: &str, status: &Status) -> ConnectorError {
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
        }
    }

    fn task(phase: Phase) -> Task {
        Task {
            task_id: "controller/r1/newsletter".into(),
            request_id: "r1".into(),
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
        let mut c = config(TlsFiles {
            ca: "ca.pem".into(),
            cert: "p.pem".into(),
            key: "p.key".into(),
        });
        assert!(c.validate().is_empty());
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
        c.supported_kinds = Some(vec![]);
        assert!(c
            .validate()
            .iter()
            .any(|p| p.starts_with("supported_kinds:")));
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
        assert!(c.validate().is_empty());
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
        let mut no_basis = r;
        no_basis.legal_basis.clear();
        assert!(outcome_from_response("h", no_basis).is_err());
    }

    #[tokio::test]
    async fn writes_exports_into_the_task_folder() {
        let dir = tempfile::tempdir().unwrap();
        let task = |kind| Task {
            task_id: "c/r-1/crm".into(),
            request_id: "r-1".into(),
            kind,
            identities: Vec::new(),
            categories: Vec::new(),
            parameters: Default::default(),
            due_at_ms: 0,
            now_ms: 0,
            phase: Phase::Start,
            export: Some(crate::ExportSink::new(
                dir.path().join(kind_label(kind)),
                vec!["crm".into()],
            )),
        };
        let mut r = response(ExecuteOutcome::Completed);
        let body = br#"{"subscribers":[{"name":"A"}]}"#;
        r.export_json = body.to_vec();
        let t = task(RequestKind::ReturnOfData);
        let Outcome::Completed { files, .. } = finish(&t, "h", r.clone()).await.unwrap() else {
            panic!("not completed");
        };
        assert_eq!(files.len(), 1);
        assert_eq!((files[0].name.as_str(), files[0].size), ("export.json", 30));
        let path = t.export.as_ref().unwrap().dir().join("export.json");
        assert_eq!(std::fs::read(path).unwrap(), body);
        // Not kept for kinds that did not ask for data.
        let t = task(RequestKind::Erasure);
        let Outcome::Completed { files, .. } = finish(&t, "h", r.clone()).await.unwrap() else {
            panic!("not completed");
        };
        assert!(files.is_empty());
        assert!(!t.export.as_ref().unwrap().dir().exists());
        r.export_json = b"{not json".to_vec();
        let e = finish(&task(RequestKind::Transfer), "h", r.clone())
            .await
            .unwrap_err();
        assert!(
            !e.is_transient() && e.to_string().contains("not valid JSON"),
            "{e}"
        );
        r.export_json.clear();
        assert!(finish(&task(RequestKind::ReturnOfData), "h", r)
            .await
            .is_err());
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
    }

    #[test]
    fn builds_the_execute_body() {
        let t = task(Phase::Start);
        let body = execute_request(&t, &retention_expired_key(&t.task_id));
        assert_eq!(body.task_id, "controller/r1/newsletter#retention-expired");
        assert_eq!(body.request_id, "r1");
        assert_eq!(body.kind, RequestKind::Erasure as i32);
        assert_eq!(
            body.scope.unwrap().data_categories,
            vec!["marketing".to_string()]
        );
        assert_eq!(millis_from_timestamp(&body.due_at.unwrap()), t.due_at_ms);
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
            Phase::RetentionExpired,
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
