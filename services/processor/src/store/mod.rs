//! The processor's durable state: requests, tasks and the acknowledgement outbox. A task's
//! state change and the acknowledgement reporting it are written in one transaction; which
//! change to make is decided by [`crate::task_machine`], never here.
//!
//! - `rows`: the types the store hands out, and the raw rows they are read from.
//! - `tasks`: requests and tasks: accept, cancel, claim, transition, operator views.
//! - `acks`: the acknowledgement outbox.

mod acks;
mod rows;
mod tasks;

use dsrelay_runtime::store::Db;

pub use crate::task_machine::Transition;
pub use rows::{AckJob, ManualRow, TaskJob, TaskKey, TaskRow};
pub use tasks::Accepted;

/// The migrations for each backend, embedded at build time.
pub static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
/// See [`SQLITE_MIGRATIONS`].
pub static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The processor store.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

impl Store {
    /// Wraps a migrated database.
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The database handle.
    pub fn db(&self) -> &Db {
        &self.db
    }
}
