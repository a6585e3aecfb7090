//! The processor's own audit trail, in the registry's format: a completed erasure leaves
//! entries for the delivery, each task's outcome with its certificate's digest and each
//! acknowledgement the registry accepted, with no trace of the subject's e-mail address;
//! the real `dsrctl audit verify --processor` finds the trail intact against the
//! processor's signed checkpoints and names the checkpoint a trail rewritten with fresh
//! hashes from an early entry on no longer matches; appenders on several stores sharing one
//! database keep a single valid chain.

use std::time::Duration;

use dsrelay_processor::store::{Store as ProcessorStore, POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS};
use dsrelay_proto::v1::{DeliverRequest, ProcessorAuditEvent, RequestKind, RequestState};
use dsrelay_runtime::audit::checkpoint::{self, Checkpoint};
use dsrelay_runtime::audit::{self, Entry};
use dsrelay_runtime::store::{now_ms, Db};
use serde_json::Value;

use crate::harness::dsrctl::dsrctl;
use crate::harness::{
    audit_chained, count, database_url, erasure, in_state, spawn_pair, wait_until, Backend,
    PairOptions, TestPair, CONTROLLER,
};

/// The processor's operator endpoint.
fn processor(pair: &TestPair) -> String {
    format!("https://localhost:{}", pair.processor.addr().port())
}

/// `dsrctl audit verify --processor ... ARGS` as `stem`, expecting `code`; returns stdout.
async fn verify(pair: &TestPair, stem: &str, args: &[&str], code: i32) -> String {
    let endpoint = processor(pair);
    let mut all = vec!["audit", "verify", "--processor", endpoint.as_str()];
    all.extend_from_slice(args);
    dsrctl(pair, stem, &all)
        .await
        .expect_code(code)
        .stdout
        .clone()
}

/// Writes `sql` to the processor's database directly, as someone with access to it would.
async fn tamper(db: &Db, sql: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(sql).execute(&db.pool).await.map(|_| ())
}

/// Puts `entries` in place of the trail.
async fn replace(db: &Db, entries: &[Entry]) {
    tamper(db, "DELETE FROM audit_log").await.expect("delete");
    for e in entries {
        sqlx::query(
            "INSERT INTO audit_log (seq, occurred_at, request_id, event_type, actor, detail, \
             prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(e.seq as i64)
        .bind(e.occurred_at)
        .bind(&e.request_id)
        .bind(i64::from(e.event_type))
        .bind(&e.actor)
        .bind(&e.detail)
        .bind(&e.prev_hash)
        .bind(&e.hash)
        .execute(&db.pool)
        .await
        .expect("insert");
    }
}

/// The processor's checkpoints as its file holds them now, unchecked.
fn checkpoints_on_file(pair: &TestPair) -> Vec<Checkpoint> {
    let text = std::fs::read_to_string(pair.processor_checkpoint_file()).unwrap_or_default();
    checkpoint::parse_lines(&text)
        .expect("checkpoint file")
        .iter()
        .map(|s| Checkpoint::read_unchecked(s).expect("checkpoint"))
        .collect()
}

/// Waits until every acknowledgement reached the registry and the processor checkpointed
/// the head of its trail; returns the head's seq.
async fn settled_and_checkpointed(pair: &TestPair, store: &ProcessorStore) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let unsent = store.unsent_ack_count().await.expect("unsent");
        let (seq, hash) = store.audit_head().await.expect("head").expect("entries");
        if unsent == 0
            && checkpoints_on_file(pair)
                .last()
                .is_some_and(|c| c.seq == seq && c.hash == hash)
        {
            return seq;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no checkpoint over seq {seq} ({unsent} acknowledgements unsent)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn completed_erasure(pair: &TestPair, mail: &str) -> String {
    let mut client = pair.client("partner-crm");
    let id = client
        .submit(erasure(mail))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    wait_until(
        &mut client,
        &id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    id
}

async fn the_processor_keeps_a_checkpointed_trail(backend: Backend) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let db = Db::connect(pair.processor.database_url())
        .await
        .expect("connect");
    let store = ProcessorStore::new(db.clone(), b"unused");
    let first = completed_erasure(&pair, "early@example.fi").await;
    let early = settled_and_checkpointed(&pair, &store).await;
    let second = completed_erasure(&pair, "later@example.fi").await;
    let last = settled_and_checkpointed(&pair, &store).await;
    let original = store.audit_entries(0, 10_000).await.expect("entries");
    assert_eq!(
        original.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
    assert!(audit::verify(&original).is_ok());

    // Per erasure: its delivery, each subprocessor's outcome with its certificate, and each
    // acknowledgement the registry accepted, in that order of first appearance.
    for id in [&first, &second] {
        let of = |event: ProcessorAuditEvent| -> Vec<&Entry> {
            original
                .iter()
                .filter(|e| &e.request_id == id && e.event_type == event as i32)
                .collect()
        };
        let accepted = of(ProcessorAuditEvent::RequestAccepted);
        assert_eq!(accepted.len(), 1, "{original:#?}");
        assert_eq!(accepted[0].actor, CONTROLLER);
        assert_eq!(
            accepted[0].detail,
            format!(
                "controller {CONTROLLER}: REQUEST_KIND_ERASURE accepted, tasks for accounting, \
                 mail-marketing"
            )
        );
        // The mail system erases (certified); the accounting database holds neither address.
        let outcomes: Vec<&Entry> = of(ProcessorAuditEvent::TaskRecorded)
            .into_iter()
            .filter(|e| {
                e.detail.contains(", TASK_STATE_COMPLETED")
                    || e.detail.contains(", TASK_STATE_NOT_FOUND")
            })
            .collect();
        assert_eq!(outcomes.len(), 2, "{original:#?}");
        for e in &outcomes {
            let certified = e.detail.contains("certificate sha256:");
            let erased = e.detail.starts_with(&format!(
                "controller {CONTROLLER}: subprocessor mail-marketing, change 3, TASK_STATE_COMPLETED, confirmed by the holder, "
            ));
            assert_eq!(certified, erased, "{}", e.detail);
            assert!(e.detail.contains("note text hmac-sha256:"), "{}", e.detail);
        }
        let acks = of(ProcessorAuditEvent::AckAccepted);
        let recorded = of(ProcessorAuditEvent::TaskRecorded).len();
        assert_eq!(
            acks.len(),
            recorded,
            "one per acknowledgement: {original:#?}"
        );
        assert!(accepted[0].seq < outcomes[0].seq && outcomes[0].seq < acks[acks.len() - 1].seq);
    }
    // No identities anywhere in the trail: not in what it lists, not in the table's bytes.
    let listed = format!("{original:?}");
    assert!(!listed.contains("example.fi"), "{listed}");
    let url = pair.processor.database_url().to_string();
    audit_chained(&url).await;
    assert_eq!(
        count(
            &url,
            "SELECT COUNT(*) FROM audit_log WHERE detail LIKE '%example.fi%' \
             OR actor LIKE '%example.fi%' OR request_id LIKE '%example.fi%'"
        )
        .await,
        0
    );

    // Intact, against the checkpoints from the file and from the processor alike.
    let key = pair
        .pki()
        .signing_public_key("processor")
        .display()
        .to_string();
    let file = pair.processor_checkpoint_file().display().to_string();
    let with_file = [
        "--checkpoints",
        file.as_str(),
        "--checkpoint-key",
        key.as_str(),
    ];
    let fetched = ["--fetch-checkpoints", "--checkpoint-key", key.as_str()];
    let on_file = checkpoints_on_file(&pair);
    assert!(on_file.iter().all(|c| c.service == "processor"));
    let intact = format!(
        "audit trail intact: {last} entries, last hash {}, {} signed checkpoints kept\n",
        original[last as usize - 1].hash,
        on_file.len()
    );
    assert_eq!(verify(&pair, "operator", &with_file, 0).await, intact);
    assert_eq!(verify(&pair, "operator", &fetched, 0).await, intact);
    // The processor's operators read it; a partner of the registry does not.
    let run = dsrctl(
        &pair,
        "partner-crm",
        &["audit", "verify", "--processor", &processor(&pair)],
    )
    .await;
    run.expect_code(2);
    assert!(run.stderr.contains("PERMISSION_DENIED"), "{}", run.stderr);
    let run = dsrctl(
        &pair,
        "operator",
        &["audit", "checkpoints", "--processor", &processor(&pair)],
    )
    .await;
    assert_eq!(
        run.ok(),
        std::fs::read_to_string(pair.processor_checkpoint_file()).expect("file")
    );
    // A controller fetches the checkpoints to hold the processor to them, and reads no
    // entry: those name every controller's requests.
    let run = dsrctl(
        &pair,
        "registry",
        &["audit", "checkpoints", "--processor", &processor(&pair)],
    )
    .await;
    assert_eq!(
        run.ok(),
        std::fs::read_to_string(pair.processor_checkpoint_file()).expect("file")
    );
    let run = dsrctl(
        &pair,
        "registry",
        &["audit", "verify", "--processor", &processor(&pair)],
    )
    .await;
    run.expect_code(2);
    assert!(run.stderr.contains("PERMISSION_DENIED"), "{}", run.stderr);

    // The triggers refuse a change; whoever drops them can rewrite the trail from the
    // first entry after the early checkpoint on, with fresh hashes.
    assert!(
        tamper(&db, "UPDATE audit_log SET detail = 'nothing' WHERE seq = 1")
            .await
            .is_err()
    );
    assert!(tamper(&db, "DELETE FROM audit_log WHERE seq = 1")
        .await
        .is_err());
    tamper(
        &db,
        match backend {
            Backend::Sqlite => "DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete",
            Backend::Postgres => {
                "DROP TRIGGER audit_log_no_change ON audit_log; \
                 DROP TRIGGER audit_log_no_truncate ON audit_log"
            }
        },
    )
    .await
    .expect("drop triggers");
    let from = early + 1;
    let mut forged = original.clone();
    forged[from as usize - 1].detail = "nothing happened".into();
    for i in from as usize - 1..forged.len() {
        forged[i].prev_hash = forged[i - 1].hash.clone();
        forged[i].hash = forged[i].compute_hash();
    }
    replace(&db, &forged).await;
    // The chain alone finds nothing wrong; the checkpoints name where the rewrite began.
    verify(&pair, "operator", &[], 0).await;
    let (index, first_broken) = on_file
        .iter()
        .enumerate()
        .find(|(_, c)| c.seq >= from)
        .map(|(i, c)| (i + 1, c.clone()))
        .expect("a checkpoint after the rewrite began");
    let start = if first_broken.seq == from {
        format!("seq {from}")
    } else {
        format!("a seq between {from} and {}", first_broken.seq)
    };
    assert_eq!(
        verify(&pair, "operator", &with_file, 1).await,
        format!(
            "audit trail broken at entry {from}: rewritten: entries rewritten from {start}: \
             checkpoint {index} at seq {} says {}, store says {}\n",
            first_broken.seq,
            first_broken.hash,
            forged[first_broken.seq as usize - 1].hash
        )
    );
    let mut json = vec!["--output", "json"];
    json.extend_from_slice(&fetched);
    let doc: Value =
        serde_json::from_str(&verify(&pair, "operator", &json, 1).await).expect("json");
    assert_eq!(doc["break"]["seq"], from, "{doc:#}");
    assert_eq!(doc["break"]["kind"], "rewritten", "{doc:#}");
    // While the trail is rewritten the processor signs nothing over it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(checkpoints_on_file(&pair), on_file);
    replace(&db, &original).await;
    assert_eq!(verify(&pair, "operator", &with_file, 0).await, intact);
    db.pool.close().await;
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procaudit_trail_is_checkpointed_and_free_of_identities_on_sqlite() {
    the_processor_keeps_a_checkpointed_trail(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procaudit_trail_is_checkpointed_and_free_of_identities_on_postgres() {
    the_processor_keeps_a_checkpointed_trail(Backend::Postgres).await;
}

/// Three processor stores on one PostgreSQL database (as three replicas) accept and cancel
/// requests at once, and the trail stays one gapless chain; on SQLite, concurrent calls on
/// one store do.
async fn concurrent_appends_keep_one_valid_chain(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(url) = database_url(dir.path(), "processor", backend).await else {
        return;
    };
    let mut stores: Vec<ProcessorStore> = Vec::new();
    for _ in 0..3 {
        if backend == Backend::Sqlite && !stores.is_empty() {
            stores.push(stores[0].clone());
            continue;
        }
        let db = Db::connect(&url).await.expect("connect");
        db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
            .await
            .expect("migrate");
        stores.push(ProcessorStore::new(db, b"test key"));
    }
    let subprocessors = ["crm".to_string(), "mail".to_string()];
    let mut writers = Vec::new();
    for (w, store) in stores.iter().enumerate() {
        let store = store.clone();
        let subprocessors = subprocessors.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..10 {
                let id = format!("r-{w}-{i}");
                let req = DeliverRequest {
                    request_id: id.clone(),
                    kind: RequestKind::Erasure as i32,
                    ..Default::default()
                };
                store
                    .accept(CONTROLLER, &req, &subprocessors, None, now_ms())
                    .await
                    .expect("accept");
                store
                    .cancel(CONTROLLER, &id, "changed their mind", now_ms())
                    .await
                    .expect("cancel");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    let entries = stores[0].audit_entries(0, 10_000).await.expect("entries");
    // Per request: accepted, cancelled, and each of its two tasks CANCELLED.
    assert_eq!(entries.len(), 3 * 10 * 4);
    let intact = audit::verify(&entries).expect("one valid chain");
    assert_eq!(intact.last_seq, 120);
    let reason = entries
        .iter()
        .find(|e| e.event_type == ProcessorAuditEvent::RequestCancelled as i32)
        .expect("a cancellation");
    assert!(
        reason.detail.contains("reason text hmac-sha256:") && !reason.detail.contains("mind"),
        "{}",
        reason.detail
    );
    for s in stores {
        s.db().pool.close().await;
    }
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procaudit_concurrent_appends_keep_one_valid_chain_on_sqlite() {
    concurrent_appends_keep_one_valid_chain(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procaudit_concurrent_appends_keep_one_valid_chain_on_postgres() {
    concurrent_appends_keep_one_valid_chain(Backend::Postgres).await;
}
