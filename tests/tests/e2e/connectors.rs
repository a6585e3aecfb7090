//! The connector family through the real services: manual confirmation by an operator,
//! explicit refusals, a holder that is down, a failed task an operator retries once its
//! holder is repaired, and the published subprocessor chain.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dsrelay_runtime::backoff::Backoff;
use tokio::net::TcpListener;

use dsrelay_proto::v1::processor_operator_service_client::ProcessorOperatorServiceClient;
use dsrelay_proto::v1::{
    CompleteManualTaskRequest, GetChainRequest, IdentityEncoding, IdentityType,
    ListManualTasksRequest, RefuseManualTaskRequest, RequestKind, RequestState, RetryTaskRequest,
    Scope, SubmitRequest, TaskRef, TaskState, TransferMechanism,
};
use tonic::Code;

use crate::harness::{
    count, dsrctl as cli, email, erasure, in_state, spawn_pair, wait_until, Backend, Holder,
    PairOptions, CONTROLLER, NEWSLETTER, PROCESSOR,
};

/// A holder's port that accepts every connection and drops it at once, counting them: to
/// its callers the holder is down (a transient failure), and the test sees who tried.
struct CountingHolder {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    accepting: tokio::task::JoinHandle<()>,
}

impl CountingHolder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(socket);
            }
        });
        Self {
            addr,
            connections,
            accepting,
        }
    }

    /// Connections attempted so far.
    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for CountingHolder {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_tasks_are_listed_a_page_at_a_time_on_sqlite() {
    manual_tasks_are_listed_a_page_at_a_time(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_tasks_are_listed_a_page_at_a_time_on_postgres() {
    manual_tasks_are_listed_a_page_at_a_time(Backend::Postgres).await;
}

/// The waiting tasks come a page at a time, oldest first, each page going on where the one
/// before ended, none twice and none left out; a made-up token is refused.
async fn manual_tasks_are_listed_a_page_at_a_time(backend: Backend) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        holders: vec![Holder::PaperArchive],
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.client("partner-crm");
    let mut submitted = Vec::new();
    for i in 0..5 {
        let mut req = erasure(&format!("subject-{i}@example.fi"));
        req.scope = Some(Scope {
            data_categories: vec!["archive".into()],
        });
        let r = crm.submit(req).await.expect("submit").into_inner();
        wait_until(&mut crm, &r.request_id, Duration::from_secs(20), |v| {
            v.tasks
                .iter()
                .any(|t| t.state == TaskState::WaitingForOperator as i32)
        })
        .await;
        submitted.push(r.request_id);
    }
    let mut ops = ProcessorOperatorServiceClient::new(pair.channel_to_processor("operator"));
    let mut listed = Vec::new();
    let mut sizes = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = ops
            .list_manual_tasks(ListManualTasksRequest {
                limit: 2,
                page_token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        sizes.push(page.tasks.len());
        listed.extend(
            page.tasks
                .into_iter()
                .map(|t| t.task.expect("task").request_id),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(sizes, [2, 2, 1]);
    // Each waited before the next was submitted, so the oldest change is the first.
    assert_eq!(listed, submitted);
    let refused = ops
        .list_manual_tasks(ListManualTasksRequest {
            page_token: "not.a.token".into(),
            ..Default::default()
        })
        .await
        .expect_err("a made-up token");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("page_token"), "{refused:?}");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_tasks_wait_for_an_operator_who_confirms_with_evidence() {
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
    let mut crm = pair.client("partner-crm");
    let mut req = erasure("maija.meikalainen@example.fi");
    req.scope = Some(Scope {
        data_categories: vec!["archive".into()],
    });
    let r = crm.submit(req).await.expect("submit").into_inner();
    let view = wait_until(&mut crm, &r.request_id, Duration::from_secs(20), |v| {
        v.tasks
            .iter()
            .any(|t| t.state == TaskState::WaitingForOperator as i32)
    })
    .await;
    // Waiting for a person is progress, not completion.
    assert_eq!(view.state, RequestState::InProgress as i32);

    // Only the processor's operators may see and confirm manual tasks.
    let mut as_partner =
        ProcessorOperatorServiceClient::new(pair.channel_to_processor("partner-crm"));
    let err = as_partner
        .list_manual_tasks(ListManualTasksRequest::default())
        .await
        .expect_err("partner");
    assert_eq!(err.code(), Code::PermissionDenied);

    let mut ops = ProcessorOperatorServiceClient::new(pair.channel_to_processor("operator"));
    let open = ops
        .list_manual_tasks(ListManualTasksRequest::default())
        .await
        .expect("list")
        .into_inner()
        .tasks;
    assert_eq!(open.len(), 1);
    let task = open[0].clone();
    assert_eq!(task.kind, RequestKind::Erasure as i32);
    assert_eq!(task.identities[0].value, "maija.meikalainen@example.fi");
    assert!(task.instructions.contains("shred"), "{task:?}");

    let err = ops
        .complete_manual_task(CompleteManualTaskRequest {
            task: task.task.clone(),
            evidence_note: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("evidence is required");
    assert_eq!(err.code(), Code::InvalidArgument);
    let done = ops
        .complete_manual_task(CompleteManualTaskRequest {
            task: task.task.clone(),
            not_found: false,
            records_affected: 1,
            evidence_note: "shredded folder C-1001, witnessed by M. Virtanen".into(),
        })
        .await
        .expect("complete")
        .into_inner();
    assert_eq!(done.state, TaskState::Completed as i32);
    // Confirming twice is refused: the task is no longer waiting.
    let err = ops
        .refuse_manual_task(RefuseManualTaskRequest {
            task: task.task.clone(),
            reason: "too late".into(),
        })
        .await
        .expect_err("already done");
    assert_eq!(err.code(), Code::FailedPrecondition);

    let view = wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(20),
        in_state(RequestState::Completed),
    )
    .await;
    let t = &view.tasks[0];
    let evidence = t.evidence.clone().expect("evidence");
    assert!(evidence.confirmed);
    assert_eq!(evidence.records_affected, 1);
    assert!(evidence.note.contains("witnessed"), "{evidence:?}");
    assert!(evidence.note.contains("spiffe://dsrelay.dev/operator/ops"));
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_evidence_or_reason_naming_the_subject_is_refused() {
    const ADDRESS: &str = "tiina.todiste@example.fi";
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::PaperArchive],
        ..Default::default()
    })
    .await
    .expect("pair");
    let mut crm = pair.client("partner-crm");
    let mut req = erasure(ADDRESS);
    req.scope = Some(Scope {
        data_categories: vec!["archive".into()],
    });
    let r = crm.submit(req).await.expect("submit").into_inner();
    wait_until(&mut crm, &r.request_id, Duration::from_secs(20), |v| {
        v.tasks
            .iter()
            .any(|t| t.state == TaskState::WaitingForOperator as i32)
    })
    .await;
    let mut ops = ProcessorOperatorServiceClient::new(pair.channel_to_processor("operator"));
    let task = ops
        .list_manual_tasks(ListManualTasksRequest::default())
        .await
        .expect("list")
        .into_inner()
        .tasks[0]
        .task
        .clone();
    let shouted = ADDRESS.to_uppercase();
    let complete = |not_found: bool, note: String| CompleteManualTaskRequest {
        task: task.clone(),
        not_found,
        records_affected: 1,
        evidence_note: note,
    };
    // Done, nothing found, refused: each text naming the subject's address (in any case) is
    // refused, saying which kind of identity it holds and never the value.
    let refusals = [
        ops.complete_manual_task(complete(false, format!("shredded the folder of {shouted}")))
            .await,
        ops.complete_manual_task(complete(true, format!("no folder for <{ADDRESS}>.")))
            .await,
        ops.refuse_manual_task(RefuseManualTaskRequest {
            task: task.clone(),
            reason: format!("{ADDRESS} has a legal hold"),
        })
        .await,
    ];
    for (refused, field) in refusals
        .into_iter()
        .zip(["evidence_note", "evidence_note", "reason"])
    {
        let refused = refused.expect_err("a text naming the subject");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        let said = format!("{refused:?}").to_lowercase();
        assert!(
            said.contains(field) && said.contains("e-mail address"),
            "{said}"
        );
        assert!(!said.contains("tiina.todiste"), "{said}");
    }
    // The task still waits, and evidence without the address is taken.
    let done = ops
        .complete_manual_task(complete(false, "shredded folder 2019/14".into()))
        .await
        .expect("complete")
        .into_inner();
    assert_eq!(done.state, TaskState::Completed as i32);
    let view = wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(20),
        in_state(RequestState::Completed),
    )
    .await;
    let note = &view.tasks[0].evidence.as_ref().expect("evidence").note;
    assert!(
        note.contains("2019/14") && !note.contains("tiina"),
        "{note}"
    );
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_kind_is_refused_with_the_reason() {
    // The newsletter is configured for erasure alone: a restriction is refused without
    // calling it.
    let holder = CountingHolder::start().await;
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Newsletter],
        newsletter_endpoint: Some(holder.addr),
        newsletter_kinds: Some(vec!["erasure".into()]),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let mut crm = pair.crm();
    let mut req = erasure("maija.meikalainen@example.fi");
    req.kind = RequestKind::Restriction as i32;
    req.scope = Some(Scope {
        data_categories: vec!["marketing".into()],
    });
    let r = crm.submit(req).await.expect("submit").into_inner();
    let view = wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(20),
        in_state(RequestState::Failed),
    )
    .await;
    assert_eq!(view.tasks.len(), 1, "{view:#?}");
    let t = &view.tasks[0];
    assert_eq!(t.subprocessor, NEWSLETTER);
    assert_eq!(t.state, TaskState::Refused as i32, "{t:?}");
    assert_eq!(
        t.reason,
        "subprocessor newsletter (adapter connector) does not support RESTRICTION"
    );
    assert_eq!(holder.connections(), 0, "the holder was called");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_chain_is_visible_to_the_controller() {
    let pair = spawn_pair(PairOptions {
        holders: vec![
            Holder::Accounting,
            Holder::MailMarketing,
            Holder::PaperArchive,
        ],
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    .expect("pair");
    let mut ops = pair.client("operator");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let chain = loop {
        let chain = ops
            .get_chain(GetChainRequest {})
            .await
            .expect("chain")
            .into_inner();
        let ready = chain
            .processors
            .iter()
            .all(|p| p.reported_at.is_some() || !p.last_error.is_empty());
        if ready {
            break chain;
        }
        assert!(tokio::time::Instant::now() < deadline, "{chain:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let bureau = chain
        .processors
        .iter()
        .find(|p| p.name == PROCESSOR)
        .expect("processor");
    let names: Vec<&str> = bureau
        .subprocessors
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["accounting", "mail-marketing", "paper-archive"]);
    let mail = &bureau.subprocessors[1];
    assert_eq!(mail.country, "US");
    assert_eq!(
        mail.transfer_mechanism,
        TransferMechanism::AdequacyDecision as i32
    );
    assert_eq!(mail.data_categories, vec!["marketing".to_string()]);
    let accounting = &bureau.subprocessors[0];
    assert_eq!(accounting.connector, "sql");
    assert!(accounting
        .supported_kinds
        .contains(&(RequestKind::Erasure as i32)));
    assert_eq!(
        accounting.transfer_mechanism,
        TransferMechanism::None as i32
    );
    // What each holder can find a subject by, so a partner knows before submitting: SQL raw
    // values of its match columns' types; the mail system (a noop stand-in here) and the
    // manual holder (whose operator is given every identity) list nothing.
    let forms = |s: &dsrelay_proto::v1::Subprocessor| -> Vec<(IdentityType, IdentityEncoding)> {
        (s.matchable_identities.iter())
            .map(|m| {
                let ty = IdentityType::try_from(m.r#type).expect("type");
                (
                    ty,
                    IdentityEncoding::try_from(m.encoding).expect("encoding"),
                )
            })
            .collect()
    };
    let raw = IdentityEncoding::Raw;
    assert_eq!(
        forms(accounting),
        [
            (IdentityType::Email, raw),
            (IdentityType::Phone, raw),
            (IdentityType::CustomerNumber, raw),
            (IdentityType::NationalId, raw),
        ]
    );
    assert_eq!(forms(mail), []);
    assert_eq!(forms(&bureau.subprocessors[2]), []);
    // The unreachable processor is listed with why it could not be asked.
    let absent = chain
        .processors
        .iter()
        .find(|p| p.name == "web-agency")
        .expect("absent processor");
    assert!(absent.subprocessors.is_empty());
    assert!(!absent.last_error.is_empty());
    assert!(bureau.endpoint.starts_with("https://"), "{bureau:?}");
    let tables: Vec<&str> = accounting.tables.iter().map(|t| t.name.as_str()).collect();
    assert!(
        !tables.is_empty(),
        "an operator sees the sql holder's tables: {accounting:?}"
    );

    // A partner sees the same chain without the internal endpoints and connection errors.
    let partner = pair
        .crm()
        .get_chain(GetChainRequest {})
        .await
        .expect("chain for a partner")
        .into_inner();
    assert_eq!(partner.processors.len(), chain.processors.len());
    for (seen, full) in partner.processors.iter().zip(&chain.processors) {
        assert_eq!(seen.name, full.name);
        // Table names are internal schema details too: an operator's chain has them.
        let mut without_tables = full.subprocessors.clone();
        for s in &mut without_tables {
            s.tables.clear();
        }
        assert_eq!(seen.subprocessors, without_tables);
        assert_eq!(seen.data_categories, full.data_categories);
        assert!(seen.endpoint.is_empty(), "{seen:?}");
        assert!(seen.last_error.is_empty(), "{seen:?}");
    }
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_is_down_does_not_hold_up_the_others() {
    // The newsletter's holder is down (its port drops every connection, counting them);
    // the mail system answers at once.
    let holder = CountingHolder::start().await;
    let pair = spawn_pair(PairOptions {
        holders: vec![Holder::Newsletter, Holder::MailMarketing],
        newsletter_endpoint: Some(holder.addr),
        // A backoff longer than the test: the holder stays marked down throughout, so any
        // call after the first failure is one the mark should have stopped.
        task_backoff: Some(Backoff {
            initial_ms: 30_000,
            max_ms: 30_000,
        }),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let mut crm = pair.crm();
    let submit = |i: usize| {
        let mut req = erasure(&format!("someone{i}@example.fi"));
        req.scope = Some(Scope {
            data_categories: vec!["marketing".into()],
        });
        req
    };

    // The first task finds the holder down, which marks it.
    let first = crm.submit(submit(0)).await.expect("submit");
    let mut ids = vec![first.into_inner().request_id];
    let db = pair.processor.database_url();
    let failed = format!(
        "SELECT COUNT(*) FROM tasks WHERE subprocessor = '{}' AND last_error IS NOT NULL",
        NEWSLETTER
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while count(db, &failed).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the newsletter never failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls_before = holder.connections();
    assert!(calls_before > 0);

    // The others wait for it without calling it, and do not hold up the mail system.
    for i in 1..7 {
        ids.push(
            crm.submit(submit(i))
                .await
                .expect("submit")
                .into_inner()
                .request_id,
        );
    }
    for id in &ids {
        let view = wait_until(&mut crm, id, Duration::from_secs(10), |v| {
            v.tasks.iter().any(|t| {
                t.subprocessor == "mail-marketing" && t.state == TaskState::Completed as i32
            })
        })
        .await;
        let newsletter = view
            .tasks
            .iter()
            .find(|t| t.subprocessor == NEWSLETTER)
            .expect("newsletter task");
        // Still waiting for its holder, not failed: it is retried until the due date.
        assert_eq!(
            newsletter.state,
            TaskState::InProgress as i32,
            "{newsletter:#?}"
        );
        assert_eq!(view.state, RequestState::InProgress as i32);
    }
    let waiting = format!(
        "SELECT COUNT(*) FROM tasks WHERE subprocessor = '{}' \
         AND last_error = 'subprocessor {0} is unreachable; waiting'",
        NEWSLETTER
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count(db, &waiting).await < 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other newsletter tasks did not wait for the holder"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Six more tasks, no more calls: one task paid for finding the holder down.
    assert_eq!(
        holder.connections(),
        calls_before,
        "tasks called a holder marked down"
    );
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_identity_is_visible_to_operators_on_both_sides() {
    use dsrelay_proto::v1::SubjectIdentity;
    let pair = spawn_pair(PairOptions::default()).await.expect("pair");
    let mut crm = pair.client("partner-crm");
    // SQL cannot match a hashed identity: the holder refuses the input (only the partner can
    // give a raw one), with no retry and nothing for an operator to fix.
    let mut req = erasure("unused@example.fi");
    req.identities = vec![SubjectIdentity {
        r#type: IdentityType::Email as i32,
        encoding: IdentityEncoding::Sha256 as i32,
        value: "a".repeat(64),
        label: String::new(),
    }];
    req.scope = Some(Scope {
        data_categories: vec!["invoicing".into()],
    });
    let r = crm.submit(req).await.expect("submit").into_inner();
    let view = wait_until(
        &mut crm,
        &r.request_id,
        Duration::from_secs(20),
        in_state(RequestState::Failed),
    )
    .await;
    let t = &view.tasks[0];
    assert_eq!(t.state, TaskState::Refused as i32);
    assert!(t.reason.contains("raw identity"), "{t:#?}");

    let mut ops = ProcessorOperatorServiceClient::new(pair.channel_to_processor("operator"));
    let failed = ops
        .list_manual_tasks(ListManualTasksRequest {
            states: vec![TaskState::Failed as i32, TaskState::Refused as i32],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .tasks;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].reason, t.reason);
    assert_eq!(failed[0].attempts, 1, "a refusal is not retried");
    // Nothing waits for an operator.
    let waiting = ops
        .list_manual_tasks(ListManualTasksRequest::default())
        .await
        .expect("list")
        .into_inner()
        .tasks;
    assert!(waiting.is_empty());
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_retries_a_failed_task_once_its_holder_is_repaired_on_sqlite() {
    an_operator_retries_a_failed_task_once_its_holder_is_repaired(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_retries_a_failed_task_once_its_holder_is_repaired_on_postgres() {
    an_operator_retries_a_failed_task_once_its_holder_is_repaired(Backend::Postgres).await;
}

/// Runs `sql` on the SQLite or PostgreSQL database at `url`.
async fn execute(url: &str, sql: &str) {
    let db = dsrelay_runtime::store::Db::connect(url)
        .await
        .expect("connect");
    sqlx::query(sql).execute(&db.pool).await.expect(sql);
    db.pool.close().await;
}

/// The accounting holder's database loses a table (a permanent error: the task FAILED), an
/// operator repairs it and retries the task, which the registry follows back to IN_PROGRESS
/// and on to COMPLETED with the rows erased. What may not be retried is refused, saying why.
async fn an_operator_retries_a_failed_task_once_its_holder_is_repaired(backend: Backend) {
    const ADDRESS: &str = "teemu.testaaja@example.fi";
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    execute(
        &pair.accounting_url,
        "ALTER TABLE contacts RENAME TO contacts_moved",
    )
    .await;
    let mut crm = pair.client("partner-crm");
    let erasure_id = crm
        .submit(erasure(ADDRESS))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    let access_id = crm
        .submit(SubmitRequest {
            kind: RequestKind::ReturnOfData as i32,
            identities: vec![email(ADDRESS)],
            idempotency_key: format!("test-{}", uuid::Uuid::new_v4()),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    for id in [&erasure_id, &access_id] {
        wait_until(
            &mut crm,
            id,
            Duration::from_secs(20),
            in_state(RequestState::Failed),
        )
        .await;
    }
    let task = |request_id: &str, subprocessor: &str| {
        Some(TaskRef {
            controller: CONTROLLER.into(),
            request_id: request_id.into(),
            subprocessor: subprocessor.into(),
        })
    };
    let retry = |request_id: &str, subprocessor: &str, note: &str| RetryTaskRequest {
        task: task(request_id, subprocessor),
        note: note.into(),
    };
    const NOTE: &str = "contacts table restored from the backup";

    // Only the processor's operators retry, with a note that leaves the subject out.
    let mut as_partner =
        ProcessorOperatorServiceClient::new(pair.channel_to_processor("partner-crm"));
    let err = as_partner
        .retry_task(retry(&erasure_id, "accounting", NOTE))
        .await
        .expect_err("a partner");
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut ops = ProcessorOperatorServiceClient::new(pair.channel_to_processor("operator"));
    for (note, field) in [("", "note"), (ADDRESS, "subject's e-mail address")] {
        let err = ops
            .retry_task(retry(&erasure_id, "accounting", note))
            .await
            .expect_err("a bad note");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{err:?}");
    }
    let err = ops
        .retry_task(retry("no-such-request", "accounting", NOTE))
        .await
        .expect_err("no task");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // A task that did not fail.
    let err = ops
        .retry_task(retry(&erasure_id, "mail-marketing", NOTE))
        .await
        .expect_err("a completed task");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("only a FAILED or REFUSED task is retried"),
        "{err:?}"
    );
    // The failed erasure did nothing.
    let processor_db = pair.processor.database_url();
    let erased = "SELECT COUNT(*) FROM customers WHERE email = 'teemu.testaaja@example.fi'";
    assert_eq!(count(&pair.accounting_url, erased).await, 1);

    execute(
        &pair.accounting_url,
        "ALTER TABLE contacts_moved RENAME TO contacts",
    )
    .await;
    // The return of data first, while the customer is still there: it exports again, and
    // its part reaches the registry, so the package is whole, and dsrctl downloads it and
    // checks every file. Before, RetryTask refused a return of data, and the partner had to
    // submit the request again.
    let retried = ops
        .retry_task(retry(&access_id, "accounting", NOTE))
        .await
        .expect("a return of data is retried")
        .into_inner();
    assert_eq!(retried.state, TaskState::InProgress as i32, "{retried:?}");
    wait_until(
        &mut crm,
        &access_id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;
    let out = pair.dir().join("retried-return");
    let run = cli::dsrctl(
        &pair,
        "partner-crm",
        &[
            "download",
            &access_id,
            "--out",
            out.to_str().expect("utf-8 path"),
            "--output",
            "json",
        ],
    )
    .await;
    let summary = run.json();
    assert_eq!(summary["verified"], true, "{summary:#}");
    let customers = out.join(format!("{PROCESSOR}/accounting/customers.json"));
    let exported = std::fs::read_to_string(&customers).expect("the accounting part's file");
    assert!(exported.contains(ADDRESS), "{exported}");
    // Through dsrctl, as an operator would.
    let processor = format!("https://localhost:{}", pair.processor.addr().port());
    let mut cmd = cli::as_party(&pair, "operator");
    cmd.args([
        "--output",
        "json",
        "tasks",
        "retry",
        "--processor",
        &processor,
    ])
    .args([CONTROLLER, &erasure_id, "accounting", "--note", NOTE]);
    let retried = cli::output(cmd).await.json();
    assert_eq!(retried["state"], "IN_PROGRESS", "{retried}");
    assert_eq!(retried["attempts"], 0, "{retried}");
    assert_eq!(
        retried["reason"],
        format!("retried by spiffe://dsrelay.dev/operator/ops: {NOTE}"),
        "{retried}"
    );
    assert_eq!(retried["last_error"], "", "{retried}");
    let view = wait_until(
        &mut crm,
        &erasure_id,
        Duration::from_secs(20),
        in_state(RequestState::Completed),
    )
    .await;
    let accounting = view
        .tasks
        .iter()
        .find(|t| t.subprocessor == "accounting")
        .expect("accounting task");
    assert_eq!(accounting.state, TaskState::Completed as i32, "{view:#?}");
    assert!(
        accounting
            .evidence
            .as_ref()
            .expect("evidence")
            .records_affected
            > 0,
        "{view:#?}"
    );
    assert_eq!(count(&pair.accounting_url, erased).await, 0);
    // The registry followed the retry: the request was open again after it had failed, and
    // its trail keeps who retried it and why.
    let registry_db = pair.registry.database_url();
    let reopened = format!(
        "SELECT COUNT(*) FROM events WHERE request_id = '{erasure_id}' AND request_state = {} \
         AND id > (SELECT MIN(id) FROM events WHERE request_id = '{erasure_id}' \
         AND request_state = {})",
        RequestState::InProgress as i32,
        RequestState::Failed as i32
    );
    assert!(count(registry_db, &reopened).await > 0);
    let noted = format!(
        "SELECT COUNT(*) FROM events WHERE request_id = '{erasure_id}' \
         AND message LIKE '%IN_PROGRESS: retried by spiffe://dsrelay.dev/operator/ops: {NOTE}'"
    );
    assert_eq!(count(registry_db, &noted).await, 1);
    // Done once: a second retry finds it COMPLETED.
    let err = ops
        .retry_task(retry(&erasure_id, "accounting", NOTE))
        .await
        .expect_err("retried already");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let retried_entries = format!(
        "SELECT COUNT(*) FROM audit_log WHERE request_id = '{erasure_id}' \
         AND actor = 'spiffe://dsrelay.dev/operator/ops'"
    );
    assert_eq!(count(processor_db, &retried_entries).await, 1);

    pair.stop().await;
}
