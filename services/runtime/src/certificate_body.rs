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
/// key and what certificate.proto allows there).
pub fn check<T: DeserializeOwned>(body: &Value) -> Result<T, String> {
    if !body.is_object() {
        return Err("the body is not a JSON object".into());
    }
    let version = match body.get("version") {
        None => return Err("the body has no version".into()),
        Some(v) => v
            .as_u64()
            .filter(|v| VERSIONS.contains(v))
            .ok_or_else(|| format!("its version is {v}, not 1 or 2"))?,
    };
    let mut required = vec![
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
    ];
    if version == 2 {
        required.push("contract_end");
    }
    let top = Place::top(body, &required, &["uncounted", "follows"], version)?;
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
        let e = top.item("erased", i, item, &["target", "action", "count"], &[])?;
        e.name("target")?;
        e.name("action")?;
        e.count("count")?;
    }
    for (i, item) in top.array("retained")?.iter().enumerate() {
        let r = top.item(
            "retained",
            i,
            item,
            &["subprocessor", "legal_basis", "until"],
            &[],
        )?;
        r.name("subprocessor")?;
        r.text("legal_basis")?;
        r.time("until")?;
    }
    if let Some(u) = top.child(
        "uncounted",
        &["reason", "records", "subjects"],
        &["earlier_records", "earlier_subjects"],
    )? {
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
    if let Some(end) = top.child(
        "contract_end",
        &["choice", "effective_at", "grace_ends_at"],
        &["returned"],
    )? {
        contract_end(&end)?;
    }
    serde_json::from_value(body.clone()).map_err(|e| format!("it cannot be read: {e}"))
}

/// Checks a version 2 body's `contract_end` object.
fn contract_end(end: &Place<'_>) -> Result<(), String> {
    let choice = end.one_of("choice", &["NONE", "DELETE", "RETURN_THEN_DELETE"])?;
    end.time("effective_at")?;
    end.time("grace_ends_at")?;
    let returned = end.child("returned", &["to", "confirmation"], &["recipient", "part"])?;
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
    if let Some(part) = returned.child(
        "part",
        &["manifest_sha256", "files", "bytes"],
        &["delivered_at"],
    )? {
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
        .child("confirmation", &["state"], &["at"])?
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
}

impl<'a> Place<'a> {
    /// The body itself: an object with every key of `required` and none but those and
    /// `optional`, as a body of `version` has them.
    fn top(
        body: &'a Value,
        required: &[&str],
        optional: &[&str],
        version: u64,
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
                    "the body has the key {key:?}, which a version {version} certificate \
                     does not have"
                ),
            });
        }
        Ok(Self {
            map,
            path: String::new(),
        })
    }

    /// The name a message gives `key` of this object.
    fn field(&self, key: &str) -> String {
        match self.path.as_str() {
            "" => key.to_string(),
            path => format!("{path}.{key}"),
        }
    }

    /// The object under `key` with exactly these keys, or `None` when `key` is absent.
    fn child(
        &self,
        key: &str,
        required: &[&str],
        optional: &[&str],
    ) -> Result<Option<Place<'a>>, String> {
        match self.map.get(key) {
            None => Ok(None),
            Some(v) => Place::nested(self.field(key), v, required, optional).map(Some),
        }
    }

    /// Item `i` of the array under `key`: an object with exactly these keys.
    fn item(
        &self,
        key: &str,
        i: usize,
        value: &'a Value,
        required: &[&str],
        optional: &[&str],
    ) -> Result<Place<'a>, String> {
        Place::nested(
            format!("{}[{i}]", self.field(key)),
            value,
            required,
            optional,
        )
    }

    fn nested(
        path: String,
        value: &'a Value,
        required: &[&str],
        optional: &[&str],
    ) -> Result<Place<'a>, String> {
        let map = value
            .as_object()
            .ok_or_else(|| format!("its {path} is not an object"))?;
        for key in required {
            if !map.contains_key(*key) {
                return Err(format!("its {path} has no {key}"));
            }
        }
        if let Some(key) = unknown(map, required, optional) {
            return Err(format!(
                "its {path} has the key {key:?}, which certificate.proto does not define there"
            ));
        }
        Ok(Place { map, path })
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
            "its {} is {text:?}, not {}",
            self.field(key),
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
                "its {} is {text:?}, not a UUID (lowercase, with hyphens)",
                self.field(key)
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
                "its {} is {value}, not an integer of at least 0",
                self.field(key)
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
                "its {} is {text:?}, not a UTC time of the form 2025-01-01T00:00:00.000Z",
                self.field(key)
            )),
        }
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
}
