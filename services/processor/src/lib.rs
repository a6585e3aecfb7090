//! The processor-side service: receives requests from the controllers it serves, splits each
//! into one task per subprocessor, runs the tasks through connectors, delivers exports (a
//! return of data to the registry, a transfer straight to its recipient), and acknowledges
//! every state change back to the controller's registry.
//!
//! # Layout
//! - [`config`]: controllers, subprocessors and their connectors, worker settings, the data
//!   folder.
//! - `app`: [`App::build`] (store, connectors, registry clients) and [`App::run`], which
//!   hands the services, metrics and workers to the runtime's host.
//! - `api`: Deliver, Cancel, GetStatus, ListSubprocessors, UpdateContractEnd and
//!   ExtendDueDate, for controllers; the processor's error type, which both APIs use.
//! - `metrics`: Prometheus metrics on the admin port (`admin_listen`).
//! - `operator_api`: operators list, confirm and refuse manual tasks, retry failed ones,
//!   requeue dead-lettered acknowledgements, list contract ends, and read the audit trail and
//!   its checkpoints.
//! - [`store`]: requests (with a transfer's recipient, a contract end's terms), tasks (with a
//!   transfer's receipt, a contract end's progress), the acknowledgement outbox, the
//!   upload outbox, and the hash-chained audit trail each change an auditor asks about
//!   appends to in its own transaction (the `ProcessorAuditEvent` enum in
//!   `proto/dsrelay/v1/processor.proto` lists them; its head is signed into the checkpoint
//!   file by `dsrelay_runtime::audit::signer`, `[audit]`).
//! - `task_machine`: every rule of a task's life, as one pure function.
//! - `runner`: claims runnable tasks (leased on the database's clock) and takes each one
//!   step by running its subprocessor's connector (`dsrelay-connectors`), as the task
//!   machine decides; a contract end's step is the connector's bulk step, its progress
//!   acknowledged as it goes.
//! - [`exports`]: the folder under `data_dir` each export task writes its files to.
//! - `head_start`: a return of data's files (or a contract end's returned to the registry)
//!   streamed to the registry while the connector writes them, before the uploader takes the
//!   recorded export.
//! - `lease`: how a claim's holder (the runner's task, the uploader's upload) keeps its
//!   lease: renewed every third of it on the database's clock, lost when a renewal matches
//!   nothing, and no longer trusted when failed renewals leave it about to run out.
//! - `breaker`: marks a holder that failed transiently, so its other tasks wait without
//!   calling it, and drops a mark no task is left to try.
//! - `ack_sender`: sends queued acknowledgements to the registries.
//! - [`text`]: fits reasons, notes and legal bases to the protocol's limits.
//! - [`certificates`]: deletion certificates of erasure and contract end steps, signed with
//!   the processor's key (`signing_key`).
//! - `forget`: removes finished requests' raw identities, bodies, notes and export files
//!   after `forget_after_days`, keeping keyed hashes of the identities.
//! - `holder_discard`: has the holders of contract ends that will not go on (cancelled after
//!   their export began, failed and forgotten) discard what the export recorded there, at
//!   each of the forget worker's sweeps.
//! - `contract_tests` (tests only): a contract end through the real store and runner.
//! - `retried_tests` (tests only): a single task whose holder is down, its failed attempt
//!   acknowledged as retried, through the real store and runner.
//! - `test_postgres` (tests only): the throwaway PostgreSQL database a store test runs on,
//!   and `on_both!`, which runs a test on SQLite and on PostgreSQL.
//! - `uploader`: delivers written exports in chunks, RETURN_OF_DATA and a contract end's
//!   return to the registries and TRANSFER to their recipients (checking the recipient's
//!   identity and receipt), resuming where the destination stands, and moves their tasks on
//!   (a contract end's to waiting for the controller's confirmation).

// First, so that its `on_both!` reaches the modules declared after it.
#[cfg(test)]
#[macro_use]
mod test_postgres;
mod ack_sender;
mod api;
#[cfg(test)]
mod api_test_support;
mod app;
mod breaker;
pub mod certificates;
pub mod config;
#[cfg(test)]
mod contract_certificate_tests;
#[cfg(test)]
mod contract_not_found_tests;
#[cfg(test)]
mod contract_progress_tests;
#[cfg(test)]
mod contract_retry_tests;
#[cfg(test)]
mod contract_supersedes_tests;
#[cfg(test)]
mod contract_tests;
pub mod exports;
mod forget;
mod head_start;
mod holder_discard;
#[cfg(test)]
mod holder_down_tests;
mod lease;
#[cfg(test)]
mod log_tests;
#[cfg(test)]
mod mark_dropped_tests;
mod metrics;
mod operator_api;
#[cfg(test)]
mod refused_retry_tests;
#[cfg(test)]
mod retried_tests;
mod runner;
pub mod store;
mod task_machine;
pub mod text;
#[cfg(test)]
mod transfer_cancel_tests;
#[cfg(test)]
mod transfer_delivery_tests;
#[cfg(test)]
mod unreachable_mark_tests;
#[cfg(test)]
mod upload_cause_tests;
#[cfg(test)]
mod upload_test_support;
mod uploader;

pub use app::{App, MAX_API_MESSAGE_BYTES};
pub use config::Config;

/// What the processor's audit checkpoints name as the trail's owner.
pub const SERVICE: &str = "processor";
