//! The tamper-evident audit trail: one entry per event, append-only, hash-chained. The real
//! `dsrctl audit verify` against a real pair finds it intact, then names the first entry that
//! was changed, removed or inserted behind the registry's back; appenders on several
//! stores sharing one database keep a single valid chain; and the registry's signed
//! checkpoints catch what the chain alone cannot: a trail rewritten with fresh hashes from an
//! early entry on, or cut at the end, by someone who can write the database.

use std::time::Duration;

use dsrelay_proto::v1::{RequestKind, RequestState};
use dsrelay_registry::store::{
    CancelOutcome, Inserted, NewRequest, Store as RegistryStore, POSTGRES_MIGRATIONS,
    SQLITE_MIGRATIONS,
};
use dsrelay_runtime::audit::{self, Entry};
use dsrelay_runtime::store::{now_ms, Db};
use serde_json::Value;

use crate::harness::dsrctl::dsrctl;
use crate::harness::{
    audit_chained, count, database_url, erasure, in_state, spawn_pair, wait_until, Backend,
    PairOptions, TestPair,
};
use dsrelay_proto::v1::ListAuditCheckpointsRequest;
use dsrelay_runtime::audit::checkpoint::{self, Checkpoint};
use tonic_types::StatusExt;

/// `dsrctl audit verify ARGS` as the operator, expecting `code`; returns stdout.
async fn verify(setup: &TestPair, args: &[&str], code: i32) -> String {
    let mut all = vec!["audit", "verify"];
    all.extend_from_slice(args);
    dsrctl(setup, "operator", &all)
        .await
        .expect_code(code)
        .stdout
        .clone()
}

/// Writes `sql` to the registry's database directly, as someone with access to it would.
async fn tamper(db: &Db, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn insert(db: &Db, e: &Entry) {
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

/// Puts the trail back as it was.
async fn restore(db: &Db, entries: &[Entry]) {
    tamper(db, "DELETE FROM audit_log").await;
    for e in entries {
        insert(db, e).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsrctl_audit_verify_names_the_first_tampered_entry() {
    let mut pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let mut client = pair.client("partner-crm");
    for i in 0..3 {
        let id = client
            .submit(erasure(&format!("audit-{i}@example.fi")))
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
    }
    // Nothing changes any more once the processor is gone (every request has finished).
    pair.processor.stop().await;
    let setup = &pair;
    let url = setup.registry.database_url().to_string();
    audit_chained(&url).await;
    let events = count(&url, "SELECT COUNT(*) FROM events").await;
    assert_eq!(
        count(&url, "SELECT COUNT(*) FROM audit_log").await,
        events,
        "one audit entry per event"
    );
    let n = events as u64;
    assert!(n >= 9, "{n} entries");

    // Intact, in both formats, with the last hash as an anchor.
    let text = verify(setup, &[], 0).await;
    let db = Db::connect(&url).await.expect("connect");
    let original = RegistryStore::new(db.clone(), b"test key")
        .audit_entries(0, 10_000)
        .await
        .expect("entries");
    assert_eq!(original.len() as u64, n);
    assert_eq!(
        original.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    assert_eq!(original[0].prev_hash, audit::GENESIS_HASH);
    assert_eq!(original[0].actor, "crm", "the submitting partner");
    assert!(
        original.iter().all(|e| !e.detail.contains("@example.fi")),
        "no identities in the trail"
    );
    let last = original.last().expect("entries").hash.clone();
    assert_eq!(
        text,
        format!("audit trail intact: {n} entries, last hash {last}\n")
    );
    let doc: Value =
        serde_json::from_str(&verify(setup, &["--output", "json"], 0).await).expect("json");
    assert_eq!(doc["intact"], true, "{doc:#}");
    assert_eq!(doc["entries"], n, "{doc:#}");
    assert_eq!(doc["last_seq"], n, "{doc:#}");
    assert_eq!(doc["last_hash"], last.as_str(), "{doc:#}");
    let anchor = format!("{n}:{last}");
    verify(setup, &["--anchor", &anchor], 0).await;

    // Operators only.
    for stem in ["partner-crm", "processor"] {
        let run = dsrctl(setup, stem, &["audit", "verify"]).await;
        run.expect_code(2);
        assert!(run.stderr.contains("PERMISSION_DENIED"), "{}", run.stderr);
    }

    // Append-only: the database refuses changes and removals...
    for sql in [
        "UPDATE audit_log SET detail = 'x' WHERE seq = 3",
        "DELETE FROM audit_log WHERE seq = 3",
    ] {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    // ...until someone with enough access drops the triggers.
    tamper(
        &db,
        "DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete",
    )
    .await;

    let broken = |out: &str, kind: &str| {
        let prefix = format!("audit trail broken at entry 3: {kind}: ");
        assert!(out.starts_with(&prefix), "expected {prefix:?}, got {out:?}");
    };

    // Modified: an entry's detail changed.
    tamper(
        &db,
        "UPDATE audit_log SET detail = 'all done' WHERE seq = 3",
    )
    .await;
    let out = verify(setup, &[], 1).await;
    broken(&out, "modified");
    restore(&db, &original).await;

    // Modified and hashed again: the next entry still names the old hash.
    let mut edited = original[2].clone();
    edited.detail = "all done".into();
    edited.hash = edited.compute_hash();
    tamper(&db, "DELETE FROM audit_log WHERE seq = 3").await;
    insert(&db, &edited).await;
    let out = verify(setup, &[], 1).await;
    broken(&out, "modified");
    assert!(out.contains("entry 4 recorded"), "{out}");
    restore(&db, &original).await;

    // Removed.
    tamper(&db, "DELETE FROM audit_log WHERE seq = 3").await;
    let out = verify(setup, &[], 1).await;
    assert_eq!(
        out,
        "audit trail broken at entry 3: removed: entry 3 is missing\n"
    );
    // Removed, and the later entries renumbered to close the gap.
    tamper(
        &db,
        "UPDATE audit_log SET seq = -(seq - 1) WHERE seq > 3; \
         UPDATE audit_log SET seq = -seq WHERE seq < 0",
    )
    .await;
    let out = verify(setup, &[], 1).await;
    broken(&out, "removed");
    assert!(out.contains("renumbered"), "{out}");
    let doc: Value =
        serde_json::from_str(&verify(setup, &["--output", "json"], 1).await).expect("json");
    assert_eq!(doc["intact"], false, "{doc:#}");
    assert_eq!(doc["break"]["seq"], 3, "{doc:#}");
    assert_eq!(doc["break"]["kind"], "removed", "{doc:#}");
    restore(&db, &original).await;

    // Inserted: a well-formed entry put in as entry 3, the later ones renumbered.
    tamper(
        &db,
        "UPDATE audit_log SET seq = -(seq + 1) WHERE seq >= 3; \
         UPDATE audit_log SET seq = -seq WHERE seq < 0",
    )
    .await;
    let mut forged = Entry {
        seq: 3,
        detail: "accepted by payroll-bureau with 0 task(s)".into(),
        prev_hash: original[1].hash.clone(),
        ..original[2].clone()
    };
    forged.hash = forged.compute_hash();
    insert(&db, &forged).await;
    let out = verify(setup, &[], 1).await;
    broken(&out, "modified, reordered or inserted");
    restore(&db, &original).await;

    // The last entry removed: the chain alone cannot tell, the anchor can.
    tamper(&db, &format!("DELETE FROM audit_log WHERE seq = {n}")).await;
    verify(setup, &[], 0).await;
    let out = verify(setup, &["--anchor", &anchor], 1).await;
    assert!(
        out.starts_with(&format!("audit trail broken at entry {n}: removed: ")),
        "{out}"
    );
    restore(&db, &original).await;

    assert_eq!(
        verify(setup, &[], 0).await,
        format!("audit trail intact: {n} entries, last hash {last}\n")
    );
    db.pool.close().await;
    pair.stop().await;
}

fn new_request(i: usize) -> NewRequest {
    let now = now_ms();
    NewRequest {
        id: format!("r-{i:04}"),
        partner: "crm".into(),
        idempotency_key: format!("k-{i}"),
        body_hash: format!("hash-{i}"),
        body: vec![1, 2, 3],
        identity_hashes: "[]".into(),
        kind: RequestKind::Erasure as i32,
        received_at: now,
        due_at: now + 1000,
        trace_id: "0".repeat(32),
        processors: vec!["payroll-bureau".into()],
        traceparent: None,
    }
}

async fn store(url: &str) -> RegistryStore {
    let db = Db::connect(url).await.expect("connect");
    db.migrate(&SQLITE_MIGRATIONS, &POSTGRES_MIGRATIONS)
        .await
        .expect("migrate");
    RegistryStore::new(db, b"test key")
}

/// Two stores on one PostgreSQL database (as two registry replicas) appending at once keep
/// one gapless chain; on SQLite, concurrent calls on one store do.
async fn concurrent_appends_keep_one_valid_chain(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(url) = database_url(dir.path(), "registry", backend).await else {
        return;
    };
    let a = store(&url).await;
    let b = match backend {
        Backend::Sqlite => a.clone(),
        Backend::Postgres => store(&url).await,
    };
    const REQUESTS: usize = 40;
    let work = (0..REQUESTS).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move {
            let r = new_request(i);
            assert!(matches!(
                s.insert_request(&r).await.expect("insert"),
                Inserted::New
            ));
            assert!(matches!(
                s.cancel(&r.id, "duplicate", now_ms())
                    .await
                    .expect("cancel"),
                CancelOutcome::Cancelled
            ));
        })
    });
    for handle in futures::future::join_all(work).await {
        handle.expect("worker");
    }
    let entries = a.audit_entries(0, 10_000).await.expect("entries");
    let intact = audit::verify(&entries).unwrap_or_else(|b| panic!("{backend:?}: {b}"));
    // Each request: its acceptance, its CANCELLED and the STATE_CHANGED that follows it.
    assert_eq!(intact.entries, 3 * REQUESTS as u64, "{backend:?}");
    // Paging returns the same entries.
    let mut paged = Vec::new();
    let mut after = 0;
    loop {
        let page = b.audit_entries(after, 7).await.expect("page");
        let Some(last) = page.last() else { break };
        after = last.seq;
        paged.extend(page);
    }
    assert_eq!(paged, entries, "{backend:?}");
    for e in &entries {
        let expected_actor = if e.detail.starts_with("accepted") {
            "crm"
        } else {
            ""
        };
        assert_eq!(e.actor, expected_actor, "{backend:?}: {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_keep_one_valid_chain_on_sqlite() {
    concurrent_appends_keep_one_valid_chain(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_keep_one_valid_chain_on_postgres() {
    concurrent_appends_keep_one_valid_chain(Backend::Postgres).await;
}

/// The registry's checkpoints as its file holds them now, unchecked.
fn checkpoints_on_file(pair: &TestPair) -> Vec<Checkpoint> {
    let text = std::fs::read_to_string(pair.checkpoint_file()).unwrap_or_default();
    checkpoint::parse_lines(&text)
        .expect("checkpoint file")
        .iter()
        .map(|s| Checkpoint::read_unchecked(s).expect("checkpoint"))
        .collect()
}

/// Waits until the registry has checkpointed the head of its trail; returns the head's seq.
async fn checkpointed_head(pair: &TestPair, db: &Db) -> u64 {
    let store = RegistryStore::new(db.clone(), b"test key");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (seq, hash) = store.audit_head().await.expect("head").expect("entries");
        if checkpoints_on_file(pair)
            .last()
            .is_some_and(|c| c.seq == seq && c.hash == hash)
        {
            return seq;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no checkpoint over seq {seq}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn completed_erasure(pair: &TestPair, mail: &str) {
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
}

/// Lets whoever holds `db` change and remove audit entries, as an insider can.
async fn drop_audit_triggers(db: &Db, backend: Backend) {
    tamper(
        db,
        match backend {
            Backend::Sqlite => "DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete",
            Backend::Postgres => {
                "DROP TRIGGER audit_log_no_change ON audit_log; \
                 DROP TRIGGER audit_log_no_truncate ON audit_log"
            }
        },
    )
    .await;
}

/// A rewrite of the whole trail from one entry on with fresh, valid hashes, and the
/// truncation of its end, both done in the database: the chain alone cannot tell, the
/// signed checkpoints name what no longer matches. A checkpoint changed in one byte fails
/// its signature, and while the trail does not grow, no checkpoint is signed.
async fn checkpoints_catch_what_the_chain_cannot(backend: Backend) {
    let Some(mut pair) = spawn_pair(PairOptions {
        backend,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let url = pair.registry.database_url().to_string();
    let db = Db::connect(&url).await.expect("connect");
    completed_erasure(&pair, "early@example.fi").await;
    let early = checkpointed_head(&pair, &db).await;
    for i in 0..2 {
        completed_erasure(&pair, &format!("later-{i}@example.fi")).await;
    }
    // Nothing changes any more once the processor is gone (every request has finished).
    pair.processor.stop().await;
    let last = checkpointed_head(&pair, &db).await;
    assert!(last > early + 2, "{early} then {last}");

    let key = pair
        .pki()
        .signing_public_key("registry")
        .display()
        .to_string();
    let file = pair.checkpoint_file().display().to_string();
    let with_file = [
        "--checkpoints",
        file.as_str(),
        "--checkpoint-key",
        key.as_str(),
    ];
    let fetched = ["--fetch-checkpoints", "--checkpoint-key", key.as_str()];
    let on_file = checkpoints_on_file(&pair);
    let original = RegistryStore::new(db.clone(), b"test key")
        .audit_entries(0, 10_000)
        .await
        .expect("entries");
    let last_hash = original.last().expect("entries").hash.clone();
    let intact = format!(
        "audit trail intact: {last} entries, last hash {last_hash}, {} signed checkpoints kept\n",
        on_file.len()
    );
    assert_eq!(verify(&pair, &with_file, 0).await, intact);
    assert_eq!(verify(&pair, &fetched, 0).await, intact);

    // While the trail does not grow, no checkpoint is signed (the interval is 100 ms).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(checkpoints_on_file(&pair), on_file);

    // Partners may fetch them to keep; processors may not.
    let run = dsrctl(&pair, "partner-crm", &["audit", "checkpoints"]).await;
    run.expect_code(0);
    assert_eq!(
        run.stdout,
        std::fs::read_to_string(pair.checkpoint_file()).expect("file")
    );
    let run = dsrctl(&pair, "processor", &["audit", "checkpoints"]).await;
    run.expect_code(2);
    assert!(run.stderr.contains("PERMISSION_DENIED"), "{}", run.stderr);
    // Paged one by one over the RPC, with the key that checks them; a page size out of
    // range is named.
    let mut partner = pair.client("partner-crm");
    let (mut paged, mut after) = (Vec::new(), 0);
    loop {
        let page = partner
            .list_audit_checkpoints(ListAuditCheckpointsRequest {
                after_seq: after,
                page_size: 1,
            })
            .await
            .expect("page")
            .into_inner();
        let public = dsrelay_runtime::signing::PublicKey::from_config(&key).expect("key");
        assert_eq!(page.public_key, public.to_base64());
        assert_eq!(page.key_id, public.key_id());
        assert!(page.checkpoints.len() <= 1);
        paged.extend(page.checkpoints.into_iter().map(|c| c.body));
        if page.next_after_seq == 0 {
            break;
        }
        after = page.next_after_seq;
    }
    let bodies: Vec<String> = on_file
        .iter()
        .map(|c| {
            String::from_utf8(dsrelay_runtime::signing::to_canonical_json(c).unwrap()).unwrap()
        })
        .collect();
    assert_eq!(paged, bodies);
    let status = partner
        .list_audit_checkpoints(ListAuditCheckpointsRequest {
            after_seq: 0,
            page_size: 2_000_000_000,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let bad = status.get_details_bad_request().expect("field violations");
    assert_eq!(bad.field_violations[0].field, "page_size", "{status:?}");

    // Rewritten from the first entry after the early checkpoint on, with fresh hashes.
    drop_audit_triggers(&db, backend).await;
    let from = early + 1;
    let mut forged = original.clone();
    forged[from as usize - 1].detail = "nothing happened".into();
    for i in from as usize - 1..forged.len() {
        if i > 0 {
            forged[i].prev_hash = forged[i - 1].hash.clone();
        }
        forged[i].hash = forged[i].compute_hash();
    }
    restore(&db, &forged).await;
    assert!(audit::verify(&forged).is_ok());
    // The chain alone finds nothing wrong...
    verify(&pair, &[], 0).await;
    // ...the checkpoints do, and name where the rewrite began.
    let (index, first_broken) = on_file
        .iter()
        .enumerate()
        .find(|(_, c)| c.seq >= from)
        .map(|(i, c)| (i + 1, c.clone()))
        .expect("a checkpoint after the rewrite began");
    let out = verify(&pair, &with_file, 1).await;
    let start = if first_broken.seq == from {
        format!("seq {from}")
    } else {
        format!("a seq between {from} and {}", first_broken.seq)
    };
    assert_eq!(
        out,
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
    let doc: Value = serde_json::from_str(&verify(&pair, &json, 1).await).expect("json");
    assert_eq!(doc["break"]["seq"], from, "{doc:#}");
    assert_eq!(doc["break"]["kind"], "rewritten", "{doc:#}");
    restore(&db, &original).await;
    verify(&pair, &with_file, 0).await;

    // Truncated: the last two entries removed; the chain alone cannot tell.
    tamper(
        &db,
        &format!("DELETE FROM audit_log WHERE seq > {}", last - 2),
    )
    .await;
    verify(&pair, &[], 0).await;
    let out = verify(&pair, &with_file, 1).await;
    // Only a checkpoint on the last entry left shows that the end was cut; otherwise the
    // entries after the last one a checkpoint kept may as well have been rewritten.
    let ends = last - 2;
    let kept = on_file
        .iter()
        .map(|c| c.seq)
        .filter(|&seq| seq <= ends)
        .max()
        .unwrap_or(0);
    let why = if kept == ends {
        format!(
            "trail truncated: checkpoint {} at seq {last} but the store ends at {ends}",
            on_file.len()
        )
    } else {
        let start = if kept + 1 == ends {
            format!("seq {ends}")
        } else {
            format!("a seq between {} and {ends}", kept + 1)
        };
        format!(
            "the trail does not match checkpoint {} at seq {last}, as the store ends at \
             {ends}: entries were cut off its end, or rewritten from {start} on with some \
             removed",
            on_file.len()
        )
    };
    assert_eq!(
        out,
        format!("audit trail broken at entry {}: removed: {why}\n", last - 1)
    );
    restore(&db, &original).await;

    // A checkpoint changed in one byte: its signature fails, and the trail is not judged.
    let text = std::fs::read_to_string(pair.checkpoint_file()).expect("file");
    let line = text.lines().next().expect("a checkpoint");
    let hash = &on_file[0].hash;
    let flipped = if hash.starts_with('0') { "1" } else { "0" };
    let changed = line.replacen(hash.as_str(), &format!("{flipped}{}", &hash[1..]), 1);
    assert_eq!(changed.len(), line.len());
    let forged_file = pair.dir().join("forged-checkpoints.jsonl");
    std::fs::write(&forged_file, text.replacen(line, &changed, 1)).expect("write");
    let forged_path = forged_file.display().to_string();
    let out = verify(
        &pair,
        &["--checkpoints", &forged_path, "--checkpoint-key", &key],
        1,
    )
    .await;
    assert_eq!(
        out,
        "checkpoints do not verify: checkpoint 1 bad signature: the signature does not match \
         the document\n"
    );

    // While the trail was cut or rewritten the registry signed nothing; once it grows again
    // from what it checkpointed, it signs again.
    assert_eq!(checkpoints_on_file(&pair), on_file);
    let mut client = pair.client("partner-crm");
    client
        .submit(erasure("after@example.fi"))
        .await
        .expect("submit");
    let head = checkpointed_head(&pair, &db).await;
    assert!(head > last, "{head}");
    verify(&pair, &with_file, 0).await;
    db.pool.close().await;
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_catch_what_the_chain_cannot_on_sqlite() {
    checkpoints_catch_what_the_chain_cannot(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_catch_what_the_chain_cannot_on_postgres() {
    checkpoints_catch_what_the_chain_cannot(Backend::Postgres).await;
}
