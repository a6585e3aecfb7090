//! Mutual TLS and roles: who may talk to the registry and the processor, and what each caller
//! may see and do once in.

use std::path::Path;
use std::time::Duration;

use dsrelay_proto::v1::acknowledgement_service_client::AcknowledgementServiceClient;
use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{
    AcknowledgeRequest, Acknowledgement, CancelRequest, DeliverRequest, ExtendDeadlineRequest,
    GetRequest, GetStatusRequest, ListRequestsRequest, RequestKind, Scope, TaskState, WatchRequest,
};
use dsrelay_runtime::pki::{dev_identity, DevCa};
use dsrelay_runtime::tls::TlsFiles;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use crate::harness::{email, erasure, spawn_pair, PairOptions, TestPair, PROCESSOR};

/// How long a refused connection may take to surface as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A channel to `port` on localhost using tonic's own rustls client: it trusts `ca_pem` and
/// presents `identity` when given, no client certificate at all otherwise (the equivalent of
/// rustls' `with_no_client_auth()`; the tests crate has no direct rustls dependency).
fn tonic_tls_channel(port: u16, ca_pem: &[u8], identity: Option<Identity>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)
        .expect("tls config")
        .connect_lazy()
}

/// The party `stem`'s certificate and key as a tonic identity.
fn identity_of_party(pair: &TestPair, stem: &str) -> Identity {
    let pki = &pair.pki();
    Identity::from_pem(
        std::fs::read(pki.cert(stem)).expect("cert"),
        std::fs::read(pki.key(stem)).expect("key"),
    )
}

/// TLS files presenting a leaf for `identity` issued by a freshly generated, untrusted CA, while
/// trusting the real CA for the server. Written under `dir`.
fn foreign_party(dir: &Path, real_ca: &Path, identity: &str) -> TlsFiles {
    let rogue = DevCa::generate("dsrelay development CA").expect("rogue ca");
    let leaf = rogue
        .issue("dsrelay rogue party", identity)
        .expect("rogue leaf");
    std::fs::create_dir_all(dir).expect("rogue dir");
    let cert = dir.join("rogue.pem");
    let key = dir.join("rogue.key");
    std::fs::write(&cert, leaf.cert_pem).expect("write cert");
    std::fs::write(&key, leaf.key_pem).expect("write key");
    TlsFiles::new(real_ca, cert, key)
}

/// Asserts that a call was refused at the transport level: not answered, and in particular not
/// answered with an application-level PERMISSION_DENIED (which would mean the handshake
/// succeeded and only the role check stopped the caller).
fn assert_refused_by_transport<T: std::fmt::Debug>(what: &str, result: Result<T, Status>) {
    let status = match result {
        Ok(v) => panic!("{what}: the call succeeded but must be refused: {v:?}"),
        Err(s) => s,
    };
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        "{what}: expected a transport failure, got {:?}: {status:?}",
        status.code()
    );
    assert_ne!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
}

fn assert_code<T: std::fmt::Debug>(what: &str, result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, the call succeeded: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {s:?}");
            s
        }
    }
}

/// Submits as crm under a fresh key with `scope`, returning the request id.
async fn submit_as_crm(pair: &TestPair, mail: &str, scope: Option<Vec<&str>>) -> String {
    let mut crm = pair.client("partner-crm");
    let mut req = erasure(mail);
    req.scope = scope.map(|c| Scope {
        data_categories: c.into_iter().map(String::from).collect(),
    });
    crm.submit(req)
        .await
        .expect("submit as crm")
        .into_inner()
        .request_id
}

fn ack(request_id: &str) -> AcknowledgeRequest {
    AcknowledgeRequest {
        acknowledgements: vec![Acknowledgement {
            request_id: request_id.into(),
            subprocessor: "accounting".into(),
            sequence: 1,
            state: TaskState::InProgress as i32,
            ..Default::default()
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_refuses_a_client_without_a_certificate() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let port = pair.registry.addr().port();
    let ca = std::fs::read(pair.pki().ca()).expect("ca");

    // Control: the same client set-up with crm's certificate gets through, so the refusal
    // below is about the missing certificate and nothing else.
    let mut with_cert = RequestServiceClient::new(tonic_tls_channel(
        port,
        &ca,
        Some(identity_of_party(&pair, "partner-crm")),
    ));
    with_cert
        .submit(erasure("control@example.fi"))
        .await
        .expect("the control client with a certificate is served");

    let mut anonymous = RequestServiceClient::new(tonic_tls_channel(port, &ca, None));
    let result = tokio::time::timeout(CALL_TIMEOUT, anonymous.submit(erasure("anon@example.fi")))
        .await
        .expect("the refusal is prompt");
    assert_refused_by_transport("Submit without a client certificate", result);
    let result = tokio::time::timeout(CALL_TIMEOUT, anonymous.list(ListRequestsRequest::default()))
        .await
        .expect("the refusal is prompt");
    assert_refused_by_transport("List without a client certificate", result);

    // Nor can an anonymous client acknowledge.
    let mut acks = AcknowledgementServiceClient::new(tonic_tls_channel(port, &ca, None));
    let result = tokio::time::timeout(CALL_TIMEOUT, acks.acknowledge(ack("whatever")))
        .await
        .expect("the refusal is prompt");
    assert_refused_by_transport("Acknowledge without a client certificate", result);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_and_processor_refuse_a_certificate_from_another_ca() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let setup = &pair;
    let rogue_dir = setup.dir().join("rogue");

    // A configured partner identity, but signed by a CA the registry does not trust.
    let files = foreign_party(
        &rogue_dir.join("crm"),
        &setup.pki().ca(),
        &dev_identity("partner", "crm"),
    );
    let tls = files.client_config().expect("rogue client tls");
    let channel = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{}", setup.registry.addr().port()),
        Some(dev_identity("registry", "controller")),
        &tls,
    )
    .expect("channel");
    let mut rogue = RequestServiceClient::new(channel);
    let result = tokio::time::timeout(CALL_TIMEOUT, rogue.submit(erasure("rogue@example.fi")))
        .await
        .expect("the refusal is prompt");
    assert_refused_by_transport("Submit with a foreign-CA crm certificate", result);

    // The same through tonic's TLS client.
    let leaf = std::fs::read(&files.cert).expect("cert");
    let key = std::fs::read(&files.key).expect("key");
    let ca = std::fs::read(setup.pki().ca()).expect("ca");
    let mut rogue = RequestServiceClient::new(tonic_tls_channel(
        setup.registry.addr().port(),
        &ca,
        Some(Identity::from_pem(leaf, key)),
    ));
    let result = tokio::time::timeout(CALL_TIMEOUT, rogue.list(ListRequestsRequest::default()))
        .await
        .expect("the refusal is prompt");
    assert_refused_by_transport(
        "List with a foreign-CA crm certificate (tonic client)",
        result,
    );

    // A forged registry identity cannot deliver to the processor either.
    let files = foreign_party(
        &rogue_dir.join("registry"),
        &setup.pki().ca(),
        &dev_identity("registry", "controller"),
    );
    let tls = files.client_config().expect("rogue client tls");
    let channel = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{}", setup.processor.addr().port()),
        None,
        &tls,
    )
    .expect("channel");
    let mut rogue = ProcessorServiceClient::new(channel);
    let result = tokio::time::timeout(
        CALL_TIMEOUT,
        rogue.get_status(GetStatusRequest {
            request_id: "00000000-0000-0000-0000-000000000000".into(),
        }),
    )
    .await
    .expect("the refusal is prompt");
    assert_refused_by_transport(
        "GetStatus at the processor with a foreign-CA registry certificate",
        result,
    );
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_leaf_with_exactly_one_uri_san_is_an_identity() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let port = pair.registry.addr().port();
    let pki = pair.pki();
    let ca_pem = std::fs::read_to_string(pki.ca()).expect("ca");
    let real_ca = DevCa::load(
        &ca_pem,
        &std::fs::read_to_string(pki.dir.join("ca.key")).expect("ca key"),
    )
    .expect("the real CA");
    let crm = dev_identity("partner", "crm");
    let ops = dev_identity("operator", "ops");
    // Signed by the CA the registry trusts, and naming a configured partner, yet no
    // identity: a DNS name only (the old fallback), or two URI SANs (which one?).
    for (what, uris, dns) in [
        ("a DNS SAN only", vec![], vec!["crm.example.fi".to_string()]),
        ("two URI SANs", vec![crm.as_str(), ops.as_str()], vec![]),
    ] {
        let leaf = real_ca
            .issue_with_uris("dsrelay odd party", &uris, &dns)
            .expect("leaf");
        let mut client = RequestServiceClient::new(tonic_tls_channel(
            port,
            ca_pem.as_bytes(),
            Some(Identity::from_pem(leaf.cert_pem, leaf.key_pem)),
        ));
        let s = assert_code(
            what,
            client.list(ListRequestsRequest::default()).await,
            Code::PermissionDenied,
        );
        assert!(s.message().contains("URI SAN"), "{what}: {s:?}");
    }
    // The CA's own certificate presented as a party's.
    let mut client = RequestServiceClient::new(tonic_tls_channel(
        port,
        ca_pem.as_bytes(),
        Some(Identity::from_pem(real_ca.cert_pem(), real_ca.key_pem())),
    ));
    let result = tokio::time::timeout(CALL_TIMEOUT, client.list(ListRequestsRequest::default()))
        .await
        .expect("the refusal is prompt");
    match result {
        Ok(v) => panic!("the CA certificate was accepted as a party's: {v:?}"),
        Err(s) => assert_ne!(s.code(), Code::Ok, "{s:?}"),
    }
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_denies_a_valid_certificate_with_an_unknown_identity() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let adapter_identity = dev_identity("adapter", "example");
    assert_eq!(adapter_identity, "spiffe://dsrelay.dev/adapter/example");

    let mut adapter = pair.client("adapter");
    let s = assert_code(
        "Submit as the adapter",
        adapter.submit(erasure("adapter@example.fi")).await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains(&adapter_identity), "{s:?}");
    let s = assert_code(
        "List as the adapter",
        adapter.list(ListRequestsRequest::default()).await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains(&adapter_identity), "{s:?}");

    let mut acks = AcknowledgementServiceClient::new(pair.channel_to_registry("adapter"));
    let s = assert_code(
        "Acknowledge as the adapter",
        acks.acknowledge(ack("whatever")).await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains(&adapter_identity), "{s:?}");

    // The processor does not know it either.
    let mut at_processor = ProcessorServiceClient::new(pair.channel_to_processor("adapter"));
    let s = assert_code(
        "GetStatus at the processor as the adapter",
        at_processor
            .get_status(GetStatusRequest {
                request_id: "x".into(),
            })
            .await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains(&adapter_identity), "{s:?}");
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_limit_what_each_caller_may_do_and_see() {
    // The absent processor lets a request be routed somewhere payroll-bureau is not.
    let pair = spawn_pair(PairOptions {
        with_absent_processor: true,
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let setup = &pair;
    let id = submit_as_crm(&pair, "roles@example.fi", Some(vec!["marketing"])).await;

    // The processor may only acknowledge.
    let mut as_processor = setup.client("processor");
    let s = assert_code(
        "Submit as the processor",
        as_processor.submit(erasure("p@example.fi")).await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains(PROCESSOR), "{s:?}");
    assert_code(
        "Get as the processor",
        as_processor
            .get(GetRequest {
                request_id: id.clone(),
            })
            .await,
        Code::PermissionDenied,
    );
    assert_code(
        "List as the processor",
        as_processor.list(ListRequestsRequest::default()).await,
        Code::PermissionDenied,
    );

    // Partners and operators may not acknowledge.
    for stem in ["partner-crm", "operator"] {
        let mut acks = AcknowledgementServiceClient::new(setup.channel_to_registry(stem));
        let s = assert_code(
            &format!("Acknowledge as {stem}"),
            acks.acknowledge(ack(&id)).await,
            Code::PermissionDenied,
        );
        assert!(s.message().contains("not a processor"), "{s:?}");
    }

    // Only operators extend due dates.
    let mut crm = setup.client("partner-crm");
    let s = assert_code(
        "ExtendDeadline as crm",
        crm.extend_deadline(ExtendDeadlineRequest {
            request_id: id.clone(),
            months: 1,
            reason: "complex request".into(),
        })
        .await,
        Code::PermissionDenied,
    );
    assert!(s.message().contains("operator"), "{s:?}");

    // webform cannot see or touch crm's request, and cannot tell it exists.
    let mut webform = setup.client("partner-webform");
    let s = assert_code(
        "Get of crm's request as webform",
        webform
            .get(GetRequest {
                request_id: id.clone(),
            })
            .await,
        Code::NotFound,
    );
    let unknown = assert_code(
        "Get of an unknown request as webform",
        webform
            .get(GetRequest {
                request_id: "01900000-0000-7000-8000-000000000000".into(),
            })
            .await,
        Code::NotFound,
    );
    assert_eq!(
        s.message().replace(&id, "ID"),
        unknown
            .message()
            .replace("01900000-0000-7000-8000-000000000000", "ID"),
        "another partner's request must look exactly like an unknown one"
    );
    assert_code(
        "Cancel of crm's request as webform",
        webform
            .cancel(CancelRequest {
                request_id: id.clone(),
                reason: "not mine".into(),
            })
            .await,
        Code::NotFound,
    );
    assert_code(
        "Watch of crm's request as webform",
        webform
            .watch(WatchRequest {
                request_id: id.clone(),
                after_event_id: 0,
                follow_after_terminal: true,
            })
            .await
            .map(|_| ()),
        Code::NotFound,
    );
    let listed = webform
        .list(ListRequestsRequest::default())
        .await
        .expect("list as webform")
        .into_inner();
    assert!(
        listed
            .requests
            .iter()
            .all(|r| r.request_id != id && r.partner == "webform"),
        "{listed:#?}"
    );
    // The webform cancel did nothing.
    let view = crm
        .get(GetRequest {
            request_id: id.clone(),
        })
        .await
        .expect("get as crm")
        .into_inner();
    assert!(view.cancel_reason.is_empty(), "{view:#?}");
    assert_eq!(view.partner, "crm");
    let listed = crm
        .list(ListRequestsRequest::default())
        .await
        .expect("list as crm")
        .into_inner();
    assert!(
        listed.requests.iter().any(|r| r.request_id == id),
        "{listed:#?}"
    );

    // The operator sees everything.
    let mut operator = setup.client("operator");
    let view = operator
        .get(GetRequest {
            request_id: id.clone(),
        })
        .await
        .expect("get as operator")
        .into_inner();
    assert_eq!(view.partner, "crm");
    assert_eq!(view.kind, RequestKind::Erasure as i32);
    assert_eq!(view.identities, vec![email("roles@example.fi")]);
    let listed = operator
        .list(ListRequestsRequest {
            page_size: 500,
            ..Default::default()
        })
        .await
        .expect("list as operator")
        .into_inner();
    assert!(
        listed.requests.iter().any(|r| r.request_id == id),
        "{listed:#?}"
    );

    // The processor may not acknowledge a request that was not delivered to it: neither an
    // unknown one nor one routed only to another processor.
    let elsewhere = submit_as_crm(&pair, "elsewhere@example.fi", Some(vec!["web-analytics"])).await;
    let mut acks = AcknowledgementServiceClient::new(setup.channel_to_registry("processor"));
    for request_id in ["01900000-0000-7000-8000-000000000001", elsewhere.as_str()] {
        let r = acks
            .acknowledge(ack(request_id))
            .await
            .unwrap_or_else(|s| panic!("Acknowledge of {request_id}: {s:?}"))
            .into_inner();
        assert_eq!(r.applied, 0, "{r:?}");
        assert_eq!(r.rejected.len(), 1, "{r:?}");
        let x = &r.rejected[0];
        assert_eq!(x.code, Code::PermissionDenied as i32, "{x:?}");
        assert!(x.message.contains(request_id), "{x:?}");
        assert!(x.message.contains(PROCESSOR), "{x:?}");
    }
    // ... and in a batch mixing a legitimate acknowledgement with a foreign one, only the
    // legitimate one is applied. (Its subprocessor is one no real task uses, so the real
    // processor's own acknowledgements cannot make it a duplicate.)
    let mut batch = ack(&id);
    batch.acknowledgements[0].subprocessor = "mixed-batch-probe".into();
    batch
        .acknowledgements
        .push(ack(&elsewhere).acknowledgements.remove(0));
    let r = acks
        .acknowledge(batch)
        .await
        .expect("a mixed batch is answered per acknowledgement")
        .into_inner();
    assert_eq!(r.applied, 1, "{r:?}");
    assert_eq!(r.rejected.len(), 1, "{r:?}");
    assert_eq!(
        (r.rejected[0].index, r.rejected[0].code),
        (1, Code::PermissionDenied as i32),
        "{r:?}"
    );
    let view = operator
        .get(GetRequest {
            request_id: elsewhere.clone(),
        })
        .await
        .expect("get as operator")
        .into_inner();
    assert!(view.tasks.is_empty(), "{view:#?}");
    let view = operator
        .get(GetRequest {
            request_id: id.clone(),
        })
        .await
        .expect("get as operator")
        .into_inner();
    assert!(
        view.tasks
            .iter()
            .any(|t| t.subprocessor == "mixed-batch-probe"),
        "the legitimate acknowledgement was not applied: {view:#?}"
    );
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_accepts_only_its_controllers() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let deliver = DeliverRequest {
        request_id: "01900000-0000-7000-8000-000000000002".into(),
        kind: RequestKind::Erasure as i32,
        identities: vec![email("direct@example.fi")],
        ..Default::default()
    };
    for stem in ["partner-crm", "operator", "processor"] {
        let mut client = ProcessorServiceClient::new(pair.channel_to_processor(stem));
        let s = assert_code(
            &format!("Deliver as {stem}"),
            client.deliver(deliver.clone()).await,
            Code::PermissionDenied,
        );
        assert!(s.message().contains("not a controller"), "{s:?}");
    }
    let mut crm = ProcessorServiceClient::new(pair.channel_to_processor("partner-crm"));
    assert_code(
        "GetStatus as crm",
        crm.get_status(GetStatusRequest {
            request_id: deliver.request_id.clone(),
        })
        .await,
        Code::PermissionDenied,
    );

    let mut registry = ProcessorServiceClient::new(pair.channel_to_processor("registry"));
    let s = assert_code(
        "GetStatus of an unknown id as the registry",
        registry
            .get_status(GetStatusRequest {
                request_id: "01900000-0000-7000-8000-000000000003".into(),
            })
            .await,
        Code::NotFound,
    );
    assert!(
        s.message().contains("01900000-0000-7000-8000-000000000003"),
        "{s:?}"
    );
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_with_the_wrong_identity() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let tls = pair
        .pki()
        .files("partner-crm")
        .client_config()
        .expect("client tls");
    let endpoint = format!("https://localhost:{}", pair.registry.addr().port());

    // Control: the right identity works.
    let right = dsrelay_runtime::tls::channel(
        &endpoint,
        Some(dev_identity("registry", "controller")),
        &tls,
    )
    .expect("channel");
    RequestServiceClient::new(right)
        .list(ListRequestsRequest::default())
        .await
        .expect("the right server identity is accepted");

    let wrong = dsrelay_runtime::tls::channel(
        &endpoint,
        Some("spiffe://dsrelay.dev/registry/wrong".into()),
        &tls,
    )
    .expect("channel");
    let mut client = RequestServiceClient::new(wrong);
    let result = tokio::time::timeout(CALL_TIMEOUT, client.submit(erasure("mitm@example.fi")))
        .await
        .expect("the refusal is prompt");
    assert_refused_by_transport("Submit to a server with an unexpected identity", result);

    // A CA-valid server that is not the registry (the processor) is refused the same way.
    let impostor = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{}", pair.processor.addr().port()),
        Some(dev_identity("registry", "controller")),
        &tls,
    )
    .expect("channel");
    let result = tokio::time::timeout(
        CALL_TIMEOUT,
        RequestServiceClient::new(impostor).list(ListRequestsRequest::default()),
    )
    .await
    .expect("the refusal is prompt");
    assert_refused_by_transport("List at the processor expecting the registry", result);
    pair.stop().await;
}

/// Lists the services through server reflection (v1) over `channel`.
async fn reflected_services(channel: Channel) -> Result<Vec<String>, Status> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let mut names = Vec::new();
    while let Some(answer) = answers.message().await? {
        if let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response {
            names.extend(list.service.into_iter().map(|s| s.name));
        }
    }
    Ok(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_answers_only_the_callers_a_service_knows() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    // A partner of the registry, and the registry as the processor's controller.
    let names = reflected_services(pair.channel_to_registry("partner-crm"))
        .await
        .expect("a partner may reflect");
    assert!(
        names.iter().any(|n| n == "dsrelay.v1.RequestService"),
        "{names:?}"
    );
    reflected_services(pair.channel_to_processor("registry"))
        .await
        .expect("the controller may reflect at the processor");
    // The adapter's certificate is from the same CA, but neither service knows it.
    for (what, channel) in [
        ("registry", pair.channel_to_registry("adapter")),
        ("processor", pair.channel_to_processor("adapter")),
    ] {
        let status = reflected_services(channel)
            .await
            .expect_err("an unknown caller may not reflect");
        assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
        assert!(
            status
                .message()
                .contains("spiffe://dsrelay.dev/adapter/example"),
            "{what}: {status:?}"
        );
    }
    pair.stop().await;
}

/// Whether server reflection (v1) over `channel` finds the file that declares `symbol`.
async fn reflection_finds(channel: Channel, symbol: &str) -> bool {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.into())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    match answers.message().await {
        Ok(Some(answer)) => matches!(
            answer.message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        ),
        Err(status) if status.code() == Code::NotFound => false,
        other => panic!("reflection of {symbol}: {other:?}"),
    }
}

/// Each caller sees in reflection only the services its role may call: a partner of the
/// registry neither lists nor finds the operators' ContractService nor the processors'
/// services, nor the operators' methods of RequestService; an operator has ContractService; at the processor the controller sees
/// ProcessorService and not the operators' service, which the processor's operator sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_shows_each_role_only_its_services() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let sorted = |mut names: Vec<String>| {
        names.sort();
        names
    };
    let health = "grpc.health.v1.Health".to_string();
    let reflection = "grpc.reflection.v1.ServerReflection".to_string();
    let partner = sorted(
        reflected_services(pair.channel_to_registry("partner-crm"))
            .await
            .expect("a partner may reflect"),
    );
    assert_eq!(
        partner,
        sorted(vec![
            "dsrelay.v1.CertificateService".into(),
            "dsrelay.v1.PackageService".into(),
            "dsrelay.v1.RequestService".into(),
            health.clone(),
            reflection.clone(),
        ])
    );
    let operator = reflected_services(pair.channel_to_registry("operator"))
        .await
        .expect("an operator may reflect");
    assert!(
        operator.iter().any(|n| n == "dsrelay.v1.ContractService"),
        "{operator:?}"
    );
    assert!(
        !operator
            .iter()
            .any(|n| n == "dsrelay.v1.AcknowledgementService"),
        "{operator:?}"
    );
    for symbol in [
        "dsrelay.v1.ContractService",
        "dsrelay.v1.AcknowledgementService",
        "dsrelay.v1.ExportUploadService",
    ] {
        assert!(
            !reflection_finds(pair.channel_to_registry("partner-crm"), symbol).await,
            "a partner found {symbol}"
        );
    }
    assert!(
        reflection_finds(
            pair.channel_to_registry("partner-crm"),
            "dsrelay.v1.RequestService"
        )
        .await
    );
    // RequestService is shared: a partner sees its own methods of it, not the operators'.
    for (method, partner_sees) in [
        ("Submit", true),
        ("Watch", true),
        ("ListAuditCheckpoints", true),
        ("ExtendDeadline", false),
        ("ListAuditEntries", false),
        ("ListDeadLetteredDeliveries", false),
        ("RequeueDelivery", false),
    ] {
        let symbol = format!("dsrelay.v1.RequestService.{method}");
        assert_eq!(
            reflection_finds(pair.channel_to_registry("partner-crm"), &symbol).await,
            partner_sees,
            "a partner reflecting {symbol}"
        );
        assert!(
            reflection_finds(pair.channel_to_registry("operator"), &symbol).await,
            "an operator reflecting {symbol}"
        );
    }
    assert!(
        reflection_finds(
            pair.channel_to_registry("operator"),
            "dsrelay.v1.ContractService"
        )
        .await
    );
    let processor = sorted(
        reflected_services(pair.channel_to_registry("processor"))
            .await
            .expect("a processor may reflect"),
    );
    assert_eq!(
        processor,
        sorted(vec![
            "dsrelay.v1.AcknowledgementService".into(),
            "dsrelay.v1.ExportUploadService".into(),
            health.clone(),
            reflection.clone(),
        ])
    );
    let controller = sorted(
        reflected_services(pair.channel_to_processor("registry"))
            .await
            .expect("the controller may reflect at the processor"),
    );
    assert_eq!(
        controller,
        sorted(vec![
            "dsrelay.v1.ProcessorOperatorService".into(),
            "dsrelay.v1.ProcessorService".into(),
            health.clone(),
            reflection.clone(),
        ])
    );
    // Of the operators' service a controller sees only the checkpoints it may fetch.
    for (method, controller_sees) in [("ListAuditCheckpoints", true), ("ListAuditEntries", false)] {
        let symbol = format!("dsrelay.v1.ProcessorOperatorService.{method}");
        assert_eq!(
            reflection_finds(pair.channel_to_processor("registry"), &symbol).await,
            controller_sees,
            "the controller reflecting {symbol}"
        );
    }
    let processor_operator = reflected_services(pair.channel_to_processor("operator"))
        .await
        .expect("the processor's operator may reflect");
    assert!(
        processor_operator
            .iter()
            .any(|n| n == "dsrelay.v1.ProcessorOperatorService")
            && !processor_operator
                .iter()
                .any(|n| n == "dsrelay.v1.ProcessorService"),
        "{processor_operator:?}"
    );
    pair.stop().await;
}
