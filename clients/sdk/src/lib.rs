//! Rust client for the dsrelay registry's partner API (`dsrelay.v1.RequestService`,
//! `dsrelay.v1.PackageService` and `dsrelay.v1.CertificateService`) and its operators'
//! contract ends (`dsrelay.v1.ContractService`).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use dsrelay_sdk::{ConnectionSettings, RegistryClient, SubmitBuilder};
//! use dsrelay_sdk::runtime::pki::DevPki;
//!
//! let pki = DevPki::ensure(".dsrelay/pki".as_ref())?;
//! let client = RegistryClient::connect(&ConnectionSettings {
//!     endpoint: "https://127.0.0.1:50051".into(),
//!     tls: pki.files("partner-crm"),
//!     server_identity: dsrelay_sdk::runtime::pki::dev_identity("registry", "controller"),
//! })?;
//! let request = SubmitBuilder::erasure()
//!     .email("maija@example.fi")
//!     .customer_number("C-1")
//!     .categories(["contact", "marketing"])
//!     .build();
//! let answer = client.submit(request).await?;
//! println!("{} is {}", answer.request_id, answer.state);
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`client`]: [`ConnectionSettings`] and [`RegistryClient`], with typed methods for
//!   Submit, Get, List, Watch, Cancel, ExtendDeadline and ListCertificates (and, below, the
//!   contract ends and packages); the other `RequestService` calls (GetChain, ListEvents,
//!   ListAuditEntries, ListAuditCheckpoints, ListDeadLetteredDeliveries, RequeueDelivery) go
//!   through the generated client that [`RegistryClient::raw`] returns. Every typed call
//!   fails with the server's [`tonic::Status`] so callers can show code and message, except
//!   for answers that cannot be right, which fail with a status made here
//!   ([`is_bad_answer`]), and for failures tonic words with little to go on, which the
//!   typed calls and streams (not the generated clients) explain with a status made here
//!   ([`is_explained`]): DEADLINE_EXCEEDED for a call past its deadline, UNAVAILABLE for a
//!   connection closed before the registry answered or lost under a stream.
//! - [`contracts`]: contract ends (operators only): [`RegistryClient::end_contract`] and the
//!   calls that follow one ([`EffectiveAt`] says when it ends).
//! - [`package`]: return-of-data packages: [`RegistryClient::get_package`] and
//!   [`RegistryClient::download_package`], a stream of [`DownloadEvent`]s (manifest, chunks).
//! - [`submit`]: [`SubmitBuilder`] and the identity helpers ([`identity`], [`hashed_identity`],
//!   [`other_identity`]) that assemble a [`proto::SubmitRequest`].
//! - [`status`]: presenting a [`tonic::Status`] ([`code_name`]) and telling a connection
//!   failure ([`is_connection_error`], [`closed_by_peer`]), a call past its deadline
//!   ([`timed_out`]), or answers this client found cannot be right ([`is_bad_answer`]), from
//!   an answer of the server.
//! - [`proto`]: the generated `dsrelay.v1` types, re-exported so callers need no direct
//!   dependency on `dsrelay-proto`; [`runtime`] likewise for `TlsFiles` and the dev PKI.

pub mod client;
pub mod contracts;
pub mod package;
pub mod status;
pub mod submit;

pub use client::{ConnectionSettings, RegistryClient, DEFAULT_CALL_TIMEOUT};
pub use contracts::EffectiveAt;
pub use package::DownloadEvent;
pub use status::{
    closed_by_peer, code_name, is_bad_answer, is_connection_error, is_explained, is_lost_stream,
    timed_out,
};
pub use submit::{hashed_identity, identity, other_identity, SubmitBuilder};

/// The generated `dsrelay.v1` messages, enums and clients.
pub use dsrelay_proto::v1 as proto;
/// The shared runtime: [`runtime::tls::TlsFiles`] and the development PKI ([`runtime::pki`]).
pub use dsrelay_runtime as runtime;
/// The `tonic` the generated code was built with, for [`tonic::Status`] and [`tonic::Code`].
pub use tonic;
