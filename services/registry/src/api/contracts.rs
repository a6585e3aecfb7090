//! Contract ends (`ContractService`, operators only): ending the contract with a processor,
//! following it, making the deferred choice and confirming the returned package.
//!
//! A contract end is a request of kind CONTRACT_END, stored through the Submit path's group
//! commit (`crate::intake`) with its one delivery and its terms (`contracts` table) in one
//! transaction. A later choice or confirmation changes the stored terms and re-arms the
//! contract end's one `update` outbox row, which the dispatcher sends as
//! `ProcessorService.UpdateContractEnd` with the terms as they stand at send time.

use std::collections::BTreeSet;

use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::contract_service_server::ContractService;
use dsrelay_proto::v1::{
    ChooseContractEndRequest, ConfirmReturnRequest, Contract, ContractEnd, ContractEndChoice,
    ContractList, ContractPhase, EndContractRequest, GetContractRequest, ListContractsRequest,
    RequestKind, RequestParameters, SubmitRequest, TaskStatus,
};
use dsrelay_proto::{millis_from_timestamp, timestamp_from_millis};
use dsrelay_runtime::clock::date_label;
use dsrelay_runtime::grpc::CallerTrace;
use dsrelay_runtime::identity::{
    instant_violation, keyed_digest, request_id_violation, FieldViolation,
};
use dsrelay_runtime::names::{unknown_name, PartyKind};
use dsrelay_runtime::trace_context;
use sha2::{Digest, Sha256};
use tonic::{Response, Status};

use crate::auth::{Caller, Party};
use crate::deadline::{contract_end_due_at, grace_ends_at, CONTRACT_END_DUE_DAYS};
use crate::error::ApiError;
use crate::fold::request_is_terminal;
use crate::store::{ContractChange, ContractRow, DeliveryRow, Inserted, NewContract, NewRequest};
use crate::validate::text_violation;

use super::Api;

/// The idempotency hash of an encoded EndContract body, keyed like Submit's but in its own
/// domain, so a Submit and an EndContract never share a key by accident.
fn body_hash(key: &[u8], encoded: &[u8]) -> String {
    keyed_digest(key, b"dsrelay.end-contract-body.v1", encoded)
}

/// A choice's name without its prefix (`DELETE`).
pub(super) fn choice_name(c: ContractEndChoice) -> &'static str {
    c.as_str_name().trim_start_matches("CONTRACT_END_CHOICE_")
}

/// What is wrong with returning the data to `recipient` under `choice` (an integer from the
/// wire), given the configured recipients: only RETURN_THEN_DELETE returns data, and only to a
/// configured recipient.
pub(crate) fn recipient_violation(
    choice: i32,
    recipient: &str,
    recipients: &BTreeSet<&str>,
) -> Option<FieldViolation> {
    if recipient.is_empty() {
        return None;
    }
    if choice != ContractEndChoice::ReturnThenDelete as i32 {
        return Some(FieldViolation::new(
            "transfer_recipient",
            "is allowed only with RETURN_THEN_DELETE: no other choice returns data",
        ));
    }
    if !recipients.contains(recipient) {
        let known: Vec<&str> = recipients.iter().copied().collect();
        return Some(FieldViolation::new(
            "transfer_recipient",
            format!(
                "{recipient:?} is not a configured recipient; known: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ),
        ));
    }
    None
}

/// The latest effective date whose contract end is still due within the years a timestamp
/// may name (up to 9999): `grace_months` and [`CONTRACT_END_DUE_DAYS`] before that end.
fn latest_effective_at(grace_months: u32) -> i64 {
    let latest = dsrelay_proto::LATEST_INSTANT_SECONDS * 1000;
    chrono::DateTime::from_timestamp_millis(latest - CONTRACT_END_DUE_DAYS * 24 * 3600 * 1000)
        .and_then(|t| t.checked_sub_months(chrono::Months::new(grace_months)))
        .map_or(i64::MIN, |t| t.timestamp_millis())
}

/// Every rule an EndContract body breaks, given the configured processors and recipients,
/// the grace period and the time now.
pub(crate) fn end_contract_violations(
    r: &EndContractRequest,
    processors: &BTreeSet<&str>,
    recipients: &BTreeSet<&str>,
    grace_months: u32,
    now: i64,
) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    if !processors.contains(r.processor.as_str()) {
        let known: Vec<&str> = processors.iter().copied().collect();
        out.push(FieldViolation::new(
            "processor",
            format!(
                "{:?} is not a configured processor; known: {}",
                r.processor,
                known.join(", ")
            ),
        ));
    }
    const END_CHOICES: [ContractEndChoice; 3] = [
        ContractEndChoice::None,
        ContractEndChoice::Delete,
        ContractEndChoice::ReturnThenDelete,
    ];
    if let Err(refused) = choice_of(r.choice, &END_CHOICES) {
        out.push(refused);
    }
    match (&r.effective_at, r.effective_now) {
        (Some(_), true) => out.push(FieldViolation::new(
            "effective_at",
            "give either effective_at or effective_now, not both",
        )),
        (None, false) => out.push(FieldViolation::new(
            "effective_at",
            "is required: give the date the contract ends, or effective_now to end it now",
        )),
        // Stored, an end in no real year would stand in the way of every later contract end
        // with this processor.
        (Some(t), false) if !dsrelay_proto::is_real_instant(t) => {
            out.extend(instant_violation("effective_at", t))
        }
        (Some(t), false) if millis_from_timestamp(t) < now => out.push(FieldViolation::new(
            "effective_at",
            format!(
                "{} is in the past; to end the contract now, set effective_now (dsrctl \
                 contracts end --now) instead of effective_at",
                date_label(millis_from_timestamp(t))
            ),
        )),
        // Its due date would be no real date either, and the processor refuses the terms.
        (Some(t), false) if millis_from_timestamp(t) > latest_effective_at(grace_months) => out
            .push(FieldViolation::new(
                "effective_at",
                format!(
                    "{} is too late: with the grace period of {grace_months} months and the \
                     {CONTRACT_END_DUE_DAYS} days after it, the contract end would be due \
                     after the year 9999; the latest effective date is {}",
                    date_label(millis_from_timestamp(t)),
                    date_label(latest_effective_at(grace_months))
                ),
            )),
        _ => {}
    }
    out.extend(recipient_violation(
        r.choice,
        &r.transfer_recipient,
        recipients,
    ));
    out.extend(crate::validate::idempotency_key_violation(
        &r.idempotency_key,
    ));
    out
}

/// `choice`, the number from the wire, when it is one of `allowed`; else the refusal, which
/// names the value received and says what to give (the proto names, and dsrctl's flags).
fn choice_of(
    choice: i32,
    allowed: &[ContractEndChoice],
) -> Result<ContractEndChoice, FieldViolation> {
    let got = match ContractEndChoice::try_from(choice) {
        Ok(c) if allowed.contains(&c) => return Ok(c),
        Ok(ContractEndChoice::Unspecified) => "UNSPECIFIED: none was given".to_string(),
        Ok(ContractEndChoice::None) => "NONE (choose later), which this call replaces".into(),
        Ok(c) => choice_name(c).to_string(),
        Err(_) => format!("{choice}, which names no choice"),
    };
    let either = |names: Vec<String>| match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.concat(),
    };
    let names = either(
        allowed
            .iter()
            .map(|c| choice_name(*c).to_string())
            .collect(),
    );
    let flags = either(
        (allowed.iter())
            .map(|c| {
                format!(
                    "--choice {}",
                    choice_name(*c).to_lowercase().replace('_', "-")
                )
            })
            .collect(),
    );
    Err(FieldViolation::new(
        "choice",
        format!("must be {names} (got {got}); dsrctl: {flags}"),
    ))
}

/// The choice ChooseContractEnd makes: DELETE or RETURN_THEN_DELETE (NONE is what it
/// replaces).
fn chosen(choice: i32) -> Result<ContractEndChoice, FieldViolation> {
    choice_of(
        choice,
        &[
            ContractEndChoice::Delete,
            ContractEndChoice::ReturnThenDelete,
        ],
    )
}

/// The view of a contract end with its tasks.
/// How `row` is shown with its `tasks`, and its `deliveries` (none in a listing).
fn view(
    row: ContractRow,
    deliveries: Vec<DeliveryRow>,
    tasks: Vec<TaskStatus>,
    deduplicated: bool,
) -> Contract {
    Contract {
        // Operators only, who see why a call failed.
        deliveries: super::views::calls(super::views::Reader::Operator, deliveries),
        contract_id: row.request_id.clone(),
        processor: row.processor.clone(),
        contract_end: Some(row.terms()),
        state: row.state() as i32,
        tasks,
        created_at: Some(timestamp_from_millis(row.received_at)),
        updated_at: Some(timestamp_from_millis(
            row.updated_at.max(row.request_updated_at),
        )),
        trace_id: row.trace_id,
        deduplicated,
        terms_refused: row.terms_refused.unwrap_or_default(),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("contract end {id} not found"))
}

impl Api {
    /// The caller, who must be an operator.
    fn contract_caller<T>(&self, req: &tonic::Request<T>) -> Result<Caller, ApiError> {
        Ok(self.shared.auth.require(req, &[Party::Operator], |c| {
            format!("{} may not manage contract ends: operators only", c.name)
        })?)
    }

    /// The contract end `id` with its tasks, read together, or NOT_FOUND (also for a request
    /// that is not one).
    async fn contract_and_tasks(
        &self,
        id: &str,
    ) -> Result<(ContractRow, Vec<TaskStatus>), ApiError> {
        ApiError::ensure_valid(request_id_violation("contract_id", id))?;
        let (row, _, tasks) = (self.shared.store)
            .contract_with_tasks(id)
            .await?
            .ok_or_else(|| not_found(id))?;
        Ok((row, tasks))
    }

    /// The contract end `id` as shown.
    async fn contract_view(&self, id: &str, deduplicated: bool) -> Result<Contract, ApiError> {
        ApiError::ensure_valid(request_id_violation("contract_id", id))?;
        let (row, deliveries, tasks) = (self.shared.store)
            .contract_with_tasks(id)
            .await?
            .ok_or_else(|| not_found(id))?;
        Ok(view(row, deliveries, tasks, deduplicated))
    }

    /// Refuses a change to a contract end that has finished.
    fn ensure_open(row: &ContractRow) -> Result<(), ApiError> {
        if request_is_terminal(row.state()) {
            return Err(ApiError::failed_precondition(format!(
                "contract end {} has finished ({}); its terms can no longer change",
                row.request_id,
                row.state()
                    .as_str_name()
                    .trim_start_matches("REQUEST_STATE_")
            )));
        }
        Ok(())
    }

    /// Refuses a change once the grace period of `row` has ended by the registry's clock,
    /// saying when and `then`, what became of the data: at that point the processor deletes
    /// it whatever the controller says, so a change accepted here would not be acted on.
    fn ensure_in_grace(&self, row: &ContractRow, then: &str) -> Result<(), ApiError> {
        if self.shared.clock.now_ms() >= row.grace_ends_at {
            return Err(ApiError::failed_precondition(format!(
                "the grace period of contract end {} ended at {}: {then}",
                row.request_id,
                date_label(row.grace_ends_at)
            )));
        }
        Ok(())
    }

    /// Confirms a return to a transfer recipient once the processor accepted the contract
    /// end (until then the registry does not know all its tasks: receipts of some of them
    /// could come first) and every task carries the recipient's receipt: the receipts, not a
    /// package, prove the data arrived.
    async fn confirm_transfer(
        &self,
        caller: &Caller,
        row: &ContractRow,
    ) -> Result<Contract, ApiError> {
        let id = &row.request_id;
        // Before the tasks, as `Store::package` reads them: an acceptance commits with the
        // tasks its answer lists.
        let undelivered = self.shared.store.undelivered(id).await?;
        let (_, tasks) = self.contract_and_tasks(id).await?;
        let without: Vec<&str> = tasks
            .iter()
            .filter(|t| {
                t.evidence
                    .as_ref()
                    .and_then(|e| e.transfer_receipt.as_ref())
                    .is_none()
            })
            .map(|t| t.subprocessor.as_str())
            .collect();
        if !undelivered.is_empty() || tasks.is_empty() || !without.is_empty() {
            let mut waiting = Vec::new();
            if !undelivered.is_empty() {
                waiting.push(format!(
                    "processor {} has not accepted the contract end's delivery yet, so not \
                     all of its subprocessors' tasks are known",
                    undelivered.join(", ")
                ));
            }
            if tasks.is_empty() {
                waiting.push("no subprocessor has reported yet".to_string());
            } else if !without.is_empty() {
                waiting.push(format!("no receipt yet for {}", without.join(", ")));
            }
            let waiting = waiting.join("; ");
            return Err(ApiError::failed_precondition(format!(
                "the return of contract end {id} to {} is not complete: {waiting}; confirm \
                 once every subprocessor's export was received",
                row.transfer_recipient
            )));
        }
        self.change(caller, row, ContractChange::ConfirmReturn(String::new()))
            .await
    }

    /// Applies `change` and answers with the contract end; a change that lost a race with
    /// another is refused as such.
    async fn change(
        &self,
        caller: &Caller,
        row: &ContractRow,
        change: ContractChange,
    ) -> Result<Contract, ApiError> {
        let id = &row.request_id;
        let changed = self
            .shared
            .store
            .change_contract(id, &change, &caller.name, self.shared.clock.now_ms())
            .await?;
        if !changed {
            return Err(ApiError::failed_precondition(format!(
                "contract end {id} changed meanwhile; read it again (dsrctl contracts show {id})"
            )));
        }
        tracing::info!(contract_id = %id, by = %caller.name, ?change, "contract end changed");
        self.shared.dispatch_wakeup.notify_one();
        self.shared.publish(id);
        self.contract_view(id, false).await
    }
}

#[tonic::async_trait]
impl ContractService for Api {
    #[tracing::instrument(name = "end_contract", skip_all, fields(request_id, trace_id))]
    async fn end_contract(
        &self,
        req: tonic::Request<EndContractRequest>,
    ) -> Result<Response<Contract>, Status> {
        let span = tracing::Span::current();
        let caller = self.contract_caller(&req)?;
        let trace_id = trace_context::trace_id_of(&span)
            .or_else(|| CallerTrace::of(&req).map(|t| t.trace_id().to_string()))
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
        let traceparent = trace_context::traceparent_of(&span);
        span.record("trace_id", trace_id.as_str());
        let body = req.into_inner();
        let config = &self.shared.config;
        let now = self.shared.clock.now_ms();
        let processors: BTreeSet<&str> =
            config.processors.iter().map(|p| p.name.as_str()).collect();
        let hash = body_hash(&self.shared.identity_hash_key, &body.encode_to_vec());
        let violations = end_contract_violations(
            &body,
            &processors,
            &config.known_recipients(),
            config.contracts.grace_months,
            now,
        );
        if !violations.is_empty() {
            // A retry of a contract end already made answers it (its effective date may have
            // passed meanwhile, say).
            let existing = self
                .stored_with_body(&caller.name, &body.idempotency_key, &hash)
                .await?;
            if let Some(id) = existing {
                if self
                    .shared
                    .store
                    .contract(&id)
                    .await
                    .map_err(ApiError::from)?
                    .is_some()
                {
                    return Ok(Response::new(self.contract_view(&id, true).await?));
                }
            }
        }
        ApiError::ensure_valid(violations)?;
        let choice = ContractEndChoice::try_from(body.choice).unwrap_or_default();
        let effective_at = body
            .effective_at
            .as_ref()
            .map_or(now, millis_from_timestamp);
        let grace = grace_ends_at(effective_at, config.contracts.grace_months);
        let terms = ContractEnd {
            choice: choice as i32,
            effective_at: Some(timestamp_from_millis(effective_at)),
            grace_ends_at: Some(timestamp_from_millis(grace)),
            return_confirmed: false,
            transfer_recipient: body.transfer_recipient.clone(),
        };
        // The body says what was asked, for Get; the dispatcher sends the terms from the
        // `contracts` table, which later changes update.
        let stored = SubmitRequest {
            kind: RequestKind::ContractEnd as i32,
            idempotency_key: body.idempotency_key.clone(),
            parameters: Some(RequestParameters {
                contract_end: Some(terms),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = uuid::Uuid::now_v7().to_string();
        let new = NewRequest {
            id: id.clone(),
            partner: caller.name.clone(),
            idempotency_key: body.idempotency_key.clone(),
            body_hash: hash,
            body: stored.encode_to_vec(),
            identity_hashes: "[]".into(),
            kind: RequestKind::ContractEnd as i32,
            received_at: now,
            due_at: contract_end_due_at(grace),
            trace_id,
            traceparent,
            processors: vec![body.processor.clone()],
        };
        let contract = NewContract {
            choice: choice as i32,
            effective_at,
            grace_ends_at: grace,
            transfer_recipient: body.transfer_recipient.clone(),
        };
        let inserted = self
            .shared
            .intake
            .end_contract(new, contract)
            .await
            .map_err(ApiError::from)?;
        let (contract_id, deduplicated) = match inserted {
            Inserted::New => {
                self.shared.dispatch_wakeup.notify_one();
                self.shared.publish(&id);
                (id, false)
            }
            Inserted::Existing(existing) => (existing, true),
            Inserted::Conflict(existing) => {
                return Err(ApiError::already_exists(format!(
                    "idempotency_key {:?} was already used for request {existing} with a \
                     different body; use a new key for a new contract end",
                    body.idempotency_key
                ))
                .into())
            }
            Inserted::Running(running) => {
                return Err(ApiError::failed_precondition(format!(
                    "contract end {running} with processor {} has not finished; follow it \
                     with dsrctl contracts show {running}",
                    body.processor
                ))
                .into())
            }
        };
        span.record("request_id", contract_id.as_str());
        tracing::info!(
            contract_id = %contract_id,
            processor = %body.processor,
            choice = choice_name(choice),
            deduplicated,
            "contract end created"
        );
        Ok(Response::new(
            self.contract_view(&contract_id, deduplicated).await?,
        ))
    }

    async fn get_contract(
        &self,
        req: tonic::Request<GetContractRequest>,
    ) -> Result<Response<Contract>, Status> {
        self.contract_caller(&req)?;
        Ok(Response::new(
            self.contract_view(&req.get_ref().contract_id, false)
                .await?,
        ))
    }

    async fn list_contracts(
        &self,
        req: tonic::Request<ListContractsRequest>,
    ) -> Result<Response<ContractList>, Status> {
        self.contract_caller(&req)?;
        let processor = &req.get_ref().processor;
        // Any name, since contract ends outlive a processor's removal from the
        // configuration; held to the rules of every text all the same.
        ApiError::ensure_valid(text_violation("processor", processor, 128, false))?;
        let (rows, mut tasks) = self
            .shared
            .store
            .contracts_with_tasks((!processor.is_empty()).then_some(processor.as_str()))
            .await
            .map_err(ApiError::from)?;
        if rows.is_empty() {
            let configured: Vec<&str> = (self.shared.config.processors.iter())
                .map(|p| p.name.as_str())
                .collect();
            if let Some(message) = unknown_name(PartyKind::Processor, processor, &configured) {
                return Err(ApiError::not_found(message).into());
            }
        }
        let contracts = rows
            .into_iter()
            .map(|r| {
                let t = tasks.remove(&r.request_id).unwrap_or_default();
                view(r, Vec::new(), t, false)
            })
            .collect();
        Ok(Response::new(ContractList { contracts }))
    }

    async fn choose_contract_end(
        &self,
        req: tonic::Request<ChooseContractEndRequest>,
    ) -> Result<Response<Contract>, Status> {
        let caller = self.contract_caller(&req)?;
        let r = req.into_inner();
        let choice = chosen(r.choice).map_err(|v| ApiError::invalid([v]))?;
        ApiError::ensure_valid(recipient_violation(
            r.choice,
            &r.transfer_recipient,
            &self.shared.config.known_recipients(),
        ))?;
        let (row, tasks) = self.contract_and_tasks(&r.contract_id).await?;
        Self::ensure_open(&row)?;
        if row.choice() != ContractEndChoice::None {
            return Err(ApiError::failed_precondition(format!(
                "contract end {} has the choice {} already, which is final (a choice is made \
                 once, on a contract end made without one)",
                row.request_id,
                choice_name(row.choice())
            ))
            .into());
        }
        self.ensure_in_grace(
            &row,
            "the processor deletes the data, and no choice can be made any more",
        )?;
        // The processor's clock decides when its grace period ends; once it reported deleting,
        // a choice would be accepted here and refused there.
        let deleting = deleting_subprocessors(&tasks);
        if !deleting.is_empty() {
            return Err(ApiError::failed_precondition(format!(
                "the processor of contract end {} has started deleting ({}): the grace period \
                 ended there, and no choice can be made any more",
                row.request_id,
                deleting.join(", ")
            ))
            .into());
        }
        Ok(Response::new(
            self.change(
                &caller,
                &row,
                ContractChange::Choose(choice, r.transfer_recipient.clone()),
            )
            .await?,
        ))
    }

    async fn confirm_return(
        &self,
        req: tonic::Request<ConfirmReturnRequest>,
    ) -> Result<Response<Contract>, Status> {
        let caller = self.contract_caller(&req)?;
        let r = req.into_inner();
        let digest = r.manifest_sha256.to_ascii_lowercase();
        let (row, tasks) = self.contract_and_tasks(&r.contract_id).await?;
        let id = row.request_id.clone();
        // The choice first: a digest's form matters only where there is something to confirm.
        if row.choice() != ContractEndChoice::ReturnThenDelete {
            return Err(ApiError::failed_precondition(format!(
                "contract end {id} is {}; only RETURN_THEN_DELETE returns a package to confirm",
                choice_name(row.choice())
            ))
            .into());
        }
        let transfer = !row.transfer_recipient.is_empty();
        if transfer && !digest.is_empty() {
            return Err(ApiError::invalid([FieldViolation::new(
                "manifest_sha256",
                format!(
                    "must be empty: contract end {id} returns the data to {}, whose receipts \
                     are the proof; there is no package",
                    row.transfer_recipient
                ),
            )])
            .into());
        }
        if !transfer && digest.is_empty() {
            return Err(ApiError::invalid([FieldViolation::new(
                "manifest_sha256",
                format!(
                    "required for contract end {id}, which returns a package: its manifest.json's \
                     SHA-256 (dsrctl contracts confirm ID --package DIR, after dsrctl download \
                     ID --out DIR)"
                ),
            )])
            .into());
        }
        if !transfer && !dsrelay_runtime::export_files::is_sha256(&digest) {
            return Err(ApiError::invalid([FieldViolation::new(
                "manifest_sha256",
                "must be 64 hex digits: the SHA-256 of the package's manifest.json",
            )])
            .into());
        }
        if row.return_confirmed != 0 {
            if row.manifest_sha256.as_deref() == Some(digest.as_str()) {
                // The same confirmation again: already done.
                return Ok(Response::new(self.contract_view(&id, false).await?));
            }
            return Err(ApiError::failed_precondition(format!(
                "contract end {id} was confirmed already, with manifest sha256 {}",
                row.manifest_sha256.as_deref().unwrap_or("?")
            ))
            .into());
        }
        Self::ensure_open(&row)?;
        // After the checks of a repeated confirmation: one recorded in time stays answered.
        self.ensure_in_grace(
            &row,
            "the processor deletes the returned data then without a confirmation, and the \
             return can no longer be confirmed",
        )?;
        // The processor's clock decides when its grace period ends: deleting with no
        // confirmation recorded means it ended there unconfirmed.
        let deleting = deleting_subprocessors(&tasks);
        if !deleting.is_empty() {
            return Err(ApiError::failed_precondition(format!(
                "the processor of contract end {id} has started deleting ({}) at the end of its \
                 grace period without a confirmation: the return can no longer be confirmed",
                deleting.join(", ")
            ))
            .into());
        }
        if transfer {
            return Ok(Response::new(self.confirm_transfer(&caller, &row).await?));
        }
        let request = self
            .shared
            .store
            .request(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| not_found(&id))?;
        let standing = super::packages::package_standing(&self.shared, &request).await?;
        // A holder whose return failed has no part, and none is to come: confirming would
        // have the others' data deleted while the controller never got that holder's, so it
        // is refused as for a transfer without a receipt. Named first: when every return
        // failed the package is never complete, and only this says why.
        if !standing.unreturned.is_empty() {
            return Err(ApiError::failed_precondition(format!(
                "the return of {} ended without its part: that data was neither returned nor \
                 deleted, so the package is not all of the data; see why with dsrctl contracts \
                 show {id}",
                standing.unreturned_named()
            ))
            .into());
        }
        if !standing.info.complete {
            let waiting = match standing.waiting_for() {
                w if w.is_empty() => "no subprocessor's part is stored yet".to_string(),
                w => w,
            };
            return Err(ApiError::failed_precondition(format!(
                "the package of contract end {id} is not complete: {waiting}; confirm once \
                 every subprocessor's part is stored and the package was downloaded and \
                 verified"
            ))
            .into());
        }
        let actual = hex::encode(Sha256::digest(&standing.info.manifest_json));
        if actual != digest {
            return Err(ApiError::failed_precondition(format!(
                "manifest_sha256 {digest} differs from the SHA-256 of the package's \
                 manifest.json: the package changed since it was downloaded, or another was \
                 given; download it again into a new folder (dsrctl download {id} --out \
                 NEW_DIR: a folder holding the older version is refused), then confirm with \
                 that folder"
            ))
            .into());
        }
        Ok(Response::new(
            self.change(&caller, &row, ContractChange::ConfirmReturn(digest))
                .await?,
        ))
    }
}

/// The subprocessors whose tasks the processor reported deleting (or done deleting).
fn deleting_subprocessors(tasks: &[TaskStatus]) -> Vec<&str> {
    (tasks.iter())
        .filter(|t| {
            t.progress.as_ref().is_some_and(|p| {
                p.phase == ContractPhase::Deleting as i32 || p.phase == ContractPhase::Done as i32
            })
        })
        .map(|t| t.subprocessor.as_str())
        .collect()
}

#[cfg(test)]
mod grace_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::MAX_IDEMPOTENCY_KEY;

    const NOW: i64 = 1_800_000_000_000;
    const GRACE: u32 = 6;

    fn good() -> EndContractRequest {
        EndContractRequest {
            processor: "payroll".into(),
            choice: ContractEndChoice::Delete as i32,
            effective_at: Some(timestamp_from_millis(NOW + 1000)),
            effective_now: false,
            idempotency_key: "k".into(),
            transfer_recipient: String::new(),
        }
    }

    fn recipients() -> BTreeSet<&'static str> {
        ["new-bookkeeper", "successor"].into()
    }

    fn fields(r: &EndContractRequest) -> Vec<String> {
        let known: BTreeSet<&str> = ["payroll", "web"].into();
        end_contract_violations(r, &known, &recipients(), GRACE, NOW)
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn end_contract_rules() {
        assert!(fields(&good()).is_empty());
        let mut r = good();
        r.processor = "nobody".into();
        let known: BTreeSet<&str> = ["payroll", "web"].into();
        let v = end_contract_violations(&r, &known, &recipients(), GRACE, NOW);
        assert_eq!(v[0].field, "processor");
        assert!(v[0].rule.contains("payroll, web"), "{}", v[0].rule);

        for c in [0, 99] {
            let mut r = good();
            r.choice = c;
            assert_eq!(fields(&r), ["choice"]);
        }
        let mut r = good();
        r.choice = ContractEndChoice::None as i32;
        assert!(fields(&r).is_empty());

        let mut r = good();
        r.effective_at = Some(timestamp_from_millis(NOW - 1));
        let v = end_contract_violations(&r, &known, &recipients(), GRACE, NOW);
        assert_eq!(v.len(), 1);
        // gRPC callers set the field; dsrctl's users pass the flag.
        for words in ["effective_now", "--now"] {
            assert!(v[0].rule.contains(words), "{words} in {}", v[0].rule);
        }

        let mut r = good();
        r.effective_now = true;
        assert_eq!(fields(&r), ["effective_at"]);
        r.effective_at = None;
        assert!(fields(&r).is_empty());
        r.effective_now = false;
        assert_eq!(fields(&r), ["effective_at"]);

        // The latest date whose contract end is due by the end of 9999, and a day later.
        let latest = latest_effective_at(GRACE);
        assert_eq!(date_label(latest), "9999-06-01T23:59:59Z");
        assert_eq!(
            contract_end_due_at(grace_ends_at(latest, GRACE)),
            dsrelay_proto::LATEST_INSTANT_SECONDS * 1000
        );
        let mut r = good();
        r.effective_at = Some(timestamp_from_millis(latest));
        assert!(fields(&r).is_empty());
        r.effective_at = Some(timestamp_from_millis(latest + 24 * 3600 * 1000));
        let v = end_contract_violations(&r, &known, &recipients(), GRACE, NOW);
        assert_eq!(v.len(), 1);
        assert!(
            v[0].rule
                .contains("latest effective date is 9999-06-01T23:59:59Z"),
            "{}",
            v[0].rule
        );

        let mut r = good();
        r.idempotency_key = String::new();
        assert_eq!(fields(&r), ["idempotency_key"]);
        r.idempotency_key = "k".repeat(MAX_IDEMPOTENCY_KEY + 1);
        assert_eq!(fields(&r), ["idempotency_key"]);
    }

    #[test]
    fn a_choice_refused_says_which_and_what_to_give() {
        for c in [
            ContractEndChoice::Delete,
            ContractEndChoice::ReturnThenDelete,
        ] {
            assert_eq!(chosen(c as i32).ok(), Some(c));
        }
        let none = chosen(ContractEndChoice::None as i32).unwrap_err();
        assert_eq!(none.field, "choice");
        for words in ["NONE", "DELETE or RETURN_THEN_DELETE", "--choice delete"] {
            assert!(none.rule.contains(words), "{words} in {}", none.rule);
        }
        assert!(!none.rule.contains("got 1"), "{}", none.rule);
        let unspecified = chosen(0).unwrap_err();
        assert!(
            unspecified.rule.contains("UNSPECIFIED"),
            "{}",
            unspecified.rule
        );
        let unknown = chosen(99).unwrap_err();
        assert!(unknown.rule.contains("got 99"), "{}", unknown.rule);
    }

    /// EndContract names a choice left UNSPECIFIED as such, not by its number, and says
    /// which to give.
    #[test]
    fn an_end_without_a_choice_says_so() {
        let mut r = good();
        r.choice = ContractEndChoice::Unspecified as i32;
        let known: BTreeSet<&str> = ["payroll", "web"].into();
        let v = end_contract_violations(&r, &known, &recipients(), GRACE, NOW);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].field, "choice");
        for words in [
            "got UNSPECIFIED",
            "NONE, DELETE or RETURN_THEN_DELETE",
            "--choice none, --choice delete or --choice return-then-delete",
        ] {
            assert!(v[0].rule.contains(words), "{words} in {}", v[0].rule);
        }
        assert!(!v[0].rule.contains("got 0"), "{}", v[0].rule);
    }

    #[test]
    fn a_transfer_recipient_must_be_configured_and_return_the_data() {
        let mut r = good();
        r.choice = ContractEndChoice::ReturnThenDelete as i32;
        r.transfer_recipient = "successor".into();
        assert!(fields(&r).is_empty());

        r.transfer_recipient = "stranger".into();
        let known: BTreeSet<&str> = ["payroll", "web"].into();
        let v = end_contract_violations(&r, &known, &recipients(), GRACE, NOW);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].field, "transfer_recipient");
        assert!(
            v[0].rule.contains("new-bookkeeper, successor"),
            "{}",
            v[0].rule
        );
        let none = recipient_violation(r.choice, "stranger", &BTreeSet::new()).unwrap();
        assert!(none.rule.contains("known: none"), "{}", none.rule);

        for c in [ContractEndChoice::Delete, ContractEndChoice::None] {
            let mut r = good();
            r.choice = c as i32;
            r.transfer_recipient = "successor".into();
            let v = end_contract_violations(&r, &known, &recipients(), GRACE, NOW);
            assert_eq!(v.len(), 1, "{c:?}");
            assert!(v[0].rule.contains("RETURN_THEN_DELETE"), "{}", v[0].rule);
        }
        // ChooseContractEnd applies the same rule.
        assert!(
            recipient_violation(ContractEndChoice::Delete as i32, "successor", &recipients())
                .is_some()
        );
        assert!(recipient_violation(ContractEndChoice::Delete as i32, "", &recipients()).is_none());
    }
}
