//! Deletion certificates: checking each one a processor sends with an acknowledgement, and
//! the read API (`CertificateService`) for partners and operators.
//!
//! A certificate is verified when it is signed by the key configured as the processor's
//! `public_key`, its body is canonical JSON, and the body names the same processor
//! (identity), request, subprocessor and task state as the acknowledgement it came with,
//! and the kind its request calls for: `erasure` for an ERASURE (and any other request),
//! `contract_end` for a CONTRACT_END. One that fails is still stored, as rejected with why, so that an
//! operator sees it; the task's state change is applied as reported either way, since the
//! processor's work happened whatever its certificate says.

use dsrelay_proto::v1::certificate_service_server::CertificateService;
use std::collections::HashMap;

use dsrelay_proto::v1::{
    Acknowledgement, CertificateList, DeletionCertificate, ListCertificatesRequest, RequestKind,
    StoredCertificate, TaskState,
};
use dsrelay_runtime::identity::FieldViolation;
use dsrelay_runtime::signing::{PublicKey, Signed};
use serde::Deserialize;
use tonic::{Response, Status};

use crate::error::ApiError;
use crate::store::{CertificateRow, ReceivedCertificate};
use crate::validate::text_violation;

use super::Api;

/// The body fields the registry checks against the acknowledgement.
#[derive(Debug, Deserialize)]
struct Claims {
    version: u32,
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

/// Checks `c`, which came with `ack` from the processor whose certificate identity is
/// `identity` and whose configured key is `key`; its body must name `kind`.
pub(crate) fn check(
    key: Option<&PublicKey>,
    identity: &str,
    kind: &str,
    ack: &Acknowledgement,
    c: &DeletionCertificate,
) -> ReceivedCertificate {
    let doc = Signed {
        body: c.body.clone(),
        signature: c.signature.clone(),
        key_id: c.key_id.clone(),
    };
    // The id is shown even for a rejected certificate, when the body has one: read from the
    // body verification parsed, or else (the signature did not hold) parsed for it alone.
    let mut certificate_id = None;
    let rejection = match key {
        None => Some("no public_key is configured for this processor".to_string()),
        Some(key) => match key.verify(&doc) {
            Err(e) => Some(e.to_string()),
            Ok(value) => {
                certificate_id = id_in(&value);
                match serde_json::from_value::<Claims>(value) {
                    Err(e) => Some(format!("the body is not a deletion certificate: {e}")),
                    Ok(claims) => mismatch(&claims, identity, kind, ack),
                }
            }
        },
    };
    let certificate_id = certificate_id
        .or_else(|| claimed_id(&doc.body))
        .unwrap_or_default();
    ReceivedCertificate {
        body: doc.body,
        signature: doc.signature,
        key_id: doc.key_id,
        certificate_id,
        verified: rejection.is_none(),
        rejection: rejection.unwrap_or_default(),
    }
}

/// The `certificate_id` `body` carries, read without checking the signature.
fn claimed_id(body: &[u8]) -> Option<String> {
    id_in(&serde_json::from_slice::<serde_json::Value>(body).ok()?)
}

/// The `certificate_id` of a certificate's parsed body.
fn id_in(body: &serde_json::Value) -> Option<String> {
    body.get("certificate_id")?.as_str().map(str::to_string)
}

/// The first way `claims` disagree with the acknowledgement, if any.
fn mismatch(claims: &Claims, identity: &str, kind: &str, ack: &Acknowledgement) -> Option<String> {
    let state = TaskState::try_from(ack.state)
        .unwrap_or_default()
        .as_str_name()
        .trim_start_matches("TASK_STATE_")
        .to_string();
    let pairs = [
        ("kind", claims.kind.as_str(), kind),
        ("processor", &claims.processor, identity),
        ("request_id", &claims.request_id, &ack.request_id),
        ("subprocessor", &claims.subprocessor, &ack.subprocessor),
        ("task_state", &claims.task_state, &state),
    ];
    if claims.version != 1 {
        return Some(format!("version {} is not known here", claims.version));
    }
    if claims.certificate_id.is_empty() {
        return Some("the certificate has no certificate_id".into());
    }
    pairs
        .iter()
        .find(|(_, got, want)| got != want)
        .map(|(field, got, want)| {
            format!("its {field} is {got:?} where the acknowledgement says {want:?}")
        })
}

impl Api {
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
        let identity = self
            .shared
            .config
            .processors
            .iter()
            .find(|p| p.name == processor)
            .map_or("", |p| p.identity.as_str());
        let key = self.shared.certificate_keys.get(processor);
        for (a, u) in acks.iter().zip(updates.iter_mut()) {
            if let Some(c) = &a.certificate {
                let kind = certificate_kind(kinds.get(a.request_id.as_str()).copied());
                let checked = check(key, identity, kind, a, c);
                if !checked.verified {
                    // The rejection is the registry's words; what it quotes of the body is a
                    // value of one of the claims checked (kind, processor, request_id,
                    // subprocessor, task_state, version): identifiers, as the acknowledgement's
                    // own logged here, never a text about the subject.
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
    if c.body.len() <= MAX_BODY {
        if let Some(id) = claimed_id(&c.body) {
            out.extend(text_violation(
                &field("body.certificate_id"),
                &id,
                128,
                true,
            ));
        }
    }
    out
}

fn stored(row: CertificateRow) -> StoredCertificate {
    StoredCertificate {
        processor: row.processor,
        subprocessor: row.subprocessor,
        certificate: Some(DeletionCertificate {
            body: row.body,
            signature: row.signature,
            key_id: row.key_id,
        }),
        verified: row.verified != 0,
        rejection: row.rejection,
        certificate_id: row.certificate_id,
    }
}

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
        Ok(Response::new(CertificateList {
            certificates: certificates.into_iter().map(stored).collect(),
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
            "version": 1, "certificate_id": "c-1", "kind": "erasure", "processor": ID,
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
        let public = key.public_key();
        let good = check(Some(&public), ID, "erasure", &ack(), &signed(&key, body()));
        assert!(good.verified, "{}", good.rejection);
        assert_eq!(good.certificate_id, "c-1");

        let other = SigningKey::generate().public_key();
        let r = check(Some(&other), ID, "erasure", &ack(), &signed(&key, body()));
        assert!(!r.verified && r.rejection.contains("not with the expected key"));
        assert_eq!(r.certificate_id, "c-1");

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
        let public = key.public_key();
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
}
