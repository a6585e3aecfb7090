//! The controller-side registry: takes data-subject requests from integration partners,
//! routes them to the processors that hold the data, delivers them durably, and folds the
//! processors' acknowledgements into each request's state.
//!
//! # Layout
//! - [`config`]: configuration (identities and roles, processors and their categories).
//! - `app`: [`App::build`] (store, processor clients, shared state) and [`App::run`], which
//!   hands the services, metrics and workers to the runtime's host.
//! - `api`: the gRPC handlers (partner API, acknowledgement API, deletion certificates,
//!   package upload and download, contract ends, the Watch stream, views).
//! - `auth`: the registry's callers (partners, operators, processors) by certificate
//!   identity.
//! - `validate`: Submit input rules.
//! - `quota`: per-partner Submit quotas (`[submit_quota]`), a token bucket per partner in
//!   this process's memory.
//! - `intake`: group commit of concurrent Submits; its writer is a worker, drained and
//!   stopped on shutdown.
//! - [`store`]: requests, the delivery outbox, tasks, acknowledgements, events, contract
//!   ends' terms.
//! - `fold`: deliveries and task states → request state.
//! - [`deadline`]: GDPR due dates, and a contract end's grace period and due date.
//! - `dispatcher`: sends the outbox with backoff and jitter.
//! - `metrics`: Prometheus metrics on the admin port (`admin_listen`).
//! - [`packages`]: return-of-data packages: the store their files go through (a folder
//!   today), `manifest.json`, and their expiry.
//! - `reconciler`: asks processors for status when acknowledgements are late.
//! - `forget`: removes finished requests' raw identities and bodies after
//!   `forget_after_days`.
//! - `error`: the registry's error type (made into statuses by `dsrelay_runtime::grpc`).

mod api;
mod app;
mod auth;
#[cfg(test)]
mod complete_part_tests;
pub mod config;
#[cfg(test)]
mod database_down_tests;
pub mod deadline;
mod dispatcher;
mod error;
mod fold;
#[cfg(test)]
mod follow_up_tests;
mod forget;
mod intake;
#[cfg(test)]
mod log_tests;
mod metrics;
pub mod packages;
mod quota;
mod reconciler;
#[cfg(test)]
mod request_state_tests;
#[cfg(test)]
mod returned_data_tests;
pub mod store;
#[cfg(test)]
mod test_postgres;
#[cfg(test)]
mod test_registry;
mod validate;

pub use app::{App, MAX_API_MESSAGE_BYTES};
pub use config::Config;
