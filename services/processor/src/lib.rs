//! The processor-side service: receives requests from the controllers it serves, splits each
//! into one task per subprocessor, runs the tasks through connectors, and acknowledges every
//! state change back to the controller's registry.
//!
//! # Layout
//! - [`config`]: controllers, subprocessors and their connectors, worker settings.
//! - [`app`]: [`App::build`] and [`App::run`].
//! - [`api`]: Deliver, Cancel, GetStatus and ListSubprocessors, for controllers; the
//!   processor's error type, which both APIs use.
//! - [`metrics`]: Prometheus metrics on the admin port (`admin_listen`).
//! - [`operator_api`]: operators list, confirm and refuse manual tasks.
//! - [`store`]: requests, tasks and the acknowledgement outbox.
//! - [`runner`]: claims runnable tasks and moves them through their states by running
//!   their subprocessors' connectors (`dsrelay-connectors`).
//! - [`ack_sender`]: sends queued acknowledgements to the registries.

pub mod ack_sender;
pub mod api;
pub mod app;
pub mod config;
pub mod metrics;
pub mod operator_api;
pub mod runner;
pub mod store;

pub use app::App;
pub use config::Config;
