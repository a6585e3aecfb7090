//! What a deletion certificate's body must be, as `proto/dsrelay/v1/certificate.proto`
//! defines it: exactly the keys of its version, each of its type and range.
//!
//! A signed body is checked against these rules before anything says what it certifies
//! (`dsrctl certificate verify` does). The signature alone does not make a body a
//! certificate: a processor's key may sign other documents too (the development setup signs
//! the processor's audit checkpoints with it), and a body of a version this code does not
//! know cannot be read as one it does.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The body versions this code knows: 1 (an erasure, or a contract end from a processor
/// that predates version 2) and 2 (a contract end, with its terms).
const VERSIONS: [u64; 2] = [1, 2];

/// `body` read as a deletion certificate into the caller's type `T` (the processor's
/// `CertificateBody`, or `serde_json::Value`), or the first way it is not one (naming the
/// key and what certificate.proto allows there, and quoting the value found there).
pub fn check<T: DeserializeOwned>(body: &Value) -> Result<T, String> {
    checked(body, true)
}

/// [`check`], but its message quotes none of the body's text: it names keys only as
/// certificate.proto spells them (a key it does not define is not named), item indices, and
/// what is allowed, never a value found. For a reason kept long after the check, such as the
/// registry's rejection of a certificate (kept until its request is forgotten, and in the
/// audit trail for ever), which must not carry personal data a body may hold.
pub fn check_quoting_nothing<T: DeserializeOwned>(body: &Value) -> Result<T, String> {
    checked(body, false)
}

/// [`check`] (`quote`: messages quote the values found) or [`check_quoting_nothing`].
fn checked<T: DeserializeOwned>(body: &Value, quote: bool) -> Result<T, String> {
    if !body.is_object() {
        return Err("the body is not a JSON object".into());
    }
    let version = match body.get("version") {
        None => return Err("the body has no version".into()),
        Some(v) => v
            .as_u64()
            .filter(|v| VERSIONS.contains(v))
            .ok_or_else(|| match quote {
                true => format!("its version is {v}, not 1 or 2"),
                false => "its version is not 1 or 2".to_string(),
            })?,
    };
    let mut required = KEYS.body.required.to_vec();
    let mut optional = KEYS.body.optional.to_vec();
    if version == 2 {
        required.extend(KEYS.body_v2.required);
        optional.extend(KEYS.body_v2.optional);
    }
    let top = Place::top(body, &required, &optional, version, quote)?;
    let kind = top.one_of("kind", &["erasure", "contract_end"])?;
    if version == 2 && kind != "contract_end" {
        return Err(format!(
            "its version is 2, which only a contract_end certificate has, but its kind is \
             {kind:?}"
        ));
    }
    top.uuid("certificate_id")?;
    for key in ["processor", "controller", "request_id", "subprocessor"] {
        top.name(key)?;
    }
    top.one_of("task_state", &["COMPLETED", "RETAINED"])?;
    top.count("records_affected")?;
    for (i, item) in top.array("erased")?.iter().enumerate() {
        let e = top.item("erased", i, item, &KEYS.erased)?;
        // Strings, possibly empty: the processor signs an adapter's BulkErasedCount as the
        // adapter answered it (clipped, never refused), and proto3 sends an unset target or
        // action as "", so every processor since the adapter connector's ExecuteBulk signs
        // such an entry when an adapter leaves one out.
        e.text("target")?;
        e.text("action")?;
        e.count("count")?;
    }
    for (i, item) in top.array("retained")?.iter().enumerate() {
        let r = top.item("retained", i, item, &KEYS.retained)?;
        r.name("subprocessor")?;
        r.text("legal_basis")?;
        r.until("until")?;
    }
    if let Some(u) = top.child("uncounted", &KEYS.uncounted)? {
        u.text("reason")?;
        for key in ["records", "subjects", "earlier_records", "earlier_subjects"] {
            u.count_if_present(key)?;
        }
    }
    if top.map.contains_key("follows") {
        top.uuid("follows")?;
    }
    top.time("completed_at")?;
    top.time("issued_at")?;
    if let Some(end) = top.child("contract_end", &KEYS.contract_end)? {
        contract_end(&end)?;
    }
    serde_json::from_value(body.clone()).map_err(|e| match quote {
        true => format!("it cannot be read: {e}"),
        // serde's words may quote the value it could not read.
        false => "it cannot be read as the caller's certificate type".to_string(),
    })
}

/// Checks a version 2 body's `contract_end` object.
fn contract_end(end: &Place<'_>) -> Result<(), String> {
    let choice = end.one_of("choice", &["NONE", "DELETE", "RETURN_THEN_DELETE"])?;
    end.time("effective_at")?;
    end.time("grace_ends_at")?;
    let returned = end.child("returned", &KEYS.returned)?;
    let Some(returned) = returned else {
        if choice == "RETURN_THEN_DELETE" {
            return Err("its contract_end has no returned, which RETURN_THEN_DELETE has".into());
        }
        return Ok(());
    };
    if choice != "RETURN_THEN_DELETE" {
        return Err(format!(
            "its contract_end has returned, which only RETURN_THEN_DELETE has, not {choice:?}"
        ));
    }
    match returned.one_of("to", &["registry", "recipient"])? {
        "recipient" => {
            returned.name("recipient")?;
        }
        _ if returned.map.contains_key("recipient") => {
            return Err(
                "its contract_end.returned names a recipient, though it went to the registry"
                    .into(),
            );
        }
        _ => {}
    }
    if let Some(part) = returned.child("part", &KEYS.part)? {
        let digest = part.text("manifest_sha256")?;
        if digest.len() != 64
            || !digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(format!(
                "its {} is not 64 lowercase hex digits",
                part.field("manifest_sha256")
            ));
        }
        part.count("files")?;
        part.count("bytes")?;
        if part.map.contains_key("delivered_at") {
            part.time("delivered_at")?;
        }
    }
    let confirmation = returned
        .child("confirmation", &KEYS.confirmation)?
        .ok_or("its contract_end.returned has no confirmation")?;
    let state = confirmation.one_of("state", &["CONFIRMED", "GRACE_PERIOD_ENDED"])?;
    match confirmation.map.contains_key("at") {
        true => {
            confirmation.time("at")?;
        }
        false if state == "GRACE_PERIOD_ENDED" => {
            return Err(format!(
                "its {} is missing, which GRACE_PERIOD_ENDED has (the grace end)",
                confirmation.field("at")
            ));
        }
        false => {}
    }
    Ok(())
}

/// One JSON object of the body, its keys checked, and where it is (for messages).
struct Place<'a> {
    /// The object's keys.
    map: &'a Map<String, Value>,
    /// Its path from the body (`contract_end.returned`); empty for the body itself.
    path: String,
    /// Whether messages quote the values found ([`check`]) or not ([`check_quoting_nothing`]).
    quote: bool,
}

impl<'a> Place<'a> {
    /// The body itself: an object with every key of `required` and none but those and
    /// `optional`, as a body of `version` has them.
    fn top(
        body: &'a Value,
        required: &[&str],
        optional: &[&str],
        version: u64,
        quote: bool,
    ) -> Result<Self, String> {
        let map = body.as_object().ok_or("the body is not a JSON object")?;
        for key in required {
            if !map.contains_key(*key) {
                return Err(format!("the body has no {key}"));
            }
        }
        if let Some(key) = unknown(map, required, optional) {
            return Err(match key {
                "contract_end" => {
                    "the body has contract_end, which only a version 2 body has, but its \
                     version is 1"
                        .to_string()
                }
                key => format!(
                    "the body has {}, which a version {version} certificate does not have",
                    key_named(key, quote)
                ),
            });
        }
        Ok(Self {
            map,
            path: String::new(),
            quote,
        })
    }

    /// The name a message gives `key` of this object.
    fn field(&self, key: &str) -> String {
        match self.path.as_str() {
            "" => key.to_string(),
            path => format!("{path}.{key}"),
        }
    }

    /// The object under `key` with the keys `keys` allows, or `None` when `key` is absent.
    fn child(&self, key: &str, keys: &Keys) -> Result<Option<Place<'a>>, String> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => Place::nested(self.field(key), v, keys, self.quote).map(Some),
        }
    }

    /// Item `i` of the array under `key`: an object with the keys `keys` allows.
    fn item(
        &self,
        key: &str,
        i: usize,
        value: &'a Value,
        keys: &Keys,
    ) -> Result<Place<'a>, String> {
        Place::nested(format!("{}[{i}]", self.field(key)), value, keys, self.quote)
    }

    fn nested(
        path: String,
        value: &'a Value,
        keys: &Keys,
        quote: bool,
    ) -> Result<Place<'a>, String> {
        let map = value
            .as_object()
            .ok_or_else(|| format!("its {path} is not an object"))?;
        for key in keys.required {
            if !map.contains_key(*key) {
                return Err(format!("its {path} has no {key}"));
            }
        }
        if let Some(key) = unknown(map, keys.required, keys.optional) {
            return Err(format!(
                "its {path} has {}, which certificate.proto does not define there",
                key_named(key, quote)
            ));
        }
        Ok(Place { map, path, quote })
    }

    /// The value of a key this object is known to hold, or `null` for an optional one.
    fn value(&self, key: &str) -> &'a Value {
        self.map.get(key).unwrap_or(&Value::Null)
    }

    /// The string under `key`.
    fn text(&self, key: &str) -> Result<&'a str, String> {
        self.value(key)
            .as_str()
            .ok_or_else(|| format!("its {} is not a string", self.field(key)))
    }

    /// The string under `key`, which must not be empty.
    fn name(&self, key: &str) -> Result<&'a str, String> {
        match self.text(key)? {
            "" => Err(format!("its {} is empty", self.field(key))),
            text => Ok(text),
        }
    }

    /// The string under `key`, one of `allowed`.
    fn one_of(&self, key: &str, allowed: &[&str]) -> Result<&'a str, String> {
        let text = self.text(key)?;
        if allowed.contains(&text) {
            return Ok(text);
        }
        let allowed: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
        Err(format!(
            "its {} is {}not {}",
            self.field(key),
            self.found(&format!("{text:?}")),
            allowed.join(" or ")
        ))
    }

    /// The id under `key`: a UUID in its hyphenated lowercase form, as the processor writes
    /// one.
    fn uuid(&self, key: &str) -> Result<(), String> {
        let text = self.text(key)?;
        match uuid::Uuid::try_parse(text) {
            Ok(id) if id.hyphenated().to_string() == text => Ok(()),
            _ => Err(format!(
                "its {} is {}not a UUID (lowercase, with hyphens)",
                self.field(key),
                self.found(&format!("{text:?}"))
            )),
        }
    }

    /// The array under `key`.
    fn array(&self, key: &str) -> Result<&'a Vec<Value>, String> {
        self.value(key)
            .as_array()
            .ok_or_else(|| format!("its {} is not an array", self.field(key)))
    }

    /// The count under `key`: an integer of at least 0.
    fn count(&self, key: &str) -> Result<u64, String> {
        let value = self.value(key);
        value.as_u64().ok_or_else(|| {
            format!(
                "its {} is {}not an integer of at least 0",
                self.field(key),
                self.found(&value.to_string())
            )
        })
    }

    /// [`Place::count`] of an optional key.
    fn count_if_present(&self, key: &str) -> Result<(), String> {
        match self.map.contains_key(key) {
            true => self.count(key).map(|_| ()),
            false => Ok(()),
        }
    }

    /// The time under `key`, in the form certificate.proto gives: RFC 3339 in UTC with
    /// milliseconds, `2025-01-01T00:00:00.000Z`.
    fn time(&self, key: &str) -> Result<(), String> {
        let text = self.text(key)?;
        match DateTime::parse_from_rfc3339(text) {
            Ok(t)
                if t.with_timezone(&Utc)
                    .to_rfc3339_opts(SecondsFormat::Millis, true)
                    == text =>
            {
                Ok(())
            }
            _ => Err(format!(
                "its {} is {}not a UTC time of the form 2025-01-01T00:00:00.000Z",
                self.field(key),
                self.found(&format!("{text:?}"))
            )),
        }
    }

    /// A `retained` item's `until`: a [`Place::time`], or what the processor's `rfc3339`
    /// writes for an instant outside the years 0000 to 9999 (a signed year of more digits,
    /// `+10000-01-01T00:00:00.000Z`) or beyond chrono's range (`""`). Processors from the
    /// first certificates until the adapter connector refused an adapter's RETAINED date
    /// outside the years 2000 to 9999 kept any date the adapter gave (a "forever" such as the
    /// largest Timestamp included) and signed it in those forms in `retained`.
    fn until(&self, key: &str) -> Result<(), String> {
        let Err(e) = self.time(key) else {
            return Ok(());
        };
        let text = self.text(key)?;
        let far = (text.starts_with('+') || text.starts_with('-'))
            && text
                .parse::<DateTime<Utc>>()
                .is_ok_and(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true) == text);
        match text.is_empty() || far {
            true => Ok(()),
            false => Err(e),
        }
    }

    /// `found` and a comma, for a message saying what a key holds when [`Place::quote`]; else
    /// nothing.
    fn found(&self, found: &str) -> String {
        match self.quote {
            true => format!("{found}, "),
            false => String::new(),
        }
    }
}

/// The keys of one place of a body: those it must have, and those it may have.
struct Keys {
    required: &'static [&'static str],
    optional: &'static [&'static str],
}

/// The keys of every place of a body, as certificate.proto defines them.
struct BodyKeys {
    /// The body itself, of either version.
    body: Keys,
    /// What a version 2 body has besides [`BodyKeys::body`]'s.
    body_v2: Keys,
    /// Each item of `erased`.
    erased: Keys,
    /// Each item of `retained`.
    retained: Keys,
    uncounted: Keys,
    contract_end: Keys,
    /// `contract_end.returned`.
    returned: Keys,
    /// `contract_end.returned.part`.
    part: Keys,
    /// `contract_end.returned.confirmation`.
    confirmation: Keys,
}

impl BodyKeys {
    /// Every place's keys. The pattern names every field, so a place added to
    /// [`BodyKeys`] does not compile until it is listed here too.
    fn places(&self) -> [&Keys; 9] {
        let BodyKeys {
            body,
            body_v2,
            erased,
            retained,
            uncounted,
            contract_end,
            returned,
            part,
            confirmation,
        } = self;
        [
            body,
            body_v2,
            erased,
            retained,
            uncounted,
            contract_end,
            returned,
            part,
            confirmation,
        ]
    }
}

const KEYS: BodyKeys = BodyKeys {
    body: Keys {
        required: &[
            "version",
            "certificate_id",
            "kind",
            "processor",
            "controller",
            "request_id",
            "subprocessor",
            "task_state",
            "records_affected",
            "erased",
            "retained",
            "completed_at",
            "issued_at",
        ],
        optional: &["uncounted", "follows"],
    },
    body_v2: Keys {
        required: &["contract_end"],
        optional: &[],
    },
    erased: Keys {
        required: &["target", "action", "count"],
        optional: &[],
    },
    retained: Keys {
        required: &["subprocessor", "legal_basis", "until"],
        optional: &[],
    },
    uncounted: Keys {
        required: &["reason", "records", "subjects"],
        optional: &["earlier_records", "earlier_subjects"],
    },
    contract_end: Keys {
        required: &["choice", "effective_at", "grace_ends_at"],
        optional: &["returned"],
    },
    returned: Keys {
        required: &["to", "confirmation"],
        optional: &["recipient", "part"],
    },
    part: Keys {
        required: &["manifest_sha256", "files", "bytes"],
        optional: &["delivered_at"],
    },
    confirmation: Keys {
        required: &["state"],
        optional: &["at"],
    },
};

/// Whether certificate.proto defines `key` at any place of a body: a message may name such
/// a key even when it quotes nothing of the body, as it is certificate.proto's word.
fn defined(key: &str) -> bool {
    KEYS.places()
        .iter()
        .any(|p| p.required.contains(&key) || p.optional.contains(&key))
}

/// How a message names a key a place does not allow: quoted when `quote`, or when
/// certificate.proto defines it elsewhere; otherwise not at all (its name is the body's
/// text, which may be anything).
fn key_named(key: &str, quote: bool) -> String {
    match quote || defined(key) {
        true => format!("the key {key:?}"),
        false => "a key not named here (its name is the body's text)".to_string(),
    }
}

/// The first key of `map` that is neither in `required` nor in `optional`.
fn unknown<'m>(
    map: &'m Map<String, Value>,
    required: &[&str],
    optional: &[&str],
) -> Option<&'m str> {
    map.keys()
        .map(String::as_str)
        .find(|k| !required.contains(k) && !optional.contains(k))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    /// What these tests read of a checked body.
    #[derive(Debug, Deserialize)]
    struct Read {
        version: u64,
        contract_end: Option<Terms>,
    }

    #[derive(Debug, Deserialize)]
    struct Terms {
        choice: String,
    }

    fn check(body: &Value) -> Result<Read, String> {
        super::check(body)
    }

    fn erasure() -> Value {
        json!({
            "version": 1,
            "certificate_id": "0193a1f0-7c3e-7d5a-9b1e-2f4c6a8e0b12",
            "kind": "erasure",
            "processor": "spiffe://dsrelay.test/processor/p",
            "controller": "acme",
            "request_id": "r-1",
            "subprocessor": "accounting",
            "task_state": "RETAINED",
            "records_affected": 3,
            "erased": [{"target": "contacts", "action": "deleted", "count": 2}],
            "retained": [{"subprocessor": "accounting", "legal_basis": "Kirjanpitolaki 2:10 §",
                "until": "2031-01-01T00:00:00.000Z"}],
            "uncounted": {"reason": "cut off", "records": 0, "subjects": 0,
                "earlier_records": 4},
            "follows": "0193a1f0-7c3e-7d5a-9b1e-2f4c6a8e0b11",
            "completed_at": "2025-01-01T00:00:00.000Z",
            "issued_at": "2025-01-01T00:00:00.001Z",
        })
    }

    fn contract_end() -> Value {
        let mut body = erasure();
        body["version"] = json!(2);
        body["kind"] = json!("contract_end");
        body["task_state"] = json!("COMPLETED");
        body["contract_end"] = json!({
            "choice": "RETURN_THEN_DELETE",
            "effective_at": "2026-01-01T00:00:00.000Z",
            "grace_ends_at": "2026-02-01T00:00:00.000Z",
            "returned": {"to": "recipient", "recipient": "archive-oy",
                "part": {"manifest_sha256": "ab".repeat(32), "files": 2, "bytes": 150,
                    "delivered_at": "2026-01-02T00:00:00.000Z"},
                "confirmation": {"state": "GRACE_PERIOD_ENDED",
                    "at": "2026-02-01T00:00:00.000Z"}},
        });
        body
    }

    fn refused(body: Value) -> String {
        check(&body).expect_err("not a certificate")
    }

    #[test]
    fn a_body_of_each_version_as_the_processor_writes_it_is_a_certificate() {
        assert_eq!(check(&erasure()).expect("version 1").version, 1);
        let end = check(&contract_end()).expect("version 2");
        assert_eq!(
            end.contract_end.expect("terms").choice,
            "RETURN_THEN_DELETE"
        );
        let mut older = erasure();
        older["kind"] = json!("contract_end");
        check(&older).expect("a contract end of version 1");
        let mut delete = contract_end();
        delete["contract_end"] = json!({"choice": "DELETE",
            "effective_at": "2026-01-01T00:00:00.000Z",
            "grace_ends_at": "2026-02-01T00:00:00.000Z"});
        check(&delete).expect("a DELETE states no return");
    }

    #[test]
    fn a_body_outside_certificate_proto_is_refused_naming_what_is_wrong() {
        let checkpoint = json!({"at": "2026-01-01T00:00:00.000Z", "hash": "ab", "seq": 27,
            "service": "processor"});
        assert_eq!(refused(checkpoint), "the body has no version");
        let with = |key: &str, value: Value| {
            let mut body = erasure();
            body[key] = value;
            refused(body)
        };
        let without = |key: &str| {
            let mut body = erasure();
            body.as_object_mut().unwrap().remove(key);
            refused(body)
        };
        assert_eq!(with("version", json!(3)), "its version is 3, not 1 or 2");
        assert_eq!(
            with("task_state", json!("NOT_FOUND")),
            r#"its task_state is "NOT_FOUND", not "COMPLETED" or "RETAINED""#
        );
        assert_eq!(
            with("records_affected", json!(-7)),
            "its records_affected is -7, not an integer of at least 0"
        );
        assert_eq!(without("kind"), "the body has no kind");
        let mut first = erasure();
        first.as_object_mut().unwrap().remove("follows");
        check(&first).expect("a first certificate follows none");
        assert_eq!(
            with("seq", json!(1)),
            r#"the body has the key "seq", which a version 1 certificate does not have"#
        );
        assert!(with("completed_at", json!("2025-01-01T00:00:00Z")).contains("completed_at"));
        assert!(with("completed_at", json!("2025-01-01T02:00:00.000+02:00")).contains("UTC"));
        assert!(with("certificate_id", json!("c1")).contains("not a UUID"));
        assert!(with("kind", json!("export")).contains(r#"its kind is "export""#));
        assert!(with(
            "erased",
            json!([{"target": "t", "action": "deleted", "count": -1}])
        )
        .starts_with("its erased[0].count is -1"));
        assert!(with(
            "retained",
            json!([{"subprocessor": "s", "legal_basis": "b"}])
        )
        .contains("its retained[0] has no until"));
        assert!(with("contract_end", json!({})).contains("only a version 2 body"));
        let mut v2_erasure = contract_end();
        v2_erasure["kind"] = json!("erasure");
        assert!(refused(v2_erasure).contains("only a contract_end certificate"));
        let mut v2_without = contract_end();
        v2_without.as_object_mut().unwrap().remove("contract_end");
        assert_eq!(refused(v2_without), "the body has no contract_end");
        let mut odd = contract_end();
        odd["contract_end"]["returned"]["confirmation"]["state"] = json!("MAYBE");
        assert!(refused(odd).contains("contract_end.returned.confirmation.state"));
        let mut extra = contract_end();
        extra["contract_end"]["returned"]["part"]["note"] = json!("x");
        assert!(refused(extra).contains(r#"contract_end.returned.part has the key "note""#));
        assert_eq!(refused(json!([1])), "the body is not a JSON object");
    }

    /// Shapes older processors signed that the rules above would otherwise refuse: an
    /// adapter's erased count without a target or action (proto3's ""), and a `retained`
    /// date an adapter gave beyond the years 0000 to 9999 or beyond chrono's range, which the
    /// processor's `rfc3339` wrote with a signed year or as "". Each is still a certificate;
    /// the same forms elsewhere are not.
    #[test]
    fn shapes_older_processors_signed_are_certificates() {
        let mut unnamed = erasure();
        unnamed["erased"] = json!([{"target": "", "action": "", "count": 5}]);
        check(&unnamed).expect("an adapter's count without target or action");
        // What processors before the adapter's date rule wrote for these `until`s.
        let far = |ms: i64| {
            chrono::TimeZone::timestamp_millis_opt(&Utc, ms)
                .single()
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
                .unwrap_or_default()
        };
        let beyond = far(253_402_300_800_000);
        assert_eq!(beyond, "+10000-01-01T00:00:00.000Z");
        assert_eq!(far(i64::MAX), "");
        for until in [beyond.as_str(), "", "-0001-01-01T00:00:00.000Z"] {
            let mut forever = erasure();
            forever["retained"][0]["until"] = json!(until);
            check(&forever).unwrap_or_else(|e| panic!("{until:?}: {e}"));
        }
        for until in [
            "+10000-01-01T00:00:00Z",
            "+2025-01-01T00:00:00.000Z",
            "soon",
        ] {
            let mut odd = erasure();
            odd["retained"][0]["until"] = json!(until);
            assert!(refused(odd).contains("retained[0].until"), "{until}");
        }
        let mut issued = erasure();
        issued["issued_at"] = json!("");
        assert!(refused(issued).contains("its issued_at"));
        let mut unnamed_place = erasure();
        unnamed_place["retained"][0]["subprocessor"] = json!("");
        assert_eq!(
            refused(unnamed_place),
            "its retained[0].subprocessor is empty"
        );
    }

    /// The message of [`check_quoting_nothing`] names the key and the rule as [`check`]'s
    /// does, but no value found in the body, nor a key name certificate.proto does not
    /// define.
    #[test]
    fn a_message_quoting_nothing_names_the_key_and_the_rule_only() {
        const TEXT: &str = "jane.doe@example.org";
        let quiet = |body: Value| {
            let e = check_quoting_nothing::<Value>(&body).expect_err("not a certificate");
            assert!(!e.contains("jane"), "{e}");
            e
        };
        let with = |key: &str, value: Value| {
            let mut body = erasure();
            body[key] = value;
            quiet(body)
        };
        assert_eq!(with("version", json!(TEXT)), "its version is not 1 or 2");
        assert_eq!(
            with("task_state", json!(TEXT)),
            r#"its task_state is not "COMPLETED" or "RETAINED""#
        );
        assert_eq!(
            with("records_affected", json!(-7)),
            "its records_affected is not an integer of at least 0"
        );
        assert_eq!(
            with("certificate_id", json!(TEXT)),
            "its certificate_id is not a UUID (lowercase, with hyphens)"
        );
        assert_eq!(
            with("issued_at", json!(TEXT)),
            "its issued_at is not a UTC time of the form 2025-01-01T00:00:00.000Z"
        );
        assert_eq!(
            with(TEXT, json!(1)),
            "the body has a key not named here (its name is the body's text), which a \
             version 1 certificate does not have"
        );
        assert_eq!(
            with("records", json!(1)),
            r#"the body has the key "records", which a version 1 certificate does not have"#
        );
        let mut nested = erasure();
        nested["erased"][0][TEXT] = json!(1);
        assert_eq!(
            quiet(nested),
            "its erased[0] has a key not named here (its name is the body's text), which \
             certificate.proto does not define there"
        );
        let mut end = contract_end();
        end["contract_end"]["choice"] = json!(TEXT);
        assert!(quiet(end).starts_with("its contract_end.choice is not \"NONE\""));
        check_quoting_nothing::<Read>(&erasure()).expect("a certificate");
    }

    /// Every key the checks allow at some place is one a message quoting nothing names, and
    /// certificate.proto's description of the body names it; a key no place allows is not
    /// named. Each place lists a key once, as required or optional, not both.
    #[test]
    fn the_keys_a_message_names_are_those_of_the_places() {
        let proto = include_str!("../../../proto/dsrelay/v1/certificate.proto");
        // The key as a word of the proto's text, not part of a longer name.
        let described = |key: &str| {
            let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
            proto.match_indices(key).any(|(at, _)| {
                !proto[..at].ends_with(word) && !proto[at + key.len()..].starts_with(word)
            })
        };
        for place in KEYS.places() {
            let keys: Vec<&str> = place
                .required
                .iter()
                .chain(place.optional)
                .copied()
                .collect();
            for (i, key) in keys.iter().enumerate() {
                assert!(!keys[..i].contains(key), "{key} twice in one place");
                assert!(defined(key), "{key}");
                assert_eq!(key_named(key, false), format!("the key {key:?}"));
                assert!(described(key), "certificate.proto does not describe {key}");
            }
        }
        for key in ["seq", "hash", "note", "jane.doe@example.org", "", "Version"] {
            assert!(!defined(key), "{key}");
            assert_eq!(
                key_named(key, false),
                "a key not named here (its name is the body's text)"
            );
        }
    }
}
