//! Certificates checked on every call, not only at the handshake: a certificate revoked or
//! expired while its connection stays open is refused from its next call, on both services,
//! and every refusal is logged naming the certificate.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::ListRequestsRequest;
use dsrelay_runtime::pki::{dev_identity, DevCa, DevPki, IssuedCert};
use dsrelay_runtime::tls::peer::PeerCertificate;
use dsrelay_runtime::tls::TlsFiles;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use dsrelay_proto::v1::{RequestState, TaskState};

use crate::harness::{erasure, in_state, spawn_pair, wait_until, Backend, PairOptions, TestPair};

/// How long a refusal, a reload or a log line may take to come (services reload every
/// 100 ms here); a bound on waiting, not a guess at timing.
const WITHIN: Duration = Duration::from_secs(15);

const DAY: Duration = Duration::from_secs(86_400);

/// What the services of this test process log (nextest runs each test in a process of its
/// own, and the services run in it): the subscriber is installed on first use.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log: Arc<Mutex<Vec<u8>>> = Arc::default();
        let writer = Writer(log.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other subscriber in this process");
        log
    })
}

#[derive(Clone)]
struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits for a logged line containing every one of `parts`, and returns it.
async fn logged(parts: &[&str]) -> String {
    let found = || {
        let text = String::from_utf8_lossy(&captured().lock().expect("log")).to_string();
        text.lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
    };
    tokio::time::timeout(WITHIN, async {
        loop {
            if let Some(line) = found() {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no line with {parts:?} in:\n{}",
            String::from_utf8_lossy(&captured().lock().expect("log"))
        )
    })
}

/// The certificate at `path`, as the services read it.
fn peer_certificate(path: &std::path::Path) -> PeerCertificate {
    let der = CertificateDer::from_pem_file(path).expect("a certificate");
    PeerCertificate::parse(der.as_ref()).expect("readable")
}

/// Repeats `call` (on whatever connection its client holds) until it fails, and returns the
/// failure; the services swap their lists on their own schedule.
async fn refused_within<F, Fut, T>(what: &str, mut call: F) -> Status
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    tokio::time::timeout(WITHIN, async {
        loop {
            if let Err(status) = call().await {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: still served after {WITHIN:?}"))
}

async fn health(client: &mut HealthClient<Channel>) -> Result<(), Status> {
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(drop)
}

/// Asserts that the call was refused by the per-call check (UNAUTHENTICATED, which the
/// handshake never answers: a refused handshake is UNAVAILABLE) and says `why` and `serial`.
fn assert_refused_on_the_open_connection(what: &str, status: &Status, why: &str, serial: &str) {
    assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    assert!(
        status.message().contains(why) && status.message().contains(serial),
        "{what}: {why:?} and {serial:?} not in {:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_while_its_connection_is_open_is_refused_on_its_next_call() {
    captured();
    let pair = spawn_pair(PairOptions {
        revocation_list: true,
        tls_reload_ms: Some(100),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let pki = pair.pki().clone();
    // One channel each, kept open across the revocation: the registry's request API as the
    // partner crm, the processor's health as the operator.
    let mut crm = pair.crm();
    let mut operator_at_processor = HealthClient::new(pair.channel_to_processor("operator"));
    crm.list(ListRequestsRequest::default())
        .await
        .expect("crm is served while its certificate is good");
    health(&mut operator_at_processor)
        .await
        .expect("the operator is served by the processor");
    let mut webform = pair.client("partner-webform");
    webform
        .list(ListRequestsRequest::default())
        .await
        .expect("webform is served");

    let crm_cert = peer_certificate(&pki.cert("partner-crm"));
    pki.revoke(&[pki.cert("partner-crm")], 30 * DAY)
        .expect("revoking crm");
    // Clones share the channel, and with it the one connection.
    let status = refused_within("crm's open channel", || {
        let mut crm = crm.clone();
        async move { crm.list(ListRequestsRequest::default()).await }
    })
    .await;
    assert_refused_on_the_open_connection(
        "List on crm's open channel",
        &status,
        "was revoked",
        &crm_cert.serial_hex,
    );
    let line = logged(&["call refused", &crm_cert.serial_hex]).await;
    assert!(
        line.contains("WARN")
            && line.contains(&dev_identity("partner", "crm"))
            && line.contains("reason=\"revoked\"")
            && line.contains("peer=127.0.0.1:"),
        "{line}"
    );
    webform
        .list(ListRequestsRequest::default())
        .await
        .expect("webform, not revoked, is still served on its open channel");

    // A new connection of crm's is refused at the handshake, and that refusal names it too.
    let fresh = pair.crm().list(ListRequestsRequest::default()).await;
    let status = fresh.expect_err("crm's new connection is refused");
    assert_ne!(status.code(), Code::Ok);
    let line = logged(&["tls handshake refused", &crm_cert.serial_hex]).await;
    assert!(
        line.contains("WARN")
            && line.contains(&dev_identity("partner", "crm"))
            && line.contains("Revoked"),
        "{line}"
    );

    // The processor checks its open connections as the registry does.
    let operator_cert = peer_certificate(&pki.cert("operator"));
    pki.revoke(&[pki.cert("operator")], 30 * DAY)
        .expect("revoking the operator");
    let status = refused_within("the operator's open channel to the processor", || {
        let mut client = operator_at_processor.clone();
        async move { health(&mut client).await }
    })
    .await;
    assert_refused_on_the_open_connection(
        "health on the operator's open channel to the processor",
        &status,
        "was revoked",
        &operator_cert.serial_hex,
    );
    pair.stop().await;
}

/// The development CA of `pki`, able to issue more certificates.
fn dev_ca(pki: &DevPki) -> DevCa {
    DevCa::load(
        &std::fs::read_to_string(pki.ca()).expect("ca.pem"),
        &std::fs::read_to_string(pki.dir.join("ca.key")).expect("ca.key"),
    )
    .expect("the development CA")
}

/// The registry's request API presenting `leaf` (files under `dir` in the pair's folder).
fn registry_client(pair: &TestPair, dir: &str, leaf: &IssuedCert) -> RequestServiceClient<Channel> {
    let dir = pair.dir().join(dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert, key) = (dir.join("party.pem"), dir.join("party.key"));
    std::fs::write(&cert, &leaf.cert_pem).expect("cert");
    std::fs::write(&key, &leaf.key_pem).expect("key");
    let tls = TlsFiles::new(pair.pki().ca(), cert, key)
        .client_config()
        .expect("client tls");
    let channel = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{}", pair.registry.addr().port()),
        Some(dev_identity("registry", "controller")),
        &tls,
    )
    .expect("channel");
    RequestServiceClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_while_its_connection_is_open_is_refused_on_its_next_call() {
    captured();
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let now = SystemTime::now();
    // Long enough for one call to be made on it; the test then waits for the clock to pass.
    let lifetime = Duration::from_secs(8);
    let short = dev_ca(pair.pki())
        .issue_valid_between(
            "dsrelay crm (short-lived)",
            &dev_identity("partner", "crm"),
            now - DAY,
            now + lifetime,
        )
        .expect("a short-lived certificate");
    let cert = peer_certificate_of(&short.cert_pem);
    let mut crm = registry_client(&pair, "short", &short);
    crm.list(ListRequestsRequest::default())
        .await
        .expect("the certificate is valid when its connection opens");

    // X.509 times have whole seconds: past the last second the certificate covers.
    let expired_at = now + lifetime + Duration::from_secs(2);
    tokio::time::timeout(lifetime + WITHIN, async {
        while SystemTime::now() < expired_at {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the clock moves");
    let status = crm
        .list(ListRequestsRequest::default())
        .await
        .expect_err("an expired certificate is refused on its open connection");
    assert_refused_on_the_open_connection(
        "List after the certificate expired",
        &status,
        "expired at",
        &cert.serial_hex,
    );
    let line = logged(&["call refused", &cert.serial_hex]).await;
    assert!(line.contains("reason=\"expired\""), "{line}");
    pair.stop().await;
}

fn peer_certificate_of(pem: &str) -> PeerCertificate {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("a certificate");
    PeerCertificate::parse(der.as_ref()).expect("readable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_identity_is_logged_with_its_certificate() {
    captured();
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let stranger = dev_identity("partner", "stranger");
    let leaf = dev_ca(pair.pki())
        .issue("dsrelay stranger", &stranger)
        .expect("a certificate of an unknown identity");
    let cert = peer_certificate_of(&leaf.cert_pem);
    let status = registry_client(&pair, "stranger", &leaf)
        .list(ListRequestsRequest::default())
        .await
        .expect_err("an unknown identity is refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let line = logged(&["call refused", &stranger]).await;
    assert!(
        line.contains("WARN")
            && line.contains(&cert.serial_hex)
            && line.contains("reason=\"unknown identity\"")
            && line.contains("peer=127.0.0.1:"),
        "{line}"
    );
    pair.stop().await;
}

/// Writes `contents` to `path` through a rename, so that the service never reads half of it.
fn replace(path: &std::path::Path, contents: &str) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, contents).expect("writing");
    std::fs::rename(&partial, path).expect("renaming");
}

fn task_state(r: &dsrelay_proto::v1::Request, sub: &str) -> Option<TaskState> {
    r.tasks
        .iter()
        .find(|t| t.subprocessor == sub)
        .and_then(|t| TaskState::try_from(t.state).ok())
}

/// The processor's certificate is revoked while it acknowledges over an open connection, and
/// replaced with a new one: the acknowledgements refused meanwhile go through once the
/// processor has loaded the new files, without a restart of either service.
async fn a_replaced_certificate_is_used_for_the_next_calls_over_a_new_connection(backend: Backend) {
    captured();
    let Some(pair) = spawn_pair(PairOptions {
        backend,
        revocation_list: true,
        tls_reload_ms: Some(100),
        // Long enough for the registry to load the revocation while the task runs.
        mail_delay_ms: 4000,
        ..Default::default()
    })
    .await
    else {
        return;
    };
    let pki = pair.pki().clone();
    let mut crm = pair.crm();
    let id = crm
        .submit(erasure("ville.vaihdettu@example.fi"))
        .await
        .expect("submit")
        .into_inner()
        .request_id;
    // The in-progress acknowledgement came over the processor's connection to the registry,
    // made with the certificate about to be revoked.
    wait_until(&mut crm, &id, WITHIN, |v| {
        task_state(v, "mail-marketing") == Some(TaskState::InProgress)
    })
    .await;

    let old = peer_certificate(&pki.cert("processor"));
    pki.revoke(&[pki.cert("processor")], 30 * DAY)
        .expect("revoking the processor");
    // The registry refuses the processor's acknowledgements: per call on the open connection,
    // or at the handshake of the new one the processor opens once it has reloaded the list.
    let line = logged(&["refused", &old.serial_hex]).await;
    assert!(
        line.contains("WARN") && line.contains(&dev_identity("processor", "payroll-bureau")),
        "{line}"
    );
    let view = crm
        .get(dsrelay_proto::v1::GetRequest {
            request_id: id.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_ne!(
        view.state,
        RequestState::Completed as i32,
        "the request waits while the acknowledgements are refused"
    );

    // A new certificate for the same identity, the key first: a reload between the two sees
    // a pair that does not belong together and keeps the old one.
    let renewed = dev_ca(&pki)
        .issue(
            "dsrelay processor payroll-bureau (renewed)",
            &dev_identity("processor", "payroll-bureau"),
        )
        .expect("a new processor certificate");
    replace(&pki.key("processor"), &renewed.key_pem);
    replace(&pki.cert("processor"), &renewed.cert_pem);
    let new = peer_certificate(&pki.cert("processor"));
    logged(&["tls files loaded", &new.serial_hex]).await;

    wait_until(&mut crm, &id, WITHIN * 4, in_state(RequestState::Completed)).await;
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_used_for_the_next_calls_over_a_new_connection_on_sqlite() {
    a_replaced_certificate_is_used_for_the_next_calls_over_a_new_connection(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_used_for_the_next_calls_over_a_new_connection_on_postgres() {
    a_replaced_certificate_is_used_for_the_next_calls_over_a_new_connection(Backend::Postgres)
        .await;
}
