//! Checks a Submit against the documented limits before anything is stored.

use std::collections::BTreeSet;

use dsrelay_proto::v1::{
    ListRequestsRequest, RequestKind, RequestParameters, RequestState, SubjectIdentity,
    SubmitRequest,
};
use dsrelay_runtime::identity::{
    correction_violation, identity_in_note, instant_violation, submit_identity_violations,
    validate_identities, FieldViolation, MAX_REQUEST_ID,
};
use sha2::{Digest, Sha256};

/// At most this many bytes in an idempotency key.
pub(crate) const MAX_IDEMPOTENCY_KEY: usize = 128;
/// At most this many bytes in a note or reason.
pub(crate) const MAX_TEXT: usize = 1024;
/// At most this many bytes in a transfer recipient's name.
pub(crate) const MAX_RECIPIENT: usize = crate::config::MAX_RECIPIENT_NAME;
/// At most this many data categories in a scope.
pub(crate) const MAX_CATEGORIES: usize = 32;
/// At most this many corrections in a rectification.
pub(crate) const MAX_CORRECTIONS: usize = 32;

/// At most this many bytes in a data category name.
pub(crate) const MAX_CATEGORY: usize = 64;

/// Checks a free-text field from outside the registry (a partner's note or reason, a
/// correction, an operator's reason, a processor's reason or note): the common rules of every
/// service ([`dsrelay_runtime::identity::text_violation`]: length, no control characters but
/// tab and line breaks, no Unicode format character but the joiners, named with its code
/// point). These texts are shown to operators and partners (`dsrctl get`, events, the audit
/// trail).
pub(crate) use dsrelay_runtime::identity::text_violation;

#[cfg(test)]
use dsrelay_runtime::identity::refused_in_text as format_character;

/// Every rule `req` breaks; empty when it may be stored. `known_categories` are those some
/// processor holds: a category nobody holds is almost certainly a typo. `known_recipients`
/// are the configured transfer recipients, the only ones a TRANSFER may name.
pub(crate) fn validate_submit(
    req: &SubmitRequest,
    known_categories: &BTreeSet<&str>,
    known_recipients: &BTreeSet<&str>,
) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    let kind = match RequestKind::try_from(req.kind).unwrap_or(RequestKind::Unspecified) {
        // Not a subject's request: operators end contracts with ContractService.EndContract.
        RequestKind::ContractEnd => {
            out.push(FieldViolation::new(
                "kind",
                "CONTRACT_END is not submitted as a request: an operator ends a contract with \
                 ContractService.EndContract",
            ));
            RequestKind::Unspecified
        }
        RequestKind::Unspecified => {
            out.push(FieldViolation::new(
                "kind",
                format!(
                    "must be one of ERASURE, RETURN_OF_DATA, TRANSFER, RECTIFICATION, \
                     RESTRICTION, OBJECTION (got {})",
                    req.kind
                ),
            ));
            RequestKind::Unspecified
        }
        kind => kind,
    };
    out.extend(validate_identities(&req.identities));
    out.extend(submit_identity_violations(&req.identities));
    out.extend(idempotency_key_violation(&req.idempotency_key));
    match text_violation("note", &req.note, MAX_TEXT, false) {
        Some(v) => out.push(v),
        // An empty note (most Submits) holds no identity: the identities are not checked again.
        None if req.note.is_empty() => {}
        // Named by kind only: echoing the identity would put it in logs and in the status.
        None => {
            let kind = identity_in_note(&valid_identities(req), &req.note);
            out.extend(kind.map(|kind| {
                FieldViolation::new(
                    "note",
                    format!(
                        "contains the subject's {kind}, one of the request's identities: the \
                         note is shown with the request and kept apart from its identities, so \
                         leave the subject's identities out (the request already carries them)"
                    ),
                )
            }))
        }
    }
    if let Some(scope) = &req.scope {
        if scope.data_categories.len() > MAX_CATEGORIES {
            out.push(FieldViolation::new(
                "scope.data_categories",
                format!("at most {MAX_CATEGORIES} categories are allowed"),
            ));
        } else {
            let mut listed_known = false;
            for (i, c) in scope.data_categories.iter().enumerate() {
                let field = format!("scope.data_categories[{i}]");
                if c.is_empty() || c.len() > MAX_CATEGORY {
                    out.push(FieldViolation::new(
                        field,
                        format!("must be 1 to at most {MAX_CATEGORY} bytes"),
                    ));
                } else if let Some(first) = scope.data_categories[..i]
                    .iter()
                    .position(|earlier| earlier == c)
                {
                    // Refused rather than collapsed: the body is stored and hashed for
                    // idempotency as sent, and a repeat is a partner's mistake to hear of.
                    out.push(FieldViolation::new(
                        field,
                        format!("{c:?} is listed twice (scope.data_categories[{first}] names it)"),
                    ));
                } else if !known_categories.contains(c.as_str()) {
                    // The text is echoed (it is short) so the caller sees the typo; the known
                    // categories are named once, keeping the status small.
                    let mut rule = format!("{c:?} is held by no configured processor");
                    if !listed_known {
                        listed_known = true;
                        rule.push_str(&format!(
                            " (known categories: {})",
                            known_categories
                                .iter()
                                .copied()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    out.push(FieldViolation::new(field, rule));
                }
            }
        }
    }
    let params = req.parameters.clone().unwrap_or_default();
    out.extend(parameter_violations(kind, &params, known_recipients));
    out
}

/// Checks an idempotency key (of a Submit or an EndContract): 1 to [`MAX_IDEMPOTENCY_KEY`]
/// bytes of letters, digits and `. _ : -`, since keys are stored, logged and compared.
pub(crate) fn idempotency_key_violation(key: &str) -> Option<FieldViolation> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Some(FieldViolation::new(
            "idempotency_key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"),
        ));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
    (!key.bytes().all(allowed)).then(|| {
        FieldViolation::new(
            "idempotency_key",
            "may contain only letters, digits and . _ : -",
        )
    })
}

/// What is wrong with the kind-specific parameters of a request of `kind`: those of the kind
/// must be there and well formed, those of another kind must be absent (a partner who sends
/// corrections with an erasure has mistaken something, and guessing which half is meant
/// would act on the wrong one).
fn parameter_violations(
    kind: RequestKind,
    params: &RequestParameters,
    known_recipients: &BTreeSet<&str>,
) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    // With no valid kind, nothing can be said to belong to it; `kind` is reported already.
    if kind == RequestKind::Unspecified {
        return out;
    }
    let got = kind.as_str_name().trim_start_matches("REQUEST_KIND_");
    if kind == RequestKind::Rectification {
        if params.corrections.is_empty() || params.corrections.len() > MAX_CORRECTIONS {
            out.push(FieldViolation::new(
                "parameters.corrections",
                format!("a rectification needs 1 to {MAX_CORRECTIONS} corrections"),
            ));
        }
        let corrections = &params.corrections[..params.corrections.len().min(MAX_CORRECTIONS)];
        for (i, c) in corrections.iter().enumerate() {
            // As strict as each processor is at Deliver: a correction it would refuse must be
            // refused here, where the partner hears why, not dead-lettered on the way.
            let field = format!("parameters.corrections[{i}].field");
            if let Some(v) = text_violation(&field, &c.field, 64, true) {
                out.push(v);
            } else if let Some(first) = corrections[..i]
                .iter()
                .position(|earlier| same_field(&earlier.field, &c.field))
            {
                // The SQL connector fails such a task (it cannot tell which value is meant),
                // matching fields trimmed and in any ASCII case as it does.
                out.push(FieldViolation::new(
                    field,
                    format!(
                        "the field {:?} is corrected more than once (also by \
                         parameters.corrections[{first}]): correct each field once",
                        c.field.trim()
                    ),
                ));
            }
            let new_value = format!("parameters.corrections[{i}].new_value");
            if c.new_value.trim().is_empty() {
                // An empty value means no one thing across connectors: the SQL one writes the
                // empty text as given (not NULL; a typed column refuses it), the Mailchimp one
                // sends it as the new address (refused there) or as a merge field's value.
                out.push(FieldViolation::new(
                    new_value,
                    format!(
                        "is required (1 to {MAX_TEXT} bytes of text): a correction sets a new \
                         value; clearing a field is not supported (an ERASURE removes data)"
                    ),
                ));
            } else if let Some(v) = text_violation(&new_value, &c.new_value, MAX_TEXT, false) {
                out.push(v);
            } else {
                // Holders write a corrected identity where they find the subject: a value no
                // raw identity may be would leave her unfindable there (the SQL connector
                // writes it), or be refused by one holder after another applied the request.
                out.extend(correction_violation(&new_value, &c.field, &c.new_value));
            }
        }
    } else if !params.corrections.is_empty() {
        out.push(FieldViolation::new(
            "parameters.corrections",
            format!("only a RECTIFICATION carries corrections (this is {got})"),
        ));
    }
    if params.lift_restriction && kind != RequestKind::Restriction {
        out.push(FieldViolation::new(
            "parameters.lift_restriction",
            format!("only a RESTRICTION may lift a restriction (this is {got})"),
        ));
    }
    if params.contract_end.is_some() {
        out.push(FieldViolation::new(
            "parameters.contract_end",
            format!("only a contract end has contract terms (this is {got})"),
        ));
    }
    let recipient = &params.transfer_recipient;
    if kind == RequestKind::Transfer {
        if recipient.is_empty() || recipient.len() > MAX_RECIPIENT {
            out.push(FieldViolation::new(
                "parameters.transfer_recipient",
                format!(
                    "a transfer needs a recipient of 1 to {MAX_RECIPIENT} bytes ({})",
                    recipients_listed(known_recipients)
                ),
            ));
        } else if !known_recipients.contains(recipient.as_str()) {
            out.push(FieldViolation::new(
                "parameters.transfer_recipient",
                format!(
                    "{recipient:?} is not a configured recipient ({})",
                    recipients_listed(known_recipients)
                ),
            ));
        }
    } else if !recipient.is_empty() {
        out.push(FieldViolation::new(
            "parameters.transfer_recipient",
            format!("only a TRANSFER names a recipient (this is {got})"),
        ));
    }
    out
}

/// The request's identities that break no rule, the ones its note is checked against: one
/// refused stands for no subject (a PHONE "12" would be found in "ticket 1234"), and the
/// request is refused for it anyway. Each is checked alone, so also when there are too many.
fn valid_identities(req: &SubmitRequest) -> Vec<SubjectIdentity> {
    req.identities
        .iter()
        .filter(|id| {
            let one = std::slice::from_ref(*id);
            validate_identities(one).is_empty() && submit_identity_violations(one).is_empty()
        })
        .cloned()
        .collect()
}

/// Whether two corrections name the same field, as the SQL connector compares them: trimmed,
/// in any ASCII case.
fn same_field(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// At most this many states in a List filter (there are fewer states than that).
pub(crate) const MAX_LIST_STATES: usize = 16;

/// List's arguments, checked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ListArguments {
    /// Requests on one page: 1 to 500.
    pub page_size: u32,
    /// Where the page starts: before this (received_at, request id), from a previous page's
    /// token.
    pub before: Option<(i64, String)>,
    /// The filters' digest ([`list_filter_digest`]), which the next page's token carries.
    pub filters: String,
    /// Only open requests due before this many milliseconds since the epoch
    /// ([`due_before_ms`]): `due_before`, when it was sent.
    pub due_before: Option<i64>,
}

/// `due_before` in milliseconds, rounded up: a request due at a whole millisecond is before
/// the instant sent exactly when it is before this (one due at 1,001 ms is before 1,001.5 ms,
/// so 1,001.5 ms is 1,002).
pub(crate) fn due_before_ms(t: &dsrelay_proto::prost_types::Timestamp) -> i64 {
    dsrelay_proto::millis_from_timestamp(t).saturating_add(i64::from(t.nanos % 1_000_000 != 0))
}

/// A digest of a List's filters (states as a set, kind, overdue_only, due_before to the
/// millisecond), carried in its page tokens so that a token is refused with filters other
/// than its page's: the position it holds is one in that listing, and in another it would
/// skip or repeat requests unseen. Without due_before the text is what it was before that
/// filter existed, so tokens a registry gave before still continue their listing.
pub(crate) fn list_filter_digest(r: &ListRequestsRequest) -> String {
    let mut states = r.states.clone();
    states.sort_unstable();
    states.dedup();
    let mut text = format!(
        "states={states:?};kind={};overdue_only={}",
        r.kind, r.overdue_only
    );
    if let Some(t) = &r.due_before {
        text.push_str(&format!(";due_before={}", due_before_ms(t)));
    }
    hex::encode(&Sha256::digest(text.as_bytes())[..8])
}

/// What a List page token starts with; a token without it is of a registry before filters
/// were encoded, `received_at_id`, and is still taken (unchecked: it holds no filters).
const PAGE_TOKEN_PREFIX: &str = "v2.";

/// The token of the page that starts before (`received_at`, `id`) in the listing `filters`
/// ([`list_filter_digest`]) names.
pub(crate) fn page_token(filters: &str, received_at: i64, id: &str) -> String {
    format!("{PAGE_TOKEN_PREFIX}{filters}.{received_at}_{id}")
}

/// List's arguments, or every rule they break.
pub(crate) fn list_arguments(
    r: &ListRequestsRequest,
) -> Result<ListArguments, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let page_size = match r.page_size {
        0 => 50,
        n @ 1..=500 => n,
        _ => {
            violations.push(FieldViolation::new(
                "page_size",
                "must be 0 (default 50) to 500",
            ));
            50
        }
    };
    if r.states.len() > MAX_LIST_STATES {
        violations.push(FieldViolation::new(
            format!("states[{MAX_LIST_STATES}]"),
            format!("at most {MAX_LIST_STATES} states may be given"),
        ));
    }
    for (i, s) in r.states.iter().enumerate().take(MAX_LIST_STATES) {
        if RequestState::try_from(*s).unwrap_or(RequestState::Unspecified)
            == RequestState::Unspecified
        {
            violations.push(FieldViolation::new(
                format!("states[{i}]"),
                format!("{s} is not a request state"),
            ));
        }
    }
    if RequestKind::try_from(r.kind).is_err() {
        violations.push(FieldViolation::new(
            "kind",
            format!("{} is not a request kind", r.kind),
        ));
    }
    let due_before = match &r.due_before {
        Some(t) => match instant_violation("due_before", t) {
            Some(v) => {
                violations.push(FieldViolation::new(
                    v.field,
                    format!(
                        "{}: send the instant requests are to fall due before, e.g. now plus \
                         72 hours",
                        v.rule
                    ),
                ));
                None
            }
            None => Some(due_before_ms(t)),
        },
        None => None,
    };
    // A token is [`page_token`]'s, as a previous page made it; its id goes into SQL, so it
    // is held to the rules of an id (PostgreSQL refuses NUL in text).
    let filters = list_filter_digest(r);
    let before = if r.page_token.is_empty() {
        None
    } else {
        let (token_filters, position) = match r.page_token.strip_prefix(PAGE_TOKEN_PREFIX) {
            Some(rest) => match rest.split_once('.') {
                Some((digest, position)) => (Some(digest), position),
                None => (Some(""), ""),
            },
            None => (None, r.page_token.as_str()),
        };
        let parsed = position.split_once('_').and_then(|(at, id)| {
            let id_ok = !id.is_empty()
                && id.len() <= MAX_REQUEST_ID
                && id.bytes().all(|b| b.is_ascii_graphic());
            Some((at.parse::<i64>().ok()?, id.to_string())).filter(|_| id_ok)
        });
        if parsed.is_none() {
            violations.push(FieldViolation::new(
                "page_token",
                "is not a token from a previous page",
            ));
        } else if token_filters.is_some_and(|t| t != filters) {
            violations.push(FieldViolation::new(
                "page_token",
                "belongs to a List with other filters (states, kind, overdue_only or \
                 due_before): send the filters of the page that gave it, or start again \
                 without a token",
            ));
        }
        parsed
    };
    if violations.is_empty() {
        Ok(ListArguments {
            page_size,
            before,
            filters,
            due_before,
        })
    } else {
        Err(violations)
    }
}

/// The configured recipients for an error message, a few at most so the status stays small.
fn recipients_listed(known: &BTreeSet<&str>) -> String {
    const SHOWN: usize = 8;
    if known.is_empty() {
        return "no recipients are configured at the registry".into();
    }
    let mut text = format!(
        "known recipients: {}",
        known
            .iter()
            .take(SHOWN)
            .copied()
            .collect::<Vec<_>>()
            .join(", ")
    );
    if known.len() > SHOWN {
        text.push_str(&format!(" and {} more", known.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsrelay_proto::v1::{
        FieldCorrection, IdentityEncoding, IdentityType, Scope, SubjectIdentity,
    };

    fn good() -> SubmitRequest {
        SubmitRequest {
            kind: RequestKind::Erasure as i32,
            identities: vec![SubjectIdentity {
                r#type: IdentityType::Email as i32,
                encoding: IdentityEncoding::Raw as i32,
                value: "maija@example.fi".into(),
                label: String::new(),
            }],
            idempotency_key: "crm-123".into(),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_plain_erasure() {
        assert!(validate_submit(&good(), &BTreeSet::new(), &BTreeSet::new()).is_empty());
    }

    #[test]
    fn names_each_broken_rule() {
        let mut r = good();
        r.kind = 99;
        r.idempotency_key = "has space".into();
        r.scope = Some(Scope {
            data_categories: vec!["invoicing".into(), "typo".into()],
        });
        let known: BTreeSet<&str> = ["invoicing"].into();
        let v = validate_submit(&r, &known, &BTreeSet::new());
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["kind", "idempotency_key", "scope.data_categories[1]"]
        );
    }

    /// The largest Submit every rule allows: the most and longest of everything.
    pub(crate) fn largest_valid_submit() -> (SubmitRequest, Vec<String>) {
        use dsrelay_runtime::identity::{MAX_IDENTITIES, MAX_IDENTITY_LABEL, MAX_IDENTITY_VALUE};
        // Three bytes a character, so that a byte limit is not met by counting characters.
        let text = |len: usize| "€".repeat(len / 3) + &"x".repeat(len % 3);
        let categories: Vec<String> = (0..MAX_CATEGORIES)
            .map(|i| format!("{i:02}{}", "c".repeat(MAX_CATEGORY - 2)))
            .collect();
        let req = SubmitRequest {
            kind: RequestKind::Rectification as i32,
            identities: (0..MAX_IDENTITIES)
                .map(|_| SubjectIdentity {
                    r#type: IdentityType::Other as i32,
                    encoding: IdentityEncoding::Raw as i32,
                    value: text(MAX_IDENTITY_VALUE),
                    label: text(MAX_IDENTITY_LABEL),
                })
                .collect(),
            idempotency_key: "k".repeat(MAX_IDEMPOTENCY_KEY),
            note: text(MAX_TEXT),
            scope: Some(Scope {
                data_categories: categories.clone(),
            }),
            parameters: Some(RequestParameters {
                corrections: (0..MAX_CORRECTIONS)
                    .map(|i| FieldCorrection {
                        field: format!("{i:02}{}", "f".repeat(62)),
                        new_value: text(MAX_TEXT),
                    })
                    .collect(),
                ..Default::default()
            }),
        };
        (req, categories)
    }

    #[test]
    fn the_largest_valid_submit_fits_the_decode_limit() {
        use dsrelay_proto::prost::Message;
        let (req, categories) = largest_valid_submit();
        let known: BTreeSet<&str> = categories.iter().map(String::as_str).collect();
        assert_eq!(validate_submit(&req, &known, &BTreeSet::new()), []);
        let len = req.encoded_len();
        eprintln!("the largest valid submit: {len} bytes");
        assert!(
            len > 40_000 && len <= crate::app::MAX_API_MESSAGE_BYTES,
            "{len} bytes"
        );
        // The limit is about this message, not one ten times its size.
        assert!(len > crate::app::MAX_API_MESSAGE_BYTES / 2, "{len} bytes");
    }

    #[test]
    fn a_contract_end_is_not_submitted() {
        let mut r = good();
        r.kind = RequestKind::ContractEnd as i32;
        let v = validate_submit(&r, &BTreeSet::new(), &BTreeSet::new());
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].field, "kind");
        assert!(v[0].rule.contains("EndContract"), "{}", v[0].rule);

        let mut r = good();
        r.parameters = Some(dsrelay_proto::v1::RequestParameters {
            contract_end: Some(Default::default()),
            ..Default::default()
        });
        let v = validate_submit(&r, &BTreeSet::new(), &BTreeSet::new());
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["parameters.contract_end"]);
    }

    #[test]
    fn rectification_needs_corrections() {
        let mut r = good();
        r.kind = RequestKind::Rectification as i32;
        let v = validate_submit(&r, &BTreeSet::new(), &BTreeSet::new());
        assert_eq!(v[0].field, "parameters.corrections");
    }

    #[test]
    fn a_correction_names_its_field_in_plain_text() {
        for bad in ["", "   ", "a\u{1}b", &"f".repeat(65)] {
            let r = with(
                RequestKind::Rectification,
                RequestParameters {
                    corrections: vec![FieldCorrection {
                        field: bad.to_string(),
                        new_value: "+358401234567".into(),
                    }],
                    ..Default::default()
                },
            );
            let fields: Vec<String> = violations(&r).into_iter().map(|(f, _)| f).collect();
            assert_eq!(fields, ["parameters.corrections[0].field"], "{bad:?}");
        }
        assert!(violations(&with(RequestKind::Rectification, corrections())).is_empty());
    }

    #[test]
    fn a_field_corrected_twice_is_refused_naming_it() {
        let correction = |field: &str, new_value: &str| FieldCorrection {
            field: field.into(),
            new_value: new_value.into(),
        };
        let r = with(
            RequestKind::Rectification,
            RequestParameters {
                corrections: vec![
                    correction("phone", "+358401234567"),
                    correction("name", "Maija"),
                    correction(" Phone ", "+358401234568"),
                ],
                ..Default::default()
            },
        );
        assert_eq!(
            violations(&r),
            [(
                "parameters.corrections[2].field".to_string(),
                "the field \"Phone\" is corrected more than once (also by \
                 parameters.corrections[0]): correct each field once"
                    .to_string()
            )]
        );
    }

    #[test]
    fn a_correction_sets_a_value_and_never_clears_one() {
        for blank in ["", "  "] {
            let r = with(
                RequestKind::Rectification,
                RequestParameters {
                    corrections: vec![FieldCorrection {
                        field: "phone".into(),
                        new_value: blank.into(),
                    }],
                    ..Default::default()
                },
            );
            let v = violations(&r);
            assert_eq!(v.len(), 1, "{blank:?}: {v:?}");
            assert_eq!(v[0].0, "parameters.corrections[0].new_value");
            assert!(
                v[0].1.contains("clearing a field is not supported"),
                "{v:?}"
            );
        }
    }

    /// A holder writes a corrected identity where it finds the subject: one no raw identity
    /// of its type may be would leave her unfindable there (the SQL connector writes it) or
    /// be refused by another holder (the example adapter refuses a bad e-mail address).
    #[test]
    fn a_correction_of_an_identity_is_held_to_the_rules_of_its_type() {
        let rectify = |field: &str, new_value: &str| {
            with(
                RequestKind::Rectification,
                RequestParameters {
                    corrections: vec![
                        FieldCorrection {
                            field: "name".into(),
                            new_value: "Maija".into(),
                        },
                        FieldCorrection {
                            field: field.into(),
                            new_value: new_value.into(),
                        },
                    ],
                    ..Default::default()
                },
            )
        };
        for (field, value, says) in [
            (
                "email",
                "not-an-email",
                "is not an e-mail address (local@domain.tld): it has no @",
            ),
            (" EMAIL ", "a@b@example.fi", "more than one @"),
            ("Email", "maija@example", "needs a dot"),
            (
                "phone",
                "call me maybe",
                "is not a phone number (5 to 15 digits",
            ),
            ("phone", "1234", "is not a phone number"),
            ("customer_number", "---", "at least one letter or digit"),
            ("national_id", "..", "at least one letter or digit"),
            (
                "email",
                &format!("{}@example.fi", "m".repeat(320)),
                "at most 320 bytes",
            ),
            // Trimmed, the value must still be one: inner white space is not trimmed.
            ("email", " maija @example.fi ", "white space"),
        ] {
            let v = violations(&rectify(field, value));
            assert_eq!(v.len(), 1, "{field:?} {value:?}: {v:?}");
            assert_eq!(v[0].0, "parameters.corrections[1].new_value");
            assert!(v[0].1.contains(says), "{field:?} {value:?}: {v:?}");
            assert!(v[0].1.contains("a valid raw"), "{v:?}");
            assert!(!v[0].1.contains(value.trim()), "the value is echoed: {v:?}");
        }
        for (field, value) in [
            ("email", "maija.virtanen@example.fi"),
            // Holders trim a corrected identity, and so does the check.
            (" Email ", "  maija.virtanen@example.fi "),
            ("phone", "+358 40-123 4567"),
            ("customer_number", "C-1001"),
            ("national_id", "131052-308T"),
            // Not an identity: any text. OTHER's values mean what their label says.
            ("address", "not-an-email"),
            ("e-mail", "call me maybe"),
            ("other", "-"),
        ] {
            let v = violations(&rectify(field, value));
            assert!(v.is_empty(), "{field:?} {value:?}: {v:?}");
        }
    }

    #[test]
    fn a_note_naming_the_subject_is_refused_without_echoing_it() {
        let mut r = good();
        r.identities[0].value = "maija.meikalainen@example.fi".into();
        r.note = "ticket for Maija.Meikalainen@example.fi".into();
        let v = violations(&r);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].0, "note");
        assert!(v[0].1.contains("e-mail address"), "{v:?}");
        assert!(!v[0].1.to_lowercase().contains("meikalainen"), "{v:?}");
        r.note = "ticket CRM-4411".into();
        assert_eq!(violations(&r), []);
    }

    /// A partner's note and correction, the texts an operator reads with the request, refuse
    /// a bidirectional control or a zero width character, naming the field and the code
    /// point; the same texts without one pass.
    #[test]
    fn a_format_character_in_a_note_or_a_correction_is_refused_with_its_code_point() {
        let mut r = good();
        r.note = "ticket \u{202E}1144-MRC".into();
        assert_eq!(
            violations(&r),
            [(
                "note".to_string(),
                "must not contain Unicode format characters such as bidirectional controls and \
                 zero width characters (found U+202E): they change or hide what a reader sees; \
                 remove it"
                    .to_string()
            )]
        );
        r.note = "ticket CRM-4411 ✔️ käsitelty".into();
        assert_eq!(violations(&r), []);
        for (field, value, code) in [
            ("name", "Virtanen\u{2067}", "U+2067"),
            ("na\u{200B}me", "Virtanen", "U+200B"),
        ] {
            let r = with(
                RequestKind::Rectification,
                RequestParameters {
                    corrections: vec![FieldCorrection {
                        field: field.into(),
                        new_value: value.into(),
                    }],
                    ..Default::default()
                },
            );
            let v = violations(&r);
            assert_eq!(v.len(), 1, "{v:?}");
            let named = if value.contains(code_char(code)) {
                "parameters.corrections[0].new_value"
            } else {
                "parameters.corrections[0].field"
            };
            assert_eq!(v[0].0, named);
            assert!(v[0].1.contains(code), "{v:?}");
        }
    }

    fn code_char(code: &str) -> char {
        char::from_u32(u32::from_str_radix(&code[2..], 16).unwrap()).unwrap()
    }

    /// The format characters refused in free text are refused in an identity too: the two
    /// lists (this crate's and the identity rules') do not drift apart, and none of them is
    /// a printable character either.
    #[test]
    fn every_format_character_refused_in_text_is_refused_in_an_identity() {
        let refused: Vec<char> = ('\0'..=char::MAX)
            .filter(|&c| format_character(c))
            .collect();
        assert!(refused.len() > 150, "{}", refused.len());
        for c in refused {
            let id = raw(IdentityType::CustomerNumber, &format!("C{c}1"));
            let v = validate_identities(std::slice::from_ref(&id));
            assert!(
                v.iter()
                    .any(|v| v.rule.contains(&format!("U+{:04X}", u32::from(c)))),
                "U+{:04X}: {v:?}",
                u32::from(c)
            );
            assert!(
                text_violation("t", &format!("a{c}b"), 64, true).is_some(),
                "U+{:04X}",
                u32::from(c)
            );
        }
        // Characters that show, and the variation selector an emoji carries, are not refused.
        for c in [
            'a', 'ä', '€', '\u{FE0F}', '\u{FFFD}', '\u{2026}', '\u{3164}',
        ] {
            assert!(!format_character(c), "U+{:04X}", u32::from(c));
        }
    }

    fn raw(ty: IdentityType, value: &str) -> SubjectIdentity {
        SubjectIdentity {
            r#type: ty as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: value.into(),
            label: String::new(),
        }
    }

    /// An identity refused is no subject's value: a note holding its characters is no leak,
    /// and the refusal names the identity only.
    #[test]
    fn a_note_is_not_checked_against_a_refused_identity() {
        for (id, note) in [
            (raw(IdentityType::Phone, "12"), "ticket 1234"),
            (raw(IdentityType::CustomerNumber, "!!!"), "urgent!!!"),
            (
                raw(IdentityType::Email, "maija@localhost"),
                "from maija@localhost",
            ),
        ] {
            let mut r = good();
            r.identities.push(id);
            r.note = note.into();
            let fields: Vec<String> = violations(&r).into_iter().map(|(f, _)| f).collect();
            assert_eq!(fields, ["identities[1].value"], "{note:?}");
        }
    }

    /// At Submit a phone number is found only written whole, not inside a longer number.
    #[test]
    fn a_note_names_a_phone_number_only_written_whole() {
        let mut r = good();
        r.identities
            .push(raw(IdentityType::Phone, "+358 40 123 4567"));
        for note in [
            "order 93584012345670",
            "order 3584012345670",
            "invoice 0358401234567",
            "ticket 1234",
        ] {
            r.note = note.into();
            assert_eq!(violations(&r), [], "{note:?}");
        }
        for note in [
            "call +358 40 123 4567",
            "call 358401234567, 2 records",
            "call 00358 40 123 4567",
            "call 040-123 4567",
            "call +358 40 123 4567 - 2 records",
        ] {
            r.note = note.into();
            let v = violations(&r);
            assert_eq!(v.len(), 1, "{note:?}: {v:?}");
            assert_eq!(v[0].0, "note");
            assert!(v[0].1.contains("phone number"), "{note:?}: {v:?}");
        }
    }

    #[test]
    fn a_category_listed_twice_is_refused() {
        let mut r = good();
        r.scope = Some(Scope {
            data_categories: vec!["invoicing".into(), "contact".into(), "invoicing".into()],
        });
        let v = validate_submit(&r, &["contact", "invoicing"].into(), &BTreeSet::new());
        let got: Vec<(&str, &str)> = v
            .iter()
            .map(|v| (v.field.as_str(), v.rule.as_str()))
            .collect();
        assert_eq!(
            got,
            [(
                "scope.data_categories[2]",
                "\"invoicing\" is listed twice (scope.data_categories[0] names it)"
            )]
        );
    }

    #[test]
    fn submit_refuses_a_stray_label_and_a_number_of_punctuation() {
        let mut r = good();
        r.identities[0].label = "work".into();
        r.identities.push(SubjectIdentity {
            r#type: IdentityType::NationalId as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: "!!!".into(),
            label: String::new(),
        });
        let fields: Vec<String> = violations(&r).into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["identities[0].label", "identities[1].value"]);
    }

    #[test]
    fn a_page_token_is_refused_with_other_filters() {
        let first = ListRequestsRequest {
            states: vec![RequestState::Completed as i32, RequestState::Failed as i32],
            kind: RequestKind::Erasure as i32,
            ..Default::default()
        };
        let filters = list_arguments(&first).expect("valid").filters;
        let next = ListRequestsRequest {
            page_token: page_token(&filters, 1_700_000_000_000, "r-1"),
            // The same states in another order and repeated are the same filter.
            states: vec![
                RequestState::Failed as i32,
                RequestState::Completed as i32,
                RequestState::Failed as i32,
            ],
            ..first.clone()
        };
        let a = list_arguments(&next).expect("the same filters");
        assert_eq!(a.before, Some((1_700_000_000_000, "r-1".to_string())));
        for other in [
            ListRequestsRequest {
                kind: RequestKind::Transfer as i32,
                ..next.clone()
            },
            ListRequestsRequest {
                states: vec![RequestState::Completed as i32],
                ..next.clone()
            },
            ListRequestsRequest {
                overdue_only: true,
                ..next.clone()
            },
        ] {
            let v = list_arguments(&other).expect_err("other filters");
            assert_eq!(v.len(), 1, "{v:?}");
            assert_eq!(v[0].field, "page_token");
            assert!(
                v[0].rule
                    .starts_with("belongs to a List with other filters"),
                "{v:?}"
            );
        }
        // A token of a registry before filters were encoded still continues its listing.
        let old = ListRequestsRequest {
            page_token: "1700000000000_r-1".into(),
            ..first.clone()
        };
        assert_eq!(list_arguments(&old).expect("old token").before, a.before);
        for garbage in ["v2.", "v2.abc", "v2.abc.x_r-1", "v2.abc.12_"] {
            let r = ListRequestsRequest {
                page_token: garbage.into(),
                ..first.clone()
            };
            let v = list_arguments(&r).expect_err(garbage);
            assert_eq!(
                v[0].rule, "is not a token from a previous page",
                "{garbage:?}"
            );
        }
    }

    const RECIPIENT: &str = "new-bookkeeper";

    /// `req`'s violations as (field, rule) with one configured recipient.
    fn violations(req: &SubmitRequest) -> Vec<(String, String)> {
        validate_submit(req, &BTreeSet::new(), &[RECIPIENT].into())
            .into_iter()
            .map(|v| (v.field, v.rule))
            .collect()
    }

    fn with(kind: RequestKind, params: RequestParameters) -> SubmitRequest {
        SubmitRequest {
            kind: kind as i32,
            parameters: Some(params),
            ..good()
        }
    }

    fn corrections() -> RequestParameters {
        RequestParameters {
            corrections: vec![FieldCorrection {
                field: "phone".into(),
                new_value: "+358401234567".into(),
            }],
            ..Default::default()
        }
    }

    fn recipient(name: &str) -> RequestParameters {
        RequestParameters {
            transfer_recipient: name.into(),
            ..Default::default()
        }
    }

    fn lift() -> RequestParameters {
        RequestParameters {
            lift_restriction: true,
            ..Default::default()
        }
    }

    #[test]
    fn each_kind_accepts_its_own_parameters() {
        assert_eq!(
            violations(&with(RequestKind::Rectification, corrections())),
            []
        );
        assert_eq!(
            violations(&with(RequestKind::Transfer, recipient(RECIPIENT))),
            []
        );
        assert_eq!(violations(&with(RequestKind::Restriction, lift())), []);
        assert_eq!(
            violations(&with(
                RequestKind::Restriction,
                RequestParameters::default()
            )),
            []
        );
    }

    #[test]
    fn corrections_belong_only_to_a_rectification() {
        for kind in [
            RequestKind::Erasure,
            RequestKind::ReturnOfData,
            RequestKind::Transfer,
            RequestKind::Restriction,
            RequestKind::Objection,
        ] {
            let mut params = corrections();
            if kind == RequestKind::Transfer {
                params.transfer_recipient = RECIPIENT.into();
            }
            let v = violations(&with(kind, params));
            let want = kind.as_str_name().trim_start_matches("REQUEST_KIND_");
            assert_eq!(v.len(), 1, "{kind:?}: {v:?}");
            assert_eq!(v[0].0, "parameters.corrections");
            assert_eq!(
                v[0].1,
                format!("only a RECTIFICATION carries corrections (this is {want})")
            );
        }
    }

    #[test]
    fn a_recipient_belongs_only_to_a_transfer() {
        for kind in [
            RequestKind::Erasure,
            RequestKind::ReturnOfData,
            RequestKind::Restriction,
            RequestKind::Objection,
        ] {
            let v = violations(&with(kind, recipient(RECIPIENT)));
            assert_eq!(v.len(), 1, "{kind:?}: {v:?}");
            assert_eq!(v[0].0, "parameters.transfer_recipient");
            assert!(
                v[0].1.starts_with("only a TRANSFER names a recipient"),
                "{v:?}"
            );
        }
        let mut params = corrections();
        params.transfer_recipient = RECIPIENT.into();
        let v = violations(&with(RequestKind::Rectification, params));
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].0, "parameters.transfer_recipient");
    }

    #[test]
    fn lifting_belongs_only_to_a_restriction() {
        let v = violations(&with(RequestKind::Objection, lift()));
        assert_eq!(
            v,
            [(
                "parameters.lift_restriction".to_string(),
                "only a RESTRICTION may lift a restriction (this is OBJECTION)".to_string()
            )]
        );
    }

    #[test]
    fn every_misplaced_parameter_is_named() {
        let params = RequestParameters {
            transfer_recipient: RECIPIENT.into(),
            ..corrections()
        };
        let v = violations(&with(
            RequestKind::Erasure,
            RequestParameters {
                lift_restriction: true,
                ..params
            },
        ));
        let fields: Vec<&str> = v.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "parameters.corrections",
                "parameters.lift_restriction",
                "parameters.transfer_recipient"
            ]
        );
    }

    #[test]
    fn without_a_valid_kind_parameters_are_not_judged() {
        let mut r = with(RequestKind::Unspecified, corrections());
        r.kind = 99;
        let v = violations(&r);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].0, "kind");
    }

    #[test]
    fn a_transfer_names_a_configured_recipient() {
        let v = violations(&with(RequestKind::Transfer, recipient("old-bookkeeper")));
        assert_eq!(
            v,
            [(
                "parameters.transfer_recipient".to_string(),
                "\"old-bookkeeper\" is not a configured recipient (known recipients: \
                 new-bookkeeper)"
                    .to_string()
            )]
        );
        let v = violations(&with(RequestKind::Transfer, RequestParameters::default()));
        assert_eq!(v[0].0, "parameters.transfer_recipient");
        assert!(v[0].1.contains("1 to 256 bytes"), "{v:?}");
        assert!(v[0].1.contains("new-bookkeeper"), "{v:?}");
        // A long name is refused by its length, not echoed back.
        let v = violations(&with(RequestKind::Transfer, recipient(&"r".repeat(257))));
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(!v[0].1.contains("rrr"), "{v:?}");
    }

    #[test]
    fn with_no_recipients_configured_a_transfer_is_told_so() {
        let r = with(RequestKind::Transfer, recipient(RECIPIENT));
        let v = validate_submit(&r, &BTreeSet::new(), &BTreeSet::new());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].rule
                .ends_with("(no recipients are configured at the registry)"),
            "{v:?}"
        );
    }

    #[test]
    fn a_long_list_of_recipients_is_cut_short() {
        let names: Vec<String> = (0..20).map(|i| format!("r{i:02}")).collect();
        let known: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        let listed = recipients_listed(&known);
        assert_eq!(
            listed,
            "known recipients: r00, r01, r02, r03, r04, r05, r06, r07 and 12 more"
        );
    }
}

/// Properties of validation over arbitrary input: nothing panics, what keeps every rule
/// passes, and a control character in any text is refused naming its field.
#[cfg(test)]
mod properties {
    use super::*;
    use dsrelay_proto::v1::{
        ContractEnd, FieldCorrection, IdentityEncoding, IdentityType, Scope, SubjectIdentity,
    };
    use proptest::prelude::*;

    const RECIPIENT: &str = "new-bookkeeper";
    const CATEGORIES: [&str; 3] = ["contact", "invoicing", "marketing"];

    /// Mostly small numbers (the enums' own and their neighbours), sometimes any.
    fn number() -> impl Strategy<Value = i32> {
        prop_oneof![4 => -2..10i32, 1 => any::<i32>()]
    }

    /// Any text, with control characters and multi-byte characters likely.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[a-z\u{0}-\u{1f}\u{7f}\u{80}-\u{9f}€ ]{0,40}",
            (0usize..2000).prop_map(|n| "x".repeat(n)),
        ]
    }

    fn identity() -> impl Strategy<Value = SubjectIdentity> {
        (number(), number(), text(), text()).prop_map(|(t, e, value, label)| SubjectIdentity {
            r#type: t,
            encoding: e,
            value,
            label,
        })
    }

    fn any_submit() -> impl Strategy<Value = SubmitRequest> {
        let parameters = (
            prop::collection::vec((text(), text()), 0..40),
            any::<bool>(),
            text(),
            prop::option::of((number(), any::<bool>(), text())),
        )
            .prop_map(|(corrections, lift, recipient, end)| RequestParameters {
                corrections: corrections
                    .into_iter()
                    .map(|(field, new_value)| FieldCorrection { field, new_value })
                    .collect(),
                lift_restriction: lift,
                transfer_recipient: recipient,
                contract_end: end.map(|(choice, return_confirmed, transfer_recipient)| {
                    ContractEnd {
                        choice,
                        return_confirmed,
                        transfer_recipient,
                        ..Default::default()
                    }
                }),
            });
        (
            number(),
            prop::collection::vec(identity(), 0..20),
            text(),
            text(),
            prop::option::of(prop::collection::vec(text(), 0..40)),
            prop::option::of(parameters),
        )
            .prop_map(
                |(kind, identities, idempotency_key, note, categories, parameters)| SubmitRequest {
                    kind,
                    identities,
                    idempotency_key,
                    note,
                    scope: categories.map(|data_categories| Scope { data_categories }),
                    parameters,
                },
            )
    }

    /// Printable text of at most `max` bytes (tab and line breaks included).
    fn printable(max: usize) -> impl Strategy<Value = String> {
        "[ -~äöå€\t\n]{0,300}".prop_map(move |s: String| {
            let mut end = s.len().min(max);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_string()
        })
    }

    /// Submits that keep every rule: each kind with its own parameters.
    fn valid_submit() -> impl Strategy<Value = SubmitRequest> {
        let kinds = prop::sample::select(vec![
            RequestKind::Erasure,
            RequestKind::ReturnOfData,
            RequestKind::Transfer,
            RequestKind::Rectification,
            RequestKind::Restriction,
            RequestKind::Objection,
        ]);
        let mail = "[a-z0-9._]{1,30}@[a-z]{1,20}\\.(fi|com)";
        (
            kinds,
            prop::collection::vec((mail, "[a-z][ -~äöå]{0,30}"), 1..=16),
            "[A-Za-z0-9._:-]{1,128}",
            printable(MAX_TEXT),
            prop::option::of(prop::sample::subsequence(CATEGORIES.to_vec(), 0..=3)),
            prop::collection::vec(("[a-z_]{1,64}", printable(MAX_TEXT)), 1..=MAX_CORRECTIONS),
            any::<bool>(),
        )
            .prop_map(
                |(kind, mails, idempotency_key, note, categories, corrections, lift)| {
                    let parameters = match kind {
                        RequestKind::Transfer => RequestParameters {
                            transfer_recipient: RECIPIENT.into(),
                            ..Default::default()
                        },
                        // Each field once (by its index), each value set to something.
                        RequestKind::Rectification => RequestParameters {
                            corrections: corrections
                                .into_iter()
                                .enumerate()
                                .map(|(i, (field, new_value))| FieldCorrection {
                                    field: format!("{i:02}{field}")[..field.len().min(62) + 2]
                                        .to_string(),
                                    new_value: if new_value.trim().is_empty() {
                                        "x".into()
                                    } else {
                                        new_value
                                    },
                                })
                                .collect(),
                            ..Default::default()
                        },
                        RequestKind::Restriction => RequestParameters {
                            lift_restriction: lift,
                            ..Default::default()
                        },
                        _ => RequestParameters::default(),
                    };
                    SubmitRequest {
                        kind: kind as i32,
                        // The first is of type OTHER, which has a label; e-mails have none.
                        identities: mails
                            .into_iter()
                            .enumerate()
                            .map(|(i, (value, label))| SubjectIdentity {
                                r#type: if i == 0 {
                                    IdentityType::Other as i32
                                } else {
                                    IdentityType::Email as i32
                                },
                                encoding: IdentityEncoding::Raw as i32,
                                value,
                                label: if i == 0 { label } else { String::new() },
                            })
                            .collect(),
                        idempotency_key,
                        note,
                        scope: categories.map(|c| Scope {
                            data_categories: c.into_iter().map(String::from).collect(),
                        }),
                        parameters: Some(parameters),
                    }
                },
            )
    }

    /// A control character the rules refuse in every text: C0 but tab and line breaks,
    /// DEL, C1.
    fn control() -> impl Strategy<Value = char> {
        prop_oneof![
            (0u32..0x20).prop_filter("tab and line breaks are allowed", |c| {
                !matches!(c, 0x09 | 0x0a | 0x0d)
            }),
            0x7fu32..0xa0,
        ]
        .prop_map(|c| char::from_u32(c).expect("a control character"))
    }

    fn known() -> (BTreeSet<&'static str>, BTreeSet<&'static str>) {
        (CATEGORIES.into(), [RECIPIENT].into())
    }

    proptest! {
        #[test]
        fn any_submit_is_judged_without_panicking(req in any_submit()) {
            let (categories, recipients) = known();
            for v in validate_submit(&req, &categories, &recipients) {
                prop_assert!(!v.field.is_empty() && !v.rule.is_empty(), "{v:?}");
            }
        }

        #[test]
        fn a_submit_that_keeps_every_rule_passes(req in valid_submit()) {
            let (categories, recipients) = known();
            let v = validate_submit(&req, &categories, &recipients);
            prop_assert!(v.is_empty(), "{v:?} for {req:?}");
        }

        #[test]
        fn a_control_character_in_any_text_is_refused(
            req in valid_submit(),
            which in 0usize..5,
            at in any::<prop::sample::Index>(),
            c in control(),
        ) {
            let mut req = req;
            let insert = |s: &mut String| {
                let mut i = at.index(s.len() + 1);
                while !s.is_char_boundary(i) {
                    i -= 1;
                }
                s.insert(i, c);
            };
            let field = match which {
                0 => {
                    insert(&mut req.note);
                    "note".to_string()
                }
                1 => {
                    insert(&mut req.identities[0].label);
                    "identities[0].label".into()
                }
                2 => {
                    insert(&mut req.identities[0].value);
                    "identities[0].value".into()
                }
                3 => {
                    insert(&mut req.idempotency_key);
                    "idempotency_key".into()
                }
                _ => {
                    req.kind = RequestKind::Rectification as i32;
                    let p = req.parameters.get_or_insert_with(Default::default);
                    p.transfer_recipient.clear();
                    p.lift_restriction = false;
                    p.corrections = vec![FieldCorrection {
                        field: "phone".into(),
                        new_value: "+358 40 123".into(),
                    }];
                    insert(&mut p.corrections[0].new_value);
                    "parameters.corrections[0].new_value".into()
                }
            };
            let (categories, recipients) = known();
            let v = validate_submit(&req, &categories, &recipients);
            prop_assert!(
                v.iter().any(|v| v.field == field),
                "{c:?} in {field} passed: {v:?}"
            );
        }

        #[test]
        fn any_list_arguments_are_judged_without_panicking(
            states in prop::collection::vec(number(), 0..40),
            kind in number(),
            page_size in any::<u32>(),
            page_token in prop_oneof![text(), (any::<i64>(), text()).prop_map(|(a, b)| format!("{a}_{b}"))],
        ) {
            let r = ListRequestsRequest {
                states,
                kind,
                overdue_only: false,
                page_size,
                page_token,
                identities: Vec::new(),
                due_before: None,
            };
            match list_arguments(&r) {
                Ok(a) => {
                    prop_assert!((1..=500).contains(&a.page_size));
                    if let Some((_, id)) = &a.before {
                        prop_assert!(id.bytes().all(|b| b.is_ascii_graphic()), "{id:?}");
                    }
                }
                Err(v) => prop_assert!(!v.is_empty()),
            }
        }

        #[test]
        fn a_token_from_a_previous_page_is_accepted(
            at in any::<i64>(),
            id in "[0-9a-f-]{36}",
            page_size in 0u32..=500,
        ) {
            let r = ListRequestsRequest {
                page_size,
                page_token: format!("{at}_{id}"),
                ..Default::default()
            };
            let a = list_arguments(&r).expect("valid arguments");
            prop_assert_eq!(a.before, Some((at, id)));
        }
    }
}

#[cfg(test)]
#[path = "correction_submit_tests.rs"]
mod correction_submit_tests;
