//! `dsrctl certificate get`, `list` and `verify`: deletion certificates.
//!
//! `get` fetches a request's certificate from the registry and writes it as a file
//! ([`Signed::to_file_json`]: `body`, the signed canonical JSON as text; `signature`,
//! base64; `key_id`). `list` shows every certificate of a request, so that an earlier one a
//! follow-up names can be fetched by its id. `verify` checks such a file offline against
//! the processor's public key, and that its body is a deletion certificate
//! ([`dsrelay_runtime::certificate_body`]), and prints what it certifies.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Context};
use dsrelay_processor::certificates::{CertificateBody, ContractEndFacts};
use dsrelay_proto::v1::StoredCertificate;
use dsrelay_runtime::certificate_body;
use dsrelay_runtime::signing::{PublicKey, Signed};

use serde::Serialize;

use crate::cli::{CertificateGetArgs, CertificateListArgs, CertificateVerifyArgs, OutputFormat};
use crate::commands::{Io, Registry};
use crate::output::{emit, retention_words, Render};
use crate::table::Table;
use crate::Failure;

/// Fetches the certificate `--certificate-id` names, or else the latest of one task of the
/// request, and writes it to `--out`. Refuses (exit 1, no file) one the registry rejected:
/// it certifies nothing.
pub(crate) async fn get(
    registry: &Registry,
    args: &CertificateGetArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let list = fetch(registry, &args.id, &args.processor, &args.subprocessor).await?;
    let stored = match &args.certificate_id {
        Some(wanted) => named(&list, wanted)?,
        None => only_task_latest(&list)?,
    };
    if !stored.verified {
        let which = match stored.certificate_id.as_str() {
            // Its id went with its body when the request was forgotten, or it had none.
            "" => "a certificate".to_string(),
            id => format!("the certificate {id}"),
        };
        return Err(Failure::Certificate(anyhow!(
            "the registry rejected {which} of {}/{}: {}; it certifies nothing",
            stored.processor,
            stored.subprocessor,
            stored.rejection
        )));
    }
    let c = stored.certificate.clone().unwrap_or_default();
    let doc = Signed {
        body: c.body,
        signature: c.signature,
        key_id: c.key_id,
    };
    let text = doc.to_file_json().map_err(Failure::Certificate)?;
    std::fs::write(&args.out, text)
        .with_context(|| format!("writing {}", args.out.display()))
        .map_err(Failure::Certificate)?;
    let summary = serde_json::json!({
        "certificate_id": stored.certificate_id,
        "processor": stored.processor,
        "subprocessor": stored.subprocessor,
        "verified_by_registry": stored.verified,
        "key_id": doc.key_id,
        "file": args.out.display().to_string(),
    });
    match io.format {
        OutputFormat::Json => writeln!(io.out, "{summary}")?,
        OutputFormat::Table => writeln!(
            io.out,
            "certificate {} of {}/{} (verified by the registry, key {}) written to {}",
            stored.certificate_id,
            stored.processor,
            stored.subprocessor,
            doc.key_id,
            args.out.display()
        )?,
    }
    Ok(0)
}

/// The request's certificates the registry lists, narrowed as the flags say.
async fn fetch(
    registry: &Registry,
    request_id: &str,
    processor: &Option<String>,
    subprocessor: &Option<String>,
) -> Result<Vec<StoredCertificate>, Failure> {
    registry
        .client
        .list_certificates(
            request_id,
            processor.clone().unwrap_or_default(),
            subprocessor.clone().unwrap_or_default(),
        )
        .await
        .map_err(|s| registry.failed(s))
}

/// The certificate of `list` whose id is `wanted`.
fn named<'a>(
    list: &'a [StoredCertificate],
    wanted: &str,
) -> Result<&'a StoredCertificate, Failure> {
    if wanted.is_empty() {
        return Err(Failure::Usage(
            "--certificate-id is empty; `dsrctl certificate list` shows the ids".into(),
        ));
    }
    list.iter()
        .find(|c| c.certificate_id == wanted)
        .ok_or_else(|| {
            Failure::Usage(format!(
                "no certificate {wanted} among the {} the registry listed for this request \
                 (and --processor/--subprocessor); `dsrctl certificate list` shows their ids",
                list.len()
            ))
        })
}

/// The latest certificate of the one task `list` holds certificates of.
fn only_task_latest(list: &[StoredCertificate]) -> Result<&StoredCertificate, Failure> {
    let tasks: BTreeSet<(&str, &str)> = list
        .iter()
        .map(|c| (c.processor.as_str(), c.subprocessor.as_str()))
        .collect();
    if tasks.len() > 1 {
        let names: Vec<String> = tasks.iter().map(|(p, s)| format!("{p}/{s}")).collect();
        return Err(Failure::Usage(format!(
            "certificates of {} tasks match ({}); name one with --processor and --subprocessor",
            tasks.len(),
            names.join(", ")
        )));
    }
    latest(list).ok_or_else(|| Failure::Certificate(anyhow!("the registry sent no certificate")))
}

/// One row of `certificate list`: the registry's record of a certificate and what its body
/// says of its place in the task's sequence (read from the body as stored, unchecked).
#[derive(Debug, Serialize)]
struct ListedCertificate {
    certificate_id: String,
    processor: String,
    subprocessor: String,
    /// The body's `task_state`; empty when the body cannot be read (or was removed).
    task_state: String,
    /// The body's `follows`: the certificate this one follows up; empty on a task's first.
    follows: String,
    /// The body's `issued_at`.
    issued_at: String,
    verified_by_registry: bool,
    /// Why the registry rejected it; empty when it did not.
    rejection: String,
}

/// The rows of `certificate list`, in the registry's order.
#[derive(Debug, Serialize)]
struct CertificateListView {
    request_id: String,
    certificates: Vec<ListedCertificate>,
}

impl Render for CertificateListView {
    fn to_table(&self) -> String {
        let mut t = Table::new([
            "CERTIFICATE",
            "PROCESSOR",
            "SUBPROCESSOR",
            "STATE",
            "FOLLOWS",
            "ISSUED",
            "REGISTRY",
        ]);
        for c in &self.certificates {
            let verdict = match c.verified_by_registry {
                true => "verified".to_string(),
                false => format!("rejected: {}", c.rejection),
            };
            t.row([
                c.certificate_id.clone(),
                c.processor.clone(),
                c.subprocessor.clone(),
                c.task_state.clone(),
                c.follows.clone(),
                c.issued_at.clone(),
                verdict,
            ]);
        }
        t.render()
    }
}

/// Lists the request's certificates in the registry's order: each task's together, oldest
/// first.
pub(crate) async fn list(
    registry: &Registry,
    args: &CertificateListArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let list = fetch(registry, &args.id, &args.processor, &args.subprocessor).await?;
    let certificates = list
        .into_iter()
        .map(|c| {
            let body = c
                .certificate
                .as_ref()
                .and_then(|d| serde_json::from_slice::<serde_json::Value>(&d.body).ok())
                .unwrap_or_default();
            let text = |key: &str| body.get(key).and_then(|v| v.as_str()).unwrap_or_default();
            ListedCertificate {
                task_state: text("task_state").to_string(),
                follows: text("follows").to_string(),
                issued_at: text("issued_at").to_string(),
                certificate_id: c.certificate_id,
                processor: c.processor,
                subprocessor: c.subprocessor,
                verified_by_registry: c.verified,
                rejection: c.rejection,
            }
        })
        .collect();
    let view = CertificateListView {
        request_id: args.id.clone(),
        certificates,
    };
    emit(io.out, io.format, &view, false)?;
    Ok(0)
}

/// The latest of one task's certificates: the one no other follows up. The registry lists
/// them in the processor's order, but an older registry lists them as they arrived, where a
/// retried stale certificate comes after its follow-up. When several qualify (a body the
/// registry could not read names nothing and is named by nothing) the last listed wins.
fn latest(list: &[StoredCertificate]) -> Option<&StoredCertificate> {
    let followed: HashSet<String> = list
        .iter()
        .filter_map(|c| {
            let body = &c.certificate.as_ref()?.body;
            let value = serde_json::from_slice::<serde_json::Value>(body).ok()?;
            Some(value.get("follows")?.as_str()?.to_string())
        })
        .collect();
    list.iter()
        .rev()
        .find(|c| !followed.contains(&c.certificate_id))
        .or(list.last())
}

/// The `--public-key` flag (or `--key`) of an offline check, read as `whose` public key: a
/// file holding SPKI PEM or base64, or the base64 itself.
pub(crate) fn public_key_arg(key: Option<&Path>, whose: &str) -> Result<PublicKey, Failure> {
    let key = key
        .ok_or_else(|| {
            Failure::Usage(format!(
                "name the {whose}'s public key with --public-key PUBKEY"
            ))
        })?
        .to_str()
        .ok_or_else(|| Failure::Usage("--public-key is not valid utf-8".into()))?;
    PublicKey::from_config(key).map_err(Failure::Setup)
}

/// Checks a certificate file against a public key, with no server; exit 1 when it fails.
/// `key` is the `--public-key` flag (or `--key`): here the public key, not a TLS key.
pub(crate) fn verify(
    args: &CertificateVerifyArgs,
    key: Option<&Path>,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let key = public_key_arg(key, "processor")?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))
        .map_err(Failure::Setup)?;
    let doc = Signed::from_file_json(&text)
        .with_context(|| args.file.display().to_string())
        .map_err(Failure::Certificate)?;
    let value = key.verify(&doc).map_err(|e| {
        Failure::Certificate(anyhow!("{} does not verify: {e}", args.file.display()))
    })?;
    // The key may sign other documents too (the processor's audit checkpoints, with the
    // development setup's keys): only a body as certificate.proto defines it certifies.
    let body: CertificateBody = certificate_body::check(&value).map_err(|e| {
        Failure::Certificate(anyhow!(
            "{} is signed by key {}, but not a deletion certificate: {e}",
            args.file.display(),
            doc.key_id
        ))
    })?;
    match io.format {
        OutputFormat::Json => {
            let out = serde_json::json!({
                "verified": true,
                "key_id": doc.key_id,
                "certificate": value,
            });
            writeln!(io.out, "{out}")?;
        }
        OutputFormat::Table => write!(
            io.out,
            "verified: signed by key {}\n{}",
            doc.key_id,
            describe(&body)
        )?,
    }
    Ok(0)
}

/// What a certificate says, one line per fact.
fn describe(b: &CertificateBody) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "certificate   {}", b.certificate_id);
    if let Some(f) = &b.follows {
        let _ = writeln!(s, "follows       {f}");
    }
    let _ = writeln!(s, "kind          {}", b.kind);
    let _ = writeln!(s, "processor     {}", b.processor);
    let _ = writeln!(s, "controller    {}", b.controller);
    let _ = writeln!(s, "request       {}", b.request_id);
    let _ = writeln!(s, "subprocessor  {}", b.subprocessor);
    let _ = writeln!(s, "state         {} at {}", b.task_state, b.completed_at);
    let _ = writeln!(s, "records       {}", b.records_affected);
    if let Some(u) = &b.uncounted {
        let how_many = match u.records {
            0 => "an unknown number of record(s)".to_string(),
            n => format!("{n} record(s) ({} subject(s))", u.subjects),
        };
        let _ = writeln!(s, "uncounted     may miss {how_many}: {}", u.reason);
    }
    if b.erased.is_empty() && b.records_affected == 0 {
        let _ = writeln!(s, "erased        nothing");
    } else if b.erased.is_empty() {
        let _ = writeln!(s, "erased        (not itemized by the connector)");
    }
    for (i, e) in b.erased.iter().enumerate() {
        let label = if i == 0 { "erased" } else { "" };
        let _ = writeln!(s, "{label:<13} {}: {} {}", e.target, e.action, e.count);
    }
    if b.retained.is_empty() {
        let _ = writeln!(s, "retained      nothing");
    }
    for (i, r) in b.retained.iter().enumerate() {
        let label = if i == 0 { "retained" } else { "" };
        let _ = writeln!(
            s,
            "{label:<13} {}: {}",
            r.subprocessor,
            retention_words(&r.legal_basis, &r.until)
        );
    }
    if let Some(end) = &b.contract_end {
        describe_contract_end(&mut s, end);
    }
    let _ = writeln!(s, "issued at     {}", b.issued_at);
    s
}

/// A contract end's terms and return (a version 2 body), one line per fact.
fn describe_contract_end(s: &mut String, end: &ContractEndFacts) {
    let _ = writeln!(
        s,
        "contract end  {}, effective {}, grace period ends {}",
        end.choice, end.effective_at, end.grace_ends_at
    );
    let Some(r) = &end.returned else {
        return;
    };
    let to = match r.to.as_str() {
        "registry" => "the registry".to_string(),
        "recipient" => format!("transfer recipient {}", r.recipient),
        other => other.to_string(),
    };
    match &r.part {
        Some(p) => {
            let delivered = match &p.delivered_at {
                Some(at) => format!(", delivered {at}"),
                None => String::new(),
            };
            let _ = writeln!(
                s,
                "returned      to {to}: {} file(s), {} bytes{delivered}",
                p.files, p.bytes
            );
            let _ = writeln!(s, "manifest      sha256 {}", p.manifest_sha256);
        }
        None => {
            let _ = writeln!(
                s,
                "returned      to {to}: no part delivered by the processor"
            );
        }
    }
    let c = &r.confirmation;
    let said = match (c.state.as_str(), &c.at) {
        ("CONFIRMED", Some(at)) if *at > end.grace_ends_at => format!(
            "confirmed by the controller, recorded by the processor at {at}, after the grace \
             period ended but before the erasure began (the registry refuses a confirmation \
             after the grace end, so it reached the processor late, or by another clock)"
        ),
        ("CONFIRMED", Some(at)) => {
            format!("confirmed by the controller, recorded by the processor at {at}")
        }
        ("CONFIRMED", None) => "confirmed by the controller (when: not recorded)".into(),
        ("GRACE_PERIOD_ENDED", at) => format!(
            "none: the grace period ended ({}) unconfirmed",
            at.as_deref().unwrap_or(&end.grace_ends_at)
        ),
        (state, Some(at)) => format!("{state} at {at}"),
        (state, None) => state.to_string(),
    };
    let _ = writeln!(s, "confirmation  {said}");
}

#[cfg(test)]
mod tests {
    use dsrelay_proto::v1::DeletionCertificate;

    use super::*;

    fn stored(id: &str, body: &str) -> StoredCertificate {
        StoredCertificate {
            processor: "p".into(),
            subprocessor: "accounting".into(),
            certificate: Some(DeletionCertificate {
                body: body.as_bytes().to_vec(),
                ..Default::default()
            }),
            verified: true,
            certificate_id: id.into(),
            ..Default::default()
        }
    }

    fn latest_id(list: &[StoredCertificate]) -> Option<&str> {
        latest(list).map(|c| c.certificate_id.as_str())
    }

    #[test]
    fn the_latest_is_the_one_no_other_follows_up_wherever_it_is_listed() {
        let retained = stored("c1", r#"{"certificate_id":"c1","task_state":"RETAINED"}"#);
        let completed = stored(
            "c2",
            r#"{"certificate_id":"c2","follows":"c1","task_state":"COMPLETED"}"#,
        );
        assert_eq!(
            latest_id(&[retained.clone(), completed.clone()]),
            Some("c2")
        );
        // In arrival order, as an older registry lists them: the RETAINED step's
        // acknowledgement was retried after its follow-up had arrived.
        assert_eq!(latest_id(&[completed, retained]), Some("c2"));
    }

    #[test]
    fn certificates_that_say_nothing_of_each_other_leave_the_choice_to_the_list_order() {
        let unreadable = stored("", "not json");
        let first = stored("c1", r#"{"certificate_id":"c1"}"#);
        assert_eq!(latest_id(&[first.clone(), unreadable.clone()]), Some(""));
        assert_eq!(latest_id(&[unreadable, first.clone()]), Some("c1"));
        assert_eq!(latest_id(&[first]), Some("c1"));
        assert_eq!(latest_id(&[]), None);
    }

    /// `until` is when the holder's erasure runs again, not when the retention ends.
    #[test]
    fn a_retention_reads_as_its_next_erasure_run() {
        let body: CertificateBody = serde_json::from_str(
            r#"{"version":1,"certificate_id":"c1","kind":"erasure","processor":"p",
            "controller":"acme","request_id":"r-1","subprocessor":"accounting",
            "task_state":"RETAINED","records_affected":3,"erased":[],
            "retained":[{"subprocessor":"accounting","legal_basis":"Kirjanpitolaki 2:10 §",
            "until":"2031-01-01T00:00:00.000Z"}],
            "completed_at":"2025-01-01T00:00:00.000Z","issued_at":"2025-01-01T00:00:00.000Z"}"#,
        )
        .unwrap();
        let text = describe(&body);
        assert!(
            text.contains(
                "retained      accounting: kept under Kirjanpitolaki 2:10 §; \
                 next erasure run 2031-01-01T00:00:00.000Z\n"
            ),
            "{text}"
        );
        assert!(!text.contains("until"), "{text}");
    }

    /// A count that may leave records out says so, with how many when the totals tell.
    #[test]
    fn counts_that_may_miss_records_say_so() {
        let body = |uncounted: &str| -> CertificateBody {
            serde_json::from_str(&format!(
                r#"{{"version":1,"certificate_id":"c1","kind":"contract_end","processor":"p",
                "controller":"acme","request_id":"r-1","subprocessor":"accounting",
                "task_state":"COMPLETED","records_affected":3,"erased":[],"retained":[],
                {uncounted}
                "completed_at":"2025-01-01T00:00:00.000Z",
                "issued_at":"2025-01-01T00:00:00.000Z"}}"#
            ))
            .unwrap()
        };
        let cut = r#""uncounted":{"reason":"an earlier call was cut off","records":40,
            "subjects":10},"#;
        let text = describe(&body(cut));
        assert!(
            text.contains(
                "uncounted     may miss 40 record(s) (10 subject(s)): an earlier call was cut \
                 off\n"
            ),
            "{text}"
        );
        let unknown = r#""uncounted":{"reason":"cut off","records":0,"subjects":0},"#;
        let text = describe(&body(unknown));
        assert!(
            text.contains("may miss an unknown number of record(s): cut off\n"),
            "{text}"
        );
        // Three records not itemized; none, as from a holder with nothing of the controller's.
        assert!(text.contains("erased        (not itemized by the connector)\n"));
        let mut nothing = body("");
        nothing.records_affected = 0;
        let text = describe(&nothing);
        assert!(text.contains("erased        nothing\n"), "{text}");
        assert!(!describe(&body("")).contains("uncounted"));
    }

    /// A contract end's version 2 body shows its terms, the part returned and its
    /// confirmation; a DELETE shows its terms alone.
    #[test]
    fn a_contract_end_shows_its_terms_and_return() {
        let body = |end: &str| -> CertificateBody {
            serde_json::from_str(&format!(
                r#"{{"version":2,"certificate_id":"c1","kind":"contract_end","processor":"p",
                "controller":"acme","request_id":"ce-1","subprocessor":"crm",
                "task_state":"COMPLETED","records_affected":3,"erased":[],"retained":[],
                "contract_end":{end},
                "completed_at":"2026-03-01T00:00:00.000Z","issued_at":"2026-03-01T00:00:00.000Z"}}"#
            ))
            .unwrap()
        };
        let terms = r#""choice":"RETURN_THEN_DELETE","effective_at":"2026-01-01T00:00:00.000Z",
            "grace_ends_at":"2026-02-01T00:00:00.000Z""#;
        let text = describe(&body(&format!(
            r#"{{{terms},"returned":{{"to":"registry","part":{{"manifest_sha256":"{}",
            "files":2,"bytes":150,"delivered_at":"2026-01-02T00:00:00.000Z"}},
            "confirmation":{{"state":"CONFIRMED","at":"2026-01-15T00:00:00.000Z"}}}}}}"#,
            "ab".repeat(32)
        )));
        for line in [
            "contract end  RETURN_THEN_DELETE, effective 2026-01-01T00:00:00.000Z, grace period \
             ends 2026-02-01T00:00:00.000Z\n",
            "returned      to the registry: 2 file(s), 150 bytes, delivered \
             2026-01-02T00:00:00.000Z\n",
            &format!("manifest      sha256 {}\n", "ab".repeat(32)),
            "confirmation  confirmed by the controller, recorded by the processor at \
             2026-01-15T00:00:00.000Z\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        let text = describe(&body(&format!(
            r#"{{{terms},"returned":{{"to":"recipient","recipient":"archive-oy",
            "confirmation":{{"state":"GRACE_PERIOD_ENDED","at":"2026-02-01T00:00:00.000Z"}}}}}}"#
        )));
        assert!(
            text.contains(
                "returned      to transfer recipient archive-oy: no part delivered by the \
                 processor\n"
            ) && text.contains(
                "confirmation  none: the grace period ended (2026-02-01T00:00:00.000Z) \
                 unconfirmed\n"
            ),
            "{text}"
        );
        let text = describe(&body(
            r#"{"choice":"DELETE","effective_at":"2026-01-01T00:00:00.000Z",
            "grace_ends_at":"2026-02-01T00:00:00.000Z"}"#,
        ));
        assert!(text.contains("contract end  DELETE, effective "), "{text}");
        assert!(
            !text.contains("returned") && !text.contains("confirmation"),
            "{text}"
        );
    }

    /// A run the processor started and the holder has not confirmed keeps its date, past.
    #[test]
    fn a_retention_dated_in_the_past_is_not_a_run_to_come() {
        let body: CertificateBody = serde_json::from_str(
            r#"{"version":1,"certificate_id":"c1","kind":"erasure","processor":"p",
            "controller":"acme","request_id":"r-1","subprocessor":"accounting",
            "task_state":"RETAINED","records_affected":3,"erased":[],
            "retained":[{"subprocessor":"accounting","legal_basis":"Kirjanpitolaki 2:10 §",
            "until":"2001-01-01T00:00:00.000Z"}],
            "completed_at":"2000-01-01T00:00:00.000Z","issued_at":"2000-01-01T00:00:00.000Z"}"#,
        )
        .unwrap();
        let text = describe(&body);
        assert!(
            text.contains(
                "retained      accounting: kept under Kirjanpitolaki 2:10 §; erasure run of \
                 2001-01-01T00:00:00.000Z, awaiting the holder's confirmation\n"
            ),
            "{text}"
        );
        assert!(!text.contains("next erasure run"), "{text}");
    }
}
