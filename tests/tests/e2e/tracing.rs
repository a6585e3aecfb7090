//! One trace follows a request across every hop: a partner's trace is continued at intake,
//! each delivery attempt is a child of it, the processor's acceptance a child of the
//! attempt, each task step and connector call below that, the external adapter below the
//! connector call, and the registry's handling of each acknowledgement below the task step
//! that sent it. The three services run as real processes exporting OTLP to a receiver here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsrelay_proto::v1::RequestState;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::net::TcpListener;

use crate::harness::{email, erasure, in_state, spawn_pair, wait_until, Holder, Mode, PairOptions};

/// A received span: service, name, ids.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Received {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_registry_processor_and_adapter() {
    // The OTLP receiver (plain gRPC, as collectors listen on 4317).
    let receiver = Receiver::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );

    let pair = spawn_pair(PairOptions {
        mode: Mode::Processes,
        holders: vec![Holder::Newsletter],
        otel_endpoint: Some(endpoint),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");

    // A partner that traces sends its own context; the registry continues it.
    let partner_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let partner_span = "00f067aa0ba902b7";
    let mut crm = pair.crm();
    let mut req = tonic::Request::new(erasure("maija.meikalainen@example.fi"));
    req.get_mut().identities = vec![email("maija.meikalainen@example.fi")];
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{partner_trace}-{partner_span}-01")
            .parse()
            .expect("header"),
    );
    let submitted = crm.submit(req).await.expect("submit").into_inner();
    assert_eq!(submitted.trace_id, partner_trace);
    wait_until(
        &mut crm,
        &submitted.request_id,
        Duration::from_secs(30),
        in_state(RequestState::Completed),
    )
    .await;

    // Wait until every hop's spans have arrived.
    let wanted = [
        ("registry", "intake"),
        ("registry", "deliver"),
        ("processor", "accept"),
        ("processor", "task"),
        ("processor", "connector"),
        ("adapter", "adapter.execute"),
        ("registry", "acknowledgement"),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans: Vec<Received> = receiver
            .spans
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| s.trace_id == partner_trace)
            .cloned()
            .collect();
        let have = |svc: &str, name: &str| spans.iter().any(|s| s.service == svc && s.name == name);
        if wanted.iter().all(|(svc, name)| have(svc, name)) {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing spans; got {spans:#?}\n--- registry log ---\n{}",
            pair.registry.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let ids = |svc: &str, name: &str| -> Vec<String> {
        spans
            .iter()
            .filter(|s| s.service == svc && s.name == name)
            .map(|s| s.span_id.clone())
            .collect()
    };
    let parents_within = |svc: &str, name: &str, parents: &[String]| {
        for s in spans.iter().filter(|s| s.service == svc && s.name == name) {
            assert!(
                parents.contains(&s.parent),
                "{svc}/{name} {s:?} has parent {} outside {parents:?}\n{spans:#?}",
                s.parent
            );
        }
    };
    let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    assert_eq!(by_id.len(), spans.len(), "span ids are unique");
    parents_within("registry", "intake", &[partner_span.to_string()]);
    parents_within("registry", "deliver", &ids("registry", "intake"));
    parents_within("processor", "accept", &ids("registry", "deliver"));
    parents_within("processor", "task", &ids("processor", "accept"));
    parents_within("processor", "connector", &ids("processor", "task"));
    parents_within("adapter", "adapter.execute", &ids("processor", "connector"));
    parents_within("registry", "acknowledgement", &ids("processor", "task"));

    drop(pair);
    let _ = stop_tx.send(());
    let _ = server.await;
}
