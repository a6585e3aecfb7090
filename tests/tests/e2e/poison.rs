//! Poison acknowledgements: one the registry rejects does not hold back the others, is
//! counted by the registry per rejection, is dead-lettered after `acks.max_rejections`
//! rejections (visible in `dsrctl` and a metric) and can be requeued; an operator's maximal
//! note is fitted to the protocol's limits. Poison deliveries: a Deliver the processor keeps
//! refusing is dead-lettered after `delivery.max_refusals` refusals, and says so in Get, the
//! events, `dsrctl get` and a metric; an operator (never a partner) lists and requeues it once
//! the cause is fixed, and the request completes.

use std::time::Duration;

use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::processor_operator_service_client::ProcessorOperatorServiceClient;
use dsrelay_proto::v1::{
    Acknowledgement, CompleteManualTaskRequest, DeliveryState, EventType, ListAuditEntriesRequest,
    ListDeadLetteredDeliveriesRequest, ListManualTasksRequest, RequestState,
    RequeueDeliveryRequest, Scope, SubmitRequest, TaskState, WatchRequest,
};
use serde_json::Value;

use crate::harness::dsrctl::dsrctl;
use crate::harness::{
    count, erasure, spawn_pair, wait_until, Backend, Holder, PairOptions, Role, TestPair, PROCESSOR,
};

/// What the registry allows in `Acknowledgement.reason`.
const MAX_REASON: usize = 4096;

async fn scrape(addr: &str) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body")
}

fn gauge(text: &str, name: &str) -> f64 {
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .expect("a number")
}

/// `dsrctl tasks CMD --processor ... [EXTRA]` as the operator, output as JSON when `json`.
async fn tasks(
    pair: &TestPair,
    cmd: &str,
    extra: &[&str],
    json: bool,
) -> crate::harness::dsrctl::Run {
    let processor = format!("https://localhost:{}", pair.processor.addr().port());
    let mut args: Vec<&str> = Vec::new();
    if json {
        args.extend(["--output", "json"]);
    }
    args.extend([
        "tasks",
        cmd,
        "--processor",
        &processor,
        "--processor-identity",
        "spiffe://dsrelay.dev/processor/payroll-bureau",
    ]);
    args.extend(extra);
    dsrctl(pair, "operator", &args).await
}

async fn poison_ack_is_dead_lettered_and_blocks_nothing(backend: Backend) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        holders: vec![Holder::Accounting, Holder::PaperArchive],
        admin: true,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let admin = pair.processor.admin_addr().expect("admin").to_string();
    let mut crm = pair.client("partner-crm");
    let mut operator = ProcessorOperatorServiceClient::new(pair.channel_to_processor("operator"));

    // A request whose one task waits for an operator.
    let mut req = erasure("poison@example.fi");
    req.scope = Some(Scope {
        data_categories: vec!["archive".into()],
    });
    let id = crm
        .submit(req)
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let waiting = loop {
        let list = operator
            .list_manual_tasks(ListManualTasksRequest::default())
            .await
            .expect("list manual tasks")
            .into_inner();
        if let Some(t) = list.tasks.into_iter().next() {
            break t;
        }
        assert!(tokio::time::Instant::now() < deadline, "no manual task");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let task = waiting.task.clone().expect("task ref");

    // A poison acknowledgement queued ahead of everything that follows: its reason is over
    // the registry's limit, so the registry rejects it every time.
    let db = dsrelay_runtime::store::Db::connect(pair.processor.database_url())
        .await
        .expect("processor db");
    let poison = Acknowledgement {
        request_id: id.clone(),
        subprocessor: "ghost-holder".into(),
        sequence: 1,
        state: TaskState::InProgress as i32,
        reason: "x".repeat(MAX_REASON + 1),
        ..Default::default()
    };
    sqlx::query(
        "INSERT INTO ack_outbox (controller, request_id, subprocessor, sequence, payload, \
         next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&task.controller)
    .bind(&id)
    .bind("ghost-holder")
    .bind(1_i64)
    .bind(poison.encode_to_vec())
    .bind(0_i64)
    .execute(&db.pool)
    .await
    .expect("queue the poison acknowledgement");
    let poison_id: i64 = sqlx::query_scalar(
        "SELECT id FROM ack_outbox WHERE subprocessor = 'ghost-holder' AND sequence = 1",
    )
    .fetch_one(&db.pool)
    .await
    .expect("poison row");

    // The operator confirms with a note of the full 4096 bytes: the processor adds who
    // confirmed, and fits the whole to the limit. That acknowledgement, queued behind the
    // poison one, reaches the registry while the poison one is rejected.
    let note = "ä".repeat(MAX_REASON / 2);
    operator
        .complete_manual_task(CompleteManualTaskRequest {
            task: Some(task.clone()),
            not_found: false,
            records_affected: 1,
            evidence_note: note,
        })
        .await
        .expect("complete");
    let done = wait_until(&mut crm, &id, Duration::from_secs(20), |r| {
        r.state == RequestState::Completed as i32
    })
    .await;
    let archive = done
        .tasks
        .iter()
        .find(|t| t.subprocessor == "paper-archive")
        .expect("archive task");
    let note = &archive.evidence.as_ref().expect("evidence").note;
    assert!(note.len() <= MAX_REASON, "{}", note.len());
    assert!(note.starts_with("ää"), "{note}");
    assert!(
        done.tasks.iter().all(|t| t.subprocessor != "ghost-holder"),
        "a rejected acknowledgement was applied: {done:#?}"
    );

    // After five rejections (backoff 100 ms to 1 s) it is parked and shown.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let letters = loop {
        let list = tasks(&pair, "dead-letters", &[], true).await.json();
        let letters: Vec<Value> = list["dead_letters"].as_array().cloned().unwrap_or_default();
        if !letters.is_empty() {
            break letters;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let letter = &letters[0];
    assert_eq!(letter["id"], poison_id);
    assert_eq!(letter["request_id"], id.as_str());
    assert_eq!(letter["subprocessor"], "ghost-holder");
    assert_eq!(letter["sequence"], 1);
    assert_eq!(letter["rejections"], 5);
    let last = letter["last_rejection"].as_str().expect("last rejection");
    assert!(
        last.contains("InvalidArgument") && last.contains("acknowledgements[0].reason"),
        "{last}"
    );
    let table = tasks(&pair, "dead-letters", &[], false).await;
    let table = table.ok();
    assert!(
        table.contains("ghost-holder") && table.contains(&id),
        "{table}"
    );
    assert_eq!(
        gauge(
            &scrape(&admin).await,
            "dsrelay_processor_acks_dead_lettered"
        ),
        1.0
    );
    // The registry counted each of the five rejections, and nothing else as rejected.
    let registry_admin = pair
        .registry
        .admin_addr()
        .expect("registry admin")
        .to_string();
    let rejected = |reason: &str| {
        format!(
            r#"dsrelay_acknowledgements_rejected_total{{processor="{PROCESSOR}",reason="{reason}"}}"#
        )
    };
    let registry_metrics = scrape(&registry_admin).await;
    assert_eq!(gauge(&registry_metrics, &rejected("invalid")), 5.0);
    assert_eq!(gauge(&registry_metrics, &rejected("not_routed")), 0.0);

    // Parked means never sent again: its attempts stay where they are.
    let attempts = |pool: sqlx::AnyPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT CAST(attempts AS BIGINT) FROM ack_outbox WHERE id = $1",
        )
        .bind(poison_id)
        .fetch_one(&pool)
        .await
        .expect("attempts")
    };
    let before = attempts(db.pool.clone()).await;
    assert_eq!(before, 5);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        attempts(db.pool.clone()).await,
        before,
        "a dead letter was sent again"
    );

    // Requeueing an unknown id is refused; requeueing this one after the fix sends it again
    // and the registry applies it.
    let unknown = tasks(&pair, "requeue", &["999999"], false).await;
    assert_ne!(
        unknown.code,
        Some(0),
        "requeue of an unknown id: {}",
        unknown.stderr
    );
    assert!(
        unknown.stderr.contains("no dead letter 999999"),
        "{}",
        unknown.stderr
    );
    let mut fixed = poison.clone();
    fixed.reason = "fitted by hand".into();
    sqlx::query("UPDATE ack_outbox SET payload = $1 WHERE id = $2")
        .bind(fixed.encode_to_vec())
        .bind(poison_id)
        .execute(&db.pool)
        .await
        .expect("fix the payload");
    let requeued = tasks(&pair, "requeue", &[&poison_id.to_string()], false).await;
    assert!(requeued.ok().contains("requeued"), "{}", requeued.stdout);
    let view = wait_until(&mut crm, &id, Duration::from_secs(20), |r| {
        r.tasks.iter().any(|t| t.subprocessor == "ghost-holder")
    })
    .await;
    let ghost = view
        .tasks
        .iter()
        .find(|t| t.subprocessor == "ghost-holder")
        .expect("ghost task");
    assert_eq!(ghost.reason, "fitted by hand");
    let list = tasks(&pair, "dead-letters", &[], true).await.json();
    assert_eq!(
        list["dead_letters"].as_array().map_or(0, Vec::len),
        0,
        "{list:#}"
    );
    assert_eq!(
        gauge(
            &scrape(&admin).await,
            "dsrelay_processor_acks_dead_lettered"
        ),
        0.0
    );
    assert_eq!(
        gauge(&scrape(&registry_admin).await, &rejected("invalid")),
        5.0,
        "the fixed acknowledgement was rejected"
    );
    db.pool.close().await;
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_ack_is_dead_lettered_and_blocks_nothing_sqlite() {
    poison_ack_is_dead_lettered_and_blocks_nothing(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_ack_is_dead_lettered_and_blocks_nothing_postgres() {
    poison_ack_is_dead_lettered_and_blocks_nothing(Backend::Postgres).await;
}

async fn refused_delivery_is_dead_lettered(backend: Backend) {
    // The processor is down while the stored request is spoiled, so its first answer is a
    // refusal.
    let Some(mut pair) = spawn_pair(PairOptions {
        backend,
        admin: true,
        down: vec![Role::Processor],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let admin = pair.registry.admin_addr().expect("admin").to_string();
    let mut crm = pair.client("partner-crm");
    let id = crm
        .submit(erasure("refused@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    // A body the processor refuses every time: no request kind.
    let db = dsrelay_runtime::store::Db::connect(pair.registry.database_url())
        .await
        .expect("registry db");
    let body: Vec<u8> = sqlx::query_scalar("SELECT body FROM requests WHERE id = $1")
        .bind(&id)
        .fetch_one(&db.pool)
        .await
        .expect("body");
    let mut spoiled = SubmitRequest::decode(body.as_slice()).expect("a SubmitRequest");
    spoiled.kind = 0;
    sqlx::query("UPDATE requests SET body = $1 WHERE id = $2")
        .bind(spoiled.encode_to_vec())
        .bind(&id)
        .execute(&db.pool)
        .await
        .expect("spoil the body");
    let unavailable: i64 =
        sqlx::query_scalar("SELECT CAST(attempts AS BIGINT) FROM deliveries WHERE request_id = $1")
            .bind(&id)
            .fetch_one(&db.pool)
            .await
            .expect("attempts");
    pair.processor.start().await;

    // The delivery's error is shown to operators only.
    let view = wait_until(&mut pair.operator(), &id, Duration::from_secs(30), |r| {
        r.deliveries
            .iter()
            .any(|d| d.state == DeliveryState::DeadLettered as i32)
    })
    .await;
    let d = &view.deliveries[0];
    assert_eq!(d.processor, PROCESSOR);
    assert!(d.dead_lettered_at.is_some(), "{d:?}");
    assert!(d.next_attempt_at.is_none(), "{d:?}");
    assert!(d.last_error.contains("InvalidArgument"), "{d:?}");
    // Five refusals, after however many attempts found the processor down.
    assert!(i64::from(d.attempts) >= 5 + unavailable, "{d:?}");
    assert!(i64::from(d.attempts) <= 5 + unavailable + 2, "{d:?}");
    let refusals: i64 =
        sqlx::query_scalar("SELECT CAST(refusals AS BIGINT) FROM deliveries WHERE request_id = $1")
            .bind(&id)
            .fetch_one(&db.pool)
            .await
            .expect("refusals");
    assert_eq!(refusals, 5);

    // No longer sent.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let later = wait_until(&mut crm, &id, Duration::from_secs(5), |_| true).await;
    assert_eq!(
        later.deliveries[0].attempts, d.attempts,
        "sent again: {later:#?}"
    );
    assert_eq!(later.state, view.state);

    // The partner's event stream says so.
    let mut events = crm
        .watch(WatchRequest {
            request_id: id.clone(),
            after_event_id: 0,
            follow_after_terminal: false,
        })
        .await
        .expect("watch")
        .into_inner();
    let dead = loop {
        let e = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .expect("an event in time")
            .expect("stream")
            .expect("the dead-letter event before the stream ends");
        if e.r#type == EventType::DeliveryDeadLettered as i32 {
            break e;
        }
    };
    assert!(
        dead.message.contains("dead-lettered after 5 refusals") && dead.message.contains(PROCESSOR),
        "{dead:?}"
    );
    // The processor's answer, which follows in an operator's view, is not shown to a partner.
    assert!(!dead.message.contains("InvalidArgument"), "{dead:?}");
    // The audit trail, which forgetting never touches, keeps the processor's answer only as
    // its keyed hash.
    let url = pair.registry.database_url();
    crate::harness::audit_chained(url).await;
    let dead_entries = |detail: &str| {
        format!(
            "SELECT COUNT(*) FROM audit_log WHERE event_type = {} AND detail LIKE '{detail}'",
            EventType::DeliveryDeadLettered as i32
        )
    };
    assert_eq!(
        crate::harness::count(url, &dead_entries("%no longer sent: text hmac-sha256:%")).await,
        1
    );
    assert_eq!(
        crate::harness::count(url, &dead_entries("%InvalidArgument%")).await,
        0
    );

    // Operators see it in dsrctl get, and the metric counts it.
    let shown = crate::harness::dsrctl::dsrctl(&pair, "operator", &["get", &id]).await;
    assert!(shown.ok().contains("DEAD_LETTERED"), "{}", shown.stdout);
    let metrics = scrape(&admin).await;
    assert_eq!(
        gauge(
            &metrics,
            &format!("dsrelay_deliveries_dead_lettered_total{{processor=\"{PROCESSOR}\"}}")
        ),
        1.0
    );
    // The dead letter is counted apart from the queue, so the queue's age gauge does not
    // keep rising while it waits for an operator.
    assert_eq!(
        gauge(&metrics, r#"dsrelay_outbox_dead_lettered{op="deliver"}"#),
        1.0
    );
    assert_eq!(
        gauge(&metrics, r#"dsrelay_outbox_depth{op="deliver"}"#),
        0.0
    );
    assert_eq!(
        gauge(
            &metrics,
            r#"dsrelay_outbox_oldest_age_seconds{op="deliver"}"#
        ),
        0.0
    );
    // An extension of the due date waits behind the dead letter (it goes after the
    // delivery): as stuck as the delivery, which is counted already, so not counted as
    // queued, with an age rising for ever.
    pair.client("operator")
        .extend_deadline(dsrelay_proto::v1::ExtendDeadlineRequest {
            request_id: id.clone(),
            months: 1,
            reason: "the processor refuses the delivery".into(),
        })
        .await
        .expect("extend");
    let metrics = scrape(&admin).await;
    for name in [
        r#"dsrelay_outbox_depth{op="extend"}"#,
        r#"dsrelay_outbox_oldest_age_seconds{op="extend"}"#,
    ] {
        assert_eq!(gauge(&metrics, name), 0.0, "{name}");
    }

    // Only operators list and requeue dead-lettered deliveries.
    let requeue = RequeueDeliveryRequest {
        request_id: id.clone(),
        processor: PROCESSOR.into(),
    };
    let denied = crm
        .requeue_delivery(requeue.clone())
        .await
        .expect_err("a partner requeued a delivery");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let denied = crm
        .list_dead_lettered_deliveries(ListDeadLetteredDeliveriesRequest::default())
        .await
        .expect_err("a partner listed dead-lettered deliveries");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let mut operator = pair.client("operator");
    let unknown = operator
        .requeue_delivery(RequeueDeliveryRequest {
            request_id: id.clone(),
            processor: "no-such-processor".into(),
        })
        .await
        .expect_err("requeued a delivery to an unknown processor");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    let listed = dsrctl(
        &pair,
        "operator",
        &["--output", "json", "deliveries", "dead-letters"],
    )
    .await
    .json();
    let letters = listed["dead_lettered"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(letters.len(), 1, "{listed:#}");
    assert_eq!(letters[0]["request_id"], id.as_str());
    assert_eq!(letters[0]["processor"], PROCESSOR);
    assert_eq!(letters[0]["operation"], "deliver");
    assert_eq!(letters[0]["refusals"], 5);
    assert!(
        letters[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("InvalidArgument")),
        "{listed:#}"
    );

    // The cause is fixed (the stored body is whole again) and the operator requeues it: it
    // is delivered and the request completes.
    sqlx::query("UPDATE requests SET body = $1 WHERE id = $2")
        .bind(body.as_slice())
        .bind(&id)
        .execute(&db.pool)
        .await
        .expect("mend the body");
    let requeued = dsrctl(
        &pair,
        "operator",
        &["deliveries", "requeue", &id, "--processor", PROCESSOR],
    )
    .await;
    assert!(requeued.ok().contains(&id), "{}", requeued.stdout);
    assert!(
        requeued.stderr.contains("'s dead-lettered calls to"),
        "{}",
        requeued.stderr
    );
    let done = wait_until(&mut crm, &id, Duration::from_secs(30), |r| {
        r.state == RequestState::Completed as i32
    })
    .await;
    assert_eq!(
        done.deliveries[0].state,
        DeliveryState::Delivered as i32,
        "{done:#?}"
    );
    let listed = dsrctl(&pair, "operator", &["deliveries", "dead-letters"]).await;
    assert!(
        listed.ok().contains("no dead-lettered deliveries"),
        "{}",
        listed.stdout
    );
    let metrics = scrape(&admin).await;
    assert_eq!(
        gauge(&metrics, r#"dsrelay_outbox_dead_lettered{op="deliver"}"#),
        0.0
    );

    // The operator's act is in the audit trail, under the operator's name.
    let trail = operator
        .list_audit_entries(ListAuditEntriesRequest::default())
        .await
        .expect("audit trail")
        .into_inner();
    let entry = trail
        .entries
        .iter()
        .find(|e| e.event_type == EventType::DeliveryRequeued as i32)
        .expect("a requeue entry");
    assert_eq!(entry.request_id, id);
    assert_eq!(entry.actor, "ops", "the operator's configured name");
    assert!(entry.detail.contains(PROCESSOR), "{entry:?}");

    // A delivery that is not dead-lettered cannot be requeued, and the answer says its state.
    let live = operator
        .requeue_delivery(requeue)
        .await
        .expect_err("requeued a delivered delivery");
    assert_eq!(live.code(), tonic::Code::FailedPrecondition, "{live:?}");
    assert!(live.message().contains("DELIVERED"), "{live:?}");
    db.pool.close().await;
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_delivery_is_dead_lettered_sqlite() {
    refused_delivery_is_dead_lettered(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_delivery_is_dead_lettered_postgres() {
    refused_delivery_is_dead_lettered(Backend::Postgres).await;
}

/// More dead-lettered deliveries than a page holds: `dsrctl deliveries dead-letters` pages
/// through all of them with the token each page prints, each row once and oldest first; a
/// token the registry did not give is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_deliveries_page_through_all_of_them() {
    let pair = spawn_pair(PairOptions {
        down: vec![Role::Processor],
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let mut crm = pair.client("partner-crm");
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            crm.submit(erasure(&format!("parked.{i}@example.fi")))
                .await
                .expect("submit")
                .into_inner()
                .request_id,
        );
    }
    // Parked as repeated refusals would park them, two at the same instant. An attempt
    // under way when they are parked records its failure over the parking, so they are
    // parked again until none is left under way.
    let db = dsrelay_runtime::store::Db::connect(pair.registry.database_url())
        .await
        .expect("registry db");
    let parked = "SELECT COUNT(*) FROM deliveries WHERE dead_lettered_at IS NOT NULL";
    for _ in 0..50 {
        for (i, id) in ids.iter().enumerate() {
            sqlx::query(
                "UPDATE deliveries SET dead_lettered_at = $1, refusals = 5, \
                 last_error = 'InvalidArgument: test' WHERE request_id = $2",
            )
            .bind(1_000_000 + (i as i64).min(3))
            .bind(id)
            .execute(&db.pool)
            .await
            .expect("dead-letter");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if count(pair.registry.database_url(), parked).await == 5 {
            break;
        }
    }
    assert_eq!(count(pair.registry.database_url(), parked).await, 5);
    let mut listed: Vec<String> = Vec::new();
    let mut token: Option<String> = None;
    for page in 0.. {
        assert!(page < 5, "more pages than rows: {listed:?}");
        let mut args = vec![
            "--output",
            "json",
            "deliveries",
            "dead-letters",
            "--limit",
            "2",
        ];
        if let Some(t) = &token {
            args.extend(["--page-token", t.as_str()]);
        }
        let doc = dsrctl(&pair, "operator", &args).await.json();
        for d in doc["dead_lettered"].as_array().expect("rows") {
            listed.push(d["request_id"].as_str().expect("id").to_string());
        }
        if doc["truncated"] != true {
            assert!(doc.get("next_page_token").is_none(), "{doc:#}");
            break;
        }
        token = Some(
            doc["next_page_token"]
                .as_str()
                .expect("a token with a truncated page")
                .to_string(),
        );
    }
    let mut by_time = ids.clone();
    // Ordered by when (then by request id among those parked at the same instant).
    by_time[3..].sort();
    assert_eq!(listed, by_time);
    let table = dsrctl(
        &pair,
        "operator",
        &["deliveries", "dead-letters", "--limit", "2"],
    )
    .await;
    assert!(
        table.ok().contains("see the next ones with --page-token "),
        "{}",
        table.stdout
    );
    let refused = dsrctl(
        &pair,
        "operator",
        &["deliveries", "dead-letters", "--page-token", "not-a-token"],
    )
    .await;
    refused.expect_code(2);
    assert!(
        refused.stderr.contains("INVALID_ARGUMENT") && refused.stderr.contains("page_token"),
        "{}",
        refused.stderr
    );
    pair.stop().await;
}
