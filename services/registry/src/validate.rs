//! Checks a Submit against the documented limits before anything is stored.

use std::collections::BTreeSet;

use dsrelay_proto::v1::{RequestKind, SubmitRequest};
pub(crate) use dsrelay_runtime::identity::text_violation;
use dsrelay_runtime::identity::{validate_identities, FieldViolation};

/// At most this many bytes in an idempotency key.
pub(crate) const MAX_IDEMPOTENCY_KEY: usize = 128;
/// At most this many bytes in a note, reason or transfer recipient.
pub(crate) const MAX_TEXT: usize = 1024;
/// At most this many data categories in a scope.
pub(crate) const MAX_CATEGORIES: usize = 32;
/// At most this many corrections in a rectification.
pub(crate) const MAX_CORRECTIONS: usize = 32;

/// At most this many bytes in a data category name.
pub(crate) const MAX_CATEGORY: usize = 64;

/// Every rule `req` breaks; empty when it may be stored. `known_categories` are those some
/// processor holds: a category nobody holds is almost certainly a typo.
pub(crate) fn validate_submit(
    req: &SubmitRequest,
    known_categories: &BTreeSet<&str>,
) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    let kind = RequestKind::try_from(req.kind).unwrap_or(RequestKind::Unspecified);
    if kind == RequestKind::Unspecified {
        out.push(FieldViolation::new(
            "kind",
            format!(
                "must be one of ERASURE, RETURN_OF_DATA, TRANSFER, RECTIFICATION, RESTRICTION, \
                 OBJECTION (got {})",
                req.kind
            ),
        ));
    }
    out.extend(validate_identities(&req.identities));
    let key = &req.idempotency_key;
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        out.push(FieldViolation::new(
            "idempotency_key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"),
        ));
    } else if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
    {
        out.push(FieldViolation::new(
            "idempotency_key",
            "may contain only letters, digits and . _ : -",
        ));
    }
    out.extend(text_violation("note", &req.note, MAX_TEXT, false));
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
    match kind {
        RequestKind::Rectification => {
            if params.corrections.is_empty() || params.corrections.len() > MAX_CORRECTIONS {
                out.push(FieldViolation::new(
                    "parameters.corrections",
                    format!("a rectification needs 1 to {MAX_CORRECTIONS} corrections"),
                ));
            }
            for (i, c) in params.corrections.iter().take(MAX_CORRECTIONS).enumerate() {
                if c.field.is_empty() || c.field.len() > 64 {
                    out.push(FieldViolation::new(
                        format!("parameters.corrections[{i}].field"),
                        "must be 1 to 64 bytes",
                    ));
                }
                out.extend(text_violation(
                    &format!("parameters.corrections[{i}].new_value"),
                    &c.new_value,
                    MAX_TEXT,
                    false,
                ));
            }
        }
        RequestKind::Transfer => {
            let r = &params.transfer_recipient;
            if r.is_empty() || r.len() > 256 {
                out.push(FieldViolation::new(
                    "parameters.transfer_recipient",
                    "a transfer needs a recipient of 1 to 256 bytes",
                ));
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsrelay_proto::v1::{IdentityEncoding, IdentityType, Scope, SubjectIdentity};

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
        assert!(validate_submit(&good(), &BTreeSet::new()).is_empty());
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
        let v = validate_submit(&r, &known);
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            ["kind", "idempotency_key", "scope.data_categories[1]"]
        );
    }

    #[test]
    fn rectification_needs_corrections() {
        let mut r = good();
        r.kind = RequestKind::Rectification as i32;
        let v = validate_submit(&r, &BTreeSet::new());
        assert_eq!(v[0].field, "parameters.corrections");
    }
}
