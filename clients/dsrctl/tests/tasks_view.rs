//! Runs `dsrctl tasks list` against a stand-in processor operator service served in this
//! process on 127.0.0.1, over mutual TLS with a development PKI, whose manual tasks each
//! test sets, to check that the operator sees all the work: whose data, which data and the
//! kind's parameters (the corrected values of a rectification, above all).
//!
//! The real processor with a manual connector is in the workspace's end-to-end suite
//! (`tests/`).

use std::process::Stdio;
use std::sync::Arc;

use dsrelay_proto::v1::processor_operator_service_server::{
    ProcessorOperatorService, ProcessorOperatorServiceServer,
};
use dsrelay_proto::v1::{
    CompleteManualTaskRequest, ContractEndList, DeadLetterList, FieldCorrection, IdentityEncoding,
    IdentityType, ListContractEndsRequest, ListDeadLettersRequest, ListManualTasksRequest,
    ListProcessorAuditCheckpointsRequest, ListProcessorAuditEntriesRequest, ManualTask,
    ManualTaskList, ProcessorAuditCheckpoints, ProcessorAuditEntries, RefuseManualTaskRequest,
    RequestKind, RequestParameters, RequeueDeadLetterRequest, RequeueDeadLetterResponse,
    RetryTaskRequest, Scope, SubjectIdentity, TaskRef, TaskState,
};
use dsrelay_runtime::pki::DevPki;
use tonic::{Request as Call, Response, Status};

/// Answers ListManualTasks with its tasks, in one page.
#[derive(Clone)]
struct StandIn(Arc<Vec<ManualTask>>);

fn unanswered<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this stand-in"))
}

#[tonic::async_trait]
impl ProcessorOperatorService for StandIn {
    async fn list_manual_tasks(
        &self,
        _: Call<ListManualTasksRequest>,
    ) -> Result<Response<ManualTaskList>, Status> {
        Ok(Response::new(ManualTaskList {
            tasks: self.0.to_vec(),
            next_page_token: String::new(),
        }))
    }
    async fn complete_manual_task(
        &self,
        _: Call<CompleteManualTaskRequest>,
    ) -> Result<Response<ManualTask>, Status> {
        unanswered()
    }
    async fn refuse_manual_task(
        &self,
        _: Call<RefuseManualTaskRequest>,
    ) -> Result<Response<ManualTask>, Status> {
        unanswered()
    }
    async fn retry_task(&self, _: Call<RetryTaskRequest>) -> Result<Response<ManualTask>, Status> {
        unanswered()
    }
    async fn list_dead_letters(
        &self,
        _: Call<ListDeadLettersRequest>,
    ) -> Result<Response<DeadLetterList>, Status> {
        unanswered()
    }
    async fn requeue_dead_letter(
        &self,
        _: Call<RequeueDeadLetterRequest>,
    ) -> Result<Response<RequeueDeadLetterResponse>, Status> {
        unanswered()
    }
    async fn list_contract_ends(
        &self,
        _: Call<ListContractEndsRequest>,
    ) -> Result<Response<ContractEndList>, Status> {
        unanswered()
    }
    async fn list_audit_entries(
        &self,
        _: Call<ListProcessorAuditEntriesRequest>,
    ) -> Result<Response<ProcessorAuditEntries>, Status> {
        unanswered()
    }
    async fn list_audit_checkpoints(
        &self,
        _: Call<ListProcessorAuditCheckpointsRequest>,
    ) -> Result<Response<ProcessorAuditCheckpoints>, Status> {
        unanswered()
    }
}

/// The stand-in processor, serving until dropped, and a folder holding the development PKI
/// dsrctl finds in its working directory (as the operator).
struct Processor {
    dir: tempfile::TempDir,
    endpoint: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Processor {
    async fn start(tasks: Vec<ManualTask>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = DevPki::ensure(&dir.path().join(".dsrelay/pki")).expect("dev pki");
        let tls = pki
            .files("processor")
            .server_config()
            .expect("processor tls");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = dsrelay_runtime::server::builder(tls)
            .expect("server")
            .add_service(ProcessorOperatorServiceServer::new(StandIn(Arc::new(
                tasks,
            ))))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            );
        tokio::spawn(server);
        Self {
            dir,
            endpoint: format!("https://localhost:{port}"),
            _stop: stop,
        }
    }

    /// Runs `dsrctl tasks list` with `args` against the stand-in: exit code, stdout and
    /// stderr.
    async fn list(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dsrctl"));
        cmd.current_dir(self.dir.path())
            .args(["tasks", "list", "--processor", &self.endpoint])
            .args(args)
            .stdin(Stdio::null());
        for (name, _) in std::env::vars() {
            if name.starts_with("DSRCTL_") {
                cmd.env_remove(name);
            }
        }
        let out = cmd.output().await.expect("running dsrctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// A task waiting for an operator, of `kind`, limited to `categories` (none: all data).
fn task(
    request_id: &str,
    kind: RequestKind,
    categories: &[&str],
    parameters: RequestParameters,
) -> ManualTask {
    ManualTask {
        task: Some(TaskRef {
            controller: "controller".into(),
            request_id: request_id.into(),
            subprocessor: "archive".into(),
        }),
        kind: kind as i32,
        identities: vec![SubjectIdentity {
            r#type: IdentityType::Email as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: "maija@example.fi".into(),
            label: String::new(),
        }],
        scope: Some(Scope {
            data_categories: categories.iter().map(|c| c.to_string()).collect(),
        }),
        parameters: Some(parameters),
        state: TaskState::WaitingForOperator as i32,
        instructions: "cabinet B2".into(),
        ..Default::default()
    }
}

fn correction(field: &str, new_value: &str) -> FieldCorrection {
    FieldCorrection {
        field: field.into(),
        new_value: new_value.into(),
    }
}

/// The row of `request_id` in a table.
fn row<'a>(table: &'a str, request_id: &str) -> &'a str {
    (table.lines())
        .find(|l| l.split_whitespace().nth(1) == Some(request_id))
        .unwrap_or_else(|| panic!("no row of {request_id} in\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_sees_the_scope_and_the_parameters_of_each_task() {
    let processor = Processor::start(vec![
        task(
            "r-rectify",
            RequestKind::Rectification,
            &[],
            RequestParameters {
                corrections: vec![
                    correction("phone", "+358 40 1234567"),
                    correction("address", "Kotikatu 7"),
                ],
                ..Default::default()
            },
        ),
        task(
            "r-erase",
            RequestKind::Erasure,
            &["marketing", "contact"],
            RequestParameters::default(),
        ),
        task(
            "r-restrict",
            RequestKind::Restriction,
            &[],
            RequestParameters::default(),
        ),
        task(
            "r-lift",
            RequestKind::Restriction,
            &[],
            RequestParameters {
                lift_restriction: true,
                ..Default::default()
            },
        ),
        task(
            "r-transfer",
            RequestKind::Transfer,
            &["invoicing"],
            RequestParameters {
                transfer_recipient: "successor-bureau".into(),
                ..Default::default()
            },
        ),
    ])
    .await;

    let (code, table, stderr) = processor.list(&[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let header = table.lines().next().expect("a header");
    assert!(
        header.contains("SCOPE") && header.contains("PARAMETERS"),
        "{table}"
    );
    let rectify = row(&table, "r-rectify");
    assert!(
        rectify.contains("all data")
            && rectify.contains("correct phone = +358 40 1234567, address = Kotikatu 7"),
        "{table}"
    );
    let erase = row(&table, "r-erase");
    assert!(
        erase.contains("marketing, contact") && !erase.contains("all data"),
        "{table}"
    );
    assert!(
        row(&table, "r-restrict").contains("set restriction"),
        "{table}"
    );
    assert!(
        row(&table, "r-lift").contains("lift restriction"),
        "{table}"
    );
    let transfer = row(&table, "r-transfer");
    assert!(
        transfer.contains("invoicing") && transfer.contains("to recipient successor-bureau"),
        "{table}"
    );

    let (code, json, stderr) = processor.list(&["--output", "json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("json");
    let tasks = doc["tasks"].as_array().expect("tasks");
    let by_id = |id: &str| {
        (tasks.iter())
            .find(|t| t["request_id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {doc}"))
    };
    let rectify = by_id("r-rectify");
    assert_eq!(rectify["all_data"], true, "{rectify}");
    assert_eq!(
        rectify["corrections"],
        serde_json::json!([
            {"field": "phone", "new_value": "+358 40 1234567"},
            {"field": "address", "new_value": "Kotikatu 7"},
        ]),
        "{rectify}"
    );
    let erase = by_id("r-erase");
    assert_eq!(erase["all_data"], false, "{erase}");
    assert_eq!(
        erase["data_categories"],
        serde_json::json!(["marketing", "contact"]),
        "{erase}"
    );
    assert_eq!(by_id("r-restrict")["lift_restriction"], false);
    assert_eq!(by_id("r-lift")["lift_restriction"], true);
    assert_eq!(
        by_id("r-transfer")["transfer_recipient"],
        "successor-bureau"
    );
}

/// A hashed identity says how it is hashed, so it does not pass for the raw value, and an
/// identity of type other says what it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subject_shows_each_identity_s_encoding_and_label() {
    let mut hashed = task(
        "r-hashed",
        RequestKind::Erasure,
        &[],
        RequestParameters::default(),
    );
    hashed.identities = vec![
        SubjectIdentity {
            r#type: IdentityType::Email as i32,
            encoding: IdentityEncoding::Sha256 as i32,
            value: "ab".repeat(32),
            label: String::new(),
        },
        SubjectIdentity {
            r#type: IdentityType::Other as i32,
            encoding: IdentityEncoding::Raw as i32,
            value: "4000 1234".into(),
            label: "loyalty-card".into(),
        },
        SubjectIdentity {
            r#type: IdentityType::Other as i32,
            encoding: IdentityEncoding::Md5 as i32,
            value: "cd".repeat(16),
            label: "member".into(),
        },
    ];
    let processor = Processor::start(vec![hashed]).await;
    let (code, table, stderr) = processor.list(&[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let hashed = row(&table, "r-hashed");
    for expected in [
        format!("email (sha256)={}", "ab".repeat(32)),
        "other (loyalty-card)=4000 1234".to_string(),
        format!("other (member, md5)={}", "cd".repeat(16)),
    ] {
        assert!(hashed.contains(&expected), "{expected} in {table}");
    }

    // The plain e-mail of the other tests stays as it was.
    let processor = Processor::start(vec![task(
        "r-raw",
        RequestKind::Erasure,
        &[],
        RequestParameters::default(),
    )])
    .await;
    let (code, table, stderr) = processor.list(&[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        row(&table, "r-raw").contains(" email=maija@example.fi "),
        "{table}"
    );
}

/// A task of `request_id` in `state` after `attempts`, with `reason` and `last_error`.
fn worked(
    request_id: &str,
    state: TaskState,
    attempts: u32,
    reason: &str,
    last_error: &str,
) -> ManualTask {
    ManualTask {
        state: state as i32,
        attempts,
        reason: reason.into(),
        last_error: last_error.into(),
        ..task(
            request_id,
            RequestKind::Erasure,
            &[],
            RequestParameters::default(),
        )
    }
}

/// The STATE and ATTEMPTS cells of a row, the fifth and sixth.
fn state_and_attempts(row: &str) -> Vec<&str> {
    row.split_whitespace().skip(4).take(2).collect()
}

/// Listing tasks by state shows each one's state, attempts and why: a failed task's reason,
/// a retried one's last error (before, neither was in the table, and a retried task's last
/// error nowhere at all), cut in the table and whole in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_by_state_show_their_state_attempts_and_why() {
    let locked = "holder crm: database is locked";
    let long_reason = format!("the adapter refused: {}", "x".repeat(400));
    let processor = Processor::start(vec![
        worked("r-retried", TaskState::InProgress, 7, "", locked),
        worked("r-failed", TaskState::Failed, 3, &long_reason, locked),
        worked("r-done", TaskState::Completed, 2, "", locked),
    ])
    .await;
    let (code, table, stderr) = processor
        .list(&["--state", "in-progress", "--state", "failed"])
        .await;
    assert_eq!(code, Some(0), "{stderr}");
    let header = table.lines().next().expect("a header");
    for column in ["STATE", "ATTEMPTS", "WHY"] {
        assert!(header.contains(column), "{column} in {table}");
    }
    let retried = row(&table, "r-retried");
    assert!(
        state_and_attempts(retried) == ["IN_PROGRESS", "7"]
            && retried.ends_with(&format!("last error: {locked}")),
        "{table}"
    );
    let failed = row(&table, "r-failed");
    assert!(
        state_and_attempts(failed) == ["FAILED", "3"]
            && failed.contains("the adapter refused: xxx")
            && failed.ends_with("… (--output json has it whole)")
            && !failed.contains(&long_reason)
            && !failed.contains(locked),
        "{table}"
    );
    // A finished task's last error is of a retry before its outcome, not why it ended so.
    let done = row(&table, "r-done");
    assert!(
        state_and_attempts(done) == ["COMPLETED", "2"] && !done.contains(locked),
        "{table}"
    );

    let (code, json, stderr) = processor.list(&["--output", "json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("json");
    let tasks = doc["tasks"].as_array().expect("tasks");
    assert_eq!(tasks[0]["last_error"], locked, "{doc}");
    assert_eq!(tasks[0]["attempts"], 7, "{doc}");
    assert_eq!(tasks[1]["reason"], long_reason.as_str(), "{doc}");
}

/// A FAILED task says whether `dsrctl tasks retry` would take it (RETRY) and, below the
/// table, why not in the processor's words; JSON says both. Before, the operator learnt it
/// only by trying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tasks_say_whether_a_retry_is_taken_and_why_not() {
    let rod = "it is of a CONTRACT_END request, which is not retried";
    let cancelled = "the controller cancelled its request: it is not run again";
    let refused = |id: &str, why: &str| ManualTask {
        retry_refusal: why.into(),
        ..worked(id, TaskState::Failed, 1, "table gone", "")
    };
    let processor = Processor::start(vec![
        refused("r-return", rod),
        worked("r-erasure", TaskState::Failed, 1, "table gone", ""),
        refused("r-cancelled", cancelled),
        worked("r-running", TaskState::InProgress, 2, "", ""),
    ])
    .await;
    let (code, table, stderr) = processor
        .list(&["--state", "failed", "--state", "in-progress"])
        .await;
    assert_eq!(code, Some(0), "{stderr}");
    let header = table.lines().next().expect("a header");
    assert!(header.contains(" ATTEMPTS  RETRY "), "{table}");
    let retry = |id: &str| {
        row(&table, id)
            .split_whitespace()
            .nth(6)
            .map(str::to_string)
    };
    for (id, cell) in [
        ("r-return", "no"),
        ("r-erasure", "yes"),
        ("r-cancelled", "no"),
        ("r-running", "-"),
    ] {
        assert_eq!(retry(id).as_deref(), Some(cell), "{id} in {table}");
    }
    for (id, why) in [("r-return", rod), ("r-cancelled", cancelled)] {
        let line = format!("controller/{id}/archive: retry: no — {why}");
        assert!(table.lines().any(|l| l == line), "{line} in {table}");
    }
    assert_eq!(table.matches("retry: no").count(), 2, "{table}");

    let (code, json, stderr) = processor
        .list(&["--output", "json", "--state", "failed"])
        .await;
    assert_eq!(code, Some(0), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("json");
    let tasks = doc["tasks"].as_array().expect("tasks");
    let of = |id: &str| {
        (tasks.iter())
            .find(|t| t["request_id"] == id)
            .unwrap_or_else(|| panic!("{id} in {doc}"))
    };
    assert_eq!(of("r-return")["retryable"], false, "{doc}");
    assert_eq!(of("r-return")["retry_refusal"], rod, "{doc}");
    assert_eq!(of("r-erasure")["retryable"], true, "{doc}");
    assert_eq!(of("r-erasure")["retry_refusal"], "", "{doc}");
    assert_eq!(
        of("r-running")["retryable"],
        serde_json::Value::Null,
        "{doc}"
    );
}

/// A task whose holder call has not answered says since when, before its last error; JSON
/// has the time. Before, a long call showed nothing until the holder answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_call_not_answered_yet_is_shown() {
    let called = dsrelay_proto::prost_types::Timestamp {
        seconds: 1_796_558_400,
        nanos: 0,
    };
    let processor = Processor::start(vec![
        ManualTask {
            holder_called_at: Some(called),
            ..worked(
                "r-calling",
                TaskState::InProgress,
                3,
                "",
                "database is locked",
            )
        },
        worked("r-idle", TaskState::InProgress, 1, "", ""),
    ])
    .await;
    let (code, table, stderr) = processor.list(&["--state", "in-progress"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        row(&table, "r-calling").contains(
            "holder called 2026-12-06T12:00:00Z, no answer recorded yet (made again if a \
                 restart cut it off, once its claim's lease ends); last error: database"
        ),
        "{table}"
    );
    assert!(!row(&table, "r-idle").contains("holder called"), "{table}");
    let (code, json, stderr) = processor
        .list(&["--output", "json", "--state", "in-progress"])
        .await;
    assert_eq!(code, Some(0), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("json");
    let tasks = doc["tasks"].as_array().expect("tasks");
    assert_eq!(
        tasks[0]["holder_called_at"], "2026-12-06T12:00:00Z",
        "{doc}"
    );
    assert_eq!(
        tasks[1]["holder_called_at"],
        serde_json::Value::Null,
        "{doc}"
    );
}

/// An empty list names what was asked for: no task in a state is not "no tasks wait for an
/// operator".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_list_names_the_states_asked_for() {
    let processor = Processor::start(Vec::new()).await;
    for (args, expected) in [
        (&[][..], "no tasks wait for an operator\n"),
        (
            &["--state", "cancelled"][..],
            "no tasks in state cancelled\n",
        ),
        (
            &[
                "--state",
                "FAILED",
                "--state",
                "refused",
                "--state",
                "in_progress",
            ][..],
            "no tasks in states failed, refused or in-progress\n",
        ),
    ] {
        let (code, out, stderr) = processor.list(args).await;
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(out, expected, "{args:?}");
    }
}
