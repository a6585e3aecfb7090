//! Retention runs the holder accepts, through the processor's real store (SQLite, and
//! PostgreSQL when `DSRELAY_TEST_POSTGRES_URL` names a server) and runner. An erasure kept
//! in part under a legal obligation (RETAINED, 5 records) is run again at its date; the
//! holder accepts that run and confirms it later (2 more records). While it waits, the
//! task is IN_PROGRESS but the data is still there, so a certificate issued meanwhile for
//! another task of the request still lists it as retained; once confirmed, the task's count
//! and its certificate say 7, every run so far, not the last run's 2. A request cancelled
//! meanwhile still has the run confirmed.

use std::collections::HashMap;
use std::sync::Arc;

use dsrelay_connectors::{BoxFuture, Connector, ConnectorError, ErasedCount, Outcome, Phase, Task};
use dsrelay_proto::prost::Message;
use dsrelay_proto::timestamp_from_millis;
use dsrelay_proto::v1::{Acknowledgement, DeliverRequest, RequestKind, TaskState};
use dsrelay_runtime::pki::DevPki;

use crate::app::Shared;
use crate::certificates::CertificateBody;
use crate::store::TaskJob;
use crate::{App, Config};

const BASIS: &str = "Kirjanpitolaki 2:10 §";

/// `crm` keeps invoices until the call's own time (so the retention run is due at once),
/// accepts the retention run, and confirms it with 2 more records; `mail` erases 1 record.
struct Scripted;

impl Connector for Scripted {
    fn kind_name(&self) -> &'static str {
        "scripted"
    }

    fn supports(&self, _kind: RequestKind) -> bool {
        true
    }

    fn run<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<Outcome, ConnectorError>> {
        let erased = |count| {
            vec![ErasedCount {
                target: "customers".into(),
                action: "deleted".into(),
                count,
            }]
        };
        let outcome = match (task.task_id.ends_with("/mail"), &task.phase) {
            (true, _) => Outcome::Completed {
                records_affected: 1,
                note: "deleted 1 row".into(),
                files: Vec::new(),
                erased: erased(1),
            },
            (false, Phase::Start) => Outcome::Retained {
                legal_basis: BASIS.into(),
                until_ms: task.now_ms,
                records_affected: 5,
                note: "deleted 5 rows, invoices kept".into(),
                erased: erased(5),
            },
            (false, Phase::RetentionExpired { .. }) => Outcome::Accepted {
                handle: "h-1".into(),
                note: "invoices queued for deletion".into(),
            },
            (false, Phase::Confirm { .. }) => Outcome::Completed {
                records_affected: 2,
                note: "deleted 2 invoices".into(),
                files: Vec::new(),
                erased: erased(2),
            },
        };
        Box::pin(async move { Ok(outcome) })
    }
}

fn config(dir: &std::path::Path, database_url: &str) -> Config {
    let pki = DevPki::ensure(&dir.join("pki")).expect("dev pki");
    let tls = pki.files("processor");
    let checkpoint_key = pki.signing_key("processor");
    let checkpoint_file = dir.join("audit/checkpoints.jsonl");
    let text = format!(
        "database_url = {database_url:?}\ndata_dir = {:?}\nidentity_hash_key = \"k\"\n\
         signing_key = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [audit]\ncheckpoint_key = {checkpoint_key:?}\ncheckpoint_file = {checkpoint_file:?}\n\
         [[subprocessors]]\nname = \"crm\"\ncategories = [\"contact\"]\n\
         connector = {{ type = \"noop\" }}\n\
         [[subprocessors]]\nname = \"mail\"\ncategories = [\"contact\"]\n\
         connector = {{ type = \"noop\" }}\n\
         [[controllers]]\nname = \"acme\"\nidentity = \"spiffe://dsrelay.dev/registry/0\"\n\
         registry_endpoint = \"https://localhost:1\"\n",
        dir.join("data"),
        pki.signing_key("processor"),
        tls.ca,
        tls.cert,
        tls.key,
    );
    let file = dir.join("processor.toml");
    std::fs::write(&file, text).expect("config file");
    Config::load_from(Some(&file), Vec::new()).expect("config")
}

async fn claim(shared: &Shared) -> Vec<TaskJob> {
    let lease_ms = shared.config.tasks.lease_ms as i64;
    shared
        .store
        .claim_tasks(shared.clock.now_ms(), 10, lease_ms)
        .await
        .expect("claim")
}

/// The claimed job of `subprocessor`'s task, out of `jobs`.
fn job_of(jobs: &mut Vec<TaskJob>, subprocessor: &str) -> TaskJob {
    let i = jobs
        .iter()
        .position(|j| j.task.key.subprocessor == subprocessor)
        .unwrap_or_else(|| panic!("no job of {subprocessor}"));
    jobs.remove(i)
}

/// `subprocessor`'s acknowledgements, in order.
async fn acks(shared: &Shared, subprocessor: &str) -> Vec<Acknowledgement> {
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM ack_outbox WHERE request_id = 'r-1' AND subprocessor = $1 \
         ORDER BY sequence",
    )
    .bind(subprocessor)
    .fetch_all(&shared.store.db().pool)
    .await
    .expect("acks");
    payloads
        .iter()
        .map(|p| Acknowledgement::decode(p.as_slice()).expect("ack"))
        .collect()
}

fn certificate(ack: &Acknowledgement) -> CertificateBody {
    let c = ack.certificate.as_ref().expect("a certificate");
    serde_json::from_slice(&c.body).expect("certificate body")
}

async fn an_accepted_retention_run_counts_every_run(database_url: &str, dir: &std::path::Path) {
    let connectors = HashMap::from([
        ("crm".to_string(), Arc::new(Scripted) as Arc<dyn Connector>),
        ("mail".to_string(), Arc::new(Scripted) as Arc<dyn Connector>),
    ]);
    let app = App::with_connectors(config(dir, database_url), connectors)
        .await
        .expect("app");
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    let subprocessors = ["crm".to_string(), "mail".to_string()];
    shared
        .store
        .accept("acme", &req, &subprocessors, None, now)
        .await
        .expect("accept");
    let mut jobs = claim(&shared).await;
    // `mail`'s step waits (its claim held) until `crm`'s retention run awaits its holder.
    let mail = job_of(&mut jobs, "mail");
    let crm = job_of(&mut jobs, "crm");
    crate::runner::run_task(&shared, crm)
        .await
        .expect("erasure");
    let first = certificate(acks(&shared, "crm").await.last().expect("RETAINED"));
    assert_eq!(
        (first.task_state.as_str(), first.records_affected),
        ("RETAINED", 5)
    );

    // The retention run, due at once: the holder accepts it.
    let run = job_of(&mut claim(&shared).await, "crm");
    crate::runner::run_task(&shared, run)
        .await
        .expect("retention run");
    let task = shared.store.tasks("acme", "r-1").await.expect("tasks");
    let crm = task
        .iter()
        .find(|t| t.key.subprocessor == "crm")
        .expect("crm");
    assert_eq!(
        (crm.state, crm.records_affected, crm.handle.as_deref()),
        (TaskState::InProgress, 5, Some("h-1")),
        "{crm:?}"
    );
    let waiting = acks(&shared, "crm").await.pop().expect("IN_PROGRESS");
    assert_eq!(waiting.state(), TaskState::InProgress);
    assert_eq!(
        waiting.evidence.as_ref().map(|e| e.records_affected),
        Some(5)
    );
    // The protocol carries a legal basis for RETAINED only.
    assert_eq!(
        (waiting.legal_basis.as_str(), waiting.retain_until),
        ("", None)
    );

    // Meanwhile `mail` erases: its certificate lists what `crm` still keeps.
    crate::runner::run_task(&shared, mail).await.expect("mail");
    let mail = certificate(acks(&shared, "mail").await.last().expect("COMPLETED"));
    assert_eq!(mail.task_state, "COMPLETED");
    let kept: Vec<(&str, &str)> = mail
        .retained
        .iter()
        .map(|r| (r.subprocessor.as_str(), r.legal_basis.as_str()))
        .collect();
    assert_eq!(kept, [("crm", BASIS)], "{mail:?}");

    // The holder confirms the run: every run's records count.
    shared
        .clock
        .advance(shared.config.tasks.confirm_interval_ms as i64 + 1);
    let confirm = job_of(&mut claim(&shared).await, "crm");
    crate::runner::run_task(&shared, confirm)
        .await
        .expect("confirmation");
    let done = acks(&shared, "crm").await.pop().expect("COMPLETED");
    assert_eq!(done.state(), TaskState::Completed);
    assert_eq!(done.evidence.as_ref().map(|e| e.records_affected), Some(7));
    let second = certificate(&done);
    assert_eq!(
        (second.task_state.as_str(), second.records_affected),
        ("COMPLETED", 7)
    );
    assert_eq!(
        second.follows.as_deref(),
        Some(first.certificate_id.as_str())
    );
    assert!(second.retained.is_empty(), "{second:?}");
}

/// A request cancelled while its task is RETAINED still has the rest erased at its date
/// (the cancellation changes nothing there); when the holder accepts that run, its
/// confirmation is still asked for, though the task is no longer RETAINED and was never
/// marked: the data goes, and the task reports it.
async fn a_cancelled_requests_retention_run_is_confirmed(url: &str, dir: &std::path::Path) {
    let connectors = HashMap::from([("crm".to_string(), Arc::new(Scripted) as Arc<dyn Connector>)]);
    let app = App::with_connectors(config(dir, url), connectors)
        .await
        .expect("app");
    let shared = app.shared();
    let now = shared.clock.now_ms();
    let req = DeliverRequest {
        request_id: "r-1".into(),
        kind: RequestKind::Erasure as i32,
        due_at: Some(timestamp_from_millis(now + 600_000)),
        ..Default::default()
    };
    shared
        .store
        .accept("acme", &req, &["crm".to_string()], None, now)
        .await
        .expect("accept");
    let erase = job_of(&mut claim(&shared).await, "crm");
    crate::runner::run_task(&shared, erase)
        .await
        .expect("erasure");
    let tasks = shared
        .store
        .cancel("acme", "r-1", "withdrawn", shared.clock.now_ms())
        .await
        .expect("cancel");
    assert_eq!(tasks[0].state, TaskState::Retained, "{tasks:?}");
    let run = job_of(&mut claim(&shared).await, "crm");
    crate::runner::run_task(&shared, run)
        .await
        .expect("retention run");
    shared
        .clock
        .advance(shared.config.tasks.confirm_interval_ms as i64 + 1);
    let confirm = job_of(&mut claim(&shared).await, "crm");
    crate::runner::run_task(&shared, confirm)
        .await
        .expect("confirmation");
    let task = &shared.store.tasks("acme", "r-1").await.expect("tasks")[0];
    assert_eq!(
        (task.state, task.records_affected),
        (TaskState::Completed, 7),
        "{task:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_requests_retention_run_is_confirmed_on_sqlite() {
    super::cancel_tests::on_sqlite(|u, d| async move {
        a_cancelled_requests_retention_run_is_confirmed(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_requests_retention_run_is_confirmed_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        a_cancelled_requests_retention_run_is_confirmed(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_retention_run_counts_every_run_on_sqlite() {
    super::cancel_tests::on_sqlite(|u, d| async move {
        an_accepted_retention_run_counts_every_run(&u, &d).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_retention_run_counts_every_run_on_postgres() {
    crate::test_postgres::on_postgres(|u, d| async move {
        an_accepted_retention_run_counts_every_run(&u, &d).await
    })
    .await;
}
