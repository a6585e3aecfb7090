//! Certificate revocation and rotation without a restart: revoked, expired and not yet valid
//! certificates are refused; a service's certificate, key, CA bundle and revocation list are
//! replaced while it serves, and no call fails.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dsrelay_proto::v1::processor_service_client::ProcessorServiceClient;
use dsrelay_proto::v1::request_service_client::RequestServiceClient;
use dsrelay_proto::v1::{GetStatusRequest, ListRequestsRequest};
use dsrelay_runtime::pki::{dev_identity, DevCa, DevPki, IssuedCert};
use dsrelay_runtime::tls::TlsFiles;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::harness::{erasure, spawn_pair, Mode, PairOptions, TestPair};

/// How long a refused connection may take to surface as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a service may take to notice changed files (it looks every 100 ms here).
const RELOAD_WITHIN: Duration = Duration::from_secs(10);

const DAY: Duration = Duration::from_secs(86_400);

/// The development CA of `pki`, able to issue more certificates.
fn dev_ca(pki: &DevPki) -> DevCa {
    DevCa::load(
        &std::fs::read_to_string(pki.ca()).expect("ca.pem"),
        &std::fs::read_to_string(pki.dir.join("ca.key")).expect("ca.key"),
    )
    .expect("the development CA")
}

/// Writes `contents` to `path` through a rename, so that nobody reading the file (the test's
/// own clients among them) ever sees half of it.
fn replace(path: &Path, contents: &str) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, contents).expect("writing");
    std::fs::rename(&partial, path).expect("renaming");
}

/// TLS files under `dir` presenting `leaf`, trusting the pair's CA.
fn party_files(pair: &TestPair, dir: &str, leaf: &IssuedCert) -> TlsFiles {
    let dir = pair.dir().join(dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert, key) = (dir.join("party.pem"), dir.join("party.key"));
    std::fs::write(&cert, &leaf.cert_pem).expect("cert");
    std::fs::write(&key, &leaf.key_pem).expect("key");
    TlsFiles::new(pair.pki().ca(), cert, key)
}

/// The registry's request API through `files`, checking the registry's identity.
fn registry_client(pair: &TestPair, files: &TlsFiles) -> RequestServiceClient<Channel> {
    let tls = files.client_config().expect("client tls");
    let channel = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{}", pair.registry.addr().port()),
        Some(dev_identity("registry", "controller")),
        &tls,
    )
    .expect("channel");
    RequestServiceClient::new(channel)
}

/// The certificate the service on `port` presents to a new connection right now.
async fn served_certificate(pair: &TestPair, port: u16) -> CertificateDer<'static> {
    let tls = pair
        .pki()
        .files("operator")
        .client_config()
        .expect("client tls");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connecting");
    let stream = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let (_, conn) = stream.get_ref();
    conn.peer_certificates().expect("a server certificate")[0].clone()
}

/// What the service on `port` says to a handshake presenting `files`: `Ok` when it goes on
/// to speak HTTP/2, or the alert it refused with. With TLS 1.3 the client's side of the
/// handshake ends before the server has judged its certificate, so the verdict is the first
/// thing read.
async fn handshake_verdict(port: u16, files: &TlsFiles) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = files.client_config().expect("client tls");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connecting");
    let mut stream = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .map_err(|e| e.to_string())?;
    // Spoken first, as an HTTP/2 client does: the server serves a connection only once it
    // came (`server::PREFACE_TIMEOUT`), and answers with its settings. A refused handshake
    // may already fail this write; the read below says why.
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut first = [0u8; 64];
    match tokio::time::timeout(CALL_TIMEOUT, stream.read(&mut first)).await {
        Ok(Ok(0)) => Err("closed without a word".into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("a certificate")
}

/// Asserts that a call was refused with the connection (not answered by a handler).
fn assert_refused<T: std::fmt::Debug>(what: &str, result: Result<T, Status>) -> Status {
    let status = match result {
        Ok(v) => panic!("{what}: the call succeeded but must be refused: {v:?}"),
        Err(s) => s,
    };
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{what}: expected a refused connection, got {:?}: {status:?}",
        status.code()
    );
    status
}

/// [`assert_refused`], where the client's own checks refused the server, saying why (`why`,
/// lowercase, in the status or its source).
fn assert_refused_for<T: std::fmt::Debug>(what: &str, result: Result<T, Status>, why: &str) {
    let status = assert_refused(what, result);
    let text = format!("{status:?}").to_lowercase();
    assert!(text.contains(why), "{what}: {why:?} not in {status:?}");
}

/// Retries `call` on fresh connections until it is refused (the service reloads on its own
/// schedule), then returns the refusal.
async fn refused_within<F, Fut, T>(what: &str, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
    T: std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + RELOAD_WITHIN;
    loop {
        let result = tokio::time::timeout(CALL_TIMEOUT, call())
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"));
        if result.is_err() || tokio::time::Instant::now() > deadline {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_and_the_others_still_served() {
    let pair = spawn_pair(PairOptions {
        revocation_list: true,
        tls_reload_ms: Some(100),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let pki = pair.pki().clone();
    pair.crm()
        .submit(erasure("before@example.fi"))
        .await
        .expect("crm is served while its certificate is good");

    let revoked = pki
        .revoke(&[pki.cert("partner-crm")], 30 * DAY)
        .expect("revoking crm");
    assert_eq!(revoked.len(), 1);

    // Each attempt on a fresh connection, as the registry swaps the list on its own time.
    let result = refused_within("crm after revocation", || async {
        pair.crm().submit(erasure("after@example.fi")).await
    })
    .await;
    assert_refused("Submit with a revoked crm certificate", result);
    let result = tokio::time::timeout(
        CALL_TIMEOUT,
        pair.crm().list(ListRequestsRequest::default()),
    )
    .await
    .expect("the refusal is prompt");
    assert_refused("List with a revoked crm certificate", result);
    let verdict = handshake_verdict(pair.registry.addr().port(), &pki.files("partner-crm")).await;
    assert_eq!(
        verdict,
        Err("received fatal alert: CertificateRevoked".into()),
        "the registry says why it refused crm"
    );

    // A new certificate for the same party, from the same CA, is not on the list.
    let fresh = dev_ca(&pki)
        .issue(
            "dsrelay partner crm (reissued)",
            &dev_identity("partner", "crm"),
        )
        .expect("reissuing crm");
    registry_client(&pair, &party_files(&pair, "crm-reissued", &fresh))
        .submit(erasure("reissued@example.fi"))
        .await
        .expect("crm's reissued certificate is served");
    pair.client("partner-webform")
        .submit(erasure("webform@example.fi"))
        .await
        .expect("webform, not revoked, is still served");

    // Outbound too: a channel with the revocation list refuses a server whose certificate
    // is on it. The processor's certificate is revoked; the registry's own files (with the
    // list) are the client here.
    pki.revoke(&[pki.cert("processor")], 30 * DAY)
        .expect("revoking the processor");
    let mut registry_files = pki.files("registry");
    registry_files.crls = vec![pki.crl()];
    let tls = registry_files.client_config().expect("registry client tls");
    let status = GetStatusRequest {
        request_id: "00000000-0000-0000-0000-000000000000".into(),
    };
    let channel = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{}", pair.processor.addr().port()),
        Some(dev_identity("processor", "payroll-bureau")),
        &tls,
    )
    .expect("channel");
    let result = tokio::time::timeout(
        CALL_TIMEOUT,
        ProcessorServiceClient::new(channel).get_status(status.clone()),
    )
    .await
    .expect("the refusal is prompt");
    assert_refused_for(
        "GetStatus at a processor whose certificate is revoked",
        result,
        "revoked",
    );
    // The same client without the list still gets through the handshake (the registry
    // identity may ask for a status), so the refusal above is the list's doing.
    let channel = dsrelay_runtime::tls::channel(
        &format!("https://localhost:{}", pair.processor.addr().port()),
        Some(dev_identity("processor", "payroll-bureau")),
        &pki.files("registry").client_config().expect("client tls"),
    )
    .expect("channel");
    let answer = ProcessorServiceClient::new(channel)
        .get_status(status)
        .await;
    assert!(
        !matches!(&answer, Err(s) if s.code() == Code::Unavailable),
        "{answer:?}"
    );
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_or_not_yet_valid_certificate_is_refused() {
    let pair = spawn_pair(PairOptions::default())
        .await
        .expect("sqlite pair");
    let ca = dev_ca(pair.pki());
    let now = SystemTime::now();
    let crm = dev_identity("partner", "crm");
    let expired = ca
        .issue_valid_between("dsrelay crm (expired)", &crm, now - 2 * DAY, now - DAY)
        .expect("an expired certificate");
    let early = ca
        .issue_valid_between("dsrelay crm (early)", &crm, now + DAY, now + 2 * DAY)
        .expect("a certificate not valid yet");
    let current = ca
        .issue_valid_between("dsrelay crm (current)", &crm, now - DAY, now + DAY)
        .expect("a current certificate");

    let port = pair.registry.addr().port();
    let current = party_files(&pair, "current", &current);
    registry_client(&pair, &current)
        .submit(erasure("current@example.fi"))
        .await
        .expect("a certificate valid today is served");
    assert_eq!(handshake_verdict(port, &current).await, Ok(()));
    for (what, leaf) in [("expired", &expired), ("early", &early)] {
        let files = party_files(&pair, what, leaf);
        let result = tokio::time::timeout(
            CALL_TIMEOUT,
            registry_client(&pair, &files).submit(erasure(&format!("{what}@example.fi"))),
        )
        .await
        .expect("the refusal is prompt");
        assert_refused(&format!("Submit with the {what} certificate"), result);
        // TLS has one alert for both (the registry's log says which it was).
        assert_eq!(
            handshake_verdict(port, &files).await,
            Err("received fatal alert: CertificateExpired".into()),
            "{what}"
        );
    }
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_registry_rotates_its_certificate_under_load_without_a_failed_call() {
    let pair = spawn_pair(PairOptions {
        revocation_list: true,
        tls_reload_ms: Some(100),
        ..Default::default()
    })
    .await
    .expect("sqlite pair");
    let pair = Arc::new(pair);
    let pki = pair.pki().clone();
    let old = served_certificate(&pair, pair.registry.addr().port()).await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for n in 0..4 {
        let (pair, mut stop, done) = (pair.clone(), stop_rx.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            // Half keep one connection open through the swap; half connect anew for every
            // call, so some handshakes happen while the files change.
            let mut kept = pair.client("partner-crm");
            let mut failures = Vec::new();
            let mut i = 0;
            while !*stop.borrow_and_update() {
                let mut client = if n % 2 == 0 {
                    kept.clone()
                } else {
                    pair.client("partner-crm")
                };
                let mail = format!("rotation-{n}-{i}@example.fi");
                match client.submit(erasure(&mail)).await {
                    Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e),
                }
                kept = client;
                i += 1;
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = done.load(Ordering::Relaxed);

    // A new certificate and key for the registry from the same CA, and a CA bundle with
    // another CA beside it; the key first, so a reload between the two sees a key that does
    // not match the old certificate and keeps serving the old pair.
    let rotated = dev_ca(&pki)
        .issue(
            "dsrelay registry controller (rotated)",
            &dev_identity("registry", "controller"),
        )
        .expect("a new registry certificate");
    let other_ca = DevCa::generate("dsrelay next CA").expect("another CA");
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(pki.ca()).expect("ca.pem"),
        other_ca.cert_pem()
    );
    replace(&pki.ca(), &bundle);
    replace(&pki.key("registry"), &rotated.key_pem);
    replace(&pki.cert("registry"), &rotated.cert_pem);

    let deadline = tokio::time::Instant::now() + RELOAD_WITHIN;
    let new = der_of(&rotated.cert_pem);
    loop {
        let served = served_certificate(&pair, pair.registry.addr().port()).await;
        if served == new {
            break;
        }
        assert_eq!(
            served, old,
            "the registry serves its old or its new certificate"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the registry did not take its new certificate within {RELOAD_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop_tx.send(true).expect("clients listening");
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.expect("client task"));
    }
    let total = done.load(Ordering::Relaxed);
    assert!(failures.is_empty(), "failed calls: {failures:?}");
    assert!(
        before > 0 && total > before,
        "calls went on before ({before}) and through ({total}) the swap"
    );
    pair.operator()
        .list(ListRequestsRequest::default())
        .await
        .expect("the operator is served by the rotated registry");
    Arc::try_unwrap(pair)
        .unwrap_or_else(|_| panic!("client tasks hold no pair"))
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_keeps_the_old_files_and_sighup_loads_good_ones() {
    let Some(mut pair) = spawn_pair(PairOptions {
        mode: Mode::Processes,
        // Only SIGHUP reloads, so the test knows when each reload happens.
        tls_reload_ms: Some(0),
        ..Default::default()
    })
    .await
    else {
        panic!("a sqlite pair always starts");
    };
    let pki = pair.pki().clone();
    let port = pair.registry.addr().port();
    let old = served_certificate(&pair, port).await;
    let pid = pair.registry.pid().expect("a registry process");
    let hup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    let log_count = |pair: &TestPair, line: &str| pair.registry.log().matches(line).count();
    let loaded_at_start = log_count(&pair, "tls files loaded");
    assert_eq!(loaded_at_start, 1, "{}", pair.registry.log());

    // A key that belongs to another certificate.
    let stray = dev_ca(&pki)
        .issue("dsrelay stray", &dev_identity("registry", "controller"))
        .expect("a stray certificate");
    replace(&pki.key("registry"), &stray.key_pem);
    hup();
    let deadline = tokio::time::Instant::now() + RELOAD_WITHIN;
    while log_count(&pair, "reloading the tls files failed") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed reload logged: {}",
            pair.registry.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        pair.registry
            .log()
            .contains("the certificate and the private key do not belong together"),
        "{}",
        pair.registry.log()
    );
    assert_eq!(served_certificate(&pair, port).await, old);
    pair.operator()
        .list(ListRequestsRequest::default())
        .await
        .expect("served with the old certificate and key");

    // The matching certificate arrives: the next SIGHUP loads both.
    replace(&pki.cert("registry"), &stray.cert_pem);
    hup();
    let deadline = tokio::time::Instant::now() + RELOAD_WITHIN;
    while log_count(&pair, "tls files loaded") == loaded_at_start {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reload logged: {}",
            pair.registry.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        served_certificate(&pair, port).await,
        der_of(&stray.cert_pem)
    );
    pair.crm()
        .submit(erasure("after-sighup@example.fi"))
        .await
        .expect("served with the new certificate");
    pair.registry.stop().await;
    pair.stop().await;
}
