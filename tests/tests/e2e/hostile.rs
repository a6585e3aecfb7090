//! Hostile input as a table: one row per RPC of the registry and the processor (a test fails
//! when the protocol gains an RPC without a row), each row a caller allowed to make the call
//! and a valid body. Every case is derived from that body and the request's descriptor, so a
//! new field is spoiled without anyone writing a case for it: oversized messages, 10,000
//! repeated entries, empty and huge strings, control characters, unknown enum numbers,
//! extreme numbers, fields that do not belong (messages set that the valid body leaves out,
//! flags flipped), page sizes of 0 and 2,000,000,000, garbage page tokens, bodies that are
//! not protobuf, and many concurrent streams from one peer.
//!
//! Each answer must be a clear status (never INTERNAL, UNKNOWN or a dropped connection) with
//! a message, INVALID_ARGUMENT with the violated fields as details; texts with control
//! characters, huge texts, unknown enum numbers, garbage page tokens and undecodable bodies
//! must be refused. After
//! the table both services still pass their health checks and do their work. A flood of
//! oversized Submits keeps the registry's resident memory within twice its idle size.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use dsrelay_proto::prost::Message;
use dsrelay_proto::v1::processor_operator_service_client::ProcessorOperatorServiceClient;
use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    AcknowledgeRequest, AcknowledgeResponse, Acknowledgement, CancelDeliveryRequest, CancelRequest,
    ChooseContractEndRequest, CompleteManualTaskRequest, CompletePartRequest, ConfirmReturnRequest,
    ContractEnd, ContractEndChoice, DeliverRequest, DownloadPackageRequest, EndContractRequest,
    ExportFileHeader, ExtendDeadlineRequest, ExtendDueDateRequest, GetChainRequest,
    GetContractRequest, GetPackageRequest, GetRequest, GetStatusRequest, GetUploadStateRequest,
    ListAuditCheckpointsRequest, ListAuditEntriesRequest, ListCertificatesRequest,
    ListContractEndsRequest, ListContractsRequest, ListDeadLetteredDeliveriesRequest,
    ListDeadLettersRequest, ListEventsRequest, ListManualTasksRequest,
    ListProcessorAuditCheckpointsRequest, ListProcessorAuditEntriesRequest, ListRequestsRequest,
    ListSubprocessorsRequest, RefuseManualTaskRequest, RequestKind, RequeueDeadLetterRequest,
    RequeueDeliveryRequest, RetryTaskRequest, TaskRef, TaskState, UpdateContractEndRequest,
    UploadFileChunk, WatchRequest,
};
use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, Kind, ReflectMessage, Value};
use sha2::{Digest, Sha256};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_types::StatusExt;

use crate::bad_input::RawCodec;
use crate::harness::{
    email, erasure, spawn_pair, Backend, Mode, PairOptions, TestPair, CONTROLLER, PROCESSOR,
};

/// Services of the protocol that neither the registry nor the processor serves: adapters
/// serve SubprocessorAdapter, transfer recipients TransferReceiver.
const SERVED_ELSEWHERE: [&str; 2] = [
    "dsrelay.v1.SubprocessorAdapter",
    "dsrelay.v1.TransferReceiver",
];

/// Fields a service may accept spoiled, because it ignores what it cannot use, with why.
const IGNORED_WHEN_SPOILED: [(&str, &str, &str); 1] = [(
    "dsrelay.v1.AcknowledgementService/Acknowledge",
    "acknowledgements[0].traceparent",
    "a trace context that does not parse is ignored, as W3C Trace Context prescribes, and \
     never stored: refusing the acknowledgement would lose a task's progress over a header",
)];

/// Entries in a spoiled repeated field.
const REPEATED: usize = 10_000;
/// A huge text: longer than any text field allows, and within every decode limit, so that
/// the handler, not the framework, has to refuse it.
const HUGE: usize = 32 * 1024;
/// Concurrent calls from one peer over one connection: more than the 256 streams a
/// connection may have open (`runtime::server`), so some wait for others.
const CONCURRENT: usize = 300;
/// NUL (which PostgreSQL cannot store), an escape sequence and DEL.
const CONTROL: &str = "a\u{0}b\u{1b}[2Jc\u{7f}";

/// Which service a row calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Registry,
    Processor,
}

/// How a case spoils the valid body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Spoil {
    /// The valid body itself.
    Valid,
    /// One byte over the service's decode limit.
    Oversized,
    /// 10,000 entries in a repeated field.
    Repeated,
    Empty,
    Huge,
    Control,
    UnknownEnum,
    /// The largest and smallest values of a number.
    Extreme,
    /// A flag flipped.
    Flag,
    /// A message the valid body leaves out, set: parameters of another kind, terms of
    /// another call.
    Present,
    PageSizeZero,
    PageSizeHuge,
    PageToken,
    /// [`CONCURRENT`] calls at once over one connection.
    Concurrent,
    /// The valid body followed by bytes that are not protobuf.
    Undecodable,
}

impl Spoil {
    /// Whether this input must be refused whatever field it is in.
    fn must_be_refused(self) -> bool {
        matches!(
            self,
            Spoil::Oversized
                | Spoil::Huge
                | Spoil::Control
                | Spoil::UnknownEnum
                | Spoil::PageToken
                | Spoil::Undecodable
        )
    }
}

/// Reads the refusal an OK answer carries, if any.
type RefusalInAnswer = fn(&[u8]) -> Option<String>;

/// One RPC: who may call it, and a body it accepts (or answers with NOT_FOUND or
/// FAILED_PRECONDITION for the state of things, after validation).
struct Row {
    side: Side,
    /// `package.Service/Method`.
    method: &'static str,
    /// The dev-PKI party that calls.
    caller: &'static str,
    valid: Vec<u8>,
    /// The service's decode limit for this RPC.
    limit: usize,
    /// For RPCs that answer OK and refuse entries inside the answer (Acknowledge): the
    /// refusal an answer carries.
    refusal_in_answer: Option<RefusalInAnswer>,
}

fn row(side: Side, method: &'static str, caller: &'static str, valid: impl Message) -> Row {
    let limit = match (side, method) {
        (
            Side::Registry,
            "dsrelay.v1.AcknowledgementService/Acknowledge"
            | "dsrelay.v1.ExportUploadService/GetUploadState"
            | "dsrelay.v1.ExportUploadService/UploadFile"
            | "dsrelay.v1.ExportUploadService/CompletePart",
        ) => dsrelay_runtime::server::MAX_MESSAGE_BYTES,
        (Side::Registry, _) => dsrelay_registry::MAX_API_MESSAGE_BYTES,
        (Side::Processor, _) => dsrelay_processor::MAX_API_MESSAGE_BYTES,
    };
    Row {
        side,
        method,
        caller,
        valid: valid.encode_to_vec(),
        limit,
        refusal_in_answer: None,
    }
}

fn rejected_acknowledgements(answer: &[u8]) -> Option<String> {
    let answer = AcknowledgeResponse::decode(answer).ok()?;
    (!answer.rejected.is_empty()).then(|| format!("{:?}", answer.rejected))
}

fn timestamp(ms: i64) -> Option<dsrelay_proto::prost_types::Timestamp> {
    Some(dsrelay_proto::timestamp_from_millis(ms))
}

/// Every RPC of both services with a valid body. `open` is a request that never finishes,
/// `other` one the table may cancel.
fn rows(open: &str, other: &str) -> Vec<Row> {
    use Side::{Processor as P, Registry as R};
    let now = chrono::Utc::now().timestamp_millis();
    let data = b"{\"name\": \"Maija\"}".to_vec();
    let header = ExportFileHeader {
        request_id: open.into(),
        subprocessor: "accounting".into(),
        name: "customer.json".into(),
        media_type: "application/json".into(),
        categories: vec!["contact".into()],
        size: data.len() as u64,
        sha256: hex::encode(Sha256::digest(&data)),
    };
    let terms = ContractEnd {
        choice: ContractEndChoice::Delete as i32,
        effective_at: timestamp(now + 86_400_000),
        grace_ends_at: timestamp(now + 2 * 86_400_000),
        return_confirmed: false,
        transfer_recipient: String::new(),
    };
    let task = TaskRef {
        controller: CONTROLLER.into(),
        request_id: open.into(),
        subprocessor: "accounting".into(),
    };
    let mut submit = erasure("hostile.table@example.fi");
    submit.note = "from the hostile table".into();
    let mut ack = row(
        R,
        "dsrelay.v1.AcknowledgementService/Acknowledge",
        "processor",
        AcknowledgeRequest {
            acknowledgements: vec![Acknowledgement {
                request_id: open.into(),
                subprocessor: "accounting".into(),
                sequence: 1_000,
                state: TaskState::InProgress as i32,
                reason: "working on it".into(),
                occurred_at: timestamp(now),
                attempt: 1,
                ..Default::default()
            }],
        },
    );
    ack.refusal_in_answer = Some(rejected_acknowledgements);
    vec![
        row(R, "dsrelay.v1.RequestService/Submit", "partner-crm", submit),
        row(
            R,
            "dsrelay.v1.RequestService/Get",
            "partner-crm",
            GetRequest {
                request_id: open.into(),
            },
        ),
        row(
            R,
            "dsrelay.v1.RequestService/List",
            "partner-crm",
            ListRequestsRequest {
                page_size: 10,
                kind: RequestKind::Erasure as i32,
                ..Default::default()
            },
        ),
        row(
            R,
            "dsrelay.v1.RequestService/Watch",
            "partner-crm",
            WatchRequest {
                request_id: open.into(),
                ..Default::default()
            },
        ),
        row(
            R,
            "dsrelay.v1.RequestService/Cancel",
            "partner-crm",
            CancelRequest {
                request_id: other.into(),
                reason: "asked twice".into(),
            },
        ),
        row(
            R,
            "dsrelay.v1.RequestService/ExtendDeadline",
            "operator",
            ExtendDeadlineRequest {
                request_id: open.into(),
                months: 1,
                reason: "many holders".into(),
            },
        ),
        row(
            R,
            "dsrelay.v1.RequestService/GetChain",
            "operator",
            GetChainRequest {},
        ),
        row(
            R,
            "dsrelay.v1.RequestService/ListEvents",
            "operator",
            ListEventsRequest {
                request_id: open.into(),
                ..Default::default()
            },
        ),
        row(
            R,
            "dsrelay.v1.RequestService/ListAuditEntries",
            "operator",
            ListAuditEntriesRequest {
                after_seq: 0,
                page_size: 10,
            },
        ),
        row(
            R,
            "dsrelay.v1.RequestService/ListAuditCheckpoints",
            "operator",
            ListAuditCheckpointsRequest {
                after_seq: 0,
                page_size: 10,
            },
        ),
        row(
            R,
            "dsrelay.v1.RequestService/ListDeadLetteredDeliveries",
            "operator",
            ListDeadLetteredDeliveriesRequest {
                page_size: 10,
                page_token: String::new(),
            },
        ),
        row(
            R,
            "dsrelay.v1.RequestService/RequeueDelivery",
            "operator",
            RequeueDeliveryRequest {
                request_id: open.into(),
                processor: "web-agency".into(),
            },
        ),
        ack,
        row(
            R,
            "dsrelay.v1.ExportUploadService/GetUploadState",
            "processor",
            GetUploadStateRequest {
                header: Some(header.clone()),
            },
        ),
        row(
            R,
            "dsrelay.v1.ExportUploadService/UploadFile",
            "processor",
            UploadFileChunk {
                header: Some(header.clone()),
                offset: 0,
                chunk_crc32: dsrelay_runtime::export_files::chunk_crc32(&data),
                data: data.into(),
                ..Default::default()
            },
        ),
        row(
            R,
            "dsrelay.v1.ExportUploadService/CompletePart",
            "processor",
            CompletePartRequest {
                request_id: open.into(),
                subprocessor: "accounting".into(),
                files: vec![header],
            },
        ),
        row(
            R,
            "dsrelay.v1.CertificateService/ListCertificates",
            "partner-crm",
            ListCertificatesRequest {
                request_id: open.into(),
                ..Default::default()
            },
        ),
        row(
            R,
            "dsrelay.v1.ContractService/EndContract",
            "operator",
            EndContractRequest {
                processor: "web-agency".into(),
                choice: ContractEndChoice::Delete as i32,
                effective_at: timestamp(now + 30 * 86_400_000),
                effective_now: false,
                idempotency_key: "hostile-table-contract".into(),
                transfer_recipient: String::new(),
            },
        ),
        row(
            R,
            "dsrelay.v1.ContractService/GetContract",
            "operator",
            GetContractRequest {
                contract_id: open.into(),
            },
        ),
        row(
            R,
            "dsrelay.v1.ContractService/ListContracts",
            "operator",
            ListContractsRequest {
                processor: PROCESSOR.into(),
            },
        ),
        row(
            R,
            "dsrelay.v1.ContractService/ChooseContractEnd",
            "operator",
            ChooseContractEndRequest {
                contract_id: open.into(),
                choice: ContractEndChoice::Delete as i32,
                transfer_recipient: String::new(),
            },
        ),
        row(
            R,
            "dsrelay.v1.ContractService/ConfirmReturn",
            "operator",
            ConfirmReturnRequest {
                contract_id: open.into(),
                manifest_sha256: "0".repeat(64),
            },
        ),
        row(
            R,
            "dsrelay.v1.PackageService/GetPackage",
            "partner-crm",
            GetPackageRequest {
                request_id: open.into(),
            },
        ),
        row(
            R,
            "dsrelay.v1.PackageService/DownloadPackage",
            "partner-crm",
            DownloadPackageRequest {
                request_id: open.into(),
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorService/Deliver",
            "registry",
            DeliverRequest {
                request_id: "hostile-delivery".into(),
                kind: RequestKind::Erasure as i32,
                identities: vec![email("hostile.delivery@example.fi")],
                received_at: timestamp(now),
                due_at: timestamp(now + 30 * 86_400_000),
                ..Default::default()
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorService/Cancel",
            "registry",
            CancelDeliveryRequest {
                request_id: other.into(),
                reason: "asked twice".into(),
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorService/GetStatus",
            "registry",
            GetStatusRequest {
                request_id: open.into(),
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorService/ListSubprocessors",
            "registry",
            ListSubprocessorsRequest {},
        ),
        row(
            P,
            "dsrelay.v1.ProcessorService/UpdateContractEnd",
            "registry",
            UpdateContractEndRequest {
                request_id: open.into(),
                contract_end: Some(terms),
                recipient: None,
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorService/ExtendDueDate",
            "registry",
            ExtendDueDateRequest {
                request_id: open.into(),
                due_at: timestamp(now + 60 * 86_400_000),
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorOperatorService/ListManualTasks",
            "operator",
            ListManualTasksRequest {
                subprocessor: "accounting".into(),
                limit: 10,
                states: vec![TaskState::WaitingForOperator as i32],
                page_token: String::new(),
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorOperatorService/CompleteManualTask",
            "operator",
            CompleteManualTaskRequest {
                task: Some(task.clone()),
                not_found: false,
                records_affected: 3,
                evidence_note: "shredded the folder".into(),
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorOperatorService/RefuseManualTask",
            "operator",
            RefuseManualTaskRequest {
                task: Some(task.clone()),
                reason: "not ours".into(),
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorOperatorService/RetryTask",
            "operator",
            RetryTaskRequest {
                task: Some(task),
                note: "database restored".into(),
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorOperatorService/ListDeadLetters",
            "operator",
            ListDeadLettersRequest {
                limit: 10,
                after_id: 0,
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorOperatorService/RequeueDeadLetter",
            "operator",
            RequeueDeadLetterRequest { id: 1 },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorOperatorService/ListContractEnds",
            "operator",
            ListContractEndsRequest {
                controller: CONTROLLER.into(),
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorOperatorService/ListAuditEntries",
            "operator",
            ListProcessorAuditEntriesRequest {
                after_seq: 0,
                page_size: 10,
            },
        ),
        row(
            P,
            "dsrelay.v1.ProcessorOperatorService/ListAuditCheckpoints",
            "operator",
            ListProcessorAuditCheckpointsRequest {
                after_seq: 0,
                page_size: 10,
            },
        ),
    ]
}

/// A case of the table: what was spoiled, how, and the body.
struct Case {
    path: String,
    spoil: Spoil,
    body: Vec<u8>,
}

/// `msg` with `field` set to `value`.
fn with(msg: &DynamicMessage, field: &FieldDescriptor, value: Value) -> DynamicMessage {
    let mut m = msg.clone();
    m.set_field(field, value);
    m
}

/// A plausible entry for a repeated field of `kind`.
fn entry(kind: &Kind) -> Value {
    match kind {
        Kind::String => Value::String("x".into()),
        Kind::Enum(_) => Value::EnumNumber(1),
        Kind::Message(m) => Value::Message(DynamicMessage::new(m.clone())),
        Kind::Bytes => Value::Bytes(b"x".to_vec().into()),
        Kind::Bool => Value::Bool(true),
        other => Value::default_value(other),
    }
}

/// The text spoils of a string field.
fn texts(name: &str) -> Vec<(Spoil, String)> {
    let mut out = vec![
        (Spoil::Empty, String::new()),
        (Spoil::Huge, "€".repeat(HUGE / 3)),
        (Spoil::Control, CONTROL.into()),
    ];
    if name.ends_with("page_token") {
        out.push((Spoil::PageToken, "not-a-token".into()));
        out.push((Spoil::PageToken, "AAAAAAAAAAAAAAAAAAAAAA==".into()));
        out.push((Spoil::PageToken, "%%%".repeat(100)));
        // The form of a token, with an id no request has and SQL text cannot hold.
        out.push((Spoil::PageToken, format!("1_{CONTROL}")));
    }
    out
}

/// The extreme values of a number field; page sizes get 0 and two billion instead.
fn numbers(name: &str, kind: &Kind) -> Vec<(Spoil, Value)> {
    if matches!(name, "page_size" | "limit") {
        let v = |n: u32| match kind {
            Kind::Uint32 | Kind::Fixed32 => Value::U32(n),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(n as i32),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(n.into()),
            _ => Value::I64(n.into()),
        };
        return vec![
            (Spoil::PageSizeZero, v(0)),
            (Spoil::PageSizeHuge, v(2_000_000_000)),
        ];
    }
    let values = match kind {
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            vec![Value::I32(i32::MIN), Value::I32(-1), Value::I32(i32::MAX)]
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            vec![Value::I64(i64::MIN), Value::I64(-1), Value::I64(i64::MAX)]
        }
        Kind::Uint32 | Kind::Fixed32 => vec![Value::U32(u32::MAX)],
        Kind::Uint64 | Kind::Fixed64 => vec![Value::U64(u64::MAX)],
        _ => vec![],
    };
    values.into_iter().map(|v| (Spoil::Extreme, v)).collect()
}

/// Every spoiled variant of `msg`, one field at a time, descending into message fields.
fn spoiled(msg: &DynamicMessage, depth: usize) -> Vec<(String, Spoil, DynamicMessage)> {
    let mut out = Vec::new();
    for field in msg.descriptor().fields() {
        let name = field.name().to_string();
        let kind = field.kind();
        if field.is_map() {
            continue;
        }
        if field.is_list() {
            let current = match msg.get_field(&field).as_ref() {
                Value::List(l) => l.clone(),
                _ => Vec::new(),
            };
            let first = current.first().cloned().unwrap_or_else(|| entry(&kind));
            out.push((
                name.clone(),
                Spoil::Repeated,
                with(msg, &field, Value::List(vec![first.clone(); REPEATED])),
            ));
            let at = format!("{name}[0]");
            let replace_first = |value: Value| {
                let mut list = current.clone();
                match list.first_mut() {
                    Some(v) => *v = value,
                    None => list.push(value),
                }
                with(msg, &field, Value::List(list))
            };
            match &kind {
                Kind::String => {
                    for (spoil, text) in texts(&name) {
                        out.push((at.clone(), spoil, replace_first(Value::String(text))));
                    }
                }
                Kind::Enum(_) => {
                    out.push((
                        at.clone(),
                        Spoil::UnknownEnum,
                        replace_first(Value::EnumNumber(999)),
                    ));
                }
                Kind::Message(_) if depth < 4 => {
                    if let Value::Message(first) = &first {
                        for (path, spoil, sub) in spoiled(first, depth + 1) {
                            out.push((
                                format!("{at}.{path}"),
                                spoil,
                                replace_first(Value::Message(sub)),
                            ));
                        }
                    }
                }
                _ => {}
            }
            continue;
        }
        match &kind {
            Kind::String => {
                for (spoil, text) in texts(&name) {
                    out.push((name.clone(), spoil, with(msg, &field, Value::String(text))));
                }
            }
            Kind::Enum(_) => out.push((
                name.clone(),
                Spoil::UnknownEnum,
                with(msg, &field, Value::EnumNumber(999)),
            )),
            Kind::Bool => {
                let flipped = !msg.get_field(&field).as_bool().unwrap_or(false);
                out.push((
                    name.clone(),
                    Spoil::Flag,
                    with(msg, &field, Value::Bool(flipped)),
                ));
            }
            Kind::Message(m) if depth < 4 => {
                let sub = if msg.has_field(&field) {
                    msg.get_field(&field)
                        .as_message()
                        .cloned()
                        .unwrap_or_else(|| DynamicMessage::new(m.clone()))
                } else {
                    let empty = DynamicMessage::new(m.clone());
                    out.push((
                        name.clone(),
                        Spoil::Present,
                        with(msg, &field, Value::Message(empty.clone())),
                    ));
                    empty
                };
                for (path, spoil, s) in spoiled(&sub, depth + 1) {
                    out.push((
                        format!("{name}.{path}"),
                        spoil,
                        with(msg, &field, Value::Message(s)),
                    ));
                }
            }
            Kind::Bytes | Kind::Message(_) | Kind::Float | Kind::Double => {}
            number => {
                for (spoil, v) in numbers(&name, number) {
                    out.push((name.clone(), spoil, with(msg, &field, v)));
                }
            }
        }
    }
    out
}

/// The table's cases for `row`: the valid body, an oversized one, and every spoiled variant.
fn cases(pool: &DescriptorPool, row: &Row) -> Vec<Case> {
    let (service, method) = row.method.split_once('/').expect("service/method");
    let input = pool
        .get_service_by_name(service)
        .and_then(|s| s.methods().find(|m| m.name() == method))
        .unwrap_or_else(|| panic!("{} is not in the protocol", row.method))
        .input();
    let valid = DynamicMessage::decode(input, row.valid.as_slice()).expect("the valid body");
    let mut out = vec![Case {
        path: String::new(),
        spoil: Spoil::Valid,
        body: row.valid.clone(),
    }];
    // The valid body with an unknown field (number 1000, length-delimited) that takes it
    // over the limit.
    let mut oversized = row.valid.clone();
    let filler = row.limit - oversized.len();
    oversized.extend_from_slice(&[0xc2, 0x3e]);
    dsrelay_proto::prost::encoding::encode_varint(filler as u64, &mut oversized);
    oversized.resize(oversized.len() + filler, b'x');
    out.push(Case {
        path: "(unknown field 1000)".into(),
        spoil: Spoil::Oversized,
        body: oversized,
    });
    // A tag of wire type 7, which protobuf does not have, and a varint cut short.
    for tail in [&[0x0f_u8][..], &[0x08]] {
        let mut body = row.valid.clone();
        body.extend_from_slice(tail);
        out.push(Case {
            path: format!("(trailing {tail:02x?})"),
            spoil: Spoil::Undecodable,
            body,
        });
    }
    for (path, spoil, m) in spoiled(&valid, 0) {
        out.push(Case {
            path,
            spoil,
            body: m.encode_to_vec(),
        });
    }
    out
}

/// How a call ended: OK with its first answer (a streaming call that sends nothing for a
/// while counts as OK), or a status.
async fn call(
    channel: &Channel,
    method: &str,
    streaming: (bool, bool),
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let path = PathAndQuery::try_from(format!("/{method}")).expect("a path");
    match streaming {
        (false, false) => grpc
            .unary(tonic::Request::new(body), path, RawCodec)
            .await
            .map(tonic::Response::into_inner),
        (true, false) => grpc
            .client_streaming(
                tonic::Request::new(tokio_stream::once(body)),
                path,
                RawCodec,
            )
            .await
            .map(tonic::Response::into_inner),
        (client, true) => {
            let request = if client {
                grpc.streaming(
                    tonic::Request::new(tokio_stream::once(body)),
                    path,
                    RawCodec,
                )
                .await
            } else {
                grpc.server_streaming(tonic::Request::new(body), path, RawCodec)
                    .await
            };
            let mut stream = request?.into_inner();
            match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                Ok(first) => first.map(Option::unwrap_or_default),
                Err(_) => Ok(Vec::new()),
            }
        }
    }
}

/// What is wrong with the answer `got` to a case, if anything.
fn judge(row: &Row, spoil: Spoil, got: &Result<Vec<u8>, Status>) -> Option<String> {
    let refusal = match got {
        Ok(answer) => match row.refusal_in_answer.and_then(|f| f(answer)) {
            Some(r) => Some(r),
            None if spoil.must_be_refused() => return Some("accepted".into()),
            None => None,
        },
        Err(s) => {
            let clear = matches!(
                s.code(),
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::AlreadyExists
                    | Code::FailedPrecondition
                    | Code::OutOfRange
                    | Code::ResourceExhausted
                    | Code::PermissionDenied
                    | Code::Aborted
            );
            if !clear {
                return Some(format!("unclear status {:?}: {}", s.code(), s.message()));
            }
            if s.message().trim().is_empty() {
                return Some(format!("{:?} without a message", s.code()));
            }
            if s.code() == Code::InvalidArgument
                && s.get_details_bad_request()
                    .is_none_or(|b| b.field_violations.is_empty())
            {
                return Some(format!(
                    "INVALID_ARGUMENT without field violations: {}",
                    s.message()
                ));
            }
            if spoil == Spoil::Oversized
                && !(matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted)
                    && s.message().contains(&row.limit.to_string()))
            {
                return Some(format!(
                    "oversized, answered {:?} without the limit: {}",
                    s.code(),
                    s.message()
                ));
            }
            if spoil == Spoil::Valid && s.code() == Code::PermissionDenied {
                return Some(format!("the row's caller may not call: {}", s.message()));
            }
            Some(s.message().to_string())
        }
    };
    (spoil == Spoil::PageToken && !matches!(got, Err(s) if s.code() == Code::InvalidArgument))
        .then(|| format!("a garbage page token answered {refusal:?}"))
}

async fn health(channel: Channel) -> i32 {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or_else(|s| panic!("health check: {s:?}"))
}

/// Fails when the protocol has an RPC of the registry or the processor without a row, or a
/// row names an RPC the protocol does not have.
fn check_every_rpc_has_a_row(pool: &DescriptorPool, rows: &[Row]) {
    let listed: BTreeSet<&str> = rows.iter().map(|r| r.method).collect();
    assert_eq!(listed.len(), rows.len(), "an RPC has two rows");
    let mut protocol = BTreeSet::new();
    for service in pool.services() {
        if service.package_name() != "dsrelay.v1" || SERVED_ELSEWHERE.contains(&service.full_name())
        {
            continue;
        }
        for m in service.methods() {
            protocol.insert(format!("{}/{}", service.full_name(), m.name()));
        }
    }
    let listed: BTreeSet<String> = listed.into_iter().map(String::from).collect();
    let missing: Vec<_> = protocol.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&protocol).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "RPCs without a row: {missing:?}; rows of no RPC: {unknown:?}"
    );
}

/// The rows of `side` on `backend` (one side at a time, so that the halves run in parallel).
async fn table(backend: Backend, side: Side) {
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        // A request that never finishes, to be read, extended and cancelled at leisure.
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let mut crm = pair.crm();
    let mut open_ids = Vec::new();
    for mail in ["hostile.open@example.fi", "hostile.other@example.fi"] {
        open_ids.push(
            crm.submit(erasure(mail))
                .await
                .expect("submit")
                .into_inner()
                .request_id,
        );
    }
    let pool = DescriptorPool::decode(dsrelay_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let rows = rows(&open_ids[0], &open_ids[1]);
    check_every_rpc_has_a_row(&pool, &rows);

    let mut problems = Vec::new();
    let mut counts: BTreeMap<Spoil, usize> = BTreeMap::new();
    let began = Instant::now();
    for row in rows.iter().filter(|r| r.side == side) {
        let channel = channel(&pair, row);
        let (service, method) = row.method.split_once('/').expect("service/method");
        let m = pool
            .get_service_by_name(service)
            .and_then(|s| s.methods().find(|m| m.name() == method))
            .expect("a method");
        let streaming = (m.is_client_streaming(), m.is_server_streaming());
        for case in cases(&pool, row) {
            *counts.entry(case.spoil).or_default() += 1;
            let got = call(&channel, row.method, streaming, case.body).await;
            let ignored = IGNORED_WHEN_SPOILED
                .iter()
                .any(|(m, path, _)| *m == row.method && *path == case.path);
            if got.is_ok() && ignored {
                continue;
            }
            if let Some(problem) = judge(row, case.spoil, &got) {
                problems.push(format!(
                    "{} {} {:?}: {problem}",
                    row.method, case.path, case.spoil
                ));
            }
        }
        // Many concurrent calls from one peer over one connection.
        let calls =
            (0..CONCURRENT).map(|_| call(&channel, row.method, streaming, row.valid.clone()));
        let answers = futures::future::join_all(calls).await;
        *counts.entry(Spoil::Concurrent).or_default() += 1;
        let mut unclear: BTreeMap<String, usize> = BTreeMap::new();
        for got in &answers {
            if let Some(problem) = judge(row, Spoil::Concurrent, got) {
                *unclear.entry(problem).or_default() += 1;
            }
        }
        for (problem, n) in unclear {
            problems.push(format!(
                "{} {CONCURRENT} at once: {n} × {problem}",
                row.method
            ));
        }
    }
    eprintln!(
        "hostile table ({side:?} on {backend:?}): {} RPCs, cases {counts:?}, {:?}, {} problems",
        rows.iter().filter(|r| r.side == side).count(),
        began.elapsed(),
        problems.len()
    );

    // Both services still serve and work.
    for side in [Side::Registry, Side::Processor] {
        let ch = match side {
            Side::Registry => pair.channel_to_registry("operator"),
            Side::Processor => pair.channel_to_processor("operator"),
        };
        assert_eq!(health(ch).await, ServingStatus::Serving as i32, "{side:?}");
    }
    // Any certified peer may check health: a check longer than a service name is refused
    // by its length.
    let mut long_check = HealthCheckRequest {
        service: "x".repeat(dsrelay_runtime::host::MAX_HEALTH_CHECK_BYTES),
    }
    .encode_to_vec();
    long_check.push(0);
    let refused = call(
        &pair.channel_to_registry("partner-crm"),
        "grpc.health.v1.Health/Check",
        (false, false),
        long_check,
    )
    .await
    .expect_err("a health check of more than 1 KiB");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    RequestServiceClient::new(pair.channel_to_registry("partner-crm"))
        .submit(erasure("after.the.table@example.fi"))
        .await
        .expect("a valid submit after the table");
    ProcessorServiceClient::new(pair.channel_to_processor("registry"))
        .list_subprocessors(ListSubprocessorsRequest {})
        .await
        .expect("the processor answers after the table");
    ProcessorOperatorServiceClient::new(pair.channel_to_processor("operator"))
        .list_manual_tasks(ListManualTasksRequest::default())
        .await
        .expect("the processor's operator API answers after the table");
    pair.stop().await;
    assert!(
        problems.is_empty(),
        "{} cases were not answered clearly:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

fn channel(pair: &TestPair, row: &Row) -> Channel {
    match row.side {
        Side::Registry => pair.channel_to_registry(row.caller),
        Side::Processor => pair.channel_to_processor(row.caller),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_to_every_registry_rpc_gets_a_clear_answer_on_sqlite() {
    table(Backend::Sqlite, Side::Registry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_to_every_registry_rpc_gets_a_clear_answer_on_postgres() {
    table(Backend::Postgres, Side::Registry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_to_every_processor_rpc_gets_a_clear_answer_on_sqlite() {
    table(Backend::Sqlite, Side::Processor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_to_every_processor_rpc_gets_a_clear_answer_on_postgres() {
    table(Backend::Postgres, Side::Processor).await;
}

/// VmRSS of process `pid`, in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_oversized_submits_leaves_the_registry_memory_where_it_was() {
    /// What the registry may grow by on top of twice its idle size: its allocator's arenas
    /// for 16 connections' TLS and HTTP/2 buffers.
    const SLACK_KIB: u64 = 8 * 1024;
    const CALLERS: usize = 16;
    const FLOOD: Duration = Duration::from_secs(5);

    let pair = spawn_pair(PairOptions {
        mode: Mode::Processes,
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    .expect("a pair of processes");
    let pid = pair.registry.pid().expect("the registry's pid");
    // Idle after some work, so that what any call allocates once is counted as idle.
    let mut crm = pair.crm();
    for i in 0..20 {
        crm.submit(erasure(&format!("before.flood.{i}@example.fi")))
            .await
            .expect("submit");
    }
    let idle = resident_kib(pid);

    let mut oversized = erasure("flood@example.fi");
    oversized.note = "x".repeat(3_900_000);
    let end = Instant::now() + FLOOD;
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        // A connection each.
        let mut client = RequestServiceClient::new(pair.channel_to_registry("partner-crm"));
        let body = oversized.clone();
        callers.push(tokio::spawn(async move {
            let mut refused = 0;
            while Instant::now() < end {
                let s = client
                    .submit(body.clone())
                    .await
                    .expect_err("an oversized submit");
                assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
                assert!(
                    s.message()
                        .contains(&dsrelay_registry::MAX_API_MESSAGE_BYTES.to_string()),
                    "the answer names the limit: {}",
                    s.message()
                );
                refused += 1;
            }
            refused
        }));
    }
    let mut peak = idle;
    while Instant::now() < end {
        peak = peak.max(resident_kib(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut refused = 0;
    for c in callers {
        refused += c.await.expect("a caller");
    }
    peak = peak.max(resident_kib(pid));
    eprintln!(
        "flood: {refused} oversized submits refused; registry resident {idle} KiB idle, \
         {peak} KiB at most"
    );
    assert!(refused >= CALLERS, "{refused} submits");
    assert!(
        peak <= 2 * idle + SLACK_KIB,
        "the registry grew from {idle} KiB to {peak} KiB"
    );
    // And it still works.
    crm.submit(erasure("after.flood@example.fi"))
        .await
        .expect("a valid submit after the flood");
    pair.stop().await;
}
