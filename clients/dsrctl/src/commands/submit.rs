//! `dsrctl submit`.

use dsrelay_sdk::proto::{RequestKind, SubmitRequest};
use dsrelay_sdk::SubmitBuilder;

use crate::cli::{KindArg, SubmitArgs};
use crate::commands::{Io, Registry};
use crate::output::{emit, SubmitView};
use crate::Failure;

/// The Submit body for these flags. Identities keep the order of the flag groups (e-mail,
/// phone, customer number, national id, other, hashed e-mails), not of the command line:
/// clap does not keep the interleaving, and the registry treats identities as a set.
///
/// Rejects parameters that do not belong to the kind before calling: the registry refuses
/// them too, but only this side can name the flag to drop.
pub(crate) fn submit_request(
    args: &SubmitArgs,
    idempotency_key: String,
) -> Result<SubmitRequest, Failure> {
    let misplaced = [
        (
            !args.corrections.is_empty() && args.kind != KindArg::Rectification,
            "--correct",
            "rectification",
        ),
        (
            args.lift && args.kind != KindArg::Restriction,
            "--lift",
            "restriction",
        ),
        (
            args.recipient.is_some() && args.kind != KindArg::Transfer,
            "--recipient",
            "transfer",
        ),
    ];
    if let Some((_, flag, kind)) = misplaced.iter().find(|(wrong, ..)| *wrong) {
        return Err(Failure::Usage(format!("{flag} is only for --kind {kind}")));
    }

    let mut b = SubmitBuilder::new(RequestKind::from(args.kind)).idempotency_key(idempotency_key);
    for v in &args.email {
        b = b.email(v.as_str());
    }
    for v in &args.phone {
        b = b.phone(v.as_str());
    }
    for v in &args.customer_number {
        b = b.customer_number(v.as_str());
    }
    for v in &args.national_id {
        b = b.national_id(v.as_str());
    }
    for (label, v) in &args.other {
        b = b.other(label.as_str(), v.as_str());
    }
    for v in &args.sha256_email {
        b = b.sha256_email(v.as_str());
    }
    for v in &args.md5_email {
        b = b.md5_email(v.as_str());
    }
    b = b.categories(args.categories.iter().map(String::as_str));
    if let Some(note) = &args.note {
        b = b.note(note.as_str());
    }
    for (field, value) in &args.corrections {
        b = b.correct(field.as_str(), value.as_str());
    }
    if args.lift {
        b = b.lift_restriction(true);
    }
    if let Some(recipient) = &args.recipient {
        b = b.transfer_recipient(recipient.as_str());
    }
    Ok(b.build())
}

/// A Submit ready to send, checked before any connection is made so usage errors come first.
pub(crate) struct Prepared {
    request: SubmitRequest,
    /// Whether dsrctl chose the idempotency key (then it must be shown if the call fails).
    generated_key: bool,
}

/// Checks the flags and builds the request, choosing a fresh UUID v4 key unless one is given.
pub(crate) fn prepare(args: &SubmitArgs) -> Result<Prepared, Failure> {
    let key = args
        .idempotency_key
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    Ok(Prepared {
        request: submit_request(args, key)?,
        generated_key: args.idempotency_key.is_none(),
    })
}

/// Submits and prints the registry's answer with the idempotency key used.
pub(crate) async fn run(
    registry: &Registry,
    prepared: Prepared,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let key = prepared.request.idempotency_key.clone();
    match registry.client.submit(prepared.request).await {
        Ok(answer) => {
            emit(io.out, io.format, &SubmitView::new(&answer, key), false)?;
            Ok(0)
        }
        Err(status) => {
            if prepared.generated_key && outcome_unknown(&status) {
                // The request may have been stored even though the answer was lost; only a
                // resubmission with the same key is safe.
                writeln!(
                    io.err,
                    "note: idempotency key was {key}; to retry without risking a duplicate, \
                     pass --idempotency-key {key}"
                )?;
            }
            Err(registry.failed(status))
        }
    }
}

/// Whether a Submit that failed with `status` may have been stored all the same: the call
/// was cut short or its answer lost (a timeout, a dropped connection, an answer that cannot
/// be right), rather than refused by the registry, which stores nothing it refuses.
fn outcome_unknown(status: &tonic::Status) -> bool {
    use tonic::Code;
    dsrelay_sdk::is_bad_answer(status)
        || matches!(
            status.code(),
            Code::Unknown
                | Code::DeadlineExceeded
                | Code::Unavailable
                | Code::Cancelled
                | Code::Internal
                | Code::DataLoss
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use dsrelay_sdk::proto::{IdentityEncoding, IdentityType};

    fn parse(args: &[&str]) -> SubmitArgs {
        let argv = ["dsrctl", "submit"].iter().chain(args).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Submit(a) => *a,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn ids(r: &SubmitRequest) -> Vec<(IdentityType, IdentityEncoding, &str, &str)> {
        r.identities
            .iter()
            .map(|i| {
                (
                    IdentityType::try_from(i.r#type).unwrap(),
                    IdentityEncoding::try_from(i.encoding).unwrap(),
                    i.value.as_str(),
                    i.label.as_str(),
                )
            })
            .collect()
    }

    #[test]
    fn identities_categories_and_note() {
        let sha = "AB".repeat(32);
        let md5 = "cd".repeat(16);
        let args = parse(&[
            "--kind",
            "erasure",
            "--email",
            "a@b.fi",
            "--phone",
            "+358401234567",
            "--customer-number",
            "C-1",
            "--national-id",
            "010101-123N",
            "--other",
            "loyalty-card=L-9",
            "--sha256-email",
            &sha,
            "--md5-email",
            &md5,
            "--email",
            "second@b.fi",
            "--category",
            "contact",
            "--category",
            "marketing",
            "--note",
            "ticket 7",
        ]);
        let r = submit_request(&args, "k-1".into()).unwrap();
        assert_eq!(r.kind, RequestKind::Erasure as i32);
        use IdentityEncoding::{Md5, Raw, Sha256};
        use IdentityType::*;
        assert_eq!(
            ids(&r),
            [
                (Email, Raw, "a@b.fi", ""),
                (Email, Raw, "second@b.fi", ""),
                (Phone, Raw, "+358401234567", ""),
                (CustomerNumber, Raw, "C-1", ""),
                (NationalId, Raw, "010101-123N", ""),
                (Other, Raw, "L-9", "loyalty-card"),
                (Email, Sha256, "ab".repeat(32).as_str(), ""),
                (Email, Md5, md5.as_str(), ""),
            ]
        );
        assert_eq!(r.scope.unwrap().data_categories, ["contact", "marketing"]);
        assert_eq!(r.idempotency_key, "k-1");
        assert_eq!(r.note, "ticket 7");
        assert!(r.parameters.is_none());
    }

    #[test]
    fn every_kind_maps() {
        let cases = [
            ("erasure", RequestKind::Erasure),
            ("return-of-data", RequestKind::ReturnOfData),
            ("objection", RequestKind::Objection),
            ("restriction", RequestKind::Restriction),
        ];
        for (flag, kind) in cases {
            let r = submit_request(&parse(&["--kind", flag, "--email", "a@b.fi"]), "k".into());
            assert_eq!(r.unwrap().kind, kind as i32, "{flag}");
        }
    }

    #[test]
    fn kind_parameters() {
        let args = parse(&[
            "--kind",
            "rectification",
            "--customer-number",
            "C-1",
            "--correct",
            "phone=+358 40 1",
            "--correct",
            "name=Maija = M",
        ]);
        let p = submit_request(&args, "k".into())
            .unwrap()
            .parameters
            .unwrap();
        let pairs: Vec<_> = p
            .corrections
            .iter()
            .map(|c| (c.field.as_str(), c.new_value.as_str()))
            .collect();
        assert_eq!(pairs, [("phone", "+358 40 1"), ("name", "Maija = M")]);

        let args = parse(&["--kind", "restriction", "--email", "a@b.fi", "--lift"]);
        let r = submit_request(&args, "k".into()).unwrap();
        assert!(r.parameters.unwrap().lift_restriction);

        let args = parse(&[
            "--kind",
            "transfer",
            "--email",
            "a@b.fi",
            "--recipient",
            "spiffe://r",
        ]);
        let r = submit_request(&args, "k".into()).unwrap();
        assert_eq!(r.kind, RequestKind::Transfer as i32);
        assert_eq!(r.parameters.unwrap().transfer_recipient, "spiffe://r");
    }

    #[test]
    fn misplaced_parameters_are_usage_errors() {
        for extra in [
            &["--lift"][..],
            &["--recipient", "x"],
            &["--correct", "a=b"],
        ] {
            let argv: Vec<&str> = ["--kind", "erasure", "--email", "a@b.fi"]
                .iter()
                .chain(extra)
                .copied()
                .collect();
            let err = submit_request(&parse(&argv), "k".into()).unwrap_err();
            assert!(matches!(err, Failure::Usage(_)), "{extra:?}");
            assert_eq!(err.exit_code(), 2);
        }
    }
}
