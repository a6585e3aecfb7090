//! Subject identities: validation, normalisation and hashing.
//!
//! Raw values are normalised before hashing (emails trimmed and lowercased, phone numbers
//! reduced to their digits and `+`), so a hash computed by a partner matches ours.

use dsrelay_proto::v1::{IdentityEncoding, IdentityType, SubjectIdentity};
use hmac::{Hmac, Mac};
use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::unicode::{is_default_ignorable, is_format_character};

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

/// Checks an instant ([`dsrelay_proto::is_real_instant`]): outside the years 2000 to 9999
/// it is no real request's, task's or contract's time (milliseconds sent as seconds land
/// tens of millennia out, where a due date never comes and milliseconds saturate), and
/// `nanos` outside 0 to 999,999,999 are no fraction of a second (read as they are, they
/// would be clamped into one, so another instant would be stored than the one sent); that
/// violation is `field.nanos`'s, and the years are checked only once the nanos are right.
pub fn instant_violation(
    field: &str,
    t: &dsrelay_proto::prost_types::Timestamp,
) -> Option<FieldViolation> {
    if !dsrelay_proto::has_valid_nanos(t) {
        return Some(FieldViolation::new(
            format!("{field}.nanos"),
            format!(
                "must be from 0 to {} (got {})",
                dsrelay_proto::MAX_TIMESTAMP_NANOS,
                t.nanos
            ),
        ));
    }
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

/// Checks a free-text field: its length (a required one not blank), and no control
/// characters other than tab and line breaks (NUL cannot be stored in PostgreSQL text, and
/// the others only hide things from the people who read these texts).
pub fn text_violation(
    field: &str,
    value: &str,
    max: usize,
    required: bool,
) -> Option<FieldViolation> {
    // Blank is what a reader sees: white space and the invisible characters (a zero width
    // space, say) that `trim` keeps.
    if required
        && value
            .chars()
            .all(|c| c.is_whitespace() || is_default_ignorable(c))
    {
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
    if let Some(c) = value
        .chars()
        .find(|&c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        // Named, as a format character is: most are invisible, and a caller that does not
        // know which one it sent cannot find it in a long text.
        return Some(FieldViolation::new(
            field,
            format!(
                "must not contain control characters (other than tab and line breaks): \
                 found U+{:04X}",
                u32::from(c)
            ),
        ));
    }
    if let Some(c) = value.chars().find(|&c| refused_in_text(c)) {
        return Some(FieldViolation::new(
            field,
            format!(
                "must not contain Unicode format characters such as bidirectional controls \
                 and zero width characters (found U+{:04X}): they change or hide what a reader \
                 sees; remove it",
                u32::from(c)
            ),
        ));
    }
    None
}

/// A Unicode format character ([`is_format_character`]) that free text may not hold: all of
/// them but the zero width non-joiner and joiner. These texts are read by operators and
/// partners; a right-to-left override or an isolate reorders what the reader sees (a name
/// shown reversed, a reason appearing to say something else), and a zero width space makes
/// two different texts look the same. The non-joiner and joiner (U+200C, U+200D) are allowed:
/// Persian and Indic names and emoji sequences need them, and they neither reorder nor hide a
/// text. An identity refuses them too ([`is_default_ignorable`]).
pub fn refused_in_text(c: char) -> bool {
    is_format_character(c) && !matches!(c, '\u{200C}' | '\u{200D}')
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
                    format!(
                        "a {} value must be {len} lowercase hex digits",
                        enc.as_str_name().trim_start_matches("IDENTITY_ENCODING_")
                    ),
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

/// Rules a registry holds a new request's identities to at Submit on top of
/// [`validate_identities`]: a label only on an identity of type OTHER (the only one it is
/// defined for), and a raw customer number or national identification number with at least
/// one letter or digit (one of punctuation alone matches no record anywhere, and the request
/// would complete as NOT_FOUND everywhere). Kept out of [`validate_identities`], which a
/// processor checks deliveries with, so that requests a registry stored before these rules
/// are still delivered.
pub fn submit_identity_violations(identities: &[SubjectIdentity]) -> Vec<FieldViolation> {
    let mut out = Vec::new();
    for (i, id) in identities.iter().enumerate().take(MAX_IDENTITIES) {
        let f = |name: &str| format!("identities[{i}].{name}");
        let ty = IdentityType::try_from(id.r#type).unwrap_or(IdentityType::Unspecified);
        let enc = IdentityEncoding::try_from(id.encoding).unwrap_or(IdentityEncoding::Unspecified);
        let name = ty.as_str_name().trim_start_matches("IDENTITY_TYPE_");
        if matches!(ty, IdentityType::CustomerNumber | IdentityType::NationalId)
            && enc == IdentityEncoding::Raw
            && !id.value.is_empty()
            && !id.value.chars().any(char::is_alphanumeric)
        {
            out.push(FieldViolation::new(
                f("value"),
                format!("a {name} value must hold at least one letter or digit"),
            ));
        }
        if ty != IdentityType::Other && ty != IdentityType::Unspecified && !id.label.is_empty() {
            out.push(FieldViolation::new(
                f("label"),
                format!(
                    "only an identity of type OTHER has a label (this is {name}): leave it empty"
                ),
            ));
        }
    }
    out
}

/// The identity types holders find a subject by, by their name as a configuration key or a
/// correction's field: the SQL connector's `match` keys, and the fields a correction may
/// name that are identities (the example adapter's `email` and `phone` among them), so a
/// corrected value is one the subject must still be found by. OTHER is left out: what its
/// value is depends on its label, which neither a `match` nor a correction carries.
pub const IDENTITY_FIELDS: [(&str, IdentityType); 4] = [
    ("email", IdentityType::Email),
    ("phone", IdentityType::Phone),
    ("customer_number", IdentityType::CustomerNumber),
    ("national_id", IdentityType::NationalId),
];

/// What is wrong with `new_value` as the value a correction of `field` sets, as a violation
/// of `at`. When `field` names an identity (`email`, `phone`, `customer_number` or
/// `national_id`, compared trimmed and in any ASCII case as corrections' fields are
/// everywhere, so " Email" corrects `email`), the value, trimmed as holders trim a corrected
/// identity, must be what a raw identity of that type may be at Submit: 1 to
/// [`MAX_IDENTITY_VALUE`] bytes, the rules [`validate_identities`] holds a raw value to, and
/// the letter-or-digit rule of [`submit_identity_violations`]. A holder writes it where it
/// finds the subject, and a value no raw identity may be would leave her unfindable there,
/// or be refused by one holder and written by another. `None` for any other field, and for
/// a blank value, which the caller's own rule for a required text refuses. The value is
/// never echoed.
pub fn correction_violation(at: &str, field: &str, new_value: &str) -> Option<FieldViolation> {
    let field = field.trim();
    let (key, ty) = IDENTITY_FIELDS
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(field))?;
    let value = new_value.trim();
    if value.is_empty() {
        return None;
    }
    let rule = if value.len() > MAX_IDENTITY_VALUE {
        format!("must be at most {MAX_IDENTITY_VALUE} bytes")
    } else if let Some(rule) = raw_rule_violation(*ty, value) {
        rule
    } else if matches!(ty, IdentityType::CustomerNumber | IdentityType::NationalId)
        && !value.chars().any(char::is_alphanumeric)
    {
        "must hold at least one letter or digit".into()
    } else {
        return None;
    };
    let name = ty.as_str_name().trim_start_matches("IDENTITY_TYPE_");
    Some(FieldViolation::new(
        at,
        format!(
            "corrects {key:?}, an identity holders find the subject by, so the new value must \
             be a valid raw {name} identity (after trimming): {rule}"
        ),
    ))
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
    // A byte order mark a CSV export left, or a zero width space pasted along: the value no
    // longer equals the one a holder's records hold, and every holder answers NOT_FOUND.
    if let Some(c) = value
        .chars()
        .find(|&c| is_default_ignorable(c) || is_format_character(c))
    {
        return Some(format!(
            "contains an invisible or format character (U+{:04X}), so it would match no \
             record written without it: remove it",
            u32::from(c)
        ));
    }
    match ty {
        IdentityType::Email => email_violation(value),
        IdentityType::Phone => {
            let digits = value.chars().filter(char::is_ascii_digit).count();
            let allowed = value
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '(' | ')'));
            (!allowed || !(5..=15).contains(&digits)).then(|| {
                "is not a phone number (5 to 15 digits, optionally +, spaces, dashes, parentheses)"
                    .into()
            })
        }
        _ => None,
    }
}

/// A deliberately simple check: one `@`, a non-empty local part, a dotted domain, no spaces,
/// and none of the characters no raw identity may hold (control, invisible and format
/// characters).
pub fn is_plausible_email(v: &str) -> bool {
    raw_rule_violation(IdentityType::Email, v).is_none()
}

/// The rule of [`is_plausible_email`] that `v` breaks, in words that say which: one `@`, a
/// local part (before it) of 1 to 64 bytes, a domain (after it) with a dot that neither
/// starts nor ends it nor doubles, and no white space. The text is never echoed.
fn email_violation(v: &str) -> Option<String> {
    let not = |why: String| {
        Some(format!(
            "is not an e-mail address (local@domain.tld): {why}"
        ))
    };
    if v.contains(char::is_whitespace) {
        return not("it contains white space".into());
    }
    let Some((local, domain)) = v.split_once('@') else {
        return not("it has no @".into());
    };
    if domain.contains('@') {
        return not("it has more than one @".into());
    }
    if local.is_empty() {
        return not("nothing comes before the @".into());
    }
    if local.len() > 64 {
        return not(format!(
            "the local part (before the @) is {} bytes, at most 64 are allowed",
            local.len()
        ));
    }
    if domain.is_empty() {
        return not("nothing comes after the @".into());
    }
    if !domain.contains('.') {
        return not("the domain (after the @) needs a dot, as in example.fi".into());
    }
    if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
        return not(
            "the domain (after the @) must not start or end with a dot or hold two in a row".into(),
        );
    }
    None
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

/// Which kind of the subject's `identities` the free text `text` holds, if any, as a refusal
/// names it (never the value); an operator's evidence or reason is checked with it (a
/// partner's note with [`identity_in_note`]). A raw value is found where it is written: an
/// e-mail address as one of the text's addresses (`email_candidates`) in any case, a phone
/// number as `holds_phone` finds it (its digits anywhere in a run of digits and separators
/// too, even inside a longer number), any other value as a whole word (`holds_word`) in any
/// case, beyond ASCII too (`fold_case`: "cä1" holds "CÄ1"). A hashed value is found pasted
/// as it is, as a whole word in any case, or
/// where something in the text that could be the value hashes to it the way identities are
/// hashed ([`normalize`], then [`digest`]): for an e-mail address one of the text's
/// addresses, for a phone number one of `phone_candidates`, for any other value one of
/// `text_words` as written, uppercased or lowercased.
pub fn identity_in_text(identities: &[SubjectIdentity], text: &str) -> Option<String> {
    find_identity(identities, text, PhoneMatch::Within)
}

/// [`identity_in_text`] for a partner's Submit note, but a raw phone number is found only
/// written whole: as a stretch of the text's groups of digits whose digits are the number's
/// and no more (`holds_phone`), so "order 93584012345670" does not hold +358 40 123 4567.
/// A refusal stops a partner's request, where an operator can reword a note at once.
/// `identities` should be those that passed validation: a value refused (a PHONE "12")
/// stands for no subject, and short ones are found in unrelated text.
pub fn identity_in_note(identities: &[SubjectIdentity], text: &str) -> Option<String> {
    find_identity(identities, text, PhoneMatch::Whole)
}

/// Where [`holds_phone`] looks for a raw phone number's digits.
#[derive(Clone, Copy)]
enum PhoneMatch {
    /// Anywhere in a run of digits and separators, inside a longer number too.
    Within,
    /// Only as a whole stretch of groups of digits, not adjacent to other digits in a group.
    Whole,
}

fn find_identity(identities: &[SubjectIdentity], text: &str, phone: PhoneMatch) -> Option<String> {
    let folded = Folded::new(text);
    // Read out of the text once, when an identity of their kind needs them.
    let mut words: Option<Vec<&str>> = None;
    let mut emails: Option<Vec<String>> = None;
    let mut phones: Option<Vec<String>> = None;
    let lowercased = |addresses: Vec<&str>| addresses.iter().map(|a| a.to_lowercase()).collect();
    for id in identities {
        let ty = IdentityType::try_from(id.r#type).unwrap_or(IdentityType::Unspecified);
        let enc = IdentityEncoding::try_from(id.encoding).unwrap_or(IdentityEncoding::Unspecified);
        if id.value.trim().is_empty() {
            continue;
        }
        let found = match enc {
            IdentityEncoding::Raw => match ty {
                IdentityType::Email => {
                    let value = id.value.trim().to_lowercase();
                    emails
                        .get_or_insert_with(|| lowercased(email_candidates(text)))
                        .contains(&value)
                }
                IdentityType::Phone => holds_phone(text, &id.value, phone),
                _ => holds_word(&folded, &id.value),
            },
            IdentityEncoding::Sha256 | IdentityEncoding::Sha1 | IdentityEncoding::Md5 => {
                let hashes_to = |candidate: &str| {
                    digest(enc, &normalize(ty, candidate)).is_some_and(|d| d == id.value)
                };
                // A hash copied from the request rather than the value it stands for.
                holds_word(&folded, &id.value)
                    || match ty {
                        IdentityType::Email => emails
                            .get_or_insert_with(|| lowercased(email_candidates(text)))
                            .iter()
                            .any(|c| hashes_to(c)),
                        IdentityType::Phone => phones
                            .get_or_insert_with(|| phone_candidates(text))
                            .iter()
                            .any(|c| hashes_to(c)),
                        _ => words
                            .get_or_insert_with(|| text_words(text))
                            .iter()
                            .any(|w| {
                                hashes_to(w)
                                    || hashes_to(&w.to_uppercase())
                                    || hashes_to(&w.to_lowercase())
                            }),
                    }
            }
            IdentityEncoding::Unspecified => false,
        };
        if found {
            return Some(match ty {
                IdentityType::Email => "e-mail address".into(),
                IdentityType::Phone => "phone number".into(),
                IdentityType::CustomerNumber => "customer number".into(),
                IdentityType::NationalId => "national identification number".into(),
                IdentityType::Other | IdentityType::Unspecified => {
                    format!("identity of type OTHER ({:?})", id.label)
                }
            });
        }
    }
    None
}

/// A text with its case folded ([`fold_case`]), and where each of the text's characters
/// begins in it.
struct Folded<'a> {
    /// The text as written.
    text: &'a str,
    /// Its characters' folds, one after the other.
    folded: String,
    /// For each character of `text`, where its fold begins in `folded` and where it begins in
    /// `text`, in order; then both lengths.
    starts: Vec<(usize, usize)>,
}

impl<'a> Folded<'a> {
    fn new(text: &'a str) -> Self {
        let mut folded = String::with_capacity(text.len());
        let mut starts = Vec::with_capacity(text.len() + 1);
        for (at, c) in text.char_indices() {
            starts.push((folded.len(), at));
            fold_case(c, &mut folded);
        }
        starts.push((folded.len(), text.len()));
        Self {
            text,
            folded,
            starts,
        }
    }
}

/// Appends `c` with its case folded: lowercased, uppercased and lowercased again, so that
/// every case of a letter comes out the same, beyond ASCII too ("Ä" and "ä"; "ẞ", "ß" and
/// "SS"; "Σ", "σ" and a final "ς"; the Kelvin sign and "k"). Each character on its own,
/// never by its neighbours (as `str::to_lowercase` does for a final sigma), so that a value
/// and a text fold alike wherever the value stands.
fn fold_case(c: char, out: &mut String) {
    for lower in c.to_lowercase() {
        for upper in lower.to_uppercase() {
            out.extend(upper.to_lowercase());
        }
    }
}

/// Whether `value` appears in `text` in any case ([`fold_case`]), from the start of one of
/// its characters to the end of one, with no letter or digit right before or after it, so
/// that a customer number is not found inside a longer number.
fn holds_word(text: &Folded<'_>, value: &str) -> bool {
    let mut folded = String::with_capacity(value.len());
    value.chars().for_each(|c| fold_case(c, &mut folded));
    if folded.is_empty() {
        return false;
    }
    let edge = |c: Option<char>| !c.is_some_and(char::is_alphanumeric);
    let starts_open = edge(value.chars().next());
    let ends_open = edge(value.chars().next_back());
    // Each character's start in turn, not `match_indices`: a match that ends inside a
    // character's fold ("s" of the "ss" of "ß") is none, and must not hide one that
    // overlaps it.
    let original = |at: usize| {
        text.starts
            .binary_search_by_key(&at, |&(folded, _)| folded)
            .ok()
            .map(|i| text.starts[i].1)
    };
    text.starts.iter().any(|&(at, start)| {
        if !text.folded[at..].starts_with(&folded) {
            return false;
        }
        let Some(end) = original(at + folded.len()) else {
            return false;
        };
        (starts_open || edge(text.text[..start].chars().next_back()))
            && (ends_open || edge(text.text[end..].chars().next()))
    })
}

/// Whether `text` writes the raw phone number `value`. With [`PhoneMatch::Within`], where
/// its digits are inside a run of digits and separators ([`phone_runs`]); with
/// [`PhoneMatch::Whole`], where they are those of a stretch of consecutive groups of digits
/// ([`group_stretches`]), a leading 00 read as `+`. Either way also where one of
/// [`phone_candidates`] is the same number in the other format. A national number is a 0,
/// not 00, and 7 or more digits; an international one starts with 00 or with no 0 (written
/// with `+` or without), and is the same number when, after the 00, a 1 to 3 digit country
/// code comes before the national number's digits after its 0 (which country is not
/// checked).
fn holds_phone(text: &str, value: &str, how: PhoneMatch) -> bool {
    let digits = ascii_digits(value);
    if digits.is_empty() {
        return false;
    }
    let written = match how {
        PhoneMatch::Within => phone_runs(text).any(|run| ascii_digits(run).contains(&digits)),
        // 17: the 15 digits of the longest number, after a 00.
        PhoneMatch::Whole => group_stretches(text, 17).iter().any(|s| {
            let s = ascii_digits(s);
            s == digits || international(&s).is_some_and(|i| international(&digits) == Some(i))
        }),
    };
    if written {
        return true;
    }
    fn national(d: &str) -> Option<&str> {
        d.strip_prefix('0')
            .filter(|rest| rest.len() >= 7 && !rest.starts_with('0'))
    }
    fn same(international: Option<&str>, national: Option<&str>) -> bool {
        international
            .zip(national)
            .and_then(|(i, n)| i.strip_suffix(n))
            .is_some_and(|code| (1..=3).contains(&code.len()))
    }
    phone_candidates(text).iter().any(|c| {
        let c = ascii_digits(c);
        same(international(&c), national(&digits)) || same(international(&digits), national(&c))
    })
}

/// A phone number's digits without its international prefix (00, or none written), or
/// `None` for a national number (one that starts with a single 0).
fn international(d: &str) -> Option<&str> {
    d.strip_prefix("00")
        .or_else(|| (!d.starts_with('0')).then_some(d))
}

/// The ASCII digits of `text`, in order.
fn ascii_digits(text: &str) -> String {
    text.chars().filter(char::is_ascii_digit).collect()
}

/// Characters a written phone number is made of: digits, `+` and the separators
/// ([`is_phone_separator`]).
fn is_phone_char(c: char) -> bool {
    c.is_ascii_digit() || c == '+' || is_phone_separator(c)
}

/// What may stand between a phone number's groups of digits: any white space (a no-break
/// space too), the hyphens and dashes U+2010 to U+2015, and `-`, `(`, `)`, `.`, `/`.
fn is_phone_separator(c: char) -> bool {
    c.is_whitespace()
        || ('\u{2010}'..='\u{2015}').contains(&c)
        || matches!(c, '-' | '(' | ')' | '.' | '/')
}

/// The runs of `text` a phone number could be written in, each holding a digit.
fn phone_runs(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !is_phone_char(c))
        .filter(|run| run.chars().any(|c| c.is_ascii_digit()))
}

/// Every way of reading a phone number of 5 to 15 digits out of the text's runs: each of
/// [`group_stretches`], with its `+` and without, for numbers written next to other figures
/// ("+358 40 123 4567 - 2 records").
fn phone_candidates(text: &str) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    for number in group_stretches(text, 15) {
        if number.chars().filter(char::is_ascii_digit).count() >= 5 {
            let bare = number.trim_start_matches('+');
            out.insert(bare.to_string());
            out.insert(format!("+{bare}"));
            out.insert(number);
        }
    }
    out.into_iter().collect()
}

/// Each stretch of consecutive groups of digits (as the separators split the text's runs)
/// of at most `max_digits` digits, its groups joined without their separators.
fn group_stretches(text: &str, max_digits: usize) -> Vec<String> {
    let mut out = Vec::new();
    for run in phone_runs(text) {
        let groups: Vec<&str> = run
            .split(is_phone_separator)
            .filter(|g| g.chars().any(|c| c.is_ascii_digit()))
            .collect();
        for start in 0..groups.len() {
            let mut number = String::new();
            for group in &groups[start..] {
                number.push_str(group);
                if number.chars().filter(char::is_ascii_digit).count() > max_digits {
                    break;
                }
                out.push(number.clone());
            }
        }
    }
    out
}

/// The words of `text`: split at white space and at the brackets, quotes and separators
/// that no number holds (`<>()[],;"`), each also split at `:`, `=` and `/` (as in "hetu:…",
/// "ref=…"), and each of these also without the punctuation around it.
fn text_words(text: &str) -> Vec<&str> {
    let mut out = std::collections::BTreeSet::new();
    for word in text.split(|c: char| {
        c.is_whitespace() || matches!(c, '<' | '>' | '(' | ')' | '[' | ']' | ',' | ';' | '"')
    }) {
        for part in std::iter::once(word).chain(word.split([':', '=', '/'])) {
            out.insert(part);
            out.insert(part.trim_matches(|c: char| !c.is_alphanumeric()));
        }
    }
    out.remove("");
    out.into_iter().collect()
}

/// The e-mail addresses written in `text`: around each `@`, the characters an address's
/// domain is made of, and before it those of a usual local part, or of any the standard
/// allows; without a sentence's full stop after it ("mailto:Bob@example.fi." holds
/// "Bob@example.fi", "to=bob@example.fi" both "bob@…" and "to=bob@…").
fn email_candidates(text: &str) -> Vec<&str> {
    let usual = |c: char| c.is_alphanumeric() || matches!(c, '.' | '_' | '%' | '+' | '-');
    let any = |c: char| usual(c) || "'!#$&*/=?^`{|}~".contains(c);
    let domain = |c: char| c.is_alphanumeric() || matches!(c, '.' | '-');
    let mut out = std::collections::BTreeSet::new();
    for (at, _) in text.match_indices('@') {
        let end = text[at + 1..]
            .char_indices()
            .take_while(|&(_, c)| domain(c))
            .last()
            .map_or(at + 1, |(i, c)| at + 1 + i + c.len_utf8());
        for local in [&usual as &dyn Fn(char) -> bool, &any] {
            let start = text[..at]
                .char_indices()
                .rev()
                .take_while(|&(_, c)| local(c))
                .last()
                .map_or(at, |(i, _)| i);
            out.insert(text[start..end].trim_end_matches('.'));
        }
    }
    out.into_iter().collect()
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

    /// A reason of nothing but a zero width space passed as given; it reads as blank.
    #[test]
    fn a_required_text_of_invisible_characters_is_blank() {
        for blank in [
            "   ",
            "\u{200B}",
            " \u{FEFF}\u{2060} ",
            "\u{00AD}\n",
            // A right-to-left mark, a Hangul filler, a variation selector and a tag.
            "\u{200F}\u{3164}\u{FE0F}\u{E0041}",
        ] {
            let v = text_violation("reason", blank, 16, true).expect(blank);
            assert_eq!(v.rule, "is required (1 to 16 bytes of text)", "{blank:?}");
        }
        // Not blank, but a zero width space hides itself in a text a reader compares.
        for (text, required) in [("\u{200B}moved", true), ("\u{200B}", false)] {
            let v = text_violation("reason", text, 16, required).expect(text);
            assert!(v.rule.contains("U+200B"), "{v:?}");
        }
        assert_eq!(text_violation("reason", "moved", 16, true), None);
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
    fn a_hash_of_the_wrong_length_is_named_as_the_proto_names_it() {
        for (enc, name, len) in [
            (IdentityEncoding::Sha256, "SHA256", 64),
            (IdentityEncoding::Sha1, "SHA1", 40),
            (IdentityEncoding::Md5, "MD5", 32),
        ] {
            let v = validate_identities(&[ident(IdentityType::Email, enc, "abc")]);
            assert_eq!(
                v[0].rule,
                format!("a {name} value must be {len} lowercase hex digits")
            );
        }
    }

    #[test]
    fn an_e_mail_address_is_refused_by_the_rule_it_breaks() {
        let long_local = format!("{}@example.fi", "a".repeat(309));
        assert_eq!(long_local.len(), 320);
        for (value, why) in [
            (
                long_local.as_str(),
                "the local part (before the @) is 309 bytes, at most 64",
            ),
            ("maija.example.fi", "it has no @"),
            ("a@b@example.fi", "more than one @"),
            ("@example.fi", "nothing comes before the @"),
            ("maija@", "nothing comes after the @"),
            ("maija@localhost", "needs a dot"),
            ("maija@.example.fi", "must not start or end with a dot"),
            ("maija@example..fi", "two in a row"),
            ("maija @example.fi", "white space"),
        ] {
            let v =
                validate_identities(&[ident(IdentityType::Email, IdentityEncoding::Raw, value)]);
            assert_eq!(v.len(), 1, "{value:?}: {v:?}");
            assert!(v[0].rule.contains(why), "{value:?}: {}", v[0].rule);
            assert!(
                !v[0].rule.contains(value),
                "{value:?} echoed: {}",
                v[0].rule
            );
        }
        let longest_local = format!("{}@example.fi", "a".repeat(64));
        assert!(is_plausible_email(&longest_local));
    }

    #[test]
    fn a_label_belongs_to_other_and_a_number_needs_a_letter_or_digit() {
        let labelled = |ty: IdentityType, value: &str, label: &str| SubjectIdentity {
            label: label.into(),
            ..ident(ty, IdentityEncoding::Raw, value)
        };
        let v = submit_identity_violations(&[
            labelled(IdentityType::Email, "maija@example.fi", "work"),
            labelled(IdentityType::NationalId, "!!!", ""),
            labelled(IdentityType::CustomerNumber, "-- --", ""),
            labelled(IdentityType::Other, "!!!", "loyalty-card"),
            labelled(IdentityType::NationalId, "131052-308T", ""),
            labelled(IdentityType::CustomerNumber, "1", ""),
        ]);
        let got: Vec<(&str, &str)> = v
            .iter()
            .map(|v| (v.field.as_str(), v.rule.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "identities[0].label",
                    "only an identity of type OTHER has a label (this is EMAIL): leave it empty"
                ),
                (
                    "identities[1].value",
                    "a NATIONAL_ID value must hold at least one letter or digit"
                ),
                (
                    "identities[2].value",
                    "a CUSTOMER_NUMBER value must hold at least one letter or digit"
                ),
            ]
        );
        // A hash stands for a value that cannot be seen; it is judged by its form only.
        let hashed = ident(IdentityType::NationalId, IdentityEncoding::Sha256, "!!!");
        assert_eq!(submit_identity_violations(&[hashed]), []);
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

    fn identity(ty: IdentityType, enc: IdentityEncoding, value: &str) -> SubjectIdentity {
        SubjectIdentity {
            r#type: ty as i32,
            encoding: enc as i32,
            value: value.into(),
            label: "loyalty-card".into(),
        }
    }

    fn hashed(ty: IdentityType, enc: IdentityEncoding, raw: &str) -> SubjectIdentity {
        identity(ty, enc, &digest(enc, &normalize(ty, raw)).unwrap())
    }

    #[test]
    fn an_operators_text_naming_a_raw_identity_is_found_by_kind() {
        use IdentityEncoding::Raw;
        use IdentityType::*;
        let ids = [
            identity(Email, Raw, "Maija.Meikalainen@example.fi"),
            identity(Phone, Raw, "+358 40 123 4567"),
            identity(CustomerNumber, Raw, "C-1001"),
            identity(NationalId, Raw, "131052-308T"),
            identity(Other, Raw, "LC77"),
        ];
        let found = |text: &str| identity_in_text(&ids, text);
        for (text, kind) in [
            (
                "mailed maija.meikalainen@EXAMPLE.fi a copy",
                "e-mail address",
            ),
            ("mailed <maija.meikalainen@example.fi>.", "e-mail address"),
            ("called +358401234567 twice", "phone number"),
            ("called (040) 123-4567", "phone number"),
            ("called 358-40-123-4567, 2 records", "phone number"),
            ("called +358\u{a0}40\u{a0}123\u{a0}4567", "phone number"),
            ("called 040\u{2013}123 4567", "phone number"),
            ("called 040/1234567", "phone number"),
            ("called 00358 40 123 4567", "phone number"),
            ("shredded folder c-1001.", "customer number"),
            ("ref=C-1001", "customer number"),
            ("id 131052-308t checked", "national identification number"),
            ("hetu:131052-308T", "national identification number"),
            ("card LC77", "identity of type OTHER (\"loyalty-card\")"),
        ] {
            assert_eq!(found(text).as_deref(), Some(kind), "{text:?}");
        }
        // Figures that only resemble a value, or hold it inside a longer one, are no identity.
        for text in [
            "shredded folder 2019/14, witnessed by M. Virtanen",
            "shredded folder 2019/14,\u{a0}witnessed by M.\u{a0}Virtanen",
            "folder C-10012 and LC770",
            "4567 records in 123 boxes, +358 others",
            "sent to xmaija.meikalainen@example.fi",
            "sent to maija.meikalainen@example.fin",
            "order 01234567",
            "order 0 1234567",
            "",
        ] {
            assert_eq!(found(text), None, "{text:?}");
        }
        // A number given in national format, written in international format.
        let national = [identity(Phone, Raw, "040-123 4567")];
        for text in [
            "rang +358 40 123 4567",
            "rang 00358 40 123 4567",
            "rang +358\u{a0}40\u{2011}123\u{a0}4567",
            "rang 040/123 4567",
        ] {
            assert!(identity_in_text(&national, text).is_some(), "{text:?}");
        }
        for text in [
            "rang +358 40 123 4568",
            "order 01234567",
            "invoice 2024401234567",
        ] {
            assert!(identity_in_text(&national, text).is_none(), "{text:?}");
        }
        // A value never appears in the kind named.
        assert!(!found("maija.meikalainen@example.fi")
            .unwrap()
            .contains("maija"));
    }

    /// A partner's note names a raw phone number only where it is written whole; an
    /// operator's text also where its digits are inside a longer number, as before.
    #[test]
    fn a_note_names_a_phone_number_only_written_whole() {
        use IdentityEncoding::Raw;
        use IdentityType::*;
        let ids = [identity(Phone, Raw, "+358 40 123 4567")];
        for text in [
            "order 93584012345670",
            "order 3584012345670",
            "ref 0358 40 123 4567",
            "ref 99358401234567",
        ] {
            assert_eq!(identity_in_note(&ids, text), None, "{text:?}");
            assert!(identity_in_text(&ids, text).is_some(), "{text:?}");
        }
        for text in [
            "called +358401234567 twice",
            "called (040) 123-4567",
            "called 358-40-123-4567, 2 records",
            "called +358 40 123 4567 - 2 records",
            "called +358\u{a0}40\u{a0}123\u{a0}4567",
            "called 040\u{2013}123 4567",
            "called 00358 40 123 4567",
            "called 0035840 1234567",
        ] {
            assert_eq!(
                identity_in_note(&ids, text).as_deref(),
                Some("phone number"),
                "{text:?}"
            );
        }
        // The longest number, 15 digits, after a 00.
        let longest = [identity(Phone, Raw, "+358 40 123 456 789")];
        assert!(identity_in_note(&longest, "called 00358 40 123 456 789").is_some());
        let national = [identity(Phone, Raw, "040-123 4567")];
        for text in [
            "rang +358 40 123 4567",
            "rang 00358 40 123 4567",
            "rang 0401234567",
        ] {
            assert!(identity_in_note(&national, text).is_some(), "{text:?}");
        }
        // Figures before the national digits are a country code only if 1 to 3 of them.
        for text in [
            "order 04012345678",
            "order 1040123456",
            "invoice 2024401234567",
        ] {
            assert_eq!(identity_in_note(&national, text), None, "{text:?}");
        }
        // Other kinds are found as by identity_in_text.
        let email = [identity(Email, Raw, "maija@example.fi")];
        assert!(identity_in_note(&email, "from <Maija@example.fi>").is_some());
    }

    #[test]
    fn an_operators_text_naming_a_hashed_identity_is_found_by_its_hash() {
        use IdentityEncoding::*;
        use IdentityType::*;
        // MD5 of "password", as the request gave it.
        let pasted = "5f4dcc3b5aa765d61d8327deb882cf99";
        let ids = [
            hashed(Email, Sha256, "maija.meikalainen@example.fi"),
            hashed(Phone, Md5, "+358401234567"),
            hashed(NationalId, Sha1, "131052-308T"),
            hashed(CustomerNumber, Sha256, "C-1001"),
            identity(Other, Md5, pasted),
        ];
        let found = |text: &str| identity_in_text(&ids, text);
        let other = "identity of type OTHER (\"loyalty-card\")";
        let phone_hash = ids[1].value.clone();
        for (text, kind) in [
            ("wrote to <Maija.Meikalainen@Example.fi>.", "e-mail address"),
            ("mailto:maija.meikalainen@example.fi", "e-mail address"),
            ("to=maija.meikalainen@example.fi", "e-mail address"),
            ("rang +358 40 123 4567 - 2 records", "phone number"),
            ("rang 358-40-1234567", "phone number"),
            ("rang +358\u{a0}40\u{a0}123\u{a0}4567", "phone number"),
            ("rang +358 40\u{2013}123 4567", "phone number"),
            ("rang +358/40/1234567", "phone number"),
            ("checked 131052-308t.", "national identification number"),
            ("hetu:131052-308T", "national identification number"),
            ("ref=C-1001", "customer number"),
            ("folders 2019/c-1001", "customer number"),
            ("deleted member 5f4dcc3b5aa765d61d8327deb882cf99", other),
            ("deleted member 5F4DCC3B5AA765D61D8327DEB882CF99.", other),
            ("deleted member password", other),
            (&format!("hash:{phone_hash}"), "phone number"),
        ] {
            assert_eq!(found(text).as_deref(), Some(kind), "{text:?}");
        }
        for text in [
            "wrote to maija@example.fi",
            "rang +358 40 123 4568",
            "shredded folder 2019/14 (12 records)",
            "hetu:131052-308X",
            "ref=C-10012",
            "deleted member 5f4dcc3b5aa765d61d8327deb882cf990",
            "deleted member x5f4dcc3b5aa765d61d8327deb882cf99",
        ] {
            assert_eq!(found(text), None, "{text:?}");
        }
        // A number hashed in national format, written with other separators.
        let national = [hashed(Phone, Sha256, "0401234567")];
        for text in [
            "rang 040\u{2013}123 4567",
            "rang 040/1234567",
            "rang 040\u{a0}123\u{a0}4567",
        ] {
            assert!(identity_in_text(&national, text).is_some(), "{text:?}");
        }
        assert!(identity_in_text(&national, "rang 040/1234568").is_none());
    }

    /// Free text refuses the characters that reorder or hide what a reader sees, naming the
    /// code point, and keeps the joiners a Persian name needs.
    #[test]
    fn free_text_refuses_format_characters_but_the_joiners() {
        for c in [
            '\u{202E}',
            '\u{2067}',
            '\u{200B}',
            '\u{200F}',
            '\u{FEFF}',
            '\u{E0041}',
        ] {
            let v = text_violation("note", &format!("a{c}b"), 64, false).expect("refused");
            assert!(v.rule.contains(&format!("U+{:04X}", u32::from(c))), "{v:?}");
        }
        for text in ["\u{0645}\u{200C}\u{06CC}", "👨\u{200D}👩", "ok ✔\u{FE0F}"] {
            assert_eq!(text_violation("note", text, 64, true), None, "{text}");
        }
    }

    /// Free text refuses a control character other than tab and line breaks naming its code
    /// point, as registry.proto promises: BEL, DEL and NEL (a C1 control) are as invisible as
    /// a format character. The first one of a text is named.
    #[test]
    fn free_text_refuses_control_characters_naming_the_code_point() {
        for (c, named) in [
            ('\u{0007}', "U+0007"),
            ('\u{007F}', "U+007F"),
            ('\u{0085}', "U+0085"),
        ] {
            let v =
                text_violation("note", &format!("a{c}b{c}\u{0001}"), 64, false).expect("refused");
            assert_eq!(v.field, "note");
            assert_eq!(
                v.rule,
                format!(
                    "must not contain control characters (other than tab and line breaks): \
                     found {named}"
                ),
                "{c:?}"
            );
        }
        assert_eq!(text_violation("note", "a\tb\r\nc", 64, true), None);
    }

    /// A byte order mark a CSV export left before an address: accepted, the request
    /// "completed" with every holder answering NOT_FOUND, having erased nothing.
    #[test]
    fn a_raw_value_with_an_invisible_or_format_character_is_refused_naming_it() {
        use IdentityEncoding::Raw;
        use IdentityType::*;
        for (ty, value, named) in [
            (Email, "\u{FEFF}teemu.testaaja@example.fi", "U+FEFF"),
            (Email, "teemu.testaaja@example.fi\u{200B}", "U+200B"),
            (Email, "teemu.test\u{00AD}aaja@example.fi", "U+00AD"),
            (Email, "teemu@exa\u{200D}mple.fi", "U+200D"),
            (CustomerNumber, "C-1001\u{200B}", "U+200B"),
            (CustomerNumber, "\u{2060}C-1001", "U+2060"),
            (NationalId, "131052\u{200E}-308T", "U+200E"),
            (NationalId, "131052-308T\u{202C}", "U+202C"),
            (Phone, "+358 40 123 4567\u{FEFF}", "U+FEFF"),
            (Other, "LC77\u{E0041}", "U+E0041"),
            (Other, "LC\u{FE0F}77", "U+FE0F"),
            (Other, "\u{3164}LC77", "U+3164"),
            // A format character a font may draw, yet no part of an identity.
            (CustomerNumber, "\u{0600}1001", "U+0600"),
            (CustomerNumber, "1001\u{FFF9}", "U+FFF9"),
        ] {
            let v = validate_identities(&[SubjectIdentity {
                label: if ty == Other {
                    "card".into()
                } else {
                    String::new()
                },
                ..ident(ty, Raw, value)
            }]);
            assert_eq!(v.len(), 1, "{value:?}: {v:?}");
            assert_eq!(v[0].field, "identities[0].value", "{value:?}");
            assert_eq!(
                v[0].rule,
                format!(
                    "contains an invisible or format character ({named}), so it would match \
                     no record written without it: remove it"
                ),
                "{value:?}"
            );
        }
        assert!(!is_plausible_email("\u{FEFF}teemu.testaaja@example.fi"));
        assert!(is_plausible_email("teemu.testaaja@example.fi"));
        // Visible letters of other scripts stay, as do a hash's hex digits, whatever value
        // it was computed from.
        for (ty, value) in [
            (CustomerNumber, "CÄ-1001"),
            (Other, "ΟΔΟΣ-7"),
            (Email, "teemu@esimerkki.fi"),
        ] {
            let v = validate_identities(&[SubjectIdentity {
                label: if ty == Other {
                    "card".into()
                } else {
                    String::new()
                },
                ..ident(ty, Raw, value)
            }]);
            assert_eq!(v, [], "{value:?}");
        }
        let hashed = [
            ident(
                Email,
                IdentityEncoding::Sha256,
                &digest(
                    IdentityEncoding::Sha256,
                    "\u{FEFF}teemu.testaaja@example.fi",
                )
                .unwrap(),
            ),
            ident(
                CustomerNumber,
                IdentityEncoding::Md5,
                &digest(IdentityEncoding::Md5, "C-1001\u{200B}").unwrap(),
            ),
        ];
        assert_eq!(validate_identities(&hashed), []);
    }

    /// `{seconds: 2000000000, nanos: 2000000000}` was taken and stored as 999 ms past the
    /// second.
    #[test]
    fn nanos_outside_a_second_are_refused_naming_the_field() {
        use dsrelay_proto::prost_types::Timestamp;
        let at = |nanos| Timestamp {
            seconds: 2_000_000_000,
            nanos,
        };
        for nanos in [0, 999_999_999] {
            assert_eq!(
                instant_violation("effective_at", &at(nanos)),
                None,
                "{nanos}"
            );
        }
        for nanos in [1_000_000_000, 2_000_000_000, -1] {
            let v = instant_violation("effective_at", &at(nanos)).expect("refused");
            assert_eq!(v.field, "effective_at.nanos");
            assert_eq!(v.rule, format!("must be from 0 to 999999999 (got {nanos})"));
        }
        let v = instant_violation("due_at", &Timestamp::default()).expect("refused");
        assert_eq!(v.field, "due_at");
    }

    /// "CÄ1" was found in "customer CÄ1" but not in "customer cä1": only ASCII letters were
    /// compared in any case.
    #[test]
    fn a_value_is_found_in_a_note_in_any_case_beyond_ascii() {
        use IdentityEncoding::Raw;
        use IdentityType::*;
        for (value, text) in [
            ("CÄ1", "customer cä1"),
            ("cä1", "customer CÄ1"),
            ("STRASSE-7", "card straße-7 closed"),
            ("Straße-7", "card STRASSE-7 closed"),
            ("Straße-7", "card STRAẞE-7 closed"),
            ("ΟΔΟΣ-7", "card οδος-7."),
            ("οδοσ-7", "card ΟΔΟΣ-7."),
            ("K-7", "card \u{212A}-7"),
            ("ÉLAN-1", "ref=élan-1"),
        ] {
            let ids = [identity(Other, Raw, value)];
            assert!(
                identity_in_note(&ids, text).is_some(),
                "{value:?} in {text:?}"
            );
            assert!(
                identity_in_text(&ids, text).is_some(),
                "{value:?} in {text:?}"
            );
        }
        // Still whole words only, even where a fold is longer or shorter than its character.
        for (value, text) in [
            ("CÄ1", "customer cä12"),
            ("CÄ1", "customer xcä1"),
            ("S-7", "card ß-7"),
            ("SS-7", "card ßß-7"),
            ("I-7", "card İ-7"),
            ("K-7", "card \u{212A}\u{212A}-7"),
        ] {
            let ids = [identity(Other, Raw, value)];
            assert_eq!(identity_in_note(&ids, text), None, "{value:?} in {text:?}");
        }
        // Characters whose folds differ in length from them, all around: no panic, no match
        // off by bytes.
        let ids = [
            identity(CustomerNumber, Raw, "İ1"),
            identity(Other, Raw, "\u{1E9E}\u{212A}"),
        ];
        let text = "İİ1 ﬁİ \u{212A}ß ẞİ\u{130} ΐ";
        assert_eq!(identity_in_note(&ids, text), None);
        assert!(identity_in_note(&ids, "ﬁ İ1 ß").is_some());
        assert!(identity_in_note(&ids[1..], "x ssk y").is_some());
    }
}
