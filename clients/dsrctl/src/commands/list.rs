//! `dsrctl list`.

use clap::ValueEnum;
use dsrelay_sdk::proto::{
    IdentityEncoding, IdentityType, ListRequestsRequest, RequestKind, RequestState, SubjectIdentity,
};
use dsrelay_sdk::{hashed_identity, identity, other_identity};
use serde::Serialize;
use tokio_stream::StreamExt;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::cli::ListArgs;
use crate::commands::{Io, Registry};
use crate::output::{emit, ListView, Render, RequestView};
use crate::Failure;

/// The List body for these flags, `--due-within` counted from `now`.
pub(crate) fn list_request(args: &ListArgs, now: DateTime<Utc>) -> ListRequestsRequest {
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
        due_before: due_before(args, now)
            .map(|t| dsrelay_proto::timestamp_from_millis(t.timestamp_millis())),
    }
}

/// The instant `--due-before` names, or `--due-within` after `now`, to the millisecond the
/// registry compares due dates in.
fn due_before(args: &ListArgs, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let at = match (args.due_before, args.due_within) {
        (Some(at), _) => at,
        // Beyond chrono's dates the registry refuses the instant (after the year 9999), as a
        // silently dropped filter would list every request.
        (None, Some(within)) => now
            .checked_add_signed(within)
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
        (None, None) => return None,
    };
    // Rounded up, as the registry rounds: a due date at the millisecond the instant falls in
    // is before it.
    let part = at.timestamp_subsec_nanos() % 1_000_000 != 0;
    DateTime::from_timestamp_millis(at.timestamp_millis().saturating_add(i64::from(part)))
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
/// bare header reads as output cut short. JSON is the page, and with `--due-within` or
/// `--due-before` the instant sent (`due_before`), which a script pages on with as
/// `--due-before` beside `--page-token`.
#[derive(Debug, Serialize)]
struct ListOutput {
    #[serde(flatten)]
    view: ListView,
    /// The instant the list was asked for, as `--due-before` takes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    due_before: Option<String>,
    /// The filter flags given, as typed (`--state failed`, `--overdue`).
    #[serde(skip)]
    filters: Vec<String>,
    /// The `--due-before` that pages on after `--due-within`: its token carries the instant
    /// sent, which the same flag run again would move.
    #[serde(skip)]
    page_on_due_before: Option<String>,
}

/// The filter flags of `args`, as they are typed; `--due-within` as the instant it was sent
/// as (`now` plus it).
fn filters(args: &ListArgs, now: DateTime<Utc>) -> Vec<String> {
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
    if let Some(at) = due_before(args, now) {
        given.push(format!("--due-before {}", instant_flag(at)));
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

/// An instant as `--due-before` takes it back, to the millisecond.
fn instant_flag(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl ListOutput {
    /// The line naming the next page; after `--due-within` with the `--due-before` its token
    /// needs.
    fn next_page(&self) -> String {
        match &self.page_on_due_before {
            Some(at) => self.view.next_page_with(&format!("--due-before {at} ")),
            None => self.view.next_page(),
        }
    }
}

impl Render for ListOutput {
    fn to_table(&self) -> String {
        if !self.view.requests.is_empty() {
            return self.view.rows() + &self.next_page();
        }
        let none = if self.filters.is_empty() {
            "no requests\n".to_string()
        } else {
            format!("no request matched {}\n", self.filters.join(" "))
        };
        none + &self.next_page()
    }
}

/// Prints one page, or with `--all` every page as one result.
pub(crate) async fn run(
    registry: &Registry,
    args: &ListArgs,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let now = Utc::now();
    let request = list_request(args, now);
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
        filters: filters(args, now),
        due_before: due_before(args, now).map(instant_flag),
        page_on_due_before: args.due_within.and(due_before(args, now)).map(instant_flag),
    };
    emit(io.out, io.format, &output, false)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    /// The instant the tests list at: 2026-12-07T09:00:00.250Z.
    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_796_634_000_250).expect("an instant")
    }

    fn parse(args: &[&str]) -> ListArgs {
        let argv = ["dsrctl", "list"].iter().chain(args).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::List(a) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn filters_map_to_the_request() {
        let r = list_request(
            &parse(&[
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
            ]),
            now(),
        );
        assert_eq!(
            r.states,
            [RequestState::Failed as i32, RequestState::InProgress as i32]
        );
        assert_eq!(r.kind, RequestKind::ReturnOfData as i32);
        assert!(r.overdue_only);
        assert_eq!(r.page_size, 20);
        assert_eq!(r.page_token, "p2");

        assert_eq!(
            list_request(&parse(&[]), now()),
            ListRequestsRequest::default()
        );
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
        let r = list_request(&args, now());
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
            filters: filters(&parse(args), now()),
            due_before: None,
            page_on_due_before: None,
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

#[cfg(test)]
mod due_tests {
    use super::*;
    use crate::cli::{parse_duration, Cli, Command};
    use clap::Parser;

    const NOW_MS: i64 = 1_796_634_000_250;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp_millis(NOW_MS).expect("an instant")
    }

    fn parse(args: &[&str]) -> Result<ListArgs, clap::Error> {
        let argv = ["dsrctl", "list"].iter().chain(args).copied();
        Cli::try_parse_from(argv).map(|c| match c.command {
            Command::List(a) => a,
            other => panic!("parsed as {other:?}"),
        })
    }

    fn due_before_ms(args: &[&str]) -> Option<i64> {
        let r = list_request(&parse(args).expect("valid flags"), now());
        r.due_before
            .map(|t| dsrelay_proto::millis_from_timestamp(&t))
    }

    /// `--due-within` sends now plus the span, `--due-before` its instant, each to the
    /// millisecond, with the other filters as they are.
    #[test]
    fn due_flags_send_the_instant() {
        let hour = 3_600_000;
        assert_eq!(
            due_before_ms(&["--due-within", "72h"]),
            Some(NOW_MS + 72 * hour)
        );
        assert_eq!(
            due_before_ms(&["--due-within", "7d"]),
            Some(NOW_MS + 168 * hour)
        );
        assert_eq!(
            due_before_ms(&["--due-within", "30m"]),
            Some(NOW_MS + hour / 2)
        );
        assert_eq!(
            due_before_ms(&["--due-within", "1d12h"]),
            Some(NOW_MS + 36 * hour)
        );
        assert_eq!(
            due_before_ms(&["--due-before", "2027-01-01T00:00:00.5+02:00"]),
            Some(1_798_754_400_500)
        );
        assert_eq!(
            due_before_ms(&["--due-before", "2027-01-01"]),
            Some(1_798_761_600_000)
        );
        assert_eq!(due_before_ms(&[]), None);
        // Below the millisecond rounded up, as the registry rounds: a request due at
        // .000 is before .0005.
        assert_eq!(
            due_before_ms(&["--due-before", "2027-01-01T00:00:00.0005Z"]),
            Some(1_798_761_600_001)
        );
        let r = list_request(
            &parse(&[
                "--due-within",
                "72h",
                "--state",
                "failed",
                "--kind",
                "erasure",
                "--overdue",
            ])
            .expect("valid flags"),
            now(),
        );
        assert_eq!(r.states, [RequestState::Failed as i32]);
        assert_eq!(r.kind, RequestKind::Erasure as i32);
        assert!(r.overdue_only);
    }

    /// The two flags conflict, and `--due-within` takes no page token (its instant moves on
    /// each run, and the token carries the one it was given for).
    #[test]
    fn due_flags_conflict_with_each_other_and_a_token() {
        for args in [
            &["--due-within", "72h", "--due-before", "2027-01-01"][..],
            &["--due-within", "72h", "--page-token", "v2.x.1_r"],
        ] {
            let e = parse(args).expect_err("conflicting flags");
            assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
        }
        assert!(parse(&["--due-before", "2027-01-01", "--page-token", "v2.x.1_r"]).is_ok());
    }

    #[test]
    fn durations_take_units_and_say_what_they_take() {
        assert_eq!(parse_duration("45s"), Ok(chrono::Duration::seconds(45)));
        assert_eq!(parse_duration("2w"), Ok(chrono::Duration::days(14)));
        for bad in [
            "",
            "72",
            "h",
            "0h",
            "3x",
            "-1h",
            "1.5h",
            "99999999999999999999h",
            "36600000d",
        ] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(
                e.contains("e.g. 30m, 72h") || e.contains("at most 100 years"),
                "{bad:?}: {e}"
            );
            assert!(parse(&["--due-within", bad]).is_err(), "{bad:?}");
        }
    }

    /// After `--due-within` the next-page line names the `--due-before` the token was made
    /// for, and a listing that found nothing names the instant it asked about.
    #[test]
    fn the_next_page_line_pages_on_with_the_instant_sent() {
        let args = parse(&["--due-within", "72h"]).expect("valid flags");
        let at = "2026-12-10T09:00:00.250Z";
        let one = RequestView::from(&dsrelay_sdk::proto::Request {
            request_id: "r-1".into(),
            ..Default::default()
        });
        let page = ListOutput {
            view: ListView {
                requests: vec![one],
                next_page_token: "v2.abc.1_r-1".into(),
            },
            filters: filters(&args, now()),
            due_before: Some(at.into()),
            page_on_due_before: Some(at.into()),
        };
        let table = page.to_table();
        assert!(table.starts_with("ID "), "{table}");
        assert!(
            table.ends_with(&format!(
                "next page: --due-before {at} --page-token v2.abc.1_r-1\n"
            )),
            "{table}"
        );
        assert_eq!(table.matches("next page").count(), 1, "{table}");
        // JSON names the instant too, for a script to page on with.
        let json = serde_json::to_value(&page).expect("json");
        assert_eq!(json["due_before"], at, "{json}");
        assert_eq!(json["next_page_token"], "v2.abc.1_r-1", "{json}");
        let none = ListOutput {
            view: ListView {
                requests: vec![],
                next_page_token: String::new(),
            },
            filters: filters(&args, now()),
            due_before: Some(at.into()),
            page_on_due_before: Some(at.into()),
        };
        assert_eq!(
            none.to_table(),
            format!("no request matched --due-before {at}\n")
        );
        // Every request shows its due date.
        assert!(page
            .to_table()
            .lines()
            .next()
            .is_some_and(|h| h.contains("DUE")));
    }
}
