//! The services speak TLS to PostgreSQL when the database URL asks for it (`sslmode`,
//! `sslrootcert`), through sqlx's rustls. Needs a server that accepts TLS with a certificate
//! for the URL's host: `DSRELAY_TEST_POSTGRES_URL` and `DSRELAY_TEST_POSTGRES_TLS_CA` (the
//! PEM file of the CA that issued it), both set by scripts/test.sh.

use std::time::{Duration, Instant};

use dsrelay_runtime::store::{redact, Db};

const CI_MESSAGE: &str = "PostgreSQL with TLS is required in CI: set DSRELAY_TEST_POSTGRES_URL \
                          and DSRELAY_TEST_POSTGRES_TLS_CA";

/// The server's URL and its CA's PEM file, or `None` (after saying so) when not configured.
fn server() -> Option<(String, String)> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let missing = match (
        var("DSRELAY_TEST_POSTGRES_URL"),
        var("DSRELAY_TEST_POSTGRES_TLS_CA"),
    ) {
        (Some(url), Some(ca)) => return Some((url, ca)),
        (None, _) => "DSRELAY_TEST_POSTGRES_URL",
        (Some(_), None) => "DSRELAY_TEST_POSTGRES_TLS_CA",
    };
    assert!(
        !std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")),
        "{CI_MESSAGE} ({missing} is not set)"
    );
    eprintln!("SKIPPED on PostgreSQL with TLS: {missing} is not set");
    None
}

/// `url` with `query` (`key=value&...`) added to its query string.
fn with_query(url: &str, query: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{query}")
}

/// `path` as a query value: sqlx percent-decodes the query, and a temp dir may hold anything.
fn query_value(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether the session on a connection of `pool` is encrypted, as the server sees it.
async fn encrypted(pool: &sqlx::AnyPool) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(pool)
        .await
        .expect("reading pg_stat_ssl")
}

/// A CA of our own, which did not issue the server's certificate, written to a PEM file.
fn other_ca() -> tempfile::NamedTempFile {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "dsrelay postgres_tls test: some other CA",
    );
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), cert.pem()).unwrap();
    file
}

#[tokio::test]
async fn verify_full_with_the_servers_ca_connects_encrypted() {
    let Some((url, ca)) = server() else { return };
    let url = with_query(
        &url,
        &format!("sslmode=verify-full&sslrootcert={}", query_value(&ca)),
    );
    let db = Db::connect(&url).await.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        encrypted(&db.pool).await,
        "the pool's session is not encrypted"
    );
    assert!(
        encrypted(&db.reader).await,
        "the reader's session is not encrypted"
    );
    // Its URL is built from this one with more query parameters added.
    assert!(
        encrypted(&db.claimer).await,
        "the claimer's session is not encrypted"
    );
    db.close().await;
}

/// A `sslrootcert` path holding characters a URL gives a meaning to (`@`, `#`, `+`, space)
/// works when percent-encoded.
#[tokio::test]
async fn a_percent_encoded_ca_path_with_odd_characters_works() {
    let Some((url, ca)) = server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("a@b #c+d&e%f");
    std::fs::create_dir(&odd).unwrap();
    let copy = odd.join("ca.pem");
    std::fs::copy(&ca, &copy).unwrap();
    let path = query_value(copy.to_str().unwrap());
    let url = with_query(&url, &format!("sslmode=verify-full&sslrootcert={path}"));
    let db = Db::connect(&url).await.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(encrypted(&db.pool).await);
    db.close().await;
}

#[tokio::test]
async fn verify_full_and_verify_ca_refuse_a_certificate_from_another_ca() {
    let Some((url, _)) = server() else { return };
    let other = other_ca();
    let other = query_value(other.path().to_str().unwrap());
    for mode in ["verify-full", "verify-ca"] {
        let url = with_query(&url, &format!("sslmode={mode}&sslrootcert={other}"));
        let started = Instant::now();
        let Err(e) = Db::connect(&url).await else {
            panic!("sslmode={mode} accepted a server certificate another CA issued");
        };
        let message = format!("{e:#}");
        eprintln!("sslmode={mode} refused as it should be: {message}");
        assert!(
            message.contains("invalid peer certificate"),
            "sslmode={mode}: {message}"
        );
        assert!(message.contains(&redact(&url)), "sslmode={mode}: {message}");
        // A refused certificate is final, not taken for a server that is starting up.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "sslmode={mode} took {:?} to fail",
            started.elapsed()
        );
    }
}

/// What README says of the modes that do not verify: `require` encrypts but takes any
/// certificate, even with `sslrootcert`; no `sslmode` is `prefer`, which also encrypts
/// unverified when the server offers TLS; `disable` does not encrypt.
#[tokio::test]
async fn require_and_no_sslmode_encrypt_without_verifying_and_disable_does_not() {
    let Some((url, _)) = server() else { return };
    let other = other_ca();
    let other = query_value(other.path().to_str().unwrap());
    for (query, want) in [
        (format!("sslmode=require&sslrootcert={other}"), true),
        ("sslmode=require".to_string(), true),
        (String::new(), true),
        ("sslmode=disable".to_string(), false),
    ] {
        let url = if query.is_empty() {
            url.clone()
        } else {
            with_query(&url, &query)
        };
        let db = Db::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connecting with {query:?}: {e:#}"));
        assert_eq!(encrypted(&db.pool).await, want, "with {query:?}");
        db.close().await;
    }
}

#[test]
fn redact_keeps_the_tls_query_and_hides_the_password() {
    let url = "postgres://u:secret@db.example:5432/d?sslmode=verify-full&sslrootcert=/etc/ca.pem";
    assert_eq!(
        redact(url),
        "postgres://u:***@db.example:5432/d?sslmode=verify-full&sslrootcert=/etc/ca.pem"
    );
    let url = "postgres://u@db.example/d?sslmode=verify-full&sslrootcert=/etc/ca.pem";
    assert_eq!(redact(url), url);
}
