//! `dsrctl list`.

use clap::ValueEnum;
use dsrelay_sdk::proto::{
    IdentityEncoding, IdentityType, ListRequestsRequest, RequestKind, RequestState, SubjectIdentity,
};
use dsrelay_sdk::{hashed_identity, identity, other_identity};
use serde::Serialize;
use tokio_stream::StreamExt;

use crate::cli::ListArgs;
use crate::commands::{Io, Registry};
use crate::output::{emit, ListView, Render, RequestView};
use crate::Failure;

/// The List body for these flags.
pub(crate) fn list_request(args: &ListArgs) -> ListRequestsRequest {
    ListRequestsRequest {
        states: args
            .states
            .iter()
            .map(|s| RequestState::from(*s) as i32)
            .collect(),
        kind: args
            .kind
            .map_or(RequestKind::Unspecified, RequestKind::from) as i32,
        overdue_only: args.overdue,
        page_size: args.limit.unwrap_or(0),
        page_token: args.page_token.clone().unwrap_or_default(),
        identities: identities(args),
    }
}

/// The identities of the flags, built as `dsrctl submit` builds them (the registry matches
/// each against a request's only in the same type and encoding), in the order of its flag
/// groups.
fn identities(args: &ListArgs) -> Vec<SubjectIdentity> {
    let raw = |ty: IdentityType, values: &[String]| {
        values
            .iter()
            .map(|v| identity(ty, v.as_str()))
            .collect::<Vec<_>>()
    };
    let hashed = |enc: IdentityEncoding, values: &[String]| {
        values
            .iter()
            .map(|v| hashed_identity(IdentityType::Email, enc, v.as_str()))
            .collect::<Vec<_>>()
    };
    let mut out = raw(IdentityType::Email, &args.email);
    out.extend(raw(IdentityType::Phone, &args.phone));
    out.extend(raw(IdentityType::CustomerNumber, &args.customer_number));
    out.extend(raw(IdentityType::NationalId, &args.national_id));
    out.extend(
        args.other
            .iter()
            .map(|(label, v)| other_identity(label.as_str(), v.as_str())),
    );
    out.extend(hashed(IdentityEncoding::Sha256, &args.sha256_email));
    out.extend(hashed(IdentityEncoding::Md5, &args.md5_email));
    out
}

/// What `list` prints: the page, and in the table the filters when none matched, since a
/// bare header reads as output cut short. JSON is the page alone.
#[derive(Debug, Serialize)]
#[serde(transparent)]
struct ListOutput {
    view: ListView,
    /// The filter flags given, as typed (`--state failed`, `--overdue`).
    #[serde(skip)]
    filters: Vec<String>,
}

/// The filter flags of `args`, as they are typed.
fn filters(args: &ListArgs) -> Vec<String> {
    let name = |v: Option<clap::builder::PossibleValue>| {
        v.map(|v| v.get_name().to_string()).unwrap_or_default()
    };
    let mut given: Vec<String> = args
        .states
        .iter()
        .map(|s| format!("--state {}", name(s.to_possible_value())))
        .collect();
    if let Some(kind) = args.kind {
        given.push(format!("--kind {}", name(kind.to_possible_value())));
    }
    if args.overdue {
        given.push("--overdue".into());
    }
    // Named without their values: what is printed may be pasted into a ticket or a chat, and
    // the subject's identities do not belong there.
    let identity_flags = [
        ("--email", args.email.len()),
        ("--phone", args.phone.len()),
        ("--customer-number", args.customer_number.len()),
        ("--national-id", args.national_id.len()),
        ("--other", args.other.len()),
        ("--sha256-email", args.sha256_email.len()),
        ("--md5-email", args.md5_email.len()),
    ];
    for (flag, n) in identity_flags {
        given.extend(std::iter::repeat_n(format!("{flag} …"), n));
    }
    given
}

impl Render for ListOutput {
    fn to_table(&self) -> String {
        if !self.view.requests.is_empty() {
            return self.view.to_table();
        }
        let none = if self.filters.is_empty() {
            "no requests\n".to_string()
        } else {
            format!("no request matched {}\n", self.filters.join(" "))
        };
        none + &self.view.next_page()
    }
}

/// Prints one page, or with `--all` every page as one result.
pub(crate) async fn run(
    registry: &Registry,
    args: &ListArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let request = list_request(args);
    let view = if args.all {
        let mut pages = std::pin::pin!(registry.client.list_pages(request));
        let mut requests = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|s| registry.failed(s))?;
            requests.extend(page.requests.iter().map(RequestView::from));
        }
        ListView {
            requests,
            next_page_token: String::new(),
        }
    } else {
        let page = registry
            .client
            .list(request)
            .await
            .map_err(|s| registry.failed(s))?;
        ListView {
            requests: page.requests.iter().map(RequestView::from).collect(),
            next_page_token: page.next_page_token,
        }
    };
    let output = ListOutput {
        view,
        filters: filters(args),
    };
    emit(io.out, io.format, &output, false)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> ListArgs {
        let argv = ["dsrctl", "list"].iter().chain(args).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::List(a) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn filters_map_to_the_request() {
        let r = list_request(&parse(&[
            "--state",
            "failed",
            "--state",
            "in-progress",
            "--kind",
            "return-of-data",
            "--overdue",
            "--limit",
            "20",
            "--page-token",
            "p2",
        ]));
        assert_eq!(
            r.states,
            [RequestState::Failed as i32, RequestState::InProgress as i32]
        );
        assert_eq!(r.kind, RequestKind::ReturnOfData as i32);
        assert!(r.overdue_only);
        assert_eq!(r.page_size, 20);
        assert_eq!(r.page_token, "p2");

        assert_eq!(list_request(&parse(&[])), ListRequestsRequest::default());
    }

    /// The identity flags are `dsrctl submit`'s, parsed as it parses them, into the
    /// identities Submit would send; a listing that finds nothing names them without their
    /// values.
    #[test]
    fn identity_flags_map_to_the_request_as_submit_builds_them() {
        let sha = "AB".repeat(32);
        let md5 = "cd".repeat(16);
        let args = parse(&[
            "--md5-email",
            &md5,
            "--email",
            "Maija@Example.fi",
            "--phone",
            "+358 40 123 4567",
            "--other",
            "loyalty-card=L-1",
            "--customer-number",
            "C-1",
            "--national-id",
            "010101-123N",
            "--sha256-email",
            &sha,
            "--email",
            "teemu@example.fi",
        ]);
        let submitted = crate::commands::submit::submit_request(
            &Cli::try_parse_from([
                "dsrctl",
                "submit",
                "--kind",
                "erasure",
                "--md5-email",
                &md5,
                "--email",
                "Maija@Example.fi",
                "--phone",
                "+358 40 123 4567",
                "--other",
                "loyalty-card=L-1",
                "--customer-number",
                "C-1",
                "--national-id",
                "010101-123N",
                "--sha256-email",
                &sha,
                "--email",
                "teemu@example.fi",
            ])
            .map(|c| match c.command {
                Command::Submit(a) => a,
                other => panic!("parsed as {other:?}"),
            })
            .unwrap(),
            "k".into(),
        )
        .unwrap();
        let r = list_request(&args);
        assert_eq!(r.identities, submitted.identities);
        let typed: Vec<(IdentityType, IdentityEncoding, &str, &str)> = r
            .identities
            .iter()
            .map(|i| (i.r#type(), i.encoding(), i.value.as_str(), i.label.as_str()))
            .collect();
        use IdentityEncoding::{Md5, Raw, Sha256};
        use IdentityType::{CustomerNumber, Email, NationalId, Other, Phone};
        assert_eq!(
            typed,
            [
                (Email, Raw, "Maija@Example.fi", ""),
                (Email, Raw, "teemu@example.fi", ""),
                (Phone, Raw, "+358 40 123 4567", ""),
                (CustomerNumber, Raw, "C-1", ""),
                (NationalId, Raw, "010101-123N", ""),
                (Other, Raw, "L-1", "loyalty-card"),
                (Email, Sha256, sha.to_lowercase().as_str(), ""),
                (Email, Md5, md5.as_str(), ""),
            ]
        );
        assert_eq!(
            output(
                &["--email", "maija@example.fi", "--phone", "+35840"],
                vec![],
                ""
            )
            .to_table(),
            "no request matched --email … --phone …\n"
        );
        for bad in [
            &["--sha256-email", "abc"][..],
            &["--md5-email", &sha],
            &["--other", "no-label"],
        ] {
            let argv = ["dsrctl", "list"].iter().chain(bad).copied();
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    fn output(args: &[&str], requests: Vec<RequestView>, next: &str) -> ListOutput {
        ListOutput {
            view: ListView {
                requests,
                next_page_token: next.into(),
            },
            filters: filters(&parse(args)),
        }
    }

    #[test]
    fn no_match_names_the_filters_instead_of_a_bare_header() {
        let args = ["--state", "in-progress", "--kind", "erasure", "--overdue"];
        let none = output(&args, vec![], "");
        assert_eq!(
            none.to_table(),
            "no request matched --state in-progress --kind erasure --overdue\n"
        );
        assert_eq!(
            serde_json::to_value(&none).unwrap(),
            serde_json::json!({"requests": [], "next_page_token": ""})
        );
        assert_eq!(
            output(&[], vec![], "p2").to_table(),
            "no requests\nnext page: --page-token p2\n"
        );
        let one = RequestView::from(&dsrelay_sdk::proto::Request {
            request_id: "r-1".into(),
            ..Default::default()
        });
        let some = output(&["--overdue"], vec![one], "");
        assert!(some.to_table().starts_with("ID "), "{}", some.to_table());
    }
}
