//! `dsrctl list --due-within` and `--due-before`, the real binary against a real registry:
//! the open requests that fall due before an instant, and paging on with the instant the
//! first page was asked for.

use crate::harness::dsrctl::dsrctl;
use crate::harness::{spawn_pair, Backend, PairOptions, Role};
use serde_json::Value;

/// The ids a JSON listing holds, in its order.
fn ids(doc: &Value) -> Vec<String> {
    doc["requests"]
        .as_array()
        .unwrap_or_else(|| panic!("no requests in {doc:#}"))
        .iter()
        .map(|r| r["request_id"].as_str().expect("an id").to_string())
        .collect()
}

async fn due_soon_is_listed(backend: Backend) {
    // The processor is down: the requests stay RECEIVED, open, each due a month after it
    // was received.
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        down: vec![Role::Processor],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut submitted = Vec::new();
    for n in 0..3 {
        let email = format!("due{n}@example.fi");
        let doc = dsrctl(
            &pair,
            "partner-crm",
            &[
                "submit", "--kind", "erasure", "--email", &email, "--output", "json",
            ],
        )
        .await
        .json();
        let id = doc["request_id"].as_str().expect("request_id").to_string();
        let get = dsrctl(&pair, "partner-crm", &["get", &id, "--output", "json"])
            .await
            .json();
        let due = get["due_at"].as_str().expect("due_at").to_string();
        submitted.push((id, due));
    }
    let newest_first: Vec<String> = submitted.iter().rev().map(|(id, _)| id.clone()).collect();

    // Due within 40 days: all three; within a week: none, and the table says what it asked.
    let list = |args: &'static [&'static str]| dsrctl(&pair, "operator", args);
    let doc = list(&["list", "--due-within", "40d", "--output", "json"])
        .await
        .json();
    assert_eq!(ids(&doc), newest_first, "{doc:#}");
    let doc = list(&["list", "--due-within", "7d", "--output", "json"])
        .await
        .json();
    assert_eq!(ids(&doc), Vec::<String>::new(), "{doc:#}");
    let table = list(&["list", "--due-within", "7d"]).await;
    assert!(
        table.ok().starts_with("no request matched --due-before "),
        "{}",
        table.stdout
    );

    // Before the second's due date: the first only (strictly before).
    let second_due = submitted[1].1.clone();
    let run = dsrctl(
        &pair,
        "operator",
        &["list", "--due-before", &second_due, "--output", "json"],
    )
    .await;
    assert_eq!(ids(&run.json()), [submitted[0].0.clone()], "{}", run.stdout);

    // A page at a time: the next-page line names the instant to page on with, and following
    // it lists the rest; the table shows each request's due date.
    let mut seen = Vec::new();
    let first = list(&["list", "--due-within", "40d", "--limit", "2"]).await;
    let table = first.ok().to_string();
    assert!(
        table.lines().next().is_some_and(|h| h.contains("DUE")),
        "{table}"
    );
    let line = table
        .lines()
        .find_map(|l| l.strip_prefix("next page: "))
        .unwrap_or_else(|| panic!("no next page in {table}"));
    let flags: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(flags.len(), 4, "{line}");
    assert_eq!(
        (flags[0], flags[2]),
        ("--due-before", "--page-token"),
        "{line}"
    );
    for l in table
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("next page"))
    {
        seen.push(l.split_whitespace().next().expect("an id").to_string());
    }
    let mut args = vec!["list", "--limit", "2", "--output", "json"];
    args.extend(&flags);
    let rest = dsrctl(&pair, "operator", &args).await.json();
    seen.extend(ids(&rest));
    assert_eq!(seen, newest_first);
    assert_eq!(rest["next_page_token"], "", "{rest:#}");

    // The token with another instant is refused, naming what to do.
    let mut other = vec!["list", "--limit", "2", "--due-before", &second_due];
    other.extend(&flags[2..]);
    let refused = dsrctl(&pair, "operator", &other).await;
    refused.expect_code(2);
    assert!(
        refused.stderr.contains("other filters"),
        "{}",
        refused.stderr
    );

    // The two flags conflict, and a bad span is refused before anything is sent.
    let both = list(&["list", "--due-within", "7d", "--due-before", "2027-01-01"]).await;
    assert_ne!(both.code, Some(0), "{}", both.stdout);
    assert!(
        both.stderr.contains("cannot be used with"),
        "{}",
        both.stderr
    );
    let bad = list(&["list", "--due-within", "72"]).await;
    assert_ne!(bad.code, Some(0), "{}", bad.stdout);
    assert!(bad.stderr.contains("e.g. 30m, 72h"), "{}", bad.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_soon_is_listed_on_sqlite() {
    due_soon_is_listed(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_soon_is_listed_on_postgres() {
    due_soon_is_listed(Backend::Postgres).await;
}
