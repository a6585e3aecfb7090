//! Subject identities: validation, normalisation and hashing.
//!
//! Raw values are normalised before hashing (emails trimmed and lowercased, phone numbers
//! reduced to their digits and `+`), so a hash computed by a partner matches ours.

use dsrelay_proto::v1::{IdentityEncoding, IdentityType, SubjectIdentity};
use hmac::{Hmac, Mac};
use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// At most this many identities per request.
pub const MAX_IDENTITIES: usize = 16;
/// At most this many bytes per identity value.
pub const MAX_IDENTITY_VALUE: usize = 320;
/// At most this many bytes per identity label.
pub const MAX_IDENTITY_LABEL: usize = 64;

/// A rule an input broke, with the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct FieldViolation {
    /// The field path, e.g. `identities[0].value`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub rule: String,
}

impl FieldViolation {
    /// A violation of `rule` by `field`.
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

/// Checks an instant: outside the years 2000 to 9999 ([`dsrelay_proto::is_real_instant`])
/// it is no real request's, task's or contract's time (milliseconds sent as seconds land
/// tens of millennia out, where a due date never comes and milliseconds saturate).
pub fn instant_violation(
    field: &str,
    t: &dsrelay_proto::prost_types::Timestamp,
) -> Option<FieldViolation> {
    (!dsrelay_proto::is_real_instant(t)).then(|| {
        FieldViolation::new(
            field,
            format!(
                "must be between the years 2000 and 9999 (got {} seconds since the epoch)",
                t.seconds
            ),
        )
    })
}

/// Checks a free-text field: its length, and no control characters other than tab and line
/// breaks (NUL cannot be stored in PostgreSQL text, and the others only hide things from
/// the people who read these texts).
pub fn text_violation(
    field: &str,
    value: &str,
    max: usize,
    required: bool,
) -> Option<FieldViolation> {
    if required && value.trim().is_empty() {
        return Some(FieldViolation::new(
            field,
            format!("is required (1 to {max} bytes of text)"),
        ));
    }
    if value.len() > max {
        let rule = if required {
            format!("must be 1 to {max} bytes")
        } else {
            format!("must be at most {max} bytes")
        };
        return Some(FieldViolation::new(field, rule));
    }
    if value
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        return Some(FieldViolation::new(
            field,
            "must not contain control characters (other than tab and line breaks)",
        ));
    }
    None
}

/// At most this many bytes in a request id.
pub const MAX_REQUEST_ID: usize = 64;

/// Checks a request id: 1 to [`MAX_REQUEST_ID`] bytes of printable ASCII (ids are ours, but
/// callers type them, and they end up in logs and SQL parameters).
pub fn request_id_violation(field: &str, id: &str) -> Option<FieldViolation> {
    let ok =
        !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.bytes().all(|b| b.is_ascii_graphic());
    (!ok).then(|| {
        FieldViolation::new(
            field,
            format!("must be 1 to {MAX_REQUEST_ID} bytes of printable ASCII"),
        )
    })
}

/// Checks a request's identities against the documented rules.
pub fn validate_identities(identities: &[SubjectIdentity]) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    if identities.is_empty() {
        out.push(FieldViolation::new(
            "identities",
            "at least one identity is required",
        ));
    }
    if identities.len() > MAX_IDENTITIES {
        out.push(FieldViolation::new(
            "identities",
            format!(
                "at most {MAX_IDENTITIES} identities are allowed, got {}",
                identities.len()
            ),
        ));
        return out;
    }
    for (i, id) in identities.iter().enumerate() {
        let f = |name: &str| format!("identities[{i}].{name}");
        let ty = IdentityType::try_from(id.r#type).unwrap_or(IdentityType::Unspecified);
        let enc = IdentityEncoding::try_from(id.encoding).unwrap_or(IdentityEncoding::Unspecified);
        if ty == IdentityType::Unspecified {
            out.push(FieldViolation::new(
                f("type"),
                format!(
                    "must be one of EMAIL, PHONE, CUSTOMER_NUMBER, NATIONAL_ID, OTHER (got {})",
                    id.r#type
                ),
            ));
        }
        if enc == IdentityEncoding::Unspecified {
            out.push(FieldViolation::new(
                f("encoding"),
                format!(
                    "must be one of RAW, SHA256, SHA1, MD5 (got {})",
                    id.encoding
                ),
            ));
        }
        if id.value.is_empty() {
            out.push(FieldViolation::new(f("value"), "must not be empty"));
        } else if id.value.len() > MAX_IDENTITY_VALUE {
            out.push(FieldViolation::new(
                f("value"),
                format!("must be at most {MAX_IDENTITY_VALUE} bytes"),
            ));
        } else if let Some(len) = hex_len(enc) {
            let ok = id.value.len() == len
                && id
                    .value
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !ok {
                out.push(FieldViolation::new(
                    f("value"),
                    format!("a {enc:?} value must be {len} lowercase hex digits"),
                ));
            }
        } else if enc == IdentityEncoding::Raw {
            if let Some(rule) = raw_rule_violation(ty, &id.value) {
                out.push(FieldViolation::new(f("value"), rule));
            }
        }
        // Stored and shown with the value, so held to the rules of every other text.
        out.extend(text_violation(
            &f("label"),
            &id.label,
            MAX_IDENTITY_LABEL,
            false,
        ));
        if ty == IdentityType::Other && id.label.trim().is_empty() {
            out.push(FieldViolation::new(
                f("label"),
                "is required for type OTHER (say what the value is)",
            ));
        }
    }
    out
}

fn hex_len(enc: IdentityEncoding) -> Option<usize> {
    match enc {
        IdentityEncoding::Sha256 => Some(64),
        IdentityEncoding::Sha1 => Some(40),
        IdentityEncoding::Md5 => Some(32),
        _ => None,
    }
}

fn raw_rule_violation(ty: IdentityType, value: &str) -> Option<String> {
    if value.trim() != value {
        return Some("must not start or end with white space".into());
    }
    if value.chars().any(char::is_control) {
        return Some("must not contain control characters".into());
    }
    match ty {
        IdentityType::Email if !is_plausible_email(value) => {
            Some("is not an e-mail address (expected local@domain.tld)".into())
        }
        IdentityType::Phone => {
            let digits = value.chars().filter(char::is_ascii_digit).count();
            let allowed = value
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '(' | ')'));
            (!allowed || !(5..=15).contains(&digits)).then(|| {
                "is not a phone number (5 to 15 digits, optionally +, spaces, dashes)".into()
            })
        }
        _ => None,
    }
}

/// A deliberately simple check: one `@`, a non-empty local part, a dotted domain, no spaces.
pub fn is_plausible_email(v: &str) -> bool {
    let Some((local, domain)) = v.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && !v.contains(char::is_whitespace)
}

/// The normalised form of a raw value, the one that hashes are computed over.
pub fn normalize(ty: IdentityType, value: &str) -> String {
    match ty {
        IdentityType::Email => value.trim().to_lowercase(),
        IdentityType::Phone => value
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == '+')
            .collect(),
        _ => value.trim().to_string(),
    }
}

/// Lowercase hex digest of `normalized` with the given algorithm; `None` for RAW.
pub fn digest(enc: IdentityEncoding, normalized: &str) -> Option<String> {
    Some(match enc {
        IdentityEncoding::Sha256 => hex::encode(Sha256::digest(normalized.as_bytes())),
        IdentityEncoding::Sha1 => hex::encode(Sha1::digest(normalized.as_bytes())),
        IdentityEncoding::Md5 => hex::encode(Md5::digest(normalized.as_bytes())),
        _ => return None,
    })
}

/// A keyed hash (HMAC-SHA256) of an identity, kept for the audit trail after the raw value is
/// forgotten: it proves which subject a record was about to someone holding the key and the
/// value, and reveals nothing to anyone else.
pub fn keyed_hash(key: &[u8], id: &SubjectIdentity) -> String {
    let ty = IdentityType::try_from(id.r#type).unwrap_or(IdentityType::Unspecified);
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(&id.r#type.to_be_bytes());
    mac.update(&id.encoding.to_be_bytes());
    mac.update(normalize(ty, &id.value).as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// A keyed hash (HMAC-SHA256, lowercase hex) of `bytes` under `key`, in the context `domain`
/// (so a hash made for one purpose never equals one made for another): for values that must
/// be comparable after they are forgotten, such as a Submit body or a free-text note.
pub fn keyed_digest(key: &[u8], domain: &[u8], bytes: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(&(domain.len() as u64).to_be_bytes());
    mac.update(domain);
    mac.update(bytes);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(ty: IdentityType, enc: IdentityEncoding, v: &str) -> SubjectIdentity {
        SubjectIdentity {
            r#type: ty as i32,
            encoding: enc as i32,
            value: v.into(),
            label: String::new(),
        }
    }

    #[test]
    fn accepts_good_identities() {
        let ids = vec![
            ident(
                IdentityType::Email,
                IdentityEncoding::Raw,
                "Maija@Example.fi",
            ),
            ident(
                IdentityType::Phone,
                IdentityEncoding::Raw,
                "+358 40 123 4567",
            ),
            ident(
                IdentityType::Email,
                IdentityEncoding::Md5,
                &digest(IdentityEncoding::Md5, "a@b.fi").unwrap(),
            ),
        ];
        assert!(validate_identities(&ids).is_empty());
    }

    #[test]
    fn names_field_and_rule() {
        let v = validate_identities(&[ident(IdentityType::Email, IdentityEncoding::Raw, "nope")]);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].field, "identities[0].value");
        assert!(v[0].rule.contains("e-mail"));
        let v = validate_identities(&[]);
        assert_eq!(v[0].field, "identities");
        let v = validate_identities(&[ident(IdentityType::Email, IdentityEncoding::Sha256, "ABC")]);
        assert!(v[0].rule.contains("64 lowercase hex"));
        let many = vec![ident(IdentityType::CustomerNumber, IdentityEncoding::Raw, "1"); 17];
        assert!(validate_identities(&many)[0].rule.contains("at most 16"));
    }

    #[test]
    fn mailchimp_style_md5() {
        assert_eq!(
            digest(
                IdentityEncoding::Md5,
                &normalize(IdentityType::Email, " A@B.fi ")
            )
            .unwrap(),
            digest(IdentityEncoding::Md5, "a@b.fi").unwrap()
        );
    }
}
