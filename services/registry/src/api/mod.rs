//! The registry's gRPC handlers, over the shared state.
//!
//! # Layout
//! - `partner`: the partner API (`RequestService`): submit, get, list, watch, cancel,
//!   extend a due date, events, the processing chain, the audit trail.
//! - `audit`: the audit trail's signed checkpoints (`ListAuditCheckpoints`).
//! - `acknowledgement`: the acknowledgement API (`AcknowledgementService`) processors
//!   report task states through.
//! - `packages`: return-of-data packages: processors upload export files and declare parts
//!   complete (`ExportUploadService`); partners and operators read and download them
//!   (`PackageService`).
//! - `certificates`: deletion certificates: checking each one that comes with an
//!   acknowledgement, and reading them (`CertificateService`).
//! - `contracts`: contract ends (`ContractService`, operators only): ending a contract with
//!   a processor, following it, the deferred choice and the confirmation of the returned
//!   package.
//! - `watch`: the event stream behind Watch.
//! - `views`: stored rows → protocol messages.
//!
//! Who may call what is [`crate::auth`]; errors become statuses by the rules of
//! [`dsrelay_runtime::grpc::error`]; the caller's trace is continued by the layer the server
//! builder installs, so each handler only opens its span.

use std::sync::Arc;

use dsrelay_proto::v1::Request;
use dsrelay_runtime::identity::request_id_violation;

use crate::app::Shared;
use crate::auth::{Caller, Party};
use crate::error::ApiError;
use crate::store::RequestRow;
use crate::validate::{text_violation, MAX_TEXT};

pub(crate) use packages::Uploading;

pub(crate) mod acknowledgement;
mod audit;
mod certificates;
mod contracts;
#[cfg(test)]
mod hidden_tests;
mod packages;
mod partner;
#[cfg(test)]
mod text_tests;
mod views;
pub(crate) mod watch;

/// Implements every registry service over the shared state.
#[derive(Clone)]
pub(crate) struct Api {
    shared: Arc<Shared>,
}

impl Api {
    /// Handlers over `shared`.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The id of the request `owner` stored under `idempotency_key` with the body whose hash
    /// is `hash`, if any: a retry of a Submit or an EndContract already made is answered with
    /// it even once a rule that depends on the time or the configuration no longer holds for
    /// the same body. A key that breaks its own rules (control characters, say) is never
    /// looked up: it was never stored, and a database may refuse it as text.
    async fn stored_with_body(
        &self,
        owner: &str,
        idempotency_key: &str,
        hash: &str,
    ) -> Result<Option<String>, ApiError> {
        if crate::validate::idempotency_key_violation(idempotency_key).is_some() {
            return Ok(None);
        }
        let stored = self
            .shared
            .store
            .request_by_key(owner, idempotency_key)
            .await
            .map_err(ApiError::from)?;
        Ok(stored
            .filter(|(_, stored)| stored == hash)
            .map(|(id, _)| id))
    }

    /// The caller of the partner API: a partner or an operator.
    fn partner_api_caller<T>(&self, req: &tonic::Request<T>) -> Result<Caller, ApiError> {
        Ok(self
            .shared
            .auth
            .require(req, &[Party::Partner, Party::Operator], |c| {
                format!("processor {} may only call the acknowledgement API", c.name)
            })?)
    }

    /// Loads a request the caller may see; another partner's request is NOT_FOUND, answered
    /// by the same read that answers for one that does not exist (the partner is part of its
    /// key), so neither the answer nor its time tells them apart.
    async fn visible(&self, caller: &Caller, id: &str) -> Result<RequestRow, ApiError> {
        ApiError::ensure_valid(request_id_violation("request_id", id))?;
        let row = self
            .shared
            .store
            .request_of(id, only_of(caller))
            .await?
            .ok_or_else(|| not_found(id))?;
        shown_to(caller, &row)?;
        Ok(row)
    }

    /// The views of a page of requests, with two queries for all their deliveries and tasks
    /// rather than two per request.
    async fn views(
        &self,
        reader: views::Reader,
        rows: Vec<RequestRow>,
    ) -> Result<Vec<Request>, ApiError> {
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let mut deliveries = self.shared.store.deliveries_of(&ids).await?;
        let mut tasks = self.shared.store.tasks_of(&ids).await?;
        let now = self.shared.clock.now_ms();
        Ok(rows
            .into_iter()
            .map(|row| {
                let d = deliveries.remove(&row.id).unwrap_or_default();
                let t = tasks.remove(&row.id).unwrap_or_default();
                views::request_for(reader, row, d, t, now)
            })
            .collect())
    }

    /// The request `id` as `caller` may see it (NOT_FOUND for another partner's, before
    /// anything but the request's key is read: see [`Api::visible`]), its state, deliveries
    /// and tasks read from one snapshot.
    async fn visible_view(&self, caller: &Caller, id: &str) -> Result<Request, ApiError> {
        ApiError::ensure_valid(request_id_violation("request_id", id))?;
        let (row, deliveries, tasks) = self
            .shared
            .store
            .request_of_with_tasks(id, only_of(caller))
            .await?
            .ok_or_else(|| not_found(id))?;
        shown_to(caller, &row)?;
        Ok(views::request_for(
            views::Reader::of(caller),
            row,
            deliveries,
            tasks,
            self.shared.clock.now_ms(),
        ))
    }

    /// The view of `row` for `reader`: its deliveries and tasks as of now.
    async fn view(&self, reader: views::Reader, row: RequestRow) -> Result<Request, ApiError> {
        let deliveries = (self.shared.store)
            .deliveries_with_follow_ups(&row.id)
            .await?;
        let tasks = self.shared.store.tasks(&row.id).await?;
        Ok(views::request_for(
            reader,
            row,
            deliveries,
            tasks,
            self.shared.clock.now_ms(),
        ))
    }
}

/// The partner whose requests alone `caller` may see: a partner its own, an operator every
/// one (`None`).
fn only_of(caller: &Caller) -> Option<&str> {
    (caller.role == Party::Partner).then_some(caller.name.as_str())
}

/// Operators see every request, a partner only its own: another partner's is NOT_FOUND.
/// The reads of [`Api::visible`] already leave another partner's out; checked again after
/// them, so that a change to a read cannot show one.
fn shown_to(caller: &Caller, row: &RequestRow) -> Result<(), ApiError> {
    if caller.role == Party::Partner && caller.name != row.partner {
        return Err(not_found(&row.id));
    }
    Ok(())
}

/// The same answer whether the request does not exist or belongs to another partner, so
/// ids cannot be probed.
fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("request {id} not found"))
}

/// A required free-text field (a reason) within the common length.
fn check_text(field: &str, value: &str) -> Result<(), ApiError> {
    ApiError::ensure_valid(text_violation(field, value, MAX_TEXT, true))
}
