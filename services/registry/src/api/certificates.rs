//! Deletion certificates: checking each one a processor sends with an acknowledgement, and
//! the read API (`CertificateService`) for partners and operators.
//!
//! A certificate is verified when it is signed by the key configured as the processor's
//! `public_key`, or one of its `previous_public_keys` (the certificate's `key_id` says which;
//! so a key rotation leaves what was signed before it verified), or one of its
//! `revoked_public_keys` if it arrived before that key's `revoked_at` (by the registry's
//! clock: its body's dates are the key holder's to forge), its body is canonical JSON and a
//! deletion certificate as certificate.proto defines it (the rules `dsrctl certificate
//! verify` applies, [`certificate_body`]: exactly the keys of its version, each of its type
//! and range; version 1 for either kind, 2 only for a contract_end, whose body then states
//! the contract end's terms and return in a `contract_end` object), and the body names the
//! same processor (identity), request, subprocessor and task state as the acknowledgement
//! it came with, and the kind its request calls for: `erasure` for an ERASURE (and any
//! other request), `contract_end` for a CONTRACT_END. One that fails is still
//! stored, as rejected with why (in words that quote none of the body's text), so that an
//! operator sees it until the request
//! is forgotten (which removes what it carries: `store::forget`); the task's state change is
//! applied as reported either way, since the processor's work happened whatever its
//! certificate says. The store then checks one found verified against the certificates
//! stored before it, in the transaction that stores it (`store::certificates`): its id must
//! not be stored with another body, and its `follows` must name the task's certificate
//! before it (none for the task's first), and rejects it otherwise. One stored as verified is checked again each time it is served, a
//! revoked key's against the time it was stored (`received_at`): what was stored before the
//! revocation stays verified. So is one stored as rejected while its body is stored, against
//! the acknowledgement it came with: once the processor's right key is configured it is
//! served verified (and that is logged). One whose body forgetting removed is served with its
//! rejection as history, worded with the time it was received.

use dsrelay_proto::v1::certificate_service_server::CertificateService;
use std::collections::HashMap;

use dsrelay_proto::v1::{
    Acknowledgement, CertificateList, DeletionCertificate, ListCertificatesRequest, RequestKind,
    StoredCertificate, TaskState,
};
use dsrelay_runtime::certificate_body;
use dsrelay_runtime::identity::FieldViolation;
use dsrelay_runtime::signing::{KeyRing, Signed, VerifyError};
use tonic::{Response, Status};

use crate::error::ApiError;
use crate::store::{CertificateRow, ReceivedCertificate, RequestRow};
use crate::validate::text_violation;

use super::Api;

/// The body fields the registry checks against the acknowledgement, read from a body that
/// [`certificate_body`] found to be a certificate.
#[derive(Debug, serde::Deserialize)]
struct Claims {
    certificate_id: String,
    kind: String,
    processor: String,
    request_id: String,
    subprocessor: String,
    task_state: String,
}

/// The certificate kind a task of a request of `kind` is certified with.
pub(crate) fn certificate_kind(kind: Option<RequestKind>) -> &'static str {
    match kind {
        Some(RequestKind::ContractEnd) => "contract_end",
        _ => "erasure",
    }
}

/// What a certificate must name to be verified: the values the registry knows from the
/// acknowledgement (or, when serving it, from the row it is stored in).
struct Expected<'a> {
    kind: &'a str,
    processor: &'a str,
    request_id: &'a str,
    subprocessor: &'a str,
    /// The task state, as the body spells it; `None` when serving (not stored with it).
    task_state: Option<&'a str>,
}

/// Why the processor's key did not verify `doc`, in words that quote nothing the processor
/// wrote except a key id that is one: a rejection is kept until the request is forgotten
/// and its event's words stay in the audit trail, so a text in the key id (up to 128
/// characters, unchecked) would stay there for ever.
fn signature_rejection(e: &VerifyError) -> String {
    match e {
        VerifyError::WrongKey { found, expected }
            if !dsrelay_runtime::signing::is_key_id(found) =>
        {
            format!(
                "its key_id is not a key id (sha256: and 64 lowercase hex digits), not the \
             expected key {expected}"
            )
        }
        e => e.to_string(),
    }
}

/// Checks `c`, which came with `ack` from the processor whose certificate identity is
/// `identity` and whose configured keys are `key`, received at `received_at_ms` (the
/// registry's clock, which decides for a revoked key); its body must name `kind`.
pub(crate) fn check(
    key: Option<&KeyRing>,
    identity: &str,
    kind: &str,
    ack: &Acknowledgement,
    c: &DeletionCertificate,
    received_at_ms: i64,
) -> ReceivedCertificate {
    let doc = Signed {
        body: c.body.clone(),
        signature: c.signature.clone(),
        key_id: c.key_id.clone(),
    };
    let state = TaskState::try_from(ack.state)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("TASK_STATE_")
        .to_string();
    let expected = Expected {
        kind,
        processor: identity,
        request_id: &ack.request_id,
        subprocessor: &ack.subprocessor,
        task_state: Some(&state),
    };
    // The id is shown even for a rejected certificate, when the body has one: read from the
    // body verification parsed, or else (the signature did not hold) parsed for it alone;
    // `follows` with it, for the check against the stored certificates.
    let mut named = None;
    let rejection = match key {
        None => Some("no public_key is configured for this processor".to_string()),
        Some(key) => match key.verify_received(&doc, received_at_ms) {
            Err(e) => Some(signature_rejection(&e)),
            Ok(value) => {
                named = Some(ids_in(&value));
                match claims(&value) {
                    Err(e) => Some(e),
                    Ok(claims) => mismatch(&claims, &expected),
                }
            }
        },
    };
    let (certificate_id, follows) = named.or_else(|| claimed_ids(&doc.body)).unwrap_or_default();
    ReceivedCertificate {
        body: doc.body,
        signature: doc.signature,
        key_id: doc.key_id,
        certificate_id: certificate_id.unwrap_or_default(),
        follows,
        verified: rejection.is_none(),
        rejection: rejection.unwrap_or_default(),
    }
}

/// The claims of a signed body, or why it is no deletion certificate: the rules
/// `dsrctl certificate verify` applies ([`certificate_body`]: exactly the keys of its
/// version, each of its type and range, as certificate.proto defines them), so the registry
/// calls verified no body that dsrctl refuses. The reason names the key and the rule, never
/// a value of the body nor a key name certificate.proto does not define (see
/// [`signature_rejection`]).
fn claims(body: &serde_json::Value) -> Result<Claims, String> {
    certificate_body::check_quoting_nothing(body).map_err(|e| format!("{NOT_A_CERTIFICATE}: {e}"))
}

/// How a rejection by [`claims`] begins.
const NOT_A_CERTIFICATE: &str =
    "the body is not a deletion certificate as certificate.proto defines it";

/// The `certificate_id` and `follows` of a certificate's body, parsed for them alone (its
/// signature did not hold); `None` when it is no JSON.
fn claimed_ids(body: &[u8]) -> Option<(Option<String>, Option<String>)> {
    Some(ids_in(
        &serde_json::from_slice::<serde_json::Value>(body).ok()?,
    ))
}

/// The `certificate_id` and the non-empty `follows` of a certificate's parsed body.
fn ids_in(body: &serde_json::Value) -> (Option<String>, Option<String>) {
    let text = |key: &str| body.get(key).and_then(|v| v.as_str()).map(str::to_string);
    (
        text("certificate_id"),
        text("follows").filter(|f| !f.is_empty()),
    )
}

/// The first way `claims` disagree with what the registry expects, if any. Names the field
/// and the registry's value, never the body's (see [`signature_rejection`]). The body's
/// version and what it needs of the kind were checked by [`claims`].
fn mismatch(claims: &Claims, expected: &Expected<'_>) -> Option<String> {
    let pairs = [
        ("kind", claims.kind.as_str(), Some(expected.kind)),
        ("processor", &claims.processor, Some(expected.processor)),
        ("request_id", &claims.request_id, Some(expected.request_id)),
        (
            "subprocessor",
            &claims.subprocessor,
            Some(expected.subprocessor),
        ),
        ("task_state", &claims.task_state, expected.task_state),
    ];
    pairs
        .iter()
        .find_map(|(field, got, want)| want.filter(|want| got != want).map(|w| (field, w)))
        .map(|(field, want)| format!("its {field} is not {want:?}, as the acknowledgement says"))
}

impl Api {
    /// The certificate identity of the processor the registry names `name`, if configured:
    /// what a certificate's `processor` must say.
    fn processor_identity(&self, name: &str) -> Option<&str> {
        let processors = self.shared.config.processors.iter();
        processors
            .filter(|p| p.name == name)
            .map(|p| p.identity.as_str())
            .next()
    }

    /// Checks the certificate each acknowledgement of `processor` carries and attaches the
    /// verdict to its update. `kinds` holds the kinds of the requests delivered to
    /// `processor` that acknowledgements with a certificate concern (looked up once per call
    /// with those of the receipts' check).
    pub(super) fn check_certificates(
        &self,
        processor: &str,
        acks: &[Acknowledgement],
        updates: &mut [crate::store::TaskUpdate],
        kinds: &HashMap<String, RequestKind>,
    ) {
        let identity = self.processor_identity(processor).unwrap_or_default();
        let key = self.shared.certificate_keys.get(processor);
        // The store records its own time a moment later, never earlier, so one checked
        // before a revocation and stored at or after it reads rejected when served.
        let now = self.shared.clock.now_ms();
        for (a, u) in acks.iter().zip(updates.iter_mut()) {
            if let Some(c) = &a.certificate {
                let kind = certificate_kind(kinds.get(a.request_id.as_str()).copied());
                let checked = check(key, identity, kind, a, c, now);
                if !checked.verified {
                    // The rejection is the registry's words; it quotes nothing of the body
                    // but key names certificate.proto defines and a key id that is one: the
                    // values it names are the acknowledgement's own, logged here too.
                    tracing::warn!(
                        processor,
                        request_id = %a.request_id,
                        subprocessor = %a.subprocessor,
                        rejection = %checked.rejection,
                        "deletion certificate rejected"
                    );
                }
                u.certificate = Some(checked);
            }
        }
    }
}

/// The largest certificate body accepted (bytes): a thousand tables' counts fit.
pub(super) const MAX_BODY: usize = 64 * 1024;

/// The rules a certificate on acknowledgement `i` breaks: it must fit the store.
pub(super) fn violations(i: usize, c: &DeletionCertificate) -> Vec<FieldViolation> {
    let field = |name: &str| format!("acknowledgements[{i}].certificate.{name}");
    let mut out = Vec::new();
    if c.body.is_empty() || c.body.len() > MAX_BODY {
        out.push(FieldViolation::new(
            field("body"),
            format!("must be 1 to {MAX_BODY} bytes"),
        ));
    }
    if c.signature.len() > 128 {
        out.push(FieldViolation::new(
            field("signature"),
            "must be at most 128 bytes",
        ));
    }
    out.extend(text_violation(&field("key_id"), &c.key_id, 128, false));
    // The id is stored in a text column even when the certificate is rejected, so one the
    // store cannot hold (PostgreSQL refuses NUL) would fail the whole call, and the processor
    // would resend it, with everything batched beside it, forever. A body without an id is
    // left to be stored as rejected, for an operator to see; an oversized one is refused
    // above already and not worth reading.
    // Its `follows` is bound in the registry's read of the certificates it names, likewise.
    if c.body.len() <= MAX_BODY {
        if let Some((id, follows)) = claimed_ids(&c.body) {
            for (name, value) in [("certificate_id", id), ("follows", follows)] {
                if let Some(value) = value {
                    out.extend(text_violation(
                        &field(&format!("body.{name}")),
                        &value,
                        128,
                        true,
                    ));
                }
            }
        }
    }
    out
}

/// A stored certificate as the API shows it. One stored as verified is checked again here,
/// against the processor's keys configured now and the row it is stored in (its request,
/// processor, subprocessor and id; the task state it went with is not stored): the row may
/// have been changed in the database since, and `verified` promises a signature that holds.
/// A key revoked since verifies it still if the row was stored before the revocation.
/// One that fails is shown as rejected, with why. One stored as rejected whose body is still
/// stored is checked again too ([`recheck_rejected`]): a rejection for a key configured wrong
/// then is no longer the answer once the right key is configured. One whose body forgetting
/// removed is shown with its rejection as history ([`rejected_when_received`]). The second
/// value says whether a certificate stored as rejected is now shown verified.
fn stored(
    row: CertificateRow,
    request: &RequestRow,
    identity: Option<&str>,
    key: Option<&KeyRing>,
) -> (StoredCertificate, bool) {
    let rejection = if row.verified != 0 {
        recheck(&row, request, identity, key)
    } else if row.body.is_empty() {
        Some(rejected_when_received(&row))
    } else {
        recheck_rejected(&row, request, identity, key)
    };
    let now_verified = row.verified == 0 && rejection.is_none();
    let shown = StoredCertificate {
        processor: row.processor,
        subprocessor: row.subprocessor,
        certificate: Some(DeletionCertificate {
            body: row.body,
            signature: row.signature,
            key_id: row.key_id,
        }),
        verified: rejection.is_none(),
        rejection: rejection.unwrap_or_default(),
        certificate_id: row.certificate_id,
    };
    (shown, now_verified)
}

/// Why a certificate stored as rejected, whose body is still stored, is rejected when checked
/// again now, by the rules of [`check`] (one the store rejected against the certificates
/// stored before it stays rejected, with the store's words): against the processor's keys configured now (a
/// revoked key's against the time it was stored) and the acknowledgement it came with (its
/// request, subprocessor and task state, as stored); `None` when it now checks out.
fn recheck_rejected(
    row: &CertificateRow,
    request: &RequestRow,
    identity: Option<&str>,
    key: Option<&KeyRing>,
) -> Option<String> {
    let Some(state) = row.ack_state else {
        // Its acknowledgement is stored in the same transaction, so this is a row changed by
        // hand: nothing to check the task state against.
        return Some(rejected_when_received(row));
    };
    let ack = Acknowledgement {
        request_id: request.id.clone(),
        subprocessor: row.subprocessor.clone(),
        state,
        ..Default::default()
    };
    let certificate = DeletionCertificate {
        body: row.body.clone(),
        signature: row.signature.clone(),
        key_id: row.key_id.clone(),
    };
    let kind = certificate_kind(Some(request.kind));
    let identity = identity.unwrap_or_default();
    let checked = check(key, identity, kind, &ack, &certificate, row.received_at);
    if !checked.verified {
        return Some(checked.rejection);
    }
    // Rejected against the certificates stored before it (its id taken, or its follows not
    // the task's latest): no key configured since changes that.
    if let Some(rule) = row.rejection_against_stored() {
        return Some(rule.to_string());
    }
    (checked.certificate_id != row.certificate_id)
        .then(|| "its certificate_id is not the one stored with it".into())
}

/// The rejection of a certificate that can no longer be checked (its body was removed when
/// its request was forgotten), as history: when it was received and why it was rejected then,
/// which the keys configured now may no longer explain.
fn rejected_when_received(row: &CertificateRow) -> String {
    format!(
        "rejected when received at {}: {}; it cannot be checked again, as its body is no \
         longer stored here, and no call sends a certificate again, so it stays rejected here \
         even if the processor still holds it and the reason no longer applies",
        dsrelay_runtime::clock::date_label(row.received_at),
        row.rejection
    )
}

/// Why a certificate stored as verified no longer is, if it is not.
fn recheck(
    row: &CertificateRow,
    request: &RequestRow,
    identity: Option<&str>,
    key: Option<&KeyRing>,
) -> Option<String> {
    let (Some(identity), Some(key)) = (identity, key) else {
        return Some("no public_key is configured for this processor any more".into());
    };
    let doc = Signed {
        body: row.body.clone(),
        signature: row.signature.clone(),
        key_id: row.key_id.clone(),
    };
    let value = match key.verify_received(&doc, row.received_at) {
        Ok(value) => value,
        Err(e @ VerifyError::Revoked { .. }) => {
            return Some(format!(
                "the certificate was stored no earlier than its key's revocation: {e}"
            ));
        }
        Err(VerifyError::WrongKey { .. }) if !dsrelay_runtime::signing::is_key_id(&row.key_id) => {
            return Some(format!("{STORED_CHANGED}: {}", key.current().key_id()));
        }
        Err(VerifyError::WrongKey { found, .. }) => {
            return Some(format!(
                "the stored certificate is signed with key {found}, which is neither the \
                 processor's public_key nor one of its previous_public_keys"
            ));
        }
        Err(_) => return Some(STORED_CHANGED.into()),
    };
    let expected = Expected {
        kind: certificate_kind(Some(request.kind)),
        processor: identity,
        request_id: &request.id,
        subprocessor: &row.subprocessor,
        task_state: None,
    };
    let problem = match claims(&value) {
        // Stored as verified before the registry applied certificate.proto's rules whole,
        // or changed in the store since: not a certificate whatever task it is stored with.
        Err(e) => {
            return Some(format!(
                "the stored body fails the check made as it is served: {e}"
            ))
        }
        Ok(c) if c.certificate_id != row.certificate_id => {
            Some("its certificate_id is not the one stored with it".into())
        }
        Ok(c) => mismatch(&c, &expected),
    };
    problem.map(|p| format!("the stored body is not the task's it is stored with: {p}"))
}

/// What [`recheck`] answers when the stored body's signature fails.
const STORED_CHANGED: &str =
    "the stored body no longer matches its signature under the processor's keys";

#[tonic::async_trait]
impl CertificateService for Api {
    #[tracing::instrument(skip_all, fields(request_id))]
    async fn list_certificates(
        &self,
        req: tonic::Request<ListCertificatesRequest>,
    ) -> Result<Response<CertificateList>, Status> {
        let caller = self.partner_api_caller(&req)?;
        let body = req.into_inner();
        tracing::Span::current().record("request_id", body.request_id.as_str());
        ApiError::ensure_valid(
            text_violation("processor", &body.processor, 128, false)
                .into_iter()
                .chain(text_violation(
                    "subprocessor",
                    &body.subprocessor,
                    128,
                    false,
                )),
        )?;
        let row = self.visible(&caller, &body.request_id).await?;
        let certificates = self
            .shared
            .store
            .certificates(&row.id, &body.processor, &body.subprocessor)
            .await
            .map_err(ApiError::from)?;
        if certificates.is_empty() {
            return Err(ApiError::not_found(format!(
                "request {} has no deletion certificate{}",
                row.id,
                narrowed(&body)
            ))
            .into());
        }
        let keys = &self.shared.certificate_keys;
        Ok(Response::new(CertificateList {
            certificates: certificates
                .into_iter()
                .map(|c| {
                    let identity = self.processor_identity(&c.processor);
                    let key = keys.get(&c.processor);
                    let (shown, now_verified) = stored(c, &row, identity, key);
                    if now_verified {
                        // Its stored rejection still says otherwise, so say why it is shown
                        // verified: the keys configured changed since it was received.
                        tracing::info!(
                            request_id = %row.id,
                            processor = %shown.processor,
                            subprocessor = %shown.subprocessor,
                            "a deletion certificate rejected when received verifies under the \
                             keys configured now; served verified"
                        );
                    }
                    shown
                })
                .collect(),
        }))
    }
}

/// " from processor P at subprocessor S", as far as the request narrows.
fn narrowed(body: &ListCertificatesRequest) -> String {
    let mut s = String::new();
    if !body.processor.is_empty() {
        s.push_str(&format!(" from processor {}", body.processor));
    }
    if !body.subprocessor.is_empty() {
        s.push_str(&format!(" at subprocessor {}", body.subprocessor));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsrelay_runtime::signing::{to_canonical_json, SigningKey};
    use serde_json::json;

    const ID: &str = "spiffe://dsrelay.dev/processor/p";
    /// A certificate id as the processor writes one.
    const CID: &str = "0193a1f0-7c3e-7d5a-9b1e-2f4c6a8e0b12";

    /// [`super::check`] of a certificate received at the epoch (no key here is revoked).
    fn check(
        key: Option<&KeyRing>,
        identity: &str,
        kind: &str,
        ack: &Acknowledgement,
        c: &DeletionCertificate,
    ) -> ReceivedCertificate {
        super::check(key, identity, kind, ack, c, 0)
    }

    fn signed(key: &SigningKey, body: serde_json::Value) -> DeletionCertificate {
        let doc = key.sign(to_canonical_json(&body).unwrap());
        DeletionCertificate {
            body: doc.body,
            signature: doc.signature,
            key_id: doc.key_id,
        }
    }

    fn body() -> serde_json::Value {
        json!({
            "version": 1, "certificate_id": CID, "kind": "erasure", "processor": ID,
            "request_id": "r-1", "subprocessor": "accounting", "task_state": "COMPLETED",
            "controller": "acme", "records_affected": 2, "erased": [], "retained": [],
            "completed_at": "2026-01-01T00:00:00.000Z", "issued_at": "2026-01-01T00:00:00.000Z",
        })
    }

    fn ack() -> Acknowledgement {
        Acknowledgement {
            request_id: "r-1".into(),
            subprocessor: "accounting".into(),
            state: TaskState::Completed as i32,
            ..Default::default()
        }
    }

    #[test]
    fn only_a_matching_certificate_under_the_configured_key_is_verified() {
        let key = SigningKey::generate();
        let public = KeyRing::new(key.public_key(), vec![]).unwrap();
        let good = check(Some(&public), ID, "erasure", &ack(), &signed(&key, body()));
        assert!(good.verified, "{}", good.rejection);
        assert_eq!(good.certificate_id, CID);

        let other = KeyRing::new(SigningKey::generate().public_key(), vec![]).unwrap();
        let r = check(Some(&other), ID, "erasure", &ack(), &signed(&key, body()));
        assert!(!r.verified && r.rejection.contains("not with the expected key"));
        assert_eq!(r.certificate_id, CID);

        let r = check(None, ID, "erasure", &ack(), &signed(&key, body()));
        assert!(!r.verified && r.rejection.contains("no public_key"));

        for (field, value) in [
            ("request_id", "r-2"),
            ("subprocessor", "mail"),
            ("processor", "spiffe://dsrelay.dev/processor/q"),
            ("task_state", "RETAINED"),
            ("kind", "export"),
        ] {
            let mut b = body();
            b[field] = json!(value);
            let r = check(Some(&public), ID, "erasure", &ack(), &signed(&key, b));
            assert!(!r.verified, "{field}");
            assert!(r.rejection.contains(field), "{field}: {}", r.rejection);
        }
        let mut tampered = signed(&key, body());
        let last = tampered.signature.len() - 1;
        tampered.signature[last] ^= 1;
        let r = check(Some(&public), ID, "erasure", &ack(), &tampered);
        assert_eq!(r.rejection, "the signature does not match the document");
    }

    #[test]
    fn a_contract_end_is_certified_as_one_and_an_erasure_only_as_an_erasure() {
        let key = SigningKey::generate();
        let public = KeyRing::new(key.public_key(), vec![]).unwrap();
        assert_eq!(
            certificate_kind(Some(RequestKind::ContractEnd)),
            "contract_end"
        );
        assert_eq!(certificate_kind(Some(RequestKind::Erasure)), "erasure");
        assert_eq!(certificate_kind(None), "erasure");
        let mut b = body();
        b["kind"] = json!("contract_end");
        let r = check(
            Some(&public),
            ID,
            "contract_end",
            &ack(),
            &signed(&key, b.clone()),
        );
        assert!(r.verified, "{}", r.rejection);
        // Neither kind passes for the other.
        let r = check(Some(&public), ID, "erasure", &ack(), &signed(&key, b));
        assert!(
            !r.verified && r.rejection.contains("kind"),
            "{}",
            r.rejection
        );
        let r = check(
            Some(&public),
            ID,
            "contract_end",
            &ack(),
            &signed(&key, body()),
        );
        assert!(
            !r.verified && r.rejection.contains("kind"),
            "{}",
            r.rejection
        );
    }

    /// A contract end's version 2 body (its terms and return in `contract_end`) is verified
    /// as version 1 still is; version 2 of an erasure, or without the object, is not. Before,
    /// every version but 1 was rejected.
    #[test]
    fn a_contract_end_of_version_1_or_2_is_verified() {
        let key = SigningKey::generate();
        let public = KeyRing::new(key.public_key(), vec![]).unwrap();
        let contract_end = |version: u64| {
            let mut b = body();
            b["kind"] = json!("contract_end");
            b["version"] = json!(version);
            b
        };
        let check_end = |b| check(Some(&public), ID, "contract_end", &ack(), &signed(&key, b));
        let r = check_end(contract_end(1));
        assert!(r.verified, "{}", r.rejection);
        let mut v2 = contract_end(2);
        v2["contract_end"] = json!({
            "choice": "RETURN_THEN_DELETE",
            "effective_at": "2026-01-01T00:00:00.000Z",
            "grace_ends_at": "2026-02-01T00:00:00.000Z",
            "returned": {
                "to": "registry",
                "part": {"manifest_sha256": "ab".repeat(32), "files": 2, "bytes": 150},
                "confirmation": {"state": "CONFIRMED", "at": "2026-01-15T00:00:00.000Z"},
            },
        });
        let r = check_end(v2.clone());
        assert!(r.verified, "{}", r.rejection);

        let r = check_end(contract_end(2));
        assert_eq!(
            r.rejection,
            format!("{NOT_A_CERTIFICATE}: the body has no contract_end")
        );
        let mut erasure = v2;
        erasure["kind"] = json!("erasure");
        let r = check(Some(&public), ID, "erasure", &ack(), &signed(&key, erasure));
        assert!(
            !r.verified && r.rejection.contains("only a contract_end certificate has"),
            "{}",
            r.rejection
        );
        let r = check_end(contract_end(3));
        assert_eq!(
            r.rejection,
            format!("{NOT_A_CERTIFICATE}: its version is not 1 or 2")
        );
    }

    #[test]
    fn a_certificate_too_large_for_the_store_is_invalid() {
        let key = SigningKey::generate();
        assert!(violations(0, &signed(&key, body())).is_empty());
        let huge = DeletionCertificate {
            body: vec![b' '; MAX_BODY + 1],
            signature: vec![0; 129],
            key_id: "k".repeat(129),
        };
        let fields: Vec<String> = violations(3, &huge).into_iter().map(|v| v.field).collect();
        assert_eq!(
            fields,
            [
                "acknowledgements[3].certificate.body",
                "acknowledgements[3].certificate.signature",
                "acknowledgements[3].certificate.key_id",
            ]
        );
    }

    /// A rejection is kept with the certificate and written into the audit trail's entry, so
    /// it quotes nothing the processor wrote in a rejected body, its key id included.
    #[test]
    fn a_rejection_quotes_no_text_of_the_body() {
        const TEXT: &str = "jane.doe@example.org, national id 010203-1234";
        let key = SigningKey::generate();
        let public = KeyRing::new(key.public_key(), vec![]).unwrap();
        for field in [
            "kind",
            "processor",
            "request_id",
            "subprocessor",
            "task_state",
            "version",
        ] {
            let mut b = body();
            b[field] = json!(TEXT);
            let r = check(Some(&public), ID, "erasure", &ack(), &signed(&key, b));
            assert!(!r.verified, "{field}");
            assert!(r.rejection.contains(field), "{field}: {}", r.rejection);
            assert!(!r.rejection.contains("jane"), "{field}: {}", r.rejection);
        }
        let mut c = signed(&key, body());
        c.key_id = TEXT.into();
        let r = check(Some(&public), ID, "erasure", &ack(), &c);
        assert!(
            !r.verified && r.rejection.contains("key_id"),
            "{}",
            r.rejection
        );
        assert!(!r.rejection.contains("jane"), "{}", r.rejection);
    }
    /// A signed body that is not a certificate as certificate.proto defines it (one that
    /// `dsrctl certificate verify` refuses) is rejected, with a reason naming the key and the
    /// rule and quoting nothing of the body. Before, the registry compared only the claims it
    /// checks against the acknowledgement, and verified such a body.
    #[test]
    fn a_body_outside_certificate_proto_is_rejected_naming_the_key() {
        const TEXT: &str = "jane.doe@example.org";
        let key = SigningKey::generate();
        let public = KeyRing::new(key.public_key(), vec![]).unwrap();
        let rejected = |b: serde_json::Value| {
            let r = check(Some(&public), ID, "erasure", &ack(), &signed(&key, b));
            assert!(!r.verified, "{}", r.rejection);
            assert!(!r.rejection.contains("jane"), "{}", r.rejection);
            let why = r.rejection.strip_prefix(NOT_A_CERTIFICATE);
            why.expect(&r.rejection)[2..].to_string()
        };
        let with = |key: &str, value: serde_json::Value| {
            let mut b = body();
            b[key] = value;
            rejected(b)
        };
        assert_eq!(
            with("records", json!(1)),
            r#"the body has the key "records", which a version 1 certificate does not have"#
        );
        assert_eq!(
            with(TEXT, json!(TEXT)),
            "the body has a key not named here (its name is the body's text), which a \
             version 1 certificate does not have"
        );
        let count = "its records_affected is not an integer of at least 0";
        for records in [json!(-1), json!(TEXT), json!(null)] {
            assert_eq!(with("records_affected", records), count);
        }
        // Canonical JSON has integers only, so a fraction signed as it is fails before.
        let mut fraction = body();
        fraction["records_affected"] = json!(2.5);
        let doc = key.sign(serde_json::to_vec(&fraction).unwrap());
        let c = DeletionCertificate {
            body: doc.body,
            signature: doc.signature,
            key_id: doc.key_id,
        };
        let r = check(Some(&public), ID, "erasure", &ack(), &c);
        assert!(!r.verified && !r.rejection.is_empty());
        let mut undated = body();
        undated.as_object_mut().unwrap().remove("issued_at");
        assert_eq!(rejected(undated), "the body has no issued_at");
        assert_eq!(with("erased", json!(TEXT)), "its erased is not an array");
        assert_eq!(
            with("completed_at", json!(TEXT)),
            "its completed_at is not a UTC time of the form 2025-01-01T00:00:00.000Z"
        );
        assert_eq!(
            with(
                "erased",
                json!([{"target": "t", "action": "deleted", "count": 1, TEXT: 1}])
            ),
            "its erased[0] has a key not named here (its name is the body's text), which \
             certificate.proto does not define there"
        );
        assert_eq!(
            with("certificate_id", json!(TEXT)),
            "its certificate_id is not a UUID (lowercase, with hyphens)"
        );
        assert_eq!(with("controller", json!("")), "its controller is empty");
    }

    /// Every shape of body a processor of this code has signed is verified: the first
    /// erasure certificates (without uncounted), a follow-up, a contract end of version 1
    /// (before version 2), uncounted before and after it had earlier_records, an adapter's
    /// erased count without target or action, a retained date an adapter gave beyond the
    /// years 0000 to 9999 (written "" or with a signed year), and version 2's contract ends.
    #[test]
    fn every_shape_a_processor_signed_is_verified() {
        let key = SigningKey::generate();
        let public = KeyRing::new(key.public_key(), vec![]).unwrap();
        let verified = |kind: &str, b: serde_json::Value| {
            let r = check(Some(&public), ID, kind, &ack(), &signed(&key, b.clone()));
            assert!(r.verified, "{b}: {}", r.rejection);
        };
        verified("erasure", body());
        let mut follow_up = body();
        follow_up["follows"] = json!("0193a1f0-7c3e-7d5a-9b1e-2f4c6a8e0b11");
        follow_up["erased"] = json!([{"target": "customers", "action": "deleted", "count": 1},
            {"target": "invoices", "action": "kept and stripped", "count": 3}]);
        follow_up["retained"] = json!([{"subprocessor": "accounting",
            "legal_basis": "Kirjanpitolaki 2:10 §", "until": "2031-01-01T00:00:00.000Z"}]);
        verified("erasure", follow_up.clone());
        let mut v1_end = follow_up.clone();
        v1_end["kind"] = json!("contract_end");
        v1_end["uncounted"] = json!({"reason": "an earlier call was cut off",
            "records": 40_000, "subjects": 10_000});
        verified("contract_end", v1_end.clone());
        v1_end["uncounted"]["earlier_records"] = json!(4);
        v1_end["uncounted"]["earlier_subjects"] = json!(1);
        v1_end["erased"] = json!([{"target": "", "action": "", "count": 2}]);
        verified("contract_end", v1_end);
        for until in ["", "+10000-01-01T00:00:00.000Z"] {
            let mut forever = follow_up.clone();
            forever["retained"][0]["until"] = json!(until);
            verified("erasure", forever);
        }
        let mut v2 = body();
        v2["version"] = json!(2);
        v2["kind"] = json!("contract_end");
        let terms = |choice: &str| {
            json!({"choice": choice, "effective_at": "2026-01-01T00:00:00.000Z",
                "grace_ends_at": "2026-02-01T00:00:00.000Z"})
        };
        for choice in ["NONE", "DELETE"] {
            v2["contract_end"] = terms(choice);
            verified("contract_end", v2.clone());
        }
        v2["contract_end"] = terms("RETURN_THEN_DELETE");
        v2["contract_end"]["returned"] = json!({"to": "recipient", "recipient": "archive-oy",
            "part": {"manifest_sha256": "ab".repeat(32), "files": 2, "bytes": 150,
                "delivered_at": "2026-01-02T00:00:00.000Z"},
            "confirmation": {"state": "GRACE_PERIOD_ENDED", "at": "2026-02-01T00:00:00.000Z"}});
        verified("contract_end", v2.clone());
        v2["contract_end"]["returned"] =
            json!({"to": "registry", "confirmation": {"state": "CONFIRMED"}});
        verified("contract_end", v2);
    }
}

/// Serving what forgetting left of a rejected certificate.
#[cfg(test)]
mod forgotten_tests {
    use super::*;

    fn request() -> RequestRow {
        RequestRow {
            id: "r-1".into(),
            partner: "crm".into(),
            idempotency_key: "k".into(),
            body: None,
            kind: RequestKind::Erasure,
            state: dsrelay_proto::v1::RequestState::Completed,
            received_at: 0,
            due_at: 0,
            extension_months: 0,
            extension_reasons: "[]".into(),
            trace_id: "0".repeat(32),
            cancel_reason: None,
            updated_at: 0,
            finished_at: Some(0),
            answered_at: Some(0),
        }
    }

    /// Its body removed, a rejected certificate cannot be checked against the keys
    /// configured now, whatever they are: its reason is served as history, with when it was
    /// received, and says plainly that nothing can send it again. Before, the stored reason
    /// was served as if current, naming a key configured then.
    #[test]
    fn a_forgotten_rejection_is_served_as_history() {
        let key = KeyRing::new(
            dsrelay_runtime::signing::SigningKey::generate().public_key(),
            vec![],
        )
        .unwrap();
        let row = CertificateRow {
            processor: "p".into(),
            subprocessor: "accounting".into(),
            sequence: 1,
            certificate_id: String::new(),
            body: Vec::new(),
            signature: Vec::new(),
            key_id: String::new(),
            verified: 0,
            rejection: "signed with key sha256:94eb, not with the expected key sha256:ce76 \
                        (its body, SHA-256 ab12, was removed when the request was forgotten)"
                .into(),
            received_at: 1_767_225_600_000,
            ack_state: Some(TaskState::Completed as i32),
        };
        for key in [Some(&key), None] {
            let (shown, now_verified) = stored(row.clone(), &request(), Some("id"), key);
            assert!(!shown.verified && !now_verified);
            assert_eq!(
                shown.rejection,
                "rejected when received at 2026-01-01T00:00:00Z: signed with key sha256:94eb, \
                 not with the expected key sha256:ce76 (its body, SHA-256 ab12, was removed \
                 when the request was forgotten); it cannot be checked again, as its body is \
                 no longer stored here, and no call sends a certificate again, so it stays \
                 rejected here even if the processor still holds it and the reason no longer \
                 applies"
            );
        }
    }
}

/// ListCertificates through the served registry.
#[cfg(test)]
mod served_tests {
    use dsrelay_proto::v1::certificate_service_client::CertificateServiceClient;
    use dsrelay_runtime::pki::dev_identity;
    use dsrelay_runtime::signing::{to_canonical_json, SigningKey};
    use dsrelay_runtime::store::Db;
    use serde_json::json;

    use super::*;
    use crate::api::acknowledgement::harness::{Registry, PROCESSOR};
    use crate::test_postgres::on_postgres;
    use crate::test_registry::{Registry as TestRegistry, Setup};
    use std::path::Path;

    /// A certificate the registry verified on receipt has its body changed in the database
    /// afterwards: ListCertificates shows it not verified, saying why, instead of the
    /// verdict stored at receipt. Before, it was shown verified.
    async fn a_certificate_changed_in_the_store_is_not_shown_verified(
        database_url: &str,
        dir: &std::path::Path,
    ) {
        let key = SigningKey::generate();
        let registry =
            Registry::start(dir, database_url, Some(&key.public_key().to_base64())).await;
        let id = registry.submit(RequestKind::Erasure, "erasure").await;
        let body = |records: i64| {
            to_canonical_json(&json!({
                "version": 1, "certificate_id": certificate_id(1), "kind": "erasure",
                "processor": dev_identity("processor", PROCESSOR), "request_id": id,
                "subprocessor": "accounting", "task_state": "COMPLETED", "controller": "acme",
                "records_affected": records, "erased": [], "retained": [],
                "completed_at": "2026-01-01T00:00:00.000Z",
                "issued_at": "2026-01-01T00:00:00.000Z",
            }))
            .unwrap()
        };
        let doc = key.sign(body(2));
        let ack = Acknowledgement {
            request_id: id.clone(),
            subprocessor: "accounting".into(),
            sequence: 1,
            state: TaskState::Completed as i32,
            certificate: Some(DeletionCertificate {
                body: doc.body,
                signature: doc.signature,
                key_id: doc.key_id,
            }),
            ..Default::default()
        };
        let answer = registry.acknowledge(vec![ack]).await;
        assert_eq!(answer.applied, 1, "{answer:?}");
        let list = || list(&registry, &id);
        let shown = list().await;
        assert!(shown[0].verified, "{shown:?}");

        let db = Db::connect(database_url).await.unwrap();
        sqlx::query("UPDATE certificates SET body = $1 WHERE request_id = $2")
            .bind(body(0))
            .bind(id.as_str())
            .execute(&db.pool)
            .await
            .unwrap();
        let shown = list().await;
        assert!(!shown[0].verified, "{shown:?}");
        assert_eq!(shown[0].rejection, STORED_CHANGED);
        assert_eq!(shown[0].certificate.as_ref().unwrap().body, body(0));
        registry.stop().await;
    }

    /// A registry whose processor's keys are `keys` (TOML lines of its `[[processors]]`).
    async fn with_keys(dir: &std::path::Path, database_url: &str, keys: String) -> TestRegistry {
        let setup = Setup {
            processor_keys: keys,
            ..Setup::default()
        };
        TestRegistry::start(dir, database_url, setup).await
    }

    /// The processor's key is rotated: the registry is restarted with the new key as
    /// `public_key` and the old one in `previous_public_keys`. The certificate signed before
    /// stays verified when shown, and one signed with the old key that was still on its way
    /// (queued at the processor) is verified on arrival, as is one signed with the new key;
    /// with the old key taken out of the list, what it signed reads as rejected, saying why.
    /// Before, the previous key could not be configured, and a rotation unverified every
    /// certificate signed before it.
    async fn a_rotated_key_leaves_what_it_signed_verified(database_url: &str, dir: &Path) {
        let (old, new) = (SigningKey::generate(), SigningKey::generate());
        let key_line = |k: &SigningKey| format!("public_key = {:?}\n", k.public_key().to_base64());
        let registry = with_keys(dir, database_url, key_line(&old)).await;
        let id = registry.submit(RequestKind::Erasure, "erasure").await;
        let certified = |key: &SigningKey, subprocessor: &str, n: u64| {
            let doc = key.sign(
                to_canonical_json(&json!({
                    "version": 1, "certificate_id": certificate_id(n), "kind": "erasure",
                    "processor": dev_identity("processor", PROCESSOR), "request_id": id,
                    "subprocessor": subprocessor, "task_state": "COMPLETED",
                    "controller": "acme", "records_affected": 1, "erased": [], "retained": [],
                    "completed_at": "2026-01-01T00:00:00.000Z",
                    "issued_at": "2026-01-01T00:00:00.000Z",
                }))
                .unwrap(),
            );
            Acknowledgement {
                request_id: id.clone(),
                subprocessor: subprocessor.into(),
                sequence: n,
                state: TaskState::Completed as i32,
                certificate: Some(DeletionCertificate {
                    body: doc.body,
                    signature: doc.signature,
                    key_id: doc.key_id,
                }),
                ..Default::default()
            }
        };
        let answer = registry
            .acknowledge(vec![certified(&old, "accounting", 1)])
            .await;
        assert_eq!(answer.applied, 1, "{answer:?}");
        registry.stop().await;

        let rotated = format!(
            "{}previous_public_keys = [{:?}]\n",
            key_line(&new),
            old.public_key().to_base64()
        );
        let registry = with_keys(dir, database_url, rotated).await;
        let answer = registry
            .acknowledge(vec![certified(&old, "mail", 2), certified(&new, "crm", 3)])
            .await;
        assert_eq!(answer.applied, 2, "{answer:?}");
        let shown = list(&registry, &id).await;
        assert_eq!(shown.len(), 3, "{shown:?}");
        for c in &shown {
            assert!(c.verified, "{}: {}", c.subprocessor, c.rejection);
        }
        registry.stop().await;

        let registry = with_keys(dir, database_url, key_line(&new)).await;
        let shown = list(&registry, &id).await;
        for c in &shown {
            match c.subprocessor.as_str() {
                "crm" => assert!(c.verified, "{}", c.rejection),
                _ => assert!(
                    !c.verified
                        && c.rejection.contains(&old.public_key().key_id())
                        && c.rejection.contains("previous_public_keys"),
                    "{c:?}"
                ),
            }
        }
        registry.stop().await;
    }

    /// The processor's key leaked: the registry is restarted with it in
    /// `revoked_public_keys` as of now. A certificate it signed that was stored before
    /// (while its revocation was still scheduled) stays verified when shown; one arriving
    /// now is rejected naming the key and the revocation, though its body is dated long
    /// before (the key holder writes those dates). Before, a key was trusted or not: taken
    /// out, it unverified what it signed before its leak too.
    async fn a_revoked_key_leaves_what_was_stored_before_verified(database_url: &str, dir: &Path) {
        let (leaked, new) = (SigningKey::generate(), SigningKey::generate());
        let keys = |revoked_at: &str| {
            format!(
                "public_key = {:?}\nrevoked_public_keys = [{{ key = {:?}, revoked_at = {:?} }}]\n",
                new.public_key().to_base64(),
                leaked.public_key().to_base64(),
                revoked_at
            )
        };
        let registry = with_keys(dir, database_url, keys("2999-01-01T00:00:00Z")).await;
        let id = registry.submit(RequestKind::Erasure, "erasure").await;
        let certified = |key: &SigningKey, subprocessor: &str, n: u64| {
            let doc = key.sign(
                to_canonical_json(&json!({
                    "version": 1, "certificate_id": certificate_id(n), "kind": "erasure",
                    "processor": dev_identity("processor", PROCESSOR), "request_id": id,
                    "subprocessor": subprocessor, "task_state": "COMPLETED",
                    "controller": "acme", "records_affected": 1, "erased": [], "retained": [],
                    "completed_at": "2020-01-01T00:00:00.000Z",
                    "issued_at": "2020-01-01T00:00:00.000Z",
                }))
                .unwrap(),
            );
            Acknowledgement {
                request_id: id.clone(),
                subprocessor: subprocessor.into(),
                sequence: n,
                state: TaskState::Completed as i32,
                certificate: Some(DeletionCertificate {
                    body: doc.body,
                    signature: doc.signature,
                    key_id: doc.key_id,
                }),
                ..Default::default()
            }
        };
        let answer = registry
            .acknowledge(vec![certified(&leaked, "accounting", 1)])
            .await;
        assert_eq!(answer.applied, 1, "{answer:?}");
        assert!(list(&registry, &id).await[0].verified);
        registry.stop().await;

        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let revoked_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let registry = with_keys(dir, database_url, keys(&revoked_at)).await;
        let answer = registry
            .acknowledge(vec![
                certified(&leaked, "mail", 2),
                certified(&new, "crm", 3),
            ])
            .await;
        assert_eq!(answer.applied, 2, "{answer:?}");
        let shown = list(&registry, &id).await;
        assert_eq!(shown.len(), 3, "{shown:?}");
        let revoked = format!(
            "signed with key {}, which was revoked at {revoked_at}",
            leaked.public_key().key_id()
        );
        for c in &shown {
            match c.subprocessor.as_str() {
                "mail" => assert!(!c.verified && c.rejection.contains(&revoked), "{c:?}"),
                _ => assert!(c.verified, "{}: {}", c.subprocessor, c.rejection),
            }
        }
        registry.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoked_key_leaves_what_was_stored_before_verified_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_revoked_key_leaves_what_was_stored_before_verified(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoked_key_leaves_what_was_stored_before_verified_on_postgres() {
        on_postgres(|url, dir| async move {
            a_revoked_key_leaves_what_was_stored_before_verified(&url, &dir).await;
        })
        .await;
    }

    /// The processor's key was configured wrong when its certificates arrived: both were
    /// rejected ("not with the expected key"). Restarted with its right key, the one that
    /// matches its acknowledgement is served verified, and the one whose body names another
    /// task state than its acknowledgement stays rejected, saying so now. Before, the stored
    /// rejection was served as if current, naming a key no longer configured.
    async fn a_rejected_certificate_is_served_verified_once_its_key_is_configured(
        database_url: &str,
        dir: &Path,
    ) {
        let (right, wrong) = (SigningKey::generate(), SigningKey::generate());
        let key_line = |k: &SigningKey| format!("public_key = {:?}\n", k.public_key().to_base64());
        let registry = with_keys(dir, database_url, key_line(&wrong)).await;
        let id = registry.submit(RequestKind::Erasure, "erasure").await;
        let certified = |subprocessor: &str, claimed_state: &str, n: u64| {
            let doc = right.sign(
                to_canonical_json(&json!({
                    "version": 1, "certificate_id": certificate_id(n), "kind": "erasure",
                    "processor": dev_identity("processor", PROCESSOR), "request_id": id,
                    "subprocessor": subprocessor, "task_state": claimed_state,
                    "controller": "acme", "records_affected": 1, "erased": [], "retained": [],
                    "completed_at": "2026-01-01T00:00:00.000Z",
                    "issued_at": "2026-01-01T00:00:00.000Z",
                }))
                .unwrap(),
            );
            Acknowledgement {
                request_id: id.clone(),
                subprocessor: subprocessor.into(),
                sequence: n,
                state: TaskState::Completed as i32,
                certificate: Some(DeletionCertificate {
                    body: doc.body,
                    signature: doc.signature,
                    key_id: doc.key_id,
                }),
                ..Default::default()
            }
        };
        let answer = registry
            .acknowledge(vec![
                certified("accounting", "COMPLETED", 1),
                certified("mail", "RETAINED", 2),
            ])
            .await;
        assert_eq!(answer.applied, 2, "{answer:?}");
        for c in list(&registry, &id).await {
            assert!(
                !c.verified && c.rejection.contains("not with the expected key"),
                "{c:?}"
            );
        }
        registry.stop().await;

        let registry = with_keys(dir, database_url, key_line(&right)).await;
        let shown = list(&registry, &id).await;
        assert_eq!(shown.len(), 2, "{shown:?}");
        for c in &shown {
            match c.subprocessor.as_str() {
                "accounting" => {
                    assert!(c.verified, "{}", c.rejection);
                    assert_eq!(c.rejection, "");
                }
                _ => {
                    assert!(!c.verified, "{c:?}");
                    assert_eq!(
                        c.rejection,
                        "its task_state is not \"COMPLETED\", as the acknowledgement says"
                    );
                }
            }
        }
        registry.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rejected_certificate_is_served_verified_once_its_key_is_configured_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_rejected_certificate_is_served_verified_once_its_key_is_configured(&url, dir.path())
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rejected_certificate_is_served_verified_once_its_key_is_configured_on_postgres() {
        on_postgres(|url, dir| async move {
            a_rejected_certificate_is_served_verified_once_its_key_is_configured(&url, &dir).await;
        })
        .await;
    }

    /// Signed bodies that are not certificates as certificate.proto defines them (an
    /// unknown key, a negative records_affected, no issued_at) are stored and served as
    /// rejected, each with a reason naming the key; a well-formed one and an older
    /// processor's shape are verified. A body stored as verified that fails these rules (as
    /// one stored before the registry applied them could) is served as rejected, saying so.
    /// Before, all of them were stored and served as verified.
    async fn a_body_outside_certificate_proto_is_stored_rejected(database_url: &str, dir: &Path) {
        let key = SigningKey::generate();
        let registry =
            Registry::start(dir, database_url, Some(&key.public_key().to_base64())).await;
        let id = registry.submit(RequestKind::Erasure, "erasure").await;
        let body = |n: u64, subprocessor: &str| {
            json!({
                "version": 1, "certificate_id": certificate_id(n), "kind": "erasure",
                "processor": dev_identity("processor", PROCESSOR), "request_id": id,
                "subprocessor": subprocessor, "task_state": "COMPLETED", "controller": "acme",
                "records_affected": 1, "erased": [], "retained": [],
                "completed_at": "2026-01-01T00:00:00.000Z",
                "issued_at": "2026-01-01T00:00:00.000Z",
            })
        };
        let certified = |n: u64, body: serde_json::Value| {
            let doc = key.sign(to_canonical_json(&body).unwrap());
            Acknowledgement {
                request_id: id.clone(),
                subprocessor: body["subprocessor"].as_str().unwrap().into(),
                sequence: n,
                state: TaskState::Completed as i32,
                certificate: Some(DeletionCertificate {
                    body: doc.body,
                    signature: doc.signature,
                    key_id: doc.key_id,
                }),
                ..Default::default()
            }
        };
        let mut unknown = body(2, "mail");
        unknown["records"] = json!(5);
        let mut negative = body(3, "crm");
        negative["records_affected"] = json!(-4);
        let mut undated = body(4, "billing");
        undated.as_object_mut().unwrap().remove("issued_at");
        // An adapter's count without target or action, and a retained date beyond the year
        // 9999, as processors signed them before the adapter's dates were held to a range.
        let mut older = body(5, "archive");
        older["erased"] = json!([{"target": "", "action": "", "count": 1}]);
        older["retained"] = json!([{"subprocessor": "archive", "legal_basis": "law",
            "until": ""}]);
        let answer = registry
            .acknowledge(vec![
                certified(1, body(1, "accounting")),
                certified(2, unknown),
                certified(3, negative),
                certified(4, undated),
                certified(5, older),
            ])
            .await;
        assert_eq!(answer.applied, 5, "{answer:?}");
        let expected = |subprocessor: &str| match subprocessor {
            "mail" => {
                r#"the body has the key "records", which a version 1 certificate does not have"#
            }
            "crm" => "its records_affected is not an integer of at least 0",
            "billing" => "the body has no issued_at",
            _ => "",
        };
        let shown = list(&registry, &id).await;
        assert_eq!(shown.len(), 5, "{shown:?}");
        for c in &shown {
            match expected(&c.subprocessor) {
                "" => assert!(c.verified, "{}: {}", c.subprocessor, c.rejection),
                why => {
                    assert!(!c.verified, "{c:?}");
                    assert_eq!(c.rejection, format!("{NOT_A_CERTIFICATE}: {why}"));
                }
            }
        }
        // What is stored says the same as what is served.
        let db = Db::connect(database_url).await.unwrap();
        let stored: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT subprocessor, verified, rejection FROM certificates WHERE request_id = $1 \
             ORDER BY subprocessor",
        )
        .bind(id.as_str())
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(stored.len(), 5, "{stored:?}");
        for (subprocessor, verified, rejection) in &stored {
            match expected(subprocessor) {
                "" => assert_eq!((*verified, rejection.as_str()), (1, ""), "{subprocessor}"),
                why => {
                    assert_eq!(*verified, 0, "{subprocessor}");
                    assert_eq!(*rejection, format!("{NOT_A_CERTIFICATE}: {why}"));
                }
            }
        }

        // The verified one's body and signature replaced by a body the processor's key
        // signed with an unknown key in it, as one stored verified before these rules were
        // applied would be.
        let mut extra = body(1, "accounting");
        extra["note"] = json!("jane.doe@example.org");
        let doc = key.sign(to_canonical_json(&extra).unwrap());
        sqlx::query(
            "UPDATE certificates SET body = $1, signature = $2 WHERE request_id = $3 \
             AND subprocessor = 'accounting'",
        )
        .bind(doc.body)
        .bind(doc.signature)
        .bind(id.as_str())
        .execute(&db.pool)
        .await
        .unwrap();
        let shown = list(&registry, &id).await;
        let accounting = shown
            .iter()
            .find(|c| c.subprocessor == "accounting")
            .unwrap();
        assert!(!accounting.verified, "{accounting:?}");
        assert_eq!(
            accounting.rejection,
            format!(
                "the stored body fails the check made as it is served: {NOT_A_CERTIFICATE}: \
                 the body has a key not named here (its name is the body's text), which a \
                 version 1 certificate does not have"
            )
        );
        registry.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_outside_certificate_proto_is_stored_rejected_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_body_outside_certificate_proto_is_stored_rejected(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_body_outside_certificate_proto_is_stored_rejected_on_postgres() {
        on_postgres(|url, dir| async move {
            a_body_outside_certificate_proto_is_stored_rejected(&url, &dir).await;
        })
        .await;
    }

    /// Certificate id `n` (a UUID, as the processor writes one).
    fn certificate_id(n: u64) -> String {
        format!("0193a1f0-7c3e-7d5a-9b1e-{n:012x}")
    }

    /// Every certificate of request `id`, as the partner sees them.
    async fn list(registry: &TestRegistry, id: &str) -> Vec<StoredCertificate> {
        CertificateServiceClient::new(registry.channel("partner-crm"))
            .list_certificates(ListCertificatesRequest {
                request_id: id.to_string(),
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner()
            .certificates
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rotated_key_leaves_what_it_signed_verified_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_rotated_key_leaves_what_it_signed_verified(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rotated_key_leaves_what_it_signed_verified_on_postgres() {
        on_postgres(|url, dir| async move {
            a_rotated_key_leaves_what_it_signed_verified(&url, &dir).await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_changed_in_the_store_is_not_shown_verified_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_certificate_changed_in_the_store_is_not_shown_verified(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_changed_in_the_store_is_not_shown_verified_on_postgres() {
        on_postgres(|url, dir| async move {
            a_certificate_changed_in_the_store_is_not_shown_verified(&url, &dir).await;
        })
        .await;
    }

    /// Certificates signed with the processor's configured key whose bodies match their
    /// acknowledgements, each checked against those stored before it. The legitimate chains
    /// stay verified: a task's first certificate without `follows` and its follow-up naming
    /// it, in one call; and a follow-up that arrives before the one it names (an
    /// acknowledgement the registry refused is retried after its follow-up). Stored and
    /// served rejected, naming the rule and ids: an id already stored for another request's
    /// certificate; a `follows` naming another request's certificate, or another task's of
    /// this request; a task's first certificate whose `follows` names its later one; a
    /// follow-up without `follows`; a `follows` skipping the task's latest certificate. Their
    /// acknowledgements are applied all the same, and a retried one stays a duplicate.
    /// Before, every one of them was stored and served verified.
    async fn a_certificate_reusing_an_id_or_breaking_its_follows_chain_is_rejected(
        database_url: &str,
        dir: &Path,
    ) {
        let key = SigningKey::generate();
        let registry =
            Registry::start(dir, database_url, Some(&key.public_key().to_base64())).await;
        let (r1, r2) = (
            registry.submit(RequestKind::Erasure, "erasure-1").await,
            registry.submit(RequestKind::Erasure, "erasure-2").await,
        );
        let ack = |request: &str,
                   subprocessor: &str,
                   sequence: u64,
                   state: TaskState,
                   n: u64,
                   follows: Option<u64>| {
            let mut body = json!({
                "version": 1, "certificate_id": certificate_id(n), "kind": "erasure",
                "processor": dev_identity("processor", PROCESSOR), "request_id": request,
                "subprocessor": subprocessor,
                "task_state": state.as_str_name().trim_start_matches("TASK_STATE_"),
                "controller": "acme", "records_affected": sequence, "erased": [],
                "retained": [], "completed_at": "2026-01-01T00:00:00.000Z",
                "issued_at": "2026-01-01T00:00:00.000Z",
            });
            if let Some(f) = follows {
                body["follows"] = json!(certificate_id(f));
            }
            let doc = key.sign(to_canonical_json(&body).unwrap());
            let retained = state == TaskState::Retained;
            Acknowledgement {
                request_id: request.to_string(),
                subprocessor: subprocessor.into(),
                sequence,
                state: state as i32,
                legal_basis: if retained {
                    "bookkeeping act".into()
                } else {
                    String::new()
                },
                retain_until: retained
                    .then(|| dsrelay_proto::timestamp_from_millis(4_000_000_000_000)),
                certificate: Some(DeletionCertificate {
                    body: doc.body,
                    signature: doc.signature,
                    key_id: doc.key_id,
                }),
                ..Default::default()
            }
        };
        use TaskState::{Completed, Retained};
        let first = ack(&r1, "accounting", 1, Retained, 1, None);
        let answer = registry
            .acknowledge(vec![
                first.clone(),
                ack(&r1, "accounting", 2, Retained, 2, Some(1)),
                // A follow-up ahead of the certificate it names.
                ack(&r1, "crm", 4, Completed, 4, Some(3)),
            ])
            .await;
        assert_eq!((answer.applied, answer.duplicates), (3, 0), "{answer:?}");
        let answer = registry
            .acknowledge(vec![
                first,
                ack(&r1, "crm", 2, Retained, 3, None),
                ack(&r2, "accounting", 1, Completed, 1, None),
                ack(&r2, "mail", 1, Retained, 5, Some(2)),
                ack(&r1, "mail", 1, Retained, 6, Some(1)),
                ack(&r1, "hr", 3, Retained, 7, None),
                ack(&r1, "hr", 1, Retained, 8, Some(7)),
                ack(&r1, "accounting", 3, Completed, 9, None),
                ack(&r1, "accounting", 4, Completed, 10, Some(1)),
            ])
            .await;
        assert_eq!((answer.applied, answer.duplicates), (8, 1), "{answer:?}");

        let verdicts = |shown: Vec<StoredCertificate>| -> Vec<(String, bool, String)> {
            shown
                .into_iter()
                .map(|c| (c.certificate_id, c.verified, c.rejection))
                .collect()
        };
        let mut shown = verdicts(list(&registry, &r1).await);
        shown.extend(verdicts(list(&registry, &r2).await));
        let rejected = |rule: String| (false, format!("{AGAINST_STORED_FOR_TESTS}: {rule}"));
        let ok = || (true, String::new());
        let id = certificate_id;
        let expected: Vec<(String, (bool, String))> = vec![
            (id(1), ok()),
            (id(2), ok()),
            (
                id(9),
                rejected(format!(
                    "it names no certificate in follows, but this task's certificate {} came \
                     with its acknowledgement 2, before this one (3)",
                    id(2)
                )),
            ),
            (
                id(10),
                rejected(format!(
                    "its follows names certificate {}, but this task's latest certificate \
                     before this one (4) is {}, of its acknowledgement 2",
                    id(1),
                    id(2)
                )),
            ),
            (id(3), ok()),
            (id(4), ok()),
            (
                id(6),
                rejected(format!(
                    "its follows names certificate {}, which is stored for another task of \
                     this request",
                    id(1)
                )),
            ),
            (
                id(8),
                rejected(format!(
                    "its follows names certificate {}, which came with this task's \
                     acknowledgement 3, not before this one (1)",
                    id(7)
                )),
            ),
            (id(7), ok()),
            (
                id(1),
                rejected(format!(
                    "its certificate_id {} is already stored with another body: a \
                     certificate's id is unique",
                    id(1)
                )),
            ),
            (
                id(5),
                rejected(format!(
                    "its follows names certificate {}, which is stored for another request",
                    id(2)
                )),
            ),
        ];
        let expected: Vec<(String, bool, String)> = expected
            .into_iter()
            .map(|(id, (verified, rejection))| (id, verified, rejection))
            .collect();
        assert_eq!(shown, expected);

        // Signed with a key the registry does not configure (rejected for it) and naming in
        // follows a certificate of another request: once that key is configured, the
        // certificate is still rejected, for its follows.
        let other = SigningKey::generate();
        let mut body = json!({
            "version": 1, "certificate_id": certificate_id(11), "kind": "erasure",
            "processor": dev_identity("processor", PROCESSOR), "request_id": r2,
            "subprocessor": "payroll", "task_state": "COMPLETED", "controller": "acme",
            "records_affected": 1, "erased": [], "retained": [],
            "completed_at": "2026-01-01T00:00:00.000Z", "issued_at": "2026-01-01T00:00:00.000Z",
        });
        body["follows"] = json!(certificate_id(2));
        let doc = other.sign(to_canonical_json(&body).unwrap());
        let answer = registry
            .acknowledge(vec![Acknowledgement {
                request_id: r2.clone(),
                subprocessor: "payroll".into(),
                sequence: 1,
                state: TaskState::Completed as i32,
                certificate: Some(DeletionCertificate {
                    body: doc.body,
                    signature: doc.signature,
                    key_id: doc.key_id,
                }),
                ..Default::default()
            }])
            .await;
        assert_eq!((answer.applied, answer.duplicates), (1, 0), "{answer:?}");
        registry.stop().await;
        let registry =
            Registry::start(dir, database_url, Some(&other.public_key().to_base64())).await;
        let payroll: Vec<StoredCertificate> = list(&registry, &r2)
            .await
            .into_iter()
            .filter(|c| c.subprocessor == "payroll")
            .collect();
        assert_eq!(payroll.len(), 1, "{payroll:?}");
        assert!(!payroll[0].verified, "{payroll:?}");
        // Only the rule it broke: the key it was first rejected for is now the one.
        assert_eq!(
            payroll[0].rejection,
            format!(
                "{AGAINST_STORED_FOR_TESTS}: its follows names certificate {}, which is stored \
                 for another request",
                certificate_id(2)
            ),
            "{payroll:?}"
        );
        registry.stop().await;
    }

    /// How the store's rejections against the stored certificates begin.
    const AGAINST_STORED_FOR_TESTS: &str = "checked against the certificates stored before it";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_reusing_an_id_or_breaking_its_follows_chain_is_rejected_on_sqlite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/registry.db", dir.path().display());
        a_certificate_reusing_an_id_or_breaking_its_follows_chain_is_rejected(&url, dir.path())
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_reusing_an_id_or_breaking_its_follows_chain_is_rejected_on_postgres() {
        on_postgres(|url, dir| async move {
            a_certificate_reusing_an_id_or_breaking_its_follows_chain_is_rejected(&url, &dir).await;
        })
        .await;
    }
}
