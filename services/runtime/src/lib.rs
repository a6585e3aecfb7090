//! Runtime shared by the dsrelay services: the parts both the registry and the processor need
//! and that have nothing to do with either's domain.
//!
//! # Layout
//! - [`audit`]: the tamper-evident audit trail: entry hash, chain verification, signed
//!   checkpoints and their file.
//! - [`config`]: TOML file plus prefixed environment overrides layered with figment; the
//!   problems of every layer reported at once, each naming its key and source.
//! - [`settings`]: the settings every service shares (listen and admin addresses, database,
//!   TLS files, log format), validated once.
//! - [`host`]: one host for every service: gRPC server with health and reflection, admin
//!   port and background workers, started and stopped together; the binaries' shared `main`.
//! - [`tls`]: mutual TLS with rustls, with certificate revocation lists; peer identities from
//!   certificate SANs; client channels that check the server's identity; [`tls::live`], the
//!   configuration a service uses now, reloaded without a restart.
//! - [`pki`]: the generated development PKI, with each processor's and registry's signing
//!   key and the CA's revocation list.
//! - [`signing`]: canonical JSON signed with Ed25519 (deletion certificates); key files.
//! - [`certificate_body`]: what a deletion certificate's body must be (certificate.proto):
//!   the check every reader of a signed body makes before saying what it certifies.
//! - [`slots`]: places counted per key (a caller, an identity), given back when dropped.
//! - [`store`]: one sqlx handle over SQLite or PostgreSQL, with per-backend migrations.
//! - [`backoff`]: retry spacing for the outboxes.
//! - [`group_commit`]: the queue behind a group commit: concurrent callers' writes share
//!   one transaction, and a failed batch is written again item by item.
//! - [`clock`]: the system clock with a test offset, and instants as messages say them.
//! - [`direct_io`]: `O_DIRECT` files and the aligned buffers they need.
//! - [`export_files`]: the rules both receivers of export files apply (limits, file names,
//!   digests and chunk checksums, the list of files that closes a part).
//! - [`resumable_hash`]: SHA-256 whose progress is saved and taken up again, so a receiver
//!   that resumes a file hashes only what came after.
//! - [`identity`]: subject identity validation, normalisation and hashing.
//! - [`unicode`]: which characters are Unicode format characters and which show nothing,
//!   for every check and display of text that must not hide or reorder what a reader sees.
//! - [`log_text`]: what log lines show of text from outside a service (another party's
//!   status message, a holder's error): its length and a keyed hash, never its words.
//! - [`names`]: the answer to a listing filtered by a processor's or controller's name that
//!   is not configured.
//! - [`listen`]: TCP listeners handed down by whoever started the process (`LISTEN_FDS`),
//!   or bound here when none was.
//! - [`metrics`]: Prometheus text-format metrics (prometheus-client) on a plain-HTTP admin
//!   port.
//! - [`grpc`]: the gRPC boundary: errors to statuses, callers by certificate identity, the
//!   layer that continues a caller's trace.
//! - [`server`]: the tonic server's limits and trace-context layer, the reflection services,
//!   and serving a router on a caller-bound listener, doing each connection's TLS handshake
//!   with the configuration of the moment.
//! - [`telemetry`]: logging and OpenTelemetry set-up (OTLP, off unless the `OTEL_*`
//!   variables ask for it).
//! - [`trace_context`]: W3C trace context in gRPC metadata and stored rows.
//! - [`transfer_manifest`]: the canonical manifest of a transfer's part, whose SHA-256 both
//!   the sending processor and the recipient compute for the receipt.
//! - [`transfer_receipt`]: the signed body of a transfer receipt, and the checks of its form
//!   that the processor and the registry both make.
//! - [`trust`]: the trust domain and role path every configured caller's identity must have.
//! - [`worker`]: the claim-and-run loop of the outboxes and the task runner.
//! - `testing` (behind the `test-support` feature, and in this crate's tests): the services'
//!   tests on a fresh PostgreSQL database (skipped without one, but failing in CI), and a
//!   capture of their JSON log lines.

pub mod audit;
pub mod backoff;
pub mod certificate_body;
pub mod clock;
pub mod config;
pub mod direct_io;
pub mod export_files;
pub mod group_commit;
pub mod grpc;
pub mod host;
pub mod identity;
pub mod listen;
pub mod log_text;
pub mod metrics;
pub mod names;
pub mod pki;
pub mod resumable_hash;
pub mod server;
pub mod settings;
pub mod signing;
pub mod slots;
pub mod store;
pub mod telemetry;
// Also in this crate's own tests, whose PostgreSQL tests skip or fail by its rule.
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod tls;
pub mod trace_context;
pub mod transfer_manifest;
pub mod transfer_receipt;
pub mod trust;
pub mod unicode;
pub mod worker;

/// Resolves on SIGINT or SIGTERM, for graceful shutdown in `main`.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}
