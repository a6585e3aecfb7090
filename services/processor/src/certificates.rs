//! Deletion certificates: what an ERASURE or CONTRACT_END task removed at its subprocessor
//! and what the request's tasks keep under a legal obligation, signed with the processor's
//! Ed25519 key.
//!
//! The store issues one in the transaction that moves such a task to COMPLETED or
//! RETAINED (a RETAINED task that later erases the rest gets a follow-up naming the earlier
//! certificate), keeps it, and sends it with that acknowledgement. The body's keys are
//! documented in `proto/dsrelay/v1/certificate.proto`; it is signed as canonical JSON
//! ([`dsrelay_runtime::signing`]), so anyone holding the public key checks it offline.
//!
//! An erasure's body is version 1 ([`VERSION`]). A contract end's is version 2
//! ([`CONTRACT_END_VERSION`]): version 1's keys and the contract end's terms and what it
//! returned ([`ContractEndFacts`]), as the processor's store recorded them, so that the
//! signed statement keeps them when forgetting empties the evidence notes.

use anyhow::Result;
use chrono::{SecondsFormat, TimeZone, Utc};
use dsrelay_connectors::ErasedCount;
use dsrelay_proto::v1::{ContractEndChoice, DeletionCertificate, TaskState};
use dsrelay_runtime::signing::{to_canonical_json, Signed, SigningKey};
use serde::{Deserialize, Serialize};

/// The body version this code writes for an erasure (and wrote for every certificate
/// before [`CONTRACT_END_VERSION`]).
pub const VERSION: u32 = 1;

/// The body version of a contract end's certificate: [`VERSION`]'s keys and `contract_end`.
pub const CONTRACT_END_VERSION: u32 = 2;

/// The signed content of a deletion certificate (keys in canonical order when signed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateBody {
    /// Body version: [`VERSION`] for an erasure, [`CONTRACT_END_VERSION`] for a contract end
    /// (1 for one signed before version 2 existed).
    pub version: u32,
    /// Unique id of this certificate.
    pub certificate_id: String,
    /// What kind of work it certifies: `erasure`, or `contract_end` (all of the controller's
    /// data at the subprocessor).
    pub kind: String,
    /// The processor's identity (the URI SAN of its TLS certificate).
    pub processor: String,
    /// The controller, as the processor names it.
    pub controller: String,
    /// The registry's request id.
    pub request_id: String,
    /// The subprocessor the task ran at.
    pub subprocessor: String,
    /// `COMPLETED` or `RETAINED`: the task state this certificate goes with.
    pub task_state: String,
    /// Records the task erased or anonymized so far.
    pub records_affected: i64,
    /// What this step erased where, as the connector counted it: after an earlier call of
    /// the step whose progress came with counts by place, those and the finishing call's,
    /// summed per target and action.
    pub erased: Vec<ErasedCount>,
    /// The request's tasks at this processor keeping data under an obligation.
    pub retained: Vec<Retained>,
    /// Present when the counts may leave out part of what an earlier call of the step (cut
    /// off, or failed) erased: what it erased after its last recorded progress, or all of
    /// it when it recorded none, or, when its progress came without counts by place, its
    /// recorded work by table ([`Uncounted::earlier_records`]). Absent from the bodies of
    /// every other certificate, which are as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncounted: Option<Uncounted>,
    /// The certificate this one follows up, when the task had one before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<String>,
    /// A contract end's terms and what it returned (version 2); absent from an erasure's
    /// body, and from a contract end's of version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract_end: Option<ContractEndFacts>,
    /// When the task reached `task_state` (RFC 3339, UTC).
    pub completed_at: String,
    /// When the certificate was signed (RFC 3339, UTC).
    pub issued_at: String,
}

/// What a certificate's counts may leave out ([`CertificateBody::uncounted`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uncounted {
    /// Why, in words.
    pub reason: String,
    /// Records the holder's totals lost between the earlier call's count and this one's
    /// beyond what the counts include: erased by that call after its last recorded
    /// progress, or added or removed by others meanwhile, so an estimate. 0 when no total
    /// of the earlier call was recorded: then how many is not known.
    pub records: u64,
    /// The same in data subjects.
    pub subjects: u64,
    /// Records an earlier call of the step (cut off, or failed) erased or anonymized as far
    /// as its progress was recorded, when that progress came without counts by place (a
    /// connector or adapter that reports none): the connector counts them in
    /// `records_affected` when it counts on from that progress, while `erased` holds its
    /// answer to the call that finished, which need not list them by table. 0 (and absent)
    /// when none was recorded, or when `erased` lists them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub earlier_records: u64,
    /// The data subjects of those records.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub earlier_subjects: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A contract end as its certificate states it ([`CertificateBody::contract_end`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContractEndFacts {
    /// The controller's choice: `NONE` (none was made: the data went at the grace end),
    /// `DELETE` or `RETURN_THEN_DELETE`.
    pub choice: String,
    /// When the contract ended (RFC 3339, UTC).
    pub effective_at: String,
    /// When the grace period ends (RFC 3339, UTC): the latest the data may stay unconfirmed.
    pub grace_ends_at: String,
    /// What was returned before the erasure; only for `RETURN_THEN_DELETE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub returned: Option<Returned>,
}

/// A RETURN_THEN_DELETE contract end's return at one subprocessor ([`ContractEndFacts`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Returned {
    /// Where the data went: `registry` (the task's part of the controller's package) or
    /// `recipient` (the transfer recipient the terms name).
    pub to: String,
    /// The transfer recipient's name, when `to` is `recipient`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recipient: String,
    /// The part the processor delivered; absent when it delivered none (the controller
    /// confirmed the return before the export began).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<ReturnedPart>,
    /// What released the erasure, as the processor recorded it.
    pub confirmation: Confirmation,
}

/// The part of a return the processor delivered ([`Returned::part`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnedPart {
    /// SHA-256 (lowercase hex) of the part's canonical manifest
    /// ([`dsrelay_runtime::transfer_manifest`]: request, subprocessor, and each file's name,
    /// media type, categories, size and SHA-256), what a transfer recipient's receipt
    /// states; not the digest of the registry package's `manifest.json`.
    pub manifest_sha256: String,
    /// How many files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// When the delivery was recorded (RFC 3339, UTC); absent when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
}

/// The controller's confirmation of a return, or its absence ([`Returned::confirmation`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// `CONFIRMED`: the controller's confirmation was recorded; `GRACE_PERIOD_ENDED`: none
    /// was by the time of the certificate, and the grace period had ended, which released
    /// the erasure.
    pub state: String,
    /// CONFIRMED: when the confirmation was recorded (absent when the processor recorded
    /// no time: confirmed before it did); GRACE_PERIOD_ENDED: the grace period's end. RFC
    /// 3339, UTC. A confirmation recorded after the grace period ended came before the
    /// erasure began: once it has, the processor refuses one (`task_machine::amend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

/// What the processor's store recorded about a contract end and one task's return, as
/// [`contract_end_facts`] turns it into a certificate's statement (times in ms).
#[derive(Debug, Clone)]
pub(crate) struct RecordedEnd {
    pub(crate) choice: ContractEndChoice,
    pub(crate) effective_at: i64,
    pub(crate) grace_ends_at: i64,
    pub(crate) return_confirmed: bool,
    /// When the confirmation was recorded; `None` before that was recorded.
    pub(crate) return_confirmed_at: Option<i64>,
    /// The transfer recipient's name; empty for the registry.
    pub(crate) transfer_recipient: String,
    /// The task's delivered part.
    pub(crate) delivered: Option<DeliveredPart>,
}

/// A task's export as the store recorded it delivered.
#[derive(Debug, Clone)]
pub(crate) struct DeliveredPart {
    /// The part's canonical manifest digest.
    pub(crate) manifest_sha256: String,
    pub(crate) files: u64,
    pub(crate) bytes: u64,
    /// When its upload was retired by the delivery.
    pub(crate) delivered_at: Option<i64>,
}

/// The certificate's statement of a contract end recorded as `r`.
pub(crate) fn contract_end_facts(r: &RecordedEnd) -> ContractEndFacts {
    let returned = (r.choice == ContractEndChoice::ReturnThenDelete).then(|| Returned {
        to: if r.transfer_recipient.is_empty() {
            "registry".into()
        } else {
            "recipient".into()
        },
        recipient: r.transfer_recipient.clone(),
        part: r.delivered.as_ref().map(|d| ReturnedPart {
            manifest_sha256: d.manifest_sha256.clone(),
            files: d.files,
            bytes: d.bytes,
            delivered_at: d.delivered_at.map(rfc3339),
        }),
        confirmation: if r.return_confirmed {
            Confirmation {
                state: "CONFIRMED".into(),
                at: r.return_confirmed_at.map(rfc3339),
            }
        } else {
            Confirmation {
                state: "GRACE_PERIOD_ENDED".into(),
                at: Some(rfc3339(r.grace_ends_at)),
            }
        },
    });
    ContractEndFacts {
        choice: r
            .choice
            .as_str_name()
            .trim_start_matches("CONTRACT_END_CHOICE_")
            .into(),
        effective_at: rfc3339(r.effective_at),
        grace_ends_at: rfc3339(r.grace_ends_at),
        returned,
    }
}

/// What a step erased, as a certificate lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Erased {
    /// Where and how many, as the connector counted it.
    pub counts: Vec<ErasedCount>,
    /// What the counts may leave out.
    pub uncounted: Option<Uncounted>,
}

impl From<Vec<ErasedCount>> for Erased {
    fn from(counts: Vec<ErasedCount>) -> Self {
        Self {
            counts,
            uncounted: None,
        }
    }
}

/// Data one task keeps under a legal obligation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retained {
    /// The subprocessor keeping it.
    pub subprocessor: String,
    /// The law or contract that requires it.
    pub legal_basis: String,
    /// The task's `retain_until` (RFC 3339, UTC): when the processor runs its erasure again
    /// by itself, the holder's next release (what is still kept then gets a later date), or
    /// for a run the holder accepted and has not confirmed, that run's date.
    pub until: String,
}

/// Signs certificates in this processor's name.
#[derive(Debug)]
pub struct Issuer {
    key: SigningKey,
    processor: String,
}

/// What the store knows about the task when it issues a certificate.
#[derive(Debug)]
pub(crate) struct Facts<'a> {
    pub(crate) kind: &'static str,
    pub(crate) controller: &'a str,
    pub(crate) request_id: &'a str,
    pub(crate) subprocessor: &'a str,
    pub(crate) state: TaskState,
    pub(crate) records_affected: i64,
    pub(crate) erased: &'a Erased,
    pub(crate) retained: Vec<Retained>,
    pub(crate) follows: Option<String>,
    /// A contract end's statement, signed in a version 2 body; `None` for an erasure.
    pub(crate) contract_end: Option<ContractEndFacts>,
    pub(crate) now: i64,
}

impl Issuer {
    /// Signs with `key` in the name of `processor` (its certificate identity).
    pub fn new(key: SigningKey, processor: String) -> Self {
        Self { key, processor }
    }

    /// The key id certificates name.
    pub fn key_id(&self) -> String {
        self.key.public_key().key_id()
    }

    /// A signed certificate of `facts`, and its id.
    pub(crate) fn issue(&self, facts: Facts<'_>) -> Result<(String, Signed)> {
        let id = uuid::Uuid::now_v7().to_string();
        let at = rfc3339(facts.now);
        let version = match facts.contract_end {
            Some(_) => CONTRACT_END_VERSION,
            None => VERSION,
        };
        let body = CertificateBody {
            version,
            certificate_id: id.clone(),
            kind: facts.kind.into(),
            processor: self.processor.clone(),
            controller: facts.controller.into(),
            request_id: facts.request_id.into(),
            subprocessor: facts.subprocessor.into(),
            task_state: facts
                .state
                .as_str_name()
                .trim_start_matches("TASK_STATE_")
                .into(),
            records_affected: facts.records_affected,
            erased: facts.erased.counts.clone(),
            retained: facts.retained,
            uncounted: facts.erased.uncounted.clone(),
            follows: facts.follows,
            contract_end: facts.contract_end,
            completed_at: at.clone(),
            issued_at: at,
        };
        Ok((id, self.key.sign(to_canonical_json(&body)?)))
    }
}

/// The certificate kind a task moving to `state` in a request of `kind` gets, if any.
pub(crate) fn certifies(kind: i64, state: TaskState) -> Option<&'static str> {
    use dsrelay_proto::v1::RequestKind;
    if !matches!(state, TaskState::Completed | TaskState::Retained) {
        return None;
    }
    match i32::try_from(kind)
        .ok()
        .and_then(|k| RequestKind::try_from(k).ok())
    {
        Some(RequestKind::Erasure) => Some("erasure"),
        Some(RequestKind::ContractEnd) => Some("contract_end"),
        _ => None,
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The wire form of a signed certificate.
pub fn to_proto(doc: &Signed) -> DeletionCertificate {
    DeletionCertificate {
        body: doc.body.clone(),
        signature: doc.signature.clone(),
        key_id: doc.key_id.clone(),
    }
}

/// A signed certificate from its wire form.
pub fn from_proto(c: &DeletionCertificate) -> Signed {
    Signed {
        body: c.body.clone(),
        signature: c.signature.clone(),
        key_id: c.key_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_canonical_signed_and_readable() {
        let key = SigningKey::generate();
        let public = key.public_key();
        let issuer = Issuer::new(key, "spiffe://dsrelay.dev/processor/p".into());
        let erased = Erased::from(vec![ErasedCount {
            target: "customers".into(),
            action: "deleted".into(),
            count: 1,
        }]);
        let (id, doc) = issuer
            .issue(Facts {
                kind: "erasure",
                controller: "acme",
                request_id: "r-1",
                subprocessor: "accounting",
                state: TaskState::Retained,
                records_affected: 3,
                erased: &erased,
                retained: vec![Retained {
                    subprocessor: "accounting".into(),
                    legal_basis: "Kirjanpitolaki 2:10 §".into(),
                    until: rfc3339(1_900_000_000_000),
                }],
                follows: None,
                contract_end: None,
                now: 1_800_000_000_123,
            })
            .unwrap();
        let value = public.verify(&doc).unwrap();
        let body: CertificateBody = serde_json::from_value(value).unwrap();
        assert_eq!(body.certificate_id, id);
        assert_eq!(body.task_state, "RETAINED");
        assert_eq!(body.completed_at, "2027-01-15T08:00:00.123Z");
        assert_eq!(body.erased, erased.counts);
        assert_eq!(body.follows, None);
        assert_eq!(body.uncounted, None);
        let text = String::from_utf8(doc.body.clone()).unwrap();
        assert!(
            text.starts_with("{\"certificate_id\":")
                && text.contains("\"kind\":\"erasure\"")
                && !text.contains("follows")
                && !text.contains("uncounted"),
            "{text}"
        );
        // A certificate changed in any single byte, of its body or its signature, fails.
        for i in 0..doc.body.len() {
            let mut bad = doc.clone();
            bad.body[i] = bad.body[i].wrapping_add(1);
            assert!(public.verify(&bad).is_err(), "body byte {i}");
        }
        for i in 0..doc.signature.len() {
            let mut bad = doc.clone();
            bad.signature[i] = bad.signature[i].wrapping_add(1);
            assert!(public.verify(&bad).is_err(), "signature byte {i}");
        }
        // A body of before `uncounted` reads as one without it.
        let mut old: serde_json::Value = serde_json::from_slice(&doc.body).unwrap();
        old.as_object_mut().unwrap().remove("uncounted");
        assert_eq!(
            serde_json::from_value::<CertificateBody>(old).unwrap(),
            body
        );
        assert_eq!(certifies(1, TaskState::Completed), Some("erasure"));
        assert_eq!(certifies(1, TaskState::Retained), Some("erasure"));
        assert_eq!(certifies(7, TaskState::Completed), Some("contract_end"));
        assert_eq!(certifies(7, TaskState::Retained), Some("contract_end"));
        assert_eq!(certifies(7, TaskState::Failed), None);
        assert_eq!(certifies(1, TaskState::NotFound), None);
        assert_eq!(certifies(2, TaskState::Completed), None);
    }

    #[test]
    fn counts_that_may_leave_records_out_say_so_in_the_signed_body() {
        let key = SigningKey::generate();
        let public = key.public_key();
        let issuer = Issuer::new(key, "spiffe://dsrelay.dev/processor/p".into());
        let uncounted = Uncounted {
            reason: "an earlier call was cut off".into(),
            records: 40_000,
            subjects: 10_000,
            earlier_records: 0,
            earlier_subjects: 0,
        };
        // The body `erased` is signed into, as the verified document reads.
        let signed = |erased: &Erased| {
            let (_, doc) = issuer
                .issue(Facts {
                    kind: "contract_end",
                    controller: "acme",
                    request_id: "ce-1",
                    subprocessor: "accounting",
                    state: TaskState::Completed,
                    records_affected: 760_020,
                    erased,
                    retained: Vec::new(),
                    follows: None,
                    contract_end: None,
                    now: 1_800_000_000_123,
                })
                .unwrap();
            let body: CertificateBody =
                serde_json::from_value(public.verify(&doc).unwrap()).unwrap();
            (body, String::from_utf8(doc.body).unwrap())
        };
        let erased = Erased {
            counts: Vec::new(),
            uncounted: Some(uncounted.clone()),
        };
        let (body, text) = signed(&erased);
        assert_eq!(body.uncounted.as_ref(), Some(&uncounted));
        assert!(
            text.contains(
                "\"uncounted\":{\"reason\":\"an earlier call was cut off\",\
                 \"records\":40000,\"subjects\":10000}"
            ),
            "{text}"
        );
        // An earlier call's recorded work is signed with it when there was some.
        let erased = Erased {
            counts: Vec::new(),
            uncounted: Some(Uncounted {
                earlier_records: 40_000,
                earlier_subjects: 10_000,
                ..uncounted
            }),
        };
        let (body, text) = signed(&erased);
        assert_eq!(body.uncounted, erased.uncounted);
        assert!(
            text.contains("\"earlier_records\":40000,\"earlier_subjects\":10000,\"reason\":"),
            "{text}"
        );
    }

    /// A contract end's body is version 2 with its terms, and for a return the part's
    /// digest, size, destination and confirmation; an erasure's stays version 1 without
    /// them. Before, every body was version 1 and said nothing of what was returned.
    #[test]
    fn a_contract_end_body_states_its_terms_and_what_it_returned() {
        let key = SigningKey::generate();
        let public = key.public_key();
        let issuer = Issuer::new(key, "spiffe://dsrelay.dev/processor/p".into());
        let signed = |kind: &'static str, end: Option<ContractEndFacts>| {
            let (_, doc) = issuer
                .issue(Facts {
                    kind,
                    controller: "acme",
                    request_id: "ce-1",
                    subprocessor: "accounting",
                    state: TaskState::Completed,
                    records_affected: 7,
                    erased: &Erased::default(),
                    retained: Vec::new(),
                    follows: None,
                    contract_end: end,
                    now: 1_800_000_000_123,
                })
                .unwrap();
            let body: CertificateBody =
                serde_json::from_value(public.verify(&doc).unwrap()).unwrap();
            (body, String::from_utf8(doc.body).unwrap())
        };
        let recorded = RecordedEnd {
            choice: ContractEndChoice::ReturnThenDelete,
            effective_at: 1_700_000_000_000,
            grace_ends_at: 1_702_592_000_000,
            return_confirmed: true,
            return_confirmed_at: Some(1_701_000_000_000),
            transfer_recipient: String::new(),
            delivered: Some(DeliveredPart {
                manifest_sha256: "ab".repeat(32),
                files: 2,
                bytes: 1_234,
                delivered_at: Some(1_700_500_000_000),
            }),
        };
        let (body, text) = signed("contract_end", Some(contract_end_facts(&recorded)));
        assert_eq!(body.version, 2);
        let end = body.contract_end.as_ref().expect("contract_end");
        assert_eq!(end.choice, "RETURN_THEN_DELETE");
        assert!(
            text.contains(&format!(
                "\"contract_end\":{{\"choice\":\"RETURN_THEN_DELETE\",\
                 \"effective_at\":\"2023-11-14T22:13:20.000Z\",\
                 \"grace_ends_at\":\"2023-12-14T22:13:20.000Z\",\
                 \"returned\":{{\"confirmation\":{{\"at\":\"2023-11-26T12:00:00.000Z\",\
                 \"state\":\"CONFIRMED\"}},\"part\":{{\"bytes\":1234,\
                 \"delivered_at\":\"2023-11-20T17:06:40.000Z\",\"files\":2,\
                 \"manifest_sha256\":\"{}\"}},\"to\":\"registry\"}}}}",
                "ab".repeat(32)
            )),
            "{text}"
        );
        assert!(text.contains("\"version\":2}"), "{text}");

        // Returned to a transfer recipient and never confirmed: the grace end released it.
        let unconfirmed = RecordedEnd {
            return_confirmed: false,
            return_confirmed_at: None,
            transfer_recipient: "archive-oy".into(),
            ..recorded.clone()
        };
        let (body, text) = signed("contract_end", Some(contract_end_facts(&unconfirmed)));
        let returned = body.contract_end.unwrap().returned.expect("returned");
        assert_eq!(
            (returned.to.as_str(), returned.recipient.as_str()),
            ("recipient", "archive-oy")
        );
        assert_eq!(
            returned.confirmation,
            Confirmation {
                state: "GRACE_PERIOD_ENDED".into(),
                at: Some("2023-12-14T22:13:20.000Z".into()),
            }
        );
        assert!(text.contains("\"recipient\":\"archive-oy\""), "{text}");

        // Confirmed before any export: nothing delivered, and no time recorded before 0025.
        let nothing = RecordedEnd {
            return_confirmed_at: None,
            delivered: None,
            ..recorded.clone()
        };
        let (body, text) = signed("contract_end", Some(contract_end_facts(&nothing)));
        let returned = body.contract_end.unwrap().returned.expect("returned");
        assert_eq!(returned.part, None);
        assert!(
            text.contains("\"returned\":{\"confirmation\":{\"state\":\"CONFIRMED\"},\"to\":"),
            "{text}"
        );

        // DELETE returns nothing.
        let delete = RecordedEnd {
            choice: ContractEndChoice::Delete,
            ..recorded
        };
        let (body, text) = signed("contract_end", Some(contract_end_facts(&delete)));
        assert_eq!(body.contract_end.unwrap().returned, None);
        assert!(
            text.contains("\"contract_end\":{\"choice\":\"DELETE\",\"effective_at\":")
                && !text.contains("returned"),
            "{text}"
        );

        // An erasure's body is as before: version 1, no contract_end.
        let (body, text) = signed("erasure", None);
        assert_eq!((body.version, body.contract_end), (1, None));
        assert!(
            text.ends_with("\"task_state\":\"COMPLETED\",\"version\":1}")
                && !text.contains("contract_end"),
            "{text}"
        );
    }
}
