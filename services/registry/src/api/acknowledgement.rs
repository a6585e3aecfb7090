//! The acknowledgement API (`AcknowledgementService`): processors report the state of the
//! tasks of requests delivered to them, in batches. A COMPLETED TRANSFER task must come with
//! the recipient's receipt (`evidence.transfer_receipt`), and a COMPLETED RETURN_OF_DATA task
//! must have its part stored here, whatever else it carries: without them nothing proves the
//! data arrived, so that acknowledgement is rejected, as is a receipt on a request that
//! transfers nothing. The same proof rules hold for the task reports in processors'
//! answers to calls and status checks ([`well_formed_reports`], and the store). Each
//! acknowledgement of a batch is judged on its own: the valid ones are applied and the
//! others listed in the answer's `rejected`; one that breaks a rule, of a request delivered
//! to its processor, is also recorded on the request, once ([`Api::record_rejections`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use dsrelay_proto::v1::acknowledgement_service_server::AcknowledgementService;
use dsrelay_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, Acknowledgement, ContractPhase,
    RejectedAcknowledgement, RejectedField, RequestKind, TaskState, TaskStatus, TransferReceipt,
};
use dsrelay_runtime::identity::{instant_violation, request_id_violation, FieldViolation};
use dsrelay_runtime::trace_context;
use tonic::{Response, Status};

use crate::auth::Party;
use crate::error::ApiError;
use crate::metrics::{REJECTED_INVALID, REJECTED_NOT_ROUTED};
use crate::store::{AckOutcome, RejectedAck, TaskUpdate};
use crate::validate::text_violation;
use dsrelay_runtime::export_files::file_name_violation;

use super::Api;

/// At most this many acknowledgements in one call.
pub(crate) const MAX_ACKS_PER_CALL: usize = 500;

#[tonic::async_trait]
impl AcknowledgementService for Api {
    #[tracing::instrument(skip_all, fields(processor, count))]
    async fn acknowledge(
        &self,
        req: tonic::Request<AcknowledgeRequest>,
    ) -> Result<Response<AcknowledgeResponse>, Status> {
        let processor = self
            .shared
            .auth
            .require(&req, &[Party::Processor], |c| {
                format!(
                    "{} is not a processor and may not acknowledge tasks",
                    c.name
                )
            })?
            .name;
        let all = req.into_inner().acknowledgements;
        tracing::Span::current()
            .record("processor", processor.as_str())
            .record("count", all.len());
        if all.is_empty() || all.len() > MAX_ACKS_PER_CALL {
            return Err(ApiError::invalid(vec![FieldViolation::new(
                "acknowledgements",
                format!("send 1 to {MAX_ACKS_PER_CALL} per call"),
            )])
            .into());
        }
        // Each entry is judged alone, so one the processor cannot fix does not hold back the
        // others behind it in its outbox.
        let mut problems: BTreeMap<usize, Vec<FieldViolation>> = BTreeMap::new();
        for (i, a) in all.iter().enumerate() {
            let v = violations(i, a);
            if !v.is_empty() {
                problems.insert(i, v);
            }
        }
        // Only the well-formed ones are looked up: an id the rules refuse (a NUL byte, say)
        // goes nowhere near the database.
        let well_formed: Vec<&Acknowledgement> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| !problems.contains_key(i))
            .map(|(_, a)| a)
            .collect();
        let kinds = self.kinds_concerned(&processor, &well_formed).await?;
        for (i, v) in self.receipt_violations(&processor, &all, &kinds).await? {
            problems.entry(i).or_default().push(v);
        }
        let mut rejected: Vec<RejectedAcknowledgement> = problems
            .into_iter()
            .map(|(i, v)| RejectedAcknowledgement {
                index: i as u32,
                code: tonic::Code::InvalidArgument as i32,
                message: format!("acknowledgement {i} breaks {} rule(s)", v.len()),
                violations: v
                    .into_iter()
                    .map(|f| RejectedField {
                        field: f.field,
                        rule: f.rule,
                    })
                    .collect(),
            })
            .collect();
        // Positions in `all` of the entries that go on to the store.
        let positions: Vec<usize> = (0..all.len())
            .filter(|i| !rejected.iter().any(|r| r.index as usize == *i))
            .collect();
        let acks: Vec<Acknowledgement> = positions.iter().map(|&i| all[i].clone()).collect();
        let mut updates: Vec<TaskUpdate> = acks.iter().map(TaskUpdate::from).collect();
        self.check_certificates(&processor, &acks, &mut updates, &kinds);
        let delivered: BTreeSet<String> = kinds.keys().cloned().collect();
        let AckOutcome {
            applied,
            duplicates,
            not_routed,
        } = self
            .shared
            .store
            .apply_routed_acks(
                &processor,
                &updates,
                kinds.into_keys().collect(),
                self.shared.clock.now_ms(),
            )
            .await
            .map_err(ApiError::from)?;
        for &j in &not_routed {
            let i = positions[j];
            rejected.push(RejectedAcknowledgement {
                index: i as u32,
                code: tonic::Code::PermissionDenied as i32,
                message: format!(
                    "request {} was not delivered to processor {processor}",
                    acks[j].request_id
                ),
                violations: Vec::new(),
            });
        }
        rejected.sort_by_key(|r| r.index);
        self.record_rejections(&processor, &all, &rejected, delivered)
            .await?;
        let reason = |r: &RejectedAcknowledgement| {
            if r.code == tonic::Code::PermissionDenied as i32 {
                REJECTED_NOT_ROUTED
            } else {
                REJECTED_INVALID
            }
        };
        for r in &rejected {
            self.shared
                .metrics
                .acknowledgements_rejected
                .inc(&[&processor, reason(r)]);
        }
        if let Some(first) = rejected.first() {
            // Not the first one's message, nor its request id as sent: for an acknowledgement
            // not routed here that is whatever text the processor put there, which may be
            // the subject's address. The id is logged when it is one this registry gives (a
            // UUID), and the reason as the metric's label. The processor gets every rejection
            // whole in its answer.
            let sent = all
                .get(first.index as usize)
                .map_or("", |a| a.request_id.as_str());
            let request_id = match uuid::Uuid::try_parse(sent) {
                Ok(id) if id.to_string() == sent => sent,
                _ => "(not a request id this registry gives)",
            };
            tracing::warn!(
                rejected = rejected.len(),
                first_index = first.index,
                first_code = ?tonic::Code::from_i32(first.code),
                first_reason = reason(first),
                first_violations = first.violations.len(),
                request_id,
                "acknowledgements rejected"
            );
        }
        // Only what was applied joins traces, metrics and watchers.
        let kept: Vec<(&Acknowledgement, &TaskUpdate)> = acks
            .iter()
            .zip(&updates)
            .enumerate()
            .filter(|(j, _)| !not_routed.contains(j))
            .map(|(_, p)| p)
            .collect();
        // Each acknowledgement joins the trace of the task step that sent it.
        for &(a, u) in &kept {
            if a.traceparent.is_empty() {
                continue;
            }
            let span = tracing::info_span!(
                "acknowledgement",
                request_id = %u.request_id,
                processor = %processor,
                subprocessor = %u.subprocessor,
                sequence = u.sequence,
            );
            trace_context::set_parent(&span, trace_context::from_traceparent(&a.traceparent));
            span.in_scope(|| tracing::debug!("acknowledgement recorded"));
        }
        let occurred: Vec<Option<i64>> = kept
            .iter()
            .map(|(a, _)| {
                a.occurred_at
                    .as_ref()
                    .map(dsrelay_proto::millis_from_timestamp)
            })
            .collect();
        self.shared.metrics.acknowledged(
            &processor,
            &occurred,
            applied,
            duplicates,
            self.shared.clock.now_ms(),
        );
        for id in kept
            .iter()
            .map(|(_, u)| &u.request_id)
            .collect::<BTreeSet<_>>()
        {
            self.shared.publish(id);
        }
        tracing::debug!(applied, duplicates, "acknowledgements applied");
        Ok(Response::new(AcknowledgeResponse {
            applied,
            duplicates,
            rejected,
        }))
    }
}

impl Api {
    /// Records on its request each acknowledgement of `all` that `rejected` lists as
    /// breaking rules (INVALID_ARGUMENT), when the request was delivered to `processor`
    /// (`delivered`, read for the well-formed ones; read here for the others) and the
    /// acknowledgement names its task well enough to say which (request id, subprocessor and
    /// sequence keep their rules): an ACKNOWLEDGEMENT_REJECTED event, once per task and
    /// sequence ([`crate::store::Store::record_rejected_acks`]), so that the request's events
    /// (ListEvents, Watch, `dsrctl trace`) say why the task stands still here while the
    /// processor has moved on.
    /// One not routed here (PERMISSION_DENIED) records nothing: a processor writes no event
    /// on a request that is not its own.
    async fn record_rejections(
        &self,
        processor: &str,
        all: &[Acknowledgement],
        rejected: &[RejectedAcknowledgement],
        mut delivered: BTreeSet<String>,
    ) -> Result<(), ApiError> {
        let named: Vec<(&Acknowledgement, &RejectedAcknowledgement)> = rejected
            .iter()
            .filter(|r| r.code == tonic::Code::InvalidArgument as i32)
            .filter_map(|r| {
                let a = all.get(r.index as usize)?;
                let prefix = format!("acknowledgements[{}].", r.index);
                let names_its_task = r.violations.iter().all(|v| {
                    !matches!(
                        v.field.strip_prefix(&prefix),
                        Some("request_id" | "subprocessor" | "sequence")
                    )
                });
                names_its_task.then_some((a, r))
            })
            .collect();
        let unread: Vec<&str> = named
            .iter()
            .map(|(a, _)| a.request_id.as_str())
            .filter(|id| !delivered.contains(*id))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !unread.is_empty() {
            let read = self
                .shared
                .store
                .kinds_delivered_to(processor, &unread)
                .await;
            delivered.extend(read.map_err(ApiError::from)?.into_keys());
        }
        let rejections: Vec<RejectedAck> = named
            .into_iter()
            .filter(|(a, _)| delivered.contains(&a.request_id))
            .map(|(a, r)| {
                let prefix = format!("acknowledgements[{}].", r.index);
                let rules: Vec<String> = r
                    .violations
                    .iter()
                    .map(|v| {
                        let field = v.field.strip_prefix(&prefix).unwrap_or(&v.field);
                        format!("{field} {}", unquoted(&v.rule))
                    })
                    .collect();
                RejectedAck {
                    request_id: a.request_id.clone(),
                    subprocessor: a.subprocessor.clone(),
                    sequence: a.sequence as i64,
                    state: a.state,
                    rules: rules.join("; "),
                }
            })
            .collect();
        if rejections.is_empty() {
            return Ok(());
        }
        let recorded = self
            .shared
            .store
            .record_rejected_acks(processor, &rejections, self.shared.clock.now_ms())
            .await
            .map_err(ApiError::from)?;
        for id in &recorded {
            self.shared.publish(id);
        }
        Ok(())
    }

    /// The kinds of the requests `acks` concern, among those delivered to `processor`, in
    /// one query for the whole call. COMPLETED reports and receipts
    /// ([`Self::receipt_violations`]) and certificates (whose claims name the kind) need
    /// their request's kind, and the store needs to know which requests were delivered to
    /// `processor` (the map's keys). A request not delivered to `processor` is left out,
    /// whatever its kind.
    async fn kinds_concerned(
        &self,
        processor: &str,
        acks: &[&Acknowledgement],
    ) -> Result<HashMap<String, RequestKind>, ApiError> {
        let ids: Vec<&str> = acks
            .iter()
            .map(|a| a.request_id.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        self.shared
            .store
            .kinds_delivered_to(processor, &ids)
            .await
            .map_err(ApiError::from)
    }

    /// COMPLETED reports that lack their proof, and receipts where nothing was transferred.
    /// A TRANSFER task's COMPLETED needs the recipient's receipt; a RETURN_OF_DATA task's
    /// needs its part stored here (the processor reports COMPLETED only once CompletePart was
    /// answered), whatever else it carries, as the store requires of the reports in
    /// processors' answers too. A receipt is refused on a request that transfers nothing
    /// (any kind but TRANSFER, and a contract end whose terms name no transfer recipient):
    /// nothing checks it there, and shown with the task it would read as proof that the data
    /// arrived. A receipt where data is transferred must name the recipient the request
    /// sends it to ([`recipient_problem`]), and carry that recipient's signature when its
    /// `[[recipients]]` entry has a `public_key` (`Store::receipt_signature_problem`); one
    /// that names its sender must name `processor` ([`sender_problem`]).
    /// `kinds` are the kinds of the requests delivered to `processor`
    /// ([`Self::kinds_concerned`]): an acknowledgement of any other request is refused as not
    /// routed (PERMISSION_DENIED), whatever its kind, so a processor cannot learn that
    /// another's request exists.
    async fn receipt_violations(
        &self,
        processor: &str,
        acks: &[Acknowledgement],
        kinds: &HashMap<String, RequestKind>,
    ) -> Result<Vec<(usize, FieldViolation)>, ApiError> {
        let acks = &acks[..acks.len().min(MAX_ACKS_PER_CALL)];
        let kind_of = |a: &Acknowledgement| kinds.get(a.request_id.as_str()).copied();
        let returns: Vec<&str> = acks
            .iter()
            .filter(|a| completed(a) && kind_of(a) == Some(RequestKind::ReturnOfData))
            .map(|a| a.request_id.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let parts = if returns.is_empty() {
            Default::default()
        } else {
            self.shared
                .store
                .parts_stored(&returns)
                .await
                .map_err(ApiError::from)?
        };
        // Whether a contract end transfers depends on its terms, decided as the store decides
        // it for processors' answers: read only for those whose acknowledgements carry a
        // receipt, which a contract end to the registry never sends.
        let receipted_contract_ends: Vec<&str> = acks
            .iter()
            .filter(|a| receipt(a).is_some() && kind_of(a) == Some(RequestKind::ContractEnd))
            .map(|a| a.request_id.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let contract_transfers = self
            .shared
            .store
            .contract_ends_transferring(&receipted_contract_ends)
            .await
            .map_err(ApiError::from)?;
        let receipted_transfers: Vec<&str> = acks
            .iter()
            .filter(|a| receipt(a).is_some() && kind_of(a) == Some(RequestKind::Transfer))
            .map(|a| a.request_id.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut recipients = self
            .shared
            .store
            .transfer_recipients(&receipted_transfers)
            .await
            .map_err(ApiError::from)?;
        recipients
            .extend((contract_transfers.iter()).map(|(id, name)| (id.clone(), Some(name.clone()))));
        let identity = (self.shared.config.processors.iter())
            .find(|p| p.name == processor)
            .map(|p| p.identity.as_str());
        let mut violations = Vec::new();
        for (i, a) in acks.iter().enumerate() {
            let Some(kind) = kind_of(a) else {
                continue;
            };
            if kind == RequestKind::ReturnOfData
                && completed(a)
                && !parts.contains(&(
                    a.request_id.clone(),
                    processor.to_string(),
                    a.subprocessor.clone(),
                ))
            {
                violations.push((
                    i,
                    FieldViolation::new(
                        format!("acknowledgements[{i}].state"),
                        "may be COMPLETED for a RETURN_OF_DATA task only once its part of the \
                         package is stored at the registry (UploadFile, then CompletePart), \
                         whatever the acknowledgement carries",
                    ),
                ));
            }
            if kind == RequestKind::Transfer && completed(a) && receipt(a).is_none() {
                violations.push((
                    i,
                    FieldViolation::new(
                        format!("acknowledgements[{i}].evidence.transfer_receipt"),
                        "is required when a TRANSFER task is COMPLETED: the recipient's receipt \
                         proves the data arrived",
                    ),
                ));
            }
            let transfers = match kind {
                RequestKind::Transfer => true,
                RequestKind::ContractEnd => contract_transfers.contains_key(&a.request_id),
                _ => false,
            };
            if let (true, Some(r)) = (transfers, receipt(a)) {
                if let Some(rule) = sender_problem(r, identity) {
                    violations.push((
                        i,
                        FieldViolation::new(
                            format!("acknowledgements[{i}].evidence.transfer_receipt.sender"),
                            rule,
                        ),
                    ));
                }
                if let Some(rule) = recipient_problem(r, recipients.get(&a.request_id), || {
                    self.shared.config.known_recipients()
                }) {
                    violations.push((
                        i,
                        FieldViolation::new(
                            format!("acknowledgements[{i}].evidence.transfer_receipt.recipient"),
                            rule,
                        ),
                    ));
                } else if self.shared.store.recipient_unlisted(&r.recipient) {
                    violations.push((
                        i,
                        FieldViolation::new(
                            format!("acknowledgements[{i}].evidence.transfer_receipt.recipient"),
                            format!(
                                "names {:?}, which the registry's [[recipients]] no longer \
                                 lists, so nothing here can check its receipt: list it again \
                                 (with its public_key) and requeue this acknowledgement, or \
                                 cancel the request",
                                r.recipient
                            ),
                        ),
                    ));
                } else if let Some(why) =
                    (self.shared.store).receipt_signature_problem(r, self.shared.clock.now_ms())
                {
                    violations.push((
                        i,
                        FieldViolation::new(
                            format!("acknowledgements[{i}].evidence.transfer_receipt.signature"),
                            format!(
                                "must be the recipient's: the receipt {why} (the registry's \
                                 [[recipients]] public_key of {:?})",
                                r.recipient
                            ),
                        ),
                    ));
                }
            }
            if receipt(a).is_some() && !transfers {
                let what = if kind == RequestKind::ContractEnd {
                    "a contract end whose terms name no transfer recipient".to_string()
                } else {
                    format!("a {} request", super::packages::kind_name(kind as i32))
                };
                violations.push((
                    i,
                    FieldViolation::new(
                        format!("acknowledgements[{i}].evidence.transfer_receipt"),
                        format!(
                            "must be empty: {what} transfers nothing to a recipient; only a \
                             TRANSFER and a contract end returning the data to a transfer \
                             recipient carry the recipient's receipt"
                        ),
                    ),
                ));
            }
        }
        Ok(violations)
    }
}

/// Why receipt `r` names the wrong recipient, if it does: the recipient must call itself by
/// the name the registry's `[[recipients]]` gives it, the one the request sent the data to
/// (`named`, from `Store::transfer_recipients`), as the processor checks before it reports
/// the task COMPLETED; the registry shows this name as the one holding the data. When the
/// request's name was forgotten with its body (`Some(None)`), any recipient `configured`
/// gives is taken: the registry no longer knows which one it was.
fn recipient_problem<'a>(
    r: &TransferReceipt,
    named: Option<&Option<String>>,
    configured: impl FnOnce() -> BTreeSet<&'a str>,
) -> Option<String> {
    match named {
        Some(Some(name)) if r.recipient != *name => Some(format!(
            "must be {name:?}, the recipient the request transfers the data to (its name in \
             the registry's [[recipients]])"
        )),
        Some(None) if !configured().contains(r.recipient.as_str()) => Some(
            "must be the name of a recipient in the registry's [[recipients]] (the request's \
             own was forgotten with its body)"
                .into(),
        ),
        _ => None,
    }
}

/// Why receipt `r` names another sender than `identity`, the certificate identity of the
/// processor acknowledging it (its `[[processors]]` `identity`; `None`: not configured), if
/// it does. Subprocessor names are unique only within a processor, so a receipt another
/// processor's part got for the same request and subprocessor would otherwise pass for this
/// one's. A receipt naming no sender (a recipient that signs the version 1 body) is taken.
fn sender_problem(r: &TransferReceipt, identity: Option<&str>) -> Option<String> {
    if !dsrelay_runtime::transfer_receipt::names_other_sender(r, identity) {
        return None;
    }
    Some(match identity {
        Some(identity) => format!(
            "must be {identity:?}, the certificate identity of the processor acknowledging \
             it, or empty: the receipt is of a part another processor sent; report the task \
             with the receipt the recipient answered to this processor's CompleteTransfer"
        ),
        None => "must be empty: the registry has no certificate identity for this processor \
                 to check it against"
            .into(),
    })
}

/// `rule` with every text it quotes (`"…"`, as `{:?}` writes it: a recipient's name, from
/// the processor's receipt or the request) left out. The rest is the registry's own words,
/// kept in an event and its audit entry for good; a recipient's name tells where the subject
/// moved their data, which forgetting the request must remove, and the event would keep it.
fn unquoted(rule: &str) -> String {
    let mut out = String::with_capacity(rule.len());
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        // Up to the closing quote, past escaped ones.
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => break,
                _ => {}
            }
        }
        out.push_str("(a name)");
    }
    out
}

/// A COMPLETED report.
fn completed(a: &Acknowledgement) -> bool {
    a.state == TaskState::Completed as i32
}

/// The transfer receipt an acknowledgement carries.
fn receipt(a: &Acknowledgement) -> Option<&TransferReceipt> {
    a.evidence
        .as_ref()
        .and_then(|e| e.transfer_receipt.as_ref())
}

/// What is wrong with the receipt of the acknowledgement at `i`, each naming its field.
fn receipt_problems(i: usize, a: &Acknowledgement, r: &TransferReceipt) -> Vec<FieldViolation> {
    let field = |name: &str| format!("acknowledgements[{i}].evidence.transfer_receipt.{name}");
    let mut violations = Vec::new();
    if r.request_id != a.request_id {
        violations.push(FieldViolation::new(
            field("request_id"),
            "must be the acknowledgement's request_id",
        ));
    }
    if r.subprocessor != a.subprocessor {
        violations.push(FieldViolation::new(
            field("subprocessor"),
            "must be the acknowledgement's subprocessor",
        ));
    }
    if !dsrelay_runtime::export_files::is_sha256(&r.manifest_sha256) {
        violations.push(FieldViolation::new(
            field("manifest_sha256"),
            "must be 64 lowercase hex digits",
        ));
    }
    violations.extend(text_violation(&field("recipient"), &r.recipient, 256, true));
    if !dsrelay_runtime::transfer_receipt::received_in_whole_ms(r) {
        violations.push(FieldViolation::new(
            field("received_at"),
            "must be whole milliseconds (nanos a multiple of 1000000, below 1000000000)",
        ));
    }
    if !dsrelay_runtime::transfer_receipt::signature_well_formed(r) {
        violations.push(FieldViolation::new(
            field("signature"),
            "must be empty with an empty key_id (unsigned), or 64 bytes with key_id \
             `sha256:` and 64 lowercase hex digits",
        ));
    }
    violations
}

/// The task reports of a processor's answer (to a Deliver, a cancellation, an update of terms,
/// a due date's extension or a status check) about `request_id` that keep the rules an
/// acknowledgement keeps; each one that does not is left out and logged with what is wrong,
/// so a report is never stored on looser terms than the same change acknowledged. (Whether
/// a COMPLETED report has its proof, a receipt or a stored part, the store checks when it
/// applies them.)
pub(crate) fn well_formed_reports(
    processor: &str,
    request_id: &str,
    tasks: Vec<TaskStatus>,
) -> Vec<TaskStatus> {
    tasks
        .into_iter()
        .filter(|t| {
            let as_acknowledged = Acknowledgement {
                request_id: request_id.to_string(),
                subprocessor: t.subprocessor.clone(),
                sequence: t.sequence,
                state: t.state,
                evidence: t.evidence.clone(),
                reason: t.reason.clone(),
                legal_basis: t.legal_basis.clone(),
                retain_until: t.retain_until,
                progress: t.progress,
                ..Default::default()
            };
            let broken = violations(0, &as_acknowledged);
            if broken.is_empty() {
                return true;
            }
            let rules: Vec<String> = broken
                .iter()
                .map(|v| {
                    format!(
                        "{} {}",
                        v.field.trim_start_matches("acknowledgements[0]."),
                        v.rule
                    )
                })
                .collect();
            // The rules name fields and limits in the registry's own words and never quote a
            // value (see `violations`), so the processor's texts stay out of the line.
            tracing::warn!(
                %processor,
                %request_id,
                subprocessor = %t.subprocessor,
                problems = %rules.join("; "),
                "a task report the processor answered breaks the acknowledgement rules; left out"
            );
            false
        })
        .collect()
}

/// Every rule the acknowledgement at `i` breaks, each naming its field.
fn violations(i: usize, a: &Acknowledgement) -> Vec<FieldViolation> {
    let mut violations = Vec::new();
    violations.extend(request_id_violation(
        &format!("acknowledgements[{i}].request_id"),
        &a.request_id,
    ));
    // The rule the upload API holds a subprocessor's name to (it names the folder of the
    // task's part in a package): a task under another name could never have its part stored,
    // and a RETURN_OF_DATA task would wait for it for good.
    violations.extend(file_name_violation(
        &format!("acknowledgements[{i}].subprocessor"),
        &a.subprocessor,
    ));
    if a.sequence == 0 || a.sequence > i64::MAX as u64 {
        violations.push(FieldViolation::new(
            format!("acknowledgements[{i}].sequence"),
            format!(
                "must be from 1 to {}, the task's change number (got {})",
                i64::MAX,
                a.sequence
            ),
        ));
    }
    if TaskState::try_from(a.state).unwrap_or_default() == TaskState::Unspecified {
        violations.push(FieldViolation::new(
            format!("acknowledgements[{i}].state"),
            "must be a task state",
        ));
    }
    violations.extend(text_violation(
        &format!("acknowledgements[{i}].reason"),
        &a.reason,
        4096,
        false,
    ));
    violations.extend(text_violation(
        &format!("acknowledgements[{i}].legal_basis"),
        &a.legal_basis,
        1024,
        false,
    ));
    // RETAINED folds the request into "done, except what the law keeps": with no basis the
    // answer rests on nothing, with no date nothing says when the rest is erased. Every path
    // of the processor that reports RETAINED sends both (a connector's retention has a basis
    // that is not blank and a date, or fails the task), so only a broken report lacks one.
    if TaskState::try_from(a.state) == Ok(TaskState::Retained) {
        if a.legal_basis.trim().is_empty() {
            violations.push(FieldViolation::new(
                format!("acknowledgements[{i}].legal_basis"),
                "is required for RETAINED: the law or contract that requires keeping the data",
            ));
        }
        if a.retain_until.is_none() {
            violations.push(FieldViolation::new(
                format!("acknowledgements[{i}].retain_until"),
                "is required for RETAINED: the next date at which retained data is due to be \
                 erased",
            ));
        }
    }
    if let Some(e) = &a.evidence {
        if e.records_affected < 0 {
            violations.push(FieldViolation::new(
                format!("acknowledgements[{i}].evidence.records_affected"),
                "must not be negative",
            ));
        }
        violations.extend(text_violation(
            &format!("acknowledgements[{i}].evidence.note"),
            &e.note,
            4096,
            false,
        ));
        if let Some(r) = &e.transfer_receipt {
            violations.extend(receipt_problems(i, a, r));
        }
    }
    if let Some(c) = &a.certificate {
        violations.extend(super::certificates::violations(i, c));
    }
    for (name, at) in [
        ("occurred_at", &a.occurred_at),
        ("retain_until", &a.retain_until),
    ] {
        if let Some(t) = at {
            violations.extend(instant_violation(
                &format!("acknowledgements[{i}].{name}"),
                t,
            ));
        }
    }
    // Stored, and shown in the contract's view: a number of no phase would show as nothing.
    if let Some(p) = &a.progress {
        if ContractPhase::try_from(p.phase).is_err() {
            violations.push(FieldViolation::new(
                format!("acknowledgements[{i}].progress.phase"),
                format!("{} is not a contract phase", p.phase),
            ));
        }
        // Stored as sent and passed on to every reader, whose timestamp type may refuse it.
        if let Some(t) = p
            .scheduled_at
            .as_ref()
            .filter(|t| !dsrelay_proto::has_valid_nanos(t))
        {
            violations.push(FieldViolation::new(
                format!("acknowledgements[{i}].progress.scheduled_at.nanos"),
                format!(
                    "must be from 0 to {} (got {})",
                    dsrelay_proto::MAX_TIMESTAMP_NANOS,
                    t.nanos
                ),
            ));
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::prost_types::Timestamp;
    use dsrelay_proto::v1::ContractProgress;
    use dsrelay_proto::{
        EARLIEST_INSTANT_SECONDS as EARLIEST_SECONDS, LATEST_INSTANT_SECONDS as LATEST_SECONDS,
    };

    use super::*;

    fn ack() -> Acknowledgement {
        Acknowledgement {
            request_id: "0190a0b0-0000-7000-8000-000000000001".into(),
            subprocessor: "accounting".into(),
            sequence: 1,
            state: TaskState::InProgress as i32,
            ..Default::default()
        }
    }

    fn at(seconds: i64) -> Option<Timestamp> {
        Some(Timestamp { seconds, nanos: 0 })
    }

    fn fields(a: &Acknowledgement) -> Vec<String> {
        violations(3, a).into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn a_negative_count_of_records_is_refused() {
        let a = Acknowledgement {
            evidence: Some(dsrelay_proto::v1::Evidence {
                records_affected: -1,
                ..Default::default()
            }),
            ..ack()
        };
        assert_eq!(
            fields(&a),
            ["acknowledgements[3].evidence.records_affected"]
        );
    }

    #[test]
    fn instants_outside_the_years_2000_to_9999_are_refused() {
        assert!(fields(&ack()).is_empty(), "{:?}", fields(&ack()));
        for ok in [EARLIEST_SECONDS, 1_800_000_000, LATEST_SECONDS] {
            let a = Acknowledgement {
                occurred_at: at(ok),
                retain_until: at(ok),
                ..ack()
            };
            assert!(fields(&a).is_empty(), "{ok}: {:?}", fields(&a));
        }
        for bad in [
            i64::MIN,
            -1,
            0,
            EARLIEST_SECONDS - 1,
            LATEST_SECONDS + 1,
            i64::MAX,
        ] {
            let a = Acknowledgement {
                occurred_at: at(bad),
                ..ack()
            };
            assert_eq!(fields(&a), ["acknowledgements[3].occurred_at"], "{bad}");
            let a = Acknowledgement {
                retain_until: at(bad),
                ..ack()
            };
            assert_eq!(fields(&a), ["acknowledgements[3].retain_until"], "{bad}");
        }
    }

    #[test]
    fn a_task_report_retained_until_no_real_date_is_left_out() {
        let report = |seconds| TaskStatus {
            subprocessor: "accounting".into(),
            sequence: 1,
            state: TaskState::Retained as i32,
            legal_basis: "Kirjanpitolaki 2:10 §".into(),
            retain_until: at(seconds),
            ..Default::default()
        };
        let kept = well_formed_reports(
            "p",
            "0190a0b0-0000-7000-8000-000000000001",
            vec![report(1_800_000_000), report(i64::MIN)],
        );
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].retain_until, at(1_800_000_000));
    }

    /// `{seconds: 2000000000, nanos: 2000000000}` was taken, and stored as 999 ms past the
    /// second.
    #[test]
    fn nanos_outside_a_second_are_refused() {
        let with_nanos = |nanos| {
            Some(Timestamp {
                seconds: 2_000_000_000,
                nanos,
            })
        };
        for ok in [0, 999_999_999] {
            let a = Acknowledgement {
                occurred_at: with_nanos(ok),
                retain_until: with_nanos(ok),
                progress: Some(ContractProgress {
                    scheduled_at: with_nanos(ok),
                    ..Default::default()
                }),
                ..ack()
            };
            assert!(fields(&a).is_empty(), "{ok}: {:?}", fields(&a));
        }
        for bad in [1_000_000_000, 2_000_000_000, -1, i32::MIN] {
            let a = Acknowledgement {
                occurred_at: with_nanos(bad),
                retain_until: with_nanos(bad),
                progress: Some(ContractProgress {
                    scheduled_at: with_nanos(bad),
                    ..Default::default()
                }),
                ..ack()
            };
            let got: Vec<(String, String)> = violations(3, &a)
                .into_iter()
                .map(|v| (v.field, v.rule))
                .collect();
            let rule = format!("must be from 0 to 999999999 (got {bad})");
            assert_eq!(
                got,
                [
                    ("acknowledgements[3].occurred_at.nanos".into(), rule.clone()),
                    (
                        "acknowledgements[3].retain_until.nanos".into(),
                        rule.clone()
                    ),
                    (
                        "acknowledgements[3].progress.scheduled_at.nanos".into(),
                        rule
                    ),
                ],
                "{bad}"
            );
        }
    }

    /// RETAINED with neither a basis nor a date was applied, and a PARTIALLY_COMPLETED
    /// answer rested on it.
    #[test]
    fn retained_needs_its_legal_basis_and_its_date() {
        let retained = |legal_basis: &str, retain_until| Acknowledgement {
            state: TaskState::Retained as i32,
            legal_basis: legal_basis.into(),
            retain_until,
            ..ack()
        };
        assert_eq!(
            violations(3, &retained("", None))
                .into_iter()
                .map(|v| (v.field, v.rule))
                .collect::<Vec<_>>(),
            [
                (
                    "acknowledgements[3].legal_basis".to_string(),
                    "is required for RETAINED: the law or contract that requires keeping the \
                     data"
                        .to_string()
                ),
                (
                    "acknowledgements[3].retain_until".to_string(),
                    "is required for RETAINED: the next date at which retained data is due to \
                     be erased"
                        .to_string()
                ),
            ]
        );
        assert_eq!(
            fields(&retained(" \t", at(1_800_000_000))),
            ["acknowledgements[3].legal_basis"]
        );
        assert_eq!(
            fields(&retained("Kirjanpitolaki 2:10 §", None)),
            ["acknowledgements[3].retain_until"]
        );
        assert!(fields(&retained("Kirjanpitolaki 2:10 §", at(1_800_000_000))).is_empty());
        // The same report answered to a status check is left out too.
        let report = TaskStatus {
            subprocessor: "accounting".into(),
            sequence: 1,
            state: TaskState::Retained as i32,
            ..Default::default()
        };
        let kept = well_formed_reports("p", &ack().request_id, vec![report]);
        assert_eq!(kept, []);
    }

    /// A 60 KB name was refused twice over, as "1 to 128 bytes" and "at most 128 bytes"; a
    /// name the upload API refuses (`../../etc`) was applied, and its RETURN_OF_DATA task
    /// then waited for good for a part no upload could store.
    #[test]
    fn a_subprocessor_name_is_held_to_the_upload_apis_rule_once() {
        let rule = file_name_violation("x", "..").unwrap().rule;
        for name in [
            "x".repeat(60 * 1024),
            String::new(),
            "../../etc".into(),
            ".hidden".into(),
            "account\u{7}ing".into(),
            "bidi\u{202E}evil".into(),
        ] {
            let a = Acknowledgement {
                subprocessor: name.clone(),
                ..ack()
            };
            let got: Vec<(String, String)> = violations(3, &a)
                .into_iter()
                .map(|v| (v.field, v.rule))
                .collect();
            assert_eq!(
                got,
                [("acknowledgements[3].subprocessor".to_string(), rule.clone())],
                "{name:?}"
            );
        }
        for name in ["accounting", "mail-marketing_2", "archive.v1"] {
            let a = Acknowledgement {
                subprocessor: name.into(),
                ..ack()
            };
            assert!(fields(&a).is_empty(), "{name}");
        }
    }

    /// Puts a text in one field of an acknowledgement.
    type SetText = fn(&mut Acknowledgement, String);

    /// A right-to-left override or a zero width character in any text of an acknowledgement
    /// is refused naming the field and the code point.
    #[test]
    fn a_format_character_in_any_text_is_refused_naming_the_field() {
        let texts: [(&str, SetText); 4] = [
            ("reason", |a, t| a.reason = t),
            ("legal_basis", |a, t| a.legal_basis = t),
            ("evidence.note", |a, t| {
                a.evidence.get_or_insert_with(Default::default).note = t
            }),
            ("evidence.transfer_receipt.recipient", |a, t| {
                let r = TransferReceipt {
                    request_id: a.request_id.clone(),
                    subprocessor: a.subprocessor.clone(),
                    manifest_sha256: "0".repeat(64),
                    recipient: t,
                    received_at: Some(Timestamp {
                        seconds: 1_800_000_000,
                        nanos: 0,
                    }),
                    ..Default::default()
                };
                a.evidence
                    .get_or_insert_with(Default::default)
                    .transfer_receipt = Some(r)
            }),
        ];
        for (field, set) in texts {
            for (c, code) in [
                ('\u{202E}', "U+202E"),
                ('\u{200B}', "U+200B"),
                ('\u{2066}', "U+2066"),
            ] {
                let mut a = ack();
                set(&mut a, format!("deleted{c} 3 rows"));
                let got = violations(0, &a);
                assert_eq!(got.len(), 1, "{field} {code}: {got:?}");
                assert_eq!(got[0].field, format!("acknowledgements[0].{field}"));
                assert!(got[0].rule.contains(code), "{field}: {}", got[0].rule);
            }
            // The same text without it, with letters of other scripts and an emoji, passes.
            let mut a = ack();
            set(&mut a, "poistettu 3 riviä — 削除 ❤️ (näin)".into());
            assert!(
                violations(0, &a).is_empty(),
                "{field}: {:?}",
                violations(0, &a)
            );
        }
    }

    /// A receipt naming no sender, or the acknowledging processor, passes; one naming
    /// another processor does not, and with no identity configured only an empty one does.
    #[test]
    fn a_receipt_must_name_the_acknowledging_processor_or_no_sender() {
        let r = |sender: &str| TransferReceipt {
            sender: sender.into(),
            ..Default::default()
        };
        let own = Some("spiffe://x/processor/a");
        assert_eq!(sender_problem(&r(""), own), None);
        assert_eq!(sender_problem(&r("spiffe://x/processor/a"), own), None);
        let rule = sender_problem(&r("spiffe://x/processor/b"), own).unwrap();
        assert!(rule.contains("\"spiffe://x/processor/a\""), "{rule}");
        assert_eq!(sender_problem(&r(""), None), None);
        assert!(sender_problem(&r("spiffe://x/processor/a"), None).is_some());
    }

    #[test]
    fn quoted_names_are_left_out_of_a_rule() {
        assert_eq!(
            unquoted(r#"must be "a \"b\" c", the recipient; of "x""#),
            "must be (a name), the recipient; of (a name)"
        );
        assert_eq!(unquoted("must not be negative"), "must not be negative");
    }

    #[test]
    fn a_receipt_must_name_the_request_s_recipient() {
        let r = |name: &str| TransferReceipt {
            recipient: name.into(),
            ..Default::default()
        };
        let named = Some("new-bookkeeper".to_string());
        let configured = || BTreeSet::from(["new-bookkeeper", "archive"]);
        assert_eq!(
            recipient_problem(&r("new-bookkeeper"), Some(&named), configured),
            None
        );
        let rule = recipient_problem(&r("archive"), Some(&named), configured).unwrap();
        assert!(rule.contains("\"new-bookkeeper\""), "{rule}");
        // Forgotten with the body: any configured one, and no other.
        assert_eq!(
            recipient_problem(&r("archive"), Some(&None), configured),
            None
        );
        assert!(recipient_problem(&r("evil-recipient"), Some(&None), configured).is_some());
    }
}

/// The test registry ([`crate::test_registry`]) whose processor's certificates may be checked
/// with a key, for the tests of this module and of `certificates`.
#[cfg(test)]
pub(crate) mod harness {
    use crate::test_registry::{self, Setup};
    pub(crate) use crate::test_registry::{PROCESSOR, RECIPIENT};

    /// A running registry, stopped by [`Registry::stop`].
    pub(crate) struct Registry(test_registry::Registry);

    impl std::ops::Deref for Registry {
        type Target = test_registry::Registry;

        fn deref(&self) -> &Self::Target {
            &self.0
        }
    }

    impl Registry {
        /// Serves a registry on `database_url`, its files under `dir`, whose processor's
        /// endpoint nobody answers (its deliveries wait); the processor's certificates are
        /// checked with `public_key` (base64) when given.
        pub(crate) async fn start(
            dir: &std::path::Path,
            database_url: &str,
            public_key: Option<&str>,
        ) -> Self {
            let processor_keys =
                public_key.map_or(String::new(), |k| format!("public_key = {k:?}\n"));
            let setup = Setup {
                processor_keys,
                ..Setup::default()
            };
            Self(test_registry::Registry::start(dir, database_url, setup).await)
        }

        pub(crate) async fn stop(self) {
            self.0.stop().await;
        }
    }
}

#[cfg(test)]
mod recipient_tests {
    use dsrelay_proto::v1::contract_service_client::ContractServiceClient;
    use dsrelay_proto::v1::{
        ContractEndChoice, ContractPhase, ContractProgress, EndContractRequest, Evidence,
    };

    use super::harness::{Registry, PROCESSOR, RECIPIENT};
    use super::*;
    use crate::test_postgres::on_postgres;

    fn receipt(id: &str, subprocessor: &str, recipient: &str) -> TransferReceipt {
        TransferReceipt {
            request_id: id.into(),
            subprocessor: subprocessor.into(),
            manifest_sha256: "ab".repeat(32),
            bytes: 3,
            files: 1,
            received_at: None,
            recipient: recipient.into(),
            ..Default::default()
        }
    }

    /// The one rejection of `answer`: its fields.
    fn rejected_fields(answer: &AcknowledgeResponse) -> Vec<String> {
        assert_eq!(answer.applied, 0, "{answer:?}");
        assert_eq!(answer.rejected.len(), 1, "{answer:?}");
        assert_eq!(
            answer.rejected[0].code,
            tonic::Code::InvalidArgument as i32,
            "{answer:?}"
        );
        let violations = answer.rejected[0].violations.iter();
        violations.map(|v| v.field.clone()).collect()
    }

    /// A processor reports a TRANSFER task COMPLETED, and a contract end's task returned to
    /// its transfer recipient, with a receipt from a recipient the request does not name:
    /// both are refused, and nothing is recorded; the request's own recipient is taken.
    /// Before, the registry checked the name nowhere and showed `evil-recipient` as the
    /// one holding the data.
    async fn a_receipt_from_another_recipient_is_refused(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        let registry = Registry::start(dir, database_url, None).await;
        let id = registry.submit(RequestKind::Transfer, "transfer").await;
        let completed = |sequence: u64, recipient: &str| Acknowledgement {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            sequence,
            state: TaskState::Completed as i32,
            evidence: Some(Evidence {
                records_affected: 1,
                transfer_receipt: Some(receipt(&id, "crm", recipient)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let field = "acknowledgements[0].evidence.transfer_receipt.recipient";
        let answer = registry
            .acknowledge(vec![completed(1, "evil-recipient")])
            .await;
        assert_eq!(rejected_fields(&answer), [field]);
        let rule = &answer.rejected[0].violations[0].rule;
        assert!(rule.contains(&format!("{RECIPIENT:?}")), "{rule}");
        let get = || registry.get(&id);
        assert!(get().await.tasks.is_empty());
        let answer = registry.acknowledge(vec![completed(1, RECIPIENT)]).await;
        assert_eq!(answer.applied, 1, "{answer:?}");
        let shown = get().await;
        let shown = shown.tasks[0].evidence.as_ref().unwrap();
        assert_eq!(
            shown.transfer_receipt.as_ref().unwrap().recipient,
            RECIPIENT
        );

        let contract = ContractServiceClient::new(registry.channel("operator"))
            .end_contract(EndContractRequest {
                processor: PROCESSOR.into(),
                choice: ContractEndChoice::ReturnThenDelete as i32,
                effective_now: true,
                idempotency_key: "contract".into(),
                transfer_recipient: RECIPIENT.into(),
                ..Default::default()
            })
            .await
            .expect("end contract")
            .into_inner()
            .contract_id;
        let awaiting = |recipient: &str| Acknowledgement {
            request_id: contract.clone(),
            subprocessor: "accounting".into(),
            sequence: 1,
            state: TaskState::InProgress as i32,
            evidence: Some(Evidence {
                confirmed: true,
                transfer_receipt: Some(receipt(&contract, "accounting", recipient)),
                ..Default::default()
            }),
            progress: Some(ContractProgress {
                phase: ContractPhase::AwaitingConfirmation as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = registry.acknowledge(vec![awaiting("evil-recipient")]).await;
        assert_eq!(rejected_fields(&answer), [field]);
        let answer = registry.acknowledge(vec![awaiting(RECIPIENT)]).await;
        assert_eq!(answer.applied, 1, "{answer:?}");
        registry.stop().await;
    }

    /// A recipient whose `[[recipients]]` entry has a `public_key`: a TRANSFER task's
    /// receipt must carry its signature. Unsigned, signed by another key, or changed after
    /// signing, it is refused, naming the field, and nothing is recorded; as signed, it is
    /// taken and shown with its signature. Before, the registry took any receipt on the
    /// processor's word.
    async fn a_receipt_its_recipient_did_not_sign_is_refused(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        use dsrelay_runtime::signing::SigningKey;
        use dsrelay_runtime::transfer_receipt::sign;
        let key = SigningKey::generate();
        let setup = crate::test_registry::Setup {
            recipient_keys: format!("public_key = {:?}\n", key.public_key().to_base64()),
            ..Default::default()
        };
        let registry = crate::test_registry::Registry::start(dir, database_url, setup).await;
        let id = registry.submit(RequestKind::Transfer, "transfer").await;
        let completed = |r: TransferReceipt| Acknowledgement {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            sequence: 1,
            state: TaskState::Completed as i32,
            evidence: Some(Evidence {
                records_affected: 1,
                transfer_receipt: Some(r),
                ..Default::default()
            }),
            ..Default::default()
        };
        let field = "acknowledgements[0].evidence.transfer_receipt.signature";
        let unsigned = receipt(&id, "crm", RECIPIENT);
        let by_another = sign(unsigned.clone(), &SigningKey::generate()).unwrap();
        let mut changed = sign(unsigned.clone(), &key).unwrap();
        changed.bytes += 1;
        for (what, r) in [
            ("unsigned", unsigned.clone()),
            ("by another", by_another),
            ("changed", changed),
        ] {
            let answer = registry.acknowledge(vec![completed(r)]).await;
            assert_eq!(rejected_fields(&answer), [field], "{what}");
            let rule = &answer.rejected[0].violations[0].rule;
            assert!(rule.contains("public_key"), "{what}: {rule}");
        }
        assert!(registry.get(&id).await.tasks.is_empty());
        let signed = sign(unsigned, &key).unwrap();
        let answer = registry.acknowledge(vec![completed(signed.clone())]).await;
        assert_eq!(answer.applied, 1, "{answer:?}");
        let shown = registry.get(&id).await;
        let shown = shown.tasks[0].evidence.as_ref().unwrap();
        assert_eq!(shown.transfer_receipt.as_ref(), Some(&signed));
        registry.stop().await;
    }

    /// Two processors with a subprocessor of the same name transfer for one request: a
    /// receipt the recipient signed for the other processor's part (naming it as sender) is
    /// refused from this one, naming the field and this processor's identity, though its
    /// signature holds, and nothing is recorded; the receipt naming this processor, and one
    /// naming no sender (a recipient signing the version 1 body), are taken. Before, the
    /// registry took the other processor's receipt as proof of this one's part.
    async fn a_receipt_naming_another_sender_is_refused(database_url: &str, dir: &std::path::Path) {
        use dsrelay_runtime::pki::dev_identity;
        use dsrelay_runtime::signing::SigningKey;
        use dsrelay_runtime::transfer_receipt::sign;
        let key = SigningKey::generate();
        let setup = crate::test_registry::Setup {
            recipient_keys: format!("public_key = {:?}\n", key.public_key().to_base64()),
            ..Default::default()
        };
        let registry = crate::test_registry::Registry::start(dir, database_url, setup).await;
        let id = registry.submit(RequestKind::Transfer, "transfer").await;
        let completed = |sequence: u64, sender: &str| Acknowledgement {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            sequence,
            state: TaskState::Completed as i32,
            evidence: Some(Evidence {
                records_affected: 1,
                transfer_receipt: Some(
                    sign(
                        TransferReceipt {
                            sender: sender.into(),
                            ..receipt(&id, "crm", RECIPIENT)
                        },
                        &key,
                    )
                    .unwrap(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let own = dev_identity("processor", PROCESSOR);
        let other = dev_identity("processor", "other-bureau");
        let answer = registry.acknowledge(vec![completed(1, &other)]).await;
        assert_eq!(
            rejected_fields(&answer),
            ["acknowledgements[0].evidence.transfer_receipt.sender"]
        );
        let rule = &answer.rejected[0].violations[0].rule;
        assert!(rule.contains(&format!("{own:?}")), "{rule}");
        assert!(rule.contains("another processor"), "{rule}");
        assert!(registry.get(&id).await.tasks.is_empty());

        let answer = registry.acknowledge(vec![completed(1, &own)]).await;
        assert_eq!(answer.applied, 1, "{answer:?}");
        let shown = registry.get(&id).await;
        let shown = shown.tasks[0].evidence.as_ref().unwrap();
        assert_eq!(shown.transfer_receipt.as_ref().unwrap().sender, own);
        let answer = registry.acknowledge(vec![completed(2, "")]).await;
        assert_eq!(answer.applied, 1, "{answer:?}");
        registry.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receipt_naming_another_sender_is_refused_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_receipt_naming_another_sender_is_refused(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receipt_naming_another_sender_is_refused_on_postgres() {
        on_postgres(|url, dir| async move {
            a_receipt_naming_another_sender_is_refused(&url, &dir).await;
        })
        .await;
    }

    /// A recipient's key leaked and is revoked as of a time: a receipt it signed that
    /// reached the registry before (the revocation still scheduled) stays with its task as
    /// taken; one arriving after is refused naming the key and the revocation, though the
    /// receipt says it was received long before (the key holder writes that date). Before,
    /// the key was trusted or not, whatever the time its receipt arrived.
    async fn a_revoked_key_s_receipt_is_taken_only_before_its_revocation(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        use dsrelay_runtime::signing::SigningKey;
        use dsrelay_runtime::transfer_receipt::sign;
        let (leaked, new) = (SigningKey::generate(), SigningKey::generate());
        let setup = |revoked_at: &str| crate::test_registry::Setup {
            recipient_keys: format!(
                "public_key = {:?}\nrevoked_public_keys = [{{ key = {:?}, revoked_at = {:?} }}]\n",
                new.public_key().to_base64(),
                leaked.public_key().to_base64(),
                revoked_at
            ),
            ..Default::default()
        };
        let start = |revoked_at: &str| {
            crate::test_registry::Registry::start(dir, database_url, setup(revoked_at))
        };
        let registry = start("2999-01-01T00:00:00Z").await;
        let id = registry.submit(RequestKind::Transfer, "transfer").await;
        let completed = |subprocessor: &str, n: u64| {
            let mut r = receipt(&id, subprocessor, RECIPIENT);
            r.received_at = Some(dsrelay_proto::prost_types::Timestamp {
                seconds: 1_577_836_800,
                nanos: 0,
            });
            Acknowledgement {
                request_id: id.clone(),
                subprocessor: subprocessor.into(),
                sequence: n,
                state: TaskState::Completed as i32,
                evidence: Some(Evidence {
                    records_affected: 1,
                    transfer_receipt: Some(sign(r, &leaked).unwrap()),
                    ..Default::default()
                }),
                ..Default::default()
            }
        };
        let before = completed("crm", 1);
        let answer = registry.acknowledge(vec![before.clone()]).await;
        assert_eq!(answer.applied, 1, "{answer:?}");
        registry.stop().await;

        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let revoked_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let registry = start(&revoked_at).await;
        let answer = registry.acknowledge(vec![completed("mail", 1)]).await;
        assert_eq!(
            rejected_fields(&answer),
            ["acknowledgements[0].evidence.transfer_receipt.signature"]
        );
        let rule = &answer.rejected[0].violations[0].rule;
        let revoked = format!(
            "signed with key {}, which was revoked at {revoked_at}",
            leaked.public_key().key_id()
        );
        assert!(rule.contains(&revoked), "{rule}");
        let shown = registry.get(&id).await;
        assert_eq!(shown.tasks.len(), 1, "{shown:?}");
        let kept = shown.tasks[0].evidence.as_ref().unwrap();
        let taken = before.evidence.unwrap().transfer_receipt;
        assert_eq!(kept.transfer_receipt, taken);
        registry.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoked_key_s_receipt_is_taken_only_before_its_revocation_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_revoked_key_s_receipt_is_taken_only_before_its_revocation(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoked_key_s_receipt_is_taken_only_before_its_revocation_on_postgres() {
        on_postgres(|url, dir| async move {
            a_revoked_key_s_receipt_is_taken_only_before_its_revocation(&url, &dir).await;
        })
        .await;
    }

    /// A recipient taken out of `[[recipients]]` after the request named it: its receipt
    /// could not be checked here (nor its signature, whose key went with it), so it is
    /// refused naming the field and saying how to go on, and nothing is recorded. Before,
    /// it was taken unsigned and the task COMPLETED.
    async fn a_receipt_of_a_recipient_no_longer_listed_is_refused(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        use crate::test_registry::{Registry, Setup};
        use dsrelay_proto::v1::request_service_client::RequestServiceClient;
        use dsrelay_proto::v1::{
            IdentityEncoding, IdentityType, RequestParameters, SubjectIdentity, SubmitRequest,
        };
        let logs = dsrelay_runtime::testing::captured_logs();
        // Under `cargo test` both variants log into the one capture of their process: each
        // names a recipient of its own, so that it counts only its own warning.
        let recipient = match database_url.starts_with("sqlite:") {
            true => "old-bookkeeper-sqlite",
            false => "old-bookkeeper-postgres",
        };
        let setup = Setup {
            recipient_name: recipient,
            ..Default::default()
        };
        let registry = Registry::start(dir, database_url, setup).await;
        let id = RequestServiceClient::new(registry.channel("partner-crm"))
            .submit(SubmitRequest {
                kind: RequestKind::Transfer as i32,
                identities: vec![SubjectIdentity {
                    r#type: IdentityType::Email as i32,
                    encoding: IdentityEncoding::Raw as i32,
                    value: "maija@example.fi".into(),
                    label: String::new(),
                }],
                parameters: Some(RequestParameters {
                    transfer_recipient: recipient.into(),
                    ..Default::default()
                }),
                idempotency_key: "transfer".into(),
                ..Default::default()
            })
            .await
            .expect("submit")
            .into_inner()
            .request_id;
        registry.stop().await;
        // Listed no longer: the configuration names only the default recipient.
        let registry = Registry::start(dir, database_url, Setup::default()).await;
        // The operator is told at the start, naming the recipient and how many wait on it.
        let warned: Vec<serde_json::Value> = logs
            .text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|l: &serde_json::Value| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("open transfers name a recipient"))
                    && l["fields"]["recipient"] == recipient
            })
            .collect();
        assert_eq!(warned.len(), 1, "{}", logs.text());
        assert_eq!(warned[0]["fields"]["requests"], 1);
        let completed = Acknowledgement {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            sequence: 1,
            state: TaskState::Completed as i32,
            evidence: Some(Evidence {
                records_affected: 1,
                transfer_receipt: Some(receipt(&id, "crm", recipient)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = registry.acknowledge(vec![completed]).await;
        assert_eq!(
            rejected_fields(&answer),
            ["acknowledgements[0].evidence.transfer_receipt.recipient"]
        );
        let rule = &answer.rejected[0].violations[0].rule;
        assert!(rule.contains("no longer lists"), "{rule}");
        assert!(registry.get(&id).await.tasks.is_empty());
        registry.stop().await;
    }

    /// A COMPLETED TRANSFER task whose receipt its recipient did not sign, sent three times
    /// as the processor retries it: rejected each time, and recorded on the request once, as
    /// an ACKNOWLEDGEMENT_REJECTED event with its processor, task, reported state and the
    /// rule broken (not the recipient's name the rule quotes), with its audit entry; partners
    /// read it too. A rejection of another sequence (a rule of form) records its own; one of
    /// a request that does not exist records nothing. Before, nothing on the request said
    /// why it stayed IN_PROGRESS.
    async fn a_rejected_acknowledgement_is_recorded_once(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        use dsrelay_proto::v1::request_service_client::RequestServiceClient;
        use dsrelay_proto::v1::{EventType, ListEventsRequest, RequestEvent};
        use dsrelay_runtime::signing::SigningKey;
        let key = SigningKey::generate();
        let setup = crate::test_registry::Setup {
            recipient_keys: format!("public_key = {:?}\n", key.public_key().to_base64()),
            ..Default::default()
        };
        let registry = crate::test_registry::Registry::start(dir, database_url, setup).await;
        let id = registry.submit(RequestKind::Transfer, "transfer").await;
        let unsigned = Acknowledgement {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            sequence: 1,
            state: TaskState::Completed as i32,
            evidence: Some(Evidence {
                records_affected: 1,
                transfer_receipt: Some(receipt(&id, "crm", RECIPIENT)),
                ..Default::default()
            }),
            ..Default::default()
        };
        for _ in 0..3 {
            let answer = registry.acknowledge(vec![unsigned.clone()]).await;
            assert_eq!(
                rejected_fields(&answer),
                ["acknowledgements[0].evidence.transfer_receipt.signature"]
            );
        }
        let unknown = Acknowledgement {
            request_id: "0190a0b0-0000-7000-8000-00000000dead".into(),
            ..unsigned.clone()
        };
        let answer = registry.acknowledge(vec![unknown]).await;
        assert_eq!(answer.rejected.len(), 1, "{answer:?}");
        let negative = Acknowledgement {
            sequence: 2,
            state: TaskState::InProgress as i32,
            evidence: Some(Evidence {
                records_affected: -1,
                ..Default::default()
            }),
            ..unsigned.clone()
        };
        for _ in 0..2 {
            let answer = registry.acknowledge(vec![negative.clone()]).await;
            assert_eq!(
                rejected_fields(&answer),
                ["acknowledgements[0].evidence.records_affected"]
            );
        }
        let events = |stem: &'static str| {
            let channel = registry.channel(stem);
            let id = id.clone();
            async move {
                let list = RequestServiceClient::new(channel)
                    .list_events(ListEventsRequest {
                        request_id: id,
                        ..Default::default()
                    })
                    .await
                    .expect("list events")
                    .into_inner();
                let rejected: Vec<RequestEvent> = list
                    .events
                    .into_iter()
                    .filter(|e| e.r#type == EventType::AcknowledgementRejected as i32)
                    .collect();
                rejected
            }
        };
        let rejected = events("operator").await;
        assert_eq!(rejected.len(), 2, "{rejected:#?}");
        let first = &rejected[0];
        assert_eq!(first.processor, PROCESSOR);
        let task = first.task.as_ref().expect("task");
        assert_eq!(
            (task.subprocessor.as_str(), task.state, task.sequence),
            ("crm", TaskState::Completed as i32, 1)
        );
        assert!(
            first
                .message
                .starts_with("acknowledgement crm #1: COMPLETED rejected: ")
                && first
                    .message
                    .contains("evidence.transfer_receipt.signature must be the recipient's")
                && !first.message.contains(RECIPIENT),
            "{first:?}"
        );
        let second = &rejected[1];
        assert!(
            second
                .message
                .contains("evidence.records_affected must not be negative"),
            "{second:?}"
        );
        let partner = events("partner-crm").await;
        assert_eq!(
            partner.iter().map(|e| &e.message).collect::<Vec<_>>(),
            rejected.iter().map(|e| &e.message).collect::<Vec<_>>()
        );
        assert!(registry.get(&id).await.tasks.is_empty());
        // The unknown request's rejection wrote neither an event nor an audit entry.
        let db = dsrelay_runtime::store::Db::connect(database_url)
            .await
            .expect("connect");
        let events: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE type = $1")
            .bind(EventType::AcknowledgementRejected as i64)
            .fetch_one(&db.pool)
            .await
            .expect("count");
        assert_eq!(events, 2);
        let audited = RequestServiceClient::new(registry.channel("operator"))
            .list_audit_entries(dsrelay_proto::v1::ListAuditEntriesRequest {
                after_seq: 0,
                page_size: 1000,
            })
            .await
            .expect("audit entries")
            .into_inner()
            .entries;
        let audited: Vec<&str> = audited
            .iter()
            .filter(|e| e.event_type == EventType::AcknowledgementRejected as i32)
            .map(|e| e.request_id.as_str())
            .collect();
        assert_eq!(audited, [id.as_str(), id.as_str()]);
        registry.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rejected_acknowledgement_is_recorded_once_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_rejected_acknowledgement_is_recorded_once(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rejected_acknowledgement_is_recorded_once_on_postgres() {
        on_postgres(|url, dir| async move {
            a_rejected_acknowledgement_is_recorded_once(&url, &dir).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receipt_of_a_recipient_no_longer_listed_is_refused_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_receipt_of_a_recipient_no_longer_listed_is_refused(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receipt_of_a_recipient_no_longer_listed_is_refused_on_postgres() {
        on_postgres(|url, dir| async move {
            a_receipt_of_a_recipient_no_longer_listed_is_refused(&url, &dir).await;
        })
        .await;
    }

    /// Without the recipient's key, a signature is not stored (it was not checked, so shown
    /// it would read as verified); a signature or key id of the wrong form, and a receipt
    /// time finer than the signed milliseconds, are refused naming the field.
    async fn an_unchecked_signature_is_not_kept(database_url: &str, dir: &std::path::Path) {
        use dsrelay_proto::prost_types::Timestamp;
        use dsrelay_runtime::signing::SigningKey;
        let registry = Registry::start(dir, database_url, None).await;
        let id = registry.submit(RequestKind::Transfer, "transfer").await;
        let completed = |r: TransferReceipt| Acknowledgement {
            request_id: id.clone(),
            subprocessor: "crm".into(),
            sequence: 1,
            state: TaskState::Completed as i32,
            evidence: Some(Evidence {
                records_affected: 1,
                transfer_receipt: Some(r),
                ..Default::default()
            }),
            ..Default::default()
        };
        let unsigned = receipt(&id, "crm", RECIPIENT);
        let short = TransferReceipt {
            signature: vec![1, 2, 3],
            key_id: "sha256:x".into(),
            ..unsigned.clone()
        };
        let fine = TransferReceipt {
            received_at: Some(Timestamp {
                seconds: 1,
                nanos: 5,
            }),
            ..unsigned.clone()
        };
        let field = |name: &str| format!("acknowledgements[0].evidence.transfer_receipt.{name}");
        for (r, name) in [(short, "signature"), (fine, "received_at")] {
            let answer = registry.acknowledge(vec![completed(r)]).await;
            assert_eq!(rejected_fields(&answer), [field(name)]);
        }
        let signed =
            dsrelay_runtime::transfer_receipt::sign(unsigned.clone(), &SigningKey::generate())
                .unwrap();
        let answer = registry.acknowledge(vec![completed(signed)]).await;
        assert_eq!(answer.applied, 1, "{answer:?}");
        let shown = registry.get(&id).await;
        let shown = shown.tasks[0].evidence.as_ref().unwrap();
        assert_eq!(shown.transfer_receipt.as_ref(), Some(&unsigned));
        registry.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unchecked_signature_is_not_kept_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        an_unchecked_signature_is_not_kept(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unchecked_signature_is_not_kept_on_postgres() {
        on_postgres(|url, dir| async move {
            an_unchecked_signature_is_not_kept(&url, &dir).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receipt_its_recipient_did_not_sign_is_refused_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_receipt_its_recipient_did_not_sign_is_refused(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receipt_its_recipient_did_not_sign_is_refused_on_postgres() {
        on_postgres(|url, dir| async move {
            a_receipt_its_recipient_did_not_sign_is_refused(&url, &dir).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receipt_from_another_recipient_is_refused_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_receipt_from_another_recipient_is_refused(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receipt_from_another_recipient_is_refused_on_postgres() {
        on_postgres(|url, dir| async move {
            a_receipt_from_another_recipient_is_refused(&url, &dir).await;
        })
        .await;
    }
}
