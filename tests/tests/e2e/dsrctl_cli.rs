//! The real `dsrctl` binary against a real pair: every RPC command, its table and JSON
//! output, its exit status (0 success, 1 setup or connection problem or a watched request
//! that did not complete, 2 error answer) and where it takes its connection settings from.
//!
//! dsrctl's own crate tests only what needs no registry (`pki init`, usage errors).

use std::ffi::OsString;
use std::process::Stdio;
use std::time::Duration;

use dsrelay_proto::v1::{GetRequest, RequestState, TaskState};
use dsrelay_registry::deadline::due_at;
use dsrelay_runtime::pki::{dev_identity, DevCa};
use dsrelay_runtime::store::now_ms;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tonic::Code;

use crate::harness::dsrctl::{
    as_party, command, dsrctl, endpoint, output, tls_flags, REGISTRY_IDENTITY,
};
use crate::harness::{
    count, spawn_pair, wait_until, Holder, PairOptions, Role, TestPair, PROCESSOR,
};

const MAIJA: &str = "teemu.testaaja@example.fi";
/// Nothing listens on port 1: connections are refused at once.
const UNREACHABLE: &str = "https://127.0.0.1:1";

/// The value of the `label  value` row of a headless table.
fn field<'a>(table: &'a str, label: &str) -> Option<&'a str> {
    table.lines().find_map(|line| {
        let rest = line.strip_prefix(label)?;
        rest.starts_with("  ").then(|| rest.trim())
    })
}

/// Whether some line of `table` starts with these whitespace-separated cells.
fn has_row(table: &str, cells: &[&str]) -> bool {
    table.lines().any(|line| {
        line.split_whitespace()
            .take(cells.len())
            .eq(cells.iter().copied())
    })
}

/// Milliseconds since the epoch of an RFC 3339 UTC time as dsrctl prints it in JSON
/// (`2024-05-01T10:00:00Z`, optionally with a fraction of a second).
fn rfc3339_ms(s: &str) -> i64 {
    let bad = || panic!("not an RFC 3339 UTC time: {s:?}");
    let Some((date, time)) = s.strip_suffix('Z').and_then(|s| s.split_once('T')) else {
        bad()
    };
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let numbers = |text: &str, sep: char| -> Vec<i64> {
        text.split(sep)
            .map(|p| p.parse().unwrap_or_else(|_| bad()))
            .collect()
    };
    let (d, t) = (numbers(date, '-'), numbers(hms, ':'));
    assert!(d.len() == 3 && t.len() == 3, "{s:?}");
    let millis: i64 = format!("{fraction:0<3}")[..3]
        .parse()
        .unwrap_or_else(|_| bad());
    // Days from the civil date (H. Hinnant's algorithm).
    let (month, day) = (d[1], d[2]);
    let year = if month <= 2 { d[0] - 1 } else { d[0] };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    ((days * 24 + t[0]) * 60 + t[1]) * 60 * 1000 + t[2] * 1000 + millis
}

#[test]
fn rfc3339_ms_parses_what_dsrctl_prints() {
    assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), 0);
    assert_eq!(rfc3339_ms("2023-11-14T22:13:20Z"), 1_700_000_000_000);
    assert_eq!(rfc3339_ms("2024-02-29T00:00:01.5Z"), 1_709_164_801_500);
    assert_eq!(
        rfc3339_ms("2024-03-01T00:00:00.123456789Z"),
        1_709_251_200_123
    );
}

/// The registry's own view of a request, as the party `stem` sees it.
async fn registry_view(
    setup: &TestPair,
    stem: &str,
    id: &str,
) -> Result<dsrelay_proto::v1::Request, tonic::Status> {
    let mut client = setup.client(stem);
    client
        .get(GetRequest {
            request_id: id.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_and_get_an_erasure_that_erases() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let s = &pair;

    let before = now_ms();
    let doc = dsrctl(
        s,
        "partner-crm",
        &[
            "submit", "--kind", "erasure", "--email", MAIJA, "--output", "json",
        ],
    )
    .await
    .json();
    let after = now_ms();
    let id = doc["request_id"].as_str().expect("request_id").to_string();
    assert_eq!(doc["state"], "RECEIVED", "{doc:#}");
    assert_eq!(doc["routed_to"], json!([PROCESSOR]), "{doc:#}");
    assert_eq!(doc["deduplicated"], false, "{doc:#}");
    assert_eq!(doc["trace_id"].as_str().map(str::len), Some(32), "{doc:#}");
    let key = doc["idempotency_key"].as_str().expect("key");
    assert!(
        uuid::Uuid::parse_str(key).is_ok(),
        "a generated UUID key: {key}"
    );
    // One calendar month after receipt, as the registry itself says.
    let due = rfc3339_ms(doc["due_at"].as_str().expect("due_at"));
    assert!(
        due >= due_at(before, 0) && due <= due_at(after, 0),
        "{doc:#}"
    );
    let view = registry_view(s, "partner-crm", &id).await.expect("get");
    assert_eq!(
        dsrelay_proto::millis_from_timestamp(&view.due_at.expect("due")),
        due
    );
    assert_eq!(view.idempotency_key, key);

    // Watch follows the request live until it completes.
    let run = dsrctl(s, "partner-crm", &["watch", &id]).await;
    let lines: Vec<Vec<&str>> = run
        .ok()
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(run.stderr, format!("request {id} ended COMPLETED\n"));
    assert_eq!(
        lines.first().map(|l| l[1]),
        Some("SUBMITTED"),
        "{}",
        run.stdout
    );
    assert_eq!(
        lines.last().map(|l| l[2]),
        Some("COMPLETED"),
        "{}",
        run.stdout
    );
    assert!(lines.iter().any(|l| l[1] == "DELIVERED"), "{}", run.stdout);

    // Replayed as JSON lines: ids increase, the last event is the completion.
    let run = dsrctl(s, "partner-crm", &["watch", &id, "--output", "json"]).await;
    let events: Vec<Value> = run
        .ok()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON document per line"))
        .collect();
    assert_eq!(events.len(), lines.len(), "{}", run.stdout);
    let event_ids: Vec<u64> = events
        .iter()
        .map(|e| e["event_id"].as_u64().expect("id"))
        .collect();
    assert!(event_ids.windows(2).all(|w| w[0] < w[1]), "{event_ids:?}");
    assert!(events.iter().all(|e| e["request_id"] == id.as_str()));
    assert_eq!(events[0]["type"], "SUBMITTED");
    assert_eq!(events.last().expect("events")["request_state"], "COMPLETED");

    // Nothing after the last event: the final state comes from Get, and it is still success.
    let last = event_ids.last().expect("events").to_string();
    let run = dsrctl(s, "partner-crm", &["watch", &id, "--after", &last]).await;
    assert_eq!(run.ok(), "");
    assert_eq!(run.stderr, format!("request {id} ended COMPLETED\n"));

    // Get as a table: header, deliveries and tasks, identity types without their values.
    let run = dsrctl(s, "partner-crm", &["get", &id]).await;
    let table = run.ok();
    assert_eq!(field(table, "request"), Some(id.as_str()), "{table}");
    assert_eq!(
        field(table, "partner"),
        Some(view.partner.as_str()),
        "{table}"
    );
    assert_eq!(field(table, "kind"), Some("ERASURE"), "{table}");
    assert_eq!(field(table, "state"), Some("COMPLETED"), "{table}");
    assert_eq!(field(table, "overdue"), Some("no"), "{table}");
    assert_eq!(field(table, "identities"), Some("EMAIL"), "{table}");
    assert_eq!(field(table, "categories"), Some("all"), "{table}");
    assert!(!table.contains(MAIJA), "{table}");
    assert!(
        has_row(table, &["PROCESSOR", "STATE", "ATTEMPTS"]),
        "{table}"
    );
    assert!(has_row(table, &[PROCESSOR, "DELIVERED"]), "{table}");
    // 2 contacts deleted, 3 invoices anonymized, 1 customer deleted.
    assert!(
        has_row(table, &[PROCESSOR, "accounting", "COMPLETED", "3", "4"]),
        "{table}"
    );
    assert!(
        has_row(table, &[PROCESSOR, "mail-marketing", "COMPLETED"]),
        "{table}"
    );

    // Get as JSON: the same, with the identity values.
    let doc = dsrctl(s, "partner-crm", &["get", &id, "--output", "json"])
        .await
        .json();
    assert_eq!(doc["state"], "COMPLETED", "{doc:#}");
    assert_eq!(doc["kind"], "ERASURE", "{doc:#}");
    assert_eq!(
        doc["identities"],
        json!([{"type": "EMAIL", "encoding": "RAW", "value": MAIJA}]),
        "{doc:#}"
    );
    assert_eq!(doc["deliveries"][0]["processor"], PROCESSOR, "{doc:#}");
    assert_eq!(doc["deliveries"][0]["state"], "DELIVERED", "{doc:#}");
    let tasks = doc["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 2, "{doc:#}");
    let accounting = tasks
        .iter()
        .find(|t| t["subprocessor"] == "accounting")
        .expect("accounting task");
    assert_eq!(accounting["state"], "COMPLETED");
    assert_eq!(accounting["records_affected"], 4);
    assert_eq!(accounting["confirmed"], true);
    assert_eq!(rfc3339_ms(doc["due_at"].as_str().expect("due")), due);

    // And the data is really gone from the accounting system.
    let url = &s.accounting_url;
    assert_eq!(
        count(
            url,
            &format!("SELECT COUNT(*) FROM customers WHERE email = '{MAIJA}'")
        )
        .await,
        0
    );
    assert_eq!(count(url, "SELECT COUNT(*) FROM customers").await, 5);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_flags_reach_the_registry_and_keys_deduplicate() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let s = &pair;
    let args = [
        "submit",
        "--kind",
        "rectification",
        "--email",
        "matti@example.fi",
        "--customer-number",
        "C-1",
        "--category",
        "contact",
        "--correct",
        "phone=+358401234567",
        "--note",
        "ticket 7",
    ];
    let run = dsrctl(s, "partner-crm", &args).await;
    let table = run.ok();
    let id = field(table, "request").expect("request row").to_string();
    assert_eq!(field(table, "state"), Some("RECEIVED"), "{table}");
    assert_eq!(field(table, "routed to"), Some(PROCESSOR), "{table}");
    assert_eq!(field(table, "trace id").map(str::len), Some(32), "{table}");
    assert_eq!(field(table, "deduplicated"), None, "{table}");
    let key = field(table, "idempotency key")
        .expect("key row")
        .to_string();
    assert!(uuid::Uuid::parse_str(&key).is_ok(), "{table}");
    assert!(
        field(table, "due").is_some_and(|d| d.ends_with('Z')),
        "{table}"
    );

    // What the registry stored is what the flags said.
    let doc = dsrctl(s, "partner-crm", &["get", &id, "--output", "json"])
        .await
        .json();
    assert_eq!(doc["kind"], "RECTIFICATION", "{doc:#}");
    assert_eq!(
        doc["identities"],
        json!([
            {"type": "EMAIL", "encoding": "RAW", "value": "matti@example.fi"},
            {"type": "CUSTOMER_NUMBER", "encoding": "RAW", "value": "C-1"},
        ]),
        "{doc:#}"
    );
    assert_eq!(doc["data_categories"], json!(["contact"]), "{doc:#}");
    assert_eq!(
        doc["corrections"],
        json!([{"field": "phone", "new_value": "+358401234567"}]),
        "{doc:#}"
    );
    assert_eq!(doc["note"], "ticket 7", "{doc:#}");
    assert_eq!(doc["idempotency_key"], key.as_str(), "{doc:#}");
    let table = dsrctl(s, "partner-crm", &["get", &id]).await;
    let table = table.ok();
    assert_eq!(
        field(table, "identities"),
        Some("EMAIL, CUSTOMER_NUMBER"),
        "{table}"
    );
    assert_eq!(
        field(table, "correct"),
        Some("phone = +358401234567"),
        "{table}"
    );
    assert_eq!(field(table, "note"), Some("ticket 7"), "{table}");

    // The same flags under the printed key: the same request, marked as a duplicate.
    let mut again = args.to_vec();
    again.extend(["--idempotency-key", key.as_str()]);
    let run = dsrctl(s, "partner-crm", &again).await;
    let table = run.ok();
    assert_eq!(field(table, "request"), Some(id.as_str()), "{table}");
    assert!(
        field(table, "deduplicated").is_some_and(|d| d.starts_with("yes")),
        "{table}"
    );

    // The key with another body is refused; no retry note, since the key was given.
    let run = dsrctl(
        s,
        "partner-crm",
        &[
            "submit",
            "--kind",
            "erasure",
            "--email",
            "matti@example.fi",
            "--idempotency-key",
            &key,
        ],
    )
    .await;
    run.expect_code(2);
    assert!(
        run.stderr.starts_with("error: ALREADY_EXISTS: ") && run.stderr.contains(&id),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("note:"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert_eq!(run.stdout, "");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_and_pages() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let s = &pair;
    let mut ids = Vec::new();
    for i in 0..5 {
        let kind = if i % 2 == 1 { "objection" } else { "erasure" };
        let mail = format!("p{i}@example.fi");
        let doc = dsrctl(
            s,
            "partner-crm",
            &[
                "submit", "--kind", kind, "--email", &mail, "--output", "json",
            ],
        )
        .await
        .json();
        ids.push(doc["request_id"].as_str().expect("id").to_string());
    }
    let theirs = dsrctl(
        s,
        "partner-webform",
        &[
            "submit",
            "--kind",
            "erasure",
            "--email",
            "w@example.fi",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let theirs = theirs["request_id"].as_str().expect("id").to_string();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    let listed_ids = |doc: &Value| -> Vec<String> {
        doc["requests"]
            .as_array()
            .expect("requests")
            .iter()
            .map(|r| r["request_id"].as_str().expect("id").to_string())
            .collect()
    };

    // One page at a time, following the printed token.
    let first = dsrctl(
        s,
        "partner-crm",
        &["list", "--limit", "2", "--output", "json"],
    )
    .await
    .json();
    assert_eq!(listed_ids(&first), newest_first[..2], "{first:#}");
    let token = first["next_page_token"]
        .as_str()
        .expect("token")
        .to_string();
    assert!(!token.is_empty(), "{first:#}");
    let second = dsrctl(
        s,
        "partner-crm",
        &[
            "list",
            "--limit",
            "2",
            "--page-token",
            &token,
            "--output",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(listed_ids(&second), newest_first[2..4], "{second:#}");
    assert_eq!(second["requests"][1]["kind"], "OBJECTION", "{second:#}");

    // The table names the next page.
    let run = dsrctl(s, "partner-crm", &["list", "--limit", "2"]).await;
    let table = run.ok();
    assert!(
        has_row(
            table,
            &["ID", "KIND", "STATE", "RECEIVED", "DUE", "OVERDUE"]
        ),
        "{table}"
    );
    assert!(has_row(table, &[newest_first[0]]), "{table}");
    assert!(
        table.contains(&format!("next page: --page-token {token}\n")),
        "{table}"
    );

    // --all follows every page; the other partner's request is not there.
    let run = dsrctl(s, "partner-crm", &["list", "--all", "--limit", "2"]).await;
    let table = run.ok();
    let listed: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(listed, newest_first, "{table}");
    assert!(!table.contains("next page"), "{table}");
    assert!(!table.contains(&theirs), "{table}");

    // Filters.
    let doc = dsrctl(
        s,
        "partner-crm",
        &["list", "--kind", "objection", "--output", "json"],
    )
    .await
    .json();
    assert_eq!(
        listed_ids(&doc),
        [newest_first[1], newest_first[3]],
        "{doc:#}"
    );
    assert!(doc["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .all(|r| r["kind"] == "OBJECTION"));
    let doc = dsrctl(s, "partner-crm", &["list", "--overdue", "--output", "json"])
        .await
        .json();
    assert_eq!(
        doc["requests"],
        json!([]),
        "fresh requests are not overdue: {doc:#}"
    );
    assert_eq!(doc["next_page_token"], "", "{doc:#}");
    // Every request completes (nobody in the sample has these addresses: NOT_FOUND
    // at accounting, the objections suppressed at the mail system); the state filter then
    // finds them all under COMPLETED and none under FAILED.
    let mut crm = s.client("partner-crm");
    for id in &newest_first {
        wait_until(&mut crm, id, Duration::from_secs(20), |r| {
            r.state == RequestState::Completed as i32
        })
        .await;
    }
    let doc = dsrctl(
        s,
        "partner-crm",
        &[
            "list",
            "--state",
            "completed",
            "--state",
            "cancelled",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(listed_ids(&doc), newest_first, "{doc:#}");
    let doc = dsrctl(
        s,
        "partner-crm",
        &["list", "--state", "failed", "--output", "json"],
    )
    .await
    .json();
    assert_eq!(doc["requests"], json!([]), "{doc:#}");
    let doc = dsrctl(
        s,
        "partner-crm",
        &["list", "--state", "cancelled", "--output", "json"],
    )
    .await
    .json();
    assert_eq!(doc["requests"], json!([]), "{doc:#}");

    // The operator sees every partner's requests.
    let doc = dsrctl(s, "operator", &["list", "--all", "--output", "json"])
        .await
        .json();
    let all = listed_ids(&doc);
    assert_eq!(all.len(), 6, "{doc:#}");
    assert_eq!(all[0], theirs);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_watch_and_only_operators_extend() {
    // The processor is down: requests stay open to cancel and extend, and the cancelled one
    // stays CANCELLED, its delivery withdrawn before the processor could have it. (Were a
    // holder working, the watch would follow on until it reported: a cancellation that
    // turns out to have stopped nothing gives way to what the holders did.)
    let pair = spawn_pair(PairOptions {
        down: vec![Role::Processor],
        ..Default::default()
    })
    .await
    .expect("pair");
    let s = &pair;
    let submit = |mail: &'static str| async move {
        let doc = dsrctl(
            s,
            "partner-crm",
            &[
                "submit", "--kind", "erasure", "--email", mail, "--output", "json",
            ],
        )
        .await
        .json();
        doc["request_id"].as_str().expect("id").to_string()
    };

    // A watch is running when the request is cancelled: it ends, exiting 1.
    let id = submit("cancel.me@example.fi").await;
    let mut cmd = as_party(s, "partner-crm");
    cmd.args(["watch", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut watch = cmd.spawn().expect("spawning dsrctl watch");
    let mut stdout = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("a first event in time")
        .expect("reading the watch")
        .expect("a first event");
    assert_eq!(
        first.split_whitespace().nth(1),
        Some("SUBMITTED"),
        "{first}"
    );

    let run = dsrctl(
        s,
        "partner-crm",
        &["cancel", &id, "--reason", "subject withdrew"],
    )
    .await;
    let table = run.ok();
    assert_eq!(field(table, "state"), Some("CANCELLED"), "{table}");
    assert_eq!(
        field(table, "cancelled"),
        Some("subject withdrew"),
        "{table}"
    );

    let mut rest = Vec::new();
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = stdout.next_line().await.expect("reading the watch") {
            rest.push(line);
        }
        watch.wait().await.expect("waiting for dsrctl watch")
    })
    .await
    .expect("the watch ended after the cancel");
    let mut stderr = String::new();
    watch
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .await
        .expect("reading stderr");
    assert_eq!(status.code(), Some(1), "{stderr}\n{rest:#?}");
    assert_eq!(stderr, format!("request {id} ended CANCELLED\n"));
    let last = rest.last().map(String::as_str).unwrap_or(&first);
    assert_eq!(
        last.split_whitespace().nth(2),
        Some("CANCELLED"),
        "{rest:#?}"
    );

    // Watching a cancelled request replays it and exits 1 too.
    let run = dsrctl(s, "partner-crm", &["watch", &id, "--output", "json"]).await;
    run.expect_code(1);
    let last: Value =
        serde_json::from_str(run.stdout.lines().last().expect("events")).expect("JSON line");
    assert_eq!(last["request_state"], "CANCELLED", "{}", run.stdout);
    assert_eq!(run.stderr, format!("request {id} ended CANCELLED\n"));

    // It cannot be cancelled twice.
    let run = dsrctl(s, "partner-crm", &["cancel", &id, "--reason", "again"]).await;
    run.expect_code(2);
    assert!(
        run.stderr.starts_with(&format!(
            "error: FAILED_PRECONDITION: request {id} is CANCELLED"
        )),
        "{}",
        run.stderr
    );

    // Extending: operators only, two months in all.
    let id = submit("extend.me@example.fi").await;
    let run = dsrctl(
        s,
        "partner-crm",
        &["extend", &id, "--months", "1", "--reason", "complex"],
    )
    .await;
    run.expect_code(2);
    assert!(
        run.stderr.starts_with("error: PERMISSION_DENIED: "),
        "{}",
        run.stderr
    );
    assert_eq!(run.stdout, "");
    let doc = dsrctl(
        s,
        "operator",
        &[
            "extend",
            &id,
            "--months",
            "2",
            "--reason",
            "many archives to search",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    assert_eq!(
        doc["extension_reasons"],
        json!(["many archives to search"]),
        "{doc:#}"
    );
    let received = rfc3339_ms(doc["received_at"].as_str().expect("received"));
    assert_eq!(
        rfc3339_ms(doc["due_at"].as_str().expect("due")),
        due_at(received, 2),
        "{doc:#}"
    );
    let run = dsrctl(
        s,
        "operator",
        &["extend", &id, "--months", "1", "--reason", "more"],
    )
    .await;
    run.expect_code(2);
    assert!(
        run.stderr.starts_with("error: INVALID_ARGUMENT: ") && run.stderr.contains("months"),
        "{}",
        run.stderr
    );
    // The partner sees the extension.
    let run = dsrctl(s, "partner-crm", &["get", &id]).await;
    assert_eq!(
        field(run.ok(), "extended"),
        Some("many archives to search"),
        "{}",
        run.stdout
    );
    pair.stop().await;
}

/// The registry ends every Watch stream after `watch.max_stream_ms` with UNAVAILABLE;
/// `dsrctl watch` watches again after the last event it printed, so a request that outlives
/// several streams is still followed to its end, each event printed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_a_request_across_the_ends_of_its_streams() {
    const LIFETIME_MS: u64 = 400;
    // The mail system takes 4 s: the request outlives several streams.
    let pair = spawn_pair(PairOptions {
        mail_delay_ms: 4000,
        watch: Some(dsrelay_registry::config::WatchConfig {
            max_stream_ms: LIFETIME_MS,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("pair");
    let s = &pair;
    let doc = dsrctl(
        s,
        "partner-crm",
        &[
            "submit",
            "--kind",
            "erasure",
            "--email",
            "watch.resumes@example.fi",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let id = doc["request_id"].as_str().expect("request_id").to_string();
    let started = std::time::Instant::now();
    let live = dsrctl(s, "partner-crm", &["watch", &id, "--output", "json"]).await;
    let took = started.elapsed();
    live.expect_code(0);
    assert_eq!(live.stderr, format!("request {id} ended COMPLETED\n"));
    assert!(
        took > Duration::from_millis(3 * LIFETIME_MS),
        "the watch outlived several streams: {took:?}"
    );
    let ids = |stdout: &str| -> Vec<u64> {
        stdout
            .lines()
            .map(|l| {
                let e: Value = serde_json::from_str(l).expect("one JSON document per line");
                e["event_id"].as_u64().expect("event_id")
            })
            .collect()
    };
    let printed = ids(&live.stdout);
    let mut unique = printed.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), printed.len(), "no event twice: {printed:?}");
    // Nothing missed either: a replay of the finished request (one stream) has the same.
    let replay = dsrctl(s, "partner-crm", &["watch", &id, "--output", "json"]).await;
    let mut replayed = ids(replay.ok());
    replayed.sort_unstable();
    assert_eq!(unique, replayed, "\n{}\n{}", live.stdout, replay.stdout);
    let last: Value =
        serde_json::from_str(live.stdout.lines().last().expect("events")).expect("JSON line");
    assert_eq!(last["request_state"], "COMPLETED", "{}", live.stdout);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_exit_2() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let s = &pair;

    for args in [
        &["get", "no-such-request"][..],
        &["watch", "no-such-request"],
        &["cancel", "no-such-request", "--reason", "x"],
    ] {
        let run = dsrctl(s, "partner-crm", args).await;
        run.expect_code(2);
        assert_eq!(
            run.stderr,
            "error: NOT_FOUND: request no-such-request not found\n"
        );
        assert_eq!(run.stdout, "");
    }

    // Another partner's request is not found either.
    let doc = dsrctl(
        s,
        "partner-webform",
        &[
            "submit",
            "--kind",
            "objection",
            "--email",
            "w@example.fi",
            "--output",
            "json",
        ],
    )
    .await
    .json();
    let theirs = doc["request_id"].as_str().expect("id");
    let run = dsrctl(s, "partner-crm", &["get", theirs]).await;
    run.expect_code(2);
    assert_eq!(
        run.stderr,
        format!("error: NOT_FOUND: request {theirs} not found\n")
    );

    // dsrctl does not check e-mail addresses itself: the registry's answer names the field.
    // A refusal stored nothing, so no retry note (its key) comes with it.
    let run = dsrctl(
        s,
        "partner-crm",
        &["submit", "--kind", "erasure", "--email", "not-an-address"],
    )
    .await;
    run.expect_code(2);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(
        lines[0].starts_with("error: INVALID_ARGUMENT: ")
            && lines[0].contains("identities[0].value")
            && lines[0].contains("e-mail"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stdout, "");

    // A category no processor holds.
    let run = dsrctl(
        s,
        "partner-crm",
        &[
            "submit",
            "--kind",
            "erasure",
            "--email",
            "a@example.fi",
            "--category",
            "nosuch",
        ],
    )
    .await;
    run.expect_code(2);
    assert!(
        run.stderr.contains("error: INVALID_ARGUMENT: ")
            && run.stderr.contains("scope.data_categories[0]"),
        "{}",
        run.stderr
    );

    // A processor's certificate may not use the partner API.
    let run = dsrctl(s, "processor", &["list"]).await;
    run.expect_code(2);
    assert!(
        run.stderr.starts_with("error: PERMISSION_DENIED: "),
        "{}",
        run.stderr
    );

    // Nothing of that was stored.
    assert_eq!(
        count(s.registry.database_url(), "SELECT COUNT(*) FROM requests").await,
        1
    );
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_problems_exit_1() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let s = &pair;
    let run_with = |endpoint: String, identity: &'static str| async move {
        let mut cmd = command(s.dir());
        let mut flags = tls_flags(s, "partner-crm");
        flags.truncate(6);
        cmd.args([
            "list",
            "--endpoint",
            &endpoint,
            "--server-identity",
            identity,
        ])
        .args(flags);
        output(cmd).await
    };

    let run = run_with(UNREACHABLE.into(), REGISTRY_IDENTITY).await;
    run.expect_code(1);
    assert!(
        run.stderr.starts_with(&format!(
            "error: UNAVAILABLE: cannot reach the registry at {UNREACHABLE}"
        )) && !run.stderr.contains("certificate"),
        "{}",
        run.stderr
    );

    // A processor command names the processor it could not reach, not the registry.
    let mut cmd = command(s.dir());
    let mut flags = tls_flags(s, "operator");
    flags.truncate(6);
    cmd.args([
        "tasks",
        "list",
        "--processor",
        UNREACHABLE,
        "--processor-identity",
        "spiffe://dsrelay.dev/processor/payroll-bureau",
        "--server-identity",
        REGISTRY_IDENTITY,
    ])
    .args(flags);
    let run = output(cmd).await;
    run.expect_code(1);
    assert!(
        run.stderr.starts_with(&format!(
            "error: UNAVAILABLE: cannot reach the processor at {UNREACHABLE}"
        )),
        "{}",
        run.stderr
    );

    // The registry is not who dsrctl was told to expect.
    let run = run_with(endpoint(s), "spiffe://dsrelay.dev/processor/x").await;
    run.expect_code(1);
    assert!(
        run.stderr
            .starts_with("error: UNAVAILABLE: cannot reach the registry at")
            && run
                .stderr
                .contains("is not the expected spiffe://dsrelay.dev/processor/x"),
        "{}",
        run.stderr
    );

    // The processor's endpoint: a certificate of the same CA, but not the registry's.
    let processor = format!("https://localhost:{}", s.processor.addr().port());
    let run = run_with(processor, REGISTRY_IDENTITY).await;
    run.expect_code(1);
    assert!(run.stderr.contains(REGISTRY_IDENTITY), "{}", run.stderr);

    // The right registry, for contrast.
    let run = run_with(endpoint(s), REGISTRY_IDENTITY).await;
    run.ok();
    pair.stop().await;
}

/// The registry closes a connection whose client certificate it refuses as soon as it sees
/// that certificate, which under TLS 1.3 is after the client finished its handshake: the
/// client sees the connection close, or the registry's alert, depending on when it wrote.
/// dsrctl says what to check either way; a refused TCP connection
/// (`connection_problems_exit_1`) keeps the network wording.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_certificate_is_named_as_a_likely_cause() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let s = &pair;
    let dir = s.dir().join("refused");
    std::fs::create_dir_all(&dir).expect("dir");
    // A configured partner's identity, issued by a CA the registry does not trust; and the
    // registry's own CA presented as if it were a party's certificate.
    let rogue = DevCa::generate("dsrelay development CA").expect("rogue ca");
    let leaf = rogue
        .issue("dsrelay rogue party", &dev_identity("partner", "crm"))
        .expect("rogue leaf");
    std::fs::write(dir.join("rogue.pem"), leaf.cert_pem).expect("cert");
    std::fs::write(dir.join("rogue.key"), leaf.key_pem).expect("key");
    let ca_as_leaf = (s.pki().ca(), s.pki().ca().with_extension("key"));
    for (what, cert, key) in [
        ("another CA's", dir.join("rogue.pem"), dir.join("rogue.key")),
        ("the CA's own", ca_as_leaf.0, ca_as_leaf.1),
    ] {
        let mut cmd = command(s.dir());
        cmd.arg("--endpoint")
            .arg(endpoint(s))
            .arg("--ca")
            .arg(s.pki().ca())
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["--server-identity", REGISTRY_IDENTITY, "list"]);
        let run = output(cmd).await;
        run.expect_code(1);
        let expected = "the connection closed before the registry answered, which is what \
                        a registry that refuses this client's certificate does";
        assert!(
            run.stderr.starts_with("error: ")
                && run
                    .stderr
                    .contains(&format!("cannot reach the registry at {}: ", endpoint(s)))
                && run.stderr.contains(expected)
                && run.stderr.contains("issued by the CA the registry trusts")
                && run.stderr.contains("revocation list"),
            "{what} certificate: {}",
            run.stderr
        );
    }
    // The party's own certificate, for contrast.
    dsrctl(s, "partner-crm", &["list"]).await.ok();
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_from_config_file_environment_and_dev_pki() {
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let s = &pair;
    let elsewhere = tempfile::tempdir().expect("tempdir");

    // A config file as the webform partner; its paths are relative to its own folder.
    let conf_dir = s.dir().join("conf");
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    let write_conf = |name: &str, endpoint: &str| {
        let path = conf_dir.join(name);
        let text = format!(
            "endpoint = \"{endpoint}\"\nca = \"../pki/ca.pem\"\ncert = \"../pki/partner-webform.pem\"\n\
             key = \"../pki/partner-webform.key\"\nserver_identity = \"{REGISTRY_IDENTITY}\"\n"
        );
        std::fs::write(&path, text).expect("writing the config");
        path
    };
    let good = write_conf("dsrctl.toml", &endpoint(s));
    let bad_endpoint = write_conf("unreachable.toml", UNREACHABLE);

    let mut cmd = command(elsewhere.path());
    cmd.arg("--config").arg(&good).args([
        "submit",
        "--kind",
        "objection",
        "--email",
        "w@example.fi",
        "--output",
        "json",
    ]);
    let doc = output(cmd).await.json();
    let theirs = doc["request_id"].as_str().expect("id").to_string();
    // Submitted as webform: only webform (and operators) can see it.
    registry_view(s, "partner-webform", &theirs)
        .await
        .expect("webform sees it");
    let err = registry_view(s, "partner-crm", &theirs)
        .await
        .expect_err("not crm's");
    assert_eq!(err.code(), Code::NotFound);

    // DSRCTL_CONFIG names the file too.
    let mut cmd = command(elsewhere.path());
    cmd.env("DSRCTL_CONFIG", &good).args(["get", &theirs]);
    let run = output(cmd).await;
    assert!(field(run.ok(), "state").is_some(), "{}", run.stdout);

    // Every setting from DSRCTL_* variables, as crm.
    let crm = s.pki().files("partner-crm");
    let env = [
        ("DSRCTL_ENDPOINT", OsString::from(endpoint(s))),
        ("DSRCTL_CA", crm.ca.into()),
        ("DSRCTL_CERT", crm.cert.into()),
        ("DSRCTL_KEY", crm.key.into()),
        ("DSRCTL_SERVER_IDENTITY", REGISTRY_IDENTITY.into()),
    ];
    let mut cmd = command(elsewhere.path());
    cmd.envs(env.clone()).args([
        "submit",
        "--kind",
        "erasure",
        "--email",
        "c@example.fi",
        "--output",
        "json",
    ]);
    let doc = output(cmd).await.json();
    let ours = doc["request_id"].as_str().expect("id").to_string();
    registry_view(s, "partner-crm", &ours)
        .await
        .expect("crm sees it");
    let mut cmd = command(elsewhere.path());
    cmd.envs(env).args(["get", &theirs]);
    let run = output(cmd).await;
    run.expect_code(2);
    assert_eq!(
        run.stderr,
        format!("error: NOT_FOUND: request {theirs} not found\n")
    );

    // Precedence: the file's endpoint is used only when no variable or flag gives one.
    let mut cmd = command(elsewhere.path());
    cmd.env("DSRCTL_CONFIG", &bad_endpoint).arg("list");
    let run = output(cmd).await;
    run.expect_code(1);
    assert!(run.stderr.contains(UNREACHABLE), "{}", run.stderr);
    let mut cmd = command(elsewhere.path());
    cmd.env("DSRCTL_CONFIG", &bad_endpoint)
        .env("DSRCTL_ENDPOINT", endpoint(s))
        .arg("list");
    output(cmd).await.ok();
    let mut cmd = command(elsewhere.path());
    cmd.env("DSRCTL_CONFIG", &bad_endpoint)
        .env("DSRCTL_ENDPOINT", UNREACHABLE)
        .args(["list", "--endpoint", &endpoint(s)]);
    let run = output(cmd).await;
    assert!(has_row(run.ok(), &[theirs.as_str()]), "{}", run.stdout);

    // With no TLS settings at all, the dev PKI in ./.dsrelay/pki: the operator, who sees
    // every partner's requests.
    let dev = elsewhere.path().join(".dsrelay/pki");
    std::fs::create_dir_all(&dev).expect("dev pki dir");
    for file in ["ca.pem", "operator.pem", "operator.key"] {
        std::fs::copy(s.pki().dir.join(file), dev.join(file)).expect("copying the dev pki");
    }
    let mut cmd = command(elsewhere.path());
    cmd.env("DSRCTL_ENDPOINT", endpoint(s))
        .args(["list", "--output", "json"]);
    let doc = output(cmd).await.json();
    let mut ids: Vec<&str> = doc["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .map(|r| r["request_id"].as_str().expect("id"))
        .collect();
    ids.sort_unstable();
    let mut expected = [theirs.as_str(), ours.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected, "{doc:#}");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_and_manual_tasks_from_the_command_line() {
    let pair = spawn_pair(PairOptions {
        holders: vec![
            Holder::Accounting,
            Holder::MailMarketing,
            Holder::PaperArchive,
        ],
        ..Default::default()
    })
    .await
    .expect("pair");
    let setup = &pair;

    // The chain: the processor and its three subprocessors with countries and mechanisms.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let chain = loop {
        let chain = dsrctl(setup, "operator", &["--output", "json", "chain"])
            .await
            .json();
        if chain["processors"][0]["reported_at"].is_string() {
            break chain;
        }
        assert!(tokio::time::Instant::now() < deadline, "{chain:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let subs = chain["processors"][0]["subprocessors"]
        .as_array()
        .expect("list");
    assert_eq!(subs.len(), 3, "{chain:#}");
    assert_eq!(subs[1]["name"], "mail-marketing");
    assert_eq!(subs[1]["country"], "US");
    assert_eq!(subs[1]["transfer_mechanism"], "adequacy decision");
    let text = dsrctl(setup, "operator", &["chain"]).await;
    let text = text.ok();
    assert!(text.contains("paper-archive"), "{text}");
    assert!(text.contains("adequacy decision"), "{text}");

    // A manual task: listed for the processor's operator, then confirmed with evidence.
    let submitted = dsrctl(
        setup,
        "partner-crm",
        &[
            "--output",
            "json",
            "submit",
            "--kind",
            "erasure",
            "--email",
            "maija.meikalainen@example.fi",
            "--category",
            "archive",
        ],
    )
    .await
    .json();
    let id = submitted["request_id"].as_str().expect("id").to_string();
    let processor = format!("https://localhost:{}", setup.processor.addr().port());
    let tasks_flags = |cmd: &str| -> Vec<String> {
        vec![
            "tasks".into(),
            cmd.into(),
            "--processor".into(),
            processor.clone(),
            "--processor-identity".into(),
            "spiffe://dsrelay.dev/processor/payroll-bureau".into(),
        ]
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut args = vec!["--output".to_string(), "json".to_string()];
        args.extend(tasks_flags("list"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let list = dsrctl(setup, "operator", &args).await.json();
        if list["tasks"].as_array().is_some_and(|t| !t.is_empty()) {
            assert_eq!(list["tasks"][0]["request_id"], id.as_str());
            assert_eq!(
                list["tasks"][0]["identities"][0],
                "email=maija.meikalainen@example.fi"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{list:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A partner is not an operator of the processor.
    let mut args = tasks_flags("list");
    args.insert(0, "--output".into());
    args.insert(1, "json".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let denied = dsrctl(setup, "partner-crm", &args).await;
    denied.expect_code(2);
    assert!(
        denied.stderr.contains("PERMISSION_DENIED"),
        "{}",
        denied.stderr
    );

    let mut args = tasks_flags("complete");
    args.extend([
        "controller".to_string(),
        id.clone(),
        "paper-archive".into(),
        "--evidence".into(),
        "shredded folder C-1001".into(),
        "--records".into(),
        "1".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let done = dsrctl(setup, "operator", &args).await;
    assert!(done.ok().contains("COMPLETED"), "{}", done.stdout);
    let watch = dsrctl(setup, "partner-crm", &["watch", &id]).await;
    watch.expect_code(0);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_draws_the_propagation_from_stored_events() {
    let pair = spawn_pair(PairOptions {
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    .expect("pair");
    let setup = &pair;
    let submitted = dsrctl(
        setup,
        "partner-crm",
        &[
            "--output", "json", "submit", "--kind", "erasure", "--email", MAIJA,
        ],
    )
    .await
    .json();
    let id = submitted["request_id"].as_str().expect("id").to_string();
    let mut crm = setup.client("partner-crm");
    wait_until(&mut crm, &id, Duration::from_secs(20), |v| {
        v.deliveries
            .iter()
            .any(|d| d.attempts >= 2 && d.processor == "web-agency")
            && v.tasks.len() == 2
            && v.tasks
                .iter()
                .all(|t| t.state == TaskState::Completed as i32)
    })
    .await;

    let doc = dsrctl(setup, "operator", &["--output", "json", "trace", &id])
        .await
        .json();
    assert_eq!(doc["trace_id"], submitted["trace_id"], "{doc:#}");
    let hops = doc["processors"].as_array().expect("processors");
    let bureau = hops
        .iter()
        .find(|h| h["processor"] == PROCESSOR)
        .expect("bureau");
    assert_eq!(bureau["delivered"], true);
    assert!(bureau["delivered_after_ms"].as_i64().is_some());
    let tasks = bureau["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 2);
    for t in tasks {
        assert_eq!(t["state"], "COMPLETED", "{t:#}");
        assert_eq!(t["pending"], false);
        let steps: Vec<&str> = t["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .filter_map(|s| s[1].as_str())
            .collect();
        // A completed erasure comes with its signed deletion certificate.
        assert_eq!(
            steps,
            ["IN_PROGRESS", "COMPLETED", "CERTIFICATE_STORED"],
            "{t:#}"
        );
    }
    let absent = hops
        .iter()
        .find(|h| h["processor"] == "web-agency")
        .expect("absent");
    assert_eq!(absent["delivered"], false);
    assert!(
        absent["failures"].as_array().expect("failures").len() >= 2,
        "{absent:#}"
    );

    let text = dsrctl(setup, "operator", &["trace", &id]).await;
    let text = text.ok();
    assert!(text.contains("PENDING delivery"), "{text}");
    assert!(text.contains("retry +"), "{text}");
    assert!(text.contains("accounting  COMPLETED"), "{text}");
    // Another partner cannot trace it.
    let denied = dsrctl(setup, "partner-webform", &["trace", &id]).await;
    denied.expect_code(2);
    assert!(denied.stderr.contains("NOT_FOUND"), "{}", denied.stderr);
    pair.stop().await;
}

/// A request whose events pass what one ListEvents answer carries (4 MiB: 1,500 progress
/// events of 4 KB, as a long contract end's acknowledgements come to) is traced whole:
/// dsrctl follows every page. Before, ListEvents answered OUT_OF_RANGE and the request
/// could not be traced at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_follows_every_page_of_a_long_requests_events() {
    const MANY: i64 = 1_500;
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let setup = &pair;
    let submitted = dsrctl(
        setup,
        "partner-crm",
        &[
            "--output", "json", "submit", "--kind", "erasure", "--email", MAIJA,
        ],
    )
    .await
    .json();
    let id = submitted["request_id"].as_str().expect("id").to_string();
    let mut crm = setup.client("partner-crm");
    wait_until(&mut crm, &id, Duration::from_secs(20), |v| {
        v.state == RequestState::Completed as i32
    })
    .await;
    let url = setup.registry.database_url();
    let db = dsrelay_runtime::store::Db::connect(url)
        .await
        .expect("connect");
    // Straight into the store: as many acknowledgements would record them.
    let sql = format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {MANY}) \
         INSERT INTO events (request_id, type, occurred_at, request_state, processor, \
         subprocessor, task_state, sequence, message) \
         SELECT $1, {}, $2 + i, {}, '{PROCESSOR}', 'accounting', {}, 1, $3 || CAST(i AS TEXT) \
         FROM n",
        dsrelay_proto::v1::EventType::TaskUpdated as i32,
        RequestState::InProgress as i32,
        TaskState::InProgress as i32,
    );
    sqlx::query(&sql)
        .bind(&id)
        .bind(now_ms())
        .bind("x".repeat(4200))
        .execute(&db.pool)
        .await
        .expect("insert events");
    db.pool.close().await;
    let stored = count(
        url,
        &format!("SELECT COUNT(*) FROM events WHERE request_id = '{id}'"),
    )
    .await;

    let doc = dsrctl(setup, "operator", &["--output", "json", "trace", &id])
        .await
        .json();
    let hops = doc["processors"].as_array().expect("processors");
    let bureau = hops
        .iter()
        .find(|h| h["processor"] == PROCESSOR)
        .expect("bureau");
    let steps = |subprocessor: &str| {
        bureau["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .find(|t| t["subprocessor"] == subprocessor)
            .and_then(|t| t["steps"].as_array())
            .map_or(0, Vec::len)
    };
    // Every event drawn, the last ones too: they are on the last page.
    assert_eq!(
        steps("accounting") as i64,
        3 + MANY,
        "{stored} events stored"
    );
    let text = dsrctl(setup, "operator", &["trace", &id]).await;
    assert!(text.ok().contains("accounting"), "{}", text.stdout);
    pair.stop().await;
}
