//! An example transfer recipient (GDPR art. 20(2)): another controller that receives a
//! subject's data over the `dsrelay.v1.TransferReceiver` API, over mutual TLS, and writes it
//! to a folder. It shows what a recipient implements, and serves the tests.
//!
//! Behaviour:
//! - Only the certificate identities in `allowed_identities` (processors) may call it
//!   (PERMISSION_DENIED otherwise).
//! - A caller refused for its identity, and a file dropped because its bytes do not hash to
//!   its header's SHA-256, are logged (WARN, naming the sender's certificate identity and the
//!   reason) at most once a second per sender and reason, with the refusals left out counted
//!   (`refusals`).
//! - Files land in `<data_dir>/<sender>/<request_id>/<subprocessor>/<name>`, `<sender>` being
//!   the calling processor's identity made a safe folder name
//!   ([`folder::sender_component`]): each processor names its own subprocessors, so two
//!   processors' parts of one request are kept apart even when their names are the same.
//!   A file is `<name>.partial` while incomplete and is renamed to its name only once its
//!   SHA-256 matched. Every chunk is checked (offset, CRC-32) before a byte of it is written.
//! - Closing a part writes `.manifest.json` (the canonical manifest, see
//!   [`dsrelay_runtime::transfer_manifest`]) and `.receipt.json` (which also names the
//!   sender) next to the files, and answers the receipt, signed with `signing_key` when one
//!   is configured ([`dsrelay_runtime::transfer_receipt`]; unsigned, with a warning at
//!   start, otherwise). A signed receipt is also written, as answered, to
//!   `.receipt.signed.json` in the form `dsrctl receipt get` writes, for `dsrctl receipt
//!   verify`.
//! - A file announced with another header than before restarts at offset 0, a complete one
//!   too, until its part is closed (a processor retrying a task exports anew).
//! - Nothing is answered before what it confirms is on disk (the sender resumes from the
//!   offsets it is told and deletes its copy on the receipt): see [`folder`].
//! - With `chunk_delay_ms > 0` it pauses after every stored chunk, so tests can interrupt a
//!   transfer midway.
//!
//! # Layout
//! - [`config`]: the TOML file plus `DSRELAY_RECIPIENT__*` environment overrides.
//! - [`folder`]: files, headers and receipts in the data folder.
//! - `api`: the gRPC handlers: caller check, input validation, chunk rules.
//! - `refusals`: the log lines of refused senders and dropped files, rate-limited.
//! - [`app`]: [`App::build`] and [`App::run`] (the service on the runtime's host, with health,
//!   reflection and an admin port).

mod api;
pub mod app;
pub mod config;
pub mod folder;
mod refusals;

pub use app::App;
pub use config::Config;
